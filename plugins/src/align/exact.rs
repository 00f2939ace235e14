//! `exact`: positions paired by FuseLLM's DTW (as in `mined`); a source top-k
//! token carries over only when the pivot vocabulary has exactly its text
//! (SentencePiece `▁` and byte-level `Ġ` normalised), otherwise it is dropped.

use super::{fallback_param, single_source, token_strings, transfer};
use fusechat_core::data::align::{AlignedRow, BuiltinAligner, VocabAligner, VocabPair};
use fusechat_core::data::repr::RowView;
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};
use fusechat_core::Result;
use std::sync::Arc;

pub struct Exact;

impl VocabAligner for Exact {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Aligner,
            name: "exact".into(),
            description: "DTW positions; top-k tokens by exact text, unmatched ones dropped".into(),
            params: vec![fallback_param()],
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
        let map = super::mined::align(
            &token_strings(&v.source, source.input_ids),
            &token_strings(&v.pivot, pivot.input_ids),
            None,
        );
        let pairs = single_source(&map);
        Ok(transfer(v, params, pivot, source, k, &pairs, |id| {
            v.exact(id)
        }))
    }
}

inventory::submit! { BuiltinAligner(|| Arc::new(Exact)) }
