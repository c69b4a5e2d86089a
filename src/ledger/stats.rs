//! What the ledger says about its pools, for the log, the dump and the C API: the totals summed
//! from the threads' credit, the names of pools and levels, percentages. Reads only; never
//! allocates.

use core::sync::atomic::Ordering;

use super::pools::{pool, HOST, LEVEL_CRITICAL, LEVEL_WARN, UNLIMITED};

/// A consistent-enough view of a pool, summed from the slots for the host.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolTotals {
    pub live: u64,
    pub allocs: u64,
    pub frees: u64,
}

pub fn totals(index: usize) -> PoolTotals {
    let Some(pool) = pool(index) else {
        return PoolTotals::default();
    };
    let mut credit = 0i64;
    let mut allocs = pool.direct_allocs.load(Ordering::Relaxed);
    let mut frees = pool.direct_frees.load(Ordering::Relaxed);
    if index == HOST {
        let (slot_credit, slot_allocs, slot_frees) = super::credit::slot_sums();
        credit += slot_credit;
        allocs += slot_allocs;
        frees += slot_frees;
    }
    PoolTotals {
        live: (pool.committed() as i64 - credit).max(0) as u64,
        allocs,
        frees,
    }
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
        if self.0 == HOST {
            f.write_str("host")
        } else {
            write!(f, "gpu {}", self.0.saturating_sub(1))
        }
    }
}

/// `part` as a whole percentage of `whole`; 0 for no budget or an unlimited one.
pub fn percent(part: u64, whole: u64) -> u64 {
    if whole == 0 || whole == UNLIMITED {
        0
    } else {
        (part as u128 * 100 / whole as u128) as u64
    }
}
