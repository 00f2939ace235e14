//! fusechat's built-in plugins, one file each, grouped by extension point.
//! Each registers itself with `inventory::submit!`; nothing else needs to change
//! to add one.

pub mod align;
pub mod eval;
pub mod loss;
pub mod merge;
pub mod models;

/// Call once from a binary so the linker keeps this crate (and its
/// `inventory` registrations) even though nothing else names it.
pub fn link() {}
