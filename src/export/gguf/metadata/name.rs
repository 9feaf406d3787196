//! A model id (`org/Name-7B-Instruct-v0.3`, or a folder name) split into
//! the parts the converter writes: basename, size label, finetune, version,
//! organization; and the id turned into a display title.
//!
//! Each dash-separated part is annotated (version, quant type, size,
//! finetune word), the leading un-annotated parts form the basename, the
//! rest the finetune. A size that is far from the real parameter count is
//! taken for a context length ("32k") and joins the finetune instead.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;

/// What an id's parts were taken for; None where nothing was found.
#[derive(Debug, Default, PartialEq)]
pub struct IdParts {
    /// The name after the organization, as given.
    pub full_name: Option<String>,
    pub org: Option<String>,
    pub basename: Option<String>,
    pub finetune: Option<String>,
    pub version: Option<String>,
    pub size_label: Option<String>,
}

fn re(s: &str) -> Regex {
    Regex::new(s).expect("static regex")
}

static VERSION: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^(?:v|iter)?\d+(?:[.]\d+)*$"));
static QUANT: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^(?:i?q\d(?:_\w)*|b?fp?(?:16|32))$"));
static SIZE: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?i)^(?:(?:[A]|\d+[x])?\d+(?:[._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)$"));
static FINETUNE: LazyLock<Regex> = LazyLock::new(|| re(r"(?i)^(?:chat|instruct|vision|lora)$"));
static NOT_TITLED: LazyLock<Regex> = LazyLock::new(|| re(r"^(?:v\d+(?:\.\d+)*|\d.*)$"));

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Basename,
    SizeLabel,
    Finetune,
    Version,
    Type,
}

/// Python's str.isspace (which also counts the ASCII separators 0x1c-0x1f).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Python's str.islower: some cased character, none upper case.
fn py_islower(s: &str) -> bool {
    s.chars().any(char::is_lowercase) && !s.chars().any(char::is_uppercase)
}

/// Python's str.title: a letter after a cased character is lowered, any
/// other letter raised.
fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_cased = false;
    for c in s.chars() {
        if prev_cased {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_cased = c.is_lowercase() || c.is_uppercase();
    }
    out
}

/// Dashes become spaces; all-lower-case words are title-cased unless they
/// are a version (`v0.3`) or start with a digit (`7b`).
pub fn id_to_title(id: &str) -> String {
    let spaced = id.trim_matches(py_space).replace('-', " ");
    let words: Vec<String> = spaced
        .split(py_space)
        .filter(|w| !w.is_empty())
        .map(|w| if py_islower(w) && !NOT_TITLED.is_match(w) { py_title(w) } else { w.to_string() })
        .collect();
    words.join(" ")
}

/// Python's float() on the number part of a size ("7", "1.5"); the
/// spellings the size pattern lets through are plain decimals.
fn py_float(s: &str) -> Option<f64> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    s.parse().ok()
}

/// Split a model id. `total` is the parameter count (negative for a LoRA
/// adapter, 0 when unknown), against which sizes in the name are checked.
pub fn id_parts(id: &str, total: i64) -> IdParts {
    if id.contains(' ') {
        // A sentence, not a hub id: all of it is the name.
        return IdParts { full_name: Some(id.to_string()), ..IdParts::default() };
    }
    let (mut org, full) = match id.split_once('/') {
        Some((o, f)) => (Some(o.to_string()), f.to_string()),
        None => (None, id.to_string()),
    };
    if org.as_deref().is_some_and(|o| o.starts_with('.')) {
        // A relative path such as ./ or ../, not an organization.
        org = None;
    }
    let mut parts: Vec<String> = full.split('-').filter(|p| !p.is_empty()).map(str::to_string).collect();
    let mut kinds: Vec<BTreeSet<Kind>> = vec![BTreeSet::new(); parts.len()];

    for i in 0..parts.len() {
        let part = parts[i].clone();
        if VERSION.is_match(&part) {
            kinds[i].insert(Kind::Version);
        } else if QUANT.is_match(&part) {
            kinds[i].insert(Kind::Type);
            parts[i] = part.to_uppercase();
        } else if i > 0 && SIZE.is_match(&part) {
            let mut p: Vec<char> = part.replace('_', ".").chars().collect();
            let n = p.len();
            if n >= 2 && p[n - 1].is_numeric() {
                // bloom-7b1 style: "7b1" means 7.1B.
                let (last, before) = (p[n - 1], p[n - 2]);
                p.truncate(n - 2);
                p.extend(['.', last, before]);
            }
            let n = p.len();
            if n > 1 && p[n - 2].is_numeric() && "kmbt".contains(p[n - 1]) {
                p[n - 1] = p[n - 1].to_ascii_uppercase();
            }
            if total != 0 {
                let num: String = p[..n - 1].iter().collect();
                if let Some(x) = py_float(&num) {
                    let scale = 1000f64.powi(" KMBT".find(p[n - 1]).map_or(-1, |k| k as i32));
                    let label = x * scale;
                    // A size well below the model's (a LoRA need not cover
                    // every layer, so only "below" counts for one) or far
                    // from it is a context length.
                    let far = if total < 0 {
                        label < (total.unsigned_abs() / 8) as f64
                    } else {
                        (label - total as f64).abs() > (7 * total / 8) as f64
                    };
                    if far {
                        kinds[i].insert(Kind::Finetune);
                        p[n - 1] = p[n - 1].to_lowercase().next().unwrap_or(p[n - 1]);
                    }
                }
            }
            if kinds[i].is_empty() {
                kinds[i].insert(Kind::SizeLabel);
            }
            parts[i] = p.into_iter().collect();
        } else if i > 0 && FINETUNE.is_match(&part) {
            if total < 0 && part.eq_ignore_ascii_case("lora") {
                // "lora" in an adapter's name says nothing new.
                kinds[i].insert(Kind::Type);
            } else {
                kinds[i].insert(Kind::Finetune);
            }
        }
    }

    // Word sizes ("mini") give way to a numeric one.
    let numeric_size = parts.iter().zip(&kinds).any(|(p, k)| k.contains(&Kind::SizeLabel) && p.chars().any(char::is_numeric));
    if numeric_size {
        for (p, k) in parts.iter().zip(kinds.iter_mut()) {
            if k.contains(&Kind::SizeLabel) && p.chars().all(char::is_alphabetic) {
                k.remove(&Kind::SizeLabel);
            }
        }
    }

    let mut at_start = true;
    for (p, k) in parts.iter().zip(kinds.iter_mut()) {
        let starts_alpha = p.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((k.is_empty() && starts_alpha) || k.contains(&Kind::Version)) {
            k.insert(Kind::Basename);
        } else {
            at_start = false;
            if k.is_empty() {
                k.insert(Kind::Finetune);
            }
        }
    }
    // A trailing version is not part of the basename.
    for k in kinds.iter_mut().rev() {
        if k.contains(&Kind::Basename) && k.len() > 1 {
            k.remove(&Kind::Basename);
        } else {
            break;
        }
    }

    let join = |want: Kind, exclude: Option<Kind>, dedup: bool| {
        let mut seen: Vec<&str> = Vec::new();
        for (p, k) in parts.iter().zip(&kinds) {
            if k.contains(&want) && exclude.is_none_or(|x| !k.contains(&x)) && !(dedup && seen.contains(&p.as_str())) {
                seen.push(p);
            }
        }
        (!seen.is_empty()).then(|| seen.join("-"))
    };
    let mut basename = join(Kind::Basename, None, false);
    let size_label = join(Kind::SizeLabel, None, true);
    let finetune = join(Kind::Finetune, None, false);
    let version = join(Kind::Version, Some(Kind::Basename), false);
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        // Too ambiguous to call anything the basename.
        basename = None;
    }
    IdParts { full_name: Some(full), org, basename, finetune, version, size_label }
}
