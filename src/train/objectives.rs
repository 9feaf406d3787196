//! The preference objectives as functions of per-sequence
//! log-probabilities, independent of the model: DPO (sigmoid, IPO, hinge,
//! robust), ORPO, CPO/SimPO, KTO and reward modelling, with TRL's default
//! hyper-parameters and the metrics TRL logs under TRL's names.
//!
//! Every objective returns the batch loss and its derivative with respect to
//! each sequence's *summed* completion log-probability under the policy
//! (length-normalised objectives fold the 1/len into it). The training loop
//! turns that into a weighted cross-entropy backward: each completion token
//! of sequence i carries weight −dL/dlogp_i on its token NLL. ORPO and CPO
//! also take a negative log-likelihood term (a sum of token NLLs) and give
//! dL/dNLL_sum, the weight each of those tokens' NLL carries.
//!
//! Reference log-probabilities, the KTO KL estimate and reward margins are
//! constants here (TRL computes them without gradient).

use anyhow::{Result, bail};

/// Log-probabilities of one completion: summed over its completion tokens
/// (never the prompt), under the policy (adapter on) and the reference
/// (adapter off), and how many tokens were summed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqLogps {
    pub policy: f64,
    /// Unused by the reference-free objectives (ORPO, CPO/SimPO).
    pub reference: f64,
    pub tokens: usize,
}

/// A negative log-likelihood term: Σ −log p over `tokens` scored tokens.
/// ORPO scores the whole chosen sequence (prompt included, every token but
/// the first); CPO the chosen completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NllSum {
    pub sum: f64,
    pub tokens: usize,
}

/// One preference pair as the pairwise objectives see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    pub chosen: SeqLogps,
    pub rejected: SeqLogps,
    /// Needed by ORPO, and by CPO when cpo_alpha ≠ 0; ignored otherwise.
    pub chosen_nll: Option<NllSum>,
}

/// The derivatives of the batch loss for one pair.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PairGrad {
    /// dL/d(summed policy log-prob of the chosen completion).
    pub chosen: f64,
    /// dL/d(summed policy log-prob of the rejected completion).
    pub rejected: f64,
    /// dL/d(the pair's NLL sum); 0 where the objective has no NLL term.
    pub chosen_nll: f64,
}

/// Metrics in TRL's names, in the order TRL logs them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics(pub Vec<(&'static str, f64)>);

impl Metrics {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| *k == name).map(|&(_, v)| v)
    }

    fn push(&mut self, name: &'static str, value: f64) {
        self.0.push((name, value));
    }
}

/// The result of a pairwise objective.
#[derive(Debug, Clone, PartialEq)]
pub struct PairLoss {
    pub loss: f64,
    pub grads: Vec<PairGrad>,
    pub metrics: Metrics,
}

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

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoConfig {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RewardConfig {
    /// Adds coefficient × mean((r_c + r_r)²), pulling rewards toward 0.
    pub center_rewards_coefficient: Option<f64>,
}

/// A preference objective with its hyper-parameters (TRL's defaults via
/// `Default` on each config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    Dpo(DpoConfig),
    Orpo(OrpoConfig),
    Cpo(CpoConfig),
    Kto(KtoConfig),
    Reward(RewardConfig),
}

impl Objective {
    /// Whether the objective needs reference log-probabilities (a forward
    /// pass with the adapter disabled).
    pub fn needs_reference(&self) -> bool {
        matches!(self, Objective::Dpo(_) | Objective::Kto(_))
    }

    /// Whether pairs must carry `chosen_nll`.
    pub fn needs_nll(&self) -> bool {
        match self {
            Objective::Orpo(_) => true,
            Objective::Cpo(c) => c.cpo_alpha != 0.0,
            _ => false,
        }
    }

    /// The loss of a batch of preference pairs (DPO, ORPO, CPO/SimPO).
    pub fn pair_loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
        match self {
            Objective::Dpo(c) => c.loss(pairs),
            Objective::Orpo(c) => c.loss(pairs),
            Objective::Cpo(c) => c.loss(pairs),
            Objective::Kto(_) => bail!("KTO trains on unpaired examples {{prompt, completion, label}}, not pairs"),
            Objective::Reward(_) => bail!("reward modelling takes the rewards of pairs, not log-probabilities"),
        }
    }
}

// ---------------------------------------------------------------- numerics

/// log σ(x), without overflow for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 { -(-x).exp().ln_1p() } else { x - x.exp().ln_1p() }
}

/// σ(x), without overflow for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 − eˣ) for x < 0, accurate on both sides of −ln 2.
pub fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 { (-x.exp()).ln_1p() } else { (-x.exp_m1()).ln() }
}

/// −(1−ε)·logσ(z) − ε·logσ(−z) and its derivative in z.
fn smoothed_logistic(z: f64, eps: f64) -> (f64, f64) {
    let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    let d = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
    (loss, d)
}

fn mean(xs: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = xs.len();
    xs.sum::<f64>() / n as f64
}

/// Inputs every objective needs to make sense: a non-empty batch, finite
/// log-probs, at least one completion token per sequence.
fn check_pairs(pairs: &[PairLogps], need_nll: bool) -> Result<()> {
    if pairs.is_empty() {
        bail!("a preference batch needs at least one pair");
    }
    for (i, p) in pairs.iter().enumerate() {
        for (which, s) in [("chosen", &p.chosen), ("rejected", &p.rejected)] {
            check_seq(s, &format!("pair {i}: {which}"))?;
        }
        if need_nll {
            match p.chosen_nll {
                None => bail!("pair {i}: this objective needs the chosen sequence's NLL sum"),
                Some(n) if n.tokens == 0 || !n.sum.is_finite() => {
                    bail!("pair {i}: the chosen NLL must be finite over at least one token, found {} over {}", n.sum, n.tokens)
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

fn check_seq(s: &SeqLogps, what: &str) -> Result<()> {
    if s.tokens == 0 {
        bail!("{what}: the completion has no tokens (nothing to score)");
    }
    if !s.policy.is_finite() || !s.reference.is_finite() {
        bail!("{what}: log-probabilities must be finite, found policy {} reference {}", s.policy, s.reference);
    }
    Ok(())
}

/// Σ NLL / Σ tokens over the batch (TRL's token-mean cross-entropy over the
/// chosen rows) and its derivative in each pair's NLL sum.
fn batch_nll(pairs: &[PairLogps]) -> (f64, f64) {
    let (sum, tokens) = pairs
        .iter()
        .filter_map(|p| p.chosen_nll)
        .fold((0.0, 0usize), |(s, t), n| (s + n.sum, t + n.tokens));
    (sum / tokens as f64, 1.0 / tokens as f64)
}

/// rewards/*, logps/* as DPO, ORPO and CPO log them: `rewards` and `logps`
/// per pair as (chosen, rejected).
fn pair_metrics(m: &mut Metrics, rewards: &[(f64, f64)], logps: &[(f64, f64)]) {
    m.push("rewards/chosen", mean(rewards.iter().map(|r| r.0)));
    m.push("rewards/rejected", mean(rewards.iter().map(|r| r.1)));
    m.push("rewards/accuracies", mean(rewards.iter().map(|r| if r.0 > r.1 { 1.0 } else { 0.0 })));
    m.push("rewards/margins", mean(rewards.iter().map(|r| r.0 - r.1)));
    m.push("logps/chosen", mean(logps.iter().map(|l| l.0)));
    m.push("logps/rejected", mean(logps.iter().map(|l| l.1)));
}

// ---------------------------------------------------------------- DPO

impl DpoConfig {
    pub fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
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

// ---------------------------------------------------------------- ORPO

impl OrpoConfig {
    /// NLL_chosen − λ·mean(logσ(log_odds)) on per-token-averaged log-probs.
    pub fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
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

// ---------------------------------------------------------------- CPO / SimPO

impl CpoConfig {
    pub fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss> {
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

// ---------------------------------------------------------------- KTO

/// One KTO example: its completion's log-probs, whether it is desirable,
/// and the log-probs (policy, reference) of the mismatched pair TRL pairs
/// it with for the KL estimate: this prompt with the previous example's
/// completion (the first example takes the last one's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoExample {
    pub logps: SeqLogps,
    pub desirable: bool,
    pub kl_policy: f64,
    pub kl_reference: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KtoLoss {
    pub loss: f64,
    /// dL/d(summed policy log-prob) per example.
    pub grads: Vec<f64>,
    pub metrics: Metrics,
}

impl KtoConfig {
    /// Desirable 1 − σ(β(r − z)), undesirable 1 − σ(β(z − r)), each
    /// weighted, averaged over the batch; z = max(0, mean KL log-ratio),
    /// without gradient.
    pub fn loss(&self, examples: &[KtoExample]) -> Result<KtoLoss> {
        if examples.is_empty() {
            bail!("a KTO batch needs at least one example");
        }
        for (i, e) in examples.iter().enumerate() {
            check_seq(&e.logps, &format!("example {i}"))?;
            if !e.kl_policy.is_finite() || !e.kl_reference.is_finite() {
                bail!("example {i}: the KL pair's log-probabilities must be finite");
            }
        }
        let beta = self.beta;
        let n = examples.len() as f64;
        let kl = mean(examples.iter().map(|e| e.kl_policy - e.kl_reference)).max(0.0);
        let mut loss = 0.0;
        let mut grads = Vec::with_capacity(examples.len());
        for e in examples {
            let r = e.logps.policy - e.logps.reference;
            let (w, u, sign) = if e.desirable {
                (self.desirable_weight, beta * (r - kl), 1.0)
            } else {
                (self.undesirable_weight, beta * (kl - r), -1.0)
            };
            let s = sigmoid(u);
            loss += w * (1.0 - s) / n;
            // d(1 − σ(u))/dr = −σ(u)σ(−u)·du/dr, du/dr = ±β.
            grads.push(-w * s * sigmoid(-u) * sign * beta / n);
        }
        let mut metrics = Metrics::default();
        metrics.push("loss", loss);
        metrics.push("kl", kl);
        let group = |want: bool| {
            let sel: Vec<&KtoExample> = examples.iter().filter(|e| e.desirable == want).collect();
            (!sel.is_empty()).then(|| {
                let k = sel.len() as f64;
                let rewards = sel.iter().map(|e| beta * (e.logps.policy - e.logps.reference)).sum::<f64>() / k;
                let logps = sel.iter().map(|e| e.logps.policy).sum::<f64>() / k;
                (rewards, logps)
            })
        };
        let (chosen, rejected) = (group(true), group(false));
        if let Some((r, l)) = chosen {
            metrics.push("rewards/chosen", r);
            metrics.push("logps/chosen", l);
        }
        if let Some((r, l)) = rejected {
            metrics.push("rewards/rejected", r);
            metrics.push("logps/rejected", l);
        }
        if let (Some((rc, _)), Some((rr, _))) = (chosen, rejected) {
            metrics.push("rewards/margins", rc - rr);
        }
        Ok(KtoLoss { loss, grads, metrics })
    }
}

// ---------------------------------------------------------------- reward model

/// The scalar rewards of one pair and its optional margin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RewardPair {
    pub chosen: f64,
    pub rejected: f64,
    pub margin: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewardLoss {
    pub loss: f64,
    /// dL/dr per pair (`chosen_nll` is 0).
    pub grads: Vec<PairGrad>,
    pub metrics: Metrics,
}

impl RewardConfig {
    /// mean(−logσ(r_c − r_r − margin)) [+ c·mean((r_c + r_r)²)].
    pub fn loss(&self, pairs: &[RewardPair]) -> Result<RewardLoss> {
        if pairs.is_empty() {
            bail!("a reward-model batch needs at least one pair");
        }
        if let Some(i) = pairs.iter().position(|p| !(p.chosen.is_finite() && p.rejected.is_finite() && p.margin.is_finite())) {
            bail!("pair {i}: rewards and margin must be finite");
        }
        let n = pairs.len() as f64;
        let c = self.center_rewards_coefficient.unwrap_or(0.0);
        let mut loss = 0.0;
        let mut grads = Vec::with_capacity(pairs.len());
        for p in pairs {
            let z = p.chosen - p.rejected - p.margin;
            let sum = p.chosen + p.rejected;
            loss += (-log_sigmoid(z) + c * sum * sum) / n;
            let d = -sigmoid(-z);
            grads.push(PairGrad { chosen: (d + 2.0 * c * sum) / n, rejected: (-d + 2.0 * c * sum) / n, chosen_nll: 0.0 });
        }
        let all = pairs.iter().flat_map(|p| [p.chosen, p.rejected]);
        let mut metrics = Metrics::default();
        metrics.push("loss", loss);
        metrics.push("min_reward", all.clone().fold(f64::INFINITY, f64::min));
        metrics.push("mean_reward", all.clone().sum::<f64>() / (2.0 * n));
        metrics.push("max_reward", all.fold(f64::NEG_INFINITY, f64::max));
        metrics.push("accuracy", mean(pairs.iter().map(|p| if p.chosen > p.rejected { 1.0 } else { 0.0 })));
        metrics.push("margin", mean(pairs.iter().map(|p| p.chosen - p.rejected)));
        Ok(RewardLoss { loss, grads, metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(policy: f64, reference: f64, tokens: usize) -> SeqLogps {
        SeqLogps { policy, reference, tokens }
    }

    /// Three pairs of mixed sign margins and lengths, NLL sums included.
    fn pairs() -> Vec<PairLogps> {
        vec![
            PairLogps { chosen: seq(-12.5, -13.0, 5), rejected: seq(-20.0, -18.5, 7), chosen_nll: Some(NllSum { sum: 30.0, tokens: 12 }) },
            PairLogps { chosen: seq(-8.0, -7.0, 3), rejected: seq(-9.5, -10.25, 4), chosen_nll: Some(NllSum { sum: 21.5, tokens: 9 }) },
            PairLogps { chosen: seq(-30.0, -31.5, 11), rejected: seq(-4.0, -4.5, 2), chosen_nll: Some(NllSum { sum: 55.0, tokens: 20 }) },
        ]
    }

    fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
        let scale = want.abs().max(1e-3);
        assert!((got - want).abs() <= tol * scale, "{what}: got {got}, want {want}");
    }

    /// Central differences (h = 1e-5) of a loss in each input it is
    /// differentiated by, against the analytic derivatives.
    fn check_pair_grads(objective: &Objective, base: &[PairLogps]) {
        let out = objective.pair_loss(base).unwrap();
        let h = 1e-5;
        let eval = |f: &dyn Fn(&mut PairLogps, f64), i: usize| {
            let mut plus = base.to_vec();
            let mut minus = base.to_vec();
            f(&mut plus[i], h);
            f(&mut minus[i], -h);
            (objective.pair_loss(&plus).unwrap().loss - objective.pair_loss(&minus).unwrap().loss) / (2.0 * h)
        };
        for i in 0..base.len() {
            let fc = eval(&|p: &mut PairLogps, d| p.chosen.policy += d, i);
            let fr = eval(&|p: &mut PairLogps, d| p.rejected.policy += d, i);
            let fn_ = eval(&|p: &mut PairLogps, d| p.chosen_nll.as_mut().unwrap().sum += d, i);
            assert_close(out.grads[i].chosen, fc, 1e-7, &format!("{objective:?} pair {i} chosen"));
            assert_close(out.grads[i].rejected, fr, 1e-7, &format!("{objective:?} pair {i} rejected"));
            assert_close(out.grads[i].chosen_nll, fn_, 1e-7, &format!("{objective:?} pair {i} nll"));
        }
    }

    #[test]
    fn pair_objective_derivatives_match_finite_differences() {
        let variants = [
            Objective::Dpo(DpoConfig::default()),
            Objective::Dpo(DpoConfig { label_smoothing: 0.2, beta: 0.5, ..DpoConfig::default() }),
            Objective::Dpo(DpoConfig { loss_type: DpoLoss::Ipo, ..DpoConfig::default() }),
            Objective::Dpo(DpoConfig { loss_type: DpoLoss::Hinge, ..DpoConfig::default() }),
            Objective::Dpo(DpoConfig { loss_type: DpoLoss::Robust, label_smoothing: 0.1, beta: 0.3 }),
            Objective::Orpo(OrpoConfig::default()),
            Objective::Orpo(OrpoConfig { beta: 0.7 }),
            Objective::Cpo(CpoConfig::default()),
            Objective::Cpo(CpoConfig::simpo()),
            Objective::Cpo(CpoConfig { label_smoothing: 0.1, cpo_alpha: 0.5, ..CpoConfig::simpo() }),
            Objective::Cpo(CpoConfig { loss_type: CpoLoss::Hinge, ..CpoConfig::default() }),
            Objective::Cpo(CpoConfig { loss_type: CpoLoss::Ipo, ..CpoConfig::default() }),
        ];
        for v in &variants {
            check_pair_grads(v, &pairs());
        }
    }

    #[test]
    fn hinge_is_flat_past_the_margin() {
        // βΔ = 2·(1 − (−1)) = 4 > 1: no loss, no gradient.
        let p = [PairLogps { chosen: seq(-1.0, -2.0, 2), rejected: seq(-3.0, -2.0, 2), chosen_nll: None }];
        let out = DpoConfig { loss_type: DpoLoss::Hinge, beta: 2.0, label_smoothing: 0.0 }.loss(&p).unwrap();
        assert_eq!(out.loss, 0.0);
        assert_eq!(out.grads[0], PairGrad::default());
    }

    #[test]
    fn dpo_values_by_hand() {
        // Δ = (−1 − −2) − (−3 − −2) = 2, β = 0.1: loss = −logσ(0.2) = ln(1 + e^−0.2).
        let p = [PairLogps { chosen: seq(-1.0, -2.0, 2), rejected: seq(-3.0, -2.0, 4), chosen_nll: None }];
        let out = DpoConfig::default().loss(&p).unwrap();
        assert_close(out.loss, (1.0 + (-0.2f64).exp()).ln(), 1e-15, "sigmoid");
        assert_close(out.metrics.get("rewards/chosen").unwrap(), 0.1, 1e-15, "rewards/chosen");
        assert_close(out.metrics.get("rewards/rejected").unwrap(), -0.1, 1e-15, "rewards/rejected");
        assert_close(out.metrics.get("rewards/margins").unwrap(), 0.2, 1e-15, "margins");
        assert_eq!(out.metrics.get("rewards/accuracies"), Some(1.0));
        assert_eq!(out.metrics.get("logps/rejected"), Some(-3.0));
        // IPO: Δ̄ = 1/2 − (−1/4) = 0.75; (0.75 − 5)² = 18.0625.
        let ipo = DpoConfig { loss_type: DpoLoss::Ipo, ..DpoConfig::default() }.loss(&p).unwrap();
        assert_close(ipo.loss, 18.0625, 1e-15, "ipo");
        // Hinge: 1 − 0.2.
        let hinge = DpoConfig { loss_type: DpoLoss::Hinge, ..DpoConfig::default() }.loss(&p).unwrap();
        assert_close(hinge.loss, 0.8, 1e-15, "hinge");
        // Robust with ε = 0 is plain sigmoid; ε ≥ 0.5 is refused.
        let robust = DpoConfig { loss_type: DpoLoss::Robust, ..DpoConfig::default() }.loss(&p).unwrap();
        assert_close(robust.loss, out.loss, 1e-15, "robust ε=0");
        let e = DpoConfig { loss_type: DpoLoss::Robust, label_smoothing: 0.5, beta: 0.1 }.loss(&p).unwrap_err();
        assert!(e.to_string().contains("[0, 0.5)"), "{e}");
    }

    #[test]
    fn orpo_values_by_hand() {
        // Averages ln 0.5 and ln 0.25: odds 1 and 1/3, log-odds ratio ln 3.
        let p = [PairLogps {
            chosen: seq(2.0 * 0.5f64.ln(), 0.0, 2),
            rejected: seq(3.0 * 0.25f64.ln(), 0.0, 3),
            chosen_nll: Some(NllSum { sum: 6.0, tokens: 4 }),
        }];
        let out = OrpoConfig::default().loss(&p).unwrap();
        let log_odds = 3f64.ln();
        assert_close(out.metrics.get("log_odds_chosen").unwrap(), log_odds, 1e-14, "log_odds_chosen");
        assert_close(out.metrics.get("log_odds_ratio").unwrap(), log_sigmoid(log_odds), 1e-14, "log_odds_ratio");
        assert_close(out.metrics.get("nll_loss").unwrap(), 1.5, 1e-15, "nll");
        assert_close(out.loss, 1.5 - 0.1 * (0.75f64).ln(), 1e-14, "loss");
        assert!(OrpoConfig::default().loss(&[PairLogps { chosen_nll: None, ..p[0] }]).is_err());
    }

    #[test]
    fn simpo_values_by_hand() {
        // Averages −1 and −2: −logσ(β·1 − γ) = −logσ(−0.4).
        let p = [PairLogps { chosen: seq(-2.0, 0.0, 2), rejected: seq(-6.0, 0.0, 3), chosen_nll: None }];
        let out = CpoConfig::simpo().loss(&p).unwrap();
        assert_close(out.loss, -log_sigmoid(-0.4), 1e-15, "simpo");
        assert_close(out.metrics.get("rewards/chosen").unwrap(), -0.1, 1e-15, "rewards/chosen");
        assert_eq!(out.metrics.get("nll_loss"), Some(0.0));
        // CPO (sigmoid on sums) with its NLL term: −logσ(0.1·4) + 1·(5/2).
        let with_nll = [PairLogps { chosen_nll: Some(NllSum { sum: 5.0, tokens: 2 }), ..p[0] }];
        let cpo = CpoConfig::default().loss(&with_nll).unwrap();
        assert_close(cpo.loss, -log_sigmoid(0.4) + 2.5, 1e-15, "cpo");
    }

    fn kto_examples() -> Vec<KtoExample> {
        vec![
            KtoExample { logps: seq(-10.0, -11.0, 4), desirable: true, kl_policy: -20.0, kl_reference: -21.0 },
            KtoExample { logps: seq(-15.0, -14.0, 6), desirable: false, kl_policy: -12.0, kl_reference: -12.5 },
            KtoExample { logps: seq(-7.0, -9.0, 3), desirable: true, kl_policy: -30.0, kl_reference: -30.1 },
            KtoExample { logps: seq(-22.0, -21.0, 8), desirable: false, kl_policy: -9.0, kl_reference: -8.0 },
        ]
    }

    #[test]
    fn kto_derivatives_match_finite_differences() {
        for cfg in [KtoConfig::default(), KtoConfig { beta: 0.4, desirable_weight: 1.33, undesirable_weight: 0.7 }] {
            let base = kto_examples();
            let out = cfg.loss(&base).unwrap();
            let h = 1e-5;
            for i in 0..base.len() {
                let (mut plus, mut minus) = (base.clone(), base.clone());
                plus[i].logps.policy += h;
                minus[i].logps.policy -= h;
                let fd = (cfg.loss(&plus).unwrap().loss - cfg.loss(&minus).unwrap().loss) / (2.0 * h);
                assert_close(out.grads[i], fd, 1e-7, &format!("kto example {i}"));
            }
        }
    }

    #[test]
    fn kto_values_by_hand() {
        let ex = kto_examples();
        let out = KtoConfig::default().loss(&ex).unwrap();
        // KL: mean(1, 0.5, 0.1, −1) = 0.15.
        let z = 0.15;
        assert_close(out.metrics.get("kl").unwrap(), z, 1e-14, "kl");
        let want = ((1.0 - sigmoid(0.1 * (1.0 - z)))
            + (1.0 - sigmoid(0.1 * (z + 1.0)))
            + (1.0 - sigmoid(0.1 * (2.0 - z)))
            + (1.0 - sigmoid(0.1 * (z + 1.0))))
            / 4.0;
        assert_close(out.loss, want, 1e-15, "loss");
        assert_close(out.metrics.get("rewards/chosen").unwrap(), 0.15, 1e-14, "rewards/chosen");
        assert_close(out.metrics.get("rewards/rejected").unwrap(), -0.1, 1e-14, "rewards/rejected");
        assert_close(out.metrics.get("rewards/margins").unwrap(), 0.25, 1e-14, "margins");
        assert_close(out.metrics.get("logps/chosen").unwrap(), -8.5, 1e-15, "logps/chosen");
        // A negative KL estimate is clamped at 0.
        let mut neg = ex.clone();
        for e in &mut neg {
            e.kl_policy = e.kl_reference - 1.0;
        }
        assert_eq!(KtoConfig::default().loss(&neg).unwrap().metrics.get("kl"), Some(0.0));
        // Only desirable examples: no rejected metrics, no margin.
        let only = KtoConfig::default().loss(&ex[..1]).unwrap();
        assert_eq!(only.metrics.get("rewards/rejected"), None);
        assert_eq!(only.metrics.get("rewards/margins"), None);
    }

    #[test]
    fn reward_loss_values_and_derivatives() {
        let pairs = [
            RewardPair { chosen: 1.5, rejected: -0.5, margin: 0.0 },
            RewardPair { chosen: -0.25, rejected: 0.75, margin: 0.5 },
        ];
        let cfg = RewardConfig { center_rewards_coefficient: Some(0.01) };
        let out = cfg.loss(&pairs).unwrap();
        let want = (-log_sigmoid(2.0) - log_sigmoid(-1.5)) / 2.0 + 0.01 * (1.0 + 0.25) / 2.0;
        assert_close(out.loss, want, 1e-15, "loss");
        assert_eq!(out.metrics.get("accuracy"), Some(0.5));
        assert_eq!(out.metrics.get("min_reward"), Some(-0.5));
        assert_eq!(out.metrics.get("max_reward"), Some(1.5));
        assert_close(out.metrics.get("margin").unwrap(), 0.5, 1e-15, "margin");
        let h = 1e-5;
        for i in 0..2 {
            for chosen in [true, false] {
                let (mut plus, mut minus) = (pairs, pairs);
                let (p, m) = if chosen {
                    (&mut plus[i].chosen, &mut minus[i].chosen)
                } else {
                    (&mut plus[i].rejected, &mut minus[i].rejected)
                };
                *p += h;
                *m -= h;
                let fd = (cfg.loss(&plus).unwrap().loss - cfg.loss(&minus).unwrap().loss) / (2.0 * h);
                let g = if chosen { out.grads[i].chosen } else { out.grads[i].rejected };
                assert_close(g, fd, 1e-7, &format!("reward pair {i} chosen={chosen}"));
            }
        }
    }

    #[test]
    fn stable_at_extremes() {
        assert_eq!(log_sigmoid(1000.0), 0.0);
        assert_eq!(log_sigmoid(-1000.0), -1000.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_close(log1mexp(-1e-10), (1e-10f64).ln(), 1e-9, "log1mexp near 0");
        assert_close(log1mexp(-50.0), -(-50f64).exp(), 1e-12, "log1mexp far");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut p = pairs();
        p[1].rejected.tokens = 0;
        let e = DpoConfig::default().loss(&p).unwrap_err().to_string();
        assert!(e.contains("pair 1: rejected") && e.contains("no tokens"), "{e}");
        p[1].rejected.tokens = 3;
        p[2].chosen.policy = f64::NAN;
        assert!(DpoConfig::default().loss(&p).unwrap_err().to_string().contains("finite"));
        assert!(DpoConfig::default().loss(&[]).is_err());
        let e = Objective::Kto(KtoConfig::default()).pair_loss(&pairs()).unwrap_err().to_string();
        assert!(e.contains("unpaired"), "{e}");
        assert!(DpoLoss::parse("sppo").unwrap_err().to_string().contains("sigmoid, ipo, hinge, robust"));
    }
}
