//! `fusechat run`: execute the stages that `fusechat.toml` describes, in order,
//! skipping a stage whose output is already there for the same inputs and settings.
//!
//! Stages so far: `miniature` (generate the demo model set), the data
//! construction (`represent` for the pivot and every source, `align` of each
//! source onto the pivot, `filter`), and `merge`.

use fusechat_core::align::{AlignOptions, AlignOutcome, FilterReport};
use fusechat_core::config::Config;
use fusechat_core::dtype::DType;
use fusechat_core::engine::{self, ExecOptions, MergeReport, MERGE_RECORD};
use fusechat_core::miniature::{self, fnv1a, MiniatureSpec};
use fusechat_core::registry::Registry;
use fusechat_core::represent::{RepresentOptions, RepresentOutcome};
use fusechat_core::{Error, Result};
use std::path::{Path, PathBuf};

/// One line about a `represent` run.
pub fn represent_summary(out: &Path, r: &RepresentOutcome) -> String {
    if r.up_to_date {
        return format!("represent: {} is up to date\n", out.display());
    }
    let tps = r.tokens as f64 / r.seconds.max(1e-9);
    let mut s = format!(
        "represent: {} shard(s) computed, {} reused, {} tokens in {:.2}s ({tps:.0} tokens/s, {:.0}% in the forward pass)",
        r.computed.len(),
        r.reused.len(),
        r.tokens,
        r.seconds,
        100.0 * r.forward_seconds / r.seconds.max(1e-9)
    );
    match &r.manifest {
        Some(m) => s.push_str(&format!(
            "; {} rows ({} skipped, {} without labels) in {}\n",
            m.records.rows,
            m.records.skipped,
            m.records.no_label,
            out.display()
        )),
        None => s.push_str(&format!(
            "; shards {:?} are left to other --shard runs (the manifest is written by the run that completes the set)\n",
            r.pending
        )),
    }
    s
}

/// One line about an `align` run.
pub fn align_summary(out: &Path, r: &AlignOutcome) -> String {
    if r.up_to_date {
        return format!("align: {} is up to date\n", out.display());
    }
    format!(
        "align: {} positions took the source's top-k, {} fell back to one-hot on the label, {} top-k tokens dropped; {:.2}s; {}\n",
        r.stats.transferred,
        r.stats.fallback,
        r.stats.dropped_tokens,
        r.seconds,
        out.display()
    )
}

/// The data-construction stages: represent the pivot and every source, align
/// each source onto the pivot, and filter NaN rows.
fn data_stages(
    cfg: &Config,
    registry: &Registry,
    force: bool,
    progress: bool,
    outcome: &mut RunOutcome,
) -> Result<()> {
    let Some(data) = &cfg.data else {
        if cfg.pivot.is_some() || !cfg.sources.is_empty() {
            return Err(Error::config(
                &cfg.file,
                "[pivot] and [[sources]] need a [data] table (the chat dataset)",
            ));
        }
        return Ok(());
    };
    let pivot = cfg.pivot.as_ref().ok_or_else(|| {
        Error::config(
            &cfg.file,
            "[data] needs a [pivot] table: the model the sources are fused into",
        )
    })?;
    if cfg.sources.is_empty() {
        return Err(Error::config(
            &cfg.file,
            "[data] needs at least one [[sources]] table",
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, s) in cfg.sources.iter().enumerate() {
        let name = s.name.as_deref().unwrap_or_default();
        if name.is_empty() || name == "pivot" || name.contains(['/', '\\', '@']) {
            return Err(Error::config(&cfg.file, format!("[[sources]] #{}: `name` must be set, not `pivot`, and without / \\ or @ (it names the representation directories)", i + 1)));
        }
        if !names.insert(name) {
            return Err(Error::config(
                &cfg.file,
                format!("[[sources]]: the name `{name}` is used twice"),
            ));
        }
    }
    let rs = cfg.represent.clone().unwrap_or_default();
    let out = cfg.resolve(&rs.out.clone().unwrap_or_else(|| cfg.run.dir.join("repr")));
    let represent =
        |name: &str, m: &fusechat_core::config::ModelSection| -> Result<RepresentOutcome> {
            let model = fusechat_core::hub::resolve_model(&m.path, &cfg.root);
            let mut o = RepresentOptions::new(&model, &cfg.resolve(&data.path), &out.join(name));
            o.family = m.family.clone();
            o.tokenizer = m.tokenizer.as_ref().map(|t| cfg.resolve(t));
            o.template = m.template.clone().unwrap_or_else(|| data.template.clone());
            o.max_length = data.max_length;
            o.strict = data.strict;
            o.top_k = rs.top_k;
            o.batch_size = rs.batch_size;
            o.batch_tokens = rs.batch_tokens;
            o.rows_per_shard = rs.rows_per_shard;
            o.device = rs.device.clone();
            o.force = force;
            o.replace_stale = true;
            o.progress = progress;
            let r = fusechat_core::represent::represent(registry, &o)?;
            tracing::info!("{}", represent_summary(&o.out, &r).trim_end());
            if r.manifest.is_none() {
                return Err(Error::model(&o.out, "is incomplete after represent; rerun"));
            }
            Ok(r)
        };
    outcome
        .represent
        .push(("pivot".into(), represent("pivot", pivot)?));
    let mut teachers: Vec<PathBuf> = Vec::new();
    for s in &cfg.sources {
        let name = s.name.clone().unwrap_or_default();
        outcome.represent.push((name.clone(), represent(&name, s)?));
        let params = crate::cli::toml_scalars(&s.align)
            .map_err(|e| Error::config(&cfg.file, format!("[[sources]] {name}: align: {e}")))?;
        let o = AlignOptions {
            pivot: out.join("pivot"),
            source: out.join(&name),
            pivot_tokenizer: pivot.tokenizer.as_ref().map(|t| cfg.resolve(t)),
            source_tokenizer: s.tokenizer.as_ref().map(|t| cfg.resolve(t)),
            aligner: s.aligner.clone().unwrap_or_else(|| "mined".into()),
            params,
            out: out.join(format!("{name}@pivot")),
            force,
        };
        let r = fusechat_core::align::align(registry, &o)?;
        tracing::info!("{}", align_summary(&o.out, &r).trim_end());
        teachers.push(o.out.clone());
        outcome.align.push((name, r));
    }
    outcome.filter = Some(fusechat_core::align::filter(&out.join("pivot"), &teachers)?);
    Ok(())
}

/// What `run` did, stage by stage.
#[derive(Debug, Default)]
pub struct RunOutcome {
    pub generated_miniature: bool,
    /// (model name, outcome) of each representation.
    pub represent: Vec<(String, RepresentOutcome)>,
    pub align: Vec<(String, AlignOutcome)>,
    pub filter: Option<FilterReport>,
    pub merge: Option<MergeReport>,
    pub merge_skipped: bool,
}

/// A stable key of a merge request and its inputs (file names, sizes, mtimes).
fn stage_key(req: &fusechat_core::plan::MergeRequest) -> String {
    let mut s = serde_json::to_string(&req.to_json()).unwrap_or_default();
    s.push_str(&req.out.display().to_string());
    let dirs = req.base.iter().chain(req.models.iter()).map(|m| &m.path);
    for d in dirs {
        let files = fusechat_core::model_dir::file_stamps(d);
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
    if cfg.miniature.is_none()
        && cfg.merge.is_none()
        && cfg.data.is_none()
        && cfg.pivot.is_none()
        && cfg.sources.is_empty()
    {
        return Err(Error::config(
            &cfg.file,
            "nothing to run: the config has no [miniature], [data] or [merge] table",
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
    data_stages(cfg, registry, force, opts.progress, &mut outcome)?;
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
