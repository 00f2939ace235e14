//! The `fuse` stage: fine-tune a copy of the pivot on a `DistillLoss` against
//! the teachers' aligned top-k, giving one target model (SPEC §5).
//!
//! Semantics (what the reference trainer computes):
//! - an epoch draws micro-batches of `batch_size` records of similar lengths,
//!   padded to the batch's longest ([`crate::train::batch::micro_batches`]);
//! - an optimizer step accumulates `grad_accum` micro-batches, each loss
//!   divided by `grad_accum` and the gradients summed (Hugging Face; with
//!   `loss_norm = tokens` each micro-batch is weighted by its share of the
//!   step's loss tokens instead); an epoch's last step takes what is left;
//! - the student's LM head runs on the loss positions only;
//! - the gradients are clipped to `max_grad_norm` (PyTorch's rule) and AdamW
//!   steps with the schedule's rate for that step ([`crate::train::adamw`],
//!   [`crate::train::schedule`]);
//! - training stops after `epochs` epochs, or after `max_steps` steps.
//!
//! Output: checkpoints in `OUT/checkpoint-N/` (an HF model directory in the
//! training dtype, the optimizer state and `trainer_state.json`) every
//! `save_every` steps and at the end, then the final model in `OUT` (an HF
//! directory in the pivot's dtype) and `OUT/fusechat_fuse.json`, written last,
//! which marks it finished and holds the stage key. `resume` continues from the
//! newest checkpoint and reproduces the uninterrupted run bit for bit on CPU.

use crate::data::repr::Manifest;
use crate::io::dtype::DType;
use crate::io::model_dir::content_stamps;
use crate::merge::params::{ResolvedParams, Scalar};
use crate::model::{candle_error as ce, load_model, CausalLm, LoadOptions};
use crate::pipeline::config::defaults;
use crate::pipeline::key::stage_key;
use crate::plugin::registry::Registry;
use crate::train::adamw::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::batch::{self, FuseData};
use crate::train::schedule::{Schedule, Scheduler};
use crate::train::{LossBatch, TeacherView};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The record written last into a finished output.
pub const FUSE_RECORD: &str = "fusechat_fuse.json";
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// How each micro-batch's loss is scaled within an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossNorm {
    /// Divided by `grad_accum` (Hugging Face).
    Accum,
    /// Weighted by the micro-batch's share of the step's loss tokens.
    Tokens,
}

impl LossNorm {
    pub fn parse(s: &str) -> Result<LossNorm> {
        match s {
            "accum" => Ok(LossNorm::Accum),
            "tokens" => Ok(LossNorm::Tokens),
            other => Err(Error::msg(format!(
                "loss_norm `{other}`: use accum or tokens"
            ))),
        }
    }
}

/// What `fuse` runs on and how.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// The pivot's HF model directory (the student's initial weights).
    pub pivot: PathBuf,
    pub family: Option<String>,
    /// The pivot's own representation (`repr/pivot`).
    pub pivot_repr: PathBuf,
    /// The teachers' aligned representations (`repr/<src>@pivot`).
    pub teachers: Vec<PathBuf>,
    pub out: PathBuf,
    pub loss: String,
    pub params: BTreeMap<String, Scalar>,
    pub lr: f64,
    pub scheduler: Schedule,
    pub warmup_ratio: f64,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub loss_norm: LossNorm,
    pub seed: u64,
    /// Save a checkpoint every this many optimizer steps (0: only at the end).
    pub save_every: u64,
    /// One JSON line per optimizer step.
    pub log: Option<PathBuf>,
    pub resume: bool,
    /// Start over, replacing an output or checkpoints made with other settings.
    pub force: bool,
    /// Replace a finished output made with other settings (what `fusechat run` does).
    pub replace_stale: bool,
    pub device: String,
    /// Weights whose name contains any of these stay frozen.
    pub freeze: Vec<String>,
    pub progress: bool,
}

impl FuseOptions {
    /// FuseChat's defaults (SPEC §5) for the given inputs.
    pub fn new(pivot: &Path, pivot_repr: &Path, teachers: &[PathBuf], out: &Path) -> FuseOptions {
        FuseOptions {
            pivot: pivot.to_path_buf(),
            family: None,
            pivot_repr: pivot_repr.to_path_buf(),
            teachers: teachers.to_vec(),
            out: out.to_path_buf(),
            loss: defaults::LOSS.into(),
            params: BTreeMap::new(),
            lr: defaults::LR,
            scheduler: Schedule::Cosine,
            warmup_ratio: defaults::WARMUP_RATIO,
            epochs: defaults::EPOCHS,
            max_steps: None,
            batch_size: defaults::FUSE_BATCH_SIZE,
            grad_accum: defaults::GRAD_ACCUM,
            max_grad_norm: defaults::MAX_GRAD_NORM,
            weight_decay: 0.0,
            loss_norm: LossNorm::Accum,
            seed: defaults::SEED,
            save_every: 0,
            log: None,
            resume: false,
            force: false,
            replace_stale: false,
            device: defaults::DEVICE.into(),
            freeze: Vec::new(),
            progress: false,
        }
    }

    /// Every number in its range, or every problem at once.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.lr.is_finite() && self.lr > 0.0) {
            p.push(format!(
                "lr = {}: use a finite rate > 0 (at 0 no weight would move)",
                self.lr
            ));
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            p.push(format!(
                "warmup_ratio = {}: use a value in [0, 1]",
                self.warmup_ratio
            ));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            p.push("epochs = 0: use at least 1 (or max_steps)".into());
        }
        if self.max_steps == Some(0) {
            p.push("max_steps = 0: use at least 1".into());
        }
        if self.batch_size == 0 {
            p.push("batch_size = 0: use at least 1".into());
        }
        if self.grad_accum == 0 {
            p.push("grad_accum = 0: use at least 1".into());
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            p.push(format!(
                "max_grad_norm = {}: use a finite value ≥ 0 (0: no clipping)",
                self.max_grad_norm
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            p.push(format!(
                "weight_decay = {}: use a finite value ≥ 0",
                self.weight_decay
            ));
        }
        p
    }
}

/// What a `fuse` call did.
#[derive(Debug, Clone)]
pub struct FuseOutcome {
    pub up_to_date: bool,
    pub steps: u64,
    /// Steps computed by this call (a resumed run skips the earlier ones).
    pub computed_steps: u64,
    pub last_loss: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
    pub out: PathBuf,
    pub records: usize,
    pub teachers: Vec<String>,
}

impl FuseOutcome {
    pub fn summary(&self) -> String {
        if self.up_to_date {
            return format!("{} is up to date", self.out.display());
        }
        format!(
            "{} optimizer steps ({} computed now) on {} records with teachers {}; last loss {}; {:.0} loss tokens/s; model in {}",
            self.steps,
            self.computed_steps,
            self.records,
            if self.teachers.is_empty() { "none (plain SFT)".to_string() } else { self.teachers.join(", ") },
            self.last_loss.map_or("-".to_string(), |l| format!("{l:.4}")),
            self.tokens as f64 / self.seconds.max(1e-9),
            self.out.display()
        )
    }
}

/// The settings that determine the output, as JSON (its stage key is the hash).
fn settings(o: &FuseOptions, data_keys: &[String], params: &ResolvedParams) -> serde_json::Value {
    serde_json::json!({
        "pivot_files": content_stamps(&o.pivot),
        "family": o.family,
        "representations": data_keys,
        "loss": o.loss,
        "params": params.shared.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<BTreeMap<_, _>>(),
        "lr": o.lr, "scheduler": o.scheduler.name(), "warmup_ratio": o.warmup_ratio,
        "epochs": o.epochs, "max_steps": o.max_steps, "batch_size": o.batch_size,
        "grad_accum": o.grad_accum, "max_grad_norm": o.max_grad_norm,
        "weight_decay": o.weight_decay, "loss_norm": format!("{:?}", o.loss_norm),
        "seed": o.seed, "device": o.device, "freeze": o.freeze,
    })
}

/// The stage key recorded in a finished output, if it is one.
pub fn recorded_key(out: &Path) -> Option<String> {
    let text = std::fs::read_to_string(out.join(FUSE_RECORD)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["stage_key"].as_str().map(str::to_string)
}

/// The stage key of these options: everything that determines the output.
pub fn key(o: &FuseOptions, registry: &Registry) -> Result<String> {
    let entry = registry.loss(&o.loss)?;
    let params = entry.info.resolve_scalars(&o.params)?;
    let mut keys = vec![Manifest::read(&o.pivot_repr)?.key];
    for t in &o.teachers {
        keys.push(Manifest::read(t)?.key);
    }
    Ok(stage_key(&settings(o, &keys, &params)))
}

/// Whether `o.out` already holds this run's finished model.
pub fn up_to_date(o: &FuseOptions, registry: &Registry) -> Result<bool> {
    Ok(recorded_key(&o.out) == Some(key(o, registry)?))
}

/// One optimizer step's micro-batches, and where the step is in training.
struct StepPlan {
    /// Fraction of an epoch done after this step (for the log's `epoch`).
    epoch_pos: f64,
    micro: Vec<Vec<usize>>,
}

/// Every optimizer step of the run, in order.
fn plan_steps(data: &FuseData, o: &FuseOptions) -> Vec<StepPlan> {
    let lengths: Vec<usize> = data.records.iter().map(|r| r.input_ids.len()).collect();
    let mut steps = Vec::new();
    let mut epoch = 0u64;
    loop {
        let batches = batch::micro_batches(&lengths, o.batch_size, o.seed, epoch);
        let per_epoch = batches.len().div_ceil(o.grad_accum);
        for (s, chunk) in batches.chunks(o.grad_accum).enumerate() {
            steps.push(StepPlan {
                epoch_pos: epoch as f64 + (s + 1) as f64 / per_epoch as f64,
                micro: chunk.to_vec(),
            });
            if o.max_steps.is_some_and(|m| steps.len() as u64 >= m) {
                return steps;
            }
        }
        epoch += 1;
        if o.max_steps.is_none() && epoch >= o.epochs {
            return steps;
        }
    }
}

/// What the trainer restores from a checkpoint.
struct Resumed {
    step: u64,
    dir: PathBuf,
}

/// The newest complete checkpoint in `out` and the key it was made with.
fn latest_checkpoint(out: &Path) -> Option<(u64, PathBuf, String)> {
    let mut best: Option<(u64, PathBuf, String)> = None;
    for e in std::fs::read_dir(out).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(e.path().join(STATE)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let key = v["stage_key"].as_str().unwrap_or_default().to_string();
        if best.as_ref().is_none_or(|b| n > b.0) {
            best = Some((n, e.path(), key));
        }
    }
    best
}

/// Decide what to do with `o.out` before training: resume, start over, or refuse.
fn prepare_out(o: &FuseOptions, key: &str) -> Result<Option<Resumed>> {
    let out = &o.out;
    if !out.exists() {
        return Ok(None);
    }
    if !out.is_dir() {
        return Err(Error::model(
            out,
            "exists and is not a directory; choose another --out",
        ));
    }
    let finished = recorded_key(out);
    let checkpoint = latest_checkpoint(out);
    let non_empty = std::fs::read_dir(out)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if finished.is_none() && checkpoint.is_none() && non_empty {
        return Err(Error::model(
            out,
            "exists and is not a fuse output (no fusechat_fuse.json, no checkpoint-N); choose another --out",
        ));
    }
    if o.force || (o.replace_stale && finished.as_deref() != Some(key)) {
        clear(out)?;
        return Ok(None);
    }
    if let Some(k) = finished {
        if k != key {
            return Err(Error::model(
                out,
                "holds a fused model made with other inputs or settings; pass --force to replace it, or choose another --out",
            ));
        }
    }
    match checkpoint {
        Some((n, dir, k)) if o.resume => {
            if k != key {
                return Err(Error::model(
                    &dir,
                    "was made with other inputs or settings than this run; pass --force to start over (the checkpoints are deleted)",
                ));
            }
            Ok(Some(Resumed { step: n, dir }))
        }
        Some((n, _, _)) if recorded_key(out).is_none() => Err(Error::model(
            out,
            format!("holds checkpoints of an unfinished run (up to step {n}); pass --resume to continue it, or --force to start over"),
        )),
        _ => Ok(None),
    }
}

/// Remove what a fuse output holds (checkpoints, the model, the record), and
/// only that.
fn clear(out: &Path) -> Result<()> {
    for e in std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("checkpoint-")
            || name == FUSE_RECORD
            || name == "config.json"
            || name == "generation_config.json"
            || name.ends_with(".safetensors")
            || name == crate::io::model_dir::INDEX_FILE
            || crate::io::model_dir::TOKENIZER_FILES.contains(&name.as_str());
        if !ours {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|err| Error::io(&p, err))?;
    }
    Ok(())
}

/// The dtype to write the final model in: the pivot's `torch_dtype`, else f32.
fn pivot_dtype(pivot: &Path) -> DType {
    std::fs::read_to_string(pivot.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["torch_dtype"].as_str().and_then(DType::parse))
        .unwrap_or(DType::F32)
}

/// Run the stage.
pub fn fuse(registry: &Registry, o: &FuseOptions) -> Result<FuseOutcome> {
    let start = Instant::now();
    let problems = o.problems();
    if !problems.is_empty() {
        return Err(Error::invalid("the fuse request", problems));
    }
    let entry = registry.loss(&o.loss)?.clone();
    let params = entry.info.resolve_scalars(&o.params)?;
    entry.plugin.check(&params, o.teachers.len())?;
    let mut inputs: Vec<(&str, &Path)> =
        vec![("pivot", &o.pivot), ("pivot representation", &o.pivot_repr)];
    inputs.extend(
        o.teachers
            .iter()
            .map(|t| ("teacher representation", t.as_path())),
    );
    crate::io::writer::check_out_not_input(&o.out, &inputs)?;
    let key = key(o, registry)?;
    if !o.force && recorded_key(&o.out).as_deref() == Some(key.as_str()) {
        return Ok(FuseOutcome {
            up_to_date: true,
            steps: 0,
            computed_steps: 0,
            last_loss: None,
            tokens: 0,
            seconds: start.elapsed().as_secs_f64(),
            out: o.out.clone(),
            records: 0,
            teachers: Vec::new(),
        });
    }
    let data = batch::load(&o.pivot_repr, &o.teachers)?;
    check_pivot(o, &data.pivot)?;
    let resumed = prepare_out(o, &key)?;

    let device = crate::model::parse_device(&o.device)?;
    let model_dir = resumed.as_ref().map_or(o.pivot.clone(), |r| r.dir.clone());
    let model = load_model(
        registry,
        &model_dir,
        o.family.as_deref(),
        &LoadOptions {
            device: device.clone(),
            trainable: true,
            freeze: o.freeze.clone(),
            dtype: None,
        },
    )?;
    check_teacher_ids(&data, model.vocab_size(), &o.pivot)?;
    let vars: Vec<(String, candle_core::Var)> = model.trainable();
    if vars.is_empty() {
        return Err(Error::msg(
            "every weight is frozen: nothing to train (check --freeze)",
        ));
    }
    let mut opt = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        AdamWConfig {
            weight_decay: o.weight_decay,
            ..Default::default()
        },
    );
    let steps = plan_steps(&data, o);
    let total = steps.len() as u64;
    let sched = Scheduler::new(o.scheduler, o.lr, o.warmup_ratio, total);
    let first = match &resumed {
        Some(r) => {
            load_optimizer(&mut opt, &vars, &r.dir)?;
            tracing::info!("resuming from {} (step {})", r.dir.display(), r.step);
            r.step
        }
        None => 0,
    };
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let mut log = open_log(o, first)?;
    let pb = crate::merge::engine::progress_bar(
        total,
        o.progress,
        "{spinner} fuse [{bar:30}] step {pos}/{len} {msg} eta {eta}",
    );
    pb.set_position(first);
    let teacher_names: Vec<String> = data.names[1..].to_vec();
    let mut last_loss = None;
    let mut tokens_total = 0u64;
    let train_start = Instant::now();
    for (s, step) in steps.iter().enumerate().skip(first as usize) {
        let s = s as u64;
        let t0 = Instant::now();
        let lr = sched.lr(s);
        let progress = s as f64 / total as f64;
        let mut r = train_step(
            model.as_ref(),
            &*entry.plugin,
            &params,
            &data,
            step,
            o,
            progress,
            &vars,
        )?;
        let grad_norm = clip_grad_norm(&mut r.grads, o.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(Error::msg(format!(
                "step {}: the gradient norm is {grad_norm}; training diverged (lower --lr, or check the data)",
                s + 1
            )));
        }
        opt.step(&r.grads, lr)?;
        tokens_total += r.tokens;
        last_loss = Some(r.loss);
        let line = log_line(s, step, lr, &r, grad_norm, t0.elapsed().as_secs_f64());
        if let Some(f) = log.as_mut() {
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .map_err(|e| Error::io(o.log.as_ref().expect("open"), e))?;
        }
        pb.set_message(format!(
            "loss {:.4} {:.0} tok/s",
            r.loss,
            tokens_total as f64 / train_start.elapsed().as_secs_f64().max(1e-9)
        ));
        pb.inc(1);
        if (o.save_every > 0 && (s + 1) % o.save_every == 0) || s + 1 == total {
            save_checkpoint(model.as_ref(), &opt, &vars, o, &key, s + 1)?;
        }
    }
    pb.finish_and_clear();
    save_final(model.as_ref(), o, &key, total, last_loss)?;
    Ok(FuseOutcome {
        up_to_date: false,
        steps: total,
        computed_steps: total - first,
        last_loss,
        tokens: tokens_total,
        seconds: start.elapsed().as_secs_f64(),
        out: o.out.clone(),
        records: data.records.len(),
        teachers: teacher_names,
    })
}

/// Every teacher id must be a token of the pivot's vocabulary.
fn check_teacher_ids(data: &FuseData, vocab: usize, pivot: &Path) -> Result<()> {
    let beyond = data.records.iter().find_map(|r| {
        r.teachers.iter().zip(&data.names).find_map(|(t, n)| {
            t.ids
                .iter()
                .find(|&&i| i as usize >= vocab)
                .map(|i| (n, *i))
        })
    });
    match beyond {
        None => Ok(()),
        Some((name, id)) => Err(Error::model(
            pivot,
            format!(
                "teacher `{name}` has top-k id {id}, beyond the pivot's vocabulary of {vocab}: its representation was not aligned to this pivot"
            ),
        )),
    }
}

/// The step's line of the JSONL log.
fn log_line(
    s: u64,
    step: &StepPlan,
    lr: f64,
    r: &StepResult,
    grad_norm: f64,
    seconds: f64,
) -> serde_json::Value {
    serde_json::json!({
        "step": s + 1,
        "epoch": step.epoch_pos,
        "lr": lr,
        "loss": r.loss,
        "lm_loss": r.lm_loss,
        "fuse_loss": r.fuse_loss,
        "grad_norm": grad_norm,
        "tokens": r.tokens,
        "seconds": seconds,
        "teacher_by_row": r
            .teacher_by_row
            .iter()
            .map(|(id, t)| (id.to_string(), serde_json::Value::String(t.clone())))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The pivot directory must be the model the pivot's representation was made
/// from: the same tokenizer and the same vocabulary.
fn check_pivot(o: &FuseOptions, m: &Manifest) -> Result<()> {
    let tok = std::fs::read(o.pivot.join("tokenizer.json"))
        .map(|b| format!("{:016x}", crate::rng::fnv1a(&b)))
        .ok();
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(o.pivot.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let vocab = cfg
        .as_ref()
        .and_then(|c| c["vocab_size"].as_u64())
        .map(|v| v as usize);
    let mut why = Vec::new();
    if tok.as_deref().is_some_and(|t| t != m.tokenizer_hash) {
        why.push(format!(
            "its tokenizer.json (hash {}) is not the one the representation used ({})",
            tok.unwrap_or_default(),
            m.tokenizer_hash
        ));
    }
    if vocab.is_some_and(|v| v != m.vocab_size) {
        why.push(format!(
            "its vocab_size {} is not the representation's {}",
            vocab.unwrap_or_default(),
            m.vocab_size
        ));
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(Error::model(
            &o.pivot,
            format!(
                "is not the model the pivot representation {} was made from ({}): {}",
                o.pivot_repr.display(),
                m.model.display(),
                why.join("; ")
            ),
        ))
    }
}

/// What one optimizer step computed.
struct StepResult {
    grads: Vec<Vec<f32>>,
    loss: f64,
    lm_loss: f64,
    fuse_loss: f64,
    tokens: u64,
    teacher_by_row: Vec<(u64, String)>,
}

/// Forward and backward over a step's micro-batches, gradients summed in f32.
#[allow(clippy::too_many_arguments)]
fn train_step(
    model: &dyn CausalLm,
    loss: &dyn crate::train::DistillLoss,
    params: &ResolvedParams,
    data: &FuseData,
    step: &StepPlan,
    o: &FuseOptions,
    progress: f64,
    vars: &[(String, candle_core::Var)],
) -> Result<StepResult> {
    let mut grads: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| vec![0f32; v.elem_count()])
        .collect();
    let step_tokens: usize = step
        .micro
        .iter()
        .flat_map(|m| m.iter().map(|&r| data.records[r].positions.len()))
        .sum();
    let (mut loss_sum, mut lm_sum, mut fuse_sum) = (0f64, 0f64, 0f64);
    let mut teacher_by_row = Vec::new();
    for micro in &step.micro {
        let mb = MicroBatch::new(data, micro, model.device())?;
        let hidden = model.hidden(&mb.ids, &mb.mask)?;
        let (b, l, h) = hidden.dims3().map_err(ce)?;
        let logits = hidden
            .reshape((b * l, h))
            .and_then(|x| x.index_select(&mb.flat_positions, 0))
            .map_err(ce)
            .and_then(|x| model.logits(&x))?;
        let views: Vec<TeacherView<'_>> = (0..data.names.len())
            .map(|c| TeacherView {
                name: &data.names[c],
                k: data.k[c],
                ids: &mb.teacher_ids[c],
                logits: &mb.teacher_logits[c],
                metric_ce: &mb.metrics[c],
            })
            .collect();
        let out = loss.loss(
            params,
            &LossBatch {
                logits: &logits,
                labels: &mb.labels,
                record: &mb.record,
                records: micro.len(),
                teachers: &views,
                progress,
            },
        )?;
        let n = mb.labels.len();
        let weight = match o.loss_norm {
            LossNorm::Accum => 1.0 / o.grad_accum as f64,
            LossNorm::Tokens => n as f64 / step_tokens.max(1) as f64,
        };
        let value = out
            .loss
            .to_dtype(candle_core::DType::F64)
            .and_then(|x| x.to_scalar::<f64>())
            .map_err(ce)?;
        if !value.is_finite() {
            return Err(Error::msg(format!(
                "the loss is {value} on records {:?}; training diverged (lower --lr, or check the data)",
                micro.iter().map(|&r| data.records[r].row_id).collect::<Vec<_>>()
            )));
        }
        let share = n as f64 / step_tokens.max(1) as f64;
        loss_sum += value * share;
        lm_sum += out.lm_loss * share;
        fuse_sum += out.fuse_loss * share;
        let store = (out.loss * weight).and_then(|x| x.backward()).map_err(ce)?;
        for (i, (_, var)) in vars.iter().enumerate() {
            if let Some(g) = store.get(var.as_tensor()) {
                let g: Vec<f32> = g
                    .flatten_all()
                    .and_then(|x| x.to_dtype(candle_core::DType::F32))
                    .and_then(|x| x.to_vec1())
                    .map_err(ce)?;
                grads[i].iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            }
        }
        for (r, &rec) in micro.iter().enumerate() {
            let who = out.teacher_of_record.get(r).copied().flatten();
            teacher_by_row.push((
                data.records[rec].row_id,
                who.map_or("pivot".to_string(), |c| data.names[c].clone()),
            ));
        }
    }
    Ok(StepResult {
        grads,
        loss: loss_sum,
        lm_loss: lm_sum,
        fuse_loss: fuse_sum,
        tokens: step_tokens as u64,
        teacher_by_row,
    })
}

/// One micro-batch as tensors, with each candidate's top-k rows borrowed
/// from the data record by record.
struct MicroBatch<'a> {
    ids: Tensor,
    mask: Tensor,
    /// Row-major indices of the loss positions in the `[B·L]` flattening.
    flat_positions: Tensor,
    labels: Vec<u32>,
    record: Vec<usize>,
    teacher_ids: Vec<Vec<&'a [u32]>>,
    teacher_logits: Vec<Vec<&'a [half::f16]>>,
    metrics: Vec<Vec<f32>>,
}

impl<'a> MicroBatch<'a> {
    fn new(data: &'a FuseData, micro: &[usize], device: &Device) -> Result<MicroBatch<'a>> {
        let b = micro.len();
        let l = micro
            .iter()
            .map(|&r| data.records[r].input_ids.len())
            .max()
            .unwrap_or(1);
        let candidates = data.names.len();
        let mut ids = vec![0u32; b * l];
        let mut mask = vec![0u32; b * l];
        let mut flat = Vec::new();
        let mut labels = Vec::new();
        let mut record = Vec::new();
        let mut teacher_ids = vec![Vec::with_capacity(b); candidates];
        let mut teacher_logits = vec![Vec::with_capacity(b); candidates];
        let mut metrics = vec![Vec::with_capacity(b); candidates];
        for (i, &r) in micro.iter().enumerate() {
            let rec = &data.records[r];
            let n = rec.input_ids.len();
            ids[i * l..i * l + n].copy_from_slice(&rec.input_ids);
            mask[i * l..i * l + n].iter_mut().for_each(|m| *m = 1);
            for &t in &rec.positions {
                flat.push((i * l + t as usize) as u32);
                labels.push(rec.input_ids[t as usize + 1]);
                record.push(i);
            }
            for c in 0..candidates {
                let t = &rec.teachers[c];
                teacher_ids[c].push(&t.ids[..]);
                teacher_logits[c].push(&t.logits[..]);
                metrics[c].push(t.metric_ce);
            }
        }
        let n = flat.len();
        Ok(MicroBatch {
            ids: Tensor::from_vec(ids, (b, l), device).map_err(ce)?,
            mask: Tensor::from_vec(mask, (b, l), device).map_err(ce)?,
            flat_positions: Tensor::from_vec(flat, n, device).map_err(ce)?,
            labels,
            record,
            teacher_ids,
            teacher_logits,
            metrics,
        })
    }
}

/// Open the step log; a resumed run keeps the lines of the steps before its
/// checkpoint and drops the rest (a killed run may have logged past it).
fn open_log(o: &FuseOptions, first: u64) -> Result<Option<std::fs::File>> {
    let Some(path) = &o.log else { return Ok(None) };
    let kept: String = if first > 0 {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= first)
            })
            .map(|l| format!("{l}\n"))
            .collect()
    } else {
        String::new()
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    crate::io::writer::write_atomic(path, kept.as_bytes())?;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    Ok(Some(f))
}

/// `OUT/checkpoint-N`: the model in the training dtype (so that a resumed run
/// continues from the exact weights), the optimizer's moments and step, and
/// `trainer_state.json` (the step, the seed, the stage key), written last.
fn save_checkpoint(
    model: &dyn CausalLm,
    opt: &AdamW,
    vars: &[(String, candle_core::Var)],
    o: &FuseOptions,
    key: &str,
    step: u64,
) -> Result<()> {
    let dir = o.out.join(format!("checkpoint-{step}"));
    let train_dtype = match vars.first().map(|(_, v)| v.dtype()) {
        Some(candle_core::DType::BF16) => DType::BF16,
        Some(candle_core::DType::F16) => DType::F16,
        _ => DType::F32,
    };
    model.save(&dir, train_dtype)?;
    // optimizer moments as f32 safetensors, one pair per variable
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (i, (name, var)) in vars.iter().enumerate() {
        tensors.push((format!("m.{name}"), var.dims().to_vec(), opt.m[i].clone()));
        tensors.push((format!("v.{name}"), var.dims().to_vec(), opt.v[i].clone()));
    }
    let specs: Vec<crate::io::writer::TensorSpec> = tensors
        .iter()
        .map(|(n, s, _)| crate::io::writer::TensorSpec {
            name: n.clone(),
            dtype: DType::F32,
            shape: s.clone(),
        })
        .collect();
    let tmp = dir.join(format!(".optimizer.{}", crate::io::writer::tmp_suffix()));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let w = crate::io::writer::ShardedWriter::create(&tmp, &specs, u64::MAX)?;
    for (n, _, v) in &tensors {
        w.write_f32(n, DType::F32, v)?;
    }
    w.finish()?;
    std::fs::rename(tmp.join("model.safetensors"), dir.join(OPTIMIZER))
        .map_err(|e| Error::io(dir.join(OPTIMIZER), e))?;
    let _ = std::fs::remove_dir_all(&tmp);
    let state = serde_json::json!({
        "step": step,
        "adam_step": opt.t,
        "seed": o.seed,
        "stage_key": key,
    });
    crate::io::writer::write_atomic(
        &dir.join(STATE),
        serde_json::to_string_pretty(&state)
            .expect("JSON")
            .as_bytes(),
    )?;
    // keep the newest checkpoint and the one before it
    if let Some((n, _, _)) = latest_checkpoint(&o.out) {
        for e in std::fs::read_dir(&o.out)
            .map_err(|e| Error::io(&o.out, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(m) = name
                .strip_prefix("checkpoint-")
                .and_then(|m| m.parse::<u64>().ok())
            {
                if m + 2 * o.save_every.max(1) <= n && m < n {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    Ok(())
}

/// Restore the optimizer's moments and step from a checkpoint.
fn load_optimizer(opt: &mut AdamW, vars: &[(String, candle_core::Var)], dir: &Path) -> Result<()> {
    let path = dir.join(OPTIMIZER);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::model(&path, format!("not readable: {e}")))?;
    let read = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| {
            Error::model(
                &path,
                format!("no tensor `{name}`: the checkpoint is not of this model"),
            )
        })?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    };
    for (i, (name, _)) in vars.iter().enumerate() {
        opt.m[i] = read(&format!("m.{name}"))?;
        opt.v[i] = read(&format!("v.{name}"))?;
    }
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(STATE)).map_err(|e| Error::io(dir.join(STATE), e))?,
    )
    .map_err(|e| Error::model(dir.join(STATE), format!("not valid JSON: {e}")))?;
    opt.t = state["adam_step"].as_u64().unwrap_or(0);
    Ok(())
}

/// The final model into `OUT` (in the pivot's dtype), then the record that
/// marks the output finished.
fn save_final(
    model: &dyn CausalLm,
    o: &FuseOptions,
    key: &str,
    steps: u64,
    last_loss: Option<f64>,
) -> Result<()> {
    let staging = o
        .out
        .join(format!(".final.{}", crate::io::writer::tmp_suffix()));
    model.save(&staging, pivot_dtype(&o.pivot))?;
    for e in std::fs::read_dir(&staging)
        .map_err(|e| Error::io(&staging, e))?
        .flatten()
    {
        let to = o.out.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(|err| Error::io(&to, err))?;
    }
    let _ = std::fs::remove_dir(&staging);
    let record = serde_json::json!({
        "fusechat_version": env!("CARGO_PKG_VERSION"),
        "stage_key": key,
        "steps": steps,
        "last_loss": last_loss,
        "loss": o.loss,
        "pivot": o.pivot,
        "pivot_repr": o.pivot_repr,
        "teachers": o.teachers,
    });
    crate::io::writer::write_atomic(
        &o.out.join(FUSE_RECORD),
        serde_json::to_string_pretty(&record)
            .expect("JSON")
            .as_bytes(),
    )
}
