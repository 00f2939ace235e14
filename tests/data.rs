//! The data-construction stages on a tiny generated model set: represent,
//! align and filter, checked against independent computations.

mod common;

use candle_core::{Device, Tensor};
use fusechat::core::data::align::{align, filter, AlignOptions, Vocab, VocabPair};
use fusechat::core::data::repr::{loss_positions, ReprDir, RowView};
use fusechat::core::data::represent::{represent, RepresentOptions};
use fusechat::core::io::dtype::DType;
use fusechat::core::merge::params::{ResolvedParams, Scalar};
use fusechat::core::model::LoadOptions;
use fusechat::plugins::models::decoder::Decoder;
use half::f16;
use std::path::{Path, PathBuf};

/// The miniature set (pivot, two targets, tokenizer, conversations) plus a data
/// file with one record that has no reply (so no label).
fn setup(dir: &Path) -> (PathBuf, Vec<PathBuf>, PathBuf) {
    let mut spec = common::spec(2, DType::F32);
    spec.vocab_size = 96;
    spec.hidden_size = 32;
    spec.intermediate_size = 48;
    let set = fusechat::core::pipeline::miniature::generate(&spec, &dir.join("models")).unwrap();
    let mut data = std::fs::read_to_string(dir.join("models/conversations.jsonl")).unwrap();
    data.push_str("{\"id\": \"no_reply\", \"messages\": [{\"role\": \"user\", \"content\": \"bada bede\"}]}\n");
    let path = dir.join("data.jsonl");
    std::fs::write(&path, data).unwrap();
    (set.pivot, set.targets, path)
}

fn opts(model: &Path, data: &Path, out: &Path) -> RepresentOptions {
    let mut o = RepresentOptions::new(model, data, out);
    o.top_k = 4;
    o.rows_per_shard = 8;
    o.batch_size = 3;
    o
}

fn align_opts(pivot: &Path, source: &Path, aligner: &str, out: &Path) -> AlignOptions {
    AlignOptions {
        pivot: pivot.to_path_buf(),
        source: source.to_path_buf(),
        pivot_tokenizer: None,
        source_tokenizer: None,
        aligner: aligner.into(),
        params: Default::default(),
        out: out.to_path_buf(),
        force: false,
    }
}

fn rows(dir: &Path) -> Vec<(u64, Vec<u32>, Vec<u8>, Vec<u32>, Vec<f16>, f32)> {
    let r = ReprDir::open(dir).unwrap();
    let mut out = Vec::new();
    for i in 0..r.manifest.shards.len() {
        let s = r.shard(i).unwrap();
        for j in 0..s.rows() {
            let v = s.row(j);
            out.push((
                v.row_id,
                v.input_ids.to_vec(),
                v.label_mask.to_vec(),
                v.topk_ids.to_vec(),
                v.topk_logits.to_vec(),
                v.metric_ce,
            ));
        }
    }
    out
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
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
fn representations_match_an_independent_forward_and_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, _, data) = setup(tmp.path());
    let reg = fusechat::registry();
    let a = tmp.path().join("a");
    let out = represent(&reg, &opts(&pivot, &data, &a)).unwrap();
    let m = out.manifest.clone().unwrap();
    assert_eq!(m.records.total, 51);
    assert_eq!(m.records.skipped, 2, "{:?}", m.skipped);
    assert_eq!(m.records.no_label, 1);
    assert_eq!(m.index_dtype, "u16");
    assert_eq!(
        m.skipped
            .iter()
            .map(|s| s.id.clone().unwrap())
            .collect::<Vec<_>>(),
        ["bad_roles", "empty"]
    );

    // Independent: each record alone through the decoder, full softmax in f64, top-k by sorting.
    let model = Decoder::load(&pivot, &LoadOptions::default(), None).unwrap();
    let got = rows(&a);
    assert_eq!(got.len(), 49);
    for (row_id, ids, labels, topk_ids, topk_logits, metric) in &got {
        let n = ids.len();
        let t = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), candle_core::DType::U32, &Device::Cpu).unwrap();
        let logits: Vec<f32> = model
            .forward(&t, &mask)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let v = logits.len() / n;
        let mut ces = Vec::new();
        for (p, t) in loss_positions(labels).enumerate() {
            let row = &logits[t * v..(t + 1) * v];
            let mut order: Vec<usize> = (0..v).collect();
            order.sort_by(|&x, &y| row[y].partial_cmp(&row[x]).unwrap());
            for j in 0..4 {
                let got_id = topk_ids[p * 4 + j] as usize;
                // Equal ids, or a near-tie between neighbours (batched vs single forward).
                assert!(
                    got_id == order[j] || (row[got_id] - row[order[j]]).abs() < 1e-4,
                    "row {row_id} position {t} rank {j}: {got_id} vs {}",
                    order[j]
                );
                assert!(
                    (topk_logits[p * 4 + j].to_f32() - row[order[j]]).abs()
                        <= 2e-3 * row[order[j]].abs().max(1.0)
                );
            }
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            ces.push(lse - row[ids[t + 1] as usize] as f64);
        }
        if ces.is_empty() {
            assert!(metric.is_nan(), "row {row_id} has no label");
        } else {
            let want = ces.iter().sum::<f64>() / ces.len() as f64;
            assert!(
                (*metric as f64 - want).abs() < 1e-4,
                "row {row_id}: {metric} vs {want}"
            );
        }
    }

    // Two --shard runs into one directory give the same bytes.
    let b = tmp.path().join("b");
    let mut o = opts(&pivot, &data, &b);
    o.shard = (1, 2);
    let first = represent(&reg, &o).unwrap();
    assert!(first.manifest.is_none() && !first.pending.is_empty());
    o.shard = (0, 2);
    let second = represent(&reg, &o).unwrap();
    assert_eq!(second.manifest.as_ref().unwrap().shards, m.shards);
    assert_eq!(files(&b), files(&a));

    // A killed run (one shard and the manifest missing) resumes with only that shard.
    std::fs::remove_file(b.join("manifest.json")).unwrap();
    std::fs::remove_file(b.join("shard-00002.safetensors")).unwrap();
    // ... and it was half-way through writing shard 3 (under its temp name,
    // with the pid of a process that is gone).
    std::fs::write(b.join("shard-00003.safetensors.tmp-4000000000"), b"partial").unwrap();
    let resumed = represent(&reg, &opts(&pivot, &data, &b)).unwrap();
    assert_eq!(resumed.computed, vec![2]);
    assert_eq!(resumed.reused.len(), m.shards.len() - 1);
    assert_eq!(files(&b), files(&a));
    assert!(
        represent(&reg, &opts(&pivot, &data, &b))
            .unwrap()
            .up_to_date
    );

    // The key is the content's: the same bytes written again (new times), or
    // the model, data and representation copied elsewhere (another machine),
    // are up to date.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let cfg = std::fs::read(pivot.join("config.json")).unwrap();
    std::fs::write(pivot.join("config.json"), &cfg).unwrap();
    assert!(
        represent(&reg, &opts(&pivot, &data, &b))
            .unwrap()
            .up_to_date
    );
    let elsewhere = tmp.path().join("elsewhere");
    common::copy_dir(&pivot, &elsewhere.join("pivot"));
    common::copy_dir(&b, &elsewhere.join("b"));
    std::fs::copy(&data, elsewhere.join("data.jsonl")).unwrap();
    let moved = opts(
        &elsewhere.join("pivot"),
        &elsewhere.join("data.jsonl"),
        &elsewhere.join("b"),
    );
    assert!(represent(&reg, &moved).unwrap().up_to_date);

    // A re-written checkpoint (other content) is not up to date: the CLI asks
    // for --force, `run` (replace_stale) recomputes.
    let mut changed: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
    changed["fusechat_test_note"] = serde_json::json!("re-exported");
    std::fs::write(pivot.join("config.json"), changed.to_string()).unwrap();
    let e = represent(&reg, &opts(&pivot, &data, &b))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    let mut o = opts(&pivot, &data, &b);
    o.replace_stale = true;
    let redone = represent(&reg, &o).unwrap();
    assert!(!redone.up_to_date && redone.computed.len() == m.shards.len());
    // the same values (the model's weights did not change), under the new key
    let bits = |d: &Path| {
        rows(d)
            .into_iter()
            .map(|(id, t, l, k, v, ce)| (id, t, l, k, v, ce.to_bits())) // NaN ≠ NaN
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&b), bits(&a));

    // Other settings into the same directory need --force.
    let mut o = opts(&pivot, &data, &b);
    o.top_k = 3;
    let e = represent(&reg, &o).unwrap_err().to_string();
    assert!(e.contains("--force"), "{e}");

    // Python's safetensors reads a shard with no fusechat code.
    let Some(python) = common::python_with_safetensors() else {
        return;
    };
    let script = format!(
        "from safetensors.numpy import load_file\nt = load_file({:?})\nassert t['topk_ids'].dtype.name == 'uint16' and t['topk_logits'].dtype.name == 'float16'\nassert t['row_offsets'][-1] == len(t['input_ids']) == len(t['label_mask'])\nprint(t['topk_ids'].shape[0], int(t['label_mask'][1:].sum()))",
        a.join("shard-00000.safetensors").display().to_string()
    );
    let o = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python could not read the shard: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = String::from_utf8_lossy(&o.stdout);
    let n: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(
        n[0].parse::<usize>().unwrap(),
        ReprDir::open(&a).unwrap().shard(0).unwrap().positions()
    );
}

#[test]
fn identity_alignment_carries_the_source_over_and_the_filter_drops_nan_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, targets, data) = setup(tmp.path());
    let reg = fusechat::registry();
    let (p, s) = (tmp.path().join("p"), tmp.path().join("s"));
    represent(&reg, &opts(&pivot, &data, &p)).unwrap();
    represent(&reg, &opts(&targets[0], &data, &s)).unwrap();
    let mut results = Vec::new();
    for aligner in ["identity", "exact", "mined", "offsets"] {
        let out = tmp.path().join(format!("s@p-{aligner}"));
        let o = align_opts(&p, &s, aligner, &out);
        let r = align(&reg, &o).unwrap();
        // One vocabulary, one tokenization: every position carries over.
        assert_eq!(r.stats.fallback, 0, "{aligner}");
        results.push(rows(&out));
    }
    let source = rows(&s);
    for r in &results {
        assert_eq!(r.len(), source.len());
        for (a, b) in r.iter().zip(&source) {
            assert_eq!((a.0, &a.3, &a.4), (b.0, &b.3, &b.4));
            assert!(a.5.to_bits() == b.5.to_bits(), "metric_ce is the source's");
        }
    }
    let f = filter(&p, &[tmp.path().join("s@p-identity")]).unwrap();
    let nan_rows: Vec<u64> = source
        .iter()
        .filter(|r| r.5.is_nan())
        .map(|r| r.0)
        .collect();
    assert_eq!(f.dropped, nan_rows);
    assert_eq!(f.dropped, vec![50], "the no-reply record");
    assert_eq!(
        ReprDir::open(&p)
            .unwrap()
            .manifest
            .dropped()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![50]
    );
}

#[test]
fn different_vocabularies_map_ids_and_identity_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, targets, data) = setup(tmp.path());
    let reg = fusechat::registry();
    // The source gets the same words under other ids (reversed, specials kept).
    let src = tmp.path().join("src_model");
    common::copy_dir(&targets[1], &src);
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tj["model"]["vocab"].as_object().unwrap().clone();
    let n = vocab.len() as u64;
    let remap = |id: u64| if id < 4 { id } else { n + 3 - id };
    let new: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .map(|(w, id)| (w.clone(), serde_json::json!(remap(id.as_u64().unwrap()))))
        .collect();
    tj["model"]["vocab"] = serde_json::Value::Object(new);
    std::fs::write(src.join("tokenizer.json"), tj.to_string()).unwrap();

    let (p, s) = (tmp.path().join("p"), tmp.path().join("s"));
    represent(&reg, &opts(&pivot, &data, &p)).unwrap();
    represent(&reg, &opts(&src, &data, &s)).unwrap();
    let run = |aligner: &str, params: Vec<(&str, Scalar)>| {
        let out = tmp.path().join(format!("out-{aligner}"));
        let mut o = align_opts(&p, &s, aligner, &out);
        o.params = params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        align(&reg, &o).map(|r| (r, rows(&out)))
    };
    let e = run("identity", vec![]).unwrap_err().to_string();
    assert!(
        e.contains("vocabularies differ") && e.contains("mined"),
        "{e}"
    );
    let source = rows(&s);
    for aligner in ["exact", "mined", "offsets"] {
        let (r, got) = run(aligner, vec![]).unwrap();
        assert_eq!(
            r.stats.fallback, 0,
            "{aligner}: the same words tokenize the same way"
        );
        for (a, b) in got.iter().zip(&source) {
            let want: Vec<u32> = b.3.iter().map(|&id| remap(id as u64) as u32).collect();
            assert_eq!(a.3, want, "{aligner}: row {}", a.0);
            assert_eq!(a.4, b.4);
        }
    }
    let e = run("mined", vec![("mode", Scalar::Str("medium".into()))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("mode") && e.contains("soft|hard"), "{e}");
    let e = run("mined", vec![("window", Scalar::Int(3))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("window"), "{e}");

    // Rows must pair by id: a source represented from fewer records is refused.
    let fewer = tmp.path().join("fewer.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&fewer, text.lines().skip(1).collect::<Vec<_>>().join("\n")).unwrap();
    let s2 = tmp.path().join("s2");
    represent(&reg, &opts(&src, &fewer, &s2)).unwrap();
    let o = align_opts(&p, &s2, "mined", &tmp.path().join("never"));
    let e = align(&reg, &o).unwrap_err().to_string();
    assert!(e.contains("rows do not match"), "{e}");
    assert!(!tmp.path().join("never").exists());
}

/// Hand-made rows: pivot `▁the ▁cat ▁sat` and source `Ġthe Ġc at Ġsat`.
#[test]
fn split_words_fall_back_to_the_label_and_offsets_agrees_with_mined() {
    let pivot = Vocab::new(
        ["<s>", "▁the", "▁cat", "▁sat", "▁mat"]
            .map(String::from)
            .to_vec(),
        vec![true, false, false, false, false],
    );
    let source = Vocab::new(
        ["<|bos|>", "Ġthe", "Ġc", "at", "Ġsat", "Ġdog"]
            .map(String::from)
            .to_vec(),
        vec![true, false, false, false, false, false],
    );
    let v = VocabPair::new(pivot, source);
    let f = |x: f32| f16::from_f32(x);
    // Pivot: <s> the cat sat, labels on cat and sat: loss positions 1 (the) and 2 (cat).
    let p_ids = [0u32, 1, 2, 3];
    let p_labels = [0u8, 0, 1, 1];
    let pr = RowView {
        row_id: 0,
        input_ids: &p_ids,
        label_mask: &p_labels,
        topk_ids: &[],
        topk_logits: &[],
        metric_ce: 1.0,
    };
    // Source: <bos> the c at sat, labels on c, at, sat: loss positions 1, 2, 3.
    let s_ids = [0u32, 1, 2, 3, 4];
    let s_labels = [0u8, 0, 1, 1, 1];
    let s_topk = [2u32, 5, 4, 3, 1, 4];
    let s_vals = [f(3.0), f(1.0), f(2.0), f(0.5), f(4.0), f(-1.0)];
    let sr = RowView {
        row_id: 0,
        input_ids: &s_ids,
        label_mask: &s_labels,
        topk_ids: &s_topk,
        topk_logits: &s_vals,
        metric_ce: 2.0,
    };
    let reg = fusechat::registry();
    let params = |name: &str, extra: &[(&str, &str)]| {
        let info = reg.aligner(name).unwrap().info.clone();
        let given = extra
            .iter()
            .map(|(k, v)| (k.to_string(), Scalar::Str(v.to_string())))
            .collect();
        info.resolve_scalars(&given).unwrap()
    };
    let run = |name: &str, p: &ResolvedParams| {
        reg.aligner(name)
            .unwrap()
            .plugin
            .align(&v, p, &pr, &sr, 2)
            .unwrap()
    };
    // Position 1 (▁the ↔ Ġthe, 1:1) takes the source's top-k there: Ġc and Ġdog,
    // neither in the pivot vocabulary. Soft mode maps them to the nearest pivot
    // token by edit distance of their text: " c" → " cat" (2), " dog" → a
    // three-way tie at 3 → the lowest id, " the" (1).
    // Position 2 (▁cat ↔ Ġc + at) is not 1:1: one-hot on the label ▁sat (3).
    let mined = run("mined", &params("mined", &[]));
    assert_eq!(mined.topk_ids, [2, 1, 3, 0]);
    assert_eq!(
        mined.topk_logits,
        [f(3.0), f(1.0), f16::ZERO, f16::NEG_INFINITY]
    );
    assert_eq!(
        (
            mined.stats.transferred,
            mined.stats.fallback,
            mined.stats.dropped_tokens
        ),
        (1, 1, 0)
    );
    // Exact drops both, so position 1 falls back to its label ▁cat (2).
    let exact = run("exact", &params("exact", &[]));
    assert_eq!(exact.topk_ids, [2, 0, 3, 0]);
    assert_eq!((exact.stats.fallback, exact.stats.dropped_tokens), (2, 2));
    let current = run("exact", &params("exact", &[("fallback", "current")]));
    assert_eq!(
        current.topk_ids,
        [1, 0, 2, 0],
        "FuseLLM's current-token fallback"
    );
    let hard = run("mined", &params("mined", &[("mode", "hard")]));
    assert_eq!(hard, exact, "hard mode drops what has no exact match");
    let offsets = run("offsets", &params("offsets", &[]));
    assert_eq!(
        offsets, mined,
        "offsets pairs the same 1:1 positions as DTW here"
    );
}

#[test]
fn the_cli_shows_labels_counts_bad_records_and_names_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, _, data) = setup(tmp.path());
    let d = tmp.path();
    let p = pivot.to_str().unwrap();
    let out = common::ok(&common::fusechat(
        d,
        &[
            "template",
            "--tokenizer",
            p,
            "--data",
            data.to_str().unwrap(),
            "--row",
            "0",
        ],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("row 0 (openchat template):"), "{out}");
    // The first label comes right after the assistant header's ":".
    let first = lines
        .iter()
        .position(|l| l.split_whitespace().nth(2) == Some("L"))
        .unwrap();
    assert!(
        lines[first - 1].contains("\":\"") && lines[first - 2].contains("Assistant"),
        "{out}"
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("<|end_of_turn|>") && l.split_whitespace().nth(2) == Some("L")));
    let err = common::fails(&common::fusechat(
        d,
        &[
            "template",
            "--tokenizer",
            p,
            "--data",
            data.to_str().unwrap(),
            "--row",
            "48",
        ],
    ));
    assert!(
        err.contains("record 48 is skipped") && err.contains("alternate"),
        "{err}"
    );

    // Malformed lines are counted skips, not failures; --strict makes them fatal.
    let bad = d.join("bad.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}\n");
    std::fs::write(&bad, text).unwrap();
    let r = d.join("r");
    let args = [
        "represent",
        "--model",
        p,
        "--data",
        bad.to_str().unwrap(),
        "--out",
        r.to_str().unwrap(),
        "--top-k",
        "3",
    ];
    let out = common::ok(&common::fusechat(d, &args));
    assert!(
        out.contains("49 rows (3 skipped, 1 without labels)"),
        "{out}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["skipped"][2]["row"], 51);
    assert!(
        m["skipped"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("line 52"),
        "{m}"
    );
    let err = common::fails(&common::fusechat(
        d,
        &[&args[..], &["--strict", "--force"]].concat(),
    ));
    assert!(
        err.contains("bad.jsonl") && err.contains("--strict"),
        "{err}"
    );
    let err = common::fails(&common::fusechat(
        d,
        &[&args[..], &["--template", "vicuna", "--force"]].concat(),
    ));
    assert!(
        err.contains("unknown template `vicuna`") && err.contains("openchat"),
        "{err}"
    );

    // align never replaces a directory that is not a representation.
    std::fs::create_dir_all(d.join("junk")).unwrap();
    std::fs::write(d.join("junk/keep.txt"), "mine").unwrap();
    let rs = r.to_str().unwrap();
    let err = common::fails(&common::fusechat(
        d,
        &[
            "align",
            "--pivot",
            rs,
            "--source",
            rs,
            "--aligner",
            "identity",
            "--out",
            "junk",
        ],
    ));
    assert!(
        err.contains("junk") && err.contains("not a representation"),
        "{err}"
    );
    assert!(d.join("junk/keep.txt").is_file());
    common::ok(&common::fusechat(
        d,
        &[
            "align",
            "--pivot",
            rs,
            "--source",
            rs,
            "--aligner",
            "identity",
            "--out",
            "self@pivot",
        ],
    ));

    // Aligners are listed as plugins; filter reports the NaN row.
    let out = common::ok(&common::fusechat(d, &["plugins", "mined"]));
    assert!(
        out.contains("aligner mined") && out.contains("substring_discount"),
        "{out}"
    );
    let out = common::ok(&common::fusechat(
        d,
        &["filter", "--pivot", r.to_str().unwrap()],
    ));
    assert!(
        out.contains("dropped 1 of 49 rows") && out.contains("[50]"),
        "{out}"
    );
}

/// SPEC §3's DTW example through the `mined` aligner: pivot `bc a b`, source
/// `c b bc ba` align as [[0], [1], [2, 3]]. No single-source pair holds equal
/// tokens, so in hard mode both pivot loss positions fall back: to the label
/// (the next token) by default, to the current token under FuseLLM's
/// `fallback = "current"`. In soft mode the vocabulary map sends the source's
/// `c` to the pivot's `bc` (edit distance 1, tied with `a` and `b`: the
/// lowest id), so pivot `bc` takes the source's top-k there.
#[test]
fn spec_dtw_example_through_the_mined_aligner() {
    use fusechat::plugins::align::mined;
    assert_eq!(
        mined::align(&["c", "b", "bc", "ba"], &["bc", "a", "b"], None),
        vec![vec![0], vec![1], vec![2, 3]]
    );
    let pivot = Vocab::new(["bc", "a", "b"].map(String::from).to_vec(), vec![false; 3]);
    let source = Vocab::new(
        ["c", "b", "bc", "ba"].map(String::from).to_vec(),
        vec![false; 4],
    );
    let v = VocabPair::new(pivot, source);
    let (p_ids, p_labels) = ([0u32, 1, 2], [0u8, 1, 1]);
    let (s_ids, s_labels) = ([0u32, 1, 2, 3], [0u8, 1, 1, 1]);
    let s_topk = [2u32, 3, 2];
    let s_vals = [f16::ONE; 3];
    let pr = RowView {
        row_id: 0,
        input_ids: &p_ids,
        label_mask: &p_labels,
        topk_ids: &[],
        topk_logits: &[],
        metric_ce: 1.0,
    };
    let sr = RowView {
        row_id: 0,
        input_ids: &s_ids,
        label_mask: &s_labels,
        topk_ids: &s_topk,
        topk_logits: &s_vals,
        metric_ce: 1.0,
    };
    let reg = fusechat::registry();
    let e = reg.aligner("mined").unwrap();
    let run = |mode: &str, fallback: &str| {
        let given = [
            ("fallback".to_string(), Scalar::Str(fallback.into())),
            ("mode".to_string(), Scalar::Str(mode.into())),
        ]
        .into();
        let p = e.info.resolve_scalars(&given).unwrap();
        e.plugin.align(&v, &p, &pr, &sr, 1).unwrap()
    };
    assert_eq!(
        run("hard", "label").topk_ids,
        [1, 2],
        "one-hot on the next token"
    );
    assert_eq!(
        run("hard", "current").topk_ids,
        [0, 1],
        "FuseLLM's off-by-one"
    );
    assert_eq!(run("hard", "label").stats.fallback, 2);
    let soft = run("soft", "label");
    // position 0 takes source position 0's top-k (`bc` → pivot 0); position 1 falls back
    assert_eq!(soft.topk_ids, [0, 2]);
    assert_eq!(
        (
            soft.stats.vocab_map,
            soft.stats.equal_token,
            soft.stats.fallback
        ),
        (1, 0, 1)
    );
}

#[test]
fn data_tables_in_fusechat_toml_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cases = [
        ("[data]\npath = 'd.jsonl'\n", "[pivot]"),
        ("[data]\npath = 'd.jsonl'\n[pivot]\npath = 'p'\n", "[[sources]]"),
        ("[data]\npath = 'd.jsonl'\n[pivot]\npath = 'p'\n[[sources]]\npath = 's'\n", "`name` must be set"),
        ("[data]\npath = 'd.jsonl'\n[pivot]\npath = 'p'\n[[sources]]\nname = 'a'\npath = 's'\n[[sources]]\nname = 'a'\npath = 't'\n", "used twice"),
        ("[pivot]\npath = 'p'\n", "need a [data] table"),
        ("[data]\npath = 'd.jsonl'\ntemplate = 'openchat'\nmax_len = 3\n", "max_len"),
    ];
    for (text, want) in cases {
        std::fs::write(d.join("f.toml"), text).unwrap();
        let err = common::fails(&common::fusechat(d, &["run", "-c", "f.toml"]));
        assert!(
            err.contains("f.toml") && err.contains(want),
            "{text}: {err}"
        );
    }
}

/// A `represent` process killed with SIGKILL part-way resumes to the same bytes
/// as an uninterrupted run, and never leaves a manifest for an unfinished set.
#[cfg(unix)]
#[test]
fn a_killed_represent_process_resumes_to_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, _, _) = setup(tmp.path());
    let d = tmp.path();
    // A larger dataset so that the run takes a while: 40 shards of 10 records.
    let words = ["bada", "bede", "bifi", "bogo", "buku", "."];
    let lines: Vec<String> = (0..400)
        .map(|i| {
            let s = |n: usize| (0..n).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" ");
            serde_json::json!({"messages": [{"role": "user", "content": s(20)}, {"role": "assistant", "content": s(60)}]}).to_string()
        })
        .collect();
    let data = d.join("big.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let args = |out: &str| {
        vec![
            "represent".to_string(),
            "--model".into(),
            pivot.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--out".into(),
            out.into(),
            "--rows-per-shard".into(),
            "10".into(),
            "--top-k".into(),
            "3".into(),
            "--batch-size".into(),
            "2".into(),
        ]
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fusechat"))
        .args(args("killed"))
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let killed = d.join("killed");
    let shards = || {
        std::fs::read_dir(&killed)
            .map(|r| {
                r.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                    .count()
            })
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while shards() < 3 && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run finished before the kill: the test would not test a resume"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    // the kill landed mid-run: SIGKILLed, some shards written, not all, no manifest
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    let at_kill = shards();
    eprintln!("killed after {at_kill} of 40 shards");
    assert!((3..40).contains(&at_kill), "{at_kill} shards at the kill");
    assert!(
        !killed.join("manifest.json").exists(),
        "a manifest for an unfinished set"
    );
    let a: Vec<String> = args("killed");
    let out = common::ok(&common::fusechat(
        d,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert!(out.contains("400 rows"), "{out}");
    assert!(
        out.contains(&format!(
            "{} shard(s) computed, {at_kill} reused",
            40 - at_kill
        )),
        "the resume recomputed only what the kill left: {out}"
    );
    let b: Vec<String> = args("whole");
    common::ok(&common::fusechat(
        d,
        &b.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    assert_eq!(files(&killed), files(&d.join("whole")));
    assert_eq!(files(&killed).len(), 40);
}

/// FuseLLM's transfer rule (SPEC §3, amended): a pivot position whose DTW list
/// holds one source position takes its top-k when the tokens match, even when
/// that source position is also aligned with a neighbour. Pivot `▁Assistant`
/// `:` `▁I` against source `▁Assistant:` `▁I` aligns as [[0], [1], [1]]: pivot
/// `▁I` takes the source's top-k at `▁I`; pivot `:` (a different token) falls back.
#[test]
fn a_single_source_position_transfers_even_when_a_neighbour_shares_it() {
    use fusechat::plugins::align::mined;
    let p_tok = ["<s>", "▁Assistant", ":", "▁I", "▁am"];
    let s_tok = ["<s>", "▁Assistant:", "▁I", "▁am"];
    assert_eq!(
        mined::align(&s_tok[1..3], &p_tok[1..4], None),
        vec![vec![0], vec![1], vec![1]]
    );
    let pivot = Vocab::new(
        p_tok.map(String::from).to_vec(),
        vec![true, false, false, false, false],
    );
    let source = Vocab::new(
        s_tok.map(String::from).to_vec(),
        vec![true, false, false, false],
    );
    let v = VocabPair::new(pivot, source);
    // pivot: <s> ▁Assistant : ▁I ▁am, labels on ▁I and ▁am: loss positions 2 (:) and 3 (▁I)
    let (p_ids, p_labels) = ([0u32, 1, 2, 3, 4], [0u8, 0, 0, 1, 1]);
    // source: <s> ▁Assistant: ▁I ▁am, labels on ▁I and ▁am: loss positions 1 and 2 (▁I)
    let (s_ids, s_labels) = ([0u32, 1, 2, 3], [0u8, 0, 1, 1]);
    let s_topk = [2u32, 3, 3, 2]; // at ▁Assistant: → (▁I, ▁am); at ▁I → (▁am, ▁I)
    let s_vals = [
        f16::from_f32(2.0),
        f16::from_f32(1.0),
        f16::from_f32(5.0),
        f16::from_f32(0.5),
    ];
    let pr = RowView {
        row_id: 0,
        input_ids: &p_ids,
        label_mask: &p_labels,
        topk_ids: &[],
        topk_logits: &[],
        metric_ce: 1.0,
    };
    let sr = RowView {
        row_id: 0,
        input_ids: &s_ids,
        label_mask: &s_labels,
        topk_ids: &s_topk,
        topk_logits: &s_vals,
        metric_ce: 1.0,
    };
    let reg = fusechat::registry();
    let e = reg.aligner("mined").unwrap();
    let p = e.info.resolve_scalars(&Default::default()).unwrap();
    let a = e.plugin.align(&v, &p, &pr, &sr, 2).unwrap();
    // position 2 (:) falls back to its label ▁I (3); position 3 (▁I) takes (▁am, ▁I)
    assert_eq!(a.topk_ids, [3, 0, 4, 3]);
    assert_eq!(a.topk_logits[2..], [f16::from_f32(5.0), f16::from_f32(0.5)]);
    assert_eq!(
        (
            a.stats.transferred,
            a.stats.equal_token,
            a.stats.shared_source,
            a.stats.fallback
        ),
        (1, 1, 1, 1)
    );
}

/// The vocabulary map prefers the piece the pivot tokenizer produces: a source
/// `h` maps to the pivot's `h`, never to its byte-fallback `<0x68>` (which has
/// the lower id); a source byte token maps to a piece too, and to a byte token
/// only when no piece has its byte.
#[test]
fn the_vocabulary_map_prefers_pieces_over_byte_fallback_tokens() {
    let pivot = Vocab::new(
        ["<unk>", "<0x68>", "<0x7A>", "▁the", "h"]
            .map(String::from)
            .to_vec(),
        vec![true, false, false, false, false],
    );
    let source = Vocab::new(
        ["<unk>", "h", "<0x68>", "<0x7A>", "▁the"]
            .map(String::from)
            .to_vec(),
        vec![true, false, false, false, false],
    );
    let v = VocabPair::new(pivot, source);
    assert_eq!(v.exact(1), Some(4), "source `h` → pivot `h`, not `<0x68>`");
    assert_eq!(
        v.exact(2),
        Some(4),
        "source `<0x68>` → pivot `h`, a piece with its byte"
    );
    assert_eq!(
        v.exact(3),
        Some(2),
        "source `<0x7A>` → pivot `<0x7A>`: no piece `z`"
    );
    assert_eq!(v.exact(4), Some(3));
}

/// Bytes per record, measured from the shard files `represent` writes, against
/// the scripts' format, which stores the top-10 at all 2048 padded positions
/// as fp16 values and int64 ids: 2048 × 10 × (2 + 8) = 204,800 bytes a record.
/// A 32000-token model (ids stored as u16, as for Mistral) over records of
/// 256 to 2048 tokens with 60% of them labels. Run with `-- --nocapture` to
/// see the table the README quotes.
#[test]
fn representations_are_smaller_than_the_scripts_format() {
    use fusechat::core::pipeline::miniature::write_tokenizer;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let words = write_tokenizer(&d.join("tok"), 32000).unwrap();
    let cfg = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    });
    let w =
        fusechat::plugins::models::decoder::DecoderConfig::from_json(&cfg, Path::new("c"), None)
            .unwrap()
            .random_weights(1, 0.02, 0.0);
    fusechat::core::io::hf_dir::write_hf_dir(
        &d.join("m"),
        &cfg,
        &w,
        DType::F32,
        1 << 40,
        Some(&d.join("tok")),
    )
    .unwrap();
    let scripts = 2048.0 * 10.0 * (2.0 + 8.0);
    let reg = fusechat::registry();
    let mut rng = fusechat::core::rng::SplitMix64(3);
    let mut text = |n: usize| -> String {
        (0..n)
            .map(|_| words[12 + (rng.next_u64() as usize % (words.len() - 12))].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!("| record | labels | bytes here | scripts' bytes | smaller |");
    for len in [256usize, 512, 1024, 2048] {
        // openchat around a word-level tokenizer: <s> GPT4 Correct User : u <eot> GPT4 Correct Assistant : a <eot>
        let n_a = (len as f64 * 0.6).round() as usize - 1;
        let n_u = len - 11 - n_a;
        let lines: Vec<String> = (0..4)
            .map(|_| {
                serde_json::json!({"messages": [{"role": "user", "content": text(n_u)}, {"role": "assistant", "content": text(n_a)}]})
                    .to_string()
            })
            .collect();
        let data = d.join(format!("d{len}.jsonl"));
        std::fs::write(&data, lines.join("\n")).unwrap();
        let out = d.join(format!("r{len}"));
        let mut o = RepresentOptions::new(&d.join("m"), &data, &out);
        o.top_k = 10;
        let m = represent(&reg, &o).unwrap().manifest.unwrap();
        let rows = m.records.rows as f64;
        let tokens = m.shards.iter().map(|s| s.tokens).sum::<u64>() as f64 / rows;
        let positions = m.shards.iter().map(|s| s.positions).sum::<u64>() as f64 / rows;
        assert_eq!(tokens as usize, len, "the records have the intended length");
        let bytes: u64 = m
            .shards
            .iter()
            .map(|s| std::fs::metadata(out.join(&s.file)).unwrap().len())
            .sum();
        let per_row = bytes as f64 / rows;
        let ratio = scripts / per_row;
        eprintln!(
            "| {len} tokens | {:.0}% | {per_row:.0} | {scripts:.0} | {ratio:.1}× |",
            100.0 * positions / tokens
        );
        // per loss position: k × (u16 id + f16 value); per token: u32 id + u8 label
        let floor = positions * 10.0 * 4.0 + tokens * 5.0;
        assert!(
            per_row >= floor && per_row < floor + 1024.0,
            "{per_row} vs {floor}"
        );
        assert!(ratio > 3.0, "{len}: only {ratio:.1}× smaller");
    }
}
