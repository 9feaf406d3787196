//! What a model or an adapter repo must give ferrotune, and which of its
//! files to fetch: the default model filter, narrowed to the weight files
//! the checkpoint actually uses (the shards its index names, or
//! model.safetensors), so a repo that also carries consolidated or
//! per-framework copies is not downloaded twice.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{Filter, Hub, HubError, RepoKind, RepoRef};

const INDEX: &str = "model.safetensors.index.json";

/// The adapter files (PEFT's) and what generation beside it may read.
const ADAPTER_FILES: &[&str] = &[
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "README.md",
];

/// A model repo's snapshot folder, downloading what ferrotune reads.
pub fn model_dir(hub: &Hub, id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo = RepoRef::new(id, RepoKind::Model, revision)?;
    let remote = hub.open(&repo)?;
    require(&remote, "config.json")?;
    let listed = remote.select(&Filter::model(&[], &[])?);
    let shards = if remote.has(INDEX) {
        remote.fetch(&[INDEX.to_string()])?;
        let index = remote.dir().join(INDEX);
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} ({repo}) is not valid JSON", index.display()))?;
        let shards: BTreeSet<String> = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} ({repo}) has no weight_map", index.display()))?
            .values()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        Some(shards)
    } else {
        None
    };
    let mut files = model_files(listed, shards.as_ref());
    // A shard the index names but the repo lacks is an error naming it
    // (fetch reports it), not a load failure later.
    for shard in shards.iter().flatten() {
        if !files.contains(shard) {
            files.push(shard.clone());
        }
    }
    remote.fetch(&files)?;
    Ok(remote.dir())
}

/// Of the files the default filter kept, the ones a model download takes:
/// weights narrowed to the index's shards, or to model.safetensors.
fn model_files(mut files: Vec<String>, shards: Option<&BTreeSet<String>>) -> Vec<String> {
    if let Some(shards) = shards {
        files.retain(|f| !is_weights(f) || shards.contains(f));
    } else if files.iter().any(|f| f == "model.safetensors") {
        files.retain(|f| !is_weights(f) || f == "model.safetensors");
    }
    files
}

/// An adapter repo's snapshot folder (adapter_config.json and weights).
pub fn adapter_dir(hub: &Hub, id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo = RepoRef::new(id, RepoKind::Model, revision)?;
    let remote = hub.open(&repo)?;
    require(&remote, "adapter_config.json")?;
    let allow: Vec<String> = ADAPTER_FILES.iter().map(|s| s.to_string()).collect();
    remote.fetch(&remote.select(&Filter::new(&allow, &[])?))?;
    Ok(remote.dir())
}

/// Model weights other than an adapter's.
fn is_weights(f: &str) -> bool {
    f.ends_with(".safetensors") && !f.ends_with("adapter_model.safetensors")
}

fn require(remote: &super::Remote<'_>, file: &str) -> Result<(), HubError> {
    if remote.files.is_some() && !remote.has(file) {
        return Err(HubError::EntryNotFound { repo: remote.repo.to_string(), revision: remote.repo.revision.clone(), file: file.to_string() });
    }
    if remote.cached_because.is_some() && !remote.cache.has(&remote.commit, file) {
        return Err(remote.not_cached(file));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default filter plus the weight narrowing, on repo listings shaped
    /// like the Hub's (file names as those repos publish them).
    fn take(listing: &[&str], shards: Option<&[&str]>) -> Vec<String> {
        let filter = Filter::model(&[], &[]).unwrap();
        let kept: Vec<String> = listing.iter().map(|s| s.to_string()).filter(|f| filter.matches(f)).collect();
        let shards: Option<BTreeSet<String>> = shards.map(|s| s.iter().map(|x| x.to_string()).collect());
        model_files(kept, shards.as_ref())
    }

    #[test]
    fn real_repo_shapes_take_what_the_checkpoint_uses() {
        // Llama 3.x: sharded safetensors, plus the original/ consolidated weights.
        let llama = [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model", "special_tokens_map.json",
            "tokenizer.json", "tokenizer_config.json"];
        let got = take(&llama, Some(&["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]));
        assert_eq!(got, [".gitattributes", "README.md", "config.json", "generation_config.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]);
        // Mistral: a consolidated copy of the same weights beside the shards.
        let mistral = ["config.json", "consolidated.safetensors", "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json",
            "params.json", "tekken.json", "tokenizer.json", "tokenizer_config.json"];
        let got = take(&mistral, Some(&["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]));
        assert!(!got.iter().any(|f| f == "consolidated.safetensors" || f == "params.json"), "{got:?}");
        assert_eq!(got.iter().filter(|f| f.ends_with(".safetensors")).count(), 3);
        // A bitsandbytes 4-bit repo: one model.safetensors; its quantization is in config.json.
        let bnb = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"];
        assert_eq!(take(&bnb, None), bnb);
        // Multimodal Gemma 3: the whole checkpoint (text and vision weights) and its processor files.
        let gemma3 = ["added_tokens.json", "chat_template.json", "config.json", "generation_config.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "preprocessor_config.json", "processor_config.json", "special_tokens_map.json", "tokenizer.json",
            "tokenizer.model", "tokenizer_config.json"];
        assert_eq!(take(&gemma3, Some(&["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])), gemma3);
        // A GGUF-only or pickle-only file never comes by default.
        let mixed = ["config.json", "pytorch_model.bin", "model.Q4_K_M.gguf", "model.safetensors", "onnx/model.onnx", "tokenizer.json"];
        assert_eq!(take(&mixed, None), ["config.json", "model.safetensors", "tokenizer.json"]);
    }
}
