//! `ferrotune env`: what a bug report needs, with or without a GPU. The
//! version and commit, the OS and CPU, the GPUs and driver, the CUDA
//! libraries found (and every place looked in), the embedded kernels, the
//! attention and GEMM paths a run takes, and the cache folders. Also the
//! start-up lines a run prints on a GPU ([`gpu_paths`], [`single_gpu_note`]).
//! A new fact is a new key of the JSON object [`collect`] builds, and a line
//! of [`text`], which prints the report from that object.

use crate::backend::cuda::device::{self, GpuInfo};
use crate::backend::cuda::libs::{self, CUBLAS, CUDA_MAJOR, NVRTC, WANTED};
use crate::backend::cuda::ATTENTION_SUMMARY;
use crate::kernels;
use anyhow::Result;
use clap::Args;
use serde_json::{Value, json};

#[derive(Args)]
pub struct EnvArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The PTX ISA versions and sm targets the embedded modules declare, and
/// how many modules and kernels there are.
fn kernel_facts() -> (Vec<String>, Vec<String>, usize, usize) {
    let (mut isa, mut targets, mut entries) = (Vec::new(), Vec::new(), 0);
    for (_, ptx) in kernels::PTX {
        for line in ptx.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix(".version ") {
                isa.push(v.trim().to_string());
            } else if let Some(t) = line.strip_prefix(".target ") {
                targets.extend(t.split(',').map(|s| s.trim().to_string()));
            } else if line.starts_with(".visible .entry ") {
                entries += 1;
            }
        }
    }
    for v in [&mut isa, &mut targets] {
        v.sort();
        v.dedup();
    }
    (isa, targets, kernels::PTX.len(), entries)
}

/// "cuBLAS 12.4.5.8 (/path/libcublas.so.12)", from the loaded libraries.
fn cublas_words() -> String {
    match libs::load() {
        Ok(l) => {
            let c = &l.search.libs[CUBLAS];
            let path = c.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            match c.version() {
                Some(v) => format!("cuBLAS {v} ({path})"),
                None => format!("cuBLAS ({path})"),
            }
        }
        Err(_) => "cuBLAS (not loaded)".into(),
    }
}

/// The GEMM path, for the device line. The attention path depends on the
/// model's head_dim: `train` and `bench` print it on a line of its own once
/// the model is read.
pub fn gpu_paths() -> String {
    format!("GEMM: {}, bf16 with f32 accumulation", cublas_words())
}

/// When several GPUs are visible: which one ferrotune trains on and how to
/// pick another (it is single-GPU by design).
pub fn single_gpu_note(ordinal: usize) -> Option<String> {
    let count = device::device_count();
    (count > 1).then(|| {
        format!(
            "note: {count} GPUs are visible; ferrotune trains on one, cuda:{ordinal}; pick another with --device cuda:N \
             (N < {count}) or CUDA_VISIBLE_DEVICES"
        )
    })
}

fn os_words() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string());
    let mut out = format!("{} {}", std::env::consts::OS, std::env::consts::ARCH);
    if let Some(p) = pretty {
        out = format!("{p}, {out}");
    }
    if let Some(k) = kernel {
        out += &format!(", kernel {k}");
    }
    out
}

fn gpu_json(info: &GpuInfo) -> Value {
    json!({
        "ordinal": info.ordinal,
        "name": info.name,
        "compute_capability": format!("{}.{}", info.compute_capability.0, info.compute_capability.1),
        "total_bytes": info.total_bytes,
        "free_bytes": info.free_bytes,
        "driver_cuda": info.driver_string(),
        "supported": info.usable(),
        "not_usable": info.refusal(),
    })
}

/// Everything `ferrotune env` reports, as the JSON `--json` prints.
fn collect() -> Value {
    // Every place, the spawned ones too, before load() searches as needed.
    let search = libs::the_full_search();
    let loaded: Result<(), String> = libs::load().map(|_| ());
    // The GPUs: with the driver loaded (even when cuBLAS is missing).
    let driver_ok = loaded.is_ok() || libs::load_driver(search).is_ok();
    let mut gpus = Vec::new();
    let mut gpu_error = None;
    if driver_ok {
        match device::count_loaded() {
            Ok(n) => {
                for i in 0..n {
                    match device::probe(i) {
                        Ok(info) => gpus.push(info),
                        Err(e) => gpu_error = Some(format!("cuda:{i}: {e:#}")),
                    }
                }
            }
            Err(e) => gpu_error = Some(format!("{e:#}")),
        }
    }
    let driver_version = if driver_ok { device::driver_version().ok() } else { None };
    let libraries: Vec<Value> = WANTED
        .iter()
        .zip(&search.libs)
        .enumerate()
        .map(|(i, (w, l))| {
            json!({
                "soname": w.soname(),
                "what": w.what,
                "path": l.path.as_ref().map(|p| p.display().to_string()),
                "version": l.version(),
                "already_loaded": l.preloaded,
                "needed": w.required,
                "other_cuda_majors": l.other_majors.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "note": (i == NVRTC).then_some("not needed to train: the kernels are embedded as PTX"),
            })
        })
        .collect();
    let places: Vec<Value> = search
        .places
        .iter()
        .map(|p| json!({"source": p.source, "dirs": p.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(), "note": p.note}))
        .collect();
    let (isa, targets, modules, entries) = kernel_facts();
    // What --device auto does here: cuda:0 whenever the driver sees a GPU.
    let on_this_machine = match gpus.first() {
        None => "--device auto trains on the CPU reference backend".to_string(),
        Some(_) if loaded.is_err() => format!("--device auto stops: {}", loaded.as_ref().err().cloned().unwrap_or_default()),
        Some(g) if !g.usable() => format!("--device auto stops: {g} is not usable: {}", g.refusal().unwrap_or_default()),
        Some(g) => format!("--device auto trains on {g}"),
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let hf = crate::hub::HubEnv::from_env().cache.display().to_string();
    let datasets = crate::data::cache::default_dir(None).map(|p| p.display().to_string());
    json!({
        "ferrotune": env!("CARGO_PKG_VERSION"),
        // option_env: a build whose build script set no hash still compiles.
        "git": option_env!("FERROTUNE_GIT_HASH").unwrap_or("unknown"),
        "cuda_build": CUDA_MAJOR,
        "os": os_words(),
        "cpu_threads": threads,
        "rayon_threads": rayon::current_num_threads(),
        "cuda_visible_devices": std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        "driver": {
            "found": driver_ok,
            "cuda_version": driver_version.map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10)),
            "error": loaded.as_ref().err(),
        },
        "gpus": gpus.iter().map(gpu_json).collect::<Vec<_>>(),
        "gpu_error": gpu_error,
        "libraries": libraries,
        "searched": places,
        "kernels": {"modules": modules, "kernels": entries, "ptx_isa": isa, "targets": targets},
        "paths": {
            "attention": ATTENTION_SUMMARY,
            "gemm_gpu": "cuBLAS cublasGemmEx, bf16 inputs with f32 accumulation",
            "cpu": "CPU reference backend: f32, the gemm crate, rayon threads",
            "on_this_machine": on_this_machine,
        },
        "caches": {"huggingface_hub": hf, "prepared_datasets": datasets},
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// The report as text, written at once by [`run`].
fn text(j: &Value) -> String {
    let mut o = String::new();
    macro_rules! p {
        ($($t:tt)*) => {{
            o.push_str(&format!($($t)*));
            o.push('\n');
        }};
    }
    p!("ferrotune {} (git {}), built for CUDA {}", s(&j["ferrotune"]), s(&j["git"]), j["cuda_build"]);
    p!("OS: {}", s(&j["os"]));
    p!("CPU: {} threads (rayon uses {})", j["cpu_threads"], j["rayon_threads"]);
    p!("");
    p!("GPUs:");
    let driver = &j["driver"];
    if driver["found"] == Value::Bool(true) {
        p!("  driver: CUDA {}", s(&driver["cuda_version"]));
        let gpus = j["gpus"].as_array().cloned().unwrap_or_default();
        if gpus.is_empty() {
            p!("  the driver sees no GPU");
        }
        for g in gpus {
            let gib = |k: &str| g[k].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64;
            p!(
                "  cuda:{} {} (compute capability {}), {:.1} GiB ({:.1} GiB free){}",
                g["ordinal"],
                s(&g["name"]),
                s(&g["compute_capability"]),
                gib("total_bytes"),
                gib("free_bytes"),
                if g["supported"] == Value::Bool(true) { String::new() } else { format!(" — not usable: {}", s(&g["not_usable"])) }
            );
        }
        if !j["gpu_error"].is_null() {
            p!("  error: {}", s(&j["gpu_error"]));
        }
        if !driver["error"].is_null() {
            p!("  cannot train on it: {}", s(&driver["error"]));
        }
    } else {
        p!("  no CUDA driver found (libcuda.so.1): the CPU backend runs; places searched are listed below");
    }
    p!("  CUDA_VISIBLE_DEVICES: {}", if j["cuda_visible_devices"].is_null() { "unset".into() } else { s(&j["cuda_visible_devices"]) });
    p!("");
    p!("CUDA libraries (this build needs CUDA {}):", j["cuda_build"]);
    for l in j["libraries"].as_array().into_iter().flatten() {
        let mut line = format!("  {:<18} ", s(&l["soname"]));
        if l["path"].is_null() {
            line += if l["needed"] == Value::Bool(true) { "NOT FOUND" } else { "not found" };
        } else {
            line += &s(&l["path"]);
            if !l["version"].is_null() {
                line += &format!(" ({})", s(&l["version"]));
            }
        }
        if let Some(o) = l["other_cuda_majors"].as_array().filter(|o| !o.is_empty()) {
            let o: Vec<String> = o.iter().map(s).collect();
            line += &format!("; another CUDA major: {}", o.join(", "));
        }
        if !l["note"].is_null() {
            line += &format!(" [{}]", s(&l["note"]));
        }
        p!("{line}");
    }
    p!("  searched, in order:");
    for p in j["searched"].as_array().into_iter().flatten() {
        let dirs: Vec<String> = p["dirs"].as_array().into_iter().flatten().map(s).collect();
        let what = if dirs.is_empty() { format!("({})", s(&p["note"])) } else { dirs.join(", ") };
        p!("    {}: {what}", s(&p["source"]));
    }
    p!("");
    let k = &j["kernels"];
    let list = |v: &Value| v.as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(", ");
    p!(
        "Kernels: {} PTX modules, {} kernels; PTX ISA {}, target {} (the driver JIT-compiles them for newer GPUs)",
        k["modules"],
        k["kernels"],
        list(&k["ptx_isa"]),
        list(&k["targets"])
    );
    let p = &j["paths"];
    p!("Paths:");
    p!("  attention (GPU): {}", s(&p["attention"]));
    p!("  GEMM (GPU): {}", s(&p["gemm_gpu"]));
    p!("  CPU: {}", s(&p["cpu"]));
    p!("  on this machine: {}", s(&p["on_this_machine"]));
    p!("");
    p!("Caches:");
    p!("  HuggingFace hub: {} (HF_HUB_CACHE, HF_HOME)", s(&j["caches"]["huggingface_hub"]));
    p!("  prepared datasets: {} (dataset_prepared_path in a config overrides)", s(&j["caches"]["prepared_datasets"]));
    o
}

pub fn run(a: EnvArgs) -> Result<()> {
    let report = collect();
    let out = if a.json { serde_json::to_string_pretty(&report)? + "\n" } else { text(&report) };
    // Often piped into head or grep: a closed pipe is not an error.
    match std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
