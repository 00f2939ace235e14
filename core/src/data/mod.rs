//! Data construction (SPEC §1–4): conversations, chat templates and labels,
//! the representation format, the `represent` stage, and the `VocabAligner`
//! extension point with the `align` and `filter` stages.

pub mod align;
pub mod conversation;
pub mod repr;
#[cfg(feature = "candle")]
pub mod represent;
pub mod template;
