//! Parity with gguf-py's Metadata: tests/fixtures/gguf/metadata/expected.json
//! holds, for each folder case, the keys the converter's own code wrote
//! (tests/fixtures/gguf_metadata.py); the same folders are made here.

use std::path::Path;

use serde_json::Value as J;

use super::card::front_matter;
use super::name::{id_parts, id_to_title};
use super::*;

fn expected() -> Vec<J> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/metadata/expected.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str::<J>(&text).unwrap().as_array().unwrap().clone()
}

/// The expected value as ours: f32 values were stored as the f32's exact value.
fn value_of(ty: &str, v: &J) -> Value {
    match ty {
        "str" => Value::Str(v.as_str().unwrap().to_string()),
        "u32" => Value::U32(v.as_u64().unwrap() as u32),
        "i32" => Value::I32(v.as_i64().unwrap() as i32),
        "f32" => Value::F32(v.as_f64().unwrap() as f32),
        "arr_str" => Value::ArrStr(v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()),
        other => panic!("unknown type {other}"),
    }
}

#[test]
fn folders_match_the_converter() {
    let cases = expected();
    assert!(cases.len() >= 12);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(case["dir"].as_str().unwrap());
        std::fs::create_dir(&dir).unwrap();
        for (rel, text) in case["files"].as_object().unwrap() {
            std::fs::write(dir.join(rel), text.as_str().unwrap()).unwrap();
        }
        let shapes: Vec<(String, Vec<u64>)> = case["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t[0].as_str().unwrap().to_string(), t[1].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect()))
            .collect();
        let tensors: Vec<(&str, &[u64])> = shapes.iter().map(|(n, ne)| (n.as_str(), ne.as_slice())).collect();
        let got = general(&dir, &tensors, case["lora"].as_bool().unwrap());
        if case.get("error").is_some() {
            let err = format!("{:#}", got.expect_err(name));
            // Every failing case is a README.md problem; the message names the file.
            assert!(err.contains("README.md"), "{name}: {err}");
            continue;
        }
        let want: Vec<(String, Value)> = case["kvs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| (kv[0].as_str().unwrap().to_string(), value_of(kv[1].as_str().unwrap(), &kv[2])))
            .collect();
        let got = got.unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(got.0, want, "case {name}");
    }
}

#[test]
fn size_labels_at_the_scale_boundaries() {
    let label = |n: i64| size_label(&ParamCounts { total: n, ..Default::default() });
    // Values from gguf.size_label.
    assert_eq!(label(95_000), "95K");
    assert_eq!(label(999_999), "1000K");
    assert_eq!(label(1_000_000), "1000K");
    assert_eq!(label(1_000_001), "1.0M");
    assert_eq!(label(125), "0.12K");
    assert_eq!(label(2_500), "2.5K");
    assert_eq!(label(9_950_000), "10M");
}

#[test]
fn front_matter_fixes_and_boundaries() {
    assert_eq!(front_matter("# title\n---\nx: 1\n---\n"), None);
    assert_eq!(front_matter("---\r\nlanguage:\r\n- no\r\n---\r\nbody").as_deref(), Some("language:\n- \"no\"\n"));
    assert_eq!(front_matter("---\n\tx: 1").as_deref(), Some("  x: 1\n"));
    assert_eq!(front_matter(""), None);
}

#[test]
fn empty_or_scalar_front_matter_is_no_card() {
    let root = tempfile::tempdir().unwrap();
    for text in ["---\n---\n", "---\n# only a comment\n---\n", "---\njust text\n---\n"] {
        std::fs::write(root.path().join("README.md"), text).unwrap();
        assert!(card::load_model_card(root.path()).unwrap().is_empty(), "{text:?}");
    }
}

#[test]
fn ids_split_into_parts() {
    let p = id_parts("org/Name-1.5B-Chat", 1_500_000_000);
    assert_eq!(p.basename.as_deref(), Some("Name"));
    assert_eq!(p.size_label.as_deref(), Some("1.5B"));
    assert_eq!(p.finetune.as_deref(), Some("Chat"));
    assert_eq!(p.org.as_deref(), Some("org"));
    assert_eq!(id_to_title("meta-llama"), "Meta Llama");
    assert_eq!(id_to_title("llama-3.1-8b-lora"), "Llama 3.1 8b Lora");
}

#[test]
fn a_card_value_that_is_not_a_string_is_one_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("README.md"), "---\nversion: 1.5\n---\n").unwrap();
    let err = format!("{:#}", general(&dir, &[("w", &[10])], false).unwrap_err());
    assert!(err.contains("`version`") && err.contains("1.5") && err.contains("general.version"), "{err}");
}

#[test]
fn plain_scalars_are_typed_as_pyyaml_types_them() {
    // PyYAML's safe_load of the same text: {'a': True, 'b': True, 'c': 1000, 'd': 493,
    // 'g': 0.5, 'h': None, 'i': 31, 'k': False, 'l': 1.0, 'm': inf, 'q': 'yes'}.
    let root = tempfile::tempdir().unwrap();
    let text = "---\na: yes\nb: on\nc: 1_000\nd: 0755\ng: .5\nh: ~\ni: 0x1F\nk: Off\nl: 1.0\nm: .inf\nq: 'yes'\n---\n";
    std::fs::write(root.path().join("README.md"), text).unwrap();
    let got = card::load_model_card(root.path()).unwrap();
    let want = [
        ("a", Y::Bool(true)),
        ("b", Y::Bool(true)),
        ("c", Y::Int(1000)),
        ("d", Y::Int(493)),
        ("g", Y::Float(0.5)),
        ("h", Y::Null),
        ("i", Y::Int(31)),
        ("k", Y::Bool(false)),
        ("l", Y::Float(1.0)),
        ("m", Y::Float(f64::INFINITY)),
        ("q", Y::Str("yes".into())),
    ];
    let want: Vec<(Y, Y)> = want.into_iter().map(|(k, v)| (Y::Str(k.into()), v)).collect();
    assert_eq!(got, want);
}
