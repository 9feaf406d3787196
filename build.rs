//! Kernel build step. The CUDA kernels (cuda/*.cu) are compiled to PTX and
//! the committed ptx/ is embedded, so that `cargo build` never needs a CUDA
//! toolchain. This version of ferrotune has only the CPU backend, so there is
//! nothing to compile yet; the script only tells cargo what to watch.
fn main() {
    println!("cargo::rerun-if-changed=cuda");
    println!("cargo::rerun-if-changed=ptx");
    println!("cargo::rerun-if-changed=models");
}
