//! LoRA side-path launches: the products on cuBLAS (bf16 operands, f32
//! accumulation), and with dropout the fused mask kernels of
//! cuda/lora_dropout.cu (no masked copy of x, no full-size gradient scratch).

use super::backend::{CudaBackend, FUSED_LORA_THREADS, fused_grid, grid_for, launch, rows_grid};
use super::buffers::{CudaBuf, Operand, out_operand};
use crate::backend::{LoraGrads, LoraInputs, LoraShape};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{DevicePtrMut, LaunchConfig, PushKernelArg};

/// xa = dropout(x)·Aᵀ (the mask fused into the product when p > 0), then
/// y += scale · xa·Bᵀ.
pub(super) fn forward(be: &CudaBackend, inputs: LoraInputs<'_, CudaBuf>, xa: &mut CudaBuf, y: &mut CudaBuf, shape: LoraShape) {
    let LoraInputs { x, a, b } = inputs;
    let LoraShape { m, k, n, r, scale, dropout } = shape;
    match dropout.filter(|d| d.p > 0.0) {
        // xa = dropout(x)·Aᵀ with the mask fused: no masked copy of x.
        Some(d) => {
            let (mi, ki, ri) = (m as i32, k as i32, r as i32);
            let cfg = rows_grid(m, FUSED_LORA_THREADS);
            let af = a.f32("lora A");
            match (x, &mut *xa) {
                (CudaBuf::F32(x), CudaBuf::F32(o)) => launch!(be, "lora_xa_dropout_f32", cfg, x, af, o, &mi, &ki, &ri, &d.seed, &d.p),
                (CudaBuf::Bf16(x), CudaBuf::Bf16(o)) => launch!(be, "lora_xa_dropout_bf16", cfg, x, af, o, &mi, &ki, &ri, &d.seed, &d.p),
                _ => panic!("lora_forward: x and xa must share a storage type"),
            }
        }
        None => {
            let ab = be.bf16_operand(a);
            let xd = be.bf16_operand(x);
            let xa_op = out_operand(xa, &be.stream);
            be.gemm(m, r, k, xd.op(), false, ab.op(), true, xa_op, 1.0, 0.0);
        }
    }
    let bb = be.bf16_operand(b);
    let xab = be.bf16_operand(xa);
    let y_op = out_operand(y, &be.stream);
    be.gemm(m, n, r, xab.op(), false, bb.op(), true, y_op, scale, 1.0);
}

/// dB, then dxa (bf16), then dA and dx: two more GEMMs, or with dropout the
/// fused kernels of cuda/lora_dropout.cu.
pub(super) fn backward(
    be: &CudaBackend,
    dy: &CudaBuf,
    inputs: LoraInputs<'_, CudaBuf>,
    xa: &CudaBuf,
    grads: LoraGrads<'_, CudaBuf>,
    shape: LoraShape,
) {
    let LoraInputs { x, a, b } = inputs;
    let LoraGrads { dx, da, db } = grads;
    let LoraShape { m, k, n, r, scale, dropout } = shape;
    let dyb = be.bf16_operand(dy);
    let xab = be.bf16_operand(xa);
    let bb = be.bf16_operand(b);
    // dB[n, r] += s · dyᵀ · xa
    let db_op = out_operand(db, &be.stream);
    be.gemm(n, r, m, dyb.op(), true, xab.op(), false, db_op, scale, 1.0);
    // dxa[m, r] = s · dy · B   (bf16, an operand of the next two products)
    let mut dxa = be.alloc_bf16(m * r);
    let dxa_op = Operand { ptr: dxa.device_ptr_mut(&be.stream).0, dtype: blas_sys::cudaDataType::CUDA_R_16BF };
    be.gemm(m, r, n, dyb.op(), false, bb.op(), false, dxa_op, scale, 0.0);
    match dropout.filter(|d| d.p > 0.0) {
        None => {
            let ab = be.bf16_operand(a);
            let xd = be.bf16_operand(x);
            // dA[r, k] += dxaᵀ · x
            let da_op = out_operand(da, &be.stream);
            be.gemm(r, k, m, dxa_op, true, xd.op(), false, da_op, 1.0, 1.0);
            // dx[m, k] += dxa · A
            let dx_op = out_operand(dx, &be.stream);
            be.gemm(m, k, r, dxa_op, false, ab.op(), false, dx_op, 1.0, 1.0);
        }
        // The mask fused into both products: no masked copy of x and no
        // full-size gradient scratch (cuda/lora_dropout.cu).
        Some(d) => {
            let (mi, ki, ri) = (m as i32, k as i32, r as i32);
            // dA[r, k] += dxaᵀ · dropout(x): row-split partials, then their sum.
            let splits = crate::backend::lora_da_splits(m);
            let rows_per_split = m.div_ceil(splits) as i32;
            // Every element is written by the partials kernel (each
            // column thread writes every rank of its split), so no zero-fill.
            // SAFETY: the buffer is only read by the finalize kernel, after
            // the partials kernel has written all of it, in stream order.
            let mut partials = unsafe { be.stream.alloc::<f32>(splits * r * k) }.expect("CUDA allocation (f32)");
            let cfg = LaunchConfig {
                grid_dim: (k.div_ceil(FUSED_LORA_THREADS as usize) as u32, splits as u32, 1),
                block_dim: (FUSED_LORA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            match x {
                CudaBuf::F32(x) => launch!(be, "lora_da_dropout_partials_f32", cfg, x, &dxa, &mut partials, &mi, &ki, &ri, &rows_per_split, &d.seed, &d.p),
                CudaBuf::Bf16(x) => launch!(be, "lora_da_dropout_partials_bf16", cfg, x, &dxa, &mut partials, &mi, &ki, &ri, &rows_per_split, &d.seed, &d.p),
            }
            let splits_i = splits as i32;
            launch!(be, "lora_da_dropout_finalize_f32", grid_for(r * k), &partials, da.f32_mut("lora dA"), &ki, &ri, &splits_i);
            drop(partials);
            // dx[m, k] += mask ⊙ (dxa · A)
            let af = a.f32("lora A");
            let (n64, cfg) = ((m * k) as u64, fused_grid(m * k));
            match dx {
                CudaBuf::F32(o) => launch!(be, "lora_dx_dropout_f32", cfg, &dxa, af, o, &n64, &ki, &ri, &d.seed, &d.p),
                CudaBuf::Bf16(o) => launch!(be, "lora_dx_dropout_bf16", cfg, &dxa, af, o, &n64, &ki, &ri, &d.seed, &d.p),
            }
        }
    }
    drop(dxa);
}
