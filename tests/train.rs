//! `ferrotune train` end to end: parity with a torch + PEFT training run,
//! resume after SIGKILL, determinism, packing, metrics and the quickstart.

mod common;

use common::fixture;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run the binary from the repository root (configs use repo-relative paths).
fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(repo()).output().expect("run ferrotune")
}

fn train(config: &Path, sets: &[String]) -> Output {
    let mut args = vec!["train".to_string(), config.display().to_string()];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    ferrotune(&refs)
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ferrotune failed:\n{err}");
    err
}

/// Every tensor of an adapter_model.safetensors, as f32.
fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).expect("adapter_model.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{k}");
            (k, t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        })
        .collect()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn training_matches_torch_peft_adamw() {
    let case = fixture("train");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("reference.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("run");
    let out = train(&case.join("config.yml"), &[format!("output_dir={}", out_dir.display())]);
    ok(&out);

    // The logged losses, gradient norms and learning rates, step by step.
    let logged = metrics(&out_dir);
    let steps = reference["steps"].as_array().unwrap();
    assert_eq!(logged.len(), steps.len(), "one record per step: {logged:?}");
    for (got, want) in logged.iter().zip(steps) {
        let step = want["step"].as_u64().unwrap();
        assert_eq!(got["step"].as_u64(), Some(step));
        let (l, lr) = (got["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap());
        let tol = if step == 1 { 1e-4 } else { 1e-3 };
        assert!((l - lr).abs() / lr <= tol, "step {step}: loss {l} vs torch {lr}");
        let (g, gr) = (got["grad_norm"].as_f64().unwrap(), want["grad_norm"].as_f64().unwrap());
        assert!((g - gr).abs() / gr <= 1e-3, "step {step}: grad norm {g} vs torch {gr}");
        let (a, b) = (got["lr"].as_f64().unwrap(), want["learning_rate"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-12, "step {step}: lr {a} vs torch {b}");
    }

    // The trained adapter: the update (final − start) of every tensor
    // within 1e-3 relative of torch's update.
    let start = tensors(&case.join("start_adapter"));
    let want = tensors(&case.join("final_adapter"));
    let got = tensors(&out_dir);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "same PEFT keys");
    let mut worst = 0f64;
    for (k, w) in &want {
        let (g, s) = (&got[k], &start[k]);
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..w.len() {
            let (du, dr) = ((g[i] - s[i]) as f64, (w[i] - s[i]) as f64);
            num += (du - dr) * (du - dr);
            den += dr * dr;
        }
        let rel = (num / den.max(1e-30)).sqrt();
        worst = worst.max(rel);
        assert!(rel <= 1e-3, "{k}: update differs from torch's by {rel:.2e} (relative)");
    }
    eprintln!("worst relative update error vs torch: {worst:.2e}");
}

/// A longer run on the training fixture's data, with shuffling and dropout,
/// saving often: the config of the resume and determinism tests.
fn long_run_config(dir: &Path, steps: usize) -> PathBuf {
    let data = fixture("train").join("data.jsonl");
    let model = fixture("llama").join("model");
    let cfg = format!(
        "base_model: {}\nadapter: lora\ndatasets:\n  - path: {}\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlora_target_linear: true\n\
         sequence_len: 64\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nmax_steps: {steps}\nlearning_rate: 0.001\n\
         lr_scheduler: cosine\nwarmup_steps: 3\nweight_decay: 0.01\nsave_steps: 4\nlogging_steps: 1\nseed: 7\ndevice: cpu\n\
         shuffle_merged_datasets: true\noutput_dir: {}\n",
        model.display(),
        data.display(),
        dir.join("out").display()
    );
    let path = dir.join("run.yml");
    std::fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn resume_after_sigkill_gives_the_uninterrupted_adapter() {
    const STEPS: usize = 400;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();

    // Uninterrupted.
    ok(&train(&long_run_config(&a, STEPS), &[]));

    // Killed (SIGKILL: no chance to clean up) once a checkpoint exists.
    let cfg_b = long_run_config(&b, STEPS);
    let out_b = b.join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", cfg_b.to_str().unwrap()])
        .current_dir(repo())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !out_b.join("checkpoint-8").join("trainer_state.json").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out_b.join("adapter_model.safetensors").exists(), "killed too late: the run had finished");

    // Resume from the latest checkpoint and finish.
    let err = ok(&train(&cfg_b, &["resume_from_checkpoint=true".into()]));
    assert!(err.contains("resumed from"), "{err}");
    assert_eq!(
        std::fs::read(a.join("out/adapter_model.safetensors")).unwrap(),
        std::fs::read(out_b.join("adapter_model.safetensors")).unwrap(),
        "the resumed run's adapter must equal the uninterrupted run's bit for bit"
    );
    // metrics.jsonl holds each step once, in order.
    let steps: Vec<u64> = metrics(&out_b).iter().filter(|m| m.get("loss").is_some()).map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>());
}

#[test]
fn same_seed_same_adapter_and_checkpoints_are_usable_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    ok(&train(&long_run_config(&a, 6), &[]));
    ok(&train(&long_run_config(&b, 6), &[]));
    assert_eq!(tensors(&a.join("out")), tensors(&b.join("out")));
    // checkpoint-4 is a PEFT adapter plus optimizer and trainer state.
    let ck = a.join("out/checkpoint-4");
    for f in ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        assert!(ck.join(f).is_file(), "{f} missing in {}", ck.display());
    }
    let out = ferrotune(&["eval", "--model", fixture("llama").join("model").to_str().unwrap(), "--adapter", ck.to_str().unwrap(),
        "--data", fixture("train").join("data.jsonl").to_str().unwrap(), "--device", "cpu", "--json"]);
    ok(&out);
    // The resolved config is saved and loads again.
    assert!(a.join("out/resolved_config.yml").is_file());
}

#[test]
fn resume_with_changed_settings_is_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = long_run_config(tmp.path(), 5);
    ok(&train(&cfg, &[]));
    let out = train(&cfg, &["resume_from_checkpoint=true".into(), "learning_rate=0.5".into(), "max_steps=9".into()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("learning_rate (checkpoint: 0.001, now: 0.5)"), "{err}");
    let out = train(&cfg, &[format!("resume_from_checkpoint={}", tmp.path().display())]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a complete checkpoint"));
}

#[test]
fn packed_and_unpacked_steps_have_the_same_loss_and_update() {
    // One optimiser step covering all 12 rows either way: packing changes
    // only how rows share micro-batches, never what the model computes.
    let tmp = tempfile::tempdir().unwrap();
    let case = fixture("train");
    let run = |packing: bool, name: &str| {
        let dir = tmp.path().join(name);
        ok(&train(&case.join("config.yml"), &[
            format!("output_dir={}", dir.display()),
            format!("sample_packing={packing}"),
            "micro_batch_size=1".into(),
            "gradient_accumulation_steps=12".into(),
            "max_steps=1".into(),
            "warmup_steps=0".into(),
            "lr_scheduler=constant".into(),
        ]));
        let m = &metrics(&dir)[0];
        (m["loss"].as_f64().unwrap(), m["grad_norm"].as_f64().unwrap(), tensors(&dir))
    };
    let (loss_u, norm_u, ad_u) = run(false, "unpacked");
    let (loss_p, norm_p, ad_p) = run(true, "packed");
    // Only the f32 summation order of the gradients differs.
    assert!((loss_u - loss_p).abs() / loss_u <= 1e-6, "packed loss {loss_p} vs unpacked {loss_u}");
    assert!((norm_u - norm_p).abs() / norm_u <= 1e-5, "packed grad norm {norm_p} vs unpacked {norm_u}");
    // Equal loss and gradient norm show the gradients agree. A first Adam
    // step is nearly lr·sign(g) and magnifies rounding in near-zero gradient
    // entries, so the update is compared as a whole, with the bar of the
    // torch parity test (1e-3).
    let start = tensors(&fixture("train").join("start_adapter"));
    for (k, u) in &ad_u {
        let (mut num, mut den) = (0f64, 0f64);
        for ((a, b), s) in u.iter().zip(&ad_p[k]).zip(&start[k]) {
            num += ((a - b) as f64).powi(2);
            den += ((a - s) as f64).powi(2);
        }
        let rel = (num / den.max(1e-30)).sqrt();
        assert!(rel <= 1e-3, "{k}: packed and unpacked updates differ by {rel:.2e} relative");
    }
}

#[test]
fn eval_records_and_validation_split() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = long_run_config(tmp.path(), 6);
    ok(&train(&cfg, &["val_set_size=4".into(), "eval_steps=2".into()]));
    let m = metrics(&tmp.path().join("out"));
    let evals: Vec<&serde_json::Value> = m.iter().filter(|r| r.get("eval_loss").is_some()).collect();
    assert_eq!(evals.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![2, 4, 6]);
    for r in m.iter().filter(|r| r.get("loss").is_some()) {
        for k in ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(r.get(k).is_some_and(|v| !v.is_null()), "metrics record lacks {k}: {r}");
        }
    }
}

#[test]
fn quickstart_runs_and_the_loss_falls() {
    // The README's first command, shortened.
    let tmp = tempfile::tempdir().unwrap();
    let out = train(&repo().join("examples/quickstart/quickstart.yml"), &[
        format!("output_dir={}", tmp.path().display()),
        "num_epochs=6".into(),
        "logging_steps=3".into(),
        "device=cpu".into(),
        "save_steps=null".into(),
    ]);
    ok(&out);
    let m = metrics(tmp.path());
    let losses: Vec<f64> = m.iter().filter_map(|r| r.get("loss").and_then(|l| l.as_f64())).collect();
    assert!(losses.len() >= 3, "{m:?}");
    assert!(losses.last().unwrap() < &(losses[0] * 0.7), "the quickstart loss should fall: {losses:?}");
    assert!(tmp.path().join("adapter_model.safetensors").is_file());
    assert!(tmp.path().join("adapter_config.json").is_file());
}

/// The adapter `train` writes, against the one PEFT wrote for the same run
/// (tests/fixtures/train/final_adapter): the same tensor names, shapes and
/// dtypes, and a config PEFT reads the same way (only keys PEFT knows, the
/// same values where they matter).
#[test]
fn written_adapter_has_peft_layout() {
    let case = fixture("train");
    let tmp = tempfile::tempdir().unwrap();
    ok(&train(&case.join("config.yml"), &[format!("output_dir={}", tmp.path().display())]));
    let read = |dir: &Path| -> (serde_json::Value, Vec<(String, safetensors::Dtype, Vec<usize>)>) {
        let cfg = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<_> = st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec())).collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        (cfg, t)
    };
    let (ours, ours_t) = read(tmp.path());
    let (peft, peft_t) = read(&case.join("final_adapter"));
    assert_eq!(ours_t, peft_t, "tensor names, dtypes and shapes");
    for (k, _) in ours.as_object().unwrap() {
        assert!(peft.get(k).is_some(), "adapter_config.json key {k} is not one PEFT writes");
    }
    for k in ["peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
              "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save"] {
        let (a, b) = (&ours[k], &peft[k]);
        let same = a == b || (a.as_f64().is_some() && a.as_f64() == b.as_f64());
        assert!(same, "adapter_config.json {k}: ours {a}, PEFT {b}");
    }
}

/// PEFT itself loads the adapter `train` wrote, and its loss on the data is
/// the loss `ferrotune eval` reports. Needs Python with torch, transformers
/// and peft (FERROTUNE_PYTHON); skipped, saying so, where there is none.
#[test]
fn peft_loads_the_trained_adapter_with_the_same_loss() {
    let Some(python) = common::python_with(&["torch", "transformers", "peft"]) else {
        eprintln!("skipped: no Python with torch, transformers and peft (set FERROTUNE_PYTHON)");
        return;
    };
    let case = fixture("train");
    let tmp = tempfile::tempdir().unwrap();
    ok(&train(&case.join("config.yml"), &[format!("output_dir={}", tmp.path().display())]));
    let model = fixture("llama").join("model");
    let data = case.join("data.jsonl");
    let out = ferrotune(&["eval", "--model", model.to_str().unwrap(), "--adapter", tmp.path().to_str().unwrap(),
        "--data", data.to_str().unwrap(), "--device", "cpu", "--json"]);
    ok(&out);
    let ours = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["loss"].as_f64().unwrap();
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model_dir, adapter_dir, data = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32), adapter_dir).eval()
nll, n = 0.0, 0
with torch.no_grad():
    for line in open(data):
        row = json.loads(line)
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row.get("labels", row["input_ids"])])
        logits = model(input_ids=ids).logits[0, :-1].double()
        target = labels[0, 1:]
        keep = target != -100
        nll += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        n += int(keep.sum())
print(nll / n)
"#;
    let py = Command::new(python)
        .args(["-c", script, model.to_str().unwrap(), tmp.path().to_str().unwrap(), data.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let theirs: f64 = String::from_utf8_lossy(&py.stdout).trim().parse().unwrap();
    assert!((ours - theirs).abs() / theirs <= 1e-5, "ferrotune eval {ours} vs PEFT {theirs}");
    eprintln!("PEFT loss {theirs:.8}, ferrotune eval {ours:.8}");
}

/// Bad input stops `train` before any work, with one message naming the
/// file, line or key, and a non-zero exit (never a panic).
#[test]
fn train_input_errors_are_one_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let model = repo().join("examples/quickstart/model");
    let bad_rows = tmp.path().join("bad.jsonl");
    std::fs::write(&bad_rows, "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": [\"x\"], \"output\": \"b\"}\n").unwrap();
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (format!("base_model: {}\nlerning_rate: 1\n", model.display()), vec![], ":2: unknown key \"lerning_rate\" (did you mean \"learning_rate\"?)"),
        (
            format!("base_model: {}\nlearning_rate: 0.1\nadapter: lora\ndatasets:\n  - path: {}\n    type: alpaca\n", model.display(), bad_rows.display()),
            vec![],
            "bad.jsonl:2: \"instruction\" must be a string, found a list",
        ),
        (
            format!("base_model: {}\nlearning_rate: 0.1\nadapter: lora\ndatasets:\n  - path: {}\n    type: alpaca\n", tmp.path().join("nomodel").display(), bad_rows.display()),
            vec![],
            "nomodel does not exist",
        ),
        (
            format!("base_model: {}\nlearning_rate: 0.1\nadapter: lora\ndatasets:\n  - path: {}\n    type: alpaca\n", model.display(), bad_rows.display()),
            vec!["micro_batch_size=0".into()],
            "--set micro_batch_size=0: micro_batch_size must be at least 1",
        ),
    ];
    for (i, (yaml, sets, expected)) in cases.iter().enumerate() {
        let cfg = tmp.path().join(format!("c{i}.yml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = train(&cfg, sets);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i}: {err}");
        assert!(err.contains(expected), "case {i}: expected {expected:?} in:\n{err}");
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "case {i}: {err}");
    }
}
