//! fusechat: knowledge fusion of chat LLMs (FuseChat, arXiv 2402.16107).
//!
//! The library facade over [`fusechat_core`] (traits, registry, config, I/O,
//! stage drivers) and [`fusechat_plugins`] (the built-ins). The `fusechat`
//! binary is a thin layer over [`cli`].

pub mod cli;

pub use fusechat_core as core;
pub use fusechat_plugins as plugins;

use fusechat_core::plugin::registry::Registry;

/// Tune the C allocator for model compute: keep freed memory for reuse instead
/// of returning every large block to the kernel. Without this, each
/// intermediate tensor is a fresh `mmap` that the kernel zero-fills page by
/// page, which costs about a fifth of a CPU forward pass. Used by the model
/// commands (generate, chat), not by merges, whose resident set is kept tight.
pub fn tune_allocator_for_compute() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds.
    unsafe {
        // glibc refuses an mmap threshold above 32 MiB (the call returns 0 and
        // changes nothing), so the large blocks (logits, attention scores,
        // their gradients) would still be fresh mappings: allow none at all
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// The registry of every plugin linked into this binary.
pub fn registry() -> Registry {
    fusechat_plugins::link();
    Registry::builtin()
}

/// The built-ins plus the plugin libraries of `cfg`'s `[plugins]` table and `extra`
/// (e.g. `--plugin` flags). A name clash is an error unless `[plugins.prefer]` settles it.
pub fn registry_with(
    cfg: Option<&fusechat_core::pipeline::config::Config>,
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
