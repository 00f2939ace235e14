//! The benches' shared model: a ~100M-parameter Mistral-shaped checkpoint
//! (hidden 768, 8 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32000; 98M
//! parameters), random weights stored as bf16, generated once under
//! `target/bench-data/<name>`.
#![allow(dead_code)]

use fusechat::core::io::hf_dir::write_hf_dir;
use fusechat::plugins::models::decoder::DecoderConfig;
use std::path::{Path, PathBuf};

/// Criterion's settings for every bench. Criterion draws its charts with
/// plotters, whose fonts fusechat registers (plotters looks up no system font).
pub fn criterion_config() -> criterion::Criterion {
    fusechat::core::eval::report::register_fonts();
    criterion::Criterion::default()
}

pub fn bench_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-data")
        .join(name)
}

/// Generate the model into `dir` (with the tokenizer files of `tokenizer`) unless it is there.
pub fn mistral_98m(dir: &Path, tokenizer: Option<&Path>) -> PathBuf {
    let done = dir.join("model.safetensors").exists()
        && (tokenizer.is_none() || dir.join("tokenizer.json").exists());
    if done {
        return dir.to_path_buf();
    }
    let cfg = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
        "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
    });
    let w = DecoderConfig::from_json(&cfg, Path::new("config.json"), None)
        .unwrap()
        .random_weights(3, 0.02, 0.0);
    write_hf_dir(
        dir,
        &cfg,
        &w,
        fusechat::core::io::dtype::DType::BF16,
        5_000_000_000,
        tokenizer,
    )
    .unwrap();
    dir.to_path_buf()
}

/// The training model: a 124.7M Mistral (hidden 768, 12 layers, 12
/// heads / 4 KV heads, MLP 2048, vocab 32002), random weights stored as f32,
/// generated once into `dir`.
pub fn mistral_125m(dir: &Path) -> PathBuf {
    if dir.join("model.safetensors").exists() {
        return dir.to_path_buf();
    }
    let cfg = serde_json::json!({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32002,
        "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": false, "hidden_act": "silu", "max_position_embeddings": 4096,
    });
    let w = DecoderConfig::from_json(&cfg, Path::new("config.json"), None)
        .unwrap()
        .random_weights(5, 0.02, 0.0);
    write_hf_dir(
        dir,
        &cfg,
        &w,
        fusechat::core::io::dtype::DType::F32,
        5_000_000_000,
        None,
    )
    .unwrap();
    dir.to_path_buf()
}
