//! Models, adapters and datasets named by Hub ids, end to end: `generate`,
//! `preprocess` and `train` fetch them on demand from the mock Hub
//! (tests/common/mock_hub.rs) and give what the same command gives on the
//! local files (the reference), fetching only what they read: a sharded
//! model without its decoy copies (pickles, GGUF, consolidated weights,
//! `original/`), then the same model offline; a tokenizer.json-only repo; a
//! LoRA adapter repo; a run config with a tagged base model and a dataset
//! repo's splits and README configs; a gated model without a token.

use crate::hub_cli::{Run, Sandbox, assert_phrases, run, snapshot_files};
use crate::mock_hub::{Access, MockFile, MockHub, MockRepo, commit_sha, sha256_hex};
use std::path::{Path, PathBuf};

/// The shipped tiny model (2 layers, vocabulary 505).
fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart/model")
}

fn hub_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub_data").join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The quickstart model's small files, as regular (non-LFS) repo files.
fn small_files(skip: &[&str]) -> Vec<MockFile> {
    ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
        .iter()
        .filter(|f| !skip.contains(f))
        .map(|f| MockFile::regular(f, read(&quickstart().join(f))))
        .collect()
}

/// The quickstart model as it ships: one LFS model.safetensors.
fn plain_model_files() -> Vec<MockFile> {
    let mut files = small_files(&[]);
    files.push(MockFile::lfs("model.safetensors", read(&quickstart().join("model.safetensors"))));
    files
}

const SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];

/// The files of a repo that carries more than ferrotune reads: never to be
/// requested when the model is fetched.
const DECOYS: [&str; 4] = ["pytorch_model.bin", "model.Q4_K_M.gguf", "consolidated.safetensors", "original/params.json"];

/// model.safetensors split into two shards (tensors in name order, the
/// first half in shard 1) and the index naming them.
fn sharded_weights() -> Vec<MockFile> {
    let bytes = read(&quickstart().join("model.safetensors"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    let half = names.len() / 2;
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (shard, part) in SHARDS.iter().zip([&names[..half], &names[half..]]) {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        for (n, v) in &views {
            total += v.data().len();
            weight_map.insert(n.clone(), serde_json::Value::from(*shard));
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        files.push(MockFile::lfs(shard, safetensors::serialize(views, Some(meta)).unwrap()));
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    files.push(MockFile::regular("model.safetensors.index.json", serde_json::to_vec_pretty(&index).unwrap()));
    files
}

/// The sharded model repo with its decoys: a pickle, a GGUF file, the
/// unsharded weights under another name, and Meta's original/ folder.
fn sharded_repo(id: &str) -> MockRepo {
    let mut files = small_files(&[]);
    files.extend(sharded_weights());
    files.push(MockFile::lfs("pytorch_model.bin", b"PK\x03\x04 not read".to_vec()));
    files.push(MockFile::lfs("model.Q4_K_M.gguf", b"GGUF\x03\x00\x00\x00 not read".to_vec()));
    files.push(MockFile::lfs("consolidated.safetensors", read(&quickstart().join("model.safetensors"))));
    files.push(MockFile::regular("original/params.json", "{\"dim\": 128}\n"));
    files.push(MockFile::regular("README.md", "# tiny\n"));
    MockRepo::model(id, files)
}

/// `ferrotune ARGS` in the sandbox, run from its own folder (so `org/name`
/// is no local path), with extra variables.
fn ferrotune(sb: &Sandbox, args: &[&str], vars: &[(&str, &str)]) -> Run {
    let mut c = sb.cmd(args);
    c.current_dir(sb.tmp.path()).env("NO_COLOR", "1");
    for (k, v) in vars {
        c.env(k, v);
    }
    run(c)
}

/// Greedy generation of 4 tokens after "hi" on the CPU; the text printed.
fn generate(sb: &Sandbox, model: &str, adapter: Option<&str>, vars: &[(&str, &str)]) -> Run {
    let mut args = vec!["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"];
    if let Some(a) = adapter {
        args.extend(["--adapter", a]);
    }
    let r = ferrotune(sb, &args, vars);
    assert!(r.status.success(), "generate --model {model} --adapter {adapter:?} failed: {}", r.stderr);
    assert!(!r.stdout.trim().is_empty(), "no text generated: {}", r.stderr);
    r
}

/// Every request the mock saw for a repo file (HEAD or GET of its resolve
/// URL), and the CDN requests for the sha256 of its bytes.
fn requests_for(hub: &MockHub, repo: &MockRepo, file: &MockFile) -> Vec<String> {
    let resolve = format!("{}/resolve/", repo.id);
    let cdn = format!("/cdn/{}", sha256_hex(&file.bytes));
    hub.requests()
        .iter()
        .filter(|r| {
            let p = r.path();
            (p.contains(&resolve) && p.ends_with(&format!("/{}", file.path))) || (file.lfs && p == cdn)
        })
        .map(|r| format!("{} {}", r.method, r.target))
        .collect()
}

/// A path as a YAML string.
fn yaml_path(p: &Path) -> String {
    serde_json::to_string(&p.display().to_string()).unwrap()
}

/// Writes the run config `name` into the sandbox and returns its path.
fn write_config(sb: &Sandbox, name: &str, text: &str) -> String {
    let path = sb.tmp.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// A sharded model repo through `generate`: the text of the same command
/// on the local (unsharded) folder; only the index's shards and the small
/// files requested, no decoy; then the same offline with no socket opened.
#[test]
fn generate_fetches_a_sharded_model_without_its_decoys_and_runs_offline() {
    let repo = sharded_repo("org/tiny");
    let hub = MockHub::start(vec![repo.clone()]);
    let sb = Sandbox::new(&hub.url());
    let want = generate(&sb, &quickstart().display().to_string(), None, &[]);
    assert_eq!(hub.connections(), 0, "a local folder opened a connection");

    let got = generate(&sb, "org/tiny", None, &[]);
    assert_eq!(got.stdout, want.stdout, "the Hub model generates other text than the local folder");
    let snap = sb.repo_dir("models--org--tiny").join("snapshots").join(repo.commit_of("main"));
    assert!(got.stderr.contains(&format!("model: {} (llama)", snap.display())), "{}", got.stderr);
    let mut expected: Vec<&str> = vec!["README.md", "chat_template.jinja", "config.json", "generation_config.json"];
    expected.extend(SHARDS);
    expected.extend(["model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]);
    assert_eq!(snapshot_files(&snap), expected);
    for decoy in DECOYS {
        let file = repo.file("main", decoy);
        let seen = requests_for(&hub, &repo, file);
        assert!(seen.is_empty(), "{decoy} must not be requested: {seen:?}");
    }
    let config = requests_for(&hub, &repo, repo.file("main", "config.json"));
    assert!(config.iter().any(|r| r.starts_with("GET /org/tiny/resolve/")), "{config:?}");
    for shard in SHARDS {
        let file = repo.file("main", shard);
        assert!(requests_for(&hub, &repo, file).iter().any(|r| r.starts_with("GET /cdn/")), "{shard} was not downloaded");
    }

    let before = hub.connections();
    let offline = generate(&sb, "org/tiny", None, &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(offline.stdout, want.stdout);
    assert_eq!(hub.connections(), before, "HF_HUB_OFFLINE=1 opened a connection");
}

/// A repo with tokenizer.json and no tokenizer_config.json generates what
/// a local folder with the same files generates.
#[test]
fn a_repo_with_only_tokenizer_json_generates_as_the_local_folder() {
    let mut files = small_files(&["tokenizer_config.json"]);
    files.push(MockFile::lfs("model.safetensors", read(&quickstart().join("model.safetensors"))));
    let hub = MockHub::start(vec![MockRepo::model("org/tok-only", files.clone())]);
    let sb = Sandbox::new(&hub.url());
    let local = sb.tmp.path().join("tok-only");
    std::fs::create_dir(&local).unwrap();
    for f in &files {
        std::fs::write(local.join(&f.path), &f.bytes).unwrap();
    }
    let want = generate(&sb, &local.display().to_string(), None, &[]);
    let got = generate(&sb, "org/tok-only", None, &[]);
    assert_eq!(got.stdout, want.stdout);
    let repo = MockRepo::model("org/tok-only", Vec::new());
    let snap = sb.repo_dir("models--org--tok-only").join("snapshots").join(repo.commit_of("main"));
    assert!(!snap.join("tokenizer_config.json").exists());
    assert!(snapshot_files(&snap).contains(&"tokenizer.json".to_string()));
}

/// A LoRA adapter (trained for 2 steps here, on the local model) served as
/// a repo of its own: `--model org/tiny --adapter org/tiny-lora` generates
/// the text of the local model and adapter folders, which the adapter
/// changes; the adapter repo's training leftovers are not fetched.
#[test]
fn generate_with_an_adapter_repo_equals_the_local_adapter() {
    let hub = MockHub::start(Vec::new());
    let sb = Sandbox::new(&hub.url());
    let out = sb.tmp.path().join("lora");
    let cfg = format!(
        "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\nchat_template: tokenizer_default\nadapter: lora\n\
         lora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nsequence_len: 128\nmicro_batch_size: 2\nmax_steps: 2\n\
         learning_rate: 0.05\nval_set_size: 0\nseed: 1\ndevice: cpu\noutput_dir: {}\n",
        yaml_path(&quickstart()),
        yaml_path(&quickstart().join("../data.jsonl")),
        yaml_path(&out)
    );
    let cfg = write_config(&sb, "lora.yml", &cfg);
    let trained = ferrotune(&sb, &["train", &cfg], &[]);
    assert!(trained.status.success(), "train: {}", trained.stderr);

    let adapter = MockRepo::model(
        "org/tiny-lora",
        vec![
            MockFile::regular("adapter_config.json", read(&out.join("adapter_config.json"))),
            MockFile::lfs("adapter_model.safetensors", read(&out.join("adapter_model.safetensors"))),
            MockFile::regular("README.md", "# tiny-lora\n"),
            MockFile::lfs("optimizer.pt", b"PK\x03\x04 not read".to_vec()),
            MockFile::lfs("training_args.bin", b"PK\x03\x04 not read".to_vec()),
        ],
    );
    hub.with_repos(|r| r.extend([MockRepo::model("org/tiny", plain_model_files()), adapter.clone()]));

    let base = generate(&sb, &quickstart().display().to_string(), None, &[]);
    let want = generate(&sb, &quickstart().display().to_string(), Some(&out.display().to_string()), &[]);
    assert_ne!(want.stdout, base.stdout, "the trained adapter changes nothing: the comparison would prove nothing");
    let got = generate(&sb, "org/tiny", Some("org/tiny-lora"), &[]);
    assert_eq!(got.stdout, want.stdout, "the Hub adapter generates other text than the local one");
    let modules = |r: &Run| r.stderr.lines().find(|l| l.starts_with("adapter: ")).map(|l| l.rsplit('(').next().unwrap().to_string());
    assert_eq!(modules(&got), modules(&want), "{}", got.stderr);
    let snap = sb.repo_dir("models--org--tiny-lora").join("snapshots").join(adapter.commit_of("main"));
    assert_eq!(snapshot_files(&snap), ["README.md", "adapter_config.json", "adapter_model.safetensors"]);
    for leftover in ["optimizer.pt", "training_args.bin"] {
        let seen = requests_for(&hub, &adapter, adapter.file("main", leftover));
        assert!(seen.is_empty(), "{leftover} must not be requested: {seen:?}");
    }
}

/// `org/tiny` whose `main` holds no model (only a README) and whose tag
/// `v1` is the quickstart model: a run must follow revision_of_model.
fn tagged_model_repo() -> MockRepo {
    let (bad, good) = (commit_sha("org/tiny@readme-only"), commit_sha("org/tiny@v1"));
    MockRepo {
        refs: vec![("main".to_string(), bad.clone()), ("v1".to_string(), good.clone())],
        commits: vec![(bad, vec![MockFile::regular("README.md", "# moved to v1\n")]), (good, plain_model_files())],
        ..MockRepo::model("org/tiny", Vec::new())
    }
}

const TRAIN_SHARD: &str = "data/train-00000-of-00001.parquet";
const TEST_SHARD: &str = "data/test-00000-of-00001.parquet";

/// A parquet chat dataset in the Hub's shard layout: the train split is
/// chat.parquet, the test split its Zstandard twin (other bytes).
fn chat_dataset() -> MockRepo {
    MockRepo::dataset(
        "org/chat-data",
        vec![
            MockFile::regular(".gitattributes", "*.parquet filter=lfs diff=lfs merge=lfs -text\n"),
            MockFile::regular("README.md", "# chat data\n"),
            MockFile::lfs(TRAIN_SHARD, read(&hub_data("chat.parquet"))),
            MockFile::lfs(TEST_SHARD, read(&hub_data("chat_zstd.parquet"))),
        ],
    )
}

/// A dataset whose README lists two configs, each one JSON Lines chat file.
fn configs_dataset() -> MockRepo {
    let readme = "---\nconfigs:\n- config_name: short\n  data_files:\n  - split: train\n    path: short/*.jsonl\n\
                  - config_name: long\n  data_files:\n  - split: train\n    path: long/*.jsonl\n---\n# two configs\n";
    MockRepo::dataset(
        "org/chat-configs",
        vec![
            MockFile::regular("README.md", readme),
            MockFile::lfs("short/chat.jsonl", read(&hub_data("chat.jsonl"))),
            MockFile::lfs("long/quickstart.jsonl", read(&quickstart().join("../data.jsonl"))),
        ],
    )
}

/// A run config over the tiny model: `model` lines, then `data` (the
/// datasets: / test_datasets: lists).
fn run_config(model: &str, prepared: &Path, data: &str) -> String {
    format!(
        "{model}adapter: lora\nlearning_rate: 0.001\nsequence_len: 512\nchat_template: chatml\nshuffle_merged_datasets: false\n\
         val_set_size: 0\ndataset_prepared_path: {}\n{data}",
        yaml_path(prepared)
    )
}

fn hub_model() -> &'static str {
    "base_model: org/tiny\nrevision_of_model: v1\n"
}

fn local_model() -> String {
    format!("base_model: {}\n", yaml_path(&quickstart()))
}

/// `ferrotune preprocess CFG --show 3 --ids` (must succeed): its stdout.
fn preprocess(sb: &Sandbox, name: &str, text: &str) -> String {
    let cfg = write_config(sb, name, text);
    let r = ferrotune(sb, &["preprocess", &cfg, "--show", "3", "--ids"], &[]);
    assert!(r.status.success(), "preprocess {name}: {}", r.stderr);
    r.stdout
}

/// `ferrotune preprocess CFG` that must fail: its one error line.
fn preprocess_error(sb: &Sandbox, name: &str, text: &str) -> String {
    let cfg = write_config(sb, name, text);
    ferrotune(sb, &["preprocess", &cfg], &[]).error()
}

/// base_model at a tag and a Hub dataset's train split: preprocess shows
/// what it shows for the local parquet file (the train split's rows only,
/// the test split never requested); then `train` for one step on the same.
#[test]
fn preprocess_and_train_read_a_tagged_model_and_a_datasets_train_split() {
    let (model, data) = (tagged_model_repo(), chat_dataset());
    let hub = MockHub::start(vec![model.clone(), data.clone()]);
    let sb = Sandbox::new(&hub.url());
    let entry = |path: &str| format!("datasets:\n  - path: {path}\n    type: chat_template\n    split: train\n");
    let local_entry = format!("datasets:\n  - path: {}\n    type: chat_template\n", yaml_path(&hub_data("chat.parquet")));
    let want = preprocess(&sb, "local.yml", &run_config(&local_model(), &sb.tmp.path().join("p0"), &local_entry));
    let got = preprocess(&sb, "hub.yml", &run_config(hub_model(), &sb.tmp.path().join("p1"), &entry("org/chat-data")));

    let snap = sb.repo_dir("datasets--org--chat-data").join("snapshots").join(data.commit_of("main"));
    let local_file = hub_data("chat.parquet").display().to_string();
    assert!(want.contains(&format!("{local_file} [chat_template, train]: 3 rows -> 3 sequences")), "{want}");
    assert!(got.contains("dataset org/chat-data [chat_template, train]: 3 rows -> 3 sequences"), "{got}");
    assert!(got.contains("\nvalidation: 0 sequences\n"), "{got}");
    // The same text, but for the name of the dataset and its cache folder.
    let (got, want) = (got.replace("org/chat-data", "DATA"), want.replace(&local_file, "DATA"));
    let p = |d: &str| sb.tmp.path().join(d).display().to_string();
    assert_eq!(got.replace(&p("p1"), "PREPARED"), want.replace(&p("p0"), "PREPARED"));

    assert!(requests_for(&hub, &data, data.file("main", TEST_SHARD)).is_empty(), "the test split was requested");
    assert!(!snap.join(TEST_SHARD).exists());
    assert!(hub.requests().iter().any(|r| r.target == "/api/models/org/tiny/revision/v1"), "{:?}", hub.requests());
    let refs = sb.repo_dir("models--org--tiny").join("refs");
    assert_eq!(read(&refs.join("v1")), model.commit_of("v1").as_bytes());
    assert!(!refs.join("main").exists(), "main was resolved though revision_of_model is v1");

    // train, offline now: the model and the split come from the cache.
    let out = sb.tmp.path().join("out");
    let text = format!(
        "{}max_steps: 1\nmicro_batch_size: 1\ndevice: cpu\noutput_dir: {}\n",
        run_config(hub_model(), &sb.tmp.path().join("p2"), &entry("org/chat-data")),
        yaml_path(&out)
    );
    let cfg = write_config(&sb, "train.yml", &text);
    let before = hub.connections();
    let r = ferrotune(&sb, &["train", &cfg], &[("HF_HUB_OFFLINE", "1")]);
    assert!(r.status.success(), "train: {}", r.stderr);
    assert!(out.join("adapter_model.safetensors").is_file(), "{}", r.stderr);
    assert_eq!(hub.connections(), before);
}

/// A split the repo lacks is one error listing its splits; test_datasets
/// read the test split by default.
#[test]
fn dataset_splits_missing_and_test_datasets_default() {
    let data = chat_dataset();
    let hub = MockHub::start(vec![tagged_model_repo(), data.clone()]);
    let sb = Sandbox::new(&hub.url());
    let prepared = sb.tmp.path().join("prepared");
    let e = preprocess_error(
        &sb,
        "validation.yml",
        &run_config(hub_model(), &prepared, "datasets:\n  - path: org/chat-data\n    type: chat_template\n    split: validation\n"),
    );
    assert_phrases(&e, &["org/chat-data", "no split \"validation\"", "it has: train, test"]);

    let both = "datasets:\n  - path: org/chat-data\n    type: chat_template\n\
                test_datasets:\n  - path: org/chat-data\n    type: chat_template\n";
    let got = preprocess(&sb, "both.yml", &run_config(hub_model(), &prepared, both));
    assert!(got.contains("\nrows: 6 read,"), "{got}");
    assert!(got.contains("\ntrain: 3 sequences,") && got.contains("\nvalidation: 3 sequences,"), "{got}");
    assert_eq!(got.matches("[chat_template, train]: 3 rows -> 3 sequences").count(), 1, "{got}");
    assert_eq!(got.matches("[chat_template, test]: 3 rows -> 3 sequences").count(), 1, "{got}");
    for shard in [TRAIN_SHARD, TEST_SHARD] {
        let seen = requests_for(&hub, &data, data.file("main", shard));
        assert!(seen.iter().any(|r| r.starts_with("GET /cdn/")), "{shard} was not downloaded: {seen:?}");
    }
}

/// Of a README's two configs, `name:` picks one (only its file fetched);
/// without a name and no default, one error naming both.
#[test]
fn a_readme_config_is_picked_by_name() {
    let data = configs_dataset();
    let hub = MockHub::start(vec![tagged_model_repo(), data.clone()]);
    let sb = Sandbox::new(&hub.url());
    let entry = |name: &str| format!("datasets:\n  - path: org/chat-configs\n    type: chat_template\n{name}");
    let e = preprocess_error(&sb, "none.yml", &run_config(hub_model(), &sb.tmp.path().join("p0"), &entry("")));
    assert_phrases(&e, &["org/chat-configs", "several configs (short, long)", "set name:"]);

    let long = preprocess(&sb, "long.yml", &run_config(hub_model(), &sb.tmp.path().join("p1"), &entry("    name: long\n")));
    assert!(long.contains("[chat_template, train]: 32 rows -> 32 sequences"), "{long}");
    assert!(requests_for(&hub, &data, data.file("main", "short/chat.jsonl")).is_empty(), "config short was fetched for long");
    let short = preprocess(&sb, "short.yml", &run_config(hub_model(), &sb.tmp.path().join("p2"), &entry("    name: short\n")));
    assert!(short.contains("[chat_template, train]: 3 rows -> 3 sequences"), "{short}");
}

/// `train` on a gated model without a token: one line naming the repo and
/// HF_TOKEN; no file of the repo is fetched.
#[test]
fn train_on_a_gated_model_without_a_token_says_to_set_hf_token() {
    let gated = MockRepo { access: Access::Gated { granted: vec!["hf_granted".to_string()] }, ..MockRepo::model("org/gated", plain_model_files()) };
    let hub = MockHub::start(vec![gated]);
    let sb = Sandbox::new(&hub.url());
    let data = format!("datasets:\n  - path: {}\n    type: chat_template\n", yaml_path(&hub_data("chat.jsonl")));
    let text = format!(
        "{}max_steps: 1\ndevice: cpu\noutput_dir: {}\n",
        run_config("base_model: org/gated\n", &sb.tmp.path().join("prepared"), &data),
        yaml_path(&sb.tmp.path().join("out"))
    );
    let cfg = write_config(&sb, "gated.yml", &text);
    let e = ferrotune(&sb, &["train", &cfg], &[]).error();
    assert_phrases(&e, &["org/gated", "is gated", "HF_TOKEN"]);
    assert!(!hub.requests().iter().any(|r| r.is_body_get()), "{:?}", hub.requests());
}
