//! One file into the cache: HEAD for its etag, the bytes into
//! `blobs/<etag>.incomplete` (resumed with `Range: bytes=N-` from what an
//! earlier, interrupted run left; retried in-process when a connection
//! drops), checked (size; sha256 for LFS files, git blob sha1 otherwise),
//! then renamed to `blobs/<etag>` and linked from the snapshot. Whatever is
//! killed when, a blob name only ever holds complete, verified bytes and a
//! link only ever points at such a blob.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use sha1::Digest;

use super::cache::RepoCache;
use super::http::Client;
use super::{HubError, RepoRef};

/// Consecutive failures (with no byte received in between) before giving up.
const MAX_STALLS: u32 = 5;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> HubError {
    HubError::Io { detail: format!("cannot {what} {}: {e}", path.display()) }
}

/// `snapshots/<commit>/<file>`, downloading the blob unless present.
pub fn fetch(client: &Client, cache: &RepoCache, repo: &RepoRef, commit: &str, file: &str, bar: &indicatif::ProgressBar) -> Result<PathBuf, HubError> {
    let pointer = cache.pointer(commit, file).map_err(|e| HubError::Io { detail: format!("{repo}: {e:#}") })?;
    if pointer.is_file() {
        bar.finish_and_clear();
        return Ok(pointer);
    }
    let meta = client.file_meta(repo, commit, file)?;
    if !super::cache::is_commit(&meta.etag) && !is_sha256(&meta.etag) || meta.etag.contains('/') {
        return Err(HubError::Protocol { repo: repo.to_string(), url: meta.location, detail: format!("unexpected etag {:?}", meta.etag) });
    }
    let blob = cache.blob(&meta.etag);
    if !blob.is_file() {
        let _lock = cache.lock(&meta.etag).map_err(|e| HubError::Io { detail: format!("{e:#}") })?;
        // Another process may have finished it while this one waited.
        if !blob.is_file() {
            bar.set_length(meta.size);
            download_blob(client, cache, repo, commit, file, &meta, bar)?;
        }
    }
    bar.finish_and_clear();
    cache
        .link(commit, file, &meta.etag)
        .map_err(|e| HubError::Io { detail: format!("{repo}: {e:#}") })
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn download_blob(
    client: &Client,
    cache: &RepoCache,
    repo: &RepoRef,
    commit: &str,
    file: &str,
    meta: &super::http::FileMeta,
    bar: &indicatif::ProgressBar,
) -> Result<(), HubError> {
    let inc = cache.incomplete(&meta.etag);
    let dir = inc.parent().expect("blobs folder");
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    let mut stalls = 0;
    loop {
        let have = std::fs::metadata(&inc).map(|m| m.len()).unwrap_or(0);
        if have > meta.size {
            std::fs::remove_file(&inc).map_err(|e| io_err("remove", &inc, e))?;
            continue;
        }
        if have == meta.size {
            break;
        }
        let failure = match client.get_from(&meta.location, have, repo, commit, file) {
            Ok(resp) => match receive(resp, &inc, have, bar, &client.env.endpoint) {
                Ok(got) if got > 0 => {
                    stalls = 0;
                    continue;
                }
                Ok(_) => None,
                Err(e) => Some(e),
            },
            Err(e @ HubError::Network { .. }) => Some(e),
            Err(e) => return Err(e),
        };
        stalls += 1;
        if stalls >= MAX_STALLS {
            let got = std::fs::metadata(&inc).map(|m| m.len()).unwrap_or(0);
            return Err(failure.unwrap_or(HubError::Size { repo: repo.to_string(), file: file.to_string(), expected: meta.size, got }));
        }
        std::thread::sleep(std::time::Duration::from_millis(100 << stalls.min(4)));
    }
    verify(&inc, repo, file, &meta.etag)?;
    std::fs::rename(&inc, cache.blob(&meta.etag)).map_err(|e| io_err("move into place", &inc, e))
}

/// Appends the body to `.incomplete` (or rewrites it when the server sent
/// the whole file instead of the range). Returns the bytes received.
fn receive(resp: super::http::Resp, inc: &Path, have: u64, bar: &indicatif::ProgressBar, endpoint: &str) -> Result<u64, HubError> {
    let status = resp.status().as_u16();
    if status == 416 {
        // The range is past the end: what is there is stale; start over.
        std::fs::remove_file(inc).map_err(|e| io_err("remove", inc, e))?;
        return Ok(0);
    }
    let ranged = status == 206
        && resp
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|s| s.trim().parse::<u64>().ok())
            == Some(have);
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(inc).map_err(|e| io_err("write", inc, e))?;
    if !ranged {
        out.set_len(0).map_err(|e| io_err("write", inc, e))?;
        out.seek(std::io::SeekFrom::Start(0)).map_err(|e| io_err("write", inc, e))?;
    }
    bar.set_position(if ranged { have } else { 0 });
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&buf[..n]).map_err(|e| io_err("write", inc, e))?;
                got += n as u64;
                bar.inc(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.flush().map_err(|e| io_err("write", inc, e))?;
                // Keep what arrived; the caller resumes from it.
                if got > 0 {
                    return Ok(got);
                }
                return Err(HubError::Network { endpoint: endpoint.to_string(), detail: e.to_string() });
            }
        }
    }
    out.sync_all().map_err(|e| io_err("write", inc, e))?;
    Ok(got)
}

/// The content hash the etag names: sha256 (LFS) or the git blob sha1.
/// A mismatch deletes the bytes, so a rerun fetches them afresh.
fn verify(inc: &Path, repo: &RepoRef, file: &str, etag: &str) -> Result<(), HubError> {
    let mut f = File::open(inc).map_err(|e| io_err("read", inc, e))?;
    let len = f.metadata().map_err(|e| io_err("read", inc, e))?.len();
    let got = if is_sha256(etag) {
        hash_file::<sha2::Sha256>(&mut f, None)
    } else {
        hash_file::<sha1::Sha1>(&mut f, Some(format!("blob {len}\0").into_bytes()))
    }
    .map_err(|e| io_err("read", inc, e))?;
    if !got.eq_ignore_ascii_case(etag) {
        let _ = std::fs::remove_file(inc);
        return Err(HubError::Checksum { repo: repo.to_string(), file: file.to_string(), expected: etag.to_string(), got });
    }
    Ok(())
}

fn hash_file<D: Digest>(f: &mut File, prefix: Option<Vec<u8>>) -> std::io::Result<String> {
    let mut h = D::new();
    if let Some(p) = prefix {
        h.update(&p);
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
