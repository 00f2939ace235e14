//! The `VocabAligner` extension point and the `align` stage (SPEC §3): map a
//! source model's representation onto the pivot's rows, loss positions and
//! token ids.
//!
//! An aligner sees one row at a time: the pivot's tokens and labels, and the
//! source's tokens, labels and top-k (both rendered from the same record), plus
//! the two vocabularies ([`VocabPair`]). It returns k entries for each pivot
//! loss position. Entries it cannot fill get logit −∞, so they weigh nothing in
//! the teacher's softmax.
//!
//! Rows are paired by row id. The output is a representation directory in the
//! same format as `represent`'s, with the pivot's rows, tokens and positions,
//! the source's `metric_ce`, and an `aligned` record in its manifest.

use crate::data::repr::{loss_positions, Manifest, ReprDir, RowView, Shard};
use crate::merge::params::{ResolvedParams, Scalar};
use crate::plugin::registry::{PluginInfo, Registry};
use crate::{Error, Result};
use half::f16;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How an aligned row's loss positions were filled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlignStats {
    /// Positions whose source top-k was carried over (`equal_token + vocab_map`).
    pub transferred: u64,
    /// Transferred because the pivot and source tokens are equal (markers normalised).
    pub equal_token: u64,
    /// Transferred because the vocabulary map sends the source token to the pivot token (soft mode).
    pub vocab_map: u64,
    /// Of the transferred, those whose source position is also aligned with a
    /// neighbouring pivot position (FuseLLM's rule transfers them; a mutual
    /// one-to-one rule would not).
    pub shared_source: u64,
    /// Positions that fell back to one-hot on the label (or current token).
    pub fallback: u64,
    /// Top-k entries dropped because no pivot token matched.
    pub dropped_tokens: u64,
}

impl AlignStats {
    pub fn add(&mut self, o: &AlignStats) {
        self.transferred += o.transferred;
        self.equal_token += o.equal_token;
        self.vocab_map += o.vocab_map;
        self.shared_source += o.shared_source;
        self.fallback += o.fallback;
        self.dropped_tokens += o.dropped_tokens;
    }

    /// The manifest's record of these counts.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "transferred": self.transferred,
            "fallback": self.fallback,
            "dropped_tokens": self.dropped_tokens,
            "transferred_by_rule": {
                "equal_token": self.equal_token,
                "vocab_map": self.vocab_map,
                "shared_source": self.shared_source,
            },
        })
    }
}

/// One aligned row: `k` entries per pivot loss position, descending.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignedRow {
    pub topk_ids: Vec<u32>,
    pub topk_logits: Vec<f16>,
    pub stats: AlignStats,
}

/// A vocabulary aligner plugin.
pub trait VocabAligner: Send + Sync {
    fn info(&self) -> PluginInfo;
    /// Checks on the vocabulary pair, once before any row.
    fn check(&self, _vocabs: &VocabPair, _params: &ResolvedParams) -> Result<()> {
        Ok(())
    }
    /// Align one row; `k` entries per pivot loss position.
    fn align(
        &self,
        vocabs: &VocabPair,
        params: &ResolvedParams,
        pivot: &RowView<'_>,
        source: &RowView<'_>,
        k: usize,
    ) -> Result<AlignedRow>;
}

/// A built-in aligner: `inventory::submit! { BuiltinAligner(|| Arc::new(Exact)) }`.
pub struct BuiltinAligner(pub fn() -> Arc<dyn VocabAligner>);
inventory::collect!(BuiltinAligner);

/// One vocabulary: token strings by id and their text.
#[derive(Debug, Clone)]
pub struct Vocab {
    /// The token string of each id (`""` for ids the tokenizer does not use).
    pub tokens: Vec<String>,
    /// The bytes each token stands for in text: SentencePiece `▁` and byte-level
    /// `Ġ` become spaces, `<0xNN>` and byte-level characters become their bytes.
    /// Added special tokens (BOS, end of turn, ...) stand for nothing.
    pub text: Vec<Vec<u8>>,
    /// Normalised token text → the lowest id of a piece with that text, else
    /// of a byte-fallback token.
    pub by_text: HashMap<Vec<u8>, u32>,
    pub special: Vec<bool>,
}

/// GPT-2's byte ↔ unicode table, inverted: the byte each byte-level character stands for.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (char::from_u32(c).expect("valid scalar"), b as u8))
        .collect()
}

impl Vocab {
    /// Build from token strings; `special` marks added special tokens.
    pub fn new(tokens: Vec<String>, special: Vec<bool>) -> Vocab {
        // A byte-level vocabulary writes spaces as `Ġ` and has no `▁` pieces.
        let g = tokens.iter().filter(|t| t.starts_with('\u{120}')).count();
        let sp = tokens.iter().filter(|t| t.starts_with('\u{2581}')).count();
        let byte_level = g > sp;
        let dec = byte_level_decoder();
        let text: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&special)
            .map(|(t, &s)| {
                if s {
                    Vec::new()
                } else if byte_level {
                    t.chars()
                        .flat_map(|c| match dec.get(&c) {
                            Some(b) => vec![*b],
                            None => c.to_string().into_bytes(),
                        })
                        .collect()
                } else if let Some(b) = parse_byte_token(t) {
                    vec![b]
                } else {
                    t.replace('\u{2581}', " ").into_bytes()
                }
            })
            .collect();
        // Specials match by their own string, everything else by text; the
        // first id wins, except that a piece the tokenizer produces (`h`) wins
        // over a byte-fallback token with the same byte (`<0x68>`): byte
        // tokens only fill what no piece has.
        let mut by_text = HashMap::new();
        let is_byte = |i: usize| !byte_level && parse_byte_token(&tokens[i]).is_some();
        for bytes_pass in [false, true] {
            for (i, (t, s)) in text.iter().zip(&special).enumerate() {
                if is_byte(i) != bytes_pass {
                    continue;
                }
                let key = if *s {
                    tokens[i].clone().into_bytes()
                } else {
                    t.clone()
                };
                if !key.is_empty() {
                    by_text.entry(key).or_insert(i as u32);
                }
            }
        }
        Vocab {
            tokens,
            text,
            by_text,
            special,
        }
    }

    /// The vocabulary of a tokenizer (added tokens included).
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer) -> Vocab {
        let vocab = tok.get_vocab(true);
        let n = vocab.values().max().map_or(0, |m| *m as usize + 1);
        let mut tokens = vec![String::new(); n];
        for (t, id) in vocab {
            tokens[id as usize] = t;
        }
        let mut special = vec![false; n];
        for (id, added) in tok.get_added_tokens_decoder() {
            if added.special && (id as usize) < n {
                special[id as usize] = true;
            }
        }
        Vocab::new(tokens, special)
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The key a token is matched by in another vocabulary.
    pub fn key(&self, id: u32) -> Vec<u8> {
        let i = id as usize;
        match self.special.get(i) {
            Some(true) => self.tokens[i].clone().into_bytes(),
            Some(false) => self.text[i].clone(),
            None => Vec::new(),
        }
    }
}

/// `<0x0A>` → 0x0A (SentencePiece byte fallback).
fn parse_byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// The pivot and source vocabularies, with lazily mined nearest-token maps.
pub struct VocabPair {
    pub pivot: Vocab,
    pub source: Vocab,
    nearest: Mutex<HashMap<u32, u32>>,
    /// The pivot's ordinary tokens as chars, built on the first `nearest` call.
    pivot_chars: std::sync::OnceLock<Vec<(u32, Vec<char>)>>,
}

impl VocabPair {
    pub fn new(pivot: Vocab, source: Vocab) -> VocabPair {
        VocabPair {
            pivot,
            source,
            nearest: Mutex::new(HashMap::new()),
            pivot_chars: std::sync::OnceLock::new(),
        }
    }

    /// The pivot token with exactly this source token's text (markers normalised).
    pub fn exact(&self, source_id: u32) -> Option<u32> {
        let key = self.source.key(source_id);
        if key.is_empty() {
            return None;
        }
        self.pivot.by_text.get(&key).copied()
    }

    /// The exact match, else the pivot token at minimum `distance` from the
    /// source token's text (ties: the lowest id), computed once per token.
    /// `distance` compares texts as chars (`▁`/`Ġ` already turned into spaces).
    pub fn nearest(
        &self,
        source_id: u32,
        distance: impl Fn(&[char], &[char]) -> usize,
    ) -> Option<u32> {
        if let Some(p) = self.exact(source_id) {
            return Some(p);
        }
        if let Some(p) = self.nearest.lock().expect("not poisoned").get(&source_id) {
            return Some(*p);
        }
        let pivot = self.pivot_chars.get_or_init(|| {
            (0..self.pivot.len())
                .filter(|&i| !self.pivot.special[i] && !self.pivot.tokens[i].is_empty())
                .map(|i| {
                    (
                        i as u32,
                        String::from_utf8_lossy(&self.pivot.text[i])
                            .chars()
                            .collect(),
                    )
                })
                .collect()
        });
        let s: Vec<char> = String::from_utf8_lossy(self.source.text.get(source_id as usize)?)
            .chars()
            .collect();
        let best = pivot.iter().map(|(i, t)| (distance(&s, t), *i)).min()?.1;
        self.nearest
            .lock()
            .expect("not poisoned")
            .insert(source_id, best);
        Some(best)
    }
}

/// What `fusechat align` runs on.
#[derive(Debug, Clone)]
pub struct AlignOptions {
    pub pivot: PathBuf,
    pub source: PathBuf,
    /// Tokenizer directories; `None`: the model directories the manifests name.
    pub pivot_tokenizer: Option<PathBuf>,
    pub source_tokenizer: Option<PathBuf>,
    pub aligner: String,
    pub params: BTreeMap<String, Scalar>,
    pub out: PathBuf,
    pub force: bool,
}

/// The result of an `align` run.
#[derive(Debug, Clone)]
pub struct AlignOutcome {
    pub manifest: Manifest,
    pub stats: AlignStats,
    pub up_to_date: bool,
    pub seconds: f64,
}

impl AlignOutcome {
    /// One line about the run (without the stage name), naming its output `out`.
    pub fn summary(&self, out: &Path) -> String {
        if self.up_to_date {
            return format!("{} is up to date", out.display());
        }
        format!(
            "{} positions took the source's top-k ({} equal tokens, {} through the vocabulary map), {} fell back to one-hot on the label, {} top-k tokens dropped; {:.2}s; {}",
            self.stats.transferred,
            self.stats.equal_token,
            self.stats.vocab_map,
            self.stats.fallback,
            self.stats.dropped_tokens,
            self.seconds,
            out.display()
        )
    }
}

impl FilterReport {
    /// One line about the filter (without the stage name).
    pub fn summary(&self) -> String {
        let listed = if self.dropped.is_empty() {
            String::new()
        } else {
            format!(
                " (rows {:?}{})",
                &self.dropped[..self.dropped.len().min(10)],
                if self.dropped.len() > 10 { ", ..." } else { "" }
            )
        };
        format!(
            "dropped {} of {} rows with a NaN metric_ce{listed}",
            self.dropped.len(),
            self.rows
        )
    }
}

fn tokenizer_dir(given: &Option<PathBuf>, m: &Manifest) -> PathBuf {
    given.clone().unwrap_or_else(|| m.model.clone())
}

/// The stage key: the two representations' keys, the aligner and its parameters.
fn stage_key(o: &AlignOptions, pivot: &Manifest, source: &Manifest) -> String {
    crate::pipeline::key::stage_key(&serde_json::json!({
        "pivot": pivot.key, "source": source.key, "aligner": o.aligner,
        "params": o.params.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<BTreeMap<_, _>>(),
    }))
}

/// Whether `o.out` already holds this alignment of these representations.
pub fn up_to_date(o: &AlignOptions) -> Result<bool> {
    let pivot = Manifest::read(&o.pivot)?;
    let source = Manifest::read(&o.source)?;
    let key = stage_key(o, &pivot, &source);
    Ok(Manifest::read(&o.out).is_ok_and(|m| m.key == key))
}

/// Run the stage.
pub fn align(registry: &Registry, o: &AlignOptions) -> Result<AlignOutcome> {
    let start = std::time::Instant::now();
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("pivot representation", &o.pivot),
        ("source representation", &o.source),
    ];
    inputs.extend(o.pivot_tokenizer.as_deref().map(|p| ("pivot tokenizer", p)));
    inputs.extend(
        o.source_tokenizer
            .as_deref()
            .map(|p| ("source tokenizer", p)),
    );
    crate::io::writer::check_out_not_input(&o.out, &inputs)?;
    let pivot = ReprDir::open(&o.pivot)?;
    let source = ReprDir::open(&o.source)?;
    let entry = registry.aligner(&o.aligner)?;
    let params = entry.info.resolve_scalars(&o.params)?;
    let key = stage_key(o, &pivot.manifest, &source.manifest);
    if !o.force {
        if let Ok(m) = Manifest::read(&o.out) {
            if m.key == key {
                return Ok(AlignOutcome {
                    manifest: m,
                    stats: AlignStats::default(),
                    up_to_date: true,
                    seconds: 0.0,
                });
            }
        }
    }
    let (pt, st) = (
        tokenizer_dir(&o.pivot_tokenizer, &pivot.manifest),
        tokenizer_dir(&o.source_tokenizer, &source.manifest),
    );
    let vocabs = VocabPair::new(
        Vocab::from_tokenizer(&crate::data::template::load_tokenizer(&pt)?),
        Vocab::from_tokenizer(&crate::data::template::load_tokenizer(&st)?),
    );
    if vocabs.pivot.tokens.len() > pivot.manifest.vocab_size {
        return Err(Error::model(
            &pt,
            format!(
                "this pivot tokenizer has {} tokens, but the pivot representation {} was made with a vocabulary of {}: \
                 its ids could not be stored there. Use the tokenizer the pivot was represented with (--pivot-tokenizer)",
                vocabs.pivot.tokens.len(),
                o.pivot.display(),
                pivot.manifest.vocab_size
            ),
        ));
    }
    entry.plugin.check(&vocabs, &params)?;

    // Pair rows by id; both sides must hold the same rows. Only the row ids are
    // kept here; source shards are loaded when a pivot shard needs them.
    let mut where_src: HashMap<u64, (usize, usize)> = HashMap::new();
    for i in 0..source.manifest.shards.len() {
        for (r, id) in source.shard(i)?.row_ids.iter().enumerate() {
            where_src.insert(*id, (i, r));
        }
    }
    let pivot_ids: Vec<u64> = pivot.metrics()?.into_iter().map(|m| m.0).collect();
    let missing: Vec<u64> = pivot_ids
        .iter()
        .filter(|id| !where_src.contains_key(id))
        .copied()
        .collect();
    let extra = where_src.len() as i64 - (pivot_ids.len() - missing.len()) as i64;
    if !missing.is_empty() || extra != 0 {
        return Err(Error::model(
            &o.source,
            format!(
                "its rows do not match the pivot's ({}): {} pivot row(s) missing here (first: {:?}), {} row(s) here not in the pivot; represent both models from the same data file with the same settings",
                o.pivot.display(),
                missing.len(),
                &missing[..missing.len().min(5)],
                extra.max(0)
            ),
        ));
    }
    let k = source.manifest.top_k;
    if o.out.exists() && !o.force && Manifest::read(&o.out).is_err() {
        return Err(Error::model(
            &o.out,
            "exists and is not a representation directory; choose another --out (or pass --force to replace it)",
        ));
    }
    let out_dir = crate::io::writer::OutputDir::create(&o.out, true)?;
    let mut stats = AlignStats::default();
    for i in 0..pivot.manifest.shards.len() {
        let ps = pivot.shard(i)?;
        // The source shards this pivot shard's rows live in (usually just one).
        let mut needed: Vec<usize> = ps.row_ids.iter().map(|id| where_src[id].0).collect();
        needed.sort_unstable();
        needed.dedup();
        let mut src_shards: HashMap<usize, Shard> = HashMap::new();
        for si in needed {
            src_shards.insert(si, source.shard(si)?);
        }
        let rows: Vec<Result<AlignedRow>> = (0..ps.rows())
            .into_par_iter()
            .map(|r| {
                let pr = ps.row(r);
                let (si, sr) = where_src[&pr.row_id];
                let srow = src_shards[&si].row(sr);
                let a = entry.plugin.align(&vocabs, &params, &pr, &srow, k).map_err(|e| {
                    Error::msg(format!("aligner `{}` on row {}: {e}", o.aligner, pr.row_id))
                })?;
                let p = loss_positions(pr.label_mask).count();
                if a.topk_ids.len() != p * k || a.topk_logits.len() != p * k {
                    return Err(Error::Plugin(format!(
                        "aligner `{}` returned {} entries for row {} where {p} positions × k={k} were expected",
                        o.aligner,
                        a.topk_ids.len(),
                        pr.row_id
                    )));
                }
                Ok(a)
            })
            .collect();
        let mut out = Shard::new(k);
        out.key = Some(key.clone());
        for (r, a) in rows.into_iter().enumerate() {
            let a = a?;
            stats.add(&a.stats);
            let pr = ps.row(r);
            let (si, sr) = where_src[&pr.row_id];
            let metric = src_shards[&si].metric_ce[sr];
            out.push(
                pr.row_id,
                pr.input_ids,
                pr.label_mask,
                &a.topk_ids,
                &a.topk_logits,
                metric,
            );
        }
        out.write(
            &out_dir.path().join(&pivot.manifest.shards[i].file),
            pivot.manifest.vocab_size,
        )?;
    }
    let mut manifest = pivot.manifest.clone();
    manifest.model = source.manifest.model.clone();
    manifest.family = source.manifest.family.clone();
    manifest.top_k = k;
    manifest.key = key;
    manifest.filtered = None;
    manifest.aligned = Some(crate::data::repr::AlignedFrom {
        aligner: o.aligner.clone(),
        source: std::fs::canonicalize(&o.source).unwrap_or_else(|_| o.source.clone()),
        pivot: std::fs::canonicalize(&o.pivot).unwrap_or_else(|_| o.pivot.clone()),
        params: serde_json::Value::Object(
            params
                .shared
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        ),
        stats: stats.to_json(),
    });
    manifest.write(out_dir.path())?;
    out_dir.commit()?;
    Ok(AlignOutcome {
        manifest,
        stats,
        up_to_date: false,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// What `fusechat filter` did.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterReport {
    pub rows: usize,
    pub dropped: Vec<u64>,
}

/// Drop every row whose pivot or any teacher `metric_ce` is NaN (SPEC §4;
/// infinities are kept). The dropped row ids are recorded in every manifest;
/// the shards are not rewritten.
pub fn filter(pivot: &Path, teachers: &[PathBuf]) -> Result<FilterReport> {
    let mut all = vec![pivot.to_path_buf()];
    all.extend(teachers.iter().cloned());
    let pivot_rows = ReprDir::open(pivot)?.metrics()?;
    let mut nan: std::collections::BTreeSet<u64> = pivot_rows
        .iter()
        .filter(|(_, v)| v.is_nan())
        .map(|(id, _)| *id)
        .collect();
    for dir in teachers {
        let m = ReprDir::open(dir)?.metrics()?;
        if m.len() != pivot_rows.len() || m.iter().zip(&pivot_rows).any(|(a, b)| a.0 != b.0) {
            return Err(Error::model(
                dir,
                format!(
                    "its rows are not the pivot's ({}); align it to the pivot first",
                    pivot.display()
                ),
            ));
        }
        nan.extend(m.iter().filter(|(_, v)| v.is_nan()).map(|(id, _)| *id));
    }
    let dropped: Vec<u64> = nan.into_iter().collect();
    for dir in &all {
        let mut m = Manifest::read(dir)?;
        m.filtered = Some(crate::data::repr::Filtered {
            against: all.clone(),
            dropped: dropped.clone(),
        });
        m.write(dir)?;
    }
    tracing::debug!(
        "filter: dropped {} of {} rows with a NaN metric_ce",
        dropped.len(),
        pivot_rows.len()
    );
    Ok(FilterReport {
        rows: pivot_rows.len(),
        dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_bytes_normalise_to_text() {
        let sp = Vocab::new(
            vec![
                "<s>".into(),
                "\u{2581}the".into(),
                "<0x0A>".into(),
                "cat".into(),
            ],
            vec![true, false, false, false],
        );
        assert_eq!(sp.text[1], b" the");
        assert_eq!(sp.text[2], b"\n");
        assert!(sp.text[0].is_empty());
        let bl = Vocab::new(
            vec![
                "<|bos|>".into(),
                "\u{120}the".into(),
                "\u{120}a".into(),
                "\u{10a}".into(),
                "cat".into(),
                "\u{c3}\u{a9}".into(),
            ],
            vec![true, false, false, false, false, false],
        );
        assert_eq!(bl.text[1], b" the");
        assert_eq!(bl.text[3], b"\n");
        assert_eq!(bl.text[5], "é".as_bytes());
        let pair = VocabPair::new(bl, sp);
        assert_eq!(pair.exact(1), Some(1));
        assert_eq!(pair.exact(2), Some(3), "<0x0A> and Ċ are both a newline");
        assert_eq!(pair.exact(3), Some(4));
        assert_eq!(pair.exact(0), None, "<s> is not <|bos|>");
    }
}
