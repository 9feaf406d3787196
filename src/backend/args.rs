//! Argument groups of the ops: the shapes and constants of one call (small
//! `Copy` structs) and the buffers an op takes together (q/k/v, a LoRA
//! path's x/A/B, their gradients). They keep every op at a handful of
//! arguments and name what each number is at the call site. A new group
//! goes here; a group of buffers is declared with `buffers!` so wrappers
//! can map it onto their inner backend's handles.

use super::Dropout;
use anyhow::{Result, bail};

/// Shape of a frozen-linear product: x[m, k] · W[n, k]ᵀ = y[m, n].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// One LoRA side path: x[m, k], A[r, k], B[n, r], xa[m, r], y[m, n]; the
/// side path's output is multiplied by `scale`, its input dropped out with
/// `dropout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub scale: f32,
    pub dropout: Option<Dropout>,
}

/// RMSNorm over `rows` rows of `hidden` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    pub rows: usize,
    pub hidden: usize,
    /// Scale by (1 + w), computed in f32, instead of w (Gemma's norms,
    /// whose stored weights are offsets from one).
    pub plus_one: bool,
}

impl NormShape {
    /// The plain RMSNorm (scale by w) over `rows` rows of `hidden`.
    pub fn new(rows: usize, hidden: usize) -> NormShape {
        NormShape { rows, hidden, plus_one: false }
    }
}

/// Rotary embedding over x[n, heads, head_dim].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeShape {
    pub n: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// The rotated leading dims of each head (head_dim, or fewer with a
    /// partial rotary factor); even. The pairs are (i, i + rot_dim/2) for
    /// i < rot_dim/2, and inv_freq has rot_dim/2 entries; the dims from
    /// rot_dim on pass through unchanged.
    pub rot_dim: usize,
    /// Multiplier of cos and sin (f32), 1 except for long-context rope
    /// variants whose attention factor scales the rotated dims.
    pub mscale: f32,
}

impl RopeShape {
    /// Every dim rotated, no scaling.
    pub fn full(n: usize, heads: usize, head_dim: usize) -> RopeShape {
        RopeShape { n, heads, head_dim, rot_dim: head_dim, mscale: 1.0 }
    }
}

/// The activation of a gated MLP: out = act(gate) ⊙ up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GluAct {
    /// silu(g) = g·σ(g) (SwiGLU: Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// gelu with the tanh approximation,
    /// 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))) (GeGLU: Gemma).
    GeluTanh,
    /// σ(g) = 1 / (1 + exp(−g)): not an MLP activation but Qwen3.5's
    /// attention output gate, attn ⊙ σ(gate), which has the same shape.
    Sigmoid,
}

/// A gated activation over `len` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GluShape {
    pub len: usize,
    pub act: GluAct,
}

/// Cross-entropy over logits[rows, vocab]; with `softcap` = Some(c) the
/// logits are first capped to c·tanh(l/c) (Gemma 2's final soft-cap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CeShape {
    pub rows: usize,
    pub vocab: usize,
    pub softcap: Option<f32>,
}

/// A block of columns copied between two row-major matrices with the same
/// number of rows: dst[r, dst_off + j] = src[r, src_off + j] for r < rows,
/// j < width (splitting a fused projection's output, or assembling its
/// gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColsShape {
    pub rows: usize,
    pub src_cols: usize,
    pub src_off: usize,
    pub dst_cols: usize,
    pub dst_off: usize,
    pub width: usize,
}

/// How `sample_rows` chooses a token from a row of logits: temperature,
/// then top-k, top-p (nucleus) and min-p, in transformers' order (its
/// logits warpers), then one draw from the softmax of what is left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by this; 0 = greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens (ties with the k-th kept); None = off.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches
    /// p; None = off.
    pub top_p: Option<f32>,
    /// Drop the tokens less likely than min_p times the most likely one;
    /// None = off.
    pub min_p: Option<f32>,
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, min_p: None }
    }

    /// The ranges transformers accepts: temperature ≥ 0 (finite), top_k ≥ 1,
    /// 0 < top_p ≤ 1, 0 ≤ min_p ≤ 1.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("temperature must be a finite number >= 0 (0 = greedy), got {}", self.temperature);
        }
        if self.top_k == Some(0) {
            bail!("top_k must be at least 1 (leave it unset to keep every token)");
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("top_p must be in (0, 1], got {p}");
        }
        if let Some(m) = self.min_p
            && !(0.0..=1.0).contains(&m)
        {
            bail!("min_p must be in [0, 1], got {m}");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The sequences of a varlen batch: `cu_seqlens` (length `n_seqs + 1`) on
/// the backend, see the module docs of `backend`.
pub struct Varlen<'a, I: ?Sized> {
    pub cu_seqlens: &'a I,
    pub n_seqs: usize,
}

impl<I: ?Sized> Clone for Varlen<'_, I> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<I: ?Sized> Copy for Varlen<'_, I> {}

impl<'a, I: ?Sized> Varlen<'a, I> {
    /// The same batch over another backend's handle (wrapper backends).
    pub fn map<J: ?Sized>(self, f: impl Fn(&'a I) -> &'a J) -> Varlen<'a, J> {
        Varlen { cu_seqlens: f(self.cu_seqlens), n_seqs: self.n_seqs }
    }
}

/// Sequence length over which the gated delta-net's training forward keeps
/// the recurrent state (the state at each chunk's first token, per
/// sequence); its backward recomputes within a chunk from it. 64, the chunk
/// of transformers' chunked form.
pub const DELTA_CHUNK: usize = 64;

/// Shape of one gated delta-net call (Qwen3.5's linear attention) over a
/// varlen batch of `n` tokens: `k_heads` query/key heads of `k_dim`,
/// `v_heads` value heads of `v_dim` (each k head serves v_heads / k_heads
/// consecutive v heads), a causal depthwise conv of `conv_kernel` taps, and
/// the gated RMSNorm's epsilon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaShape {
    pub n: usize,
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub conv_kernel: usize,
    pub norm_eps: f32,
}

impl DeltaShape {
    /// Channels of the conv: [q: k_heads·k_dim | k: k_heads·k_dim | v: v_heads·v_dim].
    pub fn conv_dim(&self) -> usize {
        2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
    }
    /// Width of the output (and of z): v_heads·v_dim.
    pub fn value_width(&self) -> usize {
        self.v_heads * self.v_dim
    }
    /// f32 values of one sequence's recurrent state: v_heads·k_dim·v_dim.
    pub fn state_size(&self) -> usize {
        self.v_heads * self.k_dim * self.v_dim
    }
    /// f32 values of the states the training forward keeps for sequences
    /// of these lengths: one state per `DELTA_CHUNK` tokens begun.
    pub fn saved_len(&self, seq_lens: impl IntoIterator<Item = usize>) -> usize {
        seq_lens.into_iter().map(|l| l.div_ceil(DELTA_CHUNK)).sum::<usize>() * self.state_size()
    }
}

/// Declares a group of buffers an op takes together: read-only (`ref`,
/// `Copy`) or written (`mut`), each with `map` to the same group over
/// another backend's buffers.
macro_rules! buffers {
    ($(#[$doc:meta])* ref $name:ident { $($field:ident),+ }) => {
        $(#[$doc])*
        pub struct $name<'a, T: ?Sized> {
            $(pub $field: &'a T,)+
        }
        impl<T: ?Sized> Clone for $name<'_, T> {
            fn clone(&self) -> Self {
                *self
            }
        }
        impl<T: ?Sized> Copy for $name<'_, T> {}
        impl<'a, T: ?Sized> $name<'a, T> {
            /// The same buffers as another backend's (wrapper backends).
            pub fn map<U: ?Sized>(self, f: impl Fn(&'a T) -> &'a U) -> $name<'a, U> {
                $name { $($field: f(self.$field),)+ }
            }
        }
    };
    ($(#[$doc:meta])* mut $name:ident { $($field:ident),+ }) => {
        $(#[$doc])*
        pub struct $name<'a, T: ?Sized> {
            $(pub $field: &'a mut T,)+
        }
        impl<'a, T: ?Sized> $name<'a, T> {
            /// The same buffers as another backend's (wrapper backends).
            pub fn map<U: ?Sized>(self, mut f: impl FnMut(&'a mut T) -> &'a mut U) -> $name<'a, U> {
                $name { $($field: f(self.$field),)+ }
            }
        }
    };
}

buffers! {
    /// Attention's queries [n, n_heads, d], keys and values [n, n_kv_heads, d].
    ref Qkv { q, k, v }
}
buffers! {
    /// Gradients of q, k and v (overwritten by `attention_backward`).
    mut QkvGrads { dq, dk, dv }
}
buffers! {
    /// What the attention forward saved for its backward: the output
    /// [n, n_heads, d] and the log-sum-exp [n_heads, n].
    ref AttnSaved { out, lse }
}
buffers! {
    /// A LoRA side path's input x[m, k] and adapter matrices A[r, k], B[n, r].
    ref LoraInputs { x, a, b }
}
buffers! {
    /// Gradients of a LoRA side path: dx (accumulated), dA and dB (accumulated).
    mut LoraGrads { dx, da, db }
}
buffers! {
    /// The gated delta-net's inputs, the outputs of its four input
    /// projections: qkv [n, conv_dim] before the conv, z [n, v_heads·v_dim]
    /// (the output gate), b [n, v_heads] (β = σ(b)) and a [n, v_heads] (the
    /// decay's input).
    ref DeltaIn { qkv, z, b, a }
}
buffers! {
    /// The gated delta-net's frozen parameters: the conv [conv_dim, kernel],
    /// A_log and dt_bias [v_heads], the gated norm's weight [v_dim].
    ref DeltaWeights { conv, a_log, dt_bias, norm }
}
buffers! {
    /// Gradients of the gated delta-net's inputs (overwritten).
    mut DeltaGrads { qkv, z, b, a }
}
buffers! {
    /// Each decoded sequence's state: the conv's last kernel−1 input rows
    /// [n_seqs, kernel−1, conv_dim] and the recurrent state
    /// [n_seqs, v_heads, k_dim, v_dim], both f32.
    mut DeltaState { conv, rec }
}
