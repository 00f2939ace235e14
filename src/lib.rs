//! fusechat: knowledge fusion of chat LLMs (FuseChat, arXiv 2402.16107).
//!
//! The library facade over [`fusechat_core`] (traits, registry, config, I/O,
//! stage drivers) and [`fusechat_plugins`] (the built-ins). The `fusechat`
//! binary is a thin layer over [`cli`].

pub mod cli;
pub mod run;

pub use fusechat_core as core;
pub use fusechat_plugins as plugins;

use fusechat_core::registry::Registry;

/// The registry of every plugin linked into this binary.
pub fn registry() -> Registry {
    fusechat_plugins::link();
    Registry::builtin()
}
