//! One micro-batch of preference pairs through the model: chosen and
//! rejected sequences in one batch ([chosen₁..chosen_k, rejected₁..rejected_k]),
//! the reference log-probs from the same model with its adapter switched
//! off, the objective evaluated on the summed log-probs (`objectives`), and
//! the backward with each token weighted by its sequence's dL/dlogp
//! (`TokenWeights::FromLosses`: the layers run forward once).

use super::objectives::{KtoConfig, KtoExample, KtoLoss, Metrics, NllSum, Objective, PairLogps, PairLoss, SeqLogps};
use crate::data::preference::{KtoExample as KtoExampleIds, completion_sequence};
use crate::backend::Backend;
use crate::data::preference::PreferencePair;
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::graph::{BackwardOpts, TokenWeights};
use anyhow::Result;

/// Where one sequence sits in the batch: its first token and its length,
/// and where its completion starts (the prompt's length).
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: usize,
    prompt: usize,
    len: usize,
}

impl Span {
    /// Token positions whose target is a completion token.
    fn completion(self) -> std::ops::Range<usize> {
        self.offset + self.prompt.max(1) - 1..self.offset + self.len - 1
    }

    /// Every position with a target (all tokens but the first predicted).
    fn whole(self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len - 1
    }
}

/// A micro-batch of pairs laid out as one batch.
pub struct PairBatch {
    pub batch: Batch,
    /// chosen spans then rejected spans.
    spans: Vec<Span>,
    k: usize,
}

/// Build the batch. The chosen sequences are labelled in full when the
/// objective's NLL covers the prompt too (ORPO); otherwise prompts are -100.
pub fn pair_batch(pairs: &[&PreferencePair], vocab: usize, whole_chosen: bool) -> Result<PairBatch> {
    let mut seqs: Vec<Sequence> = Vec::with_capacity(2 * pairs.len());
    let mut spans = Vec::with_capacity(2 * pairs.len());
    let mut offset = 0;
    for side in 0..2 {
        for p in pairs {
            let [chosen, rejected] = p.sequences();
            let mut s = if side == 0 { chosen } else { rejected };
            if side == 0 && whole_chosen {
                s = Sequence::unmasked(s.input_ids);
            }
            spans.push(Span { offset, prompt: p.prompt.len(), len: s.input_ids.len() });
            offset += s.input_ids.len();
            seqs.push(s);
        }
    }
    Ok(PairBatch { batch: Batch::from_sequences(&seqs, vocab)?, spans, k: pairs.len() })
}

fn sum(nll: &[f32], r: std::ops::Range<usize>) -> f64 {
    nll[r].iter().map(|&x| x as f64).sum()
}

/// The reference policy's log-probs of a micro-batch: per-token NLLs from
/// a forward with the adapter off, or per-pair sums computed before
/// training (precompute_ref_log_probs).
#[derive(Clone, Copy)]
pub enum Reference<'a> {
    None,
    Tokens(&'a [f32]),
    /// (chosen, rejected) summed completion log-probs, one per pair.
    Sums(&'a [(f64, f64)]),
}

impl PairBatch {
    /// The objective's view of the pairs, from per-token NLLs of the policy
    /// and (when the objective has one) of the reference.
    fn logps(&self, objective: &Objective, policy: &[f32], reference: Reference) -> Vec<PairLogps> {
        let seq = |span: Span, pre: Option<f64>| {
            let r = span.completion();
            let reference = match (reference, pre) {
                (Reference::Tokens(rf), _) => -sum(rf, r.clone()),
                (Reference::Sums(_), Some(v)) => v,
                _ => 0.0,
            };
            SeqLogps { policy: -sum(policy, r.clone()), reference, tokens: r.len() }
        };
        (0..self.k)
            .map(|i| {
                let (c, r) = (self.spans[i], self.spans[self.k + i]);
                let pre = match reference {
                    Reference::Sums(s) => Some(s[i]),
                    _ => None,
                };
                let chosen_nll = objective.needs_nll().then(|| {
                    let range = if matches!(objective, Objective::Orpo(_)) { c.whole() } else { c.completion() };
                    NllSum { sum: sum(policy, range.clone()), tokens: range.len() }
                });
                PairLogps { chosen: seq(c, pre.map(|p| p.0)), rejected: seq(r, pre.map(|p| p.1)), chosen_nll }
            })
            .collect()
    }

    /// Summed completion log-probs (chosen, rejected) per pair from per-token NLLs.
    fn completion_sums(&self, nll: &[f32]) -> Vec<(f64, f64)> {
        (0..self.k)
            .map(|i| (-sum(nll, self.spans[i].completion()), -sum(nll, self.spans[self.k + i].completion())))
            .collect()
    }

    /// Per-token weights: each completion token gets −scale·dL/dlogp of its
    /// sequence; the NLL term's tokens add scale·dL/dNLL.
    fn weights(&self, objective: &Objective, loss: &PairLoss, n: usize, scale: f64) -> Vec<f32> {
        let mut w = vec![0f64; n];
        for (i, g) in loss.grads.iter().enumerate() {
            let (c, r) = (self.spans[i], self.spans[self.k + i]);
            for t in c.completion() {
                w[t] -= scale * g.chosen;
            }
            for t in r.completion() {
                w[t] -= scale * g.rejected;
            }
            if g.chosen_nll != 0.0 {
                let range = if matches!(objective, Objective::Orpo(_)) { c.whole() } else { c.completion() };
                for t in range {
                    w[t] += scale * g.chosen_nll;
                }
            }
        }
        w.into_iter().map(|x| x as f32).collect()
    }
}

/// Loss and metrics of pairs without gradients (evaluation).
pub fn pair_eval<B: Backend>(be: &B, model: &Model<B>, objective: &Objective, pairs: &[&PreferencePair]) -> Result<PairLoss> {
    let pb = pair_batch(pairs, model.cfg.vocab, matches!(objective, Objective::Orpo(_)))?;
    let policy = model.token_nll(be, &pb.batch, true);
    let reference = objective.needs_reference().then(|| model.token_nll(be, &pb.batch, false));
    let reference = reference.as_deref().map_or(Reference::None, Reference::Tokens);
    objective.pair_loss(&pb.logps(objective, &policy, reference))
}

/// The reference policy's summed completion log-probs (chosen, rejected) of
/// pairs, computed with the adapter off (for precompute_ref_log_probs).
pub fn reference_sums<B: Backend>(be: &B, model: &Model<B>, pairs: &[&PreferencePair]) -> Result<Vec<(f64, f64)>> {
    let pb = pair_batch(pairs, model.cfg.vocab, false)?;
    Ok(pb.completion_sums(&model.token_nll(be, &pb.batch, false)))
}

/// Forward and backward of one micro-batch of pairs; LoRA gradients
/// accumulate, scaled by `scale` (this micro-batch's share of the step's
/// pairs, so the step's gradient is that of the mean over all its pairs).
pub fn pair_forward_backward<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    objective: &Objective,
    pairs: &[&PreferencePair],
    scale: f64,
    opts: BackwardOpts,
    precomputed: Option<&[(f64, f64)]>,
) -> Result<(PairLoss, usize)> {
    let pb = pair_batch(pairs, model.cfg.vocab, matches!(objective, Objective::Orpo(_)))?;
    let reference_tokens = (objective.needs_reference() && precomputed.is_none()).then(|| model.token_nll(be, &pb.batch, false));
    let reference = match (precomputed, reference_tokens.as_deref()) {
        (Some(s), _) => Reference::Sums(s),
        (None, Some(t)) => Reference::Tokens(t),
        (None, None) => Reference::None,
    };
    let mut result: Option<PairLoss> = None;
    let n = pb.batch.n_tokens();
    let mut choose = |nll: &[f32]| -> Result<Vec<f32>> {
        if nll.iter().any(|x| !x.is_finite()) {
            anyhow::bail!(
                "training diverged: the model's log-probabilities are no longer finite (NaN or infinite). \
                 The usual causes are a learning_rate that is too high (or max_grad_norm: 0, no clipping) or an rl_beta that is too low"
            );
        }
        let loss = objective.pair_loss(&pb.logps(objective, nll, reference))?;
        let w = pb.weights(objective, &loss, n, scale);
        result = Some(loss);
        Ok(w)
    };
    model.forward_backward_weighted(be, &pb.batch, opts, TokenWeights::FromLosses(&mut choose))?;
    let loss = result.expect("the weights were chosen");
    Ok((loss, n))
}

/// Metrics of several micro-batches, weighted by their pairs.
pub fn merge_metrics(parts: &[(Metrics, usize)]) -> Metrics {
    let total: usize = parts.iter().map(|(_, n)| n).sum();
    let Some((first, _)) = parts.first() else { return Metrics::default() };
    Metrics(
        first
            .0
            .iter()
            .map(|&(name, _)| {
                let v = parts.iter().map(|(m, n)| m.get(name).unwrap_or(0.0) * *n as f64).sum::<f64>() / total.max(1) as f64;
                (name, v)
            })
            .collect(),
    )
}

// ---------------------------------------------------------------- KTO

/// The completion's target positions of a prompt+completion sequence that
/// starts at `offset`.
fn completion_span(offset: usize, prompt: usize, completion: usize) -> Span {
    Span { offset, prompt, len: prompt + completion }
}

/// prompt_i + completion_i for every example (the trained batch), and
/// prompt_i + completion_{i−1} (the mismatched pairs of TRL's KL estimate;
/// the first example takes the last one's completion).
fn kto_batches(exs: &[&KtoExampleIds], vocab: usize) -> Result<(Batch, Vec<Span>, Batch, Vec<Span>)> {
    let build = |pick: &dyn Fn(usize) -> (usize, usize)| -> Result<(Batch, Vec<Span>)> {
        let mut seqs = Vec::with_capacity(exs.len());
        let mut spans = Vec::with_capacity(exs.len());
        let mut offset = 0;
        for i in 0..exs.len() {
            let (p, c) = pick(i);
            let s = completion_sequence(&exs[p].prompt, &exs[c].completion);
            spans.push(completion_span(offset, exs[p].prompt.len(), exs[c].completion.len()));
            offset += s.input_ids.len();
            seqs.push(s);
        }
        Ok((Batch::from_sequences(&seqs, vocab)?, spans))
    };
    let (main, main_spans) = build(&|i| (i, i))?;
    let (kl, kl_spans) = build(&|i| (i, (i + exs.len() - 1) % exs.len()))?;
    Ok((main, main_spans, kl, kl_spans))
}

fn kto_inputs(
    exs: &[&KtoExampleIds],
    spans: &[Span],
    policy: &[f32],
    reference: &[f32],
    kl_spans: &[Span],
    kl_policy: &[f32],
    kl_reference: &[f32],
) -> Vec<KtoExample> {
    (0..exs.len())
        .map(|i| {
            let r = spans[i].completion();
            let kr = kl_spans[i].completion();
            KtoExample {
                logps: SeqLogps { policy: -sum(policy, r.clone()), reference: -sum(reference, r.clone()), tokens: r.len() },
                desirable: exs[i].desirable,
                kl_policy: -sum(kl_policy, kr.clone()),
                kl_reference: -sum(kl_reference, kr),
            }
        })
        .collect()
}

/// KTO's loss of examples without gradients (evaluation).
pub fn kto_eval<B: Backend>(be: &B, model: &Model<B>, cfg: &KtoConfig, exs: &[&KtoExampleIds]) -> Result<KtoLoss> {
    let (main, spans, kl, kl_spans) = kto_batches(exs, model.cfg.vocab)?;
    let policy = model.token_nll(be, &main, true);
    let reference = model.token_nll(be, &main, false);
    let (klp, klr) = (model.token_nll(be, &kl, true), model.token_nll(be, &kl, false));
    cfg.loss(&kto_inputs(exs, &spans, &policy, &reference, &kl_spans, &klp, &klr))
}

/// Forward and backward of one micro-batch of KTO examples: the KL
/// estimate's mismatched pairs run without gradient (TRL detaches it), the
/// examples' completions are weighted by −scale·dL/dlogp.
pub fn kto_forward_backward<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    cfg: &KtoConfig,
    exs: &[&KtoExampleIds],
    scale: f64,
    opts: BackwardOpts,
) -> Result<(KtoLoss, usize)> {
    let (main, spans, kl, kl_spans) = kto_batches(exs, model.cfg.vocab)?;
    let reference = model.token_nll(be, &main, false);
    let (klp, klr) = (model.token_nll(be, &kl, true), model.token_nll(be, &kl, false));
    let n = main.n_tokens();
    let mut result = None;
    let mut choose = |nll: &[f32]| -> Result<Vec<f32>> {
        if nll.iter().chain(&klp).any(|x| !x.is_finite()) {
            anyhow::bail!(
                "training diverged: the model's log-probabilities are no longer finite (NaN or infinite). \
                 The usual causes are a learning_rate that is too high (or max_grad_norm: 0, no clipping) or an rl_beta that is too low"
            );
        }
        let loss = cfg.loss(&kto_inputs(exs, &spans, nll, &reference, &kl_spans, &klp, &klr))?;
        let mut w = vec![0f32; n];
        for (i, g) in loss.grads.iter().enumerate() {
            for t in spans[i].completion() {
                w[t] = (-scale * g) as f32;
            }
        }
        result = Some(loss);
        Ok(w)
    };
    model.forward_backward_weighted(be, &main, opts, TokenWeights::FromLosses(&mut choose))?;
    Ok((result.expect("the weights were chosen"), n + kl.n_tokens()))
}
