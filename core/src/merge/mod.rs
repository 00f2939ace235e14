//! The `Merger` extension point: a merge method is a declaration (name,
//! parameters, input contract) plus a pure per-tensor kernel.
//!
//! The planner resolves every parameter for every tensor before a kernel runs
//! (layer gradients, filters, precedence), loads the aligned inputs as f32 and
//! hands the kernel one [`TensorGroup`]. Kernels never parse config and never
//! touch files; they compute in f32 and return the merged tensor.

pub mod engine;
pub mod mergekit;
pub mod params;
pub mod plan;

use crate::merge::params::ResolvedParams;
use crate::plugin::registry::PluginInfo;
use crate::Result;
use std::ops::{Deref, DerefMut};

/// A flat f32 tensor buffer that a kernel may read, overwrite in place and
/// return as its output. It derefs to `[f32]`.
///
/// In fusechat it owns its memory (a `Vec`). Inside a plugin loaded at run
/// time it may instead borrow the host's buffer (so nothing is copied across
/// the boundary), or hold memory the host must give back to the plugin.
#[derive(Default)]
pub struct TensorBuf(BufInner);

#[derive(Default)]
enum BufInner {
    Owned(Vec<f32>),
    /// Memory owned by someone else for the duration of one kernel call.
    Borrowed {
        ptr: *mut f32,
        len: usize,
    },
    /// Memory from another allocator, released by `free` on drop.
    Foreign {
        ptr: *mut f32,
        len: usize,
        cap: usize,
        free: unsafe extern "C" fn(*mut f32, usize, usize),
    },
    #[default]
    Empty,
}

// SAFETY: a TensorBuf is the only handle to its memory while it exists (the
// constructors of the non-owned forms require that), so moving it to another
// thread moves that exclusive access.
unsafe impl Send for TensorBuf {}

impl TensorBuf {
    /// Borrow `len` floats at `ptr` for the buffer's lifetime.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` f32 values, and not be
    /// accessed through any other path, for as long as the buffer lives.
    pub unsafe fn borrowed(ptr: *mut f32, len: usize) -> TensorBuf {
        TensorBuf(BufInner::Borrowed { ptr, len })
    }

    /// Take ownership of memory that must be released by `free(ptr, len, cap)`.
    ///
    /// # Safety
    /// As for [`TensorBuf::borrowed`], and `free` must accept these arguments once.
    pub unsafe fn foreign(
        ptr: *mut f32,
        len: usize,
        cap: usize,
        free: unsafe extern "C" fn(*mut f32, usize, usize),
    ) -> TensorBuf {
        TensorBuf(BufInner::Foreign {
            ptr,
            len,
            cap,
            free,
        })
    }

    /// The start of the data (for identity checks across the plugin boundary).
    pub fn as_ptr(&self) -> *const f32 {
        self.deref().as_ptr()
    }

    /// The owned vector, when this buffer owns one (`Err(self)` otherwise).
    pub fn into_vec(mut self) -> std::result::Result<Vec<f32>, TensorBuf> {
        match std::mem::take(&mut self.0) {
            BufInner::Owned(v) => Ok(v),
            BufInner::Empty => Ok(Vec::new()),
            other => Err(TensorBuf(other)),
        }
    }
}

impl From<Vec<f32>> for TensorBuf {
    fn from(v: Vec<f32>) -> Self {
        TensorBuf(BufInner::Owned(v))
    }
}

impl Deref for TensorBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.0 {
            BufInner::Owned(v) => v,
            // SAFETY: guaranteed by the constructors' contracts.
            BufInner::Borrowed { ptr, len } | BufInner::Foreign { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(*ptr, *len)
            },
            BufInner::Empty => &[],
        }
    }
}

impl DerefMut for TensorBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.0 {
            BufInner::Owned(v) => v,
            // SAFETY: guaranteed by the constructors' contracts.
            BufInner::Borrowed { ptr, len } | BufInner::Foreign { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(*ptr, *len)
            },
            BufInner::Empty => &mut [],
        }
    }
}

impl<'a> IntoIterator for &'a TensorBuf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Drop for TensorBuf {
    fn drop(&mut self) {
        if let BufInner::Foreign {
            ptr,
            len,
            cap,
            free,
        } = self.0
        {
            // SAFETY: guaranteed by `TensorBuf::foreign`'s contract.
            unsafe { free(ptr, len, cap) }
        }
    }
}

impl std::fmt::Debug for TensorBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorBuf({} values)", self.len())
    }
}

/// How a method uses the base model (θ⁰).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// The method is defined on deltas θʲ − θ⁰: a base is required.
    Required,
    /// Used when given.
    Optional,
    /// Not used; a base that is also listed as a model is merged as a model.
    Ignored,
}

/// What a method accepts, checked by the planner before any compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputContract {
    pub base: BaseUse,
    /// Bounds on the number of models besides the base.
    pub min_models: usize,
    pub max_models: Option<usize>,
}

/// The span over which a method aggregates a statistic before merging (VaRM
/// at granularity `layer` or `model`). The engine then runs a statistics
/// pre-pass over all tensors and passes each tensor its scope's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatScope {
    Tensor,
    Layer,
    Model,
}

/// One aligned group of input tensors, all of the same shape, in f32.
pub struct TensorGroup<'a> {
    /// Output tensor name, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub name: &'a str,
    /// Decoder layer index of the output tensor, `None` outside the layers.
    pub layer: Option<usize>,
    pub shape: &'a [usize],
    /// θ⁰, when the method uses a base.
    pub base: Option<TensorBuf>,
    /// θ¹..θⁿ in the order the request lists them (the base excluded).
    pub models: Vec<TensorBuf>,
    pub params: &'a ResolvedParams,
    /// The merge seed, for methods that draw random masks.
    pub seed: u64,
    /// Per-model statistic aggregated over this tensor's [`StatScope`], when the
    /// method asked for a pre-pass (mean over the scope's elements).
    pub scope_stats: Option<Vec<f64>>,
}

impl TensorGroup<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The base tensor, or an error naming the method's need for one.
    pub fn base(&self) -> Result<&[f32]> {
        self.base.as_deref().ok_or_else(|| {
            crate::Error::msg(format!(
                "tensor `{}`: this method needs a base model",
                self.name
            ))
        })
    }
}

/// A merged tensor, and optionally the effective weight of each input model
/// (reported in the merge summary, e.g. VaRM's per-tensor weights).
pub struct Merged {
    pub data: TensorBuf,
    pub weights: Option<Vec<f64>>,
}

impl Merged {
    pub fn new(data: impl Into<TensorBuf>) -> Self {
        Merged {
            data: data.into(),
            weights: None,
        }
    }
}

/// A merge method.
pub trait Merger: Send + Sync {
    /// Name, one-line description and parameter spec.
    fn info(&self) -> PluginInfo;

    /// What inputs the method accepts.
    fn contract(&self) -> InputContract;

    /// `Some(scope)` when the kernel needs a statistic aggregated over more
    /// than one tensor; the engine then calls [`Merger::statistic`] on every
    /// tensor first.
    fn stat_scope(&self, _params: &ResolvedParams) -> Option<StatScope> {
        None
    }

    /// Per-model `(sum, count)` of the method's statistic over this tensor.
    fn statistic(&self, group: &TensorGroup<'_>) -> Result<Vec<(f64, u64)>> {
        Err(crate::Error::msg(format!(
            "tensor `{}`: this method declares no statistic",
            group.name
        )))
    }

    /// Merge one tensor group. The group is passed by value so that a kernel
    /// can reuse an input buffer for its output.
    fn merge(&self, group: TensorGroup<'_>) -> Result<Merged>;
}
