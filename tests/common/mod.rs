//! Helpers shared by the integration tests: tiny deterministic model sets.
#![allow(dead_code)]

use fusechat::core::io::dtype::DType;
use fusechat::core::io::hf_dir::write_model_dir;
use fusechat::core::io::model_dir::ModelDir;
use fusechat::core::merge::engine::{ExecOptions, MergeReport};
use fusechat::core::merge::params::{Setting, Settings};
use fusechat::core::merge::plan::{MergeRequest, ModelInput};
use fusechat::core::pipeline::miniature::MiniatureSpec;
use std::path::{Path, PathBuf};
use std::process::Output;

/// Every built-in merge method.
pub const METHODS: &[&str] = &[
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "sce",
    "varm",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "passthrough",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
];

/// How many models besides the base a method takes in the tests.
pub fn models_for(method: &str) -> usize {
    match method {
        "slerp" | "passthrough" | "nearswap" | "arcee_fusion" => 1,
        _ => 2,
    }
}

/// A small Mistral-shaped spec (2 layers, hidden 16) with `targets` targets.
pub fn spec(targets: usize, dtype: DType) -> MiniatureSpec {
    MiniatureSpec {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        targets: (0..targets).map(|i| format!("t{i}")).collect(),
        dtype,
        seed: 7,
    }
}

/// Generate pivot + targets under `dir`; returns (pivot, targets).
pub fn model_set(dir: &Path, targets: usize, dtype: DType) -> (PathBuf, Vec<PathBuf>) {
    let set = fusechat::core::pipeline::miniature::generate(&spec(targets, dtype), dir).unwrap();
    (set.pivot, set.targets)
}

/// Write a model directory with explicit tensors.
pub fn write_model(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], dtype: DType) {
    let t: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), v.clone()))
        .collect();
    let config = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 1,
        "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
    });
    write_model_dir(dir, &config, &t, dtype, 5_000_000_000).unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

pub fn request(method: &str, base: Option<&Path>, models: &[&Path], out: &Path) -> MergeRequest {
    let mut r = MergeRequest::new(method, out);
    r.base = base.map(ModelInput::new);
    r.models = models.iter().map(|m| ModelInput::new(*m)).collect();
    r
}

pub fn set(r: &mut MergeRequest, key: &str, v: serde_json::Value) {
    r.params.insert(key.into(), Setting::from_json(&v).unwrap());
}

pub fn set_model(r: &mut MergeRequest, i: usize, key: &str, v: serde_json::Value) {
    let s: &mut Settings = &mut r.models[i].params;
    s.insert(key.into(), Setting::from_json(&v).unwrap());
}

pub fn merge(r: &MergeRequest) -> MergeReport {
    merge_with(
        r,
        &ExecOptions {
            threads: 2,
            ..Default::default()
        },
    )
}

pub fn merge_with(r: &MergeRequest, opts: &ExecOptions) -> MergeReport {
    fusechat::core::merge::engine::merge(r, &fusechat::registry(), opts).unwrap()
}

/// Every tensor of a model dir, as f32.
pub fn tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let m = ModelDir::open(dir).unwrap();
    m.tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), m.read_f32(n).unwrap()))
        .collect()
}

pub fn tensor(dir: &Path, name: &str) -> Vec<f32> {
    ModelDir::open(dir).unwrap().read_f32(name).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Distance in bf16 ulps after rounding both values to bf16.
pub fn bf16_ulps(a: f32, b: f32) -> i32 {
    let r = |x: f32| half::bf16::from_f32(x).to_bits() as i16 as i32;
    (r(a) - r(b)).abs()
}

/// The bytes of every file with this extension under a dir, sorted by name.
pub fn weight_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Run the `fusechat` binary in `cwd`, isolated from the user's HF cache and logging settings.
pub fn fusechat(cwd: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_fusechat"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env("HF_HUB_CACHE", cwd.join("no-hf-cache"))
        .env_remove("HF_HOME")
        .env("HOME", cwd)
        .output()
        .unwrap()
}

/// Assert success; stdout and stderr together.
pub fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {err}");
    format!("{}{err}", String::from_utf8_lossy(&o.stdout))
}

/// Assert a clean failure (exit code 1, no panic of fusechat itself); returns stderr.
pub fn fails(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected failure; stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A plugin library has its own std, whose default hook reports a panic of
    // the plugin's kernel where it happened; fusechat itself must never panic.
    let own_panic = err
        .match_indices("panicked at ")
        .any(|(i, m)| !err[i + m.len()..].starts_with("tests/plugin-fixtures/"));
    assert!(!own_panic, "a panic escaped: {err}");
    err
}

/// No output directory and no temporary directory left in `dir`.
pub fn nothing_left(dir: &Path, out: &str) {
    assert!(!dir.join(out).exists(), "{out} was left behind");
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(!n.contains("fusechat-tmp"), "temporary {n} left behind");
    }
}

/// The Python interpreter with `safetensors` and `numpy` (`$FUSECHAT_PYTHON`,
/// else `python3`), or `None` after saying the test skipped. Under `CI=true` a
/// missing interpreter or package fails the test: CI must not skip silently.
pub fn python_with_safetensors() -> Option<String> {
    let python = std::env::var("FUSECHAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .args(["-c", "import safetensors.numpy, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(python);
    }
    let msg = format!("{python} with the safetensors and numpy packages is not available");
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("{msg}; under CI=true this test must run (.ci/run installs them in a venv)");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// The repo's fusechat.toml with the miniature's training and the fusion cut
/// to a few steps and records, so that the whole default run fits a
/// debug-build test. Everything else (models, skills, stages, merges,
/// evaluators) is as written.
pub fn small_default_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fusechat.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let small = [
        ("steps", "12"),
        ("train_records", "96"),
        ("fusion_records", "64"),
        ("held_out", "8"),
        ("max_steps", "6"),
    ];
    let mut cut = Vec::new();
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            for (k, v) in small {
                if l.starts_with(&format!("{k} =")) {
                    cut.push(k);
                    return format!("{k} = {v}");
                }
            }
            l.to_string()
        })
        .collect();
    for (k, _) in small {
        assert!(cut.contains(&k), "fusechat.toml has no `{k} =` line to cut");
    }
    lines.join("\n") + "\n"
}
