//! The merge stage: execute a [`Plan`], streaming tensor by tensor.
//!
//! Tensors are merged in parallel on a rayon pool, but a job only starts when
//! its working memory (all inputs in f32 plus the output) fits in the memory
//! budget next to the jobs already running; a job larger than the budget runs
//! alone. Each merged tensor is encoded and written at its place in the
//! output shards at once, so peak memory is a few tensors, not a model.

use crate::error::panic_message;
use crate::io::model_dir::TOKENIZER_FILES;
use crate::io::writer::{write_atomic, OutputDir, ShardedWriter, TensorSpec};
use crate::merge::plan::{MergeRequest, Plan, PlannedTensor};
use crate::merge::{Merged, StatScope, TensorBuf, TensorGroup};
use crate::plugin::registry::Registry;
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Name of the provenance file written into every merged directory.
pub const MERGE_RECORD: &str = "fusechat_merge.json";

/// How to execute a plan.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Bytes of working memory the concurrent jobs may use together; 0 (the
    /// default) means the two largest tensors' jobs ([`Plan::default_budget`]),
    /// so that peak memory is bounded by two tensors whatever the model size.
    pub memory_budget: u64,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            threads: 0,
            memory_budget: 0,
            progress: false,
        }
    }
}

/// The most worker threads a merge starts (`--threads`).
pub const MAX_THREADS: usize = 1024;

impl ExecOptions {
    pub fn threads(&self) -> usize {
        if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.threads
        }
    }

    /// Refuse settings no machine can honour (checked before anything runs).
    pub fn check(&self) -> Result<()> {
        if self.threads > MAX_THREADS {
            return Err(Error::msg(format!(
                "--threads {}: at most {MAX_THREADS} (this machine has {} cores; 0 means one per core)",
                self.threads,
                std::thread::available_parallelism().map_or(1, |n| n.get())
            )));
        }
        Ok(())
    }
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    pub out: PathBuf,
    pub files: Vec<String>,
    pub tensors: usize,
    pub input_bytes: u64,
    pub seconds: f64,
    /// Per tensor, the effective weight of each model, where the method reports one.
    pub weights: Vec<(String, Vec<f64>)>,
    pub warnings: Vec<String>,
}

impl MergeReport {
    /// One line: what was merged, where the output went, how fast.
    pub fn summary(&self) -> String {
        let gbs = self.input_bytes as f64 / 1e9 / self.seconds.max(1e-9);
        format!(
            "merged {} tensors ({:.3} GB of input) into {} in {:.2}s ({gbs:.2} GB/s); files: {}",
            self.tensors,
            self.input_bytes as f64 / 1e9,
            self.out.display(),
            self.seconds,
            self.files.join(", ")
        )
    }
}

/// A counting semaphore over bytes.
struct Budget {
    cap: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn acquire(&self, n: u64) -> u64 {
        let n = n.min(self.cap);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > self.cap {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        n
    }
    fn release(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= n;
        self.freed.notify_all();
    }
}

/// Plan and execute a merge request: the merge stage's one entry point.
pub fn merge(req: &MergeRequest, registry: &Registry, opts: &ExecOptions) -> Result<MergeReport> {
    let plan = crate::merge::plan::plan(req, registry)?;
    execute(&plan, opts)
}

/// Load one planned tensor's inputs as f32.
fn load_group<'a>(
    plan: &Plan,
    t: &'a PlannedTensor,
    scope_stats: Option<Vec<f64>>,
) -> Result<TensorGroup<'a>> {
    let read = |model: usize, name: &str| -> Result<TensorBuf> {
        let entry = plan.models[model].tensor(name);
        let numel = entry.map_or(0, |e| e.numel());
        let mut v = plan.models[model].read_f32_into(name, super::pool::take(numel))?;
        let stored = entry.and_then(|e| e.dtype);
        match (plan.load_dtype, stored) {
            // values stored in the load dtype, or loaded as f32, are already exact
            (Some(d), Some(s)) if d == s || d == crate::io::dtype::DType::F32 => {}
            (Some(d), _) => d.round_trip(&mut v),
            (None, _) => {}
        }
        Ok(v.into())
    };
    let (base, models) = match (&plan.vocab, t.vocab) {
        (Some(v), true) => {
            // rows aligned to the output vocabulary, base first
            let sources: Vec<&crate::merge::plan::TensorSource> =
                t.base.iter().chain(&t.inputs).collect();
            let data = sources
                .iter()
                .map(|s| Ok((s.model, read(s.model, &s.name)?)))
                .collect::<Result<Vec<_>>>()?;
            let width = t.shape[1];
            let views: Vec<(usize, &[f32])> = data.iter().map(|(m, d)| (*m, &d[..])).collect();
            let mut aligned = v.align(&views, width).into_iter().map(TensorBuf::from);
            let base = t.base.as_ref().and_then(|_| aligned.next());
            (base, aligned.collect())
        }
        _ => {
            let base = match &t.base {
                Some(b) => Some(read(b.model, &b.name)?),
                None => None,
            };
            let models = t
                .inputs
                .iter()
                .map(|s| read(s.model, &s.name))
                .collect::<Result<Vec<_>>>()?;
            (base, models)
        }
    };
    Ok(TensorGroup {
        name: &t.name,
        layer: t.layer,
        shape: &t.shape,
        base,
        models,
        params: &t.params,
        seed: plan.seed,
        scope_stats,
    })
}

/// Run a kernel call, turning an error or a panic into an error naming the method and tensor.
fn guarded<T>(plan: &Plan, tensor: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let method = match &plan.method.origin {
        crate::plugin::registry::Origin::BuiltIn => plan.method.info.name.clone(),
        crate::plugin::registry::Origin::Library(p) => {
            format!("plugin `{}` ({})", plan.method.info.name, p.display())
        }
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(
            e @ (Error::NonFinite { .. }
            | Error::Io { .. }
            | Error::Model { .. }
            | Error::Kernel { .. }),
        )) => Err(e),
        Ok(Err(e)) => Err(Error::Kernel {
            method,
            tensor: tensor.into(),
            msg: e.to_string(),
        }),
        Err(p) => Err(Error::Kernel {
            method,
            tensor: tensor.into(),
            msg: format!("the kernel panicked: {}", panic_message(p)),
        }),
    }
}

#[derive(Hash, PartialEq, Eq, Clone, Copy)]
enum ScopeKey {
    Tensor(usize),
    Layer(usize),
    Model,
}

/// The statistics pre-pass: for tensors whose method asked for one, aggregate
/// the per-model statistic over each scope and return each tensor's means.
fn statistics(
    plan: &Plan,
    pool: &rayon::ThreadPool,
    budget: &Budget,
) -> Result<Vec<Option<Vec<f64>>>> {
    let merger = &plan.method.plugin;
    let keys: Vec<Option<ScopeKey>> = plan
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(merger.stat_scope(&t.params)?.map(|s| match (s, t.layer) {
                (StatScope::Tensor, _) | (StatScope::Layer, None) => ScopeKey::Tensor(i),
                (StatScope::Layer, Some(l)) => ScopeKey::Layer(l),
                (StatScope::Model, _) => ScopeKey::Model,
            }))
        })
        .collect::<Result<_>>()?;
    // Tensor-scoped statistics are computed by the kernel itself from its own inputs.
    let needs_pass: Vec<usize> = (0..plan.tensors.len())
        .filter(|&i| matches!(keys[i], Some(ScopeKey::Layer(_) | ScopeKey::Model)))
        .collect();
    if needs_pass.is_empty() {
        return Ok(vec![None; plan.tensors.len()]);
    }
    let per_tensor: Vec<(usize, Vec<(f64, u64)>)> = pool.install(|| {
        needs_pass
            .par_iter()
            .map(|&i| {
                let t = &plan.tensors[i];
                let held = budget.acquire(t.job_bytes());
                let r = guarded(plan, &t.name, || {
                    let g = load_group(plan, t, None)?;
                    merger.statistic(&g)
                });
                budget.release(held);
                r.map(|s| (i, s))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut acc: HashMap<ScopeKey, Vec<(f64, u64)>> = HashMap::new();
    for (i, stats) in per_tensor {
        let key = keys[i].expect("filtered");
        let e = acc
            .entry(key)
            .or_insert_with(|| vec![(0.0, 0); stats.len()]);
        if e.len() != stats.len() {
            return Err(Error::msg(format!(
                "tensor `{}` has {} models but others in its statistics scope have {}",
                plan.tensors[i].name,
                stats.len(),
                e.len()
            )));
        }
        for (a, s) in e.iter_mut().zip(stats) {
            a.0 += s.0;
            a.1 += s.1;
        }
    }
    Ok(keys
        .iter()
        .map(|k| match k {
            Some(k @ (ScopeKey::Layer(_) | ScopeKey::Model)) => acc.get(k).map(|v| {
                v.iter()
                    .map(|(s, n)| if *n > 0 { s / *n as f64 } else { 0.0 })
                    .collect()
            }),
            _ => None,
        })
        .collect())
}

/// A progress bar on stderr with this indicatif template, or a hidden one.
pub fn progress_bar(total: u64, show: bool, template: &str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// Execute a validated plan into its output directory.
pub fn execute(plan: &Plan, opts: &ExecOptions) -> Result<MergeReport> {
    let start = Instant::now();
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    opts.check()?;
    let out = OutputDir::create(&plan.out, plan.force)?;
    let (files, weights) = write_output(plan, opts, &out).map_err(|e| out.blame(e))?;
    let final_path = out.commit()?;
    let seconds = start.elapsed().as_secs_f64();
    tracing::debug!(
        seconds,
        "merged {} tensors into {}",
        plan.tensors.len(),
        final_path.display()
    );
    Ok(MergeReport {
        out: final_path,
        files,
        tensors: plan.tensors.len(),
        input_bytes: plan.input_bytes(),
        seconds,
        weights,
        warnings: plan.warnings.clone(),
    })
}

/// Tensor weights by name, as the method reported them.
type TensorWeights = Vec<(String, Vec<f64>)>;

/// Merge every tensor into `out`'s temporary directory, with config.json,
/// tokenizer files, the model card and the provenance record.
fn write_output(
    plan: &Plan,
    opts: &ExecOptions,
    out: &OutputDir,
) -> Result<(Vec<String>, TensorWeights)> {
    let threads = opts.threads();
    let specs: Vec<TensorSpec> = plan
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.out_dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ShardedWriter::create(out.path(), &specs, plan.max_shard_size)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::msg(format!("cannot start {threads} worker threads: {e}")))?;
    let cap = if opts.memory_budget == 0 {
        plan.default_budget(threads)
    } else {
        opts.memory_budget
    };
    // freed input and output buffers are reused by the next tensors
    let _pool = super::pool::Scope::new(plan.pool_cap());
    let budget = Budget {
        cap: cap.max(1),
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    tracing::info!(
        method = %plan.method.info.name,
        tensors = plan.tensors.len(),
        input_gb = plan.input_bytes() as f64 / 1e9,
        threads,
        "merging into {}",
        plan.out.display()
    );

    let stats = statistics(plan, &pool, &budget)?;
    let pb = progress_bar(plan.input_bytes(), opts.progress, "{spinner} {msg:<10} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}");
    pb.set_message("merging");
    let merger = &plan.method.plugin;
    let weights: Vec<Option<Vec<f64>>> = pool.install(|| {
        (0..plan.tensors.len())
            .into_par_iter()
            .map(|i| {
                let t = &plan.tensors[i];
                let held = budget.acquire(t.job_bytes());
                let r = guarded(plan, &t.name, || {
                    let g = load_group(plan, t, stats[i].clone())?;
                    let Merged { data, weights } = merger.merge(g)?;
                    if data.len() != t.numel() {
                        return Err(Error::msg(format!(
                            "returned {} values for shape {:?} ({} expected)",
                            data.len(),
                            t.shape,
                            t.numel()
                        )));
                    }
                    if let Some(k) = crate::io::dtype::first_non_finite(&data) {
                        return Err(Error::msg(format!(
                            "produced a non-finite value ({}) at element {k}",
                            data[k]
                        )));
                    }
                    writer.write_f32(&t.name, t.out_dtype, &data)?;
                    Ok(weights)
                });
                budget.release(held);
                pb.inc(t.input_bytes);
                r
            })
            .collect::<Result<Vec<_>>>()
    })?;
    pb.finish_and_clear();
    let files = writer.finish()?;

    // config.json, tokenizer files, model card and provenance record.
    let dir = out.path();
    let config_text = serde_json::to_string_pretty(&plan.config).expect("JSON value");
    write_atomic(&dir.join("config.json"), config_text.as_bytes())?;
    let tok_src = &plan.models[plan.tokenizer_from].path;
    for f in TOKENIZER_FILES {
        let src = tok_src.join(f);
        if src.is_file() {
            std::fs::copy(&src, dir.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    // tokenizer_source = union: the base's tokenizer with the other models' tokens added
    if let Some(json) = plan.vocab.as_ref().and_then(|v| v.tokenizer_json.as_ref()) {
        write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        // the slow tokenizer's files would not know the added tokens
        let _ = std::fs::remove_file(dir.join("tokenizer.model"));
    }
    let weights: Vec<(String, Vec<f64>)> = plan
        .tensors
        .iter()
        .zip(weights)
        .filter_map(|(t, w)| w.map(|w| (t.name.clone(), w)))
        .collect();
    write_atomic(&dir.join("README.md"), model_card(plan).as_bytes())?;
    let record = serde_json::json!({
        "fusechat_version": env!("CARGO_PKG_VERSION"),
        "origin": plan.origin,
        "stage_key": plan.stage_key,
        "request": plan.request,
        "inputs": plan.labels,
        "warnings": plan.warnings,
        "weights": weights.iter().map(|(n, w)| serde_json::json!({"tensor": n, "weights": w})).collect::<Vec<_>>(),
    });
    write_atomic(
        &dir.join(MERGE_RECORD),
        serde_json::to_string_pretty(&record)
            .expect("JSON value")
            .as_bytes(),
    )?;
    Ok((files, weights))
}

/// The README.md model card of a merged directory.
fn model_card(plan: &Plan) -> String {
    let base = plan.tensors[0]
        .base
        .as_ref()
        .map(|b| plan.labels[b.model].clone());
    let mut s = String::from("---\nlibrary_name: transformers\ntags:\n- merge\n- fusechat\n");
    if let Some(b) = &base {
        s.push_str(&format!("base_model: {b}\n"));
    }
    s.push_str("---\n\n# Merged model\n\n");
    s.push_str(&format!(
        "Merged with [fusechat](https://example.invalid/fusechat) {} using the **{}** method ({}).\n\n",
        env!("CARGO_PKG_VERSION"),
        plan.method.info.name,
        plan.method.info.description
    ));
    if let Some(b) = &base {
        s.push_str(&format!("Base model: `{b}`\n\n"));
    }
    s.push_str("Inputs:\n");
    for l in &plan.labels {
        s.push_str(&format!("- `{l}`\n"));
    }
    s.push_str(&format!(
        "\n## Configuration\n\nRequested via {}:\n\n```json\n{}\n```\n",
        plan.origin,
        serde_json::to_string_pretty(&plan.request).expect("JSON value")
    ));
    s
}
