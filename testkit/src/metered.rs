//! A backend wrapper that meters device memory: every buffer and weight it
//! hands out carries its byte size and a handle on a shared meter, and gives
//! its bytes back when dropped. The meter keeps live bytes and high-water
//! marks per kind of storage (activation-type buffers, f32 buffers, i32
//! metadata, frozen weights) and for their sum. Every op delegates to the
//! inner backend.
//!
//! Bytes per element are constructor parameters, not read from the inner
//! backend, so the CPU reference (which stores everything in f32) can also
//! replay the allocation pattern of a bf16 GPU backend: `act_bytes` is the
//! activation storage type's size (4 on CPU, 2 for bf16), `weight_bytes` the
//! frozen weights' (4 on CPU, 2 for bf16). f32 buffers (`zeros_f32`,
//! `upload`) are 4 bytes per element and i32 metadata (`upload_ints`) 4.
//! `zeros_like` takes the kind and element size of the buffer it copies.
//!
//! `train::memory` predicts these numbers before a run; the integration test
//! `tests/memory_plan.rs` checks the prediction against this meter.

use ferrotune::backend::{AdamW, AttnShape, Backend, Dropout, WeightSource};
use anyhow::Result;
use std::fmt;
use std::sync::{Arc, Mutex};

/// Which kind of storage a metered allocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Activations and their gradients (`zeros`, `upload_activation`, and
    /// `zeros_like` of them).
    Act,
    /// f32 storage: LoRA parameters, gradients, moments, saved statistics
    /// (`zeros_f32`, `upload`, and `zeros_like` of them).
    F32,
    /// i32 per-token metadata (`upload_ints`).
    Int,
    /// Frozen base weights (`load_weight`, `weight_from_f32`,
    /// `weight_from_nf4`), and the NF4 dequantization scratch.
    Weight,
}

/// Bytes per kind of storage, and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryBreakdown {
    pub act: usize,
    pub f32: usize,
    pub ints: usize,
    pub weights: usize,
    pub total: usize,
}

impl MemoryBreakdown {
    fn slot(&mut self, kind: Kind) -> &mut usize {
        match kind {
            Kind::Act => &mut self.act,
            Kind::F32 => &mut self.f32,
            Kind::Int => &mut self.ints,
            Kind::Weight => &mut self.weights,
        }
    }
}

impl fmt::Display for MemoryBreakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "activations {} B, f32 {} B, ints {} B, weights {} B, total {} B",
            self.act, self.f32, self.ints, self.weights, self.total
        )
    }
}

/// Live bytes and high-water marks. `peak.total` is the high-water mark of
/// the sum, not the sum of the per-kind marks (they need not coincide).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    pub live: MemoryBreakdown,
    pub peak: MemoryBreakdown,
}

#[derive(Default)]
struct Meter {
    usage: Mutex<MemoryUsage>,
}

impl Meter {
    fn with<T>(&self, f: impl FnOnce(&mut MemoryUsage) -> T) -> T {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut u)
    }

    fn add(&self, kind: Kind, bytes: usize) {
        self.with(|u| {
            let live = {
                let s = u.live.slot(kind);
                *s += bytes;
                *s
            };
            u.live.total += bytes;
            let p = u.peak.slot(kind);
            *p = (*p).max(live);
            u.peak.total = u.peak.total.max(u.live.total);
        })
    }

    fn sub(&self, kind: Kind, bytes: usize) {
        self.with(|u| {
            *u.live.slot(kind) -= bytes;
            u.live.total -= bytes;
        })
    }
}

/// A metered allocation: the inner backend's buffer (or weight), its size in
/// bytes and kind, and the meter it gives its bytes back to when dropped.
pub struct Tracked<T> {
    pub inner: T,
    bytes: usize,
    kind: Kind,
    meter: Arc<Meter>,
}

/// A metered activation / f32 buffer.
pub type MBuf<B> = Tracked<<B as Backend>::Buf>;
/// A metered frozen weight.
pub type MWeight<B> = Tracked<<B as Backend>::Weight>;
/// Metered i32 metadata.
pub type MInts<B> = Tracked<<B as Backend>::IntBuf>;

impl<T> Tracked<T> {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        self.meter.sub(self.kind, self.bytes);
    }
}

pub struct Metered<B: Backend> {
    pub inner: B,
    act_bytes: usize,
    weight_bytes: usize,
    meter: Arc<Meter>,
    /// Elements of the NF4 dequantization scratch: the GPU backend holds one
    /// buffer of the weight type, grown to the largest NF4 weight loaded and
    /// kept for the backend's life; metered as a weight that is never freed.
    nf4_scratch: Mutex<usize>,
}

impl<B: Backend> Metered<B> {
    /// `act_bytes`: bytes per activation element (4 on CPU, 2 for a bf16
    /// GPU backend); `weight_bytes`: bytes per frozen-weight element.
    pub fn new(inner: B, act_bytes: usize, weight_bytes: usize) -> Self {
        Metered { inner, act_bytes, weight_bytes, meter: Arc::new(Meter::default()), nf4_scratch: Mutex::new(0) }
    }

    pub fn act_bytes(&self) -> usize {
        self.act_bytes
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// High-water mark of all live bytes (every kind) since creation or the
    /// last `reset_peak`.
    pub fn peak_bytes(&self) -> usize {
        self.meter.with(|u| u.peak.total)
    }

    /// Bytes alive now (every kind).
    pub fn live_bytes(&self) -> usize {
        self.meter.with(|u| u.live.total)
    }

    /// Restart every high-water mark from what is alive now.
    pub fn reset_peak(&self) {
        self.meter.with(|u| u.peak = u.live)
    }

    /// Live bytes and high-water marks per kind.
    pub fn usage(&self) -> MemoryUsage {
        self.meter.with(|u| *u)
    }

    fn wrap<T>(&self, inner: T, kind: Kind, bytes: usize) -> Tracked<T> {
        self.meter.add(kind, bytes);
        Tracked { inner, bytes, kind, meter: self.meter.clone() }
    }
}

type Buf<B> = MBuf<B>;

impl<B: Backend> Backend for Metered<B> {
    type Buf = MBuf<B>;
    type Weight = MWeight<B>;
    type IntBuf = MInts<B>;

    fn name(&self) -> String {
        self.inner.name()
    }
    fn zeros(&self, len: usize) -> Buf<B> {
        self.wrap(self.inner.zeros(len), Kind::Act, len * self.act_bytes)
    }
    fn zeros_f32(&self, len: usize) -> Buf<B> {
        self.wrap(self.inner.zeros_f32(len), Kind::F32, len * 4)
    }
    fn zeros_like(&self, like: &Buf<B>) -> Buf<B> {
        self.wrap(self.inner.zeros_like(&like.inner), like.kind, like.bytes)
    }
    fn upload(&self, data: &[f32]) -> Buf<B> {
        self.wrap(self.inner.upload(data), Kind::F32, data.len() * 4)
    }
    fn upload_activation(&self, data: &[f32]) -> Buf<B> {
        self.wrap(self.inner.upload_activation(data), Kind::Act, data.len() * self.act_bytes)
    }
    fn download(&self, buf: &Buf<B>) -> Vec<f32> {
        self.inner.download(&buf.inner)
    }
    fn upload_ints(&self, data: &[i32]) -> MInts<B> {
        self.wrap(self.inner.upload_ints(data), Kind::Int, data.len() * 4)
    }
    fn len(&self, buf: &Buf<B>) -> usize {
        self.inner.len(&buf.inner)
    }
    fn load_weight(&self, src: &WeightSource) -> Result<MWeight<B>> {
        let w = self.inner.load_weight(src)?;
        Ok(self.wrap(w, Kind::Weight, src.numel * self.weight_bytes))
    }
    fn weight_from_f32(&self, data: &[f32]) -> MWeight<B> {
        self.wrap(self.inner.weight_from_f32(data), Kind::Weight, data.len() * self.weight_bytes)
    }
    fn weight_from_nf4(&self, t: &ferrotune::quant::nf4::Nf4Tensor) -> Result<MWeight<B>> {
        let w = self.inner.weight_from_nf4(t)?;
        let mut scratch = self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner());
        if t.numel() > *scratch {
            self.meter.add(Kind::Weight, (t.numel() - *scratch) * self.weight_bytes);
            *scratch = t.numel();
        }
        Ok(self.wrap(w, Kind::Weight, ferrotune::backend::nf4_device_bytes(t)))
    }
    fn weight_to_f32(&self, w: &MWeight<B>) -> Vec<f32> {
        self.inner.weight_to_f32(&w.inner)
    }
    fn weight_len(&self, w: &MWeight<B>) -> usize {
        self.inner.weight_len(&w.inner)
    }
    fn fill(&self, buf: &mut Buf<B>, value: f32) {
        self.inner.fill(&mut buf.inner, value)
    }
    fn copy_slice(&self, src: &Buf<B>, src_off: usize, dst: &mut Buf<B>, dst_off: usize, len: usize) {
        self.inner.copy_slice(&src.inner, src_off, &mut dst.inner, dst_off, len)
    }
    fn add_assign(&self, dst: &mut Buf<B>, src: &Buf<B>) {
        self.inner.add_assign(&mut dst.inner, &src.inner)
    }
    fn scale(&self, buf: &mut Buf<B>, s: f32) {
        self.inner.scale(&mut buf.inner, s)
    }
    fn sum_sq(&self, buf: &Buf<B>) -> f64 {
        self.inner.sum_sq(&buf.inner)
    }
    fn embedding(&self, table: &MWeight<B>, ids: &MInts<B>, out: &mut Buf<B>, n: usize, hidden: usize) {
        self.inner.embedding(&table.inner, &ids.inner, &mut out.inner, n, hidden)
    }
    fn linear(
        &self,
        x: &Buf<B>,
        w: &MWeight<B>,
        bias: Option<&MWeight<B>>,
        y: &mut Buf<B>,
        m: usize,
        k: usize,
        n: usize,
    ) {
        self.inner.linear(&x.inner, &w.inner, bias.map(|b| &b.inner), &mut y.inner, m, k, n)
    }
    fn linear_backward_input(
        &self,
        dy: &Buf<B>,
        w: &MWeight<B>,
        dx: &mut Buf<B>,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        self.inner.linear_backward_input(&dy.inner, &w.inner, &mut dx.inner, m, k, n, accumulate)
    }
    fn lora_forward(
        &self,
        x: &Buf<B>,
        a: &Buf<B>,
        b: &Buf<B>,
        scale: f32,
        dropout: Option<Dropout>,
        xa: &mut Buf<B>,
        y: &mut Buf<B>,
        m: usize,
        k: usize,
        n: usize,
        r: usize,
    ) {
        self.inner.lora_forward(&x.inner, &a.inner, &b.inner, scale, dropout, &mut xa.inner, &mut y.inner, m, k, n, r)
    }
    fn lora_backward(
        &self,
        dy: &Buf<B>,
        x: &Buf<B>,
        a: &Buf<B>,
        b: &Buf<B>,
        xa: &Buf<B>,
        scale: f32,
        dropout: Option<Dropout>,
        dx: &mut Buf<B>,
        da: &mut Buf<B>,
        db: &mut Buf<B>,
        m: usize,
        k: usize,
        n: usize,
        r: usize,
    ) {
        self.inner.lora_backward(
            &dy.inner,
            &x.inner,
            &a.inner,
            &b.inner,
            &xa.inner,
            scale,
            dropout,
            &mut dx.inner,
            &mut da.inner,
            &mut db.inner,
            m,
            k,
            n,
            r,
        )
    }
    fn rmsnorm(
        &self,
        x: &Buf<B>,
        w: &MWeight<B>,
        y: &mut Buf<B>,
        inv_rms: &mut Buf<B>,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) {
        self.inner.rmsnorm(&x.inner, &w.inner, &mut y.inner, &mut inv_rms.inner, rows, hidden, eps)
    }
    fn rmsnorm_backward(
        &self,
        dy: &Buf<B>,
        x: &Buf<B>,
        w: &MWeight<B>,
        inv_rms: &Buf<B>,
        dx: &mut Buf<B>,
        rows: usize,
        hidden: usize,
    ) {
        self.inner.rmsnorm_backward(&dy.inner, &x.inner, &w.inner, &inv_rms.inner, &mut dx.inner, rows, hidden)
    }
    fn rope(&self, x: &mut Buf<B>, positions: &MInts<B>, inv_freq: &Buf<B>, n: usize, heads: usize, head_dim: usize) {
        self.inner.rope(&mut x.inner, &positions.inner, &inv_freq.inner, n, heads, head_dim)
    }
    fn rope_backward(
        &self,
        dx: &mut Buf<B>,
        positions: &MInts<B>,
        inv_freq: &Buf<B>,
        n: usize,
        heads: usize,
        head_dim: usize,
    ) {
        self.inner.rope_backward(&mut dx.inner, &positions.inner, &inv_freq.inner, n, heads, head_dim)
    }
    fn attention(
        &self,
        q: &Buf<B>,
        k: &Buf<B>,
        v: &Buf<B>,
        cu_seqlens: &MInts<B>,
        n_seqs: usize,
        shape: AttnShape,
        out: &mut Buf<B>,
        lse: &mut Buf<B>,
    ) {
        self.inner.attention(&q.inner, &k.inner, &v.inner, &cu_seqlens.inner, n_seqs, shape, &mut out.inner, &mut lse.inner)
    }
    fn attention_backward(
        &self,
        dout: &Buf<B>,
        q: &Buf<B>,
        k: &Buf<B>,
        v: &Buf<B>,
        out: &Buf<B>,
        lse: &Buf<B>,
        cu_seqlens: &MInts<B>,
        n_seqs: usize,
        shape: AttnShape,
        dq: &mut Buf<B>,
        dk: &mut Buf<B>,
        dv: &mut Buf<B>,
    ) {
        self.inner.attention_backward(
            &dout.inner,
            &q.inner,
            &k.inner,
            &v.inner,
            &out.inner,
            &lse.inner,
            &cu_seqlens.inner,
            n_seqs,
            shape,
            &mut dq.inner,
            &mut dk.inner,
            &mut dv.inner,
        )
    }
    fn decode_attention(
        &self,
        q: &Buf<B>,
        k_cache: &Buf<B>,
        v_cache: &Buf<B>,
        past: usize,
        shape: AttnShape,
        out: &mut Buf<B>,
    ) {
        self.inner.decode_attention(&q.inner, &k_cache.inner, &v_cache.inner, past, shape, &mut out.inner)
    }
    fn swiglu(&self, gate: &Buf<B>, up: &Buf<B>, out: &mut Buf<B>, len: usize) {
        self.inner.swiglu(&gate.inner, &up.inner, &mut out.inner, len)
    }
    fn swiglu_backward(
        &self,
        dout: &Buf<B>,
        gate: &Buf<B>,
        up: &Buf<B>,
        dgate: &mut Buf<B>,
        dup: &mut Buf<B>,
        len: usize,
    ) {
        self.inner.swiglu_backward(&dout.inner, &gate.inner, &up.inner, &mut dgate.inner, &mut dup.inner, len)
    }
    fn cross_entropy(
        &self,
        logits: &mut Buf<B>,
        targets: &MInts<B>,
        losses: &mut Buf<B>,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) {
        self.inner.cross_entropy(&mut logits.inner, &targets.inner, &mut losses.inner, rows, vocab, grad_scale)
    }
    fn adamw(&self, param: &mut Buf<B>, grad: &Buf<B>, m: &mut Buf<B>, v: &mut Buf<B>, hp: AdamW) {
        self.inner.adamw(&mut param.inner, &grad.inner, &mut m.inner, &mut v.inner, hp)
    }
}
