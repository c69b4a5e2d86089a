//! Purges of jemalloc's arenas and their history: [`purge`] gives jemalloc's free pages back to
//! the kernel and counts it against the pool that asked; the last [`PURGE_HISTORY`] purges are
//! remembered for the dump. `purge` takes jemalloc's locks: the monitor thread only.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::pools::pool;
use crate::base::clock::now_ms;
use crate::base::jemalloc;
use crate::base::log::qlog;
use crate::base::log::Bytes;

/// Purges remembered for the dump.
pub const PURGE_HISTORY: usize = 8;

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

pub(crate) fn remember_purge(record: PurgeRecord) {
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

pub fn purge(index: usize, level: u8, reason: u8) {
    let result = jemalloc::purge();
    if let Some(pool) = pool(index) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
