//! The Llama-family decoder (llama, mistral, mixtral) on tiny generated checkpoints.

use candle_core::{DType as CDType, Device, Tensor};
use candle_nn::Optimizer;
use fusechat::core::io::dtype::DType;
use fusechat::core::io::hf_dir::write_model_dir;
use fusechat::core::model::ops::cross_entropy;
use fusechat::core::model::{KvCache, LoadOptions};
use fusechat::plugins::models::decoder::{Decoder, DecoderConfig, Flavour};
use serde_json::json;
use std::path::Path;

fn config(flavour: Flavour) -> serde_json::Value {
    let mut c = json!({
        "vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    let o = c.as_object_mut().unwrap();
    match flavour {
        Flavour::Llama => {
            o.insert("architectures".into(), json!(["LlamaForCausalLM"]));
            o.insert("model_type".into(), json!("llama"));
        }
        Flavour::Mistral => {
            o.insert("architectures".into(), json!(["MistralForCausalLM"]));
            o.insert("model_type".into(), json!("mistral"));
            o.insert("sliding_window".into(), json!(4096));
        }
        Flavour::Mixtral => {
            o.insert("architectures".into(), json!(["MixtralForCausalLM"]));
            o.insert("model_type".into(), json!("mixtral"));
            o.insert("num_local_experts".into(), json!(3));
            o.insert("num_experts_per_tok".into(), json!(2));
        }
    }
    c
}

/// Random weights for a config, deterministic per seed.
fn weights(cfg: &serde_json::Value, seed: u64) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    DecoderConfig::from_json(cfg, Path::new("config.json"), None)
        .unwrap()
        .random_weights(seed, 0.2, 0.1)
}

fn make(dir: &Path, cfg: &serde_json::Value, seed: u64) {
    write_model_dir(dir, cfg, &weights(cfg, seed), DType::F32, 1 << 30).unwrap();
}

fn load(dir: &Path) -> Decoder {
    Decoder::load(dir, &LoadOptions::default(), None).unwrap()
}

fn ids(v: &[u32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu).unwrap()
}

fn ones(n: usize) -> Tensor {
    Tensor::ones((1, n), CDType::U32, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

const FLAVOURS: [Flavour; 3] = [Flavour::Llama, Flavour::Mistral, Flavour::Mixtral];

#[test]
fn logits_cover_every_position() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        make(&d, &config(f), 1);
        let m = load(&d);
        assert_eq!(m.cfg.flavour, f);
        let x = Tensor::from_vec((0..14u32).collect::<Vec<_>>(), (2, 7), &Device::Cpu).unwrap();
        let mask = Tensor::ones((2, 7), CDType::U32, &Device::Cpu).unwrap();
        let logits = m.forward(&x, &mask).unwrap();
        assert_eq!(logits.dims(), &[2, 7, 40], "{f:?}");
        assert_eq!(logits.dtype(), CDType::F32);
    }
}

#[test]
fn padded_rows_equal_their_sequences_alone() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        make(&d, &config(f), 2);
        let m = load(&d);
        let a = [3u32, 9, 1, 22, 5, 7, 30];
        let b = [11u32, 4, 8];
        let mut batch = a.to_vec();
        batch.extend(b);
        batch.extend([0u32; 4]); // right padding
        let mut mask = vec![1u32; 7 + 3];
        mask.extend([0u32; 4]);
        let x = Tensor::from_vec(batch, (2, 7), &Device::Cpu).unwrap();
        let mask = Tensor::from_vec(mask, (2, 7), &Device::Cpu).unwrap();
        let both = m.forward(&x, &mask).unwrap();
        let la = m.forward(&ids(&a), &ones(7)).unwrap();
        let lb = m.forward(&ids(&b), &ones(3)).unwrap();
        assert!(
            max_diff(&both.narrow(0, 0, 1).unwrap(), &la) <= 1e-5,
            "{f:?} row a"
        );
        assert!(
            max_diff(&both.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap(), &lb) <= 1e-5,
            "{f:?} row b"
        );
    }
}

#[test]
fn cached_steps_equal_recomputing_the_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        make(&d, &config(f), 3);
        let m = load(&d);
        // 150 tokens: the cache grows past its first capacity (64 positions, then doubling)
        let seq: Vec<u32> = (0..150).map(|i| (i * 7 + i / 3) % 40).collect();
        let mut cache = KvCache::default();
        // a 3-token prompt, then one token at a time
        let first = m.forward_cached(&ids(&seq[..3]), None, &mut cache).unwrap();
        let full = m.forward(&ids(&seq[..3]), &ones(3)).unwrap();
        assert_eq!(
            first.dims(),
            [1, 1, full.dim(2).unwrap()],
            "the last position only"
        );
        assert!(max_diff(&first, &full.narrow(1, 2, 1).unwrap()) <= 1e-5);
        for n in 4..=seq.len() {
            let step = m
                .forward_cached(&ids(&seq[n - 1..n]), None, &mut cache)
                .unwrap();
            let full = m
                .forward(&ids(&seq[..n]), &ones(n))
                .unwrap()
                .narrow(1, n - 1, 1)
                .unwrap();
            assert!(max_diff(&step, &full) <= 1e-5, "{f:?} step {n}");
        }
        assert_eq!(cache.len(), seq.len());
    }
}

#[test]
fn sliding_window_changes_logits_only_beyond_the_window() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(Flavour::Mistral);
    let w = weights(&cfg, 4);
    write_model_dir(&tmp.path().join("wide"), &cfg, &w, DType::F32, 1 << 30).unwrap();
    cfg["sliding_window"] = json!(4);
    write_model_dir(&tmp.path().join("narrow"), &cfg, &w, DType::F32, 1 << 30).unwrap();
    let seq: Vec<u32> = (0..10).map(|i| (i * 7 % 40) as u32).collect();
    let a = load(&tmp.path().join("wide"))
        .forward(&ids(&seq), &ones(10))
        .unwrap();
    let b = load(&tmp.path().join("narrow"))
        .forward(&ids(&seq), &ones(10))
        .unwrap();
    for pos in 0..10 {
        let d = max_diff(&a.narrow(1, pos, 1).unwrap(), &b.narrow(1, pos, 1).unwrap());
        if pos < 4 {
            assert_eq!(d, 0.0, "position {pos} is inside the window");
        } else {
            assert!(d > 1e-4, "position {pos} is beyond the window: {d}");
        }
    }
}

#[test]
fn mixtral_with_one_expert_equals_dense_mistral() {
    let tmp = tempfile::tempdir().unwrap();
    let mcfg = config(Flavour::Mistral);
    let dense = weights(&mcfg, 5);
    write_model_dir(
        &tmp.path().join("dense"),
        &mcfg,
        &dense,
        DType::F32,
        1 << 30,
    )
    .unwrap();
    let mut xcfg = config(Flavour::Mixtral);
    xcfg["num_local_experts"] = json!(1);
    xcfg["num_experts_per_tok"] = json!(1);
    let mut moe = Vec::new();
    for (n, s, v) in &dense {
        let renamed = n
            .replace("mlp.gate_proj", "block_sparse_moe.experts.0.w1")
            .replace("mlp.down_proj", "block_sparse_moe.experts.0.w2")
            .replace("mlp.up_proj", "block_sparse_moe.experts.0.w3");
        moe.push((renamed, s.clone(), v.clone()));
        if n.ends_with("post_attention_layernorm.weight") {
            let l = n.split('.').nth(2).unwrap();
            moe.push((
                format!("model.layers.{l}.block_sparse_moe.gate.weight"),
                vec![1, 32],
                vec![0.3; 32],
            ));
        }
    }
    write_model_dir(&tmp.path().join("moe"), &xcfg, &moe, DType::F32, 1 << 30).unwrap();
    let seq = [1u32, 5, 9, 13, 17, 21];
    let a = load(&tmp.path().join("dense"))
        .forward(&ids(&seq), &ones(6))
        .unwrap();
    let b = load(&tmp.path().join("moe"))
        .forward(&ids(&seq), &ones(6))
        .unwrap();
    assert!(max_diff(&a, &b) <= 1e-5);
}

/// Mean cross-entropy of next-token prediction, from differentiable ops.
fn lm_loss(logits: &Tensor, seq: &[u32]) -> Tensor {
    let n = seq.len() - 1;
    let l = logits.squeeze(0).unwrap().narrow(0, 0, n).unwrap();
    let targets = Tensor::from_vec(seq[1..].to_vec(), n, &Device::Cpu).unwrap();
    cross_entropy(&l, &targets).unwrap()
}

#[test]
fn every_trainable_weight_gets_a_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        let mut cfg = config(f);
        if f == Flavour::Mixtral {
            cfg["num_experts_per_tok"] = json!(3); // every expert sees every token
        }
        make(&d, &cfg, 6);
        let m = Decoder::load(
            &d,
            &LoadOptions {
                trainable: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(
            m.vars().len(),
            DecoderConfig::from_json(&cfg, Path::new("c"), None)
                .unwrap()
                .weights()
                .len()
        );
        let seq = [2u32, 7, 11, 3, 19, 23, 5];
        let loss = lm_loss(&m.forward(&ids(&seq), &ones(7)).unwrap(), &seq);
        let grads = loss.backward().unwrap();
        for (name, var) in m.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{f:?}: no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{f:?}: zero gradient for {name}"
            );
        }
    }
}

#[test]
fn a_few_adamw_steps_fit_one_sequence_and_frozen_weights_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    make(&d, &config(Flavour::Mistral), 7);
    let opts = LoadOptions {
        trainable: true,
        freeze: vec!["embed_tokens".into(), "layers.0.".into()],
        ..Default::default()
    };
    let m = Decoder::load(&d, &opts, None).unwrap();
    assert!(m
        .vars()
        .iter()
        .all(|(n, _)| !n.contains("embed_tokens") && !n.contains("layers.0.")));
    let frozen_before = m
        .weight("model.layers.0.self_attn.q_proj.weight")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let seq = [4u32, 8, 15, 16, 23, 2];
    let vars: Vec<candle_core::Var> = m.vars().iter().map(|(_, v)| v.clone()).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 3e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let first = lm_loss(&m.forward(&ids(&seq), &ones(6)).unwrap(), &seq)
        .to_scalar::<f32>()
        .unwrap();
    let mut last = first;
    for _ in 0..40 {
        let loss = lm_loss(&m.forward(&ids(&seq), &ones(6)).unwrap(), &seq);
        opt.backward_step(&loss).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
    }
    assert!(last < first / 10.0, "loss {first} -> {last}");
    let frozen_after = m
        .weight("model.layers.0.self_attn.q_proj.weight")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(frozen_before
        .iter()
        .zip(&frozen_after)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    // Save and reload: bit-exact, with the trained values.
    m.save(&tmp.path().join("saved"), DType::F32).unwrap();
    let r = load(&tmp.path().join("saved"));
    for (n, _, v) in m.tensors().unwrap() {
        let w = r
            .weight(&n)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            v.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{n}"
        );
    }
}

#[test]
fn sharded_and_unsharded_checkpoints_load_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(Flavour::Llama);
    let w = weights(&cfg, 8);
    write_model_dir(&tmp.path().join("one"), &cfg, &w, DType::F32, 1 << 30).unwrap();
    write_model_dir(&tmp.path().join("many"), &cfg, &w, DType::F32, 20_000).unwrap();
    assert!(tmp
        .path()
        .join("many/model.safetensors.index.json")
        .exists());
    let seq = [1u32, 2, 3, 4];
    let a = load(&tmp.path().join("one"))
        .forward(&ids(&seq), &ones(4))
        .unwrap();
    let b = load(&tmp.path().join("many"))
        .forward(&ids(&seq), &ones(4))
        .unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
}

#[test]
fn bad_checkpoints_name_the_field_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |dir: &Path| {
        Decoder::load(dir, &LoadOptions::default(), None)
            .err()
            .unwrap()
            .to_string()
    };
    // missing config field
    let mut cfg = config(Flavour::Llama);
    let w = weights(&cfg, 9);
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    write_model_dir(&tmp.path().join("a"), &cfg, &w, DType::F32, 1 << 30).unwrap();
    let e = err(&tmp.path().join("a"));
    assert!(
        e.contains("intermediate_size") && e.contains("config.json"),
        "{e}"
    );
    // unknown architecture
    let mut cfg = config(Flavour::Llama);
    cfg["architectures"] = json!(["GPT2LMHeadModel"]);
    cfg["model_type"] = json!("gpt2");
    write_model_dir(&tmp.path().join("b"), &cfg, &w, DType::F32, 1 << 30).unwrap();
    let e = err(&tmp.path().join("b"));
    assert!(
        e.contains("unknown architecture") && e.contains("GPT2LMHeadModel"),
        "{e}"
    );
    // a missing tensor and a tensor with the wrong shape
    let cfg = config(Flavour::Llama);
    let mut w2 = w.clone();
    w2.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight");
    for (n, s, v) in w2.iter_mut() {
        if n == "model.norm.weight" {
            *s = vec![31];
            v.truncate(31);
        }
    }
    write_model_dir(&tmp.path().join("c"), &cfg, &w2, DType::F32, 1 << 30).unwrap();
    let e = err(&tmp.path().join("c"));
    assert!(
        e.contains("`model.layers.1.mlp.up_proj.weight` is missing"),
        "{e}"
    );
    assert!(
        e.contains("`model.norm.weight` has shape [31]") && e.contains("[32]"),
        "{e}"
    );
}

#[test]
fn fused_inference_kernels_match_the_differentiable_forms() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        make(&d, &config(f), 10);
        let seq = [3u32, 1, 4, 1, 5, 9, 2, 6, 5, 3];
        let fused = load(&d).forward(&ids(&seq), &ones(10)).unwrap();
        let trainable = Decoder::load(
            &d,
            &LoadOptions {
                trainable: true,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let plain = trainable.forward(&ids(&seq), &ones(10)).unwrap();
        assert!(
            max_diff(&fused, &plain) <= 1e-5,
            "{f:?}: {}",
            max_diff(&fused, &plain)
        );
    }
}

/// The bf16 compute path (the CUDA default) on CPU: logits close to f32's, in f32,
/// and padding still does not leak into real positions.
#[test]
fn bf16_compute_tracks_f32() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        make(&d, &config(f), 11);
        let seq = [3u32, 14, 15, 9, 26, 5, 35, 8];
        let full = load(&d).forward(&ids(&seq), &ones(8)).unwrap();
        let opts = LoadOptions {
            dtype: Some(CDType::BF16),
            ..Default::default()
        };
        let m = Decoder::load(&d, &opts, None).unwrap();
        let half = m.forward(&ids(&seq), &ones(8)).unwrap();
        assert_eq!(half.dtype(), CDType::F32);
        let scale = full
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d_rel = max_diff(&full, &half) / scale;
        assert!(
            d_rel < 0.05,
            "{f:?}: bf16 logits differ by {d_rel} of the largest logit"
        );
        // padded batch, bf16: real positions match the sequence alone
        let mut batch = seq.to_vec();
        batch.extend([7u32, 7, 7, 0, 0, 0, 0, 0]);
        let mask: Vec<u32> = [1u32; 8]
            .iter()
            .chain([1u32, 1, 1, 0, 0, 0, 0, 0].iter())
            .copied()
            .collect();
        let both = m
            .forward(
                &Tensor::from_vec(batch, (2, 8), &Device::Cpu).unwrap(),
                &Tensor::from_vec(mask, (2, 8), &Device::Cpu).unwrap(),
            )
            .unwrap();
        assert!(
            max_diff(&both.narrow(0, 0, 1).unwrap(), &half) <= 1e-3 * scale,
            "{f:?}"
        );
    }
}

#[test]
fn cross_entropy_matches_a_direct_computation() {
    let logits =
        Tensor::from_vec(vec![1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0], (2, 3), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(vec![1u32, 2], 2, &Device::Cpu).unwrap();
    let got = cross_entropy(&logits, &targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let row = |z: [f64; 3], t: usize| (z.iter().map(|x| x.exp()).sum::<f64>()).ln() - z[t];
    let want = (row([1.0, 2.0, 0.5], 1) + row([-1.0, 0.0, 3.0], 2)) / 2.0;
    assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
}

/// config.json values the decoder cannot use are refused by name (a head_dim
/// of 1 used to panic in RoPE).
#[test]
fn unusable_config_values_are_errors_naming_the_field() {
    let mut c = config(Flavour::Mistral);
    let err = |c: &serde_json::Value| {
        DecoderConfig::from_json(c, Path::new("config.json"), None)
            .unwrap_err()
            .to_string()
    };
    c["head_dim"] = json!(1);
    let e = err(&c);
    assert!(
        e.contains("config.json") && e.contains("head_dim is 1"),
        "{e}"
    );
    c["head_dim"] = json!(8);
    c["num_attention_heads"] = json!(0);
    assert!(err(&c).contains("`num_attention_heads` is 0"));
    c["num_attention_heads"] = json!(4);
    c["rope_theta"] = json!(-1.0);
    assert!(err(&c).contains("`rope_theta` is -1.0"));
    c["rope_theta"] = json!(10000.0);
    c["num_key_value_heads"] = json!(3);
    assert!(err(&c).contains("multiple of num_key_value_heads (3)"));
}

/// A left-padded batch gives each row the logits of that row run alone.
#[test]
fn left_padded_rows_match_their_own_run() {
    let tmp = tempfile::tempdir().unwrap();
    for f in FLAVOURS {
        let d = tmp.path().join(f.name());
        make(&d, &config(f), 5);
        let m = load(&d);
        let seq: Vec<u32> = (0..150).map(|i| (i * 7 + i / 3) % 40).collect();
        // Two prompts (5 and 9 tokens), left-padded into one batch, then 12 shared steps.
        let (a, b) = (&seq[100..105], &seq[20..29]);
        let width = b.len();
        let mut input: Vec<u32> = vec![0; width - a.len()];
        input.extend_from_slice(a);
        input.extend_from_slice(b);
        let mut mask: Vec<Vec<u32>> = vec![
            [vec![0; width - a.len()], vec![1; a.len()]].concat(),
            vec![1; width],
        ];
        let mut rows = [a.to_vec(), b.to_vec()];
        let mut cache = KvCache::default();
        let mut x = Tensor::from_vec(input, (2, width), &Device::Cpu).unwrap();
        for step in 0..12 {
            let got = m
                .forward_cached(&x, Some(&mask.concat()), &mut cache)
                .unwrap();
            for (r, row) in rows.iter().enumerate() {
                let alone = m
                    .forward(&ids(row), &ones(row.len()))
                    .unwrap()
                    .narrow(1, row.len() - 1, 1)
                    .unwrap();
                let mine = got.narrow(0, r, 1).unwrap();
                assert!(max_diff(&mine, &alone) <= 1e-4, "{f:?} row {r} step {step}");
            }
            let next = [seq[step], seq[step + 60]];
            for (r, t) in next.iter().enumerate() {
                rows[r].push(*t);
                mask[r].push(1);
            }
            x = Tensor::from_vec(next.to_vec(), (2, 1), &Device::Cpu).unwrap();
        }
    }
}

/// Attention runs in blocks of 128 queries, each against the keys it can see:
/// with 140 positions, the loss on the second block's positions reaches the
/// layer-0 keys of the first block only through the blocks' key ranges. The
/// gradient there must agree with a central finite difference along it.
#[test]
fn gradients_through_attention_blocks_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    make(&d, &config(Flavour::Mistral), 12);
    let opts = LoadOptions {
        trainable: true,
        ..Default::default()
    };
    let m = Decoder::load(&d, &opts, None).unwrap();
    let seq: Vec<u32> = (0..141).map(|i| (i * 11 + i / 5) % 40).collect();
    let x = ids(&seq[..140]);
    let targets = Tensor::from_vec(seq[129..141].to_vec(), 12, &Device::Cpu).unwrap();
    let loss = || {
        let logits = m.forward(&x, &ones(140)).unwrap();
        cross_entropy(
            &logits.narrow(1, 128, 12).unwrap().squeeze(0).unwrap(),
            &targets,
        )
        .unwrap()
    };
    let name = "model.layers.0.self_attn.k_proj.weight";
    let var = m.vars().iter().find(|(n, _)| n == name).unwrap().1.clone();
    let grads = loss().backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap();
    let norm = g
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        norm > 1e-3,
        "the second block's loss reaches the first block's keys: |g| = {norm}"
    );
    let dir = (g / norm as f64).unwrap();
    let w0 = var.as_tensor().copy().unwrap();
    let eps = 1e-2;
    let at = |e: f64| {
        var.set(&(&w0 + (&dir * e).unwrap()).unwrap()).unwrap();
        loss().to_scalar::<f32>().unwrap()
    };
    let fd = (at(eps) - at(-eps)) / (2.0 * eps as f32);
    var.set(&w0).unwrap();
    assert!(
        (fd - norm).abs() <= 0.005 * norm,
        "finite difference {fd} vs |g| {norm}"
    );
}
