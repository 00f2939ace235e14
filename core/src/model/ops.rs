//! Differentiable tensor ops for models, losses and trainers.
//!
//! candle 0.11's fused `rms_norm`, `rope` and `softmax_last_dim` have no
//! backward: used on a path that trains, they silently cut the autograd graph.
//! Everything here is written from ops that do have one, so a loss plugin or
//! the trainer can use it freely:
//! - `linear(x, W) = x · Wᵀ` for `W` `[out, in]`;
//! - `rms_norm(x, w) = x / sqrt(mean(x²) + ε) · w`;
//! - `softmax(x)ᵢ = exp(xᵢ − m) / Σⱼ exp(xⱼ − m)` and
//!   `log_softmax(x)ᵢ = xᵢ − m − log Σⱼ exp(xⱼ − m)`, with `m = max x` a constant
//!   (it cancels, so it needs no gradient);
//! - `cross_entropy(z, y) = −mean_n log_softmax(z_n)[y_n]`;
//! - RoPE in the `rotate_half` form: `x·cos + rotate_half(x)·sin`, with the
//!   angle of position `p` and pair `i` equal to `p · θ^(−2i/d)`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use fusechat_core::model::ops;
//! let z = Tensor::new(&[[0f32, 0.0], [2f32.ln(), 0.0]], &Device::Cpu).unwrap();
//! let y = Tensor::new(&[0u32, 0], &Device::Cpu).unwrap();
//! // −(ln ½ + ln ⅔) / 2
//! let ce = ops::cross_entropy(&z, &y).unwrap().to_scalar::<f32>().unwrap();
//! assert!((ce - 0.549_306_1).abs() < 1e-6);
//! ```

use candle_core::{DType, Device, Result, Tensor, D};

/// `x · Wᵀ` for a weight `W` of shape `[out, in]`. The leading dimensions of `x`
/// are flattened so that the whole batch is one GEMM.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&inner, lead)) = dims.split_last() else {
        candle_core::bail!("linear: x is a scalar")
    };
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    out[lead.len()] = w.dim(0)?;
    y.reshape(out)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    z.broadcast_sub(&lse)
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32):
/// `−mean(log_softmax(logits)[n, targets[n]])`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = targets.dim(0)?;
    log_softmax(logits)?
        .gather(&targets.reshape((n, 1))?, 1)?
        .mean_all()?
        .neg()
}

/// RoPE tables `cos`, `sin`, each `[T, d]`, for positions `past..past+T`:
/// column `k` holds the angle of pair `k mod d/2`.
pub fn rope_tables(
    theta: f64,
    head_dim: usize,
    past: usize,
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let d = head_dim;
    let half = d / 2;
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for p in past..past + t {
        for k in 0..d {
            let i = k % half;
            let freq = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (t, d), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, d), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary embedding of `x` `[B, H, T, d]` with tables `[T, d]` from [`rope_tables`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `[B, kv, T, d]` → `[B, kv·rep, T, d]`, each key/value head repeated `rep`
/// times (grouped-query attention).
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return x.contiguous();
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, t, d))?
        .contiguous()?
        .reshape((b, kv * rep, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn softmax_and_log_softmax_match_the_formula() {
        let x = [[1.0f32, 2.0, 3.0], [-1.0, 0.5, 100.0]];
        let t = Tensor::new(&x, &Device::Cpu).unwrap();
        let (s, ls) = (v2(&softmax(&t).unwrap()), v2(&log_softmax(&t).unwrap()));
        for (r, row) in x.iter().enumerate() {
            let m = row.iter().cloned().fold(f64::MIN, |a, b| a.max(b as f64));
            let z: f64 = row.iter().map(|v| (*v as f64 - m).exp()).sum();
            for (i, v) in row.iter().enumerate() {
                let p = (*v as f64 - m).exp() / z;
                assert!((s[r][i] as f64 - p).abs() < 1e-6);
                assert!((ls[r][i] as f64 - p.ln()).abs() < 1e-4, "{r} {i}");
            }
        }
    }

    #[test]
    fn rms_norm_matches_the_formula() {
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let y = v2(&rms_norm(&x, &w, 0.0).unwrap());
        let r = (12.5f32).sqrt();
        assert!((y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_by_position_times_frequency() {
        // d = 4: pairs (x0, x2) at frequency 1 and (x1, x3) at θ^(−1/2)
        let (cos, sin) = rope_tables(100.0, 4, 3, 1, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y: Vec<f32> = rope(&x, &cos, &sin)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (a0, a1) = (3.0f64, 3.0f64 * 100f64.powf(-0.5));
        let want = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }
}
