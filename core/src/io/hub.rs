//! Resolving model references without downloading: a local directory, or an
//! HF id (`org/name`) already in the local Hugging Face cache.
//!
//! Cache layout: `<cache>/models--org--name/snapshots/<revision>/`, where
//! `refs/main` names the revision. The cache is `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

/// The HF cache directories to look in, in order.
pub fn cache_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        v.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        v.push(PathBuf::from(p).join("hub"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        v.push(PathBuf::from(h).join(".cache/huggingface/hub"));
    }
    v
}

/// Resolve `reference` (relative paths against `relative_to`). Returns the
/// path to try; when nothing matches, the local path as written, so that the
/// planner reports it as missing along with any other problem.
pub fn resolve_model(reference: &str, relative_to: &Path) -> PathBuf {
    let local = relative_to.join(reference);
    if local.is_dir() {
        return local;
    }
    let parts: Vec<&str> = reference.split('/').collect();
    if parts.len() == 2 && !reference.starts_with('.') {
        for cache in cache_dirs() {
            let repo = cache.join(format!("models--{}--{}", parts[0], parts[1]));
            if let Some(snap) = snapshot(&repo) {
                return snap;
            }
        }
    }
    local
}

fn snapshot(repo: &Path) -> Option<PathBuf> {
    let snaps = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let p = snaps.join(rev.trim());
        if p.is_dir() {
            return Some(p);
        }
    }
    // No refs/main: take the most recently modified snapshot.
    std::fs::read_dir(&snaps)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cached_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc\n").unwrap();
        assert_eq!(snapshot(&repo), Some(repo.join("snapshots/abc")));
        assert_eq!(snapshot(&tmp.path().join("models--x--y")), None);
    }
}
