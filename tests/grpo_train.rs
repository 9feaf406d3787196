//! `rl: grpo` end to end through the CLI on the quickstart's tiny model:
//! a short run raises a learnable reward, logs TRL's fields and every
//! completion, resumes without repeating or losing a step, and a reward
//! function that fails stops the run with one clear error while the last
//! checkpoint stands.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny GRPO example (examples/grpo/tiny.yml) with its paths made
/// absolute, output in `dir`, and `extra` lines appended.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("examples/grpo/tiny.yml")).unwrap();
    let text = text
        .replace("base_model: examples/", &format!("base_model: {}/examples/", repo().display()))
        .replace("path: examples/", &format!("path: {}/examples/", repo().display()))
        .replace("output_dir: outputs/grpo-tiny", &format!("output_dir: {}", dir.join("out").display()));
    let path = dir.join("run.yml");
    std::fs::write(&path, format!("{text}device: cpu\n{extra}")).unwrap();
    path
}

fn train(cfg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).arg("train").arg(cfg).args(args).output().unwrap()
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_short_run_raises_the_reward_and_logs_trl_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let out = train(&config(tmp.path(), ""), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(" reward "), "the progress line shows the reward: {err}");
    let metrics = records(&tmp.path().join("out/metrics.jsonl"));
    assert_eq!(metrics.len(), 30);
    for key in [
        "loss", "reward", "reward_std", "rewards/answer_match/mean", "rewards/answer_match/std", "rewards/format/mean",
        "rewards/format/std", "completions/mean_length", "completions/min_length", "completions/max_length",
        "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    ] {
        assert!(metrics[0].get(key).is_some(), "metrics.jsonl lacks {key}: {}", metrics[0]);
    }
    // beta 0 (TRL's default): no KL term, none logged.
    assert!(metrics[0].get("kl").is_none());
    let reward = |r: &[Value]| r.iter().map(|m| m["reward"].as_f64().unwrap()).sum::<f64>() / r.len() as f64;
    let (first, last) = (reward(&metrics[..3]), reward(&metrics[20..]));
    assert!(first < 0.2 && last > first + 0.7, "the reward should rise from about 0: first steps {first:.2}, last steps {last:.2}");

    // Every completion, in sampling order: 16 a step (2 prompts × 8).
    let rows = records(&tmp.path().join("out/completions.jsonl"));
    assert_eq!(rows.len(), 30 * 16);
    for key in ["step", "prompt", "completion", "prompt_ids", "completion_ids", "rewards", "reward", "advantage"] {
        assert!(rows[0].get(key).is_some(), "completions.jsonl lacks {key}: {}", rows[0]);
    }
    assert_eq!(rows[16]["step"], 2);
    // Groups are contiguous: 8 rows per prompt.
    assert_eq!(rows[0]["prompt_ids"], rows[7]["prompt_ids"]);
    assert_ne!(rows[7]["prompt_ids"], rows[8]["prompt_ids"]);
    // The logged reward is the weighted sum of the logged per-function rewards.
    for r in &rows[..32] {
        let sum: f64 = r["rewards"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - r["reward"].as_f64().unwrap()).abs() < 1e-12, "{r}");
    }
}

#[test]
fn a_resumed_run_neither_repeats_nor_loses_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "save_steps: 2\n");
    let out = train(&cfg, &["--set", "max_steps=4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = train(&cfg, &["--set", "max_steps=6", "--set", "resume_from_checkpoint=true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("resumed from"), "{err}");
    let steps: Vec<u64> = records(&tmp.path().join("out/metrics.jsonl")).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5, 6]);
    let rows = records(&tmp.path().join("out/completions.jsonl"));
    let per_step: Vec<usize> = (1..=6).map(|s| rows.iter().filter(|r| r["step"] == s).count()).collect();
    assert_eq!(per_step, vec![16; 6]);
}

#[test]
fn a_failing_reward_function_names_itself_and_the_step() {
    let Some(python) = common::python_with(&["json"]) else {
        eprintln!("skipped: no python3 (set FERROTUNE_PYTHON)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("flaky.py"),
        "def reward(prompts, completions, completion_ids, trainer_state, **kw):\n    \
         if trainer_state.global_step >= 2:\n        raise ValueError('no reward today')\n    \
         return [1.0] * len(completions)\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(config(tmp.path(), "save_steps: 1\n")).unwrap();
    let cfg = tmp.path().join("run.yml");
    std::fs::write(&cfg, text.replace("reward_funcs: [builtin:answer_match, \"builtin:format:[0-9]\"]", "reward_funcs: [flaky.reward]")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).arg("train").arg(&cfg).env("FERROTUNE_PYTHON", &python).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("flaky.reward") && err.contains("step 3") && err.contains("no reward today"), "{err}");
    assert!(tmp.path().join("out/checkpoint-2").is_dir(), "the last checkpoint stands: {err}");
}

#[test]
fn grpo_samples_and_trains_a_qwen3_5_model() {
    // The sampler's cache holds the gated delta-net's conv and recurrent
    // states for Qwen3.5's linear-attention layers (and keys and values for
    // its full-attention layer); a short run must sample every group, score
    // it and train.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "");
    let model = common::fixture("qwen3_5").join("model");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("base_model: {}/examples/quickstart/model", repo().display()), &format!("base_model: {}", model.display()))
        .replace("chat_template: tokenizer_default", "chat_template: chatml")
        .replace("max_steps: 30", "max_steps: 2");
    std::fs::write(&cfg, text).unwrap();
    let out = train(&cfg, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("qwen3_5"), "the run loads the Qwen3.5 fixture: {err}");
    let metrics = records(&tmp.path().join("out/metrics.jsonl"));
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    assert!(metrics.iter().all(|m| m["loss"].as_f64().is_some_and(f64::is_finite)), "{metrics:?}");
    assert_eq!(records(&tmp.path().join("out/completions.jsonl")).len(), 2 * 16);
    assert!(tmp.path().join("out/adapter_model.safetensors").is_file());
}
