//! Reading HF model directories: `config.json` plus single-file or sharded
//! safetensors (`model.safetensors.index.json`), memory-mapped.
//!
//! Tensors are decoded to f32 one at a time; after a tensor is decoded its
//! pages are released from the mapping (`MADV_DONTNEED`), so reading a whole
//! model keeps the resident set at one tensor, not the model.

use crate::io::dtype::DType;
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Tokenizer and generation files copied next to merged weights.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "added_tokens.json",
];

pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Bytes released from the mapping at a time once decoded.
const DECODE_CHUNK: usize = 1 << 20;
/// Bytes decoded and then checked at a time (their f32 values stay in L1/L2).
/// A multiple of every dtype's size, as `DECODE_CHUNK` is.
const DECODE_PIECE: usize = 16 << 10;

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    /// `None` for a dtype fusechat does not merge (ints, f64, fp8...); the raw name is kept.
    pub dtype: Option<DType>,
    pub raw_dtype: String,
    pub shape: Vec<usize>,
    /// Byte range inside the mapped file.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    map: Mmap,
}

/// An opened HF model directory.
pub struct ModelDir {
    pub path: PathBuf,
    /// `config.json`, parsed.
    pub config: serde_json::Value,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl std::fmt::Debug for ModelDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelDir")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only. A checkpoint modified while we merge it would
    // give wrong numbers, as it would for any reader; we never write through it.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl ModelDir {
    /// Open `dir`: parse `config.json`, the index if present, and every shard's header.
    pub fn open(dir: &Path) -> Result<ModelDir> {
        if !dir.is_dir() {
            return Err(Error::model(
                dir,
                "model directory not found (expected an HF model directory with config.json and *.safetensors)",
            ));
        }
        let config_path = dir.join("config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::config(&config_path, format!("not valid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::model(
                    dir,
                    "no config.json: this is not an HF model directory",
                ))
            }
            Err(e) => return Err(Error::io(&config_path, e)),
        };

        // Which files hold the weights.
        let index_path = dir.join(INDEX_FILE);
        let (files, weight_map): (Vec<String>, Option<BTreeMap<String, String>>) = if index_path
            .exists()
        {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&index_path, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index_path, "no `weight_map` object"))?;
            let mut wm = BTreeMap::new();
            for (k, f) in map {
                let f = f.as_str().ok_or_else(|| {
                    Error::config(&index_path, format!("weight_map[`{k}`] is not a file name"))
                })?;
                wm.insert(k.clone(), f.to_string());
            }
            let mut files: Vec<String> = wm.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(wm))
        } else {
            let mut files: Vec<String> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                let has_bin = dir.join("pytorch_model.bin").exists()
                    || dir.join("pytorch_model.bin.index.json").exists();
                return Err(Error::model(
                    dir,
                    if has_bin {
                        "only PyTorch .bin weights found; fusechat reads safetensors. Convert with \
                             `transformers` (model.save_pretrained(dir, safe_serialization=True))"
                    } else {
                        "no *.safetensors weights in this directory"
                    },
                ));
            }
            (files, None)
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (fi, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let map = map_file(&path)?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                Error::model(
                    &path,
                    format!("not a complete safetensors file ({e:?}); it may be truncated: re-download or re-export it"),
                )
            })?;
            let data_start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                if let Some(msg) = bad_layer_index(&tname) {
                    return Err(Error::model(&path, msg));
                }
                let (s, e) = info.data_offsets;
                tensors.insert(
                    tname.clone(),
                    TensorEntry {
                        file: fi,
                        dtype: DType::from_safetensors(info.dtype),
                        raw_dtype: format!("{:?}", info.dtype),
                        shape: info.shape.clone(),
                        start: data_start + s,
                        end: data_start + e,
                    },
                );
            }
            shards.push(Shard { path, map });
        }

        if let Some(wm) = weight_map {
            for (tname, file) in &wm {
                match tensors.get(tname) {
                    Some(t)
                        if shards[t.file]
                            .path
                            .file_name()
                            .map(|f| f.to_string_lossy() == file.as_str())
                            == Some(true) => {}
                    Some(t) => {
                        return Err(Error::model(
                            &index_path,
                            format!(
                                "the index puts `{tname}` in {file}, but it is in {}",
                                shards[t.file].path.display()
                            ),
                        ))
                    }
                    None => {
                        return Err(Error::model(
                            dir.join(file),
                            format!(
                            "the index lists tensor `{tname}` in this file, but the file lacks it"
                        ),
                        ))
                    }
                }
            }
        }

        Ok(ModelDir {
            path: dir.to_path_buf(),
            config,
            shards,
            tensors,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    /// `num_hidden_layers` from config.json.
    pub fn num_layers(&self) -> Option<usize> {
        self.config
            .get("num_hidden_layers")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }

    /// The file holding a tensor (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors
            .get(name)
            .map(|t| self.shards[t.file].path.as_path())
    }

    /// The raw little-endian bytes of a tensor, borrowed from the map.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::model(&self.path, format!("tensor `{name}` not found")))?;
        Ok(&self.shards[t.file].map[t.start..t.end])
    }

    /// Decode a tensor to f32, check every value is finite, then release its pages.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.read_f32_into(name, Vec::new())
    }

    /// [`ModelDir::read_f32`] into `values` (cleared first; reusing its memory).
    pub fn read_f32_into(&self, name: &str, mut values: Vec<f32>) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::model(&self.path, format!("tensor `{name}` not found")))?;
        let dtype = t.dtype.ok_or_else(|| {
            Error::model(
                &self.path,
                format!("tensor `{name}` has dtype {}, which fusechat does not merge (F32, F16, BF16 only)", t.raw_dtype),
            )
        })?;
        let shard = &self.shards[t.file];
        // Decode in chunks, releasing each chunk's pages as soon as it is decoded, so
        // the mapped bytes of a tensor never sit in memory next to its f32 copy.
        values.clear();
        values.reserve(t.numel());
        // Each piece is checked for non-finite values while it is still in cache.
        let mut at = t.start;
        while at < t.end {
            let stop = (at + DECODE_CHUNK).min(t.end);
            for piece in shard.map[at..stop].chunks(DECODE_PIECE) {
                let done = values.len();
                dtype.decode_into(piece, &mut values);
                if let Some(i) = crate::io::dtype::first_non_finite(&values[done..]) {
                    return Err(Error::NonFinite {
                        tensor: name.to_string(),
                        model: shard.path.display().to_string(),
                        index: done + i,
                        value: values[done + i],
                    });
                }
            }
            self.release(at, stop - at, t.file);
            at = stop;
        }
        Ok(values)
    }

    /// Drop a byte range's pages from this process's resident set (they stay in
    /// the page cache). Purely an optimisation: errors are ignored.
    fn release(&self, start: usize, len: usize, file: usize) {
        #[cfg(unix)]
        {
            let map = &self.shards[file].map;
            // SAFETY: the mapping is a read-only, file-backed private map: after
            // DONTNEED the next access re-reads the same bytes from the file.
            unsafe {
                let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
            }
        }
        #[cfg(not(unix))]
        let _ = (start, len, file);
    }
}

/// The files of a directory by content, sorted: (name, size, hash). This is
/// what stage keys use to tell whether a model changed, and it is the same on
/// any machine and after any copy (no paths, no modification times).
///
/// A file up to 1 MiB is hashed whole. A larger one is hashed by its first
/// 64 KiB, its whole safetensors header (when it is one), and 64 blocks of
/// 4 KiB spread evenly over it: a re-trained or re-exported checkpoint changes
/// them all, and no gigabytes are read. Hidden files and subdirectories are
/// skipped; an unreadable directory gives an empty list.
pub fn content_stamps(dir: &Path) -> Vec<(String, u64, String)> {
    let mut files: Vec<(String, u64, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = e
                .metadata()
                .ok()
                .filter(|m| m.is_file() && !name.starts_with('.'))?;
            let hash = content_hash(&e.path(), m.len()).ok()?;
            Some((name, m.len(), format!("{hash:016x}")))
        })
        .collect();
    files.sort();
    files
}

fn content_hash(path: &Path, len: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const WHOLE: u64 = 1 << 20;
    const HEAD: u64 = 64 << 10;
    const BLOCK: u64 = 4 << 10;
    const BLOCKS: u64 = 64;
    let mut f = File::open(path)?;
    let mut buf = Vec::new();
    if len <= WHOLE {
        f.read_to_end(&mut buf)?;
        return Ok(crate::rng::fnv1a(&buf));
    }
    let mut read_at = |at: u64, n: u64, buf: &mut Vec<u8>| -> std::io::Result<()> {
        f.seek(SeekFrom::Start(at))?;
        let start = buf.len();
        buf.resize(start + n as usize, 0);
        f.read_exact(&mut buf[start..])
    };
    read_at(0, HEAD, &mut buf)?;
    let header = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if path.extension().is_some_and(|x| x == "safetensors") && 8 + header <= len && header > HEAD {
        read_at(HEAD, 8 + header - HEAD, &mut buf)?;
    }
    for i in 0..BLOCKS {
        let at = (len - BLOCK) / (BLOCKS - 1) * i;
        read_at(at, BLOCK, &mut buf)?;
    }
    Ok(crate::rng::fnv1a(&buf))
}

/// Parse the decoder layer index from an HF tensor name: `model.layers.12.mlp...` → 12.
pub fn layer_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "h" || p == "blocks" {
            if let Some(n) = parts.clone().next().and_then(|n| n.parse().ok()) {
                return Some(n);
            }
        }
    }
    None
}

/// Why a tensor name's layer index cannot be used, if it cannot: the index
/// after `layers.` (`h.`, `blocks.`) must be written as the checkpoint's layer
/// number, without leading zeros, so that each layer has one name.
fn bad_layer_index(name: &str) -> Option<String> {
    let mut parts = name.split('.');
    while let Some(p) = parts.next() {
        if p == "layers" || p == "h" || p == "blocks" {
            let n = parts.clone().next()?;
            if n.len() > 1 && n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit()) {
                let plain = match n.trim_start_matches('0') {
                    "" => "0",
                    rest => rest,
                };
                return Some(format!(
                    "tensor `{name}`: layer index `{n}` has a leading zero; write it as `{plain}` (a checkpoint names each layer once)"
                ));
            }
            if n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u32>().is_err() {
                return Some(format!(
                    "tensor `{name}`: layer index `{n}` is out of range"
                ));
            }
            return None;
        }
    }
    None
}

/// Replace the layer index in a tensor name.
pub fn with_layer_index(name: &str, layer: usize) -> String {
    let mut out = Vec::new();
    let mut parts = name.split('.').peekable();
    while let Some(p) = parts.next() {
        out.push(p.to_string());
        if (p == "layers" || p == "h" || p == "blocks")
            && parts.peek().is_some_and(|n| n.parse::<usize>().is_ok())
        {
            parts.next();
            out.push(layer.to_string());
        }
    }
    out.join(".")
}

/// Order tensor names as a checkpoint lists them: by layer number (not
/// lexically), non-layer tensors before the layers unless they are the final
/// norm or the head.
pub fn natural_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(n: &str) -> (u8, usize, &str) {
        match layer_index(n) {
            Some(l) => (1, l, n),
            None if n.contains("embed") || n.contains("wte") || n.contains("wpe") => (0, 0, n),
            None => (2, 0, n),
        }
    }
    key(a).cmp(&key(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
        assert_eq!(
            with_layer_index("model.layers.12.mlp.up_proj.weight", 3),
            "model.layers.3.mlp.up_proj.weight"
        );
        let mut v = vec![
            "lm_head.weight",
            "model.layers.10.a",
            "model.layers.2.a",
            "model.norm.weight",
            "model.embed_tokens.weight",
        ];
        v.sort_by(|a, b| natural_order(a, b));
        assert_eq!(
            v,
            vec![
                "model.embed_tokens.weight",
                "model.layers.2.a",
                "model.layers.10.a",
                "lm_head.weight",
                "model.norm.weight"
            ]
        );
    }
}
