//! The transformer: weights loaded from a checkpoint (`checkpoint`, its
//! hyper-parameters in `hparams`), LoRA attached to any subset of
//! projections, and the forward / hand-written backward (`layer`, and
//! `graph`: the one training pass, `Model::forward_backward_with`). A new
//! architecture is declared in the registry (models/*.yaml); a new op it
//! needs goes in `backend` and is called from `layer`.

pub mod batch;
mod nf4_load;
mod tensors;
mod delta_layer;
mod layer_bufs;
pub mod gemma4;
mod gemma4_layer;
pub mod checkpoint;
pub mod hparams;
pub mod graph;
pub mod flops;
pub mod generate;
pub mod generate_batch;
pub mod layer;
pub mod rope;
pub mod sample;
pub mod st_files;
pub mod synth;

use crate::adapter::{Lora, LoraConfig};
use crate::backend::Backend;
use crate::util::rng::Rng;
use anyhow::{Context, Result};
use checkpoint::Checkpoint;
use hparams::{Mixer, ModelConfig};
pub use delta_layer::delta_shape;
pub use nf4_load::quantize_nf4;
use nf4_load::load_prequantized;
pub use tensors::{Tensor, projection_weights, tensor_list};

/// The linear projections of a decoder layer. A family has either Q, K, V
/// or the fused Qkv ([q; k; v] rows, one matrix and one LoRA adapter), and
/// either Gate, Up or the fused GateUp ([gate; up] rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Qkv,
    GateUp,
    /// The gated delta-net's input projections (qkv before the conv, the
    /// output gate z, β's b, the decay's a) and its output projection.
    DeltaQkv,
    DeltaZ,
    DeltaB,
    DeltaA,
    DeltaOut,
    /// Gemma 4's per-layer-embedding gate and projection (per layer), and
    /// the whole model's per_layer_model_projection (held by layer 0).
    PleGate,
    PleProj,
    PleModel,
}

impl Proj {
    pub const ALL: [Proj; 17] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
        Proj::Qkv,
        Proj::GateUp,
        Proj::DeltaQkv,
        Proj::DeltaZ,
        Proj::DeltaB,
        Proj::DeltaA,
        Proj::DeltaOut,
        Proj::PleGate,
        Proj::PleProj,
        Proj::PleModel,
    ];
    const DELTA: [Proj; 8] = [Proj::DeltaQkv, Proj::DeltaZ, Proj::DeltaB, Proj::DeltaA, Proj::DeltaOut, Proj::Gate, Proj::Up, Proj::Down];
    const SEPARATE: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    const FUSED_QKV: [Proj; 5] = [Proj::Qkv, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    const FUSED_MLP: [Proj; 6] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::GateUp, Proj::Down];
    const FUSED_BOTH: [Proj; 4] = [Proj::Qkv, Proj::O, Proj::GateUp, Proj::Down];

    /// The projections layer `li` has, in checkpoint order.
    pub fn of_layer(cfg: &ModelConfig, li: usize) -> &'static [Proj] {
        if let Some(g) = &cfg.gemma4 {
            return gemma4_layer::projections(g, li);
        }
        match cfg.layer_mixer[li] {
            Mixer::DeltaNet => &Self::DELTA,
            Mixer::Attention => Self::of(cfg),
        }
    }

    /// The projections an attention layer of this model has, in checkpoint
    /// order (every layer's, for families without linear-attention layers).
    pub fn of(cfg: &ModelConfig) -> &'static [Proj] {
        let w = &cfg.family.weights;
        match (w.fused_qkv(), w.fused_gate_up()) {
            (false, false) => &Self::SEPARATE,
            (true, false) => &Self::FUSED_QKV,
            (false, true) => &Self::FUSED_MLP,
            (true, true) => &Self::FUSED_BOTH,
        }
    }

    /// The checkpoint module path within a layer, from the registry (the
    /// registry guarantees a family names each projection it has).
    pub fn path(self, cfg: &ModelConfig) -> &'static str {
        let w = &cfg.family.weights;
        let name = match self {
            Proj::Q => &w.q,
            Proj::K => &w.k,
            Proj::V => &w.v,
            Proj::O => return &w.o,
            Proj::Gate => &w.gate,
            Proj::Up => &w.up,
            Proj::Down => return &w.down,
            Proj::Qkv => &w.qkv,
            Proj::GateUp => &w.gate_up,
            Proj::PleGate | Proj::PleProj | Proj::PleModel => {
                let g = w.gemma4.as_ref().unwrap_or_else(|| panic!("{self:?} is not a projection of {} models", cfg.family.family));
                return match self {
                    Proj::PleGate => &g.input_gate,
                    Proj::PleProj => &g.projection,
                    _ => &g.model_projection,
                };
            }
            Proj::DeltaQkv | Proj::DeltaZ | Proj::DeltaB | Proj::DeltaA | Proj::DeltaOut => {
                let d = w.delta_net.as_ref().unwrap_or_else(|| panic!("{self:?} is not a projection of {} models", cfg.family.family));
                return match self {
                    Proj::DeltaQkv => &d.in_qkv,
                    Proj::DeltaZ => &d.in_z,
                    Proj::DeltaB => &d.in_b,
                    Proj::DeltaA => &d.in_a,
                    _ => &d.out,
                };
            }
        };
        name.as_deref().unwrap_or_else(|| panic!("{self:?} is not a projection of {} models", cfg.family.family))
    }

    /// (in_features, out_features).
    fn model_wide_dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let h = cfg.hidden;
        let qd = cfg.n_heads * cfg.head_dim;
        let kvd = cfg.n_kv_heads * cfg.head_dim;
        // Gated attention's q_proj gives [query | gate] per head.
        let q_out = if cfg.attn_output_gate { 2 * qd } else { qd };
        let delta = || cfg.delta.unwrap_or_else(|| panic!("{self:?}: {} models have no gated delta-net", cfg.family.family));
        match self {
            Proj::Q => (h, q_out),
            Proj::K | Proj::V => (h, kvd),
            Proj::Qkv => (h, qd + 2 * kvd),
            Proj::O => (qd, h),
            Proj::Gate | Proj::Up => (h, cfg.intermediate),
            Proj::GateUp => (h, 2 * cfg.intermediate),
            Proj::Down => (cfg.intermediate, h),
            Proj::DeltaQkv => (h, delta().conv_dim()),
            Proj::DeltaZ => (h, delta().value_width()),
            Proj::DeltaB | Proj::DeltaA => (h, delta().v_heads),
            Proj::DeltaOut => (delta().value_width(), h),
            Proj::PleGate | Proj::PleProj | Proj::PleModel => {
                let g = cfg.gemma4.as_ref().unwrap_or_else(|| panic!("{self:?}: {} models have no per-layer embeddings", cfg.family.family));
                match self {
                    Proj::PleGate => (h, g.ple),
                    Proj::PleProj => (g.ple, h),
                    _ => (h, cfg.n_layers * g.ple),
                }
            }
        }
    }

    /// (in_features, out_features) in layer `li` (Gemma 4's layers differ
    /// in head size, KV heads and MLP width; its PleModel, held by layer 0,
    /// is the whole model's).
    pub fn dims(self, cfg: &ModelConfig, li: usize) -> (usize, usize) {
        let Some(g) = &cfg.gemma4 else { return self.model_wide_dims(cfg) };
        let (h, qd, kvd, inter) = (cfg.hidden, cfg.n_heads * g.head_dim[li], g.kv_heads[li] * g.head_dim[li], g.intermediate[li]);
        match self {
            Proj::Q => (h, qd),
            Proj::K | Proj::V => (h, kvd),
            Proj::O => (qd, h),
            Proj::Gate | Proj::Up => (h, inter),
            Proj::Down => (inter, h),
            p => p.model_wide_dims(cfg),
        }
    }

    pub fn has_bias(self, cfg: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::Qkv => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            Proj::Gate | Proj::Up | Proj::Down | Proj::GateUp => cfg.mlp_bias,
            Proj::DeltaQkv | Proj::DeltaZ | Proj::DeltaB | Proj::DeltaA | Proj::DeltaOut => false,
            Proj::PleGate | Proj::PleProj | Proj::PleModel => false,
        }
    }

    /// The projection's slot among a layer's seven unfused ones (a fused
    /// projection takes its first part's; the delta-net's take slots 9 to
    /// 13): LoRA dropout masks are seeded per (layer, slot).
    pub fn slot(self) -> usize {
        match self {
            Proj::Qkv => Proj::Q as usize,
            Proj::GateUp => Proj::Gate as usize,
            p => p as usize,
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
    /// The norm before the MLP (Llama's post_attention_layernorm).
    pub pre_mlp_norm: B::Weight,
    /// Norms of the attention and MLP outputs (Gemma 2 and 3).
    pub post_attn_norm: Option<B::Weight>,
    pub post_mlp_norm: Option<B::Weight>,
    /// Per-head norms of q and k (Qwen3, Gemma 3).
    pub q_norm: Option<B::Weight>,
    pub k_norm: Option<B::Weight>,
    /// Indexed by `Proj as usize`; None for the projections this family
    /// does not have.
    pub proj: Vec<Option<Linear<B>>>,
    pub window: Option<usize>,
    /// Which of the model's rotary tables this layer uses
    /// (`ModelConfig::ropes`).
    pub rope: usize,
    /// The gated delta-net's frozen parameters, on linear-attention layers
    /// (whose projections are the Delta* ones).
    pub delta: Option<DeltaParams<B>>,
    /// Gemma 4's parts of the layer.
    pub g4: Option<gemma4_layer::Gemma4Layer<B>>,
}

/// A gated delta-net's frozen tensors: conv [channels, 1, kernel], A_log
/// and dt_bias [v_heads], the gated norm's weight [v_dim].
pub struct DeltaParams<B: Backend> {
    pub conv: B::Weight,
    pub a_log: B::Weight,
    pub dt_bias: B::Weight,
    pub norm: B::Weight,
}

impl<B: Backend> Layer<B> {
    pub fn p(&self, p: Proj) -> &Linear<B> {
        self.proj[p as usize].as_ref().unwrap_or_else(|| panic!("layer has no {p:?} projection"))
    }
    pub fn p_mut(&mut self, p: Proj) -> &mut Linear<B> {
        self.proj[p as usize].as_mut().unwrap_or_else(|| panic!("layer has no {p:?} projection"))
    }
    /// The projections this layer has, with their kind.
    pub fn linears(&self) -> impl Iterator<Item = (Proj, &Linear<B>)> {
        Proj::ALL.into_iter().zip(&self.proj).filter_map(|(p, l)| l.as_ref().map(|l| (p, l)))
    }
}

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub embed: B::Weight,
    pub layers: Vec<Layer<B>>,
    pub final_norm: B::Weight,
    /// None when the embeddings are tied.
    pub lm_head: Option<B::Weight>,
    /// Rotary inverse frequencies per table of `cfg.ropes`: the table for
    /// positions up to the rope's original context, and (long-context rope)
    /// the one for longer sequences.
    pub rope_tables: Vec<RopeTable<B>>,
    /// The embedding output's multiplier, rounded to the backend's
    /// activation type (Gemma's sqrt(hidden)); None = 1.
    pub embed_scale: Option<f32>,
    /// Tokens per LM-head + cross-entropy chunk (bounds the logits buffer).
    pub loss_chunk_tokens: usize,
    /// Gemma 4's per-layer embedding table and norm (its projection is
    /// layer 0's `Proj::PleModel`).
    pub ple: Option<gemma4_layer::PleParams<B>>,
}

/// One rotary table on the backend.
pub struct RopeTable<B: Backend> {
    pub short: B::Buf,
    /// (longer-context frequencies, the length past which they apply).
    pub long: Option<(B::Buf, usize)>,
}

impl<B: Backend> RopeTable<B> {
    /// The frequencies for a forward whose largest position is `max_pos`
    /// (transformers picks the long-context set when max_pos + 1 exceeds
    /// the original context).
    pub fn for_max_position(&self, max_pos: usize) -> &B::Buf {
        match &self.long {
            Some((long, original)) if max_pos + 1 > *original => long,
            _ => &self.short,
        }
    }
}

/// Module path of a projection, as PEFT names it (without "base_model.model.").
pub fn module_path(cfg: &ModelConfig, layer: usize, p: Proj) -> String {
    let w = &cfg.family.weights;
    if p == Proj::PleModel {
        return p.path(cfg).to_string();
    }
    let prefix = w.adapter_layer.as_ref().unwrap_or(&w.layer);
    format!("{}.{}", prefix.replace("{i}", &layer.to_string()), p.path(cfg))
}

/// The checkpoint's name for a module PEFT names `module` (they differ
/// only by the layer prefix, for families that declare `adapter_layer`).
pub fn checkpoint_module(cfg: &ModelConfig, module: &str) -> String {
    let w = &cfg.family.weights;
    match &w.adapter_layer {
        // Both prefixes end with "{i}" (checked when the registry loads).
        Some(peft) => match module.strip_prefix(peft.trim_end_matches("{i}")) {
            Some(rest) => format!("{}{rest}", w.layer.trim_end_matches("{i}")),
            None => module.to_string(),
        },
        None => module.to_string(),
    }
}

/// How many projections `targets` adapts in a model of this config, read
/// from the config alone so that a target list matching nothing is refused
/// before any weight or dataset is loaded. The error lists the model's
/// module names plainly.
pub fn count_targets(cfg: &ModelConfig, targets: &crate::adapter::Targets) -> Result<usize> {
    let mut count = 0;
    let mut short: Vec<&str> = Vec::new();
    for li in 0..cfg.n_layers {
        for &p in Proj::of_layer(cfg, li) {
            count += targets.matches(&module_path(cfg, li, p))? as usize;
            let name = p.path(cfg).rsplit('.').next().unwrap_or("");
            if !short.contains(&name) {
                short.push(name);
            }
        }
    }
    if count == 0 {
        anyhow::bail!(
            "lora_target_modules {targets} match no module of this model; its adapted modules are {} (full paths look like {})",
            short.join(", "),
            module_path(cfg, 0, Proj::of(cfg)[0])
        );
    }
    Ok(count)
}

/// How the decoder layers' seven linear projections are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseWeights {
    /// As stored (bf16 / f16 / f32), or NF4 when the checkpoint is a
    /// bitsandbytes 4-bit one.
    AsStored,
    /// Quantized to NF4 at load (QLoRA's load_in_4bit), with or without
    /// double quantization of the block scales. A checkpoint that is
    /// already 4-bit loads as stored.
    Nf4 { double_quant: bool },
}

impl<B: Backend> Model<B> {
    /// Load every weight through the backend, checking names and shapes.
    /// Each tensor's mapped pages are released once converted, so the
    /// process holds one copy (the backend's) of each weight. A bitsandbytes
    /// 4-bit checkpoint (config.json has quantization_config) loads its
    /// quantized projections as NF4 weights.
    pub fn load(be: &B, ckpt: &Checkpoint) -> Result<Model<B>> {
        Self::load_as(be, ckpt, BaseWeights::AsStored)
    }

    /// `load`, holding the projections as `base` says. With
    /// `BaseWeights::Nf4` each projection is converted to f32, quantized and
    /// handed to the backend one tensor at a time, so the host holds at most
    /// one f32 projection besides what is already quantized.
    pub fn load_as(be: &B, ckpt: &Checkpoint, base: BaseWeights) -> Result<Model<B>> {
        Self::build_with(be, ckpt.config.clone(), |name, shape, projection| {
            let w = if !projection {
                be.load_weight(&ckpt.tensor(name, shape)?)?
            } else if ckpt.quantization.is_some() {
                load_prequantized(be, ckpt, name, shape)?
            } else if let BaseWeights::Nf4 { double_quant } = base {
                let src = ckpt.tensor(name, shape)?;
                let f32s = crate::backend::to_f32(src.dtype, src.bytes);
                ckpt.release(name);
                let t = quantize_nf4(&f32s, [shape[0], shape[1]], double_quant);
                drop(f32s);
                be.weight_from_nf4(&t).with_context(|| format!("{}: tensor {name}", ckpt.dir.display()))?
            } else {
                be.load_weight(&ckpt.tensor(name, shape)?)?
            };
            ckpt.release(name);
            Ok(w)
        })
    }

    /// Random weights for a config (benchmarks): linear weights uniform with
    /// std 0.02, norms 1 ± 0.1 uniform. Generated in parallel chunks, each
    /// from its own seed, so an 8B model is ready in seconds and the same
    /// seed gives the same weights on any thread count.
    pub fn random(be: &B, cfg: ModelConfig, seed: u64) -> Result<Model<B>> {
        Self::random_as(be, cfg, seed, BaseWeights::AsStored)
    }

    /// `random`, with the projections quantized to NF4 when `base` says so
    /// (QLoRA benchmarks): the same random values, then quantized.
    pub fn random_as(be: &B, cfg: ModelConfig, seed: u64, base: BaseWeights) -> Result<Model<B>> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let mut tensor = 0u64;
        Self::build_with(be, cfg, |name, shape, projection| {
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
            match base {
                BaseWeights::Nf4 { double_quant } if projection => {
                    be.weight_from_nf4(&quantize_nf4(&data, [shape[0], shape[1]], double_quant))
                }
                _ => Ok(be.weight_from_f32(&data)),
            }
        })
    }

    /// Assemble the model, asking `get(name, shape)` for every tensor in
    /// checkpoint order.
    pub fn build(
        be: &B,
        cfg: ModelConfig,
        mut get: impl FnMut(&str, &[usize]) -> Result<B::Weight>,
    ) -> Result<Model<B>> {
        Self::build_with(be, cfg, |name, shape, _| get(name, shape))
    }

    /// `build`, telling `get(name, shape, projection)` whether the tensor is
    /// the weight of one of a decoder layer's projections (the tensors
    /// QLoRA holds in NF4).
    pub fn build_with(
        be: &B,
        cfg: ModelConfig,
        mut get: impl FnMut(&str, &[usize], bool) -> Result<B::Weight>,
    ) -> Result<Model<B>> {
        be.check_model(&cfg)?;
        let mut tensors = tensor_list(&cfg).into_iter();
        let mut next = |what: Tensor| -> Result<B::Weight> {
            let (name, shape, kind) = tensors.next().expect("tensor_list lists every tensor the model takes");
            debug_assert_eq!(kind, what, "{name}");
            get(&name, &shape, kind == Tensor::Projection)
        };
        let embed = next(Tensor::Other)?;
        // Gemma 4's whole-model PLE tensors follow the embedding.
        let (ple, mut ple_model) = match &cfg.gemma4 {
            Some(g) if g.ple > 0 => {
                let table = next(Tensor::Other)?;
                let (in_f, out_f) = Proj::PleModel.dims(&cfg, 0);
                let model_proj = Linear { weight: next(Tensor::Projection)?, bias: None, in_f, out_f, lora: None };
                let norm = next(Tensor::Other)?;
                let scale = be.download(&be.upload_activation(&[(g.ple as f32).sqrt()]))[0];
                (Some(gemma4_layer::PleParams { table, norm, scale }), Some(model_proj))
            }
            _ => (None, None),
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        let w = &cfg.family.weights;
        for i in 0..cfg.n_layers {
            let input_norm = next(Tensor::Other)?;
            let attention = cfg.layer_mixer[i] == Mixer::Attention;
            let shares_kv = cfg.gemma4.as_ref().is_some_and(|g| g.kv_source[i].is_some());
            let q_norm = if w.qk_norm() && attention { Some(next(Tensor::Other)?) } else { None };
            let k_norm = if w.qk_norm() && attention && !shares_kv { Some(next(Tensor::Other)?) } else { None };
            let delta = if attention {
                None
            } else {
                Some(DeltaParams { conv: next(Tensor::Other)?, a_log: next(Tensor::Other)?, dt_bias: next(Tensor::Other)?, norm: next(Tensor::Other)? })
            };
            let mut proj: Vec<Option<Linear<B>>> = (0..Proj::ALL.len()).map(|_| None).collect();
            for &p in Proj::of_layer(&cfg, i) {
                if p == Proj::PleModel {
                    proj[p as usize] = ple_model.take();
                    continue;
                }
                let (in_f, out_f) = p.dims(&cfg, i);
                let weight = next(Tensor::Projection)?;
                let bias = if p.has_bias(&cfg) { Some(next(Tensor::Other)?) } else { None };
                proj[p as usize] = Some(Linear { weight, bias, in_f, out_f, lora: None });
            }
            let post_attn_norm = if w.sandwich_norms() { Some(next(Tensor::Other)?) } else { None };
            let pre_mlp_norm = next(Tensor::Other)?;
            let post_mlp_norm = if w.sandwich_norms() { Some(next(Tensor::Other)?) } else { None };
            let g4 = match &cfg.gemma4 {
                Some(g) => Some(gemma4_layer::Gemma4Layer::build(be, g, i, &mut next)?),
                None => None,
            };
            layers.push(Layer {
                input_norm,
                pre_mlp_norm,
                post_attn_norm,
                post_mlp_norm,
                q_norm,
                k_norm,
                proj,
                window: cfg.layer_window[i],
                rope: cfg.layer_rope[i],
                delta,
                g4,
            });
        }
        let final_norm = next(Tensor::Other)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(next(Tensor::Other)?) };
        let rope_tables = cfg
            .ropes
            .iter()
            .enumerate()
            .map(|(t, r)| {
                // Gemma 4's tables each span their layer type's head.
                let rot_dim = cfg.gemma4.as_ref().map_or(cfg.rot_dim, |g| g.rope_dims[t]);
                RopeTable {
                    short: be.upload(&r.inv_freq(rot_dim, false)),
                    long: r.long_context().map(|original| (be.upload(&r.inv_freq(rot_dim, true)), original)),
                }
            })
            .collect();
        // Rounded as the backend stores activations: transformers builds the
        // normalizer in the activations' dtype.
        let embed_scale = cfg.embed_scale.map(|s| be.download(&be.upload_activation(&[s]))[0]);
        Ok(Model { cfg, embed, layers, final_norm, lm_head, rope_tables, embed_scale, loss_chunk_tokens: 1024, ple })
    }

    pub fn head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Attach fresh LoRA adapters (PEFT init) to every targeted projection.
    /// Returns the number of adapted modules.
    pub fn attach_lora(&mut self, be: &B, lc: &LoraConfig, rng: &mut Rng) -> Result<usize> {
        let mut count = 0;
        for li in 0..self.layers.len() {
            for &p in Proj::of_layer(&self.cfg, li) {
                let path = module_path(&self.cfg, li, p);
                if !lc.targets.matches(&path)? {
                    continue;
                }
                let (r, scale) = lc.rank_and_scale(&path)?;
                let lin = self.layers[li].p_mut(p);
                lin.lora = Some(Lora::init(be, r, lin.in_f, lin.out_f, scale, lc.dropout, rng));
                count += 1;
            }
        }
        if count == 0 {
            count_targets(&self.cfg, &lc.targets)?;
        }
        Ok(count)
    }

    /// Every LoRA adapter with its (layer, projection).
    pub fn loras(&self) -> impl Iterator<Item = (usize, Proj, &Lora<B>)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(li, l)| l.linears().filter_map(move |(p, lin)| lin.lora.as_ref().map(|a| (li, p, a))))
    }

    pub fn loras_mut(&mut self) -> impl Iterator<Item = (usize, Proj, &mut Lora<B>)> {
        self.layers.iter_mut().enumerate().flat_map(|(li, l)| {
            l.proj
                .iter_mut()
                .zip(Proj::ALL)
                .filter_map(move |(lin, p)| lin.as_mut().and_then(|lin| lin.lora.as_mut()).map(|a| (li, p, a)))
        })
    }

    pub fn zero_grad(&mut self, be: &B) {
        for (_, _, l) in self.loras_mut() {
            l.zero_grad(be);
        }
    }
}
