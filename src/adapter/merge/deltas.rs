//! The adapter side of a merge: its LoRA factors read and checked against
//! the base weights they change, and W + scale·(B A) computed for a block
//! of a weight's rows.

use super::super::LoraConfig;
use super::super::peft;
use crate::backend::to_f32;
use crate::model::st_files::{MappedCheckpoint, SrcTensor, float_dtype};
use crate::quant::bnb::QuantState;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One adapted projection: the f32 LoRA factors and its scaling.
pub(super) struct Delta {
    /// [r, in]
    pub(super) a: Vec<f32>,
    /// [out, r]
    pub(super) b: Vec<f32>,
    pub(super) r: usize,
    pub(super) scale: f32,
}

const KEY_PREFIX: &str = "base_model.model.";

/// Read the adapter and check every tensor against the base weight it
/// changes, before anything is written. Keyed by the base weight's name.
/// The adapter's deltas keyed by the checkpoint weight they add to
/// (`to_checkpoint` maps a PEFT module name to the checkpoint's).
pub(super) fn read_adapter(
    dir: &Path,
    src: &MappedCheckpoint,
    nf4: &HashMap<String, QuantState>,
    to_checkpoint: &dyn Fn(&str) -> String,
) -> Result<(LoraConfig, BTreeMap<String, Delta>)> {
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
        let wname = format!("{}.weight", to_checkpoint(module));
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

/// rows += scale·(B A)[first_row..] in f32: the rows of W' = W + scale·(B A)
/// from `first_row` on. Each row's delta accumulates over the rank in order
/// (k = 0..r), then is scaled and added, as PEFT's (B @ A) * scaling.
pub(super) fn add_delta(rows: &mut [f32], first_row: usize, d: &Delta) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
