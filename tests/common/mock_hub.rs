//! A Hugging Face Hub on 127.0.0.1 for the download tests: a small HTTP/1.1
//! server (std sockets, one thread per connection, keep-alive) that answers
//! the requests huggingface_hub and ferrotune make, with the status codes,
//! headers and error codes the real Hub uses, plus injectable faults (cut or
//! corrupted bodies, ignored Range headers, server errors) and a log of every
//! request with its headers.
//!
//! Served routes:
//! - `HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}`: regular files answer
//!   200 with `ETag: "<git blob sha1>"`, `Content-Length` and `X-Repo-Commit`;
//!   LFS files answer 302 to an absolute `/cdn/<sha256>` URL on this server
//!   but spelled with the other host name (`localhost` for `127.0.0.1` and
//!   back), so a client sees a different host and must drop its token, with
//!   `X-Linked-Etag`, `X-Linked-Size` and `X-Repo-Commit`.
//! - `HEAD|GET /cdn/<sha256>`: the LFS bytes, honouring `Range: bytes=N-[M]`.
//! - `GET /api/{models|datasets}/{repo}[/revision/{rev}]`: repo info JSON.
//! - `GET /api/{models|datasets}/{repo}/tree/{rev}[/{path}]?recursive=..`:
//!   the listing, paginated by `Link: <..>; rel="next"` (small pages).
//! - a repo's old name (`renamed_from`) answers 307 with a relative Location.
//!
//! No xet signal is ever sent (no `xetHash`, no `X-Xet-*` headers), so
//! clients download over plain HTTP.
#![allow(dead_code)]

// Routing and the Hub's answers; this file holds the server and the types.
#[path = "mock_hub_routes.rs"]
mod routes;

use sha1::Digest;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One file of a commit. `lfs` files are served through the CDN redirect and
/// named by their sha256 in the cache; the others by their git blob sha1.
#[derive(Clone, Debug)]
pub struct MockFile {
    pub path: String,
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

impl MockFile {
    pub fn regular(path: &str, bytes: impl Into<Vec<u8>>) -> MockFile {
        MockFile { path: path.to_string(), bytes: bytes.into(), lfs: false }
    }

    pub fn lfs(path: &str, bytes: impl Into<Vec<u8>>) -> MockFile {
        MockFile { path: path.to_string(), bytes: bytes.into(), lfs: true }
    }

    /// The name of this file's blob in the cache (the Hub's etag).
    pub fn etag(&self) -> String {
        if self.lfs { sha256_hex(&self.bytes) } else { git_blob_sha1(&self.bytes) }
    }

    /// The git LFS pointer text stored in git in place of the bytes.
    pub fn lfs_pointer(&self) -> String {
        format!("version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n", sha256_hex(&self.bytes), self.bytes.len())
    }

    /// The git blob id of what git stores: the bytes, or the LFS pointer.
    pub fn git_oid(&self) -> String {
        if self.lfs { git_blob_sha1(self.lfs_pointer().as_bytes()) } else { git_blob_sha1(&self.bytes) }
    }
}

/// Who may read a repo. Private repos need their token; gated repos show
/// their metadata to everyone but serve files only to granted tokens.
#[derive(Clone, Debug)]
pub enum Access {
    Public,
    Private { token: String },
    Gated { granted: Vec<String> },
}

#[derive(Clone, Debug)]
pub struct MockRepo {
    /// `org/name`.
    pub id: String,
    pub dataset: bool,
    pub access: Access,
    /// Branches, tags and PR refs (`main`, `v1.0`, `refs/pr/1`) -> commit.
    pub refs: Vec<(String, String)>,
    /// Commit sha (40 hex) -> the files of that commit.
    pub commits: Vec<(String, Vec<MockFile>)>,
    /// An old id that now redirects (307, relative Location) to `id`.
    pub renamed_from: Option<String>,
}

impl MockRepo {
    /// A public model repo with one commit, `main` pointing at it.
    pub fn model(id: &str, files: Vec<MockFile>) -> MockRepo {
        let commit = commit_sha(&format!("{id}@main"));
        MockRepo {
            id: id.to_string(),
            dataset: false,
            access: Access::Public,
            refs: vec![("main".to_string(), commit.clone())],
            commits: vec![(commit, files)],
            renamed_from: None,
        }
    }

    /// A public dataset repo with one commit, `main` pointing at it.
    pub fn dataset(id: &str, files: Vec<MockFile>) -> MockRepo {
        MockRepo { dataset: true, ..MockRepo::model(id, files) }
    }

    /// The commit a ref points at.
    pub fn commit_of(&self, name: &str) -> &str {
        &self.refs.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{}: no ref {name}", self.id)).1
    }

    /// The files of the commit a revision (ref or commit sha) names.
    pub fn files_at(&self, rev: &str) -> &[MockFile] {
        let commit = self.resolve(rev).unwrap_or_else(|| panic!("{}: no revision {rev}", self.id));
        &self.commits.iter().find(|(c, _)| *c == commit).unwrap().1
    }

    pub fn file(&self, rev: &str, path: &str) -> &MockFile {
        self.files_at(rev).iter().find(|f| f.path == path).unwrap_or_else(|| panic!("{}@{rev}: no file {path}", self.id))
    }

    /// `models--org--name` / `datasets--org--name`.
    pub fn folder(&self) -> String {
        let kind = if self.dataset { "datasets" } else { "models" };
        format!("{kind}--{}", self.id.replace('/', "--"))
    }

    fn resolve(&self, rev: &str) -> Option<String> {
        if let Some((_, c)) = self.refs.iter().find(|(n, _)| n == rev) {
            return Some(c.clone());
        }
        self.commits.iter().find(|(c, _)| c == rev).map(|(c, _)| c.clone())
    }
}

/// Faults injected into the serving of one file (matched by its path in the
/// repo, in any repo). `times` counts the affected responses; cuts and
/// corruptions count body GETs only.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Announce the full length, send `bytes` bytes of the body, close.
    CutAfter { bytes: usize, times: usize },
    /// Flip one byte of the body (same length).
    Corrupt { times: usize },
    /// Answer every Range request with 200 and the whole body (while
    /// queued, whatever fault is first).
    IgnoreRange,
    /// Answer 500 to any request for the file (HEAD, resolve GET, CDN GET).
    ServerError { times: usize },
    /// Answer `code` (no X-Error-Code, as a CDN does, e.g. 403 for an
    /// expired signed URL) to any request for the file.
    Status { code: u16, times: usize },
    /// Send the first `bytes` bytes, then wait `ms` before the rest.
    Pause { bytes: usize, ms: u64 },
}

/// One request as the server saw it. Header names are lower-case.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub status: u16,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The path without the query, percent-decoded.
    pub fn path(&self) -> String {
        percent_decode(self.target.split('?').next().unwrap_or(""))
    }

    /// A GET that carries file bytes (resolve of a regular file, or the CDN).
    pub fn is_body_get(&self) -> bool {
        self.method == "GET" && (self.status == 200 || self.status == 206) && (self.target.starts_with("/cdn/") || self.target.contains("/resolve/"))
    }
}

struct State {
    repos: Vec<MockRepo>,
    faults: HashMap<String, Vec<Fault>>,
    log: Vec<Logged>,
    page_size: usize,
}

pub struct MockHub {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    /// Requests being answered now, and the most ever at once.
    busy: Arc<(AtomicUsize, AtomicUsize)>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl MockHub {
    pub fn start(repos: Vec<MockRepo>) -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { repos, faults: HashMap::new(), log: Vec::new(), page_size: 2 }));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let (st, sp, cn, bz) = (state.clone(), stop.clone(), connections.clone(), busy.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                cn.fetch_add(1, Ordering::SeqCst);
                let (st, sp, bz) = (st.clone(), sp.clone(), bz.clone());
                std::thread::spawn(move || serve_connection(conn, port, &st, &sp, &bz));
            }
        });
        MockHub { port, state, stop, connections, busy, accept: Some(accept) }
    }

    /// `http://127.0.0.1:<port>` (no trailing slash), the HF_ENDPOINT.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Queues a fault for every file at `file_path`: the first queued fault
    /// with answers left applies (so `CutAfter{times: 1}` then
    /// `ServerError{..}` cuts one body and then refuses the retries).
    pub fn fault(&self, file_path: &str, f: Fault) {
        self.state.lock().unwrap().faults.entry(file_path.to_string()).or_default().push(f);
    }

    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// Entries per page of the tree listing (2 by default, to exercise paging).
    pub fn set_page_size(&self, n: usize) {
        self.state.lock().unwrap().page_size = n.max(1);
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_requests(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// TCP connections accepted so far (0 proves no socket was opened).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The most requests answered at the same time so far.
    pub fn max_concurrent(&self) -> usize {
        self.busy.1.load(Ordering::SeqCst)
    }

    /// Changes the repos served from now on (e.g. to move a branch).
    pub fn with_repos<R>(&self, f: impl FnOnce(&mut Vec<MockRepo>) -> R) -> R {
        f(&mut self.state.lock().unwrap().repos)
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag; it does not count.
        if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            self.connections.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// An endpoint URL on which nothing listens (a port just released).
pub fn closed_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

pub fn git_blob_sha1(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

/// A deterministic 40-hex commit id for a label.
pub fn commit_sha(label: &str) -> String {
    hex(&sha1::Sha1::digest(label.as_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn percent_encode_path(s: &str) -> String {
    let mut out = String::new();
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':')?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    // Requests here carry no body, but drain one if announced.
    if let Some(n) = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok()) {
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).ok()?;
    }
    Some(Request { method, target, headers })
}

/// What to send back. `cut`/`pause` apply to the body only.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut: Option<usize>,
    pause: Option<(usize, u64)>,
}

impl Response {
    fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new(), cut: None, pause: None }
    }

    fn header(mut self, n: &str, v: impl Into<String>) -> Response {
        self.headers.push((n.to_string(), v.into()));
        self
    }

    fn json(status: u16, v: &serde_json::Value) -> Response {
        let mut r = Response::new(status).header("Content-Type", "application/json; charset=utf-8");
        r.body = serde_json::to_vec(v).unwrap();
        r
    }

    fn error(status: u16, code: Option<&str>, message: &str) -> Response {
        let mut r = Response::json(status, &serde_json::json!({ "error": message }));
        if let Some(code) = code {
            r = r.header("X-Error-Code", code);
        }
        r.header("X-Error-Message", message)
    }
}

fn serve_connection(conn: TcpStream, port: u16, state: &Mutex<State>, stop: &AtomicBool, busy: &(AtomicUsize, AtomicUsize)) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    // Small answers go out at once (Nagle + delayed ACKs would add ~40 ms).
    let _ = conn.set_nodelay(true);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    while !stop.load(Ordering::SeqCst) {
        let Some(req) = read_request(&mut reader) else { break };
        let now = busy.0.fetch_add(1, Ordering::SeqCst) + 1;
        busy.1.fetch_max(now, Ordering::SeqCst);
        let resp = routes::route(&req, port, state);
        {
            let mut st = state.lock().unwrap();
            st.log.push(Logged { method: req.method.clone(), target: req.target.clone(), headers: req.headers.clone(), status: resp.status });
        }
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let kept = write_response(&mut writer, &req.method, resp);
        busy.0.fetch_sub(1, Ordering::SeqCst);
        if !kept || close {
            break;
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

/// Writes a response; false when the connection must be closed (a cut body).
fn write_response(w: &mut TcpStream, method: &str, resp: Response) -> bool {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    let has_len = resp.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    for (n, v) in &resp.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
    }
    if resp.cut.is_some() {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let body = &resp.body;
    if method == "HEAD" || (resp.cut.is_none() && resp.pause.is_none()) {
        // Head and body in one write.
        let mut all = head.into_bytes();
        if method != "HEAD" {
            all.extend_from_slice(body);
        }
        return w.write_all(&all).is_ok() && w.flush().is_ok();
    }
    if w.write_all(head.as_bytes()).is_err() {
        return false;
    }
    if let Some(n) = resp.cut {
        let _ = w.write_all(&body[..n.min(body.len())]);
        let _ = w.flush();
        return false;
    }
    if let Some((n, ms)) = resp.pause {
        let n = n.min(body.len());
        if w.write_all(&body[..n]).is_err() || w.flush().is_err() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(ms));
        return w.write_all(&body[n..]).is_ok() && w.flush().is_ok();
    }
    false
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Status",
    }
}
