//! The README.md model card's YAML front matter as the converter reads it:
//! the lines between a first line `---` and the next `---`, with its two
//! textual fixes (a list item `- no` is quoted so it stays the language
//! code rather than a YAML 1.1 false; tabs become two spaces), parsed into
//! untyped values.
//!
//! Plain scalars are typed by the YAML parser with PyYAML's YAML 1.1 rules
//! where it offers them (yes/no/on/off booleans, 0755 octal, 1_000, .inf).
//! A few spellings still differ: here `y`/`n` are booleans, `1e3` a float,
//! `2024-01-01` and `1:30` strings, where PyYAML reads strings, a string, a
//! date and 90. They matter only where a card puts such a bare value in a
//! field written as a string, which the converter then fails to write.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::options::{DuplicateKeyPolicy, NonFiniteFloatPolicy};

/// An untyped YAML (or JSON) value, as the converter's Python sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Y {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Y>),
    /// Entries in file order; a repeated key keeps its last value.
    Map(Vec<(Y, Y)>),
}

impl Y {
    /// Python truthiness: None, False, 0, 0.0, "" and empty collections
    /// are false (the writer's add_string skips those).
    pub fn truthy(&self) -> bool {
        match self {
            Y::Null => false,
            Y::Bool(b) => *b,
            Y::Int(i) => *i != 0,
            Y::Float(x) => *x != 0.0,
            Y::Str(s) => !s.is_empty(),
            Y::Seq(v) => !v.is_empty(),
            Y::Map(m) => !m.is_empty(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Y::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What the value is, for an error message.
    pub fn describe(&self) -> String {
        match self {
            Y::Null => "null".into(),
            Y::Bool(b) => format!("the boolean {b}"),
            Y::Int(i) => format!("the number {i}"),
            Y::Float(x) => format!("the number {x}"),
            Y::Str(s) => format!("the string {s:?}"),
            Y::Seq(_) => "a list".into(),
            Y::Map(_) => "a mapping".into(),
        }
    }

    pub fn from_json(v: &serde_json::Value) -> Y {
        use serde_json::Value as J;
        match v {
            J::Null => Y::Null,
            J::Bool(b) => Y::Bool(*b),
            J::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Y::Int(i as i128),
                (None, Some(u)) => Y::Int(u as i128),
                _ => Y::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            J::String(s) => Y::Str(s.clone()),
            J::Array(a) => Y::Seq(a.iter().map(Y::from_json).collect()),
            J::Object(m) => Y::Map(m.iter().map(|(k, v)| (Y::Str(k.clone()), Y::from_json(v))).collect()),
        }
    }
}

impl<'de> Deserialize<'de> for Y {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Y, D::Error> {
        d.deserialize_any(YVisitor)
    }
}

struct YVisitor;

impl<'de> Visitor<'de> for YVisitor {
    type Value = Y;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Y, E> {
        Ok(Y::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Y, E> {
        Ok(Y::Int(v as i128))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Y, E> {
        Ok(Y::Int(v as i128))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Y, E> {
        Ok(Y::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Y, E> {
        Ok(i128::try_from(v).map(Y::Int).unwrap_or(Y::Float(v as f64)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Y, E> {
        Ok(Y::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Y, E> {
        Ok(Y::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Y, E> {
        Ok(Y::Str(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Y, E> {
        Ok(Y::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Y, E> {
        Ok(Y::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Y, D::Error> {
        Y::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Y, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Y>()? {
            out.push(v);
        }
        Ok(Y::Seq(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Y, A::Error> {
        let mut out: Vec<(Y, Y)> = Vec::new();
        while let Some((k, v)) = map.next_entry::<Y, Y>()? {
            match out.iter_mut().find(|(old, _)| *old == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
        Ok(Y::Map(out))
    }
}

/// The front matter's top-level mapping; empty without a README.md, without
/// front matter, or when the front matter is not a mapping. Front matter
/// that is not valid YAML is an error (the converter stops on it too).
pub fn load_model_card(dir: &Path) -> Result<Vec<(Y, Y)>> {
    let path = dir.join("README.md");
    if !path.is_file() {
        return Ok(vec![]);
    }
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to())
    })?;
    let Some(yaml) = front_matter(&text) else { return Ok(vec![]) };
    // PyYAML's choices where the parser offers them: the last of repeated keys
    // wins, 0755 is octal, .inf and .nan are floats.
    let opts = serde_saphyr::options! {
        duplicate_keys: DuplicateKeyPolicy::LastWins,
        legacy_octal_numbers: true,
        non_finite_float_policy: NonFiniteFloatPolicy::PassThrough,
    };
    let parsed: Option<Y> = serde_saphyr::from_str_with_options(&yaml, opts).map_err(|e| {
        let msg = e.without_snippet().to_string();
        let msg = msg.trim_start_matches("error: ");
        anyhow::anyhow!("{}: the YAML front matter (between the `---` lines) is malformed: {msg}", path.display())
    })?;
    match parsed {
        Some(Y::Map(m)) => Ok(m),
        _ => Ok(vec![]),
    }
}

/// The front matter text with the converter's fixes applied, or None when
/// the first line is not exactly `---`.
pub fn front_matter(text: &str) -> Option<String> {
    let lines = py_splitlines(text);
    if lines.first() != Some(&"---") {
        return None;
    }
    let body: Vec<&str> = lines[1..].iter().take_while(|l| **l != "---").copied().collect();
    let yaml = body.join("\n") + "\n";
    Some(yaml.replace("- no\n", "- \"no\"\n").replace('\t', "  "))
}

/// Python's str.splitlines(): every line boundary Python knows, no
/// trailing empty line after a final boundary.
fn py_splitlines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut it = text.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        let boundary = matches!(c, '\n' | '\r' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}' | '\u{2029}');
        if !boundary {
            continue;
        }
        out.push(&text[start..i]);
        let mut end = i + c.len_utf8();
        if c == '\r' && matches!(it.peek(), Some((_, '\n'))) {
            it.next();
            end += 1;
        }
        start = end;
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}
