//! `dare_linear`: DARE (Yu et al. 2023). Drop each element of δⱼ with
//! probability 1 − density, rescale the survivors (`rescale`: L1 norm as
//! mergekit, or 1/density as the paper), then combine linearly as task
//! arithmetic. The mask is drawn from a counter-based generator keyed by
//! (seed, tensor, model, element): bit-reproducible whatever the threads.

use super::gta::{self, Gta, Sparsify};
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::registry::{BuiltinMerger, PluginInfo, PluginKind};
use std::sync::Arc;

pub struct DareLinear;

impl Merger for DareLinear {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "dare_linear".into(),
            description: "DARE: random drop of δ with rescale, then a linear combination".into(),
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
            consensus: false,
        }
        .merge(g)
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(DareLinear)) }
