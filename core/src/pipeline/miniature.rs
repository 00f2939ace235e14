//! A tiny, deterministic model set for demos, tests and benches: a
//! Mistral-shaped pivot and several "fine-tuned" targets, each the pivot plus
//! a perturbation whose scale differs per target and per tensor (so that VaRM
//! has something to weigh). Same spec, same bytes, on every machine.

use crate::io::dtype::DType;
use crate::io::hf_dir::write_hf_dir;
use crate::io::writer::write_atomic;
use crate::rng::{fnv1a, mix64, SplitMix64};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub struct MiniatureSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub targets: Vec<String>,
    pub dtype: DType,
    pub seed: u64,
}

impl Default for MiniatureSpec {
    fn default() -> Self {
        MiniatureSpec {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 176,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            targets: vec!["target_mixtral".into(), "target_solar".into()],
            dtype: DType::BF16,
            seed: 0,
        }
    }
}

impl MiniatureSpec {
    /// Mistral's config.json for this shape.
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size / self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": self.dtype.torch_name(),
        })
    }

    /// Tensor names and shapes, in checkpoint order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = h / self.num_heads;
        let kv = hd * self.num_kv_heads;
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        t.push(("lm_head.weight".to_string(), vec![v, h]));
        t
    }

    /// The pivot's values for one tensor.
    pub fn pivot_tensor(&self, name: &str, numel: usize) -> Vec<f32> {
        let mut rng = SplitMix64(self.seed ^ fnv1a(name.as_bytes()));
        let is_norm = name.contains("norm");
        (0..numel)
            .map(|_| {
                if is_norm {
                    (1.0 + 0.05 * rng.normal()) as f32
                } else {
                    (0.02 * rng.normal()) as f32
                }
            })
            .collect()
    }

    /// Target `j`'s values: the pivot plus a perturbation whose scale depends on
    /// the target and the tensor.
    pub fn target_tensor(&self, j: usize, name: &str, pivot: &[f32]) -> Vec<f32> {
        let key = self.seed ^ fnv1a(name.as_bytes()) ^ mix64(j as u64 + 1);
        let mut rng = SplitMix64(key);
        let scale = 0.002 * (1.0 + (mix64(key) % 7) as f64) * (1.0 + j as f64);
        pivot
            .iter()
            .map(|p| (*p as f64 + scale * rng.normal()) as f32)
            .collect()
    }
}

/// The generated set: pivot and targets.
#[derive(Debug, Clone)]
pub struct MiniatureSet {
    pub pivot: PathBuf,
    pub targets: Vec<PathBuf>,
    pub generated: bool,
}

const STAMP: &str = "miniature.json";

/// What the stamp file of a set made from `spec` says. The set includes a
/// tokenizer and a chat dataset when built with `data`.
fn stamp_text(spec: &MiniatureSpec) -> String {
    format!("{spec:?} data={} held_out=16", cfg!(feature = "data"))
}

/// Whether `out` holds the set that `spec` describes.
pub fn up_to_date(spec: &MiniatureSpec, out: &Path) -> bool {
    std::fs::read_to_string(out.join(STAMP)).ok() == Some(stamp_text(spec))
        && out.join("pivot").is_dir()
        && spec.targets.iter().all(|t| out.join(t).is_dir())
}

/// Generate the set under `out` (`out/pivot`, `out/<target>`), unless a set made
/// from the same spec is already there.
pub fn generate(spec: &MiniatureSpec, out: &Path) -> Result<MiniatureSet> {
    let pivot = out.join("pivot");
    let targets: Vec<PathBuf> = spec.targets.iter().map(|t| out.join(t)).collect();
    let stamp = out.join(STAMP);
    if up_to_date(spec, out) {
        return Ok(MiniatureSet {
            pivot,
            targets,
            generated: false,
        });
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _ = std::fs::remove_file(&stamp);
    #[cfg(feature = "data")]
    // Vocabularies too small for the fixed words get no tokenizer (merge-only sets).
    let tokenizer = if spec.vocab_size > 12 {
        let dir = out.join("tokenizer");
        let words = write_tokenizer(&dir, spec.vocab_size)?;
        write_conversations(&out.join(CONVERSATIONS), &words, 48, spec.seed)?;
        let held_out = conversation_lines(&words, 16, spec.seed ^ 0x4E1D, "held");
        write_atomic(&out.join(HELD_OUT), (held_out.join("\n") + "\n").as_bytes())?;
        Some(dir)
    } else {
        None
    };
    #[cfg(not(feature = "data"))]
    let tokenizer: Option<PathBuf> = None;
    let config = spec.config();
    let names = spec.tensors();
    let pivot_t: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                s.clone(),
                spec.pivot_tensor(n, s.iter().product()),
            )
        })
        .collect();
    write_hf_dir(
        &pivot,
        &config,
        &pivot_t,
        spec.dtype,
        crate::io::writer::DEFAULT_MAX_SHARD_SIZE,
        tokenizer.as_deref(),
    )?;
    for (j, dir) in targets.iter().enumerate() {
        let t: Vec<(String, Vec<usize>, Vec<f32>)> = pivot_t
            .iter()
            .map(|(n, s, p)| (n.clone(), s.clone(), spec.target_tensor(j, n, p)))
            .collect();
        write_hf_dir(
            dir,
            &config,
            &t,
            spec.dtype,
            crate::io::writer::DEFAULT_MAX_SHARD_SIZE,
            tokenizer.as_deref(),
        )?;
    }
    write_atomic(&stamp, stamp_text(spec).as_bytes())?;
    Ok(MiniatureSet {
        pivot,
        targets,
        generated: true,
    })
}

/// The miniature's chat dataset, beside the models.
pub const CONVERSATIONS: &str = "conversations.jsonl";
/// Conversations drawn apart from the training ones, for evaluation.
pub const HELD_OUT: &str = "held_out.jsonl";

/// A word-level tokenizer of `vocab_size` tokens: `<unk>`, `<s>`, `</s>`,
/// `<|end_of_turn|>` (special), the openchat role words, then made-up
/// syllable words (at most 4900 of them). BOS is added by its post-processor.
/// Returns the plain words.
#[cfg(feature = "data")]
pub fn write_tokenizer(dir: &Path, vocab_size: usize) -> Result<Vec<String>> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, Tokenizer};
    let specials = ["<unk>", "<s>", "</s>", "<|end_of_turn|>"];
    let fixed = ["GPT4", "Correct", "User", "Assistant", ":", ".", "?", ","];
    let mut words: Vec<String> = specials
        .iter()
        .chain(fixed.iter())
        .map(|s| s.to_string())
        .collect();
    let (cons, vows) = ("bdfgklmnprstvz", "aeiou");
    'fill: for c1 in cons.chars() {
        for v1 in vows.chars() {
            for c2 in cons.chars() {
                for v2 in vows.chars() {
                    if words.len() >= vocab_size {
                        break 'fill;
                    }
                    words.push(format!("{c1}{v1}{c2}{v2}"));
                }
            }
        }
    }
    // The made-up words run out at 4912 tokens; a larger model vocabulary keeps
    // a smaller tokenizer (its ids stay below the model's vocab_size).
    if vocab_size <= specials.len() + fixed.len() {
        return Err(Error::msg(format!(
            "the miniature tokenizer needs a vocab_size of at least {}",
            specials.len() + fixed.len() + 1
        )));
    }
    let vocab = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| Error::msg(format!("building the miniature tokenizer: {e}")))?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let _added = tok.add_special_tokens(
        specials
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    );
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| Error::msg(format!("building the miniature tokenizer: {e}")))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| Error::msg(format!("building the miniature tokenizer: {e}")))?;
    tok.with_post_processor(Some(post));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok
        .to_string(true)
        .map_err(|e| Error::msg(format!("serializing the miniature tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"});
    write_atomic(
        &dir.join("tokenizer_config.json"),
        cfg.to_string().as_bytes(),
    )?;
    Ok(words[specials.len() + fixed.len()..].to_vec())
}

/// `n` ShareGPT-form conversations of made-up words (1–3 exchanges each),
/// plus two records the data stage must skip (non-alternating, empty).
#[cfg(feature = "data")]
pub fn write_conversations(path: &Path, words: &[String], n: usize, seed: u64) -> Result<()> {
    let mut lines = conversation_lines(words, n, seed, "mini");
    lines.push(serde_json::json!({"id": "bad_roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}).to_string());
    lines.push(serde_json::json!({"id": "empty", "conversations": []}).to_string());
    write_atomic(path, (lines.join("\n") + "\n").as_bytes())
}

/// `n` conversations of made-up words as JSON lines, ids `<prefix>_<i>`.
#[cfg(feature = "data")]
fn conversation_lines(words: &[String], n: usize, seed: u64, prefix: &str) -> Vec<String> {
    let mut rng = SplitMix64(seed ^ 0xC0117E55);
    let sentence = |rng: &mut SplitMix64| {
        let len = 3 + (rng.next_u64() % 12) as usize;
        let mut s: Vec<&str> = (0..len)
            .map(|_| words[(rng.next_u64() % words.len() as u64) as usize].as_str())
            .collect();
        s.push(".");
        s.join(" ")
    };
    (0..n)
        .map(|i| {
            let exchanges = 1 + (rng.next_u64() % 3) as usize;
            let conv: Vec<serde_json::Value> = (0..exchanges * 2)
                .map(|t| serde_json::json!({"from": if t % 2 == 0 { "human" } else { "gpt" }, "value": sentence(&mut rng)}))
                .collect();
            serde_json::json!({"id": format!("{prefix}_{i}"), "conversations": conv}).to_string()
        })
        .collect()
}
