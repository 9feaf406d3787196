//! GPU start-up and `ferrotune env` against the SIMT emulator's fake driver
//! and cuBLAS (cuda/emu/README.md). Each case runs the ferrotune binary with
//! a cleared environment in which only folders built here hold (links to)
//! some of the emulated libraries, laid out as a toolkit, a venv's nvidia-*
//! wheels or a bare LD_LIBRARY_PATH folder. Every failure must be one
//! `error:` line naming the library and the places searched: exit status 1,
//! never a panic (101) or a backtrace.

// Only the builder of common/cuda_emu.rs is used here, not its in-process loader.
#[allow(dead_code)]
#[path = "common/cuda_emu.rs"]
mod cuda_emu;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator's libcuda.so and libcublas.so.
fn emu(file: &str) -> PathBuf {
    cuda_emu::lib_dir().unwrap_or_else(|e| panic!("cannot build the SIMT emulator: {e}")).join(file)
}

/// Links `name` in `dir` (created) to the emulator's `file`.
fn link(dir: &Path, name: &str, file: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::symlink(emu(file), dir.join(name)).unwrap();
}

/// Whether this machine has `soname` where the search always looks (the
/// loader cache, /usr/local/cuda): then a case that wants it missing cannot
/// make it so, and is skipped with a note.
fn system_has(soname: &str) -> bool {
    let cache = Command::new("/sbin/ldconfig").arg("-p").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let usr_local = std::fs::read_dir("/usr/local")
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().starts_with("cuda") && e.path().join("lib64").join(soname).exists()))
        .unwrap_or(false);
    cache.contains(&format!("{soname} ")) || usr_local
}

/// Says that `case` was skipped and why on the test's stderr, past the
/// harness's capture (which would hide an `eprintln!` of a passing test), so
/// a machine where a case cannot run shows it, as an ignored test does.
fn skipped(case: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {case}: {why}");
}

/// Runs ferrotune in `cwd` with only `env` set (PATH an empty folder, so no
/// python3 is asked); returns the exit code and stdout + stderr.
fn ferrotune(cwd: &Path, args: &[&str], env: &[(&str, &Path)], knobs: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrotune"));
    let no_programs = cwd.join("empty-bin");
    std::fs::create_dir_all(&no_programs).unwrap();
    cmd.env_clear().current_dir(cwd).args(args).env("HOME", cwd).env("PATH", no_programs);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in knobs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run ferrotune");
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

const BENCH: &[&str] = &["bench", "--device", "cuda", "--preset", "tiny", "--seq-len", "16", "--steps", "1", "--warmup", "0"];

/// A refused start-up: exit 1, one `error:` line, no panic, containing `want`.
fn assert_refused(case: &str, (code, log): &(Option<i32>, String), want: &[&str]) {
    assert_eq!(*code, Some(1), "{case}: expected a normal error exit:\n{log}");
    assert!(!log.contains("panicked") && !log.contains("RUST_BACKTRACE"), "{case}: a panic escaped:\n{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{case}: expected one error line:\n{log}");
    for w in want {
        assert!(errors[0].contains(w), "{case}: expected {w:?} in:\n{}", errors[0]);
    }
}

#[test]
fn a_missing_or_wrong_cublas_is_one_error_naming_it_and_every_place_searched() {
    if system_has("libcublas.so.12") {
        skipped(
            "a_missing_or_wrong_cublas_is_one_error_naming_it_and_every_place_searched",
            "this machine has its own libcublas.so.12 in the loader cache or /usr/local/cuda, so it cannot be made missing",
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let only_driver = t.path().join("driver");
    link(&only_driver, "libcuda.so", "libcuda.so");
    let home = t.path().join("toolkit");
    std::fs::create_dir_all(home.join("lib64")).unwrap();

    let missing = ferrotune(t.path(), BENCH, &[("LD_LIBRARY_PATH", &only_driver), ("CUDA_HOME", &home)], &[]);
    let searched_ld = format!("searched: LD_LIBRARY_PATH ({})", only_driver.display());
    let searched_home = format!("CUDA_HOME ({}", home.join("lib64").display());
    assert_refused(
        "no libcublas",
        &missing,
        &["--device cuda: libcublas.so.12 (cuBLAS) not found", "pip install nvidia-cublas-cu12", &searched_ld, &searched_home, "VIRTUAL_ENV (unset)", "loader cache"],
    );

    // Only CUDA 13's cuBLAS: named, with what to do.
    let wrong = t.path().join("cuda13");
    link(&wrong, "libcuda.so", "libcuda.so");
    link(&wrong, "libcublas.so.13", "libcublas.so");
    let found = format!("found {}, another CUDA major version: this build needs CUDA 12's", wrong.join("libcublas.so.13").display());
    assert_refused("only libcublas.so.13", &ferrotune(t.path(), BENCH, &[("LD_LIBRARY_PATH", &wrong)], &[]), &["libcublas.so.12 (cuBLAS) not found", &found]);

    // A file by the right name that is not a library.
    let broken = t.path().join("broken");
    link(&broken, "libcuda.so", "libcuda.so");
    std::fs::write(broken.join("libcublas.so.12"), b"not a library").unwrap();
    let cannot = format!("cannot load libcublas.so.12 (cuBLAS) from {}", broken.join("libcublas.so.12").display());
    assert_refused("a broken libcublas.so.12", &ferrotune(t.path(), BENCH, &[("LD_LIBRARY_PATH", &broken)], &[]), &[&cannot]);

    // A library by the right name without cuBLAS in it.
    let impostor = t.path().join("impostor");
    link(&impostor, "libcuda.so", "libcuda.so");
    link(&impostor, "libcublas.so.12", "libcuda.so");
    let not_cublas = format!("--device cuda: {} is not cuBLAS: it does not export cublasCreate_v2", impostor.join("libcublas.so.12").display());
    assert_refused("a libcublas.so.12 without cuBLAS", &ferrotune(t.path(), BENCH, &[("LD_LIBRARY_PATH", &impostor)], &[]), &[&not_cublas]);

    // --device auto with the driver but no cuBLAS says so instead of quietly training on the CPU.
    let mut auto = BENCH.to_vec();
    auto[2] = "auto";
    assert_refused("auto without cuBLAS", &ferrotune(t.path(), &auto, &[("LD_LIBRARY_PATH", &only_driver)], &[]), &["a GPU is visible but could not be used", "libcublas.so.12 (cuBLAS) not found"]);
}

#[test]
fn cublas_is_found_in_a_venvs_nvidia_wheels_and_the_start_up_line_names_the_paths() {
    let t = tempfile::tempdir().unwrap();
    let driver = t.path().join("driver");
    link(&driver, "libcuda.so", "libcuda.so");
    let venv = t.path().join("venv");
    let wheel = venv.join("lib/python3.11/site-packages/nvidia/cublas/lib");
    link(&wheel, "libcublas.so.12", "libcublas.so");
    let (code, log) = ferrotune(t.path(), BENCH, &[("LD_LIBRARY_PATH", &driver), ("VIRTUAL_ENV", &venv)], &[("FERROTUNE_SIMT_DEVICE_COUNT", "2")]);
    assert_eq!(code, Some(0), "{log}");
    let device = log.lines().find(|l| l.starts_with("device:")).unwrap_or_else(|| panic!("no device line:\n{log}"));
    let cublas = format!("GEMM: cuBLAS ({})", wheel.join("libcublas.so.12").display());
    for part in ["cuda:0 SIMT emulator", &cublas] {
        assert!(device.contains(part), "device line lacks {part:?}: {device}");
    }
    // Attention is told once, for the model's head_dim: the tiny preset's 16
    // has no tensor-core kernel, said, not hidden.
    assert!(!device.contains("attention"), "the device line describes attention too: {device}");
    let attention: Vec<&str> = log.lines().filter(|l| l.contains("attention")).collect();
    assert_eq!(attention.len(), 1, "{log}");
    assert!(attention[0].starts_with("attention: flash attention, fused, generic kernel without tensor cores (head_dim 16;"), "{log}");
    assert!(
        log.contains("note: 2 GPUs are visible; ferrotune trains on one, cuda:0; pick another with --device cuda:N (N < 2) or CUDA_VISIBLE_DEVICES"),
        "{log}"
    );
}

#[test]
fn an_old_driver_and_an_old_gpu_are_refused_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("lib");
    link(&dir, "libcuda.so", "libcuda.so");
    link(&dir, "libcublas.so.12", "libcublas.so");
    let env = [("LD_LIBRARY_PATH", dir.as_path())];
    let old = ferrotune(t.path(), BENCH, &env, &[("FERROTUNE_SIMT_DRIVER_VERSION", "12020")]);
    assert_refused("driver 12.2", &old, &["the NVIDIA driver supports CUDA 12.2, ferrotune's kernels need CUDA 12.4 (driver >= 550)"]);
    let turing = ferrotune(t.path(), BENCH, &env, &[("FERROTUNE_SIMT_COMPUTE_CAPABILITY", "75")]);
    assert_refused("sm_75", &turing, &["has compute capability 7.5; ferrotune's kernels need sm_80 or newer"]);
}

#[test]
fn env_names_the_emulated_gpu_and_the_libraries_it_loaded() {
    let t = tempfile::tempdir().unwrap();
    let driver = t.path().join("driver");
    link(&driver, "libcuda.so", "libcuda.so");
    let home = t.path().join("cuda-12.4");
    link(&home.join("lib64"), "libcublas.so.12", "libcublas.so");
    let env = [("LD_LIBRARY_PATH", driver.as_path()), ("CUDA_HOME", home.as_path())];
    let (code, text) = ferrotune(t.path(), &["env"], &env, &[]);
    assert_eq!(code, Some(0), "{text}");
    for part in [
        "driver: CUDA 12.4",
        "cuda:0 SIMT emulator (host CPU) (compute capability 9.0), 64.0 GiB",
        &format!("libcublas.so.12    {}", home.join("lib64/libcublas.so.12").display()),
        "on this machine: --device auto trains on cuda:0 SIMT emulator",
    ] {
        assert!(text.contains(part), "env lacks {part:?}:\n{text}");
    }
    let (code, json) = ferrotune(t.path(), &["env", "--json"], &env, &[]);
    assert_eq!(code, Some(0), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("env --json is not JSON ({e}):\n{json}"));
    assert_eq!(v["gpus"][0]["name"], "SIMT emulator (host CPU)");
    assert_eq!(v["gpus"][0]["compute_capability"], "9.0");
    assert_eq!(v["driver"]["cuda_version"], "12.4");
    assert_eq!(v["libraries"][2]["path"], home.join("lib64/libcublas.so.12").display().to_string());

    // A GPU ferrotune cannot use is still listed, with what auto would do.
    let (code, text) = ferrotune(t.path(), &["env"], &env, &[("FERROTUNE_SIMT_COMPUTE_CAPABILITY", "75")]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("(compute capability 7.5), 64.0 GiB (64.0 GiB free) — not usable: SIMT emulator (host CPU) has compute capability 7.5; ferrotune's kernels need sm_80 or newer"),
        "{text}"
    );
    assert!(text.contains("on this machine: --device auto stops: cuda:0 SIMT emulator (host CPU) (sm_75)"), "{text}");
    // And with the driver but no cuBLAS: the GPU, and why it cannot train.
    let (code, text) = ferrotune(t.path(), &["env"], &[("LD_LIBRARY_PATH", driver.as_path())], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("cuda:0 SIMT emulator (host CPU) (compute capability 9.0)"), "{text}");
    if system_has("libcublas.so.12") {
        skipped("env_names_the_emulated_gpu_and_the_libraries_it_loaded (driver without cuBLAS)", "this machine has its own libcublas.so.12");
    } else {
        assert!(text.contains("cannot train on it: libcublas.so.12 (cuBLAS) not found"), "{text}");
        assert!(text.contains("on this machine: --device auto stops: libcublas.so.12 (cuBLAS) not found"), "{text}");
    }
}

#[test]
fn env_without_a_gpu_succeeds_and_says_what_was_searched() {
    if system_has("libcuda.so.1") {
        skipped("env_without_a_gpu_succeeds_and_says_what_was_searched", "this machine has a CUDA driver in the loader cache or /usr/local/cuda");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (code, text) = ferrotune(t.path(), &["env"], &[], &[]);
    assert_eq!(code, Some(0), "{text}");
    for part in [
        &format!("ferrotune {} (git ", env!("CARGO_PKG_VERSION")),
        "OS: ",
        "CPU: ",
        "no CUDA driver found (libcuda.so.1)",
        "libcublas.so.12    NOT FOUND",
        "searched, in order:",
        "LD_LIBRARY_PATH: (unset)",
        "python3 site-packages: (no python3 on PATH answered)",
        "Kernels: ",
        "PTX ISA 8.4, target sm_80",
        "on this machine: --device auto trains on the CPU reference backend",
        &format!("HuggingFace hub: {}", t.path().join(".cache/huggingface/hub").display()),
        &format!("prepared datasets: {}", t.path().join(".cache/ferrotune/datasets").display()),
    ] {
        assert!(text.contains(part), "env lacks {part:?}:\n{text}");
    }
    let (code, json) = ferrotune(t.path(), &["env", "--json"], &[], &[]);
    assert_eq!(code, Some(0), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("env --json is not JSON ({e}):\n{json}"));
    assert_eq!(v["driver"]["found"], false);
    assert_eq!(v["gpus"].as_array().map(Vec::len), Some(0));
}

/// A stand-in library `soname` in `dir` built from `source` (C++) with the
/// host compiler.
fn fake_lib(dir: &Path, soname: &str, source: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = dir.join("fake.cpp");
    std::fs::write(&src, source).unwrap();
    let out = dir.join(soname);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let st = Command::new(&cxx).args(["-shared", "-fPIC", &format!("-Wl,-soname,{soname}"), "-o"]).arg(&out).arg(&src).status();
    assert!(st.is_ok_and(|s| s.success()), "{cxx} could not build {}", out.display());
    std::fs::remove_file(src).unwrap();
    out
}

/// A libcublasLt.so.12 (the emulator has none) exporting `cublasLtCreate`.
fn fake_cublas_lt(dir: &Path) -> PathBuf {
    fake_lib(dir, "libcublasLt.so.12", "extern \"C\" int cublasLtCreate(void** h) { *h = nullptr; return 0; }\n")
}

#[test]
fn a_driver_missing_a_function_is_an_error_not_a_panic() {
    // A libcuda.so.1 with cuInit and cuDriverGetVersion only: cudarc panics
    // on the first function it lacks, and that must come out as an error.
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("lib");
    fake_lib(
        &dir,
        "libcuda.so.1",
        "extern \"C\" int cuInit(unsigned) { return 0; }\nextern \"C\" int cuDriverGetVersion(int* v) { *v = 12040; return 0; }\n",
    );
    let (code, text) = ferrotune(t.path(), &["env"], &[("LD_LIBRARY_PATH", &dir)], &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("driver: CUDA 12.4"), "{text}");
    assert!(text.contains("error: counting CUDA devices: Missing symbol cuDeviceGetCount"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    fake_lib(&dir, "libcublas.so.12", "extern \"C\" int cublasCreate_v2(void** h) { *h = nullptr; return 0; }\n");
    let (code, log) = ferrotune(t.path(), BENCH, &[("LD_LIBRARY_PATH", &dir)], &[]);
    assert_ne!(code, Some(101), "{log}");
    assert_refused("a driver without cuDeviceGetCount", &(code, log), &["--device cuda: starting the CUDA driver: Missing symbol cuDeviceGetCount"]);
    // --device auto does not quietly train on the CPU past a broken driver.
    let mut auto = BENCH.to_vec();
    auto[2] = "auto";
    let auto = ferrotune(t.path(), &auto, &[("LD_LIBRARY_PATH", &dir)], &[]);
    assert_refused("auto with a broken driver", &auto, &["a GPU is visible but could not be used", "Missing symbol cuDeviceGetCount"]);
}

#[test]
fn cublas_lt_comes_from_cublas_own_folder() {
    // A wheel holding both, and another cuBLASLt earlier on LD_LIBRARY_PATH:
    // the wheel's is loaded with its cuBLAS (one release), and env says so.
    let t = tempfile::tempdir().unwrap();
    let driver = t.path().join("driver");
    link(&driver, "libcuda.so", "libcuda.so");
    fake_cublas_lt(&driver);
    let venv = t.path().join("venv");
    let wheel = venv.join("lib/python3.12/site-packages/nvidia/cublas/lib");
    link(&wheel, "libcublas.so.12", "libcublas.so");
    let lt = fake_cublas_lt(&wheel);
    let env = [("LD_LIBRARY_PATH", driver.as_path()), ("VIRTUAL_ENV", venv.as_path())];
    let (code, json) = ferrotune(t.path(), &["env", "--json"], &env, &[]);
    assert_eq!(code, Some(0), "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("env --json is not JSON ({e}):\n{json}"));
    assert_eq!(v["libraries"][1]["soname"], "libcublasLt.so.12");
    assert_eq!(v["libraries"][1]["path"], lt.display().to_string());
    assert_eq!(v["libraries"][2]["path"], wheel.join("libcublas.so.12").display().to_string());
    assert_eq!(v["gpus"][0]["name"], "SIMT emulator (host CPU)");
    // And a run starts with both loaded.
    let (code, log) = ferrotune(t.path(), BENCH, &env, &[]);
    assert_eq!(code, Some(0), "{log}");
}

/// Puts a `python3` script on the PATH `ferrotune` gives the binary.
fn fake_python(cwd: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let bin = cwd.join("empty-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let p = bin.join("python3");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_wheels_of_the_python3_on_path_are_searched_and_a_hung_python3_is_not_waited_for() {
    let t = tempfile::tempdir().unwrap();
    let driver = t.path().join("driver");
    link(&driver, "libcuda.so", "libcuda.so");
    let site = t.path().join("site-packages");
    let wheel = site.join("nvidia/cublas/lib");
    link(&wheel, "libcublas.so.12", "libcublas.so");
    fake_python(t.path(), &format!("echo {}\necho /nonexistent/user-site", site.display()));
    let env = [("LD_LIBRARY_PATH", driver.as_path())];
    let (code, text) = ferrotune(t.path(), &["env"], &env, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("python3 site-packages: {}", wheel.display())), "{text}");
    assert!(text.contains(&format!("libcublas.so.12    {}", wheel.join("libcublas.so.12").display())), "{text}");

    // A python3 that never answers costs its timeout (3 s), not a hang.
    fake_python(t.path(), "/bin/sleep 30");
    let start = std::time::Instant::now();
    let (code, text) = ferrotune(t.path(), &["env"], &env, &[]);
    assert_eq!(code, Some(0), "{text}");
    let waited = start.elapsed();
    assert!(waited >= std::time::Duration::from_secs(3) && waited < std::time::Duration::from_secs(20), "env waited {waited:?}");
    assert!(text.contains("python3 site-packages: (no python3 on PATH answered)"), "{text}");
}

#[test]
fn env_into_a_closed_pipe_is_not_a_panic() {
    // `ferrotune env | head -1`: the reader is gone before the report is written.
    let t = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .arg("env")
        .current_dir(t.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ferrotune env");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_run_asks_python3_only_while_a_library_is_missing() {
    // The python3 on PATH leaves a mark when asked and names a site-packages
    // with cuBLAS's wheel.
    let t = tempfile::tempdir().unwrap();
    let asked = t.path().join("python3-was-asked");
    let site = t.path().join("site-packages");
    let wheel = site.join("nvidia/cublas/lib");
    link(&wheel, "libcublas.so.12", "libcublas.so");
    fake_python(t.path(), &format!(": > {}\necho {}", asked.display(), site.display()));
    let mut auto = BENCH.to_vec();
    auto[2] = "auto";

    // No driver anywhere: --device auto is the CPU, and nothing was run to find out.
    if system_has("libcuda.so.1") {
        skipped("a_run_asks_python3_only_while_a_library_is_missing (no driver)", "this machine has a CUDA driver in the loader cache or /usr/local/cuda");
    } else {
        let (code, log) = ferrotune(t.path(), &auto, &[], &[]);
        assert_eq!(code, Some(0), "{log}");
        assert!(!log.contains("device: cuda"), "{log}");
        assert!(!asked.exists(), "a run without a driver asked python3:\n{log}");
    }

    // Driver and cuBLAS on LD_LIBRARY_PATH: found there, python3 not asked.
    let both = t.path().join("both");
    link(&both, "libcuda.so", "libcuda.so");
    link(&both, "libcublas.so.12", "libcublas.so");
    let (code, log) = ferrotune(t.path(), &auto, &[("LD_LIBRARY_PATH", &both)], &[]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("device: cuda:0 SIMT emulator"), "{log}");
    assert!(!asked.exists(), "a run with every library on LD_LIBRARY_PATH asked python3:\n{log}");

    // cuBLAS only in python3's wheels: asked, and the run starts with it.
    if system_has("libcublas.so.12") {
        skipped("a_run_asks_python3_only_while_a_library_is_missing (cuBLAS from a wheel)", "this machine has its own libcublas.so.12");
        return;
    }
    let driver = t.path().join("driver");
    link(&driver, "libcuda.so", "libcuda.so");
    let (code, log) = ferrotune(t.path(), &auto, &[("LD_LIBRARY_PATH", &driver)], &[]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains(&format!("GEMM: cuBLAS ({})", wheel.join("libcublas.so.12").display())), "{log}");
    assert!(asked.exists(), "cuBLAS was found without asking python3:\n{log}");
}
