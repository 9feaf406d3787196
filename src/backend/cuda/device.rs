//! Finding the GPU: whether the CUDA driver library is present at all
//! (cudarc panics on first use when it is not, so src/backend/cuda/libs.rs
//! finds and loads it first), and what the chosen device is. Every cudarc
//! call of the start-up runs inside [`guarded`], so a panic in cudarc (a
//! missing symbol, say) becomes an error.

use super::libs;
use anyhow::{Context, Result, bail};
use cudarc::driver::{CudaContext, sys};
use std::sync::{Arc, Once};

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

/// Why a driver of CUDA `version` (12040 for 12.4) cannot run ferrotune's
/// kernels, with what to do; None when it can.
pub fn driver_refusal(version: i32) -> Option<String> {
    (version < MIN_DRIVER_VERSION).then(|| {
        format!(
            "the NVIDIA driver supports CUDA {}.{}, ferrotune's kernels need CUDA 12.4 (driver >= 550); \
             update the driver or run with --device cpu",
            version / 1000,
            (version % 1000) / 10
        )
    })
}

impl GpuInfo {
    pub fn driver_string(&self) -> String {
        format!("{}.{}", self.driver_version / 1000, (self.driver_version % 1000) / 10)
    }

    /// Why ferrotune cannot train on this GPU (a driver older than 550, a
    /// GPU before sm_80), with what to do; None when it can. The one place
    /// these requirements are written.
    pub fn refusal(&self) -> Option<String> {
        let (major, minor) = self.compute_capability;
        driver_refusal(self.driver_version).or_else(|| {
            (major < 8).then(|| {
                format!(
                    "{} has compute capability {major}.{minor}; ferrotune's kernels need sm_80 or newer (A100, RTX 30xx/40xx, H100); \
                     run with --device cpu",
                    self.name
                )
            })
        })
    }

    pub fn usable(&self) -> bool {
        self.refusal().is_none()
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

/// Runs `f`, turning a panic into an error that starts with `what` (cudarc
/// panics where a library or symbol is missing). The panic hook stays quiet
/// for panics of this thread inside the call, so no "panicked at" text
/// reaches the user; other threads' panics are reported as usual.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    thread_local! {
        // How many guarded calls this thread is inside (they nest).
        static QUIET: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    static WRAP_HOOK: Once = Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(|q| q.get()) == 0 {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(q.get() + 1));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get() - 1));
    r.map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        anyhow::anyhow!("{what}: {}", msg.unwrap_or_else(|| "the CUDA library failed".into()).replace('\n', " "))
    })
}

/// Whether the CUDA driver was found and loaded (no panic when not), even
/// if cuBLAS was not: `--device auto` then picks the GPU and its start-up
/// says what is missing instead of falling back to the CPU in silence.
pub fn driver_present() -> bool {
    libs::load().is_ok() || libs::load_driver(libs::the_search()).is_ok()
}

/// Number of visible GPUs; 0 when there is no driver or it cannot count.
pub fn device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    count_loaded().unwrap_or(0)
}

/// Whether `--device auto` should take cuda:0: a GPU is visible, or the
/// driver is there but cannot even count them (then opening cuda:0 says
/// why, instead of a silent fall back to the CPU). Without a driver found by
/// cheap means the answer is the CPU at once: a machine without a GPU runs
/// no program to find out.
pub fn auto_picks_gpu() -> bool {
    libs::driver_cheaply_found() && driver_present() && count_loaded().map(|n| n > 0).unwrap_or(true)
}

/// The driver's CUDA version (12040 for 12.4).
pub fn driver_version() -> Result<i32> {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (checked by the caller) and the
    // pointer is to a live c_int.
    let r = guarded("reading the driver version", || unsafe { sys::cuDriverGetVersion(&mut v) })?;
    if r != sys::CUresult::CUDA_SUCCESS {
        bail!("cuDriverGetVersion failed: {r:?}");
    }
    Ok(v)
}

/// Open device `ordinal`, with one clear error for each way it can fail.
pub fn open(ordinal: usize) -> Result<(Arc<CudaContext>, GpuInfo)> {
    libs::load().map_err(|e| anyhow::anyhow!(e))?;
    guarded("starting the CUDA driver", || open_loaded(ordinal))?
}

/// [`open`] once the libraries are loaded.
fn open_loaded(ordinal: usize) -> Result<(Arc<CudaContext>, GpuInfo)> {
    let version = driver_version()?;
    // Before counting: an old driver may not even count the GPUs right.
    if let Some(why) = driver_refusal(version) {
        bail!(why);
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
    let (ctx, info) = probe_loaded(ordinal, version)?;
    if let Some(why) = info.refusal() {
        bail!(why);
    }
    Ok((ctx, info))
}

/// What GPU `ordinal` is, without [`open`]'s refusals (for `ferrotune env`;
/// the caller has loaded the driver).
pub fn probe(ordinal: usize) -> Result<GpuInfo> {
    guarded("reading the GPU", || probe_loaded(ordinal, driver_version()?).map(|(_, info)| info))?
}

/// Number of visible GPUs once the caller has loaded the driver.
pub fn count_loaded() -> Result<usize> {
    let n = guarded("counting CUDA devices", CudaContext::device_count)?.map_err(|e| anyhow::anyhow!("cannot count CUDA devices: {e:?}"))?;
    Ok(n.max(0) as usize)
}

fn probe_loaded(ordinal: usize, driver_version: i32) -> Result<(Arc<CudaContext>, GpuInfo)> {
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow::anyhow!("cannot create a CUDA context on cuda:{ordinal}: {e:?}"))?;
    let name = ctx.name().map_err(|e| anyhow::anyhow!("{e:?}")).context("reading the GPU name")?;
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(|e| anyhow::anyhow!("{e:?}")).context("reading GPU memory")?;
    let compute_capability = ctx.compute_capability().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let info = GpuInfo { ordinal, name, total_bytes, free_bytes, driver_version, compute_capability };
    Ok((ctx, info))
}

/// Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, as the vendor
/// publishes it, for GPUs we know; the denominator of MFU. None for unknown
/// ones.
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

/// Peak memory (HBM / GDDR) bandwidth in TB/s, as the vendor publishes it,
/// for GPUs we know; the denominator of the share of bandwidth a
/// memory-bound kernel reaches. None for unknown ones.
pub fn hbm_bandwidth_tb_s(name: &str) -> Option<f64> {
    let n = name.to_ascii_lowercase();
    let table: &[(&str, f64)] = &[("h200", 4.8), ("gh200", 4.0), ("h100", 3.35), ("a100", 2.0), ("a800", 2.0), ("rtx 4090", 1.0)];
    table.iter().find(|(k, _)| n.contains(k)).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::{GpuInfo, guarded};

    #[test]
    fn a_gpu_is_usable_from_sm_80_with_a_driver_of_cuda_12_4() {
        let gpu = |driver_version, compute_capability| GpuInfo {
            ordinal: 0,
            name: "Test GPU".into(),
            total_bytes: 0,
            free_bytes: 0,
            driver_version,
            compute_capability,
        };
        assert!(gpu(12040, (8, 0)).usable());
        assert!(gpu(13000, (12, 0)).usable());
        let old_driver = gpu(12020, (9, 0)).refusal().unwrap();
        assert!(old_driver.starts_with("the NVIDIA driver supports CUDA 12.2, ferrotune's kernels need CUDA 12.4 (driver >= 550)"), "{old_driver}");
        let turing = gpu(12040, (7, 5)).refusal().unwrap();
        assert!(turing.starts_with("Test GPU has compute capability 7.5; ferrotune's kernels need sm_80 or newer"), "{turing}");
        assert!(!gpu(12040, (7, 5)).usable());
    }

    #[test]
    fn a_panic_inside_guarded_is_an_error() {
        let outer = guarded("outer", || guarded("inner", || -> u32 { panic!("no symbol {}", "cuFoo") }));
        let inner = outer.expect("the inner guard caught it");
        assert_eq!(inner.unwrap_err().to_string(), "inner: no symbol cuFoo");
        let e = guarded("starting", || -> u32 { panic!("static text\nsecond line") }).unwrap_err();
        assert_eq!(e.to_string(), "starting: static text second line");
        assert_eq!(guarded("fine", || 7).unwrap(), 7);
        // Outside a guard a panic unwinds as before.
        assert!(std::panic::catch_unwind(|| panic!("outside")).is_err());
    }
}
