//! The Ollama Modelfile written beside an exported GGUF: `FROM` the file, a
//! `TEMPLATE` in Ollama's Go-template syntax that renders a chat as the
//! model's own (Jinja) chat template does, and the turn delimiters as `stop`
//! parameters.
//!
//! The chat format is recognised from the delimiters in the Jinja template
//! (Llama 3, ChatML, Qwen3, Gemma, Phi-3, Mistral); any other template gets
//! no Modelfile, since a wrong template is worse than Ollama's plain default.
//! Within a format, what templates vary in (a preamble or default system
//! prompt, the generation prompt, Mistral's spacing) is read off the Jinja
//! template's own rendering of probe conversations.
//!
//! Ollama hands a template `.Messages` (system turns included, consecutive
//! turns of one role merged) and `.System` (the system turns joined). The
//! templates leave BOS to the tokenizer, which adds it itself, and leave a
//! final assistant turn open so that Ollama can continue it. Tool calls are
//! not templated.

use crate::data::chat_template::{ChatTemplate, Message, SpecialTokens};
use std::path::Path;

/// A Modelfile and the chat format its template was written for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modelfile {
    pub family: &'static str,
    pub text: String,
}

/// The chat formats a Modelfile can be written for (for messages that say
/// why there is none).
pub const FAMILIES: &[&str] = &["llama3", "chatml", "qwen3", "gemma", "phi3", "mistral"];

// Placeholders: @SYS@ writes the system block before the turns, @INTURN@ is
// `$.System` where the format puts the system text inside a user turn (else
// `""`), @GEN@ opens the assistant's reply after a final non-assistant turn.

/// Every turn with its role in a header; the header then a blank line.
const LLAMA3: &str = r#"@SYS@{{- range $i, $m := .Messages }}{{- if ne $m.Role "system" }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|start_header_id|>{{ $m.Role }}<|end_header_id|>

{{ $m.Content }}
{{- if not (and $last (eq $m.Role "assistant")) }}<|eot_id|>{{ end }}
{{- if and $last (ne $m.Role "assistant") }}@GEN@{{ end }}
{{- end }}{{ end }}"#;

/// Every turn as `<|im_start|>role`, newline, content, `<|im_end|>`, newline.
const CHATML: &str = r#"@SYS@{{- range $i, $m := .Messages }}{{- if ne $m.Role "system" }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|im_start|>{{ $m.Role }}
{{ $m.Content }}
{{- if not (and $last (eq $m.Role "assistant")) }}<|im_end|>
{{ end }}
{{- if and $last (ne $m.Role "assistant") }}@GEN@{{ end }}
{{- end }}{{ end }}"#;

/// Gemma has no system turn: the system text opens the first turn after it,
/// followed by a blank line. The assistant's turns are the "model" role's.
const GEMMA: &str = r#"@SYS@{{- $system := @INTURN@ }}
{{- range $i, $m := .Messages }}{{- if ne $m.Role "system" }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ $m.Content }}
{{- if not (and $last (eq $m.Role "assistant")) }}<end_of_turn>
{{ end }}
{{- if and $last (ne $m.Role "assistant") }}@GEN@{{ end }}
{{- end }}{{ end }}"#;

/// Every turn as `<|role|>`, newline, content, `<|end|>`, newline.
const PHI3: &str = r#"@SYS@{{- range $i, $m := .Messages }}{{- if ne $m.Role "system" }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}<|{{ $m.Role }}|>
{{ $m.Content }}
{{- if not (and $last (eq $m.Role "assistant")) }}<|end|>
{{ end }}
{{- if and $last (ne $m.Role "assistant") }}@GEN@{{ end }}
{{- end }}{{ end }}"#;

/// @OPEN@ starts a user turn, @CLOSE@ ends it, @LEAD@ starts a reply and
/// @END@ ends one. Without a system block the system text goes into the last
/// user turn, as the later Mistral templates put it.
const MISTRAL: &str = r#"@SYS@{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}@OPEN@{{ if and $last @INTURN@ }}{{ $.System }}

{{ end }}{{ $m.Content }}@CLOSE@{{ else if eq $m.Role "assistant" }}@LEAD@{{ $m.Content }}{{ if not $last }}@END@{{ end }}{{ end }}
{{- end }}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Llama3,
    ChatMl,
    Qwen3,
    Gemma,
    Phi3,
    Mistral,
}

impl Family {
    fn name(self) -> &'static str {
        FAMILIES[self as usize]
    }

    /// The delimiters that end or start a turn, which generation stops at.
    fn stops(self) -> &'static [&'static str] {
        match self {
            Family::Llama3 => &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            Family::ChatMl | Family::Qwen3 => &["<|im_start|>", "<|im_end|>"],
            Family::Gemma => &["<start_of_turn>", "<end_of_turn>"],
            Family::Phi3 => &["<|end|>", "<|user|>", "<|assistant|>"],
            Family::Mistral => &["[INST]", "[/INST]"],
        }
    }

    /// The Go template, the text a user turn starts with, and the system
    /// block (before, after the system text) and generation prompt to use
    /// when the probes find none; no block: the text goes inside a turn.
    fn parts(self) -> (&'static str, &'static str, Option<(&'static str, &'static str)>, &'static str) {
        match self {
            Family::Llama3 => (
                LLAMA3,
                "<|start_header_id|>",
                Some(("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")),
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
            ),
            Family::ChatMl | Family::Qwen3 => {
                (CHATML, "<|im_start|>", Some(("<|im_start|>system\n", "<|im_end|>\n")), "<|im_start|>assistant\n")
            }
            Family::Gemma => (GEMMA, "<start_of_turn>", None, "<start_of_turn>model\n"),
            Family::Phi3 => (PHI3, "<|user|>", Some(("<|system|>\n", "<|end|>\n")), "<|assistant|>\n"),
            Family::Mistral => (MISTRAL, "[INST]", None, ""),
        }
    }
}

/// The chat format of a Jinja chat template, from the delimiters it writes.
fn detect(template: &str) -> Option<Family> {
    let has = |needles: &[&str]| needles.iter().all(|n| template.contains(n));
    if has(&["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]) {
        Some(Family::Llama3)
    } else if has(&["<|im_start|>", "<|im_end|>"]) {
        // Qwen3's templates are ChatML that also handle <think> blocks.
        Some(if template.contains("<think>") { Family::Qwen3 } else { Family::ChatMl })
    } else if has(&["<start_of_turn>", "<end_of_turn>"]) {
        Some(Family::Gemma)
    } else if has(&["<|user|>", "<|assistant|>", "<|end|>"]) {
        Some(Family::Phi3)
    } else if has(&["[INST]", "[/INST]"]) {
        Some(Family::Mistral)
    } else {
        None
    }
}

/// The Modelfile for a GGUF named `gguf_file_name`, from the chat template
/// (None: no template) and the EOS token text; None when the chat format is
/// not one Ollama can be given a template for.
pub fn modelfile(gguf_file_name: &str, chat_template: Option<&str>, eos_token: Option<&str>) -> Option<Modelfile> {
    let source = chat_template?;
    let family = detect(source)?;
    // A template that does not compile or render still tells its format by
    // its delimiters; only the pieces read from its output fall back.
    let tokens = SpecialTokens { bos: Some(String::new()), eos: eos_token.map(str::to_string), ..Default::default() };
    let compiled = ChatTemplate::from_source(source.to_string(), "chat template".to_string(), tokens).ok();
    let (template, user_start, default_block, default_gen) = family.parts();
    let block = |(a, b): (&str, &str), d: &str| format!("{{{{- if .System }}}}{a}{{{{ .System }}}}{b}{{{{ else }}}}{d}{{{{ end }}}}");
    let probed = compiled.as_ref().and_then(|t| system_block(t, user_start));
    let (sys, in_turn) = match (probed, default_block) {
        (Some((a, b, d)), _) => (block((&a, &b), &d), "\"\""),
        (None, Some(ab)) => (block(ab, ""), "\"\""),
        (None, None) => (String::new(), "$.System"),
    };
    let prompt = compiled.as_ref().and_then(gen_prompt).unwrap_or_else(|| default_gen.to_string());
    let mut template = template.replace("@SYS@", &sys).replace("@INTURN@", in_turn).replace("@GEN@", &prompt);
    if family == Family::Mistral {
        let p = compiled.as_ref().and_then(mistral_pieces).unwrap_or_else(|| MistralPieces {
            open: "[INST] ".into(),
            close: "[/INST]".into(),
            lead: " ".into(),
            end: eos_token.filter(|e| quotable(e)).unwrap_or("</s>").into(),
        });
        template = template.replace("@OPEN@", &p.open).replace("@CLOSE@", &p.close);
        template = template.replace("@LEAD@", &p.lead).replace("@END@", &p.end);
    }
    let mut stops: Vec<&str> = family.stops().to_vec();
    if family == Family::Llama3 && source.contains("<|eom_id|>") {
        stops.push("<|eom_id|>");
    }
    if let Some(eos) = eos_token.filter(|e| quotable(e) && !stops.contains(e)) {
        stops.push(eos);
    }
    let base = Path::new(gguf_file_name).file_name().map_or(gguf_file_name.into(), |n| n.to_string_lossy());
    let mut text = format!("FROM ./{base}\n\nTEMPLATE \"\"\"{template}\"\"\"\n\n");
    for stop in stops {
        text.push_str(&format!("PARAMETER stop \"{stop}\"\n"));
    }
    Some(Modelfile { family: family.name(), text })
}

/// Text that can stand inside a quoted Modelfile value as it is.
fn quotable(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c == '"' || c == '\\' || c.is_control())
}

/// Literal text that can go into the Go template as it is.
fn literal(s: &str) -> bool {
    let placeholder = ["@SYS@", "@INTURN@", "@GEN@", "@OPEN@", "@CLOSE@", "@LEAD@", "@END@"].iter().any(|p| s.contains(p));
    !s.contains("{{") && !s.contains("\"\"\"") && !placeholder && !s.contains("ferrotune-probe")
}

const PROBE_SYSTEM: &str = "ferrotune-probe-system";
const PROBE_USER: &str = "ferrotune-probe-user";

/// The text before the user turn that holds `PROBE_USER`.
fn before_user<'a>(out: &'a str, user_start: &str) -> Option<&'a str> {
    let at = out.find(PROBE_USER)?;
    Some(&out[..out[..at].rfind(user_start)?])
}

/// Where the template writes the system prompt when it is a block of its
/// own before the turns: the text before and after it (a fixed preamble,
/// e.g. a knowledge-cutoff line), and the block written when there is no
/// system prompt (a default one). None when the prompt goes inside a turn.
fn system_block(t: &ChatTemplate, user_start: &str) -> Option<(String, String, String)> {
    let with = t.render(&[Message::new("system", PROBE_SYSTEM), Message::new("user", PROBE_USER)], false).ok()?;
    let without = t.render(&[Message::new("user", PROBE_USER)], false).ok()?;
    let (a, b) = before_user(&with, user_start)?.split_once(PROBE_SYSTEM)?;
    let d = before_user(&without, user_start)?;
    [a, b, d].iter().all(|p| literal(p)).then(|| (a.to_string(), b.to_string(), d.to_string()))
}

/// What `add_generation_prompt` appends after a user turn.
fn gen_prompt(t: &ChatTemplate) -> Option<String> {
    let msgs = [Message::new("user", PROBE_USER)];
    let (closed, open) = (t.render(&msgs, false).ok()?, t.render(&msgs, true).ok()?);
    // Phi-3's templates end a chat without the prompt with EOS.
    let unended = t.eos_token().and_then(|e| closed.strip_suffix(e));
    let prompt = open.strip_prefix(closed.as_str()).or_else(|| open.strip_prefix(unended?))?;
    (!prompt.is_empty() && literal(prompt)).then(|| prompt.to_string())
}

struct MistralPieces {
    open: String,
    close: String,
    lead: String,
    end: String,
}

/// Read the Mistral pieces off the template's rendering of user, assistant,
/// user: `OPEN u1 CLOSE LEAD a1 END OPEN u2 CLOSE`.
fn mistral_pieces(t: &ChatTemplate) -> Option<MistralPieces> {
    let (u1, a1, u2) = ("ferrotune-probe-u1", "ferrotune-probe-a1", "ferrotune-probe-u2");
    let msgs = [Message::new("user", u1), Message::new("assistant", a1), Message::new("user", u2)];
    let out = t.render(&msgs, true).ok()?;
    let (head, rest) = out.split_once(u1)?;
    let (mid, rest) = rest.split_once(a1)?;
    let (between, close) = rest.split_once(u2)?;
    let lead = mid.strip_prefix(close)?;
    let (end, open) = between.split_at(between.find("[INST]")?);
    let ok = head.ends_with(open) && close.contains("[/INST]") && [open, close, lead, end].into_iter().all(literal);
    ok.then(|| MistralPieces { open: open.into(), close: close.into(), lead: lead.into(), end: end.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Templates written here in the formats no repository fixture has.
    const GEMMA_FMT: &str = "{{ bos_token }}{% if messages[0].role == 'system' %}{% set pre = messages[0].content + '\n\n' %}{% set rest = messages[1:] %}{% else %}{% set pre = '' %}{% set rest = messages %}{% endif %}{% for m in rest %}{{ '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\n' + (pre if loop.first else '') + m.content | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";
    const PHI3_FMT: &str = "{% for m in messages %}{% if m.role in ['system', 'user', 'assistant'] %}{{ {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>'}[m.role] + '\n' + m.content + '<|end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";
    const QWEN3_FMT: &str = "{% for m in messages %}{% set c = m.content.split('</think>')[-1].lstrip('\n') if m.role == 'assistant' else m.content %}{{ '<|im_start|>' + m.role + '\n' + c + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}";
    const MISTRAL3_FMT: &str = "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}{{ bos_token }}{% for m in rest %}{% if m.role == 'user' %}{{ '[INST] ' + (sys + '\n\n' if loop.last and sys is defined else '') + m.content + '[/INST]' }}{% else %}{{ ' ' + m.content + eos_token }}{% endif %}{% endfor %}";

    fn fixture(name: &str) -> String {
        let path = format!("{}/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// (name, Jinja source, EOS, expected family) for every template case.
    fn cases() -> Vec<(String, String, &'static str, Option<&'static str>)> {
        let render: serde_json::Value = serde_json::from_str(&fixture("tests/fixtures/chat_templates/render.json")).unwrap();
        let mut out = Vec::new();
        for (key, eos, family) in [
            ("llama3_meta", "<|eot_id|>", Some("llama3")),
            ("builtin_llama3", "<|end_of_text|>", Some("llama3")),
            ("qwen2_chatml", "<|im_end|>", Some("chatml")),
            ("builtin_chatml", "<|endoftext|>", Some("chatml")),
            ("mistral", "</s>", Some("mistral")),
            ("features", "</s>", None),
        ] {
            out.push((key.to_string(), render["templates"][key].as_str().unwrap().to_string(), eos, family));
        }
        for (file, eos, family) in [
            ("src/data/templates/chatml.jinja", "<|im_end|>", Some("chatml")),
            ("src/data/templates/llama3.jinja", "<|eot_id|>", Some("llama3")),
            ("examples/quickstart/model/chat_template.jinja", "</s>", None),
        ] {
            out.push((file.to_string(), fixture(file), eos, family));
        }
        for (name, src, eos, family) in [
            ("gemma format", GEMMA_FMT, "<eos>", "gemma"),
            ("phi3 format", PHI3_FMT, "<|endoftext|>", "phi3"),
            ("qwen3 format", QWEN3_FMT, "<|im_end|>", "qwen3"),
            ("mistral v0.3 format", MISTRAL3_FMT, "</s>", "mistral"),
        ] {
            out.push((name.to_string(), src.to_string(), eos, Some(family)));
        }
        out
    }

    /// The two-turn chat without a system prompt, and with one unless the
    /// template refuses system turns; each with the Jinja rendering with
    /// the prompt for the next reply, less the BOS that the tokenizer adds.
    fn jinja_chats(src: &str, eos: &str) -> Vec<(Vec<Message>, String)> {
        let tokens = SpecialTokens { bos: Some("<s>".into()), eos: Some(eos.into()), ..Default::default() };
        let t = ChatTemplate::from_source(src.into(), "test".into(), tokens).unwrap();
        let chat = [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")];
        let plain: Vec<Message> = chat.iter().map(|(r, c)| Message::new(r, c)).collect();
        let with_system = [vec![Message::new("system", "You are terse.")], plain.clone()].concat();
        let render = |m: &[Message]| t.render(m, true).map(|o| o.strip_prefix("<s>").unwrap_or(&o).to_string());
        let mut out = vec![(plain.clone(), render(&plain).unwrap())];
        out.extend(render(&with_system).ok().map(|o| (with_system, o)));
        out
    }

    fn go_template(text: &str) -> &str {
        text.split_once("TEMPLATE \"\"\"").unwrap().1.split_once("\"\"\"").unwrap().0
    }

    #[test]
    fn detects_the_family_of_each_template() {
        for (name, src, eos, family) in cases() {
            let got = modelfile("model.gguf", Some(&src), Some(eos)).map(|m| m.family);
            assert_eq!(got, family, "{name}");
        }
        assert_eq!(modelfile("model.gguf", None, Some("</s>")), None);
    }

    #[test]
    fn modelfile_has_from_stops_and_the_delimiters_in_order() {
        for (name, src, eos, family) in cases() {
            let Some(family) = family else { continue };
            let mf = modelfile("out/run 1/model-Q4_K_M.gguf", Some(&src), Some(eos)).unwrap();
            assert!(mf.text.starts_with("FROM ./model-Q4_K_M.gguf\n\nTEMPLATE \"\"\""), "{name}:\n{}", mf.text);
            let fam = detect(&src).unwrap();
            assert_eq!(fam.name(), family);
            for stop in fam.stops().iter().chain([&eos]) {
                assert!(mf.text.contains(&format!("\nPARAMETER stop \"{stop}\"\n")), "{name}: no stop {stop}");
            }
            // The delimiters written as literals in the Go template must come
            // first in the same order in the Jinja rendering of the chat.
            let template = go_template(&mf.text);
            let literal: &[&str] = match fam {
                Family::Phi3 => &["<|end|>", "<|assistant|>"],
                Family::Mistral => &["[INST]", "[/INST]", eos],
                _ => fam.stops(),
            };
            let (_, rendered) = jinja_chats(&src, eos).pop().unwrap();
            let order = |text: &str| {
                let mut found: Vec<(usize, &str)> =
                    literal.iter().filter_map(|d| text.find(d).map(|at| (at, *d))).collect();
                found.sort();
                found.into_iter().map(|(_, d)| d).collect::<Vec<_>>()
            };
            assert_eq!(order(template).len(), literal.len(), "{name}: a delimiter is missing from\n{template}");
            assert_eq!(order(template), order(&rendered), "{name}: order differs from\n{rendered}");
        }
    }

    #[test]
    fn default_system_prompt_is_written_when_the_chat_has_none() {
        let mf = |key: &str| {
            let src = cases().into_iter().find(|c| c.0 == key).unwrap().1;
            modelfile("m.gguf", Some(&src), Some("<|im_end|>")).unwrap().text
        };
        let qwen2 = "{{ else }}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{{ end }}";
        assert!(mf("qwen2_chatml").contains(qwen2), "{}", mf("qwen2_chatml"));
        assert!(mf("builtin_chatml").contains("<|im_end|>\n{{ else }}{{ end }}"), "{}", mf("builtin_chatml"));
    }

    #[test]
    fn mistral_pieces_follow_the_template_version() {
        let v1 = cases().into_iter().find(|c| c.0 == "mistral").unwrap().1;
        let t = |src: &str| go_template(&modelfile("m.gguf", Some(src), Some("</s>")).unwrap().text).to_string();
        let (old, new) = (t(&v1), t(MISTRAL3_FMT));
        assert!(old.contains("}}[INST] {{") && old.contains("{{ $m.Content }} [/INST]{{"), "{old}");
        assert!(old.contains("\"assistant\" }}{{ $m.Content }}{{ if not $last }}</s>{{"), "{old}");
        assert!(new.contains("{{ $m.Content }}[/INST]{{") && new.contains("\"assistant\" }} {{ $m.Content }}"), "{new}");
        // A template that does not render falls back to the later version's pieces.
        let broken = "[INST] [/INST] {{ raise_exception('no') }}";
        assert!(t(broken).contains("{{ $m.Content }}[/INST]{{"));
    }

    /// Render each Go template with Go's text/template, given what Ollama
    /// gives it, and compare with the Jinja rendering. Skipped without `go`.
    #[test]
    fn go_text_template_renders_the_chat_as_jinja_does() {
        if std::process::Command::new("go").arg("version").output().map_or(true, |o| !o.status.success()) {
            eprintln!("skipped: no `go` on PATH to run text/template");
            return;
        }
        const MAIN: &str = r#"package main
import ("encoding/json"; "os"; "strings"; "text/template")
type Message struct { Role string; Content string }
type Case struct { Template string; System string; Messages []*Message }
func main() {
	raw, err := os.ReadFile(os.Args[1]); if err != nil { panic(err) }
	var cases []Case; if err := json.Unmarshal(raw, &cases); err != nil { panic(err) }
	var out []string
	for _, c := range cases {
		t := template.Must(template.New("").Option("missingkey=zero").Parse(c.Template))
		var b strings.Builder
		data := map[string]any{"System": c.System, "Messages": c.Messages, "Tools": nil, "Response": ""}
		if err := t.Execute(&b, data); err != nil { panic(err) }
		out = append(out, b.String())
	}
	enc, _ := json.Marshal(out); os.Stdout.Write(enc)
}
"#;
        let (mut inputs, mut expected) = (Vec::new(), Vec::new());
        for (name, src, eos, family) in cases() {
            if family.is_none() {
                continue;
            }
            let mf = modelfile("m.gguf", Some(&src), Some(eos)).unwrap();
            for (msgs, want) in jinja_chats(&src, eos) {
                // Ollama joins the system turns into .System and merges
                // consecutive turns of one role.
                let system: Vec<&str> = msgs.iter().filter(|m| m.role == "system").map(|m| m.content.as_str()).collect();
                let mut merged: Vec<Message> = Vec::new();
                for m in msgs.iter().cloned() {
                    match merged.last_mut() {
                        Some(prev) if prev.role == m.role => prev.content = format!("{}\n\n{}", prev.content, m.content),
                        _ => merged.push(m),
                    }
                }
                let messages: Vec<serde_json::Value> =
                    merged.iter().map(|m| serde_json::json!({"Role": m.role, "Content": m.content})).collect();
                let template = go_template(&mf.text);
                inputs.push(serde_json::json!({"Template": template, "System": system.join("\n\n"), "Messages": messages}));
                expected.push((format!("{name}, {} turns", msgs.len()), want));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("main.go"), MAIN).unwrap();
        std::fs::write(dir.path().join("cases.json"), serde_json::to_string(&inputs).unwrap()).unwrap();
        let out = std::process::Command::new("go").args(["run", "main.go", "cases.json"]).current_dir(dir.path()).output().unwrap();
        assert!(out.status.success(), "go run failed: {}", String::from_utf8_lossy(&out.stderr));
        let got: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got.len(), expected.len());
        for ((name, want), got) in expected.iter().zip(&got) {
            assert_eq!(got, want, "{name}: the Go template renders otherwise than the Jinja one");
        }
    }
}
