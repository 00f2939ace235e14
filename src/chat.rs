//! `fusechat generate` and `fusechat chat`: prompt formatting with the model's
//! tokenizer files, and streamed generation.
//!
//! Template `openchat` (FuseChat's, for every model):
//! `GPT4 Correct User: {u1}<|end_of_turn|>GPT4 Correct Assistant: {a1}<|end_of_turn|>GPT4 Correct User: ...`,
//! ending with `GPT4 Correct Assistant:` to ask for a reply. The tokenizer adds
//! BOS itself (its post-processor), and `<|end_of_turn|>` is a stop token.
//! Template `none` passes the prompt through unchanged.

use anyhow::{bail, Context, Result};
use fusechat_core::generate::{generate, stop_tokens, GenOptions};
use fusechat_core::model::CausalLm;
use std::io::Write;
use std::path::Path;
use tokenizers::Tokenizer;

pub const END_OF_TURN: &str = "<|end_of_turn|>";

/// The chat templates generation understands so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
    Openchat,
    None,
}

/// Render a conversation (alternating user, assistant, ..., ending with a user
/// turn) and ask for the assistant's reply.
pub fn render(template: Template, turns: &[String]) -> String {
    match template {
        Template::None => turns.join("\n"),
        Template::Openchat => {
            let mut s = String::new();
            for (i, t) in turns.iter().enumerate() {
                let role = if i % 2 == 0 {
                    "GPT4 Correct User"
                } else {
                    "GPT4 Correct Assistant"
                };
                s.push_str(&format!("{role}: {t}{END_OF_TURN}"));
            }
            s.push_str("GPT4 Correct Assistant:");
            s
        }
    }
}

pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        bail!(
            "{}: no tokenizer.json; generation needs the model's tokenizer files",
            dir.display()
        );
    }
    Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the tokenizer: {e}", path.display()))
}

/// Stop ids: the model's eos tokens, plus `<|end_of_turn|>` under the openchat template.
pub fn stops(model: &dyn CausalLm, tok: &Tokenizer, template: Template) -> Vec<u32> {
    let mut s = stop_tokens(model.dir());
    if template == Template::Openchat {
        s.extend(tok.token_to_id(END_OF_TURN));
    }
    s
}

/// Generate a reply to `turns`, streaming the text to `out` as it comes.
pub fn reply(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    template: Template,
    turns: &[String],
    opts: &GenOptions,
    out: &mut dyn Write,
) -> Result<String> {
    let prompt = render(template, turns);
    let enc = tok
        .encode(prompt.as_str(), true)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    generate(model, enc.get_ids(), opts, |id| {
        generated.push(id);
        let text = tok
            .decode(&generated, true)
            .map_err(|e| fusechat_core::Error::msg(format!("decoding: {e}")))?;
        // Print only what extends the text already shown (a byte-fallback
        // sequence may decode to a partial character until it completes).
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            let _ = out.write_all(new.as_bytes());
            let _ = out.flush();
            printed = text;
        }
        Ok(())
    })
    .context("generation failed")?;
    let text = tok
        .decode(&generated, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    if let Some(rest) = text.strip_prefix(printed.as_str()) {
        out.write_all(rest.as_bytes())?;
    }
    Ok(text.trim().to_string())
}
