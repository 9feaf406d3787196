//! Ctrl-C and SIGTERM during training: the first one asks the loop to stop
//! after the step in progress (it then saves the adapter and a checkpoint);
//! a second one ends the process at once, as the shell expects (exit code
//! 128 + the signal's number).

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Flags {
    asked: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Install the handlers (once per process; later calls do nothing).
pub fn install() -> Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags { asked: Arc::new(AtomicBool::new(false)), signal: Arc::new(AtomicUsize::new(0)) };
    for sig in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as the earlier signal left it:
        // set means this is the second signal.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&flags.asked))
            .and_then(|_| flag::register_usize(sig, Arc::clone(&flags.signal), sig as usize))
            .and_then(|_| flag::register(sig, Arc::clone(&flags.asked)))
            .context("cannot install the Ctrl-C handler")?;
    }
    let _ = FLAGS.set(flags);
    Ok(())
}

/// The signal that asked the run to stop (SIGINT or SIGTERM), if any.
pub fn requested() -> Option<i32> {
    let f = FLAGS.get()?;
    f.asked.load(Ordering::SeqCst).then(|| f.signal.load(Ordering::SeqCst) as i32)
}

/// The signal's name, for the message.
pub fn name(sig: i32) -> &'static str {
    if sig == SIGTERM { "SIGTERM" } else { "Ctrl-C" }
}
