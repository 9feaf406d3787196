//! What a checkpoint must share with the run that resumes it: the settings
//! that decide the data order, the optimisation and the adapter's shape,
//! recorded in trainer_state.json as key -> value so a refusal names what
//! changed. A new setting of that kind is added to `fingerprint`.
//! The run's length (num_epochs, max_steps) is not among them: extending a
//! finished run is allowed (`check_length`).

use super::plan::DataPlan;
use crate::adapter::LoraConfig;
use crate::config::RunConfig;
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::Path;

/// The settings as a JSON object of strings.
pub fn fingerprint(cfg: &RunConfig, plan: &DataPlan, lora: &LoraConfig, objective_settings: Option<String>) -> Value {
    let data = blake3::hash(&plan.lengths.iter().flat_map(|l| (*l as u64).to_le_bytes()).collect::<Vec<u8>>());
    // Values as their Rust display strings: exact, and stable through JSON.
    let entries: Vec<(&str, String)> = vec![
        ("training examples (lengths hash)", data.to_hex().to_string()),
        ("micro_batch_size", cfg.micro_batch_size.to_string()),
        ("gradient_accumulation_steps", cfg.gradient_accumulation_steps.to_string()),
        ("sample_packing", cfg.sample_packing.to_string()),
        ("sequence_len", cfg.sequence_len.to_string()),
        ("shuffle_merged_datasets", cfg.shuffle_merged_datasets.to_string()),
        ("seed", cfg.seed.to_string()),
        ("learning_rate", cfg.learning_rate.to_string()),
        ("lr_scheduler", cfg.lr_scheduler.clone()),
        ("adam_beta1", cfg.adam_beta1.to_string()),
        ("adam_beta2", cfg.adam_beta2.to_string()),
        ("adam_epsilon", cfg.adam_epsilon.to_string()),
        ("weight_decay", cfg.weight_decay.to_string()),
        ("max_grad_norm", cfg.max_grad_norm.to_string()),
        ("lora_r", lora.r.to_string()),
        ("lora_alpha", lora.alpha.to_string()),
        ("lora_dropout", lora.dropout.to_string()),
        // The adapter's modules and scales: a checkpoint's adapter loaded
        // into other modules would train something the config does not say.
        ("lora_target_modules", lora.targets.to_string()),
        ("peft_use_rslora", lora.use_rslora.to_string()),
        ("rank_pattern", format!("{:?}", lora.rank_pattern)),
        ("alpha_pattern", format!("{:?}", lora.alpha_pattern)),
        // The objective: a policy trained for one cannot continue as another.
        ("rl", format!("{:?}", cfg.rl)),
        ("reward_model", cfg.reward_model.to_string()),
        // As `Option`'s Debug spells it, so older checkpoints compare equal.
        ("objective settings", objective_settings.map_or("None".to_string(), |s| format!("Some({s})"))),
    ];
    Value::Object(entries.into_iter().map(|(k, v)| (k.to_string(), Value::String(v))).collect())
}

/// The settings that differ, each as "key (checkpoint: old, now: new)".
/// Only the keys the checkpoint recorded are compared: one saved before a
/// key was added to `fingerprint` was not fingerprinted on it.
pub fn diff(saved: &str, now: &Value) -> Vec<String> {
    let saved: Value = serde_json::from_str(saved).unwrap_or(Value::Null);
    // No object at all (unreadable): every key is reported, as absent.
    let recorded = |k: &str| saved.as_object().is_none_or(|o| o.contains_key(k));
    now.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| recorded(k) && saved.get(k.as_str()) != Some(v))
        .map(|(k, v)| {
            let was = saved.get(k.as_str()).and_then(|x| x.as_str()).unwrap_or("absent");
            format!("{k} (checkpoint: {was}, now: {})", v.as_str().unwrap_or_default())
        })
        .collect()
}

/// A resume must have steps left to take. A longer run than the
/// checkpoint's is allowed (HF Trainer allows it too): the schedule then
/// follows the new total, as if the run had been planned that long.
pub fn check_length(cfg: &RunConfig, dir: &Path, at_step: usize, saved_total: usize, total: usize) -> Result<()> {
    let length = match cfg.max_steps {
        Some(m) => format!("max_steps {m}"),
        None => format!("num_epochs {}", cfg.num_epochs),
    };
    if at_step >= total {
        let what = if at_step == saved_total && saved_total == total { "the run there is finished" } else { "nothing is left to train" };
        bail!(
            "cannot resume from {}: it is at step {at_step}, and this run has {total} steps in all ({length}): {what}; \
             raise max_steps or num_epochs to train further",
            dir.display()
        );
    }
    if total != saved_total {
        eprintln!(
            "resume: this run has {total} steps in all ({length}), the checkpoint's run had {saved_total}; \
             the learning-rate schedule follows the new total"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_a_checkpoint_did_not_record_are_not_compared() {
        let now = json!({"learning_rate": "0.0002", "seed": "42", "lora_target_modules": "q_proj, v_proj", "peft_use_rslora": "false"});
        // Saved before lora_target_modules and peft_use_rslora were fingerprinted.
        let older = r#"{"learning_rate": "0.0002", "seed": "42"}"#;
        assert_eq!(diff(older, &now), Vec::<String>::new());
        let older_changed = r#"{"learning_rate": "0.001", "seed": "42"}"#;
        assert_eq!(diff(older_changed, &now), ["learning_rate (checkpoint: 0.001, now: 0.0002)"]);
        // A recorded key that changed is still named.
        let newer = r#"{"learning_rate": "0.0002", "seed": "42", "lora_target_modules": "all-linear", "peft_use_rslora": "false"}"#;
        assert_eq!(diff(newer, &now), ["lora_target_modules (checkpoint: all-linear, now: q_proj, v_proj)"]);
    }
}
