//! Memory planner: the peak device memory of a LoRA training run, predicted
//! from the model config, the LoRA config and the run shape before any
//! weight is loaded, and a fit check that refuses a run that will not fit,
//! naming the settings that would make it fit.
//!
//! The prediction is not a second description of the step: the planner
//! builds the model on a tracing backend (`trace`) that holds sizes instead
//! of data, and runs the graph's own training pass
//! (`Model::forward_backward`) on it. Every buffer the graph allocates is
//! counted when it is allocated and given back when the graph drops it, so a
//! change to the graph changes the plan with it. `tests/memory_plan.rs`
//! checks the plan byte for byte against a metered CPU backend running the
//! same step on real data.
//!
//! # Storage sizes
//!
//! `A` = bytes per activation element (`act_bytes`: 4 on CPU, 2 for bf16),
//! `W` = bytes per frozen-weight element (`weight_bytes`), and 4 bytes for
//! every f32 buffer (LoRA parameters, gradients, moments, RMSNorm inverse
//! RMS, attention log-sum-exp, logits, per-token losses) and every i32
//! metadata element.
//!
//! # The persistent part
//!
//! - weights: every tensor `Model::build_with` asks for, × W, except that
//!   with QLoRA (`BaseWeights::Nf4`) the seven projections are held as NF4
//!   (`nf4_weight_bytes`: ⌈n/2⌉ packed codes; the block scales, f32 per 64
//!   values, or with double quantization a u8 per 64 values plus an f32 per
//!   256 blocks and the 256-entry map; the 16-entry code table), plus ONE
//!   dequantization scratch of the weight type sized for the largest
//!   projection (`max out·in × W`), held for the whole run.
//! - adapter: A `[r, in]`, B `[out, r]` and their gradients, f32, as the
//!   traced model holds them.
//! - optimizer: AdamW's two moments of A and B, as `Optimizer::new` makes
//!   them on the traced model.
//! - workspace: the rotary `inv_freq`, plus whatever the backend holds
//!   outside its buffers (`RunShape::reserve_bytes`: cuBLAS workspace and
//!   the like; 0 on CPU).
//!
//! # The activation peak
//!
//! The most bytes alive at once above the persistent part during one
//! micro-batch of `micro_batch` sequences of `seq_len` trained tokens, with
//! the phase of the pass it happens in (the graph announces its phases to
//! the backend). One deliberate over-estimate: every sequence is trained on
//! every token, so every loss chunk uploads its targets.
//!
//! # Product temporaries (`RunShape::product_casts`, the CUDA backend)
//!
//! cuBLAS multiplies bf16 by bf16 here, so the CUDA backend makes a bf16
//! copy of every f32 operand for the duration of one product:
//! - LM head backward: the f32 logits gradient, `2·c·V`.
//! - LoRA forward of a projection (in k, out o, rank r): A and B copies
//!   `2·(r·k + o·r)`; with dropout the mask is fused into x·Aᵀ (no copy of
//!   x, A read as f32), leaving the B copy `2·o·r`.
//! - LoRA backward: A and B copies and the bf16 `dxa` `2·(r·k + o·r + n·r)`;
//!   with dropout the B copy, `dxa` and the fused dA product's f32 row-split
//!   partials `4·S·r·k` (`backend::lora_da_splits`), and no full-size buffer.
//!
//! The trace notes the largest temporary of each phase and adds it to that
//! phase's peak, which places it where it may not be (the ops run between
//! allocations): an over-estimate of at most that one temporary.
//! tests/cuda_emu.rs measures the CUDA backend's pool peak against the plan.
//! Backend-internal scratch that does not go through the backend's buffers
//! (the CPU attention's per-thread rows, a GPU's cuBLAS workspace) is not a
//! buffer; a GPU caller accounts for it in `reserve_bytes`.
//!
//! # GRPO (`plan_grpo`)
//!
//! An online-RL step also samples its completions with the model being
//! trained and scores them without gradients; the `grpo` module traces
//! `Model::generate_batch` and those forwards on the same backend and the
//! plan's activation peak is the largest of sampling, scoring and GRPO's
//! own training pass (`MemoryPlan::grpo` holds each). The fit check then
//! also names fewer completions per generation batch and a shorter
//! max_completion_length (`fit`).

mod fit;
mod grpo;
mod trace;

pub use crate::backend::Phase;
pub use fit::{FitChange, Setting, fit_check};
pub use grpo::{GrpoPeaks, GrpoPhase, GrpoShape, plan_grpo};

use crate::adapter::{Lora, LoraConfig};
use crate::backend::Backend;
use crate::model::batch::{Batch, Sequence};
use crate::model::hparams::ModelConfig;
use crate::model::graph::BackwardOpts;
use crate::model::{BaseWeights, Model, Proj, module_path};
use crate::train::optimizer::{AdamWConfig, Optimizer};
use std::collections::BTreeMap;
use trace::{Shape, Tracer};
use crate::quant::nf4::{BLOCKSIZE, NESTED_BLOCKSIZE};
use anyhow::{Result, bail};
use std::fmt;

/// One projection that gets a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptedModule {
    pub layer: usize,
    pub proj: Proj,
    pub in_f: usize,
    pub out_f: usize,
    pub r: usize,
    /// Whether LoRA dropout applies (p > 0): the input is masked into a copy.
    pub dropout: bool,
}

/// The modules `Model::attach_lora` would adapt, with their ranks, from the
/// configs alone (same target matching and rank_pattern rules).
pub fn adapted_modules(cfg: &ModelConfig, lc: &LoraConfig) -> Result<Vec<AdaptedModule>> {
    let mut out = Vec::new();
    for layer in 0..cfg.n_layers {
        for &proj in Proj::of_layer(cfg, layer) {
            let path = module_path(cfg, layer, proj);
            if !lc.targets.matches(&path)? {
                continue;
            }
            let (r, _) = lc.rank_and_scale(&path)?;
            let (in_f, out_f) = proj.dims(cfg, layer);
            out.push(AdaptedModule { layer, proj, in_f, out_f, r, dropout: lc.dropout > 0.0 });
        }
    }
    if out.is_empty() {
        bail!(
            "LoRA target_modules {:?} match no module of this model (module names look like {})",
            lc.targets,
            module_path(cfg, 0, Proj::of(cfg)[0])
        );
    }
    Ok(out)
}

/// The settings of a run that decide its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    pub gradient_checkpointing: bool,
    /// Tokens per LM-head + cross-entropy chunk (`Model::loss_chunk_tokens`).
    pub loss_chunk_tokens: usize,
    /// Bytes per activation element: 4 on CPU, 2 for a bf16 GPU backend.
    pub act_bytes: usize,
    /// Bytes per frozen-weight element: 4 on CPU, 2 for bf16. (The CPU keeps
    /// a bf16 checkpoint's weights as bf16 and widens one matrix at a time
    /// for the backward, so 4 is an upper bound there.)
    pub weight_bytes: usize,
    /// Device memory the backend holds outside its buffers (GEMM library
    /// workspace and the like); 0 on CPU.
    pub reserve_bytes: u64,
    /// The backend's products take bf16 operands only (the CUDA backend): an
    /// f32 operand is cast into a temporary copy for the product, and LoRA
    /// dropout masks its input into a temporary (see "Product temporaries").
    pub product_casts: bool,
}

impl RunShape {
    /// The CPU reference: f32 activations and (at most) 4-byte weights, the
    /// model's default loss chunk.
    pub fn cpu(micro_batch: usize, seq_len: usize) -> RunShape {
        RunShape {
            micro_batch,
            seq_len,
            gradient_checkpointing: false,
            loss_chunk_tokens: 1024,
            act_bytes: 4,
            weight_bytes: 4,
            reserve_bytes: 0,
            product_casts: false,
        }
    }

    /// A bf16 GPU backend (activations and weights in bf16, bf16 products).
    pub fn bf16(micro_batch: usize, seq_len: usize) -> RunShape {
        RunShape { act_bytes: 2, weight_bytes: 2, product_casts: true, ..RunShape::cpu(micro_batch, seq_len) }
    }

    pub fn tokens(&self) -> usize {
        self.micro_batch * self.seq_len
    }
}

/// Device bytes of one NF4 weight of `numel` values in bitsandbytes' layout
/// (blocks of 64; double quantization in groups of 256 blocks), as the GPU
/// backend holds it (`backend::nf4_device_bytes` of the real tensor).
pub fn nf4_weight_bytes(numel: u64, double_quant: bool) -> u64 {
    let blocks = numel.div_ceil(BLOCKSIZE as u64);
    let scales = if double_quant { blocks + 4 * blocks.div_ceil(NESTED_BLOCKSIZE as u64) + 4 * 256 } else { 4 * blocks };
    numel.div_ceil(2) + scales + 4 * 16
}

/// What a plan is made from, enough to re-plan with another shape.
#[derive(Debug, Clone)]
struct Planned {
    cfg: ModelConfig,
    modules: Vec<AdaptedModule>,
    base: BaseWeights,
    /// GRPO: the generation batch; the training pass is then GRPO's (see
    /// the `grpo` module).
    grpo: Option<grpo::Sampling>,
}

/// The persistent part of a plan, and the traced model it was counted on.
struct Built {
    be: Tracer,
    model: Model<Tracer>,
    /// Kept alive for the step: its moments are persistent.
    _opt: Optimizer<Tracer>,
    weights: u64,
    /// Bytes of the NF4 projections and of the dequantization scratch.
    nf4: (u64, u64),
    adapter: u64,
    optimizer: u64,
    /// Buffers the model holds besides its adapter (the rotary inv_freq).
    workspace: u64,
}

impl Planned {
    /// The model with its adapters and optimiser on the tracing backend,
    /// each part's bytes counted as it is made.
    fn build(&self, shape: &RunShape) -> Built {
        let be = Tracer::new(shape.act_bytes, shape.product_casts);
        let w = shape.weight_bytes as u64;
        let (mut dense, mut nf4, mut scratch) = (0u64, 0u64, 0u64);
        let model = Model::build_with(&be, self.cfg.clone(), |_, dims, projection| {
            let numel: usize = dims.iter().product();
            match self.base {
                BaseWeights::Nf4 { double_quant } if projection => {
                    nf4 += nf4_weight_bytes(numel as u64, double_quant);
                    scratch = scratch.max(numel as u64 * w);
                }
                _ => dense += numel as u64 * w,
            }
            Ok(Shape(numel))
        });
        let mut model = model.expect("the trace builds every tensor");
        let workspace = be.with_log(|l| l.live);
        for m in &self.modules {
            let lin = model.layers[m.layer].p_mut(m.proj);
            lin.lora = Some(Lora {
                a: be.zeros_f32(m.r * m.in_f),
                b: be.zeros_f32(m.out_f * m.r),
                grad_a: be.zeros_f32(m.r * m.in_f),
                grad_b: be.zeros_f32(m.out_f * m.r),
                r: m.r,
                scale: 1.0,
                dropout: if m.dropout { 0.5 } else { 0.0 },
            });
        }
        let adapter = be.with_log(|l| l.live) - workspace;
        let opt = Optimizer::new(&be, &model, AdamWConfig::default());
        let optimizer = be.with_log(|l| l.live) - workspace - adapter;
        Built { be, model, _opt: opt, weights: dense + nf4 + scratch, nf4: (nf4, scratch), adapter, optimizer, workspace }
    }

    /// The activation peak of one micro-batch and where it happens: the
    /// training pass traced phase by phase, each phase's peak plus its
    /// largest product temporary. A micro-batch of more than `TRACE_TOKENS`
    /// tokens is not traced itself (its batch alone would not fit in host
    /// memory): every buffer of the pass is then a fixed number of values
    /// per token, so each phase is traced at `TRACE_TOKENS` / 2 and
    /// `TRACE_TOKENS` tokens (one sequence) and extended along that line,
    /// plus 4 bytes of cu_seqlens per further sequence.
    fn activations(&self, built: &mut Built, s: &RunShape) -> (u64, Phase) {
        let n = s.micro_batch as u64 * s.seq_len as u64;
        let phases = if n <= TRACE_TOKENS as u64 {
            self.trace(built, s, s.micro_batch, s.seq_len)
        } else {
            let half = self.trace(built, s, 1, TRACE_TOKENS / 2);
            let full = self.trace(built, s, 1, TRACE_TOKENS);
            let extra = n - TRACE_TOKENS as u64;
            let cu_seqlens = 4 * (s.micro_batch as u64 - 1);
            full.into_iter()
                .map(|(p, at_full)| {
                    let per_half = at_full.saturating_sub(half.get(&p).copied().unwrap_or(0));
                    let grown = (at_full as u128 + per_half as u128 * extra as u128 / (TRACE_TOKENS as u128 / 2)) as u64;
                    (p, grown.saturating_add(cu_seqlens))
                })
                .collect()
        };
        // Ties go to the earliest phase in this order.
        let layers = self.cfg.n_layers;
        let order = (0..layers)
            .flat_map(|l| [Phase::Forward { layer: l }, Phase::Recompute { layer: l }, Phase::Backward { layer: l }])
            .chain([Phase::HeadLoss, Phase::FinalNormBackward]);
        let mut best = (0u64, Phase::HeadLoss);
        for p in order {
            if let Some(&bytes) = phases.get(&p)
                && bytes > best.0
            {
                best = (bytes, p);
            }
        }
        best
    }

    /// Each phase's activation bytes (above the persistent part, with its
    /// largest product temporary) in one traced pass over `micro_batch`
    /// sequences of `seq_len` tokens.
    fn trace(&self, built: &mut Built, s: &RunShape, micro_batch: usize, seq_len: usize) -> BTreeMap<Phase, u64> {
        let Built { be, model, .. } = built;
        model.loss_chunk_tokens = s.loss_chunk_tokens;
        let seqs: Vec<Sequence> = (0..micro_batch).map(|_| Sequence::unmasked(vec![0; seq_len])).collect();
        let batch = Batch::from_sequences(&seqs, self.cfg.vocab).expect("token 0 is in every vocabulary");
        drop(seqs);
        let before = be.with_log(|l| l.live);
        let opts = BackwardOpts {
            grad_scale: 1.0,
            gradient_checkpointing: s.gradient_checkpointing,
            dropout_seed: self.modules.iter().any(|m| m.dropout).then_some(0),
        };
        if self.grpo.is_some() {
            grpo::train_pass(be, model, &batch, opts);
        } else {
            model.forward_backward(be, &batch, opts);
        }
        let phases = be.with_log(|l| std::mem::take(&mut l.phases));
        phases.into_iter().map(|(p, (live, temp))| (p, live - before + temp)).collect()
    }
}

/// The most tokens of one micro-batch the planner traces directly.
const TRACE_TOKENS: usize = 1 << 20;

/// Predicted peak device memory of one training step, in bytes.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    /// Frozen base weights.
    pub weights: u64,
    /// LoRA A and B and their gradients (f32).
    pub adapter: u64,
    /// AdamW's two moments of every LoRA parameter (f32).
    pub optimizer: u64,
    /// The most bytes alive at once during forward + backward, above the
    /// persistent part (saved activations, transients, LM-head scratch,
    /// uploaded metadata).
    pub activations_peak: u64,
    /// Small persistent buffers (rotary inv_freq) and the backend's reserve.
    pub workspace: u64,
    pub total: u64,
    /// Where the activation peak of the training pass happens (for GRPO,
    /// see `grpo` for whether sampling is larger).
    pub peak_at: Phase,
    pub shape: RunShape,
    /// Bytes of the NF4 projections and of their dequantization scratch
    /// (0, 0 when dense).
    nf4: (u64, u64),
    /// GRPO: the peaks of sampling, scoring and training.
    pub grpo: Option<GrpoPeaks>,
    inputs: Planned,
}

/// Plan a run of the model described by `cfg` with adapters on `modules`
/// (see [`adapted_modules`]).
pub fn plan(cfg: &ModelConfig, modules: &[AdaptedModule], shape: &RunShape) -> MemoryPlan {
    plan_as(cfg, modules, shape, BaseWeights::AsStored)
}

/// [`plan`] of a model whose projections are held as `base` says (NF4 for
/// QLoRA).
pub fn plan_as(cfg: &ModelConfig, modules: &[AdaptedModule], shape: &RunShape, base: BaseWeights) -> MemoryPlan {
    plan_model(Planned { cfg: cfg.clone(), modules: modules.to_vec(), base, grpo: None }, *shape)
}

/// [`adapted_modules`] + [`plan`].
pub fn plan_lora(cfg: &ModelConfig, lc: &LoraConfig, shape: &RunShape) -> Result<MemoryPlan> {
    Ok(plan(cfg, &adapted_modules(cfg, lc)?, shape))
}

/// [`adapted_modules`] + [`plan_as`].
pub fn plan_lora_as(cfg: &ModelConfig, lc: &LoraConfig, shape: &RunShape, base: BaseWeights) -> Result<MemoryPlan> {
    Ok(plan_as(cfg, &adapted_modules(cfg, lc)?, shape, base))
}

fn plan_model(inputs: Planned, shape: RunShape) -> MemoryPlan {
    let mut built = inputs.build(&shape);
    let (training, peak_at) = inputs.activations(&mut built, &shape);
    let grpo = inputs.grpo.map(|g| grpo::peaks(&inputs, &mut built, &shape, g, training));
    let activations_peak = grpo.as_ref().map_or(training, GrpoPeaks::peak);
    let (weights, adapter, optimizer) = (built.weights, built.adapter, built.optimizer);
    let workspace = built.workspace + shape.reserve_bytes;
    MemoryPlan {
        weights,
        adapter,
        optimizer,
        activations_peak,
        workspace,
        total: weights + adapter + optimizer + activations_peak + workspace,
        peak_at,
        shape,
        nf4: built.nf4,
        grpo,
        inputs,
    }
}

impl MemoryPlan {
    /// The same model and adapter with another run shape.
    pub fn replan(&self, shape: RunShape) -> MemoryPlan {
        plan_model(self.inputs.clone(), shape)
    }
}

/// Bytes in binary units, 2 decimals.
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            return format!("{:.2} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shape;
        writeln!(
            f,
            "memory plan: {} x {} tokens, gradient checkpointing {}, activations {} B/elem, weights {} B/elem",
            s.micro_batch,
            s.seq_len,
            if s.gradient_checkpointing { "on" } else { "off" },
            s.act_bytes,
            s.weight_bytes
        )?;
        if let Some(g) = &self.grpo {
            writeln!(f, "{}", g.summary())?;
        }
        let peak = match &self.grpo {
            Some(g) => g.describe_peak(self.peak_at),
            None => format!("peak: {}", self.peak_at),
        };
        let mut rows = vec![
            (
                "weights",
                self.weights,
                if self.nf4.0 > 0 {
                    format!(
                        "NF4 projections {} + dequantization scratch {} + the rest dense",
                        human(self.nf4.0),
                        human(self.nf4.1)
                    )
                } else {
                    String::new()
                },
            ),
            ("adapter", self.adapter, "LoRA A, B + gradients, f32".to_string()),
            ("optimizer", self.optimizer, "AdamW moments, f32".to_string()),
            ("activations", self.activations_peak, peak),
        ];
        if let Some(g) = &self.grpo {
            rows.extend(g.rows(self.peak_at));
        }
        rows.push(("workspace", self.workspace, String::new()));
        for (name, bytes, note) in rows {
            writeln!(f, "{}", format!("  {name:<12}{:>12}  {note}", human(bytes)).trim_end())?;
        }
        write!(f, "  {:<12}{:>12}", "total", human(self.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::Targets;
    use crate::model::synth;

    fn llama8b() -> ModelConfig {
        synth::model_config(&synth::preset("llama3-8b").unwrap()).unwrap()
    }

    #[test]
    fn weights_match_the_parameter_count() {
        let cfg = llama8b();
        let lc = LoraConfig::new(16, 32.0, Targets::AllLinear);
        let p = plan_lora(&cfg, &lc, &RunShape::bf16(1, 2048)).unwrap();
        assert_eq!(p.weights, 2 * cfg.n_params() as u64);
        // 32 layers × r·(in + out) summed over the seven projections.
        let per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3);
        assert_eq!(p.adapter, 8 * 32 * per_layer);
        assert_eq!(p.optimizer, p.adapter);
    }

    #[test]
    fn more_tokens_need_more_memory_and_checkpointing_needs_less() {
        let cfg = llama8b();
        let lc = LoraConfig::new(16, 32.0, Targets::AllLinear);
        let a = plan_lora(&cfg, &lc, &RunShape::bf16(1, 2048)).unwrap();
        let b = a.replan(RunShape { micro_batch: 2, ..a.shape });
        let c = a.replan(RunShape { gradient_checkpointing: true, ..a.shape });
        assert!(b.activations_peak > a.activations_peak);
        assert!(c.activations_peak < a.activations_peak / 4);
        assert!(matches!(a.peak_at, Phase::Backward { layer: 31 } | Phase::HeadLoss), "{}", a.peak_at);
        assert!(a.to_string().contains("total"));
    }

    #[test]
    fn qlora_holds_the_projections_in_nf4_and_llama3_8b_fits_in_10_gb() {
        let cfg = llama8b();
        let lc = LoraConfig::new(16, 32.0, Targets::AllLinear);
        let shape = RunShape { gradient_checkpointing: true, ..RunShape::bf16(1, 2048) };
        let dense = plan_lora(&cfg, &lc, &shape).unwrap();
        let q = plan_lora_as(&cfg, &lc, &shape, BaseWeights::Nf4 { double_quant: true }).unwrap();
        // Per layer the seven projections: 4096·(4096 + 1024·2 + 4096) + 3·4096·14336 values.
        let proj_per_layer = 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336u64;
        let nf4: u64 = [4096 * 4096, 1024 * 4096, 1024 * 4096, 4096 * 4096, 14336 * 4096, 14336 * 4096, 4096 * 14336]
            .iter()
            .map(|&n| nf4_weight_bytes(n, true))
            .sum();
        let rest = cfg.n_params() as u64 - 32 * proj_per_layer;
        assert_eq!(q.weights, 2 * rest + 32 * nf4 + 2 * 14336 * 4096);
        // 0.5 byte per value plus ~1/64 byte of scales.
        assert!(nf4 as f64 / (proj_per_layer as f64) < 0.52);
        assert_eq!(q.activations_peak, dense.activations_peak);
        assert!(q.total < 10_000_000_000, "{q}");
        assert!(q.to_string().contains("NF4 projections"), "{q}");
        // Without double quantization the scales are f32: 1/16 byte per value.
        assert_eq!(nf4_weight_bytes(64 * 256, false), 8192 + 4 * 256 + 64);
        assert_eq!(nf4_weight_bytes(64 * 256, true), 8192 + 256 + 4 + 1024 + 64);
    }

    #[test]
    fn unmatched_targets_are_refused() {
        let cfg = llama8b();
        let lc = LoraConfig::new(8, 16.0, Targets::Names(vec!["nope".into()]));
        assert!(adapted_modules(&cfg, &lc).unwrap_err().to_string().contains("match no module"));
    }
}
