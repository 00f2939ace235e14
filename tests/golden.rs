//! The merge methods against FuseChat's reference values (tests/data/fusechat_golden.json,
//! copied from shared/golden). The references were computed by PyTorch in bf16;
//! fusechat computes in f32 and rounds once, so results may differ by one bf16 ulp.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::io::model_dir::ModelDir;

fn golden() -> serde_json::Value {
    serde_json::from_str(include_str!("data/fusechat_golden.json")).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn one_tensor(dir: &std::path::Path, values: Vec<f32>, dtype: DType) {
    let n = values.len();
    write_model(
        dir,
        &[("model.layers.0.mlp.up_proj.weight", vec![n], values)],
        dtype,
    );
}

#[test]
fn varm_matches_the_paper_example() {
    let g = &golden()["varm_paper"];
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    one_tensor(&p.join("pivot"), floats(&g["pivot"]), DType::F32);
    one_tensor(&p.join("t1"), floats(&g["target1"]), DType::F32);
    one_tensor(&p.join("t2"), floats(&g["target2"]), DType::F32);
    let mut r = request(
        "varm",
        Some(&p.join("pivot")),
        &[&p.join("t1"), &p.join("t2")],
        &p.join("out"),
    );
    r.out_dtype = Some(DType::BF16);
    let rep = merge(&r);
    // Inputs are f32 here and f64 decimals in the reference: agree to ~1e-6.
    let w = &rep.weights[0].1;
    let gw = g["weights"].as_array().unwrap();
    for (a, b) in w.iter().zip(gw) {
        assert!((a - b.as_f64().unwrap()).abs() < 2e-6, "{w:?}");
    }
    let m = ModelDir::open(&p.join("out")).unwrap();
    assert_eq!(
        m.tensor("model.layers.0.mlp.up_proj.weight").unwrap().dtype,
        Some(DType::BF16)
    );
    let got = m.read_f32("model.layers.0.mlp.up_proj.weight").unwrap();
    for (i, (a, b)) in got.iter().zip(floats(&g["merged_bf16"])).enumerate() {
        assert!(bf16_ulps(*a, b) <= 1, "element {i}: {a} vs {b}");
    }
}

fn sce(variant: &str) {
    let g = golden();
    let inp = &g["sce_inputs"];
    let want = &g[format!("sce_{variant}_topk0.5").as_str()];
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    one_tensor(&p.join("base"), floats(&inp["base_bf16"]), DType::BF16);
    let targets: Vec<std::path::PathBuf> = inp["targets_bf16"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let d = p.join(format!("t{i}"));
            one_tensor(&d, floats(t), DType::BF16);
            d
        })
        .collect();
    let refs: Vec<&std::path::Path> = targets.iter().map(|t| t.as_path()).collect();
    let mut r = request("sce", Some(&p.join("base")), &refs, &p.join("out"));
    set(&mut r, "select_topk", serde_json::json!(0.5));
    set(&mut r, "variant", serde_json::json!(variant));
    let rep = merge(&r);
    // The weights, rounded to bf16 as the reference stores them, match exactly.
    for (a, b) in rep.weights[0].1.iter().zip(floats(&want["weights_bf16"])) {
        assert_eq!(half::bf16::from_f64(*a).to_f32(), b);
    }
    let got = tensor(&p.join("out"), "model.layers.0.mlp.up_proj.weight");
    for (i, (a, b)) in got.iter().zip(floats(&want["merged"])).enumerate() {
        assert!(bf16_ulps(*a, b) <= 1, "{variant} element {i}: {a} vs {b}");
    }
}

#[test]
fn sce_vendored_matches_reference() {
    sce("vendored");
}

#[test]
fn sce_upstream_matches_reference() {
    sce("upstream");
}

/// The planner's layer positions and the filter/gradient resolution reproduce
/// FuseChat's SLERP `t` per layer on a 32-layer model.
#[test]
fn slerp_t_per_layer_matches_reference() {
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![2],
        vec![1.0, 2.0],
    )];
    for l in 0..32 {
        for n in ["self_attn.q_proj", "mlp.up_proj", "input_layernorm"] {
            tensors.push((
                format!("model.layers.{l}.{n}.weight"),
                vec![2],
                vec![1.0, l as f32],
            ));
        }
    }
    let cfg = serde_json::json!({
        "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 2,
        "num_attention_heads": 1, "vocab_size": 2,
    });
    for d in ["a", "b"] {
        fusechat::core::io::hf_dir::write_model_dir(
            &p.join(d),
            &cfg,
            &tensors,
            DType::F32,
            1 << 30,
        )
        .unwrap();
    }
    let yaml = "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 32]\n      - model: b\n        layer_range: [0, 32]\nmerge_method: slerp\nbase_model: a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n";
    let (req, _) =
        fusechat::core::merge::mergekit::parse(yaml, "t.yml".as_ref(), p.join("out"), p).unwrap();
    let plan = fusechat::core::merge::plan::plan(&req, &fusechat::registry()).unwrap();
    let t_of = |name: &str| {
        plan.tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .params
            .f64("t")
            .unwrap()
    };
    let attn = floats(&g["slerp_t_self_attn"]);
    let mlp = floats(&g["slerp_t_mlp"]);
    for l in 0..32 {
        assert!(
            (t_of(&format!("model.layers.{l}.self_attn.q_proj.weight")) - attn[l] as f64).abs()
                < 1e-6
        );
        assert!(
            (t_of(&format!("model.layers.{l}.mlp.up_proj.weight")) - mlp[l] as f64).abs() < 1e-6
        );
        assert_eq!(
            t_of(&format!("model.layers.{l}.input_layernorm.weight")),
            0.5
        );
    }
    assert_eq!(t_of("model.embed_tokens.weight"), 0.5);
}
