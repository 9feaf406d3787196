//! The checkpoint's hyper-parameters: config.json -> the model's
//! dimensions and quirks, resolved against the registry family. Both the
//! older layout (rope_theta / rope_scaling / torch_dtype) and the newer one
//! (rope_parameters / dtype) are read.

use super::rope::{self, Rope};
use crate::backend::{DType, GluAct};
use crate::registry::{EmbedScale, Family, Mlp, Norm, SlidingWindow};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: &'static Family,
    /// The raw config.json (kept to write it back out with merged models).
    pub raw: Value,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rms_norm_eps: f32,
    /// The rotary tables: [global] or [global, local] (Gemma 3's sliding
    /// layers use another base), indexed by `layer_rope`.
    pub ropes: Vec<Rope>,
    pub layer_rope: Vec<usize>,
    /// Rotated leading dims of each head (head_dim unless a partial rotary
    /// factor is set).
    pub rot_dim: usize,
    /// Norms scale by (1 + w) (Gemma).
    pub norm_plus_one: bool,
    pub glu: GluAct,
    /// The embedding output's multiplier (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// The attention score multiplier.
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub tie_word_embeddings: bool,
    /// Storage dtype the config declares (informational; tensors carry their own).
    pub dtype: Option<DType>,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Sliding window per layer (None = full causal attention).
    pub layer_window: Vec<Option<usize>>,
    pub max_position_embeddings: Option<usize>,
    /// Tokens that end generation: eos_token_id (an int or a list; empty
    /// when absent).
    pub eos_token_ids: Vec<u32>,
    /// Each layer's token mixer.
    pub layer_mixer: Vec<Mixer>,
    /// The gated delta-net's dimensions (families with linear-attention
    /// layers).
    pub delta: Option<DeltaDims>,
    /// q_proj gives [query | gate] per head; attention's output is
    /// multiplied by σ(gate) (Qwen3.5).
    pub attn_output_gate: bool,
    /// Gemma 4's per-layer numbers (families with its parts).
    pub gemma4: Option<super::gemma4::Gemma4Config>,
}

/// What mixes tokens in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mixer {
    /// Softmax attention (full or sliding-window).
    Attention,
    /// Qwen3.5's gated delta-net (linear attention).
    DeltaNet,
}

/// The gated delta-net's numbers, from config.json's linear_* keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaDims {
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub conv_kernel: usize,
}

impl DeltaDims {
    /// Channels of in_proj_qkv and the conv: [q | k | v].
    pub fn conv_dim(&self) -> usize {
        2 * self.k_heads * self.k_dim + self.v_heads * self.v_dim
    }
    /// Width of the output (and of z): v_heads·v_dim.
    pub fn value_width(&self) -> usize {
        self.v_heads * self.v_dim
    }
}

struct Reader<'a> {
    v: &'a Value,
    file: &'a str,
}

impl Reader<'_> {
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => bail!("{}: \"{key}\" must be a non-negative integer, found {x}", self.file),
            },
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .with_context(|| format!("{}: required key \"{key}\" is missing", self.file))
    }
    fn f64_opt(&self, obj: &Value, key: &str) -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => match x.as_f64() {
                Some(n) => Ok(Some(n)),
                None => bail!("{}: \"{key}\" must be a number, found {x}", self.file),
            },
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(x) => bail!("{}: \"{key}\" must be true or false, found {x}", self.file),
        }
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// A token-id key that may be absent, null, an int or a list of ints
/// (eos_token_id in config.json and generation_config.json).
pub fn token_ids(v: Option<&Value>, key: &str, file: &str) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("{file}: \"{key}\" must be a token id or a list of token ids, found {x}"))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Each layer's mixer and, for families with a gated delta-net, its
/// dimensions: layer_types names the linear-attention layers (without it,
/// full_attention_interval: every interval-th layer, 1-based, is full).
fn delta_layers(r: &Reader, raw: &Value, has_delta: bool, n_layers: usize) -> Result<(Vec<Mixer>, Option<DeltaDims>)> {
    if !has_delta {
        return Ok((vec![Mixer::Attention; n_layers], None));
    }
    let file = r.file;
    let mixer = match raw.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => types.iter().map(|t| if t.as_str() == Some("linear_attention") { Mixer::DeltaNet } else { Mixer::Attention }).collect(),
        None => {
            let interval = r.usize_opt("full_attention_interval")?.unwrap_or(4);
            if interval == 0 {
                bail!("{file}: \"full_attention_interval\" is 0; every n-th layer is full attention, so n must be at least 1");
            }
            (0..n_layers).map(|i| if (i + 1) % interval == 0 { Mixer::Attention } else { Mixer::DeltaNet }).collect()
        }
    };
    let dims = DeltaDims {
        k_heads: r.usize("linear_num_key_heads")?,
        v_heads: r.usize("linear_num_value_heads")?,
        k_dim: r.usize("linear_key_head_dim")?,
        v_dim: r.usize("linear_value_head_dim")?,
        conv_kernel: r.usize_opt("linear_conv_kernel_dim")?.unwrap_or(4),
    };
    for (key, v) in [
        ("linear_num_key_heads", dims.k_heads),
        ("linear_key_head_dim", dims.k_dim),
        ("linear_value_head_dim", dims.v_dim),
        ("linear_conv_kernel_dim", dims.conv_kernel),
    ] {
        if v == 0 {
            bail!("{file}: \"{key}\" is 0; it must be at least 1");
        }
    }
    if dims.v_heads == 0 || dims.v_heads % dims.k_heads != 0 {
        bail!(
            "{file}: linear_num_value_heads ({}) must be a positive multiple of linear_num_key_heads ({})",
            dims.v_heads,
            dims.k_heads
        );
    }
    Ok((mixer, Some(dims)))
}

impl ModelConfig {
    /// Resolve a parsed config.json against its registry family.
    pub fn from_json(full: Value, family: &'static Family, path: &Path) -> Result<ModelConfig> {
        let file = path.display().to_string();
        // An image-text checkpoint keeps the text model's numbers in
        // text_config; the rest of the file is written back as it is.
        let raw = if family.text_config {
            full.get("text_config")
                .filter(|v| v.is_object())
                .cloned()
                .with_context(|| format!("{file}: {} checkpoints keep the text model in \"text_config\", which is missing", family.family))?
        } else {
            full.clone()
        };
        let r = Reader { v: &raw, file: &file };
        let hidden = r.usize("hidden_size")?;
        let n_layers = r.usize("num_hidden_layers")?;
        let n_heads = r.usize("num_attention_heads")?;
        let n_kv_heads = r.usize_opt("num_key_value_heads")?.unwrap_or(n_heads);
        let intermediate = r.usize("intermediate_size")?;
        let vocab = r.usize("vocab_size")?;
        // Zero sizes parse, then silently train nothing (no layers) or fail
        // deep inside a product: refuse them here, by key.
        for (key, v) in [("hidden_size", hidden), ("num_hidden_layers", n_layers), ("intermediate_size", intermediate), ("vocab_size", vocab)] {
            if v == 0 {
                bail!("{file}: \"{key}\" is 0; a model needs at least 1 (is this config.json complete?)");
            }
        }
        if n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            bail!(
                "{file}: num_attention_heads ({n_heads}) must be a positive multiple of num_key_value_heads ({n_kv_heads})"
            );
        }
        let head_dim = match r.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if hidden % n_heads != 0 {
                    bail!("{file}: hidden_size {hidden} is not divisible by num_attention_heads {n_heads} and no head_dim is given");
                }
                hidden / n_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("{file}: head_dim {head_dim} must be a positive even number for rotary embeddings");
        }
        let rms_norm_eps = r.f64_opt(&raw, "rms_norm_eps")?.unwrap_or(1e-6) as f32;
        let is_gemma4 = family.weights.gemma4.is_some();
        // Gemma 4's tables are per layer type and read with its other keys.
        let rope::RopeConfig { mut ropes, rot_dim } =
            if is_gemma4 { rope::RopeConfig { ropes: Vec::new(), rot_dim: head_dim } } else { rope::parse(&raw, family, head_dim, &file)? };

        // The activation, when config.json names it, must be the family's.
        for key in ["hidden_activation", "hidden_act"] {
            if let Some(v) = raw.get(key).filter(|v| !v.is_null()) {
                let name = v.as_str().with_context(|| format!("{file}: \"{key}\" must be a string, found {v}"))?;
                if !family.activations.iter().any(|a| a == name) {
                    bail!(
                        "{file}: \"{key}\" is \"{name}\"; {} models are supported with {}",
                        family.family,
                        family.activations.join(" or ")
                    );
                }
                break;
            }
        }
        let keyed = |key: &Option<String>| -> Result<Option<f64>> {
            match key {
                Some(k) => r.f64_opt(&raw, k),
                None => Ok(None),
            }
        };
        let positive = |v: Option<f64>, key: &Option<String>| -> Result<Option<f32>> {
            match v {
                Some(x) if !(x.is_finite() && x > 0.0) => {
                    bail!("{file}: \"{}\" is {x}; it must be a positive number", key.as_deref().unwrap_or(""))
                }
                v => Ok(v.map(|x| x as f32)),
            }
        };
        let keys = &family.config_keys;
        // Python computes value ** -0.5 in double precision; the product
        // with the scores is f32.
        let attn_scale = match positive(keyed(&keys.attn_scale_base)?, &keys.attn_scale_base)? {
            Some(base) => (base as f64).powf(-0.5) as f32,
            None => 1.0 / (head_dim as f32).sqrt(),
        };
        let attn_softcap = positive(keyed(&keys.attn_softcap)?, &keys.attn_softcap)?;
        let final_softcap = positive(keyed(&keys.final_softcap)?, &keys.final_softcap)?;

        let dtype = [&raw, &full]
            .into_iter()
            .find_map(|c| c.get("dtype").or_else(|| c.get("torch_dtype")).filter(|v| v.is_string()))
            .and_then(|v| v.as_str())
            .and_then(parse_dtype);
        let tie_word_embeddings = r.bool_or("tie_word_embeddings", false)?;

        let window = r.usize_opt("sliding_window")?;
        let has_delta = family.weights.delta_net.is_some();
        let expected_types = if has_delta {
            "\"full_attention\" or \"linear_attention\""
        } else {
            "\"full_attention\" or \"sliding_attention\""
        };
        let (layer_mixer, delta) = delta_layers(&r, &raw, has_delta, n_layers)?;
        let layer_window: Vec<Option<usize>> = match family.sliding_window {
            SlidingWindow::None => vec![None; n_layers],
            SlidingWindow::AllLayers => vec![window; n_layers],
            SlidingWindow::LayerTypes | SlidingWindow::Pattern => {
                if let Some(types) = raw.get("layer_types").and_then(|v| v.as_array()) {
                    if types.len() != n_layers {
                        bail!("{file}: layer_types has {} entries for {n_layers} layers", types.len());
                    }
                    types
                        .iter()
                        .enumerate()
                        .map(|(i, t)| match t.as_str() {
                            Some("full_attention") => Ok(None),
                            Some("linear_attention") if has_delta => Ok(None),
                            Some("sliding_attention") => window.map(Some).with_context(|| {
                                format!("{file}: layer {i} is sliding_attention but sliding_window is not set")
                            }),
                            _ => bail!("{file}: layer_types[{i}] is {t}, expected {}", expected_types),
                        })
                        .collect::<Result<_>>()?
                } else if family.sliding_window == SlidingWindow::Pattern {
                    let pattern = r.usize_opt("sliding_window_pattern")?.or(family.sliding_window_pattern).unwrap_or(1);
                    if pattern == 0 {
                        bail!("{file}: \"sliding_window_pattern\" is 0; every n-th layer is global, so n must be at least 1");
                    }
                    (0..n_layers).map(|i| if (i + 1) % pattern != 0 { window } else { None }).collect()
                } else {
                    let use_sw = r.bool_or("use_sliding_window", false)?;
                    let from = r.usize_opt("max_window_layers")?.unwrap_or(n_layers);
                    (0..n_layers).map(|i| if use_sw && i >= from { window } else { None }).collect()
                }
            }
        };
        let gemma4 = if is_gemma4 {
            let common = super::gemma4::Common {
                file: &file,
                n_layers,
                n_heads,
                n_kv_heads,
                head_dim,
                intermediate,
                vocab,
                sliding: layer_window.iter().map(Option::is_some).collect(),
            };
            let (g, tables) = super::gemma4::parse(&raw, &common)?;
            ropes = tables;
            Some(g)
        } else {
            None
        };
        // Layers with a window use the local rotary table when there is one.
        let layer_rope = layer_window.iter().map(|w| usize::from(w.is_some() && ropes.len() > 1)).collect();
        // Gemma 4 does not scale the scores (its q/k norms set their size).
        let attn_scale = if is_gemma4 { 1.0 } else { attn_scale };

        Ok(ModelConfig {
            family,
            qkv_bias: family.qkv_bias.resolve(&raw),
            o_bias: family.o_bias.resolve(&raw),
            mlp_bias: family.mlp_bias.resolve(&raw),
            max_position_embeddings: r.usize_opt("max_position_embeddings")?,
            eos_token_ids: token_ids(raw.get("eos_token_id").or(full.get("eos_token_id")), "eos_token_id", &file)?,
            raw: full,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate,
            vocab,
            rms_norm_eps,
            ropes,
            layer_rope,
            rot_dim,
            norm_plus_one: family.norm == Norm::RmsnormPlusOne,
            glu: match family.mlp {
                Mlp::Swiglu => GluAct::Silu,
                Mlp::Geglu => GluAct::GeluTanh,
            },
            embed_scale: match family.embed_scale {
                EmbedScale::None => None,
                EmbedScale::SqrtHidden => Some((hidden as f32).sqrt()),
            },
            attn_scale,
            attn_softcap,
            final_softcap,
            tie_word_embeddings,
            dtype,
            layer_window,
            layer_mixer,
            delta,
            attn_output_gate: family.attn_output_gate,
            gemma4,
        })
    }

    /// Elements of every base-model tensor (as `model::tensor_list` lists them).
    pub fn n_params(&self) -> usize {
        crate::model::tensor_list(self).iter().map(|(_, shape, _)| shape.iter().product::<usize>()).sum()
    }
}
