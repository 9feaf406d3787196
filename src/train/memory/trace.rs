//! The tracing backend the planner runs the model's own training pass on:
//! it holds no data, only sizes. Every buffer it hands out carries its byte
//! size and gives it back when dropped, so the trace sees exactly what the
//! graph allocates and when it lets go; ops compute nothing. The graph
//! announces its phases (`Backend::enter`), and the trace keeps, per phase,
//! the most bytes alive at once and the largest product temporary of the
//! phase (what a bf16 GPU backend allocates inside one op, see the module
//! docs of `train::memory`). Generation and the no-grad forwards announce
//! no phases: for them the trace keeps one peak and one largest temporary
//! from the moment the planner calls `unphased`.
//!
//! Sizes: activation-type buffers (`zeros`, `upload_activation`) take
//! `act_bytes` per element, f32 buffers (`zeros_f32`, `upload`) and i32
//! metadata 4, `zeros_like` the size of what it copies. Weights are built by
//! the planner (`Model::build_with`), which counts their bytes itself.

use crate::backend::{
    AdamW, AttnSaved, AttnShape, Backend, CeShape, ColsShape, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape, NormShape,
    Phase, Qkv, QkvGrads, RopeShape, Varlen, WeightSource, lora_da_splits,
};
use crate::quant::nf4::Nf4Tensor;
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What the trace has seen so far.
#[derive(Default)]
pub(super) struct Log {
    /// Bytes of the buffers alive now.
    pub live: u64,
    phase: Option<Phase>,
    /// Per phase: (most bytes alive at once, largest product temporary).
    pub phases: BTreeMap<Phase, (u64, u64)>,
    /// The most bytes alive at once, and the largest product temporary,
    /// since the last `Tracer::unphased` (for passes that announce no
    /// phases: generation and the no-grad forwards).
    pub peak: u64,
    pub temp: u64,
    /// Elements of the weights made from host values (`weight_from_f32`).
    pub made_weight_elems: u64,
}

pub(super) struct Tracer {
    act_bytes: u64,
    /// Whether products cast their f32 operands into bf16 temporaries.
    casts: bool,
    log: Arc<Mutex<Log>>,
}

/// A buffer of the trace: its size, and the log it gives its bytes back to.
pub(super) struct Sized {
    elems: usize,
    bytes: u64,
    f32: bool,
    log: Arc<Mutex<Log>>,
}

impl Drop for Sized {
    fn drop(&mut self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).live -= self.bytes;
    }
}

/// A weight of the trace: its element count.
pub(super) struct Shape(pub usize);

impl Tracer {
    pub fn new(act_bytes: usize, casts: bool) -> Tracer {
        Tracer { act_bytes: act_bytes as u64, casts, log: Arc::default() }
    }

    pub fn with_log<T>(&self, f: impl FnOnce(&mut Log) -> T) -> T {
        f(&mut self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn alloc(&self, elems: usize, bytes: u64, f32: bool) -> Sized {
        self.with_log(|log| {
            log.live += bytes;
            log.peak = log.peak.max(log.live);
            if let Some(p) = log.phase {
                let e = log.phases.entry(p).or_default();
                e.0 = e.0.max(log.live);
            }
        });
        Sized { elems, bytes, f32, log: self.log.clone() }
    }

    /// A temporary of `bytes` that lives inside one op.
    fn temporary(&self, bytes: u64) {
        if !self.casts {
            return;
        }
        self.with_log(|log| {
            log.temp = log.temp.max(bytes);
            if let Some(p) = log.phase {
                let e = log.phases.entry(p).or_default();
                e.1 = e.1.max(bytes);
            }
        });
    }

    /// Leave the training pass's phases and start a new peak at what is
    /// alive now. Returns the bytes alive now.
    pub fn unphased(&self) -> u64 {
        self.with_log(|log| {
            log.phase = None;
            log.peak = log.live;
            log.temp = 0;
            log.live
        })
    }

    /// The peak since `unphased` above `base` bytes, with the largest
    /// product temporary since then.
    pub fn peak_above(&self, base: u64) -> u64 {
        self.with_log(|log| log.peak - base + log.temp)
    }
}

impl Backend for Tracer {
    type Buf = Sized;
    type Weight = Shape;
    type IntBuf = Sized;

    fn name(&self) -> String {
        "memory trace".into()
    }
    fn zeros(&self, len: usize) -> Sized {
        self.alloc(len, len as u64 * self.act_bytes, false)
    }
    fn zeros_f32(&self, len: usize) -> Sized {
        self.alloc(len, 4 * len as u64, true)
    }
    fn zeros_like(&self, like: &Sized) -> Sized {
        self.alloc(like.elems, like.bytes, like.f32)
    }
    fn upload(&self, data: &[f32]) -> Sized {
        self.zeros_f32(data.len())
    }
    fn upload_activation(&self, data: &[f32]) -> Sized {
        self.zeros(data.len())
    }
    fn download(&self, buf: &Sized) -> Vec<f32> {
        vec![0.0; buf.elems]
    }
    fn upload_ints(&self, data: &[i32]) -> Sized {
        self.alloc(data.len(), 4 * data.len() as u64, false)
    }
    fn len(&self, buf: &Sized) -> usize {
        buf.elems
    }
    fn load_weight(&self, src: &WeightSource) -> Result<Shape> {
        Ok(Shape(src.numel))
    }
    fn weight_from_f32(&self, data: &[f32]) -> Shape {
        self.with_log(|l| l.made_weight_elems += data.len() as u64);
        Shape(data.len())
    }
    fn weight_from_nf4(&self, t: &Nf4Tensor) -> Result<Shape> {
        Ok(Shape(t.numel()))
    }
    fn weight_to_f32(&self, w: &Shape) -> Vec<f32> {
        vec![0.0; w.0]
    }
    fn weight_len(&self, w: &Shape) -> usize {
        w.0
    }
    fn fill(&self, _: &mut Sized, _: f32) {}
    fn copy_slice(&self, _: &Sized, _: usize, _: &mut Sized, _: usize, _: usize) {}
    fn add_assign(&self, _: &mut Sized, _: &Sized) {}
    fn scale(&self, _: &mut Sized, _: f32) {}
    fn softcap(&self, _: &mut Sized, _: f32) {}
    fn copy_cols(&self, _: &Sized, _: &mut Sized, _: ColsShape) {}
    fn sum_sq(&self, _: &Sized) -> f64 {
        0.0
    }
    fn embedding(&self, _: &Shape, _: &Sized, _: &mut Sized, _: usize, _: usize) {}
    fn linear(&self, _: &Sized, _: &Shape, _: Option<&Shape>, _: &mut Sized, _: MatShape) {}
    /// The LM head's backward multiplies the f32 logits gradient: a bf16 copy.
    fn linear_backward_input(&self, dy: &Sized, _: &Shape, _: &mut Sized, shape: MatShape, _: bool) {
        if dy.f32 {
            self.temporary(2 * (shape.m * shape.n) as u64);
        }
    }
    /// bf16 copies of A and B; with dropout the mask is fused into x·Aᵀ
    /// (A read as f32), leaving the copy of B.
    fn lora_forward(&self, _: LoraInputs<'_, Sized>, _: &mut Sized, _: &mut Sized, shape: LoraShape) {
        let LoraShape { k, n, r, dropout, .. } = shape;
        let elems = if dropout.is_some() { n * r } else { r * k + n * r };
        self.temporary(2 * elems as u64);
    }
    /// Copies of A and B and the bf16 dxa; with dropout the copy of B, dxa
    /// and the fused dA product's f32 row-split partials.
    fn lora_backward(&self, _: &Sized, _: LoraInputs<'_, Sized>, _: &Sized, _: LoraGrads<'_, Sized>, shape: LoraShape) {
        let LoraShape { m, k, n, r, dropout, .. } = shape;
        let bytes = if dropout.is_some() {
            2 * (n * r + m * r) + 4 * lora_da_splits(m) * r * k
        } else {
            2 * (r * k + n * r + m * r)
        };
        self.temporary(bytes as u64);
    }
    // No scratch on the GPU for the norms (either kernel layout), rope,
    // glu and copy_cols: they write only their outputs.
    fn rmsnorm(&self, _: &Sized, _: &Shape, _: &mut Sized, _: &mut Sized, _: NormShape, _: f32) {}
    fn rmsnorm_backward(&self, _: &Sized, _: &Sized, _: &Shape, _: &Sized, _: &mut Sized, _: NormShape) {}
    fn rope(&self, _: &mut Sized, _: &Sized, _: &Sized, _: RopeShape) {}
    fn rope_backward(&self, _: &mut Sized, _: &Sized, _: &Sized, _: RopeShape) {}
    fn attention(&self, _: Qkv<'_, Sized>, _: Varlen<'_, Sized>, _: AttnShape, _: &mut Sized, _: &mut Sized) {}
    fn attention_backward(
        &self,
        _: &Sized,
        _: Qkv<'_, Sized>,
        _: AttnSaved<'_, Sized>,
        _: Varlen<'_, Sized>,
        _: AttnShape,
        _: QkvGrads<'_, Sized>,
    ) {
    }
    fn decode_attention(&self, _: &Sized, _: &Sized, _: &Sized, _: usize, _: AttnShape, _: &mut Sized) {}
    fn decode_attention_batch(&self, _: &Sized, _: &Sized, _: &Sized, _: &Sized, _: usize, _: AttnShape, _: &mut Sized) {}
    fn scatter_rows(&self, _: &Sized, _: &mut Sized, _: &Sized, _: usize, _: usize, _: usize) {}
    // The gated delta-net's f32 scratch on the GPU (src/backend/cuda/delta_net.rs):
    // pre and xn [n, C]; the forward's running states; the backward's dact
    // [n, C], dqk [n, Hv, 2, dk] and, per block (at most 64), a chunk of
    // start states and dS; decode runs in the caller's states.
    fn delta_net(&self, _: DeltaIn<'_, Sized>, _: DeltaWeights<'_, Shape>, seqs: Varlen<'_, Sized>, s: DeltaShape, _: &mut Sized, _: &mut Sized) {
        self.temporary(4 * (2 * (s.n * s.conv_dim()) + seqs.n_seqs * s.state_size()) as u64);
    }
    fn delta_net_backward(&self, _: &Sized, _: DeltaIn<'_, Sized>, _: DeltaWeights<'_, Shape>, seqs: Varlen<'_, Sized>, s: DeltaShape, _: &Sized, _: DeltaGrads<'_, Sized>) {
        let blocks = (seqs.n_seqs * s.v_heads).clamp(1, 64);
        let per_block = (crate::backend::DELTA_CHUNK + 1) * s.k_dim * s.v_dim;
        self.temporary(4 * (3 * s.n * s.conv_dim() + s.n * s.v_heads * 2 * s.k_dim + blocks * per_block) as u64);
    }
    fn delta_net_decode(&self, _: DeltaIn<'_, Sized>, _: DeltaWeights<'_, Shape>, _: Varlen<'_, Sized>, s: DeltaShape, _: DeltaState<'_, Sized>, _: &mut Sized) {
        self.temporary(4 * 2 * (s.n * s.conv_dim()) as u64);
    }
    fn glu(&self, _: &Sized, _: &Sized, _: &mut Sized, _: GluShape) {}
    fn glu_backward(&self, _: &Sized, _: &Sized, _: &Sized, _: &mut Sized, _: &mut Sized, _: GluShape) {}
    fn cross_entropy(&self, _: &mut Sized, _: &Sized, _: &mut Sized, _: CeShape, _: Option<f32>) {}
    fn adamw(&self, _: &mut Sized, _: &Sized, _: &mut Sized, _: &mut Sized, _: AdamW) {}

    fn enter(&self, phase: Phase) {
        self.with_log(|log| log.phase = Some(phase));
    }
}
