//! Training, in the order a run uses it: `objectives` (what a run
//! optimises, one file per objective: SFT, DPO/IPO, ORPO, SimPO, KTO, reward
//! model; a new one is a file there plus its name in the `objectives!`
//! line), `examples` (what it trains on), `plan` (which examples make each
//! micro-batch and step), `schedule` (the learning rate), `optimizer` (AdamW
//! over the LoRA parameters and an objective's extra tensors), `trainer`
//! (the loop), `progress` (bar and metrics.jsonl), `curves` (metrics.jsonl
//! drawn as training_curves.png), `saves` (checkpoint-N: save, prune,
//! resume), `preflight` (config-only checks before anything loads) and
//! `memory` (the device memory plan, traced from the graph's own pass).
//! `run_dir` (output_dir's lock and an earlier run's files) and `interrupt`
//! (Ctrl-C) keep runs apart and stop them cleanly; `fingerprint` refuses a
//! resume whose settings changed, `diverged` is the error of a loss gone
//! NaN, `collapse` the preference runs' drift warning.
pub mod collapse;
pub mod curves;
pub mod diverged;
pub mod examples;
pub mod fingerprint;
pub mod interrupt;
pub mod memory;
pub mod objectives;
pub mod optimizer;
pub mod plan;
pub mod preflight;
pub mod progress;
pub mod rewards;
pub mod run_dir;
pub mod saves;
pub mod schedule;
pub mod trainer;
