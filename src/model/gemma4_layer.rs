//! Gemma 4's compute beyond the common layer: the per-layer embeddings
//! (PLE) of the whole model, each layer's PLE block and layer scalar, and
//! the pass state through which K/V-sharing layers read their producer's
//! final K/V (and hand back its gradients).
//!
//!   ple  = (norm(reshape(per_layer_model_projection(x_emb) · H^-½, [L, P]))
//!           + table[ids] · √P) · 2^-½                 (per layer i: ple_i)
//!   x   += post_norm(per_layer_projection(gelu_tanh(per_layer_input_gate x) ⊙ ple_i))
//!   x   *= layer_scalar

use super::hparams::ModelConfig;
use super::layer::{Normed, StepCtx, clone_buf, norm_backward, norm_forward, proj_backward, proj_forward};
use super::{Layer, Proj, Tensor, gemma4::Gemma4Config};
use crate::backend::{Backend, ColsShape, GluAct, GluShape};
use anyhow::Result;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

/// Gemma 4's parts of one layer.
pub struct Gemma4Layer<B: Backend> {
    pub head_dim: usize,
    pub kv_heads: usize,
    /// The weightless v norm (a ones vector), on layers computing K/V.
    pub v_norm: Option<B::Weight>,
    /// The norm after the PLE projection (models with PLE).
    pub post_ple_norm: Option<B::Weight>,
    /// The stored layers.N.layer_scalar (frozen).
    pub scalar: f32,
    pub kv_source: Option<usize>,
    pub k_eq_v: bool,
    /// A later layer reads this layer's K/V.
    pub kv_producer: bool,
}

impl<B: Backend> Gemma4Layer<B> {
    /// The layer's own tensors after its post-MLP norm, in `tensor_list`'s
    /// order: the post-PLE norm (models with PLE), then layer_scalar.
    pub(super) fn build(be: &B, g: &Gemma4Config, li: usize, next: &mut impl FnMut(Tensor) -> Result<B::Weight>) -> Result<Self> {
        let post_ple_norm = if g.ple > 0 { Some(next(Tensor::Other)?) } else { None };
        let scalar = be.weight_to_f32(&next(Tensor::HostScalar)?)[0];
        let shares = g.kv_source[li].is_some();
        Ok(Gemma4Layer {
            head_dim: g.head_dim[li],
            kv_heads: g.kv_heads[li],
            v_norm: (!shares).then(|| be.weight_from_f32(&vec![1.0; g.head_dim[li]])),
            post_ple_norm,
            scalar,
            kv_source: g.kv_source[li],
            k_eq_v: g.k_eq_v[li],
            kv_producer: g.is_kv_producer(li),
        })
    }
}

/// The whole model's PLE tensors (the projection is layer 0's PleModel).
pub struct PleParams<B: Backend> {
    pub table: B::Weight,
    pub norm: B::Weight,
    /// √P rounded to the activation type.
    pub scale: f32,
}

/// The projections of Gemma 4 layer `li`, in checkpoint order: q, k (not on
/// K/V-sharing layers), v (nor on K=V layers), o, the MLP, the PLE gate and
/// projection, and on layer 0 the model's per_layer_model_projection.
pub fn projections(g: &Gemma4Config, li: usize) -> &'static [Proj] {
    static SETS: OnceLock<Vec<Vec<Proj>>> = OnceLock::new();
    let sets = SETS.get_or_init(|| {
        (0..16u8)
            .map(|mask| {
                let (k, v, ple, model) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0, mask & 8 != 0);
                let mut out = vec![Proj::Q];
                out.extend(k.then_some(Proj::K));
                out.extend(v.then_some(Proj::V));
                out.extend([Proj::O, Proj::Gate, Proj::Up, Proj::Down]);
                if ple {
                    out.extend([Proj::PleGate, Proj::PleProj]);
                }
                out.extend(model.then_some(Proj::PleModel));
                out
            })
            .collect()
    });
    let own_kv = g.kv_source[li].is_none();
    let mask = u8::from(own_kv) | u8::from(own_kv && !g.k_eq_v[li]) << 1 | u8::from(g.ple > 0) << 2 | u8::from(g.ple > 0 && li == 0) << 3;
    &sets[mask as usize]
}

/// One pass's Gemma 4 state: the PLE inputs of every layer, and the K/V
/// of producer layers with the gradients their readers hand back.
pub struct Pass<B: Backend> {
    /// [n, L·P]; layer i's input is columns i·P..(i+1)·P.
    ple: Option<PleSaved<B>>,
    kv: RefCell<KvByLayer<B>>,
    kv_grads: RefCell<KvByLayer<B>>,
}

/// K and V (or their gradients) by producer layer.
type KvByLayer<B> = HashMap<usize, (<B as Backend>::Buf, <B as Backend>::Buf)>;

struct PleSaved<B: Backend> {
    ple: B::Buf,
    /// ∂L/∂ple, filled slice by slice by the layers' backward.
    dple: RefCell<B::Buf>,
    /// The scaled embeddings (per_layer_model_projection's input).
    x_emb: B::Buf,
    normed: Normed<B>,
    xa: Vec<Option<B::Buf>>,
    width: usize,
}

const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;

fn proj_scale(cfg: &ModelConfig) -> f32 {
    (cfg.hidden as f64).powf(-0.5) as f32
}

impl<B: Backend> Pass<B> {
    /// The PLE inputs from the token ids and the scaled embeddings x [n, H].
    pub fn new(be: &B, cfg: &ModelConfig, ple: Option<&PleParams<B>>, layer0: &Layer<B>, ids: &B::IntBuf, x: &B::Buf, ctx: &StepCtx<B>) -> Self {
        let n = ctx.n;
        let ple = ple.map(|p| {
            let width = be.weight_len(&p.norm) * cfg.n_layers;
            let per = width / cfg.n_layers;
            let mut table = be.zeros(n * width);
            be.embedding(&p.table, ids, &mut table, n, width);
            be.scale(&mut table, p.scale);
            let mut xa: Vec<Option<B::Buf>> = (0..Proj::ALL.len()).map(|_| None).collect();
            let mut context = proj_forward(be, layer0, 0, Proj::PleModel, x, n, ctx, &mut xa);
            be.scale(&mut context, proj_scale(cfg));
            let (mut out, normed) = norm_forward(be, cfg, &p.norm, context, n * cfg.n_layers, per);
            be.add_assign(&mut out, &table);
            be.scale(&mut out, SQRT_HALF);
            PleSaved { dple: RefCell::new(be.zeros(n * width)), ple: out, x_emb: clone_buf(be, x), normed, xa, width }
        });
        Pass { ple, kv: RefCell::new(HashMap::new()), kv_grads: RefCell::new(HashMap::new()) }
    }

    /// Layer `li`'s PLE input [n, P].
    fn ple_of(&self, be: &B, li: usize, n: usize, per: usize) -> B::Buf {
        let saved = self.ple.as_ref().expect("PLE inputs of a model with PLE");
        let mut out = be.zeros(n * per);
        be.copy_cols(&saved.ple, &mut out, ColsShape { rows: n, src_cols: saved.width, src_off: li * per, dst_cols: per, dst_off: 0, width: per });
        out
    }

    /// Keep producer `li`'s final K and V for its readers.
    pub(super) fn store_kv(&self, be: &B, li: usize, k: &B::Buf, v: &B::Buf) {
        self.kv.borrow_mut().insert(li, (clone_buf(be, k), clone_buf(be, v)));
    }

    /// Copies of producer `src`'s final K and V.
    pub(super) fn read_kv(&self, be: &B, src: usize) -> (B::Buf, B::Buf) {
        let kv = self.kv.borrow();
        let (k, v) = kv.get(&src).expect("a K/V producer runs before its readers");
        (clone_buf(be, k), clone_buf(be, v))
    }

    /// A reader's ∂L/∂K and ∂L/∂V, summed into producer `src`'s.
    pub(super) fn add_kv_grads(&self, be: &B, src: usize, dk: B::Buf, dv: B::Buf) {
        let mut grads = self.kv_grads.borrow_mut();
        match grads.get_mut(&src) {
            Some((gk, gv)) => {
                be.add_assign(gk, &dk);
                be.add_assign(gv, &dv);
            }
            None => {
                grads.insert(src, (dk, dv));
            }
        }
    }

    /// The readers' summed gradients of producer `li`'s K and V, if any.
    pub(super) fn take_kv_grads(&self, li: usize) -> Option<(B::Buf, B::Buf)> {
        self.kv_grads.borrow_mut().remove(&li)
    }

    /// Backward of the PLE context into per_layer_model_projection's LoRA
    /// (the tables and the embeddings are frozen), once every layer's
    /// backward has written its slice of ∂L/∂ple.
    pub fn backward(&self, be: &B, cfg: &ModelConfig, ple: Option<&PleParams<B>>, layer0: &mut Layer<B>, ctx: &StepCtx<B>) {
        let (Some(saved), Some(p)) = (&self.ple, ple) else { return };
        if layer0.p(Proj::PleModel).lora.is_none() || !ctx.adapters {
            return;
        }
        let n = ctx.n;
        let per = saved.width / cfg.n_layers;
        let mut d = clone_buf(be, &saved.dple.borrow());
        be.scale(&mut d, SQRT_HALF);
        let mut d_ctx = norm_backward(be, cfg, &p.norm, &saved.normed, &d, n * cfg.n_layers, per);
        be.scale(&mut d_ctx, proj_scale(cfg));
        let mut dx = be.zeros(n * cfg.hidden);
        proj_backward(be, layer0, 0, Proj::PleModel, &saved.xa, ctx.dropout_seed, &d_ctx, &saved.x_emb, &mut dx, n, false);
    }
}

/// What a layer's PLE block saved.
pub struct BlockActs<B: Backend> {
    /// The block's input (the MLP residual's output), the gate's output,
    /// the layer's PLE input and gelu_tanh(gate) ⊙ ple.
    x: B::Buf,
    gate: B::Buf,
    ple: B::Buf,
    act: B::Buf,
    proj_raw: Normed<B>,
}

fn g4<B: Backend>(layer: &Layer<B>) -> &Gemma4Layer<B> {
    layer.g4.as_ref().expect("a Gemma 4 layer")
}

/// The PLE block and the layer scalar after the MLP: returns the layer's
/// output.
pub(super) fn block_forward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &Layer<B>,
    li: usize,
    x: B::Buf,
    ctx: &StepCtx<B>,
    xa: &mut [Option<B::Buf>],
) -> (B::Buf, Option<BlockActs<B>>) {
    let g = g4(layer);
    let (n, h) = (ctx.n, cfg.hidden);
    let (mut out, acts) = match (&g.post_ple_norm, ctx.g4) {
        (Some(norm), Some(pass)) => {
            let per = layer.p(Proj::PleGate).out_f;
            let ple = pass.ple_of(be, li, n, per);
            let gate = proj_forward(be, layer, li, Proj::PleGate, &x, n, ctx, xa);
            let mut act = be.zeros(n * per);
            be.glu(&gate, &ple, &mut act, GluShape { len: n * per, act: GluAct::GeluTanh });
            let p = proj_forward(be, layer, li, Proj::PleProj, &act, n, ctx, xa);
            let (y, proj_raw) = norm_forward(be, cfg, norm, p, n, h);
            let mut out = clone_buf(be, &x);
            be.add_assign(&mut out, &y);
            (out, Some(BlockActs { x, gate, ple, act, proj_raw }))
        }
        _ => (x, None),
    };
    if g.scalar != 1.0 {
        be.scale(&mut out, g.scalar);
    }
    (out, acts)
}

/// Backward of `block_forward`: on entry `dx` holds ∂L/∂(layer output), on
/// exit ∂L/∂(block input); the layer's slice of ∂L/∂ple goes to the pass.
#[allow(clippy::too_many_arguments)]
pub(super) fn block_backward<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    layer: &mut Layer<B>,
    li: usize,
    acts: Option<&BlockActs<B>>,
    xa: &[Option<B::Buf>],
    dx: &mut B::Buf,
    ctx: &StepCtx<B>,
) {
    let (n, h) = (ctx.n, cfg.hidden);
    let scalar = g4(layer).scalar;
    if scalar != 1.0 {
        be.scale(dx, scalar);
    }
    let (Some(a), Some(pass)) = (acts, ctx.g4) else { return };
    let norm = g4(layer).post_ple_norm.as_ref().expect("PLE layers have the post-PLE norm");
    let dp = norm_backward(be, cfg, norm, &a.proj_raw, dx, n, h);
    let per = layer.p(Proj::PleGate).out_f;
    let mut d_act = be.zeros(n * per);
    proj_backward(be, layer, li, Proj::PleProj, xa, ctx.dropout_seed, &dp, &a.act, &mut d_act, n, false);
    let (mut d_gate, mut d_ple) = (be.zeros(n * per), be.zeros(n * per));
    be.glu_backward(&d_act, &a.gate, &a.ple, &mut d_gate, &mut d_ple, GluShape { len: n * per, act: GluAct::GeluTanh });
    proj_backward(be, layer, li, Proj::PleGate, xa, ctx.dropout_seed, &d_gate, &a.x, dx, n, true);
    let saved = pass.ple.as_ref().expect("PLE inputs of a model with PLE");
    let mut dple = saved.dple.borrow_mut();
    be.copy_cols(&d_ple, &mut dple, ColsShape { rows: n, src_cols: per, src_off: 0, dst_cols: saved.width, dst_off: li * per, width: per });
}

/// A K=V layer's V from its raw K: the same values (the v norm comes later).
pub(super) fn value_of<B: Backend>(be: &B, layer: &Layer<B>, k_raw: &B::Buf) -> Option<B::Buf> {
    layer.g4.as_ref().filter(|g| g.k_eq_v).map(|_| clone_buf(be, k_raw))
}
