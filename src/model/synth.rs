//! Synthetic checkpoints: a registry family plus a size preset, with random
//! weights, written as a real HF directory (config.json + safetensors). For
//! benchmarks and tests that must not depend on downloading a model. Tensors
//! are generated and written one at a time, so memory stays small.

use crate::util::rng::Rng;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{BufWriter, Write};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub family: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub tie: bool,
    pub rope_theta: f64,
    /// Extra config.json keys (rope scaling, sliding window ...).
    pub extra: Value,
}

/// Most layers a synthetic model may have (--layers): past any real model,
/// low enough that sizes computed from it cannot overflow.
pub const MAX_LAYERS: usize = 1024;

pub const PRESETS: &[&str] = &["tiny", "llama3.2-1b", "llama3-8b", "mistral-7b", "qwen2-7b"];

pub fn preset(name: &str) -> Result<SynthSpec> {
    let llama3_scaling = json!({"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
    Ok(match name {
        "tiny" => SynthSpec { family: "llama".into(), hidden: 64, layers: 2, heads: 4, kv_heads: 2, intermediate: 128,
            vocab: 257, tie: false, rope_theta: 10000.0, extra: json!({}) },
        "llama3.2-1b" => SynthSpec { family: "llama".into(), hidden: 2048, layers: 16, heads: 32, kv_heads: 8,
            intermediate: 8192, vocab: 128256, tie: true, rope_theta: 500000.0, extra: llama3_scaling },
        "llama3-8b" => SynthSpec { family: "llama".into(), hidden: 4096, layers: 32, heads: 32, kv_heads: 8,
            intermediate: 14336, vocab: 128256, tie: false, rope_theta: 500000.0, extra: json!({}) },
        "mistral-7b" => SynthSpec { family: "mistral".into(), hidden: 4096, layers: 32, heads: 32, kv_heads: 8,
            intermediate: 14336, vocab: 32768, tie: false, rope_theta: 1e6, extra: json!({"sliding_window": null}) },
        "qwen2-7b" => SynthSpec { family: "qwen2".into(), hidden: 3584, layers: 28, heads: 28, kv_heads: 4,
            intermediate: 18944, vocab: 152064, tie: false, rope_theta: 1e6, extra: json!({"use_sliding_window": false}) },
        other => bail!("unknown preset \"{other}\"; choose one of {}", PRESETS.join(", ")),
    })
}

fn family_info(family: &str) -> Result<&'static crate::registry::Family> {
    crate::registry::families()
        .iter()
        .find(|f| f.family == family)
        .with_context(|| format!("unknown family \"{family}\"; supported: {}", crate::registry::supported_list()))
}

/// The config.json of a spec (older layout, bf16).
pub fn config_json(spec: &SynthSpec) -> Result<Value> {
    let fam = family_info(&spec.family)?;
    let mut c = json!({
        "architectures": [fam.architectures[0]],
        "model_type": fam.model_types[0],
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "intermediate_size": spec.intermediate,
        "vocab_size": spec.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie,
        "max_position_embeddings": 8192,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    });
    if let (Some(dst), Some(src)) = (c.as_object_mut(), spec.extra.as_object()) {
        for (k, v) in src {
            dst.insert(k.clone(), v.clone());
        }
    }
    Ok(c)
}

/// The resolved model config of a spec.
pub fn model_config(spec: &SynthSpec) -> Result<crate::model::hparams::ModelConfig> {
    let raw = config_json(spec)?;
    let fam = family_info(&spec.family)?;
    crate::model::hparams::ModelConfig::from_json(raw, fam, Path::new("<synthetic>"))
}

/// Tensor names and shapes of a spec, in checkpoint order.
pub fn tensor_list(spec: &SynthSpec) -> Result<Vec<(String, Vec<usize>)>> {
    let cfg = model_config(spec)?;
    Ok(crate::model::tensor_list(&cfg).into_iter().map(|(name, shape, _)| (name, shape)).collect())
}

/// Write a bf16 checkpoint with random weights (norms near 1, linear
/// weights ~ N(0, 0.02), biases ~ N(0, 0.02)).
pub fn write(spec: &SynthSpec, dir: &Path, seed: u64) -> Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors = tensor_list(spec)?;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name.clone(), json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut header_bytes = serde_json::to_vec(&Value::Object(header))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let tmp = dir.join("model.safetensors.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
    out.write_all(&header_bytes)?;
    let mut rng = Rng::new(seed);
    for (name, shape) in &tensors {
        let numel: usize = shape.iter().product();
        let is_norm = shape.len() == 1 && !name.ends_with(".bias");
        let mut buf = Vec::with_capacity(numel * 2);
        for _ in 0..numel {
            let x = if is_norm { 1.0 + 0.1 * rng.normal() } else { 0.02 * rng.normal() };
            buf.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
        }
        out.write_all(&buf)?;
    }
    out.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    let config = config_json(spec)?;
    crate::util::atomic_write(&dir.join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    Ok((8 + header_bytes.len() + offset) as u64)
}
