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
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorBuf, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct Sce;

/// The top-`int(nonzero(var)·topk)` mask over the elementwise variance of the deltas.
fn variance_mask(deltas: &[TensorBuf], topk: f64) -> Vec<bool> {
    let n = deltas[0].len();
    if topk >= 1.0 {
        return vec![true; n];
    }
    if topk <= 0.0 {
        return vec![false; n];
    }
    let k = deltas.len() as f64;
    let var: Vec<f32> = (0..n)
        .map(|i| {
            let mean = deltas.iter().map(|d| d[i] as f64).sum::<f64>() / k;
            (deltas
                .iter()
                .map(|d| (d[i] as f64 - mean).powi(2))
                .sum::<f64>()
                / k) as f32
        })
        .collect();
    let nonzero = var.iter().filter(|v| **v != 0.0).count();
    let keep = (nonzero as f64 * topk) as usize;
    let mut kept = var;
    super::gta::keep_top_k(&mut kept, keep);
    // Ties at the threshold are resolved in index order; a kept zero-variance
    // element (only possible when keep > nonzero, which cannot happen) stays out.
    kept.iter().map(|v| *v != 0.0).collect()
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
        let mask = variance_mask(&g.models, topk);
        let energies: Vec<f64> = g
            .models
            .iter()
            .map(|d| {
                d.iter()
                    .zip(&mask)
                    .map(|(x, m)| if *m { (*x as f64).powi(2) } else { 0.0 })
                    .sum::<f64>()
                    / d.len().max(1) as f64
            })
            .collect();
        let total: f64 = energies.iter().sum();
        let eta: Vec<f64> = if total.abs() < 1e-6 {
            vec![1.0 / energies.len() as f64; energies.len()]
        } else {
            energies.iter().map(|e| e / total).collect()
        };
        if upstream {
            for d in g.models.iter_mut() {
                d.iter_mut().zip(&mask).for_each(|(x, m)| {
                    if !*m {
                        *x = 0.0
                    }
                });
            }
        }
        let eta32: Vec<f32> = eta.iter().map(|e| *e as f32).collect();
        let mut out = g.base.take().expect("deltas_in_place checked the base");
        for (i, o) in out.iter_mut().enumerate() {
            let s = elected_sign(g.models.iter().map(|d| d[i]).sum());
            let (mut num, mut den) = (0f32, 0f32);
            for (d, e) in g.models.iter().zip(&eta32) {
                if agrees(d[i], s) {
                    num += e * d[i];
                    den += e;
                }
            }
            *o += num / den.max(1e-6);
        }
        Ok(Merged {
            data: out,
            weights: Some(eta),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Sce)) }
