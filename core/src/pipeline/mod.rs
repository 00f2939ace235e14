//! The pipeline that `fusechat run` executes, and its configuration.
//!
//! [`Pipeline::from_config`] turns a `fusechat.toml` into an ordered list of
//! [`Stage`]s (miniature, represent, align, filter, merge), resolving and
//! checking every stage's plugins, parameters and paths first: every problem
//! of the whole config is reported at once, before anything is computed.
//! [`Pipeline::run`] then executes the stages in order. Each stage has the same
//! shape: its resolved options ([`Job`]), one up-to-date check by its stage key
//! ([`key`]), a run, and an artifact on disk. A stage that is up to date is
//! skipped; no stage ever skips the stages after it.

pub mod config;
pub mod key;
pub mod miniature;
#[cfg(all(feature = "candle", feature = "data"))]
mod resolve;
#[cfg(all(feature = "candle", feature = "data"))]
mod run;
pub mod skills;

#[cfg(all(feature = "candle", feature = "data"))]
pub use run::{summary_table, Job, Outcome, Pipeline, Stage, StageResult, Status};
