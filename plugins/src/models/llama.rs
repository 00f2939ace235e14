//! `llama`: the Llama architecture (Llama 2, Solar 10.7B with 48 layers): the
//! shared decoder with a dense SiLU-gated MLP, `W_down (silu(W_gate x) ⊙ W_up x)`,
//! and full causal attention (config.json's `sliding_window`, if any, is ignored).

use super::decoder::{Checkpoint, DecoderConfig, FeedForward, Flavour, FlavourSpec};
use candle_core::Tensor;
use fusechat_core::model::ops::{linear, silu_mul, silu_mul_halves};
use fusechat_core::model::BuiltinModel;
use fusechat_core::Result;
use std::sync::Arc;

pub static SPEC: FlavourSpec = FlavourSpec {
    name: "llama",
    description: "Llama-architecture decoder (Llama 2, Solar 10.7B with 48 layers): dense SiLU MLP, GQA, RoPE",
    markers: &["llama", "solar"],
    read_config: |_, _, _| Ok(()),
    ffn_weights: dense_weights,
    ffn: |_, p, ck| Ok(Box::new(Mlp::dense(ck, p)?)),
};

/// SiLU-gated MLP: `down(silu(gate x) ⊙ up x)`.
pub struct Mlp {
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// `[gate; up]` stacked, when the decoder loaded it for inference: one
    /// product instead of two.
    pub gate_up: Option<Tensor>,
}

impl Mlp {
    /// The dense MLP of layer `p` (`mlp.{gate,up,down}_proj`).
    pub fn dense(ck: &Checkpoint, p: &str) -> Result<Mlp> {
        Ok(Mlp {
            gate: ck.get(&format!("{p}.mlp.gate_proj.weight"))?,
            up: ck.get(&format!("{p}.mlp.up_proj.weight"))?,
            down: ck.get(&format!("{p}.mlp.down_proj.weight"))?,
            gate_up: ck.get_opt(&format!("{p}.mlp.gate_up_proj.weight")),
        })
    }
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = match &self.gate_up {
            Some(w) => silu_mul_halves(&linear(x, w)?)?,
            None => silu_mul(&linear(x, &self.gate)?, &linear(x, &self.up)?)?,
        };
        linear(&h, &self.down)
    }
}

/// The dense MLP's weights of layer `p`, shared with `mistral`.
pub fn dense_weights(cfg: &DecoderConfig, p: &str) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    vec![
        (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
    ]
}

inventory::submit! { BuiltinModel(|| Arc::new(Flavour::Llama)) }
