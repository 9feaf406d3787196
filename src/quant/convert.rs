//! Quantize a bf16/f16/f32 HuggingFace checkpoint to bitsandbytes' NF4
//! layout, writing what transformers writes after loading the model with
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//! bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=<its dtype>)` and
//! `save_pretrained`: the same tensors, bytes and file layout, and
//! config.json with its `quantization_config`.
//!
//! The checkpoint is streamed from its memory-mapped files a chunk at a time,
//! releasing the pages behind; a weight is read twice when double
//! quantization is on (its mean absmax goes into the file header, which is
//! written first), so memory stays near one quantized tensor.

use super::bnb::{QUANT_STATE_KEY, QuantState, QuantizationConfig};
use super::nf4::{self, Absmax, BLOCKSIZE, NF4_CODE};
use crate::backend::{DType, to_f32};
use crate::model::st_files::{self, MappedCheckpoint, ShardEntry, ShardWriter, SrcTensor, float_dtype};
use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Elements converted to f32 at a time (a multiple of the block size and even).
const CHUNK_ELEMS: usize = 1 << 20;
/// Bytes copied at a time for tensors that pass through unchanged.
const COPY_BYTES: usize = 16 << 20;
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// bnb_4bit_use_double_quant (the default): the block absmaxes are
    /// themselves quantized to 8 bits.
    pub double_quant: bool,
    /// Largest weight file before the checkpoint is split into shards.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions { double_quant: true, max_shard_bytes: st_files::DEFAULT_MAX_SHARD_BYTES }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeSummary {
    /// Tensors of the input checkpoint.
    pub tensors: usize,
    /// Of which quantized to NF4.
    pub quantized: usize,
    /// Weight files written.
    pub shards: usize,
    /// Bytes of tensor data read and written.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// bnb_4bit_compute_dtype written to config.json.
    pub compute_dtype: DType,
}

// ---------------------------------------------------------------- input

/// quantize's reads of the input: a weight's values as f32, streamed.
trait ChunkedReads {
    fn for_each_chunk(&self, t: &SrcTensor, dtype: DType, f: impl FnMut(&[f32]));
    fn block_absmax(&self, t: &SrcTensor, dtype: DType) -> Vec<f32>;
    fn quantize(&self, t: &SrcTensor, dtype: DType) -> (Vec<u8>, Vec<f32>);
}

impl ChunkedReads for MappedCheckpoint {
    /// Call `f` on the tensor's values as f32, CHUNK_ELEMS at a time.
    fn for_each_chunk(&self, t: &SrcTensor, dtype: DType, mut f: impl FnMut(&[f32])) {
        let chunk_bytes = CHUNK_ELEMS * dtype.size();
        for (i, chunk) in self.bytes(t).chunks(chunk_bytes).enumerate() {
            f(&to_f32(dtype, chunk));
            self.release(t, i * chunk_bytes, chunk.len());
        }
    }

    /// The stored absmax of every block of a weight.
    fn block_absmax(&self, t: &SrcTensor, dtype: DType) -> Vec<f32> {
        let mut absmax = Vec::new();
        self.for_each_chunk(t, dtype, |w| nf4::push_block_absmax(w, BLOCKSIZE, &mut absmax));
        absmax
    }

    /// Packed codes and stored absmax of a weight, in one pass.
    fn quantize(&self, t: &SrcTensor, dtype: DType) -> (Vec<u8>, Vec<f32>) {
        let numel: usize = t.shape.iter().product();
        let mut absmax = Vec::with_capacity(numel.div_ceil(BLOCKSIZE));
        let mut packed = Vec::with_capacity(numel.div_ceil(2));
        self.for_each_chunk(t, dtype, |w| {
            let first = absmax.len();
            nf4::push_block_absmax(w, BLOCKSIZE, &mut absmax);
            nf4::push_packed_codes(w, &absmax[first..], BLOCKSIZE, &NF4_CODE, &mut packed);
        });
        (packed, absmax)
    }
}

// ---------------------------------------------------------------- output plan

/// What an output tensor holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// An input tensor copied unchanged.
    Copy,
    Packed,
    Absmax,
    QuantMap,
    NestedAbsmax,
    NestedMap,
    State,
}

struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Index of the input tensor it comes from.
    src: usize,
    part: Part,
}

impl OutTensor {
    fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Per quantized weight, what the header needs before any data is written.
struct Module {
    dtype: DType,
    state: QuantState,
    /// With double quantization: the nested absmax (an F32 tensor written
    /// before the weight's own bytes).
    nested_absmax: Vec<f32>,
}

/// The output tensors of one quantized weight, in transformers' state-dict order.
fn module_outputs(src: usize, t: &SrcTensor, m: &Module) -> Vec<OutTensor> {
    let numel: usize = t.shape.iter().product();
    let blocks = numel.div_ceil(BLOCKSIZE);
    let name = |s: &str| format!("{}{s}", t.name);
    let out = |s: &str, dtype, shape: Vec<usize>, part| OutTensor { name: name(s), dtype, shape, src, part };
    let json_len = m.state.to_json().len();
    let mut v = vec![out("", Dtype::U8, vec![numel.div_ceil(2), 1], Part::Packed)];
    if m.state.nested.is_some() {
        v.push(out(".absmax", Dtype::U8, vec![blocks], Part::Absmax));
        v.push(out(".quant_map", Dtype::F32, vec![16], Part::QuantMap));
        v.push(out(".nested_absmax", Dtype::F32, vec![m.nested_absmax.len()], Part::NestedAbsmax));
        v.push(out(".nested_quant_map", Dtype::F32, vec![256], Part::NestedMap));
    } else {
        v.push(out(".absmax", Dtype::F32, vec![blocks], Part::Absmax));
        v.push(out(".quant_map", Dtype::F32, vec![16], Part::QuantMap));
    }
    v.push(out(&format!(".{QUANT_STATE_KEY}"), Dtype::U8, vec![json_len], Part::State));
    v
}

/// Groups of output tensors (one group per input tensor) into shards, in
/// input order, starting a new shard when the next group would pass `max`.
fn plan_shards(groups: Vec<Vec<OutTensor>>, max: u64) -> Vec<Vec<OutTensor>> {
    let shards = st_files::plan_shards(groups, max, |g| g.iter().map(|t| t.nbytes() as u64).sum());
    shards.into_iter().map(|s| s.into_iter().flatten().collect()).collect()
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write one safetensors file, producing each tensor's bytes only when its
/// turn comes.
fn write_shard(
    path: &Path,
    src: &MappedCheckpoint,
    modules: &HashMap<usize, Module>,
    mut tensors: Vec<OutTensor>,
    progress: &mut dyn FnMut(),
) -> Result<u64> {
    let mut w = ShardWriter::create(path, &mut tensors, |t| ShardEntry { name: &t.name, dtype: t.dtype, shape: &t.shape, bytes: t.nbytes() })?;
    // The absmax codes of the weight just packed (its next tensor in the file).
    let mut last_codes: Option<(usize, Vec<u8>)> = None;
    let nested_codes = |absmax: &[f32]| match nf4::double_quantize(absmax) {
        Absmax::Nested { codes, .. } => codes,
        Absmax::Plain(_) => unreachable!("double_quantize nests"),
    };
    for t in &tensors {
        let s = &src.tensors[t.src];
        let m = modules.get(&t.src);
        let data: Vec<u8> = match (t.part, m) {
            (Part::Copy, _) => {
                let bytes = src.bytes(s);
                for (i, block) in bytes.chunks(COPY_BYTES).enumerate() {
                    w.write(block)?;
                    src.release(s, i * COPY_BYTES, block.len());
                }
                progress();
                continue;
            }
            (Part::Packed, Some(m)) => {
                let (packed, absmax) = src.quantize(s, m.dtype);
                if m.state.nested.is_some() {
                    last_codes = Some((t.src, nested_codes(&absmax)));
                }
                progress();
                packed
            }
            (Part::Absmax, Some(m)) => {
                if m.state.nested.is_some() {
                    match last_codes.take() {
                        Some((i, codes)) if i == t.src => codes,
                        _ => nested_codes(&src.block_absmax(s, m.dtype)),
                    }
                } else {
                    f32_bytes(&src.block_absmax(s, m.dtype))
                }
            }
            (Part::QuantMap, Some(_)) => f32_bytes(&NF4_CODE),
            (Part::NestedAbsmax, Some(m)) => f32_bytes(&m.nested_absmax),
            (Part::NestedMap, Some(_)) => f32_bytes(&nf4::dynamic_map_signed()),
            (Part::State, Some(m)) => m.state.to_json().into_bytes(),
            (part, None) => unreachable!("{part:?} of {} planned without its module", t.name),
        };
        debug_assert_eq!(data.len(), t.nbytes(), "{}", t.name);
        w.write(&data)?;
    }
    w.finish()
}

// ---------------------------------------------------------------- directories

/// The output must be new (or an empty directory), and not the input.
fn check_out(model_dir: &Path, out: &Path) -> Result<PathBuf> {
    let out_abs = st_files::out_dir("--out", out, &[(model_dir, "the model's own directory")], "the quantized model")?;
    if st_files::occupied(&out_abs, out)?.is_some() {
        bail!("--out {} already exists and is not an empty directory; choose a new output directory", out.display());
    }
    Ok(out_abs)
}

/// config.json with quantization_config added, as transformers writes it
/// (keys sorted, two-space indent).
fn write_config(config: &Value, qc: &QuantizationConfig, path: &Path) -> Result<()> {
    let mut v = config.clone();
    v.as_object_mut().expect("checked to be an object").insert("quantization_config".into(), qc.to_json());
    let mut text = serde_json::to_string_pretty(&v)?;
    text.push('\n');
    crate::util::atomic_write(path, text.as_bytes())
}

// ---------------------------------------------------------------- quantize

/// Quantize the checkpoint in `model_dir` into `out_dir` (which must not
/// exist, or be empty). `progress(done, total)` is called as input tensors
/// are written.
pub fn quantize_checkpoint(
    model_dir: &Path,
    out_dir: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizeSummary> {
    let out = check_out(model_dir, out_dir)?;
    // The registry check first: an unknown architecture stops here. The
    // model's projections are what bitsandbytes quantizes (every Linear but
    // the LM head); the parts the family does not train stay as stored.
    let cfg = crate::model::checkpoint::read_config(model_dir)?;
    let projections = crate::model::projection_weights(&cfg);
    let config_path = model_dir.join("config.json");
    let config: Value = serde_json::from_slice(
        &std::fs::read(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    if !config.is_object() {
        bail!("{}: expected a JSON object", config_path.display());
    }
    if config.get("quantization_config").is_some_and(|q| !q.is_null()) {
        bail!(
            "{}: the model is already quantized (it has a quantization_config); quantize the original bf16/f16/f32 checkpoint",
            config_path.display()
        );
    }

    let src = MappedCheckpoint::open(model_dir)?;
    let mut modules: HashMap<usize, Module> = HashMap::new();
    for (i, t) in src.tensors.iter().enumerate() {
        if !projections.contains(&t.name) {
            continue;
        }
        let Some(dtype) = float_dtype(t.dtype) else {
            bail!("{}: tensor {} has dtype {:?}; ferrotune quantizes F32, F16 and BF16 weights", src.path(t).display(), t.name, t.dtype);
        };
        let shape = [t.shape[0], t.shape[1]];
        // With double quantization the header needs the mean absmax (in the
        // quant state JSON) and the F32 nested absmax comes first in the file.
        let (nested, nested_absmax) = if opts.double_quant {
            match nf4::double_quantize(&src.block_absmax(t, dtype)) {
                Absmax::Nested { nested_absmax, offset, nested_blocksize, .. } => (Some((nested_blocksize, offset)), nested_absmax),
                Absmax::Plain(_) => unreachable!("double_quantize nests"),
            }
        } else {
            (None, Vec::new())
        };
        let state = QuantState { blocksize: BLOCKSIZE, dtype, shape, nested };
        modules.insert(i, Module { dtype, state, nested_absmax });
    }
    if modules.is_empty() {
        bail!("{}: none of the model's projection weights (such as {}) found to quantize", model_dir.display(), crate::model::tensor_list(&cfg).iter().find(|t| t.2 == crate::model::Tensor::Projection).map_or("", |t| t.0.as_str()));
    }
    let first = src.tensors.iter().enumerate().find_map(|(i, _)| modules.get(&i)).expect("non-empty");
    let compute_dtype = first.dtype;

    let groups: Vec<Vec<OutTensor>> = src
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| match modules.get(&i) {
            Some(m) => module_outputs(i, t, m),
            None => vec![OutTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), src: i, part: Part::Copy }],
        })
        .collect();
    // The untrained parts stay dense: transformers must be told, or it
    // would make their Linears 4-bit and expect packed weights. A skip list
    // replaces transformers' default one (the LM head), so it names that too.
    let mut qc = QuantizationConfig::nf4(opts.double_quant, compute_dtype);
    let untrained: Vec<String> = cfg
        .family
        .untrained
        .iter()
        .filter(|u| src.tensors.iter().any(|t| t.name.starts_with(&u.prefix)))
        .map(|u| u.module_path().to_string())
        .collect();
    if !untrained.is_empty() {
        qc.skip_modules = std::iter::once("lm_head".to_string()).chain(untrained).collect();
    }
    let total = src.tensors.len();
    let quantized = modules.len();
    let bytes_in: u64 = src.tensors.iter().map(|t| (t.end - t.start) as u64).sum();
    let shards = plan_shards(groups, opts.max_shard_bytes.max(1));
    let n_shards = shards.len();

    st_files::in_temp_dir(&out, "quantizing", |tmp| {
        let mut done = 0;
        let index_metadata = |bytes| serde_json::json!({"total_size": bytes});
        let bytes_out = st_files::write_shards(tmp, shards, |t| t.name.clone(), index_metadata, |path, shard| {
            write_shard(path, &src, &modules, shard, &mut || {
                done += 1;
                progress(done, total);
            })
        })?;
        write_config(&config, &qc, &tmp.join("config.json"))?;
        st_files::copy_side_files(model_dir, tmp)?;
        if out.exists() {
            std::fs::remove_dir(&out).with_context(|| format!("cannot replace the empty {}", out.display()))?;
        }
        std::fs::rename(tmp, &out).with_context(|| format!("cannot rename {} to {}", tmp.display(), out.display()))?;
        Ok(QuantizeSummary { tensors: total, quantized, shards: n_shards, bytes_in, bytes_out, compute_dtype })
    })
}
