//! `ferrotune quantize`: write a bitsandbytes NF4 (QLoRA) copy of a model.

use crate::model::checkpoint;
use crate::quant::bnb::torch_dtype_name;
use crate::quant::convert::{self, QuantizeOptions};
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct QuantizeArgs {
    /// Model directory (config.json, bf16/f16/f32 safetensors, tokenizer), or
    /// a hub id ("org/name") already in the HuggingFace cache.
    #[arg(long)]
    model: String,
    /// Output directory (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Keep the per-block scales in f32 instead of quantizing them to 8 bits
    /// (bnb_4bit_use_double_quant=false).
    #[arg(long)]
    no_double_quant: bool,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    let t0 = Instant::now();
    let model_dir = checkpoint::resolve_model_dir(&a.model, &checkpoint::hf_cache())?;
    let opts = QuantizeOptions { double_quant: !a.no_double_quant, ..QuantizeOptions::default() };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("quantize {bar:30} {pos}/{len} tensors eta {eta}").expect("valid template"));
        bar
    });
    let mut last_tenth = 0;
    let mut progress = |done: usize, total: usize| match &bar {
        Some(bar) => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        None => {
            // Without a terminal: a line per tenth of the tensors.
            let tenth = done * 10 / total.max(1);
            if tenth > last_tenth || done == total {
                last_tenth = tenth;
                eprintln!("quantize: {done}/{total} tensors");
            }
        }
    };
    let s = convert::quantize_checkpoint(&model_dir, &a.out, &opts, &mut progress)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "quantized {} of {} tensors to NF4{} into {} ({:.1} MB -> {:.1} MB in {}, compute dtype {}) in {:.1}s",
        s.quantized,
        s.tensors,
        if opts.double_quant { " with double quantization" } else { "" },
        a.out.display(),
        s.bytes_in as f64 / 1e6,
        s.bytes_out as f64 / 1e6,
        if s.shards == 1 { "model.safetensors".to_string() } else { format!("{} shards", s.shards) },
        torch_dtype_name(s.compute_dtype),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
