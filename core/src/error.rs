//! One error type for the core crate. Every variant carries the context a user
//! needs to act: the file, the tensor or the config field, and what to do.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Each message is whole: the OS's or candle's message is part of it, and is
/// not also chained as a `source`, so that `{:#}` (anyhow) does not print it twice.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },

    /// A config file (fusechat.toml, a mergekit YAML, config.json) that cannot be used.
    #[error("{file}: {msg}")]
    Config { file: PathBuf, msg: String },

    /// A safetensors file or HF model directory that cannot be read.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },

    /// Problems found while validating a request, a config or a plugin's
    /// parameters, all at once. `subject` names what was validated: "the merge
    /// request", "fusechat.toml", "aligner `mined`".
    #[error("{subject} has {} problem(s):\n{}", .problems.len(), format_problems(.problems))]
    Invalid {
        subject: String,
        problems: Vec<String>,
    },

    /// A NaN or infinity in a weight, found while merging.
    #[error(
        "tensor `{tensor}` of {model} holds a non-finite value ({value}) at element {index}; \
             fix or re-export that checkpoint, nothing was written"
    )]
    NonFinite {
        tensor: String,
        model: String,
        index: usize,
        value: f32,
    },

    /// A merge kernel refused its input.
    #[error("{method} on tensor `{tensor}`: {msg}")]
    Kernel {
        method: String,
        tensor: String,
        msg: String,
    },

    /// A tensor operation failed; candle's whole message is kept.
    #[cfg(feature = "candle")]
    #[error("tensor computation failed: {0}")]
    Candle(candle_core::Error),

    /// Unknown plugin, bad parameter, registry conflicts.
    #[error("{0}")]
    Plugin(String),

    #[error("{0}")]
    Msg(String),
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn format_problems(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {}", p.replace('\n', "\n    ")))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub fn config(file: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            msg: msg.into(),
        }
    }
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(subject: impl Into<String>, problems: Vec<String>) -> Self {
        Error::Invalid {
            subject: subject.into(),
            problems,
        }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}
