//! The plugin registry: every extension point's plugins, with their name, a
//! one-line description and a parameter spec.
//!
//! Built-in plugins register themselves with `inventory::submit!` (see
//! [`BuiltinMerger`]); the registry collects them at start-up. Third-party
//! plugins loaded at run time join the same registry with their origin.

use crate::merge::Merger;
use crate::params::Scalar;
use crate::{Error, Result};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// The extension points. Only mergers exist so far; the others are listed so that
/// `fusechat plugins` and the ABI can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PluginKind {
    Merger,
    Aligner,
    Loss,
    Model,
    Evaluator,
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Merger => "merger",
            PluginKind::Aligner => "aligner",
            PluginKind::Loss => "loss",
            PluginKind::Model => "model",
            PluginKind::Evaluator => "evaluator",
        })
    }
}

/// The type of a parameter's value.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamType {
    Float,
    Int,
    Bool,
    /// One of a fixed list of strings.
    Choice(Vec<String>),
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamType::Float => f.write_str("float"),
            ParamType::Int => f.write_str("int"),
            ParamType::Bool => f.write_str("bool"),
            ParamType::Choice(c) => write!(f, "one of {}", c.join("|")),
        }
    }
}

/// Whether a parameter has one value for the merge (`Shared`) or one per input model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Shared,
    PerModel,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Shared => "shared",
            Scope::PerModel => "per-model",
        })
    }
}

/// A declared parameter. Built with a small builder:
/// `ParamSpec::float("t", Scope::Shared).required().help("interpolation factor")`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub ty: ParamType,
    pub scope: Scope,
    pub default: Option<Scalar>,
    pub required: bool,
    pub help: String,
}

impl ParamSpec {
    pub fn new(name: &str, ty: ParamType, scope: Scope) -> Self {
        ParamSpec {
            name: name.to_string(),
            ty,
            scope,
            default: None,
            required: false,
            help: String::new(),
        }
    }
    pub fn float(name: &str, scope: Scope) -> Self {
        Self::new(name, ParamType::Float, scope)
    }
    pub fn int(name: &str, scope: Scope) -> Self {
        Self::new(name, ParamType::Int, scope)
    }
    pub fn bool(name: &str, scope: Scope) -> Self {
        Self::new(name, ParamType::Bool, scope)
    }
    pub fn choice(name: &str, choices: &[&str], scope: Scope) -> Self {
        Self::new(
            name,
            ParamType::Choice(choices.iter().map(|s| s.to_string()).collect()),
            scope,
        )
    }
    pub fn default(mut self, v: impl Into<Scalar>) -> Self {
        self.default = Some(v.into());
        self
    }
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }
    pub fn help(mut self, h: &str) -> Self {
        self.help = h.to_string();
        self
    }
}

impl From<f64> for Scalar {
    fn from(v: f64) -> Self {
        Scalar::Float(v)
    }
}
impl From<bool> for Scalar {
    fn from(v: bool) -> Self {
        Scalar::Bool(v)
    }
}
impl From<i64> for Scalar {
    fn from(v: i64) -> Self {
        Scalar::Int(v)
    }
}
impl From<&str> for Scalar {
    fn from(v: &str) -> Self {
        Scalar::Str(v.to_string())
    }
}

/// What a plugin says about itself.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    pub kind: PluginKind,
    pub name: String,
    pub description: String,
    pub params: Vec<ParamSpec>,
}

/// Where a registered plugin came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    BuiltIn,
    Library(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltIn => f.write_str("built-in"),
            Origin::Library(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A built-in merger, submitted by its plugin file:
/// `inventory::submit! { BuiltinMerger(|| Arc::new(Linear)) }`.
pub struct BuiltinMerger(pub fn() -> Arc<dyn Merger>);
inventory::collect!(BuiltinMerger);

/// A registered merger with its (cached) description and origin.
#[derive(Clone)]
pub struct MergerEntry {
    pub merger: Arc<dyn Merger>,
    pub info: PluginInfo,
    pub origin: Origin,
}

/// A registered model family.
#[cfg(feature = "candle")]
#[derive(Clone)]
pub struct ModelEntry {
    pub model: Arc<dyn crate::model::SourceModel>,
    pub info: PluginInfo,
    pub origin: Origin,
}

/// A registered vocabulary aligner.
#[cfg(feature = "data")]
#[derive(Clone)]
pub struct AlignerEntry {
    pub aligner: Arc<dyn crate::align::VocabAligner>,
    pub info: PluginInfo,
    pub origin: Origin,
}

/// All plugins known to this process.
#[derive(Clone, Default)]
pub struct Registry {
    mergers: Vec<MergerEntry>,
    #[cfg(feature = "data")]
    aligners: Vec<AlignerEntry>,
    #[cfg(feature = "candle")]
    models: Vec<ModelEntry>,
}

impl Registry {
    /// The built-in plugins linked into this binary.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        for b in inventory::iter::<BuiltinMerger> {
            let merger = (b.0)();
            // Two built-ins with one name is a programming error caught by the registry test.
            let _ = r.add_merger(merger, Origin::BuiltIn);
        }
        r.mergers.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        #[cfg(feature = "candle")]
        for b in inventory::iter::<crate::model::BuiltinModel> {
            let model = (b.0)();
            let info = model.info();
            r.models.push(ModelEntry {
                model,
                info,
                origin: Origin::BuiltIn,
            });
        }
        #[cfg(feature = "candle")]
        r.models.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        #[cfg(feature = "data")]
        for b in inventory::iter::<crate::align::BuiltinAligner> {
            let aligner = (b.0)();
            let info = aligner.info();
            r.aligners.push(AlignerEntry {
                aligner,
                info,
                origin: Origin::BuiltIn,
            });
        }
        #[cfg(feature = "data")]
        r.aligners.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        r
    }

    /// The vocabulary aligners.
    #[cfg(feature = "data")]
    pub fn aligners(&self) -> &[AlignerEntry] {
        &self.aligners
    }

    /// An aligner by name; an unknown name lists the known ones.
    #[cfg(feature = "data")]
    pub fn aligner(&self, name: &str) -> Result<&AlignerEntry> {
        self.aligners
            .iter()
            .find(|e| e.info.name == name)
            .ok_or_else(|| {
                Error::Plugin(format!(
                    "unknown aligner `{name}`; known aligners: {}",
                    self.aligners
                        .iter()
                        .map(|e| e.info.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// The model families.
    #[cfg(feature = "candle")]
    pub fn models(&self) -> &[ModelEntry] {
        &self.models
    }

    /// A model family by name; an unknown name lists the known ones.
    #[cfg(feature = "candle")]
    pub fn model(&self, name: &str) -> Result<&ModelEntry> {
        self.models
            .iter()
            .find(|e| e.info.name == name)
            .ok_or_else(|| {
                Error::Plugin(format!(
                    "unknown model family `{name}`; known families: {}",
                    self.models
                        .iter()
                        .map(|e| e.info.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// The first family that recognises a config.json.
    #[cfg(feature = "candle")]
    pub fn detect_model(&self, config: &serde_json::Value) -> Option<&ModelEntry> {
        self.models.iter().find(|e| e.model.detects(config))
    }

    /// Add a merger; a name already taken is an error naming both origins.
    pub fn add_merger(&mut self, merger: Arc<dyn Merger>, origin: Origin) -> Result<()> {
        let info = merger.info();
        if let Some(prev) = self.mergers.iter().find(|e| e.info.name == info.name) {
            return Err(Error::Plugin(format!(
                "merger `{}` from {origin} clashes with the one from {}",
                info.name, prev.origin
            )));
        }
        self.mergers.push(MergerEntry {
            merger,
            info,
            origin,
        });
        Ok(())
    }

    /// Replace the merger of the same name (the configured winner of a clash).
    pub fn replace_merger(&mut self, merger: Arc<dyn Merger>, origin: Origin) {
        let info = merger.info();
        self.mergers.retain(|e| e.info.name != info.name);
        self.mergers.push(MergerEntry {
            merger,
            info,
            origin,
        });
        self.mergers.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    }

    pub fn mergers(&self) -> &[MergerEntry] {
        &self.mergers
    }

    /// Look a merger up by name; an unknown name lists the known ones.
    pub fn merger(&self, name: &str) -> Result<&MergerEntry> {
        self.mergers
            .iter()
            .find(|e| e.info.name == name)
            .ok_or_else(|| {
                Error::Plugin(format!(
                    "unknown merge method `{name}`; known methods: {}",
                    self.mergers
                        .iter()
                        .map(|e| e.info.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }
}
