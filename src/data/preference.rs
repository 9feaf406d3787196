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

use super::chat_template::{ChatTemplate, Message};
use super::formats::{Obj, keys, normalise_role, opt_string, string};
use super::pretokenized::kind;
use super::tokenizer::TextTokenizer;
use crate::model::batch::{IGNORE_INDEX, Sequence};
use anyhow::{Context, Result, bail};
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

/// The ChatML or Llama-3 markup of Axolotl's DPO prompt strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Markup {
    ChatMl,
    Llama3,
}

impl Markup {
    fn turn(self, role: &str, content: &str) -> String {
        match self {
            Markup::ChatMl => format!("<|im_start|>{role}\n{content}<|im_end|>\n"),
            Markup::Llama3 => format!("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"),
        }
    }

    fn assistant_header(self) -> &'static str {
        match self {
            Markup::ChatMl => "<|im_start|>assistant\n",
            Markup::Llama3 => "<|start_header_id|>assistant<|end_header_id|>\n\n",
        }
    }

    fn end_of_turn(self) -> &'static str {
        match self {
            Markup::ChatMl => "<|im_end|>",
            Markup::Llama3 => "<|eot_id|>",
        }
    }

    /// [system turn if non-empty] user turn, assistant header.
    fn prompt(self, system: Option<&str>, user: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = system.filter(|s| !s.is_empty()) {
            s.push_str(&self.turn("system", sys));
        }
        s.push_str(&self.turn("user", user));
        s.push_str(self.assistant_header());
        s
    }
}

/// Which fields an Axolotl string strategy reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// {system?, question, chosen, rejected}
    Intel,
    /// {system?, input, chosen, rejected}
    Icr,
    /// {system?, prompt, chosen, rejected}
    PromptPairs,
    /// {system?, prompt|input|question|instruction, chosen|chosen_response,
    /// rejected|rejected_response}
    Argilla,
    /// {system?, prompt, chosen: [msgs], rejected: [msgs]}, reply = message 1
    Ultra,
    /// {chosen: [user, assistant], rejected: [user, assistant]}
    ArgillaChat,
}

/// A preference dataset's `type:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceFormat {
    /// TRL's own {prompt?, chosen, rejected} (type absent).
    Standard,
    Axolotl(Markup, Layout),
    /// chat_template.default {messages, chosen, rejected}.
    ChatTemplate,
}

pub const FORMAT_NAMES: &[&str] = &[
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

impl PreferenceFormat {
    pub fn parse(kind: Option<&str>) -> Result<PreferenceFormat> {
        let Some(name) = kind.filter(|k| !k.is_empty()) else { return Ok(PreferenceFormat::Standard) };
        if name == "chat_template.default" {
            return Ok(PreferenceFormat::ChatTemplate);
        }
        let unknown = || {
            anyhow::anyhow!(
                "unknown preference dataset type \"{name}\" (expected one of {}, or no type for {{prompt, chosen, rejected}} rows)",
                FORMAT_NAMES.join(", ")
            )
        };
        let (markup, strategy) = match name.split_once('.') {
            Some(("chatml", s)) => (Markup::ChatMl, s),
            Some(("llama3", s)) => (Markup::Llama3, s),
            _ => return Err(unknown()),
        };
        let layout = match (markup, strategy) {
            (_, "intel") => Layout::Intel,
            (_, "icr") => Layout::Icr,
            (_, "prompt_pairs") => Layout::PromptPairs,
            (_, "ultra") => Layout::Ultra,
            (_, "argilla_chat") => Layout::ArgillaChat,
            (Markup::ChatMl, "argilla") | (Markup::Llama3, "default") => Layout::Argilla,
            _ => return Err(unknown()),
        };
        Ok(PreferenceFormat::Axolotl(markup, layout))
    }

    /// Whether rows need a chat template (always for chat_template.default;
    /// for the standard format only when its rows are message lists).
    pub fn needs_template(self) -> bool {
        self == PreferenceFormat::ChatTemplate
    }
}

/// Message fields of chat_template.default (Axolotl's dataset keys).
#[derive(Debug, Clone)]
pub struct MessageFields {
    pub field_messages: String,
    pub field_chosen: String,
    pub field_rejected: String,
    pub role_key: String,
    pub content_key: String,
}

impl Default for MessageFields {
    fn default() -> Self {
        MessageFields {
            field_messages: "messages".into(),
            field_chosen: "chosen".into(),
            field_rejected: "rejected".into(),
            role_key: "role".into(),
            content_key: "content".into(),
        }
    }
}

/// Everything needed to turn preference rows into ids.
pub struct PreferenceReader<'a> {
    pub format: PreferenceFormat,
    pub tokenizer: &'a TextTokenizer,
    /// Renders message lists (chat_template.default, conversational rows).
    pub template: Option<&'a ChatTemplate>,
    pub fields: MessageFields,
}

/// A field holding either text or a conversation.
enum Content {
    Text(String),
    Messages(Vec<Message>),
}

impl PreferenceReader<'_> {
    /// One preference row; `loc` ("file:line") prefixes every error.
    pub fn pair(&self, row: &Value, loc: &str) -> Result<PreferencePair> {
        let obj = object(row, loc)?;
        let pair = match self.format {
            PreferenceFormat::Standard => self.standard(obj, loc)?,
            PreferenceFormat::Axolotl(markup, layout) => {
                let (prompt, chosen, rejected) = axolotl_strings(markup, layout, obj, loc)?;
                self.text_pair(&prompt, &chosen, &rejected, loc)?
            }
            PreferenceFormat::ChatTemplate => {
                let (prompt, chosen, rejected) = self.chat_template_strings(obj, loc)?;
                self.text_pair(&prompt, &chosen, &rejected, loc)?
            }
        };
        if pair.chosen.is_empty() || pair.rejected.is_empty() {
            bail!("{loc}: a completion has no tokens after the prompt");
        }
        Ok(pair)
    }

    /// One KTO row {prompt, completion, label}.
    pub fn kto(&self, row: &Value, loc: &str) -> Result<KtoExample> {
        let obj = object(row, loc)?;
        let what = "KTO rows are {prompt, completion, label}";
        let desirable = match obj.get("label") {
            Some(Value::Bool(b)) => *b,
            None => bail!("{loc}: missing \"label\" ({what}); found keys {:?}", keys(obj)),
            Some(v) => bail!("{loc}: \"label\" must be true (desirable) or false (undesirable), found {}", kind(v)),
        };
        let prompt = content(obj, "prompt", what, &self.fields, loc)?;
        let completion = content(obj, "completion", what, &self.fields, loc)?;
        let (prompt, completion) = match (prompt, completion) {
            (Content::Text(p), Content::Text(c)) => {
                let (prompt, mut done) = self.split_text(&p, &[&c], loc)?;
                (prompt, done.remove(0))
            }
            (Content::Messages(p), Content::Messages(c)) => {
                let (prompt, mut done) = self.split_messages(&p, &[&c], loc)?;
                (prompt, done.remove(0))
            }
            _ => bail!("{loc}: \"prompt\" and \"completion\" must both be strings or both lists of messages"),
        };
        if completion.is_empty() {
            bail!("{loc}: the completion has no tokens after the prompt");
        }
        Ok(KtoExample { prompt, completion, desirable })
    }

    /// One reward-model row {prompt?, chosen, rejected, margin?}.
    pub fn reward(&self, row: &Value, loc: &str) -> Result<RewardPair> {
        let obj = object(row, loc)?;
        let what = "reward-model rows are {prompt?, chosen, rejected, margin?}";
        let margin = match obj.get("margin") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_f64(),
            Some(v) => bail!("{loc}: \"margin\" must be a number, found {}", kind(v)),
        };
        let prompt = if obj.contains_key("prompt") { Some(content(obj, "prompt", what, &self.fields, loc)?) } else { None };
        let chosen = content(obj, "chosen", what, &self.fields, loc)?;
        let rejected = content(obj, "rejected", what, &self.fields, loc)?;
        let eos = self.eos_string()?;
        let whole = |c: Content, field: &str| -> Result<Vec<u32>> {
            match (&prompt, c) {
                (None, Content::Text(t)) => self.encode_text(&with_eos(t, &eos), loc),
                (Some(Content::Text(p)), Content::Text(t)) => self.encode_text(&with_eos(format!("{p}{t}"), &eos), loc),
                (None, Content::Messages(m)) => self.encode_messages(&m, false, loc),
                (Some(Content::Messages(p)), Content::Messages(m)) => {
                    self.encode_messages(&[p.clone(), m].concat(), false, loc)
                }
                _ => bail!("{loc}: \"{field}\" must be the same kind as \"prompt\" (both strings or both lists of messages)"),
            }
        };
        Ok(RewardPair { chosen: whole(chosen, "chosen")?, rejected: whole(rejected, "rejected")?, margin })
    }

    fn standard(&self, obj: &Obj, loc: &str) -> Result<PreferencePair> {
        let what = "preference rows are {prompt, chosen, rejected}";
        let chosen = content(obj, "chosen", what, &self.fields, loc)?;
        let rejected = content(obj, "rejected", what, &self.fields, loc)?;
        let prompt = if obj.contains_key("prompt") { Some(content(obj, "prompt", what, &self.fields, loc)?) } else { None };
        match (prompt, chosen, rejected) {
            (Some(Content::Text(p)), Content::Text(c), Content::Text(r)) => self.text_pair(&p, &c, &r, loc),
            (Some(Content::Messages(p)), Content::Messages(c), Content::Messages(r)) => {
                let (prompt, mut done) = self.split_messages(&p, &[&c, &r], loc)?;
                let rejected = done.pop().expect("two completions");
                Ok(PreferencePair { prompt, chosen: done.pop().expect("two completions"), rejected })
            }
            // TRL's extract_prompt: the shared start of chosen and rejected.
            (None, Content::Text(c), Content::Text(r)) => {
                let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
                let at = implicit_prompt_len(&c, &r, |x| *x == ' ', loc)?;
                let s = |v: &[char]| v.iter().collect::<String>();
                self.text_pair(&s(&c[..at]), &s(&c[at..]), &s(&r[at..]), loc)
            }
            (None, Content::Messages(c), Content::Messages(r)) => {
                let at = implicit_prompt_len(&c, &r, |_| false, loc)?;
                let (prompt, mut done) = self.split_messages(&c[..at], &[&c[at..], &r[at..]], loc)?;
                let rejected = done.pop().expect("two completions");
                Ok(PreferencePair { prompt, chosen: done.pop().expect("two completions"), rejected })
            }
            _ => bail!(
                "{loc}: \"prompt\", \"chosen\" and \"rejected\" must all be strings or all lists of messages ({what})"
            ),
        }
    }

    /// Axolotl's chat_template.default: the prompt through the template with
    /// the generation prompt; each reply rendered after a dummy user turn,
    /// from where its content starts, trailing whitespace removed.
    fn chat_template_strings(&self, obj: &Obj, loc: &str) -> Result<(String, String, String)> {
        let template = self.template_for(loc)?;
        let f = &self.fields;
        let what = "chat_template.default rows are {messages, chosen, rejected}";
        let prompt = match obj.get(&f.field_messages) {
            Some(Value::String(s)) => vec![Message::new("user", s)],
            Some(Value::Array(_)) => messages(obj, &f.field_messages, f, loc)?,
            None => bail!("{loc}: missing \"{}\" ({what}); found keys {:?}", f.field_messages, keys(obj)),
            Some(v) => bail!("{loc}: \"{}\" must be a list of messages or a string, found {}", f.field_messages, kind(v)),
        };
        let prompt_text = template.render(&prompt, true).with_context(|| format!("{loc}: cannot render the prompt"))?;
        let reply = |field: &str| -> Result<String> {
            let msg = match obj.get(field) {
                Some(Value::String(s)) => Message::new("assistant", s),
                Some(v @ Value::Object(_)) => message(v, f, &format!("{loc}: \"{field}\""))?,
                Some(Value::Array(list)) => match list.last() {
                    Some(v) => message(v, f, &format!("{loc}: \"{field}\"[{}]", list.len() - 1))?,
                    None => bail!("{loc}: \"{field}\" is an empty list of messages"),
                },
                None => bail!("{loc}: missing \"{field}\" ({what}); found keys {:?}", keys(obj)),
                Some(v) => bail!("{loc}: \"{field}\" must be a message {{role, content}}, found {}", kind(v)),
            };
            let text = template
                .render(&[Message::new("user", "[[dummy_message]]"), msg.clone()], false)
                .with_context(|| format!("{loc}: cannot render \"{field}\""))?;
            let start = text.find(&msg.content).with_context(|| {
                format!(
                    "{loc}: the content of \"{field}\" does not appear in what the chat template ({}) renders",
                    template.origin()
                )
            })?;
            Ok(text[start..].trim_end().to_string())
        };
        Ok((prompt_text, reply(&f.field_chosen)?, reply(&f.field_rejected)?))
    }

    /// TRL's text path for a pair.
    fn text_pair(&self, prompt: &str, chosen: &str, rejected: &str, loc: &str) -> Result<PreferencePair> {
        let (prompt, mut done) = self.split_text(prompt, &[chosen, rejected], loc)?;
        let rejected = done.pop().expect("two completions");
        Ok(PreferencePair { prompt, chosen: done.pop().expect("two completions"), rejected })
    }

    /// Tokenize the prompt and each prompt + completion (EOS appended to
    /// the completion unless it ends with it); the completions start after
    /// the prefix all of them share with the prompt's ids.
    fn split_text(&self, prompt: &str, completions: &[&str], loc: &str) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
        let eos = self.eos_string()?;
        let prompt_ids = self.encode_text(prompt, loc)?;
        let full = completions
            .iter()
            .map(|c| self.encode_text(&format!("{prompt}{}", with_eos(c.to_string(), &eos)), loc))
            .collect::<Result<Vec<_>>>()?;
        Ok(split_at_shared_prefix(prompt_ids, full))
    }

    /// The same for conversations, through the chat template.
    fn split_messages(&self, prompt: &[Message], completions: &[&[Message]], loc: &str) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
        let prompt_ids = self.encode_messages(prompt, true, loc)?;
        let full = completions
            .iter()
            .map(|c| self.encode_messages(&[prompt, c].concat(), false, loc))
            .collect::<Result<Vec<_>>>()?;
        Ok(split_at_shared_prefix(prompt_ids, full))
    }

    fn encode_text(&self, text: &str, loc: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true).with_context(|| loc.to_string())
    }

    fn encode_messages(&self, turns: &[Message], add_generation_prompt: bool, loc: &str) -> Result<Vec<u32>> {
        let template = self.template_for(loc)?;
        let text = template
            .render(turns, add_generation_prompt)
            .with_context(|| format!("{loc}: cannot render the conversation"))?;
        self.tokenizer.encode(&text, false).with_context(|| loc.to_string())
    }

    fn template_for(&self, loc: &str) -> Result<&ChatTemplate> {
        self.template.with_context(|| {
            format!("{loc}: the row holds conversations, which need a chat template (set chat_template in the run config)")
        })
    }

    fn eos_string(&self) -> Result<String> {
        self.tokenizer.require_eos()?;
        Ok(self.tokenizer.special_tokens().eos.clone().expect("require_eos found it"))
    }
}

fn with_eos(mut text: String, eos: &str) -> String {
    if !text.ends_with(eos) {
        text.push_str(eos);
    }
    text
}

/// The prompt keeps the ids every prompt + completion shares with it; each
/// completion is the rest of its ids.
fn split_at_shared_prefix(prompt: Vec<u32>, full: Vec<Vec<u32>>) -> (Vec<u32>, Vec<Vec<u32>>) {
    let shared = full
        .iter()
        .map(|f| prompt.iter().zip(f).take_while(|(a, b)| a == b).count())
        .min()
        .unwrap_or(prompt.len());
    let completions = full.into_iter().map(|f| f[shared..].to_vec()).collect();
    let mut prompt = prompt;
    prompt.truncate(shared);
    (prompt, completions)
}

/// TRL's extract_prompt: the index of the first difference (one back if
/// the item before it is a space, for text); when one is a prefix of the
/// other, the last shared index.
fn implicit_prompt_len<T: PartialEq>(c: &[T], r: &[T], is_space: impl Fn(&T) -> bool, loc: &str) -> Result<usize> {
    let n = c.len().min(r.len());
    if n == 0 {
        bail!("{loc}: no \"prompt\", and \"chosen\" or \"rejected\" is empty, so no shared prompt can be taken from them");
    }
    let at = match (0..n).find(|&i| c[i] != r[i]) {
        Some(i) if i > 0 && is_space(&c[i - 1]) => i - 1,
        Some(i) => i,
        None => n - 1,
    };
    Ok(at)
}

fn object<'a>(row: &'a Value, loc: &str) -> Result<&'a Obj> {
    row.as_object().with_context(|| format!("{loc}: expected a JSON object (a preference row), found {}", kind(row)))
}

/// A field that is text or a conversation.
fn content(obj: &Obj, field: &str, what: &str, f: &MessageFields, loc: &str) -> Result<Content> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(Content::Text(s.clone())),
        Some(Value::Array(_)) => Ok(Content::Messages(messages(obj, field, f, loc)?)),
        None => bail!("{loc}: missing \"{field}\" ({what}); found keys {:?}", keys(obj)),
        Some(v) => bail!("{loc}: \"{field}\" must be a string or a list of messages, found {}", kind(v)),
    }
}

/// A list of {role, content} messages, roles normalised.
fn messages(obj: &Obj, field: &str, f: &MessageFields, loc: &str) -> Result<Vec<Message>> {
    let list = match obj.get(field) {
        Some(Value::Array(a)) => a,
        None => bail!("{loc}: missing \"{field}\"; found keys {:?}", keys(obj)),
        Some(v) => bail!("{loc}: \"{field}\" must be a list of messages, found {}", kind(v)),
    };
    list.iter().enumerate().map(|(i, m)| message(m, f, &format!("{loc}: \"{field}\"[{i}]"))).collect()
}

fn message(v: &Value, f: &MessageFields, here: &str) -> Result<Message> {
    let m = v.as_object().with_context(|| format!("{here} must be a message {{role, content}}, found {}", kind(v)))?;
    let what = "set message_property_mappings if the messages use other keys";
    let role = string(m, &f.role_key, what, here)?;
    let content = string(m, &f.content_key, what, here)?;
    let role = normalise_role(role)
        .with_context(|| format!("{here}: unknown role \"{role}\" (expected system, user, assistant or tool)"))?;
    Ok(Message::new(role, content))
}

/// Axolotl's strings for its ChatML / Llama-3 DPO strategies.
fn axolotl_strings(markup: Markup, layout: Layout, obj: &Obj, loc: &str) -> Result<(String, String, String)> {
    let what = match layout {
        Layout::Intel => "rows are {system?, question, chosen, rejected}",
        Layout::Icr => "rows are {system?, input, chosen, rejected}",
        Layout::PromptPairs => "rows are {system?, prompt, chosen, rejected}",
        Layout::Argilla => "rows are {system?, instruction, chosen_response, rejected_response}",
        Layout::Ultra => "rows are {system?, prompt, chosen: [messages], rejected: [messages]}",
        Layout::ArgillaChat => "rows are {chosen: [user, assistant], rejected: [user, assistant]}",
    };
    let end = markup.end_of_turn();
    let system = opt_string(obj, "system", loc)?;
    let reply = |field: &str| -> Result<String> { Ok(format!("{}{end}", string(obj, field, what, loc)?)) };
    let first_present = |names: &[&'static str]| -> &'static str {
        names.iter().copied().find(|n| obj.contains_key(*n)).unwrap_or(names[names.len() - 1])
    };
    Ok(match layout {
        Layout::Intel | Layout::Icr | Layout::PromptPairs => {
            let key = match layout {
                Layout::Intel => "question",
                Layout::Icr => "input",
                _ => "prompt",
            };
            (markup.prompt(system, string(obj, key, what, loc)?), reply("chosen")?, reply("rejected")?)
        }
        Layout::Argilla => {
            let key = first_present(&["prompt", "input", "question", "instruction"]);
            let chosen = first_present(&["chosen", "chosen_response"]);
            let rejected = first_present(&["rejected", "rejected_response"]);
            (markup.prompt(system, string(obj, key, what, loc)?), reply(chosen)?, reply(rejected)?)
        }
        Layout::Ultra => {
            let user = string(obj, "prompt", what, loc)?;
            let nth = |field: &str| -> Result<String> { Ok(format!("{}{end}", nth_content(obj, field, 1, what, loc)?)) };
            (markup.prompt(system, user), nth("chosen")?, nth("rejected")?)
        }
        Layout::ArgillaChat => {
            let user = nth_content(obj, "chosen", 0, what, loc)?;
            let nth = |field: &str| -> Result<String> { Ok(format!("{}{end}", nth_content(obj, field, 1, what, loc)?)) };
            (markup.prompt(None, &user), nth("chosen")?, nth("rejected")?)
        }
    })
}

/// The content of message `i` of a message list field.
fn nth_content(obj: &Obj, field: &str, i: usize, what: &str, loc: &str) -> Result<String> {
    let list = match obj.get(field) {
        Some(Value::Array(a)) => a,
        None => bail!("{loc}: missing \"{field}\" ({what}); found keys {:?}", keys(obj)),
        Some(v) => bail!("{loc}: \"{field}\" must be a list of messages, found {}", kind(v)),
    };
    let m = list.get(i).with_context(|| {
        format!("{loc}: \"{field}\" has {} message(s); its message {i} is the one used ({what})", list.len())
    })?;
    let here = format!("{loc}: \"{field}\"[{i}]");
    let m = m.as_object().with_context(|| format!("{here} must be a message {{role, content}}, found {}", kind(m)))?;
    Ok(string(m, "content", "each message is {role, content}", &here)?.to_string())
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
    fn names_parse_as_axolotl_spells_them() {
        assert_eq!(PreferenceFormat::parse(None).unwrap(), PreferenceFormat::Standard);
        for name in FORMAT_NAMES {
            assert!(PreferenceFormat::parse(Some(name)).is_ok(), "{name}");
        }
        assert_eq!(
            PreferenceFormat::parse(Some("llama3.default")).unwrap(),
            PreferenceFormat::Axolotl(Markup::Llama3, Layout::Argilla)
        );
        for bad in ["chatml.default", "llama3.argilla", "zephyr.nectar", "intel"] {
            let e = PreferenceFormat::parse(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown preference dataset type \"{bad}\"")), "{e}");
        }
    }

    #[test]
    fn shared_prefix_split_and_implicit_prompt() {
        let (p, c) = split_at_shared_prefix(vec![1, 5, 6], vec![vec![1, 5, 6, 7, 2], vec![1, 5, 9, 2]]);
        assert_eq!(p, vec![1, 5]);
        assert_eq!(c, vec![vec![6, 7, 2], vec![9, 2]]);
        let c: Vec<char> = "Q: sky? blue".chars().collect();
        let r: Vec<char> = "Q: sky? green".chars().collect();
        assert_eq!(implicit_prompt_len(&c, &r, |x| *x == ' ', "f:1").unwrap(), 7);
        assert_eq!(implicit_prompt_len(&[1, 2], &[1, 2, 3], |_| false, "f:1").unwrap(), 1);
        assert!(implicit_prompt_len::<u8>(&[], &[1], |_| false, "f:1").is_err());
    }

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
