//! The `SourceModel` extension point: a causal-LM family that loads an HF
//! model directory into a [`CausalLm`], which gives logits for every position
//! of a padded batch, trains (its weights are candle `Var`s), and generates
//! with a KV cache. [`ops`] holds the differentiable ops that models, losses
//! and trainers share.

pub mod generate;
pub mod ops;

use crate::plugin::registry::PluginInfo;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::path::Path;
use std::sync::Arc;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Make the weights trainable `Var`s.
    pub trainable: bool,
    /// With `trainable`: weights whose name contains any of these stay frozen.
    pub freeze: Vec<String>,
    /// Weight and activation dtype; `None`: f32 on CPU, bf16 on CUDA. Softmax,
    /// RMSNorm statistics and the returned logits are always f32.
    pub dtype: Option<candle_core::DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            trainable: false,
            freeze: Vec::new(),
            dtype: None,
        }
    }
}

impl LoadOptions {
    /// The compute dtype these options resolve to.
    pub fn compute_dtype(&self) -> candle_core::DType {
        self.dtype.unwrap_or(if self.device.is_cpu() {
            candle_core::DType::F32
        } else {
            candle_core::DType::BF16
        })
    }
}

/// Check a device name's form (`cpu` or `cuda:N`) without opening it, so
/// that a config meant for a GPU machine can be checked anywhere.
pub fn check_device(s: &str) -> Result<()> {
    let cuda_ok = s
        .strip_prefix("cuda:")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if s == "cpu" || s == "cuda" || cuda_ok {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "unknown device `{s}` (use cpu or cuda:N)"
        )))
    }
}

/// Parse a device name: `cpu`, or `cuda:N` in a build with the `cuda` feature.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            #[cfg(feature = "cuda")]
            {
                let n: usize = s
                    .strip_prefix("cuda:")
                    .unwrap_or("0")
                    .parse()
                    .map_err(|_| Error::msg(format!("bad device `{s}` (use cuda:N)")))?;
                Device::new_cuda(n).map_err(|e| Error::msg(format!("cannot open {s}: {e}")))
            }
            #[cfg(not(feature = "cuda"))]
            Err(Error::msg(format!("device `{s}`: this fusechat was built without the `cuda` feature (cargo build --features cuda)")))
        }
        other => Err(Error::msg(format!(
            "unknown device `{other}` (use cpu or cuda:N)"
        ))),
    }
}

/// A candle error as ours, without the backtrace candle appends under RUST_BACKTRACE.
pub fn candle_error(e: candle_core::Error) -> Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => Error::Candle(*inner),
        e => Error::Candle(e),
    }
}

/// Save named weights as an HF model directory, atomically: `config` (with
/// `torch_dtype` set to `dtype`), sharded safetensors, and the tokenizer files
/// of `tokenizer_from`. Tensors are converted one at a time.
pub fn save_hf_dir(
    out: &Path,
    config: &serde_json::Value,
    weights: &[(String, Tensor)],
    dtype: crate::io::dtype::DType,
    tokenizer_from: &Path,
) -> Result<()> {
    let shapes: Vec<(String, Vec<usize>)> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    crate::io::hf_dir::write_hf_dir_with(
        out,
        config,
        &shapes,
        dtype,
        crate::io::writer::DEFAULT_MAX_SHARD_SIZE,
        Some(tokenizer_from),
        |i| {
            weights[i]
                .1
                .flatten_all()
                .and_then(|x| x.to_dtype(candle_core::DType::F32))
                .and_then(|x| x.to_vec1::<f32>())
                .map(std::borrow::Cow::Owned)
                .map_err(candle_error)
        },
    )
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        candle_error(e)
    }
}

/// Per-layer key/value cache for generation.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<Option<LayerCache>>,
}

impl KvCache {
    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |c| c.len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's keys and values after RoPE, `[B, kv_heads, S, head_dim]`,
/// in buffers with room to grow: a step writes its new positions in place
/// (capacity doubles when full) instead of copying the whole cache.
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Append `[B, kv_heads, T, head_dim]` keys and values to `slot`; returns
    /// every cached position's (views, not copies).
    pub fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let t = k.dim(2)?;
        let len = slot.as_ref().map_or(0, |c| c.len);
        let cap = slot.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        if len + t > cap {
            let (b, h, _, d) = k.dims4()?;
            let cap = (2 * cap).max(len + t).max(64);
            let grown = LayerCache {
                k: Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?,
                v: Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?,
                len,
            };
            if let Some(old) = slot.as_ref() {
                grown
                    .k
                    .slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                grown
                    .v
                    .slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(grown);
        }
        let c = slot.as_mut().expect("allocated above");
        c.k.slice_set(&k, 2, c.len)?;
        c.v.slice_set(&v, 2, c.len)?;
        c.len += t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

/// A loaded causal language model.
pub trait CausalLm: Send + Sync {
    /// The family name (`llama`, `mistral`, `mixtral`, ...).
    fn family(&self) -> &str;
    fn vocab_size(&self) -> usize;
    fn device(&self) -> &Device;
    /// The directory it was loaded from (config, tokenizer and generation files).
    fn dir(&self) -> &Path;
    /// The final hidden states `[B, L, H]` (after the last norm) for every
    /// position; `attention_mask` `[B, L]` is 1 for tokens and 0 for right padding.
    fn hidden(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;
    /// Logits in f32 from final hidden states `[..., H]` (the LM head alone, so
    /// that callers can apply it to the positions they need).
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
    /// Logits `[B, L, V]` in f32 for every position; `attention_mask` `[B, L]` is 1
    /// for tokens and 0 for right padding.
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.logits(&self.hidden(input_ids, attention_mask)?)
    }
    /// Logits `[B, 1, V]` at the last of `input_ids` `[B, T]` (what predicts
    /// the next token), after the cached positions; extends the cache by T.
    /// `key_mask` holds `B × (past + T)` flags, 1 for a token and 0 for
    /// padding, so that a left-padded batch can share positions (RoPE sees
    /// only relative offsets); `None`: no padding.
    fn forward_cached(
        &self,
        input_ids: &Tensor,
        key_mask: Option<&[u32]>,
        cache: &mut KvCache,
    ) -> Result<Tensor>;
    /// The trainable weights, by checkpoint name.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Save the current weights as an HF model directory (atomically).
    fn save(&self, out: &Path, dtype: crate::io::dtype::DType) -> Result<()>;
}

/// A model family plugin.
pub trait SourceModel: Send + Sync {
    fn info(&self) -> PluginInfo;
    /// Whether this family reads a checkpoint with this config.json.
    fn detects(&self, config: &serde_json::Value) -> bool;
    fn load(&self, dir: &Path, opts: &LoadOptions) -> Result<Box<dyn CausalLm>>;
}

/// A built-in model family: `inventory::submit! { BuiltinModel(|| Arc::new(Mistral)) }`.
pub struct BuiltinModel(pub fn() -> Arc<dyn SourceModel>);
inventory::collect!(BuiltinModel);

/// Load a model directory with the family named `family`, or the one that
/// recognises its config.json.
pub fn load_model(
    registry: &crate::plugin::registry::Registry,
    dir: &Path,
    family: Option<&str>,
    opts: &LoadOptions,
) -> Result<Box<dyn CausalLm>> {
    let entry = match family {
        Some(f) => registry.model(f)?,
        None => {
            let cfg_path = dir.join("config.json");
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&cfg_path, format!("not valid JSON: {e}")))?;
            registry.detect_model(&cfg).ok_or_else(|| {
                Error::config(
                    &cfg_path,
                    format!(
                        "no model family recognises architectures = {}, model_type = {} (known: {}); pass the family explicitly if it is one of them",
                        cfg["architectures"], cfg["model_type"],
                        registry.models().iter().map(|m| m.info.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                )
            })?
        }
    };
    entry.plugin.load(dir, opts)
}
