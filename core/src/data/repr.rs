//! Representation directories: a model's top-k logits at the loss positions of
//! every record (SPEC §2), readable from Python's `safetensors` with no
//! fusechat code.
//!
//! ```text
//! repr/<model>/
//!   manifest.json            written last: a directory without it is unfinished
//!   shard-00000.safetensors  rows [0, R), then shard-00001 ... (row order of the data file)
//! ```
//! Each shard holds, for its R rows, N tokens and P loss positions:
//!
//! | tensor | dtype | shape | meaning |
//! |---|---|---|---|
//! | `row_ids` | u64 | [R] | index of the record in the data file |
//! | `row_offsets` | u64 | [R+1] | row r's tokens are `input_ids[row_offsets[r]..row_offsets[r+1]]` |
//! | `input_ids` | u32 | [N] | the tokens fed to the model (BOS included, truncated to max_length) |
//! | `label_mask` | u8 | [N] | 1 where the token is a label |
//! | `topk_ids` | u16 if V ≤ 65536, else u32 | [P, k] | the k best next tokens at each loss position |
//! | `topk_logits` | f16 | [P, k] | their logits, descending |
//! | `metric_ce` | f32 | [R] | mean CE of the labels (NaN when a row has no label) |
//!
//! A **loss position** is a position t whose next token t+1 is a label; row
//! r's positions come in order, after those of rows before it. Aligned
//! representations (`fusechat align`) use the pivot's rows, tokens and
//! positions; entries an aligner could not fill have logit −∞ (weight 0 in the
//! teacher softmax).

use crate::{Error, Result};
use half::f16;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "fusechat-repr";
pub const VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";

/// The positions t whose next token is a label.
pub fn loss_positions(labels: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (0..labels.len().saturating_sub(1)).filter(move |&t| labels[t + 1] != 0)
}

/// Counts of the input records.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordCounts {
    /// Records in the data file.
    pub total: u64,
    /// Records represented (rows in the shards).
    pub rows: u64,
    pub skipped: u64,
    /// Rows without any label (metric_ce NaN).
    pub no_label: u64,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub rows: u64,
    pub first_row: u64,
    pub last_row: u64,
    pub tokens: u64,
    pub positions: u64,
}

/// What `fusechat align` records about where an aligned representation came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignedFrom {
    pub aligner: String,
    pub source: PathBuf,
    pub pivot: PathBuf,
    pub params: serde_json::Value,
    /// Loss positions by how they were filled: 1:1 matches, many-to-one/vocab-mapped, label fallbacks.
    pub stats: serde_json::Value,
}

/// Rows dropped by `fusechat filter` (a view: the shards are not rewritten).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Filtered {
    /// The representations whose NaN rows were dropped.
    pub against: Vec<PathBuf>,
    pub dropped: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: PathBuf,
    pub family: String,
    pub tokenizer_hash: String,
    pub template: String,
    pub top_k: usize,
    pub max_length: usize,
    pub vocab_size: usize,
    pub index_dtype: String,
    pub data: PathBuf,
    /// A hash of the inputs and settings; a rerun with the same key is up to date.
    pub key: String,
    pub records: RecordCounts,
    pub skipped: Vec<crate::data::conversation::Skipped>,
    pub shards: Vec<ShardEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aligned: Option<AlignedFrom>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filtered: Option<Filtered>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::model(dir, "no manifest.json: not a representation directory, or `fusechat represent` has not finished writing it (rerun it to resume)")
            } else {
                Error::io(&path, e)
            }
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::model(&path, format!("not a valid manifest: {e}")))?;
        if m.format != FORMAT || m.version != VERSION {
            return Err(Error::model(
                &path,
                format!(
                    "format {} v{} is not {FORMAT} v{VERSION}; recreate it with this fusechat",
                    m.format, m.version
                ),
            ));
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        crate::io::writer::write_atomic(&dir.join(MANIFEST), text.as_bytes())
    }

    /// Rows dropped by the filter.
    pub fn dropped(&self) -> std::collections::HashSet<u64> {
        self.filtered
            .iter()
            .flat_map(|f| f.dropped.iter().copied())
            .collect()
    }
}

/// One shard in memory, columnar as on disk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shard {
    pub k: usize,
    pub row_ids: Vec<u64>,
    pub row_offsets: Vec<u64>,
    pub input_ids: Vec<u32>,
    pub label_mask: Vec<u8>,
    pub topk_ids: Vec<u32>,
    pub topk_logits: Vec<f16>,
    pub metric_ce: Vec<f32>,
    /// Row r's loss positions are `pos_offsets[r]..pos_offsets[r+1]` (derived).
    pub pos_offsets: Vec<usize>,
    /// The stage key of the run that wrote it (safetensors metadata
    /// `fusechat_key`), so that shards made with other settings are never
    /// mixed into a representation; `None` in shards from before it was recorded.
    pub key: Option<String>,
}

/// The metadata entry that holds a shard's stage key.
pub const SHARD_KEY: &str = "fusechat_key";

/// One row of a shard.
#[derive(Debug, Clone, Copy)]
pub struct RowView<'a> {
    pub row_id: u64,
    pub input_ids: &'a [u32],
    pub label_mask: &'a [u8],
    /// `[P * k]`, position-major.
    pub topk_ids: &'a [u32],
    pub topk_logits: &'a [f16],
    pub metric_ce: f32,
}

impl Shard {
    pub fn new(k: usize) -> Shard {
        Shard {
            k,
            row_offsets: vec![0],
            pos_offsets: vec![0],
            ..Shard::default()
        }
    }

    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }

    /// Append a row; `topk_*` hold `k` entries for each of its loss positions.
    pub fn push(
        &mut self,
        row_id: u64,
        ids: &[u32],
        labels: &[u8],
        topk_ids: &[u32],
        topk_logits: &[f16],
        metric_ce: f32,
    ) {
        let p = loss_positions(labels).count();
        assert_eq!(
            ids.len(),
            labels.len(),
            "tokens and labels differ in length"
        );
        assert_eq!(topk_ids.len(), p * self.k, "top-k ids for a row");
        assert_eq!(topk_logits.len(), p * self.k, "top-k logits for a row");
        self.row_ids.push(row_id);
        self.input_ids.extend_from_slice(ids);
        self.label_mask.extend_from_slice(labels);
        self.row_offsets.push(self.input_ids.len() as u64);
        self.topk_ids.extend_from_slice(topk_ids);
        self.topk_logits.extend_from_slice(topk_logits);
        self.pos_offsets
            .push(self.pos_offsets.last().copied().unwrap_or(0) + p);
        self.metric_ce.push(metric_ce);
    }

    pub fn row(&self, r: usize) -> RowView<'_> {
        let (a, b) = (
            self.row_offsets[r] as usize,
            self.row_offsets[r + 1] as usize,
        );
        let (p, q) = (
            self.pos_offsets[r] * self.k,
            self.pos_offsets[r + 1] * self.k,
        );
        RowView {
            row_id: self.row_ids[r],
            input_ids: &self.input_ids[a..b],
            label_mask: &self.label_mask[a..b],
            topk_ids: &self.topk_ids[p..q],
            topk_logits: &self.topk_logits[p..q],
            metric_ce: self.metric_ce[r],
        }
    }

    pub fn positions(&self) -> usize {
        self.pos_offsets.last().copied().unwrap_or(0)
    }

    /// The safetensors bytes of this shard; ids as u16 when `vocab_size` ≤ 65536.
    pub fn to_bytes(&self, vocab_size: usize) -> Result<Vec<u8>> {
        let metadata = self
            .key
            .as_ref()
            .map(|k| std::collections::HashMap::from([(SHARD_KEY.to_string(), k.clone())]));
        fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|x| f(*x)).collect()
        }
        let (p, k) = (self.positions(), self.k);
        let ids = if vocab_size <= 1 << 16 {
            (Dtype::U16, le(&self.topk_ids, |x| (x as u16).to_le_bytes()))
        } else {
            (Dtype::U32, le(&self.topk_ids, u32::to_le_bytes))
        };
        let data: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "row_ids",
                Dtype::U64,
                vec![self.rows()],
                le(&self.row_ids, u64::to_le_bytes),
            ),
            (
                "row_offsets",
                Dtype::U64,
                vec![self.rows() + 1],
                le(&self.row_offsets, u64::to_le_bytes),
            ),
            (
                "input_ids",
                Dtype::U32,
                vec![self.input_ids.len()],
                le(&self.input_ids, u32::to_le_bytes),
            ),
            (
                "label_mask",
                Dtype::U8,
                vec![self.label_mask.len()],
                self.label_mask.clone(),
            ),
            ("topk_ids", ids.0, vec![p, k], ids.1),
            (
                "topk_logits",
                Dtype::F16,
                vec![p, k],
                le(&self.topk_logits, f16::to_le_bytes),
            ),
            (
                "metric_ce",
                Dtype::F32,
                vec![self.rows()],
                le(&self.metric_ce, f32::to_le_bytes),
            ),
        ];
        let views: Vec<(&str, TensorView<'_>)> = data
            .iter()
            .map(|(n, d, s, b)| {
                (
                    *n,
                    TensorView::new(*d, s.clone(), b).expect("consistent shapes"),
                )
            })
            .collect();
        safetensors::serialize(views, metadata)
            .map_err(|e| Error::msg(format!("serializing a shard: {e}")))
    }

    /// Write atomically (temp name, then rename).
    pub fn write(&self, path: &Path, vocab_size: usize) -> Result<()> {
        crate::io::writer::write_atomic(path, &self.to_bytes(vocab_size)?)
    }

    /// The stage key recorded in a shard file, read from its header alone.
    pub fn read_key(path: &Path) -> Result<Option<String>> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(len).min(100 << 20) as usize;
        let mut header = vec![0u8; n];
        f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_slice(&header)
            .map_err(|e| Error::model(path, format!("not a readable safetensors shard: {e}")))?;
        Ok(v["__metadata__"][SHARD_KEY].as_str().map(str::to_string))
    }

    /// Read and validate a shard file.
    pub fn read(path: &Path) -> Result<Shard> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::model(path, msg);
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a readable safetensors shard ({e}); delete it and rerun `fusechat represent` to recompute it")))?;
        let key = safetensors::SafeTensors::read_metadata(&bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().as_ref()?.get(SHARD_KEY).cloned());
        let get = |name: &str, dtypes: &[Dtype], rank: usize| -> Result<TensorView<'_>> {
            let t = st
                .tensor(name)
                .map_err(|_| bad(format!("missing tensor `{name}`")))?;
            if !dtypes.contains(&t.dtype()) || t.shape().len() != rank {
                return Err(bad(format!(
                    "tensor `{name}` is {:?} {:?}, expected {dtypes:?} of rank {rank}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t)
        };
        fn words<'a, const N: usize>(t: &'a TensorView<'_>) -> impl Iterator<Item = [u8; N]> + 'a {
            t.data()
                .chunks_exact(N)
                .map(|c| c.try_into().expect("exact chunk"))
        }
        let row_ids: Vec<u64> = words(&get("row_ids", &[Dtype::U64], 1)?)
            .map(u64::from_le_bytes)
            .collect();
        let row_offsets: Vec<u64> = words(&get("row_offsets", &[Dtype::U64], 1)?)
            .map(u64::from_le_bytes)
            .collect();
        let input_ids: Vec<u32> = words(&get("input_ids", &[Dtype::U32], 1)?)
            .map(u32::from_le_bytes)
            .collect();
        let label_mask = get("label_mask", &[Dtype::U8], 1)?.data().to_vec();
        let ti = get("topk_ids", &[Dtype::U16, Dtype::U32], 2)?;
        let topk_ids: Vec<u32> = if ti.dtype() == Dtype::U16 {
            words(&ti).map(|b| u16::from_le_bytes(b) as u32).collect()
        } else {
            words(&ti).map(u32::from_le_bytes).collect()
        };
        let tl = get("topk_logits", &[Dtype::F16], 2)?;
        let topk_logits: Vec<f16> = words(&tl).map(f16::from_le_bytes).collect();
        let metric_ce: Vec<f32> = words(&get("metric_ce", &[Dtype::F32], 1)?)
            .map(f32::from_le_bytes)
            .collect();
        let k = ti.shape()[1];
        let r = row_ids.len();
        if row_offsets.len() != r + 1
            || metric_ce.len() != r
            || label_mask.len() != input_ids.len()
            || row_offsets.first() != Some(&0)
            || row_offsets.last() != Some(&(input_ids.len() as u64))
            || row_offsets.windows(2).any(|w| w[0] > w[1])
            || tl.shape() != ti.shape()
        {
            return Err(bad("inconsistent row_offsets, metric_ce, label_mask or top-k shapes; delete the shard and rerun `fusechat represent`".into()));
        }
        let mut pos_offsets = vec![0usize];
        for w in row_offsets.windows(2) {
            let p = loss_positions(&label_mask[w[0] as usize..w[1] as usize]).count();
            pos_offsets.push(pos_offsets.last().unwrap() + p);
        }
        if *pos_offsets.last().unwrap() != ti.shape()[0] {
            return Err(bad(format!(
                "topk_ids has {} positions but label_mask gives {}; delete the shard and rerun `fusechat represent`",
                ti.shape()[0],
                pos_offsets.last().unwrap()
            )));
        }
        Ok(Shard {
            key,
            k,
            row_ids,
            row_offsets,
            input_ids,
            label_mask,
            topk_ids,
            topk_logits,
            metric_ce,
            pos_offsets,
        })
    }
}

/// A finished representation directory.
#[derive(Debug, Clone)]
pub struct ReprDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl ReprDir {
    pub fn open(dir: &Path) -> Result<ReprDir> {
        Ok(ReprDir {
            dir: dir.to_path_buf(),
            manifest: Manifest::read(dir)?,
        })
    }

    pub fn shard(&self, i: usize) -> Result<Shard> {
        let e = &self.manifest.shards[i];
        let s = Shard::read(&self.dir.join(&e.file))?;
        if s.key.as_ref().is_some_and(|k| *k != self.manifest.key) {
            return Err(Error::model(
                self.dir.join(&e.file),
                format!(
                    "was made by a run with other inputs or settings (key {}) than its manifest's (key {}); \
                     shards of different runs cannot be mixed: recompute it",
                    s.key.as_deref().unwrap_or_default(),
                    self.manifest.key
                ),
            ));
        }
        if s.k != self.manifest.top_k {
            return Err(Error::model(
                self.dir.join(&e.file),
                format!(
                    "holds top-{} entries but manifest.json says top_k = {}; the directory was modified, recreate it",
                    s.k, self.manifest.top_k
                ),
            ));
        }
        if s.rows() as u64 != e.rows || s.positions() as u64 != e.positions {
            return Err(Error::model(self.dir.join(&e.file), "does not match its manifest entry (rows or positions); the directory was modified, recreate it"));
        }
        Ok(s)
    }

    /// Every row's (row id, metric_ce), in order.
    pub fn metrics(&self) -> Result<Vec<(u64, f32)>> {
        let mut out = Vec::new();
        for i in 0..self.manifest.shards.len() {
            let s = self.shard(i)?;
            out.extend(s.row_ids.iter().copied().zip(s.metric_ce.iter().copied()));
        }
        Ok(out)
    }
}

/// A shard's file name.
pub fn shard_file(i: usize) -> String {
    format!("shard-{i:05}.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Shard {
        let mut s = Shard::new(2);
        let h = |v: &[f32]| v.iter().map(|x| f16::from_f32(*x)).collect::<Vec<_>>();
        s.push(
            3,
            &[1, 5, 6, 7],
            &[0, 0, 1, 1],
            &[6, 2, 7, 1],
            &h(&[2.0, 1.0, 3.0, f32::NEG_INFINITY]),
            0.5,
        );
        s.push(9, &[1, 4], &[0, 0], &[], &[], f32::NAN);
        s
    }

    #[test]
    fn loss_positions_precede_labels() {
        assert_eq!(
            loss_positions(&[0, 0, 1, 1, 0, 1]).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        assert_eq!(loss_positions(&[1]).count(), 0);
    }

    #[test]
    fn shards_round_trip_with_narrow_or_wide_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample();
        for (vocab, width) in [(32000, 2), (128256, 4)] {
            let p = dir.path().join("s.safetensors");
            s.write(&p, vocab).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            assert_eq!(st.tensor("topk_ids").unwrap().data().len(), 4 * width);
            let back = Shard::read(&p).unwrap();
            assert_eq!(back.row_ids, s.row_ids);
            assert_eq!(back.topk_ids, s.topk_ids);
            assert!(back.metric_ce[1].is_nan());
            assert_eq!(back.row(0).topk_logits[3], f16::NEG_INFINITY);
            assert_eq!(back.row(1).topk_ids.len(), 0);
        }
    }

    #[test]
    fn truncated_shards_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        sample().write(&p, 100).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = Shard::read(&p).unwrap_err().to_string();
        assert!(e.contains("s.safetensors") && e.contains("rerun"), "{e}");
    }
}
