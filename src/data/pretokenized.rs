//! Pre-tokenized JSONL rows: {"input_ids": [...], "labels": [...]?,
//! "attention_mask": [...]?}. Labels default to input_ids; -100 marks a
//! token that is not scored. Positions whose attention_mask is 0 are padding
//! and are dropped (the model never sees padding).

use crate::model::batch::{IGNORE_INDEX, Sequence};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;

fn int_array(v: &Value, field: &str, loc: &str) -> Result<Vec<i64>> {
    let arr = v
        .as_array()
        .with_context(|| format!("{loc}: \"{field}\" must be a list of integers, found {}", kind(v)))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64().with_context(|| format!("{loc}: \"{field}\"[{i}] must be an integer, found {x}"))
        })
        .collect()
}

/// What a JSON value is, for messages ("found a list").
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Parse one row; `loc` is "file:line" for messages.
pub fn parse_row(v: &Value, loc: &str) -> Result<Sequence> {
    let obj = v.as_object().with_context(|| format!("{loc}: expected a JSON object with \"input_ids\", found {}", kind(v)))?;
    let ids_v = obj.get("input_ids").with_context(|| {
        let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        format!("{loc}: missing \"input_ids\" (pre-tokenized rows need input_ids and optionally labels); found keys {keys:?}")
    })?;
    let ids = int_array(ids_v, "input_ids", loc)?;
    let labels = match obj.get("labels") {
        None | Some(Value::Null) => ids.clone(),
        Some(l) => int_array(l, "labels", loc)?,
    };
    if labels.len() != ids.len() {
        bail!("{loc}: \"labels\" has {} entries but \"input_ids\" has {}", labels.len(), ids.len());
    }
    let mask = match obj.get("attention_mask") {
        None | Some(Value::Null) => vec![1; ids.len()],
        Some(m) => int_array(m, "attention_mask", loc)?,
    };
    if mask.len() != ids.len() {
        bail!("{loc}: \"attention_mask\" has {} entries but \"input_ids\" has {}", mask.len(), ids.len());
    }
    let mut seq = Sequence { input_ids: Vec::with_capacity(ids.len()), labels: Vec::with_capacity(ids.len()) };
    for (i, ((&id, &label), &m)) in ids.iter().zip(&labels).zip(&mask).enumerate() {
        if m == 0 {
            continue;
        }
        if id < 0 || id > u32::MAX as i64 {
            bail!("{loc}: input_ids[{i}] = {id} is not a valid token id");
        }
        if label != IGNORE_INDEX as i64 && (label < 0 || label > i32::MAX as i64) {
            bail!("{loc}: labels[{i}] = {label} must be a token id or -100");
        }
        seq.input_ids.push(id as u32);
        seq.labels.push(label as i32);
    }
    if seq.input_ids.is_empty() {
        bail!("{loc}: the row has no tokens");
    }
    Ok(seq)
}

/// Read every row of a JSONL file (blank lines are skipped). With `vocab`,
/// every token id and label must be below it (checked here so the error
/// names the file and line).
pub fn read_jsonl(path: &Path, vocab: Option<usize>) -> Result<Vec<Sequence>> {
    super::rows::read(path, None)?
        .iter()
        .map(|(loc, v)| {
            let seq = parse_row(v, loc)?;
            if let Some(vocab) = vocab {
                check_vocab(&seq, vocab, loc)?;
            }
            Ok(seq)
        })
        .collect()
}

/// Every id and every scored label must be a token of the model.
pub fn check_vocab(seq: &Sequence, vocab: usize, loc: &str) -> Result<()> {
    if let Some((i, id)) = seq.input_ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
        bail!("{loc}: input_ids[{i}] = {id} is outside the model's vocabulary (size {vocab})");
    }
    if let Some((i, l)) = seq.labels.iter().enumerate().find(|(_, l)| **l != IGNORE_INDEX && **l as usize >= vocab) {
        bail!("{loc}: labels[{i}] = {l} is outside the model's vocabulary (size {vocab})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_default_and_padding_is_dropped() {
        let s = parse_row(&json!({"input_ids": [3, 4, 0], "attention_mask": [1, 1, 0]}), "f:1").unwrap();
        assert_eq!(s.input_ids, vec![3, 4]);
        assert_eq!(s.labels, vec![3, 4]);
    }

    #[test]
    fn bad_rows_name_the_location_and_the_problem() {
        let e = parse_row(&json!({"text": "hi"}), "d.jsonl:7").unwrap_err().to_string();
        assert!(e.contains("d.jsonl:7") && e.contains("missing \"input_ids\""), "{e}");
        let e = parse_row(&json!({"input_ids": "1 2"}), "d.jsonl:2").unwrap_err().to_string();
        assert!(e.contains("must be a list of integers, found a string"), "{e}");
        let e = parse_row(&json!({"input_ids": [1, 2], "labels": [1]}), "d.jsonl:3").unwrap_err().to_string();
        assert!(e.contains("\"labels\" has 1 entries"), "{e}");
        let e = parse_row(&json!({"input_ids": [1, -5]}), "x:1").unwrap_err().to_string();
        assert!(e.contains("input_ids[1] = -5"), "{e}");
    }
}
