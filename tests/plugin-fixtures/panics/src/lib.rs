//! Test fixture: a merge method whose kernel panics on MLP tensors.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};

pub struct Panicky;

impl Merger for Panicky {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "panicky".into(),
            description: "panics on mlp tensors".into(),
            params: vec![],
        }
    }
    fn contract(&self) -> InputContract {
        InputContract {
            base: BaseUse::Ignored,
            min_models: 1,
            max_models: None,
        }
    }
    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        if g.name.contains("mlp") {
            panic!("deliberate failure in {}", g.name);
        }
        Ok(Merged::new(std::mem::take(&mut g.models[0])))
    }
}

fusechat_core::export_plugin!(Panicky);
