//! Merge a PEFT LoRA adapter into its base checkpoint, writing a plain
//! HuggingFace checkpoint that transformers and vLLM load without PEFT.
//!
//! Every adapted projection becomes W' = W + scale·(B A), computed in f32
//! from the stored base weight and rounded once to the output dtype
//! (round-to-nearest-even, as torch's casts do). Every other tensor keeps
//! its name and bytes. The checkpoint is streamed: tensors are copied from
//! the memory-mapped input, and merged weights are computed a block of rows
//! at a time, so the process never holds the model (an 8B checkpoint merges
//! in a few hundred MB of memory).
//!
//! QLoRA: a bitsandbytes 4-bit base (config.json with quantization_config)
//! is dequantized as it is merged (code · absmax in f32, the values the
//! adapter was trained against), each projection written in `--dtype` or the
//! dtype it had before quantization, with its quantization parts and
//! config.json's quantization_config left out: the output is a plain
//! checkpoint. For an adapter trained with load_in_4bit on a dense base,
//! `MergeOptions::nf4_round_trip` merges into the base's NF4 round trip
//! (quantized as at load, then dequantized) for the same reason.

use super::LoraConfig;
use super::peft;
use crate::backend::{DType, to_f32};
use crate::quant::bnb::{self, QuantState};
use crate::quant::nf4::Nf4Tensor;
use crate::model::st_files::{self, MappedCheckpoint, ShardEntry, ShardWriter, SrcTensor, float_dtype, shard_name};
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Marker written into every merge output, so that a later merge may
/// replace it without --force (and records what was merged).
pub const INFO_FILE: &str = "ferrotune_merge.json";
/// Input bytes per block of a tensor streamed to the output (whole rows;
/// bounds the f32 scratch of a merge or dtype change and the input pages
/// resident at once).
const BLOCK_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output dtype of every floating-point tensor; None keeps each tensor's own.
    pub dtype: Option<DType>,
    /// Replace a non-empty output directory that is not a previous merge.
    pub force: bool,
    /// Largest shard; a checkpoint above it is split into numbered shards.
    pub max_shard_bytes: u64,
    /// Some(double_quant): the adapter was trained on this dense base
    /// quantized at load (load_in_4bit); every decoder-layer projection is
    /// quantized to NF4 and dequantized before the merge, as training saw it.
    pub nf4_round_trip: Option<bool>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { dtype: None, force: false, max_shard_bytes: st_files::DEFAULT_MAX_SHARD_BYTES, nf4_round_trip: None }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub tensors: usize,
    /// Projections that received W + scale·BA.
    pub merged: usize,
    /// Weight files written (1: model.safetensors).
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// torch's name of a dtype, as config.json spells it.
pub fn torch_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

/// Convert f32 values to `dtype`'s little-endian bytes, rounding to nearest even.
fn from_f32(dtype: DType, xs: &[f32], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(xs.len() * dtype.size());
    match dtype {
        DType::F32 => xs.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        DType::F16 => xs.iter().for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
        DType::BF16 => xs.iter().for_each(|x| out.extend_from_slice(&half::bf16::from_f32(*x).to_le_bytes())),
    }
}

// ---------------------------------------------------------------- input

/// merge's reads of the base checkpoint beyond plain tensor bytes.
trait BaseReads {
    fn raw(&self, name: &str) -> Result<bnb::RawTensor<'_>>;
    fn nf4_weights(&self) -> Result<HashMap<String, QuantState>>;
}

impl BaseReads for MappedCheckpoint {
    /// A tensor by name as `quant::bnb` reads it.
    fn raw(&self, name: &str) -> Result<bnb::RawTensor<'_>> {
        let t = self.tensors.iter().find(|t| t.name == name).with_context(|| format!("tensor {name} is missing from the checkpoint"))?;
        Ok((t.dtype, t.shape.clone(), self.bytes(t)))
    }

    /// The 4-bit weights of a bitsandbytes checkpoint: weight name
    /// ("P.weight") -> its quant state. Empty for a dense checkpoint.
    fn nf4_weights(&self) -> Result<HashMap<String, QuantState>> {
        let suffix = format!(".{}", bnb::QUANT_STATE_KEY);
        let mut out = HashMap::new();
        for t in &self.tensors {
            if let Some(weight) = t.name.strip_suffix(&suffix) {
                let qs = QuantState::parse(self.bytes(t), &t.name).with_context(|| self.path(t).display().to_string())?;
                out.insert(weight.to_string(), qs);
            }
        }
        Ok(out)
    }
}

/// One adapted projection: the f32 LoRA factors and its scaling.
struct Delta {
    /// [r, in]
    a: Vec<f32>,
    /// [out, r]
    b: Vec<f32>,
    r: usize,
    scale: f32,
}

const KEY_PREFIX: &str = "base_model.model.";

/// Read the adapter and check every tensor against the base weight it
/// changes, before anything is written. Keyed by the base weight's name.
fn read_adapter(dir: &Path, src: &MappedCheckpoint, nf4: &HashMap<String, QuantState>) -> Result<(LoraConfig, BTreeMap<String, Delta>)> {
    let lc = peft::read_config(dir)?;
    let file = dir.join(peft::WEIGHTS_FILE);
    if !file.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            bail!("{}: only adapter_model.bin found; ferrotune reads safetensors adapters (re-save with safe_serialization=True)", dir.display());
        }
        bail!("{}: {} not found", dir.display(), peft::WEIGHTS_FILE);
    }
    let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
    let base: HashMap<&str, &SrcTensor> = src.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let fdisp = file.display();
    let mut names: Vec<&str> = st.names();
    names.sort();
    let mut deltas = BTreeMap::new();
    for ka in &names {
        if ka.ends_with(".lora_B.weight") {
            continue; // taken with its lora_A
        }
        let module = ka
            .strip_prefix(KEY_PREFIX)
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
            .with_context(|| format!("{fdisp}: tensor {ka} is not a LoRA A/B weight (expected {KEY_PREFIX}<module>.lora_A.weight / .lora_B.weight); ferrotune cannot merge it"))?;
        let kb = format!("{KEY_PREFIX}{module}.lora_B.weight");
        let ta = st.tensor(ka).map_err(|e| anyhow::anyhow!("{fdisp}: tensor {ka}: {e}"))?;
        let tb = st.tensor(&kb).map_err(|_| anyhow::anyhow!("{fdisp}: {ka} is present but {kb} is missing"))?;
        let wname = format!("{module}.weight");
        let w = base.get(wname.as_str()).with_context(|| {
            format!("{fdisp}: tensor {ka} adapts {wname}, which the base checkpoint does not have (is this adapter for another model?)")
        })?;
        let shape = match nf4.get(&wname) {
            Some(qs) => qs.shape.to_vec(),
            None if float_dtype(w.dtype).is_none() => {
                bail!("{}: tensor {wname} has dtype {:?}; only F32, F16 and BF16 (or bitsandbytes 4-bit) weights can be merged into", src.path(w).display(), w.dtype)
            }
            None => w.shape.clone(),
        };
        let [out_f, in_f] = shape[..] else {
            bail!("{}: tensor {wname} has shape {:?}; a LoRA merges into a 2-D [out, in] weight", src.path(w).display(), w.shape);
        };
        let (r, scale) = lc.rank_and_scale(module)?;
        for (key, t, want) in [(*ka, &ta, [r, in_f]), (kb.as_str(), &tb, [out_f, r])] {
            if t.shape() != want {
                bail!(
                    "{fdisp}: tensor {key} has shape {:?}, but the base weight {wname} is [{out_f}, {in_f}] and the rank is {r}, so it must be {want:?} (is this adapter for another model?)",
                    t.shape()
                );
            }
        }
        let factor = |key: &str, t: &safetensors::tensor::TensorView| -> Result<Vec<f32>> {
            let d = float_dtype(t.dtype())
                .with_context(|| format!("{fdisp}: tensor {key} has dtype {:?}; expected F32, F16 or BF16", t.dtype()))?;
            Ok(to_f32(d, t.data()))
        };
        deltas.insert(wname, Delta { a: factor(ka, &ta)?, b: factor(&kb, &tb)?, r, scale });
    }
    for kb in names.iter().filter(|n| n.ends_with(".lora_B.weight")) {
        let ka = kb.replace(".lora_B.weight", ".lora_A.weight");
        if st.tensor(&ka).is_err() {
            bail!("{fdisp}: {kb} is present but {ka} is missing");
        }
    }
    if deltas.is_empty() {
        bail!("{fdisp}: no LoRA tensors found");
    }
    Ok((lc, deltas))
}

// ---------------------------------------------------------------- output plan

/// One tensor of the output: where it comes from and how it is written.
struct OutTensor<'a> {
    src: &'a SrcTensor,
    /// The output shape (a 4-bit weight's is its matrix's, not its codes').
    shape: Vec<usize>,
    dtype: StDtype,
    bytes: usize,
    delta: Option<&'a Delta>,
    /// How the values are made before the delta: copied / converted from
    /// the input, or dequantized.
    values: Values,
}

/// Where a weight's values come from.
#[derive(Clone, Copy, PartialEq)]
enum Values {
    /// The input tensor's own values.
    Stored,
    /// A bitsandbytes 4-bit weight (the input tensor holds its packed codes).
    Nf4,
    /// The NF4 round trip of the dense input (quantized as load_in_4bit does).
    Nf4RoundTrip { double_quant: bool },
}

/// Tensors per shard, in input order, starting a new shard when the next
/// tensor would pass the limit (a larger tensor gets a shard of its own).
fn plan_shards<'a>(tensors: Vec<OutTensor<'a>>, max: u64) -> Vec<Vec<OutTensor<'a>>> {
    st_files::plan_shards(tensors, max, |t| t.bytes as u64)
}

/// Write one safetensors file, streaming each tensor from the input.
fn write_shard(path: &Path, src: &MappedCheckpoint, mut tensors: Vec<OutTensor>, progress: &mut dyn FnMut(&str)) -> Result<u64> {
    let mut w = ShardWriter::create(path, &mut tensors, |t| ShardEntry { name: &t.src.name, dtype: t.dtype, shape: &t.shape, bytes: t.bytes })?;
    let mut buf = Vec::new();
    for t in &tensors {
        if t.values != Values::Stored {
            write_dequantized(&mut w, src, t, &mut buf).map_err(|e| e.context(format!("writing {}", path.display())))?;
            progress(&t.src.name);
            continue;
        }
        let bytes = src.bytes(t.src);
        let (from, to) = (float_dtype(t.src.dtype), float_dtype(t.dtype));
        // Blocks of whole rows, so a merged block is a set of complete rows.
        let row_bytes = (t.src.shape.iter().skip(1).product::<usize>() * from.map_or(1, DType::size)).max(1);
        let block_bytes = (BLOCK_BYTES / row_bytes).max(1) * row_bytes;
        for (bi, block) in bytes.chunks(block_bytes).enumerate() {
            match (t.delta, from, to) {
                (Some(d), Some(from), Some(to)) => {
                    let mut rows = to_f32(from, block);
                    add_delta(&mut rows, bi * block_bytes / row_bytes, d);
                    from_f32(to, &rows, &mut buf);
                    w.write(&buf)?;
                }
                (None, Some(from), Some(to)) if from != to => {
                    from_f32(to, &to_f32(from, block), &mut buf);
                    w.write(&buf)?;
                }
                _ => w.write(block)?,
            }
            src.release(t.src, bi * block_bytes, block.len());
        }
        progress(&t.src.name);
    }
    w.finish()
}

/// Write a weight whose values are an NF4 matrix's dequantization (a 4-bit
/// input, or the round trip of a dense one), plus its delta, in blocks of
/// whole rows. The 4-bit codes of one weight are read at a time.
fn write_dequantized(w: &mut ShardWriter, src: &MappedCheckpoint, t: &OutTensor, buf: &mut Vec<u8>) -> Result<()> {
    let to = float_dtype(t.dtype).expect("dequantized weights are written as floats");
    let [rows, cols] = t.shape[..] else { bail!("tensor {}: a 4-bit weight is 2-D", t.src.name) };
    let q: Nf4Tensor = match t.values {
        Values::Nf4 => {
            let prefix = t.src.name.strip_suffix(".weight").unwrap_or(&t.src.name);
            bnb::read_nf4(|n| src.raw(n), prefix).with_context(|| src.path(t.src).display().to_string())?
        }
        Values::Nf4RoundTrip { double_quant } => {
            let from = float_dtype(t.src.dtype).expect("round-tripped weights are float");
            crate::quant::nf4::quantize(&to_f32(from, src.bytes(t.src)), [rows, cols], double_quant)
        }
        Values::Stored => unreachable!("stored values are copied"),
    };
    let absmax = q.absmax_f32();
    let rows_per_block = (BLOCK_BYTES / (4 * cols.max(1))).max(1);
    let mut block = Vec::with_capacity(rows_per_block * cols);
    for r0 in (0..rows).step_by(rows_per_block) {
        let r1 = (r0 + rows_per_block).min(rows);
        block.clear();
        block.extend((r0 * cols..r1 * cols).map(|i| {
            let byte = q.packed[i / 2];
            let nib = if i.is_multiple_of(2) { byte >> 4 } else { byte & 0x0f };
            q.code[nib as usize] * absmax[i / q.blocksize]
        }));
        if let Some(d) = t.delta {
            add_delta(&mut block, r0, d);
        }
        from_f32(to, &block, buf);
        w.write(buf)?;
    }
    src.release(t.src, 0, t.src.end - t.src.start);
    Ok(())
}

/// rows += scale·(B A)[first_row..] in f32: the rows of W' = W + scale·(B A)
/// from `first_row` on. Each row's delta accumulates over the rank in order
/// (k = 0..r), then is scaled and added, as PEFT's (B @ A) * scaling.
fn add_delta(rows: &mut [f32], first_row: usize, d: &Delta) {
    let in_f = d.a.len() / d.r;
    rows.par_chunks_mut(in_f).enumerate().for_each_init(
        || vec![0f32; in_f],
        |delta, (i, row)| {
            let b = &d.b[(first_row + i) * d.r..(first_row + i + 1) * d.r];
            delta.fill(0.0);
            for (k, &bk) in b.iter().enumerate() {
                let a = &d.a[k * in_f..(k + 1) * in_f];
                delta.iter_mut().zip(a).for_each(|(x, &ak)| *x += bk * ak);
            }
            row.iter_mut().zip(delta.iter()).for_each(|(x, &dx)| *x += dx * d.scale);
        },
    );
}

// ---------------------------------------------------------------- directories

/// Refuse outputs that would overwrite an input or someone's files.
fn check_out(model_dir: &Path, adapter_dir: &Path, out: &Path, force: bool) -> Result<PathBuf> {
    let inputs = [(model_dir, "the base model's own directory"), (adapter_dir, "the adapter's directory")];
    let out_abs = st_files::out_dir("--out", out, &inputs, "the merged model")?;
    if st_files::occupied(&out_abs, out)?.is_some() {
        if !out_abs.is_dir() {
            bail!("--out {} exists and is not a directory", out.display());
        }
        if !out_abs.join(INFO_FILE).is_file() && !force {
            bail!(
                "--out {} is not empty and is not the output of a previous `ferrotune merge` (no {INFO_FILE}); pass --force to write into it",
                out.display()
            );
        }
    }
    Ok(out_abs)
}

/// config.json, with its dtype entry rewritten when the output dtype
/// differs, and without quantization_config when the base was 4-bit.
fn write_config(model_dir: &Path, tmp: &Path, dtype: Option<DType>, dequantized: bool) -> Result<()> {
    let path = model_dir.join("config.json");
    let text = std::fs::read(&path).with_context(|| format!("cannot read {} (is {} a HuggingFace model directory?)", path.display(), model_dir.display()))?;
    if dtype.is_none() && !dequantized {
        return crate::util::atomic_write(&tmp.join("config.json"), &text);
    }
    let mut v: Value = serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let obj = v.as_object_mut().with_context(|| format!("{}: expected a JSON object", path.display()))?;
    if dequantized {
        obj.remove("quantization_config");
    }
    let Some(d) = dtype else {
        let mut out = serde_json::to_string_pretty(&v)?;
        out.push('\n');
        return crate::util::atomic_write(&tmp.join("config.json"), out.as_bytes());
    };
    let name = Value::from(torch_name(d));
    let keys: Vec<&str> = ["torch_dtype", "dtype"].into_iter().filter(|k| obj.contains_key(*k)).collect();
    if keys.iter().all(|k| obj[*k] == name) && !keys.is_empty() && !dequantized {
        return crate::util::atomic_write(&tmp.join("config.json"), &text);
    }
    if keys.is_empty() {
        obj.insert("torch_dtype".into(), name);
    } else {
        for k in keys {
            obj.insert(k.into(), name.clone());
        }
    }
    let mut out = serde_json::to_string_pretty(&v)?;
    out.push('\n');
    crate::util::atomic_write(&tmp.join("config.json"), out.as_bytes())
}

/// Weight files of a checkpoint directory (model.safetensors, its shards
/// and index), which a new merge must not leave behind.
fn is_weight_file(name: &str) -> bool {
    name == "model.safetensors.index.json"
        || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// Move the finished temporary directory into place: a rename when --out
/// does not exist yet; otherwise file by file, then remove the previous
/// weight files the new output does not have.
fn install(tmp: &Path, out: &Path) -> Result<()> {
    if !out.exists() {
        return std::fs::rename(tmp, out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()));
    }
    let mut new_files = Vec::new();
    for e in std::fs::read_dir(tmp).with_context(|| format!("cannot list {}", tmp.display()))? {
        new_files.push(e?.file_name());
    }
    // The marker goes last: a directory with it is a complete merge.
    new_files.sort_by_key(|n| n == INFO_FILE);
    let _ = std::fs::remove_file(out.join(INFO_FILE));
    for e in std::fs::read_dir(out).with_context(|| format!("cannot list {}", out.display()))? {
        let name = e?.file_name();
        if is_weight_file(&name.to_string_lossy()) && !new_files.contains(&name) {
            let p = out.join(&name);
            std::fs::remove_file(&p).with_context(|| format!("cannot remove the stale {}", p.display()))?;
        }
    }
    for name in &new_files {
        let (from, to) = (tmp.join(name), out.join(name));
        std::fs::rename(&from, &to).with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    }
    std::fs::remove_dir(tmp).with_context(|| format!("cannot remove {}", tmp.display()))
}

// ---------------------------------------------------------------- merge

/// Merge the adapter in `adapter_dir` into the checkpoint in `model_dir`,
/// writing `out_dir`. `progress(done, total)` is called after each tensor.
pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<MergeSummary> {
    let out = check_out(model_dir, adapter_dir, out_dir, opts.force)?;
    let src = MappedCheckpoint::open(model_dir)?;
    let nf4 = src.nf4_weights()?;
    let (lc, deltas) = read_adapter(adapter_dir, &src, &nf4)?;
    // The parts of a 4-bit weight other than its codes are not written.
    let parts: std::collections::HashSet<String> = nf4
        .keys()
        .flat_map(|w| {
            [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"]
                .iter()
                .map(move |s| format!("{w}{s}"))
                .chain(std::iter::once(format!("{w}.{}", bnb::QUANT_STATE_KEY)))
        })
        .collect();

    let tensors: Vec<OutTensor> = src
        .tensors
        .iter()
        .filter(|t| !parts.contains(&t.name))
        .map(|t| {
            if let Some(qs) = nf4.get(&t.name) {
                let d = opts.dtype.unwrap_or(qs.dtype);
                let shape = qs.shape.to_vec();
                let bytes = qs.shape[0] * qs.shape[1] * d.size();
                return OutTensor { src: t, shape, dtype: st_dtype(d), bytes, delta: deltas.get(&t.name), values: Values::Nf4 };
            }
            let dtype = match (opts.dtype, float_dtype(t.dtype)) {
                (Some(to), Some(_)) => st_dtype(to),
                _ => t.dtype,
            };
            let bytes = match float_dtype(dtype) {
                Some(d) if dtype != t.dtype => t.shape.iter().product::<usize>() * d.size(),
                _ => t.end - t.start,
            };
            let values = match opts.nf4_round_trip {
                Some(double_quant) if float_dtype(t.dtype).is_some() && bnb::is_quantized(&t.name, &t.shape, &[]) => {
                    Values::Nf4RoundTrip { double_quant }
                }
                _ => Values::Stored,
            };
            OutTensor { src: t, shape: t.shape.clone(), dtype, bytes, delta: deltas.get(&t.name), values }
        })
        .collect();
    let total = tensors.len();
    let merged = tensors.iter().filter(|t| t.delta.is_some()).count();
    let shards = plan_shards(tensors, opts.max_shard_bytes.max(1));
    let n_shards = shards.len();

    st_files::in_temp_dir(&out, "merging", |tmp| {
        let mut done = 0;
        let mut bytes = 0;
        let mut weight_map = BTreeMap::new();
        let mut n_params = 0usize;
        for (i, shard) in shards.into_iter().enumerate() {
            let file = shard_name(i, n_shards);
            for t in &shard {
                weight_map.insert(t.src.name.clone(), file.clone());
                n_params += t.shape.iter().product::<usize>();
            }
            bytes += write_shard(&tmp.join(&file), &src, shard, &mut |_| {
                done += 1;
                progress(done, total);
            })?;
        }
        if n_shards > 1 {
            st_files::write_index(tmp, serde_json::json!({"total_parameters": n_params, "total_size": bytes}), &weight_map)?;
        }
        write_config(model_dir, tmp, opts.dtype, !nf4.is_empty())?;
        st_files::copy_side_files(model_dir, tmp)?;
        let info = serde_json::json!({
            "base_model": model_dir.display().to_string(),
            "adapter": adapter_dir.display().to_string(),
            "lora_r": lc.r,
            "lora_alpha": lc.alpha,
            "use_rslora": lc.use_rslora,
            "merged_modules": merged,
            "dtype": opts.dtype.map(torch_name),
            "dequantized_4bit_weights": nf4.len(),
            "nf4_round_trip": opts.nf4_round_trip.is_some(),
            "ferrotune_version": env!("CARGO_PKG_VERSION"),
        });
        crate::util::atomic_write(&tmp.join(INFO_FILE), serde_json::to_string_pretty(&info)?.as_bytes())?;
        install(tmp, &out)?;
        Ok(MergeSummary { tensors: total, merged, shards: n_shards, bytes })
    })
}

/// Parse a shard size as transformers' max_shard_size does: "5GB" (10^9),
/// "500MB", "100KB", "2GiB" (2^30), or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => bail!("size {s:?}: expected a number with an optional unit B, KB, MB, GB, KiB, MiB or GiB (e.g. 5GB)"),
    };
    let n: f64 = num.parse().map_err(|_| anyhow::anyhow!("size {s:?}: expected a number with an optional unit (e.g. 5GB)"))?;
    let bytes = (n * mult as f64).round();
    if bytes < 1.0 {
        bail!("size {s:?} must be at least one byte");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_transformers_spells_them() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("100KB").unwrap(), 100_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5MB").unwrap(), 1_500_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("5 parsecs").unwrap_err().to_string().contains("5 parsecs"));
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn bf16_and_f16_casts_round_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
        let mut out = Vec::new();
        from_f32(DType::BF16, &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)], &mut out);
        assert_eq!(out, [0x80, 0x3f, 0x82, 0x3f]);
        // f16: 1 + 2^-11 ties to 1; 1 + 3·2^-11 ties up to 1 + 2^-9.
        from_f32(DType::F16, &[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)], &mut out);
        assert_eq!(out, [0x00, 0x3c, 0x02, 0x3c]);
    }

    #[test]
    fn delta_rows_computed_in_blocks_equal_the_whole_matrix() {
        // W [3, 2], r 2: W' = W + 0.5·(B A), blocks of one row and of two.
        let d = Delta { a: vec![1.0, 2.0, 3.0, 4.0], b: vec![1.0, 0.0, 0.0, 1.0, 1.0, -1.0], r: 2, scale: 0.5 };
        let w = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0];
        let mut whole = w.to_vec();
        add_delta(&mut whole, 0, &d);
        assert_eq!(whole, [10.5, 21.0, 31.5, 42.0, 49.0, 59.0]);
        let mut blocks = w.to_vec();
        let (first, rest) = blocks.split_at_mut(2);
        add_delta(first, 0, &d);
        add_delta(rest, 1, &d);
        assert_eq!(blocks, whole);
    }

    #[test]
    fn shards_split_before_the_limit_and_large_tensors_stand_alone() {
        let src: Vec<SrcTensor> = [4usize, 4, 10, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| SrcTensor { name: format!("t{i}"), dtype: StDtype::U8, shape: vec![n], file: 0, start: 0, end: n })
            .collect();
        let plan = plan_shards(
            src.iter()
                .map(|t| OutTensor { src: t, shape: t.shape.clone(), dtype: t.dtype, bytes: t.end, delta: None, values: Values::Stored })
                .collect(),
            8,
        );
        let names: Vec<Vec<&str>> = plan.iter().map(|s| s.iter().map(|t| t.src.name.as_str()).collect()).collect();
        assert_eq!(names, vec![vec!["t0", "t1"], vec!["t2"], vec!["t3"]]);
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 3), "model-00002-of-00003.safetensors");
    }
}
