//! Merge throughput (GB/s of input) for linear, task arithmetic, TIES, DARE
//! and SLERP over a generated set of three Mistral-shaped bf16 models of about
//! 0.5 GB each, next to the I/O floor: reading the three models' files (from
//! the page cache, as the merges do after the first) and writing one model's
//! bytes with an fsync, as a merge writes its output.
//!
//! The set is generated once into `target/bench-data` (reused while its spec is
//! unchanged). Set FUSECHAT_BENCH_LAYERS to change the size (default 16 layers,
//! hidden 1024, vocab 32000: 0.50 GB per model).
//!
//!     cargo bench --bench merge

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fusechat::core::io::dtype::DType;
use fusechat::core::merge::engine::{execute, ExecOptions};
use fusechat::core::merge::params::Setting;
use fusechat::core::merge::plan::{plan, MergeRequest, ModelInput};
use fusechat::core::pipeline::miniature::{generate, MiniatureSpec};
use std::path::{Path, PathBuf};

mod common;

fn model_set() -> (PathBuf, Vec<PathBuf>) {
    let layers = std::env::var("FUSECHAT_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let spec = MiniatureSpec {
        vocab_size: 32000,
        hidden_size: 1024,
        intermediate_size: 2816,
        num_layers: layers,
        num_heads: 16,
        num_kv_heads: 8,
        targets: vec!["a".into(), "b".into()],
        dtype: DType::BF16,
        seed: 1,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/merge");
    let set = generate(&spec, &dir).expect("generate the bench models");
    (set.pivot, set.targets)
}

fn request(method: &str, base: &Path, models: &[PathBuf], out: &Path) -> MergeRequest {
    let mut r = MergeRequest::new(method, out);
    r.force = true;
    match method {
        "linear" => {
            r.models = std::iter::once(base.to_path_buf())
                .chain(models.iter().cloned())
                .map(ModelInput::new)
                .collect();
        }
        "slerp" => {
            r.base = Some(ModelInput::new(base));
            r.models = vec![ModelInput::new(&models[0])];
            r.params.insert(
                "t".into(),
                Setting::from_json(&serde_json::json!(0.4)).unwrap(),
            );
        }
        _ => {
            r.base = Some(ModelInput::new(base));
            r.models = models.iter().map(ModelInput::new).collect();
            r.params.insert(
                "density".into(),
                Setting::from_json(&serde_json::json!(0.5)).unwrap(),
            );
        }
    }
    r
}

fn bench(c: &mut Criterion) {
    let (base, models) = model_set();
    let out = std::env::temp_dir().join(format!("fusechat-bench-{}", std::process::id()));
    let registry = fusechat::registry();
    let mut g = c.benchmark_group("merge");
    g.sample_size(10);
    let inputs: Vec<PathBuf> = std::iter::once(&base)
        .chain(&models)
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    let in_bytes: u64 = inputs.iter().map(|f| f.metadata().unwrap().len()).sum();
    g.throughput(Throughput::Bytes(in_bytes));
    g.bench_function("io_floor", |b| b.iter(|| io_floor(&inputs, &out)));
    for method in ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"] {
        let req = request(method, &base, &models, &out);
        let p = plan(&req, &registry).unwrap();
        g.throughput(Throughput::Bytes(p.input_bytes()));
        g.bench_function(method, |b| {
            b.iter(|| execute(&p, &ExecOptions::default()).unwrap())
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&out);
}

/// Read every input file and write one model's bytes (a third of them), then fsync.
fn io_floor(inputs: &[PathBuf], out: &Path) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 8 << 20];
    for f in inputs {
        let mut r = std::fs::File::open(f).unwrap();
        while r.read(&mut buf).unwrap() > 0 {}
    }
    std::fs::create_dir_all(out).unwrap();
    let target = out.join("floor.bin");
    let mut w = std::fs::File::create(&target).unwrap();
    // one model's worth: the inputs are three models of one size
    let mut left = inputs
        .iter()
        .map(|f| f.metadata().unwrap().len())
        .sum::<u64>()
        / 3;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    w.sync_all().unwrap();
    drop(w);
    std::fs::remove_file(target).unwrap();
}

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench
}
criterion_main!(benches);
