//! The shared arithmetic of the preference objectives: the per-sequence
//! log-probabilities they are functions of, their result types, TRL's
//! metrics container, and numerically stable log-sigmoid helpers.
//!
//! Every objective returns the batch loss and its derivative with respect to
//! each sequence's *summed* completion log-probability under the policy
//! (length-normalised objectives fold the 1/len into it). The training step
//! turns that into a weighted cross-entropy backward: each completion token
//! of sequence i carries weight −dL/dlogp_i on its token NLL. ORPO and CPO
//! also take a negative log-likelihood term (a sum of token NLLs) and give
//! dL/dNLL_sum, the weight each of those tokens' NLL carries. Reference
//! log-probabilities, the KTO KL estimate and reward margins are constants
//! (TRL computes them without gradient).

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

    pub fn push(&mut self, name: &'static str, value: f64) {
        self.0.push((name, value));
    }
}

/// An objective's result on a batch: the loss, its derivatives per item
/// (pair or example) and TRL's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss<G> {
    pub loss: f64,
    pub grads: Vec<G>,
    pub metrics: Metrics,
}

/// The result of a pairwise objective.
pub type PairLoss = Loss<PairGrad>;

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
pub(super) fn smoothed_logistic(z: f64, eps: f64) -> (f64, f64) {
    let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    let d = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
    (loss, d)
}

pub(super) fn mean(xs: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = xs.len();
    xs.sum::<f64>() / n as f64
}

/// Inputs every objective needs to make sense: a non-empty batch, finite
/// log-probs, at least one completion token per sequence.
pub(super) fn check_pairs(pairs: &[PairLogps], need_nll: bool) -> Result<()> {
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

pub(super) fn check_seq(s: &SeqLogps, what: &str) -> Result<()> {
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
pub(super) fn batch_nll(pairs: &[PairLogps]) -> (f64, f64) {
    let (sum, tokens) = pairs
        .iter()
        .filter_map(|p| p.chosen_nll)
        .fold((0.0, 0usize), |(s, t), n| (s + n.sum, t + n.tokens));
    (sum / tokens as f64, 1.0 / tokens as f64)
}

/// rewards/*, logps/* as DPO, ORPO and CPO log them: `rewards` and `logps`
/// per pair as (chosen, rejected).
pub(super) fn pair_metrics(m: &mut Metrics, rewards: &[(f64, f64)], logps: &[(f64, f64)]) {
    m.push("rewards/chosen", mean(rewards.iter().map(|r| r.0)));
    m.push("rewards/rejected", mean(rewards.iter().map(|r| r.1)));
    m.push("rewards/accuracies", mean(rewards.iter().map(|r| if r.0 > r.1 { 1.0 } else { 0.0 })));
    m.push("rewards/margins", mean(rewards.iter().map(|r| r.0 - r.1)));
    m.push("logps/chosen", mean(logps.iter().map(|l| l.0)));
    m.push("logps/rejected", mean(logps.iter().map(|l| l.1)));
}
