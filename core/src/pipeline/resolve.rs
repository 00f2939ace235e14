//! From `fusechat.toml` to the stages of a run, checking everything first:
//! plugin names, parameters (names, types, ranges), numbers, paths and model
//! directories. Every problem is collected, each naming its table and field,
//! and reported together, so that a typo in `[merge]` is found before hours
//! of `represent`.

use crate::data::align::AlignOptions;
use crate::data::represent::RepresentOptions;
use crate::eval::stage::{EvalOptions, EvalSpec};
use crate::eval::EvalModel;
use crate::merge::params::Scalar;
use crate::merge::params::Settings;
use crate::merge::plan::MergeRequest;
use crate::pipeline::config::{defaults, toml_scalars, Config, DataSection, ModelSection};
use crate::pipeline::miniature::SkilledSpec;
use crate::pipeline::run::{Job, Pipeline, Stage};
use crate::plugin::registry::{ParamType, PluginInfo, Registry, Scope};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What the data stages produce, for the stages after them.
struct DataOut {
    /// The pivot's model directory.
    pivot: PathBuf,
    family: Option<String>,
    pivot_repr: PathBuf,
    /// Each source's name and its aligned representation.
    teachers: Vec<(String, PathBuf)>,
    /// Each source's name and its model directory.
    sources: Vec<(String, PathBuf)>,
    /// The chat template of `[data]`.
    template: String,
}

/// The problems found so far, and the stages laid out so far (a path that an
/// earlier stage writes need not exist yet).
struct Resolver<'a> {
    cfg: &'a Config,
    registry: &'a Registry,
    stages: Vec<Stage>,
    problems: Vec<String>,
}

pub(super) fn resolve(cfg: &Config, registry: &Registry, force: bool) -> Result<Pipeline> {
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
    let mut r = Resolver {
        cfg,
        registry,
        stages: Vec::new(),
        problems: Vec::new(),
    };
    let max = crate::merge::engine::MAX_THREADS;
    if cfg.run.threads > max {
        r.problem(format!(
            "[run] threads = {}: at most {max} (0 means one per core)",
            cfg.run.threads
        ));
    }
    r.miniature();
    let data = r.data_stages();
    let targets = r.fuse(data.as_ref());
    r.merge(data.as_ref(), &targets);
    r.eval(data.as_ref());
    if !r.problems.is_empty() {
        return Err(Error::invalid(cfg.file.display().to_string(), r.problems));
    }
    Ok(Pipeline {
        file: cfg.file.clone(),
        stages: r.stages,
        force,
    })
}

impl Resolver<'_> {
    fn problem(&mut self, msg: impl Into<String>) {
        self.problems.push(msg.into());
    }

    /// Whether an earlier stage writes `path`.
    fn produced(&self, path: &Path) -> bool {
        self.stages.iter().any(|s| s.writes(path))
    }

    /// `path` must exist (as a directory when `dir`), unless an earlier stage writes it.
    fn input(&mut self, field: &str, path: &Path, dir: bool) {
        if self.produced(path) {
            return;
        }
        let ok = if dir { path.is_dir() } else { path.is_file() };
        if !ok {
            let what = if dir { "directory" } else { "file" };
            let why = if path.exists() {
                format!("is not a {what}")
            } else {
                "does not exist".to_string()
            };
            self.problem(format!("{field}: `{}` {why}", path.display()));
        }
    }

    /// A count that must be at least `min`.
    fn at_least(&mut self, field: &str, v: usize, min: usize) {
        if v < min {
            self.problem(format!("{field} = {v}: must be at least {min}"));
        }
    }

    fn miniature(&mut self) {
        let Some(m) = &self.cfg.miniature else { return };
        for p in m.problems() {
            self.problem(p);
        }
        let spec = SkilledSpec {
            out: self.cfg.resolve(&m.out),
            ..m.clone()
        };
        self.stages.push(Stage {
            name: "miniature".into(),
            out: spec.out.clone(),
            job: Job::Miniature(Box::new(spec)),
        });
    }

    /// represent for the pivot and every source, align of each source, filter.
    fn data_stages(&mut self) -> Option<DataOut> {
        let cfg = self.cfg;
        let Some(data) = &cfg.data else {
            if cfg.pivot.is_some() || !cfg.sources.is_empty() {
                self.problem("[pivot] and [[sources]] need a [data] table (the chat dataset)");
            }
            return None;
        };
        let pivot = cfg.pivot.as_ref();
        if pivot.is_none() {
            self.problem("[data] needs a [pivot] table: the model the sources are fused into");
        }
        if cfg.sources.is_empty() {
            self.problem("[data] needs at least one [[sources]] table");
        }
        self.input("[data] path", &cfg.resolve(&data.path), false);
        self.check_template("[data] template", &data.template);
        self.at_least("[data] max_length", data.max_length, 2);
        let rs = cfg.represent.clone().unwrap_or_default();
        for (f, v) in [
            ("top_k", rs.top_k),
            ("batch_size", rs.batch_size),
            ("batch_tokens", rs.batch_tokens),
            ("rows_per_shard", rs.rows_per_shard),
        ] {
            self.at_least(&format!("[represent] {f}"), v, 1);
        }
        if let Err(e) = crate::model::check_device(&rs.device) {
            self.problem(format!("[represent] device: {e}"));
        }
        let out = cfg.resolve(&rs.out.clone().unwrap_or_else(|| cfg.run.dir.join("repr")));
        let names = self.source_names();
        let pivot = pivot?;
        let pivot_repr = out.join("pivot");
        self.represent("[pivot]", "pivot", pivot, data, &rs, &pivot_repr);
        let mut teachers = Vec::new();
        let mut sources = Vec::new();
        for (s, name) in cfg.sources.iter().zip(names) {
            let Some(name) = name else { continue };
            sources.push((
                name.clone(),
                crate::io::hub::resolve_model(&s.path, &cfg.root),
            ));
            let table = format!("[[sources]] {name}");
            let repr = out.join(&name);
            self.represent(&table, &name, s, data, &rs, &repr);
            let aligned = out.join(format!("{name}@pivot"));
            self.align(&table, &name, pivot, s, &pivot_repr, &repr, &aligned);
            teachers.push((name, aligned));
        }
        self.stages.push(Stage {
            name: "filter".into(),
            out: pivot_repr.clone(),
            job: Job::Filter {
                pivot: pivot_repr.clone(),
                teachers: teachers.iter().map(|t| t.1.clone()).collect(),
            },
        });
        Some(DataOut {
            pivot: crate::io::hub::resolve_model(&pivot.path, &cfg.root),
            family: pivot.family.clone(),
            pivot_repr,
            teachers,
            sources,
            template: data.template.clone(),
        })
    }

    /// One fuse stage per source (`targets/<source>`), and the SFT baseline
    /// when asked; returns the targets, by source name.
    fn fuse(&mut self, data: Option<&DataOut>) -> Vec<(String, PathBuf)> {
        let cfg = self.cfg;
        let Some(f) = &cfg.fuse else {
            return Vec::new();
        };
        let Some(data) = data else {
            self.problem(
                "[fuse] needs [data], [pivot] and [[sources]]: it trains on their representations",
            );
            return Vec::new();
        };
        let params = match toml_scalars(&f.parameters, "[fuse] parameters") {
            Ok(p) => p,
            Err(e) => {
                self.problem(e.to_string());
                Default::default()
            }
        };
        let scheduler = match crate::train::schedule::Schedule::parse(&f.scheduler) {
            Ok(s) => s,
            Err(e) => {
                self.problem(format!("[fuse] scheduler: {e}"));
                crate::train::schedule::Schedule::Cosine
            }
        };
        let loss_norm = crate::train::fuse::LossNorm::parse(&f.loss_norm).unwrap_or_else(|e| {
            self.problem(format!("[fuse] {e}"));
            crate::train::fuse::LossNorm::Accum
        });
        if let Err(e) = crate::model::check_device(&f.device) {
            self.problem(format!("[fuse] device: {e}"));
        }
        match self.registry.loss(&f.loss) {
            Err(e) => self.problem(format!("[fuse] loss: {e}")),
            Ok(entry) => match entry.info.resolve_scalars(&params) {
                Err(e) => self.invalid("[fuse] parameters", e),
                Ok(resolved) => {
                    if let Err(e) = entry.plugin.check(&resolved, 1) {
                        self.problem(format!("[fuse] loss: {e}"));
                    }
                }
            },
        }
        let out = cfg.resolve(&f.out.clone().unwrap_or_else(|| cfg.run.dir.join("targets")));
        let logs = cfg.resolve(&cfg.run.dir.join("logs"));
        let options = |teachers: Vec<PathBuf>, name: &str| {
            let mut o = crate::train::fuse::FuseOptions::new(
                &data.pivot,
                &data.pivot_repr,
                &teachers,
                &out.join(name),
            );
            o.family = data.family.clone();
            o.loss = f.loss.clone();
            o.params = params.clone();
            o.lr = f.lr;
            o.scheduler = scheduler;
            o.warmup_ratio = f.warmup_ratio;
            o.epochs = f.epochs;
            o.max_steps = f.max_steps;
            o.batch_size = f.batch_size;
            o.grad_accum = f.grad_accum;
            o.max_grad_norm = f.max_grad_norm;
            o.weight_decay = f.weight_decay;
            o.loss_norm = loss_norm;
            o.seed = f.seed;
            o.save_every = f.save_every;
            o.device = f.device.clone();
            o.freeze = f.freeze.clone();
            o.log = Some(logs.join(format!("fuse-{name}.jsonl")));
            o.replace_stale = true;
            o
        };
        let probe = options(Vec::new(), "x");
        for p in probe.problems() {
            self.problem(format!("[fuse] {p}"));
        }
        let mut targets = Vec::new();
        for (name, aligned) in &data.teachers {
            let o = options(vec![aligned.clone()], name);
            self.stages.push(Stage {
                name: format!("fuse {name}"),
                out: o.out.clone(),
                job: Job::Fuse(Box::new(o)),
            });
            targets.push((name.clone(), out.join(name)));
        }
        if f.sft_baseline {
            let mut o = options(Vec::new(), "sft");
            o.params.insert(
                "lm_loss_weight".into(),
                crate::merge::params::Scalar::Float(1.0),
            );
            self.stages.push(Stage {
                name: "fuse sft".into(),
                out: o.out.clone(),
                job: Job::Fuse(Box::new(o)),
            });
        }
        targets
    }

    /// The sources' names (they name directories), `None` for a bad one.
    fn source_names(&mut self) -> Vec<Option<String>> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for (i, s) in self.cfg.sources.iter().enumerate() {
            let name = s.name.clone().unwrap_or_default();
            if name.is_empty() || name == "pivot" || name.contains(['/', '\\', '@']) {
                self.problem(format!("[[sources]] #{}: `name` must be set, not `pivot`, and without / \\ or @ (it names the representation directories)", i + 1));
                out.push(None);
            } else if !seen.insert(name.clone()) {
                self.problem(format!("[[sources]]: the name `{name}` is used twice"));
                out.push(None);
            } else {
                out.push(Some(name));
            }
        }
        out
    }

    fn check_template(&mut self, field: &str, name: &str) {
        if !crate::data::template::NAMES.contains(&name) {
            self.problem(format!(
                "{field}: unknown template `{name}` (use one of {})",
                crate::data::template::NAMES.join(", ")
            ));
        }
    }

    /// The represent stage of one model.
    fn represent(
        &mut self,
        table: &str,
        name: &str,
        m: &ModelSection,
        data: &DataSection,
        rs: &crate::pipeline::config::RepresentSection,
        out: &Path,
    ) {
        let cfg = self.cfg;
        let model = crate::io::hub::resolve_model(&m.path, &cfg.root);
        self.input(&format!("{table} path"), &model, true);
        let tokenizer = m.tokenizer.as_ref().map(|t| cfg.resolve(t));
        if let Some(t) = &tokenizer {
            self.input(&format!("{table} tokenizer"), t, true);
        }
        let tok_dir = tokenizer.clone().unwrap_or_else(|| model.clone());
        if tok_dir.is_dir() && !self.produced(&tok_dir) && !tok_dir.join("tokenizer.json").is_file()
        {
            self.problem(format!(
                "{table}: {} has no tokenizer.json (the HF fast tokenizer represent needs); save it with transformers' AutoTokenizer(...).save_pretrained, or name a directory that has it with `tokenizer = DIR`",
                tok_dir.display()
            ));
        }
        if let Some(f) = &m.family {
            if let Err(e) = self.registry.model(f) {
                self.problem(format!("{table} family: {e}"));
            }
        }
        let template = m.template.clone().unwrap_or_else(|| data.template.clone());
        if m.template.is_some() {
            self.check_template(&format!("{table} template"), &template);
        }
        let mut o = RepresentOptions::new(&model, &cfg.resolve(&data.path), out);
        o.family = m.family.clone();
        o.tokenizer = tokenizer;
        o.template = template;
        o.max_length = data.max_length;
        o.strict = data.strict;
        o.top_k = rs.top_k;
        o.batch_size = rs.batch_size;
        o.batch_tokens = rs.batch_tokens;
        o.rows_per_shard = rs.rows_per_shard;
        o.device = rs.device.clone();
        o.replace_stale = true;
        self.stages.push(Stage {
            name: format!("represent {name}"),
            out: out.to_path_buf(),
            job: Job::Represent(o),
        });
    }

    /// The align stage of one source onto the pivot.
    #[allow(clippy::too_many_arguments)]
    fn align(
        &mut self,
        table: &str,
        name: &str,
        pivot: &ModelSection,
        s: &ModelSection,
        pivot_repr: &Path,
        source_repr: &Path,
        out: &Path,
    ) {
        let cfg = self.cfg;
        let aligner = s
            .aligner
            .clone()
            .unwrap_or_else(|| defaults::ALIGNER.into());
        let params = match toml_scalars(&s.align, &format!("{table} align")) {
            Ok(p) => p,
            Err(e) => {
                self.problem(e.to_string());
                Default::default()
            }
        };
        match self.registry.aligner(&aligner) {
            Err(e) => self.problem(format!("{table} aligner: {e}")),
            Ok(entry) => {
                if let Err(e) = entry.info.resolve_scalars(&params) {
                    self.invalid(&format!("{table} align"), e);
                }
            }
        }
        self.stages.push(Stage {
            name: format!("align {name}"),
            out: out.to_path_buf(),
            job: Job::Align(AlignOptions {
                pivot: pivot_repr.to_path_buf(),
                source: source_repr.to_path_buf(),
                pivot_tokenizer: pivot.tokenizer.as_ref().map(|t| cfg.resolve(t)),
                source_tokenizer: s.tokenizer.as_ref().map(|t| cfg.resolve(t)),
                aligner,
                params,
                out: out.to_path_buf(),
                force: false,
            }),
        });
    }

    /// Record the problems of an error, each under `field`.
    fn invalid(&mut self, field: &str, e: Error) {
        match e {
            Error::Invalid { problems, .. } => {
                for p in problems {
                    self.problem(format!("{field}: {p}"));
                }
            }
            e => self.problem(format!("{field}: {e}")),
        }
    }

    /// The merge stage. A `[merge]` that names no models merges the fused
    /// targets, onto the pivot unless it names a base.
    fn merge(&mut self, data: Option<&DataOut>, targets: &[(String, PathBuf)]) {
        if self.cfg.merge.is_none() {
            return;
        }
        let mut req = match self.cfg.merge_request() {
            Ok(r) => r,
            Err(e) => return self.problem(strip_file(&e, &self.cfg.file)),
        };
        if req.models.is_empty() {
            if targets.is_empty() {
                return self.problem(
                    "[merge] models: none given, and no [fuse] table makes targets to merge; list the models to merge",
                );
            }
            req.models = targets
                .iter()
                .map(|(name, dir)| crate::merge::plan::ModelInput {
                    reference: format!("targets/{name}"),
                    path: dir.clone(),
                    params: Settings::new(),
                })
                .collect();
            if req.base.is_none() {
                if let Some(d) = data {
                    req.base = Some(crate::merge::plan::ModelInput {
                        reference: "pivot".into(),
                        path: d.pivot.clone(),
                        params: Settings::new(),
                    });
                }
            }
        }
        let main_out = req.out.clone();
        let extras = match self.cfg.extra_merge_requests(&req) {
            Ok(x) => x,
            Err(e) => return self.problem(strip_file(&e, &self.cfg.file)),
        };
        let auto = self.cfg.merge.as_ref().is_some_and(|m| m.models.is_empty());
        let mut seen: Vec<(String, PathBuf)> = Vec::new();
        for (i, req) in std::iter::once(req).chain(extras).enumerate() {
            let field = if i == 0 {
                "[merge]".to_string()
            } else {
                format!("[[merge.extra]] #{i}")
            };
            if let Some((m, _)) = seen.iter().find(|(m, _)| *m == req.method) {
                self.problem(format!(
                    "{field} method: `{m}` is merged twice; the reports name a merge by its method (`merge:{m}`), so give each method once"
                ));
                continue;
            }
            if seen.iter().any(|(_, o)| *o == req.out) || (i > 0 && req.out == main_out) {
                self.problem(format!(
                    "{field} out: {} is another merge's output; give this one its own `out`",
                    req.out.display()
                ));
                continue;
            }
            seen.push((req.method.clone(), req.out.clone()));
            self.one_merge(&field, req, auto, i == 0);
        }
    }

    /// One merge stage (the main `[merge]` or an extra one): its method, its
    /// parameters and its inputs checked. A method that takes one model
    /// besides its base (SLERP) merges fused targets pairwise: the first
    /// target is its base, the second its model.
    fn one_merge(&mut self, field: &str, mut req: MergeRequest, auto: bool, main: bool) {
        let before = self.problems.len();
        match self.registry.merger(&req.method) {
            Err(e) => self.problem(format!("{field} method: {e}")),
            Ok(entry) => {
                let c = entry.plugin.contract();
                // the run's pivot is filled in as the base; a method without a
                // base role would merge it as a model: it merges the targets only
                if auto && c.base == crate::merge::BaseUse::Ignored {
                    req.base = None;
                }
                if auto
                    && c.base != crate::merge::BaseUse::Ignored
                    && c.max_models == Some(1)
                    && req.models.len() == 2
                {
                    req.base = Some(req.models.remove(0));
                }
                let info = entry.info.clone();
                let params_field = format!("{field} parameters");
                self.merge_params(&params_field, &info, &req.params, None, &req.params);
                // A required shared parameter missing is known now, even
                // when the inputs are made by earlier stages.
                for p in info.params.iter().filter(|p| {
                    p.required && p.scope == Scope::Shared && !req.params.contains_key(&p.name)
                }) {
                    self.problem(format!(
                        "{params_field}: `{}` is required by `{}` ({}); set it",
                        p.name, req.method, p.help
                    ));
                }
                if req.numerics == crate::merge::plan::Numerics::Mergekit {
                    if !entry.plugin.mergekit_numerics() {
                        self.problem(format!(
                            "{field}: method `{}` has no numerics = \"mergekit\" mode; remove `numerics` or pick a method that has one (`fusechat plugins` marks them)",
                            req.method
                        ));
                    }
                    if req.dtype.is_none() {
                        self.problem(format!(
                            "{field}: numerics = \"mergekit\" computes in the merge's dtype, and none is given: set `dtype = \"bf16\"`"
                        ));
                    }
                }
                for (i, m) in req.models.iter().enumerate() {
                    let field = format!("[merge] models[{i}].parameters");
                    let of = format!("model `{}`", m.reference);
                    self.merge_params(&field, &info, &m.params, Some(&of), &req.params);
                }
            }
        }
        let inputs: Vec<(String, PathBuf)> = req
            .base
            .iter()
            .map(|b| ("[merge] base".to_string(), b.path.clone()))
            .chain(
                req.models
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (format!("[merge] models[{i}]"), m.path.clone())),
            )
            .collect();
        let produced = inputs.iter().any(|(_, p)| self.produced(p));
        if main {
            for (field, p) in &inputs {
                self.input(field, p, true);
            }
        }
        // Inputs that exist and no stage rewrites: plan the merge in full now
        // (tensor names, shapes, dtypes, the method's input contract).
        if self.problems.len() == before && !produced {
            if let Err(e) = crate::merge::plan::plan(&req, self.registry) {
                self.invalid(field, e);
            }
        }
        self.stages.push(Stage {
            name: if main {
                "merge".into()
            } else {
                format!("merge {}", req.method)
            },
            out: req.out.clone(),
            job: Job::Merge(req),
        });
    }

    /// The eval stage: every `[[eval.evaluators]]` entry on every model of
    /// the run (or those `[eval] models` names).
    fn eval(&mut self, data: Option<&DataOut>) {
        let cfg = self.cfg;
        let Some(e) = &cfg.eval else { return };
        let mut models: Vec<EvalModel> = Vec::new();
        if let Some(d) = data {
            models.push(EvalModel {
                name: "pivot".into(),
                dir: d.pivot.clone(),
            });
            for (name, dir) in &d.sources {
                models.push(EvalModel {
                    name: name.clone(),
                    dir: dir.clone(),
                });
            }
        }
        for st in &self.stages {
            let name = match &st.job {
                Job::Fuse(_) if st.name == "fuse sft" => "sft".to_string(),
                Job::Fuse(_) => format!("target:{}", st.name.trim_start_matches("fuse ")),
                Job::Merge(req) => format!("merge:{}", req.method),
                _ => continue,
            };
            models.push(EvalModel {
                name,
                dir: st.out.clone(),
            });
        }
        if let Some(wanted) = &e.models {
            for w in wanted {
                if !models.iter().any(|m| &m.name == w) {
                    let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
                    self.problem(format!(
                        "[eval] models: this run has no model `{w}` (it has: {})",
                        known.join(", ")
                    ));
                }
            }
            models.retain(|m| wanted.contains(&m.name));
        }
        if models.is_empty() {
            self.problem(
                "[eval]: the run has no model to evaluate ([pivot], [fuse] or [merge] make them)",
            );
        }
        if e.evaluators.is_empty() {
            self.problem("[eval] evaluators: add at least one [[eval.evaluators]] table (name = \"perplexity\", data = FILE)");
        }
        if let Err(err) = crate::model::check_device(&e.device) {
            self.problem(format!("[eval] device: {err}"));
        }
        let mut specs = Vec::new();
        for (i, ev) in e.evaluators.iter().enumerate() {
            let field = format!("[[eval.evaluators]] #{} ({})", i + 1, ev.name);
            let mut params = match toml_scalars(&ev.parameters, &format!("{field} parameters")) {
                Ok(p) => p,
                Err(err) => {
                    self.problem(err.to_string());
                    continue;
                }
            };
            let entry = match self.registry.evaluator(&ev.name) {
                Ok(entry) => entry,
                Err(err) => {
                    self.problem(format!("{field} name: {err}"));
                    continue;
                }
            };
            // Evaluate with the template the run trains with, unless told otherwise.
            if let (Some(d), Some(_)) = (data, entry.info.param("template")) {
                params
                    .entry("template".into())
                    .or_insert_with(|| d.template.as_str().into());
            }
            // File parameters are relative to the config file, as its paths are.
            for spec in entry.info.params.iter().filter(|s| s.ty == ParamType::File) {
                if let Some(Scalar::Str(f)) = params.get(&spec.name) {
                    let p = cfg.resolve(Path::new(f)).to_string_lossy().into_owned();
                    params.insert(spec.name.clone(), Scalar::Str(p));
                }
            }
            let path = cfg.resolve(&ev.data);
            self.input(&format!("{field} data"), &path, false);
            match entry.info.resolve_scalars(&params) {
                Err(err) => self.invalid(&format!("{field} parameters"), err),
                Ok(resolved) if path.is_file() && !self.produced(&path) => {
                    if let Err(err) = entry.plugin.check(&resolved, &path) {
                        self.problem(format!("{field}: {err}"));
                    }
                }
                Ok(_) => {}
            }
            specs.push(EvalSpec {
                evaluator: ev.name.clone(),
                data: path,
                params,
            });
        }
        let out = cfg.resolve(&e.out.clone().unwrap_or_else(|| cfg.run.dir.join("reports")));
        self.stages.push(Stage {
            name: "eval".into(),
            out: out.clone(),
            job: Job::Eval(Box::new(EvalOptions {
                models,
                specs,
                out,
                device: e.device.clone(),
                progress: false,
                force: false,
            })),
        });
    }

    /// Names, types and scope of a merge method's parameter settings.
    fn merge_params(
        &mut self,
        field: &str,
        info: &PluginInfo,
        settings: &Settings,
        of: Option<&str>,
        shared: &Settings,
    ) {
        for (k, v) in settings {
            if let Some(p) = info.check_setting(k, v, of, shared) {
                self.problem(format!("{field}: {p}"));
            }
        }
    }
}

/// An error's message without the config file's name in front (the report names it once).
fn strip_file(e: &Error, file: &Path) -> String {
    let s = e.to_string();
    let prefix = format!("{}: ", file.display());
    s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s)
}
