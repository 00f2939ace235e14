//! Plugins loaded at run time: the example median plugin against an
//! independent computation, its snapshot, zero-copy crossing, configuration
//! and clashes, and every kind of bad plugin.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::merge::params::{ResolvedParams, Scalar};
use fusechat::core::merge::{Merger, TensorGroup};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Build the example plugin and the fixtures once, with the profile of this test binary.
fn lib(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
        let release = profile_dir.file_name().unwrap() == "release";
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("build")
            .arg("--quiet");
        for p in [
            "fusechat-median",
            "fixture-bad-abi",
            "fixture-no-entry",
            "fixture-panics",
            "fixture-wrong-shape",
        ] {
            cmd.args(["-p", p]);
        }
        if release {
            cmd.arg("--release");
        }
        let out = cmd.output().expect("run cargo build for the plugins");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir
    });
    dir.join(format!(
        "{}{name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    model_set(&d.join("set"), 3, DType::F32);
    (tmp, d)
}

/// The task-vector median written out independently: sort each element's deltas.
fn median_reference(
    base: &[f32],
    models: &[Vec<f32>],
    ignore_zeros: bool,
    lambda: f64,
) -> Vec<f32> {
    (0..base.len())
        .map(|k| {
            let mut d: Vec<f64> = models
                .iter()
                .map(|m| (m[k] - base[k]) as f64)
                .filter(|x| !ignore_zeros || *x != 0.0)
                .collect();
            d.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let med = match d.len() {
                0 => 0.0,
                n if n % 2 == 1 => d[n / 2],
                n => (d[n / 2 - 1] + d[n / 2]) / 2.0,
            };
            (base[k] as f64 + lambda * med) as f32
        })
        .collect()
}

#[test]
fn example_plugin_merges_like_the_formula() {
    let (_t, d) = setup();
    let plugin = lib("fusechat_median");
    for (ignore_zeros, lambda) in [(false, 1.0), (true, 0.5)] {
        let out = format!("out-{ignore_zeros}");
        ok(&fusechat(
            &d,
            &[
                "--plugin",
                plugin.to_str().unwrap(),
                "merge",
                "--method",
                "median",
                "--base",
                "set/pivot",
                "--model",
                "set/t0",
                "--model",
                "set/t1",
                "--model",
                "set/t2",
                "--set",
                &format!("ignore_zeros={ignore_zeros}"),
                "--set",
                &format!("lambda={lambda}"),
                "--out",
                &out,
            ],
        ));
        let models: Vec<PathBuf> = (0..3).map(|i| d.join(format!("set/t{i}"))).collect();
        for (name, _, base) in tensors(&d.join("set/pivot")) {
            let ms: Vec<Vec<f32>> = models.iter().map(|m| tensor(m, &name)).collect();
            let want = median_reference(&base, &ms, ignore_zeros, lambda);
            let got = tensor(&d.join(&out), &name);
            assert!(
                max_abs_diff(&got, &want) < 1e-6,
                "ignore_zeros={ignore_zeros} {name}"
            );
        }
    }
}

#[test]
fn example_plugin_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    model_set(&d.join("set"), 2, DType::BF16);
    let plugin = lib("fusechat_median");
    ok(&fusechat(
        d,
        &[
            "--plugin",
            plugin.to_str().unwrap(),
            "merge",
            "--method",
            "median",
            "--base",
            "set/pivot",
            "--model",
            "set/t0",
            "--model",
            "set/t1",
            "--out",
            "out",
        ],
    ));
    let m = fusechat::core::io::model_dir::ModelDir::open(&d.join("out")).unwrap();
    let mut names: Vec<&String> = m.tensors().keys().collect();
    names.sort_by(|a, b| fusechat::core::io::model_dir::natural_order(a, b));
    let rows: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let v = m.read_f32(n).unwrap();
            serde_json::json!({
                "name": n,
                "shape": m.tensor(n).unwrap().shape,
                "dtype": m.tensor(n).unwrap().raw_dtype,
                "fnv1a": format!("{:016x}", fusechat::core::rng::fnv1a(m.raw(n).unwrap())),
                "first": v.iter().take(4).map(|x| format!("{x:.5e}")).collect::<Vec<_>>(),
            })
        })
        .collect();
    insta::assert_yaml_snapshot!("plugin_median", rows);
}

/// Crossing the boundary does not copy: the result comes back in the host's own buffer.
#[test]
fn contiguous_f32_tensors_cross_without_a_copy() {
    let mergers = fusechat::core::plugin::dynamic::load_library(&lib("fusechat_median")).unwrap();
    let m = &mergers[0];
    let mut p = ResolvedParams::default();
    p.shared.insert("ignore_zeros".into(), Scalar::Bool(false));
    p.shared.insert("lambda".into(), Scalar::Float(1.0));
    p.per_model = vec![Default::default(); 2];
    let base: Vec<f32> = (0..64).map(|i| i as f32 * 0.01).collect();
    let base_ptr = base.as_ptr();
    let a: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, x)| x + (i % 3) as f32 * 0.1)
        .collect();
    let b: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, x)| x + (i % 5) as f32 * 0.1)
        .collect();
    let want = median_reference(&base, &[a.clone(), b.clone()], false, 1.0);
    let g = TensorGroup {
        name: "w",
        layer: None,
        shape: &[64],
        base: Some(base.into()),
        models: vec![a.into(), b.into()],
        params: &p,
        seed: 0,
        scope_stats: None,
    };
    let merged = m.merge(g).unwrap();
    assert_eq!(
        merged.data.as_ptr(),
        base_ptr,
        "the plugin's result should be the host's base buffer"
    );
    assert!(max_abs_diff(&merged.data, &want) < 1e-6);
    assert_eq!(merged.data.into_vec().unwrap().len(), 64);
}

/// A buffer the plugin allocated keeps its library loaded: reading and
/// releasing it after every handle to the plugin is gone is sound.
#[test]
fn a_plugin_allocated_result_outlives_the_plugin_handle() {
    let mut mergers =
        fusechat::core::plugin::dynamic::load_library(&lib("fixture_wrong_shape")).unwrap();
    let m = mergers.pop().unwrap();
    let p = ResolvedParams {
        per_model: vec![Default::default()],
        ..Default::default()
    };
    let g = TensorGroup {
        name: "w",
        layer: None,
        shape: &[8],
        base: None,
        models: vec![vec![1.0f32; 8].into()],
        params: &p,
        seed: 0,
        scope_stats: None,
    };
    let merged = m.merge(g).unwrap();
    drop(m);
    drop(mergers);
    // the fixture returns 7 zeros (one short) in its own allocation
    assert_eq!(&merged.data[..], &[0.0f32; 7][..]);
    drop(merged); // calls the library's free_f32
}

#[test]
fn plugins_come_from_the_config_and_are_listed_with_their_origin() {
    let (_t, d) = setup();
    let plugin = lib("fusechat_median");
    std::fs::write(d.join("fusechat.toml"), format!(
        "[plugins]\npaths = [\"{}\"]\n\n[merge]\nmethod = \"median\"\nbase = \"set/pivot\"\nmodels = [\"set/t0\", \"set/t1\"]\nout = \"merged\"\n",
        plugin.display()
    )).unwrap();
    let listing = ok(&fusechat(&d, &["plugins", "median"]));
    assert!(
        listing.contains(&plugin.display().to_string()) && listing.contains("ignore_zeros"),
        "{listing}"
    );
    ok(&fusechat(&d, &["merge", "--config", "fusechat.toml"]));
    assert!(d.join("merged/model.safetensors").is_file());
    ok(&fusechat(&d, &["run"]));
}

#[test]
fn plugin_parameters_are_validated_before_compute() {
    let (_t, d) = setup();
    let plugin = lib("fusechat_median");
    let base = [
        "--plugin",
        plugin.to_str().unwrap(),
        "merge",
        "--method",
        "median",
        "--base",
        "set/pivot",
        "--model",
        "set/t0",
        "--model",
        "set/t1",
        "--out",
        "o",
    ];
    let mut args = base.to_vec();
    args.extend(["--set", "ignore_zeroes=true"]);
    let err = fails(&fusechat(&d, &args));
    assert!(
        err.contains("unknown parameter `ignore_zeroes`") && err.contains("known: ignore_zeros"),
        "{err}"
    );
    let mut args = base.to_vec();
    args.extend(["--set", "ignore_zeros=3"]);
    let err = fails(&fusechat(&d, &args));
    assert!(
        err.contains("parameter `ignore_zeros`: expected bool"),
        "{err}"
    );
    let err = fails(&fusechat(
        &d,
        &[
            "--plugin",
            plugin.to_str().unwrap(),
            "merge",
            "--method",
            "median",
            "--base",
            "set/pivot",
            "--model",
            "set/t0",
            "--out",
            "o",
        ],
    ));
    assert!(
        err.contains("at least 2 model(s) besides the base"),
        "{err}"
    );
    nothing_left(&d, "o");
}

#[test]
fn a_name_clash_is_an_error_unless_the_config_says_which_wins() {
    let (_t, d) = setup();
    let plugin = lib("fusechat_median");
    let copy = d.join(plugin.file_name().unwrap());
    std::fs::copy(&plugin, &copy).unwrap();
    let cfg = |prefer: &str| {
        format!(
            "[plugins]\npaths = [\"{}\", \"{}\"]\n{prefer}",
            plugin.display(),
            copy.display()
        )
    };
    std::fs::write(d.join("fusechat.toml"), cfg("")).unwrap();
    let err = fails(&fusechat(&d, &["plugins"]));
    assert!(
        err.contains("clashes") && err.contains("[plugins.prefer]") && err.contains("median"),
        "{err}"
    );
    std::fs::write(
        d.join("fusechat.toml"),
        cfg(&format!(
            "[plugins.prefer]\nmedian = \"{}\"\n",
            copy.display()
        )),
    )
    .unwrap();
    let listing = ok(&fusechat(&d, &["plugins", "median"]));
    assert!(listing.contains(&copy.display().to_string()), "{listing}");
}

fn bad_plugin(name: &str, method: &str) -> String {
    let (_t, d) = setup();
    let err = fails(&fusechat(
        &d,
        &[
            "--plugin",
            lib(name).to_str().unwrap(),
            "merge",
            "--method",
            method,
            "--model",
            "set/t0",
            "--out",
            "o",
        ],
    ));
    nothing_left(&d, "o");
    err
}

#[test]
fn a_plugin_with_the_wrong_abi_version_is_refused() {
    let err = bad_plugin("fixture_bad_abi", "x");
    assert!(
        err.contains("ABI version 999")
            && err.contains("speaks version 1")
            && err.contains("libfixture_bad_abi"),
        "{err}"
    );
}

#[test]
fn a_plugin_without_the_entry_symbol_is_refused() {
    let err = bad_plugin("fixture_no_entry", "x");
    assert!(
        err.contains("no `fusechat_plugin_register` entry point")
            && err.contains("libfixture_no_entry"),
        "{err}"
    );
}

#[test]
fn a_panicking_plugin_gives_an_error_naming_plugin_and_tensor() {
    let err = bad_plugin("fixture_panics", "panicky");
    assert!(
        err.contains("plugin `panicky`")
            && err.contains("the kernel panicked: deliberate failure")
            && err.contains(".mlp."),
        "{err}"
    );
}

#[test]
fn a_plugin_returning_the_wrong_shape_is_refused() {
    let err = bad_plugin("fixture_wrong_shape", "short");
    assert!(
        err.contains("plugin `short`") && err.contains("values for shape"),
        "{err}"
    );
}

#[test]
fn missing_files_and_foreign_libraries_are_clear_errors() {
    let (_t, d) = setup();
    let err = fails(&fusechat(&d, &["--plugin", "nope.so", "plugins"]));
    assert!(
        err.contains("nope.so") && err.contains("file not found"),
        "{err}"
    );
    std::fs::write(d.join("text.so"), "not a library").unwrap();
    let err = fails(&fusechat(&d, &["--plugin", "text.so", "plugins"]));
    assert!(
        err.contains("text.so")
            && err.contains("cannot be loaded as a shared library for this platform"),
        "{err}"
    );
    // The example plugin with its ELF machine patched to AArch64.
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        let mut bytes = std::fs::read(lib("fusechat_median")).unwrap();
        bytes[18] = 0xB7;
        bytes[19] = 0x00;
        std::fs::write(d.join("arm.so"), bytes).unwrap();
        let err = fails(&fusechat(&d, &["--plugin", "arm.so", "plugins"]));
        assert!(
            err.contains("arm.so") && err.contains("x86_64-linux"),
            "{err}"
        );
    }
}
