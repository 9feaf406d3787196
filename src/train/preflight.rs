//! Checks of a run against its checkpoint's config.json that need neither
//! weights nor data. They run before anything heavy is loaded, so that a
//! mistake costs a second, not a dataset tokenization and a model load.
//! A new check of that kind goes here.

use crate::adapter::Targets;
use crate::config::RunConfig;
use crate::model::hparams::ModelConfig;
use anyhow::Result;

/// Refuse what cannot work; return one line for each thing the user should
/// know but that does not stop the run. `targets` is None when the adapter
/// comes from lora_model_dir (its own target list was checked when saved).
pub fn check(cfg: &RunConfig, model: &ModelConfig, targets: Option<&Targets>) -> Result<Vec<String>> {
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
