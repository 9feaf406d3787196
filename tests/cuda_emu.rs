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

use common::GPU_CURVE_TOL;
use ferrotune::backend::conformance::Scale;
use ferrotune::backend::cuda::CudaBackend;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// `ferrotune train` with `--set` overrides, on the emulated GPU when `cuda`
/// (the binary finds the emulator's libraries through LD_LIBRARY_PATH).
fn train(cuda: bool, sets: &[String]) -> String {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    cmd.current_dir(&repo).args(["train", "examples/quickstart/quickstart.yml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.args(["--set", if cuda { "device=cuda" } else { "device=cpu" }]);
    if cuda {
        cmd.env("LD_LIBRARY_PATH", cuda_emu::lib_dir().unwrap_or_else(|e| panic!("cannot build the SIMT emulator: {e}")));
    }
    let out = cmd.output().expect("run ferrotune");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ferrotune train (cuda={cuda}) failed:\n{log}");
    log
}

fn step_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("loss")?.as_f64())
        .collect()
}

#[test]
fn training_on_the_emulated_gpu_follows_the_cpu_and_resumes_from_its_checkpoint() {
    // The quickstart, 4 steps, on the CPU and on the (emulated) GPU: every
    // logged loss within GPU_CURVE_TOL. Then the GPU run is resumed from its
    // step-2 checkpoint (adapter and AdamW moments uploaded back to the
    // device) and must repeat steps 3 and 4 bit for bit, as the emulator is
    // deterministic.
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    let common = |out: &Path| vec![format!("output_dir={}", out.display()), "max_steps=4".into(), "logging_steps=1".into(), "save_steps=2".into()];
    train(false, &common(&dir("cpu")));
    let log = train(true, &common(&dir("gpu")));
    assert!(log.contains("SIMT emulator"), "the run did not report the emulated GPU:\n{log}");
    assert!(log.contains("GPU memory peak"), "the run did not report its measured peak:\n{log}");
    let (cpu, gpu) = (step_losses(&dir("cpu")), step_losses(&dir("gpu")));
    assert_eq!((cpu.len(), gpu.len()), (4, 4), "cpu {cpu:?} gpu {gpu:?}");
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let rel = (g - c).abs() / c;
        eprintln!("step {}: loss cpu {c:.5} gpu {g:.5} (rel {rel:.2e})", step + 1);
        assert!(rel <= GPU_CURVE_TOL, "step {}: rel error {rel:e} > {GPU_CURVE_TOL:e}", step + 1);
    }
    assert!(dir("gpu").join("adapter_model.safetensors").is_file());

    let mut resumed = common(&dir("resumed"));
    resumed.push(format!("resume_from_checkpoint={}", dir("gpu").join("checkpoint-2").display()));
    train(true, &resumed);
    let again = step_losses(&dir("resumed"));
    assert_eq!(again, gpu[2..].to_vec(), "the resumed GPU run differs from the uninterrupted one");
}
