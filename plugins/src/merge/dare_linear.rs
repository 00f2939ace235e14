//! `dare_linear`: DARE (Yu et al. 2023). Drop each element of δⱼ with
//! probability 1 − density, rescale the survivors (`rescale`: L1 norm as
//! mergekit, or 1/density as the paper), then combine linearly as task
//! arithmetic. The mask is drawn from a counter-based generator keyed by
//! (seed, tensor, model, element): bit-reproducible whatever the threads.

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const DARE_LINEAR: Gta = Gta {
    name: "dare_linear",
    description: "DARE: random drop of δ with rescale, then a linear combination",
    sparsify: Sparsify::Bernoulli,
    consensus: false,
    default_normalize: false,
};

inventory::submit! { BuiltinMerger(|| Arc::new(DARE_LINEAR)) }
