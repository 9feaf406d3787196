//! Backends and harnesses that only tests use, kept out of the ferrotune
//! library (a release build never compiles them):
//! - [`conformance`]: every op of a candidate backend against the CPU
//!   reference, with stated tolerances;
//! - [`bf16sim`]: a wrapper that gives any backend the CUDA backend's bf16
//!   storage rounding;
//! - [`gguf_read`]: a GGUF file summarised as the GGUF fixtures record
//!   llama.cpp's files, and the first differences between two;
//! - [`metered`]: a wrapper that counts the bytes every buffer and weight
//!   holds;
//! - [`gguf_weights`]: the generated weights of the GGUF export fixtures.
//!
//! Their tests live in the root package (tests/testkit.rs), so `cargo test`
//! at the repository root runs them. A new test-only backend or harness is a
//! new module here.

pub mod bf16sim;
pub mod conformance;
pub mod gguf_read;
pub mod gguf_weights;
pub mod metered;
