//! The mock Hub (tests/common/mock_hub.rs) checked against the real client:
//! huggingface_hub's `snapshot_download` fills a cache from it, and the cache
//! tree must equal the committed tests/fixtures/hub/hf_tree_*.json (the trees
//! ferrotune's downloads are compared with in tests/hub/); its error
//! classes must follow the mock's error answers; and it must resume a cut
//! body with a Range request. Needs a Python with huggingface_hub
//! (FERROTUNE_PYTHON); skipped, saying so, without one (as on CI).
//! FERROTUNE_REGEN_HUB_FIXTURES=1 rewrites the fixtures instead of comparing.
//!
//! And the shared cache both ways, on the shipped tiny model served by the
//! mock: transformers (offline, local_files_only) loads what `ferrotune
//! download` fetched exactly as it loads the local folder, and ferrotune
//! (HF_HUB_OFFLINE=1) generates from huggingface_hub's snapshot exactly as
//! from the local folder (needs transformers and torch too).

mod common;
#[path = "common/hub_cli.rs"]
mod hub_cli;
#[path = "common/hub_tree.rs"]
mod hub_tree;
#[path = "common/mock_hub.rs"]
mod mock_hub;

use common::python_with;
use hub_tree::{DATASET_ID, MODEL_ID, TREE_CASES, dataset_repo, dump_cache, model_repo};
use hub_cli::{Sandbox, run};
use mock_hub::{Access, Fault, Logged, MockFile, MockHub, MockRepo, sha256_hex};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub/hf_snapshot.py")
}

/// The script's command with a clean Hub environment: the mock as endpoint,
/// a private HF_HOME (no token of the developer's), no proxies.
fn hf_command(python: &Path, hub: &MockHub, home: &Path) -> Command {
    let mut c = Command::new(python);
    c.arg(script());
    for v in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET"] {
        c.env_remove(v);
    }
    for v in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        c.env_remove(v);
    }
    c.env("HF_ENDPOINT", hub.url())
        .env("HF_HOME", home)
        .env("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("NO_PROXY", "127.0.0.1,localhost");
    c
}

fn run_json(mut c: Command) -> Value {
    let o = c.output().expect("run python");
    assert!(o.status.success(), "hf_snapshot.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// "METHOD path status" of each request, sorted (downloads run in threads).
fn request_lines(log: &[Logged]) -> Vec<String> {
    let mut v: Vec<String> = log.iter().map(|r| format!("{} {} {}", r.method, r.target, r.status)).collect();
    v.sort();
    v
}

/// The header names each kind of request carried, with the value of Range
/// and of an `Accept-Encoding: identity` (other encodings lists depend on
/// the compression modules installed).
fn header_names(log: &[Logged]) -> Value {
    let mut kinds = std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    for r in log {
        let kind = if r.target.starts_with("/cdn/") {
            "GET cdn".to_string()
        } else if r.target.starts_with("/api/") {
            format!("{} api/{}", r.method, r.path().split('/').nth(5).unwrap_or(""))
        } else {
            format!("{} resolve", r.method)
        };
        let names = kinds.entry(kind).or_default();
        for (n, v) in &r.headers {
            names.insert(if n == "range" || (n == "accept-encoding" && v == "identity") { format!("{n}: {v}") } else { n.clone() });
        }
    }
    json!(kinds)
}

/// snapshot_download of each fixture case gives the committed tree, the
/// committed snapshot path and the committed requests.
#[test]
fn huggingface_hub_snapshots_match_the_committed_trees() {
    let Some(python) = python_with(&["huggingface_hub"]) else {
        eprintln!("skipped: no Python with huggingface_hub (set FERROTUNE_PYTHON)");
        return;
    };
    let regen = std::env::var_os("FERROTUNE_REGEN_HUB_FIXTURES").is_some_and(|v| v == "1");
    for case in TREE_CASES {
        let hub = MockHub::start(vec![model_repo(), dataset_repo()]);
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let mut c = hf_command(&python, &hub, &tmp.path().join("home"));
        let rev = case.revision_arg().unwrap_or_else(|| "-".to_string());
        c.arg("snapshot").arg(&cache).arg(case.repo_id).arg(if case.dataset { "dataset" } else { "model" }).arg(&rev);
        c.args(case.allow);
        let got = run_json(c);
        let requests = request_lines(&hub.requests());
        // What the fixture records, besides the tree: how it was made.
        let tree = json!({
            "huggingface_hub": got["huggingface_hub"],
            "repo_id": case.repo_id,
            "repo_type": if case.dataset { "dataset" } else { "model" },
            "revision": case.revision_arg(),
            "allow_patterns": case.allow,
            "snapshot": got["snapshot"],
            "requests": requests,
            "request_headers": header_names(&hub.requests()),
            "entries": got["entries"],
        });
        // The script's dump and the Rust one agree on the same cache.
        assert_eq!(Value::Array(dump_cache(&cache)), got["entries"], "{}: Rust and Python dumps differ", case.name);
        if regen {
            std::fs::write(case.fixture_path(), serde_json::to_string_pretty(&tree).unwrap() + "\n").unwrap();
            continue;
        }
        let want = hub_tree::load_fixture(case.name);
        assert_eq!(tree["huggingface_hub"], want["huggingface_hub"], "{}: another huggingface_hub version; regenerate (tests/fixtures/hub/README.md)", case.name);
        for key in ["snapshot", "requests", "request_headers", "entries"] {
            assert_eq!(tree[key], want[key], "{}: {key} differs from {}", case.name, case.fixture_path().display());
        }
    }
}

/// Every error the mock answers maps to huggingface_hub's matching error.
#[test]
fn huggingface_hub_raises_the_errors_the_mock_answers() {
    let Some(python) = python_with(&["huggingface_hub"]) else {
        eprintln!("skipped: no Python with huggingface_hub (set FERROTUNE_PYTHON)");
        return;
    };
    let gated = MockRepo { access: Access::Gated { granted: vec!["hf_granted".into()] }, ..MockRepo::model("org/gated", model_repo().files_at("main").to_vec()) };
    let private = MockRepo { access: Access::Private { token: "hf_owner".into() }, ..MockRepo::model("org/private", model_repo().files_at("v1.0").to_vec()) };
    let moved = MockRepo { renamed_from: Some("org/old-name".into()), ..MockRepo::model("org/new-name", model_repo().files_at("v1.0").to_vec()) };
    let hub = MockHub::start(vec![model_repo(), dataset_repo(), gated, private, moved]);
    let tmp = tempfile::tempdir().unwrap();
    let cache = |i: usize| tmp.path().join(format!("cache{i}")).to_string_lossy().into_owned();
    // (call, repo, type, revision, file, token, the class expected)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, Option<&'a str>, &'a str);
    let cases: &[Case] = &[
        ("snapshot", "org/gated", "model", "main", "", None, "GatedRepoError"),
        ("file", "org/gated", "model", "main", "config.json", Some("hf_other"), "GatedRepoError"),
        ("file", "org/gated", "model", "main", "model.safetensors", Some("hf_granted"), "ok"),
        ("snapshot", "org/private", "model", "main", "", None, "RepositoryNotFoundError"),
        ("snapshot", "org/private", "model", "main", "", Some("hf_owner"), "ok"),
        ("snapshot", "org/missing", "model", "main", "", Some("hf_owner"), "RepositoryNotFoundError"),
        ("snapshot", "org/missing", "model", "main", "", None, "RepositoryNotFoundError"),
        ("snapshot", MODEL_ID, "model", "no-such-branch", "", None, "RevisionNotFoundError"),
        ("file", MODEL_ID, "model", "v1.0", "no/such/file.json", None, "EntryNotFoundError"),
        ("file", DATASET_ID, "dataset", "main", "data/train.jsonl", None, "ok"),
        ("snapshot", "org/old-name", "model", "main", "", None, "ok"),
    ];
    let spec: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(i, (call, repo, kind, rev, file, token, _))| {
            let mut v = json!({ "call": call, "cache": cache(i), "repo_id": repo, "repo_type": kind, "revision": rev });
            if !file.is_empty() {
                v["filename"] = json!(file);
            }
            if let Some(t) = token {
                v["token"] = json!(t);
            }
            v
        })
        .collect();
    let mut c = hf_command(&python, &hub, &tmp.path().join("home"));
    c.arg("errors").arg(serde_json::to_string(&spec).unwrap());
    let got = run_json(c);
    for (i, case) in cases.iter().enumerate() {
        let classes: Vec<&str> = got[i].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(classes.contains(&case.6), "case {i} {case:?}: raised {classes:?}");
    }
    // The statuses the Hub uses: 401 without a token, 403/404 with one; the
    // granted download of an LFS file went to the CDN without the token.
    let log = hub.requests();
    let statuses = |path: &str, token: bool| -> Vec<u16> { log.iter().filter(|r| r.path().contains(path) && r.header("authorization").is_some() == token).map(|r| r.status).collect() };
    assert!(statuses("/org/gated/resolve/", false).contains(&401), "{log:?}");
    let with_token = statuses("/org/gated/resolve/", true);
    assert!(with_token.contains(&403) && with_token.contains(&302), "{with_token:?}");
    assert!(statuses("/api/models/org/private/", false).contains(&401));
    assert!(statuses("/api/models/org/missing/", true).contains(&404));
    assert!(statuses("/api/models/org/missing/", false).contains(&401));
    // The renamed repo: 307 with a relative Location, followed on the HEAD.
    let heads_old = log.iter().filter(|r| r.method == "HEAD" && r.target.starts_with("/org/old-name/resolve/"));
    assert!(heads_old.clone().count() == 3 && heads_old.clone().all(|r| r.status == 307), "{log:?}");
    assert!(log.iter().any(|r| r.method == "HEAD" && r.target.starts_with("/org/new-name/resolve/") && r.status == 302));
    let cdn: Vec<&Logged> = log.iter().filter(|r| r.target.starts_with("/cdn/")).collect();
    assert!(!cdn.is_empty() && cdn.iter().all(|r| r.header("authorization").is_none()), "{cdn:?}");
}

/// huggingface_hub survives a body cut after 1000 bytes (2.4 reads 10 MiB
/// chunks, so it retries from 0 without a Range); its `http_get` resuming at
/// 1000 gets a 206 with the rest, and the whole file when the server ignores
/// the Range. The CDN is asked under the other host name the redirect gave.
#[test]
fn huggingface_hub_resumes_cut_bodies_and_ranges() {
    let Some(python) = python_with(&["huggingface_hub"]) else {
        eprintln!("skipped: no Python with huggingface_hub (set FERROTUNE_PYTHON)");
        return;
    };
    let hub = MockHub::start(vec![model_repo()]);
    hub.fault("model.safetensors", Fault::CutAfter { bytes: 1000, times: 1 });
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let home = tmp.path().join("home");
    let mut c = hf_command(&python, &hub, &home);
    c.arg("snapshot").arg(&cache).arg(MODEL_ID).arg("model").arg("-").arg("model.safetensors");
    run_json(c);
    let weights = model_repo().file("main", "model.safetensors").clone();
    let blob = cache.join(format!("models--ferrotune-test--tiny-model/blobs/{}", weights.etag()));
    assert_eq!(sha256_hex(&std::fs::read(&blob).unwrap()), weights.etag());
    let cdn: Vec<Logged> = hub.requests().into_iter().filter(|r| r.target.starts_with("/cdn/")).collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert!(cdn.iter().all(|r| r.header("host").is_some_and(|h| h.starts_with("localhost:"))), "{cdn:?}");

    let url = format!("http://localhost:{}/cdn/{}", hub.port(), weights.etag());
    let range_get = |k: usize| {
        let mut c = hf_command(&python, &hub, &home);
        c.arg("range").arg(&url).arg(k.to_string());
        run_json(c)
    };
    hub.clear_requests();
    let got = range_get(1000);
    assert_eq!(got, json!({ "size": weights.bytes.len() - 1000, "sha256": sha256_hex(&weights.bytes[1000..]) }));
    let log = hub.requests();
    assert_eq!((log.len(), log[0].header("range"), log[0].status), (1, Some("bytes=1000-"), 206), "{log:?}");
    hub.fault("model.safetensors", Fault::IgnoreRange);
    hub.clear_requests();
    let got = range_get(1000);
    assert_eq!(got, json!({ "size": weights.bytes.len(), "sha256": weights.etag() }));
    let log = hub.requests();
    assert_eq!((log.len(), log[0].header("range"), log[0].status), (1, Some("bytes=1000-"), 200), "{log:?}");
}

const QUICKSTART: &str = "ferrotune-test/quickstart";

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/model")
}

/// The quickstart model as a Hub repo: weights in LFS, the rest in git.
fn quickstart_repo() -> MockRepo {
    let mut files = Vec::new();
    for e in std::fs::read_dir(model_dir()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let bytes = std::fs::read(&p).unwrap();
        files.push(if name.ends_with(".safetensors") { MockFile::lfs(&name, bytes) } else { MockFile::regular(&name, bytes) });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    MockRepo::model(QUICKSTART, files)
}

fn python_env(c: &mut Command, hub: &MockHub, home: &Path) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("HF_") || k.starts_with("HUGGING") || k == "TRANSFORMERS_OFFLINE" || k.to_ascii_lowercase().ends_with("_proxy") {
            c.env_remove(&k);
        }
    }
    c.env("HF_ENDPOINT", hub.url()).env("HF_HOME", home).env("HF_HUB_DISABLE_PROGRESS_BARS", "1").env("NO_PROXY", "127.0.0.1,localhost");
}

#[test]
fn transformers_loads_offline_what_ferrotune_downloaded() {
    let Some(python) = python_with(&["transformers", "torch", "huggingface_hub"]) else {
        eprintln!("skipped: no Python with transformers, torch and huggingface_hub (set FERROTUNE_PYTHON)");
        return;
    };
    let hub = MockHub::start(vec![quickstart_repo()]);
    let sb = Sandbox::new(&hub.url());
    sb.download(&[QUICKSTART]).snapshot();
    let mut c = Command::new(&python);
    c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub/hf_load.py")).arg(model_dir()).arg(QUICKSTART).arg(&sb.cache);
    python_env(&mut c, &hub, &sb.hf_home);
    let requests_before = hub.requests().len();
    let o = c.output().unwrap();
    assert!(o.status.success(), "hf_load.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(hub.requests().len(), requests_before, "transformers went to the Hub despite HF_HUB_OFFLINE");
    assert_eq!(v["config_equal"], true, "{v}");
    assert_eq!(v["ids_equal"], true, "{v}");
    // Same bytes, same library, same machine: the logits are bit-identical.
    assert_eq!(v["max_abs_logit_diff"].as_f64(), Some(0.0), "{v}");
}

#[test]
fn ferrotune_generates_offline_from_what_huggingface_hub_downloaded() {
    let Some(python) = python_with(&["huggingface_hub"]) else {
        eprintln!("skipped: no Python with huggingface_hub (set FERROTUNE_PYTHON)");
        return;
    };
    let hub = MockHub::start(vec![quickstart_repo()]);
    let sb = Sandbox::new(&hub.url());
    let mut c = Command::new(&python);
    c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub/hf_snapshot.py"))
        .args(["snapshot"])
        .arg(&sb.cache)
        .args([QUICKSTART, "model", "-"]);
    python_env(&mut c, &hub, &sb.hf_home);
    let o = c.output().unwrap();
    assert!(o.status.success(), "hf_snapshot.py failed:\n{}", String::from_utf8_lossy(&o.stderr));
    hub.clear_requests();

    let args = |model: &str| -> Vec<String> {
        ["generate", "--model", model, "--prompt", "The capital of Norway is", "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let local = run(sb.cmd(&args(model_dir().to_str().unwrap()).iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(local.status.success(), "{}", local.stderr);
    let mut c = sb.cmd(&args(QUICKSTART).iter().map(String::as_str).collect::<Vec<_>>());
    c.env("HF_HUB_OFFLINE", "1");
    let cached = run(c);
    assert!(cached.status.success(), "{}", cached.stderr);
    assert_eq!(cached.stdout, local.stdout);
    assert!(!cached.stdout.trim().is_empty());
    assert!(hub.requests().is_empty(), "ferrotune went to the Hub despite HF_HUB_OFFLINE: {:?}", hub.requests().len());
}
