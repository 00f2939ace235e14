//! `offsets`: pair the two tokenizations of the same text by character spans,
//! in O(n+m). Each token covers the bytes of its text with whitespace removed
//! (so `▁the` and `Ġthe` both cover `the`); special tokens cover nothing and
//! pair in order with the specials at the same place. A pivot token is
//! one-to-one with a source token when both cover exactly the same span and
//! no other token of either side does. Top-k tokens map as in `mined`.
//!
//! Both rows must hold the same text (the same record, rendered by the same
//! template); otherwise the row is an error that names where the texts part.

use super::{fallback_param, mode_map, mode_param, transfer};
use fusechat_core::data::align::{AlignedRow, BuiltinAligner, Vocab, VocabAligner, VocabPair};
use fusechat_core::data::repr::RowView;
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};
use fusechat_core::{Error, Result};
use std::sync::Arc;

pub struct Offsets;

/// Each token's `[start, end)` in the whitespace-free text, and that text.
pub fn spans(vocab: &Vocab, ids: &[u32]) -> (Vec<(usize, usize)>, Vec<u8>) {
    let mut text = Vec::new();
    let spans = ids
        .iter()
        .map(|&id| {
            let start = text.len();
            if let Some(t) = vocab.text.get(id as usize) {
                text.extend(t.iter().filter(|b| !b.is_ascii_whitespace()));
            }
            (start, text.len())
        })
        .collect();
    (spans, text)
}

/// Runs of equal spans: (span, first index, count).
fn runs(spans: &[(usize, usize)]) -> Vec<((usize, usize), usize, usize)> {
    let mut out: Vec<((usize, usize), usize, usize)> = Vec::new();
    for (i, &s) in spans.iter().enumerate() {
        match out.last_mut() {
            Some(r) if r.0 == s => r.2 += 1,
            _ => out.push((s, i, 1)),
        }
    }
    out
}

/// `out[j] = Some(i)` when pivot token j and source token i cover the same span
/// (runs of equal spans pair in order when they have the same length).
pub fn pair_by_offsets(pivot: &[(usize, usize)], source: &[(usize, usize)]) -> Vec<Option<usize>> {
    let mut out = vec![None; pivot.len()];
    let (rp, rs) = (runs(pivot), runs(source));
    let mut i = 0;
    for p in &rp {
        while i < rs.len() && rs[i].0 < p.0 {
            i += 1;
        }
        if i < rs.len() && rs[i].0 == p.0 && rs[i].2 == p.2 {
            for n in 0..p.2 {
                out[p.1 + n] = Some(rs[i].1 + n);
            }
        }
    }
    out
}

impl VocabAligner for Offsets {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Aligner,
            name: "offsets".into(),
            description: "positions paired by character spans of the same text, O(n+m); top-k tokens as in mined".into(),
            params: vec![mode_param(), fallback_param()],
        }
    }

    fn align(
        &self,
        v: &VocabPair,
        params: &ResolvedParams,
        pivot: &RowView<'_>,
        source: &RowView<'_>,
        k: usize,
    ) -> Result<AlignedRow> {
        let (ps, pt) = spans(&v.pivot, pivot.input_ids);
        let (ss, st) = spans(&v.source, source.input_ids);
        // Rows truncated at max_length may end at different places: compare the common prefix.
        let n = pt.len().min(st.len());
        if let Some(at) = (0..n).find(|&i| pt[i] != st[i]) {
            let show = |t: &[u8]| {
                String::from_utf8_lossy(&t[at.saturating_sub(10)..(at + 10).min(t.len())])
                    .into_owned()
            };
            return Err(Error::msg(format!(
                "the two rows hold different text (at byte {at}: pivot {:?}, source {:?}); were they rendered with the same template? `mined` does not need equal text",
                show(&pt),
                show(&st)
            )));
        }
        let pairs: Vec<Option<usize>> = pair_by_offsets(&ps, &ss)
            .into_iter()
            .zip(&ps)
            .map(|(p, s)| p.filter(|_| s.1 <= n))
            .collect();
        let map = mode_map(v, params)?;
        Ok(transfer(v, params, pivot, source, k, &pairs, map))
    }
}

inventory::submit! { BuiltinAligner(|| Arc::new(Offsets)) }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_spans_pair_and_split_words_do_not() {
        // pivot: "un|believable| story"  source: "unbelievable| story"
        let p = [(0, 2), (2, 12), (12, 17)];
        let s = [(0, 12), (12, 17)];
        assert_eq!(pair_by_offsets(&p, &s), vec![None, None, Some(1)]);
        // zero-width specials at the same place pair in order
        let p = [(0, 0), (0, 3), (3, 3), (3, 5)];
        let s = [(0, 0), (0, 3), (3, 3), (3, 4), (4, 5)];
        assert_eq!(
            pair_by_offsets(&p, &s),
            vec![Some(0), Some(1), Some(2), None]
        );
    }
}
