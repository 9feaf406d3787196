//! GRPO's arithmetic, as TRL 1.16's GRPOTrainer computes it: rewards into
//! advantages, and the clipped surrogate (+ β·KL) over one micro-batch of
//! completions with its derivative in each token's log-probability. Pure
//! functions of numbers, in f64, so the tests can hold them to TRL's own
//! code on logged completions.

use crate::config::grpo::{GrpoLoss, GrpoSettings, ScaleRewards};

/// NaN-ignoring mean (NaN when every value is NaN), as torch.nanmean.
pub fn nanmean(xs: &[f64]) -> f64 {
    let (s, n) = xs.iter().filter(|x| !x.is_nan()).fold((0.0, 0usize), |(s, n), &x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

/// NaN-ignoring standard deviation with Bessel's correction (NaN for fewer
/// than two values), as TRL's nanstd.
pub fn nanstd(xs: &[f64]) -> f64 {
    let m = nanmean(xs);
    let vals: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if vals.len() < 2 {
        return f64::NAN;
    }
    let var = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
    (var * vals.len() as f64 / (vals.len() - 1) as f64).sqrt()
}

/// A generation batch's rewards and advantages.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// Σ_f w_f·r_f per completion (nansum; NaN where no function scored it).
    pub rewards: Vec<f64>,
    /// Per completion; 0 where the reward is NaN.
    pub advantages: Vec<f64>,
    /// The std each advantage was divided by (before the 1e-4), per completion.
    pub std: Vec<f64>,
}

/// Each completion's reward: Σ_f w_f·r_f over the functions that scored it
/// (NaN for None is skipped, as TRL's nansum), NaN when none did.
pub fn weighted_rewards(per_func: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    per_func
        .iter()
        .map(|r| {
            if r.iter().all(|x| x.is_nan()) {
                return f64::NAN;
            }
            r.iter().zip(weights).map(|(x, w)| x * w).filter(|x| !x.is_nan()).sum()
        })
        .collect()
}

/// Rewards per completion and function (`per_func[i][f]`, NaN for None)
/// into rewards and advantages; groups of `g` consecutive completions.
pub fn advantages(per_func: &[Vec<f64>], weights: &[f64], g: usize, scale: ScaleRewards) -> Advantages {
    let rewards = weighted_rewards(per_func, weights);
    let n = rewards.len();
    let g = g.max(1);
    let mut std = vec![0.0; n];
    let mut mean = vec![0.0; n];
    for (gi, group) in rewards.chunks(g).enumerate() {
        let (m, s) = (nanmean(group), if g > 1 { nanstd(group) } else { 0.0 });
        for j in 0..group.len() {
            mean[gi * g + j] = m;
            std[gi * g + j] = s;
        }
    }
    if scale == ScaleRewards::Batch {
        let s = if n > 1 { nanstd(&rewards) } else { 0.0 };
        std.iter_mut().for_each(|x| *x = s);
    }
    let advantages = (0..n)
        .map(|i| {
            let mut a = rewards[i] - mean[i];
            if scale != ScaleRewards::None {
                a /= std[i] + 1e-4;
            }
            if a.is_nan() { 0.0 } else { a }
        })
        .collect();
    Advantages { rewards, advantages, std }
}

/// One completion of a micro-batch: its log-probs at the completion tokens
/// under the mask (the tokens up to and including the first EOS; none for
/// a masked truncated completion).
#[derive(Debug, Clone)]
pub struct SeqTerms<'a> {
    pub logp: &'a [f64],
    /// The sampling policy's log-probs; None: the policy itself (ratio 1).
    pub old: Option<&'a [f64]>,
    /// The reference's log-probs (β > 0).
    pub reference: Option<&'a [f64]>,
    pub advantage: f64,
}

/// What the normalisation divides by, beside each loss type's own counts.
#[derive(Debug, Clone, Copy)]
pub struct Norm {
    /// Micro-batches in the optimiser step (TRL's current_gradient_accumulation_steps).
    pub micro_batches: usize,
    /// Mask tokens of the whole generation batch (dapo).
    pub batch_tokens: usize,
    /// Completions in this micro-batch (grpo, dr_grpo), masked ones included.
    pub sequences: usize,
}

/// One micro-batch's loss (already divided as the step needs), its
/// derivative in each token's log-prob, and the sums its metrics need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MicroOut {
    pub loss: f64,
    /// dL/dlogp per sequence and token.
    pub dlogp: Vec<Vec<f64>>,
    /// Masked token means over this micro-batch (TRL logs one per micro-batch).
    pub kl: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub clip_region: f64,
    /// The smallest share of a sequence's tokens clipped low, and the
    /// largest clipped high (NaN when no sequence has a masked token).
    pub clip_low_min: f64,
    pub clip_high_max: f64,
    pub tokens: usize,
}

/// torch.minimum(a, b)'s gradient split: (share of a, share of b).
fn min_shares(a: f64, b: f64) -> (f64, f64) {
    if a < b {
        (1.0, 0.0)
    } else if a > b {
        (0.0, 1.0)
    } else {
        (0.5, 0.5)
    }
}

/// The loss of one micro-batch and its gradient in the log-probs.
pub fn micro_loss(s: &GrpoSettings, seqs: &[SeqTerms], norm: Norm) -> MicroOut {
    let (lo, hi) = (1.0 - s.epsilon, 1.0 + s.eps_high());
    let tokens: usize = seqs.iter().map(|q| q.logp.len()).sum();
    let ga = norm.micro_batches.max(1) as f64;
    // The weight of one token's loss in the micro-batch loss.
    let weight = |len: usize| -> f64 {
        match s.loss_type {
            GrpoLoss::Grpo => 1.0 / (len.max(1) as f64 * norm.sequences.max(1) as f64 * ga),
            GrpoLoss::Bnpo => 1.0 / (tokens.max(1) as f64 * ga),
            GrpoLoss::DrGrpo => 1.0 / ((norm.sequences * s.max_completion_length) as f64 * ga),
            GrpoLoss::Dapo => 1.0 / norm.batch_tokens.max(1) as f64,
        }
    };
    let mut out = MicroOut { tokens, clip_low_min: f64::NAN, clip_high_max: f64::NAN, ..MicroOut::default() };
    for q in seqs {
        let (low0, high0) = (out.clip_low, out.clip_high);
        let w = weight(q.logp.len());
        let a = q.advantage;
        let mut d = Vec::with_capacity(q.logp.len());
        for (t, &lp) in q.logp.iter().enumerate() {
            let old = q.old.map_or(lp, |o| o[t]);
            let coef1 = (lp - old).exp();
            let coef2 = coef1.clamp(lo, hi);
            let d2 = if (lo..=hi).contains(&coef1) { coef1 } else { 0.0 };
            let (c1, d1) = match s.delta {
                Some(delta) if coef1 > delta => (delta, 0.0),
                _ => (coef1, coef1),
            };
            let (l1, l2) = (c1 * a, coef2 * a);
            let (s1, s2) = min_shares(l1, l2);
            let mut loss = -l1.min(l2);
            let mut dl = -(s1 * d1 * a + s2 * d2 * a);
            if s.beta != 0.0 {
                let r = q.reference.expect("a reference log-prob when beta > 0")[t];
                let x = r - lp;
                let kl = x.exp() - x - 1.0;
                let dkl = 1.0 - x.exp();
                let (kl, dkl) = if s.use_bias_correction_kl { (kl * coef1, dkl * coef1 + kl * coef1) } else { (kl, dkl) };
                loss += s.beta * kl;
                dl += s.beta * dkl;
                out.kl += kl;
            }
            out.clip_low += (c1 < lo && a < 0.0) as u8 as f64;
            out.clip_high += (c1 > hi && a > 0.0) as u8 as f64;
            out.clip_region += ((c1 < lo && a < 0.0) || (c1 > hi && a > 0.0)) as u8 as f64;
            out.loss += w * loss;
            d.push(w * dl);
        }
        if !q.logp.is_empty() {
            // torch's nanmin / nanmax over the sequences' shares.
            let len = q.logp.len() as f64;
            let (low, high) = ((out.clip_low - low0) / len, (out.clip_high - high0) / len);
            out.clip_low_min = if out.clip_low_min.is_nan() { low } else { out.clip_low_min.min(low) };
            out.clip_high_max = if out.clip_high_max.is_nan() { high } else { out.clip_high_max.max(high) };
        }
        out.dlogp.push(d);
    }
    let denom = tokens.max(1) as f64;
    out.kl /= denom;
    out.clip_low /= denom;
    out.clip_high /= denom;
    out.clip_region /= denom;
    out
}

#[cfg(test)]
mod tests {
    //! Hand-worked cases; TRL's own numbers are in tests/grpo.rs.
    use super::*;

    #[test]
    fn group_advantages_use_the_unbiased_std_and_skip_unscored() {
        // Group (1, 0, 1, 0): mean 0.5, std sqrt(1/3) ≈ 0.57735.
        let per_func = vec![vec![1.0], vec![0.0], vec![1.0], vec![0.0], vec![2.0], vec![f64::NAN]];
        let s = advantages(&per_func, &[1.0], 4, ScaleRewards::Group);
        let a = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        assert!((s.advantages[0] - a).abs() < 1e-12 && (s.advantages[1] + a).abs() < 1e-12);
        // Second group: one scored value (std NaN) -> advantage NaN -> 0; the unscored one is 0 too.
        assert_eq!(&s.advantages[4..], &[0.0, 0.0]);
        assert!(s.rewards[5].is_nan());
        let none = advantages(&per_func, &[1.0], 4, ScaleRewards::None);
        assert_eq!(&none.advantages[..4], &[0.5, -0.5, 0.5, -0.5]);
    }

    #[test]
    fn on_policy_gradient_is_minus_advantage_over_tokens() {
        // Ratio 1 everywhere: dapo's loss is −Σ A / tokens, dL/dlogp = −A / tokens.
        let s = GrpoSettings::default();
        let (lp1, lp2) = (vec![-1.0, -2.0], vec![-0.5]);
        let seqs = [
            SeqTerms { logp: &lp1, old: None, reference: None, advantage: 1.5 },
            SeqTerms { logp: &lp2, old: None, reference: None, advantage: -1.0 },
        ];
        let out = micro_loss(&s, &seqs, Norm { micro_batches: 1, batch_tokens: 3, sequences: 2 });
        assert!((out.loss - (-(1.5 * 2.0) + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(out.dlogp, vec![vec![-0.5, -0.5], vec![1.0 / 3.0]]);
        assert_eq!(out.clip_region, 0.0);
    }

    #[test]
    fn clipped_tokens_have_no_gradient() {
        // ρ = e^0.5 ≈ 1.65 > 1.2 with A > 0: the clipped term is the min, its gradient 0.
        let s = GrpoSettings { loss_type: GrpoLoss::Bnpo, ..GrpoSettings::default() };
        let (lp, old) = (vec![0.0], vec![-0.5]);
        let seqs = [SeqTerms { logp: &lp, old: Some(&old), reference: None, advantage: 1.0 }];
        let out = micro_loss(&s, &seqs, Norm { micro_batches: 1, batch_tokens: 1, sequences: 1 });
        assert!((out.loss + 1.2).abs() < 1e-12);
        assert_eq!(out.dlogp, vec![vec![0.0]]);
        assert_eq!((out.clip_high, out.clip_low, out.clip_region), (1.0, 0.0, 1.0));
    }
}
