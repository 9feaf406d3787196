//! `ferrotune quantize`: write a bitsandbytes NF4 (QLoRA) copy of a model.

use crate::model::checkpoint;
use crate::quant::bnb::torch_dtype_name;
use crate::quant::convert::{self, QuantizeOptions};
use anyhow::Result;
use super::merge::TensorProgress;
use clap::Args;
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
    let model_dir = checkpoint::resolve_model_dir(&a.model, None)?;
    let opts = QuantizeOptions { double_quant: !a.no_double_quant, ..QuantizeOptions::default() };
    let mut bar = TensorProgress::new("quantize");
    let s = convert::quantize_checkpoint(&model_dir, &a.out, &opts, &mut |done, total| bar.update(done, total))?;
    bar.finish();
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
