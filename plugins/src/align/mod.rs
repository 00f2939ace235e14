//! Vocabulary alignment (SPEC.md section 3). So far this holds the token-sequence
//! alignment of the `mined` aligner; the `VocabAligner` trait and the aligner
//! plugins (identity, exact, mined, offsets) come with the data-construction stage.

pub mod mined;
