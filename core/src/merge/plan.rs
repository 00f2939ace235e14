//! The merge planner: one [`MergeRequest`] (from fusechat.toml, the CLI or a
//! mergekit YAML) becomes a validated [`Plan`]: per output tensor, its inputs,
//! its layer position and its fully resolved parameters.
//!
//! Validation happens here, before any compute, and reports every problem at
//! once: missing model directories, tensors missing from a model, shape
//! mismatches, unknown or ill-typed parameters, a broken input contract.

use crate::io::dtype::DType;
use crate::io::model_dir::{layer_index, natural_order, with_layer_index, ModelDir};
use crate::merge::params::{ResolvedParams, Settings};
use crate::merge::BaseUse;
use crate::plugin::registry::{MergerEntry, Registry, Scope};
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
    pub seed: u64,
    pub out: PathBuf,
    pub max_shard_size: u64,
    pub force: bool,
    /// Where the request came from, for the model card (e.g. "fusechat.toml [merge]").
    pub origin: String,
    /// Set by `fusechat run`: a hash of the inputs and settings, recorded in the
    /// output so that an up-to-date stage can be skipped.
    pub stage_key: Option<String>,
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
            seed: 0,
            out: out.into(),
            max_shard_size: crate::io::writer::DEFAULT_MAX_SHARD_SIZE,
            force: false,
            origin: "library call".into(),
            stage_key: None,
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
        serde_json::json!({
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
        })
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
    pub warnings: Vec<String>,
    pub request: serde_json::Value,
    pub origin: String,
    pub stage_key: Option<String>,
}

/// Cap a list of similar problems so that a model missing 300 tensors gives a readable report.
fn push_capped(
    problems: &mut Vec<String>,
    kind_counts: &mut std::collections::HashMap<String, usize>,
    kind: &str,
    msg: String,
) {
    let c = kind_counts.entry(kind.to_string()).or_insert(0);
    *c += 1;
    if *c <= 8 {
        problems.push(msg);
    } else if *c == 9 {
        problems.push(format!("(further `{kind}` problems omitted)"));
    }
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
    let mut problems: Vec<String> = Vec::new();
    let mut counts = std::collections::HashMap::new();
    let mut warnings: Vec<String> = Vec::new();

    let entry = match registry.merger(&req.method) {
        Ok(e) => Some(e.clone()),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };

    // --- Open every model directory once (a base listed among the models too is one model).
    let mut inputs: Vec<&ModelInput> = Vec::new();
    if let Some(b) = &req.base {
        inputs.push(b);
    }
    inputs.extend(req.models.iter());
    let mut dirs: Vec<Option<ModelDir>> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut dir_of_input: Vec<usize> = Vec::new();
    let mut dir_paths: Vec<&Path> = Vec::new();
    for inp in &inputs {
        if let Some(i) = dir_paths.iter().position(|p| same_path(p, &inp.path)) {
            dir_of_input.push(i);
            continue;
        }
        dir_paths.push(&inp.path);
        let opened = match ModelDir::open(&inp.path) {
            Ok(d) => Some(d),
            Err(e) => {
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
                problems.push(msg);
                None
            }
        };
        dir_of_input.push(dirs.len());
        dirs.push(opened);
        labels.push(inp.reference.clone());
    }
    let has_base = req.base.is_some();
    let base_dir: Option<usize> = has_base.then(|| dir_of_input[0]);
    let model_dirs: Vec<usize> = dir_of_input[has_base as usize..].to_vec();

    // --- Parameter names and types, before anything else.
    if let Some(e) = &entry {
        let specs = &e.info.params;
        let known = || {
            specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (k, v) in &req.params {
            match specs.iter().find(|s| &s.name == k) {
                None => problems.push(format!(
                    "unknown parameter `{k}` for method `{}` (known: {})",
                    e.info.name,
                    known()
                )),
                Some(s) => {
                    if let Err(msg) = v.check_type(&s.ty) {
                        problems.push(format!("parameter `{k}`: {msg}"));
                    }
                }
            }
        }
        for m in &req.models {
            for (k, v) in &m.params {
                match specs.iter().find(|s| &s.name == k) {
                    None => problems.push(format!(
                        "unknown parameter `{k}` for model `{}` under method `{}` (known: {})",
                        m.reference,
                        e.info.name,
                        known()
                    )),
                    Some(s) if s.scope == Scope::Shared => problems.push(format!(
                        "parameter `{k}` of `{}` is shared by all models; set it in the merge's parameters, not for model `{}`",
                        e.info.name, m.reference
                    )),
                    Some(s) => {
                        if let Err(msg) = v.check_type(&s.ty) {
                            problems.push(format!("parameter `{k}` of model `{}`: {msg}", m.reference));
                        }
                    }
                }
            }
        }
    }

    // --- Which models take part, and which one is the base.
    // `members` are (dir index, settings) of the models merged onto the base.
    let mut base: Option<usize> = None;
    let mut members: Vec<(usize, &Settings)> = Vec::new();
    let contract = entry.as_ref().map(|e| e.plugin.contract());
    let base_use = contract.map(|c| c.base).unwrap_or(BaseUse::Optional);
    for (i, m) in req.models.iter().enumerate() {
        let d = model_dirs[i];
        if base_use != BaseUse::Ignored && Some(d) == base_dir {
            if !m.params.is_empty() {
                warnings.push(format!(
                    "the base model `{}` is also listed as a model; its parameters there are ignored",
                    m.reference
                ));
            }
            continue;
        }
        members.push((d, &m.params));
    }
    match base_use {
        BaseUse::Ignored if has_base => warnings.push(format!(
            "method `{}` does not use a base model; `{}` is merged only if it is listed among the models",
            req.method,
            labels[base_dir.unwrap()]
        )),
        BaseUse::Required | BaseUse::Optional => base = base_dir,
        _ => {}
    }

    // --- Slices: an explicit list, or one implicit slice over every layer.
    // Each slice is a list of (dir index or base, layer range).
    let mut slices: Vec<Vec<(Option<usize>, (usize, usize))>> = Vec::new();
    if !req.slices.is_empty() {
        for (si, s) in req.slices.iter().enumerate() {
            let mut srcs = Vec::new();
            for src in s {
                let dir = match src.model {
                    SliceModel::Base => base_dir,
                    SliceModel::Model(i) => model_dirs.get(i).copied(),
                };
                srcs.push((dir, src.layers));
            }
            let lens: BTreeSet<usize> = srcs.iter().map(|(_, r)| r.1.saturating_sub(r.0)).collect();
            if lens.len() > 1 || lens.contains(&0) {
                problems.push(format!(
                    "slice {}: every source must cover the same, non-empty number of layers (got {:?})",
                    si + 1,
                    srcs.iter().map(|(_, r)| [r.0, r.1]).collect::<Vec<_>>()
                ));
            }
            slices.push(srcs);
        }
        // mergekit semantics: a method with a base merges each slice's sources onto the
        // base's slice; the base must therefore be one of the slice's sources.
        if base_use == BaseUse::Required {
            let base_in_slices =
                base.is_some_and(|b| slices.iter().all(|s| s.iter().any(|(d, _)| *d == Some(b))));
            if !base_in_slices {
                if let Some(first) = slices.first().and_then(|s| s.first()).and_then(|(d, _)| *d) {
                    let named = base
                        .map(|b| {
                            format!(
                                "names base_model `{}`, which is not one of its slice sources",
                                labels[b]
                            )
                        })
                        .unwrap_or_else(|| "has no base_model".into());
                    warnings.push(format!(
                        "the config {named}; mergekit rejects this. fusechat uses the first source, `{}`, as the base \
                         (t = 0 gives it). To say so explicitly, set `base_model: {}`",
                        labels[first], labels[first]
                    ));
                    base = Some(first);
                }
            }
        }
    }

    if let Some(c) = contract {
        if c.base == BaseUse::Required && base.is_none() {
            problems.push(format!(
                "method `{}` needs a base model (θ⁰, the pivot the others were fine-tuned from): give `base` / `--base` / `base_model`",
                req.method
            ));
        }
        let n = if slices.is_empty() {
            members.len()
        } else {
            slices
                .iter()
                .map(|s| s.iter().filter(|(d, _)| *d != base).count())
                .max()
                .unwrap_or(0)
        };
        if n < c.min_models || c.max_models.is_some_and(|m| n > m) {
            let want = match c.max_models {
                Some(m) if m == c.min_models => format!("exactly {m}"),
                Some(m) => format!("{} to {m}", c.min_models),
                None => format!("at least {}", c.min_models),
            };
            problems.push(format!(
                "method `{}` merges {want} model(s) besides the base; this request has {n}",
                req.method
            ));
        }
    }

    // Stop here if the basics are broken: tensor checks would only add noise.
    if !problems.is_empty() || dirs.iter().any(|d| d.is_none()) {
        return Err(Error::invalid("the merge request", problems));
    }
    let dirs: Vec<ModelDir> = dirs.into_iter().map(|d| d.expect("checked")).collect();
    let entry = entry.expect("checked");

    if slices.is_empty() {
        let lead = base
            .or(members.first().map(|m| m.0))
            .expect("contract checked");
        let n_layers = dirs[lead].num_layers().unwrap_or_else(|| {
            dirs[lead]
                .tensors()
                .keys()
                .filter_map(|n| layer_index(n))
                .max()
                .map_or(0, |m| m + 1)
        });
        let mut s: Vec<(Option<usize>, (usize, usize))> = Vec::new();
        if let Some(b) = base {
            s.push((Some(b), (0, n_layers)));
        }
        s.extend(members.iter().map(|(d, _)| (Some(*d), (0, n_layers))));
        slices.push(s);
    }

    // Settings per dir (the base has none).
    let settings_of = |d: usize| -> &Settings {
        static EMPTY: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
        members
            .iter()
            .find(|(m, _)| *m == d)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| EMPTY.get_or_init(Settings::new))
    };

    // --- Output tensors.
    let mut tensors: Vec<PlannedTensor> = Vec::new();
    let mut resolve_problems: BTreeSet<String> = BTreeSet::new();
    let mut out_layer = 0usize;
    let mut plan_tensor = |out_name: String,
                           layer: Option<usize>,
                           t: f64,
                           srcs: &[(usize, String)],
                           tensors: &mut Vec<PlannedTensor>,
                           problems: &mut Vec<String>| {
        let lead = srcs[0].0;
        let lead_t = dirs[lead].tensor(&srcs[0].1).expect("taken from the lead");
        let mut ok = true;
        for (d, name) in srcs {
            match dirs[*d].tensor(name) {
                None => {
                    push_capped(
                        problems,
                        &mut counts,
                        "missing tensor",
                        format!(
                            "tensor `{name}` is missing from `{}` (present in `{}`)",
                            labels[*d], labels[lead]
                        ),
                    );
                    ok = false;
                }
                Some(t) if t.shape != lead_t.shape => {
                    push_capped(
                        problems,
                        &mut counts,
                        "shape",
                        format!(
                            "shape mismatch for `{name}`: `{}` has {:?}, `{}` has {:?}",
                            labels[lead], lead_t.shape, labels[*d], t.shape
                        ),
                    );
                    ok = false;
                }
                Some(t) if t.dtype.is_none() => {
                    push_capped(problems, &mut counts, "dtype", format!(
                        "tensor `{name}` of `{}` has dtype {}; fusechat merges F32, F16 and BF16 tensors",
                        labels[*d], t.raw_dtype
                    ));
                    ok = false;
                }
                Some(_) => {}
            }
        }
        if !ok {
            return;
        }
        let (base_src, model_srcs): (Option<TensorSource>, Vec<TensorSource>) = {
            let mut b = None;
            let mut ms = Vec::new();
            for (d, name) in srcs {
                let s = TensorSource {
                    model: *d,
                    name: name.clone(),
                };
                if Some(*d) == base && b.is_none() {
                    b = Some(s);
                } else {
                    ms.push(s);
                }
            }
            (b, ms)
        };
        let model_settings: Vec<&Settings> =
            model_srcs.iter().map(|s| settings_of(s.model)).collect();
        let params = match ResolvedParams::resolve(
            &entry.info.params,
            &req.params,
            &model_settings,
            &out_name,
            t,
        ) {
            Ok(p) => p,
            Err(ps) => {
                for p in ps {
                    // One line per parameter and model, not per tensor.
                    let key = p.split(" on tensor").next().unwrap_or(&p).to_string();
                    if resolve_problems.insert(key) {
                        problems.push(p);
                    }
                }
                return;
            }
        };
        let in_dtype = lead_t.dtype.expect("checked");
        let out_dtype = req.out_dtype.or(req.dtype).unwrap_or(in_dtype);
        let input_bytes = srcs
            .iter()
            .map(|(d, n)| {
                let t = dirs[*d].tensor(n).expect("checked");
                (t.end - t.start) as u64
            })
            .sum();
        tensors.push(PlannedTensor {
            name: out_name,
            shape: lead_t.shape.clone(),
            out_dtype,
            layer,
            t,
            base: base_src,
            inputs: model_srcs,
            params,
            input_bytes,
        });
    };

    // Each slice's sources as (dir, first layer), its lead (the base, else the
    // first source) first: the lead is the reference for names and shapes.
    let lead_first = |s: &Vec<(Option<usize>, (usize, usize))>| -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> =
            s.iter().filter_map(|(d, r)| d.map(|d| (d, r.0))).collect();
        if let Some(p) = v.iter().position(|(d, _)| Some(*d) == base) {
            let x = v.remove(p);
            v.insert(0, x);
        }
        v
    };

    // Non-layer tensors (embeddings, final norm, lm_head) come from the first
    // slice's sources, at t = 0; embeddings first, the rest after the layers.
    let first = lead_first(&slices[0]);
    let lead0 = first[0].0;
    let mut non_layer: Vec<&String> = dirs[lead0]
        .tensors()
        .keys()
        .filter(|n| layer_index(n).is_none())
        .collect();
    non_layer.sort_by(|a, b| natural_order(a, b));
    let (pre, post): (Vec<&String>, Vec<&String>) = non_layer
        .into_iter()
        .partition(|n| n.contains("embed") || n.contains("wte") || n.contains("wpe"));
    let non_layer_srcs = |name: &String| -> Vec<(usize, String)> {
        first.iter().map(|(d, _)| (*d, name.clone())).collect()
    };
    for name in &pre {
        plan_tensor(
            (*name).clone(),
            None,
            0.0,
            &non_layer_srcs(name),
            &mut tensors,
            &mut problems,
        );
    }
    for s in &slices {
        let srcs_order = lead_first(s);
        let lead = srcs_order[0].0;
        let len = s.iter().map(|(_, r)| r.1 - r.0).min().unwrap_or(0);
        for k in 0..len {
            let t = if len > 1 {
                k as f64 / (len - 1) as f64
            } else {
                0.0
            };
            let lead_layer = srcs_order[0].1 + k;
            let mut names: Vec<&String> = dirs[lead]
                .tensors()
                .keys()
                .filter(|n| layer_index(n) == Some(lead_layer))
                .collect();
            if names.is_empty() {
                problems.push(format!(
                    "`{}` has no tensors for layer {lead_layer}",
                    labels[lead]
                ));
            }
            names.sort();
            for name in names {
                let out_name = with_layer_index(name, out_layer);
                let srcs: Vec<(usize, String)> = srcs_order
                    .iter()
                    .map(|(d, start)| (*d, with_layer_index(name, start + k)))
                    .collect();
                plan_tensor(
                    out_name,
                    Some(out_layer),
                    t,
                    &srcs,
                    &mut tensors,
                    &mut problems,
                );
            }
            out_layer += 1;
        }
    }
    for name in &post {
        plan_tensor(
            (*name).clone(),
            None,
            0.0,
            &non_layer_srcs(name),
            &mut tensors,
            &mut problems,
        );
    }

    if !problems.is_empty() {
        return Err(Error::invalid("the merge request", problems));
    }
    if tensors.is_empty() {
        return Err(Error::invalid(
            "the merge request",
            vec![format!(
                "nothing to merge: `{}` holds no tensors",
                labels[lead0]
            )],
        ));
    }

    // Extra tensors that a model has and the lead does not are not merged.
    for (d, dir) in dirs.iter().enumerate() {
        if d == lead0 || !slices.iter().any(|s| s.iter().any(|(x, _)| *x == Some(d))) {
            continue;
        }
        let extra = dir
            .tensors()
            .keys()
            .filter(|n| dirs[lead0].tensor(n).is_none())
            .count();
        if extra > 0 && req.slices.is_empty() {
            warnings.push(format!(
                "`{}` has {extra} tensor(s) that `{}` lacks; they are not merged",
                labels[d], labels[lead0]
            ));
        }
    }

    // Output config: the lead's, with the output dtype and layer count.
    let mut config = dirs[lead0].config.clone();
    if let Some(obj) = config.as_object_mut() {
        let out_dtype = tensors[0].out_dtype;
        obj.insert(
            "torch_dtype".into(),
            serde_json::Value::String(out_dtype.torch_name().into()),
        );
        if !req.slices.is_empty() {
            obj.insert("num_hidden_layers".into(), serde_json::json!(out_layer));
        }
    }

    Ok(Plan {
        method: entry,
        models: dirs,
        labels,
        tensors,
        load_dtype: req.dtype,
        out: req.out.clone(),
        force: req.force,
        max_shard_size: req.max_shard_size,
        seed: req.seed,
        config,
        tokenizer_from: lead0,
        warnings,
        request: req.to_json(),
        origin: req.origin.clone(),
        stage_key: req.stage_key.clone(),
    })
}

impl Plan {
    /// Bytes of all inputs read.
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.input_bytes).sum()
    }

    /// The working memory of the largest tensor's job: the default memory budget,
    /// under which no other job runs next to the largest one.
    pub fn largest_job(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.job_bytes())
            .max()
            .unwrap_or(0)
    }

    /// Estimated peak working memory with `threads` workers under `budget` bytes
    /// (0: the default, [`Plan::largest_job`]).
    pub fn peak_memory_estimate(&self, threads: usize, budget: u64) -> u64 {
        let mut jobs: Vec<u64> = self.tensors.iter().map(|t| t.job_bytes()).collect();
        jobs.sort_unstable_by(|a, b| b.cmp(a));
        let largest = jobs.first().copied().unwrap_or(0);
        let budget = if budget == 0 {
            largest
        } else {
            budget.max(largest)
        };
        let concurrent: u64 = jobs.iter().take(threads.max(1)).sum();
        concurrent.min(budget)
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
            if budget == 0 { self.largest_job() } else { budget } as f64 / 1e9
        );
        s
    }
}
