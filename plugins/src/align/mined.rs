//! FuseLLM's "mined" alignment of two tokenizations of the same text: dynamic
//! time warping over the token sequences, with the edit distance of the
//! marker-stripped token strings as the cost.
//!
//! With rows `i` over the source tokens and columns `j` over the pivot tokens,
//! `M[0][0] = 0`, `M[i][0] = M[0][j] = ∞` otherwise, and
//! `M[i+1][j+1] = cost(i, j) + min(M[i][j+1], M[i+1][j], M[i][j])`.
//! The path is traced back from `(n1−1, n2−1)`, preferring on ties the
//! diagonal, then up (`i−1`), then left (`j−1`). The result maps each pivot
//! position to the ascending list of source positions aligned with it.
//!
//! `cost` is the Levenshtein distance of the two strings with SentencePiece `▁`
//! and byte-level `Ġ` markers removed. FuseChat-1.0's tool multiplies it by
//! 0.1 when one string contains the other: pass `substring_discount = Some(0.1)`.
//!
//! ```
//! use fusechat_plugins::align::mined::align;
//! // SPEC.md's example: pivot ["bc","a","b"], source ["c","b","bc","ba"]
//! let map = align(&["c", "b", "bc", "ba"], &["bc", "a", "b"], None);
//! assert_eq!(map, vec![vec![0], vec![1], vec![2, 3]]);
//! ```

use super::{fallback_param, mode_map, mode_param, single_source, token_strings, transfer};
use fusechat_core::data::align::{AlignedRow, BuiltinAligner, VocabAligner, VocabPair};
use fusechat_core::data::repr::RowView;
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::plugin::registry::{ParamSpec, PluginInfo, PluginKind, Scope};
use std::sync::Arc;

/// The `mined` aligner plugin.
pub struct Mined;

impl VocabAligner for Mined {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Aligner,
            name: "mined".into(),
            description: "FuseLLM: DTW positions; top-k tokens by exact text, else the nearest pivot token by edit distance".into(),
            params: vec![
                ParamSpec::float("substring_discount", Scope::Shared)
                    .default(1.0)
                    .range(0.0, 1.0)
                    .help("multiply the cost by this when one token contains the other (FuseChat-1.0's tool: 0.1; 1 = off)"),
                mode_param(),
                fallback_param(),
            ],
        }
    }

    fn align(
        &self,
        v: &VocabPair,
        params: &ResolvedParams,
        pivot: &RowView<'_>,
        source: &RowView<'_>,
        k: usize,
    ) -> fusechat_core::Result<AlignedRow> {
        let discount = params.f64("substring_discount")?;
        let map = align(
            &token_strings(&v.source, source.input_ids),
            &token_strings(&v.pivot, pivot.input_ids),
            (discount != 1.0).then_some(discount),
        );
        let pairs = single_source(&map);
        let map = mode_map(v, params)?;
        Ok(transfer(v, params, pivot, source, k, &pairs, map))
    }
}

inventory::submit! { BuiltinAligner(|| Arc::new(Mined)) }

/// Remove the word-start markers of SentencePiece (`▁`) and byte-level BPE (`Ġ`).
pub fn strip_markers(token: &str) -> String {
    token
        .chars()
        .filter(|c| *c != '\u{2581}' && *c != '\u{0120}')
        .collect()
}

/// Levenshtein distance over Unicode scalar values.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    levenshtein_chars(&a, &b, &mut Vec::new())
}

/// Levenshtein distance of char slices (the vocabulary map's distance).
pub fn char_distance(a: &[char], b: &[char]) -> usize {
    levenshtein_chars(a, b, &mut Vec::with_capacity(b.len() + 1))
}

/// The alignment cost of two tokens.
pub fn cost(a: &str, b: &str, substring_discount: Option<f64>) -> f64 {
    let (a, b) = (strip_markers(a), strip_markers(b));
    let d = levenshtein(&a, &b) as f64;
    match substring_discount {
        Some(f) if a.contains(b.as_str()) || b.contains(a.as_str()) => d * f,
        _ => d,
    }
}

/// Levenshtein distance over char slices, reusing `row` as scratch.
fn levenshtein_chars(a: &[char], b: &[char], row: &mut Vec<usize>) -> usize {
    row.clear();
    row.extend(0..=b.len());
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + (ca != cb) as usize);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Align `source` tokens to `pivot` tokens; `result[j]` lists the source
/// positions aligned with pivot position `j`. Empty input gives empty lists.
/// The cost is [`cost`], computed once per pair of distinct token strings.
pub fn align<S: AsRef<str>, P: AsRef<str>>(
    source: &[S],
    pivot: &[P],
    substring_discount: Option<f64>,
) -> Vec<Vec<usize>> {
    let (n1, n2) = (source.len(), pivot.len());
    let mut out = vec![Vec::new(); n2];
    if n1 == 0 || n2 == 0 {
        return out;
    }
    // Costs depend only on the two strings: compute them once per pair of
    // distinct (marker-stripped) strings, not once per cell.
    fn distinct<T: AsRef<str>>(tokens: &[T]) -> (Vec<(String, Vec<char>)>, Vec<usize>) {
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        let mut uniq: Vec<(String, Vec<char>)> = Vec::new();
        let ids = tokens
            .iter()
            .map(|t| {
                let s = strip_markers(t.as_ref());
                *index.entry(s.clone()).or_insert_with(|| {
                    uniq.push((s.clone(), s.chars().collect()));
                    uniq.len() - 1
                })
            })
            .collect();
        (uniq, ids)
    }
    let (su, sid) = distinct(source);
    let (pu, pid) = distinct(pivot);
    let mut scratch = Vec::new();
    let mut costs = vec![0f64; su.len() * pu.len()];
    for (x, a) in su.iter().enumerate() {
        for (y, b) in pu.iter().enumerate() {
            let d = levenshtein_chars(&a.1, &b.1, &mut scratch) as f64;
            costs[x * pu.len() + y] = match substring_discount {
                Some(f) if a.0.contains(b.0.as_str()) || b.0.contains(a.0.as_str()) => d * f,
                _ => d,
            };
        }
    }
    let w = n2 + 1;
    let mut m = vec![f64::INFINITY; (n1 + 1) * w];
    m[0] = 0.0;
    for i in 0..n1 {
        let row = &costs[sid[i] * pu.len()..(sid[i] + 1) * pu.len()];
        for j in 0..n2 {
            let best = m[i * w + j + 1].min(m[(i + 1) * w + j]).min(m[i * w + j]);
            m[(i + 1) * w + j + 1] = row[pid[j]] + best;
        }
    }
    let (mut i, mut j) = (n1 - 1, n2 - 1);
    out[j].push(i);
    while i > 0 || j > 0 {
        // Candidates in tie order: diagonal, up, left (values M[i][j], M[i][j+1], M[i+1][j]).
        let diag = if i > 0 && j > 0 {
            m[i * w + j]
        } else {
            f64::INFINITY
        };
        let up = if i > 0 {
            m[i * w + j + 1]
        } else {
            f64::INFINITY
        };
        let left = if j > 0 {
            m[(i + 1) * w + j]
        } else {
            f64::INFINITY
        };
        if diag <= up && diag <= left {
            i -= 1;
            j -= 1;
        } else if up <= left {
            i -= 1;
        } else {
            j -= 1;
        }
        out[j].push(i);
    }
    out.iter_mut().for_each(|v| v.sort_unstable());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_and_tie_order() {
        assert_eq!(
            align(&["c", "b", "bc", "ba"], &["bc", "a", "b"], None),
            vec![vec![0], vec![1], vec![2, 3]]
        );
    }

    #[test]
    fn identical_tokenizations_align_one_to_one() {
        let t = ["▁The", "▁cat", "▁sat", "."];
        assert_eq!(
            align(&t, &t, None),
            vec![vec![0], vec![1], vec![2], vec![3]]
        );
    }

    #[test]
    fn markers_are_ignored_and_the_discount_applies_to_substrings() {
        assert_eq!(cost("▁hello", "Ġhello", None), 0.0);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(cost("▁ab", "abc", None), 1.0);
        assert!((cost("▁ab", "abc", Some(0.1)) - 0.1).abs() < 1e-12);
        assert_eq!(cost("ab", "xy", Some(0.1)), 2.0);
    }

    /// A split word: plain edit distance pulls "able" onto "▁story" (cost 5 < 8);
    /// the substring discount keeps the word together. (Paths checked with an
    /// independent Python implementation of the same recurrence.)
    #[test]
    fn the_substring_discount_changes_the_path_on_split_words() {
        let source = ["▁un", "believ", "able", "▁story"];
        let pivot = ["▁unbelievable", "▁story"];
        assert_eq!(align(&source, &pivot, None), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(
            align(&source, &pivot, Some(0.1)),
            vec![vec![0, 1, 2], vec![3]]
        );
    }

    /// The per-distinct-pair cost table gives the same paths as computing
    /// `cost` cell by cell (a direct transcription of the recurrence).
    #[test]
    fn cached_costs_match_the_cell_by_cell_recurrence() {
        fn naive(source: &[&str], pivot: &[&str], disc: Option<f64>) -> Vec<Vec<usize>> {
            let (n1, n2) = (source.len(), pivot.len());
            let mut m = vec![vec![f64::INFINITY; n2 + 1]; n1 + 1];
            m[0][0] = 0.0;
            for i in 0..n1 {
                for j in 0..n2 {
                    m[i + 1][j + 1] =
                        cost(source[i], pivot[j], disc) + m[i][j + 1].min(m[i + 1][j]).min(m[i][j]);
                }
            }
            let mut out = vec![Vec::new(); n2];
            let (mut i, mut j) = (n1 - 1, n2 - 1);
            out[j].push(i);
            while i > 0 || j > 0 {
                let inf = f64::INFINITY;
                let diag = if i > 0 && j > 0 { m[i][j] } else { inf };
                let up = if i > 0 { m[i][j + 1] } else { inf };
                let left = if j > 0 { m[i + 1][j] } else { inf };
                if diag <= up && diag <= left {
                    i -= 1;
                    j -= 1;
                } else if up <= left {
                    i -= 1;
                } else {
                    j -= 1;
                }
                out[j].push(i);
            }
            out.iter_mut().for_each(|v| v.sort_unstable());
            out
        }
        let words = [
            "▁the", "Ġthe", "th", "e", "▁cat", "ca", "t", "▁a", "ab", "▁abc", "c",
        ];
        let mut state = 7u64;
        let mut pick = |n: usize| -> Vec<&str> {
            (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    words[(state >> 33) as usize % words.len()]
                })
                .collect()
        };
        for trial in 0..40 {
            let (s, p) = (pick(3 + trial % 17), pick(2 + trial % 13));
            for disc in [None, Some(0.1)] {
                assert_eq!(
                    align(&s, &p, disc),
                    naive(&s, &p, disc),
                    "{s:?} {p:?} {disc:?}"
                );
            }
        }
    }

    /// Every source position appears, the path is monotone, and every pivot position gets one.
    #[test]
    fn the_path_covers_both_sequences_monotonically() {
        let source = ["a", "bb", "c", "dd", "e", "f", "gg"];
        let pivot = ["ab", "b", "cdd", "e", "fgg"];
        let map = align(&source, &pivot, None);
        assert!(map.iter().all(|v| !v.is_empty()));
        let mut all: Vec<usize> = map.iter().flatten().copied().collect();
        let flat = all.clone();
        all.dedup();
        assert_eq!(all, (0..source.len()).collect::<Vec<_>>(), "{map:?}");
        assert!(flat.windows(2).all(|w| w[0] <= w[1]), "{map:?}");
        assert!(align::<&str, &str>(&[], &["x"], None) == vec![Vec::<usize>::new()]);
    }
}
