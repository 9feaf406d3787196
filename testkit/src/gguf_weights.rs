//! Regenerates the safetensors checkpoints of the GGUF export fixtures
//! (tests/fixtures/gguf/models/<case>/{model,adapter}/manifest.json).
//!
//! Those checkpoints are too big to commit, so every weight is a pure
//! function of its tensor name and element index ([`value`]); the manifest
//! lists each tensor (name, shape, dtype, formula parameters, file) in the
//! order the saved files hold them, the files' metadata, sizes and sha256,
//! and the shard index text when there is one. [`write_checkpoint`] writes
//! the same files byte for byte and checks them against those hashes, so a
//! test that exports from the written folder starts from exactly the bytes
//! the reference tools converted.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// FNV-1a 64 of the name's UTF-8 bytes.
fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `index` (row-major) of tensor `name`:
/// `center + (u - 0.5) * scale` in f32, with `u` = the top 24 bits of
/// splitmix64(fnv1a64(name) ^ index) / 2^24 (exact in f32).
pub fn value(name: &str, index: u64, center: f32, scale: f32) -> f32 {
    value_with_hash(fnv1a64(name), index, center, scale)
}

fn value_with_hash(h: u64, index: u64, center: f32, scale: f32) -> f32 {
    let u = (splitmix64(h ^ index) >> 40) as f32 / 16_777_216.0;
    center + (u - 0.5) * scale
}

/// All `n` values of tensor `name`, in f32 (before the checkpoint dtype).
pub fn generate(name: &str, n: usize, center: f32, scale: f32) -> Vec<f32> {
    let h = fnv1a64(name);
    (0..n as u64).map(|i| value_with_hash(h, i, center, scale)).collect()
}

/// One manifest entry.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub center: f32,
    pub scale: f32,
    pub file: String,
}

impl TensorSpec {
    /// The tensor's bytes in its checkpoint dtype (round-to-nearest-even
    /// from the f32 values, as torch casts).
    pub fn bytes(&self) -> Vec<u8> {
        let vals = generate(&self.name, self.shape.iter().product(), self.center, self.scale);
        match self.dtype {
            Dtype::BF16 => vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            Dtype::F16 => vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            _ => vals.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        }
    }
}

/// One saved safetensors file of a manifest.
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub file: String,
    /// The header's `__metadata__`.
    pub metadata: Option<HashMap<String, String>>,
    pub size: u64,
    pub sha256: String,
}

/// A parsed manifest.json.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub tensors: Vec<TensorSpec>,
    /// The files in order.
    pub files: Vec<FileSpec>,
    /// model.safetensors.index.json text, for sharded checkpoints.
    pub index: Option<String>,
    /// (tensor name, element index, f32 bits) the generating script printed.
    pub probes: Vec<(String, u64, u32)>,
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> Result<&'a Value> {
    v.get(key).with_context(|| format!("{what}: missing key `{key}`"))
}

fn str_of(v: &Value, key: &str, what: &str) -> Result<String> {
    field(v, key, what)?.as_str().map(str::to_owned).with_context(|| format!("{what}: `{key}` is not a string"))
}

fn num_of(v: &Value, key: &str, what: &str) -> Result<f64> {
    field(v, key, what)?.as_f64().with_context(|| format!("{what}: `{key}` is not a number"))
}

/// Reads and checks a manifest.json.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let root: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let what = path.display().to_string();
    let mut tensors = Vec::new();
    for t in field(&root, "tensors", &what)?.as_array().with_context(|| format!("{what}: `tensors` is not a list"))? {
        let name = str_of(t, "name", &what)?;
        let at = format!("{what}: tensor {name}");
        let shape = field(t, "shape", &at)?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
            .with_context(|| format!("{at}: `shape` is not a list of sizes"))?;
        let dtype = match str_of(t, "dtype", &at)?.as_str() {
            "BF16" => Dtype::BF16,
            "F16" => Dtype::F16,
            "F32" => Dtype::F32,
            other => bail!("{at}: dtype {other:?}, expected BF16, F16 or F32"),
        };
        let (center, scale) = (num_of(t, "center", &at)? as f32, num_of(t, "scale", &at)? as f32);
        tensors.push(TensorSpec { name, shape, dtype, center, scale, file: str_of(t, "file", &at)? });
    }
    let mut files = Vec::new();
    for f in field(&root, "files", &what)?.as_array().with_context(|| format!("{what}: `files` is not a list"))? {
        let name = str_of(f, "file", &what)?;
        let meta = match f.get("metadata") {
            None | Some(Value::Null) => None,
            Some(m) => Some(
                serde_json::from_value::<HashMap<String, String>>(m.clone())
                    .with_context(|| format!("{what}: {name}: metadata is not a string map"))?,
            ),
        };
        let size = field(f, "size", &what)?.as_u64().with_context(|| format!("{what}: {name}: bad size"))?;
        let sha256 = str_of(f, "sha256", &what)?;
        files.push(FileSpec { file: name, metadata: meta, size, sha256 });
    }
    let index = root.get("index").and_then(Value::as_str).map(str::to_owned);
    let mut probes = Vec::new();
    for p in root.get("probe").and_then(Value::as_array).into_iter().flatten() {
        let p = p.as_array().filter(|p| p.len() == 3).with_context(|| format!("{what}: probe is not [name, index, bits]"))?;
        let (Some(n), Some(i), Some(b)) = (p[0].as_str(), p[1].as_u64(), p[2].as_u64()) else {
            bail!("{what}: probe {p:?} is not [name, index, bits]");
        };
        probes.push((n.to_owned(), i, b as u32));
    }
    Ok(Manifest { tensors, files, index, probes })
}

/// Lower-case hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the checkpoint the manifest describes into `out_dir` (created if
/// needed): every safetensors file, plus model.safetensors.index.json when
/// the manifest carries one. Errors if a written file's size or sha256
/// differs from the manifest's.
pub fn write_checkpoint(manifest_path: &Path, out_dir: &Path) -> Result<()> {
    let m = read_manifest(manifest_path)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for FileSpec { file, metadata, size, sha256: sha } in &m.files {
        let specs: Vec<&TensorSpec> = m.tensors.iter().filter(|t| &t.file == file).collect();
        let data: Vec<Vec<u8>> = specs.iter().map(|t| t.bytes()).collect();
        let views = specs
            .iter()
            .zip(&data)
            .map(|(t, d)| Ok((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), d)?)))
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, metadata.clone())
            .with_context(|| format!("{}: serializing {file}", manifest_path.display()))?;
        let got = sha256_hex(&bytes);
        if bytes.len() as u64 != *size || got != *sha {
            bail!(
                "{}: regenerated {file} is {} bytes, sha256 {got}; the manifest expects {size} bytes, sha256 {sha}",
                manifest_path.display(),
                bytes.len()
            );
        }
        let path = out_dir.join(file);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(index) = &m.index {
        let path = out_dir.join("model.safetensors.index.json");
        std::fs::write(&path, index).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
