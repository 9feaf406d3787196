//! LoRA side path: y += scale · dropout(x) · Aᵀ · Bᵀ, and its backward.

use rayon::prelude::*;

use super::check_len;
use super::gemm::{MatRef, matmul};
use crate::backend::{Dropout, LoraGrads, LoraInputs, LoraShape, dropout_keep};

/// Multiplier applied to kept elements, 1 / (1 - p) in f32.
fn keep_scale(d: Dropout) -> f32 {
    assert!(
        (0.0..=1.0).contains(&d.p),
        "lora: dropout p = {} outside [0, 1]",
        d.p
    );
    1.0 / (1.0 - d.p)
}

/// `out[i, j] = keep(i*k + j) ? v[i, j] · 1/(1-p) : 0` over a [m, k] matrix.
/// Used both to build dropout(x) and to apply the mask to a gradient.
fn apply_mask(v: &[f32], out: &mut [f32], m: usize, k: usize, d: Dropout, accumulate: bool) {
    if m == 0 || k == 0 {
        return;
    }
    let inv = keep_scale(d);
    out[..m * k]
        .par_chunks_mut(k)
        .zip(v[..m * k].par_chunks(k))
        .enumerate()
        .for_each(|(i, (o, v))| {
            for (j, (o, &v)) in o.iter_mut().zip(v).enumerate() {
                let keep = dropout_keep(d.seed, (i * k + j) as u64, d.p);
                let val = if keep { v * inv } else { 0.0 };
                if accumulate {
                    *o += val;
                } else {
                    *o = val;
                }
            }
        });
}

/// Checks x, A, B and xa against the shape (both directions read them).
fn check_inputs(op: &str, inputs: LoraInputs<'_, [f32]>, xa: &[f32], s: LoraShape) {
    check_len(op, "x", inputs.x.len(), s.m * s.k);
    check_len(op, "a", inputs.a.len(), s.r * s.k);
    check_len(op, "b", inputs.b.len(), s.n * s.r);
    check_len(op, "xa", xa.len(), s.m * s.r);
}

/// xa[m, r] = dropout(x)[m, k] · A[r, k]ᵀ ;  y[m, n] += scale · xa · B[n, r]ᵀ.
pub(super) fn lora_forward(inputs: LoraInputs<'_, [f32]>, xa: &mut [f32], y: &mut [f32], shape: LoraShape) {
    let LoraInputs { x, a, b } = inputs;
    let LoraShape { m, k, n, r, scale, dropout } = shape;
    const OP: &str = "lora_forward";
    check_inputs(OP, inputs, xa, shape);
    check_len(OP, "y", y.len(), m * n);
    let at = MatRef::new(a, r, k).t();
    match dropout {
        None => matmul(OP, xa, MatRef::new(x, m, k), at, 1.0, false),
        Some(d) => {
            let mut xd = vec![0.0f32; m * k];
            apply_mask(x, &mut xd, m, k, d, false);
            matmul(OP, xa, MatRef::new(&xd, m, k), at, 1.0, false);
        }
    }
    matmul(
        OP,
        y,
        MatRef::new(xa, m, r),
        MatRef::new(b, n, r).t(),
        scale,
        true,
    );
}

/// Backward of [`lora_forward`] given dy[m, n]:
/// dB += scale · dyᵀ · xa ; dxa = scale · dy · B ; dA += dxaᵀ · dropout(x) ;
/// dx += mask ⊙ (dxa · A) / (1 - p).
pub(super) fn lora_backward(
    dy: &[f32],
    inputs: LoraInputs<'_, [f32]>,
    xa: &[f32],
    grads: LoraGrads<'_, [f32]>,
    shape: LoraShape,
) {
    let LoraInputs { x, a, b } = inputs;
    let LoraGrads { dx, da, db } = grads;
    let LoraShape { m, k, n, r, scale, dropout } = shape;
    const OP: &str = "lora_backward";
    check_len(OP, "dy", dy.len(), m * n);
    check_inputs(OP, inputs, xa, shape);
    check_len(OP, "dx", dx.len(), m * k);
    check_len(OP, "da", da.len(), r * k);
    check_len(OP, "db", db.len(), n * r);

    let dym = MatRef::new(dy, m, n);
    // dB[n, r] += scale · dyᵀ · xa
    matmul(OP, db, dym.t(), MatRef::new(xa, m, r), scale, true);
    // dxa[m, r] = scale · dy · B
    let mut dxa = vec![0.0f32; m * r];
    matmul(OP, &mut dxa, dym, MatRef::new(b, n, r), scale, false);
    let dxat = MatRef::new(&dxa, m, r).t();
    let am = MatRef::new(a, r, k);
    match dropout {
        None => {
            // dA[r, k] += dxaᵀ · x ;  dx += dxa · A
            matmul(OP, da, dxat, MatRef::new(x, m, k), 1.0, true);
            matmul(OP, dx, MatRef::new(&dxa, m, r), am, 1.0, true);
        }
        Some(d) => {
            let mut tmp = vec![0.0f32; m * k];
            apply_mask(x, &mut tmp, m, k, d, false);
            matmul(OP, da, dxat, MatRef::new(&tmp, m, k), 1.0, true);
            // tmp = dxa · A, then dx += mask ⊙ tmp / (1 - p).
            matmul(OP, &mut tmp, MatRef::new(&dxa, m, r), am, 1.0, false);
            apply_mask(&tmp, dx, m, k, d, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{Rng, assert_close, dot64, fd_grad, to64};
    use crate::backend::{Backend, Dropout, LoraGrads, LoraInputs, LoraShape, dropout_keep};

    struct Dims {
        m: usize,
        k: usize,
        n: usize,
        r: usize,
    }

    /// y = scale · dropout(x) · Aᵀ · Bᵀ in f64, same mask as the backend.
    fn lora64(
        x: &[f64],
        a: &[f64],
        b: &[f64],
        s: f64,
        d: Option<Dropout>,
        dims: &Dims,
    ) -> Vec<f64> {
        let Dims { m, k, n, r } = *dims;
        let xd: Vec<f64> = (0..m * k)
            .map(|idx| match d {
                None => x[idx],
                Some(d) if dropout_keep(d.seed, idx as u64, d.p) => {
                    x[idx] * (1.0 / (1.0 - d.p as f64))
                }
                Some(_) => 0.0,
            })
            .collect();
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            let xa: Vec<f64> = (0..r)
                .map(|q| (0..k).map(|l| xd[i * k + l] * a[q * k + l]).sum())
                .collect();
            for j in 0..n {
                y[i * n + j] = s * (0..r).map(|q| xa[q] * b[j * r + q]).sum::<f64>();
            }
        }
        y
    }

    fn check(dropout: Option<Dropout>, seed: u64) {
        let be = CpuBackend::new();
        let mut rng = Rng::new(seed);
        let dims = Dims {
            m: 7,
            k: 10,
            n: 6,
            r: 3,
        };
        let Dims { m, k, n, r } = dims;
        let s = 1.75f32;
        let x = rng.vec(m * k, 1.0);
        let a = rng.vec(r * k, 1.0);
        let b = rng.vec(n * r, 1.0);
        let y0 = rng.vec(m * n, 1.0);
        let rr = rng.vec(m * n, 1.0);

        // Forward vs naive (y accumulates onto y0); tolerance 1e-5 relative.
        let mut xa = vec![f32::NAN; m * r];
        let mut y = y0.clone();
        be.lora_forward(LoraInputs { x: &x, a: &a, b: &b }, &mut xa, &mut y, LoraShape { m, k, n, r, scale: s, dropout });
        let (x64, a64, b64, r64) = (to64(&x), to64(&a), to64(&b), to64(&rr));
        let fwd = lora64(&x64, &a64, &b64, s as f64, dropout, &dims);
        let want: Vec<f64> = fwd.iter().zip(&y0).map(|(f, y)| f + *y as f64).collect();
        assert_close("lora y", &y, &want, 1e-5);

        // Backward (accumulating onto non-zero grads) vs central FD of
        // L = Σ y ⊙ R in f64 (h = 1e-5; L is polynomial of degree 3 so the FD
        // truncation error is ~h²; tolerance 1e-5 relative to the f32 grads).
        let dx0 = rng.vec(m * k, 1.0);
        let da0 = rng.vec(r * k, 1.0);
        let db0 = rng.vec(n * r, 1.0);
        let (mut dx, mut da, mut db) = (dx0.clone(), da0.clone(), db0.clone());
        be.lora_backward(&rr, LoraInputs { x: &x, a: &a, b: &b }, &xa, LoraGrads { dx: &mut dx, da: &mut da, db: &mut db }, LoraShape { m, k, n, r, scale: s, dropout });
        let s64 = s as f64;
        let plus = |g: Vec<f64>, base: &[f32]| -> Vec<f64> {
            g.iter().zip(base).map(|(g, b)| g + *b as f64).collect()
        };
        let gx = fd_grad(&x64, 1e-5, |x| {
            dot64(&lora64(x, &a64, &b64, s64, dropout, &dims), &r64)
        });
        let ga = fd_grad(&a64, 1e-5, |a| {
            dot64(&lora64(&x64, a, &b64, s64, dropout, &dims), &r64)
        });
        let gb = fd_grad(&b64, 1e-5, |b| {
            dot64(&lora64(&x64, &a64, b, s64, dropout, &dims), &r64)
        });
        assert_close("lora dx", &dx, &plus(gx.clone(), &dx0), 1e-5);
        assert_close("lora dA", &da, &plus(ga, &da0), 1e-5);
        assert_close("lora dB", &db, &plus(gb, &db0), 1e-5);
        if let Some(d) = dropout {
            // Dropped inputs get exactly the gradient they had before.
            let dropped = (0..m * k)
                .filter(|&i| !dropout_keep(d.seed, i as u64, d.p))
                .count();
            assert!(dropped > 0, "test should drop something");
            for i in 0..m * k {
                if !dropout_keep(d.seed, i as u64, d.p) {
                    assert_eq!(dx[i], dx0[i]);
                }
            }
        }
    }

    #[test]
    fn lora_without_dropout() {
        check(None, 20);
    }

    #[test]
    fn lora_with_dropout() {
        check(Some(Dropout { p: 0.3, seed: 1234 }), 21);
    }

    #[test]
    fn lora_dropout_zero_p_equals_none() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(22);
        let (m, k, n, r) = (4, 5, 3, 2);
        let x = rng.vec(m * k, 1.0);
        let a = rng.vec(r * k, 1.0);
        let b = rng.vec(n * r, 1.0);
        let mut outs = Vec::new();
        for d in [None, Some(Dropout { p: 0.0, seed: 9 })] {
            let mut xa = vec![0.0; m * r];
            let mut y = vec![0.0; m * n];
            be.lora_forward(LoraInputs { x: &x, a: &a, b: &b }, &mut xa, &mut y, LoraShape { m, k, n, r, scale: 2.0, dropout: d });
            outs.push((xa, y));
        }
        assert_eq!(outs[0], outs[1]);
    }
}
