//! Training: the optimiser over the LoRA parameters (the loop, schedules and
//! checkpoints build on it).
pub mod memory;
pub mod optimizer;
