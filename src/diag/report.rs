//! Gathering the dump: one `Report` read from the ledger, the accountants, the runtime and
//! the machine. Reads only, changes nothing; builds Rust values (the shim's own allocations go
//! to jemalloc, never through the exported malloc).

use std::sync::OnceLock;

use crate::base::cgroup;
use crate::base::clock;
use crate::base::config::{BadValue, Settings};
use crate::base::jemalloc;
use crate::base::system::{self, MemInfo, Pressure, ProcessMemory};
use crate::gpu;
use crate::ledger::effective::{self, Effective};
use crate::ledger::purges::{self, PurgeRecord, PURGE_HISTORY};
use crate::ledger::PoolStats;
use crate::ledger::{self, LEVEL_NORMAL};
use crate::runtime::{self, python};
use crate::tracker::{self, LiveBlock, LARGEST_SHOWN};

/// Version of the dump's layout ("dump_version" in JSON); raised only when a key changes
/// meaning, which the stable contract forbids for version 1.
pub const DUMP_VERSION: u32 = 1;

/// What the dump shows of the configuration, fixed at load.
pub(crate) struct Config {
    pub(crate) settings: Settings,
    pub(crate) host_budget: u64,
    pub(crate) dump_path: Option<Vec<u8>>,
    pub(crate) started_ms: u64,
}

pub(crate) static CONFIG: OnceLock<Config> = OnceLock::new();

/// Records the configuration, for the dump and the exit report. Called once at load.
/// `dump_path` is QVSHIM_DUMP_FILE as given; an empty one names no file and is reported here.
pub fn configure(settings: &Settings, host_budget: u64, dump_path: Option<&[u8]>) {
    let dump_path = match dump_path {
        Some([]) => {
            crate::base::log::write_error_always(format_args!(
                "{}",
                BadValue {
                    variable: "QVSHIM_DUMP_FILE",
                    value: b"",
                    reason: "empty, not a path",
                    default: "the log",
                }
            ));
            None
        }
        other => other.map(<[u8]>::to_vec),
    };
    let _ = CONFIG.set(Config {
        settings: *settings,
        host_budget,
        dump_path,
        started_ms: clock::now_ms(),
    });
}

// ---------------------------------------------------------------------------------------------
// The largest live allocations: the heap's large blocks (tracker.rs) and the CUDA driver's
// allocations (gpu.rs: device memory for GPU pools, pinned host memory for the host pool).

/// One live allocation as the dump lists it.
pub(super) struct Block {
    pub(super) size: u64,
    pub(super) age_ms: u64,
    /// What made it: "malloc" for the heap (the whole malloc family), else the driver call.
    pub(super) call: &'static str,
    /// Return addresses, innermost first (heap blocks with QVSHIM_BACKTRACE=1 only).
    pub(super) frames: Vec<usize>,
}

/// The largest live allocations of one pool, largest first, and how many large allocations
/// went untracked because a table was full.
pub(super) fn largest(pool: usize) -> (Vec<Block>, u64) {
    let mut blocks = Vec::new();
    let mut untracked = 0;
    if pool == ledger::HOST {
        let table = tracker::host();
        let mut heap = [LiveBlock::default(); LARGEST_SHOWN];
        let n = table.largest(&mut heap);
        blocks.extend(heap.iter().take(n).map(|b| Block {
            size: b.size,
            age_ms: b.age_ms,
            call: "malloc",
            frames: b.frames().to_vec(),
        }));
        untracked += table.untracked();
    } else {
        untracked += gpu::untracked_allocations();
    }
    let mut driver = [gpu::LiveAllocation::default(); LARGEST_SHOWN];
    let n = gpu::largest_allocations(pool, &mut driver);
    blocks.extend(driver.iter().take(n).map(|a| Block {
        size: a.bytes,
        age_ms: a.age_ms,
        call: a.call,
        frames: Vec::new(),
    }));
    blocks.sort_by_key(|b| core::cmp::Reverse(b.size));
    blocks.truncate(LARGEST_SHOWN);
    (blocks, untracked)
}

// ---------------------------------------------------------------------------------------------
// Gathering.

pub(super) struct PoolReport {
    pub(super) stats: PoolStats,
    pub(super) effective: Option<Effective>,
    pub(super) largest: Vec<Block>,
    pub(super) untracked: u64,
}

pub(super) struct Report {
    pub(super) pid: u32,
    pub(super) uptime_ms: u64,
    pub(super) level: u8,
    pub(super) pools: Vec<PoolReport>,
    pub(super) jemalloc: jemalloc::Stats,
    pub(super) process: Option<ProcessMemory>,
    pub(super) meminfo: Option<MemInfo>,
    pub(super) pressure: Option<Pressure>,
    pub(super) cgroup_max: Option<u64>,
    pub(super) cgroup_current: Option<u64>,
    pub(super) purges: Vec<PurgeRecord>,
    pub(super) now_ms: u64,
    pub(super) python: python::Stats,
    pub(super) arenas: runtime::arena::Stats,
    pub(super) signal: Option<i32>,
    pub(super) signals_raised: u64,
    pub(super) signals_skipped: u64,
    pub(super) callbacks_registered: usize,
    pub(super) callback_calls: u64,
}

pub(super) fn gather() -> Report {
    let mut pools = Vec::new();
    for index in 0..ledger::pool_count() {
        let active = ledger::pool(index).is_some_and(|p| p.is_active());
        let Some(stats) = ledger::pool_stats(index) else {
            continue;
        };
        if !active && index != ledger::HOST {
            continue;
        }
        let (largest, untracked) = largest(index);
        pools.push(PoolReport {
            stats,
            effective: (index == ledger::HOST).then(effective::host_effective),
            largest,
            untracked,
        });
    }
    let level = pools
        .iter()
        .map(|p| p.stats.level as u8)
        .max()
        .unwrap_or(LEVEL_NORMAL);
    let mut purges = [PurgeRecord::default(); PURGE_HISTORY];
    let purge_count = purges::recent_purges(&mut purges);
    let now_ms = clock::now_ms();
    let (signals_raised, signals_skipped) = runtime::signal::counts();
    Report {
        pid: std::process::id(),
        uptime_ms: CONFIG
            .get()
            .map_or(0, |c| now_ms.saturating_sub(c.started_ms)),
        level,
        pools,
        jemalloc: jemalloc::stats(),
        process: system::process_memory(),
        meminfo: system::meminfo(),
        pressure: system::memory_pressure(),
        cgroup_max: cgroup::cgroup_memory_max(),
        cgroup_current: cgroup::cgroup_memory_current(),
        purges: purges.iter().take(purge_count).copied().collect(),
        now_ms,
        python: python::stats(),
        arenas: runtime::arena::stats(),
        signal: runtime::signal::configured(),
        signals_raised,
        signals_skipped,
        callbacks_registered: runtime::callbacks::registered(),
        callback_calls: runtime::callbacks::calls(),
    }
}
