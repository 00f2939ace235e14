//! Writing a whole HF model directory from tensors held in memory: config.json
//! (with `torch_dtype`), sharded safetensors with their index, and the
//! tokenizer files of another directory. Used by the miniature, by model
//! families that save trained weights, and by tests. Streaming merges use
//! [`crate::io::writer`] directly.

use crate::io::dtype::DType;
use crate::io::writer::{write_atomic, OutputDir, ShardedWriter, TensorSpec};
use crate::{Error, Result};
use std::path::Path;

/// Write an HF model directory (config.json + safetensors) atomically.
pub fn write_model_dir(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: DType,
    max_shard_size: u64,
) -> Result<()> {
    write_hf_dir(dir, config, tensors, dtype, max_shard_size, None)
}

/// Write an HF model directory atomically: config.json (with `torch_dtype`),
/// sharded safetensors, and the tokenizer files of `tokenizer_from` if given.
pub fn write_hf_dir(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    dtype: DType,
    max_shard_size: u64,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    let out = OutputDir::create(dir, true)?;
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s, _)| TensorSpec {
            name: n.clone(),
            dtype,
            shape: s.clone(),
        })
        .collect();
    let w = ShardedWriter::create(out.path(), &specs, max_shard_size)?;
    for (n, s, v) in tensors {
        if s.iter().product::<usize>() != v.len() {
            return Err(Error::msg(format!(
                "tensor `{n}`: {} values for shape {s:?}",
                v.len()
            )));
        }
        w.write(n, &dtype.encode(v))?;
    }
    w.finish()?;
    let mut config = config.clone();
    if let Some(o) = config.as_object_mut() {
        o.insert("torch_dtype".into(), dtype.torch_name().into());
    }
    write_atomic(
        &out.path().join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("JSON")
            .as_bytes(),
    )?;
    if let Some(src) = tokenizer_from {
        for f in crate::io::model_dir::TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, out.path().join(f)).map_err(|e| Error::io(&from, e))?;
            }
        }
    }
    out.commit()?;
    Ok(())
}
