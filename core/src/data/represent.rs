//! The `represent` stage (SPEC §2): run a source model over every record and
//! keep, at each loss position, its top-k logits and ids, plus each record's
//! `metric_ce` (the mean cross-entropy of its labels).
//!
//! Records are cut into output shards of `rows_per_shard` consecutive rows;
//! `--shard i/n` computes the shards `c` with `c mod n = i`, so several
//! processes can share one output directory. A shard file is written under a
//! temporary name and renamed when complete; a rerun keeps the shards already
//! there and computes the rest, and whichever run completes the set writes
//! `manifest.json`. Within a shard, records are batched by similar length so
//! that little compute goes to padding.
//!
//! Top-k is a single pass that keeps the k best in a small sorted buffer
//! (selection, no sort of the vocabulary), ties going to the lower id.
//!
//! ```
//! use fusechat_core::data::represent::{top_k, cross_entropy};
//! let (ids, vals) = top_k(&[0.5, 3.0, -1.0, 3.0, 2.0], 3);
//! assert_eq!(ids, vec![1, 3, 4]);
//! assert_eq!(vals, vec![3.0, 3.0, 2.0]);
//! let ce = cross_entropy(&[0.0, 0.0], 1);
//! assert!((ce - std::f32::consts::LN_2).abs() < 1e-6);
//! ```

use crate::data::conversation::{self, Skipped};
use crate::data::repr::{
    loss_positions, shard_file, Manifest, RecordCounts, Shard, ShardEntry, FORMAT, VERSION,
};
use crate::data::template::{load_tokenizer, Encoded, Template};
use crate::model::{load_model, CausalLm, LoadOptions};
use crate::pipeline::config::defaults;
use crate::plugin::registry::Registry;
use crate::rng::fnv1a;
use crate::{Error, Result};
use candle_core::Tensor;
use half::f16;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// What `represent` runs on and how.
#[derive(Debug, Clone)]
pub struct RepresentOptions {
    pub model: PathBuf,
    /// The model family; `None` detects it from config.json.
    pub family: Option<String>,
    /// Tokenizer directory; `None` uses the model's.
    pub tokenizer: Option<PathBuf>,
    pub data: PathBuf,
    pub out: PathBuf,
    pub template: String,
    pub top_k: usize,
    pub max_length: usize,
    /// Most rows in one forward pass.
    pub batch_size: usize,
    /// Most tokens (rows × padded length) in one forward pass.
    pub batch_tokens: usize,
    pub rows_per_shard: usize,
    /// `(i, n)`: compute the output shards `c` with `c mod n = i`.
    pub shard: (usize, usize),
    pub device: String,
    pub dtype: Option<candle_core::DType>,
    /// Fail on the first bad record instead of skipping it.
    pub strict: bool,
    /// Recompute everything, replacing whatever representation `out` holds.
    pub force: bool,
    /// Replace a representation made from other inputs or settings (what
    /// `fusechat run` does with its own stage outputs); an up-to-date one is kept.
    pub replace_stale: bool,
    pub progress: bool,
}

impl RepresentOptions {
    pub fn new(model: &Path, data: &Path, out: &Path) -> Self {
        RepresentOptions {
            model: model.to_path_buf(),
            family: None,
            tokenizer: None,
            data: data.to_path_buf(),
            out: out.to_path_buf(),
            template: defaults::TEMPLATE.into(),
            top_k: defaults::TOP_K,
            max_length: defaults::MAX_LENGTH,
            batch_size: defaults::BATCH_SIZE,
            batch_tokens: defaults::BATCH_TOKENS,
            rows_per_shard: defaults::ROWS_PER_SHARD,
            shard: (0, 1),
            device: defaults::DEVICE.into(),
            dtype: None,
            strict: false,
            force: false,
            replace_stale: false,
            progress: false,
        }
    }
}

/// What a `represent` call did.
#[derive(Debug, Clone)]
pub struct RepresentOutcome {
    /// The manifest, once every shard is present.
    pub manifest: Option<Manifest>,
    /// Shards computed by this call, and shards found already written.
    pub computed: Vec<usize>,
    pub reused: Vec<usize>,
    /// Shards that other `--shard` runs still have to compute.
    pub pending: Vec<usize>,
    pub tokens: u64,
    pub seconds: f64,
    /// Seconds spent in the model's forward pass (the rest: top-k, CE, writing).
    pub forward_seconds: f64,
    pub up_to_date: bool,
}

/// The k largest values, descending, with their indices (lower index first among equals).
pub fn top_k(v: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut ids = vec![0u32; k];
    let mut vals = vec![f32::NEG_INFINITY; k];
    top_k_into(v, &mut ids, &mut vals);
    (ids, vals)
}

/// [`top_k`] into caller buffers of length k. NaN values are never selected;
/// with fewer than k finite candidates the rest stay −∞ with id 0.
pub fn top_k_into(v: &[f32], ids: &mut [u32], vals: &mut [f32]) {
    let k = ids.len();
    vals.fill(f32::NEG_INFINITY);
    ids.fill(0);
    if k == 0 {
        return;
    }
    let mut filled = 0usize;
    for (i, &x) in v.iter().enumerate() {
        // Strictly greater than the current k-th: equal later values lose to earlier ones.
        if filled == k && !(x > vals[k - 1]) {
            continue;
        }
        if x.is_nan() {
            continue;
        }
        let mut j = filled.min(k - 1);
        while j > 0 && x > vals[j - 1] {
            vals[j] = vals[j - 1];
            ids[j] = ids[j - 1];
            j -= 1;
        }
        vals[j] = x;
        ids[j] = i as u32;
        filled = (filled + 1).min(k);
    }
}

/// Cross-entropy of `label` under softmax(logits), computed stably in f64.
pub fn cross_entropy(logits: &[f32], label: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum = crate::simd::sum_exp_shifted_f64(logits, max);
    (max + sum.ln() - logits[label] as f64) as f32
}

/// Top-k and CE for one row's loss positions; `logits` is `[L, V]` for this row.
/// A row's top-k, values and `metric_ce` from its logits at its loss positions
/// (`[P, vocab]`, in position order).
fn row_outputs(logits: &[f32], vocab: usize, enc: &Encoded, k: usize) -> (Vec<u32>, Vec<f16>, f32) {
    let pos: Vec<usize> = loss_positions(&enc.labels).collect();
    let mut ids = vec![0u32; pos.len() * k];
    let mut vals32 = vec![0f32; pos.len() * k];
    let mut ce_sum = 0f64;
    for (n, &t) in pos.iter().enumerate() {
        let row = &logits[n * vocab..(n + 1) * vocab];
        top_k_into(
            row,
            &mut ids[n * k..(n + 1) * k],
            &mut vals32[n * k..(n + 1) * k],
        );
        ce_sum += cross_entropy(row, enc.ids[t + 1] as usize) as f64;
    }
    let metric = if pos.is_empty() {
        f32::NAN
    } else {
        (ce_sum / pos.len() as f64) as f32
    };
    (ids, vals32.into_iter().map(f16::from_f32).collect(), metric)
}

/// Batches of row indices with similar lengths, longest first.
fn batches(lens: &[usize], batch_size: usize, batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i]), i));
    let mut out: Vec<Vec<usize>> = Vec::new();
    for i in order {
        match out.last_mut() {
            // Rows come longest first, so the first row of a batch sets its padded length.
            Some(b) if b.len() < batch_size && (b.len() + 1) * lens[b[0]] <= batch_tokens => {
                b.push(i)
            }
            _ => out.push(vec![i]),
        }
    }
    out
}

/// Run the model over one output shard's records.
fn compute_shard(
    model: &dyn CausalLm,
    rows: &[&(u64, Encoded)],
    o: &RepresentOptions,
    pb: &indicatif::ProgressBar,
    forward_seconds: &mut f64,
) -> Result<Shard> {
    let vocab = model.vocab_size();
    let lens: Vec<usize> = rows.iter().map(|r| r.1.ids.len()).collect();
    let mut results: Vec<Option<(Vec<u32>, Vec<f16>, f32)>> = vec![None; rows.len()];
    for batch in batches(&lens, o.batch_size.max(1), o.batch_tokens.max(1)) {
        let l = lens[batch[0]].max(1);
        let b = batch.len();
        let mut ids = vec![0u32; b * l];
        let mut mask = vec![0u32; b * l];
        for (n, &r) in batch.iter().enumerate() {
            ids[n * l..n * l + lens[r]].copy_from_slice(&rows[r].1.ids);
            mask[n * l..n * l + lens[r]].fill(1);
        }
        let dev = model.device();
        let err = crate::model::candle_error;
        let t0 = std::time::Instant::now();
        let ids_t = Tensor::from_vec(ids, (b, l), dev).map_err(err)?;
        let mask_t = Tensor::from_vec(mask, (b, l), dev).map_err(err)?;
        let hidden = model.hidden(&ids_t, &mask_t)?;
        let h = match *hidden.dims() {
            [hb, hl, h] if hb == b && hl == l => h,
            _ => {
                return Err(Error::Plugin(format!(
                    "model family `{}` returned hidden states of shape {:?} for a batch of {b}×{l} tokens; expected [{b}, {l}, hidden]",
                    model.family(),
                    hidden.dims()
                )))
            }
        };
        // The LM head runs on the loss positions only.
        let mut flat = Vec::new();
        let mut spans = Vec::with_capacity(b);
        for (n, &r) in batch.iter().enumerate() {
            let start = flat.len();
            flat.extend(loss_positions(&rows[r].1.labels).map(|t| (n * l + t) as u32));
            spans.push(start..flat.len());
        }
        let positions = flat.len();
        let logits = if positions == 0 {
            None
        } else {
            let flat = Tensor::from_vec(flat, positions, dev).map_err(err)?;
            let at = hidden
                .reshape((b * l, h))
                .and_then(|x| x.index_select(&flat, 0))
                .map_err(err)?;
            let logits = model.logits(&at)?;
            if logits.dims() != [positions, vocab] || logits.dtype() != candle_core::DType::F32 {
                return Err(Error::Plugin(format!(
                    "model family `{}` returned logits of shape {:?} ({:?}) for {positions} positions; expected [{positions}, {vocab}] f32",
                    model.family(),
                    logits.dims(),
                    logits.dtype()
                )));
            }
            Some(logits.contiguous().map_err(err)?)
        };
        *forward_seconds += t0.elapsed().as_secs_f64();
        // Read the logits where they lie on the CPU (a copy elsewhere).
        let copied: Vec<f32>;
        let guard;
        let all: &[f32] = match &logits {
            None => &[],
            Some(t) if t.device().is_cpu() => {
                guard = t.storage_and_layout();
                let (candle_core::Storage::Cpu(cpu), layout) = (&*guard.0, guard.1) else {
                    return Err(Error::Plugin("CPU logits without CPU storage".into()));
                };
                let (a, z) = layout
                    .contiguous_offsets()
                    .ok_or_else(|| Error::Plugin("logits are not contiguous".into()))?;
                &cpu.as_slice::<f32>().map_err(err)?[a..z]
            }
            Some(t) => {
                copied = t.flatten_all().and_then(|t| t.to_vec1()).map_err(err)?;
                &copied
            }
        };
        let outs: Vec<_> = batch
            .par_iter()
            .zip(&spans)
            .map(|(&r, span)| {
                let row = &all[span.start * vocab..span.end * vocab];
                row_outputs(row, vocab, &rows[r].1, o.top_k)
            })
            .collect();
        for (&r, out) in batch.iter().zip(outs) {
            results[r] = Some(out);
        }
        pb.inc(batch.iter().map(|&r| lens[r] as u64).sum());
    }
    let mut shard = Shard::new(o.top_k);
    for (r, res) in rows.iter().zip(results) {
        let (ids, vals, metric) = res.expect("every row is in a batch");
        shard.push(r.0, &r.1.ids, &r.1.labels, &ids, &vals, metric);
    }
    Ok(shard)
}

impl RepresentOutcome {
    /// One line about the run (without the stage name), naming its output `out`.
    pub fn summary(&self, out: &Path) -> String {
        if self.up_to_date {
            return format!("{} is up to date", out.display());
        }
        let tps = self.tokens as f64 / self.seconds.max(1e-9);
        let mut s = format!(
            "{} shard(s) computed, {} reused, {} tokens in {:.2}s ({tps:.0} tokens/s, {:.0}% in the forward pass)",
            self.computed.len(),
            self.reused.len(),
            self.tokens,
            self.seconds,
            100.0 * self.forward_seconds / self.seconds.max(1e-9)
        );
        match &self.manifest {
            Some(m) => s.push_str(&format!(
                "; {} rows ({} skipped, {} without labels) in {}",
                m.records.rows,
                m.records.skipped,
                m.records.no_label,
                out.display()
            )),
            None => s.push_str(&format!(
                "; shards {:?} are left to other --shard runs (the manifest is written by the run that completes the set)",
                self.pending
            )),
        }
        s
    }
}

/// A key of everything that determines the output bytes.
fn settings_key(
    o: &RepresentOptions,
    template: &Template,
    tok_hash: u64,
    data_hash: u64,
) -> Result<(String, serde_json::Value)> {
    if !o.model.is_dir() {
        return Err(Error::model(
            &o.model,
            "is not a directory (an HF model directory is expected)",
        ));
    }
    let model_files = crate::io::model_dir::content_stamps(&o.model);
    let cfg = std::fs::read(o.model.join("config.json")).unwrap_or_default();
    let hf_source = match template {
        Template::Hf { source, .. } => fnv1a(source.as_bytes()),
        _ => 0,
    };
    let settings = serde_json::json!({
        "format": FORMAT, "version": VERSION,
        "model_files": model_files, "config": fnv1a(&cfg),
        "family": o.family, "tokenizer": format!("{tok_hash:016x}"), "data": format!("{data_hash:016x}"),
        "template": template.name(), "hf_template": hf_source,
        "top_k": o.top_k, "max_length": o.max_length, "rows_per_shard": o.rows_per_shard,
    });
    Ok((crate::pipeline::key::stage_key(&settings), settings))
}

const KEY_FILE: &str = "represent.key.json";

/// Prepare the output directory: resume a run with the same key, replace a
/// stale representation when allowed, refuse anything else.
fn prepare_out(o: &RepresentOptions, key: &str, settings: &serde_json::Value) -> Result<()> {
    let out = &o.out;
    let recorded = std::fs::read_to_string(out.join(KEY_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["key"].as_str().map(str::to_string));
    let non_empty = out.is_dir()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
    match recorded {
        Some(k) if k == key && !o.force => {
            // Resuming: a shard a killed run was writing is a temporary whose
            // process is gone; drop those only (other --shard processes may be
            // writing theirs right now).
            for e in std::fs::read_dir(out).map_err(|e| Error::io(out, e))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                match crate::io::writer::tmp_owner(&name) {
                    Some(pid) if name.starts_with("shard-") && crate::io::writer::process_gone(pid) => {
                        tracing::warn!(
                            "removed {}, a shard left half-written by a killed run (process {pid})",
                            e.path().display()
                        );
                        let _ = std::fs::remove_file(e.path());
                    }
                    _ => {}
                }
            }
        }
        Some(_) if o.force || o.replace_stale => clear(out)?,
        Some(_) => {
            return Err(Error::model(
                out,
                "holds a representation made with other inputs or settings; pass --force to replace it, or choose another --out",
            ))
        }
        None if non_empty => {
            return Err(Error::model(out, "exists and is not a fusechat representation directory; choose another --out"))
        }
        None => {}
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let text = serde_json::to_string_pretty(&serde_json::json!({"key": key, "settings": settings}))
        .unwrap();
    crate::io::writer::write_atomic(&out.join(KEY_FILE), text.as_bytes())
}

/// Remove what a representation directory holds (and only that).
fn clear(out: &Path) -> Result<()> {
    for e in std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") || name == crate::data::repr::MANIFEST || name == KEY_FILE {
            std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// What a run reads before it decides anything: the options with absolute
/// paths, the tokenizer and template, the data bytes and the stage key.
struct Prepared {
    o: RepresentOptions,
    tok_dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    tok_hash: u64,
    template: Template,
    data_bytes: Vec<u8>,
    key: String,
    settings: serde_json::Value,
}

fn prepare(o: &RepresentOptions) -> Result<Prepared> {
    // Manifests name the model and data by absolute path, so later stages find
    // them from any working directory.
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let o = RepresentOptions {
        model: absolute(&o.model),
        data: absolute(&o.data),
        tokenizer: o.tokenizer.as_deref().map(absolute),
        ..o.clone()
    };
    let mut inputs: Vec<(&str, &Path)> = vec![("model", &o.model), ("--data", &o.data)];
    inputs.extend(o.tokenizer.as_deref().map(|t| ("tokenizer", t)));
    crate::io::writer::check_out_not_input(&o.out, &inputs)?;
    let (si, sn) = o.shard;
    if sn == 0 || si >= sn {
        return Err(Error::msg(format!(
            "--shard {si}/{sn}: use i/n with 0 ≤ i < n"
        )));
    }
    let mut problems = Vec::new();
    for (name, v, min) in [
        ("top_k", o.top_k, 1),
        ("max_length", o.max_length, 2),
        ("batch_size", o.batch_size, 1),
        ("batch_tokens", o.batch_tokens, 1),
        ("rows_per_shard", o.rows_per_shard, 1),
    ] {
        if v < min {
            problems.push(format!("{name} = {v}: must be at least {min}"));
        }
    }
    if !problems.is_empty() {
        return Err(Error::invalid("the represent request", problems));
    }
    let tok_dir = o.tokenizer.clone().unwrap_or_else(|| o.model.clone());
    let tokenizer = load_tokenizer(&tok_dir)?;
    let vocab = tokenizer.get_vocab_size(true);
    if o.top_k > vocab {
        return Err(Error::msg(format!(
            "top_k = {}: must be at most the vocabulary size, {vocab} tokens (FuseChat keeps 10)",
            o.top_k
        )));
    }
    let tok_hash =
        fnv1a(&std::fs::read(tok_dir.join("tokenizer.json")).map_err(|e| Error::io(&tok_dir, e))?);
    let template = Template::load(&o.template, &tok_dir)?;
    let data_bytes = std::fs::read(&o.data).map_err(|e| Error::io(&o.data, e))?;
    let data_hash = fnv1a(&data_bytes);
    let (key, settings) = settings_key(&o, &template, tok_hash, data_hash)?;
    Ok(Prepared {
        o,
        tok_dir,
        tokenizer,
        tok_hash,
        template,
        data_bytes,
        key,
        settings,
    })
}

/// Whether `o.out` already holds the complete representation these options
/// would compute (same inputs, same settings).
pub fn up_to_date(o: &RepresentOptions) -> Result<bool> {
    let p = prepare(o)?;
    Ok(Manifest::read(&p.o.out).is_ok_and(|m| m.key == p.key))
}

/// Run the stage.
pub fn represent(registry: &Registry, o: &RepresentOptions) -> Result<RepresentOutcome> {
    let start = std::time::Instant::now();
    let mut p = prepare(o)?;
    let data_bytes = std::mem::take(&mut p.data_bytes);
    let o = &p.o;
    if !o.force {
        if let Ok(manifest) = Manifest::read(&o.out) {
            if manifest.key == p.key {
                return Ok(RepresentOutcome {
                    reused: (0..manifest.shards.len()).collect(),
                    manifest: Some(manifest),
                    computed: vec![],
                    pending: vec![],
                    tokens: 0,
                    seconds: start.elapsed().as_secs_f64(),
                    forward_seconds: 0.0,
                    up_to_date: true,
                });
            }
        }
    }
    let text =
        String::from_utf8(data_bytes).map_err(|_| Error::model(&o.data, "is not UTF-8 text"))?;
    // Parsed before the output directory is touched, so --strict fails cleanly.
    let dataset = conversation::parse(&text, &o.data, o.strict)?;
    drop(text);
    let existed = o.out.exists();
    prepare_out(o, &p.key, &p.settings)?;
    let result = represent_into(registry, &p, &dataset, start);
    if result.is_err() {
        forget_failed_start(&o.out, existed);
    }
    result
}

/// After a failed run: when no shard was finished, remove the key this run
/// recorded (a corrected rerun must not be told "made with other settings")
/// and the directory, if this run created it. Finished shards stay for resuming.
fn forget_failed_start(out: &Path, existed: bool) {
    let shards = std::fs::read_dir(out)
        .map(|d| {
            d.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("shard-") && n.ends_with(".safetensors")
            })
        })
        .unwrap_or(false);
    if !shards {
        let _ = std::fs::remove_file(out.join(KEY_FILE));
        if !existed {
            let _ = std::fs::remove_dir(out); // only if empty
        }
    }
}

fn represent_into(
    registry: &Registry,
    p: &Prepared,
    dataset: &conversation::Dataset,
    start: std::time::Instant,
) -> Result<RepresentOutcome> {
    let o = &p.o;
    let (rows, skipped) = encode_rows(p, dataset)?;

    let chunks: Vec<&[(u64, Encoded)]> = rows.chunks(o.rows_per_shard).collect();
    let (si, sn) = o.shard;
    // Shards already here (a killed run's, or other --shard processes') must
    // come from this very key: shards made with other settings are never mixed in.
    for c in 0..chunks.len() {
        let path = o.out.join(shard_file(c));
        if !path.is_file() {
            continue;
        }
        let recorded = Shard::read_key(&path)?;
        if recorded.as_deref() != Some(p.key.as_str()) {
            if o.force || o.replace_stale {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            } else {
                return Err(Error::model(
                    &path,
                    format!(
                        "was made with other inputs or settings (key {}) than this run (key {}); \
                         delete it, or pass --force to recompute the representation",
                        recorded.as_deref().unwrap_or("none"),
                        p.key
                    ),
                ));
            }
        }
    }
    let mine: Vec<usize> = (0..chunks.len()).filter(|c| c % sn == si).collect();
    let (reused, todo): (Vec<usize>, Vec<usize>) = mine
        .iter()
        .partition(|&&c| o.out.join(shard_file(c)).is_file());
    let mut outcome = RepresentOutcome {
        manifest: None,
        computed: vec![],
        reused,
        pending: vec![],
        tokens: 0,
        seconds: 0.0,
        forward_seconds: 0.0,
        up_to_date: false,
    };
    if !outcome.reused.is_empty() {
        tracing::info!(
            "represent: resuming, {} shard(s) already written",
            outcome.reused.len()
        );
    }
    let (vocab_size, family) = if todo.is_empty() {
        let family = o.family.clone();
        let family = family.unwrap_or_else(|| detect_family(registry, &o.model));
        (p.tokenizer.get_vocab_size(true), family)
    } else {
        compute_shards(registry, p, &chunks, &todo, &mut outcome)?
    };
    outcome.pending = (0..chunks.len())
        .filter(|&c| !o.out.join(shard_file(c)).is_file())
        .collect();
    outcome.seconds = start.elapsed().as_secs_f64();
    if !outcome.pending.is_empty() {
        tracing::info!(
            "represent: {} shard(s) still to be computed by other --shard runs; the manifest is written when all are present",
            outcome.pending.len()
        );
        return Ok(outcome);
    }
    let manifest = manifest_of(p, dataset, &chunks, skipped, vocab_size, family);
    manifest.write(&o.out)?;
    outcome.manifest = Some(manifest);
    Ok(outcome)
}

/// Render and tokenize every record (cheap next to the model; in parallel).
/// Returns the rows by row id and the records skipped, by row.
fn encode_rows(
    p: &Prepared,
    dataset: &conversation::Dataset,
) -> Result<(Vec<(u64, Encoded)>, Vec<Skipped>)> {
    let o = &p.o;
    let encoded: Vec<std::result::Result<(u64, Encoded), Skipped>> = dataset
        .records
        .par_iter()
        .map(|c| {
            p.template
                .encode(&p.tokenizer, c, o.max_length)
                // Offsets are not needed past labelling: free them (16 bytes a token).
                .map(|e| {
                    (
                        c.row,
                        Encoded {
                            offsets: Vec::new(),
                            ..e
                        },
                    )
                })
                .map_err(|e| Skipped {
                    row: c.row,
                    id: c.id.clone(),
                    reason: e.to_string(),
                })
        })
        .collect();
    let mut skipped = dataset.skipped.clone();
    let mut rows: Vec<(u64, Encoded)> = Vec::with_capacity(encoded.len());
    for e in encoded {
        match e {
            Ok(r) => rows.push(r),
            Err(s) if o.strict => {
                return Err(Error::model(
                    &o.data,
                    format!("record {}: {}", s.row, s.reason),
                ))
            }
            Err(s) => skipped.push(s),
        }
    }
    skipped.sort_by_key(|s| s.row);
    let vocab_len = p.tokenizer.get_vocab_size(true);
    if let Some(bad) = rows
        .iter()
        .flat_map(|r| r.1.ids.iter())
        .find(|&&id| id as usize >= vocab_len.max(1))
    {
        return Err(Error::model(
            &p.tok_dir,
            format!("the tokenizer produced id {bad} beyond its own vocabulary ({vocab_len})"),
        ));
    }
    Ok((rows, skipped))
}

/// Load the model and compute the shards `todo`, recording them in `outcome`.
/// Returns the model's vocabulary size and family.
fn compute_shards(
    registry: &Registry,
    p: &Prepared,
    chunks: &[&[(u64, Encoded)]],
    todo: &[usize],
    outcome: &mut RepresentOutcome,
) -> Result<(usize, String)> {
    let o = &p.o;
    let opts = LoadOptions {
        device: crate::model::parse_device(&o.device)?,
        dtype: o.dtype,
        ..LoadOptions::default()
    };
    let model = load_model(registry, &o.model, o.family.as_deref(), &opts)?;
    let vocab_size = model.vocab_size();
    let vocab_len = p.tokenizer.get_vocab_size(true);
    if vocab_len > vocab_size {
        return Err(Error::model(
            &o.model,
            format!("the tokenizer has {vocab_len} tokens but the model only {vocab_size} logits; they do not belong together"),
        ));
    }
    let total: u64 = todo
        .iter()
        .flat_map(|&c| chunks[c].iter())
        .map(|r| r.1.ids.len() as u64)
        .sum();
    let pb = crate::merge::engine::progress_bar(
        total,
        o.progress,
        "{spinner} represent [{bar:30}] {human_pos}/{human_len} tokens {per_sec} eta {eta}",
    );
    for &c in todo {
        let refs: Vec<&(u64, Encoded)> = chunks[c].iter().collect();
        let mut shard = compute_shard(model.as_ref(), &refs, o, &pb, &mut outcome.forward_seconds)?;
        shard.key = Some(p.key.clone());
        shard.write(&o.out.join(shard_file(c)), vocab_size)?;
        outcome.computed.push(c);
        outcome.tokens += shard.input_ids.len() as u64;
    }
    pb.finish_and_clear();
    Ok((vocab_size, model.family().to_string()))
}

/// The manifest of a complete set of shards.
fn manifest_of(
    p: &Prepared,
    dataset: &conversation::Dataset,
    chunks: &[&[(u64, Encoded)]],
    skipped: Vec<Skipped>,
    vocab_size: usize,
    family: String,
) -> Manifest {
    let o = &p.o;
    let rows = || chunks.iter().flat_map(|c| c.iter());
    let shards = chunks
        .iter()
        .enumerate()
        .map(|(c, rows)| ShardEntry {
            file: shard_file(c),
            rows: rows.len() as u64,
            first_row: rows.first().map_or(0, |r| r.0),
            last_row: rows.last().map_or(0, |r| r.0),
            tokens: rows.iter().map(|r| r.1.ids.len() as u64).sum(),
            positions: rows
                .iter()
                .map(|r| loss_positions(&r.1.labels).count() as u64)
                .sum(),
        })
        .collect();
    let no_label = rows()
        .filter(|r| loss_positions(&r.1.labels).next().is_none())
        .count() as u64;
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        model: o.model.clone(),
        family,
        tokenizer_hash: format!("{:016x}", p.tok_hash),
        template: p.template.name().into(),
        top_k: o.top_k,
        max_length: o.max_length,
        vocab_size,
        index_dtype: if vocab_size <= 1 << 16 { "u16" } else { "u32" }.into(),
        data: o.data.clone(),
        key: p.key.clone(),
        records: RecordCounts {
            total: dataset.total,
            rows: rows().count() as u64,
            skipped: skipped.len() as u64,
            no_label,
        },
        skipped,
        shards,
        aligned: None,
        filtered: None,
    }
}

fn detect_family(registry: &Registry, dir: &Path) -> String {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| registry.detect_model(&c).map(|m| m.info.name.clone()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_a_full_sort() {
        let mut rng = crate::rng::SplitMix64(3);
        for n in [1usize, 5, 37, 1000] {
            let v: Vec<f32> = (0..n)
                .map(|_| (rng.normal() * 2.0).round() as f32 / 2.0)
                .collect();
            for k in [1usize, 3, 10] {
                let (ids, vals) = top_k(&v, k);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b)));
                for j in 0..k.min(n) {
                    assert_eq!(ids[j] as usize, order[j], "n={n} k={k} j={j}");
                    assert_eq!(vals[j], v[order[j]]);
                }
                assert!(vals[k.min(n)..].iter().all(|x| *x == f32::NEG_INFINITY));
            }
        }
        let (ids, _) = top_k(&[f32::NAN, 1.0, f32::NAN, 2.0], 2);
        assert_eq!(ids, vec![3, 1]);
    }

    #[test]
    fn golden_top_k_and_metric_ce() {
        // ../shared/golden/fusechat_golden.json: `topk` (k=3) and `metric_ce` on logits [1, 6, 8].
        let logits: [f32; 48] = [
            -3.377, -3.457, -0.752, -1.3018, 2.5469, 2.0762, -0.9482, -6.3438, 0.9668, -3.7891,
            1.0498, 0.9243, 0.3596, 3.7129, 3.3496, -0.7417, -4.0586, -5.0859, 1.7002, 2.3809,
            1.7969, -4.6641, -1.0244, 5.5586, 2.25, -1.7568, -0.52, 0.5503, 4.168, 4.7578, 2.8398,
            -2.5312, -1.8408, 0.0948, -1.4785, 0.7451, 1.3193, 0.3372, 1.9229, 1.3232, -0.3069,
            2.377, -0.8691, 0.1575, 1.5684, 6.9062, -4.4062, -4.7617,
        ];
        let want: [[u32; 3]; 6] = [
            [4, 5, 2],
            [5, 6, 2],
            [7, 3, 4],
            [5, 4, 6],
            [6, 7, 4],
            [5, 1, 4],
        ];
        for (t, w) in want.iter().enumerate() {
            assert_eq!(
                top_k(&logits[t * 8..t * 8 + 8], 3).0,
                w.to_vec(),
                "position {t}"
            );
        }
        // labels [-100, -100, -100, 5, 2, -100]: loss positions 2 and 3.
        let enc = Encoded {
            ids: vec![0, 0, 0, 5, 2, 0],
            labels: vec![0, 0, 0, 1, 1, 0],
            offsets: vec![(0, 0); 6],
        };
        // row_outputs takes the logits at the loss positions only (positions 2 and 3)
        let (_, _, metric) = row_outputs(&logits[16..32], 8, &enc, 3);
        assert!((cross_entropy(&logits[16..24], 5) - 10.3047).abs() < 2e-3);
        assert!((cross_entropy(&logits[24..32], 2) - 5.8672).abs() < 2e-3);
        assert!((metric - 8.0859).abs() < 2e-3, "{metric}");
        let none = Encoded {
            labels: vec![0; 6],
            ..enc
        };
        assert!(
            row_outputs(&[], 8, &none, 3).2.is_nan(),
            "golden metric_ce_all_masked is NaN"
        );
    }

    #[test]
    fn batches_group_similar_lengths_within_limits() {
        let lens = [5, 100, 7, 98, 6, 99];
        let b = batches(&lens, 2, 1000);
        assert_eq!(b, vec![vec![1, 5], vec![3, 2], vec![4, 0]]);
        let b = batches(&lens, 8, 250);
        assert!(b
            .iter()
            .all(|g| g.len() * lens[g[0]] <= 250 || g.len() == 1));
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
    }
}
