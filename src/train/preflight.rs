//! Checks of a run against its checkpoint's config.json that need neither
//! weights nor data. They run before anything heavy is loaded, so that a
//! mistake costs a second, not a dataset tokenization and a model load.
//! A new check of that kind goes here.

use crate::adapter::Targets;
use crate::config::RunConfig;
use crate::model::config::ModelConfig;
use anyhow::{Result, bail};
use std::path::Path;

/// Refuse what cannot work; return one line for each thing the user should
/// know but that does not stop the run. `targets` is None when the adapter
/// comes from lora_model_dir (its own target list was checked when saved).
pub fn check(cfg: &RunConfig, model: &ModelConfig, targets: Option<&Targets>, output_dir: &Path) -> Result<Vec<String>> {
    writable(output_dir)?;
    if let Some(t) = targets {
        crate::model::count_targets(model, t)?;
    }
    let mut warnings = Vec::new();
    if let Some(max) = model.max_position_embeddings
        && cfg.sequence_len > max
    {
        warnings.push(format!(
            "sequence_len {} is above the model's max_position_embeddings {max} (config.json): positions past {max} \
             were never trained and quality falls off there; rows are still cut at sequence_len",
            cfg.sequence_len
        ));
    }
    Ok(warnings)
}

/// output_dir exists (or can be made) and takes a file, tried with a probe
/// file that is removed at once.
fn writable(dir: &Path) -> Result<()> {
    let shown = dir.display();
    if dir.is_file() {
        bail!("output_dir {shown} is a file; give a folder for the adapter and checkpoints");
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        bail!("output_dir {shown} cannot be created: {e}; pick a folder you can write to");
    }
    let probe = dir.join(".ferrotune-write-probe");
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bail!("output_dir {shown} is not writable: {e}; pick a folder you can write to"),
    }
}
