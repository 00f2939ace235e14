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
        let kv = self.hidden_size / self.num_heads * self.num_kv_heads;
        decoder_tensors(
            (self.hidden_size, self.intermediate_size, kv),
            self.num_layers,
            self.vocab_size,
            None,
        )
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

/// Tensor names and shapes of a Llama-family decoder, in checkpoint order:
/// `(hidden, intermediate, key/value width)`, and Mixtral's sparse experts
/// in place of the dense MLP when `experts` is given.
fn decoder_tensors(
    (h, i, kv): (usize, usize, usize),
    layers: usize,
    vocab: usize,
    experts: Option<usize>,
) -> Vec<(String, Vec<usize>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h]));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        match experts {
            Some(n) => {
                let x = format!("{p}.block_sparse_moe");
                t.push((format!("{x}.gate.weight"), vec![n, h]));
                for e in 0..n {
                    t.push((format!("{x}.experts.{e}.w1.weight"), vec![i, h]));
                    t.push((format!("{x}.experts.{e}.w2.weight"), vec![h, i]));
                    t.push((format!("{x}.experts.{e}.w3.weight"), vec![i, h]));
                }
            }
            None => {
                t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            }
        }
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    t.push(("lm_head.weight".to_string(), vec![vocab, h]));
    t
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
    let fixed = ["GPT4", "Correct", "User", "Assistant", ":", ".", "?", ","];
    if vocab_size <= SPECIALS.len() + fixed.len() {
        return Err(Error::msg(format!(
            "the miniature tokenizer needs a vocab_size of at least {}",
            SPECIALS.len() + fixed.len() + 1
        )));
    }
    let room = vocab_size - SPECIALS.len() - fixed.len();
    let (cons, vows) = ("bdfgklmnprstvz", "aeiou");
    let made_up = cons.chars().flat_map(|c1| {
        vows.chars().flat_map(move |v1| {
            cons.chars()
                .flat_map(move |c2| vows.chars().map(move |v2| format!("{c1}{v1}{c2}{v2}")))
        })
    });
    let words: Vec<String> = fixed
        .iter()
        .map(|s| s.to_string())
        .chain(made_up.take(room))
        .collect();
    write_word_tokenizer(dir, &words)?;
    Ok(words[fixed.len()..].to_vec())
}

/// The special tokens of the miniature's tokenizers, ids 0..4.
const SPECIALS: [&str; 4] = ["<unk>", "<s>", "</s>", "<|end_of_turn|>"];

/// A word-level tokenizer: the specials (ids 0..4), then `words` in order.
/// Whitespace pre-tokenization; BOS added by its post-processor.
#[cfg(feature = "data")]
pub fn write_word_tokenizer(dir: &Path, words: &[String]) -> Result<usize> {
    use tokenizers::models::wordlevel::WordLevel;
    let vocab = SPECIALS
        .iter()
        .map(|s| s.to_string())
        .chain(words.iter().cloned())
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let n = SPECIALS.len() + words.len();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| Error::msg(format!("building the miniature tokenizer: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    save_tokenizer(dir, tok, None)?;
    Ok(n)
}

/// A BPE tokenizer of at most `vocab_size` tokens trained on `texts`, with
/// SentencePiece-style `▁` word starts (as Llama's and Solar's) and the
/// miniature's specials. The same texts give the same tokenizer: every piece
/// is a merge of the sorted alphabet (the trainer's `##` continuation pieces
/// would take their ids in hash-map order, and with them its tie-breaks).
#[cfg(feature = "data")]
pub fn write_bpe_tokenizer(dir: &Path, texts: &[String], vocab_size: usize) -> Result<usize> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::AddedToken;
    let bad = |e: &dyn std::fmt::Display| {
        Error::msg(format!("training the miniature BPE tokenizer: {e}"))
    };
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let model = BPE::builder()
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| bad(&e))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    tok.with_pre_tokenizer(Some(metaspace.clone()));
    let alphabet = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(":.?,▁".chars());
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(alphabet.collect::<std::collections::HashSet<char>>())
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    tok.train(&mut trainer, texts.iter()).map_err(|e| bad(&e))?;
    let n = tok.get_vocab_size(true);
    save_tokenizer(dir, tok, Some(metaspace.into()))?;
    Ok(n)
}

/// Give `tok` (its pre-tokenizer set) the specials, a BOS post-processor
/// and `decoder`, and write it with its config into `dir`.
#[cfg(feature = "data")]
fn save_tokenizer(
    dir: &Path,
    mut tok: tokenizers::Tokenizer,
    decoder: Option<tokenizers::DecoderWrapper>,
) -> Result<()> {
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;
    let bad =
        |e: &dyn std::fmt::Display| Error::msg(format!("building the miniature tokenizer: {e}"));
    let _added = tok.add_special_tokens(
        SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    );
    let bos = tok.token_to_id("<s>").ok_or_else(|| bad(&"no <s> token"))?;
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|e| bad(&e))?
        .special_tokens(vec![("<s>", bos)])
        .build()
        .map_err(|e| bad(&e))?;
    tok.with_post_processor(Some(post));
    tok.with_decoder(decoder);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok.to_string(true).map_err(|e| bad(&e))?;
    write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"});
    write_atomic(
        &dir.join("tokenizer_config.json"),
        cfg.to_string().as_bytes(),
    )?;
    Ok(())
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

// ---------------------------------------------------------------------------
// The skilled miniature: what `fusechat run` starts from by default.

/// One model of the skilled miniature, trained from random weights by the
/// fuse stage's trainer with λ = 1 (plain SFT) on its own data.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MiniModel {
    /// Sources only: the directory `<out>/<name>`.
    #[serde(default)]
    pub name: String,
    /// mistral, mixtral or llama.
    pub family: String,
    pub layers: usize,
    /// mixtral only: the number of experts (each token goes to 2; default 4).
    /// Written out (in the stamp) as the number used, 4 when not given, so
    /// that giving the default changes nothing.
    #[serde(serialize_with = "experts_or_default")]
    pub experts: Option<usize>,
    /// The skill most of its training data practises (none: dialogue, and a
    /// little of every skill).
    pub skill: Option<String>,
    /// Its own BPE tokenizer of at most this many tokens, trained on its
    /// data (default: the pivot's word-level tokenizer).
    pub bpe_vocab: Option<usize>,
}

/// The experts of a mixtral model when not given.
const DEFAULT_EXPERTS: usize = 4;

impl MiniModel {
    /// The number of experts of a mixtral model.
    fn experts(&self) -> usize {
        self.experts.unwrap_or(DEFAULT_EXPERTS)
    }
}

fn experts_or_default<S: serde::Serializer>(e: &Option<usize>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(e.unwrap_or(DEFAULT_EXPERTS) as u64)
}

/// `[miniature]`: sizes, skills, steps and seeds of the skilled miniature.
/// An omitted field takes the value the repository's `fusechat.toml` sets
/// (a test holds the two together).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SkilledSpec {
    /// Where the models and the data go (relative to the config file).
    pub out: PathBuf,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    #[serde(default = "d_kv")]
    pub num_kv_heads: usize,
    /// Records of `conversations.jsonl`, the fusion data (every skill and
    /// dialogue in equal shares).
    #[serde(default = "d_fusion")]
    pub fusion_records: usize,
    /// Records of `held_out.jsonl` (the test split) per skill.
    #[serde(default = "d_held")]
    pub held_out: usize,
    /// Records of each model's own training data.
    #[serde(default = "d_train")]
    pub train_records: usize,
    /// The share of a model's training data on its skill.
    #[serde(default = "d_focus")]
    pub focus: f64,
    /// The share of each other skill ("a little").
    #[serde(default = "d_little")]
    pub little: f64,
    /// Optimizer steps, batch size and peak rate of each model's training.
    #[serde(default = "d_steps")]
    pub steps: u64,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    pub pivot: MiniModel,
    pub sources: Vec<MiniModel>,
}
fn d_hidden() -> usize {
    64
}
fn d_inter() -> usize {
    176
}
fn d_heads() -> usize {
    4
}
fn d_kv() -> usize {
    2
}
fn d_fusion() -> usize {
    2000
}
fn d_held() -> usize {
    50
}
fn d_train() -> usize {
    1600
}
fn d_focus() -> f64 {
    0.6
}
fn d_little() -> f64 {
    0.03
}
fn d_steps() -> u64 {
    1000
}
fn d_batch() -> usize {
    32
}
fn d_lr() -> f64 {
    5e-3
}

/// The families a miniature model can have.
pub const MINI_FAMILIES: [&str; 3] = ["mistral", "mixtral", "llama"];

impl SkilledSpec {
    /// Every problem of the spec, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        use crate::pipeline::skills::SKILLS;
        let mut p = Vec::new();
        for (f, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("fusion_records", self.fusion_records),
            ("held_out", self.held_out),
            ("train_records", self.train_records),
            ("batch_size", self.batch_size),
        ] {
            if v == 0 {
                p.push(format!("[miniature] {f} = 0: use at least 1"));
            }
        }
        if self.num_heads > 0
            && self.num_kv_heads > 0
            && (self.hidden_size % self.num_heads != 0 || self.num_heads % self.num_kv_heads != 0)
        {
            p.push(
                "[miniature]: hidden_size must divide by num_heads, and num_heads by num_kv_heads"
                    .into(),
            );
        }
        if self.steps == 0 {
            p.push("[miniature] steps = 0: use at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            p.push(format!(
                "[miniature] lr = {}: use a finite rate > 0",
                self.lr
            ));
        }
        let others = (SKILLS.len() - 1) as f64;
        if !(0.0..=1.0).contains(&self.focus)
            || !(0.0..=1.0).contains(&self.little)
            || self.focus + others * self.little > 1.0
        {
            p.push(format!(
                "[miniature] focus = {}, little = {}: each in [0, 1], with focus + {others} × little ≤ 1 (the rest is dialogue)",
                self.focus, self.little
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in std::iter::once(&self.pivot)
            .chain(&self.sources)
            .enumerate()
        {
            let field = if i == 0 {
                "[miniature.pivot]".to_string()
            } else {
                format!("[[miniature.sources]] #{i}")
            };
            if i > 0
                && (m.name.is_empty()
                    || ["pivot", "tokenizer"].contains(&m.name.as_str())
                    || m.name.starts_with('.')
                    || m.name.contains(['/', '\\', '@']))
            {
                p.push(format!("{field} name: set a name (not `pivot` or `tokenizer`, without / \\ or @); it names the model's directory"));
            } else if i > 0 && !names.insert(m.name.clone()) {
                p.push(format!("{field} name: `{}` is used twice", m.name));
            }
            if !MINI_FAMILIES.contains(&m.family.as_str()) {
                p.push(format!(
                    "{field} family: `{}` (use one of {})",
                    m.family,
                    MINI_FAMILIES.join(", ")
                ));
            }
            if m.layers == 0 {
                p.push(format!("{field} layers = 0: use at least 1"));
            }
            match m.experts {
                Some(e) if m.family == "mixtral" && e < 2 => {
                    p.push(format!("{field} experts = {e}: use at least 2"))
                }
                // (an unknown family is reported above; no second message)
                Some(_) if m.family != "mixtral" && MINI_FAMILIES.contains(&m.family.as_str()) => p.push(format!(
                    "{field} experts: only a mixtral model has experts; remove it or set family = \"mixtral\""
                )),
                _ => {}
            }
            if let Some(s) = &m.skill {
                if !SKILLS.contains(&s.as_str()) {
                    p.push(format!(
                        "{field} skill: `{s}` (use one of {})",
                        SKILLS.join(", ")
                    ));
                }
            }
            if m.bpe_vocab.is_some_and(|v| v < 100) {
                p.push(format!("{field} bpe_vocab: use at least 100 tokens"));
            }
        }
        p
    }

    /// Every file and directory the miniature writes into `out`.
    pub fn products(&self) -> Vec<PathBuf> {
        let mut p: Vec<PathBuf> = [CONVERSATIONS, HELD_OUT, "tokenizer", STAMP]
            .iter()
            .map(|f| self.out.join(f))
            .collect();
        for (name, m) in self.models() {
            p.push(self.out.join(name));
            if m.bpe_vocab.is_some() {
                p.push(self.out.join(format!("tokenizer-{name}")));
            }
        }
        p
    }

    fn models(&self) -> impl Iterator<Item = (&str, &MiniModel)> {
        std::iter::once(("pivot", &self.pivot))
            .chain(self.sources.iter().map(|m| (m.name.as_str(), m)))
    }

    /// The config.json of model `m` with a vocabulary of `vocab` tokens.
    fn config(&self, m: &MiniModel, vocab: usize) -> serde_json::Value {
        let mut c = serde_json::json!({
            "vocab_size": vocab,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": m.layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size / self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        });
        let (arch, ty) = match m.family.as_str() {
            "mixtral" => {
                c["num_local_experts"] = m.experts().into();
                c["num_experts_per_tok"] = 2.into();
                c["sliding_window"] = serde_json::Value::Null;
                ("MixtralForCausalLM", "mixtral")
            }
            "llama" => ("LlamaForCausalLM", "llama"),
            _ => {
                c["sliding_window"] = serde_json::Value::Null;
                ("MistralForCausalLM", "mistral")
            }
        };
        c["architectures"] = serde_json::json!([arch]);
        c["model_type"] = ty.into();
        c
    }

    /// Tensor names and shapes of model `m`, in checkpoint order.
    fn tensors(&self, m: &MiniModel, vocab: usize) -> Vec<(String, Vec<usize>)> {
        let kv = self.hidden_size / self.num_heads * self.num_kv_heads;
        let experts = (m.family == "mixtral").then_some(m.experts());
        decoder_tensors(
            (self.hidden_size, self.intermediate_size, kv),
            m.layers,
            vocab,
            experts,
        )
    }

    /// The training mixture of a model whose skill is `skill`.
    fn mix(&self, skill: Option<&str>) -> std::collections::BTreeMap<String, f64> {
        use crate::pipeline::skills::{DIALOGUE, SKILLS};
        let mut mix: std::collections::BTreeMap<String, f64> = SKILLS
            .iter()
            .map(|s| {
                let share = if Some(*s) == skill {
                    self.focus
                } else {
                    self.little
                };
                (s.to_string(), share)
            })
            .collect();
        let used: f64 = mix.values().sum();
        mix.insert(DIALOGUE.into(), (1.0 - used).max(0.0));
        mix
    }

    fn stamp(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["out"] = serde_json::Value::Null;
        format!("skilled miniature v1 {v}")
    }
}

/// Whether `spec.out` holds the set that `spec` describes.
pub fn skilled_up_to_date(spec: &SkilledSpec) -> bool {
    std::fs::read_to_string(spec.out.join(STAMP)).ok() == Some(spec.stamp())
        && spec
            .models()
            .all(|(n, _)| spec.out.join(n).join("config.json").is_file())
}

/// Write JSON records as lines, atomically.
fn write_jsonl(path: &Path, records: &[serde_json::Value]) -> Result<()> {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(path, text.as_bytes())
}

/// The texts of `records` as the openchat template shows them to a
/// tokenizer (for training one).
fn corpus(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            r["conversations"]
                .as_array()
                .map(|turns| {
                    turns
                        .iter()
                        .map(|t| {
                            let role = if t["from"] == "human" {
                                "User"
                            } else {
                                "Assistant"
                            };
                            format!("GPT4 Correct {role}: {}", t["value"].as_str().unwrap_or(""))
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        })
        .collect()
}

/// Build the skilled miniature under `spec.out`, unless the same one is
/// there: the fusion data (`conversations.jsonl`), the held-out split
/// (`held_out.jsonl`), the pivot's word-level tokenizer, and each model,
/// trained from random weights by the fuse trainer with λ = 1 on its own
/// mixture of skills (`force`: even when it is). Returns whether anything
/// was built.
#[cfg(feature = "data")]
pub fn build_skilled(
    spec: &SkilledSpec,
    registry: &crate::plugin::registry::Registry,
    force: bool,
    progress: bool,
) -> Result<bool> {
    use crate::pipeline::skills::{World, DIALOGUE, SKILLS};
    if !force && skilled_up_to_date(spec) {
        return Ok(false);
    }
    let problems = spec.problems();
    if !problems.is_empty() {
        return Err(Error::invalid("[miniature]", problems));
    }
    let out = &spec.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _ = std::fs::remove_file(out.join(STAMP));
    let work = out.join(".work");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    }
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;

    let world = World::new();
    let even: std::collections::BTreeMap<String, f64> = SKILLS
        .iter()
        .chain([&DIALOGUE])
        .map(|s| (s.to_string(), 1.0))
        .collect();
    let fusion = world.records(spec.fusion_records, &even, spec.seed, "fuse");
    write_jsonl(&out.join(CONVERSATIONS), &fusion)?;
    // Skills only: dialogue has no checkable answer.
    let skills: std::collections::BTreeMap<String, f64> =
        SKILLS.iter().map(|s| (s.to_string(), 1.0)).collect();
    let held = world.records(
        spec.held_out * skills.len(),
        &skills,
        spec.seed ^ 0x04E1_D0B7,
        "held",
    );
    write_jsonl(&out.join(HELD_OUT), &held)?;
    let word_tok = out.join("tokenizer");
    let word_vocab = write_word_tokenizer(&word_tok, &world.words())?;

    for (k, (name, m)) in spec.models().enumerate() {
        let started = std::time::Instant::now();
        // Said before its bar (the trainer's, labelled `fuse`) starts.
        tracing::info!(
            "miniature: training {name} ({}/{}: {}, {} layers, skill {}, {} steps)",
            k + 1,
            spec.sources.len() + 1,
            m.family,
            m.layers,
            m.skill.as_deref().unwrap_or("none"),
            spec.steps
        );
        let data = world.records(
            spec.train_records,
            &spec.mix(m.skill.as_deref()),
            spec.seed ^ mix64(k as u64 + 11),
            name,
        );
        let train = work.join(format!("{name}.jsonl"));
        write_jsonl(&train, &data)?;
        let (tok, vocab) = match m.bpe_vocab {
            Some(v) => {
                let dir = out.join(format!("tokenizer-{name}"));
                let mut texts = corpus(&data);
                texts.extend(corpus(&fusion));
                let n = write_bpe_tokenizer(&dir, &texts, v)?;
                (dir, n)
            }
            None => (word_tok.clone(), word_vocab),
        };
        let init = work.join(format!("{name}-init"));
        let shapes = spec.tensors(m, vocab);
        let key = spec.seed ^ fnv1a(name.as_bytes());
        let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = shapes
            .into_iter()
            .map(|(n, s)| {
                let mut rng = SplitMix64(key ^ fnv1a(n.as_bytes()));
                let norm = n.contains("norm");
                let v = (0..s.iter().product::<usize>())
                    .map(|_| {
                        if norm {
                            1.0
                        } else {
                            (0.02 * rng.normal()) as f32
                        }
                    })
                    .collect();
                (n, s, v)
            })
            .collect();
        write_hf_dir(
            &init,
            &spec.config(m, vocab),
            &tensors,
            DType::F32,
            crate::io::writer::DEFAULT_MAX_SHARD_SIZE,
            Some(&tok),
        )?;
        let repr = work.join(format!("{name}-repr"));
        let mut r = crate::data::represent::RepresentOptions::new(&init, &train, &repr);
        r.top_k = 1;
        r.batch_size = 32;
        r.max_length = 512;
        crate::data::represent::represent(registry, &r)?;
        let dir = out.join(name);
        let mut f = crate::train::fuse::FuseOptions::new(&init, &repr, &[], &dir);
        f.params.insert(
            "lm_loss_weight".into(),
            crate::merge::params::Scalar::Float(1.0),
        );
        f.lr = spec.lr;
        f.warmup_ratio = 0.05;
        f.max_steps = Some(spec.steps);
        f.batch_size = spec.batch_size;
        f.grad_accum = 1;
        f.seed = spec.seed ^ k as u64;
        f.force = true;
        f.progress = progress;
        let o = crate::train::fuse::fuse(registry, &f)?;
        // The model is the output; its resume checkpoint is not needed.
        for e in std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with("checkpoint-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        tracing::info!(
            "miniature: trained {name} ({}, {} layers, vocabulary {vocab}, skill {}) in {} steps, last loss {:.3}, {:.1}s",
            m.family,
            m.layers,
            m.skill.as_deref().unwrap_or("none"),
            o.steps,
            o.last_loss.unwrap_or(f64::NAN),
            started.elapsed().as_secs_f64()
        );
    }
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    write_atomic(&out.join(STAMP), spec.stamp().as_bytes())?;
    Ok(true)
}

#[cfg(all(test, feature = "data"))]
mod tests {
    use super::*;

    /// A `[miniature]` that gives only the required fields is the shipped
    /// config's: the defaults are the values the default run was measured with.
    #[test]
    fn defaults_are_the_shipped_configs_values() {
        let shipped: toml::Value =
            toml::from_str(include_str!("../../../fusechat.toml")).expect("fusechat.toml parses");
        let full: SkilledSpec = shipped["miniature"].clone().try_into().unwrap();
        let mut bare = toml::value::Table::new();
        for f in ["out", "pivot", "sources"] {
            bare.insert(f.into(), shipped["miniature"][f].clone());
        }
        let bare: SkilledSpec = toml::Value::Table(bare).try_into().unwrap();
        assert_eq!(bare, full);
    }

    /// `experts` is refused where it would be ignored, and checked where used.
    #[test]
    fn experts_only_on_mixtral() {
        let shipped: toml::Value =
            toml::from_str(include_str!("../../../fusechat.toml")).expect("fusechat.toml parses");
        let mut spec: SkilledSpec = shipped["miniature"].clone().try_into().unwrap();
        assert_eq!(spec.problems(), Vec::<String>::new());
        // giving the default is the same set (the same stamp), as before the
        // field was optional
        let mut given = spec.clone();
        given.sources[0].experts = None;
        assert_eq!(given.stamp(), spec.stamp());
        assert!(spec.stamp().contains(r#""experts":4"#), "{}", spec.stamp());
        spec.pivot.experts = Some(8);
        spec.sources[0].experts = Some(1);
        let p = spec.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("[miniature.pivot] experts: only a mixtral model"),
            "{p:?}"
        );
        assert!(p[1].contains("#1 experts = 1: use at least 2"), "{p:?}");
    }

    /// The same texts give the same BPE tokenizer, byte for byte (the run's
    /// `--force` must give the same table), and it reads text back as written.
    #[test]
    fn bpe_tokenizer_is_deterministic_and_round_trips() {
        use crate::pipeline::skills::{World, SKILLS};
        let w = World::new();
        let mix = SKILLS.iter().map(|s| (s.to_string(), 1.0)).collect();
        let texts = corpus(&w.records(300, &mix, 3, "t"));
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let n = write_bpe_tokenizer(&a, &texts, 300).unwrap();
        assert!(n > SPECIALS.len() && n <= 300, "{n}");
        write_bpe_tokenizer(&b, &texts, 300).unwrap();
        let read = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
        assert_eq!(read(&a), read(&b), "two trainings differ");
        let tok = tokenizers::Tokenizer::from_file(a.join("tokenizer.json")).unwrap();
        let text = "GPT4 Correct User: say backwards : kemi bada lotu";
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_tokens()[0], "<s>");
        assert!(
            enc.get_tokens().iter().all(|t| t != "<unk>"),
            "{:?}",
            enc.get_tokens()
        );
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
    }
}
