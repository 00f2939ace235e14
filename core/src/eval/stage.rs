//! The `eval` stage: every evaluator on every model, then the reports.
//!
//! The stage key covers the models' files (by content), their names, each
//! evaluator's data file and resolved parameters; `eval.key.json`, written
//! last, records it, so a rerun with the same key is up to date. It is not
//! written when an evaluator has work left (failed judge requests), so the
//! next run retries that.

use crate::eval::{report, EvalContext, EvalModel, EvalRow};
use crate::io::model_dir::content_stamps;
use crate::merge::params::Scalar;
use crate::pipeline::key::stage_key;
use crate::plugin::registry::Registry;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const KEY_FILE: &str = "eval.key.json";

/// One evaluator run: its name, its input file and its parameters.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    pub evaluator: String,
    pub data: PathBuf,
    pub params: BTreeMap<String, Scalar>,
}

/// What `eval` runs on.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub models: Vec<EvalModel>,
    pub specs: Vec<EvalSpec>,
    /// Reports, answers and judgments go here.
    pub out: PathBuf,
    pub device: String,
    pub progress: bool,
    pub force: bool,
}

/// What an `eval` call did.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    pub rows: Vec<EvalRow>,
    pub files: Vec<PathBuf>,
    pub up_to_date: bool,
    pub seconds: f64,
    pub out: PathBuf,
}

impl EvalOutcome {
    pub fn summary(&self) -> String {
        if self.up_to_date {
            return format!("{} is up to date", self.out.display());
        }
        let models: std::collections::BTreeSet<&str> =
            self.rows.iter().map(|r| r.model.as_str()).collect();
        format!(
            "{} numbers for {} model{} in {:.1}s; reports: {}",
            self.rows.len(),
            models.len(),
            if models.len() == 1 { "" } else { "s" },
            self.seconds,
            self.files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Every problem with the options, before anything is loaded.
pub fn check(registry: &Registry, o: &EvalOptions) -> Result<()> {
    let mut problems = Vec::new();
    if o.models.is_empty() {
        problems.push("no model to evaluate (give --model)".to_string());
    }
    let mut names = std::collections::BTreeSet::new();
    for m in &o.models {
        if !m.dir.join("config.json").is_file() {
            problems.push(format!(
                "model `{}`: {} is not a model directory (no config.json)",
                m.name,
                m.dir.display()
            ));
        }
        if !names.insert(&m.name) {
            problems.push(format!("two models are named `{}`", m.name));
        }
    }
    for s in &o.specs {
        match registry.evaluator(&s.evaluator) {
            Err(e) => problems.push(e.to_string()),
            Ok(entry) => match entry.info.resolve_scalars(&s.params) {
                Err(e) => problems.push(e.to_string()),
                Ok(p) => {
                    if let Err(e) = entry.plugin.check(&p, &s.data) {
                        problems.push(format!("evaluator `{}`: {e}", s.evaluator));
                    }
                }
            },
        }
    }
    let mut inputs: Vec<(&str, &Path)> = o
        .models
        .iter()
        .map(|m| ("model", m.dir.as_path()))
        .collect();
    inputs.extend(o.specs.iter().map(|s| ("--data", s.data.as_path())));
    if let Err(e) = crate::io::writer::check_out_not_input(&o.out, &inputs) {
        problems.push(e.to_string());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid("the eval request", problems))
    }
}

/// The stage key of these options.
pub fn key(registry: &Registry, o: &EvalOptions) -> Result<String> {
    let mut specs = Vec::new();
    for s in &o.specs {
        let entry = registry.evaluator(&s.evaluator)?;
        let p = entry.info.resolve_scalars(&s.params)?;
        let data = std::fs::read(&s.data).map_err(|e| Error::io(&s.data, e))?;
        specs.push(serde_json::json!({
            "evaluator": s.evaluator,
            "data": format!("{:016x}", crate::rng::fnv1a(&data)),
            "params": p.shared.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<BTreeMap<_, _>>(),
        }));
    }
    let models: Vec<serde_json::Value> = o
        .models
        .iter()
        .map(|m| serde_json::json!({"name": m.name, "files": content_stamps(&m.dir)}))
        .collect();
    Ok(stage_key(
        &serde_json::json!({"models": models, "specs": specs, "device": o.device}),
    ))
}

fn recorded_key(out: &Path) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(KEY_FILE)).ok()?).ok()?;
    v["key"].as_str().map(str::to_string)
}

/// Whether `o.out` holds the reports of these options.
pub fn up_to_date(registry: &Registry, o: &EvalOptions) -> Result<bool> {
    Ok(recorded_key(&o.out) == Some(key(registry, o)?) && o.out.join("eval.json").is_file())
}

/// Run the stage.
pub fn eval(registry: &Registry, o: &EvalOptions) -> Result<EvalOutcome> {
    let start = Instant::now();
    check(registry, o)?;
    let key = key(registry, o)?;
    if !o.force && up_to_date(registry, o)? {
        let text = std::fs::read_to_string(o.out.join("eval.json"))
            .map_err(|e| Error::io(o.out.join("eval.json"), e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(o.out.join("eval.json"), e.to_string()))?;
        let rows: Vec<EvalRow> = serde_json::from_value(v["results"].clone())
            .map_err(|e| Error::model(o.out.join("eval.json"), e.to_string()))?;
        return Ok(EvalOutcome {
            rows,
            files: Vec::new(),
            up_to_date: true,
            seconds: start.elapsed().as_secs_f64(),
            out: o.out.clone(),
        });
    }
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let _ = std::fs::remove_file(o.out.join(KEY_FILE));
    let mut rows = Vec::new();
    let mut incomplete = Vec::new();
    for m in &o.models {
        for s in &o.specs {
            let entry = registry.evaluator(&s.evaluator)?;
            let params = entry.info.resolve_scalars(&s.params)?;
            let ctx = EvalContext {
                registry,
                model: m,
                data: &s.data,
                out: &o.out,
                device: &o.device,
                progress: o.progress,
            };
            let r = entry.plugin.evaluate(&ctx, &params).map_err(|e| {
                Error::msg(format!(
                    "evaluator `{}` on model `{}`: {e}",
                    s.evaluator, m.name
                ))
            })?;
            rows.extend(r.rows);
            incomplete.extend(r.incomplete);
        }
    }
    let files = report::write(&o.out, &rows)?;
    if !incomplete.is_empty() {
        // No key: the next run evaluates again, and the evaluators redo only
        // what is missing.
        for why in &incomplete {
            tracing::warn!("eval: {why}");
        }
        return Ok(EvalOutcome {
            rows,
            files,
            up_to_date: false,
            seconds: start.elapsed().as_secs_f64(),
            out: o.out.clone(),
        });
    }
    crate::io::writer::write_atomic(
        &o.out.join(KEY_FILE),
        serde_json::to_string_pretty(&serde_json::json!({"key": key}))
            .expect("JSON")
            .as_bytes(),
    )?;
    Ok(EvalOutcome {
        rows,
        files,
        up_to_date: false,
        seconds: start.elapsed().as_secs_f64(),
        out: o.out.clone(),
    })
}
