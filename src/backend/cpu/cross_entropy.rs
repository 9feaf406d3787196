//! Row-wise cross-entropy with in-place gradient.
//!
//! Per row: max in f32; Σ exp(l − max) accumulated sequentially in f64;
//! lse = max + ln Σ (f64); nll = lse − logit[target] (f64, cast to f32).
//! Gradient: s · (exp(l − lse) − onehot) in f32.
//!
//! With a soft-cap c every logit is first replaced by z = tanh(l / c) · c
//! (f32, transformers' order of operations), and the gradient with respect
//! to the raw logit is multiplied by dz/dl = 1 − tanh²(l / c).

use rayon::prelude::*;

use super::check_len;
use crate::backend::CeShape;

/// Targets equal to this are ignored (zero loss, zero gradient).
pub(super) const IGNORE_INDEX: i32 = -100;

pub(super) fn cross_entropy(
    logits: &mut [f32],
    targets: &[i32],
    losses: &mut [f32],
    shape: CeShape,
    grad_scale: Option<f32>,
) {
    let CeShape { rows, vocab, softcap } = shape;
    const OP: &str = "cross_entropy";
    if let Some(c) = softcap {
        assert!(c > 0.0, "{OP}: soft-cap {c} must be positive");
    }
    let cap = |x: f32| match softcap {
        Some(c) => (x / c).tanh() * c,
        None => x,
    };
    check_len(OP, "logits", logits.len(), rows * vocab);
    check_len(OP, "targets", targets.len(), rows);
    check_len(OP, "losses", losses.len(), rows);
    for (row, &t) in targets[..rows].iter().enumerate() {
        assert!(
            t == IGNORE_INDEX || (t >= 0 && (t as usize) < vocab),
            "{OP}: target {t} at row {row} is outside [0, {vocab}) and is not the ignore index {IGNORE_INDEX}"
        );
    }
    if rows == 0 {
        return;
    }
    if vocab == 0 {
        // Only ignored rows are possible here.
        losses[..rows].fill(0.0);
        return;
    }
    logits[..rows * vocab]
        .par_chunks_mut(vocab)
        .zip(losses[..rows].par_iter_mut())
        .zip(targets[..rows].par_iter())
        .for_each(|((l, loss), &t)| {
            if t == IGNORE_INDEX {
                *loss = 0.0;
                if grad_scale.is_some() {
                    l.fill(0.0);
                }
                return;
            }
            let t = t as usize;
            let max = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(cap(b)));
            let sum = l
                .iter()
                .fold(0.0f64, |acc, &x| acc + ((cap(x) - max).exp() as f64));
            let lse = max as f64 + sum.ln();
            *loss = (lse - cap(l[t]) as f64) as f32;
            if let Some(s) = grad_scale {
                let lse = lse as f32;
                match softcap {
                    None => {
                        for x in l.iter_mut() {
                            *x = s * (*x - lse).exp();
                        }
                        l[t] -= s;
                    }
                    Some(c) => {
                        for (i, x) in l.iter_mut().enumerate() {
                            let th = (*x / c).tanh();
                            let p = (th * c - lse).exp() - if i == t { 1.0 } else { 0.0 };
                            *x = s * p * (1.0 - th * th);
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::CpuBackend;
    use super::super::test_util::{Rng, assert_close, fd_grad, to64};
    use crate::backend::{Backend, CeShape};

    fn ce(rows: usize, vocab: usize) -> CeShape {
        CeShape { rows, vocab, softcap: None }
    }

    /// Per-row NLL in f64 (0 for ignored rows).
    fn ce64(l: &[f64], t: &[i32], vocab: usize) -> Vec<f64> {
        t.iter()
            .enumerate()
            .map(|(r, &t)| {
                if t == -100 {
                    return 0.0;
                }
                let row = &l[r * vocab..(r + 1) * vocab];
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln() - row[t as usize]
            })
            .collect()
    }

    #[test]
    fn cross_entropy_loss_and_grad() {
        let be = CpuBackend::new();
        let mut rng = Rng::new(70);
        let (rows, vocab) = (5, 11);
        let logits = rng.vec(rows * vocab, 4.0);
        let targets = vec![3, -100, 0, 10, 7];
        let l64 = to64(&logits);
        let want = ce64(&l64, &targets, vocab);

        // Loss only: logits untouched.
        let mut l = logits.clone();
        let mut losses = vec![f32::NAN; rows];
        be.cross_entropy(&mut l, &targets, &mut losses, ce(rows, vocab), None);
        assert_eq!(l, logits);
        assert_close("ce loss", &losses, &want, 1e-6);
        assert_eq!(losses[1], 0.0);

        // With gradient: s · d(Σ loss)/d logits, FD in f64 (h = 1e-6),
        // tolerance 1e-5 relative.
        let s = 0.25f32;
        let mut g = logits.clone();
        let mut losses2 = vec![f32::NAN; rows];
        be.cross_entropy(&mut g, &targets, &mut losses2, ce(rows, vocab), Some(s));
        assert_eq!(losses, losses2);
        let fd: Vec<f64> = fd_grad(&l64, 1e-6, |l| ce64(l, &targets, vocab).iter().sum())
            .iter()
            .map(|x| x * s as f64)
            .collect();
        assert_close("ce grad", &g, &fd, 1e-5);
        assert!(
            g[vocab..2 * vocab].iter().all(|&x| x == 0.0),
            "ignored row must have zero grad"
        );
        // Each non-ignored row's gradient sums to ~0.
        for r in [0, 2, 3, 4] {
            let sum: f32 = g[r * vocab..(r + 1) * vocab].iter().sum();
            assert!(sum.abs() < 1e-6, "row {r} grad sums to {sum}");
        }
    }

    #[test]
    fn cross_entropy_large_logits_stable() {
        let be = CpuBackend::new();
        let mut l = vec![1000.0f32, 0.0, -1000.0];
        let mut loss = vec![0.0];
        be.cross_entropy(&mut l, &vec![0], &mut loss, ce(1, 3), Some(1.0));
        assert!(loss[0].abs() < 1e-6);
        assert!(l.iter().all(|x| x.is_finite() && x.abs() < 1e-6));
    }

    #[test]
    #[should_panic(expected = "target 11 at row 0 is outside [0, 11)")]
    fn cross_entropy_rejects_out_of_range_target() {
        let be = CpuBackend::new();
        let mut l = vec![0.0f32; 11];
        be.cross_entropy(&mut l, &vec![11], &mut vec![0.0], ce(1, 11), None);
    }

    #[test]
    #[should_panic(expected = "target -1 at row 1")]
    fn cross_entropy_rejects_negative_target() {
        let be = CpuBackend::new();
        let mut l = vec![0.0f32; 8];
        be.cross_entropy(&mut l, &vec![0, -1], &mut vec![0.0; 2], ce(2, 4), None);
    }

    #[test]
    fn soft_capped_cross_entropy_loss_and_grad() {
        // Gemma 2's final soft-cap: the loss of c·tanh(l/c), the gradient
        // with respect to the raw logits. Logits up to ±12 against a cap of
        // 3 so the cap changes the result.
        let be = CpuBackend::new();
        let mut rng = Rng::new(71);
        let (rows, vocab, c) = (4, 9, 3.0f32);
        let logits = rng.vec(rows * vocab, 12.0);
        let targets = vec![2, 8, -100, 0];
        let capped = |l: &[f64]| -> Vec<f64> { l.iter().map(|x| (x / c as f64).tanh() * c as f64).collect() };
        let l64 = to64(&logits);
        let want = ce64(&capped(&l64), &targets, vocab);
        let shape = CeShape { rows, vocab, softcap: Some(c) };
        let mut l = logits.clone();
        let mut losses = vec![f32::NAN; rows];
        be.cross_entropy(&mut l, &targets, &mut losses, shape, None);
        assert_eq!(l, logits);
        assert_close("capped ce loss", &losses, &want, 1e-6);
        let uncapped = ce64(&l64, &targets, vocab);
        assert!((uncapped[0] - want[0]).abs() > 0.1, "the cap must change the loss");

        let s = 0.5f32;
        let mut g = logits.clone();
        be.cross_entropy(&mut g, &targets, &mut losses, shape, Some(s));
        let fd: Vec<f64> = fd_grad(&l64, 1e-6, |l| ce64(&capped(l), &targets, vocab).iter().sum())
            .iter()
            .map(|x| x * s as f64)
            .collect();
        assert_close("capped ce grad", &g, &fd, 1e-5);
    }

    #[test]
    fn soft_cap_op_matches_its_definition() {
        let be = CpuBackend::new();
        let x = Rng::new(72).vec(50, 40.0);
        let mut y = x.clone();
        be.softcap(&mut y, 30.0);
        let want: Vec<f64> = x.iter().map(|&v| 30.0 * (v as f64 / 30.0).tanh()).collect();
        assert_close("softcap", &y, &want, 1e-6);
    }
}
