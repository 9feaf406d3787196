//! `attention`: every query row of the varlen batch, one task per token.

use rayon::prelude::*;

use super::{Geo, attend_row};
use crate::backend::cpu::check_len;
use crate::backend::{AttnShape, Qkv, Varlen};

pub(crate) fn attention(qkv: Qkv<'_, [f32]>, seqs: Varlen<'_, [i32]>, shape: AttnShape, out: &mut [f32], lse: &mut [f32]) {
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
                    lse_t[head] = attend_row(&g, Qkv { q: g.q_row(q, i, head), k, v }, head / g.group, lo..=i, scores, o);
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
