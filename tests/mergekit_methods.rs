//! The methods fusechat shares with mergekit beyond the task-arithmetic core:
//! each checked against an independent computation written out here (full
//! sorts, f64, the textbook formula), not by calling the kernels.

mod common;
use common::*;
use fusechat::core::io::dtype::DType;
use fusechat::core::merge::params::{ResolvedParams, Scalar};
use fusechat::core::merge::plan::{SliceModel, SliceSource};
use fusechat::core::merge::{Merger, TensorGroup};
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

fn delta(model: &Path, base: &[f32], name: &str) -> Vec<f64> {
    tensor(model, name)
        .iter()
        .zip(base)
        .map(|(x, b)| *x as f64 - *b as f64)
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

/// Breadcrumbs written out: sort |δ| ascending (stable), keep ranks [n_bot, N − n_top).
fn breadcrumbs_ref(d: &[f64], density: f64, gamma: f64) -> Vec<f64> {
    let n = d.len();
    let target = (density * n as f64) as usize;
    let mut top = (gamma * n as f64) as usize;
    let bot = if n < target + top {
        top = n - target;
        0
    } else {
        n - target - top
    };
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| d[a].abs().partial_cmp(&d[b].abs()).unwrap().then(b.cmp(&a)));
    let mut out = vec![0.0; n];
    for &i in &idx[bot..n - top] {
        out[i] = d[i];
    }
    out
}

#[test]
fn breadcrumbs_and_breadcrumbs_ties_match_a_full_sort() {
    let (tmp, pivot, t) = setup(2);
    let w = [1.0, 0.5];
    for (method, ties) in [("breadcrumbs", false), ("breadcrumbs_ties", true)] {
        let out = tmp.path().join(method);
        let mut r = request(method, Some(&pivot), &refs(&t), &out);
        set(&mut r, "density", json!(0.5));
        set(&mut r, "gamma", json!(0.1));
        for (i, wi) in w.iter().enumerate() {
            set_model(&mut r, i, "weight", json!(wi));
        }
        merge(&r);
        for (name, _, base) in tensors(&pivot) {
            let ds: Vec<Vec<f64>> = t
                .iter()
                .map(|m| breadcrumbs_ref(&delta(m, &base, &name), 0.5, 0.1))
                .collect();
            let want: Vec<f64> = (0..base.len())
                .map(|k| {
                    let u: Vec<f64> = (0..2).map(|j| w[j] * ds[j][k]).collect();
                    let mixed: f64 = if ties {
                        let s = if u.iter().sum::<f64>() >= 0.0 {
                            1.0
                        } else {
                            -1.0
                        };
                        u.iter().filter(|x| **x * s > 0.0).sum()
                    } else {
                        u.iter().sum()
                    };
                    base[k] as f64 + mixed
                })
                .collect();
            close(
                &tensor(&out, &name),
                &want,
                1e-6,
                &format!("{method} {name}"),
            );
        }
    }
}

#[test]
fn breadcrumbs_keeps_the_largest_when_no_outlier_is_dropped() {
    // int(0.01·8) = 0 outliers: the 4 largest of 8 stay (mergekit keeps none here).
    let mut p = ResolvedParams::default();
    p.shared.insert("normalize".into(), Scalar::Bool(false));
    p.shared.insert("lambda".into(), Scalar::Float(1.0));
    p.shared
        .insert("rescale".into(), Scalar::Str("none".into()));
    p.per_model = vec![[
        ("weight".to_string(), Scalar::Float(1.0)),
        ("density".to_string(), Scalar::Float(0.5)),
        ("gamma".to_string(), Scalar::Float(0.01)),
    ]
    .into()];
    let g = TensorGroup {
        name: "w",
        layer: None,
        shape: &[8],
        base: Some(vec![0.0; 8].into()),
        models: vec![vec![0.1, -0.8, 0.3, 0.05, -0.2, 0.6, -0.01, 0.4].into()],
        params: &p,
        seed: 0,
        scope_stats: None,
    };
    let m = fusechat::plugins::merge::breadcrumbs::BREADCRUMBS;
    let got = m.merge(g).unwrap().data;
    assert_eq!(&*got, &[0.0, -0.8, 0.3, 0.0, 0.0, 0.6, 0.0, 0.4][..]);
}

fn della_group<'a>(
    p: &'a ResolvedParams,
    rows: usize,
    cols: usize,
    shape: &'a [usize],
    seed: u64,
) -> TensorGroup<'a> {
    // row r, column c: |δ| grows with c, so the rank of an element is its column
    let d: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let c = (i % cols) as f32 + 1.0;
            if i % 2 == 0 {
                c
            } else {
                -c
            }
        })
        .collect();
    TensorGroup {
        name: "model.layers.0.mlp.up_proj.weight",
        layer: Some(0),
        shape,
        base: Some(vec![0.0; rows * cols].into()),
        models: vec![d.into()],
        params: p,
        seed,
        scope_stats: None,
    }
}

fn della_params(rescale: &str) -> ResolvedParams {
    let mut p = ResolvedParams::default();
    p.shared.insert("normalize".into(), Scalar::Bool(false));
    p.shared.insert("lambda".into(), Scalar::Float(1.0));
    p.shared
        .insert("rescale".into(), Scalar::Str(rescale.into()));
    p.per_model = vec![[
        ("weight".to_string(), Scalar::Float(1.0)),
        ("density".to_string(), Scalar::Float(0.5)),
        ("epsilon".to_string(), Scalar::Float(0.3)),
    ]
    .into()];
    p
}

/// MAGPRUNE keeps the element of rank r (of n in its row) with probability
/// 0.2 + 0.6·(r−1)/(n−1) at density 0.5, epsilon 0.3: about 0.2 for the
/// smallest column and 0.8 for the largest, 0.5 overall; `inverse_p` divides
/// each kept value by its own probability, `l1` restores the L1 norm.
#[test]
fn della_keeps_by_magnitude_rank_and_rescales() {
    let (rows, cols) = (4000, 11);
    let shape = [rows, cols];
    let p = della_params("inverse_p");
    let m = fusechat::plugins::merge::della_linear::DELLA_LINEAR;
    let got = m
        .merge(della_group(&p, rows, cols, &shape, 3))
        .unwrap()
        .data;
    for c in 0..cols {
        let prob = 0.2 + 0.6 * c as f64 / (cols - 1) as f64;
        let kept: Vec<f32> = (0..rows)
            .map(|r| got[r * cols + c])
            .filter(|x| *x != 0.0)
            .collect();
        let frac = kept.len() as f64 / rows as f64;
        // 4000 draws: the standard error is below 0.008
        assert!(
            (frac - prob).abs() < 0.035,
            "column {c}: kept {frac}, want {prob}"
        );
        let want = (c as f64 + 1.0) / prob;
        assert!(
            kept.iter()
                .all(|x| (x.abs() as f64 - want).abs() < 1e-4 * want),
            "column {c}"
        );
    }
    let p = della_params("l1");
    let got = m
        .merge(della_group(&p, rows, cols, &shape, 3))
        .unwrap()
        .data;
    let l1_before: f64 = (0..rows * cols).map(|i| (i % cols) as f64 + 1.0).sum();
    let l1_after: f64 = got.iter().map(|x| x.abs() as f64).sum();
    assert!((l1_after - l1_before).abs() < 1e-4 * l1_before);
    // the same seed draws the same mask; another seed another one
    let again = m
        .merge(della_group(&p, rows, cols, &shape, 3))
        .unwrap()
        .data;
    assert_eq!(&*got, &*again);
    let other = m
        .merge(della_group(&p, rows, cols, &shape, 4))
        .unwrap()
        .data;
    assert_ne!(&*got, &*other);
}

/// density ± epsilon outside (0, 1) on some tensors (a density gradient) is
/// refused by the planner, before anything runs, naming the parameter.
#[test]
fn della_refuses_an_epsilon_that_leaves_zero_one_before_compute() {
    let (tmp, pivot, t) = setup(2);
    let mut r = request("della", Some(&pivot), &refs(&t), &tmp.path().join("o"));
    set(&mut r, "density", json!([0.5, 0.9]));
    set(&mut r, "epsilon", json!(0.15));
    let Err(err) = fusechat::core::merge::plan::plan(&r, &fusechat::registry()) else {
        panic!("density 0.9 + epsilon 0.15 ≥ 1 on the last layer should be refused")
    };
    let err = err.to_string();
    assert!(
        err.contains("density ± epsilon")
            && err.contains("model.layers.1.")
            && err.contains("lower epsilon"),
        "{err}"
    );
    // the first layer (density 0.5) is fine: only tensors of the last are named
    assert!(!err.contains("model.layers.0."), "{err}");
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn multislerp_refuses_weights_that_sum_to_zero_before_compute() {
    let (tmp, pivot, t) = setup(2);
    let mut r = request("multislerp", Some(&pivot), &refs(&t), &tmp.path().join("o"));
    set_model(&mut r, 0, "weight", json!(1.0));
    set_model(&mut r, 1, "weight", json!(-1.0));
    let Err(err) = fusechat::core::merge::plan::plan(&r, &fusechat::registry()) else {
        panic!("weights 1 and -1 cannot be normalised")
    };
    assert!(err.to_string().contains("sum to 0"), "{err}");
}

/// Model Stock written out: t from the mean pairwise cosine of the deltas.
fn model_stock_ref(base: &[f32], ds: &[Vec<f64>], rows: usize) -> Vec<f64> {
    let n = ds.len() as f64;
    let cols = base.len() / rows;
    let mut out = vec![0.0; base.len()];
    for r in 0..rows {
        let sp = r * cols..(r + 1) * cols;
        let mut cos = Vec::new();
        for i in 0..ds.len() {
            for j in i + 1..ds.len() {
                let (a, b) = (&ds[i][sp.clone()], &ds[j][sp.clone()]);
                let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
                // mergekit 0.1.5: the product of the norms is clamped at 1e-6
                cos.push((dot / (norm(a) * norm(b)).max(1e-6)).clamp(-1.0, 1.0));
            }
        }
        let c = cos.iter().sum::<f64>() / cos.len() as f64;
        let t = n * c / (1.0 + (n - 1.0) * c);
        for k in sp {
            let avg = ds.iter().map(|d| d[k]).sum::<f64>() / n;
            out[k] = base[k] as f64 + t * avg;
        }
    }
    out
}

#[test]
fn model_stock_matches_the_formula_per_tensor_and_per_row() {
    let (tmp, pivot, t) = setup(3);
    for filter_wise in [false, true] {
        let out = tmp.path().join(format!("ms-{filter_wise}"));
        let mut r = request("model_stock", Some(&pivot), &refs(&t), &out);
        set(&mut r, "filter_wise", json!(filter_wise));
        merge(&r);
        for (name, shape, base) in tensors(&pivot) {
            let ds: Vec<Vec<f64>> = t.iter().map(|m| delta(m, &base, &name)).collect();
            let rows = if filter_wise && shape.len() >= 2 {
                shape[0]
            } else {
                1
            };
            let want = model_stock_ref(&base, &ds, rows);
            close(
                &tensor(&out, &name),
                &want,
                1e-6,
                &format!("filter_wise={filter_wise} {name}"),
            );
        }
    }
}

/// The textbook SLERP of two vectors at t, lerp when sin θ is ~0.
fn slerp_ref(t: f64, a: &[f64], b: &[f64]) -> Vec<f64> {
    let c =
        (a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))).clamp(-1.0, 1.0);
    let th = c.acos();
    if th.sin().abs() < 1e-8 {
        return a
            .iter()
            .zip(b)
            .map(|(x, y)| (1.0 - t) * x + t * y)
            .collect();
    }
    let (s0, s1) = (((1.0 - t) * th).sin() / th.sin(), (t * th).sin() / th.sin());
    a.iter().zip(b).map(|(x, y)| s0 * x + s1 * y).collect()
}

#[test]
fn nuslerp_matches_slerp_of_models_rows_columns_and_task_vectors() {
    let (tmp, pivot, t) = setup(2);
    // weights 1 and 3: t = 3/4
    for (flatten, row_wise, with_base) in [
        (true, false, false),
        (false, false, false),
        (false, true, false),
        (true, false, true),
    ] {
        let out = tmp
            .path()
            .join(format!("nu-{flatten}-{row_wise}-{with_base}"));
        let base_dir = with_base.then_some(pivot.as_path());
        let mut r = request("nuslerp", base_dir, &refs(&t), &out);
        set_model(&mut r, 0, "weight", json!(1.0));
        set_model(&mut r, 1, "weight", json!(3.0));
        set(&mut r, "nuslerp_flatten", json!(flatten));
        set(&mut r, "nuslerp_row_wise", json!(row_wise));
        merge(&r);
        for (name, shape, base) in tensors(&pivot) {
            let zero = vec![0f32; base.len()];
            let b = if with_base { &base } else { &zero };
            let (x, y) = (delta(&t[0], b, &name), delta(&t[1], b, &name));
            let mut want = vec![0.0; x.len()];
            let (outer, len, stride) = if flatten || shape.len() < 2 {
                (1, x.len(), 1)
            } else if row_wise {
                (x.len() / shape[0], shape[0], x.len() / shape[0])
            } else {
                (x.len() / shape[shape.len() - 1], shape[shape.len() - 1], 1)
            };
            for o in 0..outer {
                let at = |k: usize| {
                    if stride == 1 {
                        o * len + k
                    } else {
                        k * stride + o
                    }
                };
                let xs: Vec<f64> = (0..len).map(|k| x[at(k)]).collect();
                let ys: Vec<f64> = (0..len).map(|k| y[at(k)]).collect();
                for (k, v) in slerp_ref(0.75, &xs, &ys).into_iter().enumerate() {
                    want[at(k)] = v + b[at(k)] as f64;
                }
            }
            close(
                &tensor(&out, &name),
                &want,
                1e-5,
                &format!("nuslerp {flatten} {row_wise} {with_base} {name}"),
            );
        }
    }
}

/// Multi-SLERP's tangent-space average at the weighted mean direction is the
/// weighted mean direction itself: the result is that unit vector times the
/// weighted mean norm (a simplification of mergekit's formula, checked here).
#[test]
fn multislerp_is_the_mean_direction_at_the_mean_norm() {
    let (tmp, pivot, t) = setup(3);
    let w = [1.0, 2.0, 1.0];
    for with_base in [false, true] {
        let out = tmp.path().join(format!("ms-{with_base}"));
        let mut r = request(
            "multislerp",
            with_base.then_some(pivot.as_path()),
            &refs(&t),
            &out,
        );
        for (i, wi) in w.iter().enumerate() {
            set_model(&mut r, i, "weight", json!(wi));
        }
        merge(&r);
        for (name, _, base) in tensors(&pivot) {
            let zero = vec![0f32; base.len()];
            let b = if with_base { &base } else { &zero };
            let xs: Vec<Vec<f64>> = t.iter().map(|m| delta(m, b, &name)).collect();
            let wn: Vec<f64> = w.iter().map(|x| x / 4.0).collect();
            let mut dir = vec![0.0; base.len()];
            for (x, wi) in xs.iter().zip(&wn) {
                let n = norm(x);
                dir.iter_mut().zip(x).for_each(|(d, v)| *d += wi * v / n);
            }
            let dn = norm(&dir);
            let scale: f64 = xs.iter().zip(&wn).map(|(x, wi)| wi * norm(x)).sum();
            let want: Vec<f64> = dir
                .iter()
                .zip(b)
                .map(|(d, bb)| d / dn * scale + *bb as f64)
                .collect();
            close(
                &tensor(&out, &name),
                &want,
                1e-5,
                &format!("multislerp {with_base} {name}"),
            );
        }
    }
}

/// The Karcher mean of two directions is their geodesic midpoint; of three, a
/// point where the weighted log-maps sum to zero.
#[test]
fn karcher_is_the_midpoint_of_two_and_stationary_for_three() {
    let (tmp, _, t) = setup(3);
    let out2 = tmp.path().join("k2");
    merge(&request("karcher", None, &[&t[0], &t[1]], &out2));
    let out3 = tmp.path().join("k3");
    let mut r = request("karcher", None, &refs(&t), &out3);
    set(&mut r, "max_iter", json!(200));
    set(&mut r, "tol", json!(1e-9));
    merge(&r);
    for (name, _, _) in tensors(&t[0]) {
        let xs: Vec<Vec<f64>> = t
            .iter()
            .map(|m| tensor(m, &name).iter().map(|x| *x as f64).collect())
            .collect();
        let us: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| x.iter().map(|v| v / norm(x)).collect())
            .collect();
        let mid = slerp_ref(0.5, &us[0], &us[1]);
        let s2 = (norm(&xs[0]) + norm(&xs[1])) / 2.0;
        let want: Vec<f64> = mid.iter().map(|v| v * s2).collect();
        close(
            &tensor(&out2, &name),
            &want,
            1e-5,
            &format!("karcher of two {name}"),
        );

        let got: Vec<f64> = tensor(&out3, &name).iter().map(|x| *x as f64).collect();
        let s3 = xs.iter().map(|x| norm(x)).sum::<f64>() / 3.0;
        assert!(
            (norm(&got) - s3).abs() < 1e-5 * s3,
            "{name}: norm {} vs {s3}",
            norm(&got)
        );
        let m: Vec<f64> = got.iter().map(|v| v / norm(&got)).collect();
        let mut grad = vec![0.0; m.len()];
        for u in &us {
            let c: f64 = u
                .iter()
                .zip(&m)
                .map(|(a, b)| a * b)
                .sum::<f64>()
                .clamp(-1.0, 1.0);
            let th = c.acos();
            if th > 1e-12 {
                grad.iter_mut()
                    .zip(u.iter().zip(&m))
                    .for_each(|(g, (uu, mm))| *g += th / th.sin() * (uu - c * mm) / 3.0);
            }
        }
        assert!(norm(&grad) < 1e-5, "{name}: gradient norm {}", norm(&grad));
    }
}

/// SOLAR-style depth up-scaling: layers [0, 2) of one model and [1, 2) of
/// another stack into a 3-layer model, copied bit for bit (scaled where asked);
/// the embeddings come from the first slice, the final norm and lm_head from
/// the last (mergekit's rule).
#[test]
fn passthrough_stacks_slices_and_scales() {
    let (tmp, _, t) = setup(2);
    let out = tmp.path().join("stacked");
    let mut r = request("passthrough", None, &refs(&t), &out);
    r.slices = vec![
        vec![SliceSource {
            model: SliceModel::Model(0),
            layers: (0, 2),
        }],
        vec![SliceSource {
            model: SliceModel::Model(1),
            layers: (1, 2),
        }],
    ];
    set(
        &mut r,
        "scale",
        json!([{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]),
    );
    merge(&r);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 3);
    for (name, _, got) in tensors(&out) {
        let (src, src_name) = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (l, tail) = rest.split_once('.').unwrap();
                let l: usize = l.parse().unwrap();
                if l < 2 {
                    (&t[0], name.clone())
                } else {
                    (&t[1], format!("model.layers.1.{tail}"))
                }
            }
            // as in mergekit: embeddings from the first slice, the rest from the last
            None if name.contains("embed") => (&t[0], name.clone()),
            None => (&t[1], name.clone()),
        };
        let s = if name.contains("o_proj") { 0.5 } else { 1.0 };
        let want: Vec<f32> = tensor(src, &src_name).iter().map(|x| x * s).collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn nearswap_matches_the_elementwise_formula() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("ns");
    let mut r = request("nearswap", Some(&pivot), &[&t[0]], &out);
    set(&mut r, "t", json!(0.004));
    merge(&r);
    let mut partial = 0;
    for (name, _, v0) in tensors(&pivot) {
        let v1 = tensor(&t[0], &name);
        let want: Vec<f64> = v0
            .iter()
            .zip(&v1)
            .map(|(a, b)| {
                let (a, b) = (*a as f64, *b as f64);
                let d = (a - b).abs();
                let w = if d == 0.0 { 1.0 } else { (0.004 / d).min(1.0) };
                partial += (w < 1.0) as usize;
                w * b + (1.0 - w) * a
            })
            .collect();
        close(
            &tensor(&out, &name),
            &want,
            1e-6,
            &format!("nearswap {name}"),
        );
    }
    assert!(
        partial > 0,
        "the threshold should leave some elements between the models"
    );
}

#[test]
fn nearswap_refuses_a_threshold_of_zero_before_compute() {
    let (tmp, pivot, t) = setup(1);
    let mut r = request("nearswap", Some(&pivot), &[&t[0]], &tmp.path().join("o"));
    set(&mut r, "t", json!(0.0));
    let err = fusechat::core::merge::plan::plan(&r, &fusechat::registry())
        .err()
        .expect("t = 0 is refused")
        .to_string();
    assert!(err.contains("`t`"), "{err}");
}

#[test]
fn arcee_fusion_takes_the_model_where_importance_is_an_outlier() {
    let (tmp, pivot, t) = setup(1);
    let out = tmp.path().join("af");
    merge(&request("arcee_fusion", Some(&pivot), &[&t[0]], &out));
    let mut taken = 0;
    for (name, shape, base) in tensors(&pivot) {
        let model = tensor(&t[0], &name);
        let cols = *shape.last().unwrap();
        let mut imp = vec![0.0; base.len()];
        for r in 0..base.len() / cols {
            let sp = r * cols..(r + 1) * cols;
            let sm = |v: &[f32]| -> Vec<f64> {
                let z: f64 = v.iter().map(|x| (*x as f64).exp()).sum();
                v.iter().map(|x| (*x as f64).exp() / z + 1e-8).collect()
            };
            let (p, q) = (sm(&model[sp.clone()]), sm(&base[sp.clone()]));
            let kl: f64 = p.iter().zip(&q).map(|(a, b)| a * (a / b).ln()).sum();
            for k in sp {
                imp[k] = (model[k] as f64 - base[k] as f64).abs() * kl;
            }
        }
        let mut sorted = imp.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |f: f64| sorted[(f * (sorted.len() - 1) as f64) as usize];
        let thr = q(0.5) + 1.5 * (q(0.75) - q(0.25));
        let got = tensor(&out, &name);
        for k in 0..base.len() {
            // an element within rounding of the threshold may go either way
            if (imp[k] - thr).abs() < 1e-6 * thr.abs().max(1e-30) {
                continue;
            }
            // θ⁰ + (θ¹ − θ⁰)·mask, in f32 as mergekit writes it
            let want = if imp[k] >= thr {
                base[k] + (model[k] - base[k])
            } else {
                base[k]
            };
            taken += (imp[k] >= thr) as usize;
            assert_eq!(got[k], want, "{name}[{k}]");
        }
    }
    assert!(taken > 0, "some elements should be outliers");
}

/// SOLAR's depth up-scaling as a mergekit YAML: one model's layers [0, 2) and
/// [1, 2) (the same model twice) stack into 3 layers.
#[test]
fn depth_up_scaling_from_a_mergekit_yaml() {
    let (tmp, _, t) = setup(1);
    let yaml = format!(
        "slices:\n  - sources:\n      - model: {m}\n        layer_range: [0, 2]\n  - sources:\n      - model: {m}\n        layer_range: [1, 2]\nmerge_method: passthrough\ndtype: float32\n",
        m = t[0].display()
    );
    let out = tmp.path().join("dus");
    let (r, warnings) = fusechat::core::merge::mergekit::parse(
        &yaml,
        Path::new("dus.yml"),
        out.clone(),
        tmp.path(),
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    merge(&r);
    let names: Vec<String> = tensors(&out).into_iter().map(|(n, _, _)| n).collect();
    for l in 0..3 {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(&format!("model.layers.{l}."))),
            "layer {l}: {names:?}"
        );
    }
    for (name, _, got) in tensors(&out) {
        let src = name.replace("model.layers.2.", "model.layers.1.");
        assert_eq!(got, tensor(&t[0], &src), "{name}");
    }
}

/// RAM and RAM+ written out in f64 from mergekit 0.1.5's definition: a model
/// contributes where |δ| > ε; a lone contributor's δ (times λⱼ for RAM+) is
/// taken, several contributors' δ are averaged.
#[test]
fn ram_and_ramplus_take_lone_deltas_and_average_shared_ones() {
    let (tmp, pivot, t) = setup(2);
    let (eps, r, alpha) = (0.02, 0.5, 0.3);
    for plus in [false, true] {
        let method = if plus { "ramplus_tl" } else { "ram" };
        let out = tmp.path().join(method);
        let mut req = request(method, Some(&pivot), &refs(&t), &out);
        set(&mut req, "epsilon", json!(eps));
        if plus {
            set(&mut req, "r", json!(r));
            set(&mut req, "alpha", json!(alpha));
        }
        merge(&req);
        let (mut lone, mut shared_seen, mut none) = (0, 0, 0);
        for (name, _, base) in tensors(&pivot) {
            let ds: Vec<Vec<f64>> = t.iter().map(|m| delta(m, &base, &name)).collect();
            let on = |j: usize, k: usize| ds[j][k].abs() > eps;
            let count: Vec<usize> = (0..base.len())
                .map(|k| (0..2).filter(|&j| on(j, k)).count())
                .collect();
            let lambda: Vec<f64> = (0..2)
                .map(|j| {
                    if !plus {
                        return 1.0;
                    }
                    let shared = (0..base.len())
                        .filter(|&k| on(j, k) && count[k] > 1)
                        .count() as f64;
                    let unique = (0..base.len())
                        .filter(|&k| on(j, k) && count[k] == 1)
                        .count() as f64;
                    1.0 + r * (shared / unique.max(eps)).clamp(0.0, alpha)
                })
                .collect();
            let want: Vec<f64> = (0..base.len())
                .map(|k| {
                    let merged: f64 = (0..2)
                        .filter(|&j| on(j, k))
                        .map(|j| {
                            if count[k] == 1 {
                                ds[j][k] * lambda[j]
                            } else {
                                ds[j][k] / count[k] as f64
                            }
                        })
                        .sum();
                    base[k] as f64 + merged
                })
                .collect();
            for c in &count {
                match c {
                    0 => none += 1,
                    1 => lone += 1,
                    _ => shared_seen += 1,
                }
            }
            close(
                &tensor(&out, &name),
                &want,
                1e-6,
                &format!("{method} {name}"),
            );
        }
        assert!(
            lone > 0 && shared_seen > 0 && none > 0,
            "{method}: every case occurs ({none}, {lone}, {shared_seen})"
        );
    }
}

/// SCE written out in f64 at the two ends of `select_topk` (the golden tests
/// cover 0.5): at 1 every element counts for the energies, at 0 none does
/// (uniform weights). Then the sign of Σδ, and the weighted mean of the
/// agreeing deltas.
#[test]
fn sce_selecting_every_element_or_none() {
    let (tmp, pivot, t) = setup(3);
    for topk in [1.0, 0.0] {
        let out = tmp.path().join(format!("sce{topk}"));
        let mut req = request("sce", Some(&pivot), &refs(&t), &out);
        set(&mut req, "select_topk", json!(topk));
        merge(&req);
        for (name, _, base) in tensors(&pivot) {
            let ds: Vec<Vec<f64>> = t.iter().map(|m| delta(m, &base, &name)).collect();
            let n = base.len() as f64;
            let energies: Vec<f64> = ds
                .iter()
                .map(|d| {
                    if topk > 0.0 {
                        d.iter().map(|x| x * x).sum::<f64>() / n
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = energies.iter().sum();
            let eta: Vec<f64> = if total.abs() < 1e-6 {
                vec![1.0 / 3.0; 3]
            } else {
                energies.iter().map(|e| e / total).collect()
            };
            let want: Vec<f64> = (0..base.len())
                .map(|k| {
                    let sign = if ds.iter().map(|d| d[k]).sum::<f64>() >= 0.0 {
                        1.0
                    } else {
                        -1.0
                    };
                    let (mut num, mut den) = (0.0, 0.0);
                    for (d, e) in ds.iter().zip(&eta) {
                        if d[k] * sign > 0.0 {
                            num += e * d[k];
                            den += e;
                        }
                    }
                    base[k] as f64 + num / f64::max(den, 1e-6)
                })
                .collect();
            close(
                &tensor(&out, &name),
                &want,
                1e-5,
                &format!("sce {topk} {name}"),
            );
        }
    }
}
