//! `kd`: classic knowledge distillation from one teacher (as DistillKit and
//! TRL's GKD offer it). With the student's and the teacher's distributions at
//! temperature T (`p = softmax(z/T)`, `q = softmax(top-k/T)` over the
//! teacher's k entries, zero elsewhere):
//! `loss = λ·L_lm + (1−λ)·T²·D`, where D is the token mean of
//! - `ce`: `−Σ q log p`;
//! - `kl`: `Σ q log(q/p)` (the same gradient as `ce`);
//! - `jsd`: the generalised Jensen-Shannon divergence
//!   `β·KL(q‖m) + (1−β)·KL(p‖m)`, `m = β·q + (1−β)·p`, computed from p on the
//!   teacher's k entries and their total (q is zero elsewhere, where
//!   `m = (1−β)·p`).
//!
//! The pivot's own representation is not a teacher here: exactly one source is.

use super::{
    blend, lm_ce, lm_weight_param, loss_type_param, mean, scalar, teacher_targets,
    temperature_param,
};
use candle_core::Tensor;
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::model::candle_error as ce;
use fusechat_core::model::ops::{softmax, sparse_cross_entropy};
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::train::{teacher_probs, BuiltinLoss, DistillLoss, LossBatch, LossOutput};
use fusechat_core::{Error, Result};
use std::sync::Arc;

pub struct Kd;

impl DistillLoss for Kd {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Loss,
            name: "kd".into(),
            description: "knowledge distillation from one teacher: CE, KL or JSD at a temperature"
                .into(),
            params: vec![
                loss_type_param(&["ce", "kl", "jsd"], "kl"),
                temperature_param(),
                lm_weight_param(0.5),
                ParamSpec::float("beta", Scope::Shared)
                    .default(0.5)
                    .range(0.01, 0.99)
                    .help("jsd only: the mixture m = β·teacher + (1−β)·student"),
            ],
        }
    }

    fn check(&self, _p: &ResolvedParams, sources: usize) -> Result<()> {
        if sources != 1 {
            return Err(Error::Plugin(format!(
                "loss `kd` distils exactly one teacher; this run has {sources} (give one --teacher, or use greater_as_gt / weighted)"
            )));
        }
        Ok(())
    }

    fn loss(&self, p: &ResolvedParams, b: &LossBatch<'_>) -> Result<LossOutput> {
        if b.teachers.len() != 2 {
            return Err(Error::Plugin(
                "loss `kd` needs exactly one source teacher".into(),
            ));
        }
        let t = p.f64("temperature")?;
        let lambda = p.f64("lm_loss_weight")?;
        let kind = p.str("loss_type")?;
        let lm = lm_ce(b)?;
        let student = (b.logits / t).map_err(ce)?;
        let shares: Vec<Vec<f64>> = (0..b.records).map(|_| vec![0.0, 1.0]).collect();
        let n = b.labels.len().max(1) as f64;
        let d = if kind == "jsd" {
            jsd(&student, b, t, p.f64("beta")?)?
        } else {
            let (targets, entropy) = teacher_targets(b, &shares, t, false)?;
            let ce_ = mean(&sparse_cross_entropy(&student, targets).map_err(ce)?)?;
            let h = if kind == "kl" {
                entropy.iter().sum::<f64>() / n
            } else {
                0.0
            };
            ce_.affine(1.0, -h).map_err(ce)?
        };
        let scaled = (d.clone() * (t * t)).map_err(ce)?;
        let loss = blend(&mean(&lm)?, &scaled, lambda, 0.0)?;
        Ok(LossOutput {
            loss,
            lm_loss: scalar(&mean(&lm)?)?,
            fuse_loss: scalar(&d)?,
            teacher_of_record: vec![Some(1); b.records],
        })
    }
}

/// Token-mean generalised JSD between the teacher (k sparse entries) and the student.
fn jsd(student_logits: &Tensor, b: &LossBatch<'_>, t: f64, beta: f64) -> Result<Tensor> {
    let teacher = &b.teachers[1];
    let (n, k) = (b.labels.len(), teacher.k);
    let dev = b.logits.device();
    let mut q = vec![0f32; n * k];
    let mut q_log_q = vec![0f32; n * k];
    let mut ids = Vec::with_capacity(n * k);
    for (pos, (r, i)) in b.record_positions().enumerate() {
        let (tid, logits) = teacher.at(r, i);
        ids.extend_from_slice(tid);
        for (j, qj) in teacher_probs(logits, t, false).into_iter().enumerate() {
            q[pos * k + j] = qj;
            if qj > 0.0 {
                q_log_q[pos * k + j] = qj * qj.ln();
            }
        }
    }
    let ids = Tensor::from_vec(ids, (n, k), dev).map_err(ce)?;
    let q = Tensor::from_vec(q, (n, k), dev).map_err(ce)?;
    let q_log_q = Tensor::from_vec(q_log_q, (n, k), dev).map_err(ce)?;
    let f = || -> candle_core::Result<Tensor> {
        let ps = softmax(student_logits)?.gather(&ids, 1)?; // [N, k]
        let m = ((&q * beta)? + (&ps * (1.0 - beta))?)?;
        let log_m = m.clamp(1e-30f32, 1f32)?.log()?;
        // KL(q‖m) on the k entries (q log q − q log m; zero where q = 0)
        let kl_q = (q_log_q.sum(1)? - (&q * &log_m)?.sum(1)?)?;
        // KL(p‖m): the k entries, plus the rest of p where m = (1−β)p
        let log_p = ps.clamp(1e-30f32, 1f32)?.log()?;
        let inside = (&ps * (log_p - &log_m)?)?.sum(1)?;
        let outside = (ps.sum(1)?.neg()? + 1.0)? * (1.0 / (1.0 - beta)).ln();
        let kl_p = (inside + outside?)?;
        ((kl_q * beta)? + (kl_p * (1.0 - beta))?)?.mean_all()
    };
    f().map_err(ce)
}

inventory::submit! { BuiltinLoss(|| Arc::new(Kd)) }
