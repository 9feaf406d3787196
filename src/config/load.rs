//! Reading a run config: YAML text -> key checks -> `--set` overrides ->
//! typed `RunConfig` -> value checks.
//!
//! The text is first read as a generic tree (with the line of every key), so
//! that an unknown key, an unsupported feature or a wrong type is reported
//! by name and line before anything is typed.

use super::keys::{self, ADAMW_LOW_MEMORY, ADAMW_NAMES, KeyKind, Level};
use super::source::{self, Locator, display_path, join};
use super::unsupported;
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
    let mut loaded = load_str(&text, &path.display().to_string(), overrides)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    loaded.config.config_dir = super::ConfigDir(Some(dir.to_path_buf()));
    Ok(loaded)
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
    fold_aliases(&mut root, &loc)?;
    axolotl_shapes(&mut root, &loc)?;

    let mut checker = KeyChecker { loc: &loc, key_order: &key_order, warnings: Vec::new() };
    checker.check_map(Level::Top, "", &mut root)?;
    let mut warnings = checker.warnings;

    for (key, what) in REQUIRED {
        if !root.contains_key(*key) {
            bail!("{}{key} is required: {what}", loc.file());
        }
    }
    let mut config: RunConfig = typed(&root, &loc)?;
    if let Some(note) = low_memory_adamw(&config.optimizer) {
        warnings.push(format!("{}{note}", loc.at("optimizer")));
    }
    normalise(&mut config);
    validate::validate(&config, &loc)?;
    if matches!(config.rl.as_deref(), Some("grpo" | "rloo")) {
        let read = if config.rl.as_deref() == Some("rloo") { super::rloo::read } else { super::grpo::read };
        let (s, notes) = read(config.trl.as_ref(), config.rl_beta).map_err(|(k, m)| anyhow!("{}{k} {m}", loc.at(&k)))?;
        let per_step = config.micro_batch_size * config.gradient_accumulation_steps;
        if !per_step.is_multiple_of(s.num_generations) {
            bail!(
                "{}micro_batch_size × gradient_accumulation_steps ({per_step}) must be a multiple of trl.num_generations ({}): \
                 a step holds whole groups of completions",
                loc.at("trl.num_generations"),
                s.num_generations
            );
        }
        warnings.extend(notes.into_iter().map(|n| format!("{}{n}", loc.at("trl"))));
    } else if config.trl.is_some() {
        warnings.push(format!("{}trl is ignored: its settings are read by rl: grpo and rl: rloo only (trl.beta is rl_beta)", loc.at("trl")));
    }
    if config.adapter.is_none() {
        warnings.push(format!(
            "{}adapter is not set: Axolotl would fine-tune every weight, ferrotune trains a LoRA adapter (write adapter: lora to say so)",
            loc.file()
        ));
    }
    Ok(Loaded { config, warnings })
}

/// Fold Axolotl's other spellings of a field (`keys::FOLDED`, and
/// `trl.beta`, which Axolotl passes as TRL's beta like rl_beta) into the
/// field, so the rest of loading sees one key. Two spellings that disagree
/// are an error naming both: which one Axolotl would use depends on the
/// objective, and guessing would silently change the run.
fn fold_aliases(root: &mut Map<String, Value>, loc: &Locator) -> Result<()> {
    let mut found: Vec<(String, &str, Value)> = keys::FOLDED
        .iter()
        .filter_map(|(alias, field)| root.get(*alias).map(|v| (alias.to_string(), *field, v.clone())))
        .collect();
    if let Some(v) = root.get("trl").and_then(|t| t.get("beta")) {
        found.push(("trl.beta".to_string(), "rl_beta", v.clone()));
    }
    let mut set_by: HashMap<&str, String> = HashMap::new();
    for (alias, field, value) in found {
        remove_path(root, &alias);
        if value.is_null() {
            continue;
        }
        let shown = display_path(&alias);
        let right_type = if field == "rl_beta" { value.is_number() } else { value.is_string() };
        if !right_type {
            let what = if field == "rl_beta" { "a number (the objective's beta, as rl_beta)" } else { "a string" };
            bail!("{}{shown} must be {what}, not {}", loc.at(&alias), describe(&value));
        }
        if let Some(existing) = root.get(field).filter(|v| !v.is_null()) {
            let same = match (existing.as_f64(), value.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => *existing == value,
            };
            if !same {
                let other = set_by.get(field).map(|a| display_path(a)).unwrap_or_else(|| field.to_string());
                bail!(
                    "{}{shown} {} and {other} {} are both set and differ: they are the same setting ({field}); keep one",
                    loc.at(&alias),
                    unsupported::show_value(&value),
                    unsupported::show_value(existing)
                );
            }
        }
        set_by.entry(field).or_insert(alias);
        root.insert(field.to_string(), value);
    }
    Ok(())
}

/// Values Axolotl writes in a shape the typed config spells differently:
/// `dpo_loss_type` is a list there (one loss: the list's only entry), and
/// `evals_per_epoch: 0` means no evaluation schedule (Axolotl tests it for
/// truth), which is the key left out here.
fn axolotl_shapes(root: &mut Map<String, Value>, loc: &Locator) -> Result<()> {
    if let Some(Value::Array(losses)) = root.get("dpo_loss_type") {
        match losses.as_slice() {
            [one] => {
                let one = one.clone();
                root.insert("dpo_loss_type".into(), one);
            }
            _ => bail!(
                "{}dpo_loss_type lists {} losses: weighted mixtures of DPO losses are not implemented; list one (e.g. [sigmoid])",
                loc.at("dpo_loss_type"),
                losses.len()
            ),
        }
    }
    if root.get("evals_per_epoch").and_then(Value::as_u64) == Some(0) {
        root.remove("evals_per_epoch");
    }
    Ok(())
}

/// Remove `a` or `a.b` (dropping `a` when that leaves it an empty mapping).
fn remove_path(root: &mut Map<String, Value>, path: &str) {
    match path.split_once('.') {
        None => {
            root.remove(path);
        }
        Some((outer, inner)) => {
            if let Some(Value::Object(m)) = root.get_mut(outer) {
                m.remove(inner);
                if m.is_empty() {
                    root.remove(outer);
                }
            }
        }
    }
}

/// What an 8-bit, 4-bit or paged AdamW becomes here: plain AdamW with f32
/// moments, the same update rule; the cost is memory, said in numbers.
fn low_memory_adamw(name: &str) -> Option<String> {
    if !ADAMW_LOW_MEMORY.contains(&name) {
        return None;
    }
    let bits = if name.contains("8bit") {
        8
    } else if name.contains("4bit") {
        4
    } else {
        return Some(format!(
            "optimizer: {name} runs as AdamW with f32 moments held on the GPU (not paged to CPU memory): the same update and \
             state size; the memory plan says before the first step whether the run fits"
        ));
    };
    Some(format!(
        "optimizer: {name} runs as AdamW with f32 moments (the same update rule, without {bits}-bit state): its state takes \
         8 bytes per trainable parameter instead of about {}; for a LoRA adapter that is small (r 16 on every linear layer \
         of an 8B model: 0.34 GB instead of {} GB), and the memory plan counts it",
        bits / 4,
        if bits == 8 { "0.08" } else { "0.04" }
    ))
}

/// One spelling per meaning, so the trainer matches on exact names.
fn normalise(c: &mut RunConfig) {
    if let Some((_, canonical)) = SCHEDULER_ALIASES.iter().find(|(alias, _)| *alias == c.lr_scheduler) {
        c.lr_scheduler = canonical.to_string();
    }
    if ADAMW_NAMES.contains(&c.optimizer.as_str()) || ADAMW_LOW_MEMORY.contains(&c.optimizer.as_str()) {
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
                // Folded into their field by fold_aliases before this walk.
                KeyKind::Alias => false,
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
        Value::String(_) => format!("the string \"{}\"", unsupported::show_value(v)),
        Value::Array(_) => format!("a list ({})", unsupported::show_value(v)),
        Value::Object(_) => format!("a mapping ({})", unsupported::show_value(v)),
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
