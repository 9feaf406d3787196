//! The `type:` of a preference dataset and Axolotl's ChatML / Llama-3 DPO
//! strategies: which fields each reads and the prompt and reply strings it
//! builds from them (TRL's text path tokenizes those).

use crate::config::PREFERENCE_DATASET_TYPES;
use crate::data::formats::{Obj, keys, opt_string, string};
use crate::data::pretokenized::kind;
use anyhow::{Context, Result, bail};
use serde_json::Value;

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

impl PreferenceFormat {
    pub fn parse(kind: Option<&str>) -> Result<PreferenceFormat> {
        let Some(name) = kind.filter(|k| !k.is_empty()) else { return Ok(PreferenceFormat::Standard) };
        if name == "chat_template.default" {
            return Ok(PreferenceFormat::ChatTemplate);
        }
        let unknown = || {
            anyhow::anyhow!(
                "unknown preference dataset type \"{name}\" (expected one of {}, or no type for {{prompt, chosen, rejected}} rows)",
                PREFERENCE_DATASET_TYPES.join(", ")
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


/// Axolotl's strings for its ChatML / Llama-3 DPO strategies.
pub(super) fn axolotl_strings(markup: Markup, layout: Layout, obj: &Obj, loc: &str) -> Result<(String, String, String)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_axolotl_spells_them() {
        assert_eq!(PreferenceFormat::parse(None).unwrap(), PreferenceFormat::Standard);
        for name in PREFERENCE_DATASET_TYPES {
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
}
