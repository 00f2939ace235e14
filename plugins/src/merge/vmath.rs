//! `exp` and `ln` in f64 over whole slices, written without branches or
//! library calls so that the compiler vectorises them: eight lanes with
//! AVX-512, four with AVX2 (both chosen at run time, see
//! [`fusechat_core::simd`]), two otherwise. Every path runs the same
//! operations in the same order, so the bits do not depend on the CPU.
//!
//! Accuracy: within 2 ulp of the correctly rounded value (tested against the
//! standard library over the ranges below), which is what libm gives too.

/// ln 2 split so that `k · LN2_HI` is exact for |k| < 2²¹ (fdlibm's split).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1.5 · 2⁵²: adding it rounds to an integer, held in the low mantissa bits.
const SHIFT: f64 = 6_755_399_441_055_744.0;

/// eˣ. Inputs below −708 give e⁻⁷⁰⁸ (≈ 3·10⁻³⁰⁸) instead of a subnormal or
/// zero, and inputs above 709 give e⁷⁰⁹; NaN stays NaN.
#[inline(always)]
fn exp1(x: f64) -> f64 {
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

/// ln x for a positive normal x (zero, subnormals and negatives are not
/// handled: callers pass ratios of probabilities that are at least 10⁻⁸).
#[inline(always)]
fn ln1(x: f64) -> f64 {
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

fusechat_core::multiversion! {
    /// `x ← eˣ` for every element.
    pub fn exp_in_place(xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = exp1(*x));
    }
}

fusechat_core::multiversion! {
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

#[cfg(test)]
mod tests {
    use super::*;
    use fusechat_core::rng::SplitMix64;

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
