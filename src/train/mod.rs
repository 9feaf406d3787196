//! Training, in the order a run uses it: `plan` (which examples make each
//! micro-batch and step), `schedule` (the learning rate), `optimizer`
//! (AdamW over the LoRA parameters), `trainer` (the loop), `progress`
//! (bar and metrics.jsonl), `checkpoint` (save and resume), `preflight`
//! (config-only checks before anything loads) and `memory` (the GPU memory
//! plan checked before the first step); `objectives` holds
//! the preference losses on per-sequence log-probabilities.
pub mod checkpoint;
pub mod memory;
pub mod objectives;
pub mod optimizer;
pub mod plan;
pub mod preference;
pub mod preflight;
pub mod progress;
pub mod reward;
pub mod schedule;
pub mod trainer;
