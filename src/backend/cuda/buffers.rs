//! Device storage of the CUDA backend: buffers that carry their storage
//! type (`CudaBuf`), frozen weights (`CudaWeight`), the operands handed to
//! cuBLAS, and checkpoint bytes converted to bf16 on the host.

use super::nf4::Nf4Device;
use crate::backend::{DType, WeightSource};
use anyhow::{Result, bail};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

/// A device buffer with its storage type.
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::Bf16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub(super) fn dtype(&self) -> blas_sys::cudaDataType {
        match self {
            CudaBuf::F32(_) => blas_sys::cudaDataType::CUDA_R_32F,
            CudaBuf::Bf16(_) => blas_sys::cudaDataType::CUDA_R_16BF,
        }
    }
    /// The f32 slice of a buffer the op contract says is f32.
    #[track_caller]
    pub(super) fn f32(&self, what: &str) -> &CudaSlice<f32> {
        match self {
            CudaBuf::F32(s) => s,
            CudaBuf::Bf16(_) => panic!("{what} must be an f32 buffer (zeros_f32 / upload), got bf16"),
        }
    }
    /// The bf16 slice of an activation buffer.
    #[track_caller]
    pub(super) fn bf16(&self, what: &str) -> &CudaSlice<bf16> {
        match self {
            CudaBuf::Bf16(s) => s,
            CudaBuf::F32(_) => panic!("{what} must be stored in bf16 (activation buffers), got f32"),
        }
    }
    #[track_caller]
    pub(super) fn bf16_mut(&mut self, what: &str) -> &mut CudaSlice<bf16> {
        match self {
            CudaBuf::Bf16(s) => s,
            CudaBuf::F32(_) => panic!("{what} must be stored in bf16 (activation buffers), got f32"),
        }
    }
    #[track_caller]
    pub(super) fn f32_mut(&mut self, what: &str) -> &mut CudaSlice<f32> {
        match self {
            CudaBuf::F32(s) => s,
            CudaBuf::Bf16(_) => panic!("{what} must be an f32 buffer (zeros_f32 / upload), got bf16"),
        }
    }
}

/// A frozen weight: bf16 values, or an NF4 projection (QLoRA) kept 4-bit
/// and expanded into the backend's one bf16 scratch for each product.
pub enum CudaWeight {
    Bf16(CudaSlice<bf16>),
    Nf4(Box<Nf4Device>),
}

impl CudaWeight {
    /// The bf16 slice of a dense weight. Only `linear` and
    /// `linear_backward_input` take NF4 weights (src/backend/mod.rs).
    #[track_caller]
    pub(super) fn dense(&self, op: &str) -> &CudaSlice<bf16> {
        match self {
            CudaWeight::Bf16(s) => s,
            CudaWeight::Nf4(_) => panic!("{op}: NF4 weights are only accepted by linear and linear_backward_input"),
        }
    }
}

/// A GEMM operand: device pointer, storage type, row-major shape.
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub(super) ptr: u64,
    pub(super) dtype: blas_sys::cudaDataType,
}

/// A bf16 operand for a product: the buffer's own device pointer, or a
/// temporary bf16 copy kept alive until the product is queued.
pub(super) enum Bf16Operand {
    Borrowed(u64),
    /// The copy is only held, never read: dropping it frees it in stream
    /// order, after the product that uses it.
    Owned(#[allow(dead_code)] CudaSlice<bf16>, u64),
}

impl Bf16Operand {
    pub(super) fn op(&self) -> Operand {
        let ptr = match self {
            Bf16Operand::Borrowed(p) | Bf16Operand::Owned(_, p) => *p,
        };
        Operand { ptr, dtype: blas_sys::cudaDataType::CUDA_R_16BF }
    }
}

pub(super) fn out_operand(buf: &mut CudaBuf, stream: &CudaStream) -> Operand {
    let dtype = buf.dtype();
    let ptr = match buf {
        CudaBuf::F32(s) => s.device_ptr_mut(stream).0,
        CudaBuf::Bf16(s) => s.device_ptr_mut(stream).0,
    };
    Operand { ptr, dtype }
}

pub(super) fn weight_operand(w: &CudaSlice<bf16>, stream: &CudaStream) -> Operand {
    Operand { ptr: w.device_ptr(stream).0, dtype: blas_sys::cudaDataType::CUDA_R_16BF }
}

/// Checkpoint bytes (bf16, f16 or f32) as the bf16 values a weight stores.
pub(super) fn to_bf16_host(src: &WeightSource) -> Result<Vec<bf16>> {
    use rayon::prelude::*;
    if src.bytes.len() != src.numel * src.dtype.size() {
        bail!("weight has {} bytes for {} {:?} elements", src.bytes.len(), src.numel, src.dtype);
    }
    Ok(match src.dtype {
        DType::BF16 => src.bytes.par_chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::F16 => src
            .bytes
            .par_chunks_exact(2)
            .map(|c| bf16::from_f32(half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
        DType::F32 => src
            .bytes
            .par_chunks_exact(4)
            .map(|c| bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    })
}
