//! `ferrotune bench`: training throughput of a synthetic model (a registry
//! family and size preset with random weights, so no checkpoint is needed):
//! warm-up steps, then timed LoRA steps (forward, backward, AdamW).

use super::{Opened, open_device};
use crate::backend::cuda::{CudaBackend, device};
use crate::adapter::{LoraConfig, Targets};
use crate::backend::Backend;
use crate::backend::cpu::CpuBackend;
use crate::backend::profiled::Profiled;
use crate::model::batch::{Batch, Sequence};
use crate::model::graph::BackwardOpts;
use crate::model::{BaseWeights, Model, flops, synth};
use crate::config::{MAX_LORA_R, MAX_MICRO_BATCH, MAX_SEQUENCE_LEN};
use crate::train::memory::{self, RunShape};
use crate::train::optimizer::{AdamWConfig, Optimizer};
use crate::util::rng::Rng;
use anyhow::{Result, ensure};
use clap::Args;
use std::time::Instant;

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Size preset: tiny, llama3.2-1b, llama3-8b, mistral-7b, qwen2-7b, qwen3-0.6b, qwen3-4b, qwen3-8b, gemma2-9b, gemma3-1b, gemma3-4b, phi4-mini, qwen3.5-9b, gemma4-e4b.
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Override the preset's number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    micro_batch: usize,
    #[arg(long, default_value_t = 16)]
    lora_r: usize,
    /// Defaults to 2 × lora_r.
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// LoRA dropout probability (0 = none; the CUDA backend fuses the mask into the LoRA products).
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f32,
    /// Comma-separated module names (q_proj,v_proj,...) or all-linear.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    #[arg(long)]
    gradient_checkpointing: bool,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Dense peak of the device in TFLOP/s, for MFU (GPUs are known by name).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Per-op time breakdown of the timed steps.
    #[arg(long)]
    profile: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// QLoRA: the projections held as NF4 (random weights quantized with
    /// double quantization, as load_in_4bit does), dequantized per product.
    #[arg(long)]
    qlora: bool,
    /// Print the memory plan of a bf16 GPU run of these settings and stop
    /// (no weights are made; works for any preset on any machine).
    #[arg(long)]
    plan_only: bool,
}

/// A "Key:   N kB" line of a Linux /proc file, in bytes.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.strip_prefix(key).is_some_and(|rest| rest.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Memory the kernel says a new allocation can take (Linux MemAvailable), in bytes.
fn host_available_bytes() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemAvailable")
}

/// Peak resident memory of this process (Linux VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_kb("/proc/self/status", "VmHWM")
}

pub fn run(a: BenchArgs) -> Result<()> {
    ensure!(a.seq_len > 0 && a.micro_batch > 0 && a.steps > 0, "--seq-len, --micro-batch and --steps must be at least 1");
    ensure!(a.seq_len <= MAX_SEQUENCE_LEN, "--seq-len must be at most {MAX_SEQUENCE_LEN} (got {})", a.seq_len);
    ensure!(a.micro_batch <= MAX_MICRO_BATCH, "--micro-batch must be at most {MAX_MICRO_BATCH} (got {})", a.micro_batch);
    ensure!(a.lora_r > 0 && a.lora_r <= MAX_LORA_R, "--lora-r must be between 1 and {MAX_LORA_R} (got {})", a.lora_r);
    ensure!((0.0..1.0).contains(&a.lora_dropout), "--lora-dropout must be in [0, 1), got {}", a.lora_dropout);
    let host_peak = || peak_rss_bytes().map(|b| (b, "host RSS of the whole process"));
    if a.plan_only {
        let (cfg, lc) = model_and_adapter(&a)?;
        let mut shape = RunShape::bf16(a.micro_batch, a.seq_len);
        shape.gradient_checkpointing = a.gradient_checkpointing;
        let plan = memory::plan_lora_as(&cfg, &lc, &shape, base_weights(&a))?;
        println!("{} preset {}{}, LoRA r={} on {}:\n{plan}", cfg.family.family, a.preset, if a.qlora { " (QLoRA, NF4 base)" } else { "" }, a.lora_r, a.targets);
        return Ok(());
    }
    match open_device(&a.device)? {
        Opened::Cpu(be) if a.profile => {
            let be = Profiled::new(be);
            bench_on(&be, &a, Some(&be), Memory::host(&host_peak))
        }
        Opened::Cpu(be) => bench_on(&be, &a, None::<&Profiled<CpuBackend>>, Memory::host(&host_peak)),
        Opened::Cuda(be) => {
            let peak_tflops = a.peak_tflops.or_else(|| device::dense_bf16_peak_tflops(&be.info.name));
            let a = BenchArgs { peak_tflops, ..a.clone() };
            let available = Some(be.mem_info().0 as u64);
            if a.profile {
                let be = Profiled::with_sync(be, |b: &CudaBackend| b.synchronize());
                let gpu = &be.inner;
                let peak = || gpu.peak_bytes().map(|b| (b, "GPU memory pool peak"));
                let mem = Memory { peak: &peak, reset_peak: Some(&|| gpu.reset_peak()), available, gpu: true };
                bench_on(&be, &a, Some(&be), mem)
            } else {
                let peak = || be.peak_bytes().map(|b| (b, "GPU memory pool peak"));
                let mem = Memory { peak: &peak, reset_peak: Some(&|| be.reset_peak()), available, gpu: true };
                bench_on(&be, &a, None::<&Profiled<CpuBackend>>, mem)
            }
        }
    }
}

/// How the device reports memory, for the plan and the measurement.
struct Memory<'a> {
    peak: &'a dyn Fn() -> Option<(u64, &'static str)>,
    reset_peak: Option<&'a dyn Fn()>,
    /// Free device memory, for refusing a run that will not fit.
    available: Option<u64>,
    /// bf16 activations and weights (else the CPU's f32).
    gpu: bool,
}

impl<'a> Memory<'a> {
    fn host(peak: &'a dyn Fn() -> Option<(u64, &'static str)>) -> Memory<'a> {
        Memory { peak, reset_peak: None, available: None, gpu: false }
    }
}

/// How the benchmark holds the projections.
fn base_weights(a: &BenchArgs) -> BaseWeights {
    if a.qlora { BaseWeights::Nf4 { double_quant: true } } else { BaseWeights::AsStored }
}

/// The synthetic model's config and the adapter of the benchmark.
fn model_and_adapter(a: &BenchArgs) -> Result<(crate::model::hparams::ModelConfig, LoraConfig)> {
    let mut spec = synth::preset(&a.preset)?;
    if let Some(l) = a.layers {
        ensure!(l > 0 && l <= synth::MAX_LAYERS, "--layers must be between 1 and {} (got {l})", synth::MAX_LAYERS);
        spec.layers = l;
    }
    let cfg = synth::model_config(&spec)?;
    let targets = if a.targets == "all-linear" {
        Targets::AllLinear
    } else {
        Targets::Names(a.targets.split(',').map(|s| s.trim().to_string()).collect())
    };
    let mut lc = LoraConfig::new(a.lora_r, a.lora_alpha.unwrap_or(2.0 * a.lora_r as f32), targets);
    lc.dropout = a.lora_dropout;
    Ok((cfg, lc))
}

fn bench_on<B: Backend, P: Backend>(be: &B, a: &BenchArgs, profiler: Option<&Profiled<P>>, mem: Memory) -> Result<()> {
    if let Some(reset) = mem.reset_peak {
        reset();
    }
    let (cfg, lc) = model_and_adapter(a)?;
    let spec_family = cfg.family.family.clone();
    be.check_model(&cfg)?;
    if mem.gpu {
        eprintln!("attention: {}", crate::backend::cuda::attention_paths(&cfg));
    }
    let base = base_weights(a);
    // Predict the peak before anything is allocated; refuse what cannot fit.
    let mut shape = if mem.gpu { RunShape::bf16(a.micro_batch, a.seq_len) } else { RunShape::cpu(a.micro_batch, a.seq_len) };
    shape.gradient_checkpointing = a.gradient_checkpointing;
    let plan = memory::plan_lora_as(&cfg, &lc, &shape, base)?;
    if !a.json {
        eprintln!("memory plan (before the first step):\n{plan}");
    }
    match mem.available {
        Some(available) => memory::fit_check(&plan, available)?,
        // On the CPU the plan's buffers come out of host memory: refuse what
        // would make the allocator abort the process.
        None => {
            if let Some(host) = host_available_bytes()
                && plan.total > host
            {
                anyhow::bail!(
                    "the benchmark will not fit in host memory: predicted peak {} > available {} (lower --micro-batch or --seq-len, or use --layers)",
                    memory::human(plan.total),
                    memory::human(host)
                );
            }
        }
    }
    let t0 = Instant::now();
    let mut model = Model::random_as(be, cfg, a.seed, base)?;
    let mut rng = Rng::new(a.seed ^ 0x5eed);
    model.attach_lora(be, &lc, &mut rng)?;
    let mut opt = Optimizer::new(be, &model, AdamWConfig::default());
    let vocab = model.cfg.vocab;
    let seqs: Vec<Sequence> = (0..a.micro_batch)
        .map(|_| Sequence::unmasked((0..a.seq_len).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()))
        .collect();
    let batch = Batch::from_sequences(&seqs, vocab)?;
    let opts = BackwardOpts {
        grad_scale: 1.0 / batch.n_targets().max(1) as f32,
        gradient_checkpointing: a.gradient_checkpointing,
        dropout_seed: (a.lora_dropout > 0.0).then_some(a.seed ^ 0xd0),
    };
    if !a.json {
        eprintln!(
            "bench: {} preset {} ({} layers, hidden {}, {:.2}B params{}) on {}, LoRA r={} on {}, {} x {} tokens{}; set-up {:.1}s",
            spec_family,
            a.preset,
            model.cfg.n_layers,
            model.cfg.hidden,
            model.cfg.n_params() as f64 / 1e9,
            if a.qlora { ", NF4 projections (QLoRA)" } else { "" },
            be.name(),
            a.lora_r,
            a.targets,
            a.micro_batch,
            a.seq_len,
            if a.gradient_checkpointing { ", gradient checkpointing" } else { "" },
            t0.elapsed().as_secs_f64()
        );
    }
    let mut step = |model: &mut Model<B>| -> f64 {
        model.zero_grad(be);
        let loss = model.forward_backward(be, &batch, opts);
        opt.step(be, model, 1e-4);
        loss.mean()
    };
    for _ in 0..a.warmup {
        step(&mut model);
    }
    if let Some(p) = profiler {
        p.reset();
    }
    let t1 = Instant::now();
    let mut last_loss = f64::NAN;
    for _ in 0..a.steps {
        last_loss = step(&mut model);
    }
    let step_s = t1.elapsed().as_secs_f64() / a.steps as f64;

    let seq_lens = vec![a.seq_len; a.micro_batch];
    let n_lora = flops::lora_params(&model);
    let step_flops = flops::training_flops(&model.cfg, n_lora, &seq_lens);
    let tokens = (a.seq_len * a.micro_batch) as f64;
    let tokens_per_s = tokens / step_s;
    let tflops = step_flops / step_s / 1e12;
    let mfu = a.peak_tflops.map(|p| tflops / p);
    let peak_mem = (mem.peak)();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "device": be.name(), "preset": a.preset, "family": spec_family, "layers": model.cfg.n_layers, "qlora": a.qlora,
                "seq_len": a.seq_len, "micro_batch": a.micro_batch, "lora_r": a.lora_r, "lora_dropout": a.lora_dropout, "lora_params": n_lora,
                "gradient_checkpointing": a.gradient_checkpointing, "steps": a.steps,
                "tokens_per_s": tokens_per_s, "step_time_s": step_s, "model_tflops": tflops, "mfu": mfu,
                "peak_memory_bytes": peak_mem.map(|p| p.0), "peak_memory_kind": peak_mem.map(|p| p.1),
                "predicted_peak_bytes": plan.total, "loss": last_loss,
                "flop_convention": flops::CONVENTION,
            })
        );
    } else {
        println!("tokens/s      {tokens_per_s:.1}");
        println!("step time     {:.1} ms ({} steps after {} warm-up)", step_s * 1e3, a.steps, a.warmup);
        println!("model TFLOP/s {tflops:.4}  ({:.3} TFLOP per step)", step_flops / 1e12);
        match mfu {
            Some(m) => println!("MFU           {:.1}% of {} TFLOP/s", m * 100.0, a.peak_tflops.unwrap_or_default()),
            None => println!("MFU           n/a (no known peak for {}; pass --peak-tflops)", be.name()),
        }
        match peak_mem {
            Some((b, kind)) => println!(
                "peak memory   {:.2} GiB ({kind}); planned buffers {:.2} GiB",
                b as f64 / (1u64 << 30) as f64,
                plan.total as f64 / (1u64 << 30) as f64
            ),
            None => println!("peak memory   n/a"),
        }
        println!("LoRA params   {:.2}M", n_lora as f64 / 1e6);
        println!("convention    {}", flops::CONVENTION);
    }
    if let Some(p) = profiler {
        let rows = p.report();
        let total: f64 = rows.iter().map(|r| r.total.as_secs_f64()).sum();
        let out = &mut std::io::stderr();
        use std::io::Write;
        let _ = writeln!(out, "{:<24} {:>8} {:>12} {:>7}", "op", "calls", "ms/step", "share");
        for r in rows {
            let _ = writeln!(
                out,
                "{:<24} {:>8} {:>12.2} {:>6.1}%",
                r.op,
                r.calls / a.steps as u64,
                r.total.as_secs_f64() * 1e3 / a.steps as f64,
                100.0 * r.total.as_secs_f64() / total
            );
        }
    }
    Ok(())
}
