//! `ferrotune export gguf`: a model (with an adapter merged in, or the
//! adapter alone) as a GGUF file for llama.cpp, Ollama and LM Studio.

use crate::export::gguf::{self, ConvertOptions, ExportRequest, OutType};
use crate::model::checkpoint;
use anyhow::Result;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    format: Format,
}

#[derive(Subcommand)]
enum Format {
    /// Write llama.cpp's GGUF: the converter's f32/f16/bf16/q8_0/auto file,
    /// or llama-quantize's q4_k_m/q5_k_m/q6_k (no llama.cpp needed).
    Gguf(GgufArgs),
}

#[derive(Args)]
pub struct GgufArgs {
    /// Base model directory, or a Hub id ("org/name": downloaded if needed).
    #[arg(long)]
    model: String,
    /// Revision of a Hub model (branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// PEFT LoRA adapter directory: merged into the model first (as PEFT's
    /// merge_and_unload), or written alone with --lora-only.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// f32, f16, bf16, q8_0 or auto (as convert_hf_to_gguf.py writes them);
    /// q4_k_m, q5_k_m or q6_k (as llama-quantize writes them from the auto file).
    #[arg(long, default_value = "auto")]
    outtype: String,
    /// The .gguf file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
    /// Write only the adapter, as llama.cpp's LoRA GGUF (llama-cli --lora).
    #[arg(long)]
    lora_only: bool,
    /// Do not write the Ollama Modelfile beside the file.
    #[arg(long)]
    no_modelfile: bool,
    /// The tokenizer's pre-tokenizer as llama.cpp names it (llama-bpe, qwen2,
    /// …), for a tokenizer whose fingerprint llama.cpp does not know.
    #[arg(long)]
    tokenizer_pre: Option<String>,
    /// The adapter was trained with load_in_4bit on this dense base: merge
    /// into the NF4 round trip of its projections, as training saw them.
    #[arg(long)]
    load_in_4bit: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    match a.format {
        Format::Gguf(g) => run_gguf(g),
    }
}

fn run_gguf(a: GgufArgs) -> Result<()> {
    let t0 = Instant::now();
    let outtype = OutType::parse(&a.outtype).map_err(|e| anyhow::anyhow!("--{e}"))?;
    let req = ExportRequest {
        model_dir: PathBuf::new(),
        adapter_dir: None,
        outtype,
        out: a.out.clone(),
        lora_only: a.lora_only,
        modelfile: !a.no_modelfile,
        options: ConvertOptions { tokenizer_pre: a.tokenizer_pre },
        nf4_round_trip: a.load_in_4bit.then_some(true),
    };
    // The output is checked before anything is downloaded or read.
    gguf::check_request(&ExportRequest { adapter_dir: a.adapter.clone(), ..req.clone() })?;
    let model_dir = checkpoint::resolve_model_dir(&a.model, a.revision.as_deref())?;
    let adapter_dir = a.adapter.as_deref().map(checkpoint::resolve_adapter_dir).transpose()?;
    let req = ExportRequest { model_dir, adapter_dir, ..req };
    let mut bar = ByteProgress::new();
    let report = gguf::export(&req, &mut |done, total| bar.update(done, total))?;
    bar.finish();
    for line in &report.lines {
        eprintln!("{line}");
    }
    eprintln!("export took {:.1}s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// Bytes of the checkpoint read so far: a bar with a rate on a terminal,
/// otherwise a line per tenth.
struct ByteProgress {
    bar: Option<ProgressBar>,
    last_tenth: u64,
}

impl ByteProgress {
    fn new() -> ByteProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(ProgressStyle::with_template("export {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").expect("valid template"));
            bar
        });
        ByteProgress { bar, last_tenth: 0 }
    }

    fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                let tenth = done * 10 / total.max(1);
                // Small checkpoints finish before a line would help.
                if tenth > self.last_tenth && total >= 100_000_000 {
                    self.last_tenth = tenth;
                    eprintln!("export: {:.0} of {:.0} MB read", done as f64 / 1e6, total as f64 / 1e6);
                }
            }
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
