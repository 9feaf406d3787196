//! Why an accepted Axolotl key has no effect in ferrotune: one sentence per
//! reason, shared by the key tables of `keys` and `keys_extra`. A new
//! reason is added here; each says what ferrotune does instead.

pub(super) const PRECISION: &str = "precision is fixed: bf16 weights and activations with f32 accumulation and f32 LoRA weights on CUDA, f32 on the CPU";
pub(super) const KERNELS: &str = "ferrotune always runs its own fused kernels (flash attention, RMSNorm, RoPE, SwiGLU, LoRA, cross-entropy)";
pub(super) const TRACKING: &str = "ferrotune has no experiment-tracker integration; the loss is printed as training runs";
pub(super) const HUB: &str = "ferrotune has no network code: nothing is downloaded or uploaded";
pub(super) const ONE_GPU: &str = "ferrotune trains on one GPU; there is nothing to distribute";
pub(super) const IN_PROCESS: &str = "datasets are prepared in-process, in parallel on all cores";
pub(super) const FROM_CHECKPOINT: &str = "the architecture and tokenizer are read from the checkpoint's config.json and tokenizer files";
pub(super) const MEMORY: &str = "ferrotune plans GPU memory itself and refuses, before the first step, a run that will not fit";
pub(super) const PACKING: &str = "sample packing is computed exactly from the tokenized rows";
pub(super) const RL_ONLY: &str = "only used by rl options ferrotune does not implement";
pub(super) const EVAL_EXTRAS: &str = "evaluation reports the loss only";
pub(super) const MOE: &str = "only applies to mixture-of-experts models, which ferrotune does not load (llama, mistral and qwen2 are dense)";
pub(super) const MULTIMODAL: &str = "ferrotune trains text-only models; there is no image or audio processor to configure";
pub(super) const SET_BY_AXOLOTL: &str = "Axolotl fills this in itself while it runs; it is not a setting";
pub(super) const CHECKPOINTING: &str = "gradient checkpointing keeps each layer's input and recomputes the rest (no per-op variants); the memory plan says before the first step whether the run fits";
pub(super) const SAMPLES: &str = "sample generation during training is not implemented; try the adapter with `ferrotune generate` afterwards";
pub(super) const NO_TORCH: &str = "there is no torch runtime to configure";
pub(super) const GRPO: &str = "only used with vLLM or NeMo Gym: GRPO samples in the same process, with the weights it trains";
