//! The gated delta-net on the CUDA backend: for now a host round trip
//! through the CPU reference (`cpu::delta_net`). The op's inputs come back
//! to the host, run there in f32, and the outputs go back in the buffers'
//! own storage type. It gives the same numbers as the CPU backend, at the
//! cost of a device synchronisation and the host's speed; a kernel pair
//! replaces it without touching the callers.

use super::backend::CudaBackend;
use super::buffers::CudaBuf;
use crate::backend::cpu::delta_net as cpu;
use crate::backend::{Backend, DeltaIn, DeltaShape, DeltaWeights};
use super::buffers::CudaWeight;
use cudarc::driver::CudaSlice;

/// The op's host copies: inputs, frozen parameters and cu_seqlens.
pub(super) struct Host {
    pub qkv: Vec<f32>,
    pub z: Vec<f32>,
    pub b: Vec<f32>,
    pub a: Vec<f32>,
    pub conv: Vec<f32>,
    pub a_log: Vec<f32>,
    pub dt_bias: Vec<f32>,
    pub norm: Vec<f32>,
    pub cu_seqlens: Vec<i32>,
}

impl Host {
    pub fn read(be: &CudaBackend, i: DeltaIn<'_, CudaBuf>, w: DeltaWeights<'_, CudaWeight>, cu: &CudaSlice<i32>, n_seqs: usize) -> Host {
        let mut cu_seqlens = be.stream.clone_dtoh(cu).expect("CUDA download (cu_seqlens)");
        cu_seqlens.truncate(n_seqs + 1);
        Host {
            qkv: be.download(i.qkv),
            z: be.download(i.z),
            b: be.download(i.b),
            a: be.download(i.a),
            conv: be.weight_to_f32(w.conv),
            a_log: be.weight_to_f32(w.a_log),
            dt_bias: be.weight_to_f32(w.dt_bias),
            norm: be.weight_to_f32(w.norm),
            cu_seqlens,
        }
    }
    pub fn inputs(&self) -> cpu::DeltaNetInputs<'_> {
        cpu::DeltaNetInputs { qkv: &self.qkv, z: &self.z, b: &self.b, a: &self.a }
    }
    pub fn weights(&self) -> cpu::DeltaNetWeights<'_> {
        cpu::DeltaNetWeights { conv: &self.conv, a_log: &self.a_log, dt_bias: &self.dt_bias, norm: &self.norm }
    }
}

pub(super) fn shape(s: DeltaShape) -> cpu::DeltaNetShape {
    let DeltaShape { n, k_heads, v_heads, k_dim, v_dim, conv_kernel, norm_eps } = s;
    cpu::DeltaNetShape { n, k_heads, v_heads, k_dim, v_dim, conv_kernel, norm_eps }
}

/// Overwrites `dst` with `data`, in dst's storage type.
pub(super) fn write_back(be: &CudaBackend, dst: &mut CudaBuf, data: &[f32]) {
    *dst = match dst {
        CudaBuf::F32(_) => be.upload(data),
        CudaBuf::Bf16(_) => be.upload_activation(data),
    };
}
