//! The GPU side of the ledger: one pool per CUDA device with its own budget
//! (`QVSHIM_GPU_BUDGET`), and the accounting behind every driver memory call the shim wraps.
//!
//! Each function here is the body of one wrapper in `surface/cuda.rs`: check the pool, call the
//! real driver, record. Which symbol is handed out is the surface's business, never this one's. Device memory is charged to the device's pool, pinned host memory to the
//! host pool, and every live allocation is remembered by pointer or handle in a fixed table so
//! that its free takes back exactly what it charged.
//!
//! Never allocates, never takes a lock, never logs, never panics: refusals and level changes only
//! ring the monitor. The one exception is the first call into the driver, which loads it.
//! Memory the driver takes for itself (contexts, module images, the primary context's stack and
//! printf buffers) never passes through these calls and is not counted.

pub mod driver;
pub mod table;

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::base::config::BudgetSpec;
use crate::ledger::{self, UNLIMITED};
use driver::{
    driver, CuResult, Driver, Inside, Wrapped, CUDA_ERROR_NOT_FOUND, CUDA_ERROR_NOT_INITIALIZED,
    CUDA_ERROR_OUT_OF_MEMORY, CUDA_SUCCESS,
};
use table::{Kind, Record, Table};

/// Devices with a pool of their own: the ledger's pools past the host's.
pub const MAX_DEVICES: usize = ledger::MAX_POOLS - 1;

/// `CUmemLocationType` values in `CUmemAllocationProp.location`.
const LOCATION_DEVICE: c_int = 1;
const LOCATION_HOST_FIRST: c_int = 2;
const LOCATION_HOST_LAST: c_int = 4;
/// Byte offsets in `CUmemAllocationProp`: `type`, `requestedHandleTypes`, then
/// `location { type, id }`, all 32-bit.
const PROP_LOCATION_TYPE_OFFSET: usize = 8;
const PROP_LOCATION_ID_OFFSET: usize = 12;

/// Device allocations live at once, most: PyTorch's caching allocator holds hundreds, the
/// cudaMallocAsync backend one per live tensor.
static DEVICE_ALLOCATIONS: Table<{ 1 << 17 }> = Table::new();
/// cuMemCreate handles: expandable segments map 2 MiB or 20 MiB pages.
static PHYSICAL_HANDLES: Table<{ 1 << 16 }> = Table::new();
/// Pinned host allocations and registrations.
static HOST_ALLOCATIONS: Table<{ 1 << 12 }> = Table::new();

// ---------------------------------------------------------------------------------------------
// Budget and device pools.

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
fn device_pool(driver: &Driver, device: c_int) -> Option<usize> {
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
fn current_pool(driver: &Driver) -> Option<usize> {
    let get_device = driver.ctx_get_device?;
    let mut device: c_int = -1;
    // SAFETY: cuCtxGetDevice writes one int; device is a local.
    if unsafe { get_device(&mut device) } != CUDA_SUCCESS {
        return None;
    }
    device_pool(driver, device)
}

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
/// budget would be passed; a failed driver call gives the charge back and returns its own code.
/// Without a pool (`None`) the call goes through uncounted.
fn charged<const SLOTS: usize>(
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
    if !pool.charge_direct(bytes, false) {
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
fn remember<const SLOTS: usize>(
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
    }
}

/// Takes back what the allocation under `key` charged; nothing for one never counted.
fn forget<const SLOTS: usize>(table: &Table<SLOTS>, key: u64) {
    if let Some(record) = table.remove(key) {
        if let Some(pool) = ledger::pool(record.pool as usize) {
            pool.uncharge_direct(record.bytes);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real driver's functions, by form.

type MemAllocFn = unsafe extern "C" fn(*mut u64, usize) -> CuResult;
type MemAllocPitchFn = unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> CuResult;
type MemAllocManagedFn = unsafe extern "C" fn(*mut u64, usize, c_uint) -> CuResult;
type MemAllocAsyncFn = unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> CuResult;
type MemAllocFromPoolAsyncFn =
    unsafe extern "C" fn(*mut u64, usize, *mut c_void, *mut c_void) -> CuResult;
type MemFreeFn = unsafe extern "C" fn(u64) -> CuResult;
type MemFreeAsyncFn = unsafe extern "C" fn(u64, *mut c_void) -> CuResult;
type MemCreateFn = unsafe extern "C" fn(*mut u64, usize, *const c_void, u64) -> CuResult;
type MemReleaseFn = unsafe extern "C" fn(u64) -> CuResult;
type MemGetInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
type DeviceTotalMemFn = unsafe extern "C" fn(*mut usize, c_int) -> CuResult;
type MemHostAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult;
type MemAllocHostFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> CuResult;
type MemFreeHostFn = unsafe extern "C" fn(*mut c_void) -> CuResult;
type MemHostRegisterFn = unsafe extern "C" fn(*mut c_void, usize, c_uint) -> CuResult;
type MemHostUnregisterFn = unsafe extern "C" fn(*mut c_void) -> CuResult;
pub(crate) type GetProcAddressFn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CuResult;
pub(crate) type GetProcAddressV2Fn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CuResult;

/// The real function of `form` as the function pointer type `F`.
///
/// # Safety
/// `F` is an `extern "C"` function pointer type with exactly the signature of `form`.
unsafe fn real_call<F: Copy>(driver: &Driver, form: Wrapped) -> Option<F> {
    // SAFETY: forwarded caller's contract.
    unsafe { as_function::<F>(driver.real(form)) }
}

/// `address` as the function pointer type `F`; None for 0.
///
/// # Safety
/// `F` is an `extern "C"` function pointer type, and `address` is 0 or a function of that type.
unsafe fn as_function<F: Copy>(address: usize) -> Option<F> {
    if address == 0 {
        return None;
    }
    // SAFETY: F is a function pointer (the size of usize) for this address (caller's contract).
    Some(unsafe { core::mem::transmute_copy::<usize, F>(&address) })
}

/// How far calls may come back into the shim from below before one is refused: each level is
/// a driver export that itself called a wrapped name through the global scope.
const CALLS_FROM_BELOW_MAX: u8 = 4;

/// One call's way to the driver: the driver, the function to call, and whether it is charged.
/// The thread counts as inside the driver until this is dropped, at the end of the wrapper.
pub(crate) struct Resolved<F> {
    pub(crate) driver: &'static Driver,
    pub(crate) real: F,
    /// False for a call that came back from below the shim: the call that went down is charged.
    counted: bool,
    _inside: Inside,
}

impl<F> Resolved<F> {
    /// The pool to charge: `index`, or none for a call that came back from below.
    fn pool(&self, index: Option<usize>) -> Option<usize> {
        index.filter(|_| self.counted)
    }
}

/// The loaded driver and the function to call for `form`, or the code to return without them.
///
/// A call from the program gets the real function (loading the driver on first use). A call
/// that arrives while this thread is already inside a wrapper's call to the driver came back
/// from below (a driver export or another interposer that looks up through the global scope
/// and so finds the shim): it goes to the driver's own export, uncharged, which ends the loop;
/// past [`CALLS_FROM_BELOW_MAX`] levels, or while the driver is still loading, it is refused.
///
/// # Safety
/// As [`real_call`].
pub(crate) unsafe fn resolve<F: Copy>(form: Wrapped) -> Result<Resolved<F>, CuResult> {
    let inside = Inside::enter();
    let (driver, address, counted) = match inside.depth_before() {
        0 => {
            let driver = driver().ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
            (driver, driver.real(form), true)
        }
        depth if depth <= CALLS_FROM_BELOW_MAX => {
            let driver = driver::loaded().ok_or(CUDA_ERROR_NOT_INITIALIZED)?;
            (driver, driver.floor(form), false)
        }
        _ => return Err(CUDA_ERROR_NOT_FOUND),
    };
    // SAFETY: both addresses are functions of this form (caller's contract on F).
    let real = unsafe { as_function::<F>(address) }.ok_or(CUDA_ERROR_NOT_FOUND)?;
    Ok(Resolved {
        driver,
        real,
        counted,
        _inside: inside,
    })
}

/// Reads the pointer or handle a successful allocation wrote through `out`.
///
/// # Safety
/// `out` was accepted by a driver call that returned success, so it is valid and written.
unsafe fn written(out: *const u64) -> u64 {
    // SAFETY: caller's contract.
    unsafe { *out }
}

fn pointer_key(p: *mut c_void) -> u64 {
    p as usize as u64
}

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
    if !pool.charge_direct(estimate, false) {
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
    charged(
        &DEVICE_ALLOCATIONS,
        resolved.pool(current_pool(driver)),
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
/// are free, reports under `pool`: total = min(budget, physical), free = what of that the
/// process does not hold, and never more than is really free.
fn budgeted_info(pool: &ledger::Pool, physical_free: u64, physical_total: u64) -> (u64, u64) {
    let budget = pool.effective();
    if budget == UNLIMITED {
        return (physical_free, physical_total);
    }
    let total = physical_total.min(budget);
    let room = total.saturating_sub(pool.committed());
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
        unsafe { *bytes = (*bytes as u64).min(pool.effective()) as usize };
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

/// A device's physical memory as the driver reported it; None before the process used it.
pub fn device_memory(device: usize) -> Option<u64> {
    DEVICE_MEMORY
        .get(device)
        .map(|m| m.load(Ordering::Relaxed))
        .filter(|&bytes| bytes > 0)
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

    #[test]
    fn budgeted_info_reports_the_budget_as_the_device() {
        /// (budget, held, physical free, physical total, reported (free, total))
        type Case = (u64, u64, u64, u64, (u64, u64));
        let cases: &[Case] = &[
            (UNLIMITED, 100, 700, 1000, (700, 1000)),
            (400, 100, 700, 1000, (300, 400)),
            (400, 400, 700, 1000, (0, 400)),
            (400, 100, 50, 1000, (50, 400)),
            (4000, 100, 700, 1000, (700, 1000)),
        ];
        // The last GPU pool: no other unit test touches it.
        let pool = ledger::pool(ledger::MAX_POOLS - 1).unwrap();
        for &(budget, held, free, total, want) in cases {
            pool.set_budget(budget);
            pool.force_commit(held);
            assert_eq!(
                budgeted_info(pool, free, total),
                want,
                "budget {budget} held {held}"
            );
            pool.release(held);
        }
    }
}
