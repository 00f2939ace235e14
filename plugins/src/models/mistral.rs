//! `mistral`: Mistral decoder (OpenChat-3.5, the pivot): Llama layers with sliding-window attention.

use super::decoder::{Family, Flavour};
use fusechat_core::model::BuiltinModel;
use std::sync::Arc;

pub const MISTRAL: Family = Family {
    flavour: Flavour::Mistral,
    description:
        "Mistral decoder (OpenChat-3.5, the pivot): Llama layers with sliding-window attention",
};

inventory::submit! { BuiltinModel(|| Arc::new(MISTRAL)) }
