//! The run config's claims about the checkpoint, checked against its files
//! before any weight is read: `model_type` against config.json's
//! `architectures[0]`, `tokenizer_type` against tokenizer_config.json's
//! `tokenizer_class`, and `tokenizer_config` (a tokenizer directory) for
//! its tokenizer.json.
//!
//! Axolotl hands these names to transformers' loaders; ferrotune reads the
//! architecture and tokenizer from the files, so a name that disagrees with
//! them means the config was written for another model. A new check of
//! this kind (a config key that names something in the checkpoint) goes
//! here and runs from `check_checkpoint`.

use super::RunConfig;
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Tokenizer classes that load any tokenizer.json: naming one claims
/// nothing, and a checkpoint that records one says nothing to compare.
const GENERIC_TOKENIZERS: &[&str] = &["PreTrainedTokenizerFast", "PreTrainedTokenizer", "TokenizersBackend"];

/// Check model_type, tokenizer_type and tokenizer_config against the
/// checkpoint in `model_dir` (a match is silent). Returns the directory
/// the tokenizer is read from.
pub fn check_checkpoint(cfg: &RunConfig, model_dir: &Path) -> Result<PathBuf> {
    let tokenizer_dir = match &cfg.tokenizer_config {
        Some(dir) => {
            let path = PathBuf::from(dir);
            if !path.is_dir() {
                bail!("tokenizer_config: {dir} is not a directory (it must name a local directory holding tokenizer.json; hub ids are not downloaded)");
            }
            if !path.join("tokenizer.json").is_file() {
                bail!(
                    "tokenizer_config: {dir} has no tokenizer.json (ferrotune reads fast tokenizers only: save one with \
                     tokenizer.save_pretrained, or remove tokenizer_config to use the model's own)"
                );
            }
            path
        }
        None => model_dir.to_path_buf(),
    };
    if let Some(wanted) = cfg.model_type.as_deref().filter(|t| !t.starts_with("Auto")) {
        let file = model_dir.join("config.json");
        let arch = read_json(&file).and_then(|j| j.get("architectures")?.get(0)?.as_str().map(str::to_string));
        if let Some(arch) = arch
            && arch != wanted
        {
            bail!(
                "model_type: {wanted} does not match the checkpoint: {} has architectures[0] {arch} \
                 (write model_type: {arch}, or AutoModelForCausalLM, or remove model_type)",
                file.display()
            );
        }
    }
    if let Some(wanted) = cfg.tokenizer_type.as_deref().filter(|t| !t.starts_with("Auto") && !GENERIC_TOKENIZERS.contains(t)) {
        let file = tokenizer_dir.join("tokenizer_config.json");
        let class = read_json(&file).and_then(|j| j.get("tokenizer_class")?.as_str().map(str::to_string));
        if let Some(class) = class
            && !GENERIC_TOKENIZERS.contains(&class.as_str())
            && without_fast(&class) != without_fast(wanted)
        {
            bail!(
                "tokenizer_type: {wanted} does not match the tokenizer: {} has tokenizer_class {class} \
                 (write tokenizer_type: {class}, or AutoTokenizer, or remove tokenizer_type)",
                file.display()
            );
        }
    }
    Ok(tokenizer_dir)
}

/// A JSON file's contents; None when it is missing or unreadable (opening
/// the checkpoint reports that with its own message).
fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// LlamaTokenizerFast and LlamaTokenizer are the same tokenizer.
fn without_fast(class: &str) -> &str {
    class.strip_suffix("Fast").unwrap_or(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(arch: &str, tokenizer_class: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), format!(r#"{{"architectures": ["{arch}"]}}"#)).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), format!(r#"{{"tokenizer_class": "{tokenizer_class}"}}"#))
            .unwrap();
        dir
    }

    fn check(dir: &Path, model_type: Option<&str>, tokenizer_type: Option<&str>) -> Result<PathBuf> {
        let cfg = RunConfig {
            model_type: model_type.map(str::to_string),
            tokenizer_type: tokenizer_type.map(str::to_string),
            ..RunConfig::default()
        };
        check_checkpoint(&cfg, dir)
    }

    #[test]
    fn matching_names_pass_silently() {
        let d = checkpoint("MistralForCausalLM", "LlamaTokenizerFast");
        for (m, t) in [
            (Some("MistralForCausalLM"), Some("LlamaTokenizer")),
            (Some("AutoModelForCausalLM"), Some("LlamaTokenizerFast")),
            (None, Some("AutoTokenizer")),
            (None, Some("PreTrainedTokenizerFast")),
            (None, None),
        ] {
            assert_eq!(check(d.path(), m, t).unwrap(), d.path());
        }
        // A checkpoint that records only the generic class cannot contradict a specific name.
        let generic = checkpoint("LlamaForCausalLM", "TokenizersBackend");
        check(generic.path(), None, Some("Qwen2TokenizerFast")).unwrap();
    }

    #[test]
    fn mismatches_name_both_sides() {
        let d = checkpoint("MistralForCausalLM", "LlamaTokenizerFast");
        let e = check(d.path(), Some("LlamaForCausalLM"), None).unwrap_err().to_string();
        assert!(e.starts_with("model_type: LlamaForCausalLM does not match the checkpoint: "), "{e}");
        assert!(e.contains("config.json has architectures[0] MistralForCausalLM"), "{e}");
        let e = check(d.path(), None, Some("Qwen2Tokenizer")).unwrap_err().to_string();
        assert!(e.starts_with("tokenizer_type: Qwen2Tokenizer does not match the tokenizer: "), "{e}");
        assert!(e.contains("tokenizer_config.json has tokenizer_class LlamaTokenizerFast"), "{e}");
    }
}
