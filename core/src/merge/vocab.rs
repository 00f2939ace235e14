//! `tokenizer_source`: merging models whose vocabularies differ, as mergekit
//! does (`base`, `union`, or one model's tokenizer).
//!
//! Each input's vocabulary is read from its `tokenizer.json` (the model's
//! vocabulary and the added tokens), keeping the ids below the model's
//! `vocab_size`. The output vocabulary is the base's (or the first model's),
//! one model's, or the union: the base's tokens at their ids, then the tokens
//! of the other models that the base lacks (models in order, each in id
//! order; plain tokens first, then added ones, as mergekit appends them). The
//! output has exactly that many rows, with ids 0..n.
//!
//! Every vocabulary tensor (a non-layer matrix with one row per token: the
//! embeddings, lm_head) of every input is permuted to the output vocabulary by
//! token string. A token that a model lacks gets, in that model, mergekit's
//! default row: the row of the only model that has it; else the base's, when
//! the base has it; else the mean of the rows of the models that have it;
//! zeros when none has it. The method then merges the aligned rows as usual.

use crate::io::model_dir::ModelDir;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;

/// Where the output vocabulary comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    Base,
    Union,
    /// A model of the request, by its reference (as written) or path.
    Model(String),
}

impl TokenizerSource {
    pub fn parse(s: &str) -> TokenizerSource {
        match s {
            "base" => TokenizerSource::Base,
            "union" => TokenizerSource::Union,
            other => TokenizerSource::Model(other.to_string()),
        }
    }
    pub fn describe(&self) -> String {
        match self {
            TokenizerSource::Base => "base".into(),
            TokenizerSource::Union => "union".into(),
            TokenizerSource::Model(m) => m.clone(),
        }
    }
}

/// One model's vocabulary: the token at each id below its `vocab_size`, and
/// its `added_tokens` entries by content.
#[derive(Debug, Clone)]
pub struct Vocab {
    pub by_id: Vec<Option<String>>,
    pub ids: HashMap<String, usize>,
    pub added: HashMap<String, Value>,
}

/// Read a model's vocabulary from its tokenizer.json.
pub fn read_vocab(dir: &ModelDir) -> Result<Vocab> {
    let file = dir.path.join("tokenizer.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::msg(format!(
            "tokenizer_source needs each model's tokenizer.json, and `{}` cannot be read ({e}); add the fast tokenizer's file (transformers writes it with save_pretrained)",
            file.display()
        ))
    })?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("`{}` is not JSON: {e}", file.display())))?;
    let mut pairs: Vec<(String, usize)> = Vec::new();
    match &json["model"]["vocab"] {
        Value::Object(map) => {
            for (tok, id) in map {
                if let Some(id) = id.as_u64() {
                    pairs.push((tok.clone(), id as usize));
                }
            }
        }
        // Unigram: a list of [token, score], the id is the position
        Value::Array(list) => {
            for (id, entry) in list.iter().enumerate() {
                if let Some(tok) = entry.get(0).and_then(Value::as_str) {
                    pairs.push((tok.to_string(), id));
                }
            }
        }
        _ => {
            return Err(Error::msg(format!(
                "`{}` has no model.vocab that fusechat can read",
                file.display()
            )))
        }
    }
    let mut added = HashMap::new();
    for a in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(tok)) = (a["id"].as_u64(), a["content"].as_str()) {
            pairs.push((tok.to_string(), id as usize));
            added.insert(tok.to_string(), a.clone());
        }
    }
    let limit = dir.config["vocab_size"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(usize::MAX);
    let size = pairs
        .iter()
        .map(|(_, id)| id + 1)
        .filter(|n| *n <= limit)
        .max()
        .unwrap_or(0);
    let mut by_id = vec![None; size];
    let mut ids = HashMap::new();
    for (tok, id) in pairs {
        if id < size {
            ids.entry(tok.clone()).or_insert(id);
            by_id[id] = Some(tok);
        }
    }
    added.retain(|tok, _| ids.contains_key(tok));
    Ok(Vocab { by_id, ids, added })
}

/// The output vocabulary and where each model's rows come from.
#[derive(Debug, Clone)]
pub struct VocabPlan {
    pub source: TokenizerSource,
    /// Rows of every vocabulary tensor in the output.
    pub size: usize,
    /// Per opened model (the plan's model index): output id → the model's row, if it has the token.
    pub rows: Vec<Vec<Option<usize>>>,
    /// The base's model index, whose rows are the default for tokens it has.
    pub base: Option<usize>,
    /// The model whose tokenizer files are copied.
    pub files_from: usize,
    /// For `union`: the tokenizer.json to write (the base's, with the new tokens added).
    pub tokenizer_json: Option<String>,
}

/// Build the output vocabulary. `models` are the opened inputs, `base` the
/// index of the base (else the first model's), `chosen` the index of the
/// model named by `TokenizerSource::Model`.
pub fn plan(
    source: &TokenizerSource,
    models: &[&ModelDir],
    base: Option<usize>,
    chosen: Option<usize>,
) -> Result<VocabPlan> {
    let vocabs: Vec<Vocab> = models
        .iter()
        .map(|m| read_vocab(m))
        .collect::<Result<_>>()?;
    let lead = base.unwrap_or(0);
    let (out, files_from, tokenizer_json): (Vec<String>, usize, Option<String>) = match source {
        TokenizerSource::Base => (contiguous(&vocabs[lead], models[lead])?, lead, None),
        TokenizerSource::Model(_) => {
            let c = chosen.expect("the planner resolves the model");
            (contiguous(&vocabs[c], models[c])?, c, None)
        }
        TokenizerSource::Union => {
            let mut out = contiguous(&vocabs[lead], models[lead])?;
            let mut seen: std::collections::HashSet<String> = out.iter().cloned().collect();
            let order: Vec<usize> = std::iter::once(lead)
                .chain((0..models.len()).filter(|&i| i != lead))
                .collect();
            let mut new_added: Vec<Value> = Vec::new();
            let mut new_plain: Vec<String> = Vec::new();
            for &m in &order {
                for tok in vocabs[m].by_id.iter().flatten() {
                    if seen.contains(tok) {
                        continue;
                    }
                    seen.insert(tok.clone());
                    match vocabs[m].added.get(tok) {
                        Some(entry) => new_added.push(entry.clone()),
                        None => new_plain.push(tok.clone()),
                    }
                }
            }
            let base_file = models[lead].path.join("tokenizer.json");
            let text = std::fs::read_to_string(&base_file).map_err(|e| Error::io(&base_file, e))?;
            let mut json: Value = serde_json::from_str(&text)
                .map_err(|e| Error::msg(format!("`{}`: {e}", base_file.display())))?;
            let list = json["added_tokens"].as_array_mut();
            let mut added_list = list.map(std::mem::take).unwrap_or_default();
            for tok in new_plain {
                added_list.push(serde_json::json!({
                    "id": out.len(), "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": true, "special": false
                }));
                out.push(tok);
            }
            for mut entry in new_added {
                let tok = entry["content"].as_str().unwrap_or_default().to_string();
                entry["id"] = serde_json::json!(out.len());
                added_list.push(entry);
                out.push(tok);
            }
            json["added_tokens"] = Value::Array(added_list);
            let text = serde_json::to_string_pretty(&json).expect("JSON value");
            (out, lead, Some(text))
        }
    };
    let rows = vocabs
        .iter()
        .map(|v| out.iter().map(|tok| v.ids.get(tok).copied()).collect())
        .collect();
    Ok(VocabPlan {
        source: source.clone(),
        size: out.len(),
        rows,
        base,
        files_from,
        tokenizer_json,
    })
}

/// A vocabulary as a list of tokens by id, which must leave no id unused.
fn contiguous(v: &Vocab, dir: &ModelDir) -> Result<Vec<String>> {
    v.by_id
        .iter()
        .enumerate()
        .map(|(id, t)| {
            t.clone().ok_or_else(|| {
                Error::msg(format!(
                    "the tokenizer of `{}` has no token with id {id} (below its vocab_size): fusechat cannot lay out an output vocabulary with a gap",
                    dir.path.display()
                ))
            })
        })
        .collect()
}

impl VocabPlan {
    /// Align one vocabulary tensor of several models (`(model index, rows)`,
    /// each `rows × width`) to the output vocabulary: one `size × width`
    /// buffer per input, in input order, with mergekit's default rows for the
    /// tokens an input lacks.
    pub fn align(&self, inputs: &[(usize, &[f32])], width: usize) -> Vec<Vec<f32>> {
        let mut defaults: HashMap<usize, Vec<f32>> = HashMap::new();
        for id in 0..self.size {
            let have: Vec<(usize, usize)> = inputs
                .iter()
                .enumerate()
                .filter_map(|(k, (m, _))| self.rows[*m][id].map(|r| (k, r)))
                .collect();
            if have.len() == inputs.len() {
                continue;
            }
            let row = |k: usize, r: usize| &inputs[k].1[r * width..(r + 1) * width];
            let base_row = self.base.and_then(|b| {
                inputs
                    .iter()
                    .position(|(m, _)| *m == b)
                    .and_then(|k| self.rows[b][id].map(|r| row(k, r).to_vec()))
            });
            let default = match have.len() {
                0 => vec![0.0; width],
                1 => row(have[0].0, have[0].1).to_vec(),
                n => base_row.unwrap_or_else(|| {
                    let mut acc = vec![0f32; width];
                    for &(k, r) in &have {
                        acc.iter_mut().zip(row(k, r)).for_each(|(a, x)| *a += x);
                    }
                    acc.iter_mut().for_each(|a| *a /= n as f32);
                    acc
                }),
            };
            defaults.insert(id, default);
        }
        inputs
            .iter()
            .map(|(m, data)| {
                let mut out = vec![0f32; self.size * width];
                for (id, dst) in out.chunks_mut(width).enumerate() {
                    match self.rows[*m][id] {
                        Some(r) => dst.copy_from_slice(&data[r * width..(r + 1) * width]),
                        None => dst.copy_from_slice(&defaults[&id]),
                    }
                }
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(rows: Vec<Vec<Option<usize>>>, base: Option<usize>) -> VocabPlan {
        VocabPlan {
            source: TokenizerSource::Union,
            size: rows[0].len(),
            rows,
            base,
            files_from: 0,
            tokenizer_json: None,
        }
    }

    #[test]
    fn missing_rows_take_mergekits_defaults() {
        // output tokens: 0 all have; 1 only model 2; 2 models 1 and 2 (not the base 0);
        // 3 base and model 2; 4 nobody
        let p = plan_of(
            vec![
                vec![Some(0), None, None, Some(1), None],
                vec![Some(0), None, Some(1), None, None],
                vec![Some(0), Some(1), Some(2), Some(3), None],
            ],
            Some(0),
        );
        let m0 = [1.0, 1.0, 2.0, 2.0];
        let m1 = [3.0, 3.0, 4.0, 4.0];
        let m2 = [5.0, 5.0, 6.0, 6.0, 7.0, 7.0, 8.0, 8.0];
        let out = p.align(&[(0, &m0), (1, &m1), (2, &m2)], 2);
        // token 1: the only donor (model 2's row 1); token 2: the mean of models 1 and 2;
        // token 3: the base's; token 4: zeros
        assert_eq!(
            out[0],
            vec![1.0, 1.0, 6.0, 6.0, 5.5, 5.5, 2.0, 2.0, 0.0, 0.0]
        );
        assert_eq!(
            out[1],
            vec![3.0, 3.0, 6.0, 6.0, 4.0, 4.0, 2.0, 2.0, 0.0, 0.0]
        );
        assert_eq!(
            out[2],
            vec![5.0, 5.0, 6.0, 6.0, 7.0, 7.0, 8.0, 8.0, 0.0, 0.0]
        );
    }
}
