//! One decoder layer: forward keeping exactly what its backward needs, and
//! the hand-written backward, reading as the forward in reverse.
//!
//!   h1 = rmsnorm(x_in);  q,k,v = proj(h1);  rope(q, k)
//!   attn = attention(q, k, v);  x_mid = x_in + o_proj(attn)
//!   h2 = rmsnorm(x_mid);  act = silu(gate(h2)) ⊙ up(h2);  x_out = x_mid + down(act)

use super::{Layer, Linear, Proj};
use crate::backend::{AttnShape, Backend, Dropout};
use crate::model::config::ModelConfig;

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

/// y = x·Wᵀ (+b) (+ LoRA); returns y and LoRA's saved x·Aᵀ.
fn proj_forward<B: Backend>(be: &B, lin: &Linear<B>, x: &B::Buf, m: usize, drop: Option<Dropout>) -> (B::Buf, Option<B::Buf>) {
    let mut y = be.zeros(m * lin.out_f);
    be.linear(x, &lin.weight, lin.bias.as_ref(), &mut y, m, lin.in_f, lin.out_f);
    let xa = lin.lora.as_ref().map(|l| {
        let mut xa = be.zeros(m * l.r);
        be.lora_forward(x, &l.a, &l.b, l.scale, drop, &mut xa, &mut y, m, lin.in_f, lin.out_f, l.r);
        xa
    });
    (y, xa)
}

/// dx (+)= dy·W (+ LoRA path); LoRA gradients accumulate into the adapter.
#[allow(clippy::too_many_arguments)]
fn proj_backward<B: Backend>(
    be: &B,
    lin: &mut Linear<B>,
    dy: &B::Buf,
    x: &B::Buf,
    xa: Option<&B::Buf>,
    dx: &mut B::Buf,
    m: usize,
    accumulate: bool,
    drop: Option<Dropout>,
) {
    let Linear { weight, lora, in_f, out_f, .. } = lin;
    be.linear_backward_input(dy, weight, dx, m, *in_f, *out_f, accumulate);
    if let Some(l) = lora.as_mut() {
        let xa = xa.expect("LoRA activations saved in forward");
        be.lora_backward(dy, x, &l.a, &l.b, xa, l.scale, drop, dx, &mut l.grad_a, &mut l.grad_b, m, *in_f, *out_f, l.r);
    }
}

fn attn_shape(cfg: &ModelConfig, n: usize, max_seqlen: usize, window: Option<usize>) -> AttnShape {
    AttnShape {
        max_seqlen,
        n,
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        window,
        scale: 1.0 / (cfg.head_dim as f32).sqrt(),
    }
}

/// Forward of layer `li`; consumes x_in (it is saved in the activations).
pub fn forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &Layer<B>,
    li: usize,
    x_in: B::Buf,
    ctx: &StepCtx<B>,
) -> (B::Buf, LayerActs<B>) {
    let n = ctx.n;
    let h = cfg.hidden;
    let drop = |p: Proj| dropout_for(layer.p(p), ctx.dropout_seed, li, p);
    let mut xa: Vec<Option<B::Buf>> = (0..Proj::ALL.len()).map(|_| None).collect();

    let mut h1 = be.zeros(n * h);
    let mut inv1 = be.zeros_f32(n);
    be.rmsnorm(&x_in, &layer.input_norm, &mut h1, &mut inv1, n, h, cfg.rms_norm_eps);

    let (mut q, xa_q) = proj_forward(be, layer.p(Proj::Q), &h1, n, drop(Proj::Q));
    let (mut k, xa_k) = proj_forward(be, layer.p(Proj::K), &h1, n, drop(Proj::K));
    let (v, xa_v) = proj_forward(be, layer.p(Proj::V), &h1, n, drop(Proj::V));
    (xa[0], xa[1], xa[2]) = (xa_q, xa_k, xa_v);
    be.rope(&mut q, ctx.positions, ctx.inv_freq, n, cfg.n_heads, cfg.head_dim);
    be.rope(&mut k, ctx.positions, ctx.inv_freq, n, cfg.n_kv_heads, cfg.head_dim);

    let shape = attn_shape(cfg, n, ctx.max_seqlen, layer.window);
    let mut attn = be.zeros(n * cfg.n_heads * cfg.head_dim);
    let mut lse = be.zeros_f32(cfg.n_heads * n);
    be.attention(&q, &k, &v, ctx.cu_seqlens, ctx.n_seqs, shape, &mut attn, &mut lse);

    let (o, xa_o) = proj_forward(be, layer.p(Proj::O), &attn, n, drop(Proj::O));
    xa[Proj::O as usize] = xa_o;
    let mut x_mid = clone_buf(be, &x_in);
    be.add_assign(&mut x_mid, &o);
    drop_buf(o);

    let mut h2 = be.zeros(n * h);
    let mut inv2 = be.zeros_f32(n);
    be.rmsnorm(&x_mid, &layer.post_attention_norm, &mut h2, &mut inv2, n, h, cfg.rms_norm_eps);
    let (gate, xa_g) = proj_forward(be, layer.p(Proj::Gate), &h2, n, drop(Proj::Gate));
    let (up, xa_u) = proj_forward(be, layer.p(Proj::Up), &h2, n, drop(Proj::Up));
    xa[Proj::Gate as usize] = xa_g;
    xa[Proj::Up as usize] = xa_u;
    let mut act = be.zeros(n * cfg.intermediate);
    be.swiglu(&gate, &up, &mut act, n * cfg.intermediate);
    let (down, xa_d) = proj_forward(be, layer.p(Proj::Down), &act, n, drop(Proj::Down));
    xa[Proj::Down as usize] = xa_d;
    let mut x_out = clone_buf(be, &x_mid);
    be.add_assign(&mut x_out, &down);

    let acts = LayerActs { x_in, h1, inv1, q, k, v, attn, lse, x_mid, h2, inv2, gate, up, act, xa };
    (x_out, acts)
}

fn drop_buf<T>(_: T) {}

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
    let xa = |p: Proj| acts.xa[p as usize].as_ref();

    // MLP: x_out = x_mid + down(silu(gate(h2)) ⊙ up(h2))
    let mut d_act = be.zeros(n * inter);
    let drop = dropout_for(layer.p(Proj::Down), seed, li, Proj::Down);
    proj_backward(be, &mut layer.proj[Proj::Down as usize], dx, &acts.act, xa(Proj::Down), &mut d_act, n, false, drop);
    let mut d_gate = be.zeros(n * inter);
    let mut d_up = be.zeros(n * inter);
    be.swiglu_backward(&d_act, &acts.gate, &acts.up, &mut d_gate, &mut d_up, n * inter);
    drop_buf(d_act);
    let mut dh2 = be.zeros(n * h);
    let drop = dropout_for(layer.p(Proj::Gate), seed, li, Proj::Gate);
    proj_backward(be, &mut layer.proj[Proj::Gate as usize], &d_gate, &acts.h2, xa(Proj::Gate), &mut dh2, n, false, drop);
    let drop = dropout_for(layer.p(Proj::Up), seed, li, Proj::Up);
    proj_backward(be, &mut layer.proj[Proj::Up as usize], &d_up, &acts.h2, xa(Proj::Up), &mut dh2, n, true, drop);
    be.rmsnorm_backward(&dh2, &acts.x_mid, &layer.post_attention_norm, &acts.inv2, dx, n, h);

    // Attention: x_mid = x_in + o_proj(attention(rope(q), rope(k), v))
    let mut d_attn = be.zeros(n * qd);
    let drop = dropout_for(layer.p(Proj::O), seed, li, Proj::O);
    proj_backward(be, &mut layer.proj[Proj::O as usize], dx, &acts.attn, xa(Proj::O), &mut d_attn, n, false, drop);
    let mut dq = be.zeros(n * qd);
    let mut dk = be.zeros(n * kvd);
    let mut dv = be.zeros(n * kvd);
    let shape = attn_shape(cfg, n, ctx.max_seqlen, layer.window);
    be.attention_backward(
        &d_attn, &acts.q, &acts.k, &acts.v, &acts.attn, &acts.lse, ctx.cu_seqlens, ctx.n_seqs, shape, &mut dq, &mut dk,
        &mut dv,
    );
    drop_buf(d_attn);
    be.rope_backward(&mut dq, ctx.positions, ctx.inv_freq, n, cfg.n_heads, cfg.head_dim);
    be.rope_backward(&mut dk, ctx.positions, ctx.inv_freq, n, cfg.n_kv_heads, cfg.head_dim);
    let mut dh1 = be.zeros(n * h);
    let drop = dropout_for(layer.p(Proj::Q), seed, li, Proj::Q);
    proj_backward(be, &mut layer.proj[Proj::Q as usize], &dq, &acts.h1, xa(Proj::Q), &mut dh1, n, false, drop);
    let drop = dropout_for(layer.p(Proj::K), seed, li, Proj::K);
    proj_backward(be, &mut layer.proj[Proj::K as usize], &dk, &acts.h1, xa(Proj::K), &mut dh1, n, true, drop);
    let drop = dropout_for(layer.p(Proj::V), seed, li, Proj::V);
    proj_backward(be, &mut layer.proj[Proj::V as usize], &dv, &acts.h1, xa(Proj::V), &mut dh1, n, true, drop);
    be.rmsnorm_backward(&dh1, &acts.x_in, &layer.input_norm, &acts.inv1, dx, n, h);
}
