//! fusechat-core: the extension traits, the plugin registry, configuration,
//! HF model-directory I/O and the stage drivers of fusechat.
//!
//! It knows no concrete model, loss or merge method: those are plugins
//! (`fusechat-plugins` for the built-ins, shared libraries for third parties).
//!
//! The folders follow the concerns:
//! - [`plugin`]: the registry, parameter specs, the C ABI, the SDK for plugin
//!   authors and the loader of plugin libraries;
//! - [`merge`]: the `Merger` extension point, the planner, parameter
//!   resolution, the streaming engine and mergekit configs;
//! - [`data`]: conversations, chat templates, representations, the
//!   `represent` stage and the `VocabAligner` extension point with `align`;
//! - [`model`]: the `SourceModel` extension point, differentiable ops, generation;
//! - [`train`]: the `DistillLoss` extension point and the `fuse` trainer;
//! - [`eval`]: the `Evaluator` extension point, the judge client, reports and the `eval` stage;
//! - [`io`]: HF model directories (reading, writing), dtypes, the local hub cache;
//! - [`pipeline`]: `fusechat.toml`, the miniature and the stage pipeline that
//!   `fusechat run` executes.

#[cfg(feature = "data")]
pub mod data;
pub mod error;
#[cfg(all(feature = "candle", feature = "data"))]
pub mod eval;
pub mod io;
pub mod merge;
#[cfg(feature = "candle")]
pub mod model;
pub mod pipeline;
pub mod plugin;
pub mod rng;
pub mod simd;
#[cfg(all(feature = "candle", feature = "data"))]
pub mod train;

pub use error::{Error, Result};
