//! Are the GPU tests' tolerances achievable by a correct bf16 backend? The
//! CPU reference against `Bf16Sim<CpuBackend>` (the CPU with the CUDA
//! backend's bf16 storage and bf16 product operands simulated, see
//! testkit/src/bf16sim.rs), under exactly the tolerances tests/gpu.rs
//! asserts: `Tolerances::bf16()` op by op, and for the whole model loss 5e-3
//! relative, LoRA gradients 5e-2 norm-relative, 50-step AdamW loss curve 2e-2
//! per step. Every measured error is printed with its margin (tolerance /
//! error); run with `--nocapture` to see them.
//!
//! A failure here means a tolerance is too tight for bf16 storage itself (a
//! correct GPU backend would fail its test), or the simulation is wrong —
//! never loosen a tolerance here to make it pass.

mod common;

use common::{CASES, Reference, load_with_adapter, loss_and_grads, rel_err};
use ferrotune::backend::Backend;
use ferrotune_testkit::bf16sim::Bf16Sim;
use ferrotune_testkit::conformance::{Check, Harness, Scale, Tolerances};
use ferrotune::backend::cpu::CpuBackend;
use ferrotune::model::batch::Batch;
use ferrotune::train::optimizer::{AdamWConfig, Optimizer};
use std::time::Instant;

/// The GPU tests' model-level tolerances (tests/gpu.rs).
const LOSS_TOL: f64 = common::GPU_LOSS_TOL;
const GRAD_TOL: f64 = common::GPU_GRAD_TOL;
const CURVE_TOL: f64 = common::GPU_CURVE_TOL;

fn margin(err: f64, tol: f64) -> String {
    if err == 0.0 { "exact".into() } else { format!("{:.0}x", tol / err) }
}

fn conformance(candidate: &Bf16Sim<CpuBackend>, scale: Scale, seed: u64) -> Vec<Check> {
    let cpu = CpuBackend::new();
    let t0 = Instant::now();
    let mut h = Harness::new(&cpu, candidate, Tolerances::bf16(), seed);
    let checks = h.run(scale).to_vec();
    eprintln!("{} ({scale:?}, seed {seed}): {} checks in {:.1?}", candidate.name(), checks.len(), t0.elapsed());
    for c in &checks {
        eprintln!("{c}  margin {}", margin(c.rel_err, c.tolerance));
    }
    checks
}

fn assert_all_pass(checks: &[Check]) {
    let failed: Vec<String> = checks.iter().filter(|c| !c.passed()).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "{} of {} checks exceed Tolerances::bf16():\n{}", failed.len(), checks.len(), failed.join("\n"));
    // The simulation must actually round: a once-rounded product differs.
    let linear = checks.iter().find(|c| c.op.starts_with("linear ")).expect("a linear check");
    assert!(linear.rel_err > 0.0, "Bf16Sim did not round anything: {linear}");
}

#[test]
fn bf16_storage_meets_the_kernel_tolerances() {
    assert_all_pass(&conformance(&Bf16Sim::new(CpuBackend::new()), Scale::Small, 7));
}

#[test]
fn bf16_storage_with_flash_attention_roundings_meets_the_kernel_tolerances() {
    // Also P and dS rounded inside attention (head_dim 64 / 128), as the
    // tensor-core flash kernels do; a second seed.
    for seed in [7, 8] {
        assert_all_pass(&conformance(&Bf16Sim::with_flash_attention(CpuBackend::new()), Scale::Small, seed));
    }
}

#[test]
// ~55 s on 2 cores in the dev profile: too slow for
// every run.
#[ignore = "slow (the GPU's shapes on the CPU): cargo test --test bf16_tolerances -- --ignored --nocapture"]
fn bf16_storage_meets_the_kernel_tolerances_at_realistic_shapes() {
    assert_all_pass(&conformance(&Bf16Sim::with_flash_attention(CpuBackend::new()), Scale::Realistic, 7));
}



#[test]
fn bf16_model_loss_and_lora_gradients_meet_the_gpu_tolerances_on_every_fixture() {
    let cpu = CpuBackend::new();
    let sim = Bf16Sim::new(CpuBackend::new());
    let mut results = Vec::new();
    for case in CASES {
        let (seqs, _) = Reference::load(case).sequences();
        let mut m_cpu = load_with_adapter(&cpu, case);
        let mut m_sim = load_with_adapter(&sim, case);
        let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
        let (l_cpu, g_cpu) = loss_and_grads(&cpu, &mut m_cpu, &batch);
        let (l_sim, g_sim) = loss_and_grads(&sim, &mut m_sim, &batch);
        let loss_rel = (l_sim - l_cpu).abs() / l_cpu;
        let grad_rel = rel_err(&g_sim, &g_cpu);
        eprintln!(
            "{case:<8} loss cpu {l_cpu:.6} bf16-sim {l_sim:.6}: rel {loss_rel:.2e} (tol {LOSS_TOL:.0e}, margin {}); \
             LoRA gradients rel {grad_rel:.2e} (tol {GRAD_TOL:.0e}, margin {})",
            margin(loss_rel, LOSS_TOL),
            margin(grad_rel, GRAD_TOL)
        );
        results.push((case, loss_rel, grad_rel));
    }
    for (case, loss_rel, grad_rel) in results {
        assert!(loss_rel > 0.0 && grad_rel > 0.0, "{case}: Bf16Sim changed nothing");
        assert!(loss_rel <= LOSS_TOL, "{case}: loss rel error {loss_rel:e} > {LOSS_TOL:e}");
        assert!(grad_rel <= GRAD_TOL, "{case}: LoRA gradient rel error {grad_rel:e} > {GRAD_TOL:e}");
    }
}

#[test]
fn bf16_fifty_adamw_steps_follow_the_cpu_loss_curve() {
    let cpu = CpuBackend::new();
    let sim = Bf16Sim::new(CpuBackend::new());
    let case = "llama3";
    let (seqs, _) = Reference::load(case).sequences();
    let mut m_cpu = load_with_adapter(&cpu, case);
    let mut m_sim = load_with_adapter(&sim, case);
    let batch = Batch::from_sequences(&seqs, m_cpu.cfg.vocab).unwrap();
    let mut o_cpu = Optimizer::new(&cpu, &m_cpu, AdamWConfig::default());
    let mut o_sim = Optimizer::new(&sim, &m_sim, AdamWConfig::default());
    let (mut worst, mut worst_step) = (0.0f64, 0);
    let (mut first, mut last) = (0.0, 0.0);
    for step in 0..50 {
        let (l_cpu, _) = loss_and_grads(&cpu, &mut m_cpu, &batch);
        let (l_sim, _) = loss_and_grads(&sim, &mut m_sim, &batch);
        o_cpu.step(&cpu, &mut m_cpu, 1e-3);
        o_sim.step(&sim, &mut m_sim, 1e-3);
        let rel = (l_sim - l_cpu).abs() / l_cpu;
        if rel > worst {
            (worst, worst_step) = (rel, step);
        }
        if step % 10 == 0 || step == 49 {
            eprintln!("step {step:>2}: loss cpu {l_cpu:.5} bf16-sim {l_sim:.5} (rel {rel:.2e})");
        }
        if step == 0 {
            first = l_cpu;
        }
        last = l_cpu;
    }
    eprintln!("worst step {worst_step}: rel {worst:.2e} (tol {CURVE_TOL:.0e}, margin {})", margin(worst, CURVE_TOL));
    assert!(last < first, "the CPU run itself did not learn ({first} -> {last})");
    assert!(worst <= CURVE_TOL, "loss curves diverge: worst step rel error {worst:e} > {CURVE_TOL:e}");
}

