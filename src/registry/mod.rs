//! The supported-model registry: one declarative YAML file per architecture
//! family in `models/`, embedded in the binary. config.json is matched
//! against it before any weight is read; anything else is refused. A new
//! family is a models/<family>.yaml file plus its line in `FAMILY_FILES`.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::sync::OnceLock;

/// The registry files, embedded at build time.
const FAMILY_FILES: &[(&str, &str)] = &[
    ("models/llama.yaml", include_str!("../../models/llama.yaml")),
    ("models/mistral.yaml", include_str!("../../models/mistral.yaml")),
    ("models/qwen2.yaml", include_str!("../../models/qwen2.yaml")),
];

/// A bias switch: always on, always off, or read from a config.json key
/// (absent key = off).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Switch {
    Fixed(bool),
    ConfigKey(String),
}

impl Switch {
    pub fn resolve(&self, config: &serde_json::Value) -> bool {
        match self {
            Switch::Fixed(b) => *b,
            Switch::ConfigKey(k) => config.get(k).and_then(|v| v.as_bool()).unwrap_or(false),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    Rmsnorm,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    Swiglu,
}

/// Where sliding-window attention applies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SlidingWindow {
    /// Never.
    None,
    /// Every layer, when config.sliding_window is set (Mistral).
    AllLayers,
    /// Per config.layer_types; without it, layers >= max_window_layers when
    /// use_sliding_window is true (Qwen2).
    LayerTypes,
}

/// Checkpoint tensor names. `layer` is the per-layer prefix with `{i}`;
/// projections are module paths (".weight" / ".bias" are appended).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightNames {
    pub embed: String,
    pub final_norm: String,
    pub lm_head: String,
    pub layer: String,
    pub input_norm: String,
    pub post_attention_norm: String,
    pub q: String,
    pub k: String,
    pub v: String,
    pub o: String,
    pub gate: String,
    pub up: String,
    pub down: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub family: String,
    pub description: String,
    pub architectures: Vec<String>,
    pub model_types: Vec<String>,
    pub norm: Norm,
    pub mlp: Mlp,
    pub qkv_bias: Switch,
    pub o_bias: Switch,
    pub mlp_bias: Switch,
    pub sliding_window: SlidingWindow,
    /// rope_type values this family supports ("default" = unscaled).
    pub rope_scaling: Vec<String>,
    pub weights: WeightNames,
}

fn parse_families() -> Result<Vec<Family>> {
    FAMILY_FILES
        .iter()
        .map(|(name, text)| {
            serde_saphyr::from_str::<Family>(text).with_context(|| format!("registry file {name} is malformed"))
        })
        .collect()
}

/// All registered families (parsed once).
pub fn families() -> &'static [Family] {
    static FAMILIES: OnceLock<Vec<Family>> = OnceLock::new();
    // The files are part of the binary; a malformed one is a build defect,
    // caught by the registry tests.
    FAMILIES.get_or_init(|| parse_families().expect("embedded registry is valid"))
}

/// One line per supported architecture, for error messages.
pub fn supported_list() -> String {
    families()
        .iter()
        .map(|f| format!("{} ({})", f.architectures.join(", "), f.family))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Find the family for a config.json: by `architectures` first, then by
/// `model_type`. Unknown ones are refused with the supported list.
pub fn lookup(config: &serde_json::Value, source: &str) -> Result<&'static Family> {
    let archs: Vec<String> = config
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let model_type = config.get("model_type").and_then(|v| v.as_str());
    for arch in &archs {
        if let Some(f) = families().iter().find(|f| f.architectures.iter().any(|a| a == arch)) {
            return Ok(f);
        }
    }
    if let (true, Some(mt)) = (archs.is_empty(), model_type)
        && let Some(f) = families().iter().find(|f| f.model_types.iter().any(|m| m == mt))
    {
        return Ok(f);
    }
    let named = match (archs.is_empty(), model_type) {
        (false, _) => format!("architecture {}", archs.join(", ")),
        (true, Some(mt)) => format!("model_type \"{mt}\""),
        (true, None) => "a config with neither \"architectures\" nor \"model_type\"".to_string(),
    };
    bail!(
        "{source}: unsupported model: {named}. ferrotune supports: {}. \
         Use a checkpoint of a supported architecture (run `ferrotune models` for the list), \
         or add a family file under models/ if the architecture is a variant of one of them.",
        supported_list()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_registry_file_parses() {
        let fams = parse_families().unwrap();
        assert_eq!(fams.len(), FAMILY_FILES.len());
        let names: Vec<_> = fams.iter().map(|f| f.family.as_str()).collect();
        assert_eq!(names, ["llama", "mistral", "qwen2"]);
    }

    #[test]
    fn lookup_by_architecture_and_model_type() {
        let c = json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral"});
        assert_eq!(lookup(&c, "x").unwrap().family, "mistral");
        let c = json!({"model_type": "qwen2"});
        assert_eq!(lookup(&c, "x").unwrap().family, "qwen2");
    }

    #[test]
    fn unknown_architecture_is_refused_with_the_supported_list() {
        let c = json!({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"});
        let msg = lookup(&c, "/m/config.json").unwrap_err().to_string();
        assert!(msg.contains("/m/config.json"), "{msg}");
        assert!(msg.contains("unsupported model: architecture GPTNeoXForCausalLM"), "{msg}");
        assert!(msg.contains("LlamaForCausalLM") && msg.contains("Qwen2ForCausalLM"), "{msg}");
        assert!(msg.contains("ferrotune models"), "{msg}");
    }

    #[test]
    fn bias_switch_reads_config_keys() {
        let s = Switch::ConfigKey("attention_bias".into());
        assert!(s.resolve(&json!({"attention_bias": true})));
        assert!(!s.resolve(&json!({})));
        assert!(Switch::Fixed(true).resolve(&json!({})));
    }
}
