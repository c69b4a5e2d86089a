//! How a wrapper reaches the real driver: the driver's function types by form, and `resolve`,
//! which loads the driver on first use and sends a call that came back from below the shim
//! straight to the driver's own export, uncharged. Never allocates, never takes a lock.

use core::ffi::{c_char, c_int, c_uint, c_void};

pub(crate) use super::driver::as_function;
use super::driver::{
    self, driver, CuResult, Driver, Inside, Wrapped, CUDA_ERROR_NOT_FOUND,
    CUDA_ERROR_NOT_INITIALIZED,
};

pub(crate) type MemAllocFn = unsafe extern "C" fn(*mut u64, usize) -> CuResult;
pub(crate) type MemAllocPitchFn =
    unsafe extern "C" fn(*mut u64, *mut usize, usize, usize, c_uint) -> CuResult;
pub(crate) type MemAllocManagedFn = unsafe extern "C" fn(*mut u64, usize, c_uint) -> CuResult;
pub(crate) type MemAllocAsyncFn = unsafe extern "C" fn(*mut u64, usize, *mut c_void) -> CuResult;
pub(crate) type MemAllocFromPoolAsyncFn =
    unsafe extern "C" fn(*mut u64, usize, *mut c_void, *mut c_void) -> CuResult;
pub(crate) type MemFreeFn = unsafe extern "C" fn(u64) -> CuResult;
pub(crate) type MemFreeAsyncFn = unsafe extern "C" fn(u64, *mut c_void) -> CuResult;
pub(crate) type MemCreateFn = unsafe extern "C" fn(*mut u64, usize, *const c_void, u64) -> CuResult;
pub(crate) type MemReleaseFn = unsafe extern "C" fn(u64) -> CuResult;
pub(crate) type MemGetInfoFn = unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult;
pub(crate) type DeviceTotalMemFn = unsafe extern "C" fn(*mut usize, c_int) -> CuResult;
pub(crate) type MemHostAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult;
pub(crate) type MemAllocHostFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> CuResult;
pub(crate) type MemFreeHostFn = unsafe extern "C" fn(*mut c_void) -> CuResult;
pub(crate) type MemHostRegisterFn = unsafe extern "C" fn(*mut c_void, usize, c_uint) -> CuResult;
pub(crate) type MemHostUnregisterFn = unsafe extern "C" fn(*mut c_void) -> CuResult;
pub(crate) type GetProcAddressFn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CuResult;
pub(crate) type GetProcAddressV2Fn =
    unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CuResult;

/// The real function of `form` as the function pointer type `F`.
///
/// # Safety
/// `F` is an `extern "C"` function pointer type with exactly the signature of `form`.
pub(crate) unsafe fn real_call<F: Copy>(driver: &Driver, form: Wrapped) -> Option<F> {
    // SAFETY: forwarded caller's contract.
    unsafe { as_function::<F>(driver.real(form)) }
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
    pub(crate) fn pool(&self, index: Option<usize>) -> Option<usize> {
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
pub(crate) unsafe fn written(out: *const u64) -> u64 {
    // SAFETY: caller's contract.
    unsafe { *out }
}

pub(crate) fn pointer_key(p: *mut c_void) -> u64 {
    p as usize as u64
}
