//! Model FLOPs of a LoRA training step, by one stated convention, so that
//! tokens/s, TFLOP/s and MFU are comparable across runs and tools:
//!
//!   per step = Σ_tokens (4·N_base + 6·N_lora) + attention + delta-net
//!   attention = 6 · Σ_attention layers d_attn · Σ_seq (s·(s+1)/2 visible pairs, or
//!               fewer under a sliding window)   [12·L·T·d_attn per token
//!               for full T×T, halved for causal, summed over packed
//!               sequences]
//!   delta-net = 3 · L_delta · tokens · (6·Hv·dk·dv + 2·C·K)
//!               [linear attention: per token and value head, three
//!               dk×dv products with the state (Sᵀk, k⊗u, Sᵀq) and the
//!               conv's C·K multiply-adds, forward, times 3 for forward +
//!               backward; linear in length, unlike attention]
//!
//! N_base counts the matrices that are multiplied: every projection of every
//! layer plus the LM head (the embedding gather is not a matmul). Frozen base
//! weights cost a forward and an input-gradient product (2 + 2 FLOPs per
//! weight per token); LoRA weights also get weight gradients (2 + 2 + 2).
//! Recompute under gradient checkpointing is not counted.

use super::hparams::{Mixer, ModelConfig};
use super::{Model, Proj};
use crate::backend::Backend;

/// Base-model weights that take part in matrix products.
pub fn matmul_params(cfg: &ModelConfig) -> u64 {
    let layers: usize = (0..cfg.n_layers)
        .flat_map(|li| Proj::of_layer(cfg, li).iter().map(move |&p| (li, p)))
        .map(|(li, p)| {
            let (i, o) = p.dims(cfg, li);
            i * o
        })
        .sum();
    (layers + cfg.vocab * cfg.hidden) as u64
}

pub fn lora_params<B: Backend>(model: &Model<B>) -> u64 {
    model.loras().map(|(li, p, l)| {
        let lin = model.layers[li].p(p);
        (l.r * (lin.in_f + lin.out_f)) as u64
    }).sum()
}

/// Query-key pairs each layer computes for sequences of these lengths.
pub fn attention_pairs(cfg: &ModelConfig, seq_lens: &[usize], layer: usize) -> u64 {
    seq_lens
        .iter()
        .map(|&s| {
            let s = s as u64;
            match cfg.layer_window[layer] {
                Some(w) if (w as u64) < s => {
                    let w = w as u64;
                    // Query i sees min(i + 1, w) keys.
                    w * (w + 1) / 2 + (s - w) * w
                }
                _ => s * (s + 1) / 2,
            }
        })
        .sum()
}

/// d_attn of layer `l`: query heads × head size (Gemma 4's full and
/// sliding layers have their own head size).
pub fn attention_width(cfg: &ModelConfig, l: usize) -> usize {
    cfg.n_heads * cfg.gemma4.as_ref().map_or(cfg.head_dim, |g| g.head_dim[l])
}

/// Training FLOPs of one pass over sequences of these lengths.
pub fn training_flops(cfg: &ModelConfig, n_lora: u64, seq_lens: &[usize]) -> f64 {
    let tokens: u64 = seq_lens.iter().map(|&s| s as u64).sum();
    let dense = tokens as f64 * (4.0 * matmul_params(cfg) as f64 + 6.0 * n_lora as f64);
    let attn: f64 = (0..cfg.n_layers)
        .filter(|&l| cfg.layer_mixer[l] == Mixer::Attention)
        .map(|l| 6.0 * attention_width(cfg, l) as f64 * attention_pairs(cfg, seq_lens, l) as f64)
        .sum();
    dense + attn + delta_net_flops(cfg, tokens)
}

/// The gated delta-net layers' own FLOPs (besides their projections) over
/// `tokens` tokens: linear in length (see the module doc).
pub fn delta_net_flops(cfg: &ModelConfig, tokens: u64) -> f64 {
    let Some(d) = cfg.delta else { return 0.0 };
    let layers = cfg.layer_mixer.iter().filter(|&&m| m == Mixer::DeltaNet).count() as f64;
    let per_token = 6.0 * (d.v_heads * d.k_dim * d.v_dim) as f64 + 2.0 * (d.conv_dim() * d.conv_kernel) as f64;
    3.0 * layers * tokens as f64 * per_token
}

pub const CONVENTION: &str = "model FLOPs = tokens·(4·N_base + 6·N_lora) + 6·Σ_attn layers d_attn·(causal query-key pairs) + 3·L_delta·tokens·(6·Hv·dk·dv + 2·C·K) (delta-net: linear in length); recompute not counted";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth;

    #[test]
    fn causal_pairs_and_windows() {
        let mut spec = synth::preset("tiny").unwrap();
        spec.family = "mistral".into();
        spec.extra = serde_json::json!({"sliding_window": 3});
        let cfg = synth::model_config(&spec).unwrap();
        // Window 3 over 5 tokens: 1 + 2 + 3 + 3 + 3 visible keys.
        assert_eq!(attention_pairs(&cfg, &[5], 0), 12);
        // Longer than the sequence: plain causal, s(s+1)/2.
        assert_eq!(attention_pairs(&cfg, &[2, 3], 0), 3 + 6);
    }

    #[test]
    fn llama3_8b_matmul_params() {
        let cfg = synth::model_config(&synth::preset("llama3-8b").unwrap()).unwrap();
        // 32 layers × 218.1M + 525.3M LM head: the 8.03B total less the embedding.
        let n = matmul_params(&cfg);
        assert_eq!(n, 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 128256 * 4096);
        assert!((7.4e9..7.6e9).contains(&(n as f64)));
    }
}
