//! The pipeline the pairwise preference objectives share (DPO, ORPO,
//! CPO/SimPO): one micro-batch of pairs through the model as one batch
//! ([chosen₁..chosen_k, rejected₁..rejected_k]), the reference log-probs from
//! the same model with its adapter switched off, the objective's loss on the
//! summed log-probs, and the backward with each token weighted by its
//! sequence's dL/dlogp (the layers run forward once). [`Pairwise`] makes any
//! [`PairObjective`] a training [`Objective`].

use super::math::{Metrics, NllSum, PairLogps, PairLoss, SeqLogps};
use super::{Examples, MicroLoss, Objective, Step, StepOutcome, eval_in_chunks, mean_loss_step};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::pairs;
use crate::data::prepare::DatasetReport;
use crate::data::preference::PreferencePair;
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::graph::{BackwardOpts, Head, TokenWeights};
use anyhow::{Result, bail};
use std::fmt;
use std::path::Path;
use std::time::Instant;

/// A loss on per-pair log-probabilities: what the pair pipeline asks of it.
pub trait PairObjective: fmt::Debug {
    /// The batch loss, its derivatives per pair, and TRL's metrics.
    fn loss(&self, pairs: &[PairLogps]) -> Result<PairLoss>;
    /// Whether it needs reference log-probabilities (a forward pass with
    /// the adapter disabled).
    fn needs_reference(&self) -> bool;
    /// Whether pairs must carry `chosen_nll`.
    fn needs_nll(&self) -> bool {
        false
    }
    /// Whether the NLL term scores the whole chosen sequence, prompt
    /// included (ORPO), rather than its completion.
    fn nll_whole_chosen(&self) -> bool {
        false
    }
}


/// Where one sequence sits in the batch: its first token and its length,
/// and where its completion starts (the prompt's length).
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) offset: usize,
    pub(super) prompt: usize,
    pub(super) len: usize,
}

impl Span {
    /// Token positions whose target is a completion token.
    pub(super) fn completion(self) -> std::ops::Range<usize> {
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

pub(super) fn sum(nll: &[f32], r: std::ops::Range<usize>) -> f64 {
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
    fn logps(&self, objective: &dyn PairObjective, policy: &[f32], reference: Reference) -> Vec<PairLogps> {
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
                    let range = if objective.nll_whole_chosen() { c.whole() } else { c.completion() };
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
    fn weights(&self, objective: &dyn PairObjective, loss: &PairLoss, n: usize, scale: f64) -> Vec<f32> {
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
                let range = if objective.nll_whole_chosen() { c.whole() } else { c.completion() };
                for t in range {
                    w[t] += scale * g.chosen_nll;
                }
            }
        }
        w.into_iter().map(|x| x as f32).collect()
    }
}

/// Loss and metrics of pairs without gradients (evaluation).
pub fn pair_eval<B: Backend>(be: &B, model: &Model<B>, objective: &dyn PairObjective, pairs: &[&PreferencePair]) -> Result<PairLoss> {
    let pb = pair_batch(pairs, model.cfg.vocab, objective.nll_whole_chosen())?;
    let policy = model.token_nll(be, &pb.batch, true);
    let reference = objective.needs_reference().then(|| model.token_nll(be, &pb.batch, false));
    let reference = reference.as_deref().map_or(Reference::None, Reference::Tokens);
    objective.loss(&pb.logps(objective, &policy, reference))
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
    objective: &dyn PairObjective,
    pairs: &[&PreferencePair],
    scale: f64,
    opts: BackwardOpts,
    precomputed: Option<&[(f64, f64)]>,
) -> Result<(PairLoss, usize)> {
    let pb = pair_batch(pairs, model.cfg.vocab, objective.nll_whole_chosen())?;
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
        let loss = objective.loss(&pb.logps(objective, nll, reference))?;
        let w = pb.weights(objective, &loss, n, scale);
        result = Some(loss);
        Ok(w)
    };
    model.forward_backward_with(be, &pb.batch, opts, Head::Tokens(TokenWeights::FromLosses(&mut choose)))?;
    let loss = result.expect("the weights were chosen");
    Ok((loss, n))
}

/// A pairwise objective as a training objective: `name` is how the
/// checkpoint fingerprint spells it (`Dpo(DpoConfig { .. })`).
pub struct Pairwise<P> {
    pub name: &'static str,
    pub loss: P,
    /// The reference's summed completion log-probs per training pair,
    /// computed once before training (precompute_ref_log_probs).
    ref_sums: Option<Vec<(f64, f64)>>,
}

impl<P> Pairwise<P> {
    pub fn new(name: &'static str, loss: P) -> Pairwise<P> {
        Pairwise { name, loss, ref_sums: None }
    }
}

impl<P: fmt::Debug> fmt::Debug for Pairwise<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({:?})", self.name, self.loss)
    }
}

fn pairs_of(examples: &Examples) -> Result<&[PreferencePair]> {
    match examples {
        Examples::Pairs(p) => Ok(p),
        _ => bail!("a pairwise objective trains on preference pairs {{prompt, chosen, rejected}}"),
    }
}

impl<B: Backend, P: PairObjective> Objective<B> for Pairwise<P> {
    fn prepare_data(&self, cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<(Examples, Examples, Vec<DatasetReport>)> {
        let data = pairs::prepare_pairs(cfg, tokenizer_dir, vocab)?;
        Ok((Examples::Pairs(data.train), Examples::Pairs(data.val), data.report))
    }

    /// The reference policy is the base model, which training never
    /// changes: its log-probs can be computed once, before the first step.
    fn before_training(&mut self, be: &B, model: &Model<B>, cfg: &RunConfig, train: &Examples) -> Result<()> {
        if !(cfg.precompute_ref_log_probs && self.loss.needs_reference()) {
            return Ok(());
        }
        let pairs = pairs_of(train)?;
        let t0 = Instant::now();
        let mut sums = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(cfg.micro_batch_size.max(1)) {
            let refs: Vec<&PreferencePair> = chunk.iter().collect();
            sums.extend(reference_sums(be, model, &refs)?);
        }
        eprintln!("reference log-probs of {} pairs precomputed in {:.1}s", pairs.len(), t0.elapsed().as_secs_f64());
        self.ref_sums = Some(sums);
        Ok(())
    }

    fn step(&mut self, s: Step<'_, B>) -> Result<StepOutcome> {
        let pairs = pairs_of(s.examples)?;
        let (be, loss, ref_sums) = (s.be, &self.loss, self.ref_sums.as_deref());
        mean_loss_step(s, &mut [], |model, _, mb, share, opts| {
            let refs: Vec<&PreferencePair> = mb.iter().map(|&i| &pairs[i]).collect();
            let pre: Option<Vec<(f64, f64)>> = ref_sums.map(|s| mb.iter().map(|&i| s[i]).collect());
            let (l, tokens) = pair_forward_backward(be, model, loss, &refs, share, opts, pre.as_deref())?;
            Ok(MicroLoss { loss: l.loss, metrics: l.metrics, tokens })
        })
    }

    fn evaluate(&self, be: &B, model: &Model<B>, val: &Examples, rows: usize) -> Result<(f64, Metrics)> {
        eval_in_chunks(pairs_of(val)?, rows, |refs| pair_eval(be, model, &self.loss, refs).map(|l| (l.loss, l.metrics)))
    }
}
