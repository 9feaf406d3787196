//! ferrotune: single-GPU LoRA / QLoRA fine-tuning with hand-written kernels.
//!
//! The data flows through the modules in this order: `registry` (is the
//! architecture supported?) -> `hub` (models and datasets named by a Hub
//! id, into the shared Hugging Face cache) -> `model` (checkpoint, layers, forward and
//! backward) with `adapter` (LoRA, PEFT files) -> `data` (datasets into
//! batches) -> `backend` (the ops, CPU reference and CUDA) -> `cli`.
pub mod adapter;
pub mod backend;
pub mod cli;
pub mod config;
pub mod data;
pub mod export;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod registry;
pub mod train;
pub mod util;
