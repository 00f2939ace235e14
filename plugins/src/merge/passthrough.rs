//! `passthrough`: each output tensor is one input's, unchanged or multiplied
//! by its `scale`. With `slices` it stacks layer ranges of several models, as
//! SOLAR's depth up-scaling does (layers 0–24 of one copy, 8–32 of another).

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{BuiltinMerger, ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

pub struct Passthrough;

impl Merger for Passthrough {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "passthrough".into(),
            description: "copy one model's tensors (layer stacking with slices), optionally scaled"
                .into(),
            params: vec![ParamSpec::float("scale", Scope::PerModel)
                .default(1.0)
                .help(
                "multiply the tensor by this factor (e.g. 0 with a filter to zero a projection)",
            )],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Ignored,
            min_models: 1,
            max_models: Some(1),
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        let scale = g.params.model_f64("scale")?[0];
        let mut out = std::mem::take(&mut g.models[0]);
        if scale != 1.0 {
            let s = scale as f32;
            out.iter_mut().for_each(|x| *x *= s);
        }
        Ok(Merged::new(out))
    }
}

inventory::submit! { BuiltinMerger(|| Arc::new(Passthrough)) }
