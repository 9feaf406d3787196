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

use super::attention;
use super::device::{self, GpuInfo};
use super::nf4::Nf4Device;
use crate::backend::{
    AdamW, AttnSaved, AttnShape, Backend, DType, LoraGrads, LoraInputs, LoraShape, MatShape, NormShape, Qkv, QkvGrads,
    RopeShape, Varlen, WeightSource,
};
use crate::kernels;
use anyhow::{Context, Result, bail};
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

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
    fn dtype(&self) -> blas_sys::cudaDataType {
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
    fn f32_mut(&mut self, what: &str) -> &mut CudaSlice<f32> {
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
    fn dense(&self, op: &str) -> &CudaSlice<bf16> {
        match self {
            CudaWeight::Bf16(s) => s,
            CudaWeight::Nf4(_) => panic!("{op}: NF4 weights are only accepted by linear and linear_backward_input"),
        }
    }
}

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
const BLOCK: u32 = 256;

/// A grid-stride launch over `n` elements.
fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Block size of the fused LoRA-dropout kernels (their __launch_bounds__).
const FUSED_LORA_THREADS: u32 = 256;

/// A grid-stride launch of a fused LoRA-dropout kernel over `n` elements.
fn fused_grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(FUSED_LORA_THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (FUSED_LORA_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row (grid-stride over rows beyond 65535).
fn rows_grid(rows: usize, threads: u32) -> LaunchConfig {
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
    nf4_scratch: Mutex<Option<Box<CudaSlice<bf16>>>>,
}

/// A GEMM operand: device pointer, storage type, row-major shape.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    dtype: blas_sys::cudaDataType,
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

    fn alloc_f32(&self, len: usize) -> CudaSlice<f32> {
        self.stream.alloc_zeros::<f32>(len.max(1)).expect("CUDA allocation (f32)")
    }

    fn alloc_bf16(&self, len: usize) -> CudaSlice<bf16> {
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
    fn gemm(&self, m: usize, n: usize, k: usize, a: Operand, ta: bool, b: Operand, tb: bool, c: Operand, alpha: f32, beta: f32) {
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
    fn with_weight_operand<R>(&self, w: &CudaWeight, f: impl FnOnce(Operand) -> R) -> R {
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
    fn bf16_operand(&self, buf: &CudaBuf) -> Bf16Operand {
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

/// A bf16 operand for a product: the buffer's own device pointer, or a
/// temporary bf16 copy kept alive until the product is queued.
enum Bf16Operand {
    Borrowed(u64),
    /// The copy is only held, never read: dropping it frees it in stream
    /// order, after the product that uses it.
    Owned(#[allow(dead_code)] CudaSlice<bf16>, u64),
}

impl Bf16Operand {
    fn op(&self) -> Operand {
        let ptr = match self {
            Bf16Operand::Borrowed(p) | Bf16Operand::Owned(_, p) => *p,
        };
        Operand { ptr, dtype: blas_sys::cudaDataType::CUDA_R_16BF }
    }
}

fn out_operand(buf: &mut CudaBuf, stream: &CudaStream) -> Operand {
    let dtype = buf.dtype();
    let ptr = match buf {
        CudaBuf::F32(s) => s.device_ptr_mut(stream).0,
        CudaBuf::Bf16(s) => s.device_ptr_mut(stream).0,
    };
    Operand { ptr, dtype }
}

fn weight_operand(w: &CudaSlice<bf16>, stream: &CudaStream) -> Operand {
    Operand { ptr: w.device_ptr(stream).0, dtype: blas_sys::cudaDataType::CUDA_R_16BF }
}

fn to_bf16_host(src: &WeightSource) -> Result<Vec<bf16>> {
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

/// Picks the kernel variant for the activation type of `$buf`.
macro_rules! variant {
    ($base:expr, $buf:expr) => {
        match $buf {
            CudaBuf::F32(_) => concat!($base, "_f32"),
            CudaBuf::Bf16(_) => concat!($base, "_bf16"),
        }
    };
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type IntBuf = CudaSlice<i32>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }

    fn zeros(&self, len: usize) -> CudaBuf {
        CudaBuf::Bf16(self.alloc_bf16(len))
    }
    fn zeros_f32(&self, len: usize) -> CudaBuf {
        CudaBuf::F32(self.alloc_f32(len))
    }
    fn zeros_like(&self, like: &CudaBuf) -> CudaBuf {
        match like {
            CudaBuf::F32(s) => CudaBuf::F32(self.alloc_f32(s.len())),
            CudaBuf::Bf16(s) => CudaBuf::Bf16(self.alloc_bf16(s.len())),
        }
    }
    fn upload(&self, data: &[f32]) -> CudaBuf {
        CudaBuf::F32(self.stream.clone_htod(data).expect("CUDA upload"))
    }
    fn upload_activation(&self, data: &[f32]) -> CudaBuf {
        let host: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
        CudaBuf::Bf16(self.stream.clone_htod(&host).expect("CUDA upload"))
    }
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        match buf {
            CudaBuf::F32(s) => self.stream.clone_dtoh(s).expect("CUDA download"),
            CudaBuf::Bf16(s) => self.stream.clone_dtoh(s).expect("CUDA download").into_iter().map(|x| x.to_f32()).collect(),
        }
    }
    fn upload_ints(&self, data: &[i32]) -> CudaSlice<i32> {
        if data.is_empty() {
            return self.stream.alloc_zeros::<i32>(1).expect("CUDA allocation (i32)");
        }
        self.stream.clone_htod(data).expect("CUDA upload")
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn load_weight(&self, src: &WeightSource) -> Result<CudaWeight> {
        let host = to_bf16_host(src)?;
        let w = self.stream.clone_htod(&host).map_err(|e| anyhow::anyhow!("uploading a weight to the GPU failed: {e:?}"))?;
        Ok(CudaWeight::Bf16(w))
    }
    fn weight_from_f32(&self, data: &[f32]) -> CudaWeight {
        use rayon::prelude::*;
        let host: Vec<bf16> = data.par_iter().map(|&x| bf16::from_f32(x)).collect();
        CudaWeight::Bf16(self.stream.clone_htod(&host).expect("CUDA upload"))
    }
    fn weight_from_nf4(&self, t: &crate::quant::nf4::Nf4Tensor) -> Result<CudaWeight> {
        crate::backend::check_nf4(t)?;
        let w = self.upload_nf4(t)?;
        let mut scratch = self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.as_ref().is_none_or(|s| s.len() < t.numel()) {
            // Free the smaller one first (in stream order) so the two never coexist.
            *scratch = None;
            let s = self.stream.alloc_zeros::<bf16>(t.numel().max(1)).map_err(|e| {
                anyhow::anyhow!("allocating the NF4 dequantization scratch ({} bf16) failed: {e:?}", t.numel())
            })?;
            *scratch = Some(Box::new(s));
        }
        Ok(CudaWeight::Nf4(Box::new(w)))
    }
    fn weight_to_f32(&self, w: &CudaWeight) -> Vec<f32> {
        let n = self.weight_len(w);
        let host = match w {
            CudaWeight::Bf16(s) => self.stream.clone_dtoh(s),
            CudaWeight::Nf4(q) => {
                // One lock for the expansion and the read (the scratch lock
                // is not reentrant).
                let mut guard = self.nf4_scratch.lock().unwrap_or_else(|e| e.into_inner());
                let scratch = guard.as_mut().expect("the NF4 scratch is allocated with the first NF4 weight");
                self.dequantize_nf4_into(q, scratch);
                self.stream.clone_dtoh(&scratch.slice(0..n))
            }
        };
        host.expect("CUDA download").into_iter().take(n).map(|x| x.to_f32()).collect()
    }
    fn weight_len(&self, w: &CudaWeight) -> usize {
        match w {
            CudaWeight::Bf16(s) => s.len(),
            CudaWeight::Nf4(q) => q.numel(),
        }
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) {
        let n = buf.len() as u64;
        let cfg = grid_for(buf.len());
        match buf {
            CudaBuf::F32(s) => launch!(self, "fill_f32", cfg, s, &n, &value),
            CudaBuf::Bf16(s) => launch!(self, "fill_bf16", cfg, s, &n, &value),
        }
    }
    fn copy_slice(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, len: usize) {
        if len == 0 {
            return;
        }
        match (src, dst) {
            (CudaBuf::F32(s), CudaBuf::F32(d)) => {
                self.stream.memcpy_dtod(&s.slice(src_off..src_off + len), &mut d.slice_mut(dst_off..dst_off + len))
            }
            (CudaBuf::Bf16(s), CudaBuf::Bf16(d)) => {
                self.stream.memcpy_dtod(&s.slice(src_off..src_off + len), &mut d.slice_mut(dst_off..dst_off + len))
            }
            _ => panic!("copy_slice: source and destination must share a storage type"),
        }
        .expect("CUDA device copy");
    }
    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) {
        let n = dst.len().min(src.len()) as u64;
        let cfg = grid_for(n as usize);
        match (dst, src) {
            (CudaBuf::F32(d), CudaBuf::F32(s)) => launch!(self, "add_assign_f32", cfg, d, s, &n),
            (CudaBuf::Bf16(d), CudaBuf::Bf16(s)) => launch!(self, "add_assign_bf16", cfg, d, s, &n),
            _ => panic!("add_assign: both buffers must share a storage type"),
        }
    }
    fn scale(&self, buf: &mut CudaBuf, s: f32) {
        let n = buf.len() as u64;
        let cfg = grid_for(buf.len());
        match buf {
            CudaBuf::F32(b) => launch!(self, "scale_f32", cfg, b, &n, &s),
            CudaBuf::Bf16(b) => launch!(self, "scale_bf16", cfg, b, &n, &s),
        }
    }
    fn sum_sq(&self, buf: &CudaBuf) -> f64 {
        // Chunks of 16384 as the CPU backend; partials in f64, then one block.
        const CHUNK: u64 = 16384;
        let n = buf.len() as u64;
        let count = n.div_ceil(CHUNK).max(1);
        let mut partials = self.stream.alloc_zeros::<f64>(count as usize).expect("CUDA allocation");
        let mut out = self.stream.alloc_zeros::<f64>(1).expect("CUDA allocation");
        let cfg = rows_grid(count as usize, BLOCK);
        match buf {
            CudaBuf::F32(s) => launch!(self, "sum_sq_partials_f32", cfg, s, &n, &CHUNK, &mut partials),
            CudaBuf::Bf16(s) => launch!(self, "sum_sq_partials_bf16", cfg, s, &n, &CHUNK, &mut partials),
        }
        launch!(self, "sum_sq_finalize_f64", rows_grid(1, BLOCK), &partials, &count, &mut out);
        self.stream.clone_dtoh(&out).expect("CUDA download")[0]
    }

    fn sum_sq_all(&self, bufs: &[&CudaBuf]) -> f64 {
        // Every buffer's chunk partials into one array, one final sum, one read.
        const CHUNK: u64 = 16384;
        let counts: Vec<u64> = bufs.iter().map(|b| (b.len() as u64).div_ceil(CHUNK).max(1)).collect();
        let total: u64 = counts.iter().sum();
        let mut partials = self.stream.alloc_zeros::<f64>(total.max(1) as usize).expect("CUDA allocation");
        let mut off = 0usize;
        for (buf, &count) in bufs.iter().zip(&counts) {
            let n = buf.len() as u64;
            let mut part = partials.slice_mut(off..off + count as usize);
            let cfg = rows_grid(count as usize, BLOCK);
            match buf {
                CudaBuf::F32(s) => launch!(self, "sum_sq_partials_f32", cfg, s, &n, &CHUNK, &mut part),
                CudaBuf::Bf16(s) => launch!(self, "sum_sq_partials_bf16", cfg, s, &n, &CHUNK, &mut part),
            }
            off += count as usize;
        }
        let mut out = self.stream.alloc_zeros::<f64>(1).expect("CUDA allocation");
        launch!(self, "sum_sq_finalize_f64", rows_grid(1, BLOCK), &partials, &total, &mut out);
        self.stream.clone_dtoh(&out).expect("CUDA download")[0]
    }

    fn embedding(&self, table: &CudaWeight, ids: &CudaSlice<i32>, out: &mut CudaBuf, n: usize, hidden: usize) {
        let table = table.dense("embedding");
        let (ni, hi, vocab) = (n as i32, hidden as i32, (table.len() / hidden.max(1)) as i32);
        let cfg = rows_grid(n, BLOCK);
        match out {
            CudaBuf::F32(o) => launch!(self, "embedding_fwd_f32", cfg, table, ids, o, &ni, &hi, &vocab),
            CudaBuf::Bf16(o) => launch!(self, "embedding_fwd_bf16", cfg, table, ids, o, &ni, &hi, &vocab),
        }
    }

    fn linear(&self, x: &CudaBuf, w: &CudaWeight, bias: Option<&CudaWeight>, y: &mut CudaBuf, shape: MatShape) {
        let MatShape { m, k, n } = shape;
        let xb = self.bf16_operand(x);
        let beta = match bias {
            Some(b) => {
                let b = b.dense("linear (bias)");
                // Rows of y start as the bias; the product accumulates onto them.
                let (mi, ni) = (m as i32, n as i32);
                let cfg = grid_for(m * n);
                match y {
                    CudaBuf::F32(yy) => launch!(self, "broadcast_rows_bf16_to_f32", cfg, b, yy, &mi, &ni),
                    CudaBuf::Bf16(yy) => launch!(self, "broadcast_rows_bf16_to_bf16", cfg, b, yy, &mi, &ni),
                }
                1.0
            }
            None => 0.0,
        };
        let c = out_operand(y, &self.stream);
        self.with_weight_operand(w, |wo| self.gemm(m, n, k, xb.op(), false, wo, true, c, 1.0, beta));
    }

    fn linear_backward_input(&self, dy: &CudaBuf, w: &CudaWeight, dx: &mut CudaBuf, shape: MatShape, acc: bool) {
        let MatShape { m, k, n } = shape;
        let dyb = self.bf16_operand(dy);
        let c = out_operand(dx, &self.stream);
        self.with_weight_operand(w, |wo| self.gemm(m, k, n, dyb.op(), false, wo, false, c, 1.0, if acc { 1.0 } else { 0.0 }));
    }

    fn lora_forward(&self, inputs: LoraInputs<'_, CudaBuf>, xa: &mut CudaBuf, y: &mut CudaBuf, shape: LoraShape) {
        let LoraInputs { x, a, b } = inputs;
        let LoraShape { m, k, n, r, scale, dropout } = shape;
        match dropout.filter(|d| d.p > 0.0) {
            // xa = dropout(x)·Aᵀ with the mask fused: no masked copy of x.
            Some(d) => {
                let (mi, ki, ri) = (m as i32, k as i32, r as i32);
                let cfg = rows_grid(m, FUSED_LORA_THREADS);
                let af = a.f32("lora A");
                match (x, &mut *xa) {
                    (CudaBuf::F32(x), CudaBuf::F32(o)) => launch!(self, "lora_xa_dropout_f32", cfg, x, af, o, &mi, &ki, &ri, &d.seed, &d.p),
                    (CudaBuf::Bf16(x), CudaBuf::Bf16(o)) => launch!(self, "lora_xa_dropout_bf16", cfg, x, af, o, &mi, &ki, &ri, &d.seed, &d.p),
                    _ => panic!("lora_forward: x and xa must share a storage type"),
                }
            }
            None => {
                let ab = self.bf16_operand(a);
                let xd = self.bf16_operand(x);
                let xa_op = out_operand(xa, &self.stream);
                self.gemm(m, r, k, xd.op(), false, ab.op(), true, xa_op, 1.0, 0.0);
            }
        }
        let bb = self.bf16_operand(b);
        let xab = self.bf16_operand(xa);
        let y_op = out_operand(y, &self.stream);
        self.gemm(m, n, r, xab.op(), false, bb.op(), true, y_op, scale, 1.0);
    }

    fn lora_backward(
        &self,
        dy: &CudaBuf,
        inputs: LoraInputs<'_, CudaBuf>,
        xa: &CudaBuf,
        grads: LoraGrads<'_, CudaBuf>,
        shape: LoraShape,
    ) {
        let LoraInputs { x, a, b } = inputs;
        let LoraGrads { dx, da, db } = grads;
        let LoraShape { m, k, n, r, scale, dropout } = shape;
        let dyb = self.bf16_operand(dy);
        let xab = self.bf16_operand(xa);
        let bb = self.bf16_operand(b);
        // dB[n, r] += s · dyᵀ · xa
        let db_op = out_operand(db, &self.stream);
        self.gemm(n, r, m, dyb.op(), true, xab.op(), false, db_op, scale, 1.0);
        // dxa[m, r] = s · dy · B   (bf16, an operand of the next two products)
        let mut dxa = self.alloc_bf16(m * r);
        let dxa_op = Operand { ptr: dxa.device_ptr_mut(&self.stream).0, dtype: blas_sys::cudaDataType::CUDA_R_16BF };
        self.gemm(m, r, n, dyb.op(), false, bb.op(), false, dxa_op, scale, 0.0);
        match dropout.filter(|d| d.p > 0.0) {
            None => {
                let ab = self.bf16_operand(a);
                let xd = self.bf16_operand(x);
                // dA[r, k] += dxaᵀ · x
                let da_op = out_operand(da, &self.stream);
                self.gemm(r, k, m, dxa_op, true, xd.op(), false, da_op, 1.0, 1.0);
                // dx[m, k] += dxa · A
                let dx_op = out_operand(dx, &self.stream);
                self.gemm(m, k, r, dxa_op, false, ab.op(), false, dx_op, 1.0, 1.0);
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
                let mut partials = unsafe { self.stream.alloc::<f32>(splits * r * k) }.expect("CUDA allocation (f32)");
                let cfg = LaunchConfig {
                    grid_dim: (k.div_ceil(FUSED_LORA_THREADS as usize) as u32, splits as u32, 1),
                    block_dim: (FUSED_LORA_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                match x {
                    CudaBuf::F32(x) => launch!(self, "lora_da_dropout_partials_f32", cfg, x, &dxa, &mut partials, &mi, &ki, &ri, &rows_per_split, &d.seed, &d.p),
                    CudaBuf::Bf16(x) => launch!(self, "lora_da_dropout_partials_bf16", cfg, x, &dxa, &mut partials, &mi, &ki, &ri, &rows_per_split, &d.seed, &d.p),
                }
                let splits_i = splits as i32;
                launch!(self, "lora_da_dropout_finalize_f32", grid_for(r * k), &partials, da.f32_mut("lora dA"), &ki, &ri, &splits_i);
                drop(partials);
                // dx[m, k] += mask ⊙ (dxa · A)
                let af = a.f32("lora A");
                let (n64, cfg) = ((m * k) as u64, fused_grid(m * k));
                match dx {
                    CudaBuf::F32(o) => launch!(self, "lora_dx_dropout_f32", cfg, &dxa, af, o, &n64, &ki, &ri, &d.seed, &d.p),
                    CudaBuf::Bf16(o) => launch!(self, "lora_dx_dropout_bf16", cfg, &dxa, af, o, &n64, &ki, &ri, &d.seed, &d.p),
                }
            }
        }
        drop(dxa);
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaWeight, y: &mut CudaBuf, inv: &mut CudaBuf, shape: NormShape, eps: f32) {
        let NormShape { rows, hidden } = shape;
        let w = w.dense("rmsnorm");
        let (ri, hi) = (rows as i32, hidden as i32);
        let inv = inv.f32_mut("rmsnorm inv_rms");
        let cfg = rows_grid(rows, BLOCK);
        match (x, y) {
            (CudaBuf::F32(x), CudaBuf::F32(y)) => launch!(self, "rmsnorm_fwd_f32", cfg, x, w, y, inv, &ri, &hi, &eps),
            (CudaBuf::Bf16(x), CudaBuf::Bf16(y)) => launch!(self, "rmsnorm_fwd_bf16", cfg, x, w, y, inv, &ri, &hi, &eps),
            _ => panic!("rmsnorm: x and y must share a storage type"),
        }
    }
    fn rmsnorm_backward(&self, dy: &CudaBuf, x: &CudaBuf, w: &CudaWeight, inv: &CudaBuf, dx: &mut CudaBuf, shape: NormShape) {
        let NormShape { rows, hidden } = shape;
        let w = w.dense("rmsnorm_backward");
        let (ri, hi) = (rows as i32, hidden as i32);
        let inv = inv.f32("rmsnorm_backward inv_rms");
        let cfg = rows_grid(rows, BLOCK);
        match (dy, x, dx) {
            (CudaBuf::F32(dy), CudaBuf::F32(x), CudaBuf::F32(dx)) => {
                launch!(self, "rmsnorm_bwd_f32", cfg, dy, x, w, inv, dx, &ri, &hi)
            }
            (CudaBuf::Bf16(dy), CudaBuf::Bf16(x), CudaBuf::Bf16(dx)) => {
                launch!(self, "rmsnorm_bwd_bf16", cfg, dy, x, w, inv, dx, &ri, &hi)
            }
            _ => panic!("rmsnorm_backward: dy, x and dx must share a storage type"),
        }
    }

    fn rope(&self, x: &mut CudaBuf, pos: &CudaSlice<i32>, inv_freq: &CudaBuf, shape: RopeShape) {
        self.rope_launch(variant!("rope_fwd", &*x), x, pos, inv_freq, shape);
    }
    fn rope_backward(&self, dx: &mut CudaBuf, pos: &CudaSlice<i32>, inv_freq: &CudaBuf, shape: RopeShape) {
        self.rope_launch(variant!("rope_bwd", &*dx), dx, pos, inv_freq, shape);
    }

    fn attention(
        &self,
        qkv: Qkv<'_, CudaBuf>,
        seqs: Varlen<'_, CudaSlice<i32>>,
        shape: AttnShape,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
    ) {
        attention::forward(self, qkv, seqs, shape, out, lse.f32_mut("attention lse"));
    }
    fn attention_backward(
        &self,
        dout: &CudaBuf,
        qkv: Qkv<'_, CudaBuf>,
        saved: AttnSaved<'_, CudaBuf>,
        seqs: Varlen<'_, CudaSlice<i32>>,
        shape: AttnShape,
        grads: QkvGrads<'_, CudaBuf>,
    ) {
        attention::backward(self, dout, qkv, saved, seqs, shape, grads);
    }
    fn decode_attention(&self, q: &CudaBuf, k_cache: &CudaBuf, v_cache: &CudaBuf, past: usize, shape: AttnShape, out: &mut CudaBuf) {
        attention::decode(self, q, k_cache, v_cache, past, shape, out);
    }

    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf, len: usize) {
        let n = len as u64;
        let cfg = grid_for(len);
        match (gate, up, out) {
            (CudaBuf::F32(g), CudaBuf::F32(u), CudaBuf::F32(o)) => launch!(self, "swiglu_fwd_f32", cfg, g, u, o, &n),
            (CudaBuf::Bf16(g), CudaBuf::Bf16(u), CudaBuf::Bf16(o)) => launch!(self, "swiglu_fwd_bf16", cfg, g, u, o, &n),
            _ => panic!("swiglu: buffers must share a storage type"),
        }
    }
    fn swiglu_backward(&self, dout: &CudaBuf, gate: &CudaBuf, up: &CudaBuf, dg: &mut CudaBuf, du: &mut CudaBuf, len: usize) {
        let n = len as u64;
        let cfg = grid_for(len);
        match (dout, gate, up, dg, du) {
            (CudaBuf::F32(d), CudaBuf::F32(g), CudaBuf::F32(u), CudaBuf::F32(dg), CudaBuf::F32(du)) => {
                launch!(self, "swiglu_bwd_f32", cfg, d, g, u, dg, du, &n)
            }
            (CudaBuf::Bf16(d), CudaBuf::Bf16(g), CudaBuf::Bf16(u), CudaBuf::Bf16(dg), CudaBuf::Bf16(du)) => {
                launch!(self, "swiglu_bwd_bf16", cfg, d, g, u, dg, du, &n)
            }
            _ => panic!("swiglu_backward: buffers must share a storage type"),
        }
    }

    fn cross_entropy(&self, logits: &mut CudaBuf, targets: &CudaSlice<i32>, losses: &mut CudaBuf, rows: usize, vocab: usize, grad_scale: Option<f32>) {
        let (ri, vi) = (rows as i32, vocab as i32);
        let (scale, write) = (grad_scale.unwrap_or(0.0), grad_scale.is_some() as i32);
        let losses = losses.f32_mut("cross_entropy losses");
        let cfg = rows_grid(rows, 1024);
        match logits {
            CudaBuf::F32(l) => launch!(self, "cross_entropy_f32", cfg, l, targets, losses, &ri, &vi, &scale, &write),
            CudaBuf::Bf16(l) => launch!(self, "cross_entropy_bf16", cfg, l, targets, losses, &ri, &vi, &scale, &write),
        }
    }

    fn adamw(&self, param: &mut CudaBuf, grad: &CudaBuf, m: &mut CudaBuf, v: &mut CudaBuf, hp: AdamW) {
        // The same scalars as the CPU reference (f64, cast to f32).
        let sc = hp.scalars();
        let (decay, step_size, bc2_sqrt) = (sc.decay, sc.step_size, sc.bias_c2_sqrt);
        let (one_m_b1, one_m_b2) = (sc.one_minus_beta1, sc.one_minus_beta2);
        let n = param.len() as u64;
        let cfg = grid_for(param.len());
        let (p, g) = (param.f32_mut("adamw param"), grad.f32("adamw grad"));
        let (mm, vv) = (m.f32_mut("adamw exp_avg"), v.f32_mut("adamw exp_avg_sq"));
        launch!(
            self, "adamw_f32", cfg, p, g, mm, vv, &n, &decay, &hp.beta1, &hp.beta2, &one_m_b1, &one_m_b2, &step_size,
            &bc2_sqrt, &hp.eps
        );
    }
}

impl CudaBackend {
    fn rope_launch(&self, name: &str, x: &mut CudaBuf, pos: &CudaSlice<i32>, inv_freq: &CudaBuf, shape: RopeShape) {
        let RopeShape { n, heads, head_dim: d } = shape;
        let (ni, hi, di) = (n as i32, heads as i32, d as i32);
        let inv = inv_freq.f32("rope inv_freq");
        let cfg = grid_for(n * d / 2);
        match x {
            CudaBuf::F32(s) => launch!(self, name, cfg, s, pos, inv, &ni, &hi, &di),
            CudaBuf::Bf16(s) => launch!(self, name, cfg, s, pos, inv, &ni, &hi, &di),
        }
    }
}
