//! Chat templates and labels (SPEC §1) with tokenizers built here.
//!
//! The SentencePiece-style fixture reproduces the OpenChat-3.5 tokenizer's
//! relevant behaviour: a `Prepend("▁")` + `Replace(" ", "▁")` normaliser that
//! runs on each text segment between added tokens (so the text after
//! `<|end_of_turn|>` starts with `▁`), BPE with byte fallback, and BOS from the
//! post-processor. Its pieces sit at the ids SPEC.md gives; which strings those
//! ids hold in the real vocabulary beyond that is not known here, so the
//! fixture splits `▁Correct` as `▁Cor` + `rect`.

use fusechat::core::data::conversation::Conversation;
use fusechat::core::data::template::{encode_rendered, Template};
use serde_json::json;
use std::collections::BTreeMap;
use tokenizers::Tokenizer;

fn added(id: u32, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
}

/// A 32002-token SentencePiece-style BPE with the pieces of SPEC §1 at SPEC's ids.
fn openchat_like() -> Tokenizer {
    let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
    vocab.insert("<unk>".into(), 0);
    vocab.insert("<s>".into(), 1);
    vocab.insert("</s>".into(), 2);
    for b in 0..256u32 {
        vocab.insert(format!("<0x{b:02X}>"), 3 + b);
    }
    let fixed: &[(&str, u32)] = &[
        ("▁G", 420),
        ("PT", 6316),
        ("4", 28781),
        ("▁Cor", 3198),
        ("rect", 3123),
        ("▁User", 1247),
        (":", 28747),
        ("▁Hello", 22557),
        ("▁Assistant", 21631),
        ("<|end_of_turn|>", 32000),
        ("<|pad_0|>", 32001),
    ];
    for (t, id) in fixed {
        vocab.insert(t.to_string(), *id);
    }
    // Merges building each multi-character piece left to right; the
    // intermediate pieces (and single characters) get free ids.
    let mut merges: Vec<String> = Vec::new();
    let mut next = 300u32;
    let mut taken: std::collections::HashSet<u32> = vocab.values().copied().collect();
    let mut add = |vocab: &mut BTreeMap<String, u32>, t: &str| {
        if !vocab.contains_key(t) {
            while taken.contains(&next) {
                next += 1;
            }
            taken.insert(next);
            vocab.insert(t.to_string(), next);
        }
    };
    let words = [
        "▁G",
        "PT",
        "▁Cor",
        "rect",
        "▁User",
        "▁Hello",
        "▁Assistant",
        "▁Hi",
        "▁there",
        "▁Fine",
        "▁How",
    ];
    for c in "▁GPT4Corect:UsHlAisanhFwy.?!,".chars() {
        add(&mut vocab, &c.to_string());
    }
    for w in words {
        let chars: Vec<char> = w.chars().collect();
        let mut acc = chars[0].to_string();
        for c in &chars[1..] {
            let m = format!("{acc} {c}");
            if !merges.contains(&m) {
                merges.push(m);
            }
            acc.push(*c);
            add(&mut vocab, &acc);
        }
    }
    // Fill the remaining ids so the vocabulary has SPEC's size.
    let used: std::collections::HashSet<u32> = vocab.values().copied().collect();
    for id in 0..32002u32 {
        if !used.contains(&id) {
            vocab.insert(format!("<unused_{id}>"), id);
        }
    }
    let pair_seq = |seq: &str| json!({"Sequence": {"id": seq, "type_id": 0}});
    let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"), added(32000, "<|end_of_turn|>"), added(32001, "<|pad_0|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing", "single": [bos.clone(), pair_seq("A")],
            "pair": [bos.clone(), pair_seq("A"), bos, pair_seq("B")],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    });
    tj.to_string().parse().expect("a valid tokenizer.json")
}

fn conv(system: Option<&str>, turns: &[&str]) -> Conversation {
    Conversation::alternating(system, turns)
}

#[test]
fn openchat_prompt_encodes_to_spec_ids() {
    let tok = openchat_like();
    let prompt = Template::Openchat
        .prompt(None, &conv(None, &["Hello"]).turns)
        .unwrap();
    assert_eq!(
        prompt,
        "GPT4 Correct User: Hello<|end_of_turn|>GPT4 Correct Assistant:"
    );
    let ids = tok
        .encode(prompt.as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(
        ids,
        [
            1, 420, 6316, 28781, 3198, 3123, 1247, 28747, 22557, 32000, 420, 6316, 28781, 3198,
            3123, 21631, 28747
        ]
    );
}

#[test]
fn openchat_labels_are_the_replies_and_their_end_of_turn() {
    let tok = openchat_like();
    let c = conv(None, &["Hello", "Hi there", "How", "Fine!"]);
    let r = Template::Openchat.render(&c).unwrap();
    let enc = encode_rendered(&tok, &r, 2048).unwrap();
    // Independently: the label tokens are the tokenization of each reply
    // (after the special token, so with the leading ▁) plus <|end_of_turn|>.
    let reply = |s: &str| {
        let mut v = tok.encode(s, false).unwrap().get_ids().to_vec();
        v.push(32000);
        v
    };
    let want: Vec<u32> = [reply("Hi there"), reply("Fine!")].concat();
    let got: Vec<u32> = enc
        .ids
        .iter()
        .zip(&enc.labels)
        .filter(|(_, l)| **l == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(got, want, "{:?}", tok.decode(&got, false));
    assert_eq!(enc.ids[0], 1);
    assert_eq!(enc.labels[0], 0, "BOS is never a label");
    // The ":" closing each assistant header is not a label; the next token is.
    let colon_before_reply: Vec<usize> = (1..enc.ids.len())
        .filter(|&i| enc.labels[i] == 1 && enc.labels[i - 1] == 0)
        .map(|i| i - 1)
        .collect();
    assert!(
        colon_before_reply.iter().all(|&i| enc.ids[i] == 28747),
        "{colon_before_reply:?}"
    );
    // Truncation keeps a prefix, BOS included.
    let short = encode_rendered(&tok, &r, 5).unwrap();
    assert_eq!(short.ids, enc.ids[..5]);
    assert_eq!(short.labels, vec![0; 5]);
}

/// A word-level tokenizer with every template's special tokens.
fn word_level() -> Tokenizer {
    let specials = [
        "<unk>",
        "<s>",
        "</s>",
        "<|end_of_turn|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];
    let words = [
        "GPT4",
        "Correct",
        "User",
        "Assistant",
        ":",
        "[",
        "]",
        "[/",
        "INST",
        "/",
        "system",
        "user",
        "assistant",
        "be",
        "brief",
        "hello",
        "there",
        "how",
        "are",
        "you",
        "fine",
        "thanks",
        "bye",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .chain(words.iter())
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": specials.iter().enumerate().map(|(i, s)| added(i as u32, s)).collect::<Vec<_>>(),
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    tj.to_string().parse().unwrap()
}

#[test]
fn every_builtin_template_labels_replies_plus_end_of_turn() {
    let tok = word_level();
    let c = conv(
        Some("be brief"),
        &["hello there", "how are you", "fine thanks", "bye"],
    );
    let id = |w: &str| tok.token_to_id(w).unwrap();
    for (t, eot) in [
        (Template::Openchat, "<|end_of_turn|>"),
        (Template::Chatml, "<|im_end|>"),
        (Template::Llama3, "<|eot_id|>"),
        (Template::Mistral, "</s>"),
    ] {
        let enc = encode_rendered(&tok, &t.render(&c).unwrap(), 2048).unwrap();
        let got: Vec<u32> = enc
            .ids
            .iter()
            .zip(&enc.labels)
            .filter(|(_, l)| **l == 1)
            .map(|(i, _)| *i)
            .collect();
        let want = vec![id("how"), id("are"), id("you"), id(eot), id("bye"), id(eot)];
        assert_eq!(got, want, "template {}", t.name());
        assert!(
            !enc.ids.contains(&0),
            "template {}: an unknown word in {:?}",
            t.name(),
            t.render(&c).unwrap().text
        );
    }
}

#[test]
fn hf_template_from_tokenizer_config_matches_the_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let jinja = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"chat_template": jinja, "bos_token": {"content": "<s>"}, "eos_token": "<|im_end|>"})
            .to_string(),
    )
    .unwrap();
    let t = Template::load("hf", dir.path()).unwrap();
    let tok = word_level();
    let c = conv(
        Some("be brief"),
        &["hello there", "how are you", "fine thanks", "bye"],
    );
    let hf = encode_rendered(&tok, &t.render(&c).unwrap(), 2048).unwrap();
    let builtin = encode_rendered(&tok, &Template::Chatml.render(&c).unwrap(), 2048).unwrap();
    assert_eq!(hf.ids, builtin.ids);
    assert_eq!(hf.labels, builtin.labels);
    assert_eq!(t.end_of_turn(), "<|im_end|>");
    // A model without a template says so.
    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    let e = Template::load("hf", dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat_template"),
        "{e}"
    );
}

/// A Llama-3-style Jinja template that writes BOS itself and trims content:
/// the text is then encoded without the tokenizer's own BOS, and the labels
/// match the built-in `llama3` template's.
#[test]
fn hf_template_writing_its_own_bos() {
    let dir = tempfile::tempdir().unwrap();
    let jinja = "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"chat_template": jinja, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}).to_string(),
    )
    .unwrap();
    let t = Template::load("hf", dir.path()).unwrap();
    let c = conv(None, &["hello there ", "how are you", "bye", "fine"]);
    let r = t.render(&c).unwrap();
    assert!(
        r.has_bos
            && r.text
                .starts_with("<|begin_of_text|><|start_header_id|>user"),
        "{}",
        r.text
    );
    let tok = word_level();
    let hf = encode_rendered(&tok, &r, 2048).unwrap();
    let builtin = encode_rendered(&tok, &Template::Llama3.render(&c).unwrap(), 2048).unwrap();
    assert_eq!(hf.ids[0], tok.token_to_id("<|begin_of_text|>").unwrap());
    assert_eq!(hf.ids[1..], builtin.ids[..]);
    assert_eq!(hf.labels[1..], builtin.labels[..]);
}
