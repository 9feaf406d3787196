//! GGUF export for llama.cpp, Ollama and LM Studio, written natively: the
//! file llama.cpp's convert_hf_to_gguf.py writes for the same HF folder,
//! then, for the k-quant outtypes, the file llama-quantize writes from it.
//!
//! Files, in the order the data flows:
//! - `types`: ggml tensor types and metadata values;
//! - `vocab`, `spm`: the tokenizer as tokenizer.ggml.* keys;
//! - `quants`: the block quantizers, bit-exact with ggml's reference ones;
//! - `rules`: llama-quantize's per-tensor type choice for each file type;
//! - `modelfile`: the Ollama Modelfile written beside the file.
pub mod modelfile;
pub mod quants;
pub mod rules;
pub mod special;
pub mod spm;
pub mod types;
pub mod vocab;
