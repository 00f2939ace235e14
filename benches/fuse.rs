//! The fuse stage's hot path and its memory:
//! - one training step on the 124.7M Mistral (hidden 768, 12 layers, 12 heads
//!   / 4 KV heads, MLP 2048, vocab 32002), f32 on CPU, B = 4, L = 512, every
//!   position a loss position: forward, the LM head, the greater_as_gt loss
//!   (λ = 0.9 against a top-10 teacher), backward and an AdamW step — what
//!   `fusechat fuse` does per micro-batch and step;
//! - the bytes the loss holds for its teachers against the scripts' dense
//!   `[B, L, V]` bf16 teacher (printed).
//!
//!     cargo bench --bench fuse
//!
//! `scripts/compare_training.py` times the same step with PyTorch and
//! transformers on the same checkpoint and batch.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fusechat::core::model::LoadOptions;
use fusechat::core::rng::SplitMix64;
use fusechat::core::train::adamw::{clip_grad_norm, AdamW, AdamWConfig};
use fusechat::core::train::{LossBatch, TeacherView};
use fusechat::plugins::loss::teacher_targets;
use fusechat::plugins::models::decoder::Decoder;
use half::f16;

mod common;

const B: usize = 4;
const L: usize = 512;
const V: usize = 32002;
const K: usize = 10;

fn bench(c: &mut Criterion) {
    fusechat::tune_allocator_for_compute();
    let dir = common::mistral_125m(&common::bench_data("fuse-125m"));
    let m = Decoder::load(
        &dir,
        &LoadOptions {
            trainable: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    let mut rng = SplitMix64(9);
    let ids: Vec<u32> = (0..B * L)
        .map(|_| (rng.next_u64() % V as u64) as u32)
        .collect();
    let x = Tensor::from_vec(ids.clone(), (B, L), &Device::Cpu).unwrap();
    let mask = Tensor::ones((B, L), DType::U32, &Device::Cpu).unwrap();
    // loss positions: every position but each row's last
    let positions: Vec<u32> = (0..B)
        .flat_map(|b| (0..L - 1).map(move |t| (b * L + t) as u32))
        .collect();
    let n = positions.len();
    let labels: Vec<u32> = positions.iter().map(|&p| ids[p as usize + 1]).collect();
    let record: Vec<usize> = positions.iter().map(|&p| p as usize / L).collect();
    let pos_t = Tensor::from_vec(positions, n, &Device::Cpu).unwrap();
    // two candidates (the pivot's own representation and one source), top-10 each
    let teacher = |seed: u64| -> (Vec<u32>, Vec<f16>, Vec<f32>) {
        let mut r = SplitMix64(seed);
        let ids = (0..n * K)
            .map(|_| (r.next_u64() % V as u64) as u32)
            .collect();
        let vals = (0..n * K)
            .map(|j| f16::from_f32(5.0 - (j % K) as f32 * 0.3))
            .collect();
        (ids, vals, vec![1.0 + seed as f32 * 0.1; B])
    };
    let cands = [teacher(1), teacher(2)];
    let reg = fusechat::registry();
    let loss = reg.loss("greater_as_gt").unwrap();
    let params = loss.info.resolve_scalars(&Default::default()).unwrap();
    let vars: Vec<candle_core::Var> = m.vars().iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default());

    // Each candidate's rows, record by record, as the trainer lends them to
    // the loss (borrowed from the loaded data, not copied per micro-batch).
    let rows: Vec<(Vec<&[u32]>, Vec<&[f16]>)> = cands
        .iter()
        .map(|(ids, vals, _)| {
            (
                ids.chunks((L - 1) * K).collect(),
                vals.chunks((L - 1) * K).collect(),
            )
        })
        .collect();
    let views = || -> Vec<TeacherView<'_>> {
        cands
            .iter()
            .zip(&rows)
            .zip(["pivot", "source"])
            .map(|(((_, _, metric), (ids, vals)), name)| TeacherView {
                name,
                k: K,
                ids,
                logits: vals,
                metric_ce: metric,
            })
            .collect()
    };

    // What the loss holds for teachers: the views (a pointer pair per record
    // and candidate, and the metrics) and the sparse targets it builds for the
    // chosen teacher (u16 ids and f32 weights, and its entropy per record),
    // measured on the targets themselves.
    {
        let logits = Tensor::zeros((n, V), DType::F32, &Device::Cpu).unwrap();
        let v = views();
        let batch = LossBatch {
            logits: &logits,
            labels: &labels,
            record: &record,
            records: B,
            teachers: &v,
            progress: 0.0,
        };
        let shares = vec![vec![1.0, 0.0]; B];
        let (targets, entropy) = teacher_targets(&batch, &shares, 1.0, false).unwrap();
        let views_bytes = cands.len() * B * (2 * std::mem::size_of::<&[u32]>() + 4);
        let ours = views_bytes + targets.bytes() + entropy.len() * 8;
        let dense = B * L * V * 2;
        eprintln!(
            "teacher memory (B={B}, L={L}, V={V}, k={K}, {n} loss positions, 2 candidates): {ours} bytes here vs {dense} for a dense bf16 [B, L, V] teacher: {:.0}x less",
            dense as f64 / ours as f64
        );
    }

    // One training step; returns the time of each phase.
    let mut step = || -> [f64; 5] {
        let mut times = [0f64; 5];
        let mut t = std::time::Instant::now();
        let mut lap = |i: usize, t: &mut std::time::Instant| {
            times[i] = t.elapsed().as_secs_f64();
            *t = std::time::Instant::now();
        };
        let h = m.hidden(&x, &mask).unwrap();
        lap(0, &mut t);
        let h = h
            .reshape((B * L, 768))
            .unwrap()
            .index_select(&pos_t, 0)
            .unwrap();
        let logits = m.logits(&h).unwrap();
        let views = views();
        let batch = LossBatch {
            logits: &logits,
            labels: &labels,
            record: &record,
            records: B,
            teachers: &views,
            progress: 0.0,
        };
        let out = loss.plugin.loss(&params, &batch).unwrap();
        lap(1, &mut t);
        let grads = out.loss.backward().unwrap();
        lap(2, &mut t);
        let mut g: Vec<Vec<f32>> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        clip_grad_norm(&mut g, 1.0);
        lap(3, &mut t);
        opt.step(&g, 5e-6).unwrap();
        lap(4, &mut t);
        times
    };

    // Four steps outside criterion, timed by phase (where the time goes; the
    // first also pays for fresh memory).
    for _ in 0..4 {
        let [fwd, head, bwd, copy, adam] = step();
        eprintln!(
            "one step: forward {fwd:.2}s, LM head + loss {head:.2}s, backward {bwd:.2}s, gradients out + clip {copy:.2}s, AdamW {adam:.2}s"
        );
    }

    let mut g = c.benchmark_group("fuse_mistral_125M_f32_cpu");
    g.sample_size(10);
    g.throughput(Throughput::Elements((B * L) as u64));
    g.bench_function("train_step_b4_l512", |bench| bench.iter(&mut step));
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench
}
criterion_main!(benches);
