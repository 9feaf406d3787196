//! Finding the GPU: whether the CUDA driver library is present at all
//! (cudarc panics on first use when it is not, so this is checked first),
//! and what the chosen device is.

use anyhow::{Context, Result, bail};
use cudarc::driver::{CudaContext, sys};
use std::sync::Arc;

/// Oldest driver that loads the committed PTX (ISA 8.4 = CUDA 12.4).
pub const MIN_DRIVER_VERSION: i32 = 12040;

#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: usize,
    pub free_bytes: usize,
    /// e.g. 12040 for 12.4.
    pub driver_version: i32,
    pub compute_capability: (i32, i32),
}

impl GpuInfo {
    pub fn driver_string(&self) -> String {
        format!("{}.{}", self.driver_version / 1000, (self.driver_version % 1000) / 10)
    }
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}), {:.1} GiB ({:.1} GiB free), driver CUDA {}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_bytes as f64 / (1u64 << 30) as f64,
            self.free_bytes as f64 / (1u64 << 30) as f64,
            self.driver_string()
        )
    }
}

/// Whether libcuda can be loaded (no panic when it cannot).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { sys::is_culib_present() }
}

/// Number of visible GPUs; 0 when there is no driver.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
}

fn driver_version() -> Result<i32> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (checked by the caller) and the
    // pointer is to a live c_int.
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuDriverGetVersion failed: {r:?}");
    }
    Ok(v)
}

/// Open device `ordinal`, with one clear error for each way it can fail.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, GpuInfo)> {
    if !driver_present() {
        bail!(
            "no CUDA driver found (libcuda.so could not be loaded); install the NVIDIA driver (>= 550) \
             or run with --device cpu"
        );
    }
    let version = driver_version()?;
    if version < MIN_DRIVER_VERSION {
        bail!(
            "the NVIDIA driver supports CUDA {}.{}, ferrotune's kernels need CUDA 12.4 (driver >= 550); \
             update the driver or run with --device cpu",
            version / 1000,
            (version % 1000) / 10
        );
    }
    let count = CudaContext::device_count().map_err(|e| anyhow::anyhow!("cannot count CUDA devices: {e:?}"))?;
    if count <= 0 {
        bail!("the CUDA driver sees no GPU; run with --device cpu");
    }
    if ordinal >= count as usize {
        // The caller names the --device value; this says what exists.
        if count == 1 {
            bail!("there is only one GPU, cuda:0");
        }
        bail!("there are only {count} GPUs (cuda:0 .. cuda:{})", count - 1);
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow::anyhow!("cannot create a CUDA context on cuda:{ordinal}: {e:?}"))?;
    let name = ctx.name().map_err(|e| anyhow::anyhow!("{e:?}")).context("reading the GPU name")?;
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(|e| anyhow::anyhow!("{e:?}")).context("reading GPU memory")?;
    let compute_capability = ctx.compute_capability().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if compute_capability.0 < 8 {
        bail!(
            "{name} has compute capability {}.{}; ferrotune's kernels need sm_80 or newer (A100, RTX 30xx/40xx, H100); \
             run with --device cpu",
            compute_capability.0,
            compute_capability.1
        );
    }
    let info = GpuInfo { ordinal, name, total_bytes, free_bytes, driver_version: version, compute_capability };
    Ok((ctx, info))
}

/// Dense bf16 peak in TFLOP/s for GPUs we know (SPECS: performance
/// accounting), for MFU. None for unknown ones.
pub fn dense_bf16_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_lowercase();
    let table: &[(&str, f64)] = &[
        ("h200", 989.0),
        ("h100", 989.0),
        ("gh200", 989.0),
        ("a100", 312.0),
        ("a800", 312.0),
        ("rtx 4090", 165.0),
        ("l40s", 362.0),
        ("a10g", 70.0),
        ("rtx 3090", 71.0),
    ];
    table.iter().find(|(k, _)| n.contains(k)).map(|(_, v)| *v)
}

/// Peak HBM bandwidth in TB/s for GPUs we know (SPECS: performance
/// accounting), for the share of bandwidth a memory-bound kernel reaches.
/// None for unknown ones.
pub fn hbm_bandwidth_tb_s(name: &str) -> Option<f64> {
    let n = name.to_ascii_lowercase();
    let table: &[(&str, f64)] = &[("h200", 4.8), ("gh200", 4.0), ("h100", 3.35), ("a100", 2.0), ("a800", 2.0), ("rtx 4090", 1.0)];
    table.iter().find(|(k, _)| n.contains(k)).map(|(_, v)| *v)
}
