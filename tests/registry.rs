//! The built-in plugin registry.

mod common;
use common::METHODS;
use fusechat::core::plugin::registry::{BuiltinMerger, PluginKind};

#[test]
fn every_builtin_is_registered_once_with_a_description() {
    let r = fusechat::registry();
    let names: Vec<&str> = r.mergers().iter().map(|e| e.info.name.as_str()).collect();
    for m in METHODS {
        assert!(names.contains(&m), "{m} is not registered: {names:?}");
    }
    // No two built-ins share a name (the registry would have dropped one).
    assert_eq!(
        inventory::iter::<BuiltinMerger>.into_iter().count(),
        names.len()
    );
    for e in r.mergers() {
        assert_eq!(e.info.kind, PluginKind::Merger);
        assert!(!e.info.description.is_empty(), "{}", e.info.name);
        for p in &e.info.params {
            assert!(!p.help.is_empty(), "{}.{} has no help", e.info.name, p.name);
            if let Some(d) = &p.default {
                assert!(
                    d.coerce(&p.ty).is_ok(),
                    "{}.{}: default {d} is not a {}",
                    e.info.name,
                    p.name,
                    p.ty
                );
            }
        }
    }
}

#[test]
fn a_name_clash_is_an_error_naming_both_origins() {
    let mut r = fusechat::registry();
    let varm = r.merger("varm").unwrap().plugin.clone();
    let err = r
        .add::<dyn fusechat::core::merge::Merger>(
            varm,
            fusechat::core::plugin::registry::Origin::Library("libx.so".into()),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("varm") && err.contains("libx.so") && err.contains("built-in"),
        "{err}"
    );
}

#[test]
fn the_three_decoder_families_are_registered_and_detected() {
    let r = fusechat::registry();
    let names: Vec<&str> = r.models().iter().map(|e| e.info.name.as_str()).collect();
    assert_eq!(names, ["llama", "mistral", "mixtral"]);
    let detect = |arch: &str, ty: &str| {
        let cfg = serde_json::json!({"architectures": [arch], "model_type": ty});
        r.detect_model(&cfg).map(|e| e.info.name.clone())
    };
    assert_eq!(
        detect("MistralForCausalLM", "mistral").as_deref(),
        Some("mistral")
    );
    assert_eq!(
        detect("MixtralForCausalLM", "mixtral").as_deref(),
        Some("mixtral")
    );
    assert_eq!(
        detect("LlamaForCausalLM", "llama").as_deref(),
        Some("llama")
    );
    assert_eq!(detect("GPT2LMHeadModel", "gpt2"), None);
    let err = match r.model("gpt2") {
        Err(e) => e.to_string(),
        Ok(_) => panic!("gpt2 is not a known family"),
    };
    assert!(err.contains("llama, mistral, mixtral"), "{err}");
}
