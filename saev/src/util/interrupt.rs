//! A stop request for long jobs: Ctrl-C (SIGINT) or a scheduler's SIGTERM (Slurm sends it
//! before killing a job at its time limit) sets a flag that training checks after every step,
//! so it writes a checkpoint and stops instead of losing the steps since the last one. A
//! second signal ends the process at once (exit 130).
//!
//! The binary installs the handlers ([`install_stop_handlers`]) for the commands that train;
//! a library user (a notebook) may call [`request_stop`] from another thread instead.
//!
//! ```no_run
//! saev::install_stop_handlers()?;   // Ctrl-C now checkpoints and stops a training run
//! # Ok::<(), saev::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);

/// Ask running training loops to checkpoint and stop at their next step.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether a stop was requested (and not yet cleared).
pub(crate) fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Clear a request (a loop that honoured it clears it, so the next run starts afresh).
pub(crate) fn clear_stop() {
    STOP.store(false, Ordering::SeqCst);
}

/// SIGINT and SIGTERM request a stop; a second one, while the first is pending, exits the
/// process with status 130.
pub fn install_stop_handlers() -> Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The shutdown first: it acts only once the flag is already set.
        signal_hook::flag::register_conditional_shutdown(sig, 130, &STOP)
            .and_then(|_| signal_hook::flag::register(sig, &STOP))
            .map_err(|e| Error::Internal(format!("installing the handler of signal {sig}: {e}")))?;
    }
    Ok(())
}
