//! `della`: DELLA (Deep et al. 2024): MAGPRUNE's magnitude-ranked random
//! drop (keep probability density ± epsilon by rank in each row), L1 rescale,
//! then TIES' sign election and the average of the agreeing entries.

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const DELLA: Gta = Gta {
    name: "della",
    description: "DELLA: magnitude-ranked random drop of δ (MAGPRUNE), then TIES sign election",
    sparsify: Sparsify::MagPrune,
    consensus: true,
    default_normalize: true,
};

inventory::submit! { BuiltinMerger(|| Arc::new(DELLA)) }
