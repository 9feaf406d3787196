//! `ferrotune train` with `rl`: end to end on the quickstart model with a
//! small synthetic preference set whose chosen and rejected completions
//! differ in a learnable way (the right capital vs "I do not know.").

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const CAPITALS: &[(&str, &str)] = &[
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Greece", "Athens"),
];

/// TRL's standard {prompt, chosen, rejected} rows.
fn write_pairs(dir: &Path) -> PathBuf {
    let path = dir.join("pairs.jsonl");
    let rows: Vec<String> = CAPITALS
        .iter()
        .map(|(c, city)| {
            serde_json::json!({
                "prompt": format!("User: What is the capital of {c}?\nAssistant:\n"),
                "chosen": format!("The capital of {c} is {city}."),
                "rejected": "I do not know.",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

fn train(dir: &Path, rl_keys: &str, extra: &str) -> Output {
    let data = write_pairs(dir);
    let cfg = dir.join("run.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n{rl_keys}\n\
             datasets:\n  - path: {}\n{extra}sequence_len: 128\nmicro_batch_size: 4\nnum_epochs: 3\nlearning_rate: 0.002\n\
             lr_scheduler: constant\nlogging_steps: 1\nseed: 1\ndevice: cpu\noutput_dir: {}\n",
            repo().join("examples/quickstart/model").display(),
            data.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(["train", cfg.to_str().unwrap()]).output().unwrap()
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &serde_json::Value| r.get("loss").is_some())
        .collect()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn dpo_learns_to_prefer_the_chosen_completions() {
    let tmp = tempfile::tempdir().unwrap();
    ok(&train(tmp.path(), "rl: dpo\nrl_beta: 0.1", "val_set_size: 4\n"));
    let r = records(tmp.path());
    let first = &r[0];
    let last = r.last().unwrap();
    for k in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert!(last.get(k).is_some_and(|v| v.is_number()), "metrics.jsonl lacks {k}: {last}");
    }
    assert!(last["rewards/accuracies"].as_f64().unwrap() > 0.9, "{last}");
    assert!(last["loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap());
    // The validation split is evaluated with the objective's metrics.
    let text = std::fs::read_to_string(tmp.path().join("out/metrics.jsonl")).unwrap();
    let eval: serde_json::Value = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|r| r.get("eval_loss").is_some()).expect("an eval record");
    assert!(eval["eval_rewards/accuracies"].as_f64().unwrap() > 0.9, "{eval}");
    assert!(tmp.path().join("out/adapter_model.safetensors").is_file());
}

#[test]
fn orpo_and_simpo_lower_their_losses() {
    for (rl, extra) in [("rl: orpo\norpo_alpha: 0.1", ""), ("rl: simpo\nrl_beta: 2.0\nsimpo_gamma: 0.5", ""), ("rl: ipo", "")] {
        let tmp = tempfile::tempdir().unwrap();
        ok(&train(tmp.path(), rl, extra));
        let r = records(tmp.path());
        let (first, last) = (r[0]["loss"].as_f64().unwrap(), r.last().unwrap()["loss"].as_f64().unwrap());
        assert!(last < first, "{rl}: loss {first} -> {last}");
    }
}

#[test]
fn kto_lowers_its_loss_on_unpaired_labelled_completions() {
    let tmp = tempfile::tempdir().unwrap();
    // Replace the pairs with KTO rows: each good answer desirable, each
    // "I do not know." undesirable.
    let rows: Vec<String> = CAPITALS
        .iter()
        .flat_map(|(c, city)| {
            let prompt = format!("User: What is the capital of {c}?\nAssistant:\n");
            [
                serde_json::json!({"prompt": prompt, "completion": format!("The capital of {c} is {city}."), "label": true}).to_string(),
                serde_json::json!({"prompt": prompt, "completion": "I do not know.", "label": false}).to_string(),
            ]
        })
        .collect();
    // Written with pair rows first: KTO says what its rows must hold.
    let out = train(tmp.path(), "rl: kto\nrl_beta: 0.1", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pairs.jsonl:1: missing \"label\""), "{err}");
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let cfg = tmp.path().join("run.yml");
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", cfg.to_str().unwrap(), "--set", &format!("output_dir={}", tmp.path().join("kto").display())])
        .output()
        .unwrap();
    ok(&out);
    let r: Vec<serde_json::Value> = std::fs::read_to_string(tmp.path().join("kto/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (first, last) = (&r[0], r.last().unwrap());
    assert!(last["loss"].as_f64().unwrap() < first["loss"].as_f64().unwrap(), "{first} -> {last}");
    for k in ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins"] {
        assert!(last.get(k).is_some(), "KTO metrics lack {k}: {last}");
    }
    assert!(last["rewards/margins"].as_f64().unwrap() > 0.0, "{last}");
}

#[test]
fn reward_model_learns_to_score_chosen_above_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    ok(&train(tmp.path(), "reward_model: true", "save_steps: 4\n"));
    let r = records(tmp.path());
    let last = r.last().unwrap();
    assert!(last["accuracy"].as_f64().unwrap() > 0.9, "{last}");
    assert!(last["loss"].as_f64().unwrap() < r[0]["loss"].as_f64().unwrap(), "{} -> {last}", r[0]);
    // Saved as PEFT saves a sequence-classification adapter: the score head
    // under modules_to_save, next to the LoRA tensors.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("out/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    let bytes = std::fs::read(tmp.path().join("out/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("base_model.model.score.weight").unwrap().shape(), &[1, 32 * 4]);
    // And a reward run resumes from its checkpoints (score head included).
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", tmp.path().join("run.yml").to_str().unwrap(), "--set", "resume_from_checkpoint=true", "--set", "num_epochs=4"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("resumed from"), "{err}");
}

#[test]
fn preference_config_and_data_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(tmp.path(), "rl: ebft", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the other online objectives (EBFT, GDPO, ...) are not implemented"), "{err}");

    let out = train(tmp.path(), "rl: dpo\ndpo_loss_type: exo", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("dpo_loss_type"), "{err}");

    // A list where a string goes, named with file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"q\", \"chosen\": [\"a\"], \"rejected\": \"b\"}\n").unwrap();
    let cfg = tmp.path().join("bad.yml");
    std::fs::write(&cfg, format!(
        "base_model: {}\nadapter: lora\nrl: dpo\ndatasets:\n  - path: {}\nlearning_rate: 0.001\ndevice: cpu\noutput_dir: {}\n",
        repo().join("examples/quickstart/model").display(), bad.display(), tmp.path().join("o").display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(["train", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl:2"), "{err}");

    // A preference dataset type without rl.
    std::fs::write(&cfg, format!(
        "base_model: {}\nadapter: lora\ndatasets:\n  - path: {}\n    type: chatml.intel\nlearning_rate: 0.001\n",
        repo().join("examples/quickstart/model").display(), bad.display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(["train", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("set rl (dpo, ipo, orpo or simpo)"), "{err}");
}

#[test]
fn a_diverging_run_is_reported_in_plain_words() {
    // An absurd learning rate without clipping sends the weights to
    // infinity: the run stops with the cause, not a NaN loss curve.
    let tmp = tempfile::tempdir().unwrap();
    ok(&train(tmp.path(), "rl: dpo", "max_grad_norm: 0\nmax_steps: 1\n"));
    let cfg = tmp.path().join("run.yml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("learning_rate: 0.002", "learning_rate: 1e30").replace("max_steps: 1\n", "");
    std::fs::write(&cfg, text).unwrap();
    // A new run into the first one's output_dir.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(["train", cfg.to_str().unwrap(), "--overwrite"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("training diverged") && err.contains("learning_rate"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn precomputed_reference_log_probs_give_the_same_run() {
    // The reference is the base model, which training never changes:
    // computing its log-probs once up front must not change the run (only
    // the f32 summation order of other batch shapes differs).
    let losses = |precompute: bool| {
        let tmp = tempfile::tempdir().unwrap();
        let out = train(tmp.path(), "rl: dpo", &format!("precompute_ref_log_probs: {precompute}\nmax_steps: 4\n"));
        ok(&out);
        if precompute {
            assert!(String::from_utf8_lossy(&out.stderr).contains("reference log-probs of 16 pairs precomputed"));
        }
        records(tmp.path()).iter().map(|r| r["loss"].as_f64().unwrap()).collect::<Vec<f64>>()
    };
    let (a, b) = (losses(false), losses(true));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "per-step losses {a:?} vs precomputed {b:?}");
    }
}
