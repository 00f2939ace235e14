//! Writing HF model directories: streaming sharded safetensors with an index,
//! into a temporary directory that is renamed into place only when complete.
//!
//! The shard layout (which tensor goes where, at which offset) is fixed up
//! front from the plan, so every header is written first and each tensor is
//! written at its offset as soon as it is computed, from any thread. No shard
//! is ever buffered in memory.

use crate::io::dtype::DType;
use crate::io::model_dir::INDEX_FILE;
use crate::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Default `--max-shard-size`: 5 GB, as transformers' `save_pretrained`.
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Elements encoded and written at a time.
const ENCODE_CHUNK: usize = 1 << 20;

/// Parse sizes such as `5GB`, `500MB`, `2GiB`, `1000000`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v >= 1.0).then_some(v as u64)
}

/// Temporaries being written by this process right now (directories and
/// files), so that an interrupt can remove them before the process exits.
static LIVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn track(p: &Path) {
    live().push(p.to_path_buf());
}

fn untrack(p: &Path) {
    live().retain(|x| x != p);
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`remove_live_temporaries`] was called: the process is being
/// interrupted, and an error seen now is a consequence, not news.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Remove every temporary this process is writing (called on Ctrl-C or
/// SIGTERM, just before exiting). Returns what was removed.
pub fn remove_live_temporaries() -> Vec<PathBuf> {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let paths = std::mem::take(&mut *live());
    for p in &paths {
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
    }
    paths
}

/// Whether process `pid` is provably gone (on Linux: no `/proc/<pid>`).
/// Elsewhere nothing is provable, and temporaries are left alone.
pub fn process_gone(pid: u32) -> bool {
    Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// The suffix of temporaries written by this process: `tmp-<pid>`.
pub fn tmp_suffix() -> String {
    format!("tmp-{}", std::process::id())
}

/// The pid in a temporary's name written by [`write_atomic`] (`….tmp-<pid>`),
/// if it is one.
pub fn tmp_owner(file_name: &str) -> Option<u32> {
    file_name.rsplit_once(".tmp-")?.1.parse().ok()
}

/// Refuse an output that is, contains or lies inside one of the inputs: a
/// forced replacement would destroy an input. `inputs` pairs a label
/// ("model", "--data") with a path.
pub fn check_out_not_input(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = absolute_lexical(out);
    for (what, input) in inputs {
        let i = absolute_lexical(input);
        let clash = if o == i {
            Some("is")
        } else if i.starts_with(&o) {
            Some("contains")
        } else if o.starts_with(&i) {
            Some("is inside")
        } else {
            None
        };
        if let Some(rel) = clash {
            return Err(Error::model(
                out,
                format!(
                    "the output {rel} the {what} {}; writing it would destroy an input: choose another --out",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// An absolute form of `p` with symlinks resolved as far as it exists, so
/// that two spellings of one place compare equal.
fn absolute_lexical(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            absolute_lexical(parent).join(name)
        }
        _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// A directory being written under a temporary name next to its final place.
/// Dropped without [`OutputDir::commit`], it is removed: a failed or
/// interrupted run leaves nothing that looks like a finished artifact.
#[derive(Debug)]
pub struct OutputDir {
    final_path: PathBuf,
    tmp_path: PathBuf,
    force: bool,
    committed: bool,
}

fn tmp_prefix(final_path: &Path) -> String {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    format!(".{name}.fusechat-tmp-")
}

impl OutputDir {
    /// Check that `final_path` may be written (it must not exist unless `force`) and
    /// create the temporary directory beside it. Stale temporaries left by a
    /// killed run (whose process is gone) are removed.
    pub fn create(final_path: &Path, force: bool) -> Result<OutputDir> {
        if final_path.exists() && !force {
            return Err(Error::model(
                final_path,
                "output directory already exists; choose another --out or pass --force to replace it",
            ));
        }
        let parent = match final_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let prefix = tmp_prefix(final_path);
        if let Ok(rd) = std::fs::read_dir(&parent) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
                    if process_gone(pid) {
                        tracing::warn!(
                            "removed {}, a temporary output left by a killed run (process {pid})",
                            e.path().display()
                        );
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let tmp_path = parent.join(format!("{prefix}{}", std::process::id()));
        if tmp_path.exists() {
            std::fs::remove_dir_all(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        }
        track(&tmp_path); // before it exists: an interrupt may come at any moment
        if let Err(e) = std::fs::create_dir(&tmp_path) {
            untrack(&tmp_path);
            return Err(Error::io(&tmp_path, e));
        }
        Ok(OutputDir {
            final_path: final_path.to_path_buf(),
            tmp_path,
            force,
            committed: false,
        })
    }

    /// Where to write now.
    pub fn path(&self) -> &Path {
        &self.tmp_path
    }

    /// An error met while writing the temporary directory, told about the
    /// output the user named (`--out`), not the hidden temporary name.
    pub fn blame(&self, e: Error) -> Error {
        let shown = |p: PathBuf| match p.strip_prefix(&self.tmp_path) {
            Ok(rel) => self.final_path.join(rel),
            Err(_) => p,
        };
        match e {
            Error::Io { path, err } => Error::Io {
                path: shown(path),
                err,
            },
            Error::Model { path, msg } => Error::Model {
                path: shown(path),
                msg,
            },
            e => e,
        }
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Move the finished directory into place (replacing an old one under `--force`).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.final_path.exists() {
            if !self.force {
                return Err(Error::model(
                    &self.final_path,
                    "output directory appeared while merging; pass --force to replace it",
                ));
            }
            let old = self.tmp_path.with_extension("old");
            std::fs::rename(&self.final_path, &old).map_err(|e| Error::io(&self.final_path, e))?;
            std::fs::rename(&self.tmp_path, &self.final_path)
                .map_err(|e| Error::io(&self.final_path, e))?;
            let _ = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
        } else {
            std::fs::rename(&self.tmp_path, &self.final_path)
                .map_err(|e| Error::io(&self.final_path, e))?;
        }
        self.committed = true;
        untrack(&self.tmp_path);
        Ok(self.final_path.clone())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp_path);
            untrack(&self.tmp_path);
        }
    }
}

/// A tensor to be written: name, storage dtype and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

struct Slot {
    file: usize,
    offset: u64,
    len: u64,
    written: AtomicBool,
}

/// Safetensors shards with headers laid out up front; tensors are written at
/// their offsets in any order, from any thread.
pub struct ShardedWriter {
    dir: PathBuf,
    files: Vec<(String, File)>,
    slots: HashMap<String, Slot>,
    order: Vec<(String, usize)>,
    total_size: u64,
}

impl ShardedWriter {
    /// Lay out `tensors` (in this order) into shards of at most `max_shard_size`
    /// bytes of data (a tensor larger than that gets a shard of its own), create
    /// the files in `dir` and write their headers.
    pub fn create(
        dir: &Path,
        tensors: &[TensorSpec],
        max_shard_size: u64,
    ) -> Result<ShardedWriter> {
        // Assign shards greedily, keeping the given order.
        let mut groups: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
        let mut current = 0u64;
        for t in tensors {
            let n = t.nbytes();
            if !groups.last().unwrap().is_empty() && current + n > max_shard_size {
                groups.push(Vec::new());
                current = 0;
            }
            groups.last_mut().unwrap().push(t);
            current += n;
        }
        let n_files = groups.len();
        let mut files = Vec::with_capacity(n_files);
        let mut slots = HashMap::with_capacity(tensors.len());
        let mut order = Vec::with_capacity(tensors.len());
        let mut total_size = 0u64;
        for (fi, group) in groups.iter().enumerate() {
            let fname = if n_files == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", fi + 1, n_files)
            };
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
            let mut offset = 0u64;
            let mut local = Vec::with_capacity(group.len());
            for t in group {
                let len = t.nbytes();
                header.insert(
                    t.name.clone(),
                    serde_json::json!({
                        "dtype": t.dtype.safetensors_name(),
                        "shape": t.shape,
                        "data_offsets": [offset, offset + len],
                    }),
                );
                local.push((t.name.clone(), offset, len));
                offset += len;
            }
            let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header))
                .map_err(|e| Error::msg(format!("serialising a safetensors header: {e}")))?;
            while hbytes.len() % 8 != 0 {
                hbytes.push(b' ');
            }
            let data_start = 8 + hbytes.len() as u64;
            let path = dir.join(&fname);
            let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            let mut head = Vec::with_capacity(hbytes.len() + 8);
            head.extend_from_slice(&(hbytes.len() as u64).to_le_bytes());
            head.extend_from_slice(&hbytes);
            write_at(&file, &head, 0).map_err(|e| Error::io(&path, e))?;
            file.set_len(data_start + offset)
                .map_err(|e| Error::io(&path, e))?;
            for (name, off, len) in local {
                order.push((name.clone(), fi));
                slots.insert(
                    name,
                    Slot {
                        file: fi,
                        offset: data_start + off,
                        len,
                        written: AtomicBool::new(false),
                    },
                );
            }
            total_size += offset;
            files.push((fname, file));
        }
        Ok(ShardedWriter {
            dir: dir.to_path_buf(),
            files,
            slots,
            order,
            total_size,
        })
    }

    /// Write one tensor's bytes at its place.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| Error::msg(format!("tensor `{name}` is not in the output plan")))?;
        if bytes.len() as u64 != slot.len {
            return Err(Error::msg(format!(
                "tensor `{name}`: {} bytes computed, {} planned",
                bytes.len(),
                slot.len
            )));
        }
        let (fname, file) = &self.files[slot.file];
        write_at(file, bytes, slot.offset).map_err(|e| Error::io(self.dir.join(fname), e))?;
        start_writeback(file, slot.offset, slot.len);
        slot.written.store(true, Ordering::Release);
        Ok(())
    }

    /// Encode f32 values to `dtype` and write them, a chunk at a time (no
    /// full-size encoded copy is ever held).
    pub fn write_f32(&self, name: &str, dtype: DType, values: &[f32]) -> Result<()> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| Error::msg(format!("tensor `{name}` is not in the output plan")))?;
        if (values.len() * dtype.size()) as u64 != slot.len {
            return Err(Error::msg(format!(
                "tensor `{name}`: {} values computed, {} planned",
                values.len(),
                slot.len / dtype.size() as u64
            )));
        }
        let (fname, file) = &self.files[slot.file];
        let mut offset = slot.offset;
        // one encoding buffer per thread, kept: a fresh one would be fresh
        // pages, each faulted and zeroed by the kernel on first touch
        thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
        BUF.with_borrow_mut(|buf| -> Result<()> {
            buf.resize(ENCODE_CHUNK * 4, 0);
            for chunk in values.chunks(ENCODE_CHUNK) {
                let bytes = &mut buf[..chunk.len() * dtype.size()];
                dtype.encode_to(chunk, bytes);
                write_at(file, bytes, offset).map_err(|e| Error::io(self.dir.join(fname), e))?;
                offset += bytes.len() as u64;
            }
            Ok(())
        })?;
        start_writeback(file, slot.offset, slot.len);
        slot.written.store(true, Ordering::Release);
        Ok(())
    }

    /// Check every tensor was written, flush the files and write the index
    /// (when there is more than one shard). Returns the file names.
    pub fn finish(self) -> Result<Vec<String>> {
        if let Some((name, _)) = self
            .order
            .iter()
            .find(|(n, _)| !self.slots[n].written.load(Ordering::Acquire))
        {
            return Err(Error::msg(format!(
                "tensor `{name}` was planned but never written"
            )));
        }
        for (fname, file) in &self.files {
            file.sync_all()
                .map_err(|e| Error::io(self.dir.join(fname), e))?;
        }
        if self.files.len() > 1 {
            let weight_map: serde_json::Map<String, serde_json::Value> = self
                .order
                .iter()
                .map(|(n, fi)| {
                    (
                        n.clone(),
                        serde_json::Value::String(self.files[*fi].0.clone()),
                    )
                })
                .collect();
            let index = serde_json::json!({
                "metadata": {"total_size": self.total_size},
                "weight_map": weight_map,
            });
            let path = self.dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).expect("JSON of strings");
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(self.files.iter().map(|(n, _)| n.clone()).collect())
    }
}

/// Ask the kernel to start writing a finished range to disk now, without
/// waiting for it, so that the disk works while the merge goes on and the
/// final `fsync` finds little left to do (syncing half a gigabyte at the end
/// took about 0.15 s, a sixth of a 0.9 s linear merge). Purely an
/// optimisation: errors are ignored, and `finish` still syncs every file.
fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; the call only schedules I/O.
        unsafe {
            // (`as _`: the offset type is off64_t on glibc and may differ elsewhere)
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as _,
                len as _,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

#[cfg(unix)]
fn write_at(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}

#[cfg(windows)]
fn write_at(file: &File, mut bytes: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !bytes.is_empty() {
        let n = file.seek_write(bytes, offset)?;
        bytes = &bytes[n..];
        offset += n as u64;
    }
    Ok(())
}

/// Write a small file atomically (temporary name, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}", tmp_suffix()));
    let tmp = path.with_file_name(name);
    track(&tmp);
    let r = std::fs::write(&tmp, bytes)
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    untrack(&tmp);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::model_dir::ModelDir;

    #[test]
    fn errors_while_writing_name_the_users_output_not_the_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let d = OutputDir::create(&out, false).unwrap();
        let e = Error::io(
            d.path().join("model.safetensors"),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        );
        let msg = d.blame(e).to_string();
        assert!(
            msg.starts_with(&out.join("model.safetensors").display().to_string()),
            "{msg}"
        );
        assert!(!msg.contains("fusechat-tmp"), "{msg}");
    }

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("2 MiB"), Some(2 * 1024 * 1024));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn sharded_round_trip_in_any_write_order() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
        let specs = vec![spec("a", 10), spec("b", 10), spec("c", 30)];
        // 80 bytes per shard: a+b fit (80), c (120) gets its own.
        let w = ShardedWriter::create(tmp.path(), &specs, 80).unwrap();
        let data: Vec<Vec<f32>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (0..s.shape[0]).map(|j| (i * 100 + j) as f32).collect())
            .collect();
        for i in [2, 0, 1] {
            w.write(&specs[i].name, &DType::F32.encode(&data[i]))
                .unwrap();
        }
        let files = w.finish().unwrap();
        assert_eq!(files.len(), 2);
        let m = ModelDir::open(tmp.path()).unwrap();
        for (s, d) in specs.iter().zip(&data) {
            assert_eq!(&m.read_f32(&s.name).unwrap(), d);
        }
    }

    #[test]
    fn unwritten_tensor_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ShardedWriter::create(tmp.path(), &[spec("a", 2)], 1000).unwrap();
        assert!(w
            .finish()
            .unwrap_err()
            .to_string()
            .contains("never written"));
    }

    #[test]
    fn output_dir_is_removed_unless_committed() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        {
            let d = OutputDir::create(&out, false).unwrap();
            std::fs::write(d.path().join("x"), "1").unwrap();
        }
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        let d = OutputDir::create(&out, false).unwrap();
        std::fs::write(d.path().join("x"), "1").unwrap();
        d.commit().unwrap();
        assert!(out.join("x").exists());
        assert!(OutputDir::create(&out, false).is_err());
        let d = OutputDir::create(&out, true).unwrap();
        std::fs::write(d.path().join("y"), "2").unwrap();
        d.commit().unwrap();
        assert!(out.join("y").exists() && !out.join("x").exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
