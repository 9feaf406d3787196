//! The one-line errors of Hub access, each naming the repository (and the
//! file) and saying what to do. `fallback` tells which ones may still be
//! answered from the cache, as huggingface_hub does when the Hub is
//! unreachable, down, or refuses a request.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum HubError {
    /// 401/403 with X-Error-Code GatedRepo.
    Gated { repo: String, token: bool },
    /// RepoNotFound: 401 without a token (missing and private look alike), 404 with one.
    RepoNotFound { repo: String, token: bool },
    /// 401 "Invalid credentials in Authorization header": the token is wrong.
    BadToken { repo: String, source: String },
    /// 403 "Access to this resource is disabled."
    Disabled { repo: String },
    RevisionNotFound { repo: String, revision: String },
    EntryNotFound { repo: String, revision: String, file: String },
    /// Could not connect, or timed out; `what` names the repo (and file).
    Network { what: String, endpoint: String, detail: String },
    /// HF_HUB_OFFLINE and the snapshot (or file) is not in the cache.
    Offline { repo: String, revision: String, cache: PathBuf, file: Option<String> },
    /// The Hub could not be asked (`reason`) and the cached snapshot lacks `file`.
    NotCached { repo: String, revision: String, file: String, reason: String },
    Checksum { repo: String, file: String, algorithm: &'static str, expected: String, got: String },
    Size { repo: String, file: String, expected: u64, got: u64 },
    /// Any other status, with the Hub's message.
    Http { repo: String, url: String, status: u16, message: String },
    /// The Hub answered without the headers a download needs.
    Protocol { repo: String, url: String, detail: String },
    /// A local filesystem failure.
    Io { detail: String },
}

impl HubError {
    /// Whether a cached snapshot may stand in (the network, the Hub's own
    /// failures, and refusals that a cached copy predates).
    pub fn fallback(&self) -> bool {
        match self {
            HubError::Network { .. } | HubError::Gated { .. } | HubError::RepoNotFound { .. } | HubError::BadToken { .. } => true,
            HubError::Http { status, .. } => *status >= 500 || *status == 429 || *status == 401 || *status == 403,
            _ => false,
        }
    }
}

impl fmt::Display for HubError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HubError::Gated { repo, token: false } => write!(
                f,
                "{repo} is gated: accept its conditions on the repository's Hub page, then set HF_TOKEN (or put a token in $HF_HOME/token, e.g. with `hf auth login`)"
            ),
            HubError::Gated { repo, token: true } => write!(
                f,
                "{repo} is gated and your token has no access yet: request access on the repository's Hub page (and wait for approval)"
            ),
            HubError::RepoNotFound { repo, token: false } => write!(
                f,
                "{repo} not found (or private: set HF_TOKEN to a token that can read it); check the id"
            ),
            HubError::RepoNotFound { repo, token: true } => {
                write!(f, "{repo} does not exist on the Hub (or your token cannot see it); check the id")
            }
            HubError::BadToken { repo, source } => {
                write!(f, "{repo}: the Hub rejected the token from {source} (invalid or expired); set HF_TOKEN to a valid token")
            }
            HubError::Disabled { repo } => write!(f, "{repo}: access to this repository is disabled on the Hub"),
            HubError::RevisionNotFound { repo, revision } => {
                write!(f, "revision {revision} of {repo} does not exist (give a branch, tag or commit that does)")
            }
            HubError::EntryNotFound { repo, revision, file } => write!(f, "{repo}@{revision} has no file {file}"),
            HubError::Network { what, endpoint, detail } => write!(
                f,
                "{what}: cannot reach {endpoint} ({detail}); check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the cache"
            ),
            HubError::Offline { repo, revision, cache, file } => {
                let what = file.as_ref().map(|f| format!(" (file {f})")).unwrap_or_default();
                write!(
                    f,
                    "HF_HUB_OFFLINE is set and {repo} (revision {revision}){what} is not in the cache at {}; unset HF_HUB_OFFLINE to download it",
                    cache.display()
                )
            }
            HubError::NotCached { repo, revision, file, reason } => write!(
                f,
                "{file} of {repo} (revision {revision}) is not in the cached snapshot, and the Hub could not be asked: {reason}"
            ),
            HubError::Checksum { repo, file, algorithm, expected, got } => write!(
                f,
                "{file} of {repo}: {algorithm} mismatch (expected {expected}, got {got}); the corrupted download was deleted, rerun to fetch it again"
            ),
            HubError::Size { repo, file, expected, got } => write!(
                f,
                "{file} of {repo}: expected {expected} bytes but received {got}; rerun to resume the download"
            ),
            HubError::Http { repo, url, status, message } => {
                write!(f, "{repo}: the Hub answered {status} for {url}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            HubError::Protocol { repo, url, detail } => write!(f, "{repo}: unexpected answer from {url}: {detail}"),
            HubError::Io { detail } => f.write_str(detail),
        }
    }
}

impl std::error::Error for HubError {}
