//! `mixtral`: Mixtral (NH2-Mixtral-8x7B): Mistral's attention with a sparse
//! mixture-of-experts feed-forward. Each token goes to the `num_experts_per_tok`
//! experts with the highest router probabilities `softmax(W_gate x)` (ties to
//! the lower index), and their SiLU-MLP outputs are summed, weighted by those
//! probabilities renormalised over the chosen experts. The selection is
//! discrete; the weights keep their gradient.

use super::decoder::{
    required, Checkpoint, DecoderConfig, Experts, FeedForward, Flavour, FlavourSpec,
};
use super::llama::Mlp;
use super::mistral::read_sliding_window;
use candle_core::{DType, Tensor};
use fusechat_core::model::ops::{linear, softmax};
use fusechat_core::model::BuiltinModel;
use fusechat_core::{Error, Result};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

pub static SPEC: FlavourSpec = FlavourSpec {
    name: "mixtral",
    description:
        "Mixtral decoder (NH2-Mixtral-8x7B): sparse mixture-of-experts feed-forward, top-k routing",
    markers: &["mixtral"],
    read_config,
    ffn_weights: expert_weights,
    ffn: |cfg, p, ck| Ok(Box::new(SparseMoe::new(cfg, p, ck)?)),
};

fn read_config(v: &Value, file: &Path, cfg: &mut DecoderConfig) -> Result<()> {
    read_sliding_window(v, file, cfg)?;
    let num = required(v, "num_local_experts", file, "mixtral")?;
    let per_token = required(v, "num_experts_per_tok", file, "mixtral")?;
    if per_token > num {
        return Err(Error::config(
            file,
            format!("num_experts_per_tok ({per_token}) must be in 1..={num} (num_local_experts)"),
        ));
    }
    cfg.experts = Some(Experts { num, per_token });
    Ok(())
}

fn experts_of(cfg: &DecoderConfig) -> Experts {
    cfg.experts
        .expect("read_config sets the experts of a mixtral config")
}

fn expert_weights(cfg: &DecoderConfig, p: &str) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let e = experts_of(cfg);
    let mut w = vec![(format!("{p}.block_sparse_moe.gate.weight"), vec![e.num, h])];
    for e in 0..e.num {
        let x = format!("{p}.block_sparse_moe.experts.{e}");
        w.push((format!("{x}.w1.weight"), vec![i, h]));
        w.push((format!("{x}.w2.weight"), vec![h, i]));
        w.push((format!("{x}.w3.weight"), vec![i, h]));
    }
    w
}

/// The router and the experts of one layer.
pub struct SparseMoe {
    gate: Tensor,
    /// `w1` is the gate projection, `w3` the up projection, `w2` the down projection.
    experts: Vec<Mlp>,
    per_token: usize,
}

impl SparseMoe {
    fn new(cfg: &DecoderConfig, p: &str, ck: &Checkpoint) -> Result<SparseMoe> {
        let e = experts_of(cfg);
        let experts = (0..e.num)
            .map(|e| {
                let x = format!("{p}.block_sparse_moe.experts.{e}");
                Ok(Mlp {
                    gate: ck.get(&format!("{x}.w1.weight"))?,
                    up: ck.get(&format!("{x}.w3.weight"))?,
                    down: ck.get(&format!("{x}.w2.weight"))?,
                    gate_up: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SparseMoe {
            gate: ck.get(&format!("{p}.block_sparse_moe.gate.weight"))?,
            experts,
            per_token: e.per_token,
        })
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, hd) = h.dims3()?;
        let x = h.reshape((b * t, hd))?;
        // [N, E] router probabilities in f32 (small: always the differentiable form)
        let probs = softmax(&linear(&x, &self.gate)?.to_dtype(DType::F32)?)?;
        let pv: Vec<Vec<f32>> = probs.to_vec2()?;
        let k = self.per_token;
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
        for (e, expert) in self.experts.iter().enumerate() {
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
            let ye = expert.forward(&x.index_select(&rows_t, 0)?)?;
            let we = top
                .flatten_all()?
                .index_select(&slots_t, 0)?
                .unsqueeze(1)?
                .to_dtype(ye.dtype())?;
            out = out.index_add(&rows_t, &ye.broadcast_mul(&we)?, 0)?;
        }
        out.reshape((b, t, hd))
    }
}

inventory::submit! { BuiltinModel(|| Arc::new(Flavour::Mixtral)) }
