//! Kernel build step: embeds the committed PTX, so that `cargo build` never
//! needs a CUDA toolchain.
//!
//! - When the pinned NVRTC is present (the venv named by
//!   `FERROTUNE_NVRTC_VENV`, else `.venv-cuda` in the repository; see
//!   scripts/install_cuda_toolchain.sh), ptx/ is first regenerated from cuda/
//!   by scripts/regen_ptx.py, so edits to a kernel take effect (and show up in
//!   `git status` as ptx/ changes to commit). A compile error in cuda/ then
//!   fails the build. `FERROTUNE_NVRTC_VENV=` (empty) turns this off.
//! - Otherwise the committed ptx/ is used as it is, silently.
//!
//! Either way `$OUT_DIR/ptx_modules.rs` lists every ptx/*.ptx as
//! `(name, include_str!(path))` in `PTX`, which src/kernels.rs includes.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-changed=ptx");
    println!("cargo::rerun-if-changed=models");
    println!("cargo::rerun-if-changed=scripts/regen_ptx.py");
    println!("cargo::rerun-if-changed=scripts/cuda-toolchain.txt");
    println!("cargo::rerun-if-env-changed=FERROTUNE_NVRTC_VENV");

    if let Some(venv) = toolchain_venv(&root) {
        regenerate_ptx(&root, &venv);
    }
    embed_ptx(&root);
    embed_git_hash(&root);
}

/// `FERROTUNE_GIT_HASH` for `ferrotune env`: the short commit hash, or
/// "unknown" outside a git checkout (a crates.io or tarball build).
fn embed_git_hash(root: &Path) {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).current_dir(root).output().ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    let hash = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it names (a commit).
    let mut watch = vec!["HEAD".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for w in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &w]).map(|p| root.join(p)).filter(|p| p.exists()) {
            println!("cargo::rerun-if-changed={}", p.display());
        }
    }
    println!("cargo::rustc-env=FERROTUNE_GIT_HASH={hash}");
}

/// The venv holding the pinned NVRTC, if regeneration is wanted and possible.
fn toolchain_venv(root: &Path) -> Option<PathBuf> {
    match env::var_os("FERROTUNE_NVRTC_VENV") {
        // Explicitly off.
        Some(v) if v.is_empty() => None,
        Some(v) => {
            let venv = PathBuf::from(v);
            let venv = if venv.is_relative() { root.join(venv) } else { venv };
            if !venv.is_dir() {
                panic!(
                    "FERROTUNE_NVRTC_VENV={} does not exist: create it with \
                     `bash scripts/install_cuda_toolchain.sh {}`, or unset the variable \
                     to build from the committed ptx/",
                    venv.display(),
                    venv.display()
                );
            }
            println!("cargo::rerun-if-changed={}", venv.join("pyvenv.cfg").display());
            Some(venv)
        }
        None => {
            let venv = root.join(".venv-cuda");
            if venv.join("pyvenv.cfg").is_file() {
                println!("cargo::rerun-if-changed={}", venv.join("pyvenv.cfg").display());
                Some(venv)
            } else {
                None
            }
        }
    }
}

fn regenerate_ptx(root: &Path, venv: &Path) {
    let python = ["bin/python3", "bin/python", "Scripts/python.exe"]
        .iter()
        .map(|p| venv.join(p))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{}: no Python interpreter in this venv", venv.display()));
    let out = Command::new(&python)
        .arg(root.join("scripts/regen_ptx.py"))
        .arg("--venv")
        .arg(venv)
        .arg("--quiet")
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        panic!(
            "scripts/regen_ptx.py (NVRTC from {}) failed; fix cuda/, or set \
             FERROTUNE_NVRTC_VENV= (empty) to build from the committed ptx/:\n{stdout}{stderr}",
            venv.display()
        );
    }
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo::warning={line} (commit ptx/)");
    }
}

fn embed_ptx(root: &Path) {
    let dir = root.join("ptx");
    let mut modules: Vec<(String, PathBuf)> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.expect("reading ptx/").path())
            .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
            .map(|p| {
                let name = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_else(|| panic!("{}: non-UTF-8 file name", p.display()))
                    .to_owned();
                (name, p)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    modules.sort();

    let mut src = String::from(
        "/// Every committed PTX module, `(name, PTX text)`, sorted by name: \
         ptx/<name>.ptx, compiled from cuda/<name>.cu. Generated by build.rs.\n\
         pub const PTX: &[(&str, &str)] = &[\n",
    );
    for (name, path) in &modules {
        let path = path
            .to_str()
            .unwrap_or_else(|| panic!("{}: non-UTF-8 path", path.display()));
        src.push_str(&format!("    ({name:?}, include_str!({path:?})),\n"));
    }
    src.push_str("];\n");

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("ptx_modules.rs");
    if fs::read_to_string(&out).ok().as_deref() != Some(src.as_str()) {
        fs::write(&out, src).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    }
}
