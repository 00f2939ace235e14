//! `fusechat eval` on the miniature's tiny models: perplexity against an
//! independent computation, exact match against single-row greedy decoding,
//! and MT-Bench against a loopback HTTP server playing the judge.

mod common;

use candle_core::{Device, Tensor};
use fusechat::core::data::conversation;
use fusechat::core::data::repr::loss_positions;
use fusechat::core::data::template::{load_tokenizer, Template};
use fusechat::core::io::dtype::DType;
use fusechat::core::model::generate::{chat_stops, reply, GenOptions};
use fusechat::core::model::LoadOptions;
use fusechat::plugins::models::decoder::Decoder;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn setup(d: &Path) -> PathBuf {
    let set =
        fusechat::core::pipeline::miniature::generate(&common::spec(1, DType::F32), &d.join("m"))
            .unwrap();
    set.pivot
}

fn run(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_fusechat"));
    c.args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .env("HOME", cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn results(out: &Path) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    v["results"].as_array().unwrap().clone()
}

fn value(rows: &[Value], model: &str, metric: &str, category: Option<&str>) -> (f64, u64) {
    let r = rows
        .iter()
        .find(|r| {
            r["model"] == model && r["metric"] == metric && r["category"].as_str() == category
        })
        .unwrap_or_else(|| panic!("no row {model} {metric} {category:?} in {rows:?}"));
    (r["value"].as_f64().unwrap(), r["n"].as_u64().unwrap())
}

fn write_jsonl(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// The miniature's conversations, each tagged with a category.
fn categorised(d: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(d.join("m/conversations.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .take(n)
        .enumerate()
        .map(|(i, l)| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["category"] = json!(if i % 3 == 0 { "alpha" } else { "beta" });
            v
        })
        .collect();
    let p = d.join("held_out.jsonl");
    write_jsonl(&p, &lines);
    p
}

#[test]
fn perplexity_is_the_token_mean_ce_of_an_independent_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pivot = setup(d);
    let data = categorised(d, 7);
    let args = [
        "eval",
        "--model",
        "m/pivot",
        "--evaluator",
        "perplexity",
        "--data",
        "held_out.jsonl",
        "--out",
        "ev",
        "--set",
        "batch_size=3",
    ];
    let o = run(d, &[&args[..], &["--no-progress"]].concat(), &[]);
    let text = common::ok(&o);
    assert!(
        text.contains("ev/eval.json") && text.contains("ev/eval.png"),
        "{text}"
    );
    for f in ["eval.json", "eval.md", "eval.png", "eval.svg"] {
        assert!(d.join("ev").join(f).metadata().unwrap().len() > 100, "{f}");
    }
    // Independently: one record at a time, full logits, log-softmax in f64.
    let model = Decoder::load(&pivot, &LoadOptions::default(), None).unwrap();
    let tok = load_tokenizer(&pivot).unwrap();
    let template = Template::load("openchat", &pivot).unwrap();
    let mut sums: BTreeMap<Option<String>, (f64, u64)> = BTreeMap::new();
    for c in conversation::load(&data, false).unwrap().records {
        let e = template.encode(&tok, &c, 2048).unwrap();
        let l = e.ids.len();
        let ids = Tensor::from_vec(e.ids.clone(), (1, l), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, l), candle_core::DType::U32, &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&ids, &mask)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        for t in loss_positions(&e.labels) {
            let row = &logits[t];
            let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let nll = lse - row[e.ids[t + 1] as usize] as f64;
            for key in [None, c.category.clone()] {
                let s = sums.entry(key).or_default();
                s.0 += nll;
                s.1 += 1;
            }
        }
    }
    let rows = results(&d.join("ev"));
    for (cat, (sum, n)) in &sums {
        let (ce, got_n) = value(&rows, "pivot", "ce", cat.as_deref());
        let (ppl, _) = value(&rows, "pivot", "perplexity", cat.as_deref());
        let want = sum / *n as f64;
        assert_eq!(got_n, *n, "{cat:?}: token count");
        assert!(
            (ce - want).abs() < 1e-5 * want.max(1.0),
            "{cat:?}: ce {ce} vs {want}"
        );
        assert!(
            (ppl - want.exp()).abs() < 1e-4 * want.exp(),
            "{cat:?}: perplexity {ppl}"
        );
    }
    assert_eq!(sums.len(), 3, "overall, alpha and beta");
    // Up to date on a rerun; --force recomputes the same numbers.
    let again = common::ok(&run(d, &args, &[]));
    assert!(again.contains("up to date"), "{again}");
    common::ok(&run(d, &[&args[..], &["--force"]].concat(), &[]));
    assert_eq!(results(&d.join("ev")), rows);
}

#[test]
fn exact_match_compares_batched_greedy_answers_after_normalising() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pivot = setup(d);
    // Greedy answers computed one prompt at a time, without batching.
    let model = Decoder::load(&pivot, &LoadOptions::default(), None).unwrap();
    let tok = load_tokenizer(&pivot).unwrap();
    let template = Template::load("openchat", &pivot).unwrap();
    let opts = GenOptions {
        max_new_tokens: 6,
        stop: chat_stops(&model, &tok, Some(&template)),
        ..Default::default()
    };
    let text = std::fs::read_to_string(d.join("m/conversations.jsonl")).unwrap();
    let questions: Vec<String> = text
        .lines()
        .take(6)
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["conversations"][0]["value"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let answers: Vec<String> = questions
        .iter()
        .map(|q| {
            reply(
                &model,
                &tok,
                Some(&template),
                std::slice::from_ref(q),
                &opts,
                |_| {},
            )
            .unwrap()
        })
        .collect();
    assert!(answers.iter().all(|a| !a.is_empty()), "{answers:?}");
    // Golds: exact; upper-cased with trailing punctuation and spaces (right only
    // after normalising); and wrong.
    let golds: Vec<String> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| match i % 3 {
            0 => a.clone(),
            1 => format!("  {}. !", a.to_uppercase()),
            _ => format!("{a} extra"),
        })
        .collect();
    let lines: Vec<Value> = questions
        .iter()
        .zip(&golds)
        .enumerate()
        .map(|(i, (q, g))| {
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": g}],
                   "category": if i < 3 { "first" } else { "second" }})
        })
        .collect();
    write_jsonl(&d.join("em.jsonl"), &lines);
    let eval = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            "m/pivot",
            "--evaluator",
            "exact_match",
            "--data",
            "em.jsonl",
            "--out",
            out,
            "--set",
            "max_new_tokens=6",
            "--set",
            "batch_size=4",
        ];
        args.extend(extra);
        common::ok(&run(d, &args, &[]));
        results(&d.join(out))
    };
    let rows = eval("ev", &[]);
    assert_eq!(value(&rows, "pivot", "accuracy", None), (4.0 / 6.0, 6));
    assert_eq!(
        value(&rows, "pivot", "accuracy", Some("first")),
        (2.0 / 3.0, 3)
    );
    let kept: Vec<Value> = std::fs::read_to_string(d.join("ev/exact_match/pivot.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (k, a) in kept.iter().zip(&answers) {
        assert_eq!(
            k["answer"].as_str().unwrap(),
            a,
            "batched and single-row greedy answers differ"
        );
    }
    // Case and punctuation matter when their options are off.
    let strict = eval("ev2", &["--set", "ignore_case=false"]);
    assert_eq!(value(&strict, "pivot", "accuracy", None).0, 2.0 / 6.0);
    let strict = eval(
        "ev3",
        &["--set", "strip_punctuation=false", "--set", "trim=false"],
    );
    assert_eq!(value(&strict, "pivot", "accuracy", None).0, 2.0 / 6.0);
}

// ---------------------------------------------------------------------------
// MT-Bench with a judge on the loopback.

#[derive(Default)]
struct Seen {
    /// Request bodies, in arrival order.
    bodies: Vec<Value>,
    auth: Vec<String>,
}

/// A judge: replies depend on a marker in the user prompt.
/// `Q429` answers 429 the first time; `Q500` always 500; `QNOSCORE` has no
/// rating; `QSLOW` replies after 1.5 s. `status` forces every reply's status.
fn judge_server(status: Option<u16>) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let s = s.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0;
                let mut auth = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    let lower = l.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if lower.starts_with("authorization:") {
                        auth = l["authorization:".len()..].trim().to_string();
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap();
                let user = body["messages"][1]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let system = body["messages"][0]["content"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let earlier = {
                    let mut g = s.lock().unwrap();
                    let n = g
                        .bodies
                        .iter()
                        .filter(|b| b["messages"][1]["content"] == user)
                        .count();
                    g.bodies.push(body.clone());
                    g.auth.push(auth);
                    n
                };
                let (code, text) = if let Some(c) = status {
                    (c, "denied".to_string())
                } else if user.contains("Q429") && earlier == 0 {
                    (429, "slow down".into())
                } else if user.contains("Q500") {
                    (500, "boom".into())
                } else if user.contains("QSLOW") {
                    std::thread::sleep(Duration::from_millis(1500));
                    (200, "Rating: [[9]]".into())
                } else if user.contains("QHTML") {
                    let page = "<html>not an API</html>";
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                        page.len()
                    );
                    return;
                } else if user.contains("QNOSCORE") {
                    (200, "I cannot rate this.".into())
                } else if system.contains("MULTI") {
                    (200, "Fine. Rating: [[6]]".into())
                } else if system.contains("MATH") {
                    (
                        200,
                        "Matches the reference [7] partly. Rating: [[4.5]]".into(),
                    )
                } else {
                    (200, "Good. Rating: [[8.5]]".into())
                };
                let payload = if code == 200 {
                    json!({"choices": [{"message": {"role": "assistant", "content": text}}]})
                        .to_string()
                } else {
                    json!({"error": {"message": text}}).to_string()
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                    payload.len()
                );
            });
        }
    });
    (url, seen)
}

fn judge_prompts(path: &Path) {
    let p = |name: &str, system: &str, template: &str| {
        json!({"name": name, "type": "single", "system_prompt": system, "prompt_template": template,
               "description": "test", "category": "general", "output_format": "[[rating]]"})
    };
    write_jsonl(
        path,
        &[
            p(
                "single-v1",
                "SINGLE judge",
                "[Question]\n{question}\n[Answer]\n{answer}\n[End]",
            ),
            p(
                "single-math-v1",
                "MATH judge",
                "[Question]\n{question}\n[Reference]\n{ref_answer_1}\n[Answer]\n{answer}",
            ),
            p(
                "single-v1-multi-turn",
                "MULTI judge",
                "{question_1}|{answer_1}|{question_2}|{answer_2}",
            ),
            p(
                "single-math-v1-multi-turn",
                "MULTI MATH judge",
                "{question_1}|{ref_answer_1}|{answer_1}|{question_2}|{ref_answer_2}|{answer_2}",
            ),
        ],
    );
}

const KEY: &str = "sk-test-SECRET-4b1d";

/// `fusechat eval` of mt_bench on the miniature's pivot, into `ev`, with `extra`.
fn mt_bench<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "eval",
        "--model",
        "m/pivot",
        "--evaluator",
        "mt_bench",
        "--data",
        "q.jsonl",
        "--out",
        "ev",
        "--no-progress",
    ];
    a.extend(extra);
    a
}

/// [`mt_bench`] with the loopback judge at `url` and short timeouts.
fn mt_args<'a>(url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = mt_bench(&[
        "--set",
        "max_new_tokens=5",
        "--set",
        "judge_prompts=jp.jsonl",
        "--set",
        "reference_answers=ref.jsonl",
        "--set",
        "judge_model=tiny-judge",
        "--set",
        "judge_key_env=FUSECHAT_TEST_JUDGE_KEY",
        "--set",
        "parallel=3",
        "--set",
        "judge_timeout=0.5",
        "--set",
        "judge_retries=2",
        "--set",
        "judge_backoff=0.01",
    ]);
    a.push("--set");
    a.push(Box::leak(format!("judge_url={url}").into_boxed_str()));
    a.extend(extra);
    a
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn all_text_under(dir: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            s.push_str(&all_text_under(&p));
        } else {
            s.push_str(&String::from_utf8_lossy(&std::fs::read(&p).unwrap()));
        }
    }
    s
}

#[test]
fn mt_bench_writes_fastchats_files_and_judges_through_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    write_jsonl(
        &d.join("q.jsonl"),
        &[
            json!({"question_id": 81, "category": "writing", "turns": ["bika Q429 bole", "then more"]}),
            json!({"question_id": 101, "category": "math", "turns": ["one plus one", "and two"]}),
            json!({"question_id": 102, "category": "reasoning", "turns": ["QNOSCORE riddle", "why"], "reference": ["r1", "r2"]}),
            json!({"question_id": 120, "category": "humanities", "turns": ["Q500 essay", "shorter"]}),
            json!({"question_id": 130, "category": "stem", "turns": ["QSLOW physics"]}),
        ],
    );
    write_jsonl(
        &d.join("ref.jsonl"),
        &[
            json!({"question_id": 101, "answer_id": "x", "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["2", "4"]}], "tstamp": 0.0}),
        ],
    );
    judge_prompts(&d.join("jp.jsonl"));
    let (url, seen) = judge_server(None);
    let env = [("FUSECHAT_TEST_JUDGE_KEY", KEY)];
    let o = run(d, &mt_args(&url, &[]), &env);
    let out = common::ok(&o);

    // Answers: FastChat's fields, sorted by id, both turns where there are two.
    let answers = lines(&d.join("ev/model_answer/pivot.jsonl"));
    let ids: Vec<u64> = answers
        .iter()
        .map(|a| a["question_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [81, 101, 102, 120, 130]);
    for a in &answers {
        let keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
        for k in ["question_id", "answer_id", "model_id", "choices", "tstamp"] {
            assert!(keys.contains(&k), "{k} missing in {a}");
        }
        assert_eq!(a["model_id"], "pivot");
        assert_eq!(a["choices"][0]["index"], 0);
        let n = if a["question_id"] == 130 { 1 } else { 2 };
        assert_eq!(a["choices"][0]["turns"].as_array().unwrap().len(), n);
    }
    let ids: std::collections::HashSet<&str> = answers
        .iter()
        .map(|a| a["answer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "answer ids are unique");

    // Judgments: FastChat's fields in order, the right prompt per turn and category.
    let path = d.join("ev/model_judgment/tiny-judge_single.jsonl");
    let raw = std::fs::read_to_string(&path).unwrap();
    let first = raw.lines().next().unwrap();
    let order = [
        "question_id",
        "model",
        "judge",
        "user_prompt",
        "judgment",
        "score",
        "turn",
        "tstamp",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|k| first.find(&format!("\"{k}\":")).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "field order: {first}");
    let js = lines(&path);
    assert_eq!(js.len(), 9, "two turns of four questions, one of the last");
    let get = |q: u64, turn: u64| {
        js.iter()
            .find(|j| j["question_id"] == q && j["turn"] == turn)
            .unwrap()
            .clone()
    };
    assert_eq!(get(81, 1)["judge"], json!(["tiny-judge", "single-v1"]));
    assert_eq!(get(81, 1)["score"], 8.5, "a 429 is retried");
    assert_eq!(
        get(81, 2)["judge"],
        json!(["tiny-judge", "single-v1-multi-turn"])
    );
    assert_eq!(get(81, 2)["score"], 6.0);
    assert_eq!(
        get(101, 1)["judge"],
        json!(["tiny-judge", "single-math-v1"])
    );
    assert_eq!(get(101, 1)["score"], 4.5, "[[x]] wins over an earlier [x]");
    assert!(
        get(101, 1)["user_prompt"]
            .as_str()
            .unwrap()
            .contains("[Reference]\n2\n"),
        "the reference file's answer"
    );
    assert_eq!(
        get(101, 2)["judge"],
        json!(["tiny-judge", "single-math-v1-multi-turn"])
    );
    assert!(
        get(102, 2)["user_prompt"]
            .as_str()
            .unwrap()
            .contains("|r1|"),
        "the question's own reference"
    );
    assert_eq!(get(102, 1)["score"], -1.0, "no rating in the judgment");
    assert_eq!(get(102, 1)["judgment"], "I cannot rate this.");
    assert_eq!(get(120, 1)["judgment"], "$ERROR$");
    assert_eq!(get(120, 1)["score"], -1.0);
    assert!(get(120, 1)["error"].as_str().unwrap().contains("500"));
    assert_eq!(
        get(130, 1)["judgment"],
        "$ERROR$",
        "a reply past the timeout"
    );
    let t = get(81, 2)["user_prompt"].as_str().unwrap().to_string();
    let a81 = &answers[0]["choices"][0]["turns"];
    assert_eq!(
        t,
        format!(
            "bika Q429 bole|{}|then more|{}",
            a81[0].as_str().unwrap(),
            a81[1].as_str().unwrap()
        )
    );

    // Requests: a 429 is retried once; a 500 and a slow reply are tried three times.
    let (requests, auth) = {
        let g = seen.lock().unwrap();
        let count = |m: &str| {
            g.bodies
                .iter()
                .filter(|b| b["messages"][1]["content"].as_str().unwrap().contains(m))
                .count()
        };
        assert_eq!(count("[Question]\nbika Q429"), 2);
        assert_eq!(count("[Question]\nQ500"), 3);
        assert_eq!(count("QSLOW"), 3);
        for b in &g.bodies {
            assert_eq!(b["model"], "tiny-judge");
            assert_eq!(b["temperature"], 0);
            assert_eq!(b["max_tokens"], 2048);
            assert_eq!(b["messages"][0]["role"], "system");
        }
        (g.bodies.len(), g.auth.clone())
    };
    assert!(
        auth.iter().all(|a| a == &format!("Bearer {KEY}")),
        "{auth:?}"
    );

    // The summary: show_result.py's means, −1 left out.
    let rows = results(&d.join("ev"));
    // Valid: 81 (8.5, 6), 101 (4.5, 6); 102 has no rating in either turn, 120 and 130 failed.
    let (score, n) = value(&rows, "pivot", "score", None);
    assert!((score - 25.0 / 4.0).abs() < 1e-12 && n == 4, "{score} {n}");
    assert_eq!(value(&rows, "pivot", "score_turn1", None), (6.5, 2));
    assert_eq!(value(&rows, "pivot", "score_turn2", None), (6.0, 2));
    assert_eq!(value(&rows, "pivot", "score", Some("math")), (5.25, 2));
    assert_eq!(value(&rows, "pivot", "unscored", None), (5.0, 9));
    assert_eq!(get(102, 2)["score"], -1.0);
    assert_eq!(get(120, 2)["judgment"], "$ERROR$");

    // The key is in no file and no output.
    assert!(!all_text_under(d).contains(KEY) && !out.contains(KEY));

    // The same command again judges only the failed ones (no-score judgments
    // stand, as in FastChat): failures leave the stage not up to date.
    assert!(out.contains("3 judgments of `pivot` failed"), "{out}");
    let out2 = common::ok(&run(d, &mt_args(&url, &[]), &env));
    assert!(!out2.contains(KEY));
    let g = seen.lock().unwrap();
    let new: Vec<&Value> = g.bodies[requests..].iter().collect();
    assert!(
        new.iter().all(|b| {
            let u = b["messages"][1]["content"].as_str().unwrap();
            u.contains("Q500") || u.contains("QSLOW")
        }) && new.len() == 9,
        "{} requests on the rerun",
        new.len()
    );
    assert_eq!(lines(&path).len(), 9, "failed lines replaced, not appended");
}

#[test]
fn judge_failures_that_cannot_succeed_stop_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    write_jsonl(
        &d.join("q.jsonl"),
        &[json!({"question_id": 1, "category": "writing", "turns": ["hello there"]})],
    );
    write_jsonl(&d.join("ref.jsonl"), &[]);
    judge_prompts(&d.join("jp.jsonl"));
    let env = [("FUSECHAT_TEST_JUDGE_KEY", KEY)];
    // A refused key.
    let (url, seen) = judge_server(Some(401));
    let err = common::fails(&run(d, &mt_args(&url, &[]), &env));
    assert!(
        err.contains("401") && err.contains("FUSECHAT_TEST_JUDGE_KEY") && !err.contains(KEY),
        "{err}"
    );
    assert_eq!(seen.lock().unwrap().bodies.len(), 1, "401 is not retried");
    assert!(!all_text_under(d).contains(KEY));
    // A reply that is not the API's JSON fails that judgment only, recorded;
    // a category FastChat has no temperature for is sampled at 0.7, with a warning.
    write_jsonl(
        &d.join("q.jsonl"),
        &[
            json!({"question_id": 1, "category": "writing", "turns": ["hello there"]}),
            json!({"question_id": 2, "category": "poetry", "turns": ["QHTML page"]}),
        ],
    );
    let (url, _) = judge_server(None);
    let o = run(d, &mt_args(&url, &["--force"]), &env);
    let text = common::ok(&o);
    assert!(text.contains("poetry") && text.contains("0.7"), "{text}");
    let js = lines(&d.join("ev/model_judgment/tiny-judge_single.jsonl"));
    let bad = js.iter().find(|j| j["question_id"] == 2).unwrap();
    assert_eq!(bad["judgment"], "$ERROR$");
    assert!(bad["error"].as_str().unwrap().contains("not JSON"), "{bad}");
    assert_eq!(
        value(&results(&d.join("ev")), "pivot", "unscored", None),
        (1.0, 2)
    );
    // Nothing listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}/v1");
    let err = common::fails(&run(
        d,
        &mt_args(&dead, &["--force", "--set", "judge_retries=0"]),
        &env,
    ));
    assert!(
        err.contains("could not be reached") && err.contains("rerun"),
        "{err}"
    );
    // The answers stay for the rerun.
    assert_eq!(lines(&d.join("ev/model_answer/pivot.jsonl")).len(), 2);
}

#[test]
fn bad_mt_bench_input_is_refused_before_any_model_is_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    judge_prompts(&d.join("jp.jsonl"));
    write_jsonl(&d.join("ref.jsonl"), &[]);
    let url = "http://127.0.0.1:9/v1";
    let cases: &[(&[Value], &[&str], &str)] = &[
        (
            &[json!({"question_id": 1, "turns": ["x"]})],
            &[],
            "line 1: needs `category`",
        ),
        (
            &[json!({"question_id": 1, "category": "writing", "turns": []})],
            &[],
            "line 1: needs `turns`",
        ),
        (
            &[
                json!({"question_id": 1, "category": "writing", "turns": ["a"]}),
                json!({"question_id": 1, "category": "writing", "turns": ["b"]}),
            ],
            &[],
            "appears twice",
        ),
        (
            &[json!({"question_id": 7, "category": "math", "turns": ["1+1"]})],
            &[],
            "question 7 (math) is judged against a reference answer",
        ),
        (
            &[json!({"question_id": 1, "category": "writing", "turns": ["a"]})],
            &["--set", "parallel=0"],
            "parallel",
        ),
        (
            &[json!({"question_id": 1, "category": "writing", "turns": ["a"]})],
            &["--set", "judge_prompts=missing.jsonl"],
            "missing.jsonl",
        ),
        (
            &[json!({"question_id": 1, "category": "writing", "turns": ["a"]})],
            &["--set", "model_id=a/b"],
            "model_id",
        ),
    ];
    for (qs, extra, want) in cases {
        write_jsonl(&d.join("q.jsonl"), qs);
        let err = common::fails(&run(d, &mt_args(url, extra), &[]));
        assert!(err.contains(want), "want `{want}` in: {err}");
        assert!(
            !d.join("ev/model_answer").exists(),
            "nothing generated for `{want}`"
        );
    }
    // OpenAI's API without the key set.
    write_jsonl(
        &d.join("q.jsonl"),
        &[json!({"question_id": 1, "category": "writing", "turns": ["a"]})],
    );
    let err = common::fails(&run(d, &mt_args("https://api.openai.com/v1", &[]), &[]));
    assert!(err.contains("$FUSECHAT_TEST_JUDGE_KEY is not set"), "{err}");
    // Perplexity and exact_match data that cannot serve.
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n",
    )
    .unwrap();
    let cases: &[(&str, &str, &str, &[&str], &str)] = &[
        ("m/pivot", "exact_match", "e2", &[], "bad.jsonl"),
        (
            "m/pivot",
            "perplexity",
            "e3",
            &["--set", "template=none"],
            "template = none",
        ),
        ("m/pivot", "nope", "e4", &[], "nope"),
        ("m", "perplexity", "m/pivot", &[], "config.json"),
    ];
    for (model, evaluator, out, extra, want) in cases {
        let data = if *evaluator == "exact_match" {
            "bad.jsonl"
        } else {
            "q.jsonl"
        };
        let mut args = vec![
            "eval",
            "--model",
            model,
            "--evaluator",
            evaluator,
            "--data",
            data,
            "--out",
            out,
        ];
        args.extend(*extra);
        let err = common::fails(&run(d, &args, &[]));
        assert!(err.contains(want), "want `{want}` in: {err}");
    }
}

#[test]
fn mt_bench_answers_resume_and_follow_the_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    write_jsonl(
        &d.join("q.jsonl"),
        &[
            json!({"question_id": 1, "category": "writing", "turns": ["hello there", "and more"]}),
            json!({"question_id": 2, "category": "math", "turns": ["one two"]}),
        ],
    );
    let answer = |n: &str, extra: &[&str]| {
        let args = [&mt_bench(&["--set", n])[..], extra].concat();
        let out = common::ok(&run(d, &args, &[]));
        (out, lines(&d.join("ev/model_answer/pivot.jsonl")))
    };
    let words = |a: &Value| -> usize {
        a["choices"][0]["turns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().split_whitespace().count())
            .max()
            .unwrap()
    };
    let (_, short) = answer("max_new_tokens=2", &[]);
    assert!(short.iter().all(|a| words(a) <= 2), "{short:?}");
    // The same settings again (forced past the stage key): every answer is reused.
    let (out, again) = answer("max_new_tokens=2", &["--force"]);
    assert!(out.contains("every question already answered"), "{out}");
    assert_eq!(again, short);
    // Other settings: answered again, and the file holds only the new answers.
    let (out, long) = answer("max_new_tokens=6", &[]);
    assert!(out.contains("answering again"), "{out}");
    assert_eq!(long.len(), 2);
    assert!(long.iter().any(|a| words(a) > 2), "{long:?}");
    // An answer file fusechat did not write is never overwritten.
    std::fs::remove_file(d.join("ev/model_answer/pivot.fusechat.json")).unwrap();
    let before = std::fs::read(d.join("ev/model_answer/pivot.jsonl")).unwrap();
    let err = common::fails(&run(d, &mt_bench(&["--force"]), &[]));
    assert!(err.contains("fusechat did not write it"), "{err}");
    assert_eq!(
        std::fs::read(d.join("ev/model_answer/pivot.jsonl")).unwrap(),
        before
    );
}
