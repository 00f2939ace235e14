//! `fusechat generate` / `chat` on a tiny model with a tokenizer built here,
//! checked against greedy decoding recomputed without the KV cache.

use candle_core::{Device, Tensor};
use fusechat::core::io::dtype::DType;
use fusechat::core::io::hf_dir::write_hf_dir;
use fusechat::core::model::generate::{generate, GenOptions};
use fusechat::core::model::{CausalLm, LoadOptions};
use fusechat::plugins::models::decoder::{Decoder, DecoderConfig};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

const WORDS: &[&str] = &[
    "<unk>",
    "<s>",
    "</s>",
    "<|end_of_turn|>",
    "GPT4",
    "Correct",
    "User",
    "Assistant",
    ":",
    "hello",
    "world",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
];

fn make_model(dir: &Path) {
    let cfg = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": WORDS.len(),
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
        "eos_token_id": 2, "bos_token_id": 1,
    });
    let w = DecoderConfig::from_json(&cfg, Path::new("config.json"), None)
        .unwrap()
        .random_weights(21, 0.3, 0.0);
    let vocab: HashMap<String, u32> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let _ = tok.add_special_tokens(vec![
        AddedToken::from("<s>", true),
        AddedToken::from("</s>", true),
        AddedToken::from("<|end_of_turn|>", true),
    ]);
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("<s> $A")
            .unwrap()
            .special_tokens(vec![("<s>", 1)])
            .build()
            .unwrap(),
    ));
    let staging = dir.with_extension("tok");
    std::fs::create_dir_all(&staging).unwrap();
    tok.save(staging.join("tokenizer.json"), false).unwrap();
    write_hf_dir(dir, &cfg, &w, DType::F32, 1 << 30, Some(&staging)).unwrap();
}

fn fusechat(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fusechat"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Greedy decoding by recomputing the whole prefix at every step (no cache).
fn greedy_reference(m: &Decoder, prompt: &[u32], n: usize, stop: &[u32]) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, seq.len()), candle_core::DType::U32, &Device::Cpu).unwrap();
        let logits: Vec<f32> = m
            .forward(&ids, &mask)
            .unwrap()
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
            )
            .0 as u32;
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        seq.push(next);
    }
    out
}

#[test]
fn generate_matches_greedy_decoding_without_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    let (ok, out, err) = fusechat(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "hello how are you",
            "--max-new-tokens",
            "8",
        ],
        "",
    );
    assert!(ok, "{err}");
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompt = "GPT4 Correct User: hello how are you<|end_of_turn|>GPT4 Correct Assistant:";
    let enc = tok.encode(prompt, true).unwrap();
    assert_eq!(enc.get_ids()[0], 1, "BOS added by the tokenizer");
    // ... hello how are you <|end_of_turn|> GPT4 Correct Assistant :
    assert_eq!(
        enc.get_ids()[enc.get_ids().len() - 6..],
        [13, 3, 4, 5, 7, 8]
    );
    let m = Decoder::load(&dir, &LoadOptions::default(), None).unwrap();
    let want = greedy_reference(&m, enc.get_ids(), 8, &[2, 3]);
    assert_eq!(
        out.trim(),
        tok.decode(&want, true).unwrap().trim(),
        "stderr: {err}"
    );
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    let run = |seed: &str| {
        let (ok, out, err) = fusechat(
            &[
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "the cat",
                "--max-new-tokens",
                "12",
                "--temperature",
                "1.5",
                "--top-p",
                "0.95",
                "--seed",
                seed,
            ],
            "",
        );
        assert!(ok, "{err}");
        out
    };
    assert_eq!(run("7"), run("7"));
    assert!(
        (8..16).map(|s| run(&s.to_string())).any(|o| o != run("7")),
        "different seeds should sample differently"
    );
}

#[test]
fn stop_tokens_end_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    let m = Decoder::load(&dir, &LoadOptions::default(), None).unwrap();
    let prompt = [1u32, 9, 10];
    let first = greedy_reference(&m, &prompt, 1, &[])[0];
    let opts = GenOptions {
        max_new_tokens: 5,
        stop: vec![first],
        ..Default::default()
    };
    assert!(generate(&m as &dyn CausalLm, &prompt, &opts, |_| Ok(()))
        .unwrap()
        .is_empty());
    assert_eq!(fusechat::core::model::generate::stop_tokens(&dir), vec![2]);
}

#[test]
fn chat_answers_each_line_with_the_history() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    let (ok, out, err) = fusechat(
        &[
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--max-new-tokens",
            "4",
        ],
        "hello world\nhow are you\n",
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    // The second reply is conditioned on the first exchange: recompute it independently.
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let first = out.lines().next().unwrap().trim().to_string();
    let prompt = format!("GPT4 Correct User: hello world<|end_of_turn|>GPT4 Correct Assistant: {first}<|end_of_turn|>GPT4 Correct User: how are you<|end_of_turn|>GPT4 Correct Assistant:");
    let m = Decoder::load(&dir, &LoadOptions::default(), None).unwrap();
    let want = greedy_reference(
        &m,
        tok.encode(prompt.as_str(), true).unwrap().get_ids(),
        4,
        &[2, 3],
    );
    assert_eq!(
        out.lines().nth(1).unwrap().trim(),
        tok.decode(&want, true).unwrap().trim()
    );
}

#[test]
fn a_model_without_a_tokenizer_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make_model(&dir);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let (ok, _, err) = fusechat(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        "",
    );
    assert!(!ok && err.contains("no tokenizer.json"), "{err}");
}
