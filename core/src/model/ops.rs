//! Differentiable tensor ops for models, losses and trainers.
//!
//! candle 0.11's fused `rms_norm`, `rope` and `softmax_last_dim` have no
//! backward: used on a path that trains, they silently cut the autograd graph.
//! Everything here has a backward (our own CPU kernels for RMSNorm, softmax,
//! softmax with an attention bias, RoPE, SiLU·mul and the sparse
//! cross-entropies; candle's ops elsewhere), so a loss plugin or the trainer
//! can use it freely:
//! - `linear(x, W) = x · Wᵀ` for `W` `[out, in]`;
//! - `rms_norm(x, w) = x / sqrt(mean(x²) + ε) · w`;
//! - `softmax(x)ᵢ = exp(xᵢ − m) / Σⱼ exp(xⱼ − m)` and
//!   `log_softmax(x)ᵢ = xᵢ − m − log Σⱼ exp(xⱼ − m)`, with `m = max x` a constant
//!   (it cancels, so it needs no gradient);
//! - `cross_entropy(z, y) = −mean_n log_softmax(z_n)[y_n]`;
//! - `silu_mul(a, b) = a·σ(a) ⊙ b`, the gate of a SiLU-gated MLP;
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
    let x2 = x.reshape((rows, inner))?;
    let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
    // Our gemm call when nothing needs a gradient (training keeps candle's
    // matmul: its backward measured faster than a custom one here).
    let inference = !x.track_op() && !w.track_op();
    let y = if inference
        && cfg!(not(feature = "mkl"))
        && x.device().is_cpu()
        && f32s
        && w.rank() == 2
    {
        x2.contiguous()?.apply_op2(&w.contiguous()?, LinearOp)?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out = dims.to_vec();
    out[lead.len()] = w.dim(0)?;
    y.reshape(out)
}

/// `y = x · Wᵀ` for contiguous `x` `[rows, in]` and `W` `[out, in]` on the
/// CPU, at inference (no backward): gemm straight into an uninitialised
/// output (candle's matmul zero-fills its output first, one more pass over it).
struct LinearOp;

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, w) = (cpu_slice(xs, xl)?, cpu_slice(ws, wl)?);
        let (rows, inner) = xl.shape().dims2()?;
        let (out, w_inner) = wl.shape().dims2()?;
        if inner != w_inner {
            candle_core::bail!("linear: x [{rows}, {inner}] against W [{out}, {w_inner}]")
        }
        let n = rows * out;
        let mut y: Vec<f32> = Vec::with_capacity(n);
        let threads = candle_core::utils::get_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the pointers cover [rows, inner], [out, inner] and [rows,
        // out] with the strides given; with read_dst = false gemm writes every
        // element of y without reading it, so y is initialised after the call.
        unsafe {
            gemm::gemm(
                rows,
                out,
                inner,
                y.as_mut_ptr(),
                1,
                out as isize,
                false,
                x.as_ptr(),
                1,
                inner as isize,
                w.as_ptr(),
                inner as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
            y.set_len(n);
        }
        Ok((candle_core::CpuStorage::F32(y), (rows, out).into()))
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`. On the
/// CPU in f32 one fused kernel with its own backward (`r = 1/sqrt(mean(x²)+ε)`,
/// `∂/∂x = r·(g⊙w) − x·r³·mean((g⊙w)⊙x)`, `∂/∂w = Σ_rows g⊙x·r`);
/// elsewhere the same from candle's ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, RmsNormOp { eps });
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dimension. On the CPU in f32 one fused kernel with
/// its own backward (`∂/∂x = y ⊙ (g − Σ g⊙y)`); elsewhere candle's ops.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(SoftmaxOp);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The output buffer of a kernel that writes each of its `n` elements before
/// anything reads them: not zero-filled first (a pass over memory saved).
fn output(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; f32 has no invalid bit patterns, and every
    // caller overwrites all n elements before the vector is read (candle's
    // own CPU kernels allocate their outputs the same way).
    unsafe { v.set_len(n) };
    v
}

/// The f32 contents of a contiguous CPU storage.
fn cpu_slice<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&s.as_slice::<f32>()?[a..b])
}

struct SoftmaxOp;

impl candle_core::CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = cpu_slice(s, l)?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut y = output(x.len());
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let max = x.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
            let sum = crate::simd::exp_shifted_f32(x, max, y);
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((candle_core::CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?,
        ))
    }
}

/// `y ⊙ (g − Σ g⊙y)` per row, from the softmax output `y` and the gradient `g`.
struct SoftmaxBwd;

impl candle_core::CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-last-dim-backward"
    }
    fn cpu_fwd(
        &self,
        ys: &candle_core::CpuStorage,
        yl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (y, g) = (cpu_slice(ys, yl)?, cpu_slice(gs, gl)?);
        let d = yl.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = output(y.len());
        dx.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((o, y), g) in dx.iter_mut().zip(y).zip(g) {
                    *o = y * (g - dot);
                }
            });
        Ok((candle_core::CpuStorage::F32(dx), yl.shape().clone()))
    }
}

struct RmsNormOp {
    eps: f64,
}

impl candle_core::CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, w) = (cpu_slice(xs, xl)?, cpu_slice(ws, wl)?);
        let d = w.len().max(1);
        if xl.dims().last() != Some(&w.len()) {
            candle_core::bail!(
                "rms_norm: x {:?} against a weight of {}",
                xl.dims(),
                w.len()
            )
        }
        let eps = self.eps as f32;
        let mut y = output(x.len());
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, v), w) in y.iter_mut().zip(x).zip(w) {
                *o = v * r * w;
            }
        });
        Ok((candle_core::CpuStorage::F32(y), xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let d = w.elem_count().max(1);
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let eps = self.eps as f32;
        let mut dx = vec![0f32; xv.len()];
        // per row: dx, and the row's contribution g⊙x·r to dw
        let dw_rows: Vec<Vec<f32>> = dx
            .par_chunks_mut(d)
            .zip(xv.par_chunks(d).zip(gv.par_chunks(d)))
            .map(|(dx, (x, g))| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                let s: f32 = x
                    .iter()
                    .zip(g)
                    .zip(&wv)
                    .map(|((x, g), w)| g * w * x)
                    .sum::<f32>()
                    / d as f32;
                let r3 = r * r * r;
                for (((o, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(&wv) {
                    *o = r * g * w - x * r3 * s;
                }
                x.iter().zip(g).map(|(x, g)| g * x * r).collect()
            })
            .collect();
        let mut dw = vec![0f32; d];
        for row in &dw_rows {
            dw.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

/// `silu(a) ⊙ b`, with `silu(a) = a·σ(a)`: the gate of a SiLU-gated MLP. On
/// the CPU in f32 one fused kernel (vectorised exponential) with its own
/// backward: `∂/∂a = g ⊙ b ⊙ σ(a)·(1 + a·(1 − σ(a)))`, `∂/∂b = g ⊙ silu(a)`;
/// elsewhere candle's ops.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32 {
        if a.shape() != b.shape() {
            candle_core::bail!(
                "silu_mul: shapes {:?} and {:?} differ",
                a.shape(),
                b.shape()
            )
        }
        return a.contiguous()?.apply_op2(&b.contiguous()?, SiluMulOp);
    }
    a.silu()? * b
}

/// `silu(a) ⊙ b` for `y = [a | b]` split in halves along the last dimension:
/// the gate and up projections computed as one product. On the CPU in f32 one
/// kernel that reads the halves in place, with the backward of [`silu_mul`].
pub fn silu_mul_halves(y: &Tensor) -> Result<Tensor> {
    let two = y.dim(D::Minus1)?;
    if two % 2 != 0 {
        candle_core::bail!("silu_mul_halves: last dimension {two} is odd")
    }
    if y.device().is_cpu() && y.dtype() == DType::F32 {
        return y.contiguous()?.apply_op1(SiluMulHalvesOp);
    }
    let half = two / 2;
    silu_mul(
        &y.narrow(D::Minus1, 0, half)?,
        &y.narrow(D::Minus1, half, half)?,
    )
}

struct SiluMulHalvesOp;

impl candle_core::CustomOp1 for SiluMulHalvesOp {
    fn name(&self) -> &'static str {
        "silu-mul-halves"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let y = cpu_slice(s, l)?;
        let two = l.dims().last().copied().unwrap_or(0).max(2);
        let half = two / 2;
        let mut out = output(y.len() / 2);
        out.par_chunks_mut(half)
            .zip(y.par_chunks(two))
            .for_each(|(o, row)| {
                let (a, b) = row.split_at(half);
                crate::simd::silu_mul_f32(a, b, o)
            });
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        Ok((candle_core::CpuStorage::F32(out), dims.into()))
    }
    fn bwd(&self, y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let half = y.dim(D::Minus1)? / 2;
        let a = y.narrow(D::Minus1, 0, half)?.contiguous()?;
        let b = y.narrow(D::Minus1, half, half)?.contiguous()?;
        let (da, db) = silu_mul_grads(&a, &b, grad)?;
        Ok(Some(Tensor::cat(&[da, db], D::Minus1)?))
    }
}

/// Elements per parallel task of the elementwise kernels.
const CHUNK: usize = 1 << 14;

struct SiluMulOp;

impl candle_core::CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "silu-mul"
    }
    fn cpu_fwd(
        &self,
        as_: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (a, b) = (cpu_slice(as_, al)?, cpu_slice(bs, bl)?);
        let mut y = output(a.len());
        y.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(y, (a, b))| crate::simd::silu_mul_f32(a, b, y));
        Ok((candle_core::CpuStorage::F32(y), al.shape().clone()))
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = silu_mul_grads(a, b, grad)?;
        Ok((Some(da), Some(db)))
    }
}

/// The gradients of `silu(a) ⊙ b` with respect to contiguous `a` and `b`
/// under `grad`, from one pass (stacked as `[2, n]`, then split).
fn silu_mul_grads(a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = a.apply_op3_no_bwd(b, &grad.contiguous()?, &SiluMulBwd)?;
    let n = a.elem_count();
    let da = both.narrow(0, 0, n)?.reshape(a.shape())?;
    let db = both.narrow(0, n, n)?.reshape(b.shape())?;
    Ok((da, db))
}

/// `[∂/∂a, ∂/∂b]` of `silu(a) ⊙ b` under the upstream gradient `g`, flat.
struct SiluMulBwd;

impl candle_core::CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "silu-mul-backward"
    }
    fn cpu_fwd(
        &self,
        as_: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (a, b, g) = (cpu_slice(as_, al)?, cpu_slice(bs, bl)?, cpu_slice(gs, gl)?);
        let n = a.len();
        let mut out = output(2 * n);
        let (da, db) = out.split_at_mut(n);
        da.par_chunks_mut(CHUNK)
            .zip(db.par_chunks_mut(CHUNK))
            .zip(
                a.par_chunks(CHUNK)
                    .zip(b.par_chunks(CHUNK))
                    .zip(g.par_chunks(CHUNK)),
            )
            .for_each(|((da, db), ((a, b), g))| crate::simd::silu_mul_bwd_f32(a, b, g, da, db));
        Ok((candle_core::CpuStorage::F32(out), (2 * n,).into()))
    }
}

/// `softmax(x + bias)` over the last dimension, for attention scores `x`
/// `[B, H, T, S]` and an additive mask `bias` `[B, 1, T, S]` shared by the
/// heads (no gradient flows to it). On the CPU in f32 one fused kernel with
/// the backward of softmax; elsewhere candle's ops.
pub fn softmax_with_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, t, s) = x.dims4()?;
    if bias.dims() != [b, 1, t, s] {
        candle_core::bail!(
            "softmax_with_bias: bias {:?} for scores {:?}",
            bias.dims(),
            x.dims()
        )
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        return x.contiguous()?.apply_op2(
            &bias.detach().contiguous()?,
            SoftmaxBiasOp { heads: h, t, s },
        );
    }
    softmax(&x.broadcast_add(&bias.detach())?)
}

struct SoftmaxBiasOp {
    heads: usize,
    t: usize,
    s: usize,
}

impl candle_core::CustomOp2 for SoftmaxBiasOp {
    fn name(&self) -> &'static str {
        "softmax-with-bias"
    }
    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, bias) = (cpu_slice(xs, xl)?, cpu_slice(bs, bl)?);
        let (h, t, s) = (self.heads, self.t, self.s.max(1));
        let mut y = output(x.len());
        y.par_chunks_mut(s)
            .zip(x.par_chunks(s))
            .enumerate()
            .for_each(|(r, (y, x))| {
                // row r = ((batch·H + head)·T + query)
                let (batch, query) = (r / (h * t), r % t);
                let off = (batch * t + query) * s;
                crate::simd::softmax_with_bias_f32(x, &bias[off..off + s], y);
            });
        Ok((candle_core::CpuStorage::F32(y), xl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?;
        Ok((Some(dx), None))
    }
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
    rope_scaled(x, cos, sin, 1.0)
}

/// `scale · rope(x)`: attention folds its `1/√d` into the queries' rotation.
/// On the CPU in f32 one kernel that reads `x` through its strides (a
/// transposed projection needs no copy) and writes it contiguous; its
/// backward is the rotation by the opposite angle, times `scale`.
pub fn rope_scaled(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: f64) -> Result<Tensor> {
    let kernel = match *x.dims() {
        [_, _, t, d] => cos.dims() == [t, d] && sin.dims() == [t, d] && d % 2 == 0,
        _ => false,
    };
    let f32s = [x, cos, sin].iter().all(|t| t.dtype() == DType::F32);
    if kernel && x.device().is_cpu() && f32s && x.stride()[3] == 1 {
        let op = RopeOp {
            scale: scale as f32,
            inverse: false,
        };
        return x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op);
    }
    // any rank, the tables broadcast over the leading dimensions
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let y = (x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    if scale == 1.0 {
        Ok(y)
    } else {
        y * scale
    }
}

/// `scale · R(±θ) x` per pair `(k, k + d/2)`; `inverse` rotates by −θ (the
/// backward of the forward rotation).
struct RopeOp {
    scale: f32,
    inverse: bool,
}

impl candle_core::CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        cs: &candle_core::CpuStorage,
        cl: &candle_core::Layout,
        ss: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = xs.as_slice::<f32>()?;
        let (cos, sin) = (cpu_slice(cs, cl)?, cpu_slice(ss, sl)?);
        let (dims, st, base) = (xl.dims(), xl.stride(), xl.start_offset());
        let (h, t, d) = (dims[1], dims[2], dims[3]);
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let scale = self.scale;
        let mut y = output(xl.shape().elem_count());
        y.par_chunks_mut(d).enumerate().for_each(|(r, y)| {
            let (bi, hi, ti) = (r / (h * t), (r / t) % h, r % t);
            let start = base + bi * st[0] + hi * st[1] + ti * st[2];
            let x = &x[start..start + d];
            let (c, s) = (&cos[ti * d..ti * d + half], &sin[ti * d..ti * d + half]);
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for k in 0..half {
                let sn = sign * s[k];
                y1[k] = scale * (x1[k] * c[k] - x2[k] * sn);
                y2[k] = scale * (x2[k] * c[k] + x1[k] * sn);
            }
        });
        Ok((candle_core::CpuStorage::F32(y), xl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = RopeOp {
            scale: self.scale,
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

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

    fn sparse_case() -> (Tensor, SparseTargets) {
        let z = Tensor::new(
            &[
                [0.3f32, -1.2, 2.0, 0.5, -0.7],
                [1.0, 1.0, -3.0, 0.2, 4.0],
                [-2.0, 0.0, 0.1, 0.0, 0.4],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let t = SparseTargets::new(
            3,
            vec![2, 0, 4, 4, 1, 1, 3, 0, 0],
            vec![0.6, 0.3, 0.0, 0.9, 0.05, 0.05, 1.0, 0.0, 0.0],
        );
        (z, t)
    }

    /// The same value as a dense computation: −Σ_v w_v log_softmax(z)_v.
    #[test]
    fn sparse_cross_entropy_equals_the_dense_formula() {
        let (z, t) = sparse_case();
        let got: Vec<f32> = sparse_cross_entropy(&z, t.clone())
            .unwrap()
            .to_vec1()
            .unwrap();
        let rows = v2(&z);
        for (r, row) in rows.iter().enumerate() {
            let m = row.iter().cloned().fold(f64::MIN, |a, b| a.max(b as f64));
            let lse = m + row.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln();
            let mut dense = vec![0f64; row.len()];
            for j in 0..t.m {
                dense[t.ids.get(r * t.m + j)] += t.weights[r * t.m + j] as f64;
            }
            let want: f64 = dense
                .iter()
                .zip(row)
                .map(|(w, x)| -w * (*x as f64 - lse))
                .sum();
            assert!(
                (got[r] as f64 - want).abs() < 1e-5,
                "row {r}: {} vs {want}",
                got[r]
            );
        }
    }

    /// Several target sets in one call: each column equals its own call, and
    /// the one gradient equals the sum of the separate ones.
    #[test]
    fn sparse_cross_entropies_equal_separate_calls() {
        let (z, t) = sparse_case();
        let lm = SparseTargets::one_hot(&[4, 0, 2]);
        let var = candle_core::Var::from_tensor(&z).unwrap();
        let both = sparse_cross_entropies(var.as_tensor(), vec![lm.clone(), t.clone()]).unwrap();
        assert_eq!(both.dims(), &[3, 2]);
        let cols = v2(&both);
        let one = |t: &SparseTargets| -> Vec<f32> {
            sparse_cross_entropy(&z, t.clone())
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for (r, row) in cols.iter().enumerate() {
            assert_eq!(row[0], one(&lm)[r]);
            assert_eq!(row[1], one(&t)[r]);
        }
        // loss = Σ 0.9·lm + 0.1·t, in one op and as two
        let w = Tensor::new(&[[0.9f32, 0.1]], &Device::Cpu).unwrap();
        let fused = both.broadcast_mul(&w).unwrap().sum_all().unwrap();
        let g1 = fused.backward().unwrap();
        let apart = ((sparse_cross_entropy(var.as_tensor(), lm).unwrap() * 0.9).unwrap()
            + (sparse_cross_entropy(var.as_tensor(), t).unwrap() * 0.1).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
        let g2 = apart.backward().unwrap();
        let (a, b) = (
            v2(g1.get(var.as_tensor()).unwrap()),
            v2(g2.get(var.as_tensor()).unwrap()),
        );
        for (ra, rb) in a.iter().zip(&b) {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
            }
        }
    }

    /// Ids are kept in u16 while they fit, in u32 beyond, with the same value.
    #[test]
    fn target_ids_narrow_only_when_they_fit() {
        assert!(matches!(
            TargetIds::from_u32(vec![0, 65535]),
            TargetIds::U16(_)
        ));
        assert!(matches!(
            TargetIds::from_u32(vec![0, 65536]),
            TargetIds::U32(_)
        ));
        assert!(matches!(TargetIds::zeros(3, 65536), TargetIds::U16(_)));
        assert!(matches!(TargetIds::zeros(3, 65537), TargetIds::U32(_)));
        assert_eq!(
            SparseTargets::new(2, vec![1, 2], vec![0.5, 0.5]).bytes(),
            2 * 2 + 2 * 4
        );
        let v = 70_000;
        let mut row = vec![0f32; v];
        row[69_999] = 3.0;
        row[7] = 1.0;
        let z = Tensor::from_vec(row.clone(), (1, v), &Device::Cpu).unwrap();
        let t = SparseTargets::new(2, vec![69_999, 7], vec![0.25, 0.75]);
        assert!(matches!(t.ids, TargetIds::U32(_)));
        let got: Vec<f32> = sparse_cross_entropy(&z, t).unwrap().to_vec1().unwrap();
        let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
        let want = 0.25 * (lse - 3.0) + 0.75 * (lse - 1.0);
        assert!((got[0] as f64 - want).abs() < 1e-5, "{} vs {want}", got[0]);
    }

    /// The gradient agrees with central finite differences of the value.
    #[test]
    fn sparse_cross_entropy_gradient_matches_finite_differences() {
        let (z, t) = sparse_case();
        let var = candle_core::Var::from_tensor(&z).unwrap();
        // a non-uniform upstream gradient: loss = Σ_n c_n · ce_n
        let c = Tensor::new(&[1.0f32, -0.5, 2.0], &Device::Cpu).unwrap();
        let loss = (sparse_cross_entropy(var.as_tensor(), t.clone()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let grad = v2(g.get(var.as_tensor()).unwrap());
        let value = |zz: &Vec<Vec<f32>>| -> f64 {
            let zt = Tensor::new(zz.clone(), &Device::Cpu).unwrap();
            let l: Vec<f32> = sparse_cross_entropy(&zt, t.clone())
                .unwrap()
                .to_vec1()
                .unwrap();
            l.iter()
                .zip([1.0, -0.5, 2.0])
                .map(|(a, b)| *a as f64 * b)
                .sum()
        };
        let base = v2(&z);
        let h = 1e-2f32;
        for r in 0..base.len() {
            for v in 0..base[0].len() {
                let (mut up, mut down) = (base.clone(), base.clone());
                up[r][v] += h;
                down[r][v] -= h;
                let fd = (value(&up) - value(&down)) / (2.0 * h as f64);
                assert!(
                    (grad[r][v] as f64 - fd).abs() < 2e-3,
                    "[{r}][{v}]: {} vs {fd}",
                    grad[r][v]
                );
            }
        }
        // and the generic (non-CPU-kernel) formula gives the same gradient
        let ids = Tensor::from_vec(t.ids.to_u32(), (3, t.m), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(t.weights.clone(), (3, t.m), &Device::Cpu).unwrap();
        let generic = (log_softmax(var.as_tensor())
            .unwrap()
            .gather(&ids, 1)
            .unwrap()
            * w)
            .unwrap()
            .sum(1)
            .unwrap()
            .neg()
            .unwrap();
        let g2 = (generic * &c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad2 = v2(g2.get(var.as_tensor()).unwrap());
        for (a, b) in grad.iter().flatten().zip(grad2.iter().flatten()) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// The fused CPU softmax and RMSNorm give the values and gradients of the
    /// same formulas written from candle's own differentiable ops.
    #[test]
    fn fused_softmax_and_rms_norm_match_the_composite_forms() {
        let dev = &Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::new(
                &[
                    [0.3f32, -1.2, 2.0, 0.5],
                    [1.0, 1.0, -3.0, 0.2],
                    [-2.0, 0.0, 0.1, 0.4],
                ],
                dev,
            )
            .unwrap(),
        )
        .unwrap();
        let w =
            candle_core::Var::from_tensor(&Tensor::new(&[1.5f32, -0.5, 0.8, 1.1], dev).unwrap())
                .unwrap();
        let c = Tensor::new(
            &[
                [1.0f32, -2.0, 0.5, 3.0],
                [0.1, 0.2, -0.3, 0.4],
                [2.0, 1.0, 0.0, -1.0],
            ],
            dev,
        )
        .unwrap();
        let composite_softmax = |x: &Tensor| {
            let max = x.max_keepdim(D::Minus1).unwrap().detach();
            let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
        };
        let composite_norm = |x: &Tensor, w: &Tensor| {
            let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            x.broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(w)
                .unwrap()
        };
        let check = |a: &Tensor, b: &Tensor| {
            let (a, b) = (v2(a), v2(b));
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        };
        let (fs, cs) = (
            softmax(x.as_tensor()).unwrap(),
            composite_softmax(x.as_tensor()),
        );
        check(&fs, &cs);
        let g1 = (fs * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (cs * &c).unwrap().sum_all().unwrap().backward().unwrap();
        check(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let fr = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let cr = composite_norm(x.as_tensor(), w.as_tensor());
        check(&fr, &cr);
        let g1 = (fr * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (cr * &c).unwrap().sum_all().unwrap().backward().unwrap();
        check(
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let (a, b) = (
            g1.get(w.as_tensor()).unwrap(),
            g2.get(w.as_tensor()).unwrap(),
        );
        check(&a.unsqueeze(0).unwrap(), &b.unsqueeze(0).unwrap());
    }

    /// Deterministic values in [−3, 3).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            })
            .collect()
    }

    fn var(dims: &[usize], seed: u64) -> candle_core::Var {
        let n = dims.iter().product();
        candle_core::Var::from_tensor(
            &Tensor::from_vec(values(n, seed), dims, &Device::Cpu).unwrap(),
        )
        .unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "element {i}: {x} vs {y}"
            );
        }
    }

    /// Values and gradients (under a random upstream gradient `c`) of a fused
    /// kernel against the same function written from candle's basic ops.
    fn check_against_composite(
        vars: &[&candle_core::Var],
        fused: impl Fn() -> Tensor,
        composite: impl Fn() -> Tensor,
    ) {
        let (f, c) = (fused(), composite());
        assert_close(&f, &c, 1e-5);
        let up = Tensor::from_vec(values(f.elem_count(), 99), f.dims(), &Device::Cpu).unwrap();
        let gf = (f * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in vars {
            assert_close(
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn fused_silu_mul_matches_the_formula_and_its_gradient() {
        // magnitudes up to 75, where e^−a is 10^±32 (the composite's own
        // gradient turns NaN once e^−a overflows, ours stays finite: below)
        let (a, b) = (var(&[3, 37], 1), var(&[3, 37], 2));
        a.set(&(a.as_tensor() * 25.0).unwrap()).unwrap();
        check_against_composite(
            &[&a, &b],
            || silu_mul(a.as_tensor(), b.as_tensor()).unwrap(),
            || {
                let a = a.as_tensor();
                let sig = (a.neg().unwrap().exp().unwrap() + 1.0)
                    .unwrap()
                    .recip()
                    .unwrap();
                ((a * sig).unwrap() * b.as_tensor()).unwrap()
            },
        );
        let a = candle_core::Var::new(&[-200f32, -90.0, 90.0, 200.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[2f32; 4], &Device::Cpu).unwrap();
        let y = silu_mul(a.as_tensor(), &b).unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), [0.0, 0.0, 180.0, 400.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        let da: Vec<f32> = g.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(da, [0.0, 0.0, 2.0, 2.0], "σ'(a) vanishes in the tails");
    }

    #[test]
    fn linear_matches_the_matmul_and_its_gradients() {
        // a 3-D input and a weight that is a view into a larger stack, as the
        // stacked projections are; as variables (candle's matmul and its
        // backward), then as plain tensors (our gemm call, inference)
        let (x, stack) = (var(&[2, 5, 7], 6), var(&[9, 7], 7));
        let w = || stack.as_tensor().narrow(0, 3, 4).unwrap();
        check_against_composite(
            &[&x, &stack],
            || linear(x.as_tensor(), &w()).unwrap(),
            || x.as_tensor().broadcast_matmul(&w().t().unwrap()).unwrap(),
        );
        // one element written out: y[1, 2, 3] = Σ_i x[1, 2, i] · W[3, i]
        let (xv, wv): (Vec<f32>, Vec<f32>) = (
            x.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            w().flatten_all().unwrap().to_vec1().unwrap(),
        );
        let want: f32 = (0..7).map(|i| xv[(5 + 2) * 7 + i] * wv[3 * 7 + i]).sum();
        let (xp, wp) = (x.as_tensor().detach(), w().detach());
        assert!(!xp.track_op() && !wp.track_op());
        let y = linear(&xp, &wp).unwrap();
        let got = y.i((1, 2, 3)).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert_close(&y, &xp.broadcast_matmul(&wp.t().unwrap()).unwrap(), 1e-6);
    }

    #[test]
    fn silu_mul_on_halves_equals_silu_mul_of_the_halves() {
        let y = var(&[2, 3, 10], 5);
        check_against_composite(
            &[&y],
            || silu_mul_halves(y.as_tensor()).unwrap(),
            || {
                let (a, b) = (
                    y.as_tensor().narrow(2, 0, 5).unwrap(),
                    y.as_tensor().narrow(2, 5, 5).unwrap(),
                );
                let sig = (a.neg().unwrap().exp().unwrap() + 1.0)
                    .unwrap()
                    .recip()
                    .unwrap();
                ((a * sig).unwrap() * b).unwrap()
            },
        );
    }

    #[test]
    fn fused_softmax_with_bias_matches_the_formula_and_its_gradient() {
        let x = var(&[2, 3, 5, 11], 3);
        // a causal-style mask, different per batch row, shared by the heads
        let bias: Vec<f32> = (0..2 * 5 * 11)
            .map(|i| {
                let (b, q, k) = (i / 55, (i / 11) % 5, i % 11);
                if k > q + 6 || (b == 1 && k == 0) {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (2, 1, 5, 11), &Device::Cpu).unwrap();
        // narrowed as attention's query blocks narrow it (an offset, strided)
        let wide = Tensor::cat(&[&bias, &bias], 3).unwrap();
        let bias = wide.narrow(3, 11, 11).unwrap();
        check_against_composite(
            &[&x],
            || softmax_with_bias(x.as_tensor(), &bias).unwrap(),
            || {
                let z = x.as_tensor().broadcast_add(&bias).unwrap();
                let e = z
                    .broadcast_sub(&z.max_keepdim(D::Minus1).unwrap().detach())
                    .unwrap()
                    .exp()
                    .unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            },
        );
        // masked keys get exactly nothing
        let y = softmax_with_bias(x.as_tensor(), &bias)
            .unwrap()
            .i((1, 2, 0, 0))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(y, 0.0);
        // a row with every key masked is uniform, as the composite gives
        let all = Tensor::full(-1e9f32, (1, 1, 1, 4), &Device::Cpu).unwrap();
        let x = Tensor::new(&[[[[0.5f32, -2.0, 1.0, 3.0]]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = softmax_with_bias(&x, &all)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(y, [0.25; 4]);
    }

    #[test]
    fn fused_rope_on_a_transposed_input_matches_the_rotate_half_form() {
        // [B, T, W, d], heads 2..5 of W = 6 (an offset and a row stride of
        // W·d), transposed to [B, H, T, d]: the stacked q/k/v projections' layout
        let x = var(&[2, 4, 6, 8], 4);
        let xt = || {
            x.as_tensor()
                .narrow(2, 2, 3)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let (cos, sin) = rope_tables(10_000.0, 8, 5, 4, DType::F32, &Device::Cpu).unwrap();
        check_against_composite(
            &[&x],
            || rope_scaled(&xt(), &cos, &sin, 0.5).unwrap(),
            || {
                let x = xt();
                let x1 = x.narrow(D::Minus1, 0, 4).unwrap();
                let x2 = x.narrow(D::Minus1, 4, 4).unwrap();
                let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                let y =
                    (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap();
                (y * 0.5).unwrap()
            },
        );
    }
}

/// The token ids of sparse targets: u16 when every id fits (vocabularies of
/// at most 65 536 tokens, as Llama 2's, Mistral's and OpenChat's), else u32.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetIds {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

impl TargetIds {
    /// `len` zero ids, narrow enough for ids below `vocab`.
    pub fn zeros(len: usize, vocab: usize) -> TargetIds {
        if vocab <= 1 << 16 {
            TargetIds::U16(vec![0; len])
        } else {
            TargetIds::U32(vec![0; len])
        }
    }

    /// The ids, in u16 when they all fit.
    pub fn from_u32(ids: Vec<u32>) -> TargetIds {
        if ids.iter().all(|&i| i <= u16::MAX as u32) {
            TargetIds::U16(ids.iter().map(|&i| i as u16).collect())
        } else {
            TargetIds::U32(ids)
        }
    }

    #[inline]
    pub fn get(&self, i: usize) -> usize {
        match self {
            TargetIds::U16(v) => v[i] as usize,
            TargetIds::U32(v) => v[i] as usize,
        }
    }

    /// Sets entry `i`; the id must fit (see [`TargetIds::zeros`]).
    #[inline]
    pub fn set(&mut self, i: usize, id: u32) {
        match self {
            TargetIds::U16(v) => v[i] = id as u16,
            TargetIds::U32(v) => v[i] = id,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TargetIds::U16(v) => v.len(),
            TargetIds::U32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_u32(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.get(i) as u32).collect()
    }

    /// The bytes the ids take.
    pub fn bytes(&self) -> usize {
        match self {
            TargetIds::U16(v) => v.len() * 2,
            TargetIds::U32(v) => v.len() * 4,
        }
    }
}

/// Sparse target distributions, `m` entries per row: row `n` puts weight
/// `weights[n·m + j]` on token `ids[n·m + j]` (weights need not sum to 1;
/// a zero weight is an unused entry).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTargets {
    pub m: usize,
    pub ids: TargetIds,
    pub weights: Vec<f32>,
}

impl SparseTargets {
    pub fn new(m: usize, ids: Vec<u32>, weights: Vec<f32>) -> SparseTargets {
        SparseTargets {
            m,
            ids: TargetIds::from_u32(ids),
            weights,
        }
    }

    /// One-hot on `labels`: the causal-LM targets.
    pub fn one_hot(labels: &[u32]) -> SparseTargets {
        SparseTargets::new(1, labels.to_vec(), vec![1.0; labels.len()])
    }

    pub fn rows(&self) -> usize {
        self.ids.len() / self.m.max(1)
    }

    /// The bytes the targets take (ids and weights).
    pub fn bytes(&self) -> usize {
        self.ids.bytes() + self.weights.len() * 4
    }
}

/// Per-row cross-entropy of `logits` `[N, V]` against sparse targets:
/// `loss_n = −Σ_j w_nj · log_softmax(z_n)[id_nj] = W_n · lse(z_n) − Σ_j w_nj z_n,id_nj`,
/// returned as `[N]` (f32), with `W_n = Σ_j w_nj`. Its gradient,
/// `∂loss_n/∂z_nv = W_n · softmax(z_n)_v − Σ_{j: id_nj = v} w_nj`, is computed
/// directly on the CPU (one pass over the logits; no dense target is ever
/// built); elsewhere the same value comes from differentiable candle ops.
/// The targets move into the graph (kept for the backward pass), uncopied.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fusechat_core::model::ops::{sparse_cross_entropy, SparseTargets};
/// let z = Tensor::new(&[[0f32, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
/// // half the weight on token 1, half on token 2: −log(1/4) = 1.386…
/// let t = SparseTargets::new(2, vec![1, 2], vec![0.5, 0.5]);
/// let l: Vec<f32> = sparse_cross_entropy(&z, t).unwrap().to_vec1().unwrap();
/// assert!((l[0] - 4f32.ln()).abs() < 1e-6);
/// ```
pub fn sparse_cross_entropy(logits: &Tensor, targets: SparseTargets) -> Result<Tensor> {
    sparse_cross_entropies(logits, vec![targets])?.squeeze(1)
}

/// [`sparse_cross_entropy`] against several target sets at once, `[N, G]`:
/// column g is the loss against `groups[g]`. The log-sum-exp of the logits is
/// computed once for all of them, and the backward pass writes one gradient,
/// `Σ_g ĝ_ng · (W_ng · softmax(z_n) − w_ng)`, in one pass over the logits,
/// where separate calls would each make a `[N, V]` gradient to be added. A
/// loss that mixes the causal-LM term and a teacher term uses this.
pub fn sparse_cross_entropies(logits: &Tensor, groups: Vec<SparseTargets>) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    for t in &groups {
        if t.rows() != n || t.ids.len() != t.weights.len() {
            candle_core::bail!(
                "sparse_cross_entropy: {} target rows of {} for {n} logit rows",
                t.rows(),
                t.m
            )
        }
        if let Some(id) = (0..t.ids.len()).map(|i| t.ids.get(i)).find(|&i| i >= v) {
            candle_core::bail!(
                "sparse_cross_entropy: target id {id} is outside the vocabulary of {v}"
            )
        }
    }
    let logits = logits.to_dtype(DType::F32)?;
    if logits.device().is_cpu() {
        logits.contiguous()?.apply_op1(SparseCe {
            groups: std::sync::Arc::new(groups),
            lse: std::sync::Mutex::new(Vec::new()),
        })
    } else {
        let dev = logits.device();
        let logp = log_softmax(&logits)?;
        let cols = groups
            .iter()
            .map(|t| {
                let ids = Tensor::from_vec(t.ids.to_u32(), (n, t.m), dev)?;
                let w = Tensor::from_vec(t.weights.clone(), (n, t.m), dev)?;
                (logp.gather(&ids, 1)? * w)?.sum_keepdim(1)?.neg()
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&cols, 1)
    }
}

/// The CPU kernel of [`sparse_cross_entropies`]; the forward pass keeps each
/// row's log-sum-exp for the backward pass.
struct SparseCe {
    groups: std::sync::Arc<Vec<SparseTargets>>,
    lse: std::sync::Mutex<Vec<f64>>,
}

/// A row's `log Σ exp(z)`: the exponentials (shifted by the max) and their sum in f64.
fn row_lse(z: &[f32]) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    if max == f32::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max as f64 + crate::simd::sum_exp_shifted_f64(z, max as f64).ln()
}

impl candle_core::CustomOp1 for SparseCe {
    fn name(&self) -> &'static str {
        "sparse-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("sparse-cross-entropy: non-contiguous logits".into())
        })?;
        let z = &storage.as_slice::<f32>()?[start..end];
        let (n, v) = layout.shape().dims2()?;
        let lse: Vec<f64> = (0..n)
            .into_par_iter()
            .map(|r| row_lse(&z[r * v..(r + 1) * v]))
            .collect();
        let g = self.groups.len();
        let mut out = vec![0f32; n * g];
        for (r, o) in out.chunks_mut(g.max(1)).enumerate() {
            let row = &z[r * v..(r + 1) * v];
            for (o, t) in o.iter_mut().zip(self.groups.iter()) {
                let mut loss = 0f64;
                for j in r * t.m..(r + 1) * t.m {
                    let w = t.weights[j] as f64;
                    if w != 0.0 {
                        loss += w * (lse[r] - row[t.ids.get(j)] as f64);
                    }
                }
                *o = loss as f32;
            }
        }
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((n, g)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let lse = std::mem::take(&mut *self.lse.lock().unwrap_or_else(|e| e.into_inner()));
        let g = grad_res.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(
            &g,
            &SparseCeBwd {
                groups: self.groups.clone(),
                lse,
            },
        )?))
    }
}

/// The gradient of [`SparseCe`] with respect to the logits, from the logits
/// and the upstream gradient `ĝ` `[N, G]`: `Σ_g ĝ_ng · (W_ng · softmax(z_n) − w_ng)`.
struct SparseCeBwd {
    groups: std::sync::Arc<Vec<SparseTargets>>,
    /// The forward pass's per-row log-sum-exp (recomputed when absent).
    lse: Vec<f64>,
}

impl candle_core::CustomOp2 for SparseCeBwd {
    fn name(&self) -> &'static str {
        "sparse-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        zs: &candle_core::CpuStorage,
        zl: &candle_core::Layout,
        gs: &candle_core::CpuStorage,
        gl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (z, g) = (cpu_slice(zs, zl)?, cpu_slice(gs, gl)?);
        let (n, v) = zl.shape().dims2()?;
        let groups = self.groups.len();
        let mut grad = vec![0f32; n * v];
        grad.par_chunks_mut(v.max(1))
            .enumerate()
            .for_each(|(r, out)| {
                let row = &z[r * v..(r + 1) * v];
                let gr = &g[r * groups..(r + 1) * groups];
                let (mut scale, mut any) = (0f64, false);
                for (t, gr) in self.groups.iter().zip(gr) {
                    let ws = &t.weights[r * t.m..(r + 1) * t.m];
                    if *gr != 0.0 && ws.iter().any(|w| *w != 0.0) {
                        any = true;
                        scale += *gr as f64 * ws.iter().map(|w| *w as f64).sum::<f64>();
                    }
                }
                if !any {
                    return;
                }
                let lse = self.lse.get(r).copied().unwrap_or_else(|| row_lse(row)) as f32;
                let scale = scale as f32;
                crate::simd::exp_shifted_f32(row, lse, out);
                out.iter_mut().for_each(|o| *o *= scale);
                for (t, gr) in self.groups.iter().zip(gr) {
                    for j in r * t.m..(r + 1) * t.m {
                        out[t.ids.get(j)] -= (*gr as f64 * t.weights[j] as f64) as f32;
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(grad), zl.shape().clone()))
    }
}
