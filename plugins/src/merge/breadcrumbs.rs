//! `breadcrumbs`: Model Breadcrumbs (Davari and Belilovsky 2023): drop the
//! largest |δ| (`gamma`) and the smallest, keeping `density`, then θ⁰ + λ·Σ wⱼδ̂ⱼ
//! (divided by Σ wⱼ when `normalize`).

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const BREADCRUMBS: Gta = Gta {
    name: "breadcrumbs",
    description: "Model Breadcrumbs: drop δ's outliers and its smallest entries, then add the weighted deltas",
    sparsify: Sparsify::Outliers,
    consensus: false,
    default_normalize: false,
};

inventory::submit! { BuiltinMerger(|| Arc::new(BREADCRUMBS)) }
