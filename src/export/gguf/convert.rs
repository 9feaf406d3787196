//! A model folder to a GGUF file, in two stages that mirror llama.cpp's own
//! tools: the converter's file (convert_hf_to_gguf.py: f32, f16, bf16,
//! q8_0 or auto), then, for a k-quant, llama-quantize's rewrite of that file
//! (its tensor order, its per-tensor types, its two keys moved to the end).
//! Both stages are planned before any data is read, so bad input fails
//! before the output is created; then the tensors are streamed from the
//! memory-mapped checkpoint a block of rows at a time, never held whole.

use super::arch::{self, Change, Hparams};
use super::file::{GgufWriter, TensorInfo};
use super::rules::{self, KQuant, TensorDesc};
use super::types::{GgmlType, Kvs, Value};
use super::{metadata, quants, vocab};
use crate::backend::{DType, to_f32};
use crate::model::st_files::{MappedCheckpoint, SrcTensor, float_dtype};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// What to write: one of the converter's file types or a k-quant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    BF16,
    Q8_0,
    /// bf16 when the first 2-D weight is bf16, else f16 (the converter's auto).
    Auto,
    K(KQuant),
}

impl OutType {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, auto, q4_k_m, q5_k_m, q6_k";

    pub fn parse(s: &str) -> Result<OutType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => OutType::F32,
            "f16" => OutType::F16,
            "bf16" => OutType::BF16,
            "q8_0" => OutType::Q8_0,
            "auto" => OutType::Auto,
            other => OutType::K(KQuant::parse(other).with_context(|| format!("outtype {s:?}: expected one of {}", OutType::NAMES))?),
        })
    }
}

/// llama.cpp's LlamaFileType of the converter's file types.
fn converter_file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        _ => unreachable!("the converter writes f32, f16, bf16 or q8_0 files"),
    }
}

#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// The pre-tokenizer name when the tokenizer's fingerprint is unknown.
    pub tokenizer_pre: Option<String>,
}

/// Where one output tensor's values come from.
enum Source<'a> {
    Checkpoint { src: &'a SrcTensor, change: Change, rows: usize },
    Generated(Vec<f32>),
}

struct Planned<'a> {
    info: TensorInfo,
    source: Source<'a>,
    /// The converter's type for this tensor (what stage two reads).
    stage1: GgmlType,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub arch: &'static str,
    pub file_type: u32,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors per type, for the closing line.
    pub types: Vec<(GgmlType, usize)>,
}

/// Write the GGUF of the model in `dir` to `out`. `progress(done, total)`
/// counts bytes of checkpoint read.
pub fn convert(dir: &Path, out: &Path, outtype: OutType, opts: &ConvertOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<Summary> {
    let hp = Hparams::load(dir)?;
    let ckpt = MappedCheckpoint::open(dir)?;
    let vocab = vocab::vocab(dir, hp.arch.name(), &serde_json::Value::Object(hp.map.clone()), &vocab::VocabOptions { pre: opts.tokenizer_pre.clone() })?;

    // Stage one: the converter. Generated tensors first, then the
    // checkpoint's by file and, within a file, by name.
    let mut early = Kvs::default();
    let generated = arch::generated(&hp, &mut early)?;
    let mut order: Vec<&SrcTensor> = ckpt.tensors.iter().collect();
    order.sort_by(|a, b| (a.file, &a.name).cmp(&(b.file, &b.name)));
    let mut mapped = Vec::new();
    for t in order {
        if let Some((name, change)) = arch::map_tensor(&hp, &t.name)? {
            if float_dtype(t.dtype).is_none() {
                bail!("{}: tensor {} has dtype {:?}; GGUF export reads F32, F16 and BF16 checkpoints (merge a 4-bit model first)", ckpt.path(t).display(), t.name, t.dtype);
            }
            mapped.push((t, name, change));
        }
    }
    let stage1_type = match outtype {
        OutType::F32 => GgmlType::F32,
        OutType::F16 => GgmlType::F16,
        OutType::BF16 => GgmlType::BF16,
        OutType::Q8_0 => GgmlType::Q8_0,
        OutType::Auto | OutType::K(_) => mapped
            .iter()
            .filter(|(t, ..)| t.shape.len() >= 2)
            .find_map(|(t, ..)| match float_dtype(t.dtype) {
                Some(DType::BF16) => Some(GgmlType::BF16),
                Some(DType::F16) => Some(GgmlType::F16),
                _ => None,
            })
            .unwrap_or(GgmlType::F16),
    };
    let mut planned: Vec<Planned> = generated
        .into_iter()
        .map(|(name, v)| Planned { info: TensorInfo { name, ne: vec![v.len() as u64], ty: GgmlType::F32 }, stage1: GgmlType::F32, source: Source::Generated(v) })
        .collect();
    for (t, name, change) in mapped {
        let mut shape = t.shape.clone();
        if name == "token_embd.weight"
            && let Some(n) = vocab.n_vocab_real
            && !shape.is_empty()
        {
            shape[0] = shape[0].min(n);
        }
        let ne: Vec<u64> = shape.iter().rev().map(|&n| n as u64).collect();
        let ty = converter_type(&name, &ne, stage1_type);
        // Rows: everything but the last (row-length) axis; a 1-D tensor is one row.
        let rows = t.shape.iter().rev().skip(1).product::<usize>();
        planned.push(Planned { info: TensorInfo { name, ne, ty }, stage1: ty, source: Source::Checkpoint { src: t, change, rows } });
    }

    let file_type1 = converter_file_type(stage1_type);
    let mut kvs = Kvs::default();
    kvs.set("general.architecture", Value::Str(hp.arch.name().into()));
    kvs.extend(early);
    kvs.set("general.type", Value::Str("model".into()));
    let named: Vec<(&str, &[u64])> = planned.iter().map(|p| (p.info.name.as_str(), p.info.ne.as_slice())).collect();
    kvs.extend(metadata::general(dir, &named, false)?);
    arch::hparam_kvs(&hp, file_type1, &mut kvs)?;
    kvs.set("general.quantization_version", Value::U32(2));
    kvs.extend(vocab.kvs);

    // Stage two: llama-quantize's order, types and trailing keys.
    let file_type = if let OutType::K(k) = outtype {
        let names: Vec<&str> = planned.iter().map(|p| p.info.name.as_str()).collect();
        let idx = rules::quantize_order(&names);
        let mut reordered: Vec<Option<Planned>> = planned.into_iter().map(Some).collect();
        planned = idx.iter().map(|&i| reordered[i].take().expect("a permutation")).collect();
        let descs: Vec<TensorDesc> = planned.iter().map(|p| TensorDesc { name: &p.info.name, ne: &p.info.ne, ty: p.stage1 }).collect();
        let n_layer = hp.n_layer()? as usize;
        let is_70b = rules::llm_type_70b(hp.arch.name(), n_layer, hp.u32("num_attention_heads")? as usize, hp.u32("num_key_value_heads")? as usize);
        let types = rules::plan_for(k, n_layer, is_70b, &descs);
        for (p, ty) in planned.iter_mut().zip(types) {
            p.info.ty = ty;
        }
        kvs.set_last("general.quantization_version", Value::U32(2));
        kvs.set_last("general.file_type", Value::U32(k.file_type()));
        k.file_type()
    } else {
        file_type1
    };

    let infos: Vec<TensorInfo> = planned.iter().map(|p| p.info.clone()).collect();
    let total: u64 = planned.iter().map(|p| match &p.source { Source::Checkpoint { src, .. } => (src.end - src.start) as u64, Source::Generated(_) => 0 }).sum();
    let mut w = GgufWriter::create(out, &kvs, infos)?;
    let mut done = 0u64;
    for p in &planned {
        write_tensor(&mut w, &ckpt, p, &mut |n| {
            done += n;
            progress(done, total);
        })
        .with_context(|| format!("tensor {}", p.info.name))?;
    }
    let bytes = w.finish()?;
    let mut types: Vec<(GgmlType, usize)> = Vec::new();
    for p in &planned {
        match types.iter_mut().find(|(t, _)| *t == p.info.ty) {
            Some(e) => e.1 += 1,
            None => types.push((p.info.ty, 1)),
        }
    }
    Ok(Summary { arch: hp.arch.name(), file_type, tensors: planned.len(), bytes, types })
}

/// The converter's type for one tensor: F32 for 1-D tensors, norms and
/// anything not a weight or LoRA factor (biases); the file type otherwise,
/// with F16 where a row does not fill Q8_0 blocks.
pub fn converter_type(name: &str, ne: &[u64], file: GgmlType) -> GgmlType {
    let weight = [".weight", ".lora_a", ".lora_b"].iter().any(|s| name.ends_with(s));
    if ne.len() <= 1 || name.ends_with("_norm.weight") || !weight {
        return GgmlType::F32;
    }
    if file == GgmlType::Q8_0 && !ne[0].is_multiple_of(32) {
        return GgmlType::F16;
    }
    file
}

/// Rows per streamed block: about 32 MB of f32, in whole permutation groups.
fn block_rows(row_len: usize, group: usize) -> usize {
    let rows = ((32usize << 20) / 4 / row_len.max(1)).max(1);
    rows.div_ceil(group) * group
}

fn write_tensor(w: &mut GgufWriter, ckpt: &MappedCheckpoint, p: &Planned, progress: &mut dyn FnMut(u64)) -> Result<()> {
    let row_len = p.info.ne[0] as usize;
    let (src, change, rows) = match &p.source {
        Source::Generated(v) => return w.write_tensor(&encode(v, row_len, p.stage1, p.info.ty)),
        Source::Checkpoint { src, change, rows } => (*src, *change, *rows),
    };
    let dtype = float_dtype(src.dtype).expect("checked when planned");
    let kept_rows = p.info.ne[1..].iter().product::<u64>() as usize;
    // A permuted bias is one row whose values are permuted as rows are.
    let bias = p.info.ne.len() == 1;
    let (group, n_head) = match change {
        Change::Permute { n_head } if bias => (1, n_head),
        Change::Permute { n_head } => {
            if rows % (2 * n_head) != 0 {
                bail!("{} rows cannot be split into {n_head} heads for llama.cpp's RoPE layout", rows);
            }
            (rows / n_head, n_head)
        }
        _ => (1, 0),
    };
    let bytes = ckpt.bytes(src);
    let row_bytes = row_len * dtype.size();
    let step = block_rows(row_len, group);
    w.begin_tensor()?;
    let mut r0 = 0;
    while r0 < kept_rows {
        if let Some(sig) = crate::train::interrupt::requested() {
            bail!("stopped by {}; no file written", crate::train::interrupt::name(sig));
        }
        let r1 = (r0 + step).min(kept_rows);
        let raw = &bytes[r0 * row_bytes..r1 * row_bytes];
        let mut x = widen(dtype, raw);
        match change {
            Change::None => {}
            // An f16 checkpoint's +1 is an f16 addition (torch rounds it).
            Change::AddOne if dtype == DType::F16 => x.iter_mut().for_each(|v| *v = half::f16::from_f32(*v + 1.0).to_f32()),
            Change::AddOne => x.iter_mut().for_each(|v| *v += 1.0),
            Change::Permute { .. } if bias => x = arch::permute_rows(&x, x.len(), n_head)?,
            Change::Permute { .. } => x = arch::permute_rows(&x, r1 - r0, n_head * (r1 - r0) / rows)?,
        }
        // Values read from a checkpoint already in the stage-one type, and
        // only moved (not changed), round to themselves: skip the round trip.
        let exact = matches!(change, Change::None | Change::Permute { .. })
            && matches!((dtype, p.stage1), (DType::BF16, GgmlType::BF16) | (DType::F16, GgmlType::F16) | (DType::F32, GgmlType::F32));
        let stage1 = if exact && p.info.ty != p.stage1 { GgmlType::F32 } else { p.stage1 };
        w.write_part(&encode(&x, row_len, stage1, p.info.ty))?;
        ckpt.release(src, r0 * row_bytes, raw.len());
        progress(raw.len() as u64);
        r0 = r1;
    }
    // Rows dropped by the vocabulary truncation count as read.
    progress(((rows - kept_rows) * row_bytes) as u64);
    w.end_tensor()
}

/// Checkpoint bytes to f32, on every core (an 8B model is 16 GB of them).
fn widen(dtype: DType, raw: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0f32; raw.len() / dtype.size()];
    out.par_chunks_mut(CHUNK).zip(raw.par_chunks(CHUNK * dtype.size())).for_each(|(o, r)| o.copy_from_slice(&to_f32(dtype, r)));
    out
}

/// Values to their final bytes: rounded to the converter's type first (what
/// the 16-bit file llama-quantize reads holds), then quantized.
fn encode(x: &[f32], row_len: usize, stage1: GgmlType, fin: GgmlType) -> Vec<u8> {
    let first = quants::quantize(stage1, x, row_len);
    if fin == stage1 {
        return first;
    }
    let widened: Vec<f32> = match stage1 {
        GgmlType::F32 => return quants::quantize(fin, x, row_len),
        GgmlType::F16 => to_f32(DType::F16, &first),
        GgmlType::BF16 => to_f32(DType::BF16, &first),
        other => unreachable!("llama-quantize reads f32, f16 or bf16 files, not {other:?}"),
    };
    quants::quantize(fin, &widened, row_len)
}
