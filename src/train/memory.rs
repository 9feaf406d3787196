//! Memory planner: the peak device memory of a LoRA training run, predicted
//! from the model config, the LoRA config and the run shape before any
//! weight is loaded, and a fit check that refuses a run that will not fit,
//! naming the settings that would make it fit.
//!
//! The prediction is not a rule of thumb: it replays, buffer by buffer, what
//! `model::graph::Model::forward_backward` and `model::layer::{forward,
//! backward}` allocate through the backend and when each buffer is dropped.
//! `tests/memory_plan.rs` checks it byte for byte against
//! the testkit crate's `ferrotune_testkit::metered::Metered` (testkit/) on the
//! CPU backend.
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
//! - weights: embedding `V·h`, per layer two norm vectors `h`, the seven
//!   projections `out·in` (+ `out` per bias), the final norm `h`, and the LM
//!   head `V·h` unless tied — all × W.
//! - QLoRA (`BaseWeights::Nf4`): each of the seven projections is held as
//!   NF4 instead (`nf4_weight_bytes`: ⌈n/2⌉ packed codes; the block scales,
//!   f32 per 64 values, or with double quantization a u8 per 64 values plus
//!   an f32 per 256 blocks and the 256-entry map; the 16-entry code table),
//!   plus ONE dequantization scratch of the weight type sized for the
//!   largest projection (`max out·in × W`), held for the whole run.
//! - adapter: A `[r, in]`, B `[out, r]` and their gradients, f32:
//!   `2 · 4 · Σ r·(in + out)`.
//! - optimizer: AdamW's two moments of A and B, f32: the same again.
//! - workspace: the rotary `inv_freq` (head_dim/2 f32), plus whatever the
//!   backend holds outside its buffers (`RunShape::reserve_bytes`: cuBLAS
//!   workspace and the like; 0 on CPU).
//!
//! # The activation peak (bytes alive above the persistent part)
//!
//! `n` = micro_batch · seq_len tokens, `nh` = n·hidden, `qd` = heads·head_dim,
//! `kvd` = kv_heads·head_dim, `I` = intermediate, `r_l` = Σ of the LoRA
//! ranks of layer l's adapted projections, `c` = LM-head chunk
//! (`min(loss_chunk_tokens, n)`).
//!
//! Alive for the whole pass: the uploaded ids, positions and cu_seqlens,
//! `ints = 4·(2n + micro_batch + 1)`.
//!
//! What one layer's forward keeps (`LayerActs`):
//! `acts_l = A·(4·nh [x_in h1 x_mid h2] + 2·n·qd [q attn] + 2·n·kvd [k v]
//!            + 3·n·I [gate up act] + n·r_l [LoRA x·Aᵀ]) + 4·(2n [inv1 inv2]
//!            + heads·n [lse])`.
//! Its running peak is at its last allocation, `x_out`, when `down` (the
//! down projection's output) is alive too: `acts_l + 2·nh·A`. (Earlier, when
//! `x_mid` is allocated, `o` is alive, but less is.)
//!
//! The backward of a layer allocates, in order, d_act, d_gate, d_up (then
//! drops d_act), dh2, d_attn, dq, dk, dv (then drops d_attn), dh1; d_gate,
//! d_up, dh2, dq, dk, dv live to the end of the function. Its transient peak
//! is therefore `bwd = A · max(3·n·I, 2·n·I + nh + 2·n·qd + 2·n·kvd,
//! 2·n·I + 2·nh + n·qd + 2·n·kvd)`.
//!
//! The LM head + loss (`head_loss`) holds hc `[c, h]` and dhc `[c, h]`
//! (activation type), logits `[c, V]` f32, chunk losses `[c]` f32, losses
//! `[n]` f32, and per chunk the uploaded targets `[c]` i32:
//! `head = A·2·c·h + 4·(c·V + c + n) + 4·c`.
//!
//! Phases of `forward_backward`, with `x` the last layer's output (alive to
//! the end of the pass), `inv_f` the final norm's inverse RMS (`4n`, alive to
//! the end), `hf`, `dhf`, `dx` each `nh·A`:
//!
//! without gradient checkpointing (every layer's `LayerActs` is kept, and
//! layer l's is dropped after its backward):
//! - forward of layer l:   ints + Σ_{j<l} acts_j + acts_l + 2·nh·A
//! - LM head + loss:       ints + Σ acts + x + hf + inv_f + dhf + head
//! - final-norm backward:  ints + Σ acts + x + inv_f + dhf + dx (hf dropped)
//! - backward of layer l:  ints + Σ_{j≤l} acts_j + x + inv_f + dx + bwd
//!
//! with gradient checkpointing (only each layer's input `x_in`, nh·A, is
//! kept; the backward re-runs the layer's forward first, and the recomputed
//! output is dropped before the layer's backward starts):
//! - forward of layer l:   ints + l·nh·A + acts_l + 2·nh·A
//! - LM head + loss:       ints + L·nh·A + x + hf + inv_f + dhf + head
//! - final-norm backward:  ints + L·nh·A + x + inv_f + dhf + dx
//! - recompute of layer l: ints + l·nh·A + x + inv_f + dx + acts_l + 2·nh·A
//! - backward of layer l:  ints + l·nh·A + x + inv_f + dx + acts_l + bwd
//!
//! The activation peak is the largest of these (in practice the LM head with
//! a large vocabulary and chunk, else the backward of the last layer).
//!
//! # Product temporaries (`RunShape::product_casts`, the CUDA backend)
//!
//! cuBLAS multiplies bf16 by bf16 here, so the CUDA backend makes a bf16
//! copy of every f32 operand for the duration of one product:
//! - LM head backward: the f32 logits gradient, `2·c·V`, while every
//!   buffer of the head phase is alive (added to `head`: exact).
//! - LoRA forward of a projection (in k, out o, rank r): A and B copies
//!   `2·(r·k + o·r)`; with dropout the mask is fused into x·Aᵀ (no copy of
//!   x, A read as f32), leaving the B copy `2·o·r`.
//! - LoRA backward: A and B copies and the bf16 `dxa` `2·(r·k + o·r + n·r)`;
//!   with dropout the B copy, `dxa` and the fused dA product's f32 row-split
//!   partials `4·S·r·k` (`backend::lora_da_splits`), and no full-size buffer.
//!
//! The largest LoRA temporary of a layer is added to its forward, recompute
//! and backward phases. That places it at the phase's peak point, where it
//! may not be (the LoRA ops run between the allocations above): an
//! over-estimate of at most that one temporary. tests/cuda_emu.rs measures
//! the CUDA backend's pool peak against the plan.
//! The optimiser step and `zero_grad` allocate nothing.
//!
//! The one deliberate over-estimate: a loss chunk whose targets are all
//! ignored (-100) uploads no targets, and the planner assumes every chunk
//! has some (at most 4·c bytes). Backend-internal scratch that does not go
//! through the backend's buffers (the CPU attention's per-thread rows, a
//! GPU's cuBLAS workspace) is not a buffer; a GPU caller accounts for it in
//! `reserve_bytes`.

use crate::adapter::LoraConfig;
use crate::model::config::ModelConfig;
use crate::model::{BaseWeights, Proj, module_path};
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
        for proj in Proj::ALL {
            let path = module_path(cfg, layer, proj);
            if !lc.targets.matches(&path)? {
                continue;
            }
            let (r, _) = lc.rank_and_scale(&path)?;
            let (in_f, out_f) = proj.dims(cfg);
            out.push(AdaptedModule { layer, proj, in_f, out_f, r, dropout: lc.dropout > 0.0 });
        }
    }
    if out.is_empty() {
        bail!(
            "LoRA target_modules {:?} match no module of this model (module names look like {})",
            lc.targets,
            module_path(cfg, 0, Proj::Q)
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
    /// Bytes per frozen-weight element: 4 on CPU, 2 for bf16.
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
    /// The CPU reference: f32 everywhere, the model's default loss chunk.
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

/// Where in the pass the activation peak happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Forward { layer: usize },
    HeadLoss,
    FinalNormBackward,
    /// Re-running a layer's forward under gradient checkpointing.
    Recompute { layer: usize },
    Backward { layer: usize },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Forward { layer } => write!(f, "forward of layer {layer}"),
            Phase::HeadLoss => write!(f, "LM head + loss chunk"),
            Phase::FinalNormBackward => write!(f, "final-norm backward"),
            Phase::Recompute { layer } => write!(f, "recomputing layer {layer}"),
            Phase::Backward { layer } => write!(f, "backward of layer {layer}"),
        }
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

/// The shape-independent facts of a model + adapter, enough to re-plan.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    hidden: u64,
    n_layers: usize,
    n_heads: u64,
    head_dim: u64,
    qd: u64,
    kvd: u64,
    intermediate: u64,
    vocab: u64,
    /// Elements of every frozen tensor held dense (weights, biases, norms;
    /// all of them unless the projections are NF4).
    weight_elems: u64,
    /// Bytes of the NF4 projections (0 when dense).
    nf4_bytes: u64,
    /// Elements of the NF4 dequantization scratch: the largest projection
    /// (0 when dense).
    nf4_scratch_elems: u64,
    /// Σ r over the adapted projections of each layer.
    rank_sum: Vec<u64>,
    /// Σ r·(in + out): the elements of every A and B.
    adapter_elems: u64,
    /// Every adapted projection (for the product temporaries).
    modules: Vec<AdaptedModule>,
}

impl Model {
    fn new(cfg: &ModelConfig, modules: &[AdaptedModule], base: BaseWeights) -> Model {
        let h = cfg.hidden as u64;
        let v = cfg.vocab as u64;
        let mut rank_sum = vec![0u64; cfg.n_layers];
        for m in modules {
            if m.layer >= rank_sum.len() {
                rank_sum.resize(m.layer + 1, 0);
            }
            rank_sum[m.layer] += m.r as u64;
        }
        Model {
            hidden: h,
            n_layers: cfg.n_layers,
            n_heads: cfg.n_heads as u64,
            head_dim: cfg.head_dim as u64,
            qd: (cfg.n_heads * cfg.head_dim) as u64,
            kvd: (cfg.n_kv_heads * cfg.head_dim) as u64,
            intermediate: cfg.intermediate as u64,
            vocab: v,
            weight_elems: cfg.n_params() as u64,
            nf4_bytes: 0,
            nf4_scratch_elems: 0,
            rank_sum,
            adapter_elems: modules.iter().map(|m| (m.r * (m.in_f + m.out_f)) as u64).sum(),
            modules: modules.to_vec(),
        }
        .with_base(cfg, base)
    }

    /// Move the projections from dense to NF4 when `base` says so.
    fn with_base(mut self, cfg: &ModelConfig, base: BaseWeights) -> Model {
        let BaseWeights::Nf4 { double_quant } = base else { return self };
        for p in Proj::ALL {
            let (in_f, out_f) = p.dims(cfg);
            let numel = (in_f * out_f) as u64;
            self.weight_elems -= numel * cfg.n_layers as u64;
            self.nf4_bytes += nf4_weight_bytes(numel, double_quant) * cfg.n_layers as u64;
            self.nf4_scratch_elems = self.nf4_scratch_elems.max(numel);
        }
        self
    }

    /// The activation peak and where it happens (see the module docs).
    fn activations(&self, s: &RunShape) -> (u64, Phase) {
        let a = s.act_bytes as u64;
        let n = s.tokens() as u64;
        let nh = n * self.hidden;
        let (qd, kvd, inter) = (self.qd, self.kvd, self.intermediate);

        let ints = 4 * (2 * n + s.micro_batch as u64 + 1);
        let acts = |l: usize| {
            a * (4 * nh + 2 * n * qd + 2 * n * kvd + 3 * n * inter + n * self.rank_sum[l])
                + 4 * (2 * n + self.n_heads * n)
        };
        let fwd_transient = 2 * nh * a; // `down` and `x_out`
        let bwd_transient = a * (3 * n * inter)
            .max(2 * n * inter + nh + 2 * n * qd + 2 * n * kvd)
            .max(2 * n * inter + 2 * nh + n * qd + 2 * n * kvd);
        let c = (s.loss_chunk_tokens.max(1) as u64).min(n.max(1));
        let mut head = a * 2 * c * self.hidden + 4 * (c * self.vocab + c + n) + 4 * c;
        // Product temporaries (see the module docs): the bf16 copy of the f32
        // logits gradient for dhc = dlogits·W, and per layer the largest LoRA
        // forward / backward temporaries of its projections.
        let (mut lora_fwd, mut lora_bwd) = (vec![0u64; self.n_layers], vec![0u64; self.n_layers]);
        if s.product_casts {
            head += 2 * c * self.vocab;
            let splits = crate::backend::lora_da_splits(n as usize) as u64;
            for m in &self.modules {
                let (k, o, r) = (m.in_f as u64, m.out_f as u64, m.r as u64);
                let (fwd, bwd) = if m.dropout {
                    (2 * o * r, 2 * (o * r + n * r) + 4 * splits * r * k)
                } else {
                    (2 * (r * k + o * r), 2 * (r * k + o * r + n * r))
                };
                lora_fwd[m.layer] = lora_fwd[m.layer].max(fwd);
                lora_bwd[m.layer] = lora_bwd[m.layer].max(bwd);
            }
        }
        let act_nh = nh * a; // x, hf, dhf, dx, a saved layer input
        let inv_f = 4 * n;

        let mut best = (0u64, Phase::HeadLoss);
        let mut consider = |bytes: u64, phase: Phase| {
            if bytes > best.0 {
                best = (bytes, phase);
            }
        };
        let l_count = self.n_layers;
        if s.gradient_checkpointing {
            let kept = l_count as u64 * act_nh;
            for l in 0..l_count {
                let below = l as u64 * act_nh;
                consider(ints + below + acts(l) + fwd_transient + lora_fwd[l], Phase::Forward { layer: l });
                let live = ints + below + act_nh + inv_f + act_nh + acts(l);
                consider(live + fwd_transient + lora_fwd[l], Phase::Recompute { layer: l });
                consider(live + bwd_transient + lora_bwd[l], Phase::Backward { layer: l });
            }
            consider(ints + kept + 3 * act_nh + inv_f + head, Phase::HeadLoss);
            consider(ints + kept + 3 * act_nh + inv_f, Phase::FinalNormBackward);
        } else {
            let mut below = 0;
            for l in 0..l_count {
                consider(ints + below + acts(l) + fwd_transient + lora_fwd[l], Phase::Forward { layer: l });
                below += acts(l);
                consider(ints + below + 2 * act_nh + inv_f + bwd_transient + lora_bwd[l], Phase::Backward { layer: l });
            }
            consider(ints + below + 3 * act_nh + inv_f + head, Phase::HeadLoss);
            consider(ints + below + 3 * act_nh + inv_f, Phase::FinalNormBackward);
        }
        best
    }
}

/// Predicted peak device memory of one training step, in bytes.
#[derive(Debug, Clone, PartialEq)]
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
    /// Where the activation peak happens.
    pub peak_at: Phase,
    pub shape: RunShape,
    model: Model,
}

/// Plan a run of the model described by `cfg` with adapters on `modules`
/// (see [`adapted_modules`]).
pub fn plan(cfg: &ModelConfig, modules: &[AdaptedModule], shape: &RunShape) -> MemoryPlan {
    plan_model(Model::new(cfg, modules, BaseWeights::AsStored), *shape)
}

/// [`plan`] of a model whose projections are held as `base` says (NF4 for
/// QLoRA).
pub fn plan_as(cfg: &ModelConfig, modules: &[AdaptedModule], shape: &RunShape, base: BaseWeights) -> MemoryPlan {
    plan_model(Model::new(cfg, modules, base), *shape)
}

/// [`adapted_modules`] + [`plan`].
pub fn plan_lora(cfg: &ModelConfig, lc: &LoraConfig, shape: &RunShape) -> Result<MemoryPlan> {
    Ok(plan(cfg, &adapted_modules(cfg, lc)?, shape))
}

/// [`adapted_modules`] + [`plan_as`].
pub fn plan_lora_as(cfg: &ModelConfig, lc: &LoraConfig, shape: &RunShape, base: BaseWeights) -> Result<MemoryPlan> {
    Ok(plan_as(cfg, &adapted_modules(cfg, lc)?, shape, base))
}

fn plan_model(model: Model, shape: RunShape) -> MemoryPlan {
    let weights = (model.weight_elems + model.nf4_scratch_elems) * shape.weight_bytes as u64 + model.nf4_bytes;
    let adapter = 2 * 4 * model.adapter_elems;
    let optimizer = 2 * 4 * model.adapter_elems;
    let workspace = 4 * (model.head_dim / 2) + shape.reserve_bytes;
    let (activations_peak, peak_at) = model.activations(&shape);
    MemoryPlan {
        weights,
        adapter,
        optimizer,
        activations_peak,
        workspace,
        total: weights + adapter + optimizer + activations_peak + workspace,
        peak_at,
        shape,
        model,
    }
}

impl MemoryPlan {
    /// The same model and adapter with another run shape.
    pub fn replan(&self, shape: RunShape) -> MemoryPlan {
        plan_model(self.model.clone(), shape)
    }

    /// Changes of one setting that make the run fit in `available` bytes,
    /// each keeping the other settings as they are; only those that fit are
    /// listed:
    /// - the largest smaller micro-batch;
    /// - at micro-batch 1, the largest sequence length below the current one
    ///   (a multiple of 128), when micro-batch 1 alone is not enough;
    /// - gradient checkpointing, when it is off.
    pub fn fitting_changes(&self, available: u64) -> Vec<FitChange> {
        let s = self.shape;
        let fits = |shape: RunShape| Some(self.replan(shape).total).filter(|&t| t <= available);
        let mut out = Vec::new();
        let mut smaller = (1..s.micro_batch).rev();
        if let Some((mb, t)) = smaller.find_map(|mb| Some((mb, fits(RunShape { micro_batch: mb, ..s })?))) {
            out.push(FitChange { setting: Setting::MicroBatch(mb), predicted: t });
        }
        let at = |seq_len: usize| RunShape { micro_batch: 1, seq_len, ..s };
        if fits(at(s.seq_len)).is_none() {
            let mut shorter = (1..=s.seq_len.saturating_sub(1) / 128).rev().map(|k| k * 128);
            if let Some((len, t)) = shorter.find_map(|len| Some((len, fits(at(len))?))) {
                out.push(FitChange { setting: Setting::SeqLen(len), predicted: t });
            }
        }
        if !s.gradient_checkpointing
            && let Some(t) = fits(RunShape { gradient_checkpointing: true, ..s })
        {
            out.push(FitChange { setting: Setting::GradientCheckpointing, predicted: t });
        }
        out
    }
}

/// A setting that would make a run fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// micro_batch_size (everything else unchanged).
    MicroBatch(usize),
    /// sequence_len at micro_batch_size 1.
    SeqLen(usize),
    /// gradient_checkpointing: true.
    GradientCheckpointing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitChange {
    pub setting: Setting,
    /// The predicted total with this change.
    pub predicted: u64,
}

impl fmt::Display for FitChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.setting {
            Setting::MicroBatch(mb) => format!("micro_batch_size: {mb}"),
            Setting::SeqLen(len) => format!("micro_batch_size: 1 with sequence_len: {len}"),
            Setting::GradientCheckpointing => "gradient_checkpointing: true".to_string(),
        };
        write!(f, "{what:<44} (predicted {})", human(self.predicted))
    }
}

/// Refuse a run whose predicted peak exceeds `available` bytes, saying by
/// how much and which settings would make it fit.
pub fn fit_check(plan: &MemoryPlan, available: u64) -> Result<()> {
    if plan.total <= available {
        return Ok(());
    }
    let mut msg = format!(
        "the run will not fit in device memory: predicted peak {} > available {}\n{plan}",
        human(plan.total),
        human(available)
    );
    let changes = plan.fitting_changes(available);
    if changes.is_empty() {
        let fixed = plan.weights + plan.adapter + plan.optimizer + plan.workspace;
        msg.push_str(&format!(
            "\nno single change of micro_batch_size, sequence_len (at micro_batch_size 1) or gradient_checkpointing \
             makes it fit; weights, adapter, optimizer state and workspace alone take {} (use a larger device, \
             a smaller model, or fewer / lower-rank LoRA modules)",
            human(fixed)
        ));
    } else {
        msg.push_str("\nany one of these would fit:");
        for c in &changes {
            msg.push_str(&format!("\n  {c}"));
        }
    }
    bail!(msg)
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
        let rows = [
            (
                "weights",
                self.weights,
                if self.model.nf4_bytes > 0 {
                    format!(
                        "NF4 projections {} + dequantization scratch {} + the rest dense",
                        human(self.model.nf4_bytes),
                        human(self.model.nf4_scratch_elems * s.weight_bytes as u64)
                    )
                } else {
                    String::new()
                },
            ),
            ("adapter", self.adapter, "LoRA A, B + gradients, f32".to_string()),
            ("optimizer", self.optimizer, "AdamW moments, f32".to_string()),
            ("activations", self.activations_peak, format!("peak: {}", self.peak_at)),
            ("workspace", self.workspace, String::new()),
        ];
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
