//! Preference, KTO and reward-model rows into token ids: TRL's text path
//! (EOS appended, prompt and prompt + completion tokenized whole, split at
//! their shared prefix) and its conversational path through the chat
//! template.

use super::strategies::{PreferenceFormat, axolotl_strings};
use super::{KtoExample, PreferencePair, RewardPair};
use crate::data::chat_template::{ChatTemplate, Message};
use crate::data::formats::{Obj, keys, normalise_role, string};
use crate::data::pretokenized::kind;
use crate::data::tokenizer::TextTokenizer;
use anyhow::{Context, Result, bail};
use serde_json::Value;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
