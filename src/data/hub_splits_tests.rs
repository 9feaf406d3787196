//! The datasets library's split rules, case by case, on file lists shaped
//! like real Hub dataset repos.

use super::*;
use crate::data::hub_glob::{Glob, infer_module, resolve};

fn list(files: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = files.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// (split, files) of every split, as `select_files` gives them.
fn resolved(files: &[&str], readme: Option<&str>, name: Option<&str>) -> Vec<(String, Vec<String>)> {
    let files = list(files);
    splits("org/ds", &files, readme, name, None)
        .unwrap()
        .into_iter()
        .map(|s| {
            let f = select_files("org/ds", &files, readme, name, &s, None).unwrap();
            (s, f)
        })
        .collect()
}

fn expect(got: Vec<(String, Vec<String>)>, want: &[(&str, &[&str])]) {
    let want: Vec<(String, Vec<String>)> =
        want.iter().map(|(s, f)| (s.to_string(), f.iter().map(|x| x.to_string()).collect())).collect();
    assert_eq!(got, want);
}

fn err(files: &[&str], readme: Option<&str>, name: Option<&str>, split: &str, data_files: Option<&[String]>) -> String {
    select_files("org/ds", &list(files), readme, name, split, data_files).unwrap_err().to_string()
}

#[test]
fn globs_follow_fsspec() {
    // (pattern, path, matches)
    let cases = [
        ("*.jsonl", "a.jsonl", true),
        ("*.jsonl", "d/a.jsonl", false),
        ("**/*.jsonl", "a.jsonl", true),
        ("**/*.jsonl", "d/e/a.jsonl", true),
        ("**", "d/e/a.jsonl", true),
        ("data/**", "data/x/y.csv", true),
        ("data/**", "other/y.csv", false),
        ("**/train/**", "data/train/x.parquet", true),
        ("**/train/**", "train/x.parquet", true),
        ("**/train/**", "training/x.parquet", false),
        ("d/*", "d/a/b", false),
        ("d/**.csv", "d/a.csv", true),
        ("d/**.csv", "d/a/b.csv", false),
        ("**/train[-._ 0-9]*", "train.jsonl", true),
        ("**/train[-._ 0-9]*", "data/train-00.csv", true),
        ("**/train[-._ 0-9]*", "trainset.json", false),
        ("**/*[-._ 0-9]train[-._ 0-9]*", "my_train-00.csv", true),
        ("f?.csv", "f1.csv", true),
        ("f?.csv", "f/.csv", false),
        ("[!a]*.csv", "b.csv", true),
        ("[!a]*.csv", "a.csv", false),
        ("a[.csv", "a[.csv", true),
        ("x[]]y", "x]y", true),
    ];
    for (pat, path, want) in cases {
        assert_eq!(Glob::new(pat).unwrap().matches(path), want, "{pat} vs {path}");
    }
}

#[test]
fn resolve_leaves_out_hidden_special_and_metadata_files() {
    let files = list(&[
        ".gitattributes",
        "README.md",
        "config.json",
        "dataset_infos.json",
        ".hidden/a.jsonl",
        "__pycache__/b.jsonl",
        "a.jsonl",
        "notes.py",
    ]);
    assert_eq!(resolve("**", &files, false).unwrap(), ["a.jsonl", "notes.py"]);
    assert_eq!(resolve("**", &files, true).unwrap(), ["a.jsonl"]);
    // Named explicitly, they are found.
    assert_eq!(resolve(".hidden/*", &files, true).unwrap(), [".hidden/a.jsonl"]);
    assert_eq!(resolve("__pycache__/*", &files, true).unwrap(), ["__pycache__/b.jsonl"]);
    assert_eq!(resolve("config.json", &files, true).unwrap(), ["config.json"]);
    assert_eq!(resolve("missing.jsonl", &files, true).unwrap_err().to_string(), "no file \"missing.jsonl\"");
    assert!(resolve("*.csv", &files, true).unwrap().is_empty());
}

#[test]
fn the_most_common_extension_picks_the_reader() {
    let m = |f: &[&str]| infer_module(&list(f));
    assert_eq!(m(&["a.jsonl", "b.jsonl", "c.parquet"]), Some("json"));
    // Ties: parquet, then jsonl before json before csv.
    assert_eq!(m(&["a.csv", "b.parquet"]), Some("parquet"));
    assert_eq!(m(&["a.csv", "b.json"]), Some("json"));
    // Other ties: the extension that sorts last.
    assert_eq!(m(&["a.tsv", "b.txt"]), Some("text"));
    assert_eq!(m(&["a.tsv", "b.tsv", "c.txt"]), Some("tsv"));
    assert_eq!(m(&["a.txt", "b.txt", "c.csv"]), Some("text"));
    // Folder metadata files count last.
    assert_eq!(m(&["metadata.jsonl", "a.png"]), Some("imagefolder"));
    assert_eq!(m(&["metadata.jsonl", "metadata.jsonl.x", "a.png"]), Some("json"));
    assert_eq!(m(&["a.zip"]), Some("zip"));
    assert_eq!(m(&["LICENSE"]), None);
}

#[test]
fn default_conventions_in_the_datasets_order() {
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a [&'a str])]);
    let cases: &[Case] = &[
        (
            "sharded parquet (trl-lib/tldr)",
            &["README.md", ".gitattributes", "data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"],
            &[
                ("train", &["data/train-00000-of-00001.parquet"]),
                ("validation", &["data/validation-00000-of-00001.parquet"]),
                ("test", &["data/test-00000-of-00001.parquet"]),
            ],
        ),
        (
            "shards of several files, other split names sorted after the usual ones",
            &["data/test-00000-of-00001.parquet", "data/train-00001-of-00002.parquet", "data/train-00000-of-00002.parquet", "data/zeta-00000-of-00001.parquet", "data/alpha-00000-of-00001.parquet"],
            &[
                ("train", &["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]),
                ("test", &["data/test-00000-of-00001.parquet"]),
                ("alpha", &["data/alpha-00000-of-00001.parquet"]),
                ("zeta", &["data/zeta-00000-of-00001.parquet"]),
            ],
        ),
        (
            "root files named for splits",
            &["README.md", "train.jsonl", "test.jsonl"],
            &[("train", &["train.jsonl"]), ("test", &["test.jsonl"])],
        ),
        (
            "split keywords in file names, bounded by separators or digits",
            &["data/my_train-00.csv", "data/my_train-01.csv", "data/valid.csv", "data/eval2.csv", "trainset.csv"],
            &[
                ("train", &["data/my_train-00.csv", "data/my_train-01.csv"]),
                ("validation", &["data/valid.csv"]),
                ("test", &["data/eval2.csv"]),
            ],
        ),
        (
            "directories named for splits win over file names",
            &["train/a.jsonl", "train/b.jsonl", "dev/a.jsonl", "test.jsonl"],
            &[("train", &["train/a.jsonl", "train/b.jsonl"]), ("validation", &["dev/a.jsonl"])],
        ),
        (
            "nested and suffixed split directories",
            &["data/training-v2/x.parquet", "data/old_test/y.parquet"],
            &[("train", &["data/training-v2/x.parquet"]), ("test", &["data/old_test/y.parquet"])],
        ),
        (
            "no split names: everything is train, sorted",
            &["README.md", "b/part.jsonl", "a.jsonl", "LICENSE"],
            &[("train", &["a.jsonl", "b/part.jsonl"])],
        ),
        (
            "the most common format wins and the others are left out",
            &["train.parquet", "test.parquet", "extra_train.json"],
            &[("train", &["train.parquet"]), ("test", &["test.parquet"])],
        ),
        (
            "tsv is read by the csv reader",
            &["train.tsv", "test.tsv", "notes.csv"],
            &[("train", &["train.tsv"]), ("test", &["test.tsv"])],
        ),
        (
            "a file two patterns select is read twice, as the datasets library does",
            &["train_train.jsonl"],
            &[("train", &["train_train.jsonl", "train_train.jsonl"])],
        ),
    ];
    for (what, files, want) in cases {
        let got = resolved(files, None, None);
        let want: Vec<(String, Vec<String>)> =
            want.iter().map(|(s, f)| (s.to_string(), f.iter().map(|x| x.to_string()).collect())).collect();
        assert_eq!(got, want, "{what}");
    }
}

const TWO_CONFIGS: &str = "---\nlicense: mit\nconfigs:\n- config_name: chat\n  data_files:\n  - split: train\n    path: chat/train-*.parquet\n  - split: test\n    path: [chat/test.parquet]\n- config_name: plain\n  data_dir: plain\n  default: true\n---\n# Card\n";

#[test]
fn readme_configs_pick_the_files() {
    let files = ["README.md", "chat/train-0.parquet", "chat/train-1.parquet", "chat/test.parquet", "plain/train.jsonl", "plain/validation.jsonl"];
    expect(
        resolved(&files, Some(TWO_CONFIGS), Some("chat")),
        &[("train", &["chat/train-0.parquet", "chat/train-1.parquet"]), ("test", &["chat/test.parquet"])],
    );
    // No name: the config marked default (its data_dir searched by the conventions).
    let want: &[(&str, &[&str])] = &[("train", &["plain/train.jsonl"]), ("validation", &["plain/validation.jsonl"])];
    expect(resolved(&files, Some(TWO_CONFIGS), None), want);
    expect(resolved(&files, Some(TWO_CONFIGS), Some("plain")), want);
    let e = err(&files, Some(TWO_CONFIGS), Some("nope"), "train", None);
    assert_eq!(e, "dataset org/ds has no config \"nope\" (it has: chat, plain); set name: to one of them");
    let e = err(&files, Some(TWO_CONFIGS), Some("chat"), "validation", None);
    assert_eq!(e, "dataset org/ds (config \"chat\") has no split \"validation\" (it has: train, test); set split:");
}

#[test]
fn the_default_config_rules() {
    let card = |body: &str| format!("---\nconfigs:\n{body}---\n");
    let files = ["a/x.jsonl", "b/y.jsonl"];
    // One config: it is the default.
    let one = card("- config_name: only\n  data_files: a/*.jsonl\n");
    expect(resolved(&files, Some(&one), None), &[("train", &["a/x.jsonl"])]);
    // A config named "default" is the default.
    let named = card("- config_name: other\n  data_files: a/*.jsonl\n- config_name: default\n  data_files: [b/*.jsonl]\n");
    expect(resolved(&files, Some(&named), None), &[("train", &["b/y.jsonl"])]);
    // Several and no default: name: is needed.
    let none = card("- config_name: p\n  data_files: a/*.jsonl\n- config_name: q\n  data_files: b/*.jsonl\n");
    assert_eq!(
        err(&files, Some(&none), None, "train", None),
        "dataset org/ds has several configs (p, q) and no default; set name: to one of them"
    );
    let two = card("- config_name: p\n  default: true\n  data_files: a/*.jsonl\n- config_name: default\n  data_files: b/*.jsonl\n");
    assert!(err(&files, Some(&two), None, "train", None).contains("two default configs, \"p\" and \"default\""));
    // Without configs only the name "default" exists.
    assert_eq!(resolved(&files, None, Some("default")).len(), 1);
    assert!(err(&files, None, Some("x"), "train", None).contains("has no config \"x\""));
    // Explicit data_files need no config.
    let df = vec!["b/*.jsonl".to_string()];
    assert_eq!(select_files("org/ds", &list(&files), Some(&none), None, "train", Some(&df)).unwrap(), ["b/y.jsonl"]);
}

#[test]
fn readme_without_configs_or_front_matter_uses_the_conventions() {
    let files = ["README.md", "train.jsonl"];
    for readme in ["# Title\nno yaml\n", "---\nlicense: mit\ntags: [a, b]\n---\ntext", "---\r\nconfigs:\r\n---\r\n"] {
        expect(resolved(&files, Some(readme), None), &[("train", &["train.jsonl"])]);
    }
    let bad = "---\nconfigs: [\n---\n";
    assert!(err(&files, Some(bad), None, "train", None).starts_with("dataset org/ds: README.md: malformed YAML"));
    let no_name = "---\nconfigs:\n- data_files: a.jsonl\n---\n";
    assert_eq!(err(&files, Some(no_name), None, "train", None), "dataset org/ds: README.md: configs[0]: every config needs a config_name");
    let dup = "---\nconfigs:\n- config_name: c\n  data_files:\n  - {split: train, path: a}\n  - {split: train, path: b}\n---\n";
    assert!(err(&files, Some(dup), None, "train", None).contains("split \"train\" is listed twice"));
}

#[test]
fn explicit_data_files_are_the_train_split() {
    let files = list(&["data/a.jsonl", "data/b.jsonl", "data/c.csv", "other.jsonl"]);
    let df = vec!["data/*.jsonl".to_string(), "other.jsonl".to_string()];
    let got = select_files("org/ds", &files, None, None, "train", Some(&df)).unwrap();
    assert_eq!(got, ["data/a.jsonl", "data/b.jsonl", "other.jsonl"]);
    assert_eq!(splits("org/ds", &files, None, None, Some(&df)).unwrap(), ["train"]);
    let e = select_files("org/ds", &files, None, None, "test", Some(&df)).unwrap_err().to_string();
    assert_eq!(e, "dataset org/ds has no split \"test\" (it has: train); set split:");
    let missing = vec!["nope.jsonl".to_string()];
    let e = select_files("org/ds", &files, None, None, "train", Some(&missing)).unwrap_err().to_string();
    assert_eq!(e, "dataset org/ds: data_files of split \"train\": no file \"nope.jsonl\"");
}

#[test]
fn unknown_splits_and_unread_formats_are_one_line_errors() {
    let files = ["data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"];
    assert_eq!(
        err(&files, None, None, "validation", None),
        "dataset org/ds has no split \"validation\" (it has: train, test); set split:"
    );
    let text = ["train.txt", "test.txt"];
    assert_eq!(
        err(&text, None, None, "train", None),
        "dataset org/ds: its data files are .txt files, which ferrotune does not read (it reads .parquet, .jsonl, .json, .csv, .tsv)"
    );
    let nd = ["train.ndjson"];
    assert_eq!(
        err(&nd, None, None, "train", None),
        "dataset org/ds: train.ndjson: files ending in .ndjson are not read (ferrotune reads .parquet, .jsonl, .json, .csv, .tsv)"
    );
    assert_eq!(err(&["README.md", "LICENSE"], None, None, "train", None), "dataset org/ds: no data files found (ferrotune reads .parquet, .jsonl, .json, .csv, .tsv)");
    assert_eq!(
        err(&["train.tsv", "test.csv"], None, None, "train", None),
        "dataset org/ds: its splits hold files of different formats (train: tsv, test: csv); set data_files:"
    );
    let bad_shard = ["data/a b-00000-of-00001.parquet"];
    assert!(err(&bad_shard, None, None, "train", None).contains("shard split name \"a b\""));
}
