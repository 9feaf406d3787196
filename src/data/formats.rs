//! One reader per dataset type: a JSON row into token sequences with labels
//! masked as Axolotl masks them.
//!
//! - alpaca {instruction, input?, output}: the fixed instruction prompt, the
//!   prompt's tokens unlabelled (unless train_on_inputs).
//! - chat_template {messages: [{role, content}]}: the conversation rendered by
//!   the chat template; only the content of turns whose role is trained, plus
//!   EOS per train_on_eos, is labelled (train_on_inputs: every token).
//! - completion {text}: every token labelled, long texts split in chunks.
//! - input_output {segments: [{text, label}]}: labelled where label is true.
//! - no type: pre-tokenized rows ({input_ids, labels?, attention_mask?}).

use super::chat_template::{ChatTemplate, Message};
use super::pretokenized;
use super::tokenizer::TextTokenizer;
use crate::config::{DatasetConfig, PLAIN_DATASET_TYPES};
use crate::model::batch::{IGNORE_INDEX, Sequence};
use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The `type:` of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetType {
    Pretokenized,
    Alpaca,
    ChatTemplate,
    Completion,
    InputOutput,
}

impl DatasetType {
    /// The types a `type:` names, in `PLAIN_DATASET_TYPES` order.
    const NAMED: [DatasetType; 4] = [DatasetType::Alpaca, DatasetType::ChatTemplate, DatasetType::Completion, DatasetType::InputOutput];

    pub fn parse(kind: Option<&str>) -> Result<DatasetType> {
        let Some(name) = kind.filter(|k| !k.is_empty()) else { return Ok(DatasetType::Pretokenized) };
        DatasetType::NAMED.into_iter().find(|t| t.name() == name).with_context(|| {
            format!(
                "unknown dataset type \"{name}\" (expected one of {}, or no type for pre-tokenized rows)",
                PLAIN_DATASET_TYPES.join(", ")
            )
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DatasetType::Pretokenized => "pre-tokenized",
            DatasetType::Alpaca => "alpaca",
            DatasetType::ChatTemplate => "chat_template",
            DatasetType::Completion => "completion",
            DatasetType::InputOutput => "input_output",
        }
    }

    pub fn needs_tokenizer(self) -> bool {
        self != DatasetType::Pretokenized
    }
}

/// `train_on_eos`: which EOS tokens of a conversation are labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainOnEos {
    /// The EOS after each trained turn (Axolotl's default).
    Turn,
    /// Every turn's EOS.
    All,
    /// Only the EOS after the last trained turn.
    Last,
    None,
}

impl TrainOnEos {
    pub fn parse(s: Option<&str>) -> Result<TrainOnEos> {
        Ok(match s {
            None | Some("turn") => TrainOnEos::Turn,
            Some("all") => TrainOnEos::All,
            Some("last") => TrainOnEos::Last,
            Some("none") => TrainOnEos::None,
            Some(other) => bail!("train_on_eos: \"{other}\" is not one of turn, all, last, none"),
        })
    }
}

/// Role names as datasets spell them (ShareGPT's human/gpt) mapped to the
/// names chat templates expect.
pub(crate) fn normalise_role(role: &str) -> Option<&'static str> {
    Some(match role {
        "user" | "human" => "user",
        "assistant" | "gpt" => "assistant",
        "system" => "system",
        "tool" => "tool",
        _ => return None,
    })
}

/// How a chat_template dataset's rows are read and labelled.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub field_messages: String,
    pub role_key: String,
    pub content_key: String,
    pub roles_to_train: Vec<String>,
    pub train_on_eos: TrainOnEos,
}

impl ChatOptions {
    pub fn from_config(ds: &DatasetConfig) -> Result<ChatOptions> {
        let map = ds.message_property_mappings.clone().unwrap_or_default();
        if let Some(k) = map.keys().find(|k| *k != "role" && *k != "content") {
            bail!("message_property_mappings: unknown key \"{k}\" (expected role and content)");
        }
        let roles = ds.roles_to_train.clone().unwrap_or_else(|| vec!["assistant".to_string()]);
        let roles_to_train = roles
            .iter()
            .map(|r| {
                normalise_role(r).map(str::to_string).with_context(|| {
                    format!("roles_to_train: unknown role \"{r}\" (expected system, user, assistant, tool, human or gpt)")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ChatOptions {
            field_messages: ds.field_messages.clone().unwrap_or_else(|| "messages".to_string()),
            role_key: map.get("role").cloned().unwrap_or_else(|| "role".to_string()),
            content_key: map.get("content").cloned().unwrap_or_else(|| "content".to_string()),
            roles_to_train,
            train_on_eos: TrainOnEos::parse(ds.train_on_eos.as_deref())?,
        })
    }
}

/// Everything needed to turn one row into sequences.
pub struct Format<'a> {
    pub kind: DatasetType,
    pub tokenizer: Option<&'a TextTokenizer>,
    pub template: Option<ChatTemplate>,
    pub chat: Option<ChatOptions>,
    pub field_text: String,
    pub train_on_inputs: bool,
    /// completion texts are split into chunks of this many tokens.
    pub sequence_len: usize,
}

impl Format<'_> {
    /// The sequences of one row; `loc` ("file:line") prefixes every error.
    /// Only completion rows give more than one.
    pub fn to_sequences(&self, row: &Value, loc: &str) -> Result<Vec<Sequence>> {
        if self.kind == DatasetType::Pretokenized {
            return Ok(vec![pretokenized::parse_row(row, loc)?]);
        }
        let tok = self.tokenizer.expect("tokenizer loaded for text dataset types");
        let obj = row.as_object().with_context(|| {
            format!("{loc}: expected a JSON object (a {} row), found {}", self.kind.name(), kind(row))
        })?;
        let seq = match self.kind {
            DatasetType::Alpaca => alpaca(tok, obj, self.train_on_inputs, loc)?,
            DatasetType::Completion => return completion(tok, obj, &self.field_text, self.sequence_len, loc),
            DatasetType::InputOutput => input_output(tok, obj, loc)?,
            DatasetType::ChatTemplate => {
                let template = self.template.as_ref().expect("template resolved for chat_template");
                let opts = self.chat.as_ref().expect("chat options for chat_template");
                chat(tok, template, opts, obj, self.train_on_inputs, loc)?
            }
            DatasetType::Pretokenized => unreachable!(),
        };
        if seq.input_ids.is_empty() {
            bail!("{loc}: the row has no tokens");
        }
        Ok(vec![seq])
    }
}

pub(crate) type Obj = serde_json::Map<String, Value>;

use super::pretokenized::kind;

pub(crate) fn keys(obj: &Obj) -> Vec<&str> {
    obj.keys().map(String::as_str).collect()
}

/// A required string field.
pub(crate) fn string<'a>(obj: &'a Obj, field: &str, what: &str, loc: &str) -> Result<&'a str> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        None => bail!("{loc}: missing \"{field}\" ({what}); found keys {:?}", keys(obj)),
        Some(v) => bail!("{loc}: \"{field}\" must be a string, found {}", kind(v)),
    }
}

/// An optional string field (absent or null: None).
pub(crate) fn opt_string<'a>(obj: &'a Obj, field: &str, loc: &str) -> Result<Option<&'a str>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => bail!("{loc}: \"{field}\" must be a string, found {}", kind(v)),
    }
}

const ALPACA_INTRO: &str = "Below is an instruction that describes a task";
const ALPACA_WITH_INPUT: &str = ", paired with an input that provides further context";
const ALPACA_ASK: &str = ". Write a response that appropriately completes the request.\n\n";

/// The alpaca prompt (Axolotl's template): the input block only when input is non-empty.
pub fn alpaca_prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|s| !s.is_empty()) {
        Some(input) => format!(
            "{ALPACA_INTRO}{ALPACA_WITH_INPUT}{ALPACA_ASK}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        None => format!("{ALPACA_INTRO}{ALPACA_ASK}### Instruction:\n{instruction}\n\n### Response:\n"),
    }
}

/// prompt + output tokenized as one text (BOS from the post-processor), EOS
/// appended; the prompt's tokens are masked as Axolotl masks them: the first
/// as many tokens as the prompt alone tokenizes to.
fn alpaca(tok: &TextTokenizer, obj: &Obj, train_on_inputs: bool, loc: &str) -> Result<Sequence> {
    let instruction = string(obj, "instruction", "alpaca rows are {instruction, input?, output}", loc)?;
    let input = opt_string(obj, "input", loc)?;
    let output = string(obj, "output", "alpaca rows are {instruction, input?, output}", loc)?;
    let prompt = alpaca_prompt(instruction, input);
    let mut ids = tok.encode(&format!("{prompt}{output}"), true).with_context(|| loc.to_string())?;
    ids.push(tok.require_eos()?);
    let mut seq = Sequence::unmasked(ids);
    if !train_on_inputs {
        let n_prompt = tok.encode(&prompt, true).with_context(|| loc.to_string())?.len().min(seq.labels.len());
        seq.labels[..n_prompt].fill(IGNORE_INDEX);
    }
    Ok(seq)
}

/// BOS + text + EOS, every token labelled, cut into `chunk`-token pieces.
fn completion(tok: &TextTokenizer, obj: &Obj, field: &str, chunk: usize, loc: &str) -> Result<Vec<Sequence>> {
    let text = string(obj, field, "completion rows hold their text there (field_text)", loc)?;
    let mut ids = tok.encode(text, true).with_context(|| loc.to_string())?;
    ids.push(tok.require_eos()?);
    Ok(ids.chunks(chunk.max(1)).map(|c| Sequence::unmasked(c.to_vec())).collect())
}

/// Segments tokenized without special tokens and concatenated; labelled
/// where the segment's label is true. train_on_inputs does not apply: the
/// labels are the row's own.
fn input_output(tok: &TextTokenizer, obj: &Obj, loc: &str) -> Result<Sequence> {
    let segs = match obj.get("segments") {
        Some(Value::Array(a)) => a,
        None => bail!("{loc}: missing \"segments\" (input_output rows are {{segments: [{{text, label}}]}}); found keys {:?}", keys(obj)),
        Some(v) => bail!("{loc}: \"segments\" must be a list of {{text, label}}, found {}", kind(v)),
    };
    if segs.is_empty() {
        bail!("{loc}: \"segments\" is empty");
    }
    let mut seq = Sequence { input_ids: vec![], labels: vec![] };
    for (i, seg) in segs.iter().enumerate() {
        let here = format!("{loc}: segments[{i}]");
        let seg = seg.as_object().with_context(|| format!("{here} must be an object {{text, label}}, found {}", kind(seg)))?;
        let text = string(seg, "text", "each segment is {text, label}", &here)?;
        let label = match seg.get("label") {
            Some(Value::Bool(b)) => *b,
            None => bail!("{here}: missing \"label\" (true: trained, false: masked)"),
            Some(v) => bail!("{here}: \"label\" must be true or false, found {}", kind(v)),
        };
        let ids = tok.encode(text, false).with_context(|| here.clone())?;
        seq.labels.extend(ids.iter().map(|&t| if label { t as i32 } else { IGNORE_INDEX }));
        seq.input_ids.extend(ids);
    }
    Ok(seq)
}

/// The conversation of a chat row, roles normalised; a top-level "system"
/// string becomes the first turn when the messages have none (as Axolotl).
pub fn conversation(opts: &ChatOptions, obj: &Obj, loc: &str) -> Result<Vec<Message>> {
    let field = &opts.field_messages;
    let list = match obj.get(field) {
        Some(Value::Array(a)) => a,
        None => bail!(
            "{loc}: missing \"{field}\" (chat_template rows hold a list of messages there; set field_messages \
             for another key); found keys {:?}",
            keys(obj)
        ),
        Some(v) => bail!("{loc}: \"{field}\" must be a list of messages, found {}", kind(v)),
    };
    if list.is_empty() {
        bail!("{loc}: \"{field}\" is an empty conversation");
    }
    let mut turns = Vec::with_capacity(list.len() + 1);
    for (i, m) in list.iter().enumerate() {
        let here = format!("{loc}: {field}[{i}]");
        let m = m.as_object().with_context(|| format!("{here} must be an object, found {}", kind(m)))?;
        let what = "set message_property_mappings if the messages use other keys";
        let role = string(m, &opts.role_key, what, &here)?;
        let content = string(m, &opts.content_key, what, &here)?;
        let role = normalise_role(role).with_context(|| {
            format!("{here}: unknown role \"{role}\" (expected system, user, assistant, tool, or ShareGPT's human, gpt)")
        })?;
        turns.push(Message::new(role, content));
    }
    if let (true, Some(system)) = (turns[0].role != "system", opt_string(obj, "system", loc)?) {
        turns.insert(0, Message::new("system", system));
    }
    Ok(turns)
}

/// Render, tokenize, and label a conversation.
fn chat(tok: &TextTokenizer, template: &ChatTemplate, opts: &ChatOptions, obj: &Obj, train_on_inputs: bool, loc: &str) -> Result<Sequence> {
    let turns = conversation(opts, obj, loc)?;
    let text = template.render(&turns, false).with_context(|| format!("{loc}: cannot render the conversation"))?;
    let (ids, offsets) = tok.encode_with_offsets(&text).with_context(|| loc.to_string())?;
    let mut seq = Sequence::unmasked(ids);
    if train_on_inputs {
        return Ok(seq);
    }
    seq.labels.fill(IGNORE_INDEX);
    let eos = tok.eos_id();
    let mut last_eos = None;
    for (i, turn) in turns.iter().enumerate() {
        let trained = opts.roles_to_train.contains(&turn.role);
        if !trained && opts.train_on_eos != TrainOnEos::All {
            continue;
        }
        let Some((start, end)) = content_span(template, &turns, i, &text) else {
            if trained && !turn.content.trim().is_empty() {
                bail!(
                    "{loc}: turn {i} ({}): its content does not appear in the text the chat template ({}) renders, \
                     so its tokens cannot be labelled",
                    turn.role,
                    template.origin()
                );
            }
            continue;
        };
        let (t0, t1) = token_range(&offsets, start, end);
        if trained {
            for t in t0..t1 {
                seq.labels[t] = seq.input_ids[t] as i32;
            }
        }
        // The turn's EOS: the first one after its content, if it closes the
        // turn (at most 3 tokens of template after the content, as Axolotl).
        let closing = eos.and_then(|eos| (t1..seq.input_ids.len()).find(|&k| seq.input_ids[k] == eos));
        if let Some(k) = closing.filter(|&k| k - t1 <= 3) {
            last_eos = Some(k);
            if opts.train_on_eos == TrainOnEos::All || (opts.train_on_eos == TrainOnEos::Turn && trained) {
                seq.labels[k] = seq.input_ids[k] as i32;
            }
        }
    }
    if let (TrainOnEos::Last, Some(k)) = (opts.train_on_eos, last_eos) {
        seq.labels[k] = seq.input_ids[k] as i32;
    }
    Ok(seq)
}

/// Stand-ins for a turn's content; their first and last characters differ,
/// so content that shares an edge with one does not share it with the other.
const PLACEHOLDERS: [&str; 2] = ["[[placeholder]]", "(-content-)"];

/// The byte span of turn `i`'s content in `text` (the whole conversation
/// rendered), as the template renders it (trimmed, say): the conversation up
/// to turn i is rendered with the real content and with each placeholder,
/// and the content is where the renderings differ. Templates whose earlier
/// turns render differently once later turns exist fall back to finding
/// the content after the text of the turns before it.
fn content_span(template: &ChatTemplate, turns: &[Message], i: usize, text: &str) -> Option<(usize, usize)> {
    let upto = template.render(&turns[..=i], false).ok().filter(|t| text.starts_with(t.as_str()));
    if let Some(upto) = &upto {
        let mut span: Option<(usize, usize)> = None;
        for p in PLACEHOLDERS {
            let mut with_placeholder = turns[..i].to_vec();
            with_placeholder.push(Message::new(&turns[i].role, p));
            let Ok(other) = template.render(&with_placeholder, false) else { continue };
            let (a, b) = (upto.as_bytes(), other.as_bytes());
            let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            let room = a.len().min(b.len()) - prefix;
            let suffix = a.iter().rev().zip(b.iter().rev()).take(room).take_while(|(x, y)| x == y).count();
            let (start, end) = (prefix, a.len() - suffix);
            span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
        }
        if let Some((s, e)) = span.filter(|(s, e)| s < e) {
            return Some((s, e));
        }
    }
    let from = template
        .render(&turns[..i], false)
        .ok()
        .filter(|t| text.starts_with(t.as_str()))
        .map_or(0, |t| t.len());
    let content = &turns[i].content;
    [content.as_str(), content.trim()]
        .into_iter()
        .filter(|c| !c.is_empty())
        .find_map(|c| text[from..].find(c).map(|p| (from + p, from + p + c.len())))
}

/// The tokens overlapping bytes [start, end).
fn token_range(offsets: &[(usize, usize)], start: usize, end: usize) -> (usize, usize) {
    let t0 = offsets.iter().position(|&(_, e)| e > start).unwrap_or(offsets.len());
    let t1 = offsets.iter().rposition(|&(s, _)| s < end).map_or(t0, |t| t + 1);
    (t0, t1.max(t0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_type_is_the_configs_and_parses_back() {
        assert_eq!(DatasetType::NAMED.map(DatasetType::name), PLAIN_DATASET_TYPES);
        for t in DatasetType::NAMED {
            assert_eq!(DatasetType::parse(Some(t.name())).unwrap(), t);
        }
        assert_eq!(DatasetType::parse(Some("")).unwrap(), DatasetType::Pretokenized);
        assert_eq!(
            DatasetType::parse(Some("oasst")).unwrap_err().to_string(),
            "unknown dataset type \"oasst\" (expected one of alpaca, chat_template, completion, input_output, or no type for pre-tokenized rows)"
        );
    }

    #[test]
    fn alpaca_prompt_matches_the_spec_text() {
        assert_eq!(
            alpaca_prompt("Do X.", Some("")),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
        );
        assert_eq!(
            alpaca_prompt("Do X.", Some("data")),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Input:\ndata\n\n### Response:\n"
        );
    }

    #[test]
    fn token_range_takes_every_overlapping_token() {
        let offs = [(0, 3), (3, 5), (5, 9), (9, 10)];
        assert_eq!(token_range(&offs, 4, 9), (1, 3));
        assert_eq!(token_range(&offs, 3, 5), (1, 2));
        assert_eq!(token_range(&offs, 10, 10), (4, 4));
    }

    #[test]
    fn options_reject_unknown_names() {
        let ds = DatasetConfig { roles_to_train: Some(vec!["bot".into()]), ..Default::default() };
        assert!(ChatOptions::from_config(&ds).unwrap_err().to_string().contains("roles_to_train: unknown role \"bot\""));
        let ds = DatasetConfig { train_on_eos: Some("sometimes".into()), ..Default::default() };
        assert!(ChatOptions::from_config(&ds).unwrap_err().to_string().contains("train_on_eos"));
        assert!(DatasetType::parse(Some("sharegpt")).unwrap_err().to_string().contains("unknown dataset type \"sharegpt\""));
    }
}
