//! Floating-point storage dtypes of checkpoints and their conversion to and
//! from the f32 that every merge kernel computes in.
//!
//! f32 → bf16/f16 rounds to nearest, ties to even (as PyTorch does), so a
//! merged bf16 checkpoint is bit-identical to one rounded by `tensor.to(torch.bfloat16)`.
//!
//! ```
//! use fusechat_core::io::dtype::DType;
//! let bytes = DType::BF16.encode(&[1.0, -2.5]);
//! assert_eq!(bytes, vec![0x80, 0x3f, 0x20, 0xc0]);
//! assert_eq!(DType::BF16.decode(&bytes), vec![1.0, -2.5]);
//! ```

#[cfg(test)]
use half::bf16;
use half::f16;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parse the names users write: `f32`, `float32`, `bf16`, `bfloat16`, `fp16`, `float16`,
    /// `torch.bfloat16`, `BF16`...
    pub fn parse(s: &str) -> Option<DType> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("torch.").unwrap_or(&s);
        match s {
            "f32" | "fp32" | "float32" | "float" => Some(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The name in a safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// The `torch_dtype` string of an HF `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        match d {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// Decode little-endian bytes of this dtype into f32 (appending to `out`).
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        decode_into(self, bytes, out)
    }

    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let mut v = Vec::new();
        self.decode_into(bytes, &mut v);
        v
    }

    /// One value rounded to this dtype and back (nearest, ties to even).
    #[inline]
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => f32::from_bits((f32_to_bf16_bits(v) as u32) << 16),
        }
    }

    /// Round f32 values to this dtype and back, in place (what loading in
    /// this dtype would have given).
    pub fn round_trip(self, values: &mut [f32]) {
        match self {
            DType::F32 => {}
            DType::F16 => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            DType::BF16 => values
                .iter_mut()
                .for_each(|v| *v = f32::from_bits((f32_to_bf16_bits(*v) as u32) << 16)),
        }
    }

    /// Encode f32 values as little-endian bytes of this dtype.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * self.size()];
        encode_into(self, values, &mut out);
        out
    }

    /// [`DType::encode`] into a buffer of exactly `values.len() · size` bytes.
    pub fn encode_to(self, values: &[f32], out: &mut [u8]) {
        assert_eq!(
            out.len(),
            values.len() * self.size(),
            "encode_to: output size"
        );
        encode_into(self, values, out)
    }
}

crate::multiversion! {
    // `extend` over exact-size chunks writes each value once: no zero fill first
    fn decode_into(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
        match dtype {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            // bf16 is the top half of an f32: widening is a shift.
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)),
            ),
        }
    }
}

crate::multiversion! {
    fn encode_into(dtype: DType, values: &[f32], out: &mut [u8]) {
        match dtype {
            DType::F32 => out
                .chunks_exact_mut(4)
                .zip(values)
                .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
            DType::F16 => out
                .chunks_exact_mut(2)
                .zip(values)
                .for_each(|(o, v)| o.copy_from_slice(&f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => out
                .chunks_exact_mut(2)
                .zip(values)
                .for_each(|(o, v)| o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes())),
        }
    }
}

/// f32 → bf16 bits, rounding to nearest with ties to even; NaN stays a (quiet) NaN.
#[inline]
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    let rounding = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(rounding) >> 16) as u16
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// The index of the first NaN or infinity in `values`, if any. The common
/// case (none) is one vectorised pass with no branch per element.
pub fn first_non_finite(values: &[f32]) -> Option<usize> {
    let c = values.chunks(1 << 16).position(any_non_finite)?;
    values[c << 16..]
        .iter()
        .position(|v| !v.is_finite())
        .map(|i| (c << 16) + i)
}

crate::multiversion! {
    // all-ones exponent: ±inf or NaN (a test on the bits, so that it vectorises)
    fn any_non_finite(values: &[f32]) -> bool {
        values
            .iter()
            .fold(false, |bad, v| bad | (v.to_bits() & 0x7f80_0000 == 0x7f80_0000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_non_finite_finds_the_first() {
        let mut v = vec![1.0f32; 200_000];
        assert_eq!(first_non_finite(&v), None);
        v[150_001] = f32::INFINITY;
        v[199_999] = f32::NAN;
        assert_eq!(first_non_finite(&v), Some(150_001));
        v[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&v), Some(3));
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1+2^-7): ties go to even (1.0).
        let x = 1.0f32 + 2f32.powi(-8);
        assert_eq!(DType::BF16.decode(&DType::BF16.encode(&[x])), vec![1.0]);
        // 1 + 3*2^-8 lies between 1+2^-7 and 1+2^-6: ties go to the even one, 1+2^-6.
        let y = 1.0f32 + 3.0 * 2f32.powi(-8);
        assert_eq!(
            DType::BF16.decode(&DType::BF16.encode(&[y])),
            vec![1.0 + 2f32.powi(-6)]
        );
    }

    #[test]
    fn bf16_bit_conversions_agree_with_the_half_crate() {
        let mut rng = crate::rng::SplitMix64(11);
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.next_u64() as u32);
            let ours = f32_to_bf16_bits(x);
            let theirs = bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(bf16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{x:e}");
            }
        }
        let v = [1.5f32, -0.0, f32::INFINITY, 3.0e38, 1.0e-40];
        assert_eq!(
            DType::BF16.decode(&DType::BF16.encode(&v)),
            v.iter()
                .map(|x| bf16::from_f32(*x).to_f32())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn parse_names() {
        assert_eq!(DType::parse("bfloat16"), Some(DType::BF16));
        assert_eq!(DType::parse("torch.float16"), Some(DType::F16));
        assert_eq!(DType::parse("F32"), Some(DType::F32));
        assert_eq!(DType::parse("int8"), None);
    }
}
