//! Test fixture: a merge method that returns one value too few.

use fusechat_core::merge::{BaseUse, InputContract, Merged, Merger, TensorGroup};
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};

pub struct Short;

impl Merger for Short {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Merger,
            name: "short".into(),
            description: "returns numel - 1 values".into(),
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
    fn merge<'a>(&self, g: TensorGroup<'a>) -> fusechat_core::Result<Merged<'a>> {
        Ok(Merged::new(vec![0.0f32; g.numel() - 1]))
    }
}

fusechat_core::export_plugin!(Short);
