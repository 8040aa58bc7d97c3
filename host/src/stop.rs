//! SIGTERM and SIGINT as a request to stop at the next step boundary: a training run writes a
//! mid-task checkpoint and exits, and `--resume` continues from it. Slurm sends SIGTERM on
//! preemption and, with `--signal`, before the time limit. A second signal ends the process
//! at once, as if there were no handler.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe calls here: an atomic swap, signal(2), raise(3).
    if RECEIVED.swap(signal, Ordering::SeqCst) != 0 {
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
}

/// Handle SIGTERM and SIGINT from now on (idempotent).
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic and restores the default disposition.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

/// The signal that asked the run to stop, if one did.
pub fn requested() -> Option<&'static str> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        libc::SIGTERM => Some("SIGTERM"),
        libc::SIGINT => Some("SIGINT"),
        _ => Some("a signal"),
    }
}
