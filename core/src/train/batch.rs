//! The fusion data: the pivot's representation (tokens, labels, its own
//! top-k) paired row by row with each teacher's aligned representation, and
//! the order micro-batches are drawn in.
//!
//! Micro-batches hold records of similar lengths, padded to the longest of
//! the batch (never to `max_length`): the records are shuffled with a seed
//! derived from `(seed, epoch)`, cut into groups of 50 micro-batches, each
//! group sorted by length, cut into micro-batches, and the micro-batches
//! shuffled again (Hugging Face's length-grouped sampling, deterministic).

use crate::data::repr::{loss_positions, Manifest, ReprDir};
use crate::rng::{mix64, SplitMix64};
use crate::{Error, Result};
use half::f16;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One teacher candidate's part of a record.
#[derive(Debug, Clone)]
pub struct RecordTeacher {
    pub metric_ce: f32,
    /// `[P · k]` ids and logits at the record's loss positions.
    pub ids: Vec<u32>,
    pub logits: Vec<f16>,
}

/// One training record.
#[derive(Debug, Clone)]
pub struct Record {
    pub row_id: u64,
    pub input_ids: Vec<u32>,
    /// The loss positions `t` (the token at `t + 1` is a label).
    pub positions: Vec<u32>,
    /// Candidate 0 (the pivot) first, then the teachers in order.
    pub teachers: Vec<RecordTeacher>,
}

/// The records of a fuse run and what describes them.
#[derive(Debug, Clone)]
pub struct FuseData {
    /// "pivot", then each teacher's name.
    pub names: Vec<String>,
    /// Each candidate's k.
    pub k: Vec<usize>,
    pub records: Vec<Record>,
    pub pivot: Manifest,
    /// Rows dropped because the filter dropped them.
    pub dropped: usize,
}

/// A teacher's name: the source's name, i.e. its representation directory's
/// (`repr/<name>`, aligned into `repr/<name>@pivot`).
pub fn teacher_name(dir: &Path, m: &Manifest) -> String {
    let from = m.aligned.as_ref().map_or(dir, |a| a.source.as_path());
    let name = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    name.split('@').next().unwrap_or(&name).to_string()
}

/// Load the pivot's representation and the teachers', pairing rows by id.
/// Refuses a teacher made with another tokenizer that was not aligned, rows
/// that do not pair, and NaN metrics that reached training.
pub fn load(pivot: &Path, teachers: &[PathBuf]) -> Result<FuseData> {
    let p = ReprDir::open(pivot)?;
    if p.manifest.aligned.is_some() {
        return Err(Error::model(
            pivot,
            "is an aligned (teacher) representation; --pivot-repr takes the pivot's own representation (repr/pivot)",
        ));
    }
    let mut dropped = p.manifest.dropped();
    let mut tms = Vec::new();
    let mut names = vec!["pivot".to_string()];
    let mut k = vec![p.manifest.top_k];
    for t in teachers {
        let r = ReprDir::open(t)?;
        if r.manifest.tokenizer_hash != p.manifest.tokenizer_hash {
            return Err(Error::model(
                t,
                format!(
                    "was made with another tokenizer (hash {}) than the pivot's representation (hash {}) and is not aligned to it: \
                     run `fusechat align --pivot {} --source {}` and pass the aligned directory",
                    r.manifest.tokenizer_hash,
                    p.manifest.tokenizer_hash,
                    pivot.display(),
                    t.display()
                ),
            ));
        }
        dropped.extend(r.manifest.dropped());
        names.push(teacher_name(t, &r.manifest));
        k.push(r.manifest.top_k);
        tms.push(r);
    }
    // The teachers' rows by id: (shard, row) for a lookup, shards loaded once.
    let mut records = Vec::new();
    let mut teacher_rows: Vec<HashMap<u64, RecordTeacherRow>> = Vec::new();
    for r in &tms {
        let mut rows = HashMap::new();
        for si in 0..r.manifest.shards.len() {
            let s = r.shard(si)?;
            for ri in 0..s.rows() {
                let v = s.row(ri);
                rows.insert(
                    v.row_id,
                    RecordTeacherRow {
                        input_ids: v.input_ids.to_vec(),
                        label_mask: v.label_mask.to_vec(),
                        t: RecordTeacher {
                            metric_ce: v.metric_ce,
                            ids: v.topk_ids.to_vec(),
                            logits: v.topk_logits.to_vec(),
                        },
                    },
                );
            }
        }
        teacher_rows.push(rows);
    }
    let mut nan = Vec::new();
    for si in 0..p.manifest.shards.len() {
        let s = p.shard(si)?;
        for ri in 0..s.rows() {
            let v = s.row(ri);
            if dropped.contains(&v.row_id) {
                continue;
            }
            let positions: Vec<u32> = loss_positions(v.label_mask).map(|t| t as u32).collect();
            if positions.is_empty() {
                continue; // a record with no label teaches nothing
            }
            let mut ts = vec![RecordTeacher {
                metric_ce: v.metric_ce,
                ids: v.topk_ids.to_vec(),
                logits: v.topk_logits.to_vec(),
            }];
            for (ti, rows) in teacher_rows.iter_mut().enumerate() {
                let Some(row) = rows.remove(&v.row_id) else {
                    return Err(Error::model(
                        &teachers[ti],
                        format!(
                            "has no row {} of the pivot's representation: the teacher was made from other data; \
                             align it to this pivot representation",
                            v.row_id
                        ),
                    ));
                };
                if row.input_ids != v.input_ids || row.label_mask != v.label_mask {
                    return Err(Error::model(
                        &teachers[ti],
                        format!(
                            "row {} holds other tokens than the pivot's: align it to this pivot representation ({})",
                            v.row_id,
                            pivot.display()
                        ),
                    ));
                }
                ts.push(row.t);
            }
            if ts.iter().any(|t| t.metric_ce.is_nan()) {
                nan.push(v.row_id);
            }
            records.push(Record {
                row_id: v.row_id,
                input_ids: v.input_ids.to_vec(),
                positions,
                teachers: ts,
            });
        }
    }
    if !nan.is_empty() {
        return Err(Error::model(
            pivot,
            format!(
                "{} row(s) have a NaN metric_ce (first: {:?}); run `fusechat filter --pivot {}{}` first",
                nan.len(),
                &nan[..nan.len().min(5)],
                pivot.display(),
                teachers
                    .iter()
                    .map(|t| format!(" --teacher {}", t.display()))
                    .collect::<String>()
            ),
        ));
    }
    if records.is_empty() {
        return Err(Error::model(
            pivot,
            "holds no record with a label to train on",
        ));
    }
    Ok(FuseData {
        names,
        k,
        records,
        pivot: p.manifest,
        dropped: dropped.len(),
    })
}

struct RecordTeacherRow {
    input_ids: Vec<u32>,
    label_mask: Vec<u8>,
    t: RecordTeacher,
}

/// Shuffle `v` in place (Fisher-Yates) with `rng`.
pub fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// The micro-batches of one epoch, as record indices: similar lengths
/// together, the order fixed by `(seed, epoch)`.
pub fn micro_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let b = batch_size.max(1);
    let mut rng = SplitMix64(seed ^ mix64(epoch.wrapping_add(0x5eed)));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for group in order.chunks(b * 50) {
        let mut g = group.to_vec();
        g.sort_by(|x, y| lengths[*y].cmp(&lengths[*x]));
        batches.extend(g.chunks(b).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_every_record_once_with_similar_lengths() {
        let lengths: Vec<usize> = (0..103).map(|i| 10 + (i * 37) % 200).collect();
        let b = micro_batches(&lengths, 4, 7, 0);
        let mut all: Vec<usize> = b.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert!(b.iter().all(|x| !x.is_empty() && x.len() <= 4));
        // within a batch, lengths are sorted (grouped), so the padding is small
        assert!(b
            .iter()
            .all(|x| x.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]])));
        assert_eq!(b, micro_batches(&lengths, 4, 7, 0), "deterministic");
        assert_ne!(
            b,
            micro_batches(&lengths, 4, 7, 1),
            "another epoch, another order"
        );
    }
}
