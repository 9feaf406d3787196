//! A backend wrapper that times every op (for `bench --profile`). On the
//! CPU backend ops are synchronous, so wall time per call is the op's time;
//! a GPU backend must synchronise (or use events) inside `Profiled::time`.
//! Ops reach the inner backend through `forward_ops!` (src/backend/forward.rs);
//! the profile names each op as that macro's table does.

use super::{Backend, Forward, WeightSource};
use anyhow::Result;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Profiled<B: Backend> {
    pub inner: B,
    table: Mutex<BTreeMap<&'static str, (u64, Duration)>>,
    /// Waits for the device (asynchronous backends); called around each op.
    sync: Option<SyncFn<B>>,
}

type SyncFn<B> = Box<dyn Fn(&B) + Send + Sync>;

/// One row of the profile: op name, calls, total time.
#[derive(Debug, Clone)]
pub struct OpTime {
    pub op: &'static str,
    pub calls: u64,
    pub total: Duration,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled { inner, table: Mutex::new(BTreeMap::new()), sync: None }
    }

    /// For a backend whose ops are queued: `sync` waits for the device, so
    /// each op's wall time is its device time (at the cost of the overlap).
    pub fn with_sync(inner: B, sync: impl Fn(&B) + Send + Sync + 'static) -> Self {
        Profiled { inner, table: Mutex::new(BTreeMap::new()), sync: Some(Box::new(sync)) }
    }

    fn time<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        if let Some(s) = &self.sync {
            s(&self.inner);
        }
        let t0 = Instant::now();
        let out = f();
        if let Some(s) = &self.sync {
            s(&self.inner);
        }
        let dt = t0.elapsed();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let e = t.entry(op).or_default();
        e.0 += 1;
        e.1 += dt;
        out
    }

    pub fn reset(&self) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Ops sorted by total time, largest first.
    pub fn report(&self) -> Vec<OpTime> {
        let t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<OpTime> = t.iter().map(|(op, (calls, total))| OpTime { op, calls: *calls, total: *total }).collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.total));
        v
    }
}

impl<B: Backend> Forward for Profiled<B> {
    type Inner = B;
    fn inner(&self) -> &B {
        &self.inner
    }
    fn buf(b: &B::Buf) -> &B::Buf {
        b
    }
    fn buf_mut(b: &mut B::Buf) -> &mut B::Buf {
        b
    }
    fn weight(w: &B::Weight) -> &B::Weight {
        w
    }
    fn ints(i: &B::IntBuf) -> &B::IntBuf {
        i
    }
    fn around<T>(&self, op: &'static str, call: impl FnOnce() -> T) -> T {
        self.time(op, call)
    }
}

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Weight = B::Weight;
    type IntBuf = B::IntBuf;

    // Handle makers: the allocations are timed (weights are loaded once,
    // before a profile starts).
    fn zeros(&self, len: usize) -> B::Buf {
        self.time("alloc_zeros", || self.inner.zeros(len))
    }
    fn zeros_f32(&self, len: usize) -> B::Buf {
        self.time("alloc_zeros", || self.inner.zeros_f32(len))
    }
    fn zeros_like(&self, like: &B::Buf) -> B::Buf {
        self.time("alloc_zeros", || self.inner.zeros_like(like))
    }
    fn upload(&self, data: &[f32]) -> B::Buf {
        self.time("upload", || self.inner.upload(data))
    }
    fn upload_activation(&self, data: &[f32]) -> B::Buf {
        self.time("upload", || self.inner.upload_activation(data))
    }
    fn upload_ints(&self, data: &[i32]) -> B::IntBuf {
        self.time("upload", || self.inner.upload_ints(data))
    }
    fn load_weight(&self, src: &WeightSource) -> Result<B::Weight> {
        self.inner.load_weight(src)
    }
    fn weight_from_f32(&self, data: &[f32]) -> B::Weight {
        self.inner.weight_from_f32(data)
    }
    fn weight_from_nf4(&self, t: &crate::quant::nf4::Nf4Tensor) -> Result<B::Weight> {
        self.inner.weight_from_nf4(t)
    }

    crate::forward_ops!();
}
