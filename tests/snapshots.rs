//! insta snapshots of merged outputs: for every built-in method, a merge of a
//! tiny deterministic bf16 model set, summarised per tensor (shape, dtype, a
//! hash of the bytes, the first values to 6 significant digits).
//!
//! The numbers themselves are checked against references and independent
//! computations in golden.rs and methods.rs; these snapshots catch any change
//! to the bytes a method writes. Under CI=true a missing or changed snapshot fails.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::io::model_dir::ModelDir;
use fusechat::core::rng::fnv1a;
use serde_json::json;
use std::path::Path;

fn summary(dir: &Path) -> serde_json::Value {
    let m = ModelDir::open(dir).unwrap();
    let mut names: Vec<&String> = m.tensors().keys().collect();
    names.sort_by(|a, b| fusechat::core::io::model_dir::natural_order(a, b));
    let rows: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let e = m.tensor(n).unwrap();
            let values = m.read_f32(n).unwrap();
            json!({
                "name": n,
                "shape": e.shape,
                "dtype": e.raw_dtype,
                "fnv1a": format!("{:016x}", fnv1a(m.raw(n).unwrap())),
                "first": values.iter().take(4).map(|v| format!("{v:.5e}")).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!(rows)
}

fn snapshot(method: &str, configure: impl Fn(&mut fusechat::core::merge::plan::MergeRequest)) {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, t) = model_set(&tmp.path().join("set"), 2, DType::BF16);
    let out = tmp.path().join("out");
    let models: Vec<&Path> = if models_for(method) == 1 {
        vec![&t[0]]
    } else {
        vec![&t[0], &t[1]]
    };
    let base = if matches!(method, "linear" | "karcher" | "passthrough") {
        None
    } else {
        Some(pivot.as_path())
    };
    let mut r = request(method, base, &models, &out);
    r.seed = 1234;
    configure(&mut r);
    merge(&r);
    insta::assert_yaml_snapshot!(format!("merge_{method}"), summary(&out));
}

#[test]
fn linear() {
    snapshot("linear", |r| set_model(r, 1, "weight", json!(3.0)));
}

#[test]
fn slerp() {
    snapshot("slerp", |r| set(r, "t", json!([0.0, 0.5, 1.0])));
}

#[test]
fn task_arithmetic() {
    snapshot("task_arithmetic", |r| {
        set_model(r, 0, "weight", json!(0.25));
        set_model(r, 1, "weight", json!(0.5));
        set(r, "normalize", json!(true));
    });
}

#[test]
fn ties() {
    snapshot("ties", |r| set(r, "density", json!(0.5)));
}

#[test]
fn dare_linear() {
    snapshot("dare_linear", |r| set(r, "density", json!(0.5)));
}

#[test]
fn dare_ties() {
    snapshot("dare_ties", |r| {
        set(r, "density", json!(0.5));
        set(r, "rescale", json!("inverse_p"));
    });
}

#[test]
fn sce() {
    snapshot("sce", |r| set(r, "select_topk", json!(0.5)));
}

#[test]
fn varm() {
    snapshot("varm", |_| {});
}

#[test]
fn varm_layer_granularity() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, t) = model_set(&tmp.path().join("set"), 2, DType::BF16);
    let out = tmp.path().join("out");
    let mut r = request("varm", Some(&pivot), &[&t[0], &t[1]], &out);
    set(&mut r, "granularity", json!("layer"));
    set(&mut r, "statistic", json!("abs"));
    merge(&r);
    insta::assert_yaml_snapshot!("merge_varm_layer_abs", summary(&out));
}

#[test]
fn breadcrumbs() {
    snapshot("breadcrumbs", |r| {
        set(r, "density", json!(0.5));
        set(r, "gamma", json!(0.1));
    });
}

#[test]
fn breadcrumbs_ties() {
    snapshot("breadcrumbs_ties", |r| {
        set(r, "density", json!(0.5));
        set(r, "gamma", json!(0.1));
        set(r, "normalize", json!(true));
    });
}

#[test]
fn della() {
    snapshot("della", |r| set(r, "density", json!(0.5)));
}

#[test]
fn della_linear() {
    snapshot("della_linear", |r| {
        set(r, "density", json!(0.4));
        set(r, "epsilon", json!(0.2));
    });
}

#[test]
fn model_stock() {
    snapshot("model_stock", |_| {});
}

#[test]
fn nuslerp() {
    snapshot("nuslerp", |r| {
        set_model(r, 1, "weight", json!(3.0));
        set(r, "nuslerp_flatten", json!(false));
    });
}

#[test]
fn multislerp() {
    snapshot("multislerp", |r| set_model(r, 1, "weight", json!(2.0)));
}

#[test]
fn karcher() {
    snapshot("karcher", |_| {});
}

#[test]
fn passthrough() {
    snapshot("passthrough", |r| {
        set(
            r,
            "scale",
            json!([{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]),
        )
    });
}

#[test]
fn nearswap() {
    snapshot("nearswap", |r| set(r, "t", json!(0.01)));
}

#[test]
fn arcee_fusion() {
    snapshot("arcee_fusion", |_| {});
}

#[test]
fn ram() {
    snapshot("ram", |r| set(r, "epsilon", json!(0.01)));
}

#[test]
fn ramplus_tl() {
    snapshot("ramplus_tl", |r| {
        set(r, "epsilon", json!(0.01));
        set(r, "r", json!(0.5));
        set(r, "alpha", json!(0.3));
    });
}
