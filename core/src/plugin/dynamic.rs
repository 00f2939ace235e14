//! The host's side of the run-time plugin ABI: open a shared library, check
//! its ABI version, collect the merge methods it registers, and wrap each as a
//! [`Merger`] that calls across the boundary without copying tensors.

use crate::merge::params::ResolvedParams;
use crate::merge::{BaseUse, InputContract, Merged, Merger, StatScope, TensorBuf, TensorGroup};
use crate::plugin::abi::*;
use crate::plugin::registry::{Origin, PluginInfo, PluginKind};
use crate::plugin::sdk::{params_from_json, resolved_to_json};
use crate::{Error, Result};
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A merge method living in a loaded library.
pub struct DynMerger {
    table: FcMergerV1,
    info: PluginInfo,
    contract: InputContract,
    path: PathBuf,
    // Dropped after `table.drop(state)` runs in `Drop`, so the code stays mapped.
    lib: Arc<libloading::Library>,
}

// SAFETY: the SDK requires plugin mergers to be `Send + Sync` (the `Merger`
// trait's bounds) and its shims only read the shared state.
unsafe impl Send for DynMerger {}
unsafe impl Sync for DynMerger {}

impl Drop for DynMerger {
    fn drop(&mut self) {
        // SAFETY: the state came from this table and is dropped once.
        unsafe { (self.table.drop)(self.table.state) }
    }
}

impl DynMerger {
    fn failure(&self, tensor: &str, err: &FcError) -> Error {
        let msg = if err.message.is_null() {
            "no message".to_string()
        } else {
            // SAFETY: a NUL-terminated string from the plugin, released below with its own free.
            let m = unsafe { CStr::from_ptr(err.message) }
                .to_string_lossy()
                .into_owned();
            unsafe { (self.table.free_string)(err.message) };
            m
        };
        Error::Kernel {
            method: format!("plugin `{}` ({})", self.info.name, self.path.display()),
            tensor: tensor.to_string(),
            msg,
        }
    }
}

/// The C view of a tensor group, valid while the group's buffers are.
struct CGroup {
    name: CString,
    params: CString,
    /// Kept alive: every `FcTensor::shape` points into it.
    _shape: Vec<u64>,
    base: Option<FcTensor>,
    models: Vec<FcTensor>,
    stats: Option<Vec<f64>>,
}

impl CGroup {
    /// The C form of `g`. `data` gives each buffer's pointer: writable for
    /// `merge` (the host's own buffers, lent for the call), read-only for
    /// `statistic`.
    fn new(g: &mut TensorGroup<'_>, data: fn(&mut TensorBuf<'_>) -> *mut f32) -> Result<CGroup> {
        let shape: Vec<u64> = g.shape.iter().map(|d| *d as u64).collect();
        let tensor = |b: &mut TensorBuf<'_>, shape: &[u64]| FcTensor {
            data: data(b),
            dtype: FC_F32,
            ndim: shape.len() as u32,
            shape: shape.as_ptr(),
            numel: b.len() as u64,
        };
        Ok(CGroup {
            name: CString::new(g.name).map_err(|_| Error::msg("tensor name contains NUL"))?,
            params: CString::new(resolved_to_json(g.params)).expect("JSON has no NUL"),
            base: g.base.as_mut().map(|b| tensor(b, &shape)),
            models: g.models.iter_mut().map(|m| tensor(m, &shape)).collect(),
            stats: g.scope_stats.clone(),
            _shape: shape,
        })
    }

    fn view(&self, layer: Option<usize>, seed: u64) -> FcTensorGroup {
        FcTensorGroup {
            struct_size: std::mem::size_of::<FcTensorGroup>() as u32,
            name: self.name.as_ptr(),
            layer: layer.map_or(-1, |l| l as i64),
            base: self
                .base
                .as_ref()
                .map_or(std::ptr::null(), |b| b as *const FcTensor),
            models: self.models.as_ptr(),
            n_models: self.models.len() as u32,
            params_json: self.params.as_ptr(),
            seed,
            scope_stats: self.stats.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
        }
    }
}

fn empty_error() -> FcError {
    FcError {
        code: FC_OK,
        message: std::ptr::null_mut(),
    }
}

impl Merger for DynMerger {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn contract(&self) -> InputContract {
        self.contract
    }

    fn stat_scope(&self, params: &ResolvedParams) -> Result<Option<StatScope>> {
        let json = CString::new(resolved_to_json(params)).expect("JSON has no NUL");
        // SAFETY: valid state and string for the call.
        match unsafe { (self.table.stat_scope)(self.table.state, json.as_ptr()) } {
            FC_SCOPE_NONE => Ok(None),
            FC_SCOPE_TENSOR => Ok(Some(StatScope::Tensor)),
            FC_SCOPE_LAYER => Ok(Some(StatScope::Layer)),
            FC_SCOPE_MODEL => Ok(Some(StatScope::Model)),
            other => Err(Error::Plugin(format!(
                "plugin `{}` ({}) could not say its statistic scope: {}; check the merge parameters",
                self.info.name,
                self.path.display(),
                if other == FC_SCOPE_ERROR {
                    "its parameters did not parse, or it failed".to_string()
                } else {
                    format!("it answered the unknown scope {other}")
                }
            ))),
        }
    }

    fn statistic(&self, group: &TensorGroup<'_>) -> Result<Vec<(f64, u64)>> {
        // The statistic only reads; the C view needs mutable pointers, so view a
        // group whose buffers borrow the same memory.
        let mut g = TensorGroup {
            name: group.name,
            layer: group.layer,
            shape: group.shape,
            // SAFETY: these borrow `group`'s buffers for this call only and are not written.
            base: group.base.as_deref().map(TensorBuf::shared),
            models: group.models.iter().map(|m| TensorBuf::shared(m)).collect(),
            params: group.params,
            seed: group.seed,
            scope_stats: group.scope_stats.clone(),
        };
        // read-only: the plugin's SDK sees these as shared buffers
        let c = CGroup::new(&mut g, |b| b.as_ptr() as *mut f32)?;
        let view = c.view(g.layer, g.seed);
        let n = g.models.len();
        let (mut sums, mut counts) = (vec![0f64; n], vec![0u64; n]);
        let mut err = empty_error();
        // SAFETY: every pointer in `view` is valid for the call.
        let rc = unsafe {
            (self.table.statistic)(
                self.table.state,
                &view,
                sums.as_mut_ptr(),
                counts.as_mut_ptr(),
                &mut err,
            )
        };
        if rc != FC_OK {
            return Err(self.failure(g.name, &err));
        }
        Ok(sums.into_iter().zip(counts).collect())
    }

    fn merge<'a>(&self, mut g: TensorGroup<'a>) -> Result<Merged<'a>> {
        let c = CGroup::new(&mut g, |b| b.as_mut_ptr())?;
        let view = c.view(g.layer, g.seed);
        let mut out = FcMergeOut {
            location: FC_OUT_PLUGIN,
            data: std::ptr::null_mut(),
            len: 0,
            cap: 0,
            weights: std::ptr::null_mut(),
            n_weights: 0,
            weights_cap: 0,
        };
        let mut err = empty_error();
        // SAFETY: every pointer in `view` stays valid (the buffers live in `g`) for the call.
        let rc = unsafe { (self.table.merge)(self.table.state, &view, &mut out, &mut err) };
        drop(c);
        if rc != FC_OK {
            return Err(self.failure(g.name, &err));
        }
        let weights = (!out.weights.is_null()).then(|| {
            // SAFETY: the plugin handed over `n_weights` values, released with its free.
            let w = unsafe { std::slice::from_raw_parts(out.weights, out.n_weights) }.to_vec();
            unsafe { (self.table.free_f64)(out.weights, out.n_weights, out.weights_cap) };
            w
        });
        let data = match out.location {
            FC_OUT_BASE => g
                .base
                .take()
                .ok_or_else(|| self.bad_location(g.name, out.location))?,
            FC_OUT_PLUGIN if !out.data.is_null() => {
                // SAFETY: the plugin handed over this buffer; its own free releases it.
                unsafe {
                    TensorBuf::foreign(
                        out.data,
                        out.len,
                        out.cap,
                        self.table.free_f32,
                        self.lib.clone(),
                    )
                }
            }
            FC_OUT_PLUGIN => TensorBuf::default(),
            i if i >= 0 && (i as usize) < g.models.len() => {
                std::mem::take(&mut g.models[i as usize])
            }
            other => return Err(self.bad_location(g.name, other)),
        };
        Ok(Merged { data, weights })
    }
}

impl DynMerger {
    fn bad_location(&self, tensor: &str, location: i32) -> Error {
        Error::Kernel {
            method: format!("plugin `{}` ({})", self.info.name, self.path.display()),
            tensor: tensor.to_string(),
            msg: format!("reported its result at an invalid location ({location})"),
        }
    }
}

/// What the registration callback collects.
struct Collected {
    tables: Vec<FcMergerV1>,
    errors: Vec<String>,
}

unsafe extern "C" fn register_merger(ctx: *mut c_void, table: *const FcMergerV1) -> i32 {
    let Some(c) = (ctx as *mut Collected).as_mut() else {
        return FC_ERROR;
    };
    let Some(t) = table.as_ref() else {
        c.errors.push("registered a null merger table".into());
        return FC_ERROR;
    };
    if (t.struct_size as usize) < std::mem::size_of::<FcMergerV1>() {
        c.errors.push(format!(
            "registered a merger table of {} bytes; ABI version {ABI_VERSION} needs {}",
            t.struct_size,
            std::mem::size_of::<FcMergerV1>()
        ));
        return FC_ERROR;
    }
    c.tables.push(*t);
    FC_OK
}

unsafe extern "C" fn report_error(ctx: *mut c_void, message: *const std::ffi::c_char) {
    if let Some(c) = (ctx as *mut Collected).as_mut() {
        let msg = if message.is_null() {
            "no message".to_string()
        } else {
            CStr::from_ptr(message).to_string_lossy().into_owned()
        };
        c.errors.push(msg);
    }
}

fn read_str(p: *const std::ffi::c_char, what: &str) -> Result<String> {
    if p.is_null() {
        return Err(Error::Plugin(format!("its {what} is null")));
    }
    // SAFETY: non-null, NUL-terminated per the ABI, alive while the state is.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map(str::to_string)
        .map_err(|_| Error::Plugin(format!("its {what} is not UTF-8")))
}

/// Open a plugin library and return its merge methods.
pub fn load_library(path: &Path) -> Result<Vec<DynMerger>> {
    let err = |msg: String| Error::Plugin(format!("plugin {}: {msg}", path.display()));
    if !path.is_file() {
        return Err(err(
            "file not found (check [plugins] paths in fusechat.toml or --plugin)".into(),
        ));
    }
    // dlopen searches the library path for a name without a slash: always pass a path.
    let absolute = std::path::absolute(path).map_err(|e| err(e.to_string()))?;
    // SAFETY: loading a library runs its initialisers; that is what the user asked for.
    let lib = unsafe { libloading::Library::new(&absolute) }.map_err(|e| {
        let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
        err(format!(
            "cannot be loaded as a shared library for this platform ({}-{}): {why}",
            std::env::consts::ARCH,
            std::env::consts::OS
        ))
    })?;
    let version = unsafe { lib.get::<VersionFn>(VERSION_SYMBOL.as_bytes()) }.map_err(|_| {
        err(format!(
            "not a fusechat plugin: it exports no `{VERSION_SYMBOL}` symbol (build it with fusechat_core::export_plugin!)"
        ))
    })?;
    // SAFETY: the symbol has the documented signature in every ABI version.
    let v = unsafe { version() };
    if v != ABI_VERSION {
        return Err(err(format!(
            "built for fusechat plugin ABI version {v}, but this fusechat speaks version {ABI_VERSION}; \
             rebuild the plugin against fusechat-core {}",
            env!("CARGO_PKG_VERSION")
        )));
    }
    let entry = unsafe { lib.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()) }.map_err(|_| {
        err(format!(
            "it exports `{VERSION_SYMBOL}` but no `{ENTRY_SYMBOL}` entry point"
        ))
    })?;
    let mut collected = Collected {
        tables: Vec::new(),
        errors: Vec::new(),
    };
    let registrar = FcRegistrar {
        struct_size: std::mem::size_of::<FcRegistrar>() as u32,
        abi_version: ABI_VERSION,
        ctx: &mut collected as *mut Collected as *mut c_void,
        register_merger,
        report_error,
    };
    // SAFETY: the entry point has the documented signature (version checked above).
    let rc = unsafe { entry(&registrar) };
    let lib = Arc::new(lib);
    let mut out = Vec::new();
    let mut problems = collected.errors;
    for t in collected.tables {
        let parsed = (|| -> Result<DynMerger> {
            let name = read_str(t.name, "name")?;
            let description = read_str(t.description, "description")?;
            let params =
                params_from_json(&read_str(t.params_json, "parameter spec")?).map_err(|e| {
                    Error::Plugin(format!("merger `{name}` declares invalid parameters: {e}"))
                })?;
            let base = match t.base_use {
                FC_BASE_REQUIRED => BaseUse::Required,
                FC_BASE_OPTIONAL => BaseUse::Optional,
                FC_BASE_IGNORED => BaseUse::Ignored,
                other => {
                    return Err(Error::Plugin(format!(
                        "merger `{name}` has an unknown base_use {other}"
                    )))
                }
            };
            Ok(DynMerger {
                table: t,
                info: PluginInfo {
                    kind: PluginKind::Merger,
                    name,
                    description,
                    params,
                },
                contract: InputContract {
                    base,
                    min_models: t.min_models as usize,
                    max_models: (t.max_models != FC_UNBOUNDED).then_some(t.max_models as usize),
                },
                path: path.to_path_buf(),
                lib: lib.clone(),
            })
        })();
        match parsed {
            Ok(m) => out.push(m),
            Err(e) => {
                // SAFETY: the table's state is dropped once, by its own plugin.
                unsafe { (t.drop)(t.state) };
                problems.push(e.to_string());
            }
        }
    }
    match rc {
        FC_OK => {}
        FC_PANIC => problems.push("its registration function panicked".into()),
        rc => problems.push(format!("its registration function failed (status {rc})")),
    }
    if !problems.is_empty() {
        return Err(err(problems.join("; ")));
    }
    if out.is_empty() {
        tracing::warn!("plugin {} registered no merge methods", path.display());
    }
    Ok(out)
}

/// Which origin wins when two plugins share a name: `[plugins.prefer]` in fusechat.toml,
/// name → `"built-in"` or a library path.
pub type Preferences = std::collections::BTreeMap<String, String>;

impl crate::plugin::registry::Registry {
    /// Load a plugin library into the registry. A name that is already taken is
    /// an error unless `prefer` names the origin that wins.
    pub fn load_library(&mut self, path: &Path, prefer: &Preferences) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for m in load_library(path)? {
            let name = m.info.name.clone();
            let origin = Origin::Library(path.to_path_buf());
            let merger: Arc<dyn Merger> = Arc::new(m);
            match (self.merger(&name).ok().map(|e| e.origin.clone()), prefer.get(&name)) {
                (None, _) => self.add(merger, origin)?,
                (Some(_), Some(winner)) if origin_matches(&origin, winner) => self.replace(merger, origin),
                (Some(_), Some(_)) => {} // the existing one wins, as configured
                (Some(prev), None) => {
                    return Err(Error::Plugin(format!(
                        "merger `{name}` from {} clashes with the one from {prev}; say which wins in fusechat.toml:\n\
                         [plugins.prefer]\n{name} = \"built-in\"   # or \"{}\"",
                        path.display(),
                        path.display()
                    )))
                }
            }
            names.push(name);
        }
        Ok(names)
    }
}

fn origin_matches(origin: &Origin, wanted: &str) -> bool {
    match origin {
        Origin::BuiltIn => wanted == "built-in" || wanted == "builtin",
        Origin::Library(p) => {
            let w = Path::new(wanted);
            p == w || matches!((p.canonicalize(), w.canonicalize()), (Ok(a), Ok(b)) if a == b)
        }
    }
}
