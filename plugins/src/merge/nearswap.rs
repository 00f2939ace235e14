//! `nearswap`: take the other model's value where it is near the base's.
//! Per element, with `w = clamp(t / max(|θ⁰ − θ¹|, 1e-6), 0, 1)`:
//! `w·θ¹ + (1 − w)·θ⁰`, computed in that order as mergekit 0.1.5 does.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct NearSwap;

/// NearSwap of `v1` into `v0` at threshold `t`, written into `v0`.
pub fn nearswap(t: f32, v0: &mut [f32], v1: &[f32]) {
    for (a, b) in v0.iter_mut().zip(v1) {
        let w = t / (*a - b).abs();
        // t/0 = inf and NaN map to 1, as torch.nan_to_num(nan=1, posinf=1) does
        let w = if w.is_finite() {
            w.clamp(0.0, 1.0)
        } else {
            1.0
        };
        *a = w * b + (1.0 - w) * *a;
    }
}

impl Merger for NearSwap {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "nearswap".into(),
            description:
                "NearSwap: move the base toward the other model where their values are within t"
                    .into(),
            params: vec![ParamSpec::float("t", Scope::Shared)
                .required()
                .range(1e-9, 1e9)
                .help(
                    "sameness threshold (> 0): elements closer than t take the other model's value",
                )],
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
        let t = g.params.f64("t")?;
        let mut v0 = g
            .base
            .take()
            .ok_or_else(|| fusechat_core::Error::msg("nearswap needs a base model"))?;
        nearswap(t as f32, &mut v0, &g.models[0]);
        Ok(Merged::new(v0))
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(NearSwap)) }
