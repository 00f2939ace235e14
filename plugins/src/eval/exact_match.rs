//! `exact_match`: greedy answers to records with one checkable answer.
//!
//! A record's last turn is the gold answer, given by the assistant; the turns
//! before it (and the system prompt) are the prompt. The model answers
//! greedily, and answer and gold are compared after this normalisation, each
//! step on by default and switched off with its parameter:
//! - `trim`: surrounding whitespace is removed;
//! - `strip_punctuation`: trailing `.`, `!`, `?`, `,`, `;` and `:` are removed
//!   (repeatedly, trimming in between when `trim` is on);
//! - `ignore_case`: both sides are lower-cased (Unicode).
//!
//! The metric is `accuracy` (the share of records answered exactly), overall
//! and per `category`, with `n` the number of records. Every answer is kept in
//! `exact_match/<model>.jsonl` under the output directory.

use super::{bar, batch_param, int, load, max_new_tokens_param, template_param};
use fusechat_core::data::conversation::{self, Conversation, Role};
use fusechat_core::eval::{BuiltinEvaluator, EvalContext, Evaluation, Evaluator, Means};
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::model::generate::{chat_stops, replies, GenOptions};
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::{Error, Result};
use std::path::Path;
use std::sync::Arc;

pub struct ExactMatch;

/// How answers are normalised before comparing.
#[derive(Debug, Clone, Copy)]
pub struct Normalise {
    pub trim: bool,
    pub ignore_case: bool,
    pub strip_punctuation: bool,
}

impl Normalise {
    /// ```
    /// use fusechat_plugins::eval::exact_match::Normalise;
    /// let all = Normalise { trim: true, ignore_case: true, strip_punctuation: true };
    /// assert_eq!(all.apply("  Paris. "), "paris");
    /// assert_eq!(all.apply("42 !?"), "42");
    /// let none = Normalise { trim: false, ignore_case: false, strip_punctuation: false };
    /// assert_eq!(none.apply(" Paris."), " Paris.");
    /// ```
    pub fn apply(&self, s: &str) -> String {
        let mut s: &str = s;
        loop {
            let before = s.len();
            if self.trim {
                s = s.trim();
            }
            if self.strip_punctuation {
                s = s.trim_end_matches(['.', '!', '?', ',', ';', ':']);
            }
            if s.len() == before {
                break;
            }
        }
        if self.ignore_case {
            s.to_lowercase()
        } else {
            s.to_string()
        }
    }
}

/// The prompt turns and the gold answer of a record, or why it has none.
pub fn split(
    conv: &Conversation,
) -> std::result::Result<(&[conversation::Turn], &str), &'static str> {
    match conv.turns.split_last() {
        Some((last, before)) if last.role == Role::Assistant && !before.is_empty() => {
            Ok((before, last.content.as_str()))
        }
        _ => Err("the last turn is not an assistant answer after a question"),
    }
}

fn flag(name: &str, help: &str) -> ParamSpec {
    ParamSpec::bool(name, Scope::Shared)
        .default(true)
        .help(help)
}

impl Evaluator for ExactMatch {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Evaluator,
            name: "exact_match".into(),
            description: "greedy answers compared with the gold last turn after normalisation; accuracy per category".into(),
            params: vec![
                template_param(),
                max_new_tokens_param(64),
                batch_param(8),
                flag("trim", "ignore surrounding whitespace"),
                flag("ignore_case", "compare lower-cased"),
                flag("strip_punctuation", "ignore trailing . ! ? , ; :"),
            ],
        }
    }

    fn check(&self, _p: &ResolvedParams, data: &Path) -> Result<()> {
        let d = conversation::load(data, false)?;
        if let Some(c) = d.records.iter().find(|c| split(c).is_err()) {
            return Err(Error::config(
                data,
                format!(
                    "record {}: the last turn must be the assistant's gold answer",
                    c.row
                ),
            ));
        }
        Ok(())
    }

    fn evaluate(&self, ctx: &EvalContext<'_>, p: &ResolvedParams) -> Result<Evaluation> {
        let data = conversation::load(ctx.data, false)?;
        let m = load(ctx, p)?;
        let norm = Normalise {
            trim: p.bool("trim")?,
            ignore_case: p.bool("ignore_case")?,
            strip_punctuation: p.bool("strip_punctuation")?,
        };
        let mut prompts = Vec::with_capacity(data.records.len());
        let mut golds = Vec::with_capacity(data.records.len());
        for c in &data.records {
            let (turns, gold) =
                split(c).map_err(|e| Error::config(ctx.data, format!("record {}: {e}", c.row)))?;
            prompts.push(match &m.template {
                Some(t) => t.prompt(c.system.as_deref(), turns)?,
                None => turns
                    .iter()
                    .map(|t| t.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
            golds.push(gold);
        }
        let opts = GenOptions {
            max_new_tokens: int(p, "max_new_tokens")?,
            stop: chat_stops(m.model.as_ref(), &m.tok, m.template.as_ref()),
            ..Default::default()
        };
        let pb = bar(ctx, prompts.len() as u64, "exact_match");
        let answers = replies(
            m.model.as_ref(),
            &m.tok,
            m.template.as_ref(),
            &prompts,
            &vec![opts; prompts.len()],
            int(p, "batch_size")?,
            |n| pb.inc(n as u64),
        )?;
        pb.finish_and_clear();
        let mut means = Means::default();
        let mut lines = String::new();
        for ((c, gold), answer) in data.records.iter().zip(&golds).zip(&answers) {
            let correct = norm.apply(answer) == norm.apply(gold);
            means.add(c.category.as_deref(), correct as u8 as f64);
            lines.push_str(
                &serde_json::json!({
                    "row": c.row, "id": c.id, "category": c.category,
                    "gold": gold, "answer": answer, "correct": correct,
                })
                .to_string(),
            );
            lines.push('\n');
        }
        let dir = ctx.out.join("exact_match");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let file = dir.join(format!("{}.jsonl", safe_name(&ctx.model.name)));
        fusechat_core::io::writer::write_atomic(&file, lines.as_bytes())?;
        Ok(means
            .rows(&ctx.model.name, "exact_match", "accuracy", |x| x)
            .into())
    }
}

/// A model name as a file name (`target:a` → `target_a`).
pub fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

inventory::submit! { BuiltinEvaluator(|| Arc::new(ExactMatch)) }
