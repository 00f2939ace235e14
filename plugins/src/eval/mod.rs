//! Built-in evaluators: `perplexity`, `exact_match` and `mt_bench` (SPEC §7).
//! This module holds what they share: loading the model, its tokenizer and
//! chat template, and their common parameters.

pub mod exact_match;
pub mod mt_bench;
pub mod perplexity;

use fusechat_core::data::template::{load_tokenizer, Template};
use fusechat_core::eval::EvalContext;
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::model::generate::chat_template;
use fusechat_core::model::{load_model, parse_device, CausalLm, LoadOptions};
use fusechat_core::plugin::registry::{ParamSpec, Scope};
use fusechat_core::{Error, Result};
use tokenizers::Tokenizer;

/// A model ready to evaluate.
pub(crate) struct Loaded {
    pub model: Box<dyn CausalLm>,
    pub tok: Tokenizer,
    /// `None` for template `none` (prompts are sent as they are).
    pub template: Option<Template>,
}

/// Load the model of `ctx` with its tokenizer and the `template` parameter's template.
pub(crate) fn load(ctx: &EvalContext<'_>, p: &ResolvedParams) -> Result<Loaded> {
    let dir = &ctx.model.dir;
    let template = chat_template(p.str("template")?, dir)?;
    let tok = load_tokenizer(dir)?;
    let opts = LoadOptions {
        device: parse_device(ctx.device)?,
        ..Default::default()
    };
    let model = load_model(ctx.registry, dir, None, &opts)?;
    let tv = tok.get_vocab_size(true);
    if tv > model.vocab_size() {
        return Err(Error::model(
            dir,
            format!(
                "the tokenizer has {tv} tokens but the model only {} rows of logits; give the model directory its own tokenizer.json",
                model.vocab_size()
            ),
        ));
    }
    Ok(Loaded {
        model,
        tok,
        template,
    })
}

pub(crate) fn template_param() -> ParamSpec {
    ParamSpec::text("template", Scope::Shared)
        .default("openchat")
        .help("chat template: openchat, chatml, llama3, mistral, hf (the model's own), or none (exact_match and mt_bench only)")
}

pub(crate) fn batch_param(default: i64) -> ParamSpec {
    ParamSpec::int("batch_size", Scope::Shared)
        .default(default)
        .range(1.0, 1024.0)
        .help("records per forward pass")
}

pub(crate) fn max_new_tokens_param(default: i64) -> ParamSpec {
    ParamSpec::int("max_new_tokens", Scope::Shared)
        .default(default)
        .range(1.0, 1_000_000.0)
        .help("the longest answer, in tokens")
}

/// An integer parameter (the registry has range-checked it).
pub(crate) fn int(p: &ResolvedParams, name: &str) -> Result<usize> {
    Ok(p.f64(name)? as usize)
}

/// A progress bar over `total` items, hidden unless `ctx.progress`.
pub(crate) fn bar(ctx: &EvalContext<'_>, total: u64, what: &str) -> indicatif::ProgressBar {
    let template = format!(
        "{{spinner}} {what} {} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}",
        ctx.model.name.replace('{', "(").replace('}', ")")
    );
    fusechat_core::merge::engine::progress_bar(total, ctx.progress, &template)
}
