//! The data-construction hot paths:
//! - `represent` end to end on a ~100M Mistral-shaped model (hidden 768, 8
//!   layers, vocab 32000; f32 on CPU) over 16 generated conversations of about
//!   420 tokens, with the share of time spent in the forward pass and the bytes
//!   per record against the scripts' format (2048 × 10 × (2 + 8) bytes a row);
//! - top-k selection over a 32000-logit row against a full sort;
//! - `mined` (DTW) against `offsets` alignment of one 2048-token row.
//!
//!     cargo bench --bench represent

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fusechat::core::data::align::{Vocab, VocabPair};
use fusechat::core::data::repr::RowView;
use fusechat::core::data::represent::{represent, top_k, RepresentOptions};
use fusechat::core::pipeline::miniature::write_tokenizer;
use fusechat::core::rng::SplitMix64;
use half::f16;
use std::path::PathBuf;

mod common;

fn bench_dir() -> PathBuf {
    common::bench_data("represent")
}

/// The model (with a word-level tokenizer) and a dataset of 16 conversations.
fn setup() -> (PathBuf, PathBuf) {
    let dir = bench_dir();
    let data = dir.join("conversations.jsonl");
    let tok = dir.join("tokenizer");
    let words = write_tokenizer(&tok, 32000).unwrap();
    let model = common::mistral_98m(&dir.join("model"), Some(&tok));
    if data.exists() {
        return (model, data);
    }
    let mut rng = SplitMix64(11);
    let mut text = |n: usize| {
        (0..n)
            .map(|_| words[(rng.next_u64() % words.len() as u64) as usize].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let (u, a) = (text(80 + 7 * i), text(280 + 5 * i));
            serde_json::json!({"id": i, "conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    (model, data)
}

fn bench_represent(c: &mut Criterion) {
    fusechat::tune_allocator_for_compute();
    let (model, data) = setup();
    let reg = fusechat::registry();
    let out = bench_dir().join("out");
    let mut o = RepresentOptions::new(&model, &data, &out);
    o.force = true;
    o.batch_size = 4;
    // One run outside criterion for the breakdown and the sizes.
    let r = represent(&reg, &o).unwrap();
    let m = r.manifest.as_ref().unwrap();
    let bytes: u64 = m
        .shards
        .iter()
        .map(|s| std::fs::metadata(out.join(&s.file)).unwrap().len())
        .sum();
    let per_row = bytes as f64 / m.records.rows as f64;
    let scripts = 2048.0 * 10.0 * (2.0 + 8.0) + 4.0;
    let positions: u64 = m.shards.iter().map(|s| s.positions).sum();
    let tokens: u64 = m.shards.iter().map(|s| s.tokens).sum();
    eprintln!(
        "represent: {} records, {tokens} tokens, {positions} loss positions; {:.0} tokens/s, {:.1}% of the time in the forward pass",
        m.records.rows,
        r.tokens as f64 / r.seconds,
        100.0 * r.forward_seconds / r.seconds
    );
    eprintln!(
        "format: {per_row:.0} bytes per record here vs {scripts:.0} in the scripts' format ({:.1}x smaller)",
        scripts / per_row
    );
    for (len, frac) in [
        (256usize, 0.6f64),
        (512, 0.6),
        (1024, 0.6),
        (2048, 0.6),
        (2048, 1.0),
    ] {
        let p = (len as f64 * frac).round();
        let ours = len as f64 * 5.0 + p * 10.0 * 4.0 + 8.0 * 2.0 + 4.0;
        eprintln!(
            "format: a {len}-token record with {:.0}% labels: {ours:.0} bytes, {:.1}x smaller",
            frac * 100.0,
            scripts / ours
        );
    }
    let mut g = c.benchmark_group("represent");
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens));
    g.bench_function("mistral_98M_16_records", |b| {
        b.iter(|| represent(&reg, &o).unwrap())
    });
    g.finish();
}

fn bench_top_k(c: &mut Criterion) {
    let mut rng = SplitMix64(1);
    let row: Vec<f32> = (0..32000).map(|_| rng.normal() as f32).collect();
    let mut g = c.benchmark_group("top_k_32000");
    g.bench_function("select_k10", |b| {
        b.iter(|| top_k(std::hint::black_box(&row), 10))
    });
    g.bench_function("full_sort_k10", |b| {
        b.iter(|| {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            idx.sort_unstable_by(|&x, &y| row[y as usize].total_cmp(&row[x as usize]));
            idx.truncate(10);
            idx
        })
    });
    g.finish();
}

/// A 2048-token pivot row of words and the source tokenizing every third word in two pieces.
fn bench_align(c: &mut Criterion) {
    let n_words = 400;
    let mut pivot_tokens = vec!["<s>".to_string()];
    let mut source_tokens = vec!["<s>".to_string()];
    for i in 0..n_words {
        let w = format!("w{i:03}x");
        pivot_tokens.push(format!("\u{2581}{w}"));
        source_tokens.push(format!("\u{120}{w}"));
        source_tokens.push(format!("\u{120}{}", &w[..2]));
        source_tokens.push(w[2..].to_string());
    }
    let special = |n: usize| (0..n).map(|i| i == 0).collect::<Vec<bool>>();
    let pv = Vocab::new(pivot_tokens.clone(), special(pivot_tokens.len()));
    let sv = Vocab::new(source_tokens.clone(), special(source_tokens.len()));
    let v = VocabPair::new(pv, sv);
    let mut rng = SplitMix64(2);
    let len = 2048;
    let p_ids: Vec<u32> = std::iter::once(0)
        .chain((1..len).map(|_| 1 + (rng.next_u64() % n_words as u64) as u32))
        .collect();
    // The same text on the source side: every third word split in two.
    let mut s_ids = vec![0u32];
    for (j, &w) in p_ids[1..].iter().enumerate() {
        let w = (w - 1) as usize;
        if j % 3 == 0 {
            s_ids.extend([(2 + 3 * w) as u32, (3 + 3 * w) as u32]);
        } else {
            s_ids.push((1 + 3 * w) as u32);
        }
    }
    let labels = |n: usize| (0..n).map(|i| (i > n / 4) as u8).collect::<Vec<u8>>();
    let (pl, sl) = (labels(p_ids.len()), labels(s_ids.len()));
    let k = 10;
    let sp = fusechat::core::data::repr::loss_positions(&sl).count();
    let topk_ids: Vec<u32> = (0..sp * k)
        .map(|i| 1 + (i as u32 * 7) % (source_tokens.len() as u32 - 1))
        .collect();
    let topk_logits: Vec<f16> = (0..sp * k)
        .map(|i| f16::from_f32(-((i % k) as f32)))
        .collect();
    let pr = RowView {
        row_id: 0,
        input_ids: &p_ids,
        label_mask: &pl,
        topk_ids: &[],
        topk_logits: &[],
        metric_ce: 1.0,
    };
    let sr = RowView {
        row_id: 0,
        input_ids: &s_ids,
        label_mask: &sl,
        topk_ids: &topk_ids,
        topk_logits: &topk_logits,
        metric_ce: 1.0,
    };
    let reg = fusechat::registry();
    let mut g = c.benchmark_group("align_2048_tokens");
    g.sample_size(10);
    for name in ["mined", "offsets"] {
        let e = reg.aligner(name).unwrap();
        let params = e.info.resolve_scalars(&Default::default()).unwrap();
        // Warm the nearest-token cache so both measure alignment, not vocabulary mining.
        let first = e.plugin.align(&v, &params, &pr, &sr, k).unwrap();
        eprintln!(
            "{name}: {} positions transferred, {} fell back",
            first.stats.transferred, first.stats.fallback
        );
        g.bench_function(name, |b| {
            b.iter(|| e.plugin.align(&v, &params, &pr, &sr, k).unwrap())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion_config();
    targets = bench_top_k, bench_align, bench_represent
}
criterion_main!(benches);
