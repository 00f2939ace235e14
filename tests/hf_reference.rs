//! The decoder against an outside reference: logits that Hugging Face
//! transformers computed for tiny seeded llama, mistral (sliding window 6, so
//! the window matters) and mixtral (4 experts, top-2) checkpoints on a
//! right-padded batch, committed in `tests/data/hf_reference/` with the script
//! that made them (`scripts/make_hf_reference.py`; versions in each
//! `reference.json`). Both of the decoder's paths are checked: the fused
//! inference kernels and the differentiable training ops.

use candle_core::{DType, Device, Tensor};
use fusechat::core::model::LoadOptions;
use fusechat::plugins::models::decoder::{Decoder, Flavour};
use std::path::PathBuf;

fn dir(flavour: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf_reference")
        .join(flavour)
}

/// A tensor of the reference file as f32 values (int64 and f32 are stored).
fn read(st: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    let v = match t.dtype() {
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (t.shape().to_vec(), v)
}

#[test]
fn logits_match_transformers_for_every_flavour() {
    for (name, flavour) in [
        ("llama", Flavour::Llama),
        ("mistral", Flavour::Mistral),
        ("mixtral", Flavour::Mixtral),
    ] {
        let d = dir(name);
        let bytes = std::fs::read(d.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (shape, ids) = read(&st, "input_ids");
        let (_, mask) = read(&st, "attention_mask");
        let (lshape, want) = read(&st, "logits");
        let (b, l) = (shape[0], shape[1]);
        let v = lshape[2];
        let ids = Tensor::from_vec(
            ids.iter().map(|x| *x as u32).collect::<Vec<_>>(),
            (b, l),
            &Device::Cpu,
        )
        .unwrap();
        let mask_t = Tensor::from_vec(
            mask.iter().map(|x| *x as u32).collect::<Vec<_>>(),
            (b, l),
            &Device::Cpu,
        )
        .unwrap();
        for trainable in [false, true] {
            let opts = LoadOptions {
                trainable,
                ..Default::default()
            };
            let m = Decoder::load(&d, &opts, None).unwrap();
            assert_eq!(m.cfg.flavour, flavour);
            let got: Vec<f32> = m
                .forward(&ids, &mask_t)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got.len(), b * l * v);
            let mut worst = 0f32;
            for pos in 0..b * l {
                if mask[pos] == 0.0 {
                    continue; // padded queries: HF and fusechat both ignore them
                }
                for k in 0..v {
                    worst = worst.max((got[pos * v + k] - want[pos * v + k]).abs());
                }
            }
            assert!(
                worst < 1e-4,
                "{name} (trainable: {trainable}): max |Δlogit| {worst} against transformers"
            );
            eprintln!("{name} trainable={trainable}: max |Δlogit| = {worst:e}");
        }
    }
}

/// The reference exercises what it claims: the window changes mistral's later
/// positions, and mixtral routes to every expert.
#[test]
fn the_reference_data_is_what_it_claims() {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir("mistral").join("reference.json")).unwrap(),
    )
    .unwrap();
    let per_pos = m["checks"]["row0_vs_no_window_maxabs_per_position"]
        .as_array()
        .unwrap();
    assert!(per_pos[..6].iter().all(|x| x.as_f64() == Some(0.0)));
    assert!(per_pos[6..].iter().all(|x| x.as_f64().unwrap() > 0.1));
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir("mistral").join("config.json")).unwrap())
            .unwrap();
    assert_eq!(c["sliding_window"], 6);
}
