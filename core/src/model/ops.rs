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
        let t = SparseTargets {
            m: 3,
            ids: vec![2, 0, 4, 4, 1, 1, 3, 0, 0],
            weights: vec![0.6, 0.3, 0.0, 0.9, 0.05, 0.05, 1.0, 0.0, 0.0],
        };
        (z, t)
    }

    /// The same value as a dense computation: −Σ_v w_v log_softmax(z)_v.
    #[test]
    fn sparse_cross_entropy_equals_the_dense_formula() {
        let (z, t) = sparse_case();
        let got: Vec<f32> = sparse_cross_entropy(&z, &t).unwrap().to_vec1().unwrap();
        let rows = v2(&z);
        for (r, row) in rows.iter().enumerate() {
            let m = row.iter().cloned().fold(f64::MIN, |a, b| a.max(b as f64));
            let lse = m + row.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln();
            let mut dense = vec![0f64; row.len()];
            for j in 0..t.m {
                dense[t.ids[r * t.m + j] as usize] += t.weights[r * t.m + j] as f64;
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

    /// The gradient agrees with central finite differences of the value.
    #[test]
    fn sparse_cross_entropy_gradient_matches_finite_differences() {
        let (z, t) = sparse_case();
        let var = candle_core::Var::from_tensor(&z).unwrap();
        // a non-uniform upstream gradient: loss = Σ_n c_n · ce_n
        let c = Tensor::new(&[1.0f32, -0.5, 2.0], &Device::Cpu).unwrap();
        let loss = (sparse_cross_entropy(var.as_tensor(), &t).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let grad = v2(g.get(var.as_tensor()).unwrap());
        let value = |zz: &Vec<Vec<f32>>| -> f64 {
            let zt = Tensor::new(zz.clone(), &Device::Cpu).unwrap();
            let l: Vec<f32> = sparse_cross_entropy(&zt, &t).unwrap().to_vec1().unwrap();
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
        let ids = Tensor::from_vec(t.ids.clone(), (3, t.m), &Device::Cpu).unwrap();
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
}

/// Sparse target distributions, `m` entries per row: row `n` puts weight
/// `weights[n·m + j]` on token `ids[n·m + j]` (weights need not sum to 1;
/// a zero weight is an unused entry).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTargets {
    pub m: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl SparseTargets {
    /// One-hot on `labels`: the causal-LM targets.
    pub fn one_hot(labels: &[u32]) -> SparseTargets {
        SparseTargets {
            m: 1,
            ids: labels.to_vec(),
            weights: vec![1.0; labels.len()],
        }
    }

    pub fn rows(&self) -> usize {
        self.ids.len() / self.m.max(1)
    }
}

/// Per-row cross-entropy of `logits` `[N, V]` against sparse targets:
/// `loss_n = −Σ_j w_nj · log_softmax(z_n)[id_nj] = W_n · lse(z_n) − Σ_j w_nj z_n,id_nj`,
/// returned as `[N]` (f32), with `W_n = Σ_j w_nj`. Its gradient,
/// `∂loss_n/∂z_nv = W_n · softmax(z_n)_v − Σ_{j: id_nj = v} w_nj`, is computed
/// directly on the CPU (one pass over the logits; no dense target is ever
/// built); elsewhere the same value comes from differentiable candle ops.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fusechat_core::model::ops::{sparse_cross_entropy, SparseTargets};
/// let z = Tensor::new(&[[0f32, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
/// // half the weight on token 1, half on token 2: −log(1/4) = 1.386…
/// let t = SparseTargets { m: 2, ids: vec![1, 2], weights: vec![0.5, 0.5] };
/// let l: Vec<f32> = sparse_cross_entropy(&z, &t).unwrap().to_vec1().unwrap();
/// assert!((l[0] - 4f32.ln()).abs() < 1e-6);
/// ```
pub fn sparse_cross_entropy(logits: &Tensor, targets: &SparseTargets) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.rows() != n || targets.ids.len() != targets.weights.len() {
        candle_core::bail!(
            "sparse_cross_entropy: {} target rows of {} for {n} logit rows",
            targets.rows(),
            targets.m
        )
    }
    if let Some(id) = targets.ids.iter().find(|&&i| i as usize >= v) {
        candle_core::bail!("sparse_cross_entropy: target id {id} is outside the vocabulary of {v}")
    }
    let logits = logits.to_dtype(DType::F32)?;
    if logits.device().is_cpu() {
        logits.contiguous()?.apply_op1(SparseCe {
            targets: std::sync::Arc::new(targets.clone()),
        })
    } else {
        let dev = logits.device();
        let ids = Tensor::from_vec(targets.ids.clone(), (n, targets.m), dev)?;
        let w = Tensor::from_vec(targets.weights.clone(), (n, targets.m), dev)?;
        (log_softmax(&logits)?.gather(&ids, 1)? * w)?.sum(1)?.neg()
    }
}

/// The CPU kernel of [`sparse_cross_entropy`].
struct SparseCe {
    targets: std::sync::Arc<SparseTargets>,
}

/// Per-row `(max, log Σ exp(z − max))` of a row of logits, accumulated in f64.
fn row_lse(z: &[f32]) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + z.iter().map(|x| (*x as f64 - max).exp()).sum::<f64>().ln()
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
        let n = self.targets.rows();
        let v = z.len() / n.max(1);
        let m = self.targets.m;
        let out: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|r| {
                let row = &z[r * v..(r + 1) * v];
                let lse = row_lse(row);
                let mut loss = 0f64;
                for j in 0..m {
                    let w = self.targets.weights[r * m + j] as f64;
                    if w != 0.0 {
                        loss += w * (lse - row[self.targets.ids[r * m + j] as usize] as f64);
                    }
                }
                loss as f32
            })
            .collect();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(n),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, v) = arg.dims2()?;
        let z: Vec<f32> = arg.flatten_all()?.to_vec1()?;
        let g: Vec<f32> = grad_res.to_dtype(DType::F32)?.to_vec1()?;
        let m = self.targets.m;
        let mut grad = vec![0f32; n * v];
        grad.par_chunks_mut(v).enumerate().for_each(|(r, out)| {
            let row = &z[r * v..(r + 1) * v];
            let ws = &self.targets.weights[r * m..(r + 1) * m];
            let total: f64 = ws.iter().map(|w| *w as f64).sum();
            let gr = g[r] as f64;
            if gr == 0.0 || ws.iter().all(|w| *w == 0.0) {
                return;
            }
            let lse = row_lse(row);
            let scale = gr * total;
            for (o, x) in out.iter_mut().zip(row) {
                *o = (scale * (*x as f64 - lse).exp()) as f32;
            }
            for (j, w) in ws.iter().enumerate() {
                let id = self.targets.ids[r * m + j] as usize;
                out[id] -= (gr * *w as f64) as f32;
            }
        });
        Ok(Some(Tensor::from_vec(grad, (n, v), arg.device())?))
    }
}
