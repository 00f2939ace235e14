//! `mistral`: Mistral (OpenChat-3.5, the pivot): Llama layers with
//! sliding-window attention (`sliding_window` in config.json: query i attends
//! key j only when `i − j < sliding_window`).

use super::decoder::{optional, DecoderConfig, Flavour, FlavourSpec};
use super::llama::{dense_weights, Mlp};
use fusechat_core::model::BuiltinModel;
use fusechat_core::Result;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

pub static SPEC: FlavourSpec = FlavourSpec {
    name: "mistral",
    description:
        "Mistral decoder (OpenChat-3.5, the pivot): Llama layers with sliding-window attention",
    markers: &["mistral"],
    read_config: read_sliding_window,
    ffn_weights: dense_weights,
    ffn: |_, p, ck| Ok(Box::new(Mlp::dense(ck, p)?)),
};

/// Read `sliding_window` (absent or null: full attention); shared with `mixtral`.
pub fn read_sliding_window(v: &Value, file: &Path, cfg: &mut DecoderConfig) -> Result<()> {
    cfg.sliding_window = optional(v, "sliding_window", file)?;
    Ok(())
}

inventory::submit! { BuiltinModel(|| Arc::new(Flavour::Mistral)) }
