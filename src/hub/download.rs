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

fn io_err(what: &str, path: &Path, e: std::io::Error) -> HubError {
    HubError::Io { detail: format!("cannot {what} {}: {e}", path.display()) }
}

/// `snapshots/<commit>/<file>`, downloading the blob unless present.
/// `oid`: the file's git blob id from the listing, when known.
pub fn fetch(
    client: &Client,
    cache: &RepoCache,
    repo: &RepoRef,
    commit: &str,
    file: &str,
    oid: Option<&str>,
    bar: &indicatif::ProgressBar,
) -> Result<PathBuf, HubError> {
    let pointer = cache.pointer(commit, file).map_err(|e| HubError::Io { detail: format!("{repo}: {e:#}") })?;
    if pointer.is_file() {
        bar.finish_and_clear();
        return Ok(pointer);
    }
    let meta = client.file_meta(repo, commit, file)?;
    // The etag names a file in blobs/: any plain name will do (a mirror
    // may use other hashes than the Hub's), nothing that walks elsewhere.
    let safe = !meta.etag.is_empty()
        && meta.etag != "."
        && meta.etag != ".."
        && meta.etag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !safe {
        return Err(HubError::Protocol { repo: repo.to_string(), url: meta.location, detail: format!("unusable etag {:?} for {file}", meta.etag) });
    }
    let blob = cache.blob(&meta.etag);
    if !blob.is_file() {
        let _lock = cache.lock(&meta.etag).map_err(|e| HubError::Io { detail: format!("{file} of {repo}: {e:#}") })?;
        // Another process may have finished it while this one waited.
        if !blob.is_file() {
            bar.set_length(meta.size);
            let check = if is_sha256(&meta.etag) {
                Check::Sha256
            } else if oid == Some(meta.etag.as_str()) {
                Check::GitSha1
            } else {
                Check::Size
            };
            download_blob(client, cache, repo, commit, file, &meta, check, bar)?;
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

/// How a download is checked: the Hub's etags are the sha256 of LFS files
/// and the git blob sha1 of the others; an etag that is neither (a mirror's)
/// leaves the size alone to check, as huggingface_hub checks only that.
#[derive(Clone, Copy)]
enum Check {
    Sha256,
    GitSha1,
    Size,
}

/// Rounds without the partial file growing past its best length before
/// giving up: a dropped connection is resumed, a server that never gets
/// further is not retried forever.
const MAX_STALLS: u32 = 5;

#[allow(clippy::too_many_arguments)]
fn download_blob(
    client: &Client,
    cache: &RepoCache,
    repo: &RepoRef,
    commit: &str,
    file: &str,
    meta: &super::http::FileMeta,
    check: Check,
    bar: &indicatif::ProgressBar,
) -> Result<(), HubError> {
    let inc = cache.incomplete(&meta.etag);
    let dir = inc.parent().expect("blobs folder");
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    let len = || std::fs::metadata(&inc).map(|m| m.len()).unwrap_or(0);
    let size_error = |got: u64| HubError::Size { repo: repo.to_string(), file: file.to_string(), expected: meta.size, got };
    if len() > meta.size {
        // A leftover that cannot be this file's beginning.
        std::fs::remove_file(&inc).map_err(|e| io_err("remove", &inc, e))?;
    }
    let (mut best, mut stalls) = (len(), 0);
    loop {
        let have = len();
        if have > meta.size {
            // The server sent more bytes than the Hub announced: not this file.
            let _ = std::fs::remove_file(&inc);
            return Err(size_error(have));
        }
        if have == meta.size {
            break;
        }
        let failure = match client.get_from(&meta.location, have, repo, commit, file) {
            Ok(resp) => receive(resp, &inc, have, bar)?.map(|detail| client.net_err_of(repo, Some(file), detail)),
            Err(e @ HubError::Network { .. }) => Some(e),
            Err(e) => return Err(e),
        };
        let now = len();
        if now > best {
            best = now;
            stalls = 0;
            continue;
        }
        stalls += 1;
        if stalls >= MAX_STALLS {
            return Err(failure.unwrap_or_else(|| size_error(now)));
        }
        std::thread::sleep(std::time::Duration::from_millis(100 << stalls.min(4)));
    }
    verify(&inc, repo, file, &meta.etag, check)?;
    std::fs::rename(&inc, cache.blob(&meta.etag)).map_err(|e| io_err("move into place", &inc, e))
}

/// Appends the body to `.incomplete`, or rewrites it when the server sent
/// the whole file instead of the range. A broken connection keeps what
/// arrived (the caller resumes from it) and gives the reason.
fn receive(resp: super::http::Resp, inc: &Path, have: u64, bar: &indicatif::ProgressBar) -> Result<Option<String>, HubError> {
    let status = resp.status().as_u16();
    let start = resp
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|s| s.trim().parse::<u64>().ok());
    let ranged = match status {
        206 if start == Some(have) => true,
        200 => false,
        // 416, or a range that is not the one asked for: what is there
        // cannot be continued; start over.
        _ => {
            let _ = std::fs::remove_file(inc);
            return Ok(None);
        }
    };
    let io = |e: std::io::Error| io_err("write", inc, e);
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(inc).map_err(io)?;
    if !ranged {
        out.set_len(0).map_err(io)?;
        out.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
    }
    bar.set_position(if ranged { have } else { 0 });
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let result = loop {
        match reader.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                out.write_all(&buf[..n]).map_err(io)?;
                bar.inc(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Some(e.to_string()),
        }
    };
    out.sync_all().map_err(io)?;
    Ok(result)
}

/// The content hash the etag names (see `Check`). A mismatch deletes the
/// bytes, so a rerun fetches them afresh.
fn verify(inc: &Path, repo: &RepoRef, file: &str, etag: &str, check: Check) -> Result<(), HubError> {
    let mut f = File::open(inc).map_err(|e| io_err("read", inc, e))?;
    let len = f.metadata().map_err(|e| io_err("read", inc, e))?.len();
    let (algorithm, got) = match check {
        Check::Sha256 => ("sha256", hash_file::<sha2::Sha256>(&mut f, None)),
        Check::GitSha1 => ("git blob sha1", hash_file::<sha1::Sha1>(&mut f, Some(format!("blob {len}\0").into_bytes()))),
        Check::Size => return Ok(()),
    };
    let got = got.map_err(|e| io_err("read", inc, e))?;
    if !got.eq_ignore_ascii_case(etag) {
        let _ = std::fs::remove_file(inc);
        return Err(HubError::Checksum { repo: repo.to_string(), file: file.to_string(), algorithm, expected: etag.to_string(), got });
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
