//! Input that used to panic, hang or be silently accepted: each is a clear
//! error (exit code 1) that names the value, the field or the file, and
//! leaves nothing behind.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use std::path::{Path, PathBuf};

/// The miniature set with its tokenizer and conversations under `d/m`.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    let mut s = spec(2, DType::F32);
    s.vocab_size = 96;
    fusechat::core::pipeline::miniature::generate(&s, &d.join("m")).unwrap();
    (tmp, d)
}

fn write(d: &Path, name: &str, text: &str) {
    std::fs::write(d.join(name), text).unwrap();
}

/// The command fails cleanly, leaves no `out` (nor a temporary), and says every `needle`.
fn refused(d: &Path, args: &[&str], out: &str, needles: &[&str]) -> String {
    let err = fails(&fusechat(d, args));
    nothing_left(d, out);
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    err
}

#[test]
fn mergekit_slices_without_sources_or_with_absurd_layer_ranges() {
    let (_t, d) = setup();
    write(
        &d,
        "empty.yml",
        "slices:\n  - sources:\n      - model: m/t0\n        layer_range: [0, 2]\n  - sources: []\nmerge_method: linear\n",
    );
    refused(
        &d,
        &["merge", "--mergekit", "empty.yml", "--out", "o"],
        "o",
        &["empty.yml", "slices[1].sources is empty"],
    );
    write(
        &d,
        "big.yml",
        "slices:\n  - sources:\n      - model: m/t0\n        layer_range: [0, 10000000000]\n      - model: m/t1\n        layer_range: [0, 10000000000]\nmerge_method: linear\n",
    );
    let t0 = std::time::Instant::now();
    refused(
        &d,
        &["merge", "--mergekit", "big.yml", "--out", "o"],
        "o",
        &["layer_range [0, 10000000000]", "<= 2"],
    );
    assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
    write(
        &d,
        "backwards.yml",
        "slices:\n  - sources:\n      - model: m/t0\n        layer_range: [2, 1]\nmerge_method: linear\n",
    );
    refused(
        &d,
        &["merge", "--mergekit", "backwards.yml", "--out", "o"],
        "o",
        &["slices[0].sources[0].layer_range [2, 1]"],
    );
}

#[test]
fn a_layer_index_with_a_leading_zero_is_refused_naming_the_tensor() {
    let (_t, d) = setup();
    write_model(
        &d.join("z"),
        &[(
            "model.layers.01.mlp.up_proj.weight",
            vec![2],
            vec![1.0, 2.0],
        )],
        DType::F32,
    );
    refused(
        &d,
        &[
            "merge", "--method", "linear", "--model", "z", "--model", "z", "--out", "o",
        ],
        "o",
        &["model.layers.01.mlp.up_proj.weight", "leading zero", "`1`"],
    );
}

#[test]
fn parameters_outside_their_range_name_the_value_and_the_range() {
    let (_t, d) = setup();
    let base = ["merge", "--base", "m/pivot", "--model", "m/t0"];
    let run = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--out", "o"]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let args = run(&["--method", "slerp", "--set", "t=1.5"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(
        &d,
        &args,
        "o",
        &["`t` is 1.5", "[0, 1]", "extrapolate = true"],
    );
    // asked for: mergekit's extrapolation
    let args = run(&[
        "--method",
        "slerp",
        "--set",
        "t=1.5",
        "--set",
        "extrapolate=true",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&fusechat(&d, &args));
    std::fs::remove_dir_all(d.join("o")).unwrap();
    let args = run(&[
        "--method",
        "ties",
        "--model",
        "m/t1",
        "--set",
        "density=1.5",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&d, &args, "o", &["`density` is 1.5", "[0, 1]"]);
    // a per-model gradient point out of range, in a config file
    write(
        &d,
        "r.toml",
        "[merge]\nmethod = \"dare_ties\"\nbase = \"m/pivot\"\nmodels = [{ path = \"m/t0\", parameters = { density = [0.5, -0.2] } }]\nout = \"o\"\n",
    );
    refused(
        &d,
        &["merge", "-c", "r.toml"],
        "o",
        &["`density` is -0.2", "model `m/t0`"],
    );
}

#[test]
fn a_method_without_any_model_is_refused() {
    let (_t, d) = setup();
    write(
        &d,
        "none.toml",
        "[merge]\nmethod = \"linear\"\nmodels = []\nout = \"o\"\n",
    );
    refused(
        &d,
        &["merge", "-c", "none.toml"],
        "o",
        &["nothing to merge"],
    );
}

#[test]
fn threads_past_the_bound_are_refused_at_once() {
    let (_t, d) = setup();
    let t0 = std::time::Instant::now();
    refused(
        &d,
        &[
            "merge",
            "--method",
            "linear",
            "--model",
            "m/t0",
            "--model",
            "m/t1",
            "--threads",
            "100000",
            "--out",
            "o",
        ],
        "o",
        &["--threads 100000", "at most 1024"],
    );
    assert!(t0.elapsed().as_secs() < 10);
}

#[test]
fn represent_counts_and_top_k_are_range_checked() {
    let (_t, d) = setup();
    let represent = |extra: &[&str]| {
        let mut a = vec![
            "represent",
            "--model",
            "m/pivot",
            "--data",
            "m/conversations.jsonl",
            "--out",
            "r",
        ];
        a.extend_from_slice(extra);
        refused(&d, &a, "r", &[])
    };
    let e = represent(&["--top-k", "100000"]);
    assert!(
        e.contains("top_k = 100000") && e.contains("96 tokens"),
        "{e}"
    );
    let e = represent(&["--batch-size", "0"]);
    assert!(e.contains("batch_size = 0: must be at least 1"), "{e}");
}

#[test]
fn sampling_settings_outside_their_range_are_refused_before_loading() {
    let (_t, d) = setup();
    let gen = |flag: &str, v: &str, needle: &str| {
        let flag_eq = format!("{flag}={v}");
        let err = fails(&fusechat(
            &d,
            &["generate", "--model", "m/pivot", "--prompt", "hi", &flag_eq],
        ));
        assert!(err.contains(needle), "{err}");
    };
    gen("--top-p", "0", "top_p = 0: use a value in (0, 1]");
    gen("--top-p", "1.5", "top_p = 1.5");
    gen("--temperature", "-1", "temperature = -1");
}

#[test]
fn data_files_without_usable_records_are_errors() {
    let (_t, d) = setup();
    let cases: [(&str, &str, &str); 3] = [
        (
            "object.json",
            "{\n  \"conversations\": []\n}\n",
            "is one JSON object",
        ),
        ("empty.jsonl", "", "is empty"),
        (
            "bad.jsonl",
            "{\"messages\": []}\n{\"x\": 1}\n",
            "has no usable record (2 in the file; first reasons: row 0",
        ),
    ];
    for (file, text, needle) in cases {
        write(&d, file, text);
        refused(
            &d,
            &[
                "represent",
                "--model",
                "m/pivot",
                "--data",
                file,
                "--out",
                "r",
            ],
            "r",
            &[file, needle],
        );
    }
}

/// A manifest whose top_k exceeds its shards' k, and a pivot tokenizer larger
/// than the representation's vocabulary.
#[test]
fn representations_that_disagree_with_their_manifest_or_tokenizer() {
    let (_t, d) = setup();
    for (m, out) in [("m/pivot", "rp"), ("m/t0", "rs")] {
        ok(&fusechat(
            &d,
            &[
                "represent",
                "--model",
                m,
                "--data",
                "m/conversations.jsonl",
                "--out",
                out,
                "--top-k",
                "3",
                "--no-progress",
            ],
        ));
    }
    // a tokenizer with more tokens than the pivot's vocabulary
    let big = d.join("bigtok");
    std::fs::create_dir_all(&big).unwrap();
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("m/pivot/tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..200 {
        vocab.insert(format!("extra{i}"), serde_json::json!(96 + i));
    }
    std::fs::write(big.join("tokenizer.json"), tj.to_string()).unwrap();
    refused(
        &d,
        &[
            "align",
            "--pivot",
            "rp",
            "--source",
            "rs",
            "--pivot-tokenizer",
            "bigtok",
            "--out",
            "a",
        ],
        "a",
        &["296 tokens", "vocabulary of 96"],
    );
    // top_k in the manifest above the shards' k
    let mf = d.join("rs/manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mf).unwrap()).unwrap();
    m["top_k"] = serde_json::json!(5);
    std::fs::write(&mf, m.to_string()).unwrap();
    refused(
        &d,
        &["align", "--pivot", "rp", "--source", "rs", "--out", "a"],
        "a",
        &["top-3 entries but manifest.json says top_k = 5"],
    );
}

/// A represent that fails once it has started leaves nothing behind, so the
/// corrected rerun into the same --out just works (no stale key to --force).
#[test]
fn a_failed_represent_leaves_nothing_and_the_corrected_rerun_succeeds() {
    let (_t, d) = setup();
    copy_dir(&d.join("m/pivot"), &d.join("x"));
    let good = std::fs::read_to_string(d.join("x/tokenizer.json")).unwrap();
    let mut tj: serde_json::Value = serde_json::from_str(&good).unwrap();
    let vocab = tj["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..10 {
        vocab.insert(format!("extra{i}"), serde_json::json!(96 + i));
    }
    std::fs::write(d.join("x/tokenizer.json"), tj.to_string()).unwrap();
    let args = [
        "represent",
        "--model",
        "x",
        "--data",
        "m/conversations.jsonl",
        "--out",
        "r",
        "--no-progress",
    ];
    let err = fails(&fusechat(&d, &args));
    assert!(err.contains("106") && err.contains("96"), "{err}");
    nothing_left(&d, "r");
    std::fs::write(d.join("x/tokenizer.json"), good).unwrap();
    ok(&fusechat(&d, &args));
    assert!(d.join("r/manifest.json").is_file());
}

/// An OS error is said once (it used to be repeated as its own cause).
#[test]
fn os_errors_are_not_doubled() {
    let (_t, d) = setup();
    let err = fails(&fusechat(
        &d,
        &["merge", "--mergekit", "missing.yml", "--out", "o"],
    ));
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    assert!(err.contains("missing.yml"), "{err}");
}
