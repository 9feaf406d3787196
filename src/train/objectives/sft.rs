//! Supervised fine-tuning: the mean cross-entropy of every target token of
//! the step (labels -100 excluded), as transformers' Trainer computes it
//! with gradient accumulation. Selected when neither `rl` nor
//! `reward_model` is set.

use super::math::Metrics;
use super::{Examples, Objective, Step, StepOutcome};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::prepare::{self, DatasetReport};
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::graph::LossSum;
use crate::train::diverged::Diverged;
use anyhow::{Result, bail};
use std::path::Path;

/// SFT has no settings of its own.
#[derive(Debug)]
pub struct Sft;

/// Mean loss of `seqs`, in batches of `rows` sequences.
pub fn evaluate<B: Backend>(be: &B, model: &Model<B>, seqs: &[Sequence], rows: usize) -> Result<LossSum> {
    let mut sum = LossSum::default();
    for chunk in seqs.chunks(rows.max(1)) {
        sum.add(model.eval_loss(be, &Batch::from_sequences(chunk, model.cfg.vocab)?));
    }
    Ok(sum)
}

fn sequences(examples: &Examples) -> Result<&[Sequence]> {
    match examples {
        Examples::Sequences(s) => Ok(s),
        _ => bail!("supervised fine-tuning trains on token sequences with labels"),
    }
}

impl<B: Backend> Objective<B> for Sft {
    fn settings(&self) -> Option<String> {
        None
    }

    fn prepare_data(&self, cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<(Examples, Examples, Vec<DatasetReport>)> {
        let data = prepare::prepare(cfg, tokenizer_dir, vocab)?;
        Ok((Examples::Sequences(data.train), Examples::Sequences(data.val), data.report))
    }

    fn packs(&self) -> bool {
        true
    }

    /// Forward/backward over the step's micro-batches, each token's
    /// gradient scaled by 1 / (target tokens of the whole step), then clip
    /// and update.
    fn step(&mut self, s: Step<'_, B>) -> Result<StepOutcome> {
        let examples = sequences(s.examples)?;
        let batches = s
            .micro_batches
            .iter()
            .map(|mb| Batch::from_sequences(mb.iter().map(|&i| &examples[i]), s.model.cfg.vocab))
            .collect::<Result<Vec<Batch>>>()?;
        let targets: usize = batches.iter().map(|b| b.n_targets()).sum();
        let tokens: usize = batches.iter().map(|b| b.n_tokens()).sum();
        s.model.zero_grad(s.be);
        let mut sum = LossSum::default();
        for (mi, batch) in batches.iter().enumerate() {
            let opts = s.opts(1.0 / targets.max(1) as f32, mi);
            sum.add(s.model.forward_backward(s.be, batch, opts));
        }
        // A step with nothing to learn from (every label -100) changes nothing.
        let grad_norm = if targets == 0 { 0.0 } else { s.opt.step(s.be, s.model, s.lr as f32) };
        let loss = sum.mean();
        if targets > 0 && !loss.is_finite() {
            return Err(Diverged(format!(
                "step {}: the loss is {loss} (grad norm {grad_norm}); training diverged. Lower learning_rate (now {}) or check the data",
                s.step + 1,
                s.cfg.learning_rate
            ))
            .into());
        }
        Ok(StepOutcome { loss, targets, tokens, lr: s.lr, grad_norm, metrics: Metrics::default() })
    }

    fn evaluate(&self, be: &B, model: &Model<B>, val: &Examples, rows: usize) -> Result<(f64, Metrics)> {
        Ok((evaluate(be, model, sequences(val)?, rows)?.mean(), Metrics::default()))
    }
}

/// Neither `rl` nor `reward_model`.
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    (cfg.rl.is_none() && !cfg.reward_model).then(|| Ok(Box::new(Sft) as Box<dyn Objective<B>>))
}
