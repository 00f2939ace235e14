//! `ties`: TIES-merging (Yadav et al. 2023). Trim each δⱼ to its top
//! `int(density·N)` magnitudes, elect the sign of Σ wⱼδ̂ⱼ per element, keep the
//! agreeing entries and average them: θ⁰ + λ·Σ mⱼwⱼδ̂ⱼ / Σ mⱼwⱼ.

use super::gta::{self, Gta, Sparsify};
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::registry::{BuiltinMerger, PluginInfo, PluginKind};
use std::sync::Arc;

pub struct Ties;

impl Merger for Ties {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "ties".into(),
            description: "TIES: trim δ by magnitude, elect signs, average the agreeing deltas"
                .into(),
            params: gta::params(true, Sparsify::Magnitude),
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
            sparsify: Sparsify::Magnitude,
            consensus: true,
        }
        .merge(g)
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Ties)) }
