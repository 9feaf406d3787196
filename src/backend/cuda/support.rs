//! What the CUDA kernels can run, asked of a model's config before any
//! weight is read: each layer's attention head size against the attention
//! kernels' limit, each gated delta-net layer's key and value head sizes
//! against the delta-net kernels'. A model over a limit is refused with the
//! layers, the size and the limit, instead of failing at its first launch.
//! Also the start-up line naming the attention kernel of each head size.

use super::attention::{MAX_HEAD_DIM as ATTN_MAX, path_for};
use super::delta_net::MAX_HEAD_DIM as DELTA_MAX;
use crate::model::hparams::{Mixer, ModelConfig};
use anyhow::bail;
use std::collections::BTreeMap;

/// Which kind of attention layer `li` is, in words.
fn attention_kind(cfg: &ModelConfig, li: usize) -> &'static str {
    if cfg.layer_window.get(li).copied().flatten().is_some() { "sliding" } else { "full" }
}

/// Each attention layer's head size: the model's, or Gemma 4's per layer.
fn attention_layers(cfg: &ModelConfig) -> impl Iterator<Item = (usize, usize)> + '_ {
    (0..cfg.n_layers)
        .filter(|&li| cfg.layer_mixer.get(li).is_none_or(|m| *m == Mixer::Attention))
        .map(|li| (li, cfg.gemma4.as_ref().map_or(cfg.head_dim, |g| g.head_dim[li])))
}

/// "layer 3" or "layers 3, 7, 11".
fn layers_phrase(layers: &[usize]) -> String {
    let list: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    format!("{} {}", if layers.len() == 1 { "layer" } else { "layers" }, list.join(", "))
}

/// Refuses a model the CUDA kernels cannot run (see the module comment).
pub fn check_model(cfg: &ModelConfig) -> anyhow::Result<()> {
    // Over-limit attention layers, grouped by (head size, kind).
    let mut over: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for (li, d) in attention_layers(cfg).filter(|&(_, d)| d > ATTN_MAX) {
        over.entry((d, attention_kind(cfg, li))).or_default().push(li);
    }
    if let Some(((d, kind), layers)) = over.into_iter().next() {
        bail!(
            "this model cannot run on the CUDA backend: {} ({kind} attention) {} head_dim {d}, over the CUDA attention kernels' limit of {ATTN_MAX} (the CPU backend, --device cpu, has no such limit)",
            layers_phrase(&layers),
            if layers.len() == 1 { "has" } else { "have" },
        );
    }
    if let Some(dd) = &cfg.delta {
        let layers: Vec<usize> = (0..cfg.n_layers).filter(|&li| cfg.layer_mixer.get(li) == Some(&Mixer::DeltaNet)).collect();
        if !layers.is_empty() && (dd.k_dim > DELTA_MAX || dd.v_dim > DELTA_MAX) {
            bail!(
                "this model cannot run on the CUDA backend: {} (gated delta-net) {} key head dim {} and value head dim {}, over the CUDA delta-net kernels' limit of {DELTA_MAX} for each (the CPU backend, --device cpu, has no such limit)",
                layers_phrase(&layers),
                if layers.len() == 1 { "has" } else { "have" },
                dd.k_dim,
                dd.v_dim,
            );
        }
    }
    Ok(())
}

/// The attention kernel of each distinct head size of the model's attention
/// layers, for the start-up line: `path_for(head_dim)` when there is one,
/// else one entry per size, labelled with the kinds of layer that have it
/// (Gemma 4: "sliding layers: ... (head_dim 256; ...); full layers: ...
/// (head_dim 512; ...)").
pub fn attention_paths(cfg: &ModelConfig) -> String {
    let mut kinds: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (li, d) in attention_layers(cfg) {
        let k = kinds.entry(d).or_default();
        let kind = attention_kind(cfg, li);
        if !k.contains(&kind) {
            k.push(kind);
        }
    }
    match kinds.len() {
        0 => "none: the model has no attention layer".to_string(),
        1 => path_for(*kinds.keys().next().expect("one head size")),
        _ => kinds.iter().map(|(d, k)| format!("{} layers: {}", k.join(" and "), path_for(*d))).collect::<Vec<_>>().join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth;
    use serde_json::json;

    fn config(preset: &str, extra: serde_json::Value) -> ModelConfig {
        let mut spec = synth::preset(preset).unwrap();
        spec.layers = 4;
        for (k, v) in extra.as_object().unwrap() {
            spec.extra[k] = v.clone();
        }
        synth::model_config(&spec).unwrap()
    }

    #[test]
    fn heads_within_the_limits_are_accepted() {
        for preset in ["tiny", "gemma3-1b", "qwen3.5-9b"] {
            check_model(&config(preset, json!({}))).unwrap_or_else(|e| panic!("{preset}: {e:#}"));
        }
        check_model(&config("tiny", json!({"head_dim": 512}))).unwrap();
    }

    #[test]
    fn an_attention_head_over_512_is_refused_naming_the_layers_and_the_limit() {
        let err = check_model(&config("tiny", json!({"head_dim": 576}))).unwrap_err().to_string();
        assert!(err.contains("layers 0, 1, 2, 3 (full attention) have head_dim 576"), "{err}");
        assert!(err.contains("limit of 512"), "{err}");
    }

    #[test]
    fn a_delta_net_head_over_128_is_refused_naming_the_layers_and_the_limit() {
        // qwen3.5: layers 0-2 are delta-net, layer 3 full attention.
        let err = check_model(&config("qwen3.5-9b", json!({"linear_value_head_dim": 192}))).unwrap_err().to_string();
        assert!(err.contains("layers 0, 1, 2 (gated delta-net) have key head dim 128 and value head dim 192"), "{err}");
        assert!(err.contains("limit of 128"), "{err}");
    }

    /// Gemma 4's shape on a 4-layer config: sliding layers 0-2 of head
    /// size 256, a full layer 3 of `full`.
    fn gemma4_like(full: usize) -> ModelConfig {
        use crate::model::gemma4::Gemma4Config;
        let mut cfg = config("gemma3-1b", json!({}));
        cfg.layer_window = vec![Some(512), Some(512), Some(512), None];
        let n = cfg.n_layers;
        cfg.gemma4 = Some(Gemma4Config {
            head_dim: vec![256, 256, 256, full],
            kv_heads: vec![1; n],
            intermediate: vec![cfg.intermediate; n],
            kv_source: vec![None; n],
            k_eq_v: vec![false; n],
            ple: 0,
            ple_vocab: 0,
            rope_dims: [full, 256],
        });
        cfg
    }

    #[test]
    fn per_layer_head_sizes_are_checked_and_each_is_named() {
        let cfg = gemma4_like(512);
        check_model(&cfg).unwrap();
        assert_eq!(attention_paths(&cfg), format!("sliding layers: {}; full layers: {}", path_for(256), path_for(512)));
        let err = check_model(&gemma4_like(1024)).unwrap_err().to_string();
        assert!(err.contains("layer 3 (full attention) has head_dim 1024, over the CUDA attention kernels' limit of 512"), "{err}");
        // One head size: the plain phrase.
        assert_eq!(attention_paths(&config("gemma3-1b", json!({}))), path_for(256));
    }
}
