//! The output tensors of a merge: what each is made from (stored values,
//! a 4-bit weight's dequantization, or a dense weight's NF4 round trip),
//! how they are grouped into shards, and the streaming write of a shard,
//! converting dtypes and adding the adapter's delta a block of rows at a
//! time.

use super::deltas::{Delta, add_delta};
use crate::backend::{DType, to_f32};
use crate::model::st_files::{self, MappedCheckpoint, ShardEntry, ShardWriter, SrcTensor, float_dtype};
use crate::quant::bnb::{self, QuantState};
use crate::quant::nf4::Nf4Tensor;
use anyhow::{Context, Result, bail};
use safetensors::Dtype as StDtype;
use std::collections::HashMap;
use std::path::Path;

/// Input bytes per block of a tensor streamed to the output (whole rows;
/// bounds the f32 scratch of a merge or dtype change and the input pages
/// resident at once).
const BLOCK_BYTES: usize = 16 << 20;

pub(super) fn st_dtype(d: DType) -> StDtype {
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

/// merge's reads of the base checkpoint beyond plain tensor bytes.
pub(super) trait BaseReads {
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

/// One tensor of the output: where it comes from and how it is written.
pub(super) struct OutTensor<'a> {
    pub(super) src: &'a SrcTensor,
    /// The output shape (a 4-bit weight's is its matrix's, not its codes').
    pub(super) shape: Vec<usize>,
    pub(super) dtype: StDtype,
    pub(super) bytes: usize,
    pub(super) delta: Option<&'a Delta>,
    /// How the values are made before the delta: copied / converted from
    /// the input, or dequantized.
    pub(super) values: Values,
}

/// Where a weight's values come from.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Values {
    /// The input tensor's own values.
    Stored,
    /// A bitsandbytes 4-bit weight (the input tensor holds its packed codes).
    Nf4,
    /// The NF4 round trip of the dense input (quantized as load_in_4bit does).
    Nf4RoundTrip { double_quant: bool },
}

/// Tensors per shard, in input order, starting a new shard when the next
/// tensor would pass the limit (a larger tensor gets a shard of its own).
pub(super) fn plan_shards<'a>(tensors: Vec<OutTensor<'a>>, max: u64) -> Vec<Vec<OutTensor<'a>>> {
    st_files::plan_shards(tensors, max, |t| t.bytes as u64)
}

/// Write one safetensors file, streaming each tensor from the input.
pub(super) fn write_shard(path: &Path, src: &MappedCheckpoint, mut tensors: Vec<OutTensor>, progress: &mut dyn FnMut(&str)) -> Result<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::st_files::shard_name;

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
