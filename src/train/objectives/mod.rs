//! Training objectives: what a run optimises. Each objective is one file
//! here implementing [`Objective`] — which examples it reads, how one
//! optimiser step runs over them, what it logs, what its reference is, what
//! it saves beside the adapter — with a `select` function, and is named
//! once, in the `objectives!` line below: `reward` (reward modelling),
//! `dpo` (DPO, IPO), `orpo`, `cpo` (SimPO), `kto`, `grpo` (online RL with
//! sampled completions), `sft` (supervised fine-tuning). `math` and `pairs` hold what the preference objectives
//! share. A new objective is a new file plus its name in that line (and,
//! when a new `rl` value selects it, that value and the rows it reads in
//! `RL_VALUES`, src/config/dataset_types.rs: the config checks them when it
//! loads).
//!
//! The trainer, the CLI and the config never name an objective: they call
//! [`select`] and then the trait's methods.

pub mod math;
pub mod pairs;

/// Declares the objective modules and lists their selectors, in the order
/// [`select`] asks them (the first that recognises the config wins).
macro_rules! objectives {
    ($($name:ident),* $(,)?) => {
        $(pub mod $name;)*

        /// Every objective's selector, in the order [`select`] asks them.
        pub fn registry<B: Backend>() -> Vec<Select<B>> {
            vec![$($name::select::<B>),*]
        }
    };
}

objectives!(reward, dpo, orpo, cpo, kto, grpo, sft);

pub use cpo::{CpoConfig, CpoLoss};
pub use dpo::{DpoConfig, DpoLoss};
pub use kto::{KtoConfig, KtoExample, KtoLoss};
pub use math::{Loss, Metrics, NllSum, PairGrad, PairLogps, PairLoss, SeqLogps, log1mexp, log_sigmoid, sigmoid};
pub use orpo::OrpoConfig;
pub use pairs::PairObjective;
pub use reward::{PairRewards, RewardConfig, RewardLoss};

use super::examples::{Batching, Examples};
use super::optimizer::{ExtraParam, Optimizer};
use super::plan::MicroBatch;
use crate::adapter::{LoraConfig, peft};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::prepare::DatasetReport;
use crate::model::hparams::ModelConfig;
use crate::model::{BaseWeights, Model};
use crate::train::memory::{self, MemoryPlan, RunShape};
use crate::model::graph::BackwardOpts;
use anyhow::{Context, Result, bail};
use std::fmt;
use std::path::Path;

/// A selector: the objective `cfg` asks for, if it is this file's.
pub type Select<B> = fn(&RunConfig) -> Option<Result<Box<dyn Objective<B>>>>;

/// The objective the run config selects (rl, reward_model; SFT when
/// neither is set), with its hyper-parameters as the config maps them onto
/// TRL's.
pub fn select<B: Backend>(cfg: &RunConfig) -> Result<Box<dyn Objective<B>>> {
    for pick in registry::<B>() {
        if let Some(objective) = pick(cfg) {
            return objective;
        }
    }
    bail!("rl: {} is not supported (use dpo, ipo, orpo, simpo, kto, grpo or rloo)", cfg.rl.as_deref().unwrap_or("none"))
}

/// What one optimiser step has to work with.
pub struct Step<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: &'a RunConfig,
    pub model: &'a mut Model<B>,
    pub opt: &'a mut Optimizer<B>,
    pub lr: f64,
    pub examples: &'a Examples,
    /// The step's micro-batches: indices into `examples`.
    pub micro_batches: &'a [MicroBatch],
    /// 0-based optimiser step.
    pub step: usize,
}

impl<B: Backend> Step<'_, B> {
    /// Backward options of micro-batch `micro`: checkpointing as configured,
    /// and a dropout seed per (run seed, step, micro-batch) when the adapter
    /// has dropout (stateless, so a resumed run draws the same masks).
    pub fn opts(&self, grad_scale: f32, micro: usize) -> BackwardOpts {
        let dropout = self.model.loras().any(|(_, _, l)| l.dropout > 0.0);
        BackwardOpts {
            grad_scale,
            gradient_checkpointing: self.cfg.gradient_checkpointing,
            dropout_seed: dropout.then(|| dropout_seed(self.cfg.seed, self.step, micro)),
        }
    }
}

fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// One optimiser step's figures.
pub struct StepOutcome {
    pub loss: f64,
    /// Target tokens (SFT) or examples (preference) of the step: the loss
    /// denominator; 0 means nothing was learnt from and nothing changed.
    pub targets: usize,
    /// Input tokens of the step.
    pub tokens: usize,
    pub lr: f64,
    pub grad_norm: f64,
    /// The objective's own metrics, in TRL's names.
    pub metrics: Metrics,
}

/// A training objective. The default methods are those of an objective
/// that trains the LoRA adapter alone.
pub trait Objective<B: Backend>: fmt::Debug {
    /// The settings as the checkpoint fingerprint records them (a resumed
    /// run must continue the same objective); None for supervised
    /// fine-tuning.
    fn settings(&self) -> Option<String> {
        Some(format!("{self:?}"))
    }

    /// Reads and tokenizes the run's datasets into this objective's
    /// examples: (training, validation, one report per dataset).
    fn prepare_data(&self, cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<(Examples, Examples, Vec<DatasetReport>)>;

    /// Whether several examples may be packed into one row (sample_packing).
    fn packs(&self) -> bool {
        false
    }

    /// The device memory plan of a step of `shape` (micro-batch and
    /// sequence length as the config sets them), before anything loads.
    fn memory_plan(&self, _cfg: &RunConfig, model: &ModelConfig, lora: &LoraConfig, shape: RunShape, base: BaseWeights) -> Result<MemoryPlan> {
        memory::plan_lora_as(model, lora, &shape, base)
    }

    /// How examples are grouped into micro-batches and steps.
    fn batching(&self, cfg: &RunConfig) -> Batching {
        Batching::of(cfg)
    }

    /// Loads the adapter of lora_model_dir (and what the objective saved
    /// beside it); returns the number of LoRA modules.
    fn load_adapter(&mut self, be: &B, model: &mut Model<B>, dir: &Path) -> Result<usize> {
        peft::load(be, model, dir).with_context(|| format!("lora_model_dir {}", dir.display()))
    }

    /// After the model is loaded: the objective's own trainable parts.
    fn prepare_model(&mut self, _be: &B, _model: &Model<B>, _cfg: &RunConfig, _model_dir: &Path, _tokenizer_dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Once, before the first step (e.g. reference log-probs that never change).
    fn before_training(&mut self, _be: &B, _model: &Model<B>, _cfg: &RunConfig, _train: &Examples) -> Result<()> {
        Ok(())
    }

    /// One optimiser step: forward and backward over the micro-batches
    /// (gradients zeroed first), then clip and update.
    fn step(&mut self, s: Step<'_, B>) -> Result<StepOutcome>;

    /// The validation loss and metrics, `rows` examples at a time.
    fn evaluate(&self, be: &B, model: &Model<B>, val: &Examples, rows: usize) -> Result<(f64, Metrics)>;

    /// Trainable tensors beside the LoRA adapters (the optimiser updates
    /// and checkpoints them too).
    fn extra_params(&self) -> Vec<&ExtraParam<B>> {
        Vec::new()
    }

    /// Replaces the extra parameters' values with a checkpoint's.
    fn restore(&mut self, be: &B, model: &mut Model<B>, dir: &Path) -> Result<usize> {
        peft::load(be, model, dir).with_context(|| format!("loading the adapter of {}", dir.display()))
    }

    /// Writes the trained adapter into `dir` (the final adapter, and the
    /// adapter of each checkpoint-N).
    fn save_adapter(&self, be: &B, model: &Model<B>, lora: &LoraConfig, dir: &Path) -> Result<()> {
        peft::save(be, model, lora, dir)
    }
}

/// Metrics of several micro-batches, weighted by their examples.
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

/// Loss and metrics over `items` evaluated `rows` at a time, each chunk
/// weighted by its size.
pub fn eval_in_chunks<T>(items: &[T], rows: usize, mut eval: impl FnMut(&[&T]) -> Result<(f64, Metrics)>) -> Result<(f64, Metrics)> {
    let (mut loss, mut parts) = (0.0, Vec::new());
    for chunk in items.chunks(rows.max(1)) {
        let refs: Vec<&T> = chunk.iter().collect();
        let (l, m) = eval(&refs)?;
        loss += l * chunk.len() as f64;
        parts.push((m, chunk.len()));
    }
    Ok((loss / items.len().max(1) as f64, merge_metrics(&parts)))
}

/// The loss of one micro-batch of a preference objective: its loss and
/// metrics (unscaled) and the tokens it put through the model.
pub struct MicroLoss {
    pub loss: f64,
    pub metrics: Metrics,
    pub tokens: usize,
}

/// One optimiser step of an objective whose loss is a mean over examples:
/// each micro-batch's gradient is scaled by its share of the step's
/// examples, so the step optimises the mean loss over all of them.
/// `micro(model, micro_batch, share, opts)` runs one micro-batch's forward
/// and backward; `extras` are the objective's own parameters.
pub fn mean_loss_step<B: Backend>(
    s: Step<'_, B>,
    extras: &mut [&mut ExtraParam<B>],
    mut micro: impl FnMut(&mut Model<B>, &mut [&mut ExtraParam<B>], &MicroBatch, f64, BackwardOpts) -> Result<MicroLoss>,
) -> Result<StepOutcome> {
    let total: usize = s.micro_batches.iter().map(|mb| mb.len()).sum();
    s.model.zero_grad(s.be);
    for e in extras.iter_mut() {
        e.zero_grad(s.be);
    }
    let (mut loss, mut tokens, mut parts) = (0.0, 0, Vec::new());
    for (mi, mb) in s.micro_batches.iter().enumerate() {
        let opts = s.opts(0.0, mi);
        let share = mb.len() as f64 / total as f64;
        let m = micro(s.model, extras, mb, share, opts).with_context(|| format!("step {}", s.step + 1))?;
        loss += share * m.loss;
        tokens += m.tokens;
        parts.push((m.metrics, mb.len()));
    }
    let metrics = merge_metrics(&parts);
    if !loss.is_finite() {
        return Err(super::diverged::Diverged(format!(
            "step {}: the {} loss is {loss} (logps/chosen {:.3}, logps/rejected {:.3}); training diverged. \
             Lower learning_rate (now {}), raise rl_beta, or check that chosen and rejected differ in the data",
            s.step + 1,
            s.cfg.rl.as_deref().unwrap_or("preference"),
            metrics.get("logps/chosen").unwrap_or(f64::NAN),
            metrics.get("logps/rejected").unwrap_or(f64::NAN),
            s.cfg.learning_rate
        ))
        .into());
    }
    let grad_norm = if extras.is_empty() {
        s.opt.step(s.be, s.model, s.lr as f32)
    } else {
        s.opt.step_with(s.be, s.model, extras, s.lr as f32)?
    };
    Ok(StepOutcome { loss, targets: total, tokens, lr: s.lr, grad_norm, metrics })
}

#[cfg(test)]
mod losses_tests;
