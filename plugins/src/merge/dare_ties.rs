//! `dare_ties`: DARE's random drop and rescale of δⱼ, then TIES' sign
//! election and agreeing-entry average.

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const DARE_TIES: Gta = Gta {
    name: "dare_ties",
    description: "DARE: random drop of δ with rescale, then TIES sign election",
    sparsify: Sparsify::Bernoulli,
    consensus: true,
    default_normalize: false,
};

inventory::submit! { BuiltinMerger(|| Arc::new(DARE_TIES)) }
