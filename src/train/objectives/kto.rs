//! KTO (TRL's KTOTrainer): unpaired completions labelled desirable or not,
//! against a KL estimate from mismatched prompt/completion pairs (TRL pairs
//! each prompt with the previous example's completion), both under the
//! policy and the reference. `rl: kto` selects it.

use super::math::{Loss, Metrics, SeqLogps, check_seq, mean, sigmoid};
use super::pairs::{Span, sum};
use super::{Examples, MicroLoss, Objective, Step, StepOutcome, eval_in_chunks, mean_loss_step};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::pairs;
use crate::data::prepare::DatasetReport;
use crate::data::preference::{KtoExample as KtoExampleIds, completion_sequence};
use crate::model::Model;
use crate::model::batch::Batch;
use crate::model::graph::{BackwardOpts, Head, TokenWeights};
use anyhow::{Result, bail};
use std::path::Path;

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

/// KTO's result: `grads` is dL/d(summed policy log-prob) per example.
pub type KtoLoss = Loss<f64>;

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
    model.forward_backward_with(be, &main, opts, Head::Tokens(TokenWeights::FromLosses(&mut choose)))?;
    Ok((result.expect("the weights were chosen"), n + kl.n_tokens()))
}

/// KTO as a training objective.
#[derive(Debug)]
pub struct Kto(pub KtoConfig);

pub(super) fn examples_of(examples: &Examples) -> Result<&[KtoExampleIds]> {
    match examples {
        Examples::Kto(k) => Ok(k),
        _ => bail!("KTO trains on unpaired examples {{prompt, completion, label}}, not pairs"),
    }
}

impl<B: Backend> Objective<B> for Kto {
    fn prepare_data(&self, cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<(Examples, Examples, Vec<DatasetReport>)> {
        let data = pairs::prepare_kto(cfg, tokenizer_dir, vocab)?;
        Ok((Examples::Kto(data.train), Examples::Kto(data.val), data.report))
    }

    fn before_training(&mut self, _be: &B, _model: &Model<B>, cfg: &RunConfig, _train: &Examples) -> Result<()> {
        if cfg.precompute_ref_log_probs {
            bail!("precompute_ref_log_probs is implemented for pairs (dpo, ipo); KTO computes its reference in each step (set it to false)");
        }
        Ok(())
    }

    fn step(&mut self, s: Step<'_, B>) -> Result<StepOutcome> {
        let exs = examples_of(s.examples)?;
        let (be, cfg) = (s.be, &self.0);
        mean_loss_step(s, &mut [], |model, _, mb, share, opts| {
            let refs: Vec<&KtoExampleIds> = mb.iter().map(|&i| &exs[i]).collect();
            let (l, tokens) = kto_forward_backward(be, model, cfg, &refs, share, opts)?;
            Ok(MicroLoss { loss: l.loss, metrics: l.metrics, tokens })
        })
    }

    fn evaluate(&self, be: &B, model: &Model<B>, val: &Examples, rows: usize) -> Result<(f64, Metrics)> {
        eval_in_chunks(examples_of(val)?, rows, |refs| kto_eval(be, model, &self.0, refs).map(|l| (l.loss, l.metrics)))
    }
}

/// `rl: kto`: β = rl_beta (0.1), kto_desirable_weight and
/// kto_undesirable_weight (1.0 each).
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    (cfg.rl.as_deref() == Some("kto") && !cfg.reward_model).then(|| {
        let c = KtoConfig {
            beta: cfg.rl_beta.unwrap_or(0.1),
            desirable_weight: cfg.kto_desirable_weight.unwrap_or(1.0),
            undesirable_weight: cfg.kto_undesirable_weight.unwrap_or(1.0),
        };
        Ok(Box::new(Kto(c)) as Box<dyn Objective<B>>)
    })
}
