//! The tokenizer metadata llama.cpp's converter takes from the files beside
//! the vocabulary (its `SpecialVocab`): BPE merges, special token ids,
//! whether BOS/EOS/SEP are added, the chat template and BERT normalizer
//! flags, read from tokenizer.json, tokenizer_config.json, config.json and
//! chat_template.{jinja,json}, and written in the converter's key order.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value as Json};

use super::types::{Kvs, Value};

/// The special token types the converter looks up by default.
pub const DEFAULT_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// What the files say; `add_to` writes it.
#[derive(Debug, Clone, Default)]
pub struct SpecialVocab {
    pub merges: Vec<String>,
    /// (type, id) in the order the types were first set.
    pub ids: Vec<(String, u32)>,
    /// (type, add it?) in the order the types were first set.
    pub add: Vec<(String, bool)>,
    pub chat_template: Option<Json>,
    pub lowercase: Option<bool>,
    pub strip_accents: Option<bool>,
    types: Vec<String>,
    n_vocab: Option<usize>,
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
}

/// Python truthiness of a JSON value (None, "", {}, [], 0 and false are false).
fn truthy(v: Option<&Json>) -> bool {
    match v {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(a)) => !a.is_empty(),
        Some(Json::Object(o)) => !o.is_empty(),
        Some(Json::Number(n)) => n.as_f64() != Some(0.0),
    }
}

/// The `id` of a TemplateProcessing item when it is a special token.
fn special_id(item: Option<&Json>) -> Option<String> {
    item?.get("SpecialToken")?.get("id")?.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

fn seq_id(item: &Json) -> Option<&str> {
    item.get("Sequence")?.get("id")?.as_str()
}

fn set_flag(list: &mut Vec<(String, bool)>, typ: &str, v: bool, only_if_absent: bool) {
    match list.iter_mut().find(|(t, _)| t == typ) {
        Some(slot) if !only_if_absent => slot.1 = v,
        Some(_) => {}
        None => list.push((typ.to_string(), v)),
    }
}

impl SpecialVocab {
    /// Reads `dir` as the converter does for `SpecialVocab(dir, load_merges,
    /// special_token_types=types, n_vocab)`.
    pub fn load(dir: &Path, load_merges: bool, types: &[&str], n_vocab: Option<usize>) -> Result<Self> {
        let mut sv = SpecialVocab {
            types: types.iter().map(|s| s.to_string()).collect(),
            n_vocab,
            ..Default::default()
        };
        sv.read_tokenizer_files(dir, load_merges)?;
        sv.read_config_json(dir)?;
        if load_merges && sv.merges.is_empty() {
            sv.merges_txt(dir)?;
        }
        Ok(sv)
    }

    /// `_set_special_token`: integer ids only, the first one for a type wins,
    /// ids past the vocabulary are dropped.
    pub fn set_id(&mut self, typ: &str, tid: Option<&Json>, source: &Path) -> Result<()> {
        let tid = match tid {
            Some(Json::Bool(b)) => i64::from(*b),
            Some(Json::Number(n)) if n.is_i64() || n.is_u64() => match n.as_i64() {
                Some(i) => i,
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        if tid < 0 {
            bail!("{}: invalid value for special token type {typ}: {tid}", source.display());
        }
        if self.n_vocab.is_none_or(|n| (tid as u64) < n as u64) && !self.ids.iter().any(|(t, _)| t == typ) {
            let Ok(id) = u32::try_from(tid) else {
                bail!("{}: special token type {typ} has id {tid}, beyond u32", source.display())
            };
            self.ids.push((typ.to_string(), id));
        }
        Ok(())
    }

    fn merges_txt(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("merges.txt");
        if !path.is_file() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = text.lines().peekable();
        if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
            lines.next();
        }
        for line in lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() == 2 {
                self.merges.push(format!("{} {}", parts[0], parts[1]));
            }
        }
        Ok(())
    }

    fn merges_from(&mut self, merges: &Json, file: &Path) -> Result<()> {
        let Some(list) = merges.as_array().filter(|l| !l.is_empty()) else { return Ok(()) };
        let bad = || anyhow::anyhow!("{}: model.merges must be strings \"a b\" or [a, b] pairs", file.display());
        if list[0].is_string() {
            self.merges = list.iter().map(|m| m.as_str().map(str::to_string).ok_or_else(bad)).collect::<Result<_>>()?;
        } else if list[0].as_array().is_some_and(|p| p.len() == 2 && p[0].is_string()) {
            // Pairs may hold spaces; the string form uses U+0120 for them.
            let part = |s: &str| s.chars().map(|c| if c == ' ' { '\u{120}' } else { c }).collect::<String>();
            for pair in list {
                let p = pair.as_array().ok_or_else(bad)?;
                let strs: Vec<String> = p.iter().map(|s| s.as_str().map(part).ok_or_else(bad)).collect::<Result<_>>()?;
                self.merges.push(strs.join(" "));
            }
        } else {
            return Err(bad());
        }
        Ok(())
    }

    fn normalizer(&mut self, n: &Json) {
        match n.get("type").and_then(|t| t.as_str()) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = n.get("lowercase") {
                    self.lowercase = v.as_bool();
                }
                if let Some(v) = n.get("strip_accents") {
                    self.strip_accents = v.as_bool();
                }
            }
            Some("Sequence") => {
                for m in n.get("normalizers").and_then(|l| l.as_array()).into_iter().flatten() {
                    self.normalizer(m);
                }
            }
            _ => {}
        }
    }

    fn read_tokenizer_files(&mut self, dir: &Path, load_merges: bool) -> Result<()> {
        let tj_path = dir.join("tokenizer.json");
        let tc_path = dir.join("tokenizer_config.json");
        let tokenizer = read_json(&tj_path)?;
        let empty = Vec::new();
        let mut added_tokens = &empty;
        if let Some(t) = &tokenizer {
            if load_merges && let Some(m) = t.get("model").and_then(|m| m.get("merges")) {
                self.merges_from(m, &tj_path)?;
            }
            if let Some(n) = t.get("normalizer").filter(|n| truthy(Some(n))) {
                self.normalizer(n);
            }
            if let Some(a) = t.get("added_tokens").and_then(|a| a.as_array()) {
                added_tokens = a;
            }
        }
        let mut tc: Option<Map<String, Json>> = match read_json(&tc_path)? {
            Some(Json::Object(m)) => Some(m),
            Some(_) => bail!("{}: expected a JSON object", tc_path.display()),
            None => None,
        };
        if let Some(t) = tokenizer.as_ref().filter(|t| truthy(Some(t))) {
            self.post_processor(t, &mut tc);
        }
        let Some(mut tc) = tc.filter(|m| !m.is_empty()) else { return Ok(()) };
        self.chat_template = chat_template(dir, &tc)?;
        let mut i = 0;
        while i < self.types.len() {
            let typ = self.types[i].clone();
            i += 1;
            if let Some(Json::Bool(b)) = tc.get(&format!("add_{typ}_token")) {
                set_flag(&mut self.add, &typ, *b, true);
            }
            let content = match tc.get_mut(&format!("{typ}_token")) {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Object(o)) => match o.get("content") {
                    Some(Json::String(s)) => s.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            let id = added_tokens.iter().find(|a| a.get("content").and_then(|c| c.as_str()) == Some(&content));
            let id = id.and_then(|a| a.get("id")).cloned();
            self.set_id(&typ, id.as_ref(), &tc_path)?;
        }
        Ok(())
    }

    /// The converter's reading of tokenizer.json's post_processor: which
    /// special tokens the tokenizer adds, and (TemplateProcessing) special
    /// tokens the tokenizer_config lacks.
    fn post_processor(&mut self, t: &Json, tc: &mut Option<Map<String, Json>>) {
        let get = |tc: &Option<Map<String, Json>>, k: &str| tc.as_ref().and_then(|m| m.get(k)).cloned();
        let tc_truthy = |tc: &Option<Map<String, Json>>| tc.as_ref().is_some_and(|m| !m.is_empty());
        let set = |tc: &mut Option<Map<String, Json>>, k: &str, v: Json| {
            if let Some(m) = tc.as_mut() {
                m.insert(k.to_string(), v);
            }
        };
        let mut bos = get(tc, "bos_token");
        let mut cls = get(tc, "cls_token");
        let mut eos = get(tc, "eos_token");
        let mut sep = get(tc, "sep_token");
        if !truthy(bos.as_ref()) && truthy(cls.as_ref()) && tc_truthy(tc) {
            bos = cls.clone();
            set(tc, "bos_token", cls.clone().unwrap());
        }
        if !truthy(eos.as_ref()) && truthy(sep.as_ref()) && tc_truthy(tc) {
            eos = sep.clone();
            set(tc, "eos_token", sep.clone().unwrap());
        }
        let Some(pp) = t.get("post_processor").filter(|p| truthy(Some(p))) else { return };
        let procs: Vec<&Json> = match pp.get("processors").and_then(|p| p.as_array()) {
            Some(list) => list.iter().collect(),
            None => vec![pp],
        };
        let is = |v: &Option<Json>, s: &str| v.as_ref().and_then(|v| v.as_str()) == Some(s);
        for p in procs {
            match p.get("type").and_then(|t| t.as_str()) {
                Some("ByteLevel") => {
                    set_flag(&mut self.add, "bos", false, true);
                    set_flag(&mut self.add, "eos", false, true);
                }
                Some("RobertaProcessing") => {
                    for typ in ["bos", "eos", "sep"] {
                        set_flag(&mut self.add, typ, true, false);
                    }
                    if !truthy(cls.as_ref()) && tc_truthy(tc) {
                        cls = p.get("cls").and_then(|c| c.get(0)).cloned().or(bos.clone());
                        set(tc, "cls_token", cls.clone().unwrap_or(Json::Null));
                    }
                    if !truthy(sep.as_ref()) && tc_truthy(tc) {
                        sep = p.get("sep").and_then(|c| c.get(0)).cloned().or(eos.clone());
                        set(tc, "sep_token", sep.clone().unwrap_or(Json::Null));
                    }
                }
                Some("TemplateProcessing") => {
                    let single: &[Json] = p.get("single").and_then(|s| s.as_array()).map_or(&[], |v| v);
                    let mut pair: &[Json] = p.get("pair").and_then(|s| s.as_array()).map_or(&[], |v| v);
                    let (mut first, mut last) = (None, None);
                    if single.len() > 1 {
                        first = special_id(single.first());
                        if let Some(f) = &first {
                            if !tc_truthy(tc) {
                                bos = Some(Json::String(f.clone()));
                            } else if !is(&bos, f) && !is(&cls, f) {
                                if !truthy(bos.as_ref()) {
                                    bos = Some(Json::String(f.clone()));
                                    set(tc, "bos_token", Json::String(f.clone()));
                                }
                                if !truthy(cls.as_ref()) {
                                    cls = Some(Json::String(f.clone()));
                                    set(tc, "cls_token", Json::String(f.clone()));
                                }
                            }
                            set_flag(&mut self.add, "bos", is(&bos, f) || is(&cls, f), false);
                        }
                        last = special_id(single.last());
                        if let Some(l) = &last {
                            if !tc_truthy(tc) {
                                eos = Some(Json::String(l.clone()));
                            } else if !is(&eos, l) {
                                // The old EOS becomes EOT (or EOM) and the trailing token the EOS.
                                let old = eos.clone().unwrap_or(Json::Null);
                                if !self.types.iter().any(|t| t == "eot") {
                                    self.types.push("eot".into());
                                    set(tc, "eot_token", old);
                                } else if !self.types.iter().any(|t| t == "eom") {
                                    self.types.push("eom".into());
                                    set(tc, "eom_token", old);
                                }
                                eos = Some(Json::String(l.clone()));
                                set(tc, "eos_token", Json::String(l.clone()));
                            }
                            set_flag(&mut self.add, "eos", is(&eos, l), false);
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(first.is_some() && special_id(pair.first()) == first);
                        let stop = usize::from(last.is_some() && special_id(pair.last()) == last);
                        pair = if start + stop <= pair.len() { &pair[start..pair.len() - stop] } else { &[] };
                        if !pair.is_empty() {
                            let a = seq_id(&pair[0]);
                            let b = seq_id(&pair[pair.len() - 1]);
                            if a == Some("A") && b == Some("B") && pair.len() > 2 {
                                let mid = &pair[1..pair.len() - 1];
                                let mut add_sep = false;
                                let is_sep = |s: &str| is(&sep, s) || is(&eos, s);
                                if let Some(e) = special_id(mid.first())
                                    && is_sep(&e)
                                    && last.is_none()
                                {
                                    add_sep = true;
                                }
                                if mid.len() == 2
                                    && let Some(e) = special_id(mid.get(1))
                                    && is_sep(&e)
                                {
                                    add_sep = true;
                                }
                                set_flag(&mut self.add, "sep", add_sep, false);
                                if add_sep && !truthy(sep.as_ref()) && tc_truthy(tc) {
                                    set(tc, "sep_token", eos.clone().unwrap_or(Json::Null));
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn read_config_json(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("config.json");
        let Some(config) = read_json(&path)? else { return Ok(()) };
        for typ in self.types.clone() {
            let key = format!("{typ}_token_id");
            let mut id = config.get(&key).filter(|v| !v.is_null());
            if id.is_none() {
                id = config.get("text_config").and_then(|t| t.get(&key));
            }
            self.set_id(&typ, id, &path)?;
        }
        Ok(())
    }

    /// `add_to_gguf`: merges, special ids, add_* flags, chat template,
    /// normalizer flags (types llama.cpp has no key for are left out).
    pub fn add_to(&self, kvs: &mut Kvs) {
        if !self.merges.is_empty() {
            kvs.set("tokenizer.ggml.merges", Value::ArrStr(self.merges.clone()));
        }
        for (typ, id) in &self.ids {
            let key = match typ.as_str() {
                "unk" => "unknown".to_string(),
                "sep" => "seperator".to_string(),
                "pad" => "padding".to_string(),
                "bos" | "eos" | "mask" | "eot" | "eom" => typ.clone(),
                _ => continue,
            };
            kvs.set(format!("tokenizer.ggml.{key}_token_id"), Value::U32(*id));
        }
        for (typ, v) in &self.add {
            if matches!(typ.as_str(), "bos" | "eos" | "sep") {
                kvs.set(format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(*v));
            }
        }
        match &self.chat_template {
            Some(Json::String(s)) if !s.is_empty() => kvs.set("tokenizer.chat_template", Value::Str(s.clone())),
            Some(Json::Array(list)) => {
                let mut default = None;
                let mut names: Vec<String> = Vec::new();
                for choice in list {
                    let name: String = choice.get("name").and_then(|n| n.as_str()).unwrap_or("").chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    let Some(tmpl) = choice.get("template").filter(|t| !t.is_null()) else { continue };
                    let tmpl = tmpl.as_str().unwrap_or_default().to_string();
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(tmpl);
                    } else {
                        if !names.contains(&name) {
                            names.push(name.clone());
                        }
                        if !tmpl.is_empty() {
                            kvs.set(format!("tokenizer.chat_template.{name}"), Value::Str(tmpl));
                        }
                    }
                }
                if !names.is_empty() {
                    kvs.set("tokenizer.chat_templates", Value::ArrStr(names));
                }
                if let Some(d) = default.filter(|d| !d.is_empty()) {
                    kvs.set("tokenizer.chat_template", Value::Str(d));
                }
            }
            _ => {}
        }
        if let Some(v) = self.lowercase {
            kvs.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(v));
        }
        if let Some(v) = self.strip_accents {
            kvs.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(v));
        }
    }
}

/// tokenizer_config's `chat_template`, else chat_template.jinja (with any
/// additional_chat_templates/*.jinja as named ones), else chat_template.json.
fn chat_template(dir: &Path, tc: &Map<String, Json>) -> Result<Option<Json>> {
    let v = match tc.get("chat_template") {
        Some(v) => v.clone(),
        None => {
            let jinja = dir.join("chat_template.jinja");
            let json = dir.join("chat_template.json");
            if jinja.is_file() {
                let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
                let main = read(&jinja)?;
                let mut extra: Vec<_> = std::fs::read_dir(dir.join("additional_chat_templates"))
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "jinja"))
                    .collect();
                extra.sort();
                if extra.is_empty() {
                    Json::String(main)
                } else {
                    let mut list = vec![serde_json::json!({"name": "default", "template": main})];
                    for p in extra {
                        let name = p.file_stem().unwrap_or_default().to_string_lossy().to_string();
                        list.push(serde_json::json!({"name": name, "template": read(&p)?}));
                    }
                    Json::Array(list)
                }
            } else {
                read_json(&json)?.and_then(|j| j.get("chat_template").cloned()).unwrap_or(Json::Null)
            }
        }
    };
    Ok(match v {
        Json::String(_) | Json::Array(_) => Some(v),
        _ => None,
    })
}
