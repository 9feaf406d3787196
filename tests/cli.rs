//! The `ferrotune` binary end to end: eval on a fixture, and clean errors.

mod common;

use common::{Reference, fixture};
use std::io::Write;
use std::process::Command;

fn ferrotune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).output().expect("run ferrotune")
}

/// The fixture batch as pre-tokenized JSONL rows (with their padding and
/// attention_mask, which eval drops).
fn write_fixture_data(case: &str, path: &std::path::Path) {
    let r = Reference::load(case);
    let shape = r.shape("input_ids");
    let (b, t) = (shape[0], shape[1]);
    let (ids, mask, labels) = (r.i64("input_ids"), r.i64("attention_mask"), r.i64("labels"));
    let mut f = std::fs::File::create(path).unwrap();
    for row in 0..b {
        let s = row * t..(row + 1) * t;
        let line = serde_json::json!({"input_ids": ids[s.clone()], "attention_mask": mask[s.clone()], "labels": labels[s]});
        writeln!(f, "{line}").unwrap();
    }
}

#[test]
fn eval_json_reports_the_transformers_loss() {
    for case in ["llama", "llama3"] {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data.jsonl");
        write_fixture_data(case, &data);
        let model = fixture(case).join("model");
        let adapter = fixture(case).join("adapter");
        let out = ferrotune(&[
            "eval", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(),
            "--data", data.to_str().unwrap(), "--json", "--device", "cpu",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        let r = Reference::load(case);
        let expected = r.json["loss"].as_f64().unwrap();
        let loss = v["loss"].as_f64().unwrap();
        assert!((loss - expected).abs() / expected <= 1e-5, "{case}: eval loss {loss} vs transformers {expected}");
        assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
        assert_eq!(v["tokens"], r.json["num_target_tokens"]);
        assert_eq!(v["examples"], 3);
    }
}

#[test]
fn eval_bad_row_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [1, \"x\"]}\n").unwrap();
    let model = fixture("llama").join("model");
    let out = ferrotune(&["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:3") && err.contains("\"input_ids\"[1] must be an integer"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn eval_refuses_unknown_architecture_without_panicking() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), r#"{"architectures": ["BertModel"], "model_type": "bert"}"#).unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2]}\n").unwrap();
    let out = ferrotune(&["eval", "--model", tmp.path().to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("unsupported model: architecture BertModel"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn eval_token_outside_vocabulary_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"input_ids\": [1, 2, 5000]}\n").unwrap();
    let model = fixture("llama").join("model");
    let out = ferrotune(&["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("d.jsonl:1: input_ids[2] = 5000 is outside the model's vocabulary (size 131)"), "{err}");
}

#[test]
fn models_lists_the_registry() {
    let out = ferrotune(&["models"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for arch in ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "llama3"] {
        assert!(s.contains(arch), "{s}");
    }
}

#[test]
fn cuda_without_a_driver_is_one_clear_error() {
    if ferrotune::backend::cuda::device::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let out = ferrotune(&["eval", "--model", "x", "--data", "y", "--device", "cuda:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CUDA driver found") && err.contains("--device cpu"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // auto falls back to the CPU without a word of error.
    let out = ferrotune(&["bench", "--seq-len", "8", "--steps", "1", "--warmup", "0", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bench_on_cpu_prints_one_json_object() {
    let out = ferrotune(&[
        "bench", "--preset", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "1", "--warmup", "0",
        "--device", "cpu", "--json", "--gradient-checkpointing",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["model_tflops"].as_f64().unwrap() > 0.0);
    assert!(v["loss"].as_f64().unwrap().is_finite());
    assert!(v["flop_convention"].as_str().unwrap().contains("4·N_base"));
}

#[test]
fn synth_with_a_word_tokenizer_generates_words_of_its_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let out = ferrotune(&["synth", "--preset", "tiny", "--word-tokenizer", "--out", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ferrotune(&[
        "generate", "--model", dir.to_str().unwrap(), "--prompt", "t5 t17 t200", "--max-new-tokens", "4", "--temperature", "0", "--ignore-eos",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The tiny preset's vocabulary is 257 words, t0 .. t256: four of them come back.
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{text:?}");
    for w in words {
        let id: usize = w.strip_prefix('t').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{w:?} in {text:?}"));
        assert!(id < 257, "{w}");
    }
}
