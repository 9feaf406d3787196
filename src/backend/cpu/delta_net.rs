//! Gated delta-net (Qwen3.5's linear attention): the CPU reference.
//!
//! Per token t of a sequence, from the pre-conv projection qkv_t = [q | k | v]
//! (Hk·dk, Hk·dk, Hv·dv channels) and the z, b, a projections:
//! - a depthwise causal conv over time per channel (kernel K, zeros before
//!   the sequence start, or a decode's carried rows), then SiLU;
//! - q, k l2-normed per k-head (x / √(Σx² + 1e-6)), q then × dk^−½;
//! - β = σ(b), g = −exp(A_log)·softplus(a + dt_bias) per v-head; v-head h
//!   reads k-head h / (Hv/Hk);
//! - per v-head a state S [dk, dv], zero at the sequence start:
//!   S' = e^g·S, u = β(v − S'ᵀk), S = S' + k·uᵀ, o = Sᵀq;
//! - out = (w ⊙ (o / √(mean(o²) + eps))) ⊙ silu(z) per v-head.
//!
//! Forward, backward and decode all run this token recurrence, one task per
//! (sequence, v-head); `chunked_core` is the chunked (UT transform) form of
//! the same recurrence, the reference for a GPU kernel's chunked form. The
//! forward keeps the state at each CHUNK-token chunk start, so the backward
//! recomputes one chunk's states at a time and runs it in reverse.
//!
//! Precision and determinism: f32 throughout (the math is generic over the
//! float type only so the tests can evaluate it in f64). Every output element
//! comes from one task with sums in a fixed order, so results are bitwise
//! independent of the thread count and of the other sequences in the batch.
//!
//! This file holds the API, the shared per-token math and the forward pass
//! (`forward`, `decode`); backward.rs the backward, chunked.rs `chunked_core`.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

use rayon::prelude::*;

use super::check_len;

mod backward;
mod chunked;
#[cfg(test)]
mod tests;

pub use chunked::chunked_core;

/// Tokens per chunk: the granularity of the states `forward` keeps (the
/// backend's `DELTA_CHUNK`).
pub const CHUNK: usize = crate::backend::DELTA_CHUNK;

/// The op's shape: the backend's own `DeltaShape`.
pub use crate::backend::DeltaShape as DeltaNetShape;

/// The frozen parameters.
#[derive(Clone, Copy)]
pub struct DeltaNetWeights<'a> {
    /// [C, K]
    pub conv: &'a [f32],
    /// [Hv]
    pub a_log: &'a [f32],
    /// [Hv]
    pub dt_bias: &'a [f32],
    /// [dv]
    pub norm: &'a [f32],
}

#[derive(Clone, Copy)]
pub struct DeltaNetInputs<'a> {
    /// [n, C], before the conv.
    pub qkv: &'a [f32],
    /// [n, Hv·dv]
    pub z: &'a [f32],
    /// [n, Hv]
    pub b: &'a [f32],
    /// [n, Hv]
    pub a: &'a [f32],
}

/// Gradients of the inputs (overwritten).
pub struct DeltaNetGrads<'a> {
    pub qkv: &'a mut [f32],
    pub z: &'a mut [f32],
    pub b: &'a mut [f32],
    pub a: &'a mut [f32],
}

/// f32 values `forward` keeps: Σ over sequences of ceil(len/CHUNK) states of Hv·dk·dv (the state at each chunk's start).
pub fn saved_states_len(cu_seqlens: &[i32], shape: &DeltaNetShape) -> usize {
    let chunks: usize = seq_bounds("saved_states_len", cu_seqlens).iter().map(|&(a, b)| (b - a).div_ceil(CHUNK)).sum();
    chunks * shape.state_size()
}

/// Training forward: out [n, Hv·dv]; saved [saved_states_len] = each chunk's starting state per sequence (for the backward).
///
/// `saved` holds, sequence after sequence, chunk after chunk, the state
/// [Hv, dk, dv] at the chunk's first token.
pub fn forward(inp: DeltaNetInputs, w: DeltaNetWeights, cu_seqlens: &[i32], shape: &DeltaNetShape, out: &mut [f32], saved: &mut [f32]) {
    const OP: &str = "delta_net_forward";
    let geo = Geo::new(OP, cu_seqlens, shape);
    let io = Io::of(&inp, &w, shape);
    geo.check_io(OP, &io);
    check_len(OP, "out", out.len(), shape.n * shape.value_width());
    check_len(OP, "saved", saved.len(), geo.saved_len());
    let mut states = vec![0.0f32; geo.seqs.len() * shape.state_size()];
    run(&geo, &io, None, &mut states, out, Some(saved));
}

/// Exact gradient of `forward` (w.r.t. qkv-before-conv, z, b, a) given dout [n, Hv·dv]; recomputes
/// activations, and the recurrence within each chunk from the saved chunk-start state, then runs it in reverse.
pub fn backward(
    dout: &[f32],
    inp: DeltaNetInputs,
    w: DeltaNetWeights,
    cu_seqlens: &[i32],
    shape: &DeltaNetShape,
    saved: &[f32],
    grads: DeltaNetGrads,
) {
    const OP: &str = "delta_net_backward";
    let geo = Geo::new(OP, cu_seqlens, shape);
    let io = Io::of(&inp, &w, shape);
    geo.check_io(OP, &io);
    let (n, c, vw, hv) = (shape.n, geo.c, shape.value_width(), shape.v_heads);
    check_len(OP, "dout", dout.len(), n * vw);
    check_len(OP, "saved", saved.len(), geo.saved_len());
    check_len(OP, "grads.qkv", grads.qkv.len(), n * c);
    check_len(OP, "grads.z", grads.z.len(), n * vw);
    check_len(OP, "grads.b", grads.b.len(), n * hv);
    check_len(OP, "grads.a", grads.a.len(), n * hv);
    let g = Grads { qkv: grads.qkv, z: grads.z, b: grads.b, a: grads.a };
    backward::backward_impl(&geo, &io, dout, saved, g);
}

/// Generation: the new tokens of each sequence (cu_seqlens over the new tokens; n_seqs = cu_seqlens.len()−1),
/// continuing from and updating each sequence's state. conv_state [n_seqs, K−1, C]: the last K−1 pre-conv qkv rows
/// (oldest first; zeros before the start); rec_state [n_seqs, Hv, dk, dv]. A fresh sequence starts from zeros.
/// Prefill (many tokens) and one-token steps both go through this; forward == decode from zero states.
pub fn decode(
    inp: DeltaNetInputs,
    w: DeltaNetWeights,
    cu_seqlens: &[i32],
    shape: &DeltaNetShape,
    conv_state: &mut [f32],
    rec_state: &mut [f32],
    out: &mut [f32],
) {
    const OP: &str = "delta_net_decode";
    let geo = Geo::new(OP, cu_seqlens, shape);
    let io = Io::of(&inp, &w, shape);
    geo.check_io(OP, &io);
    let (ns, c, hist) = (geo.seqs.len(), geo.c, shape.conv_kernel - 1);
    check_len(OP, "conv_state", conv_state.len(), ns * hist * c);
    check_len(OP, "rec_state", rec_state.len(), ns * shape.state_size());
    check_len(OP, "out", out.len(), shape.n * shape.value_width());
    run(&geo, &io, Some(&conv_state[..ns * hist * c]), rec_state, out, None);
    // The new conv rows: the last K−1 of (old rows ++ new tokens), per sequence.
    for (s, &(s0, s1)) in geo.seqs.iter().enumerate() {
        let rows = &mut conv_state[s * hist * c..][..hist * c];
        let len = s1 - s0;
        if len >= hist {
            rows.copy_from_slice(&io.qkv[(s1 - hist) * c..s1 * c]);
        } else {
            rows.copy_within(len * c.., 0);
            rows[(hist - len) * c..].copy_from_slice(&io.qkv[s0 * c..s1 * c]);
        }
    }
}

fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::ZERO, |acc, (&x, &y)| acc + x * y)
}

/// y += a·x
fn axpy<T: Real>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The scalar arithmetic the math needs: f32 for the backend, f64 for the
/// tests' high-precision evaluation of the same code.
trait Real:
    Copy + Send + Sync + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self> + AddAssign + MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn of(x: f64) -> Self;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn ln_1p(self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn of(x: f64) -> Self {
                x as $t
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// silu(x) = x·σ(x) (as x / (1 + e^−x), torch's form) and its slope σ(x)(1 + x(1 − σ(x))).
fn silu<T: Real>(x: T) -> (T, T) {
    let s = sigmoid(x);
    (x / (T::ONE + (-x).exp()), s * (T::ONE + x * (T::ONE - s)))
}

/// torch's softplus (linear above 20) and its slope.
fn softplus<T: Real>(x: T) -> (T, T) {
    if x > T::of(20.0) { (x, T::ONE) } else { (x.exp().ln_1p(), sigmoid(x)) }
}

/// Validated (start, end) of each sequence; `cu` starts at 0 and never decreases.
fn seq_bounds(op: &str, cu: &[i32]) -> Vec<(usize, usize)> {
    assert!(!cu.is_empty() && cu[0] == 0, "{op}: cu_seqlens must start with 0, got {cu:?}");
    cu.windows(2)
        .map(|w| {
            assert!(w[0] <= w[1], "{op}: cu_seqlens not non-decreasing: {} > {}", w[0], w[1]);
            (w[0] as usize, w[1] as usize)
        })
        .collect()
}

/// Validated geometry of one call.
struct Geo {
    s: DeltaNetShape,
    c: usize,
    /// k-heads per v-head group: v-head h reads k-head h / ratio.
    ratio: usize,
    seqs: Vec<(usize, usize)>,
    /// The sequence holding each token.
    seq_of: Vec<usize>,
    /// Chunks of the sequences before each one (index into `saved`).
    chunk_base: Vec<usize>,
}

impl Geo {
    fn new(op: &str, cu: &[i32], s: &DeltaNetShape) -> Geo {
        assert!(
            s.k_heads > 0 && s.v_heads.is_multiple_of(s.k_heads),
            "{op}: v_heads {} is not a multiple of k_heads {}",
            s.v_heads,
            s.k_heads
        );
        assert!(s.conv_kernel > 0, "{op}: conv_kernel must be at least 1");
        assert!(s.k_dim > 0 && s.v_dim > 0, "{op}: k_dim {} and v_dim {} must be at least 1", s.k_dim, s.v_dim);
        let seqs = seq_bounds(op, cu);
        let end = seqs.last().map_or(0, |b| b.1);
        assert!(end == s.n, "{op}: cu_seqlens ends at {end} but n = {}", s.n);
        let seq_of = seqs.iter().enumerate().flat_map(|(i, &(a, b))| std::iter::repeat_n(i, b - a)).collect();
        let chunk_base = seqs
            .iter()
            .scan(0, |acc, &(a, b)| {
                let base = *acc;
                *acc += (b - a).div_ceil(CHUNK);
                Some(base)
            })
            .collect();
        Geo { s: *s, c: s.conv_dim(), ratio: s.v_heads / s.k_heads, seqs, seq_of, chunk_base }
    }

    fn saved_len(&self) -> usize {
        let chunks: usize = self.seqs.iter().map(|&(a, b)| (b - a).div_ceil(CHUNK)).sum();
        chunks * self.s.state_size()
    }

    fn check_io<T>(&self, op: &str, io: &Io<T>) {
        let s = &self.s;
        check_len(op, "qkv", io.qkv.len(), s.n * self.c);
        check_len(op, "z", io.z.len(), s.n * s.value_width());
        check_len(op, "b", io.b.len(), s.n * s.v_heads);
        check_len(op, "a", io.a.len(), s.n * s.v_heads);
        check_len(op, "conv weight", io.conv.len(), self.c * s.conv_kernel);
        check_len(op, "a_log", io.a_log.len(), s.v_heads);
        check_len(op, "dt_bias", io.dt_bias.len(), s.v_heads);
        check_len(op, "norm weight", io.norm.len(), s.v_dim);
    }
}

/// Inputs and frozen weights together, over the float type of the math.
struct Io<'a, T> {
    qkv: &'a [T],
    z: &'a [T],
    b: &'a [T],
    a: &'a [T],
    conv: &'a [T],
    a_log: &'a [T],
    dt_bias: &'a [T],
    norm: &'a [T],
    eps: T,
}

impl<'a> Io<'a, f32> {
    fn of(inp: &DeltaNetInputs<'a>, w: &DeltaNetWeights<'a>, s: &DeltaNetShape) -> Self {
        Io { qkv: inp.qkv, z: inp.z, b: inp.b, a: inp.a, conv: w.conv, a_log: w.a_log, dt_bias: w.dt_bias, norm: w.norm, eps: s.norm_eps }
    }
}

struct Grads<'a, T> {
    qkv: &'a mut [T],
    z: &'a mut [T],
    b: &'a mut [T],
    a: &'a mut [T],
}

/// Per-token activations ahead of the recurrence.
struct Prep<T> {
    /// [n, C] conv output before the SiLU.
    pre: Vec<T>,
    /// [n, C] after the SiLU (q, k not yet normed; v final).
    act: Vec<T>,
    /// [n, Hk, dk] l2-normed, × dk^−½.
    q: Vec<T>,
    /// [n, Hk, dk] l2-normed.
    k: Vec<T>,
    /// [n, Hv] each.
    beta: Vec<T>,
    g: Vec<T>,
}

fn l2_inv<T: Real>(x: &[T]) -> T {
    T::ONE / (dot(x, x) + T::of(1e-6)).sqrt()
}

/// The conv (reading `hist` [n_seqs, K−1, C] before each sequence's first
/// token; zeros without it), SiLU, the q/k norms and the gates.
fn prep<T: Real>(geo: &Geo, io: &Io<T>, hist: Option<&[T]>) -> Prep<T> {
    let (s, c) = (&geo.s, geo.c);
    let (n, k, hk, dk, hv) = (s.n, s.conv_kernel, s.k_heads, s.k_dim, s.v_heads);
    let mut pre = vec![T::ZERO; n * c];
    pre.par_chunks_mut(c.max(1)).enumerate().for_each(|(t, row)| {
        let sq = geo.seq_of[t];
        let s0 = geo.seqs[sq].0;
        for j in 0..k {
            // Input row t − (K−1) + j: a carried row while r < K−1.
            let r = t - s0 + j;
            let x = if r + 1 >= k {
                Some(&io.qkv[(t + j + 1 - k) * c..][..c])
            } else {
                hist.map(|h| &h[(sq * (k - 1) + r) * c..][..c])
            };
            if let Some(x) = x {
                for (ch, (y, &x)) in row.iter_mut().zip(x).enumerate() {
                    *y += io.conv[ch * k + j] * x;
                }
            }
        }
    });
    let act: Vec<T> = pre.par_iter().map(|&x| silu(x).0).collect();
    let scale = T::of((dk as f64).powf(-0.5));
    let normed = |off: usize, scale: T| -> Vec<T> {
        let mut out = vec![T::ZERO; n * hk * dk];
        out.par_chunks_mut(dk.max(1)).enumerate().for_each(|(i, y)| {
            let x = &act[(i / hk) * c + off + (i % hk) * dk..][..dk];
            let inv = l2_inv(x);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * inv * scale;
            }
        });
        out
    };
    let (q, kk) = (normed(0, scale), normed(hk * dk, T::ONE));
    let beta = io.b[..n * hv].par_iter().map(|&b| sigmoid(b)).collect();
    let g = io.a[..n * hv]
        .par_iter()
        .enumerate()
        .map(|(i, &a)| -io.a_log[i % hv].exp() * softplus(a + io.dt_bias[i % hv]).0)
        .collect();
    Prep { pre, act, q, k: kk, beta, g }
}

/// The vectors of v-head h at token t.
struct Tok<'p, T> {
    q: &'p [T],
    k: &'p [T],
    v: &'p [T],
    z: &'p [T],
    g: T,
    beta: T,
}

fn tok<'p, T: Real>(geo: &Geo, io: &Io<'p, T>, p: &'p Prep<T>, t: usize, h: usize) -> Tok<'p, T> {
    let s = &geo.s;
    let (dk, dv, hv) = (s.k_dim, s.v_dim, s.v_heads);
    let kh = t * s.k_heads + h / geo.ratio;
    Tok {
        q: &p.q[kh * dk..][..dk],
        k: &p.k[kh * dk..][..dk],
        v: &p.act[t * geo.c + 2 * s.k_heads * dk + h * dv..][..dv],
        z: &io.z[(t * hv + h) * dv..][..dv],
        g: p.g[t * hv + h],
        beta: p.beta[t * hv + h],
    }
}

/// S ← e^g·S; kv = Sᵀk; u = β(v − kv).
fn decay_read<T: Real>(st: &mut [T], x: &Tok<T>, kv: &mut [T], u: &mut [T]) {
    let d = x.g.exp();
    st.iter_mut().for_each(|s| *s *= d);
    kv.fill(T::ZERO);
    for (row, &ki) in st.chunks_exact(kv.len()).zip(x.k) {
        axpy(kv, ki, row);
    }
    for ((u, &v), &kv) in u.iter_mut().zip(x.v).zip(kv.iter()) {
        *u = x.beta * (v - kv);
    }
}

/// S ← S + k·uᵀ; o = Sᵀq.
fn write_read<T: Real>(st: &mut [T], x: &Tok<T>, u: &[T], o: &mut [T]) {
    o.fill(T::ZERO);
    for ((row, &ki), &qi) in st.chunks_exact_mut(u.len()).zip(x.k).zip(x.q) {
        for ((s, &u), o) in row.iter_mut().zip(u).zip(o.iter_mut()) {
            *s += ki * u;
            *o += *s * qi;
        }
    }
}

/// 1 / √(mean(o²) + eps): the gated norm's scale.
fn norm_inv<T: Real>(o: &[T], eps: T) -> T {
    T::ONE / (dot(o, o) / T::of(o.len() as f64) + eps).sqrt()
}

/// Runs every (sequence, v-head) from `states` [n_seqs, Hv, dk, dv]
/// (updated in place), writing `out` and, when given, the chunk-start states.
fn run<T: Real>(geo: &Geo, io: &Io<T>, hist: Option<&[T]>, states: &mut [T], out: &mut [T], mut saved: Option<&mut [T]>) {
    let s = &geo.s;
    let (dv, hv, ss) = (s.v_dim, s.v_heads, s.k_dim * s.v_dim);
    let p = prep(geo, io, hist);
    let keep = saved.is_some();
    let results: Vec<(Vec<T>, Vec<T>)> = states[..geo.seqs.len() * hv * ss]
        .par_chunks_mut(ss)
        .enumerate()
        .map(|(i, st)| {
            let (s0, s1) = geo.seqs[i / hv];
            let (mut y, mut kept) = (vec![T::ZERO; (s1 - s0) * dv], Vec::new());
            let (mut kv, mut u, mut o) = (vec![T::ZERO; dv], vec![T::ZERO; dv], vec![T::ZERO; dv]);
            for (t, y) in (s0..s1).zip(y.chunks_exact_mut(dv)) {
                if keep && (t - s0) % CHUNK == 0 {
                    kept.extend_from_slice(st);
                }
                let x = tok(geo, io, &p, t, i % hv);
                decay_read(st, &x, &mut kv, &mut u);
                write_read(st, &x, &u, &mut o);
                let inv = norm_inv(&o, io.eps);
                for (((y, &o), &w), &z) in y.iter_mut().zip(&o).zip(io.norm).zip(x.z) {
                    *y = w * (o * inv) * silu(z).0;
                }
            }
            (y, kept)
        })
        .collect();
    for (i, (y, kept)) in results.iter().enumerate() {
        let (sq, h) = (i / hv, i % hv);
        let s0 = geo.seqs[sq].0;
        for (t, row) in y.chunks_exact(dv).enumerate() {
            out[((s0 + t) * hv + h) * dv..][..dv].copy_from_slice(row);
        }
        if let Some(saved) = saved.as_deref_mut() {
            for (ch, st) in kept.chunks_exact(ss).enumerate() {
                saved[((geo.chunk_base[sq] + ch) * hv + h) * ss..][..ss].copy_from_slice(st);
            }
        }
    }
}
