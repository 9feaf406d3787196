//! A backend wrapper that times every op (for `bench --profile`). On the
//! CPU backend ops are synchronous, so wall time per call is the op's time;
//! a GPU backend must synchronise (or use events) inside `Profiled::time`.

use super::{AdamW, AttnShape, Backend, Dropout, WeightSource};
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

impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Weight = B::Weight;
    type IntBuf = B::IntBuf;

    fn name(&self) -> String {
        self.inner.name()
    }
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
    fn download(&self, buf: &B::Buf) -> Vec<f32> {
        self.time("download", || self.inner.download(buf))
    }
    fn upload_ints(&self, data: &[i32]) -> B::IntBuf {
        self.time("upload", || self.inner.upload_ints(data))
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
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
    fn weight_to_f32(&self, w: &B::Weight) -> Vec<f32> {
        self.inner.weight_to_f32(w)
    }
    fn weight_len(&self, w: &B::Weight) -> usize {
        self.inner.weight_len(w)
    }
    fn fill(&self, buf: &mut B::Buf, value: f32) {
        self.time("fill", || self.inner.fill(buf, value))
    }
    fn copy_slice(&self, src: &B::Buf, src_off: usize, dst: &mut B::Buf, dst_off: usize, len: usize) {
        self.time("copy", || self.inner.copy_slice(src, src_off, dst, dst_off, len))
    }
    fn add_assign(&self, dst: &mut B::Buf, src: &B::Buf) {
        self.time("add", || self.inner.add_assign(dst, src))
    }
    fn scale(&self, buf: &mut B::Buf, s: f32) {
        self.time("scale", || self.inner.scale(buf, s))
    }
    fn sum_sq(&self, buf: &B::Buf) -> f64 {
        self.time("sum_sq", || self.inner.sum_sq(buf))
    }
    fn sum_sq_all(&self, bufs: &[&B::Buf]) -> f64 {
        self.time("sum_sq", || self.inner.sum_sq_all(bufs))
    }
    fn embedding(&self, table: &B::Weight, ids: &B::IntBuf, out: &mut B::Buf, n: usize, hidden: usize) {
        self.time("embedding", || self.inner.embedding(table, ids, out, n, hidden))
    }
    fn linear(&self, x: &B::Buf, w: &B::Weight, bias: Option<&B::Weight>, y: &mut B::Buf, m: usize, k: usize, n: usize) {
        self.time("linear", || self.inner.linear(x, w, bias, y, m, k, n))
    }
    fn linear_backward_input(&self, dy: &B::Buf, w: &B::Weight, dx: &mut B::Buf, m: usize, k: usize, n: usize, acc: bool) {
        self.time("linear_backward_input", || self.inner.linear_backward_input(dy, w, dx, m, k, n, acc))
    }
    fn lora_forward(
        &self,
        x: &B::Buf,
        a: &B::Buf,
        b: &B::Buf,
        scale: f32,
        dropout: Option<Dropout>,
        xa: &mut B::Buf,
        y: &mut B::Buf,
        m: usize,
        k: usize,
        n: usize,
        r: usize,
    ) {
        self.time("lora_forward", || self.inner.lora_forward(x, a, b, scale, dropout, xa, y, m, k, n, r))
    }
    fn lora_backward(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        a: &B::Buf,
        b: &B::Buf,
        xa: &B::Buf,
        scale: f32,
        dropout: Option<Dropout>,
        dx: &mut B::Buf,
        da: &mut B::Buf,
        db: &mut B::Buf,
        m: usize,
        k: usize,
        n: usize,
        r: usize,
    ) {
        self.time("lora_backward", || self.inner.lora_backward(dy, x, a, b, xa, scale, dropout, dx, da, db, m, k, n, r))
    }
    fn rmsnorm(&self, x: &B::Buf, w: &B::Weight, y: &mut B::Buf, inv: &mut B::Buf, rows: usize, hidden: usize, eps: f32) {
        self.time("rmsnorm", || self.inner.rmsnorm(x, w, y, inv, rows, hidden, eps))
    }
    fn rmsnorm_backward(&self, dy: &B::Buf, x: &B::Buf, w: &B::Weight, inv: &B::Buf, dx: &mut B::Buf, rows: usize, hidden: usize) {
        self.time("rmsnorm_backward", || self.inner.rmsnorm_backward(dy, x, w, inv, dx, rows, hidden))
    }
    fn rope(&self, x: &mut B::Buf, pos: &B::IntBuf, inv_freq: &B::Buf, n: usize, heads: usize, head_dim: usize) {
        self.time("rope", || self.inner.rope(x, pos, inv_freq, n, heads, head_dim))
    }
    fn rope_backward(&self, dx: &mut B::Buf, pos: &B::IntBuf, inv_freq: &B::Buf, n: usize, heads: usize, head_dim: usize) {
        self.time("rope_backward", || self.inner.rope_backward(dx, pos, inv_freq, n, heads, head_dim))
    }
    fn attention(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        cu: &B::IntBuf,
        n_seqs: usize,
        shape: AttnShape,
        out: &mut B::Buf,
        lse: &mut B::Buf,
    ) {
        self.time("attention", || self.inner.attention(q, k, v, cu, n_seqs, shape, out, lse))
    }
    fn attention_backward(
        &self,
        dout: &B::Buf,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        out: &B::Buf,
        lse: &B::Buf,
        cu: &B::IntBuf,
        n_seqs: usize,
        shape: AttnShape,
        dq: &mut B::Buf,
        dk: &mut B::Buf,
        dv: &mut B::Buf,
    ) {
        self.time("attention_backward", || {
            self.inner.attention_backward(dout, q, k, v, out, lse, cu, n_seqs, shape, dq, dk, dv)
        })
    }
    fn decode_attention(
        &self,
        q: &B::Buf,
        k_cache: &B::Buf,
        v_cache: &B::Buf,
        past: usize,
        shape: AttnShape,
        out: &mut B::Buf,
    ) {
        self.time("decode_attention", || self.inner.decode_attention(q, k_cache, v_cache, past, shape, out))
    }
    fn swiglu(&self, gate: &B::Buf, up: &B::Buf, out: &mut B::Buf, len: usize) {
        self.time("swiglu", || self.inner.swiglu(gate, up, out, len))
    }
    fn swiglu_backward(&self, dout: &B::Buf, gate: &B::Buf, up: &B::Buf, dg: &mut B::Buf, du: &mut B::Buf, len: usize) {
        self.time("swiglu_backward", || self.inner.swiglu_backward(dout, gate, up, dg, du, len))
    }
    fn cross_entropy(
        &self,
        logits: &mut B::Buf,
        targets: &B::IntBuf,
        losses: &mut B::Buf,
        rows: usize,
        vocab: usize,
        grad_scale: Option<f32>,
    ) {
        self.time("cross_entropy", || self.inner.cross_entropy(logits, targets, losses, rows, vocab, grad_scale))
    }
    fn adamw(&self, param: &mut B::Buf, grad: &B::Buf, m: &mut B::Buf, v: &mut B::Buf, hp: AdamW) {
        self.time("adamw", || self.inner.adamw(param, grad, m, v, hp))
    }
}
