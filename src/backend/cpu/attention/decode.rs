//! `decode_attention`: the newest tokens of one sequence against its KV
//! cache, through the same row computation as `attention`.

use rayon::prelude::*;

use super::{Geo, attend_row};
use crate::backend::cpu::check_len;
use crate::backend::{AttnShape, Qkv};

/// The newest `shape.n` tokens of one sequence (positions past..past+n)
/// against its cache of past+n keys and values; see `Backend::decode_attention`.
pub(crate) fn decode_attention(
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
        attend_row(&g, Qkv { q: g.q_row(q, i, head), k: k_cache, v: v_cache }, head / g.group, g.key_lo(t)..=t, scores, o);
    });
}

/// One new token in each of `shape.n` sequences against its own region of
/// the batched cache; see `Backend::decode_attention_batch`. Each sequence
/// goes through `decode_attention`'s row computation, so a batch decodes
/// exactly as its sequences one at a time.
pub(crate) fn decode_attention_batch(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    positions: &[i32],
    capacity: usize,
    shape: AttnShape,
    out: &mut [f32],
) {
    const OP: &str = "decode_attention_batch";
    let (n, h, d, kv) = (shape.n, shape.n_heads, shape.head_dim, shape.n_kv_heads);
    check_len(OP, "positions", positions.len(), n);
    check_len(OP, "q", q.len(), n * h * d);
    check_len(OP, "out", out.len(), n * h * d);
    check_len(OP, "k_cache", k_cache.len(), n * capacity * kv * d);
    check_len(OP, "v_cache", v_cache.len(), n * capacity * kv * d);
    if n == 0 || h == 0 || d == 0 {
        return;
    }
    out[..n * h * d].par_chunks_mut(h * d).enumerate().for_each(|(s, o)| {
        let p = usize::try_from(positions[s]).ok().filter(|&p| p < capacity);
        let p = p.unwrap_or_else(|| panic!("{OP}: position {} of sequence {s} is outside the capacity {capacity}", positions[s]));
        let rows = (s * capacity * kv * d)..((s * capacity + p + 1) * kv * d);
        let one = AttnShape { n: 1, max_seqlen: 1, ..shape };
        decode_attention(&q[s * h * d..(s + 1) * h * d], &k_cache[rows.clone()], &v_cache[rows], p, one, o);
    });
}
