//! `linear`: a weighted average, θ = Σ wᵢθᵢ / Σ wᵢ when `normalize` (the
//! default), else Σ wᵢθᵢ. Accumulates in f32, in model order.
//!
//! ```
//! use fusechat_core::merge::{Merger, TensorGroup};
//! use fusechat_core::merge::params::{ResolvedParams, Scalar};
//! use fusechat_plugins::merge::linear::Linear;
//! let mut p = ResolvedParams::default();
//! p.shared.insert("normalize".into(), Scalar::Bool(true));
//! p.per_model = vec![[("weight".to_string(), Scalar::Float(1.0))].into(), [("weight".to_string(), Scalar::Float(3.0))].into()];
//! let g = TensorGroup { name: "w", layer: None, shape: &[2], base: None,
//!     models: vec![vec![0.0, 4.0].into(), vec![4.0, 0.0].into()], params: &p, seed: 0, scope_stats: None };
//! assert_eq!(&*Linear.merge(g).unwrap().data, &[3.0, 1.0]);
//! ```

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct Linear;

impl Merger for Linear {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "linear".into(),
            description: "weighted average of the models' parameters".into(),
            params: vec![
                super::weight_param(),
                ParamSpec::bool("normalize", Scope::Shared)
                    .default(true)
                    .help("divide by the sum of the weights"),
            ],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Ignored,
            min_models: 1,
            max_models: None,
        }
    }
    /// mergekit 0.1.5's linear already computes in f32 and rounds once, as
    /// fusechat does: `numerics = "mergekit"` changes nothing.
    fn mergekit_numerics(&self) -> bool {
        true
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let weights = g.params.model_f64("weight")?;
        let normalize = g.params.bool("normalize")?;
        let wsum: f64 = weights.iter().sum();
        if normalize && wsum == 0.0 {
            return Err(fusechat_core::Error::msg(
                "the weights sum to 0, so they cannot be normalised; set normalize = false or change them",
            ));
        }
        let out = super::weighted_sum(&mut g.models, &weights, normalize.then_some(wsum as f32));
        let reported = weights
            .iter()
            .map(|w| if normalize { w / wsum } else { *w })
            .collect();
        Ok(Merged {
            data: out,
            weights: Some(reported),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Linear)) }
