//! The `Merger` extension point: a merge method is a declaration (name,
//! parameters, input contract) plus a pure per-tensor kernel.
//!
//! The planner resolves every parameter for every tensor before a kernel runs
//! (layer gradients, filters, precedence), loads the aligned inputs as f32 and
//! hands the kernel one [`TensorGroup`]. Kernels never parse config and never
//! touch files; they compute in f32 and return the merged tensor.

use crate::params::ResolvedParams;
use crate::registry::PluginInfo;
use crate::Result;

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
    pub base: Option<Vec<f32>>,
    /// θ¹..θⁿ in the order the request lists them (the base excluded).
    pub models: Vec<Vec<f32>>,
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
    pub data: Vec<f32>,
    pub weights: Option<Vec<f64>>,
}

impl Merged {
    pub fn new(data: Vec<f32>) -> Self {
        Merged {
            data,
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
