//! `perplexity`: the mean cross-entropy of a model on the assistant tokens of
//! held-out conversations, and its exponential, over all tokens and per
//! `category`.
//!
//! Records are rendered and labelled exactly as for training (the template,
//! `max_length` truncation, labels on assistant turns only); position t is
//! scored when token t+1 is a label. The mean is over tokens, not records
//! (records with more answer tokens weigh more), and `n` is the token count.

use super::{bar, batch_param, int, load, template_param};
use candle_core::Tensor;
use fusechat_core::data::conversation;
use fusechat_core::data::repr::loss_positions;
use fusechat_core::data::represent::cross_entropy;
use fusechat_core::data::template::Encoded;
use fusechat_core::eval::{BuiltinEvaluator, EvalContext, Evaluation, Evaluator, Means};
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::model::{candle_error as ce, CausalLm};
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use fusechat_core::{Error, Result};
use std::path::Path;
use std::sync::Arc;

pub struct Perplexity;

impl Evaluator for Perplexity {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Evaluator,
            name: "perplexity".into(),
            description: "mean CE and perplexity over the assistant tokens of held-out conversations, per category".into(),
            params: vec![
                template_param(),
                ParamSpec::int("max_length", Scope::Shared)
                    .default(2048i64)
                    .range(2.0, 1_000_000.0)
                    .help("records are truncated to this many tokens, as in training"),
                batch_param(8),
            ],
        }
    }

    fn check(&self, p: &ResolvedParams, data: &Path) -> Result<()> {
        if p.str("template")? == "none" {
            return Err(Error::msg(
                "template = none: perplexity needs a chat template to find the assistant tokens",
            ));
        }
        conversation::load(data, false).map(|_| ())
    }

    fn evaluate(&self, ctx: &EvalContext<'_>, p: &ResolvedParams) -> Result<Evaluation> {
        let data = conversation::load(ctx.data, false)?;
        if !data.skipped.is_empty() {
            tracing::warn!(
                "{}: {} of {} records skipped (first: row {}: {})",
                ctx.data.display(),
                data.skipped.len(),
                data.total,
                data.skipped[0].row,
                data.skipped[0].reason
            );
        }
        let m = load(ctx, p)?;
        let template = m
            .template
            .as_ref()
            .ok_or_else(|| Error::msg("perplexity needs a chat template"))?;
        let max_length = int(p, "max_length")?;
        let encoded: Vec<Encoded> = data
            .records
            .iter()
            .map(|c| template.encode(&m.tok, c, max_length))
            .collect::<Result<_>>()?;
        let vocab = m.model.vocab_size();
        if let Some(id) = encoded
            .iter()
            .flat_map(|e| e.ids.iter())
            .find(|&&i| i as usize >= vocab)
        {
            return Err(Error::model(
                &ctx.model.dir,
                format!("the tokenizer produced id {id}, beyond the model's {vocab} logits"),
            ));
        }
        let sums = token_ce(
            m.model.as_ref(),
            &encoded,
            int(p, "batch_size")?,
            &bar(ctx, encoded.len() as u64, "perplexity"),
        )?;
        let mut means = Means::default();
        for (conv, (sum, n)) in data.records.iter().zip(sums) {
            means.add_n(conv.category.as_deref(), sum, n);
        }
        let name = &ctx.model.name;
        let mut rows = means.rows(name, "perplexity", "ce", |x| x);
        rows.extend(means.rows(name, "perplexity", "perplexity", f64::exp));
        Ok(rows.into())
    }
}

/// Each record's summed CE over its scored positions, and their count.
/// Records of similar length share a right-padded batch; the LM head runs on
/// the scored positions only.
pub fn token_ce(
    model: &dyn CausalLm,
    records: &[Encoded],
    batch_size: usize,
    pb: &indicatif::ProgressBar,
) -> Result<Vec<(f64, u64)>> {
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(records[i].ids.len()), i));
    let mut out = vec![(0.0, 0); records.len()];
    let dev = model.device();
    let vocab = model.vocab_size();
    for batch in order.chunks(batch_size.max(1)) {
        let l = records[batch[0]].ids.len().max(1);
        let b = batch.len();
        let mut ids = vec![0u32; b * l];
        let mut mask = vec![0u32; b * l];
        let mut flat = Vec::new();
        let mut targets = Vec::new();
        for (n, &r) in batch.iter().enumerate() {
            let e = &records[r];
            ids[n * l..n * l + e.ids.len()].copy_from_slice(&e.ids);
            mask[n * l..n * l + e.ids.len()].fill(1);
            for t in loss_positions(&e.labels) {
                flat.push((n * l + t) as u32);
                targets.push((r, e.ids[t + 1] as usize));
            }
        }
        pb.inc(b as u64);
        if flat.is_empty() {
            continue;
        }
        let ids = Tensor::from_vec(ids, (b, l), dev).map_err(ce)?;
        let mask = Tensor::from_vec(mask, (b, l), dev).map_err(ce)?;
        let hidden = model.hidden(&ids, &mask)?;
        let h = hidden.dim(2).map_err(ce)?;
        let positions = flat.len();
        let flat = Tensor::from_vec(flat, positions, dev).map_err(ce)?;
        let at = hidden
            .reshape((b * l, h))
            .and_then(|x| x.index_select(&flat, 0))
            .map_err(ce)?;
        let logits: Vec<f32> = model
            .logits(&at)?
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(ce)?;
        for (i, &(r, label)) in targets.iter().enumerate() {
            out[r].0 += cross_entropy(&logits[i * vocab..(i + 1) * vocab], label) as f64;
            out[r].1 += 1;
        }
    }
    pb.finish_and_clear();
    Ok(out)
}

inventory::submit! { BuiltinEvaluator(|| Arc::new(Perplexity)) }
