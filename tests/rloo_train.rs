//! `rl: rloo` end to end through the CLI on the quickstart's tiny model
//! (examples/grpo/tiny.yml with rl: rloo): a short run raises a learnable
//! reward and logs TRL's RLOOTrainer fields and every completion.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny GRPO example as an RLOO run, paths absolute, output in `dir`.
fn config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("examples/grpo/tiny.yml")).unwrap();
    let text = text
        .replace("rl: grpo", "rl: rloo")
        .replace("base_model: examples/", &format!("base_model: {}/examples/", repo().display()))
        .replace("path: examples/", &format!("path: {}/examples/", repo().display()))
        .replace("output_dir: outputs/grpo-tiny", &format!("output_dir: {}", dir.join("out").display()));
    assert!(text.contains("rl: rloo"));
    let path = dir.join("run.yml");
    std::fs::write(&path, format!("{text}device: cpu\n")).unwrap();
    path
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_short_rloo_run_raises_the_reward_and_logs_trl_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune")).arg("train").arg(config(tmp.path())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let metrics = records(&tmp.path().join("out/metrics.jsonl"));
    assert_eq!(metrics.len(), 30);
    for key in [
        "loss", "reward", "reward_std", "rewards/answer_match/mean", "rewards/answer_match/std", "rewards/format/mean",
        "rewards/format/std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length", "completions/max_length",
        "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
        // RLOO's default beta is 0.05: the KL (old − ref, token mean) is logged.
        "kl",
    ] {
        assert!(metrics[0].get(key).is_some(), "metrics.jsonl lacks {key}: {}", metrics[0]);
    }
    let reward = |r: &[Value]| r.iter().map(|m| m["reward"].as_f64().unwrap()).sum::<f64>() / r.len() as f64;
    let (first, last) = (reward(&metrics[..3]), reward(&metrics[20..]));
    eprintln!("reward: first steps {first:.3}, last steps {last:.3}");
    assert!(first < 0.2 && last > first + 0.7, "the reward should rise from about 0: first steps {first:.2}, last steps {last:.2}");

    // Every completion, 16 a step, groups contiguous; a group's advantages
    // are leave-one-out, so (without normalize_advantages) they sum to 0.
    let rows = records(&tmp.path().join("out/completions.jsonl"));
    assert_eq!(rows.len(), 30 * 16);
    for key in ["step", "prompt", "completion", "prompt_ids", "completion_ids", "rewards", "reward", "advantage"] {
        assert!(rows[0].get(key).is_some(), "completions.jsonl lacks {key}: {}", rows[0]);
    }
    for group in rows.chunks(8).take(8) {
        let sum: f64 = group.iter().map(|r| r["advantage"].as_f64().unwrap()).sum();
        assert!(sum.abs() < 1e-9, "a group's leave-one-out advantages sum to 0, got {sum}");
    }
}
