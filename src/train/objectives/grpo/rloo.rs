//! RLOO's arithmetic (`rl: rloo`, TRL 1.16's RLOOTrainer) on GRPO's
//! sampler: rewards (clamped, minus β times the completion's summed
//! first-order KL to the reference) into leave-one-out advantages, and the
//! sequence-level clipped surrogate over one micro-batch with its derivative
//! in each token's log-prob. Pure functions of numbers, in f64, so the tests
//! can hold them to TRL's own code on logged completions.

use super::loss::{Advantages, MicroOut, Norm, SeqTerms, nanmean, nanstd};
use crate::config::grpo::{GrpoSettings, RlooOptions};

/// Rewards per completion and function (`per_func[i][f]`, NaN for None)
/// into RLOO's advantages; groups of `g` consecutive completions.
/// `kl_sums[i]`: Σ_t (logp_old − logp_ref) over completion i's masked
/// tokens (read only when β ≠ 0). The returned `rewards` are the weighted
/// sums before the clamp and the KL (what TRL logs), `std` each group's std
/// of the final rewards (frac_reward_zero_std).
pub fn advantages(per_func: &[Vec<f64>], weights: &[f64], g: usize, o: RlooOptions, beta: f64, kl_sums: &[f64]) -> Advantages {
    let logged = super::loss::weighted_rewards(per_func, weights);
    let rewards: Vec<f64> = logged
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            // torch.clamp keeps NaN (an unscored completion stays out of the baselines).
            let r = o.reward_clip_range.map_or(r, |(lo, hi)| if r.is_nan() { r } else { r.clamp(lo, hi) });
            if beta != 0.0 { r - beta * kl_sums[i] } else { r }
        })
        .collect();
    let g = g.max(1);
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut std = vec![0.0; n];
    for (gi, group) in rewards.chunks(g).enumerate() {
        let scorable = group.iter().filter(|x| !x.is_nan()).count() as f64;
        let sum: f64 = group.iter().filter(|x| !x.is_nan()).sum();
        let sd = if g > 1 { nanstd(group) } else { 0.0 };
        for (j, &r) in group.iter().enumerate() {
            // The mean of the other scored completions; NaN (then 0) when
            // none is left, as TRL's 0/0.
            adv[gi * g + j] = if g > 1 { r - (sum - r) / (scorable - 1.0) } else { 0.0 };
            std[gi * g + j] = sd;
        }
    }
    if o.normalize_advantages {
        let (m, s) = (nanmean(&adv), nanstd(&adv));
        adv.iter_mut().for_each(|a| *a = (*a - m) / (s + 1e-4));
    }
    adv.iter_mut().filter(|a| a.is_nan()).for_each(|a| *a = 0.0);
    Advantages { rewards: logged, advantages: adv, std }
}

/// Per completion Σ_t (logp_old − logp_ref) over its masked tokens (the
/// KL in its reward), and the token mean over the batch (the kl metric).
pub fn kl_sums(old: &[Vec<f64>], reference: &[Vec<f64>]) -> (Vec<f64>, f64) {
    let sums: Vec<f64> = old.iter().zip(reference).map(|(o, r)| o.iter().zip(r).map(|(a, b)| a - b).sum()).collect();
    let tokens: usize = old.iter().map(Vec::len).sum();
    let mean = sums.iter().sum::<f64>() / tokens.max(1) as f64;
    (sums, mean)
}

/// One micro-batch's loss: the mean over its completions of
/// −min(c·A, clip(c, 1 − ε, 1 + ε_high)·A) with c = exp(Σ logp − Σ logp_old),
/// ÷ the micro-batches of the step (TRL's loss is unscaled; the Trainer
/// divides by gradient accumulation). A completion without masked tokens has
/// c = 1 and counts in the mean. clip_ratio/* are shares of completions.
pub fn micro_loss(s: &GrpoSettings, seqs: &[SeqTerms], norm: Norm) -> MicroOut {
    let (lo, hi) = (1.0 - s.epsilon, 1.0 + s.eps_high());
    let n = seqs.len().max(1) as f64;
    let w = 1.0 / (n * norm.micro_batches.max(1) as f64);
    let tokens: usize = seqs.iter().map(|q| q.logp.len()).sum();
    let mut out = MicroOut { tokens, clip_low_min: f64::NAN, clip_high_max: f64::NAN, kl: f64::NAN, ..MicroOut::default() };
    for q in seqs {
        let logp: f64 = q.logp.iter().sum();
        let old: f64 = q.old.map_or(logp, |o| o.iter().sum());
        let a = q.advantage;
        let c = (logp - old).exp();
        let c2 = c.clamp(lo, hi);
        let (l1, l2) = (c * a, c2 * a);
        // torch.minimum splits a tie's gradient evenly; clamp passes it inside [lo, hi].
        let (s1, s2) = if l1 < l2 {
            (1.0, 0.0)
        } else if l1 > l2 {
            (0.0, 1.0)
        } else {
            (0.5, 0.5)
        };
        let d2 = if (lo..=hi).contains(&c) { c } else { 0.0 };
        out.loss += -w * l1.min(l2);
        // dc/dlogp_t = c for every token of the sum.
        let d = -w * (s1 * c * a + s2 * d2 * a);
        out.dlogp.push(vec![d; q.logp.len()]);
        let (low, high) = ((c < lo && a < 0.0) as u8 as f64, (c > hi && a > 0.0) as u8 as f64);
        out.clip_low += low / n;
        out.clip_high += high / n;
        out.clip_region += low.max(high) / n;
        out.clip_low_min = if out.clip_low_min.is_nan() { low } else { out.clip_low_min.min(low) };
        out.clip_high_max = if out.clip_high_max.is_nan() { high } else { out.clip_high_max.max(high) };
    }
    out
}

#[cfg(test)]
mod tests {
    //! Hand-worked cases; TRL's own numbers are in tests/rloo.rs.
    use super::*;

    #[test]
    fn leave_one_out_baseline_skips_unscored() {
        let per_func = vec![vec![1.0], vec![0.0], vec![2.0], vec![3.0], vec![5.0], vec![f64::NAN]];
        let a = advantages(&per_func, &[1.0], 3, RlooOptions::default(), 0.0, &[]);
        // Group (1, 0, 2): 1 − 1, 0 − 1.5, 2 − 0.5; group (3, 5, NaN): 3 − 5, 5 − 3, NaN → 0.
        assert_eq!(a.advantages, vec![0.0, -1.5, 1.5, -2.0, 2.0, 0.0]);
    }

    #[test]
    fn clip_and_kl_shape_the_reward() {
        let o = RlooOptions { normalize_advantages: false, reward_clip_range: Some((0.0, 1.0)) };
        let a = advantages(&[vec![3.0], vec![-1.0]], &[1.0], 2, o, 0.5, &[2.0, 0.0]);
        // Clamped (1, 0), minus 0.5·(2, 0): (0, 0).
        assert_eq!(a.advantages, vec![0.0, 0.0]);
        assert_eq!(a.rewards, vec![3.0, -1.0]);
    }

    #[test]
    fn on_policy_gradient_is_minus_advantage_over_sequences() {
        let s = GrpoSettings::default();
        let (lp1, lp2) = (vec![-1.0, -2.0], vec![]);
        let seqs = [
            SeqTerms { logp: &lp1, old: Some(&lp1), reference: None, advantage: 1.5 },
            SeqTerms { logp: &lp2, old: Some(&lp2), reference: None, advantage: -1.0 },
        ];
        let out = micro_loss(&s, &seqs, Norm { micro_batches: 2, batch_tokens: 2, sequences: 2 });
        assert!((out.loss - (-1.5 + 1.0) / 4.0).abs() < 1e-12);
        assert_eq!(out.dlogp, vec![vec![-1.5 / 4.0; 2], vec![]]);
    }
}
