//! `QVSHIM_SIGNAL`: a signal raised to the process on each level rise, for any runtime that
//! installs a handler for it.
//!
//! The signal is raised only while the process has a handler installed: a signal whose action
//! is the default would terminate the process (SIGUSR1's default action), and an ignored one
//! would tell nobody. Only a signal meant for users (USR1, USR2, RTMIN..RTMAX) other than the
//! dump signal is accepted (config.rs), so the shim never sends a signal that means something
//! else to the program. Runs on the monitor thread only.

use core::sync::atomic::{AtomicI32, AtomicU64, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static RAISED: AtomicU64 = AtomicU64::new(0);
static SKIPPED_NO_HANDLER: AtomicU64 = AtomicU64::new(0);

pub fn configure(signal: Option<i32>) {
    SIGNAL.store(signal.unwrap_or(0), Ordering::Relaxed);
}

/// The configured signal, if any.
pub fn configured() -> Option<i32> {
    let signal = SIGNAL.load(Ordering::Relaxed);
    (signal > 0).then_some(signal)
}

/// True when `signal` has a handler (neither the default action nor ignored).
pub fn has_handler(signal: i32) -> bool {
    // SAFETY: a zeroed sigaction is a valid out-value; a null new action only queries.
    let mut current: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: current is a valid out-pointer.
    if unsafe { libc::sigaction(signal, core::ptr::null(), &mut current) } != 0 {
        return false;
    }
    current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN
}

/// Raises the configured signal to the process when it has a handler; true when raised.
pub fn raise_if_handled() -> bool {
    let Some(signal) = configured() else {
        return false;
    };
    if !has_handler(signal) {
        SKIPPED_NO_HANDLER.fetch_add(1, Ordering::Relaxed);
        crate::base::log::qlog!(
            Info,
            "signal {signal} ({}) not raised: the process has no handler for it",
            crate::base::config::SignalName(signal)
        );
        return false;
    }
    // kill, not raise: the monitor thread blocks every signal, so the signal goes to a thread
    // of the process that accepts it.
    // SAFETY: kill with our own pid and a valid signal number.
    let sent = unsafe { libc::kill(libc::getpid(), signal) } == 0;
    if sent {
        RAISED.fetch_add(1, Ordering::Relaxed);
        crate::base::log::qlog!(
            Info,
            "raised signal {signal} ({}) to the process",
            crate::base::config::SignalName(signal)
        );
    }
    sent
}

/// (signals raised, rises where the process had no handler).
pub fn counts() -> (u64, u64) {
    (
        RAISED.load(Ordering::Relaxed),
        SKIPPED_NO_HANDLER.load(Ordering::Relaxed),
    )
}
