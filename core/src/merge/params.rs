//! Merge parameters as mergekit resolves them.
//!
//! A parameter *setting* is one of:
//! - a scalar (`0.5`, `true`, `"l1"`);
//! - a layer gradient, a list of numbers `[v0, .., vK-1]` interpolated
//!   piecewise-linearly at `t = layer / (num_layers - 1)`: at `t`, with
//!   `s = t·(K-1)`, `i = floor(s)`, the value is `(1-(s-i))·v[i] + (s-i)·v[i+1]`.
//!   Tensors outside the decoder layers (embeddings, final norm, lm_head) use `t = 0`, i.e. `v0`;
//! - a list of `{filter, value}` rules: the first rule whose `filter` is a substring of the
//!   tensor name (or that has no filter) gives the value, itself a scalar or a gradient. If no
//!   rule matches, resolution falls through to the next level.
//!
//! Precedence for a per-model parameter: the model's own setting, then the global one, then
//! the method's default. Shared parameters come from the global settings or the default.
//!
//! ```
//! use fusechat_core::merge::params::{Setting, Scalar};
//! let s = Setting::from_json(&serde_json::json!([0.0, 0.5, 0.3, 0.7, 1.0])).unwrap();
//! // layer 8 of 32: t = 8/31, s = 1.032..., between 0.5 and 0.3
//! let v = s.evaluate("model.layers.8.self_attn.q_proj.weight", 8.0 / 31.0).unwrap();
//! assert!((v.as_f64().unwrap() - 0.493548).abs() < 1e-6);
//! ```

use crate::plugin::registry::{ParamSpec, ParamType};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// A resolved parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(String),
}

impl Scalar {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Float(f) => Some(*f),
            Scalar::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn to_json(&self) -> Value {
        match self {
            Scalar::Float(f) => serde_json::json!(f),
            Scalar::Int(i) => serde_json::json!(i),
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Str(s) => Value::String(s.clone()),
        }
    }

    /// Check (and coerce) a value against a declared type: ints are accepted as
    /// floats, integral floats as ints, and `true`/`false` as a choice when the
    /// choice list names them.
    pub fn coerce(&self, ty: &ParamType) -> crate::Result<Scalar> {
        match (ty, self) {
            (ParamType::Float, Scalar::Float(_)) => Ok(self.clone()),
            (ParamType::Float, Scalar::Int(i)) => Ok(Scalar::Float(*i as f64)),
            (ParamType::Int, Scalar::Int(_)) => Ok(self.clone()),
            (ParamType::Int, Scalar::Float(f)) if f.fract() == 0.0 => Ok(Scalar::Int(*f as i64)),
            (ParamType::Bool, Scalar::Bool(_)) => Ok(self.clone()),
            (ParamType::Choice(choices), Scalar::Str(s)) if choices.iter().any(|c| c == s) => {
                Ok(self.clone())
            }
            (ParamType::Choice(choices), Scalar::Bool(b))
                if choices.iter().any(|c| c == &b.to_string()) =>
            {
                Ok(Scalar::Str(b.to_string()))
            }
            (ParamType::Text | ParamType::File, Scalar::Str(_)) => Ok(self.clone()),
            // `--set model_id=7` parses as a number: as text it is what was written
            (ParamType::Text, Scalar::Int(i)) => Ok(Scalar::Str(i.to_string())),
            (ParamType::Text, Scalar::Float(f)) => Ok(Scalar::Str(f.to_string())),
            (ParamType::Text, Scalar::Bool(b)) => Ok(Scalar::Str(b.to_string())),
            _ => Err(bad(format!("expected {ty}, got {self}"))),
        }
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Float(v) => write!(f, "{v}"),
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Str(v) => write!(f, "\"{v}\""),
        }
    }
}

/// One filter rule: `{filter = "self_attn", value = [0, 1]}`; no filter matches every tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterRule {
    pub filter: Option<String>,
    pub value: Setting,
}

/// A parameter setting as written in a config, before it is resolved for a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Scalar(Scalar),
    Gradient(Vec<f64>),
    Filters(Vec<FilterRule>),
}

impl Setting {
    /// Parse a setting from JSON (TOML and YAML configs are converted to JSON values first).
    pub fn from_json(v: &Value) -> crate::Result<Setting> {
        match v {
            Value::Bool(b) => Ok(Setting::Scalar(Scalar::Bool(*b))),
            Value::Number(n) => Ok(Setting::Scalar(match n.as_i64() {
                Some(i) => Scalar::Int(i),
                None => Scalar::Float(n.as_f64().ok_or_else(|| bad("number out of range"))?),
            })),
            Value::String(s) => Ok(Setting::Scalar(Scalar::Str(s.clone()))),
            Value::Array(items) if items.is_empty() => Err(bad("an empty list")),
            Value::Array(items) if items.iter().all(Value::is_number) => Ok(Setting::Gradient(
                items
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN))
                    .collect(),
            )),
            Value::Array(items) if items.iter().all(Value::is_object) => {
                let mut rules = Vec::with_capacity(items.len());
                for item in items {
                    let obj = item.as_object().expect("checked above");
                    if let Some(k) = obj.keys().find(|k| *k != "filter" && *k != "value") {
                        return Err(bad(format!(
                            "a filter rule has the unknown key `{k}` (allowed: filter, value)"
                        )));
                    }
                    let filter = match obj.get("filter") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(other) => {
                            return Err(bad(format!(
                                "a rule's `filter` must be a string, got {other}"
                            )))
                        }
                    };
                    let value = obj
                        .get("value")
                        .ok_or_else(|| bad("a filter rule has no `value`"))
                        .and_then(|v| {
                            Setting::from_json(v)
                                .map_err(|_| bad("a filter rule's `value` is invalid"))
                        })?;
                    if matches!(value, Setting::Filters(_)) {
                        return Err(bad("filter rules cannot be nested"));
                    }
                    rules.push(FilterRule { filter, value });
                }
                Ok(Setting::Filters(rules))
            }
            Value::Array(_) => Err(bad(
                "a list must be all numbers (a layer gradient) or all {filter, value} tables",
            )),
            Value::Null => Err(bad("an empty value")),
            Value::Object(_) => Err(bad(
                "a table is not a parameter value (a list of {filter, value} rules is)",
            )),
        }
    }

    /// The value of this setting for `tensor` at layer position `t` in [0, 1], or
    /// `None` when filter rules exist and none matches (fall through).
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<Scalar> {
        match self {
            Setting::Scalar(s) => Some(s.clone()),
            Setting::Gradient(v) => Some(Scalar::Float(interpolate(v, t))),
            Setting::Filters(rules) => rules
                .iter()
                .find(|r| r.filter.as_deref().is_none_or(|f| tensor.contains(f)))
                .and_then(|r| r.value.evaluate(tensor, t)),
        }
    }

    /// Every number the setting holds (scalars, gradient points, rule values).
    pub fn numbers(&self) -> Vec<f64> {
        match self {
            Setting::Scalar(s) => s.as_f64().into_iter().collect(),
            Setting::Gradient(v) => v.clone(),
            Setting::Filters(rules) => rules.iter().flat_map(|r| r.value.numbers()).collect(),
        }
    }

    /// Check every leaf of the setting against the declared type.
    pub fn check_type(&self, ty: &ParamType) -> crate::Result<()> {
        match self {
            Setting::Scalar(s) => s.coerce(ty).map(|_| ()),
            Setting::Gradient(_) if matches!(ty, ParamType::Float) => Ok(()),
            Setting::Gradient(_) => Err(bad(format!(
                "a layer gradient (list of numbers) only fits a float parameter; this one is {ty}"
            ))),
            Setting::Filters(rules) => rules.iter().try_for_each(|r| r.value.check_type(ty)),
        }
    }
}

/// A parameter value that does not fit (the message is shown as is, after
/// the caller's context).
fn bad(msg: impl Into<String>) -> crate::Error {
    crate::Error::Plugin(msg.into())
}

/// Piecewise-linear interpolation of `v` at `t` in [0, 1] (mergekit's gradient).
pub fn interpolate(v: &[f64], t: f64) -> f64 {
    if v.len() == 1 {
        return v[0];
    }
    let scaled = t.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let i0 = scaled.floor() as usize;
    let i1 = (i0 + 1).min(v.len() - 1);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * v[i0] + frac * v[i1]
}

/// Settings by parameter name.
pub type Settings = BTreeMap<String, Setting>;

/// Parameters resolved for one tensor: shared values and one map per model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResolvedParams {
    pub shared: BTreeMap<String, Scalar>,
    pub per_model: Vec<BTreeMap<String, Scalar>>,
    /// `numerics = "mergekit"`: compute in this dtype, rounding after every
    /// operation as PyTorch does (only for methods whose
    /// [`Merger::mergekit_numerics`](crate::merge::Merger::mergekit_numerics) is true).
    pub round_ops: Option<crate::io::dtype::DType>,
}

impl ResolvedParams {
    fn missing(name: &str) -> crate::Error {
        crate::Error::Plugin(format!("parameter `{name}` has no value"))
    }
    pub fn get(&self, name: &str) -> Option<&Scalar> {
        self.shared.get(name)
    }
    pub fn f64(&self, name: &str) -> crate::Result<f64> {
        self.get(name)
            .and_then(Scalar::as_f64)
            .ok_or_else(|| Self::missing(name))
    }
    pub fn bool(&self, name: &str) -> crate::Result<bool> {
        self.get(name)
            .and_then(Scalar::as_bool)
            .ok_or_else(|| Self::missing(name))
    }
    pub fn str(&self, name: &str) -> crate::Result<&str> {
        self.get(name)
            .and_then(Scalar::as_str)
            .ok_or_else(|| Self::missing(name))
    }
    /// A per-model float for every model, in model order.
    pub fn model_f64(&self, name: &str) -> crate::Result<Vec<f64>> {
        self.per_model
            .iter()
            .map(|m| {
                m.get(name)
                    .and_then(Scalar::as_f64)
                    .ok_or_else(|| Self::missing(name))
            })
            .collect()
    }

    /// Resolve every declared parameter for one tensor.
    ///
    /// Returns the values, or the problems (missing required values, a value
    /// that does not fit its type) as values, so that a caller planning many
    /// tensors can report each parameter and model once.
    pub fn resolve(
        specs: &[ParamSpec],
        global: &Settings,
        models: &[&Settings],
        tensor: &str,
        t: f64,
    ) -> Result<ResolvedParams, Vec<ParamProblem>> {
        use crate::plugin::registry::Scope;
        let mut out = ResolvedParams {
            shared: BTreeMap::new(),
            per_model: vec![BTreeMap::new(); models.len()],
            round_ops: None,
        };
        let mut problems = Vec::new();
        let missing = |spec: &ParamSpec, model| ParamProblem::Missing {
            param: spec.name.clone(),
            model,
            tensor: tensor.to_string(),
        };
        let coerce = |spec: &ParamSpec, model, v: Scalar| {
            v.coerce(&spec.ty).map_err(|msg| {
                vec![ParamProblem::Invalid {
                    param: spec.name.clone(),
                    model,
                    msg: msg.to_string(),
                }]
            })
        };
        for spec in specs {
            let from_global = global.get(&spec.name).and_then(|s| s.evaluate(tensor, t));
            let default = spec.default.clone();
            match spec.scope {
                Scope::Shared => match from_global.or(default) {
                    Some(v) => {
                        out.shared.insert(spec.name.clone(), coerce(spec, None, v)?);
                    }
                    None if spec.required => problems.push(missing(spec, None)),
                    None => {}
                },
                Scope::PerModel => {
                    for (i, m) in models.iter().enumerate() {
                        let own = m.get(&spec.name).and_then(|s| s.evaluate(tensor, t));
                        match own
                            .or_else(|| from_global.clone())
                            .or_else(|| default.clone())
                        {
                            Some(v) => {
                                out.per_model[i]
                                    .insert(spec.name.clone(), coerce(spec, Some(i), v)?);
                            }
                            None if spec.required => problems.push(missing(spec, Some(i))),
                            None => {}
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

/// Why a parameter has no usable value for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamProblem {
    /// A required parameter has no value for `tensor`.
    Missing {
        param: String,
        /// The model's position among the tensor's models, for a per-model parameter.
        model: Option<usize>,
        tensor: String,
    },
    /// A value (e.g. a method's default) that does not fit the declared type.
    Invalid {
        param: String,
        model: Option<usize>,
        msg: String,
    },
}

impl ParamProblem {
    /// The parameter concerned.
    pub fn param(&self) -> &str {
        match self {
            ParamProblem::Missing { param, .. } | ParamProblem::Invalid { param, .. } => param,
        }
    }
    /// The model's position among the tensor's models, for a per-model parameter.
    pub fn model(&self) -> Option<usize> {
        match self {
            ParamProblem::Missing { model, .. } | ParamProblem::Invalid { model, .. } => *model,
        }
    }
}

impl fmt::Display for ParamProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamProblem::Missing {
                param,
                model: None,
                tensor,
            } => write!(f, "required parameter `{param}` has no value for tensor `{tensor}`"),
            ParamProblem::Missing {
                param,
                model: Some(i),
                tensor,
            } => write!(
                f,
                "required per-model parameter `{param}` has no value for model #{} on tensor `{tensor}`",
                i + 1
            ),
            ParamProblem::Invalid { msg, .. } => f.write_str(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn gradient_matches_golden_slerp_t() {
        // ../shared/golden/fusechat_golden.json: slerp_t_self_attn / slerp_t_mlp (32 layers)
        let attn: [f64; 32] = [
            0.0, 0.064516, 0.129032, 0.193548, 0.258065, 0.322581, 0.387097, 0.451613, 0.493548,
            0.467742, 0.441935, 0.416129, 0.390323, 0.364516, 0.33871, 0.312903, 0.325806,
            0.377419, 0.429032, 0.480645, 0.532258, 0.583871, 0.635484, 0.687097, 0.729032,
            0.767742, 0.806452, 0.845161, 0.883871, 0.922581, 0.96129, 1.0,
        ];
        let mlp: [f64; 32] = [
            1.0, 0.935484, 0.870968, 0.806452, 0.741935, 0.677419, 0.612903, 0.548387, 0.506452,
            0.532258, 0.558065, 0.583871, 0.609677, 0.635484, 0.66129, 0.687097, 0.674194,
            0.622581, 0.570968, 0.519355, 0.467742, 0.416129, 0.364516, 0.312903, 0.270968,
            0.232258, 0.193548, 0.154839, 0.116129, 0.077419, 0.03871, 0.0,
        ];
        let t = Setting::from_json(&json!([
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5}
        ]))
        .unwrap();
        for layer in 0..32 {
            let pos = layer as f64 / 31.0;
            let a = t
                .evaluate(
                    &format!("model.layers.{layer}.self_attn.k_proj.weight"),
                    pos,
                )
                .unwrap();
            let m = t
                .evaluate(&format!("model.layers.{layer}.mlp.up_proj.weight"), pos)
                .unwrap();
            let n = t
                .evaluate(&format!("model.layers.{layer}.input_layernorm.weight"), pos)
                .unwrap();
            assert!(
                (a.as_f64().unwrap() - attn[layer]).abs() < 1e-6,
                "layer {layer}"
            );
            assert!(
                (m.as_f64().unwrap() - mlp[layer]).abs() < 1e-6,
                "layer {layer}"
            );
            assert_eq!(n.as_f64(), Some(0.5));
        }
    }

    #[test]
    fn filters_fall_through() {
        let s = Setting::from_json(&json!([{"filter": "mlp", "value": 0.3}])).unwrap();
        assert_eq!(
            s.evaluate("model.layers.0.mlp.up_proj.weight", 0.0),
            Some(Scalar::Float(0.3))
        );
        assert_eq!(s.evaluate("model.embed_tokens.weight", 0.0), None);
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(Setting::from_json(&json!([1, "a"])).is_err());
        assert!(Setting::from_json(&json!({"a": 1})).is_err());
        assert!(Setting::from_json(&json!([{"filter": "x"}])).is_err());
        assert!(Setting::from_json(&json!([{"filtr": "x", "value": 1}])).is_err());
        let g = Setting::from_json(&json!([0, 1])).unwrap();
        assert!(g.check_type(&ParamType::Bool).is_err());
        assert!(g.check_type(&ParamType::Float).is_ok());
    }

    #[test]
    fn unresolved_parameters_are_values_that_name_parameter_and_model() {
        use crate::plugin::registry::Scope;
        let specs = [
            ParamSpec::float("t", Scope::Shared).required(),
            ParamSpec::float("w", Scope::PerModel).required(),
        ];
        let mut own = Settings::new();
        own.insert("w".into(), Setting::from_json(&json!(0.5)).unwrap());
        let none = Settings::new();
        let err =
            ResolvedParams::resolve(&specs, &none, &[&own, &none], "x.weight", 0.0).unwrap_err();
        assert_eq!(
            err,
            [
                ParamProblem::Missing {
                    param: "t".into(),
                    model: None,
                    tensor: "x.weight".into()
                },
                ParamProblem::Missing {
                    param: "w".into(),
                    model: Some(1),
                    tensor: "x.weight".into()
                },
            ]
        );
        assert_eq!((err[1].param(), err[1].model()), ("w", Some(1)));
        assert_eq!(
            err[0].to_string(),
            "required parameter `t` has no value for tensor `x.weight`"
        );
        assert_eq!(
            err[1].to_string(),
            "required per-model parameter `w` has no value for model #2 on tensor `x.weight`"
        );
    }
}
