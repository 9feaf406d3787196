//! Preference datasets for a run (`rl`): every dataset's rows read into
//! prompt/chosen/rejected ids (`preference`), the length policy applied,
//! the datasets merged, shuffled if asked, and the validation split taken,
//! as `prepare` does for SFT data. (Pairs are not cached yet: tokenizing
//! them is cheap next to training.)

use super::chat_template::ChatTemplate;
use super::preference::{KtoExample, MessageFields, PreferenceFormat, PreferencePair, PreferenceReader, RewardPair, read_rows};
use super::prepare::{DatasetReport, ExcessLength, PrepareOptions, dataset_files, merge_datasets};
use super::pretokenized::check_vocab;
use super::tokenizer::TextTokenizer;
use crate::config::{DatasetConfig, RunConfig};
use anyhow::{Result, bail};
use std::path::Path;

/// The examples a preference run trains and validates on (pairs, or KTO's
/// labelled completions).
pub struct PreparedPairs<T = PreferencePair> {
    pub train: Vec<T>,
    pub val: Vec<T>,
    /// One per dataset (its `Display` is the line a run prints).
    pub report: Vec<DatasetReport>,
}

/// What the length policy and the vocabulary check need of an example.
pub trait RunExample: Sized {
    /// The sequences the example puts through the model.
    fn sequences(&self) -> Vec<crate::model::batch::Sequence>;
    /// Apply the length policy: None when dropped; true when truncated.
    fn fit(self, max_len: usize, policy: ExcessLength) -> (Option<Self>, bool);
    /// A pair whose chosen and rejected completions are the same tokens:
    /// every pairwise loss is flat in the adapter there, so it teaches nothing.
    fn same_completions(&self) -> bool {
        false
    }
}

impl RunExample for PreferencePair {
    fn sequences(&self) -> Vec<crate::model::batch::Sequence> {
        self.sequences().to_vec()
    }
    fn fit(self, max_len: usize, policy: ExcessLength) -> (Option<Self>, bool) {
        fit(self, max_len, policy)
    }
    fn same_completions(&self) -> bool {
        self.chosen == self.rejected
    }
}

impl RunExample for RewardPair {
    fn sequences(&self) -> Vec<crate::model::batch::Sequence> {
        vec![
            crate::model::batch::Sequence::unmasked(self.chosen.clone()),
            crate::model::batch::Sequence::unmasked(self.rejected.clone()),
        ]
    }
    fn fit(mut self, max_len: usize, policy: ExcessLength) -> (Option<Self>, bool) {
        if self.chosen.len().max(self.rejected.len()) <= max_len {
            return (Some(self), false);
        }
        match policy {
            ExcessLength::Truncate => {
                self.chosen.truncate(max_len);
                self.rejected.truncate(max_len);
                (Some(self), true)
            }
            ExcessLength::Drop => (None, false),
        }
    }
    fn same_completions(&self) -> bool {
        self.chosen == self.rejected
    }
}

impl RunExample for KtoExample {
    fn sequences(&self) -> Vec<crate::model::batch::Sequence> {
        vec![self.sequence()]
    }
    fn fit(mut self, max_len: usize, policy: ExcessLength) -> (Option<Self>, bool) {
        if self.prompt.len() + self.completion.len() <= max_len {
            return (Some(self), false);
        }
        match policy {
            ExcessLength::Truncate if self.prompt.len() < max_len => {
                self.completion.truncate(max_len - self.prompt.len());
                (Some(self), true)
            }
            _ => (None, false),
        }
    }
}

fn fields(ds: &DatasetConfig) -> MessageFields {
    let mut f = MessageFields::default();
    if let Some(m) = &ds.field_messages {
        f.field_messages = m.clone();
    }
    if let Some(map) = &ds.message_property_mappings {
        if let Some(r) = map.get("role") {
            f.role_key = r.clone();
        }
        if let Some(c) = map.get("content") {
            f.content_key = c.clone();
        }
    }
    f
}

/// Apply the length policy to one pair: None when dropped. Truncation keeps
/// the prompt and cuts each completion (a prompt that leaves no room for a
/// completion token drops the pair).
fn fit(mut pair: PreferencePair, max_len: usize, policy: ExcessLength) -> (Option<PreferencePair>, bool) {
    let longest = pair.prompt.len() + pair.chosen.len().max(pair.rejected.len());
    if longest <= max_len {
        return (Some(pair), false);
    }
    match policy {
        ExcessLength::Drop => (None, false),
        ExcessLength::Truncate => {
            if pair.prompt.len() >= max_len {
                return (None, false);
            }
            let room = max_len - pair.prompt.len();
            pair.chosen.truncate(room);
            pair.rejected.truncate(room);
            (Some(pair), true)
        }
    }
}

/// One dataset entry (`ds`) of the list whose default split is `split`.
fn read_dataset<T: RunExample>(
    (ds, split): (&DatasetConfig, &str),
    cfg: &RunConfig,
    opts: &PrepareOptions,
    tok: &TextTokenizer,
    tokenizer_dir: &Path,
    vocab: usize,
    read: &dyn Fn(&PreferenceReader, &serde_json::Value, &str) -> Result<T>,
) -> Result<(Vec<T>, DatasetReport)> {
    let format = PreferenceFormat::parse(ds.kind.as_deref())?;
    let name = ds.chat_template.as_deref().or(cfg.chat_template.as_deref());
    let template = match ChatTemplate::resolve(name, cfg.chat_template_jinja.as_deref(), tokenizer_dir) {
        Ok(mut t) => {
            t.set_tokens(tok.special_tokens().clone());
            Some(t)
        }
        // Only chat_template.default (and conversational standard rows,
        // which then fail with the template error) need one.
        Err(e) if format.needs_template() => return Err(e),
        Err(_) => None,
    };
    let reader = PreferenceReader { format, tokenizer: tok, template: template.as_ref(), fields: fields(ds) };
    let (mut rows, mut kept, mut truncated, mut dropped) = (0, Vec::new(), 0, 0);
    for file in dataset_files(ds, split)? {
        let examples = read_rows(&file, |row, loc| {
            let ex = read(&reader, row, loc)?;
            for s in RunExample::sequences(&ex) {
                check_vocab(&s, vocab, loc)?;
            }
            Ok(ex)
        })?;
        rows += examples.len();
        for p in examples {
            match p.fit(opts.sequence_len, opts.excess_length) {
                (Some(p), cut) => {
                    truncated += cut as usize;
                    kept.push(p);
                }
                (None, _) => dropped += 1,
            }
        }
    }
    if kept.is_empty() {
        bail!("{}: all {rows} rows are longer than sequence_len {} and were dropped", ds.path, opts.sequence_len);
    }
    // One pass: each example's sequences are built once for all three counts.
    let (mut tokens, mut trained_tokens, mut untrained) = (0, 0, 0);
    for e in &kept {
        let seqs = RunExample::sequences(e);
        let trained: usize = seqs.iter().map(|s| s.trained_tokens()).sum();
        tokens += seqs.iter().map(|s| s.input_ids.len()).sum::<usize>();
        trained_tokens += trained;
        untrained += (trained == 0) as usize;
    }
    let report = DatasetReport {
        path: ds.path.clone(),
        kind: ds.kind.clone().unwrap_or_else(|| "standard".to_string()),
        // The caller marks test_datasets' reports.
        split: "train".to_string(),
        rows,
        sequences: kept.len(),
        tokens,
        trained_tokens,
        untrained,
        truncated,
        dropped,
        from_cache: false,
        preference: true,
        same_completions: kept.iter().filter(|e| e.same_completions()).count(),
    };
    Ok((kept, report))
}

/// Read every preference dataset of the run as pairs.
pub fn prepare_pairs(cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<PreparedPairs> {
    prepare_examples(cfg, tokenizer_dir, vocab, &|r, row, loc| r.pair(row, loc))
}

/// Read every dataset of a reward-model run: {prompt?, chosen, rejected, margin?} rows.
pub fn prepare_reward(cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<PreparedPairs<RewardPair>> {
    prepare_examples(cfg, tokenizer_dir, vocab, &|r, row, loc| r.reward(row, loc))
}

/// Read every dataset of a KTO run: {prompt, completion, label} rows.
pub fn prepare_kto(cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<PreparedPairs<KtoExample>> {
    prepare_examples(cfg, tokenizer_dir, vocab, &|r, row, loc| r.kto(row, loc))
}

fn prepare_examples<T: RunExample>(
    cfg: &RunConfig,
    tokenizer_dir: &Path,
    vocab: usize,
    read: &dyn Fn(&PreferenceReader, &serde_json::Value, &str) -> Result<T>,
) -> Result<PreparedPairs<T>> {
    let opts = PrepareOptions::from_config(cfg)?;
    let tok = TextTokenizer::load(tokenizer_dir, &opts.special_tokens)?;
    let (train, val, report) = merge_datasets(cfg, |ds, split| {
        let (items, mut r) = read_dataset((ds, split), cfg, &opts, &tok, tokenizer_dir, vocab, read)?;
        r.split = split.to_string();
        Ok((items, r))
    })?;
    Ok(PreparedPairs { train, val, report })
}
