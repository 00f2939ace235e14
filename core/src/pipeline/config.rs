//! `fusechat.toml`: the run configuration.
//!
//! ```toml
//! [run]
//! dir = "runs/default"            # where stages write (relative to this file)
//! threads = 0                     # compute threads; 0: one per core (--threads overrides)
//!
//! [miniature]                     # the skilled miniature: data and three tiny trained models
//! out = "runs/default/models"     # (sizes, skills, steps: see `SkilledSpec`)
//! pivot = { family = "mistral", layers = 2 }
//! sources = [{ name = "mixtral", family = "mixtral", layers = 2, skill = "add" }]
//!
//! [data]                          # the data-construction stages (represent, align, filter)
//! path = "conversations.jsonl"    # ShareGPT or OpenAI form, JSON or JSONL
//! template = "openchat"           # default for every model
//! max_length = 2048
//!
//! [pivot]
//! path = "models/openchat_3.5"    # family, template and tokenizer may be given as for sources
//!
//! [[sources]]
//! name = "mixtral"                # repr/<name>/ and repr/<name>@pivot/
//! path = "models/nh2_mixtral"
//! aligner = "mined"               # identity, exact, mined, offsets
//! align = { mode = "soft" }       # aligner parameters
//!
//! [represent]
//! out = "runs/default/repr"
//! top_k = 10
//!
//! [merge]
//! method = "varm"
//! base = "runs/default/models/pivot"
//! models = ["runs/default/models/target_a", { path = "runs/default/models/target_b", parameters = { weight = 2.0 } }]
//! out = "runs/default/merged"
//! out_dtype = "bf16"
//! numerics = "fusechat"   # or "mergekit": compute in `dtype`, rounding after every op
//! tokenizer_source = "union"   # or "base" or a model: merge models whose vocabularies differ
//! [merge.parameters]
//! statistic = "square"
//! [[merge.extra]]                 # the same models merged another way: merge:ties
//! method = "ties"
//! parameters = { density = 0.5 }
//!
//! [eval]                          # after the other stages; reports in <run dir>/reports
//! models = ["pivot", "merge:varm"] # default: every model of the run
//! [[eval.evaluators]]
//! name = "perplexity"
//! data = "held_out.jsonl"
//!
//! [plugins]
//! paths = []
//! ```
//!
//! Relative paths are resolved against the directory of the config file.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use crate::io::dtype::DType;
use crate::merge::params::{Scalar, Setting, Settings};
use crate::merge::plan::{MergeRequest, ModelInput};
use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every default of a run, in one place: the config's, the stage options'
/// (`RepresentOptions::new`, ...) and the CLI's flags all read these.
pub mod defaults {
    pub const RUN_DIR: &str = "runs/default";
    pub const TEMPLATE: &str = "openchat";
    pub const MAX_LENGTH: usize = 2048;
    pub const TOP_K: usize = 10;
    pub const BATCH_SIZE: usize = 8;
    pub const BATCH_TOKENS: usize = 8192;
    pub const ROWS_PER_SHARD: usize = 1024;
    pub const DEVICE: &str = "cpu";
    pub const ALIGNER: &str = "mined";
    // fuse: FuseChat's training settings (SPEC §5); effective batch 128 = 4 × 32
    pub const LOSS: &str = "greater_as_gt";
    pub const LR: f64 = 5e-6;
    pub const SCHEDULER: &str = "cosine";
    pub const WARMUP_RATIO: f64 = 0.03;
    pub const EPOCHS: u64 = 3;
    pub const FUSE_BATCH_SIZE: usize = 4;
    pub const GRAD_ACCUM: usize = 32;
    pub const MAX_GRAD_NORM: f64 = 1.0;
    pub const SEED: u64 = 42;
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunSection,
    /// The skilled miniature (the default run's models and data).
    pub miniature: Option<crate::pipeline::miniature::SkilledSpec>,
    pub data: Option<DataSection>,
    pub pivot: Option<ModelSection>,
    #[serde(default)]
    pub sources: Vec<ModelSection>,
    pub represent: Option<RepresentSection>,
    pub fuse: Option<FuseSection>,
    pub merge: Option<MergeSection>,
    pub eval: Option<EvalSection>,
    #[serde(default)]
    pub plugins: PluginsSection,
    /// The directory relative paths are resolved against (not read from the file).
    #[serde(skip)]
    pub root: PathBuf,
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    #[serde(default = "default_run_dir")]
    pub dir: PathBuf,
    /// Compute threads (default 0: one per core); `--threads` overrides it.
    /// Models as small as the miniature's run fastest on one: with more,
    /// each tiny operation costs more in synchronisation than it saves.
    #[serde(default)]
    pub threads: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            dir: default_run_dir(),
            threads: 0,
        }
    }
}

fn default_run_dir() -> PathBuf {
    PathBuf::from(defaults::RUN_DIR)
}

/// `[data]`: the chat dataset and how records become tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub path: PathBuf,
    #[serde(default = "d_template")]
    pub template: String,
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    /// Fail on a bad record instead of skipping it.
    #[serde(default)]
    pub strict: bool,
}
fn d_template() -> String {
    defaults::TEMPLATE.into()
}
fn d_max_length() -> usize {
    defaults::MAX_LENGTH
}

/// `[pivot]` and each `[[sources]]`: a model of the fusion.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Sources only: names the representation directories.
    pub name: Option<String>,
    pub path: String,
    pub family: Option<String>,
    /// Overrides `[data] template` for this model.
    pub template: Option<String>,
    /// Tokenizer directory (default: the model's).
    pub tokenizer: Option<PathBuf>,
    /// Sources only: the vocabulary aligner and its parameters.
    pub aligner: Option<String>,
    #[serde(default)]
    pub align: BTreeMap<String, toml::Value>,
}

/// `[represent]`: where representations go and how they are computed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepresentSection {
    pub out: Option<PathBuf>,
    #[serde(default = "d_top_k")]
    pub top_k: usize,
    #[serde(default = "d_batch_size")]
    pub batch_size: usize,
    #[serde(default = "d_batch_tokens")]
    pub batch_tokens: usize,
    #[serde(default = "d_rows_per_shard")]
    pub rows_per_shard: usize,
    #[serde(default = "d_device")]
    pub device: String,
}
fn d_top_k() -> usize {
    defaults::TOP_K
}
fn d_batch_size() -> usize {
    defaults::BATCH_SIZE
}
fn d_batch_tokens() -> usize {
    defaults::BATCH_TOKENS
}
fn d_rows_per_shard() -> usize {
    defaults::ROWS_PER_SHARD
}
fn d_device() -> String {
    defaults::DEVICE.into()
}

impl Default for RepresentSection {
    fn default() -> Self {
        RepresentSection {
            out: None,
            top_k: d_top_k(),
            batch_size: d_batch_size(),
            batch_tokens: d_batch_tokens(),
            rows_per_shard: d_rows_per_shard(),
            device: d_device(),
        }
    }
}

/// `[fuse]`: pairwise knowledge fusion, one target per source
/// (`targets/<source>/`), trained on the pivot's and that source's
/// representations. Every field defaults to FuseChat's setting (SPEC §5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseSection {
    /// Where the targets go (default: `<run dir>/targets`).
    pub out: Option<PathBuf>,
    #[serde(default = "d_loss")]
    pub loss: String,
    /// The loss's parameters (mode, lm_loss_weight, temperature, compat, ...).
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default = "d_scheduler")]
    pub scheduler: String,
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "d_epochs")]
    pub epochs: u64,
    pub max_steps: Option<u64>,
    #[serde(default = "d_fuse_batch")]
    pub batch_size: usize,
    #[serde(default = "d_grad_accum")]
    pub grad_accum: usize,
    #[serde(default = "d_max_grad_norm")]
    pub max_grad_norm: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// `accum` (Hugging Face) or `tokens`.
    #[serde(default = "d_loss_norm")]
    pub loss_norm: String,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// A checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub save_every: u64,
    #[serde(default = "d_device")]
    pub device: String,
    /// Weights whose name contains any of these stay frozen.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Also train an SFT baseline (`targets/sft`): the pivot fine-tuned with
    /// λ = 1 on the same data for the same steps, to show what fusion adds.
    #[serde(default)]
    pub sft_baseline: bool,
}
fn d_loss() -> String {
    defaults::LOSS.into()
}
fn d_lr() -> f64 {
    defaults::LR
}
fn d_scheduler() -> String {
    defaults::SCHEDULER.into()
}
fn d_warmup() -> f64 {
    defaults::WARMUP_RATIO
}
fn d_epochs() -> u64 {
    defaults::EPOCHS
}
fn d_fuse_batch() -> usize {
    defaults::FUSE_BATCH_SIZE
}
fn d_grad_accum() -> usize {
    defaults::GRAD_ACCUM
}
fn d_max_grad_norm() -> f64 {
    defaults::MAX_GRAD_NORM
}
fn d_loss_norm() -> String {
    "accum".into()
}
fn d_seed() -> u64 {
    defaults::SEED
}

/// A model in `[merge] models`: a path, or a table with per-model parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ModelEntry {
    Path(String),
    Table {
        path: String,
        #[serde(default)]
        parameters: BTreeMap<String, toml::Value>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeSection {
    pub method: String,
    pub base: Option<String>,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    pub out: PathBuf,
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
    pub dtype: Option<String>,
    pub out_dtype: Option<String>,
    /// "fusechat" (f32 compute, rounded once) or "mergekit" (in `dtype`,
    /// rounded after every operation).
    pub numerics: Option<String>,
    /// mergekit's `tokenizer_source`: "base", "union" or one of the models
    /// (as written); merges models whose vocabularies differ.
    pub tokenizer_source: Option<String>,
    #[serde(default)]
    pub seed: u64,
    pub max_shard_size: Option<String>,
    /// Merge models whose config.json architectures differ.
    #[serde(default)]
    pub allow_config_mismatch: bool,
    /// More merges of the same models with other methods, for comparison
    /// (`[[merge.extra]]`); each is its own stage and its own model in the
    /// reports (`merge:<method>`).
    #[serde(default)]
    pub extra: Vec<ExtraMerge>,
}

/// One `[[merge.extra]]` entry: the main merge's models, base, dtype and
/// seed, with another method and its own parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraMerge {
    pub method: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
    /// Default: the main merge's `out` with `-<method>` appended.
    pub out: Option<PathBuf>,
}

/// `[eval]`: the evaluators to run on the run's models, after every other stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Where the reports go (default: `<run dir>/reports`).
    pub out: Option<PathBuf>,
    /// The models to evaluate, by their names in the reports: `pivot`, a
    /// source's name, `sft`, `target:<source>`, `merge:<method>`. Default: all.
    pub models: Option<Vec<String>>,
    #[serde(default = "d_device")]
    pub device: String,
    #[serde(default)]
    pub evaluators: Vec<EvaluatorEntry>,
}

/// One `[[eval.evaluators]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorEntry {
    /// perplexity, exact_match, mt_bench, or a plugin's.
    pub name: String,
    /// Its input (relative to the config file).
    pub data: PathBuf,
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

/// `[plugins]`: shared libraries to load, and who wins a name clash.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// Plugin libraries (relative to the config file).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Method name → the origin that wins a clash: "built-in" or a library path.
    #[serde(default)]
    pub prefer: BTreeMap<String, String>,
}

/// `[table]: problem` for each top-level entry of `text` that does not
/// deserialize on its own (none when the text is not TOML at all).
fn every_table_problem(text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    table
        .into_iter()
        .filter_map(|(k, v)| {
            let one = toml::Table::from_iter([(k.clone(), v)]);
            let e = toml::Value::Table(one).try_into::<Config>().err()?;
            Some(format!(
                "[{k}]: {}",
                e.to_string().trim_end().replace('\n', " ")
            ))
        })
        .collect()
}

impl Config {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = Config::parse(&text, path)?;
        cfg.root = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(cfg)
    }

    /// Parse config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let mut msg = format!("invalid config: {}", e.to_string().trim_end());
            // serde stops at the first problem; each top-level table on its
            // own names every table that has one, so that one edit fixes all
            let others = every_table_problem(text);
            if others.len() > 1 {
                msg.push_str("\nevery table with a problem:");
                for o in others {
                    msg.push_str(&format!("\n  {o}"));
                }
            }
            Error::config(path, msg)
        })?;
        cfg.file = path.to_path_buf();
        cfg.root = PathBuf::from(".");
        Ok(cfg)
    }

    /// The plugin libraries and clash preferences, with paths resolved.
    pub fn plugins(&self) -> (Vec<PathBuf>, BTreeMap<String, String>) {
        let paths = self.plugins.paths.iter().map(|p| self.resolve(p)).collect();
        let prefer = self
            .plugins
            .prefer
            .iter()
            .map(|(k, v)| {
                let v = if v == "built-in" || v == "builtin" {
                    v.clone()
                } else {
                    self.resolve(Path::new(v)).display().to_string()
                };
                (k.clone(), v)
            })
            .collect();
        (paths, prefer)
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    /// The `[merge]` table as a merge request.
    pub fn merge_request(&self) -> Result<MergeRequest> {
        let m = self.merge.as_ref().ok_or_else(|| {
            Error::config(
                &self.file,
                "no [merge] table: add one (see README.md, 'Merging')",
            )
        })?;
        let err =
            |field: &str, msg: String| Error::config(&self.file, format!("[merge] {field}: {msg}"));
        let in_file = |e: Error| Error::config(&self.file, e.to_string());
        let mut req = MergeRequest::new(&m.method, self.resolve(&m.out));
        req.origin = format!("{} [merge]", self.file.display());
        req.base = m
            .base
            .as_ref()
            .map(|b| model_input(b, &self.root, Settings::new()));
        for (i, e) in m.models.iter().enumerate() {
            let (path, params) = match e {
                ModelEntry::Path(p) => (p, BTreeMap::new()),
                ModelEntry::Table { path, parameters } => (path, parameters.clone()),
            };
            let settings = toml_settings(&params, &format!("[merge] models[{i}].parameters"))
                .map_err(in_file)?;
            req.models.push(model_input(path, &self.root, settings));
        }
        req.params = toml_settings(&m.parameters, "[merge] parameters").map_err(in_file)?;
        req.dtype = parse_dtype(m.dtype.as_deref(), "[merge] dtype").map_err(in_file)?;
        req.out_dtype =
            parse_dtype(m.out_dtype.as_deref(), "[merge] out_dtype").map_err(in_file)?;
        if let Some(n) = &m.numerics {
            req.numerics = crate::merge::plan::Numerics::parse(n).ok_or_else(|| {
                err(
                    "numerics",
                    format!("`{n}` is not a numerics mode: use \"fusechat\" (the default: f32, rounded once) or \"mergekit\" (in `dtype`, rounded after every operation)"),
                )
            })?;
        }
        req.tokenizer_source = m.tokenizer_source.as_deref().map(|t| {
            // a model is named as written in `base`/`models`, resolved like them
            match crate::merge::vocab::TokenizerSource::parse(t) {
                crate::merge::vocab::TokenizerSource::Model(p) => {
                    crate::merge::vocab::TokenizerSource::Model(
                        self.resolve(Path::new(&p)).display().to_string(),
                    )
                }
                other => other,
            }
        });
        req.seed = m.seed;
        req.allow_config_mismatch = m.allow_config_mismatch;
        if let Some(s) = &m.max_shard_size {
            req.max_shard_size = crate::io::writer::parse_size(s).ok_or_else(|| {
                err(
                    "max_shard_size",
                    format!("`{s}` is not a size (e.g. \"5GB\", \"500MB\")"),
                )
            })?;
        }
        Ok(req)
    }

    /// The `[[merge.extra]]` entries as requests, each a copy of `main` (the
    /// main merge, its models already filled in) with its own method,
    /// parameters and output.
    pub fn extra_merge_requests(&self, main: &MergeRequest) -> Result<Vec<MergeRequest>> {
        let Some(m) = &self.merge else {
            return Ok(Vec::new());
        };
        let in_file = |e: Error| Error::config(&self.file, e.to_string());
        m.extra
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let mut req = main.clone();
                req.method = x.method.clone();
                req.origin = format!("{} [[merge.extra]] #{}", self.file.display(), i + 1);
                req.params = toml_settings(
                    &x.parameters,
                    &format!("[[merge.extra]] #{} parameters", i + 1),
                )
                .map_err(in_file)?;
                req.out = match &x.out {
                    Some(o) => self.resolve(o),
                    None => {
                        let mut name = main.out.file_name().unwrap_or_default().to_os_string();
                        name.push(format!("-{}", x.method));
                        main.out.with_file_name(name)
                    }
                };
                Ok(req)
            })
            .collect()
    }
}

fn model_input(reference: &str, root: &Path, params: Settings) -> ModelInput {
    ModelInput {
        reference: reference.to_string(),
        path: crate::io::hub::resolve_model(reference, root),
        params,
    }
}

/// Parse a dtype name; `field` names it in the error ("--dtype", "[merge] dtype").
pub fn parse_dtype(s: Option<&str>, field: &str) -> Result<Option<DType>> {
    match s {
        None => Ok(None),
        Some(s) => DType::parse(s).map(Some).ok_or_else(|| {
            Error::Plugin(format!(
                "{field}: unknown dtype `{s}` (use f32, bf16 or f16)"
            ))
        }),
    }
}

/// Convert TOML parameter values into settings; `field` names the table in errors.
pub fn toml_settings(params: &BTreeMap<String, toml::Value>, field: &str) -> Result<Settings> {
    params
        .iter()
        .map(|(k, v)| {
            let bad = |e: &dyn std::fmt::Display| Error::Plugin(format!("{field}: `{k}`: {e}"));
            let json = serde_json::to_value(v).map_err(|e| bad(&e))?;
            Setting::from_json(&json)
                .map(|s| (k.clone(), s))
                .map_err(|e| bad(&e))
        })
        .collect()
}

/// Single-valued plugin parameters (aligners, ...) from TOML values.
pub fn toml_scalars(
    params: &BTreeMap<String, toml::Value>,
    field: &str,
) -> Result<BTreeMap<String, Scalar>> {
    toml_settings(params, field)?
        .into_iter()
        .map(|(k, v)| match v {
            Setting::Scalar(s) => Ok((k, s)),
            _ => Err(Error::Plugin(format!(
                "{field}: `{k}`: this plugin's parameters are single values"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_are_errors_naming_the_file() {
        let e = Config::parse(
            "[merge]\nmethod='linear'\nout='x'\nmodls=[]\n",
            Path::new("f.toml"),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("f.toml") && s.contains("modls"), "{s}");
    }

    #[test]
    fn every_table_with_a_type_error_is_named() {
        let e = Config::parse(
            "[run]\nthreads = -1\n[merge]\nmethod = 3\nout = 'o'\n[plugins]\npaths = []\n",
            Path::new("f.toml"),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("line "),
            "the first problem keeps its place: {s}"
        );
        assert!(s.contains("[run]: ") && s.contains("`run.threads`"), "{s}");
        assert!(
            s.contains("[merge]: ") && s.contains("`merge.method`"),
            "{s}"
        );
        assert!(!s.contains("[plugins]: "), "{s}");
        // one problem: no list
        let e = Config::parse("[run]\nthreads = -1\n", Path::new("f.toml")).unwrap_err();
        assert!(!e.to_string().contains("every table"), "{e}");
    }

    #[test]
    fn models_as_paths_or_tables() {
        let c = Config::parse(
            "[merge]\nmethod='linear'\nout='o'\nmodels=['a', {path='b', parameters={weight=2}}]\n[merge.parameters]\nnormalize=true\n",
            Path::new("f.toml"),
        )
        .unwrap();
        let r = c.merge_request().unwrap();
        assert_eq!(r.models.len(), 2);
        assert_eq!(r.models[1].params.len(), 1);
        assert_eq!(r.params.len(), 1);
    }
}
