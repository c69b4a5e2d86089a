//! The CUDA memory pools the process uses (each device's default pool, and every pool named in
//! `cuMemAllocFromPoolAsync`): what they reserve beyond the live asynchronous allocations
//! counts against the GPU budget, and before an allocation is refused they are trimmed
//! (`cuMemPoolTrimTo`) and the charge is tried once more ([`charge_or_trim`]).
//!
//! Why only the pools, synchronously: a refusal happens on the program's thread, inside its
//! allocator (PyTorch's holds its own mutex, and often the GIL, while it calls the driver), so
//! nothing that needs Python or that lock can run there. Trimming a pool is a driver call that
//! waits for nothing. PyTorch's cached blocks are given back by PyTorch itself: its caching
//! allocator frees them and retries when it sees `CUDA_ERROR_OUT_OF_MEMORY`; and the refusal
//! rings the monitor, which asks the interpreter (between two bytecodes) to empty torch's
//! cache as at critical.
//!
//! Never allocates, never takes a lock, never logs.

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::ledger::device_effective::{self, device_effective, DeviceInputs};
use crate::ledger::{self, Pool, MAX_POOLS};

use super::driver::{self, Driver, CUDA_SUCCESS};

/// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`: the bytes a pool holds on the device.
const ATTR_RESERVED_MEM_CURRENT: c_int = 5;
/// Pools named in `cuMemAllocFromPoolAsync` remembered, at most; one past them is not read
/// nor trimmed (PyTorch uses the default pool).
pub const SEEN_POOLS_MAX: usize = 32;

static SEEN_HANDLES: [AtomicUsize; SEEN_POOLS_MAX] =
    [const { AtomicUsize::new(0) }; SEEN_POOLS_MAX];
static SEEN_LEDGER_POOL: [AtomicU8; SEEN_POOLS_MAX] = [const { AtomicU8::new(0) }; SEEN_POOLS_MAX];
/// Bytes of live asynchronous allocations per ledger pool: what the pools reserve for them is
/// counted already.
static ASYNC_LIVE: [AtomicU64; MAX_POOLS] = [const { AtomicU64::new(0) }; MAX_POOLS];
/// Trims done before a refusal, and the bytes they gave back, per ledger pool.
static TRIMS: [AtomicU64; MAX_POOLS] = [const { AtomicU64::new(0) }; MAX_POOLS];
static TRIMMED_BYTES: [AtomicU64; MAX_POOLS] = [const { AtomicU64::new(0) }; MAX_POOLS];

/// Set in a fork child: CUDA cannot be used after `fork`, and the shim does not try (no trim,
/// no pool reading, no NVML).
static FORKED: AtomicBool = AtomicBool::new(false);

/// In a fork child: the driver inherited from the parent is not to be called.
pub fn after_fork_child() {
    FORKED.store(true, Ordering::Relaxed);
}

/// The driver, when it is loaded and this process may call it (not a fork child).
pub fn usable_driver() -> Option<&'static Driver> {
    if FORKED.load(Ordering::Relaxed) {
        return None;
    }
    driver::loaded()
}

/// Remembers `handle`, a pool an allocation of ledger pool `index` came from.
pub(crate) fn note_pool(handle: *mut c_void, index: usize) {
    let handle = handle as usize;
    if handle == 0 {
        return;
    }
    for (slot, pool) in SEEN_HANDLES.iter().zip(SEEN_LEDGER_POOL.iter()) {
        let current = slot.load(Ordering::Acquire);
        if current == handle {
            return;
        }
        if current == 0
            && slot
                .compare_exchange(0, handle, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            pool.store(index as u8, Ordering::Release);
            return;
        }
        if slot.load(Ordering::Acquire) == handle {
            return;
        }
    }
}

/// An asynchronous allocation of `bytes` was charged to ledger pool `index`.
pub(crate) fn async_charged(index: usize, bytes: u64) {
    if let Some(live) = ASYNC_LIVE.get(index) {
        live.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// An asynchronous allocation of `bytes` charged to ledger pool `index` was freed.
pub(crate) fn async_freed(index: usize, bytes: u64) {
    if let Some(live) = ASYNC_LIVE.get(index) {
        let _ = live.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(bytes))
        });
    }
}

/// Calls `f` with every memory pool of ledger pool `index`'s device: its default pool, then
/// each pool seen in an allocation charged there.
fn each_pool(driver: &Driver, index: usize, mut f: impl FnMut(*mut c_void)) {
    let mut default: *mut c_void = core::ptr::null_mut();
    if let (Some(get_default), Ok(device)) = (
        driver.device_get_default_mem_pool,
        c_int::try_from(index.wrapping_sub(1)),
    ) {
        // SAFETY: cuDeviceGetDefaultMemPool writes one handle; default is a local.
        if unsafe { get_default(&mut default, device) } == CUDA_SUCCESS && !default.is_null() {
            f(default);
        }
    }
    for (slot, pool) in SEEN_HANDLES.iter().zip(SEEN_LEDGER_POOL.iter()) {
        let handle = slot.load(Ordering::Acquire);
        if handle == 0 {
            break;
        }
        if pool.load(Ordering::Acquire) as usize == index && handle != default as usize {
            f(handle as *mut c_void);
        }
    }
}

fn reserved_of(driver: &Driver, pool: *mut c_void) -> u64 {
    let Some(get_attribute) = driver.mem_pool_get_attribute else {
        return 0;
    };
    let mut value: u64 = 0;
    // SAFETY: RESERVED_MEM_CURRENT is a cuuint64_t attribute; value is a local. A handle that is
    // no longer a pool gets an error code, not a crash.
    let result = unsafe { get_attribute(pool, ATTR_RESERVED_MEM_CURRENT, &mut value) };
    if result == CUDA_SUCCESS {
        value
    } else {
        0
    }
}

/// What the memory pools of ledger pool `index`'s device reserve beyond the live asynchronous
/// allocations charged there.
pub fn pools_cached(driver: &Driver, index: usize) -> u64 {
    let mut reserved = 0u64;
    each_pool(driver, index, |pool| {
        reserved = reserved.saturating_add(reserved_of(driver, pool))
    });
    let live = ASYNC_LIVE
        .get(index)
        .map_or(0, |v| v.load(Ordering::Relaxed));
    reserved.saturating_sub(live)
}

/// Trims every memory pool of ledger pool `index`'s device to what it uses; returns the bytes
/// they gave back.
fn trim(driver: &Driver, index: usize) -> u64 {
    let Some(trim_to) = driver.mem_pool_trim_to else {
        return 0;
    };
    let mut released = 0u64;
    each_pool(driver, index, |pool| {
        let before = reserved_of(driver, pool);
        // SAFETY: a pool handle of this device; trimming to 0 keeps what is in use.
        let _ = unsafe { trim_to(pool, 0) };
        released = released.saturating_add(before.saturating_sub(reserved_of(driver, pool)));
    });
    released
}

/// Charges `bytes` to ledger pool `index`; when the effective budget has no room, trims the
/// device's memory pools, recomputes the effective budget from what they hold now (and from
/// the last NVML reading less what the trim gave back), and tries once more. A refusal is
/// counted only when that fails too. Runs on the allocating thread: driver calls only.
pub(crate) fn charge_or_trim(index: usize, pool: &Pool, bytes: u64) -> bool {
    // Pinned host memory: no pool of the device's to trim, and the host's effective budget is
    // the monitor's (the machine cap), never this file's.
    if index == ledger::HOST {
        return pool.charge_direct(bytes, false);
    }
    if pool.try_charge_direct(bytes) {
        return true;
    }
    if let Some(driver) = usable_driver() {
        let released = trim(driver, index);
        if let (Some(trims), Some(trimmed)) = (TRIMS.get(index), TRIMMED_BYTES.get(index)) {
            trims.fetch_add(1, Ordering::Relaxed);
            trimmed.fetch_add(released, Ordering::Relaxed);
        }
        let inputs = DeviceInputs {
            budget: pool.budget(),
            counted: pool.committed(),
            pools_cached: pools_cached(driver, index),
            nvml_used: device_effective::last_nvml_used(index).map(|u| u.saturating_sub(released)),
        };
        let e = device_effective(inputs);
        device_effective::remember(index, &inputs, &e);
        pool.set_effective(e.bytes);
    }
    pool.charge_direct(bytes, false)
}

/// Trims before a refusal of ledger pool `index`: how many, and the bytes they gave back.
pub fn trims(index: usize) -> (u64, u64) {
    (
        TRIMS.get(index).map_or(0, |v| v.load(Ordering::Relaxed)),
        TRIMMED_BYTES
            .get(index)
            .map_or(0, |v| v.load(Ordering::Relaxed)),
    )
}

/// Whether ledger pool `index` is a GPU pool with a device the process set up.
pub fn is_device_pool(index: usize) -> bool {
    index != ledger::HOST && ledger::pool(index).is_some_and(|p| p.is_active())
}
