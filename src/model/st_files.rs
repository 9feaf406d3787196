//! Checkpoint-file plumbing shared by the commands that rewrite a
//! HuggingFace checkpoint (`ferrotune merge`, `ferrotune quantize`): the
//! memory-mapped input, the output directory checks, sharded safetensors
//! writing in the safetensors library's layout, and the tokenizer and
//! generation files that travel with the weights.

use crate::backend::DType;
use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// transformers' conventional shard size for uploaded checkpoints (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
/// Files besides the weights that make the output a complete model
/// directory (tokenizer formats of every kind, generation defaults).
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
];

/// The floating-point dtypes ferrotune computes with; None for the rest.
pub fn float_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

// ---------------------------------------------------------------- input

/// One tensor of a mapped checkpoint.
pub struct SrcTensor {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Index into `MappedCheckpoint::files`.
    pub file: usize,
    /// Byte range within its memory-mapped file.
    pub start: usize,
    pub end: usize,
}

/// A checkpoint's weight files, memory-mapped, with every tensor listed in
/// file order then offset order (the order they were saved in).
pub struct MappedCheckpoint {
    pub files: Vec<(PathBuf, Mmap)>,
    pub tensors: Vec<SrcTensor>,
}

impl MappedCheckpoint {
    /// Map model.safetensors or the shards its index lists.
    pub fn open(dir: &Path) -> Result<MappedCheckpoint> {
        let mut src = MappedCheckpoint { files: Vec::new(), tensors: Vec::new() };
        let mut seen = HashMap::new();
        for path in super::checkpoint::weight_files(dir)? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: read-only input; a checkpoint rewritten while it is being read is not supported.
            let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
            let data_start = 8 + header_len;
            let mut here: Vec<SrcTensor> = meta
                .tensors()
                .into_iter()
                .map(|(n, info)| SrcTensor {
                    name: n,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    file: src.files.len(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                })
                .collect();
            here.sort_by_key(|t| t.start);
            for t in &here {
                if t.end > map.len() {
                    bail!("{}: tensor {} lies outside the file", path.display(), t.name);
                }
                if let Some(other) = seen.insert(t.name.clone(), name.clone()) {
                    bail!("{}: tensor {} is also in {other}", path.display(), t.name);
                }
            }
            src.tensors.extend(here);
            src.files.push((path, map));
        }
        Ok(src)
    }

    pub fn bytes(&self, t: &SrcTensor) -> &[u8] {
        &self.files[t.file].1[t.start..t.end]
    }

    /// The weight file holding `t`.
    pub fn path(&self, t: &SrcTensor) -> &Path {
        &self.files[t.file].0
    }

    /// Drop the mapped pages of part of a tensor already consumed, so the
    /// input does not stay resident next to the output.
    pub fn release(&self, t: &SrcTensor, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            use memmap2::UncheckedAdvice;
            // SAFETY: the map is read-only; released pages are re-read from the file if touched.
            unsafe {
                let _ = self.files[t.file].1.unchecked_advise_range(UncheckedAdvice::DontNeed, t.start + offset, len);
            }
        }
    }
}

// ---------------------------------------------------------------- output

/// Items per shard, in input order, starting a new shard when the next item
/// would pass `max` bytes (a larger item gets a shard of its own).
pub fn plan_shards<T>(items: Vec<T>, max: u64, bytes: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut shards: Vec<Vec<T>> = vec![Vec::new()];
    let mut size = 0u64;
    for t in items {
        let n = bytes(&t);
        if size > 0 && size + n > max {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("one shard at least").push(t);
    }
    shards
}

/// transformers' weight file names: model.safetensors, or numbered shards.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 { "model.safetensors".into() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) }
}

/// Where an output tensor goes in its shard's header.
pub struct ShardEntry<'a> {
    pub name: &'a str,
    pub dtype: StDtype,
    pub shape: &'a [usize],
    pub bytes: usize,
}

/// One safetensors file being written: the header first, then each
/// tensor's bytes in header order, streamed.
pub struct ShardWriter {
    path: PathBuf,
    w: BufWriter<File>,
    size: u64,
}

impl ShardWriter {
    /// Sort `tensors` into the layout the safetensors library gives (by
    /// dtype, widest first, then by name, so every tensor is aligned to its
    /// element size), create `path` and write the header (padded to 8
    /// bytes). The tensors' bytes must then be written in that order.
    pub fn create<T>(path: &Path, tensors: &mut [T], entry: impl Fn(&T) -> ShardEntry<'_>) -> Result<ShardWriter> {
        tensors.sort_by(|x, y| {
            let (x, y) = (entry(x), entry(y));
            y.dtype.cmp(&x.dtype).then_with(|| x.name.cmp(y.name))
        });
        let mut offset = 0;
        let infos: Vec<(String, TensorInfo)> = tensors
            .iter()
            .map(|t| {
                let e = entry(t);
                let info = TensorInfo { dtype: e.dtype, shape: e.shape.to_vec(), data_offsets: (offset, offset + e.bytes) };
                offset += e.bytes;
                (e.name.to_string(), info)
            })
            .collect();
        let meta = Metadata::new(Some(HashMap::from([("format".to_string(), "pt".to_string())])), infos)
            .map_err(|e| anyhow::anyhow!("{}: cannot build the safetensors header: {e}", path.display()))?;
        let mut header = serde_json::to_vec(&meta)?;
        header.resize(header.len().next_multiple_of(8), b' ');

        let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = ShardWriter { path: path.to_path_buf(), w: BufWriter::with_capacity(8 << 20, file), size: offset as u64 };
        w.write(&(header.len() as u64).to_le_bytes())?;
        w.write(&header)?;
        Ok(w)
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.w.write_all(data).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", self.path.display()))
    }

    /// Flush and sync the file; returns the bytes of tensor data it holds.
    pub fn finish(self) -> Result<u64> {
        let path = self.path;
        let file = self.w.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
        Ok(self.size)
    }
}

/// model.safetensors.index.json for a sharded checkpoint.
pub fn write_index(dir: &Path, metadata: serde_json::Value, weight_map: &BTreeMap<String, String>) -> Result<()> {
    let index = serde_json::json!({"metadata": metadata, "weight_map": weight_map});
    let mut text = serde_json::to_string_pretty(&index)?;
    text.push('\n');
    crate::util::atomic_write(&dir.join("model.safetensors.index.json"), text.as_bytes())
}

/// Write planned `shards` into `dir` under transformers' file names, each
/// by `write(path, shard)`, and the index when there are several (its
/// metadata made by `metadata(bytes written)`); `name` is a tensor's name
/// in the index. Returns the bytes of tensor data written.
pub fn write_shards<T>(
    dir: &Path,
    shards: Vec<Vec<T>>,
    name: impl Fn(&T) -> String,
    metadata: impl FnOnce(u64) -> serde_json::Value,
    mut write: impl FnMut(&Path, Vec<T>) -> Result<u64>,
) -> Result<u64> {
    let n = shards.len();
    let mut bytes = 0;
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = shard_name(i, n);
        for t in &shard {
            weight_map.insert(name(t), file.clone());
        }
        bytes += write(&dir.join(&file), shard)?;
    }
    if n > 1 {
        write_index(dir, metadata(bytes), &weight_map)?;
    }
    Ok(bytes)
}

/// Tokenizer, generation config and chat templates, when present.
pub fn copy_side_files(model_dir: &Path, tmp: &Path) -> Result<()> {
    let mut names: Vec<String> = SIDE_FILES.iter().map(|s| s.to_string()).collect();
    for e in std::fs::read_dir(model_dir).with_context(|| format!("cannot list {}", model_dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".jinja") {
            names.push(name);
        }
    }
    for name in names {
        let from = model_dir.join(&name);
        if from.is_file() {
            let data = std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
            crate::util::atomic_write(&tmp.join(&name), &data)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- directories

/// `p` made absolute with its symlinks resolved. Folders that do not exist
/// yet are allowed (a command creates them): the nearest existing ancestor
/// is resolved and the rest appended, so two spellings of one place compare
/// equal before it exists.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    let mut base = if p.as_os_str().is_empty() { Path::new(".") } else { p };
    let mut missing = Vec::new();
    while !base.exists() {
        // "x/.." or "/" have no name to append: nothing to stand on.
        let (Some(parent), Some(name)) = (base.parent(), base.file_name()) else {
            bail!("cannot resolve {}: none of its folders exists", p.display());
        };
        missing.push(name.to_os_string());
        base = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    }
    let mut abs = base.canonicalize().with_context(|| format!("cannot resolve {}", base.display()))?;
    abs.extend(missing.iter().rev());
    Ok(abs)
}

/// An output folder (`flag` as the user wrote it: "--out", "output_dir")
/// made absolute, refused when it is one of the `inputs` (each with how the
/// message names it, e.g. "the adapter's directory"); `product` names what
/// is written ("the merged model", "the run").
pub fn out_dir(flag: &str, out: &Path, inputs: &[(&Path, &str)], product: &str) -> Result<PathBuf> {
    let out_abs = absolute(out)?;
    for (dir, what) in inputs {
        if out_abs == absolute(dir)? {
            bail!("{flag} {} is {what}; write {product} to a new directory", out.display());
        }
    }
    Ok(out_abs)
}

/// Names as messages list them: the first `max`, then "and N more".
pub fn first_names(names: &[String], max: usize) -> String {
    match names.len() {
        n if n > max => format!("{} and {} more", names[..max].join(", "), n - max),
        _ => names.join(", "),
    }
}

/// What an existing output holds, unless it is absent or an empty
/// directory: "a file", or the names of its first entries. Every command
/// that writes a new folder (merge, quantize, synth) asks this before
/// writing; `shown` names the folder in errors.
pub fn occupied(out_abs: &Path, shown: &Path) -> Result<Option<String>> {
    if !out_abs.exists() {
        return Ok(None);
    }
    if !out_abs.is_dir() {
        return Ok(Some("a file".to_string()));
    }
    let mut names: Vec<String> = std::fs::read_dir(out_abs)
        .with_context(|| format!("cannot list {}", shown.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok((!names.is_empty()).then(|| first_names(&names, 4)))
}

/// A fresh temporary directory next to `out` (".<name>.<verb>-<pid>"),
/// where the output is assembled before it is moved into place; `build`
/// fills it, and it is removed when `build` fails.
pub fn in_temp_dir<R>(out: &Path, verb: &str, build: impl FnOnce(&Path) -> Result<R>) -> Result<R> {
    let name = out.file_name().expect("absolute() keeps the name").to_string_lossy().into_owned();
    let tmp = out.with_file_name(format!(".{name}.{verb}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove the stale {}", tmp.display()))?;
    }
    // create_dir_all: `out`'s parent may not exist yet (`absolute` allows that).
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = build(&tmp);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_resolves_folders_that_do_not_exist_yet() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().canonicalize().unwrap();
        assert_eq!(absolute(&tmp.path().join("a/b/c")).unwrap(), real.join("a/b/c"));
        // Two spellings of one place not yet made compare equal.
        std::fs::create_dir(tmp.path().join("x")).unwrap();
        assert_eq!(absolute(&tmp.path().join("x/../a/b")).unwrap(), real.join("a/b"));
        let input = tmp.path().join("model");
        std::fs::create_dir(&input).unwrap();
        let e = out_dir("output_dir", &input.join("../model"), &[(&input, "the base model's own directory")], "the run").unwrap_err();
        assert!(e.to_string().contains("is the base model's own directory; write the run to a new directory"), "{e}");
        assert_eq!(first_names(&["a".into(), "b".into(), "c".into()], 2), "a, b and 1 more");
    }
}
