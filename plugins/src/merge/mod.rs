//! Built-in merge methods (SPEC.md section 6). Each file is one method: a
//! declaration (parameters and input contract) and a kernel over one tensor.

pub mod gta;

pub mod arcee_fusion;
pub mod breadcrumbs;
pub mod breadcrumbs_ties;
pub mod dare_linear;
pub mod dare_ties;
pub mod della;
pub mod della_linear;
pub mod karcher;
pub mod linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod ramplus_tl;
pub mod sce;
pub mod slerp;
pub mod task_arithmetic;
pub mod ties;
pub mod varm;

use fusechat_core::merge::{TensorBuf, TensorGroup};
use fusechat_core::plugin::registry::{ParamSpec, Scope};

/// θʲ − θ⁰ for every model, computed in place in the model buffers.
pub(crate) fn deltas_in_place(group: &mut TensorGroup<'_>) -> fusechat_core::Result<()> {
    let base = group
        .base
        .as_deref()
        .ok_or_else(|| fusechat_core::Error::msg("this method needs a base model".to_string()))?;
    for m in group.models.iter_mut() {
        subtract(m, base);
    }
    Ok(())
}

fusechat_core::multiversion! {
    /// `x ← x − b`, elementwise.
    fn subtract(x: &mut [f32], b: &[f32]) {
        for (x, b) in x.iter_mut().zip(b) {
            *x -= b;
        }
    }
}

/// `Σ aᵢbᵢ` in f64 over eight interleaved partial sums, so that the
/// additions pipeline instead of waiting on one another (f32 or f64 inputs;
/// compiled for AVX2 and AVX-512 as well, the same sums on every path).
pub(crate) fn dot_f64<T: Dot>(a: &[T], b: &[T]) -> f64 {
    T::dot(a, b)
}

/// The input types of [`dot_f64`].
pub(crate) trait Dot: Copy + Into<f64> {
    fn dot(a: &[Self], b: &[Self]) -> f64;
}

impl Dot for f32 {
    fn dot(a: &[f32], b: &[f32]) -> f64 {
        dot_f32s(a, b)
    }
}

impl Dot for f64 {
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        dot_f64s(a, b)
    }
}

fusechat_core::multiversion! {
    fn dot_f32s(a: &[f32], b: &[f32]) -> f64 {
        dot_body(a, b)
    }
}

fusechat_core::multiversion! {
    fn dot_f64s(a: &[f64], b: &[f64]) -> f64 {
        dot_body(a, b)
    }
}

#[inline(always)]
pub(crate) fn dot_body<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (*x).into() * (*y).into())
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k].into() * y[k].into();
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// One key picked by [`select_ranks`]: its value, how many keys are below it
/// and how many equal it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ranked {
    pub key: u32,
    pub below: usize,
    pub equal: usize,
}

/// The keys at these 0-based ranks (each < N) of the ascending order of the N
/// keys `keys()` yields, by two passes of 16-bit histograms: the high halves,
/// then the low halves within each rank's bucket. O(N), and the keys are
/// never stored or reordered (`keys` is called once per pass).
pub(crate) fn select_ranks<I: Iterator<Item = u32>, const R: usize>(
    n: usize,
    keys: impl Fn() -> I,
    ranks: [usize; R],
) -> [Ranked; R] {
    // u32 counts keep the histograms in L2 (usize ones cost arcee_fusion 6%);
    // a tensor of more than 2³² elements counts in u64
    if u32::try_from(n).is_ok() {
        select_ranks_counting::<u32, I, R>(keys, ranks)
    } else {
        select_ranks_counting::<u64, I, R>(keys, ranks)
    }
}

fn select_ranks_counting<C, I, const R: usize>(
    keys: impl Fn() -> I,
    ranks: [usize; R],
) -> [Ranked; R]
where
    C: Copy + Default + std::ops::AddAssign + From<u8> + Into<u64>,
    I: Iterator<Item = u32>,
{
    let count = |c: C| -> usize { c.into() as usize };
    let mut hist = vec![C::default(); 1 << 16];
    keys().for_each(|k| hist[(k >> 16) as usize] += C::from(1));
    // the bucket holding rank r, and the count below it
    let bucket_of = |hist: &[C], r: usize| -> (u32, usize) {
        let mut before = 0usize;
        for (b, &c) in hist.iter().enumerate() {
            if before + count(c) > r {
                return (b as u32, before);
            }
            before += count(c);
        }
        unreachable!("rank {r} of {before} keys")
    };
    let found = ranks.map(|r| bucket_of(&hist, r));
    let mut low = vec![C::default(); R << 16];
    for k in keys() {
        for (i, (b, _)) in found.iter().enumerate() {
            if k >> 16 == *b {
                low[(i << 16) | (k & 0xFFFF) as usize] += C::from(1);
            }
        }
    }
    std::array::from_fn(|i| {
        let (b, before) = found[i];
        let low = &low[i << 16..(i + 1) << 16];
        let (lo, within) = bucket_of(low, ranks[i] - before);
        Ranked {
            key: (b << 16) | lo,
            below: before + within,
            equal: count(low[lo as usize]),
        }
    })
}

/// `Σ wⱼ·θʲ` accumulated in f32 in model order, into the first model's
/// buffer, then divided by `divisor` when there is one.
pub(crate) fn weighted_sum<'a>(
    models: &mut [TensorBuf<'a>],
    weights: &[f64],
    divisor: Option<f32>,
) -> TensorBuf<'a> {
    let mut out = std::mem::take(&mut models[0]);
    let w: Vec<f32> = weights.iter().map(|w| *w as f32).collect();
    let rest: Vec<&[f32]> = models[1..].iter().map(|m| &m[..]).collect();
    weighted_sum_into(&mut out, &rest, &w, divisor);
    out
}

fusechat_core::multiversion! {
    /// `out = (w₀·out + w₁·rest₀ + …) / divisor`, in blocks that stay in L1
    /// (one pass over memory instead of one per model), with the operations
    /// in the same order as one model at a time.
    fn weighted_sum_into(out: &mut [f32], rest: &[&[f32]], w: &[f32], divisor: Option<f32>) {
        const BLOCK: usize = 2048;
        for start in (0..out.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(out.len());
            let o = &mut out[start..end];
            o.iter_mut().for_each(|x| *x *= w[0]);
            for (m, wj) in rest.iter().zip(&w[1..]) {
                o.iter_mut().zip(&m[start..end]).for_each(|(o, x)| *o += wj * x);
            }
            if let Some(d) = divisor {
                o.iter_mut().for_each(|x| *x /= d);
            }
        }
    }
}

/// The per-model `weight` parameter most methods share.
pub(crate) fn weight_param() -> ParamSpec {
    ParamSpec::float("weight", Scope::PerModel)
        .default(1.0)
        .help("relative weight of the model (mergekit requires it; fusechat defaults to 1)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_ranks_match_a_sort_with_either_counter() {
        let mut rng = fusechat_core::rng::SplitMix64(21);
        // clustered keys with many ties, spanning several high halves
        let keys: Vec<u32> = (0..20_000)
            .map(|_| ((rng.next_u64() % 300) as u32) << (rng.next_u64() % 20))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        let ranks = [0, 1, 9_999, 15_000, 19_999];
        let want = ranks.map(|r| {
            let key = sorted[r];
            Ranked {
                key,
                below: sorted.iter().filter(|k| **k < key).count(),
                equal: sorted.iter().filter(|k| **k == key).count(),
            }
        });
        let it = || keys.iter().copied();
        assert_eq!(select_ranks(keys.len(), it, ranks), want);
        assert_eq!(select_ranks_counting::<u64, _, 5>(it, ranks), want);
    }
}
