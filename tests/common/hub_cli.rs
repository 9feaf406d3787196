//! Running `ferrotune` against the mock Hub: a sandbox (its own cache,
//! HF_HOME and HOME, every Hub variable of the test's own environment
//! removed, no proxy), the run's snapshot path or its one error line, and
//! listings of what a snapshot holds.
//!
//! Include with mock_hub.rs and hub_tree.rs at the test's root.
#![allow(dead_code)]

use crate::hub_tree::{core_entries, dump_cache, load_fixture};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The longest one run may take before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(30);

pub struct Sandbox {
    pub tmp: tempfile::TempDir,
    /// HF_HUB_CACHE.
    pub cache: PathBuf,
    /// HF_HOME (where a token file goes).
    pub hf_home: PathBuf,
    /// HOME.
    pub home: PathBuf,
    pub endpoint: String,
}

impl Sandbox {
    pub fn new(endpoint: &str) -> Sandbox {
        let tmp = tempfile::tempdir().unwrap();
        let (cache, hf_home, home) = (tmp.path().join("cache"), tmp.path().join("hf_home"), tmp.path().join("home"));
        for d in [&hf_home, &home] {
            std::fs::create_dir_all(d).unwrap();
        }
        Sandbox { tmp, cache, hf_home, home, endpoint: endpoint.to_string() }
    }

    /// `ferrotune ARGS` with only the sandbox's Hub environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
        c.args(args);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            let proxy = k.eq_ignore_ascii_case("http_proxy") || k.eq_ignore_ascii_case("https_proxy") || k.eq_ignore_ascii_case("all_proxy");
            if k.starts_with("HF_") || k.starts_with("HUGGING") || k == "TRANSFORMERS_OFFLINE" || k == "XDG_CACHE_HOME" || proxy {
                c.env_remove(&k);
            }
        }
        c.env("HOME", &self.home)
            .env("HF_ENDPOINT", &self.endpoint)
            .env("HF_HUB_CACHE", &self.cache)
            .env("HF_HOME", &self.hf_home)
            .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            .env("NO_PROXY", "127.0.0.1,localhost");
        c
    }

    /// `ferrotune download ARGS`.
    pub fn download(&self, args: &[&str]) -> Run {
        let mut all = vec!["download"];
        all.extend_from_slice(args);
        run(self.cmd(&all))
    }

    /// `ferrotune download ARGS` with extra variables (`None`: removed).
    pub fn download_env(&self, args: &[&str], vars: &[(&str, Option<&str>)]) -> Run {
        let mut all = vec!["download"];
        all.extend_from_slice(args);
        let mut c = self.cmd(&all);
        for (k, v) in vars {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        run(c)
    }

    /// The repo folder in the sandbox cache.
    pub fn repo_dir(&self, folder: &str) -> PathBuf {
        self.cache.join(folder)
    }
}

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs to the end (killed, and the test failed, past RUN_LIMIT).
pub fn run(mut c: Command) -> Run {
    let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start ferrotune");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferrotune {:?} ran past {RUN_LIMIT:?}; stderr: {}", c.get_args().collect::<Vec<_>>(), t_err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

impl Run {
    /// The snapshot folder printed as the last stdout line (the run must
    /// have succeeded).
    pub fn snapshot(&self) -> PathBuf {
        assert!(self.status.success(), "ferrotune failed: {}", self.stderr);
        PathBuf::from(self.stdout.lines().last().unwrap_or_else(|| panic!("no stdout; stderr: {}", self.stderr)).trim())
    }

    /// The one `error: ` line of a failed run.
    pub fn error(&self) -> String {
        assert!(!self.status.success(), "ferrotune succeeded; stdout: {}", self.stdout);
        let lines: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(lines.len(), 1, "expected one error line: {}", self.stderr);
        lines[0].to_string()
    }
}

/// Asserts `line` holds each phrase, in this order.
pub fn assert_phrases(line: &str, phrases: &[&str]) {
    let mut rest = line;
    for p in phrases {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => panic!("{line:?} lacks {p:?} (after the phrases before it)"),
        }
    }
}

/// The files of a snapshot (links followed), repo-relative, sorted.
pub fn snapshot_files(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                assert!(p.is_file(), "{} is a dangling link", p.display());
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts the cache equals a committed huggingface_hub tree: first the
/// blobs/refs/snapshots layout, then every file (CACHEDIR.TAG, trees/).
pub fn assert_tree(cache: &Path, fixture: &str) {
    let got = dump_cache(cache);
    let want: Vec<Value> = load_fixture(fixture)["entries"].as_array().unwrap().clone();
    let diff = |a: &[Value], b: &[Value]| -> String {
        let only = |x: &[Value], y: &[Value]| x.iter().filter(|e| !y.contains(e)).map(|e| e.to_string()).collect::<Vec<_>>().join("\n  ");
        format!("only in ferrotune's cache:\n  {}\nonly in huggingface_hub's:\n  {}", only(a, b), only(b, a))
    };
    let (gc, wc) = (core_entries(&got), core_entries(&want));
    assert!(gc == wc, "{fixture}: the cache layout differs from huggingface_hub's\n{}", diff(&gc, &wc));
    assert!(got == want, "{fixture}: the cache differs from huggingface_hub's\n{}", diff(&got, &want));
}
