//! `ties`: TIES-merging (Yadav et al. 2023). Trim each δⱼ to its top
//! `int(density·N)` magnitudes, elect the sign of Σ wⱼδ̂ⱼ per element, keep the
//! agreeing entries and average them: θ⁰ + λ·Σ mⱼwⱼδ̂ⱼ / Σ mⱼwⱼ.

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const TIES: Gta = Gta {
    name: "ties",
    description: "TIES: trim δ by magnitude, elect signs, average the agreeing deltas",
    sparsify: Sparsify::Magnitude,
    consensus: true,
    default_normalize: true,
};

inventory::submit! { BuiltinMerger(|| Arc::new(TIES)) }
