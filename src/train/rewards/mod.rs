//! GRPO reward functions: what scores each generated completion, as the
//! config lists them in `trl.reward_funcs`, called with TRL's GRPOTrainer
//! semantics. Two kinds of name:
//!
//! - `module.function` (the module path may be dotted, `pkg.mod.func`): a
//!   Python function with TRL's signature
//!   `f(prompts, completions, completion_ids, **kwargs) -> list[float | None]`,
//!   where kwargs holds every other dataset column as a list over the batch,
//!   plus `trainer_state` (`.global_step`, `.max_steps`) and the `log_extra`
//!   and `log_metric` callables (accepted; their calls are ignored). All of
//!   them run in one Python worker (`python`): the `python3` on PATH, or
//!   `FERROTUNE_PYTHON`, with the config file's folder first on `sys.path`.
//!   The worker's code (`worker.py`) ships inside the binary and needs only
//!   the standard library. It is started, and every function imported, by
//!   [`RewardFuncs::new`], so a bad module or function name fails before
//!   training starts; no Python starts when only built-ins are listed.
//! - `builtin:NAME[:ARG]` (`builtin`), computed in Rust:
//!   `builtin:answer_match[:COLUMN]` — 1.0 when the completion's final
//!   answer (after the last "####", else the last `\boxed{..}`, else the last
//!   number) equals the column's reference (after its last "####", else all
//!   of it; column `answer` by default), numerically where both are numbers;
//!   `builtin:format:REGEX` — 1.0 when the regex matches somewhere in the
//!   completion text (`.` spans lines; anchor with ^ and $); and
//!   `builtin:length:TARGET` — −max(0, tokens − TARGET) / TARGET.
//!
//! A function may return None for a completion (it does not apply); NaN and
//! infinities pass through as returned, as in TRL. [`RewardFuncs::weighted_sum`]
//! combines the functions as TRL does (weights, None and NaN skipped).

pub mod builtin;
mod python;

use anyhow::{Result, bail};
use builtin::Builtin;
use python::Worker;
use std::path::Path;

/// One completion to score, in TRL's terms.
pub struct Scored<'a> {
    /// The dataset's prompt: a string, or a list of {role, content}.
    pub prompt: &'a serde_json::Value,
    /// A string, or `[{"role": "assistant", "content": text}]` for
    /// conversational prompts.
    pub completion: &'a serde_json::Value,
    pub completion_ids: &'a [u32],
    /// The row's other columns (not "prompt").
    pub columns: &'a serde_json::Map<String, serde_json::Value>,
}

/// One configured reward function.
#[derive(Debug)]
enum Func {
    Builtin(Builtin),
    /// The index of the function in the worker's list.
    Python(usize),
}

/// The run's reward functions, in config order.
#[derive(Debug)]
pub struct RewardFuncs {
    /// Each entry as written in the config (for error messages).
    written: Vec<String>,
    funcs: Vec<Func>,
    /// The names the metrics use, one per function.
    names: Vec<String>,
    /// The Python worker, when any function is a Python one.
    worker: Option<Worker>,
    max_steps: usize,
}

impl RewardFuncs {
    /// `names` as written in the config; `config_dir` goes on the Python
    /// worker's sys.path. Built-ins are checked here; Python functions are
    /// imported (worker started) here, so a bad module or function name
    /// fails before training starts.
    pub fn new(names: &[String], config_dir: &Path) -> Result<RewardFuncs> {
        Self::with_python(names, config_dir, &python::interpreter())
    }

    /// [`RewardFuncs::new`] with the Python interpreter given, rather than
    /// taken from FERROTUNE_PYTHON or PATH.
    pub fn with_python(names: &[String], config_dir: &Path, python: &Path) -> Result<RewardFuncs> {
        if names.is_empty() {
            bail!("trl.reward_funcs is empty: GRPO needs at least one reward function (`module.function` or {})", builtin::KNOWN);
        }
        let mut funcs = Vec::with_capacity(names.len());
        let mut python_names = Vec::new();
        for name in names {
            let name = name.trim();
            if name.starts_with(builtin::PREFIX) {
                funcs.push(Func::Builtin(Builtin::parse(name)?));
            } else {
                python::check_name(name)?;
                funcs.push(Func::Python(python_names.len()));
                python_names.push(name.to_string());
            }
        }
        let (worker, py_display) = if python_names.is_empty() {
            (None, Vec::new())
        } else {
            let (w, display) = Worker::start(python, &python_names, config_dir)?;
            (Some(w), display)
        };
        let raw: Vec<String> = funcs
            .iter()
            .map(|f| match f {
                Func::Builtin(b) => b.short_name().to_string(),
                Func::Python(i) => py_display[*i].clone(),
            })
            .collect();
        Ok(RewardFuncs {
            written: names.iter().map(|n| n.trim().to_string()).collect(),
            funcs,
            names: dedupe(raw),
            worker,
            max_steps: 0,
        })
    }

    /// The names as TRL logs them (`rewards/<name>/mean`): a Python
    /// function's `__name__`, a built-in's NAME. A name that repeats gets
    /// `_2`, `_3`, ... so each function keeps its own metric.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// The run's total optimiser steps, shown to Python functions as
    /// `trainer_state.max_steps` (0 until set, as in a fresh TrainerState).
    pub fn set_max_steps(&mut self, max_steps: usize) {
        self.max_steps = max_steps;
    }

    /// rewards[f][i] for function f, completion i; None where the function
    /// returned None. `step` (1-based) is for error messages and for
    /// `trainer_state.global_step`, which is step − 1: TRL scores a step's
    /// completions before that step counts as done.
    pub fn score(&mut self, step: usize, batch: &[Scored]) -> Result<Vec<Vec<Option<f64>>>> {
        let mut out: Vec<Vec<Option<f64>>> = vec![Vec::new(); self.funcs.len()];
        for (f, func) in self.funcs.iter().enumerate() {
            if let Func::Builtin(b) = func {
                out[f] = batch.iter().map(|s| b.score(&self.written[f], step, s)).collect::<Result<_>>()?;
            }
        }
        if let Some(worker) = &mut self.worker {
            let python = worker.score(step, self.max_steps, batch)?;
            let mut python = python.into_iter();
            for (f, func) in self.funcs.iter().enumerate() {
                if let Func::Python(_) = func {
                    out[f] = python.next().expect("one result per Python function");
                }
            }
        }
        Ok(out)
    }

    /// The reward of each completion as TRL combines them: Σ_f weight_f ·
    /// reward_f, where a None or NaN reward adds nothing (torch's nansum).
    /// `weights` is `trl.reward_weights` (each 1.0 when absent).
    pub fn weighted_sum(&self, rewards: &[Vec<Option<f64>>], weights: Option<&[f64]>) -> Result<Vec<f64>> {
        if let Some(w) = weights
            && w.len() != self.funcs.len()
        {
            bail!("trl.reward_weights has {} entries but trl.reward_funcs has {}: give one weight per reward function", w.len(), self.funcs.len());
        }
        let n = rewards.first().map_or(0, Vec::len);
        Ok((0..n)
            .map(|i| {
                rewards
                    .iter()
                    .enumerate()
                    .filter_map(|(f, r)| r[i].map(|v| v * weights.map_or(1.0, |w| w[f])))
                    .filter(|v| !v.is_nan())
                    .sum()
            })
            .collect())
    }
}

/// Gives a repeated name `_2`, `_3`, ... in order of appearance.
fn dedupe(raw: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len());
    for name in raw {
        let mut candidate = name.clone();
        let mut k = 2;
        while out.contains(&candidate) {
            candidate = format!("{name}_{k}");
            k += 1;
        }
        out.push(candidate);
    }
    out
}
