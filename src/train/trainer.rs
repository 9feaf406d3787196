//! The training loop: micro-batches from the data plan, forward/backward
//! with the loss normalised over the whole optimiser step, clipping and
//! AdamW, the schedule, logging, evaluation and checkpoints.

use super::saves::{self, TrainState};
use super::collapse::CollapseWatch;
use super::curves;
pub use super::examples::Examples;
use super::examples::data_plan;
use super::fingerprint;
use super::objectives::{Metrics, Objective, Step, StepOutcome};
use super::optimizer::Optimizer;
use super::plan::MicroBatch;
use super::progress::{MetricsLog, Progress};
use super::schedule::{Kind, Schedule};
use crate::adapter::LoraConfig;
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::model::Model;
use anyhow::{Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a run needs, prepared by the caller.
pub struct Run<'a, B: Backend> {
    pub be: &'a B,
    /// The run config (validated).
    pub cfg: &'a RunConfig,
    /// The model with its LoRA adapters attached (fresh or loaded).
    pub model: Model<B>,
    /// How the adapter is described in adapter_config.json.
    pub lora: LoraConfig,
    pub train: Examples,
    pub val: Examples,
    pub output_dir: PathBuf,
    /// Continue from this checkpoint directory.
    pub resume: Option<PathBuf>,
    /// What the run optimises (`objectives::select`), with its own
    /// trainable parts already made (`Objective::prepare_model`).
    pub objective: Box<dyn Objective<B> + 'a>,
    /// Called once after the first step (the GPU compares its measured
    /// memory peak with the plan there).
    pub after_first_step: Option<Box<dyn FnOnce() -> Option<String> + 'a>>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub steps: usize,
    pub last_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub adapter_dir: PathBuf,
    /// Stopped early by Ctrl-C or SIGTERM: the signal, and the checkpoint
    /// written at the step reached.
    pub interrupted: Option<(i32, PathBuf)>,
}

/// Every `per_epoch`-th of an epoch, as a step interval.
fn interval(steps: Option<usize>, per_epoch: Option<usize>, steps_per_epoch: usize) -> Option<usize> {
    steps.or_else(|| per_epoch.map(|n| (steps_per_epoch / n.max(1)).max(1)))
}

/// Loss and throughput between two log records (the logged loss is the
/// mean of the steps' losses, as transformers' Trainer logs it).
struct LogWindow {
    loss_sum: f64,
    steps: usize,
    tokens: usize,
    /// Σ over the window's steps of each objective metric, and how many
    /// steps gave it a number (a metric may be absent from a step, as
    /// GRPO's generation metrics when samples are reused, or NaN, as a
    /// reward no function gave: such steps do not count, as in TRL).
    metrics: Vec<(&'static str, f64, usize)>,
    t0: Instant,
}

impl LogWindow {
    fn new() -> LogWindow {
        LogWindow { loss_sum: 0.0, steps: 0, tokens: 0, metrics: Vec::new(), t0: Instant::now() }
    }

    fn add(&mut self, o: &StepOutcome) {
        if o.targets > 0 {
            self.loss_sum += o.loss;
            self.steps += 1;
            for &(name, v) in &o.metrics.0 {
                let i = match self.metrics.iter().position(|(n, _, _)| *n == name) {
                    Some(i) => i,
                    None => {
                        self.metrics.push((name, 0.0, 0));
                        self.metrics.len() - 1
                    }
                };
                if !v.is_nan() {
                    self.metrics[i].1 += v;
                    self.metrics[i].2 += 1;
                }
            }
        }
        self.tokens += o.tokens;
    }

    /// (mean loss, tokens/s, mean metrics) of the window; starts the next one.
    fn take(&mut self) -> (f64, f64, Metrics) {
        let mean = if self.steps > 0 { self.loss_sum / self.steps as f64 } else { f64::NAN };
        let tps = self.tokens as f64 / self.t0.elapsed().as_secs_f64().max(1e-9);
        let metrics = Metrics(self.metrics.iter().map(|&(n, v, k)| (n, if k == 0 { f64::NAN } else { v / k as f64 })).collect());
        *self = LogWindow::new();
        (mean, tps, metrics)
    }
}

/// Load a checkpoint's adapter, optimiser moments and state into the run,
/// refusing one whose data order or optimisation settings differ.
fn restore<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &mut Model<B>,
    objective: &mut dyn Objective<B>,
    dir: &Path,
    fresh: TrainState,
) -> Result<(Optimizer<B>, TrainState)> {
    let saved = saves::read_state(dir)?;
    let now: Value = serde_json::from_str(&fresh.fingerprint)?;
    let changed = fingerprint::diff(&saved.fingerprint, &now);
    if !changed.is_empty() {
        bail!(
            "cannot resume from {}: settings that decide the data order or the optimisation changed: {}",
            dir.display(),
            changed.join("; ")
        );
    }
    fingerprint::check_length(cfg, dir, saved.global_step, saved.total_steps, fresh.total_steps)?;
    let n = objective.restore(be, model, dir)?;
    let (opt_step, moments) = saves::read_moments(model, dir)?;
    let extras = objective.extra_params();
    let mut opt = Optimizer::with_extras(be, model, &extras, cfg.adamw_config());
    opt.load_moments(be, &moments)?;
    if !extras.is_empty() {
        opt.load_extra_moments(be, &saves::read_extra_moments(dir, &extras)?)?;
    }
    opt.step = opt_step;
    let state = TrainState { total_steps: fresh.total_steps, fingerprint: fresh.fingerprint, ..saved };
    eprintln!("resumed from {} at step {} ({n} LoRA modules)", dir.display(), state.global_step);
    Ok((opt, state))
}

/// An eval record: eval_loss, and the objective's metrics prefixed "eval_"
/// as TRL logs them.
fn eval_record(step: usize, epoch: Option<f64>, loss: f64, m: &Metrics) -> Value {
    let mut r = json!({"step": step, "eval_loss": loss});
    if let Some(e) = epoch {
        r["epoch"] = json!(e);
    }
    for &(name, v) in &m.0 {
        r[format!("eval_{name}")] = json!(v);
    }
    r
}

/// Save checkpoint-N (its adapter as the objective writes it) and drop the
/// oldest beyond save_total_limit.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &Model<B>,
    opt: &Optimizer<B>,
    lora: &LoraConfig,
    objective: &dyn Objective<B>,
    state: &TrainState,
    output_dir: &Path,
) -> Result<PathBuf> {
    let dir = saves::save_with(be, model, opt, state, output_dir, |dir| objective.save_adapter(be, model, lora, dir))?;
    if let Some(limit) = cfg.save_total_limit {
        saves::prune(output_dir, limit)?;
    }
    Ok(dir)
}

pub fn train<B: Backend>(run: Run<'_, B>) -> Result<Summary> {
    let Run { be, cfg, mut model, lora, train, val, output_dir, resume, mut after_first_step, mut objective } = run;
    if train.is_empty() {
        bail!("no training examples left after preparation (all rows dropped or moved to validation)");
    }
    let plan = data_plan(cfg, &train, objective.packs(), objective.batching(cfg));
    let total_steps = plan.total_steps(cfg.num_epochs, cfg.max_steps);
    let steps_per_epoch = plan.steps_in_epoch(0);
    let schedule = Schedule {
        kind: Kind::parse(&cfg.lr_scheduler)?,
        base_lr: cfg.learning_rate,
        warmup_steps: Schedule::warmup_from(cfg.warmup_steps, cfg.warmup_ratio, total_steps),
        total_steps,
    };
    if let Some(line) = schedule.warmup_overrun(cfg.warmup_steps, cfg.warmup_ratio) {
        eprintln!("warning: {line}");
    }
    let fresh = TrainState {
        format_version: saves::FORMAT_VERSION,
        global_step: 0,
        total_steps,
        epoch: 0,
        next_micro_batch: 0,
        seed: cfg.seed,
        tokens_seen: 0,
        fingerprint: fingerprint::fingerprint(cfg, &plan, &lora, objective.settings()).to_string(),
    };
    let (mut opt, mut state) = match &resume {
        Some(dir) => restore(be, cfg, &mut model, objective.as_mut(), dir, fresh)?,
        None => (Optimizer::with_extras(be, &model, &objective.extra_params(), cfg.adamw_config()), fresh),
    };
    // Only now that the checkpoint is accepted: a refused resume keeps them.
    if let Some(dir) = &resume {
        super::run_dir::abandon_after(&output_dir, dir, state.global_step)?;
    }

    objective.before_training(be, &model, cfg, &train)?;

    let eval_every = interval(cfg.eval_steps, cfg.evals_per_epoch, steps_per_epoch).filter(|_| !val.is_empty());
    let save_every = interval(cfg.save_steps, cfg.saves_per_epoch, steps_per_epoch);
    let mut metrics = MetricsLog::open(&output_dir, resume.as_ref().map(|_| state.global_step))?;
    let progress = Progress::new(total_steps, state.global_step);
    let mut epoch_batches: (usize, Vec<MicroBatch>) = (state.epoch, plan.micro_batches(state.epoch));
    let mut window = LogWindow::new();
    let mut collapse = CollapseWatch::default();
    let (run_t0, run_tokens0) = (Instant::now(), state.tokens_seen);
    let (mut last_loss, mut last_eval) = (None, None);
    let mut stopped_by = None;

    // From here a Ctrl-C is answered after the step in progress, with a
    // checkpoint; before, it ends the process at once (nothing to save yet).
    super::interrupt::install()?;
    while state.global_step < total_steps {
        if state.epoch != epoch_batches.0 {
            epoch_batches = (state.epoch, plan.micro_batches(state.epoch));
        }
        let n_micro = epoch_batches.1.len();
        let step_mbs = &epoch_batches.1[state.next_micro_batch..(state.next_micro_batch + plan.gradient_accumulation_steps).min(n_micro)];
        let lr = schedule.lr(state.global_step);
        let out = objective.step(Step {
            be,
            cfg,
            model: &mut model,
            opt: &mut opt,
            lr,
            examples: &train,
            micro_batches: step_mbs,
            step: state.global_step,
        })?;
        if out.targets == 0 {
            progress.line(&format!("step {}: no target tokens in this step (all labels -100); no update", state.global_step + 1));
        }

        // Advance the data position.
        state.global_step += 1;
        state.tokens_seen += out.tokens as u64;
        state.next_micro_batch += step_mbs.len();
        if state.next_micro_batch >= n_micro {
            state.epoch += 1;
            state.next_micro_batch = 0;
        }
        if let Some(f) = after_first_step.take()
            && let Some(line) = f()
        {
            progress.line(&line);
        }
        window.add(&out);
        if out.targets > 0 {
            last_loss = Some(out.loss);
        }

        let step = state.global_step;
        let epoch_f = state.epoch as f64 + state.next_micro_batch as f64 / n_micro.max(1) as f64;
        if step.is_multiple_of(cfg.logging_steps.max(1)) || step == total_steps {
            let (mean, tps, extra) = window.take();
            let mut record = json!({
                "step": step, "epoch": epoch_f, "loss": mean, "lr": out.lr, "grad_norm": out.grad_norm,
                "tokens_per_s": tps, "tokens": state.tokens_seen,
            });
            for &(name, v) in &extra.0 {
                // NaN (no value in the window) is written as null, as TRL's None.
                record[name] = if v.is_finite() { json!(v) } else { Value::Null };
            }
            metrics.write(&record)?;
            let mut line = format!("loss {mean:.4} lr {:.2e} grad_norm {:.3} {tps:.0} tok/s", out.lr, out.grad_norm);
            if let (Some(acc), Some(margin)) = (extra.get("rewards/accuracies"), extra.get("rewards/margins")) {
                line += &format!(" acc {acc:.2} margin {margin:.3}");
            }
            if let Some(reward) = extra.get("reward").filter(|r| r.is_finite()) {
                line += &format!(" reward {reward:.3}");
            }
            progress.step(step, Some(&line));
            if let Some(warning) = collapse.check(&extra) {
                progress.line(&warning);
            }
        } else {
            progress.step(step, None);
        }
        // Evaluation and saving at the last step happen after the loop.
        if eval_every.is_some_and(|e| step.is_multiple_of(e)) && step != total_steps {
            let (ev, em) = objective.evaluate(be, &model, &val, cfg.micro_batch_size)?;
            metrics.write(&eval_record(step, Some(epoch_f), ev, &em))?;
            progress.line(&format!("step {step}: eval_loss {ev:.4}"));
            last_eval = Some(ev);
            window.t0 = Instant::now();
        }
        if save_every.is_some_and(|s| step.is_multiple_of(s)) && step != total_steps {
            let dir = save_checkpoint(be, cfg, &model, &opt, &lora, objective.as_ref(), &state, &output_dir)?;
            progress.line(&format!("saved {}", dir.display()));
            if let Some(warning) = curves::refresh(&output_dir) {
                progress.line(&warning);
            }
            window.t0 = Instant::now();
        }
        // Between optimiser steps: the state is whole, so it can be saved.
        if let Some(sig) = super::interrupt::requested().filter(|_| step < total_steps) {
            stopped_by = Some(sig);
            break;
        }
    }
    progress.finish();

    if !val.is_empty() && stopped_by.is_none() {
        let (ev, em) = objective.evaluate(be, &model, &val, cfg.micro_batch_size)?;
        metrics.write(&eval_record(state.global_step, None, ev, &em))?;
        eprintln!("eval_loss {ev:.4} on {} validation examples", val.len());
        last_eval = Some(ev);
    }
    // The final adapter, and a last checkpoint so the run can be extended.
    objective.save_adapter(be, &model, &lora, &output_dir)?;
    let mut interrupted = None;
    if save_every.is_some() || stopped_by.is_some() {
        let dir = save_checkpoint(be, cfg, &model, &opt, &lora, objective.as_ref(), &state, &output_dir)?;
        interrupted = stopped_by.map(|sig| (sig, dir));
    }
    if let Some(warning) = curves::refresh(&output_dir) {
        eprintln!("{warning}");
    }
    let secs = run_t0.elapsed().as_secs_f64().max(1e-9);
    Ok(Summary {
        steps: state.global_step,
        last_loss,
        eval_loss: last_eval,
        tokens_per_s: (state.tokens_seen - run_tokens0) as f64 / secs,
        adapter_dir: output_dir,
        interrupted,
    })
}
