//! `ferrotune merge`: bake a LoRA adapter into its base model.

use crate::adapter::merge::{self, MergeOptions};
use crate::backend::DType;
use crate::model::checkpoint;
use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct MergeArgs {
    /// Base model directory (config.json, safetensors, tokenizer), or a hub
    /// id ("org/name") already in the HuggingFace cache.
    #[arg(long)]
    model: String,
    /// PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory for the merged checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Output dtype: bf16, f16 or f32 (default: each tensor keeps the base's dtype).
    #[arg(long)]
    dtype: Option<String>,
    /// Write into a non-empty --out that is not a previous merge output.
    #[arg(long)]
    force: bool,
    /// Largest weight file before the checkpoint is sharded, as transformers'
    /// max_shard_size (5GB = 5·10^9 bytes; also MB, KB, GiB, MiB).
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// The adapter was trained with load_in_4bit on this (dense) base: merge
    /// into the NF4 round trip of its projections, as training saw them. A
    /// bitsandbytes 4-bit base needs no flag: it is always dequantized.
    #[arg(long)]
    load_in_4bit: bool,
    /// With --load-in-4bit: the run had bnb_4bit_use_double_quant: false.
    #[arg(long, requires = "load_in_4bit")]
    no_double_quant: bool,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "fp16" | "float16" => DType::F16,
        "f32" | "fp32" | "float32" => DType::F32,
        _ => bail!("--dtype {s}: expected bf16, f16 or f32"),
    })
}

pub fn run(a: MergeArgs) -> Result<()> {
    let t0 = Instant::now();
    let model_dir = checkpoint::resolve_model_dir(&a.model, None)?;
    let max_shard_bytes = merge::parse_size(&a.max_shard_size)
        .map_err(|e| anyhow::anyhow!("--max-shard-size: {e}"))?;
    let opts = MergeOptions {
        dtype: a.dtype.as_deref().map(parse_dtype).transpose()?,
        force: a.force,
        max_shard_bytes,
        nf4_round_trip: a.load_in_4bit.then_some(!a.no_double_quant),
    };
    let mut bar = TensorProgress::new("merge");
    let adapter = checkpoint::resolve_adapter_dir(&a.adapter)?;
    let summary = merge::merge(&model_dir, &adapter, &a.out, &opts, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    eprintln!(
        "merged {} LoRA modules into {} ({} tensors, {:.1} MB in {}, dtype {}) in {:.1}s",
        summary.merged,
        a.out.display(),
        summary.tensors,
        summary.bytes as f64 / 1e6,
        if summary.shards == 1 { "model.safetensors".to_string() } else { format!("{} shards", summary.shards) },
        opts.dtype.map(merge::torch_name).unwrap_or("as the base"),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Progress of a command that writes a checkpoint tensor by tensor
/// (merge, quantize): a bar on a terminal, otherwise a line per tenth of
/// the tensors.
pub(super) struct TensorProgress {
    verb: &'static str,
    bar: Option<ProgressBar>,
    last_tenth: usize,
}

impl TensorProgress {
    pub(super) fn new(verb: &'static str) -> TensorProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let template = format!("{verb} {{bar:30}} {{pos}}/{{len}} tensors eta {{eta}}");
            bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
            bar
        });
        TensorProgress { verb, bar, last_tenth: 0 }
    }

    pub(super) fn update(&mut self, done: usize, total: usize) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            None => {
                let tenth = done * 10 / total.max(1);
                if tenth > self.last_tenth || done == total {
                    self.last_tenth = tenth;
                    eprintln!("{}: {done}/{total} tensors", self.verb);
                }
            }
        }
    }

    pub(super) fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
