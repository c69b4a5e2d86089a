//! A GPU pool's effective budget: the budget less the device memory the process holds that the
//! ledger does not count. Two readings show it: what NVML says the process uses on the device
//! beyond the ledger's count (the driver's context, modules, library workspaces), and what the
//! CUDA memory pools the process uses reserve beyond its live asynchronous allocations
//! (memory kept after `cuMemFreeAsync`). The larger of the two is unseen: NVML's figure already
//! includes the pools' memory, so the two are never added. [`device_effective`] is pure; the
//! last readings are remembered here for the dump. Never allocates, never takes a lock.

use core::sync::atomic::{AtomicU64, Ordering};

use super::pools::{MAX_POOLS, UNLIMITED};

/// What a GPU pool's effective budget is computed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInputs {
    pub budget: u64,
    /// What the ledger counts for the device.
    pub counted: u64,
    /// What the memory pools reserve beyond the live asynchronous allocations.
    pub pools_cached: u64,
    /// The process's own usage of the device as NVML reports it; None without NVML.
    pub nvml_used: Option<u64>,
}

/// A GPU pool's effective budget and its parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceEffective {
    pub bytes: u64,
    /// Device memory the process holds beyond the ledger's count.
    pub unseen: u64,
}

/// The budget less what the process holds on the device beyond the ledger's count: the larger
/// of NVML's figure past the count and the pools' cached memory. Off (`UNLIMITED`) stays off.
pub fn device_effective(i: DeviceInputs) -> DeviceEffective {
    let nvml_beyond = i.nvml_used.map_or(0, |used| used.saturating_sub(i.counted));
    let unseen = nvml_beyond.max(i.pools_cached);
    let bytes = if i.budget == UNLIMITED {
        UNLIMITED
    } else {
        i.budget.saturating_sub(unseen)
    };
    DeviceEffective { bytes, unseen }
}

/// No NVML reading for the pool.
const NONE: u64 = u64::MAX;

static NVML_USED: [AtomicU64; MAX_POOLS] = [const { AtomicU64::new(NONE) }; MAX_POOLS];
static POOLS_CACHED: [AtomicU64; MAX_POOLS] = [const { AtomicU64::new(0) }; MAX_POOLS];
static UNSEEN: [AtomicU64; MAX_POOLS] = [const { AtomicU64::new(0) }; MAX_POOLS];

/// Remembers pool `index`'s last readings and what they came to.
pub fn remember(index: usize, inputs: &DeviceInputs, e: &DeviceEffective) {
    if let (Some(nvml), Some(cached), Some(unseen)) = (
        NVML_USED.get(index),
        POOLS_CACHED.get(index),
        UNSEEN.get(index),
    ) {
        nvml.store(inputs.nvml_used.unwrap_or(NONE), Ordering::Relaxed);
        cached.store(inputs.pools_cached, Ordering::Relaxed);
        unseen.store(e.unseen, Ordering::Relaxed);
    }
}

/// Pool `index`'s last NVML reading; None when there was none.
pub fn last_nvml_used(index: usize) -> Option<u64> {
    NVML_USED
        .get(index)
        .map(|v| v.load(Ordering::Relaxed))
        .filter(|&v| v != NONE)
}

/// Pool `index`'s last reading of the memory pools' cached bytes.
pub fn last_pools_cached(index: usize) -> u64 {
    POOLS_CACHED
        .get(index)
        .map_or(0, |v| v.load(Ordering::Relaxed))
}

/// Pool `index`'s last unseen figure.
pub fn last_unseen(index: usize) -> u64 {
    UNSEEN.get(index).map_or(0, |v| v.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn unseen_device_memory_lowers_the_budget_by_the_larger_reading() {
        // (budget, counted, pools' cached, NVML, expected effective, expected unseen)
        type Case = (u64, u64, u64, Option<u64>, u64, u64);
        let cases: &[Case] = &[
            (1024 * M, 256 * M, 0, None, 1024 * M, 0),
            // The driver's context: NVML shows 300 MiB past the count.
            (1024 * M, 256 * M, 0, Some(556 * M), 724 * M, 300 * M),
            // NVML below the count (a reading taken mid-allocation): nothing unseen.
            (1024 * M, 256 * M, 0, Some(100 * M), 1024 * M, 0),
            // Pools keep 512 MiB after frees; no NVML.
            (1024 * M, 512 * M, 512 * M, None, 512 * M, 512 * M),
            // NVML includes the pools' memory: the larger reading, never the sum.
            (1024 * M, 512 * M, 512 * M, Some(1324 * M), 212 * M, 812 * M),
            (1024 * M, 512 * M, 512 * M, Some(600 * M), 512 * M, 512 * M),
            // More unseen than the budget: nothing left, never a wrap.
            (256 * M, 0, 0, Some(2048 * M), 0, 2048 * M),
            (UNLIMITED, 0, 0, Some(2048 * M), UNLIMITED, 2048 * M),
        ];
        for &(budget, counted, pools_cached, nvml_used, bytes, unseen) in cases {
            let inputs = DeviceInputs {
                budget,
                counted,
                pools_cached,
                nvml_used,
            };
            assert_eq!(
                device_effective(inputs),
                DeviceEffective { bytes, unseen },
                "{inputs:?}"
            );
        }
    }
}
