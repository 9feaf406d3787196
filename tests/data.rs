//! Datasets into token sequences, against transformers: chat templates render
//! byte-identical text and token ids (tests/fixtures/chat_templates/render.json),
//! and every dataset type gives the token ids and labels the Axolotl
//! conventions give (formats.json); both written by
//! tests/fixtures/chat_templates.py. Then the length policy, the cache, the
//! merge/split, and every bad-input error.

use ferrotune::config::{DatasetConfig, RunConfig};
use ferrotune::data::chat_template::{ChatTemplate, Message};
use ferrotune::data::prepare::{self, Prepared};
use ferrotune::data::tokenizer::TextTokenizer;
use ferrotune::model::batch::{IGNORE_INDEX, Sequence};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fixture model's vocabulary (above every tokenizer id in the fixtures).
const VOCAB: usize = 131;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn llama_tok_dir() -> PathBuf {
    fixtures().join("llama/model")
}

fn chat_tok_dir() -> PathBuf {
    fixtures().join("chat_templates/tokenizer")
}

fn read_json(name: &str) -> Value {
    let path = fixtures().join("chat_templates").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn template(name: &str, text: &str, dir: &Path) -> ChatTemplate {
    match name {
        "builtin_chatml" => ChatTemplate::resolve(Some("chatml"), None, dir).unwrap(),
        "builtin_llama3" => ChatTemplate::resolve(Some("llama3"), None, dir).unwrap(),
        _ => ChatTemplate::resolve(Some("jinja"), Some(text), dir).unwrap(),
    }
}

#[test]
fn chat_templates_render_what_transformers_renders() {
    let fx = read_json("render.json");
    let llama = TextTokenizer::load(&llama_tok_dir(), &BTreeMap::new()).unwrap();
    let chat = TextTokenizer::load(&chat_tok_dir(), &BTreeMap::new()).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    let (mut rendered, mut refused) = (0, 0);
    for c in cases {
        let tname = c["template"].as_str().unwrap();
        let cname = c["conversation"].as_str().unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let what = format!("{tname} / {cname} / add_generation_prompt={agp}");
        // Templates render with the llama fixture tokenizer's special tokens, as in the script.
        let t = template(tname, fx["templates"][tname].as_str().unwrap(), &llama_tok_dir());
        let result = t.render(&messages(&fx["conversations"][cname]), agp);
        if let Some(err) = c.get("error") {
            let e = result.expect_err(&what).to_string();
            assert!(e.contains(err.as_str().unwrap()), "{what}: {e}");
            refused += 1;
            continue;
        }
        let text = result.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(text, c["expected"].as_str().unwrap(), "{what}");
        assert_eq!(llama.encode(&text, false).unwrap(), ids(&c["ids_llama"]), "{what}: llama tokenizer ids");
        assert_eq!(chat.encode(&text, false).unwrap(), ids(&c["ids_chat"]), "{what}: chat tokenizer ids");
        rendered += 1;
    }
    // 6 templates x 4 conversations x 2; Mistral refuses the conversation with a system turn.
    assert_eq!((rendered, refused), (46, 2));
}

/// A run config over one JSONL file of `rows`, caching in `dir`.
fn run_config(dir: &Path, name: &str, kind: Option<&str>, rows: &[Value]) -> RunConfig {
    let path = dir.join(format!("{name}.jsonl"));
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    RunConfig {
        datasets: vec![DatasetConfig {
            path: path.display().to_string(),
            kind: kind.map(str::to_string),
            ..Default::default()
        }],
        shuffle_merged_datasets: false,
        dataset_prepared_path: Some(dir.join("cache").display().to_string()),
        ..Default::default()
    }
}

fn expected_sequences(v: &Value) -> Vec<Sequence> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| Sequence {
            input_ids: ids(&s["input_ids"]),
            labels: s["labels"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect(),
        })
        .collect()
}

#[test]
fn every_format_gives_the_reference_ids_and_labels() {
    let fx = read_json("formats.json");
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for c in fx["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let rows = c["rows"].as_array().unwrap();
        let mut cfg = run_config(dir.path(), name, c["type"].as_str(), rows);
        // The case's dataset keys (field_messages, roles_to_train, ...) on top of path and type.
        let mut ds = serde_json::to_value(&cfg.datasets[0]).unwrap();
        for (k, v) in c.get("dataset").and_then(|d| d.as_object()).into_iter().flatten() {
            ds[k] = v.clone();
        }
        cfg.datasets[0] = serde_json::from_value(ds).unwrap();
        cfg.chat_template = c.get("chat_template").and_then(|v| v.as_str()).map(str::to_string);
        cfg.chat_template_jinja = c.get("chat_template_jinja").and_then(|v| v.as_str()).map(str::to_string);
        cfg.train_on_inputs = c.get("train_on_inputs").and_then(|v| v.as_bool()).unwrap_or(false);
        if let Some(n) = c.get("sequence_len").and_then(|v| v.as_u64()) {
            cfg.sequence_len = n as usize;
        }
        if let Some(st) = c.get("special_tokens") {
            cfg.special_tokens = serde_json::from_value(st.clone()).unwrap();
        }
        let tok_dir = if c["tokenizer"] == "chat" { chat_tok_dir() } else { llama_tok_dir() };
        let p = prepare::prepare(&cfg, &tok_dir, VOCAB).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want = expected_sequences(&c["expected"]);
        assert_eq!(p.train.len(), want.len(), "{name}: sequence count");
        for (i, (got, want)) in p.train.iter().zip(&want).enumerate() {
            assert_eq!(got.input_ids, want.input_ids, "{name}: sequence {i} ids");
            assert_eq!(got.labels, want.labels, "{name}: sequence {i} labels");
        }
        // No case is trivially all-masked or all-labelled unless it says so.
        let labelled: usize = p.train.iter().map(|s| s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()).sum();
        assert!(labelled > 0, "{name}: nothing labelled");
        names.push(name.to_string());
    }
    assert_eq!(names.len(), 13, "{names:?}");
}

fn alpaca_rows() -> Vec<Value> {
    vec![
        json!({"instruction": "Say a.", "output": "a"}),
        json!({"instruction": "Write the longest answer you can.", "input": "x", "output": "The lazy fox writes a tiny test, and the dog learns fast!"}),
        json!({"instruction": "Say b.", "input": null, "output": "b"}),
    ]
}

#[test]
fn long_rows_are_dropped_or_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = run_config(dir.path(), "alpaca", Some("alpaca"), &alpaca_rows());
    let full = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    let lens: Vec<usize> = full.train.iter().map(|s| s.input_ids.len()).collect();
    assert!(lens[1] > lens[0] + 10 && lens[1] > lens[2] + 10, "{lens:?}");
    cfg.sequence_len = lens[0].max(lens[2]);

    let dropped = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    assert_eq!((dropped.report[0].rows, dropped.report[0].dropped, dropped.report[0].truncated), (3, 1, 0));
    assert_eq!(dropped.train, vec![full.train[0].clone(), full.train[2].clone()]);
    assert_eq!(dropped.report[0].tokens, lens[0] + lens[2]);

    cfg.excess_length_strategy = "truncate".into();
    let cut = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    assert_eq!((cut.report[0].dropped, cut.report[0].truncated), (0, 1));
    let n = cfg.sequence_len;
    assert_eq!(cut.train[1].input_ids, full.train[1].input_ids[..n]);
    assert_eq!(cut.train[1].labels, full.train[1].labels[..n]);
    let line = cut.to_string();
    assert!(line.contains("3 rows -> 3 sequences") && line.contains("1 truncated"), "{line}");

    cfg.sequence_len = 3;
    cfg.excess_length_strategy = "drop".into();
    let e = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap_err();
    assert!(format!("{e:#}").contains("every one of its 3 rows is longer than sequence_len 3"), "{e:#}");
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("cache")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn second_prepare_comes_from_the_cache_and_a_damaged_cache_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let chat_rows = vec![
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ];
    let mut cfg = run_config(dir.path(), "alpaca", Some("alpaca"), &alpaca_rows());
    let chat = run_config(dir.path(), "chat", Some("chat_template"), &chat_rows);
    cfg.datasets.push(chat.datasets[0].clone());
    cfg.chat_template = Some("chatml".into());

    let first = prepare::prepare(&cfg, &chat_tok_dir(), VOCAB).unwrap();
    assert!(first.report.iter().all(|r| !r.from_cache));
    assert_eq!(cache_files(dir.path()).len(), 2);
    let second = prepare::prepare(&cfg, &chat_tok_dir(), VOCAB).unwrap();
    assert!(second.report.iter().all(|r| r.from_cache), "{second}");
    assert_eq!((&second.train, &second.val), (&first.train, &first.val));
    assert!(second.to_string().contains("(cached)"));

    // Damage both entries: one cut short, one with a flipped byte.
    let files = cache_files(dir.path());
    let bytes = std::fs::read(&files[0]).unwrap();
    std::fs::write(&files[0], &bytes[..bytes.len() / 2]).unwrap();
    let mut bytes = std::fs::read(&files[1]).unwrap();
    bytes[60] ^= 1;
    std::fs::write(&files[1], &bytes).unwrap();
    let rebuilt = prepare::prepare(&cfg, &chat_tok_dir(), VOCAB).unwrap();
    assert!(rebuilt.report.iter().all(|r| !r.from_cache));
    assert_eq!(rebuilt.train, first.train);
    let again = prepare::prepare(&cfg, &chat_tok_dir(), VOCAB).unwrap();
    assert!(again.report.iter().all(|r| r.from_cache));

    // A setting that changes the sequences misses the cache.
    cfg.train_on_inputs = true;
    let other = prepare::prepare(&cfg, &chat_tok_dir(), VOCAB).unwrap();
    assert!(other.report.iter().all(|r| !r.from_cache));
    assert_ne!(other.train, first.train);
    assert_eq!(cache_files(dir.path()).len(), 4);
}

fn pretokenized_rows(n: u32) -> Vec<Value> {
    (0..n).map(|i| json!({"input_ids": [1, 10 + i, 20 + i]})).collect()
}

fn first_ids(p: &[Sequence]) -> Vec<u32> {
    p.iter().map(|s| s.input_ids[1]).collect()
}

#[test]
fn datasets_merge_in_order_shuffle_by_seed_and_split_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = run_config(dir.path(), "a", None, &pretokenized_rows(6));
    let b = run_config(dir.path(), "b", None, &pretokenized_rows(10)[6..]);
    cfg.datasets.push(b.datasets[0].clone());
    let p = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    assert_eq!(first_ids(&p.train), (10..20).collect::<Vec<_>>());
    assert!(p.val.is_empty());

    cfg.val_set_size = 0.25;
    let p = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    assert_eq!((first_ids(&p.train), first_ids(&p.val)), ((10..17).collect(), (17..20).collect()));
    cfg.val_set_size = 2.0;
    let p = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    assert_eq!(first_ids(&p.val), vec![18, 19]);

    cfg.shuffle_merged_datasets = true;
    let s1 = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    let s2 = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    assert_eq!(s1, s2);
    let mut all = [first_ids(&s1.train), first_ids(&s1.val)].concat();
    assert_ne!(all, (10..20).collect::<Vec<_>>());
    all.sort();
    assert_eq!(all, (10..20).collect::<Vec<_>>());
    cfg.seed += 1;
    let s3 = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    assert_ne!(first_ids(&s3.train), first_ids(&s1.train));

    // test_datasets: validation is exactly those files; val_set_size is not used.
    let t = run_config(dir.path(), "t", None, &pretokenized_rows(2));
    cfg.test_datasets = t.datasets.clone();
    let p = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    assert_eq!((p.train.len(), first_ids(&p.val)), (10, vec![10, 11]));
    assert_eq!(p.report.iter().map(|r| r.split.as_str()).collect::<Vec<_>>(), ["train", "train", "test"]);
}

#[test]
fn json_files_directories_and_data_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("b.json"), "{\"rows\": [{\"text\": \"b\"}]}").unwrap();
    std::fs::write(data.join("a.jsonl"), "{\"text\": \"a\"}\n\n{\"text\": \"aa\"}\n").unwrap();
    std::fs::write(data.join("notes.txt"), "ignored").unwrap();
    let tok = TextTokenizer::load(&llama_tok_dir(), &BTreeMap::new()).unwrap();
    let expect = |texts: &[&str]| -> Vec<Vec<u32>> {
        texts
            .iter()
            .map(|t| [tok.encode(t, true).unwrap(), vec![tok.require_eos().unwrap()]].concat())
            .collect()
    };
    let mut cfg = RunConfig {
        datasets: vec![DatasetConfig {
            path: data.display().to_string(),
            kind: Some("completion".into()),
            field: Some("rows".into()),
            ..Default::default()
        }],
        shuffle_merged_datasets: false,
        dataset_prepared_path: Some(dir.path().join("cache").display().to_string()),
        ..Default::default()
    };
    let p = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    let got: Vec<Vec<u32>> = p.train.iter().map(|s| s.input_ids.clone()).collect();
    assert_eq!(got, expect(&["a", "aa", "b"]));
    assert_eq!(p.report[0].rows, 3);

    cfg.datasets[0].data_files = Some(vec!["b.json".into()]);
    let p = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    assert_eq!(p.train.iter().map(|s| s.input_ids.clone()).collect::<Vec<_>>(), expect(&["b"]));

    cfg.datasets[0].field = None;
    let e = format!("{:#}", prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap_err());
    assert!(e.contains("b.json: the file holds an object with keys [\"rows\"]; set field:"), "{e}");
}

/// The error of preparing one dataset file with the given text.
fn error_for(kind: Option<&str>, text: &str, tune: impl FnOnce(&mut RunConfig)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, text).unwrap();
    let mut cfg = RunConfig {
        datasets: vec![DatasetConfig { path: path.display().to_string(), kind: kind.map(str::to_string), ..Default::default() }],
        chat_template: Some("chatml".into()),
        dataset_prepared_path: Some(dir.path().join("cache").display().to_string()),
        ..Default::default()
    };
    tune(&mut cfg);
    let e = prepare::prepare(&cfg, &chat_tok_dir(), VOCAB).unwrap_err();
    format!("{e:#}")
}

#[track_caller]
fn assert_has(e: &str, parts: &[&str]) {
    for p in parts {
        assert!(e.contains(p), "expected {p:?} in: {e}");
    }
}

#[test]
fn bad_rows_name_the_file_line_field_and_expectation() {
    let ok = "{\"instruction\": \"i\", \"output\": \"o\"}\n";
    let e = error_for(Some("alpaca"), &format!("{ok}{{\"instruction\": \"i\", \"output\": }}\n"), |_| {});
    assert_has(&e, &["bad.jsonl:2: malformed JSON"]);
    let e = error_for(Some("alpaca"), &format!("{ok}\n{{\"instruction\": \"i\"}}\n"), |_| {});
    assert_has(&e, &["bad.jsonl:3: missing \"output\"", "alpaca rows are {instruction, input?, output}", "found keys [\"instruction\"]"]);
    let e = error_for(Some("alpaca"), "{\"instruction\": [\"i\"], \"output\": \"o\"}", |_| {});
    assert_has(&e, &["bad.jsonl:1: \"instruction\" must be a string, found a list"]);
    let e = error_for(Some("alpaca"), "[1, 2]", |_| {});
    assert_has(&e, &["bad.jsonl:1: expected a JSON object (a alpaca row), found a list"]);

    let e = error_for(Some("chat_template"), "{\"messages\": \"hi\"}", |_| {});
    assert_has(&e, &["bad.jsonl:1: \"messages\" must be a list of messages, found a string"]);
    let e = error_for(Some("chat_template"), "{\"messages\": []}", |_| {});
    assert_has(&e, &["bad.jsonl:1: \"messages\" is an empty conversation"]);
    let e = error_for(Some("chat_template"), "{\"conversations\": []}", |_| {});
    assert_has(&e, &["bad.jsonl:1: missing \"messages\"", "field_messages", "[\"conversations\"]"]);
    let e = error_for(Some("chat_template"), "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", |_| {});
    assert_has(&e, &["bad.jsonl:1: messages[0]: unknown role \"bot\"", "human, gpt"]);
    let e = error_for(Some("chat_template"), "{\"messages\": [{\"role\": \"user\", \"content\": [\"x\"]}]}", |_| {});
    assert_has(&e, &["bad.jsonl:1: messages[0]: \"content\" must be a string, found a list"]);
    let e = error_for(Some("chat_template"), "{\"messages\": [{\"from\": \"human\", \"value\": \"x\"}]}", |_| {});
    assert_has(&e, &["bad.jsonl:1: messages[0]: missing \"role\"", "message_property_mappings"]);
    // The template's own refusal, located.
    let mistral = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}{% endif %}{{ m.content }}{% endfor %}";
    let e = error_for(Some("chat_template"), "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}", |c| {
        c.chat_template = Some("jinja".into());
        c.chat_template_jinja = Some(mistral.into());
    });
    assert_has(&e, &["bad.jsonl:1: cannot render the conversation", "chat_template_jinja", "no system turns"]);

    let e = error_for(Some("completion"), "{\"text\": 5}", |_| {});
    assert_has(&e, &["bad.jsonl:1: \"text\" must be a string, found a number"]);
    let e = error_for(Some("completion"), "{\"content\": \"x\"}", |c| c.datasets[0].field_text = Some("body".into()));
    assert_has(&e, &["bad.jsonl:1: missing \"body\""]);
    let e = error_for(Some("input_output"), "{\"segments\": [{\"text\": \"a\", \"label\": \"yes\"}]}", |_| {});
    assert_has(&e, &["bad.jsonl:1: segments[0]: \"label\" must be true or false, found a string"]);
    let e = error_for(Some("input_output"), "{\"segments\": {\"text\": \"a\"}}", |_| {});
    assert_has(&e, &["bad.jsonl:1: \"segments\" must be a list of {text, label}, found an object"]);
    let e = error_for(None, "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 500]}", |_| {});
    assert_has(&e, &["bad.jsonl:2: input_ids[1] = 500 is outside the model's vocabulary (size 131)"]);
}

#[test]
fn bad_settings_are_refused_with_the_key() {
    let row = "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}";
    let e = error_for(Some("chat_template"), row, |c| {
        c.special_tokens.insert("eos_token".into(), "<|new|>".into());
    });
    assert_has(&e, &["special_tokens.eos_token: \"<|new|>\" is not a token of", "tokenizer.json", "new token needs an embedding row"]);
    let e = error_for(Some("chat_template"), row, |c| c.chat_template = None);
    assert_has(&e, &["tokenizer_config.json has no chat_template", "chat_template: chatml"]);
    let e = error_for(Some("sharegpt"), row, |_| {});
    assert_has(&e, &["unknown dataset type \"sharegpt\"", "alpaca, chat_template, completion, input_output"]);
    let e = error_for(Some("alpaca"), row, |c| c.excess_length_strategy = "split".into());
    assert_has(&e, &["excess_length_strategy: \"split\""]);
    let e = error_for(Some("alpaca"), row, |c| c.datasets[0].path = "/no/such/file.jsonl".into());
    assert_has(&e, &["datasets[0] (/no/such/file.jsonl)", "does not exist"]);
    let e = error_for(Some("chat_template"), row, |c| c.datasets[0].train_on_eos = Some("every".into()));
    assert_has(&e, &["train_on_eos: \"every\" is not one of turn, all, last, none"]);
}

#[test]
fn special_token_overrides_change_bos_and_eos() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = run_config(dir.path(), "c", Some("completion"), &[json!({"text": "hi"})]);
    let plain = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    cfg.special_tokens = [("bos_token", "<pad>"), ("eos_token", "<s>")].map(|(k, v)| (k.to_string(), v.to_string())).into();
    let over = prepare::prepare(&cfg, &llama_tok_dir(), VOCAB).unwrap();
    let (a, b) = (&plain.train[0].input_ids, &over.train[0].input_ids);
    // <pad>=0, <s>=1, </s>=2 in the fixture tokenizer.
    assert_eq!((a[0], *a.last().unwrap()), (1, 2));
    assert_eq!((b[0], *b.last().unwrap()), (0, 1));
    assert_eq!(a[1..a.len() - 1], b[1..b.len() - 1]);
}

#[test]
fn prepare_eval_reads_one_file_by_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eval.jsonl");
    std::fs::write(&path, "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n").unwrap();
    let (seqs, report) = prepare::prepare_eval(&path, Some("chat_template"), Some("chatml"), &chat_tok_dir(), VOCAB, 2048).unwrap();
    let text = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n";
    let tok = TextTokenizer::load(&chat_tok_dir(), &BTreeMap::new()).unwrap();
    assert_eq!(seqs[0].input_ids, tok.encode(text, false).unwrap());
    // Only "a" and the <|im_end|> after it are targets.
    let targets: Vec<i32> = seqs[0].labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
    assert_eq!(targets, [tok.encode("a", false).unwrap(), vec![101]].concat().iter().map(|&t| t as i32).collect::<Vec<_>>());
    assert_eq!((report.rows, report.sequences, report.from_cache), (1, 1, false));
}

#[test]
fn prepared_summary_has_one_line_per_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = run_config(dir.path(), "a", None, &pretokenized_rows(2));
    cfg.datasets.push(run_config(dir.path(), "b", None, &pretokenized_rows(1)).datasets[0].clone());
    let p: Prepared = prepare::prepare(&cfg, Path::new("/nonexistent"), VOCAB).unwrap();
    let text = p.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].ends_with("a.jsonl [pre-tokenized, train]: 2 rows -> 2 sequences, 6 tokens"), "{text}");
}

fn ferrotune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).output().expect("run ferrotune")
}

fn eval_loss(args: &[&str]) -> f64 {
    let model = llama_tok_dir();
    let mut all = vec!["eval", "--model", model.to_str().unwrap(), "--device", "cpu", "--json", "--sequence-len", "512"];
    all.extend_from_slice(args);
    let out = ferrotune(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

fn write_pretokenized(path: &Path, seqs: &[Sequence]) {
    let text: String =
        seqs.iter().map(|s| format!("{}\n", json!({"input_ids": s.input_ids, "labels": s.labels}))).collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn eval_type_tokenizes_as_the_reference_and_config_uses_the_validation_split() {
    let dir = tempfile::tempdir().unwrap();
    let fx = read_json("formats.json");
    let case = fx["cases"].as_array().unwrap().iter().find(|c| c["name"] == "alpaca_train_on_inputs_False").unwrap();
    let rows: String = case["rows"].as_array().unwrap().iter().map(|r| format!("{r}\n")).collect();
    let text_path = dir.path().join("alpaca.jsonl");
    std::fs::write(&text_path, rows).unwrap();
    let ids_path = dir.path().join("ids.jsonl");
    write_pretokenized(&ids_path, &expected_sequences(&case["expected"]));

    // --type alpaca scores exactly the transformers-tokenized sequences.
    let from_text = eval_loss(&["--data", text_path.to_str().unwrap(), "--type", "alpaca"]);
    let from_ids = eval_loss(&["--data", ids_path.to_str().unwrap()]);
    assert!(from_text.is_finite() && from_text == from_ids, "{from_text} vs {from_ids}");
    // The fixture model's context is 128 tokens; the second row (193) is over it.
    assert!(expected_sequences(&case["expected"])[1].input_ids.len() > 128);

    // --config: the validation split (the last row here) of the config's data.
    let last = expected_sequences(&case["expected"]).pop().unwrap();
    let last_path = dir.path().join("last.jsonl");
    write_pretokenized(&last_path, &[last]);
    let cfg = dir.path().join("run.yml");
    let yaml = format!(
        "base_model: {}\nadapter: lora\nlearning_rate: 0.001\nsequence_len: 512\nshuffle_merged_datasets: false\n\
         val_set_size: 1\ndataset_prepared_path: {}\ndatasets:\n  - path: {}\n    type: alpaca\n",
        llama_tok_dir().display(),
        dir.path().join("cache").display(),
        text_path.display()
    );
    std::fs::write(&cfg, yaml).unwrap();
    let out = ferrotune(&["eval", "--config", cfg.to_str().unwrap(), "--device", "cpu", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["examples"], 1, "{v}");
    let from_config = v["loss"].as_f64().unwrap();
    let from_last = eval_loss(&["--data", last_path.to_str().unwrap()]);
    assert!(from_config == from_last, "{from_config} vs {from_last}");
    assert!(err.contains("alpaca.jsonl [alpaca, train]: 2 rows -> 2 sequences"), "{err}");

    // Bad --type: one clear error, no panic.
    let model = llama_tok_dir();
    let out = ferrotune(&["eval", "--model", model.to_str().unwrap(), "--data", text_path.to_str().unwrap(), "--type", "sharegpt", "--device", "cpu"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unknown dataset type \"sharegpt\"") && !err.contains("panicked"), "{err}");
}
