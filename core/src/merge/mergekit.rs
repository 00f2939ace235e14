//! mergekit YAML configs, read as written: `models` or `slices` (with
//! `layer_range`), `base_model`, `merge_method`, `parameters`, `dtype`,
//! `out_dtype`. Model references are local directories (relative to the
//! current directory) or HF ids found in the local HF cache.

use crate::merge::params::{Setting, Settings};
use crate::merge::plan::{MergeRequest, ModelInput, SliceModel, SliceSource};
use crate::pipeline::config::parse_dtype;
use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

const KNOWN_KEYS: &[&str] = &[
    "models",
    "slices",
    "merge_method",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
];

/// Parse a mergekit YAML file into a merge request writing to `out`.
/// Returns the request and warnings about keys fusechat ignores.
pub fn load(path: &Path, out: PathBuf, relative_to: &Path) -> Result<(MergeRequest, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, path, out, relative_to)
}

pub fn parse(
    text: &str,
    path: &Path,
    out: PathBuf,
    relative_to: &Path,
) -> Result<(MergeRequest, Vec<String>)> {
    let err = |msg: String| Error::config(path, msg);
    let doc: Value = serde_norway::from_str(text).map_err(|e| err(format!("invalid YAML: {e}")))?;
    let obj = doc.as_object().ok_or_else(|| {
        err("a mergekit config is a mapping with `merge_method` and `models` or `slices`".into())
    })?;
    let mut warnings = Vec::new();
    for k in obj.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) {
            warnings.push(format!(
                "{}: key `{k}` is not understood by fusechat and is ignored",
                path.display()
            ));
        }
    }
    if obj.contains_key("chat_template") {
        warnings.push(format!(
            "{}: `chat_template` is not supported yet; the tokenizer files' own template is kept",
            path.display()
        ));
    }
    // `tokenizer_source: x`, or the newer `tokenizer: {source: x}`
    let tokenizer = obj.get("tokenizer").filter(|v| !v.is_null());
    if let Some(t) = tokenizer {
        // these change the output's shape or rows: refuse rather than ignore
        if let Some(k) = t
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .find(|k| *k != "source")
        {
            return Err(err(format!(
                "`tokenizer.{k}` is not supported yet (fusechat reads `tokenizer.source` only); remove it, or merge with mergekit"
            )));
        }
    }
    let source = match (
        obj.get("tokenizer_source").filter(|v| !v.is_null()),
        tokenizer,
    ) {
        (Some(_), Some(_)) => {
            return Err(err(
                "give either `tokenizer_source` or `tokenizer`, not both".into(),
            ))
        }
        (Some(v), None) => Some(v),
        (None, Some(t)) => t.get("source"),
        (None, None) => None,
    };
    let tokenizer_source = match source {
        None => None,
        Some(Value::String(s)) => Some(crate::merge::vocab::TokenizerSource::parse(s)),
        Some(_) => {
            return Err(err(
                "`tokenizer_source` must be base, union or a model (a string)".into(),
            ))
        }
    };
    let method = obj
        .get("merge_method")
        .and_then(Value::as_str)
        .ok_or_else(|| err("`merge_method` is missing or not a string".into()))?;
    let mut req = MergeRequest::new(method, out);
    req.origin = format!("mergekit config {}", path.display());
    req.tokenizer_source = tokenizer_source;

    let settings = |v: Option<&Value>, field: &str| -> Result<Settings> {
        match v {
            None | Some(Value::Null) => Ok(Settings::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    Setting::from_json(v)
                        .map(|s| (k.clone(), s))
                        .map_err(|e| err(format!("{field}.{k}: {e}")))
                })
                .collect(),
            Some(_) => Err(err(format!("`{field}` must be a mapping"))),
        }
    };
    let model_ref = |v: Option<&Value>, field: &str| -> Result<String> {
        match v {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(err(format!(
                "`{field}` must be a model path or HF id (a string)"
            ))),
        }
    };
    let mk = |reference: &str, params: Settings| ModelInput {
        reference: reference.to_string(),
        path: crate::io::hub::resolve_model(reference, relative_to),
        params,
    };

    req.params = settings(obj.get("parameters"), "parameters")?;
    if let Some(b) = obj.get("base_model").filter(|v| !v.is_null()) {
        req.base = Some(mk(&model_ref(Some(b), "base_model")?, Settings::new()));
    }
    let dtype_field = |k: &str| -> Result<_> {
        parse_dtype(obj.get(k).and_then(Value::as_str), &format!("`{k}`"))
            .map_err(|e| err(e.to_string()))
    };
    req.dtype = dtype_field("dtype")?;
    req.out_dtype = dtype_field("out_dtype")?;

    match (obj.get("models"), obj.get("slices")) {
        (Some(_), Some(_)) => return Err(err("give either `models` or `slices`, not both".into())),
        (None, None) => return Err(err("the config lists no `models` and no `slices`".into())),
        (Some(models), None) => {
            let list = models
                .as_array()
                .ok_or_else(|| err("`models` must be a list".into()))?;
            for (i, m) in list.iter().enumerate() {
                let field = format!("models[{i}]");
                let reference = model_ref(m.get("model"), &format!("{field}.model"))?;
                let params = settings(m.get("parameters"), &format!("{field}.parameters"))?;
                req.models.push(mk(&reference, params));
            }
        }
        (None, Some(slices)) => {
            let list = slices
                .as_array()
                .ok_or_else(|| err("`slices` must be a list".into()))?;
            for (si, s) in list.iter().enumerate() {
                let sources = s
                    .get("sources")
                    .and_then(Value::as_array)
                    .ok_or_else(|| err(format!("slices[{si}].sources must be a list")))?;
                if sources.is_empty() {
                    return Err(err(format!(
                        "slices[{si}].sources is empty: a slice needs at least one `model` with its `layer_range`"
                    )));
                }
                let mut out = Vec::new();
                for (j, src) in sources.iter().enumerate() {
                    let field = format!("slices[{si}].sources[{j}]");
                    let reference = model_ref(src.get("model"), &format!("{field}.model"))?;
                    let range = src
                        .get("layer_range")
                        .and_then(Value::as_array)
                        .and_then(|r| match r.as_slice() {
                            [a, b] => Some((a.as_u64()? as usize, b.as_u64()? as usize)),
                            _ => None,
                        })
                        .ok_or_else(|| {
                            err(format!(
                                "{field}.layer_range must be [start, end], two non-negative integers"
                            ))
                        })?;
                    if range.0 >= range.1 {
                        return Err(err(format!(
                            "{field}.layer_range [{}, {}]: start must be below end",
                            range.0, range.1
                        )));
                    }
                    let params = settings(src.get("parameters"), &format!("{field}.parameters"))?;
                    let idx = match req.models.iter().position(|m| m.reference == reference) {
                        Some(i) => {
                            if !params.is_empty() && req.models[i].params != params {
                                return Err(err(format!(
                                    "{field}: model `{reference}` has different parameters in different slices, which fusechat does not support"
                                )));
                            }
                            i
                        }
                        None => {
                            req.models.push(mk(&reference, params));
                            req.models.len() - 1
                        }
                    };
                    out.push(SliceSource {
                        model: SliceModel::Model(idx),
                        layers: range,
                    });
                }
                req.slices.push(out);
            }
        }
    }
    Ok((req, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_yaml_names_the_file() {
        let e = parse("models: [", Path::new("c.yml"), "o".into(), Path::new(".")).unwrap_err();
        assert!(e.to_string().contains("c.yml") && e.to_string().contains("YAML"));
        let e = parse(
            "models: []\n",
            Path::new("c.yml"),
            "o".into(),
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.to_string().contains("merge_method"));
    }

    #[test]
    fn slerp_slices() {
        let y = "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 32]\n      - model: b\n        layer_range: [0, 32]\nmerge_method: slerp\nbase_model: c\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.5\ndtype: bfloat16\n";
        let (r, w) = parse(y, Path::new("s.yml"), "o".into(), Path::new(".")).unwrap();
        assert!(w.is_empty());
        assert_eq!(r.models.len(), 2);
        assert_eq!(r.slices[0].len(), 2);
        assert_eq!(r.base.unwrap().reference, "c");
        assert_eq!(r.dtype, Some(crate::io::dtype::DType::BF16));
    }
}
