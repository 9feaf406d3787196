//! One decoder layer: forward keeping exactly what its backward needs, and
//! the hand-written backward, reading as the forward in reverse.
//!
//!   h1 = norm(x_in);  q,k,v = proj(h1)  (one fused qkv product, or three)
//!   q,k = norm_head(q), norm_head(k)    (per-head q/k norms, if any)
//!   rope(q, k);  attn = attention(q, k, v)  (scale, soft-cap, window)
//!   attn ⊙= σ(gate)                     (Qwen3.5: q_proj also gives the gate)
//!   x_mid = x_in + norm_post(o_proj(attn))  (post-attention norm, if any)
//!   h2 = norm(x_mid);  act = act(gate(h2)) ⊙ up(h2)  (fused gate_up, or two)
//!   x_out = x_mid + norm_post(down(act))  (post-MLP norm, if any)
//!
//! The optional parts are the families' differences: Llama/Mistral/Qwen2
//! take none, Qwen3 the q/k norms, Gemma 2 the post norms (and soft-cap,
//! GeGLU), Gemma 3 both norms, Phi-3 the fused products. A linear-attention
//! layer (Qwen3.5) mixes tokens with the gated delta-net instead of
//! attention (`delta_layer`); the MLP half is the same.

use super::delta_layer;
pub use super::layer_bufs::clone_buf;
pub(super) use super::layer_bufs::{join_cols, split_cols};
use super::gemma4_layer::{self, BlockActs};
use super::{Layer, Linear, Proj, RopeTable};
use crate::backend::{
    AttnSaved, AttnShape, Backend, DeltaState, Dropout, GluAct, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape,
    NormShape, Qkv, QkvGrads, RopeShape, Varlen,
};
use crate::model::hparams::ModelConfig;

/// Per-step inputs shared by every layer, already on the backend.
pub struct StepCtx<'a, B: Backend> {
    pub n: usize,
    pub n_seqs: usize,
    /// Longest sequence in the batch.
    pub max_seqlen: usize,
    pub positions: &'a B::IntBuf,
    pub cu_seqlens: &'a B::IntBuf,
    /// Each sequence's token count, on the host (sizes the delta-net's
    /// saved states).
    pub seq_lens: &'a [usize],
    /// The model's rotary tables (`Model::rope_tables`).
    pub ropes: &'a [RopeTable<B>],
    /// The largest position in this forward (picks long-rope's table).
    pub max_position: usize,
    /// Some(seed) in training: LoRA dropout is active with masks derived
    /// from this seed, the layer and the projection.
    pub dropout_seed: Option<u64>,
    /// false runs the base model alone (the reference policy of preference
    /// objectives): no adapter is applied.
    pub adapters: bool,
    /// Gemma 4's per-pass state (PLE inputs, shared K/V).
    pub g4: Option<&'a gemma4_layer::Pass<B>>,
}

/// A norm's input and saved inverse RMS (for its backward).
pub(super) struct Normed<B: Backend> {
    pub x: B::Buf,
    pub inv: B::Buf,
}

/// Activations saved by a layer's forward for its backward.
pub struct LayerActs<B: Backend> {
    pub x_in: B::Buf,
    h1: B::Buf,
    inv1: B::Buf,
    mixer: MixerActs<B>,
    /// The output projection's output before the post-attention norm
    /// (models with one).
    o_raw: Option<Normed<B>>,
    x_mid: B::Buf,
    h2: B::Buf,
    inv2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
    /// down's output before the post-MLP norm (models with one).
    down_raw: Option<Normed<B>>,
    /// LoRA's x·Aᵀ per projection (indexed by `Proj as usize`).
    pub(super) xa: Vec<Option<B::Buf>>,
    /// Gemma 4's PLE block (layers with one).
    g4: Option<BlockActs<B>>,
}

/// What the token mixer saved.
enum MixerActs<B: Backend> {
    Attention(AttnActs<B>),
    DeltaNet(delta_layer::DeltaActs<B>),
}

/// Attention's saved activations.
struct AttnActs<B: Backend> {
    /// q and k before their per-head norms (models with q/k norms), v
    /// before its norm (Gemma 4).
    q_raw: Option<Normed<B>>,
    k_raw: Option<Normed<B>>,
    v_raw: Option<Normed<B>>,
    /// Rotated q and k, and v, as attention saw them.
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    /// Gated attention: the gate (before σ) and attn ⊙ σ(gate), o_proj's input.
    gated: Option<(B::Buf, B::Buf)>,
}

impl<B: Backend> MixerActs<B> {
    /// The output projection's input.
    fn o_input(&self) -> &B::Buf {
        match self {
            MixerActs::Attention(a) => a.gated.as_ref().map_or(&a.attn, |(_, g)| g),
            MixerActs::DeltaNet(d) => &d.core,
        }
    }
}

/// How a layer's token mixer runs: over the training batch, or (generation)
/// attention against a KV cache or the delta-net from each sequence's state.
pub enum Mixing<'a, B: Backend> {
    /// `attention` / `delta_net` over the varlen batch of the step.
    Batch,
    /// `attend(q, k, v, attn, lse)` given the rotated q and k: attention
    /// against a KV cache, which it extends by k and v.
    Attend(Box<dyn FnOnce(&B::Buf, &B::Buf, &B::Buf, &mut B::Buf, &mut B::Buf) + 'a>),
    /// The delta-net continuing from, and updating, each sequence's state.
    DeltaState(DeltaState<'a, B::Buf>),
}


pub(super) fn dropout_for<B: Backend>(lin: &Linear<B>, seed: Option<u64>, layer: usize, p: Proj) -> Option<Dropout> {
    let lora = lin.lora.as_ref()?;
    let seed = seed?;
    if lora.dropout <= 0.0 {
        return None;
    }
    // Seven slots per layer: the unfused projections' (a fused one takes its
    // first part's slot), so masks of existing families never change. The
    // delta-net's projections (slots 9..) are numbered past every layer's.
    let slot = p.slot();
    let module = if slot < 7 { (layer * 7 + slot) as u64 } else { (1u64 << 40) + (layer * 16 + slot) as u64 };
    Some(Dropout { p: lora.dropout, seed: crate::util::rng::Rng::new(seed ^ module.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64() })
}

/// y = x·Wᵀ (+b) (+ LoRA) for projection `p` of layer `li`; LoRA's x·Aᵀ is
/// kept in `xa[p]` for the backward.
#[allow(clippy::too_many_arguments)]
pub(super) fn proj_forward<B: Backend>(
    be: &B,
    layer: &Layer<B>,
    li: usize,
    p: Proj,
    x: &B::Buf,
    m: usize,
    ctx: &StepCtx<B>,
    xa: &mut [Option<B::Buf>],
) -> B::Buf {
    let lin = layer.p(p);
    let mut y = be.zeros(m * lin.out_f);
    be.linear(x, &lin.weight, lin.bias.as_ref(), &mut y, MatShape { m, k: lin.in_f, n: lin.out_f });
    xa[p as usize] = lin.lora.as_ref().filter(|_| ctx.adapters).map(|l| {
        let mut saved = be.zeros(m * l.r);
        let dropout = dropout_for(lin, ctx.dropout_seed, li, p);
        let shape = LoraShape { m, k: lin.in_f, n: lin.out_f, r: l.r, scale: l.scale, dropout };
        be.lora_forward(LoraInputs { x, a: &l.a, b: &l.b }, &mut saved, &mut y, shape);
        saved
    });
    y
}

/// dx (+)= dy·W (+ LoRA path) for projection `p` of layer `li`, whose input
/// was `x`; LoRA gradients accumulate into the adapter.
#[allow(clippy::too_many_arguments)]
pub(super) fn proj_backward<B: Backend>(
    be: &B,
    layer: &mut Layer<B>,
    li: usize,
    p: Proj,
    xa: &[Option<B::Buf>],
    seed: Option<u64>,
    dy: &B::Buf,
    x: &B::Buf,
    dx: &mut B::Buf,
    m: usize,
    accumulate: bool,
) {
    let dropout = dropout_for(layer.p(p), seed, li, p);
    let Linear { weight, lora, in_f, out_f, .. } = layer.p_mut(p);
    be.linear_backward_input(dy, weight, dx, MatShape { m, k: *in_f, n: *out_f }, accumulate);
    if let Some(l) = lora.as_mut() {
        let xa = xa[p as usize].as_ref().expect("LoRA activations saved in forward");
        let shape = LoraShape { m, k: *in_f, n: *out_f, r: l.r, scale: l.scale, dropout };
        let grads = LoraGrads { dx, da: &mut l.grad_a, db: &mut l.grad_b };
        be.lora_backward(dy, LoraInputs { x, a: &l.a, b: &l.b }, xa, grads, shape);
    }
}

pub fn attn_shape(cfg: &ModelConfig, n: usize, max_seqlen: usize, window: Option<usize>) -> AttnShape {
    AttnShape {
        max_seqlen,
        n,
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        window,
        scale: cfg.attn_scale,
        softcap: cfg.attn_softcap,
    }
}

/// (head_dim, KV heads) of a layer: the model's, or Gemma 4's per layer.
pub fn head_dims<B: Backend>(cfg: &ModelConfig, layer: &Layer<B>) -> (usize, usize) {
    layer.g4.as_ref().map_or((cfg.head_dim, cfg.n_kv_heads), |g| (g.head_dim, g.kv_heads))
}

/// `attn_shape` for one layer's own head sizes.
pub fn layer_attn_shape<B: Backend>(cfg: &ModelConfig, layer: &Layer<B>, n: usize, max_seqlen: usize) -> AttnShape {
    let (head_dim, n_kv_heads) = head_dims(cfg, layer);
    AttnShape { head_dim, n_kv_heads, ..attn_shape(cfg, n, max_seqlen, layer.window) }
}

fn norm_shape(cfg: &ModelConfig, rows: usize, hidden: usize) -> NormShape {
    NormShape { rows, hidden, plus_one: cfg.norm_plus_one }
}

fn rope_shape(cfg: &ModelConfig, layer: &Layer<impl Backend>, n: usize, heads: usize) -> RopeShape {
    // Gemma 4 turns pairs over each layer's whole head.
    let (head_dim, rot_dim) = layer.g4.as_ref().map_or((cfg.head_dim, cfg.rot_dim), |g| (g.head_dim, g.head_dim));
    RopeShape { n, heads, head_dim, rot_dim, mscale: cfg.ropes[layer.rope].mscale() }
}

/// y = norm(x) over rows of `hidden`, keeping x and the inverse RMS when
/// `keep` (for the backward).
pub(super) fn norm_forward<B: Backend>(be: &B, cfg: &ModelConfig, w: &B::Weight, x: B::Buf, rows: usize, hidden: usize) -> (B::Buf, Normed<B>) {
    let mut y = be.zeros_like(&x);
    let mut inv = be.zeros_f32(rows);
    be.rmsnorm(&x, w, &mut y, &mut inv, norm_shape(cfg, rows, hidden), cfg.rms_norm_eps);
    (y, Normed { x, inv })
}

/// ∂L/∂x of `norm_forward`, given ∂L/∂y.
pub(super) fn norm_backward<B: Backend>(be: &B, cfg: &ModelConfig, w: &B::Weight, saved: &Normed<B>, dy: &B::Buf, rows: usize, hidden: usize) -> B::Buf {
    let mut dx = be.zeros_like(dy);
    be.rmsnorm_backward(dy, &saved.x, w, &saved.inv, &mut dx, norm_shape(cfg, rows, hidden));
    dx
}



/// Forward of layer `li` over the step's batch; consumes x_in (it is saved
/// in the activations).
pub fn forward<B: Backend>(be: &B, cfg: &ModelConfig, layer: &Layer<B>, li: usize, x_in: B::Buf, ctx: &StepCtx<B>) -> (B::Buf, LayerActs<B>) {
    forward_with(be, cfg, layer, li, x_in, ctx, Mixing::Batch)
}

/// Forward of layer `li` with its token mixer run as `mixing` says: the
/// batch's own causal attention or delta-net in training, or against a KV
/// cache / the delta-net's state in generation, so both run exactly the
/// same layer.
pub fn forward_with<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &Layer<B>,
    li: usize,
    x_in: B::Buf,
    ctx: &StepCtx<B>,
    mixing: Mixing<'_, B>,
) -> (B::Buf, LayerActs<B>) {
    let n = ctx.n;
    let h = cfg.hidden;
    let mut xa: Vec<Option<B::Buf>> = (0..Proj::ALL.len()).map(|_| None).collect();

    let mut h1 = be.zeros(n * h);
    let mut inv1 = be.zeros_f32(n);
    be.rmsnorm(&x_in, &layer.input_norm, &mut h1, &mut inv1, norm_shape(cfg, n, h), cfg.rms_norm_eps);

    let (mixer, out_proj) = match &layer.delta {
        Some(params) => {
            let state = match mixing {
                Mixing::DeltaState(s) => Some(s),
                _ => None,
            };
            let acts = delta_layer::forward(be, cfg, layer, params, li, &h1, ctx, state, &mut xa);
            (MixerActs::DeltaNet(acts), Proj::DeltaOut)
        }
        None => (MixerActs::Attention(attention_forward(be, cfg, layer, li, &h1, ctx, mixing, &mut xa)), Proj::O),
    };

    let o = proj_forward(be, layer, li, out_proj, mixer.o_input(), n, ctx, &mut xa);
    let (o, o_raw) = match &layer.post_attn_norm {
        Some(w) => {
            let (y, saved) = norm_forward(be, cfg, w, o, n, h);
            (y, Some(saved))
        }
        None => (o, None),
    };
    let mut x_mid = clone_buf(be, &x_in);
    be.add_assign(&mut x_mid, &o);
    drop(o);

    let inter = layer.p(Proj::Down).in_f;
    let mut h2 = be.zeros(n * h);
    let mut inv2 = be.zeros_f32(n);
    be.rmsnorm(&x_mid, &layer.pre_mlp_norm, &mut h2, &mut inv2, norm_shape(cfg, n, h), cfg.rms_norm_eps);
    let (gate, up) = if layer.proj[Proj::GateUp as usize].is_some() {
        let gu = proj_forward(be, layer, li, Proj::GateUp, &h2, n, ctx, &mut xa);
        let mut parts = split_cols(be, &gu, n, &[inter, inter]).into_iter();
        (parts.next().unwrap(), parts.next().unwrap())
    } else {
        let gate = proj_forward(be, layer, li, Proj::Gate, &h2, n, ctx, &mut xa);
        (gate, proj_forward(be, layer, li, Proj::Up, &h2, n, ctx, &mut xa))
    };
    let mut act = be.zeros(n * inter);
    be.glu(&gate, &up, &mut act, GluShape { len: n * inter, act: cfg.glu });
    let down = proj_forward(be, layer, li, Proj::Down, &act, n, ctx, &mut xa);
    let (down, down_raw) = match &layer.post_mlp_norm {
        Some(w) => {
            let (y, saved) = norm_forward(be, cfg, w, down, n, h);
            (y, Some(saved))
        }
        None => (down, None),
    };
    let mut x_out = clone_buf(be, &x_mid);
    be.add_assign(&mut x_out, &down);
    let (x_out, g4) = match &layer.g4 {
        Some(_) => gemma4_layer::block_forward(be, cfg, layer, li, x_out, ctx, &mut xa),
        None => (x_out, None),
    };

    let acts = LayerActs { x_in, h1, inv1, mixer, o_raw, x_mid, h2, inv2, gate, up, act, down_raw, xa, g4 };
    (x_out, acts)
}

/// Attention from the normed input h1 to o_proj's input.
#[allow(clippy::too_many_arguments)]
fn attention_forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &Layer<B>,
    li: usize,
    h1: &B::Buf,
    ctx: &StepCtx<B>,
    mixing: Mixing<'_, B>,
    xa: &mut [Option<B::Buf>],
) -> AttnActs<B> {
    let n = ctx.n;
    let (d, kv_heads) = head_dims(cfg, layer);
    let (qd, kvd) = (cfg.n_heads * d, kv_heads * d);
    let has = |p: Proj| layer.proj[p as usize].is_some();
    let (q, k, v) = if has(Proj::Qkv) {
        let qkv = proj_forward(be, layer, li, Proj::Qkv, h1, n, ctx, xa);
        let mut parts = split_cols(be, &qkv, n, &[qd, kvd, kvd]).into_iter();
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
    } else {
        let q = proj_forward(be, layer, li, Proj::Q, h1, n, ctx, xa);
        // Gemma 4: K/V-sharing layers compute neither (empty here), K=V
        // layers take V from k_proj.
        let k = if has(Proj::K) { proj_forward(be, layer, li, Proj::K, h1, n, ctx, xa) } else { be.zeros(0) };
        let v = match gemma4_layer::value_of(be, layer, &k) {
            Some(v) => v,
            None if has(Proj::V) => proj_forward(be, layer, li, Proj::V, h1, n, ctx, xa),
            None => be.zeros(0),
        };
        (q, k, v)
    };
    // Gated attention: each head's q_proj row block is [query | gate].
    let (q, gate) = if cfg.attn_output_gate {
        let mut parts = split_cols(be, &q, n * cfg.n_heads, &[d, d]).into_iter();
        (parts.next().unwrap(), parts.next())
    } else {
        (q, None)
    };
    // Per-head norms: rows of head_dim.
    let (mut q, q_raw) = match &layer.q_norm {
        Some(qn) => {
            let (out, saved) = norm_forward(be, cfg, qn, q, n * cfg.n_heads, d);
            (out, Some(saved))
        }
        None => (q, None),
    };
    let (mut k, k_raw) = match &layer.k_norm {
        Some(kn) => {
            let (out, saved) = norm_forward(be, cfg, kn, k, n * kv_heads, d);
            (out, Some(saved))
        }
        None => (k, None),
    };
    let (mut v, v_raw) = match layer.g4.as_ref().and_then(|g| g.v_norm.as_ref()) {
        Some(vn) => {
            let (out, saved) = norm_forward(be, cfg, vn, v, n * kv_heads, d);
            (out, Some(saved))
        }
        None => (v, None),
    };
    let inv_freq = ctx.ropes[layer.rope].for_max_position(ctx.max_position);
    be.rope(&mut q, ctx.positions, inv_freq, rope_shape(cfg, layer, n, cfg.n_heads));
    if let (Some(g), Some(pass)) = (&layer.g4, ctx.g4) {
        match g.kv_source {
            Some(src) => (k, v) = pass.read_kv(be, src),
            None => {
                be.rope(&mut k, ctx.positions, inv_freq, rope_shape(cfg, layer, n, kv_heads));
                if g.kv_producer {
                    pass.store_kv(be, li, &k, &v);
                }
            }
        }
    } else {
        be.rope(&mut k, ctx.positions, inv_freq, rope_shape(cfg, layer, n, kv_heads));
    }

    let mut attn = be.zeros(n * qd);
    let mut lse = be.zeros_f32(cfg.n_heads * n);
    match mixing {
        Mixing::Attend(attend) => attend(&q, &k, &v, &mut attn, &mut lse),
        _ => {
            let shape = layer_attn_shape(cfg, layer, n, ctx.max_seqlen);
            be.attention(Qkv { q: &q, k: &k, v: &v }, Varlen { cu_seqlens: ctx.cu_seqlens, n_seqs: ctx.n_seqs }, shape, &mut attn, &mut lse)
        }
    }
    let gated = gate.map(|g| {
        let mut out = be.zeros(n * qd);
        be.glu(&g, &attn, &mut out, GluShape { len: n * qd, act: GluAct::Sigmoid });
        (g, out)
    });
    AttnActs { q_raw, k_raw, v_raw, q, k, v, attn, lse, gated }
}

/// Backward of layer `li`: on entry `dx` holds ∂L/∂x_out, on exit ∂L/∂x_in.
/// LoRA gradients are accumulated into the layer's adapters.
pub fn backward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &mut Layer<B>,
    li: usize,
    acts: &LayerActs<B>,
    dx: &mut B::Buf,
    ctx: &StepCtx<B>,
) {
    let n = ctx.n;
    let h = cfg.hidden;
    let inter = layer.p(Proj::Down).in_f;
    let seed = ctx.dropout_seed;
    let xa = &acts.xa;
    if layer.g4.is_some() {
        gemma4_layer::block_backward(be, cfg, layer, li, acts.g4.as_ref(), xa, dx, ctx);
    }

    // MLP: x_out = x_mid + post_norm(down(act(gate(h2)) ⊙ up(h2)))
    let d_down = match (&layer.post_mlp_norm, &acts.down_raw) {
        (Some(w), Some(saved)) => Some(norm_backward(be, cfg, w, saved, dx, n, h)),
        _ => None,
    };
    let mut d_act = be.zeros(n * inter);
    proj_backward(be, layer, li, Proj::Down, xa, seed, d_down.as_ref().unwrap_or(dx), &acts.act, &mut d_act, n, false);
    drop(d_down);
    let mut d_gate = be.zeros(n * inter);
    let mut d_up = be.zeros(n * inter);
    be.glu_backward(&d_act, &acts.gate, &acts.up, &mut d_gate, &mut d_up, GluShape { len: n * inter, act: cfg.glu });
    drop(d_act);
    let mut dh2 = be.zeros(n * h);
    if layer.proj[Proj::GateUp as usize].is_some() {
        let d_gu = join_cols(be, &[&d_gate, &d_up], n, &[inter, inter]);
        drop((d_gate, d_up));
        proj_backward(be, layer, li, Proj::GateUp, xa, seed, &d_gu, &acts.h2, &mut dh2, n, false);
    } else {
        proj_backward(be, layer, li, Proj::Gate, xa, seed, &d_gate, &acts.h2, &mut dh2, n, false);
        proj_backward(be, layer, li, Proj::Up, xa, seed, &d_up, &acts.h2, &mut dh2, n, true);
    }
    be.rmsnorm_backward(&dh2, &acts.x_mid, &layer.pre_mlp_norm, &acts.inv2, dx, norm_shape(cfg, n, h));
    drop(dh2);

    // Mixer: x_mid = x_in + post_norm(out_proj(mixer(h1)))
    let d_o = match (&layer.post_attn_norm, &acts.o_raw) {
        (Some(w), Some(saved)) => Some(norm_backward(be, cfg, w, saved, dx, n, h)),
        _ => None,
    };
    let d_o = d_o.as_ref().unwrap_or(dx);
    let mut dh1 = be.zeros(n * h);
    match &acts.mixer {
        MixerActs::Attention(a) => attention_backward(be, cfg, layer, li, a, xa, d_o, &acts.h1, &mut dh1, ctx),
        MixerActs::DeltaNet(d) => delta_layer::backward(be, cfg, layer, li, d, xa, d_o, &acts.h1, &mut dh1, ctx),
    }
    be.rmsnorm_backward(&dh1, &acts.x_in, &layer.input_norm, &acts.inv1, dx, norm_shape(cfg, n, h));
}

/// ∂L/∂h1 of attention (written to dh1), given ∂L/∂(o_proj's output).
#[allow(clippy::too_many_arguments)]
fn attention_backward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &mut Layer<B>,
    li: usize,
    acts: &AttnActs<B>,
    xa: &[Option<B::Buf>],
    d_o: &B::Buf,
    h1: &B::Buf,
    dh1: &mut B::Buf,
    ctx: &StepCtx<B>,
) {
    let n = ctx.n;
    let (d, kv_heads) = head_dims(cfg, layer);
    let (qd, kvd) = (cfg.n_heads * d, kv_heads * d);
    let seed = ctx.dropout_seed;
    let o_in = acts.gated.as_ref().map_or(&acts.attn, |(_, g)| g);
    let mut d_o_in = be.zeros(n * qd);
    proj_backward(be, layer, li, Proj::O, xa, seed, d_o, o_in, &mut d_o_in, n, false);
    // Gated attention: o_in = σ(gate) ⊙ attn.
    let (d_attn, d_gate) = match &acts.gated {
        Some((gate, _)) => {
            let (mut d_gate, mut d_attn) = (be.zeros(n * qd), be.zeros(n * qd));
            be.glu_backward(&d_o_in, gate, &acts.attn, &mut d_gate, &mut d_attn, GluShape { len: n * qd, act: GluAct::Sigmoid });
            (d_attn, Some(d_gate))
        }
        None => (d_o_in, None),
    };
    let mut dq = be.zeros(n * qd);
    let mut dk = be.zeros(n * kvd);
    let mut dv = be.zeros(n * kvd);
    let shape = layer_attn_shape(cfg, layer, n, ctx.max_seqlen);
    be.attention_backward(
        &d_attn,
        Qkv { q: &acts.q, k: &acts.k, v: &acts.v },
        AttnSaved { out: &acts.attn, lse: &acts.lse },
        Varlen { cu_seqlens: ctx.cu_seqlens, n_seqs: ctx.n_seqs },
        shape,
        QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
    );
    drop(d_attn);
    let inv_freq = ctx.ropes[layer.rope].for_max_position(ctx.max_position);
    be.rope_backward(&mut dq, ctx.positions, inv_freq, rope_shape(cfg, layer, n, cfg.n_heads));
    if let (Some(qn), Some(qs)) = (&layer.q_norm, &acts.q_raw) {
        dq = norm_backward(be, cfg, qn, qs, &dq, n * cfg.n_heads, d);
    }
    // Gemma 4: a K/V-sharing layer hands its K/V gradients to the producer,
    // which adds its readers' to its own.
    let g4 = layer.g4.as_ref().map(|g| (g.kv_source, g.kv_producer, g.k_eq_v));
    if let (Some((Some(src), _, _)), Some(pass)) = (g4, ctx.g4) {
        pass.add_kv_grads(be, src, dk, dv);
        proj_backward(be, layer, li, Proj::Q, xa, seed, &dq, h1, dh1, n, false);
        return;
    }
    if let (Some((None, true, _)), Some(pass)) = (g4, ctx.g4)
        && let Some((gk, gv)) = pass.take_kv_grads(li)
    {
        be.add_assign(&mut dk, &gk);
        be.add_assign(&mut dv, &gv);
    }
    be.rope_backward(&mut dk, ctx.positions, inv_freq, rope_shape(cfg, layer, n, kv_heads));
    if let (Some(kn), Some(ks)) = (&layer.k_norm, &acts.k_raw) {
        dk = norm_backward(be, cfg, kn, ks, &dk, n * kv_heads, d);
    }
    if let (Some(vn), Some(vs)) = (layer.g4.as_ref().and_then(|g| g.v_norm.as_ref()), &acts.v_raw) {
        dv = norm_backward(be, cfg, vn, vs, &dv, n * kv_heads, d);
    }
    if let Some((_, _, true)) = g4 {
        // V was k_proj's raw output too.
        be.add_assign(&mut dk, &dv);
        proj_backward(be, layer, li, Proj::Q, xa, seed, &dq, h1, dh1, n, false);
        proj_backward(be, layer, li, Proj::K, xa, seed, &dk, h1, dh1, n, true);
        return;
    }
    if let Some(d_gate) = d_gate {
        dq = join_cols(be, &[&dq, &d_gate], n * cfg.n_heads, &[d, d]);
    }
    let q_width = be.len(&dq) / n;
    if layer.proj[Proj::Qkv as usize].is_some() {
        let d_qkv = join_cols(be, &[&dq, &dk, &dv], n, &[q_width, kvd, kvd]);
        drop((dq, dk, dv));
        proj_backward(be, layer, li, Proj::Qkv, xa, seed, &d_qkv, h1, dh1, n, false);
    } else {
        proj_backward(be, layer, li, Proj::Q, xa, seed, &dq, h1, dh1, n, false);
        proj_backward(be, layer, li, Proj::K, xa, seed, &dk, h1, dh1, n, true);
        proj_backward(be, layer, li, Proj::V, xa, seed, &dv, h1, dh1, n, true);
    }
}
