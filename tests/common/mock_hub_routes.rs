//! The mock Hub's answers, route by route (the server and the types are in
//! mock_hub.rs). Status codes, headers and error codes follow the real Hub.

use super::{Access, Fault, MockFile, MockRepo, Request, Response, State, git_blob_sha1, percent_decode, sha256_hex};
use serde_json::json;
use std::sync::Mutex;

pub(super) fn route(req: &Request, port: u16, state: &Mutex<State>) -> Response {
    let (raw_path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    if req.method != "GET" && req.method != "HEAD" {
        return Response::error(405, None, "Method not allowed");
    }
    let host = req.header("host").map(str::to_string).unwrap_or_else(|| format!("127.0.0.1:{port}"));
    let mut st = state.lock().unwrap();
    if let Some(sha) = raw_path.strip_prefix("/cdn/") {
        return cdn(req, sha, &mut st);
    }
    let segs: Vec<String> = raw_path.split('/').skip(1).map(percent_decode).collect();
    if segs.first().is_some_and(|s| s == "api") {
        return api(req, raw_path, &segs[1..], query, &host, &mut st);
    }
    resolve(req, raw_path, query, &segs, &host, port, &mut st)
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(req: &Request) -> Option<&str> {
    req.header("authorization").map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim())
}

enum Lookup<'a> {
    Found(&'a MockRepo),
    Renamed(&'a MockRepo, String),
    Missing,
}

fn find_repo<'a>(st: &'a State, id: &str, dataset: bool) -> Lookup<'a> {
    if let Some(r) = st.repos.iter().find(|r| r.id == id && r.dataset == dataset) {
        return Lookup::Found(r);
    }
    match st.repos.iter().find(|r| r.dataset == dataset && r.renamed_from.as_deref() == Some(id)) {
        Some(r) => Lookup::Renamed(r, r.id.clone()),
        None => Lookup::Missing,
    }
}

/// The Hub does not tell a missing repo from a private one: 401 without a
/// token, 404 with one; both `RepoNotFound`.
fn repo_not_found(req: &Request) -> Response {
    let status = if bearer(req).is_some() { 404 } else { 401 };
    Response::error(status, Some("RepoNotFound"), "Repository not found")
}

/// Err(answer) when the caller may not see the repo (`files`: may not read
/// its files; gated repos show their metadata to everyone).
fn check_access(req: &Request, repo: &MockRepo, files: bool) -> Result<(), Response> {
    let token = bearer(req);
    match &repo.access {
        Access::Public => Ok(()),
        Access::Private { token: t } if token == Some(t.as_str()) => Ok(()),
        Access::Private { .. } => Err(repo_not_found(req)),
        Access::Gated { .. } if !files => Ok(()),
        Access::Gated { granted } => {
            let kind = if repo.dataset { "dataset" } else { "model" };
            match token {
                None => Err(Response::error(
                    401,
                    Some("GatedRepo"),
                    &format!("Access to {kind} {} is restricted. You must have access to it and be authenticated to access it. Please log in.", repo.id),
                )),
                Some(t) if granted.iter().any(|g| g == t) => Ok(()),
                Some(_) => Err(Response::error(
                    403,
                    Some("GatedRepo"),
                    &format!("Access to {kind} {} is restricted and you are not in the authorized list. Visit the repo page to ask for access.", repo.id),
                )),
            }
        }
    }
}

fn revision_not_found(rev: &str) -> Response {
    Response::error(404, Some("RevisionNotFound"), &format!("Invalid rev id: {rev}"))
}

/// The revision starting at `segs[i]`: one (percent-encoded) segment, or
/// `refs/pr/N` / `refs/convert/X` sent unencoded. Returns (rev, next index).
fn take_revision(segs: &[String], i: usize) -> Option<(String, usize)> {
    let first = segs.get(i)?;
    if first == "refs" && segs.len() > i + 2 && (segs[i + 1] == "pr" || segs[i + 1] == "convert") {
        return Some((segs[i..i + 3].join("/"), i + 3));
    }
    Some((first.clone(), i + 1))
}

/// 307 to the same URL with the repo's new name (a relative Location).
fn renamed(raw_path: &str, query: &str, prefix: &str, old: &str, new: &str) -> Response {
    let from = format!("/{prefix}{old}/");
    let mut loc = raw_path.replacen(&from, &format!("/{prefix}{new}/"), 1);
    if !query.is_empty() {
        loc = format!("{loc}?{query}");
    }
    let mut r = Response::new(307).header("Location", loc.clone()).header("Content-Type", "text/plain; charset=utf-8");
    r.body = format!("Temporary Redirect. Redirecting to {loc}").into_bytes();
    r
}

fn resolve(req: &Request, raw_path: &str, query: &str, segs: &[String], host: &str, port: u16, st: &mut State) -> Response {
    let dataset = segs.first().is_some_and(|s| s == "datasets");
    let segs = if dataset { &segs[1..] } else { segs };
    let Some(pos) = segs.iter().position(|s| s == "resolve").filter(|&p| p >= 1) else {
        return Response::error(404, None, "Not found");
    };
    let id = segs[..pos].join("/");
    let prefix = if dataset { "datasets/" } else { "" };
    let repo = match find_repo(st, &id, dataset) {
        Lookup::Found(r) => r,
        Lookup::Renamed(_, new) => return renamed(raw_path, query, prefix, &id, &new),
        Lookup::Missing => return repo_not_found(req),
    };
    if let Err(r) = check_access(req, repo, true) {
        return r;
    }
    let Some((rev, next)) = take_revision(segs, pos + 1) else { return revision_not_found("") };
    let Some(commit) = repo.resolve(&rev) else { return revision_not_found(&rev) };
    let file_path = segs[next..].join("/");
    let files = &repo.commits.iter().find(|(c, _)| *c == commit).unwrap().1;
    let Some(file) = files.iter().find(|f| f.path == file_path).cloned() else {
        return Response::error(404, Some("EntryNotFound"), &format!("{file_path} does not exist on \"{rev}\"")).header("X-Repo-Commit", commit);
    };
    if let Some(r) = server_error(st, &file.path) {
        return r;
    }
    if file.lfs {
        let sha = sha256_hex(&file.bytes);
        let other = if host.starts_with("127.0.0.1") { "localhost" } else { "127.0.0.1" };
        let location = format!("http://{other}:{port}/cdn/{sha}");
        let mut r = Response::new(302)
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Location", location.clone())
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", file.bytes.len().to_string())
            .header("X-Repo-Commit", commit)
            .header("ETag", format!("\"{}\"", file.git_oid()))
            .header("Accept-Ranges", "bytes");
        r.body = format!("Found. Redirecting to {location}").into_bytes();
        return r;
    }
    let base = Response::new(200)
        .header("Content-Type", "application/octet-stream")
        .header("ETag", format!("\"{}\"", git_blob_sha1(&file.bytes)))
        .header("X-Repo-Commit", commit)
        .header("Accept-Ranges", "bytes");
    body_response(req, &file, base, st)
}

fn cdn(req: &Request, sha: &str, st: &mut State) -> Response {
    let file = st.repos.iter().flat_map(|r| r.commits.iter()).flat_map(|(_, fs)| fs.iter()).find(|f| f.lfs && sha256_hex(&f.bytes) == sha).cloned();
    let Some(file) = file else {
        return Response::error(404, None, "NoSuchKey");
    };
    if let Some(r) = server_error(st, &file.path) {
        return r;
    }
    let base = Response::new(200)
        .header("Content-Type", "application/octet-stream")
        .header("ETag", format!("\"{}\"", &sha[..32]))
        .header("Accept-Ranges", "bytes")
        .header("Content-Disposition", format!("inline; filename*=UTF-8''{0}; filename=\"{0}\";", file.path.rsplit('/').next().unwrap()));
    body_response(req, &file, base, st)
}

/// A 500 (or the given status) if a `ServerError` (`Status`) fault for
/// `path` has answers left.
fn server_error(st: &mut State, path: &str) -> Option<Response> {
    match active_fault(st, path)? {
        Fault::ServerError { times } => {
            *times -= 1;
            Some(Response::error(500, None, "Internal Error - We're working hard to fix this as soon as possible!"))
        }
        Fault::Status { code, times } => {
            *times -= 1;
            Some(Response::error(*code, None, "Request has expired"))
        }
        _ => None,
    }
}

/// The first fault queued for `path` that still has answers left (spent
/// ones are dropped).
fn active_fault<'a>(st: &'a mut State, path: &str) -> Option<&'a mut Fault> {
    let q = st.faults.get_mut(path)?;
    q.retain(|f| !matches!(f, Fault::CutAfter { times: 0, .. } | Fault::Corrupt { times: 0 } | Fault::ServerError { times: 0 } | Fault::Status { times: 0, .. }));
    q.first_mut()
}

/// `Range: bytes=S-[E]` -> (S, E inclusive if given).
fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
    let (s, e) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let s = s.trim().parse().ok()?;
    let e = if e.trim().is_empty() { None } else { Some(e.trim().parse().ok()?) };
    Some((s, e))
}

/// The file's bytes (or the requested range), with the file's fault applied.
fn body_response(req: &Request, file: &MockFile, base: Response, st: &mut State) -> Response {
    let len = file.bytes.len();
    let fault = active_fault(st, &file.path).cloned();
    // IgnoreRange holds while queued anywhere, so it combines with a cut.
    let ignore_range = st.faults.get(&file.path).is_some_and(|q| q.iter().any(|f| matches!(f, Fault::IgnoreRange)));
    let range = req.header("range").and_then(parse_range).filter(|_| !ignore_range && len > 0);
    let mut r = base;
    let (start, end) = match range {
        Some((s, _)) if s >= len => {
            let mut e = Response::error(416, None, "Requested Range Not Satisfiable");
            e = e.header("Content-Range", format!("bytes */{len}"));
            return e;
        }
        Some((s, e)) => {
            let e = e.unwrap_or(len - 1).min(len - 1);
            r.status = 206;
            r = r.header("Content-Range", format!("bytes {s}-{e}/{len}"));
            (s, e + 1)
        }
        None => (0, len),
    };
    r.body = file.bytes[start..end.max(start)].to_vec();
    let n = r.body.len();
    r = r.header("Content-Length", n.to_string());
    if req.method != "GET" {
        return r;
    }
    let mut used = false;
    match fault {
        Some(Fault::CutAfter { bytes, .. }) => {
            r.cut = Some(bytes);
            used = true;
        }
        Some(Fault::Corrupt { .. }) if !r.body.is_empty() => {
            let i = r.body.len() / 2;
            r.body[i] ^= 0x5a;
            used = true;
        }
        Some(Fault::Pause { bytes, ms }) => r.pause = Some((bytes, ms)),
        _ => {}
    }
    if used && let Some(Fault::CutAfter { times, .. } | Fault::Corrupt { times }) = active_fault(st, &file.path) {
        *times -= 1;
    }
    r
}

fn api(req: &Request, raw_path: &str, segs: &[String], query: &str, host: &str, st: &mut State) -> Response {
    let dataset = match segs.first().map(String::as_str) {
        Some("models") => false,
        Some("datasets") => true,
        _ => return Response::error(404, None, "Not found"),
    };
    let kw = segs.iter().skip(2).position(|s| s == "revision" || s == "tree").map(|p| p + 2);
    let id = segs[1..kw.unwrap_or(segs.len())].join("/");
    let prefix = if dataset { "api/datasets/" } else { "api/models/" };
    let repo = match find_repo(st, &id, dataset) {
        Lookup::Found(r) => r,
        Lookup::Renamed(_, new) => return renamed(raw_path, query, prefix, &id, &new),
        Lookup::Missing => return repo_not_found(req),
    };
    if let Err(r) = check_access(req, repo, false) {
        return r;
    }
    let (rev, next) = match kw {
        None => ("main".to_string(), segs.len()),
        Some(k) => match take_revision(segs, k + 1) {
            Some(x) => x,
            None => return Response::error(404, None, "Not found"),
        },
    };
    let Some(commit) = repo.resolve(&rev) else { return revision_not_found(&rev) };
    let files = &repo.commits.iter().find(|(c, _)| *c == commit).unwrap().1;
    if kw.is_none_or(|k| segs[k] == "revision") {
        return Response::json(200, &repo_info(repo, &commit, files));
    }
    let sub = segs[next..].join("/");
    let params: Vec<(&str, &str)> = query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
    let recursive = params.iter().any(|(k, v)| *k == "recursive" && matches!(v.to_ascii_lowercase().as_str(), "true" | "1"));
    let cursor: usize = params.iter().find(|(k, _)| *k == "cursor").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let entries = tree_entries(files, &sub, recursive);
    if !sub.is_empty() && entries.is_empty() && !files.iter().any(|f| f.path == sub) {
        return Response::error(404, Some("EntryNotFound"), &format!("{sub} does not exist on \"{rev}\"")).header("X-Repo-Commit", commit);
    }
    let end = (cursor + st.page_size).min(entries.len());
    let page: Vec<serde_json::Value> = entries[cursor.min(end)..end].to_vec();
    let mut r = Response::json(200, &serde_json::Value::Array(page));
    if end < entries.len() {
        let kept: Vec<String> = params.iter().filter(|(k, _)| *k != "cursor").map(|(k, v)| format!("{k}={v}")).collect();
        let mut q = kept.join("&");
        if !q.is_empty() {
            q.push('&');
        }
        r = r.header("Link", format!("<http://{host}{raw_path}?{q}cursor={end}>; rel=\"next\""));
    }
    r
}

fn repo_info(repo: &MockRepo, commit: &str, files: &[MockFile]) -> serde_json::Value {
    let siblings: Vec<_> = files.iter().map(|f| json!({ "rfilename": f.path })).collect();
    let size: usize = files.iter().map(|f| f.bytes.len()).sum();
    let mut v = json!({
        "_id": &commit[..24],
        "id": repo.id,
        "author": repo.id.split('/').next().unwrap(),
        "sha": commit,
        "lastModified": "2026-01-02T03:04:05.000Z",
        "createdAt": "2026-01-01T00:00:00.000Z",
        "private": matches!(repo.access, Access::Private { .. }),
        "gated": if matches!(repo.access, Access::Gated { .. }) { json!("manual") } else { json!(false) },
        "disabled": false,
        "tags": [],
        "siblings": siblings,
        "usedStorage": size,
    });
    if !repo.dataset {
        v["modelId"] = json!(repo.id);
    }
    v
}

/// Tree entries (files and directories, sorted by path) under `sub`.
fn tree_entries(files: &[MockFile], sub: &str, recursive: bool) -> Vec<serde_json::Value> {
    let base = if sub.is_empty() { String::new() } else { format!("{sub}/") };
    let mut dirs = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for f in files.iter().filter(|f| f.path.starts_with(&base)) {
        let rel = &f.path[base.len()..];
        let parts: Vec<&str> = rel.split('/').collect();
        for i in 1..parts.len() {
            if recursive || i == 1 {
                dirs.insert(format!("{base}{}", parts[..i].join("/")));
            }
        }
        if !recursive && parts.len() > 1 {
            continue;
        }
        let mut e = json!({ "type": "file", "oid": f.git_oid(), "size": f.bytes.len(), "path": f.path });
        if f.lfs {
            e["lfs"] = json!({ "oid": sha256_hex(&f.bytes), "size": f.bytes.len(), "pointerSize": f.lfs_pointer().len() });
        }
        out.push(e);
    }
    for d in dirs {
        out.push(json!({ "type": "directory", "oid": super::commit_sha(&format!("tree {d}")), "size": 0, "path": d }));
    }
    out.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    out
}
