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
        m.iter_mut().zip(base).for_each(|(x, b)| *x -= b);
    }
    Ok(())
}

/// `Σ aᵢbᵢ` in f64 over eight interleaved partial sums, so that the
/// additions pipeline instead of waiting on one another (f32 or f64 inputs).
pub(crate) fn dot_f64<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
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

/// `Σ wⱼ·θʲ` accumulated in f32 in model order, into the first model's buffer.
pub(crate) fn weighted_sum<'a>(models: &mut [TensorBuf<'a>], weights: &[f64]) -> TensorBuf<'a> {
    let mut out = std::mem::take(&mut models[0]);
    let w0 = weights[0] as f32;
    out.iter_mut().for_each(|x| *x *= w0);
    for (m, w) in models.iter().zip(weights).skip(1) {
        let w = *w as f32;
        out.iter_mut().zip(m).for_each(|(o, x)| *o += w * x);
    }
    out
}

/// The per-model `weight` parameter most methods share.
pub(crate) fn weight_param() -> ParamSpec {
    ParamSpec::float("weight", Scope::PerModel)
        .default(1.0)
        .help("relative weight of the model (mergekit requires it; fusechat defaults to 1)")
}
