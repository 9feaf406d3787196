//! Export formats: what a trained model is written as besides the PEFT
//! adapter and the merged HF checkpoint (`adapter::merge`). One module per
//! format; a new format is a module here plus its subcommand in
//! `cli/export.rs`.
pub mod gguf;
