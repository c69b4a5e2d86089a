//! The GPU side of the ledger: one pool per CUDA device with its own budget
//! (`QVSHIM_GPU_BUDGET`), and the accounting behind every driver memory call the shim wraps.
//!
//! Each function here is the body of one wrapper in `surface/cuda.rs`: check the pool, call the
//! real driver, record. Which symbol is handed out is the surface's business, never this one's.
//! Device memory is charged to the device's pool ([`devices`]), pinned host memory to the host
//! pool, and every live allocation is remembered by pointer or handle in a fixed table
//! ([`allocations`]) so that its free takes back exactly what it charged. [`resolve`] finds the
//! real driver function; [`driver`] loads the driver and places its exports.
//!
//! Never allocates, never takes a lock, never logs, never panics: refusals and level changes only
//! ring the monitor. The one exception is the first call into the driver, which loads it.
//! Memory the driver takes for itself (contexts, module images, the primary context's stack and
//! printf buffers) never passes through these calls: the monitor reads it from NVML ([`nvml`])
//! and lowers the effective budget by it, as it does by what the CUDA memory pools keep
//! ([`mempools`], which also trims them before a refusal).
//!
//! About 500 lines: the body of every wrapped driver call, side by side, so that each one can be
//! checked against the same pattern (resolve, charge, call, remember).

pub mod allocations;
pub mod devices;
pub mod driver;
pub mod mempools;
pub mod nvml;
pub mod resolve;
pub mod table;

use core::ffi::{c_int, c_uint, c_void};

use crate::ledger::{self, UNLIMITED};

use allocations::{
    charged, forget, remember, DEVICE_ALLOCATIONS, HOST_ALLOCATIONS, PHYSICAL_HANDLES,
};
use devices::{current_pool, device_pool};
use driver::{CuResult, Driver, Wrapped, CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS};
use resolve::{
    pointer_key, resolve, written, DeviceTotalMemFn, MemAllocAsyncFn, MemAllocFn,
    MemAllocFromPoolAsyncFn, MemAllocHostFn, MemAllocManagedFn, MemAllocPitchFn, MemCreateFn,
    MemFreeAsyncFn, MemFreeFn, MemFreeHostFn, MemGetInfoFn, MemHostAllocFn, MemHostRegisterFn,
    MemHostUnregisterFn, MemReleaseFn,
};
use table::Kind;

pub use allocations::{largest_allocations, untracked_allocations, LiveAllocation};
pub use devices::{configure, device_memory, MAX_DEVICES};

/// `CUmemLocationType` values in `CUmemAllocationProp.location`.
const LOCATION_DEVICE: c_int = 1;
const LOCATION_HOST_FIRST: c_int = 2;
const LOCATION_HOST_LAST: c_int = 4;
/// Byte offsets in `CUmemAllocationProp`: `type`, `requestedHandleTypes`, then
/// `location { type, id }`, all 32-bit.
const PROP_LOCATION_TYPE_OFFSET: usize = 8;
const PROP_LOCATION_ID_OFFSET: usize = 12;

// ---------------------------------------------------------------------------------------------
// Device memory.

/// cuMemAlloc_v2.
///
/// # Safety
/// The driver's contract for cuMemAlloc_v2.
pub unsafe fn mem_alloc(dptr: *mut u64, bytes: usize) -> CuResult {
    // SAFETY: MemAllocFn is cuMemAlloc_v2's signature.
    let resolved = match unsafe { resolve::<MemAllocFn>(Wrapped::MemAllocV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    charged(
        &DEVICE_ALLOCATIONS,
        resolved.pool(current_pool(driver)),
        Kind::Alloc,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(dptr, bytes) },
        // SAFETY: read only after success.
        || unsafe { written(dptr) },
    )
}

/// cuMemAllocPitch_v2: the pitch is known only afterwards, so `width * height` is checked
/// against the budget first and the charge corrected to `pitch * height` once the driver chose.
///
/// # Safety
/// The driver's contract for cuMemAllocPitch_v2.
pub unsafe fn mem_alloc_pitch(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_size: c_uint,
) -> CuResult {
    // SAFETY: MemAllocPitchFn is cuMemAllocPitch_v2's signature.
    let resolved = match unsafe { resolve::<MemAllocPitchFn>(Wrapped::MemAllocPitchV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    // SAFETY: the caller's arguments, forwarded.
    let call = || unsafe { real(dptr, pitch, width, height, element_size) };
    let Some(index) = resolved.pool(current_pool(driver)) else {
        return call();
    };
    let Some(pool) = ledger::pool(index) else {
        return call();
    };
    let estimate = (width as u64).saturating_mul(height as u64);
    if !mempools::charge_or_trim(index, pool, estimate) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let result = call();
    if result != CUDA_SUCCESS {
        pool.uncharge_direct(estimate);
        return result;
    }
    // SAFETY: both out-pointers were written by the successful call.
    let (address, actual) = unsafe { (*dptr, (*pitch as u64).saturating_mul(height as u64)) };
    if actual > estimate {
        pool.force_commit(actual - estimate);
    } else {
        pool.release(estimate - actual);
    }
    remember(&DEVICE_ALLOCATIONS, address, actual, index, Kind::Pitch);
    result
}

/// cuMemAllocManaged: managed memory may migrate, but it is charged to the device that was
/// current when it was made.
///
/// # Safety
/// The driver's contract for cuMemAllocManaged.
pub unsafe fn mem_alloc_managed(dptr: *mut u64, bytes: usize, flags: c_uint) -> CuResult {
    // SAFETY: MemAllocManagedFn is cuMemAllocManaged's signature.
    let resolved = match unsafe { resolve::<MemAllocManagedFn>(Wrapped::MemAllocManaged) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    charged(
        &DEVICE_ALLOCATIONS,
        resolved.pool(current_pool(driver)),
        Kind::Managed,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(dptr, bytes, flags) },
        // SAFETY: read only after success.
        || unsafe { written(dptr) },
    )
}

/// cuMemAllocAsync and its `_ptsz` form: charged to the current device (PyTorch makes the
/// stream's device current before it allocates).
///
/// # Safety
/// The driver's contract for cuMemAllocAsync.
pub unsafe fn mem_alloc_async(
    form: Wrapped,
    dptr: *mut u64,
    bytes: usize,
    stream: *mut c_void,
) -> CuResult {
    // SAFETY: both async forms have MemAllocAsyncFn's signature.
    let resolved = match unsafe { resolve::<MemAllocAsyncFn>(form) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    charged(
        &DEVICE_ALLOCATIONS,
        resolved.pool(current_pool(driver)),
        Kind::Async,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(dptr, bytes, stream) },
        // SAFETY: read only after success.
        || unsafe { written(dptr) },
    )
}

/// cuMemAllocFromPoolAsync and its `_ptsz` form.
///
/// # Safety
/// The driver's contract for cuMemAllocFromPoolAsync.
pub unsafe fn mem_alloc_from_pool_async(
    form: Wrapped,
    dptr: *mut u64,
    bytes: usize,
    mem_pool: *mut c_void,
    stream: *mut c_void,
) -> CuResult {
    // SAFETY: both forms have MemAllocFromPoolAsyncFn's signature.
    let resolved = match unsafe { resolve::<MemAllocFromPoolAsyncFn>(form) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    let index = resolved.pool(current_pool(driver));
    if let Some(index) = index {
        mempools::note_pool(mem_pool, index);
    }
    charged(
        &DEVICE_ALLOCATIONS,
        index,
        Kind::Async,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(dptr, bytes, mem_pool, stream) },
        // SAFETY: read only after success.
        || unsafe { written(dptr) },
    )
}

/// cuMemFree_v2. Never fails on the shim's account: the record is dropped first (so the
/// address can be handed out again at once) and the driver's own answer is returned.
///
/// # Safety
/// The driver's contract for cuMemFree_v2.
pub unsafe fn mem_free(dptr: u64) -> CuResult {
    // SAFETY: MemFreeFn is cuMemFree_v2's signature.
    let resolved = match unsafe { resolve::<MemFreeFn>(Wrapped::MemFreeV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    forget(&DEVICE_ALLOCATIONS, dptr);
    // SAFETY: the caller's argument, forwarded.
    unsafe { real(dptr) }
}

/// cuMemFreeAsync and its `_ptsz` form: the bytes come back when the free is enqueued.
///
/// # Safety
/// The driver's contract for cuMemFreeAsync.
pub unsafe fn mem_free_async(form: Wrapped, dptr: u64, stream: *mut c_void) -> CuResult {
    // SAFETY: both forms have MemFreeAsyncFn's signature.
    let resolved = match unsafe { resolve::<MemFreeAsyncFn>(form) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    forget(&DEVICE_ALLOCATIONS, dptr);
    // SAFETY: the caller's arguments, forwarded.
    unsafe { real(dptr, stream) }
}

/// cuMemCreate (the VMM API under PyTorch's expandable segments): counted by handle, to the
/// device or host its properties name.
///
/// # Safety
/// The driver's contract for cuMemCreate: `prop` is null or a valid CUmemAllocationProp.
pub unsafe fn mem_create(
    handle: *mut u64,
    bytes: usize,
    prop: *const c_void,
    flags: u64,
) -> CuResult {
    // SAFETY: MemCreateFn is cuMemCreate's signature.
    let resolved = match unsafe { resolve::<MemCreateFn>(Wrapped::MemCreate) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    // SAFETY: prop is null or a CUmemAllocationProp (caller's contract).
    let index = resolved.pool(unsafe { location_pool(driver, prop) });
    charged(
        &PHYSICAL_HANDLES,
        index,
        Kind::Physical,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(handle, bytes, prop, flags) },
        // SAFETY: read only after success.
        || unsafe { written(handle) },
    )
}

/// The pool a cuMemCreate with properties `prop` charges: the device's, or the host's for
/// host-located memory.
///
/// # Safety
/// `prop` is null or points to a CUmemAllocationProp.
unsafe fn location_pool(driver: &Driver, prop: *const c_void) -> Option<usize> {
    if prop.is_null() {
        return None;
    }
    let bytes = prop.cast::<u8>();
    // SAFETY: both offsets lie inside CUmemAllocationProp's leading CUmemLocation; read_unaligned
    // makes no alignment assumption.
    let (location_type, id) = unsafe {
        (
            bytes
                .add(PROP_LOCATION_TYPE_OFFSET)
                .cast::<c_int>()
                .read_unaligned(),
            bytes
                .add(PROP_LOCATION_ID_OFFSET)
                .cast::<c_int>()
                .read_unaligned(),
        )
    };
    match location_type {
        LOCATION_DEVICE => device_pool(driver, id),
        LOCATION_HOST_FIRST..=LOCATION_HOST_LAST => Some(ledger::HOST),
        _ => None,
    }
}

/// cuMemRelease.
///
/// # Safety
/// The driver's contract for cuMemRelease.
pub unsafe fn mem_release(handle: u64) -> CuResult {
    // SAFETY: MemReleaseFn is cuMemRelease's signature.
    let resolved = match unsafe { resolve::<MemReleaseFn>(Wrapped::MemRelease) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    forget(&PHYSICAL_HANDLES, handle);
    // SAFETY: the caller's argument, forwarded.
    unsafe { real(handle) }
}

/// The figures a device with `physical_total` bytes, of which the driver says `physical_free`
/// are free, reports under `pool`: total = min(budget, physical), the configured budget even
/// while unseen device memory lowers the effective one (a framework sizes itself once, and the
/// driver's context lies within the budget); free = what of the effective budget the process
/// does not hold, and never more than is really free.
fn budgeted_info(pool: &ledger::Pool, physical_free: u64, physical_total: u64) -> (u64, u64) {
    let budget = pool.budget();
    if budget == UNLIMITED {
        return (physical_free, physical_total);
    }
    let total = physical_total.min(budget);
    let room = total.min(pool.effective()).saturating_sub(pool.committed());
    (physical_free.min(room), total)
}

/// cuMemGetInfo_v2: the budget as the device's size. Never fails on the shim's account.
///
/// # Safety
/// The driver's contract for cuMemGetInfo_v2.
pub unsafe fn mem_get_info(free: *mut usize, total: *mut usize) -> CuResult {
    // SAFETY: MemGetInfoFn is cuMemGetInfo_v2's signature.
    let resolved = match unsafe { resolve::<MemGetInfoFn>(Wrapped::MemGetInfoV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    // SAFETY: the caller's arguments, forwarded.
    let result = unsafe { real(free, total) };
    if result != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return result;
    }
    if let Some(pool) = current_pool(driver).and_then(ledger::pool) {
        // SAFETY: both were written by the successful call.
        let (f, t) = unsafe { budgeted_info(pool, *free as u64, *total as u64) };
        // SAFETY: as above; the figures only shrank, so they fit a usize.
        unsafe {
            *free = f as usize;
            *total = t as usize;
        }
    }
    result
}

/// cuDeviceTotalMem_v2: min(budget, physical).
///
/// # Safety
/// The driver's contract for cuDeviceTotalMem_v2.
pub unsafe fn device_total_mem(bytes: *mut usize, device: c_int) -> CuResult {
    // SAFETY: DeviceTotalMemFn is cuDeviceTotalMem_v2's signature.
    let resolved = match unsafe { resolve::<DeviceTotalMemFn>(Wrapped::DeviceTotalMemV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    // SAFETY: the caller's arguments, forwarded.
    let result = unsafe { real(bytes, device) };
    if result != CUDA_SUCCESS || bytes.is_null() {
        return result;
    }
    if let Some(pool) = device_pool(driver, device).and_then(ledger::pool) {
        // SAFETY: written by the successful call.
        unsafe { *bytes = (*bytes as u64).min(pool.budget()) as usize };
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Pinned host memory: host RAM, so the host pool.

/// cuMemHostAlloc.
///
/// # Safety
/// The driver's contract for cuMemHostAlloc.
pub unsafe fn mem_host_alloc(pp: *mut *mut c_void, bytes: usize, flags: c_uint) -> CuResult {
    // SAFETY: MemHostAllocFn is cuMemHostAlloc's signature.
    let resolved = match unsafe { resolve::<MemHostAllocFn>(Wrapped::MemHostAlloc) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    charged(
        &HOST_ALLOCATIONS,
        resolved.pool(Some(ledger::HOST)),
        Kind::PinnedHost,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(pp, bytes, flags) },
        // SAFETY: read only after success.
        || pointer_key(unsafe { *pp }),
    )
}

/// cuMemAllocHost_v2.
///
/// # Safety
/// The driver's contract for cuMemAllocHost_v2.
pub unsafe fn mem_alloc_host(pp: *mut *mut c_void, bytes: usize) -> CuResult {
    // SAFETY: MemAllocHostFn is cuMemAllocHost_v2's signature.
    let resolved = match unsafe { resolve::<MemAllocHostFn>(Wrapped::MemAllocHostV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    charged(
        &HOST_ALLOCATIONS,
        resolved.pool(Some(ledger::HOST)),
        Kind::PinnedHost,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(pp, bytes) },
        // SAFETY: read only after success.
        || pointer_key(unsafe { *pp }),
    )
}

/// cuMemFreeHost.
///
/// # Safety
/// The driver's contract for cuMemFreeHost.
pub unsafe fn mem_free_host(p: *mut c_void) -> CuResult {
    // SAFETY: MemFreeHostFn is cuMemFreeHost's signature.
    let resolved = match unsafe { resolve::<MemFreeHostFn>(Wrapped::MemFreeHost) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    forget(&HOST_ALLOCATIONS, pointer_key(p));
    // SAFETY: the caller's argument, forwarded.
    unsafe { real(p) }
}

/// cuMemHostRegister_v2: pinning makes the range resident and unswappable, so it is charged,
/// unless it lies within a malloc'ed block the ledger already counts.
///
/// # Safety
/// The driver's contract for cuMemHostRegister_v2.
pub unsafe fn mem_host_register(p: *mut c_void, bytes: usize, flags: c_uint) -> CuResult {
    // SAFETY: MemHostRegisterFn is cuMemHostRegister_v2's signature.
    let resolved = match unsafe { resolve::<MemHostRegisterFn>(Wrapped::MemHostRegisterV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    // Memory from malloc is counted already: pinning it adds nothing to what the process holds.
    // Only blocks of the tracker's size are recognised; a smaller malloc'ed block registered
    // is counted twice (docs/GPU.md).
    if crate::tracker::host().covers(p as usize, bytes as u64) {
        // SAFETY: the caller's arguments, forwarded.
        return unsafe { real(p, bytes, flags) };
    }
    charged(
        &HOST_ALLOCATIONS,
        resolved.pool(Some(ledger::HOST)),
        Kind::RegisteredHost,
        bytes as u64,
        // SAFETY: the caller's arguments, forwarded.
        || unsafe { real(p, bytes, flags) },
        || pointer_key(p),
    )
}

/// cuMemHostUnregister.
///
/// # Safety
/// The driver's contract for cuMemHostUnregister.
pub unsafe fn mem_host_unregister(p: *mut c_void) -> CuResult {
    // SAFETY: MemHostUnregisterFn is cuMemHostUnregister's signature.
    let resolved = match unsafe { resolve::<MemHostUnregisterFn>(Wrapped::MemHostUnregister) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let real = resolved.real;
    forget(&HOST_ALLOCATIONS, pointer_key(p));
    // SAFETY: the caller's argument, forwarded.
    unsafe { real(p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgeted_info_reports_the_budget_as_the_device() {
        /// (budget, effective, held, physical free, physical total, reported (free, total))
        type Case = (u64, u64, u64, u64, u64, (u64, u64));
        let cases: &[Case] = &[
            (UNLIMITED, UNLIMITED, 100, 700, 1000, (700, 1000)),
            (400, 400, 100, 700, 1000, (300, 400)),
            (400, 400, 400, 700, 1000, (0, 400)),
            (400, 400, 100, 50, 1000, (50, 400)),
            (4000, 4000, 100, 700, 1000, (700, 1000)),
            // Unseen device memory lowered the effective budget: the total stays the budget,
            // free is what is left of the effective one.
            (400, 300, 100, 700, 1000, (200, 400)),
            (400, 50, 100, 700, 1000, (0, 400)),
        ];
        // The last GPU pool: no other unit test touches it.
        let pool = ledger::pool(ledger::MAX_POOLS - 1).unwrap();
        for &(budget, effective, held, free, total, want) in cases {
            pool.set_budget(budget);
            pool.set_effective(effective);
            pool.force_commit(held);
            assert_eq!(
                budgeted_info(pool, free, total),
                want,
                "budget {budget} effective {effective} held {held}"
            );
            pool.release(held);
        }
    }
}
