//! Small shared helpers that know nothing of models or configs (atomic
//! file writes, the seedable RNG in `rng`); a new one goes here only if
//! every layer may use it.
pub mod rng;

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Write a file atomically: to a temporary sibling, fsync, then rename, so
/// a crash leaves either the old file or the new one, never half of one.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(data).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
