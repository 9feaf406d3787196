//! Causal (optionally sliding-window) GQA attention over the varlen batch.
//!
//! Every query row is computed by one task (forward and dq), every key row by
//! one task (dk, dv); all dot products and sums run in a fixed order, so the
//! results do not depend on the thread count, and a sequence's results do not
//! depend on which other sequences share the batch.
//!
//! Backward (standard): D_i = Σ dO_i ⊙ O_i; P_ij = exp(scale·q_i·k_j − lse_i)
//! recomputed from the saved lse; dS = P ⊙ (dO·vᵀ − D); dq = scale·dS·k;
//! dk = scale·dSᵀ·q; dv = Pᵀ·dO.  Pass 1 (parallel over queries) gives dq;
//! pass 2 (parallel over keys) gives dk and dv, looping over the query heads
//! of each kv head and over the queries that see the key.

use rayon::prelude::*;

use super::check_len;
use crate::backend::{AttnSaved, AttnShape, Qkv, QkvGrads, Varlen};

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

    /// The score scale·(q·k): the single definition used by forward and both
    /// backward passes.
    #[inline]
    fn score(&self, q: &[f32], k: &[f32]) -> f32 {
        dot(q, k) * self.scale
    }
}

/// One query row: o = softmax(scale·q·Kᵀ)·V over the keys `keys` of kv
/// head `kvh`; returns the log-sum-exp. The single row computation of both
/// `attention` and `decode_attention`, so a sequence decoded token by token
/// against its cache reproduces one full `attention` call bit for bit.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    g: &Geo,
    qi: &[f32],
    k: &[f32],
    v: &[f32],
    kvh: usize,
    keys: std::ops::RangeInclusive<usize>,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) -> f32 {
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

pub(super) fn attention(qkv: Qkv<'_, [f32]>, seqs: Varlen<'_, [i32]>, shape: AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let Qkv { q, k, v } = qkv;
    let Varlen { cu_seqlens: cu, n_seqs } = seqs;
    const OP: &str = "attention";
    let g = Geo::new(OP, cu, n_seqs, shape);
    let (n, h, d) = (g.n, g.h, g.d);
    check_len(OP, "q", q.len(), n * h * d);
    check_len(OP, "k", k.len(), n * g.kv * d);
    check_len(OP, "v", v.len(), n * g.kv * d);
    check_len(OP, "out", out.len(), n * h * d);
    check_len(OP, "lse", lse.len(), h * n);
    if n == 0 || h == 0 {
        return;
    }
    // lse is [heads, n]; computed token-major, then transposed.
    let mut lse_tm = vec![0.0f32; n * h];
    if d == 0 {
        // Empty heads: every score is 0, so lse = ln(#keys), out is empty.
        for (i, l) in lse_tm.chunks_mut(h).enumerate() {
            l.fill(((i + 1 - g.key_lo(i)) as f32).ln());
        }
    } else {
        out[..n * h * d]
            .par_chunks_mut(h * d)
            .zip(lse_tm.par_chunks_mut(h))
            .enumerate()
            .for_each_init(Vec::new, |scores: &mut Vec<f32>, (i, (o_t, lse_t))| {
                let lo = g.key_lo(i);
                for head in 0..h {
                    let o = &mut o_t[head * d..(head + 1) * d];
                    lse_t[head] = attend_row(&g, g.q_row(q, i, head), k, v, head / g.group, lo..=i, scores, o);
                }
            });
    }
    lse[..h * n]
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(head, l)| {
            for (t, l) in l.iter_mut().enumerate() {
                *l = lse_tm[t * h + head];
            }
        });
}

/// The newest `shape.n` tokens of one sequence (positions past..past+n)
/// against its cache of past+n keys and values; see `Backend::decode_attention`.
pub(super) fn decode_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    past: usize,
    shape: AttnShape,
    out: &mut [f32],
) {
    const OP: &str = "decode_attention";
    let total = past + shape.n;
    // The cache as a single sequence of `total` tokens; query i is token past+i.
    let g = Geo::new(OP, &[0, total as i32], 1, AttnShape { n: total, ..shape });
    let (n, h, d) = (shape.n, g.h, g.d);
    check_len(OP, "q", q.len(), n * h * d);
    check_len(OP, "k_cache", k_cache.len(), total * g.kv * d);
    check_len(OP, "v_cache", v_cache.len(), total * g.kv * d);
    check_len(OP, "out", out.len(), n * h * d);
    if n == 0 || h == 0 || d == 0 {
        return;
    }
    out[..n * h * d].par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (row, o)| {
        let (i, head) = (row / h, row % h);
        let t = past + i;
        attend_row(&g, g.q_row(q, i, head), k_cache, v_cache, head / g.group, g.key_lo(t)..=t, scores, o);
    });
}

pub(super) fn attention_backward(
    dout: &[f32],
    qkv: Qkv<'_, [f32]>,
    saved: AttnSaved<'_, [f32]>,
    seqs: Varlen<'_, [i32]>,
    shape: AttnShape,
    grads: QkvGrads<'_, [f32]>,
) {
    let Qkv { q, k, v } = qkv;
    let AttnSaved { out, lse } = saved;
    let Varlen { cu_seqlens: cu, n_seqs } = seqs;
    let QkvGrads { dq, dk, dv } = grads;
    const OP: &str = "attention_backward";
    let g = Geo::new(OP, cu, n_seqs, shape);
    let (n, h, kv, d) = (g.n, g.h, g.kv, g.d);
    for (name, len, need) in [
        ("dout", dout.len(), n * h * d),
        ("q", q.len(), n * h * d),
        ("k", k.len(), n * kv * d),
        ("v", v.len(), n * kv * d),
        ("out", out.len(), n * h * d),
        ("lse", lse.len(), h * n),
        ("dq", dq.len(), n * h * d),
        ("dk", dk.len(), n * kv * d),
        ("dv", dv.len(), n * kv * d),
    ] {
        check_len(OP, name, len, need);
    }
    if n == 0 || h == 0 || d == 0 {
        return;
    }
    // D[i, head] = dO_i · O_i
    let mut dd = vec![0.0f32; n * h];
    dd.par_chunks_mut(h).enumerate().for_each(|(i, dd_t)| {
        for (head, x) in dd_t.iter_mut().enumerate() {
            *x = dot(g.q_row(dout, i, head), g.q_row(out, i, head));
        }
    });
    let dd = &dd;
    // P_ij and dS_ij for query (i, head) and key j of kv head kvh.
    let p_ds = |i: usize, head: usize, j: usize, kvh: usize| -> (f32, f32) {
        let s = g.score(g.q_row(q, i, head), g.kv_row(k, j, kvh));
        let p = (s - lse[head * n + i]).exp();
        let dp = dot(g.q_row(dout, i, head), g.kv_row(v, j, kvh));
        (p, p * (dp - dd[i * h + head]))
    };

    // Pass 1: dq, one task per query token.
    dq[..n * h * d]
        .par_chunks_mut(h * d)
        .enumerate()
        .for_each(|(i, dq_t)| {
            dq_t.fill(0.0);
            let lo = g.key_lo(i);
            for head in 0..h {
                let kvh = head / g.group;
                let dqi = &mut dq_t[head * d..(head + 1) * d];
                for j in lo..=i {
                    let (_, ds) = p_ds(i, head, j, kvh);
                    axpy(dqi, g.scale * ds, g.kv_row(k, j, kvh));
                }
            }
        });

    // Pass 2: dk and dv, one task per key token.
    dk[..n * kv * d]
        .par_chunks_mut(kv * d)
        .zip(dv[..n * kv * d].par_chunks_mut(kv * d))
        .enumerate()
        .for_each(|(j, (dk_t, dv_t))| {
            dk_t.fill(0.0);
            dv_t.fill(0.0);
            let hi = g.query_hi(j);
            for kvh in 0..kv {
                let dkj = &mut dk_t[kvh * d..(kvh + 1) * d];
                let dvj = &mut dv_t[kvh * d..(kvh + 1) * d];
                for head in kvh * g.group..(kvh + 1) * g.group {
                    for i in j..hi {
                        let (p, ds) = p_ds(i, head, j, kvh);
                        axpy(dkj, g.scale * ds, g.q_row(q, i, head));
                        axpy(dvj, p, g.q_row(dout, i, head));
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{
        Rng, assert_bits_eq, assert_close, dot64, fd_grad, to64, with_threads,
    };
    use crate::backend::{AttnSaved, AttnShape, Backend, Qkv, QkvGrads, Varlen};

    /// Naive f64 attention: returns (out [n, h, d], lse [h, n]).
    fn attn64(q: &[f64], k: &[f64], v: &[f64], cu: &[i32], s: AttnShape) -> (Vec<f64>, Vec<f64>) {
        let (n, h, kv, d) = (s.n, s.n_heads, s.n_kv_heads, s.head_dim);
        let mut out = vec![0.0; n * h * d];
        let mut lse = vec![0.0; h * n];
        for w in cu.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            for i in a..b {
                for head in 0..h {
                    let g = head / (h / kv);
                    let keys: Vec<usize> = (a..=i)
                        .filter(|&j| s.window.is_none_or(|w| i - j < w))
                        .collect();
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            s.scale as f64
                                * (0..d)
                                    .map(|x| q[(i * h + head) * d + x] * k[(j * kv + g) * d + x])
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                    lse[head * n + i] = m + z.ln();
                    for (&j, s) in keys.iter().zip(&sc) {
                        let p = (s - m).exp() / z;
                        for x in 0..d {
                            out[(i * h + head) * d + x] += p * v[(j * kv + g) * d + x];
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    fn shape(n: usize, window: Option<usize>) -> AttnShape {
        let d = 8;
        AttnShape {
            n,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: d,
            window,
            scale: 1.0 / (d as f32).sqrt(),
            max_seqlen: 0,
        }
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        cu: Vec<i32>,
        s: AttnShape,
    }

    fn case(seed: u64, lens: &[usize], window: Option<usize>) -> Case {
        let mut rng = Rng::new(seed);
        let n: usize = lens.iter().sum();
        let s = shape(n, window);
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + *l as i32);
        }
        // Amplitude 2 so the softmax is far from uniform.
        Case {
            q: rng.vec(n * s.n_heads * s.head_dim, 2.0),
            k: rng.vec(n * s.n_kv_heads * s.head_dim, 2.0),
            v: rng.vec(n * s.n_kv_heads * s.head_dim, 1.0),
            cu,
            s,
        }
    }

    fn fwd(c: &Case) -> (Vec<f32>, Vec<f32>) {
        let be = CpuBackend::new();
        let mut out = vec![f32::NAN; c.s.n * c.s.n_heads * c.s.head_dim];
        let mut lse = vec![f32::NAN; c.s.n * c.s.n_heads];
        let seqs = Varlen { cu_seqlens: &c.cu, n_seqs: c.cu.len() - 1 };
        be.attention(Qkv { q: &c.q, k: &c.k, v: &c.v }, seqs, c.s, &mut out, &mut lse);
        (out, lse)
    }

    fn bwd(c: &Case, dout: &[f32], out: &[f32], lse: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (dout, out, lse) = (dout.to_vec(), out.to_vec(), lse.to_vec());
        bwd_impl(c, &dout, &out, &lse)
    }

    fn bwd_impl(
        c: &Case,
        dout: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let be = CpuBackend::new();
        let mut dq = vec![f32::NAN; c.q.len()];
        let mut dk = vec![f32::NAN; c.k.len()];
        let mut dv = vec![f32::NAN; c.v.len()];
        be.attention_backward(
            dout,
            Qkv { q: &c.q, k: &c.k, v: &c.v },
            AttnSaved { out, lse },
            Varlen { cu_seqlens: &c.cu, n_seqs: c.cu.len() - 1 },
            c.s,
            QkvGrads { dq: &mut dq, dk: &mut dk, dv: &mut dv },
        );
        (dq, dk, dv)
    }

    #[test]
    fn attention_forward_matches_naive() {
        for window in [None, Some(2), Some(3), Some(100)] {
            let c = case(50, &[5, 3], window);
            let (out, lse) = fwd(&c);
            let (o64, l64) = attn64(&to64(&c.q), &to64(&c.k), &to64(&c.v), &c.cu, c.s);
            // f32 dot products / softmax over <= 5 keys: 1e-5 relative.
            assert_close("attn out", &out, &o64, 1e-5);
            assert_close("attn lse", &lse, &l64, 1e-5);
        }
    }

    #[test]
    fn attention_backward_matches_fd() {
        // GQA 4 query heads over 2 kv heads, two sequences of different
        // lengths; full causal and a window shorter than the sequences.
        for window in [None, Some(2)] {
            let c = case(51, &[5, 3], window);
            let (out, lse) = fwd(&c);
            let rr = Rng::new(52).vec(out.len(), 1.0);
            let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
            let (q64, k64, v64, r64) = (to64(&c.q), to64(&c.k), to64(&c.v), to64(&rr));
            let l = |q: &[f64], k: &[f64], v: &[f64]| dot64(&attn64(q, k, v, &c.cu, c.s).0, &r64);
            // L = Σ out ⊙ R, central FD in f64 with h = 1e-6 (truncation
            // ~1e-12, rounding ~1e-10); the f32 backward is held to 1e-5
            // relative to each gradient tensor's magnitude.
            let gq = fd_grad(&q64, 1e-6, |q| l(q, &k64, &v64));
            let gk = fd_grad(&k64, 1e-6, |k| l(&q64, k, &v64));
            let gv = fd_grad(&v64, 1e-6, |v| l(&q64, &k64, v));
            assert_close(&format!("dq {window:?}"), &dq, &gq, 1e-5);
            assert_close(&format!("dk {window:?}"), &dk, &gk, 1e-5);
            assert_close(&format!("dv {window:?}"), &dv, &gv, 1e-5);
        }
    }

    #[test]
    fn varlen_batch_equals_each_sequence_alone() {
        for window in [None, Some(3)] {
            let c = case(53, &[6, 4], window);
            let (out, lse) = fwd(&c);
            let rr = Rng::new(54).vec(out.len(), 1.0);
            let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
            let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
            for w in c.cu.windows(2) {
                let (a, b) = (w[0] as usize, w[1] as usize);
                let len = b - a;
                let solo = Case {
                    q: c.q[a * h * d..b * h * d].to_vec(),
                    k: c.k[a * kv * d..b * kv * d].to_vec(),
                    v: c.v[a * kv * d..b * kv * d].to_vec(),
                    cu: vec![0, len as i32],
                    s: shape(len, window),
                };
                let (o1, l1) = fwd(&solo);
                assert_bits_eq("out", &o1, &out[a * h * d..b * h * d]);
                for head in 0..h {
                    assert_bits_eq(
                        "lse",
                        &l1[head * len..(head + 1) * len],
                        &lse[head * c.s.n + a..head * c.s.n + b],
                    );
                }
                let (dq1, dk1, dv1) = bwd(&solo, &rr[a * h * d..b * h * d], &o1, &l1);
                assert_bits_eq("dq", &dq1, &dq[a * h * d..b * h * d]);
                assert_bits_eq("dk", &dk1, &dk[a * kv * d..b * kv * d]);
                assert_bits_eq("dv", &dv1, &dv[a * kv * d..b * kv * d]);
            }
        }
    }

    #[test]
    fn window_masks_exactly_the_old_keys() {
        // One sequence of 7, window 3: query i sees keys i-2..=i only.
        let w = 3;
        let c = case(55, &[7], Some(w));
        let (out, _) = fwd(&c);
        let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
        let j = 2; // perturb key/value token 2 (both kv heads)
        let mut c2 = case(55, &[7], Some(w));
        for x in &mut c2.k[j * kv * d..(j + 1) * kv * d] {
            *x += 1.0;
        }
        for x in &mut c2.v[j * kv * d..(j + 1) * kv * d] {
            *x -= 1.0;
        }
        let (out2, _) = fwd(&c2);
        for i in 0..7 {
            let (r1, r2) = (
                &out[i * h * d..(i + 1) * h * d],
                &out2[i * h * d..(i + 1) * h * d],
            );
            let sees = j <= i && i - j < w;
            if sees {
                assert!(r1 != r2, "query {i} should see key {j}");
            } else {
                assert_bits_eq(&format!("query {i} must not see key {j}"), r1, r2);
            }
        }
        // Window 1: each query sees only itself, so out = v of its kv head.
        let c1 = case(56, &[4, 3], Some(1));
        let (out1, lse1) = fwd(&c1);
        for i in 0..7 {
            for head in 0..h {
                let g = head / (h / kv);
                assert_eq!(
                    &out1[(i * h + head) * d..][..d],
                    &c1.v[(i * kv + g) * d..][..d]
                );
            }
        }
        // lse = the single score.
        let (q64, k64) = (to64(&c1.q), to64(&c1.k));
        for i in 0..7 {
            let s: f64 = (0..d)
                .map(|x| q64[i * h * d + x] * k64[i * kv * d + x])
                .sum::<f64>()
                * c1.s.scale as f64;
            assert!((lse1[i] as f64 - s).abs() < 1e-5);
        }
    }

    /// The outputs of queries past..past+n of `c` (one sequence) by
    /// decode_attention over the cache holding its first past+n tokens.
    fn decode(c: &Case, past: usize, n: usize) -> Vec<f32> {
        let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
        let total = past + n;
        // A cache longer than needed, its tail poisoned: only 0..past+n may be read.
        let cap = total + 3;
        let mut kc = vec![f32::NAN; cap * kv * d];
        let mut vc = vec![f32::NAN; cap * kv * d];
        kc[..total * kv * d].copy_from_slice(&c.k[..total * kv * d]);
        vc[..total * kv * d].copy_from_slice(&c.v[..total * kv * d]);
        let q = c.q[past * h * d..total * h * d].to_vec();
        let mut out = vec![f32::NAN; n * h * d];
        CpuBackend::new().decode_attention(&q, &kc, &vc, past, AttnShape { n, ..c.s }, &mut out);
        out
    }

    #[test]
    fn prefill_then_decode_equals_one_prefill() {
        // One sequence of 11 (GQA 4/2): attention over all of it, against a
        // prefix of `first` tokens by attention and the rest by
        // decode_attention in steps of `step` tokens. Same row computation,
        // so the outputs agree bit for bit.
        let len = 11;
        for window in [None, Some(1), Some(3), Some(20)] {
            let c = case(58, &[len], window);
            let (full, _) = fwd(&c);
            let (h, kv, d) = (c.s.n_heads, c.s.n_kv_heads, c.s.head_dim);
            for (first, step) in [(1, 1), (4, 1), (5, 3), (0, 11), (0, 2)] {
                let mut got = Vec::new();
                if first > 0 {
                    let prefix = Case {
                        q: c.q[..first * h * d].to_vec(),
                        k: c.k[..first * kv * d].to_vec(),
                        v: c.v[..first * kv * d].to_vec(),
                        cu: vec![0, first as i32],
                        s: AttnShape { n: first, ..c.s },
                    };
                    got.extend(fwd(&prefix).0);
                }
                let mut past = first;
                while past < len {
                    let n = step.min(len - past);
                    got.extend(decode(&c, past, n));
                    past += n;
                }
                assert_bits_eq(&format!("window {window:?}, prefill {first}, decode by {step}"), &got, &full);
            }
        }
    }

    #[test]
    fn decode_attention_matches_naive() {
        // Independent of the shared row code: the last 3 queries of a
        // sequence of 9 against the f64 reference.
        for window in [None, Some(4)] {
            let c = case(59, &[9], window);
            let (o64, _) = attn64(&to64(&c.q), &to64(&c.k), &to64(&c.v), &c.cu, c.s);
            let row = c.s.n_heads * c.s.head_dim;
            assert_close("decode out", &decode(&c, 6, 3), &o64[6 * row..], 1e-5);
        }
    }

    #[test]
    fn attention_backward_is_deterministic() {
        // Bigger case so rayon actually splits the work.
        let mut rng = Rng::new(57);
        let lens = [37usize, 64, 27];
        let n: usize = lens.iter().sum();
        let s = AttnShape {
            n,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            window: Some(20),
            scale: 0.25,
            max_seqlen: 64,
        };
        let mut cu = vec![0i32];
        for l in lens {
            cu.push(cu.last().unwrap() + l as i32);
        }
        let c = Case {
            q: rng.vec(n * 4 * 16, 1.0),
            k: rng.vec(n * 2 * 16, 1.0),
            v: rng.vec(n * 2 * 16, 1.0),
            cu,
            s,
        };
        let rr = rng.vec(n * 4 * 16, 1.0);
        let run = |threads| {
            with_threads(threads, || {
                let (out, lse) = fwd(&c);
                let (dq, dk, dv) = bwd(&c, &rr, &out, &lse);
                [out, lse, dq, dk, dv]
            })
        };
        let a = run(1);
        let b = run(3);
        let b2 = run(3);
        for t in 0..5 {
            assert_bits_eq("1 vs 3 threads", &a[t], &b[t]);
            assert_bits_eq("run to run", &b[t], &b2[t]);
        }
    }
}
