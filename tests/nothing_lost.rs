//! Nothing lost: an output never replaces or lives inside an input,
//! interrupted merges leave no temporary, concurrent --shard processes never
//! delete each other's files, shards of other runs are never mixed in, and
//! merges refuse inputs of different architectures.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::pipeline::miniature::MiniatureSpec;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn setup(spec: &MiniatureSpec) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    fusechat::core::pipeline::miniature::generate(spec, &d.join("m")).unwrap();
    (tmp, d)
}

fn small() -> MiniatureSpec {
    let mut s = spec(2, DType::F32);
    s.vocab_size = 96;
    s
}

fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
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

#[test]
fn an_output_that_is_contains_or_is_inside_an_input_is_refused_even_with_force() {
    let (_t, d) = setup(&small());
    let before = all_files(&d.join("m/t0"));
    for out in ["m/t0", "m", "m/t0/sub"] {
        let err = fails(&fusechat(
            &d,
            &[
                "merge", "--method", "linear", "--model", "m/t0", "--model", "m/t1", "--out", out,
                "--force",
            ],
        ));
        assert!(
            err.contains("would destroy an input") && err.contains("m/t0"),
            "{out}: {err}"
        );
        assert_eq!(
            all_files(&d.join("m/t0")),
            before,
            "{out}: the input changed"
        );
    }
    let err = fails(&fusechat(
        &d,
        &[
            "represent",
            "--model",
            "m/pivot",
            "--data",
            "m/conversations.jsonl",
            "--out",
            "m/pivot",
            "--force",
        ],
    ));
    assert!(err.contains("the output is the model"), "{err}");
    ok(&fusechat(
        &d,
        &[
            "represent",
            "--model",
            "m/pivot",
            "--data",
            "m/conversations.jsonl",
            "--out",
            "r",
            "--no-progress",
        ],
    ));
    let err = fails(&fusechat(
        &d,
        &[
            "align", "--pivot", "r", "--source", "r", "--out", "r", "--force",
        ],
    ));
    assert!(
        err.contains("the output is the pivot representation"),
        "{err}"
    );
}

/// A model large enough that a merge takes a moment.
fn slow_spec() -> MiniatureSpec {
    let mut s = spec(2, DType::F32);
    s.vocab_size = 8192;
    s.hidden_size = 256;
    s.intermediate_size = 704;
    s.num_layers = 6;
    s.num_heads = 8;
    s.num_kv_heads = 4;
    s
}

/// Start a merge, wait until its temporary output exists, then send `signal`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn interrupt_merge(d: &Path, signal: i32) -> (std::process::Output, String) {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fusechat"))
        .args([
            "merge", "--method", "ties", "--base", "m/pivot", "--model", "m/t0", "--model", "m/t1",
        ])
        .args([
            "--set",
            "density=0.5",
            "--threads",
            "1",
            "--out",
            "o",
            "--no-progress",
        ])
        .current_dir(d)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let tmp = loop {
        let found = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.contains("fusechat-tmp"));
        if let Some(t) = found {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the merge never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    (child.wait_with_output().unwrap(), tmp)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn ctrl_c_or_sigterm_during_a_merge_removes_its_temporary_and_a_killed_one_is_named_next_time() {
    let (_t, d) = setup(&slow_spec());
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (out, tmp) = interrupt_merge(&d, signal);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "signal {signal}: {err}");
        assert!(err.contains("interrupted") && err.contains(&tmp), "{err}");
        nothing_left(&d, "o");
    }
    // SIGKILL cannot be caught: the temporary stays, and the next run removes and names it.
    let (out, tmp) = interrupt_merge(&d, libc::SIGKILL);
    assert_eq!(out.status.code(), None);
    assert!(d.join(&tmp).exists(), "a SIGKILLed merge leaves {tmp}");
    let next = ok(&fusechat(
        &d,
        &[
            "merge",
            "--method",
            "linear",
            "--model",
            "m/t0",
            "--model",
            "m/t1",
            "--out",
            "o",
            "--no-progress",
        ],
    ));
    assert!(
        next.contains(&tmp) && next.contains("left by a killed run"),
        "{next}"
    );
    assert!(!d.join(&tmp).exists());
}

#[test]
fn a_resuming_represent_keeps_the_live_temporaries_of_other_processes() {
    let (_t, d) = setup(&small());
    let args = [
        "represent",
        "--model",
        "m/pivot",
        "--data",
        "m/conversations.jsonl",
        "--out",
        "r",
    ];
    let mut a = args.to_vec();
    a.extend(["--rows-per-shard", "8", "--shard", "1/2", "--no-progress"]);
    ok(&fusechat(&d, &a));
    // another --shard process, alive (this test's own pid), is writing shard 0;
    // a killed one (a pid that cannot exist) left shard 2 half-written
    let live = format!("shard-00000.safetensors.tmp-{}", std::process::id());
    std::fs::write(d.join("r").join(&live), b"being written").unwrap();
    let dead = "shard-00002.safetensors.tmp-4000000000";
    std::fs::write(d.join("r").join(dead), b"partial").unwrap();
    let mut a = args.to_vec();
    a.extend(["--rows-per-shard", "8", "--shard", "1/2", "--no-progress"]);
    ok(&fusechat(&d, &a));
    assert!(
        d.join("r").join(&live).exists(),
        "a live process's temporary was deleted"
    );
    assert!(
        !d.join("r").join(dead).exists(),
        "a dead process's temporary was kept"
    );
}

#[test]
fn shards_made_with_other_settings_are_never_mixed_in() {
    let (_t, d) = setup(&small());
    let run = |out: &str, max_length: &str| {
        fusechat(
            &d,
            &[
                "represent",
                "--model",
                "m/pivot",
                "--data",
                "m/conversations.jsonl",
                "--out",
                out,
                "--rows-per-shard",
                "8",
                "--max-length",
                max_length,
                "--no-progress",
            ],
        )
    };
    ok(&run("a", "2048"));
    ok(&run("b", "64"));
    // a partial run of `a`'s settings, completed with a shard copied from `b`
    std::fs::remove_file(d.join("a/manifest.json")).unwrap();
    std::fs::copy(
        d.join("b/shard-00001.safetensors"),
        d.join("a/shard-00001.safetensors"),
    )
    .unwrap();
    let err = fails(&run("a", "2048"));
    assert!(
        err.contains("shard-00001.safetensors") && err.contains("other inputs or settings"),
        "{err}"
    );
    // and a finished representation whose shard was swapped is refused when read
    ok(&run("c", "2048"));
    std::fs::copy(
        d.join("b/shard-00001.safetensors"),
        d.join("c/shard-00001.safetensors"),
    )
    .unwrap();
    let err = fails(&fusechat(
        &d,
        &[
            "align",
            "--pivot",
            "c",
            "--source",
            "c",
            "--out",
            "x",
            "--aligner",
            "identity",
        ],
    ));
    assert!(
        err.contains("shard-00001.safetensors") && err.contains("cannot be mixed"),
        "{err}"
    );
}

#[test]
fn inputs_of_different_architectures_are_refused_unless_allowed() {
    let (_t, d) = setup(&small());
    copy_dir(&d.join("m/t1"), &d.join("other"));
    let cfg_path = d.join("other/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_theta"] = serde_json::json!(1000000.0);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let merge = |extra: &[&str]| {
        let mut a = vec![
            "merge", "--method", "linear", "--model", "m/t0", "--model", "other", "--out", "o",
        ];
        a.extend_from_slice(extra);
        fusechat(&d, &a)
    };
    let err = fails(&merge(&[]));
    assert!(
        err.contains("`rope_theta` is 10000.0 vs 1000000.0") && err.contains("`m/t0` and `other`"),
        "{err}"
    );
    nothing_left(&d, "o");
    ok(&merge(&["--allow-config-mismatch"]));
    // a config without hidden_size is refused too (it used to merge silently)
    cfg.as_object_mut().unwrap().remove("hidden_size");
    cfg["rope_theta"] = serde_json::json!(10000.0);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = fails(&merge(&["--force"]));
    assert!(
        err.contains("model `other`: config.json has no `hidden_size`"),
        "{err}"
    );
}
