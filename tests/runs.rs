//! Runs that never mix, never lose work and stop cleanly: an earlier run's
//! output_dir, two runs at once, partial files of a killed run, Ctrl-C and
//! SIGTERM, resume settings, and output folders that are inputs (synth,
//! train). All on the quickstart model and data, on the CPU.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).current_dir(repo()).output().expect("run ferrotune")
}

/// The quickstart into `out`, with `extra` arguments (--set K=V, --overwrite).
fn quickstart_args(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "examples/quickstart/quickstart.yml", "--device", "cpu"].map(String::from).to_vec();
    for s in [format!("output_dir={}", out.display()), format!("max_steps={steps}"), "save_steps=1".into(), "save_total_limit=null".into(), "logging_steps=1".into()] {
        args.extend(["--set".to_string(), s]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn quickstart(out: &Path, steps: usize, extra: &[&str]) -> Output {
    let args = quickstart_args(out, steps, extra);
    ferrotune(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: &Output) -> String {
    let err = stderr(out);
    assert!(out.status.success(), "ferrotune failed:\n{err}");
    err
}

/// The one error line of a refused run.
fn refused(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "expected a refusal:\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{err}");
    assert!(err.ends_with(&format!("{}\n", errors[0])), "the error comes last:\n{err}");
    errors[0].to_string()
}

fn logged_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64())
        .collect()
}

#[test]
fn rerun_into_an_earlier_run_is_refused_and_overwrite_clears_only_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&quickstart(&out, 3, &[]));
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();

    let err = refused(&quickstart(&out, 2, &[]));
    assert!(err.contains(&format!("output_dir {} holds another run (", out.display())), "{err}");
    assert!(err.contains("checkpoint-3") && err.contains("metrics.jsonl") && err.contains("--overwrite"), "{err}");
    assert!(err.contains("resume_from_checkpoint: true to continue it"), "{err}");
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics_before, "the refused run touched the earlier one");

    // --overwrite: the earlier run's files go, the user's stay, and no
    // checkpoint of the earlier run is left beside the new ones.
    let err = ok(&quickstart(&out, 2, &["--overwrite"]));
    assert!(err.contains("overwrite_output_dir: removed the earlier run's files"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "mine");
    assert!(out.join("checkpoint-2").is_dir() && !out.join("checkpoint-3").exists());
    assert_eq!(logged_steps(&out), [1, 2]);

    // The config key does the same.
    ok(&quickstart(&out, 1, &["--set", "overwrite_output_dir=true"]));
    assert_eq!(logged_steps(&out), [1]);
    assert!(!out.join("checkpoint-2").exists());

    // A resume into a run that left no checkpoint cannot continue it.
    let no_ckpt = tmp.path().join("no-checkpoint");
    ok(&quickstart(&no_ckpt, 1, &["--set", "save_steps=null"]));
    let err = refused(&quickstart(&no_ckpt, 1, &["--set", "resume_from_checkpoint=true"]));
    assert!(err.contains(&format!("output_dir {} holds another run (adapter_config.json, ", no_ckpt.display())), "{err}");
    assert!(err.contains("but no checkpoint to resume; set resume_from_checkpoint: false and pass --overwrite"), "{err}");

    // Overwrite and resume at once is a contradiction.
    let err = refused(&quickstart(&out, 2, &["--overwrite", "--set", "resume_from_checkpoint=true"]));
    assert!(err.contains("contradict"), "{err}");
}

#[test]
fn resume_may_extend_a_run_but_not_one_with_no_steps_left() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&quickstart(&out, 3, &[]));

    let err = refused(&quickstart(&out, 3, &["--set", "resume_from_checkpoint=true"]));
    assert!(err.contains("checkpoint-3") && err.contains("it is at step 3, and this run has 3 steps in all (max_steps 3): the run there is finished"), "{err}");
    let err = refused(&quickstart(&out, 2, &["--set", "resume_from_checkpoint=true"]));
    assert!(err.contains("it is at step 3, and this run has 2 steps in all (max_steps 2): nothing is left to train"), "{err}");

    let err = ok(&quickstart(&out, 5, &["--set", "resume_from_checkpoint=true"]));
    assert!(err.contains("resumed from") && err.contains("this run has 5 steps in all (max_steps 5), the checkpoint's run had 3"), "{err}");
    assert!(err.contains("done: 5 steps"), "{err}");
    assert_eq!(logged_steps(&out), [1, 2, 3, 4, 5]);

    // Back to an earlier checkpoint: the later ones belong to the steps this
    // run redoes, and go (they would outrank the new ones).
    let first = out.join("checkpoint-1");
    let err = ok(&quickstart(&out, 2, &["--set", &format!("resume_from_checkpoint={}", first.display())]));
    assert!(err.contains("removed checkpoint-2, checkpoint-3, checkpoint-4, checkpoint-5 (after the resumed step 1"), "{err}");
    let mut left: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.starts_with("checkpoint-")).collect();
    left.sort();
    assert_eq!(left, ["checkpoint-1", "checkpoint-2"]);
    assert_eq!(logged_steps(&out), [1, 2]);
}

#[test]
fn resume_with_changed_target_modules_is_refused_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&quickstart(&out, 1, &[]));
    let err = refused(&quickstart(&out, 2, &[
        "--set", "resume_from_checkpoint=true", "--set", "lora_target_linear=false", "--set", "lora_target_modules=[q_proj, v_proj]",
    ]));
    assert!(err.contains("cannot resume from") && err.contains("lora_target_modules (checkpoint: "), "{err}");
    assert!(err.contains("now: q_proj, v_proj)"), "{err}");
}

#[test]
fn a_second_run_into_a_locked_output_dir_is_refused_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    std::fs::create_dir_all(&out).unwrap();
    // The test holds the lock as a running train would.
    let lock = File::options().read(true).write(true).create(true).truncate(false).open(out.join(".ferrotune.lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(out.join(".ferrotune.lock"), "pid 4242, started 2026-01-02 03:04:05 UTC").unwrap();
    let err = refused(&quickstart(&out, 1, &[]));
    assert!(
        err.contains(&format!(
            "output_dir {} is in use by another ferrotune train (pid 4242, started 2026-01-02 03:04:05 UTC)",
            out.display()
        )),
        "{err}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "the refused run wrote into the locked folder");

    // The holder gone (its lock file left behind), the folder is free again,
    // and the lock file then names the new run.
    drop(lock);
    ok(&quickstart(&out, 1, &[]));
    let holder = std::fs::read_to_string(out.join(".ferrotune.lock")).unwrap();
    assert!(holder.starts_with("pid ") && !holder.contains("4242"), "{holder}");
}

#[test]
fn partial_files_of_a_killed_run_are_removed_at_start_and_said() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cache = tmp.path().join("cache");
    std::fs::create_dir_all(out.join(".checkpoint-7.partial")).unwrap();
    std::fs::write(out.join(".checkpoint-7.partial/optimizer.safetensors.tmp"), "half").unwrap();
    std::fs::write(out.join("metrics.jsonl.tmp"), "half").unwrap();
    std::fs::write(out.join("notes.tmp"), "mine").unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let old = File::create(cache.join("0123.ftds.tmp")).unwrap();
    old.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200)).unwrap();
    drop(old);
    std::fs::write(cache.join("4567.ftds.tmp"), "being written by another run").unwrap();

    let err = ok(&quickstart(&out, 1, &["--set", &format!("dataset_prepared_path={}", cache.display())]));
    assert!(
        err.contains(&format!("removed what an interrupted run left unfinished in {}: .checkpoint-7.partial, metrics.jsonl.tmp", out.display())),
        "{err}"
    );
    assert!(err.contains(&format!("removed 1 unfinished dataset cache file(s) from {}", cache.display())), "{err}");
    assert!(!out.join(".checkpoint-7.partial").exists() && !out.join("metrics.jsonl.tmp").exists());
    assert!(out.join("notes.tmp").is_file(), "a file ferrotune does not write was removed");
    assert!(!cache.join("0123.ftds.tmp").exists() && cache.join("4567.ftds.tmp").is_file());
}

#[test]
fn output_dir_that_is_the_base_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(repo().join("examples/quickstart/model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let before = std::fs::read_dir(&model).unwrap().count();
    let err = refused(&quickstart(&model, 1, &["--set", &format!("base_model={}", model.display())]));
    assert!(err.contains(&format!("output_dir {} is the base model's own directory (base_model)", model.display())), "{err}");
    assert_eq!(std::fs::read_dir(&model).unwrap().count(), before, "the refused run wrote into the model folder");
}

#[test]
fn synth_refuses_a_non_empty_folder_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), "{}").unwrap();
    let out_s = out.to_str().unwrap();
    let err = refused(&ferrotune(&["synth", "--out", out_s]));
    assert!(err.contains(&format!("--out {out_s} is not empty (it holds tokenizer.json)")) && err.contains("--force"), "{err}");
    assert!(!out.join("model.safetensors").exists());
    ok(&ferrotune(&["synth", "--out", out_s, "--force"]));
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());
    // A new or empty folder needs no flag.
    ok(&ferrotune(&["synth", "--out", tmp.path().join("fresh").to_str().unwrap()]));
}

/// Start a training in the background; returns it once it has printed its
/// first step, with the lines read so far and the rest of its stderr.
fn start_training(args: &[String]) -> (std::process::Child, String, std::thread::JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .current_dir(repo())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferrotune");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen += &line;
        seen.push('\n');
        if line.starts_with("step 1/") {
            break;
        }
    }
    assert!(seen.contains("step 1/"), "no first step:\n{seen}");
    let rest = std::thread::spawn(move || lines.map(|l| l.unwrap() + "\n").collect::<String>());
    (child, seen, rest)
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill");
    assert!(st.success());
}

#[test]
fn ctrl_c_finishes_the_step_saves_and_a_resume_finishes_the_run() {
    const STEPS: usize = 150;
    let tmp = tempfile::tempdir().unwrap();
    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    let no_saves = ["--set", "save_steps=null"];
    ok(&quickstart(&whole, STEPS, &no_saves));

    let (mut child, _, rest) = start_training(&quickstart_args(&cut, STEPS, &no_saves));
    signal(child.id(), "-INT");
    let status = child.wait().unwrap();
    let err = rest.join().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    let stop = err.lines().find(|l| l.starts_with("stopped by Ctrl-C after step ")).unwrap_or_else(|| panic!("no stop message:\n{err}"));
    let step: usize = stop["stopped by Ctrl-C after step ".len()..].split(':').next().unwrap().parse().unwrap();
    assert!(step < STEPS, "{stop}");
    let ckpt = cut.join(format!("checkpoint-{step}"));
    assert!(
        stop.contains(&format!("adapter saved in {}, checkpoint in {}", cut.display(), ckpt.display())),
        "{stop}"
    );
    assert!(err.contains("--set resume_from_checkpoint=true"), "{err}");
    assert!(cut.join("adapter_model.safetensors").is_file() && ckpt.join("trainer_state.json").is_file());

    let err = ok(&quickstart(&cut, STEPS, &["--set", "save_steps=null", "--set", "resume_from_checkpoint=true"]));
    assert!(err.contains(&format!("resumed from {} at step {step}", ckpt.display())), "{err}");
    assert_eq!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(cut.join("adapter_model.safetensors")).unwrap(),
        "the interrupted and resumed run must end with the uninterrupted run's adapter"
    );
    assert_eq!(logged_steps(&cut), (1..=STEPS as u64).collect::<Vec<_>>());
}

#[test]
fn a_second_signal_ends_the_run_at_once() {
    // Steps of a second or so (320 rows, one per micro-batch), so the second
    // signal lands while the first step after the first signal still runs.
    let tmp = tempfile::tempdir().unwrap();
    let rows = std::fs::read_to_string(repo().join("examples/quickstart/data.jsonl")).unwrap();
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, rows.repeat(10)).unwrap();
    let out = tmp.path().join("run");
    let args = quickstart_args(&out, 50, &[
        "--set", &format!("datasets.0.path={}", data.display()), "--set", "sample_packing=false", "--set", "micro_batch_size=1",
        "--set", "gradient_accumulation_steps=320", "--set", "save_steps=null",
    ]);
    let (mut child, _, rest) = start_training(&args);
    signal(child.id(), "-TERM");
    std::thread::sleep(std::time::Duration::from_millis(50));
    signal(child.id(), "-TERM");
    let status = child.wait().unwrap();
    let err = rest.join().unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(!err.contains("stopped by"), "the second signal should not wait for the step:\n{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn the_quickstart_as_written_creates_its_output_dir_and_parents() {
    // A fresh clone: examples/quickstart but no outputs/ folder yet.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("examples/quickstart");
    std::fs::create_dir_all(copy.join("model")).unwrap();
    for f in ["quickstart.yml", "data.jsonl"] {
        std::fs::copy(repo().join("examples/quickstart").join(f), copy.join(f)).unwrap();
    }
    for e in std::fs::read_dir(repo().join("examples/quickstart/model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join("model").join(e.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", "examples/quickstart/quickstart.yml", "--device", "cpu", "--set", "max_steps=1"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = ok(&out);
    assert!(err.contains("done: 1 steps"), "{err}");
    assert!(tmp.path().join("outputs/quickstart/adapter_model.safetensors").is_file(), "{err}");

    // Any depth of missing folders, given as an absolute path.
    let deep = tmp.path().join("a/b/c");
    ok(&quickstart(&deep, 1, &[]));
    assert!(deep.join("adapter_model.safetensors").is_file() && deep.join("checkpoint-1").is_dir());
}

#[test]
fn output_dir_that_is_a_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("run");
    std::fs::write(&file, "x").unwrap();
    let err = refused(&quickstart(&file, 1, &[]));
    assert!(err.contains(&format!("output_dir {} is a file; give a folder for the adapter and checkpoints", file.display())), "{err}");
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.starts_with("checkpoint-")).collect();
    names.sort();
    names
}

#[test]
fn a_refused_resume_from_an_earlier_checkpoint_keeps_the_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&quickstart(&out, 3, &[]));
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let first = out.join("checkpoint-1");
    let err = refused(&quickstart(&out, 3, &["--set", &format!("resume_from_checkpoint={}", first.display()), "--set", "learning_rate=0.001"]));
    assert!(err.contains("cannot resume from") && err.contains("learning_rate (checkpoint: 0.005, now: 0.001)"), "{err}");
    assert_eq!(checkpoints(&out), ["checkpoint-1", "checkpoint-2", "checkpoint-3"]);
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics_before);
}

#[test]
fn a_checkpoint_saved_before_the_adapter_keys_were_fingerprinted_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&quickstart(&out, 1, &[]));
    // trainer_state.json as an earlier ferrotune wrote it: no adapter keys.
    let state_file = out.join("checkpoint-1/trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    let mut fp: serde_json::Value = serde_json::from_str(state["fingerprint"].as_str().unwrap()).unwrap();
    for k in ["lora_target_modules", "peft_use_rslora", "rank_pattern", "alpha_pattern"] {
        assert!(fp.as_object_mut().unwrap().remove(k).is_some(), "{k} is fingerprinted today");
    }
    state["fingerprint"] = serde_json::Value::String(fp.to_string());
    std::fs::write(&state_file, state.to_string()).unwrap();

    let err = ok(&quickstart(&out, 2, &["--set", "resume_from_checkpoint=true"]));
    assert!(err.contains("resumed from") && err.contains("done: 2 steps"), "{err}");
}

#[test]
fn resume_from_another_folder_into_a_folder_holding_a_run_says_what_is_in_the_way() {
    let tmp = tempfile::tempdir().unwrap();
    let (from, into) = (tmp.path().join("from"), tmp.path().join("into"));
    ok(&quickstart(&from, 1, &[]));
    ok(&quickstart(&into, 1, &[]));
    let ckpt = from.join("checkpoint-1");
    let err = refused(&quickstart(&into, 2, &["--set", &format!("resume_from_checkpoint={}", ckpt.display())]));
    assert!(
        err.contains(&format!(
            "resume_from_checkpoint: {} is not a checkpoint of output_dir {}, which holds another run (",
            ckpt.display(),
            into.display()
        )),
        "{err}"
    );
    assert!(err.contains("choose a new or empty output_dir for the resumed run") && !err.contains("no checkpoint to resume"), "{err}");
    // Into an empty folder it resumes.
    let err = ok(&quickstart(&tmp.path().join("fresh"), 2, &["--set", &format!("resume_from_checkpoint={}", ckpt.display())]));
    assert!(err.contains(&format!("resumed from {} at step 1", ckpt.display())), "{err}");
}
