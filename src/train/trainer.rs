//! The training loop: micro-batches from the data plan, forward/backward
//! with the loss normalised over the whole optimiser step, clipping and
//! AdamW, the schedule, logging, evaluation and checkpoints.

use super::checkpoint::{self, TrainState};
use super::optimizer::{AdamWConfig, Optimizer};
use super::plan::{DataPlan, MicroBatch};
use super::progress::{Metrics, Progress};
use super::schedule::{Kind, Schedule};
use crate::adapter::{LoraConfig, peft};
use crate::backend::Backend;
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::graph::{BackwardOpts, LossSum};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The settings of the loop (the run config, resolved).
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub micro_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub sample_packing: bool,
    pub sequence_len: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub num_epochs: f64,
    pub max_steps: Option<usize>,
    pub learning_rate: f64,
    pub lr_scheduler: String,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: Option<f64>,
    pub adamw: AdamWConfig,
    pub gradient_checkpointing: bool,
    pub logging_steps: usize,
    pub eval_steps: Option<usize>,
    pub evals_per_epoch: Option<usize>,
    pub save_steps: Option<usize>,
    pub saves_per_epoch: Option<usize>,
    pub save_total_limit: Option<usize>,
}

/// Everything a run needs, prepared by the caller.
pub struct Run<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: LoopConfig,
    /// The model with its LoRA adapters attached (fresh or loaded).
    pub model: Model<B>,
    /// How the adapter is described in adapter_config.json.
    pub lora: LoraConfig,
    pub train: Vec<Sequence>,
    pub val: Vec<Sequence>,
    pub output_dir: PathBuf,
    /// Continue from this checkpoint directory.
    pub resume: Option<PathBuf>,
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
}

/// The settings a checkpoint must share with the run resuming it, as
/// key -> value, so a refusal can name what changed.
fn fingerprint(cfg: &LoopConfig, plan: &DataPlan, lora: &LoraConfig) -> Value {
    let data = blake3::hash(&plan.lengths.iter().flat_map(|l| (*l as u64).to_le_bytes()).collect::<Vec<u8>>());
    // Values as their Rust display strings: exact, and stable through JSON.
    let entries: [(&str, String); 17] = [
        ("training examples (lengths hash)", data.to_hex().to_string()),
        ("micro_batch_size", cfg.micro_batch_size.to_string()),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps.to_string()),
        ("sample_packing", cfg.sample_packing.to_string()),
        ("sequence_len", cfg.sequence_len.to_string()),
        ("shuffle_merged_datasets", cfg.shuffle.to_string()),
        ("seed", cfg.seed.to_string()),
        ("learning_rate", cfg.learning_rate.to_string()),
        ("lr_scheduler", cfg.lr_scheduler.clone()),
        ("adam_beta1", cfg.adamw.beta1.to_string()),
        ("adam_beta2", cfg.adamw.beta2.to_string()),
        ("adam_epsilon", cfg.adamw.eps.to_string()),
        ("weight_decay", cfg.adamw.weight_decay.to_string()),
        ("max_grad_norm", format!("{:?}", cfg.adamw.max_grad_norm)),
        ("lora_r", lora.r.to_string()),
        ("lora_alpha", lora.alpha.to_string()),
        ("lora_dropout", lora.dropout.to_string()),
    ];
    Value::Object(entries.into_iter().map(|(k, v)| (k.to_string(), Value::String(v))).collect())
}

fn fingerprint_diff(saved: &str, now: &Value) -> Vec<String> {
    let saved: Value = serde_json::from_str(saved).unwrap_or(Value::Null);
    now.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| saved.get(k.as_str()) != Some(v))
        .map(|(k, v)| {
            let was = saved.get(k.as_str()).and_then(|x| x.as_str()).unwrap_or("absent");
            format!("{k} (checkpoint: {was}, now: {})", v.as_str().unwrap_or_default())
        })
        .collect()
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

/// A dropout seed per (run seed, step, micro-batch): stateless, so a resumed
/// run draws the same masks.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

pub fn train<B: Backend>(run: Run<'_, B>) -> Result<Summary> {
    let Run { be, cfg, mut model, lora, train, val, output_dir, resume, mut after_first_step } = run;
    if train.is_empty() {
        bail!("no training examples left after preparation (all rows dropped or moved to validation)");
    }
    std::fs::create_dir_all(&output_dir).with_context(|| format!("cannot create output_dir {}", output_dir.display()))?;
    let plan = DataPlan {
        lengths: train.iter().map(|s| s.input_ids.len()).collect(),
        micro_batch_size: cfg.micro_batch_size,
        gradient_accumulation_steps: cfg.gradient_accumulation_steps,
        sample_packing: cfg.sample_packing,
        sequence_len: cfg.sequence_len,
        shuffle: cfg.shuffle,
        seed: cfg.seed,
    };
    let total_steps = plan.total_steps(cfg.num_epochs, cfg.max_steps);
    let steps_per_epoch = plan.steps_in_epoch(0);
    let schedule = Schedule {
        kind: Kind::parse(&cfg.lr_scheduler)?,
        base_lr: cfg.learning_rate,
        warmup_steps: Schedule::warmup_from(cfg.warmup_steps, cfg.warmup_ratio, total_steps),
        total_steps,
    };
    let fp = fingerprint(&cfg, &plan, &lora);
    let mut opt = Optimizer::new(be, &model, cfg.adamw);
    let mut state = TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        global_step: 0,
        total_steps,
        epoch: 0,
        next_micro_batch: 0,
        seed: cfg.seed,
        tokens_seen: 0,
        fingerprint: fp.to_string(),
    };
    if let Some(dir) = &resume {
        let saved = checkpoint::read_state(dir)?;
        let changed = fingerprint_diff(&saved.fingerprint, &fp);
        if !changed.is_empty() {
            bail!(
                "cannot resume from {}: settings that decide the data order or the optimisation changed: {}",
                dir.display(),
                changed.join("; ")
            );
        }
        let n = peft::load(be, &mut model, dir).with_context(|| format!("loading the adapter of {}", dir.display()))?;
        let (opt_step, moments) = checkpoint::read_moments(&model, dir)?;
        opt = Optimizer::new(be, &model, cfg.adamw);
        opt.load_moments(be, &moments)?;
        opt.step = opt_step;
        state = TrainState { total_steps, fingerprint: fp.to_string(), ..saved };
        eprintln!("resumed from {} at step {} ({n} LoRA modules)", dir.display(), state.global_step);
    }

    let eval_every = interval(cfg.eval_steps, cfg.evals_per_epoch, steps_per_epoch).filter(|_| !val.is_empty());
    let save_every = interval(cfg.save_steps, cfg.saves_per_epoch, steps_per_epoch);
    let mut metrics = Metrics::open(&output_dir, resume.as_ref().map(|_| state.global_step))?;
    let progress = Progress::new(total_steps, state.global_step);
    let dropout = model.loras().any(|(_, _, l)| l.dropout > 0.0);

    let mut epoch_batches: (usize, Vec<MicroBatch>) = (state.epoch, plan.micro_batches(state.epoch));
    let (mut window_loss, mut window_steps, mut window_tokens) = (0.0f64, 0usize, 0usize);
    let mut window_t0 = Instant::now();
    let (run_t0, run_tokens0) = (Instant::now(), state.tokens_seen);
    let (mut last_loss, mut last_eval) = (None, None);

    while state.global_step < total_steps {
        if state.epoch != epoch_batches.0 {
            epoch_batches = (state.epoch, plan.micro_batches(state.epoch));
        }
        let mbs = &epoch_batches.1;
        let ga = cfg.gradient_accumulation_steps;
        let step_mbs = &mbs[state.next_micro_batch..(state.next_micro_batch + ga).min(mbs.len())];
        let batches = step_mbs
            .iter()
            .map(|mb| {
                let seqs: Vec<Sequence> = mb.iter().map(|&i| train[i].clone()).collect();
                Batch::from_sequences(&seqs, model.cfg.vocab)
            })
            .collect::<Result<Vec<Batch>>>()?;
        let targets: usize = batches.iter().map(|b| b.n_targets()).sum();
        let tokens: usize = batches.iter().map(|b| b.n_tokens()).sum();

        model.zero_grad(be);
        let mut sum = LossSum::default();
        for (mi, batch) in batches.iter().enumerate() {
            let opts = BackwardOpts {
                grad_scale: 1.0 / targets.max(1) as f32,
                gradient_checkpointing: cfg.gradient_checkpointing,
                dropout_seed: dropout.then(|| dropout_seed(cfg.seed, state.global_step, mi)),
            };
            sum.add(model.forward_backward(be, batch, opts));
        }
        let lr = schedule.lr(state.global_step);
        let grad_norm = if targets == 0 {
            progress.line(&format!("step {}: no target tokens in this step (all labels -100); no update", state.global_step + 1));
            0.0
        } else {
            opt.step(be, &mut model, lr as f32)
        };
        let loss = sum.mean();
        if targets > 0 && !loss.is_finite() {
            bail!(
                "step {}: the loss is {loss} (grad norm {grad_norm}); training diverged. Lower learning_rate (now {}) or check the data",
                state.global_step + 1,
                cfg.learning_rate
            );
        }

        state.global_step += 1;
        state.tokens_seen += tokens as u64;
        state.next_micro_batch += step_mbs.len();
        if state.next_micro_batch >= mbs.len() {
            state.epoch += 1;
            state.next_micro_batch = 0;
        }
        if let Some(f) = after_first_step.take()
            && let Some(line) = f()
        {
            progress.line(&line);
        }
        if targets > 0 {
            window_loss += loss;
            window_steps += 1;
            last_loss = Some(loss);
        }
        window_tokens += tokens;

        let step = state.global_step;
        let epoch_f = state.epoch as f64 + state.next_micro_batch as f64 / epoch_batches.1.len().max(1) as f64;
        if step % cfg.logging_steps.max(1) == 0 || step == total_steps {
            let dt = window_t0.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / dt;
            let mean = if window_steps > 0 { window_loss / window_steps as f64 } else { f64::NAN };
            metrics.write(&json!({
                "step": step, "epoch": epoch_f, "loss": mean, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": tps, "tokens": state.tokens_seen,
            }))?;
            progress.step(step, Some(&format!("loss {mean:.4} lr {lr:.2e} grad_norm {grad_norm:.3} {tps:.0} tok/s")));
            (window_loss, window_steps, window_tokens) = (0.0, 0, 0);
            window_t0 = Instant::now();
        } else {
            progress.step(step, None);
        }
        if eval_every.is_some_and(|e| step % e == 0) && step != total_steps {
            let ev = evaluate(be, &model, &val, cfg.micro_batch_size)?.mean();
            metrics.write(&json!({"step": step, "epoch": epoch_f, "eval_loss": ev}))?;
            progress.line(&format!("step {step}: eval_loss {ev:.4}"));
            last_eval = Some(ev);
            window_t0 = Instant::now();
        }
        if save_every.is_some_and(|s| step % s == 0) && step != total_steps {
            let dir = checkpoint::save(be, &model, &opt, &lora, &state, &output_dir)?;
            if let Some(limit) = cfg.save_total_limit {
                checkpoint::prune(&output_dir, limit)?;
            }
            progress.line(&format!("saved {}", dir.display()));
            window_t0 = Instant::now();
        }
    }
    progress.finish();

    if !val.is_empty() {
        let ev = evaluate(be, &model, &val, cfg.micro_batch_size)?.mean();
        metrics.write(&json!({"step": state.global_step, "eval_loss": ev}))?;
        eprintln!("eval_loss {ev:.4} on {} validation examples", val.len());
        last_eval = Some(ev);
    }
    // The final adapter, and a last checkpoint so the run can be extended.
    peft::save(be, &model, &lora, &output_dir)?;
    if save_every.is_some() {
        checkpoint::save(be, &model, &opt, &lora, &state, &output_dir)?;
        if let Some(limit) = cfg.save_total_limit {
            checkpoint::prune(&output_dir, limit)?;
        }
    }
    let secs = run_t0.elapsed().as_secs_f64().max(1e-9);
    Ok(Summary {
        steps: state.global_step,
        last_loss,
        eval_loss: last_eval,
        tokens_per_s: (state.tokens_seen - run_tokens0) as f64 / secs,
        adapter_dir: output_dir,
    })
}

/// The checkpoint `resume_from_checkpoint` names: a directory, or the
/// newest complete checkpoint-N in output_dir. None when `true` finds none
/// (a fresh start, as Axolotl does).
pub fn resolve_resume(output_dir: &Path, latest: bool, path: Option<&str>) -> Result<Option<PathBuf>> {
    if let Some(p) = path {
        let dir = PathBuf::from(p);
        if !dir.join(checkpoint::STATE_FILE).is_file() {
            bail!(
                "resume_from_checkpoint: {} is not a complete checkpoint (no {}); checkpoints look like {}",
                dir.display(),
                checkpoint::STATE_FILE,
                checkpoint::checkpoint_dir(output_dir, 100).display()
            );
        }
        return Ok(Some(dir));
    }
    Ok(if latest { checkpoint::list(output_dir).pop().map(|(_, d)| d) } else { None })
}

impl LoopConfig {
    pub fn from_run(cfg: &crate::config::RunConfig) -> LoopConfig {
        LoopConfig {
            micro_batch_size: cfg.micro_batch_size,
            gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            sample_packing: cfg.sample_packing,
            sequence_len: cfg.sequence_len,
            shuffle: cfg.shuffle_merged_datasets,
            seed: cfg.seed,
            num_epochs: cfg.num_epochs,
            max_steps: cfg.max_steps,
            learning_rate: cfg.learning_rate,
            lr_scheduler: cfg.lr_scheduler.clone(),
            warmup_steps: cfg.warmup_steps,
            warmup_ratio: cfg.warmup_ratio,
            adamw: AdamWConfig {
                beta1: cfg.adam_beta1 as f32,
                beta2: cfg.adam_beta2 as f32,
                eps: cfg.adam_epsilon as f32,
                weight_decay: cfg.weight_decay as f32,
                max_grad_norm: (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm as f32),
            },
            gradient_checkpointing: cfg.gradient_checkpointing,
            logging_steps: cfg.logging_steps,
            eval_steps: cfg.eval_steps,
            evals_per_epoch: cfg.evals_per_epoch,
            save_steps: cfg.save_steps,
            saves_per_epoch: cfg.saves_per_epoch,
            save_total_limit: cfg.save_total_limit,
        }
    }
}
