//! The built-in reward functions, computed in Rust with no Python:
//! `builtin:answer_match[:COLUMN]` (the completion's final answer against a
//! reference column), `builtin:format:REGEX` (the completion text matches a
//! regex) and `builtin:length:TARGET` (a penalty for completions longer than
//! TARGET tokens). Each is parsed from its config name here, so a bad
//! argument fails before training starts.

use super::Scored;
use anyhow::{Context, Result, bail};
use crate::data::pretokenized::kind;
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

/// The prefix that marks a built-in; a colon cannot appear in a Python
/// module path, so the two kinds of name never overlap.
pub const PREFIX: &str = "builtin:";

/// The built-ins, as a user would write them (for the unknown-name error).
pub const KNOWN: &str = "builtin:answer_match[:COLUMN], builtin:format:REGEX, builtin:length:TARGET";

/// One parsed built-in.
#[derive(Debug, Clone)]
pub enum Builtin {
    /// 1.0 when the completion's final answer equals the column's.
    AnswerMatch { column: String },
    /// 1.0 when the regex (dot matches newline) matches the completion text.
    Format { regex: Regex },
    /// −max(0, tokens − target) / target.
    Length { target: usize },
}

impl Builtin {
    /// Parses `builtin:NAME[:ARG]` (`name` is the whole config entry).
    pub fn parse(name: &str) -> Result<Builtin> {
        let rest = name.strip_prefix(PREFIX).with_context(|| format!("`{name}` is not a built-in"))?;
        let (kind, arg) = match rest.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (rest, None),
        };
        match (kind, arg) {
            ("answer_match", None) => Ok(Builtin::AnswerMatch { column: "answer".into() }),
            ("answer_match", Some(col)) if !col.trim().is_empty() => Ok(Builtin::AnswerMatch { column: col.trim().into() }),
            ("answer_match", Some(_)) => bail!("reward function `{name}`: the column name after `answer_match:` is empty"),
            ("format", Some(re)) if !re.is_empty() => {
                let regex = Regex::new(&format!("(?s){re}")).map_err(|e| {
                    // The regex crate draws a multi-line caret diagram; its
                    // last line says what is wrong.
                    let text = e.to_string();
                    let why = text.lines().last().unwrap_or_default().trim_start_matches("error: ").to_string();
                    anyhow::anyhow!("reward function `{name}`: `{re}` is not a valid regular expression ({why})")
                })?;
                Ok(Builtin::Format { regex })
            }
            ("format", _) => bail!("reward function `{name}`: expected builtin:format:REGEX (the regex is missing)"),
            ("length", Some(t)) => match t.trim().parse::<usize>() {
                Ok(target) if target > 0 => Ok(Builtin::Length { target }),
                _ => bail!("reward function `{name}`: the target length must be a whole number of tokens above 0, not `{t}`"),
            },
            ("length", None) => bail!("reward function `{name}`: expected builtin:length:TARGET (the target token count is missing)"),
            _ => bail!("reward function `{name}`: unknown built-in `{kind}`; the built-ins are {KNOWN}"),
        }
    }

    /// The name the metrics use (`rewards/<short>/mean`).
    pub fn short_name(&self) -> &'static str {
        match self {
            Builtin::AnswerMatch { .. } => "answer_match",
            Builtin::Format { .. } => "format",
            Builtin::Length { .. } => "length",
        }
    }

    /// The reward of one completion; None where it does not apply (the
    /// reference answer is null). `name` and `step` are for errors only.
    pub fn score(&self, name: &str, step: usize, s: &Scored) -> Result<Option<f64>> {
        let fail = |what: String| anyhow::anyhow!("reward function `{name}` at step {step}: {what}");
        Ok(match self {
            Builtin::AnswerMatch { column } => {
                let Some(reference) = s.columns.get(column) else {
                    let have: Vec<&str> = s.columns.keys().map(String::as_str).collect();
                    return Err(fail(format!("the row has no column `{column}` (it has: {})", list_or_none(&have))));
                };
                let reference = match reference {
                    Value::Null => return Ok(None),
                    Value::String(t) => t.clone(),
                    Value::Number(n) => n.to_string(),
                    other => return Err(fail(format!("column `{column}` holds {}, expected the reference answer as text or a number", kind(other)))),
                };
                let text = completion_text(s.completion).map_err(fail)?;
                Some(if answers_match(&reference, &text) { 1.0 } else { 0.0 })
            }
            Builtin::Format { regex } => {
                let text = completion_text(s.completion).map_err(fail)?;
                Some(if regex.is_match(&text) { 1.0 } else { 0.0 })
            }
            Builtin::Length { target } => {
                let over = s.completion_ids.len().saturating_sub(*target);
                Some(-(over as f64) / *target as f64)
            }
        })
    }
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() { "no other columns".into() } else { names.join(", ") }
}


/// The completion's text: the string itself, or the content of the last
/// message of a conversational completion (text parts joined when the
/// content is a list of `{type: text, text}` parts).
pub fn completion_text(completion: &Value) -> std::result::Result<String, String> {
    match completion {
        Value::String(t) => Ok(t.clone()),
        Value::Array(messages) => match messages.last() {
            None => Ok(String::new()),
            Some(m) => match m.get("content") {
                Some(Value::String(t)) => Ok(t.clone()),
                Some(Value::Array(parts)) => Ok(parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect()),
                Some(Value::Null) | None => Ok(String::new()),
                Some(other) => Err(format!("the completion's last message has {} as content, expected text", kind(other))),
            },
        },
        other => Err(format!("the completion is {}, expected a string or a list of messages", kind(other))),
    }
}

/// Whether the completion's final answer equals the reference (see
/// [`reference_answer`] and [`final_answer`]): numerically when both read as
/// numbers, else as trimmed strings.
pub fn answers_match(reference: &str, completion: &str) -> bool {
    let want = reference_answer(reference);
    let Some(got) = final_answer(completion) else { return false };
    match (as_number(&want), as_number(&got)) {
        (Some(a), Some(b)) => a == b,
        _ => want == got,
    }
}

/// The reference: the text after the last "####" (GSM8K's answer line),
/// else the whole text, trimmed.
pub fn reference_answer(text: &str) -> String {
    after_hashes(text).unwrap_or(text).trim().to_string()
}

/// A completion's final answer: after the last "####", else the content of
/// the last `\boxed{..}`, else the last number in the text; None when it has
/// none of these.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(rest) = after_hashes(text) {
        return Some(rest.trim().to_string());
    }
    if let Some(boxed) = last_boxed(text) {
        return Some(boxed.trim().to_string());
    }
    last_number(text).map(str::to_string)
}

fn after_hashes(text: &str) -> Option<&str> {
    text.rfind("####").map(|i| &text[i + 4..])
}

/// The content of the last `\boxed{...}`, braces matched (so
/// `\boxed{\frac{1}{2}}` gives `\frac{1}{2}`); an unclosed one is skipped.
fn last_boxed(text: &str) -> Option<&str> {
    let mut found = None;
    let mut from = 0;
    while let Some(i) = text[from..].find("\\boxed{") {
        let open = from + i + "\\boxed{".len();
        let mut depth = 1usize;
        let mut close = None;
        for (j, c) in text[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + j);
                        break;
                    }
                }
                _ => {}
            }
        }
        if let Some(c) = close {
            found = Some(&text[open..c]);
        }
        from = open;
    }
    found
}

/// Digits with optional thousands commas and decimals, with a sign when the
/// minus is not the tail of another token ("5-3" gives 5 and 3, "x = -3"
/// gives -3).
static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?").unwrap());

fn last_number(text: &str) -> Option<&str> {
    let m = NUMBER.find_iter(text).last()?;
    let s = m.as_str();
    let signed_by_token = s.starts_with('-') && text[..m.start()].chars().next_back().is_some_and(|c| c.is_alphanumeric());
    Some(if signed_by_token { &s[1..] } else { s })
}

/// The value of an answer that reads as a number once "$", "," and a
/// trailing "." are removed ("$1,234." is 1234, "42.0" is 42).
pub fn as_number(answer: &str) -> Option<f64> {
    let cleaned: String = answer.trim().chars().filter(|c| *c != ',' && *c != '$').collect();
    let cleaned = cleaned.trim();
    let cleaned = cleaned.strip_suffix('.').unwrap_or(cleaned).trim();
    // Only plain decimals: Rust would also read "inf" or "nan", which are
    // words here, not numbers.
    let plain = !cleaned.is_empty() && cleaned.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if !plain || !cleaned.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    cleaned.parse::<f64>().ok()
}

#[cfg(test)]
#[path = "builtin_tests.rs"]
mod tests;
