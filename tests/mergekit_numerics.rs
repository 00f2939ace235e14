//! `numerics = "mergekit"`: the task-arithmetic family computed in bf16 one
//! operation at a time, as mergekit 0.1.5 computes a `dtype: bfloat16` merge.
//!
//! The expected values are mergekit's: its `sparsify` and the body of its
//! `GeneralizedTaskArithmeticMerge.merge_group`, run in PyTorch on these
//! bf16 inputs (scripts/compare_mergekit.py checks whole models the same way).

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::merge::params::{ResolvedParams, Scalar};
use fusechat::core::merge::plan::Numerics;
use fusechat::core::merge::{Merger, TensorGroup};
use fusechat::plugins::merge::gta::Gta;
use fusechat::plugins::merge::{task_arithmetic::TASK_ARITHMETIC, ties::TIES};
use serde_json::json;

const BASE: [f32; 12] = [
    0.040283203125,
    0.00872802734375,
    0.00445556640625,
    -0.0306396484375,
    0.0023040771484375,
    -0.068359375,
    0.016845703125,
    0.050537109375,
    -0.07177734375,
    0.048828125,
    0.026123046875,
    0.06201171875,
];
const X1: [f32; 12] = [
    0.03759765625,
    0.0096435546875,
    0.005706787109375,
    -0.0308837890625,
    0.005096435546875,
    -0.06591796875,
    0.018310546875,
    0.050048828125,
    -0.07373046875,
    0.045654296875,
    0.0283203125,
    0.0625,
];
const X2: [f32; 12] = [
    0.0390625,
    0.0091552734375,
    0.000904083251953125,
    -0.029052734375,
    -0.002044677734375,
    -0.0703125,
    0.017333984375,
    0.0498046875,
    -0.0703125,
    0.048828125,
    0.0301513671875,
    0.06640625,
];

fn params(
    weights: [f64; 2],
    density: [f64; 2],
    normalize: bool,
    lambda: f64,
    rescale: &str,
    round: Option<DType>,
) -> ResolvedParams {
    let mut p = ResolvedParams::default();
    p.shared.insert("normalize".into(), Scalar::Bool(normalize));
    p.shared.insert("lambda".into(), Scalar::Float(lambda));
    p.shared
        .insert("rescale".into(), Scalar::Str(rescale.into()));
    p.per_model = (0..2)
        .map(|i| {
            [
                ("weight".to_string(), Scalar::Float(weights[i])),
                ("density".to_string(), Scalar::Float(density[i])),
            ]
            .into()
        })
        .collect();
    p.round_ops = round;
    p
}

fn run(m: &Gta, p: &ResolvedParams) -> Vec<f32> {
    let g = TensorGroup {
        name: "w",
        layer: None,
        shape: &[12],
        base: Some(BASE.to_vec().into()),
        models: vec![X1.to_vec().into(), X2.to_vec().into()],
        params: p,
        seed: 0,
        scope_stats: None,
    };
    let out = m.merge(g).unwrap().data.to_vec();
    // a bf16 merge writes bf16: compare what would be written
    out.iter().map(|x| DType::BF16.round(*x)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn task_arithmetic_rounds_after_every_operation() {
    let p = params([0.3, 0.7], [1.0, 1.0], true, 0.5, "none", Some(DType::BF16));
    let want = [
        0.03955078125,
        0.009033203125,
        0.0034027099609375,
        -0.0301513671875,
        0.0012054443359375,
        -0.06884765625,
        0.0172119140625,
        0.05029296875,
        -0.07177734375,
        0.04833984375,
        0.02783203125,
        0.0634765625,
    ];
    assert_eq!(bits(&run(&TASK_ARITHMETIC, &p)), bits(&want));
    // fusechat's default (f32, rounded once) differs in element 4, and is closer
    // to the exact value: 0.0023040771 + 0.5·(0.3·0.0027923584 − 0.7·0.0043487549)
    // = 0.0011990356, against 0.00119781494 (f32) and 0.00120544434 (bf16 ops)
    let p = params([0.3, 0.7], [1.0, 1.0], true, 0.5, "none", None);
    let f = run(&TASK_ARITHMETIC, &p);
    assert_eq!(f[4], 0.00119781494140625);
    assert_eq!(bits(&f[..4]), bits(&want[..4]));
    assert_eq!(bits(&f[5..]), bits(&want[5..]));
}

#[test]
fn ties_rounds_after_every_operation() {
    let p = params([1.0, 0.6], [0.5, 0.5], true, 1.0, "none", Some(DType::BF16));
    let want = [
        0.03759765625,
        0.00872802734375,
        0.0009002685546875,
        -0.029052734375,
        0.005096435546875,
        -0.06591796875,
        0.016845703125,
        0.050537109375,
        -0.07373046875,
        0.045654296875,
        0.029052734375,
        0.06640625,
    ];
    assert_eq!(bits(&run(&TIES, &p)), bits(&want));
}

#[test]
fn ties_with_l1_rescale_rounds_the_norms_and_their_ratio() {
    let p = params(
        [0.25, 0.5],
        [0.5, 0.75],
        false,
        1.0,
        "true",
        Some(DType::BF16),
    );
    let want = [
        0.038818359375,
        0.00872802734375,
        0.0026092529296875,
        -0.02978515625,
        4.57763671875e-05,
        -0.0693359375,
        0.016845703125,
        0.050048828125,
        -0.07080078125,
        0.0478515625,
        0.0289306640625,
        0.064453125,
    ];
    assert_eq!(bits(&run(&TIES, &p)), bits(&want));
}

#[test]
fn the_mode_needs_a_dtype_and_a_method_that_has_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, t) = model_set(&tmp.path().join("set"), 1, DType::BF16);
    let problems = |method: &str, dtype: Option<DType>| -> String {
        let mut r = request(method, Some(&pivot), &[&t[0]], &tmp.path().join("o"));
        r.numerics = Numerics::Mergekit;
        r.dtype = dtype;
        if method == "slerp" {
            set(&mut r, "t", json!(0.5));
        }
        match fusechat::core::merge::plan::plan(&r, &fusechat::registry()) {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        }
    };
    let err = problems("task_arithmetic", None);
    assert!(err.contains("set `dtype`"), "{err}");
    let err = problems("slerp", Some(DType::BF16));
    assert!(
        err.contains("`slerp` has no numerics = \"mergekit\" mode") && err.contains("ties"),
        "{err}"
    );
    assert_eq!(problems("ties", Some(DType::BF16)), "");
}

/// A whole bf16 merge in both modes: they differ, mergekit's mode matches the
/// op-by-op reference on every tensor, and the default mode is at least as
/// close to the exact (f64) value on average.
#[test]
fn whole_merges_in_both_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let (pivot, t) = model_set(&tmp.path().join("set"), 2, DType::BF16);
    let mut outs = Vec::new();
    for (i, numerics) in [Numerics::Fusechat, Numerics::Mergekit]
        .into_iter()
        .enumerate()
    {
        let out = tmp.path().join(format!("o{i}"));
        let mut r = request("task_arithmetic", Some(&pivot), &[&t[0], &t[1]], &out);
        r.dtype = Some(DType::BF16);
        r.numerics = numerics;
        set(&mut r, "normalize", json!(true));
        set(&mut r, "lambda", json!(0.5));
        set_model(&mut r, 0, "weight", json!(0.3));
        set_model(&mut r, 1, "weight", json!(0.7));
        merge(&r);
        outs.push(out);
    }
    let r = |x: f32| DType::BF16.round(x);
    let (mut err_default, mut err_mergekit, mut differ) = (0f64, 0f64, 0usize);
    for (name, _, b) in tensors(&pivot) {
        let (x1, x2) = (tensor(&t[0], &name), tensor(&t[1], &name));
        let (d, m) = (tensor(&outs[0], &name), tensor(&outs[1], &name));
        for k in 0..b.len() {
            // mergekit's order: δ, δ·w (w rounded), Σ, ÷ Σw, ·λ, + θ⁰
            let (w1, w2) = (r(0.3), r(0.7));
            let u1 = r(r(x1[k] - b[k]) * w1);
            let u2 = r(r(x2[k] - b[k]) * w2);
            let mixed = r(r(r(u1 + u2) / r(w1 + w2)) * 0.5);
            assert_eq!(m[k].to_bits(), r(b[k] + mixed).to_bits(), "{name}[{k}]");
            let exact =
                b[k] as f64 + 0.5 * (0.3 * (x1[k] - b[k]) as f64 + 0.7 * (x2[k] - b[k]) as f64);
            err_default += (d[k] as f64 - exact).abs();
            err_mergekit += (m[k] as f64 - exact).abs();
            differ += (d[k] != m[k]) as usize;
        }
    }
    assert!(differ > 0, "the two modes should differ somewhere");
    assert!(
        err_default <= err_mergekit,
        "{err_default} vs {err_mergekit}"
    );
}
