//! The plugin registry: every extension point's plugins, with their name, a
//! one-line description and a parameter spec.
//!
//! Built-in plugins register themselves with `inventory::submit!` (see
//! [`BuiltinMerger`]); the registry collects them at start-up. Third-party
//! plugins loaded at run time join the same registry with their origin.

use crate::merge::params::{ResolvedParams, Scalar, Setting};
use crate::merge::Merger;
use crate::{Error, Result};
use std::collections::BTreeMap;
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

impl PluginKind {
    /// How messages list plugins of this kind: "known methods: ...".
    pub fn plural(self) -> &'static str {
        match self {
            PluginKind::Merger => "methods",
            PluginKind::Aligner => "aligners",
            PluginKind::Loss => "losses",
            PluginKind::Model => "families",
            PluginKind::Evaluator => "evaluators",
        }
    }
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
    /// Any string (a URL, a name).
    Text,
    /// A file's path; in `fusechat.toml`, relative to the config file.
    File,
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamType::Float => f.write_str("float"),
            ParamType::Int => f.write_str("int"),
            ParamType::Bool => f.write_str("bool"),
            ParamType::Choice(c) => write!(f, "one of {}", c.join("|")),
            ParamType::Text => f.write_str("text"),
            ParamType::File => f.write_str("file"),
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

/// The values a numeric parameter accepts: `min ≤ v ≤ max`, unless the
/// boolean parameter `unless` is set true (e.g. SLERP's `extrapolate`).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueRange {
    pub min: f64,
    pub max: f64,
    pub unless: Option<String>,
}

impl fmt::Display for ValueRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.min, self.max)
    }
}

/// A declared parameter. Built with a small builder:
/// `ParamSpec::float("t", Scope::Shared).required().range(0.0, 1.0).help("interpolation factor")`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub ty: ParamType,
    pub scope: Scope,
    pub default: Option<Scalar>,
    pub required: bool,
    pub help: String,
    /// Numeric parameters: the accepted values (every number must be finite).
    pub range: Option<ValueRange>,
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
            range: None,
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
    /// Free text: a URL, a name.
    pub fn text(name: &str, scope: Scope) -> Self {
        Self::new(name, ParamType::Text, scope)
    }
    /// A file's path.
    pub fn file(name: &str, scope: Scope) -> Self {
        Self::new(name, ParamType::File, scope)
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
    /// Accept only `min ≤ v ≤ max`.
    pub fn range(mut self, min: f64, max: f64) -> Self {
        self.range = Some(ValueRange {
            min,
            max,
            unless: None,
        });
        self
    }
    /// With [`ParamSpec::range`]: the range does not apply when the boolean
    /// parameter `flag` is set true.
    pub fn unless(mut self, flag: &str) -> Self {
        if let Some(r) = &mut self.range {
            r.unless = Some(flag.to_string());
        }
        self
    }

    /// The problem with a value of this parameter, if any: a number that is
    /// not finite or lies outside the range. `flag_set` says whether a
    /// boolean parameter of the same plugin is set true.
    pub fn check_value(&self, value: &Setting, flag_set: &dyn Fn(&str) -> bool) -> Option<String> {
        let numbers = value.numbers();
        if let Some(v) = numbers.iter().find(|v| !v.is_finite()) {
            return Some(format!(
                "parameter `{}` is {v}; use a finite number",
                self.name
            ));
        }
        let r = self.range.as_ref()?;
        if r.unless.as_deref().is_some_and(flag_set) {
            return None;
        }
        let v = numbers.iter().find(|v| **v < r.min || **v > r.max)?;
        let hint = match &r.unless {
            Some(flag) => format!(" (set `{flag} = true` to allow it)"),
            None => String::new(),
        };
        Some(format!(
            "parameter `{}` is {v}, outside its range {r}{hint}",
            self.name
        ))
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

impl PluginInfo {
    /// How messages name this plugin: "aligner `mined`".
    pub fn label(&self) -> String {
        format!("{} `{}`", self.kind, self.name)
    }

    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }

    fn known_params(&self) -> String {
        if self.params.is_empty() {
            return "none".into();
        }
        self.params
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The problem with a parameter given by name, if any: a name the plugin does
    /// not declare (the message lists those it does), a value of the wrong type
    /// or out of range, or a shared parameter set for one model. `of` names the
    /// model whose setting it is ("model `a`"); `None` for the plugin's own
    /// settings. `shared` holds the plugin's own settings (for `unless` flags).
    pub fn check_setting(
        &self,
        name: &str,
        value: &Setting,
        of: Option<&str>,
        shared: &crate::merge::params::Settings,
    ) -> Option<String> {
        let whose = of.map(|o| format!(" of {o}")).unwrap_or_default();
        let Some(spec) = self.param(name) else {
            return Some(format!(
                "unknown parameter `{name}`{whose} for {} (known: {})",
                self.label(),
                self.known_params()
            ));
        };
        if let (Some(of), Scope::Shared) = (of, spec.scope) {
            return Some(format!(
                "parameter `{name}` of {} is shared by all models; set it in the merge's parameters, not for {of}",
                self.label()
            ));
        }
        if let Err(msg) = value.check_type(&spec.ty) {
            return Some(format!(
                "parameter `{name}`{whose}: {msg} (for {})",
                self.label()
            ));
        }
        let flag_set = |flag: &str| {
            shared.get(flag) == Some(&Setting::Scalar(Scalar::Bool(true)))
                || self.param(flag).and_then(|p| p.default.as_ref()) == Some(&Scalar::Bool(true))
                    && !shared.contains_key(flag)
        };
        spec.check_value(value, &flag_set)
            .map(|msg| format!("{msg}{whose} (for {})", self.label()))
    }

    /// Resolve single-valued parameters (aligners and the other per-stage
    /// plugins): every given name must be declared and well typed, required ones
    /// must be given, and defaults fill the rest. All problems are reported together.
    pub fn resolve_scalars(&self, given: &BTreeMap<String, Scalar>) -> Result<ResolvedParams> {
        let settings: crate::merge::params::Settings = given
            .iter()
            .map(|(k, v)| (k.clone(), Setting::Scalar(v.clone())))
            .collect();
        let mut problems: Vec<String> = settings
            .iter()
            .filter_map(|(k, v)| self.check_setting(k, v, None, &settings))
            .collect();
        let mut out = ResolvedParams::default();
        for spec in &self.params {
            match given.get(&spec.name).or(spec.default.as_ref()) {
                Some(v) => {
                    if let Ok(v) = v.coerce(&spec.ty) {
                        out.shared.insert(spec.name.clone(), v);
                    }
                }
                None if spec.required => {
                    problems.push(format!("{} needs parameter `{}`", self.label(), spec.name))
                }
                None => {}
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(Error::invalid(self.label(), problems))
        }
    }
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

/// A registered plugin of any kind: the plugin, its (cached) description and
/// where it came from.
pub struct Entry<P: ?Sized> {
    pub plugin: Arc<P>,
    pub info: PluginInfo,
    pub origin: Origin,
}

impl<P: ?Sized> Clone for Entry<P> {
    fn clone(&self) -> Self {
        Entry {
            plugin: self.plugin.clone(),
            info: self.info.clone(),
            origin: self.origin.clone(),
        }
    }
}

pub type MergerEntry = Entry<dyn Merger>;
#[cfg(feature = "data")]
pub type AlignerEntry = Entry<dyn crate::data::align::VocabAligner>;
#[cfg(feature = "candle")]
pub type ModelEntry = Entry<dyn crate::model::SourceModel>;
#[cfg(all(feature = "candle", feature = "data"))]
pub type LossEntry = Entry<dyn crate::train::DistillLoss>;
#[cfg(all(feature = "candle", feature = "data"))]
pub type EvaluatorEntry = Entry<dyn crate::eval::Evaluator>;

/// What the registry needs of an extension point's trait. Adding a kind means
/// implementing this for `dyn TheTrait` and adding its list to [`Registry`].
pub trait Kind: Send + Sync {
    const KIND: PluginKind;
    /// The noun in messages: "merge method", "aligner", "model family".
    const NOUN: &'static str;
    fn describe(&self) -> PluginInfo;
    /// The built-ins of this kind linked into the binary.
    fn builtins() -> Vec<Arc<Self>>;
    fn list(r: &Registry) -> &Vec<Entry<Self>>;
    fn list_mut(r: &mut Registry) -> &mut Vec<Entry<Self>>;
    /// What `fusechat plugins` adds after the origin (a merger's input contract).
    fn note(&self) -> Option<String> {
        None
    }
}

impl Kind for dyn Merger {
    const KIND: PluginKind = PluginKind::Merger;
    const NOUN: &'static str = "merge method";
    fn describe(&self) -> PluginInfo {
        self.info()
    }
    fn builtins() -> Vec<Arc<Self>> {
        inventory::iter::<BuiltinMerger>
            .into_iter()
            .map(|b| (b.0)())
            .collect()
    }
    fn list(r: &Registry) -> &Vec<Entry<Self>> {
        &r.mergers
    }
    fn list_mut(r: &mut Registry) -> &mut Vec<Entry<Self>> {
        &mut r.mergers
    }
    fn note(&self) -> Option<String> {
        let c = self.contract();
        let base = match c.base {
            crate::merge::BaseUse::Required => "base required",
            crate::merge::BaseUse::Optional => "base optional",
            crate::merge::BaseUse::Ignored => "no base",
        };
        let models = match c.max_models {
            Some(m) if m == c.min_models => format!("{m} model(s)"),
            Some(m) => format!("{}-{m} models", c.min_models),
            None => format!("{}+ models", c.min_models),
        };
        let numerics = if self.mergekit_numerics() {
            "; numerics = mergekit"
        } else {
            ""
        };
        Some(format!("{base}; {models}{numerics}"))
    }
}

#[cfg(feature = "data")]
impl Kind for dyn crate::data::align::VocabAligner {
    const KIND: PluginKind = PluginKind::Aligner;
    const NOUN: &'static str = "aligner";
    fn describe(&self) -> PluginInfo {
        self.info()
    }
    fn builtins() -> Vec<Arc<Self>> {
        inventory::iter::<crate::data::align::BuiltinAligner>
            .into_iter()
            .map(|b| (b.0)())
            .collect()
    }
    fn list(r: &Registry) -> &Vec<Entry<Self>> {
        &r.aligners
    }
    fn list_mut(r: &mut Registry) -> &mut Vec<Entry<Self>> {
        &mut r.aligners
    }
}

#[cfg(feature = "candle")]
impl Kind for dyn crate::model::SourceModel {
    const KIND: PluginKind = PluginKind::Model;
    const NOUN: &'static str = "model family";
    fn describe(&self) -> PluginInfo {
        self.info()
    }
    fn builtins() -> Vec<Arc<Self>> {
        inventory::iter::<crate::model::BuiltinModel>
            .into_iter()
            .map(|b| (b.0)())
            .collect()
    }
    fn list(r: &Registry) -> &Vec<Entry<Self>> {
        &r.models
    }
    fn list_mut(r: &mut Registry) -> &mut Vec<Entry<Self>> {
        &mut r.models
    }
}

#[cfg(all(feature = "candle", feature = "data"))]
impl Kind for dyn crate::train::DistillLoss {
    const KIND: PluginKind = PluginKind::Loss;
    const NOUN: &'static str = "loss";
    fn describe(&self) -> PluginInfo {
        self.info()
    }
    fn builtins() -> Vec<Arc<Self>> {
        inventory::iter::<crate::train::BuiltinLoss>
            .into_iter()
            .map(|b| (b.0)())
            .collect()
    }
    fn list(r: &Registry) -> &Vec<Entry<Self>> {
        &r.losses
    }
    fn list_mut(r: &mut Registry) -> &mut Vec<Entry<Self>> {
        &mut r.losses
    }
}

#[cfg(all(feature = "candle", feature = "data"))]
impl Kind for dyn crate::eval::Evaluator {
    const KIND: PluginKind = PluginKind::Evaluator;
    const NOUN: &'static str = "evaluator";
    fn describe(&self) -> PluginInfo {
        self.info()
    }
    fn builtins() -> Vec<Arc<Self>> {
        inventory::iter::<crate::eval::BuiltinEvaluator>
            .into_iter()
            .map(|b| (b.0)())
            .collect()
    }
    fn list(r: &Registry) -> &Vec<Entry<Self>> {
        &r.evaluators
    }
    fn list_mut(r: &mut Registry) -> &mut Vec<Entry<Self>> {
        &mut r.evaluators
    }
}

/// One line of `fusechat plugins`, whatever the kind.
pub struct Listing<'a> {
    pub info: &'a PluginInfo,
    pub origin: &'a Origin,
    pub note: Option<String>,
}

/// All plugins known to this process.
#[derive(Clone, Default)]
pub struct Registry {
    mergers: Vec<MergerEntry>,
    #[cfg(feature = "data")]
    aligners: Vec<AlignerEntry>,
    #[cfg(feature = "candle")]
    models: Vec<ModelEntry>,
    #[cfg(all(feature = "candle", feature = "data"))]
    losses: Vec<LossEntry>,
    #[cfg(all(feature = "candle", feature = "data"))]
    evaluators: Vec<EvaluatorEntry>,
}

impl Registry {
    /// The built-in plugins linked into this binary.
    pub fn builtin() -> Registry {
        let mut r = Registry::default();
        r.add_builtins::<dyn Merger>();
        #[cfg(feature = "data")]
        r.add_builtins::<dyn crate::data::align::VocabAligner>();
        #[cfg(feature = "candle")]
        r.add_builtins::<dyn crate::model::SourceModel>();
        #[cfg(all(feature = "candle", feature = "data"))]
        r.add_builtins::<dyn crate::train::DistillLoss>();
        #[cfg(all(feature = "candle", feature = "data"))]
        r.add_builtins::<dyn crate::eval::Evaluator>();
        r
    }

    fn add_builtins<P: Kind + ?Sized>(&mut self) {
        for p in P::builtins() {
            // Two built-ins with one name is a programming error caught by the registry test.
            let _ = self.add(p, Origin::BuiltIn);
        }
    }

    /// Every plugin of kind `P`, by name.
    pub fn all<P: Kind + ?Sized>(&self) -> &[Entry<P>] {
        P::list(self)
    }

    /// A plugin of kind `P` by name; an unknown name lists the known ones.
    pub fn get<P: Kind + ?Sized>(&self, name: &str) -> Result<&Entry<P>> {
        let list = P::list(self);
        list.iter().find(|e| e.info.name == name).ok_or_else(|| {
            Error::Plugin(format!(
                "unknown {} `{name}`; known {}: {}",
                P::NOUN,
                P::KIND.plural(),
                names(list)
            ))
        })
    }

    /// Add a plugin; a name already taken is an error naming both origins.
    pub fn add<P: Kind + ?Sized>(&mut self, plugin: Arc<P>, origin: Origin) -> Result<()> {
        let info = plugin.describe();
        let list = P::list_mut(self);
        if let Some(prev) = list.iter().find(|e| e.info.name == info.name) {
            return Err(Error::Plugin(format!(
                "{} `{}` from {origin} clashes with the one from {}",
                P::KIND,
                info.name,
                prev.origin
            )));
        }
        list.push(Entry {
            plugin,
            info,
            origin,
        });
        list.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        Ok(())
    }

    /// Replace the plugin of the same name (the configured winner of a clash).
    pub fn replace<P: Kind + ?Sized>(&mut self, plugin: Arc<P>, origin: Origin) {
        let name = plugin.describe().name;
        P::list_mut(self).retain(|e| e.info.name != name);
        let _ = self.add(plugin, origin);
    }

    /// Every plugin of every kind, by kind and then name (`fusechat plugins`).
    pub fn listing(&self) -> Vec<Listing<'_>> {
        fn of<P: Kind + ?Sized + 'static>(r: &Registry) -> impl Iterator<Item = Listing<'_>> {
            P::list(r).iter().map(|e| Listing {
                info: &e.info,
                origin: &e.origin,
                note: e.plugin.note(),
            })
        }
        let mut v: Vec<Listing<'_>> = of::<dyn Merger>(self).collect();
        #[cfg(feature = "candle")]
        v.extend(of::<dyn crate::model::SourceModel>(self));
        #[cfg(feature = "data")]
        v.extend(of::<dyn crate::data::align::VocabAligner>(self));
        #[cfg(all(feature = "candle", feature = "data"))]
        v.extend(of::<dyn crate::train::DistillLoss>(self));
        #[cfg(all(feature = "candle", feature = "data"))]
        v.extend(of::<dyn crate::eval::Evaluator>(self));
        v
    }

    /// An evaluator by name.
    #[cfg(all(feature = "candle", feature = "data"))]
    pub fn evaluator(&self, name: &str) -> Result<&EvaluatorEntry> {
        self.get(name)
    }

    /// A distillation loss by name.
    #[cfg(all(feature = "candle", feature = "data"))]
    pub fn loss(&self, name: &str) -> Result<&LossEntry> {
        self.get(name)
    }

    pub fn mergers(&self) -> &[MergerEntry] {
        self.all()
    }

    /// A merger by name.
    pub fn merger(&self, name: &str) -> Result<&MergerEntry> {
        self.get(name)
    }

    #[cfg(feature = "data")]
    pub fn aligners(&self) -> &[AlignerEntry] {
        self.all()
    }

    /// An aligner by name.
    #[cfg(feature = "data")]
    pub fn aligner(&self, name: &str) -> Result<&AlignerEntry> {
        self.get(name)
    }

    #[cfg(feature = "candle")]
    pub fn models(&self) -> &[ModelEntry] {
        self.all()
    }

    /// A model family by name.
    #[cfg(feature = "candle")]
    pub fn model(&self, name: &str) -> Result<&ModelEntry> {
        self.get(name)
    }

    /// The first family that recognises a config.json.
    #[cfg(feature = "candle")]
    pub fn detect_model(&self, config: &serde_json::Value) -> Option<&ModelEntry> {
        self.models.iter().find(|e| e.plugin.detects(config))
    }
}

fn names<P: ?Sized>(list: &[Entry<P>]) -> String {
    list.iter()
        .map(|e| e.info.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
