//! The C ABI between fusechat and merge-method plugins loaded at run time.
//!
//! Rust's own ABI is not stable across compilers, so nothing Rust-specific
//! crosses this boundary: no `Box<dyn Trait>`, `String` or `Vec`. Only the
//! `#[repr(C)]` structs below, C strings (NUL-terminated UTF-8), raw pointers
//! and function pointers do. Plugin authors never touch this module directly:
//! they implement [`crate::merge::Merger`] and call [`crate::export_plugin!`]
//! (see [`crate::plugin::sdk`]).
//!
//! # Protocol (version 1)
//! 1. The host opens the library and calls `fusechat_abi_version()`. A value
//!    other than [`ABI_VERSION`] stops loading with an error naming both
//!    versions and the file; nothing else in the library is called.
//! 2. The host calls `fusechat_plugin_register(&registrar)`. The plugin calls
//!    `registrar.register_merger(ctx, &merger)` once per merge method. The host
//!    copies the [`FcMergerV1`] table and its strings during that call.
//!    If it fails or panics, it may say why with `registrar.report_error`.
//! 3. Per tensor, the host calls `merge(state, &group, &mut out, &mut err)`.
//!    Tensors cross as (pointer, dtype, shape) in [`FcTensor`]; the resolved
//!    parameters as JSON text (`{"shared": {...}, "per_model": [{...}, ...]}`).
//!    The input buffers of `merge` are the host's, lent exclusively for the
//!    call: valid and writable until it returns, and never touched by the host
//!    meanwhile. A kernel may compute in place and return one of them
//!    ([`FcMergeOut::location`]), so a contiguous f32 tensor is never copied;
//!    it must not keep any pointer past the call (the SDK's [`crate::merge::TensorBuf`]
//!    carries the call's lifetime, so safe plugin code cannot). A buffer the
//!    plugin allocated instead is handed over; the host releases it later with
//!    the plugin's `free_f32`, possibly from another thread, and keeps the
//!    library loaded until then. The buffers of `statistic` are lent
//!    read-only: the plugin must not write them.
//!
//!    **Threads.** The host merges tensors in parallel: it calls `merge`,
//!    `statistic` and `stat_scope` on one `state` from several threads at once.
//!    A plugin's state must be safe to share (the SDK requires `Merger: Send +
//!    Sync`). `stat_scope` answers [`FC_SCOPE_ERROR`] when the parameters do
//!    not parse or the method fails, and the host stops with an error.
//! 4. Errors are a status code plus an owned message in [`FcError`]; the host
//!    releases the message with the plugin's `free_string`. The SDK's shims
//!    catch panics, so no unwind ever crosses the boundary.
//! 5. When the host drops the plugin it calls `drop(state)`, then unloads the
//!    library.
//!
//! # How the ABI grows
//! Every struct starts with `struct_size`. New entries are only ever appended:
//! a newer host reads an entry only when the plugin's `struct_size` covers it,
//! and a newer plugin sees from the registrar's `struct_size` which
//! registration functions the host offers. So version-1 plugins keep loading
//! when, for example, `register_aligner` or `register_evaluator` are appended
//! to [`FcRegistrar`], each with its own `#[repr(C)]` table. Only a change that
//! cannot be expressed by appending (a changed field, a changed calling
//! convention) bumps [`ABI_VERSION`], and the host then refuses old plugins
//! with a clear message instead of misreading them.
//!
//! Loss plugins (`DistillLoss`) will not get autograd across the boundary:
//! their table will take the student logits and the teacher top-k as buffers
//! and return the loss value plus a buffer of its gradient with respect to the
//! student logits, which the host feeds back into its own graph.

use std::ffi::{c_char, c_void};

/// The ABI version this build of fusechat speaks.
pub const ABI_VERSION: u32 = 1;

/// `extern "C" fn fusechat_abi_version() -> u32`
pub const VERSION_SYMBOL: &str = "fusechat_abi_version";
/// `extern "C" fn fusechat_plugin_register(*const FcRegistrar) -> i32`
pub const ENTRY_SYMBOL: &str = "fusechat_plugin_register";

pub type VersionFn = unsafe extern "C" fn() -> u32;
pub type EntryFn = unsafe extern "C" fn(registrar: *const FcRegistrar) -> i32;

/// Status codes.
pub const FC_OK: i32 = 0;
/// The kernel returned an error (message in [`FcError`]).
pub const FC_ERROR: i32 = 1;
/// The kernel panicked; the SDK caught it (message in [`FcError`]).
pub const FC_PANIC: i32 = 2;

/// `FcTensor::dtype` values. Kernels compute in f32, so version 1 only passes f32.
pub const FC_F32: u32 = 0;

/// `FcMergerV1::base_use` values.
pub const FC_BASE_REQUIRED: u32 = 0;
pub const FC_BASE_OPTIONAL: u32 = 1;
pub const FC_BASE_IGNORED: u32 = 2;
/// `FcMergerV1::max_models` when unbounded.
pub const FC_UNBOUNDED: u32 = u32::MAX;

/// `FcMergeOut::location`: the result is in the base buffer.
pub const FC_OUT_BASE: i32 = -1;
/// `FcMergeOut::location`: the result is in a plugin-allocated buffer (`data`, `len`, `cap`).
pub const FC_OUT_PLUGIN: i32 = -2;
// 0..n_models: the result is in models[location].

/// `stat_scope` results.
pub const FC_SCOPE_NONE: i32 = -1;
pub const FC_SCOPE_TENSOR: i32 = 0;
pub const FC_SCOPE_LAYER: i32 = 1;
pub const FC_SCOPE_MODEL: i32 = 2;
/// The parameters did not parse, the method refused them, or it panicked.
pub const FC_SCOPE_ERROR: i32 = -2;

/// An error: a status code and a message owned by the plugin (free it with `free_string`).
#[repr(C)]
pub struct FcError {
    pub code: i32,
    pub message: *mut c_char,
}

/// A dense, row-major tensor.
#[repr(C)]
pub struct FcTensor {
    pub data: *mut f32,
    pub dtype: u32,
    pub ndim: u32,
    pub shape: *const u64,
    pub numel: u64,
}

/// One aligned group of input tensors (see [`crate::merge::TensorGroup`]).
#[repr(C)]
pub struct FcTensorGroup {
    pub struct_size: u32,
    /// Output tensor name.
    pub name: *const c_char,
    /// Decoder layer index, or -1.
    pub layer: i64,
    /// θ⁰, or null.
    pub base: *const FcTensor,
    pub models: *const FcTensor,
    pub n_models: u32,
    /// Resolved parameters as JSON.
    pub params_json: *const c_char,
    pub seed: u64,
    /// Per-model scope statistics (`n_models` values), or null.
    pub scope_stats: *const f64,
}

/// Where a kernel put its result, and its optional per-model weights.
#[repr(C)]
pub struct FcMergeOut {
    /// [`FC_OUT_BASE`], [`FC_OUT_PLUGIN`], or the index of a model buffer.
    pub location: i32,
    /// With [`FC_OUT_PLUGIN`]: the plugin's buffer, released with `free_f32(data, len, cap)`.
    pub data: *mut f32,
    pub len: usize,
    pub cap: usize,
    /// Per-model weights for the merge report, or null; released with `free_f64`.
    pub weights: *mut f64,
    pub n_weights: usize,
    pub weights_cap: usize,
}

/// A merge method's table (version 1).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FcMergerV1 {
    pub struct_size: u32,
    pub name: *const c_char,
    pub description: *const c_char,
    /// The parameter spec as JSON (see [`crate::plugin::sdk::params_to_json`]).
    pub params_json: *const c_char,
    pub base_use: u32,
    pub min_models: u32,
    pub max_models: u32,
    /// The plugin's object, passed back to every function.
    pub state: *mut c_void,
    pub merge: unsafe extern "C" fn(
        state: *mut c_void,
        group: *const FcTensorGroup,
        out: *mut FcMergeOut,
        err: *mut FcError,
    ) -> i32,
    /// Given resolved parameters (JSON), a `FC_SCOPE_*` value.
    pub stat_scope: unsafe extern "C" fn(state: *mut c_void, params_json: *const c_char) -> i32,
    /// Per-model (sum, count) of the method's statistic into `sums` and `counts` (`n_models` each).
    pub statistic: unsafe extern "C" fn(
        state: *mut c_void,
        group: *const FcTensorGroup,
        sums: *mut f64,
        counts: *mut u64,
        err: *mut FcError,
    ) -> i32,
    pub free_string: unsafe extern "C" fn(s: *mut c_char),
    pub free_f32: unsafe extern "C" fn(p: *mut f32, len: usize, cap: usize),
    pub free_f64: unsafe extern "C" fn(p: *mut f64, len: usize, cap: usize),
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// What the host hands to `fusechat_plugin_register`.
#[repr(C)]
pub struct FcRegistrar {
    pub struct_size: u32,
    pub abi_version: u32,
    pub ctx: *mut c_void,
    /// Returns [`FC_OK`], or [`FC_ERROR`] when the host refuses the table.
    pub register_merger: unsafe extern "C" fn(ctx: *mut c_void, merger: *const FcMergerV1) -> i32,
    /// Appended: why registration failed (the host copies the message during
    /// the call). Present when `struct_size` covers it.
    pub report_error: unsafe extern "C" fn(ctx: *mut c_void, message: *const c_char),
}

/// The size of [`FcRegistrar`] as version 1 first defined it (up to
/// `register_merger`): the least a plugin accepts.
pub const REGISTRAR_V1_SIZE: usize = std::mem::offset_of!(FcRegistrar, report_error);
