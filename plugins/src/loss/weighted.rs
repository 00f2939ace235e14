//! `weighted`: FuseChat's weighted_as_gt. Every candidate teaches each record,
//! its distribution weighted by `softmax_c(r_c)` over the candidates' rewards
//! `r_c = 1/exp(metric_ce_c)` (`compat`: the scripts' bf16 rewards); then
//! `λ·L_lm + (1−λ)·L_fuse` against the blend.

use super::{
    blend, compat_param, lm_and_teacher_ce, lm_weight_param, mean, scalar, teacher_targets,
    temperature_param,
};
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};
use fusechat_core::train::{reward, BuiltinLoss, DistillLoss, LossBatch, LossOutput};
use fusechat_core::Result;
use std::sync::Arc;

pub struct Weighted;

/// `softmax` of a record's rewards over the candidates.
pub fn reward_weights(rewards: &[f32]) -> Vec<f64> {
    let max = rewards.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)) as f64;
    let e: Vec<f64> = rewards.iter().map(|r| (*r as f64 - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|x| x / total).collect()
}

impl DistillLoss for Weighted {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Loss,
            name: "weighted".into(),
            description:
                "FuseChat's weighted_as_gt: every teacher, blended by the softmax of their rewards"
                    .into(),
            params: vec![temperature_param(), lm_weight_param(0.9), compat_param()],
        }
    }

    fn loss(&self, p: &ResolvedParams, b: &LossBatch<'_>) -> Result<LossOutput> {
        let compat = p.bool("compat")?;
        let lambda = p.f64("lm_loss_weight")?;
        let shares: Vec<Vec<f64>> = (0..b.records)
            .map(|r| {
                let rewards: Vec<f32> = b
                    .teachers
                    .iter()
                    .map(|t| reward(t.metric_ce[r], compat))
                    .collect();
                reward_weights(&rewards)
            })
            .collect();
        let (targets, _) = teacher_targets(b, &shares, p.f64("temperature")?, compat)?;
        let (lm, fuse) = lm_and_teacher_ce(b, targets)?;
        let loss = blend(&mean(&lm)?, &mean(&fuse)?, lambda, 0.0)?;
        let heaviest = shares
            .iter()
            .map(|s| (0..s.len()).fold(0, |best, c| if s[c] > s[best] { c } else { best }))
            .map(Some)
            .collect();
        Ok(LossOutput {
            loss,
            lm_loss: scalar(&mean(&lm)?)?,
            fuse_loss: scalar(&mean(&fuse)?)?,
            teacher_of_record: heaviest,
        })
    }
}

inventory::submit! { BuiltinLoss(|| Arc::new(Weighted)) }
