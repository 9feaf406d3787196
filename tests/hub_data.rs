//! Hub dataset files against the Python reference (tests/fixtures/hub_data.py):
//! parquet rows equal their JSON Lines twin's (Snappy and Zstandard files),
//! CSV/TSV rows are typed as the datasets library reads them, the split rules
//! resolve each small repo tree to the files the datasets library resolves,
//! and a parquet chat dataset tokenizes to the same sequences as its JSON
//! Lines twin. Also the dataset config keys for Hub datasets.

use ferrotune::config::{self, DatasetConfig, RunConfig};
use ferrotune::data::hub_splits;
use ferrotune::data::prepare;
use ferrotune::data::rows;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The fixture model's vocabulary (above every tokenizer id in the fixtures).
const VOCAB: usize = 131;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn hub_data(name: &str) -> PathBuf {
    fixtures().join("hub_data").join(name)
}

fn values(path: &Path) -> Vec<Value> {
    rows::read(path, None).unwrap().into_iter().map(|(_, v)| v).collect()
}

#[test]
fn parquet_rows_equal_the_json_lines_rows() {
    let want = values(&hub_data("chat.jsonl"));
    assert_eq!(want.len(), 3);
    for file in ["chat.parquet", "chat_zstd.parquet"] {
        let got = rows::read(&hub_data(file), None).unwrap();
        let locs: Vec<String> = got.iter().map(|(l, _)| l.rsplit('/').next().unwrap().to_string()).collect();
        assert_eq!(locs, [1, 2, 3].map(|i| format!("{file}:row {i}")));
        let got: Vec<Value> = got.into_iter().map(|(_, v)| v).collect();
        assert_eq!(got, want, "{file}");
    }
    // The chat column is a list of {role, content} objects, as in the JSON.
    assert_eq!(want[1]["messages"][0]["content"], "Réponds en français.");
}

#[test]
fn csv_and_tsv_columns_are_typed_as_the_datasets_library_types_them() {
    let want = values(&hub_data("rows.expected.jsonl"));
    assert_eq!(values(&hub_data("rows.csv")), want);
    assert_eq!(values(&hub_data("rows.tsv")), want);
}

#[test]
fn unreadable_parquet_is_one_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.parquet");
    std::fs::write(&bad, b"PAR1 not really").unwrap();
    let e = rows::read(&bad, None).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: not a readable parquet file", bad.display())), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

/// The strings of a JSON list.
fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn split_rules_resolve_the_files_the_datasets_library_resolves() {
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(hub_data("splits.json")).unwrap()).unwrap();
    assert!(cases.len() >= 15);
    for case in &cases {
        let id = case["id"].as_str().unwrap();
        let files = strings(&case["files"]);
        let readme = case["readme"].as_str();
        let name = case["name"].as_str();
        let data_files: Option<Vec<String>> = match &case["data_files"] {
            Value::Null => None,
            Value::String(s) => Some(vec![s.clone()]),
            v => Some(strings(v)),
        };
        let got = hub_splits::splits("org/ds", &files, readme, name, data_files.as_deref());
        let Some(want) = case.get("splits") else {
            // The datasets library refuses the tree: so does ferrotune.
            assert!(got.is_err(), "{id}: the reference fails ({}), ferrotune gives {got:?}", case["error"]);
            continue;
        };
        if id == "only_text" {
            // Text files are a format ferrotune does not read.
            assert!(got.unwrap_err().to_string().contains(".txt files, which ferrotune does not read"));
            continue;
        }
        let want: Vec<(String, Vec<String>)> =
            want.as_array().unwrap().iter().map(|p| (p[0].as_str().unwrap().to_string(), strings(&p[1]))).collect();
        let names: Vec<String> = want.iter().map(|(s, _)| s.clone()).collect();
        assert_eq!(got.unwrap(), names, "{id}");
        for (split, want_files) in &want {
            let got = hub_splits::select_files("org/ds", &files, readme, name, split, data_files.as_deref()).unwrap();
            assert_eq!(&got, want_files, "{id}: split {split}");
        }
    }
}

/// A run over one dataset file (no cache), chat_template with ChatML.
fn chat_run(path: &Path) -> RunConfig {
    RunConfig {
        datasets: vec![DatasetConfig {
            path: path.display().to_string(),
            kind: Some("chat_template".into()),
            ..Default::default()
        }],
        chat_template: Some("chatml".into()),
        shuffle_merged_datasets: false,
        ..Default::default()
    }
}

#[test]
fn a_parquet_chat_dataset_tokenizes_as_its_json_lines_twin() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixtures().join("chat_templates/tokenizer");
    let mut cfg = chat_run(&hub_data("chat.jsonl"));
    cfg.dataset_prepared_path = Some(dir.path().display().to_string());
    let want = prepare::prepare(&cfg, &tok, VOCAB).unwrap();
    assert_eq!((want.report[0].rows, want.train.len()), (3, 3));
    assert!(want.train.iter().all(|s| s.trained_tokens() > 0));
    for file in ["chat.parquet", "chat_zstd.parquet"] {
        let mut cfg = chat_run(&hub_data(file));
        cfg.dataset_prepared_path = Some(dir.path().display().to_string());
        let got = prepare::prepare(&cfg, &tok, VOCAB).unwrap();
        assert_eq!(got.train, want.train, "{file}");
        assert!(!got.report[0].from_cache, "{file}: a parquet file has a cache entry of its own");
    }
    // A directory of parquet files is read too.
    let folder = tempfile::tempdir().unwrap();
    std::fs::copy(hub_data("chat.parquet"), folder.path().join("part-0.parquet")).unwrap();
    let got = prepare::prepare(&chat_run(folder.path()), &tok, VOCAB).unwrap();
    assert_eq!(got.train, want.train);
}

#[test]
fn dataset_entries_take_hub_keys_and_data_files_as_a_string_or_a_list() {
    let text = |extra: &str| {
        format!(
            "base_model: ./model\nadapter: lora\nrevision_of_model: v1.0\nlearning_rate: 1e-4\ndatasets:\n  - path: org/chat\n    type: chat_template\n{extra}"
        )
    };
    let load = |t: &str| config::load_str(t, "run.yml", &[]);
    let one = load(&text("    name: sft\n    revision: refs/pr/1\n    data_files: data/train.jsonl\n    split: test\n")).unwrap();
    assert!(one.warnings.is_empty(), "{:?}", one.warnings);
    assert_eq!(one.config.revision_of_model.as_deref(), Some("v1.0"));
    let ds = &one.config.datasets[0];
    assert_eq!((ds.name.as_deref(), ds.revision.as_deref()), (Some("sft"), Some("refs/pr/1")));
    assert_eq!(ds.data_files.as_deref(), Some(&["data/train.jsonl".to_string()][..]));
    assert_eq!(ds.split.as_deref(), Some("test"));
    let many = load(&text("    data_files: [a.parquet, b.parquet]\n")).unwrap();
    assert_eq!(many.config.datasets[0].data_files.as_deref(), Some(&["a.parquet".to_string(), "b.parquet".to_string()][..]));
    // The resolved config (data_files written as a list) loads back the same.
    let again = load(&one.config.to_yaml()).unwrap();
    assert_eq!(again.config.datasets, one.config.datasets);
    let e = format!("{:#}", load(&text("    data_files: 3\n")).unwrap_err());
    assert!(e.contains("datasets[0].data_files must be a file name or a list of file names, not the number 3"), "{e}");
}

#[test]
fn preprocess_shows_a_parquet_chat_dataset_as_its_json_lines_twin() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let show = |data: &Path| {
        let cfg = tmp.path().join("run.yml");
        let text = format!(
            "base_model: {}\nadapter: lora\nlearning_rate: 0.001\nsequence_len: 512\nchat_template: chatml\n\
             shuffle_merged_datasets: false\ndataset_prepared_path: {}\ndatasets:\n  - path: {}\n    type: chat_template\n",
            repo.join("examples/quickstart/model").display(),
            tmp.path().join("cache").display(),
            data.display()
        );
        std::fs::write(&cfg, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .env("NO_COLOR", "1")
            .args(["preprocess", cfg.to_str().unwrap(), "--show", "3", "--ids"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().replace(&data.display().to_string(), "DATA")
    };
    let want = show(&hub_data("chat.jsonl"));
    assert!(want.contains("DATA [chat_template, train]: 3 rows -> 3 sequences"), "{want}");
    assert!(want.contains("--- train example 3 of 3 ---"), "{want}");
    assert_eq!(show(&hub_data("chat.parquet")), want);
}
