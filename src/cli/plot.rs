//! `ferrotune plot OUTPUT_DIR`: draw a run's metrics.jsonl as a PNG.

use crate::train::curves::{self, CURVES_FILE};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct PlotArgs {
    /// A training run's output_dir (the one holding metrics.jsonl).
    output_dir: PathBuf,
    /// Where to write the PNG [default: OUTPUT_DIR/training_curves.png].
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
}

pub fn run(a: PlotArgs) -> Result<()> {
    let t0 = Instant::now();
    let out = a.out.unwrap_or_else(|| a.output_dir.join(CURVES_FILE));
    let d = curves::plot(&a.output_dir, &out)?;
    eprintln!(
        "wrote {} ({}x{} pixels; panels: {}) in {:.0} ms",
        out.display(),
        d.width,
        d.height,
        d.panels.join(", "),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
