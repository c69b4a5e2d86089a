//! The one background thread. Everything slow or lock-taking happens here: logging level
//! changes and refusals, purging jemalloc's arenas.
//!
//! The allocation path and signal handlers only [`ring`] the doorbell (an atomic add and a
//! futex wake: async-signal-safe, no allocation, no lock). The thread runs with every signal
//! blocked so the host's signal delivery is unchanged, and it is started again in a fork child.

use core::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::ledger::{self, LEVEL_CRITICAL, LEVEL_NORMAL, LEVEL_WARN, MAX_POOLS};
use crate::log::Bytes;
use crate::qlog;

/// How long the monitor sleeps when nothing rings.
pub const IDLE_INTERVAL: Duration = Duration::from_secs(1);

static DOORBELL: AtomicU32 = AtomicU32::new(0);

/// Wakes the monitor. Async-signal-safe: one atomic add and one futex syscall.
pub fn ring() {
    DOORBELL.fetch_add(1, Ordering::Release);
    // SAFETY: FUTEX_WAKE on a valid, static, aligned u32; wakes at most one waiter.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            DOORBELL.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

/// Sleeps until the doorbell moves past `seen` or `timeout` passes.
fn wait(seen: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, static, aligned u32 with a valid relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            DOORBELL.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            seen,
            &ts as *const libc::timespec,
        )
    };
}

/// What the monitor last saw of each pool, to tell what changed since.
#[derive(Clone, Copy, Default)]
struct Seen {
    level: u8,
    refusals: u64,
}

fn level_name(level: u8) -> &'static str {
    match level {
        LEVEL_WARN => "warn",
        LEVEL_CRITICAL => "critical",
        _ => "normal",
    }
}

fn pool_name(index: usize) -> (&'static str, i64) {
    if index == ledger::HOST {
        ("host", -1)
    } else {
        ("gpu", index as i64 - 1)
    }
}

/// Handles what changed in one pool since the last look.
fn check_pool(index: usize, seen: &mut Seen) {
    let Some(pool) = ledger::pool(index) else {
        return;
    };
    let level = pool.level();
    if level != seen.level {
        let live = ledger::totals(index).live;
        let (name, device) = pool_name(index);
        let rose = level > seen.level;
        if device < 0 {
            qlog!(
                Warn,
                "{name} level {} -> {}: live {} of budget {} ({}%)",
                level_name(seen.level),
                level_name(level),
                Bytes(live),
                Bytes(pool.effective()),
                percent(live, pool.effective())
            );
        } else {
            qlog!(
                Warn,
                "{name} {device} level {} -> {}: live {} of budget {} ({}%)",
                level_name(seen.level),
                level_name(level),
                Bytes(live),
                Bytes(pool.effective()),
                percent(live, pool.effective())
            );
        }
        if rose && level > LEVEL_NORMAL {
            let purge = crate::jemalloc::purge();
            pool.purges.fetch_add(1, Ordering::Relaxed);
            qlog!(
                Info,
                "purged jemalloc arenas: resident {} -> {}",
                Bytes(purge.resident_before),
                Bytes(purge.resident_after)
            );
        }
        seen.level = level;
    }
    let refusals = pool.refusals.load(Ordering::Relaxed);
    if refusals != seen.refusals {
        let (name, _) = pool_name(index);
        qlog!(
            Warn,
            "{name}: refused {} allocation(s) over the budget of {} (largest request {})",
            refusals.wrapping_sub(seen.refusals),
            Bytes(pool.effective()),
            Bytes(pool.largest_refused.load(Ordering::Relaxed))
        );
        seen.refusals = refusals;
    }
}

fn percent(part: u64, whole: u64) -> u64 {
    if whole == 0 || whole == ledger::UNLIMITED {
        0
    } else {
        (part as u128 * 100 / whole as u128) as u64
    }
}

fn run() {
    let mut seen = [Seen::default(); MAX_POOLS];
    loop {
        let bell = DOORBELL.load(Ordering::Acquire);
        for (index, pool_seen) in seen.iter_mut().enumerate().take(ledger::pool_count()) {
            check_pool(index, pool_seen);
        }
        wait(bell, IDLE_INTERVAL);
    }
}

/// Starts the monitor thread with every signal blocked. Failure is logged, never fatal.
pub fn start() {
    // SAFETY: plain sigset manipulation on valid, local sigset_t values; the old mask is put
    // back right after the spawn so only the new thread keeps everything blocked.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let spawned = std::thread::Builder::new()
            .name("qvshim-monitor".into())
            .stack_size(256 << 10)
            .spawn(run);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        if spawned.is_err() {
            qlog!(
                Error,
                "could not start the monitor thread; levels will not purge"
            );
        }
    }
}

/// In a fork child the monitor thread did not survive: start a new one.
pub fn after_fork_child() {
    DOORBELL.store(0, Ordering::Relaxed);
    start();
}
