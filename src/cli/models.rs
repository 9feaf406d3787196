//! `ferrotune models`: the supported architectures, from the registry.

use crate::registry;
use anyhow::Result;

pub fn run() -> Result<()> {
    println!("Supported architectures (models/*.yaml):");
    for f in registry::families() {
        println!("  {:<8} {}", f.family, f.description);
        println!("           architectures: {}", f.architectures.join(", "));
        println!("           rope scaling: {}", f.rope_scaling.join(", "));
    }
    Ok(())
}
