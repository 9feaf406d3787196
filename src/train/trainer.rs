//! The training loop: micro-batches from the data plan, forward/backward
//! with the loss normalised over the whole optimiser step, clipping and
//! AdamW, the schedule, logging, evaluation and checkpoints.

use super::checkpoint::{self, TrainState};
use super::collapse::CollapseWatch;
use super::curves;
use super::diverged::Diverged;
pub use super::examples::Examples;
use super::examples::data_plan;
use super::fingerprint;
use super::objectives::{Metrics, Objective};
use super::optimizer::Optimizer;
use super::preference;
use super::plan::MicroBatch;
use super::progress::{MetricsLog, Progress};
use super::schedule::{Kind, Schedule};
use crate::adapter::{LoraConfig, peft};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::preference::{PreferencePair, RewardPair};
use super::reward::{self, ScoreHead};
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::graph::{BackwardOpts, LossSum};
use anyhow::{Context, Result, bail};
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
    /// A reward model's score head (reward_model: true), trained with the
    /// adapter and saved as PEFT saves modules_to_save.
    pub score_head: Option<ScoreHead<B>>,
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

/// Mean loss of `seqs`, in batches of `rows` sequences.
pub fn evaluate<B: Backend>(be: &B, model: &Model<B>, seqs: &[Sequence], rows: usize) -> Result<LossSum> {
    let mut sum = LossSum::default();
    for chunk in seqs.chunks(rows.max(1)) {
        sum.add(model.eval_loss(be, &Batch::from_sequences(chunk, model.cfg.vocab)?));
    }
    Ok(sum)
}

/// The validation loss (and, for pairs, the objective's metrics).
fn evaluate_examples<B: Backend>(
    be: &B,
    model: &Model<B>,
    objective: Option<&Objective>,
    head: Option<&ScoreHead<B>>,
    val: &Examples,
    rows: usize,
) -> Result<(f64, Metrics)> {
    match (val, objective) {
        (Examples::Sequences(s), _) => Ok((evaluate(be, model, s, rows)?.mean(), Metrics::default())),
        (Examples::Reward(r), Some(Objective::Reward(c))) => {
            let head = head.context("a reward model needs its score head")?;
            eval_in_chunks(r, rows, |refs| reward::reward_eval(be, model, head, c, refs).map(|l| (l.loss, l.metrics)))
        }
        (Examples::Kto(k), Some(Objective::Kto(c))) => {
            eval_in_chunks(k, rows, |refs| preference::kto_eval(be, model, c, refs).map(|l| (l.loss, l.metrics)))
        }
        (Examples::Pairs(p), Some(obj)) if !matches!(obj, Objective::Kto(_) | Objective::Reward(_)) => {
            eval_in_chunks(p, rows, |refs| preference::pair_eval(be, model, obj, refs).map(|l| (l.loss, l.metrics)))
        }
        (Examples::Pairs(_) | Examples::Kto(_) | Examples::Reward(_), _) => bail!("these examples need the matching objective"),
    }
}

/// Loss and metrics over `items` evaluated `rows` at a time, each chunk
/// weighted by its size.
fn eval_in_chunks<T>(items: &[T], rows: usize, mut eval: impl FnMut(&[&T]) -> Result<(f64, Metrics)>) -> Result<(f64, Metrics)> {
    let (mut loss, mut parts) = (0.0, Vec::new());
    for chunk in items.chunks(rows.max(1)) {
        let refs: Vec<&T> = chunk.iter().collect();
        let (l, m) = eval(&refs)?;
        loss += l * chunk.len() as f64;
        parts.push((m, chunk.len()));
    }
    Ok((loss / items.len().max(1) as f64, preference::merge_metrics(&parts)))
}

/// A dropout seed per (run seed, step, micro-batch): stateless, so a resumed
/// run draws the same masks.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

/// One optimiser step's figures.
struct StepOutcome {
    loss: f64,
    /// Target tokens of the step (the loss denominator).
    targets: usize,
    /// Input tokens of the step.
    tokens: usize,
    lr: f64,
    grad_norm: f64,
    /// The objective's own metrics (preference runs), in TRL's names.
    metrics: Metrics,
}

/// Forward/backward over the step's micro-batches, each token's gradient
/// scaled by 1 / (target tokens of the whole step), then clip and update.
#[allow(clippy::too_many_arguments)]
fn optimizer_step<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    lr: f64,
    examples: &[Sequence],
    micro_batches: &[MicroBatch],
    step: usize,
) -> Result<StepOutcome> {
    let batches = micro_batches
        .iter()
        .map(|mb| {
            Batch::from_sequences(mb.iter().map(|&i| &examples[i]), model.cfg.vocab)
        })
        .collect::<Result<Vec<Batch>>>()?;
    let targets: usize = batches.iter().map(|b| b.n_targets()).sum();
    let tokens: usize = batches.iter().map(|b| b.n_tokens()).sum();
    let dropout = model.loras().any(|(_, _, l)| l.dropout > 0.0);
    model.zero_grad(be);
    let mut sum = LossSum::default();
    for (mi, batch) in batches.iter().enumerate() {
        let opts = BackwardOpts {
            grad_scale: 1.0 / targets.max(1) as f32,
            gradient_checkpointing: cfg.gradient_checkpointing,
            dropout_seed: dropout.then(|| dropout_seed(cfg.seed, step, mi)),
        };
        sum.add(model.forward_backward(be, batch, opts));
    }
    // A step with nothing to learn from (every label -100) changes nothing.
    let grad_norm = if targets == 0 { 0.0 } else { opt.step(be, model, lr as f32) };
    let loss = sum.mean();
    if targets > 0 && !loss.is_finite() {
        return Err(Diverged(format!(
            "step {}: the loss is {loss} (grad norm {grad_norm}); training diverged. Lower learning_rate (now {}) or check the data",
            step + 1,
            cfg.learning_rate
        ))
        .into());
    }
    Ok(StepOutcome { loss, targets, tokens, lr, grad_norm, metrics: Metrics::default() })
}

/// Clip and update the LoRA parameters (and the score head of a reward
/// model); returns the pre-clip global gradient norm.
fn update<B: Backend>(be: &B, opt: &mut Optimizer<B>, model: &mut Model<B>, head: Option<&mut ScoreHead<B>>, lr: f64) -> Result<f64> {
    match head {
        Some(h) => opt.step_with(be, model, &mut [&mut h.param], lr as f32),
        None => Ok(opt.step(be, model, lr as f32)),
    }
}

/// One optimiser step on preference pairs: each micro-batch's gradient is
/// scaled by its share of the step's pairs, so the step optimises the mean
/// loss over all of them.
#[allow(clippy::too_many_arguments)]
fn preference_step<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    objective: &Objective,
    model: &mut Model<B>,
    opt: &mut Optimizer<B>,
    lr: f64,
    examples: &Examples,
    micro_batches: &[MicroBatch],
    step: usize,
    ref_sums: Option<&[(f64, f64)]>,
    mut head: Option<&mut ScoreHead<B>>,
) -> Result<StepOutcome> {
    let total: usize = micro_batches.iter().map(|mb| mb.len()).sum();
    let dropout = model.loras().any(|(_, _, l)| l.dropout > 0.0);
    model.zero_grad(be);
    if let Some(h) = head.as_deref_mut() {
        h.zero_grad(be);
    }
    let (mut loss, mut tokens, mut parts) = (0.0, 0, Vec::new());
    for (mi, mb) in micro_batches.iter().enumerate() {
        let opts = BackwardOpts {
            grad_scale: 0.0,
            gradient_checkpointing: cfg.gradient_checkpointing,
            dropout_seed: dropout.then(|| dropout_seed(cfg.seed, step, mi)),
        };
        let share = mb.len() as f64 / total as f64;
        let (l, metrics, n) = match (examples, objective) {
            (Examples::Kto(exs), Objective::Kto(k)) => {
                let refs: Vec<_> = mb.iter().map(|&i| &exs[i]).collect();
                let (l, n) = preference::kto_forward_backward(be, model, k, &refs, share, opts)
                    .with_context(|| format!("step {}", step + 1))?;
                (l.loss, l.metrics, n)
            }
            (Examples::Reward(rp), Objective::Reward(c)) => {
                let h = head.as_deref_mut().context("a reward model needs its score head")?;
                let refs: Vec<&RewardPair> = mb.iter().map(|&i| &rp[i]).collect();
                let (l, n) = reward::reward_forward_backward(be, model, h, c, &refs, share, opts)
                    .with_context(|| format!("step {}", step + 1))?;
                (l.loss, l.metrics, n)
            }
            (Examples::Pairs(pairs), _) => {
                let refs: Vec<&PreferencePair> = mb.iter().map(|&i| &pairs[i]).collect();
                let pre: Option<Vec<(f64, f64)>> = ref_sums.map(|s| mb.iter().map(|&i| s[i]).collect());
                let (l, n) = preference::pair_forward_backward(be, model, objective, &refs, share, opts, pre.as_deref())
                    .with_context(|| format!("step {}", step + 1))?;
                (l.loss, l.metrics, n)
            }
            _ => bail!("rl: {} does not train on these examples", cfg.rl.as_deref().unwrap_or("none")),
        };
        loss += share * l;
        tokens += n;
        parts.push((metrics, mb.len()));
    }
    let metrics = preference::merge_metrics(&parts);
    if !loss.is_finite() {
        return Err(Diverged(format!(
            "step {}: the {} loss is {loss} (logps/chosen {:.3}, logps/rejected {:.3}); training diverged. \
             Lower learning_rate (now {}), raise rl_beta, or check that chosen and rejected differ in the data",
            step + 1,
            cfg.rl.as_deref().unwrap_or("preference"),
            metrics.get("logps/chosen").unwrap_or(f64::NAN),
            metrics.get("logps/rejected").unwrap_or(f64::NAN),
            cfg.learning_rate
        ))
        .into());
    }
    let grad_norm = update(be, opt, model, head, lr)?;
    Ok(StepOutcome { loss, targets: total, tokens, lr, grad_norm, metrics })
}

/// Loss and throughput between two log records (the logged loss is the
/// mean of the steps' losses, as transformers' Trainer logs it).
struct LogWindow {
    loss_sum: f64,
    steps: usize,
    tokens: usize,
    /// Σ over the window's steps of each objective metric.
    metrics: Vec<(&'static str, f64)>,
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
                match self.metrics.iter_mut().find(|(n, _)| *n == name) {
                    Some(m) => m.1 += v,
                    None => self.metrics.push((name, v)),
                }
            }
        }
        self.tokens += o.tokens;
    }

    /// (mean loss, tokens/s, mean metrics) of the window; starts the next one.
    fn take(&mut self) -> (f64, f64, Metrics) {
        let mean = if self.steps > 0 { self.loss_sum / self.steps as f64 } else { f64::NAN };
        let tps = self.tokens as f64 / self.t0.elapsed().as_secs_f64().max(1e-9);
        let metrics = Metrics(self.metrics.iter().map(|&(n, v)| (n, v / self.steps.max(1) as f64)).collect());
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
    head: &mut Option<ScoreHead<B>>,
    dir: &Path,
    fresh: TrainState,
) -> Result<(Optimizer<B>, TrainState)> {
    let saved = checkpoint::read_state(dir)?;
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
    let n = match head.as_mut() {
        Some(h) => {
            let (n, score) = peft::load_reward(be, model, dir).with_context(|| format!("loading the adapter of {}", dir.display()))?;
            *h = ScoreHead::from_host(be, &score, h.pad_token_id);
            n
        }
        None => peft::load(be, model, dir).with_context(|| format!("loading the adapter of {}", dir.display()))?,
    };
    let (opt_step, moments) = checkpoint::read_moments(model, dir)?;
    let extras: Vec<&crate::train::optimizer::ExtraParam<B>> = head.iter().map(|h| &h.param).collect();
    let mut opt = Optimizer::with_extras(be, model, &extras, cfg.adamw_config());
    opt.load_moments(be, &moments)?;
    if !extras.is_empty() {
        opt.load_extra_moments(be, &checkpoint::read_extra_moments(dir, &extras)?)?;
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

/// Save checkpoint-N and drop the oldest beyond save_total_limit.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Backend>(
    be: &B,
    cfg: &RunConfig,
    model: &Model<B>,
    opt: &Optimizer<B>,
    lora: &LoraConfig,
    head: Option<&ScoreHead<B>>,
    state: &TrainState,
    output_dir: &Path,
) -> Result<PathBuf> {
    let dir = match head {
        Some(h) => checkpoint::save_reward(be, model, h, opt, lora, state, output_dir)?,
        None => checkpoint::save(be, model, opt, lora, state, output_dir)?,
    };
    if let Some(limit) = cfg.save_total_limit {
        checkpoint::prune(output_dir, limit)?;
    }
    Ok(dir)
}

pub fn train<B: Backend>(run: Run<'_, B>) -> Result<Summary> {
    let Run { be, cfg, mut model, lora, train, val, output_dir, resume, mut after_first_step, mut score_head } = run;
    if train.is_empty() {
        bail!("no training examples left after preparation (all rows dropped or moved to validation)");
    }
    let objective = cfg.objective()?;
    match (&train, &objective) {
        (Examples::Sequences(_), None) | (Examples::Kto(_), Some(Objective::Kto(_))) => {}
        (Examples::Reward(_), Some(Objective::Reward(_))) if score_head.is_some() => {}
        (Examples::Pairs(_), Some(o)) if !matches!(o, Objective::Kto(_) | Objective::Reward(_)) => {}
        _ => bail!("the training examples do not match rl ({})", cfg.rl.as_deref().unwrap_or("none: supervised")),
    }
    let plan = data_plan(cfg, &train, objective.is_none());
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
        format_version: checkpoint::FORMAT_VERSION,
        global_step: 0,
        total_steps,
        epoch: 0,
        next_micro_batch: 0,
        seed: cfg.seed,
        tokens_seen: 0,
        fingerprint: fingerprint::fingerprint(cfg, &plan, &lora).to_string(),
    };
    let (mut opt, mut state) = match &resume {
        Some(dir) => restore(be, cfg, &mut model, &mut score_head, dir, fresh)?,
        None => {
            let extras: Vec<&crate::train::optimizer::ExtraParam<B>> = score_head.iter().map(|h| &h.param).collect();
            (Optimizer::with_extras(be, &model, &extras, cfg.adamw_config()), fresh)
        }
    };
    // Only now that the checkpoint is accepted: a refused resume keeps them.
    if let Some(dir) = &resume {
        super::run_dir::abandon_after(&output_dir, dir, state.global_step)?;
    }

    // The reference policy is the base model, which training never changes:
    // its log-probs can be computed once, before the first step.
    let ref_sums = match (&train, &objective) {
        (Examples::Pairs(pairs), Some(obj)) if cfg.precompute_ref_log_probs && obj.needs_reference() => {
            let t0 = Instant::now();
            let mut sums = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(cfg.micro_batch_size.max(1)) {
                let refs: Vec<&PreferencePair> = chunk.iter().collect();
                sums.extend(preference::reference_sums(be, &model, &refs)?);
            }
            eprintln!("reference log-probs of {} pairs precomputed in {:.1}s", pairs.len(), t0.elapsed().as_secs_f64());
            Some(sums)
        }
        (Examples::Kto(_), _) if cfg.precompute_ref_log_probs => {
            bail!("precompute_ref_log_probs is implemented for pairs (dpo, ipo); KTO computes its reference in each step (set it to false)")
        }
        _ => None,
    };

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
        let step_mbs = &epoch_batches.1[state.next_micro_batch..(state.next_micro_batch + cfg.gradient_accumulation_steps).min(n_micro)];
        let lr = schedule.lr(state.global_step);
        let out = match (&train, &objective) {
            (Examples::Sequences(seqs), _) => optimizer_step(be, cfg, &mut model, &mut opt, lr, seqs, step_mbs, state.global_step)?,
            (examples, Some(obj)) => {
                preference_step(be, cfg, obj, &mut model, &mut opt, lr, examples, step_mbs, state.global_step, ref_sums.as_deref(), score_head.as_mut())?
            }
            (_, None) => unreachable!("checked before the loop"),
        };
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
                record[name] = json!(v);
            }
            metrics.write(&record)?;
            let mut line = format!("loss {mean:.4} lr {:.2e} grad_norm {:.3} {tps:.0} tok/s", out.lr, out.grad_norm);
            if let (Some(acc), Some(margin)) = (extra.get("rewards/accuracies"), extra.get("rewards/margins")) {
                line += &format!(" acc {acc:.2} margin {margin:.3}");
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
            let (ev, em) = evaluate_examples(be, &model, objective.as_ref(), score_head.as_ref(), &val, cfg.micro_batch_size)?;
            metrics.write(&eval_record(step, Some(epoch_f), ev, &em))?;
            progress.line(&format!("step {step}: eval_loss {ev:.4}"));
            last_eval = Some(ev);
            window.t0 = Instant::now();
        }
        if save_every.is_some_and(|s| step.is_multiple_of(s)) && step != total_steps {
            let dir = save_checkpoint(be, cfg, &model, &opt, &lora, score_head.as_ref(), &state, &output_dir)?;
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
        let (ev, em) = evaluate_examples(be, &model, objective.as_ref(), score_head.as_ref(), &val, cfg.micro_batch_size)?;
        metrics.write(&eval_record(state.global_step, None, ev, &em))?;
        eprintln!("eval_loss {ev:.4} on {} validation examples", val.len());
        last_eval = Some(ev);
    }
    // The final adapter, and a last checkpoint so the run can be extended.
    match &score_head {
        Some(h) => peft::save_reward(be, &model, &lora, &h.weight(be), &output_dir)?,
        None => peft::save(be, &model, &lora, &output_dir)?,
    }
    let mut interrupted = None;
    if save_every.is_some() || stopped_by.is_some() {
        let dir = save_checkpoint(be, cfg, &model, &opt, &lora, score_head.as_ref(), &state, &output_dir)?;
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
