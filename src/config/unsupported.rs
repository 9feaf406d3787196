//! An unsupported key: when its value asks for a feature ferrotune lacks
//! (`When`), and the one error that says so (`Unsupported::message`). The
//! tables of such keys are in `keys` and `keys_extra`.

use serde_json::Value;

/// When an unsupported key's value asks for the missing feature.
pub(crate) enum When {
    /// Any value but null, false, "", [] or {}.
    Set,
    /// Exactly `true`.
    True,
    /// A set value that is not one of these strings.
    NotOneOf(&'static [&'static str]),
    /// A set value that is not true or false.
    NotBool,
    /// A number above this.
    Above(i64),
    /// Any value but null and true (false asks for something too).
    NotTrue,
    /// A mapping (where the typed field is a string).
    Mapping,
}

pub(crate) struct Unsupported {
    pub key: &'static str,
    pub when: When,
    /// Planned features say "not supported yet".
    pub planned: bool,
    /// What the value asks for that ferrotune cannot do.
    pub what: &'static str,
    /// What to write instead.
    pub instead: &'static str,
}

pub(crate) const fn unsupported(key: &'static str, when: When, planned: bool, what: &'static str, instead: &'static str) -> Unsupported {
    Unsupported { key, when, planned, what, instead }
}

impl When {
    pub fn applies(&self, v: &Value) -> bool {
        let set = !matches!(v, Value::Null | Value::Bool(false))
            && !matches!(v, Value::String(s) if s.is_empty())
            && !matches!(v, Value::Array(a) if a.is_empty())
            && !matches!(v, Value::Object(o) if o.is_empty());
        match self {
            When::Set => set,
            When::True => *v == Value::Bool(true),
            When::NotOneOf(allowed) => set && !matches!(v, Value::String(s) if allowed.contains(&s.as_str())),
            When::NotBool => set && !v.is_boolean(),
            When::Above(n) => v.as_f64().is_some_and(|x| x > *n as f64),
            When::NotTrue => !v.is_null() && *v != Value::Bool(true),
            When::Mapping => v.is_object(),
        }
    }
}

impl Unsupported {
    /// The error text after the location prefix.
    pub fn message(&self, shown_key: &str, v: &Value) -> String {
        let yet = if self.planned { " yet" } else { "" };
        format!("{shown_key}: {} is not supported{yet}: {}; {}", show_value(v), self.what, self.instead)
    }
}

/// A value as the user wrote it, kept short.
pub(crate) fn show_value(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.chars().count() > 60 { format!("{}...", s.chars().take(57).collect::<String>()) } else { s }
}
