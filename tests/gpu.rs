//! The GPU checks: the CUDA backend against the CPU reference. They need a
//! GPU, so they are ignored in a plain `cargo test` (CI has none) and run
//! with `--ignored` by the GPU check (scripts/gpu_check.sh), which prints
//! every figure. Tolerances are those of `Tolerances::bf16()` (see
//! src/backend/conformance.rs for why), and for the whole model:
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

use common::{CASES, GPU_CURVE_TOL, GPU_GRAD_TOL, GPU_LOSS_TOL, Reference, load_with_adapter, loss_and_grads, rel_err};
use ferrotune::backend::conformance::{Harness, Scale, Tolerances};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::backend::cuda::CudaBackend;
use ferrotune::model::batch::Batch;
use ferrotune::train::optimizer::{AdamWConfig, Optimizer};

fn gpu() -> CudaBackend {
    let be = CudaBackend::new(0).unwrap_or_else(|e| panic!("GPU test without a usable GPU: {e:#}"));
    eprintln!("GPU: {}; {} kernels", be.info, be.kernel_count());
    be
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn every_kernel_matches_the_cpu_reference() {
    let cuda = gpu();
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, &cuda, Tolerances::bf16(), 7);
    let checks = h.run(Scale::Realistic).to_vec();
    let mut failed = 0;
    for c in &checks {
        eprintln!("{c}");
        failed += !c.passed() as usize;
    }
    assert_eq!(failed, 0, "{failed} of {} kernel checks failed", checks.len());
}



#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn model_loss_and_lora_gradients_match_the_cpu_on_every_fixture() {
    let cuda = gpu();
    let cpu = CpuBackend::new();
    let mut worst = Vec::new();
    for case in CASES {
        let (seqs, _) = Reference::load(case).sequences();
        let mut m_cpu = load_with_adapter(&cpu, case);
        let mut m_gpu = load_with_adapter(&cuda, case);
        let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
        let (l_cpu, g_cpu) = loss_and_grads(&cpu, &mut m_cpu, &batch);
        let (l_gpu, g_gpu) = loss_and_grads(&cuda, &mut m_gpu, &batch);
        let loss_rel = (l_gpu - l_cpu).abs() / l_cpu;
        let grad_rel = rel_err(&g_gpu, &g_cpu);
        eprintln!("{case}: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {loss_rel:.2e}); LoRA gradients rel {grad_rel:.2e}");
        worst.push((case, loss_rel, grad_rel));
    }
    for (case, loss_rel, grad_rel) in worst {
        assert!(loss_rel <= GPU_LOSS_TOL, "{case}: loss rel error {loss_rel:e} > {GPU_LOSS_TOL:e}");
        assert!(grad_rel <= GPU_GRAD_TOL, "{case}: LoRA gradient rel error {grad_rel:e} > {GPU_GRAD_TOL:e}");
    }
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn fifty_adamw_steps_follow_the_cpu_loss_curve() {
    let cuda = gpu();
    let cpu = CpuBackend::new();
    let case = "llama3";
    let (seqs, _) = Reference::load(case).sequences();
    let mut m_cpu = load_with_adapter(&cpu, case);
    let mut m_gpu = load_with_adapter(&cuda, case);
    let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
    let mut o_cpu = Optimizer::new(&cpu, &m_cpu, AdamWConfig::default());
    let mut o_gpu = Optimizer::new(&cuda, &m_gpu, AdamWConfig::default());
    let mut worst: f64 = 0.0;
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..50 {
        let (l_cpu, _) = loss_and_grads(&cpu, &mut m_cpu, &batch);
        let (l_gpu, _) = loss_and_grads(&cuda, &mut m_gpu, &batch);
        o_cpu.step(&cpu, &mut m_cpu, 1e-3);
        o_gpu.step(&cuda, &mut m_gpu, 1e-3);
        let rel = (l_gpu - l_cpu).abs() / l_cpu;
        worst = worst.max(rel);
        if step % 10 == 0 || step == 49 {
            eprintln!("step {step:>2}: loss cpu {l_cpu:.5} gpu {l_gpu:.5} (rel {rel:.2e})");
        }
        if step == 0 {
            first = l_cpu;
        }
        last = l_cpu;
    }
    assert!(last < first, "the CPU run itself did not learn ({first} -> {last})");
    assert!(worst <= GPU_CURVE_TOL, "loss curves diverge: worst step rel error {worst:e} > {GPU_CURVE_TOL:e}");
}

#[path = "common/generation.rs"]
mod generation;

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn decode_attention_matches_the_cpu_reference() {
    // cuda/decode_attn.cu against the CPU reference over head dims (the
    // tensor-core sizes, odd and largest), GQA ratios, windows shorter and
    // longer than the cache, an empty and a long cache, 1 and many new
    // tokens. Tolerance: Tolerances::bf16().attention (8e-3): the kernel
    // rounds only its output to bf16 (2^-9 relative), from identical bf16
    // inputs, so the error is that one rounding plus f32 summation order.
    let cuda = gpu();
    let cpu = CpuBackend::new();
    let mut h = Harness::new(&cpu, &cuda, Tolerances::bf16(), 11);
    for (d, heads, kv, window) in
        [(64, 8, 8, None), (128, 32, 8, None), (128, 28, 4, Some(4096)), (96, 6, 2, Some(17)), (256, 8, 1, Some(1)), (8, 4, 2, None)]
    {
        for (past, new) in [(0, 1), (0, 37), (1, 1), (300, 5), (4095, 1), (2000, 64)] {
            h.decode_attention(past, new, heads, kv, d, window);
        }
    }
    let mut failed = 0;
    for c in &h.checks {
        eprintln!("{c}");
        failed += !c.passed() as usize;
    }
    assert_eq!(failed, 0, "{failed} of {} decode_attention checks failed", h.checks.len());
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn cached_generation_logits_match_the_cpu_on_every_fixture() {
    // Prefill + 19 cached steps on the GPU, fed the CPU's greedy tokens,
    // against the CPU's cached logits (which tests/generate.rs holds to the
    // full recomputation). Bound: GPU_LOGITS_TOL (see its comment).
    let cuda = gpu();
    let mut worst = Vec::new();
    for case in CASES {
        let err = generation::teacher_forced_logits_rel_err(&cuda, case);
        eprintln!("{case}: cached logits rel error {err:.2e} (bound {:.0e})", generation::GPU_LOGITS_TOL);
        worst.push((case, err));
    }
    for (case, err) in worst {
        assert!(err <= generation::GPU_LOGITS_TOL, "{case}: cached logits rel error {err:e} > {:e}", generation::GPU_LOGITS_TOL);
    }
}

/// Bytes a dequantization of `t` moves: its 4-bit codes and scales in,
/// numel bf16 values out.
fn nf4_traffic(t: &ferrotune::quant::nf4::Nf4Tensor) -> usize {
    ferrotune::backend::nf4_device_bytes(t) + 2 * t.numel()
}

#[test]
#[ignore = "needs a GPU: run by scripts/gpu_check.sh"]
fn nf4_dequantize_is_bit_exact_against_the_cpu_and_its_throughput_is_printed() {
    // cuda/nf4.cu against bf16(CPU dequantize): every value bit for bit
    // (both compute code·absmax, and nested_map·nested_absmax + offset, as
    // single-rounded f32 operations). Shapes: a partial last block and an
    // odd element count (the tail path), and Llama-3-8B's projections.
    use ferrotune::backend::Backend;
    use ferrotune::backend::conformance::random_nf4;
    use ferrotune::util::rng::Rng;
    let cuda = gpu();
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(5);
    for nested in [false, true] {
        for shape in [[1usize, 7], [3, 45], [17, 64 * 5 + 32], [1024, 4096], [14336, 4096]] {
            let t = random_nf4(&mut rng, shape, nested);
            let want: Vec<u32> = cpu
                .weight_to_f32(&cpu.weight_from_nf4(&t).unwrap())
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32().to_bits())
                .collect();
            let got: Vec<u32> = cuda.weight_to_f32(&cuda.weight_from_nf4(&t).unwrap()).iter().map(|x| x.to_bits()).collect();
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            eprintln!("nf4 dequantize {shape:?} nested={nested}: {diff} of {} values differ", want.len());
            assert_eq!(diff, 0, "{shape:?} nested={nested}: the GPU dequantization is not bit-exact");
        }
    }
    // Throughput on the largest Llama-3-8B projection (gate/up/down: 14336 x 4096).
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
    // The QLoRA fixture (4-bit base + adapter) on the GPU against the CPU:
    // the GPU's dequantized weights are the CPU's rounded to bf16 (checked
    // bit for bit above), so the model-level bounds are the bf16 ones.
    use ferrotune::adapter::peft;
    use ferrotune::model::Model;
    use ferrotune::model::checkpoint::Checkpoint;
    let cuda = gpu();
    let cpu = CpuBackend::new();
    let ckpt = Checkpoint::open(&common::fixture("qlora").join("bnb_model")).unwrap();
    let adapter = common::fixture("qlora").join("adapter");
    let mut m_cpu = Model::load(&cpu, &ckpt).unwrap();
    peft::load(&cpu, &mut m_cpu, &adapter).unwrap();
    let mut m_gpu = Model::load(&cuda, &ckpt).unwrap();
    peft::load(&cuda, &mut m_gpu, &adapter).unwrap();
    let (seqs, _) = Reference::load("qlora").sequences();
    let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
    let (l_cpu, g_cpu) = loss_and_grads(&cpu, &mut m_cpu, &batch);
    let (l_gpu, g_gpu) = loss_and_grads(&cuda, &mut m_gpu, &batch);
    let loss_rel = (l_gpu - l_cpu).abs() / l_cpu;
    let grad_rel = rel_err(&g_gpu, &g_cpu);
    eprintln!("qlora: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {loss_rel:.2e}); LoRA gradients rel {grad_rel:.2e}");
    assert!(loss_rel <= GPU_LOSS_TOL, "loss rel error {loss_rel:e} > {GPU_LOSS_TOL:e}");
    assert!(grad_rel <= GPU_GRAD_TOL, "LoRA gradient rel error {grad_rel:e} > {GPU_GRAD_TOL:e}");
}
