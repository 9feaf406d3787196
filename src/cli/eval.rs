//! `ferrotune eval`: mean loss per target token and perplexity.

use super::{Opened, open_device};
use crate::adapter::peft;
use crate::backend::Backend;
use crate::config;
use crate::data::prepare;
use crate::model::Model;
use crate::model::batch::{Batch, Sequence};
use crate::model::checkpoint::{self, Checkpoint};
use crate::model::graph::LossSum;
use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct EvalArgs {
    /// HuggingFace model directory (config.json, safetensors, tokenizer),
    /// or a hub id ("org/name") already in the HuggingFace cache
    /// (default with --config: its base_model).
    #[arg(long, required_unless_present = "config")]
    model: Option<String>,
    /// PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A .jsonl or .json dataset file (pre-tokenized rows unless --type says otherwise).
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    data: Option<PathBuf>,
    /// Dataset type of --data: alpaca, chat_template, completion, input_output
    /// (absent: pre-tokenized rows {"input_ids": [...], "labels": [...]}).
    #[arg(long = "type", value_name = "TYPE", conflicts_with = "config")]
    kind: Option<String>,
    /// Chat template for --type chat_template: chatml, llama3 or
    /// tokenizer_default (the default: the tokenizer's own).
    #[arg(long, value_name = "NAME", conflicts_with = "config")]
    chat_template: Option<String>,
    /// Evaluate on a run config's data (its datasets, template and
    /// sequence_len): its validation split if it has one, else all its
    /// training data.
    #[arg(long, value_name = "RUN.yml")]
    config: Option<PathBuf>,
    /// Rows longer than this many tokens are left out (completion texts are
    /// split into chunks of it). Default: the config's sequence_len; with
    /// --data no limit (completion: the model's max_position_embeddings).
    #[arg(long)]
    sequence_len: Option<usize>,
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

/// The sequences to evaluate and a name for them in messages.
fn eval_data(a: &EvalArgs, model_dir: &Path, ckpt: &Checkpoint) -> Result<(Vec<Sequence>, String)> {
    let vocab = ckpt.config.vocab;
    if let Some(path) = &a.config {
        let loaded = config::load(path, &[])?;
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        let mut cfg = loaded.config;
        if let Some(n) = a.sequence_len {
            cfg.sequence_len = n;
        }
        let tokenizer_dir = config::check_checkpoint(&cfg, model_dir)?;
        let data = prepare::prepare(&cfg, &tokenizer_dir, vocab)?;
        eprint!("{data}");
        let name = path.display().to_string();
        return Ok(if data.val.is_empty() {
            eprintln!("{name} has no validation split: evaluating on all its training data");
            (data.train, format!("{name} (training data)"))
        } else {
            (data.val, format!("{name} (validation split)"))
        });
    }
    let data = a.data.as_ref().expect("clap requires --data without --config");
    // Without --sequence-len every row is scored whole; completion texts are
    // still cut, at the model's context length.
    let sequence_len = match (a.sequence_len, a.kind.as_deref()) {
        (Some(n), _) => n,
        (None, Some("completion")) => ckpt.config.max_position_embeddings.unwrap_or(2048),
        (None, _) => usize::MAX,
    };
    let (seqs, report) =
        prepare::prepare_eval(data, a.kind.as_deref(), a.chat_template.as_deref(), model_dir, vocab, sequence_len)?;
    eprintln!("dataset {report}");
    Ok((seqs, data.display().to_string()))
}

fn eval_on<B: Backend>(be: &B, a: &EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let (model_name, revision) = match (&a.model, &a.config) {
        (Some(m), _) => (m.clone(), None),
        (None, Some(path)) => {
            let cfg = config::load(path, &[])?.config;
            (cfg.base_model, cfg.revision_of_model)
        }
        (None, None) => bail!("--model is required without --config"),
    };
    let model_dir = checkpoint::resolve_model_dir(&model_name, revision.as_deref())?;
    let ckpt = Checkpoint::open(&model_dir)?;
    if let Some(note) = ckpt.untrained_note() {
        eprintln!("{note}");
    }
    // Read the data before the weights: a bad row should not cost a load.
    let (seqs, source) = eval_data(a, &model_dir, &ckpt)?;
    let mut model = Model::load(be, &ckpt)?;
    if let Some(dir) = &a.adapter {
        let dir = &checkpoint::resolve_adapter_dir(dir)?;
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
        let batch = Batch::from_sequences(*group, cfg.vocab)
            .map_err(|e| anyhow::anyhow!("{source}: batch {bi}: {e}"))?;
        sum.add(model.eval_loss(be, &batch));
        bar.inc(batch.n_tokens() as u64);
    }
    bar.finish_and_clear();
    if sum.n_targets == 0 {
        bail!("{source}: no target tokens (every label is -100)");
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
