//! `greater_as_gt`: FuseChat's loss. Per record, the teacher is the
//! candidate (the pivot's own representation first, then the sources) with
//! the lowest `metric_ce`, ties to the pivot (`compat`: the highest bf16
//! reward, first wins). With `L_lm` the token-mean CE of the labels and
//! `L_fuse` the token-mean CE against that teacher's distribution:
//! - `hard` (MinCE, the default): `λ·L_lm + (1−λ)·L_fuse`;
//! - `soft`: per record, `(1 − r_max)·CE_lm + r_max·CE_fuse` with `r_max` its
//!   best reward `1/exp(metric_ce)`, then the token mean;
//! - `hard_and_decay`: as `hard`, with λ rising linearly to 1 over training.
//!
//! `loss_type = kl` reports `L_fuse − H(q)`, the KL divergence, with the same
//! gradient.

use super::{
    blend, compat_param, lm_and_teacher_ce, lm_ce, lm_weight_param, loss_type_param, mean, scalar,
    teacher_targets, temperature_param,
};
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::model::candle_error as ce;
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::train::{best_teacher, reward, BuiltinLoss, DistillLoss, LossBatch, LossOutput};
use fusechat_core::Result;
use std::sync::Arc;

pub struct GreaterAsGt;

impl DistillLoss for GreaterAsGt {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Loss,
            name: "greater_as_gt".into(),
            description: "FuseChat: per record, learn from whichever of pivot and sources predicts the gold answer best (MinCE)".into(),
            params: vec![
                ParamSpec::choice("mode", &["hard", "soft", "hard_and_decay"], Scope::Shared)
                    .default("hard")
                    .help("hard: λ·L_lm + (1−λ)·L_fuse; soft: weights from the best reward per record; hard_and_decay: λ rises to 1"),
                loss_type_param(&["ce", "kl"], "ce"),
                temperature_param(),
                lm_weight_param(0.9),
                compat_param(),
            ],
        }
    }

    fn loss(&self, p: &ResolvedParams, b: &LossBatch<'_>) -> Result<LossOutput> {
        let mode = p.str("mode")?;
        let compat = p.bool("compat")?;
        let t = p.f64("temperature")?;
        let kl = p.str("loss_type")? == "kl";
        let mut lambda = p.f64("lm_loss_weight")?;
        if mode == "hard_and_decay" {
            lambda += (1.0 - lambda) * b.progress;
        }
        if mode != "soft" && lambda >= 1.0 {
            // plain SFT: no teacher term at all (not even a zero one)
            let lm = mean(&lm_ce(b)?)?;
            return Ok(LossOutput {
                lm_loss: scalar(&lm)?,
                loss: lm,
                fuse_loss: 0.0,
                teacher_of_record: vec![None; b.records],
            });
        }
        let chosen: Vec<usize> = (0..b.records)
            .map(|r| {
                let metrics: Vec<f32> = b.teachers.iter().map(|t| t.metric_ce[r]).collect();
                best_teacher(&metrics, compat)
            })
            .collect();
        let shares: Vec<Vec<f64>> = chosen
            .iter()
            .map(|&c| {
                (0..b.teachers.len())
                    .map(|i| (i == c) as u8 as f64)
                    .collect()
            })
            .collect();
        let (targets, entropy) = teacher_targets(b, &shares, t, compat)?;
        let (lm, fuse) = lm_and_teacher_ce(b, targets)?;
        let lm_loss = scalar(&mean(&lm)?)?;
        let n = b.labels.len().max(1) as f64;
        // KL = CE − H(q): the entropy is a constant of the teacher
        let h = if kl {
            entropy.iter().sum::<f64>() / n
        } else {
            0.0
        };
        let fuse_loss = scalar(&mean(&fuse)?)? - h;
        let loss = if mode == "soft" {
            let r_max: Vec<f32> = (0..b.records)
                .map(|r| {
                    b.teachers
                        .iter()
                        .map(|t| reward(t.metric_ce[r], compat))
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            let w: Vec<f32> = b.record.iter().map(|&r| r_max[r]).collect();
            let wh = if kl {
                r_max
                    .iter()
                    .zip(&entropy)
                    .map(|(w, h)| *w as f64 * h)
                    .sum::<f64>()
                    / n
            } else {
                0.0
            };
            let w =
                candle_core::Tensor::from_vec(w, b.labels.len(), b.logits.device()).map_err(ce)?;
            let one = w.ones_like().map_err(ce)?;
            let per = ((&one - &w)
                .and_then(|x| x * &lm)
                .and_then(|x| x + (&w * &fuse)?))
            .map_err(ce)?;
            mean(&per)?.affine(1.0, -wh).map_err(ce)?
        } else {
            blend(&mean(&lm)?, &mean(&fuse)?, lambda, -(1.0 - lambda) * h)?
        };
        Ok(LossOutput {
            loss,
            lm_loss,
            fuse_loss,
            teacher_of_record: chosen.into_iter().map(Some).collect(),
        })
    }
}

inventory::submit! { BuiltinLoss(|| Arc::new(GreaterAsGt)) }
