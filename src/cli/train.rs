//! `ferrotune train CONFIG.yml`: the whole run from one config file.

use super::{Opened, open_device};
use crate::adapter::{LoraConfig, peft};
use crate::backend::Backend;
use crate::config::{self, ResumeFrom, RunConfig};
use crate::model::{BaseWeights, Model};
use crate::model::checkpoint::{self, Checkpoint};
use crate::train::memory::{self, RunShape};
use crate::train::objectives;
use crate::train::preflight;
use crate::train::run_dir::{self, TOKENIZER_FILES};
use crate::train::{interrupt, trainer::{self, Run}};
use crate::model::st_files;
use crate::util::rng::Rng;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// The run config (YAML with Axolotl's keys).
    config: PathBuf,
    /// Override a config key, e.g. --set learning_rate=1e-4 or
    /// --set datasets.0.path=data.jsonl (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// cpu, cuda, cuda:N or auto (overrides the config's `device`).
    #[arg(long)]
    device: Option<String>,
    /// Clear an earlier run's files from output_dir first (its checkpoints,
    /// adapter, metrics, resolved config, tokenizer copies; nothing else).
    #[arg(long)]
    overwrite: bool,
}

/// What the GPU reports, for the memory plan and its check.
struct GpuMemory<'a> {
    available: u64,
    peak: &'a dyn Fn() -> Option<u64>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let loaded = config::load(&a.config, &a.set)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let mut cfg = loaded.config;
    cfg.overwrite_output_dir |= a.overwrite;
    let device = a.device.clone().unwrap_or_else(|| cfg.device.clone());
    let stopped_by = match open_device(&device)? {
        Opened::Cpu(be) => train_on(&be, &cfg, None)?,
        Opened::Cuda(be) => {
            let peak = || be.peak_bytes();
            let gpu = GpuMemory { available: be.mem_info().0 as u64, peak: &peak };
            train_on(&be, &cfg, Some(gpu))?
        }
    };
    match stopped_by {
        // The shell's code for a process ended by the signal.
        Some(sig) => std::process::exit(128 + sig),
        None => Ok(()),
    }
}

fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.is_file() {
            let bytes = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            crate::util::atomic_write(&to.join(f), &bytes)?;
        }
    }
    Ok(())
}

/// How the base's projections are held: NF4 for QLoRA (quantized at load
/// with load_in_4bit, or as stored in a bitsandbytes 4-bit checkpoint,
/// which loads 4-bit whatever the config says).
fn base_weights(cfg: &RunConfig, ckpt: &Checkpoint) -> Result<BaseWeights> {
    if let Some(q) = &ckpt.quantization {
        return Ok(BaseWeights::Nf4 { double_quant: q.double_quant });
    }
    if cfg.load_in_4bit {
        return Ok(BaseWeights::Nf4 { double_quant: cfg.bnb_config_kwargs.bnb_4bit_use_double_quant });
    }
    if cfg.qlora() {
        anyhow::bail!(
            "adapter: qlora needs a 4-bit base: set load_in_4bit: true to quantize {} at load, or point base_model at a \
             bitsandbytes 4-bit checkpoint (config.json with quantization_config)",
            ckpt.dir.display()
        );
    }
    Ok(BaseWeights::AsStored)
}

/// Train; returns the signal that stopped the run early, if one did.
fn train_on<B: Backend>(be: &B, cfg: &RunConfig, gpu: Option<GpuMemory>) -> Result<Option<i32>> {
    let t0 = Instant::now();
    let model_dir = checkpoint::resolve_model_dir(&cfg.base_model, cfg.revision_of_model.as_deref())?;
    // An adapter named by a Hub id is fetched here, once, and read from the cache below.
    let mut resolved = cfg.clone();
    if let Some(dir) = &cfg.lora_model_dir {
        resolved.lora_model_dir = Some(checkpoint::resolve_adapter_dir(Path::new(dir))?.display().to_string());
    }
    let cfg = &resolved;
    // model_type / tokenizer_type / tokenizer_config against the files, before any weight is read.
    let tokenizer_dir = config::check_checkpoint(cfg, &model_dir)?;
    // A `gguf:` export that would fail fails now, not after the training.
    if cfg.gguf.as_ref().is_some_and(|g| !g.is_empty()) {
        let opts = crate::export::gguf::ConvertOptions { tokenizer_pre: cfg.gguf_tokenizer_pre.clone() };
        crate::export::gguf::preflight(&model_dir, &opts)
            .map_err(|e| e.context("gguf: this model cannot be exported as asked (for an unknown tokenizer fingerprint, set gguf_tokenizer_pre)"))?;
    }
    let ckpt = Checkpoint::open(&model_dir)?;
    if let Some(note) = ckpt.untrained_note() {
        eprintln!("{note}");
    }
    // A head size the device's kernels cannot run is refused before the
    // data is prepared (Model::build_with would refuse it too, later).
    be.check_model(&ckpt.config)?;
    if gpu.is_some() {
        eprintln!("attention: {}", crate::backend::cuda::attention_paths(&ckpt.config));
    }
    let base = base_weights(cfg, &ckpt)?;
    let output_dir = PathBuf::from(&cfg.output_dir);
    refuse_input_dirs(cfg, &model_dir, &output_dir)?;
    let targets = if cfg.lora_model_dir.is_none() { Some(cfg.targets()?) } else { None };
    for w in preflight::check(cfg, &ckpt.config, targets.as_ref())? {
        eprintln!("warning: {w}");
    }
    // Held until the run ends: a second run into output_dir is refused.
    // Taking it creates output_dir and proves it writable, before data prep.
    let _lock = run_dir::lock(&output_dir)?;
    let removed = run_dir::remove_partials(&output_dir)?;
    if !removed.is_empty() {
        eprintln!("removed what an interrupted run left unfinished in {}: {}", output_dir.display(), run_dir::describe(&removed));
    }
    remove_stale_cache_files(cfg);
    let resume = match &cfg.resume_from_checkpoint {
        None | Some(ResumeFrom::Latest(false)) => None,
        Some(ResumeFrom::Latest(true)) => crate::train::saves::resolve_resume(&output_dir, true, None)?,
        Some(ResumeFrom::Path(p)) => crate::train::saves::resolve_resume(&output_dir, false, Some(p))?,
    };
    check_earlier_run(cfg, &output_dir, resume.as_deref())?;
    if resume.is_none() && cfg.resume_from_checkpoint == Some(ResumeFrom::Latest(true)) {
        eprintln!("resume_from_checkpoint: no checkpoint in {} yet; starting from step 0", output_dir.display());
    }

    // The data before the weights: a bad row should not cost a model load.
    let mut objective = objectives::select::<B>(cfg)?;
    let (train, val, report) = objective.prepare_data(cfg, &tokenizer_dir, ckpt.config.vocab)?;
    for r in &report {
        eprintln!("dataset {r}");
    }
    eprintln!("{} training / {} validation examples", train.len(), val.len());

    let lora: LoraConfig = match &cfg.lora_model_dir {
        Some(dir) => {
            let mut lc = peft::read_config(Path::new(dir))?;
            lc.base_model_name_or_path = Some(cfg.base_model.clone());
            lc
        }
        None => cfg.lora_config()?,
    };
    let mut planned_total = None;
    if let Some(gpu) = &gpu {
        // Predict the peak before anything is allocated; refuse what cannot fit.
        let mut shape = RunShape::bf16(cfg.micro_batch_size, cfg.sequence_len);
        shape.gradient_checkpointing = cfg.gradient_checkpointing;
        let plan = objective.memory_plan(cfg, &ckpt.config, &lora, shape, base)?;
        eprintln!("memory plan (before the first step):\n{plan}");
        memory::fit_check(&plan, gpu.available)?;
        planned_total = Some(plan.total);
    }

    let mut model = Model::load_as(be, &ckpt, base)?;
    let n_modules = match &cfg.lora_model_dir {
        Some(dir) => objective.load_adapter(be, &mut model, Path::new(dir))?,
        None => model.attach_lora(be, &lora, &mut Rng::new(cfg.seed))?,
    };
    let trainable: usize = model.loras().map(|(_, _, l)| be.len(&l.a) + be.len(&l.b)).sum();
    eprintln!(
        "model: {} ({}, {:.1}M params) on {}; LoRA r {} on {n_modules} modules, {:.2}M trainable; loaded in {:.1}s",
        model_dir.display(),
        model.cfg.family.family,
        model.cfg.n_params() as f64 / 1e6,
        be.name(),
        lora.r,
        trainable as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    cfg.save_resolved(&output_dir)?;
    copy_tokenizer(&tokenizer_dir, &output_dir)?;

    // The objective's own trainable parts (a reward model's score head).
    objective.prepare_model(be, &model, cfg, &model_dir, &tokenizer_dir)?;

    let after_first_step: Option<Box<dyn FnOnce() -> Option<String> + '_>> = gpu.as_ref().map(|g| {
        let peak = g.peak;
        Box::new(move || peak().map(|b| measured_against_plan(b, planned_total))) as Box<_>
    });
    let summary = trainer::train(Run {
        be,
        cfg,
        model,
        lora,
        train,
        val,
        output_dir: output_dir.clone(),
        resume,
        after_first_step,
        objective,
    })
    .map_err(|e| explain_divergence(e, &ckpt))?;
    if let Some((sig, dir)) = &summary.interrupted {
        eprintln!(
            "stopped by {} after step {}: adapter saved in {}, checkpoint in {}\nto continue, run the same command with \
             --set resume_from_checkpoint=true (or resume_from_checkpoint: true in the config)",
            interrupt::name(*sig),
            summary.steps,
            summary.adapter_dir.display(),
            dir.display()
        );
        return Ok(Some(*sig));
    }
    let loss = summary.last_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "n/a".into());
    let eval = summary.eval_loss.map(|l| format!(", eval_loss {l:.4}")).unwrap_or_default();
    eprintln!(
        "done: {} steps, last loss {loss}{eval}, {:.0} tokens/s, {:.1}s\nadapter: {} (PEFT format)\ntry it: ferrotune generate --model {} --adapter {} --prompt \"...\"",
        summary.steps,
        summary.tokens_per_s,
        t0.elapsed().as_secs_f64(),
        summary.adapter_dir.display(),
        cfg.base_model,
        summary.adapter_dir.display()
    );
    let nf4_round_trip = (cfg.load_in_4bit && ckpt.quantization.is_none()).then_some(cfg.bnb_config_kwargs.bnb_4bit_use_double_quant);
    export_gguf(cfg, &model_dir, &summary.adapter_dir, nf4_round_trip)?;
    Ok(None)
}

/// The run's `gguf:` files: the base with the new adapter merged in, one
/// file per outtype beside the adapter (the Modelfile names the first).
fn export_gguf(cfg: &RunConfig, model_dir: &Path, adapter_dir: &Path, nf4_round_trip: Option<bool>) -> Result<()> {
    use crate::export::gguf::{ConvertOptions, ExportRequest, OutType, export};
    let name = cfg.base_model.trim_end_matches('/').rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("model");
    for (i, t) in cfg.gguf.iter().flatten().enumerate() {
        let outtype = OutType::parse(t)?;
        let out = adapter_dir.join(format!("{name}.{}.gguf", t.to_ascii_uppercase()));
        let req = ExportRequest {
            model_dir: model_dir.to_path_buf(),
            adapter_dir: Some(adapter_dir.to_path_buf()),
            outtype,
            out,
            lora_only: false,
            modelfile: i == 0,
            options: ConvertOptions { tokenizer_pre: cfg.gguf_tokenizer_pre.clone() },
            nf4_round_trip,
        };
        let report = export(&req, &mut |_, _| {}).map_err(|e| e.context(format!("gguf: exporting {t}")))?;
        for line in report.lines {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// output_dir must not be the base model's folder or the adapter the run
/// starts from: the run would write over its own inputs.
fn refuse_input_dirs(cfg: &RunConfig, model_dir: &Path, output_dir: &Path) -> Result<()> {
    let mut inputs = vec![(model_dir, "the base model's own directory (base_model)")];
    if let Some(dir) = &cfg.lora_model_dir {
        inputs.push((Path::new(dir), "the adapter the run starts from (lora_model_dir)"));
    }
    st_files::out_dir("output_dir", output_dir, &inputs, "the run").map(|_| ())
}

/// A loss that turned NaN may come from the checkpoint itself: name the
/// first damaged tensor when there is one (reading the weights once more
/// costs nothing next to a failed run).
fn explain_divergence(e: anyhow::Error, ckpt: &Checkpoint) -> anyhow::Error {
    if e.downcast_ref::<crate::train::diverged::Diverged>().is_none() {
        return e;
    }
    match ckpt.first_non_finite() {
        Some((name, file, n)) => anyhow::anyhow!(
            "{e}\ncause: the base model's tensor {name} in {} holds {n} NaN or infinite value(s); the checkpoint is damaged \
             (download or export it again)",
            file.display()
        ),
        None => e,
    }
}

/// A fresh run into a folder holding another run's files would mix the
/// two (metrics, checkpoints that save_total_limit prunes, the adapter):
/// refused unless overwrite_output_dir clears them first.
fn check_earlier_run(cfg: &RunConfig, output_dir: &Path, resume: Option<&Path>) -> Result<()> {
    let resuming = !matches!(cfg.resume_from_checkpoint, None | Some(ResumeFrom::Latest(false)));
    if cfg.overwrite_output_dir && resuming {
        bail!("overwrite_output_dir (--overwrite) and resume_from_checkpoint contradict each other: set one of them");
    }
    // Continuing the run that is there (its later checkpoints, if any, go
    // once the trainer has accepted the checkpoint).
    if resume.is_some_and(|r| run_dir::is_inside(r, output_dir)) {
        return Ok(());
    }
    let earlier = run_dir::earlier_run(output_dir)?;
    if earlier.is_empty() {
        return Ok(());
    }
    if cfg.overwrite_output_dir {
        let removed = run_dir::clear_earlier_run(output_dir)?;
        eprintln!("overwrite_output_dir: removed the earlier run's files from {}: {}", output_dir.display(), run_dir::describe(&removed));
        return Ok(());
    }
    if let Some(ckpt) = resume {
        bail!(
            "resume_from_checkpoint: {} is not a checkpoint of output_dir {}, which holds another run ({}); resuming there \
             would mix the two runs: choose a new or empty output_dir for the resumed run",
            ckpt.display(),
            output_dir.display(),
            run_dir::describe(&earlier)
        );
    }
    if resuming {
        bail!(
            "resume_from_checkpoint: output_dir {} holds another run ({}) but no checkpoint to resume; set resume_from_checkpoint: false \
             and pass --overwrite to replace that run, or choose another output_dir",
            output_dir.display(),
            run_dir::describe(&earlier)
        );
    }
    bail!(
        "output_dir {} holds another run ({}); pass --overwrite (or set overwrite_output_dir: true) to replace it, set \
         resume_from_checkpoint: true to continue it, or choose another output_dir",
        output_dir.display(),
        run_dir::describe(&earlier)
    );
}

/// Remove the dataset cache's temporary files that a killed run left
/// (only ones over an hour old: a run sharing the cache may be writing one now).
fn remove_stale_cache_files(cfg: &RunConfig) {
    let Some(dir) = crate::data::cache::default_dir(cfg.dataset_prepared_path.as_deref()) else { return };
    let removed = crate::data::cache::remove_stale(&dir, std::time::Duration::from_secs(3600));
    if !removed.is_empty() {
        eprintln!("removed {} unfinished dataset cache file(s) from {}", removed.len(), dir.display());
    }
}


/// The first step's measured peak next to the plan. The plan assumes full
/// sequences, so shorter (or unpacked) batches measure below it; above it
/// means the planner missed an allocation, which is worth saying loudly.
fn measured_against_plan(measured: u64, planned: Option<u64>) -> String {
    let line = format!("GPU memory peak after the first step: {}", memory::human(measured));
    match planned {
        Some(p) if measured > p => format!(
            "{line}, ABOVE the plan's {} by {} (the planner missed an allocation: runs near the memory limit may not fit)",
            memory::human(p),
            memory::human(measured - p)
        ),
        Some(p) => format!("{line} (planned {}, {:.1}% of it)", memory::human(p), 100.0 * measured as f64 / p.max(1) as f64),
        None => line,
    }
}
