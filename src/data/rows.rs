//! Dataset files into JSON rows, each with its "file:line" location: the one
//! place that decides how a file's bytes become rows, shared by the SFT,
//! preference and pre-tokenized readers.
//!
//! - The text must be UTF-8; a byte-order mark at the start is skipped (editors
//!   on Windows write one, and Python's datasets library skips it too).
//! - `.jsonl` (and any other extension): one JSON value per line, blank lines
//!   skipped.
//! - `.json`: a list of rows, or an object holding the list under `field`; a
//!   `.json` file that is really one object per line is read as JSON Lines, as
//!   the datasets library's JSON reader does.
//! - `.parquet`, `.csv` and `.tsv`: rows parsed by `tabular`, located as
//!   `file:row N`.

use anyhow::{Result, anyhow, bail};
use serde_json::Value;
use std::path::Path;

/// One row awaiting parsing: JSON Lines rows stay text so that callers can
/// parse them in parallel.
pub enum RawRow<'a> {
    Line(&'a str),
    Parsed(Value),
}

impl RawRow<'_> {
    /// The row's JSON; a malformed line is an error at its location.
    pub fn parse(&self, loc: &str) -> Result<std::borrow::Cow<'_, Value>> {
        match self {
            RawRow::Line(s) => serde_json::from_str::<Value>(s)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| anyhow!("{loc}: malformed JSON: {e}")),
            RawRow::Parsed(v) => Ok(std::borrow::Cow::Borrowed(v)),
        }
    }
}

/// The file's text: UTF-8 (the error names the first bad line), without a
/// leading byte-order mark.
pub fn text<'a>(bytes: &'a [u8], name: &str) -> Result<&'a str> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        anyhow!("{name}:{line}: the file is not valid UTF-8 (save it as UTF-8)")
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// Whether `path` names a `.json` file (a list of rows, or JSON Lines).
pub fn is_json(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("json")
}

/// The extensions of the files rows are read from.
pub const EXTENSIONS: [&str; 5] = ["jsonl", "json", "parquet", "csv", "tsv"];

/// Whether rows can be read from the file at `path` (by its extension).
pub fn is_data_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e))
}

/// The rows of one dataset file, whose bytes are `bytes`: JSON Lines rows
/// stay unparsed; parquet is read through `path` (its reader seeks).
pub fn file_rows<'a>(path: &Path, bytes: &'a [u8], field: Option<&str>) -> Result<Vec<(String, RawRow<'a>)>> {
    let name = path.display().to_string();
    let parsed = |rows: Vec<(String, Value)>| rows.into_iter().map(|(l, v)| (l, RawRow::Parsed(v))).collect();
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => Ok(parsed(super::tabular::parquet_rows(path)?)),
        Some(ext @ ("csv" | "tsv")) => Ok(parsed(super::tabular::csv_rows(bytes, &name, ext == "tsv")?)),
        _ => split(text(bytes, &name)?, &name, is_json(path), field),
    }
}

/// The rows of one file's text; `json` for a `.json` file. An empty file
/// is an error naming it.
pub fn split<'a>(text: &'a str, name: &str, json: bool, field: Option<&str>) -> Result<Vec<(String, RawRow<'a>)>> {
    let rows = if json && !(field.is_none() && is_json_lines(text)) {
        json_rows(text, name, field)?.into_iter().map(|(l, v)| (l, RawRow::Parsed(v))).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| (format!("{name}:{}", i + 1), RawRow::Line(line)))
            .collect::<Vec<_>>()
    };
    if rows.is_empty() {
        bail!("{name}: the dataset file has no rows");
    }
    Ok(rows)
}

/// Every row of the file at `path`, parsed, with its location.
pub fn read(path: &Path, field: Option<&str>) -> Result<Vec<(String, Value)>> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read dataset file {name}: {e}"))?;
    file_rows(path, &bytes, field)?
        .into_iter()
        .map(|(loc, raw)| {
            let v = raw.parse(&loc)?.into_owned();
            Ok((loc, v))
        })
        .collect()
}

/// A `.json` file holding one object per line: its first non-blank line is
/// a whole JSON object by itself and more non-blank lines follow.
fn is_json_lines(text: &str) -> bool {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let Some(first) = lines.next() else { return false };
    first.trim_start().starts_with('{')
        && lines.next().is_some()
        && serde_json::from_str::<Value>(first).is_ok_and(|v| v.is_object())
}

/// The rows of a .json file: a list, or an object holding the list under
/// `field`. Rows of a top-level list are located by line.
fn json_rows(text: &str, name: &str, field: Option<&str>) -> Result<Vec<(String, Value)>> {
    let start = text.len() - text.trim_start().len();
    if text[start..].starts_with('[') && field.is_none() {
        return list_rows(text, start, name);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{name}:{}: malformed JSON: {e}", e.line()))?;
    let (list, label) = match (&v, field) {
        (Value::Object(o), Some(f)) => match o.get(f) {
            Some(Value::Array(a)) => (a, f.to_string()),
            Some(_) => bail!("{name}: \"{f}\" (the dataset's field) must be a list of rows"),
            None => bail!("{name}: no \"{f}\" key (the dataset's field); found keys {:?}", o.keys().collect::<Vec<_>>()),
        },
        (Value::Object(o), None) => bail!(
            "{name}: the file holds an object with keys {:?}; set field: to the key that holds the list of rows",
            o.keys().collect::<Vec<_>>()
        ),
        (Value::Array(a), _) => (a, String::new()),
        _ => bail!("{name}: expected a list of rows (or an object holding one under field:)"),
    };
    Ok(list.iter().enumerate().map(|(i, row)| (format!("{name}: {label}[{i}]"), row.clone())).collect())
}

/// Elements of a top-level JSON list, each with the line it starts on.
fn list_rows(text: &str, open: usize, name: &str) -> Result<Vec<(String, Value)>> {
    let bytes = text.as_bytes();
    let skip_ws = |mut p: usize| {
        while p < bytes.len() && bytes[p].is_ascii_whitespace() {
            p += 1;
        }
        p
    };
    let mut line = 1 + bytes[..open].iter().filter(|&&b| b == b'\n').count();
    let mut seen = open;
    let mut line_at = |p: usize| {
        line += bytes[seen..p].iter().filter(|&&b| b == b'\n').count();
        seen = p;
        line
    };
    let mut out = Vec::new();
    let mut pos = skip_ws(open + 1);
    if bytes.get(pos) == Some(&b']') {
        return Ok(out);
    }
    loop {
        let l = line_at(pos);
        let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => out.push((format!("{name}:{l}"), v)),
            Some(Err(e)) => bail!("{name}:{}: malformed JSON: {e}", l + e.line() - 1),
            None => bail!("{name}:{l}: malformed JSON: the list is not closed"),
        }
        pos = skip_ws(pos + stream.byte_offset());
        match bytes.get(pos) {
            Some(b',') => pos = skip_ws(pos + 1),
            Some(b']') => break,
            _ => bail!("{name}:{}: malformed JSON: expected ',' or ']' after a row", line_at(pos.min(bytes.len()))),
        }
    }
    if skip_ws(pos + 1) != bytes.len() {
        bail!("{name}:{}: malformed JSON: text after the closing ']'", line_at(skip_ws(pos + 1)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locs(text: &str, json: bool) -> Vec<String> {
        split(text, "f", json, None).unwrap().into_iter().map(|(l, _)| l).collect()
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let bytes = b"\xef\xbb\xbf{\"a\": 1}\n";
        let t = text(bytes, "f.jsonl").unwrap();
        let rows = split(t, "f.jsonl", false, None).unwrap();
        assert_eq!(rows[0].1.parse("f.jsonl:1").unwrap()["a"], 1);
    }

    #[test]
    fn bad_utf8_names_the_line() {
        let e = text(b"{\"a\": 1}\n{\"a\": \"\xff\"}\n", "f.jsonl").unwrap_err().to_string();
        assert_eq!(e, "f.jsonl:2: the file is not valid UTF-8 (save it as UTF-8)");
    }

    #[test]
    fn a_json_file_of_one_object_per_line_is_json_lines() {
        assert_eq!(locs("{\"a\": 1}\n\n{\"a\": 2}\n", true), ["f:1", "f:3"]);
        // A list, and one pretty-printed object under a field, stay JSON.
        assert_eq!(locs("[{\"a\": 1},\n {\"a\": 2}]", true), ["f:1", "f:2"]);
        let one = split("{\n \"rows\": [{\"a\": 1}]\n}", "f", true, Some("rows")).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn an_empty_file_is_named() {
        let e = split("\n \n", "d.jsonl", false, None).err().unwrap().to_string();
        assert_eq!(e, "d.jsonl: the dataset file has no rows");
    }

    #[test]
    fn list_rows_know_their_lines_and_errors_point_at_them() {
        let rows = list_rows("[\n {\"a\": 1},\n\n {\"a\": [2,\n 3]} ]\n", 0, "f.json").unwrap();
        assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["f.json:2", "f.json:4"]);
        let e = list_rows("[\n {\"a\": 1},\n {\"a\": }\n]", 0, "f.json").unwrap_err().to_string();
        assert!(e.starts_with("f.json:3: malformed JSON"), "{e}");
        let e = list_rows("[\n {\"a\": 1}\n {\"a\": 2}]", 0, "f.json").unwrap_err().to_string();
        assert!(e.starts_with("f.json:3: malformed JSON: expected ','"), "{e}");
        assert!(list_rows("[]", 0, "f").unwrap().is_empty());
    }
}
