//! The places of the CUDA library search that need a program run: the
//! nvidia-* wheels of the `python3` on PATH and the loader cache
//! (`ldconfig -p`). Each is asked with a short timeout, and only when the
//! search needs it (see the parent module). A new such place is a new
//! function here, added to [`spawned_places`].

use super::{Place, WANTED, wheel_dirs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The places that need a program run (a few ms to seconds each), looked
/// in after [`super::cheap_places`].
pub(super) fn spawned_places() -> Vec<Place> {
    vec![python_place(), loader_cache_place()]
}

/// Runs `cmd` for at most `limit`, returning its stdout when it succeeded.
/// The output is read on its own thread: `ldconfig -p` can print more than a
/// pipe holds before it exits.
fn output_within(mut cmd: Command, limit: Duration) -> Option<String> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).ok().map(|_| out)
    });
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return reader.join().ok().flatten(),
            Ok(Some(_)) => return None,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                // Not joined: a grandchild (a shell script's) may hold the
                // pipe open long after the child is gone.
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// The `python3` on PATH's site-packages, asked with a short timeout: where
/// `pip install torch` put the nvidia-* wheels.
fn python_place() -> Place {
    let source = "python3 site-packages".to_string();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))"]);
    let Some(out) = output_within(cmd, Duration::from_secs(3)) else {
        return Place { source, dirs: vec![], note: Some("no python3 on PATH answered".into()) };
    };
    let dirs: Vec<PathBuf> = out.lines().flat_map(|l| wheel_dirs(Path::new(l.trim()))).collect();
    let note = dirs.is_empty().then(|| "no nvidia-* wheels".to_string());
    Place { source, dirs, note }
}

/// Folders holding CUDA libraries in the loader cache (`ldconfig -p`).
fn loader_cache_place() -> Place {
    let source = "loader cache (ldconfig -p)".to_string();
    let arch = if cfg!(target_arch = "x86_64") { "x86-64" } else if cfg!(target_arch = "aarch64") { "AArch64" } else { "" };
    let out = ["/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"].iter().find_map(|l| {
        let mut c = Command::new(l);
        c.arg("-p");
        output_within(c, Duration::from_secs(3))
    });
    let Some(out) = out else { return Place { source, dirs: vec![], note: Some("ldconfig not available".into()) } };
    let dirs = cache_dirs(&out, arch);
    let note = dirs.is_empty().then(|| "no CUDA libraries".to_string());
    Place { source, dirs, note }
}

/// The folders of the libraries in [`WANTED`] that `ldconfig -p` lists for
/// this architecture ("\tlibcublas.so.12 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcublas.so.12").
fn cache_dirs(ldconfig_p: &str, arch: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in ldconfig_p.lines() {
        let Some((name, path)) = line.trim().split_once(" => ") else { continue };
        let relevant = WANTED.iter().any(|w| name.starts_with(&format!("lib{}.so", w.stem)));
        if relevant
            && name.contains(arch)
            && let Some(dir) = Path::new(path.trim()).parent().filter(|d| !dirs.iter().any(|x| x == d))
        {
            dirs.push(dir.to_path_buf());
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_cache_gives_the_folders_of_cuda_libraries_for_this_architecture() {
        let out = "1234 libs found in cache `/etc/ld.so.cache'
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
\tlibcudart.so.12 (libc6,x86-64) => /opt/rt/libcudart.so.12
\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.1
\tlibcublasLt.so.12 (libc6,x86-64) => /usr/local/cuda-12.4/lib64/libcublasLt.so.12
\tlibcublas.so.12 (libc6,x86-64) => /usr/local/cuda-12.4/lib64/libcublas.so.12
";
        assert_eq!(
            cache_dirs(out, "x86-64"),
            vec![PathBuf::from("/usr/lib/x86_64-linux-gnu"), PathBuf::from("/usr/local/cuda-12.4/lib64")]
        );
    }

}
