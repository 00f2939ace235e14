//! Generalized task arithmetic: the one kernel behind task_arithmetic, TIES,
//! DARE, Model Breadcrumbs and DELLA, linear and with sign consensus (as in
//! mergekit, a family of methods is data).
//!
//! With δⱼ = θʲ − θ⁰ sparsified to δ̂ⱼ and uⱼ = wⱼ·δ̂ⱼ:
//! - without sign consensus, `mixed = Σ uⱼ`, `divisor = Σ wⱼ` (|Σ wⱼ| < 1e-8 → 1);
//! - with sign consensus, `s = sign(Σ uⱼ)` (≥ 0 → +), `mⱼ = [sign(uⱼ) = s]` (zeros
//!   never match), `mixed = Σ mⱼuⱼ`, `divisor = Σ mⱼwⱼ` (0 → 1);
//!
//! then `θ = θ⁰ + λ·mixed / divisor` when normalising, else `θ⁰ + λ·mixed`.

use fusechat_core::io::dtype::DType;
use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorBuf, TensorGroup};
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::rng::{fnv1a, mix64};
use fusechat_core::Result;

/// How task vectors are thinned before they are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    None,
    /// TIES: keep the `max(1, int(density·N))` largest |δ|.
    Magnitude,
    /// DARE: keep each element with probability `density`, then rescale.
    Bernoulli,
    /// Model Breadcrumbs: drop the `int(gamma·N)` largest |δ| (outliers) and
    /// the smallest, so that `int(density·N)` remain.
    Outliers,
    /// DELLA's MAGPRUNE: keep each element with a probability that rises
    /// linearly with its magnitude rank in its row, from `density − epsilon`
    /// to `density + epsilon`.
    MagPrune,
}

/// How DARE restores the scale of a thinned task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    /// Match the L1 norm of δ (current mergekit).
    L1,
    /// Divide by the density (the DARE paper).
    InverseP,
    None,
}

impl Rescale {
    pub fn parse(s: &str) -> Rescale {
        match s {
            "inverse_p" => Rescale::InverseP,
            "none" | "false" => Rescale::None,
            _ => Rescale::L1,
        }
    }
}

/// The shared parameters of the family. `rescale` defaults to `l1` for DARE
/// and to `none` (mergekit's `false`) for the others, as in mergekit.
pub fn params(default_normalize: bool, sparsify: Sparsify) -> Vec<ParamSpec> {
    let mut specs = vec![
        super::weight_param(),
        ParamSpec::float("density", Scope::PerModel).default(1.0).range(0.0, 1.0).help(match sparsify {
            Sparsify::None => "accepted for mergekit compatibility; task arithmetic keeps every element",
            Sparsify::Magnitude => "fraction of δ kept, by magnitude (top int(density·N))",
            Sparsify::Bernoulli => "probability of keeping each element of δ",
            Sparsify::Outliers => "fraction of δ kept after the outliers and the smallest are dropped",
            Sparsify::MagPrune => "mean probability of keeping an element of δ",
        }),
        ParamSpec::bool("normalize", Scope::Shared)
            .default(default_normalize)
            .help("divide the combined delta by the sum of the (kept) weights"),
        ParamSpec::float("lambda", Scope::Shared)
            .default(1.0)
            .help("scale of the combined delta"),
        ParamSpec::choice("rescale", &["l1", "inverse_p", "none", "true", "false"], Scope::Shared)
            .default(if matches!(sparsify, Sparsify::Bernoulli | Sparsify::MagPrune) { "l1" } else { "none" })
            .help("after sparsifying: l1 = match ‖δ‖₁ (mergekit's true); inverse_p = divide each kept element by its keep probability (DARE and DELLA papers); none (false)"),
        ParamSpec::bool("int8_mask", Scope::Shared)
            .default(false)
            .help("accepted for mergekit compatibility (masks are exact here)"),
    ];
    match sparsify {
        Sparsify::Outliers => specs.push(
            ParamSpec::float("gamma", Scope::PerModel)
                .default(0.01)
                .range(0.0, 1.0)
                .help("fraction of the largest |δ| dropped as outliers (int(gamma·N) elements)"),
        ),
        Sparsify::MagPrune => specs.push(
            ParamSpec::float("epsilon", Scope::PerModel)
                .default(0.15)
                .range(0.0, 1.0)
                .help("half-width of the keep probabilities: density ± epsilon must lie in (0, 1)"),
        ),
        _ => {}
    }
    specs
}

/// Restore the scale of a sparsified delta whose L1 norm was `before`.
fn rescale_delta(delta: &mut [f32], before: f64, density: f64, rescale: Rescale) {
    rescale_delta_after(delta, before, None, density, rescale)
}

/// [`rescale_delta`], given ‖δ̂‖₁ when it is already known.
fn rescale_delta_after(
    delta: &mut [f32],
    before: f64,
    after: Option<f64>,
    density: f64,
    rescale: Rescale,
) {
    let factor = match rescale {
        Rescale::None => return,
        Rescale::InverseP if density > 0.0 => 1.0 / density,
        Rescale::InverseP => return,
        Rescale::L1 => {
            let after = after.unwrap_or_else(|| l1(delta));
            // mergekit leaves the tensor as is when either norm is below 1e-7
            if before < 1e-7 || after < 1e-7 {
                return;
            }
            before / after
        }
    };
    let f = factor as f32;
    delta.iter_mut().for_each(|x| *x *= f);
}

/// ‖δ‖₁ before sparsifying, for [`rescale_delta`]: only `l1` reads it.
fn l1_before(delta: &[f32], rescale: Rescale) -> f64 {
    if rescale == Rescale::L1 {
        l1(delta)
    } else {
        0.0
    }
}

fusechat_core::multiversion! {
    /// Σ|x| in f64, over eight interleaved partial sums (so that the additions
    /// pipeline and vectorise instead of waiting on one another; the same
    /// sums on every instruction set).
    fn l1(delta: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = delta.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|x| x.abs() as f64).sum();
        for c in chunks {
            for (a, x) in acc.iter_mut().zip(c) {
                *a += x.abs() as f64;
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

/// Where the `k` largest |x| of a slice end: every |x| above `thr` is among
/// them, and of the `equal` values whose |x| is `thr`, the first `k − above`
/// in index order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// The k-th largest |x|.
    pub thr: f32,
    /// How many |x| are above it.
    pub above: usize,
    /// How many |x| equal it.
    pub equal: usize,
}

/// |x|'s bits: for finite values they order as unsigned integers.
#[inline(always)]
fn abs_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// The k-th largest |x| (1-based).
pub fn kth_largest_abs(data: &[f32], k: usize) -> f32 {
    top_k_cut(data, k).thr
}

/// Find the [`Cut`] of the `k` largest |x| (1 ≤ k ≤ N) without copying or
/// sorting the data.
///
/// A strided sample brackets the k-th largest |x| between two keys, then one
/// pass counts the values above the bracket and collects the few inside it,
/// where a selection finishes the job. If the sample misled (the rank falls
/// outside the bracket: rare, and only slower), two passes of radix
/// histograms do it. Both are exact.
pub fn top_k_cut(data: &[f32], k: usize) -> Cut {
    let n = data.len();
    assert!(k >= 1 && k <= n, "k = {k} out of 1..={n}");
    if n >= 1 << 15 {
        if let Some(cut) = cut_by_sample(data, k) {
            return cut;
        }
    }
    cut_by_radix(data, k)
}

fn cut_by_sample(data: &[f32], k: usize) -> Option<Cut> {
    let n = data.len();
    let s = (n / 128).clamp(4096, 1 << 15);
    let stride = n / s;
    let mut sample: Vec<u32> = (0..s)
        .map(|i| abs_key(data[i * stride + stride / 2]))
        .collect();
    // The k-th largest sits near rank q·s of the descending sample, give or
    // take a binomial standard deviation: bracket it by six of them each way.
    let q = k as f64 / n as f64;
    let margin = 6.0 * (s as f64 * q * (1.0 - q)).sqrt() + 8.0;
    let top = q * s as f64 - margin;
    let bottom = q * s as f64 + margin;
    let mut at_rank = |r: usize| *sample.select_nth_unstable_by(r, |a, b| b.cmp(a)).1;
    let hi = if top < 0.0 {
        u32::MAX
    } else {
        at_rank(top as usize)
    };
    let lo = if bottom >= (s - 1) as f64 {
        0
    } else {
        at_rank(bottom.ceil() as usize)
    };
    let mut inside = Vec::with_capacity(((bottom - top).max(1.0) as usize + 1) * stride * 2);
    let above = count_and_collect(data, lo, hi, &mut inside);
    // rank of the k-th largest among the bracket's values (1-based)
    let r = k
        .checked_sub(above)
        .filter(|r| *r >= 1 && *r <= inside.len())?;
    let (_, thr, _) = inside.select_nth_unstable_by(r - 1, |a, b| b.cmp(a));
    let thr = *thr;
    let (mut more, mut equal) = (0usize, 0usize);
    for &v in &inside {
        more += (v > thr) as usize;
        equal += (v == thr) as usize;
    }
    Some(Cut {
        thr: f32::from_bits(thr),
        above: above + more,
        equal,
    })
}

/// Count the keys above `hi` and collect those in `[lo, hi]` (in index order).
fn count_and_collect(data: &[f32], lo: u32, hi: u32, inside: &mut Vec<u32>) -> usize {
    #[cfg(target_arch = "x86_64")]
    if fusechat_core::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { count_and_collect_avx512(data, lo, hi, inside) };
    }
    count_and_collect_blocks(data, lo, hi, inside)
}

/// [`count_and_collect`] with AVX-512: the keys in the bracket are packed to
/// the front of a register (a compress) and the whole register is stored at
/// the end of `inside`, which then grows by their count. No branch depends on
/// the data (a quarter of the blocks hold a candidate: a branch on it would
/// be mispredicted often), and no compress goes to memory (slow on AMD).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn count_and_collect_avx512(data: &[f32], lo: u32, hi: u32, inside: &mut Vec<u32>) -> usize {
    use std::arch::x86_64::*;
    let (keys, vlo, vhi) = (
        _mm512_set1_epi32(0x7FFF_FFFF),
        _mm512_set1_epi32(lo as i32),
        _mm512_set1_epi32(hi as i32),
    );
    let blocks = data.chunks_exact(16);
    let tail = blocks.remainder();
    let mut above = 0usize;
    for b in blocks {
        // SAFETY: `b` holds 16 f32 (64 bytes); unaligned loads are allowed.
        let key = _mm512_and_si512(unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }, keys);
        above += _mm512_cmpgt_epu32_mask(key, vhi).count_ones() as usize;
        let m = _mm512_cmpge_epu32_mask(key, vlo) & _mm512_cmple_epu32_mask(key, vhi);
        if inside.capacity() - inside.len() < 16 {
            inside.reserve(inside.len().max(1024));
        }
        let len = inside.len();
        // SAFETY: 16 spare values of capacity were ensured above; the first
        // popcount(m) of them are initialised by the store.
        unsafe {
            _mm512_storeu_si512(
                inside.as_mut_ptr().add(len).cast(),
                _mm512_maskz_compress_epi32(m, key),
            );
            inside.set_len(len + m.count_ones() as usize);
        }
    }
    above + count_and_collect_blocks(tail, lo, hi, inside)
}

fusechat_core::multiversion! {
    /// [`count_and_collect`] in blocks of 16, so that the counting vectorises
    /// and only blocks holding a candidate take the scalar path.
    fn count_and_collect_blocks(data: &[f32], lo: u32, hi: u32, inside: &mut Vec<u32>) -> usize {
        let mut above = 0usize;
        let blocks = data.chunks_exact(16);
        let tail = blocks.remainder();
        for b in blocks {
            let (mut a, mut any) = (0u32, false);
            for &x in b {
                let key = abs_key(x);
                a += (key > hi) as u32;
                any |= key >= lo && key <= hi;
            }
            above += a as usize;
            if any {
                inside.extend(b.iter().map(|&x| abs_key(x)).filter(|&key| key >= lo && key <= hi));
            }
        }
        for &x in tail {
            let key = abs_key(x);
            above += (key > hi) as usize;
            if key >= lo && key <= hi {
                inside.push(key);
            }
        }
        above
    }
}

/// The exact [`Cut`] by radix selection over |x|'s bits ([`super::select_ranks`]):
/// the k-th largest is the (N − k)-th smallest.
fn cut_by_radix(data: &[f32], k: usize) -> Cut {
    let n = data.len();
    let [r] = super::select_ranks(n, || data.iter().map(|&x| abs_key(x)), [n - k]);
    Cut {
        thr: f32::from_bits(r.key),
        above: n - r.below - r.equal,
        equal: r.equal,
    }
}

/// The `k` largest |x| of a slice as a test on each element: |x| above
/// `thr`, or equal to it before index `split` (ties in index order, so the
/// sets for growing `k` are nested).
#[derive(Debug, Clone, Copy)]
struct TopSet {
    thr: f32,
    split: usize,
}

impl TopSet {
    fn of(data: &[f32], k: usize) -> TopSet {
        if k == 0 {
            return TopSet {
                thr: f32::INFINITY,
                split: 0,
            };
        }
        let Cut { thr, above, equal } = top_k_cut(data, k);
        TopSet {
            thr,
            split: nth_equal(data, thr, k - above, equal),
        }
    }

    #[inline(always)]
    fn holds(&self, i: usize, a: f32) -> bool {
        a > self.thr || (a == self.thr && i < self.split)
    }
}

/// Keep exactly the `k` largest |x|: zero the rest. Values equal to the
/// threshold are kept in index order until the count is reached.
pub fn keep_top_k(data: &mut [f32], k: usize) {
    if k >= data.len() {
        return;
    }
    let TopSet { thr, split } = TopSet::of(data, k);
    let (first, rest) = data.split_at_mut(split);
    keep_where(first, thr, false);
    keep_where(rest, thr, true);
}

/// The index of the `(kept + 1)`-th value whose |x| is `thr` (N when there
/// are only `kept`), counting in blocks of 16 so that the scan vectorises.
fn nth_equal(data: &[f32], thr: f32, kept: usize, equal: usize) -> usize {
    if kept >= equal {
        return data.len();
    }
    let mut seen = 0usize;
    let mut at = 0usize;
    for b in data.chunks(16) {
        let c = count_equal(b, thr);
        if seen + c > kept {
            let i = b
                .iter()
                .enumerate()
                .filter(|(_, x)| x.abs() == thr)
                .nth(kept - seen);
            return at + i.expect("counted").0;
        }
        seen += c;
        at += b.len();
    }
    data.len()
}

#[inline(always)]
fn count_equal(b: &[f32], thr: f32) -> usize {
    b.iter().map(|x| (x.abs() == thr) as u32).sum::<u32>() as usize
}

fusechat_core::multiversion! {
    /// Zero every |x| below `thr` (and equal to it when `strict`), branch-free.
    fn keep_where(data: &mut [f32], thr: f32, strict: bool) {
        if strict {
            data.iter_mut().for_each(|x| *x = if x.abs() > thr { *x } else { 0.0 });
        } else {
            data.iter_mut().for_each(|x| *x = if x.abs() >= thr { *x } else { 0.0 });
        }
    }
}

/// TIES trimming: keep the `max(1, int(density·N))` largest |δ| (by
/// selection, not a sort); nothing when `density` ≤ 0 (mergekit 0.1.5).
pub fn magnitude(delta: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    keep_top_k(delta, magnitude_k(density, delta.len()));
}

/// How many of `n` elements TIES keeps at `density` < 1: `max(1, int(density·n))`,
/// or 0 when `density` ≤ 0.
fn magnitude_k(density: f64, n: usize) -> usize {
    if density <= 0.0 {
        0
    } else {
        ((density * n as f64) as usize).max(1)
    }
}

/// Model Breadcrumbs: with `target = int(density·N)` and `top = int(gamma·N)`,
/// drop the `top` largest |δ| and the `N − target − top` smallest (when that is
/// negative, fewer outliers are dropped so that `target` remain), as mergekit
/// 0.1.5 keeps the ascending ranks `[N − target − top, N − top)`.
pub fn breadcrumbs(delta: &mut [f32], density: f64, gamma: f64) {
    if density >= 1.0 {
        return;
    }
    let n = delta.len();
    let target = (density.max(0.0) * n as f64) as usize;
    let top = ((gamma.max(0.0) * n as f64) as usize).min(n - target);
    let bottom = n - target - top;
    let keep = TopSet::of(delta, n - bottom);
    let outliers = TopSet::of(delta, top);
    keep_band(delta, keep, outliers);
}

fusechat_core::multiversion! {
    /// Zero what is outside `keep` or inside `drop` (branch-free).
    fn keep_band(data: &mut [f32], keep: TopSet, drop: TopSet) {
        for (i, x) in data.iter_mut().enumerate() {
            let a = x.abs();
            *x = if keep.holds(i, a) && !drop.holds(i, a) { *x } else { 0.0 };
        }
    }
}

/// DELLA's MAGPRUNE over a tensor of `shape`, ranking along dimension 1 as
/// mergekit does (the row of a matrix; a vector is one row). In a row of
/// length n, the element of ascending magnitude rank r (1-based, ties in index
/// order) is kept with probability `p = density − ε + 2ε·(r − 1)/(n − 1)`
/// (`density` when n = 1), drawn from the counter-based generator. Then
/// `l1` rescales the whole delta to its former L1 norm, `inverse_p` divides
/// each kept element by its own p (the DELLA paper).
pub fn magprune(
    delta: &mut [f32],
    shape: &[usize],
    density: f64,
    epsilon: f64,
    rescale: Rescale,
    key: u64,
) -> std::result::Result<(), String> {
    magprune_with(delta, shape, density, epsilon, rescale, key, None)
}

fusechat_core::multiversion! {
    /// DELLA's draws over one contiguous row: element j (global index
    /// `first + j`) is kept when its draw is below `thr[j]` (its keep
    /// probability `p[j]` in units of 2⁻⁵³), and divided by `p[j]` when `inverse`.
    fn drop_by_threshold(row: &mut [f32], first: u64, thr: &[u64], p: &[f32], key: u64, inverse: bool) {
        for (j, x) in row.iter_mut().enumerate() {
            let keep = dare_bits(key, first + j as u64) < thr[j];
            let v = if inverse { *x / p[j] } else { *x };
            *x = if keep { v } else { 0.0 };
        }
    }
}

/// [`magprune`], with the keep probabilities computed as mergekit does when
/// `round` is given (in bf16 when that is the dtype, see
/// [`magprune_probabilities`]), and no rescaling then (the caller rescales
/// with rounding).
fn magprune_with(
    delta: &mut [f32],
    shape: &[usize],
    density: f64,
    epsilon: f64,
    rescale: Rescale,
    key: u64,
    round: Option<DType>,
) -> std::result::Result<(), String> {
    if density >= 1.0 {
        return Ok(());
    }
    if density <= 0.0 {
        delta.iter_mut().for_each(|x| *x = 0.0);
        return Ok(());
    }
    if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
        return Err(format!(
            "della: density ± epsilon must lie in (0, 1), got density {density} and epsilon {epsilon}; lower epsilon"
        ));
    }
    let (outer, len, inner) = match shape.len() {
        0 | 1 => (1, delta.len(), 1),
        _ => (shape[0], shape[1], shape[2..].iter().product::<usize>()),
    };
    // Per row: rank by |δ| ascending, ties by index (a stable argsort); each
    // element's keep probability from its rank; then the draws, in index
    // order (u < p as an integer test, as DARE's).
    let inverse = rescale == Rescale::InverseP;
    let (p_of_rank, thr_of_rank) = magprune_probabilities(len, density, epsilon, round);
    debug_assert!(thr_of_rank.windows(2).all(|w| w[0] <= w[1]));
    // (ranks are counted in u32)
    let l1_rescale = rescale == Rescale::L1 && round.is_none();
    if inner == 1 && !inverse && len > 0 && len <= u32::MAX as usize {
        // Only the keep-or-drop decision is needed: no sort. With rows of a
        // multiple of 8, each row's |x| go to the lanes `l1` would add them
        // to, in the same order, so both norms are summed while the row is in
        // cache, to the same bits.
        let mut scratch = BoundScratch::default();
        let mut sums = (len % 8 == 0 && l1_rescale).then_some(([0f64; 8], [0f64; 8]));
        let before = if sums.is_none() {
            l1_before(delta, rescale)
        } else {
            0.0
        };
        for (o, row) in delta.chunks_exact_mut(len).enumerate() {
            if let Some((before, _)) = &mut sums {
                add_abs_in_lanes(row, before);
            }
            drop_by_rank_bounds(row, (o * len) as u64, &thr_of_rank, key, &mut scratch);
            if let Some((_, after)) = &mut sums {
                add_abs_in_lanes(row, after);
            }
        }
        match sums {
            Some((b, a)) => rescale_delta_after(
                delta,
                b.iter().sum(),
                Some(a.iter().sum()),
                density,
                rescale,
            ),
            None if l1_rescale => rescale_delta(delta, before, density, rescale),
            None => {}
        }
        return Ok(());
    }
    // Every element's rank: keys (|δ|'s bits, which order non-negative
    // floats, then the index) sorted as integers.
    let before = l1_before(delta, rescale);
    let (mut keyed, mut scratch): (Vec<u64>, Vec<u64>) =
        (Vec::with_capacity(len), Vec::with_capacity(len));
    let (mut p, mut thr) = (vec![0f32; len], vec![0u64; len]);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * len * inner + j * inner + i;
            keyed.clear();
            keyed
                .extend((0..len).map(|j| ((delta[at(j)].abs().to_bits() as u64) << 32) | j as u64));
            sort_by_high_half(&mut keyed, &mut scratch);
            for (r, &kj) in keyed.iter().enumerate() {
                let j = (kj & 0xffff_ffff) as usize;
                p[j] = p_of_rank[r];
                thr[j] = thr_of_rank[r];
            }
            if inner == 1 {
                let row = &mut delta[at(0)..at(0) + len];
                drop_by_threshold(row, at(0) as u64, &thr, &p, key, inverse);
            } else {
                for j in 0..len {
                    let e = at(j);
                    let x = &mut delta[e];
                    if dare_bits(key, e as u64) >= thr[j] {
                        *x = 0.0;
                    } else if inverse {
                        *x /= p[j];
                    }
                }
            }
        }
    }
    if l1_rescale {
        rescale_delta(delta, before, density, rescale);
    }
    Ok(())
}

fusechat_core::multiversion! {
    /// `lanes[k] += |x[i]|` for i ≡ k (mod 8), in index order: [`l1`]'s
    /// lanes, a slice at a time (`x.len()` a multiple of 8).
    fn add_abs_in_lanes(x: &[f32], lanes: &mut [f64; 8]) {
        for c in x.chunks_exact(8) {
            for (a, x) in lanes.iter_mut().zip(c) {
                *a += x.abs() as f64;
            }
        }
    }
}

/// Bins of |x| for [`drop_by_rank_bounds`]: a sixteenth of an octave each
/// (|x|'s bits shifted right by 19), the 256 up to the row's largest |x|;
/// anything 16 octaves or more below it shares bin 0.
const BIN_SHIFT: u32 = 19;
const BINS: usize = 256;

/// The buffers [`drop_by_rank_bounds`] reuses from row to row.
#[derive(Default)]
struct BoundScratch {
    keys: Vec<u32>,
    unsure: Vec<u8>,
    keyed: Vec<u64>,
    sorted: Vec<u64>,
}

/// Above this many unsure draws in a row, [`drop_by_rank_bounds`] ranks the
/// row by sorting instead of counting over it for each: a row of zeros (an
/// untouched tensor) or with a far outlier puts most elements in one bin.
const MOST_COUNTED: usize = 32;

fusechat_core::multiversion! {
    /// MAGPRUNE's keep-or-drop over one contiguous row (element j is global
    /// element `first + j`), when the kept values need no rank (they are not
    /// divided by their p): the same decisions as ranking the row exactly,
    /// without sorting it.
    ///
    /// A histogram of |x| in [`BINS`] bins gives each element's rank to
    /// within its bin's: ranks [s, s + c) for a bin holding c elements above
    /// s smaller ones. The thresholds grow with the rank, so a draw below
    /// `thr[s]` keeps the element and one at or above `thr[s + c − 1]` drops
    /// it, whatever its rank inside the bin. Only a draw between the two
    /// (0.6% of them on Mistral-shaped deltas at ε = 0.15) needs the exact
    /// rank: the count of smaller keys, plus equal keys before it (ties in
    /// index order, as the stable sort). Past [`MOST_COUNTED`] such draws in
    /// a row, the row is sorted instead, so that the cost stays O(n) per row.
    fn drop_by_rank_bounds(row: &mut [f32], first: u64, thr: &[u64], key: u64, scratch: &mut BoundScratch) {
        let BoundScratch { keys, unsure, keyed, sorted } = scratch;
        keys.clear();
        keys.extend(row.iter().map(|x| x.to_bits() & 0x7fff_ffff));
        let top = keys.iter().fold(0u32, |a, &k| a.max(k));
        let floor = (top >> BIN_SHIFT).saturating_sub(BINS as u32 - 1);
        // below BINS since every key is at most top; the mask says so to the compiler
        let bin = |k: u32| ((k >> BIN_SHIFT).saturating_sub(floor) as usize) & (BINS - 1);
        let mut count = [0u32; BINS];
        for &k in keys.iter() {
            count[bin(k)] += 1;
        }
        let (mut lo, mut hi) = ([0u64; BINS], [0u64; BINS]);
        let mut start = 0usize;
        for b in 0..BINS {
            let c = count[b] as usize;
            if c > 0 {
                (lo[b], hi[b]) = (thr[start], thr[start + c - 1]);
            }
            start += c;
        }
        unsure.clear();
        unsure.resize(row.len(), 0);
        let mut unsure_count = 0u32;
        for (j, (x, u)) in row.iter_mut().zip(unsure.iter_mut()).enumerate() {
            let b = bin(keys[j]);
            let draw = dare_bits(key, first + j as u64);
            *x = if draw >= hi[b] { 0.0 } else { *x };
            *u = (draw >= lo[b] && draw < hi[b]) as u8;
            unsure_count += *u as u32;
        }
        if unsure_count == 0 {
            return;
        }
        if unsure_count as usize > MOST_COUNTED {
            // every rank at once, as the sorting path ranks
            keyed.clear();
            keyed.extend(keys.iter().enumerate().map(|(j, &k)| ((k as u64) << 32) | j as u64));
            sort_by_high_half(keyed, sorted);
            for (rank, &kj) in keyed.iter().enumerate() {
                let j = (kj & 0xffff_ffff) as usize;
                if unsure[j] != 0 && dare_bits(key, first + j as u64) >= thr[rank] {
                    row[j] = 0.0;
                }
            }
            return;
        }
        // the flags eight at a time: nearly every word is zero
        for (w, c) in unsure.chunks(8).enumerate() {
            let word = match <[u8; 8]>::try_from(c) {
                Ok(bytes) => u64::from_ne_bytes(bytes),
                Err(_) => 1, // the short tail: look at each
            };
            if word == 0 {
                continue;
            }
            for j in (w * 8..w * 8 + c.len()).filter(|&j| unsure[j] != 0) {
                let k = keys[j];
                let smaller = keys.iter().map(|&x| (x < k) as u32).sum::<u32>();
                let equal_before = keys[..j].iter().map(|&x| (x == k) as u32).sum::<u32>();
                let rank = (smaller + equal_before) as usize;
                if dare_bits(key, first + j as u64) >= thr[rank] {
                    row[j] = 0.0;
                }
            }
        }
    }
}

/// MAGPRUNE's keep probability for each ascending rank of a row of `len`,
/// with its draw threshold ⌈p·2⁵³⌉. When `round` is bf16 (mergekit computes
/// in the tensor's dtype when it is bf16 on the CPU), as mergekit computes
/// it there: ranks + 1 in bf16, `(rank − min) / (max − min)` clamped to
/// [0, 1], then `(density − ε) + norm·2·ε`, each operation rounded to bf16.
fn magprune_probabilities(
    len: usize,
    density: f64,
    epsilon: f64,
    round: Option<DType>,
) -> (Vec<f32>, Vec<u64>) {
    let p: Vec<f32> = match round {
        Some(DType::BF16) => {
            let r = |x: f32| DType::BF16.round(x);
            let (min, max) = (1.0f32, r(len as f32));
            let span = r(max - min);
            (0..len)
                .map(|k| {
                    let norm = (r(r(r((k + 1) as f32) - min) / span)).clamp(0.0, 1.0);
                    r((density - epsilon) as f32 + r(norm * 2.0 * epsilon as f32))
                })
                .collect()
        }
        _ => (0..len)
            .map(|k| {
                let norm = if len > 1 {
                    k as f64 / (len - 1) as f64
                } else {
                    0.5
                };
                (density - epsilon + 2.0 * epsilon * norm) as f32
            })
            .collect(),
    };
    let thr = p
        .iter()
        .map(|&p| (p as f64 * (1u64 << 53) as f64).ceil() as u64)
        .collect();
    (p, thr)
}

/// Sort by the high 32 bits, stably (so keys built in index order keep ties
/// in index order): a least-significant-digit radix sort, one byte a pass,
/// skipping the bytes every key shares.
fn sort_by_high_half(keys: &mut Vec<u64>, scratch: &mut Vec<u64>) {
    // |x|'s bits are below 2³¹: three digits of 11, 11 and 9 bits
    const DIGITS: [(u32, u64); 3] = [(32, 0x7ff), (43, 0x7ff), (54, 0x1ff)];
    let mut counts = [[0u32; 2048]; 3];
    for &k in keys.iter() {
        for (c, (shift, mask)) in counts.iter_mut().zip(DIGITS) {
            c[((k >> shift) & mask) as usize] += 1;
        }
    }
    let n = keys.len() as u32;
    for (c, (shift, mask)) in counts.iter_mut().zip(DIGITS) {
        if c.iter().any(|&x| x == n) {
            continue;
        }
        // counts become each digit's first slot
        let mut sum = 0;
        for x in c.iter_mut() {
            let here = *x;
            *x = sum;
            sum += here;
        }
        scratch.clear();
        scratch.resize(keys.len(), 0);
        for &k in keys.iter() {
            let b = ((k >> shift) & mask) as usize;
            scratch[c[b] as usize] = k;
            c[b] += 1;
        }
        std::mem::swap(keys, scratch);
    }
}

/// The counter-based uniform draw for DARE: a pure function of (seed, tensor,
/// model, element), so a merge is bit-reproducible whatever the threads.
#[inline]
pub fn dare_uniform(key: u64, element: u64) -> f64 {
    dare_bits(key, element) as f64 / (1u64 << 53) as f64
}

/// The 53 random bits behind [`dare_uniform`].
#[inline]
pub fn dare_bits(key: u64, element: u64) -> u64 {
    let x = mix64(
        key ^ mix64(
            element
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(0xD1B5_4A32_D192_ED03),
        ),
    );
    x >> 11
}

/// The DARE key of one (seed, tensor, model).
pub fn dare_key(seed: u64, tensor: &str, model: usize) -> u64 {
    mix64(mix64(seed) ^ fnv1a(tensor.as_bytes()) ^ mix64(0xA5A5_0000 + model as u64))
}

/// Drop each element with probability `1 − density` and rescale the rest.
pub fn bernoulli(delta: &mut [f32], density: f64, rescale: Rescale, key: u64) {
    if density >= 1.0 {
        return;
    }
    let before = l1_before(delta, rescale);
    // u < density ⇔ (the draw's 53 bits) < ⌈density·2⁵³⌉: the same test as
    // `dare_uniform(key, i) < density`, in integers and without a branch
    let threshold = (density.max(0.0) * (1u64 << 53) as f64).ceil() as u64;
    let after = drop_masked(delta, key, threshold);
    rescale_delta_after(delta, before, Some(after), density, rescale);
}

// Zero every element whose draw is not below `threshold`, and return the L1
// norm of what is kept, summed exactly as [`l1`] sums (eight lanes, then the
// tail), so that no second pass is needed. The hash is the whole cost; with
// AVX-512 (checked at run time) its 64-bit multiplies run eight at a time.
// Every path computes the same bits.
fusechat_core::multiversion! {
    fn drop_masked(delta: &mut [f32], key: u64, threshold: u64) -> f64 {
        // blocks of a multiple of 8 keep each element in the lane `l1` adds it to
        const BLOCK: usize = 4096;
        let mut acc = [0f64; 8];
        let full = delta.len() / 8 * 8;
        for start in (0..full).step_by(BLOCK) {
            let block = &mut delta[start..(start + BLOCK).min(full)];
            for (i, x) in block.iter_mut().enumerate() {
                let keep = dare_bits(key, (start + i) as u64) < threshold;
                *x = if keep { *x } else { 0.0 };
            }
            for c in block.chunks_exact(8) {
                for (a, x) in acc.iter_mut().zip(c) {
                    *a += x.abs() as f64;
                }
            }
        }
        let rest = &mut delta[full..];
        for (i, x) in rest.iter_mut().enumerate() {
            let keep = dare_bits(key, (full + i) as u64) < threshold;
            *x = if keep { *x } else { 0.0 };
        }
        let tail: f64 = rest.iter().map(|x| x.abs() as f64).sum();
        acc.iter().sum::<f64>() + tail
    }
}

/// `sign(Σ uⱼ)` per element, + on ties: the elected sign of TIES.
#[inline]
pub fn elected_sign(sum: f32) -> f32 {
    if sum >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

/// Whether a value agrees with the elected sign (zeros never agree).
#[inline]
pub fn agrees(x: f32, sign: f32) -> bool {
    (x > 0.0 && sign > 0.0) || (x < 0.0 && sign < 0.0)
}

/// One method of the family, declared as data by its plugin file.
#[derive(Debug, Clone, Copy)]
pub struct Gta {
    pub name: &'static str,
    pub description: &'static str,
    pub sparsify: Sparsify,
    pub consensus: bool,
    pub default_normalize: bool,
}

impl Merger for Gta {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: self.name.into(),
            description: self.description.into(),
            params: params(self.default_normalize, self.sparsify),
        }
    }

    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Required,
            min_models: 1,
            max_models: None,
        }
    }

    fn mergekit_numerics(&self) -> bool {
        true
    }

    /// DELLA: density ± epsilon must lie in (0, 1) wherever 0 < density < 1;
    /// mergekit's numerics have no `inverse_p` rescale.
    fn check_params(
        &self,
        p: &fusechat_core::merge::params::ResolvedParams,
    ) -> Vec<(String, Option<usize>, String)> {
        let mut bad = Vec::new();
        if p.round_ops.is_some() && p.str("rescale").is_ok_and(|r| r == "inverse_p") {
            bad.push((
                "rescale".to_string(),
                None,
                "rescale = inverse_p is not mergekit's; with numerics = \"mergekit\" use l1 (true) or none (false)".to_string(),
            ));
        }
        if self.sparsify != Sparsify::MagPrune {
            return bad;
        }
        let (Ok(density), Ok(epsilon)) = (p.model_f64("density"), p.model_f64("epsilon")) else {
            return bad;
        };
        bad.extend(density
            .iter()
            .zip(&epsilon)
            .enumerate()
            .filter(|(_, (d, e))| **d > 0.0 && **d < 1.0 && (*d + *e >= 1.0 || *d - *e <= 0.0))
            .map(|(j, (d, e))| {
                (
                    "epsilon".to_string(),
                    Some(j),
                    format!("model {}: density ± epsilon must lie in (0, 1), and density {d} with epsilon {e} does not; lower epsilon below min(density, 1 − density)", j + 1),
                )
            }));
        bad
    }

    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> Result<Merged<'a>> {
        if let Some(d) = g.params.round_ops {
            return self.merge_rounded(g, d);
        }
        let GtaParams {
            weights,
            density,
            normalize,
            lambda,
            rescale,
            gamma,
            epsilon,
        } = self.params(g.params)?;
        let lambda = lambda as f32;
        super::deltas_in_place(&mut g)?;
        for (j, d) in g.models.iter_mut().enumerate() {
            match self.sparsify {
                Sparsify::None => {}
                Sparsify::Magnitude if density[j] < 1.0 => {
                    let before = l1_before(d, rescale);
                    magnitude(d, density[j]);
                    rescale_delta(d, before, density[j], rescale);
                }
                Sparsify::Magnitude => {}
                Sparsify::Bernoulli => {
                    bernoulli(d, density[j], rescale, dare_key(g.seed, g.name, j))
                }
                Sparsify::Outliers if density[j] < 1.0 => {
                    let before = l1_before(d, rescale);
                    breadcrumbs(d, density[j], gamma[j]);
                    rescale_delta(d, before, density[j], rescale);
                }
                Sparsify::Outliers => {}
                Sparsify::MagPrune => magprune(
                    d,
                    g.shape,
                    density[j],
                    epsilon[j],
                    rescale,
                    dare_key(g.seed, g.name, j),
                )
                .map_err(fusechat_core::Error::msg)?,
            }
        }
        let w: Vec<f32> = weights.iter().map(|w| *w as f32).collect();
        let mut out = g.base.take().expect("deltas_in_place checked the base");
        combine(&mut out, &g.models, &w, self.consensus, normalize, lambda);
        Ok(Merged {
            data: out,
            weights: Some(weights),
        })
    }
}

/// The family's parameters for one tensor.
struct GtaParams {
    weights: Vec<f64>,
    density: Vec<f64>,
    normalize: bool,
    lambda: f64,
    rescale: Rescale,
    /// Breadcrumbs' outlier fraction (0 for the other methods).
    gamma: Vec<f64>,
    /// DELLA's half-width (0 for the other methods).
    epsilon: Vec<f64>,
}

impl Gta {
    fn params(&self, p: &fusechat_core::merge::params::ResolvedParams) -> Result<GtaParams> {
        let weights = p.model_f64("weight")?;
        let n = weights.len();
        let per_model = |name: &str, used: bool| -> Result<Vec<f64>> {
            if used {
                p.model_f64(name)
            } else {
                Ok(vec![0.0; n])
            }
        };
        Ok(GtaParams {
            density: p.model_f64("density")?,
            normalize: p.bool("normalize")?,
            lambda: p.f64("lambda")?,
            rescale: Rescale::parse(p.str("rescale")?),
            gamma: per_model("gamma", self.sparsify == Sparsify::Outliers)?,
            epsilon: per_model("epsilon", self.sparsify == Sparsify::MagPrune)?,
            weights,
        })
    }

    /// `numerics = "mergekit"`: mergekit 0.1.5's GTA task in dtype `d`, every
    /// operation rounded as PyTorch rounds it (elementwise ops in f32, then
    /// rounded; sums accumulated in f32 and rounded once):
    /// δ = θʲ − θ⁰; sparsified, and with `rescale` multiplied by
    /// (‖δ‖₁ / ‖δ̂‖₁), both norms and the ratio rounded; uⱼ = δ̂ⱼ·wⱼ (wⱼ rounded
    /// to the dtype); the sign election on the rounded Σ uⱼ; mixed = Σ mⱼuⱼ and
    /// divisor = Σ mⱼwⱼ, each rounded; mixed / divisor; mixed·λ when λ ≠ 1;
    /// θ⁰ + mixed.
    fn merge_rounded<'a>(&self, mut g: TensorGroup<'a>, d: DType) -> Result<Merged<'a>> {
        let r = |x: f32| d.round(x);
        let GtaParams {
            weights,
            density,
            normalize,
            lambda,
            rescale,
            gamma,
            epsilon,
        } = self.params(g.params)?;
        // (`inverse_p` is refused by `check_params` before anything runs)
        let base = g.base.take().ok_or_else(|| {
            fusechat_core::Error::msg(format!(
                "tensor `{}`: this method needs a base model",
                g.name
            ))
        })?;
        let rsum = |v: &[f32]| r(v.iter().map(|x| x.abs() as f64).sum::<f64>() as f32);
        let mut ties = 0usize;
        for (j, m) in g.models.iter_mut().enumerate() {
            m.iter_mut()
                .zip(base.iter())
                .for_each(|(x, b)| *x = r(*x - b));
            if self.sparsify == Sparsify::None || density[j] >= 1.0 {
                continue;
            }
            let before = rsum(m);
            match self.sparsify {
                Sparsify::None => {}
                Sparsify::Magnitude => {
                    ties += ambiguous_at_threshold(m, density[j]);
                    magnitude(m, density[j]);
                }
                Sparsify::Bernoulli => {
                    let (key, keep) = (dare_key(g.seed, g.name, j), r(density[j] as f32) as f64);
                    for (i, x) in m.iter_mut().enumerate() {
                        if dare_uniform(key, i as u64) >= keep {
                            *x = 0.0;
                        }
                    }
                }
                Sparsify::Outliers => breadcrumbs(m, density[j], gamma[j]),
                Sparsify::MagPrune => magprune_with(
                    m,
                    g.shape,
                    density[j],
                    epsilon[j],
                    Rescale::None,
                    dare_key(g.seed, g.name, j),
                    Some(d),
                )
                .map_err(fusechat_core::Error::msg)?,
            }
            if rescale == Rescale::L1 {
                let after = rsum(m);
                if before >= 1e-7 && after >= 1e-7 {
                    let ratio = r(before / after);
                    m.iter_mut().for_each(|x| *x = r(*x * ratio));
                }
            }
        }
        if ties > 0 {
            tracing::debug!(
                tensor = g.name,
                ties,
                "magnitudes equal to the trimming threshold: which of them are kept may differ from mergekit's (argsort order)"
            );
        }
        let w: Vec<f32> = weights.iter().map(|w| r(*w as f32)).collect();
        for (m, wj) in g.models.iter_mut().zip(&w) {
            m.iter_mut().for_each(|x| *x = r(*x * wj));
        }
        let mut out = base;
        for (i, o) in out.iter_mut().enumerate() {
            let (mut mixed, mut divisor);
            if self.consensus {
                let sum = r(g.models.iter().map(|m| m[i]).sum::<f32>());
                let s = if sum >= 0.0 { 1.0 } else { -1.0 };
                mixed = 0.0;
                divisor = 0.0;
                for (m, wj) in g.models.iter().zip(&w) {
                    if m[i] * s > 0.0 {
                        mixed += m[i];
                        divisor += wj;
                    }
                }
                divisor = r(divisor);
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                mixed = g.models.iter().map(|m| m[i]).sum::<f32>();
                divisor = r(w.iter().sum::<f32>());
                if divisor.abs() < 1e-8 {
                    divisor = 1.0;
                }
            }
            mixed = r(mixed);
            if normalize {
                mixed = r(mixed / divisor);
            }
            if lambda != 1.0 {
                mixed = r(mixed * lambda as f32);
            }
            *o = r(*o + mixed);
        }
        Ok(Merged {
            data: out,
            weights: Some(weights),
        })
    }
}

/// How many elements share the trimming threshold's magnitude when only some
/// of them are kept (0 when the choice is not ambiguous).
fn ambiguous_at_threshold(delta: &[f32], density: f64) -> usize {
    let n = delta.len();
    let k = magnitude_k(density, n);
    if k == 0 || k >= n {
        return 0;
    }
    let Cut { above, equal, .. } = top_k_cut(delta, k);
    if above + equal > k {
        equal
    } else {
        0
    }
}

/// Elements per block of the combine loop: small enough for L1, large enough
/// for the contiguous inner loops to vectorise.
const BLOCK: usize = 2048;

fusechat_core::multiversion! {
    /// `out += λ·mixed / divisor` (see the module docs), block by block so that
    /// every inner loop runs over contiguous slices without branches (and
    /// vectorises: AVX2 or AVX-512 when the CPU has them).
    pub fn combine(
        out: &mut [f32],
        deltas: &[TensorBuf],
        w: &[f32],
        consensus: bool,
        normalize: bool,
        lambda: f32,
    ) {
        let wsum: f32 = w.iter().sum();
        let plain_div = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
        let mut total = [0f32; BLOCK];
        let mut mixed = [0f32; BLOCK];
        let mut div = [0f32; BLOCK];
        for start in (0..out.len()).step_by(BLOCK) {
            let end = (start + BLOCK).min(out.len());
            let n = end - start;
            let (total, mixed, div) = (&mut total[..n], &mut mixed[..n], &mut div[..n]);
            mixed.fill(0.0);
            if consensus {
                total.fill(0.0);
                for (d, wj) in deltas.iter().zip(w) {
                    total
                        .iter_mut()
                        .zip(&d[start..end])
                        .for_each(|(t, x)| *t += x * wj);
                }
                // elected sign: + when the sum is >= 0
                total
                    .iter_mut()
                    .for_each(|t| *t = if *t >= 0.0 { 1.0 } else { -1.0 });
                div.fill(0.0);
                for (d, wj) in deltas.iter().zip(w) {
                    for ((m, dv), (x, s)) in mixed
                        .iter_mut()
                        .zip(div.iter_mut())
                        .zip(d[start..end].iter().zip(total.iter()))
                    {
                        let u = x * wj;
                        // u·s > 0 exactly when u is non-zero and has the elected sign (s = ±1)
                        let agree = u * s > 0.0;
                        *m += if agree { u } else { 0.0 };
                        *dv += if agree { *wj } else { 0.0 };
                    }
                }
                div.iter_mut().for_each(|v| {
                    if *v == 0.0 {
                        *v = 1.0
                    }
                });
            } else {
                for (d, wj) in deltas.iter().zip(w) {
                    mixed
                        .iter_mut()
                        .zip(&d[start..end])
                        .for_each(|(m, x)| *m += x * wj);
                }
                div.fill(plain_div);
            }
            let o = &mut out[start..end];
            if normalize {
                o.iter_mut()
                    .zip(mixed.iter().zip(div.iter()))
                    .for_each(|(o, (m, d))| *o += lambda * (m / d));
            } else {
                o.iter_mut()
                    .zip(mixed.iter())
                    .for_each(|(o, m)| *o += lambda * m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_selection_agrees_with_sorting() {
        let mut rng = fusechat_core::rng::SplitMix64(5);
        let data: Vec<f32> = (0..5000)
            .map(|i| {
                if i % 7 == 0 {
                    0.0
                } else {
                    rng.normal() as f32 * 1e-3
                }
            })
            .collect();
        let mut sorted: Vec<f32> = data.iter().map(|x| x.abs()).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for k in [1, 2, 17, 2500, 4285, 4286, 5000] {
            assert_eq!(kth_largest_abs(&data, k), sorted[k - 1], "k = {k}");
        }
    }

    /// The cut written out by sorting: the k-th largest |x|, how many are
    /// above it and how many equal it.
    fn sorted_cut(data: &[f32], k: usize) -> Cut {
        let mut sorted: Vec<f32> = data.iter().map(|x| x.abs()).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let thr = sorted[k - 1];
        Cut {
            thr,
            above: sorted.iter().filter(|a| **a > thr).count(),
            equal: sorted.iter().filter(|a| **a == thr).count(),
        }
    }

    /// bf16-rounded normal values with a tenth of zeros: many exact ties, as
    /// in the deltas of bf16 models.
    fn tied_data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = fusechat_core::rng::SplitMix64(seed);
        (0..n)
            .map(|i| {
                if i % 10 == 3 {
                    0.0
                } else {
                    DType::BF16.round(rng.normal() as f32 * 1e-3)
                }
            })
            .collect()
    }

    #[test]
    fn cuts_agree_with_sorting_on_large_tied_data() {
        // large enough for the sampled bracket; every k from the edges and the middle
        let n = 100_003;
        let data = tied_data(n, 11);
        for k in [
            1,
            2,
            3,
            77,
            n / 10,
            n / 2,
            n / 2 + 1,
            n - n / 10,
            n - n / 10 + 1,
            n - 1,
            n,
        ] {
            let want = sorted_cut(&data, k);
            assert_eq!(top_k_cut(&data, k), want, "k = {k}");
            assert_eq!(cut_by_radix(&data, k), want, "radix, k = {k}");
            assert!(want.above < k && k <= want.above + want.equal);
        }
        // a sample that misleads (every sampled element is an outlier) falls
        // back to the histograms and is still exact
        let stride = n / (n / 128).clamp(4096, 1 << 15);
        let mut fooled = data.clone();
        for i in 0..n / stride {
            fooled[i * stride + stride / 2] = 5.0 + i as f32;
        }
        for k in [10, n / 2] {
            assert_eq!(top_k_cut(&fooled, k), sorted_cut(&fooled, k), "k = {k}");
        }
        // all equal: every value ties
        let flat = vec![-0.5f32; 40_000];
        assert_eq!(
            top_k_cut(&flat, 123),
            Cut {
                thr: 0.5,
                above: 0,
                equal: 40_000
            }
        );
    }

    #[test]
    fn keep_top_k_keeps_the_first_of_ties_in_index_order() {
        let n = 70_001;
        let data = tied_data(n, 12);
        for k in [1, 1000, n / 2, n - 5] {
            // written out: indices ranked by |x| descending, ties by index
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| data[b].abs().total_cmp(&data[a].abs()).then(a.cmp(&b)));
            let mut want = vec![0f32; n];
            for &i in &order[..k] {
                want[i] = data[i];
            }
            let mut got = data.clone();
            keep_top_k(&mut got, k);
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn breadcrumbs_keep_the_band_between_the_outliers_and_the_smallest() {
        let n = 50_000;
        let data = tied_data(n, 13);
        let (density, gamma) = (0.4, 0.05);
        let (target, top) = ((density * n as f64) as usize, (gamma * n as f64) as usize);
        // written out: ranked by |x| descending, ties by index; the band after the outliers
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| data[b].abs().total_cmp(&data[a].abs()).then(a.cmp(&b)));
        let mut want = vec![0f32; n];
        for &i in &order[top..top + target] {
            want[i] = data[i];
        }
        let mut got = data.clone();
        breadcrumbs(&mut got, density, gamma);
        assert_eq!(got, want);
    }

    #[test]
    fn radix_sort_orders_by_the_high_half_keeping_ties_in_order() {
        let mut rng = fusechat_core::rng::SplitMix64(3);
        let mut keys: Vec<u64> = (0..3000u64)
            .map(|j| (((rng.next_u64() % 50) << (rng.next_u64() % 31)) & 0x7FFF_FFFF) << 32 | j)
            .collect();
        let mut want = keys.clone();
        want.sort_by_key(|k| k >> 32); // stable
        sort_by_high_half(&mut keys, &mut Vec::new());
        assert_eq!(keys, want);
    }

    #[test]
    fn magprune_probabilities_follow_the_rank() {
        // f32 compute: density − ε at the lowest rank, density + ε at the highest
        let (p, thr) = magprune_probabilities(5, 0.5, 0.1, None);
        assert_eq!(p, vec![0.4, 0.45, 0.5, 0.55, 0.6]);
        assert_eq!(thr[2], 1u64 << 52, "⌈0.5·2⁵³⌉");
        // mergekit in bf16, each operation rounded (worked by hand for a row of 300):
        // max rank 300 is exact, but max − min = 299 rounds to 300;
        // rank 1: norm 0, p = bf16(0.4) = 0.400390625;
        // rank 150: 149/300 → 0.49609375, ·2·0.1 → 0.09912109375, + 0.4 → 0.5;
        // rank 300: 300 − 1 rounds to 300 as well, so norm is 1, ·2·0.1 → 0.2001953125,
        // + 0.4 → 0.6015625 (above density + ε)
        let (p, _) = magprune_probabilities(300, 0.5, 0.1, Some(DType::BF16));
        assert_eq!((p[0], p[149], p[299]), (0.400390625, 0.5, 0.6015625));
    }

    #[test]
    fn rank_bounds_decide_as_the_exact_ranks_do() {
        let mut rng = fusechat_core::rng::SplitMix64(17);
        // rows: Gaussian deltas rounded to bf16 (many bins, ties); the same
        // with signed zeros, values 40 octaves down (past the 16 the bins
        // cover) and one far outlier (most elements in bin 0: the sorting
        // fallback); all zeros (an untouched tensor: one bin)
        let mut gaussian = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| DType::BF16.round((rng.normal() * 1e-3) as f32))
                .collect()
        };
        let mixed = |mut row: Vec<f32>| -> Vec<f32> {
            for (i, x) in row.iter_mut().enumerate() {
                match i % 11 {
                    0 => *x = 0.0,
                    1 => *x = -0.0,
                    2 => *x = 1e-3,
                    3 => *x = -1e-3,
                    4 => *x *= 1e-9,
                    5 if i == 5 => *x = 1e6,
                    _ => {}
                }
            }
            row
        };
        let cases: Vec<(&str, Vec<f32>, f64, Option<DType>)> = vec![
            ("one", vec![0.5], 0.1, None),
            ("seven", mixed(gaussian(7)), 0.3, None),
            ("gaussian", gaussian(1024), 0.15, None),
            ("gaussian bf16", gaussian(2816), 0.4, Some(DType::BF16)),
            ("mixed", mixed(gaussian(3000)), 0.49, None),
            ("mixed bf16", mixed(gaussian(1024)), 0.15, Some(DType::BF16)),
            ("zeros", vec![0.0; 2048], 0.15, None),
        ];
        for (what, row, eps, round) in cases {
            let n = row.len();
            let (_, thr) = magprune_probabilities(n, 0.5, eps, round);
            let key = dare_key(3, what, n);
            // the decision written out: a stable sort by |x| gives the ranks
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&j| row[j].abs().to_bits());
            let mut rank = vec![0; n];
            order.iter().enumerate().for_each(|(r, &j)| rank[j] = r);
            let first = 1000;
            let want: Vec<f32> = (0..n)
                .map(|j| {
                    let keep = dare_bits(key, first + j as u64) < thr[rank[j]];
                    if keep {
                        row[j]
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut got = row.clone();
            drop_by_rank_bounds(&mut got, first, &thr, key, &mut BoundScratch::default());
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{what}"
            );
            if n > 100 && what != "zeros" {
                let dropped = (0..n).filter(|&j| row[j] != 0.0 && want[j] == 0.0).count();
                let kept = want.iter().filter(|x| **x != 0.0).count();
                assert!(
                    dropped > n / 4 && kept > n / 4,
                    "{what}: {dropped} dropped, {kept} kept"
                );
            }
        }
    }

    #[test]
    fn magprune_rescales_to_the_l1_norm_summed_as_l1_sums() {
        let mut rng = fusechat_core::rng::SplitMix64(5);
        // rows of 24 (the norms summed row by row) and of 7 (in whole passes)
        for shape in [[6usize, 24], [6, 7]] {
            let n = shape[0] * shape[1];
            let delta: Vec<f32> = (0..n).map(|_| (rng.normal() * 1e-2) as f32).collect();
            let key = dare_key(1, "w", 0);
            let (_, thr) = magprune_probabilities(shape[1], 0.5, 0.2, None);
            let mut want = delta.clone();
            for (o, row) in want.chunks_mut(shape[1]).enumerate() {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by_key(|&j| row[j].abs().to_bits());
                let mut rank = vec![0; row.len()];
                order.iter().enumerate().for_each(|(r, &j)| rank[j] = r);
                for j in 0..row.len() {
                    if dare_bits(key, (o * shape[1] + j) as u64) >= thr[rank[j]] {
                        row[j] = 0.0;
                    }
                }
            }
            let f = (l1(&delta) / l1(&want)) as f32;
            want.iter_mut().for_each(|x| *x *= f);
            let mut got = delta.clone();
            magprune(&mut got, &shape, 0.5, 0.2, Rescale::L1, key).unwrap();
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{shape:?}"
            );
        }
        // an empty row: nothing to do
        magprune(&mut [], &[5, 0], 0.5, 0.2, Rescale::L1, 0).unwrap();
    }

    #[test]
    fn magnitude_keeps_exactly_k_largest() {
        let mut d = vec![0.1, -0.5, 0.3, -0.2, 0.5, 0.0];
        magnitude(&mut d, 0.5); // k = 3: |-0.5|, |0.5|, |0.3|
        assert_eq!(d, vec![0.0, -0.5, 0.3, 0.0, 0.5, 0.0]);
        let mut ties = vec![1.0, -1.0, 1.0, 1.0];
        magnitude(&mut ties, 0.5);
        assert_eq!(ties, vec![1.0, -1.0, 0.0, 0.0]);
        let mut none = vec![1.0, 2.0];
        magnitude(&mut none, 0.1); // int(0.2) = 0, but a positive density keeps one
        assert_eq!(none, vec![0.0, 2.0]);
        magnitude(&mut none, 0.0);
        assert_eq!(none, vec![0.0, 0.0]);
    }

    #[test]
    fn bernoulli_keeps_about_density_and_rescales() {
        let n = 100_000;
        let mut d: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        bernoulli(&mut d, 0.3, Rescale::InverseP, dare_key(7, "t", 0));
        let kept = d.iter().filter(|x| **x != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
        assert!(d
            .iter()
            .all(|x| *x == 0.0 || (x.abs() - 1.0 / 0.3).abs() < 1e-5));
        let mut e: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
        let l1: f64 = e.iter().map(|x| x.abs() as f64).sum();
        bernoulli(&mut e, 0.5, Rescale::L1, dare_key(7, "t", 1));
        let l1_after: f64 = e.iter().map(|x| x.abs() as f64).sum();
        assert!((l1 - l1_after).abs() / l1 < 1e-5);
    }

    #[test]
    fn dare_keys_differ_by_tensor_model_and_seed() {
        let k = dare_key(1, "a", 0);
        assert_ne!(k, dare_key(1, "a", 1));
        assert_ne!(k, dare_key(1, "b", 0));
        assert_ne!(k, dare_key(2, "a", 0));
    }
}
