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
//!
//! Files: `deltas` reads the adapter into per-weight LoRA factors and adds
//! them to rows of a base weight; `weights` plans and streams the output
//! tensors; `output_dir` checks, fills and installs the output directory.
//! This file runs a merge.

mod deltas;
mod output_dir;
mod weights;

use crate::backend::DType;
use crate::model::st_files::{self, MappedCheckpoint, float_dtype};
use crate::quant::bnb;
use anyhow::{Result, bail};
use deltas::read_adapter;
use output_dir::{check_out, install, write_config};
use std::path::Path;
use weights::{BaseReads, OutTensor, Values, plan_shards, st_dtype, write_shard};

/// Marker written into every merge output, so that a later merge may
/// replace it without --force (and records what was merged).
pub const INFO_FILE: &str = "ferrotune_merge.json";

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
    // PEFT's module names map to the checkpoint's through the family (they
    // differ for image-text checkpoints); merge itself works by tensor name,
    // so a config.json the registry does not know merges with names as they are.
    let cfg = crate::model::checkpoint::read_config(model_dir).ok();
    let to_checkpoint = |m: &str| cfg.as_ref().map_or_else(|| m.to_string(), |c| crate::model::checkpoint_module(c, m));
    // The weights QLoRA held in NF4 (for the round trip): the model's
    // projections; by bitsandbytes' name rule when the registry does not know it.
    let projections = cfg.as_ref().map(crate::model::projection_weights);
    let held_in_nf4 = |name: &str, shape: &[usize]| projections.as_ref().map_or_else(|| bnb::is_quantized(name, shape, &[]), |p| p.contains(name));
    let (lc, deltas) = read_adapter(adapter_dir, &src, &nf4, &to_checkpoint)?;
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
                Some(double_quant) if float_dtype(t.dtype).is_some() && held_in_nf4(&t.name, &t.shape) => {
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
    let n_params: usize = shards.iter().flatten().map(|t| t.shape.iter().product::<usize>()).sum();

    st_files::in_temp_dir(&out, "merging", |tmp| {
        let mut done = 0;
        let index_metadata = |bytes| serde_json::json!({"total_parameters": n_params, "total_size": bytes});
        let bytes = st_files::write_shards(tmp, shards, |t| t.src.name.clone(), index_metadata, |path, shard| {
            write_shard(path, &src, shard, &mut |_| {
                done += 1;
                progress(done, total);
            })
        })?;
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
}
