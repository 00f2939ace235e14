//! Scoring forward (B = 4, L = 512, logits for every position) and one
//! training step (forward, cross-entropy, backward, AdamW update; B = 1,
//! L = 512) on a ~100M-parameter Mistral-shaped model, f32 on CPU.
//!
//! Model: hidden 768, 8 layers, 12 heads / 4 KV heads, MLP 2048, vocab 32000
//! (98M parameters), random weights generated into target/bench-data/forward.
//!
//!     cargo bench --bench forward

use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fusechat::core::model::ops::cross_entropy;
use fusechat::core::model::LoadOptions;
use fusechat::core::rng::SplitMix64;
use fusechat::plugins::models::decoder::Decoder;

mod common;

fn model_dir() -> std::path::PathBuf {
    common::mistral_98m(&common::bench_data("forward"), None)
}

fn tokens(b: usize, l: usize) -> Tensor {
    let mut rng = SplitMix64(5);
    let v: Vec<u32> = (0..b * l)
        .map(|_| (rng.next_u64() % 32000) as u32)
        .collect();
    Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
}

fn bench(c: &mut Criterion) {
    fusechat::tune_allocator_for_compute();
    let dir = model_dir();
    let mut g = c.benchmark_group("mistral_98M_f32_cpu");
    g.sample_size(10);

    let m = Decoder::load(&dir, &LoadOptions::default(), None).unwrap();
    let (b, l) = (4, 512);
    let x = tokens(b, l);
    let mask = Tensor::ones((b, l), DType::U32, &Device::Cpu).unwrap();
    g.throughput(Throughput::Elements((b * l) as u64));
    g.bench_function("score_forward_b4_l512", |bench| {
        bench.iter(|| m.forward(&x, &mask).unwrap())
    });

    let t = Decoder::load(
        &dir,
        &LoadOptions {
            trainable: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let vars = t.vars().iter().map(|(_, v)| v.clone()).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 5e-6,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let x1 = tokens(1, l);
    let mask1 = Tensor::ones((1, l), DType::U32, &Device::Cpu).unwrap();
    let targets = x1.narrow(1, 1, l - 1).unwrap().reshape(l - 1).unwrap();
    g.throughput(Throughput::Elements(l as u64));
    g.bench_function("train_step_b1_l512", |bench| {
        bench.iter(|| {
            let logits = t
                .forward(&x1, &mask1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .narrow(0, 0, l - 1)
                .unwrap();
            let loss = cross_entropy(&logits, &targets).unwrap();
            opt.backward_step(&loss).unwrap();
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench
}
criterion_main!(benches);
