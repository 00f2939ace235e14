//! `della_linear`: DELLA's MAGPRUNE drop and rescale, then θ⁰ + λ·Σ wⱼδ̂ⱼ
//! without sign election.

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const DELLA_LINEAR: Gta = Gta {
    name: "della_linear",
    description: "DELLA without sign election: MAGPRUNE, then the weighted sum of the deltas",
    sparsify: Sparsify::MagPrune,
    consensus: false,
    default_normalize: false,
};

inventory::submit! { BuiltinMerger(|| Arc::new(DELLA_LINEAR)) }
