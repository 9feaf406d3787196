//! The CUDA backend: hand-written kernels (cuda/*.cu, embedded as PTX) and
//! cuBLAS GEMMs behind the same `Backend` trait as the CPU reference.
mod attention;
pub mod backend;
mod buffers;
mod delta_net;
pub mod device;
pub mod libs;
mod lora;
mod nf4;
mod ops;
mod sample;
mod support;

pub use attention::SUMMARY as ATTENTION_SUMMARY;
pub use support::{attention_paths, check_model};
pub use backend::CudaBackend;
pub use buffers::{CudaBuf, CudaWeight};
