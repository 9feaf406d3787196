//! The checkpoint tensors a model of a config reads, in the order
//! `Model::build_with` asks for them.

use super::hparams::{Mixer, ModelConfig};
use super::Proj;

/// What a checkpoint tensor is to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tensor {
    /// The weight of a projection (an nn.Linear: QLoRA holds it in NF4, as
    /// bitsandbytes quantizes every Linear but the LM head). Gemma 4's
    /// whole-model per_layer_model_projection is one too.
    Projection,
    /// Anything else: embeddings, norms, biases, the LM head.
    Other,
}

/// Every tensor a model of this config reads, in checkpoint order (the
/// order `Model::build_with` asks for them), with its shape: the
/// embedding; per layer the input norm, the q/k norms (attention layers) or
/// the delta-net's conv, A_log, dt_bias and norm (linear-attention layers), each projection with
/// its bias, the post-attention norm, the pre-MLP norm and the post-MLP
/// norm (those the family has); the final norm and the untied LM head.
pub fn tensor_list(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Tensor)> {
    let w = &cfg.family.weights;
    let (h, d) = (cfg.hidden, cfg.head_dim);
    let mut out = vec![(w.embed.clone(), vec![cfg.vocab, h], Tensor::Other)];
    if let (Some(g), Some(names)) = (&cfg.gemma4, &w.gemma4)
        && g.ple > 0
    {
        out.push((names.embed_per_layer.clone(), vec![g.ple_vocab, cfg.n_layers * g.ple], Tensor::Other));
        out.push((format!("{}.weight", names.model_projection), vec![cfg.n_layers * g.ple, h], Tensor::Projection));
        out.push((names.projection_norm.clone(), vec![g.ple], Tensor::Other));
    }
    for i in 0..cfg.n_layers {
        let d = cfg.gemma4.as_ref().map_or(d, |g| g.head_dim[i]);
        let shares_kv = cfg.gemma4.as_ref().is_some_and(|g| g.kv_source[i].is_some());
        let prefix = w.layer.replace("{i}", &i.to_string());
        let mut norm = |name: &Option<String>, len: usize| {
            if let Some(n) = name {
                out.push((format!("{prefix}.{n}"), vec![len], Tensor::Other));
            }
        };
        norm(&Some(w.input_norm.clone()), h);
        match (cfg.layer_mixer[i], &w.delta_net, cfg.delta) {
            (Mixer::DeltaNet, Some(names), Some(dims)) => {
                out.push((format!("{prefix}.{}", names.conv), vec![dims.conv_dim(), 1, dims.conv_kernel], Tensor::Other));
                out.push((format!("{prefix}.{}", names.a_log), vec![dims.v_heads], Tensor::Other));
                out.push((format!("{prefix}.{}", names.dt_bias), vec![dims.v_heads], Tensor::Other));
                out.push((format!("{prefix}.{}", names.norm), vec![dims.v_dim], Tensor::Other));
            }
            _ => {
                norm(&w.q_norm, d);
                if !shares_kv {
                    norm(&w.k_norm, d);
                }
            }
        }
        for &p in Proj::of_layer(cfg, i).iter().filter(|&&p| p != Proj::PleModel) {
            let (in_f, out_f) = p.dims(cfg, i);
            let path = format!("{prefix}.{}", p.path(cfg));
            out.push((format!("{path}.weight"), vec![out_f, in_f], Tensor::Projection));
            if p.has_bias(cfg) {
                out.push((format!("{path}.bias"), vec![out_f], Tensor::Other));
            }
        }
        let mut norm = |name: &Option<String>| {
            if let Some(n) = name {
                out.push((format!("{prefix}.{n}"), vec![h], Tensor::Other));
            }
        };
        norm(&w.post_attn_norm);
        norm(&Some(w.pre_mlp_norm.clone()));
        norm(&w.post_mlp_norm);
        if let (Some(g), Some(names)) = (&cfg.gemma4, &w.gemma4) {
            if g.ple > 0 {
                out.push((format!("{prefix}.{}", names.post_norm), vec![h], Tensor::Other));
            }
            out.push((format!("{prefix}.{}", names.layer_scalar), vec![1], Tensor::Other));
        }
    }
    out.push((w.final_norm.clone(), vec![h], Tensor::Other));
    if !cfg.tie_word_embeddings {
        out.push((w.lm_head.clone(), vec![cfg.vocab, h], Tensor::Other));
    }
    out
}

/// The checkpoint names of the weights QLoRA and `quantize` hold in NF4:
/// the model's projections (the towers and heads a family does not train
/// are not among them, so they stay as stored).
pub fn projection_weights(cfg: &ModelConfig) -> std::collections::HashSet<String> {
    tensor_list(cfg).into_iter().filter(|(_, _, kind)| *kind == Tensor::Projection).map(|(name, ..)| name).collect()
}
