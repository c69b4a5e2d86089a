//! The nudge thread: makes CPython's main thread run a queued relief soon (asking for the GIL
//! stops it at the next bytecode boundary), and runs the relief itself, holding the GIL, for a
//! main thread that is outside Python code, where the app's own collector could have run it.
//! The monitor never blocks on the GIL: this thread does.

use core::ffi::c_void;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::base::log::qlog;
use crate::ledger::{self, LEVEL_CRITICAL};

use super::interpreter::{Api, API};
use super::relief::{collector_enabled, take_request_and_run, PENDING};

// ---------------------------------------------------------------------------------------------
// The nudge: CPython 3.9 to 3.12 do not interrupt the main thread for a pending call added
// from another thread (cpython issue 95820); the main thread runs it only the next time it
// takes the GIL again. A busy main thread holding the GIL would never run it. Asking for the
// GIL from another thread makes the main thread stop at the next bytecode boundary (after the
// switch interval, 5 ms by default), where it runs pending calls first and then hands the GIL
// over. That waiting is done by a thread of its own, so the monitor never blocks on the GIL.
//
// When the relief is still waiting after the nudge thread got and gave back the GIL, the main
// thread is not executing Python code: it is in a call that released the GIL (time.sleep(),
// I/O, thread.join(), future.result()). It gets [`MAIN_THREAD_GRACE_MS`] to come back and run
// the relief itself (a main thread sleeping in short steps does). After that the nudge thread
// runs it, holding the GIL, so memory comes back while other threads allocate, but only while
// the app's collector is enabled (its own collections could then run on any of its threads) or
// when the next step is a refusal. Otherwise the relief waits for the main thread, and at
// critical the nudge thread watches for the pool to come within its reserve. Whoever takes the
// PENDING flag first runs it.

/// How long a main thread outside Python code has to take a relief before the nudge thread
/// runs it, where it may (the app's collector on, or the next step a refusal).
pub const MAIN_THREAD_GRACE_MS: u64 = 20;

/// How often the nudge thread looks whether a pool at critical came within its reserve, while
/// a relief waits for a main thread that is outside Python code and the app's collector is off.
pub const REFUSAL_WATCH_STEP_MS: u64 = 1;

/// The nudge thread's stack: the relief may run Python code on it (gc finalizers, the app's
/// callbacks), so it gets what a Python thread gets by default on Linux.
pub const NUDGE_STACK_BYTES: usize = 8 << 20;

/// Reliefs the nudge thread ran itself.
pub(crate) static NUDGE_THREAD_RUNS: AtomicU64 = AtomicU64::new(0);

static NUDGE_BELL: AtomicU32 = AtomicU32::new(0);
/// The process the nudge thread was started in (a fork child starts its own).
pub(crate) static NUDGER_PID: AtomicI32 = AtomicI32::new(0);

pub(crate) fn nudge() {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if NUDGER_PID.load(Ordering::Acquire) != pid {
        if !crate::base::threads::spawn_thread(c"qvshim-nudge", NUDGE_STACK_BYTES, nudger_main) {
            qlog!(Warn, "could not start the python nudge thread");
            return;
        }
        NUDGER_PID.store(pid, Ordering::Release);
    }
    NUDGE_BELL.fetch_add(1, Ordering::Release);
    // SAFETY: FUTEX_WAKE on a valid, static, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            NUDGE_BELL.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

/// CPython can take a thread's GIL request now: initialised and not finalizing (a thread
/// taking the GIL during finalization is ended by CPython).
pub(crate) fn gil_usable(api: &Api) -> bool {
    // SAFETY: both only read runtime flags.
    unsafe {
        (api.is_initialized)() != 0 && api.is_finalizing.is_none_or(|finalizing| finalizing() == 0)
    }
}

pub(crate) extern "C" fn nudger_main(_: *mut c_void) -> *mut c_void {
    nudger()
}

/// Waits up to `ms` for someone to take the relief; true when it was taken. The wait ends
/// early when a pool comes to its refusal step, or one at that step loses half of what was
/// left of its budget, while it lasts: other threads are filling it faster than the main
/// thread comes back.
pub(crate) fn taken_within_ms(ms: u64) -> bool {
    const STEP_MS: u64 = 1;
    let left_at_start = least_left_at_refusal_step();
    for _ in 0..ms / STEP_MS {
        if !PENDING.load(Ordering::Acquire) {
            return true;
        }
        if let Some(left) = least_left_at_refusal_step() {
            if left <= left_at_start.unwrap_or(u64::MAX) / 2 {
                return false;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(STEP_MS));
    }
    !PENDING.load(Ordering::Acquire)
}

pub(crate) fn nudger() -> ! {
    loop {
        let seen = NUDGE_BELL.load(Ordering::Acquire);
        if let Some(api) = API.get().filter(|_| PENDING.load(Ordering::Acquire)) {
            if gil_usable(api) {
                // A main thread executing Python code runs the relief before it hands the GIL
                // over.
                // SAFETY: CPython is initialised and not finalizing; Ensure is balanced by
                // Release on this thread at once.
                unsafe {
                    let state = (api.gil_ensure)();
                    (api.gil_release)(state);
                }
            }
            if !taken_within_ms(MAIN_THREAD_GRACE_MS) {
                run_for_a_main_thread_outside_python(api, seen);
            }
        }
        // SAFETY: FUTEX_WAIT on a valid, static, aligned u32, no timeout.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                NUDGE_BELL.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                core::ptr::null::<libc::timespec>(),
            )
        };
    }
}

/// The main thread is outside Python code and left the relief waiting: runs it here when the
/// app's own collector could have (it is enabled) or the next step is a refusal; otherwise
/// leaves it to the main thread, watching a pool at critical for its refusal step. Returns
/// when the relief was taken, left to the main thread, or the bell rang again (`bell` is the
/// value it had).
pub(crate) fn run_for_a_main_thread_outside_python(api: &Api, bell: u32) {
    loop {
        if !PENDING.load(Ordering::Acquire) || !gil_usable(api) {
            return;
        }
        let refusal_next = refusal_is_next();
        // SAFETY: CPython is initialised and not finalizing; Ensure is balanced by Release on
        // this thread. The collector's state is read with the GIL held and the relief runs
        // under the same hold, so the app cannot turn it off in between.
        let may_run = unsafe {
            let state = (api.gil_ensure)();
            let may_run = refusal_next || collector_enabled(api);
            if may_run && PENDING.swap(false, Ordering::AcqRel) {
                NUDGE_THREAD_RUNS.fetch_add(1, Ordering::Relaxed);
                take_request_and_run(api);
            }
            (api.gil_release)(state);
            may_run
        };
        if may_run {
            return;
        }
        // Left to the main thread. A pool at warn that rises to critical rings the bell; one at
        // critical can come within its reserve without a level change, so it is watched.
        loop {
            if !PENDING.load(Ordering::Acquire)
                || NUDGE_BELL.load(Ordering::Acquire) != bell
                || !any_pool_critical()
            {
                return;
            }
            if refusal_is_next() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(REFUSAL_WATCH_STEP_MS));
        }
    }
}

pub(crate) fn any_pool_critical() -> bool {
    (0..ledger::pool_count())
        .filter_map(ledger::pool)
        .any(|pool| pool.level() >= LEVEL_CRITICAL)
}

/// True when the next step of some pool is a refusal: it is at critical and what is left of its
/// effective budget is no more than its reserve (`QVSHIM_RESERVE` for the host pool, 64 MiB by
/// default; a pool without a reserve, as GPU pools are, only once it is full). Only then may a
/// thread of the shim's own run a collection the app turned off: the alternative is a
/// `MemoryError` (or a NULL) in the app.
pub(crate) fn refusal_is_next() -> bool {
    least_left_at_refusal_step().is_some()
}

/// What is left of the effective budget of the fullest pool at its refusal step, if any.
pub(crate) fn least_left_at_refusal_step() -> Option<u64> {
    (0..ledger::pool_count())
        .filter_map(ledger::pool)
        .filter(|pool| pool.level() >= LEVEL_CRITICAL)
        .filter_map(|pool| {
            let left = pool.effective().saturating_sub(pool.committed());
            (left <= pool.reserve()).then_some(left)
        })
        .min()
}
