//! RMSNorm (frozen weight) forward and input gradient.
//!
//! Precision: the per-row sum of squares (and the backward's Σ (w⊙dy)⊙x) is
//! accumulated sequentially in f64; the mean is cast to f32 and
//! `inv = 1 / sqrt(mean + eps)` is computed in f32 (as torch's float path
//! does with the f32 variance); the elementwise products are f32. With
//! `plus_one` the scale is (1 + w), formed in f32 (Gemma).

use rayon::prelude::*;

use super::check_len;
use crate::backend::NormShape;

pub(super) fn rmsnorm(x: &[f32], w: &[f32], y: &mut [f32], inv_rms: &mut [f32], shape: NormShape, eps: f32) {
    let NormShape { rows, hidden, plus_one } = shape;
    check_len("rmsnorm", "x", x.len(), rows * hidden);
    check_len("rmsnorm", "w", w.len(), hidden);
    check_len("rmsnorm", "y", y.len(), rows * hidden);
    check_len("rmsnorm", "inv_rms", inv_rms.len(), rows);
    if rows == 0 || hidden == 0 {
        return;
    }
    let w = &scale_of(w, hidden, plus_one);
    y[..rows * hidden]
        .par_chunks_mut(hidden)
        .zip(x[..rows * hidden].par_chunks(hidden))
        .zip(inv_rms[..rows].par_iter_mut())
        .for_each(|((y, x), inv_out)| {
            let ss = x
                .iter()
                .fold(0.0f64, |acc, &v| acc + (v as f64) * (v as f64));
            let mean = (ss / hidden as f64) as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            *inv_out = inv;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = (x * inv) * w;
            }
        });
}

/// The per-column scale: w, or 1 + w.
fn scale_of(w: &[f32], hidden: usize, plus_one: bool) -> Vec<f32> {
    w[..hidden].iter().map(|&w| if plus_one { 1.0 + w } else { w }).collect()
}

/// dx += inv·(w⊙dy) − x·inv³·mean((w⊙dy)⊙x), per row.
pub(super) fn rmsnorm_backward(dy: &[f32], x: &[f32], w: &[f32], inv_rms: &[f32], dx: &mut [f32], shape: NormShape) {
    let NormShape { rows, hidden, plus_one } = shape;
    const OP: &str = "rmsnorm_backward";
    check_len(OP, "dy", dy.len(), rows * hidden);
    check_len(OP, "x", x.len(), rows * hidden);
    check_len(OP, "w", w.len(), hidden);
    check_len(OP, "inv_rms", inv_rms.len(), rows);
    check_len(OP, "dx", dx.len(), rows * hidden);
    if rows == 0 || hidden == 0 {
        return;
    }
    let w = &scale_of(w, hidden, plus_one);
    dx[..rows * hidden]
        .par_chunks_mut(hidden)
        .zip(dy[..rows * hidden].par_chunks(hidden))
        .zip(x[..rows * hidden].par_chunks(hidden))
        .zip(inv_rms[..rows].par_iter())
        .for_each(|(((dx, dy), x), &inv)| {
            let dot = dy.iter().zip(w).zip(x).fold(0.0f64, |acc, ((&g, &w), &x)| {
                acc + ((w * g) as f64) * (x as f64)
            });
            let inv64 = inv as f64;
            let c = (inv64 * inv64 * inv64 * dot / hidden as f64) as f32;
            for (((dx, &g), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += inv * (w * g) - x * c;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{Rng, assert_close, dot64, fd_grad, to64};
    use crate::backend::{Backend, NormShape};

    fn rmsnorm64(x: &[f64], w: &[f64], rows: usize, h: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; rows * h];
        let mut invs = vec![0.0; rows];
        for r in 0..rows {
            let row = &x[r * h..(r + 1) * h];
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
            invs[r] = inv;
            for j in 0..h {
                y[r * h + j] = row[j] * inv * w[j];
            }
        }
        (y, invs)
    }

    #[test]
    fn rmsnorm_forward_and_backward() {
        // Plain (w) and Gemma's (1 + w), whose weights sit around zero.
        for plus_one in [false, true] {
            let be = CpuBackend::new();
            let mut rng = Rng::new(30);
            let (rows, h, eps) = (5, 24, 1e-5f32);
            let x = rng.vec(rows * h, 2.0);
            let w: Vec<f32> = rng.vec(h, 1.0).iter().map(|v| if plus_one { v * 0.5 } else { 1.0 + v * 0.5 }).collect();
            let rr = rng.vec(rows * h, 1.0);
            let shape = NormShape { rows, hidden: h, plus_one };
            let (mut y, mut inv) = (vec![f32::NAN; rows * h], vec![f32::NAN; rows]);
            be.rmsnorm(&x, &be.weight_from_f32(&w), &mut y, &mut inv, shape, eps);
            let x64 = to64(&x);
            let w64: Vec<f64> = w.iter().map(|&v| if plus_one { 1.0 + v as f64 } else { v as f64 }).collect();
            let (y64, inv64) = rmsnorm64(&x64, &w64, rows, h, eps as f64);
            // f32 rounding of a handful of ops: 1e-6 relative.
            assert_close("rmsnorm y", &y, &y64, 1e-6);
            assert_close("rmsnorm inv", &inv, &inv64, 1e-6);

            // Backward accumulates onto dx0; FD in f64 with h = 1e-6, tolerance
            // 1e-5 relative (f32 backward vs exact gradient).
            let dx0 = rng.vec(rows * h, 1.0);
            let mut dx = dx0.clone();
            be.rmsnorm_backward(&rr, &x, &be.weight_from_f32(&w), &inv, &mut dx, shape);
            let r64 = to64(&rr);
            let fd = fd_grad(&x64, 1e-6, |x| dot64(&rmsnorm64(x, &w64, rows, h, eps as f64).0, &r64));
            let want: Vec<f64> = fd.iter().zip(&dx0).map(|(g, b)| g + *b as f64).collect();
            assert_close("rmsnorm dx", &dx, &want, 1e-5);
        }
    }
}
