//! Text generation with a KV cache: greedy or sampled (temperature, top-k,
//! top-p, seed), stopping at the model's end-of-sequence tokens; and chat
//! replies: a conversation rendered with a chat template (or sent as it is),
//! the template's end-of-turn token as a stop, the reply streamed as text.
//! `fusechat generate`, `fusechat chat` and the evaluators use [`reply`].

#[cfg(feature = "data")]
use crate::data::template::Template;
use crate::model::{candle_error as ce, CausalLm, KvCache};
use crate::rng::SplitMix64;
use crate::{Error, Result};
use candle_core::Tensor;
use std::path::Path;
#[cfg(feature = "data")]
use tokenizers::Tokenizer;

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0 (or below): greedy.
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1: all).
    pub top_p: f64,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    pub seed: u64,
    /// Generation stops after producing any of these (it is not returned).
    pub stop: Vec<u32>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

impl GenOptions {
    /// Every setting in its range, or an error naming the value and the range.
    pub fn check(&self) -> Result<()> {
        let mut problems = Vec::new();
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            problems.push(format!(
                "temperature = {}: use a finite number ≥ 0 (0 is greedy)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            problems.push(format!("top_p = {}: use a value in (0, 1]", self.top_p));
        }
        if self.max_new_tokens == 0 {
            problems.push("max_new_tokens = 0: use at least 1".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid("the generation request", problems))
        }
    }
}

/// Pick the next token from one position's logits.
pub fn sample(logits: &[f32], opts: &GenOptions, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, v)| {
                if *v > best.1 {
                    (i, *v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    // candidates by descending logit (ties by id)
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    let t = opts.temperature;
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|i| ((logits[*i] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= opts.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (p, i) in probs.iter().zip(&idx) {
        acc += p;
        if u < acc {
            return *i as u32;
        }
    }
    *idx.last().expect("at least one candidate") as u32
}

/// Generate up to `max_new_tokens` after `prompt`, calling `on_token` with each
/// new token as it comes. Returns the new tokens (without the stop token).
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    opts.check()?;
    if prompt.is_empty() {
        return Err(Error::msg("the prompt encodes to no tokens"));
    }
    let mut rng = SplitMix64(opts.seed);
    let mut cache = KvCache::default();
    let mut out = Vec::new();
    let mut input =
        Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), model.device()).map_err(ce)?;
    for _ in 0..opts.max_new_tokens {
        let logits = model.forward_cached(&input, None, &mut cache)?;
        let t = logits.dim(1).map_err(ce)?;
        let last: Vec<f32> = logits
            .narrow(1, t - 1, 1)
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_vec1())
            .map_err(ce)?;
        let next = sample(&last, opts, &mut rng);
        if opts.stop.contains(&next) {
            break;
        }
        out.push(next);
        on_token(next)?;
        input = Tensor::from_vec(vec![next], (1, 1), model.device()).map_err(ce)?;
    }
    Ok(out)
}

/// Generate for several prompts at once: the prompts are left-padded into
/// one batch, so that each step is one forward (with the KV cache) serving
/// every row. Each row has its own options (temperature, seed, stops,
/// `max_new_tokens`); a row that has stopped keeps its slot, its outputs
/// ignored, until every row has. `on_step` is called with the number of rows
/// still generating after each step. Returns each row's new tokens (without
/// the stop token), in prompt order.
pub fn generate_batch(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    opts: &[GenOptions],
    mut on_step: impl FnMut(usize),
) -> Result<Vec<Vec<u32>>> {
    if prompts.len() != opts.len() {
        return Err(Error::msg(format!(
            "{} prompts with {} option sets",
            prompts.len(),
            opts.len()
        )));
    }
    for (i, (p, o)) in prompts.iter().zip(opts).enumerate() {
        o.check()?;
        if p.is_empty() {
            return Err(Error::msg(format!("prompt {i} encodes to no tokens")));
        }
    }
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let steps = opts.iter().map(|o| o.max_new_tokens).max().unwrap_or(0);
    // Row-major [b, width] ids and the key mask, which grows by one column per step.
    let mut ids = Vec::with_capacity(b * width);
    let mut mask: Vec<Vec<u32>> = Vec::with_capacity(b);
    for p in prompts {
        let pad = width - p.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
        mask.push(
            std::iter::repeat_n(0u32, pad)
                .chain(std::iter::repeat_n(1, p.len()))
                .collect(),
        );
    }
    let mut rngs: Vec<SplitMix64> = opts.iter().map(|o| SplitMix64(o.seed)).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut live: Vec<bool> = vec![true; b];
    let mut cache = KvCache::default();
    let mut input = Tensor::from_vec(ids, (b, width), model.device()).map_err(ce)?;
    for _ in 0..steps {
        let flat: Vec<u32> = mask.concat();
        let logits = model.forward_cached(&input, Some(&flat), &mut cache)?;
        let (_, t, v) = logits.dims3().map_err(ce)?;
        let last: Vec<f32> = logits
            .narrow(1, t - 1, 1)
            .and_then(|l| l.flatten_all())
            .and_then(|l| l.to_vec1())
            .map_err(ce)?;
        let mut next = vec![0u32; b];
        for r in 0..b {
            if !live[r] {
                continue;
            }
            let id = sample(&last[r * v..(r + 1) * v], &opts[r], &mut rngs[r]);
            if opts[r].stop.contains(&id) {
                live[r] = false;
                continue;
            }
            out[r].push(id);
            next[r] = id;
            if out[r].len() >= opts[r].max_new_tokens {
                live[r] = false;
            }
        }
        let still = live.iter().filter(|l| **l).count();
        on_step(still);
        if still == 0 {
            break;
        }
        for m in &mut mask {
            m.push(1);
        }
        input = Tensor::from_vec(next, (b, 1), model.device()).map_err(ce)?;
    }
    Ok(out)
}

/// End-of-sequence ids from `generation_config.json` and `config.json`
/// (`eos_token_id`, a number or a list).
pub fn stop_tokens(dir: &Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for f in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(f)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match &v["eos_token_id"] {
            serde_json::Value::Number(n) => ids.extend(n.as_u64().map(|x| x as u32)),
            serde_json::Value::Array(a) => {
                ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A chat template by name, or `None` for `none` (the prompt is sent as it is).
#[cfg(feature = "data")]
pub fn chat_template(name: &str, model_dir: &Path) -> Result<Option<Template>> {
    if name == "none" {
        return Ok(None);
    }
    Ok(Some(Template::load(name, model_dir)?))
}

/// Render a conversation (alternating user, assistant, ..., ending with a user
/// turn) as a prompt that asks for the assistant's reply. Without a template the
/// turns are joined by newlines.
#[cfg(feature = "data")]
pub fn render_prompt(template: Option<&Template>, turns: &[String]) -> Result<String> {
    let Some(t) = template else {
        return Ok(turns.join("\n"));
    };
    let conv = crate::data::conversation::Conversation::alternating(None, turns);
    t.prompt(None, &conv.turns)
}

/// Stop ids of a chat: the model's eos tokens, plus the template's end-of-turn token.
#[cfg(feature = "data")]
pub fn chat_stops(model: &dyn CausalLm, tok: &Tokenizer, template: Option<&Template>) -> Vec<u32> {
    let mut s = stop_tokens(model.dir());
    if let Some(t) = template {
        s.extend(tok.token_to_id(t.end_of_turn()));
    }
    s
}

/// Generate the assistant's reply to `turns`, handing each new piece of text to
/// `on_text` as it comes (a byte-fallback sequence is held back until it forms
/// a whole character). Returns the reply, trimmed. `opts.stop` should hold
/// [`chat_stops`].
#[cfg(feature = "data")]
pub fn reply(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    template: Option<&Template>,
    turns: &[String],
    opts: &GenOptions,
    mut on_text: impl FnMut(&str),
) -> Result<String> {
    let prompt = render_prompt(template, turns)?;
    let enc = tok
        .encode(
            prompt.as_str(),
            !template.is_some_and(|t| t.starts_with_bos(&prompt)),
        )
        .map_err(|e| Error::msg(format!("encoding the prompt: {e}")))?;
    let decode = |ids: &[u32]| {
        tok.decode(ids, true)
            .map_err(|e| Error::msg(format!("decoding: {e}")))
    };
    let mut generated: Vec<u32> = Vec::new();
    let mut shown = String::new();
    generate(model, enc.get_ids(), opts, |id| {
        generated.push(id);
        let text = decode(&generated)?;
        // Hand on only what extends the text already shown.
        if let Some(new) = text.strip_prefix(shown.as_str()) {
            on_text(new);
            shown = text;
        }
        Ok(())
    })?;
    let text = decode(&generated)?;
    if let Some(rest) = text.strip_prefix(shown.as_str()) {
        on_text(rest);
    }
    Ok(text.trim().to_string())
}

/// Replies to several prompts rendered with `template`, generated `batch` at a time with
/// [`generate_batch`] (prompts of similar length share a batch, so padding
/// stays small); each decoded without special tokens and trimmed. `on_done`
/// is called with the number of replies each batch completes.
#[cfg(feature = "data")]
pub fn replies(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    template: Option<&Template>,
    prompts: &[String],
    opts: &[GenOptions],
    batch: usize,
    mut on_done: impl FnMut(usize),
) -> Result<Vec<String>> {
    if prompts.len() != opts.len() {
        return Err(Error::msg(format!(
            "{} prompts with {} option sets",
            prompts.len(),
            opts.len()
        )));
    }
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            tok.encode(p.as_str(), !template.is_some_and(|t| t.starts_with_bos(p)))
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::msg(format!("encoding a prompt: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (encoded[i].len(), i));
    let mut out = vec![String::new(); prompts.len()];
    for chunk in order.chunks(batch.max(1)) {
        let ps: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
        let os: Vec<GenOptions> = chunk.iter().map(|&i| opts[i].clone()).collect();
        let ids = generate_batch(model, &ps, &os, |_| {})?;
        for (&i, ids) in chunk.iter().zip(ids) {
            out[i] = tok
                .decode(&ids, true)
                .map_err(|e| Error::msg(format!("decoding: {e}")))?
                .trim()
                .to_string();
        }
        on_done(chunk.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = SplitMix64(1);
        assert_eq!(sample(&logits, &GenOptions::default(), &mut rng), 1);
        let k1 = GenOptions {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &k1, &mut rng) == 1));
        // top_p small enough keeps only the best token
        let p = GenOptions {
            temperature: 1.0,
            top_p: 0.1,
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &p, &mut rng) == 1));
        // plain sampling reaches the two close candidates, and only rarely the others
        let all = GenOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let draws: Vec<u32> = (0..2000).map(|_| sample(&logits, &all, &mut rng)).collect();
        let share = |t: u32| draws.iter().filter(|d| **d == t).count() as f64 / 2000.0;
        // softmax([0, 3, 1, 2.9]) = [0.0238, 0.4785, 0.0647, 0.4329]; 2000 draws: sd ≈ 0.011
        assert!(
            (share(1) - 0.4785).abs() < 0.04 && (share(3) - 0.4329).abs() < 0.04,
            "{} {}",
            share(1),
            share(3)
        );
    }
}
