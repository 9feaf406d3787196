//! Buffer helpers of the layer code: a copy of a buffer, and the column
//! blocks of a fused projection's output (split) or gradient (join).

use crate::backend::{Backend, ColsShape};

pub fn clone_buf<B: Backend>(be: &B, src: &B::Buf) -> B::Buf {
    let len = be.len(src);
    let mut dst = be.zeros_like(src);
    be.copy_slice(src, 0, &mut dst, 0, len);
    dst
}

/// Column blocks [widths...] of a fused [rows, Σ widths] output.
pub(super) fn split_cols<B: Backend>(be: &B, fused: &B::Buf, rows: usize, widths: &[usize]) -> Vec<B::Buf> {
    let total: usize = widths.iter().sum();
    let mut off = 0;
    widths
        .iter()
        .map(|&w| {
            let mut part = be.zeros(rows * w);
            be.copy_cols(fused, &mut part, ColsShape { rows, src_cols: total, src_off: off, dst_cols: w, dst_off: 0, width: w });
            off += w;
            part
        })
        .collect()
}

/// The fused [rows, Σ widths] gradient from its column blocks.
pub(super) fn join_cols<B: Backend>(be: &B, parts: &[&B::Buf], rows: usize, widths: &[usize]) -> B::Buf {
    let total: usize = widths.iter().sum();
    let mut fused = be.zeros(rows * total);
    let mut off = 0;
    for (part, &w) in parts.iter().zip(widths) {
        be.copy_cols(part, &mut fused, ColsShape { rows, src_cols: w, src_off: 0, dst_cols: total, dst_off: off, width: w });
        off += w;
    }
    fused
}
