//! The memory planner (`train::memory`) against a measurement: the CPU
//! backend wrapped in `Metered` counts every buffer and weight the model
//! allocates; one LoRA training step (zero_grad, forward_backward, AdamW)
//! runs on synthetic models, and every component of the prediction must
//! equal what was measured, to the byte.
//!
//! `Metered` sizes buffers by its constructor's bytes per element, not by
//! what the CPU stores, so the same run also replays a bf16 GPU backend's
//! allocation pattern (activations and weights 2 bytes, f32 state 4): that
//! checks that the planner classifies every buffer as activation or f32
//! storage exactly as the graph allocates it.

use ferrotune::adapter::{LoraConfig, Targets};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune_testkit::metered::Metered;
use ferrotune::model::batch::{Batch, Sequence};
use ferrotune::model::hparams::ModelConfig;
use ferrotune::model::graph::BackwardOpts;
use ferrotune::model::synth::{self, SynthSpec};
use ferrotune::model::Model;
use ferrotune::train::memory::{self, Phase, RunShape, Setting};
use ferrotune::train::optimizer::{AdamWConfig, Optimizer};
use ferrotune::util::rng::Rng;
use std::collections::BTreeMap;

/// The "tiny" preset with three layers and a larger vocabulary.
fn tiny() -> SynthSpec {
    let mut s = synth::preset("tiny").unwrap();
    s.layers = 3;
    s.vocab = 1000;
    s
}

fn config(spec: &SynthSpec) -> ModelConfig {
    synth::model_config(spec).unwrap()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    micro_batch: usize,
    seq_len: usize,
    gc: bool,
    chunk: usize,
    act_bytes: usize,
    weight_bytes: usize,
}

/// Measures one step on `Metered<CpuBackend>` and checks every component of
/// the plan. Returns the plan.
fn check(cfg: &ModelConfig, lc: &LoraConfig, c: Case) -> memory::MemoryPlan {
    let shape = RunShape {
        micro_batch: c.micro_batch,
        seq_len: c.seq_len,
        gradient_checkpointing: c.gc,
        loss_chunk_tokens: c.chunk,
        act_bytes: c.act_bytes,
        weight_bytes: c.weight_bytes,
        reserve_bytes: 0,
        // Metered<CpuBackend> multiplies its buffers as they are (no bf16
        // operand copies); tests/cuda_emu.rs checks the CUDA backend's.
        product_casts: false,
    };
    // Planned before any weight exists.
    let plan = memory::plan_lora(cfg, lc, &shape).unwrap();

    let be = Metered::new(CpuBackend::new(), c.act_bytes, c.weight_bytes);
    let mut model = Model::random(&be, cfg.clone(), 7).unwrap();
    model.loss_chunk_tokens = c.chunk;
    let loaded = be.usage().live;
    let mut rng = Rng::new(11);
    model.attach_lora(&be, lc, &mut rng).unwrap();
    let with_lora = be.usage().live;
    let mut opt = Optimizer::new(&be, &model, AdamWConfig::default());
    let with_opt = be.usage().live;
    // Set-up allocates nothing transient.
    assert_eq!(be.peak_bytes(), with_opt.total, "{c:?}");

    let seqs: Vec<Sequence> = (0..c.micro_batch)
        .map(|_| Sequence::unmasked((0..c.seq_len).map(|_| (rng.next_u64() % cfg.vocab as u64) as u32).collect()))
        .collect();
    let batch = Batch::from_sequences(&seqs, cfg.vocab).unwrap();
    let opts = BackwardOpts {
        grad_scale: 1.0 / batch.n_targets() as f32,
        gradient_checkpointing: c.gc,
        dropout_seed: Some(3),
    };
    be.reset_peak();
    model.zero_grad(&be);
    let loss = model.forward_backward(&be, &batch, opts);
    opt.step(&be, &mut model, 1e-3);
    assert!(loss.mean().is_finite());
    let peak = be.peak_bytes() as u64;
    // Nothing of the step outlives it.
    assert_eq!(be.live_bytes(), with_opt.total, "{c:?}");

    let u = |x: usize| x as u64;
    assert_eq!(plan.weights, u(loaded.weights), "weights {c:?}");
    assert_eq!(plan.workspace, u(loaded.f32 + loaded.act + loaded.ints), "workspace (inv_freq) {c:?}");
    assert_eq!(plan.adapter, u(with_lora.total - loaded.total), "adapter {c:?}");
    assert_eq!(plan.optimizer, u(with_opt.total - with_lora.total), "optimizer {c:?}");
    assert_eq!(
        plan.activations_peak,
        peak - u(with_opt.total),
        "activation peak {c:?}, planned at {}\n{plan}",
        plan.peak_at
    );
    assert_eq!(plan.total, peak, "{c:?}");
    plan
}

fn shapes() -> Vec<(usize, usize, usize)> {
    // (micro_batch, seq_len, loss chunk): one chunk, several chunks with a
    // short last one, and chunks small enough that the backward is the peak.
    vec![(1, 40, 1024), (2, 48, 64), (3, 33, 16), (2, 64, 8)]
}

fn run_matrix(cfg: &ModelConfig, lc: &LoraConfig, act_bytes: usize, weight_bytes: usize) -> Vec<Phase> {
    let mut phases = Vec::new();
    for (micro_batch, seq_len, chunk) in shapes() {
        for gc in [false, true] {
            let c = Case { micro_batch, seq_len, gc, chunk, act_bytes, weight_bytes };
            phases.push(check(cfg, lc, c).peak_at);
        }
    }
    phases
}

#[test]
fn all_linear_f32_matches_measurement() {
    let cfg = config(&tiny());
    let lc = LoraConfig::new(8, 16.0, Targets::AllLinear);
    let phases = run_matrix(&cfg, &lc, 4, 4);
    // The matrix exercises both kinds of peak, with and without checkpointing.
    assert!(phases.contains(&Phase::HeadLoss), "{phases:?}");
    assert!(phases.iter().any(|p| matches!(p, Phase::Backward { .. })), "{phases:?}");
}

#[test]
fn subset_with_rank_pattern_and_dropout_bf16_sizes_match_measurement() {
    let cfg = config(&tiny());
    let mut lc = LoraConfig::new(4, 8.0, Targets::Names(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]));
    lc.dropout = 0.1;
    lc.rank_pattern = BTreeMap::from([("down_proj".to_string(), 12), (r"layers\.2\.self_attn\.q_proj".to_string(), 2)]);
    // The planner's module list is the one attach_lora builds.
    let planned: Vec<_> = memory::adapted_modules(&cfg, &lc).unwrap().iter().map(|m| (m.layer, m.proj, m.r)).collect();
    let be = CpuBackend::new();
    let mut model = Model::random(&be, cfg.clone(), 1).unwrap();
    model.attach_lora(&be, &lc, &mut Rng::new(0)).unwrap();
    let attached: Vec<_> = model.loras().map(|(l, p, a)| (l, p, a.r)).collect();
    assert_eq!(planned, attached);
    assert!(attached.contains(&(2, ferrotune::model::Proj::Q, 2)), "{attached:?}");

    run_matrix(&cfg, &lc, 2, 2);
    run_matrix(&cfg, &lc, 4, 4);
}

fn small(family: &str, hidden: usize, heads: usize, kv_heads: usize, head_dim: usize, intermediate: usize) -> SynthSpec {
    SynthSpec {
        family: family.into(),
        hidden,
        layers: 2,
        heads,
        kv_heads,
        intermediate,
        vocab: 300,
        tie: false,
        rope_theta: 1e6,
        extra: serde_json::json!({"head_dim": head_dim}),
    }
}

#[test]
fn qwen3_5_delta_net_layers_match_measurement() {
    // Three gated delta-net layers and one gated full-attention layer: the
    // delta-net's projections, inputs, output and saved chunk states (one
    // per 64 tokens begun, f32) and the gated attention's doubled q_proj
    // and gate, planned against a measured step, sequences shorter and
    // longer than a chunk.
    let mut spec = small("qwen3_5", 48, 4, 2, 16, 96);
    spec.layers = 4;
    spec.tie = true;
    spec.extra = serde_json::json!({"head_dim": 16, "full_attention_interval": 4, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 12,
        "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25});
    let cfg = config(&spec);
    assert_eq!(cfg.layer_mixer.iter().filter(|&&m| m == ferrotune::model::hparams::Mixer::DeltaNet).count(), 3);
    let lc = LoraConfig::new(4, 8.0, Targets::AllLinear);
    for (micro_batch, seq_len, chunk) in [(2, 40, 4), (1, 150, 4096), (3, 70, 16)] {
        for gc in [false, true] {
            check(&cfg, &lc, Case { micro_batch, seq_len, gc, chunk, act_bytes: 2, weight_bytes: 2 });
        }
    }
}

#[test]
fn gemma4_layers_of_their_own_sizes_match_measurement() {
    // Sliding layers of head 8 and full ones of head 16 (K=V: no v_proj),
    // the last two layers reading earlier K/V with a double-wide MLP, and
    // per-layer embeddings: every LoRA (per_layer_model_projection's too)
    // sized by its own layer, planned against a measured step.
    let mut spec = small("gemma4", 32, 4, 2, 8, 48);
    spec.layers = 5;
    spec.tie = true;
    spec.extra = serde_json::json!({"head_dim": 8, "global_head_dim": 16, "num_global_key_value_heads": 1,
        "hidden_act": null, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": 5,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 300, "num_kv_shared_layers": 2,
        "use_double_wide_mlp": true, "attention_k_eq_v": true, "final_logit_softcapping": 30.0,
        "rope_parameters": {
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}});
    let cfg = config(&spec);
    let g = cfg.gemma4.as_ref().expect("a Gemma 4 config");
    assert_eq!((g.head_dim.clone(), g.intermediate.clone()), (vec![8, 16, 8, 8, 16], vec![48, 48, 48, 96, 96]));
    let lc = LoraConfig::new(4, 8.0, Targets::AllLinear);
    for (micro_batch, seq_len, chunk) in [(2, 12, 4), (1, 40, 4096)] {
        for gc in [false, true] {
            check(&cfg, &lc, Case { micro_batch, seq_len, gc, chunk, act_bytes: 2, weight_bytes: 2 });
        }
    }
}

#[test]
fn biases_tied_embeddings_and_other_shapes_match_measurement() {
    // The backward's transient peak is the largest of three points (see
    // train::memory): each of these shapes makes a different one largest.
    // - Qwen2-style (q/k/v biases), tied embeddings, q wider than the
    //   residual stream: at dv, 2nI + nh + 2n·qd + 2n·kvd.
    let mut qwen = small("qwen2", 48, 4, 1, 32, 96);
    qwen.tie = true;
    qwen.extra = serde_json::json!({"head_dim": 32, "use_sliding_window": false});
    // - q narrower than the residual stream: at dh1, 2nI + 2nh + n·qd + 2n·kvd.
    let narrow = small("llama", 64, 4, 4, 8, 64);
    // - a wide MLP: at d_up, 3nI.
    let wide_mlp = small("llama", 64, 4, 2, 16, 512);
    for spec in [qwen, narrow, wide_mlp] {
        let cfg = config(&spec);
        if spec.family == "qwen2" {
            assert!(cfg.qkv_bias && cfg.tie_word_embeddings && cfg.n_heads * cfg.head_dim > cfg.hidden);
        }
        let lc = LoraConfig::new(4, 8.0, Targets::AllLinear);
        for (micro_batch, seq_len, chunk) in [(2, 40, 4), (1, 64, 4096)] {
            for gc in [false, true] {
                let c = Case { micro_batch, seq_len, gc, chunk, act_bytes: 2, weight_bytes: 2 };
                let plan = check(&cfg, &lc, c);
                if chunk == 4 {
                    assert!(matches!(plan.peak_at, Phase::Backward { .. }), "{c:?}: {}", plan.peak_at);
                }
            }
        }
    }
}

#[test]
fn fit_check_names_the_settings_that_fit() {
    let cfg = config(&synth::preset("llama3-8b").unwrap());
    let lc = LoraConfig::new(16, 32.0, Targets::AllLinear);
    let shape = RunShape { micro_batch: 4, ..RunShape::bf16(4, 4096) };
    let plan = memory::plan_lora(&cfg, &lc, &shape).unwrap();
    let gib = 1u64 << 30;
    assert!(memory::fit_check(&plan, plan.total).is_ok());

    let available = 40 * gib;
    assert!(plan.total > available, "{plan}");
    let changes = plan.fitting_changes(available);
    let err = memory::fit_check(&plan, available).unwrap_err().to_string();
    assert!(err.contains("predicted peak") && err.contains("available 40.00 GiB"), "{err}");
    assert!(!changes.is_empty(), "{err}");
    for ch in &changes {
        // Every listed setting fits, and is the largest that does.
        assert!(ch.predicted <= available);
        match ch.setting {
            Setting::MicroBatch(mb) => {
                assert!(err.contains(&format!("micro_batch_size: {mb} ")), "{err}");
                assert!(mb < 4);
                assert!(plan.replan(RunShape { micro_batch: mb + 1, ..shape }).total > available);
            }
            Setting::SeqLen(len) => {
                assert!(err.contains(&format!("sequence_len: {len}")), "{err}");
                assert_eq!(len % 128, 0);
                assert!(len < shape.seq_len);
                let longer = RunShape { micro_batch: 1, seq_len: len + 128, ..shape };
                assert!(len + 128 == shape.seq_len || plan.replan(longer).total > available);
            }
            Setting::GradientCheckpointing => assert!(err.contains("gradient_checkpointing: true"), "{err}"),
            other => panic!("{other:?} is a GRPO setting, named for an SFT plan: {err}"),
        }
    }
    // At 40 GiB checkpointing fits on its own.
    assert!(changes.iter().any(|c| c.setting == Setting::GradientCheckpointing), "{err}");

    // With less memory checkpointing alone no longer fits, and is not listed.
    let gc = plan.replan(RunShape { gradient_checkpointing: true, ..shape });
    let tight = gc.total - 1;
    let changes = plan.fitting_changes(tight);
    let err = memory::fit_check(&plan, tight).unwrap_err().to_string();
    assert!(!changes.iter().any(|c| c.setting == Setting::GradientCheckpointing));
    assert!(!err.contains("gradient_checkpointing: true"), "{err}");
    assert!(changes.iter().any(|c| matches!(c.setting, Setting::SeqLen(_))), "{err}");

    // Less than the weights: nothing fits, and the message says why.
    let err = memory::fit_check(&plan, plan.weights).unwrap_err().to_string();
    assert!(err.contains("no single change"), "{err}");
}

#[test]
fn fit_check_against_a_measured_run() {
    // The measured peak is exactly the limit at which the tiny run fits.
    let cfg = config(&tiny());
    let lc = LoraConfig::new(8, 16.0, Targets::AllLinear);
    let c = Case { micro_batch: 2, seq_len: 48, gc: false, chunk: 64, act_bytes: 4, weight_bytes: 4 };
    let plan = check(&cfg, &lc, c);
    assert!(memory::fit_check(&plan, plan.total).is_ok());
    let err = memory::fit_check(&plan, plan.total - 1).unwrap_err().to_string();
    assert!(err.contains("micro_batch_size: 1 "), "{err}");
    assert!(err.contains("gradient_checkpointing: true"), "{err}");
}

// GRPO: sampling (`Model::generate_batch`), the no-grad scoring forwards and
// GRPO's training pass, measured on the fixture Llama with its weights.

use ferrotune::model::BaseWeights;
use ferrotune::model::checkpoint::{Checkpoint, read_config};
use ferrotune::model::generate_batch::BatchOpts;
use ferrotune::model::graph::{Head, TokenWeights};
use ferrotune::model::sample::SamplingParams;
use ferrotune::train::memory::{GrpoPhase, GrpoShape};
use std::cell::Cell;
use std::path::PathBuf;

fn llama_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/model")
}

type MCpu = Metered<CpuBackend>;

/// The fixture model with adapters and optimiser on a metered CPU backend;
/// returns it with the persistent bytes.
fn metered_fixture(lc: &LoraConfig, act_bytes: usize, weight_bytes: usize) -> (MCpu, Model<MCpu>, Optimizer<MCpu>, u64) {
    let be = Metered::new(CpuBackend::new(), act_bytes, weight_bytes);
    let ckpt = Checkpoint::open(&llama_fixture()).unwrap();
    let mut model = Model::load(&be, &ckpt).unwrap();
    model.attach_lora(&be, lc, &mut Rng::new(5)).unwrap();
    let opt = Optimizer::new(&be, &model, AdamWConfig::default());
    let persistent = be.live_bytes() as u64;
    (be, model, opt, persistent)
}

fn grpo_shape(sequences: usize, prompt_len: usize, max_new: usize, micro_batch: usize, bytes: usize) -> GrpoShape {
    let run = RunShape {
        micro_batch,
        seq_len: prompt_len + max_new,
        gradient_checkpointing: false,
        loss_chunk_tokens: 16,
        act_bytes: bytes,
        weight_bytes: bytes,
        reserve_bytes: 0,
        product_casts: false,
    };
    GrpoShape { run, sequences, prompt_len, max_new, reference: true }
}

#[test]
fn grpo_sampling_matches_measurement() {
    let dir = llama_fixture();
    let cfg = read_config(&dir).unwrap();
    let lc = LoraConfig::new(8, 16.0, Targets::AllLinear);
    let kvd = (cfg.n_kv_heads * cfg.head_dim) as u64;
    // (sequences, longest prompt, max_new, bytes per element): one
    // sequence, several prompts of several lengths, one new token, and a
    // cache as long as max_position_embeddings (128).
    for (sequences, prompt_len, max_new, bytes) in [(1, 7, 5, 4), (6, 13, 9, 4), (4, 20, 1, 2), (8, 100, 28, 2)] {
        let shape = grpo_shape(sequences, prompt_len, max_new, 2, bytes);
        let plan = memory::plan_grpo(&cfg, &lc, &shape, BaseWeights::AsStored).unwrap();
        let g = plan.grpo.unwrap();
        let (be, model, _opt, persistent) = metered_fixture(&lc, bytes, bytes);
        assert_eq!(plan.weights + plan.adapter + plan.optimizer + plan.workspace, persistent);

        // Two prompts per num_generations group; the second is 3 tokens shorter.
        let mut rng = Rng::new(sequences as u64);
        let mut prompt = |len: usize| (0..len).map(|_| (rng.next_u64() % cfg.vocab as u64) as u32).collect::<Vec<u32>>();
        let (long, short) = (prompt(prompt_len), prompt(prompt_len.saturating_sub(3).max(1)));
        let prompts: Vec<Vec<u32>> = (0..sequences).map(|i| if i % 2 == 0 { long.clone() } else { short.clone() }).collect();
        // No stop token: every sequence decodes to the end, as planned.
        let opts = BatchOpts { max_new_tokens: max_new, sampling: SamplingParams::greedy(), seed: 1, stop_tokens: Vec::new() };
        // Peaks above the persistent part between rounds of chosen tokens:
        // [0] the prefills, then one per decode step, the last the round
        // that ends the generation.
        let (calls, segments, kv) = (Cell::new(0usize), std::cell::RefCell::new(Vec::new()), Cell::new(0u64));
        let out = model
            .generate_batch_with(&be, &prompts, &opts, |_, _| {
                if calls.get() % sequences == 0 {
                    segments.borrow_mut().push(be.peak_bytes() as u64 - persistent);
                    if calls.get() == 0 {
                        kv.set(be.live_bytes() as u64 - persistent);
                    }
                    be.reset_peak();
                }
                calls.set(calls.get() + 1);
                Ok(())
            })
            .unwrap();
        assert!(out.seqs.iter().all(|s| s.tokens.len() == max_new));
        let mut segments = segments.into_inner();
        segments.push(be.peak_bytes() as u64 - persistent);
        let case = (sequences, prompt_len, max_new, bytes);

        let capacity = prompt_len + max_new;
        assert_eq!(g.capacity, capacity, "{case:?}");
        assert_eq!(kv.get(), g.kv_cache, "{case:?}");
        assert_eq!(g.kv_cache, 2 * cfg.n_layers as u64 * sequences as u64 * capacity as u64 * kvd * bytes as u64);
        assert_eq!(segments[0], g.prefill, "prefill {case:?}");
        // The region move that ends the generation (more than one sequence).
        let region = if sequences > 1 { capacity as u64 * kvd * bytes as u64 } else { 0 };
        let end = *segments.last().unwrap();
        assert_eq!(end, g.kv_cache + region, "end {case:?}");
        if max_new == 1 {
            assert_eq!((g.decode, g.region), (end, 0), "{case:?}");
        } else {
            let steps = &segments[1..segments.len() - 1];
            assert_eq!(steps.len(), max_new - 1);
            for (i, &step) in steps.iter().enumerate() {
                assert_eq!(step, g.decode, "decode step {i} {case:?}");
            }
            assert_eq!(g.region, region, "{case:?}");
        }
        // The planned sampling peak covers the run and exceeds it by at
        // most the region it adds to a decode step.
        let measured = segments.iter().copied().max().unwrap();
        assert!(g.sampling() >= measured && g.sampling() - measured <= g.region, "{case:?}: {measured}\n{plan}");

        // With the EOS as a stop token and sampling, sequences finish at
        // different steps; the plan still covers the run.
        be.reset_peak();
        let sampled = BatchOpts {
            sampling: SamplingParams { temperature: 1.5, top_k: None, top_p: None, min_p: None },
            stop_tokens: vec![2],
            ..opts
        };
        model.generate_batch(&be, &prompts, &sampled).unwrap();
        assert!(be.peak_bytes() as u64 - persistent <= g.sampling(), "{case:?}");
    }
    // A longer generation is capped at max_position_embeddings, as
    // generation caps its cache.
    let capped = memory::plan_grpo(&cfg, &lc, &grpo_shape(8, 100, 40, 2, 2), BaseWeights::AsStored).unwrap().grpo.unwrap();
    let full = memory::plan_grpo(&cfg, &lc, &grpo_shape(8, 100, 28, 2, 2), BaseWeights::AsStored).unwrap().grpo.unwrap();
    assert_eq!((capped.capacity, capped.kv_cache, capped.decode), (128, full.kv_cache, full.decode));
}

#[test]
fn grpo_training_and_scoring_match_measurement() {
    let cfg = read_config(&llama_fixture()).unwrap();
    let lc = LoraConfig::new(4, 8.0, Targets::AllLinear);
    for (micro_batch, prompt_len, max_new, gc, bytes) in [(2, 10, 20, false, 4), (3, 7, 40, true, 2), (1, 30, 9, false, 2)] {
        let mut shape = grpo_shape(4, prompt_len, max_new, micro_batch, bytes);
        shape.run.gradient_checkpointing = gc;
        let plan = memory::plan_grpo(&cfg, &lc, &shape, BaseWeights::AsStored).unwrap();
        let g = plan.grpo.unwrap();
        let (be, mut model, mut opt, persistent) = metered_fixture(&lc, bytes, bytes);
        model.loss_chunk_tokens = shape.run.loss_chunk_tokens;
        let mut rng = Rng::new(3);
        let seqs: Vec<Sequence> = (0..micro_batch)
            .map(|_| Sequence::unmasked((0..shape.run.seq_len).map(|_| (rng.next_u64() % cfg.vocab as u64) as u32).collect()))
            .collect();
        let batch = Batch::from_sequences(&seqs, cfg.vocab).unwrap();
        let case = (micro_batch, prompt_len, max_new, gc, bytes);

        let mut scoring = 0;
        for adapters in [true, false] {
            be.reset_peak();
            let nll = model.token_nll_at(&be, &batch, adapters, 0.9);
            assert!(nll.iter().all(|x| x.is_finite()));
            scoring = scoring.max(be.peak_bytes() as u64 - persistent);
        }
        assert_eq!(scoring, g.scoring, "scoring {case:?}");

        be.reset_peak();
        model.zero_grad(&be);
        let opts = BackwardOpts { grad_scale: 1.0, gradient_checkpointing: gc, dropout_seed: Some(3) };
        let mut weights = |nll: &[f32]| -> anyhow::Result<Vec<f32>> { Ok(vec![1.0 / nll.len() as f32; nll.len()]) };
        model.forward_backward_with(&be, &batch, opts, Head::TokensAt(0.9, TokenWeights::FromLosses(&mut weights))).unwrap();
        opt.step(&be, &mut model, 1e-3);
        assert_eq!(be.peak_bytes() as u64 - persistent, g.training, "training {case:?}, planned at {}\n{plan}", plan.peak_at);
        assert_eq!(be.live_bytes() as u64, persistent);
        assert!(g.scoring <= g.training, "{case:?}");
        assert_eq!(plan.activations_peak, g.peak());
        assert_eq!(plan.total, persistent + g.peak());
    }
}

#[test]
fn grpo_fit_check_names_completions_and_completion_length() {
    let cfg = config(&synth::preset("llama3-8b").unwrap());
    let lc = LoraConfig::new(16, 32.0, Targets::AllLinear);
    let mut shape = grpo_shape(64, 512, 1536, 4, 2);
    shape.run = RunShape { gradient_checkpointing: true, ..RunShape::bf16(4, 512 + 1536) };
    let plan = memory::plan_grpo(&cfg, &lc, &shape, BaseWeights::AsStored).unwrap();
    let g = plan.grpo.unwrap();
    // 64 sequences × 2048 positions of bf16 keys and values in 32 layers.
    assert_eq!(g.kv_cache, 2 * 32 * 64 * 2048 * 1024 * 2);
    assert_eq!(g.phase(), GrpoPhase::Sampling, "{plan}");
    let text = plan.to_string();
    assert!(text.contains("peak: sampling") && text.contains("64 completions sampled at once"), "{text}");

    let available = plan.total - (4u64 << 30);
    let err = memory::fit_check(&plan, available).unwrap_err().to_string();
    let changes = plan.fitting_changes(available);
    let (mut completions, mut length) = (false, false);
    for ch in &changes {
        assert!(ch.predicted <= available, "{err}");
        match ch.setting {
            Setting::Completions(n) => {
                completions = true;
                assert!(err.contains(&format!("at most {n} completions per generation batch")), "{err}");
                let more = memory::GrpoShape { sequences: n + 1, ..shape };
                assert!(plan.replan_grpo(&more).total > available, "{err}");
            }
            Setting::MaxCompletion(len) => {
                length = true;
                assert!(err.contains(&format!("max_completion_length: {len}")), "{err}");
                let longer = memory::GrpoShape { max_new: len + 1, run: RunShape { seq_len: 512 + len + 1, ..shape.run }, ..shape };
                assert!(plan.replan_grpo(&longer).total > available, "{err}");
            }
            // Training is not the peak: a smaller micro-batch does not help.
            other => panic!("{other:?} cannot fit: {err}"),
        }
    }
    assert!(completions && length, "{err}");

    // A prompt that leaves no room to generate is refused, naming the limit.
    let cfg = read_config(&llama_fixture()).unwrap();
    let long = grpo_shape(2, 128, 4, 1, 4);
    let err = memory::plan_grpo(&cfg, &lc, &long, BaseWeights::AsStored).unwrap_err().to_string();
    assert!(err.contains("128 tokens") && err.contains("max_position_embeddings"), "{err}");
}
