//! CPU reference backend: f32 arithmetic (a bf16 checkpoint's weights are
//! kept as bf16 and widened exactly where used), plain loops, the `gemm`
//! crate for the products of the backward, linear.rs for the frozen-linear
//! forward, multi-threaded with rayon.
//!
//! Determinism: every output element is produced by exactly one task, and
//! every reduction runs in a fixed order that does not depend on the number
//! of threads or on scheduling, so identical inputs give bit-identical
//! outputs. `gemm` splits work over output blocks only (its depth blocking
//! depends on the cache sizes, never on the thread count); linear.rs splits
//! the weight's rows only, and its rows do not depend on the rows beside
//! them either.
//!
//! Buffer lengths are checked with `>=`: an op reads and writes only the
//! prefix its shape needs, so callers may reuse larger scratch buffers.
//! Each op family lives in its own file as free functions over slices; this
//! file only wires them into the [`Backend`] trait.

mod adamw;
mod attention;
mod cross_entropy;
mod gemm;
mod linear;
mod lora;
mod buffer_ops;
pub mod delta_net;
mod nf4;
mod norm;
mod rope;
mod glu;
pub mod sample;
#[cfg(test)]
mod test_util;

use anyhow::Result;

use super::{
    AdamW, AttnSaved, AttnShape, Backend, CeShape, ColsShape, DeltaGrads, DeltaIn, DeltaShape, DeltaState, DeltaWeights, GluShape, LoraGrads, LoraInputs, LoraShape, MatShape, NormShape,
    Qkv, QkvGrads, RopeShape, SamplingParams, Varlen, WeightSource,
};
use crate::quant::nf4::Nf4Tensor;
pub use nf4::Nf4Weight;
use linear::WeightRows;

/// A frozen weight on the CPU: f32 values, a bf16 checkpoint's values kept
/// as bf16 (half the memory and half the bytes a decoding step reads;
/// widened to f32 exactly where used), or an NF4 projection kept 4-bit and
/// dequantized per product.
pub enum CpuWeight {
    Dense(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    Nf4(Box<Nf4Weight>),
}

impl CpuWeight {
    /// Run `f` on the f32 values of a dense (f32 or bf16) weight: norm
    /// weights and biases. Only `linear` and `linear_backward_input` take NF4
    /// weights (see src/backend/mod.rs); anything else given one is a bug in
    /// the model graph.
    #[track_caller]
    fn with_dense<R>(&self, op: &str, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            CpuWeight::Nf4(_) => panic!("{op}: NF4 weights are only accepted by linear and linear_backward_input"),
            w => w.with_f32(f),
        }
    }

    /// Run `f` on the weight's f32 values (widened for bf16, dequantized for
    /// NF4).
    fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            CpuWeight::Dense(v) => f(v),
            CpuWeight::Bf16(v) => f(&buffer_ops::widen_bf16(v)),
            CpuWeight::Nf4(q) => nf4::with_dequantized(q, f),
        }
    }
}

impl std::fmt::Debug for CpuWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CpuWeight::Dense(v) => write!(f, "CpuWeight::Dense({} values)", v.len()),
            CpuWeight::Bf16(v) => write!(f, "CpuWeight::Bf16({} values)", v.len()),
            CpuWeight::Nf4(q) => write!(f, "CpuWeight::Nf4({:?}, blocksize {})", q.shape, q.blocksize),
        }
    }
}

impl From<Vec<f32>> for CpuWeight {
    fn from(v: Vec<f32>) -> Self {
        CpuWeight::Dense(v)
    }
}

/// y = x·Wᵀ (+ bias), with an f32 or bf16 weight as it is kept (an NF4
/// one dequantized first).
fn linear(x: &[f32], w: &CpuWeight, bias: Option<&[f32]>, y: &mut [f32], shape: MatShape) {
    match w {
        CpuWeight::Bf16(w) => linear::linear(x, WeightRows::Bf16(w), bias, y, shape),
        w => w.with_f32(|w| linear::linear(x, WeightRows::F32(w), bias, y, shape)),
    }
}

fn delta_inputs(i: DeltaIn<'_, Vec<f32>>) -> delta_net::DeltaNetInputs<'_> {
    delta_net::DeltaNetInputs { qkv: i.qkv, z: i.z, b: i.b, a: i.a }
}

/// The delta-net's frozen parameters as f32 slices (stored bf16 ones widened).
fn with_delta_weights<T>(w: DeltaWeights<'_, CpuWeight>, f: impl FnOnce(delta_net::DeltaNetWeights<'_>) -> T) -> T {
    w.conv.with_f32(|conv| {
        w.a_log.with_f32(|a_log| {
            w.dt_bias.with_f32(|dt_bias| w.norm.with_f32(|norm| f(delta_net::DeltaNetWeights { conv, a_log, dt_bias, norm })))
        })
    })
}

/// The CPU reference backend (stateless).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Panics with a clear message unless `len >= need`.
#[track_caller]
pub(crate) fn check_len(op: &str, what: &str, len: usize, need: usize) {
    assert!(
        len >= need,
        "{op}: `{what}` has {len} elements, the shape needs {need}"
    );
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = CpuWeight;
    type IntBuf = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    // ---- memory -------------------------------------------------------
    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    /// The CPU reference stores everything in f32.
    fn zeros_f32(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn zeros_like(&self, like: &Vec<f32>) -> Vec<f32> {
        vec![0.0; like.len()]
    }
    fn upload_activation(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }
    fn upload_ints(&self, data: &[i32]) -> Vec<i32> {
        data.to_vec()
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn load_weight(&self, src: &WeightSource) -> Result<CpuWeight> {
        buffer_ops::load_weight(src)
    }
    fn weight_from_f32(&self, data: &[f32]) -> CpuWeight {
        CpuWeight::Dense(data.to_vec())
    }
    fn weight_from_nf4(&self, t: &Nf4Tensor) -> Result<CpuWeight> {
        super::check_nf4(t)?;
        Ok(CpuWeight::Nf4(Box::new(Nf4Weight::new(t))))
    }
    fn weight_to_f32(&self, w: &CpuWeight) -> Vec<f32> {
        w.with_f32(|v| v.to_vec())
    }
    fn weight_len(&self, w: &CpuWeight) -> usize {
        match w {
            CpuWeight::Dense(v) => v.len(),
            CpuWeight::Bf16(v) => v.len(),
            CpuWeight::Nf4(q) => q.numel(),
        }
    }

    // ---- elementwise --------------------------------------------------
    fn fill(&self, buf: &mut Vec<f32>, value: f32) {
        buffer_ops::fill(buf, value)
    }
    fn copy_slice(&self, src: &Vec<f32>, src_off: usize, dst: &mut Vec<f32>, dst_off: usize, len: usize) {
        buffer_ops::copy_slice(src, src_off, dst, dst_off, len)
    }
    fn add_assign(&self, dst: &mut Vec<f32>, src: &Vec<f32>) {
        buffer_ops::add_assign(dst, src)
    }
    fn scale(&self, buf: &mut Vec<f32>, s: f32) {
        buffer_ops::scale(buf, s)
    }
    fn softcap(&self, buf: &mut Vec<f32>, cap: f32) {
        buffer_ops::softcap(buf, cap)
    }
    fn copy_cols(&self, src: &Vec<f32>, dst: &mut Vec<f32>, shape: ColsShape) {
        buffer_ops::copy_cols(src, dst, shape)
    }
    fn sum_sq(&self, buf: &Vec<f32>) -> f64 {
        buffer_ops::sum_sq(buf)
    }

    // ---- embedding ----------------------------------------------------
    fn embedding(&self, table: &CpuWeight, ids: &Vec<i32>, out: &mut Vec<f32>, n: usize, hidden: usize) {
        buffer_ops::embedding(table, ids, out, n, hidden)
    }

    // ---- matrix products ------------------------------------------------
    fn linear(&self, x: &Vec<f32>, w: &CpuWeight, bias: Option<&CpuWeight>, y: &mut Vec<f32>, shape: MatShape) {
        match bias {
            Some(b) => b.with_dense("linear (bias)", |b| linear(x, w, Some(b), y, shape)),
            None => linear(x, w, None, y, shape),
        }
    }
    fn linear_backward_input(&self, dy: &Vec<f32>, w: &CpuWeight, dx: &mut Vec<f32>, shape: MatShape, accumulate: bool) {
        w.with_f32(|w| gemm::linear_backward_input(dy, w, dx, shape, accumulate))
    }

    // ---- LoRA side path -------------------------------------------------
    fn lora_forward(&self, inputs: LoraInputs<'_, Vec<f32>>, xa: &mut Vec<f32>, y: &mut Vec<f32>, shape: LoraShape) {
        lora::lora_forward(inputs.map(Vec::as_slice), xa, y, shape)
    }
    fn lora_backward(
        &self,
        dy: &Vec<f32>,
        inputs: LoraInputs<'_, Vec<f32>>,
        xa: &Vec<f32>,
        grads: LoraGrads<'_, Vec<f32>>,
        shape: LoraShape,
    ) {
        lora::lora_backward(dy, inputs.map(Vec::as_slice), xa, grads.map(Vec::as_mut_slice), shape)
    }

    // ---- normalisation -------------------------------------------------
    fn rmsnorm(&self, x: &Vec<f32>, w: &CpuWeight, y: &mut Vec<f32>, inv_rms: &mut Vec<f32>, shape: NormShape, eps: f32) {
        w.with_dense("rmsnorm", |w| norm::rmsnorm(x, w, y, inv_rms, shape, eps))
    }
    fn rmsnorm_backward(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &CpuWeight,
        inv_rms: &Vec<f32>,
        dx: &mut Vec<f32>,
        shape: NormShape,
    ) {
        w.with_dense("rmsnorm_backward", |w| norm::rmsnorm_backward(dy, x, w, inv_rms, dx, shape))
    }

    // ---- rotary embeddings ---------------------------------------------
    fn rope(&self, x: &mut Vec<f32>, positions: &Vec<i32>, inv_freq: &Vec<f32>, shape: RopeShape) {
        rope::rope(x, positions, inv_freq, shape, false)
    }
    fn rope_backward(&self, dx: &mut Vec<f32>, positions: &Vec<i32>, inv_freq: &Vec<f32>, shape: RopeShape) {
        rope::rope(dx, positions, inv_freq, shape, true)
    }

    // ---- attention -----------------------------------------------------
    fn attention(
        &self,
        qkv: Qkv<'_, Vec<f32>>,
        seqs: Varlen<'_, Vec<i32>>,
        shape: AttnShape,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) {
        attention::attention(qkv.map(Vec::as_slice), seqs.map(Vec::as_slice), shape, out, lse)
    }
    fn attention_backward(
        &self,
        dout: &Vec<f32>,
        qkv: Qkv<'_, Vec<f32>>,
        saved: AttnSaved<'_, Vec<f32>>,
        seqs: Varlen<'_, Vec<i32>>,
        shape: AttnShape,
        grads: QkvGrads<'_, Vec<f32>>,
    ) {
        attention::attention_backward(
            dout,
            qkv.map(Vec::as_slice),
            saved.map(Vec::as_slice),
            seqs.map(Vec::as_slice),
            shape,
            grads.map(Vec::as_mut_slice),
        )
    }
    fn decode_attention(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        past: usize,
        shape: AttnShape,
        out: &mut Vec<f32>,
    ) {
        attention::decode_attention(q, k_cache, v_cache, past, shape, out)
    }

    fn decode_attention_batch(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        positions: &Vec<i32>,
        capacity: usize,
        shape: AttnShape,
        out: &mut Vec<f32>,
    ) {
        attention::decode_attention_batch(q, k_cache, v_cache, positions, capacity, shape, out)
    }
    fn scatter_rows(&self, src: &Vec<f32>, dst: &mut Vec<f32>, positions: &Vec<i32>, rows: usize, width: usize, capacity: usize) {
        buffer_ops::scatter_rows(src, dst, positions, rows, width, capacity)
    }

    // ---- MLP activation ------------------------------------------------
    fn delta_net(
        &self,
        inputs: DeltaIn<'_, Vec<f32>>,
        w: DeltaWeights<'_, CpuWeight>,
        seqs: Varlen<'_, Vec<i32>>,
        shape: DeltaShape,
        out: &mut Vec<f32>,
        saved: &mut Vec<f32>,
    ) {
        with_delta_weights(w, |w| delta_net::forward(delta_inputs(inputs), w, seqs.cu_seqlens, &shape, out, saved))
    }
    fn delta_net_backward(
        &self,
        dout: &Vec<f32>,
        inputs: DeltaIn<'_, Vec<f32>>,
        w: DeltaWeights<'_, CpuWeight>,
        seqs: Varlen<'_, Vec<i32>>,
        shape: DeltaShape,
        saved: &Vec<f32>,
        grads: DeltaGrads<'_, Vec<f32>>,
    ) {
        let grads = delta_net::DeltaNetGrads { qkv: grads.qkv, z: grads.z, b: grads.b, a: grads.a };
        with_delta_weights(w, |w| delta_net::backward(dout, delta_inputs(inputs), w, seqs.cu_seqlens, &shape, saved, grads))
    }
    fn delta_net_decode(
        &self,
        inputs: DeltaIn<'_, Vec<f32>>,
        w: DeltaWeights<'_, CpuWeight>,
        seqs: Varlen<'_, Vec<i32>>,
        shape: DeltaShape,
        state: DeltaState<'_, Vec<f32>>,
        out: &mut Vec<f32>,
    ) {
        with_delta_weights(w, |w| delta_net::decode(delta_inputs(inputs), w, seqs.cu_seqlens, &shape, state.conv, state.rec, out))
    }
    fn glu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>, shape: GluShape) {
        glu::glu(gate, up, out, shape)
    }
    fn glu_backward(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        shape: GluShape,
    ) {
        glu::glu_backward(dout, gate, up, dgate, dup, shape)
    }

    // ---- loss ------------------------------------------------------------
    fn cross_entropy(
        &self,
        logits: &mut Vec<f32>,
        targets: &Vec<i32>,
        losses: &mut Vec<f32>,
        shape: CeShape,
        grad_scale: Option<f32>,
    ) {
        cross_entropy::cross_entropy(logits, targets, losses, shape, grad_scale)
    }

    // ---- token choice ----------------------------------------------------
    fn sample_rows(&self, logits: &Vec<f32>, rows: usize, vocab: usize, params: &SamplingParams, uniforms: &[f64]) -> Vec<u32> {
        sample::sample_rows(logits, rows, vocab, params, uniforms)
    }

    // ---- optimiser -------------------------------------------------------
    fn adamw(&self, param: &mut Vec<f32>, grad: &Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, hp: AdamW) {
        adamw::adamw(param, grad, m, v, hp)
    }
}
