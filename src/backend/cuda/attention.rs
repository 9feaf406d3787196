//! Flash attention launches (cuda/flash_attn.cu).
use super::backend::{CudaBackend, CudaBuf};
use crate::backend::AttnShape;
use cudarc::driver::CudaSlice;

#[allow(clippy::too_many_arguments)]
pub fn forward(
    _be: &CudaBackend,
    _q: &CudaBuf,
    _k: &CudaBuf,
    _v: &CudaBuf,
    _cu: &CudaSlice<i32>,
    _n_seqs: usize,
    _shape: AttnShape,
    _out: &mut CudaBuf,
    _lse: &mut CudaSlice<f32>,
) {
    todo!("flash attention launch")
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    _be: &CudaBackend,
    _dout: &CudaBuf,
    _q: &CudaBuf,
    _k: &CudaBuf,
    _v: &CudaBuf,
    _out: &CudaBuf,
    _lse: &CudaSlice<f32>,
    _cu: &CudaSlice<i32>,
    _n_seqs: usize,
    _shape: AttnShape,
    _dq: &mut CudaBuf,
    _dk: &mut CudaBuf,
    _dv: &mut CudaBuf,
) {
    todo!("flash attention backward launch")
}
