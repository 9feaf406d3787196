//! The config text as a tree that remembers the line of every key, and the
//! `Locator` that turns a key path into the "file:line: " that starts an
//! error or warning about it.
//!
//! A key path is the keys and list indices joined by dots, as `--set` takes
//! them: `learning_rate`, `datasets.0.path`.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use serde_saphyr::Spanned;
use std::collections::HashMap;
use std::fmt;

/// A YAML node whose mapping keys carry their source line.
enum Node {
    Scalar(Value),
    Seq(Vec<Node>),
    Map(Vec<(Spanned<String>, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Scalar(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Scalar(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Scalar(Value::from(v)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        serde_json::Number::from_f64(v)
            .map(|n| Node::Scalar(Value::Number(n)))
            .ok_or_else(|| E::custom(format!("{v} is not a finite number")))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Scalar(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Scalar(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            entries.push((key, map.next_value::<Node>()?));
        }
        Ok(Node::Map(entries))
    }
}

/// Parsed config text: the value tree, the keys of each mapping in the
/// order they were written, and the line of every key.
pub(crate) struct Parsed {
    pub value: Value,
    /// Key path -> 1-based line.
    pub lines: HashMap<String, usize>,
    /// Key path of a mapping -> its keys in file order (the value's maps
    /// are sorted, and the first problem in the file should be the one reported).
    pub key_order: HashMap<String, Vec<String>>,
}

/// Parse YAML text. `Ok(None)` for a file with no document (empty or only comments).
pub(crate) fn parse(text: &str) -> Result<Option<Parsed>, String> {
    let node: Option<Node> = serde_saphyr::from_str(text).map_err(|e| yaml_error_text(&e))?;
    Ok(node.map(|node| {
        let mut parsed = Parsed { value: Value::Null, lines: HashMap::new(), key_order: HashMap::new() };
        parsed.value = flatten(node, "", &mut parsed);
        parsed
    }))
}

/// The parser's message and position, without its source snippet and
/// without advice about the parser's own options.
pub(crate) fn yaml_error_text(e: &serde_saphyr::Error) -> String {
    e.without_snippet()
        .to_string()
        .trim_start_matches("error: ")
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
}

fn flatten(node: Node, path: &str, out: &mut Parsed) -> Value {
    match node {
        Node::Scalar(v) => v,
        Node::Seq(items) => {
            Value::Array(items.into_iter().enumerate().map(|(i, n)| flatten(n, &join(path, &i.to_string()), out)).collect())
        }
        Node::Map(entries) => {
            let mut map = Map::new();
            let mut order = Vec::new();
            for (key, node) in entries {
                let child = join(path, &key.value);
                let line = key.referenced.line() as usize;
                if line > 0 {
                    out.lines.insert(child.clone(), line);
                }
                order.push(key.value.clone());
                map.insert(key.value, flatten(node, &child, out));
            }
            out.key_order.insert(path.to_string(), order);
            Value::Object(map)
        }
    }
}

/// `parent.key`, or `key` at the top.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

/// A key path as a person reads it: `datasets[0].path`.
pub(crate) fn display_path(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if seg.parse::<usize>().is_ok() && !out.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}

/// Where a key's value came from, for error and warning prefixes.
pub(crate) struct Locator {
    file: Option<String>,
    lines: HashMap<String, usize>,
    /// (key path, the `--set` argument as given), later arguments last.
    overrides: Vec<(String, String)>,
}

impl Locator {
    /// For a config built in code: no prefix.
    pub fn none() -> Locator {
        Locator { file: None, lines: HashMap::new(), overrides: Vec::new() }
    }

    pub fn new(file: &str, lines: HashMap<String, usize>) -> Locator {
        Locator { file: Some(file.to_string()), lines, overrides: Vec::new() }
    }

    pub fn add_override(&mut self, path: &str, arg: &str) {
        self.overrides.push((path.to_string(), arg.to_string()));
    }

    /// "file:line: ", "--set key=value: " when an override set this key (or
    /// a whole list or mapping holding it), "file: " when the key is not in
    /// the file (a default, or a missing key), "" for a config built in code.
    pub fn at(&self, path: &str) -> String {
        let set_by = self.overrides.iter().rev().find(|(p, _)| path == p || path.starts_with(&format!("{p}.")));
        if let Some((_, arg)) = set_by {
            return format!("--set {arg}: ");
        }
        match (&self.file, self.lines.get(path)) {
            (Some(file), Some(line)) => format!("{file}:{line}: "),
            (Some(file), None) => format!("{file}: "),
            (None, _) => String::new(),
        }
    }

    /// The file's name alone, for problems with the whole file.
    pub fn file(&self) -> String {
        self.file.as_ref().map(|f| format!("{f}: ")).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_nested_keys() {
        let text = "base_model: m\n# a comment\n\ndatasets:\n  - path: a.jsonl\n    type: alpaca\n  - path: b.jsonl\n";
        let p = parse(text).unwrap().unwrap();
        assert_eq!(p.lines["base_model"], 1);
        assert_eq!(p.lines["datasets"], 4);
        assert_eq!(p.lines["datasets.0.path"], 5);
        assert_eq!(p.lines["datasets.0.type"], 6);
        assert_eq!(p.lines["datasets.1.path"], 7);
        assert_eq!(p.key_order[""], vec!["base_model", "datasets"]);
    }

    #[test]
    fn empty_text_has_no_document() {
        assert!(parse("# nothing\n").unwrap().is_none());
    }

    #[test]
    fn invalid_yaml_names_the_line() {
        let err = parse("a: 1\n  b: [\n").err().unwrap();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn locator_prefers_overrides() {
        let mut loc = Locator::new("run.yml", HashMap::from([("lora_r".to_string(), 3)]));
        assert_eq!(loc.at("lora_r"), "run.yml:3: ");
        assert_eq!(loc.at("seed"), "run.yml: ");
        loc.add_override("datasets", "datasets=[]");
        loc.add_override("lora_r", "lora_r=0");
        assert_eq!(loc.at("lora_r"), "--set lora_r=0: ");
        assert_eq!(loc.at("datasets.0.path"), "--set datasets=[]: ");
        assert_eq!(display_path("datasets.0.path"), "datasets[0].path");
    }
}
