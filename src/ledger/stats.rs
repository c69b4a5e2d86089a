//! What the ledger says about its pools, for the log, the dump and the C API: the totals summed
//! from the threads' credit, [`PoolStats`] (the one definition of the C API's
//! `struct qvshim_pool_stats`, which every report is built from), the names of pools and levels,
//! percentages. Reads only; never allocates.

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
        live: (pool.own_committed() as i64 - credit).max(0) as u64,
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

/// Mirrors `struct qvshim_pool_stats` in include/qvshim.h; fields are only ever appended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolStats {
    /// Set by the caller to the size of the struct it knows; fields are only appended.
    pub struct_size: u32,
    /// 0 host, 1 + N GPU N.
    pub pool: i32,
    /// `enum qvshim_level`.
    pub level: i32,
    /// -1 for the host, the CUDA ordinal for a GPU pool.
    pub device: i32,
    /// Configured budget in bytes, `QVSHIM_UNLIMITED` when off.
    pub budget: u64,
    /// What allocations are checked against now.
    pub effective_budget: u64,
    /// Reserve past the budget for small allocations.
    pub reserve: u64,
    /// Bytes counted past the effective budget.
    pub reserve_in_use: u64,
    /// Bytes live now (usable size).
    pub live: u64,
    /// High-water mark of live (docs/CONFIGURATION.md).
    pub peak: u64,
    /// Successful allocations.
    pub allocs: u64,
    /// Frees of counted allocations.
    pub frees: u64,
    /// Allocations refused by the budget.
    pub refusals: u64,
    /// Size in bytes of the largest refused request.
    pub largest_refused: u64,
    /// Purges done because of this pool.
    pub purges: u64,
    /// Level transitions, both directions.
    pub level_changes: u64,
    /// Runtime notifications sent for this pool.
    pub notifications: u64,
}

/// Gathers one pool's figures; None for a pool index out of range.
pub fn pool_stats(index: usize) -> Option<PoolStats> {
    let pool = pool(index)?;
    let mut totals = totals(index);
    // In tree scope the figures held against the budget are the tree's: this process's live
    // bytes plus what the other members hold (their credits included).
    totals.live = totals
        .live
        .saturating_add(pool.committed().saturating_sub(pool.own_committed()));
    Some(PoolStats {
        struct_size: core::mem::size_of::<PoolStats>() as u32,
        pool: index as i32,
        level: pool.level() as i32,
        device: if index == HOST { -1 } else { index as i32 - 1 },
        budget: pool.budget(),
        effective_budget: pool.effective(),
        reserve: pool.reserve(),
        reserve_in_use: totals.live.saturating_sub(pool.effective()),
        live: totals.live,
        peak: pool.peak(),
        allocs: totals.allocs,
        frees: totals.frees,
        refusals: pool.refusals.load(Ordering::Relaxed),
        largest_refused: pool.largest_refused.load(Ordering::Relaxed),
        purges: pool.purges.load(Ordering::Relaxed),
        level_changes: pool.level_changes.load(Ordering::Relaxed),
        notifications: pool.notifications.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_whole_and_zero_without_a_budget() {
        // (part, whole, expected)
        let cases: &[(u64, u64, u64)] = &[
            (50, 100, 50),
            (99, 100, 99),
            (150, 100, 150),
            (u64::MAX, u64::MAX - 1, 100),
            (5, 0, 0),
            (5, UNLIMITED, 0),
        ];
        for &(part, whole, expected) in cases {
            assert_eq!(percent(part, whole), expected, "{part} of {whole}");
        }
    }
}
