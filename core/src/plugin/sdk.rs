//! The plugin author's side of the run-time plugin ABI.
//!
//! A third-party merge method implements [`Merger`] exactly as a built-in
//! does, then exports it with one macro:
//!
//! ```ignore
//! struct MyMethod;
//! impl fusechat_core::merge::Merger for MyMethod { /* info, contract, merge */ }
//! fusechat_core::export_plugin!(MyMethod);
//! ```
//!
//! in a crate with `crate-type = ["cdylib"]` that depends on `fusechat-core`
//! with `default-features = false`. The macro generates the two exported C
//! functions; the shims here translate the C structs of [`crate::plugin::abi`] into a
//! [`TensorGroup`] whose buffers borrow the host's memory (no copy), call the
//! kernel, catch any panic, and report where the result is.

use crate::merge::params::{ResolvedParams, Scalar};
use crate::merge::{BaseUse, Merger, StatScope, TensorBuf, TensorGroup};
use crate::plugin::abi::*;
use crate::plugin::registry::{ParamSpec, ParamType, Scope};
use serde_json::{json, Value};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Export merge methods from a plugin library: `export_plugin!(A, B::new(), ...)`.
/// Each argument is an expression whose value implements [`Merger`].
#[macro_export]
macro_rules! export_plugin {
    ($($merger:expr),+ $(,)?) => {
        #[no_mangle]
        pub extern "C" fn fusechat_abi_version() -> u32 {
            $crate::plugin::abi::ABI_VERSION
        }

        /// # Safety
        /// Called by the fusechat host with a valid registrar.
        #[no_mangle]
        pub unsafe extern "C" fn fusechat_plugin_register(
            registrar: *const $crate::plugin::abi::FcRegistrar,
        ) -> i32 {
            $crate::plugin::sdk::register(registrar, || {
                vec![$(::std::boxed::Box::new($merger) as ::std::boxed::Box<dyn $crate::merge::Merger>),+]
            })
        }
    };
}

/// A registered merger and the C strings its table points into.
struct State {
    merger: Box<dyn Merger>,
    _strings: [CString; 3],
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).expect("NULs replaced")
}

/// Register `mergers` with the host. Called by [`export_plugin!`].
///
/// # Safety
/// `registrar` must be null or point to a valid [`FcRegistrar`].
pub unsafe fn register(
    registrar: *const FcRegistrar,
    mergers: impl FnOnce() -> Vec<Box<dyn Merger>>,
) -> i32 {
    let Some(reg) = registrar.as_ref() else {
        return FC_ERROR;
    };
    if reg.abi_version != ABI_VERSION
        || (reg.struct_size as usize) < std::mem::size_of::<FcRegistrar>()
    {
        return FC_ERROR;
    }
    install_quiet_panic_hook();
    let mergers = match catch_unwind(AssertUnwindSafe(mergers)) {
        Ok(m) => m,
        Err(_) => return FC_PANIC,
    };
    for merger in mergers {
        let info = merger.info();
        let contract = merger.contract();
        let strings = [
            cstring(&info.name),
            cstring(&info.description),
            cstring(&params_to_json(&info.params)),
        ];
        let table_strings = (
            strings[0].as_ptr(),
            strings[1].as_ptr(),
            strings[2].as_ptr(),
        );
        let state = Box::into_raw(Box::new(State {
            merger,
            _strings: strings,
        }));
        let table = FcMergerV1 {
            struct_size: std::mem::size_of::<FcMergerV1>() as u32,
            name: table_strings.0,
            description: table_strings.1,
            params_json: table_strings.2,
            base_use: match contract.base {
                BaseUse::Required => FC_BASE_REQUIRED,
                BaseUse::Optional => FC_BASE_OPTIONAL,
                BaseUse::Ignored => FC_BASE_IGNORED,
            },
            min_models: contract.min_models as u32,
            max_models: contract.max_models.map_or(FC_UNBOUNDED, |m| m as u32),
            state: state as *mut c_void,
            merge: merge_shim,
            stat_scope: stat_scope_shim,
            statistic: statistic_shim,
            free_string,
            free_f32,
            free_f64,
            drop: drop_shim,
        };
        let rc = (reg.register_merger)(reg.ctx, &table);
        if rc != FC_OK {
            drop(Box::from_raw(state));
            return rc;
        }
    }
    FC_OK
}

fn set_error(err: *mut FcError, code: i32, msg: &str) -> i32 {
    // SAFETY: the host passes a valid FcError.
    if let Some(e) = unsafe { err.as_mut() } {
        e.code = code;
        e.message = cstring(msg).into_raw();
    }
    code
}

thread_local! {
    /// Where the last panic on this thread happened (set by the plugin's panic hook).
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Inside the plugin, report panics through the error message instead of
/// printing them: the host names the plugin, the tensor and the location.
fn install_quiet_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_AT.with(|p| *p.borrow_mut() = at);
        }))
    });
}

/// Run `f`, turning an error or a panic into a status code and message.
fn guard(err: *mut FcError, f: impl FnOnce() -> crate::Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FC_OK,
        Ok(Err(e)) => set_error(err, FC_ERROR, &e.to_string()),
        Err(p) => {
            let at = PANIC_AT
                .with(|a| a.borrow_mut().take())
                .map(|a| format!(" (at {a})"))
                .unwrap_or_default();
            set_error(
                err,
                FC_PANIC,
                &format!(
                    "the kernel panicked: {}{at}",
                    crate::error::panic_message(p)
                ),
            )
        }
    }
}

/// The host's group as a [`TensorGroup`] borrowing its buffers, plus the base
/// and model data pointers (to recognise an in-place result).
///
/// # Safety
/// `g` must be a valid group from the host, as the ABI describes.
unsafe fn borrow_group<'a>(
    g: &'a FcTensorGroup,
    params: &'a ResolvedParams,
    shape: &'a [usize],
) -> crate::Result<(TensorGroup<'a>, Option<*const f32>, Vec<*const f32>)> {
    let name = CStr::from_ptr(g.name)
        .to_str()
        .map_err(|e| crate::Error::Plugin(format!("tensor name: {e}")))?;
    let borrow = |t: &FcTensor| -> crate::Result<TensorBuf> {
        if t.dtype != FC_F32 {
            return Err(crate::Error::Plugin(format!(
                "unsupported tensor dtype code {}",
                t.dtype
            )));
        }
        Ok(TensorBuf::borrowed(t.data, t.numel as usize))
    };
    let base = match g.base.as_ref() {
        Some(b) => Some(borrow(b)?),
        None => None,
    };
    let models: Vec<TensorBuf> = if g.n_models == 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(g.models, g.n_models as usize)
            .iter()
            .map(|t| borrow(t))
            .collect::<Result<_, _>>()?
    };
    let base_ptr = base.as_ref().map(|b| b.as_ptr());
    let model_ptrs = models.iter().map(|m| m.as_ptr()).collect();
    let scope_stats = (!g.scope_stats.is_null())
        .then(|| std::slice::from_raw_parts(g.scope_stats, g.n_models as usize).to_vec());
    let group = TensorGroup {
        name,
        layer: (g.layer >= 0).then_some(g.layer as usize),
        shape,
        base,
        models,
        params,
        seed: g.seed,
        scope_stats,
    };
    Ok((group, base_ptr, model_ptrs))
}

unsafe fn group_shape(g: &FcTensorGroup) -> Vec<usize> {
    let t = g
        .base
        .as_ref()
        .or_else(|| (g.n_models > 0).then(|| &*g.models));
    match t {
        Some(t) if t.ndim > 0 => std::slice::from_raw_parts(t.shape, t.ndim as usize)
            .iter()
            .map(|d| *d as usize)
            .collect(),
        _ => Vec::new(),
    }
}

unsafe fn params_of(json: *const c_char) -> crate::Result<ResolvedParams> {
    let text = CStr::from_ptr(json)
        .to_str()
        .map_err(|e| crate::Error::Plugin(format!("parameters: {e}")))?;
    resolved_from_json(text)
}

unsafe extern "C" fn merge_shim(
    state: *mut c_void,
    group: *const FcTensorGroup,
    out: *mut FcMergeOut,
    err: *mut FcError,
) -> i32 {
    guard(err, || {
        let st = &*(state as *const State);
        let g = group
            .as_ref()
            .ok_or_else(|| crate::Error::Plugin("null group".into()))?;
        let out = out
            .as_mut()
            .ok_or_else(|| crate::Error::Plugin("null output".into()))?;
        let params = params_of(g.params_json)?;
        let shape = group_shape(g);
        let (tg, base_ptr, model_ptrs) = borrow_group(g, &params, &shape)?;
        let merged = st.merger.merge(tg)?;
        let p = merged.data.as_ptr();
        out.location = if merged.data.is_empty() {
            FC_OUT_PLUGIN
        } else if Some(p) == base_ptr {
            FC_OUT_BASE
        } else if let Some(i) = model_ptrs.iter().position(|m| *m == p) {
            i as i32
        } else {
            FC_OUT_PLUGIN
        };
        if out.location == FC_OUT_PLUGIN {
            let v = match merged.data.into_vec() {
                Ok(v) => v,
                Err(other) => other.to_vec(),
            };
            let mut v = std::mem::ManuallyDrop::new(v);
            out.data = v.as_mut_ptr();
            out.len = v.len();
            out.cap = v.capacity();
        }
        if let Some(w) = merged.weights {
            let mut w = std::mem::ManuallyDrop::new(w);
            out.weights = w.as_mut_ptr();
            out.n_weights = w.len();
            out.weights_cap = w.capacity();
        }
        Ok(())
    })
}

unsafe extern "C" fn stat_scope_shim(state: *mut c_void, params_json: *const c_char) -> i32 {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let st = &*(state as *const State);
        let params = params_of(params_json).ok()?;
        st.merger.stat_scope(&params)
    }));
    match r {
        Ok(Some(StatScope::Tensor)) => FC_SCOPE_TENSOR,
        Ok(Some(StatScope::Layer)) => FC_SCOPE_LAYER,
        Ok(Some(StatScope::Model)) => FC_SCOPE_MODEL,
        _ => FC_SCOPE_NONE,
    }
}

unsafe extern "C" fn statistic_shim(
    state: *mut c_void,
    group: *const FcTensorGroup,
    sums: *mut f64,
    counts: *mut u64,
    err: *mut FcError,
) -> i32 {
    guard(err, || {
        let st = &*(state as *const State);
        let g = group
            .as_ref()
            .ok_or_else(|| crate::Error::Plugin("null group".into()))?;
        let params = params_of(g.params_json)?;
        let shape = group_shape(g);
        let (tg, _, _) = borrow_group(g, &params, &shape)?;
        let n = g.n_models as usize;
        let stats = st.merger.statistic(&tg)?;
        if stats.len() != n {
            return Err(crate::Error::Plugin(format!(
                "statistic returned {} values for {n} models",
                stats.len()
            )));
        }
        let (s, c) = (
            std::slice::from_raw_parts_mut(sums, n),
            std::slice::from_raw_parts_mut(counts, n),
        );
        for (i, (sum, count)) in stats.into_iter().enumerate() {
            s[i] = sum;
            c[i] = count;
        }
        Ok(())
    })
}

unsafe extern "C" fn free_string(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

unsafe extern "C" fn free_f32(p: *mut f32, len: usize, cap: usize) {
    if !p.is_null() {
        drop(Vec::from_raw_parts(p, len, cap));
    }
}

unsafe extern "C" fn free_f64(p: *mut f64, len: usize, cap: usize) {
    if !p.is_null() {
        drop(Vec::from_raw_parts(p, len, cap));
    }
}

unsafe extern "C" fn drop_shim(state: *mut c_void) {
    if !state.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            drop(Box::from_raw(state as *mut State))
        }));
    }
}

// ------------------------------------------------------------ JSON forms

fn scalar_json(s: &Scalar) -> Value {
    s.to_json()
}

fn scalar_from_json(v: &Value) -> crate::Result<Scalar> {
    match v {
        Value::Bool(b) => Ok(Scalar::Bool(*b)),
        Value::String(s) => Ok(Scalar::Str(s.clone())),
        Value::Number(n) if n.is_f64() => Ok(Scalar::Float(n.as_f64().unwrap_or(f64::NAN))),
        Value::Number(n) => n
            .as_i64()
            .map(Scalar::Int)
            .ok_or_else(|| crate::Error::Plugin(format!("number {n} out of range"))),
        other => Err(crate::Error::Plugin(format!(
            "{other} is not a parameter value"
        ))),
    }
}

/// A parameter spec as JSON: `[{"name", "type", "scope", "default", "required", "help"}]`,
/// where `type` is `"float"`, `"int"`, `"bool"` or `{"choice": [...]}`.
pub fn params_to_json(specs: &[ParamSpec]) -> String {
    let v: Vec<Value> = specs
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "type": match &p.ty {
                    ParamType::Float => json!("float"),
                    ParamType::Int => json!("int"),
                    ParamType::Bool => json!("bool"),
                    ParamType::Choice(c) => json!({"choice": c}),
                },
                "scope": match p.scope { Scope::Shared => "shared", Scope::PerModel => "per_model" },
                "default": p.default.as_ref().map(scalar_json),
                "required": p.required,
                "help": p.help,
            })
        })
        .collect();
    Value::Array(v).to_string()
}

/// Parse [`params_to_json`]'s form.
pub fn params_from_json(text: &str) -> crate::Result<Vec<ParamSpec>> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| crate::Error::Plugin(format!("not JSON: {e}")))?;
    let items = v
        .as_array()
        .ok_or_else(|| crate::Error::Plugin("not a list".into()))?;
    items
        .iter()
        .map(|p| {
            let name = p["name"]
                .as_str()
                .ok_or_else(|| crate::Error::Plugin("a parameter has no name".into()))?;
            let ty = match &p["type"] {
                Value::String(s) if s == "float" => ParamType::Float,
                Value::String(s) if s == "int" => ParamType::Int,
                Value::String(s) if s == "bool" => ParamType::Bool,
                Value::Object(o) if o.contains_key("choice") => ParamType::Choice(
                    o["choice"]
                        .as_array()
                        .ok_or_else(|| crate::Error::Plugin("choice is not a list".into()))?
                        .iter()
                        .map(|c| {
                            c.as_str().map(str::to_string).ok_or_else(|| {
                                crate::Error::Plugin("a choice is not a string".into())
                            })
                        })
                        .collect::<Result<_, _>>()?,
                ),
                other => {
                    return Err(crate::Error::Plugin(format!(
                        "parameter `{name}`: unknown type {other}"
                    )))
                }
            };
            let scope = match p["scope"].as_str() {
                Some("shared") => Scope::Shared,
                Some("per_model") => Scope::PerModel,
                other => {
                    return Err(crate::Error::Plugin(format!(
                        "parameter `{name}`: unknown scope {other:?}"
                    )))
                }
            };
            let mut spec = ParamSpec::new(name, ty, scope);
            if !p["default"].is_null() {
                let d = scalar_from_json(&p["default"])?;
                spec.default = Some(d.coerce(&spec.ty).map_err(|e| {
                    crate::Error::Plugin(format!("parameter `{name}` default: {e}"))
                })?);
            }
            spec.required = p["required"].as_bool().unwrap_or(false);
            spec.help = p["help"].as_str().unwrap_or_default().to_string();
            Ok(spec)
        })
        .collect()
}

/// Resolved parameters as JSON: `{"shared": {...}, "per_model": [{...}, ...]}`.
pub fn resolved_to_json(p: &ResolvedParams) -> String {
    let obj = |m: &std::collections::BTreeMap<String, Scalar>| -> Value {
        Value::Object(m.iter().map(|(k, v)| (k.clone(), scalar_json(v))).collect())
    };
    json!({"shared": obj(&p.shared), "per_model": p.per_model.iter().map(obj).collect::<Vec<_>>()})
        .to_string()
}

/// Parse [`resolved_to_json`]'s form.
pub fn resolved_from_json(text: &str) -> crate::Result<ResolvedParams> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| crate::Error::Plugin(format!("parameters are not JSON: {e}")))?;
    let map = |v: &Value| -> crate::Result<std::collections::BTreeMap<String, Scalar>> {
        v.as_object()
            .ok_or_else(|| crate::Error::Plugin("not an object".into()))?
            .iter()
            .map(|(k, x)| scalar_from_json(x).map(|s| (k.clone(), s)))
            .collect()
    };
    Ok(ResolvedParams {
        shared: map(&v["shared"])?,
        per_model: v["per_model"]
            .as_array()
            .ok_or_else(|| crate::Error::Plugin("no per_model list".into()))?
            .iter()
            .map(map)
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_values_round_trip_through_json() {
        let specs = vec![
            ParamSpec::float("t", Scope::Shared).required().help("x"),
            ParamSpec::choice("mode", &["a", "b"], Scope::Shared).default("b"),
            ParamSpec::int("k", Scope::PerModel).default(3i64),
            ParamSpec::bool("on", Scope::Shared).default(true),
        ];
        assert_eq!(params_from_json(&params_to_json(&specs)).unwrap(), specs);
        let mut p = ResolvedParams::default();
        p.shared.insert("t".into(), Scalar::Float(1.0));
        p.shared.insert("mode".into(), Scalar::Str("a".into()));
        p.per_model = vec![
            [("k".to_string(), Scalar::Int(2))].into(),
            Default::default(),
        ];
        assert_eq!(resolved_from_json(&resolved_to_json(&p)).unwrap(), p);
    }
}
