//! Wider vector code for hot loops, chosen at run time, and the
//! branch-free `exp` and `ln` that let such loops vectorise.
//!
//! fusechat is built for the baseline x86-64 (SSE2), so that a binary runs on
//! any x86-64 machine. [`multiversion!`](crate::multiversion) compiles a
//! function's body twice more, for AVX2 and for AVX-512, and calls the widest
//! the CPU has. Rust never fuses a multiply and an add on its own and does not
//! reorder float reductions, so every version computes the same bits; only
//! the width of the vectors differs.

/// Whether the CPU has AVX-512 (F, DQ, VL, BW).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the CPU has AVX2.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Define a function whose body is compiled for the baseline, AVX2 and
/// AVX-512, the widest the CPU has being called (see the [module
/// docs](crate::simd)). The body must be safe code without generics.
///
/// ```
/// fusechat_core::multiversion! {
///     /// `a += k·b`
///     pub fn axpy(a: &mut [f32], b: &[f32], k: f32) {
///         a.iter_mut().zip(b).for_each(|(a, b)| *a += k * b);
///     }
/// }
/// let mut a = vec![1.0; 3];
/// axpy(&mut a, &[1.0, 2.0, 3.0], 2.0);
/// assert_eq!(a, [3.0, 5.0, 7.0]);
/// ```
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// ln 2 split so that `k · LN2_HI` is exact for |k| < 2²¹ (fdlibm's split).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1.5 · 2⁵²: adding it rounds to an integer, held in the low mantissa bits.
const SHIFT: f64 = 6_755_399_441_055_744.0;

/// eˣ. Inputs below −708 give e⁻⁷⁰⁸ (≈ 3·10⁻³⁰⁸) instead of a subnormal or
/// zero, and inputs above 709 give e⁷⁰⁹; NaN stays NaN.
#[inline(always)]
pub fn exp1(x: f64) -> f64 {
    // comparisons rather than min/max, so that a NaN passes through
    let x = if x < -708.0 { -708.0 } else { x };
    let x = if x > 709.0 { 709.0 } else { x };
    let t = x * std::f64::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    // x = k·ln2 + r with |r| ≤ ln2/2 (Cody and Waite's two-step reduction)
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // eʳ by its Taylor series to degree 13: the first omitted term is below
    // 4·10⁻¹⁸ relative on |r| ≤ 0.347
    const C: [f64; 14] = [
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    let mut p = C[0];
    for c in &C[1..] {
        p = p * r + c;
    }
    // 2ᵏ from the integer in t's low bits: k + 1023 lies in [2, 2046]
    let scale = f64::from_bits(t.to_bits().wrapping_add(1023) << 52);
    p * scale
}

/// ln x for a positive normal x. Zero, subnormals, negatives, ∞ and NaN are
/// not handled (NaN and ∞ give finite garbage): callers pass ratios of
/// probabilities that are at least 10⁻⁸.
#[inline(always)]
pub fn ln1(x: f64) -> f64 {
    let bits = x.to_bits();
    // the unbiased exponent as a float, without an integer conversion
    let e = f64::from_bits(0x4330_0000_0000_0000 | (bits >> 52)) - 4_503_599_627_370_496.0 - 1023.0;
    // the mantissa in [1, 2), then in [√½, √2)
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let big = m > std::f64::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = if big { e + 1.0 } else { e };
    // ln m = 2·atanh(s) = 2s·Σ s²ʲ/(2j + 1), s = (m − 1)/(m + 1), |s| ≤ 0.172
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut p = 1.0 / 23.0;
    for d in [21.0, 19.0, 17.0, 15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0, 1.0] {
        p = p * z + 1.0 / d;
    }
    e * LN2_HI + (2.0 * s * p + e * LN2_LO)
}

crate::multiversion! {
    /// `x ← eˣ` for every element.
    pub fn exp_in_place(xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = exp1(*x));
    }
}

crate::multiversion! {
    /// `x ← ln x` for every element (positive normal values).
    pub fn ln_in_place(xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = ln1(*x));
    }
}

/// `Σ x` over eight interleaved partial sums.
pub fn sum(xs: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let c = xs.chunks_exact(8);
    let tail: f64 = c.remainder().iter().sum();
    for x in c {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// eˣ in f32 (Cephes' expf: a degree-6 polynomial after reduction by ln 2),
/// within 2 ulp on [−87.33, 88.37]; 0 below (no subnormals), e^88.37 up to
/// 88.72 and +∞ above; NaN stays NaN. Branch-free, so that loops over it
/// vectorise. The callers' arguments are at most 0 (x − max, x − lse).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // k = round(x·log₂e) stays in [−126, 127], so 2ᵏ is a normal float
    let xc = if x < -87.336_54 { -87.336_54 } else { x };
    let xc = if xc > 88.37 { 88.37 } else { xc };
    // 1.5·2²³ rounds to an integer; k ∈ [−126, 127]
    let k = (xc * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = (xc - k * 0.693_359_4) - k * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.000_000_1e-1,
    ] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    let e = y * scale;
    // the tails: libm's expf gives subnormals down to −103.97; zero here
    let e = if x < -87.336_55 { 0.0 } else { e };
    if x > 88.722_84 {
        f32::INFINITY
    } else {
        e
    }
}

crate::multiversion! {
    /// `y ← e^(x − shift)` elementwise; returns Σ y (f32, eight partial sums).
    pub fn exp_shifted_f32(x: &[f32], shift: f32, y: &mut [f32]) -> f32 {
        assert_eq!(x.len(), y.len(), "exp_shifted_f32: input and output lengths differ");
        let mut acc = [0f32; 8];
        let (cx, cy) = (x.chunks_exact(8), y.chunks_exact_mut(8));
        let (rx, ry) = (cx.remainder(), cy.into_remainder());
        let mut tail = 0f32;
        for (o, v) in ry.iter_mut().zip(rx) {
            *o = exp_f32(v - shift);
            tail += *o;
        }
        for (xs, ys) in x.chunks_exact(8).zip(y.chunks_exact_mut(8)) {
            for k in 0..8 {
                ys[k] = exp_f32(xs[k] - shift);
                acc[k] += ys[k];
            }
        }
        acc.iter().sum::<f32>() + tail
    }
}

crate::multiversion! {
    /// Σ e^(x − shift) in f64 (each exponential in f64, eight partial sums).
    pub fn sum_exp_shifted_f64(x: &[f32], shift: f64) -> f64 {
        let mut acc = [0f64; 8];
        let c = x.chunks_exact(8);
        let tail: f64 = c.remainder().iter().map(|v| exp1(*v as f64 - shift)).sum();
        for xs in c {
            for k in 0..8 {
                acc[k] += exp1(xs[k] as f64 - shift);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
}

crate::multiversion! {
    /// `y ← a·σ(a)·b`, with `σ(a) = 1/(1 + e^−a)`.
    pub fn silu_mul_f32(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
            let s = 1.0 / (1.0 + exp_f32(-a));
            *y = a * s * b;
        }
    }
}

crate::multiversion! {
    /// The gradients of `silu(a) ⊙ b` under `g`:
    /// `da ← g·b·σ(a)·(1 + a·(1 − σ(a)))`, `db ← g·a·σ(a)`.
    pub fn silu_mul_bwd_f32(a: &[f32], b: &[f32], g: &[f32], da: &mut [f32], db: &mut [f32]) {
        for ((((da, db), a), b), g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
            let s = 1.0 / (1.0 + exp_f32(-a));
            *db = g * a * s;
            *da = g * b * s * (1.0 + a * (1.0 - s));
        }
    }
}

crate::multiversion! {
    /// `y ← softmax(x + bias)`: the masked attention row (a −∞-like bias
    /// gives exactly 0).
    pub fn softmax_with_bias_f32(x: &[f32], bias: &[f32], y: &mut [f32]) {
        assert!(x.len() == y.len() && bias.len() == y.len(), "softmax_with_bias_f32: lengths differ");
        // Keys masked by a bias of −10⁹ or less at the end of the row (the
        // causal future, right padding) get exactly 0, as e^(−10⁹) would give:
        // skip them, unless the whole row is masked.
        let live = bias.iter().rposition(|b| *b > -1e9).map_or(bias.len(), |i| i + 1);
        let (x, bias) = (&x[..live], &bias[..live]);
        let (y, dead) = y.split_at_mut(live);
        dead.fill(0.0);
        let mut m = [f32::NEG_INFINITY; 8];
        let mut tail = f32::NEG_INFINITY;
        let (cx, cb) = (x.chunks_exact(8), bias.chunks_exact(8));
        for ((o, v), b) in y.chunks_exact_mut(8).into_remainder().iter_mut().zip(cx.remainder()).zip(cb.remainder()) {
            *o = v + b;
            tail = tail.max(*o);
        }
        for ((ys, xs), bs) in y.chunks_exact_mut(8).zip(cx).zip(cb) {
            for k in 0..8 {
                ys[k] = xs[k] + bs[k];
                m[k] = if ys[k] > m[k] { ys[k] } else { m[k] };
            }
        }
        let max = m.iter().fold(tail, |a, b| a.max(*b));
        let mut acc = [0f32; 8];
        let mut tail = 0f32;
        let c = y.chunks_exact_mut(8);
        let r = c.into_remainder();
        for o in r.iter_mut() {
            *o = exp_f32(*o - max);
            tail += *o;
        }
        for ys in y.chunks_exact_mut(8) {
            for k in 0..8 {
                ys[k] = exp_f32(ys[k] - max);
                acc[k] += ys[k];
            }
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
        y.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        let mut r = SplitMix64(8);
        let xs: Vec<f32> = (0..200_000)
            .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 175.7 - 87.33)
            .chain([
                0.0, -0.0, 1.0, -1.0, 1e-30, -1e-7, 88.37, -87.336, -87.2, 0.5, -0.5,
            ])
            .collect();
        for x in &xs {
            let (got, want) = (exp_f32(*x), x.exp());
            let d = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
            assert!(d <= 2, "exp({x}): {got} vs {want}");
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        let x: Vec<f32> = (0..37).map(|i| i as f32 * -0.3).collect();
        let mut y = vec![0f32; x.len()];
        let s = exp_shifted_f32(&x, -1.0, &mut y);
        let want: f64 = x.iter().map(|v| ((*v + 1.0) as f64).exp()).sum();
        assert!((s as f64 - want).abs() < 1e-5 * want, "{s} vs {want}");
        let s64 = sum_exp_shifted_f64(&x, -1.0);
        assert!((s64 - want).abs() < 1e-5 * want);
    }
    use crate::rng::SplitMix64;

    fn ulps(a: f64, b: f64) -> u64 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs()
    }

    #[test]
    fn ln2_split_sums_to_ln2() {
        assert_eq!(LN2_HI + LN2_LO, std::f64::consts::LN_2);
        // k·LN2_HI is exact for every exponent k (|k| < 2¹¹)
        assert!(LN2_HI.to_bits().trailing_zeros() >= 11);
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut r = SplitMix64(3);
        let mut xs: Vec<f64> = (0..200_000)
            .map(|_| (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 1400.0 - 700.0)
            .chain([
                0.0,
                -0.0,
                1.0,
                -1.0,
                1e-300,
                -1e-12,
                708.9,
                -707.9,
                0.5 * LN2_HI,
            ])
            .collect();
        let want: Vec<f64> = xs.iter().map(|x| x.exp()).collect();
        exp_in_place(&mut xs);
        for (got, want) in xs.iter().zip(&want) {
            assert!(ulps(*got, *want) <= 2, "exp: {got} vs {want}");
        }
        let mut edge = vec![-800.0, 800.0, f64::NAN];
        exp_in_place(&mut edge);
        assert!(ulps(edge[0], (-708f64).exp()) <= 2, "{}", edge[0]);
        assert!(ulps(edge[1], 709f64.exp()) <= 2, "{}", edge[1]);
        assert!(edge[2].is_nan());
    }

    #[test]
    fn ln_is_within_two_ulp_of_libm() {
        let mut r = SplitMix64(4);
        let mut xs: Vec<f64> = (0..200_000)
            .map(|_| (((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64) * 80.0 - 40.0).exp())
            .chain([
                1.0,
                1.0 + f64::EPSILON,
                1.0 - f64::EPSILON / 2.0,
                2.0,
                0.5,
                1e-8,
                1e8,
            ])
            .chain([std::f64::consts::SQRT_2, f64::MIN_POSITIVE, f64::MAX])
            .collect();
        let want: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
        ln_in_place(&mut xs);
        for (got, want) in xs.iter().zip(&want) {
            assert!(
                ulps(*got, *want) <= 2 || (got - want).abs() < 1e-300,
                "ln: {got} vs {want}"
            );
        }
        let mut one = [1.0];
        ln_in_place(&mut one);
        assert_eq!(one[0], 0.0);
    }

    #[test]
    fn sum_adds_every_element() {
        let xs: Vec<f64> = (1..=1001).map(|i| i as f64).collect();
        assert_eq!(sum(&xs), 1001.0 * 1002.0 / 2.0);
    }
}
