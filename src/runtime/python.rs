//! CPython relief: when a pool rises to warn, the interpreter's main thread runs `gc.collect()`
//! and the app's callbacks (`sys.modules["qvshim"]._on_pressure(level, pool)`, which the Python
//! companion provides); at critical it also empties torch's CUDA cache (when torch is imported
//! and CUDA initialised).
//!
//! CPython is found at run time with `dlsym(RTLD_DEFAULT, ...)`: nothing links libpython, and a
//! process without Python never resolves anything. The monitor thread only queues the work with
//! `Py_AddPendingCall` (documented as callable from any thread without the GIL) and nudges the
//! main thread (see below); the work runs in the main thread, with the GIL, between two
//! bytecodes of the app, never inside an allocation. When the main thread is not executing
//! Python code (blocked in C with the GIL released), the nudge thread runs it instead, holding
//! the GIL, but only where the app's own collector could have run it: while `gc.isenabled()`,
//! or when the next step is a refusal (`nudge::refusal_is_next`). After `gc.disable()` the app
//! expects finalizers on its own threads only (a Tcl interpreter deleted by another thread
//! aborts the process). An exception raised there is printed through `sys.unraisablehook`,
//! logged and cleared; it never reaches the app.
//!
//! At most one relief is queued at a time; a rise while one is queued raises its level.
//!
//! While a pool stays above normal the monitor asks again every `QVSHIM_PURGE_INTERVAL`; a
//! relief that freed nothing doubles the wait before the next of those ([`backoff_wait_ms`]),
//! so that a program sitting at warn is not collected over and over for nothing.
//!
//! This file asks for reliefs and backs off; below it, [`interpreter`] finds CPython and hooks
//! its exit, [`relief`] is what runs inside it, [`nudge`] is the thread that gets it run.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::base::log::qlog;
use crate::ledger::LEVEL_WARN;
use crate::runtime::arena;

pub mod interpreter;
pub mod nudge;
pub mod relief;

use interpreter::{api, ENABLED};
use nudge::{nudge, NUDGE_THREAD_RUNS};
use relief::{
    note_fruitless, relief, APP_CALLBACK_RUNS, BACKOFF_MAX_DOUBLINGS, CUDA_CACHE_EMPTIED, ERRORS,
    FRUITLESS, IN_QUEUE, LAST_COLLECTED, LAST_HOST_AFTER, LAST_HOST_BEFORE, PENDING, REQUEST_LEVEL,
    REQUEST_POOL, RUNS,
};

pub use interpreter::{
    awaiting_start, configure, count_arenas_before_start, detected, may_start, probe,
    run_after_start, set_exit_report, start_watch_over,
};
pub use relief::RELIEF_FREED_MIN_BYTES;

/// Reliefs queued in CPython's pending-call queue, for the dump.
static QUEUED: AtomicU64 = AtomicU64::new(0);
/// The wait between periodic reliefs that free nothing doubles up to this many times
/// `QVSHIM_PURGE_INTERVAL`...
pub const BACKOFF_MAX_FACTOR: u64 = 32;
/// ... or this, when longer, so that a very short interval still backs off far.
pub const BACKOFF_CAP_MIN_MS: u64 = 30_000;
/// When the last relief was asked for (monotonic ms), and for which pool and level.
static LAST_ASKED_MS: AtomicU64 = AtomicU64::new(0);
static LAST_ASKED_FOR: AtomicU32 = AtomicU32::new(u32::MAX);
/// Periodic reliefs skipped because the last ones freed nothing.
static BACKED_OFF: AtomicU64 = AtomicU64::new(0);

/// Queues a relief for `pool`, which rose to `level`, in the main thread; true when one was
/// queued now or is already waiting. A rise starts the backoff afresh. Monitor thread only.
pub fn request_relief(pool: usize, level: u8) -> bool {
    if !ENABLED.load(Ordering::Relaxed) || level < LEVEL_WARN {
        return false;
    }
    FRUITLESS.store(0, Ordering::Relaxed);
    LAST_ASKED_FOR.store(asked_for(pool, level), Ordering::Relaxed);
    queue_relief(pool, level)
}

/// The periodic relief, asked for every `interval_ms` (`QVSHIM_PURGE_INTERVAL`) while `pool`
/// stays at `level` (warn or critical); true when one was queued now or is already waiting.
/// Skipped until [`backoff_wait_ms`] has passed since the last one was asked for. Monitor
/// thread only.
pub fn request_periodic_relief(pool: usize, level: u8, interval_ms: u64) -> bool {
    if !ENABLED.load(Ordering::Relaxed) || level < LEVEL_WARN {
        return false;
    }
    if LAST_ASKED_FOR.swap(asked_for(pool, level), Ordering::Relaxed) != asked_for(pool, level) {
        FRUITLESS.store(0, Ordering::Relaxed);
    }
    let since_ms =
        crate::base::clock::now_ms().saturating_sub(LAST_ASKED_MS.load(Ordering::Relaxed));
    if since_ms < backoff_wait_ms(interval_ms, FRUITLESS.load(Ordering::Relaxed)) {
        BACKED_OFF.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    if PENDING.load(Ordering::Acquire) {
        // The last one is still waiting for the main thread: asking again frees nothing either.
        note_fruitless();
    }
    queue_relief(pool, level)
}

/// How long after the last relief the periodic one is asked for again, after `fruitless`
/// reliefs in a row freed nothing: `interval_ms` doubled that many times, up to 32 times
/// `interval_ms` or 30 s, whichever is longer.
pub fn backoff_wait_ms(interval_ms: u64, fruitless: u32) -> u64 {
    let cap_ms = interval_ms
        .saturating_mul(BACKOFF_MAX_FACTOR)
        .max(BACKOFF_CAP_MIN_MS);
    interval_ms
        .saturating_mul(1u64 << fruitless.min(BACKOFF_MAX_DOUBLINGS))
        .min(cap_ms)
}

fn asked_for(pool: usize, level: u8) -> u32 {
    (pool as u32) << 8 | level as u32
}

/// Queues the relief; true when one was queued now or is already waiting.
fn queue_relief(pool: usize, level: u8) -> bool {
    let Some(api) = api() else {
        return false;
    };
    LAST_ASKED_MS.store(crate::base::clock::now_ms(), Ordering::Relaxed);
    REQUEST_LEVEL.fetch_max(level, Ordering::AcqRel);
    REQUEST_POOL.store(pool as u8, Ordering::Release);
    PENDING.store(true, Ordering::Release);
    // One entry in CPython's queue at a time: an entry already there runs this request too.
    if !IN_QUEUE.swap(true, Ordering::AcqRel) {
        // SAFETY: documented as callable from any thread without the GIL; relief has the
        // Py_AddPendingCall callback signature.
        if unsafe { (api.add_pending_call)(relief, core::ptr::null_mut()) } != 0 {
            IN_QUEUE.store(false, Ordering::Release);
            qlog!(
                Warn,
                "python relief not queued: CPython's pending-call queue is full; the nudge \
                 thread will run it"
            );
        } else {
            QUEUED.fetch_add(1, Ordering::Relaxed);
        }
    }
    nudge();
    true
}

/// The relief's figures for the dump.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub enabled: bool,
    pub detected: bool,
    pub queued: u64,
    pub runs: u64,
    /// Reliefs the nudge thread ran because the main thread was not executing Python code.
    pub nudge_thread_runs: u64,
    pub errors: u64,
    pub cuda_cache_emptied: u64,
    pub app_callback_runs: u64,
    /// Objects the last gc.collect() found unreachable; -1 before the first.
    pub last_collected: i64,
    pub last_host_before: u64,
    pub last_host_after: u64,
    /// Reliefs in a row that freed nothing (the periodic one waits 2^this intervals).
    pub fruitless: u64,
    /// Periodic reliefs skipped while backing off.
    pub backed_off: u64,
}

pub fn stats() -> Stats {
    Stats {
        enabled: ENABLED.load(Ordering::Relaxed),
        detected: detected(),
        queued: QUEUED.load(Ordering::Relaxed),
        runs: RUNS.load(Ordering::Relaxed),
        nudge_thread_runs: NUDGE_THREAD_RUNS.load(Ordering::Relaxed),
        errors: ERRORS.load(Ordering::Relaxed),
        cuda_cache_emptied: CUDA_CACHE_EMPTIED.load(Ordering::Relaxed),
        app_callback_runs: APP_CALLBACK_RUNS.load(Ordering::Relaxed),
        last_collected: LAST_COLLECTED.load(Ordering::Relaxed),
        last_host_before: LAST_HOST_BEFORE.load(Ordering::Relaxed),
        last_host_after: LAST_HOST_AFTER.load(Ordering::Relaxed),
        fruitless: FRUITLESS.load(Ordering::Relaxed) as u64,
        backed_off: BACKED_OFF.load(Ordering::Relaxed),
    }
}

/// In a fork child the next rise queues afresh. An entry the parent had queued stays in the
/// child's CPython queue and runs there as a no-op (or takes the child's next request).
pub fn after_fork_child() {
    arena::after_fork_child();
    PENDING.store(false, Ordering::Relaxed);
    IN_QUEUE.store(false, Ordering::Relaxed);
    REQUEST_LEVEL.store(0, Ordering::Relaxed);
    FRUITLESS.store(0, Ordering::Relaxed);
    LAST_ASKED_MS.store(0, Ordering::Relaxed);
    LAST_ASKED_FOR.store(u32::MAX, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_interval_up_to_its_cap() {
        let cases: &[(u64, u32, u64)] = &[
            // (interval ms, fruitless reliefs in a row, wait ms)
            (10, 0, 10),
            (10, 1, 20),
            (10, 5, 320),
            (10, 11, 20_480),
            (10, 12, BACKOFF_CAP_MIN_MS),
            (10, u32::MAX, BACKOFF_CAP_MIN_MS),
            (30_000, 0, 30_000),
            (30_000, 5, 30_000 * BACKOFF_MAX_FACTOR),
            (30_000, 40, 30_000 * BACKOFF_MAX_FACTOR),
            (u64::MAX, 3, u64::MAX),
        ];
        for &(interval_ms, fruitless, wait_ms) in cases {
            assert_eq!(
                backoff_wait_ms(interval_ms, fruitless),
                wait_ms,
                "interval {interval_ms} ms after {fruitless} fruitless reliefs"
            );
        }
    }
}
