//! The launch of `Backend::sample_rows` (cuda/sample.cu): the filters and
//! the draw run on the device, one block per row; the uniforms go up and
//! one token per row comes back, never the logits.

use super::backend::{CudaBackend, launch, rows_grid};
use super::buffers::CudaBuf;
use crate::backend::SamplingParams;
use cudarc::driver::PushKernelArg;

/// Threads per row (the kernel's suggested block).
const THREADS: u32 = 1024;

pub fn sample_rows(be: &CudaBackend, logits: &CudaBuf, rows: usize, vocab: usize, params: &SamplingParams, uniforms: &[f64]) -> Vec<u32> {
    const OP: &str = "sample_rows";
    if rows == 0 {
        return Vec::new();
    }
    // Shapes and parameters come from generation, not from the user (whose
    // settings `SamplingParams::validate` checked): a bad one is a bug.
    assert!(vocab > 0 && vocab <= i32::MAX as usize, "{OP}: vocab {vocab} must be in 1..=i32::MAX");
    assert!(rows <= i32::MAX as usize, "{OP}: rows {rows} exceeds i32");
    assert!(logits.len() >= rows * vocab, "{OP}: `logits` has {} elements, the shape needs {}", logits.len(), rows * vocab);
    assert!(uniforms.len() >= rows, "{OP}: {} uniforms for {rows} rows", uniforms.len());
    if let Err(e) = params.validate() {
        panic!("{OP}: {e}");
    }
    // The kernel's "off" values: top_k 0 (also for k >= vocab, which keeps
    // every token), top_p 0, min_p 0 (which drops nothing).
    let top_k = params.top_k.filter(|&k| k < vocab).map_or(0, |k| k as i32);
    let top_p = params.top_p.unwrap_or(0.0);
    let min_p = params.min_p.unwrap_or(0.0);
    let (r, v, t) = (rows as i32, vocab as i32, params.temperature);
    let u = be.stream.clone_htod(&uniforms[..rows]).expect("CUDA upload");
    let mut out = be.stream.alloc_zeros::<i32>(rows).expect("CUDA allocation (i32)");
    let cfg = rows_grid(rows, THREADS);
    match logits {
        CudaBuf::F32(l) => launch!(be, "sample_rows_f32", cfg, l, &u, &mut out, &r, &v, &t, &top_k, &top_p, &min_p),
        CudaBuf::Bf16(l) => launch!(be, "sample_rows_bf16", cfg, l, &u, &mut out, &r, &v, &t, &top_k, &top_p, &min_p),
    }
    let tokens = be.stream.clone_dtoh(&out).expect("CUDA download");
    tokens.into_iter().map(|t| t as u32).collect()
}
