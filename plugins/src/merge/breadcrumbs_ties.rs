//! `breadcrumbs_ties`: Model Breadcrumbs' sparsification, then TIES' sign election
//! and the agreeing entries' sum (averaged when `normalize`).

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const BREADCRUMBS_TIES: Gta = Gta {
    name: "breadcrumbs_ties",
    description: "Model Breadcrumbs sparsification, then TIES sign election",
    sparsify: Sparsify::Outliers,
    consensus: true,
    default_normalize: false,
};

inventory::submit! { BuiltinMerger(|| Arc::new(BREADCRUMBS_TIES)) }
