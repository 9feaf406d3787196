//! The `general.*` metadata llama.cpp's converter writes for a model folder
//! (after `general.architecture` and `general.type`): recommended sampling
//! settings from generation_config.json, then the model's name, its parts
//! (basename, size label, finetune, version, organization) guessed from the
//! README.md model card, config.json's `_name_or_path` and the folder's
//! name, and the card's license, base models, datasets, tags and languages.
//!
//! The guesses follow gguf-py 0.19's `Metadata` heuristics rule for rule, so
//! the same folder gives the same keys, values and value types. Where the
//! converter stops with an exception (unparsable front matter, a card value
//! that is not a string where a string is written), this returns one error
//! naming the file and key instead. One case errors here where the
//! converter writes something: tags or languages that are all numbers or
//! all booleans (it writes a numeric or boolean array; only string arrays
//! are written here).

use std::path::Path;
use std::sync::LazyLock;

use anyhow::{Context, Result, bail};
use regex::Regex;

use super::types::{Kvs, Value};

mod card;
mod name;

use card::{Y, load_model_card};
use name::{IdParts, id_parts, id_to_title};

/// The general.* keys after general.architecture and general.type, in the
/// converter's order (general.sampling.* first, then general.name, …), for
/// the model folder `dir` whose tensors (as they are written to the GGUF:
/// name and ne) are given. `lora`: the LoRA converter's variant, whose
/// adapter tensors (`.lora_a`/`.lora_b` pairs) make the parameter count
/// negative: size labels are then only read from names, never computed.
pub fn general(dir: &Path, tensors: &[(&str, &[u64])], lora: bool) -> Result<Kvs> {
    let counts = param_counts(tensors);
    if lora && counts.total > 0 {
        bail!("LoRA GGUF metadata for {}: the tensors hold no .lora_a/.lora_b pair", dir.display());
    }
    let mut meta = Meta::default();
    let card = load_model_card(dir)?;
    meta.apply_card(&card);
    let hf = load_json(&dir.join("config.json"), false)?;
    meta.apply_hf_params(&hf, counts.total)?;
    meta.apply_dir_name(&path_name(dir), counts.total);
    let gen_cfg = load_json(&dir.join("generation_config.json"), true)?;
    let sampling = sampling_keys(&gen_cfg)?;

    // The converter's own fallbacks, after the heuristics.
    if meta.s.name.is_none() {
        meta.s.name = Some(Src::derived(path_name(dir)));
    }
    if meta.s.size_label.is_none() && counts.total > 0 {
        meta.s.size_label = Some(Src::derived(size_label(&counts)));
    }

    let mut kvs = Kvs::default();
    for (k, v) in sampling {
        kvs.set(k, v);
    }
    meta.write(&mut kvs)?;
    Ok(kvs)
}

/// Parameter counts as the converter measures them from the tensors it
/// writes: `total` is negative for a LoRA adapter (each lora_b counts as
/// the full weight it adapts); expert tensors (`_exps.`) count per expert.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ParamCounts {
    pub total: i64,
    pub shared: i64,
    pub expert: i64,
    pub expert_count: i64,
}

pub fn param_counts(tensors: &[(&str, &[u64])]) -> ParamCounts {
    let mut c = ParamCounts::default();
    let (mut expert_sum, mut n_expert_tensors) = (0i64, 0i64);
    let mut last_lora_a: Option<(&str, &[u64])> = None;
    for &(name, orig) in tensors {
        if name.ends_with(".lora_a") {
            last_lora_a = Some((name, orig));
            continue;
        }
        let mut ne = orig.to_vec();
        if let Some(stem) = name.strip_suffix(".lora_b") {
            match last_lora_a {
                // The converter gives up on measuring (and writes no size
                // label) when a lora_b does not follow its lora_a.
                Some((a, a_ne)) if a.strip_suffix(".lora_a") == Some(stem) => {
                    // numpy shape[-1] is ne[0]: the adapted weight's row length.
                    if let (Some(first), Some(&a0)) = (ne.first_mut(), a_ne.first()) {
                        *first = a0;
                    }
                }
                _ => return ParamCounts::default(),
            }
        }
        let size: i64 = ne.iter().map(|&d| d as i64).product();
        if name.contains("_exps.") && ne.len() >= 3 {
            // numpy shape[-3] (shape[-2] for a bias) is ne[2] (ne[1]).
            let count = ne[if name.contains(".bias") { 1 } else { 2 }] as i64;
            c.expert += if count == 0 { 0 } else { size / count };
            expert_sum += count;
            n_expert_tensors += 1;
        } else {
            c.shared += size;
        }
        c.total += size;
    }
    if n_expert_tensors > 0 {
        c.expert_count = expert_sum / n_expert_tensors;
    }
    if last_lora_a.is_some() {
        c.total = -c.total;
    }
    c
}

/// The size label the converter computes from the counts ("7.6B", "95K",
/// "8x7.3K" for experts).
pub fn size_label(c: &ParamCounts) -> String {
    if c.expert_count > 0 {
        let n = c.shared.unsigned_abs() + c.expert.unsigned_abs();
        format!("{}x{}", c.expert_count, rounded_notation(n))
    } else {
        rounded_notation(c.total.unsigned_abs())
    }
}

/// A count in K/M/B/T with at least two significant digits before the
/// point where the scaled value has fewer (Python's banker's `round` picks
/// the digit count; the value itself is formatted with `.Nf`).
fn rounded_notation(n: u64) -> String {
    let x = n as f64;
    let (scaled, suffix) = if x > 1e12 {
        (x * 1e-12, "T")
    } else if x > 1e9 {
        (x * 1e-9, "B")
    } else if x > 1e6 {
        (x * 1e-6, "M")
    } else {
        (x * 1e-3, "K")
    };
    let rounded = format!("{}", scaled.round_ties_even() as u128);
    let digits = rounded.trim_start_matches('0').len();
    let fix = 2usize.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

/// Python's `Path.name`: the last component, "" for "." or "/".
fn path_name(dir: &Path) -> String {
    use std::path::Component;
    match dir.components().next_back() {
        Some(Component::Normal(s)) => s.to_string_lossy().into_owned(),
        Some(Component::ParentDir) => "..".to_string(),
        _ => String::new(),
    }
}

/// A JSON file of the folder, or an empty object when it is absent. For
/// generation_config.json (`lenient`) an unreadable or invalid file counts
/// as absent too, as the converter treats it.
fn load_json(path: &Path, lenient: bool) -> Result<serde_json::Value> {
    let empty = serde_json::Value::Object(Default::default());
    if !path.is_file() {
        return Ok(empty);
    }
    let parsed = std::fs::read_to_string(path)
        .map_err(anyhow::Error::from)
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(anyhow::Error::from));
    match parsed {
        Ok(v) => Ok(v),
        Err(_) if lenient => Ok(empty),
        Err(e) => Err(e.context(format!("{} is not valid JSON", path.display()))),
    }
}

/// A value with where it came from, for the error when it cannot be written.
#[derive(Debug, Clone, PartialEq)]
struct Src {
    v: Y,
    from: String,
}

impl Src {
    fn derived(s: String) -> Src {
        Src { v: Y::Str(s), from: String::new() }
    }
}

/// The single-string fields, in the writer's order of their keys.
#[derive(Debug, Default)]
struct Strings {
    name: Option<Src>,
    author: Option<Src>,
    version: Option<Src>,
    organization: Option<Src>,
    finetune: Option<Src>,
    basename: Option<Src>,
    description: Option<Src>,
    size_label: Option<Src>,
    license: Option<Src>,
    license_name: Option<Src>,
    license_link: Option<Src>,
    source_url: Option<Src>,
    source_doi: Option<Src>,
    source_uuid: Option<Src>,
    source_repo_url: Option<Src>,
}

/// A base model or dataset entry: key -> value, as the card gave it or as
/// the heuristics built it from an id or URL.
type Entry = Vec<(String, Src)>;

#[derive(Debug, Default)]
struct Meta {
    s: Strings,
    base_models: Option<Vec<Entry>>,
    datasets: Option<Vec<Entry>>,
    tags: Option<Vec<Src>>,
    languages: Option<Vec<Src>>,
}

fn card_get<'a>(card: &'a [(Y, Y)], key: &str) -> Option<&'a Y> {
    card.iter().rev().find(|(k, _)| matches!(k, Y::Str(s) if s == key)).map(|(_, v)| v)
}

impl Meta {
    fn apply_card(&mut self, card: &[(Y, Y)]) {
        // A card key fills a field only while it is unset; a null value
        // leaves it unset.
        let take = |slot: &mut Option<Src>, key: &str| {
            if slot.is_none()
                && let Some(v) = card_get(card, key)
                && *v != Y::Null
            {
                *slot = Some(Src { v: v.clone(), from: format!("README.md front matter key `{key}`") });
            }
        };
        let s = &mut self.s;
        for prefix in ["", "model_"] {
            take(&mut s.name, &format!("{prefix}name"));
            take(&mut s.author, &format!("{prefix}author"));
            take(&mut s.version, &format!("{prefix}version"));
            take(&mut s.organization, &format!("{prefix}organization"));
            take(&mut s.description, &format!("{prefix}description"));
            take(&mut s.finetune, &format!("{prefix}finetune"));
            take(&mut s.basename, &format!("{prefix}basename"));
            take(&mut s.size_label, &format!("{prefix}size_label"));
            take(&mut s.source_url, &format!("{prefix}url"));
            take(&mut s.source_doi, &format!("{prefix}doi"));
            take(&mut s.source_uuid, &format!("{prefix}uuid"));
            take(&mut s.source_repo_url, &format!("{prefix}repo_url"));
        }
        take(&mut s.author, "model_creator");
        take(&mut s.basename, "model_type");

        self.base_models = sources(card, &["base_model", "base_models", "base_model_sources"], "base model");
        self.datasets = sources(card, &["datasets", "dataset", "dataset_sources"], "dataset");

        take(&mut self.s.license, "license");
        take(&mut self.s.license_name, "license_name");
        take(&mut self.s.license_link, "license_link");
        for (slot, keys) in [(&mut self.tags, ["tags", "pipeline_tag"]), (&mut self.languages, ["languages", "language"])] {
            for key in keys {
                let Some(v) = card_get(card, key) else { continue };
                let from = format!("README.md front matter key `{key}`");
                let list = match v {
                    Y::Null => continue,
                    Y::Str(_) => vec![v.clone()],
                    Y::Seq(items) => items.clone(),
                    _ => vec![],
                };
                let cur = slot.get_or_insert_with(Vec::new);
                cur.extend(list.into_iter().map(|v| Src { v, from: from.clone() }));
            }
        }
    }

    /// `_name_or_path` from config.json, when it looks like a hub id rather
    /// than a local path (at most one '/').
    fn apply_hf_params(&mut self, hf: &serde_json::Value, total: i64) -> Result<()> {
        let Some(v) = hf.get("_name_or_path").filter(|v| !v.is_null()) else { return Ok(()) };
        let Some(id) = v.as_str() else {
            bail!("config.json: `_name_or_path` is {v}, expected a string");
        };
        if id.matches('/').count() <= 1 {
            self.fill_from_id(id, total);
        }
        Ok(())
    }

    fn apply_dir_name(&mut self, name: &str, total: i64) {
        self.fill_from_id(name, total);
    }

    fn fill_from_id(&mut self, id: &str, total: i64) {
        let p = id_parts(id, total);
        let s = &mut self.s;
        let fill = |slot: &mut Option<Src>, v: Option<String>| {
            if slot.is_none()
                && let Some(v) = v
            {
                *slot = Some(Src::derived(v));
            }
        };
        fill(&mut s.name, p.full_name.as_deref().map(id_to_title));
        fill(&mut s.organization, p.org.as_deref().map(id_to_title));
        fill(&mut s.basename, p.basename);
        fill(&mut s.finetune, p.finetune);
        fill(&mut s.version, p.version);
        fill(&mut s.size_label, p.size_label);
    }

    fn write(&self, kvs: &mut Kvs) -> Result<()> {
        let s = &self.s;
        for (key, slot) in [
            ("general.name", &s.name),
            ("general.author", &s.author),
            ("general.version", &s.version),
            ("general.organization", &s.organization),
            ("general.finetune", &s.finetune),
            ("general.basename", &s.basename),
            ("general.description", &s.description),
            ("general.size_label", &s.size_label),
        ] {
            put_str(kvs, key, slot.as_ref())?;
        }
        if let Some(Src { v: Y::Seq(items), from }) = &s.license {
            // A list of licenses is written comma-joined.
            let mut parts = Vec::new();
            for item in items {
                match item {
                    Y::Str(t) => parts.push(t.as_str()),
                    other => bail!("{from}: a license entry is {}, expected a string", other.describe()),
                }
            }
            put_str(kvs, "general.license", Some(&Src::derived(parts.join(","))))?;
        } else {
            put_str(kvs, "general.license", s.license.as_ref())?;
        }
        for (key, slot) in [
            ("general.license.name", &s.license_name),
            ("general.license.link", &s.license_link),
            ("general.source.url", &s.source_url),
            ("general.source.doi", &s.source_doi),
            ("general.source.uuid", &s.source_uuid),
            ("general.source.repo_url", &s.source_repo_url),
        ] {
            put_str(kvs, key, slot.as_ref())?;
        }
        for (what, list) in [("base_model", &self.base_models), ("dataset", &self.datasets)] {
            let Some(list) = list else { continue };
            kvs.set(format!("general.{what}.count"), Value::U32(list.len() as u32));
            for (i, entry) in list.iter().enumerate() {
                for field in ["name", "author", "version", "organization", "description", "url", "doi", "uuid", "repo_url"] {
                    let v = entry.iter().rev().find(|(k, _)| k == field).map(|(_, v)| v);
                    put_str(kvs, &format!("general.{what}.{i}.{field}"), v)?;
                }
            }
        }
        put_array(kvs, "general.tags", self.tags.as_deref())?;
        put_array(kvs, "general.languages", self.languages.as_deref())?;
        Ok(())
    }
}

/// The base models (or datasets) of the card: hub ids and hub URLs become
/// name/organization/version(/repo_url) entries, other URLs a bare
/// repo_url, mappings are taken as they are, anything else an empty entry.
fn sources(card: &[(Y, Y)], keys: &[&str; 3], what: &str) -> Option<Vec<Entry>> {
    if !keys.iter().any(|k| card_get(card, k).is_some()) {
        return None;
    }
    // The first of the keys present gives the value (even a null one).
    let (key, value) = keys.iter().find_map(|k| card_get(card, k).map(|v| (*k, v)))?;
    let from = format!("README.md front matter key `{key}`");
    let ids: Vec<Y> = match value {
        Y::Str(_) => vec![value.clone()],
        Y::Seq(items) => items.clone(),
        _ => vec![],
    };
    let mut out = Vec::new();
    for (n, id) in ids.into_iter().enumerate() {
        let src = |v: String| Src::derived(v);
        let mut e: Entry = Vec::new();
        match id {
            Y::Str(id) => {
                let url = ["http://", "https://", "ssh://"].iter().any(|p| id.starts_with(p));
                let parts: Option<(IdParts, bool)> = if url {
                    e.push(("repo_url".into(), src(id.clone())));
                    let hub = id.contains("huggingface.co").then(|| HF_URL.captures(&id)).flatten();
                    hub.map(|m| (id_parts(&m[1], 0), false))
                } else {
                    Some((id_parts(&id, 0), true))
                };
                if let Some((p, with_repo)) = parts {
                    if let Some(full) = &p.full_name {
                        e.push(("name".into(), src(id_to_title(full))));
                    }
                    if let Some(org) = &p.org {
                        e.push(("organization".into(), src(id_to_title(org))));
                    }
                    if let Some(v) = p.version {
                        e.push(("version".into(), src(v)));
                    }
                    if with_repo && let (Some(org), Some(full)) = (&p.org, &p.full_name) {
                        e.push(("repo_url".into(), src(format!("https://huggingface.co/{org}/{full}"))));
                    }
                }
            }
            Y::Map(m) => {
                for (k, v) in m {
                    if let Y::Str(k) = k {
                        let from = format!("{from} ({what} {n}, key `{k}`)");
                        e.push((k, Src { v, from }));
                    }
                }
            }
            // The converter logs such an entry and keeps it empty.
            _ => {}
        }
        out.push(e);
    }
    Some(out)
}

static HF_URL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^https?://huggingface.co/([^/]+/[^/]+)$").expect("static regex"));

/// A string key as the writer's add_string writes it: nothing for a
/// missing or falsy value (None, "", 0, false, empty list), the string, or
/// an error for anything else (where the converter fails to pack it).
fn put_str(kvs: &mut Kvs, key: &str, v: Option<&Src>) -> Result<()> {
    let Some(Src { v, from }) = v else { return Ok(()) };
    if !v.truthy() {
        return Ok(());
    }
    match v {
        Y::Str(s) => kvs.set(key, Value::Str(s.clone())),
        other => bail!("{from} is {}, but {key} must be a string", other.describe()),
    }
    Ok(())
}

/// An array key: nothing when empty, else typed by its first element (all
/// elements must share it, as the writer demands).
fn put_array(kvs: &mut Kvs, key: &str, items: Option<&[Src]>) -> Result<()> {
    let Some(items) = items.filter(|i| !i.is_empty()) else { return Ok(()) };
    let from = &items[0].from;
    let value = match &items[0].v {
        Y::Str(_) => Value::ArrStr(items.iter().map(|i| i.v.as_str().map(str::to_string)).collect::<Option<_>>().with_context(
            || format!("{from}: {key} mixes strings with other values; all entries must be strings"),
        )?),
        other => bail!("{from}: {key} entries are {}, expected strings", other.describe()),
    };
    kvs.set(key, value);
    Ok(())
}

/// general.sampling.* from generation_config.json, with the writer's types
/// (INT32 for counts and mirostat, FLOAT32 for the rest, a string for
/// `sequence`). A JSON null leaves a key out.
fn sampling_keys(gen_cfg: &serde_json::Value) -> Result<Vec<(String, Value)>> {
    let map = match gen_cfg {
        serde_json::Value::Object(m) => m,
        v if !Y::from_json(v).truthy() => return Ok(vec![]),
        v => bail!("generation_config.json holds {v}, expected an object"),
    };
    enum T {
        S,
        I,
        F,
    }
    // (key written, key read, type); penalty_repeat falls back on
    // transformers' repetition_penalty.
    let spec = [
        ("sequence", "sequence", T::S),
        ("top_k", "top_k", T::I),
        ("top_p", "top_p", T::F),
        ("min_p", "min_p", T::F),
        ("xtc_probability", "xtc_probability", T::F),
        ("xtc_threshold", "xtc_threshold", T::F),
        ("temp", "temperature", T::F),
        ("penalty_last_n", "penalty_last_n", T::I),
        ("penalty_repeat", "penalty_repeat", T::F),
        ("mirostat", "mirostat", T::I),
        ("mirostat_tau", "mirostat_tau", T::F),
        ("mirostat_eta", "mirostat_eta", T::F),
    ];
    let mut out = Vec::new();
    for (name, read, ty) in spec {
        let mut read = read;
        if name == "penalty_repeat" && !map.contains_key(read) {
            read = "repetition_penalty";
        }
        let Some(v) = map.get(read).filter(|v| !v.is_null()) else { continue };
        let key = format!("general.sampling.{name}");
        let bad = |want: &str| anyhow::anyhow!("generation_config.json: `{read}` is {v}, expected {want}");
        let value = match ty {
            T::S => match v.as_str() {
                Some("") => continue,
                Some(s) => Value::Str(s.to_string()),
                None if !Y::from_json(v).truthy() => continue,
                None => return Err(bad("a string")),
            },
            T::I => match Y::from_json(v) {
                Y::Int(i) => Value::I32(i32::try_from(i).map_err(|_| bad("a 32-bit integer"))?),
                Y::Bool(b) => Value::I32(b as i32),
                _ => return Err(bad("an integer")),
            },
            T::F => {
                let x = match Y::from_json(v) {
                    Y::Int(i) => i as f64,
                    Y::Float(x) => x,
                    Y::Bool(b) => b as u8 as f64,
                    _ => return Err(bad("a number")),
                };
                let f = x as f32;
                if f.is_infinite() && x.is_finite() {
                    return Err(bad("a number within the 32-bit float range"));
                }
                Value::F32(f)
            }
        };
        out.push((key, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
