//! `mt_bench`: MT-Bench as FastChat runs it (SPEC §7), in its file formats, so
//! that FastChat's `show_result.py` and `gen_judgment.py` read what we write.
//!
//! 1. **Answers.** Every question of `question.jsonl` is answered turn by turn
//!    (turn 2 sees turn 1's answer) with the model's chat template, at
//!    FastChat's temperature for the question's category (below 1e-4: greedy),
//!    up to `max_new_tokens`. `model_answer/<model_id>.jsonl` gets one line per
//!    question, sorted by id; it is rewritten (atomically) after each batch, so
//!    a killed run resumes where it stopped. A sidecar,
//!    `model_answer/<model_id>.fusechat.json`, records the model's content
//!    and the generation settings: answers from other settings are regenerated.
//! 2. **Judgments**, when `judge_url` is given: FastChat's single-answer grading.
//!    Turn 1 uses `single-v1`, turn 2 `single-v1-multi-turn`; math, reasoning and
//!    coding questions use the `single-math-v1` prompts with the reference
//!    answer (`reference_answers`, else the question's own `reference`). The
//!    score is the first `[[x]]`, else `[x]`, in the judgment; none is −1 and is
//!    left out of the means. `model_judgment/<judge_model>_single.jsonl` keeps
//!    every line of other models and runs; a rerun sends only what is missing or
//!    failed (a failed request is recorded as FastChat does, judgment `$ERROR$`
//!    and score −1, plus an `error` field saying why).
//!
//! Rows: `score` (all turns, as show_result.py averages them; overall and per
//! category), `score_turn1`, `score_turn2`, and `unscored` (judgments without a
//! score; `n` is all judgments). Without a judge: `answer_tokens`, the mean
//! answer length per turn.

use super::exact_match::safe_name;
use super::{bar, batch_param, int, load, max_new_tokens_param, template_param};
use fusechat_core::eval::judge::{fill, score, Judge, JudgeConfig, JudgeError};
use fusechat_core::eval::{BuiltinEvaluator, EvalContext, EvalRow, Evaluation, Evaluator, Means};
use fusechat_core::io::writer::write_atomic;
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::model::generate::{chat_stops, render_prompt, replies, GenOptions};
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct MtBench;

/// Categories whose questions are judged against a reference answer (FastChat's `NEED_REF_CATS`).
pub const NEED_REF: &[&str] = &["math", "reasoning", "coding", "arena-hard-200"];

/// FastChat's sampling temperature for a question category; `None` for a
/// category FastChat has no temperature for (it then samples at 0.7).
pub fn temperature(category: &str) -> Option<f64> {
    match category {
        "writing" | "roleplay" => Some(0.7),
        "extraction" | "math" | "coding" | "reasoning" | "arena-hard-200" => Some(0.0),
        "stem" | "humanities" => Some(0.1),
        _ => None,
    }
}

/// FastChat's default temperature for other categories.
const DEFAULT_TEMPERATURE: f64 = 0.7;

/// One line of `question.jsonl`.
#[derive(Debug, Clone)]
pub struct Question {
    /// As written (a number in FastChat's file).
    pub id: Value,
    pub category: String,
    pub turns: Vec<String>,
    pub reference: Option<Vec<String>>,
}

impl Question {
    /// The id as a map key.
    pub fn key(&self) -> String {
        id_key(&self.id)
    }
}

fn id_key(id: &Value) -> String {
    match id {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Sort key of an id: numbers in numeric order, then strings.
fn id_order(id: &Value) -> (u8, f64, String) {
    match id.as_f64() {
        Some(x) => (0, x, String::new()),
        None => (1, 0.0, id_key(id)),
    }
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// The JSON lines of a file, with their 1-based line numbers (blank lines skipped).
fn json_lines(path: &Path) -> Result<Vec<(usize, Value)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map(|v| (i + 1, v))
                .map_err(|e| Error::config(path, format!("line {}: not JSON: {e}", i + 1)))
        })
        .collect()
}

/// Read FastChat's `question.jsonl`: every line needs `question_id` (a number
/// or a string, unique), `category` and `turns` (one or more strings);
/// `reference` (strings) is optional.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line, v) in json_lines(path)? {
        let at = |what: String| Error::config(path, format!("line {line}: {what}"));
        let id = v.get("question_id").cloned().unwrap_or(Value::Null);
        if !(id.is_number() || id.is_string()) {
            return Err(at("needs `question_id`, a number or a string".into()));
        }
        let category = v["category"]
            .as_str()
            .ok_or_else(|| at("needs `category`, a string".into()))?
            .to_string();
        let turns = strings(&v["turns"])
            .filter(|t| !t.is_empty())
            .ok_or_else(|| at("needs `turns`, a list of one or more strings".into()))?;
        let reference = match v.get("reference") {
            None | Some(Value::Null) => None,
            Some(r) => {
                Some(strings(r).ok_or_else(|| at("`reference` must be a list of strings".into()))?)
            }
        };
        let q = Question {
            id,
            category,
            turns,
            reference,
        };
        if !seen.insert(q.key()) {
            return Err(at(format!("question_id {} appears twice", q.key())));
        }
        out.push(q);
    }
    if out.is_empty() {
        return Err(Error::config(path, "no questions in the file"));
    }
    Ok(out)
}

/// A judge prompt of `judge_prompts.jsonl`.
#[derive(Debug, Clone)]
pub struct JudgePrompt {
    pub system: String,
    pub template: String,
}

/// Read FastChat's `judge_prompts.jsonl` (`name`, `system_prompt`, `prompt_template`).
pub fn read_judge_prompts(path: &Path) -> Result<HashMap<String, JudgePrompt>> {
    let mut out = HashMap::new();
    for (line, v) in json_lines(path)? {
        let at = |what: &str| Error::config(path, format!("line {line}: {what}"));
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| at(&format!("needs `{k}`, a string")))
        };
        out.insert(
            field("name")?,
            JudgePrompt {
                system: field("system_prompt")?,
                template: field("prompt_template")?,
            },
        );
    }
    Ok(out)
}

/// Read reference answers (FastChat's `reference_answer/gpt-4.jsonl`): question id → turns.
pub fn read_references(path: &Path) -> Result<HashMap<String, Vec<String>>> {
    let mut out = HashMap::new();
    for (line, v) in json_lines(path)? {
        let at = |what: &str| Error::config(path, format!("line {line}: {what}"));
        let turns = strings(&v["choices"][0]["turns"])
            .ok_or_else(|| at("needs `choices[0].turns`, a list of strings"))?;
        out.insert(id_key(&v["question_id"]), turns);
    }
    Ok(out)
}

/// A line of `model_answer/<model_id>.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub question_id: Value,
    pub answer_id: String,
    pub model_id: String,
    pub choices: Vec<Choice>,
    pub tstamp: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    pub index: usize,
    pub turns: Vec<String>,
}

/// A line of `model_judgment/<judge>_single.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Judgment {
    pub question_id: Value,
    pub model: String,
    /// `[judge model, prompt name]`.
    pub judge: (String, String),
    pub user_prompt: String,
    pub judgment: String,
    pub score: f64,
    pub turn: u32,
    pub tstamp: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

const ERROR: &str = "$ERROR$";

/// What identifies a judgment: question, model, judge model, prompt name, turn.
type JudgmentKey = (String, String, String, String, u32);

/// The judge prompts by name, and the reference answers by question.
type JudgeInputs = (HashMap<String, JudgePrompt>, HashMap<String, Vec<String>>);

impl Judgment {
    fn key(&self) -> JudgmentKey {
        (
            id_key(&self.question_id),
            self.model.clone(),
            self.judge.0.clone(),
            self.judge.1.clone(),
            self.turn,
        )
    }
}

/// The judge settings from the parameters; `None` without `judge_url`.
struct JudgeSettings {
    config: JudgeConfig,
    prompts: PathBuf,
    references: Option<PathBuf>,
}

fn opt_str<'a>(p: &'a ResolvedParams, name: &str) -> Option<&'a str> {
    p.get(name)
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
}

fn judge_settings(p: &ResolvedParams) -> Result<Option<JudgeSettings>> {
    let Some(url) = opt_str(p, "judge_url") else {
        return Ok(None);
    };
    let mut config = JudgeConfig::new(url, p.str("judge_model")?);
    config.key_env = p.str("judge_key_env")?.to_string();
    config.parallel = int(p, "parallel")?;
    config.timeout = Duration::from_secs_f64(p.f64("judge_timeout")?);
    config.retries = int(p, "judge_retries")? as u32;
    config.backoff = Duration::from_secs_f64(p.f64("judge_backoff")?);
    let prompts = opt_str(p, "judge_prompts").map(PathBuf::from).ok_or_else(|| {
        Error::msg("judge_url is set but judge_prompts is not: give FastChat's judge_prompts.jsonl (--set judge_prompts=FILE)")
    })?;
    Ok(Some(JudgeSettings {
        config,
        prompts,
        references: opt_str(p, "reference_answers").map(PathBuf::from),
    }))
}

/// The prompt name for a question's turn.
fn prompt_name(q: &Question, turn: u32) -> String {
    let base = if NEED_REF.contains(&q.category.as_str()) {
        "single-math-v1"
    } else {
        "single-v1"
    };
    if turn == 2 {
        format!("{base}-multi-turn")
    } else {
        base.to_string()
    }
}

/// The reference turns of a question that needs them.
fn reference<'a>(q: &'a Question, refs: &'a HashMap<String, Vec<String>>) -> Option<&'a [String]> {
    refs.get(&q.key())
        .or(q.reference.as_ref())
        .map(Vec::as_slice)
}

/// Everything judging needs that can be checked before any model is loaded.
fn check_judging(js: &JudgeSettings, qs: &[Question]) -> Result<JudgeInputs> {
    let mut problems = Vec::new();
    let prompts = read_judge_prompts(&js.prompts)?;
    let refs = match &js.references {
        Some(r) => read_references(r)?,
        None => HashMap::new(),
    };
    for q in qs {
        for turn in 1..=q.turns.len().min(2) as u32 {
            let name = prompt_name(q, turn);
            if !prompts.contains_key(&name) {
                problems.push(format!(
                    "{} has no prompt `{name}` (question {})",
                    js.prompts.display(),
                    q.key()
                ));
            }
        }
        if NEED_REF.contains(&q.category.as_str()) {
            match reference(q, &refs) {
                Some(r) if r.len() >= q.turns.len().min(2) => {}
                _ => problems.push(format!(
                    "question {} ({}) is judged against a reference answer, and none was found: give reference_answers=FILE (FastChat's reference_answer/gpt-4.jsonl) or a `reference` in the question",
                    q.key(),
                    q.category
                )),
            }
        }
    }
    let host_is_openai = js.config.base_url.contains("api.openai.com");
    if host_is_openai && std::env::var(&js.config.key_env).map_or(true, |k| k.is_empty()) {
        problems.push(format!(
            "the judge is OpenAI's API and ${} is not set: export the key in it (or name another variable with judge_key_env)",
            js.config.key_env
        ));
    }
    problems.sort();
    problems.dedup();
    if problems.is_empty() {
        Ok((prompts, refs))
    } else {
        Err(Error::invalid("mt_bench judging", problems))
    }
}

impl Evaluator for MtBench {
    fn info(&self) -> PluginInfo {
        let text = |name: &str, help: &str| ParamSpec::text(name, Scope::Shared).help(help);
        PluginInfo {
            kind: PluginKind::Evaluator,
            name: "mt_bench".into(),
            description: "MT-Bench as FastChat runs it: two-turn answers, single-answer grading by an OpenAI-compatible judge".into(),
            params: vec![
                template_param(),
                max_new_tokens_param(1024),
                batch_param(8),
                ParamSpec::int("seed", Scope::Shared).default(0i64).range(0.0, 1e15).help("sampling seed"),
                text("model_id", "the model's name in the answer and judgment files (default: its directory's name)"),
                text("judge_url", "the judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (no judging without it)"),
                text("judge_model", "the judge's model name").default("gpt-4"),
                text("judge_key_env", "the environment variable holding the judge's API key (sent as a Bearer token)").default("OPENAI_API_KEY"),
                ParamSpec::file("judge_prompts", Scope::Shared).help("FastChat's judge_prompts.jsonl"),
                ParamSpec::file("reference_answers", Scope::Shared).help( "FastChat's reference_answer/gpt-4.jsonl (math, reasoning and coding are judged against it)"),
                ParamSpec::int("parallel", Scope::Shared).default(4i64).range(1.0, 256.0).help("judge requests in flight"),
                ParamSpec::float("judge_timeout", Scope::Shared).default(120.0).range(0.01, 3600.0).help("seconds to wait for one judge reply"),
                ParamSpec::int("judge_retries", Scope::Shared).default(5i64).range(0.0, 100.0).help("retries of a request on 429, 5xx or a dropped connection"),
                ParamSpec::float("judge_backoff", Scope::Shared).default(2.0).range(0.0, 600.0).help("seconds before the first retry; doubles each time"),
            ],
        }
    }

    fn check(&self, p: &ResolvedParams, data: &Path) -> Result<()> {
        let qs = read_questions(data)?;
        if let Some(id) = opt_str(p, "model_id") {
            if safe_name(id) != id {
                return Err(Error::msg(format!(
                    "model_id `{id}`: use letters, digits and - _ . @ only (it names files)"
                )));
            }
        }
        if let Some(js) = judge_settings(p)? {
            Judge::new(js.config.clone())?;
            check_judging(&js, &qs)?;
        }
        Ok(())
    }

    fn evaluate(&self, ctx: &EvalContext<'_>, p: &ResolvedParams) -> Result<Evaluation> {
        let qs = read_questions(ctx.data)?;
        let judging = match judge_settings(p)? {
            Some(js) => Some((check_judging(&js, &qs)?, js)),
            None => None,
        };
        let model_id = match opt_str(p, "model_id") {
            Some(id) => id.to_string(),
            None => safe_name(
                &ctx.model
                    .dir
                    .file_name()
                    .map_or("model".into(), |n| n.to_string_lossy().to_string()),
            ),
        };
        let answers = answer(ctx, p, &qs, &model_id)?;
        let Some(((prompts, refs), js)) = judging else {
            return answer_rows(ctx, &qs, &answers).map(Evaluation::from);
        };
        let judgments = judge(ctx, &js, &prompts, &refs, &qs, &answers, &model_id)?;
        let mut all = Means::default();
        let mut turn1 = Means::default();
        let mut turn2 = Means::default();
        let mut unscored = 0u64;
        let cats: HashMap<String, &str> =
            qs.iter().map(|q| (q.key(), q.category.as_str())).collect();
        for j in &judgments {
            if j.score == -1.0 {
                unscored += 1;
                continue;
            }
            let cat = cats.get(&id_key(&j.question_id)).copied();
            all.add(cat, j.score);
            if j.turn == 1 { &mut turn1 } else { &mut turn2 }.add(None, j.score);
        }
        let name = &ctx.model.name;
        let mut rows = all.rows(name, "mt_bench", "score", |x| x);
        rows.extend(turn1.rows(name, "mt_bench", "score_turn1", |x| x));
        rows.extend(turn2.rows(name, "mt_bench", "score_turn2", |x| x));
        rows.push(EvalRow {
            model: name.clone(),
            evaluator: "mt_bench".into(),
            metric: "unscored".into(),
            category: None,
            value: unscored as f64,
            n: judgments.len() as u64,
        });
        if unscored > 0 {
            tracing::warn!(
                "mt_bench: {unscored} of {} judgments of `{name}` have no score (left out of the means); rerun to retry the failed ones",
                judgments.len()
            );
        }
        let failed = judgments.iter().filter(|j| j.judgment == ERROR).count();
        Ok(Evaluation {
            rows,
            incomplete: (failed > 0).then(|| {
                format!("{failed} judgments of `{name}` failed (recorded as $ERROR$); run again to retry them")
            }),
        })
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The mean answer length in tokens per turn, when there is no judge.
fn answer_rows(
    ctx: &EvalContext<'_>,
    qs: &[Question],
    answers: &BTreeMap<String, Answer>,
) -> Result<Vec<EvalRow>> {
    let tok = fusechat_core::data::template::load_tokenizer(&ctx.model.dir)?;
    let mut means = Means::default();
    for q in qs {
        if let Some(a) = answers.get(&q.key()) {
            for t in &a.choices[0].turns {
                let n = tok
                    .encode(t.as_str(), false)
                    .map_err(|e| Error::msg(format!("encoding an answer: {e}")))?
                    .len();
                means.add(Some(&q.category), n as f64);
            }
        }
    }
    Ok(means.rows(&ctx.model.name, "mt_bench", "answer_tokens", |x| x))
}

/// Generate (or reuse) every question's answers; returns them by question key.
fn answer(
    ctx: &EvalContext<'_>,
    p: &ResolvedParams,
    qs: &[Question],
    model_id: &str,
) -> Result<BTreeMap<String, Answer>> {
    let dir = ctx.out.join("model_answer");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let file = dir.join(format!("{model_id}.jsonl"));
    let sidecar = dir.join(format!("{model_id}.fusechat.json"));
    let stamp = serde_json::json!({
        "model": fusechat_core::io::model_dir::content_stamps(&ctx.model.dir),
        "template": p.str("template")?,
        "max_new_tokens": p.f64("max_new_tokens")?,
        "seed": p.f64("seed")?,
    });
    let recorded: Option<Value> = std::fs::read_to_string(&sidecar)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut answers: BTreeMap<String, Answer> = BTreeMap::new();
    if file.exists() {
        if recorded.is_none() {
            return Err(Error::model(
                &file,
                "exists, and fusechat did not write it (no model_answer/<model_id>.fusechat.json beside it); move it away or pick another model_id",
            ));
        }
        if recorded.as_ref() == Some(&stamp) {
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let a: Answer = serde_json::from_str(line).map_err(|e| {
                    Error::model(
                        &file,
                        format!("line {}: {e}; delete the file to regenerate", i + 1),
                    )
                })?;
                answers.insert(id_key(&a.question_id), a);
            }
        } else {
            tracing::info!(
                "{}: the model or the settings changed; answering again",
                file.display()
            );
            // Gone before the new stamp is written, so that a run killed in
            // between never pairs these answers with the new settings.
            std::fs::remove_file(&file).map_err(|e| Error::io(&file, e))?;
        }
    }
    let complete = |q: &Question, a: Option<&Answer>| {
        a.is_some_and(|a| {
            a.choices
                .first()
                .is_some_and(|c| c.turns.len() == q.turns.len())
        })
    };
    let mut todo: Vec<&Question> = qs
        .iter()
        .filter(|q| !complete(q, answers.get(&q.key())))
        .collect();
    if todo.is_empty() {
        tracing::info!("{}: every question already answered", file.display());
        return Ok(answers);
    }
    write_atomic(
        &sidecar,
        serde_json::to_string_pretty(&stamp)
            .expect("JSON")
            .as_bytes(),
    )?;
    let unknown: std::collections::BTreeSet<&str> = todo
        .iter()
        .map(|q| q.category.as_str())
        .filter(|c| temperature(c).is_none())
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(
            "mt_bench: FastChat has no temperature for categories {unknown:?}; sampling them at {DEFAULT_TEMPERATURE}, as FastChat does"
        );
    }
    let m = load(ctx, p)?;
    let stops = chat_stops(m.model.as_ref(), &m.tok, m.template.as_ref());
    let max_new_tokens = int(p, "max_new_tokens")?;
    let seed = p.f64("seed")? as u64;
    let batch = int(p, "batch_size")?;
    todo.sort_by_key(|q| (q.turns[0].len(), id_order(&q.id).2));
    let pb = bar(
        ctx,
        todo.iter().map(|q| q.turns.len() as u64).sum(),
        "mt_bench answers",
    );
    for chunk in todo.chunks(batch) {
        let mut done: Vec<Vec<String>> = vec![Vec::new(); chunk.len()];
        let turns = chunk.iter().map(|q| q.turns.len()).max().unwrap_or(0);
        for t in 0..turns {
            let rows: Vec<usize> = (0..chunk.len())
                .filter(|&i| chunk[i].turns.len() > t)
                .collect();
            let mut prompts = Vec::with_capacity(rows.len());
            let mut opts = Vec::with_capacity(rows.len());
            for &i in &rows {
                let q = chunk[i];
                let mut conv = Vec::with_capacity(2 * t + 1);
                for (question, answer) in q.turns[..t].iter().zip(&done[i]) {
                    conv.push(question.clone());
                    conv.push(answer.clone());
                }
                conv.push(q.turns[t].clone());
                prompts.push(render_prompt(m.template.as_ref(), &conv)?);
                let temp = temperature(&q.category).unwrap_or(DEFAULT_TEMPERATURE);
                opts.push(GenOptions {
                    max_new_tokens,
                    temperature: if temp < 1e-4 { 0.0 } else { temp },
                    seed: seed ^ fusechat_core::rng::fnv1a(format!("{}/{t}", q.key()).as_bytes()),
                    stop: stops.clone(),
                    ..Default::default()
                });
            }
            let texts = replies(
                m.model.as_ref(),
                &m.tok,
                m.template.as_ref(),
                &prompts,
                &opts,
                batch,
                |_| {},
            )?;
            for (&i, text) in rows.iter().zip(texts) {
                done[i].push(text);
            }
            pb.inc(rows.len() as u64);
        }
        for (q, turns) in chunk.iter().zip(done) {
            let answer_id = format!(
                "{:016x}",
                fusechat_core::rng::fnv1a(
                    format!("{model_id}\u{0}{}\u{0}{}", q.key(), turns.join("\u{0}")).as_bytes()
                )
            );
            answers.insert(
                q.key(),
                Answer {
                    question_id: q.id.clone(),
                    answer_id,
                    model_id: model_id.to_string(),
                    choices: vec![Choice { index: 0, turns }],
                    tstamp: now(),
                },
            );
        }
        write_answers(&file, &answers)?;
    }
    pb.finish_and_clear();
    Ok(answers)
}

fn write_answers(file: &Path, answers: &BTreeMap<String, Answer>) -> Result<()> {
    let mut sorted: Vec<&Answer> = answers.values().collect();
    sorted.sort_by(|a, b| {
        id_order(&a.question_id)
            .partial_cmp(&id_order(&b.question_id))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut text = String::new();
    for a in sorted {
        text.push_str(&serde_json::to_string(a).expect("JSON"));
        text.push('\n');
    }
    write_atomic(file, text.as_bytes())
}

/// A line of a judgment file: ours, or one we keep as it is.
enum Line {
    Ours(Judgment),
    Other(String),
}

fn write_judgments(file: &Path, lines: &[Line]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        match l {
            Line::Ours(j) => text.push_str(&serde_json::to_string(j).expect("JSON")),
            Line::Other(s) => text.push_str(s),
        }
        text.push('\n');
    }
    write_atomic(file, text.as_bytes())
}

/// A judgment to ask for.
struct Task {
    question_id: Value,
    prompt_name: String,
    system: String,
    user_prompt: String,
    turn: u32,
}

/// Judge every answered turn that has no good judgment yet; returns this
/// model's judgments (old and new) for these questions.
fn judge(
    ctx: &EvalContext<'_>,
    js: &JudgeSettings,
    prompts: &HashMap<String, JudgePrompt>,
    refs: &HashMap<String, Vec<String>>,
    qs: &[Question],
    answers: &BTreeMap<String, Answer>,
    model_id: &str,
) -> Result<Vec<Judgment>> {
    let dir = ctx.out.join("model_judgment");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let judge_model = js.config.model.clone();
    let file = dir.join(format!("{}_single.jsonl", safe_name(&judge_model)));
    // Read what is there; a later line for the same key replaces an earlier one.
    let mut lines: Vec<Line> = Vec::new();
    let mut index: HashMap<JudgmentKey, usize> = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(&file) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Judgment>(line) {
                Ok(j) => match index.get(&j.key()) {
                    Some(&i) => lines[i] = Line::Ours(j),
                    None => {
                        index.insert(j.key(), lines.len());
                        lines.push(Line::Ours(j));
                    }
                },
                Err(_) => lines.push(Line::Other(line.to_string())),
            }
        }
    }
    let mut tasks = Vec::new();
    let mut wanted = Vec::new();
    for q in qs {
        let Some(a) = answers.get(&q.key()) else {
            continue;
        };
        let at = &a.choices[0].turns;
        let r = reference(q, refs);
        for turn in 1..=q.turns.len().min(2) as u32 {
            let name = prompt_name(q, turn);
            let jp = &prompts[&name];
            let mut fields: Vec<(&str, &str)> = Vec::new();
            if turn == 1 {
                fields.push(("question", &q.turns[0]));
                fields.push(("answer", &at[0]));
            } else {
                fields.extend([
                    ("question_1", q.turns[0].as_str()),
                    ("question_2", q.turns[1].as_str()),
                    ("answer_1", at[0].as_str()),
                    ("answer_2", at[1].as_str()),
                ]);
            }
            if let Some(r) = r {
                fields.extend(r.first().map(|x| ("ref_answer_1", x.as_str())));
                fields.extend(r.get(1).map(|x| ("ref_answer_2", x.as_str())));
            }
            let user_prompt = fill(&jp.template, &fields)?;
            let key = (
                q.key(),
                model_id.to_string(),
                judge_model.clone(),
                name.clone(),
                turn,
            );
            wanted.push(key.clone());
            let fresh = index.get(&key).is_some_and(|&i| {
                matches!(&lines[i], Line::Ours(j) if j.user_prompt == user_prompt && j.judgment != ERROR)
            });
            if !fresh {
                tasks.push(Task {
                    question_id: q.id.clone(),
                    prompt_name: name,
                    system: jp.system.clone(),
                    user_prompt,
                    turn,
                });
            }
        }
    }
    if !tasks.is_empty() {
        run_judge(ctx, js, tasks, &file, model_id, &mut lines, &mut index)?;
    }
    Ok(wanted
        .iter()
        .filter_map(|k| match &lines[*index.get(k)?] {
            Line::Ours(j) => Some(j.clone()),
            Line::Other(_) => None,
        })
        .collect())
}

/// Send the tasks with `parallel` workers, rewriting the file as results come.
fn run_judge(
    ctx: &EvalContext<'_>,
    js: &JudgeSettings,
    tasks: Vec<Task>,
    file: &Path,
    model_id: &str,
    lines: &mut Vec<Line>,
    index: &mut HashMap<JudgmentKey, usize>,
) -> Result<()> {
    let judge = Judge::new(js.config.clone())?;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let pb = bar(ctx, tasks.len() as u64, "mt_bench judging");
    let (tx, rx) = std::sync::mpsc::channel::<(usize, std::result::Result<String, JudgeError>)>();
    let mut abort: Option<String> = None;
    let mut failed = 0usize;
    let mut judged = 0usize;
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..judge.parallel().min(tasks.len()) {
            let tx = tx.clone();
            let (judge, tasks, next, stop) = (&judge, &tasks, &next, &stop);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = judge.complete(&tasks[i].system, &tasks[i].user_prompt);
                if tx.send((i, r)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut last_write = Instant::now();
        for (i, r) in rx {
            let t = &tasks[i];
            let (judgment, error) = match r {
                Ok(text) => (text, None),
                Err(JudgeError::Abort(m)) => {
                    stop.store(true, Ordering::Relaxed);
                    abort.get_or_insert(m);
                    continue;
                }
                Err(JudgeError::Failed(m)) => {
                    failed += 1;
                    (ERROR.to_string(), Some(m))
                }
            };
            let j = Judgment {
                question_id: t.question_id.clone(),
                model: model_id.to_string(),
                judge: (js.config.model.clone(), t.prompt_name.clone()),
                user_prompt: t.user_prompt.clone(),
                score: if error.is_some() {
                    -1.0
                } else {
                    score(&judgment)
                },
                judgment,
                turn: t.turn,
                tstamp: now(),
                error,
            };
            match index.get(&j.key()) {
                Some(&k) => lines[k] = Line::Ours(j),
                None => {
                    index.insert(j.key(), lines.len());
                    lines.push(Line::Ours(j));
                }
            }
            judged += 1;
            pb.inc(1);
            pb.set_message(format!(
                "{} retries, {failed} failed",
                judge.retries_made.load(Ordering::Relaxed)
            ));
            if last_write.elapsed() > Duration::from_secs(2) {
                write_judgments(file, lines)?;
                last_write = Instant::now();
            }
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    write_judgments(file, lines)?;
    let retries = judge.retries_made.load(Ordering::Relaxed);
    tracing::info!(
        "mt_bench: judged {judged} of {} turns of `{model_id}` with {} ({retries} retries, {failed} failed, recorded as $ERROR$); {}",
        tasks.len(),
        js.config.model,
        file.display()
    );
    match abort {
        Some(m) => Err(Error::msg(format!(
            "judging stopped after {judged} of {} judgments: {m} (the judgments so far are in {}; rerun to judge the rest)",
            tasks.len(),
            file.display()
        ))),
        None => Ok(()),
    }
}

inventory::submit! { BuiltinEvaluator(|| Arc::new(MtBench)) }
