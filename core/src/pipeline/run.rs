//! Executing the stages: what each stage is, whether it is up to date, and
//! what it did.

use crate::data::align::{self, AlignOptions, AlignOutcome, FilterReport};
use crate::data::represent::{self, RepresentOptions, RepresentOutcome};
use crate::eval::stage::{self as eval_stage, EvalOptions, EvalOutcome};
use crate::merge::engine::{self, ExecOptions, MergeReport, MERGE_RECORD};
use crate::merge::plan::MergeRequest;
use crate::pipeline::config::Config;
use crate::pipeline::key::stage_key;
use crate::pipeline::miniature::{self, SkilledSpec};
use crate::plugin::registry::Registry;
use crate::train::fuse::{self, FuseOptions, FuseOutcome};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a stage computes, with every option resolved.
#[derive(Debug, Clone)]
pub enum Job {
    /// Build the skilled miniature (data, tokenizers, trained models) into
    /// the stage's output directory.
    Miniature(Box<SkilledSpec>),
    Represent(RepresentOptions),
    Align(AlignOptions),
    /// Drop rows with a NaN `metric_ce` from the pivot's and the teachers' manifests.
    Filter {
        pivot: PathBuf,
        teachers: Vec<PathBuf>,
    },
    /// Fine-tune a copy of the pivot against one source's aligned representation.
    Fuse(Box<FuseOptions>),
    Merge(MergeRequest),
    /// Run the evaluators on the run's models and write the reports.
    Eval(Box<EvalOptions>),
}

/// One stage of a run.
#[derive(Debug, Clone)]
pub struct Stage {
    /// "represent pivot", "align solar", "merge".
    pub name: String,
    /// The directory the stage writes.
    pub out: PathBuf,
    pub job: Job,
}

impl Stage {
    /// The paths the stage reads.
    pub fn inputs(&self) -> Vec<PathBuf> {
        match &self.job {
            Job::Miniature(_) => vec![],
            Job::Represent(o) => {
                let mut v = vec![o.model.clone(), o.data.clone()];
                v.extend(o.tokenizer.clone());
                v
            }
            Job::Align(o) => {
                let mut v = vec![o.pivot.clone(), o.source.clone()];
                v.extend(o.pivot_tokenizer.clone());
                v.extend(o.source_tokenizer.clone());
                v
            }
            Job::Filter { pivot, teachers } => {
                let mut v = vec![pivot.clone()];
                v.extend(teachers.iter().cloned());
                v
            }
            Job::Fuse(o) => {
                let mut v = vec![o.pivot.clone(), o.pivot_repr.clone()];
                v.extend(o.teachers.iter().cloned());
                v
            }
            Job::Merge(req) => req
                .base
                .iter()
                .chain(req.models.iter())
                .map(|m| m.path.clone())
                .collect(),
            Job::Eval(o) => o
                .models
                .iter()
                .map(|m| m.dir.clone())
                .chain(o.specs.iter().map(|s| s.data.clone()))
                .collect(),
        }
    }

    /// Whether this stage writes `path` (or a directory above it).
    pub fn writes(&self, path: &Path) -> bool {
        match &self.job {
            Job::Filter { .. } => false,
            // Only what it makes: a path into its directory that names no
            // model or file of the miniature is a mistake to report now.
            Job::Miniature(spec) => spec.products().iter().any(|p| path.starts_with(p)),
            _ => path.starts_with(&self.out),
        }
    }
}

/// Whether a stage will run, and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    UpToDate,
    Run(String),
}

/// What a stage did.
#[derive(Debug)]
pub enum Outcome {
    Miniature {
        generated: bool,
    },
    Represent(RepresentOutcome),
    Align(AlignOutcome),
    Filter(FilterReport),
    Fuse(FuseOutcome),
    /// `None`: the output was up to date.
    Merge(Option<MergeReport>),
    Eval(EvalOutcome),
}

/// A finished stage.
#[derive(Debug)]
pub struct StageResult {
    pub name: String,
    pub out: PathBuf,
    pub outcome: Outcome,
    pub seconds: f64,
}

impl StageResult {
    pub fn up_to_date(&self) -> bool {
        match &self.outcome {
            Outcome::Miniature { generated } => !generated,
            Outcome::Represent(r) => r.up_to_date,
            Outcome::Align(r) => r.up_to_date,
            Outcome::Filter(_) => false,
            Outcome::Fuse(r) => r.up_to_date,
            Outcome::Merge(r) => r.is_none(),
            Outcome::Eval(r) => r.up_to_date,
        }
    }

    /// One line saying what the stage did and where its output is.
    pub fn line(&self) -> String {
        let out = self.out.display();
        match &self.outcome {
            Outcome::Miniature { generated: true } => {
                format!("miniature: generated the model set in {out}")
            }
            Outcome::Miniature { generated: false } => {
                format!("miniature: {out} is up to date")
            }
            Outcome::Represent(r) => format!("{}: {}", self.name, r.summary(&self.out)),
            Outcome::Align(r) => format!("{}: {}", self.name, r.summary(&self.out)),
            Outcome::Filter(r) => format!("filter: {}", r.summary()),
            Outcome::Fuse(r) => format!("{}: {}", self.name, r.summary()),
            Outcome::Merge(Some(r)) => format!("merge: {}", r.summary()),
            Outcome::Merge(None) => {
                format!("merge: {out} is up to date (use --force to redo it)")
            }
            Outcome::Eval(r) => format!("eval: {}", r.summary()),
        }
    }
}

/// The stages of a run, validated and in order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The config file the pipeline was made from (for messages).
    pub file: PathBuf,
    pub stages: Vec<Stage>,
    /// Re-run every stage, even those that are up to date.
    pub force: bool,
}

impl Pipeline {
    /// Resolve and check every stage of `cfg` before anything runs; every
    /// problem of the config is reported at once, naming the file, the table
    /// and the field.
    pub fn from_config(cfg: &Config, registry: &Registry, force: bool) -> Result<Pipeline> {
        crate::pipeline::resolve::resolve(cfg, registry, force)
    }

    /// Whether each stage would run now, and why. A stage that reads what an
    /// earlier stage will rewrite runs after it.
    pub fn statuses(&self, registry: &Registry) -> Vec<Status> {
        let mut out: Vec<Status> = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let rewritten_input = stage.inputs().into_iter().find_map(|p| {
                self.stages[..i]
                    .iter()
                    .zip(&out)
                    .find(|(s, st)| matches!(st, Status::Run(_)) && s.writes(&p))
                    .map(|(s, _)| s.name.clone())
            });
            let status = if self.force {
                Status::Run("--force".into())
            } else if let Some(earlier) = rewritten_input {
                Status::Run(format!("its inputs are rebuilt first by `{earlier}`"))
            } else {
                stage_status(stage, registry)
            };
            out.push(status);
        }
        out
    }

    /// The devices the stages compute on, each once.
    pub fn devices(&self) -> Vec<&str> {
        let mut d: Vec<&str> = self
            .stages
            .iter()
            .filter_map(|s| match &s.job {
                Job::Represent(o) => Some(o.device.as_str()),
                Job::Fuse(o) => Some(o.device.as_str()),
                Job::Eval(o) => Some(o.device.as_str()),
                _ => None,
            })
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// Open every device the stages need (before the first stage runs, so a
    /// CUDA config on a machine without one fails before any compute).
    pub fn open_devices(&self) -> Result<()> {
        for d in self.devices() {
            crate::model::parse_device(d).map_err(|e| Error::config(&self.file, format!("{e}")))?;
        }
        Ok(())
    }

    /// The plan as text (`fusechat run --dry-run`): each stage, whether it
    /// would run and why, and what it writes.
    pub fn describe(&self, registry: &Registry) -> String {
        let mut s = format!(
            "plan of {} ({} stages):\n",
            self.file.display(),
            self.stages.len()
        );
        let w = name_width(self.stages.iter().map(|st| st.name.as_str()));
        for (i, (stage, status)) in self.stages.iter().zip(self.statuses(registry)).enumerate() {
            let what = match status {
                Status::UpToDate => "up to date, skipped".to_string(),
                Status::Run(why) => format!("runs: {why}"),
            };
            s.push_str(&format!(
                "{:>2}. {:<w$} {what}\n    writes {}\n",
                i + 1,
                stage.name,
                stage.out.display()
            ));
        }
        for d in self.devices() {
            if let Err(e) = crate::model::parse_device(d) {
                s.push_str(&format!("note: a real run would stop here: {e}\n"));
            }
        }
        s.push_str("dry run: nothing computed, nothing written\n");
        s
    }

    /// Run every stage in order; `done` hears of each as it finishes.
    pub fn run(
        &self,
        registry: &Registry,
        exec: &ExecOptions,
        mut done: impl FnMut(&StageResult),
    ) -> Result<Vec<StageResult>> {
        self.open_devices()?;
        let mut results = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let start = Instant::now();
            let outcome = run_stage(stage, registry, exec, self.force)?;
            let r = StageResult {
                name: stage.name.clone(),
                out: stage.out.clone(),
                outcome,
                seconds: start.elapsed().as_secs_f64(),
            };
            done(&r);
            results.push(r);
        }
        Ok(results)
    }
}

/// A table of what each stage did, where its output went and how long it took.
pub fn summary_table(results: &[StageResult]) -> String {
    let w = name_width(results.iter().map(|r| r.name.as_str()));
    let mut s = format!("{:<w$} {:<11} {:>9}  output\n", "stage", "result", "time");
    for r in results {
        s.push_str(&format!(
            "{:<w$} {:<11} {:>8.2}s  {}\n",
            r.name,
            if r.up_to_date() { "up to date" } else { "ran" },
            r.seconds,
            r.out.display()
        ));
    }
    s
}

/// The width of the stage-name column: the longest name, at least 20.
fn name_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names.map(|n| n.chars().count()).max().unwrap_or(0).max(20)
}

fn stage_status(stage: &Stage, registry: &Registry) -> Status {
    let fresh = match &stage.job {
        Job::Miniature(spec) => Ok(miniature::skilled_up_to_date(spec)),
        Job::Represent(o) => represent::up_to_date(o),
        Job::Align(o) => align::up_to_date(o),
        Job::Filter { .. } => return Status::Run("always (it reads the manifests only)".into()),
        Job::Fuse(o) => fuse::up_to_date(o, registry),
        Job::Merge(req) => Ok(recorded_merge_key(&req.out).flatten() == Some(merge_key(req))),
        Job::Eval(o) => eval_stage::up_to_date(registry, o),
    };
    match fresh {
        Ok(true) => Status::UpToDate,
        Ok(false) if stage.out.exists() => Status::Run("its inputs or settings changed".into()),
        Ok(false) => Status::Run("no output yet".into()),
        Err(e) => Status::Run(format!("cannot tell yet ({e})")),
    }
}

fn run_stage(
    stage: &Stage,
    registry: &Registry,
    exec: &ExecOptions,
    force: bool,
) -> Result<Outcome> {
    Ok(match &stage.job {
        Job::Miniature(spec) => Outcome::Miniature {
            generated: miniature::build_skilled(spec, registry, force, exec.progress)?,
        },
        Job::Represent(o) => {
            let o = RepresentOptions {
                force,
                progress: exec.progress,
                ..o.clone()
            };
            let r = represent::represent(registry, &o)?;
            if r.manifest.is_none() {
                return Err(Error::model(&o.out, "is incomplete after represent; rerun"));
            }
            Outcome::Represent(r)
        }
        Job::Align(o) => Outcome::Align(align::align(
            registry,
            &AlignOptions { force, ..o.clone() },
        )?),
        Job::Filter { pivot, teachers } => Outcome::Filter(align::filter(pivot, teachers)?),
        Job::Fuse(o) => Outcome::Fuse(fuse::fuse(
            registry,
            &FuseOptions {
                force,
                progress: exec.progress,
                ..(**o).clone()
            },
        )?),
        Job::Merge(req) => Outcome::Merge(run_merge(req, registry, exec, force)?),
        Job::Eval(o) => Outcome::Eval(eval_stage::eval(
            registry,
            &EvalOptions {
                force,
                progress: exec.progress,
                ..(**o).clone()
            },
        )?),
    })
}

/// The merge stage: skipped when its output records the same key.
fn run_merge(
    req: &MergeRequest,
    registry: &Registry,
    exec: &ExecOptions,
    force: bool,
) -> Result<Option<MergeReport>> {
    let key = merge_key(req);
    let recorded = recorded_merge_key(&req.out);
    if !force && recorded.as_ref().and_then(|k| k.as_deref()) == Some(key.as_str()) {
        return Ok(None);
    }
    // `run` owns its stage outputs: a stale one is replaced, but a directory
    // that fusechat did not write is never touched without --force.
    if req.out.exists() && recorded.is_none() && !force {
        return Err(Error::model(
            &req.out,
            "exists and is not a fusechat merge output; move it away or pass --force to replace it",
        ));
    }
    let req = MergeRequest {
        force: true,
        stage_key: Some(key),
        ..req.clone()
    };
    Ok(Some(engine::merge(&req, registry, exec)?))
}

/// The merge stage's key: the request, its output and its input files.
fn merge_key(req: &MergeRequest) -> String {
    let inputs: Vec<serde_json::Value> = req
        .base
        .iter()
        .chain(req.models.iter())
        .map(|m| serde_json::json!({"files": crate::io::model_dir::content_stamps(&m.path)}))
        .collect();
    stage_key(&serde_json::json!({"request": req.to_json(), "out": req.out, "inputs": inputs}))
}

/// The stage key recorded in a merge output: `None` when `out` is not a
/// fusechat merge output at all, `Some(None)` when it is one without a key
/// (written by `fusechat merge`).
fn recorded_merge_key(out: &Path) -> Option<Option<String>> {
    let text = std::fs::read_to_string(out.join(MERGE_RECORD)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v.get("stage_key")
            .and_then(|k| k.as_str())
            .map(str::to_string),
    )
}
