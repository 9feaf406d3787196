//! The Hub cache on disk, laid out exactly as huggingface_hub lays it out,
//! so that a snapshot either tool downloads is found by the other:
//!
//! ```text
//! <cache>/CACHEDIR.TAG
//! <cache>/.locks/models--org--name/<etag>.lock
//! <cache>/models--org--name/blobs/<etag>            the bytes (etag: LFS sha256 or git blob sha1)
//! <cache>/models--org--name/blobs/<etag>.incomplete a download in progress (resumable)
//! <cache>/models--org--name/refs/<revision>         the 40-hex commit, no newline
//! <cache>/models--org--name/snapshots/<commit>/<path> -> ../../blobs/<etag> (relative link)
//! <cache>/models--org--name/trees/<commit>.json     the repo's file listing at that commit
//! ```
//!
//! Datasets live under `datasets--org--name`. A ref is written only for a
//! named revision (a branch, tag or `refs/pr/1`, nested folders and all),
//! never for a commit hash. Nothing here touches the network.

use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use super::RepoKind;

/// The Cache Directory Tagging Standard file huggingface_hub puts at the
/// cache root, so backup tools skip the cache; the same bytes.
const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by huggingface_hub.\n\
# For information about cache directory tags, see:\n\
#\thttps://bford.info/cachedir/\n";

/// Whether `s` is a full commit hash (40 lower-case hex digits).
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `models--org--name`, `datasets--org--name`.
pub fn repo_folder_name(kind: RepoKind, id: &str) -> String {
    let mut parts = vec![kind.plural()];
    parts.extend(id.split('/'));
    parts.join("--")
}

/// A repo-relative file path as a relative filesystem path; paths that
/// would leave the snapshot (`..`, absolute, backslashes) are refused.
pub fn safe_relative(file: &str) -> Result<PathBuf> {
    let p = Path::new(file);
    let ok = !file.is_empty()
        && !file.contains('\\')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        bail!("refusing the file path {file:?}: it must stay inside the repository");
    }
    Ok(p.to_path_buf())
}

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub root: PathBuf,
    pub dir: PathBuf,
    pub folder: String,
}

impl RepoCache {
    pub fn new(cache: &Path, kind: RepoKind, id: &str) -> RepoCache {
        let folder = repo_folder_name(kind, id);
        RepoCache { root: cache.to_path_buf(), dir: cache.join(&folder), folder }
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    pub fn pointer(&self, commit: &str, file: &str) -> Result<PathBuf> {
        Ok(self.snapshot(commit).join(safe_relative(file)?))
    }

    fn ref_path(&self, revision: &str) -> Result<PathBuf> {
        Ok(self.dir.join("refs").join(safe_relative(revision).with_context(|| format!("revision {revision:?}"))?))
    }

    /// The commit a named revision points to in the cache, if recorded.
    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.ref_path(revision).ok()?).ok()?;
        let commit = text.trim().to_string();
        is_commit(&commit).then_some(commit)
    }

    /// Records `revision -> commit` (atomically, no newline; nothing for a
    /// commit hash, and no rewrite when it already holds that commit).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit || self.read_ref(revision).as_deref() == Some(commit) {
            return Ok(());
        }
        let path = self.ref_path(revision)?;
        write_atomic(&path, commit.as_bytes())
    }

    /// The commit a revision means without the network: a commit hash
    /// whose snapshot exists, or the commit its ref records.
    pub fn offline_commit(&self, revision: &str) -> Option<String> {
        let commit = if is_commit(revision) { revision.to_string() } else { self.read_ref(revision)? };
        self.snapshot(&commit).is_dir().then_some(commit)
    }

    /// Whether the snapshot already has `file` (a link to a present blob).
    pub fn has(&self, commit: &str, file: &str) -> bool {
        self.pointer(commit, file).is_ok_and(|p| p.is_file())
    }

    /// Points `snapshots/<commit>/<file>` at `blobs/<etag>` with a relative
    /// link, made at a temporary name and renamed over the final one so a
    /// killed process never leaves a half-made link.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.pointer(commit, file)?;
        let parent = pointer.parent().expect("a pointer has a parent");
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let depth = Path::new(file).components().count() - 1;
        let target: PathBuf = std::iter::repeat_n("..", depth + 2).collect::<PathBuf>().join("blobs").join(etag);
        let tmp = parent.join(format!(".{}.{}.link", pointer.file_name().unwrap().to_string_lossy(), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp).with_context(|| format!("cannot create the link {}", tmp.display()))?;
        std::fs::rename(&tmp, &pointer).with_context(|| format!("cannot create the link {}", pointer.display()))?;
        Ok(pointer)
    }

    /// Holds `.locks/<repo folder>/<etag>.lock` (the file huggingface_hub
    /// locks too) until dropped, so two processes never write one blob.
    pub fn lock(&self, etag: &str) -> Result<FileLock> {
        let path = self.root.join(".locks").join(&self.folder).join(format!("{etag}.lock"));
        FileLock::acquire(&path)
    }

    /// The CACHEDIR.TAG huggingface_hub writes at the cache root.
    pub fn tag_cache(&self) {
        let tag = self.root.join("CACHEDIR.TAG");
        if !tag.exists() {
            let _ = std::fs::create_dir_all(&self.root).and_then(|_| std::fs::write(&tag, CACHEDIR_TAG));
        }
    }

    /// The listing `trees/<commit>.json` holds, if any (written by ferrotune
    /// or huggingface_hub; a commit's files never change).
    pub fn read_tree(&self, commit: &str) -> Option<Vec<super::api::TreeFile>> {
        let text = std::fs::read_to_string(self.dir.join("trees").join(format!("{commit}.json"))).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        if v.get("format_version")?.as_u64()? != 1 {
            return None;
        }
        let files = v.get("files")?.as_object()?;
        let mut out = Vec::with_capacity(files.len());
        for (path, e) in files {
            out.push(super::api::TreeFile {
                path: path.clone(),
                size: e.get("size")?.as_u64()?,
                oid: e.get("blob_id")?.as_str()?.to_string(),
                lfs: match (e.get("lfs_sha256").and_then(|x| x.as_str()), e.get("lfs_size").and_then(|x| x.as_u64())) {
                    (Some(sha256), Some(size)) => Some(super::api::Lfs { sha256: sha256.to_string(), size }),
                    _ => None,
                },
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Some(out)
    }

    /// `trees/<commit>.json`: the listing huggingface_hub caches per commit
    /// (its offline snapshot check reads it), in the same JSON shape;
    /// written once, as huggingface_hub does (it may hold fields, such as
    /// xet hashes, that this listing lacks).
    pub fn write_tree(&self, commit: &str, files: &[super::api::TreeFile]) -> Result<()> {
        if self.dir.join("trees").join(format!("{commit}.json")).is_file() {
            return Ok(());
        }
        let mut sorted: Vec<&super::api::TreeFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        let mut out = String::from("{\n \"format_version\": 1,\n \"files\": {");
        for (i, f) in sorted.iter().enumerate() {
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            out.push_str(&format!("  {}: {{\n   \"size\": {},\n   \"blob_id\": {}", py_json_str(&f.path), f.size, py_json_str(&f.oid)));
            if let Some(lfs) = &f.lfs {
                out.push_str(&format!(",\n   \"lfs_sha256\": {},\n   \"lfs_size\": {}", py_json_str(&lfs.sha256), lfs.size));
            }
            out.push_str("\n  }");
        }
        out.push_str(if sorted.is_empty() { "}\n}" } else { "\n }\n}" });
        write_atomic(&self.dir.join("trees").join(format!("{commit}.json")), out.as_bytes())
    }
}

/// A JSON string as Python's json.dumps writes it (non-ASCII as \uXXXX).
fn py_json_str(s: &str) -> String {
    let mut out = String::new();
    crate::util::write_json_str(&mut out, s, true);
    out
}

/// Writes `bytes` at a temporary name beside `path`, then renames it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().expect("a file path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Without symlinks, copy the blob (huggingface_hub does the same).
    let blob = link.parent().unwrap().join(target);
    std::fs::copy(blob, link).map(|_| ())
}

/// An exclusive advisory lock on a file (flock, as Python's filelock).
pub struct FileLock {
    _file: std::fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<FileLock> {
        let dir = path.parent().expect("a lock file has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut options = std::fs::OpenOptions::new();
        options.create(true).truncate(false).write(true);
        // Group-writable, as Python's filelock makes it, for caches shared
        // by several users.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o664);
        let file = options.open(path).with_context(|| format!("cannot open the lock file {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor this struct owns; released
            // when the descriptor closes on drop.
            let locked = |how| unsafe { libc::flock(file.as_raw_fd(), how) } == 0;
            if !locked(libc::LOCK_EX | libc::LOCK_NB) {
                eprintln!("waiting for another process downloading the same file (lock {})", path.display());
                if !locked(libc::LOCK_EX) {
                    bail!("cannot lock {}: {}", path.display(), std::io::Error::last_os_error());
                }
            }
        }
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refs_and_links_follow_huggingface_hub() {
        assert_eq!(repo_folder_name(RepoKind::Model, "org/name"), "models--org--name");
        assert_eq!(repo_folder_name(RepoKind::Dataset, "org/name"), "datasets--org--name");
        assert_eq!(repo_folder_name(RepoKind::Model, "gpt2"), "models--gpt2");
        assert!(is_commit(&"a".repeat(40)) && !is_commit(&"A".repeat(40)) && !is_commit("main"));
        for bad in ["../x", "a/../../x", "/etc/passwd", "a\\b", ""] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }

        let tmp = tempfile::tempdir().unwrap();
        let repo = RepoCache::new(tmp.path(), RepoKind::Model, "org/name");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        repo.write_ref("refs/pr/1", commit).unwrap();
        assert_eq!(std::fs::read_to_string(repo.dir.join("refs/refs/pr/1")).unwrap(), commit);
        repo.write_ref(commit, commit).unwrap();
        assert!(!repo.dir.join("refs").join(commit).exists());

        std::fs::create_dir_all(repo.dir.join("blobs")).unwrap();
        std::fs::write(repo.blob("e1"), b"x").unwrap();
        let p = repo.link(commit, "sub/dir/f.json", "e1").unwrap();
        assert_eq!(std::fs::read_link(&p).unwrap(), PathBuf::from("../../../../blobs/e1"));
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        let p = repo.link(commit, "top.json", "e1").unwrap();
        assert_eq!(std::fs::read_link(&p).unwrap(), PathBuf::from("../../blobs/e1"));
        assert_eq!(repo.offline_commit("refs/pr/1").as_deref(), Some(commit));
        assert_eq!(repo.offline_commit(commit).as_deref(), Some(commit));
        assert_eq!(repo.offline_commit("main"), None);
        assert_eq!(py_json_str("dé\"/x"), "\"d\\u00e9\\\"/x\"");

        let files = vec![
            super::super::api::TreeFile { path: "a/é.json".into(), size: 3, oid: "o1".into(), lfs: None },
            super::super::api::TreeFile {
                path: "w.safetensors".into(),
                size: 9,
                oid: "o2".into(),
                lfs: Some(super::super::api::Lfs { sha256: "s".into(), size: 9 }),
            },
        ];
        repo.write_tree(commit, &files).unwrap();
        assert_eq!(repo.read_tree(commit).unwrap(), files);
        assert_eq!(repo.read_tree("0000000000000000000000000000000000000000"), None);
    }
}
