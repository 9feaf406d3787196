//! Generation with a KV cache against its definition: greedy decoding that
//! recomputes the whole sequence with `Model::logits` at every step, on
//! every fixture model with its LoRA adapter (Mistral's sliding window of 5
//! is shorter than the sequences here; Qwen2 has q/k/v biases). Then the
//! `generate` subcommand end to end.

mod common;
#[path = "common/generation.rs"]
mod generation;

use common::{CASES, fixture, load_with_adapter, max_abs_err};
use generation::{GPU_LOGITS_TOL, NEW_TOKENS, greedy_by_recompute, greedy_cached, last_logits, prompt, teacher_forced_logits_rel_err};
use ferrotune_testkit::bf16sim::Bf16Sim;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::Model;
use ferrotune::model::checkpoint::{self, Checkpoint};
use ferrotune::model::hparams::token_ids;
use ferrotune::model::generate::{GenerateOpts, StopReason};
use ferrotune::model::sample::SamplingParams;
use std::process::Command;

fn greedy_opts(max_new_tokens: usize, stop_tokens: Vec<u32>) -> GenerateOpts {
    GenerateOpts { max_new_tokens, sampling: SamplingParams::greedy(), seed: 0, stop_tokens }
}

#[test]
fn kv_cache_generation_equals_greedy_recomputation_on_every_fixture() {
    let be = CpuBackend::new();
    for case in CASES {
        let model = load_with_adapter(&be, case);
        let (want_tokens, want_logits) = greedy_by_recompute(&be, &model, &prompt(), NEW_TOKENS);
        let (tokens, logits) = greedy_cached(&be, &model, &prompt(), NEW_TOKENS);
        assert_eq!(tokens, want_tokens, "{case}: cached greedy tokens");
        // Same ops in the same order except the products' row counts (one
        // row per step vs the whole sequence) and the attention kernel: f32
        // rounding only. Held to 1e-4 absolute.
        let worst = logits.iter().zip(&want_logits).map(|(a, b)| max_abs_err(a, b)).fold(0.0, f64::max);
        eprintln!("{case}: {NEW_TOKENS} tokens equal; worst logit error {worst:.2e}");
        assert!(worst <= 1e-4, "{case}: cached logits differ from recomputed ones by {worst:e}");

        // Model::generate (what the CLI runs) gives the same tokens.
        let g = model.generate(&be, &prompt(), &greedy_opts(NEW_TOKENS, vec![]), |_| Ok(())).unwrap();
        assert_eq!(g.tokens, want_tokens, "{case}: Model::generate");
        assert_eq!(g.stop, StopReason::MaxNewTokens);
        assert_eq!(g.prompt_tokens, prompt().len());
    }
}

#[test]
fn the_adapter_is_applied_during_generation() {
    // Without this the equality above could hold with LoRA ignored on both
    // sides: the adapters of the fixtures move the logits visibly.
    let be = CpuBackend::new();
    for case in CASES {
        let with = load_with_adapter(&be, case);
        let ckpt = Checkpoint::open(&fixture(case).join("model")).unwrap();
        let without = Model::load(&be, &ckpt).unwrap();
        let l_with = greedy_cached(&be, &with, &prompt(), 1).1.remove(0);
        let l_without = greedy_cached(&be, &without, &prompt(), 1).1.remove(0);
        let moved = max_abs_err(&l_with, &l_without);
        assert!(moved > 1e-3, "{case}: the adapter moves the logits by only {moved:e}");
    }
}

#[test]
fn chunked_prefill_and_multi_token_steps_equal_one_prefill() {
    // The cache accepts several new tokens per call (decode_attention with
    // n > 1): prompt + 5 tokens as 3 + 4 + 1 + 4 tokens.
    let be = CpuBackend::new();
    for case in CASES {
        let model = load_with_adapter(&be, case);
        let seq: Vec<u32> = prompt().into_iter().chain([20, 21, 22, 23, 24]).collect();
        let want = last_logits(&be, &model, &seq);
        let mut cache = model.new_kv_cache(&be, seq.len());
        let mut got = Vec::new();
        for chunk in [&seq[..3], &seq[3..7], &seq[7..8], &seq[8..]] {
            got = model.forward_cached(&be, &mut cache, chunk).unwrap();
        }
        let err = max_abs_err(&got, &want);
        assert!(err <= 1e-4, "{case}: chunked cache logits differ by {err:e}");
        // The cache is full: one more token is a clear error.
        let e = model.forward_cached(&be, &mut cache, &[5]).unwrap_err().to_string();
        assert!(e.contains("12 cached + 1 new tokens exceed the KV cache's 12 positions"), "{e}");
    }
}

#[test]
fn generation_stops_at_a_stop_token_and_at_the_context_limit() {
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "mistral");
    let (greedy, _) = greedy_by_recompute(&be, &model, &prompt(), NEW_TOKENS);
    // Stop at the 6th greedy token: the output ends with its first occurrence.
    let stop = greedy[5];
    let first = greedy.iter().position(|&t| t == stop).unwrap();
    let mut streamed = Vec::new();
    let g = model
        .generate(&be, &prompt(), &greedy_opts(NEW_TOKENS, vec![stop]), |t| {
            streamed.push(t);
            Ok(())
        })
        .unwrap();
    assert_eq!(g.tokens, greedy[..=first].to_vec());
    assert_eq!(g.stop, StopReason::Eos);
    assert_eq!(streamed, g.tokens, "every token is streamed as it is chosen");

    // max_position_embeddings is 128: a prompt of 120 leaves room for the
    // positions 120..127, i.e. 8 fed tokens and a 9th chosen from position 127.
    assert_eq!(model.cfg.max_position_embeddings, Some(128));
    let long: Vec<u32> = (0..120).map(|i| 3 + (i * 7 % 100) as u32).collect();
    assert_eq!(model.cache_capacity(long.len(), 50), 128);
    let g = model.generate(&be, &long, &greedy_opts(50, vec![]), |_| Ok(())).unwrap();
    assert_eq!((g.tokens.len(), g.stop), (9, StopReason::ContextFull));
    let too_long: Vec<u32> = vec![5; 128];
    let e = model.generate(&be, &too_long, &greedy_opts(5, vec![]), |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("the prompt has 128 tokens; the model's max_position_embeddings is 128"), "{e}");
    // Bad input is an error, not a panic.
    let e = model.generate(&be, &[1, 131], &greedy_opts(5, vec![]), |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("token id 131 (new token 1) is outside the vocabulary (size 131)"), "{e}");
    let e = model.generate(&be, &[], &greedy_opts(5, vec![]), |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("the prompt has no tokens"), "{e}");
}

#[test]
fn sampling_is_seeded_and_top_k_1_is_greedy() {
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "llama");
    let (greedy, _) = greedy_by_recompute(&be, &model, &prompt(), NEW_TOKENS);
    let run = |sampling: SamplingParams, seed: u64| {
        let opts = GenerateOpts { max_new_tokens: NEW_TOKENS, sampling, seed, stop_tokens: vec![] };
        model.generate(&be, &prompt(), &opts, |_| Ok(())).unwrap().tokens
    };
    // top_k = 1 leaves one token with probability 1, whatever the temperature.
    let top1 = SamplingParams { temperature: 1.5, top_k: Some(1), top_p: None, min_p: None };
    assert_eq!(run(top1, 3), greedy);
    let hot = SamplingParams { temperature: 1.0, top_k: None, top_p: Some(0.95), min_p: None };
    assert_eq!(run(hot, 42), run(hot, 42), "the same seed gives the same tokens");
    assert_ne!(run(hot, 42), run(hot, 43), "another seed, another sample");
    // Out-of-range parameters are refused before any work.
    let bad = SamplingParams { temperature: 1.0, top_k: None, top_p: Some(1.5), min_p: None };
    let opts = GenerateOpts { max_new_tokens: 3, sampling: bad, seed: 0, stop_tokens: vec![] };
    let e = model.generate(&be, &prompt(), &opts, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("top_p must be in (0, 1]"), "{e}");
}

#[test]
fn bf16_storage_keeps_cached_logits_within_the_gpu_tolerance() {
    // The Qwen3.5 fixtures are left out: their random delta-net weights
    // (chosen so every feature moves the logits) amplify bf16 rounding in
    // transformers itself. On ids [1, 17, 33, 58, 91, 12, 44, 7, 99, 23, 5,
    // 64], transformers in bf16 is 9.4e-2 (worst row, norm-relative) from
    // its f32 logits on qwen3_5, against 1.1e-2 on llama and 1.5e-2 on
    // gemma3; ferrotune's bf16 simulation gives 6.6e-2, 1.3e-2 and 1.2e-2.
    // The gemma4 fixture is left out for the same reason: transformers in
    // bf16 is 6.2e-2 from its f32 logits there (simulation: 3.1e-2).
    for case in CASES.iter().filter(|c| !c.starts_with("qwen3_5") && **c != "gemma4") {
        let err = teacher_forced_logits_rel_err(&Bf16Sim::new(CpuBackend::new()), case);
        eprintln!("{case}: bf16-simulated cached logits, worst rel error {err:.2e}");
        assert!(err <= GPU_LOGITS_TOL / 3.0, "{case}: {err:e} is not 3x inside {:e}", GPU_LOGITS_TOL);
    }
}

#[test]
fn eos_token_id_may_be_an_int_a_list_or_absent() {
    let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert_eq!(token_ids(Some(&j("2")), "eos_token_id", "c.json").unwrap(), vec![2]);
    assert_eq!(token_ids(Some(&j("[128001, 128009]")), "eos_token_id", "c.json").unwrap(), vec![128001, 128009]);
    assert_eq!(token_ids(Some(&j("null")), "eos_token_id", "c.json").unwrap(), Vec::<u32>::new());
    assert_eq!(token_ids(None, "eos_token_id", "c.json").unwrap(), Vec::<u32>::new());
    let e = token_ids(Some(&j("\"</s>\"")), "eos_token_id", "c.json").unwrap_err().to_string();
    assert!(e.contains("c.json: \"eos_token_id\" must be a token id or a list of token ids"), "{e}");
    let ckpt = Checkpoint::open(&fixture("llama").join("model")).unwrap();
    assert_eq!(ckpt.config.eos_token_ids, vec![2]);
}

// ---- the `generate` subcommand ---------------------------------------------

fn ferrotune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune")).args(args).output().expect("run ferrotune")
}

#[test]
fn cli_greedy_text_equals_library_greedy_decoding() {
    let dir = fixture("llama").join("model");
    let adapter = fixture("llama").join("adapter");
    let text = "The cat";
    // The library: tokenize with special tokens, greedy by recomputation,
    // stop at EOS (id 2 in config.json), decode without special tokens.
    let tok = checkpoint::load_tokenizer(&dir).unwrap();
    let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], 1, "the prompt starts with BOS");
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, "llama");
    let (mut greedy, _) = greedy_by_recompute(&be, &model, &ids, NEW_TOKENS);
    if let Some(eos) = greedy.iter().position(|&t| t == 2) {
        greedy.truncate(eos + 1);
    }
    let want = tok.decode(&greedy, true).unwrap();
    assert!(!want.is_empty());

    let out = ferrotune(&[
        "generate", "--model", dir.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--prompt", text,
        "--temperature", "0", "--max-new-tokens", &NEW_TOKENS.to_string(), "--device", "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{want}\n"));
    assert!(stderr.contains(&format!("prefill: {} tokens", ids.len())) && stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn cli_refuses_bad_flags_clearly() {
    let dir = fixture("llama").join("model");
    let model = dir.to_str().unwrap();
    for (flag, value, needle) in [
        ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
        ("--top-p", "0", "must be in (0, 1], got 0"),
        ("--temperature", "-1", "must be a finite number >= 0"),
        ("--max-new-tokens", "-3", "invalid value '-3'"),
        ("--top-k", "x", "invalid value 'x'"),
    ] {
        let out = ferrotune(&["generate", "--model", model, "--prompt", "The", flag, value, "--device", "cpu"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(stderr.contains(flag) && stderr.contains(needle), "{flag} {value}: {stderr}");
    }
    // --system only makes sense with --chat.
    let out = ferrotune(&["generate", "--model", model, "--prompt", "The", "--system", "Be brief.", "--device", "cpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--chat"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn cli_chat_renders_the_prompt_through_the_chat_template() {
    let dir = fixture("llama").join("model");
    let model = dir.to_str().unwrap();
    // The fixture tokenizer has no chat template of its own: a clear error
    // that names the way out.
    let out = ferrotune(&["generate", "--model", model, "--prompt", "hi", "--chat", "--temperature", "0", "--device", "cpu"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("has no chat_template"), "{stderr}");
    // With a built-in template the prompt is the rendered conversation.
    let out = ferrotune(&[
        "generate", "--model", model, "--prompt", "hi", "--chat", "--chat-template", "chatml", "--system", "be brief",
        "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    let tok = checkpoint::load_tokenizer(&dir).unwrap();
    let n = tok.encode(rendered, false).unwrap().get_ids().len();
    assert!(stderr.contains(&format!("prompt {n} tokens")), "expected the {n} tokens of the chatml rendering: {stderr}");
}
