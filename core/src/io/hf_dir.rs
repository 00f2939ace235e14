//! Writing a whole HF model directory from tensors held in memory: config.json
//! (with `torch_dtype`), sharded safetensors with their index, and the
//! tokenizer files of another directory; and seeded random weights for tiny
//! checkpoints. Used by the miniature, by model families that save trained
//! weights, and by tests. Streaming merges use [`crate::io::writer`] directly.

use crate::io::dtype::DType;
use crate::io::writer::{write_atomic, OutputDir, ShardedWriter, TensorSpec};
use crate::{Error, Result};
use std::borrow::Cow;
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
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s, _)| (n.clone(), s.clone()))
        .collect();
    write_hf_dir_with(
        dir,
        config,
        &shapes,
        dtype,
        max_shard_size,
        tokenizer_from,
        |i| Ok(Cow::Borrowed(&tensors[i].2)),
    )
}

/// [`write_hf_dir`] with the values of tensor `i` (in `shapes` order) produced
/// by `values(i)` as they are written, so that only one is in memory at a time.
pub fn write_hf_dir_with<'a>(
    dir: &Path,
    config: &serde_json::Value,
    shapes: &[(String, Vec<usize>)],
    dtype: DType,
    max_shard_size: u64,
    tokenizer_from: Option<&Path>,
    values: impl Fn(usize) -> Result<Cow<'a, [f32]>>,
) -> Result<()> {
    let out = OutputDir::create(dir, true)?;
    fill_hf_dir(
        &out,
        config,
        shapes,
        dtype,
        max_shard_size,
        tokenizer_from,
        values,
    )
    .map_err(|e| out.blame(e))?;
    out.commit()?;
    Ok(())
}

fn fill_hf_dir<'a>(
    out: &OutputDir,
    config: &serde_json::Value,
    shapes: &[(String, Vec<usize>)],
    dtype: DType,
    max_shard_size: u64,
    tokenizer_from: Option<&Path>,
    values: impl Fn(usize) -> Result<Cow<'a, [f32]>>,
) -> Result<()> {
    let specs: Vec<TensorSpec> = shapes
        .iter()
        .map(|(n, s)| TensorSpec {
            name: n.clone(),
            dtype,
            shape: s.clone(),
        })
        .collect();
    let w = ShardedWriter::create(out.path(), &specs, max_shard_size)?;
    for (i, (n, s)) in shapes.iter().enumerate() {
        let v = values(i)?;
        if s.iter().product::<usize>() != v.len() {
            return Err(Error::msg(format!(
                "tensor `{n}`: {} values for shape {s:?}",
                v.len()
            )));
        }
        w.write(n, &dtype.encode(&v))?;
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
    Ok(())
}

/// Seeded random values for the tensors `shapes` (tiny checkpoints for tests,
/// benches and demos), drawn in order from one SplitMix64 stream: tensors whose
/// name contains `norm` get `1 + norm_std·N(0,1)`, the rest `std·N(0,1)`.
pub fn random_tensors(
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    std: f32,
    norm_std: f32,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut rng = crate::rng::SplitMix64(seed);
    shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let (base, scale) = if name.contains("norm") {
                (1.0, norm_std)
            } else {
                (0.0, std)
            };
            let v = (0..n).map(|_| base + scale * rng.normal() as f32).collect();
            (name.clone(), shape.clone(), v)
        })
        .collect()
}
