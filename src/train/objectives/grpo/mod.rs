//! GRPO (`rl: grpo`, TRL 1.16's GRPOTrainer): online RL in one process with
//! one copy of the weights. Each generation batch samples num_generations
//! completions for each of its prompts from the model being trained
//! (`rollout`), the reward functions score them (`crate::train::rewards`),
//! and the clipped surrogate with optional KL to the reference (`loss`) is
//! trained over micro-batches of micro_batch_size completions. The
//! reference is the same base weights with the adapter off; with β = 0
//! (TRL's default) it is never run.
//!
//! A step holds micro_batch_size × gradient_accumulation_steps completions
//! from that ÷ num_generations prompts; with num_iterations = k the same
//! samples serve k optimiser steps (the data plan repeats the prompts), the
//! sampling policy's log-probs kept for the ratio.
//!
//! RLOO (`rl: rloo`, TRL 1.16's RLOOTrainer) is this objective with
//! `GrpoSettings::rloo` set: the same sampler, rewards, reference and logs;
//! the rollout also takes the sampling and reference log-probs to put the
//! KL into the reward, and the advantages and the sequence-level loss are
//! `rloo`'s.

pub mod loss;
pub mod rloo;
pub mod rollout;

use super::{Examples, Metrics, Objective, Step, StepOutcome};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::config::grpo::GrpoSettings;
use crate::data::prepare::DatasetReport;
use crate::data::prompts::{PromptRow, prepare_prompts};
use crate::data::tokenizer::TextTokenizer;
use crate::adapter::LoraConfig;
use crate::model::hparams::ModelConfig;
use crate::model::{BaseWeights, Model};
use crate::train::memory::{self, GrpoShape, MemoryPlan, RunShape};
use crate::model::batch::{Batch, IGNORE_INDEX, Sequence};
use crate::model::graph::{BackwardOpts, Head, TokenWeights};
use crate::train::examples::Batching;
use crate::train::rewards::RewardFuncs;
use anyhow::{Context, Result, bail};
use loss::{MicroOut, Norm, SeqTerms, micro_loss};
use rollout::{Ctx, Rollout, Sample};
use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};

/// `rl: grpo`, and `rl: rloo` (the same sampler, rewards and logging; its
/// advantages and loss are `rloo`'s, chosen by `GrpoSettings::rloo`).
pub fn select<B: Backend>(cfg: &RunConfig) -> Option<Result<Box<dyn Objective<B>>>> {
    (matches!(cfg.rl.as_deref(), Some("grpo" | "rloo")) && !cfg.reward_model).then(|| Grpo::new(cfg).map(|g| Box::new(g) as Box<dyn Objective<B>>))
}

/// The `rl` value the settings were read for (messages).
fn rl_name(s: &GrpoSettings) -> &'static str {
    if s.rloo.is_some() { "rloo" } else { "grpo" }
}

/// What the run holds once the data and the model are known.
struct Ready {
    tok: TextTokenizer,
    stop: Vec<u32>,
    /// The stop tokens and the pad token (or EOS): a completion ending in
    /// one of them ended.
    ends: Vec<u32>,
}

pub struct Grpo {
    s: GrpoSettings,
    rewards: RefCell<Option<RewardFuncs>>,
    /// rewards/<name>/mean and /std, one pair per function.
    reward_names: Vec<(&'static str, &'static str)>,
    ready: Option<Ready>,
    /// The longest training prompt (the memory plan's sampling shape).
    longest_prompt: std::cell::Cell<usize>,
    /// The current generation batch (reused for num_iterations steps).
    rollout: Option<Rollout>,
    log_dir: Option<PathBuf>,
    config_dir: PathBuf,
}

impl fmt::Debug for Grpo {
    /// The settings a resumed run must keep (the fingerprint's view).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Grpo({:?})", self.s)
    }
}

impl Grpo {
    pub fn new(cfg: &RunConfig) -> Result<Grpo> {
        let s = cfg.grpo()?;
        let per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps;
        if !per_step.is_multiple_of(s.num_generations) {
            bail!(
                "rl: {}: micro_batch_size × gradient_accumulation_steps ({per_step}) must be a multiple of trl.num_generations ({}): a step holds whole groups of completions",
                rl_name(&s),
                s.num_generations
            );
        }
        Ok(Grpo {
            s,
            rewards: RefCell::new(None),
            reward_names: Vec::new(),
            ready: None,
            longest_prompt: std::cell::Cell::new(0),
            rollout: None,
            log_dir: None,
            config_dir: cfg.config_dir.0.clone().unwrap_or_else(|| PathBuf::from(".")),
        })
    }

    fn prompts_per_step(&self, cfg: &RunConfig) -> usize {
        cfg.micro_batch_size * cfg.gradient_accumulation_steps / self.s.num_generations
    }

    /// Sample and score a generation batch for `prompt_idx` (1-based `step`
    /// names it; `log`: write its completions to completions.jsonl;
    /// `micro_batch_size`: completions per scoring forward).
    #[allow(clippy::too_many_arguments)]
    fn generate<B: Backend>(
        &self,
        be: &B,
        model: &Model<B>,
        rows: &[PromptRow],
        prompt_idx: &[usize],
        step: usize,
        seed: u64,
        log: bool,
        micro_batch_size: usize,
    ) -> Result<Rollout> {
        let ready = self.ready.as_ref().context("GRPO used before its model was prepared")?;
        let mut rewards = self.rewards.borrow_mut();
        let rewards = rewards.as_mut().context("GRPO used before its reward functions were loaded")?;
        let ctx = Ctx {
            s: &self.s,
            tok: &ready.tok,
            stop: &ready.stop,
            ends: &ready.ends,
            rewards,
            reward_names: &self.reward_names,
            log_dir: if log { self.log_dir.as_deref() } else { None },
            seed,
            micro_batch_size,
        };
        rollout::generate(be, model, rows, prompt_idx, step, ctx)
    }
}

/// One micro-batch of completions laid out as a batch: prompt + completion
/// per sequence, the masked completion tokens labelled.
struct MicroBatch {
    batch: Batch,
    /// Per sample: the batch position predicting its first completion token.
    starts: Vec<usize>,
}

fn micro_batch(rows: &[PromptRow], samples: &[Sample], vocab: usize) -> Result<MicroBatch> {
    let (mut seqs, mut starts, mut offset) = (Vec::with_capacity(samples.len()), Vec::with_capacity(samples.len()), 0);
    for q in samples {
        let prompt = &rows[q.prompt].ids;
        let mut input_ids = prompt.clone();
        input_ids.extend_from_slice(&q.completion);
        let mut labels = vec![IGNORE_INDEX; input_ids.len()];
        for (j, &t) in q.completion[..q.mask].iter().enumerate() {
            labels[prompt.len() + j] = t as i32;
        }
        starts.push(offset + prompt.len() - 1);
        offset += input_ids.len();
        seqs.push(Sequence { input_ids, labels });
    }
    Ok(MicroBatch { batch: Batch::from_sequences(&seqs, vocab)?, starts })
}

/// Log-probs of each sample's masked tokens from per-token NLLs.
fn logps(mb: &MicroBatch, samples: &[Sample], nll: &[f32]) -> Vec<Vec<f64>> {
    samples.iter().zip(&mb.starts).map(|(q, &s)| nll[s..s + q.mask].iter().map(|&x| -(x as f64)).collect()).collect()
}

/// Loss and gradient of one micro-batch from its per-token NLLs.
fn micro_out(s: &GrpoSettings, samples: &[Sample], lp: &[Vec<f64>], reference: Option<&[Vec<f64>]>, norm: Norm) -> MicroOut {
    let terms: Vec<SeqTerms> = samples
        .iter()
        .enumerate()
        .map(|(i, q)| SeqTerms { logp: &lp[i], old: q.old.as_deref(), reference: reference.map(|r| r[i].as_slice()), advantage: q.advantage })
        .collect();
    match s.rloo {
        None => micro_loss(s, &terms, norm),
        Some(_) => rloo::micro_loss(s, &terms, norm),
    }
}

/// Per-token weights on the NLLs: weight × ∂NLL = −dL/dlogp.
fn weights(mb: &MicroBatch, samples: &[Sample], out: &MicroOut) -> Vec<f32> {
    let mut w = vec![0f32; mb.batch.n_tokens()];
    for ((q, &s), d) in samples.iter().zip(&mb.starts).zip(&out.dlogp) {
        for j in 0..q.mask {
            w[s + j] = -d[j] as f32;
        }
    }
    w
}

/// What one training pass over a generation batch gives.
pub struct Pass {
    /// The step's loss: Σ over micro-batches of each one's (normalised) loss.
    pub loss: f64,
    pub micro: Vec<MicroOut>,
    /// Tokens put through the model.
    pub tokens: usize,
}

/// Forward and backward over `samples` in micro-batches of
/// `micro_batch_size` completions (in sampling order), LoRA gradients
/// accumulating (zero them first); `opts(i)` gives micro-batch i's
/// backward options. The reference (β > 0) is the model with its adapter
/// off. Log-probs are of log_softmax(logits / temperature).
pub fn train_pass<B: Backend>(
    be: &B,
    model: &mut Model<B>,
    s: &GrpoSettings,
    rows: &[PromptRow],
    samples: &[Sample],
    micro_batch_size: usize,
    opts: impl Fn(usize) -> BackwardOpts,
) -> Result<Pass> {
    let chunks: Vec<&[Sample]> = samples.chunks(micro_batch_size.max(1)).collect();
    let batch_tokens: usize = samples.iter().map(|q| q.mask).sum();
    let temp = s.temperature as f32;
    let mut pass = Pass { loss: 0.0, micro: Vec::new(), tokens: 0 };
    for (mi, chunk) in chunks.iter().enumerate() {
        let mb = micro_batch(rows, chunk, model.cfg.vocab)?;
        let norm = Norm { micro_batches: chunks.len(), batch_tokens, sequences: chunk.len() };
        let reference = (s.beta != 0.0).then(|| logps(&mb, chunk, &model.token_nll_at(be, &mb.batch, false, temp)));
        let mut result = None;
        let mut choose = |nll: &[f32]| -> Result<Vec<f32>> {
            if nll.iter().any(|x| !x.is_finite()) {
                bail!("training diverged: the model's log-probabilities are no longer finite (NaN or infinite); lower learning_rate");
            }
            let out = micro_out(s, chunk, &logps(&mb, chunk, nll), reference.as_deref(), norm);
            let w = weights(&mb, chunk, &out);
            result = Some(out);
            Ok(w)
        };
        model.forward_backward_with(be, &mb.batch, opts(mi), Head::TokensAt(temp, TokenWeights::FromLosses(&mut choose)))?;
        let out = result.expect("the weights were chosen");
        pass.loss += out.loss;
        pass.tokens += mb.batch.n_tokens();
        pass.micro.push(out);
    }
    Ok(pass)
}

/// The micro-batch metrics TRL logs, averaged over micro-batches.
fn loss_metrics(s: &GrpoSettings, outs: &[MicroOut]) -> Metrics {
    // NaN values are left out, as TRL's log does.
    let mean = |f: fn(&MicroOut) -> f64| loss::nanmean(&outs.iter().map(f).collect::<Vec<_>>());
    let mut m = Metrics::default();
    // RLOO's kl is logged with the generation (its KL is in the reward).
    if s.beta != 0.0 && s.rloo.is_none() {
        m.push("kl", mean(|o| o.kl));
    }
    m.push("clip_ratio/low_mean", mean(|o| o.clip_low));
    m.push("clip_ratio/low_min", mean(|o| o.clip_low_min));
    m.push("clip_ratio/high_mean", mean(|o| o.clip_high));
    m.push("clip_ratio/high_max", mean(|o| o.clip_high_max));
    m.push("clip_ratio/region_mean", mean(|o| o.clip_region));
    m
}

impl<B: Backend> Objective<B> for Grpo {
    fn prepare_data(&self, cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<(Examples, Examples, Vec<DatasetReport>)> {
        let data = prepare_prompts(cfg, tokenizer_dir, vocab)?;
        let per_step = self.prompts_per_step(cfg);
        if data.train.len() < per_step {
            bail!(
                "rl: {}: a step samples from {per_step} prompts (micro_batch_size × gradient_accumulation_steps ÷ trl.num_generations) \
                 but the training datasets hold {}",
                rl_name(&self.s),
                data.train.len()
            );
        }
        self.longest_prompt.set(data.train.iter().chain(&data.val).map(|p| p.ids.len()).max().unwrap_or(0));
        // Before any weight is read: a bad reward module fails here.
        *self.rewards.borrow_mut() = Some(RewardFuncs::new(&self.s.reward_funcs, &self.config_dir)?);
        Ok((Examples::Prompts(data.train), Examples::Prompts(data.val), data.report))
    }

    /// Sampling (every completion of a step in the KV cache at once), the
    /// scoring forwards and the training pass of micro-batches of
    /// completions, each of the longest prompt + max_completion_length.
    /// RLOO is planned here too: its passes are GRPO's (memory/grpo.rs).
    fn memory_plan(&self, cfg: &RunConfig, model: &ModelConfig, lora: &LoraConfig, shape: RunShape, base: BaseWeights) -> Result<MemoryPlan> {
        let prompt_len = self.longest_prompt.get().max(1);
        let run = RunShape { seq_len: prompt_len + self.s.max_completion_length, ..shape };
        let shape = GrpoShape {
            run,
            sequences: cfg.micro_batch_size * cfg.gradient_accumulation_steps,
            prompt_len,
            max_new: self.s.max_completion_length,
            reference: self.s.beta != 0.0,
        };
        memory::plan_grpo(model, lora, &shape, base)
    }

    fn batching(&self, cfg: &RunConfig) -> Batching {
        Batching { micro_batch_size: self.prompts_per_step(cfg), micro_batches_per_step: 1, repeat: self.s.num_iterations, drop_last: true }
    }

    fn prepare_model(&mut self, _be: &B, model: &Model<B>, cfg: &RunConfig, model_dir: &Path, tokenizer_dir: &Path) -> Result<()> {
        let tok = TextTokenizer::load(tokenizer_dir, &cfg.special_tokens)?;
        let stop = tok.stop_tokens(&model.cfg.eos_token_ids, model_dir)?;
        if stop.is_empty() {
            bail!(
                "rl: {} needs an end-of-sequence token to end completions: neither config.json, generation_config.json nor the tokenizer names one",
                rl_name(&self.s)
            );
        }
        let names = self.rewards.borrow().as_ref().map(|r| r.names()).unwrap_or_default();
        // Metric names live as long as the run.
        self.reward_names = names
            .iter()
            .map(|n| (&*Box::leak(format!("rewards/{n}/mean").into_boxed_str()), &*Box::leak(format!("rewards/{n}/std").into_boxed_str())))
            .collect();
        let mut ends = stop.clone();
        ends.extend(tok.pad_id().or(tok.eos_id()));
        self.ready = Some(Ready { tok, stop, ends });
        if self.s.log_completions {
            let dir = PathBuf::from(&cfg.output_dir);
            self.log_dir = Some(dir);
        }
        Ok(())
    }

    /// Reward functions see the run's length as trainer_state.max_steps.
    fn before_training(&mut self, _be: &B, _model: &Model<B>, cfg: &RunConfig, train: &Examples) -> Result<()> {
        let plan = crate::train::examples::data_plan(cfg, train, false, <Self as Objective<B>>::batching(self, cfg));
        if let Some(r) = self.rewards.borrow_mut().as_mut() {
            r.set_max_steps(plan.total_steps(cfg.num_epochs, cfg.max_steps));
        }
        Ok(())
    }

    fn step(&mut self, s: Step<'_, B>) -> Result<StepOutcome> {
        let Examples::Prompts(rows) = s.examples else { bail!("GRPO trains on prompts") };
        let prompt_idx: Vec<usize> = s.micro_batches.iter().flatten().copied().collect();
        let key = (prompt_idx.clone(), s.step / self.s.num_iterations);
        let fresh = self.rollout.as_ref().is_none_or(|r| r.key != key);
        if fresh {
            let mut r = self.generate(s.be, s.model, rows, &prompt_idx, s.step + 1, s.cfg.seed, true, s.cfg.micro_batch_size)?;
            r.key = key;
            // (RLOO's rollout already holds them.)
            if self.s.num_iterations > 1 && self.s.rloo.is_none() {
                // The sampling policy's log-probs, kept for the later steps' ratios.
                for chunk in r.samples.chunks_mut(s.cfg.micro_batch_size.max(1)) {
                    let mb = micro_batch(rows, chunk, s.model.cfg.vocab)?;
                    let nll = s.model.token_nll_at(s.be, &mb.batch, true, self.s.temperature as f32);
                    let lp = logps(&mb, chunk, &nll);
                    for (q, l) in chunk.iter_mut().zip(lp) {
                        q.old = Some(l);
                    }
                }
            }
            self.rollout = Some(r);
        }
        let rollout = self.rollout.as_mut().expect("a rollout was just made");
        let gen_metrics = rollout.metrics.take();
        let samples = &rollout.samples;
        let n_micro = samples.len().div_ceil(s.cfg.micro_batch_size.max(1));
        let opts: Vec<BackwardOpts> = (0..n_micro).map(|mi| s.opts(0.0, mi)).collect();
        s.model.zero_grad(s.be);
        let pass = train_pass(s.be, s.model, &self.s, rows, samples, s.cfg.micro_batch_size, |mi| opts[mi])
            .with_context(|| format!("step {}", s.step + 1))?;
        let grad_norm = s.opt.step(s.be, s.model, s.lr as f32);
        let mut metrics = gen_metrics.unwrap_or_default();
        metrics.0.extend(loss_metrics(&self.s, &pass.micro).0);
        Ok(StepOutcome { loss: pass.loss, targets: samples.len(), tokens: pass.tokens, lr: s.lr, grad_norm, metrics })
    }

    /// Samples the validation prompts (num_generations each, seeded apart
    /// from training) and returns the GRPO loss on them, without gradients,
    /// with the generation metrics.
    fn evaluate(&self, be: &B, model: &Model<B>, val: &Examples, rows_per_batch: usize) -> Result<(f64, Metrics)> {
        let Examples::Prompts(rows) = val else { bail!("GRPO evaluates on prompts") };
        let idx: Vec<usize> = (0..rows.len()).collect();
        let temp = self.s.temperature as f32;
        let mut parts = Vec::new();
        let mut total = 0.0;
        // TRL's eval batches hold per_device_eval_batch_size completions:
        // that ÷ num_generations prompts.
        let prompts_per_batch = (rows_per_batch / self.s.num_generations).max(1);
        for (ci, chunk) in idx.chunks(prompts_per_batch).enumerate() {
            let r = self.generate(be, model, rows, chunk, ci + 1, u64::MAX ^ 0x5EED, false, rows_per_batch)?;
            // The generation batch as one micro-batch (eval has no accumulation).
            let batch_tokens: usize = r.samples.iter().map(|q| q.mask).sum();
            let mb = micro_batch(rows, &r.samples, model.cfg.vocab)?;
            let lp = logps(&mb, &r.samples, &model.token_nll_at(be, &mb.batch, true, temp));
            let reference = (self.s.beta != 0.0).then(|| logps(&mb, &r.samples, &model.token_nll_at(be, &mb.batch, false, temp)));
            let norm = Norm { micro_batches: 1, batch_tokens, sequences: r.samples.len() };
            let out = micro_out(&self.s, &r.samples, &lp, reference.as_deref(), norm);
            let loss = out.loss;
            let mut m = r.metrics.unwrap_or_default();
            m.0.extend(loss_metrics(&self.s, &[out]).0);
            total += loss;
            parts.push(m);
        }
        // The mean over batches, each metric's NaNs left out (TRL's log).
        let n = parts.len().max(1) as f64;
        let names: Vec<&'static str> = parts.first().map(|m| m.0.iter().map(|&(k, _)| k).collect()).unwrap_or_default();
        let merged = names.iter().map(|&k| (k, loss::nanmean(&parts.iter().map(|m| m.get(k).unwrap_or(f64::NAN)).collect::<Vec<_>>()))).collect();
        Ok((total / n, Metrics(merged)))
    }
}
