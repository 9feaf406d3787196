//! NF4 base weights on the GPU: the 4-bit codes and their scales stay on the
//! device in bitsandbytes' layout; before each product the kernels of
//! cuda/nf4.cu expand one weight into the backend's single bf16 scratch
//! (sized for the largest NF4 weight), which cuBLAS then reads. Nothing
//! else is ever dequantized, so the resident cost of a weight is its 4-bit
//! form (`backend::nf4_device_bytes`) plus that one shared scratch.

use super::backend::{CudaBackend, launch};
use crate::quant::nf4::{Absmax, Nf4Tensor};
use anyhow::{Result, bail};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// The block scales as stored on the device.
pub enum Nf4Scales {
    /// One f32 per block.
    Plain(CudaSlice<f32>),
    /// Double quantization: u8 code per block into `nested_map`, times the
    /// f32 scale of its group of `nested_blocksize` blocks, plus `offset`.
    Nested { codes: CudaSlice<u8>, nested_absmax: CudaSlice<f32>, nested_map: CudaSlice<f32>, offset: f32, nested_blocksize: usize },
}

/// A frozen NF4 weight on the device.
pub struct Nf4Device {
    pub shape: [usize; 2],
    pub blocksize: usize,
    pub packed: CudaSlice<u8>,
    /// The 16 code values.
    pub code: CudaSlice<f32>,
    pub scales: Nf4Scales,
}

impl Nf4Device {
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }
}

/// Threads per block of the dequantization kernels.
const THREADS: u32 = 256;
/// Elements one thread expands from one 16-byte load.
const GROUP: usize = 32;

impl CudaBackend {
    /// Upload an NF4 tensor (already checked by `backend::check_nf4`).
    pub(super) fn upload_nf4(&self, t: &Nf4Tensor) -> Result<Nf4Device> {
        if !t.blocksize.is_multiple_of(GROUP) {
            bail!(
                "NF4 weight {:?}: block size {} is not a multiple of {GROUP}; the GPU kernels read {GROUP} codes per scale",
                t.shape,
                t.blocksize
            );
        }
        let up = |what: &str, e: cudarc::driver::DriverError| anyhow::anyhow!("uploading an NF4 weight's {what} to the GPU failed: {e:?}");
        let packed = self.stream.clone_htod(&t.packed).map_err(|e| up("codes", e))?;
        let code = self.stream.clone_htod(&t.code[..]).map_err(|e| up("code table", e))?;
        let scales = match &t.absmax {
            Absmax::Plain(a) => Nf4Scales::Plain(self.stream.clone_htod(a).map_err(|e| up("scales", e))?),
            Absmax::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize } => Nf4Scales::Nested {
                codes: self.stream.clone_htod(codes).map_err(|e| up("scale codes", e))?,
                nested_absmax: self.stream.clone_htod(nested_absmax).map_err(|e| up("nested scales", e))?,
                nested_map: self.stream.clone_htod(nested_map).map_err(|e| up("nested map", e))?,
                offset: *offset,
                nested_blocksize: *nested_blocksize,
            },
        };
        Ok(Nf4Device { shape: t.shape, blocksize: t.blocksize, packed, code, scales })
    }

    /// Queue the expansion of `w` into `out[..numel]` (bf16).
    pub(super) fn dequantize_nf4_into(&self, w: &Nf4Device, out: &mut CudaSlice<bf16>) {
        let n = w.numel();
        assert!(out.len() >= n, "NF4 scratch holds {} elements, the weight has {n}", out.len());
        let groups = n / GROUP;
        let blocks = groups.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (n64, bs) = (n as u64, w.blocksize as i32);
        match &w.scales {
            Nf4Scales::Plain(absmax) => launch!(self, "nf4_dequantize_bf16", cfg, &w.packed, absmax, &w.code, out, &n64, &bs),
            Nf4Scales::Nested { codes, nested_absmax, nested_map, offset, nested_blocksize } => {
                let nbs = *nested_blocksize as i32;
                launch!(self, "nf4_dequantize_nested_bf16", cfg, &w.packed, codes, nested_absmax, nested_map, offset, &w.code, out, &n64, &bs, &nbs)
            }
        }
    }
}
