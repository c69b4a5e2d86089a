//! The one background thread. Everything slow or lock-taking happens here: reading the
//! machine's memory, lowering the effective budget when the machine runs short, logging level
//! changes and refusals, purging jemalloc's arenas, telling the runtime, writing the dump.
//!
//! The allocation path and signal handlers only [`ring`] the doorbell (an atomic add and a
//! futex wake: async-signal-safe, no allocation, no lock). The thread runs with every signal
//! blocked so the host's signal delivery is unchanged, and it is started again in a fork child.
//! It never panics: a panic would abort the host (panic = "abort").

use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::ledger::{self, LEVEL_CRITICAL, LEVEL_NORMAL, LEVEL_WARN, MAX_POOLS};
use crate::log::Bytes;
use crate::{diag, jemalloc, qlog, runtime, system};

/// How often the machine is read while some pool is at warn or above (at most; a shorter
/// QVSHIM_INTERVAL wins).
pub const PRESSED_INTERVAL_MS: u64 = 100;
/// Anonymous memory past the ledger that is not held against the budget: thread stacks,
/// jemalloc's metadata and the dirty pages it keeps between purges.
pub const UNSEEN_SLACK_BYTES: u64 = 32 << 20;
/// Purges remembered for the dump.
pub const PURGE_HISTORY: usize = 8;
/// jemalloc's dirty pages (resident, not active) from which anonymous memory past the ledger is
/// purged rather than held against the budget.
pub const DIRTY_PURGE_MIN_BYTES: u64 = 16 << 20;
/// At most one such purge this often, so that a process that really holds memory outside the
/// ledger and churns through jemalloc is not purged on every look.
pub const DIRTY_PURGE_EVERY_MS: u64 = 1000;

static LAST_DIRTY_PURGE_MS: AtomicU64 = AtomicU64::new(0);
/// For this long after load the monitor looks often for a CPython still starting up, so that
/// its exit is seen even when it ends early (a process that links libpython and never starts
/// it is not watched often for ever).
pub const PYTHON_START_WATCH_MS: u64 = 5_000;
/// How often the monitor looks while a CPython is starting up.
pub const PYTHON_START_POLL_MS: u64 = 20;

static DOORBELL: AtomicU32 = AtomicU32::new(0);
static DUMP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Held while a requested dump is being written, by the monitor or by the exit path.
static DUMP_WRITING: AtomicBool = AtomicBool::new(false);
/// How long the exit path waits for a dump the monitor is writing.
pub const EXIT_DUMP_WAIT_MS: u64 = 2_000;

static INTERVAL_MS: AtomicU64 = AtomicU64::new(crate::config::DEFAULT_INTERVAL_MS);
static PURGE_INTERVAL_MS: AtomicU64 = AtomicU64::new(crate::config::DEFAULT_PURGE_INTERVAL_MS);
static SYSTEM_RESERVE_BYTES: AtomicU64 =
    AtomicU64::new(crate::config::DEFAULT_SYSTEM_RESERVE_BYTES);

thread_local! {
    static ON_MONITOR: Cell<bool> = const { Cell::new(false) };
}

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

/// Asks the monitor to write the diagnostic dump. Async-signal-safe.
pub fn request_dump() {
    DUMP_REQUESTED.store(true, Ordering::Release);
    ring();
}

/// Writes the requested dump, if one is requested and nobody is writing one. Returns false
/// when another thread is writing a dump now.
fn write_requested_dump() -> bool {
    if DUMP_WRITING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    // Taken after the writing flag is held, so that the exit path sees either the request or
    // the writer.
    if DUMP_REQUESTED.swap(false, Ordering::AcqRel) {
        diag::write_requested_dump();
    }
    DUMP_WRITING.store(false, Ordering::Release);
    true
}

/// At exit: finishes the dump being written and writes one still requested, so that a dump
/// asked for just before the process ends is complete on disk. Waits at most
/// [`EXIT_DUMP_WAIT_MS`] for the monitor.
pub fn finish_requested_dump() {
    let deadline = now_ms().saturating_add(EXIT_DUMP_WAIT_MS);
    while !write_requested_dump() {
        if now_ms() >= deadline {
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

pub fn configure(interval_ms: u64, purge_interval_ms: u64, system_reserve_bytes: u64) {
    INTERVAL_MS.store(interval_ms, Ordering::Relaxed);
    PURGE_INTERVAL_MS.store(purge_interval_ms, Ordering::Relaxed);
    SYSTEM_RESERVE_BYTES.store(system_reserve_bytes, Ordering::Relaxed);
}

pub fn system_reserve_bytes() -> u64 {
    SYSTEM_RESERVE_BYTES.load(Ordering::Relaxed)
}

/// True on the monitor thread.
pub fn on_monitor_thread() -> bool {
    ON_MONITOR.try_with(|c| c.get()).unwrap_or(false)
}

/// Sleeps until the doorbell moves past `seen` or `timeout_ms` passes.
fn wait(seen: u32, timeout_ms: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as libc::c_long,
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

/// Milliseconds of monotonic time.
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

// ---------------------------------------------------------------------------------------------
// The effective budget.

/// Why the host's effective budget is what it is.
pub const REASON_BUDGET: u8 = 0;
pub const REASON_MACHINE: u8 = 1;
pub const REASON_UNSEEN: u8 = 2;

pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_MACHINE => "machine",
        REASON_UNSEEN => "unseen_anon",
        _ => "budget",
    }
}

/// What the effective budget is computed from.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inputs {
    pub budget: u64,
    /// Bytes the ledger holds for the pool (live plus threads' credit).
    pub committed: u64,
    /// The machine's MemAvailable.
    pub available: Option<u64>,
    /// cgroup v2 memory.max minus memory.current.
    pub cgroup_room: Option<u64>,
    /// The process's RssAnon.
    pub rss_anon: Option<u64>,
    pub system_reserve: u64,
}

/// The effective budget and its parts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Effective {
    pub bytes: u64,
    pub reason: u8,
    /// What the process may hold before the machine (or cgroup) is left with only the reserve.
    pub machine_cap: u64,
    /// Anonymous resident memory past the ledger, beyond [`UNSEEN_SLACK_BYTES`].
    pub unseen_anon: u64,
}

/// Never more than the budget; lowered to what the process holds plus what the machine can
/// still give (less the system reserve), and by the anonymous memory the ledger cannot see.
pub fn effective_budget(i: Inputs) -> Effective {
    let room = match (i.available, i.cgroup_room) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    };
    let machine_cap = room.map_or(ledger::UNLIMITED, |room| {
        i.committed
            .saturating_add(room.saturating_sub(i.system_reserve))
    });
    let unseen_anon = i.rss_anon.map_or(0, |anon| {
        anon.saturating_sub(i.committed)
            .saturating_sub(UNSEEN_SLACK_BYTES)
    });
    let anon_cap = if i.budget == ledger::UNLIMITED {
        ledger::UNLIMITED
    } else {
        i.budget.saturating_sub(unseen_anon)
    };
    let mut e = Effective {
        bytes: i.budget,
        reason: REASON_BUDGET,
        machine_cap,
        unseen_anon,
    };
    if machine_cap < e.bytes {
        e.bytes = machine_cap;
        e.reason = REASON_MACHINE;
    }
    if anon_cap < e.bytes {
        e.bytes = anon_cap;
        e.reason = REASON_UNSEEN;
    }
    e
}

static EFFECTIVE_REASON: AtomicU8 = AtomicU8::new(REASON_BUDGET);
static MACHINE_CAP: AtomicU64 = AtomicU64::new(u64::MAX);
static UNSEEN_ANON: AtomicU64 = AtomicU64::new(0);

/// The host pool's last effective-budget computation, for the dump.
pub fn host_effective() -> Effective {
    Effective {
        bytes: ledger::host().effective(),
        reason: EFFECTIVE_REASON.load(Ordering::Relaxed),
        machine_cap: MACHINE_CAP.load(Ordering::Relaxed),
        unseen_anon: UNSEEN_ANON.load(Ordering::Relaxed),
    }
}

/// Reads the machine and sets the host's effective budget.
fn sample_host() {
    let host = ledger::host();
    let cgroup_room = match (system::cgroup_memory_max(), system::cgroup_memory_current()) {
        (Some(max), Some(current)) => Some(max.saturating_sub(current)),
        _ => None,
    };
    let mut inputs = Inputs {
        budget: host.budget(),
        committed: host.committed(),
        available: system::meminfo().map(|m| m.available),
        cgroup_room,
        rss_anon: system::process_memory().map(|p| p.rss_anon),
        system_reserve: system_reserve_bytes(),
    };
    let mut e = effective_budget(inputs);
    // Freed memory jemalloc keeps dirty (until its decay returns it) is resident but unseen by
    // the ledger: give it back rather than hold it against the budget.
    let now = now_ms();
    let last = LAST_DIRTY_PURGE_MS.load(Ordering::Relaxed);
    if e.unseen_anon > 0 && (last == 0 || now.saturating_sub(last) >= DIRTY_PURGE_EVERY_MS) {
        LAST_DIRTY_PURGE_MS.store(now, Ordering::Relaxed);
        let stats = jemalloc::stats();
        if stats.resident.saturating_sub(stats.active) >= DIRTY_PURGE_MIN_BYTES {
            purge(ledger::HOST, host.level(), PURGE_DIRTY);
            inputs.rss_anon = system::process_memory().map(|p| p.rss_anon);
            e = effective_budget(inputs);
        }
    }
    let old_reason = EFFECTIVE_REASON.swap(e.reason, Ordering::Relaxed);
    MACHINE_CAP.store(e.machine_cap, Ordering::Relaxed);
    UNSEEN_ANON.store(e.unseen_anon, Ordering::Relaxed);
    if host.effective() != e.bytes {
        host.set_effective(e.bytes);
    }
    if old_reason != e.reason {
        qlog!(
            Info,
            "host effective budget {} ({}; budget {}, machine cap {}, unseen anonymous {})",
            Bytes(e.bytes),
            reason_name(e.reason),
            Bytes(host.budget()),
            Bytes(e.machine_cap),
            Bytes(e.unseen_anon)
        );
    }
    watch_pressure(system::memory_pressure());
}

/// PSI "some avg10" (hundredths of a percent) from which the machine is said to stall on
/// memory, and below which it is said to be over it.
pub const PRESSURE_STALL_HUNDREDTHS: u32 = 10_00;
pub const PRESSURE_CALM_HUNDREDTHS: u32 = 5_00;

static STALLING: AtomicBool = AtomicBool::new(false);

/// Whether the machine stalls on memory after a PSI reading, given whether it did before: it
/// starts at [`PRESSURE_STALL_HUNDREDTHS`] and stops below [`PRESSURE_CALM_HUNDREDTHS`].
pub fn stalls_after(stalling: bool, some_avg10: u32) -> bool {
    if stalling {
        some_avg10 >= PRESSURE_CALM_HUNDREDTHS
    } else {
        some_avg10 >= PRESSURE_STALL_HUNDREDTHS
    }
}

/// Logs when the machine starts and stops stalling on memory (PSI), whatever the cause: a
/// process that is being starved of memory, here or elsewhere, long before the OOM killer.
fn watch_pressure(pressure: Option<system::Pressure>) {
    let Some(p) = pressure else {
        return;
    };
    let stalling = STALLING.load(Ordering::Relaxed);
    let now = stalls_after(stalling, p.some_avg10);
    if now == stalling {
        return;
    }
    STALLING.store(now, Ordering::Relaxed);
    if now {
        qlog!(
            Warn,
            "the machine stalls on memory: PSI some avg10 {}.{:02}%, full avg10 {}.{:02}%",
            p.some_avg10 / 100,
            p.some_avg10 % 100,
            p.full_avg10 / 100,
            p.full_avg10 % 100
        );
    } else {
        qlog!(
            Info,
            "memory stalls are over: PSI some avg10 {}.{:02}%",
            p.some_avg10 / 100,
            p.some_avg10 % 100
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Purges and their history.

pub const PURGE_ON_RISE: u8 = 0;
pub const PURGE_PERIODIC: u8 = 1;
/// Anonymous memory past the ledger was mostly jemalloc's dirty pages.
pub const PURGE_DIRTY: u8 = 2;

/// The name of a purge's reason, as the dump and the log show it.
pub fn purge_reason_name(reason: u8) -> &'static str {
    match reason {
        PURGE_PERIODIC => "periodic",
        PURGE_DIRTY => "dirty_pages",
        _ => "level_rise",
    }
}

/// One purge as the dump shows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct PurgeRecord {
    pub at_ms: u64,
    pub pool: u8,
    pub reason: u8,
    pub level: u8,
    pub resident_before: u64,
    pub resident_after: u64,
}

struct PurgeSlot {
    at_ms: AtomicU64,
    what: AtomicU32,
    resident_before: AtomicU64,
    resident_after: AtomicU64,
}

static PURGES: [PurgeSlot; PURGE_HISTORY] = [const {
    PurgeSlot {
        at_ms: AtomicU64::new(0),
        what: AtomicU32::new(0),
        resident_before: AtomicU64::new(0),
        resident_after: AtomicU64::new(0),
    }
}; PURGE_HISTORY];
static PURGE_COUNT: AtomicU64 = AtomicU64::new(0);

fn remember_purge(record: PurgeRecord) {
    let n = PURGE_COUNT.load(Ordering::Relaxed);
    if let Some(slot) = PURGES.get((n % PURGE_HISTORY as u64) as usize) {
        slot.at_ms.store(record.at_ms, Ordering::Relaxed);
        slot.what.store(
            u32::from_le_bytes([record.pool, record.reason, record.level, 0]),
            Ordering::Relaxed,
        );
        slot.resident_before
            .store(record.resident_before, Ordering::Relaxed);
        slot.resident_after
            .store(record.resident_after, Ordering::Relaxed);
    }
    PURGE_COUNT.store(n + 1, Ordering::Release);
}

/// The last purges, newest first; returns how many were written to `out`.
pub fn recent_purges(out: &mut [PurgeRecord; PURGE_HISTORY]) -> usize {
    let n = PURGE_COUNT.load(Ordering::Acquire);
    let count = n.min(PURGE_HISTORY as u64) as usize;
    for (k, dst) in out.iter_mut().take(count).enumerate() {
        let index = ((n - 1 - k as u64) % PURGE_HISTORY as u64) as usize;
        if let Some(slot) = PURGES.get(index) {
            let [pool, reason, level, _] = slot.what.load(Ordering::Relaxed).to_le_bytes();
            *dst = PurgeRecord {
                at_ms: slot.at_ms.load(Ordering::Relaxed),
                pool,
                reason,
                level,
                resident_before: slot.resident_before.load(Ordering::Relaxed),
                resident_after: slot.resident_after.load(Ordering::Relaxed),
            };
        }
    }
    count
}

fn purge(index: usize, level: u8, reason: u8) {
    let result = jemalloc::purge();
    if let Some(pool) = ledger::pool(index) {
        pool.purges.fetch_add(1, Ordering::Relaxed);
    }
    remember_purge(PurgeRecord {
        at_ms: now_ms(),
        pool: index as u8,
        reason,
        level,
        resident_before: result.resident_before,
        resident_after: result.resident_after,
    });
    qlog!(
        Info,
        "purged jemalloc arenas ({}): resident {} -> {}",
        purge_reason_name(reason),
        Bytes(result.resident_before),
        Bytes(result.resident_after)
    );
}

// ---------------------------------------------------------------------------------------------
// Level changes.

/// What the monitor last saw of each pool, to tell what changed since.
#[derive(Clone, Copy, Default)]
struct Seen {
    level: u8,
    level_changes: u64,
    refusals: u64,
}

pub fn level_name(level: u8) -> &'static str {
    match level {
        LEVEL_WARN => "warn",
        LEVEL_CRITICAL => "critical",
        _ => "normal",
    }
}

/// "host", or "gpu N" for pool 1 + N.
pub struct PoolName(pub usize);

impl core::fmt::Display for PoolName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 == ledger::HOST {
            f.write_str("host")
        } else {
            write!(f, "gpu {}", self.0.saturating_sub(1))
        }
    }
}

/// Handles what changed in one pool since the last look.
fn check_pool(index: usize, seen: &mut Seen) {
    let Some(pool) = ledger::pool(index) else {
        return;
    };
    let level = pool.level();
    let changes = pool.level_changes.load(Ordering::Relaxed);
    // The same level with new changes means it fell and rose again between two looks.
    let rose = level > seen.level || (level == seen.level && changes != seen.level_changes);
    if level != seen.level || changes != seen.level_changes {
        let old = seen.level;
        seen.level = level;
        seen.level_changes = changes;
        if rose && level > LEVEL_NORMAL {
            // Told first: the runtime's collection runs in its own thread while we purge.
            let told = runtime::tell_rise(index, level);
            pool.notifications
                .fetch_add(told.count(), Ordering::Relaxed);
        }
        let live = ledger::totals(index).live;
        qlog!(
            Warn,
            "{} level {} -> {}: live {} of budget {} ({}%)",
            PoolName(index),
            level_name(old),
            level_name(level),
            Bytes(live),
            Bytes(pool.effective()),
            percent(live, pool.effective())
        );
        runtime::callbacks::call_all(index, old, level);
        if rose && level > LEVEL_NORMAL {
            purge(index, level, PURGE_ON_RISE);
        }
    }
    let refusals = pool.refusals.load(Ordering::Relaxed);
    if refusals != seen.refusals {
        qlog!(
            Warn,
            "{}: refused {} allocation(s) over the budget of {} (largest request {})",
            PoolName(index),
            refusals.wrapping_sub(seen.refusals),
            Bytes(pool.effective()),
            Bytes(pool.largest_refused.load(Ordering::Relaxed))
        );
        seen.refusals = refusals;
    }
}

pub fn percent(part: u64, whole: u64) -> u64 {
    if whole == 0 || whole == ledger::UNLIMITED {
        0
    } else {
        (part as u128 * 100 / whole as u128) as u64
    }
}

/// The highest level of any pool and the first pool at it.
fn highest_level() -> (u8, usize) {
    (0..ledger::pool_count())
        .filter_map(|i| ledger::pool(i).map(|p| (p.level(), i)))
        .fold((LEVEL_NORMAL, ledger::HOST), |best, (level, i)| {
            if level > best.0 {
                (level, i)
            } else {
                best
            }
        })
}

/// How long between two readings of the machine at `level`, `running_ms` after the thread
/// started.
fn sample_interval_ms(level: u8, running_ms: u64) -> u64 {
    let configured = INTERVAL_MS.load(Ordering::Relaxed);
    let python_starting = running_ms < PYTHON_START_WATCH_MS && runtime::python::awaiting_start();
    if python_starting {
        configured.min(PYTHON_START_POLL_MS)
    } else if level > LEVEL_NORMAL {
        configured.min(PRESSED_INTERVAL_MS)
    } else {
        configured
    }
}

fn run() {
    let _ = ON_MONITOR.try_with(|c| c.set(true));
    let mut seen = [Seen::default(); MAX_POOLS];
    let mut last_sample_ms = 0u64;
    let mut never_sampled = true;
    let started_ms = now_ms();
    let mut last_purge_ms = now_ms();
    loop {
        let bell = DOORBELL.load(Ordering::Acquire);
        for (index, pool_seen) in seen.iter_mut().enumerate().take(ledger::pool_count()) {
            check_pool(index, pool_seen);
        }
        if DUMP_REQUESTED.load(Ordering::Acquire) {
            write_requested_dump();
        }
        let now = now_ms();
        let (level, pressed_pool) = highest_level();
        let running_ms = now.saturating_sub(started_ms);
        if now >= last_sample_ms.saturating_add(sample_interval_ms(level, running_ms))
            || never_sampled
        {
            sample_host();
            runtime::python::probe();
            last_sample_ms = now;
            never_sampled = false;
        }
        // Computed afresh each time round: a rise to warn shortens the wait already running.
        let next_sample_ms = last_sample_ms.saturating_add(sample_interval_ms(level, running_ms));
        let purge_interval = PURGE_INTERVAL_MS.load(Ordering::Relaxed);
        if level == LEVEL_NORMAL {
            last_purge_ms = now;
        } else if now.saturating_sub(last_purge_ms) >= purge_interval {
            let told =
                runtime::python::request_periodic_relief(pressed_pool, level, purge_interval);
            if let Some(pool) = ledger::pool(pressed_pool) {
                pool.notifications.fetch_add(told as u64, Ordering::Relaxed);
            }
            purge(pressed_pool, level, PURGE_PERIODIC);
            last_purge_ms = now;
        }
        let mut timeout = next_sample_ms.saturating_sub(now).max(1);
        if level > LEVEL_NORMAL {
            let purge_due = last_purge_ms.saturating_add(purge_interval);
            timeout = timeout.min(purge_due.saturating_sub(now).max(1));
        }
        wait(bell, timeout);
    }
}

/// The monitor thread's stack: the shim's own code needs little, the C API's level callbacks
/// run on it too.
pub const MONITOR_STACK_BYTES: usize = 1 << 20;

/// Starts a detached thread running `entry` with every signal blocked, named `name`, with a
/// stack of `stack_bytes`.
///
/// A raw pthread, not `std::thread`: Rust's thread start registers a thread-local destructor
/// through `__cxa_thread_atexit_impl`, which callocs through the host's malloc, so the shim's
/// thread would hold memory (and a credit slot) in the host's ledger. The only allocation left
/// is the new thread's TLS block, made by `pthread_create` in the calling thread. Returns false
/// when the thread could not be created.
pub fn spawn_thread(
    name: &core::ffi::CStr,
    stack_bytes: usize,
    entry: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
) -> bool {
    // SAFETY: plain sigset and attribute manipulation on valid, local values; the old mask is
    // put back right after the create so only the new thread keeps everything blocked.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, stack_bytes);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut thread: libc::pthread_t = 0;
        let created = libc::pthread_create(&mut thread, &attr, entry, core::ptr::null_mut()) == 0;
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if created {
            libc::pthread_setname_np(thread, name.as_ptr());
        }
        created
    }
}

extern "C" fn monitor_main(_: *mut libc::c_void) -> *mut libc::c_void {
    run();
    core::ptr::null_mut()
}

/// Starts the monitor thread. Failure is logged, never fatal.
pub fn start() {
    if !spawn_thread(c"qvshim-monitor", MONITOR_STACK_BYTES, monitor_main) {
        qlog!(
            Error,
            "could not start the monitor thread; levels will not purge"
        );
    }
}

/// In a fork child the monitor thread did not survive: start a new one.
pub fn after_fork_child() {
    DOORBELL.store(0, Ordering::Relaxed);
    DUMP_REQUESTED.store(false, Ordering::Relaxed);
    DUMP_WRITING.store(false, Ordering::Relaxed);
    runtime::after_fork_child();
    diag::after_fork_child();
    start();
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    #[test]
    fn effective_budget_follows_the_machine_and_unseen_memory() {
        let base = Inputs {
            budget: 6 * G,
            committed: G,
            available: Some(16 * G),
            cgroup_room: None,
            rss_anon: Some(G),
            system_reserve: 512 * M,
        };
        // (inputs, expected effective bytes, expected reason)
        let cases: &[(Inputs, u64, u8)] = &[
            (base, 6 * G, REASON_BUDGET),
            (
                Inputs {
                    available: Some(2 * G),
                    ..base
                },
                G + 2 * G - 512 * M,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    available: Some(16 * G),
                    cgroup_room: Some(G),
                    ..base
                },
                2 * G - 512 * M,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    available: Some(100 * M),
                    ..base
                },
                G,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    rss_anon: Some(3 * G),
                    ..base
                },
                6 * G - (2 * G - UNSEEN_SLACK_BYTES),
                REASON_UNSEEN,
            ),
            (
                Inputs {
                    rss_anon: Some(G + UNSEEN_SLACK_BYTES),
                    ..base
                },
                6 * G,
                REASON_BUDGET,
            ),
            (
                Inputs {
                    budget: ledger::UNLIMITED,
                    available: None,
                    ..base
                },
                ledger::UNLIMITED,
                REASON_BUDGET,
            ),
        ];
        for (inputs, bytes, reason) in cases {
            let e = effective_budget(*inputs);
            assert_eq!(
                (e.bytes, e.reason),
                (*bytes, *reason),
                "inputs {inputs:?} gave {e:?}"
            );
        }
    }

    #[test]
    fn memory_stalls_start_at_ten_percent_and_end_below_five() {
        // (stalling before, PSI some avg10 in hundredths, stalling after)
        let cases: &[(bool, u32, bool)] = &[
            (false, 999, false),
            (false, 1000, true),
            (true, 600, true),
            (true, 500, true),
            (true, 499, false),
            (false, 0, false),
        ];
        for &(before, psi, after) in cases {
            assert_eq!(stalls_after(before, psi), after, "from {before} at {psi}");
        }
    }

    #[test]
    fn purge_history_keeps_the_newest_first() {
        for i in 0..(PURGE_HISTORY as u64 + 3) {
            remember_purge(PurgeRecord {
                at_ms: i,
                resident_before: i * 10,
                ..PurgeRecord::default()
            });
        }
        let mut out = [PurgeRecord::default(); PURGE_HISTORY];
        let n = recent_purges(&mut out);
        assert_eq!(n, PURGE_HISTORY);
        assert_eq!(out[0].at_ms, PURGE_HISTORY as u64 + 2);
        assert_eq!(out[PURGE_HISTORY - 1].at_ms, 3);
    }
}
