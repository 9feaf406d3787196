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
    let mut files = remote.select(&Filter::model(&[], &[])?);
    if remote.has(INDEX) {
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
        files.retain(|f| !is_weights(f) || shards.contains(f));
    } else if remote.has("model.safetensors") {
        files.retain(|f| !is_weights(f) || f == "model.safetensors");
    }
    remote.fetch(&files)?;
    Ok(remote.dir())
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
    if remote.files.is_none() && !remote.has(file) {
        let env = remote_env(remote);
        return Err(HubError::Offline { repo: remote.repo.id.clone(), revision: remote.repo.revision.clone(), cache: env, file: Some(file.to_string()) });
    }
    Ok(())
}

fn remote_env(remote: &super::Remote<'_>) -> PathBuf {
    remote.cache.root.clone()
}
