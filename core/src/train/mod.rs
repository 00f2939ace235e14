//! Training: the `DistillLoss` extension point and the `fuse` stage (SPEC §5).
//!
//! A loss sees one micro-batch at a time: the student's logits at the loss
//! positions only (`[N, V]`, f32, differentiable), the label at each position,
//! which record each position belongs to, and every teacher candidate's top-k
//! ids and logits at those positions with each record's `metric_ce`. Candidate
//! 0 is the pivot's own representation, made before training; the sources'
//! aligned representations follow in the order given. No dense `[B, L, V]`
//! teacher is ever built: a teacher distribution is `k` (id, probability)
//! pairs per position, and its cross-entropy is computed sparsely
//! ([`crate::model::ops::sparse_cross_entropy`]).
//!
//! The shared teacher math lives here so that every loss computes it one way:
//! - [`teacher_probs`]: `q = softmax(topk_logits / T)` over the k entries; with
//!   `compat` the scripts' roundings (fp16 logits → bf16, divide in bf16,
//!   softmax in f32, result rounded to bf16);
//! - [`reward`]: `r = 1/exp(metric_ce)`; with `compat`
//!   `bf16(1/bf16(exp(bf16(metric_ce))))`;
//! - [`best_teacher`]: the candidate with the lowest `metric_ce` (ties to the
//!   earliest, so to the pivot); with `compat` the highest bf16 reward,
//!   first-wins ties.

pub mod adamw;
pub mod batch;
pub mod fuse;
pub mod schedule;

use crate::merge::params::ResolvedParams;
use crate::plugin::registry::PluginInfo;
use crate::Result;
use candle_core::Tensor;
use half::{bf16, f16};
use std::sync::Arc;

/// One teacher candidate's view of a micro-batch. The top-k rows are
/// borrowed from the loaded data record by record: nothing is copied per
/// micro-batch, for any candidate.
#[derive(Debug, Clone, Copy)]
pub struct TeacherView<'a> {
    /// "pivot", or the source's name.
    pub name: &'a str,
    pub k: usize,
    /// Per record of the micro-batch, `[P_r · k]` top-k ids at its loss
    /// positions, in the pivot's vocabulary.
    pub ids: &'a [&'a [u32]],
    /// Per record, their logits, descending per position; −∞ marks an unfilled entry.
    pub logits: &'a [&'a [f16]],
    /// `[R]` each record's mean CE under this teacher.
    pub metric_ce: &'a [f32],
}

impl TeacherView<'_> {
    /// The k entries at the `i`-th loss position of record `r`.
    pub fn at(&self, r: usize, i: usize) -> (&[u32], &[f16]) {
        let span = i * self.k..(i + 1) * self.k;
        (&self.ids[r][span.clone()], &self.logits[r][span])
    }
}

/// What a loss sees of one micro-batch.
pub struct LossBatch<'a> {
    /// `[N, V]` student logits at the loss positions (f32, differentiable).
    pub logits: &'a Tensor,
    /// `[N]` the label (next token) at each loss position.
    pub labels: &'a [u32],
    /// `[N]` the record (0..R) each position belongs to; a record's positions
    /// are contiguous and in order.
    pub record: &'a [usize],
    /// R, the number of records in the micro-batch.
    pub records: usize,
    /// Candidate 0 is the pivot's own representation; the sources follow.
    pub teachers: &'a [TeacherView<'a>],
    /// The fraction of training done before this step, in [0, 1).
    pub progress: f64,
}

impl LossBatch<'_> {
    /// `(record, i)` for each position: its record and its index among that
    /// record's loss positions (for [`TeacherView::at`]).
    pub fn record_positions(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let mut at = (usize::MAX, 0);
        self.record.iter().map(move |&r| {
            at = if r == at.0 { (r, at.1 + 1) } else { (r, 0) };
            at
        })
    }
}

/// A loss's value on a micro-batch.
pub struct LossOutput {
    /// The scalar to differentiate (a token mean over the micro-batch).
    pub loss: Tensor,
    /// Its parts, for the log: `L_lm` and `L_fuse` as token means.
    pub lm_loss: f64,
    pub fuse_loss: f64,
    /// The candidate each record learned from (`None`: no teacher, e.g. λ = 1).
    pub teacher_of_record: Vec<Option<usize>>,
}

/// A distillation loss plugin.
pub trait DistillLoss: Send + Sync {
    fn info(&self) -> PluginInfo;
    /// Checks once before training: parameters that go together, the number
    /// of teachers (sources, not counting the pivot) the loss accepts.
    fn check(&self, _params: &ResolvedParams, _sources: usize) -> Result<()> {
        Ok(())
    }
    fn loss(&self, params: &ResolvedParams, batch: &LossBatch<'_>) -> Result<LossOutput>;
}

/// A built-in loss: `inventory::submit! { BuiltinLoss(|| Arc::new(GreaterAsGt)) }`.
pub struct BuiltinLoss(pub fn() -> Arc<dyn DistillLoss>);
inventory::collect!(BuiltinLoss);

fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// The teacher distribution over one position's k entries:
/// `softmax(logits / temperature)`, zero on −∞ (unfilled) entries and all
/// zero when every entry is unfilled. `compat` reproduces the scripts.
pub fn teacher_probs(logits: &[f16], temperature: f64, compat: bool) -> Vec<f32> {
    let t = temperature as f32;
    let scaled: Vec<f32> = logits
        .iter()
        .map(|x| {
            if compat {
                round_bf16(round_bf16(x.to_f32()) / t)
            } else {
                x.to_f32() / t
            }
        })
        .collect();
    let max = scaled.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    if max == f32::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }
    let e: Vec<f32> = scaled.iter().map(|x| (x - max).exp()).collect();
    let total: f32 = e.iter().sum();
    e.iter()
        .map(|x| {
            let p = x / total;
            if compat {
                round_bf16(p)
            } else {
                p
            }
        })
        .collect()
}

/// A record's reward under a teacher, `1/exp(metric_ce)`.
pub fn reward(metric_ce: f32, compat: bool) -> f32 {
    if compat {
        let e = round_bf16(round_bf16(metric_ce).exp());
        round_bf16(1.0 / e)
    } else {
        (-metric_ce as f64).exp() as f32
    }
}

/// The candidate a record learns from: the lowest `metric_ce` (ties to the
/// earliest candidate, the pivot first); with `compat` the highest bf16
/// reward, first-wins ties, as the scripts' argmax.
pub fn best_teacher(metrics: &[f32], compat: bool) -> usize {
    let mut best = 0;
    for (i, m) in metrics.iter().enumerate().skip(1) {
        let better = if compat {
            reward(*m, true) > reward(metrics[best], true)
        } else {
            *m < metrics[best]
        };
        if better {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_teacher_ties_go_to_the_pivot() {
        assert_eq!(best_teacher(&[0.7, 0.7002], false), 0);
        assert_eq!(best_teacher(&[0.9, 0.8], false), 1);
        assert_eq!(best_teacher(&[0.7, 0.7], false), 0);
        // 0.5103 and 0.5117 round to the same bf16 reward: first wins
        assert_eq!(best_teacher(&[0.5117, 0.5103], true), 0);
        assert_eq!(best_teacher(&[0.5117, 0.5103], false), 1);
    }
}
