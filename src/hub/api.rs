//! The two Hub API calls a snapshot needs: which commit a revision is
//! (`/api/{models|datasets}/{id}/revision/{rev}`, field `sha`), and the
//! files at that commit (`/api/{…}/tree/{commit}?recursive=true`, paged
//! by `Link: rel="next"`; each file with its git `oid`, `size`, and `lfs`
//! sha256 for large files).

use serde_json::Value;

use super::http::{Client, quote};
use super::{HubError, RepoRef};

#[derive(Debug, Clone, PartialEq)]
pub struct TreeFile {
    pub path: String,
    pub size: u64,
    /// The git blob sha1 (for an LFS file, of its pointer).
    pub oid: String,
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lfs {
    pub sha256: String,
    pub size: u64,
}

fn api_base(client: &Client, repo: &RepoRef) -> String {
    format!("{}/api/{}/{}", client.env.endpoint, repo.kind.plural(), repo.id)
}

/// The commit `revision` points to now.
pub fn commit_of(client: &Client, repo: &RepoRef, revision: &str) -> Result<String, HubError> {
    let url = format!("{}/revision/{}", api_base(client, repo), quote(revision, ""));
    let (v, _) = client.get_json(&url, repo, revision)?;
    v.get("sha")
        .and_then(Value::as_str)
        .filter(|s| super::cache::is_commit(s))
        .map(str::to_string)
        .ok_or_else(|| HubError::Protocol { repo: repo.to_string(), url, detail: "no commit hash (\"sha\") in the answer".into() })
}

/// Every file of the repo at `commit`.
pub fn list_tree(client: &Client, repo: &RepoRef, commit: &str) -> Result<Vec<TreeFile>, HubError> {
    let mut url = Some(format!("{}/tree/{}?recursive=true&expand=false", api_base(client, repo), quote(commit, "")));
    let mut files = Vec::new();
    let mut pages = 0;
    while let Some(u) = url.take() {
        pages += 1;
        if pages > 100_000 {
            return Err(HubError::Protocol { repo: repo.to_string(), url: u, detail: "the listing never ends".into() });
        }
        let (v, next) = client.get_json(&u, repo, commit)?;
        let bad = |detail: &str| HubError::Protocol { repo: repo.to_string(), url: u.clone(), detail: detail.to_string() };
        for e in v.as_array().ok_or_else(|| bad("the tree listing is not a JSON list"))? {
            if e.get("type").and_then(Value::as_str) != Some("file") {
                continue;
            }
            let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
            let path = s("path").ok_or_else(|| bad("a tree entry has no path"))?;
            let lfs = e.get("lfs").filter(|l| l.is_object()).map(|l| Lfs {
                sha256: l.get("oid").and_then(Value::as_str).unwrap_or_default().to_string(),
                size: l.get("size").and_then(Value::as_u64).unwrap_or(0),
            });
            files.push(TreeFile {
                size: e.get("size").and_then(Value::as_u64).unwrap_or(0),
                oid: s("oid").unwrap_or_default(),
                path,
                lfs,
            });
        }
        url = next;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}
