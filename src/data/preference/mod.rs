//! Preference datasets into token ids, as TRL tokenizes them after
//! Axolotl's formatting.
//!
//! A pair is held as TRL holds it: `prompt`, `chosen` and `rejected` ids,
//! the two completions sharing the prompt; the sequences the model sees are
//! prompt + chosen and prompt + rejected, scored on the completion only
//! (`PreferencePair::sequences` gives them with the prompt's labels -100).
//!
//! Tokenization is TRL's: a text row's completions get the tokenizer's EOS
//! string appended unless they already end with it; the prompt and
//! prompt + completion are tokenized whole, with special tokens (the BOS a
//! Llama tokenizer adds); the completion is what follows the longest common
//! prefix of the prompt's ids and both prompt + completion ids. A
//! conversational row (message lists) is rendered by the chat template
//! instead — the prompt with the generation prompt, prompt + completion
//! without — and tokenized without special tokens.
//!
//! Formats (`type:`):
//! - none: TRL's {prompt, chosen, rejected}, strings or message lists; with
//!   no prompt, the shared start of chosen and rejected is the prompt.
//! - chatml.intel {system?, question, chosen, rejected}, chatml.icr
//!   {system?, input, ...}, chatml.prompt_pairs {system?, prompt, ...},
//!   chatml.argilla {system?, instruction (or prompt, input, question),
//!   chosen_response, rejected_response (or chosen, rejected)},
//!   chatml.ultra {system?, prompt, chosen: [msgs], rejected: [msgs]} (the
//!   reply is message 1), chatml.argilla_chat {chosen: [user, assistant],
//!   rejected: [...]}: Axolotl's ChatML strings, then TRL's text path.
//! - llama3.intel, .icr, .prompt_pairs, .ultra, .argilla_chat, and
//!   llama3.default (chatml.argilla's layout): the same with Llama-3 headers.
//! - chat_template.default {messages, chosen, rejected}: the prompt rendered
//!   by the chat template with the generation prompt; each reply rendered
//!   after a dummy user turn and cut from where its content starts, trailing
//!   whitespace removed (Axolotl); then TRL's text path.
//!
//! KTO rows are {prompt, completion, label}; reward-model rows
//! {prompt?, chosen, rejected, margin?} give whole tokenized sequences.
//!
//! Files: `strategies` parses `type:` and builds Axolotl's strings for its
//! ChatML / Llama-3 strategies; `reader` turns a row into ids. A new
//! preference format is named in `config::PREFERENCE_DATASET_TYPES`, parsed
//! in `strategies` (its strings) and read in `reader`.

mod reader;
mod strategies;

pub use reader::{MessageFields, PreferenceReader};
pub use strategies::{Layout, Markup, PreferenceFormat};

use crate::model::batch::{IGNORE_INDEX, Sequence};
use anyhow::{Result, bail};
use serde_json::Value;
use std::path::Path;

/// One preference pair: the prompt's ids and each completion's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl PreferencePair {
    /// prompt + chosen and prompt + rejected, the prompt's labels -100.
    pub fn sequences(&self) -> [Sequence; 2] {
        [completion_sequence(&self.prompt, &self.chosen), completion_sequence(&self.prompt, &self.rejected)]
    }

    /// The pair back from `sequences()` (e.g. read from the dataset cache):
    /// the prompt is the labels' leading -100 run, which both must share.
    pub fn from_sequences(chosen: &Sequence, rejected: &Sequence) -> Result<PreferencePair> {
        let split = |s: &Sequence| s.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap_or(s.labels.len());
        let (pc, pr) = (split(chosen), split(rejected));
        if pc != pr || chosen.input_ids[..pc] != rejected.input_ids[..pr] {
            bail!("the chosen and rejected sequences do not share their unlabelled prompt");
        }
        Ok(PreferencePair {
            prompt: chosen.input_ids[..pc].to_vec(),
            chosen: chosen.input_ids[pc..].to_vec(),
            rejected: rejected.input_ids[pr..].to_vec(),
        })
    }
}

/// One KTO example: a prompt, a completion and whether it is desirable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KtoExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub desirable: bool,
}

impl KtoExample {
    pub fn sequence(&self) -> Sequence {
        completion_sequence(&self.prompt, &self.completion)
    }
}

/// One reward-model pair: the whole chosen and rejected sequences (prompt
/// included) and the row's margin, if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardPair {
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub margin: Option<f64>,
}

/// prompt + completion with the prompt's labels -100.
pub fn completion_sequence(prompt: &[u32], completion: &[u32]) -> Sequence {
    let mut input_ids = prompt.to_vec();
    input_ids.extend_from_slice(completion);
    let mut labels = vec![IGNORE_INDEX; prompt.len()];
    labels.extend(completion.iter().map(|&t| t as i32));
    Sequence { input_ids, labels }
}

/// Every row of a preference dataset file (.jsonl: one per line, blank
/// lines skipped; .json: a list), converted by `convert` with its
/// "file:line" location.
pub fn read_rows<T>(path: &Path, convert: impl Fn(&Value, &str) -> Result<T>) -> Result<Vec<T>> {
    super::rows::read(path, None)?.iter().map(|(loc, row)| convert(row, loc)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_through_sequences() {
        let pair = PreferencePair { prompt: vec![1, 4], chosen: vec![5, 2], rejected: vec![7, 8, 2] };
        let [c, r] = pair.sequences();
        assert_eq!(c.labels, vec![IGNORE_INDEX, IGNORE_INDEX, 5, 2]);
        assert_eq!(PreferencePair::from_sequences(&c, &r).unwrap(), pair);
        let other = Sequence { input_ids: vec![1, 9, 5], labels: vec![IGNORE_INDEX, IGNORE_INDEX, 5] };
        assert!(PreferencePair::from_sequences(&c, &other).is_err());
    }
}
