//! GRPO's datasets: rows {"prompt": ..., other columns...}. A text prompt is
//! tokenized as the tokenizer does by default (BOS per its config, as TRL's
//! processing_class(text=...)); a conversational prompt (a list of {role,
//! content}) is rendered with the chat template and the generation prompt
//! and tokenized without special tokens (TRL's apply_chat_template). The
//! row's other columns are kept: the reward functions receive them.

use super::chat_template::{ChatTemplate, Message};
use super::prepare::{DatasetReport, PrepareOptions, dataset_files, merge_datasets};
use super::tokenizer::TextTokenizer;
use crate::config::{DatasetConfig, RunConfig};
use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};
use std::path::Path;

/// One prompt of a GRPO dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    /// The prompt as the dataset holds it (text, or a list of messages).
    pub prompt: Value,
    pub ids: Vec<u32>,
    /// The row's other columns.
    pub columns: Map<String, Value>,
}

impl PromptRow {
    /// Whether the prompt is a conversation (its completions are then
    /// messages too, as TRL passes them to reward functions).
    pub fn conversational(&self) -> bool {
        self.prompt.is_array()
    }
}

/// The prompts a GRPO run trains and validates on.
pub struct PreparedPrompts {
    pub train: Vec<PromptRow>,
    pub val: Vec<PromptRow>,
    pub report: Vec<DatasetReport>,
}

fn messages(v: &[Value], loc: &str) -> Result<Vec<Message>> {
    v.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |k: &str| m.get(k).and_then(Value::as_str);
            match (get("role"), get("content")) {
                (Some(r), Some(c)) => Ok(Message::new(r, c)),
                _ => bail!("{loc}: \"prompt\"[{i}] must be a message {{\"role\": ..., \"content\": \"text\"}}, found {m}"),
            }
        })
        .collect()
}

/// One row into a prompt; `loc` ("file:line") prefixes every error.
fn read_row(row: &Value, tok: &TextTokenizer, template: Option<&ChatTemplate>, vocab: usize, loc: &str) -> Result<PromptRow> {
    let Some(obj) = row.as_object() else { bail!("{loc}: a GRPO row must be an object {{\"prompt\": ..., other columns}}, found {row}") };
    let Some(prompt) = obj.get("prompt") else {
        bail!("{loc}: missing \"prompt\" (the text, or a list of {{role, content}} messages, to sample completions for); found keys {:?}", obj.keys().collect::<Vec<_>>())
    };
    let ids = match prompt {
        Value::String(text) => tok.encode(text, true).with_context(|| loc.to_string())?,
        Value::Array(list) => {
            let msgs = messages(list, loc)?;
            let template = template.with_context(|| {
                format!("{loc}: the prompt is a conversation, which needs a chat template (set chat_template in the run config)")
            })?;
            let text = template.render(&msgs, true).with_context(|| format!("{loc}: cannot render the prompt"))?;
            tok.encode(&text, false).with_context(|| loc.to_string())?
        }
        other => bail!("{loc}: \"prompt\" must be text or a list of {{role, content}} messages, found {other}"),
    };
    if ids.is_empty() {
        bail!("{loc}: the prompt has no tokens");
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        bail!("{loc}: token id {bad} is outside the model's vocabulary ({vocab})");
    }
    let mut columns = obj.clone();
    columns.remove("prompt");
    Ok(PromptRow { prompt: prompt.clone(), ids, columns })
}

fn read_dataset(ds: &DatasetConfig, cfg: &RunConfig, tok: &TextTokenizer, tokenizer_dir: &Path, vocab: usize, split: &str) -> Result<(Vec<PromptRow>, DatasetReport)> {
    let name = ds.chat_template.as_deref().or(cfg.chat_template.as_deref());
    let template = ChatTemplate::resolve(name, cfg.chat_template_jinja.as_deref(), tokenizer_dir).ok().map(|mut t| {
        t.set_tokens(tok.special_tokens().clone());
        t
    });
    let (mut rows, mut kept, mut dropped) = (0, Vec::new(), 0);
    for file in dataset_files(ds, split)? {
        for (loc, row) in super::rows::read(&file, ds.field.as_deref())? {
            rows += 1;
            let p = read_row(&row, tok, template.as_ref(), vocab, &loc)?;
            // A prompt must leave room for a completion within sequence_len.
            if p.ids.len() >= cfg.sequence_len {
                dropped += 1;
                continue;
            }
            kept.push(p);
        }
    }
    if kept.is_empty() {
        bail!("{}: no prompt shorter than sequence_len {} ({rows} rows)", ds.path, cfg.sequence_len);
    }
    let tokens: usize = kept.iter().map(|p| p.ids.len()).sum();
    let report = DatasetReport {
        path: ds.path.clone(),
        kind: "prompts".to_string(),
        split: split.to_string(),
        rows,
        sequences: kept.len(),
        tokens,
        trained_tokens: 0,
        untrained: 0,
        truncated: 0,
        dropped,
        from_cache: false,
        preference: true,
        same_completions: 0,
    };
    Ok((kept, report))
}

/// Every GRPO dataset of the run, merged, shuffled if asked, with the
/// validation split taken.
pub fn prepare_prompts(cfg: &RunConfig, tokenizer_dir: &Path, vocab: usize) -> Result<PreparedPrompts> {
    let opts = PrepareOptions::from_config(cfg)?;
    let tok = TextTokenizer::load(tokenizer_dir, &opts.special_tokens)?;
    let (train, val, report) = merge_datasets(cfg, |ds, split| read_dataset(ds, cfg, &tok, tokenizer_dir, vocab, split))?;
    Ok(PreparedPrompts { train, val, report })
}
