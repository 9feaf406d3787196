//! The dataset `type:` vocabulary: the names a run config accepts for
//! supervised datasets and for the preference datasets of an `rl` run.
//!
//! The config validates `datasets[].type` against these tables and the
//! readers in `data` take their names from here, so a new dataset type is
//! named once, in this file, and then given its reader in `data`.

/// Supervised dataset types (an absent type means pre-tokenized rows).
pub const PLAIN_DATASET_TYPES: &[&str] = &["alpaca", "chat_template", "completion", "input_output"];

/// Preference dataset types: Axolotl's ChatML and Llama-3 strategies and
/// chat_template.default (an absent type means TRL's {prompt, chosen,
/// rejected} rows).
pub const PREFERENCE_DATASET_TYPES: &[&str] = &[
    "chatml.intel",
    "chatml.icr",
    "chatml.prompt_pairs",
    "chatml.argilla",
    "chatml.ultra",
    "chatml.argilla_chat",
    "llama3.intel",
    "llama3.icr",
    "llama3.prompt_pairs",
    "llama3.default",
    "llama3.ultra",
    "llama3.argilla_chat",
    "chat_template.default",
];

/// Whether `kind` is spelt as a preference type: in one of the families
/// ("chatml.", "llama3.", "chat_template.") of `PREFERENCE_DATASET_TYPES`,
/// known strategy or not, or "kto".
pub fn is_preference_spelling(kind: &str) -> bool {
    kind == "kto"
        || PREFERENCE_DATASET_TYPES
            .iter()
            .filter_map(|t| t.split_once('.'))
            .any(|(family, _)| kind.strip_prefix(family).is_some_and(|rest| rest.starts_with('.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_spellings_are_the_families_and_kto() {
        for kind in ["chatml.intel", "chatml.anything", "llama3.x", "chat_template.default", "chat_template.y", "kto"] {
            assert!(is_preference_spelling(kind), "{kind}");
        }
        for kind in ["chat_template", "chatml", "llama3", "alpaca", "chatmlx.intel", "zephyr.nectar", ""] {
            assert!(!is_preference_spelling(kind), "{kind}");
        }
    }
}
