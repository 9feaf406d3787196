//! What a run shows and records: an indicatif bar on a terminal (plain
//! lines otherwise) and output_dir/metrics.jsonl, one JSON object per
//! logged step or evaluation.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const METRICS_FILE: &str = "metrics.jsonl";
/// GRPO's sampled completions (log_completions), one JSON object per line
/// with the step that sampled it.
pub const COMPLETIONS_FILE: &str = "completions.jsonl";

/// The records of a step-keyed JSON-lines log up to `step` (the rest are
/// about to be recomputed by a resumed run).
fn records_up_to(path: &Path, step: usize) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Appends records to metrics.jsonl, flushing each so a killed run keeps
/// everything it logged.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// A fresh run starts an empty file; a resumed one keeps the records up
    /// to the checkpoint's step and drops the ones the interrupted run wrote
    /// after it (they are about to be recomputed).
    pub fn open(output_dir: &Path, resumed_at: Option<usize>) -> Result<MetricsLog> {
        let path = output_dir.join(METRICS_FILE);
        let kept = resumed_at.map(|step| records_up_to(&path, step)).unwrap_or_default();
        crate::util::atomic_write(&path, kept.as_bytes())?;
        // GRPO's completions log follows the same rule, when there is one.
        let completions = output_dir.join(COMPLETIONS_FILE);
        if completions.is_file() {
            let kept = resumed_at.map(|step| records_up_to(&completions, step)).unwrap_or_default();
            crate::util::atomic_write(&completions, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsLog { path, file })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}").with_context(|| format!("cannot write {}", self.path.display()))?;
        self.file.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The progress display.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    start_step: usize,
    t0: Instant,
}

impl Progress {
    pub fn new(total: usize, start_step: usize) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:28.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                    .expect("valid progress template")
                    .progress_chars("=> "),
            );
            bar.set_position(start_step as u64);
            bar.reset_eta();
            bar
        });
        Progress { bar, total, start_step, t0: Instant::now() }
    }

    /// Seconds left, from the pace of the steps run by this process.
    fn eta_s(&self, step: usize) -> f64 {
        let done = step.saturating_sub(self.start_step).max(1) as f64;
        self.t0.elapsed().as_secs_f64() / done * (self.total.saturating_sub(step)) as f64
    }

    /// After step `step` (1-based count of steps done): move the bar, and
    /// print a plain line when there is no terminal and `summary` is given.
    pub fn step(&self, step: usize, summary: Option<&str>) {
        match (&self.bar, summary) {
            (Some(bar), Some(s)) => {
                bar.set_message(s.to_string());
                bar.set_position(step as u64);
            }
            (Some(bar), None) => bar.set_position(step as u64),
            (None, Some(s)) => eprintln!("step {step}/{} {s} eta {:.0}s", self.total, self.eta_s(step)),
            (None, None) => {}
        }
    }

    /// A line printed above the bar (or plainly).
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
