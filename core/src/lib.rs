//! fusechat-core: the extension traits, the plugin registry, configuration,
//! HF model-directory I/O and the stage drivers of fusechat.
//!
//! It knows no concrete model, loss or merge method: those are plugins
//! (`fusechat-plugins` for the built-ins, shared libraries for third parties).

pub mod abi;
#[cfg(feature = "data")]
pub mod align;
pub mod config;
#[cfg(feature = "data")]
pub mod conversation;
pub mod dtype;
pub mod dynamic;
pub mod engine;
pub mod error;
#[cfg(feature = "candle")]
pub mod generate;
pub mod hub;
pub mod merge;
pub mod mergekit;
pub mod miniature;
#[cfg(feature = "candle")]
pub mod model;
pub mod model_dir;
pub mod params;
pub mod plan;
pub mod registry;
#[cfg(feature = "data")]
pub mod repr;
#[cfg(all(feature = "candle", feature = "data"))]
pub mod represent;
pub mod sdk;
#[cfg(feature = "data")]
pub mod template;
pub mod writer;

pub use error::{Error, Result};
