//! `llama`: Llama-architecture decoder (Llama 2, Solar 10.7B with 48 layers): dense SiLU MLP, GQA, RoPE.

use super::decoder::{Family, Flavour};
use fusechat_core::model::BuiltinModel;
use std::sync::Arc;

pub const LLAMA: Family = Family {
    flavour: Flavour::Llama,
    description: "Llama-architecture decoder (Llama 2, Solar 10.7B with 48 layers): dense SiLU MLP, GQA, RoPE",
};

inventory::submit! { BuiltinModel(|| Arc::new(LLAMA)) }
