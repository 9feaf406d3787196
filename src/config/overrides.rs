//! `--set key=value`: change one key of the config before it is checked.
//!
//! The value is read as YAML (a number, true/false, null, a string, or a
//! flow list / mapping like `[q_proj, v_proj]`); an empty value means null,
//! i.e. the key's default. Dotted paths reach inside lists and mappings:
//! `datasets.0.path=data.jsonl`, `special_tokens.pad_token=<pad>`.

use super::keys::{self, KeyKind, Level};
use super::source::{Locator, display_path};
use anyhow::{Result, bail};
use serde_json::{Map, Value};

/// Mappings whose keys are free-form (any key may be set inside them).
const FREE_MAPS_TOP: &[&str] = &["special_tokens", "trl"];
const FREE_MAPS_DATASET: &[&str] = &["message_property_mappings"];
const DATASET_LISTS: &[&str] = &["datasets", "test_datasets"];

/// Apply the overrides in order (a later one wins), recording each in `loc`.
pub(crate) fn apply(root: &mut Map<String, Value>, overrides: &[String], loc: &mut Locator) -> Result<()> {
    for arg in overrides {
        let Some((path, raw)) = arg.split_once('=') else {
            bail!("--set {arg}: expected key=value (e.g. --set learning_rate=1e-4)");
        };
        let path = path.trim();
        let segs: Vec<&str> = path.split('.').collect();
        if segs.iter().any(|s| s.is_empty()) {
            bail!("--set {arg}: \"{path}\" is not a key path (keys joined by dots, e.g. datasets.0.path)");
        }
        let value = parse_value(raw).map_err(|e| anyhow::anyhow!("--set {arg}: the value is not valid YAML: {e}"))?;
        check_path(&segs, arg)?;
        set(root, &segs, value, arg)?;
        loc.add_override(path, arg);
    }
    Ok(())
}

/// A `--set` value as YAML; empty means null.
fn parse_value(raw: &str) -> Result<Value, String> {
    if raw.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_saphyr::from_str::<Option<Value>>(raw)
        .map(|v| v.unwrap_or(Value::Null))
        .map_err(|e| super::source::yaml_error_text(&e))
}

/// `key` must be a known key at `level`; otherwise the error names the
/// nearest known key.
fn known(level: Level, key: &str, arg: &str) -> Result<()> {
    if !matches!(keys::classify(level, key), KeyKind::Unknown) {
        return Ok(());
    }
    let hint = keys::suggest(level, key).map(|k| format!(" (did you mean \"{k}\"?)")).unwrap_or_default();
    let place = if level == Level::Dataset { " in a dataset entry" } else { "" };
    bail!("--set {arg}: unknown key \"{key}\"{place}{hint}")
}

/// Every key on the path must exist; lists take indices, free-form maps any key.
fn check_path(segs: &[&str], arg: &str) -> Result<()> {
    let top = segs[0];
    known(Level::Top, top, arg)?;
    match segs.len() {
        1 => Ok(()),
        2 if FREE_MAPS_TOP.contains(&top) => Ok(()),
        _ if DATASET_LISTS.contains(&top) => {
            if segs[1].parse::<usize>().is_err() {
                bail!("--set {arg}: {top} is a list: the part after \"{top}.\" must be an entry number (e.g. {top}.0.path)");
            }
            if segs.len() == 2 {
                return Ok(());
            }
            let key = segs[2];
            known(Level::Dataset, key, arg)?;
            match segs.len() {
                3 => Ok(()),
                4 if FREE_MAPS_DATASET.contains(&key) => Ok(()),
                _ => bail!("--set {arg}: {} holds a single value; set it as {}=VALUE", display_path(&segs[..3].join(".")), segs[..3].join(".")),
            }
        }
        _ => bail!("--set {arg}: {top} holds a single value, not a list or mapping; set it as {top}=VALUE"),
    }
}

/// Set the value at `segs`, creating missing mappings and appending a new
/// list entry when the index is one past the end.
fn set(root: &mut Map<String, Value>, segs: &[&str], value: Value, arg: &str) -> Result<()> {
    let Some((first, rest)) = segs.split_first() else { return Ok(()) };
    if rest.is_empty() {
        root.insert(first.to_string(), value);
        return Ok(());
    }
    let mut node = root.entry(first.to_string()).or_insert(Value::Null);
    let mut walked = first.to_string();
    for (i, seg) in rest.iter().enumerate() {
        let last = i + 1 == rest.len();
        if node.is_null() {
            *node = if seg.parse::<usize>().is_ok() { Value::Array(Vec::new()) } else { Value::Object(Map::new()) };
        }
        node = match node {
            Value::Array(items) => {
                let Ok(idx) = seg.parse::<usize>() else {
                    bail!("--set {arg}: {} is a list in the config, not a mapping", display_path(&walked));
                };
                if idx > items.len() {
                    bail!(
                        "--set {arg}: {walked} has {} entr{}; the next new one is {walked}.{}",
                        items.len(),
                        if items.len() == 1 { "y" } else { "ies" },
                        items.len()
                    );
                }
                if idx == items.len() {
                    items.push(Value::Object(Map::new()));
                }
                &mut items[idx]
            }
            Value::Object(map) => map.entry(seg.to_string()).or_insert(Value::Null),
            _ => bail!("--set {arg}: {} is not a list or mapping in the config", display_path(&walked)),
        };
        if last {
            *node = value;
            return Ok(());
        }
        walked = format!("{walked}.{seg}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(start: Value, args: &[&str]) -> Result<Value> {
        let Value::Object(mut map) = start else { panic!("test start must be a mapping") };
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        apply(&mut map, &args, &mut Locator::none())?;
        Ok(Value::Object(map))
    }

    #[test]
    fn scalars_lists_and_nested_paths() {
        let out = run(
            json!({"datasets": [{"path": "a.jsonl"}]}),
            &[
                "lora_r=16",
                "learning_rate=2e-5",
                "sample_packing=true",
                "output_dir=./runs/x",
                "lora_target_modules=[q_proj, v_proj]",
                "datasets.0.type=alpaca",
                "datasets.1.path=b.jsonl",
                "special_tokens.pad_token=<|pad|>",
                "warmup_steps=",
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            json!({
                "lora_r": 16, "learning_rate": 2e-5, "sample_packing": true, "output_dir": "./runs/x",
                "lora_target_modules": ["q_proj", "v_proj"],
                "datasets": [{"path": "a.jsonl", "type": "alpaca"}, {"path": "b.jsonl"}],
                "special_tokens": {"pad_token": "<|pad|>"}, "warmup_steps": null
            })
        );
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        let err = run(json!({}), &["lerning_rate=1e-4"]).unwrap_err().to_string();
        assert_eq!(err, "--set lerning_rate=1e-4: unknown key \"lerning_rate\" (did you mean \"learning_rate\"?)");
        let err = run(json!({"datasets": [{}]}), &["datasets.0.pth=x"]).unwrap_err().to_string();
        assert_eq!(err, "--set datasets.0.pth=x: unknown key \"pth\" in a dataset entry (did you mean \"path\"?)");
    }

    #[test]
    fn malformed_arguments() {
        assert!(run(json!({}), &["lora_r"]).unwrap_err().to_string().contains("expected key=value"));
        assert!(run(json!({}), &["lora_r.x=1"]).unwrap_err().to_string().contains("holds a single value"));
        assert!(run(json!({}), &["datasets.x=1"]).unwrap_err().to_string().contains("entry number"));
        let err = run(json!({"datasets": [{}]}), &["datasets.3.path=x"]).unwrap_err().to_string();
        assert!(err.contains("datasets has 1 entry"), "{err}");
    }
}
