//! Preference datasets for a run (`rl`): every dataset's rows read into
//! prompt/chosen/rejected ids (`preference`), the length policy applied,
//! the datasets merged, shuffled if asked, and the validation split taken,
//! as `prepare` does for SFT data. (Pairs are not cached yet: tokenizing
//! them is cheap next to training.)

use super::chat_template::ChatTemplate;
use super::preference::{MessageFields, PreferenceFormat, PreferencePair, PreferenceReader, read_rows};
use super::prepare::{ExcessLength, PrepareOptions, dataset_files, shuffle, val_count};
use super::pretokenized::check_vocab;
use super::tokenizer::TextTokenizer;
use crate::config::{DatasetConfig, RunConfig};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The pairs a preference run trains and validates on.
pub struct PreparedPairs {
    pub train: Vec<PreferencePair>,
    pub val: Vec<PreferencePair>,
    /// One line per dataset.
    pub report: Vec<String>,
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

fn read_dataset(
    ds: &DatasetConfig,
    cfg: &RunConfig,
    opts: &PrepareOptions,
    tok: &TextTokenizer,
    tokenizer_dir: &Path,
    vocab: usize,
) -> Result<(Vec<PreferencePair>, String)> {
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
    for file in dataset_files(ds)? {
        let pairs = read_rows(&file, |row, loc| {
            let pair = reader.pair(row, loc)?;
            for s in pair.sequences() {
                check_vocab(&s, vocab, loc)?;
            }
            Ok(pair)
        })?;
        rows += pairs.len();
        for p in pairs {
            match fit(p, opts.sequence_len, opts.excess_length) {
                (Some(p), cut) => {
                    truncated += cut as usize;
                    kept.push(p);
                }
                (None, _) => dropped += 1,
            }
        }
    }
    if kept.is_empty() {
        bail!("{}: all {rows} pairs are longer than sequence_len {} and were dropped", ds.path, opts.sequence_len);
    }
    let tokens: usize = kept.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).sum();
    let mut line = format!("{} [{}, preference]: {rows} rows -> {} pairs, {tokens} tokens", ds.path, ds.kind.as_deref().unwrap_or("prompt/chosen/rejected"), kept.len());
    if truncated > 0 {
        line += &format!(", {truncated} truncated");
    }
    if dropped > 0 {
        line += &format!(", {dropped} dropped (too long)");
    }
    Ok((kept, line))
}

/// Read every preference dataset of the run.
pub fn prepare_pairs(cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<PreparedPairs> {
    if cfg.datasets.is_empty() {
        bail!("datasets: the run config lists no datasets");
    }
    let opts = PrepareOptions::from_config(cfg)?;
    let tok = TextTokenizer::load(tokenizer_dir, &opts.special_tokens)?;
    let mut report = Vec::new();
    let mut train = Vec::new();
    for (i, ds) in cfg.datasets.iter().enumerate() {
        let (pairs, line) = read_dataset(ds, cfg, &opts, &tok, tokenizer_dir, vocab).with_context(|| format!("datasets[{i}] ({})", ds.path))?;
        train.extend(pairs);
        report.push(line);
    }
    if cfg.shuffle_merged_datasets {
        shuffle(&mut train, cfg.seed);
    }
    let val = if cfg.test_datasets.is_empty() {
        let n = val_count(cfg.val_set_size, train.len())?;
        train.split_off(train.len() - n)
    } else {
        let mut val = Vec::new();
        for (i, ds) in cfg.test_datasets.iter().enumerate() {
            let (pairs, line) = read_dataset(ds, cfg, &opts, &tok, tokenizer_dir, vocab).with_context(|| format!("test_datasets[{i}] ({})", ds.path))?;
            val.extend(pairs);
            report.push(line);
        }
        val
    };
    Ok(PreparedPairs { train, val, report })
}
