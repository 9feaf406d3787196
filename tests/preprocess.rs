//! `ferrotune preprocess`: its counts against what `train` reports for the
//! same config and against numbers worked out here from the data, and its
//! --show rendering (non-terminal: trained tokens between [[ and ]]) with
//! and without --ids, for SFT, DPO, KTO and reward-model runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).current_dir(repo()).env("NO_COLOR", "1").args(args).output().unwrap()
}

fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The line of `text` starting with `prefix`.
fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
}

/// The examples of --show output, each the text after its `--- ... ---` header.
fn examples(text: &str) -> Vec<String> {
    text.split("\n--- ").skip(1).map(|e| e.split_once("---\n").unwrap().1.to_string()).collect()
}

/// The ids of an --ids rendering (each token is `text(id)`).
fn ids_of(text: &str) -> Vec<u32> {
    let re = regex::Regex::new(r"\((\d+)\)").unwrap();
    re.captures_iter(text).map(|c| c[1].parse().unwrap()).collect()
}

/// The ids inside [[ ]] runs of an --ids rendering.
fn trained_ids(text: &str) -> Vec<u32> {
    text.split("[[").skip(1).flat_map(|s| ids_of(s.split("]]").next().unwrap())).collect()
}

fn quickstart_tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(repo().join("examples/quickstart/model/tokenizer.json")).unwrap()
}

#[test]
fn quickstart_counts_match_train_and_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = format!("dataset_prepared_path={}", tmp.path().join("cache").display());
    let cfg = "examples/quickstart/quickstart.yml";
    // File order, so the packing can be worked out here.
    let sets = ["--set", &cache, "--set", "shuffle_merged_datasets=false"];

    // train (one step) tokenizes and caches; preprocess reads that cache and
    // reports the same dataset line.
    let out_dir = format!("output_dir={}", tmp.path().join("out").display());
    let train = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .current_dir(repo())
        .args(["train", cfg, "--device", "cpu", "--set", "max_steps=1", "--set", &out_dir])
        .args(sets)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&train.stderr);
    assert!(train.status.success(), "{err}");
    let trained_line = line(&err, "dataset ");
    let text = stdout_of(&ferrotune(&[&["preprocess", cfg, "--show", "100", "--ids"][..], &sets].concat()));
    assert_eq!(line(&text, "dataset "), format!("{trained_line} (cached)"));

    // Rows read: the data file's lines.
    let data = std::fs::read_to_string(repo().join("examples/quickstart/data.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = data.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(line(&text, "rows: "), "rows: 32 read, 0 dropped (longer than sequence_len 256), 0 truncated to sequence_len");

    // Every example is shown (no validation split): the ids of all of them
    // make the token count, those in [[ ]] the trained count.
    let shown = examples(&text);
    assert_eq!(shown.len(), 32);
    let lengths: Vec<usize> = shown.iter().map(|e| ids_of(e).len()).collect();
    let tokens: usize = lengths.iter().sum();
    let trained: usize = shown.iter().map(|e| trained_ids(e).len()).sum();
    assert!(trained_line.ends_with(&format!("32 rows -> 32 sequences, {tokens} tokens")), "{trained_line}");
    assert_eq!(
        line(&text, "train: "),
        format!("train: 32 sequences, {tokens} tokens, {trained} trained ({:.1}%)", 100.0 * trained as f64 / tokens as f64)
    );
    assert_eq!(line(&text, "validation: "), "validation: 0 sequences");

    // Each example's trained tokens decode to its row's assistant reply and
    // the EOS; the first token (BOS) is the tokenizer's.
    let tok = quickstart_tokenizer();
    for (e, row) in shown.iter().zip(&rows) {
        let reply = row["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap();
        assert_eq!(tok.decode(&trained_ids(e), false).unwrap(), format!("{reply}</s>"), "{e}");
        assert_eq!(ids_of(e)[0], 1);
    }

    // Packing as the trainer packs, in file order: a row takes examples
    // until the next would pass sequence_len.
    let (mut bins, mut used) = (0, usize::MAX);
    for &l in &lengths {
        if used.saturating_add(l) > 256 {
            bins += 1;
            used = 0;
        }
        used += l;
    }
    let fill = 100.0 * tokens as f64 / (bins * 256) as f64;
    assert_eq!(line(&text, "sample packing: "), format!("sample packing: 32 sequences in {bins} rows of 256 tokens, {fill:.1}% filled"));
    assert_eq!(
        line(&text, "cache: "),
        format!("cache: 1 of 1 datasets read from {}", tmp.path().join("cache").display())
    );
    // Into an empty cache: tokenized now, and said so.
    let fresh = format!("dataset_prepared_path={}", tmp.path().join("fresh").display());
    let text = stdout_of(&ferrotune(&["preprocess", cfg, "--set", &fresh]));
    assert_eq!(
        line(&text, "cache: "),
        format!("cache: 0 of 1 datasets read from {}; 1 tokenized now and stored there", tmp.path().join("fresh").display())
    );
}

#[test]
fn quickstart_show_brackets_the_trained_tokens_and_ids_match_the_text() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = format!("dataset_prepared_path={}", tmp.path().display());
    let args = ["preprocess", "examples/quickstart/quickstart.yml", "--set", &cache, "--set", "shuffle_merged_datasets=false"];
    let plain = stdout_of(&ferrotune(&[&args[..], &["--show", "2"]].concat()));
    let shown = examples(&plain);
    assert_eq!(shown.len(), 2);
    assert_eq!(
        shown[0],
        "<s>User: What is the capital of France?\nAssistant:\n[[The capital of France is Paris.</s>]]\n",
        "{plain}"
    );
    assert!(plain.contains("\n--- train example 2 of 32 ---\n"), "{plain}");
    assert!(!plain.contains('\x1b'), "no colour off a terminal: {plain:?}");

    // --ids: the ids decode to the text shown without them.
    let with_ids = stdout_of(&ferrotune(&[&args[..], &["--show", "2", "--ids"]].concat()));
    let tok = quickstart_tokenizer();
    for (e, p) in examples(&with_ids).iter().zip(&shown) {
        assert!(e.starts_with("<s>(1)U(55)s(85)er(278):(28)"), "{e}");
        assert_eq!(tok.decode(&ids_of(e), false).unwrap(), p.replace("[[", "").replace("]]", ""), "{e}");
    }

    // --color always colours even off a terminal; NO_COLOR does not stop it.
    let coloured = stdout_of(&ferrotune(&[&args[..], &["--show", "1", "--color", "always"]].concat()));
    assert!(coloured.contains("\x1b[32mThe capital of France is Paris.</s>\x1b[0m"), "{coloured:?}");
}

const CAPITALS: &[(&str, &str)] = &[("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Peru", "Lima")];

/// A run config on the quickstart model with `keys` and one dataset of `rows`.
fn config(dir: &Path, keys: &str, rows: &[serde_json::Value]) -> PathBuf {
    let data = dir.join("data.jsonl");
    std::fs::write(&data, rows.iter().map(|r| r.to_string() + "\n").collect::<String>()).unwrap();
    let cfg = dir.join("run.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\nadapter: lora\nlora_r: 4\n{keys}\ndatasets:\n  - path: {}\nsequence_len: 64\nmicro_batch_size: 2\n\
             learning_rate: 0.001\nshuffle_merged_datasets: false\ndevice: cpu\noutput_dir: {}\n",
            repo().join("examples/quickstart/model").display(),
            data.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    cfg
}

fn pair_rows() -> Vec<serde_json::Value> {
    let mut rows: Vec<serde_json::Value> = CAPITALS
        .iter()
        .map(|(c, city)| {
            serde_json::json!({
                "prompt": format!("User: What is the capital of {c}?\nAssistant:\n"),
                "chosen": format!("The capital of {c} is {city}."),
                "rejected": "I do not know.",
            })
        })
        .collect();
    // Longer than sequence_len 64: dropped.
    rows.insert(2, serde_json::json!({"prompt": "Tell me a story.", "chosen": "Once upon a time ".repeat(20), "rejected": "No."}));
    rows
}

#[test]
fn dpo_counts_match_train_and_show_prompt_chosen_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "rl: dpo\nval_set_size: 2", &pair_rows());
    let cfg = cfg.to_str().unwrap();
    let train = ferrotune(&["train", cfg, "--set", "max_steps=1"]);
    let err = String::from_utf8_lossy(&train.stderr);
    assert!(train.status.success(), "{err}");
    let text = stdout_of(&ferrotune(&["preprocess", cfg, "--show", "10", "--ids"]));
    assert_eq!(line(&text, "dataset "), line(&err, "dataset "));
    assert!(line(&text, "dataset ").contains("data.jsonl [standard, preference]: 6 rows -> 5 examples, "), "{text}");
    assert_eq!(line(&text, "rows: "), "rows: 6 read, 1 dropped (longer than sequence_len 64), 0 truncated to sequence_len");
    assert!(line(&text, "dataset ").ends_with(", 1 dropped (too long)"), "{text}");

    // Five pairs shown (three train, two validation), each with its prompt
    // and both completions; the completions' ids are the trained ones.
    let shown = examples(&text);
    assert_eq!(shown.len(), 5, "{text}");
    let tok = quickstart_tokenizer();
    let kept: Vec<&(&str, &str)> = CAPITALS.iter().collect();
    let mut counts = [(0, 0), (0, 0)];
    for (i, (e, (c, city))) in shown.iter().zip(kept).enumerate() {
        let (prompt, rest) = e.strip_prefix("prompt:\n").unwrap().split_once("chosen:\n").unwrap();
        let (chosen, rejected) = rest.split_once("rejected:\n").unwrap();
        let decode = |s: &str| tok.decode(&ids_of(s), false).unwrap();
        assert_eq!(decode(prompt), format!("<s>User: What is the capital of {c}?\nAssistant:\n"));
        assert_eq!(tok.decode(&trained_ids(chosen), false).unwrap(), format!("The capital of {c} is {city}.</s>"));
        assert_eq!(tok.decode(&trained_ids(rejected), false).unwrap(), "I do not know.</s>");
        assert!(trained_ids(prompt).is_empty());
        // Each pair puts the prompt through the model twice.
        let split = &mut counts[(i >= 3) as usize];
        split.0 += 2 * ids_of(prompt).len() + ids_of(chosen).len() + ids_of(rejected).len();
        split.1 += ids_of(chosen).len() + ids_of(rejected).len();
    }
    for (name, n, (tokens, trained)) in [("train", 3, counts[0]), ("validation", 2, counts[1])] {
        let pct = 100.0 * trained as f64 / tokens as f64;
        assert_eq!(line(&text, &format!("{name}: ")), format!("{name}: {n} pairs, {tokens} tokens, {trained} trained ({pct:.1}%)"));
    }
    assert_eq!(line(&text, "sample packing: "), "sample packing: not used (preference examples are batched whole)");

    // Without --ids: the text, completions bracketed.
    let plain = stdout_of(&ferrotune(&["preprocess", cfg, "--show", "1"]));
    assert_eq!(
        examples(&plain)[0],
        "prompt:\n<s>User: What is the capital of France?\nAssistant:\nchosen:\n[[The capital of France is Paris.</s>]]\n\
         rejected:\n[[I do not know.</s>]]\n"
    );
}

#[test]
fn kto_and_reward_runs_show_their_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> = CAPITALS
        .iter()
        .map(|(c, city)| serde_json::json!({"prompt": format!("User: What is the capital of {c}?\n"), "completion": format!("{city}."), "label": c.len() < 6}))
        .collect();
    let cfg = config(tmp.path(), "rl: kto", &rows);
    let text = stdout_of(&ferrotune(&["preprocess", cfg.to_str().unwrap(), "--show", "3"]));
    let shown = examples(&text);
    assert_eq!(shown[0], "prompt:\n<s>User: What is the capital of France?\ncompletion (undesirable):\n[[Paris.</s>]]\n", "{text}");
    assert_eq!(shown[2], "prompt:\n<s>User: What is the capital of Italy?\ncompletion (desirable):\n[[Rome.</s>]]\n");
    assert!(line(&text, "train: ").starts_with("train: 5 examples, "), "{text}");

    let cfg = config(tmp.path(), "reward_model: true", &pair_rows());
    let text = stdout_of(&ferrotune(&["preprocess", cfg.to_str().unwrap(), "--show", "1"]));
    let shown = examples(&text);
    assert_eq!(
        shown[0],
        "chosen:\n<s>User: What is the capital of France?\nAssistant:\nThe capital of France is Paris.</s>\n\
         rejected:\n<s>User: What is the capital of France?\nAssistant:\nI do not know.</s>\n",
        "{text}"
    );
    assert!(line(&text, "train: ").ends_with("(each sequence scored at its last token)"), "{text}");
}

#[test]
fn bad_rows_and_keys_fail_as_train_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = pair_rows();
    rows[1]["chosen"] = serde_json::json!(["a"]);
    let cfg = config(tmp.path(), "rl: dpo", &rows);
    let cfg = cfg.to_str().unwrap();
    let (pre, train) = (ferrotune(&["preprocess", cfg]), ferrotune(&["train", cfg]));
    let err = String::from_utf8_lossy(&pre.stderr);
    assert!(!pre.status.success() && err.contains("data.jsonl:2"), "{err}");
    assert_eq!(err, String::from_utf8_lossy(&train.stderr));

    let out = ferrotune(&["preprocess", cfg, "--set", "sequence_len=0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("sequence_len"), "{err}");
}

#[test]
fn pretokenized_counts_are_the_data_file_s() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = [
        serde_json::json!({"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}),
        serde_json::json!({"input_ids": [1, 8, 9], "labels": [-100, -100, -100]}),
        serde_json::json!({"input_ids": (1..=10).collect::<Vec<u32>>()}),
        serde_json::json!({"input_ids": [1, 2, 3, 4, 5]}),
        serde_json::json!({"input_ids": [1, 2], "labels": [1, 2]}),
    ];
    let keys = "sample_packing: true\nnum_epochs: 2\ngradient_accumulation_steps: 1\nval_set_size: 0";
    let cfg = config(tmp.path(), keys, &rows);
    let cfg = cfg.to_str().unwrap();
    // sequence_len is the config's 64 overridden to 8: row 3 (10 tokens) is dropped.
    let cache = format!("dataset_prepared_path={}", tmp.path().join("cache").display());
    let args = ["preprocess", cfg, "--set", "sequence_len=8", "--set", &cache, "--show", "9", "--ids"];
    let text = stdout_of(&ferrotune(&args));
    let data = tmp.path().join("data.jsonl");
    assert_eq!(
        line(&text, "dataset "),
        format!("dataset {} [pre-tokenized, train]: 5 rows -> 4 sequences, 14 tokens, 1 dropped (too long)", data.display())
    );
    assert_eq!(line(&text, "rows: "), "rows: 5 read, 1 dropped (longer than sequence_len 8), 0 truncated to sequence_len");
    assert_eq!(line(&text, "examples with no trained token: "), "examples with no trained token: 1 (they add nothing to the loss)");
    // Trained: 6, 7 | none | 2, 3, 4, 5 | 2 (a first token is never trained).
    assert_eq!(line(&text, "train: "), "train: 4 sequences, 14 tokens, 7 trained (50.0%)");
    // Rows of 8: [4 + 3] [5 + 2]: 14 of 16 tokens.
    assert_eq!(line(&text, "sample packing: "), "sample packing: 4 sequences in 2 rows of 8 tokens, 87.5% filled");
    assert_eq!(line(&text, "batches: "), "batches: 1 micro-batches of up to 2 rows, 1 optimiser steps per epoch, 2 steps in all");
    let shown = examples(&text);
    let trained: Vec<Vec<u32>> = shown.iter().map(|e| trained_ids(e)).collect();
    assert_eq!(trained, [vec![6, 7], vec![], vec![2, 3, 4, 5], vec![2]]);
    assert_eq!(shown.iter().map(|e| ids_of(e)).collect::<Vec<_>>(), [vec![1, 5, 6, 7], vec![1, 8, 9], vec![1, 2, 3, 4, 5], vec![1, 2]]);

    // Truncated instead of dropped: cut to 8 tokens, 7 of them trained.
    let text = stdout_of(&ferrotune(&[&args[..6], &["--set", "excess_length_strategy=truncate"]].concat()));
    assert_eq!(line(&text, "rows: "), "rows: 5 read, 0 dropped (longer than sequence_len 8), 1 truncated to sequence_len");
    assert_eq!(line(&text, "train: "), "train: 5 sequences, 22 tokens, 14 trained (63.6%)");
}

#[test]
fn token_pieces_join_to_the_tokenizer_s_decoding_without_broken_characters() {
    let dir = repo().join("examples/quickstart/model");
    let tok = ferrotune::data::tokenizer::TextTokenizer::load(&dir, &Default::default()).unwrap();
    let text = "Héllo wörld, 日本 and naïve café!";
    let ids = tok.encode(text, true).unwrap();
    let pieces = tok.token_pieces(&ids);
    assert_eq!(pieces.len(), ids.len());
    assert_eq!(pieces.concat(), quickstart_tokenizer().decode(&ids, false).unwrap());
    assert_eq!(pieces.concat(), format!("<s>{text}"));
    // A character of several byte tokens appears whole at its last one.
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(pieces.iter().any(String::is_empty), "日 and 本 span several byte tokens: {pieces:?}");
    // An id past the tokenizer's vocabulary (505) is shown by number.
    assert_eq!(tok.token_pieces(&[1, 600]), ["<s>", "<600>"]);
}
