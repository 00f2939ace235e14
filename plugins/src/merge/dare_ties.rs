//! `dare_ties`: DARE's random drop and rescale of δⱼ, then TIES' sign
//! election and agreeing-entry average.

use super::gta::{self, Gta, Sparsify};
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::registry::{BuiltinMerger, PluginInfo, PluginKind};
use std::sync::Arc;

pub struct DareTies;

impl Merger for DareTies {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "dare_ties".into(),
            description: "DARE: random drop of δ with rescale, then TIES sign election".into(),
            params: gta::params(false, Sparsify::Bernoulli),
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Required,
            min_models: 1,
            max_models: None,
        }
    }
    fn merge(&self, g: TensorGroup<'_>) -> fusechat_core::Result<Merged> {
        Gta {
            sparsify: Sparsify::Bernoulli,
            consensus: true,
        }
        .merge(g)
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(DareTies)) }
