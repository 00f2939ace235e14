//! `task_arithmetic`: θ = θ⁰ + λ·Σ wⱼδⱼ, divided by Σ wⱼ when `normalize`
//! (Ilharco et al., "Editing models with task arithmetic").
//!
//! ```
//! use fusechat_core::merge::{Merger, TensorGroup};
//! use fusechat_core::merge::params::{ResolvedParams, Scalar};
//! use fusechat_plugins::merge::task_arithmetic::TASK_ARITHMETIC;
//! let mut p = ResolvedParams::default();
//! p.shared.insert("normalize".into(), Scalar::Bool(true));
//! p.shared.insert("lambda".into(), Scalar::Float(1.0));
//! p.shared.insert("rescale".into(), Scalar::Str("none".into()));
//! for w in [1.0, 3.0] {
//!     p.per_model.push([("weight".to_string(), Scalar::Float(w)), ("density".to_string(), Scalar::Float(1.0))].into());
//! }
//! let g = TensorGroup { name: "w", layer: None, shape: &[2], base: Some(vec![1.0, 1.0].into()),
//!     models: vec![vec![2.0, 1.0].into(), vec![1.0, 5.0].into()], params: &p, seed: 0, scope_stats: None };
//! // θ⁰ + (1·[1,0] + 3·[0,4]) / 4 = [1.25, 4.0]
//! assert_eq!(&*TASK_ARITHMETIC.merge(g).unwrap().data, &[1.25, 4.0]);
//! ```

use super::gta::{Gta, Sparsify};
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const TASK_ARITHMETIC: Gta = Gta {
    name: "task_arithmetic",
    description: "θ⁰ + λ·Σ wⱼ(θʲ − θ⁰), normalised by Σ wⱼ on request",
    sparsify: Sparsify::None,
    consensus: false,
    default_normalize: false,
};

inventory::submit! { BuiltinMerger(|| Arc::new(TASK_ARITHMETIC)) }
