//! Model-level properties on the fixtures: varlen batches equal separate
//! runs, the backward is the gradient of the loss (directional finite
//! difference, with and without LoRA dropout), fresh adapters follow PEFT's
//! init, and PEFT save/load round-trips.

mod common;

use common::{Reference, fixture, load_with_adapter, max_abs_err, rel_err};
use ferrotune::adapter::{LoraConfig, Targets, peft};
use ferrotune::backend::Backend;
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::batch::{Batch, Sequence};
use ferrotune::model::checkpoint::Checkpoint;
use ferrotune::model::graph::{BackwardOpts, LossSum};
use ferrotune::model::{Model, Proj};
use ferrotune::util::rng::Rng;

fn base(case: &str) -> (CpuBackend, Model<CpuBackend>) {
    let be = CpuBackend::new();
    let model = Model::load(&be, &Checkpoint::open(&fixture(case).join("model")).unwrap()).unwrap();
    (be, model)
}

fn with_adapter(case: &str) -> (CpuBackend, Model<CpuBackend>) {
    let be = CpuBackend::new();
    let model = load_with_adapter(&be, case);
    (be, model)
}

fn fb(be: &CpuBackend, model: &mut Model<CpuBackend>, seqs: &[Sequence], seed: Option<u64>) -> LossSum {
    let batch = Batch::from_sequences(seqs, model.cfg.vocab).unwrap();
    let opts = BackwardOpts { grad_scale: 1.0 / batch.n_targets() as f32, gradient_checkpointing: false, dropout_seed: seed };
    model.zero_grad(be);
    model.forward_backward(be, &batch, opts)
}

/// All LoRA parameters (A then B of each module) and gradients, flattened.
fn params(be: &CpuBackend, model: &Model<CpuBackend>) -> (Vec<f32>, Vec<f32>) {
    let (mut p, mut g) = (vec![], vec![]);
    for (_, _, l) in model.loras() {
        p.extend(be.download(&l.a));
        p.extend(be.download(&l.b));
        g.extend(be.download(&l.grad_a));
        g.extend(be.download(&l.grad_b));
    }
    (p, g)
}

fn set_params(be: &CpuBackend, model: &mut Model<CpuBackend>, flat: &[f32]) {
    let mut off = 0;
    for (_, _, l) in model.loras_mut() {
        for buf in [&mut l.a, &mut l.b] {
            let n = be.len(buf);
            *buf = be.upload(&flat[off..off + n]);
            off += n;
        }
    }
    assert_eq!(off, flat.len());
}

#[test]
fn varlen_batch_equals_each_sequence_alone() {
    // Sequences sharing a batch must not see each other (mistral: with a
    // sliding window; llama3: with llama3 rope scaling).
    for case in ["mistral", "llama3"] {
        let (be, model) = with_adapter(case);
        let (seqs, _) = Reference::load(case).sequences();
        let together = model.logits(&be, &Batch::from_sequences(&seqs, model.cfg.vocab).unwrap());
        let alone: Vec<f32> = seqs
            .iter()
            .flat_map(|s| model.logits(&be, &Batch::from_sequences(std::slice::from_ref(s), model.cfg.vocab).unwrap()))
            .collect();
        // Different GEMM shapes may block the sums differently: f32 rounding only.
        let err = max_abs_err(&together, &alone);
        assert!(err <= 1e-5, "{case}: batched vs alone logits differ by {err:e}");
    }
}

#[test]
fn gradient_is_the_directional_derivative_of_the_loss() {
    // L(θ ± εu) with u = g/‖g‖ over all LoRA parameters: (L+ − L−)/2ε ≈ ‖g‖.
    // f32 loss noise ~1e-6 against a difference of 2ε‖g‖ ~1e-3, and the
    // curvature error is O(ε²): 1e-2 relative is a meaningful bound.
    for (case, seed) in [("llama", None), ("qwen2", Some(11u64))] {
        let (be, mut model) = with_adapter(case);
        if seed.is_some() {
            for (_, _, l) in model.loras_mut() {
                l.dropout = 0.3;
            }
        }
        let (seqs, _) = Reference::load(case).sequences();
        fb(&be, &mut model, &seqs, seed);
        let (theta, g) = params(&be, &model);
        let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let eps = 1e-3f64;
        let shifted = |sign: f64| -> Vec<f32> {
            theta.iter().zip(&g).map(|(t, gi)| (*t as f64 + sign * eps * *gi as f64 / norm) as f32).collect()
        };
        set_params(&be, &mut model, &shifted(1.0));
        let lp = fb(&be, &mut model, &seqs, seed).mean();
        set_params(&be, &mut model, &shifted(-1.0));
        let lm = fb(&be, &mut model, &seqs, seed).mean();
        let fd = (lp - lm) / (2.0 * eps);
        let rel = (fd - norm).abs() / norm;
        eprintln!("{case} (dropout {seed:?}): ‖g‖ = {norm:.6}, finite difference {fd:.6}, rel {rel:.2e}");
        assert!(rel < 1e-2, "{case}: directional derivative {fd} vs ‖g‖ {norm}");
    }
}

#[test]
fn dropout_changes_gradients_and_checkpointing_replays_the_same_masks() {
    let (be, mut model) = with_adapter("llama");
    for (_, _, l) in model.loras_mut() {
        l.dropout = 0.25;
    }
    let (seqs, _) = Reference::load("llama").sequences();
    let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
    let run = |model: &mut Model<CpuBackend>, ckpt: bool, seed: Option<u64>| {
        model.zero_grad(&be);
        let opts = BackwardOpts { grad_scale: 0.1, gradient_checkpointing: ckpt, dropout_seed: seed };
        model.forward_backward(&be, &batch, opts);
        params(&be, model).1
    };
    let plain = run(&mut model, false, None);
    let dropped = run(&mut model, false, Some(5));
    let dropped_ckpt = run(&mut model, true, Some(5));
    let other_seed = run(&mut model, false, Some(6));
    assert!(rel_err(&dropped, &plain) > 1e-2, "dropout had no effect");
    assert!(rel_err(&other_seed, &dropped) > 1e-2, "the seed does not change the masks");
    assert!(dropped.iter().zip(&dropped_ckpt).all(|(a, b)| a.to_bits() == b.to_bits()), "checkpointing changed dropout masks");
}

#[test]
fn fresh_adapter_follows_peft_init_and_leaves_the_model_unchanged() {
    let (be, mut model) = base("llama3");
    let (seqs, _) = Reference::load("llama3").sequences();
    let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
    let before = model.logits(&be, &batch);
    let lc = LoraConfig::new(8, 16.0, Targets::Names(vec!["q_proj".into(), "down_proj".into()]));
    let n = model.attach_lora(&be, &lc, &mut Rng::new(1)).unwrap();
    assert_eq!(n, 2 * model.cfg.n_layers);
    for (_, p, l) in model.loras() {
        assert!(matches!(p, Proj::Q | Proj::Down));
        let in_f = be.len(&l.a) / l.r;
        let bound = 1.0 / (in_f as f32).sqrt();
        let a = be.download(&l.a);
        assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|x| x.abs() > 0.5 * bound));
        assert!(be.download(&l.b).iter().all(|&x| x == 0.0), "B starts at zero");
        assert_eq!(l.scale, 2.0);
    }
    // B = 0: the adapted model computes exactly the base model.
    assert_eq!(model.logits(&be, &batch), before);
}

#[test]
fn target_patterns_rank_pattern_and_rslora() {
    let (be, mut model) = base("llama");
    let mut lc = LoraConfig::new(4, 8.0, Targets::Regex(r".*layers\.1\.self_attn\.(q|v)_proj".into()));
    lc.rank_pattern.insert("v_proj".into(), 2);
    lc.use_rslora = true;
    assert_eq!(model.attach_lora(&be, &lc, &mut Rng::new(2)).unwrap(), 2);
    let got: Vec<(usize, Proj, usize, f32)> = model.loras().map(|(li, p, l)| (li, p, l.r, l.scale)).collect();
    assert_eq!(got, vec![(1, Proj::Q, 4, 8.0 / 2.0), (1, Proj::V, 2, 8.0 / 2f32.sqrt())]);
    let none = LoraConfig::new(4, 8.0, Targets::Names(vec!["c_attn".into()]));
    let err = model.attach_lora(&be, &none, &mut Rng::new(2)).unwrap_err().to_string();
    assert!(err.contains("match no module") && err.contains("model.layers.0.self_attn.q_proj"), "{err}");
}

#[test]
fn peft_save_then_load_round_trips() {
    let (be, model) = with_adapter("mistral");
    let lc = peft::read_config(&fixture("mistral").join("adapter")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    peft::save(&be, &model, &lc, tmp.path()).unwrap();
    let (_, mut reloaded) = base("mistral");
    assert_eq!(peft::load(&be, &mut reloaded, tmp.path()).unwrap(), 14);
    let (seqs, _) = Reference::load("mistral").sequences();
    let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
    assert_eq!(model.logits(&be, &batch), reloaded.logits(&be, &batch));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert!(!tmp.path().join("adapter_model.safetensors.tmp").exists());
}

#[test]
fn adapter_with_foreign_tensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("llama").join("adapter");
    std::fs::copy(src.join("adapter_config.json"), tmp.path().join("adapter_config.json")).unwrap();
    let data: Vec<f32> = vec![0.0; 4 * 32];
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 32], &bytes).unwrap();
    let st = safetensors::serialize(
        vec![("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight".to_string(), view)],
        None,
    )
    .unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), st).unwrap();
    let (be, mut model) = base("llama");
    let err = format!("{:#}", peft::load(&be, &mut model, tmp.path()).unwrap_err());
    assert!(err.contains("match no module") && err.contains("transformer.h.0.attn.c_attn.lora_A.weight"), "{err}");
}

#[test]
fn forward_backward_is_bit_identical_run_to_run() {
    let (be, mut model) = with_adapter("qwen2");
    let (seqs, _) = Reference::load("qwen2").sequences();
    let l1 = fb(&be, &mut model, &seqs, Some(3));
    let g1 = params(&be, &model).1;
    let l2 = fb(&be, &mut model, &seqs, Some(3));
    let g2 = params(&be, &model).1;
    assert_eq!(l1.nll_sum.to_bits(), l2.nll_sum.to_bits());
    assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn chunked_lm_head_gives_the_same_loss_and_gradients() {
    // 27 tokens in chunks of 5 (the last one partial, and one chunk with no
    // targets is skipped) against a single chunk.
    let (be, mut model) = with_adapter("llama");
    let (seqs, _) = Reference::load("llama").sequences();
    model.loss_chunk_tokens = 1 << 20;
    let whole = fb(&be, &mut model, &seqs, None);
    let g_whole = params(&be, &model).1;
    model.loss_chunk_tokens = 5;
    let chunked = fb(&be, &mut model, &seqs, None);
    let g_chunked = params(&be, &model).1;
    assert_eq!(whole.nll_sum.to_bits(), chunked.nll_sum.to_bits());
    let e = rel_err(&g_chunked, &g_whole);
    assert!(e <= 1e-6, "chunked LM head gradient rel err {e:e}");
}

#[test]
fn adamw_steps_lower_the_loss_and_clipping_bounds_the_norm() {
    use ferrotune::train::optimizer::{AdamWConfig, Optimizer};
    let (be, mut model) = with_adapter("llama");
    let (seqs, _) = Reference::load("llama").sequences();
    let cfg = AdamWConfig { max_grad_norm: Some(0.5), ..AdamWConfig::default() };
    let mut opt = Optimizer::new(&be, &model, cfg);
    let first = fb(&be, &mut model, &seqs, None).mean();
    let norm = opt.step(&be, &mut model, 1e-2);
    // The returned norm is the pre-clip one; the clipped gradients have norm 0.5.
    assert!(norm > 0.5, "pre-clip norm {norm}");
    let clipped = Optimizer::grad_norm(&be, &model);
    assert!((clipped - 0.5).abs() < 1e-4, "clipped norm {clipped}");
    let mut last = first;
    for _ in 0..20 {
        last = fb(&be, &mut model, &seqs, None).mean();
        opt.step(&be, &mut model, 1e-2);
    }
    assert!(last < first - 0.5, "loss went from {first} to {last} in 20 AdamW steps");
}

#[test]
fn per_token_weights_give_the_weighted_sum_of_per_sequence_gradients() {
    // The preference objectives weight each sequence's tokens by that
    // sequence's dL/dlogp, chosen after the forward from the losses. The
    // gradient must be Σ_s w_s · ∇NLL_s, i.e. each sequence alone with its
    // own uniform scale, accumulated.
    use ferrotune::model::graph::{Head, TokenWeights};
    for case in ["llama", "qwen2"] {
        let (be, mut model) = with_adapter(case);
        if case == "qwen2" {
            // Chunks of the LM head that cut through sequences, too.
            model.loss_chunk_tokens = 5;
        }
        let (seqs, _) = Reference::load(case).sequences();
        let w_seq = [0.7f32, -1.3, 0.25];
        let batch = Batch::from_sequences(&seqs, model.cfg.vocab).unwrap();
        let opts = BackwardOpts { grad_scale: 0.0, gradient_checkpointing: false, dropout_seed: None };

        model.zero_grad(&be);
        let cu = batch.cu_seqlens.clone();
        let mut seen_losses = Vec::new();
        let mut choose = |nll: &[f32]| -> anyhow::Result<Vec<f32>> {
            seen_losses = nll.to_vec();
            let mut w = vec![0f32; nll.len()];
            for s in 0..cu.len() - 1 {
                w[cu[s] as usize..cu[s + 1] as usize].fill(w_seq[s]);
            }
            Ok(w)
        };
        let nll = model.forward_backward_with(&be, &batch, opts, Head::Tokens(TokenWeights::FromLosses(&mut choose))).unwrap();
        assert_eq!(nll, seen_losses);
        let (_, weighted) = params(&be, &model);

        model.zero_grad(&be);
        let mut alone_nll = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            let b = Batch::from_sequences(std::slice::from_ref(seq), model.cfg.vocab).unwrap();
            let o = BackwardOpts { grad_scale: w_seq[s], ..opts };
            alone_nll.push(model.forward_backward(&be, &b, o).nll_sum);
        }
        let (_, summed) = params(&be, &model);
        let err = rel_err(&weighted, &summed);
        assert!(err <= 1e-5, "{case}: weighted gradient vs per-sequence sum: rel err {err:e}");
        // The returned per-token losses sum to each sequence's NLL.
        for s in 0..seqs.len() {
            let got: f64 = nll[cu[s] as usize..cu[s + 1] as usize].iter().map(|&x| x as f64).sum();
            assert!((got - alone_nll[s]).abs() <= 1e-4 * alone_nll[s].abs().max(1.0), "{case}: seq {s} NLL {got} vs {}", alone_nll[s]);
        }
    }
}

#[test]
fn adapters_off_is_the_base_model() {
    // The reference policy: the same model with its adapters switched off.
    let (be, with) = with_adapter("llama");
    let (_, base) = base("llama");
    let (seqs, _) = Reference::load("llama").sequences();
    let batch = Batch::from_sequences(&seqs, with.cfg.vocab).unwrap();
    let off = with.token_nll(&be, &batch, false);
    let plain = base.token_nll(&be, &batch, true);
    assert_eq!(off, plain, "adapters off must be bit-identical to the base model");
    assert_ne!(with.token_nll(&be, &batch, true), plain, "the fixture adapter changes the losses");
}
