//! The merge planner: one [`MergeRequest`] (from fusechat.toml, the CLI or a
//! mergekit YAML) becomes a validated [`Plan`]: per output tensor, its inputs,
//! its layer position and its fully resolved parameters.
//!
//! Validation happens here, before any compute, and reports every problem at
//! once: missing model directories, tensors missing from a model, shape
//! mismatches, unknown or ill-typed parameters, a broken input contract.

use crate::io::dtype::DType;
use crate::io::model_dir::{layer_index, natural_order, with_layer_index, ModelDir, TensorEntry};
use crate::merge::params::{ParamProblem, ResolvedParams, Settings};
use crate::merge::{BaseUse, InputContract};
use crate::plugin::registry::{MergerEntry, ParamSpec, Registry};
use crate::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One input model of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    /// What the user wrote (a path or an HF id), for messages.
    pub reference: String,
    /// The resolved directory (it may not exist; the planner reports that).
    pub path: PathBuf,
    /// Per-model parameter settings.
    pub params: Settings,
}

impl ModelInput {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        ModelInput {
            reference: path.display().to_string(),
            path,
            params: Settings::new(),
        }
    }
}

/// One source of an output slice: a model (index into `MergeRequest::models`,
/// or the base) and a half-open layer range.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    pub model: SliceModel,
    pub layers: (usize, usize),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SliceModel {
    Base,
    Model(usize),
}

/// The arithmetic of a merge (`--numerics`, `[merge] numerics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Numerics {
    /// Compute in f32 and round once to the output dtype: the closest to the
    /// exact value.
    #[default]
    Fusechat,
    /// mergekit's: compute in the request's `dtype`, rounding after every
    /// operation, in mergekit's order of operations, so that a bf16 request
    /// gives mergekit's bytes.
    Mergekit,
}

impl Numerics {
    pub fn parse(s: &str) -> Option<Numerics> {
        match s {
            "fusechat" => Some(Numerics::Fusechat),
            "mergekit" => Some(Numerics::Mergekit),
            _ => None,
        }
    }
}

/// A merge, however it was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeRequest {
    pub method: String,
    pub base: Option<ModelInput>,
    pub models: Vec<ModelInput>,
    /// mergekit output slices; empty means every layer of every model.
    pub slices: Vec<Vec<SliceSource>>,
    /// Global parameter settings.
    pub params: Settings,
    /// Inputs are rounded to this dtype on load (mergekit's `dtype`); the
    /// output is written in `out_dtype`, else `dtype`, else the input dtype.
    pub dtype: Option<DType>,
    pub out_dtype: Option<DType>,
    pub numerics: Numerics,
    /// mergekit's `tokenizer_source`: merge models whose vocabularies differ.
    pub tokenizer_source: Option<crate::merge::vocab::TokenizerSource>,
    pub seed: u64,
    pub out: PathBuf,
    pub max_shard_size: u64,
    pub force: bool,
    /// Where the request came from, for the model card (e.g. "fusechat.toml [merge]").
    pub origin: String,
    /// Set by `fusechat run`: a hash of the inputs and settings, recorded in the
    /// output so that an up-to-date stage can be skipped.
    pub stage_key: Option<String>,
    /// Merge models whose config.json architectures differ (`--allow-config-mismatch`).
    pub allow_config_mismatch: bool,
}

impl MergeRequest {
    pub fn new(method: &str, out: impl Into<PathBuf>) -> Self {
        MergeRequest {
            method: method.to_string(),
            base: None,
            models: Vec::new(),
            slices: Vec::new(),
            params: Settings::new(),
            dtype: None,
            out_dtype: None,
            numerics: Numerics::Fusechat,
            tokenizer_source: None,
            seed: 0,
            out: out.into(),
            max_shard_size: crate::io::writer::DEFAULT_MAX_SHARD_SIZE,
            force: false,
            origin: "library call".into(),
            stage_key: None,
            allow_config_mismatch: false,
        }
    }

    /// A JSON description of the request (for the model card, the report and
    /// the stage hash). Paths are written as given.
    pub fn to_json(&self) -> serde_json::Value {
        fn settings(s: &Settings) -> serde_json::Value {
            serde_json::Value::Object(
                s.iter()
                    .map(|(k, v)| (k.clone(), setting_json(v)))
                    .collect(),
            )
        }
        fn setting_json(s: &crate::merge::params::Setting) -> serde_json::Value {
            use crate::merge::params::Setting;
            match s {
                Setting::Scalar(x) => x.to_json(),
                Setting::Gradient(v) => serde_json::json!(v),
                Setting::Filters(rules) => serde_json::Value::Array(
                    rules
                        .iter()
                        .map(|r| serde_json::json!({"filter": r.filter, "value": setting_json(&r.value)}))
                        .collect(),
                ),
            }
        }
        let mut v = serde_json::json!({
            "method": self.method,
            "base": self.base.as_ref().map(|b| b.reference.clone()),
            "models": self.models.iter().map(|m| serde_json::json!({
                "model": m.reference, "parameters": settings(&m.params)})).collect::<Vec<_>>(),
            "slices": self.slices.iter().map(|s| s.iter().map(|src| serde_json::json!({
                "model": match src.model { SliceModel::Base => "base".to_string(), SliceModel::Model(i) => self.models.get(i).map(|m| m.reference.clone()).unwrap_or_default() },
                "layer_range": [src.layers.0, src.layers.1]})).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "parameters": settings(&self.params),
            "dtype": self.dtype.map(|d| d.to_string()),
            "out_dtype": self.out_dtype.map(|d| d.to_string()),
            "seed": self.seed,
        });
        // only when asked, so that the description (and the stage key) of a
        // default request is what it always was
        if self.numerics == Numerics::Mergekit {
            v["numerics"] = "mergekit".into();
        }
        if let Some(t) = &self.tokenizer_source {
            v["tokenizer_source"] = t.describe().into();
        }
        v
    }
}

/// One input tensor: which opened model, and the tensor's name there.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSource {
    pub model: usize,
    pub name: String,
}

/// One output tensor of the plan.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub out_dtype: DType,
    pub layer: Option<usize>,
    /// Position in [0, 1] used for layer gradients.
    pub t: f64,
    pub base: Option<TensorSource>,
    pub inputs: Vec<TensorSource>,
    pub params: ResolvedParams,
    /// Bytes read from the inputs (base included), for progress and estimates.
    pub input_bytes: u64,
    /// A vocabulary tensor (embeddings, lm_head) whose rows are aligned to the
    /// output vocabulary on load (`tokenizer_source`).
    pub vocab: bool,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Working memory of this tensor's job: every input in f32. Kernels merge
    /// into one of the input buffers and the output is encoded in small chunks.
    pub fn job_bytes(&self) -> u64 {
        let inputs = self.inputs.len() as u64 + self.base.is_some() as u64;
        self.numel() as u64 * 4 * inputs
    }
}

/// A validated merge, ready to execute.
pub struct Plan {
    pub method: MergerEntry,
    /// Opened model directories; `TensorSource::model` indexes this.
    pub models: Vec<ModelDir>,
    /// How each opened model is named in messages (what the user wrote).
    pub labels: Vec<String>,
    pub tensors: Vec<PlannedTensor>,
    pub load_dtype: Option<DType>,
    pub out: PathBuf,
    pub force: bool,
    pub max_shard_size: u64,
    pub seed: u64,
    /// The output's config.json.
    pub config: serde_json::Value,
    /// The model whose tokenizer files are copied.
    pub tokenizer_from: usize,
    /// `tokenizer_source`: the output vocabulary and each model's rows in it.
    pub vocab: Option<crate::merge::vocab::VocabPlan>,
    pub warnings: Vec<String>,
    pub request: serde_json::Value,
    pub origin: String,
    pub stage_key: Option<String>,
}

fn looks_like_hf_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && !s.starts_with('.') && parts.iter().all(|p| !p.is_empty())
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Validate a request and build its plan. All problems are reported together.
pub fn plan(req: &MergeRequest, registry: &Registry) -> Result<Plan> {
    let mut warnings: Vec<String> = Vec::new();
    let Checked {
        entry,
        models,
        roles,
        slices,
    } = check_request(req, registry, &mut warnings)?;
    let mut problems = Problems::default();
    let vocab = match &req.tokenizer_source {
        None => None,
        Some(source) => Some(vocab_plan(source, &models, roles.base)?),
    };
    let planner = TensorPlanner {
        merger: entry.plugin.as_ref(),
        vocab: vocab.as_ref(),
        models: &models,
        base: roles.base,
        specs: &entry.info.params,
        global: &req.params,
        out_dtype: req.out_dtype.or(req.dtype),
        round_ops: match req.numerics {
            Numerics::Mergekit => req.dtype,
            Numerics::Fusechat => None,
        },
    };
    let planned = planner.plan_all(&slices, &mut problems);
    if planned.tensors.is_empty() && problems.is_empty() {
        let lead = &models[planned.lead].label;
        problems.request(format!("nothing to merge: `{lead}` holds no tensors"));
    }
    if !problems.is_empty() {
        return Err(problems.into_error());
    }
    if req.slices.is_empty() {
        warnings.extend(extra_tensor_warnings(&models, &slices, planned.lead));
    }
    let mut config = output_config(&models[planned.lead].dir, &planned, req);
    if let (Some(v), Some(obj)) = (&vocab, config.as_object_mut()) {
        obj.insert("vocab_size".into(), serde_json::json!(v.size));
    }
    let (models, labels): (Vec<ModelDir>, Vec<String>) =
        models.into_iter().map(|m| (m.dir, m.label)).unzip();
    Ok(Plan {
        method: entry,
        models,
        labels,
        tensors: planned.tensors,
        load_dtype: req.dtype,
        out: req.out.clone(),
        force: req.force,
        max_shard_size: req.max_shard_size,
        seed: req.seed,
        config,
        tokenizer_from: vocab.as_ref().map_or(planned.lead, |v| v.files_from),
        vocab,
        warnings,
        request: req.to_json(),
        origin: req.origin.clone(),
        stage_key: req.stage_key.clone(),
    })
}

/// A request whose models, parameters, slices and contract passed the checks.
struct Checked<'r> {
    entry: MergerEntry,
    models: Vec<Model<'r>>,
    roles: Roles,
    /// The explicit slices, else the one implicit slice.
    slices: Vec<Vec<SliceSrc>>,
}

/// Everything that can be checked before looking at tensors: the method, the
/// model directories, parameter names and types, roles, slices, the contract.
fn check_request<'r>(
    req: &'r MergeRequest,
    registry: &Registry,
    warnings: &mut Vec<String>,
) -> Result<Checked<'r>> {
    let mut problems = Problems::default();
    let entry = match registry.merger(&req.method) {
        Ok(e) => Some(e.clone()),
        Err(e) => {
            problems.request(e.to_string());
            None
        }
    };
    let mut inputs = open_inputs(req, &mut problems);
    for m in req.base.iter().chain(&req.models) {
        let what = format!("model `{}`", m.reference);
        if let Err(e) = crate::io::writer::check_out_not_input(&req.out, &[(&what, &m.path)]) {
            problems.request(e.to_string());
        }
    }
    if let Some(e) = &entry {
        check_params(req, e, &mut problems);
        if req.numerics == Numerics::Mergekit {
            check_mergekit_numerics(req, e, registry, &mut problems);
        }
    }
    if !req.allow_config_mismatch {
        check_architectures(
            &inputs,
            !req.slices.is_empty(),
            req.tokenizer_source.is_some(),
            &mut problems,
        );
    }
    let contract = entry.as_ref().map(|e| e.plugin.contract());
    let base_use = contract.map_or(BaseUse::Optional, |c| c.base);
    let mut roles = assign_roles(req, &mut inputs, base_use, warnings);
    let mut slices = lay_out_slices(req, &inputs, &mut roles, base_use, &mut problems, warnings);
    if let Some(c) = contract {
        check_contract(req, c, &roles, &slices, &mut problems);
    }
    // Stop here if the basics are broken: tensor checks would only add noise.
    if !problems.is_empty() {
        return Err(problems.into_error());
    }
    let models = inputs.into_models();
    if slices.is_empty() {
        slices.push(implicit_slice(&models, &roles));
    }
    Ok(Checked {
        entry: entry.expect("an unknown method is a problem"),
        models,
        roles,
        slices,
    })
}

// --- Problems: collected as values, reported once per kind and key.

/// What a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The request itself (a model directory, a parameter name or type, the
    /// input contract, a slice): each one is reported as it is.
    Request,
    /// A tensor missing from a model (key: that model).
    MissingTensor,
    /// A tensor whose shape differs from the lead's (key: that model).
    Shape,
    /// A tensor of a dtype fusechat does not merge (key: that model).
    DType,
    /// A slice layer the slice's lead does not have (key: the lead).
    NoLayer,
    /// A required parameter without a value (key: parameter and model).
    MissingParam,
    /// A parameter value that does not fit its type (key: parameter and model).
    BadParam,
}

/// What identifies a repeated problem, across the tensors and layers it repeats for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// An opened model (index into the plan's models).
    Model(usize),
    /// A parameter, and the model's position among a tensor's models for a per-model one.
    Param(String, Option<usize>),
}

/// At most this many lines of one capped kind (a model missing 300 tensors,
/// many models with wrong shapes) before the rest is summarised.
const CAP: usize = 8;

impl Kind {
    /// The name in the "further problems omitted" line, for the capped kinds.
    fn capped_as(self) -> Option<&'static str> {
        match self {
            Kind::MissingTensor => Some("missing tensor"),
            Kind::Shape => Some("shape"),
            Kind::DType => Some("dtype"),
            _ => None,
        }
    }

    /// What is appended to the first message of a problem met `count` (> 1) times.
    fn repeated(self, count: usize) -> String {
        let n = count - 1;
        let more = |one: &str, many: &str| format!("{n} more {}", if n == 1 { one } else { many });
        match self {
            Kind::Request => String::new(),
            Kind::MissingTensor => format!(", and {}", more("missing tensor", "missing tensors")),
            Kind::Shape => format!(", and {}", more("shape mismatch", "shape mismatches")),
            Kind::DType => format!(" (and {} of that model)", more("tensor", "tensors")),
            Kind::NoLayer => format!(", nor for {}", more("layer", "layers")),
            Kind::MissingParam | Kind::BadParam => format!(" (and {})", more("tensor", "tensors")),
        }
    }
}

/// One problem: the message of its first occurrence, and how often it occurred.
#[derive(Debug)]
struct Problem {
    kind: Kind,
    /// `None` for a problem reported as it is (and for a cap's "omitted" line).
    key: Option<Key>,
    message: String,
    count: usize,
}

/// The problems of a request, in the order first met.
#[derive(Debug, Default)]
struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// A problem with the request, reported as it is.
    fn request(&mut self, message: String) {
        self.push(Kind::Request, None, message);
    }

    /// A problem that may repeat (per tensor, per layer): one line per kind and
    /// key, with a count; capped kinds stop after [`CAP`] lines.
    fn repeated(&mut self, kind: Kind, key: Key, message: String) {
        let key = Some(key);
        if let Some(p) = self
            .list
            .iter_mut()
            .find(|p| p.kind == kind && p.key == key)
        {
            p.count += 1;
            return;
        }
        if let Some(name) = kind.capped_as() {
            let of_kind = |p: &&Problem| p.kind == kind;
            if self.list.iter().filter(of_kind).count() >= CAP {
                if self.list.iter().filter(of_kind).count() == CAP {
                    self.push(kind, None, format!("(further `{name}` problems omitted)"));
                }
                return;
            }
        }
        self.push(kind, key, message);
    }

    fn push(&mut self, kind: Kind, key: Option<Key>, message: String) {
        self.list.push(Problem {
            kind,
            key,
            message,
            count: 1,
        });
    }

    /// The one place where collected problems become the request's error.
    fn into_error(self) -> Error {
        let messages = self.list.into_iter().map(|p| match p.count {
            1 => p.message,
            n => p.message + &p.kind.repeated(n),
        });
        Error::invalid("the merge request", messages.collect())
    }
}

// --- Inputs: every model directory opened once.

/// One distinct model directory of the request (a base also listed among
/// the models is one).
struct Input<'r> {
    /// `None` when it could not be opened (a problem says why).
    dir: Option<ModelDir>,
    /// What the user wrote, for messages.
    label: String,
    /// The settings it is merged with, when it is merged onto the base (the
    /// first listing's, for a model listed twice).
    settings: Option<&'r Settings>,
}

/// The request's models.
struct Inputs<'r> {
    models: Vec<Input<'r>>,
    /// Which of `models` the request's base is.
    base: Option<usize>,
    /// Which of `models` each of the request's models is.
    listed: Vec<usize>,
}

/// An opened input model, once every directory opened.
struct Model<'r> {
    dir: ModelDir,
    label: String,
    /// Its per-model settings (none for the base).
    settings: &'r Settings,
}

static NO_SETTINGS: Settings = Settings::new();

impl<'r> Inputs<'r> {
    /// The opened models; only called once no problem was found, so each opened.
    fn into_models(self) -> Vec<Model<'r>> {
        self.models
            .into_iter()
            .map(|m| Model {
                dir: m.dir.expect("a directory that did not open is a problem"),
                label: m.label,
                settings: m.settings.unwrap_or(&NO_SETTINGS),
            })
            .collect()
    }
}

fn open_inputs<'r>(req: &'r MergeRequest, problems: &mut Problems) -> Inputs<'r> {
    let mut inputs = Inputs {
        models: Vec::new(),
        base: None,
        listed: Vec::new(),
    };
    let mut paths: Vec<&Path> = Vec::new();
    for (i, inp) in req.base.iter().chain(&req.models).enumerate() {
        let index = match paths.iter().position(|p| same_path(p, &inp.path)) {
            Some(index) => index,
            None => {
                paths.push(&inp.path);
                let dir = open_model(inp, problems);
                inputs.models.push(Input {
                    dir,
                    label: inp.reference.clone(),
                    settings: None,
                });
                inputs.models.len() - 1
            }
        };
        if i == 0 && req.base.is_some() {
            inputs.base = Some(index);
        } else {
            inputs.listed.push(index);
        }
    }
    inputs
}

fn open_model(inp: &ModelInput, problems: &mut Problems) -> Option<ModelDir> {
    let e = match ModelDir::open(&inp.path) {
        Ok(d) => return Some(d),
        Err(e) => e,
    };
    let mut msg = format!("model `{}`: {e}", inp.reference);
    if !inp.path.exists() && looks_like_hf_id(&inp.reference) {
        msg.push_str(&format!(
            "\n`{}` is neither a local directory nor in the local HF cache ({}); fusechat never downloads: \
             fetch it first (e.g. `huggingface-cli download {}`) or give a local path",
            inp.reference,
            crate::io::hub::cache_dirs().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
            inp.reference
        ));
    }
    problems.request(msg);
    None
}

// --- Parameters: names, types and scopes, before anything else.

/// Parameter names, types and scope, through the check every plugin kind shares.
/// The output vocabulary of a request with `tokenizer_source`.
fn vocab_plan(
    source: &crate::merge::vocab::TokenizerSource,
    models: &[Model],
    base: Option<usize>,
) -> Result<crate::merge::vocab::VocabPlan> {
    use crate::merge::vocab::TokenizerSource;
    let chosen = match source {
        TokenizerSource::Model(name) => Some(
            models
                .iter()
                .position(|m| m.label == *name || same_path(&m.dir.path, Path::new(name)))
                .ok_or_else(|| {
                    let known: Vec<&str> = models.iter().map(|m| m.label.as_str()).collect();
                    Error::msg(format!(
                        "tokenizer_source `{name}` is none of the merge's models ({}); use base, union or one of them",
                        known.join(", ")
                    ))
                })?,
        ),
        _ => None,
    };
    let dirs: Vec<&ModelDir> = models.iter().map(|m| &m.dir).collect();
    crate::merge::vocab::plan(source, &dirs, base, chosen)
}

/// `numerics = "mergekit"` needs a dtype to compute in and a method that
/// implements it.
fn check_mergekit_numerics(
    req: &MergeRequest,
    entry: &MergerEntry,
    registry: &Registry,
    problems: &mut Problems,
) {
    if req.dtype.is_none() {
        problems.request(
            "numerics = \"mergekit\" computes in the request's dtype, and none is given: set `dtype` (`--dtype bf16`; FuseChat's mergekit configs say `dtype: bfloat16`)".into(),
        );
    }
    if !entry.plugin.mergekit_numerics() {
        let able: Vec<&str> = registry
            .mergers()
            .iter()
            .filter(|m| m.plugin.mergekit_numerics())
            .map(|m| m.info.name.as_str())
            .collect();
        problems.request(format!(
            "method `{}` has no numerics = \"mergekit\" mode (it computes in f32 and rounds once); the methods that have one: {}",
            entry.info.name,
            able.join(", ")
        ));
    }
}

fn check_params(req: &MergeRequest, entry: &MergerEntry, problems: &mut Problems) {
    let info = &entry.info;
    for (k, v) in &req.params {
        if let Some(p) = info.check_setting(k, v, None, &req.params) {
            problems.request(p);
        }
    }
    for m in &req.models {
        let of = format!("model `{}`", m.reference);
        for (k, v) in &m.params {
            if let Some(p) = info.check_setting(k, v, Some(&of), &req.params) {
                problems.request(p);
            }
        }
    }
}

// --- Architectures: the inputs must be the same network.

/// The config.json fields that make two checkpoints the same architecture,
/// with the value HF assumes when a field is absent (`None`: required).
fn architecture_fields(
    config: &serde_json::Value,
) -> Vec<(&'static str, Option<serde_json::Value>)> {
    use serde_json::json;
    let heads = config.get("num_attention_heads").cloned();
    let head_dim = match (
        config["hidden_size"].as_u64(),
        heads.as_ref().and_then(|h| h.as_u64()),
    ) {
        (Some(h), Some(n)) if n > 0 => Some(json!(h / n)),
        _ => None,
    };
    vec![
        ("model_type", None),
        ("hidden_size", None),
        ("num_attention_heads", None),
        ("num_key_value_heads", heads),
        ("head_dim", head_dim),
        ("num_hidden_layers", None),
        ("vocab_size", None),
        ("rope_theta", Some(json!(10000.0))),
        ("tie_word_embeddings", Some(json!(false))),
    ]
}

/// Every input's architecture fields against the first's: a difference, or a
/// required field that is missing, is a problem naming the model, the field
/// and both values. `sliced`: layer counts may differ (slices pick layers).
fn check_architectures(inputs: &Inputs, sliced: bool, vocabs: bool, problems: &mut Problems) {
    let opened: Vec<(&Input, &ModelDir)> = inputs
        .models
        .iter()
        .filter_map(|m| m.dir.as_ref().map(|d| (m, d)))
        .collect();
    let value = |d: &ModelDir, field: &str, default: &Option<serde_json::Value>| {
        match d.config.get(field).filter(|v| !v.is_null()) {
            // compare numbers by value: 10000 and 10000.0 are one theta
            Some(v) if v.is_number() => Some(serde_json::json!(v.as_f64())),
            Some(v) => Some(v.clone()),
            None => default.as_ref().map(|v| match v.as_f64() {
                Some(f) => serde_json::json!(f),
                None => v.clone(),
            }),
        }
    };
    let hint = "pass --allow-config-mismatch (allow_config_mismatch = true under [merge]) to merge them anyway";
    for (m, d) in &opened {
        let missing: Vec<String> = architecture_fields(&d.config)
            .into_iter()
            .filter(|(field, default)| default.is_none() && value(d, field, &None).is_none())
            .map(|(field, _)| format!("`{field}`"))
            .collect();
        if !missing.is_empty() {
            problems.request(format!(
                "model `{}`: config.json has no {}, so fusechat cannot check that the inputs are one architecture; add them, or {hint}",
                m.label,
                missing.join(", ")
            ));
        }
    }
    let Some(((first, fd), rest)) = opened.split_first() else {
        return;
    };
    for (m, d) in rest {
        for (field, default) in architecture_fields(&d.config) {
            if sliced && field == "num_hidden_layers" || vocabs && field == "vocab_size" {
                continue;
            }
            let first_default = architecture_fields(&fd.config)
                .into_iter()
                .find(|(f, _)| *f == field)
                .and_then(|(_, d)| d);
            match (value(fd, field, &first_default), value(d, field, &default)) {
                (Some(a), Some(b)) if a != b && field == "vocab_size" => problems.request(format!(
                    "models `{}` and `{}` have different vocabularies: config.json `vocab_size` is {} vs {}; say which vocabulary the output has with `tokenizer_source` (base, union or one of the models: `--tokenizer-source`, `[merge] tokenizer_source`, mergekit's `tokenizer_source:`), and the embedding and lm_head rows are aligned by token",
                    first.label,
                    m.label,
                    fd.config.get(field).cloned().unwrap_or(a),
                    d.config.get(field).cloned().unwrap_or(b)
                )),
                (Some(a), Some(b)) if a != b => problems.request(format!(
                    "models `{}` and `{}` are different architectures: config.json `{field}` is {} vs {}; {hint}",
                    first.label,
                    m.label,
                    fd.config.get(field).cloned().unwrap_or(a),
                    d.config.get(field).cloned().unwrap_or(b)
                )),
                _ => {}
            }
        }
    }
}

// --- Roles, slices and the input contract.

/// Which models take part, and how.
struct Roles {
    /// The model the others are merged onto.
    base: Option<usize>,
    /// The models merged onto the base, in request order.
    members: Vec<usize>,
}

fn assign_roles<'r>(
    req: &'r MergeRequest,
    inputs: &mut Inputs<'r>,
    base_use: BaseUse,
    warnings: &mut Vec<String>,
) -> Roles {
    let mut members = Vec::new();
    for (m, &d) in req.models.iter().zip(&inputs.listed) {
        if base_use != BaseUse::Ignored && Some(d) == inputs.base {
            if !m.params.is_empty() {
                warnings.push(format!(
                    "the base model `{}` is also listed as a model; its parameters there are ignored",
                    m.reference
                ));
            }
            continue;
        }
        members.push(d);
        inputs.models[d].settings.get_or_insert(&m.params);
    }
    let base = match (base_use, inputs.base) {
        // as mergekit does: a method without a base role merges the base as
        // one more model (first), unless it is listed already
        (BaseUse::Ignored, Some(b)) => {
            if !members.contains(&b) {
                warnings.push(format!(
                    "method `{}` has no base role: the base `{}` is merged as one of its models, as mergekit does (leave `base` out to merge only the models)",
                    req.method, inputs.models[b].label
                ));
                members.insert(0, b);
                inputs.models[b].settings.get_or_insert(&NO_SETTINGS);
            }
            None
        }
        (BaseUse::Ignored, None) => None,
        (BaseUse::Required | BaseUse::Optional, base) => base,
    };
    Roles { base, members }
}

/// One source of an output slice: a model (`None` where the request names
/// none, e.g. `base` without a base) and a half-open layer range.
struct SliceSrc {
    model: Option<usize>,
    layers: (usize, usize),
}

/// The request's explicit slices (none: one implicit slice is laid out once
/// the models are open), each checked for equal, non-empty layer counts.
fn lay_out_slices(
    req: &MergeRequest,
    inputs: &Inputs,
    roles: &mut Roles,
    base_use: BaseUse,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) -> Vec<Vec<SliceSrc>> {
    let slices: Vec<Vec<SliceSrc>> = req
        .slices
        .iter()
        .map(|s| {
            s.iter()
                .map(|src| SliceSrc {
                    model: match src.model {
                        SliceModel::Base => inputs.base,
                        SliceModel::Model(i) => inputs.listed.get(i).copied(),
                    },
                    layers: src.layers,
                })
                .collect()
        })
        .collect();
    for (si, (srcs, given)) in slices.iter().zip(&req.slices).enumerate() {
        if srcs.is_empty() {
            problems.request(format!(
                "slice {} has no sources: give each slice at least one model with its layer_range",
                si + 1
            ));
            continue;
        }
        for (j, (x, g)) in srcs.iter().zip(given).enumerate() {
            let Some(d) = x.model else {
                problems.request(format!(
                    "slice {}, source {}: {} names no model of the request",
                    si + 1,
                    j + 1,
                    match g.model {
                        SliceModel::Base => "the base".to_string(),
                        SliceModel::Model(i) => format!("model #{i}"),
                    }
                ));
                continue;
            };
            let Some(dir) = &inputs.models[d].dir else {
                continue; // could not be opened: a problem already says why
            };
            let (start, end) = x.layers;
            let n = model_layers(dir);
            if start >= end || end > n {
                problems.request(format!(
                    "slice {}, source {} (`{}`): layer_range [{start}, {end}] must satisfy start < end <= {n}, the model's number of layers",
                    si + 1,
                    j + 1,
                    inputs.models[d].label
                ));
            }
        }
    }
    if !problems.is_empty() {
        return slices;
    }
    for (si, srcs) in slices.iter().enumerate() {
        let lens: BTreeSet<usize> = srcs
            .iter()
            .map(|x| x.layers.1.saturating_sub(x.layers.0))
            .collect();
        if lens.len() > 1 || lens.contains(&0) {
            problems.request(format!(
                "slice {}: every source must cover the same, non-empty number of layers (got {:?})",
                si + 1,
                srcs.iter()
                    .map(|x| [x.layers.0, x.layers.1])
                    .collect::<Vec<_>>()
            ));
        }
    }
    if base_use == BaseUse::Required && !slices.is_empty() {
        choose_slice_base(&slices, inputs, roles, warnings);
    }
    slices
}

/// mergekit semantics: a method with a base merges each slice's sources onto
/// the base's slice, so the base must be one of every slice's sources.
/// mergekit rejects a config where it is not; fusechat uses the first source.
fn choose_slice_base(
    slices: &[Vec<SliceSrc>],
    inputs: &Inputs,
    roles: &mut Roles,
    warnings: &mut Vec<String>,
) {
    let in_every_slice = |b: usize| slices.iter().all(|s| s.iter().any(|x| x.model == Some(b)));
    if roles.base.is_some_and(in_every_slice) {
        return;
    }
    let Some(first) = slices.first().and_then(|s| s.first()).and_then(|x| x.model) else {
        return;
    };
    let label = |m: usize| &inputs.models[m].label;
    let named = roles
        .base
        .map(|b| {
            format!(
                "names base_model `{}`, which is not one of its slice sources",
                label(b)
            )
        })
        .unwrap_or_else(|| "has no base_model".into());
    warnings.push(format!(
        "the config {named}; mergekit rejects this. fusechat uses the first source, `{}`, as the base \
         (t = 0 gives it). To say so explicitly, set `base_model: {}`",
        label(first),
        label(first)
    ));
    roles.base = Some(first);
}

fn check_contract(
    req: &MergeRequest,
    c: InputContract,
    roles: &Roles,
    slices: &[Vec<SliceSrc>],
    problems: &mut Problems,
) {
    if roles.base.is_none() && roles.members.is_empty() {
        problems.request(
            "nothing to merge: the request lists no model (give `models`, `--model` or `slices`)"
                .to_string(),
        );
        return;
    }
    if c.base == BaseUse::Required && roles.base.is_none() {
        problems.request(format!(
            "method `{}` needs a base model (θ⁰, the pivot the others were fine-tuned from): give `base` / `--base` / `base_model`",
            req.method
        ));
    }
    let n = if slices.is_empty() {
        roles.members.len()
    } else {
        let besides_base = |s: &Vec<SliceSrc>| s.iter().filter(|x| x.model != roles.base).count();
        slices.iter().map(besides_base).max().unwrap_or(0)
    };
    if n < c.min_models || c.max_models.is_some_and(|m| n > m) {
        let want = match c.max_models {
            Some(m) if m == c.min_models => format!("exactly {m}"),
            Some(m) => format!("{} to {m}", c.min_models),
            None => format!("at least {}", c.min_models),
        };
        let besides = if c.base == BaseUse::Ignored {
            ""
        } else {
            " besides the base"
        };
        let hint = if c.max_models == Some(1) && n > 1 && c.base == BaseUse::Ignored {
            " (to stack layer ranges of several models, give `slices` with a `layer_range` per source in a mergekit YAML)"
        } else {
            ""
        };
        problems.request(format!(
            "method `{}` merges {want} model(s){besides}; this request has {n}{hint}",
            req.method
        ));
    }
}

/// A model's number of decoder layers: config.json's, else one past the
/// highest layer index among its tensors.
fn model_layers(dir: &ModelDir) -> usize {
    dir.num_layers().unwrap_or_else(|| {
        dir.tensors()
            .keys()
            .filter_map(|n| layer_index(n))
            .max()
            .map_or(0, |m| m + 1)
    })
}

/// Without explicit slices: one slice over every layer of the lead (the
/// base, else the first model), base first.
fn implicit_slice(models: &[Model], roles: &Roles) -> Vec<SliceSrc> {
    let lead = roles
        .base
        .or(roles.members.first().copied())
        .expect("contract checked");
    let n_layers = model_layers(&models[lead].dir);
    roles
        .base
        .iter()
        .chain(&roles.members)
        .map(|&d| SliceSrc {
            model: Some(d),
            layers: (0, n_layers),
        })
        .collect()
}

// --- Output tensors.

/// What planning a tensor needs to know about the request.
struct TensorPlanner<'a> {
    models: &'a [Model<'a>],
    base: Option<usize>,
    specs: &'a [ParamSpec],
    global: &'a Settings,
    /// The requested output dtype, if any (else the input's).
    out_dtype: Option<DType>,
    /// `numerics = "mergekit"`: the dtype every operation rounds to.
    round_ops: Option<DType>,
    /// `tokenizer_source`: the output vocabulary.
    vocab: Option<&'a crate::merge::vocab::VocabPlan>,
    /// The method, for its checks of parameter combinations.
    merger: &'a dyn crate::merge::Merger,
}

/// One output tensor to plan: its name, layer, layer position and sources,
/// the lead's (the reference for names and shapes) first.
struct Candidate {
    name: String,
    layer: Option<usize>,
    t: f64,
    sources: Vec<TensorSource>,
}

/// The planned tensors, the output's layer count and the lead model (of
/// names, config and tokenizer).
struct Planned {
    tensors: Vec<PlannedTensor>,
    layers: usize,
    lead: usize,
}

/// A slice's sources as (model, first layer), the lead (the base, else the
/// first source) first.
fn lead_first(s: &[SliceSrc], base: Option<usize>) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = s
        .iter()
        .filter_map(|x| x.model.map(|d| (d, x.layers.0)))
        .collect();
    if let Some(p) = v.iter().position(|(d, _)| Some(*d) == base) {
        let x = v.remove(p);
        v.insert(0, x);
    }
    v
}

/// The tensors outside the layers, in natural order, as (embeddings, the rest).
fn non_layer_names(dir: &ModelDir) -> (Vec<String>, Vec<String>) {
    let mut names: Vec<&String> = dir
        .tensors()
        .keys()
        .filter(|n| layer_index(n).is_none())
        .collect();
    names.sort_by(|a, b| natural_order(a, b));
    names
        .into_iter()
        .cloned()
        .partition(|n| n.contains("embed") || n.contains("wte") || n.contains("wpe"))
}

impl TensorPlanner<'_> {
    /// Every output tensor in output order: the embeddings, each slice's
    /// layers, the other non-layer tensors (final norm, lm_head). As in
    /// mergekit, the embeddings come from the first slice's sources and the
    /// final norm and lm_head from the last slice's (the same slice without
    /// explicit slices), at t = 0.
    fn plan_all(&self, slices: &[Vec<SliceSrc>], problems: &mut Problems) -> Planned {
        let first = lead_first(&slices[0], self.base);
        let last = lead_first(&slices[slices.len() - 1], self.base);
        let lead = first[0].0;
        let (pre, _) = non_layer_names(&self.models[lead].dir);
        let (_, post) = non_layer_names(&self.models[last[0].0].dir);
        let non_layer = |name: &String, from: &[(usize, usize)]| Candidate {
            name: name.clone(),
            layer: None,
            t: 0.0,
            sources: from
                .iter()
                .map(|&(d, _)| TensorSource {
                    model: d,
                    name: name.clone(),
                })
                .collect(),
        };
        let mut tensors = Vec::new();
        for name in &pre {
            tensors.extend(self.plan(non_layer(name, &first), problems));
        }
        let mut layers = 0;
        for s in slices {
            let srcs = lead_first(s, self.base);
            let len = s.iter().map(|x| x.layers.1 - x.layers.0).min().unwrap_or(0);
            for k in 0..len {
                for c in self.layer_candidates(&srcs, (k, len), layers, problems) {
                    tensors.extend(self.plan(c, problems));
                }
                layers += 1;
            }
        }
        for name in &post {
            tensors.extend(self.plan(non_layer(name, &last), problems));
        }
        Planned {
            tensors,
            layers,
            lead,
        }
    }

    /// The tensors of output layer `out_layer`: layer `k` of `len` of a slice
    /// whose sources (lead first) are `srcs`.
    fn layer_candidates(
        &self,
        srcs: &[(usize, usize)],
        (k, len): (usize, usize),
        out_layer: usize,
        problems: &mut Problems,
    ) -> Vec<Candidate> {
        let t = if len > 1 {
            k as f64 / (len - 1) as f64
        } else {
            0.0
        };
        let (lead, lead_start) = srcs[0];
        let lead_layer = lead_start + k;
        let lead = &self.models[lead];
        let mut names: Vec<&String> = lead
            .dir
            .tensors()
            .keys()
            .filter(|n| layer_index(n) == Some(lead_layer))
            .collect();
        if names.is_empty() {
            let msg = format!("`{}` has no tensors for layer {lead_layer}", lead.label);
            problems.repeated(Kind::NoLayer, Key::Model(srcs[0].0), msg);
        }
        names.sort();
        let sources = |name: &str| -> Vec<TensorSource> {
            srcs.iter()
                .map(|&(d, start)| TensorSource {
                    model: d,
                    name: with_layer_index(name, start + k),
                })
                .collect()
        };
        names
            .into_iter()
            .map(|name| Candidate {
                name: with_layer_index(name, out_layer),
                layer: Some(out_layer),
                t,
                sources: sources(name),
            })
            .collect()
    }

    /// Plan one tensor, or record why it cannot be merged.
    fn plan(&self, c: Candidate, problems: &mut Problems) -> Option<PlannedTensor> {
        let lead = self.entry(&c.sources[0]).expect("taken from the lead");
        let vocab = self.vocab.is_some() && self.is_vocab_tensor(&c);
        if !self.check_sources(&c.sources, lead, vocab, problems) {
            return None;
        }
        let input_bytes = c
            .sources
            .iter()
            .map(|s| self.entry(s).map_or(0, |t| (t.end - t.start) as u64))
            .sum();
        let mut shape = lead.shape.clone();
        if let (true, Some(v)) = (vocab, self.vocab) {
            shape[0] = v.size;
        }
        let out_dtype = self.out_dtype.unwrap_or(lead.dtype.expect("checked"));
        let (base, inputs) = self.split_base(c.sources);
        let params = self.resolve_params(&c.name, c.t, &inputs, problems)?;
        Some(PlannedTensor {
            name: c.name,
            shape,
            out_dtype,
            layer: c.layer,
            t: c.t,
            base,
            inputs,
            params,
            input_bytes,
            vocab,
        })
    }

    /// A non-layer matrix with one row per token of its model's vocabulary
    /// (the embeddings, lm_head), in every source.
    fn is_vocab_tensor(&self, c: &Candidate) -> bool {
        c.layer.is_none()
            && c.sources.iter().all(|s| {
                let rows = self.models[s.model].dir.config["vocab_size"].as_u64();
                self.entry(s)
                    .is_some_and(|t| t.shape.len() == 2 && Some(t.shape[0] as u64) == rows)
            })
    }

    fn entry(&self, s: &TensorSource) -> Option<&TensorEntry> {
        self.models[s.model].dir.tensor(&s.name)
    }

    /// Every source has the tensor, in the lead's shape and a dtype fusechat
    /// merges; each failure is recorded (once per kind and model, counted).
    fn check_sources(
        &self,
        sources: &[TensorSource],
        lead: &TensorEntry,
        vocab: bool,
        problems: &mut Problems,
    ) -> bool {
        let lead_label = &self.models[sources[0].model].label;
        let mut ok = true;
        for s in sources {
            let (name, label) = (&s.name, &self.models[s.model].label);
            let (kind, msg) = match self.entry(s) {
                None => (
                    Kind::MissingTensor,
                    format!("tensor `{name}` is missing from `{label}` (present in `{lead_label}`)"),
                ),
                // a vocabulary tensor's rows are aligned on load: only its width must agree
                Some(t) if t.shape != lead.shape && !(vocab && t.shape[1..] == lead.shape[1..]) => (
                    Kind::Shape,
                    format!(
                        "shape mismatch for `{name}`: `{lead_label}` has {:?}, `{label}` has {:?}",
                        lead.shape, t.shape
                    ),
                ),
                Some(t) if t.dtype.is_none() => (
                    Kind::DType,
                    format!(
                        "tensor `{name}` of `{label}` has dtype {}; fusechat merges F32, F16 and BF16 tensors",
                        t.raw_dtype
                    ),
                ),
                Some(_) => continue,
            };
            problems.repeated(kind, Key::Model(s.model), msg);
            ok = false;
        }
        ok
    }

    /// The base's source (the first from the base model) and the others, in order.
    fn split_base(&self, sources: Vec<TensorSource>) -> (Option<TensorSource>, Vec<TensorSource>) {
        let mut base = None;
        let mut inputs = Vec::new();
        for s in sources {
            if Some(s.model) == self.base && base.is_none() {
                base = Some(s);
            } else {
                inputs.push(s);
            }
        }
        (base, inputs)
    }

    /// The tensor's parameters; a parameter without a usable value is recorded
    /// once per parameter and model, with the number of tensors it concerns.
    fn resolve_params(
        &self,
        tensor: &str,
        t: f64,
        inputs: &[TensorSource],
        problems: &mut Problems,
    ) -> Option<ResolvedParams> {
        let settings: Vec<&Settings> = inputs
            .iter()
            .map(|s| self.models[s.model].settings)
            .collect();
        let ps = match ResolvedParams::resolve(self.specs, self.global, &settings, tensor, t) {
            Ok(mut p) => {
                p.round_ops = self.round_ops;
                let bad = self.merger.check_params(&p);
                if bad.is_empty() {
                    return Some(p);
                }
                for (param, model, msg) in bad {
                    problems.repeated(
                        Kind::BadParam,
                        Key::Param(param, model),
                        format!("tensor `{tensor}`: {msg}"),
                    );
                }
                return None;
            }
            Err(ps) => ps,
        };
        for p in ps {
            let kind = match p {
                ParamProblem::Missing { .. } => Kind::MissingParam,
                ParamProblem::Invalid { .. } => Kind::BadParam,
            };
            problems.repeated(
                kind,
                Key::Param(p.param().to_string(), p.model()),
                p.to_string(),
            );
        }
        None
    }
}

// --- What the plan carries besides its tensors.

/// Tensors that a model has and the lead lacks are not merged: say so.
fn extra_tensor_warnings(models: &[Model], slices: &[Vec<SliceSrc>], lead: usize) -> Vec<String> {
    let in_slices = |d: usize| slices.iter().any(|s| s.iter().any(|x| x.model == Some(d)));
    let lead_model = &models[lead];
    models
        .iter()
        .enumerate()
        .filter(|&(d, _)| d != lead && in_slices(d))
        .filter_map(|(_, m)| {
            let lead = lead_model;
            let extra = m
                .dir
                .tensors()
                .keys()
                .filter(|n| lead.dir.tensor(n).is_none())
                .count();
            (extra > 0).then(|| {
                format!(
                    "`{}` has {extra} tensor(s) that `{}` lacks; they are not merged",
                    m.label, lead.label
                )
            })
        })
        .collect()
}

/// The output's config.json: the lead's, with the output dtype and, for
/// explicit slices, the output's layer count.
fn output_config(lead: &ModelDir, planned: &Planned, req: &MergeRequest) -> serde_json::Value {
    let mut config = lead.config.clone();
    if let Some(obj) = config.as_object_mut() {
        let out_dtype = planned.tensors[0].out_dtype;
        obj.insert(
            "torch_dtype".into(),
            serde_json::Value::String(out_dtype.torch_name().into()),
        );
        if !req.slices.is_empty() {
            obj.insert(
                "num_hidden_layers".into(),
                serde_json::json!(planned.layers),
            );
        }
    }
    config
}

impl Plan {
    /// Bytes of all inputs read.
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.input_bytes).sum()
    }

    /// The default memory budget with `threads` workers: the working memory
    /// of the two largest tensors' jobs (of the largest alone on one thread).
    /// The two largest are often the embeddings and the LM head, which would
    /// otherwise each run alone, leaving the other cores idle for a quarter
    /// of a 7B merge; memory stays bounded by two tensors whatever the model size.
    pub fn default_budget(&self, threads: usize) -> u64 {
        let mut jobs: Vec<u64> = self.tensors.iter().map(|t| t.job_bytes()).collect();
        jobs.sort_unstable_by(|a, b| b.cmp(a));
        jobs.iter().take(threads.clamp(1, 2)).sum()
    }

    /// Estimated peak working memory with `threads` workers under `budget` bytes
    /// (0: the default, [`Plan::default_budget`]), pooled buffers included.
    pub fn peak_memory_estimate(&self, threads: usize, budget: u64) -> u64 {
        let mut jobs: Vec<u64> = self.tensors.iter().map(|t| t.job_bytes()).collect();
        jobs.sort_unstable_by(|a, b| b.cmp(a));
        let largest = jobs.first().copied().unwrap_or(0);
        let budget = if budget == 0 {
            self.default_budget(threads)
        } else {
            budget.max(largest)
        };
        let concurrent: u64 = jobs.iter().take(threads.max(1)).sum();
        // plus the recycled buffers the merge pool may hold (one largest job)
        concurrent.min(budget) + self.pool_cap()
    }

    /// The most the merge pool ([`crate::merge::pool`]) holds: one largest
    /// job's buffers.
    pub fn pool_cap(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.job_bytes())
            .max()
            .unwrap_or(0)
    }

    /// A human-readable listing of the plan: per tensor, the method and resolved parameters.
    pub fn describe(&self, threads: usize, budget: u64) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "method: {} ({})",
            self.method.info.name, self.method.origin
        );
        for (i, l) in self.labels.iter().enumerate() {
            let _ = writeln!(s, "model #{i}: {l}");
        }
        let _ = writeln!(
            s,
            "output: {} ({} tensors)",
            self.out.display(),
            self.tensors.len()
        );
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        for t in &self.tensors {
            let mut params: Vec<String> = t
                .params
                .shared
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if let Some(first) = t.params.per_model.first() {
                for k in first.keys() {
                    let vals: Vec<String> = t
                        .params
                        .per_model
                        .iter()
                        .map(|m| m.get(k).map(|v| v.to_string()).unwrap_or("-".into()))
                        .collect();
                    params.push(format!("{k}=[{}]", vals.join(", ")));
                }
            }
            let _ = writeln!(
                s,
                "{:<48} {:<14} {:<5} base={} models=[{}] {}",
                t.name,
                format!("{:?}", t.shape),
                t.out_dtype.to_string(),
                t.base
                    .as_ref()
                    .map(|b| b.model.to_string())
                    .unwrap_or("-".into()),
                t.inputs
                    .iter()
                    .map(|i| i.model.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                params.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "inputs: {:.3} GB; estimated peak working memory: {:.3} GB ({} threads, budget {:.3} GB), plus the mapped pages of the chunk being read",
            self.input_bytes() as f64 / 1e9,
            self.peak_memory_estimate(threads, budget) as f64 / 1e9,
            threads,
            if budget == 0 { self.default_budget(threads) } else { budget } as f64 / 1e9
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(p: Problems) -> Vec<String> {
        match p.into_error() {
            Error::Invalid { problems: m, .. } => m,
            e => panic!("not a request error: {e}"),
        }
    }

    #[test]
    fn repeated_problems_are_reported_once_with_a_count() {
        let mut p = Problems::default();
        p.request("model `x`: not found".into());
        for i in 0..291 {
            let msg = format!("tensor `t{i}` is missing from `b` (present in `a`)");
            p.repeated(Kind::MissingTensor, Key::Model(1), msg);
        }
        for i in 0..37 {
            let msg = format!("required parameter `t` has no value for tensor `x{i}`");
            p.repeated(Kind::MissingParam, Key::Param("t".into(), None), msg);
        }
        // Another model, another key: its own line.
        p.repeated(
            Kind::MissingParam,
            Key::Param("t".into(), Some(0)),
            "per model".into(),
        );
        p.repeated(
            Kind::NoLayer,
            Key::Model(0),
            "`a` has no tensors for layer 40".into(),
        );
        p.repeated(
            Kind::NoLayer,
            Key::Model(0),
            "`a` has no tensors for layer 41".into(),
        );
        p.request("model `x`: not found".into());
        assert_eq!(
            messages(p),
            [
                "model `x`: not found",
                "tensor `t0` is missing from `b` (present in `a`), and 290 more missing tensors",
                "required parameter `t` has no value for tensor `x0` (and 36 more tensors)",
                "per model",
                "`a` has no tensors for layer 40, nor for 1 more layer",
                "model `x`: not found",
            ]
        );
    }

    #[test]
    fn a_capped_kind_stops_after_eight_lines() {
        let mut p = Problems::default();
        for m in 0..12 {
            for _ in 0..2 {
                p.repeated(
                    Kind::Shape,
                    Key::Model(m),
                    format!("shape mismatch in #{m}"),
                );
            }
        }
        p.repeated(Kind::DType, Key::Model(0), "dtype of #0".into());
        let got = messages(p);
        assert_eq!(got.len(), CAP + 2, "{got:?}");
        assert_eq!(got[0], "shape mismatch in #0, and 1 more shape mismatch");
        assert_eq!(
            got[CAP - 1],
            "shape mismatch in #7, and 1 more shape mismatch"
        );
        assert_eq!(got[CAP], "(further `shape` problems omitted)");
        assert_eq!(got[CAP + 1], "dtype of #0");
    }
}
