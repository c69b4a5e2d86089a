//! The live driver allocations: every allocation the shim charged, remembered by pointer or
//! handle in a fixed table so that its free takes back exactly what it charged, and listed,
//! largest first, for the dump. Never allocates, never takes a lock.

use crate::ledger::{self};

use super::driver::{CuResult, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS};
use super::mempools::{async_charged, async_freed, charge_or_trim};
use super::table::{Kind, Record, Table};

/// Device allocations live at once, most: PyTorch's caching allocator holds hundreds, the
/// cudaMallocAsync backend one per live tensor.
pub(crate) static DEVICE_ALLOCATIONS: Table<{ 1 << 17 }> = Table::new();
/// cuMemCreate handles: expandable segments map 2 MiB or 20 MiB pages.
pub(crate) static PHYSICAL_HANDLES: Table<{ 1 << 16 }> = Table::new();
/// Pinned host allocations and registrations.
pub(crate) static HOST_ALLOCATIONS: Table<{ 1 << 12 }> = Table::new();

fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; the coarse monotonic clock is a vDSO read.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

// ---------------------------------------------------------------------------------------------
// Charging.

/// Charges `bytes` to pool `index`, makes the allocation with `call`, and remembers it under the
/// key `key` reads afterwards. Refuses with CUDA_ERROR_OUT_OF_MEMORY, and nothing else, when the
/// budget would be passed even after the device's memory pools were trimmed
/// ([`charge_or_trim`]); a failed driver call gives the charge back and returns its own code.
/// Without a pool (`None`) the call goes through uncounted.
pub(crate) fn charged<const SLOTS: usize>(
    table: &Table<SLOTS>,
    index: Option<usize>,
    kind: Kind,
    bytes: u64,
    call: impl FnOnce() -> CuResult,
    key: impl FnOnce() -> u64,
) -> CuResult {
    let Some(pool) = index.and_then(ledger::pool) else {
        return call();
    };
    if !charge_or_trim(index.unwrap_or(0), pool, bytes) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let result = call();
    if result != CUDA_SUCCESS {
        pool.uncharge_direct(bytes);
        return result;
    }
    remember(table, key(), bytes, index.unwrap_or(0), kind);
    result
}

/// Records a live allocation; one that cannot be tracked gives its charge back, so a later free
/// cannot leave the pool over-counted (the table counts it as untracked instead).
pub(crate) fn remember<const SLOTS: usize>(
    table: &Table<SLOTS>,
    key: u64,
    bytes: u64,
    index: usize,
    kind: Kind,
) {
    let record = Record {
        bytes,
        pool: index as u8,
        kind,
        since_ms: now_ms(),
    };
    if !table.insert(key, record) {
        if let Some(pool) = ledger::pool(index) {
            pool.uncharge_direct(bytes);
        }
    } else if kind == Kind::Async {
        async_charged(index, bytes);
    }
}

/// Takes back what the allocation under `key` charged; nothing for one never counted.
pub(crate) fn forget<const SLOTS: usize>(table: &Table<SLOTS>, key: u64) {
    if let Some(record) = table.remove(key) {
        if record.kind == Kind::Async {
            async_freed(record.pool as usize, record.bytes);
        }
        if let Some(pool) = ledger::pool(record.pool as usize) {
            pool.uncharge_direct(record.bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// For the dump.

/// One live allocation, as the dump lists it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveAllocation {
    /// Device pointer, VMM handle or host pointer.
    pub key: u64,
    pub bytes: u64,
    pub age_ms: u64,
    /// The driver call that made it ("cuMemAlloc", "cuMemCreate", ...).
    pub call: &'static str,
}

/// Fills `out` with the largest live allocations charged to ledger pool `pool` (1 + N for GPU N,
/// 0 for pinned host memory), largest first, and returns how many it wrote.
///
/// Never allocates and takes no lock, but scans the tables (a few MiB): call it from the monitor
/// thread, not from a signal handler or an allocation.
pub fn largest_allocations(pool: usize, out: &mut [LiveAllocation]) -> usize {
    let now = now_ms();
    let mut filled = 0;
    let mut consider = |key: u64, record: Record| {
        if record.pool as usize != pool {
            return;
        }
        let entry = LiveAllocation {
            key,
            bytes: record.bytes,
            age_ms: now.saturating_sub(record.since_ms),
            call: record.kind.call_name(),
        };
        insert_by_size(out, &mut filled, entry);
    };
    if pool == ledger::HOST {
        HOST_ALLOCATIONS.for_each(&mut consider);
        PHYSICAL_HANDLES.for_each(&mut consider);
    } else {
        DEVICE_ALLOCATIONS.for_each(&mut consider);
        PHYSICAL_HANDLES.for_each(&mut consider);
    }
    filled
}

/// Inserts `entry` into the first `filled` entries of `out`, kept largest first; the smallest
/// falls off when `out` is full.
fn insert_by_size(out: &mut [LiveAllocation], filled: &mut usize, entry: LiveAllocation) {
    let position = out
        .iter()
        .take(*filled)
        .position(|held| held.bytes < entry.bytes)
        .unwrap_or(*filled);
    if position >= out.len() {
        return;
    }
    let end = (*filled + 1).min(out.len());
    if let Some(tail) = out.get_mut(position..end) {
        tail.rotate_right(1);
        if let Some(first) = tail.first_mut() {
            *first = entry;
        }
    }
    *filled = end;
}

/// Allocations that could not be tracked (their tables full near their slot): made, but not
/// counted. Non-zero means the figures are low by that many allocations.
pub fn untracked_allocations() -> u64 {
    DEVICE_ALLOCATIONS.untracked() + PHYSICAL_HANDLES.untracked() + HOST_ALLOCATIONS.untracked()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(bytes: u64) -> LiveAllocation {
        LiveAllocation {
            key: bytes,
            bytes,
            age_ms: 0,
            call: "cuMemAlloc",
        }
    }

    #[test]
    fn largest_list_keeps_the_largest_in_order() {
        let mut out = [LiveAllocation::default(); 3];
        let mut filled = 0;
        for bytes in [5u64, 1, 9, 7, 3, 9] {
            insert_by_size(&mut out, &mut filled, alloc(bytes));
        }
        assert_eq!(filled, 3);
        let sizes: Vec<u64> = out.iter().map(|a| a.bytes).collect();
        assert_eq!(sizes, vec![9, 9, 7]);
    }

    #[test]
    fn largest_allocations_lists_one_pools_live_allocations_until_freed() {
        // Pools 14 and 15 and these keys belong to this test alone.
        let (pool, other) = (15, 14);
        let charge = |table: &Table<{ 1 << 17 }>, key: u64, bytes: u64, index: usize| {
            ledger::pool(index).unwrap().force_commit(bytes);
            remember(table, key, bytes, index, Kind::Alloc);
        };
        let keys = [0x5a00_0000_0000u64, 0x5a00_0020_0000, 0x5a00_0040_0000];
        for (i, &key) in keys.iter().enumerate() {
            charge(&DEVICE_ALLOCATIONS, key, (i as u64 + 1) << 20, pool);
        }
        charge(&DEVICE_ALLOCATIONS, 0x5b00_0000_0000, 64 << 20, other);
        ledger::pool(pool).unwrap().force_commit(8 << 20);
        remember(&PHYSICAL_HANDLES, 77, 8 << 20, pool, Kind::Physical);

        let mut out = [LiveAllocation::default(); 3];
        let listed = largest_allocations(pool, &mut out);
        let got: Vec<(u64, &str)> = out[..listed].iter().map(|a| (a.bytes, a.call)).collect();
        let want = vec![
            (8 << 20, "cuMemCreate"),
            (3 << 20, "cuMemAlloc"),
            (2 << 20, "cuMemAlloc"),
        ];
        assert_eq!(got, want, "largest first, other pools left out");

        for key in keys {
            forget(&DEVICE_ALLOCATIONS, key);
        }
        forget(&DEVICE_ALLOCATIONS, 0x5b00_0000_0000);
        forget(&PHYSICAL_HANDLES, 77);
        assert_eq!(largest_allocations(pool, &mut out), 0);
        for index in [pool, other] {
            assert_eq!(ledger::pool(index).unwrap().committed(), 0, "pool {index}");
        }
    }

    #[test]
    fn largest_list_with_no_room_writes_nothing() {
        let mut out: [LiveAllocation; 0] = [];
        let mut filled = 0;
        insert_by_size(&mut out, &mut filled, alloc(1));
        assert_eq!(filled, 0);
    }
}
