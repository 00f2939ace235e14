//! Vocabulary aligners (SPEC §3), one file each. How each pairs positions and
//! maps the source's top-k tokens onto the pivot's vocabulary:
//!
//! | aligner | positions | top-k tokens | cost per row |
//! |---|---|---|---|
//! | `identity` | the same tokens (checked) | unchanged; the vocabularies must be equal | O(n) |
//! | `exact` | DTW (as `mined`) | exact text match (`▁`/`Ġ` normalised), others dropped | O(n·m) edit distances |
//! | `mined` | DTW, FuseLLM's | exact match, else the pivot token at minimum edit distance (`mode = "soft"`), or dropped (`"hard"`) | O(n·m) edit distances |
//! | `offsets` | equal character spans of the same text | as `mined` | O(n+m) |
//!
//! FuseLLM's transfer rule: a pivot loss position whose alignment lists exactly
//! one source position takes that position's top-k when the two tokens are
//! equal (markers normalised) or, in soft mode, when the vocabulary map sends
//! the source token to the pivot token, whether or not the source position is
//! also aligned with a neighbouring pivot position (pivot `▁Assistant` `:` `▁I`
//! against source `▁Assistant:` `▁I`: pivot `▁I` takes the source's `▁I`).
//! Every other position becomes one-hot on the pivot's label (the next token;
//! `fallback = "current"` reproduces FuseLLM's off-by-one). Mapped entries
//! keep their order; a duplicate pivot id keeps its first (highest) entry;
//! unfilled entries have logit −∞.

pub mod exact;
pub mod identity;
pub mod mined;
pub mod offsets;

use fusechat_core::data::align::{AlignStats, AlignedRow, VocabPair};
use fusechat_core::data::repr::{loss_positions, RowView};
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::plugin::registry::{ParamSpec, Scope};
use half::f16;

pub(crate) fn fallback_param() -> ParamSpec {
    ParamSpec::choice("fallback", &["label", "current"], Scope::Shared)
        .default("label")
        .help("one-hot target where no top-k transfers: the label (next token), or FuseLLM's current token")
}

pub(crate) fn mode_param() -> ParamSpec {
    ParamSpec::choice("mode", &["soft", "hard"], Scope::Shared)
        .default("soft")
        .help("soft: a top-k token missing from the pivot vocabulary maps to the nearest by edit distance; hard: it is dropped")
}

/// The top-k token map of the `mode` parameter: soft sends a token missing
/// from the pivot vocabulary to the nearest one by edit distance, hard drops it.
pub(crate) fn mode_map<'a>(
    v: &'a VocabPair,
    params: &ResolvedParams,
) -> fusechat_core::Result<impl Fn(u32) -> Option<u32> + 'a> {
    let soft = params.str("mode")? == "soft";
    Ok(move |id| {
        if soft {
            v.nearest(id, mined::char_distance)
        } else {
            v.exact(id)
        }
    })
}

/// Whether two tokens are the same token for the purpose of carrying a distribution over.
pub(crate) fn same_token(v: &VocabPair, pivot_id: u32, source_id: u32) -> bool {
    let k = v.pivot.key(pivot_id);
    !k.is_empty() && k == v.source.key(source_id)
}

/// The single source position of each pivot position of a DTW map (`map[j]`
/// lists the source positions of pivot `j`): `out[j] = Some(i)` when
/// `map[j] == [i]`, even if `i` is also aligned with a neighbour (FuseLLM).
pub(crate) fn single_source(map: &[Vec<usize>]) -> Vec<Option<usize>> {
    map.iter()
        .map(|l| match l[..] {
            [i] => Some(i),
            _ => None,
        })
        .collect()
}

/// Build the aligned row: pivot loss position `t` takes the source top-k at
/// `pairs[t]` (a source position) when that is a source loss position; `map`
/// sends a source id to a pivot id or drops it.
pub(crate) fn transfer(
    v: &VocabPair,
    params: &ResolvedParams,
    pivot: &RowView<'_>,
    source: &RowView<'_>,
    k: usize,
    pairs: &[Option<usize>],
    map: impl Fn(u32) -> Option<u32>,
) -> AlignedRow {
    let current = params.str("fallback").ok() == Some("current");
    let mut uses = vec![0u32; source.input_ids.len()];
    pairs.iter().flatten().for_each(|&s| uses[s] += 1);
    let mut src_pos = vec![None; source.input_ids.len()];
    for (n, t) in loss_positions(source.label_mask).enumerate() {
        src_pos[t] = Some(n);
    }
    let positions: Vec<usize> = loss_positions(pivot.label_mask).collect();
    let mut ids = vec![0u32; positions.len() * k];
    let mut logits = vec![f16::NEG_INFINITY; positions.len() * k];
    let mut stats = AlignStats::default();
    for (n, &t) in positions.iter().enumerate() {
        let (ids, logits) = (
            &mut ids[n * k..(n + 1) * k],
            &mut logits[n * k..(n + 1) * k],
        );
        let mut filled = 0;
        // (source loss position, tokens equal?, source shared with a neighbour?)
        let paired = pairs[t]
            .and_then(|s| {
                let (p, q) = (pivot.input_ids[t], source.input_ids[s]);
                let equal = same_token(v, p, q);
                (equal || map(q) == Some(p)).then_some((s, equal))
            })
            .and_then(|(s, equal)| Some((src_pos[s]?, equal, uses[s] > 1)));
        if let Some((sn, equal, shared)) = paired {
            for e in sn * k..(sn + 1) * k {
                let Some(p) = map(source.topk_ids[e]) else {
                    stats.dropped_tokens += 1;
                    continue;
                };
                if filled < k && !ids[..filled].contains(&p) && source.topk_logits[e].is_finite() {
                    ids[filled] = p;
                    logits[filled] = source.topk_logits[e];
                    filled += 1;
                }
            }
            if filled > 0 {
                stats.transferred += 1;
                stats.equal_token += equal as u64;
                stats.vocab_map += !equal as u64;
                stats.shared_source += shared as u64;
            }
        }
        if filled == 0 {
            ids[0] = pivot.input_ids[if current { t } else { t + 1 }];
            logits[0] = f16::ZERO;
            stats.fallback += 1;
        }
    }
    AlignedRow {
        topk_ids: ids,
        topk_logits: logits,
        stats,
    }
}

/// The token strings of a row, for DTW.
pub(crate) fn token_strings<'a>(
    vocab: &'a fusechat_core::data::align::Vocab,
    ids: &[u32],
) -> Vec<&'a str> {
    ids.iter()
        .map(|&i| vocab.tokens.get(i as usize).map_or("", String::as_str))
        .collect()
}
