//! A client for an OpenAI-compatible chat-completions endpoint (OpenAI, or a
//! local vLLM, llama.cpp or Ollama server) acting as the MT-Bench judge.
//!
//! `POST {base_url}/chat/completions` with the system and user prompts,
//! `temperature` 0 and `max_tokens` 2048. The API key is read from the
//! environment variable the caller names and sent as a Bearer token; it is
//! never logged, printed or written anywhere. A request that meets a 429, a
//! 5xx or a dropped connection is retried with exponential backoff; each
//! request has a timeout. `parallel` bounds the requests in flight.

use crate::{Error, Result};
use std::time::Duration;

/// Where the judge is and how to talk to it.
#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// e.g. `http://127.0.0.1:8000/v1` or `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key (none set: no Authorization header).
    pub key_env: String,
    pub parallel: usize,
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// The first wait before a retry; it doubles each time.
    pub backoff: Duration,
}

impl JudgeConfig {
    pub fn new(base_url: &str, model: &str) -> JudgeConfig {
        JudgeConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            key_env: "OPENAI_API_KEY".into(),
            parallel: 4,
            timeout: Duration::from_secs(120),
            retries: 5,
            backoff: Duration::from_secs(2),
        }
    }
}

/// Why a judgment could not be had (the key never appears in it).
#[derive(Debug, Clone, PartialEq)]
pub enum JudgeError {
    /// This item failed (a 429 or 5xx after every retry, a timeout, another
    /// 4xx, a reply without a message): record it and go on; a rerun retries it.
    Failed(String),
    /// No request can succeed (the key is refused, the URL is wrong, nothing
    /// listens there): stop judging.
    Abort(String),
}

impl std::fmt::Display for JudgeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JudgeError::Failed(m) | JudgeError::Abort(m) => f.write_str(m),
        }
    }
}

/// The client; cheap to share between threads.
pub struct Judge {
    cfg: JudgeConfig,
    agent: ureq::Agent,
    key: Option<String>,
    /// Retries made, for the summary.
    pub retries_made: std::sync::atomic::AtomicU64,
}

impl Judge {
    pub fn new(cfg: JudgeConfig) -> Result<Judge> {
        if !(cfg.base_url.starts_with("http://") || cfg.base_url.starts_with("https://")) {
            return Err(Error::msg(format!(
                "judge_url `{}`: use an http:// or https:// base URL, e.g. http://127.0.0.1:8000/v1",
                cfg.base_url
            )));
        }
        if cfg.parallel == 0 || cfg.parallel > 256 {
            return Err(Error::msg(format!(
                "parallel = {}: use 1 to 256",
                cfg.parallel
            )));
        }
        let key = std::env::var(&cfg.key_env).ok().filter(|k| !k.is_empty());
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(cfg.timeout.min(Duration::from_secs(30)))
            .timeout(cfg.timeout)
            .build();
        Ok(Judge {
            cfg,
            agent,
            key,
            retries_made: Default::default(),
        })
    }

    pub fn model(&self) -> &str {
        &self.cfg.model
    }

    pub fn parallel(&self) -> usize {
        self.cfg.parallel
    }

    /// One judgment: the assistant message's text.
    pub fn complete(&self, system: &str, user: &str) -> std::result::Result<String, JudgeError> {
        let url = format!("{}/chat/completions", self.cfg.base_url);
        let body = serde_json::json!({
            "model": self.cfg.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "temperature": 0,
            "max_tokens": 2048,
        });
        let mut wait = self.cfg.backoff;
        let mut attempt = 0;
        loop {
            let mut req = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json");
            if let Some(k) = &self.key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let outcome = match req.send_string(&body.to_string()) {
                Ok(resp) => return parse_reply(resp, &url),
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let msg = format!("the judge at {url} answered {code}: {}", first_line(&text));
                    match code {
                        429 | 500..=599 => JudgeError::Failed(msg),
                        401 | 403 => {
                            return Err(JudgeError::Abort(format!(
                                "{msg}; put a valid API key in ${} (judge_key_env names the variable)",
                                self.cfg.key_env
                            )))
                        }
                        404 => {
                            return Err(JudgeError::Abort(format!(
                                "{msg}; judge_url should be the API's base, ending in /v1 (…/v1/chat/completions must exist)"
                            )))
                        }
                        _ => return Err(JudgeError::Failed(msg)),
                    }
                }
                Err(ureq::Error::Transport(t)) => {
                    let msg = format!("the judge at {url} could not be reached: {}", t.kind());
                    match t.kind() {
                        ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => {
                            JudgeError::Abort(format!(
                                "{msg}; is the server running, and is judge_url right?"
                            ))
                        }
                        _ => JudgeError::Failed(format!(
                            "{msg} ({})",
                            t.message().unwrap_or("no detail")
                        )),
                    }
                }
            };
            if attempt >= self.cfg.retries {
                return Err(outcome);
            }
            attempt += 1;
            self.retries_made
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("{outcome}; retry {attempt} in {wait:?}");
            std::thread::sleep(wait);
            wait = wait.saturating_mul(2).min(Duration::from_secs(60));
        }
    }
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    l.chars().take(200).collect()
}

fn parse_reply(resp: ureq::Response, url: &str) -> std::result::Result<String, JudgeError> {
    let text = resp
        .into_string()
        .map_err(|e| JudgeError::Failed(format!("reading the judge's reply from {url}: {e}")))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
        JudgeError::Failed(format!(
            "the judge at {url} replied with something that is not JSON: {:?}",
            first_line(&text)
        ))
    })?;
    v["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| {
            JudgeError::Failed(format!(
                "the judge at {url} replied without choices[0].message.content: {}",
                first_line(&text)
            ))
        })
}

/// The score in a judgment, as FastChat finds it: the first `[[x]]`, else the
/// first `[x]`, with x digits and an optional decimal part; −1 when neither.
///
/// ```
/// use fusechat_core::eval::judge::score;
/// assert_eq!(score("Rating: [[8.5]]"), 8.5);
/// assert_eq!(score("I give it [7] out of 10"), 7.0);
/// assert_eq!(score("[[ten]] or [3]"), 3.0);
/// assert_eq!(score("no rating"), -1.0);
/// ```
pub fn score(judgment: &str) -> f64 {
    find_number_in(judgment, "[[", "]]")
        .or_else(|| find_number_in(judgment, "[", "]"))
        .unwrap_or(-1.0)
}

/// The first `open` + `\d+\.?\d*` + `close` in `s`.
fn find_number_in(s: &str, open: &str, close: &str) -> Option<f64> {
    let mut from = 0;
    while let Some(i) = s[from..].find(open) {
        let start = from + i + open.len();
        let rest = &s[start..];
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            let mut end = digits;
            if rest[end..].starts_with('.') {
                end += 1 + rest[end + 1..]
                    .bytes()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
            }
            if rest[end..].starts_with(close) {
                return rest[..end].parse().ok();
            }
        }
        from = start;
    }
    None
}

/// Fill a FastChat prompt template (Python `str.format` with named fields;
/// `{{` and `}}` are literal braces).
pub fn fill(template: &str, fields: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
        } else if tail.starts_with('{') {
            let close = tail
                .find('}')
                .ok_or_else(|| Error::msg("a judge prompt template has an unclosed `{`"))?;
            let name = &tail[1..close];
            let value = fields
                .iter()
                .find(|(k, _)| *k == name)
                .ok_or_else(|| Error::msg(format!("a judge prompt template asks for `{{{name}}}`, which MT-Bench does not provide")))?
                .1;
            out.push_str(value);
            rest = &tail[close + 1..];
        } else {
            out.push('}');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_follow_fastchats_patterns_in_order() {
        assert_eq!(score("[[5]] then [[9]]"), 5.0);
        assert_eq!(score("[8] then [[2]]"), 2.0, "[[x]] is looked for first");
        assert_eq!(score("[[8.]]"), 8.0);
        assert_eq!(score("[[-3]]"), -1.0);
        assert_eq!(score("[[ 7 ]]"), -1.0);
        assert_eq!(score("Rating: [[10]]"), 10.0);
    }

    #[test]
    fn templates_fill_named_fields_and_keep_escaped_braces() {
        let t = "[Q]\n{question}\n{{literal}} {answer}";
        assert_eq!(
            fill(t, &[("question", "q?"), ("answer", "a.")]).unwrap(),
            "[Q]\nq?\n{literal} a."
        );
        assert!(fill("{nope}", &[])
            .unwrap_err()
            .to_string()
            .contains("`{nope}`"));
    }
}
