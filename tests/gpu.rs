//! The GPU checks: the CUDA backend against the CPU reference. They need a
//! GPU, so they are ignored in a plain `cargo test` (CI has none) and run
//! with `--ignored` by the GPU check (scripts/gpu_check.sh), which prints
//! every figure. Tolerances are those of `Tolerances::bf16()` (see
//! testkit/src/conformance.rs for why), and for the whole model:
//! - loss within 0.5% relative: bf16 storage of the residual stream and every
//!   activation (2^-9 relative per rounding, ~20 roundings along a 2-layer
//!   path, partly cancelling);
//! - LoRA gradients within 5% norm-relative: the backward adds as many
//!   roundings again, and the gradients are products of both passes;
//! - the 50-step loss curves within 2% at every step.
//!
//! A CPU simulation of the same bf16 storage (tests/bf16_tolerances.rs)
//! stays 3x or more inside each of these.

mod common;
#[path = "common/generation.rs"]
mod generation;
#[path = "common/gpu_checks.rs"]
mod gpu_checks;
#[path = "common/sample_checks.rs"]
mod sample_checks;

use ferrotune_testkit::conformance::Scale;
use ferrotune::backend::cuda::CudaBackend;

fn gpu() -> CudaBackend {
    let be = CudaBackend::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e:#}"));
    eprintln!("GPU: {}; {} kernels", be.info, be.kernel_count());
    be
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn every_kernel_matches_the_cpu_reference() {
    gpu_checks::every_kernel(&gpu(), Scale::Realistic);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn flash_attention_over_many_tiles_matches_the_cpu() {
    // Long sequences (many 64-row tiles, windows inside and across tiles).
    gpu_checks::attention_tiles(&gpu(), &[4096, 1, 64, 700, 2047]);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn attention_at_head_dim_512_matches_the_cpu_reference() {
    // Gemma 4's full-attention head size over several sequences and long
    // caches.
    use ferrotune_testkit::conformance::DecodeBatch;
    let batch = DecodeBatch { positions: &[0, 2047, 700, 31], capacity: 2048 };
    gpu_checks::wide_head_attention(&gpu(), &[1024, 1, 300], &[(0, 1), (2047, 1), (500, 16)], batch);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn lora_products_with_and_without_fused_dropout_match_the_cpu() {
    // Llama-3-8B's q and down projections at rank 16 and 64, 2048 tokens.
    gpu_checks::lora_shapes(&gpu(), &[(2048, 4096, 4096, 16), (2048, 14336, 4096, 64), (513, 40, 33, 40)]);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn model_loss_and_lora_gradients_match_the_cpu_on_every_fixture() {
    gpu_checks::model_parity(&gpu());
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn fifty_adamw_steps_follow_the_cpu_loss_curve() {
    gpu_checks::adamw_curve(&gpu(), 50);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn sample_rows_chooses_the_cpu_references_tokens() {
    // Up to the largest vocabularies (Qwen's 151936, Gemma's 262144).
    sample_checks::sample_rows_match_cpu(&gpu(), &[7, 32768, 151936, 262144]);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn decode_attention_matches_the_cpu_reference() {
    // An empty and a long cache, 1 and many new tokens.
    gpu_checks::decode_attention(&gpu(), &[(0, 1), (0, 37), (1, 1), (300, 5), (4095, 1), (2000, 64)]);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn batched_decoding_matches_the_cpu_reference() {
    use ferrotune_testkit::conformance::DecodeBatch;
    // A GRPO-sized batch over long regions (first and last rows among the
    // positions), and a batch of one-row regions.
    let positions = [0, 4095, 2000, 300, 1, 17, 4094, 1024];
    let batches = [DecodeBatch { positions: &positions, capacity: 4096 }, DecodeBatch { positions: &[0; 16], capacity: 1 }];
    gpu_checks::decode_attention_batch(&gpu(), &batches);
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn batched_decoding_makes_a_bad_position_loud() {
    gpu_checks::decode_batch_bad_positions(&gpu());
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn cached_generation_logits_match_the_cpu_on_every_fixture() {
    gpu_checks::cached_generation(&gpu());
}

/// Bytes a dequantization of `t` moves: its 4-bit codes and scales in,
/// numel bf16 values out.
fn nf4_traffic(t: &ferrotune::quant::nf4::Nf4Tensor) -> usize {
    ferrotune::backend::nf4_device_bytes(t) + 2 * t.numel()
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn nf4_dequantize_is_bit_exact_against_the_cpu_and_its_throughput_is_printed() {
    use ferrotune::backend::Backend;
    use ferrotune_testkit::conformance::random_nf4;
    use ferrotune::util::rng::Rng;
    let cuda = gpu();
    // A partial last block and an odd element count (the tail path), and
    // Llama-3-8B's projections.
    gpu_checks::nf4_bit_exact(&cuda, &[[1, 7], [3, 45], [17, 64 * 5 + 32], [1024, 4096], [14336, 4096]]);
    // Throughput on the largest Llama-3-8B projection (gate/up/down: 14336 x 4096).
    let mut rng = Rng::new(6);
    let hbm_tb_s = ferrotune::backend::cuda::device::hbm_bandwidth_tb_s(&cuda.info.name);
    for nested in [false, true] {
        let t = random_nf4(&mut rng, [14336, 4096], nested);
        let w = cuda.weight_from_nf4(&t).unwrap();
        for _ in 0..3 {
            cuda.nf4_dequantize(&w);
        }
        cuda.synchronize();
        let iters = 50;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            cuda.nf4_dequantize(&w);
        }
        cuda.synchronize();
        let s = t0.elapsed().as_secs_f64() / iters as f64;
        let gb_s = nf4_traffic(&t) as f64 / s / 1e9;
        let share = hbm_tb_s.map(|p| format!("{:.0}% of {p} TB/s HBM", 100.0 * gb_s / (p * 1e3))).unwrap_or_else(|| "HBM bandwidth unknown".into());
        eprintln!(
            "nf4 dequantize 14336x4096 nested={nested}: {:.1} us, {gb_s:.0} GB/s ({share}; bytes = codes + scales in, bf16 out)",
            s * 1e6
        );
    }
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn qlora_loss_and_lora_gradients_match_the_cpu() {
    gpu_checks::qlora_parity(&gpu());
}
