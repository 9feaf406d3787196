//! The prompts of `ferrotune generate`: one from --prompt, or one per row
//! of a --prompts JSONL file, each `{"prompt": "text"}` or
//! `{"prompt": [{"role": .., "content": ..}, ...]}` (a conversation,
//! rendered with the chat template and the assistant turn opened). Blank
//! lines are skipped; a bad row is an error naming the file and line.

use crate::data::chat_template::{ChatTemplate, Message};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;

/// What a prompt row holds.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptText {
    /// Plain text (sent through the chat template as a user message with
    /// --chat).
    Text(String),
    /// A conversation, always rendered with the chat template.
    Messages(Vec<Message>),
}

/// One prompt with where it came from: its line in the --prompts file (1
/// for --prompt).
#[derive(Debug, Clone)]
pub struct PromptRow {
    pub line: usize,
    pub text: PromptText,
}

/// The rows of a --prompts file.
pub fn read_prompts_file(path: &Path) -> Result<Vec<PromptRow>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the prompts file {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let prompt = match v.get("prompt") {
            Some(p) => p,
            None => bail!("{}: expected an object with a \"prompt\" key ({{\"prompt\": \"text\"}} or a list of messages)", at()),
        };
        let text = match prompt {
            Value::String(s) => PromptText::Text(s.clone()),
            Value::Array(items) => PromptText::Messages(messages(items).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?),
            _ => bail!("{}: \"prompt\" must be a string or a list of {{\"role\", \"content\"}} messages", at()),
        };
        rows.push(PromptRow { line: i + 1, text });
    }
    if rows.is_empty() {
        bail!("the prompts file {} has no rows (one {{\"prompt\": ...}} object per line)", path.display());
    }
    Ok(rows)
}

fn messages(items: &[Value]) -> Result<Vec<Message>> {
    if items.is_empty() {
        bail!("\"prompt\" is an empty list of messages");
    }
    items
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let field = |key: &str| m.get(key).and_then(Value::as_str);
            match (field("role"), field("content")) {
                (Some(role), Some(content)) => Ok(Message::new(role, content)),
                _ => bail!("message {j} of \"prompt\" must be an object with string \"role\" and \"content\", got {m}"),
            }
        })
        .collect()
}

/// How prompt text becomes token ids.
pub struct Render<'a> {
    pub dir: &'a Path,
    /// --chat: plain text goes through the template as a user message.
    pub chat: bool,
    pub system: Option<&'a str>,
    /// --chat-template.
    pub template: Option<&'a str>,
}

impl Render<'_> {
    fn template(&self) -> Result<ChatTemplate> {
        if self.template.is_none() && !ChatTemplate::tokenizer_has_one(self.dir)? {
            bail!(
                "{} has no chat_template of its own (none in tokenizer_config.json, no chat_template.jinja); \
                 pass --chat-template chatml (or llama3), or drop --chat to send the prompt as plain text",
                self.dir.display()
            );
        }
        ChatTemplate::resolve(self.template, None, self.dir)
    }

    /// The row's token ids: plain text with the tokenizer's special tokens,
    /// or the rendered conversation, whose template writes the special
    /// tokens itself (as transformers' apply_chat_template tokenizes it).
    /// `what` names the row in errors.
    pub fn ids(&self, text: &PromptText, tok: &tokenizers::Tokenizer, what: &str) -> Result<Vec<u32>> {
        let mut conversation = Vec::new();
        if let Some(s) = self.system {
            conversation.push(Message::new("system", s));
        }
        let (text, add_special) = match text {
            PromptText::Text(t) if !self.chat => (t.clone(), true),
            PromptText::Text(t) => {
                conversation.push(Message::new("user", t));
                (self.template()?.render(&conversation, true)?, false)
            }
            PromptText::Messages(m) => {
                conversation.extend(m.iter().cloned());
                (self.template()?.render(&conversation, true).with_context(|| format!("cannot render {what}"))?, false)
            }
        };
        let enc = tok
            .encode_fast(text.as_str(), add_special)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {what} with {}: {e}", self.dir.join("tokenizer.json").display()))?;
        if enc.get_ids().is_empty() {
            bail!("{what} is empty and the tokenizer adds no start token to it: give some text");
        }
        Ok(enc.get_ids().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Result<Vec<PromptRow>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, text).unwrap();
        read_prompts_file(&path).map_err(|e| anyhow::anyhow!("{}", e.to_string().replace(&path.display().to_string(), "p.jsonl")))
    }

    #[test]
    fn rows_are_text_or_conversations_and_blank_lines_are_skipped() {
        let r = rows("{\"prompt\": \"hi\"}\n\n{\"prompt\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].line, &r[0].text), (1, &PromptText::Text("hi".into())));
        assert_eq!((r[1].line, &r[1].text), (3, &PromptText::Messages(vec![Message::new("user", "yo")])));
    }

    #[test]
    fn bad_rows_name_the_file_and_line() {
        let e = |text: &str| format!("{:#}", rows(text).unwrap_err());
        assert!(e("{\"prompt\": \"a\"}\n{oops\n").starts_with("p.jsonl line 2: not valid JSON"), "{}", e("{oops"));
        assert!(e("{\"text\": \"a\"}\n").starts_with("p.jsonl line 1: expected an object with a \"prompt\" key"));
        assert!(e("{\"prompt\": 3}\n").contains("p.jsonl line 1: \"prompt\" must be a string or a list"));
        let m = e("\n{\"prompt\": [{\"role\": \"user\"}]}\n");
        assert!(m.contains("p.jsonl line 2: message 0 of \"prompt\" must be an object with string \"role\" and \"content\""), "{m}");
        assert!(e("{\"prompt\": []}\n").contains("line 1: \"prompt\" is an empty list of messages"));
        assert!(e("\n\n").contains("has no rows"));
    }
}
