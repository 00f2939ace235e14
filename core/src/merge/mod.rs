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
pub mod pool;
pub mod vocab;

use crate::merge::params::ResolvedParams;
use crate::plugin::registry::PluginInfo;
use crate::Result;
use std::ops::{Deref, DerefMut};

/// A flat f32 tensor buffer that a kernel may read, overwrite in place and
/// return as its output. It derefs to `[f32]`.
///
/// In fusechat it owns its memory (a `Vec`). Inside a plugin loaded at run
/// time it may instead borrow the host's buffer for the duration of one call
/// (`'a`), so nothing is copied across the boundary: exclusively
/// ([`TensorBuf::borrowed`], writable in place) or shared
/// ([`TensorBuf::shared`], read-only: the first write copies it). The lifetime
/// keeps safe code from holding a borrowed buffer past the call. A buffer the
/// plugin allocated is held by the host as [`TensorBuf::foreign`], with the
/// library kept loaded until it is released.
///
/// A borrowed buffer cannot be kept past its borrow, in a static or a thread:
///
/// ```compile_fail
/// use fusechat_core::merge::TensorBuf;
/// static KEPT: std::sync::Mutex<Option<TensorBuf<'static>>> = std::sync::Mutex::new(None);
/// fn kernel(b: TensorBuf<'_>) {
///     *KEPT.lock().unwrap() = Some(b); // error: borrowed data escapes
/// }
/// ```
///
/// ```compile_fail
/// use fusechat_core::merge::TensorBuf;
/// fn kernel(b: TensorBuf<'_>) {
///     std::thread::spawn(move || drop(b)); // error: `b` must be 'static
/// }
/// ```
///
/// Writing a shared buffer copies it; the lender's memory never changes:
///
/// ```
/// use fusechat_core::merge::TensorBuf;
/// let host = vec![1.0f32, 2.0];
/// let mut b = TensorBuf::shared(&host);
/// b[0] = 5.0;
/// assert_eq!((&b[..], &host[..]), (&[5.0, 2.0][..], &[1.0, 2.0][..]));
/// ```
#[derive(Default)]
pub struct TensorBuf<'a>(BufInner<'a>);

#[derive(Default)]
enum BufInner<'a> {
    Owned(Vec<f32>),
    /// Someone else's memory, exclusively ours for `'a`.
    Borrowed(&'a mut [f32]),
    /// Someone else's memory, shared for `'a`; copied into `Owned` on first write.
    Shared(&'a [f32]),
    /// Memory from another allocator, released by `free` on drop; `_keep`
    /// holds whatever must outlive it (the plugin library that made it).
    Foreign {
        ptr: *mut f32,
        len: usize,
        cap: usize,
        free: unsafe extern "C" fn(*mut f32, usize, usize),
        _keep: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    },
    #[default]
    Empty,
}

// SAFETY: the `Foreign` form is the only handle to its memory (its
// constructor's contract), and `free` may be called from any thread (the ABI
// says so); the other forms are Send by their parts.
unsafe impl Send for TensorBuf<'_> {}

impl<'a> TensorBuf<'a> {
    /// Borrow `data` exclusively for `'a`: a kernel may compute in place and
    /// return it.
    pub fn borrowed(data: &'a mut [f32]) -> TensorBuf<'a> {
        TensorBuf(BufInner::Borrowed(data))
    }

    /// Borrow `data` read-only for `'a`; writing copies it first.
    pub fn shared(data: &'a [f32]) -> TensorBuf<'a> {
        TensorBuf(BufInner::Shared(data))
    }

    /// Take ownership of memory that must be released by `free(ptr, len, cap)`,
    /// keeping `keep` alive until then.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` f32 values and not be
    /// accessed through any other path while the buffer lives, and `free` must
    /// accept these arguments once, from any thread, while `keep` is alive.
    pub unsafe fn foreign(
        ptr: *mut f32,
        len: usize,
        cap: usize,
        free: unsafe extern "C" fn(*mut f32, usize, usize),
        keep: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) -> TensorBuf<'static> {
        TensorBuf(BufInner::Foreign {
            ptr,
            len,
            cap,
            free,
            _keep: keep,
        })
    }

    /// The start of the data (for identity checks across the plugin boundary).
    pub fn as_ptr(&self) -> *const f32 {
        self.deref().as_ptr()
    }

    /// The owned vector, when this buffer owns one (`Err(self)` otherwise).
    pub fn into_vec(mut self) -> std::result::Result<Vec<f32>, TensorBuf<'a>> {
        match std::mem::take(&mut self.0) {
            BufInner::Owned(v) => Ok(v),
            BufInner::Empty => Ok(Vec::new()),
            other => Err(TensorBuf(other)),
        }
    }
}

impl From<Vec<f32>> for TensorBuf<'_> {
    fn from(v: Vec<f32>) -> Self {
        TensorBuf(BufInner::Owned(v))
    }
}

impl Deref for TensorBuf<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.0 {
            BufInner::Owned(v) => v,
            BufInner::Borrowed(s) => s,
            BufInner::Shared(s) => s,
            // SAFETY: guaranteed by `TensorBuf::foreign`'s contract.
            BufInner::Foreign { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            BufInner::Empty => &[],
        }
    }
}

impl DerefMut for TensorBuf<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        if let BufInner::Shared(s) = self.0 {
            self.0 = BufInner::Owned(s.to_vec());
        }
        match &mut self.0 {
            BufInner::Owned(v) => v,
            BufInner::Borrowed(s) => s,
            BufInner::Shared(_) => unreachable!("copied above"),
            // SAFETY: guaranteed by `TensorBuf::foreign`'s contract.
            BufInner::Foreign { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(*ptr, *len)
            },
            BufInner::Empty => &mut [],
        }
    }
}

impl<'b> IntoIterator for &'b TensorBuf<'_> {
    type Item = &'b f32;
    type IntoIter = std::slice::Iter<'b, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl Drop for TensorBuf<'_> {
    fn drop(&mut self) {
        if let BufInner::Owned(v) = &mut self.0 {
            // back to the merge engine's pool while a merge runs (else freed)
            pool::give(std::mem::take(v));
            return;
        }
        if let BufInner::Foreign {
            ptr,
            len,
            cap,
            free,
            ..
        } = self.0
        {
            // SAFETY: guaranteed by `TensorBuf::foreign`'s contract; the
            // library that made the buffer is still held by `_keep`.
            unsafe { free(ptr, len, cap) }
        }
    }
}

impl std::fmt::Debug for TensorBuf<'_> {
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
    pub base: Option<TensorBuf<'a>>,
    /// θ¹..θⁿ in the order the request lists them (the base excluded).
    pub models: Vec<TensorBuf<'a>>,
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
/// (reported in the merge summary, e.g. VaRM's per-tensor weights). Its data
/// may be one of the group's input buffers, reused in place (`'a`).
pub struct Merged<'a> {
    pub data: TensorBuf<'a>,
    pub weights: Option<Vec<f64>>,
}

impl<'a> Merged<'a> {
    pub fn new(data: impl Into<TensorBuf<'a>>) -> Self {
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
    fn stat_scope(&self, _params: &ResolvedParams) -> Result<Option<StatScope>> {
        Ok(None)
    }

    /// Combinations of one tensor's resolved parameters that the method cannot
    /// use (a single value's type and range are checked from its
    /// `ParamSpec`), as `(parameter, model position or None, message)`. The
    /// planner asks for every tensor, so they are reported before anything runs.
    fn check_params(&self, _params: &ResolvedParams) -> Vec<(String, Option<usize>, String)> {
        Vec::new()
    }

    /// Whether the kernel implements `numerics = "mergekit"`: when
    /// [`ResolvedParams::round_ops`] is set, it computes in that dtype with
    /// mergekit's order of operations and a rounding after each. The planner
    /// refuses the mode for a method that says no.
    fn mergekit_numerics(&self) -> bool {
        false
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
    ///
    /// fusechat calls `merge` and `statistic` on one instance from several
    /// threads at once (tensors are merged in parallel): hence `Send + Sync`.
    fn merge<'a>(&self, group: TensorGroup<'a>) -> Result<Merged<'a>>;
}
