//! Merge throughput (GB/s of input) for linear, TIES and SLERP over a generated
//! set of three Mistral-shaped bf16 models of about 0.5 GB each.
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
    for method in ["linear", "ties", "slerp"] {
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

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench
}
criterion_main!(benches);
