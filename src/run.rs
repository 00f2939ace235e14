//! `fusechat run`: execute the stages that `fusechat.toml` describes, in order,
//! skipping a stage whose output is already there for the same inputs and settings.
//!
//! Stages so far: `miniature` (generate the demo model set) and `merge`.

use fusechat_core::config::Config;
use fusechat_core::dtype::DType;
use fusechat_core::engine::{self, ExecOptions, MergeReport, MERGE_RECORD};
use fusechat_core::miniature::{self, fnv1a, MiniatureSpec};
use fusechat_core::registry::Registry;
use fusechat_core::{Error, Result};
use std::path::Path;

/// What `run` did, stage by stage.
#[derive(Debug, Default)]
pub struct RunOutcome {
    pub generated_miniature: bool,
    pub merge: Option<MergeReport>,
    pub merge_skipped: bool,
}

/// A stable key of a merge request and its inputs (file names, sizes, mtimes).
fn stage_key(req: &fusechat_core::plan::MergeRequest) -> String {
    let mut s = serde_json::to_string(&req.to_json()).unwrap_or_default();
    s.push_str(&req.out.display().to_string());
    let dirs = req.base.iter().chain(req.models.iter()).map(|m| &m.path);
    for d in dirs {
        let mut files: Vec<(String, u64, u128)> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let t = m
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_nanos();
                Some((e.file_name().to_string_lossy().into_owned(), m.len(), t))
            })
            .collect();
        files.sort();
        s.push_str(&format!("{}{files:?}", d.display()));
    }
    format!("{:016x}", fnv1a(s.as_bytes()))
}

/// The stage key recorded in a merge output: `None` when `out` is not a
/// fusechat merge output at all, `Some(None)` when it is one without a key
/// (written by `fusechat merge`).
fn recorded_key(out: &Path) -> Option<Option<String>> {
    let text = std::fs::read_to_string(out.join(MERGE_RECORD)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v.get("stage_key")
            .and_then(|k| k.as_str())
            .map(str::to_string),
    )
}

/// Run every stage of `cfg`.
pub fn run(
    cfg: &Config,
    registry: &Registry,
    opts: &ExecOptions,
    force: bool,
) -> Result<RunOutcome> {
    let mut outcome = RunOutcome::default();
    if cfg.miniature.is_none() && cfg.merge.is_none() {
        return Err(Error::config(
            &cfg.file,
            "nothing to run: the config has no [miniature] and no [merge] table",
        ));
    }
    if let Some(m) = &cfg.miniature {
        let spec = MiniatureSpec {
            vocab_size: m.vocab_size,
            hidden_size: m.hidden_size,
            intermediate_size: m.intermediate_size,
            num_layers: m.num_layers,
            num_heads: m.num_heads,
            num_kv_heads: m.num_kv_heads,
            targets: m.targets.clone(),
            dtype: DType::parse(&m.dtype).ok_or_else(|| {
                Error::config(
                    &cfg.file,
                    format!(
                        "[miniature] dtype: unknown dtype `{}` (use f32, bf16 or f16)",
                        m.dtype
                    ),
                )
            })?,
            seed: m.seed,
        };
        if m.hidden_size % m.num_heads.max(1) != 0 || m.num_heads % m.num_kv_heads.max(1) != 0 {
            return Err(Error::config(
                &cfg.file,
                "[miniature]: hidden_size must divide by num_heads, and num_heads by num_kv_heads",
            ));
        }
        let set = miniature::generate(&spec, &cfg.resolve(&m.out))?;
        outcome.generated_miniature = set.generated;
        if set.generated {
            tracing::info!(
                "generated the miniature model set in {}",
                cfg.resolve(&m.out).display()
            );
        } else {
            tracing::info!(
                "miniature model set in {} is up to date",
                cfg.resolve(&m.out).display()
            );
        }
    }
    if cfg.merge.is_some() {
        let mut req = cfg.merge_request()?;
        let key = stage_key(&req);
        if !force && recorded_key(&req.out).flatten().as_deref() == Some(key.as_str()) {
            tracing::info!("merge: {} is up to date, skipped", req.out.display());
            outcome.merge_skipped = true;
            return Ok(outcome);
        }
        // `run` owns its stage outputs: a stale one is replaced, but a directory
        // that fusechat did not write is never touched without --force.
        if req.out.exists() && recorded_key(&req.out).is_none() && !force {
            return Err(Error::model(
                &req.out,
                "exists and is not a fusechat merge output; move it away or pass --force to replace it",
            ));
        }
        req.force = true;
        req.stage_key = Some(key);
        outcome.merge = Some(engine::merge(&req, registry, opts)?);
    }
    Ok(outcome)
}
