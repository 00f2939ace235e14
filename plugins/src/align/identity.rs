//! `identity`: the pivot and the source share one vocabulary (true of FuseChat
//! v1's three sources), so rows and top-k carry over unchanged. The
//! vocabularies are compared first, and each row's tokens must be equal.

use fusechat_core::data::align::{AlignStats, AlignedRow, BuiltinAligner, VocabAligner, VocabPair};
use fusechat_core::data::repr::{loss_positions, RowView};
use fusechat_core::merge::params::ResolvedParams;
use fusechat_core::plugin::registry::{PluginInfo, PluginKind};
use fusechat_core::{Error, Result};
use std::sync::Arc;

pub struct Identity;

impl VocabAligner for Identity {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Aligner,
            name: "identity".into(),
            description: "same vocabulary: carry the top-k over unchanged (checked)".into(),
            params: vec![],
        }
    }

    fn check(&self, v: &VocabPair, _: &ResolvedParams) -> Result<()> {
        let (p, s) = (&v.pivot.tokens, &v.source.tokens);
        if let Some(i) = (0..p.len().max(s.len())).find(|&i| p.get(i) != s.get(i)) {
            return Err(Error::Plugin(format!(
                "aligner `identity`: the vocabularies differ ({} vs {} tokens; first difference at id {i}: pivot {:?}, source {:?}); use `exact`, `mined` or `offsets`",
                p.len(),
                s.len(),
                p.get(i),
                s.get(i)
            )));
        }
        Ok(())
    }

    fn align(
        &self,
        _: &VocabPair,
        _: &ResolvedParams,
        pivot: &RowView<'_>,
        source: &RowView<'_>,
        k: usize,
    ) -> Result<AlignedRow> {
        if pivot.input_ids != source.input_ids || pivot.label_mask != source.label_mask {
            return Err(Error::msg(
                "the pivot's and the source's tokens differ although the vocabularies are equal; represent both with the same template and max_length",
            ));
        }
        let p = loss_positions(pivot.label_mask).count();
        if source.topk_ids.len() != p * k {
            return Err(Error::msg(
                "the source's top-k does not match its positions",
            ));
        }
        Ok(AlignedRow {
            topk_ids: source.topk_ids.to_vec(),
            topk_logits: source.topk_logits.to_vec(),
            stats: AlignStats {
                transferred: p as u64,
                equal_token: p as u64,
                ..AlignStats::default()
            },
        })
    }
}

inventory::submit! { BuiltinAligner(|| Arc::new(Identity)) }
