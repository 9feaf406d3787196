//! SwiGLU activation: out = silu(gate) ⊙ up, silu(g) = g · σ(g),
//! σ(g) = 1 / (1 + exp(−g)).

use rayon::prelude::*;

use super::check_len;
use super::buffer_ops::CHUNK;

#[inline]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

pub(super) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32], len: usize) {
    check_len("swiglu", "gate", gate.len(), len);
    check_len("swiglu", "up", up.len(), len);
    check_len("swiglu", "out", out.len(), len);
    out[..len]
        .par_chunks_mut(CHUNK)
        .zip(gate[..len].par_chunks(CHUNK))
        .zip(up[..len].par_chunks(CHUNK))
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// dgate = dout · up · σ(g)(1 + g(1 − σ(g))), dup = dout · silu(g).
pub(super) fn swiglu_backward(
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
    len: usize,
) {
    const OP: &str = "swiglu_backward";
    check_len(OP, "dout", dout.len(), len);
    check_len(OP, "gate", gate.len(), len);
    check_len(OP, "up", up.len(), len);
    check_len(OP, "dgate", dgate.len(), len);
    check_len(OP, "dup", dup.len(), len);
    dgate[..len]
        .par_chunks_mut(CHUNK)
        .zip(dup[..len].par_chunks_mut(CHUNK))
        .zip(dout[..len].par_chunks(CHUNK))
        .zip(gate[..len].par_chunks(CHUNK))
        .zip(up[..len].par_chunks(CHUNK))
        .for_each(|((((dg, du), d), g), u)| {
            for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du).zip(d).zip(g).zip(u) {
                let s = sigmoid(g);
                *dg = d * u * (s * (1.0 + g * (1.0 - s)));
                *du = d * (g * s);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{Rng, assert_close, dot64, fd_grad, to64};
    use crate::backend::Backend;

    fn swiglu64(g: &[f64], u: &[f64]) -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            .collect()
    }

    #[test]
    fn swiglu_forward_and_backward() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(60);
        let len = 101;
        let mut g = rng.vec(len, 6.0);
        g[0] = -100.0; // exp overflow side: silu → -0, gradient → 0
        g[1] = 100.0;
        let u = rng.vec(len, 2.0);
        let rr = rng.vec(len, 1.0);
        let mut out = vec![f32::NAN; len];
        be.swiglu(&g, &u, &mut out, len);
        let (g64, u64_, r64) = (to64(&g), to64(&u), to64(&rr));
        // A few f32 ops per element: 1e-6 relative.
        assert_close("swiglu", &out, &swiglu64(&g64, &u64_), 1e-6);

        let (mut dg, mut du) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        be.swiglu_backward(&rr, &g, &u, &mut dg, &mut du, len);
        // FD in f64, h = 1e-6; 1e-5 relative.
        let fg = fd_grad(&g64, 1e-6, |g| dot64(&swiglu64(g, &u64_), &r64));
        let fu = fd_grad(&u64_, 1e-6, |u| dot64(&swiglu64(&g64, u), &r64));
        assert_close("swiglu dgate", &dg, &fg, 1e-5);
        assert_close("swiglu dup", &du, &fu, 1e-5);
    }
}
