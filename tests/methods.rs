//! Invariants of the merge methods, and comparisons with independent
//! computations written out in the test (not by calling the kernels).

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::merge::engine::ExecOptions;
use fusechat::core::merge::plan::{SliceModel, SliceSource};
use serde_json::json;
use std::path::{Path, PathBuf};

fn setup(targets: usize) -> (tempfile::TempDir, PathBuf, Vec<PathBuf>) {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, t) = model_set(&tmp.path().join("set"), targets, DType::F32);
    (tmp, pivot, t)
}

fn refs(v: &[PathBuf]) -> Vec<&Path> {
    v.iter().map(|p| p.as_path()).collect()
}

/// Parameters that make every method do real work.
fn configure(r: &mut MergeRequestAlias, method: &str) {
    match method {
        "slerp" => set(r, "t", json!(0.3)),
        "ties" | "dare_linear" | "dare_ties" | "della" | "della_linear" => {
            set(r, "density", json!(0.6))
        }
        "breadcrumbs" | "breadcrumbs_ties" => {
            set(r, "density", json!(0.6));
            set(r, "gamma", json!(0.1));
        }
        "sce" => set(r, "select_topk", json!(0.5)),
        "nearswap" => set(r, "t", json!(0.01)),
        _ => {}
    }
}
type MergeRequestAlias = fusechat::core::merge::plan::MergeRequest;

#[test]
fn merging_identical_models_returns_them() {
    let (tmp, pivot, _) = setup(1);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    copy_dir(&pivot, &a);
    copy_dir(&pivot, &b);
    for method in METHODS {
        let out = tmp.path().join(format!("out-{method}"));
        let models: Vec<&Path> = if models_for(method) == 1 {
            vec![&b]
        } else {
            vec![&a, &b]
        };
        // methods without a base role would merge the base as a model
        let base =
            (!matches!(*method, "linear" | "karcher" | "passthrough")).then_some(pivot.as_path());
        let mut r = request(method, base, &models, &out);
        configure(&mut r, method);
        merge(&r);
        for (name, _, v) in tensors(&pivot) {
            let got = tensor(&out, &name);
            assert!(
                max_abs_diff(&got, &v) <= 1e-6 * v.iter().fold(1f32, |m, x| m.max(x.abs())),
                "{method} {name}"
            );
        }
    }
}

#[test]
fn slerp_at_t0_is_the_base_bit_for_bit() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("out");
    let mut r = request("slerp", Some(&pivot), &[&t[0]], &out);
    set(&mut r, "t", json!(0.0));
    merge(&r);
    let (a, b) = (tensors(&out), tensors(&pivot));
    assert_eq!(a.len(), b.len());
    for ((n1, s1, v1), (n2, s2, v2)) in a.iter().zip(&b) {
        assert_eq!((n1, s1), (n2, s2));
        assert!(
            v1.iter().zip(v2).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{n1}"
        );
    }
}

#[test]
fn slerp_matches_an_independent_formula() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("out");
    let mut r = request("slerp", Some(&pivot), &[&t[0]], &out);
    set(&mut r, "t", json!(0.3));
    merge(&r);
    for (name, _, v0) in tensors(&pivot) {
        let v1 = tensor(&t[0], &name);
        let dot: f64 = v0
            .iter()
            .zip(&v1)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>();
        let n0 = v0.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let n1 = v1.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let c = dot / n0 / n1;
        let want: Vec<f32> = if c.abs() > 0.9995 {
            v0.iter()
                .zip(&v1)
                .map(|(a, b)| (0.7 * *a as f64 + 0.3 * *b as f64) as f32)
                .collect()
        } else {
            let th = c.acos();
            let (s0, s1) = ((0.7 * th).sin() / th.sin(), (0.3 * th).sin() / th.sin());
            v0.iter()
                .zip(&v1)
                .map(|(a, b)| (s0 * *a as f64 + s1 * *b as f64) as f32)
                .collect()
        };
        assert!(max_abs_diff(&tensor(&out, &name), &want) < 1e-6, "{name}");
    }
}

#[test]
fn task_arithmetic_normalised_equals_linear_with_same_weights() {
    let (tmp, pivot, t) = setup(2);
    let ta = tmp.path().join("ta");
    let lin = tmp.path().join("lin");
    let mut r = request("task_arithmetic", Some(&pivot), &refs(&t), &ta);
    set(&mut r, "normalize", json!(true));
    set_model(&mut r, 0, "weight", json!(1.0));
    set_model(&mut r, 1, "weight", json!(2.0));
    merge(&r);
    let mut r = request("linear", None, &refs(&t), &lin);
    set_model(&mut r, 0, "weight", json!(1.0));
    set_model(&mut r, 1, "weight", json!(2.0));
    merge(&r);
    for (name, _, v) in tensors(&lin) {
        assert!(max_abs_diff(&tensor(&ta, &name), &v) < 1e-6, "{name}");
    }
}

/// TIES at density 1 keeps every delta: θ⁰ + Σ mⱼwⱼδⱼ / Σ mⱼwⱼ with the elected sign.
#[test]
fn ties_at_density_one_is_sign_elected_task_arithmetic() {
    let (tmp, pivot, t) = setup(3);
    let out = tmp.path().join("out");
    let w = [0.5f32, 1.0, 0.25];
    let mut r = request("ties", Some(&pivot), &refs(&t), &out);
    for (i, wi) in w.iter().enumerate() {
        set_model(&mut r, i, "weight", json!(wi));
    }
    merge(&r);
    for (name, _, base) in tensors(&pivot) {
        let ds: Vec<Vec<f32>> = t
            .iter()
            .map(|m| {
                tensor(m, &name)
                    .iter()
                    .zip(&base)
                    .map(|(x, b)| x - b)
                    .collect()
            })
            .collect();
        let want: Vec<f32> = (0..base.len())
            .map(|i| {
                let sum: f32 = (0..3).map(|j| w[j] * ds[j][i]).sum();
                let sign = if sum >= 0.0 { 1.0 } else { -1.0 };
                let (mut num, mut den) = (0f32, 0f32);
                for j in 0..3 {
                    let u = w[j] * ds[j][i];
                    if u * sign > 0.0 {
                        num += u;
                        den += w[j];
                    }
                }
                base[i] + num / if den == 0.0 { 1.0 } else { den }
            })
            .collect();
        assert!(max_abs_diff(&tensor(&out, &name), &want) < 1e-6, "{name}");
    }
}

#[test]
fn ties_keeps_the_top_density_fraction_of_each_delta() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("out");
    let mut r = request("ties", Some(&pivot), &[&t[0]], &out);
    set(&mut r, "density", json!(0.25));
    merge(&r);
    for (name, _, base) in tensors(&pivot) {
        let d: Vec<f32> = tensor(&t[0], &name)
            .iter()
            .zip(&base)
            .map(|(x, b)| x - b)
            .collect();
        let got: Vec<f32> = tensor(&out, &name)
            .iter()
            .zip(&base)
            .map(|(x, b)| x - b)
            .collect();
        let k = (0.25 * d.len() as f64) as usize;
        let mut mags: Vec<f32> = d.iter().map(|x| x.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        let kept = got.iter().filter(|x| **x != 0.0).count();
        assert_eq!(kept, k, "{name}");
        // every kept delta is at least the k-th largest magnitude, and unchanged
        for (g, dd) in got.iter().zip(&d) {
            if *g != 0.0 {
                assert!(dd.abs() >= mags[k - 1] && (g - dd).abs() < 1e-6);
            }
        }
    }
}

fn dare_out(tmp: &Path, pivot: &Path, t: &[PathBuf], threads: usize, name: &str) -> PathBuf {
    let out = tmp.join(name);
    let mut r = request("dare_ties", Some(pivot), &refs(t), &out);
    set(&mut r, "density", json!(0.5));
    r.seed = 42;
    merge_with(
        &r,
        &ExecOptions {
            threads,
            ..Default::default()
        },
    );
    out
}

#[test]
fn dare_is_identical_under_one_and_two_threads() {
    let (tmp, pivot, t) = setup(2);
    let a = dare_out(tmp.path(), &pivot, &t, 1, "one");
    let b = dare_out(tmp.path(), &pivot, &t, 2, "two");
    assert_eq!(weight_bytes(&a), weight_bytes(&b));
    // and a different seed gives a different mask
    let out = tmp.path().join("seed");
    let mut r = request("dare_ties", Some(&pivot), &refs(&t), &out);
    set(&mut r, "density", json!(0.5));
    r.seed = 43;
    merge(&r);
    assert_ne!(weight_bytes(&a), weight_bytes(&out));
}

#[test]
fn dare_inverse_p_keeps_about_density_and_scales_by_one_over_p() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("out");
    let mut r = request("dare_linear", Some(&pivot), &[&t[0]], &out);
    set(&mut r, "density", json!(0.3));
    set(&mut r, "rescale", json!("inverse_p"));
    merge(&r);
    let (mut kept, mut total) = (0usize, 0usize);
    for (name, _, base) in tensors(&pivot) {
        let d: Vec<f32> = tensor(&t[0], &name)
            .iter()
            .zip(&base)
            .map(|(x, b)| x - b)
            .collect();
        let got: Vec<f32> = tensor(&out, &name)
            .iter()
            .zip(&base)
            .map(|(x, b)| x - b)
            .collect();
        for (g, dd) in got.iter().zip(&d) {
            total += 1;
            if g.abs() > 0.0 {
                kept += 1;
                assert!((g - dd / 0.3).abs() < 1e-5, "{name}: {g} vs {}", dd / 0.3);
            }
        }
    }
    let frac = kept as f64 / total as f64;
    assert!((frac - 0.3).abs() < 0.02, "kept {frac}");
}

#[test]
fn dare_l1_rescale_preserves_the_l1_norm_of_each_delta() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("out");
    let mut r = request("dare_linear", Some(&pivot), &[&t[0]], &out);
    set(&mut r, "density", json!(0.5));
    merge(&r);
    for (name, _, base) in tensors(&pivot) {
        let l1 = |m: &[f32]| {
            m.iter()
                .zip(&base)
                .map(|(x, b)| (x - b).abs() as f64)
                .sum::<f64>()
        };
        let (a, b) = (l1(&tensor(&t[0], &name)), l1(&tensor(&out, &name)));
        assert!((a - b).abs() / a < 1e-4, "{name}: {a} vs {b}");
    }
}

/// VaRM at every granularity against the formula computed here.
#[test]
fn varm_granularities_match_the_formula() {
    let (tmp, pivot, t) = setup(2);
    let all = tensors(&pivot);
    let stat = |name: &str, j: usize| -> (f64, f64) {
        let b = tensor(&pivot, name);
        let m = tensor(&t[j], name);
        (
            m.iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum(),
            b.len() as f64,
        )
    };
    for gran in ["tensor", "layer", "model"] {
        let out = tmp.path().join(gran);
        let mut r = request("varm", Some(&pivot), &refs(&t), &out);
        set(&mut r, "granularity", json!(gran));
        merge(&r);
        for (name, _, _) in &all {
            let layer = fusechat::core::io::model_dir::layer_index(name);
            let scope: Vec<&String> = all
                .iter()
                .map(|(n, _, _)| n)
                .filter(|n| match gran {
                    "tensor" => *n == name,
                    "layer" => match layer {
                        Some(l) => fusechat::core::io::model_dir::layer_index(n) == Some(l),
                        None => *n == name,
                    },
                    _ => true,
                })
                .collect();
            let v: Vec<f64> = (0..2)
                .map(|j| {
                    let (s, n) = scope
                        .iter()
                        .map(|n| stat(n, j))
                        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
                    s / n
                })
                .collect();
            let w = [v[0] / (v[0] + v[1]), v[1] / (v[0] + v[1])];
            let (a, b) = (tensor(&t[0], name), tensor(&t[1], name));
            let want: Vec<f32> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (w[0] * *x as f64 + w[1] * *y as f64) as f32)
                .collect();
            assert!(
                max_abs_diff(&tensor(&out, name), &want) < 1e-6,
                "{gran} {name}"
            );
        }
    }
}

#[test]
fn varm_with_no_variation_uses_uniform_weights() {
    let (tmp, pivot, _) = setup(1);
    let a = tmp.path().join("a");
    copy_dir(&pivot, &a);
    let out = tmp.path().join("out");
    let rep = merge(&request("varm", Some(&pivot), &[&a, &a], &out));
    assert!(rep.weights.iter().all(|(_, w)| w == &vec![0.5, 0.5]));
}

#[test]
fn bf16_inputs_are_written_as_bf16_unless_out_dtype_says_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, t) = model_set(&tmp.path().join("set"), 2, DType::BF16);
    let out = tmp.path().join("out");
    merge(&request("linear", None, &refs(&t), &out));
    let m = fusechat::core::io::model_dir::ModelDir::open(&out).unwrap();
    assert!(m.tensors().values().all(|e| e.dtype == Some(DType::BF16)));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let out2 = tmp.path().join("out2");
    let mut r = request("linear", None, &refs(&t), &out2);
    r.out_dtype = Some(DType::F32);
    merge(&r);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
    let _ = pivot;
}

#[test]
fn sharded_output_has_an_index_and_loads_back_equal() {
    let (tmp, _pivot, t) = setup(2);
    let one = tmp.path().join("one");
    let many = tmp.path().join("many");
    merge(&request("linear", None, &refs(&t), &one));
    let mut r = request("linear", None, &refs(&t), &many);
    r.max_shard_size = 4_000;
    merge(&r);
    let files = weight_bytes(&many);
    assert!(files.len() > 2, "{} shards", files.len());
    assert!(files[0].0.starts_with("model-00001-of-"));
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(many.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        tensors(&one).len()
    );
    assert_eq!(tensors(&one), tensors(&many));
}

/// The problems of a request the planner rejects.
fn plan_problems(r: &MergeRequestAlias) -> Vec<String> {
    match fusechat::core::merge::plan::plan(r, &fusechat::registry()) {
        Err(fusechat::core::Error::Invalid { problems: ps, .. }) => ps,
        Err(e) => panic!("not a request problem: {e}"),
        Ok(_) => panic!("the request was accepted"),
    }
}

#[test]
fn a_required_parameter_that_no_filter_matches_is_reported_once_with_a_count() {
    let (tmp, pivot, t) = setup(1);
    let mut r = request("slerp", Some(&pivot), &refs(&t), &tmp.path().join("o"));
    set(
        &mut r,
        "t",
        json!([{"filter": "no_such_tensor", "value": 0.5}]),
    );
    let ps = plan_problems(&r);
    // 21 tensors: embeddings, 2 layers of 9, final norm, lm_head.
    assert_eq!(
        ps,
        ["required parameter `t` has no value for tensor `model.embed_tokens.weight` (and 20 more tensors)"]
    );
    // Filters that match some tensors: the count is of the others.
    set(
        &mut r,
        "t",
        json!([{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": 0.5}]),
    );
    let ps = plan_problems(&r);
    assert_eq!(ps.len(), 1, "{ps:?}");
    assert!(ps[0].ends_with("(and 6 more tensors)"), "{ps:?}");
}

#[test]
fn a_layer_range_past_the_leads_layers_is_reported_once() {
    let (tmp, _, t) = setup(2);
    let mut r = request("linear", None, &refs(&t), &tmp.path().join("o"));
    r.slices = vec![(0..2)
        .map(|i| SliceSource {
            model: SliceModel::Model(i),
            layers: (1, 6),
        })
        .collect()];
    let ps = plan_problems(&r);
    let range = |i: usize| {
        format!(
            "slice 1, source {} (`{}`): layer_range [1, 6] must satisfy start < end <= 2, the model's number of layers",
            i + 1,
            t[i].display()
        )
    };
    // once per source, checked before any tensor is planned
    assert_eq!(ps, [range(0), range(1)]);
}

#[test]
fn a_layer_range_past_another_sources_layers_is_reported_once() {
    let (tmp, _, t) = setup(2);
    let mut r = request("linear", None, &refs(&t), &tmp.path().join("o"));
    r.slices = vec![vec![
        SliceSource {
            model: SliceModel::Model(0),
            layers: (0, 2),
        },
        SliceSource {
            model: SliceModel::Model(1),
            layers: (4, 6),
        },
    ]];
    let ps = plan_problems(&r);
    assert_eq!(
        ps,
        [format!(
            "slice 1, source 2 (`{}`): layer_range [4, 6] must satisfy start < end <= 2, the model's number of layers",
            t[1].display()
        )]
    );
}
