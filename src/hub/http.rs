//! HTTP to the Hub: headers, the metadata HEAD (relative redirects
//! followed by hand, absolute ones read but not followed, as huggingface_hub
//! does), JSON listings with `Link: rel="next"` pages, and the mapping of
//! status + `X-Error-Code` to one-line errors.
//!
//! ureq (blocking, rustls) is the client: downloads run on a few threads,
//! so no async runtime is needed. Proxies come from ALL_PROXY / HTTPS_PROXY /
//! HTTP_PROXY with NO_PROXY honoured (ureq's `Proxy::try_from_env`).

use std::time::Duration;

use ureq::http::{HeaderMap, Response};

use super::HubError;
use super::env::HubEnv;

pub type Resp = Response<ureq::Body>;

/// What a HEAD on a resolve URL says about one file.
#[derive(Debug, Clone)]
pub struct FileMeta {
    pub commit: String,
    /// The blob name: LFS sha256 or git blob sha1, quotes and `W/` removed.
    pub etag: String,
    pub size: u64,
    /// Where the bytes are: the CDN for LFS files, else the resolve URL.
    pub location: String,
}

pub struct Client {
    pub env: HubEnv,
    meta: ureq::Agent,
    data: ureq::Agent,
}

/// Percent-encodes as Python's `urllib.parse.quote` with the given safe set.
pub fn quote(s: &str, safe: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || safe.as_bytes().contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[start..].find('/').map(|i| start + i).unwrap_or(url.len());
    &url[..end]
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

impl Client {
    pub fn new(env: &HubEnv) -> Client {
        let agent = |redirects: u32, timeout: Duration| {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                // A renamed repo redirects on the Hub itself: keep the token
                // there (never towards another host).
                .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
                .user_agent(concat!("ferrotune/", env!("CARGO_PKG_VERSION")))
                // Sizes are compared with the bytes on disk: no transparent
                // decompression (huggingface_hub asks for identity too).
                .accept_encoding("identity")
                .timeout_connect(Some(timeout))
                .timeout_recv_response(Some(timeout))
                .timeout_per_read(Some(timeout.max(Duration::from_secs(10))))
                .build()
                .new_agent()
        };
        Client { env: env.clone(), meta: agent(0, env.etag_timeout), data: agent(10, env.download_timeout) }
    }

    fn authorize<B>(&self, req: ureq::RequestBuilder<B>, url: &str) -> ureq::RequestBuilder<B> {
        match &self.env.token {
            // The token goes to the Hub only, never to a CDN host.
            Some(t) if origin(url) == origin(&self.env.endpoint) => req.header("authorization", format!("Bearer {t}")),
            _ => req,
        }
    }

    /// A connection failure while fetching `file` of `repo` (or its listing).
    pub fn net_err_of(&self, repo: &super::RepoRef, file: Option<&str>, detail: String) -> HubError {
        let what = match file {
            Some(f) => format!("{f} of {repo}"),
            None => repo.to_string(),
        };
        HubError::Network { what, endpoint: self.env.endpoint.clone(), detail }
    }

    fn net_err(&self, e: ureq::Error, repo: &super::RepoRef, file: Option<&str>) -> HubError {
        let detail = match &e {
            ureq::Error::Io(io) => io.to_string(),
            other => other.to_string(),
        };
        self.net_err_of(repo, file, detail)
    }

    /// The resolve URL of a file at a revision.
    pub fn resolve_url(&self, repo: &super::RepoRef, revision: &str, file: &str) -> String {
        format!("{}/{}{}/resolve/{}/{}", self.env.endpoint, repo.kind.url_prefix(), repo.id, quote(revision, ""), quote(file, "/"))
    }

    /// HEAD of a file: commit, etag, size and where to GET it.
    pub fn file_meta(&self, repo: &super::RepoRef, revision: &str, file: &str) -> Result<FileMeta, HubError> {
        let mut url = self.resolve_url(repo, revision, file);
        for _ in 0..10 {
            // Retried on 429 / 5xx / a dropped connection (huggingface_hub
            // retries too when nothing is cached).
            let resp = self.with_retries(repo, Some(file), || self.authorize(self.meta.head(&url), &url).call())?;
            let status = resp.status().as_u16();
            let h = resp.headers();
            let location = header(h, "location");
            if (300..400).contains(&status)
                && let Some(loc) = location.as_deref().filter(|l| l.starts_with('/'))
            {
                // A renamed repo: the same request at the new path.
                url = format!("{}{loc}", origin(&url));
                continue;
            }
            if status >= 400 {
                return Err(self.status_error(&resp, repo, revision, Some(file), &url));
            }
            let missing = |what: &str| HubError::Protocol { repo: repo.to_string(), url: url.clone(), detail: format!("no {what} header") };
            let commit = header(h, "x-repo-commit").ok_or_else(|| missing("X-Repo-Commit"))?;
            let etag = header(h, "x-linked-etag").or_else(|| header(h, "etag")).ok_or_else(|| missing("ETag"))?;
            let size = header(h, "x-linked-size")
                .or_else(|| if (300..400).contains(&status) { None } else { header(h, "content-length") })
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| missing("X-Linked-Size or Content-Length"))?;
            let etag = etag.trim().trim_start_matches("W/").trim_matches('"').to_string();
            return Ok(FileMeta { commit: commit.trim().to_string(), etag, size, location: location.unwrap_or(url) });
        }
        Err(HubError::Protocol { repo: repo.to_string(), url, detail: "too many redirects".into() })
    }

    /// A JSON document and the next page's URL (`Link: <…>; rel="next"`).
    pub fn get_json(&self, url: &str, repo: &super::RepoRef, revision: &str) -> Result<(serde_json::Value, Option<String>), HubError> {
        let mut resp = self.with_retries(repo, None, || self.authorize(self.data.get(url), url).header("accept", "application/json").call())?;
        if resp.status().as_u16() >= 400 {
            return Err(self.status_error(&resp, repo, revision, None, url));
        }
        let next = header(resp.headers(), "link").and_then(|l| next_link(&l));
        let next = next.map(|n| if n.starts_with('/') { format!("{}{n}", origin(url)) } else { n });
        let text = resp.body_mut().with_config().limit(1 << 30).read_to_string().map_err(|e| self.net_err(e, repo, None))?;
        let value = serde_json::from_str(&text)
            .map_err(|e| HubError::Protocol { repo: repo.to_string(), url: url.to_string(), detail: format!("not JSON: {e}") })?;
        Ok((value, next))
    }

    /// GET of a file's bytes from `start` on (a Range request when > 0).
    pub fn get_from(&self, url: &str, start: u64, repo: &super::RepoRef, revision: &str, file: &str) -> Result<Resp, HubError> {
        let resp = self.with_retries(repo, Some(file), || {
            let mut req = self.authorize(self.data.get(url), url);
            if start > 0 {
                req = req.header("range", format!("bytes={start}-"));
            }
            req.call()
        })?;
        let status = resp.status().as_u16();
        if status >= 400 && status != 416 {
            return Err(self.status_error(&resp, repo, revision, Some(file), url));
        }
        Ok(resp)
    }

    /// Retries 429, 5xx and connection failures a few times with backoff.
    fn with_retries(&self, repo: &super::RepoRef, file: Option<&str>, call: impl Fn() -> Result<Resp, ureq::Error>) -> Result<Resp, HubError> {
        let mut last = None;
        for attempt in 0..4u32 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(250 << attempt));
            }
            match call() {
                Ok(r) if r.status().as_u16() == 429 || r.status().as_u16() >= 500 => {
                    if attempt == 3 {
                        return Ok(r);
                    }
                }
                Ok(r) => return Ok(r),
                Err(e) => {
                    let retry = matches!(e, ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed);
                    let refused = matches!(&e, ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused);
                    last = Some(self.net_err(e, repo, file));
                    if !retry || refused {
                        break;
                    }
                }
            }
        }
        Err(last.expect("an error was recorded"))
    }

    /// The error an error status means, from `X-Error-Code` as the Hub sends it.
    pub fn status_error(&self, resp: &Resp, repo: &super::RepoRef, revision: &str, file: Option<&str>, url: &str) -> HubError {
        let status = resp.status().as_u16();
        let h = resp.headers();
        let code = header(h, "x-error-code").unwrap_or_default();
        let message = header(h, "x-error-message").unwrap_or_default();
        let token = self.env.token.is_some();
        let r = repo.to_string();
        match code.as_str() {
            "GatedRepo" => HubError::Gated { repo: r, token: token && status == 403 },
            "RepoNotFound" => HubError::RepoNotFound { repo: r, token: token && status == 404 },
            "RevisionNotFound" => HubError::RevisionNotFound { repo: r, revision: revision.to_string() },
            "EntryNotFound" => HubError::EntryNotFound { repo: r, revision: revision.to_string(), file: file.unwrap_or("").to_string() },
            _ if message == "Access to this resource is disabled." => HubError::Disabled { repo: r },
            _ if status == 401 && message.contains("Invalid credentials") => {
                HubError::BadToken { repo: r, source: self.env.token_source.clone().unwrap_or_else(|| "the environment".into()) }
            }
            _ if status == 401 => HubError::RepoNotFound { repo: r, token },
            _ if status == 404 && file.is_some() && !url.contains("/api/") => {
                HubError::EntryNotFound { repo: r, revision: revision.to_string(), file: file.unwrap_or("").to_string() }
            }
            _ if status == 404 => HubError::RepoNotFound { repo: r, token: true },
            _ => HubError::Http { repo: r, url: url.to_string(), status, message },
        }
    }
}

/// The `rel="next"` target of a Link header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next")
            .then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_links_match_the_hub_conventions() {
        assert_eq!(quote("refs/pr/1", ""), "refs%2Fpr%2F1");
        assert_eq!(quote("sub dir/é.json", "/"), "sub%20dir/%C3%A9.json");
        assert_eq!(origin("http://127.0.0.1:8/a/b"), "http://127.0.0.1:8");
        let l = "<https://h/api/models/a/b/tree/main?cursor=x>; rel=\"next\"";
        assert_eq!(next_link(l).as_deref(), Some("https://h/api/models/a/b/tree/main?cursor=x"));
        assert_eq!(next_link("<x>; rel=\"prev\""), None);
    }
}
