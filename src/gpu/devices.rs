//! The GPU pools: one ledger pool per CUDA device, set up when the process first allocates on
//! it, with the budget `QVSHIM_GPU_BUDGET` gives it (bytes, or a percentage of the device's
//! memory). Never allocates, never takes a lock; the first call of a device asks the driver
//! for its memory.

use core::ffi::c_int;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::base::config::BudgetSpec;
use crate::ledger::{self};

use super::driver::{Driver, Wrapped, CUDA_ERROR_NOT_FOUND, CUDA_SUCCESS};
use super::resolve::{real_call, DeviceTotalMemFn};

/// Devices with a pool of their own: the ledger's pools past the host's.
pub const MAX_DEVICES: usize = ledger::MAX_POOLS - 1;

const SPEC_BYTES: u8 = 0;
const SPEC_PERCENT: u8 = 1;
const SPEC_OFF: u8 = 2;

/// `QVSHIM_GPU_BUDGET`, kept as a kind and a value (bytes, or a percentage's f64 bits) so a
/// device set up on any thread reads it without a lock.
static SPEC_KIND: AtomicU8 = AtomicU8::new(SPEC_PERCENT);
static SPEC_VALUE: AtomicU64 =
    AtomicU64::new(crate::base::config::DEFAULT_GPU_BUDGET_PERCENT.to_bits());

const DEVICE_UNSET: u8 = 0;
const DEVICE_SETTING_UP: u8 = 1;
const DEVICE_READY: u8 = 2;

static DEVICE_STATE: [AtomicU8; MAX_DEVICES] = [const { AtomicU8::new(DEVICE_UNSET) }; MAX_DEVICES];
/// Each device's physical memory as the driver reports it; 0 until the device is set up.
static DEVICE_MEMORY: [AtomicU64; MAX_DEVICES] = [const { AtomicU64::new(0) }; MAX_DEVICES];

/// Takes `QVSHIM_GPU_BUDGET`. Called once from the constructor; devices are set up later, when
/// the process first allocates on them.
pub fn configure(spec: BudgetSpec) {
    let (kind, value) = match spec {
        BudgetSpec::Bytes(bytes) => (SPEC_BYTES, bytes),
        BudgetSpec::PercentOfMemory(percent) => (SPEC_PERCENT, percent.to_bits()),
        BudgetSpec::Off => (SPEC_OFF, 0),
    };
    SPEC_VALUE.store(value, Ordering::Relaxed);
    SPEC_KIND.store(kind, Ordering::Release);
}

fn spec() -> BudgetSpec {
    let kind = SPEC_KIND.load(Ordering::Acquire);
    let value = SPEC_VALUE.load(Ordering::Relaxed);
    match kind {
        SPEC_BYTES => BudgetSpec::Bytes(value),
        SPEC_PERCENT => BudgetSpec::PercentOfMemory(f64::from_bits(value)),
        _ => BudgetSpec::Off,
    }
}

/// The ledger pool of CUDA device `device`, set up on first use: its budget comes from the
/// device's memory. None for a device past [`MAX_DEVICES`] or one the driver cannot size yet;
/// its allocations then go through uncounted.
pub(crate) fn device_pool(driver: &Driver, device: c_int) -> Option<usize> {
    let index = usize::try_from(device).ok().filter(|d| *d < MAX_DEVICES)?;
    let state = DEVICE_STATE.get(index)?;
    loop {
        match state.load(Ordering::Acquire) {
            DEVICE_READY => return Some(1 + index),
            DEVICE_UNSET => {
                if state
                    .compare_exchange(
                        DEVICE_UNSET,
                        DEVICE_SETTING_UP,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    let ready = set_up_device(driver, index);
                    state.store(
                        if ready { DEVICE_READY } else { DEVICE_UNSET },
                        Ordering::Release,
                    );
                    return ready.then_some(1 + index);
                }
            }
            // Another thread is asking the driver for the device's size: one call, brief.
            _ => {
                // SAFETY: sched_yield has no preconditions.
                unsafe { libc::sched_yield() };
            }
        }
    }
}

fn set_up_device(driver: &Driver, index: usize) -> bool {
    let mut total: usize = 0;
    // SAFETY: the form's real function has cuDeviceTotalMem_v2's signature; total is a local.
    let result = unsafe {
        real_call::<DeviceTotalMemFn>(driver, Wrapped::DeviceTotalMemV2)
            .map_or(CUDA_ERROR_NOT_FOUND, |f| f(&mut total, index as c_int))
    };
    if result != CUDA_SUCCESS || total == 0 {
        return false;
    }
    let Some(pool) = ledger::pool(1 + index) else {
        return false;
    };
    if let Some(memory) = DEVICE_MEMORY.get(index) {
        memory.store(total as u64, Ordering::Relaxed);
    }
    pool.set_budget(crate::base::config::resolve_budget(spec(), total as u64));
    pool.activate();
    true
}

/// The pool of the calling thread's current device; None without a current context.
pub(crate) fn current_pool(driver: &Driver) -> Option<usize> {
    let get_device = driver.ctx_get_device?;
    let mut device: c_int = -1;
    // SAFETY: cuCtxGetDevice writes one int; device is a local.
    if unsafe { get_device(&mut device) } != CUDA_SUCCESS {
        return None;
    }
    device_pool(driver, device)
}

/// A device's physical memory as the driver reported it; None before the process used it.
pub fn device_memory(device: usize) -> Option<u64> {
    DEVICE_MEMORY
        .get(device)
        .map(|m| m.load(Ordering::Relaxed))
        .filter(|&bytes| bytes > 0)
}
