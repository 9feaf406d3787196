//! CPO and SimPO (TRL's CPOTrainer), no reference model. `rl: simpo`
//! selects CPO with loss_type simpo (Axolotl's mapping).

use super::math::{Metrics, PairGrad, PairLogps, PairLoss, batch_nll, check_pairs, pair_metrics, smoothed_logistic};
use super::pairs::{PairObjective, Pairwise};
use super::Objective;
use crate::backend::Backend;
use crate::config::RunConfig;
use anyhow::Result;

/// CPO's `loss_type`; `Simpo` and `Ipo` length-normalise the log-probs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Simpo,
}

impl CpoLoss {
    fn averages(self) -> bool {
        matches!(self, CpoLoss::Ipo | CpoLoss::Simpo)
    }
}

/// CPO and SimPO (TRL's CPOTrainer): SimPO is loss_type Simpo with
/// cpo_alpha 0; cpo_alpha > 0 adds cpo_alpha × the chosen completion's
/// token-mean NLL.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpoConfig {
    pub loss_type: CpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub cpo_alpha: f64,
}

impl Default for CpoConfig {
    fn default() -> Self {
        CpoConfig { loss_type: CpoLoss::Sigmoid, beta: 0.1, label_smoothing: 0.0, simpo_gamma: 0.5, cpo_alpha: 1.0 }
    }
}

impl CpoConfig {
    /// SimPO as TRL documents it: loss_type simpo, no NLL term.
    pub fn simpo() -> CpoConfig {
        CpoConfig { loss_type: CpoLoss::Simpo, cpo_alpha: 0.0, ..CpoConfig::default() }
    }
}

impl PairObjective for CpoConfig {
    fn needs_reference(&self) -> bool {
        false
    }
    fn needs_nll(&self) -> bool {
        self.cpo_alpha != 0.0
    }

    fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
        let with_nll = self.cpo_alpha != 0.0;
        check_pairs(pairs, with_nll)?;
        let (beta, eps) = (self.beta, self.label_smoothing);
        let n = pairs.len() as f64;
        let (nll, dnll) = if with_nll { batch_nll(pairs) } else { (0.0, 0.0) };
        let mut loss = self.cpo_alpha * nll;
        let mut grads = Vec::with_capacity(pairs.len());
        let (mut rewards, mut logps) = (Vec::new(), Vec::new());
        for p in pairs {
            // Summed or length-averaged log-probs: scale maps a sum to the value used.
            let (sc, sr) = if self.loss_type.averages() {
                (1.0 / p.chosen.tokens as f64, 1.0 / p.rejected.tokens as f64)
            } else {
                (1.0, 1.0)
            };
            let (lc, lr) = (p.chosen.policy * sc, p.rejected.policy * sr);
            let x = lc - lr;
            // (per-pair loss, its derivative in x)
            let (l, d) = match self.loss_type {
                CpoLoss::Sigmoid => {
                    let (l, d) = smoothed_logistic(beta * x, eps);
                    (l, beta * d)
                }
                CpoLoss::Simpo => {
                    let (l, d) = smoothed_logistic(beta * (x - self.simpo_gamma / beta), eps);
                    (l, beta * d)
                }
                CpoLoss::Hinge => {
                    if beta * x < 1.0 { (1.0 - beta * x, -beta) } else { (0.0, 0.0) }
                }
                CpoLoss::Ipo => {
                    let u = x - 1.0 / (2.0 * beta);
                    (u * u, 2.0 * u)
                }
            };
            loss += l / n;
            grads.push(PairGrad {
                chosen: d / n * sc,
                rejected: -d / n * sr,
                chosen_nll: self.cpo_alpha * dnll,
            });
            rewards.push((beta * lc, beta * lr));
            logps.push((lc, lr));
        }
        let mut metrics = Metrics::default();
        metrics.push("loss", loss);
        pair_metrics(&mut metrics, &rewards, &logps);
        metrics.push("nll_loss", nll);
        Ok(PairLoss { loss, grads, metrics })
    }
}

/// `rl: simpo`: β = rl_beta (0.1), γ = simpo_gamma (0.5), cpo_alpha (0),
/// label smoothing from dpo_label_smoothing.
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    (cfg.rl.as_deref() == Some("simpo") && !cfg.reward_model).then(|| {
        let mut c = CpoConfig::simpo();
        c.beta = cfg.rl_beta.unwrap_or(0.1);
        c.label_smoothing = cfg.dpo_label_smoothing;
        c.simpo_gamma = cfg.simpo_gamma.unwrap_or(c.simpo_gamma);
        c.cpo_alpha = cfg.cpo_alpha.unwrap_or(0.0);
        Ok(Box::new(Pairwise::new("Cpo", c)) as Box<dyn Objective<B>>)
    })
}
