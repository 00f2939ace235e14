//! One decoder for the Llama family, with three flavours: Llama/Solar (dense),
//! Mistral (dense, sliding-window attention) and Mixtral (sparse MoE feed-forward).
//!
//! Per layer, with RMSNorm `n(x) = x / sqrt(mean(x²) + ε) · w`:
//! `h = x + Wo · attn(RoPE(Wq n(x)), RoPE(Wk n(x)), Wv n(x))`, then
//! `y = h + FFN(n(h))` where the dense FFN is `W2 (silu(W1 z) ⊙ W3 z)` and the
//! MoE FFN routes each token to the top-k experts of `softmax(Wg z)`, weighted
//! by their renormalised router probabilities. Attention is grouped-query
//! (`num_key_value_heads` ≤ `num_attention_heads`), causal, restricted to
//! `i − j < sliding_window` when the config sets one, and never attends to
//! padding. RoPE rotates the two halves of each head (`rotate_half`), with
//! frequencies `rope_theta^(−2i/d)`.
//!
//! When any weight is trainable, every op used has a backward in candle: RMSNorm,
//! RoPE and softmax are written out from differentiable ops (candle's fused
//! `rms_norm`, `rope` and `softmax_last_dim` have no backward and would cut the
//! graph). A model loaded for inference only uses the fused kernels, which are
//! faster; a test checks both paths give the same logits.
//! Compute dtype: f32 on CPU by default (bf16 checkpoints are upcast at load,
//! which doubles their memory but uses candle's fast f32 GEMM; candle's CPU
//! bf16 GEMM is several times slower), bf16 on CUDA. Whatever the compute
//! dtype, softmax and RMSNorm statistics run in f32 and logits come back in f32.

use candle_core::{DType, Device, Tensor, Var, D};
use fusechat_core::io::model_dir::ModelDir;
use fusechat_core::model::{candle_error as ce, CausalLm, KvCache, LoadOptions, SourceModel};
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};
use fusechat_core::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Which flavour of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Llama,
    Mistral,
    Mixtral,
}

impl Flavour {
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Llama => "llama",
            Flavour::Mistral => "mistral",
            Flavour::Mixtral => "mixtral",
        }
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
        if names.iter().any(|n| n.contains("mixtral")) {
            Some(Flavour::Mixtral)
        } else if names.iter().any(|n| n.contains("mistral")) {
            Some(Flavour::Mistral)
        } else if names
            .iter()
            .any(|n| n.contains("llama") || n.contains("solar"))
        {
            Some(Flavour::Llama)
        } else {
            None
        }
    }
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
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub num_experts: usize,
    pub experts_per_token: usize,
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
        let req = |k: &str| -> Result<usize> {
            v[k].as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::config(
                    file,
                    format!(
                        "missing or non-integer field `{k}`, which a {} model needs",
                        flavour.name()
                    ),
                )
            })
        };
        let opt = |k: &str| v[k].as_u64().map(|x| x as usize);
        let hidden_size = req("hidden_size")?;
        let num_heads = req("num_attention_heads")?;
        let num_kv_heads = opt("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = opt("head_dim").unwrap_or(hidden_size / num_heads.max(1));
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::config(
                file,
                format!("num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"),
            ));
        }
        let (num_experts, experts_per_token) = if flavour == Flavour::Mixtral {
            let e = req("num_local_experts")?;
            let k = req("num_experts_per_tok")?;
            if k == 0 || k > e {
                return Err(Error::config(
                    file,
                    format!("num_experts_per_tok ({k}) must be in 1..={e}"),
                ));
            }
            (e, k)
        } else {
            (0, 0)
        };
        Ok(DecoderConfig {
            flavour,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_layers: req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-5),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10000.0),
            sliding_window: if flavour == Flavour::Llama {
                None
            } else {
                opt("sliding_window")
            },
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            num_experts,
            experts_per_token,
        })
    }

    /// Random weights for this config, deterministic per seed (tiny checkpoints
    /// for tests, benches and demos): norms `1 + norm_std·N(0,1)`, the rest `std·N(0,1)`.
    pub fn random_weights(
        &self,
        seed: u64,
        std: f32,
        norm_std: f32,
    ) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = fusechat_core::rng::SplitMix64(seed);
        self.weights()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let (base, scale) = if name.contains("norm") {
                    (1.0, norm_std)
                } else {
                    (0.0, std)
                };
                let v = (0..n).map(|_| base + scale * rng.normal() as f32).collect();
                (name, shape, v)
            })
            .collect()
    }

    /// Every weight the checkpoint must hold, with its shape.
    pub fn weights(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
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
            if self.flavour == Flavour::Mixtral {
                w.push((
                    format!("{p}.block_sparse_moe.gate.weight"),
                    vec![self.num_experts, h],
                ));
                for e in 0..self.num_experts {
                    let x = format!("{p}.block_sparse_moe.experts.{e}");
                    w.push((format!("{x}.w1.weight"), vec![i, h]));
                    w.push((format!("{x}.w2.weight"), vec![h, i]));
                    w.push((format!("{x}.w3.weight"), vec![i, h]));
                }
            } else {
                w.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                w.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                w.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            }
        }
        w.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            w.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        w
    }
}

/// A loaded decoder: its weights by checkpoint name (trainable ones as `Var`s).
pub struct Decoder {
    pub cfg: DecoderConfig,
    pub dir: PathBuf,
    pub config_json: Value,
    device: Device,
    names: Vec<String>,
    weights: std::collections::HashMap<String, Tensor>,
    vars: Vec<(String, Var)>,
}

impl Decoder {
    /// Load an HF model directory; `flavour` overrides detection from config.json.
    pub fn load(dir: &Path, opts: &LoadOptions, flavour: Option<Flavour>) -> Result<Decoder> {
        let md = ModelDir::open(dir)?;
        let cfg = DecoderConfig::from_json(&md.config, &dir.join("config.json"), flavour)?;
        let mut weights = std::collections::HashMap::new();
        let mut vars = Vec::new();
        let mut names = Vec::new();
        let mut problems = Vec::new();
        for (name, shape) in cfg.weights() {
            match md.tensor(&name) {
                None => problems.push(format!(
                    "tensor `{name}` is missing (expected shape {shape:?})"
                )),
                Some(t) if t.shape != shape => problems.push(format!(
                    "tensor `{name}` has shape {:?}, but config.json implies {shape:?}",
                    t.shape
                )),
                Some(_) => {
                    let values = md.read_f32(&name)?;
                    let t = Tensor::from_vec(values, shape.as_slice(), &opts.device)
                        .and_then(|t| t.to_dtype(opts.compute_dtype()))
                        .map_err(ce)?;
                    let t = if opts.trainable
                        && !opts.freeze.iter().any(|p| name.contains(p.as_str()))
                    {
                        let var = Var::from_tensor(&t).map_err(ce)?;
                        let t = var.as_tensor().clone();
                        vars.push((name.clone(), var));
                        t
                    } else {
                        t
                    };
                    weights.insert(name.clone(), t);
                    names.push(name);
                }
            }
        }
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
        Ok(Decoder {
            cfg,
            dir: dir.to_path_buf(),
            config_json: md.config.clone(),
            device: opts.device.clone(),
            names,
            weights,
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
    pub fn weight(&self, name: &str) -> &Tensor {
        &self.weights[name]
    }

    fn w(&self, name: &str) -> Result<&Tensor> {
        self.weights
            .get(name)
            .ok_or_else(|| Error::msg(format!("weight `{name}` not loaded")))
    }

    fn lm_head(&self) -> Result<&Tensor> {
        if self.cfg.tie_word_embeddings {
            self.w("model.embed_tokens.weight")
        } else {
            self.w("lm_head.weight")
        }
    }

    /// Logits `[B, L, V]` (f32) for every position of a right-padded batch.
    /// `attention_mask` is `[B, L]`, 1 for real tokens and 0 for padding.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
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
        let bias = self.attention_bias(b, l, 0, &mask)?;
        self.run(input_ids, 0, &bias, None)
    }

    /// Logits `[1, T, V]` for `input_ids` `[1, T]` following the cached positions,
    /// appending their keys and values to the cache.
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = input_ids.dims2().map_err(ce)?;
        let past = cache.len();
        let mask = vec![1u32; past + t];
        let bias = self.attention_bias(1, t, past, &mask)?;
        if cache.layers.len() != self.cfg.num_layers {
            cache.layers = (0..self.cfg.num_layers).map(|_| None).collect();
        }
        self.run(input_ids, past, &bias, Some(cache))
    }

    /// Additive attention bias `[B, 1, T, past+T]`: 0 where query i (at position
    /// past+i) may attend key j, a large negative number elsewhere.
    fn attention_bias(&self, b: usize, t: usize, past: usize, key_mask: &[u32]) -> Result<Tensor> {
        let s = past + t;
        let mut bias = vec![0f32; b * t * s];
        for bi in 0..b {
            for i in 0..t {
                let qpos = past + i;
                for j in 0..s {
                    let allowed = j <= qpos
                        && key_mask[bi * s + j] != 0
                        && self.cfg.sliding_window.is_none_or(|w| qpos - j < w);
                    if !allowed {
                        bias[(bi * t + i) * s + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(bias, (b, 1, t, s), &self.device).map_err(ce)
    }

    /// The compute dtype (the embeddings' dtype).
    fn dtype(&self) -> DType {
        self.weights["model.embed_tokens.weight"].dtype()
    }

    /// RoPE tables `[T, d]` for positions `past..past+T`.
    fn rope_tables(&self, past: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.head_dim;
        let half = d / 2;
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for p in past..past + t {
            for k in 0..d {
                let i = k % half;
                let freq = 1.0 / self.cfg.rope_theta.powf(2.0 * i as f64 / d as f64);
                let a = p as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let dt = self.dtype();
        let cos = Tensor::from_vec(cos, (t, d), &self.device)
            .and_then(|c| c.to_dtype(dt))
            .map_err(ce)?;
        let sin = Tensor::from_vec(sin, (t, d), &self.device)
            .and_then(|s| s.to_dtype(dt))
            .map_err(ce)?;
        Ok((cos, sin))
    }

    fn run(
        &self,
        input_ids: &Tensor,
        past: usize,
        bias: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().map_err(ce)?;
        let cfg = &self.cfg;
        let ids = input_ids
            .to_dtype(DType::U32)
            .and_then(|x| x.flatten_all())
            .map_err(ce)?;
        let mut x = self
            .w("model.embed_tokens.weight")?
            .index_select(&ids, 0)
            .and_then(|e| e.reshape((b, t, cfg.hidden_size)))
            .map_err(ce)?;
        let (cos, sin) = self.rope_tables(past, t)?;
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.layer(&p, &x, &cos, &sin, bias, kv).map_err(ce)?;
        }
        let x = self
            .norm(&x, self.w("model.norm.weight")?, self.vars.is_empty())
            .map_err(ce)?;
        linear(&x, self.lm_head()?)
            .and_then(|l| l.to_dtype(DType::F32))
            .map_err(ce)
    }

    fn layer(
        &self,
        p: &str,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let w = |n: &str| {
            self.weights
                .get(&format!("{p}.{n}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("{p}.{n} missing")))
        };
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let fused = self.vars.is_empty();
        let h = self.norm(x, w("input_layernorm.weight")?, fused)?;
        let q = linear(&h, w("self_attn.q_proj.weight")?)?
            .reshape((b, t, nh, d))?
            .transpose(1, 2)?;
        let k = linear(&h, w("self_attn.k_proj.weight")?)?
            .reshape((b, t, nkv, d))?
            .transpose(1, 2)?;
        let v = linear(&h, w("self_attn.v_proj.weight")?)?
            .reshape((b, t, nkv, d))?
            .transpose(1, 2)?;
        let q = self.rope(&q, cos, sin, fused)?;
        let mut k = self.rope(&k, cos, sin, fused)?;
        let mut v = v.contiguous()?;
        if let Some(slot) = kv {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let rep = nh / nkv;
        let k = repeat_kv(&k, rep)?;
        let v = repeat_kv(&v, rep)?;
        let scale = 1.0 / (d as f64).sqrt();
        // scale q (T·d values) rather than the scores (T·S values)
        // scores and softmax in f32 whatever the compute dtype (the bias is f32)
        let att = (q * scale)?
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let att = if fused {
            candle_nn::ops::softmax_last_dim(&att)?
        } else {
            softmax(&att)?
        };
        let att = att.to_dtype(v.dtype())?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * d))?;
        let x = (x + linear(&o, w("self_attn.o_proj.weight")?)?)?;
        let h = self.norm(&x, w("post_attention_layernorm.weight")?, fused)?;
        let f = if cfg.flavour == Flavour::Mixtral {
            self.moe(p, &h)?
        } else {
            mlp(
                &h,
                w("mlp.gate_proj.weight")?,
                w("mlp.up_proj.weight")?,
                w("mlp.down_proj.weight")?,
            )?
        };
        x + f
    }

    /// RMSNorm with its statistics in f32, returned in the compute dtype.
    fn norm(&self, x: &Tensor, w: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let dt = x.dtype();
        let (x32, w32) = (x.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?);
        let y = if fused {
            candle_nn::ops::rms_norm(&x32.contiguous()?, &w32, self.cfg.rms_norm_eps as f32)?
        } else {
            rms_norm(&x32, &w32, self.cfg.rms_norm_eps)?
        };
        y.to_dtype(dt)
    }

    fn rope(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        if fused {
            let half = self.cfg.head_dim / 2;
            let (c, s) = (
                cos.narrow(1, 0, half)?.contiguous()?,
                sin.narrow(1, 0, half)?.contiguous()?,
            );
            candle_nn::rotary_emb::rope(&x.contiguous()?, &c, &s)
        } else {
            rope(x, cos, sin)
        }
    }

    /// Sparse MoE: each token goes to its top-k experts, weighted by the router's
    /// renormalised probabilities. Selection is discrete; the weights keep their gradient.
    fn moe(&self, p: &str, h: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, hd) = h.dims3()?;
        let x = h.reshape((b * t, hd))?;
        let gate = &self.weights[&format!("{p}.block_sparse_moe.gate.weight")];
        // [N, E] router probabilities in f32 (small: always the differentiable form)
        let probs = softmax(&linear(&x, gate)?.to_dtype(DType::F32)?)?;
        let pv: Vec<Vec<f32>> = probs.to_vec2()?;
        let k = cfg.experts_per_token;
        let mut chosen = Vec::with_capacity(b * t * k);
        for row in &pv {
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|a, c| row[*c].total_cmp(&row[*a]).then(a.cmp(c)));
            chosen.extend(idx[..k].iter().map(|i| *i as u32));
        }
        let chosen_t = Tensor::from_vec(chosen.clone(), (b * t, k), x.device())?;
        let top = probs.gather(&chosen_t, 1)?; // [N, k]
        let top = top.broadcast_div(&top.sum_keepdim(1)?)?;
        let mut out = x.zeros_like()?;
        for e in 0..cfg.num_experts {
            let (mut rows, mut slots) = (Vec::new(), Vec::new());
            for (n, c) in chosen.chunks(k).enumerate() {
                if let Some(s) = c.iter().position(|x| *x as usize == e) {
                    rows.push(n as u32);
                    slots.push((n * k + s) as u32);
                }
            }
            if rows.is_empty() {
                continue;
            }
            let rows_t = Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
            let slots_t = Tensor::from_vec(slots, rows.len(), x.device())?;
            let xe = x.index_select(&rows_t, 0)?;
            let ex = format!("{p}.block_sparse_moe.experts.{e}");
            let ye = mlp(
                &xe,
                &self.weights[&format!("{ex}.w1.weight")],
                &self.weights[&format!("{ex}.w3.weight")],
                &self.weights[&format!("{ex}.w2.weight")],
            )?;
            let we = top
                .flatten_all()?
                .index_select(&slots_t, 0)?
                .unsqueeze(1)?
                .to_dtype(ye.dtype())?;
            out = out.index_add(&rows_t, &ye.broadcast_mul(&we)?, 0)?;
        }
        out.reshape((b, t, hd))
    }

    /// Current weights as f32 vectors, in checkpoint order (for saving).
    pub fn tensors(&self) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        self.names
            .iter()
            .map(|n| {
                let t = &self.weights[n];
                let v = t
                    .flatten_all()
                    .and_then(|x| x.to_dtype(DType::F32))
                    .and_then(|x| x.to_vec1::<f32>())
                    .map_err(ce)?;
                Ok((n.clone(), t.dims().to_vec(), v))
            })
            .collect()
    }

    /// Save the (trained) weights as an HF model directory, written atomically,
    /// with config.json and the tokenizer files of the directory it was loaded from.
    pub fn save(&self, out: &Path, dtype: fusechat_core::io::dtype::DType) -> Result<()> {
        fusechat_core::io::hf_dir::write_hf_dir(
            out,
            &self.config_json,
            &self.tensors()?,
            dtype,
            fusechat_core::io::writer::DEFAULT_MAX_SHARD_SIZE,
            Some(&self.dir),
        )
    }
}

/// `x · Wᵀ` for a weight `W` of shape `[out, in]`. The leading dimensions of `x`
/// are flattened so that the whole batch is one GEMM (larger panels than one
/// GEMM per sequence).
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has a last dimension") = w.dim(0)?;
    y.reshape(out)
}

/// RMSNorm from differentiable ops, accumulated in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Softmax over the last dimension from differentiable ops (the max shift is a constant).
pub fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (u32), from
/// differentiable ops: `−mean(log_softmax(logits)[i, targets[i]])`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let n = targets.dim(0)?;
    z.broadcast_sub(&lse)?
        .gather(&targets.reshape((n, 1))?, 1)?
        .mean_all()?
        .neg()
}

/// Rotary embedding on `[B, H, T, d]` with `cos`/`sin` `[T, d]` (rotate_half form).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `[B, kv, T, d]` → `[B, kv·rep, T, d]`, each key/value head repeated `rep` times.
fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return x.contiguous();
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, rep, t, d))?
        .contiguous()?
        .reshape((b, kv * rep, t, d))
}

/// SiLU-gated MLP: `down(silu(gate x) ⊙ up x)`.
fn mlp(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> candle_core::Result<Tensor> {
    // candle's silu has a backward
    linear(&(linear(x, gate)?.silu()? * linear(x, up)?)?, down)
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
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Decoder::forward(self, input_ids, attention_mask)
    }
    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Decoder::forward_cached(self, input_ids, cache)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }
    fn save(&self, out: &Path, dtype: fusechat_core::io::dtype::DType) -> Result<()> {
        Decoder::save(self, out, dtype)
    }
}

/// A flavour of the decoder as a `SourceModel` plugin (declared by mistral.rs, mixtral.rs, llama.rs).
pub struct Family {
    pub flavour: Flavour,
    pub description: &'static str,
}

impl SourceModel for Family {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Model,
            name: self.flavour.name().into(),
            description: self.description.into(),
            params: Vec::new(),
        }
    }
    fn detects(&self, config: &Value) -> bool {
        Flavour::detect(config) == Some(self.flavour)
    }
    fn load(&self, dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLm>> {
        Ok(Box::new(Decoder::load(dir, opts, Some(self.flavour))?))
    }
}
