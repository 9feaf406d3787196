//! Where the Hub is and how to talk to it, read from the environment the
//! way huggingface_hub reads it, so both tools share one cache and token.
//!
//! - Endpoint: `HF_ENDPOINT` (a trailing `/` dropped), else https://huggingface.co.
//! - Cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE` (the older name),
//!   else `$HF_HOME/hub`, where `HF_HOME` defaults to
//!   `$XDG_CACHE_HOME/huggingface`, then `~/.cache/huggingface`.
//! - Token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file
//!   `HF_TOKEN_PATH` (default `$HF_HOME/token`), trimmed; none when
//!   `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set.
//! - `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` (1/on/yes/true): the cache
//!   only, no socket opened. `HF_HUB_DISABLE_PROGRESS_BARS`: no bars.
//! - `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT`: seconds (10 each).
//!
//! One difference: a variable set to the empty string counts as unset here
//! (Python would use the empty string, e.g. a cache in the working folder).
//! Proxies come from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` and `NO_PROXY`
//! (see `http.rs`).

use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, Clone)]
pub struct HubEnv {
    pub endpoint: String,
    pub cache: PathBuf,
    pub token: Option<String>,
    /// Where the token came from, for error messages ("HF_TOKEN", a file).
    pub token_source: Option<String>,
    pub offline: bool,
    pub progress: bool,
    pub etag_timeout: Duration,
    pub download_timeout: Duration,
}

impl HubEnv {
    /// The process environment.
    pub fn from_env() -> HubEnv {
        HubEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Any variable lookup (tests pass a map, not the process environment).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> HubEnv {
        let var = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let home = || var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        let expand = |v: String| expand_home(&v, &home());
        let hf_home = var("HF_HOME").map(expand).unwrap_or_else(|| {
            var("XDG_CACHE_HOME").map(expand).unwrap_or_else(|| home().join(".cache")).join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let (token, token_source) = if truthy(var("HF_HUB_DISABLE_IMPLICIT_TOKEN")) {
            (None, None)
        } else if let Some(t) = var("HF_TOKEN") {
            (Some(t.trim().to_string()), Some("HF_TOKEN".to_string()))
        } else if let Some(t) = var("HUGGING_FACE_HUB_TOKEN") {
            (Some(t.trim().to_string()), Some("HUGGING_FACE_HUB_TOKEN".to_string()))
        } else {
            let path = var("HF_TOKEN_PATH").map(expand).unwrap_or_else(|| hf_home.join("token"));
            match std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
                Some(t) => (Some(t), Some(path.display().to_string())),
                None => (None, None),
            }
        };
        // Seconds; anything unusable (not a number, <= 0, too large) is the default 10.
        let secs = |k: &str| {
            var(k)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .unwrap_or(Duration::from_secs(10))
        };
        HubEnv {
            endpoint: var("HF_ENDPOINT").map(|e| e.trim().trim_end_matches('/').to_string()).unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            cache,
            token,
            token_source,
            offline: truthy(var("HF_HUB_OFFLINE")) || truthy(var("TRANSFORMERS_OFFLINE")),
            progress: !truthy(var("HF_HUB_DISABLE_PROGRESS_BARS")),
            etag_timeout: secs("HF_HUB_ETAG_TIMEOUT"),
            download_timeout: secs("HF_HUB_DOWNLOAD_TIMEOUT"),
        }
    }
}

/// huggingface_hub's truth values: 1, ON, YES, TRUE (any case).
fn truthy(v: Option<String>) -> bool {
    v.is_some_and(|v| matches!(v.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// `~` and `~/x` as the shell (and Python's expanduser) reads them.
fn expand_home(v: &str, home: &std::path::Path) -> PathBuf {
    match v.strip_prefix('~') {
        Some("") => home.to_path_buf(),
        Some(rest) if rest.starts_with('/') => home.join(&rest[1..]),
        _ => PathBuf::from(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HubEnv {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn the_cache_follows_huggingface_hub_precedence() {
        let base = [("HOME", "/h")];
        assert_eq!(env(&base).cache, PathBuf::from("/h/.cache/huggingface/hub"));
        assert_eq!(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]).cache, PathBuf::from("/x/huggingface/hub"));
        assert_eq!(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("HF_HOME", "~/hf")]).cache, PathBuf::from("/h/hf/hub"));
        let legacy = [("HOME", "/h"), ("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")];
        assert_eq!(env(&legacy).cache, PathBuf::from("/old"));
        let all = [("HOME", "/h"), ("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HUB_CACHE", "/new")];
        assert_eq!(env(&all).cache, PathBuf::from("/new"));
        // Empty counts as unset.
        assert_eq!(env(&[("HOME", "/h"), ("HF_HUB_CACHE", "")]).cache, PathBuf::from("/h/.cache/huggingface/hub"));
    }

    #[test]
    fn endpoint_token_and_switches() {
        let e = env(&[("HF_ENDPOINT", "http://127.0.0.1:9/"), ("HF_HUB_OFFLINE", "yes"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")]);
        assert_eq!(e.endpoint, "http://127.0.0.1:9");
        assert!(e.offline && !e.progress);
        let e = env(&[("HOME", "/nonexistent")]);
        assert_eq!(e.endpoint, DEFAULT_ENDPOINT);
        assert!(!e.offline && e.progress && e.token.is_none());
        assert!(env(&[("TRANSFORMERS_OFFLINE", "1")]).offline);
        assert!(!env(&[("HF_HUB_OFFLINE", "0")]).offline);
        for bad in ["inf", "1e300", "-3", "soon"] {
            assert_eq!(env(&[("HF_HUB_ETAG_TIMEOUT", bad)]).etag_timeout, Duration::from_secs(10), "{bad}");
        }
        assert_eq!(env(&[("HF_HUB_DOWNLOAD_TIMEOUT", "2.5")]).download_timeout, Duration::from_millis(2500));

        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
        let home = tmp.path().to_str().unwrap();
        let e = env(&[("HF_HOME", home)]);
        assert_eq!(e.token.as_deref(), Some("hf_file"));
        let e = env(&[("HF_HOME", home), ("HF_TOKEN", "hf_env")]);
        assert_eq!((e.token.as_deref(), e.token_source.as_deref()), (Some("hf_env"), Some("HF_TOKEN")));
        let e = env(&[("HF_HOME", home), ("HUGGING_FACE_HUB_TOKEN", "hf_old")]);
        assert_eq!(e.token.as_deref(), Some("hf_old"));
        assert!(env(&[("HF_HOME", home), ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")]).token.is_none());
    }
}
