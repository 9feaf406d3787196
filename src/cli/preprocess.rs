//! `ferrotune preprocess CONFIG.yml`: a run's datasets prepared (and SFT
//! datasets cached) exactly as `train` prepares them, with their counts,
//! and with --show N the first N examples as the model sees them. No model
//! weights are read: only config.json (the vocabulary size) and the tokenizer.

use crate::config::{self, RunConfig};
use crate::data::cache;
use crate::data::prepare::DatasetReport;
use crate::data::show::{Marking, Show};
use crate::data::tokenizer::TextTokenizer;
use crate::model::checkpoint;
use crate::backend::cpu::CpuBackend;
use crate::train::examples::{Batching, Examples, data_plan};
use crate::train::objectives;
use anyhow::Result;
use clap::{Args, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(Args)]
pub struct PreprocessArgs {
    /// The run config (YAML with Axolotl's keys), as `train` takes it.
    config: PathBuf,
    /// Override a config key, e.g. --set sequence_len=512 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the first N examples token by token, the trained tokens marked.
    #[arg(long, value_name = "N", default_value_t = 0)]
    show: usize,
    /// With --show: follow each token with its id, as text(id).
    #[arg(long)]
    ids: bool,
    /// With --show: mark trained tokens in colour (auto: on a terminal,
    /// unless NO_COLOR is set) or, with never, as [[trained]].
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

pub fn run(a: PreprocessArgs) -> Result<()> {
    let loaded = config::load(&a.config, &a.set)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let cfg = loaded.config;
    let model_dir = checkpoint::resolve_model_dir(&cfg.base_model, cfg.revision_of_model.as_deref())?;
    let vocab = checkpoint::read_config(&model_dir)?.vocab;
    // model_type / tokenizer_type / tokenizer_config checked as train checks them.
    let tokenizer_dir = config::check_checkpoint(&cfg, &model_dir)?;
    // The objective decides what its examples are; which backend would
    // train on them makes no difference here.
    let objective = objectives::select::<CpuBackend>(&cfg)?;
    let supervised = objective.packs();
    let batching = objective.batching(&cfg);
    let (train, val, report) = objective.prepare_data(&cfg, &tokenizer_dir, vocab)?;

    let mut out = std::io::stdout().lock();
    for r in &report {
        writeln!(out, "dataset {r}")?;
    }
    write!(out, "{}", summary(&cfg, &train, &val, &report, supervised, batching))?;
    if a.show == 0 {
        return Ok(());
    }
    let tok = match TextTokenizer::load(&tokenizer_dir, &cfg.special_tokens) {
        Ok(t) => Some(t),
        // Only pre-tokenized runs get this far without a tokenizer.
        Err(e) => {
            eprintln!("warning: {e:#}; showing token ids only");
            None
        }
    };
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let color = match a.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::io::stdout().is_terminal() && !no_color,
    };
    let show = Show { tokenizer: tok.as_ref(), marking: if color { Marking::Color } else { Marking::Brackets }, ids: a.ids };
    let mut shown = 0;
    for (split, examples) in [("train", &train), ("validation", &val)] {
        for i in 0..examples.len().min(a.show - shown) {
            writeln!(out, "\n--- {split} example {} of {} ---", i + 1, examples.len())?;
            let text = examples.show(i, &show);
            write!(out, "{text}")?;
            shown += 1;
        }
    }
    Ok(())
}

/// One line for a split: examples, tokens and (but for a reward model,
/// which scores whole sequences) trained tokens.
fn split_line(name: &str, examples: &Examples) -> String {
    let unit = examples.noun();
    if examples.is_empty() {
        return format!("{name}: 0 {unit}\n");
    }
    let (tokens, trained) = examples.token_counts();
    let mut line = format!("{name}: {} {unit}, {tokens} tokens", examples.len());
    if examples.scored_whole() {
        line += " (each sequence scored at its last token)";
    } else {
        line += &format!(", {trained} trained ({:.1}%)", 100.0 * trained as f64 / tokens.max(1) as f64);
    }
    line + "\n"
}

/// The counts after the per-dataset lines: rows, splits, packing,
/// batches and the cache.
fn summary(cfg: &RunConfig, train: &Examples, val: &Examples, report: &[DatasetReport], supervised: bool, batching: Batching) -> String {
    let sum = |f: fn(&DatasetReport) -> usize| report.iter().map(f).sum::<usize>();
    let mut s = format!(
        "rows: {} read, {} dropped (longer than sequence_len {}), {} truncated to sequence_len\n",
        sum(|r| r.rows),
        sum(|r| r.dropped),
        cfg.sequence_len,
        sum(|r| r.truncated)
    );
    let untrained = sum(|r| r.untrained);
    if untrained > 0 && !cfg.reward_model {
        s += &format!("examples with no trained token: {untrained} (they add nothing to the loss)\n");
    }
    s += &split_line("train", train);
    s += &split_line("validation", val);
    let plan = data_plan(cfg, train, supervised, batching);
    if plan.sample_packing {
        let (rows, fill) = plan.fill(0);
        let epoch = if plan.shuffle { " (epoch 1's order)" } else { "" };
        s += &format!(
            "sample packing: {} sequences in {rows} rows of {} tokens, {:.1}% filled{epoch}\n",
            train.len(),
            cfg.sequence_len,
            100.0 * fill
        );
    } else if supervised {
        s += "sample packing: off (one sequence per row)\n";
    } else {
        s += "sample packing: not used (preference examples are batched whole)\n";
    }
    if matches!(train, Examples::Prompts(_)) {
        s += &format!(
            "batches: {} prompts a generation batch (each sampled trl.num_generations times), {} optimiser steps per epoch, {} steps in all\n",
            plan.micro_batch_size,
            plan.steps_in_epoch(0),
            plan.total_steps(cfg.num_epochs, cfg.max_steps)
        );
    } else if !train.is_empty() {
        s += &format!(
            "batches: {} micro-batches of up to {} rows, {} optimiser steps per epoch, {} steps in all\n",
            plan.micro_batches(0).len(),
            cfg.micro_batch_size,
            plan.steps_in_epoch(0),
            plan.total_steps(cfg.num_epochs, cfg.max_steps)
        );
    }
    s += &match (supervised, cache::default_dir(cfg.dataset_prepared_path.as_deref())) {
        (false, _) => "cache: preference datasets are not cached (they are read afresh each run)\n".to_string(),
        (true, None) => "cache: none (set dataset_prepared_path to keep tokenized datasets)\n".to_string(),
        (true, Some(dir)) => {
            let cached = report.iter().filter(|r| r.from_cache).count();
            let fresh = report.len() - cached;
            let stored = if fresh > 0 { format!("; {fresh} tokenized now and stored there") } else { String::new() };
            format!("cache: {cached} of {} datasets read from {}{stored}\n", report.len(), dir.display())
        }
    };
    s
}
