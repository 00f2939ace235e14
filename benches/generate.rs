//! Batched greedy generation (the evaluators' hot path): 8 prompts of 24–80
//! tokens, left-padded into one batch, on the 124.7M Mistral (f32, CPU).
//!
//! First one timed run of the job (8 × 256 new tokens, no stop
//! token) printed as tokens/s, then criterion on 8 × 32 new tokens. The
//! prompts are written to `target/bench-data/generate-prompts.json`, so that
//! `scripts/compare_generation.py` gives transformers' `generate` the same job.
//!
//!     cargo bench --bench generate

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fusechat::core::model::generate::{generate_batch, GenOptions};
use fusechat::core::model::LoadOptions;
use fusechat::core::rng::SplitMix64;
use fusechat::plugins::models::decoder::Decoder;
use std::time::Instant;

mod common;

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = SplitMix64(11);
    (0..8)
        .map(|i| {
            (0..24 + 8 * i)
                .map(|_| 3 + (rng.next_u64() % 31990) as u32)
                .collect()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    fusechat::tune_allocator_for_compute();
    let dir = common::mistral_125m(&common::bench_data("fuse-125m"));
    let m = Decoder::load(&dir, &LoadOptions::default(), None).unwrap();
    let ps = prompts();
    std::fs::write(
        common::bench_data("generate-prompts.json"),
        serde_json::to_string(&ps).unwrap(),
    )
    .unwrap();
    let opts = |n: usize| {
        vec![
            GenOptions {
                max_new_tokens: n,
                ..Default::default()
            };
            ps.len()
        ]
    };
    let t0 = Instant::now();
    let out = generate_batch(&m, &ps, &opts(256), |_| {}).unwrap();
    let dt = t0.elapsed().as_secs_f64();
    let n: usize = out.iter().map(Vec::len).sum();
    println!(
        "fusechat generate_batch: 8 prompts x 256 new tokens = {n} tokens in {dt:.2}s = {:.1} tokens/s",
        n as f64 / dt
    );
    let mut g = c.benchmark_group("mistral_125M_f32_cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8 * 32));
    g.bench_function("greedy_b8_new32", |b| {
        b.iter(|| generate_batch(&m, &ps, &opts(32), |_| {}).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench
}
criterion_main!(benches);
