//! AdamW with torch.optim.AdamW semantics (single-tensor, non-amsgrad).
//!
//! Scalars that torch computes as Python floats (1 − lr·wd, the bias
//! corrections, step_size, sqrt(bias_c2)) are computed in f64 and cast to
//! f32; the per-element update is f32:
//!   p *= 1 − lr·wd
//!   m = β1·m + (1 − β1)·g
//!   v = β2·v + (1 − β2)·g²
//!   p −= step_size · m / (sqrt(v) / sqrt(bias_c2) + eps)
//! with bias_c1 = 1 − β1^step, bias_c2 = 1 − β2^step, step_size = lr / bias_c1.

use rayon::prelude::*;

use super::buffer_ops::CHUNK;
use crate::backend::AdamW;

pub(super) fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    let len = param.len();
    assert!(
        grad.len() == len && m.len() == len && v.len() == len,
        "adamw: lengths differ (param {len}, grad {}, m {}, v {})",
        grad.len(),
        m.len(),
        v.len()
    );
    assert!(hp.step >= 1, "adamw: step is 1-based, got 0");
    let sc = hp.scalars();
    let (decay, step_size, bc2_sqrt) = (sc.decay, sc.step_size, sc.bias_c2_sqrt);
    let (beta1, beta2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let (one_m_b1, one_m_b2) = (sc.one_minus_beta1, sc.one_minus_beta2);

    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                *p *= decay;
                *m = beta1 * *m + one_m_b1 * g;
                *v = beta2 * *v + one_m_b2 * (g * g);
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * (*m / denom);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use crate::backend::{AdamW, Backend};

    #[test]
    fn adamw_three_steps_match_f64_formulas() {
        let be = CpuBackend::new();
        let p0 = [0.5f32, -1.25, 0.0, 3.0];
        let grads = [
            [0.1f32, -0.2, 0.0, 1.5],
            [0.3, 0.05, -0.7, -2.0],
            [-0.4, 0.2, 0.01, 0.5],
        ];
        let hp = |step| AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };

        let mut p = p0.to_vec();
        let mut m = vec![0.0f32; 4];
        let mut v = vec![0.0f32; 4];
        // Expected in f64 with the same (f32-rounded) hyper-parameters.
        let mut ep: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut em = [0.0f64; 4];
        let mut ev = [0.0f64; 4];
        for (s, g) in grads.iter().enumerate() {
            let step = s as u64 + 1;
            be.adamw(&mut p, &g.to_vec(), &mut m, &mut v, hp(step));
            let h = hp(step);
            let (lr, b1, b2, eps, wd) = (
                h.lr as f64,
                h.beta1 as f64,
                h.beta2 as f64,
                h.eps as f64,
                h.weight_decay as f64,
            );
            for i in 0..4 {
                let g = g[i] as f64;
                ep[i] *= 1.0 - lr * wd;
                em[i] = b1 * em[i] + (1.0 - b1) * g;
                ev[i] = b2 * ev[i] + (1.0 - b2) * g * g;
                let bc1 = 1.0 - b1.powi(step as i32);
                let bc2 = 1.0 - b2.powi(step as i32);
                ep[i] -= lr / bc1 * em[i] / (ev[i].sqrt() / bc2.sqrt() + eps);
            }
            for i in 0..4 {
                // f32 vs f64 over 3 steps: 1e-6 absolute on O(1) values.
                assert!(
                    (p[i] as f64 - ep[i]).abs() < 1e-6,
                    "step {step} p[{i}] {} vs {}",
                    p[i],
                    ep[i]
                );
                assert!((m[i] as f64 - em[i]).abs() < 1e-6, "step {step} m[{i}]");
                assert!((v[i] as f64 - ev[i]).abs() < 1e-7, "step {step} v[{i}]");
            }
        }
        // Hand check of step 1 for element 0: m̂ = g, v̂ = g², so the update
        // is lr·g/(|g| + eps) ≈ lr·sign(g) on top of the decay.
        let p1 = 0.5 * (1.0 - 1e-2 * 0.1) - 1e-2 * 0.1 / (0.1 + 1e-8);
        let mut q = vec![0.5f32];
        be.adamw(&mut q, &vec![0.1], &mut vec![0.0], &mut vec![0.0], hp(1));
        assert!((q[0] as f64 - p1).abs() < 1e-6, "{} vs {p1}", q[0]);
    }
}
