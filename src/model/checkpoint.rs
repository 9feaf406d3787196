//! A local HuggingFace checkpoint directory: config.json (checked against
//! the registry before anything else), memory-mapped safetensors (single file
//! or sharded with model.safetensors.index.json), and the tokenizer files.

use crate::backend::{DType, WeightSource};
use crate::model::hparams::ModelConfig;
use crate::quant::bnb::{QuantizationConfig, RawTensor};
use crate::registry;
use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct TensorLoc {
    shard: usize,
    /// The stored type (U8 for the parts of a bitsandbytes 4-bit weight).
    st_dtype: StDtype,
    /// The floating-point type, for the tensors read as weights.
    dtype: Option<DType>,
    shape: Vec<usize>,
    /// Absolute byte range within the shard file.
    start: usize,
    end: usize,
}

/// One memory-mapped safetensors file.
pub struct Shard {
    pub path: PathBuf,
    map: Mmap,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorLoc>,
    /// config.json's bitsandbytes `quantization_config`: the decoder layers'
    /// linear weights are stored 4-bit (NF4) and load as such.
    pub quantization: Option<QuantizationConfig>,
}

fn dtype_from_st(dt: StDtype) -> Option<DType> {
    match dt {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Read config.json and resolve its family; fails on unknown architectures
/// before any weight file is opened.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    Ok(read_config_and_quantization(dir)?.0)
}

/// `read_config`, plus the bitsandbytes quantization_config when the
/// checkpoint is 4-bit (checked after the registry: an unknown architecture
/// is refused first, quantized or not).
pub fn read_config_and_quantization(dir: &Path) -> Result<(ModelConfig, Option<QuantizationConfig>)> {
    let path = dir.join("config.json");
    if dir.is_file() {
        bail!("model {} is a file; give the model's folder (the one holding config.json)", dir.display());
    }
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a HuggingFace model directory?)", path.display(), dir.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let family = registry::lookup(&raw, &path.display().to_string())?;
    let quantization = QuantizationConfig::from_config(&raw, &path.display().to_string())?;
    Ok((ModelConfig::from_json(raw, family, &path)?, quantization))
}

/// Map a safetensors file and index its tensors (names -> locations).
fn open_shard(path: &Path, shard: usize, out: &mut HashMap<String, TensorLoc>) -> Result<Shard> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the file is opened read-only and treated as immutable input;
    // a checkpoint rewritten underneath a running process is not supported.
    let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
    let (header_len, meta) = SafeTensors::read_metadata(&map)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let data_start = 8 + header_len;
    for (name, info) in meta.tensors() {
        // Any stored type is indexed (a 4-bit checkpoint holds U8 codes);
        // `tensor` refuses a non-float one where a weight is read.
        let (s, e) = info.data_offsets;
        out.insert(
            name,
            TensorLoc {
                shard,
                st_dtype: info.dtype,
                dtype: dtype_from_st(info.dtype),
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            },
        );
    }
    Ok(Shard { path: path.to_path_buf(), map })
}

/// The safetensors files of a checkpoint directory: model.safetensors, or
/// the shards model.safetensors.index.json lists (sorted, each once).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if !index.is_file() {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json found (ferrotune reads safetensors checkpoints only)",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing \"weight_map\" object", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let path = dir.join(&f);
            if !path.is_file() {
                bail!("{}: shard {f} is listed but {} does not exist", index.display(), path.display());
            }
            Ok(path)
        })
        .collect()
}

impl Checkpoint {
    /// Open a checkpoint directory: config first (registry check), then the
    /// weight files' headers. No tensor data is read here.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let (config, quantization) = read_config_and_quantization(dir)?;
        let mut tensors = HashMap::new();
        let mut shards = Vec::new();
        for (n, path) in weight_files(dir)?.iter().enumerate() {
            shards.push(open_shard(path, n, &mut tensors)?);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), config, shards, tensors, quantization })
    }

    /// The info line naming the checkpoint's parts the family does not
    /// train (an image-text checkpoint's towers), if it has any.
    pub fn untrained_note(&self) -> Option<String> {
        self.config.family.untrained_note(self.tensors.keys().map(String::as_str))
    }

    /// A tensor's stored type, shape and bytes, whatever its type (the
    /// parts of a bitsandbytes 4-bit weight).
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let loc = self.loc(name)?;
        let bytes = self.shards[loc.shard]
            .map
            .get(loc.start..loc.end)
            .with_context(|| format!("{}: tensor {name} lies outside the file", self.shards[loc.shard].path.display()))?;
        Ok((loc.st_dtype, loc.shape.clone(), bytes))
    }

    fn loc(&self, name: &str) -> Result<&TensorLoc> {
        self.tensors.get(name).with_context(|| {
            format!("{}: tensor {name} is missing from the checkpoint", self.dir.display())
        })
    }

    /// Borrow a tensor's bytes, checking its shape.
    pub fn tensor(&self, name: &str, expected: &[usize]) -> Result<WeightSource<'_>> {
        let loc = self.loc(name)?;
        if loc.shape != expected {
            bail!(
                "{}: tensor {name} has shape {:?}, expected {:?}",
                self.shards[loc.shard].path.display(),
                loc.shape,
                expected
            );
        }
        let bytes = self.shards[loc.shard]
            .map
            .get(loc.start..loc.end)
            .with_context(|| format!("{}: tensor {name} lies outside the file", self.shards[loc.shard].path.display()))?;
        let Some(dtype) = loc.dtype else {
            bail!(
                "{}: tensor {name} has dtype {:?}; ferrotune reads F32, F16 and BF16 weights{}",
                self.shards[loc.shard].path.display(),
                loc.st_dtype,
                if self.quantization.is_none() && loc.st_dtype == StDtype::U8 {
                    " (is this a 4-bit checkpoint whose config.json lacks quantization_config?)"
                } else {
                    ""
                }
            );
        };
        let numel = expected.iter().product();
        if bytes.len() != numel * dtype.size() {
            bail!("{}: tensor {name} has {} bytes for {numel} elements", self.shards[loc.shard].path.display(), bytes.len());
        }
        Ok(WeightSource { dtype, bytes, numel })
    }

    /// The first floating-point tensor (by name) holding a NaN or an
    /// infinity, with the count of such values: where a loss that is NaN
    /// from the first step comes from. Reads every weight, so it is called
    /// only once something has gone wrong.
    pub fn first_non_finite(&self) -> Option<(String, PathBuf, usize)> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        names.into_iter().find_map(|name| {
            let loc = &self.tensors[name];
            let dtype = loc.dtype?;
            let bytes = self.shards[loc.shard].map.get(loc.start..loc.end)?;
            let bad = non_finite_count(dtype, bytes);
            self.release(name);
            (bad > 0).then(|| (name.clone(), self.shards[loc.shard].path.clone(), bad))
        })
    }

    /// Tell the kernel the pages of `name` are no longer needed, so the
    /// mapped copy does not stay resident next to the converted weight.
    pub fn release(&self, name: &str) {
        if let Ok(loc) = self.loc(name) {
            #[cfg(unix)]
            {
                use memmap2::UncheckedAdvice;
                // SAFETY: the map is private and read-only; after DontNeed the
                // pages are re-read from the file if touched again.
                unsafe {
                    let _ = self.shards[loc.shard].map.unchecked_advise_range(
                        UncheckedAdvice::DontNeed,
                        loc.start,
                        loc.end - loc.start,
                    );
                }
            }
        }
    }
}

/// How many values of a stored tensor are NaN or infinite: all exponent
/// bits set, read from the bits without converting.
fn non_finite_count(dtype: DType, bytes: &[u8]) -> usize {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).filter(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 == 0x7f80_0000).count(),
        DType::BF16 => bytes.chunks_exact(2).filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80).count(),
        DType::F16 => bytes.chunks_exact(2).filter(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00).count(),
    }
}

/// Load tokenizer.json with the `tokenizers` crate.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))
}

/// tokenizer_config.json as JSON (chat template, special tokens), if present.
pub fn load_tokenizer_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?))
}

/// A `--model` / `base_model` argument: a local directory, or a Hub id
/// (`org/name`) fetched into the shared Hugging Face cache (only what
/// ferrotune reads; nothing when the cache already has it; from the cache
/// alone with HF_HUB_OFFLINE). `revision`: a branch, tag or commit.
pub fn resolve_model_dir(arg: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_dir(arg, revision, "model", crate::hub::model::model_dir)
}

/// A `--adapter` / `lora_model_dir` argument: a local PEFT adapter folder,
/// or a Hub id of one (fetched as `resolve_model_dir` does).
pub fn resolve_adapter_dir(arg: &Path) -> Result<PathBuf> {
    let s = arg.to_string_lossy();
    resolve_dir(&s, None, "adapter", crate::hub::model::adapter_dir)
}

fn resolve_dir(
    arg: &str,
    revision: Option<&str>,
    what: &str,
    fetch: fn(&crate::hub::Hub, &str, Option<&str>) -> Result<PathBuf>,
) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.is_file() {
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        bail!(
            "{what} {arg} is a file; give the {what}'s folder (the one holding its .json and .safetensors files), \
             e.g. {}",
            folder.display()
        );
    }
    // Only `org/name` is taken for a Hub id: a bare missing name is far
    // more often a mistyped local folder.
    if arg.split('/').count() == 2 && crate::hub::is_repo_id(arg) {
        return fetch(&crate::hub::Hub::from_env(), arg, revision);
    }
    bail!("{what} directory {arg} does not exist (nor is it a Hub id of the form org/name)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_counted_in_every_stored_type() {
        let f32s: Vec<u8> = [1.0f32, f32::NAN, f32::INFINITY, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(non_finite_count(DType::F32, &f32s), 2);
        let bf16s: Vec<u8> = [1.0f32, f32::NEG_INFINITY, 3.0e38].iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect();
        assert_eq!(non_finite_count(DType::BF16, &bf16s), 1);
        let f16s: Vec<u8> = [1.0f32, f32::NAN, 65504.0].iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect();
        assert_eq!(non_finite_count(DType::F16, &f16s), 1);
    }

    #[test]
    fn hub_ids_resolve_through_the_cache_snapshot_offline() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = tmp.path().join("models--org--tiny");
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), commit).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        let cache = tmp.path().to_str().unwrap().to_string();
        let hub = crate::hub::Hub::new(crate::hub::HubEnv::from_vars(|k| match k {
            "HF_HUB_CACHE" => Some(cache.clone()),
            "HF_HUB_OFFLINE" => Some("1".into()),
            _ => None,
        }));
        assert_eq!(crate::hub::model::model_dir(&hub, "org/tiny", None).unwrap(), snap);
        assert_eq!(crate::hub::model::model_dir(&hub, "org/tiny", Some(commit)).unwrap(), snap);
        let err = crate::hub::model::model_dir(&hub, "org/absent", None).unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE is set and org/absent (revision main) is not in the cache"), "{err}");
        let err = resolve_model_dir("./nowhere", None).unwrap_err().to_string();
        assert!(err.contains("model directory ./nowhere does not exist"), "{err}");
    }
}
