//! `mixtral`: Mixtral decoder (NH2-Mixtral-8x7B): sparse mixture-of-experts feed-forward, top-k routing.

use super::decoder::{Family, Flavour};
use fusechat_core::model::BuiltinModel;
use std::sync::Arc;

pub const MIXTRAL: Family = Family {
    flavour: Flavour::Mixtral,
    description:
        "Mixtral decoder (NH2-Mixtral-8x7B): sparse mixture-of-experts feed-forward, top-k routing",
};

inventory::submit! { BuiltinModel(|| Arc::new(MIXTRAL)) }
