//! Which files of a Hub dataset repo make up each split, by the `datasets`
//! library's rules: pure functions of the repo's file list (at one commit)
//! and its README.md, so the files can be chosen before any is downloaded.
//!
//! The patterns come from, in order: the entry's `data_files` (all of them
//! the train split); else the README's YAML `configs:` (the `name:`d one, or
//! the default one); else the default conventions, the first that matches
//! any file winning:
//! 1. shards `data/{split}-NNNNN-of-NNNNN*.*` (every split named so);
//! 2. `**/*.eval` log files (a "logs" split);
//! 3. a directory named for a split (`train/`, `data/dev/`, `test-v2/`);
//! 4. a file named for a split (`train.jsonl`, `data/my_test-00.csv`);
//! 5. every file is train.
//!
//! Split keywords: train, training; validation, valid, dev, val; test,
//! testing, eval, evaluation; each must be bounded by `-`, `.`, `_`, a
//! space or a digit. Then the reader is the most common data extension
//! (`hub_glob::infer_module`) and only its files are kept, in the order the
//! datasets library reads them (each pattern's matches sorted, patterns in
//! order, so a file two patterns select is read twice, as there).
//!
//! One difference: with README configs the datasets library infers the
//! reader from the first config's files and reads the chosen config's files
//! with it; here the reader is inferred from the chosen config's own files.

use super::hub_glob::{self, has_module_extension, infer_module, module_extensions};
use anyhow::{Result, anyhow, bail};
use serde_json::Value;

/// The extensions ferrotune reads rows from.
pub const SUPPORTED: [&str; 5] = [".parquet", ".jsonl", ".json", ".csv", ".tsv"];

const KEYWORDS: [(&str, &[&str]); 3] = [
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];
const SEP: &str = "[-._ 0-9]";
const SHARDED: &str = "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*";

/// Split name -> patterns (or files), in split order.
type Patterns = Vec<(String, Vec<String>)>;

/// The repo files of one split, in the order the datasets library reads
/// them. `files` is every file path of the repo at one commit; `readme` the
/// text of its README.md; `name` the dataset config; `data_files` patterns
/// relative to the repo root (all the train split).
pub fn select_files(
    repo: &str,
    files: &[String],
    readme: Option<&str>,
    name: Option<&str>,
    split: &str,
    data_files: Option<&[String]>,
) -> Result<Vec<String>> {
    let (label, resolved) = resolve_splits(repo, files, readme, name, data_files)?;
    match resolved.iter().find(|(s, _)| s == split) {
        Some((_, files)) => Ok(files.clone()),
        None => {
            let have: Vec<&str> = resolved.iter().map(|(s, _)| s.as_str()).collect();
            bail!("dataset {repo}{label} has no split \"{split}\" (it has: {}); set split:", have.join(", "))
        }
    }
}

/// The splits a repo offers, in the datasets library's order.
pub fn splits(
    repo: &str,
    files: &[String],
    readme: Option<&str>,
    name: Option<&str>,
    data_files: Option<&[String]>,
) -> Result<Vec<String>> {
    Ok(resolve_splits(repo, files, readme, name, data_files)?.1.into_iter().map(|(s, _)| s).collect())
}

/// Every split's files, and " (config \"x\")" when a config chose them.
fn resolve_splits(
    repo: &str,
    files: &[String],
    readme: Option<&str>,
    name: Option<&str>,
    data_files: Option<&[String]>,
) -> Result<(String, Patterns)> {
    let configs = match readme {
        Some(text) => read_configs(text).map_err(|e| anyhow!("dataset {repo}: README.md: {e}"))?,
        None => Vec::new(),
    };
    let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
    let chosen = match name {
        Some(n) if configs.is_empty() && n != "default" => {
            bail!("dataset {repo} has no config \"{n}\" (its README lists no configs: remove name:)")
        }
        Some(n) if !configs.is_empty() && !names.contains(&n) => {
            bail!("dataset {repo} has no config \"{n}\" (it has: {}); set name: to one of them", names.join(", "))
        }
        Some(n) => configs.iter().find(|c| c.name == n),
        None => default_config(repo, &configs, data_files.is_some())?,
    };
    let label = chosen.filter(|_| configs.len() > 1).map(|c| format!(" (config \"{}\")", c.name)).unwrap_or_default();
    let patterns: Patterns = if let Some(list) = data_files {
        vec![("train".to_string(), list.to_vec())]
    } else if let Some(c) = chosen {
        let dir = c.data_dir.as_deref().map(|d| d.trim_matches('/')).filter(|d| !d.is_empty());
        let prefix = |p: &str| dir.map(|d| format!("{d}/{p}")).unwrap_or_else(|| p.to_string());
        match &c.data_files {
            Some(pats) => pats.iter().map(|(s, ps)| (s.clone(), ps.iter().map(|p| prefix(p)).collect())).collect(),
            None => {
                let under: Vec<String> = match dir {
                    Some(d) => files.iter().filter_map(|f| f.strip_prefix(&format!("{d}/"))).map(str::to_string).collect(),
                    None => files.to_vec(),
                };
                let found = default_patterns(repo, &under)?;
                found.into_iter().map(|(s, ps)| (s, ps.iter().map(|p| prefix(p)).collect())).collect()
            }
        }
    } else {
        default_patterns(repo, files)?
    };
    let mut out = Vec::new();
    for (split, pats) in patterns {
        let mut matched = Vec::new();
        for p in &pats {
            let found = hub_glob::resolve(p, files, true)
                .map_err(|e| anyhow!("dataset {repo}{label}: data_files of split \"{split}\": {e}"))?;
            matched.extend(found);
        }
        out.push((split, matched));
    }
    keep_one_format(repo, &mut out)?;
    Ok((label, out))
}

/// Keep only the files of the reader the datasets library would pick, and
/// check that ferrotune reads them.
fn keep_one_format(repo: &str, splits: &mut [(String, Vec<String>)]) -> Result<()> {
    let all: Vec<String> = splits.iter().flat_map(|(_, f)| f.iter().cloned()).collect();
    let per_split: Vec<Option<&str>> = splits.iter().map(|(_, f)| infer_module(f)).collect();
    let Some(module) = per_split.first().copied().flatten() else {
        bail!("dataset {repo}: no data files found (ferrotune reads {})", SUPPORTED.join(", "));
    };
    if per_split.iter().any(|m| *m != Some(module)) {
        let found: Vec<String> =
            splits.iter().zip(&per_split).map(|((s, _), m)| format!("{s}: {}", m.unwrap_or("none"))).collect();
        bail!("dataset {repo}: its splits hold files of different formats ({}); set data_files:", found.join(", "));
    }
    if !matches!(module, "json" | "csv" | "tsv" | "parquet") {
        let exts: Vec<String> = all.iter().filter_map(|f| ext_of(f)).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        bail!(
            "dataset {repo}: its data files are {} files, which ferrotune does not read (it reads {})",
            exts.join(", "),
            SUPPORTED.join(", ")
        );
    }
    let exts = module_extensions(module);
    for (_, files) in splits.iter_mut() {
        files.retain(|f| has_module_extension(f, &exts));
        if let Some(bad) = files.iter().find(|f| !ext_of(f).is_some_and(|e| SUPPORTED.contains(&e.as_str()))) {
            bail!(
                "dataset {repo}: {bad}: files ending in {} are not read (ferrotune reads {})",
                ext_of(bad).unwrap_or_else(|| "no extension".into()),
                SUPPORTED.join(", ")
            );
        }
    }
    Ok(())
}

/// A file's last `.suffix`.
fn ext_of(path: &str) -> Option<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.rfind('.').filter(|&i| i > 0).map(|i| base[i..].to_string())
}

/// The datasets library's default patterns for these files (paths
/// relative to the folder they are searched in).
fn default_patterns(repo: &str, files: &[String]) -> Result<Patterns> {
    let sharded = hub_glob::resolve(&SHARDED.replace("{split}", "*"), files, false)?;
    if !sharded.is_empty() {
        return sharded_splits(repo, &sharded);
    }
    let logs: Patterns = vec![("logs".into(), vec!["**/*.eval".into()])];
    let dir_pats = ["**/{k}/**", "**/{k}{s}*/**", "**/*{s}{k}/**", "**/*{s}{k}{s}*/**"];
    let file_pats = ["**/{k}{s}*", "**/*{s}{k}{s}*"];
    let keyword_patterns = |bases: &[&str]| -> Patterns {
        KEYWORDS
            .iter()
            .map(|(split, kws)| {
                let pats = kws
                    .iter()
                    .flat_map(|k| bases.iter().map(move |b| b.replace("{k}", k).replace("{s}", SEP)))
                    .collect();
                (split.to_string(), pats)
            })
            .collect()
    };
    let all: Patterns = vec![("train".into(), vec!["**".into()])];
    for candidates in [logs, keyword_patterns(&dir_pats), keyword_patterns(&file_pats), all] {
        let mut found = Vec::new();
        for (split, pats) in candidates {
            let mut hit = false;
            for p in &pats {
                if !hub_glob::resolve(p, files, false)?.is_empty() {
                    hit = true;
                    break;
                }
            }
            if hit {
                found.push((split, pats));
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
    }
    bail!("dataset {repo} holds no data files")
}

/// The splits named by `data/{split}-NNNNN-of-NNNNN*.*` shards: train,
/// validation and test first, then the others sorted.
fn sharded_splits(repo: &str, shards: &[String]) -> Result<Patterns> {
    let re = regex::Regex::new(r"(.+)-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*").expect("valid regex");
    let valid = regex::Regex::new(r"^\w+(\.\w+)*$").expect("valid regex");
    let mut names = std::collections::BTreeSet::new();
    for f in shards {
        let base = f.rsplit('/').next().unwrap_or(f);
        if let Some(c) = re.captures(base) {
            names.insert(c[1].to_string());
        }
    }
    if let Some(bad) = names.iter().find(|n| !valid.is_match(n)) {
        bail!("dataset {repo}: shard split name \"{bad}\" is not a valid split name (letters, digits, _ and inner dots)");
    }
    let mut order: Vec<String> =
        ["train", "validation", "test"].iter().filter(|s| names.contains(**s)).map(|s| s.to_string()).collect();
    order.extend(names.iter().filter(|n| !["train", "validation", "test"].contains(&n.as_str())).cloned());
    Ok(order.into_iter().map(|s| (s.clone(), vec![SHARDED.replace("{split}", &s)])).collect())
}

/// One entry of the README's `configs:`.
#[derive(Debug, Clone, PartialEq)]
pub struct CardConfig {
    pub name: String,
    /// Split -> patterns (relative to data_dir when set).
    pub data_files: Option<Patterns>,
    pub data_dir: Option<String>,
    pub default: bool,
}

/// The config a run without `name:` uses: the only one, the one named
/// "default", or the one marked `default: true`. Explicit data_files need
/// none.
fn default_config<'a>(repo: &str, configs: &'a [CardConfig], explicit: bool) -> Result<Option<&'a CardConfig>> {
    let mut chosen: Option<&CardConfig> = None;
    for c in configs {
        if configs.len() == 1 || c.name == "default" || c.default {
            if let Some(first) = chosen {
                bail!("dataset {repo}: its README marks two default configs, \"{}\" and \"{}\"; set name:", first.name, c.name);
            }
            chosen = Some(c);
        }
    }
    if chosen.is_none() && configs.len() > 1 && !explicit {
        let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        bail!("dataset {repo} has several configs ({}) and no default; set name: to one of them", names.join(", "));
    }
    Ok(chosen)
}

/// The YAML front matter of a dataset card (between `---` lines at the top).
fn front_matter(text: &str) -> Option<&str> {
    let re = regex::Regex::new(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(\r\n|\n|$)").expect("valid regex");
    re.captures(text).and_then(|c| c.get(1)).map(|m| m.as_str())
}

/// The `configs:` of a README (none without front matter or the key).
pub fn read_configs(readme: &str) -> Result<Vec<CardConfig>> {
    #[derive(serde::Deserialize)]
    struct Card {
        #[serde(default)]
        configs: Option<Value>,
    }
    let Some(yaml) = front_matter(readme.strip_prefix('\u{feff}').unwrap_or(readme)) else { return Ok(Vec::new()) };
    let card: Card = serde_saphyr::from_str(yaml).map_err(|e| anyhow!("malformed YAML front matter: {e}"))?;
    let list = match card.configs {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => bail!("configs: expected a list of configs, found {other}"),
    };
    let mut out: Vec<CardConfig> = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let Some(obj) = c.as_object() else { bail!("configs[{i}]: expected a mapping with config_name") };
        let Some(name) = obj.get("config_name").and_then(scalar) else {
            bail!("configs[{i}]: every config needs a config_name")
        };
        let data_files = match obj.get("data_files") {
            None | Some(Value::Null) => None,
            Some(v) => Some(sanitize(v).map_err(|e| anyhow!("configs[{i}] ({name}): data_files: {e}"))?),
        };
        let data_dir = obj.get("data_dir").and_then(scalar);
        let default = obj.get("default").is_some_and(|d| d.as_bool() == Some(true));
        let config = CardConfig { name: name.clone(), data_files, data_dir, default };
        // A repeated name replaces the earlier entry in place (a mapping by name).
        match out.iter_mut().find(|c| c.name == name) {
            Some(slot) => *slot = config,
            None => out.push(config),
        }
    }
    Ok(out)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `data_files` of a config: a pattern or a list of them (the train
/// split), or a list of {split, path: pattern | [patterns]}.
fn sanitize(v: &Value) -> Result<Patterns> {
    let strings = |v: &Value| -> Option<Vec<String>> {
        match v {
            Value::Array(a) => a.iter().map(scalar).collect(),
            other => scalar(other).map(|s| vec![s]),
        }
    };
    match v {
        Value::Array(items) if items.iter().any(Value::is_object) => {
            let mut out: Patterns = Vec::new();
            for item in items {
                let obj = item.as_object().filter(|o| o.len() == 2);
                let split = obj.and_then(|o| o.get("split")).and_then(scalar);
                let paths = obj.and_then(|o| o.get("path")).and_then(|p| if p.is_object() { None } else { strings(p) });
                let (Some(split), Some(paths)) = (split, paths) else {
                    bail!("each entry must be {{split: <name>, path: <pattern or list of patterns>}}, found {item}")
                };
                if out.iter().any(|(s, _)| *s == split) {
                    bail!("split \"{split}\" is listed twice");
                }
                out.push((split, paths));
            }
            Ok(out)
        }
        Value::Object(map) => {
            map.iter().map(|(k, v)| strings(v).map(|p| (k.clone(), p)).ok_or_else(|| anyhow!("split {k}: expected patterns"))).collect()
        }
        other => strings(other).map(|p| vec![("train".to_string(), p)]).ok_or_else(|| anyhow!("expected a pattern or a list of patterns, found {other}")),
    }
}

#[cfg(test)]
#[path = "hub_splits_tests.rs"]
mod tests;

/// The local files of a Hub dataset's split: the repo listed at its
/// revision, README.md read for `configs:`, and only that split's files
/// fetched into the Hugging Face cache (from the cache alone offline).
pub fn fetch_split(ds: &crate::config::DatasetConfig, split: &str) -> Result<Vec<std::path::PathBuf>> {
    use crate::hub::{Filter, Hub, RepoKind, RepoRef};
    let hub = Hub::from_env();
    let repo = RepoRef::new(&ds.path, RepoKind::Dataset, ds.revision.as_deref())?;
    let remote = hub.open(&repo)?;
    let listing = remote.select(&Filter::all());
    let readme = if remote.has("README.md") {
        remote.fetch(&["README.md".to_string()])?;
        std::fs::read_to_string(remote.dir().join("README.md")).ok()
    } else {
        None
    };
    let files = select_files(&ds.path, &listing, readme.as_deref(), ds.name.as_deref(), split, ds.data_files.as_deref())?;
    remote.fetch(&files)?;
    Ok(files.iter().map(|f| remote.dir().join(f)).collect())
}
