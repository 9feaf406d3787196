//! One decoder layer: forward keeping exactly what its backward needs, and
//! the hand-written backward, reading as the forward in reverse.
//!
//!   h1 = rmsnorm(x_in);  q,k,v = proj(h1);  rope(q, k)
//!   attn = attention(q, k, v);  x_mid = x_in + o_proj(attn)
//!   h2 = rmsnorm(x_mid);  act = silu(gate(h2)) ⊙ up(h2);  x_out = x_mid + down(act)

use super::{Layer, Linear, Proj};
use crate::backend::{
    AttnSaved, AttnShape, Backend, Dropout, GluAct, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape, NormShape, Qkv, QkvGrads, RopeShape,
    Varlen,
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
    pub inv_freq: &'a B::Buf,
    /// Some(seed) in training: LoRA dropout is active with masks derived
    /// from this seed, the layer and the projection.
    pub dropout_seed: Option<u64>,
    /// false runs the base model alone (the reference policy of preference
    /// objectives): no adapter is applied.
    pub adapters: bool,
}

/// Activations saved by a layer's forward for its backward.
pub struct LayerActs<B: Backend> {
    pub x_in: B::Buf,
    h1: B::Buf,
    inv1: B::Buf,
    /// Rotated q and k, and v, as attention saw them.
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    attn: B::Buf,
    lse: B::Buf,
    x_mid: B::Buf,
    h2: B::Buf,
    inv2: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
    /// LoRA's x·Aᵀ per projection (indexed by `Proj as usize`).
    xa: Vec<Option<B::Buf>>,
}

pub fn clone_buf<B: Backend>(be: &B, src: &B::Buf) -> B::Buf {
    let len = be.len(src);
    let mut dst = be.zeros_like(src);
    be.copy_slice(src, 0, &mut dst, 0, len);
    dst
}

fn dropout_for<B: Backend>(lin: &Linear<B>, seed: Option<u64>, layer: usize, p: Proj) -> Option<Dropout> {
    let lora = lin.lora.as_ref()?;
    let seed = seed?;
    if lora.dropout <= 0.0 {
        return None;
    }
    let module = (layer * Proj::ALL.len() + p as usize) as u64;
    Some(Dropout { p: lora.dropout, seed: crate::util::rng::Rng::new(seed ^ module.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64() })
}

/// y = x·Wᵀ (+b) (+ LoRA) for projection `p` of layer `li`; LoRA's x·Aᵀ is
/// kept in `xa[p]` for the backward.
#[allow(clippy::too_many_arguments)]
fn proj_forward<B: Backend>(
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
fn proj_backward<B: Backend>(
    be: &B,
    layer: &mut Layer<B>,
    li: usize,
    p: Proj,
    acts: &LayerActs<B>,
    seed: Option<u64>,
    dy: &B::Buf,
    x: &B::Buf,
    dx: &mut B::Buf,
    m: usize,
    accumulate: bool,
) {
    let dropout = dropout_for(layer.p(p), seed, li, p);
    let Linear { weight, lora, in_f, out_f, .. } = &mut layer.proj[p as usize];
    be.linear_backward_input(dy, weight, dx, MatShape { m, k: *in_f, n: *out_f }, accumulate);
    if let Some(l) = lora.as_mut() {
        let xa = acts.xa[p as usize].as_ref().expect("LoRA activations saved in forward");
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
        scale: 1.0 / (cfg.head_dim as f32).sqrt(),
        softcap: None,
    }
}

/// Forward of layer `li`; consumes x_in (it is saved in the activations).
pub fn forward<B: Backend>(be: &B, cfg: &ModelConfig, layer: &Layer<B>, li: usize, x_in: B::Buf, ctx: &StepCtx<B>) -> (B::Buf, LayerActs<B>) {
    let shape = attn_shape(cfg, ctx.n, ctx.max_seqlen, layer.window);
    forward_with(be, cfg, layer, li, x_in, ctx, |q, k, v, attn, lse| {
        be.attention(Qkv { q, k, v }, Varlen { cu_seqlens: ctx.cu_seqlens, n_seqs: ctx.n_seqs }, shape, attn, lse)
    })
}

/// Forward of layer `li` with the attention itself left to `attend(q, k, v,
/// attn, lse)`, given the rotated q and k: the batch's own causal attention
/// in training, or attention against a KV cache in generation (which then
/// stores k and v), so both run exactly the same layer.
pub fn forward_with<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &Layer<B>,
    li: usize,
    x_in: B::Buf,
    ctx: &StepCtx<B>,
    attend: impl FnOnce(&B::Buf, &B::Buf, &B::Buf, &mut B::Buf, &mut B::Buf),
) -> (B::Buf, LayerActs<B>) {
    let n = ctx.n;
    let h = cfg.hidden;
    let mut xa: Vec<Option<B::Buf>> = (0..Proj::ALL.len()).map(|_| None).collect();

    let mut h1 = be.zeros(n * h);
    let mut inv1 = be.zeros_f32(n);
    be.rmsnorm(&x_in, &layer.input_norm, &mut h1, &mut inv1, NormShape::new(n, h), cfg.rms_norm_eps);

    let mut q = proj_forward(be, layer, li, Proj::Q, &h1, n, ctx, &mut xa);
    let mut k = proj_forward(be, layer, li, Proj::K, &h1, n, ctx, &mut xa);
    let v = proj_forward(be, layer, li, Proj::V, &h1, n, ctx, &mut xa);
    be.rope(&mut q, ctx.positions, ctx.inv_freq, RopeShape::full(n, cfg.n_heads, cfg.head_dim));
    be.rope(&mut k, ctx.positions, ctx.inv_freq, RopeShape::full(n, cfg.n_kv_heads, cfg.head_dim));

    let mut attn = be.zeros(n * cfg.n_heads * cfg.head_dim);
    let mut lse = be.zeros_f32(cfg.n_heads * n);
    attend(&q, &k, &v, &mut attn, &mut lse);

    let o = proj_forward(be, layer, li, Proj::O, &attn, n, ctx, &mut xa);
    let mut x_mid = clone_buf(be, &x_in);
    be.add_assign(&mut x_mid, &o);
    drop(o);

    let mut h2 = be.zeros(n * h);
    let mut inv2 = be.zeros_f32(n);
    be.rmsnorm(&x_mid, &layer.post_attention_norm, &mut h2, &mut inv2, NormShape::new(n, h), cfg.rms_norm_eps);
    let gate = proj_forward(be, layer, li, Proj::Gate, &h2, n, ctx, &mut xa);
    let up = proj_forward(be, layer, li, Proj::Up, &h2, n, ctx, &mut xa);
    let mut act = be.zeros(n * cfg.intermediate);
    be.glu(&gate, &up, &mut act, GluShape { len: n * cfg.intermediate, act: GluAct::Silu });
    let down = proj_forward(be, layer, li, Proj::Down, &act, n, ctx, &mut xa);
    let mut x_out = clone_buf(be, &x_mid);
    be.add_assign(&mut x_out, &down);

    let acts = LayerActs { x_in, h1, inv1, q, k, v, attn, lse, x_mid, h2, inv2, gate, up, act, xa };
    (x_out, acts)
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
    let qd = cfg.n_heads * cfg.head_dim;
    let kvd = cfg.n_kv_heads * cfg.head_dim;
    let inter = cfg.intermediate;
    let seed = ctx.dropout_seed;

    // MLP: x_out = x_mid + down(silu(gate(h2)) ⊙ up(h2))
    let mut d_act = be.zeros(n * inter);
    proj_backward(be, layer, li, Proj::Down, acts, seed, dx, &acts.act, &mut d_act, n, false);
    let mut d_gate = be.zeros(n * inter);
    let mut d_up = be.zeros(n * inter);
    be.glu_backward(&d_act, &acts.gate, &acts.up, &mut d_gate, &mut d_up, GluShape { len: n * inter, act: GluAct::Silu });
    drop(d_act);
    let mut dh2 = be.zeros(n * h);
    proj_backward(be, layer, li, Proj::Gate, acts, seed, &d_gate, &acts.h2, &mut dh2, n, false);
    proj_backward(be, layer, li, Proj::Up, acts, seed, &d_up, &acts.h2, &mut dh2, n, true);
    be.rmsnorm_backward(&dh2, &acts.x_mid, &layer.post_attention_norm, &acts.inv2, dx, NormShape::new(n, h));

    // Attention: x_mid = x_in + o_proj(attention(rope(q), rope(k), v))
    let mut d_attn = be.zeros(n * qd);
    proj_backward(be, layer, li, Proj::O, acts, seed, dx, &acts.attn, &mut d_attn, n, false);
    let mut dq = be.zeros(n * qd);
    let mut dk = be.zeros(n * kvd);
    let mut dv = be.zeros(n * kvd);
    let shape = attn_shape(cfg, n, ctx.max_seqlen, layer.window);
    be.attention_backward(
        &d_attn,
        Qkv { q: &acts.q, k: &acts.k, v: &acts.v },
        AttnSaved { out: &acts.attn, lse: &acts.lse },
        Varlen { cu_seqlens: ctx.cu_seqlens, n_seqs: ctx.n_seqs },
        shape,
        QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
    );
    drop(d_attn);
    be.rope_backward(&mut dq, ctx.positions, ctx.inv_freq, RopeShape::full(n, cfg.n_heads, cfg.head_dim));
    be.rope_backward(&mut dk, ctx.positions, ctx.inv_freq, RopeShape::full(n, cfg.n_kv_heads, cfg.head_dim));
    let mut dh1 = be.zeros(n * h);
    proj_backward(be, layer, li, Proj::Q, acts, seed, &dq, &acts.h1, &mut dh1, n, false);
    proj_backward(be, layer, li, Proj::K, acts, seed, &dk, &acts.h1, &mut dh1, n, true);
    proj_backward(be, layer, li, Proj::V, acts, seed, &dv, &acts.h1, &mut dh1, n, true);
    be.rmsnorm_backward(&dh1, &acts.x_in, &layer.input_norm, &acts.inv1, dx, NormShape::new(n, h));
}
