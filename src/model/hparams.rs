//! The checkpoint's hyper-parameters: config.json -> the model's
//! dimensions and quirks, resolved against the registry family. Both the
//! older layout (rope_theta / rope_scaling / torch_dtype) and the newer one
//! (rope_parameters / dtype) are read.

use crate::backend::DType;
use crate::registry::{Family, SlidingWindow};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::Path;

/// How rotary frequencies are derived.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// inv_freq / factor.
    Linear { factor: f32 },
    /// Llama 3.1 / 3.2 frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

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
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
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

impl ModelConfig {
    /// Resolve a parsed config.json against its registry family.
    pub fn from_json(raw: Value, family: &'static Family, path: &Path) -> Result<ModelConfig> {
        let file = path.display().to_string();
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

        // RoPE: newer configs keep everything in rope_parameters; older ones
        // have rope_theta at the top and an optional rope_scaling object.
        let rope_params = raw.get("rope_parameters").filter(|v| !v.is_null());
        let rope_scaling_obj = raw.get("rope_scaling").filter(|v| !v.is_null());
        let rope_theta = match rope_params {
            Some(p) => r.f64_opt(p, "rope_theta")?,
            None => None,
        }
        .or(r.f64_opt(&raw, "rope_theta")?)
        .unwrap_or(10000.0) as f32;
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            bail!("{file}: \"rope_theta\" is {rope_theta}; the rotary base must be a positive number (10000 or 500000 are usual)");
        }
        let scaling_src = rope_scaling_obj.or(rope_params);
        let rope_scaling = match scaling_src {
            None => RopeScaling::None,
            Some(p) => {
                let kind = p
                    .get("rope_type")
                    .or_else(|| p.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                if !family.rope_scaling.iter().any(|k| k == kind) {
                    bail!(
                        "{file}: rope scaling \"{kind}\" is not supported for {} models (supported: {})",
                        family.family,
                        family.rope_scaling.join(", ")
                    );
                }
                let need = |key: &str| -> Result<f32> {
                    Ok(r.f64_opt(p, key)?
                        .with_context(|| format!("{file}: rope scaling \"{kind}\" needs \"{key}\""))?
                        as f32)
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: need("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: need("factor")?,
                        low_freq_factor: need("low_freq_factor")?,
                        high_freq_factor: need("high_freq_factor")?,
                        original_max_position_embeddings: need("original_max_position_embeddings")?,
                    },
                    other => bail!("{file}: rope scaling \"{other}\" is not implemented"),
                }
            }
        };

        let dtype = raw
            .get("dtype")
            .or_else(|| raw.get("torch_dtype"))
            .and_then(|v| v.as_str())
            .and_then(parse_dtype);
        let tie_word_embeddings = r.bool_or("tie_word_embeddings", false)?;

        let window = r.usize_opt("sliding_window")?;
        let layer_window: Vec<Option<usize>> = match family.sliding_window {
            SlidingWindow::None => vec![None; n_layers],
            SlidingWindow::AllLayers => vec![window; n_layers],
            SlidingWindow::LayerTypes => {
                if let Some(types) = raw.get("layer_types").and_then(|v| v.as_array()) {
                    if types.len() != n_layers {
                        bail!("{file}: layer_types has {} entries for {n_layers} layers", types.len());
                    }
                    types
                        .iter()
                        .enumerate()
                        .map(|(i, t)| match t.as_str() {
                            Some("full_attention") => Ok(None),
                            Some("sliding_attention") => window.map(Some).with_context(|| {
                                format!("{file}: layer {i} is sliding_attention but sliding_window is not set")
                            }),
                            _ => bail!("{file}: layer_types[{i}] is {t}, expected \"full_attention\" or \"sliding_attention\""),
                        })
                        .collect::<Result<_>>()?
                } else {
                    let use_sw = r.bool_or("use_sliding_window", false)?;
                    let from = r.usize_opt("max_window_layers")?.unwrap_or(n_layers);
                    (0..n_layers).map(|i| if use_sw && i >= from { window } else { None }).collect()
                }
            }
        };

        Ok(ModelConfig {
            family,
            qkv_bias: family.qkv_bias.resolve(&raw),
            o_bias: family.o_bias.resolve(&raw),
            mlp_bias: family.mlp_bias.resolve(&raw),
            max_position_embeddings: r.usize_opt("max_position_embeddings")?,
            eos_token_ids: token_ids(raw.get("eos_token_id"), "eos_token_id", &file)?,
            raw,
            hidden,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            intermediate,
            vocab,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings,
            dtype,
            layer_window,
        })
    }

    /// Rotary inverse frequencies (head_dim / 2 of them), computed in f32 in
    /// the same order of operations as transformers.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0f32 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_ctx,
            } => {
                let low_freq_wavelen = old_ctx / low_freq_factor;
                let high_freq_wavelen = old_ctx / high_freq_factor;
                base.iter()
                    .map(|&inv| {
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        let scaled = if wavelen > low_freq_wavelen { inv / factor } else { inv };
                        let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                        if medium {
                            let smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// Elements of every base-model tensor: embedding, per layer two norms and
    /// the seven projections with their biases, the final norm, and the LM
    /// head unless tied.
    pub fn n_params(&self) -> usize {
        use crate::model::Proj;
        let h = self.hidden;
        let projections: usize = Proj::ALL
            .iter()
            .map(|&p| {
                let (i, o) = p.dims(self);
                i * o + if p.has_bias(self) { o } else { 0 }
            })
            .sum();
        let embed = self.vocab * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.n_layers * (2 * h + projections)
    }
}
