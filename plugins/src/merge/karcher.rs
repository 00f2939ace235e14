//! `karcher`: the Karcher (Fréchet) mean of the models' directions on the
//! unit hypersphere, scaled by their mean norm (mergekit's `karcher`).
//!
//! Per tensor (flattened), with nᵢ = ‖xᵢ‖, uᵢ = xᵢ/nᵢ and uniform weights αᵢ
//! (renormalised over the tensors with nᵢ > tol): start from m = Σ αᵢuᵢ / ‖·‖
//! (u₁ if that norm is below tol), then up to `max_iter` times take the
//! Riemannian gradient step
//! `v = Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m)` over the uᵢ with θᵢ = acos(uᵢ·m) ≥ tol,
//! stop when ‖v‖ < tol, else `m ← cos‖v‖·m + sin‖v‖·v/‖v‖`, renormalised.
//! The result is `m · Σ αᵢnᵢ` (over all inputs, zero tensors counting 0).

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct Karcher;

use super::dot_f64 as dot;
use fusechat_core::merge::pool;

/// The Karcher mean of `xs`, into a new buffer (and one more for the step).
/// Compiled for AVX2 and AVX-512 as well (the same operations on every path).
pub fn karcher(xs: &[&[f32]], max_iter: usize, tol: f64) -> Vec<f32> {
    karcher_kernel(xs, max_iter, tol)
}

fusechat_core::multiversion! {
fn karcher_kernel(xs: &[&[f32]], max_iter: usize, tol: f64) -> Vec<f32> {
    let n = xs.len();
    let alpha = 1.0 / n as f64;
    let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; xs[0].len()];
    }
    let a = 1.0 / valid.len() as f64; // αᵢ renormalised over the valid inputs

    // both buffers from the merge engine's pool (recycled memory, no fresh pages)
    let mut m = pool::zeroed(xs[0].len());
    for &i in &valid {
        let c = a / norms[i];
        m.iter_mut()
            .zip(xs[i].iter())
            .for_each(|(o, x)| *o += (c * *x as f64) as f32);
    }
    let mn = dot(&m, &m).sqrt();
    if mn < tol {
        let c = 1.0 / norms[valid[0]];
        m.iter_mut()
            .zip(xs[valid[0]].iter())
            .for_each(|(o, x)| *o = (c * *x as f64) as f32);
    } else {
        m.iter_mut().for_each(|o| *o = (*o as f64 / mn) as f32);
    }
    let mut v = pool::zeroed(m.len());
    for _ in 0..max_iter {
        // v = Σ βᵢ·xᵢ/nᵢ − (Σ βᵢ cos θᵢ)·m, βᵢ = a·θᵢ/sin θᵢ
        let mut terms = Vec::with_capacity(valid.len());
        let mut shift = 0.0;
        for &i in &valid {
            let cos = (dot(&m, xs[i]) / norms[i]).clamp(-1.0, 1.0);
            let theta = cos.acos();
            if theta < tol {
                continue;
            }
            let beta = a * theta / theta.sin();
            terms.push((i, beta / norms[i]));
            shift += beta * cos;
        }
        // the step, in a buffer of its own: v = Σ cᵢxᵢ − shift·m
        v.iter_mut()
            .zip(&m)
            .for_each(|(vk, mk)| *vk = (-shift * *mk as f64) as f32);
        for (i, c) in &terms {
            let c = *c as f32;
            v.iter_mut()
                .zip(xs[*i].iter())
                .for_each(|(vk, x)| *vk += c * x);
        }
        let vn = dot(&v, &v).sqrt();
        if vn < tol {
            break;
        }
        let (c, s) = (vn.cos() as f32, (vn.sin() / vn) as f32);
        m.iter_mut()
            .zip(&v)
            .for_each(|(mk, vk)| *mk = c * *mk + s * vk);
        let un = dot(&m, &m).sqrt();
        if un > tol {
            m.iter_mut().for_each(|o| *o = (*o as f64 / un) as f32);
        }
    }
    pool::give(v);
    let scale: f64 = norms.iter().map(|nm| alpha * nm).sum();
    m.iter_mut().for_each(|o| *o = (*o as f64 * scale) as f32);
    m
}
}

impl Merger for Karcher {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "karcher".into(),
            description:
                "Karcher mean: the models' average direction on the hypersphere, at their mean norm"
                    .into(),
            params: vec![
                ParamSpec::int("max_iter", Scope::Shared)
                    .default(10i64)
                    .range(0.0, 10_000.0)
                    .help("most gradient steps per tensor"),
                ParamSpec::float("tol", Scope::Shared)
                    .default(1e-5)
                    .range(0.0, 1.0)
                    .help("stop when the step is shorter than this; smaller norms count as zero"),
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
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        if g.models.len() == 1 {
            return Ok(Merged::new(std::mem::take(&mut g.models[0])));
        }
        let max_iter = g.params.f64("max_iter")? as usize;
        let tol = g.params.f64("tol")?;
        let xs: Vec<&[f32]> = g.models.iter().map(|m| &m[..]).collect();
        Ok(Merged::new(karcher(&xs, max_iter, tol)))
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Karcher)) }
