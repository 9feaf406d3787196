//! The op set the model graph is written against.
//!
//! The model's forward and backward are written once, in terms of this trait.
//! `cpu` is the reference implementation (f32, plain loops plus a GEMM crate);
//! `cuda` implements the same semantics on one GPU; `profiled` wraps either
//! to time each op. Test-only backends (the conformance harness, the bf16
//! simulation, the memory meter) live in the testkit crate (testkit/).
//!
//! A new op touches: its method in the trait below (arguments grouped with
//! args.rs), cpu/<op>.rs with its tests (wired in cpu/mod.rs), cuda/<op>.cu
//! with its launch in cuda/ops.rs, one line in the op table of
//! `forward_ops!` (forward.rs), and testkit/src/bf16sim/mod.rs (how the GPU's
//! bf16 storage rounds its outputs) plus a check in testkit/src/conformance.rs.
//!
//! Conventions shared by every op:
//! - Buffers are flat and row-major; every shape is passed explicitly.
//! - Tokens are flattened across the batch ("varlen" layout): a batch of
//!   sequences is one stream of `n` tokens, and `cu_seqlens` (length
//!   `n_seqs + 1`, starting at 0, ending at `n`) says where each sequence
//!   starts. Attention never crosses a sequence boundary, so padded batches
//!   carry no pad tokens at all and packed rows are just more sequences.
//! - Ops that "accumulate" add into their output (`+=`); the others overwrite.
//! - Frozen base weights are `Weight`s (read-only, no gradients); trainable
//!   parameters, activations and gradients are `Buf`s of f32.
//! - A `Weight` is dense, or (QLoRA's base projections) NF4: the backend keeps
//!   the 4-bit form and dequantizes it for one product at a time, in
//!   `linear` and `linear_backward_input`, the only ops that take an NF4
//!   weight. Embeddings, norms and the LM head are always dense.
//! - Every op is deterministic: the same inputs give bit-identical outputs.
//! - Buffers may be longer than a shape needs; ops touch only the prefix.

mod args;
pub mod cpu;
pub mod cuda;
mod forward;
pub mod profiled;
pub mod phase;

pub use phase::Phase;

pub use args::{
    AttnSaved, CeShape, ColsShape, DELTA_CHUNK, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, GluAct, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape, NormShape, Qkv, QkvGrads,
    RopeShape, SamplingParams, Varlen,
};
pub use forward::Forward;

use crate::quant::nf4::Nf4Tensor;
use anyhow::Result;

/// Element type of a tensor as stored in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Raw little-endian bytes of one checkpoint tensor (typically borrowed from
/// a memory map), handed to the backend to build its own weight storage.
pub struct WeightSource<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    /// Number of elements (the product of the tensor's shape).
    pub numel: usize,
}

/// LoRA dropout applied to the adapter's input, `x * keep / (1 - p)`.
/// The keep mask is a pure function of (`seed`, element index), see
/// [`dropout_keep`], so backward regenerates it instead of storing it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// Counter-based hash RNG (SplitMix64 finaliser over seed and index): the
/// same function is used by every backend so masks agree bit for bit.
pub fn dropout_uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 high bits -> uniform in [0, 1).
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// Whether element `index` survives dropout with probability `p` of dropping.
pub fn dropout_keep(seed: u64, index: u64, p: f32) -> bool {
    dropout_uniform(seed, index) >= p
}

/// Row splits of the CUDA backend's fused LoRA-dropout dA product
/// (cuda/lora_dropout.cu): the m rows are summed in this many independent
/// parts (for parallelism; f32 partials [splits, r, k], summed in order
/// after). Shared with the memory planner, which counts the partials.
pub fn lora_da_splits(m: usize) -> usize {
    m.div_ceil(256).clamp(1, 64)
}

/// Shape of one attention call (varlen layout, see module docs).
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Total tokens in the flattened batch.
    pub n: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Keys allowed for query q (positions inside its sequence): k <= q and,
    /// with a window W, q - W < k.
    pub window: Option<usize>,
    /// Multiplier applied to QKᵀ (head_dim^-1/2, or
    /// query_pre_attn_scalar^-1/2 for Gemma).
    pub scale: f32,
    /// Some(c): each score s = scale·q·k is capped to c·tanh(s/c) before
    /// the mask and the softmax (Gemma 2's attention soft-cap); the
    /// backward multiplies by its derivative 1 − tanh²(s/c).
    pub softcap: Option<f32>,
    /// Length of the longest sequence (sizes a GPU grid without reading
    /// cu_seqlens back); 0 = unknown, treated as `n`.
    pub max_seqlen: usize,
}

/// Hyper-parameters of one AdamW step (torch semantics: decoupled weight
/// decay `p -= lr * wd * p` before the Adam update; bias-corrected moments).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, used for bias correction.
    pub step: u64,
}

/// The per-step scalars of AdamW, computed as torch computes them (Python
/// floats, i.e. f64) and cast to f32: every backend's update uses these.
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    /// 1 − lr·wd
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// lr / (1 − β1^step)
    pub step_size: f32,
    /// sqrt(1 − β2^step)
    pub bias_c2_sqrt: f32,
}

impl AdamW {
    pub fn scalars(&self) -> AdamWScalars {
        let (lr, b1, b2) = (self.lr as f64, self.beta1 as f64, self.beta2 as f64);
        let step = self.step as f64;
        AdamWScalars {
            decay: (1.0 - lr * self.weight_decay as f64) as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            step_size: (lr / (1.0 - b1.powf(step))) as f32,
            bias_c2_sqrt: (1.0 - b2.powf(step)).sqrt() as f32,
        }
    }
}

// 'static: objectives hold backend buffers in boxed trait objects.
pub trait Backend: Send + Sync + 'static {
    /// f32 activations, gradients and trainable parameters.
    type Buf: Send + Sync;
    /// A frozen base-model weight (or bias / norm vector).
    type Weight: Send + Sync;
    /// i32 per-token metadata: token ids, targets, positions, cu_seqlens.
    type IntBuf: Send + Sync;

    fn name(&self) -> String;
    /// Whether this backend's kernels can run a model of `cfg`'s shapes,
    /// checked before any weight is read (`Model::build_with`): an error
    /// names the layer, the size and the limit. Every shape by default.
    fn check_model(&self, cfg: &crate::model::hparams::ModelConfig) -> Result<()> {
        let _ = cfg;
        Ok(())
    }

    // ---- memory -------------------------------------------------------
    // Buffers carry their storage type: activations and their gradients use
    // the backend's activation type (f32 on CPU; bf16 on a GPU), while LoRA
    // parameters, their gradients and optimiser moments, and the saved
    // statistics (inverse RMS, log-sum-exp, per-token losses) stay f32. Ops
    // accept any mix and compute in f32.
    /// Zeroed activation storage.
    fn zeros(&self, len: usize) -> Self::Buf;
    /// Zeroed f32 storage (parameters, gradients, moments, statistics).
    fn zeros_f32(&self, len: usize) -> Self::Buf;
    /// Zeroed storage of the same type and length as `like`.
    fn zeros_like(&self, like: &Self::Buf) -> Self::Buf;
    /// f32 storage holding `data`.
    fn upload(&self, data: &[f32]) -> Self::Buf;
    /// Activation storage holding `data` (rounded to the activation type).
    fn upload_activation(&self, data: &[f32]) -> Self::Buf;
    /// The values of any buffer, as f32.
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn upload_ints(&self, data: &[i32]) -> Self::IntBuf;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Build a frozen weight from checkpoint bytes (converted as the backend
    /// stores weights: f32 on CPU).
    fn load_weight(&self, src: &WeightSource) -> Result<Self::Weight>;
    fn weight_from_f32(&self, data: &[f32]) -> Self::Weight;
    /// Build a frozen NF4 weight (a quantized `[out, in]` projection). It
    /// stays 4-bit; each product dequantizes it (code · absmax in f32, then
    /// the backend's weight type) into scratch that lives for that product
    /// only. Fails when the tensor is malformed or its layout is one the
    /// backend cannot read.
    fn weight_from_nf4(&self, t: &Nf4Tensor) -> Result<Self::Weight>;
    /// A weight's values as f32 (an NF4 weight dequantized, as a product
    /// sees it).
    fn weight_to_f32(&self, w: &Self::Weight) -> Vec<f32>;
    /// Elements of a weight (of the dequantized matrix for NF4).
    fn weight_len(&self, w: &Self::Weight) -> usize;

    // ---- elementwise --------------------------------------------------
    fn fill(&self, buf: &mut Self::Buf, value: f32);
    /// dst[dst_off..dst_off+len] = src[src_off..src_off+len]
    fn copy_slice(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        len: usize,
    );
    /// dst += src
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// buf *= s
    fn scale(&self, buf: &mut Self::Buf, s: f32);
    /// buf = cap · tanh(buf / cap), elementwise in f32 (a soft-capped
    /// logit, for inference; training caps inside `cross_entropy`).
    fn softcap(&self, buf: &mut Self::Buf, cap: f32);
    /// A block of columns from one row-major matrix into another (see
    /// `ColsShape`); the rest of dst is left as it is.
    fn copy_cols(&self, src: &Self::Buf, dst: &mut Self::Buf, shape: ColsShape);
    /// Σ buf², accumulated in f64 in a fixed order, returned as f64.
    fn sum_sq(&self, buf: &Self::Buf) -> f64;
    /// Σ over all buffers of Σ buf² (the global gradient norm²), read back
    /// once: a GPU backend overrides this to synchronise a single time.
    fn sum_sq_all(&self, bufs: &[&Self::Buf]) -> f64 {
        bufs.iter().map(|b| self.sum_sq(b)).sum()
    }

    // ---- embedding ----------------------------------------------------
    /// out[i, :] = table[ids[i], :] for i < n; table is [vocab, hidden].
    fn embedding(&self, table: &Self::Weight, ids: &Self::IntBuf, out: &mut Self::Buf, n: usize, hidden: usize);

    // ---- matrix products ------------------------------------------------
    /// y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n]).  The frozen-linear forward.
    fn linear(&self, x: &Self::Buf, w: &Self::Weight, bias: Option<&Self::Weight>, y: &mut Self::Buf, shape: MatShape);
    /// dx[m, k] (+)= dy[m, n] · W[n, k].  The frozen-linear input gradient.
    fn linear_backward_input(&self, dy: &Self::Buf, w: &Self::Weight, dx: &mut Self::Buf, shape: MatShape, accumulate: bool);

    // ---- LoRA side path -------------------------------------------------
    /// xa[m, r] = dropout(x)[m, k] · A[r, k]ᵀ ;  y[m, n] += scale · xa · B[n, r]ᵀ.
    /// `xa` is kept for the backward.
    fn lora_forward(&self, inputs: LoraInputs<'_, Self::Buf>, xa: &mut Self::Buf, y: &mut Self::Buf, shape: LoraShape);
    /// Backward of `lora_forward` given dy[m, n]:
    /// dB[n, r] += scale · dyᵀ · xa ;  dxa = scale · dy · B ;
    /// dA[r, k] += dxaᵀ · dropout(x) ;  dx[m, k] += dropout'(dxa · A).
    fn lora_backward(
        &self,
        dy: &Self::Buf,
        inputs: LoraInputs<'_, Self::Buf>,
        xa: &Self::Buf,
        grads: LoraGrads<'_, Self::Buf>,
        shape: LoraShape,
    );

    // ---- normalisation -------------------------------------------------
    /// y = x · rsqrt(mean(x²) + eps) · w per row of `hidden` (· (1 + w)
    /// with `shape.plus_one`); inv_rms[row] saved.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Weight, y: &mut Self::Buf, inv_rms: &mut Self::Buf, shape: NormShape, eps: f32);
    /// dx += ∂y/∂x ᵀ · dy (the weight is frozen: no weight gradient).
    fn rmsnorm_backward(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Weight,
        inv_rms: &Self::Buf,
        dx: &mut Self::Buf,
        shape: NormShape,
    );

    // ---- rotary embeddings ---------------------------------------------
    /// In place on x[n, heads, head_dim], half-split layout over the first
    /// `shape.rot_dim` dims of each head: x' = x·cos + rotate_half(x)·sin,
    /// angle = positions[t] · inv_freq[i] (computed in f32), cos and sin
    /// times `shape.mscale`; inv_freq has rot_dim/2 entries; the other dims
    /// are left as they are.
    fn rope(&self, x: &mut Self::Buf, positions: &Self::IntBuf, inv_freq: &Self::Buf, shape: RopeShape);
    /// The transpose of `rope` (rotation by the negative angle), in place on
    /// the gradient.
    fn rope_backward(&self, dx: &mut Self::Buf, positions: &Self::IntBuf, inv_freq: &Self::Buf, shape: RopeShape);

    // ---- attention -----------------------------------------------------
    /// Causal attention with GQA over the varlen batch.
    /// q [n, n_heads, d], k/v [n, n_kv_heads, d] -> out [n, n_heads, d];
    /// lse [n_heads, n] = log Σ exp(scores) per query (kept for backward).
    fn attention(
        &self,
        qkv: Qkv<'_, Self::Buf>,
        seqs: Varlen<'_, Self::IntBuf>,
        shape: AttnShape,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// Gradients of `attention`; dq, dk, dv are overwritten.
    fn attention_backward(
        &self,
        dout: &Self::Buf,
        qkv: Qkv<'_, Self::Buf>,
        saved: AttnSaved<'_, Self::Buf>,
        seqs: Varlen<'_, Self::IntBuf>,
        shape: AttnShape,
        grads: QkvGrads<'_, Self::Buf>,
    );
    /// Attention of the newest `shape.n` tokens of one sequence over that
    /// sequence's key/value cache (generation with a KV cache).
    /// q [n, n_heads, d] holds the new tokens, at positions past .. past+n;
    /// k_cache, v_cache [>= past+n, n_kv_heads, d] hold the keys and values
    /// of positions 0 .. past+n, the new tokens' included; out [n, n_heads, d].
    /// Query i sees key j iff j <= past+i and, with a window W,
    /// past+i − W < j: the mask of `attention` within one sequence, so a
    /// prefix prefilled by `attention` and the rest decoded by this op give
    /// the outputs of one `attention` call over the whole sequence. GQA reads
    /// kv head h / (n_heads / n_kv_heads) in place. No lse: there is no
    /// backward. `shape.max_seqlen` is unused.
    fn decode_attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        past: usize,
        shape: AttnShape,
        out: &mut Self::Buf,
    );

    /// Batched decoding: one new token in each of `shape.n` sequences, every
    /// sequence against its own region of one KV cache buffer. k_cache and
    /// v_cache are [shape.n × capacity, n_kv_heads, d], sequence s in rows
    /// s·capacity .. (s+1)·capacity; positions[s] is the position of its new
    /// token, whose key and value are already at row s·capacity +
    /// positions[s] (`scatter_rows`). Sequence s's query sees its rows j ≤
    /// positions[s] (and, with a window W, positions[s] − W < j): per
    /// sequence, `decode_attention` with past = positions[s] and n = 1.
    /// q, out [shape.n, n_heads, d]. `shape.max_seqlen` is unused.
    #[allow(clippy::too_many_arguments)]
    fn decode_attention_batch(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        positions: &Self::IntBuf,
        capacity: usize,
        shape: AttnShape,
        out: &mut Self::Buf,
    );
    /// Row s of `src` [rows, width] into row s·capacity + positions[s] of
    /// `dst` (each sequence's new key or value into the batched KV cache).
    fn scatter_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, positions: &Self::IntBuf, rows: usize, width: usize, capacity: usize);

    // ---- gated delta-net (linear attention) -------------------------------
    /// Qwen3.5's gated delta-net over the varlen batch, from its input
    /// projections to the input of out_proj: per sequence, a causal
    /// depthwise conv of qkv (zeros before the sequence) and SiLU; q and k
    /// L2-normalised per head (x·rsqrt(Σx² + 1e-6)) and q × k_dim^−½;
    /// β = σ(b), g = −exp(A_log)·softplus(a + dt_bias); per value head a
    /// state S [k_dim, v_dim] from zero: S ← e^g·S, S += k ⊗ β(v − Sᵀk),
    /// o = Sᵀq; out = norm_w ⊙ rmsnorm(o) ⊙ silu(z) per value head. All in
    /// f32. `saved` [shape.saved_len(sequence lengths)] receives the state
    /// at the start of every `DELTA_CHUNK` tokens of each sequence.
    fn delta_net(&self, inputs: DeltaIn<'_, Self::Buf>, w: DeltaWeights<'_, Self::Weight>, seqs: Varlen<'_, Self::IntBuf>, shape: DeltaShape, out: &mut Self::Buf, saved: &mut Self::Buf);
    /// Gradients of `delta_net`'s inputs given dout (the frozen parameters
    /// get none); recomputes within each chunk from `saved`.
    #[allow(clippy::too_many_arguments)]
    fn delta_net_backward(
        &self,
        dout: &Self::Buf,
        inputs: DeltaIn<'_, Self::Buf>,
        w: DeltaWeights<'_, Self::Weight>,
        seqs: Varlen<'_, Self::IntBuf>,
        shape: DeltaShape,
        saved: &Self::Buf,
        grads: DeltaGrads<'_, Self::Buf>,
    );
    /// `delta_net` for generation: each sequence's new tokens continue from
    /// its state (a fresh sequence's is zero) and leave the state after
    /// them, so a prompt prefilled then decoded a token at a time gives the
    /// outputs of one `delta_net` over the whole sequence.
    fn delta_net_decode(
        &self,
        inputs: DeltaIn<'_, Self::Buf>,
        w: DeltaWeights<'_, Self::Weight>,
        seqs: Varlen<'_, Self::IntBuf>,
        shape: DeltaShape,
        state: DeltaState<'_, Self::Buf>,
        out: &mut Self::Buf,
    );

    // ---- MLP activation ------------------------------------------------
    /// out = act(gate) ⊙ up, elementwise over `shape.len`.
    fn glu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf, shape: GluShape);
    /// dgate, dup (overwritten) from dout.
    fn glu_backward(
        &self,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        shape: GluShape,
    );

    // ---- loss ------------------------------------------------------------
    /// Cross-entropy over logits[rows, vocab] (already aligned: row t is
    /// scored against targets[t]; -100 is ignored), of the logits capped to
    /// c·tanh(l/c) when `shape.softcap` is Some(c).  losses[row] = NLL (0
    /// for ignored rows).  When `grad_scale` is Some(s), logits are
    /// overwritten in place by the gradient with respect to the uncapped
    /// logits, s · (softmax − onehot) (· (1 − tanh²(l/c)) when capped); zero
    /// rows for ignored targets.
    fn cross_entropy(
        &self,
        logits: &mut Self::Buf,
        targets: &Self::IntBuf,
        losses: &mut Self::Buf,
        shape: CeShape,
        grad_scale: Option<f32>,
    );

    // ---- token choice ----------------------------------------------------
    /// The next token of each of `rows` rows of logits [rows, vocab] (any
    /// storage type, read as f32): with `params` greedy, the argmax (the
    /// first of equal maxima; NaN never wins); otherwise the logits are
    /// divided by the temperature and filtered by top-k, top-p and min-p in
    /// that order (`cpu::sample` holds the reference arithmetic: softmax
    /// masses in f64), and row r's token is the first, in index order, whose
    /// cumulative probability exceeds `uniforms[r]` ∈ [0, 1) (rounding that
    /// leaves the total below it: the last token with non-zero probability).
    /// The uniforms are drawn by the caller (each sequence its own seeded
    /// RNG), so the choice is reproducible and independent of the batch;
    /// greedy ignores them. Only the `rows` tokens come back to the host.
    /// The default reads the logits back and runs the CPU reference.
    fn sample_rows(&self, logits: &Self::Buf, rows: usize, vocab: usize, params: &SamplingParams, uniforms: &[f64]) -> Vec<u32> {
        cpu::sample::sample_rows(&self.download(logits), rows, vocab, params, uniforms)
    }

    // ---- optimiser -------------------------------------------------------
    /// One AdamW step on a parameter with its gradient and moments.
    fn adamw(&self, param: &mut Self::Buf, grad: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: AdamW);

    // ---- step structure --------------------------------------------------
    /// The graph entering `phase` of a training pass; computes nothing. A
    /// backend that attributes memory or time to phases overrides it.
    fn enter(&self, _phase: Phase) {}
}

/// Device bytes of an NF4 weight as the GPU backend stores it: the packed
/// codes, the block scales in their stored form (f32 per block, or with
/// double quantization one u8 per block plus the f32 nested scales and the
/// 256-entry map) and the 16-entry code table. The memory planner predicts
/// the same figure from shapes (`train::memory::nf4_weight_bytes`).
pub fn nf4_device_bytes(t: &Nf4Tensor) -> usize {
    use crate::quant::nf4::Absmax;
    let scales = match &t.absmax {
        Absmax::Plain(a) => 4 * a.len(),
        Absmax::Nested { codes, nested_absmax, nested_map, .. } => codes.len() + 4 * (nested_absmax.len() + nested_map.len()),
    };
    t.packed.len() + scales + 4 * t.code.len()
}

/// Check an NF4 tensor's parts agree with its shape and block size, so a
/// backend can index them without bounds surprises.
pub fn check_nf4(t: &Nf4Tensor) -> Result<()> {
    use crate::quant::nf4::Absmax;
    let n = t.numel();
    anyhow::ensure!(t.blocksize > 0, "NF4 weight {:?}: block size 0", t.shape);
    anyhow::ensure!(
        t.packed.len() == n.div_ceil(2),
        "NF4 weight {:?}: {} packed bytes, expected {}",
        t.shape,
        t.packed.len(),
        n.div_ceil(2)
    );
    let blocks = t.n_blocks();
    match &t.absmax {
        Absmax::Plain(a) => anyhow::ensure!(a.len() == blocks, "NF4 weight {:?}: {} absmax values for {blocks} blocks", t.shape, a.len()),
        Absmax::Nested { codes, nested_absmax, nested_map, nested_blocksize, .. } => {
            anyhow::ensure!(codes.len() == blocks, "NF4 weight {:?}: {} absmax codes for {blocks} blocks", t.shape, codes.len());
            anyhow::ensure!(*nested_blocksize > 0, "NF4 weight {:?}: nested block size 0", t.shape);
            anyhow::ensure!(
                nested_absmax.len() == blocks.div_ceil(*nested_blocksize),
                "NF4 weight {:?}: {} nested absmax values for {blocks} blocks of {nested_blocksize}",
                t.shape,
                nested_absmax.len()
            );
            anyhow::ensure!(nested_map.len() == 256, "NF4 weight {:?}: nested map has {} entries, expected 256", t.shape, nested_map.len());
        }
    }
    Ok(())
}

/// Convert little-endian checkpoint bytes (any alignment) to f32.
/// `bytes.len()` must be a multiple of the dtype's size.
pub fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}
