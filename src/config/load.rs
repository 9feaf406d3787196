//! Reading a run config: YAML text -> key checks -> `--set` overrides ->
//! typed `RunConfig` -> value checks.
//!
//! The text is first read as a generic tree (with the line of every key), so
//! that an unknown key, an unsupported feature or a wrong type is reported
//! by name and line before anything is typed.

use super::keys::{self, ADAMW_NAMES, KeyKind, Level};
use super::source::{self, Locator, display_path, join};
use super::validate::{self, SCHEDULER_ALIASES};
use super::{DatasetConfig, RunConfig};
use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// A loaded, checked run config and what the user should be told about it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: RunConfig,
    /// One line each: an accepted key that has no effect, and why.
    pub warnings: Vec<String>,
}

/// Keys a run cannot do without.
const REQUIRED: &[(&str, &str)] = &[
    ("base_model", "the model directory or hub id to fine-tune"),
    ("datasets", "the list of datasets to train on"),
    ("learning_rate", "e.g. 2e-4 for LoRA"),
];

const DATASET_LISTS: &[&str] = &["datasets", "test_datasets"];

/// Read, check and type the run config at `path`, with `--set key=value`
/// overrides applied (in order) before any check.
pub fn load(path: &Path, overrides: &[String]) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read run config {}", path.display()))?;
    load_str(&text, &path.display().to_string(), overrides)
}

/// `load` for config text already in memory; `file` names it in messages.
pub fn load_str(text: &str, file: &str, overrides: &[String]) -> Result<Loaded> {
    let parsed = source::parse(text).map_err(|e| anyhow!("{file}: not valid YAML: {e}"))?;
    let (mut root, lines, key_order) = match parsed {
        None => (Map::new(), HashMap::new(), HashMap::new()),
        Some(p) => match p.value {
            Value::Object(map) => (map, p.lines, p.key_order),
            Value::Null => (Map::new(), p.lines, p.key_order),
            other => bail!(
                "{file}: a run config is a mapping of keys (base_model: ..., datasets: ...), not {}",
                describe(&other)
            ),
        },
    };
    let mut loc = Locator::new(file, lines);
    super::overrides::apply(&mut root, overrides, &mut loc)?;

    let mut checker = KeyChecker { loc: &loc, key_order: &key_order, warnings: Vec::new() };
    checker.check_map(Level::Top, "", &mut root)?;
    let mut warnings = checker.warnings;

    for (key, what) in REQUIRED {
        if !root.contains_key(*key) {
            bail!("{}{key} is required: {what}", loc.file());
        }
    }
    let mut config: RunConfig = typed(&root, &loc)?;
    normalise(&mut config);
    validate::validate(&config, &loc)?;
    if config.adapter.is_none() {
        warnings.push(format!(
            "{}adapter is not set: Axolotl would fine-tune every weight, ferrotune trains a LoRA adapter (write adapter: lora to say so)",
            loc.file()
        ));
    }
    Ok(Loaded { config, warnings })
}

/// One spelling per meaning, so the trainer matches on exact names.
fn normalise(c: &mut RunConfig) {
    if let Some((_, canonical)) = SCHEDULER_ALIASES.iter().find(|(alias, _)| *alias == c.lr_scheduler) {
        c.lr_scheduler = canonical.to_string();
    }
    if ADAMW_NAMES.contains(&c.optimizer.as_str()) {
        c.optimizer = ADAMW_NAMES[0].to_string();
    }
}

/// Walks the mappings, sorting each key into acted-on, ignored (warned),
/// unsupported (error when asked for) or unknown (error).
struct KeyChecker<'a> {
    loc: &'a Locator,
    key_order: &'a HashMap<String, Vec<String>>,
    warnings: Vec<String>,
}

impl KeyChecker<'_> {
    /// The mapping's keys in file order, then any that overrides added.
    fn ordered(&self, path: &str, map: &Map<String, Value>) -> Vec<String> {
        let mut keys: Vec<String> =
            self.key_order.get(path).map(|o| o.iter().filter(|k| map.contains_key(*k)).cloned().collect()).unwrap_or_default();
        for k in map.keys() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
        keys
    }

    /// Check one mapping; leaves only typed fields with non-null values
    /// (null means "the default", as in Axolotl).
    fn check_map(&mut self, level: Level, at: &str, map: &mut Map<String, Value>) -> Result<()> {
        for key in self.ordered(at, map) {
            let path = join(at, &key);
            let shown = display_path(&path);
            let value = &map[&key];
            let keep = match keys::classify(level, &key) {
                KeyKind::Field => true,
                KeyKind::Unsupported(u) => {
                    if u.when.applies(value) {
                        bail!("{}{}", self.loc.at(&path), u.message(&shown, value));
                    }
                    keys::is_field(level, &key)
                }
                KeyKind::Ignored(reason) => {
                    if !value.is_null() {
                        self.warnings.push(format!("{}{shown} is ignored: {reason}", self.loc.at(&path)));
                    }
                    false
                }
                KeyKind::Unknown => {
                    let hint = keys::suggest(level, &key).map(|k| format!(" (did you mean \"{k}\"?)")).unwrap_or_default();
                    let place = if at.is_empty() { String::new() } else { format!(" in {}", display_path(at)) };
                    bail!("{}unknown key \"{key}\"{place}{hint}", self.loc.at(&path));
                }
            };
            if !keep || map[&key].is_null() {
                map.remove(&key);
                continue;
            }
            if level == Level::Top && DATASET_LISTS.contains(&key.as_str()) {
                self.check_dataset_list(&path, map.get_mut(&key).expect("kept above"))?;
            }
        }
        Ok(())
    }

    fn check_dataset_list(&mut self, at: &str, list: &mut Value) -> Result<()> {
        let Value::Array(entries) = list else {
            bail!("{}{} must be a list of dataset entries (- path: ...), not {}", self.loc.at(at), at, describe(list));
        };
        for (i, entry) in entries.iter_mut().enumerate() {
            let path = join(at, &i.to_string());
            let Value::Object(map) = entry else {
                bail!(
                    "{}{} must be a mapping with at least path (path: data.jsonl), not {}",
                    self.loc.at(&path),
                    display_path(&path),
                    describe(entry)
                );
            };
            self.check_map(Level::Dataset, &path, map)?;
        }
        Ok(())
    }
}

/// Type the checked mapping. When that fails, find the key at fault by
/// typing one key at a time (every field has a default), so the message
/// names it and its line.
fn typed(root: &Map<String, Value>, loc: &Locator) -> Result<RunConfig> {
    match serde_json::from_value::<RunConfig>(Value::Object(root.clone())) {
        Ok(c) => Ok(c),
        Err(whole) => {
            for (key, value) in root {
                if DATASET_LISTS.contains(&key.as_str())
                    && let Value::Array(entries) = value
                {
                    for (i, entry) in entries.iter().enumerate() {
                        if let Value::Object(fields) = entry {
                            for (k, v) in fields {
                                probe::<DatasetConfig>(&format!("{key}.{i}.{k}"), k, v, loc)?;
                            }
                        }
                    }
                    continue;
                }
                probe::<RunConfig>(key, key, value, loc)?;
            }
            Err(anyhow!("{}{whole}", loc.file()))
        }
    }
}

/// Type `{key: value}` alone as `T`; an error names the key and the type it needs.
fn probe<T: DeserializeOwned>(path: &str, key: &str, value: &Value, loc: &Locator) -> Result<()> {
    let one = Value::Object(Map::from_iter([(key.to_string(), value.clone())]));
    match serde_json::from_value::<T>(one) {
        Ok(_) => Ok(()),
        Err(e) => {
            let expected = keys::expected_override(key).map(str::to_string).unwrap_or_else(|| expected_from(&e.to_string()));
            bail!("{}{} must be {expected}, not {}", loc.at(path), display_path(path), describe(value))
        }
    }
}

/// serde's "..., expected f64" in words.
fn expected_from(serde_msg: &str) -> String {
    let raw = serde_msg.rsplit_once("expected ").map(|(_, t)| t.trim()).unwrap_or(serde_msg);
    match raw {
        "f64" | "f32" => "a number".into(),
        "usize" | "u64" | "u32" | "u16" | "u8" => "a whole number, 0 or more".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        other => other.to_string(),
    }
}

/// A value as an error shows it: the string "fast", the number 1.5, a list.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => format!("the string \"{}\"", keys::show_value(v)),
        Value::Array(_) => format!("a list ({})", keys::show_value(v)),
        Value::Object(_) => format!("a mapping ({})", keys::show_value(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serde_types_in_words() {
        assert_eq!(expected_from("invalid type: string \"fast\", expected f64"), "a number");
        assert_eq!(expected_from("invalid value: integer `-1`, expected usize"), "a whole number, 0 or more");
        assert_eq!(expected_from("invalid type: string \"x\", expected a boolean"), "true or false");
        assert_eq!(expected_from("invalid type: string \"x\", expected a sequence"), "a list");
    }

    #[test]
    fn values_in_words() {
        assert_eq!(describe(&json!("fast")), "the string \"fast\"");
        assert_eq!(describe(&json!(1.5)), "the number 1.5");
        assert_eq!(describe(&json!([1, 2])), "a list ([1,2])");
        assert_eq!(describe(&json!(null)), "null");
    }

    #[test]
    fn aliases_resolve_to_one_name() {
        let mut c = RunConfig { lr_scheduler: "constant_with_warmup".into(), optimizer: "adamw_hf".into(), ..RunConfig::default() };
        normalise(&mut c);
        assert_eq!((c.lr_scheduler.as_str(), c.optimizer.as_str()), ("constant", "adamw_torch"));
    }

    #[test]
    fn duplicate_keys_are_a_yaml_error_without_parser_advice() {
        let err = load_str("base_model: a\nbase_model: b\n", "x.yml", &[]).unwrap_err().to_string();
        assert_eq!(err, "x.yml: not valid YAML: duplicate mapping key: base_model at line 2, column 1");
    }
}
