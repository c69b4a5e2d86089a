//! The one background thread: the loop and its decisions. Everything slow or lock-taking
//! happens here: reading the machine's memory, lowering the effective budget when the machine
//! runs short, logging level changes and refusals, purging jemalloc's arenas, telling the
//! runtime, writing a requested dump. Policy only: every mechanism it uses lives in a layer
//! below (the doorbell and thread helpers in `base`, the effective budget and purges in
//! `ledger`, the dump in `diag`).
//!
//! The allocation path and signal handlers only ring the doorbell ([`doorbell::ring`]: an
//! atomic add and a futex wake, async-signal-safe, no allocation, no lock). The thread runs with
//! every signal blocked so the host's signal delivery is unchanged, and it is started again in a
//! fork child. It never keeps the process alive: when no thread of the program is left, it ends
//! the process the way glibc would have (see [`program_threads`]).
//! It never panics: a panic would abort the host (panic = "abort").

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::base::cgroup;
use crate::base::clock::now_ms;
use crate::base::doorbell;
use crate::base::log::qlog;
use crate::base::log::Bytes;
use crate::base::threads::{
    self, program_threads, spawn_thread, THREAD_COUNT_EVERY_MS, THREAD_COUNT_MAIN_GONE_EVERY_MS,
    THREAD_END_RECHECK_MS, THREAD_LOOK_GAP_MS,
};
use crate::base::{jemalloc, system};
use crate::ledger::device_effective::{self, device_effective, DeviceInputs};
use crate::ledger::effective::{
    self, effective_budget, effective_floor_bytes, reason_name, Inputs,
};
use crate::ledger::purges::{purge, PURGE_DIRTY, PURGE_ON_RISE, PURGE_PERIODIC};
use crate::ledger::{self, level_name, percent, PoolName, LEVEL_NORMAL, MAX_POOLS};
use crate::{diag, runtime};

/// How often the machine is read while some pool is at warn or above (at most; a shorter
/// QVSHIM_INTERVAL wins).
pub const PRESSED_INTERVAL_MS: u64 = 100;
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

static INTERVAL_MS: AtomicU64 = AtomicU64::new(crate::base::config::DEFAULT_INTERVAL_MS);
static PURGE_INTERVAL_MS: AtomicU64 =
    AtomicU64::new(crate::base::config::DEFAULT_PURGE_INTERVAL_MS);

pub fn configure(interval_ms: u64, purge_interval_ms: u64, system_reserve_bytes: u64) {
    INTERVAL_MS.store(interval_ms, Ordering::Relaxed);
    PURGE_INTERVAL_MS.store(purge_interval_ms, Ordering::Relaxed);
    effective::set_system_reserve_bytes(system_reserve_bytes);
}

// ---------------------------------------------------------------------------------------------
// The effective budget and memory pressure.

/// This process's RssAnon, in tree scope plus the rest of the tree's bytes: the effective
/// budget is the tree's, and what the ledger cannot see is this process's own.
fn own_rss_anon(host: &ledger::Pool) -> Option<u64> {
    let others = host.committed().saturating_sub(host.own_committed());
    system::process_memory().map(|p| p.rss_anon.saturating_add(others))
}

/// Tree scope: takes back the shares of members gone without a word and recomputes the levels
/// from the tree's figures, which other processes move.
fn look_after_tree() {
    if !ledger::tree::active() {
        return;
    }
    let taken = ledger::tree::reclaim_dead();
    if taken > 0 {
        qlog!(
            Info,
            "tree scope: took back {} held by members that are gone",
            Bytes(taken)
        );
    }
    for index in 0..ledger::pool_count() {
        if let Some(pool) = ledger::pool(index) {
            pool.refresh_level();
        }
    }
}

/// Reads the machine and sets the host's effective budget.
fn sample_host() {
    let host = ledger::host();
    let cgroup_room = cgroup::cgroup_memory().map(|m| m.room);
    let mut inputs = Inputs {
        budget: host.budget(),
        committed: host.committed(),
        available: system::meminfo().map(|m| m.available),
        cgroup_room,
        rss_anon: own_rss_anon(host),
        system_reserve: effective::system_reserve_bytes(),
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
            inputs.rss_anon = own_rss_anon(host);
            e = effective_budget(inputs);
        }
    }
    let old_reason = effective::remember_host(&e);
    if host.effective() != e.bytes {
        host.set_effective(e.bytes);
    }
    if e.no_room && effective::first_time_no_room() {
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

/// Reads each GPU the process uses and sets its effective budget: the budget less what NVML
/// shows the process holding beyond the ledger's count, or what the CUDA memory pools keep
/// beyond the live asynchronous allocations, whichever is more
/// ([`device_effective`](crate::ledger::device_effective)).
fn sample_gpus() {
    let Some(driver) = crate::gpu::mempools::usable_driver() else {
        return;
    };
    for index in 1..ledger::pool_count() {
        if !crate::gpu::mempools::is_device_pool(index) {
            continue;
        }
        let Some(pool) = ledger::pool(index) else {
            continue;
        };
        let inputs = DeviceInputs {
            budget: pool.budget(),
            counted: pool.committed(),
            pools_cached: crate::gpu::mempools::pools_cached(driver, index),
            nvml_used: crate::gpu::nvml::process_used(driver, index - 1),
        };
        let e = device_effective(inputs);
        let before = device_effective::last_unseen(index);
        device_effective::remember(index, &inputs, &e);
        if pool.effective() != e.bytes {
            pool.set_effective(e.bytes);
        }
        if before != e.unseen {
            qlog!(
                Info,
                "{} effective budget {} (budget {}, counted {}, unseen {}, NVML {}, pools cached {})",
                PoolName(index),
                Bytes(e.bytes),
                Bytes(inputs.budget),
                Bytes(inputs.counted),
                Bytes(e.unseen),
                Bytes(inputs.nvml_used.unwrap_or(0)),
                Bytes(inputs.pools_cached)
            );
        }
    }
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
// Level changes.

/// What the monitor last saw of each pool, to tell what changed since.
#[derive(Clone, Copy, Default)]
struct Seen {
    level: u8,
    level_changes: u64,
    refusals: u64,
}

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
    fn log_level(self) -> crate::base::log::Level {
        if self.new > self.old || (self.new == self.old && self.new > LEVEL_NORMAL) {
            crate::base::log::Level::Warn
        } else {
            crate::base::log::Level::Info
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
    use crate::base::log::Level;
    use crate::ledger::{LEVEL_CRITICAL, LEVEL_WARN};

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
        if crate::base::log::enabled(change.log_level()) && pool.in_tree() {
            // The level is the tree's: say so, with this process's part of it.
            let tree = pool.committed();
            crate::base::log::write_line(
                change.log_level(),
                format_args!(
                    "{} level {}: tree holds {} of budget {} ({}%), this process {} live",
                    PoolName(index),
                    change,
                    Bytes(tree),
                    Bytes(pool.effective()),
                    percent(tree, pool.effective()),
                    Bytes(live)
                ),
            );
        } else if crate::base::log::enabled(change.log_level()) {
            crate::base::log::write_line(
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
        // A GPU refusal: PyTorch's allocator frees its own cached blocks when it sees the
        // code; the interpreter is asked to empty torch's cache too, between two bytecodes.
        if index != ledger::HOST {
            let told = runtime::python::request_relief(index, ledger::LEVEL_CRITICAL);
            pool.notifications.fetch_add(told as u64, Ordering::Relaxed);
        }
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
    threads::mark_monitor_thread();
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
        let bell = doorbell::rung();
        let counted_ms = now_ms();
        let thread_ended = threads::take_thread_ended();
        // A sequence of quick looks runs to its end before another starts, so a program that
        // churns through threads gets a few looks a second, not one per thread.
        if thread_ended && recheck >= THREAD_END_RECHECK_MS.len() {
            recheck = 0;
        }
        if thread_ended {
            threads::stay_quiet_until(counted_ms.saturating_add(THREAD_LOOK_GAP_MS));
        }
        if recheck < THREAD_END_RECHECK_MS.len()
            || counted_ms >= last_count_ms.saturating_add(count_every_ms)
        {
            last_count_ms = counted_ms;
            let count = program_threads();
            if count.is_some_and(|c| c.left == 0) {
                threads::end_like_the_last_thread();
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
        if diag::request::dump_requested() {
            diag::request::write_requested_dump();
        }
        let now = now_ms();
        let (level, pressed_pool) = highest_level();
        let running_ms = now.saturating_sub(started_ms);
        if now >= last_sample_ms.saturating_add(sample_interval_ms(level, running_ms))
            || never_sampled
        {
            look_after_tree();
            sample_host();
            sample_gpus();
            runtime::python::probe();
            if running_ms >= PYTHON_START_WATCH_MS {
                runtime::python::start_watch_over();
            }
            diag::check_dump_signal();
            last_sample_ms = now;
            never_sampled = false;
        }
        // Gated inside: the first publication waits a moment, later ones come at most 4 a second.
        diag::publish::publish(diag::request::dump_signal());
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
        if let Some(due_ms) = diag::publish::first_due_ms() {
            timeout = timeout.min(due_ms.saturating_sub(now).max(1));
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
        doorbell::wait(bell, timeout);
    }
}

/// The monitor thread's stack: the shim's own code needs little, the C API's level callbacks
/// run on it too.
pub const MONITOR_STACK_BYTES: usize = 1 << 20;

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
    threads::after_fork_child();
    doorbell::after_fork_child();
    runtime::after_fork_child();
    crate::gpu::mempools::after_fork_child();
    diag::after_fork_child();
    start();
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_machine_is_read_more_often_under_pressure_and_never_less_often_than_configured() {
        // Past the watch for a starting interpreter, so only the level and the setting decide.
        let running_ms = PYTHON_START_WATCH_MS;
        let before = INTERVAL_MS.load(Ordering::Relaxed);
        // (configured interval, level, expected interval)
        let cases: &[(u64, u8, u64)] = &[
            (1_000, LEVEL_NORMAL, 1_000),
            (1_000, crate::ledger::LEVEL_WARN, PRESSED_INTERVAL_MS),
            (1_000, crate::ledger::LEVEL_CRITICAL, PRESSED_INTERVAL_MS),
            (50, LEVEL_NORMAL, 50),
            (50, crate::ledger::LEVEL_CRITICAL, 50),
        ];
        for &(configured, level, expected) in cases {
            INTERVAL_MS.store(configured, Ordering::Relaxed);
            let got = sample_interval_ms(level, running_ms);
            INTERVAL_MS.store(before, Ordering::Relaxed);
            assert_eq!(got, expected, "configured {configured} ms, level {level}");
        }
    }
}
