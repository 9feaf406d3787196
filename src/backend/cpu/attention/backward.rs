//! `attention_backward`: dq per query row, then dk and dv per key row (see
//! the module docs of `attention` for the two passes).

use rayon::prelude::*;

use super::{Geo, axpy, dot};
use crate::backend::cpu::check_len;
use crate::backend::{AttnSaved, AttnShape, Qkv, QkvGrads, Varlen};

pub(crate) fn attention_backward(
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
        let (s, slope) = g.score_and_slope(g.q_row(q, i, head), g.kv_row(k, j, kvh));
        let p = (s - lse[head * n + i]).exp();
        let dp = dot(g.q_row(dout, i, head), g.kv_row(v, j, kvh));
        (p, p * (dp - dd[i * h + head]) * slope)
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
