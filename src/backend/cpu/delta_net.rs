//! Gated delta-net (Qwen3.5's linear attention): the CPU reference.
