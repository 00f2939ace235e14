//! Chat templates and training labels (SPEC §1).
//!
//! A template renders a [`Conversation`] to text and marks, as byte spans of
//! that text, what is trained on: each assistant message plus the end-of-turn
//! token that closes it. Tokens become labels when their character offsets
//! overlap a span, so labels never depend on counting the tokens of pieces.
//!
//! | name | one exchange (labels in «») | generation prompt |
//! |---|---|---|
//! | `openchat` | `GPT4 Correct User: u<\|end_of_turn\|>GPT4 Correct Assistant:« a<\|end_of_turn\|>»` | `GPT4 Correct Assistant:` |
//! | `chatml` | `<\|im_start\|>user\nu<\|im_end\|>\n<\|im_start\|>assistant\n«a<\|im_end\|>»\n` | `<\|im_start\|>assistant\n` |
//! | `llama3` | `<\|start_header_id\|>user<\|end_header_id\|>\n\nu<\|eot_id\|><\|start_header_id\|>assistant<\|end_header_id\|>\n\n«a<\|eot_id\|>»` | the assistant header |
//! | `mistral` | `[INST] u [/INST]« a</s>»` | `[INST] u [/INST]` |
//! | `hf` | the model's own `chat_template` (Jinja, from `tokenizer_config.json`) | its `add_generation_prompt` |
//!
//! BOS comes from the tokenizer's post-processor; when an `hf` template writes
//! it itself, the text is encoded without the tokenizer's special tokens.
//! `openchat` has no system prompt (a system message is dropped); `mistral`
//! prefixes it to the first user message; the others give it its own turn.
//! For `hf`, assistant turn *i*'s span is the difference between rendering
//! `messages[..=i]` and rendering `messages[..i]` with the generation prompt.
//!
//! ```
//! use fusechat_core::data::template::Template;
//! use fusechat_core::data::conversation::{Conversation, Role, Turn};
//! let c = Conversation { row: 0, id: None, system: None, category: None, turns: vec![
//!     Turn { role: Role::User, content: "Hi".into() },
//!     Turn { role: Role::Assistant, content: "Yo".into() }] };
//! let r = Template::builtin("openchat").unwrap().render(&c).unwrap();
//! assert_eq!(r.text, "GPT4 Correct User: Hi<|end_of_turn|>GPT4 Correct Assistant: Yo<|end_of_turn|>");
//! assert_eq!(&r.text[r.labels[0].clone()], " Yo<|end_of_turn|>");
//! ```

use crate::data::conversation::{Conversation, Role, Turn};
use crate::{Error, Result};
use std::ops::Range;
use std::path::Path;
use tokenizers::Tokenizer;

/// The template names `--template` accepts.
pub const NAMES: &[&str] = &["openchat", "chatml", "llama3", "mistral", "hf"];

pub const OPENCHAT_EOT: &str = "<|end_of_turn|>";

/// A chat template.
#[derive(Debug, Clone)]
pub enum Template {
    Openchat,
    Chatml,
    Llama3,
    Mistral,
    /// A Jinja chat template with the special-token strings it may use.
    Hf {
        source: String,
        bos: String,
        eos: String,
    },
}

/// A rendered conversation: its text and the byte spans that are labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub labels: Vec<Range<usize>>,
    /// Whether the text already starts with BOS (so the tokenizer must not add it).
    pub has_bos: bool,
}

/// A tokenized, labelled record.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// 1 where the token is a label.
    pub labels: Vec<u8>,
    /// Byte offsets of each token in the rendered text (`(0, 0)` for added specials).
    pub offsets: Vec<(usize, usize)>,
}

impl Template {
    /// A built-in template by name (`hf` needs [`Template::load`]).
    pub fn builtin(name: &str) -> Result<Template> {
        match name {
            "openchat" => Ok(Template::Openchat),
            "chatml" => Ok(Template::Chatml),
            "llama3" => Ok(Template::Llama3),
            "mistral" => Ok(Template::Mistral),
            "hf" => Err(Error::msg(
                "template `hf` reads the model's tokenizer_config.json: give the model directory",
            )),
            other => Err(unknown(other)),
        }
    }

    /// A template by name; `hf` reads `chat_template` from `model_dir/tokenizer_config.json`.
    pub fn load(name: &str, model_dir: &Path) -> Result<Template> {
        if name != "hf" {
            return Template::builtin(name);
        }
        let path = model_dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        let source = match &cfg["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            // A list of named templates: the "default" one.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::config(&path, "chat_template is a list without a `default` entry"))?,
            _ => {
                return Err(Error::config(
                    &path,
                    "no `chat_template` string: this model has no template of its own; use --template openchat, chatml, llama3 or mistral",
                ))
            }
        };
        let token = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or_default().to_string(),
        };
        let t = Template::Hf {
            source,
            bos: token("bos_token"),
            eos: token("eos_token"),
        };
        // Fail on a template that does not compile now, not on the first record.
        t.jinja(&[], false)
            .map_err(|e| Error::config(&path, e.to_string()))?;
        Ok(t)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Template::Openchat => "openchat",
            Template::Chatml => "chatml",
            Template::Llama3 => "llama3",
            Template::Mistral => "mistral",
            Template::Hf { .. } => "hf",
        }
    }

    /// The token that closes an assistant turn (a stop token for generation).
    pub fn end_of_turn(&self) -> &str {
        match self {
            Template::Openchat => OPENCHAT_EOT,
            Template::Chatml => "<|im_end|>",
            Template::Llama3 => "<|eot_id|>",
            Template::Mistral => "</s>",
            Template::Hf { eos, .. } => eos,
        }
    }

    /// Render a conversation with its label spans.
    pub fn render(&self, conv: &Conversation) -> Result<Rendered> {
        if let Template::Hf { bos, .. } = self {
            return self.render_hf(conv, bos);
        }
        let mut r = Rendered {
            text: String::new(),
            labels: Vec::new(),
            has_bos: false,
        };
        for (text, label) in self.segments(conv.system.as_deref(), &conv.turns, false) {
            let start = r.text.len();
            r.text.push_str(&text);
            if label {
                r.labels.push(start..r.text.len());
            }
        }
        Ok(r)
    }

    /// Whether a rendered text already starts with BOS (an `hf` template that
    /// writes it), so that tokenizing must not add another.
    pub fn starts_with_bos(&self, text: &str) -> bool {
        matches!(self, Template::Hf { bos, .. } if !bos.is_empty() && text.starts_with(bos.as_str()))
    }

    /// The prompt for generating the next assistant turn after `turns` (which end with the user).
    pub fn prompt(&self, system: Option<&str>, turns: &[Turn]) -> Result<String> {
        if let Template::Hf { .. } = self {
            return self.jinja(&messages(system, turns), true);
        }
        Ok(self
            .segments(system, turns, true)
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// Text pieces, each flagged when it is a label; with `generation`, the assistant header follows.
    fn segments(
        &self,
        system: Option<&str>,
        turns: &[Turn],
        generation: bool,
    ) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = Vec::new();
        let mut push = |t: String, l: bool| out.push((t, l));
        match self {
            Template::Openchat => {
                for t in turns {
                    match t.role {
                        Role::User => push(
                            format!("GPT4 Correct User: {}{OPENCHAT_EOT}", t.content),
                            false,
                        ),
                        _ => {
                            push("GPT4 Correct Assistant:".into(), false);
                            push(format!(" {}{OPENCHAT_EOT}", t.content), true);
                        }
                    }
                }
                if generation {
                    push("GPT4 Correct Assistant:".into(), false);
                }
            }
            Template::Chatml => {
                if let Some(s) = system {
                    push(format!("<|im_start|>system\n{s}<|im_end|>\n"), false);
                }
                for t in turns {
                    match t.role {
                        Role::User => push(
                            format!("<|im_start|>user\n{}<|im_end|>\n", t.content),
                            false,
                        ),
                        _ => {
                            push("<|im_start|>assistant\n".into(), false);
                            push(format!("{}<|im_end|>", t.content), true);
                            push("\n".into(), false);
                        }
                    }
                }
                if generation {
                    push("<|im_start|>assistant\n".into(), false);
                }
            }
            Template::Llama3 => {
                let header = |r: &str| format!("<|start_header_id|>{r}<|end_header_id|>\n\n");
                if let Some(s) = system {
                    push(format!("{}{s}<|eot_id|>", header("system")), false);
                }
                for t in turns {
                    match t.role {
                        Role::User => {
                            push(format!("{}{}<|eot_id|>", header("user"), t.content), false)
                        }
                        _ => {
                            push(header("assistant"), false);
                            push(format!("{}<|eot_id|>", t.content), true);
                        }
                    }
                }
                if generation {
                    push(header("assistant"), false);
                }
            }
            Template::Mistral => {
                for (i, t) in turns.iter().enumerate() {
                    match (t.role, system) {
                        (Role::User, Some(s)) if i == 0 => {
                            push(format!("[INST] {s}\n\n{} [/INST]", t.content), false)
                        }
                        (Role::User, _) => push(format!("[INST] {} [/INST]", t.content), false),
                        _ => push(format!(" {}</s>", t.content), true),
                    }
                }
            }
            Template::Hf { .. } => unreachable!("hf templates render through Jinja"),
        }
        out
    }

    fn jinja(&self, msgs: &[serde_json::Value], generation: bool) -> Result<String> {
        let Template::Hf { source, bos, eos } = self else {
            unreachable!("only hf templates are Jinja")
        };
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", source)
            .map_err(|e| Error::msg(format!("the chat_template does not parse: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::msg(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => msgs,
            bos_token => bos,
            eos_token => eos,
            add_generation_prompt => generation,
        })
        .map_err(|e| Error::msg(format!("the chat_template failed: {e}")))
    }

    fn render_hf(&self, conv: &Conversation, bos: &str) -> Result<Rendered> {
        let msgs = messages(conv.system.as_deref(), &conv.turns);
        let first = msgs.len() - conv.turns.len();
        let text = self.jinja(&msgs, false)?;
        let mut labels = Vec::new();
        for (i, t) in conv.turns.iter().enumerate() {
            if t.role != Role::Assistant {
                continue;
            }
            let upto = first + i;
            let before = self.jinja(&msgs[..upto], true)?;
            let after = self.jinja(&msgs[..=upto], false)?;
            if !after.starts_with(&before) || !text.starts_with(&after) {
                return Err(Error::msg(format!(
                    "the chat_template is not prefix-stable at assistant turn {i} (rendering more messages changes earlier text), so label spans cannot be derived; use a built-in template"
                )));
            }
            labels.push(before.len()..after.len());
        }
        Ok(Rendered {
            has_bos: !bos.is_empty() && text.starts_with(bos),
            text,
            labels,
        })
    }

    /// Render, tokenize and label a conversation, truncated on the right to
    /// `max_length` tokens (BOS included).
    pub fn encode(
        &self,
        tok: &Tokenizer,
        conv: &Conversation,
        max_length: usize,
    ) -> Result<Encoded> {
        let r = self.render(conv)?;
        encode_rendered(tok, &r, max_length)
    }
}

/// Tokenize rendered text; a token is a label when its byte span overlaps a label span.
pub fn encode_rendered(tok: &Tokenizer, r: &Rendered, max_length: usize) -> Result<Encoded> {
    let enc = tok
        .encode(r.text.as_str(), !r.has_bos)
        .map_err(|e| Error::msg(format!("tokenizing failed: {e}")))?;
    let n = enc.get_ids().len().min(max_length);
    let offsets: Vec<(usize, usize)> = enc.get_offsets()[..n].to_vec();
    let special = enc.get_special_tokens_mask();
    let labels = offsets
        .iter()
        .enumerate()
        .map(|(i, &(s, e))| {
            // Added specials (BOS from the post-processor) carry (0, 0): never labels.
            let added = special.get(i) == Some(&1) && s == e;
            (!added && r.labels.iter().any(|span| s < span.end && e > span.start)) as u8
        })
        .collect();
    Ok(Encoded {
        ids: enc.get_ids()[..n].to_vec(),
        labels,
        offsets,
    })
}

fn messages(system: Option<&str>, turns: &[Turn]) -> Vec<serde_json::Value> {
    system
        .map(|s| serde_json::json!({"role": "system", "content": s}))
        .into_iter()
        .chain(
            turns
                .iter()
                .map(|t| serde_json::json!({"role": t.role.as_str(), "content": t.content})),
        )
        .collect()
}

fn unknown(name: &str) -> Error {
    Error::msg(format!(
        "unknown template `{name}`; known templates: {}",
        NAMES.join(", ")
    ))
}

/// Read a model directory's `tokenizer.json`.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::model(
            dir,
            "no tokenizer.json (the HF fast-tokenizer file); export it with transformers' AutoTokenizer(...).save_pretrained",
        ));
    }
    Tokenizer::from_file(&path)
        .map_err(|e| Error::model(&path, format!("cannot read the tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(system: Option<&str>, turns: &[&str]) -> Conversation {
        Conversation::alternating(system, turns)
    }

    fn labelled(r: &Rendered) -> Vec<&str> {
        r.labels.iter().map(|s| &r.text[s.clone()]).collect()
    }

    #[test]
    fn builtin_spans_are_the_replies_with_their_end_of_turn() {
        let c = conv(Some("S"), &["u1", "a1", "u2", "a2"]);
        let oc = Template::Openchat.render(&c).unwrap();
        assert_eq!(labelled(&oc), [" a1<|end_of_turn|>", " a2<|end_of_turn|>"]);
        assert!(!oc.text.contains('S'), "openchat has no system prompt");
        let cm = Template::Chatml.render(&c).unwrap();
        assert_eq!(labelled(&cm), ["a1<|im_end|>", "a2<|im_end|>"]);
        assert!(cm.text.starts_with("<|im_start|>system\nS<|im_end|>\n"));
        let l3 = Template::Llama3.render(&c).unwrap();
        assert_eq!(labelled(&l3), ["a1<|eot_id|>", "a2<|eot_id|>"]);
        let mi = Template::Mistral.render(&c).unwrap();
        assert_eq!(
            mi.text,
            "[INST] S\n\nu1 [/INST] a1</s>[INST] u2 [/INST] a2</s>"
        );
        assert_eq!(labelled(&mi), [" a1</s>", " a2</s>"]);
    }

    #[test]
    fn prompts_end_with_the_generation_header() {
        let t = conv(None, &["u1"]).turns;
        assert_eq!(
            Template::Openchat.prompt(None, &t).unwrap(),
            "GPT4 Correct User: u1<|end_of_turn|>GPT4 Correct Assistant:"
        );
        assert!(Template::Chatml
            .prompt(None, &t)
            .unwrap()
            .ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn hf_spans_come_from_prefix_renders() {
        let chatml_jinja = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = Template::Hf {
            source: chatml_jinja.into(),
            bos: "<s>".into(),
            eos: "<|im_end|>".into(),
        };
        let c = conv(Some("S"), &["u1", "a1", "u2", "a2"]);
        let hf = t.render(&c).unwrap();
        let builtin = Template::Chatml.render(&c).unwrap();
        assert_eq!(hf.text, builtin.text);
        // The difference of prefix renders includes the newline after <|im_end|>.
        assert_eq!(labelled(&hf), ["a1<|im_end|>\n", "a2<|im_end|>\n"]);
        assert!(!hf.has_bos);
        assert!(t.starts_with_bos("<s><|im_start|>user") && !t.starts_with_bos("<|im_start|>user"));
        assert!(
            !Template::Openchat.starts_with_bos("<s>GPT4"),
            "built-ins leave BOS to the tokenizer"
        );
        let bad = Template::Hf {
            source: "{{ raise_exception('nope') }}".into(),
            bos: String::new(),
            eos: String::new(),
        };
        assert!(bad.render(&c).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let e = Template::builtin("vicuna").unwrap_err().to_string();
        assert!(
            e.contains("vicuna") && e.contains("openchat, chatml"),
            "{e}"
        );
    }
}
