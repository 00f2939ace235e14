//! fusechat: knowledge fusion of chat LLMs (FuseChat, arXiv 2402.16107).
//!
//! The library facade over [`fusechat_core`] (traits, registry, config, I/O,
//! stage drivers) and [`fusechat_plugins`] (the built-ins). The `fusechat`
//! binary is a thin layer over [`cli`].

pub mod chat;
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

/// The built-ins plus the plugin libraries of `cfg`'s `[plugins]` table and `extra`
/// (e.g. `--plugin` flags). A name clash is an error unless `[plugins.prefer]` settles it.
pub fn registry_with(
    cfg: Option<&fusechat_core::config::Config>,
    extra: &[std::path::PathBuf],
) -> fusechat_core::Result<Registry> {
    let mut r = registry();
    let (mut paths, prefer) = cfg.map(|c| c.plugins()).unwrap_or_default();
    paths.extend(extra.iter().cloned());
    for p in &paths {
        let names = r.load_library(p, &prefer)?;
        tracing::debug!("loaded {} from {}", names.join(", "), p.display());
    }
    Ok(r)
}
