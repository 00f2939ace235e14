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

use super::dot_body;
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct Karcher;

/// The Karcher mean of `xs`, in place in `out` (which holds x₀ on entry and
/// is not in `rest`, which holds x₁…).
///
/// Every iterate m is a combination Σ wᵢxᵢ of the inputs (the start is one,
/// and each step adds one), so the iteration runs on the n coefficients with
/// the Gram matrix Gᵢⱼ = xᵢ·xⱼ: m·xᵢ = (Gw)ᵢ and ‖m‖² = wᵀGw. The tensors
/// are read twice (once for G, once for the output), however many steps it
/// takes, and no buffer beyond the inputs is needed.
pub fn karcher_into(out: &mut [f32], rest: &[&[f32]], max_iter: usize, tol: f64) {
    let gram = gram(out, rest);
    let w = karcher_weights(&gram, rest.len() + 1, max_iter, tol);
    combine_f64(out, rest, &w);
}

/// The Karcher mean as the coefficients of the inputs, from their n×n Gram
/// matrix (row-major). All the arithmetic is in f64.
pub fn karcher_weights(gram: &[f64], n: usize, max_iter: usize, tol: f64) -> Vec<f64> {
    let g = |i: usize, j: usize| gram[i * n + j];
    // (Gw)ᵢ, and wᵀGw (clamped at 0 against rounding)
    let gw = |w: &[f64]| -> Vec<f64> {
        (0..n)
            .map(|i| (0..n).map(|j| g(i, j) * w[j]).sum())
            .collect()
    };
    let norm = |w: &[f64]| -> f64 {
        gw(w)
            .iter()
            .zip(w)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            .max(0.0)
            .sqrt()
    };
    let norms: Vec<f64> = (0..n).map(|i| g(i, i).max(0.0).sqrt()).collect();
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let a = 1.0 / valid.len() as f64; // αᵢ renormalised over the valid inputs

    let mut m = vec![0.0; n];
    for &i in &valid {
        m[i] = a / norms[i];
    }
    let mn = norm(&m);
    if mn < tol {
        m.iter_mut().for_each(|x| *x = 0.0);
        m[valid[0]] = 1.0 / norms[valid[0]];
    } else {
        m.iter_mut().for_each(|x| *x /= mn);
    }
    for _ in 0..max_iter {
        // v = Σ βᵢ·xᵢ/nᵢ − (Σ βᵢ cos θᵢ)·m, βᵢ = a·θᵢ/sin θᵢ
        let dots = gw(&m);
        let mut v = vec![0.0; n];
        let mut shift = 0.0;
        for &i in &valid {
            let cos = (dots[i] / norms[i]).clamp(-1.0, 1.0);
            let theta = cos.acos();
            // θ = 0 (possible at tol = 0) adds nothing: θ/sin θ → 1 and uᵢ = m
            if theta < tol || theta == 0.0 {
                continue;
            }
            let beta = a * theta / theta.sin();
            v[i] += beta / norms[i];
            shift += beta * cos;
        }
        v.iter_mut().zip(&m).for_each(|(vk, mk)| *vk -= shift * mk);
        let vn = norm(&v);
        if vn < tol || vn == 0.0 {
            break;
        }
        let (c, s) = (vn.cos(), vn.sin() / vn);
        m.iter_mut()
            .zip(&v)
            .for_each(|(mk, vk)| *mk = c * *mk + s * vk);
        let un = norm(&m);
        if un > tol {
            m.iter_mut().for_each(|x| *x /= un);
        }
    }
    let scale: f64 = norms.iter().sum::<f64>() / n as f64;
    m.iter_mut().for_each(|x| *x *= scale);
    m
}

fusechat_core::multiversion! {
    /// The Gram matrix of `first` and `rest` (row-major, n×n), in one pass
    /// over memory: block by block, every pair's dot product in f64.
    fn gram(first: &[f32], rest: &[&[f32]]) -> Vec<f64> {
        const BLOCK: usize = 2048;
        let n = rest.len() + 1;
        let x = |i: usize| if i == 0 { first } else { rest[i - 1] };
        let mut g = vec![0f64; n * n];
        for start in (0..first.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(first.len());
            for i in 0..n {
                for j in 0..=i {
                    g[i * n + j] += dot_body(&x(i)[start..end], &x(j)[start..end]);
                }
            }
        }
        for i in 0..n {
            for j in 0..i {
                g[j * n + i] = g[i * n + j];
            }
        }
        g
    }
}

fusechat_core::multiversion! {
    /// `out = w₀·out + w₁·rest₀ + …`, summed in f64 and rounded once, in
    /// blocks that stay in L1.
    fn combine_f64(out: &mut [f32], rest: &[&[f32]], w: &[f64]) {
        const BLOCK: usize = 1024;
        let mut acc = [0f64; BLOCK];
        for start in (0..out.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(out.len());
            let (o, acc) = (&mut out[start..end], &mut acc[..end - start]);
            acc.iter_mut().zip(o.iter()).for_each(|(a, x)| *a = w[0] * *x as f64);
            for (m, wj) in rest.iter().zip(&w[1..]) {
                acc.iter_mut().zip(&m[start..end]).for_each(|(a, x)| *a += wj * *x as f64);
            }
            o.iter_mut().zip(acc.iter()).for_each(|(o, a)| *o = *a as f32);
        }
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
        let (first, rest) = g.models.split_at_mut(1);
        let rest: Vec<&[f32]> = rest.iter().map(|m| &m[..]).collect();
        karcher_into(&mut first[0], &rest, max_iter, tol);
        Ok(Merged::new(std::mem::take(&mut g.models[0])))
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Karcher)) }

#[cfg(test)]
mod tests {
    use super::*;

    /// The iteration written out on the vectors themselves, in f64.
    fn direct(xs: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let norms: Vec<f64> = xs.iter().map(|x| dot(x, x).sqrt()).collect();
        let us: Vec<Vec<f64>> = xs
            .iter()
            .zip(&norms)
            .filter(|(_, n)| **n > tol)
            .map(|(x, n)| x.iter().map(|v| v / n).collect())
            .collect();
        let a = 1.0 / us.len() as f64;
        let mut m: Vec<f64> = (0..xs[0].len())
            .map(|k| us.iter().map(|u| a * u[k]).sum())
            .collect();
        let mn = dot(&m, &m).sqrt();
        m.iter_mut().for_each(|x| *x /= mn);
        for _ in 0..max_iter {
            let mut v = vec![0.0; m.len()];
            for u in &us {
                let c = dot(&m, u).clamp(-1.0, 1.0);
                let th = c.acos();
                if th < tol {
                    continue;
                }
                for k in 0..v.len() {
                    v[k] += a * th / th.sin() * (u[k] - c * m[k]);
                }
            }
            let vn = dot(&v, &v).sqrt();
            if vn < tol {
                break;
            }
            for k in 0..m.len() {
                m[k] = vn.cos() * m[k] + vn.sin() * v[k] / vn;
            }
            let un = dot(&m, &m).sqrt();
            m.iter_mut().for_each(|x| *x /= un);
        }
        let scale = norms.iter().sum::<f64>() / xs.len() as f64;
        m.iter().map(|x| x * scale).collect()
    }

    #[test]
    fn the_gram_iteration_follows_the_vectors() {
        // four inputs of 3000 (more than one block), one of them zero
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                (0..3000)
                    .map(|_| if i == 2 { 0.0 } else { rnd() })
                    .collect()
            })
            .collect();
        for (max_iter, tol) in [(1, 1e-5), (10, 1e-5), (100, 1e-12)] {
            let wide: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| x.iter().map(|v| *v as f64).collect())
                .collect();
            let want = direct(&wide, max_iter, tol);
            let mut out = xs[0].clone();
            let rest: Vec<&[f32]> = xs[1..].iter().map(|x| &x[..]).collect();
            karcher_into(&mut out, &rest, max_iter, tol);
            for (k, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3),
                    "max_iter {max_iter}, element {k}: {g} against {w}"
                );
            }
        }
    }

    #[test]
    fn tol_zero_on_identical_inputs_gives_the_input() {
        let x: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 7.0).collect();
        let mut out = x.clone();
        karcher_into(&mut out, &[&x, &x], 10, 0.0);
        for (o, x) in out.iter().zip(&x) {
            assert!((o - x).abs() <= 1e-6 * x.abs().max(1.0), "{o} against {x}");
        }
    }

    #[test]
    fn all_zero_inputs_give_zero() {
        let mut out = vec![0f32; 10];
        let zero = vec![0f32; 10];
        karcher_into(&mut out, &[&zero], 10, 1e-5);
        assert!(out.iter().all(|x| *x == 0.0));
    }
}
