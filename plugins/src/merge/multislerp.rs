//! `multislerp`: mergekit's barycentric interpolation of any number of models
//! on the hypersphere (or of their task vectors, when a base is given).
//!
//! Each tensor xᵢ (flattened; δᵢ with a base) has norm nᵢ and direction
//! uᵢ = xᵢ / (nᵢ + ε), weights wᵢ (divided by Σ w with `normalize_weights`).
//! With m the unit vector along Σ wᵢuᵢ, the tangent result is
//! r = Σ wᵢ(uᵢ − (uᵢ·m)·m); then, with ρ = ‖r‖ + ε,
//! `θ = (m·cos ρ + r·sin ρ / ρ) · Σ wᵢnᵢ` (+ θ⁰).
//! If ‖Σ wᵢuᵢ‖ < ε, two models fall back to w₁x₁ + w₂x₂; more is an error.
//! One model is returned as it is.

use super::dot_f64;
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct MultiSlerp;

/// Multi-SLERP of `xs` with weights `w` (already normalised if asked), into a
/// new buffer, the only one of the tensor's size that it allocates.
///
/// Note that r = a − (a·m)·m with a = Σ wᵢuᵢ and m = a/‖a‖ is zero but for
/// rounding: the result is m·Σ wᵢnᵢ to within a few ulps. It is computed as
/// mergekit writes it all the same. Compiled for AVX2 and AVX-512 as well
/// (the same operations on every path).
pub fn multislerp(xs: &[&[f32]], w: &[f64], eps: f64) -> Result<Vec<f32>, String> {
    multislerp_kernel(xs, w, eps)
}

fusechat_core::multiversion! {
fn multislerp_kernel(xs: &[&[f32]], w: &[f64], eps: f64) -> Result<Vec<f32>, String> {
    let n = xs[0].len();
    let norms: Vec<f64> = xs.iter().map(|x| dot_f64(x, x).sqrt()).collect();
    // a = Σ wᵢuᵢ, with uᵢ = cᵢxᵢ, summed in f64 model by model over blocks
    // (so that the loops vectorise) and rounded once
    let c: Vec<f64> = norms
        .iter()
        .zip(w)
        .map(|(nm, wi)| wi / (nm + eps))
        .collect();
    // from the merge engine's pool (recycled memory, no fresh pages)
    let mut a = fusechat_core::merge::pool::zeroed(n);
    let mut acc = [0f64; 1024];
    for (start, block) in (0..n).step_by(acc.len()).zip(a.chunks_mut(acc.len())) {
        let acc = &mut acc[..block.len()];
        let end = start + block.len();
        acc.iter_mut()
            .zip(&xs[0][start..end])
            .for_each(|(s, x)| *s = c[0] * *x as f64);
        for (x, ci) in xs.iter().zip(&c).skip(1) {
            acc.iter_mut()
                .zip(&x[start..end])
                .for_each(|(s, x)| *s += ci * *x as f64);
        }
        block
            .iter_mut()
            .zip(acc.iter())
            .for_each(|(b, s)| *b = *s as f32);
    }
    let a_norm = dot_f64(&a, &a).sqrt();
    if a_norm < eps {
        if xs.len() == 2 {
            return Ok((0..n)
                .map(|k| (xs[0][k] as f64 * w[0] + xs[1][k] as f64 * w[1]) as f32)
                .collect());
        }
        return Err("the weighted sum of the models' directions is zero (antipodal tensors whose weights cancel); change the weights".into());
    }
    // Σ wᵢ(uᵢ·m), m = a/‖a‖
    let shift: f64 = xs
        .iter()
        .zip(&c)
        .map(|(x, ci)| ci * dot_f64(x, &a) / a_norm)
        .sum();
    // r = a − shift·m
    let r = |ak: f32| ak as f64 * (1.0 - shift / a_norm);
    let f = 1.0 - shift / a_norm;
    let rho = f.abs() * a_norm + eps;
    let scale: f64 = norms.iter().zip(w).map(|(nm, wi)| nm * wi).sum();
    let (cos, sinc) = (rho.cos(), rho.sin() / rho);
    a.iter_mut()
        .for_each(|ak| *ak = ((*ak as f64 / a_norm * cos + r(*ak) * sinc) * scale) as f32);
    Ok(a)
}
}

impl Merger for MultiSlerp {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "multislerp".into(),
            description: "Multi-SLERP: weighted interpolation of several models on the hypersphere"
                .into(),
            params: vec![
                super::weight_param(),
                ParamSpec::bool("normalize_weights", Scope::Shared)
                    .default(true)
                    .help("divide the weights by their sum"),
                ParamSpec::float("eps", Scope::Shared)
                    .default(1e-8)
                    .range(0.0, 1.0)
                    .help("small constant added to norms"),
            ],
        }
    }
    fn check_params(
        &self,
        p: &fusechat_core::merge::params::ResolvedParams,
    ) -> Vec<(String, Option<usize>, String)> {
        match (p.model_f64("weight"), p.bool("normalize_weights")) {
            (Ok(w), Ok(true)) if w.len() > 1 && w.iter().sum::<f64>() == 0.0 => vec![(
                "weight".into(),
                None,
                "the weights sum to 0, so they cannot be normalised; set normalize_weights = false or change them".into(),
            )],
            _ => Vec::new(),
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Optional,
            min_models: 1,
            max_models: None,
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let mut w = g.params.model_f64("weight")?;
        if g.models.len() == 1 {
            return Ok(Merged::new(std::mem::take(&mut g.models[0])));
        }
        if g.params.bool("normalize_weights")? {
            let s: f64 = w.iter().sum();
            if s == 0.0 {
                return Err(fusechat_core::Error::msg(format!(
                    "tensor `{}`: the weights sum to 0, so they cannot be normalised; set normalize_weights = false or change them",
                    g.name
                )));
            }
            w.iter_mut().for_each(|x| *x /= s);
        }
        let eps = g.params.f64("eps")?;
        if g.base.is_some() {
            super::deltas_in_place(&mut g)?;
        }
        let xs: Vec<&[f32]> = g.models.iter().map(|m| &m[..]).collect();
        let mut out = multislerp(&xs, &w, eps).map_err(fusechat_core::Error::msg)?;
        if let Some(base) = g.base.as_deref() {
            out.iter_mut().zip(base).for_each(|(x, b)| *x += b);
        }
        Ok(Merged {
            data: out.into(),
            weights: Some(w),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(MultiSlerp)) }
