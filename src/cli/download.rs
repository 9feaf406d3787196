//! `ferrotune download`: a Hub repository (or the files of it a model run
//! needs) into the shared Hugging Face cache; prints the snapshot folder.

use anyhow::Result;
use clap::Args;

use crate::hub::{self, Filter, Hub, RepoKind, RepoRef};

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// The repository id, e.g. Qwen/Qwen3-0.6B or trl-lib/tldr.
    pub repo_id: String,
    /// A branch, tag, `refs/pr/N` or commit hash (default: main).
    #[arg(long)]
    pub revision: Option<String>,
    /// Only files matching this pattern (repeatable; as huggingface_hub's
    /// allow_patterns: `*` also matches `/`, `dir/` means all under dir).
    /// Without it a model download takes what ferrotune reads (config,
    /// safetensors weights, tokenizer files), never *.bin or *.gguf.
    #[arg(long)]
    pub include: Vec<String>,
    /// Skip files matching this pattern (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// model or dataset.
    #[arg(long, default_value = "model")]
    pub repo_type: String,
}

pub fn run(a: DownloadArgs) -> Result<()> {
    let kind = RepoKind::parse(&a.repo_type)?;
    let repo = RepoRef::new(&a.repo_id, kind, a.revision.as_deref())?;
    let filter = match kind {
        RepoKind::Model => Filter::model(&a.include, &a.exclude)?,
        RepoKind::Dataset => Filter::new(&a.include, &a.exclude)?,
    };
    let hub = Hub::from_env();
    let dir = hub::download(&hub, &repo, &filter)?;
    println!("{}", dir.display());
    Ok(())
}
