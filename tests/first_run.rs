//! What a new user gets wrong in a first run gets one clear line: the
//! `ferrotune` binary on bad configs, datasets, checkpoints and flags, each
//! case asserting on the message and on a normal error exit (no panic, no
//! backtrace).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart")
}

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).output().expect("run ferrotune")
}

/// stderr of a run that must fail cleanly: exit code 1, no panic.
fn failure(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "expected a clean error exit:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    err
}

fn success(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

/// A copy of the quickstart model that `edit` may change.
fn model_copy(dir: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(quickstart().join("model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    edit(&m);
    m
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = model.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&path, c.to_string()).unwrap();
}

/// A one-step SFT run on `model` and `data` (chat_template rows) into
/// dir/out, with `--set` overrides.
fn train(dir: &Path, model: &Path, data: &Path, sets: &[&str]) -> Output {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("run.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\nadapter: lora\nlearning_rate: 0.001\n\
             max_steps: 1\nsequence_len: 256\noutput_dir: {}\ndevice: cpu\n",
            model.display(),
            data.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    let mut args = vec!["train".to_string(), cfg.display().to_string()];
    for s in sets {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ferrotune(&args)
}

fn data() -> PathBuf {
    quickstart().join("data.jsonl")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn config_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |text: &str| {
        let p = write(tmp.path(), "c.yml", text.as_bytes());
        failure(&ferrotune(&["train", p.to_str().unwrap()]))
    };
    assert!(cfg("").contains("base_model is required"));
    assert!(cfg("base_model: [unclosed\n").contains("not valid YAML"));
    assert!(cfg("- just\n- a list\n").contains("a run config is a mapping of keys"));
    let e = cfg("base_model: m\ndatasets: []\nlearning_rate: fast\n");
    assert!(e.contains("learning_rate must be a number, not the string \"fast\""), "{e}");
    let e = cfg("base_model: m\nlearning_rate: 0.1\n");
    assert!(e.contains("datasets is required"), "{e}");
    let e = cfg("base_model: m\nlearning_rate: 0.1\ndatasets: []\n");
    assert!(e.contains("datasets is empty"), "{e}");
    let e = cfg("base_model: m\nlearning_rate: 0.1\ndatasets: [{path: d.jsonl}]\nnum_epochs: 1e30\n");
    assert!(e.contains("num_epochs must be at most 1000000 (got 1000000000000000000000000000000); use max_steps for a step count"), "{e}");
    let e = cfg("base_model: m\nlearning_rate: 0.1\ndatasets: [{path: d.jsonl}]\nsequence_len: 18446744073709551615\n");
    assert!(e.contains("sequence_len must be at most 1048576"), "{e}");
}

#[test]
fn output_dir_and_targets_are_checked_before_any_loading() {
    let tmp = tempfile::tempdir().unwrap();
    // A dataset that would fail if it were read: the checks below come first.
    let bad_data = write(tmp.path(), "bad.jsonl", b"{not json\n");
    let model = quickstart().join("model");
    let file = write(tmp.path(), "a-file", b"x");
    let e = failure(&train(tmp.path(), &model, &bad_data, &[&format!("output_dir={}/sub", file.display())]));
    assert!(e.contains(&format!("output_dir {}/sub cannot be created", file.display())), "{e}");

    let e = failure(&train(tmp.path(), &model, &bad_data, &["lora_target_modules=[foo_proj, bar]"]));
    assert!(
        e.contains(
            "lora_target_modules foo_proj, bar match no module of this model; its adapted modules are \
             q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (full paths look like model.layers.0.self_attn.q_proj)"
        ),
        "{e}"
    );
}

#[test]
fn dataset_mistakes_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = quickstart().join("model");
    let case = |name: &str, bytes: &[u8], sets: &[&str]| {
        let p = write(tmp.path(), name, bytes);
        (p.display().to_string(), failure(&train(tmp.path(), &model, &p, sets)))
    };
    let (p, e) = case("empty.jsonl", b"\n", &[]);
    assert!(e.contains(&format!("{p}: the dataset file has no rows")), "{e}");
    let (p, e) = case("broken.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\n{\"messages\": [}\n", &[]);
    assert!(e.contains(&format!("{p}:3: malformed JSON")), "{e}");
    let (p, e) = case("fields.jsonl", b"{\"msgs\": []}\n", &[]);
    assert!(e.contains(&format!("{p}:1: missing \"messages\"")), "{e}");
    let (p, e) = case("nulls.jsonl", b"{\"messages\": null}\n", &[]);
    assert!(e.contains(&format!("{p}:1: \"messages\" must be a list of messages, found null")), "{e}");
    let (p, e) = case("latin1.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xe9\"}]}\n", &[]);
    assert!(e.contains(&format!("{p}:2: the file is not valid UTF-8")), "{e}");
    let first = std::fs::read_to_string(data()).unwrap().lines().next().unwrap().to_string();
    let (p, e) = case("long.jsonl", first.as_bytes(), &["sequence_len=8"]);
    assert!(e.contains(&format!("{p}: every one of its 1 rows is longer than sequence_len 8")), "{e}");
}

#[test]
fn a_byte_order_mark_and_json_lines_in_a_json_file_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let model = quickstart().join("model");
    let rows = std::fs::read_to_string(data()).unwrap();
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(rows.as_bytes());
    let with_bom = write(tmp.path(), "bom.jsonl", &bom);
    let e = success(&train(&tmp.path().join("bom"), &model, &with_bom, &[]));
    assert!(e.contains("32 rows -> 32 sequences"), "{e}");
    let as_json = write(tmp.path(), "rows.json", rows.as_bytes());
    let e = success(&train(&tmp.path().join("json"), &model, &as_json, &[]));
    assert!(e.contains("32 rows -> 32 sequences"), "{e}");
}

#[test]
fn checkpoint_mistakes_name_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let eval = |model: &Path| {
        failure(&ferrotune(&[
            "eval", "--model", model.to_str().unwrap(), "--data", data().to_str().unwrap(), "--type", "chat_template",
            "--device", "cpu",
        ]))
    };
    let as_file = quickstart().join("model/model.safetensors");
    let e = eval(&as_file);
    assert!(e.contains(&format!("model {} is a file; give the model's folder", as_file.display())), "{e}");

    let m = model_copy(&tmp.path().join("layers"), |m| edit_config(m, |c| c["num_hidden_layers"] = 0.into()));
    let e = eval(&m);
    assert!(e.contains("config.json: \"num_hidden_layers\" is 0; a model needs at least 1"), "{e}");

    let m = model_copy(&tmp.path().join("theta"), |m| edit_config(m, |c| c["rope_parameters"]["rope_theta"] = 0.0.into()));
    let e = eval(&m);
    assert!(e.contains("config.json: \"rope_theta\" is 0; the rotary base must be a positive number"), "{e}");

    let m = model_copy(&tmp.path().join("trunc"), |m| {
        let bytes = std::fs::read(m.join("model.safetensors")).unwrap();
        std::fs::write(m.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    });
    let e = eval(&m);
    assert!(e.contains("model.safetensors is not a valid safetensors file"), "{e}");

    let m = model_copy(&tmp.path().join("tok"), |m| std::fs::write(m.join("tokenizer.json"), "{\"version\": ").unwrap());
    let e = eval(&m);
    assert!(e.contains("cannot load tokenizer") && e.contains("tokenizer.json"), "{e}");
}

#[test]
fn nan_in_the_base_weights_is_traced_to_its_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_copy(tmp.path(), |m| {
        let path = m.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let name = "model.layers.1.mlp.down_proj.weight";
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> =
            st.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
        let (_, _, d) = owned.iter_mut().find(|(n, _, _)| n == name).unwrap();
        d[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let views: Vec<_> = owned
            .iter()
            .map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap()))
            .collect();
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    });
    let e = failure(&train(tmp.path(), &m, &data(), &[]));
    assert!(e.contains("training diverged"), "{e}");
    assert!(
        e.contains("cause: the base model's tensor model.layers.1.mlp.down_proj.weight in") && e.contains("holds 1 NaN or infinite value(s)"),
        "{e}"
    );
}

#[test]
fn generate_flags_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let model = quickstart().join("model");
    let m = model.to_str().unwrap();
    let out = ferrotune(&["generate", "--model", m, "--prompt", "hi", "--temperature", "0", "--max-new-tokens", "18446744073709551615", "--device", "cpu"]);
    let e = success(&out);
    assert!(
        e.contains("note: --max-new-tokens 18446744073709551615 is more than the context leaves after the")
            && e.contains("(max_position_embeddings 512)"),
        "{e}"
    );
    // Flag values are refused by the argument parser: exit code 2, as for any usage error.
    let out = ferrotune(&["generate", "--model", m, "--prompt", "hi", "--max-new-tokens", "0"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(e.contains("invalid value '0' for '--max-new-tokens <MAX_NEW_TOKENS>': must be at least 1"), "{e}");

    let bare = model_copy(tmp.path(), |m| std::fs::remove_file(m.join("chat_template.jinja")).unwrap());
    let e = failure(&ferrotune(&["generate", "--model", bare.to_str().unwrap(), "--chat", "--prompt", "hi", "--device", "cpu"]));
    assert!(e.contains("has no chat_template of its own") && e.contains("pass --chat-template chatml"), "{e}");
}

#[test]
fn sequence_len_past_the_models_context_is_told() {
    let tmp = tempfile::tempdir().unwrap();
    let e = success(&train(tmp.path(), &quickstart().join("model"), &data(), &["sequence_len=4096"]));
    assert!(e.contains("warning: sequence_len 4096 is above the model's max_position_embeddings 512"), "{e}");
}

#[test]
fn bench_and_synth_sizes_out_of_range() {
    let tmp = tempfile::tempdir().unwrap();
    let bench = |args: &[&str]| {
        let mut all = vec!["bench", "--preset", "tiny", "--device", "cpu", "--steps", "1"];
        all.extend_from_slice(args);
        failure(&ferrotune(&all))
    };
    assert!(bench(&["--seq-len", "0"]).contains("--seq-len, --micro-batch and --steps must be at least 1"));
    let e = bench(&["--seq-len", "18446744073709551615"]);
    assert!(e.contains("--seq-len must be at most 1048576 (got 18446744073709551615)"), "{e}");
    let e = bench(&["--micro-batch", "100000000000"]);
    assert!(e.contains("--micro-batch must be at most 65536 (got 100000000000)"), "{e}");
    let e = bench(&["--lora-r", "0"]);
    assert!(e.contains("--lora-r must be between 1 and 65536 (got 0)"), "{e}");
    // Within the bounds but far past this machine's memory: refused from the plan.
    let e = bench(&["--micro-batch", "65536", "--seq-len", "1048576"]);
    assert!(e.contains("the benchmark will not fit in host memory: predicted peak"), "{e}");
    let out = tmp.path().join("s");
    let e = failure(&ferrotune(&["synth", "--preset", "tiny", "--layers", "100000000000", "--out", out.to_str().unwrap()]));
    assert!(e.contains("--layers must be at most 1024 (got 100000000000)"), "{e}");
}

#[test]
fn preference_pairs_that_teach_nothing_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = write(
        tmp.path(),
        "pairs.jsonl",
        b"{\"prompt\": \"hi\", \"chosen\": \"Oslo\", \"rejected\": \"Oslo\"}\n{\"prompt\": \"hi\", \"chosen\": \"Oslo\", \"rejected\": \"Paris\"}\n",
    );
    let cfg = write(
        tmp.path(),
        "dpo.yml",
        format!(
            "base_model: {}\nrl: dpo\ndatasets:\n  - path: {}\nadapter: lora\nlearning_rate: 0.001\nmax_steps: 1\n\
             sequence_len: 64\noutput_dir: {}\ndevice: cpu\n",
            quickstart().join("model").display(),
            pairs.display(),
            tmp.path().join("out").display()
        )
        .as_bytes(),
    );
    let e = success(&ferrotune(&["train", cfg.to_str().unwrap()]));
    assert!(e.contains("2 rows -> 2 examples") && e.contains(", 1 with chosen = rejected (they teach nothing"), "{e}");
}
