//! Which files of a repo a download takes: huggingface_hub's
//! allow_patterns / ignore_patterns semantics (Python `fnmatchcase` on the
//! repo-relative path: `*` also crosses `/`, `?` one character, `[…]`
//! classes; a pattern ending in `/` means everything under that folder),
//! and the default set for a model: what ferrotune (and transformers)
//! read, never pickles, GGUF files or the original/ folder unless asked.

use anyhow::{Result, anyhow};
use regex::Regex;

/// A model's files ferrotune reads, plus the small ones the Python tools
/// look for beside them. Weight shards are narrowed to the index's in
/// `mod.rs` when a repo carries extra consolidated files.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "adapter_config.json",
    "README.md",
    ".gitattributes",
];

/// Never taken by default even when a pattern above matches (e.g. a
/// `*.safetensors` under original/).
pub const MODEL_SKIPPED: &[&str] = &["original/*", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.h5", "*.msgpack"];

#[derive(Debug, Clone)]
pub struct Filter {
    allow: Option<Vec<Regex>>,
    ignore: Vec<Regex>,
}

impl Filter {
    /// Everything but `ignore`.
    pub fn all() -> Filter {
        Filter { allow: None, ignore: Vec::new() }
    }

    /// huggingface_hub's filter: kept when it matches an allow pattern
    /// (no list: every file) and no ignore pattern.
    pub fn new(allow: &[String], ignore: &[String]) -> Result<Filter> {
        let compile = |ps: &[String]| ps.iter().map(|p| fnmatch(p)).collect::<Result<Vec<_>>>();
        Ok(Filter { allow: if allow.is_empty() { None } else { Some(compile(allow)?) }, ignore: compile(ignore)? })
    }

    /// A model download: `include` if given (exactly as allow_patterns),
    /// else [`MODEL_FILES`] without [`MODEL_SKIPPED`]; `exclude` always.
    pub fn model(include: &[String], exclude: &[String]) -> Result<Filter> {
        if !include.is_empty() {
            return Filter::new(include, exclude);
        }
        let allow: Vec<String> = MODEL_FILES.iter().map(|s| s.to_string()).collect();
        let ignore: Vec<String> = MODEL_SKIPPED.iter().map(|s| s.to_string()).chain(exclude.iter().cloned()).collect();
        Filter::new(&allow, &ignore)
    }

    pub fn matches(&self, path: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.iter().any(|r| r.is_match(path))) && !self.ignore.iter().any(|r| r.is_match(path))
    }
}

/// Python's `fnmatch.translate` (after huggingface_hub's `\` → `/` and
/// trailing `/` → `/*`), anchored at both ends.
fn fnmatch(pattern: &str) -> Result<Regex> {
    let mut p = pattern.replace('\\', "/");
    if p.ends_with('/') {
        p.push('*');
    }
    let chars: Vec<char> = p.chars().collect();
    let mut re = String::from("(?s)^");
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                let mut j = i;
                if j < chars.len() && chars[j] == '!' {
                    j += 1;
                }
                if j < chars.len() && chars[j] == ']' {
                    j += 1;
                }
                while j < chars.len() && chars[j] != ']' {
                    j += 1;
                }
                if j >= chars.len() {
                    re.push_str("\\[");
                } else {
                    let body: String = chars[i..j].iter().collect();
                    i = j + 1;
                    let (neg, body) = match body.strip_prefix('!') {
                        Some(rest) => (true, rest.to_string()),
                        None => (false, body),
                    };
                    let escaped: String = body
                        .chars()
                        .map(|c| if matches!(c, '\\' | '[' | '&' | '~' | '|') || (c == '^') { format!("\\{c}") } else { c.to_string() })
                        .collect();
                    re.push('[');
                    if neg {
                        re.push('^');
                    }
                    re.push_str(&escaped);
                    re.push(']');
                }
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| anyhow!("bad file pattern {pattern:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(allow: &[&str], ignore: &[&str]) -> Filter {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Filter::new(&v(allow), &v(ignore)).unwrap()
    }

    #[test]
    fn patterns_follow_fnmatchcase() {
        let any_json = f(&["*.json"], &[]);
        assert!(any_json.matches("config.json") && any_json.matches("sub/dir/x.json") && !any_json.matches("a.JSON"));
        let dir = f(&["data/"], &[]);
        assert!(dir.matches("data/a/b.parquet") && !dir.matches("data2/x"));
        let q = f(&["model-0000?-of-00002.safetensors"], &[]);
        assert!(q.matches("model-00001-of-00002.safetensors") && !q.matches("model-00010-of-00002.safetensors"));
        let class = f(&["[!t]*.txt"], &[]);
        assert!(class.matches("a.txt") && !class.matches("t.txt"));
        assert!(f(&["a[.txt"], &[]).matches("a[.txt"));
        let both = f(&["*"], &["*.bin", "sub/"]);
        assert!(both.matches("x.json") && !both.matches("pytorch_model.bin") && !both.matches("sub/x.json"));
        assert!(Filter::all().matches("anything/at/all"));
    }

    #[test]
    fn the_default_model_filter_skips_pickles_and_gguf() {
        let m = Filter::model(&[], &[]).unwrap();
        for yes in ["config.json", "model-00001-of-00002.safetensors", "tokenizer.json", "chat_template.jinja", "model.safetensors.index.json"] {
            assert!(m.matches(yes), "{yes}");
        }
        for no in ["pytorch_model.bin", "model.Q4_K_M.gguf", "original/consolidated.safetensors", "onnx/model.onnx", "flax_model.msgpack"] {
            assert!(!m.matches(no), "{no}");
        }
        let gguf = Filter::model(&["*.gguf".to_string()], &[]).unwrap();
        assert!(gguf.matches("model.Q4_K_M.gguf") && !gguf.matches("config.json"));
        let ex = Filter::model(&[], &["README.md".to_string()]).unwrap();
        assert!(!ex.matches("README.md") && ex.matches("config.json"));
    }
}
