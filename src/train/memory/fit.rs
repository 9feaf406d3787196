//! The fit check: refuse a run whose planned peak exceeds the device's
//! memory, naming the changes of one setting that would make it fit (for
//! GRPO also fewer completions sampled at once and a shorter
//! max_completion_length, which shrink the sampling phase).

use super::{MemoryPlan, RunShape, human};
use anyhow::{Result, bail};
use std::fmt;

/// A setting that would make a run fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// micro_batch_size (everything else unchanged).
    MicroBatch(usize),
    /// sequence_len at micro_batch_size 1.
    SeqLen(usize),
    /// gradient_checkpointing: true.
    GradientCheckpointing,
    /// GRPO: at most this many completions sampled at once (a generation
    /// batch: prompts per step × num_generations).
    Completions(usize),
    /// GRPO: max_completion_length.
    MaxCompletion(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitChange {
    pub setting: Setting,
    /// The predicted total with this change.
    pub predicted: u64,
}

impl fmt::Display for FitChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.setting {
            Setting::MicroBatch(mb) => format!("micro_batch_size: {mb}"),
            Setting::SeqLen(len) => format!("micro_batch_size: 1 with sequence_len: {len}"),
            Setting::GradientCheckpointing => "gradient_checkpointing: true".to_string(),
            Setting::Completions(n) => {
                format!("at most {n} completions per generation batch (fewer num_generations or prompts per step)")
            }
            Setting::MaxCompletion(len) => format!("max_completion_length: {len}"),
        };
        write!(f, "{what:<44} (predicted {})", human(self.predicted))
    }
}

/// The largest `x` in `1..below` with `total(x)` fitting, for a total that
/// grows with `x` (binary search: each probe is a traced plan).
fn largest_fitting(below: usize, available: u64, total: impl Fn(usize) -> u64) -> Option<(usize, u64)> {
    let (mut lo, mut hi, mut best) = (1, below, None);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let t = total(mid);
        if t <= available {
            best = Some((mid, t));
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    best
}

impl MemoryPlan {
    /// Changes of one setting that make the run fit in `available` bytes,
    /// each keeping the other settings as they are; only those that fit are
    /// listed:
    /// - the largest smaller micro-batch;
    /// - at micro-batch 1, the largest sequence length below the current one
    ///   (a multiple of 128), when micro-batch 1 alone is not enough (not
    ///   for GRPO, whose sequences are prompt + completion);
    /// - GRPO: the most completions per generation batch and the longest
    ///   max_completion_length below the current ones;
    /// - gradient checkpointing, when it is off.
    pub fn fitting_changes(&self, available: u64) -> Vec<FitChange> {
        let s = self.shape;
        let fits = |shape: RunShape| Some(self.replan(shape).total).filter(|&t| t <= available);
        let mut out = Vec::new();
        let mut smaller = (1..s.micro_batch).rev();
        if let Some((mb, t)) = smaller.find_map(|mb| Some((mb, fits(RunShape { micro_batch: mb, ..s })?))) {
            out.push(FitChange { setting: Setting::MicroBatch(mb), predicted: t });
        }
        match &self.grpo {
            None => {
                let at = |seq_len: usize| RunShape { micro_batch: 1, seq_len, ..s };
                if fits(at(s.seq_len)).is_none() {
                    let mut shorter = (1..=s.seq_len.saturating_sub(1) / 128).rev().map(|k| k * 128);
                    if let Some((len, t)) = shorter.find_map(|len| Some((len, fits(at(len))?))) {
                        out.push(FitChange { setting: Setting::SeqLen(len), predicted: t });
                    }
                }
            }
            Some(g) => {
                let shape = g.shape(s);
                let completions = |n: usize| {
                    // A micro-batch holds at most the completions sampled.
                    let run = RunShape { micro_batch: s.micro_batch.min(n), ..s };
                    self.replan_grpo(&super::GrpoShape { run, sequences: n, ..shape }).total
                };
                if let Some((n, t)) = largest_fitting(shape.sequences, available, completions) {
                    out.push(FitChange { setting: Setting::Completions(n), predicted: t });
                }
                let length = |len: usize| {
                    let run = RunShape { seq_len: shape.prompt_len + len, ..s };
                    self.replan_grpo(&super::GrpoShape { run, max_new: len, ..shape }).total
                };
                if let Some((len, t)) = largest_fitting(shape.max_new, available, length) {
                    out.push(FitChange { setting: Setting::MaxCompletion(len), predicted: t });
                }
            }
        }
        if !s.gradient_checkpointing
            && let Some(t) = fits(RunShape { gradient_checkpointing: true, ..s })
        {
            out.push(FitChange { setting: Setting::GradientCheckpointing, predicted: t });
        }
        out
    }
}

/// Refuse a run whose predicted peak exceeds `available` bytes, saying by
/// how much and which settings would make it fit.
pub fn fit_check(plan: &MemoryPlan, available: u64) -> Result<()> {
    if plan.total <= available {
        return Ok(());
    }
    let mut msg = format!(
        "the run will not fit in device memory: predicted peak {} > available {}\n{plan}",
        human(plan.total),
        human(available)
    );
    let changes = plan.fitting_changes(available);
    if changes.is_empty() {
        let fixed = plan.weights + plan.adapter + plan.optimizer + plan.workspace;
        let settings = if plan.grpo.is_some() {
            "micro_batch_size, completions per generation batch, max_completion_length or gradient_checkpointing"
        } else {
            "micro_batch_size, sequence_len (at micro_batch_size 1) or gradient_checkpointing"
        };
        msg.push_str(&format!(
            "\nno single change of {settings} makes it fit; weights, adapter, optimizer state and workspace alone \
             take {} (use a larger device, a smaller model, or fewer / lower-rank LoRA modules)",
            human(fixed)
        ));
    } else {
        msg.push_str("\nany one of these would fit:");
        for c in &changes {
            msg.push_str(&format!("\n  {c}"));
        }
    }
    bail!(msg)
}
