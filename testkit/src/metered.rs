//! A backend wrapper that meters device memory: every buffer and weight it
//! hands out carries its byte size and a handle on a shared meter, and gives
//! its bytes back when dropped. The meter keeps live bytes and high-water
//! marks per kind of storage (activation-type buffers, f32 buffers, i32
//! metadata, frozen weights) and for their sum. Every op delegates to the
//! inner backend (through `ferrotune::forward_ops!`).
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

use ferrotune::backend::{Backend, Forward, WeightSource};
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

impl<B: Backend> Forward for Metered<B> {
    type Inner = B;
    fn inner(&self) -> &B {
        &self.inner
    }
    fn buf(b: &MBuf<B>) -> &B::Buf {
        &b.inner
    }
    fn buf_mut(b: &mut MBuf<B>) -> &mut B::Buf {
        &mut b.inner
    }
    fn weight(w: &MWeight<B>) -> &B::Weight {
        &w.inner
    }
    fn ints(i: &MInts<B>) -> &B::IntBuf {
        &i.inner
    }
}

type Buf<B> = MBuf<B>;

impl<B: Backend> Backend for Metered<B> {
    type Buf = MBuf<B>;
    type Weight = MWeight<B>;
    type IntBuf = MInts<B>;

    // Handle makers: each allocation is metered; every other method is
    // forwarded unmetered by `forward_ops!`.
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
    fn upload_ints(&self, data: &[i32]) -> MInts<B> {
        self.wrap(self.inner.upload_ints(data), Kind::Int, data.len() * 4)
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

    ferrotune::forward_ops!();
}
