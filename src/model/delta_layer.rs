//! A linear-attention layer's token mixer: Qwen3.5's gated delta-net, from
//! the normed layer input to out_proj's input (`layer` does the rest of the
//! layer, which is the same as an attention layer's).
//!
//!   qkv, z, b, a = in_proj_qkv(h1), in_proj_z(h1), in_proj_b(h1), in_proj_a(h1)
//!   core = delta_net(qkv, z, b, a)   (conv, L2 norms, gates, recurrence, gated norm: one op)
//!
//! In training the op keeps the recurrent state at the start of every
//! `DELTA_CHUNK` tokens, and its backward recomputes from them; in
//! generation it continues from each sequence's state (`Mixing::DeltaState`).

use super::DeltaParams;
use super::Layer;
use super::Proj;
use super::hparams::ModelConfig;
use super::layer::{StepCtx, proj_backward, proj_forward};
use crate::backend::{Backend, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, Varlen};

/// What the delta-net saved for its backward.
pub(super) struct DeltaActs<B: Backend> {
    qkv: B::Buf,
    z: B::Buf,
    b: B::Buf,
    a: B::Buf,
    /// The chunk-start states (training; None in generation).
    saved: Option<B::Buf>,
    /// The op's output, out_proj's input [n, v_heads·v_dim].
    pub core: B::Buf,
}

/// The op's shape for `n` tokens of this model.
pub fn delta_shape(cfg: &ModelConfig, n: usize) -> DeltaShape {
    let d = cfg.delta.expect("a linear-attention layer has the delta-net's dimensions");
    DeltaShape {
        n,
        k_heads: d.k_heads,
        v_heads: d.v_heads,
        k_dim: d.k_dim,
        v_dim: d.v_dim,
        conv_kernel: d.conv_kernel,
        norm_eps: cfg.rms_norm_eps,
    }
}

fn weights<B: Backend>(p: &DeltaParams<B>) -> DeltaWeights<'_, B::Weight> {
    DeltaWeights { conv: &p.conv, a_log: &p.a_log, dt_bias: &p.dt_bias, norm: &p.norm }
}

/// The mixer's forward from h1 [n, hidden]; with `state`, the generation
/// form (no saved states).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &Layer<B>,
    params: &DeltaParams<B>,
    li: usize,
    h1: &B::Buf,
    ctx: &StepCtx<B>,
    state: Option<DeltaState<'_, B::Buf>>,
    xa: &mut [Option<B::Buf>],
) -> DeltaActs<B> {
    let n = ctx.n;
    let qkv = proj_forward(be, layer, li, Proj::DeltaQkv, h1, n, ctx, xa);
    let z = proj_forward(be, layer, li, Proj::DeltaZ, h1, n, ctx, xa);
    let b = proj_forward(be, layer, li, Proj::DeltaB, h1, n, ctx, xa);
    let a = proj_forward(be, layer, li, Proj::DeltaA, h1, n, ctx, xa);
    let shape = delta_shape(cfg, n);
    let mut core = be.zeros(n * shape.value_width());
    let inputs = DeltaIn { qkv: &qkv, z: &z, b: &b, a: &a };
    let seqs = Varlen { cu_seqlens: ctx.cu_seqlens, n_seqs: ctx.n_seqs };
    let saved = match state {
        Some(state) => {
            be.delta_net_decode(inputs, weights(params), seqs, shape, state, &mut core);
            None
        }
        None => {
            let mut saved = be.zeros_f32(shape.saved_len(ctx.seq_lens.iter().copied()));
            be.delta_net(inputs, weights(params), seqs, shape, &mut core, &mut saved);
            Some(saved)
        }
    };
    DeltaActs { qkv, z, b, a, saved, core }
}

/// ∂L/∂h1 (written to dh1) given ∂L/∂(out_proj's output); LoRA gradients
/// of the five projections accumulate.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &mut Layer<B>,
    li: usize,
    acts: &DeltaActs<B>,
    xa: &[Option<B::Buf>],
    d_o: &B::Buf,
    h1: &B::Buf,
    dh1: &mut B::Buf,
    ctx: &StepCtx<B>,
) {
    let n = ctx.n;
    let seed = ctx.dropout_seed;
    let shape = delta_shape(cfg, n);
    let mut d_core = be.zeros(n * shape.value_width());
    proj_backward(be, layer, li, Proj::DeltaOut, xa, seed, d_o, &acts.core, &mut d_core, n, false);
    let saved = acts.saved.as_ref().expect("the training forward keeps the delta-net's states");
    let mut dqkv = be.zeros(n * shape.conv_dim());
    let mut dz = be.zeros(n * shape.value_width());
    let mut db = be.zeros(n * shape.v_heads);
    let mut da = be.zeros(n * shape.v_heads);
    {
        let params = layer.delta.as_ref().expect("a linear-attention layer has delta-net parameters");
        be.delta_net_backward(
            &d_core,
            DeltaIn { qkv: &acts.qkv, z: &acts.z, b: &acts.b, a: &acts.a },
            weights(params),
            Varlen { cu_seqlens: ctx.cu_seqlens, n_seqs: ctx.n_seqs },
            shape,
            saved,
            DeltaGrads { qkv: &mut dqkv, z: &mut dz, b: &mut db, a: &mut da },
        );
    }
    drop(d_core);
    proj_backward(be, layer, li, Proj::DeltaQkv, xa, seed, &dqkv, h1, dh1, n, false);
    proj_backward(be, layer, li, Proj::DeltaZ, xa, seed, &dz, h1, dh1, n, true);
    proj_backward(be, layer, li, Proj::DeltaB, xa, seed, &db, h1, dh1, n, true);
    proj_backward(be, layer, li, Proj::DeltaA, xa, seed, &da, h1, dh1, n, true);
}
