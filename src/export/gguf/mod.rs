//! GGUF export for llama.cpp, Ollama and LM Studio, written natively: the
//! file llama.cpp's convert_hf_to_gguf.py writes for the same HF folder,
//! then, for the k-quant outtypes, the file llama-quantize writes from it;
//! or an adapter alone as convert_lora_to_gguf.py writes it.
//!
//! Files, in the order the data flows:
//! - `types`: ggml tensor types and metadata values; `file`: the container;
//! - `arch`: llama.cpp's name, hyper-parameters and tensor names of each
//!   architecture (the one place a new architecture is added);
//! - `metadata`: the general.* keys; `vocab`, `spm`: the tokenizer;
//! - `quants`: the block quantizers, bit-exact with ggml's reference ones;
//!   `rules`: llama-quantize's per-tensor type choice for each file type;
//! - `convert`: a model folder to a file; `lora`: an adapter to a file;
//! - `modelfile`: the Ollama Modelfile written beside the file.
//!
//! This file runs an export: resolve the inputs, merge an adapter first
//! when one is given (as PEFT's merge_and_unload), write, add the Modelfile.

pub mod arch;
pub mod convert;
pub mod file;
pub mod lora;
pub mod metadata;
pub mod modelfile;
pub mod quants;
pub mod rules;
pub mod special;
pub mod spm;
pub mod types;
pub mod vocab;

pub use convert::{ConvertOptions, OutType, Summary};

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// One export, as the command line or a run's `gguf:` key asks for it.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    pub model_dir: PathBuf,
    pub adapter_dir: Option<PathBuf>,
    pub outtype: OutType,
    pub out: PathBuf,
    /// Write the adapter alone (llama.cpp's LoRA GGUF).
    pub lora_only: bool,
    pub modelfile: bool,
    pub options: ConvertOptions,
    /// The adapter was trained with load_in_4bit on this dense base: merge
    /// into the NF4 round trip of its projections, as `merge` does.
    pub nf4_round_trip: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    pub bytes: u64,
    pub lines: Vec<String>,
}

/// Check what can be checked before any work: the output's folder and
/// extension, and that a LoRA-only export has an adapter.
pub fn check_request(req: &ExportRequest) -> Result<()> {
    if req.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        bail!("--out {}: the file name must end in .gguf", req.out.display());
    }
    let parent = req.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--out {}: folder {} does not exist", req.out.display(), parent.display());
    }
    if req.out.is_dir() {
        bail!("--out {}: is a folder; give a file name ending in .gguf", req.out.display());
    }
    if req.lora_only && req.adapter_dir.is_none() {
        bail!("--lora-only needs --adapter");
    }
    Ok(())
}

/// What can fail in an export, checked before a run trains for hours: the
/// architecture and the tokenizer (its fingerprint above all).
pub fn preflight(model_dir: &Path, options: &ConvertOptions) -> Result<()> {
    let hp = arch::Hparams::load(model_dir)?;
    vocab::vocab(model_dir, hp.arch.name(), &serde_json::Value::Object(hp.map.clone()), &vocab::VocabOptions { pre: options.tokenizer_pre.clone() })?;
    Ok(())
}

pub fn export(req: &ExportRequest, progress: &mut dyn FnMut(u64, u64)) -> Result<ExportReport> {
    check_request(req)?;
    crate::train::interrupt::install()?;
    let mut lines = Vec::new();
    if req.lora_only {
        let adapter = req.adapter_dir.as_deref().expect("checked");
        let s = lora::convert_lora(&req.model_dir, adapter, &req.out, req.outtype)?;
        lines.push(format!("wrote {} ({} LoRA pairs, alpha {}, {:.1} MB)", req.out.display(), s.pairs, s.alpha, s.bytes as f64 / 1e6));
        if let Some(f) = s.folded {
            lines.push(format!("note: {f} (llama.cpp scales each pair by alpha / r)"));
        }
        return Ok(ExportReport { out: req.out.clone(), bytes: s.bytes, lines });
    }
    let summary = match &req.adapter_dir {
        None => convert::convert(&req.model_dir, &req.out, req.outtype, &req.options, progress)?,
        Some(adapter) => {
            // The merged checkpoint goes to a temporary folder beside the
            // output, named as the base model so that general.name is the base's.
            let parent = req.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let tmp = TempDir(parent.join(format!(".ferrotune-gguf-merge-{}", std::process::id())));
            let _ = std::fs::remove_dir_all(&tmp.0);
            std::fs::create_dir(&tmp.0).with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
            let base_name = req.model_dir.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "model".into());
            let merged = tmp.0.join(base_name);
            let opts = crate::adapter::merge::MergeOptions { nf4_round_trip: req.nf4_round_trip, ..Default::default() };
            let m = crate::adapter::merge::merge(&req.model_dir, adapter, &merged, &opts, &mut |_, _| {})?;
            lines.push(format!("merged {} LoRA modules of {} into the base before export", m.merged, adapter.display()));
            convert::convert(&merged, &req.out, req.outtype, &req.options, progress)?
        }
    };
    let types: Vec<String> = summary.types.iter().map(|(t, n)| format!("{} {}", n, t.name())).collect();
    lines.push(format!(
        "wrote {} ({}, file type {}, {} tensors: {}, {:.1} MB)",
        req.out.display(),
        summary.arch,
        summary.file_type,
        summary.tensors,
        types.join(", "),
        summary.bytes as f64 / 1e6
    ));
    if req.modelfile {
        // A trained adapter's folder carries the template it was trained with.
        let dirs: Vec<&Path> = req.adapter_dir.iter().map(PathBuf::as_path).chain([req.model_dir.as_path()]).collect();
        lines.push(write_modelfile(&dirs, &req.out)?);
    }
    Ok(ExportReport { out: req.out.clone(), bytes: summary.bytes, lines })
}

/// A folder removed when dropped (the merged checkpoint of an export).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Ollama Modelfile beside the GGUF, when the chat format is one
/// Ollama can be given a template for; the line that says what happened.
fn write_modelfile(dirs: &[&Path], gguf: &Path) -> Result<String> {
    use crate::data::chat_template::ChatTemplate;
    let dir = dirs.iter().find(|d| ChatTemplate::tokenizer_has_one(d).unwrap_or(false)).copied().unwrap_or(dirs[dirs.len() - 1]);
    let template = ChatTemplate::resolve(None, None, dir).ok().map(|t| t.source().to_string());
    let tc = crate::model::checkpoint::load_tokenizer_config(dir).ok().flatten();
    let eos = tc.as_ref().and_then(|c| c.get("eos_token")).and_then(|v| v.as_str().or_else(|| v.get("content").and_then(|c| c.as_str()))).map(str::to_string);
    let name = gguf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match modelfile::modelfile(&name, template.as_deref(), eos.as_deref()) {
        Some(m) => {
            let path = gguf.with_file_name("Modelfile");
            crate::util::atomic_write(&path, m.text.as_bytes())?;
            Ok(format!("wrote {} ({} chat format): ollama create NAME -f {}", path.display(), m.family, path.display()))
        }
        None => Ok(match template {
            None => "no Modelfile: the model has no chat template".to_string(),
            Some(_) => "no Modelfile: the chat template is not one of the formats Ollama is given a template for (Llama 3, ChatML/Qwen, Gemma, Phi-3, Mistral)".to_string(),
        }),
    }
}
