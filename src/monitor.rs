//! The one background thread. Everything slow or lock-taking happens here: reading the
//! machine's memory, lowering the effective budget when the machine runs short, logging level
//! changes and refusals, purging jemalloc's arenas, telling the runtime, writing the dump.
//!
//! The allocation path and signal handlers only [`ring`] the doorbell (an atomic add and a
//! futex wake: async-signal-safe, no allocation, no lock). The thread runs with every signal
//! blocked so the host's signal delivery is unchanged, and it is started again in a fork child.
//! It never keeps the process alive: when no thread of the program is left, it ends the process
//! the way glibc would have (see [`program_threads`]).
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
    /// The memory cgroup's room: the least limit minus usage (v1 or v2) from the process's
    /// cgroup up.
    pub cgroup_room: Option<u64>,
    /// The process's RssAnon.
    pub rss_anon: Option<u64>,
    /// Left to the rest of the machine: taken from MemAvailable.
    pub system_reserve: u64,
    /// Left in the cgroup: taken from its room. The pool's reserve (QVSHIM_RESERVE), what the
    /// process may still commit past its effective budget: so the ledger never takes the cgroup
    /// past its limit. Not the system reserve, which is for the machine: 512 MiB of a 600 MiB
    /// container's room would leave a budget of under 100 MiB.
    pub cgroup_margin: u64,
    /// The machine cap never goes below this (nor above the budget): [`effective_floor_bytes`].
    pub floor: u64,
}

/// The floor of the machine cap: the smallest budget there is ([`MIN_BUDGET_BYTES`]), so that
/// a machine with no room past the system reserve (out of memory, or a reserve set too large
/// for it) leaves the process what an interpreter needs to start and to handle a MemoryError,
/// rather than refusing its start-up. Nothing larger: on a machine that is truly out of memory
/// the cap is doing its job, and 16 MiB more is not what pushes it into swap.
///
/// [`MIN_BUDGET_BYTES`]: crate::config::MIN_BUDGET_BYTES
pub fn effective_floor_bytes() -> u64 {
    crate::config::MIN_BUDGET_BYTES
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
    /// The machine had no room past the system reserve: the cap is what the process holds, or
    /// the floor.
    pub no_room: bool,
}

/// Never more than the budget; lowered to what the process holds plus what the machine can
/// still give (less the system reserve) and what its memory cgroup can still give (less the
/// cgroup margin), but not below the floor, and by the anonymous memory the ledger cannot see.
pub fn effective_budget(i: Inputs) -> Effective {
    let beyond = |room: u64, margin: u64| i.committed.saturating_add(room.saturating_sub(margin));
    let machine_room = i.available.map(|a| beyond(a, i.system_reserve));
    let cgroup_room = i.cgroup_room.map(|c| beyond(c, i.cgroup_margin));
    let no_room = i.available.is_some_and(|a| a <= i.system_reserve);
    let machine_cap = match (machine_room, cgroup_room) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
    .map_or(ledger::UNLIMITED, |cap| cap.max(i.floor.min(i.budget)));
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
        no_room,
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
        no_room: NO_ROOM_SAID.load(Ordering::Relaxed),
    }
}

/// Set once the process was told that the machine has no room past the system reserve: said
/// once per process, not at every look.
static NO_ROOM_SAID: AtomicBool = AtomicBool::new(false);

/// Reads the machine and sets the host's effective budget.
fn sample_host() {
    let host = ledger::host();
    let cgroup_room = system::cgroup_memory().map(|m| m.room);
    let mut inputs = Inputs {
        budget: host.budget(),
        committed: host.committed(),
        available: system::meminfo().map(|m| m.available),
        cgroup_room,
        rss_anon: system::process_memory().map(|p| p.rss_anon),
        system_reserve: system_reserve_bytes(),
        cgroup_margin: host.reserve(),
        floor: effective_floor_bytes(),
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
    if e.no_room && !NO_ROOM_SAID.swap(true, Ordering::Relaxed) {
        let room = inputs.available.unwrap_or(0);
        qlog!(
            Warn,
            "QVSHIM_SYSTEM_RESERVE {} leaves no room for this process (the machine has {} available): \
             host effective budget held at its floor of {} or what the process holds ({}), said once",
            Bytes(inputs.system_reserve),
            Bytes(room),
            Bytes(inputs.floor.min(inputs.budget)),
            Bytes(inputs.committed)
        );
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

/// How a pool's level moved between two looks of the monitor, as its log line tells it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LevelChange {
    old: u8,
    new: u8,
    /// Level changes the ledger counted since the last look (more than one when the pool
    /// moved and came back before the monitor looked).
    changes: u64,
}

impl LevelChange {
    /// Rises to warn or critical are warnings; falls, and a return to normal, are information.
    fn log_level(self) -> crate::log::Level {
        if self.new > self.old || (self.new == self.old && self.new > LEVEL_NORMAL) {
            crate::log::Level::Warn
        } else {
            crate::log::Level::Info
        }
    }
}

impl core::fmt::Display for LevelChange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (old, new) = (level_name(self.old), level_name(self.new));
        if self.old != self.new {
            return write!(f, "{old} -> {new}");
        }
        // Same level, yet it changed: it left and came back between two looks.
        if self.new == LEVEL_NORMAL {
            write!(f, "rose above normal and fell back to normal")?;
        } else {
            write!(f, "left {new} and came back to {new}")?;
        }
        write!(f, " ({} changes since the last look)", self.changes)
    }
}

#[cfg(test)]
mod level_change_tests {
    use super::*;
    use crate::log::Level;

    #[test]
    fn level_lines_never_name_the_same_level_twice_and_falls_are_info() {
        let cases: &[(u8, u8, u64, Level, &str)] = &[
            (LEVEL_NORMAL, LEVEL_WARN, 1, Level::Warn, "normal -> warn"),
            (
                LEVEL_NORMAL,
                LEVEL_CRITICAL,
                2,
                Level::Warn,
                "normal -> critical",
            ),
            (
                LEVEL_CRITICAL,
                LEVEL_WARN,
                1,
                Level::Info,
                "critical -> warn",
            ),
            (LEVEL_WARN, LEVEL_NORMAL, 1, Level::Info, "warn -> normal"),
            (
                LEVEL_NORMAL,
                LEVEL_NORMAL,
                2,
                Level::Info,
                "rose above normal and fell back to normal (2 changes since the last look)",
            ),
            (
                LEVEL_WARN,
                LEVEL_WARN,
                2,
                Level::Warn,
                "left warn and came back to warn (2 changes since the last look)",
            ),
        ];
        for &(old, new, changes, level, text) in cases {
            let change = LevelChange { old, new, changes };
            assert_eq!(change.to_string(), text, "{change:?}");
            assert_eq!(change.log_level(), level, "{change:?}");
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
        let old_changes = seen.level_changes;
        seen.level = level;
        seen.level_changes = changes;
        if rose && level > LEVEL_NORMAL {
            // Told first: the runtime's collection runs in its own thread while we purge.
            let told = runtime::tell_rise(index, level);
            pool.notifications
                .fetch_add(told.count(), Ordering::Relaxed);
        }
        let live = ledger::totals(index).live;
        let change = LevelChange {
            old,
            new: level,
            changes: changes.wrapping_sub(old_changes),
        };
        if crate::log::enabled(change.log_level()) {
            crate::log::write_line(
                change.log_level(),
                format_args!(
                    "{} level {}: live {} of budget {} ({}%)",
                    PoolName(index),
                    change,
                    Bytes(live),
                    Bytes(pool.effective()),
                    percent(live, pool.effective())
                ),
            );
        }
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

// ---------------------------------------------------------------------------------------------
// The process's end.
//
// glibc ends a process with exit(0) when its last thread ends (main called pthread_exit, then
// the last worker returned). It counts every thread pthread_create made, the shim's own among
// them, so while the monitor lives that moment never comes: the process would live on with only
// the shim's threads, which block every signal, so not even SIGTERM could end it. The monitor
// stands in for glibc: when no thread but the shim's is left, it calls exit(0).

/// Threads the shim started that run now (the monitor, the Python nudge thread). Counted only
/// once pthread_create has returned, so the count is never ahead of the kernel's: a mistake
/// can only make the program look as if it had one thread more, never one less.
static SHIM_THREADS: AtomicU32 = AtomicU32::new(0);
/// Set when a thread of the program ends (the ledger's thread-exit destructor): the monitor
/// looks at the thread count again over the next moments, while the thread finishes dying.
static THREAD_ENDED: AtomicBool = AtomicBool::new(false);
/// After a thread ended, how long the monitor waits before each new look (the thread runs its
/// destructors before the kernel removes it).
pub const THREAD_END_RECHECK_MS: [u64; 7] = [1, 2, 5, 10, 20, 50, 100];
/// After a look at the count, threads that end within this long do not wake the monitor; it
/// comes back to look when it is over. A program that churns through threads wakes it at most
/// this often, not on every thread's end.
pub const THREAD_LOOK_GAP_MS: u64 = 10;
/// Until when (monotonic ms) a thread's end does not ring the doorbell.
static QUIET_UNTIL_MS: AtomicU64 = AtomicU64::new(0);
/// The program's threads are counted at least this often, whatever QVSHIM_INTERVAL says: a
/// thread that never allocated ends without ringing the doorbell.
pub const THREAD_COUNT_EVERY_MS: u64 = 1000;
/// ... and this often once the main thread is gone (pthread_exit): then the end of any thread
/// may be the process's.
pub const THREAD_COUNT_MAIN_GONE_EVERY_MS: u64 = 100;

/// Called by a thread of the program as it ends (from a pthread key destructor): the monitor
/// looks whether any is left, now or when the [`THREAD_LOOK_GAP_MS`] after its last look is
/// over. Async-signal-safe, no allocation: an atomic store, the vDSO clock, and at most a
/// futex wake.
pub fn thread_ended() {
    THREAD_ENDED.store(true, Ordering::Release);
    if now_ms() >= QUIET_UNTIL_MS.load(Ordering::Acquire) {
        ring();
    }
}

/// The kernel's PF_EXITING in the flags of `/proc/self/stat`: the main thread is in its exit.
const PF_EXITING: u64 = 0x4;

/// What `/proc/self/stat` says: the process id, whether the main thread ended (a zombie, or
/// exiting), and the number of threads (a main thread that called pthread_exit is a zombie and
/// still counted).
pub fn parse_stat_threads(text: &[u8]) -> Option<(u64, bool, u64)> {
    let pid = system::parse_u64(text)?;
    // The command name is in parentheses and may itself hold ')' or spaces.
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = text.get(close + 1..)?;
    let mut fields = rest.split(|&b| b == b' ').filter(|field| !field.is_empty());
    let state = *fields.next()?.first()?;
    // flags is the 9th field, the 6th after the state; num_threads the 20th.
    let flags = system::parse_u64(fields.nth(5)?)?;
    let threads = system::parse_u64(fields.nth(10)?)?;
    Some((pid, state == b'Z' || flags & PF_EXITING != 0, threads))
}

/// The program's threads, as the monitor counts them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProgramThreads {
    /// Alive: the kernel's count less the shim's threads and a main thread that is a zombie.
    pub left: u64,
    /// The main thread ended (pthread_exit): a zombie, or on its way to being one. (In an
    /// exit_group the other threads, the monitor among them, are killed before the main thread
    /// exits, so the monitor never sees this and acts on it.)
    pub main_gone: bool,
}

/// Counts the program's threads. None when /proc cannot tell (then the process is never ended
/// by the shim).
pub fn program_threads() -> Option<ProgramThreads> {
    let mut buf = [0u8; 1024];
    let (pid, main_gone, threads) =
        parse_stat_threads(system::read_file(c"/proc/self/stat", &mut buf)?)?;
    // SAFETY: getpid has no preconditions.
    if pid != unsafe { libc::getpid() } as u64 {
        return None;
    }
    Some(ProgramThreads {
        left: threads
            .saturating_sub(u64::from(main_gone))
            .saturating_sub(SHIM_THREADS.load(Ordering::Acquire) as u64),
        main_gone,
    })
}

/// Ends the process as glibc would have when its last thread ended: exit(0), so atexit
/// handlers run and stdio is flushed. Only called when no thread of the program is left, so
/// nothing of the program runs at the same time.
fn end_like_the_last_thread() -> ! {
    qlog!(
        Info,
        "the program's last thread ended; ending the process with status 0 as glibc would"
    );
    // SAFETY: exit may be called from any thread; no thread of the program is left to race
    // with the handlers it runs.
    unsafe { libc::exit(0) }
}

fn run() {
    let _ = ON_MONITOR.try_with(|c| c.set(true));
    let mut seen = [Seen::default(); MAX_POOLS];
    let mut last_sample_ms = 0u64;
    let mut never_sampled = true;
    let started_ms = now_ms();
    let mut last_purge_ms = now_ms();
    // Where the looks after a thread's end are in THREAD_END_RECHECK_MS (past its end: none
    // due).
    let mut recheck = THREAD_END_RECHECK_MS.len();
    let mut last_count_ms = 0u64;
    let mut count_every_ms = THREAD_COUNT_EVERY_MS;
    loop {
        let bell = DOORBELL.load(Ordering::Acquire);
        let counted_ms = now_ms();
        let thread_ended = THREAD_ENDED.swap(false, Ordering::AcqRel);
        // A sequence of quick looks runs to its end before another starts, so a program that
        // churns through threads gets a few looks a second, not one per thread.
        if thread_ended && recheck >= THREAD_END_RECHECK_MS.len() {
            recheck = 0;
        }
        if thread_ended {
            QUIET_UNTIL_MS.store(
                counted_ms.saturating_add(THREAD_LOOK_GAP_MS),
                Ordering::Release,
            );
        }
        if recheck < THREAD_END_RECHECK_MS.len()
            || counted_ms >= last_count_ms.saturating_add(count_every_ms)
        {
            last_count_ms = counted_ms;
            let count = program_threads();
            if count.is_some_and(|c| c.left == 0) {
                end_like_the_last_thread();
            }
            count_every_ms = if count.is_some_and(|c| c.main_gone) {
                THREAD_COUNT_MAIN_GONE_EVERY_MS
            } else {
                THREAD_COUNT_EVERY_MS
            };
        }
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
            if running_ms >= PYTHON_START_WATCH_MS {
                runtime::python::start_watch_over();
            }
            diag::check_dump_signal();
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
        let count_due_ms = last_count_ms.saturating_add(count_every_ms);
        timeout = timeout.min(count_due_ms.saturating_sub(now).max(1));
        if thread_ended {
            // Threads that end in the quiet time after this look only set the flag.
            timeout = timeout.min(THREAD_LOOK_GAP_MS + 1);
        }
        if let Some(&next_look_ms) = THREAD_END_RECHECK_MS.get(recheck) {
            timeout = timeout.min(next_look_ms);
            recheck += 1;
        }
        wait(bell, timeout);
    }
}

/// The monitor thread's stack: the shim's own code needs little, the C API's level callbacks
/// run on it too.
pub const MONITOR_STACK_BYTES: usize = 1 << 20;

/// Starts a detached thread running `entry` with every signal blocked, named `name`, with a
/// stack of `stack_bytes`. The thread must never end: it is counted as the shim's for good (see
/// [`program_threads`]).
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
            // Counted after the create: until now the kernel already counts the thread and
            // the program looks one thread larger, never smaller.
            SHIM_THREADS.fetch_add(1, Ordering::AcqRel);
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
    // Only the forking thread lives on in the child: none of the shim's.
    SHIM_THREADS.store(0, Ordering::Relaxed);
    THREAD_ENDED.store(false, Ordering::Relaxed);
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
            cgroup_margin: 64 * M,
            floor: 16 * M,
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
                2 * G - 64 * M,
                REASON_MACHINE,
            ),
            // A 600 MiB cgroup with 100 MiB used (the process holds 50 MiB): the cgroup keeps
            // the pool's reserve, not the machine's 512 MiB.
            (
                Inputs {
                    budget: 408 * M,
                    committed: 50 * M,
                    rss_anon: Some(50 * M),
                    cgroup_room: Some(500 * M),
                    ..base
                },
                408 * M,
                REASON_BUDGET,
            ),
            (
                Inputs {
                    budget: 408 * M,
                    committed: 50 * M,
                    rss_anon: Some(50 * M),
                    cgroup_room: Some(300 * M),
                    ..base
                },
                50 * M + 300 * M - 64 * M,
                REASON_MACHINE,
            ),
            // A full cgroup: the floor, without the machine's line (no_room is the machine's).
            (
                Inputs {
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    cgroup_room: Some(10 * M),
                    ..base
                },
                16 * M,
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
            // A system reserve past the machine's room: held at the floor, not at what the
            // process held at its first look (a few KiB before an interpreter starts).
            (
                Inputs {
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    system_reserve: 100 * G,
                    ..base
                },
                16 * M,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    available: Some(0),
                    ..base
                },
                16 * M,
                REASON_MACHINE,
            ),
            // Above the floor the machine cap is what the process holds: the cap's purpose.
            (
                Inputs {
                    committed: 200 * M,
                    rss_anon: Some(200 * M),
                    available: Some(0),
                    ..base
                },
                200 * M,
                REASON_MACHINE,
            ),
            // Never above the budget, even when the floor is.
            (
                Inputs {
                    budget: 8 * M,
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    available: Some(0),
                    ..base
                },
                8 * M,
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
            let room = inputs.available.unwrap_or(u64::MAX);
            assert_eq!(e.no_room, room <= inputs.system_reserve, "{inputs:?}");
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
    fn stat_gives_the_pid_whether_main_ended_and_the_thread_count() {
        // flags 0x400100: a live main thread; 0x40810c: one with PF_EXITING (0x4).
        let live = "0 -1 4194560 302 0 0 0 1 8 0 0 20 0 3 0 77122 0 0";
        let exiting = "0 -1 4227084 302 0 0 0 1 8 0 0 20 0 2 0 77122 0 0";
        // (a /proc/self/stat line, (pid, main ended, threads))
        let cases: &[(String, Option<(u64, bool, u64)>)] = &[
            (
                format!("30339 (lt) S 30337 30337 8767 {live}"),
                Some((30339, false, 3)),
            ),
            (
                format!("30339 (lt) Z 30337 30337 8767 {exiting}"),
                Some((30339, true, 2)),
            ),
            (
                format!("30339 (lt) R 30337 30337 8767 {exiting}"),
                Some((30339, true, 2)),
            ),
            (
                format!("7 (a) b) (c) S 1 30337 8767 {live}"),
                Some((7, false, 3)),
            ),
            ("30339 (lt) Z 30337".into(), None),
            ("".into(), None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_stat_threads(line.as_bytes()), *want, "{line:?}");
        }
    }

    #[test]
    fn this_test_process_has_threads_of_its_own() {
        let count = program_threads();
        assert!(
            count.is_some_and(|c| c.left >= 1 && !c.main_gone),
            "{count:?}"
        );
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
