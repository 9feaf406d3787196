//! The `ferrotune` command line: one file per command, each with its
//! arguments and its `run`. A new command is a file here, its variant in
//! `Command` and its arm in `run`, and a section in README.md.

mod bench;
mod download;
mod env;
mod eval;
mod export;
mod generate;
mod generate_prompts;
mod merge;
mod models;
mod plot;
mod preprocess;
mod quantize;
mod synth;
mod train;

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, device};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "Fast single-GPU LoRA fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA adapter: the whole run from one YAML config.
    Train(train::TrainArgs),
    /// Tokenize and cache a run's datasets; print their counts and, with --show, examples as the model sees them.
    Preprocess(preprocess::PreprocessArgs),
    /// List the supported model architectures.
    Models,
    /// Mean loss and perplexity of a model (and adapter) on a dataset.
    Eval(eval::EvalArgs),
    /// Training throughput on a synthetic model (tokens/s, TFLOP/s, MFU, memory).
    Bench(bench::BenchArgs),
    /// Merge a LoRA adapter into its base model, writing a plain HuggingFace checkpoint.
    Merge(merge::MergeArgs),
    /// Export a model or adapter for other runtimes: `export gguf` (llama.cpp, Ollama, LM Studio).
    Export(export::ExportArgs),
    /// Generate text from a model (and adapter), streamed as it comes.
    Generate(generate::GenerateArgs),
    /// Download a model or dataset from the Hugging Face Hub into the shared cache.
    Download(download::DownloadArgs),
    /// Write a random-weight checkpoint of a supported family (for benchmarks).
    Synth(synth::SynthArgs),
    /// Quantize a model's decoder-layer weights to NF4 (bitsandbytes' 4-bit format, for QLoRA).
    Quantize(quantize::QuantizeArgs),
    /// Draw a run's metrics.jsonl as a PNG (loss, eval loss, lr, grad norm, tokens/s, rewards).
    Plot(plot::PlotArgs),
    /// What a bug report needs: version, OS, GPUs, CUDA libraries, kernels, caches.
    Env(env::EnvArgs),
}

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// cuda:0 when a GPU is visible, else the CPU.
    Auto,
}

/// Parse `--device`: cpu, cuda, cuda:N, or auto.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::Auto),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("--device {s}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

/// The opened backend.
pub enum Opened {
    Cpu(CpuBackend),
    Cuda(CudaBackend),
}

/// Open the backend `--device` names, and say on stderr what was opened.
pub fn open_device(s: &str) -> Result<Opened> {
    let device = match parse_device(s)? {
        Device::Auto if device::auto_picks_gpu() => Device::Cuda(0),
        Device::Auto => Device::Cpu,
        d => d,
    };
    match device {
        Device::Cpu | Device::Auto => Ok(Opened::Cpu(CpuBackend::new())),
        Device::Cuda(n) => {
            let be = CudaBackend::new(n).with_context(|| {
                if s == "auto" { "a GPU is visible but could not be used (pass --device cpu to run on the CPU)".to_string() }
                else { format!("--device {s}") }
            })?;
            eprintln!("device: {}; {} kernels loaded; {}", be.info, be.kernel_count(), env::gpu_paths());
            if let Some(note) = env::single_gpu_note(n) {
                eprintln!("{note}");
            }
            Ok(Opened::Cuda(be))
        }
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::Models => models::run(),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Download(a) => download::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Env(a) => env::run(a),
    }
}
