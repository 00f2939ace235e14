//! `ramplus_tl`: RAM+ with tensor-local overlap ratios (mergekit 0.1.5); the
//! kernel is [`super::ram`]'s.

use super::ram::Ram;
use fusechat_core::plugin::registry::BuiltinMerger;
use std::sync::Arc;

pub const RAMPLUS_TL: Ram = Ram { plus: true };

inventory::submit! { BuiltinMerger(|| Arc::new(RAMPLUS_TL)) }
