//! The shared cache both ways with the Python tools, on the shipped tiny
//! model served by the mock Hub: transformers (offline, local_files_only)
//! loads what `ferrotune download` fetched exactly as it loads the local
//! folder, and ferrotune (HF_HUB_OFFLINE=1) generates from what
//! huggingface_hub's snapshot_download fetched exactly as from the local
//! folder. Needs a Python with transformers, torch and huggingface_hub
//! (FERROTUNE_PYTHON); skipped, saying so, without one (as on CI, where
//! tests/hub.rs checks the same layout against committed fixtures).

mod common;
#[path = "common/hub_cli.rs"]
mod hub_cli;
#[path = "common/hub_tree.rs"]
mod hub_tree;
#[path = "common/mock_hub.rs"]
mod mock_hub;

use common::python_with;
use hub_cli::{Sandbox, run};
use mock_hub::{MockFile, MockHub, MockRepo};
use std::path::{Path, PathBuf};
use std::process::Command;

const REPO: &str = "ferrotune-test/quickstart";

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
    MockRepo::model(REPO, files)
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
    sb.download(&[REPO]).snapshot();
    let mut c = Command::new(&python);
    c.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub/hf_load.py")).arg(model_dir()).arg(REPO).arg(&sb.cache);
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
        .args([REPO, "model", "-"]);
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
    let mut c = sb.cmd(&args(REPO).iter().map(String::as_str).collect::<Vec<_>>());
    c.env("HF_HUB_OFFLINE", "1");
    let cached = run(c);
    assert!(cached.status.success(), "{}", cached.stderr);
    assert_eq!(cached.stdout, local.stdout);
    assert!(!cached.stdout.trim().is_empty());
    assert!(hub.requests().is_empty(), "ferrotune went to the Hub despite HF_HUB_OFFLINE: {:?}", hub.requests().len());
}
