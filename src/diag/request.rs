//! Asking for a dump and answering the ask: the dump signal's handler (a flag and the
//! doorbell, nothing else), the flags the monitor and the exit path share so that a dump is
//! written once and whole, and the watch on a program that takes the dump signal for itself.

use core::ffi::c_int;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::base::clock;
use crate::base::doorbell;
use crate::base::log::qlog;

use super::file;

static DUMP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Held while a requested dump is being written, by the monitor or by the exit path.
static DUMP_WRITING: AtomicBool = AtomicBool::new(false);
/// How long the exit path waits for a dump the monitor is writing.
pub const EXIT_DUMP_WAIT_MS: u64 = 2_000;

/// Asks the monitor to write the diagnostic dump. Async-signal-safe.
pub fn request_dump() {
    DUMP_REQUESTED.store(true, Ordering::Release);
    doorbell::ring();
}

/// Whether a dump was asked for and not written yet.
pub fn dump_requested() -> bool {
    DUMP_REQUESTED.load(Ordering::Acquire)
}

/// Writes the requested dump, if one is requested and nobody is writing one. Returns false
/// when another thread is writing a dump now.
pub fn write_requested_dump() -> bool {
    if DUMP_WRITING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    // Taken after the writing flag is held, so that the exit path sees either the request or
    // the writer.
    if DUMP_REQUESTED.swap(false, Ordering::AcqRel) {
        file::write_requested_dump();
    }
    DUMP_WRITING.store(false, Ordering::Release);
    true
}

/// At exit: finishes the dump being written and writes one still requested, so that a dump
/// asked for just before the process ends is complete on disk. Waits at most
/// [`EXIT_DUMP_WAIT_MS`] for the monitor.
pub fn finish_requested_dump() {
    let deadline = clock::now_ms().saturating_add(EXIT_DUMP_WAIT_MS);
    while !write_requested_dump() {
        if clock::now_ms() >= deadline {
            qlog!(
                Warn,
                "exit: a dump was still being written; not waiting longer"
            );
            return;
        }
        // SAFETY: usleep has no memory-safety preconditions.
        unsafe { libc::usleep(1000) };
    }
}

/// In a fork child nobody writes a dump and none is asked for.
pub(super) fn after_fork_child() {
    DUMP_REQUESTED.store(false, Ordering::Relaxed);
    DUMP_WRITING.store(false, Ordering::Relaxed);
}

/// The dump signal's handler: a flag and the doorbell, nothing else (errno preserved).
extern "C" fn on_dump_signal(_signal: c_int) {
    // SAFETY: __errno_location is async-signal-safe and returns this thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    request_dump();
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The signal whose handler is the shim's now (0: none, dumps by signal are off).
pub(super) static DUMP_SIGNAL: core::sync::atomic::AtomicI32 =
    core::sync::atomic::AtomicI32::new(0);
/// The signal that asks for a dump now; 0 when dumps by signal are off.
pub fn dump_signal() -> i32 {
    DUMP_SIGNAL.load(Ordering::Relaxed)
}

/// QVSHIM_DUMP_SIGNAL was set by the user: what becomes of it is said at WARN, not INFO.
pub(super) static DUMP_SIGNAL_CHOSEN: AtomicBool = AtomicBool::new(false);

/// One line about the dump signal: a warning when the user chose it, else information (the
/// default signal being the program's own is nothing to warn about).
pub(super) fn say_dump_signal(args: core::fmt::Arguments) {
    let level = if DUMP_SIGNAL_CHOSEN.load(Ordering::Relaxed) {
        crate::base::log::Level::Warn
    } else {
        crate::base::log::Level::Info
    };
    crate::base::log::write_line(level, args);
}

/// The handler the process has for `signal` now; None when it cannot be read.
pub(super) fn current_handler(signal: i32) -> Option<usize> {
    // SAFETY: a zeroed sigaction is a valid out-value; a null new action only queries.
    let mut current: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: current is a valid out-pointer.
    (unsafe { libc::sigaction(signal, core::ptr::null(), &mut current) } == 0)
        .then_some(current.sa_sigaction)
}

pub(super) fn dump_handler() -> usize {
    on_dump_signal as extern "C" fn(c_int) as usize
}

/// Installs the dump signal's handler, unless the program already ignores or handles the
/// signal: it is never taken from the program (an inherited SIG_IGN stays SIG_IGN). `chosen`:
/// QVSHIM_DUMP_SIGNAL was set. Called once at load.
pub fn install_dump_signal(signal: i32, chosen: bool) {
    use crate::base::config::SignalName;
    DUMP_SIGNAL_CHOSEN.store(chosen, Ordering::Relaxed);
    let name = SignalName(signal);
    match current_handler(signal) {
        Some(libc::SIG_DFL) => {}
        Some(libc::SIG_IGN) => {
            say_dump_signal(format_args!(
                "QVSHIM_DUMP_SIGNAL: signal {signal} ({name}) is ignored by the process and \
                 stays ignored; dumps by signal are off"
            ));
            return;
        }
        Some(_) => {
            say_dump_signal(format_args!(
                "QVSHIM_DUMP_SIGNAL: the program handles signal {signal} ({name}) itself and \
                 keeps it; dumps by signal are off"
            ));
            return;
        }
        None => {}
    }
    // SAFETY: a zeroed sigaction with a handler, an empty mask and SA_RESTART is valid;
    // on_dump_signal is async-signal-safe.
    let installed = unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = dump_handler();
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, core::ptr::null_mut()) == 0
    };
    if installed {
        DUMP_SIGNAL.store(signal, Ordering::Relaxed);
    } else {
        crate::base::log::write_error_always(format_args!(
            "QVSHIM_DUMP_SIGNAL: the handler for signal {signal} ({name}) could not be \
             installed ({}); dumps by signal are off",
            std::io::Error::last_os_error()
        ));
    }
}

/// Notices, on the monitor thread, when the program installed its own action for the dump
/// signal after load: says so once and leaves the signal to the program (never takes it back).
pub fn check_dump_signal() {
    let signal = DUMP_SIGNAL.load(Ordering::Relaxed);
    if signal == 0 {
        return;
    }
    match current_handler(signal) {
        Some(handler) if handler != dump_handler() => {
            DUMP_SIGNAL.store(0, Ordering::Relaxed);
            let what = match handler {
                libc::SIG_IGN => "ignores",
                libc::SIG_DFL => "set the default action for",
                _ => "installed its own handler for",
            };
            say_dump_signal(format_args!(
                "QVSHIM_DUMP_SIGNAL: the program {what} signal {signal} ({}); qvshim leaves \
                 it to the program; dumps by signal are off",
                crate::base::config::SignalName(signal)
            ));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn the_exit_waits_for_a_dump_being_written() {
        // Another thread is writing a dump; it finishes 50 ms later. The exit path must wait
        // for it (up to EXIT_DUMP_WAIT_MS), not give up at once.
        DUMP_WRITING.store(true, Ordering::Release);
        let finished = Arc::new(AtomicBool::new(false));
        let writer = {
            let finished = Arc::clone(&finished);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                finished.store(true, Ordering::Release);
                DUMP_WRITING.store(false, Ordering::Release);
            })
        };
        finish_requested_dump();
        let waited = finished.load(Ordering::Acquire);
        writer.join().unwrap();
        assert!(
            waited,
            "the exit path stopped waiting while the dump was being written"
        );
        assert!(!DUMP_WRITING.load(Ordering::Acquire));
    }
}
