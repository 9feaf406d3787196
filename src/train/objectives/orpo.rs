//! ORPO (TRL's ORPOTrainer): the chosen sequence's NLL plus λ times the
//! log-sigmoid of the odds ratio, no reference model. `rl: orpo` selects it.

use super::math::{Metrics, PairGrad, PairLogps, PairLoss, batch_nll, check_pairs, log1mexp, log_sigmoid, pair_metrics, sigmoid};
use super::pairs::{PairObjective, Pairwise};
use super::Objective;
use crate::backend::Backend;
use crate::config::RunConfig;
use anyhow::{Result, bail};

/// ORPO: λ (TRL's `beta`, Axolotl's `rl_beta` or else `orpo_alpha`) weighs the odds-ratio term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OrpoConfig {
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        OrpoConfig { beta: 0.1 }
    }
}

impl PairObjective for OrpoConfig {
    fn needs_reference(&self) -> bool {
        false
    }
    fn needs_nll(&self) -> bool {
        true
    }
    fn nll_whole_chosen(&self) -> bool {
        true
    }

    /// NLL_chosen − λ·mean(logσ(log_odds)) on per-token-averaged log-probs.
    fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
        check_pairs(pairs, true)?;
        let beta = self.beta;
        let n = pairs.len() as f64;
        let (nll, dnll) = batch_nll(pairs);
        let (mut ratio_sum, mut odds_sum) = (0.0, 0.0);
        let mut grads = Vec::with_capacity(pairs.len());
        let (mut rewards, mut logps) = (Vec::new(), Vec::new());
        for (i, p) in pairs.iter().enumerate() {
            let (nc, nr) = (p.chosen.tokens as f64, p.rejected.tokens as f64);
            let (lw, ll) = (p.chosen.policy / nc, p.rejected.policy / nr);
            if lw >= 0.0 || ll >= 0.0 {
                bail!("pair {i}: ORPO needs average log-probabilities below 0 (probability < 1), found {lw} and {ll}");
            }
            let log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll));
            ratio_sum += log_sigmoid(log_odds);
            odds_sum += log_odds;
            // d log_odds / d lw = 1/(1 − e^lw); d/d ll = −1/(1 − e^ll).
            let d = -beta / n * sigmoid(-log_odds);
            grads.push(PairGrad {
                chosen: d / (-lw.exp_m1()) / nc,
                rejected: -d / (-ll.exp_m1()) / nr,
                chosen_nll: dnll,
            });
            rewards.push((beta * lw, beta * ll));
            logps.push((lw, ll));
        }
        let loss = nll - beta * ratio_sum / n;
        let mut metrics = Metrics::default();
        metrics.push("loss", loss);
        pair_metrics(&mut metrics, &rewards, &logps);
        metrics.push("nll_loss", nll);
        metrics.push("log_odds_ratio", ratio_sum / n);
        metrics.push("log_odds_chosen", odds_sum / n);
        Ok(PairLoss { loss, grads, metrics })
    }
}

/// `rl: orpo`; λ is rl_beta if set, else orpo_alpha (Axolotl passes
/// whichever is set as TRL's beta), else 0.1.
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    (cfg.rl.as_deref() == Some("orpo") && !cfg.reward_model).then(|| {
        let loss = OrpoConfig { beta: cfg.rl_beta.or(cfg.orpo_alpha).unwrap_or(0.1) };
        Ok(Box::new(Pairwise::new("Orpo", loss)) as Box<dyn Objective<B>>)
    })
}
