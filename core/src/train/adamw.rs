//! AdamW as `torch.optim.AdamW` computes it, and PyTorch's global-norm clipping.
//!
//! For each parameter θ with gradient g, at optimizer step t (counting from 1,
//! and advancing even on a step whose learning rate is 0):
//! ```text
//! θ ← θ · (1 − lr·wd)                      decoupled weight decay, first
//! m ← m + (1 − β1)·(g − m)                 (torch's lerp)
//! v ← β2·v + (1 − β2)·g²
//! θ ← θ − (lr / (1 − β1^t)) · m / (sqrt(v) / sqrt(1 − β2^t) + ε)
//! ```
//! The moments are kept in f32 whatever the weights' dtype (bf16 on CUDA); the
//! update is computed in f32 and rounded once into the weight.
//!
//! Clipping ([`clip_grad_norm`]) is `torch.nn.utils.clip_grad_norm_`: the
//! total L2 norm over all gradients, `coef = max_norm / (norm + 1e-6)`, and the
//! gradients multiplied by `coef` only when `coef < 1`.

use crate::model::candle_error as ce;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;

/// AdamW's hyper-parameters (PyTorch's defaults but the weight decay, FuseChat's 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer: its variables, their f32 moments and the step count.
pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<Var>,
    /// First and second moments, one f32 vector per variable.
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    /// Optimizer steps taken.
    pub t: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> AdamW {
        let zeros = |v: &Var| vec![0f32; v.elem_count()];
        AdamW {
            m: vars.iter().map(zeros).collect(),
            v: vars.iter().map(zeros).collect(),
            cfg,
            vars,
            t: 0,
        }
    }

    /// One step with each variable's gradient (f32 values, in `vars` order,
    /// already accumulated and clipped) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::msg(format!(
                "AdamW: {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.t += 1;
        let c = self.cfg;
        let t = self.t as i32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step_size = (lr / (1.0 - c.beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let eps = c.eps as f32;
        for (i, var) in self.vars.iter().enumerate() {
            let dtype = var.dtype();
            let mut theta: Vec<f32> = var
                .as_tensor()
                .flatten_all()
                .and_then(|x| x.to_dtype(DType::F32))
                .and_then(|x| x.to_vec1())
                .map_err(ce)?;
            let g = &grads[i];
            if g.len() != theta.len() {
                return Err(Error::msg(format!(
                    "AdamW: a gradient of {} values for a variable of {}",
                    g.len(),
                    theta.len()
                )));
            }
            theta
                .par_iter_mut()
                .zip(self.m[i].par_iter_mut())
                .zip(self.v[i].par_iter_mut())
                .zip(g.par_iter())
                .for_each(|(((p, m), v), g)| {
                    *p *= decay;
                    *m += (1.0 - b1) * (g - *m);
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                });
            let new = Tensor::from_vec(theta, var.shape(), var.device())
                .and_then(|x| x.to_dtype(dtype))
                .map_err(ce)?;
            var.set(&new).map_err(ce)?;
        }
        Ok(())
    }
}

/// Scale `grads` so that their total L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping.
/// `max_norm <= 0` only measures.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let total: f64 = grads
        .par_iter()
        .map(|g| g.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
        .sum();
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let c = coef as f32;
            grads
                .par_iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= c));
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three steps on one parameter, against the formulas written out in f64.
    #[test]
    fn steps_follow_torch_adamw() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![var.clone()], cfg);
        let grads = [[0.5f32, -1.0], [0.1, 0.3], [-0.2, 0.0]];
        let lrs = [0.0, 0.01, 0.005]; // a warmup step with lr 0 still advances t and the moments
        let (mut th, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for (s, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            opt.step(&[g.to_vec()], lr).unwrap();
            let t = (s + 1) as i32;
            for i in 0..2 {
                let gi = g[i] as f64;
                th[i] *= 1.0 - lr * 0.1;
                m[i] += 0.1 * (gi - m[i]);
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                th[i] -= lr / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
            let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
            for i in 0..2 {
                assert!(
                    (got[i] as f64 - th[i]).abs() < 1e-6,
                    "step {s}: {got:?} vs {th:?}"
                );
            }
        }
        assert_eq!(opt.t, 3);
    }

    #[test]
    fn clipping_scales_by_max_norm_over_norm_plus_eps_only_when_needed() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        let n = clip_grad_norm(&mut g, 1.0);
        assert!((n - 5.0).abs() < 1e-12);
        let coef = 1.0 / (5.0 + 1e-6);
        assert!((g[0][0] as f64 - 3.0 * coef).abs() < 1e-6);
        assert!((g[1][0] as f64 - 4.0 * coef).abs() < 1e-6);
        let mut small = vec![vec![0.3f32, 0.4]];
        assert!((clip_grad_norm(&mut small, 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(small[0], vec![0.3, 0.4], "coef ≥ 1: untouched");
    }
}
