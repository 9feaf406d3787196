//! The `ferrotune` command line.

mod bench;
mod eval;
mod models;
mod synth;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "Fast single-GPU LoRA fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the supported model architectures.
    Models,
    /// Mean loss and perplexity of a model (and adapter) on a dataset.
    Eval(eval::EvalArgs),
    /// Training throughput on a synthetic model (tokens/s, TFLOP/s, MFU, memory).
    Bench(bench::BenchArgs),
    /// Write a random-weight checkpoint of a supported family (for benchmarks).
    Synth(synth::SynthArgs),
}

/// Which backend runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// Parse `--device`: cpu, cuda, cuda:N, or auto.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(|n| n.parse::<usize>()) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => bail!("--device {s}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

pub fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Models => models::run(),
        Command::Eval(a) => eval::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Bench(a) => bench::run(a),
    }
}
