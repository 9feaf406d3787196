//! Greedy decoding two ways (recomputing the whole sequence each step, and
//! through the KV cache) and the bf16 bound on cached logits, shared by
//! tests/generate.rs and tests/gpu.rs.
#![allow(dead_code)]

use crate::common::{load_with_adapter, rel_err};
use ferrotune::backend::Backend;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::Model;
use ferrotune::model::batch::{Batch, Sequence};
use ferrotune::model::sample::argmax;

/// Worst norm-relative error of a bf16 GPU backend's cached logits against
/// the CPU's over a teacher-forced generation (see
/// `teacher_forced_logits_rel_err`). Storing activations and weights in
/// bf16 (2^-9 relative per rounding, along every layer of prefill and each
/// step) moved the logits of the fixtures by 1.0e-2 to 1.8e-2 (mistral) in
/// the CPU simulation of that storage (Bf16Sim); the bound leaves 3x room.
pub const GPU_LOGITS_TOL: f64 = 6e-2;

pub const NEW_TOKENS: usize = 20;

/// Fixtures whose teacher-forced generation is left out of the bf16 cached
/// logits checks: after the prompt the Qwen3.5 fixtures' greedy tokens
/// repeat one token, and on that sequence bf16 itself moves the logits far.
/// On prompt() + 19 × token 11 with the adapter, transformers in bf16 is up
/// to 1.6e-1 (norm-relative, one row) from its own float32 logits, and
/// ferrotune's bf16 simulation 1.5e-1 from its float32 ones. Their bf16 loss
/// and gradients are held to the GPU tolerances like every fixture's.
pub const BF16_UNSTABLE_GENERATION: &[&str] = &["qwen3_5", "qwen3_5_vlm"];

/// A prompt of 7 in-vocabulary ids (BOS first), the same for every fixture.
pub fn prompt() -> Vec<u32> {
    vec![1, 38, 18, 15, 37, 13, 11]
}

/// The logits of the last position of `seq`, recomputed from scratch.
pub fn last_logits<B: Backend>(be: &B, model: &Model<B>, seq: &[u32]) -> Vec<f32> {
    let batch = Batch::from_sequences(&[Sequence::unmasked(seq.to_vec())], model.cfg.vocab).unwrap();
    let all = model.logits(be, &batch);
    all[(seq.len() - 1) * model.cfg.vocab..].to_vec()
}

/// Greedy decoding by recomputing the full forward every step: the tokens
/// and each step's logits.
pub fn greedy_by_recompute<B: Backend>(be: &B, model: &Model<B>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut seq = prompt.to_vec();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let l = last_logits(be, model, &seq);
        let t = argmax(&l) as u32;
        seq.push(t);
        tokens.push(t);
        logits.push(l);
    }
    (tokens, logits)
}

/// Greedy decoding through the KV cache, one token per step after the
/// prefill: the tokens and each step's logits.
pub fn greedy_cached<B: Backend>(be: &B, model: &Model<B>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_kv_cache(be, model.cache_capacity(prompt.len(), n));
    let mut l = model.forward_cached(be, &mut cache, prompt).unwrap();
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for step in 0..n {
        let t = argmax(&l) as u32;
        tokens.push(t);
        if step + 1 < n {
            let next = model.forward_cached(be, &mut cache, &[t]).unwrap();
            logits.push(std::mem::replace(&mut l, next));
        }
    }
    logits.push(l);
    assert_eq!(cache.len(), prompt.len() + n - 1);
    (tokens, logits)
}

/// Worst norm-relative error of the cached logits of a bf16-storage backend
/// against the f32 CPU ones over a teacher-forced generation (the CPU's
/// greedy tokens fed to both, so one flipped argmax cannot derail the
/// comparison). tests/gpu.rs holds the CUDA backend to GPU_LOGITS_TOL; this
/// measures a correct bf16 implementation (Bf16Sim) against it.
pub fn teacher_forced_logits_rel_err<B: Backend>(be: &B, case: &str) -> f64 {
    let cpu = CpuBackend::new();
    let m_cpu = load_with_adapter(&cpu, case);
    let (tokens, want) = greedy_cached(&cpu, &m_cpu, &prompt(), NEW_TOKENS);
    let model = load_with_adapter(be, case);
    let mut cache = model.new_kv_cache(be, prompt().len() + NEW_TOKENS);
    let mut worst = 0.0f64;
    let mut l = model.forward_cached(be, &mut cache, &prompt()).unwrap();
    for (step, w) in want.iter().enumerate() {
        worst = worst.max(rel_err(&l, w));
        if step + 1 < want.len() {
            l = model.forward_cached(be, &mut cache, &[tokens[step]]).unwrap();
        }
    }
    worst
}

