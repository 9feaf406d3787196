//! The output directory of a merge: refused when it would overwrite an
//! input or someone's files, given the base's config.json (its dtype and
//! quantization entries updated), and moved into place once complete.

use super::INFO_FILE;
use super::torch_name;
use crate::backend::DType;
use crate::model::st_files;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Refuse outputs that would overwrite an input or someone's files.
pub(super) fn check_out(model_dir: &Path, adapter_dir: &Path, out: &Path, force: bool) -> Result<PathBuf> {
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
pub(super) fn write_config(model_dir: &Path, tmp: &Path, dtype: Option<DType>, dequantized: bool) -> Result<()> {
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
pub(super) fn install(tmp: &Path, out: &Path) -> Result<()> {
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
