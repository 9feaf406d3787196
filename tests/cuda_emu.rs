//! The CUDA backend on the SIMT emulator (cuda/emu/README.md): the real
//! `CudaBackend` (cudarc, every launch, every kernel of cuda/ compiled for the
//! host, cuBLAS calls) against the CPU reference, with no GPU. The checks
//! and tolerances are tests/gpu.rs's (shared in common/gpu_checks.rs), at
//! sizes an emulator runs in seconds; tests/gpu.rs runs them at realistic
//! sizes on a real GPU.
//!
//! What this proves: argument order and types, grids, shared-memory sizes
//! and attributes, buffer offsets and strides, the cuBLAS transposes and
//! leading dimensions, and the kernels' arithmetic and warp-level logic
//! (mma / ldmatrix fragments from the PTX ISA tables, barriers, shuffles).
//! What it cannot: the GPU's memory model and timing, the real cuBLAS, the
//! driver's JIT of the PTX, and speed. Those stay with tests/gpu.rs.

mod common;
#[path = "common/cuda_emu.rs"]
mod cuda_emu;
#[path = "common/generation.rs"]
mod generation;
#[path = "common/gpu_checks.rs"]
mod gpu_checks;

use ferrotune::backend::conformance::Scale;
use ferrotune::backend::cuda::CudaBackend;

fn emulated_gpu() -> CudaBackend {
    cuda_emu::load().unwrap_or_else(|e| panic!("cannot build the SIMT emulator: {e}"));
    let be = CudaBackend::new(0).unwrap_or_else(|e| panic!("CudaBackend on the SIMT emulator: {e:#}"));
    assert!(be.info.name.contains("SIMT emulator"), "bound to a real driver ({}), not the emulator", be.info.name);
    be
}

#[test]
fn every_kernel_matches_the_cpu_reference() {
    gpu_checks::every_kernel(&emulated_gpu(), Scale::Small);
}

#[test]
fn flash_attention_over_several_tiles_matches_the_cpu() {
    // Sequences longer than one 64-row tile, one exactly a tile, and length 1.
    gpu_checks::attention_tiles(&emulated_gpu(), &[150, 1, 64, 70]);
}

#[test]
fn model_loss_and_lora_gradients_match_the_cpu_on_every_fixture() {
    gpu_checks::model_parity(&emulated_gpu());
}

#[test]
fn adamw_steps_follow_the_cpu_loss_curve() {
    gpu_checks::adamw_curve(&emulated_gpu(), 5);
}

#[test]
fn decode_attention_matches_the_cpu_reference() {
    gpu_checks::decode_attention(&emulated_gpu(), &[(0, 1), (0, 9), (1, 1), (70, 3)]);
}

#[test]
fn cached_generation_logits_match_the_cpu_on_every_fixture() {
    gpu_checks::cached_generation(&emulated_gpu());
}

#[test]
fn nf4_dequantize_is_bit_exact_against_the_cpu() {
    gpu_checks::nf4_bit_exact(&emulated_gpu(), &[[1, 7], [3, 45], [17, 64 * 5 + 32], [64, 256]]);
}

#[test]
fn qlora_loss_and_lora_gradients_match_the_cpu() {
    gpu_checks::qlora_parity(&emulated_gpu());
}
