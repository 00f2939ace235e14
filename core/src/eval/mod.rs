//! Evaluation (SPEC §7): the `Evaluator` extension point, the reports, the
//! judge client, and the `eval` stage.
//!
//! An evaluator scores one model directory on one data file and returns rows
//! of `(model, evaluator, metric, category, value, n)`: `category` is `None`
//! for the overall value, `n` the number of items (tokens, questions,
//! judgments) behind it. The stage runs every evaluator on every model and
//! writes `eval.json` (every number), `eval.md` (a table) and a chart
//! (`eval.png`, `eval.svg`).

pub mod judge;
pub mod report;
pub mod stage;

use crate::merge::params::ResolvedParams;
use crate::plugin::registry::{PluginInfo, Registry};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model to evaluate: the name the reports use, and its HF directory.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalModel {
    pub name: String,
    pub dir: PathBuf,
}

/// One number of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub model: String,
    pub evaluator: String,
    pub metric: String,
    /// `None`: the overall value.
    pub category: Option<String>,
    pub value: f64,
    /// How many items the value is over.
    pub n: u64,
}

/// What an evaluator works with.
pub struct EvalContext<'a> {
    pub registry: &'a Registry,
    pub model: &'a EvalModel,
    /// The evaluator's input file (conversations, or FastChat's `question.jsonl`).
    pub data: &'a Path,
    /// The stage's output directory (mt_bench writes its answer and judgment files there).
    pub out: &'a Path,
    pub device: &'a str,
    pub progress: bool,
}

/// An evaluator plugin.
pub trait Evaluator: Send + Sync {
    fn info(&self) -> PluginInfo;
    /// Checks once before any model is loaded (the data's form, files named by parameters).
    fn check(&self, _params: &ResolvedParams, _data: &Path) -> Result<()> {
        Ok(())
    }
    fn evaluate(&self, ctx: &EvalContext<'_>, params: &ResolvedParams) -> Result<Evaluation>;
}

/// What an evaluator found.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub rows: Vec<EvalRow>,
    /// Why running again has work left (e.g. judge requests that failed):
    /// the stage is then not recorded as up to date.
    pub incomplete: Option<String>,
}

impl From<Vec<EvalRow>> for Evaluation {
    fn from(rows: Vec<EvalRow>) -> Self {
        Evaluation {
            rows,
            incomplete: None,
        }
    }
}

/// A built-in evaluator: `inventory::submit! { BuiltinEvaluator(|| Arc::new(Perplexity)) }`.
pub struct BuiltinEvaluator(pub fn() -> Arc<dyn Evaluator>);
inventory::collect!(BuiltinEvaluator);

/// Accumulates per-category sums into rows: `add(category, value)` per item,
/// then `rows(...)` gives the overall mean (category `None`) and one mean per
/// category, in name order.
#[derive(Debug, Default)]
pub struct Means {
    overall: (f64, u64),
    by: std::collections::BTreeMap<String, (f64, u64)>,
}

impl Means {
    pub fn add(&mut self, category: Option<&str>, value: f64) {
        self.add_n(category, value, 1);
    }

    /// Add a sum over `n` items.
    pub fn add_n(&mut self, category: Option<&str>, sum: f64, n: u64) {
        self.overall.0 += sum;
        self.overall.1 += n;
        if let Some(c) = category {
            let e = self.by.entry(c.to_string()).or_default();
            e.0 += sum;
            e.1 += n;
        }
    }

    /// The means as rows of `metric`, transformed by `f` (e.g. exp for perplexity).
    pub fn rows(
        &self,
        model: &str,
        evaluator: &str,
        metric: &str,
        f: impl Fn(f64) -> f64,
    ) -> Vec<EvalRow> {
        let row = |category: Option<String>, (sum, n): (f64, u64)| EvalRow {
            model: model.to_string(),
            evaluator: evaluator.to_string(),
            metric: metric.to_string(),
            category,
            value: if n == 0 { f64::NAN } else { f(sum / n as f64) },
            n,
        };
        std::iter::once(row(None, self.overall))
            .chain(self.by.iter().map(|(c, v)| row(Some(c.clone()), *v)))
            .collect()
    }
}
