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
    ("models/qwen3.yaml", include_str!("../../models/qwen3.yaml")),
    ("models/gemma2.yaml", include_str!("../../models/gemma2.yaml")),
    ("models/gemma3.yaml", include_str!("../../models/gemma3.yaml")),
    ("models/gemma3_vlm.yaml", include_str!("../../models/gemma3_vlm.yaml")),
    ("models/phi3.yaml", include_str!("../../models/phi3.yaml")),
    ("models/qwen3_5.yaml", include_str!("../../models/qwen3_5.yaml")),
    ("models/qwen3_5_vlm.yaml", include_str!("../../models/qwen3_5_vlm.yaml")),
    ("models/gemma4.yaml", include_str!("../../models/gemma4.yaml")),
    ("models/gemma4_vlm.yaml", include_str!("../../models/gemma4_vlm.yaml")),
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
    /// x · rsqrt(mean(x²) + eps) · w.
    Rmsnorm,
    /// The same scaled by (1 + w), formed in f32: the stored weights are
    /// offsets from one (Gemma).
    RmsnormPlusOne,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    /// down(silu(gate(x)) ⊙ up(x)).
    Swiglu,
    /// down(gelu_tanh(gate(x)) ⊙ up(x)) (Gemma).
    Geglu,
}

/// A multiplier of the embedding output.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmbedScale {
    #[default]
    None,
    /// sqrt(hidden_size), rounded to the checkpoint's dtype first (Gemma
    /// builds the normalizer as a tensor of the embedding dtype).
    SqrtHidden,
}

/// Optional per-family numbers read from config.json, each named by its
/// key there (absent or null in config.json = the feature is off).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigKeys {
    /// Attention scale = value^-1/2 instead of head_dim^-1/2.
    pub attn_scale_base: Option<String>,
    /// Attention logit soft-cap c: scores become c·tanh(s/c).
    pub attn_softcap: Option<String>,
    /// Final logit soft-cap of the LM head.
    pub final_softcap: Option<String>,
    /// The rotary base of sliding-window layers, when it differs from the
    /// global layers' rope_theta (Gemma 3's rope_local_base_freq; in the
    /// transformers 5 layout rope_parameters holds one entry per layer type).
    pub local_rope_theta: Option<String>,
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
    /// Per config.layer_types; without it, every layer but each
    /// `sliding_window_pattern`-th (1-based; from config.json, else the
    /// family's `sliding_window_pattern`) is a sliding one (Gemma 2: even
    /// layers slide; Gemma 3: five local to one global).
    Pattern,
}

/// Checkpoint tensor names. `layer` is the per-layer prefix with `{i}`;
/// projections are module paths (".weight" / ".bias" are appended). A
/// family has either q, k and v or the fused qkv ([q; k; v] rows), and
/// either gate and up or the fused gate_up ([gate; up] rows).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightNames {
    pub embed: String,
    pub final_norm: String,
    pub lm_head: String,
    pub layer: String,
    /// The layer prefix as PEFT names modules (transformers' in-memory
    /// name), when it differs from the checkpoint's `layer`.
    pub adapter_layer: Option<String>,
    pub input_norm: String,
    /// The norm before the MLP (Llama's post_attention_layernorm).
    pub pre_mlp_norm: String,
    /// Norms of the attention and MLP outputs before their residual adds
    /// (Gemma 2 and 3): both or neither.
    pub post_attn_norm: Option<String>,
    pub post_mlp_norm: Option<String>,
    /// Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3): both or neither.
    pub q_norm: Option<String>,
    pub k_norm: Option<String>,
    pub q: Option<String>,
    pub k: Option<String>,
    pub v: Option<String>,
    pub qkv: Option<String>,
    pub o: String,
    pub gate: Option<String>,
    pub up: Option<String>,
    pub gate_up: Option<String>,
    pub down: String,
    /// The gated delta-net of linear-attention layers (Qwen3.5): present
    /// when the family has them; config.json's layer_types says which
    /// layers ("linear_attention").
    pub delta_net: Option<DeltaNetNames>,
    /// Gemma 4's parts: per-layer embeddings and layer scalars (their
    /// presence switches on the rest: per-layer head sizes, K/V sharing,
    /// the weightless v norm).
    pub gemma4: Option<Gemma4Names>,
}

/// Gemma 4's tensor names. `embed_per_layer`, `model_projection` (a module
/// path) and `projection_norm` are whole-model; the rest are relative to
/// the layer prefix (`input_gate` and `projection` are module paths).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemma4Names {
    pub embed_per_layer: String,
    pub model_projection: String,
    pub projection_norm: String,
    pub input_gate: String,
    pub projection: String,
    pub post_norm: String,
    pub layer_scalar: String,
}

/// Tensor names of a gated delta-net, relative to the layer prefix:
/// projections are module paths (".weight" appended), the rest tensors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaNetNames {
    pub in_qkv: String,
    pub in_z: String,
    pub in_b: String,
    pub in_a: String,
    pub out: String,
    /// The depthwise conv's weight [channels, 1, kernel].
    pub conv: String,
    pub a_log: String,
    pub dt_bias: String,
    /// The gated RMSNorm's weight [value head dim], used as is (not 1 + w).
    pub norm: String,
}

impl WeightNames {
    pub fn fused_qkv(&self) -> bool {
        self.qkv.is_some()
    }
    pub fn fused_gate_up(&self) -> bool {
        self.gate_up.is_some()
    }
    pub fn sandwich_norms(&self) -> bool {
        self.post_attn_norm.is_some()
    }
    pub fn qk_norm(&self) -> bool {
        self.q_norm.is_some()
    }
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
    /// The model's numbers sit under config.json's `text_config` (an
    /// image-text checkpoint whose text tower is trained).
    #[serde(default)]
    pub text_config: bool,
    /// For `sliding_window: pattern` when config.json has neither
    /// layer_types nor sliding_window_pattern.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// rope_type values this family supports ("default" = unscaled).
    pub rope_scaling: Vec<String>,
    /// config.json's activation (hidden_activation, else hidden_act) must be
    /// one of these when given.
    pub activations: Vec<String>,
    #[serde(default)]
    pub embed_scale: EmbedScale,
    #[serde(default)]
    pub config_keys: ConfigKeys,
    /// Attention's q_proj gives, per head, [query | gate], and the attention
    /// output is multiplied by σ(gate) before o_proj (Qwen3.5).
    #[serde(default)]
    pub attn_output_gate: bool,
    /// Parts of the checkpoint the family does not train (vision and audio
    /// towers, a multi-token prediction head): their tensors are not read,
    /// are named in one line when the model is opened, and are copied
    /// unchanged by merge and `quantize` (never quantized).
    #[serde(default)]
    pub untrained: Vec<Untrained>,
    pub weights: WeightNames,
}

/// One untrained part of a checkpoint: every tensor under `prefix`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Untrained {
    pub prefix: String,
    /// What it is, for the info line ("vision tower").
    pub what: String,
    /// Its module path in transformers' model, where that differs from the
    /// checkpoint's names (an older layout that transformers renames on
    /// load): what `quantize` writes into llm_int8_skip_modules.
    #[serde(default)]
    pub module: Option<String>,
}

impl Untrained {
    /// The module path transformers' skip list must name.
    pub fn module_path(&self) -> &str {
        self.module.as_deref().unwrap_or(self.prefix.trim_end_matches('.'))
    }
}

impl Family {
    /// The untrained part holding checkpoint tensor `name`, if any.
    pub fn untrained_part(&self, name: &str) -> Option<&Untrained> {
        self.untrained.iter().find(|u| name.starts_with(&u.prefix))
    }

    /// The one info line naming the untrained parts present among the
    /// checkpoint's tensor `names`, with their tensor counts; None when the
    /// checkpoint holds none.
    pub fn untrained_note<'a>(&self, names: impl Iterator<Item = &'a str>) -> Option<String> {
        let mut counts = vec![0usize; self.untrained.len()];
        for n in names {
            if let Some(i) = self.untrained.iter().position(|u| n.starts_with(&u.prefix)) {
                counts[i] += 1;
            }
        }
        let parts: Vec<String> = self
            .untrained
            .iter()
            .zip(&counts)
            .filter(|(_, c)| **c > 0)
            .map(|(u, &c)| format!("{} ({}*, {c} tensor{})", u.what, u.prefix, if c == 1 { "" } else { "s" }))
            .collect();
        (!parts.is_empty()).then(|| {
            format!("{}: the text model is trained; not read, kept as they are by merge and quantize: {}", self.architectures[0], parts.join(", "))
        })
    }
}

fn parse_families() -> Result<Vec<Family>> {
    FAMILY_FILES
        .iter()
        .map(|(name, text)| {
            let f = serde_saphyr::from_str::<Family>(text).with_context(|| format!("registry file {name} is malformed"))?;
            let w = &f.weights;
            let unfused = [&w.q, &w.k, &w.v].iter().all(|x| x.is_some()) && w.qkv.is_none();
            anyhow::ensure!(unfused || ([&w.q, &w.k, &w.v].iter().all(|x| x.is_none()) && w.qkv.is_some()), "{name}: weights need q, k and v, or qkv alone");
            let unfused = w.gate.is_some() && w.up.is_some() && w.gate_up.is_none();
            anyhow::ensure!(unfused || (w.gate.is_none() && w.up.is_none() && w.gate_up.is_some()), "{name}: weights need gate and up, or gate_up alone");
            anyhow::ensure!(w.post_attn_norm.is_some() == w.post_mlp_norm.is_some(), "{name}: post_attn_norm and post_mlp_norm go together");
            anyhow::ensure!(w.q_norm.is_some() == w.k_norm.is_some(), "{name}: q_norm and k_norm go together");
            for layer in std::iter::once(&w.layer).chain(&w.adapter_layer) {
                anyhow::ensure!(layer.ends_with("{i}"), "{name}: a layer prefix must end with {{i}}, found {layer}");
            }
            Ok(f)
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
        assert_eq!(names, ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_vlm", "phi3", "qwen3_5", "qwen3_5_vlm", "gemma4", "gemma4_vlm"]);
    }

    #[test]
    fn untrained_parts_are_named_in_one_line() {
        let f = families().iter().find(|f| f.family == "qwen3_5_vlm").unwrap();
        let names = ["model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.linear_fc1.weight", "mtp.fc.weight", "model.language_model.norm.weight"];
        assert_eq!(
            f.untrained_note(names.into_iter()).unwrap(),
            "Qwen3_5ForConditionalGeneration: the text model is trained; not read, kept as they are by merge and quantize: \
             vision tower (model.visual.*, 2 tensors), multi-token prediction head (mtp.*, 1 tensor)"
        );
        assert!(f.untrained_part("mtp.layers.0.mlp.up_proj.weight").is_some());
        assert!(f.untrained_part("model.language_model.layers.0.mlp.up_proj.weight").is_none());
        // Text-only checkpoints of the family, and families without towers: no line.
        assert_eq!(f.untrained_note(names[3..].iter().copied()), None);
        let llama = families().iter().find(|f| f.family == "llama").unwrap();
        assert_eq!(llama.untrained_note(names.into_iter()), None);
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
