//! The dataset `type:` vocabulary: the names a run config accepts for
//! supervised datasets and for the preference datasets of an `rl` run, and
//! the `rl` values with the rows each one's datasets hold.
//!
//! The config validates `datasets[].type` and `rl` against these tables
//! and the readers in `data` take their names from here, so a new dataset
//! type is named once, in this file, and then given its reader in `data`;
//! a new `rl` value is one line of `RL_VALUES`, trained by the objective in
//! src/train/objectives/ that selects it.

/// What the rows of a run's datasets hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Token sequences with labels: a plain dataset type, or pre-tokenized.
    Sequences,
    /// Preference pairs: a preference type, or {prompt, chosen, rejected}.
    Pairs,
    /// Unpaired completions {prompt, completion, label}, no type.
    Labelled,
    /// A reward model's {prompt?, chosen, rejected, margin?} rows, no type.
    ScoredPairs,
    /// GRPO's prompts {prompt, other columns...}, no type.
    Prompts,
}

/// The `rl` values a run config accepts and the rows each one reads.
pub const RL_VALUES: &[(&str, Rows)] = &[
    ("dpo", Rows::Pairs),
    ("ipo", Rows::Pairs),
    ("orpo", Rows::Pairs),
    ("simpo", Rows::Pairs),
    ("kto", Rows::Labelled),
    ("grpo", Rows::Prompts),
    ("rloo", Rows::Prompts),
];

/// The names of `RL_VALUES`.
pub const RL_NAMES: [&str; RL_VALUES.len()] = {
    let mut names = [""; RL_VALUES.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = RL_VALUES[i].0;
        i += 1;
    }
    names
};

/// The rows a run reads: by its `rl` value (an unknown one is refused
/// before this is asked), a reward model's, or supervised sequences.
pub fn rows(rl: Option<&str>, reward_model: bool) -> Rows {
    if reward_model {
        return Rows::ScoredPairs;
    }
    rl.map_or(Rows::Sequences, |rl| RL_VALUES.iter().find(|(n, _)| *n == rl).map_or(Rows::Pairs, |&(_, r)| r))
}

/// "a, b or c": the `rl` values whose rows are `rows`.
pub fn rl_values_reading(rows: Rows) -> String {
    let names: Vec<&str> = RL_VALUES.iter().filter(|(_, r)| *r == rows).map(|(n, _)| *n).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

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
