//! `arcee_fusion`: take the other model's value only where it matters most
//! (mergekit's Arcee Fusion).
//!
//! Per row (last dimension; a vector is one row), with p = softmax(θ¹) + 1e-8
//! and q = softmax(θ⁰) + 1e-8, the row's divergence is KL = Σ p·ln(p/q); an
//! element's importance is |θ¹ − θ⁰|·KL of its row. With Q₁, Q₂, Q₃ the
//! quartiles of the importances (the sorted value at index ⌊q·(N − 1)⌋), the
//! elements with importance ≥ Q₂ + 1.5·(Q₃ − Q₁) take θ¹'s value, the others
//! keep θ⁰'s: `θ⁰ + (θ¹ − θ⁰)·mask`.
//!
//! mergekit estimates the quartiles from a random sample of 10⁶ elements when
//! a tensor is larger; fusechat computes them exactly (by selection), which is
//! what the sample estimates, and is reproducible.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, PluginInfo, PluginKind};
use fusechat_core::simd;
use std::sync::Arc;

pub struct ArceeFusion;

/// Each row's divergence KL = Σ p·ln(p/q) (rows of `cols`), so that an
/// element's importance is `|θ¹ − θ⁰|·KL` of its row ([`importance`]).
///
/// The exponentials and logarithms run in f64 over whole rows
/// ([`fusechat_core::simd`], vectorised): p = e^(θ¹ − max θ¹)/Σ + 1e-8, the
/// same for q. Inlined into [`fuse_rows`], so compiled for its instruction sets.
#[inline(always)]
fn row_divergence(base: &[f32], model: &[f32], cols: usize) -> Vec<f64> {
    // plain loops: an iterator's `fold` would be compiled apart, for the
    // baseline instruction set
    let (mut p, mut q) = (vec![0f64; cols], vec![0f64; cols]);
    let mut kl = Vec::with_capacity(base.len().div_ceil(cols));
    for (b, m) in base.chunks(cols).zip(model.chunks(cols)) {
        let (p, q) = (&mut p[..b.len()], &mut q[..b.len()]);
        shifted_exp(m, p);
        shifted_exp(b, q);
        let (sp, sq) = (1.0 / simd::sum(p), 1.0 / simd::sum(q));
        for (pi, qi) in p.iter_mut().zip(q.iter_mut()) {
            *pi = *pi * sp + 1e-8;
            *qi = *pi / (*qi * sq + 1e-8);
        }
        simd::ln_in_place(q);
        kl.push(super::dot_f64(p, q));
    }
    kl
}

/// One element's importance.
#[inline(always)]
pub fn importance(base: f32, model: f32, kl: f64) -> f32 {
    ((model - base).abs() as f64 * kl) as f32
}

/// A key whose unsigned order is `f32::total_cmp`'s order.
#[inline]
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    b ^ (((b as i32 >> 31) as u32) | 0x8000_0000)
}

fn from_order_key(k: u32) -> f32 {
    let b = if k & 0x8000_0000 != 0 {
        k ^ 0x8000_0000
    } else {
        !k
    };
    f32::from_bits(b)
}

/// `out ← e^(x − max x)`, the subtraction in f64 (exact).
#[inline(always)]
fn shifted_exp(x: &[f32], out: &mut [f64]) {
    let mx = max_finite(x) as f64;
    for (o, x) in out.iter_mut().zip(x) {
        *o = *x as f64 - mx;
    }
    simd::exp_in_place(out);
}

/// The largest of finite values (the merge engine has checked them), in
/// sixteen lanes: `f32::max`'s NaN handling keeps a fold from vectorising.
#[inline(always)]
fn max_finite(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = if *v > *l { *v } else { *l };
        }
    }
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, v| if *v > a { *v } else { a })
}

/// The sorted values at indices ⌊q·(n − 1)⌋ for q = ¼, ½, ¾ of order keys.
fn quartiles(v: &[u32]) -> [f32; 3] {
    let at = |q: f64| (q * (v.len() - 1) as f64) as usize;
    super::select_ranks(v.len(), || v.iter().copied(), [at(0.25), at(0.5), at(0.75)])
        .map(|r| from_order_key(r.key))
}

impl Merger for ArceeFusion {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "arcee_fusion".into(),
            description:
                "Arcee Fusion: take the other model's values where their importance is an outlier"
                    .into(),
            params: vec![],
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
        let cols = match g.shape.last() {
            Some(&c) if c > 0 => c,
            _ => g.numel().max(1),
        };
        let mut base = g
            .base
            .take()
            .ok_or_else(|| fusechat_core::Error::msg("arcee_fusion needs a base model"))?;
        let model = &g.models[0];
        if base.is_empty() {
            return Ok(Merged::new(base));
        }
        fuse_rows(&mut base, model, cols);
        Ok(Merged::new(base))
    }
}

fusechat_core::multiversion! {
    /// The merge of one tensor, in place in `base` (compiled for AVX2 and
    /// AVX-512 as well: the same operations on every path).
    fn fuse_rows(base: &mut [f32], model: &[f32], cols: usize) {
        let kl = row_divergence(base, model, cols);
        let mut keys: Vec<u32> = Vec::with_capacity(base.len());
        for ((b, m), kl) in base.chunks(cols).zip(model.chunks(cols)).zip(&kl) {
            keys.extend(
                b.iter()
                    .zip(m)
                    .map(|(b, m)| order_key(importance(*b, *m, *kl))),
            );
        }
        let [q1, q2, q3] = quartiles(&keys);
        drop(keys);
        let threshold = q2 + 1.5 * (q3 - q1);
        for ((b, m), kl) in base.chunks_mut(cols).zip(model.chunks(cols)).zip(&kl) {
            for (b, m) in b.iter_mut().zip(m) {
                if importance(*b, *m, *kl) >= threshold {
                    *b += *m - *b;
                }
            }
        }
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(ArceeFusion)) }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_are_the_sorted_values_at_their_indices() {
        let mut rng = fusechat_core::rng::SplitMix64(9);
        for n in [1usize, 2, 3, 4, 5, 1000, 100_001] {
            // importances: non-negative, with ties, a few negative zeros and one negative
            let v: Vec<f32> = (0..n - 1)
                .map(|i| match i % 9 {
                    0 => 0.0,
                    1 => -0.0,
                    2 => 0.25,
                    _ => (rng.normal().abs() * 1e-3) as f32,
                })
                .chain(std::iter::once(-1.0))
                .collect();
            let mut sorted = v.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let at = |q: f64| sorted[(q * (n - 1) as f64) as usize];
            let keys: Vec<u32> = v.iter().map(|x| order_key(*x)).collect();
            let got = quartiles(&keys);
            let want = [at(0.25), at(0.5), at(0.75)];
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "n = {n}");
        }
    }
}
