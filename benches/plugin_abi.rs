//! The example median method called natively (as a built-in would be)
//! against the same method through the plugin ABI, on the same data: the cost
//! of crossing the boundary. Inputs are contiguous f32, so nothing is copied.
//!
//!     cargo bench --bench plugin_abi

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fusechat::core::merge::params::{ResolvedParams, Scalar};
use fusechat::core::merge::{Merger, TensorBuf, TensorGroup};
use std::path::PathBuf;

mod common;

fn plugin_path() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "fusechat-median"])
        .status()
        .expect("cargo build");
    assert!(status.success());
    root.join("target/release").join(format!(
        "{}fusechat_median{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

fn bench(c: &mut Criterion) {
    let n = 4 << 20; // 4M elements per tensor (16 MiB in f32), 3 models and a base
    let mut rng = fusechat::core::rng::SplitMix64(9);
    let base: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.02).collect();
    let models: Vec<Vec<f32>> = (0..3)
        .map(|_| {
            base.iter()
                .map(|b| b + rng.normal() as f32 * 1e-3)
                .collect()
        })
        .collect();
    let mut params = ResolvedParams::default();
    params
        .shared
        .insert("ignore_zeros".into(), Scalar::Bool(false));
    params.shared.insert("lambda".into(), Scalar::Float(1.0));
    params.per_model = vec![Default::default(); 3];
    let shape = [n];
    let inputs = || -> (TensorBuf<'static>, Vec<TensorBuf<'static>>) {
        (
            base.clone().into(),
            models.iter().map(|m| m.clone().into()).collect(),
        )
    };
    let run = |m: &dyn Merger, (b, ms): (TensorBuf<'static>, Vec<TensorBuf<'static>>)| {
        let g = TensorGroup {
            name: "model.layers.0.mlp.up_proj.weight",
            layer: Some(0),
            shape: &shape,
            base: Some(b),
            models: ms,
            params: &params,
            seed: 0,
            scope_stats: None,
        };
        m.merge(g).unwrap()
    };
    let native = fusechat_median::Median;
    let loaded = fusechat::core::plugin::dynamic::load_library(&plugin_path()).unwrap();
    let plugin = &loaded[0];

    let mut g = c.benchmark_group("median_16MiB_x4");
    g.throughput(Throughput::Bytes((n * 4 * 4) as u64));
    g.bench_function("built_in", |b| {
        b.iter_batched(inputs, |i| run(&native, i), BatchSize::LargeInput)
    });
    g.bench_function("plugin_abi", |b| {
        b.iter_batched(inputs, |i| run(plugin, i), BatchSize::LargeInput)
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench
}
criterion_main!(benches);
