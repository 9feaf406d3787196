//! Rotary position embeddings, half-split layout (first half / second half
//! of each head are the two rotated components, not interleaved pairs).

use rayon::prelude::*;

use super::check_len;
use crate::backend::RopeShape;

/// Rotates x[n, heads, head_dim] in place by angle = positions[t] · inv_freq[i]
/// (an f32 product); with `inverse` the rotation is by the negative angle,
/// which is the transpose used for the backward.
pub(super) fn rope(x: &mut [f32], positions: &[i32], inv_freq: &[f32], shape: RopeShape, inverse: bool) {
    let RopeShape { n, heads, head_dim } = shape;
    const OP: &str = "rope";
    assert!(
        head_dim.is_multiple_of(2),
        "{OP}: head_dim {head_dim} must be even"
    );
    let half = head_dim / 2;
    let row = heads * head_dim;
    check_len(OP, "x", x.len(), n * row);
    check_len(OP, "positions", positions.len(), n);
    check_len(OP, "inv_freq", inv_freq.len(), half);
    if n == 0 || row == 0 {
        return;
    }
    let inv_freq = &inv_freq[..half];
    x[..n * row]
        .par_chunks_mut(row)
        .zip(&positions[..n])
        .for_each_init(
            || Vec::with_capacity(half),
            |cs: &mut Vec<(f32, f32)>, (xt, &pos)| {
                cs.clear();
                let p = pos as f32;
                cs.extend(inv_freq.iter().map(|&f| {
                    let (s, c) = (p * f).sin_cos();
                    (c, if inverse { -s } else { s })
                }));
                for head in xt.chunks_exact_mut(head_dim) {
                    let (lo, hi) = head.split_at_mut(half);
                    for ((x1, x2), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs.iter()) {
                        let (a, b) = (*x1, *x2);
                        *x1 = a * c - b * s;
                        *x2 = b * c + a * s;
                    }
                }
            },
        );
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{Rng, assert_close, dot64, fd_grad, to64};
    use crate::backend::{Backend, RopeShape};

    fn rope64(
        x: &[f64],
        pos: &[i32],
        inv_freq: &[f32],
        n: usize,
        heads: usize,
        d: usize,
    ) -> Vec<f64> {
        let mut y = x.to_vec();
        let half = d / 2;
        for (t, &p) in pos.iter().enumerate().take(n) {
            for h in 0..heads {
                let base = (t * heads + h) * d;
                for i in 0..half {
                    // Angle rounded exactly as specified: an f32 product.
                    let ang = (p as f32 * inv_freq[i]) as f64;
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    y[base + i] = x1 * ang.cos() - x2 * ang.sin();
                    y[base + i + half] = x2 * ang.cos() + x1 * ang.sin();
                }
            }
        }
        y
    }

    fn setup() -> (usize, usize, usize, Vec<i32>, Vec<f32>) {
        let (n, heads, d) = (6, 3, 8);
        let pos = vec![0, 1, 2, 3, 0, 1000];
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 10000f32.powf(-((2 * i) as f32) / d as f32))
            .collect();
        (n, heads, d, pos, inv_freq)
    }

    #[test]
    fn rope_forward_matches_naive() {
        let be = CpuBackend::new();
        let (n, heads, d, pos, inv_freq) = setup();
        let x = Rng::new(40).vec(n * heads * d, 1.0);
        let mut y = x.clone();
        be.rope(&mut y, &pos, &inv_freq, RopeShape { n, heads, head_dim: d });
        // f32 sin/cos and two products: 1e-6 relative.
        assert_close(
            "rope",
            &y,
            &rope64(&to64(&x), &pos, &inv_freq, n, heads, d),
            1e-6,
        );
        // Position 0 is the identity.
        assert_eq!(&y[..heads * d], &x[..heads * d]);
    }

    #[test]
    fn rope_backward_is_gradient_and_inverse() {
        let be = CpuBackend::new();
        let (n, heads, d, pos, inv_freq) = setup();
        let mut rng = Rng::new(41);
        let x = rng.vec(n * heads * d, 1.0);
        let rr = rng.vec(n * heads * d, 1.0);
        let mut g = rr.clone();
        be.rope_backward(&mut g, &pos, &inv_freq, RopeShape { n, heads, head_dim: d });
        let r64 = to64(&rr);
        // Linear map: FD with h = 1e-3 is exact up to f64 rounding; 1e-6 tol.
        let fd = fd_grad(&to64(&x), 1e-3, |x| {
            dot64(&rope64(x, &pos, &inv_freq, n, heads, d), &r64)
        });
        assert_close("rope dx", &g, &fd, 1e-6);
        // backward ∘ forward ≈ identity (rotation).
        let mut y = x.clone();
        be.rope(&mut y, &pos, &inv_freq, RopeShape { n, heads, head_dim: d });
        be.rope_backward(&mut y, &pos, &inv_freq, RopeShape { n, heads, head_dim: d });
        assert_close("rope round trip", &y, &to64(&x), 1e-6);
    }
}
