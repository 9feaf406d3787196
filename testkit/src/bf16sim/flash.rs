//! Host flash attention with the tensor-core kernels' roundings (used by
//! `Bf16Sim::with_flash_attention`).
//!
//! The semantics of cuda/flash_attn.cu's d64 / d128 kernels, in f32 on the
//! host: scores and sums in f32 from bf16 inputs; P rounded to bf16 before
//! O += P·V (the row sum l uses the unrounded P); in the backward P is
//! recomputed from lse, dS = P ⊙ (dP − dsum), and P (for dV) and dS (for dQ,
//! dK) are rounded to bf16 before their products. One difference: the kernel
//! rounds P relative to the running maximum of the key tiles seen so far, the
//! host relative to the row's final maximum (same rounding statistics; the
//! individual roundings differ). A soft-capped shape caps each score to
//! tanh(s/c)·c before the softmax and multiplies dS by 1 − tanh² before its
//! rounding, as the kernels' capped twins do.

use super::round_bf16;
use ferrotune::backend::{AttnSaved, AttnShape, Qkv, Varlen};
use rayon::prelude::*;

/// For each token, (start, end) of its sequence.
fn bounds(cu: &[i32], n_seqs: usize, n: usize) -> Vec<(usize, usize)> {
    let mut b = vec![(0, 0); n];
    for s in 0..n_seqs {
        let (s0, s1) = (cu[s] as usize, cu[s + 1] as usize);
        b[s0..s1].iter_mut().for_each(|x| *x = (s0, s1));
    }
    b
}

/// First key visible to query t (keys lo..=t).
fn first_key(t: usize, start: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => start.max((t + 1).saturating_sub(w)),
        None => start,
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The score scale·(q·k), soft-capped with the shape's cap, and its slope
/// with respect to the uncapped score (1 without a cap).
fn score(q: &[f32], k: &[f32], s: &AttnShape) -> (f32, f32) {
    let raw = dot(q, k) * s.scale;
    match s.softcap {
        None => (raw, 1.0),
        Some(c) => {
            let th = (raw / c).tanh();
            (th * c, 1.0 - th * th)
        }
    }
}

/// (out [n, nh, d] rounded to bf16, lse [nh, n]).
pub(super) fn forward(qkv: Qkv<'_, [f32]>, seqs: Varlen<'_, [i32]>, s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (Qkv { q, k, v }, Varlen { cu_seqlens: cu, n_seqs }) = (qkv, seqs);
    let (n, nh, nkv, d) = (s.n, s.n_heads, s.n_kv_heads, s.head_dim);
    let group = nh / nkv;
    let bd = bounds(cu, n_seqs, n);
    let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..n)
        .into_par_iter()
        .map(|t| {
            let lo = first_key(t, bd[t].0, s.window);
            let mut out = vec![0.0f32; nh * d];
            let mut lse = vec![0.0f32; nh];
            for h in 0..nh {
                let (qr, kvh) = (&q[(t * nh + h) * d..][..d], h / group);
                let sc: Vec<f32> = (lo..=t).map(|j| score(qr, &k[(j * nkv + kvh) * d..][..d], s).0).collect();
                let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f32> = sc.iter().map(|&x| (x - mx).exp()).collect();
                let l: f32 = p.iter().sum();
                let o = &mut out[h * d..][..d];
                for (jj, j) in (lo..=t).enumerate() {
                    let pr = round_bf16(p[jj]); // bf16: P before P·V.
                    let vr = &v[(j * nkv + kvh) * d..][..d];
                    o.iter_mut().zip(vr).for_each(|(o, &v)| *o += pr * v);
                }
                let inv = 1.0 / l;
                o.iter_mut().for_each(|x| *x = round_bf16(*x * inv)); // bf16: out stored.
                lse[h] = mx + l.ln();
            }
            (out, lse)
        })
        .collect();
    let mut out = Vec::with_capacity(n * nh * d);
    let mut lse = vec![0.0f32; nh * n];
    for (t, (o, l)) in rows.into_iter().enumerate() {
        out.extend(o);
        (0..nh).for_each(|h| lse[h * n + t] = l[h]);
    }
    (out, lse)
}

/// (dq, dk, dv), each rounded to bf16.
pub(super) fn backward(
    dout: &[f32],
    qkv: Qkv<'_, [f32]>,
    saved: AttnSaved<'_, [f32]>,
    seqs: Varlen<'_, [i32]>,
    s: &AttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (Qkv { q, k, v }, AttnSaved { out, lse }) = (qkv, saved);
    let Varlen { cu_seqlens: cu, n_seqs } = seqs;
    let (n, nh, nkv, d) = (s.n, s.n_heads, s.n_kv_heads, s.head_dim);
    let group = nh / nkv;
    let bd = bounds(cu, n_seqs, n);
    // Elements of row (token t, head h) of a [n, heads, d] tensor.
    let row = |t: usize, heads: usize, h: usize| (t * heads + h) * d..(t * heads + h + 1) * d;
    // dsum[h*n + t] = Σ dout·out, f32.
    let mut dsum = vec![0.0f32; nh * n];
    for t in 0..n {
        for h in 0..nh {
            dsum[h * n + t] = dot(&dout[row(t, nh, h)], &out[row(t, nh, h)]);
        }
    }
    // P and dS of (query t, head h, key j).
    let p_ds = |t: usize, h: usize, j: usize| -> (f32, f32) {
        let kvh = h / group;
        let (sc, slope) = score(&q[row(t, nh, h)], &k[row(j, nkv, kvh)], s);
        let p = (sc - lse[h * n + t]).exp();
        let dp = dot(&dout[row(t, nh, h)], &v[row(j, nkv, kvh)]);
        (p, p * (dp - dsum[h * n + t]) * slope)
    };
    let dq: Vec<f32> = (0..n)
        .into_par_iter()
        .flat_map_iter(|t| {
            let lo = first_key(t, bd[t].0, s.window);
            let mut acc = vec![0.0f32; nh * d];
            for h in 0..nh {
                let a = &mut acc[h * d..][..d];
                for j in lo..=t {
                    let ds = round_bf16(p_ds(t, h, j).1); // bf16: dS before dS·K.
                    a.iter_mut().zip(&k[row(j, nkv, h / group)]).for_each(|(a, &kk)| *a += ds * kk);
                }
                a.iter_mut().for_each(|x| *x = round_bf16(*x * s.scale)); // bf16: dq stored.
            }
            acc
        })
        .collect();
    let dkdv: Vec<(Vec<f32>, Vec<f32>)> = (0..n)
        .into_par_iter()
        .map(|j| {
            let end = bd[j].1;
            let hi = match s.window {
                Some(w) => end.min(j.saturating_add(w)),
                None => end,
            };
            let (mut ak, mut av) = (vec![0.0f32; nkv * d], vec![0.0f32; nkv * d]);
            for kvh in 0..nkv {
                let (ak, av) = (&mut ak[kvh * d..][..d], &mut av[kvh * d..][..d]);
                for h in kvh * group..(kvh + 1) * group {
                    for t in j..hi {
                        let (p, ds) = p_ds(t, h, j);
                        // bf16: P before Pᵀ·dO, dS before dSᵀ·Q.
                        let (p, ds) = (round_bf16(p), round_bf16(ds));
                        ak.iter_mut().zip(&q[row(t, nh, h)]).for_each(|(a, &x)| *a += ds * x);
                        av.iter_mut().zip(&dout[row(t, nh, h)]).for_each(|(a, &x)| *a += p * x);
                    }
                }
                ak.iter_mut().for_each(|x| *x = round_bf16(*x * s.scale)); // bf16: dk stored.
                av.iter_mut().for_each(|x| *x = round_bf16(*x)); // bf16: dv stored.
            }
            (ak, av)
        })
        .collect();
    let (mut dk, mut dv) = (Vec::with_capacity(n * nkv * d), Vec::with_capacity(n * nkv * d));
    for (a, b) in dkdv {
        dk.extend(a);
        dv.extend(b);
    }
    (dq, dk, dv)
}
