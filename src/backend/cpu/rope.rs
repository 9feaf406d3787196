//! Rotary position embeddings, half-split layout (first half / second half
//! of the rotated dims are the two rotated components, not interleaved
//! pairs). Only the leading `rot_dim` dims of each head rotate (a partial
//! rotary factor); cos and sin are multiplied by `mscale` (long-context
//! attention factor) in f32, as transformers scales its cos/sin tables.

use rayon::prelude::*;

use super::check_len;
use crate::backend::RopeShape;

/// Rotates x[n, heads, head_dim] in place by angle = positions[t] · inv_freq[i]
/// (an f32 product); with `inverse` the rotation is by the negative angle,
/// which is the transpose used for the backward.
pub(super) fn rope(x: &mut [f32], positions: &[i32], inv_freq: &[f32], shape: RopeShape, inverse: bool) {
    let RopeShape { n, heads, head_dim, rot_dim, mscale } = shape;
    const OP: &str = "rope";
    assert!(
        rot_dim.is_multiple_of(2) && rot_dim <= head_dim,
        "{OP}: rot_dim {rot_dim} must be even and at most head_dim {head_dim}"
    );
    let half = rot_dim / 2;
    let row = heads * head_dim;
    check_len(OP, "x", x.len(), n * row);
    check_len(OP, "positions", positions.len(), n);
    check_len(OP, "inv_freq", inv_freq.len(), half);
    if n == 0 || row == 0 || half == 0 {
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
                    let (s, c) = if mscale == 1.0 { (s, c) } else { (s * mscale, c * mscale) };
                    (c, if inverse { -s } else { s })
                }));
                for head in xt.chunks_exact_mut(head_dim) {
                    let (lo, hi) = head[..rot_dim].split_at_mut(half);
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

    #[allow(clippy::too_many_arguments)] // the shape of the op under test, spelled out
    fn rope64(
        x: &[f64],
        pos: &[i32],
        inv_freq: &[f32],
        n: usize,
        heads: usize,
        d: usize,
        rot: usize,
        mscale: f32,
    ) -> Vec<f64> {
        let mut y = x.to_vec();
        let half = rot / 2;
        for (t, &p) in pos.iter().enumerate().take(n) {
            for h in 0..heads {
                let base = (t * heads + h) * d;
                for i in 0..half {
                    // Angle rounded exactly as specified: an f32 product.
                    let ang = (p as f32 * inv_freq[i]) as f64;
                    let (c, s) = (ang.cos() * mscale as f64, ang.sin() * mscale as f64);
                    let (x1, x2) = (x[base + i], x[base + i + half]);
                    y[base + i] = x1 * c - x2 * s;
                    y[base + i + half] = x2 * c + x1 * s;
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
        be.rope(&mut y, &pos, &inv_freq, RopeShape::full(n, heads, d));
        // f32 sin/cos and two products: 1e-6 relative.
        assert_close(
            "rope",
            &y,
            &rope64(&to64(&x), &pos, &inv_freq, n, heads, d, d, 1.0),
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
        be.rope_backward(&mut g, &pos, &inv_freq, RopeShape::full(n, heads, d));
        let r64 = to64(&rr);
        // Linear map: FD with h = 1e-3 is exact up to f64 rounding; 1e-6 tol.
        let fd = fd_grad(&to64(&x), 1e-3, |x| {
            dot64(&rope64(x, &pos, &inv_freq, n, heads, d, d, 1.0), &r64)
        });
        assert_close("rope dx", &g, &fd, 1e-6);
        // backward ∘ forward ≈ identity (rotation).
        let mut y = x.clone();
        be.rope(&mut y, &pos, &inv_freq, RopeShape::full(n, heads, d));
        be.rope_backward(&mut y, &pos, &inv_freq, RopeShape::full(n, heads, d));
        assert_close("rope round trip", &y, &to64(&x), 1e-6);
    }

    #[test]
    fn partial_rotary_with_attention_factor() {
        // Phi-4-mini style: 3/4 of each head rotates, the rest passes
        // through unscaled; cos and sin carry a long-rope attention factor.
        let be = CpuBackend::new();
        let (n, heads, d, pos, _) = setup();
        let rot = 6;
        let inv_freq: Vec<f32> = (0..rot / 2).map(|i| 10000f32.powf(-((2 * i) as f32) / rot as f32)).collect();
        let shape = RopeShape { n, heads, head_dim: d, rot_dim: rot, mscale: 1.19 };
        let mut rng = Rng::new(42);
        let x = rng.vec(n * heads * d, 1.0);
        let mut y = x.clone();
        be.rope(&mut y, &pos, &inv_freq, shape);
        let want = rope64(&to64(&x), &pos, &inv_freq, n, heads, d, rot, 1.19);
        assert_close("partial rope", &y, &want, 1e-6);
        for t in 0..n * heads {
            assert_eq!(&y[t * d + rot..(t + 1) * d], &x[t * d + rot..(t + 1) * d], "pass-through dims");
        }
        // The backward is the transpose of this (no longer orthogonal) map.
        let rr = rng.vec(n * heads * d, 1.0);
        let mut g = rr.clone();
        be.rope_backward(&mut g, &pos, &inv_freq, shape);
        let r64 = to64(&rr);
        let fd = fd_grad(&to64(&x), 1e-3, |x| dot64(&rope64(x, &pos, &inv_freq, n, heads, d, rot, 1.19), &r64));
        assert_close("partial rope dx", &g, &fd, 1e-6);
    }
}
