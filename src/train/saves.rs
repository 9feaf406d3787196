//! Training checkpoints (saves of a run): output_dir/checkpoint-N/ holds the adapter (PEFT
//! files, so any checkpoint is usable as is; a reward model's includes its
//! score head), the optimiser moments (optimizer.safetensors, f32: LoRA
//! modules and any extra trainable tensors), and trainer_state.json (step, data
//! position, seed). A checkpoint is written into a hidden temporary
//! directory and renamed into place, so a crash never leaves a partial
//! checkpoint-N that resume could pick.

use super::optimizer::{ExtraMomentsHost, ExtraParam, MomentsHost, Optimizer};
use super::objectives::reward::ScoreHead;
use crate::adapter::{LoraConfig, peft};
use crate::backend::Backend;
use crate::model::{Model, module_path};
use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Bumped when the layout of a checkpoint changes.
pub const FORMAT_VERSION: u32 = 1;

/// Where the run stands after `global_step` optimiser steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimiser steps taken.
    pub global_step: usize,
    pub total_steps: usize,
    /// The data position: the epoch and the index of the next micro-batch
    /// within it (the epoch's order is a function of the seed).
    pub epoch: usize,
    pub next_micro_batch: usize,
    /// The run's seed: shuffles and dropout masks derive from (seed, step).
    pub seed: u64,
    /// Input tokens processed so far.
    pub tokens_seen: u64,
    /// Fingerprint of the settings that decide the data order and the
    /// optimisation (a resume with different ones is refused).
    pub fingerprint: String,
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

fn moments_key(module: &str, which: &str, moment: &str) -> String {
    format!("base_model.model.{module}.{which}.weight.{moment}")
}

fn extra_moments_key(name: &str, moment: &str) -> String {
    format!("{name}.{moment}")
}

/// Write checkpoint-N atomically; replaces an existing one of the same step.
pub fn save<B: Backend>(
    be: &B,
    model: &Model<B>,
    opt: &Optimizer<B>,
    lc: &LoraConfig,
    state: &TrainState,
    output_dir: &Path,
) -> Result<PathBuf> {
    save_with(be, model, opt, state, output_dir, |dir| peft::save(be, model, lc, dir))
}

/// `save` for a reward model: the adapter is written with its score head
/// (PEFT's SEQ_CLS layout), and the optimiser's moments of the head (an
/// extra tensor of `opt`) go into optimizer.safetensors.
pub fn save_reward<B: Backend>(
    be: &B,
    model: &Model<B>,
    head: &ScoreHead<B>,
    opt: &Optimizer<B>,
    lc: &LoraConfig,
    state: &TrainState,
    output_dir: &Path,
) -> Result<PathBuf> {
    let score = head.weight(be);
    save_with(be, model, opt, state, output_dir, |dir| peft::save_reward(be, model, lc, &score, dir))
}

/// Write checkpoint-N with `write_adapter` filling in its adapter files.
pub fn save_with<B: Backend>(
    be: &B,
    model: &Model<B>,
    opt: &Optimizer<B>,
    state: &TrainState,
    output_dir: &Path,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dest = checkpoint_dir(output_dir, state.global_step);
    let tmp = output_dir.join(format!(".checkpoint-{}.partial", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_adapter(&tmp)?;

    let moments = opt.moments_to_host(be);
    let extra = opt.extra_moments_to_host(be);
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for ((li, p, l), m) in model.loras().zip(&moments) {
        let module = module_path(&model.cfg, li, p);
        let lin = model.layers[li].p(p);
        let (sa, sb) = (vec![l.r, lin.in_f], vec![lin.out_f, l.r]);
        tensors.push((moments_key(&module, "lora_A", "exp_avg"), sa.clone(), &m.exp_avg_a));
        tensors.push((moments_key(&module, "lora_A", "exp_avg_sq"), sa, &m.exp_avg_sq_a));
        tensors.push((moments_key(&module, "lora_B", "exp_avg"), sb.clone(), &m.exp_avg_b));
        tensors.push((moments_key(&module, "lora_B", "exp_avg_sq"), sb, &m.exp_avg_sq_b));
    }
    for m in &extra {
        tensors.push((extra_moments_key(&m.name, "exp_avg"), vec![m.exp_avg.len()], &m.exp_avg));
        tensors.push((extra_moments_key(&m.name, "exp_avg_sq"), vec![m.exp_avg_sq.len()], &m.exp_avg_sq));
    }
    let views = tensors
        .iter()
        .map(|(k, s, d)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), bytemuck::cast_slice(d)).map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cannot serialise optimizer state: {e}"))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("optimizer_step".to_string(), opt.step.to_string());
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| anyhow::anyhow!("cannot serialise optimizer state: {e}"))?;
    crate::util::atomic_write(&tmp.join(OPTIMIZER_FILE), &bytes)?;
    // The state file goes last: a directory without it is never a checkpoint.
    crate::util::atomic_write(&tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;

    if dest.exists() {
        // Same step saved before (a rerun): swap the old one out first.
        let old = output_dir.join(format!(".checkpoint-{}.old", state.global_step));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dest, &old).with_context(|| format!("cannot move aside {}", dest.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dest).with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    }
    sync_dir(output_dir);
    Ok(dest)
}

/// Make the rename durable (best effort: not every filesystem allows it).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The step of a `checkpoint-N` folder name (complete or not).
pub fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("checkpoint-")?.parse::<usize>().ok()
}

/// Complete checkpoints in output_dir, sorted by step.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return Vec::new() };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = step_of(&name)?;
            e.path().join(STATE_FILE).is_file().then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Keep the newest `limit` checkpoints.
pub fn prune(output_dir: &Path, limit: usize) -> Result<()> {
    let all = list(output_dir);
    for (_, dir) in all.iter().take(all.len().saturating_sub(limit.max(1))) {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a ferrotune checkpoint directory?)", path.display(), dir.display()))?;
    let state: TrainState = serde_json::from_str(&text).with_context(|| format!("{} is not a valid trainer state", path.display()))?;
    if state.format_version != FORMAT_VERSION {
        bail!("{}: checkpoint format {} is not the {FORMAT_VERSION} this version reads", path.display(), state.format_version);
    }
    Ok(state)
}

/// Load the optimiser moments of a checkpoint, in `Model::loras` order.
pub fn read_moments<B: Backend>(model: &Model<B>, dir: &Path) -> Result<(u64, Vec<MomentsHost>)> {
    read_optimizer_file(dir, |get| {
        let mut out = Vec::new();
        for (li, p, l) in model.loras() {
            let module = module_path(&model.cfg, li, p);
            let lin = model.layers[li].p(p);
            let (na, nb) = (l.r * lin.in_f, lin.out_f * l.r);
            out.push(MomentsHost {
                exp_avg_a: get(moments_key(&module, "lora_A", "exp_avg"), na)?,
                exp_avg_sq_a: get(moments_key(&module, "lora_A", "exp_avg_sq"), na)?,
                exp_avg_b: get(moments_key(&module, "lora_B", "exp_avg"), nb)?,
                exp_avg_sq_b: get(moments_key(&module, "lora_B", "exp_avg_sq"), nb)?,
            });
        }
        Ok(out)
    })
}

/// Load the optimiser moments of extra trainable tensors (a reward model's
/// score head) from a checkpoint, in the order of `extras`, for
/// `Optimizer::load_extra_moments`.
pub fn read_extra_moments<B: Backend>(dir: &Path, extras: &[&ExtraParam<B>]) -> Result<Vec<ExtraMomentsHost>> {
    let (_, out) = read_optimizer_file(dir, |get| {
        extras
            .iter()
            .map(|p| {
                let len: usize = p.shape.iter().product();
                Ok(ExtraMomentsHost {
                    name: p.name.clone(),
                    exp_avg: get(extra_moments_key(&p.name, "exp_avg"), len)?,
                    exp_avg_sq: get(extra_moments_key(&p.name, "exp_avg_sq"), len)?,
                })
            })
            .collect()
    })?;
    Ok(out)
}

/// Open optimizer.safetensors and hand `read` a getter of f32 tensors by
/// key and length; returns the optimiser step from the metadata with what
/// `read` returned.
fn read_optimizer_file<T>(dir: &Path, read: impl FnOnce(&dyn Fn(String, usize) -> Result<Vec<f32>>) -> Result<T>) -> Result<(u64, T)> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("optimizer_step"))
        .and_then(|s| s.parse::<u64>().ok())
        .with_context(|| format!("{}: metadata optimizer_step is missing", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let get = |key: String, len: usize| -> Result<Vec<f32>> {
        let t = st.tensor(&key).map_err(|_| anyhow::anyhow!("{}: tensor {key} is missing", path.display()))?;
        if t.dtype() != safetensors::Dtype::F32 || t.data().len() != len * 4 {
            bail!("{}: tensor {key} should be {len} f32 values", path.display());
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    Ok((step, read(&get)?))
}

/// The checkpoint `resume_from_checkpoint` names: a directory, or the
/// newest complete checkpoint-N in output_dir. None when `true` finds none
/// (a fresh start, as Axolotl does).
pub fn resolve_resume(output_dir: &Path, latest: bool, path: Option<&str>) -> Result<Option<PathBuf>> {
    if let Some(p) = path {
        let dir = PathBuf::from(p);
        if !dir.join(STATE_FILE).is_file() {
            bail!(
                "resume_from_checkpoint: {} is not a complete checkpoint (no {}); checkpoints look like {}",
                dir.display(),
                STATE_FILE,
                checkpoint_dir(output_dir, 100).display()
            );
        }
        return Ok(Some(dir));
    }
    Ok(if latest { list(output_dir).pop().map(|(_, d)| d) } else { None })
}
