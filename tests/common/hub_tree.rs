//! The repos the Hub tests serve, and Hub cache trees as JSON: `dump_cache`
//! lists a cache directory in the format tests/fixtures/hub/hf_snapshot.py
//! writes (the committed `hf_tree_*.json` fixtures, made by huggingface_hub),
//! and `materialise` builds a cache from such a fixture, so ferrotune can be
//! run on a cache huggingface_hub made.
//!
//! Include next to the mock: `#[path = "common/mock_hub.rs"] mod mock_hub;`
//! and `#[path = "common/hub_tree.rs"] mod hub_tree;` at the test's root.
#![allow(dead_code)]

use crate::mock_hub::{Access, MockFile, MockRepo, commit_sha, sha256_hex};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

pub const MODEL_ID: &str = "ferrotune-test/tiny-model";
pub const DATASET_ID: &str = "ferrotune-test/tiny-data";

/// Deterministic bytes that look nothing like text.
pub fn pseudo_bytes(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

fn config(layers: u32) -> String {
    format!("{{\n  \"model_type\": \"llama\",\n  \"num_hidden_layers\": {layers},\n  \"hidden_size\": 16\n}}\n")
}

/// The model repo of the tree fixtures. `main` holds regular files, an LFS
/// `model.safetensors`, a nested `sub/dir/file.json`, and files the default
/// model filter must skip; the tag `v1.0` is an older commit (another
/// config.json, fewer files); the PR ref `refs/pr/1` changes config.json
/// and keeps model.safetensors (the same blob as `main`).
pub fn model_repo() -> MockRepo {
    let weights = MockFile::lfs("model.safetensors", pseudo_bytes(1, 48 * 1024));
    let tokenizer = MockFile::regular("tokenizer.json", "{\"version\": \"1.0\", \"model\": {\"type\": \"WordLevel\", \"vocab\": {\"a\": 0, \"b\": 1}}}\n");
    let main = vec![
        MockFile::regular(".gitattributes", "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"),
        MockFile::regular("README.md", "---\nlicense: apache-2.0\n---\n# tiny model\n"),
        MockFile::regular("config.json", config(2)),
        MockFile::regular("generation_config.json", "{\"max_new_tokens\": 8}\n"),
        MockFile::regular("tokenizer_config.json", "{\"model_max_length\": 64}\n"),
        tokenizer.clone(),
        weights.clone(),
        MockFile::regular("sub/dir/file.json", "{\"nested\": true}\n"),
        MockFile::lfs("pytorch_model.bin", pseudo_bytes(2, 4096)),
        MockFile::lfs("model.gguf", pseudo_bytes(3, 4096)),
        MockFile::regular("original/params.json", "{\"dim\": 16}\n"),
    ];
    let old = vec![MockFile::regular("config.json", config(1)), tokenizer.clone(), MockFile::lfs("model.safetensors", pseudo_bytes(4, 8 * 1024))];
    let mut pr = main.clone();
    pr[2] = MockFile::regular("config.json", config(3));
    let (c_main, c_old, c_pr) = (commit_sha("tiny-model main"), commit_sha("tiny-model v1.0"), commit_sha("tiny-model pr1"));
    MockRepo {
        id: MODEL_ID.to_string(),
        dataset: false,
        access: Access::Public,
        refs: vec![("main".into(), c_main.clone()), ("v1.0".into(), c_old.clone()), ("refs/pr/1".into(), c_pr.clone())],
        commits: vec![(c_main, main), (c_old, old), (c_pr, pr)],
        renamed_from: None,
    }
}

/// The dataset repo of the tree fixtures.
pub fn dataset_repo() -> MockRepo {
    MockRepo::dataset(
        DATASET_ID,
        vec![
            MockFile::regular(".gitattributes", "*.parquet filter=lfs diff=lfs merge=lfs -text\n"),
            MockFile::regular("README.md", "---\nconfigs:\n- config_name: default\n  data_files: data/*.jsonl\n---\n"),
            MockFile::regular("data/train.jsonl", "{\"text\": \"a b\"}\n{\"text\": \"b a\"}\n"),
            MockFile::regular("data/test.jsonl", "{\"text\": \"a\"}\n"),
            MockFile::lfs("data/train-00000-of-00001.parquet", pseudo_bytes(5, 3000)),
        ],
    )
}

/// One committed tree fixture: what it downloaded, and how.
pub struct TreeCase {
    pub name: &'static str,
    pub repo_id: &'static str,
    pub dataset: bool,
    /// None: the default (`main`); `commit:<ref>`: that ref's full commit.
    pub revision: Option<&'static str>,
    pub allow: &'static [&'static str],
}

pub const TREE_CASES: &[TreeCase] = &[
    TreeCase { name: "main", repo_id: MODEL_ID, dataset: false, revision: None, allow: &["*.json", "*.safetensors"] },
    TreeCase { name: "pr1", repo_id: MODEL_ID, dataset: false, revision: Some("refs/pr/1"), allow: &["*.json", "*.safetensors"] },
    TreeCase { name: "commit", repo_id: MODEL_ID, dataset: false, revision: Some("commit:main"), allow: &["*.json", "*.safetensors"] },
    TreeCase { name: "dataset", repo_id: DATASET_ID, dataset: true, revision: None, allow: &[] },
];

impl TreeCase {
    /// The revision as given to the client (a `commit:` case as 40 hex).
    pub fn revision_arg(&self) -> Option<String> {
        let r = self.revision?;
        Some(match r.strip_prefix("commit:") {
            Some(name) => model_repo().commit_of(name).to_string(),
            None => r.to_string(),
        })
    }

    pub fn fixture_path(&self) -> PathBuf {
        fixture_dir().join(format!("hf_tree_{}.json", self.name))
    }
}

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub")
}

/// A committed tree fixture (see tests/fixtures/hub/README.md).
pub fn load_fixture(name: &str) -> Value {
    let p = fixture_dir().join(format!("hf_tree_{name}.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Every path under `cache` except `.locks/`, sorted: `{path, kind: dir}`,
/// `{path, kind: symlink, target}`, or `{path, kind: file, size, sha256}`
/// plus `content` (text) for files outside `blobs/`.
pub fn dump_cache(cache: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    walk(cache, cache, &mut out);
    out.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Value>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
        if rel == ".locks" {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).unwrap();
        if md.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap().to_string_lossy().into_owned();
            out.push(json!({ "path": rel, "kind": "symlink", "target": t }));
        } else if md.is_dir() {
            out.push(json!({ "path": rel, "kind": "dir" }));
            walk(root, &p, out);
        } else {
            let bytes = std::fs::read(&p).unwrap();
            let mut v = json!({ "path": rel, "kind": "file", "size": bytes.len(), "sha256": sha256_hex(&bytes) });
            if !rel.contains("/blobs/") {
                v["content"] = json!(String::from_utf8_lossy(&bytes));
            }
            out.push(v);
        }
    }
}

/// Entries without those huggingface_hub adds beyond the blobs/refs/
/// snapshots layout: `CACHEDIR.TAG`, `<repo>/trees/`, `<repo>/.no_exist/`.
pub fn core_entries(entries: &[Value]) -> Vec<Value> {
    entries
        .iter()
        .filter(|e| {
            let p = e["path"].as_str().unwrap();
            let mut parts = p.split('/');
            let (first, second) = (parts.next().unwrap_or(""), parts.next());
            first != "CACHEDIR.TAG" && !matches!(second, Some("trees") | Some(".no_exist"))
        })
        .cloned()
        .collect()
}

/// Builds the cache a fixture describes under `cache`: directories, blobs
/// (their bytes taken from `repos`, checked against the fixture's sha256),
/// the other files from their recorded content, and relative symlinks.
pub fn materialise(fixture: &Value, repos: &[MockRepo], cache: &Path) {
    let all: Vec<&MockFile> = repos.iter().flat_map(|r| r.commits.iter()).flat_map(|(_, fs)| fs.iter()).collect();
    for e in fixture["entries"].as_array().expect("fixture entries") {
        let p = cache.join(e["path"].as_str().unwrap());
        match e["kind"].as_str().unwrap() {
            "dir" => std::fs::create_dir_all(&p).unwrap(),
            "symlink" => {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(e["target"].as_str().unwrap(), &p).unwrap();
            }
            _ => {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                let bytes = match e.get("content") {
                    Some(c) => c.as_str().unwrap().as_bytes().to_vec(),
                    None => {
                        let name = p.file_name().unwrap().to_string_lossy();
                        all.iter().find(|f| f.etag() == name).unwrap_or_else(|| panic!("no repo file has blob {name}")).bytes.clone()
                    }
                };
                assert_eq!(sha256_hex(&bytes), e["sha256"].as_str().unwrap(), "{}", p.display());
                std::fs::write(&p, bytes).unwrap();
            }
        }
    }
}
