//! `sce`: Select, Calculate, Erase (FuseChat-2.0, arXiv 2408.07990).
//!
//! With δⱼ = θʲ − θ⁰:
//! 1. **Select**: when `select_topk` < 1, keep the elements whose variance
//!    across the δⱼ (population variance) is in the top `int(nonzero·select_topk)`.
//! 2. **Calculate**: ηⱼ = mean((δⱼ ⊙ mask)²), normalised to sum 1 (uniform when
//!    |Σ η| < 1e-6, as the reference implementation does).
//! 3. **Erase**: elect the sign of Σⱼ δⱼ per element and drop disagreeing entries.
//!
//! θ = θ⁰ + Σ ηⱼeⱼδⱼ / max(Σ ηⱼeⱼ, 1e-6).
//!
//! `variant = "vendored"` (the default, FuseChat's own mergekit copy) uses the
//! mask only for the weights ηⱼ; `"upstream"` (mergekit) also applies it to
//! the deltas that are erased and summed.

use super::gta::{agrees, elected_sign};
use fusechat_core::merge::{pool, BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct Sce;

/// The selection of step 1: each element's population variance across the
/// deltas, with all but the top `int(nonzero·topk)` set to 0, so that an
/// element is selected where its entry is non-zero. `None` when `topk` ≥ 1
/// selects every element.
fn selected_variances(deltas: &[&[f32]], topk: f64) -> Option<Vec<f32>> {
    if topk >= 1.0 {
        return None;
    }
    let mut var = pool::zeroed(deltas[0].len());
    if topk <= 0.0 {
        return Some(var);
    }
    variances(deltas, &mut var);
    let nonzero = var.iter().filter(|v| **v != 0.0).count();
    // Ties at the threshold are resolved in index order; a kept zero-variance
    // element (only possible when keep > nonzero, which cannot happen) stays out.
    super::gta::keep_top_k(&mut var, (nonzero as f64 * topk) as usize);
    Some(var)
}

fusechat_core::multiversion! {
    /// `out[i]` = the population variance of the deltas' i-th entries, in
    /// f64 (the mean, then the mean squared deviation, each summed in model
    /// order), rounded to f32; block by block, so that the loops vectorise.
    fn variances(deltas: &[&[f32]], out: &mut [f32]) {
        const BLOCK: usize = 1024;
        let k = deltas.len() as f64;
        let (mut mean, mut dev) = ([0f64; BLOCK], [0f64; BLOCK]);
        for start in (0..out.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(out.len());
            let (mean, dev) = (&mut mean[..end - start], &mut dev[..end - start]);
            mean.fill(0.0);
            for d in deltas {
                mean.iter_mut().zip(&d[start..end]).for_each(|(m, x)| *m += *x as f64);
            }
            mean.iter_mut().for_each(|m| *m /= k);
            dev.fill(0.0);
            for d in deltas {
                for ((v, m), x) in dev.iter_mut().zip(mean.iter()).zip(&d[start..end]) {
                    let e = *x as f64 - m;
                    *v += e * e;
                }
            }
            for (o, v) in out[start..end].iter_mut().zip(dev.iter()) {
                *o = (v / k) as f32;
            }
        }
    }
}

fusechat_core::multiversion! {
    /// Step 2's energy of one delta: Σ x² over the selected elements (all
    /// when `selected` is `None`), in f64 over eight interleaved sums.
    fn energy(d: &[f32], selected: Option<&[f32]>) -> f64 {
        let mut acc = [0f64; 8];
        let mut tail = 0f64;
        let square = |x: f32, on: bool| if on { (x as f64) * (x as f64) } else { 0.0 };
        match selected {
            None => {
                let c = d.chunks_exact(8);
                tail = c.remainder().iter().map(|x| square(*x, true)).sum();
                for c in c {
                    for (a, x) in acc.iter_mut().zip(c) {
                        *a += square(*x, true);
                    }
                }
            }
            Some(sel) => {
                let (c, cs) = (d.chunks_exact(8), sel.chunks_exact(8));
                for (x, v) in c.remainder().iter().zip(cs.remainder()) {
                    tail += square(*x, *v != 0.0);
                }
                for (c, v) in c.zip(cs) {
                    for k in 0..8 {
                        acc[k] += square(c[k], v[k] != 0.0);
                    }
                }
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

fusechat_core::multiversion! {
    /// `x ← 0` where the element is not selected (a select, not a branch:
    /// the selection is as good as random).
    fn keep_selected(d: &mut [f32], selected: &[f32]) {
        for (x, v) in d.iter_mut().zip(selected) {
            *x = if *v == 0.0 { 0.0 } else { *x };
        }
    }
}

fusechat_core::multiversion! {
    /// Step 3 and the sum: per element, the sign of Σⱼ δⱼ (+ on ties), then
    /// `out += Σ ηⱼδⱼ / max(Σ ηⱼ, 1e-6)` over the agreeing (non-zero) δⱼ,
    /// summed in model order in f32.
    fn erase_and_add(out: &mut [f32], deltas: &[&[f32]], eta: &[f32]) {
        const BLOCK: usize = 1024;
        let (mut sum, mut num, mut den) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
        for start in (0..out.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(out.len());
            let n = end - start;
            let (sum, num, den) = (&mut sum[..n], &mut num[..n], &mut den[..n]);
            sum.fill(0.0);
            for d in deltas {
                sum.iter_mut().zip(&d[start..end]).for_each(|(s, x)| *s += x);
            }
            num.fill(0.0);
            den.fill(0.0);
            for (d, e) in deltas.iter().zip(eta) {
                for (((u, v), s), x) in num.iter_mut().zip(den.iter_mut()).zip(sum.iter()).zip(&d[start..end]) {
                    // adding 0 leaves the sums as the branch would: they start
                    // at +0 and cannot become −0
                    let agree = agrees(*x, elected_sign(*s));
                    *u += if agree { e * x } else { 0.0 };
                    *v += if agree { *e } else { 0.0 };
                }
            }
            for ((o, u), v) in out[start..end].iter_mut().zip(num.iter()).zip(den.iter()) {
                *o += u / v.max(1e-6);
            }
        }
    }
}

impl Merger for Sce {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "sce".into(),
            description: "FuseChat-2.0's SCE: select high-variance elements, weight by energy, erase sign conflicts".into(),
            params: vec![
                ParamSpec::float("select_topk", Scope::Shared)
                    .default(1.0)
                    .range(0.0, 1.0)
                    .help("fraction of elements (by variance across the deltas) used for the weights"),
                ParamSpec::choice("variant", &["vendored", "upstream"], Scope::Shared)
                    .default("vendored")
                    .help("vendored: mask only for the weights (FuseChat-2.0); upstream: also mask the deltas (mergekit)"),
                ParamSpec::bool("int8_mask", Scope::Shared)
                    .default(false)
                    .help("accepted for mergekit compatibility (masks are exact here)"),
            ],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Required,
            min_models: 1,
            max_models: None,
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let topk = g.params.f64("select_topk")?;
        let upstream = g.params.str("variant")? == "upstream";
        super::deltas_in_place(&mut g)?;
        let deltas: Vec<&[f32]> = g.models.iter().map(|m| &m[..]).collect();
        let selected = selected_variances(&deltas, topk);
        let energies: Vec<f64> = deltas
            .iter()
            .map(|d| energy(d, selected.as_deref()) / d.len().max(1) as f64)
            .collect();
        let total: f64 = energies.iter().sum();
        let eta: Vec<f64> = if total.abs() < 1e-6 {
            vec![1.0 / energies.len() as f64; energies.len()]
        } else {
            energies.iter().map(|e| e / total).collect()
        };
        if let (true, Some(sel)) = (upstream, &selected) {
            for d in g.models.iter_mut() {
                keep_selected(d, sel);
            }
        }
        if let Some(sel) = selected {
            pool::give(sel);
        }
        let eta32: Vec<f32> = eta.iter().map(|e| *e as f32).collect();
        let mut out = g.base.take().expect("deltas_in_place checked the base");
        let deltas: Vec<&[f32]> = g.models.iter().map(|m| &m[..]).collect();
        erase_and_add(&mut out, &deltas, &eta32);
        Ok(Merged {
            data: out,
            weights: Some(eta),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Sce)) }
