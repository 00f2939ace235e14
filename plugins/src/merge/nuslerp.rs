//! `nuslerp`: mergekit's NuSLERP, spherical interpolation between two models
//! at `t = w₂ / (w₁ + w₂)` (0.5 when |w₁ + w₂| < 1e-6), or between their task
//! vectors when a base is given (θ⁰ + slerp(δ₁, δ₂)).
//!
//! The vectors interpolated are the whole tensor (`nuslerp_flatten`, the
//! default), else each row (last dimension), else with `nuslerp_row_wise`
//! each slice along dimension 0 (mergekit's naming). For each pair of vectors,
//! with uᵢ = vᵢ / max(‖vᵢ‖, 1e-7), θ = acos(clamp(u₁·u₂, −1, 1)):
//! `(sin((1−t)θ)·v₁ + sin(tθ)·v₂) / sin θ`, or the lerp `(1−t)·v₁ + t·v₂`
//! when 1 − cos²θ ≤ 1e-16 (`slerp` falls back to the lerp far earlier, at
//! |cos θ| > 0.9995).

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct NuSlerp;

/// NuSLERP of the vectors `v0[idx(k)]`, `v1[idx(k)]` for k in 0..len, written into `v0`.
fn slerp_strided(t: f64, v0: &mut [f32], v1: &[f32], len: usize, idx: impl Fn(usize) -> usize) {
    let (mut n0, mut n1, mut dot) = (0f64, 0f64, 0f64);
    for k in 0..len {
        let (a, b) = (v0[idx(k)] as f64, v1[idx(k)] as f64);
        n0 += a * a;
        n1 += b * b;
        dot += a * b;
    }
    let cos = (dot / (n0.sqrt().max(1e-7) * n1.sqrt().max(1e-7))).clamp(-1.0, 1.0);
    // colinear, as mergekit 0.1.5 tests it: 1 − cos² ≤ ε², ε = 1e-8
    let (s0, s1) = if 1.0 - cos * cos <= 1e-16 {
        (1.0 - t, t)
    } else {
        let theta = cos.acos();
        let sin_theta = theta.sin();
        (
            ((1.0 - t) * theta).sin() / sin_theta,
            (t * theta).sin() / sin_theta,
        )
    };
    for k in 0..len {
        let i = idx(k);
        v0[i] = (s0 * v0[i] as f64 + s1 * v1[i] as f64) as f32;
    }
}

/// NuSLERP of two tensors of `shape` at `t`, written into `v0`.
pub fn nuslerp(t: f64, v0: &mut [f32], v1: &[f32], shape: &[usize], row_wise: bool, flatten: bool) {
    let n = v0.len();
    if flatten || shape.len() <= 1 || n == 0 {
        slerp_strided(t, v0, v1, n, |k| k);
    } else if row_wise {
        let len = shape[0];
        let stride = n / len;
        for j in 0..stride {
            slerp_strided(t, v0, v1, len, |k| k * stride + j);
        }
    } else {
        let len = shape[shape.len() - 1];
        for r in 0..n / len {
            slerp_strided(t, v0, v1, len, |k| r * len + k);
        }
    }
}

impl Merger for NuSlerp {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "nuslerp".into(),
            description: "NuSLERP: spherical interpolation of two models (or their task vectors) by weight".into(),
            params: vec![
                super::weight_param(),
                ParamSpec::bool("nuslerp_row_wise", Scope::Shared)
                    .default(false)
                    .help("interpolate the slices along dimension 0 (columns of a matrix) instead of rows"),
                ParamSpec::bool("nuslerp_flatten", Scope::Shared)
                    .default(true)
                    .help("interpolate the whole tensor as one vector (overrides nuslerp_row_wise)"),
            ],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Optional,
            min_models: 2,
            max_models: Some(2),
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let w = g.params.model_f64("weight")?;
        let sum = w[0] + w[1];
        let t = if sum.abs() < 1e-6 { 0.5 } else { w[1] / sum };
        let row_wise = g.params.bool("nuslerp_row_wise")?;
        let flatten = g.params.bool("nuslerp_flatten")?;
        if g.base.is_some() {
            super::deltas_in_place(&mut g)?;
        }
        let mut models = std::mem::take(&mut g.models);
        let v1 = models.pop().expect("the contract asks for two models");
        let mut v0 = models.pop().expect("the contract asks for two models");
        nuslerp(t, &mut v0, &v1, g.shape, row_wise, flatten);
        if let Some(base) = g.base.as_deref() {
            v0.iter_mut().zip(base).for_each(|(x, b)| *x += b);
        }
        Ok(Merged {
            data: v0,
            weights: Some(vec![1.0 - t, t]),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(NuSlerp)) }
