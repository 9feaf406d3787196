//! `ferrotune synth`: write a random-weight checkpoint of a registry family
//! and size preset (for benchmarks and memory checks; no download needed).

use crate::model::{st_files, synth};
use anyhow::{Result, bail};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SynthArgs {
    /// Size preset: tiny, llama3.2-1b, llama3-8b, mistral-7b, qwen2-7b, qwen3-0.6b, qwen3-4b, qwen3-8b, gemma2-9b, gemma3-1b, gemma3-4b, phi4-mini.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Override the number of layers (e.g. to get a ~1 GB checkpoint).
    #[arg(long)]
    layers: Option<usize>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write into a non-empty --out (its config.json and weights are replaced).
    #[arg(long)]
    force: bool,
    /// Also write a word-level tokenizer ("t0" .. "t{vocab-1}", the last
    /// one end-of-sequence), so generate and train run on the checkpoint.
    #[arg(long)]
    word_tokenizer: bool,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let mut spec = synth::preset(&a.preset)?;
    if let Some(l) = a.layers {
        anyhow::ensure!(l > 0, "--layers must be at least 1");
        anyhow::ensure!(l <= synth::MAX_LAYERS, "--layers must be at most {} (got {l})", synth::MAX_LAYERS);
        spec.layers = l;
    }
    let out_abs = st_files::absolute(&a.out)?;
    if let Some(held) = st_files::occupied(&out_abs, &a.out)?
        && !a.force
    {
        bail!("--out {} is not empty (it holds {held}); choose a new directory, or pass --force to write random weights into it", a.out.display());
    }
    let bytes = synth::write(&spec, &a.out, a.seed)?;
    if a.word_tokenizer {
        synth::write_word_tokenizer(&a.out, spec.vocab)?;
    }
    eprintln!(
        "wrote {} ({} {}, {} layers, {:.2} GB bf16)",
        a.out.display(),
        spec.family,
        a.preset,
        spec.layers,
        bytes as f64 / 1e9
    );
    Ok(())
}
