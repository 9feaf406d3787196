//! Causal (optionally sliding-window) GQA attention over the varlen batch.
//!
//! Every query row is computed by one task (forward and dq), every key row by
//! one task (dk, dv); all dot products and sums run in a fixed order, so the
//! results do not depend on the thread count, and a sequence's results do not
//! depend on which other sequences share the batch.
//!
//! Backward (standard): D_i = Σ dO_i ⊙ O_i; P_ij = exp(scale·q_i·k_j − lse_i)
//! recomputed from the saved lse; dS = P ⊙ (dO·vᵀ − D); dq = scale·dS·k;
//! dk = scale·dSᵀ·q; dv = Pᵀ·dO.  With a soft-cap c the score is
//! tanh(scale·q·k / c)·c and dS is multiplied by its slope 1 − tanh².  Pass 1 (parallel over queries) gives dq;
//! pass 2 (parallel over keys) gives dk and dv, looping over the query heads
//! of each kv head and over the queries that see the key.
//!
//! This file holds what the three ops share (geometry, the one-row
//! softmax); forward.rs is `attention`, backward.rs `attention_backward`,
//! decode.rs `decode_attention` (new tokens against a KV cache).

mod backward;
mod decode;
mod forward;
#[cfg(test)]
mod tests;

pub(super) use backward::attention_backward;
pub(super) use decode::{decode_attention, decode_attention_batch};
pub(super) use forward::attention;

use super::check_len;
use crate::backend::{AttnShape, Qkv};

/// Dot product with eight fixed accumulation lanes combined in a fixed order
/// (vectorisable and deterministic).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail
}

/// y += a · x
#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Validated geometry of one call.
struct Geo {
    n: usize,
    h: usize,
    kv: usize,
    d: usize,
    group: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    /// (start, end) of the sequence holding each token.
    bounds: Vec<(usize, usize)>,
}

impl Geo {
    fn new(op: &str, cu: &[i32], n_seqs: usize, s: AttnShape) -> Geo {
        assert!(
            s.n_kv_heads > 0 && s.n_heads.is_multiple_of(s.n_kv_heads),
            "{op}: n_heads {} not a multiple of n_kv_heads {}",
            s.n_heads,
            s.n_kv_heads
        );
        if let Some(w) = s.window {
            assert!(w > 0, "{op}: window must be at least 1");
        }
        if let Some(c) = s.softcap {
            assert!(c > 0.0, "{op}: soft-cap {c} must be positive");
        }
        check_len(op, "cu_seqlens", cu.len(), n_seqs + 1);
        assert!(cu[0] == 0, "{op}: cu_seqlens[0] = {} (must be 0)", cu[0]);
        assert!(
            cu[n_seqs] as i64 == s.n as i64,
            "{op}: cu_seqlens[{n_seqs}] = {} but n = {}",
            cu[n_seqs],
            s.n
        );
        let mut bounds = Vec::with_capacity(s.n);
        for w in cu[..=n_seqs].windows(2) {
            assert!(
                w[0] <= w[1],
                "{op}: cu_seqlens not non-decreasing: {} > {}",
                w[0],
                w[1]
            );
            let (a, b) = (w[0] as usize, w[1] as usize);
            bounds.extend(std::iter::repeat_n((a, b), b - a));
        }
        Geo {
            n: s.n,
            h: s.n_heads,
            kv: s.n_kv_heads,
            d: s.head_dim,
            group: s.n_heads / s.n_kv_heads,
            window: s.window,
            scale: s.scale,
            softcap: s.softcap,
            bounds,
        }
    }

    /// Keys visible from query token i: lo..=i.
    fn key_lo(&self, i: usize) -> usize {
        let start = self.bounds[i].0;
        match self.window {
            Some(w) => (i + 1).saturating_sub(w).max(start),
            None => start,
        }
    }

    /// Queries that see key token j: j..hi.
    fn query_hi(&self, j: usize) -> usize {
        let end = self.bounds[j].1;
        match self.window {
            Some(w) => (j + w).min(end),
            None => end,
        }
    }

    fn q_row<'a>(&self, q: &'a [f32], t: usize, head: usize) -> &'a [f32] {
        &q[(t * self.h + head) * self.d..][..self.d]
    }

    fn kv_row<'a>(&self, k: &'a [f32], t: usize, g: usize) -> &'a [f32] {
        &k[(t * self.kv + g) * self.d..][..self.d]
    }

    /// The score scale·(q·k), soft-capped to tanh(·/c)·c when the shape
    /// has a cap (transformers' order of operations): the single definition
    /// used by forward and both backward passes.
    #[inline]
    fn score(&self, q: &[f32], k: &[f32]) -> f32 {
        self.score_and_slope(q, k).0
    }

    /// The score and its derivative with respect to the uncapped score
    /// (1 without a cap).
    #[inline]
    fn score_and_slope(&self, q: &[f32], k: &[f32]) -> (f32, f32) {
        let raw = dot(q, k) * self.scale;
        match self.softcap {
            None => (raw, 1.0),
            Some(c) => {
                let t = (raw / c).tanh();
                (t * c, 1.0 - t * t)
            }
        }
    }
}

/// One query row: o = softmax(scale·q·Kᵀ)·V over the keys `keys` of kv
/// head `kvh` (`row.q` is the query row, `row.k` / `row.v` all keys and
/// values); returns the log-sum-exp. The single row computation of both
/// `attention` and `decode_attention`, so a sequence decoded token by token
/// against its cache reproduces one full `attention` call bit for bit.
fn attend_row(
    g: &Geo,
    row: Qkv<'_, [f32]>,
    kvh: usize,
    keys: std::ops::RangeInclusive<usize>,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) -> f32 {
    let Qkv { q: qi, k, v } = row;
    scores.clear();
    scores.extend(keys.clone().map(|j| g.score(qi, g.kv_row(k, j, kvh))));
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    o.fill(0.0);
    for (j, &p) in keys.zip(scores.iter()) {
        axpy(o, p, g.kv_row(v, j, kvh));
    }
    for x in o.iter_mut() {
        *x /= sum;
    }
    max + sum.ln()
}
