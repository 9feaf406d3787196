//! Chat templates: the Jinja text that turns a conversation into one string,
//! rendered as transformers' `apply_chat_template` renders it (jinja2 with
//! trim_blocks and lstrip_blocks, its `tojson`, `raise_exception` and
//! `strftime_now`, the tokenizer's special tokens in the context), so that a
//! model fine-tuned here sees exactly the text it will be prompted with.

use anyhow::{Context, Result, bail};
use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use std::path::Path;
use std::sync::Arc;

/// One turn of a conversation, after role names are normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

/// The names `chat_template:` accepts besides "jinja" and "tokenizer_default".
pub const BUILTIN_NAMES: &[&str] = &["chatml", "llama3"];

const CHATML: &str = include_str!("templates/chatml.jinja");
const LLAMA3: &str = include_str!("templates/llama3.jinja");

/// The special-token strings a template can refer to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

impl SpecialTokens {
    /// The tokens named in tokenizer_config.json (falling back to the older
    /// special_tokens_map.json); each is a string or an object with "content".
    pub fn from_tokenizer_dir(dir: &Path) -> Result<SpecialTokens> {
        let mut out = SpecialTokens::default();
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
            for (key, slot) in [
                ("bos_token", &mut out.bos),
                ("eos_token", &mut out.eos),
                ("pad_token", &mut out.pad),
                ("unk_token", &mut out.unk),
            ] {
                match v.get(key) {
                    None | Some(serde_json::Value::Null) => {}
                    Some(serde_json::Value::String(s)) => *slot = Some(s.clone()),
                    Some(obj @ serde_json::Value::Object(_)) => match obj.get("content").and_then(|c| c.as_str()) {
                        Some(s) => *slot = Some(s.to_string()),
                        None => bail!("{}: \"{key}\" is an object without a string \"content\"", path.display()),
                    },
                    Some(other) => bail!("{}: \"{key}\" must be a string or {{\"content\": ...}}, found {other}", path.display()),
                }
            }
        }
        Ok(out)
    }

    /// Replace one token by its `special_tokens:` key (bos_token, eos_token,
    /// pad_token, unk_token).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let slot = match key {
            "bos_token" => &mut self.bos,
            "eos_token" => &mut self.eos,
            "pad_token" => &mut self.pad,
            "unk_token" => &mut self.unk,
            _ => bail!("special_tokens.{key}: unknown key (expected bos_token, eos_token, pad_token or unk_token)"),
        };
        *slot = Some(value.to_string());
        Ok(())
    }
}

/// A compiled chat template and the special tokens it renders with.
pub struct ChatTemplate {
    source: String,
    origin: String,
    env: Environment<'static>,
    tokens: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("origin", &self.origin).field("tokens", &self.tokens).finish()
    }
}

impl ChatTemplate {
    /// Whether the tokenizer directory brings a chat template of its own
    /// (tokenizer_config.json's chat_template, or chat_template.jinja).
    pub fn tokenizer_has_one(tokenizer_dir: &Path) -> Result<bool> {
        Ok(tokenizer_template(tokenizer_dir)?.is_some())
    }

    /// Pick the template a run asks for: a built-in name (chatml, llama3),
    /// "tokenizer_default" or None (the tokenizer's own template),
    /// "tokenizer_default_fallback_chatml", or "jinja" with the template text.
    /// Special tokens come from the tokenizer directory.
    pub fn resolve(name: Option<&str>, jinja: Option<&str>, tokenizer_dir: &Path) -> Result<ChatTemplate> {
        let tokens = SpecialTokens::from_tokenizer_dir(tokenizer_dir)?;
        let (source, origin) = match name.unwrap_or("tokenizer_default") {
            "chatml" => (CHATML.to_string(), "built-in chatml".to_string()),
            "llama3" => (LLAMA3.to_string(), "built-in llama3".to_string()),
            "jinja" => match jinja {
                Some(text) if !text.trim().is_empty() => (text.to_string(), "chat_template_jinja".to_string()),
                _ => bail!("chat_template: jinja needs the template text in chat_template_jinja"),
            },
            "tokenizer_default" => match tokenizer_template(tokenizer_dir)? {
                Some(found) => found,
                None => bail!(
                    "{} has no chat_template (and there is no chat_template.jinja beside it); \
                     set chat_template: chatml (or llama3, or jinja with chat_template_jinja) in the run config",
                    tokenizer_dir.join("tokenizer_config.json").display()
                ),
            },
            "tokenizer_default_fallback_chatml" => match tokenizer_template(tokenizer_dir)? {
                Some(found) => found,
                None => (CHATML.to_string(), "built-in chatml".to_string()),
            },
            other => bail!(
                "chat_template: unknown template \"{other}\" (expected one of {}, tokenizer_default, \
                 tokenizer_default_fallback_chatml, or jinja with chat_template_jinja)",
                BUILTIN_NAMES.join(", ")
            ),
        };
        ChatTemplate::from_source(source, origin, tokens)
    }

    /// Compile template text. `origin` names where it came from in errors.
    pub fn from_source(source: String, origin: String, tokens: SpecialTokens) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        // `{% generation %}` only marks assistant spans for transformers'
        // return_assistant_tokens_mask; it renders its body unchanged.
        let body = strip_generation_tags(&source);
        env.add_template_owned("chat_template", body)
            .map_err(|e| anyhow::anyhow!("{origin}: the chat template does not compile: {}", describe(&e)))?;
        Ok(ChatTemplate { source, origin, env, tokens })
    }

    /// Render a conversation (`add_generation_prompt` appends the header that
    /// opens the assistant's reply).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<Value> = messages.iter().map(|m| Value::from_object(MessageValue(m.clone()))).collect();
        let tok = |t: &Option<String>| t.as_deref().map(Value::from).unwrap_or(Value::UNDEFINED);
        let ctx = minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => tok(&self.tokens.bos),
            eos_token => tok(&self.tokens.eos),
            pad_token => tok(&self.tokens.pad),
            unk_token => tok(&self.tokens.unk),
        };
        let tmpl = self.env.get_template("chat_template").expect("added at construction");
        tmpl.render(ctx).map_err(|e| anyhow::anyhow!("{}: {}", self.origin, describe(&e)))
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Where the template came from ("built-in chatml", a file path, ...).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn tokens(&self) -> &SpecialTokens {
        &self.tokens
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.tokens.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.tokens.eos.as_deref()
    }

    /// Render with other special tokens (the run's `special_tokens:`).
    pub fn set_tokens(&mut self, tokens: SpecialTokens) {
        self.tokens = tokens;
    }
}

/// The template a tokenizer ships: chat_template.jinja beside it (how
/// transformers saves it now), else tokenizer_config.json's `chat_template`
/// (a string, or a list of {name, template} of which "default" is used).
fn tokenizer_template(dir: &Path) -> Result<Option<(String, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let origin = path.display().to_string();
    match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some((s.clone(), origin))),
        Some(serde_json::Value::Array(list)) => {
            for entry in list {
                if entry.get("name").and_then(|n| n.as_str()) == Some("default") {
                    let t = entry.get("template").and_then(|t| t.as_str()).with_context(|| {
                        format!("{origin}: chat_template entry \"default\" has no string \"template\"")
                    })?;
                    return Ok(Some((t.to_string(), format!("{origin} (chat_template \"default\")"))));
                }
            }
            let names: Vec<&str> = list.iter().filter_map(|e| e.get("name").and_then(|n| n.as_str())).collect();
            bail!("{origin}: chat_template lists {names:?} but no \"default\"; choose one with chat_template: jinja")
        }
        Some(other) => bail!("{origin}: \"chat_template\" must be a string or a list of {{name, template}}, found {other}"),
    }
}

/// Remove `{% generation %}` / `{% endgeneration %}` tags (with any
/// whitespace-control dashes), keeping what they enclose.
fn strip_generation_tags(src: &str) -> String {
    let re = regex::Regex::new(r"\{%-?\s*(end)?generation\s*-?%\}").expect("valid regex");
    re.replace_all(src, "").into_owned()
}

/// The error with its cause chain, without minijinja's debug dump.
fn describe(e: &Error) -> String {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() && e.name().is_none() => e.detail().unwrap_or("").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line().filter(|_| !msg.contains("line ")) {
        msg.push_str(&format!(" (template line {line})"));
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// A message as the template sees it: a mapping whose keys iterate in the
/// order transformers' dicts have (role, then content), which `tojson` and
/// `.items()` expose.
#[derive(Debug)]
struct MessageValue(Message);

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.0.role.as_str())),
            "content" => Some(Value::from(self.0.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// `raise_exception(msg)`: the template refuses the conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Print values as Python prints them (None, True, False), as jinja2 does.
fn python_formatter(out: &mut minijinja::Output, state: &mut State, value: &Value) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.write_str("None").map_err(Error::from),
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// `tojson` as transformers defines it: Python's json.dumps with
/// ensure_ascii=False (no HTML escaping), ", " / ": " separators, or
/// newlines and `indent` spaces with "," / ": " when indent is given.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let opts = JsonOpts { indent, sort_keys: sort_keys.unwrap_or(false), ensure_ascii: ensure_ascii.unwrap_or(false) };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json(out: &mut String, v: &Value, o: &JsonOpts, depth: usize) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = o.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if o.indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            match f64::try_from(v.clone()) {
                Ok(f) if !v.is_integer() => out.push_str(&python_float(f)),
                _ => out.push_str(&v.to_string()),
            }
        }
        ValueKind::String => crate::util::write_json_str(out, v.as_str().unwrap_or(""), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, o, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                let key = match k.as_str() {
                    Some(s) => s.to_string(),
                    None => k.to_string(),
                };
                crate::util::write_json_str(out, &key, o.ensure_ascii);
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, o, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialise a {}", v.kind()))),
    }
    Ok(())
}

/// Python's repr of a float (shortest round-trip, ".0" on whole numbers).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let s = format!("{f:?}");
    if s.contains('e') || s.contains('.') { s } else { format!("{s}.0") }
}

/// `strftime_now(format)`: the current UTC time, for templates that print a
/// date (Llama 3.1's "Today Date"). Supports %Y %m %d %e %H %M %S %b %B %a %A %y %j %%.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(format_time(secs, &format)?))
}

fn format_time(unix_secs: i64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('H') => out.push_str(&format!("{:02}", secs_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs_of_day % 60)),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map(String::from).unwrap_or_default()),
                ));
            }
        }
    }
    Ok(out)
}

/// Proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> ChatTemplate {
        let tokens = SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), ..Default::default() };
        ChatTemplate::from_source(src.to_string(), "test".into(), tokens).unwrap()
    }

    #[test]
    fn dates_match_known_days() {
        // 2024-07-23 12:34:56 UTC was a Tuesday, day 205 of a leap year.
        let t = 1_721_738_096;
        assert_eq!(format_time(t, "%d %b %Y %H:%M:%S %a %j %%").unwrap(), "23 Jul 2024 12:34:56 Tue 205 %");
        assert_eq!(format_time(0, "%Y-%m-%d %A").unwrap(), "1970-01-01 Thursday");
        assert!(format_time(0, "%Q").is_err());
    }

    #[test]
    fn tojson_follows_python_json_dumps() {
        let t = tmpl("{{ {'a': 1.5, 'b': [1, none, true], 'c': 'x<\"y\">'} | tojson }}|{{ [] | tojson(indent=2) }}|{{ 2.0 | tojson }}");
        assert_eq!(t.render(&[], false).unwrap(), "{\"a\": 1.5, \"b\": [1, null, true], \"c\": \"x<\\\"y\\\">\"}|[]|2.0");
    }

    #[test]
    fn raise_exception_message_reaches_the_caller() {
        let t = tmpl("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}");
        let e = t.render(&[Message::new("assistant", "x")], false).unwrap_err().to_string();
        assert!(e.contains("first must be user") && e.starts_with("test:"), "{e}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = tmpl("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}");
        assert_eq!(t.render(&[Message::new("assistant", "hi")], false).unwrap(), "hi");
    }

    #[test]
    fn tokenizer_default_reads_string_or_named_list_and_explains_absence() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tokenizer_config.json");
        std::fs::write(&cfg, r#"{"eos_token": {"content": "</s>"}, "chat_template": [{"name": "rag", "template": "R"}, {"name": "default", "template": "D{{ eos_token }}"}]}"#).unwrap();
        let t = ChatTemplate::resolve(None, None, dir.path()).unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "D</s>");
        std::fs::write(&cfg, r#"{"chat_template": "S"}"#).unwrap();
        assert_eq!(ChatTemplate::resolve(Some("tokenizer_default"), None, dir.path()).unwrap().render(&[], false).unwrap(), "S");
        std::fs::write(&cfg, r#"{"bos_token": "<s>"}"#).unwrap();
        let e = ChatTemplate::resolve(None, None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json has no chat_template") && e.contains("chat_template: chatml"), "{e}");
        let t = ChatTemplate::resolve(Some("tokenizer_default_fallback_chatml"), None, dir.path()).unwrap();
        assert_eq!(t.origin(), "built-in chatml");
        let e = ChatTemplate::resolve(Some("vicuna"), None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("unknown template \"vicuna\"") && e.contains("chatml, llama3"), "{e}");
        let e = ChatTemplate::resolve(Some("jinja"), None, dir.path()).unwrap_err().to_string();
        assert!(e.contains("chat_template_jinja"), "{e}");
        let e = ChatTemplate::resolve(Some("jinja"), Some("{% for %}"), dir.path()).unwrap_err().to_string();
        assert!(e.contains("chat_template_jinja: the chat template does not compile"), "{e}");
    }
}
