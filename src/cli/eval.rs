//! `ferrotune eval`: mean loss per target token and perplexity.

use super::{Opened, open_device};
use crate::adapter::peft;
use crate::backend::Backend;
use crate::data::pretokenized;
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::checkpoint::{self, Checkpoint};
use crate::model::graph::LossSum;
use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct EvalArgs {
    /// HuggingFace model directory (config.json, safetensors, tokenizer),
    /// or a hub id ("org/name") already in the HuggingFace cache.
    #[arg(long)]
    model: String,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL of pre-tokenized rows: {"input_ids": [...], "labels": [...]}.
    #[arg(long)]
    data: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Upper bound on tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// Group sequences into batches of at most `budget` tokens, in file order.
pub fn batches(seqs: &[Sequence], budget: usize) -> Vec<&[Sequence]> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, s) in seqs.iter().enumerate() {
        if i > start && tokens + s.input_ids.len() > budget {
            out.push(&seqs[start..i]);
            start = i;
            tokens = 0;
        }
        tokens += s.input_ids.len();
    }
    if start < seqs.len() {
        out.push(&seqs[start..]);
    }
    out
}

pub fn run(a: EvalArgs) -> Result<()> {
    match open_device(&a.device)? {
        Opened::Cpu(be) => eval_on(&be, &a),
        Opened::Cuda(be) => eval_on(&be, &a),
    }
}

fn eval_on<B: Backend>(be: &B, a: &EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let model_dir = checkpoint::resolve_model_dir(&a.model, &checkpoint::hf_cache())?;
    let ckpt = Checkpoint::open(&model_dir)?;
    // Read the data before the weights: a bad row should not cost a load.
    let seqs = pretokenized::read_jsonl(&a.data, Some(ckpt.config.vocab))?;
    let mut model = Model::load(be, &ckpt)?;
    if let Some(dir) = &a.adapter {
        let n = peft::load(be, &mut model, dir)?;
        eprintln!("adapter: {} ({n} LoRA modules)", dir.display());
    }
    let cfg = &model.cfg;
    eprintln!(
        "model: {} ({}), {} layers, hidden {}, {} heads / {} kv, vocab {}, {:.1}M params; loaded on {} in {:.1}s",
        model_dir.display(),
        cfg.family.family,
        cfg.n_layers,
        cfg.hidden,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.vocab,
        cfg.n_params() as f64 / 1e6,
        be.name(),
        t0.elapsed().as_secs_f64()
    );
    let groups = batches(&seqs, a.batch_tokens.max(1));
    let total_tokens: usize = seqs.iter().map(|s| s.input_ids.len()).sum();
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(total_tokens as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template("eval {bar:30} {pos}/{len} tokens {per_sec} eta {eta}").expect("valid template"));
    let mut sum = LossSum::default();
    for (bi, group) in groups.iter().enumerate() {
        let batch = Batch::from_sequences(group, cfg.vocab)
            .map_err(|e| anyhow::anyhow!("{}: batch {bi}: {e}", a.data.display()))?;
        sum.add(model.eval_loss(be, &batch));
        bar.inc(batch.n_tokens() as u64);
    }
    bar.finish_and_clear();
    if sum.n_targets == 0 {
        bail!("{}: no target tokens (every label is -100)", a.data.display());
    }
    let loss = sum.mean();
    let ppl = loss.exp();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"loss": loss, "perplexity": ppl, "tokens": sum.n_targets, "examples": seqs.len()})
        );
    } else {
        println!("loss {loss:.6}  perplexity {ppl:.4}  tokens {}  examples {}", sum.n_targets, seqs.len());
    }
    eprintln!("done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}
