//! The command line: argument definitions and dispatch. `main.rs` only calls [`main`].

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use fusechat_core::io::writer::parse_size;
use fusechat_core::merge::engine::{self, ExecOptions, MergeReport};
use fusechat_core::merge::params::Setting;
use fusechat_core::merge::plan::{MergeRequest, ModelInput, Numerics};
use fusechat_core::model::generate;
use fusechat_core::pipeline::config::{defaults, parse_dtype, Config};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "fusechat",
    version,
    about = "Knowledge fusion of chat LLMs: distil several source models into one pivot, then merge in parameter space",
    long_about = "fusechat implements FuseChat (arXiv 2402.16107): pairwise knowledge fusion into a pivot model, \
then merging of the fused targets (VaRM, linear, SLERP, task arithmetic, TIES, DARE, SCE).\n\n\
Start with `fusechat run`, which executes the stages in ./fusechat.toml.",
    after_help = "Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more detail."
)]
pub struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Load a plugin library (a merge method built with fusechat_core::export_plugin!). Repeatable.
    #[arg(long = "plugin", value_name = "PATH", global = true)]
    pub plugins: Vec<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the stages described in a fusechat.toml, in order, skipping those already up to date.
    Run(RunArgs),
    /// Merge models in parameter space (from fusechat.toml, command-line flags or a mergekit YAML).
    Merge(MergeArgs),
    /// List the available plugins and their parameters.
    Plugins(PluginsArgs),
    /// Generate a reply to one prompt with a model directory.
    Generate(GenerateArgs),
    /// Chat with a model directory in the terminal (multi-turn; tokens stream as they come).
    Chat(ChatArgs),
    /// Show how a record is rendered and tokenized, with the label flag of every token.
    Template(TemplateArgs),
    /// Run a model over a chat dataset and keep its top-k logits at the loss positions.
    Represent(RepresentArgs),
    /// Map a source model's representation onto the pivot's tokens and positions.
    Align(AlignArgs),
    /// Drop rows whose pivot or teacher metric_ce is NaN (recorded in the manifests).
    Filter(FilterArgs),
    /// Fine-tune a copy of the pivot on the fusion loss against the teachers' aligned top-k
    /// (pairwise knowledge fusion): one target model per call.
    Fuse(FuseArgs),
    /// Evaluate model directories: perplexity, exact match, or MT-Bench (answers, and an LLM judge's scores).
    Eval(EvalArgs),
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// An HF model directory to evaluate (repeat for each); reports name it by its directory.
    #[arg(long = "model", value_name = "DIR", required = true)]
    pub models: Vec<PathBuf>,
    /// perplexity, exact_match or mt_bench (see `fusechat plugins`).
    #[arg(long, value_name = "NAME")]
    pub evaluator: String,
    /// The evaluator's input: conversations (perplexity, exact_match) or FastChat's question.jsonl (mt_bench).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Output directory: eval.json, eval.md, eval.png, eval.svg (and mt_bench's model_answer/, model_judgment/).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// An evaluator parameter, KEY=VALUE: template=chatml, judge_url=http://127.0.0.1:8000/v1, parallel=8.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Evaluate again even if the reports are up to date.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug)]
pub struct TemplateArgs {
    /// Directory with tokenizer.json (and tokenizer_config.json for --template hf).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: PathBuf,
    /// openchat, chatml, llama3, mistral or hf.
    #[arg(long, default_value = defaults::TEMPLATE)]
    pub template: String,
    /// JSON or JSONL conversations (ShareGPT or OpenAI form).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// The record to show (its index in the file).
    #[arg(long, default_value_t = 0)]
    pub row: u64,
    /// Tokens per record, BOS included; longer records are cut on the right.
    #[arg(long, default_value_t = defaults::MAX_LENGTH)]
    pub max_length: usize,
}

#[derive(Args, Debug)]
pub struct RepresentArgs {
    /// HF model directory.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Model family (llama, mistral, mixtral); default: detected from config.json.
    #[arg(long)]
    pub family: Option<String>,
    /// Tokenizer directory (default: the model's).
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// JSON or JSONL conversations (ShareGPT or OpenAI form).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Output directory (a representation: manifest.json + shard-NNNNN.safetensors).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// openchat (FuseChat's, for every model), chatml, llama3, mistral or hf.
    #[arg(long, default_value = defaults::TEMPLATE)]
    pub template: String,
    /// Logits kept at each loss position.
    #[arg(long, default_value_t = defaults::TOP_K)]
    pub top_k: usize,
    /// Tokens per record, BOS included; longer records are cut on the right.
    #[arg(long, default_value_t = defaults::MAX_LENGTH)]
    pub max_length: usize,
    /// Most records in one forward pass (records of similar length are batched together).
    #[arg(long, default_value_t = defaults::BATCH_SIZE)]
    pub batch_size: usize,
    /// Most tokens (records × padded length) in one forward pass.
    #[arg(long, default_value_t = defaults::BATCH_TOKENS)]
    pub batch_tokens: usize,
    /// Records per output shard file (the unit of resuming and of --shard).
    #[arg(long, default_value_t = defaults::ROWS_PER_SHARD)]
    pub rows_per_shard: usize,
    /// Compute only the output shards c with c mod n = i, e.g. 0/4 (several processes, one --out).
    #[arg(long, value_name = "i/n", default_value = "0/1", value_parser = shard_arg)]
    pub shard: (usize, usize),
    /// cpu, or cuda:N in a build with the cuda feature.
    #[arg(long, default_value = defaults::DEVICE)]
    pub device: String,
    /// Stop at the first bad record instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Replace an output made with other settings.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn shard_arg(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected i/n, e.g. 0/4")?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| "i is not a number")?,
        n.trim().parse().map_err(|_| "n is not a number")?,
    );
    if n == 0 || i >= n {
        return Err(format!("{i}/{n}: need 0 <= i < n"));
    }
    Ok((i, n))
}

#[derive(Args, Debug)]
pub struct AlignArgs {
    /// The pivot's representation directory.
    #[arg(long, value_name = "DIR")]
    pub pivot: PathBuf,
    /// The source's representation directory.
    #[arg(long, value_name = "DIR")]
    pub source: PathBuf,
    /// Pivot tokenizer directory (default: the model its manifest names).
    #[arg(long, value_name = "DIR")]
    pub pivot_tokenizer: Option<PathBuf>,
    /// Source tokenizer directory (default: the model its manifest names).
    #[arg(long, value_name = "DIR")]
    pub source_tokenizer: Option<PathBuf>,
    /// identity, exact, mined or offsets (see `fusechat plugins`).
    #[arg(long, default_value = defaults::ALIGNER)]
    pub aligner: String,
    /// An aligner parameter, KEY=VALUE: mode=hard, fallback=current, substring_discount=0.1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Output directory: the aligned representation (the pivot's rows and positions).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Redo it even if the output is up to date.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct FilterArgs {
    /// The pivot's representation directory.
    #[arg(long, value_name = "DIR")]
    pub pivot: PathBuf,
    /// An aligned teacher representation (repeat for each).
    #[arg(long = "teacher", value_name = "DIR")]
    pub teachers: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct FuseArgs {
    /// The pivot's HF model directory: the student starts from its weights.
    #[arg(long, value_name = "DIR")]
    pub pivot: PathBuf,
    /// The pivot's own representation (repr/pivot), made before training.
    #[arg(long, value_name = "DIR")]
    pub pivot_repr: PathBuf,
    /// A teacher: a source's representation aligned onto the pivot (repr/<src>@pivot). Repeat for
    /// several; none trains plain SFT.
    #[arg(long = "teacher", value_name = "DIR")]
    pub teachers: Vec<PathBuf>,
    /// Output directory: the fused model (HF directory), checkpoint-N/ subdirectories.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The distillation loss (see `fusechat plugins`): greater_as_gt, weighted or kd.
    #[arg(long, default_value = defaults::LOSS)]
    pub loss: String,
    /// A loss parameter, KEY=VALUE: mode=hard, compat=true, lm_loss_weight=0.9, temperature=1.0.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Peak learning rate.
    #[arg(long, default_value_t = defaults::LR)]
    pub lr: f64,
    /// Learning-rate schedule: constant, linear or cosine (with warmup, as Hugging Face).
    #[arg(long, default_value = defaults::SCHEDULER)]
    pub scheduler: String,
    /// Warmup steps as a fraction of all optimizer steps (rounded up).
    #[arg(long, default_value_t = defaults::WARMUP_RATIO)]
    pub warmup_ratio: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = defaults::EPOCHS, conflicts_with = "max_steps")]
    pub epochs: u64,
    /// Stop after this many optimizer steps instead of counting epochs.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Records per micro-batch (padded to the longest of the batch).
    #[arg(long, default_value_t = defaults::FUSE_BATCH_SIZE)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (effective batch = batch-size × grad-accum).
    #[arg(long, default_value_t = defaults::GRAD_ACCUM)]
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = defaults::MAX_GRAD_NORM)]
    pub max_grad_norm: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// How micro-batch losses add up in a step: accum (each divided by --grad-accum, as Hugging
    /// Face) or tokens (each weighted by its share of the step's loss tokens).
    #[arg(long, default_value = "accum")]
    pub loss_norm: String,
    /// Seed of the data order.
    #[arg(long, default_value_t = defaults::SEED)]
    pub seed: u64,
    /// Save a checkpoint every N optimizer steps (and always at the end).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub save_every: u64,
    /// Write one JSON line per optimizer step (step, epoch, lr, loss, lm_loss, fuse_loss,
    /// grad_norm, tokens, seconds, teacher_by_row).
    #[arg(long, value_name = "FILE.jsonl")]
    pub log: Option<PathBuf>,
    /// Continue from the newest checkpoint in --out (same settings), bit for bit on CPU.
    #[arg(long)]
    pub resume: bool,
    /// Start over, deleting the output or checkpoints of a run with other settings.
    #[arg(long)]
    pub force: bool,
    /// cpu, or cuda:N in a build with the cuda feature (bf16 weights, f32 optimizer state).
    #[arg(long, default_value = defaults::DEVICE)]
    pub device: String,
    /// Model family (llama, mistral, mixtral); default: detected from config.json.
    #[arg(long)]
    pub family: Option<String>,
    /// Keep weights whose name contains this frozen (repeatable), e.g. embed_tokens.
    #[arg(long, value_name = "PATTERN")]
    pub freeze: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Model family (llama, mistral, mixtral); default: detected from config.json.
    #[arg(long)]
    pub family: Option<String>,
    /// cpu, or cuda:N in a build with the cuda feature.
    #[arg(long, default_value = defaults::DEVICE)]
    pub device: String,
    /// Chat template applied to the prompt: openchat, chatml, llama3, mistral, hf (the model's own), or none.
    #[arg(long, default_value = defaults::TEMPLATE)]
    pub template: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler (with --temperature above 0).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The config file.
    #[arg(short, long, default_value = "fusechat.toml")]
    pub config: PathBuf,
    /// Re-run every stage, even those whose outputs are up to date.
    #[arg(long)]
    pub force: bool,
    /// Check the whole config and print the stage plan (what would run, what is up to date and why,
    /// what each stage writes); compute nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// Worker threads. 0 (the default): `[run] threads` under `fusechat run`, else one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Working memory the merge may use at once, e.g. 4GiB; a tensor larger than this runs alone.
    /// Default (auto): the two largest tensors' inputs in f32 (the largest alone with --threads 1),
    /// so memory stays bounded by two tensors.
    #[arg(long, default_value = "auto", value_parser = budget_arg)]
    pub memory_budget: u64,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl ExecArgs {
    /// The options, checked before anything runs.
    fn options(&self) -> Result<ExecOptions> {
        let o = ExecOptions {
            threads: self.threads,
            memory_budget: self.memory_budget,
            progress: !self.no_progress && std::io::stderr().is_terminal(),
        };
        o.check()?;
        Ok(o)
    }
}

fn budget_arg(s: &str) -> std::result::Result<u64, String> {
    if s == "auto" {
        Ok(0)
    } else {
        size_arg(s)
    }
}

fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("`{s}` is not a size (e.g. 5GB, 500MB, 4GiB)"))
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "mergekit", "method"])))]
pub struct MergeArgs {
    /// Take the merge from the [merge] table of this fusechat.toml.
    #[arg(short, long, value_name = "TOML")]
    pub config: Option<PathBuf>,
    /// Take the merge from a mergekit YAML config, as written.
    #[arg(long, value_name = "YAML")]
    pub mergekit: Option<PathBuf>,
    /// Merge method (see `fusechat plugins`).
    #[arg(long, value_name = "NAME")]
    pub method: Option<String>,
    /// Base model (θ⁰, the pivot the models were fine-tuned from).
    #[arg(long, value_name = "DIR", requires = "method")]
    pub base: Option<String>,
    /// A model to merge (repeat for each).
    #[arg(long = "model", value_name = "DIR", requires = "method")]
    pub models: Vec<String>,
    /// Per-model weight, one per --model, in order.
    #[arg(long = "weight", value_name = "W", requires = "method")]
    pub weights: Vec<f64>,
    /// A method parameter, KEY=VALUE with a TOML value: t=0.5, density=0.7, rescale=l1, t=[0,0.5,1].
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "method")]
    pub set: Vec<String>,
    /// Output directory (overrides the config's).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Round inputs to this dtype on load and write it (f32, bf16, f16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Write the output in this dtype (default: --dtype, else the inputs').
    #[arg(long)]
    pub out_dtype: Option<String>,
    /// Arithmetic: fusechat (f32, rounded once; the default) or mergekit (in --dtype, rounded
    /// after every operation in mergekit's order, for mergekit's bytes).
    #[arg(long, value_name = "MODE", value_parser = ["fusechat", "mergekit"])]
    pub numerics: Option<String>,
    /// Output vocabulary for models whose vocabularies differ: base, union, or one of the
    /// models (mergekit's tokenizer_source); embedding and lm_head rows are aligned by token.
    #[arg(long, value_name = "SOURCE")]
    pub tokenizer_source: Option<String>,
    /// Seed of random methods (DARE, DELLA).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Largest shard, e.g. 5GB (the default), 500MB.
    #[arg(long, value_parser = size_arg)]
    pub max_shard_size: Option<u64>,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
    /// Merge models whose config.json architectures differ (hidden size, heads, layers, vocab,
    /// RoPE theta, tied embeddings); by default that is an error.
    #[arg(long)]
    pub allow_config_mismatch: bool,
    /// Validate and print the plan (per tensor: method, resolved parameters) and a memory estimate; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Args, Debug)]
pub struct PluginsArgs {
    /// Only this plugin.
    pub name: Option<String>,
    /// Also list the plugin libraries of this config's [plugins] table (default: ./fusechat.toml if present).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

/// Parse `KEY=VALUE`, the value as TOML (a bare word is a string).
pub fn parse_set(s: &str) -> Result<(String, Setting)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("--set `{s}`: expected KEY=VALUE"))?;
    let k = k.trim();
    if k.is_empty() {
        bail!("--set `{s}`: the key is empty");
    }
    let json = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
        Ok(t) => serde_json::to_value(&t["v"])?,
        Err(_) => serde_json::Value::String(v.trim().to_string()),
    };
    let setting = Setting::from_json(&json).map_err(|e| anyhow::anyhow!("--set {k}: {e}"))?;
    Ok((k.to_string(), setting))
}

/// Build the merge request from whichever way it was asked for; `cfg` is the
/// loaded `--config` file, when there is one.
pub fn merge_request(args: &MergeArgs, cfg: Option<&Config>) -> Result<MergeRequest> {
    let cwd = PathBuf::from(".");
    let mut req = if let Some(cfg) = cfg {
        cfg.merge_request()?
    } else if let Some(path) = &args.mergekit {
        let out = args
            .out
            .clone()
            .context("--mergekit needs --out DIR (mergekit configs do not name an output)")?;
        let (req, warnings) = fusechat_core::merge::mergekit::load(path, out, &cwd)?;
        for w in warnings {
            tracing::warn!("{w}");
        }
        req
    } else {
        let method = args.method.as_deref().expect("clap requires one source");
        let out = args.out.clone().context("--method needs --out DIR")?;
        if args.models.is_empty() {
            bail!("--method needs at least one --model DIR");
        }
        if !args.weights.is_empty() && args.weights.len() != args.models.len() {
            bail!(
                "{} --weight value(s) for {} --model(s): give one weight per model, in order, or none",
                args.weights.len(),
                args.models.len()
            );
        }
        let mut req = MergeRequest::new(method, out);
        req.origin = "the command line".into();
        req.base = args.base.as_ref().map(|b| model_input(b, &cwd));
        for (i, m) in args.models.iter().enumerate() {
            let mut input = model_input(m, &cwd);
            if let Some(w) = args.weights.get(i) {
                input.params.insert(
                    "weight".into(),
                    Setting::Scalar(fusechat_core::merge::params::Scalar::Float(*w)),
                );
            }
            req.models.push(input);
        }
        for s in &args.set {
            let (k, v) = parse_set(s)?;
            req.params.insert(k, v);
        }
        req
    };
    if let Some(out) = &args.out {
        req.out = out.clone();
    }
    if let Some(d) = parse_dtype(args.dtype.as_deref(), "--dtype")? {
        req.dtype = Some(d);
    }
    if let Some(d) = parse_dtype(args.out_dtype.as_deref(), "--out-dtype")? {
        req.out_dtype = Some(d);
    }
    if let Some(n) = args.numerics.as_deref().and_then(Numerics::parse) {
        req.numerics = n;
    }
    if let Some(t) = &args.tokenizer_source {
        req.tokenizer_source = Some(fusechat_core::merge::vocab::TokenizerSource::parse(t));
    }
    if let Some(s) = args.seed {
        req.seed = s;
    }
    if let Some(s) = args.max_shard_size {
        req.max_shard_size = s;
    }
    req.force = args.force;
    req.allow_config_mismatch |= args.allow_config_mismatch;
    Ok(req)
}

fn model_input(reference: &str, cwd: &Path) -> ModelInput {
    ModelInput {
        reference: reference.to_string(),
        path: fusechat_core::io::hub::resolve_model(reference, cwd),
        params: Default::default(),
    }
}

/// Write to stdout. A closed pipe (`fusechat plugins | head`) comes back as a
/// BrokenPipe error, which `main` turns into a quiet, successful exit.
fn emit(s: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// A short per-tensor table of the weights the method gave each model.
pub fn weight_summary(r: &MergeReport, labels: &[String]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if r.weights.is_empty() {
        return s;
    }
    let header: String = labels.iter().map(|l| format!("{l:>16}")).collect();
    let _ = writeln!(s, "{:<48} {header}", "tensor");
    for (name, w) in &r.weights {
        let row: String = w.iter().map(|x| format!("{x:>16.4}")).collect();
        let _ = writeln!(s, "{name:<48} {row}");
    }
    s
}

fn cmd_merge(args: &MergeArgs, plugins: &[PathBuf]) -> Result<()> {
    let cfg = args.config.as_deref().map(Config::load).transpose()?;
    let registry = &crate::registry_with(cfg.as_ref(), plugins)?;
    let req = merge_request(args, cfg.as_ref())?;
    let opts = args.exec.options()?;
    let plan = fusechat_core::merge::plan::plan(&req, registry)?;
    if args.dry_run {
        emit(&plan.describe(opts.threads(), opts.memory_budget))?;
        return emit("dry run: nothing written\n");
    }
    let report = engine::execute(&plan, &opts)?;
    emit(&format!("{}\n", report.summary()))
}

/// Short display names of the `[merge]` models, for the weight table.
/// The merged models' short names, as the run's merge stage lists them.
fn model_labels(pipeline: &fusechat_core::pipeline::Pipeline, n: usize) -> Vec<String> {
    let labels: Vec<String> = pipeline
        .stages
        .iter()
        .filter_map(|s| match &s.job {
            fusechat_core::pipeline::Job::Merge(req) => Some(req),
            _ => None,
        })
        .flat_map(|req| req.models.iter())
        .map(|m| {
            Path::new(&m.reference)
                .file_name()
                .map_or(m.reference.clone(), |f| f.to_string_lossy().into_owned())
        })
        .collect();
    if labels.len() == n {
        labels
    } else {
        (0..n).map(|i| format!("model {i}")).collect()
    }
}

/// Size candle's compute pools (its elementwise pool and its GEMM threads
/// read these variables once, at their first use): `n` threads, or their
/// default of one per core when `n` is 0. Call before any tensor work.
fn set_compute_threads(n: usize) {
    if n > 0 {
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn cmd_run(args: &RunArgs, plugins: &[PathBuf]) -> Result<()> {
    use fusechat_core::pipeline::{summary_table, Outcome, Pipeline};
    let cfg = Config::load(&args.config)?;
    let registry = &crate::registry_with(Some(&cfg), plugins)?;
    let pipeline = Pipeline::from_config(&cfg, registry, args.force)?;
    if args.dry_run {
        return emit(&pipeline.describe(registry));
    }
    let mut exec = args.exec.options()?;
    if exec.threads == 0 {
        exec.threads = cfg.run.threads;
    }
    set_compute_threads(exec.threads);
    let mut printed: Result<()> = Ok(());
    let results = pipeline.run(registry, &exec, |r| {
        if printed.is_ok() {
            printed = emit(&format!("{}\n", r.line()));
        }
    })?;
    printed?;
    for r in &results {
        // The main merge's weights (the extra merges are for comparison).
        if let (Outcome::Merge(Some(report)), "merge") = (&r.outcome, r.name.as_str()) {
            let n = report.weights.first().map_or(0, |(_, w)| w.len());
            let method = cfg.merge.as_ref().map_or("", |m| m.method.as_str());
            emit(&format!(
                "\nper-tensor weights ({method}):\n{}",
                weight_summary(report, &model_labels(&pipeline, n))
            ))?;
        }
        if let Outcome::Eval(e) = &r.outcome {
            emit(&format!(
                "\n{}reports: {}\n",
                fusechat_core::eval::report::markdown(&e.rows),
                e.out.display()
            ))?;
        }
    }
    emit(&format!("\n{}", summary_table(&results)))
}

fn cmd_plugins(args: &PluginsArgs, plugins: &[PathBuf]) -> Result<()> {
    let default = Path::new("fusechat.toml");
    let cfg = match &args.config {
        Some(p) => Some(Config::load(p)?),
        None if default.is_file() => Some(Config::load(default)?),
        None => None,
    };
    let registry = &crate::registry_with(cfg.as_ref(), plugins)?;
    let listing = registry.listing();
    let mut found = false;
    for e in &listing {
        if args.name.as_deref().is_some_and(|n| n != e.info.name) {
            continue;
        }
        found = true;
        let note = e
            .note
            .as_ref()
            .map(|n| format!("; {n}"))
            .unwrap_or_default();
        let mut s = format!(
            "{} {}  [{}{note}]\n    {}\n",
            e.info.kind, e.info.name, e.origin, e.info.description
        );
        for p in &e.info.params {
            let mut default = match (&p.default, p.required) {
                (_, true) => "required".to_string(),
                (Some(d), _) => format!("default {d}"),
                (None, _) => "optional".to_string(),
            };
            if let Some(r) = &p.range {
                default.push_str(&format!(", in {r}"));
                if let Some(flag) = &r.unless {
                    default.push_str(&format!(" unless {flag}"));
                }
            }
            s.push_str(&format!(
                "    - {} ({}, {}, {default})\n        {}\n",
                p.name, p.ty, p.scope, p.help
            ));
        }
        s.push('\n');
        emit(&s)?;
    }
    if !found {
        let mut known: Vec<(fusechat_core::plugin::registry::PluginKind, Vec<&str>)> = Vec::new();
        for e in &listing {
            match known.last_mut() {
                Some((k, names)) if *k == e.info.kind => names.push(&e.info.name),
                _ => known.push((e.info.kind, vec![&e.info.name])),
            }
        }
        let known: Vec<String> = known
            .iter()
            .map(|(k, names)| format!("known {}: {}", k.plural(), names.join(", ")))
            .collect();
        bail!(
            "no plugin named `{}`; {}",
            args.name.as_deref().unwrap_or_default(),
            known.join("; ")
        );
    }
    Ok(())
}

fn load_for_generation(
    a: &ModelArgs,
    plugins: &[PathBuf],
) -> Result<(
    Box<dyn fusechat_core::model::CausalLm>,
    tokenizers::Tokenizer,
    Option<fusechat_core::data::template::Template>,
    fusechat_core::model::generate::GenOptions,
)> {
    let mut gen = fusechat_core::model::generate::GenOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop: Vec::new(),
    };
    gen.check()?;
    let registry = crate::registry_with(None, plugins)?;
    let opts = fusechat_core::model::LoadOptions {
        device: fusechat_core::model::parse_device(&a.device)?,
        ..Default::default()
    };
    let model = fusechat_core::model::load_model(&registry, &a.model, a.family.as_deref(), &opts)?;
    let tok = fusechat_core::data::template::load_tokenizer(&a.model)?;
    let template = generate::chat_template(&a.template, &a.model)?;
    gen.stop = generate::chat_stops(model.as_ref(), &tok, template.as_ref());
    Ok((model, tok, template, gen))
}

/// Print generated text as it comes (a closed stdout is noticed at the end).
fn stream(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn cmd_generate(args: &GenerateArgs, plugins: &[PathBuf]) -> Result<()> {
    let (model, tok, template, gen) = load_for_generation(&args.model, plugins)?;
    generate::reply(
        model.as_ref(),
        &tok,
        template.as_ref(),
        &[args.prompt.clone()],
        &gen,
        stream,
    )?;
    emit("\n")
}

fn cmd_chat(args: &ChatArgs, plugins: &[PathBuf]) -> Result<()> {
    use std::io::BufRead;
    let (model, tok, template, gen) = load_for_generation(&args.model, plugins)?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} ({}); an empty line or Ctrl-D ends",
            args.model.model.display(),
            model.family()
        );
    }
    let mut turns: Vec<String> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        turns.push(line.trim().to_string());
        let answer = generate::reply(
            model.as_ref(),
            &tok,
            template.as_ref(),
            &turns,
            &gen,
            stream,
        )?;
        emit("\n")?;
        turns.push(answer);
    }
    Ok(())
}

fn cmd_template(a: &TemplateArgs) -> Result<()> {
    use fusechat_core::data::template::{load_tokenizer, Template};
    let template = Template::load(&a.template, &a.tokenizer)?;
    let tok = load_tokenizer(&a.tokenizer)?;
    let data = fusechat_core::data::conversation::load(&a.data, false)?;
    let Some(conv) = data.records.iter().find(|c| c.row == a.row) else {
        match data.skipped.iter().find(|s| s.row == a.row) {
            Some(s) => bail!(
                "{}: record {} is skipped: {}",
                a.data.display(),
                a.row,
                s.reason
            ),
            None => bail!(
                "{}: no record {} (the file has {})",
                a.data.display(),
                a.row,
                data.total
            ),
        }
    };
    let r = template.render(conv)?;
    let enc = fusechat_core::data::template::encode_rendered(&tok, &r, a.max_length)?;
    let mut s = format!(
        "row {} ({} template): {} tokens, {} labels (L = trained on)\n",
        a.row,
        template.name(),
        enc.ids.len(),
        enc.labels.iter().filter(|l| **l == 1).count()
    );
    for (i, ((id, l), (b, e))) in enc
        .ids
        .iter()
        .zip(&enc.labels)
        .zip(&enc.offsets)
        .enumerate()
    {
        let piece = tok.id_to_token(*id).unwrap_or_default();
        let text = r.text.get(*b..*e).unwrap_or("");
        s.push_str(&format!(
            "{i:>5} {id:>7} {} {:<24} {:?}\n",
            if *l == 1 { "L" } else { "." },
            format!("{piece:?}"),
            text
        ));
    }
    emit(&s)
}

fn cmd_represent(a: &RepresentArgs, plugins: &[PathBuf]) -> Result<()> {
    let registry = crate::registry_with(None, plugins)?;
    let mut o = fusechat_core::data::represent::RepresentOptions::new(&a.model, &a.data, &a.out);
    o.family = a.family.clone();
    o.tokenizer = a.tokenizer.clone();
    o.template = a.template.clone();
    o.top_k = a.top_k;
    o.max_length = a.max_length;
    o.batch_size = a.batch_size;
    o.batch_tokens = a.batch_tokens;
    o.rows_per_shard = a.rows_per_shard;
    o.shard = a.shard;
    o.device = a.device.clone();
    o.strict = a.strict;
    o.force = a.force;
    o.progress = !a.no_progress && std::io::stderr().is_terminal();
    let r = fusechat_core::data::represent::represent(&registry, &o)?;
    emit(&format!("represent: {}\n", r.summary(&a.out)))
}

fn cmd_align(a: &AlignArgs, plugins: &[PathBuf]) -> Result<()> {
    let registry = crate::registry_with(None, plugins)?;
    let params = scalar_sets(&a.set, "aligner")?;
    let o = fusechat_core::data::align::AlignOptions {
        pivot: a.pivot.clone(),
        source: a.source.clone(),
        pivot_tokenizer: a.pivot_tokenizer.clone(),
        source_tokenizer: a.source_tokenizer.clone(),
        aligner: a.aligner.clone(),
        params,
        out: a.out.clone(),
        force: a.force,
    };
    let r = fusechat_core::data::align::align(&registry, &o)?;
    emit(&format!("align: {}\n", r.summary(&a.out)))
}

/// Single-valued plugin parameters from `--set` flags.
fn scalar_sets(
    sets: &[String],
    what: &str,
) -> Result<std::collections::BTreeMap<String, fusechat_core::merge::params::Scalar>> {
    let mut params = std::collections::BTreeMap::new();
    for s in sets {
        match parse_set(s)? {
            (k, Setting::Scalar(v)) => {
                params.insert(k, v);
            }
            (k, _) => bail!("--set {k}: {what} parameters are single values"),
        }
    }
    Ok(params)
}

fn cmd_fuse(a: &FuseArgs, plugins: &[PathBuf]) -> Result<()> {
    use fusechat_core::train::fuse::{FuseOptions, LossNorm};
    let registry = crate::registry_with(None, plugins)?;
    let mut o = FuseOptions::new(&a.pivot, &a.pivot_repr, &a.teachers, &a.out);
    o.family = a.family.clone();
    o.loss = a.loss.clone();
    o.params = scalar_sets(&a.set, "loss")?;
    o.lr = a.lr;
    o.scheduler = fusechat_core::train::schedule::Schedule::parse(&a.scheduler)?;
    o.warmup_ratio = a.warmup_ratio;
    o.epochs = a.epochs;
    o.max_steps = a.max_steps;
    o.batch_size = a.batch_size;
    o.grad_accum = a.grad_accum;
    o.max_grad_norm = a.max_grad_norm;
    o.weight_decay = a.weight_decay;
    o.loss_norm = LossNorm::parse(&a.loss_norm)?;
    o.seed = a.seed;
    o.save_every = a.save_every;
    o.log = a.log.clone();
    o.resume = a.resume;
    o.force = a.force;
    o.device = a.device.clone();
    o.freeze = a.freeze.clone();
    o.progress = !a.no_progress && std::io::stderr().is_terminal();
    let r = fusechat_core::train::fuse::fuse(&registry, &o)?;
    emit(&format!("fuse: {}\n", r.summary()))
}

fn cmd_eval(a: &EvalArgs, plugins: &[PathBuf]) -> Result<()> {
    use fusechat_core::eval::stage::{eval, EvalOptions, EvalSpec};
    let registry = crate::registry_with(None, plugins)?;
    let o = EvalOptions {
        models: eval_models(&a.models)?,
        specs: vec![EvalSpec {
            evaluator: a.evaluator.clone(),
            data: a.data.clone(),
            params: scalar_sets(&a.set, "evaluator")?,
        }],
        out: a.out.clone(),
        device: a.device.clone(),
        progress: !a.no_progress && std::io::stderr().is_terminal(),
        force: a.force,
    };
    let r = eval(&registry, &o)?;
    let mut text = fusechat_core::eval::report::markdown(&r.rows);
    text.push_str(&format!("\neval: {}\n", r.summary()));
    emit(&text)
}

/// Models named by their directory's name (the parent's too, when two share one).
fn eval_models(dirs: &[PathBuf]) -> Result<Vec<fusechat_core::eval::EvalModel>> {
    let name = |d: &PathBuf, depth: usize| -> String {
        let parts: Vec<String> = d
            .components()
            .rev()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .take(depth)
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect();
        parts.into_iter().rev().collect::<Vec<_>>().join("/")
    };
    let short: Vec<String> = dirs.iter().map(|d| name(d, 1)).collect();
    Ok(dirs
        .iter()
        .zip(&short)
        .map(|(d, s)| fusechat_core::eval::EvalModel {
            name: if short.iter().filter(|x| *x == s).count() > 1 {
                name(d, 2)
            } else {
                s.clone()
            },
            dir: d.clone(),
        })
        .collect())
}

fn cmd_filter(a: &FilterArgs) -> Result<()> {
    let r = fusechat_core::data::align::filter(&a.pivot, &a.teachers)?;
    emit(&format!("filter: {}\n", r.summary()))
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = if quiet {
        "warn"
    } else {
        match verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .try_init();
}

/// Parse arguments, run the command, print an error chain on failure.
/// On Ctrl-C or SIGTERM: remove every temporary output this process is
/// writing, say so, and exit with 130 (what a shell reports for Ctrl-C).
fn remove_temporaries_on_interrupt() {
    let installed = ctrlc::set_handler(|| {
        let removed = fusechat_core::io::writer::remove_live_temporaries();
        eprintln!(
            "\ninterrupted{}",
            if removed.is_empty() {
                String::new()
            } else {
                format!(
                    "; removed the unfinished {}",
                    removed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        std::process::exit(130);
    });
    if let Err(e) = installed {
        tracing::debug!("no interrupt handler: {e}");
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    remove_temporaries_on_interrupt();
    if matches!(
        cli.command,
        Command::Generate(_)
            | Command::Chat(_)
            | Command::Represent(_)
            | Command::Fuse(_)
            | Command::Eval(_)
    ) {
        crate::tune_allocator_for_compute();
    }
    let r = match &cli.command {
        Command::Run(a) => cmd_run(a, &cli.plugins),
        Command::Merge(a) => cmd_merge(a, &cli.plugins),
        Command::Plugins(a) => cmd_plugins(a, &cli.plugins),
        Command::Generate(a) => cmd_generate(a, &cli.plugins),
        Command::Chat(a) => cmd_chat(a, &cli.plugins),
        Command::Template(a) => cmd_template(a),
        Command::Represent(a) => cmd_represent(a, &cli.plugins),
        Command::Align(a) => cmd_align(a, &cli.plugins),
        Command::Filter(a) => cmd_filter(a),
        Command::Fuse(a) => cmd_fuse(a, &cli.plugins),
        Command::Eval(a) => cmd_eval(a, &cli.plugins),
    };
    if r.is_err() && fusechat_core::io::writer::interrupted() {
        // The interrupt handler removed the temporaries under our feet; it
        // reports and exits with 130. Nothing to add.
        loop {
            std::thread::park();
        }
    }
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `--help` explains every flag of every subcommand.
    #[test]
    fn every_flag_has_a_help_line() {
        let root = Cli::command();
        let mut missing = Vec::new();
        let mut check = |cmd: &clap::Command, path: &str| {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", a.get_long().unwrap_or(id)));
                }
            }
        };
        check(&root, "fusechat");
        for sub in root.get_subcommands() {
            check(sub, &format!("fusechat {}", sub.get_name()));
        }
        assert!(missing.is_empty(), "flags without a help line: {missing:?}");
    }
}
