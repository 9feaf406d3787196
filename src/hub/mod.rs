//! Models and datasets from the Hugging Face Hub, in the cache
//! huggingface_hub and transformers use, so each tool finds what the other
//! downloaded (offline too).
//!
//! The flow: `env` (endpoint, cache, token, offline, from the environment)
//! -> `api` (revision -> commit, the file listing) -> `filter` (which files)
//! -> `download` (each file into `cache`, in parallel, resumable, verified)
//! over `http` (ureq; errors mapped in `error`). `model` says what a model
//! or an adapter needs; dataset repos are resolved in `data::hub_splits`.
//!
//! What a new kind of Hub source touches: a `RepoKind` variant (its URL
//! prefix and folder name) and, if it needs its own file selection, a
//! function beside `model.rs`'s.

pub mod api;
pub mod cache;
mod download;
pub mod env;
mod error;
pub mod filter;
pub mod http;
pub mod model;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};

pub use api::TreeFile;
pub use cache::RepoCache;
pub use env::HubEnv;
pub use error::HubError;
pub use filter::Filter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    pub fn parse(s: &str) -> Result<RepoKind> {
        match s {
            "model" => Ok(RepoKind::Model),
            "dataset" => Ok(RepoKind::Dataset),
            _ => bail!("--repo-type {s}: expected model or dataset"),
        }
    }

    /// `models` / `datasets`: the API path and the cache folder prefix.
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// The resolve URL prefix: none for models.
    pub fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

/// A repository at a revision (a branch, tag, `refs/pr/N` or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub id: String,
    pub kind: RepoKind,
    pub revision: String,
}

impl RepoRef {
    pub fn new(id: &str, kind: RepoKind, revision: Option<&str>) -> Result<RepoRef> {
        if !is_repo_id(id) {
            bail!("{id:?} is not a Hub repository id (expected org/name)");
        }
        let revision = revision.map(str::trim).filter(|r| !r.is_empty()).unwrap_or("main");
        cache::safe_relative(revision).map_err(|_| anyhow::anyhow!("revision {revision:?} of {id} is not a valid revision name"))?;
        Ok(RepoRef { id: id.to_string(), kind, revision: revision.to_string() })
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        };
        write!(f, "{kind} {}", self.id)
    }
}

/// Whether `s` reads as a Hub id (`name` or `org/name`, the Hub's
/// characters only) rather than a local path.
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.starts_with('.')
        && (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 96
                && !p.starts_with(['-', '.'])
                && !p.ends_with('.')
                && !p.contains("--")
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The Hub as this process sees it; the HTTP client is made on first use,
/// so offline work never builds one.
pub struct Hub {
    env: HubEnv,
    client: OnceLock<http::Client>,
}

/// A repository at a resolved commit, ready to fetch files from.
pub struct Remote<'a> {
    hub: &'a Hub,
    pub repo: RepoRef,
    pub commit: String,
    /// The repo's files at the commit: from the Hub, or, when the cached
    /// snapshot stands in, the listing cached beside it (`trees/`), so a
    /// snapshot an interrupted run left half-filled is seen as such.
    pub files: Option<Vec<TreeFile>>,
    /// Why the Hub was not asked (offline, or the error the cache stands in
    /// for); `None` when it was.
    pub cached_because: Option<String>,
    pub cache: RepoCache,
}

impl Hub {
    pub fn from_env() -> Hub {
        Hub::new(HubEnv::from_env())
    }

    pub fn new(env: HubEnv) -> Hub {
        Hub { env, client: OnceLock::new() }
    }

    pub fn env(&self) -> &HubEnv {
        &self.env
    }

    fn client(&self) -> &http::Client {
        self.client.get_or_init(|| http::Client::new(&self.env))
    }

    /// Resolves the revision and lists the files (recording the ref and the
    /// listing in the cache). Offline, or when the Hub cannot answer, the
    /// cached snapshot of that revision stands in, as in huggingface_hub.
    pub fn open(&self, repo: &RepoRef) -> Result<Remote<'_>, HubError> {
        let cache = RepoCache::new(&self.env.cache, repo.kind, &repo.id);
        let cached = |err: HubError| -> Result<Remote<'_>, HubError> {
            let offline = matches!(err, HubError::Offline { .. });
            match cache.offline_commit(&repo.revision) {
                Some(commit) if offline || err.fallback() => {
                    if !offline {
                        eprintln!("warning: {err}; using the cached snapshot {commit}");
                    }
                    let because = if offline { "HF_HUB_OFFLINE is set".to_string() } else { err.to_string() };
                    let files = cache.read_tree(&commit);
                    Ok(Remote { hub: self, repo: repo.clone(), commit, files, cached_because: Some(because), cache: cache.clone() })
                }
                _ => Err(err),
            }
        };
        if self.env.offline {
            return cached(HubError::Offline { repo: repo.id.clone(), revision: repo.revision.clone(), cache: self.env.cache.clone(), file: None });
        }
        let commit = if cache::is_commit(&repo.revision) {
            repo.revision.clone()
        } else {
            match api::commit_of(self.client(), repo, &repo.revision) {
                Ok(c) => c,
                Err(e) => return cached(e),
            }
        };
        let files = match api::list_tree(self.client(), repo, &commit) {
            Ok(f) => f,
            Err(e) => return cached(e),
        };
        // As huggingface_hub: the ref and the listing are a convenience for
        // later offline use; a cache that cannot take them (read-only, say)
        // does not stop the download.
        cache.tag_cache();
        if let Err(e) = cache.write_ref(&repo.revision, &commit) {
            eprintln!("warning: {repo}: revision {} not recorded in the cache: {e:#}", repo.revision);
        }
        if let Err(e) = cache.write_tree(&commit, &files) {
            eprintln!("warning: {repo}: file listing not recorded in the cache: {e:#}");
        }
        Ok(Remote { hub: self, repo: repo.clone(), commit, files: Some(files), cached_because: None, cache })
    }
}

impl Remote<'_> {
    /// `snapshots/<commit>`.
    pub fn dir(&self) -> PathBuf {
        self.cache.snapshot(&self.commit)
    }

    /// Whether the repo has `file` (by its listing, else the snapshot).
    pub fn has(&self, file: &str) -> bool {
        match &self.files {
            Some(files) => files.iter().any(|f| f.path == file),
            None => self.cache.has(&self.commit, file),
        }
    }

    /// The file paths the filter keeps, by the listing (else the snapshot).
    pub fn select(&self, filter: &Filter) -> Vec<String> {
        match &self.files {
            Some(files) => files.iter().map(|f| f.path.clone()).filter(|p| filter.matches(p)).collect(),
            None => {
                let mut out = Vec::new();
                list_dir(&self.dir(), "", &mut out);
                out.retain(|p| filter.matches(p));
                out.sort();
                out
            }
        }
    }

    /// The error for a file the cached snapshot lacks while the Hub could
    /// not be asked.
    pub fn not_cached(&self, file: &str) -> HubError {
        let (repo, revision, cache) = (self.repo.id.clone(), self.repo.revision.clone(), self.hub.env.cache.clone());
        match &self.cached_because {
            Some(reason) if !self.hub.env.offline => HubError::NotCached { repo, revision, file: file.to_string(), reason: reason.clone() },
            _ => HubError::Offline { repo, revision, cache, file: Some(file.to_string()) },
        }
    }

    /// Fetches `files` into the snapshot, several at a time, one progress
    /// bar each. When the cache stands in for the Hub, a missing file is an
    /// error naming it.
    pub fn fetch(&self, files: &[String]) -> Result<(), HubError> {
        if let Some(f) = files.iter().find(|f| self.files.is_some() && !self.has(f)) {
            return Err(HubError::EntryNotFound { repo: self.repo.to_string(), revision: self.repo.revision.clone(), file: f.clone() });
        }
        let todo: Vec<&String> = files.iter().filter(|f| !self.cache.has(&self.commit, f)).collect();
        if todo.is_empty() {
            return Ok(());
        }
        if self.cached_because.is_some() {
            return Err(self.not_cached(todo[0]));
        }
        let bars = indicatif::MultiProgress::with_draw_target(if self.hub.env.progress {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        });
        let style = indicatif::ProgressStyle::with_template("{msg:30!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}")
            .expect("valid progress template");
        // Bars draw on a terminal only; a log gets one line per file instead.
        let lines = self.hub.env.progress && !std::io::IsTerminal::is_terminal(&std::io::stderr());
        let next = AtomicUsize::new(0);
        let errors = std::sync::Mutex::new(Vec::new());
        let client = self.hub.client();
        std::thread::scope(|s| {
            for _ in 0..todo.len().min(8) {
                s.spawn(|| {
                    loop {
                        // After a failure no new file is started: the error is reported
                        // at once, and what finished stays in the cache.
                        if !errors.lock().unwrap().is_empty() {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(file) = todo.get(i) else { break };
                        let entry = self.files.as_ref().and_then(|fs| fs.iter().find(|f| &f.path == *file));
                        let size = entry.map(|f| f.size).unwrap_or(0);
                        let bar = bars.add(indicatif::ProgressBar::new(size).with_style(style.clone()).with_message(file.to_string()));
                        match download::fetch(client, &self.cache, &self.repo, &self.commit, file, entry.map(|f| f.oid.as_str()), &bar) {
                            Ok(_) if lines => eprintln!("{}: {file} ({})", self.repo.id, indicatif::HumanBytes(size)),
                            Ok(_) => {}
                            Err(e) => {
                                bar.abandon();
                                errors.lock().unwrap().push((i, e));
                            }
                        }
                    }
                });
            }
        });
        let mut errors = errors.into_inner().unwrap();
        errors.sort_by_key(|(i, _)| *i);
        match errors.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// Every file below `dir` (following links), as repo-relative paths.
fn list_dir(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let path = e.path();
        // A link or file a killed process left at its temporary name.
        if name.starts_with('.') && (name.ends_with(".link") || name.ends_with(".tmp")) {
            continue;
        }
        if path.is_dir() {
            list_dir(&path, &rel, out);
        } else if path.is_file() {
            out.push(rel);
        }
    }
}

/// `ferrotune download`: the files the filter keeps into the cache; the
/// snapshot folder.
pub fn download(hub: &Hub, repo: &RepoRef, filter: &Filter) -> Result<PathBuf> {
    let remote = hub.open(repo)?;
    let files = remote.select(filter);
    remote.fetch(&files)?;
    Ok(remote.dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths_are_told_apart() {
        for id in ["Qwen/Qwen3-0.6B", "gpt2", "unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "trl-lib/tldr"] {
            assert!(is_repo_id(id), "{id}");
        }
        for path in ["./model", "/abs/model", "a/b/c", "../x", "org/na me", "org//x", "org/--x", ""] {
            assert!(!is_repo_id(path), "{path}");
        }
        assert!(RepoRef::new("org/x", RepoKind::Model, Some("../../etc")).is_err());
        assert_eq!(RepoRef::new("org/x", RepoKind::Model, None).unwrap().revision, "main");
        assert_eq!(RepoRef::new("org/x", RepoKind::Dataset, None).unwrap().to_string(), "dataset org/x");
    }
}
