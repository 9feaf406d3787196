//! The CUDA backend: hand-written kernels (cuda/*.cu, embedded as PTX) and
//! cuBLAS GEMMs behind the same `Backend` trait as the CPU reference.
mod attention;
pub mod backend;
pub mod device;
pub mod libs;
mod nf4;

pub use attention::{SUMMARY as ATTENTION_SUMMARY, path_for as attention_path};
pub use backend::{CudaBackend, CudaBuf, CudaWeight};
