//! Wider vector code for hot loops, chosen at run time.
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
