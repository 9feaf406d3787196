//! Batched generation against one-sequence generation: every sequence of a
//! `Model::generate_batch` call must be the sequence `Model::generate` gives
//! for its prompt alone, with its own seed (tests/generate.rs holds
//! `generate` to greedy decoding by full recomputation). Prompts of
//! different lengths, a repeated prompt, sequences leaving the batch at
//! different steps, on every fixture model with its LoRA adapter.

mod common;
#[path = "common/generation.rs"]
mod generation;

use common::{CASES, load_with_adapter};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::Model;
use ferrotune::model::generate::{GenerateOpts, StopReason};
use ferrotune::model::generate_batch::{BatchOpts, SeqOut, sequence_seed};
use ferrotune::model::sample::SamplingParams;
use generation::{NEW_TOKENS, prompt};

/// Prompts of 7, 3 and 12 tokens, the first repeated (equal prompts share
/// their prefill) and the repeat not next to it.
fn prompts() -> Vec<Vec<u32>> {
    let long: Vec<u32> = vec![1, 40, 7, 22, 9, 31, 12, 5, 27, 3, 17, 8];
    vec![prompt(), vec![1, 5, 9], prompt(), long]
}

/// `Model::generate` of one prompt alone.
fn alone(be: &CpuBackend, model: &Model<CpuBackend>, prompt: &[u32], opts: &BatchOpts, seed: u64) -> SeqOut {
    let one = GenerateOpts { max_new_tokens: opts.max_new_tokens, sampling: opts.sampling, seed, stop_tokens: opts.stop_tokens.clone() };
    let g = model.generate(be, prompt, &one, |_| Ok(())).unwrap();
    SeqOut { tokens: g.tokens, stop: g.stop }
}

fn greedy(max_new_tokens: usize, stop_tokens: Vec<u32>) -> BatchOpts {
    BatchOpts { max_new_tokens, sampling: SamplingParams::greedy(), seed: 0, stop_tokens }
}

#[test]
fn greedy_batch_equals_one_prompt_at_a_time_on_every_fixture() {
    let be = CpuBackend::new();
    let prompts = prompts();
    for case in CASES {
        let model = load_with_adapter(&be, case);
        let opts = greedy(NEW_TOKENS, vec![]);
        let g = model.generate_batch(&be, &prompts, &opts).unwrap();
        assert_eq!(g.seqs.len(), prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(g.seqs[i], alone(&be, &model, p, &opts, 0), "{case}: sequence {i}");
            assert_eq!(g.seqs[i].tokens.len(), NEW_TOKENS);
        }
        // The repeated prompt was prefilled once.
        assert_eq!((g.prefilled_prompts, g.prompt_tokens), (3, 7 + 3 + 12), "{case}");
        assert_eq!(g.decode_steps, NEW_TOKENS - 1);
        assert_eq!(g.decoded_tokens(), prompts.len() * (NEW_TOKENS - 1));
    }
}

#[test]
fn each_sampled_sequence_equals_the_one_sequence_sampler_with_its_seed() {
    let be = CpuBackend::new();
    // Two prompts, three sequences each, contiguous (as online RL samples a
    // group per prompt); every filter on.
    let batch: Vec<Vec<u32>> = [prompt(), prompt(), prompt(), vec![1, 5, 9], vec![1, 5, 9], vec![1, 5, 9]].to_vec();
    let sampling = SamplingParams { temperature: 1.0, top_k: Some(40), top_p: Some(0.95), min_p: Some(0.02) };
    for case in ["llama", "qwen3", "gemma2"] {
        let model = load_with_adapter(&be, case);
        let opts = BatchOpts { max_new_tokens: NEW_TOKENS, sampling, seed: 42, stop_tokens: vec![] };
        let g = model.generate_batch(&be, &batch, &opts).unwrap();
        for (i, p) in batch.iter().enumerate() {
            assert_eq!(g.seqs[i], alone(&be, &model, p, &opts, sequence_seed(42, i)), "{case}: sequence {i}");
        }
        // The sequences of one prompt are different samples (their seeds differ).
        let group: Vec<&Vec<u32>> = g.seqs[..3].iter().map(|s| &s.tokens).collect();
        assert!(group[0] != group[1] && group[1] != group[2] && group[0] != group[2], "{case}: {group:?}");
        assert_eq!(g.prefilled_prompts, 2);
        // Another seed, another sample.
        let other = model.generate_batch(&be, &batch, &BatchOpts { seed: 43, ..opts.clone() }).unwrap();
        assert_ne!(other.seqs, g.seqs, "{case}");
    }
    // Sequence 0 keeps the batch seed itself: one prompt alone samples as
    // `generate` with that seed.
    assert_eq!(sequence_seed(42, 0), 42);
}

#[test]
fn a_stop_token_ends_only_its_sequences() {
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "mistral");
    let prompts = prompts();
    let free = model.generate_batch(&be, &prompts, &greedy(NEW_TOKENS, vec![])).unwrap();
    // A token the first prompt's continuation reaches early (not first) and
    // the others' never do.
    let (a, others) = (&free.seqs[0].tokens, [&free.seqs[1].tokens, &free.seqs[3].tokens]);
    let stop = *a[1..NEW_TOKENS / 2]
        .iter()
        .find(|t| others.iter().all(|o| !o.contains(t)))
        .expect("the fixture's continuations share every early token: pick other prompts");
    let cut = a.iter().position(|&t| t == stop).unwrap();
    let opts = greedy(NEW_TOKENS, vec![stop]);
    let g = model.generate_batch(&be, &prompts, &opts).unwrap();
    // Sequences 0 and 2 (the same prompt) stop at the token; 1 and 3 run on,
    // sequence 3 moved into slot 0 when 0 and 2 left the batch.
    for i in [0, 2] {
        assert_eq!(g.seqs[i].tokens, a[..=cut].to_vec(), "sequence {i}");
        assert_eq!(g.seqs[i].stop, StopReason::Eos);
    }
    for i in [1, 3] {
        assert_eq!(g.seqs[i], free.seqs[i], "sequence {i} runs on");
        assert_eq!(g.seqs[i], alone(&be, &model, &prompts[i], &opts, 0), "sequence {i}");
        assert_eq!(g.seqs[i].stop, StopReason::MaxNewTokens);
    }
    assert_eq!(g.decoded_tokens(), 2 * cut + 2 * (NEW_TOKENS - 1));
}

#[test]
fn sequences_leave_the_batch_at_their_own_context_limit() {
    // max_position_embeddings 128: the 120-token prompt stops after 9
    // tokens (ContextFull), the short one runs to max_new_tokens.
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "mistral");
    let long: Vec<u32> = (0..120).map(|i| 3 + (i * 7 % 100) as u32).collect();
    let prompts = vec![long, prompt(), vec![1, 5, 9]];
    let opts = greedy(30, vec![]);
    let g = model.generate_batch(&be, &prompts, &opts).unwrap();
    assert_eq!((g.seqs[0].tokens.len(), g.seqs[0].stop), (9, StopReason::ContextFull));
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(g.seqs[i], alone(&be, &model, p, &opts, 0), "sequence {i}");
    }
    assert_eq!((g.seqs[1].stop, g.seqs[1].tokens.len()), (StopReason::MaxNewTokens, 30));
}

#[test]
fn bad_prompts_are_errors_naming_the_prompt() {
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "mistral");
    let opts = greedy(4, vec![]);
    let err = |prompts: Vec<Vec<u32>>| model.generate_batch(&be, &prompts, &opts).unwrap_err().to_string();
    assert_eq!(err(vec![prompt(), vec![]]), "prompt 1 has no tokens");
    let e = err(vec![prompt(), prompt(), vec![1, 131]]);
    assert!(e.contains("prompt 2: token id 131 (new token 1) is outside the vocabulary (size 131)"), "{e}");
    let e = err(vec![prompt(), vec![5; 128]]);
    assert!(e.contains("prompt 1 has 128 tokens; the model's max_position_embeddings is 128"), "{e}");
    let bad = BatchOpts { sampling: SamplingParams { min_p: Some(2.0), ..SamplingParams::greedy() }, ..opts.clone() };
    let e = model.generate_batch(&be, &[prompt()], &bad).unwrap_err().to_string();
    assert!(e.contains("min_p must be in [0, 1], got 2"), "{e}");
    // Nothing to do is not an error.
    assert!(model.generate_batch(&be, &[], &opts).unwrap().seqs.is_empty());
    let none = model.generate_batch(&be, &[prompt(), prompt()], &greedy(0, vec![])).unwrap();
    assert!(none.seqs.iter().all(|s| s.tokens.is_empty()));
}

// ---- `ferrotune generate` with several sequences ----------------------------

fn ferrotune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).output().expect("run ferrotune")
}

#[test]
fn cli_prints_every_sequence_of_the_batch_as_the_library_generates_it() {
    let dir = common::fixture("llama").join("model");
    let adapter = common::fixture("llama").join("adapter");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompts.jsonl");
    // A text row, a blank line, a conversation row.
    std::fs::write(&file, "{\"prompt\": \"The cat\"}\n\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let out = ferrotune(&[
        "generate", "--model", dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--prompts",
        file.to_str().unwrap(), "--chat-template", "chatml", "--num-return-sequences", "2", "--temperature", "1",
        "--top-k", "20", "--min-p", "0.05", "--seed", "7", "--max-new-tokens", "8", "--ignore-eos", "--device", "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    // The library: the text row with the tokenizer's special tokens, the
    // conversation through chatml with the assistant turn opened; each row
    // twice, contiguous; no stop tokens.
    let tok = ferrotune::model::checkpoint::load_tokenizer(&dir).unwrap();
    let text = tok.encode("The cat", true).unwrap().get_ids().to_vec();
    let chat = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", false).unwrap().get_ids().to_vec();
    let prompts = vec![text.clone(), text, chat.clone(), chat];
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "llama");
    let sampling = SamplingParams { temperature: 1.0, top_k: Some(20), top_p: None, min_p: Some(0.05) };
    let g = model.generate_batch(&be, &prompts, &BatchOpts { max_new_tokens: 8, sampling, seed: 7, stop_tokens: vec![] }).unwrap();
    let mut want = String::new();
    for (i, seq) in g.seqs.iter().enumerate() {
        let line = [1, 3][i / 2];
        want += &format!(
            "=== prompt {} ({} line {line}), sequence {} of 2: 8 tokens, stopped: max-new-tokens ===\n{}\n",
            i / 2 + 1,
            file.display(),
            i % 2 + 1,
            tok.decode(&seq.tokens, true).unwrap()
        );
    }
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    assert!(stderr.contains("decode: 28 tokens in") && stderr.contains("tokens/s"), "{stderr}");
    assert!(stderr.contains(&format!("prefill: {} tokens (2 distinct prompts)", prompts[0].len() + prompts[2].len())), "{stderr}");
}

#[test]
fn cli_refuses_bad_prompt_files_and_flags_clearly() {
    let dir = common::fixture("llama").join("model");
    let model = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.jsonl");
    std::fs::write(&file, "{\"prompt\": \"ok\"}\n{\"prompt\": [{\"role\": \"user\"}]}\n").unwrap();
    let f = file.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", model, "--device", "cpu", "--temperature", "0"];
        args.extend_from_slice(extra);
        let out = ferrotune(&args);
        assert!(!out.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--prompts", f]);
    assert!(e.contains(&format!("{f} line 2: message 0 of \"prompt\" must be an object with string \"role\" and \"content\"")), "{e}");
    assert!(run(&["--prompts", f, "--prompt", "x"]).contains("cannot be used with"));
    assert!(run(&[]).contains("--prompt"));
    let e = run(&["--prompt", "x", "--num-return-sequences", "0"]);
    assert!(e.contains("--num-return-sequences") && e.contains("must be at least 1"), "{e}");
    let e = run(&["--prompt", "x", "--min-p", "1.5"]);
    assert!(e.contains("--min-p") && e.contains("must be in [0, 1], got 1.5"), "{e}");
    let e = run(&["--prompt", "x", "--chat-template", "chatml"]);
    assert!(e.contains("--chat-template applies with --chat"), "{e}");
    // A conversation row needs a chat template: the fixture has none.
    std::fs::write(&file, "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    assert!(run(&["--prompts", f]).contains("has no chat_template"));
}
