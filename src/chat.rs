//! `fusechat generate` and `fusechat chat`: prompt formatting with a chat
//! template (core's [`Template`], or `none` to send the text as it is) and
//! streamed generation. The tokenizer adds BOS itself (its post-processor), and
//! the template's end-of-turn token is a stop token.

use anyhow::{Context, Result};
use fusechat_core::generate::{generate, stop_tokens, GenOptions};
use fusechat_core::model::CausalLm;
use fusechat_core::template::Template;
use std::io::Write;
use std::path::Path;
use tokenizers::Tokenizer;

pub use fusechat_core::template::load_tokenizer;

/// A template, or `None` for the raw prompt.
pub fn template(name: &str, model_dir: &Path) -> Result<Option<Template>> {
    if name == "none" {
        return Ok(None);
    }
    Ok(Some(Template::load(name, model_dir)?))
}

/// Render a conversation (alternating user, assistant, ..., ending with a user
/// turn) and ask for the assistant's reply.
pub fn render(template: Option<&Template>, turns: &[String]) -> Result<String> {
    let Some(t) = template else {
        return Ok(turns.join("\n"));
    };
    let conv = fusechat_core::conversation::Conversation::alternating(None, turns);
    Ok(t.prompt(None, &conv.turns)?)
}

/// Stop ids: the model's eos tokens, plus the template's end-of-turn token.
pub fn stops(model: &dyn CausalLm, tok: &Tokenizer, template: Option<&Template>) -> Vec<u32> {
    let mut s = stop_tokens(model.dir());
    if let Some(t) = template {
        s.extend(tok.token_to_id(t.end_of_turn()));
    }
    s
}

/// Generate a reply to `turns`, streaming the text to `out` as it comes.
pub fn reply(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    template: Option<&Template>,
    turns: &[String],
    opts: &GenOptions,
    out: &mut dyn Write,
) -> Result<String> {
    let prompt = render(template, turns)?;
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
