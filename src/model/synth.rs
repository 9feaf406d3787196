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

pub const PRESETS: &[&str] =
    &["tiny", "llama3.2-1b", "llama3-8b", "mistral-7b", "qwen2-7b", "qwen3-0.6b", "qwen3-4b", "qwen3-8b", "gemma2-9b", "gemma3-1b", "gemma3-4b", "phi4-mini", "qwen3.5-9b", "gemma4-e4b"];

/// Phi-4-mini's long-rope factors are a list per rotated frequency (48 of
/// them); the synthetic model uses a smooth ramp of the same length and range.
fn longrope_factors(n: usize, last: f64) -> Vec<f64> {
    (0..n).map(|i| 1.0 + (last - 1.0) * i as f64 / (n - 1) as f64).collect()
}

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
        "qwen3-0.6b" => SynthSpec { family: "qwen3".into(), hidden: 1024, layers: 28, heads: 16, kv_heads: 8,
            intermediate: 3072, vocab: 151936, tie: true, rope_theta: 1e6, extra: json!({"head_dim": 128}) },
        "qwen3-4b" => SynthSpec { family: "qwen3".into(), hidden: 2560, layers: 36, heads: 32, kv_heads: 8,
            intermediate: 9728, vocab: 151936, tie: true, rope_theta: 1e6, extra: json!({"head_dim": 128}) },
        "qwen3-8b" => SynthSpec { family: "qwen3".into(), hidden: 4096, layers: 36, heads: 32, kv_heads: 8,
            intermediate: 12288, vocab: 151936, tie: false, rope_theta: 1e6, extra: json!({"head_dim": 128}) },
        "gemma2-9b" => SynthSpec { family: "gemma2".into(), hidden: 3584, layers: 42, heads: 16, kv_heads: 8,
            intermediate: 14336, vocab: 256000, tie: true, rope_theta: 10000.0,
            extra: json!({"head_dim": 256, "hidden_act": null, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "sliding_window": 4096, "rms_norm_eps": 1e-6}) },
        "gemma3-1b" => SynthSpec { family: "gemma3".into(), hidden: 1152, layers: 26, heads: 4, kv_heads: 1,
            intermediate: 6912, vocab: 262144, tie: true, rope_theta: 1e6,
            extra: json!({"head_dim": 256, "hidden_act": null, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
                "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6}) },
        "gemma3-4b" => SynthSpec { family: "gemma3".into(), hidden: 2560, layers: 34, heads: 8, kv_heads: 4,
            intermediate: 10240, vocab: 262208, tie: true, rope_theta: 1e6,
            extra: json!({"head_dim": 256, "hidden_act": null, "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
                "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rms_norm_eps": 1e-6}) },
        "phi4-mini" => SynthSpec { family: "phi3".into(), hidden: 3072, layers: 32, heads: 24, kv_heads: 8,
            intermediate: 8192, vocab: 200064, tie: true, rope_theta: 10000.0,
            extra: json!({"partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
                "original_max_position_embeddings": 4096, "sliding_window": 262144,
                "rope_scaling": {"type": "longrope", "short_factor": longrope_factors(48, 3.0),
                    "long_factor": longrope_factors(48, 60.0)}}) },
        // Qwen3.5-9B's text model: 8 blocks of (3 delta-net layers, 1 gated
        // full-attention layer); delta-net 16 key / 32 value heads of 128.
        "qwen3.5-9b" => SynthSpec { family: "qwen3_5".into(), hidden: 4096, layers: 32, heads: 16, kv_heads: 4,
            intermediate: 12288, vocab: 248320, tie: false, rope_theta: 1e7,
            extra: json!({"head_dim": 256, "rms_norm_eps": 1e-6, "full_attention_interval": 4,
                "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25}) },
        // Gemma 4 E4B's text model: 42 layers, five sliding (head 256,
        // window 512) to one full (head 512, proportional RoPE); the last 18
        // layers read an earlier layer's K/V; per-layer embeddings of 256.
        "gemma4-e4b" => SynthSpec { family: "gemma4".into(), hidden: 2560, layers: 42, heads: 8, kv_heads: 2,
            intermediate: 10240, vocab: 262144, tie: true, rope_theta: 1e4,
            extra: json!({"head_dim": 256, "global_head_dim": 512, "hidden_act": null,
                "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": 512,
                "layer_types": (0..42).map(|i| if i % 6 == 5 { "full_attention" } else { "sliding_attention" }).collect::<Vec<_>>(),
                "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
                "num_kv_shared_layers": 18, "use_double_wide_mlp": false, "attention_k_eq_v": false,
                "final_logit_softcapping": 30.0,
                "rope_parameters": {
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}) },
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
    let cfg = model_config(spec)?;
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
        // (1 + w) norms store offsets from one.
        let center = if cfg.norm_plus_one { 0.0 } else { 1.0 };
        let mut buf = Vec::with_capacity(numel * 2);
        for _ in 0..numel {
            let x = if is_norm { center + 0.1 * rng.normal() } else { 0.02 * rng.normal() };
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

/// A word-level tokenizer for a synthetic model's vocabulary: token i is the
/// word "t{i}", text is split on whitespace and decoded with single spaces,
/// and the last token is the end-of-sequence token. With it `generate` and
/// `train` (GRPO's sampling included) run on a synthetic checkpoint.
pub fn write_word_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    let words: serde_json::Map<String, Value> = (0..vocab).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"},
    });
    crate::util::atomic_write(&dir.join("tokenizer.json"), serde_json::to_string(&tokenizer)?.as_bytes())?;
    let config = json!({"eos_token": format!("t{}", vocab - 1), "tokenizer_class": "PreTrainedTokenizerFast"});
    crate::util::atomic_write(&dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)?.as_bytes())
}
