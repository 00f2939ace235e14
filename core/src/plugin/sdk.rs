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

/// Tell the host why registration failed, when the host offers `report_error`
/// (appended to the registrar after version 1's first form).
unsafe fn report(reg: &FcRegistrar, msg: &str) {
    if reg.struct_size as usize >= std::mem::size_of::<FcRegistrar>() {
        let m = cstring(msg);
        (reg.report_error)(reg.ctx, m.as_ptr());
    }
}

/// Register `mergers` with the host. Called by [`export_plugin!`].
///
/// Everything that runs plugin code (the constructors, `info()`,
/// `contract()`, the parameter spec) runs under `catch_unwind`: a panic is
/// reported as [`FC_PANIC`] with its message, and never unwinds into the host.
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
    if reg.abi_version != ABI_VERSION || (reg.struct_size as usize) < REGISTRAR_V1_SIZE {
        return FC_ERROR;
    }
    let mergers = match catch_unwind(AssertUnwindSafe(mergers)) {
        Ok(m) => m,
        Err(p) => {
            report(
                reg,
                &format!(
                    "constructing the plugin panicked: {}",
                    crate::error::panic_message(p)
                ),
            );
            return FC_PANIC;
        }
    };
    for merger in mergers {
        let described = catch_unwind(AssertUnwindSafe(|| {
            let info = merger.info();
            (
                info.name.clone(),
                info.description.clone(),
                params_to_json(&info.params),
                merger.contract(),
            )
        }));
        let (name, description, params, contract) = match described {
            Ok(d) => d,
            Err(p) => {
                report(
                    reg,
                    &format!(
                        "info(), contract() or the parameter spec panicked: {}",
                        crate::error::panic_message(p)
                    ),
                );
                return FC_PANIC;
            }
        };
        let strings = [cstring(&name), cstring(&description), cstring(&params)];
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
            min_models: contract.min_models.min(u32::MAX as usize) as u32,
            max_models: contract
                .max_models
                .map_or(FC_UNBOUNDED, |m| m.min(FC_UNBOUNDED as usize - 1) as u32),
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
            drop_shim(state as *mut c_void);
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

/// Run `f`, turning an error or a panic into a status code and message. No
/// panic hook is installed: the process's own hook reports where it happened.
fn guard(err: *mut FcError, f: impl FnOnce() -> crate::Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FC_OK,
        Ok(Err(e)) => set_error(err, FC_ERROR, &e.to_string()),
        Err(p) => set_error(
            err,
            FC_PANIC,
            &format!("the kernel panicked: {}", crate::error::panic_message(p)),
        ),
    }
}

/// How a call lends the host's buffers: `merge` lends them exclusively (the
/// kernel may compute in place), `statistic` read-only.
#[derive(Clone, Copy, PartialEq)]
enum Lend {
    Exclusive,
    Shared,
}

/// The host's group as a [`TensorGroup`] borrowing its buffers for the call,
/// plus the base and model data pointers (to recognise an in-place result).
///
/// # Safety
/// `g` must be a valid group from the host, as the ABI describes: each buffer
/// valid for the call, distinct, and (with [`Lend::Exclusive`]) not accessed by
/// the host until the call returns.
unsafe fn borrow_group<'a>(
    g: &'a FcTensorGroup,
    params: &'a ResolvedParams,
    shape: &'a [usize],
    lend: Lend,
) -> crate::Result<(TensorGroup<'a>, Option<*const f32>, Vec<*const f32>)> {
    let name = CStr::from_ptr(g.name)
        .to_str()
        .map_err(|e| crate::Error::Plugin(format!("tensor name: {e}")))?;
    let borrow = |t: &FcTensor| -> crate::Result<TensorBuf<'a>> {
        if t.dtype != FC_F32 {
            return Err(crate::Error::Plugin(format!(
                "unsupported tensor dtype code {}",
                t.dtype
            )));
        }
        let n = t.numel as usize;
        if n == 0 {
            return Ok(TensorBuf::default());
        }
        Ok(match lend {
            Lend::Exclusive => TensorBuf::borrowed(std::slice::from_raw_parts_mut(t.data, n)),
            Lend::Shared => TensorBuf::shared(std::slice::from_raw_parts(t.data, n)),
        })
    };
    let base = match g.base.as_ref() {
        Some(b) => Some(borrow(b)?),
        None => None,
    };
    let models: Vec<TensorBuf<'a>> = if g.n_models == 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(g.models, g.n_models as usize)
            .iter()
            .map(borrow)
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
    if json.is_null() {
        return Err(crate::Error::Plugin("no parameters".into()));
    }
    let text = CStr::from_ptr(json)
        .to_str()
        .map_err(|e| crate::Error::Plugin(format!("parameters: {e}")))?;
    resolved_from_json(text)
}

/// The shared state of a registered merger. The host calls the shims on one
/// state from several threads at once; `Merger: Send + Sync` makes that sound.
unsafe fn state_of<'s>(state: *mut c_void) -> &'s State {
    &*(state as *const State)
}

unsafe extern "C" fn merge_shim(
    state: *mut c_void,
    group: *const FcTensorGroup,
    out: *mut FcMergeOut,
    err: *mut FcError,
) -> i32 {
    guard(err, || {
        let st = state_of(state);
        let g = group
            .as_ref()
            .ok_or_else(|| crate::Error::Plugin("null group".into()))?;
        let out = out
            .as_mut()
            .ok_or_else(|| crate::Error::Plugin("null output".into()))?;
        let params = params_of(g.params_json)?;
        let shape = group_shape(g);
        let (tg, base_ptr, model_ptrs) = borrow_group(g, &params, &shape, Lend::Exclusive)?;
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
        state_of(state).merger.stat_scope(&params_of(params_json)?)
    }));
    match r {
        Ok(Ok(None)) => FC_SCOPE_NONE,
        Ok(Ok(Some(StatScope::Tensor))) => FC_SCOPE_TENSOR,
        Ok(Ok(Some(StatScope::Layer))) => FC_SCOPE_LAYER,
        Ok(Ok(Some(StatScope::Model))) => FC_SCOPE_MODEL,
        Ok(Err(_)) | Err(_) => FC_SCOPE_ERROR,
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
        let st = state_of(state);
        let g = group
            .as_ref()
            .ok_or_else(|| crate::Error::Plugin("null group".into()))?;
        let params = params_of(g.params_json)?;
        let shape = group_shape(g);
        let (tg, _, _) = borrow_group(g, &params, &shape, Lend::Shared)?;
        let n = g.n_models as usize;
        let stats = st.merger.statistic(&tg)?;
        if stats.len() != n {
            return Err(crate::Error::Plugin(format!(
                "statistic returned {} values for {n} models",
                stats.len()
            )));
        }
        if n > 0 {
            let (s, c) = (
                std::slice::from_raw_parts_mut(sums, n),
                std::slice::from_raw_parts_mut(counts, n),
            );
            for (i, (sum, count)) in stats.into_iter().enumerate() {
                s[i] = sum;
                c[i] = count;
            }
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

/// A parameter spec as JSON: `[{"name", "type", "scope", "default", "required", "help", "range"}]`,
/// where `type` is `"float"`, `"int"`, `"bool"` or `{"choice": [...]}` and `range`
/// is null or `{"min", "max", "unless"}` (appended after version 1's first form;
/// absent means no range).
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
                    ParamType::Text => json!("text"),
                    ParamType::File => json!("file"),
                },
                "scope": match p.scope { Scope::Shared => "shared", Scope::PerModel => "per_model" },
                "default": p.default.as_ref().map(scalar_json),
                "required": p.required,
                "help": p.help,
                "range": p.range.as_ref().map(|r| json!({"min": r.min, "max": r.max, "unless": r.unless})),
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
                Value::String(s) if s == "text" => ParamType::Text,
                Value::String(s) if s == "file" => ParamType::File,
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
            if let Some(r) = p.get("range").filter(|r| !r.is_null()) {
                let bound = |k: &str| {
                    r[k].as_f64().ok_or_else(|| {
                        crate::Error::Plugin(format!(
                            "parameter `{name}`: range.{k} is not a number"
                        ))
                    })
                };
                spec = spec.range(bound("min")?, bound("max")?);
                if let Some(flag) = r["unless"].as_str() {
                    spec = spec.unless(flag);
                }
            }
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
        // a plugin loaded at run time has no mergekit numerics mode (the
        // planner refuses it), so the host never asks for one
        round_ops: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{InputContract, Merged};
    use crate::plugin::registry::{PluginInfo, PluginKind};

    /// A merger whose `info()` panics, or a plain one.
    struct Probe {
        panic_in_info: bool,
    }

    impl Merger for Probe {
        fn info(&self) -> PluginInfo {
            if self.panic_in_info {
                panic!("info is broken");
            }
            PluginInfo {
                kind: PluginKind::Merger,
                name: "probe".into(),
                description: "test".into(),
                params: vec![ParamSpec::choice(
                    "granularity",
                    &["tensor", "layer"],
                    Scope::Shared,
                )],
            }
        }
        fn contract(&self) -> InputContract {
            InputContract {
                base: BaseUse::Ignored,
                min_models: 1,
                max_models: None,
            }
        }
        fn stat_scope(&self, p: &ResolvedParams) -> crate::Result<Option<StatScope>> {
            Ok((p.str("granularity")? == "layer").then_some(StatScope::Layer))
        }
        fn merge<'a>(&self, mut g: TensorGroup<'a>) -> crate::Result<Merged<'a>> {
            if g.name == "boom" {
                panic!("kernel is broken");
            }
            Ok(Merged::new(std::mem::take(&mut g.models[0])))
        }
    }

    #[derive(Default)]
    struct Host {
        tables: Vec<FcMergerV1>,
        errors: Vec<String>,
    }

    unsafe extern "C" fn host_register(ctx: *mut c_void, t: *const FcMergerV1) -> i32 {
        (*(ctx as *mut Host)).tables.push(*t);
        FC_OK
    }

    unsafe extern "C" fn host_report(ctx: *mut c_void, m: *const c_char) {
        let msg = CStr::from_ptr(m).to_string_lossy().into_owned();
        (*(ctx as *mut Host)).errors.push(msg);
    }

    fn register_probe(panic_in_info: bool) -> (i32, Host) {
        let mut host = Host::default();
        let reg = FcRegistrar {
            struct_size: std::mem::size_of::<FcRegistrar>() as u32,
            abi_version: ABI_VERSION,
            ctx: &mut host as *mut Host as *mut c_void,
            register_merger: host_register,
            report_error: host_report,
        };
        let rc = unsafe {
            register(&reg, || {
                vec![Box::new(Probe { panic_in_info }) as Box<dyn Merger>]
            })
        };
        (rc, host)
    }

    #[test]
    fn a_panic_in_info_is_reported_not_unwound_across_the_boundary() {
        let (rc, host) = register_probe(true);
        assert_eq!(rc, FC_PANIC);
        assert!(host.tables.is_empty());
        assert_eq!(host.errors.len(), 1);
        assert!(
            host.errors[0].contains("info is broken"),
            "{:?}",
            host.errors
        );
    }

    #[test]
    fn a_statistic_scope_that_cannot_be_read_is_an_error_not_per_tensor() {
        let (rc, host) = register_probe(false);
        assert_eq!(rc, FC_OK);
        let t = host.tables[0];
        let ask = |json: &str| {
            let j = CString::new(json).unwrap();
            unsafe { (t.stat_scope)(t.state, j.as_ptr()) }
        };
        let layer = r#"{"shared": {"granularity": "layer"}, "per_model": [{}]}"#;
        assert_eq!(ask(layer), FC_SCOPE_LAYER);
        assert_eq!(ask("{not json"), FC_SCOPE_ERROR);
        // a missing parameter is the method's error, not a silent "per tensor"
        assert_eq!(ask(r#"{"shared": {}, "per_model": [{}]}"#), FC_SCOPE_ERROR);
        unsafe { (t.drop)(t.state) };
    }

    #[test]
    fn the_sdk_leaves_the_process_panic_hook_alone() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            if info.to_string().contains("kernel is broken") {
                SEEN.fetch_add(1, Ordering::SeqCst);
            }
        }));
        let (rc, host) = register_probe(false);
        assert_eq!(rc, FC_OK);
        let t = host.tables[0];
        let (name, params) = (
            CString::new("boom").unwrap(),
            CString::new(r#"{"shared": {}, "per_model": [{}]}"#).unwrap(),
        );
        let (mut data, shape) = (vec![1.0f32; 4], [4u64]);
        let model = FcTensor {
            data: data.as_mut_ptr(),
            dtype: FC_F32,
            ndim: 1,
            shape: shape.as_ptr(),
            numel: 4,
        };
        let group = FcTensorGroup {
            struct_size: std::mem::size_of::<FcTensorGroup>() as u32,
            name: name.as_ptr(),
            layer: -1,
            base: std::ptr::null(),
            models: &model,
            n_models: 1,
            params_json: params.as_ptr(),
            seed: 0,
            scope_stats: std::ptr::null(),
        };
        let mut out = FcMergeOut {
            location: 0,
            data: std::ptr::null_mut(),
            len: 0,
            cap: 0,
            weights: std::ptr::null_mut(),
            n_weights: 0,
            weights_cap: 0,
        };
        let mut err = FcError {
            code: 0,
            message: std::ptr::null_mut(),
        };
        let rc = unsafe { (t.merge)(t.state, &group, &mut out, &mut err) };
        let seen = SEEN.load(Ordering::SeqCst);
        std::panic::set_hook(previous);
        assert_eq!(rc, FC_PANIC);
        let msg = unsafe { CString::from_raw(err.message) }
            .into_string()
            .unwrap();
        assert!(msg.contains("kernel is broken"), "{msg}");
        assert_eq!(
            seen, 1,
            "the process's own panic hook saw the kernel's panic"
        );
        unsafe { (t.drop)(t.state) };
    }

    #[test]
    fn specs_and_values_round_trip_through_json() {
        let specs = vec![
            ParamSpec::float("t", Scope::Shared)
                .required()
                .range(0.0, 1.0)
                .unless("on")
                .help("x"),
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
