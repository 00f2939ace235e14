//! `model_stock`: Model Stock (Jang, Yun and Han, "Model Stock: All we need is
//! just a few fine-tuned models", ECCV 2024), as mergekit computes it.
//!
//! For N ≥ 2 fine-tuned models θ¹..θᴺ of one pretrained θ⁰, with δⱼ = θʲ − θ⁰,
//! let cos φ be the mean pairwise cosine similarity of the δⱼ (the product of
//! the two norms clamped to at least 1e-6, each cosine to [−1, 1]). Then
//!
//! `t = N·cos φ / (1 + (N − 1)·cos φ)` and `θ = t·mean(θʲ) + (1 − t)·θ⁰`.
//!
//! With `filter_wise = true` the angle, and so `t`, is computed per row (over
//! the last dimension) instead of over the whole tensor.
//!
//! The kernel writes its result into the base buffer. Where the denominator
//! 1 + (N−1)·cos is below 1e-6 in magnitude, t is undefined and the base is
//! kept (t = 0), as mergekit 0.1.5 does.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::{Error, Result};

pub struct ModelStock;

/// The interpolation factor for one row: `N·c / (1 + (N−1)·c)`.
pub fn model_stock_t(deltas: &[&[f32]]) -> f64 {
    let n = deltas.len();
    let norm = |d: &[f32]| super::dot_f64(d, d).sqrt();
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for i in 0..n {
        for j in i + 1..n {
            let dot = super::dot_f64(deltas[i], deltas[j]);
            // mergekit clamps the product of the norms, not each norm
            let product = (norm(deltas[i]) * norm(deltas[j])).max(1e-6);
            sum += (dot / product).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    let cos = sum / pairs as f64;
    let denom = 1.0 + (n as f64 - 1.0) * cos;
    if denom.abs() < 1e-6 {
        return 0.0; // undefined: keep the base
    }
    n as f64 * cos / denom
}

impl Merger for ModelStock {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "model_stock".into(),
            description: "Model Stock: move the fine-tunes' average toward the base by the angle between their deltas".into(),
            params: vec![ParamSpec::bool("filter_wise", Scope::Shared)
                .default(false)
                .help("compute the angle per row (last dimension) instead of per tensor")],
        }
    }

    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Required,
            min_models: 2,
            max_models: None,
        }
    }

    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> Result<Merged<'a>> {
        let filter_wise = g.params.bool("filter_wise")?;
        let numel = g.numel();
        let cols = match (filter_wise, g.shape.last()) {
            (true, Some(&c)) if c > 0 && g.shape.len() >= 2 => c,
            _ => numel.max(1),
        };
        let n = g.models.len();
        let mut base = g
            .base
            .take()
            .ok_or_else(|| Error::msg("model_stock needs a base model"))?;
        // δⱼ in place in the model buffers.
        for m in g.models.iter_mut() {
            m.iter_mut().zip(base.iter()).for_each(|(x, b)| *x -= b);
        }
        let ts: Vec<f64> = (0..numel.div_ceil(cols))
            .map(|r| {
                let span = r * cols..((r + 1) * cols).min(numel);
                let deltas: Vec<&[f32]> = g.models.iter().map(|m| &m[span.clone()]).collect();
                model_stock_t(&deltas)
            })
            .collect();
        // Σ δⱼ into the first delta's buffer, then θ = θ⁰ + t·(Σ δⱼ)/N
        // (= t·mean θʲ + (1 − t)·θ⁰)
        let (first, rest) = g.models.split_at_mut(1);
        for m in rest.iter() {
            first[0].iter_mut().zip(m.iter()).for_each(|(a, x)| *a += x);
        }
        for ((row, sum), t) in base.chunks_mut(cols).zip(first[0].chunks(cols)).zip(&ts) {
            let s = (t / n as f64) as f32;
            row.iter_mut().zip(sum).for_each(|(b, d)| *b += s * d);
        }
        let t_mean = ts.iter().sum::<f64>() / ts.len().max(1) as f64;
        Ok(Merged {
            data: base,
            weights: Some(vec![t_mean / n as f64; n]),
        })
    }
}

inventory::submit! { BuiltinMerger(|| std::sync::Arc::new(ModelStock)) }

#[cfg(test)]
mod tests {
    use super::model_stock_t;

    #[test]
    fn t_is_zero_where_the_formula_is_undefined() {
        // two opposite deltas: cos = −1, 1 + (N−1)·cos = 0
        assert_eq!(model_stock_t(&[&[1.0, 2.0], &[-1.0, -2.0]]), 0.0);
        // two equal deltas: cos = 1, t = 2/2 = 1
        assert!((model_stock_t(&[&[1.0, 2.0], &[1.0, 2.0]]) - 1.0).abs() < 1e-12);
        // tiny deltas: the product of the norms (1e-8) is clamped at 1e-6, as
        // in mergekit: cos = 1e-8/1e-6 = 0.01, t = 2·0.01/1.01
        let t = model_stock_t(&[&[1e-4, 0.0], &[1e-4, 0.0]]);
        assert!((t - 0.02 / 1.01).abs() < 1e-6, "{t}");
    }
}
