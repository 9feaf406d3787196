//! Gemma 4's hyper-parameters beyond the common ones: per-layer head sizes
//! (full layers have their own, from `per_layer_config` or
//! `global_head_dim`), K=V full layers, K/V sharing, the double-wide MLP of
//! the sharing layers, per-layer embeddings and the two RoPE tables. The
//! compute lives in `gemma4_layer`.

use super::rope::{Rope, RopeScaling};
use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The rotary table of full layers (index 0) and of sliding ones (1).
pub const FULL_ROPE: usize = 0;
pub const SLIDING_ROPE: usize = 1;

/// Gemma 4's per-layer numbers, from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma4Config {
    pub head_dim: Vec<usize>,
    pub kv_heads: Vec<usize>,
    pub intermediate: Vec<usize>,
    /// For a K/V-sharing layer, the earlier layer whose final K/V it uses.
    pub kv_source: Vec<Option<usize>>,
    /// Full layers without v_proj: V = v_norm(raw k_proj output).
    pub k_eq_v: Vec<bool>,
    /// Per-layer embedding width (0 = none) and its table's rows.
    pub ple: usize,
    pub ple_vocab: usize,
    /// The rotated width of each rotary table ([full, sliding]).
    pub rope_dims: [usize; 2],
}

impl Gemma4Config {
    /// Whether some later layer reads layer `li`'s K/V.
    pub fn is_kv_producer(&self, li: usize) -> bool {
        self.kv_source.contains(&Some(li))
    }
}

/// The numbers the common config already read, which Gemma 4's refine.
pub struct Common<'a> {
    pub file: &'a str,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// Which layers are sliding ones (from layer_types).
    pub sliding: Vec<bool>,
}

fn uint(v: &Value, key: &str, file: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .with_context(|| format!("{file}: \"{key}\" must be a non-negative integer, found {x}")),
    }
}

fn flag(v: &Value, key: &str, file: &str) -> Result<bool> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => bail!("{file}: \"{key}\" must be true or false, found {x}"),
    }
}

fn number(v: &Value, key: &str, file: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).with_context(|| format!("{file}: \"{key}\" must be a number, found {x}")),
    }
}

/// Read Gemma 4's keys of config.json `raw`; returns its numbers and the
/// rotary tables [full, sliding].
pub fn parse(raw: &Value, c: &Common) -> Result<(Gemma4Config, Vec<Rope>)> {
    let file = c.file;
    let n = c.n_layers;
    if flag(raw, "enable_moe_block", file)? {
        bail!("{file}: \"enable_moe_block\" is true; Gemma 4's mixture-of-experts variant is not supported (dense models only)");
    }
    // "vision" (the hub checkpoints') lets image tokens attend both ways;
    // text, all that is trained or generated here, stays causal as with null.
    if let Some(v) = raw.get("use_bidirectional_attention").filter(|v| !v.is_null() && v.as_str() != Some("vision")) {
        bail!("{file}: \"use_bidirectional_attention\" is {v}; only causal attention on text (null or \"vision\") is supported");
    }
    let k_eq_v_cfg = flag(raw, "attention_k_eq_v", file)?;

    // Full layers' head size and KV heads: per_layer_config (transformers 5
    // writes it) or global_head_dim / num_global_key_value_heads (hub files).
    let mut head_dim = vec![c.head_dim; n];
    let mut kv_heads = vec![c.n_kv_heads; n];
    match raw.get("per_layer_config").filter(|v| !v.is_null()) {
        Some(Value::Object(map)) => {
            for (key, entry) in map {
                let li: usize = key
                    .parse()
                    .ok()
                    .filter(|&i| i < n)
                    .with_context(|| format!("{file}: per_layer_config has key \"{key}\"; expected layer indices 0..{}", n - 1))?;
                if !entry.is_object() {
                    bail!("{file}: per_layer_config[\"{key}\"] must be an object with head_dim / num_key_value_heads, found {entry}");
                }
                if let Some(d) = uint(entry, "head_dim", file)? {
                    head_dim[li] = d;
                }
                if let Some(k) = uint(entry, "num_key_value_heads", file)? {
                    kv_heads[li] = k;
                }
            }
        }
        Some(x) => bail!("{file}: \"per_layer_config\" must be an object keyed by layer index, found {x}"),
        None => {
            let global = uint(raw, "global_head_dim", file)?.unwrap_or(512);
            let global_kv = if k_eq_v_cfg { uint(raw, "num_global_key_value_heads", file)? } else { None };
            for li in (0..n).filter(|&i| !c.sliding[i]) {
                head_dim[li] = global;
                if let Some(k) = global_kv {
                    kv_heads[li] = k;
                }
            }
        }
    }
    for li in 0..n {
        if head_dim[li] == 0 || !head_dim[li].is_multiple_of(2) {
            bail!("{file}: layer {li} has head_dim {}; it must be a positive even number", head_dim[li]);
        }
        if kv_heads[li] == 0 || !c.n_heads.is_multiple_of(kv_heads[li]) {
            bail!("{file}: layer {li} has {} key/value heads; num_attention_heads ({}) must be a multiple of it", kv_heads[li], c.n_heads);
        }
    }
    let types_of = |sliding: bool| -> Vec<usize> { (0..n).filter(|&i| c.sliding[i] == sliding).collect() };
    for sliding in [false, true] {
        let layers = types_of(sliding);
        if let Some(&first) = layers.first()
            && let Some(&other) = layers.iter().find(|&&i| head_dim[i] != head_dim[first])
        {
            bail!("{file}: layers {first} and {other} are of one type but have head_dim {} and {}; each layer type has one rotary table", head_dim[first], head_dim[other]);
        }
    }

    // K/V sharing: the last num_kv_shared_layers layers read the final K/V
    // of the last earlier layer of their type.
    let shared = uint(raw, "num_kv_shared_layers", file)?.unwrap_or(0);
    if shared >= n && shared > 0 {
        bail!("{file}: \"num_kv_shared_layers\" is {shared}; a model of {n} layers can share at most {}", n - 1);
    }
    let first_shared = n - shared;
    let mut kv_source = vec![None; n];
    for li in first_shared..n {
        let src = (0..first_shared).rev().find(|&j| c.sliding[j] == c.sliding[li]).with_context(|| {
            format!("{file}: layer {li} shares K/V (num_kv_shared_layers {shared}) but no earlier layer of its type computes them")
        })?;
        if head_dim[src] != head_dim[li] || kv_heads[src] != kv_heads[li] {
            bail!("{file}: layer {li} reads layer {src}'s K/V but their head_dim / num_key_value_heads differ");
        }
        kv_source[li] = Some(src);
    }
    let k_eq_v = (0..n).map(|i| k_eq_v_cfg && !c.sliding[i] && kv_source[i].is_none()).collect();
    let double = flag(raw, "use_double_wide_mlp", file)?;
    let intermediate = (0..n).map(|i| if double && kv_source[i].is_some() { 2 * c.intermediate } else { c.intermediate }).collect();

    let ple = uint(raw, "hidden_size_per_layer_input", file)?.unwrap_or(0);
    let ple_vocab = if ple > 0 { uint(raw, "vocab_size_per_layer_input", file)?.unwrap_or(c.vocab) } else { 0 };
    if ple > 0 && ple_vocab == 0 {
        bail!("{file}: \"vocab_size_per_layer_input\" is 0; the per-layer embedding table needs rows");
    }

    let full_dim = types_of(false).first().map_or(c.head_dim, |&i| head_dim[i]);
    let sliding_dim = types_of(true).first().map_or(c.head_dim, |&i| head_dim[i]);
    let ropes = vec![rope_of(raw, "full_attention", full_dim, file)?, rope_of(raw, "sliding_attention", sliding_dim, file)?];
    let cfg = Gemma4Config { head_dim, kv_heads, intermediate, kv_source, k_eq_v, ple, ple_vocab, rope_dims: [full_dim, sliding_dim] };
    Ok((cfg, ropes))
}

/// One layer type's table from rope_parameters[layer_type] (transformers'
/// defaults when absent: full "proportional" θ 1e6 with 1/4 of the pairs
/// turning, sliding "default" θ 1e4).
fn rope_of(raw: &Value, layer_type: &str, dim: usize, file: &str) -> Result<Rope> {
    let p = raw.get("rope_parameters").and_then(|p| p.get(layer_type)).filter(|v| !v.is_null());
    let full = layer_type == "full_attention";
    let Some(p) = p else {
        return Ok(if full {
            Rope { theta: 1e6, scaling: RopeScaling::Proportional { pairs: (0.25 * dim as f64) as usize / 2, factor: 1.0 } }
        } else {
            Rope { theta: 1e4, scaling: RopeScaling::None }
        });
    };
    let theta = number(p, "rope_theta", file)?.unwrap_or(if full { 1e6 } else { 1e4 }) as f32;
    if !(theta.is_finite() && theta > 0.0) {
        bail!("{file}: rope_parameters.{layer_type}.rope_theta is {theta}; it must be a positive number");
    }
    let kind = p.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "proportional" => {
            let partial = number(p, "partial_rotary_factor", file)?.unwrap_or(1.0);
            if !(partial > 0.0 && partial <= 1.0) {
                bail!("{file}: rope_parameters.{layer_type}.partial_rotary_factor is {partial}; it must be in (0, 1]");
            }
            let factor = number(p, "factor", file)?.unwrap_or(1.0) as f32;
            if !(factor.is_finite() && factor > 0.0) {
                bail!("{file}: rope_parameters.{layer_type}.factor is {factor}; it must be a positive number");
            }
            // transformers: int(partial · head_dim // 2) pairs turn.
            RopeScaling::Proportional { pairs: (partial * dim as f64 / 2.0).floor() as usize, factor }
        }
        other => bail!("{file}: rope_parameters.{layer_type}.rope_type is \"{other}\"; Gemma 4 supports \"default\" and \"proportional\""),
    };
    Ok(Rope { theta, scaling })
}
