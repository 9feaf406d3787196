//! Which modules a run puts an adapter on: `Targets` (PEFT's
//! `target_modules`), and `RunConfig::targets`, which reads it from
//! lora_target_linear / lora_target_modules.

use super::{DEFAULT_TARGET_MODULES, RunConfig, TargetModules};
use anyhow::{Context, Result, bail};
use regex::Regex;

/// Which modules get an adapter (PEFT's `target_modules`).
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names; a module matches when its path equals the name or ends
    /// with ".name" (PEFT's suffix rule).
    Names(Vec<String>),
    /// A regular expression matched against the whole module path.
    Regex(String),
    /// Every linear layer of the transformer blocks (not lm_head).
    AllLinear,
}

impl std::fmt::Display for Targets {
    /// As the user wrote them: `q_proj, foo_proj`, a "regex", or all-linear.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(names) => write!(f, "{}", names.join(", ")),
            Targets::Regex(re) => write!(f, "\"{re}\""),
            Targets::AllLinear => write!(f, "all-linear"),
        }
    }
}

impl Targets {
    pub fn matches(&self, module_path: &str) -> Result<bool> {
        Ok(match self {
            Targets::Names(names) => names
                .iter()
                .any(|n| module_path == n || module_path.ends_with(&format!(".{n}"))),
            Targets::Regex(re) => {
                let re = Regex::new(&format!("^(?:{re})$"))
                    .with_context(|| format!("target_modules regex \"{re}\" is invalid"))?;
                re.is_match(module_path)
            }
            Targets::AllLinear => true,
        })
    }
}

impl RunConfig {
    /// Which modules get an adapter: lora_target_linear wins (all linear
    /// layers); otherwise lora_target_modules (a list: names, a string: a
    /// regex, "all-linear" as PEFT spells it); otherwise PEFT's default.
    pub fn targets(&self) -> Result<Targets> {
        if self.lora_target_linear {
            return Ok(Targets::AllLinear);
        }
        Ok(match &self.lora_target_modules {
            None => Targets::Names(DEFAULT_TARGET_MODULES.iter().map(|s| s.to_string()).collect()),
            Some(TargetModules::Names(names)) => {
                if names.is_empty() {
                    bail!("lora_target_modules is an empty list: name at least one module (e.g. [q_proj, v_proj]) or set lora_target_linear: true");
                }
                Targets::Names(names.clone())
            }
            Some(TargetModules::Regex(re)) if re == "all-linear" => Targets::AllLinear,
            Some(TargetModules::Regex(re)) => {
                Regex::new(&format!("^(?:{re})$"))
                    .with_context(|| format!("lora_target_modules: \"{re}\" is not a valid regular expression"))?;
                Targets::Regex(re.clone())
            }
        })
    }
}
