//! Chat datasets: a JSON array or JSONL of conversations, in ShareGPT form
//! (`{"id": .., "conversations": [{"from": "human"|"gpt"|"system", "value": ..}]}`)
//! or OpenAI/HF form (`{"messages": [{"role": "user"|"assistant"|"system", "content": ..}]}`).
//!
//! A record's **row id** is its index in the file (JSONL: its line among the
//! non-blank lines; JSON: its array index). Rows are paired across models by
//! this id, never by position in a later file.
//!
//! Normalisation (SPEC §1): an optional leading system message is kept apart;
//! leading messages that are not from the user are dropped; the rest must
//! alternate user, assistant, user, ... Records that break this, are empty, or
//! have wrong types are skipped with a reason, never fatal unless `strict`.
//!
//! ```
//! use fusechat_core::data::conversation::{parse, Role};
//! let text = r#"{"id": "a", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hey"}]}
//! {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}"#;
//! let d = parse(text, std::path::Path::new("d.jsonl"), false).unwrap();
//! assert_eq!(d.records.len(), 1);
//! assert_eq!(d.records[0].turns[0].role, Role::User); // the leading "gpt" turn is dropped
//! assert_eq!(d.skipped[0].row, 1);
//! ```

use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

/// One usable conversation: `system` (if any), then turns alternating user,
/// assistant, ... starting with the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// Index of the record in its file.
    pub row: u64,
    /// The record's own `id` field, if any (for messages).
    pub id: Option<String>,
    pub system: Option<String>,
    pub turns: Vec<Turn>,
    /// The record's `category` (or `skill`) field, if any: evaluators report per category.
    pub category: Option<String>,
}

impl Conversation {
    /// A conversation from message texts that alternate user, assistant, ...
    /// (a prompt for generation, or a test's record), with row 0.
    pub fn alternating<S: AsRef<str>>(system: Option<&str>, contents: &[S]) -> Conversation {
        Conversation {
            row: 0,
            id: None,
            category: None,
            system: system.map(str::to_string),
            turns: contents
                .iter()
                .enumerate()
                .map(|(i, c)| Turn {
                    role: if i % 2 == 0 {
                        Role::User
                    } else {
                        Role::Assistant
                    },
                    content: c.as_ref().to_string(),
                })
                .collect(),
        }
    }
}

/// A record that was not used, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub row: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub records: Vec<Conversation>,
    pub skipped: Vec<Skipped>,
    /// Records in the file, used or not.
    pub total: u64,
}

/// Read and parse a dataset file.
pub fn load(path: &Path, strict: bool) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, path, strict)
}

/// Parse dataset text (`path` names the file in messages). JSON arrays and
/// JSONL are told apart by the first non-blank character. A file with no
/// usable record (empty, a lone JSON object, or every record skipped) is an
/// error naming the first reasons.
pub fn parse(text: &str, path: &Path, strict: bool) -> Result<Dataset> {
    let mut raw: Vec<Result<Value>> = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(Error::model(
            path,
            "is empty: give a JSON array of records or JSONL (one record per line)",
        ));
    }
    if trimmed.starts_with('{') && trimmed.trim_end().lines().count() > 1 {
        if let Ok(Value::Object(_)) = serde_json::from_str::<Value>(text) {
            return Err(Error::model(
                path,
                "is one JSON object, not a dataset: give a JSON array of records, or JSONL with one record per line",
            ));
        }
    }
    if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            Error::model(
                path,
                format!("not a valid JSON array of records: {e}; JSONL (one record per line) is also accepted"),
            )
        })?;
        raw.extend(v.as_array().into_iter().flatten().cloned().map(Ok));
    } else {
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            raw.push(
                serde_json::from_str(line)
                    .map_err(|e| Error::msg(format!("line {}: not valid JSON: {e}", n + 1))),
            );
        }
    }
    let mut out = Dataset {
        total: raw.len() as u64,
        ..Dataset::default()
    };
    for (row, r) in raw.into_iter().enumerate() {
        let row = row as u64;
        let id = r.as_ref().ok().and_then(record_id);
        let category = r.as_ref().ok().and_then(|v| {
            ["category", "skill"]
                .iter()
                .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
        });
        match r.and_then(|v| conversation(&v)) {
            Ok((system, turns)) => out.records.push(Conversation {
                row,
                id,
                system,
                turns,
                category,
            }),
            Err(e) if strict => {
                return Err(Error::model(
                    path,
                    format!(
                        "record {row}{}: {e} (drop --strict to skip such records)",
                        id.map(|i| format!(" (id {i})")).unwrap_or_default()
                    ),
                ))
            }
            Err(e) => out.skipped.push(Skipped {
                row,
                id,
                reason: e.to_string(),
            }),
        }
    }
    if out.records.is_empty() {
        let first: Vec<String> = out
            .skipped
            .iter()
            .take(3)
            .map(|s| format!("row {}: {}", s.row, s.reason))
            .collect();
        return Err(Error::model(
            path,
            format!(
                "has no usable record ({} in the file{}{})",
                out.total,
                if first.is_empty() {
                    ""
                } else {
                    "; first reasons: "
                },
                first.join("; ")
            ),
        ));
    }
    // Once per file and process: `fusechat run` reads the same data for every model.
    static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let first_time = || {
        let mut w = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        let new = !w.iter().any(|p| p == path);
        if new {
            w.push(path.to_path_buf());
        }
        new
    };
    if !out.skipped.is_empty() && first_time() {
        tracing::warn!(
            "{}: skipped {} of {} records (first: row {}: {})",
            path.display(),
            out.skipped.len(),
            out.total,
            out.skipped[0].row,
            out.skipped[0].reason
        );
    }
    Ok(out)
}

fn record_id(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn role_of(name: &str) -> Option<Role> {
    match name {
        "human" | "user" => Some(Role::User),
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => Some(Role::Assistant),
        "system" => Some(Role::System),
        _ => None,
    }
}

/// Normalise one record into (system, alternating turns).
fn conversation(v: &Value) -> Result<(Option<String>, Vec<Turn>)> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::msg("the record is not a JSON object"))?;
    let (list, role_key, text_key) = if let Some(c) = obj.get("conversations") {
        (c, "from", "value")
    } else if let Some(m) = obj.get("messages") {
        (m, "role", "content")
    } else {
        return Err(Error::msg("no `conversations` or `messages` field"));
    };
    let list = list
        .as_array()
        .ok_or_else(|| Error::msg("the message list is not an array"))?;
    let mut msgs = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let role = m.get(role_key).and_then(Value::as_str).ok_or_else(|| {
            Error::msg(format!(
                "message {i}: `{role_key}` is missing or not a string"
            ))
        })?;
        let role = role_of(role)
            .ok_or_else(|| Error::msg(format!("message {i}: unknown role `{role}`")))?;
        let content = m.get(text_key).and_then(Value::as_str).ok_or_else(|| {
            Error::msg(format!(
                "message {i}: `{text_key}` is missing or not a string"
            ))
        })?;
        msgs.push(Turn {
            role,
            content: content.to_string(),
        });
    }
    let mut rest = &msgs[..];
    let mut system = None;
    if let Some(first) = rest.first().filter(|t| t.role == Role::System) {
        system = Some(first.content.clone());
        rest = &rest[1..];
    }
    // A first message that is not from the user is dropped (SPEC §1).
    if let Some(first) = rest.first().filter(|t| t.role != Role::User) {
        if first.role == Role::System {
            return Err(Error::msg("a second system message"));
        }
        rest = &rest[1..];
    }
    if rest.is_empty() {
        return Err(Error::msg("empty conversation"));
    }
    for (i, t) in rest.iter().enumerate() {
        let want = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if t.role != want {
            return Err(Error::msg(format!(
                "roles do not alternate: turn {i} is from the {} where the {} was expected",
                t.role.as_str(),
                want.as_str()
            )));
        }
    }
    Ok((system, rest.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Dataset {
        parse(text, Path::new("t.jsonl"), false).unwrap()
    }

    #[test]
    fn both_forms_and_json_arrays() {
        let a = p(
            r#"[{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
                     {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]"#,
        );
        assert_eq!(a.records.len(), 2);
        assert_eq!(a.records[0].system.as_deref(), Some("S"));
        assert_eq!(a.records[0].turns, a.records[1].turns);
        assert_eq!(a.records[1].row, 1);
    }

    #[test]
    fn bad_records_are_counted_with_ids_and_rows() {
        let d = p(concat!(
            "{\"id\": \"ok\", \"messages\": [{\"role\": \"user\", \"content\": \"u\"}]}\n",
            "\n",
            "{not json\n",
            "{\"id\": 7, \"messages\": []}\n",
            "{\"id\": \"x\", \"messages\": [{\"role\": \"user\", \"content\": 3}]}\n",
            "{\"id\": \"y\", \"conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"human\", \"value\": \"b\"}]}\n",
            "[1]\n",
        ));
        assert_eq!(d.total, 6);
        assert_eq!(d.records.len(), 1);
        let rows: Vec<u64> = d.skipped.iter().map(|s| s.row).collect();
        assert_eq!(rows, vec![1, 2, 3, 4, 5]);
        assert!(d.skipped[0].reason.contains("line 3"), "{:?}", d.skipped[0]);
        assert_eq!(d.skipped[1].id.as_deref(), Some("7"));
        assert!(d.skipped[1].reason.contains("empty"));
        assert!(d.skipped[2].reason.contains("content"));
        assert!(d.skipped[3].reason.contains("alternate"));
        let e = parse("{\"messages\": []}\n", Path::new("t.jsonl"), true).unwrap_err();
        assert!(e.to_string().contains("t.jsonl") && e.to_string().contains("record 0"));
    }
}
