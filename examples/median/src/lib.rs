//! `median`: the elementwise median of the task vectors, as a fusechat plugin
//! loaded at run time (a method neither mergekit nor fusechat has built in).
//!
//! For N ≥ 2 fine-tunes θ¹..θᴺ of a base θ⁰ with δⱼ = θʲ − θ⁰:
//! `θ = θ⁰ + λ·median(δ₁, …, δᴺ)` per element, the mean of the two middle
//! values when N is even. The median ignores a single model's outlying
//! change, where the mean (task arithmetic) follows it. With
//! `ignore_zeros = true`, zero deltas (already sparsified task vectors) are
//! left out of each element's median, and an element where every delta is
//! zero keeps θ⁰.
//!
//! The kernel writes its result into the base buffer, which inside fusechat is
//! the host's own memory: nothing is copied across the plugin boundary.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::{Error, Result};

pub struct Median;

/// The median of `v` (reordered in place); `None` when `v` is empty.
pub fn median(v: &mut [f32]) -> Option<f32> {
    let n = v.len();
    if n == 0 {
        return None;
    }
    v.sort_unstable_by(|a, b| a.total_cmp(b));
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

impl Merger for Median {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "median".into(),
            description: "θ⁰ + λ·(elementwise median of the task vectors): robust to one model's outlying change".into(),
            params: vec![
                ParamSpec::bool("ignore_zeros", Scope::Shared)
                    .default(false)
                    .help("leave zero deltas out of each element's median"),
                ParamSpec::float("lambda", Scope::Shared)
                    .default(1.0)
                    .help("scale of the median delta"),
            ],
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
        let ignore_zeros = g.params.bool("ignore_zeros")?;
        let lambda = g.params.f64("lambda")? as f32;
        let mut base = g
            .base
            .take()
            .ok_or_else(|| Error::msg("median needs a base model"))?;
        let mut deltas = Vec::with_capacity(g.models.len());
        for (i, b) in base.iter_mut().enumerate() {
            deltas.clear();
            deltas.extend(g.models.iter().map(|m| m[i] - *b));
            if ignore_zeros {
                deltas.retain(|d| *d != 0.0);
            }
            if let Some(m) = median(&mut deltas) {
                *b += lambda * m;
            }
        }
        let n = g.models.len();
        Ok(Merged {
            data: base,
            weights: Some(vec![1.0 / n as f64; n]),
        })
    }
}

fusechat_core::export_plugin!(Median);
