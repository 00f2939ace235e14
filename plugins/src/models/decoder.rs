//! The Llama-family decoder, shared by the `llama`, `mistral` and `mixtral`
//! plugins. What differs between them sits in their own files (a
//! [`FlavourSpec`] each): how config.json names them, the config fields they
//! add (sliding window, experts) and their feed-forward block.
//!
//! Per layer, with RMSNorm `n(x) = x / sqrt(mean(x²) + ε) · w`:
//! `h = x + Wo · attn(RoPE(Wq n(x)), RoPE(Wk n(x)), Wv n(x))`, then
//! `y = h + FFN(n(h))`. Attention is grouped-query (`num_key_value_heads` ≤
//! `num_attention_heads`), causal, restricted to `i − j < sliding_window` when
//! the flavour and the config set one, and never attends to padding. RoPE
//! rotates the two halves of each head (`rotate_half`), with frequencies
//! `rope_theta^(−2i/d)`. The model ends with a final RMSNorm and the LM head
//! (the embedding matrix when `tie_word_embeddings`).
//!
//! Every part is a plain struct whose tensors are resolved by their checkpoint
//! names once, at load. When any weight is trainable, every op used has a
//! backward (see [`fusechat_core::model::ops`]: on the CPU in f32 our fused
//! kernels for RMSNorm, softmax, RoPE and SiLU·mul, each with its backward). A
//! model loaded for inference only also multiplies by its stacked q/k/v and
//! gate/up weights at once and, off the CPU, uses candle's fused kernels; a
//! test checks both paths give the same logits. Attention runs in blocks of
//! 128 queries, each against the keys it can see.
//! Compute dtype: f32 on CPU by default (bf16 checkpoints are upcast at load,
//! which doubles their memory but uses candle's fast f32 GEMM; candle's CPU
//! bf16 GEMM is several times slower), bf16 on CUDA. Whatever the compute
//! dtype, softmax and RMSNorm statistics run in f32 and logits come back in f32.

use candle_core::{DType, Device, Tensor, Var};
use fusechat_core::io::model_dir::ModelDir;
use fusechat_core::model::ops::{self, linear};
use fusechat_core::model::{
    candle_error as ce, CausalLm, KvCache, LayerCache, LoadOptions, SourceModel,
};
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};
use fusechat_core::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Llama,
    Mistral,
    Mixtral,
}

/// What one flavour adds to the shared decoder (declared in its own file).
pub struct FlavourSpec {
    pub name: &'static str,
    pub description: &'static str,
    /// Substrings of config.json's lower-cased `architectures` or `model_type`
    /// that identify the flavour.
    pub markers: &'static [&'static str],
    /// Read the config fields this flavour adds (`file` names config.json in errors).
    pub read_config: fn(&Value, &Path, &mut DecoderConfig) -> Result<()>,
    /// The feed-forward weights of layer `prefix` (`model.layers.N`), with shapes.
    pub ffn_weights: fn(&DecoderConfig, &str) -> Vec<(String, Vec<usize>)>,
    /// Build the feed-forward block of layer `prefix` from the loaded checkpoint.
    pub ffn: fn(&DecoderConfig, &str, &Checkpoint) -> Result<Box<dyn FeedForward>>,
}

impl Flavour {
    /// In detection order: the first whose marker matches wins.
    pub const ALL: [Flavour; 3] = [Flavour::Mixtral, Flavour::Mistral, Flavour::Llama];

    /// The flavour's declaration (the one place that maps the name to its file).
    pub fn spec(self) -> &'static FlavourSpec {
        match self {
            Flavour::Llama => &super::llama::SPEC,
            Flavour::Mistral => &super::mistral::SPEC,
            Flavour::Mixtral => &super::mixtral::SPEC,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// Detect the flavour from config.json's `architectures` / `model_type`.
    pub fn detect(config: &Value) -> Option<Flavour> {
        let mut names: Vec<String> = config["architectures"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .map(str::to_lowercase)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(t) = config["model_type"].as_str() {
            names.push(t.to_lowercase());
        }
        Flavour::ALL.into_iter().find(|f| {
            names
                .iter()
                .any(|n| f.spec().markers.iter().any(|m| n.contains(m)))
        })
    }
}

/// Mixture-of-experts routing (Mixtral).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    pub num: usize,
    pub per_token: usize,
}

/// The fields of config.json the decoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub flavour: Flavour,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Set by flavours with sliding-window attention.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Set by sparse flavours.
    pub experts: Option<Experts>,
}

/// A required positive integer field of config.json.
pub fn required(v: &Value, k: &str, file: &Path, flavour: &str) -> Result<usize> {
    match v[k].as_u64() {
        Some(x) if x >= 1 && x <= u32::MAX as u64 => Ok(x as usize),
        Some(x) => Err(Error::config(
            file,
            format!(
                "`{k}` is {x}; a {flavour} model needs a value in 1..={}",
                u32::MAX
            ),
        )),
        None => Err(Error::config(
            file,
            format!("missing or non-integer field `{k}`, which a {flavour} model needs"),
        )),
    }
}

/// An optional positive integer field of config.json (`null` counts as absent).
pub fn optional(v: &Value, k: &str, file: &Path) -> Result<Option<usize>> {
    match &v[k] {
        Value::Null => Ok(None),
        x => match x.as_u64() {
            Some(n) if n >= 1 && n <= u32::MAX as u64 => Ok(Some(n as usize)),
            _ => Err(Error::config(
                file,
                format!("`{k}` is {x}; use a positive integer or leave it out"),
            )),
        },
    }
}

impl DecoderConfig {
    /// Parse config.json. `file` names the file in errors; `flavour` overrides detection.
    pub fn from_json(v: &Value, file: &Path, flavour: Option<Flavour>) -> Result<DecoderConfig> {
        let flavour = match flavour.or_else(|| Flavour::detect(v)) {
            Some(f) => f,
            None => {
                return Err(Error::config(
                    file,
                    format!(
                        "unknown architecture (architectures = {}, model_type = {}); fusechat's decoders are llama, mistral and mixtral: \
                         set the family explicitly if the model is one of them",
                        v["architectures"], v["model_type"]
                    ),
                ))
            }
        };
        let req = |k: &str| required(v, k, file, flavour.name());
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = optional(v, "num_key_value_heads", file)?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                file,
                format!("num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"),
            ));
        }
        let head_dim = optional(v, "head_dim", file)?.unwrap_or(hidden_size / num_heads);
        if head_dim < 2 || head_dim % 2 != 0 {
            return Err(Error::config(
                file,
                format!("head_dim is {head_dim}; RoPE needs an even head_dim of at least 2 (set `head_dim`, or `hidden_size` to a multiple of 2 × num_attention_heads)"),
            ));
        }
        let float = |k: &str, default: f64| -> Result<f64> {
            match &v[k] {
                Value::Null => Ok(default),
                x => match x.as_f64() {
                    Some(f) if f.is_finite() && f > 0.0 => Ok(f),
                    _ => Err(Error::config(
                        file,
                        format!("`{k}` is {x}; use a positive number"),
                    )),
                },
            }
        };
        let mut cfg = DecoderConfig {
            flavour,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: float("rms_norm_eps", 1e-5)?,
            rope_theta: float("rope_theta", 10000.0)?,
            sliding_window: None,
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            experts: None,
        };
        (flavour.spec().read_config)(v, file, &mut cfg)?;
        Ok(cfg)
    }

    /// Random weights for this config, deterministic per seed (tiny checkpoints
    /// for tests, benches and demos); see [`fusechat_core::io::hf_dir::random_tensors`].
    pub fn random_weights(
        &self,
        seed: u64,
        std: f32,
        norm_std: f32,
    ) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        fusechat_core::io::hf_dir::random_tensors(&self.weights(), seed, std, norm_std)
    }

    /// Every weight the checkpoint must hold, with its shape, in checkpoint order.
    pub fn weights(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let mut w = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            w.push((format!("{p}.input_layernorm.weight"), vec![h]));
            w.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            w.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            w.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            w.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            w.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            w.extend((self.flavour.spec().ffn_weights)(self, &p));
        }
        w.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            w.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        w
    }
}

/// The loaded weights of a checkpoint, by name, from which the parts take theirs.
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// The tensor named `name` (checked present at load).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| Error::msg(format!("weight `{name}` not loaded")))
    }

    /// A tensor that may be absent (the stacked projections of inference).
    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }
}

/// Stack the named weights along their rows into one tensor, and replace each
/// entry of `named` by its view of the stack (so no weight is held twice);
/// `None` when the checkpoint lacks one of them (Mixtral has no dense MLP).
fn stack_rows(named: &mut [(String, Tensor)], names: &[String]) -> Result<Option<Tensor>> {
    let Some(idx) = names
        .iter()
        .map(|n| named.iter().position(|(m, _)| m == n))
        .collect::<Option<Vec<usize>>>()
    else {
        return Ok(None);
    };
    let parts: Vec<&Tensor> = idx.iter().map(|&i| &named[i].1).collect();
    let stacked = Tensor::cat(&parts, 0).map_err(ce)?;
    let mut row = 0;
    for &i in &idx {
        let rows = named[i].1.dim(0).map_err(ce)?;
        named[i].1 = stacked.narrow(0, row, rows).map_err(ce)?;
        row += rows;
    }
    Ok(Some(stacked))
}

/// A feed-forward block: dense SiLU MLP (llama, mistral) or sparse experts (mixtral).
pub trait FeedForward: Send + Sync {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// RMSNorm with its statistics in f32, returned in the input's dtype.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(ck: &Checkpoint, name: &str, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: ck.get(name)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let (x32, w32) = (x.to_dtype(DType::F32)?, self.weight.to_dtype(DType::F32)?);
        let y = if fused {
            candle_nn::ops::rms_norm(&x32.contiguous()?, &w32, self.eps as f32)?
        } else {
            ops::rms_norm(&x32, &w32, self.eps)?
        };
        y.to_dtype(dt)
    }
}

/// The positions a forward pass covers: RoPE tables and the additive
/// attention bias of each query block.
struct Positions {
    cos: Tensor,
    sin: Tensor,
    /// The queries in blocks of at most QUERY_BLOCK, each with its keys.
    blocks: Vec<QueryBlock>,
    /// Every row is its tokens then padding: causal attention alone keeps real
    /// queries off padded keys (what the flash-attention path needs).
    #[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
    right_padded: bool,
}

/// Query positions per block of attention (see `Attention::forward`).
const QUERY_BLOCK: usize = 128;

/// Queries `start..start+len` of a forward pass, which see the keys
/// `0..past+start+len` (the later ones are causally masked).
struct QueryBlock {
    start: usize,
    len: usize,
    /// `[B, 1, len, past+start+len]`, f32: 0 where the query may attend the
    /// key, −1e9 elsewhere.
    bias: Tensor,
}

/// Grouped-query self-attention with RoPE.
struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// `[q; k; v]` stacked, when loaded for inference.
    qkv: Option<Tensor>,
    o: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    #[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
    sliding_window: Option<usize>,
}

impl Attention {
    fn new(ck: &Checkpoint, p: &str, cfg: &DecoderConfig) -> Result<Attention> {
        Ok(Attention {
            q: ck.get(&format!("{p}.self_attn.q_proj.weight"))?,
            k: ck.get(&format!("{p}.self_attn.k_proj.weight"))?,
            v: ck.get(&format!("{p}.self_attn.v_proj.weight"))?,
            qkv: ck.get_opt(&format!("{p}.self_attn.qkv_proj.weight")),
            o: ck.get(&format!("{p}.self_attn.o_proj.weight"))?,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
        })
    }

    /// `scale · rope(x)`: our kernel on the CPU in f32 (it reads the
    /// transposed projection without a copy), candle's fused one elsewhere at
    /// inference.
    fn rope(
        &self,
        x: &Tensor,
        pos: &Positions,
        fused: bool,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        if fused && !cpu_f32 {
            let half = self.head_dim / 2;
            let c = pos.cos.narrow(1, 0, half)?.contiguous()?;
            let s = pos.sin.narrow(1, 0, half)?.contiguous()?;
            let y = candle_nn::rotary_emb::rope(&x.contiguous()?, &c, &s)?;
            return if scale == 1.0 { Ok(y) } else { y * scale };
        }
        ops::rope_scaled(x, &pos.cos, &pos.sin, scale)
    }

    fn forward(
        &self,
        h: &Tensor,
        pos: &Positions,
        cache: Option<&mut Option<LayerCache>>,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = h.dims3()?;
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        // [B, n, T, d] views of the projections
        let (q, k, v) = match &self.qkv {
            Some(w) => {
                let y = linear(h, w)?.reshape((b, t, nh + 2 * nkv, d))?;
                let heads = |from: usize, n: usize| y.narrow(2, from, n)?.transpose(1, 2);
                (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?)
            }
            None => {
                let split =
                    |w: &Tensor, n: usize| linear(h, w)?.reshape((b, t, n, d))?.transpose(1, 2);
                (
                    split(&self.q, nh)?,
                    split(&self.k, nkv)?,
                    split(&self.v, nkv)?,
                )
            }
        };
        let scale = 1.0 / (d as f64).sqrt();
        #[cfg(feature = "flash-attn")]
        let flash = fused
            && pos.right_padded
            && q.device().is_cuda()
            && matches!(q.dtype(), DType::BF16 | DType::F16);
        #[cfg(not(feature = "flash-attn"))]
        let flash = false;
        // The queries carry the 1/√d (T·d values rather than T·S scores),
        // except for flash attention, which applies it in f32 itself.
        let q = self.rope(&q, pos, fused, if flash { 1.0 } else { scale })?;
        let mut k = self.rope(&k, pos, fused, 1.0)?;
        let mut v = v.contiguous()?;
        if let Some(slot) = cache {
            (k, v) = LayerCache::append(slot, &k, &v)?;
        }
        #[cfg(feature = "flash-attn")]
        if flash {
            // [B, H, T, d] → [B, T, H, d]; GQA and the causal sliding window
            // (query i sees keys i−w < j ≤ i) are native to the kernel.
            let bthd = |x: &Tensor| x.transpose(1, 2)?.contiguous();
            let left = self.sliding_window.map(|w| w.saturating_sub(1));
            let o = candle_flash_attn::flash_attn_windowed(
                &bthd(&q)?,
                &bthd(&k)?,
                &bthd(&v)?,
                scale as f32,
                left,
                Some(0),
            )?;
            return linear(&o.reshape((b, t, nh * d))?, &self.o);
        }
        // Grouped-query attention without copying K and V for every query
        // head: the g query heads that share a KV head are g·T rows of one
        // product with it (head h = kv·g + j, so [B, H, T, d] reshapes to
        // [B, kv, g·T, d]). Scores and softmax in f32 whatever the compute
        // dtype (the bias is f32). Queries go in blocks of QUERY_BLOCK
        // positions, each against the keys up to its last position only:
        // the causal mask gives the later keys no weight, so a long sequence
        // skips about half of the scores and of their products with V.
        let g = nh / nkv;
        let s = k.dim(2)?;
        let past = s - t;
        let q5 = q.reshape((b, nkv, g, t, d))?;
        let mut blocks = Vec::with_capacity(pos.blocks.len());
        for blk in &pos.blocks {
            let (t0, tb, bias) = (blk.start, blk.len, &blk.bias);
            let keys = past + t0 + tb;
            let qb = if tb == t {
                q5.reshape((b, nkv, g * t, d))?
            } else {
                q5.narrow(3, t0, tb)?
                    .contiguous()?
                    .reshape((b, nkv, g * tb, d))?
            };
            let (kb, vb) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?);
            let att = qb
                .matmul(&kb.t()?)?
                .to_dtype(DType::F32)?
                .reshape((b, nh, tb, keys))?;
            let att = if fused && !att.device().is_cpu() {
                candle_nn::ops::softmax_last_dim(&att.broadcast_add(bias)?)?
            } else {
                ops::softmax_with_bias(&att, bias)?
            };
            let att = att.to_dtype(v.dtype())?.reshape((b, nkv, g * tb, keys))?;
            blocks.push(att.matmul(&vb)?.reshape((b, nh, tb, d))?);
        }
        let o = if blocks.len() == 1 {
            blocks.pop().expect("one block")
        } else {
            Tensor::cat(&blocks, 2)?
        };
        let o = o.transpose(1, 2)?.reshape((b, t, nh * d))?;
        linear(&o, &self.o)
    }
}

/// One decoder layer: pre-norm attention, then pre-norm feed-forward, each residual.
struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_norm: RmsNorm,
    ffn: Box<dyn FeedForward>,
}

impl Layer {
    fn new(ck: &Checkpoint, cfg: &DecoderConfig, l: usize) -> Result<Layer> {
        let p = format!("model.layers.{l}");
        let eps = cfg.rms_norm_eps;
        Ok(Layer {
            input_norm: RmsNorm::new(ck, &format!("{p}.input_layernorm.weight"), eps)?,
            attn: Attention::new(ck, &p, cfg)?,
            post_norm: RmsNorm::new(ck, &format!("{p}.post_attention_layernorm.weight"), eps)?,
            ffn: (cfg.flavour.spec().ffn)(cfg, &p, ck)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        cache: Option<&mut Option<LayerCache>>,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let h = self.input_norm.forward(x, fused)?;
        let x = (x + self.attn.forward(&h, pos, cache, fused)?)?;
        let h = self.post_norm.forward(&x, fused)?;
        x + self.ffn.forward(&h)?
    }
}

/// A loaded decoder: typed parts, plus every weight by checkpoint name
/// (trainable ones as `Var`s) for saving and inspection.
pub struct Decoder {
    pub cfg: DecoderConfig,
    pub dir: PathBuf,
    pub config_json: Value,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Tensor,
    /// Fused inference kernels (no weight is trainable).
    fused: bool,
    /// Every weight, in checkpoint order.
    named: Vec<(String, Tensor)>,
    vars: Vec<(String, Var)>,
}

impl Decoder {
    /// Load an HF model directory; `flavour` overrides detection from config.json.
    pub fn load(dir: &Path, opts: &LoadOptions, flavour: Option<Flavour>) -> Result<Decoder> {
        let md = ModelDir::open(dir)?;
        let cfg = DecoderConfig::from_json(&md.config, &dir.join("config.json"), flavour)?;
        let expected = cfg.weights();
        let problems: Vec<String> = expected
            .iter()
            .filter_map(|(name, shape)| match md.tensor(name) {
                None => Some(format!(
                    "tensor `{name}` is missing (expected shape {shape:?})"
                )),
                Some(t) if &t.shape != shape => Some(format!(
                    "tensor `{name}` has shape {:?}, but config.json implies {shape:?}",
                    t.shape
                )),
                Some(_) => None,
            })
            .collect();
        if !problems.is_empty() {
            return Err(Error::model(
                dir,
                format!(
                    "cannot load this {} checkpoint:\n  - {}",
                    cfg.flavour.name(),
                    problems.join("\n  - ")
                ),
            ));
        }
        let mut named = Vec::with_capacity(expected.len());
        let mut vars = Vec::new();
        for (name, shape) in expected {
            let t = Tensor::from_vec(md.read_f32(&name)?, shape.as_slice(), &opts.device)
                .and_then(|t| t.to_dtype(opts.compute_dtype()))
                .map_err(ce)?;
            let t = if opts.trainable && !opts.freeze.iter().any(|p| name.contains(p.as_str())) {
                let var = Var::from_tensor(&t).map_err(ce)?;
                vars.push((name.clone(), var.clone()));
                var.as_tensor().clone()
            } else {
                t
            };
            named.push((name, t));
        }
        // Inference on the CPU in f32 multiplies by the query, key and value
        // projections at once, and by the gate and up projections at once.
        let mut stacked = Vec::new();
        if vars.is_empty() && opts.device.is_cpu() && opts.compute_dtype() == DType::F32 {
            for l in 0..cfg.num_layers {
                let p = format!("model.layers.{l}");
                let qkv = ["q", "k", "v"].map(|x| format!("{p}.self_attn.{x}_proj.weight"));
                if let Some(w) = stack_rows(&mut named, &qkv)? {
                    stacked.push((format!("{p}.self_attn.qkv_proj.weight"), w));
                }
                let gate_up = ["gate", "up"].map(|x| format!("{p}.mlp.{x}_proj.weight"));
                if let Some(w) = stack_rows(&mut named, &gate_up)? {
                    stacked.push((format!("{p}.mlp.gate_up_proj.weight"), w));
                }
            }
        }
        let ck = Checkpoint {
            tensors: named.iter().cloned().chain(stacked).collect(),
        };
        let layers = (0..cfg.num_layers)
            .map(|l| Layer::new(&ck, &cfg, l))
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            embed: ck.get("model.embed_tokens.weight")?,
            norm: RmsNorm::new(&ck, "model.norm.weight", cfg.rms_norm_eps)?,
            lm_head: ck.get(if cfg.tie_word_embeddings {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            })?,
            layers,
            fused: vars.is_empty(),
            cfg,
            dir: dir.to_path_buf(),
            config_json: md.config.clone(),
            device: opts.device.clone(),
            named,
            vars,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trainable variables, by checkpoint name.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// A weight by checkpoint name.
    ///
    /// # Panics
    /// If the checkpoint has no such weight (names come from [`DecoderConfig::weights`]).
    pub fn weight(&self, name: &str) -> &Tensor {
        match self.named.iter().find(|(n, _)| n == name) {
            Some((_, t)) => t,
            None => panic!("the decoder has no weight `{name}`"),
        }
    }

    /// Logits `[B, L, V]` (f32) for every position of a right-padded batch.
    /// `attention_mask` is `[B, L]`, 1 for real tokens and 0 for padding.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden(input_ids, attention_mask)?)
    }

    /// The final hidden states `[B, L, H]` (after the last norm) of a right-padded batch.
    pub fn hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2().map_err(ce)?;
        let mask: Vec<u32> = attention_mask
            .to_dtype(DType::U32)
            .and_then(|m| m.flatten_all())
            .and_then(|m| m.to_vec1())
            .map_err(ce)?;
        if mask.len() != b * l {
            return Err(Error::msg(format!(
                "attention_mask has {} values for a [{b}, {l}] batch",
                mask.len()
            )));
        }
        let pos = self.positions(b, l, 0, &mask)?;
        self.run(input_ids, &pos, None)
    }

    /// Logits (f32) from final hidden states `[..., H]`: the LM head alone, so
    /// that a caller can apply it to the positions it needs.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        linear(hidden, &self.lm_head)
            .and_then(|l| l.to_dtype(DType::F32))
            .map_err(ce)
    }

    /// Logits `[B, T, V]` for `input_ids` `[B, T]` following the cached
    /// positions, appending their keys and values to the cache; `key_mask`
    /// (`B × (past + T)`, 0 for padding) masks a left-padded batch's pads.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        key_mask: Option<&[u32]>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().map_err(ce)?;
        let past = cache.len();
        let ones;
        let mask = match key_mask {
            Some(m) if m.len() == b * (past + t) => m,
            Some(m) => {
                return Err(Error::msg(format!(
                    "key_mask has {} flags for {b} rows of {past} cached + {t} new positions",
                    m.len()
                )))
            }
            None => {
                ones = vec![1u32; b * (past + t)];
                &ones
            }
        };
        let pos = self.positions(b, t, past, mask)?;
        if cache.layers.len() != self.cfg.num_layers {
            cache.layers = (0..self.cfg.num_layers).map(|_| None).collect();
        }
        // Generation needs the next token's logits only: the LM head (vocab ×
        // hidden per position) runs on the last position, not the prompt's.
        let h = self.run(input_ids, &pos, Some(cache))?;
        self.logits(&h.narrow(1, t - 1, 1).map_err(ce)?)
    }

    /// RoPE tables and the query blocks' attention biases for `b` rows of `t`
    /// queries after `past` cached positions; `key_mask` `[b, past+t]` is 0
    /// for padding. Built once per forward pass, for every layer.
    fn positions(&self, b: usize, t: usize, past: usize, key_mask: &[u32]) -> Result<Positions> {
        let s = past + t;
        let window = self.cfg.sliding_window;
        let block = |t0: usize| {
            let tb = QUERY_BLOCK.min(t - t0);
            let keys = past + t0 + tb;
            let mut bias = vec![0f32; b * tb * keys];
            for bi in 0..b {
                for i in 0..tb {
                    let qpos = past + t0 + i;
                    for j in 0..keys {
                        let allowed = j <= qpos
                            && key_mask[bi * s + j] != 0
                            && window.is_none_or(|w| qpos - j < w);
                        if !allowed {
                            bias[(bi * tb + i) * keys + j] = -1e9;
                        }
                    }
                }
            }
            Ok(QueryBlock {
                start: t0,
                len: tb,
                bias: Tensor::from_vec(bias, (b, 1, tb, keys), &self.device).map_err(ce)?,
            })
        };
        let blocks = (0..t)
            .step_by(QUERY_BLOCK)
            .map(block)
            .collect::<Result<Vec<_>>>()?;
        let right_padded = key_mask
            .chunks(s.max(1))
            .all(|row| !row.windows(2).any(|w| w[0] == 0 && w[1] != 0));
        let (cos, sin) = ops::rope_tables(
            self.cfg.rope_theta,
            self.cfg.head_dim,
            past,
            t,
            self.embed.dtype(),
            &self.device,
        )
        .map_err(ce)?;
        Ok(Positions {
            cos,
            sin,
            blocks,
            right_padded,
        })
    }

    fn run(
        &self,
        input_ids: &Tensor,
        pos: &Positions,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().map_err(ce)?;
        let ids = input_ids
            .to_dtype(DType::U32)
            .and_then(|x| x.flatten_all())
            .map_err(ce)?;
        let mut x = self
            .embed
            .index_select(&ids, 0)
            .and_then(|e| e.reshape((b, t, self.cfg.hidden_size)))
            .map_err(ce)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = layer.forward(&x, pos, kv, self.fused).map_err(ce)?;
        }
        self.norm.forward(&x, self.fused).map_err(ce)
    }

    /// Current weights as f32 vectors, in checkpoint order.
    pub fn tensors(&self) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        self.named
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.dims().to_vec(), to_f32_vec(t)?)))
            .collect()
    }

    /// Save the (trained) weights as an HF model directory, written atomically,
    /// with config.json and the tokenizer files of the directory it was loaded from.
    pub fn save(&self, out: &Path, dtype: fusechat_core::io::dtype::DType) -> Result<()> {
        fusechat_core::model::save_hf_dir(out, &self.config_json, &self.named, dtype, &self.dir)
    }
}

fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()
        .and_then(|x| x.to_dtype(DType::F32))
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(ce)
}

impl CausalLm for Decoder {
    fn family(&self) -> &str {
        self.cfg.flavour.name()
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dir(&self) -> &Path {
        &self.dir
    }
    fn hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Decoder::hidden(self, input_ids, attention_mask)
    }
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Decoder::logits(self, hidden)
    }
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        key_mask: Option<&[u32]>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        Decoder::forward_cached(self, input_ids, key_mask, cache)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
    fn save(&self, out: &Path, dtype: fusechat_core::io::dtype::DType) -> Result<()> {
        Decoder::save(self, out, dtype)
    }
}

impl SourceModel for Flavour {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Model,
            name: self.name().into(),
            description: self.spec().description.into(),
            params: Vec::new(),
        }
    }
    fn detects(&self, config: &Value) -> bool {
        Flavour::detect(config) == Some(*self)
    }
    fn load(&self, dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Decoder::load(dir, opts, Some(*self))?))
    }
}
