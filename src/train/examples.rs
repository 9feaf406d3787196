//! What a run trains on (`Examples`: token sequences, preference pairs,
//! labelled completions or reward pairs, whichever its objective prepared)
//! and the data plan made from them. A new kind of training example is a
//! variant of `Examples`.

use super::plan::DataPlan;
use crate::config::RunConfig;
use crate::data::preference::{KtoExample as KtoIds, PreferencePair, RewardPair};
use crate::data::prompts::PromptRow;
use crate::data::show::Show;
use crate::model::batch::Sequence;

/// What a run trains on.
pub enum Examples {
    /// Token sequences with labels (SFT).
    Sequences(Vec<Sequence>),
    /// Preference pairs (rl): a prompt with a chosen and a rejected completion.
    Pairs(Vec<PreferencePair>),
    /// KTO's unpaired completions, each desirable or not.
    Kto(Vec<KtoIds>),
    /// Reward-model pairs: whole chosen and rejected sequences.
    Reward(Vec<RewardPair>),
    /// GRPO's prompts, completions sampled during training.
    Prompts(Vec<PromptRow>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Sequences(s) => s.len(),
            Examples::Pairs(p) => p.len(),
            Examples::Kto(k) => k.len(),
            Examples::Reward(r) => r.len(),
            Examples::Prompts(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What one example is called in counts.
    pub fn noun(&self) -> &'static str {
        match self {
            Examples::Sequences(_) => "sequences",
            Examples::Pairs(_) | Examples::Reward(_) => "pairs",
            Examples::Kto(_) => "examples",
            Examples::Prompts(_) => "prompts",
        }
    }

    /// Whether the examples are scored as whole sequences (at their last
    /// token) rather than on trained tokens.
    pub fn scored_whole(&self) -> bool {
        matches!(self, Examples::Reward(_))
    }

    /// Tokens and trained tokens, over the sequences each example puts
    /// through the model (SFT sequences counted in place, not copied).
    pub fn token_counts(&self) -> (usize, usize) {
        let count = |s: &Sequence| (s.input_ids.len(), s.trained_tokens());
        let per_seq: Vec<(usize, usize)> = match self {
            Examples::Sequences(s) => s.iter().map(count).collect(),
            Examples::Pairs(p) => p.iter().flat_map(|p| p.sequences()).map(|s| count(&s)).collect(),
            Examples::Kto(k) => k.iter().map(|e| count(&e.sequence())).collect(),
            Examples::Reward(r) => r.iter().flat_map(|p| [p.chosen.len(), p.rejected.len()]).map(|n| (n, n.saturating_sub(1))).collect(),
            // Nothing is trained on a prompt itself.
            Examples::Prompts(p) => p.iter().map(|p| (p.ids.len(), 0)).collect(),
        };
        per_seq.iter().fold((0, 0), |(t, tr), (a, b)| (t + a, tr + b))
    }

    /// Example `i` as `show` writes it, ending in a newline.
    pub fn show(&self, i: usize, show: &Show) -> String {
        match self {
            Examples::Sequences(s) => {
                let text = show.sequence(&s[i]);
                if text.ends_with('\n') { text } else { text + "\n" }
            }
            Examples::Pairs(p) => show.pair(&p[i]),
            Examples::Kto(k) => show.kto(&k[i]),
            Examples::Reward(r) => show.reward(&r[i]),
            Examples::Prompts(p) => show.prompt(&p[i].ids),
        }
    }

    /// Tokens each example puts through the model (a pair: both sequences).
    pub fn lengths(&self) -> Vec<usize> {
        match self {
            Examples::Sequences(s) => s.iter().map(|s| s.input_ids.len()).collect(),
            Examples::Pairs(p) => p.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).collect(),
            // With its KL pair (about the same length).
            Examples::Kto(k) => k.iter().map(|e| 2 * (e.prompt.len() + e.completion.len())).collect(),
            Examples::Reward(r) => r.iter().map(|p| p.chosen.len() + p.rejected.len()).collect(),
            Examples::Prompts(p) => p.iter().map(|p| p.ids.len()).collect(),
        }
    }
}

/// How an objective groups its examples into optimiser steps
/// (`Objective::batching`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Examples (rows) per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimiser step.
    pub micro_batches_per_step: usize,
    /// Optimiser steps each micro-batch is trained on.
    pub repeat: usize,
    /// Leave out an epoch's short last micro-batch.
    pub drop_last: bool,
}

impl Batching {
    /// micro_batch_size examples per micro-batch,
    /// gradient_accumulation_steps micro-batches per step.
    pub fn of(cfg: &RunConfig) -> Batching {
        Batching { micro_batch_size: cfg.micro_batch_size, micro_batches_per_step: cfg.gradient_accumulation_steps, repeat: 1, drop_last: false }
    }
}

/// How a run orders, packs and batches its training examples; `packs`:
/// the objective allows several examples in one row (`Objective::packs`).
pub fn data_plan(cfg: &RunConfig, train: &Examples, packs: bool, batching: Batching) -> DataPlan {
    DataPlan {
        lengths: train.lengths(),
        micro_batch_size: batching.micro_batch_size,
        gradient_accumulation_steps: batching.micro_batches_per_step,
        repeat: batching.repeat,
        drop_last: batching.drop_last,
        // Pairs are never packed: each micro-batch holds whole pairs.
        sample_packing: cfg.sample_packing && packs,
        sequence_len: cfg.sequence_len,
        shuffle: cfg.shuffle_merged_datasets,
        seed: cfg.seed,
    }
}
