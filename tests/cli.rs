//! End to end through the `fusechat` binary: the three ways of asking for a
//! merge, FuseChat's mergekit configs as written, `run`, `plugins`, and bad input.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::pipeline::miniature::{generate, MiniatureSpec};
use std::path::Path;
use std::process::Output;

#[test]
fn the_three_ways_of_asking_give_the_same_output() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    model_set(&d.join("set"), 2, DType::BF16);
    ok(&fusechat(
        d,
        &[
            "merge",
            "--method",
            "ties",
            "--base",
            "set/pivot",
            "--model",
            "set/t0",
            "--model",
            "set/t1",
            "--weight",
            "0.25",
            "--weight",
            "0.5",
            "--set",
            "density=0.5",
            "--set",
            "normalize=true",
            "--out",
            "o1",
        ],
    ));
    std::fs::write(d.join("cfg.toml"), r#"
[merge]
method = "ties"
base = "set/pivot"
models = [{ path = "set/t0", parameters = { weight = 0.25 } }, { path = "set/t1", parameters = { weight = 0.5 } }]
out = "o2"
[merge.parameters]
density = 0.5
normalize = true
"#).unwrap();
    ok(&fusechat(d, &["merge", "--config", "cfg.toml"]));
    std::fs::write(d.join("cfg.yml"), "models:\n  - model: set/pivot\n  - model: set/t0\n    parameters:\n      weight: 0.25\n  - model: set/t1\n    parameters:\n      weight: 0.5\nmerge_method: ties\nbase_model: set/pivot\nparameters:\n  density: 0.5\n  normalize: true\n").unwrap();
    ok(&fusechat(
        d,
        &["merge", "--mergekit", "cfg.yml", "--out", "o3"],
    ));
    let a = weight_bytes(&d.join("o1"));
    assert_eq!(a, weight_bytes(&d.join("o2")));
    assert_eq!(a, weight_bytes(&d.join("o3")));
    assert_ne!(tensors(&d.join("o1")), tensors(&d.join("set/pivot")));
    for f in ["config.json", "README.md", "fusechat_merge.json"] {
        assert!(d.join("o1").join(f).is_file(), "{f}");
    }
}

/// The FuseChat models' names as local directories: 32 layers, tiny widths.
fn fusechat_models(root: &Path) {
    let spec = MiniatureSpec {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 8,
        num_layers: 32,
        num_heads: 2,
        num_kv_heads: 1,
        targets: vec![
            "FuseAI/OpenChat-3.5-7B-Mixtral".into(),
            "FuseAI/OpenChat-3.5-7B-Solar".into(),
        ],
        dtype: DType::BF16,
        seed: 3,
    };
    let set = generate(&spec, &root.join("gen")).unwrap();
    copy_dir(&set.pivot, &root.join("openchat/openchat_3.5"));
    for (t, name) in set.targets.iter().zip(&spec.targets) {
        copy_dir(t, &root.join(name));
    }
    for m in [
        "openchat/openchat_3.5",
        "FuseAI/OpenChat-3.5-7B-Mixtral",
        "FuseAI/OpenChat-3.5-7B-Solar",
    ] {
        std::fs::write(
            root.join(m).join("tokenizer_config.json"),
            "{\"chat_template\": \"x\"}",
        )
        .unwrap();
    }
}

fn config(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/mergekit-configs")
            .join(name),
    )
    .unwrap()
}

#[test]
fn fusechat_mergekit_configs_run_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fusechat_models(d);
    for c in [
        "fusechat-slerp.yml",
        "fusechat-ta.yml",
        "fusechat-ties.yml",
        "fusechat-dare.yml",
    ] {
        std::fs::write(d.join(c), config(c)).unwrap();
        let out = format!("out-{c}");
        let log = ok(&fusechat(d, &["merge", "--mergekit", c, "--out", &out]));
        assert!(
            d.join(&out).join("tokenizer_config.json").is_file(),
            "{c}: tokenizer files copied"
        );
        if c == "fusechat-slerp.yml" {
            assert!(
                log.contains("not one of its slice sources")
                    && log.contains("base_model: FuseAI/OpenChat-3.5-7B-Mixtral"),
                "{log}"
            );
        }
    }
    let (mix, sol, base) = (
        d.join("FuseAI/OpenChat-3.5-7B-Mixtral"),
        d.join("FuseAI/OpenChat-3.5-7B-Solar"),
        d.join("openchat/openchat_3.5"),
    );
    // SLERP: the first source is the base; t = 0 on layer 0's attention, 1 on its MLP.
    let s = d.join("out-fusechat-slerp.yml");
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(tensor(&s, q), tensor(&mix, q));
    let up = "model.layers.0.mlp.up_proj.weight";
    assert!(max_abs_diff(&tensor(&s, up), &tensor(&sol, up)) < 1e-2);
    // TA: θ⁰ + (0.25·δ₁ + 0.5·δ₂) / 0.75, in bf16.
    let ta = d.join("out-fusechat-ta.yml");
    for name in [q, up, "lm_head.weight"] {
        let (b, m, s2) = (tensor(&base, name), tensor(&mix, name), tensor(&sol, name));
        let got = tensor(&ta, name);
        for i in 0..b.len() {
            let want = b[i] + (0.25 * (m[i] - b[i]) + 0.5 * (s2[i] - b[i])) / 0.75;
            assert!(
                bf16_ulps(got[i], want) <= 1,
                "{name}[{i}]: {} vs {want}",
                got[i]
            );
        }
    }
}

#[test]
fn hf_ids_resolve_from_the_local_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fusechat_models(&d.join("src"));
    for id in [
        "openchat/openchat_3.5",
        "FuseAI/OpenChat-3.5-7B-Mixtral",
        "FuseAI/OpenChat-3.5-7B-Solar",
    ] {
        let repo = d
            .join("no-hf-cache")
            .join(format!("models--{}", id.replace('/', "--")));
        copy_dir(&d.join("src").join(id), &repo.join("snapshots/0123abc"));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
    }
    std::fs::write(d.join("ties.yml"), config("fusechat-ties.yml")).unwrap();
    ok(&fusechat(
        d,
        &["merge", "--mergekit", "ties.yml", "--out", "merged"],
    ));
    assert!(d.join("merged/model.safetensors").is_file());
    // An id that is in neither place says so, and how to fix it.
    std::fs::write(
        d.join("bad.yml"),
        config("fusechat-ties.yml").replace("FuseAI/OpenChat-3.5-7B-Solar", "FuseAI/Nope"),
    )
    .unwrap();
    let err = fails(&fusechat(
        d,
        &["merge", "--mergekit", "bad.yml", "--out", "x"],
    ));
    assert!(
        err.contains("FuseAI/Nope")
            && err.contains("HF cache")
            && err.contains("huggingface-cli download"),
        "{err}"
    );
    nothing_left(d, "x");
}

#[test]
fn run_uses_fusechat_toml_and_skips_when_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("fusechat.toml"), small_default_config()).unwrap();
    let log = ok(&fusechat(d, &["run"]));
    // the default run fuses each source into a target, then merges the targets with VaRM
    assert!(
        log.contains("fuse mixtral: ")
            && log.contains("fuse solar: ")
            && log.contains("per-tensor weights (varm)")
            && log.contains("mixtral")
            && log.contains("lm_head.weight"),
        "{log}"
    );
    let merges = [
        "merged",
        "merged-linear",
        "merged-task_arithmetic",
        "merged-ties",
        "merged-slerp",
    ];
    for t in ["targets/mixtral", "targets/solar", "targets/sft"]
        .iter()
        .chain(&merges)
    {
        assert!(
            d.join("runs/default")
                .join(t)
                .join("model.safetensors")
                .is_file(),
            "{t}"
        );
    }
    // eval: every model of the run, by its name, in the reports and the printed table
    let reports = d.join("runs/default/reports");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("eval.json")).unwrap()).unwrap();
    let rows = v["results"].as_array().unwrap();
    let models = [
        "pivot",
        "mixtral",
        "solar",
        "sft",
        "target:mixtral",
        "target:solar",
        "merge:varm",
        "merge:linear",
        "merge:task_arithmetic",
        "merge:ties",
        "merge:slerp",
    ];
    for m in models {
        // exact match per skill: metric `accuracy`, the skill as `category`,
        // on the held-out split's 8 records per skill
        for skill in ["add", "reverse", "capital"] {
            let acc = rows
                .iter()
                .find(|r| r["model"] == m && r["metric"] == "accuracy" && r["category"] == skill)
                .unwrap_or_else(|| panic!("no accuracy of {m} on {skill}: {v}"));
            let x = acc["value"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x) && acc["n"] == 8, "{acc}");
        }
        let ppl = rows
            .iter()
            .find(|r| r["model"] == m && r["metric"] == "perplexity" && r["category"].is_null())
            .unwrap_or_else(|| panic!("no perplexity of {m}: {v}"));
        let x = ppl["value"].as_f64().unwrap();
        assert!(
            x.is_finite() && x > 1.0 && ppl["n"].as_u64().unwrap() >= 24,
            "{ppl}"
        );
        assert!(
            log.contains(&format!("| {m} |")),
            "{m} not in the printed table:\n{log}"
        );
    }
    for f in ["eval.md", "eval.png", "eval.svg"] {
        assert!(reports.join(f).is_file(), "{f}");
    }
    let log = ok(&fusechat(d, &["run"]));
    assert!(
        log.contains("up to date") && log.contains("eval: "),
        "{log}"
    );
    let table = &log[log.rfind("stage ").expect("a summary table")..];
    // every stage but `filter` (which always runs: it reads manifests only)
    for line in table.lines().skip(1).filter(|l| !l.starts_with("filter ")) {
        assert!(line.contains(" up to date "), "{line}\n{log}");
    }
    ok(&fusechat(d, &["run", "--force"]));
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("eval.json")).unwrap()).unwrap();
    assert_eq!(again, v, "--force gives the same numbers");
}

#[test]
fn plugins_lists_every_method_with_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(&fusechat(tmp.path(), &["plugins"]));
    for m in [
        "varm",
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "sce",
    ] {
        assert!(out.contains(&format!("merger {m} ")), "{m} missing:\n{out}");
    }
    assert!(
        out.contains("granularity")
            && out.contains("one of tensor|layer|model")
            && out.contains("built-in")
    );
    let err = fails(&fusechat(tmp.path(), &["plugins", "nope"]));
    assert!(
        err.contains("known methods") && err.contains("varm"),
        "{err}"
    );
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    model_set(&d.join("set"), 2, DType::BF16);
    let out = ok(&fusechat(
        d,
        &[
            "merge",
            "--method",
            "slerp",
            "--base",
            "set/pivot",
            "--model",
            "set/t0",
            "--set",
            "t=[0,1]",
            "--out",
            "o",
            "--dry-run",
        ],
    ));
    assert!(
        out.contains("model.layers.1.mlp.up_proj.weight")
            && out.contains("t=1")
            && out.contains("estimated peak"),
        "{out}"
    );
    nothing_left(d, "o");
}

#[test]
fn help_is_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ok(&fusechat(tmp.path(), &["merge", "--help"]));
    assert!(out.contains("--mergekit") && out.contains("--dry-run") && out.contains("KEY=VALUE"));
}

// ---------------------------------------------------------------- bad input

fn bad_setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    model_set(&d.join("set"), 2, DType::F32);
    (tmp, d)
}

fn merge_cli(d: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        "set/pivot",
        "--model",
        "set/t0",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--out", "o"]);
    fusechat(d, &args)
}

#[test]
fn missing_dirs_and_bad_parameters_are_reported_together() {
    let (_t, d) = bad_setup();
    let err = fails(&merge_cli(
        &d,
        &[
            "--model",
            "set/nope",
            "--set",
            "frobnicate=1",
            "--set",
            "normalize=3",
        ],
    ));
    assert!(
        err.contains("set/nope") && err.contains("not found"),
        "{err}"
    );
    assert!(
        err.contains("unknown parameter `frobnicate`") && err.contains("known: weight"),
        "{err}"
    );
    assert!(
        err.contains("parameter `normalize`: expected bool"),
        "{err}"
    );
    assert!(err.contains("3 problem(s)"), "{err}");
    nothing_left(&d, "o");
}

#[test]
fn shape_mismatch_and_missing_tensor_name_the_tensor() {
    let (_t, d) = bad_setup();
    let mut ts = tensors(&d.join("set/t1"));
    ts.retain(|(n, _, _)| n != "model.norm.weight");
    for (n, s, v) in ts.iter_mut() {
        if n == "lm_head.weight" {
            s[0] -= 1;
            v.truncate(s.iter().product());
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("set/t1/config.json")).unwrap())
            .unwrap();
    fusechat::core::io::hf_dir::write_model_dir(&d.join("broken"), &cfg, &ts, DType::F32, 1 << 30)
        .unwrap();
    let err = fails(&merge_cli(&d, &["--model", "broken"]));
    assert!(
        err.contains("shape mismatch for `lm_head.weight`")
            && err.contains("[32, 16]")
            && err.contains("[31, 16]"),
        "{err}"
    );
    assert!(
        err.contains("tensor `model.norm.weight` is missing from `broken`"),
        "{err}"
    );
    nothing_left(&d, "o");
}

#[test]
fn a_broken_input_contract_is_explained() {
    let (_t, d) = bad_setup();
    let err = fails(&fusechat(
        &d,
        &[
            "merge",
            "--method",
            "slerp",
            "--base",
            "set/pivot",
            "--model",
            "set/t0",
            "--model",
            "set/t1",
            "--set",
            "t=0.5",
            "--out",
            "o",
        ],
    ));
    assert!(
        err.contains("exactly 1 model(s) besides the base; this request has 2"),
        "{err}"
    );
    let err = fails(&fusechat(
        &d,
        &[
            "merge", "--method", "ties", "--model", "set/t0", "--out", "o",
        ],
    ));
    assert!(err.contains("needs a base model"), "{err}");
    let err = fails(&fusechat(
        &d,
        &[
            "merge",
            "--method",
            "slerp",
            "--base",
            "set/pivot",
            "--model",
            "set/t0",
            "--out",
            "o",
        ],
    ));
    assert!(err.contains("required parameter `t`"), "{err}");
    let err = fails(&fusechat(
        &d,
        &[
            "merge", "--method", "nope", "--model", "set/t0", "--out", "o",
        ],
    ));
    assert!(
        err.contains("unknown merge method `nope`") && err.contains("varm"),
        "{err}"
    );
    nothing_left(&d, "o");
}

#[test]
fn a_nan_weight_aborts_cleanly_naming_the_tensor() {
    let (_t, d) = bad_setup();
    let mut ts = tensors(&d.join("set/t1"));
    for (n, _, v) in ts.iter_mut() {
        if n == "model.layers.1.mlp.down_proj.weight" {
            v[5] = f32::NAN;
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("set/t1/config.json")).unwrap())
            .unwrap();
    fusechat::core::io::hf_dir::write_model_dir(&d.join("nan"), &cfg, &ts, DType::F32, 1 << 30)
        .unwrap();
    let err = fails(&merge_cli(&d, &["--model", "nan"]));
    assert!(
        err.contains("model.layers.1.mlp.down_proj.weight")
            && err.contains("non-finite")
            && err.contains("element 5"),
        "{err}"
    );
    nothing_left(&d, "o");
}

#[test]
fn a_truncated_safetensors_file_is_reported() {
    let (_t, d) = bad_setup();
    copy_dir(&d.join("set/t1"), &d.join("trunc"));
    let f = d.join("trunc/model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = fails(&merge_cli(&d, &["--model", "trunc"]));
    assert!(
        err.contains("trunc/model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    nothing_left(&d, "o");
}

#[test]
fn malformed_configs_name_the_file_and_place() {
    let (_t, d) = bad_setup();
    std::fs::write(
        d.join("bad.toml"),
        "[merge]\nmethod = \"varm\"\nout = 'o'\nbase = [1,\n",
    )
    .unwrap();
    let err = fails(&fusechat(&d, &["merge", "--config", "bad.toml"]));
    assert!(err.contains("bad.toml") && err.contains("line"), "{err}");
    std::fs::write(
        d.join("typo.toml"),
        "[merge]\nmethod = \"varm\"\nout = 'o'\nmodles = []\n",
    )
    .unwrap();
    let err = fails(&fusechat(&d, &["merge", "--config", "typo.toml"]));
    assert!(err.contains("typo.toml") && err.contains("modles"), "{err}");
    std::fs::write(
        d.join("bad.yml"),
        "models:\n  - model: a\n   bad indent: [\n",
    )
    .unwrap();
    let err = fails(&fusechat(
        &d,
        &["merge", "--mergekit", "bad.yml", "--out", "o"],
    ));
    assert!(
        err.contains("bad.yml") && err.contains("invalid YAML"),
        "{err}"
    );
    let err = fails(&fusechat(&d, &["run", "--config", "missing.toml"]));
    assert!(err.contains("missing.toml"), "{err}");
    nothing_left(&d, "o");
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let (_t, d) = bad_setup();
    std::fs::create_dir(d.join("o")).unwrap();
    std::fs::write(d.join("o/keep.txt"), "mine").unwrap();
    let err = fails(&merge_cli(&d, &[]));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert!(d.join("o/keep.txt").exists());
    ok(&merge_cli(&d, &["--force"]));
    assert!(!d.join("o/keep.txt").exists() && d.join("o/model.safetensors").exists());
}

/// `run` checks the whole config before any stage runs: a misspelt merge
/// method, a bad aligner parameter and a missing source directory are reported
/// together, each under its table, and nothing is computed or written.
#[test]
fn run_reports_every_config_problem_before_any_stage_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let repo_cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("fusechat.toml");
    let text = std::fs::read_to_string(repo_cfg)
        .unwrap()
        .replace("method = \"varm\"", "method = \"vram\"")
        .replace("mode = \"soft\"", "mode = \"sofft\"")
        .replace(
            "[represent]",
            "[[sources]]\nname = \"gone\"\npath = \"models/nowhere\"\naligner = \"identity\"\n\n[represent]",
        )
        .replace("name = \"perplexity\"", "name = \"perplexity\"\nparameters = { batch_size = 0 }")
        .replace("[eval]\n", "[eval]\nmodels = [\"pivot\", \"merge:dare_ties\"]\n");
    std::fs::write(d.join("fusechat.toml"), text).unwrap();
    for args in [&["run"][..], &["run", "--dry-run"][..]] {
        let err = fails(&fusechat(d, args));
        assert!(err.contains("fusechat.toml has 5 problem(s)"), "{err}");
        assert!(
            err.contains("[eval] models: this run has no model `merge:dare_ties`")
                && err.contains("merge:vram")
                && err.contains("batch_size"),
            "{err}"
        );
        assert!(
            err.contains("[merge] method: unknown merge method `vram`")
                && err.contains("known methods")
                && err.contains("varm"),
            "{err}"
        );
        assert!(
            err.contains("[[sources]] solar align")
                && err.contains("mode")
                && err.contains("sofft"),
            "{err}"
        );
        assert!(
            err.contains("[[sources]] gone path")
                && err.contains("models/nowhere")
                && err.contains("does not exist"),
            "{err}"
        );
        assert!(
            !d.join("runs").exists(),
            "a stage ran before the config was checked"
        );
    }
}

/// `--dry-run` prints the stage plan and writes nothing; after a run it says
/// which stages are up to date, and a changed merge setting reruns the merge
/// only. A run ends with a table of every stage and where its output is.
#[test]
fn dry_run_prints_the_stage_plan_and_run_ends_with_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("fusechat.toml"), small_default_config()).unwrap();
    let stages = [
        "miniature",
        "represent pivot",
        "represent mixtral",
        "align mixtral",
        "represent solar",
        "align solar",
        "filter",
        "fuse mixtral",
        "fuse solar",
        "fuse sft",
        "merge",
        "merge linear",
        "merge task_arithmetic",
        "merge ties",
        "merge slerp",
        "eval",
    ];
    let plan = ok(&fusechat(d, &["run", "--dry-run"]));
    for s in stages {
        assert!(plan.contains(s), "{s} missing from the plan:\n{plan}");
    }
    assert!(plan.contains("runs: no output yet"), "{plan}");
    assert!(plan.contains("rebuilt first by `miniature`"), "{plan}");
    assert!(plan.contains("runs/default/merged"), "{plan}");
    assert!(!d.join("runs").exists(), "--dry-run wrote something");

    let log = ok(&fusechat(d, &["run"]));
    let table = &log[log.rfind("stage ").expect("a summary table")..];
    for s in stages {
        let line = table
            .lines()
            .find(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("{s} missing:\n{table}"));
        assert!(line.contains(" ran "), "{line}");
    }
    assert!(
        table.contains("runs/default/merged") && table.contains("runs/default/repr/solar@pivot"),
        "{table}"
    );

    let plan = ok(&fusechat(d, &["run", "--dry-run"]));
    for s in ["miniature", "represent pivot", "align solar", "merge"] {
        let line = plan
            .lines()
            .find(|l| l.contains(&format!(" {s} ")))
            .unwrap();
        assert!(line.contains("up to date, skipped"), "{line}\n{plan}");
    }
    let text = std::fs::read_to_string(d.join("fusechat.toml"))
        .unwrap()
        .replace("statistic = \"square\"", "statistic = \"abs\"");
    std::fs::write(d.join("fusechat.toml"), text).unwrap();
    let plan = ok(&fusechat(d, &["run", "--dry-run"]));
    let merge = plan.lines().find(|l| l.contains(" merge ")).unwrap();
    assert!(merge.contains("its inputs or settings changed"), "{plan}");
    // the extra merges take the same targets, not VaRM's parameters
    let linear = plan.lines().find(|l| l.contains(" merge linear ")).unwrap();
    assert!(linear.contains("up to date"), "{plan}");
    let align = plan.lines().find(|l| l.contains(" align solar ")).unwrap();
    assert!(align.contains("up to date"), "{plan}");
}

/// `examples/fusechat-7b.toml`, the paper's setup, parses and plans against
/// stand-in model directories with the real models' configs, in a local HF
/// cache, and a dry run writes nothing.
#[test]
fn the_paper_setup_example_plans_with_stand_in_models() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("examples")).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fusechat-7b.toml");
    std::fs::copy(&example, d.join("examples/fusechat-7b.toml")).unwrap();
    let common = serde_json::json!({
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "vocab_size": 32002, "torch_dtype": "bfloat16",
    });
    let with = |extra: serde_json::Value| {
        let mut c = common.clone();
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let models = [
        (
            "openchat--openchat_3.5",
            with(
                serde_json::json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 32, "rope_theta": 10000.0, "sliding_window": 4096}),
            ),
        ),
        (
            "NousResearch--Nous-Hermes-2-Mixtral-8x7B-DPO",
            with(
                serde_json::json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": 32, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2}),
            ),
        ),
        (
            "NousResearch--Nous-Hermes-2-SOLAR-10.7B",
            with(
                serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 48, "rope_theta": 10000.0}),
            ),
        ),
    ];
    for (repo, config) in &models {
        let snap = d.join(format!(
            ".cache/huggingface/hub/models--{repo}/snapshots/0123abc"
        ));
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), config.to_string()).unwrap();
        fusechat::core::pipeline::miniature::write_tokenizer(&snap, 64).unwrap();
    }
    std::fs::create_dir_all(d.join("data/mt_bench/reference_answer")).unwrap();
    std::fs::write(
        d.join("data/fusechat_mixture.json"),
        r#"[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]"#,
    )
    .unwrap();
    std::fs::write(
        d.join("data/mt_bench/question.jsonl"),
        "{\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"a\", \"b\"]}\n{\"question_id\": 111, \"category\": \"math\", \"turns\": [\"c\", \"d\"]}\n",
    )
    .unwrap();
    let prompt = |name: &str| {
        serde_json::json!({"name": name, "system_prompt": "s", "prompt_template": "{question}", "output_format": "[[rating]]"}).to_string()
    };
    let prompts: Vec<String> = [
        "single-v1",
        "single-math-v1",
        "single-v1-multi-turn",
        "single-math-v1-multi-turn",
    ]
    .iter()
    .map(|n| prompt(n))
    .collect();
    std::fs::write(
        d.join("data/mt_bench/judge_prompts.jsonl"),
        prompts.join("\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("data/mt_bench/reference_answer/gpt-4.jsonl"),
        "{\"question_id\": 111, \"choices\": [{\"index\": 0, \"turns\": [\"r1\", \"r2\"]}]}\n",
    )
    .unwrap();
    let run = |key: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fusechat"));
        c.args(["run", "--config", "examples/fusechat-7b.toml", "--dry-run"])
            .current_dir(d)
            .env("HOME", d)
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env_remove("RUST_LOG");
        match key {
            Some(k) => c.env("OPENAI_API_KEY", k),
            None => c.env_remove("OPENAI_API_KEY"),
        };
        c.output().unwrap()
    };
    let plan = ok(&run(Some("sk-placeholder")));
    for stage in [
        "represent pivot",
        "represent mixtral",
        "align mixtral",
        "represent solar",
        "align solar",
        "filter",
        "fuse mixtral",
        "fuse solar",
        "merge",
        "eval",
    ] {
        assert!(plan.contains(stage), "no `{stage}` in the plan:\n{plan}");
    }
    assert!(
        plan.contains("runs/fusechat-7b/merged") && plan.contains("runs/fusechat-7b/reports"),
        "{plan}"
    );
    assert!(
        !plan.contains("sk-placeholder") && !plan.contains("cannot tell"),
        "{plan}"
    );
    assert!(
        !d.join("runs").exists(),
        "a dry run wrote {}",
        d.join("runs").display()
    );
    // The judge is OpenAI's API: without the key the config is refused before anything runs.
    let err = fails(&run(None));
    assert!(err.contains("OPENAI_API_KEY is not set"), "{err}");
    // A model directory without its tokenizer is a config problem, named, before anything runs.
    let solar = d.join(
        ".cache/huggingface/hub/models--NousResearch--Nous-Hermes-2-SOLAR-10.7B/snapshots/0123abc",
    );
    std::fs::remove_file(solar.join("tokenizer.json")).unwrap();
    let err = fails(&run(Some("sk-placeholder")));
    assert!(
        err.contains("[[sources]] solar") && err.contains("no tokenizer.json"),
        "{err}"
    );
}

/// Mistakes in `[miniature]`, `[[merge.extra]]` and `[run]` are reported
/// together, each naming its table and field, before anything runs.
#[test]
fn miniature_and_extra_merge_mistakes_are_reported_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let text = small_default_config()
        .replace("family = \"mixtral\"", "family = \"mixtrall\"")
        .replace("skill = \"reverse\"", "skill = \"revers\"")
        .replace("focus = 0.6", "focus = 1.5")
        .replace("threads = 1 ", "threads = 5000 ")
        .replace("method = \"linear\"", "method = \"ties\"")
        .replace("parameters = { t = 0.5 }", "")
        .replace("models/solar\"", "models/sollar\"")
        .replace("lr = 3e-3", "lr = 0");
    std::fs::write(d.join("fusechat.toml"), text).unwrap();
    for args in [&["run"][..], &["run", "--dry-run"][..]] {
        let err = fails(&fusechat(d, args));
        for want in [
            "[[miniature.sources]] #1 family: `mixtrall` (use one of",
            "[[miniature.sources]] #2 skill: `revers` (use one of add, reverse, capital)",
            "[miniature] focus = 1.5, little = 0.03",
            "[run] threads = 5000: at most 1024",
            "[[merge.extra]] #3 method: `ties` is merged twice",
            // known before the targets it merges exist
            "[[merge.extra]] #4 parameters: `t` is required by `slerp`",
            // a path into the miniature's directory that it does not make
            "[[sources]] solar path: `./runs/default/models/sollar` does not exist",
            "[fuse] lr = 0: use a finite rate > 0",
        ] {
            assert!(err.contains(want), "missing `{want}` in:\n{err}");
        }
        assert!(err.contains("fusechat.toml has 8 problem(s)"), "{err}");
        assert!(!d.join("runs").exists(), "something ran:\n{err}");
    }
}
