//! Stage keys: how every stage decides that its output is up to date.
//!
//! A stage describes everything that determines its output bytes as one JSON
//! value (its settings, the keys of the artifacts it reads, the identity of
//! its input files) and records `stage_key` of that value in its output. A
//! later run with the same key skips the stage; any difference reruns it.
//!
//! ```
//! use fusechat_core::pipeline::key::stage_key;
//! let a = stage_key(&serde_json::json!({"top_k": 10}));
//! assert_eq!(a.len(), 16);
//! assert_eq!(a, stage_key(&serde_json::json!({"top_k": 10})));
//! assert_ne!(a, stage_key(&serde_json::json!({"top_k": 11})));
//! ```

use crate::rng::fnv1a;

/// The key of a stage's inputs and settings: 16 hex digits of FNV-1a over the
/// value's JSON text (object keys are sorted, so the text is canonical).
pub fn stage_key(inputs_and_settings: &serde_json::Value) -> String {
    format!("{:016x}", fnv1a(inputs_and_settings.to_string().as_bytes()))
}
