//! DPO (TRL's DPOTrainer): its loss types sigmoid, IPO, hinge and robust on
//! the policy/reference log-ratios of preference pairs. `rl: dpo` and
//! `rl: ipo` (DPO with loss_type ipo) select it.

use super::math::{Metrics, PairGrad, PairLogps, PairLoss, check_pairs, log_sigmoid, pair_metrics, sigmoid, smoothed_logistic};
use super::pairs::{PairObjective, Pairwise};
use super::Objective;
use crate::backend::Backend;
use crate::config::RunConfig;
use anyhow::{Result, bail};

/// DPO's `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    /// −logσ(βΔ); with label smoothing ε the conservative form
    /// −(1−ε)logσ(βΔ) − ε·logσ(−βΔ).
    Sigmoid,
    /// (Δ̄ − 1/(2β))², log-ratios divided by completion length.
    Ipo,
    /// relu(1 − βΔ).
    Hinge,
    /// [−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)]/(1−2ε).
    Robust,
}

impl DpoLoss {
    pub fn parse(name: &str) -> Result<DpoLoss> {
        Ok(match name {
            "sigmoid" => DpoLoss::Sigmoid,
            "ipo" => DpoLoss::Ipo,
            "hinge" => DpoLoss::Hinge,
            "robust" => DpoLoss::Robust,
            other => bail!("dpo_loss_type: \"{other}\" is not one of sigmoid, ipo, hinge, robust"),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    pub loss_type: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { loss_type: DpoLoss::Sigmoid, beta: 0.1, label_smoothing: 0.0 }
    }
}

impl PairObjective for DpoConfig {
    fn needs_reference(&self) -> bool {
        true
    }

    fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
        check_pairs(pairs, false)?;
        let (beta, eps) = (self.beta, self.label_smoothing);
        if self.loss_type == DpoLoss::Robust && !(0.0..0.5).contains(&eps) {
            bail!("the robust DPO loss needs label_smoothing in [0, 0.5), found {eps}");
        }
        let n = pairs.len() as f64;
        let mut loss = 0.0;
        let mut grads = Vec::with_capacity(pairs.len());
        for p in pairs {
            let ratio_c = p.chosen.policy - p.chosen.reference;
            let ratio_r = p.rejected.policy - p.rejected.reference;
            // (per-pair loss, its derivative in the chosen and rejected log-ratios)
            let (l, dc, dr) = match self.loss_type {
                DpoLoss::Sigmoid => {
                    let (l, d) = smoothed_logistic(beta * (ratio_c - ratio_r), eps);
                    (l, beta * d, -beta * d)
                }
                DpoLoss::Robust => {
                    let z = beta * (ratio_c - ratio_r);
                    let l = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps);
                    let d = (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1.0 - 2.0 * eps);
                    (l, beta * d, -beta * d)
                }
                DpoLoss::Hinge => {
                    let z = beta * (ratio_c - ratio_r);
                    if z < 1.0 { (1.0 - z, -beta, beta) } else { (0.0, 0.0, 0.0) }
                }
                DpoLoss::Ipo => {
                    let (nc, nr) = (p.chosen.tokens as f64, p.rejected.tokens as f64);
                    let u = ratio_c / nc - ratio_r / nr - 1.0 / (2.0 * beta);
                    (u * u, 2.0 * u / nc, -2.0 * u / nr)
                }
            };
            loss += l / n;
            grads.push(PairGrad { chosen: dc / n, rejected: dr / n, chosen_nll: 0.0 });
        }
        let rewards: Vec<(f64, f64)> = pairs
            .iter()
            .map(|p| (beta * (p.chosen.policy - p.chosen.reference), beta * (p.rejected.policy - p.rejected.reference)))
            .collect();
        let logps: Vec<(f64, f64)> = pairs.iter().map(|p| (p.chosen.policy, p.rejected.policy)).collect();
        let mut metrics = Metrics::default();
        metrics.push("loss", loss);
        pair_metrics(&mut metrics, &rewards, &logps);
        Ok(PairLoss { loss, grads, metrics })
    }
}

/// `rl: dpo` (loss_type from dpo_loss_type) or `rl: ipo`, β = rl_beta (0.1).
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    let rl = cfg.rl.as_deref().filter(|&rl| !cfg.reward_model && (rl == "dpo" || rl == "ipo"))?;
    let loss_type = match (rl, cfg.dpo_loss_type.as_deref()) {
        ("ipo", _) => Ok(DpoLoss::Ipo),
        (_, Some(t)) => DpoLoss::parse(t),
        (_, None) => Ok(DpoLoss::Sigmoid),
    };
    Some(loss_type.map(|loss_type| {
        let loss = DpoConfig { loss_type, beta: cfg.rl_beta.unwrap_or(0.1), label_smoothing: cfg.dpo_label_smoothing };
        Box::new(Pairwise::new("Dpo", loss)) as Box<dyn Objective<B>>
    }))
}
