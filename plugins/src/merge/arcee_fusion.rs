//! `arcee_fusion`: take the other model's value only where it matters most
//! (mergekit's Arcee Fusion).
//!
//! Per row (last dimension; a vector is one row), with p = softmax(θ¹) + 1e-8
//! and q = softmax(θ⁰) + 1e-8, the row's divergence is KL = Σ p·ln(p/q); an
//! element's importance is |θ¹ − θ⁰|·KL of its row. With Q₁, Q₂, Q₃ the
//! quartiles of the importances (the sorted value at index ⌊q·(N − 1)⌋), the
//! elements with importance ≥ Q₂ + 1.5·(Q₃ − Q₁) take θ¹'s value, the others
//! keep θ⁰'s: `θ⁰ + (θ¹ − θ⁰)·mask`.
//!
//! mergekit estimates the quartiles from a random sample of 10⁶ elements when
//! a tensor is larger; fusechat computes them exactly (by selection), which is
//! what the sample estimates, and is reproducible.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, PluginInfo, PluginKind};
use std::sync::Arc;

pub struct ArceeFusion;

/// ln Σ exp(x) of a row, in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let mx = row.iter().fold(f64::NEG_INFINITY, |m, x| m.max(*x as f64));
    mx + row.iter().map(|x| (*x as f64 - mx).exp()).sum::<f64>().ln()
}

/// The importance of every element of `model` against `base` (rows of `cols`).
pub fn importance(base: &[f32], model: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; base.len()];
    for ((b, m), o) in base
        .chunks(cols)
        .zip(model.chunks(cols))
        .zip(out.chunks_mut(cols))
    {
        let (lb, lm) = (log_sum_exp(b), log_sum_exp(m));
        let kl: f64 = b
            .iter()
            .zip(m)
            .map(|(bx, mx)| {
                let p = (*mx as f64 - lm).exp() + 1e-8;
                let q = (*bx as f64 - lb).exp() + 1e-8;
                p * (p / q).ln()
            })
            .sum();
        for ((o, bx), mx) in o.iter_mut().zip(b).zip(m) {
            *o = ((*mx - *bx).abs() as f64 * kl) as f32;
        }
    }
    out
}

/// The sorted value at index ⌊q·(n − 1)⌋, by selection (reorders `v`).
fn quantile(v: &mut [f32], q: f64) -> f32 {
    let i = (q * (v.len() - 1) as f64) as usize;
    *v.select_nth_unstable_by(i, |a, b| a.total_cmp(b)).1
}

impl Merger for ArceeFusion {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "arcee_fusion".into(),
            description:
                "Arcee Fusion: take the other model's values where their importance is an outlier"
                    .into(),
            params: vec![],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Required,
            min_models: 1,
            max_models: Some(1),
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let cols = match g.shape.last() {
            Some(&c) if c > 0 => c,
            _ => g.numel().max(1),
        };
        let mut base = g
            .base
            .take()
            .ok_or_else(|| fusechat_core::Error::msg("arcee_fusion needs a base model"))?;
        let model = &g.models[0];
        if base.is_empty() {
            return Ok(Merged::new(base));
        }
        let imp = importance(&base, model, cols);
        let mut sorted = imp.clone();
        let q1 = quantile(&mut sorted, 0.25);
        let q2 = quantile(&mut sorted, 0.5);
        let q3 = quantile(&mut sorted, 0.75);
        let threshold = q2 + 1.5 * (q3 - q1);
        for ((b, m), i) in base.iter_mut().zip(model.iter()).zip(&imp) {
            if *i >= threshold {
                *b += *m - *b;
            }
        }
        Ok(Merged::new(base))
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(ArceeFusion)) }
