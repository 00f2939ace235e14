//! `ram`: Reinforced Agent Merging (arXiv 2601.13572), as mergekit 0.1.5 has it.
//!
//! Per element, with δⱼ = θʲ − θ⁰, a model contributes where |δⱼ| > ε, and c
//! counts the contributors. Where one model contributes (c = 1) its δ is taken
//! whole; where several do (c > 1) their δ are averaged (Σ δⱼ/c over the
//! contributors, in model order); elsewhere the base stays: `θ⁰ + merged`.
//!
//! `ramplus_tl` ([`super::ramplus_tl`]) scales each model's unique
//! contributions by `λⱼ = 1 + r·clamp(ρⱼ, 0, α)`, where ρⱼ is, over this
//! tensor, the count of its shared contributions over the count of its
//! unique ones (the latter at least ε).

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

/// RAM, or RAM+ (tensor-local) when `plus`.
pub struct Ram {
    pub plus: bool,
}

pub const RAM: Ram = Ram { plus: false };

/// Elements per block: each block's contributor counts stay in L1.
const BLOCK: usize = 4096;

fusechat_core::multiversion! {
    /// Per model, over the tensor: how many of its contributions are shared
    /// with another model and how many are its alone.
    pub fn shared_and_unique(deltas: &[&[f32]], eps: f32) -> Vec<(u64, u64)> {
        let n = deltas.first().map_or(0, |d| d.len());
        let mut out = vec![(0u64, 0u64); deltas.len()];
        let mut count = vec![0u32; BLOCK];
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let count = &mut count[..end - start];
            contributors(deltas, start, eps, count);
            for (d, (shared, unique)) in deltas.iter().zip(out.iter_mut()) {
                // per block in u32 lanes (vectorises), then into the totals
                let (mut s, mut u) = (0u32, 0u32);
                for (x, c) in d[start..end].iter().zip(count.iter()) {
                    let on = x.abs() > eps;
                    s += (on & (*c > 1)) as u32;
                    u += (on & (*c == 1)) as u32;
                }
                *shared += s as u64;
                *unique += u as u64;
            }
        }
        out
    }
}

/// The contributor count of each element of a block starting at `start`.
#[inline(always)]
fn contributors(deltas: &[&[f32]], start: usize, eps: f32, count: &mut [u32]) {
    count.fill(0);
    for d in deltas {
        for (c, x) in count.iter_mut().zip(&d[start..]) {
            *c += (x.abs() > eps) as u32;
        }
    }
}

/// RAM+'s scale of each model's unique contributions.
pub fn lambdas(counts: &[(u64, u64)], r: f64, alpha: f64, eps: f64) -> Vec<f64> {
    counts
        .iter()
        .map(|&(shared, unique)| {
            let rho = shared as f64 / (unique as f64).max(eps);
            1.0 + r * rho.clamp(0.0, alpha)
        })
        .collect()
}

fusechat_core::multiversion! {
    /// `base += merged`, where a lone contributor's δ is scaled by its
    /// `lambda` (1 for RAM) and shared ones are averaged.
    fn ram_into(base: &mut [f32], deltas: &[&[f32]], eps: f32, lambda: &[f32]) {
        let mut count = vec![0u32; BLOCK];
        let mut merged = vec![0f32; BLOCK];
        for start in (0..base.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(base.len());
            let (count, merged) = (&mut count[..end - start], &mut merged[..end - start]);
            contributors(deltas, start, eps, count);
            merged.fill(0.0);
            for (d, l) in deltas.iter().zip(lambda) {
                for ((m, x), c) in merged.iter_mut().zip(&d[start..end]).zip(count.iter()) {
                    let on = x.abs() > eps;
                    let term = if *c == 1 { x * l } else { x / *c as f32 };
                    *m += if on { term } else { 0.0 };
                }
            }
            base[start..end].iter_mut().zip(merged.iter()).for_each(|(b, m)| *b += m);
        }
    }
}

impl Merger for Ram {
    fn info(&self) -> PluginInfo {
        let mut params = vec![ParamSpec::float("epsilon", Scope::Shared)
            .default(1e-5)
            .range(0.0, 1e9)
            .help("a model contributes to an element where its |δ| exceeds this")];
        if self.plus {
            params.push(
                ParamSpec::float("r", Scope::Shared)
                    .default(0.1)
                    .range(-1e9, 1e9)
                    .help("how much the overlap ratio scales a model's unique contributions"),
            );
            params.push(
                ParamSpec::float("alpha", Scope::Shared)
                    .default(0.2)
                    .range(0.0, 1e9)
                    .help("the most the overlap ratio counts (it is clamped to [0, alpha])"),
            );
        }
        PluginInfo {
            kind: PluginKind::Merger,
            name: if self.plus { "ramplus_tl" } else { "ram" }.into(),
            description: if self.plus {
                "RAM+ (tensor-local): RAM, with each model's unique contributions scaled up by its overlap ratio"
            } else {
                "Reinforced Agent Merging: keep each delta where it alone contributes, average where several do"
            }
            .into(),
            params,
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
        let eps = g.params.f64("epsilon")?;
        super::deltas_in_place(&mut g)?;
        let mut base = g.base.take().expect("deltas_in_place checked the base");
        let deltas: Vec<&[f32]> = g.models.iter().map(|m| &m[..]).collect();
        let lambda = if self.plus {
            let counts = shared_and_unique(&deltas, eps as f32);
            lambdas(&counts, g.params.f64("r")?, g.params.f64("alpha")?, eps)
        } else {
            vec![1.0; deltas.len()]
        };
        let l: Vec<f32> = lambda.iter().map(|x| *x as f32).collect();
        ram_into(&mut base, &deltas, eps as f32, &l);
        Ok(Merged {
            data: base,
            weights: self.plus.then_some(lambda),
        })
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(RAM)) }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambdas_follow_the_overlap_ratio() {
        // 3 shared, 2 unique: ρ = 1.5, clamped to 0.2 → 1.02; none unique: ρ = 4/1e-5 → 0.2
        let l = lambdas(&[(3, 2), (4, 0), (0, 0)], 0.1, 0.2, 1e-5);
        assert_eq!(l, vec![1.0 + 0.1 * 0.2, 1.0 + 0.1 * 0.2, 1.0]);
        let l = lambdas(&[(1, 10)], 0.5, 0.2, 1e-5);
        assert!((l[0] - 1.05).abs() < 1e-15);
    }
}
