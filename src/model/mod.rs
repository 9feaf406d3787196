//! The transformer: weights loaded from a checkpoint, LoRA attached to any
//! subset of projections, and the forward / hand-written backward (see
//! `layer` and `graph`).

pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod graph;
pub mod flops;
pub mod generate;
pub mod layer;
pub mod sample;
pub mod synth;

use crate::adapter::{Lora, LoraConfig};
use crate::backend::Backend;
use crate::util::rng::Rng;
use anyhow::Result;
use checkpoint::Checkpoint;
use config::ModelConfig;

/// The seven linear projections of a decoder layer, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];

    /// The checkpoint module path within a layer, from the registry.
    pub fn path(self, cfg: &ModelConfig) -> &'static str {
        let w = &cfg.family.weights;
        match self {
            Proj::Q => &w.q,
            Proj::K => &w.k,
            Proj::V => &w.v,
            Proj::O => &w.o,
            Proj::Gate => &w.gate,
            Proj::Up => &w.up,
            Proj::Down => &w.down,
        }
    }

    /// (in_features, out_features).
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden;
        let qd = cfg.n_heads * cfg.head_dim;
        let kvd = cfg.n_kv_heads * cfg.head_dim;
        match self {
            Proj::Q => (h, qd),
            Proj::K | Proj::V => (h, kvd),
            Proj::O => (qd, h),
            Proj::Gate | Proj::Up => (h, cfg.intermediate),
            Proj::Down => (cfg.intermediate, h),
        }
    }

    pub fn has_bias(self, cfg: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            Proj::Gate | Proj::Up | Proj::Down => cfg.mlp_bias,
        }
    }
}

/// A frozen linear layer with an optional LoRA adapter.
pub struct Linear<B: Backend> {
    pub weight: B::Weight,
    pub bias: Option<B::Weight>,
    pub in_f: usize,
    pub out_f: usize,
    pub lora: Option<Lora<B>>,
}

pub struct Layer<B: Backend> {
    pub input_norm: B::Weight,
    pub post_attention_norm: B::Weight,
    /// Indexed by `Proj as usize`.
    pub proj: Vec<Linear<B>>,
    pub window: Option<usize>,
}

impl<B: Backend> Layer<B> {
    pub fn p(&self, p: Proj) -> &Linear<B> {
        &self.proj[p as usize]
    }
}

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub embed: B::Weight,
    pub layers: Vec<Layer<B>>,
    pub final_norm: B::Weight,
    /// None when the embeddings are tied.
    pub lm_head: Option<B::Weight>,
    pub inv_freq: B::Buf,
    /// Tokens per LM-head + cross-entropy chunk (bounds the logits buffer).
    pub loss_chunk_tokens: usize,
}

/// Module path of a projection, as PEFT names it (without "base_model.model.").
pub fn module_path(cfg: &ModelConfig, layer: usize, p: Proj) -> String {
    format!("{}.{}", cfg.family.weights.layer.replace("{i}", &layer.to_string()), p.path(cfg))
}

impl<B: Backend> Model<B> {
    /// Load every weight through the backend, checking names and shapes.
    /// Each tensor's mapped pages are released once converted, so the
    /// process holds one copy (the backend's) of each weight.
    pub fn load(be: &B, ckpt: &Checkpoint) -> Result<Model<B>> {
        Self::build(be, ckpt.config.clone(), |name, shape| {
            let w = be.load_weight(&ckpt.tensor(name, shape)?)?;
            ckpt.release(name);
            Ok(w)
        })
    }

    /// Random weights for a config (benchmarks): linear weights uniform with
    /// std 0.02, norms 1 ± 0.1 uniform. Generated in parallel chunks, each
    /// from its own seed, so an 8B model is ready in seconds and the same
    /// seed gives the same weights on any thread count.
    pub fn random(be: &B, cfg: ModelConfig, seed: u64) -> Result<Model<B>> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let mut tensor = 0u64;
        Self::build(be, cfg, |name, shape| {
            tensor += 1;
            let numel: usize = shape.iter().product();
            let is_norm = shape.len() == 1 && !name.ends_with(".bias");
            // Uniform(-a, a) has std a/√3.
            let (center, half_width) = if is_norm { (1.0, 0.1) } else { (0.0, 0.02 * 3f32.sqrt()) };
            let mut data = vec![0f32; numel];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = Rng::new(seed ^ tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (c as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
                for x in chunk.iter_mut() {
                    *x = center + rng.uniform_range(-half_width, half_width);
                }
            });
            Ok(be.weight_from_f32(&data))
        })
    }

    /// Assemble the model, asking `get(name, shape)` for every tensor in
    /// checkpoint order.
    pub fn build(
        be: &B,
        cfg: ModelConfig,
        mut get: impl FnMut(&str, &[usize]) -> Result<B::Weight>,
    ) -> Result<Model<B>> {
        let names = &cfg.family.weights;
        let h = cfg.hidden;
        let embed = get(&names.embed, &[cfg.vocab, h])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let prefix = names.layer.replace("{i}", &i.to_string());
            let input_norm = get(&format!("{prefix}.{}", names.input_norm), &[h])?;
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (in_f, out_f) = p.dims(&cfg);
                let path = format!("{prefix}.{}", p.path(&cfg));
                let weight = get(&format!("{path}.weight"), &[out_f, in_f])?;
                let bias = if p.has_bias(&cfg) { Some(get(&format!("{path}.bias"), &[out_f])?) } else { None };
                proj.push(Linear { weight, bias, in_f, out_f, lora: None });
            }
            layers.push(Layer {
                input_norm,
                post_attention_norm: get(&format!("{prefix}.{}", names.post_attention_norm), &[h])?,
                proj,
                window: cfg.layer_window[i],
            });
        }
        let final_norm = get(&names.final_norm, &[h])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(get(&names.lm_head, &[cfg.vocab, h])?) };
        let inv_freq = be.upload(&cfg.inv_freq());
        Ok(Model { cfg, embed, layers, final_norm, lm_head, inv_freq, loss_chunk_tokens: 1024 })
    }

    pub fn head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Attach fresh LoRA adapters (PEFT init) to every targeted projection.
    /// Returns the number of adapted modules.
    pub fn attach_lora(&mut self, be: &B, lc: &LoraConfig, rng: &mut Rng) -> Result<usize> {
        let mut count = 0;
        for li in 0..self.layers.len() {
            for p in Proj::ALL {
                let path = module_path(&self.cfg, li, p);
                if !lc.targets.matches(&path)? {
                    continue;
                }
                let (r, scale) = lc.rank_and_scale(&path)?;
                let lin = &mut self.layers[li].proj[p as usize];
                lin.lora = Some(Lora::init(be, r, lin.in_f, lin.out_f, scale, lc.dropout, rng));
                count += 1;
            }
        }
        if count == 0 {
            anyhow::bail!("LoRA target_modules {:?} match no module of this model (module names look like {})",
                lc.targets, module_path(&self.cfg, 0, Proj::Q));
        }
        Ok(count)
    }

    /// Every LoRA adapter with its (layer, projection).
    pub fn loras(&self) -> impl Iterator<Item = (usize, Proj, &Lora<B>)> {
        self.layers.iter().enumerate().flat_map(|(li, l)| {
            Proj::ALL.into_iter().filter_map(move |p| l.proj[p as usize].lora.as_ref().map(|a| (li, p, a)))
        })
    }

    pub fn loras_mut(&mut self) -> impl Iterator<Item = (usize, Proj, &mut Lora<B>)> {
        self.layers.iter_mut().enumerate().flat_map(|(li, l)| {
            l.proj.iter_mut().zip(Proj::ALL).filter_map(move |(lin, p)| lin.lora.as_mut().map(|a| (li, p, a)))
        })
    }

    pub fn zero_grad(&mut self, be: &B) {
        for (_, _, l) in self.loras_mut() {
            l.zero_grad(be);
        }
    }
}
