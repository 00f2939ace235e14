//! Distillation losses (SPEC §5), one file each:
//!
//! | loss | teacher | value |
//! |---|---|---|
//! | `greater_as_gt` | per record, the candidate (pivot or source) with the lowest `metric_ce` | `λ·L_lm + (1−λ)·L_fuse` (`hard`); per record `(1−r_max)·L_lm + r_max·L_fuse` (`soft`); λ rising to 1 (`hard_and_decay`) |
//! | `weighted` | every candidate, blended by `softmax(rewards)` | `λ·L_lm + (1−λ)·L_fuse` |
//! | `kd` | the one source | `λ·L_lm + (1−λ)·T²·D(teacher, student)`, D = CE, KL or JSD at temperature T |
//!
//! `L_lm` and `L_fuse` are token means over the micro-batch's loss positions;
//! the teacher distribution covers its k entries only (never a dense vector).

pub mod greater_as_gt;
pub mod kd;
pub mod weighted;

use candle_core::{DType, Tensor};
use fusechat_core::model::candle_error as ce;
use fusechat_core::model::ops::{
    sparse_cross_entropies, sparse_cross_entropy, SparseTargets, TargetIds,
};
use fusechat_core::plugin::registry::{ParamSpec, Scope};
use fusechat_core::train::{teacher_probs, LossBatch};
use fusechat_core::Result;

pub(crate) fn lm_weight_param(default: f64) -> ParamSpec {
    ParamSpec::float("lm_loss_weight", Scope::Shared)
        .default(default)
        .range(0.0, 1.0)
        .help("λ: the weight of the causal-LM loss; 1 - λ weighs the fusion loss (λ = 1 is plain SFT)")
}

pub(crate) fn temperature_param() -> ParamSpec {
    ParamSpec::float("temperature", Scope::Shared)
        .default(1.0)
        .range(1e-3, 100.0)
        .help("T: the teacher distribution is softmax(top-k logits / T)")
}

pub(crate) fn compat_param() -> ParamSpec {
    ParamSpec::bool("compat", Scope::Shared)
        .default(false)
        .help("reproduce FuseChat's scripts: bf16 rewards with first-wins ties, fp16 logits rounded to bf16 before the softmax")
}

pub(crate) fn loss_type_param(choices: &[&str], default: &str) -> ParamSpec {
    ParamSpec::choice("loss_type", choices, Scope::Shared)
        .default(default)
        .help("the fusion term: ce = −Σ q log p; kl = ce − H(q) (same gradient); jsd = generalised Jensen-Shannon")
}

/// The token mean of a per-position loss `[N]`.
pub(crate) fn mean(x: &Tensor) -> Result<Tensor> {
    x.mean_all().map_err(ce)
}

/// `λ·lm + (1−λ)·fuse + shift` for two scalar tensors.
pub(crate) fn blend(lm: &Tensor, fuse: &Tensor, lambda: f64, shift: f64) -> Result<Tensor> {
    ((lm * lambda)? + (fuse * (1.0 - lambda))?)
        .and_then(|x| x.affine(1.0, shift))
        .map_err(ce)
}

pub(crate) fn scalar(x: &Tensor) -> Result<f64> {
    x.to_dtype(DType::F64)
        .and_then(|v| v.to_scalar::<f64>())
        .map_err(ce)
}

/// The per-position LM cross-entropy `[N]` against the labels.
pub(crate) fn lm_ce(b: &LossBatch<'_>) -> Result<Tensor> {
    sparse_cross_entropy(b.logits, SparseTargets::one_hot(b.labels)).map_err(ce)
}

/// The per-position LM cross-entropy and cross-entropy against `teacher`,
/// `[N]` each, from one pass over the logits (and one in the backward pass).
pub(crate) fn lm_and_teacher_ce(
    b: &LossBatch<'_>,
    teacher: SparseTargets,
) -> Result<(Tensor, Tensor)> {
    let both = sparse_cross_entropies(b.logits, vec![SparseTargets::one_hot(b.labels), teacher])
        .map_err(ce)?;
    let col = |i: usize| both.narrow(1, i, 1).and_then(|x| x.squeeze(1)).map_err(ce);
    Ok((col(0)?, col(1)?))
}

/// Sparse targets that put, at each position, weight `share(record) · q` on
/// the k entries of each candidate `c` with a nonzero share, where `q` is that
/// candidate's teacher distribution there; and the entropy of the targets
/// summed over each record's positions (for KL values). The ids take u16 when
/// the vocabulary allows: with one teacher of top-10, 60 bytes per position.
pub fn teacher_targets(
    b: &LossBatch<'_>,
    shares: &[Vec<f64>],
    temperature: f64,
    compat: bool,
) -> Result<(SparseTargets, Vec<f64>)> {
    let n = b.labels.len();
    let vocab = b.logits.dims2().map_err(ce)?.1;
    // Entries per position: those of the candidates a record learns from
    // (one for greater_as_gt), so no room is kept for the others.
    let m: usize = shares
        .iter()
        .map(|s| {
            s.iter()
                .zip(b.teachers)
                .filter(|(w, _)| **w > 0.0)
                .map(|(_, t)| t.k)
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = TargetIds::zeros(n * m, vocab);
    let mut weights = vec![0f32; n * m];
    let mut entropy = vec![0f64; b.records];
    for (p, (r, i)) in b.record_positions().enumerate() {
        let mut at = p * m;
        for (c, t) in b.teachers.iter().enumerate() {
            let share = shares[r][c];
            if share <= 0.0 {
                continue;
            }
            let (tid, tlog) = t.at(r, i);
            let q = teacher_probs(tlog, temperature, compat);
            for (j, (&id, &qj)) in tid.iter().zip(&q).enumerate() {
                if id as usize >= vocab {
                    return Err(fusechat_core::Error::Plugin(format!(
                        "teacher `{}` has top-k id {id}, beyond the student's vocabulary of {vocab}",
                        t.name
                    )));
                }
                if qj > 0.0 {
                    ids.set(at + j, id);
                    weights[at + j] = (share * qj as f64) as f32;
                    entropy[r] -= share * qj as f64 * (qj as f64).ln();
                }
            }
            at += t.k;
        }
    }
    Ok((SparseTargets { m, ids, weights }, entropy))
}
