//! `CudaBackend`: the op set on one GPU. Activations are stored in bf16,
//! parameters, gradients, moments and statistics in f32 (see the buffer
//! rules in src/backend/mod.rs); every product runs on cuBLAS as bf16 × bf16
//! with f32 accumulation, the output in its buffer's type; every other op is
//! a hand-written kernel from cuda/ (embedded PTX, loaded once at start).
//!
//! All work is queued on one stream. Buffers come from the driver's
//! stream-ordered pool (cuMemAllocAsync), so after the first step no
//! allocation reaches the driver's allocator and nothing synchronises the
//! host except `download` and `sum_sq` (reading a value back).
//!
//! This file holds the backend itself: start-up (kernels, cuBLAS, the
//! memory pool), allocation, the GEMM wrapper and the launch helpers. The
//! op set (`impl Backend`) is in ops.rs, with one file per op family whose
//! launches need more than a few lines (attention.rs, lora.rs, nf4.rs);
//! buffer and weight types are in buffers.rs.

use super::attention;
use super::buffers::{Bf16Operand, CudaBuf, CudaWeight, Operand, weight_operand};
use super::device::{self, GpuInfo};
use crate::kernels;
use anyhow::{Context, Result, bail};
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Launches `$name` with the arguments in order (each must match the
/// kernel's parameter type: &CudaSlice for pointers, &i32 / &u64 / &f32).
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr $(, $arg:expr)* $(,)?) => {{
        let f = $be.func($name);
        let mut b = $be.stream.launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: the argument list matches the kernel signature documented
        // in its .cu file (and checked against the PTX by src/kernels.rs
        // tests); every buffer is large enough for the sizes passed.
        unsafe { b.launch($cfg) }.unwrap_or_else(|e| panic!("CUDA kernel {} failed to launch: {e:?}", $name));
    }};
}
pub(super) use launch;

/// Threads per block for the elementwise and row kernels.
pub(super) const BLOCK: u32 = 256;

/// A grid-stride launch over `n` elements.
pub(super) fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Block size of the fused LoRA-dropout kernels (their __launch_bounds__).
pub(super) const FUSED_LORA_THREADS: u32 = 256;

/// A grid-stride launch of a fused LoRA-dropout kernel over `n` elements.
pub(super) fn fused_grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(FUSED_LORA_THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (FUSED_LORA_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row (grid-stride over rows beyond 65535).
pub(super) fn rows_grid(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, 65_535) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

pub struct CudaBackend {
    pub info: GpuInfo,
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    /// The one bf16 buffer NF4 weights are expanded into before their
    /// product, grown to the largest NF4 weight loaded. Every use is queued
    /// on the one stream, so a product has read it before the next
    /// expansion overwrites it.
    /// Boxed: the backend stays small to move around.
    pub(super) nf4_scratch: Mutex<Option<Box<CudaSlice<bf16>>>>,
}

impl CudaBackend {
    /// Open GPU `ordinal`, load every kernel and create the cuBLAS handle.
    /// Whatever is missing or broken, this returns an error, never panics.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        let (ctx, info) = device::open(ordinal)?;
        device::guarded("starting the CUDA backend", || Self::start(ctx, info))?
    }

    fn start(ctx: Arc<CudaContext>, info: GpuInfo) -> Result<CudaBackend> {
        // One stream: cudarc's cross-stream event tracking is not needed.
        // SAFETY: every buffer of this backend is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| {
            anyhow::anyhow!(
                "cannot initialise cuBLAS ({e:?}); is libcublas (CUDA {}) installed and on the library path?",
                if cfg!(feature = "cuda-13") { "13" } else { "12" }
            )
        })?;
        let mut funcs = HashMap::new();
        for (module_name, ptx) in kernels::PTX {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                .map_err(|e| anyhow::anyhow!("{e:?}"))
                .with_context(|| format!("the driver refused kernel module {module_name} (PTX ISA 8.4 needs driver >= 550)"))?;
            for entry in ptx_entries(ptx) {
                let f = module.load_function(&entry).map_err(|e| anyhow::anyhow!("{e:?}"))
                    .with_context(|| format!("kernel {entry} in module {module_name}"))?;
                funcs.insert(entry, f);
            }
        }
        if funcs.is_empty() {
            bail!("no CUDA kernels are embedded in this build (ptx/ is empty)");
        }
        let be = CudaBackend { info, ctx, stream, blas, funcs, nf4_scratch: Mutex::new(None) };
        be.keep_pool_memory();
        attention::configure(&be)?;
        Ok(be)
    }

    /// The device's default stream-ordered memory pool, where every buffer
    /// of this backend lives.
    fn pool(&self) -> Option<cudarc::driver::sys::CUmemoryPool> {
        use cudarc::driver::sys;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: the device handle is live; pool is a valid out-pointer.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
    }

    fn pool_attr(&self, attr: cudarc::driver::sys::CUmemPool_attribute, set: Option<u64>) -> Option<u64> {
        use cudarc::driver::sys;
        let pool = self.pool()?;
        let mut value: u64 = set.unwrap_or(0);
        // SAFETY: the attribute takes a u64 (cuuint64_t) in and out.
        let r = unsafe {
            match set {
                Some(_) => sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut c_void),
                None => sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut c_void),
            }
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(value)
    }

    /// Keep freed memory in the pool instead of returning it to the driver at
    /// each synchronisation, so steady-state steps never allocate.
    fn keep_pool_memory(&self) {
        let _ = self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX));
    }

    /// Peak bytes in use in the pool since the last reset (all buffers and
    /// weights; not cuBLAS's workspace or the context).
    pub fn peak_bytes(&self) -> Option<u64> {
        self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None)
    }

    pub fn reset_peak(&self) {
        let _ = self.pool_attr(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0));
    }

    pub fn kernel_count(&self) -> usize {
        self.funcs.len()
    }

    #[track_caller]
    pub(super) fn func(&self, name: &str) -> &CudaFunction {
        self.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} is not in the embedded PTX"))
    }

    /// Bytes the driver reports free and total.
    pub fn mem_info(&self) -> (usize, usize) {
        self.ctx.mem_get_info().unwrap_or((0, 0))
    }

    pub fn synchronize(&self) {
        self.stream.synchronize().expect("CUDA stream synchronise");
    }

    pub(super) fn alloc_f32(&self, len: usize) -> CudaSlice<f32> {
        self.stream.alloc_zeros::<f32>(len.max(1)).expect("CUDA allocation (f32)")
    }

    pub(super) fn alloc_bf16(&self, len: usize) -> CudaSlice<bf16> {
        self.stream.alloc_zeros::<bf16>(len.max(1)).expect("CUDA allocation (bf16)")
    }

    /// A bf16 copy of an f32 slice (operands of one product share a type).
    fn cast_to_bf16(&self, src: &CudaSlice<f32>, n: usize) -> CudaSlice<bf16> {
        let mut dst = self.alloc_bf16(n);
        let n64 = n as u64;
        launch!(self, "cast_f32_to_bf16", grid_for(n), src, &mut dst, &n64);
        dst
    }

    /// Row-major GEMM: C[M,N] = alpha·op(A)·op(B) + beta·C with op(A) [M,K]
    /// (A stored [M,K], or [K,M] when `ta`) and op(B) [K,N] (B stored [K,N],
    /// or [N,K] when `tb`). A and B must share a type; C may be f32 or bf16.
    /// cuBLAS is column-major: row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(&self, m: usize, n: usize, k: usize, a: Operand, ta: bool, b: Operand, tb: bool, c: Operand, alpha: f32, beta: f32) {
        assert_eq!(a.dtype as u32, b.dtype as u32, "gemm operands must share a type");
        if m == 0 || n == 0 {
            return;
        }
        let lda = if ta { m } else { k };
        let ldb = if tb { k } else { n };
        let op = |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
        // SAFETY: pointers are live device allocations sized by the callers
        // for these shapes; alpha/beta point to host f32 (compute type 32F).
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                (&alpha) as *const f32 as *const c_void,
                b.ptr as *const c_void,
                b.dtype,
                ldb as i32,
                a.ptr as *const c_void,
                a.dtype,
                lda as i32,
                (&beta) as *const f32 as *const c_void,
                c.ptr as *mut c_void,
                c.dtype,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .unwrap_or_else(|e| panic!("cuBLAS GEMM {m}x{n}x{k} failed: {e:?}"));
    }

    /// Run `f` with a weight as a bf16 GEMM operand: a dense weight as it
    /// is; an NF4 weight expanded into the shared scratch first (held locked
    /// until the product is queued).
    pub(super) fn with_weight_operand<R>(&self, w: &CudaWeight, f: impl FnOnce(Operand) -> R) -> R {
        match w {
            CudaWeight::Bf16(s) => f(weight_operand(s, &self.stream)),
            CudaWeight::Nf4(q) => {
                let mut guard = self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner());
                let scratch = guard.as_mut().expect("the NF4 scratch is allocated with the first NF4 weight");
                self.dequantize_nf4_into(q, scratch);
                f(weight_operand(scratch, &self.stream))
            }
        }
    }

    /// Queue the expansion of an NF4 weight into the shared scratch (what
    /// every product with it starts with); a dense weight is left alone.
    /// Public for the GPU tests' throughput measurement.
    pub fn nf4_dequantize(&self, w: &CudaWeight) {
        self.with_weight_operand(w, |_| ());
    }

    /// Bytes of the NF4 scratch (0 before the first NF4 weight).
    pub fn nf4_scratch_bytes(&self) -> usize {
        self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |s| s.len() * 2)
    }

    /// A bf16 view of any buffer for a product: itself, or a cast copy.
    pub(super) fn bf16_operand(&self, buf: &CudaBuf) -> Bf16Operand {
        match buf {
            CudaBuf::Bf16(s) => Bf16Operand::Borrowed(s.device_ptr(&self.stream).0),
            CudaBuf::F32(s) => {
                let c = self.cast_to_bf16(s, s.len());
                let ptr = c.device_ptr(&self.stream).0;
                Bf16Operand::Owned(c, ptr)
            }
        }
    }
}

/// The entry points a PTX module declares (`.entry name(`).
fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix(".visible .entry ").or_else(|| l.strip_prefix(".entry "))?;
            Some(rest.split(['(', ' ']).next()?.trim().to_string())
        })
        .collect()
}
