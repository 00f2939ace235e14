//! `slerp`: spherical linear interpolation between the base (t = 0) and one
//! other model (t = 1), per tensor (Shoemake 1985, as mergekit applies it).
//!
//! The tensors are flattened; `dot` is the cosine of the angle between them.
//! If |dot| > 0.9995 the result is the plain lerp `(1−t)·v0 + t·v1`; otherwise,
//! with θ = acos(dot), `sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1` on the
//! un-normalised tensors. Norms and the dot product accumulate in f64.
//!
//! ```
//! use fusechat_core::merge::{Merger, TensorGroup};
//! use fusechat_core::merge::params::{ResolvedParams, Scalar};
//! use fusechat_plugins::merge::slerp::Slerp;
//! let mut p = ResolvedParams::default();
//! p.shared.insert("t".into(), Scalar::Float(0.5));
//! p.per_model.push(Default::default());
//! let g = TensorGroup { name: "w", layer: None, shape: &[2], base: Some(vec![1.0, 0.0].into()),
//!     models: vec![vec![0.0, 1.0].into()], params: &p, seed: 0, scope_stats: None };
//! let r = Slerp.merge(g).unwrap().data;
//! // halfway along the quarter circle: (cos 45°, sin 45°)
//! assert!((r[0] - 0.70710677).abs() < 1e-6 && (r[1] - 0.70710677).abs() < 1e-6);
//! ```

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub const DOT_THRESHOLD: f64 = 0.9995;
const EPS: f64 = 1e-8;

pub struct Slerp;

/// SLERP of two flat tensors at `t`, written into `v0`.
pub fn slerp(t: f64, v0: &mut [f32], v1: &[f32]) {
    if t == 0.0 {
        return; // exactly the base
    }
    let (mut n0, mut n1, mut dot) = (0f64, 0f64, 0f64);
    for (a, b) in v0.iter().zip(v1) {
        let (a, b) = (*a as f64, *b as f64);
        n0 += a * a;
        n1 += b * b;
        dot += a * b;
    }
    let (n0, n1) = (n0.sqrt(), n1.sqrt());
    // As mergekit: a vector with norm <= eps is not normalised.
    let dot = dot / (if n0 > EPS { n0 } else { 1.0 }) / (if n1 > EPS { n1 } else { 1.0 });
    let (s0, s1) = if dot.abs() > DOT_THRESHOLD {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let sin_theta = theta.sin();
        (
            ((1.0 - t) * theta).sin() / sin_theta,
            (t * theta).sin() / sin_theta,
        )
    };
    for (a, b) in v0.iter_mut().zip(v1) {
        *a = (s0 * *a as f64 + s1 * *b as f64) as f32;
    }
}

impl Merger for Slerp {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "slerp".into(),
            description: "spherical interpolation from the base (t=0) to one other model (t=1)"
                .into(),
            params: vec![
                ParamSpec::float("t", Scope::Shared)
                    .required()
                    .range(0.0, 1.0)
                    .unless("extrapolate")
                    .help("interpolation factor in [0, 1]; 0 gives the base"),
                ParamSpec::bool("extrapolate", Scope::Shared)
                    .default(false)
                    .help("allow t outside [0, 1] (mergekit extrapolates silently; fusechat refuses unless asked)"),
            ],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Required,
            min_models: 1,
            max_models: Some(1),
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let t = g.params.f64("t")?;
        let mut v0 = g
            .base
            .take()
            .ok_or_else(|| fusechat_core::Error::msg("slerp needs a base model"))?;
        slerp(t, &mut v0, &g.models[0]);
        Ok(Merged {
            data: v0,
            weights: Some(vec![t]),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Slerp)) }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_parallel_vectors() {
        let base = vec![0.3f32, -1.2, 2.0];
        let other = vec![-0.7f32, 0.1, 0.4];
        let mut a = base.clone();
        slerp(0.0, &mut a, &other);
        assert_eq!(a, base);
        let mut b = base.clone();
        slerp(1.0, &mut b, &other);
        for (x, y) in b.iter().zip(&other) {
            assert!((x - y).abs() < 1e-6);
        }
        // Parallel vectors fall back to lerp: 2v and v at t=0.5 give 1.5v.
        let mut c = vec![2.0f32, 4.0];
        slerp(0.5, &mut c, &[1.0, 2.0]);
        assert_eq!(c, vec![1.5, 3.0]);
    }
}
