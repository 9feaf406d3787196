//! Gated MLP activations: out = act(gate) ⊙ up, with act = silu
//! (SwiGLU: silu(g) = g · σ(g), σ(g) = 1 / (1 + exp(−g))) or the tanh
//! approximation of gelu (GeGLU: 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))),
//! torch's `gelu(approximate="tanh")`), or σ (Qwen3.5's attention output
//! gate, attn ⊙ σ(gate), computed by the same op). All in f32.

use rayon::prelude::*;

use super::check_len;
use super::buffer_ops::CHUNK;
use crate::backend::{GluAct, GluShape};

#[inline]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + (-g).exp())
}

/// √(2/π) as torch's f32 gelu uses it.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044715;

/// act(g) and act'(g).
#[inline]
fn act_and_grad(act: GluAct, g: f32) -> (f32, f32) {
    match act {
        GluAct::Silu => {
            let s = sigmoid(g);
            (g * s, s * (1.0 + g * (1.0 - s)))
        }
        GluAct::GeluTanh => {
            let inner = SQRT_2_OVER_PI * (g + GELU_C * g * g * g);
            let t = inner.tanh();
            let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * g * g);
            (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner)
        }
        GluAct::Sigmoid => {
            let s = sigmoid(g);
            (s, s * (1.0 - s))
        }
    }
}

pub(super) fn glu(gate: &[f32], up: &[f32], out: &mut [f32], shape: GluShape) {
    let GluShape { len, act } = shape;
    check_len("glu", "gate", gate.len(), len);
    check_len("glu", "up", up.len(), len);
    check_len("glu", "out", out.len(), len);
    out[..len]
        .par_chunks_mut(CHUNK)
        .zip(gate[..len].par_chunks(CHUNK))
        .zip(up[..len].par_chunks(CHUNK))
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = match act {
                    // Kept as g·σ(g)·u: the product order of the SwiGLU kernel.
                    GluAct::Silu => g * sigmoid(g) * u,
                    GluAct::GeluTanh | GluAct::Sigmoid => act_and_grad(act, g).0 * u,
                };
            }
        });
}

/// dgate = dout · up · act'(g), dup = dout · act(g).
pub(super) fn glu_backward(dout: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32], shape: GluShape) {
    let GluShape { len, act } = shape;
    const OP: &str = "glu_backward";
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
                let (a, da) = act_and_grad(act, g);
                *dg = d * u * da;
                *du = d * a;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{Rng, assert_close, dot64, fd_grad, to64};
    use crate::backend::{Backend, GluAct, GluShape};

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
        let shape = GluShape { len, act: GluAct::Silu };
        be.glu(&g, &u, &mut out, shape);
        let (g64, u64_, r64) = (to64(&g), to64(&u), to64(&rr));
        // A few f32 ops per element: 1e-6 relative.
        assert_close("swiglu", &out, &swiglu64(&g64, &u64_), 1e-6);

        let (mut dg, mut du) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        be.glu_backward(&rr, &g, &u, &mut dg, &mut du, shape);
        // FD in f64, h = 1e-6; 1e-5 relative.
        let fg = fd_grad(&g64, 1e-6, |g| dot64(&swiglu64(g, &u64_), &r64));
        let fu = fd_grad(&u64_, 1e-6, |u| dot64(&swiglu64(&g64, u), &r64));
        assert_close("swiglu dgate", &dg, &fg, 1e-5);
        assert_close("swiglu dup", &du, &fu, 1e-5);
    }

    fn geglu64(g: &[f64], u: &[f64]) -> Vec<f64> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        g.iter().zip(u).map(|(&g, &u)| 0.5 * g * (1.0 + (c * (g + 0.044715 * g * g * g)).tanh()) * u).collect()
    }

    #[test]
    fn geglu_forward_and_backward() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(61);
        let len = 101;
        let mut g = rng.vec(len, 6.0);
        g[0] = -30.0; // tanh saturates: gelu → -0, gradient → 0
        g[1] = 30.0;
        let u = rng.vec(len, 2.0);
        let rr = rng.vec(len, 1.0);
        let shape = GluShape { len, act: GluAct::GeluTanh };
        let mut out = vec![f32::NAN; len];
        be.glu(&g, &u, &mut out, shape);
        let (g64, u64_, r64) = (to64(&g), to64(&u), to64(&rr));
        // A few f32 ops per element (tanh, a cubic): 1e-6 relative.
        assert_close("geglu", &out, &geglu64(&g64, &u64_), 1e-6);
        let (mut dg, mut du) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        be.glu_backward(&rr, &g, &u, &mut dg, &mut du, shape);
        let fg = fd_grad(&g64, 1e-6, |g| dot64(&geglu64(g, &u64_), &r64));
        let fu = fd_grad(&u64_, 1e-6, |u| dot64(&geglu64(&g64, u), &r64));
        assert_close("geglu dgate", &dg, &fg, 1e-5);
        assert_close("geglu dup", &du, &fu, 1e-5);
    }
}
