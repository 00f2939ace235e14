//! `tokenizer_source`: models whose vocabularies differ by added tokens are
//! merged with their embedding and lm_head rows aligned by token, and the
//! output's tokenizer and vocab_size follow the chosen source.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::io::hf_dir::write_model_dir;
use fusechat::core::merge::vocab::TokenizerSource;
use serde_json::json;
use std::path::{Path, PathBuf};

const WIDTH: usize = 4;
const WORDS: [&str; 5] = ["<unk>", "a", "b", "c", "d"];

/// A one-layer model whose vocabulary is WORDS plus `added` (added tokens),
/// with embedding row i = `seed + i` everywhere, and lm_head = −embedding.
fn model(dir: &Path, added: &[&str], seed: f32) -> PathBuf {
    model_ordered(dir, added, seed, false)
}

/// As [`model`], with the plain words at reversed ids when `reversed`.
fn model_ordered(dir: &Path, added: &[&str], seed: f32, reversed: bool) -> PathBuf {
    let vocab = WORDS.len() + added.len();
    let embed: Vec<f32> = (0..vocab * WIDTH)
        .map(|k| seed + (k / WIDTH) as f32)
        .collect();
    let head: Vec<f32> = embed.iter().map(|x| -x).collect();
    let tensors = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![vocab, WIDTH],
            embed,
        ),
        ("lm_head.weight".to_string(), vec![vocab, WIDTH], head),
        (
            "model.norm.weight".to_string(),
            vec![WIDTH],
            vec![seed; WIDTH],
        ),
        (
            "model.layers.0.mlp.up_proj.weight".to_string(),
            vec![2, WIDTH],
            vec![seed; 2 * WIDTH],
        ),
    ];
    let config = json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 1,
        "hidden_size": WIDTH, "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": vocab,
    });
    write_model_dir(dir, &config, &tensors, DType::F32, 5_000_000_000).unwrap();
    let n = WORDS.len();
    let words: serde_json::Map<String, serde_json::Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(if reversed { n - 1 - i } else { i })))
        .collect();
    let added: Vec<serde_json::Value> = added
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": WORDS.len() + i, "content": t, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tok = json!({"version": "1.0", "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}});
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    dir.to_path_buf()
}

fn rows(dir: &Path, name: &str) -> Vec<Vec<f32>> {
    tensor(dir, name)
        .chunks(WIDTH)
        .map(|c| c.to_vec())
        .collect()
}

#[test]
fn without_it_differing_vocabularies_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = model(&tmp.path().join("a"), &["<x>"], 0.0);
    let b = model(&tmp.path().join("b"), &[], 10.0);
    let r = request("linear", None, &[&a, &b], &tmp.path().join("o"));
    let err = fusechat::core::merge::plan::plan(&r, &fusechat::registry())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vocab_size") && err.contains("tokenizer_source"),
        "{err}"
    );
}

/// Rows are matched by token string, not by id: a model whose words sit at
/// reversed ids is aligned to the base's order.
#[test]
fn rows_are_matched_by_token_not_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(&tmp.path().join("base"), &[], 0.0);
    let p = model_ordered(&tmp.path().join("p"), &[], 10.0, true);
    let out = tmp.path().join("o");
    let mut r = request("linear", None, &[&base, &p], &out);
    r.tokenizer_source = Some(TokenizerSource::Base);
    merge(&r);
    // word i: the base's row i (= i) and p's row 4 − i (= 10 + 4 − i): mean 7
    // (by id it would be i + 5)
    for (i, row) in rows(&out, "model.embed_tokens.weight").iter().enumerate() {
        assert!(
            row.iter().all(|v| (v - 7.0).abs() < 1e-5),
            "word {i}: {row:?}"
        );
    }
}

#[test]
fn union_appends_the_other_models_tokens_and_fills_their_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(&tmp.path().join("base"), &[], 0.0);
    let x = model(&tmp.path().join("x"), &["<x>"], 10.0);
    let y = model(&tmp.path().join("y"), &["<y>", "<x>"], 20.0);
    let out = tmp.path().join("o");
    let mut r = request("task_arithmetic", Some(&base), &[&x, &y], &out);
    r.tokenizer_source = Some(TokenizerSource::Union);
    set_model(&mut r, 0, "weight", json!(0.5));
    set_model(&mut r, 1, "weight", json!(0.25));
    merge(&r);
    // output vocabulary: WORDS, then <x> (from x), then <y> (from y)
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap())
            .unwrap();
    let added: Vec<(u64, String)> = tok["added_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_u64().unwrap(),
                a["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(added, [(5, "<x>".to_string()), (6, "<y>".to_string())]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 7);
    // θ = θ⁰ + 0.5·(x − θ⁰) + 0.25·(y − θ⁰), row by row, with the rows each
    // model lacks filled by mergekit's rule:
    //   <x>: x (row 5 = 15) and y (row 6 = 26) have it, the base does not: their mean 20.5
    //   <y>: only y has it (row 5 = 25): the donor's row
    let e = rows(&out, "model.embed_tokens.weight");
    assert_eq!(e.len(), 7);
    for (id, row) in e.iter().enumerate() {
        let (b, xv, yv) = match id {
            0..=4 => (id as f32, 10.0 + id as f32, 20.0 + id as f32),
            5 => (20.5, 15.0, 26.0),
            _ => (25.0, 25.0, 25.0),
        };
        let want = b + 0.5 * (xv - b) + 0.25 * (yv - b);
        assert!(
            row.iter().all(|v| (v - want).abs() < 1e-5),
            "row {id}: {row:?} vs {want}"
        );
    }
    // lm_head is aligned the same way
    let h = rows(&out, "lm_head.weight");
    assert!(
        (h[6][0] + 25.0).abs() < 1e-5
            && (h[5][0] + (20.5 + 0.5 * (15.0 - 20.5) + 0.25 * (26.0 - 20.5))).abs() < 1e-5
    );
}

#[test]
fn base_and_model_sources_keep_that_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(&tmp.path().join("base"), &[], 0.0);
    let x = model(&tmp.path().join("x"), &["<x>"], 10.0);
    // base: 5 rows, x's <x> row dropped
    let out = tmp.path().join("o-base");
    let mut r = request("linear", None, &[&base, &x], &out);
    r.tokenizer_source = Some(TokenizerSource::Base);
    merge(&r);
    let e = rows(&out, "model.embed_tokens.weight");
    assert_eq!(e.len(), 5);
    assert!(e
        .iter()
        .enumerate()
        .all(|(i, r)| (r[0] - (i as f32 + 5.0)).abs() < 1e-5));
    // x's vocabulary: 6 rows; the base lacks <x>, whose only donor is x
    let out = tmp.path().join("o-x");
    let mut r = request("linear", None, &[&base, &x], &out);
    r.tokenizer_source = Some(TokenizerSource::Model(x.display().to_string()));
    merge(&r);
    let e = rows(&out, "model.embed_tokens.weight");
    assert_eq!(e.len(), 6);
    assert!((e[5][0] - 15.0).abs() < 1e-5, "{:?}", e[5]);
    let tok = std::fs::read_to_string(out.join("tokenizer.json")).unwrap();
    assert!(tok.contains("<x>"));
}

#[test]
fn a_mergekit_yaml_with_tokenizer_source_union_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let base = model(&tmp.path().join("base"), &[], 0.0);
    let x = model(&tmp.path().join("x"), &["<x>"], 10.0);
    let yaml = format!(
        "models:\n  - model: {}\n  - model: {}\nmerge_method: linear\ntokenizer_source: union\ndtype: float32\n",
        base.display(),
        x.display()
    );
    let (r, warnings) = fusechat::core::merge::mergekit::parse(
        &yaml,
        Path::new("u.yml"),
        tmp.path().join("o"),
        tmp.path(),
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(r.tokenizer_source, Some(TokenizerSource::Union));
    merge(&r);
    assert_eq!(
        rows(&tmp.path().join("o"), "model.embed_tokens.weight").len(),
        6
    );
}
