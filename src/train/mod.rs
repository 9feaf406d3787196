//! Training, in the order a run uses it: `plan` (which examples make each
//! micro-batch and step), `schedule` (the learning rate), `optimizer`
//! (AdamW over the LoRA parameters), `trainer` (the loop), `progress`
//! (bar and metrics.jsonl), `curves` (metrics.jsonl drawn as
//! training_curves.png), `checkpoint` (save and resume), and `memory`
//! (the GPU memory plan checked before the first step); `objectives` holds
//! the preference losses on per-sequence log-probabilities.
pub mod checkpoint;
pub mod curves;
pub mod memory;
pub mod objectives;
pub mod optimizer;
pub mod plan;
pub mod preference;
pub mod progress;
pub mod reward;
pub mod schedule;
pub mod trainer;
