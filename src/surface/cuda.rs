//! The CUDA surface: `dlsym`, `cuGetProcAddress(_v2)` and the driver's memory calls, exported
//! from libqvshim.so. Each is a one-line forward to [`crate::gpu`]; [`wrapper`] lists them all.
//!
//! How a program reaches the driver decides what must be hooked. CUDA runtimes since 11.3
//! (PyTorch's included) `dlopen("libcuda.so.1")`, take `cuGetProcAddress_v2` with `dlsym`, and
//! get every other driver function from it; `cudaGetDriverEntryPoint` lands there too. So:
//! * `dlsym(handle, "cuMemAlloc_v2")` (and every wrapped name) hands out the wrapper;
//! * `cuGetProcAddress(_v2)` lets the driver pick the form the caller's version and flags ask
//!   for, and swaps in the wrapper when that form is one the shim wraps;
//! * a program linked against libcuda, or looking up with RTLD_DEFAULT, finds these exports first.
//!
//! Every other `dlsym` is glibc's own, reached by a tail jump so that glibc sees the caller's
//! return address: `dlsym(RTLD_NEXT, ...)` from any library still means "after that library".
//!
//! Whatever the driver or another interposer answers, the function a wrapper calls as the real
//! one is never one of these exports: `gpu::driver` places every candidate in the loader's list
//! and sends calls that come back from below straight to the driver (docs/GPU.md).
//!
//! The legacy unversioned forms (`cuMemAlloc` with 32-bit sizes, CUDA before 3.2) are not
//! wrapped: a caller asking for them gets them, uncounted.

#![allow(non_snake_case)]

use core::ffi::{c_char, c_int, c_uint, c_void};

use core::ffi::CStr;

use crate::gpu::driver::{self, CuResult, Driver, Wrapped, CUDA_SUCCESS};
use crate::gpu::resolve::{resolve, GetProcAddressFn, GetProcAddressV2Fn};
use crate::gpu::{self};

/// The wrapper the shim hands out for `form`.
pub fn wrapper(form: Wrapped) -> *mut c_void {
    let address: *const () = match form {
        Wrapped::GetProcAddress => cuGetProcAddress as *const (),
        Wrapped::GetProcAddressV2 => cuGetProcAddress_v2 as *const (),
        Wrapped::MemAllocV2 => cuMemAlloc_v2 as *const (),
        Wrapped::MemAllocPitchV2 => cuMemAllocPitch_v2 as *const (),
        Wrapped::MemAllocManaged => cuMemAllocManaged as *const (),
        Wrapped::MemAllocAsync => cuMemAllocAsync as *const (),
        Wrapped::MemAllocAsyncPtsz => cuMemAllocAsync_ptsz as *const (),
        Wrapped::MemAllocFromPoolAsync => cuMemAllocFromPoolAsync as *const (),
        Wrapped::MemAllocFromPoolAsyncPtsz => cuMemAllocFromPoolAsync_ptsz as *const (),
        Wrapped::MemFreeV2 => cuMemFree_v2 as *const (),
        Wrapped::MemFreeAsync => cuMemFreeAsync as *const (),
        Wrapped::MemFreeAsyncPtsz => cuMemFreeAsync_ptsz as *const (),
        Wrapped::MemCreate => cuMemCreate as *const (),
        Wrapped::MemRelease => cuMemRelease as *const (),
        Wrapped::MemGetInfoV2 => cuMemGetInfo_v2 as *const (),
        Wrapped::DeviceTotalMemV2 => cuDeviceTotalMem_v2 as *const (),
        Wrapped::MemHostAlloc => cuMemHostAlloc as *const (),
        Wrapped::MemAllocHostV2 => cuMemAllocHost_v2 as *const (),
        Wrapped::MemFreeHost => cuMemFreeHost as *const (),
        Wrapped::MemHostRegisterV2 => cuMemHostRegister_v2 as *const (),
        Wrapped::MemHostUnregister => cuMemHostUnregister as *const (),
    };
    address.cast_mut().cast()
}

// ---------------------------------------------------------------------------------------------
// Lookups: dlsym and cuGetProcAddress hand out the wrappers.

/// Replaces what the driver handed out through `pfn` with the shim's wrapper when it is a form
/// the shim wraps. The driver chose the form from the caller's version and flags; this only
/// recognises the address, so an older or newer form than the ones wrapped passes untouched.
///
/// # Safety
/// `pfn` is null or valid for reading and writing one pointer.
unsafe fn wrap_handed_out(driver: &Driver, pfn: *mut *mut c_void) {
    if pfn.is_null() {
        return;
    }
    // SAFETY: caller's contract.
    let handed_out = unsafe { *pfn } as usize;
    if let Some(form) = driver.identify(handed_out) {
        // SAFETY: caller's contract.
        unsafe { *pfn = wrapper(form) };
    }
}

/// cuGetProcAddress (CUDA 11.3 to 11.8 runtimes).
///
/// # Safety
/// The driver's contract for cuGetProcAddress.
pub unsafe fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CuResult {
    // SAFETY: GetProcAddressFn is cuGetProcAddress's signature.
    let resolved = match unsafe { resolve::<GetProcAddressFn>(Wrapped::GetProcAddress) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    // SAFETY: the caller's arguments, forwarded.
    let result = unsafe { real(symbol, pfn, cuda_version, flags) };
    if result == CUDA_SUCCESS {
        // SAFETY: pfn was accepted and written by the driver.
        unsafe { wrap_handed_out(driver, pfn) };
    }
    result
}

/// cuGetProcAddress_v2 (CUDA 12 and later): the driver writes `symbol_status` itself.
///
/// # Safety
/// The driver's contract for cuGetProcAddress_v2.
pub unsafe fn get_proc_address_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CuResult {
    // SAFETY: GetProcAddressV2Fn is cuGetProcAddress_v2's signature.
    let resolved = match unsafe { resolve::<GetProcAddressV2Fn>(Wrapped::GetProcAddressV2) } {
        Ok(resolved) => resolved,
        Err(code) => return code,
    };
    let (driver, real) = (resolved.driver, resolved.real);
    // SAFETY: the caller's arguments, forwarded.
    let result = unsafe { real(symbol, pfn, cuda_version, flags, symbol_status) };
    if result == CUDA_SUCCESS {
        // SAFETY: pfn was accepted and written by the driver.
        unsafe { wrap_handed_out(driver, pfn) };
    }
    result
}

/// What the exported `dlsym` returns without asking glibc, or null to let glibc answer as if the
/// shim were not there (the trampoline then jumps to glibc's `dlsym` with the caller's own
/// return address, so RTLD_NEXT still means "after the caller").
///
/// Only a lookup in a real handle (not RTLD_DEFAULT, not RTLD_NEXT) of a driver function the
/// shim wraps, by its exported name, that the handle really has, gets the wrapper. RTLD_DEFAULT
/// already finds the shim's exports first; RTLD_NEXT belongs to whoever chains after the caller.
///
/// Never allocates: it compares bytes against a static table. Also resolves glibc's `dlsym` for
/// the trampoline.
///
/// # Safety
/// `symbol` is null or NUL-terminated; `handle` is what the caller passed to `dlsym`.
pub unsafe extern "C" fn dlsym_answer(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    let nothing = core::ptr::null_mut();
    driver::real_dlsym_address();
    if symbol.is_null() || handle == libc::RTLD_DEFAULT || handle == libc::RTLD_NEXT {
        return nothing;
    }
    // SAFETY: symbol is NUL-terminated, so reading its first byte, and the second when the first
    // is not the terminator, stays inside it.
    let starts_with_cu = unsafe { *symbol == b'c' as c_char && *symbol.add(1) == b'u' as c_char };
    if !starts_with_cu {
        return nothing;
    }
    // SAFETY: NUL-terminated (caller's contract).
    let name = unsafe { CStr::from_ptr(symbol) };
    let Some(form) = Wrapped::by_export_name(name) else {
        return nothing;
    };
    // SAFETY: handle is neither special value, so the caller the real dlsym sees does not matter.
    if unsafe { driver::real_dlsym(handle, symbol) }.is_null() {
        return nothing;
    }
    wrapper(form)
}

// ---------------------------------------------------------------------------------------------
// dlsym: ask dlsym_answer; when it has no answer, jump (not call) to glibc's dlsym with the
// caller's arguments and return address untouched.

/// # Safety
/// glibc's contract for `dlsym`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        // Keep the arguments; two pushes and 8 bytes realign the stack to 16 for the call.
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {answer}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jnz 2f",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        "jmp rax",
        "2:",
        "ret",
        answer = sym dlsym_answer,
        real = sym gpu::driver::REAL_DLSYM,
    )
}

/// # Safety
/// glibc's contract for `dlsym`.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void {
    core::arch::naked_asm!(
        "stp x29, x30, [sp, #-32]!",
        "mov x29, sp",
        "stp x0, x1, [sp, #16]",
        "bl {answer}",
        "mov x9, x0",
        "ldp x0, x1, [sp, #16]",
        "ldp x29, x30, [sp], #32",
        "cbnz x9, 2f",
        "adrp x16, {real}",
        "ldr x16, [x16, :lo12:{real}]",
        "cbz x16, 2f",
        "br x16",
        "2:",
        "mov x0, x9",
        "ret",
        answer = sym dlsym_answer,
        real = sym gpu::driver::REAL_DLSYM,
    )
}

// ---------------------------------------------------------------------------------------------
// cuGetProcAddress.

/// # Safety
/// The driver's contract for cuGetProcAddress.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { get_proc_address(symbol, pfn, cuda_version, flags) }
}

/// # Safety
/// The driver's contract for cuGetProcAddress_v2.
#[no_mangle]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: u64,
    symbol_status: *mut c_int,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { get_proc_address_v2(symbol, pfn, cuda_version, flags, symbol_status) }
}

// ---------------------------------------------------------------------------------------------
// Device memory.

/// # Safety
/// The driver's contract for cuMemAlloc_v2.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut u64, bytes: usize) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_alloc(dptr, bytes) }
}

/// # Safety
/// The driver's contract for cuMemAllocPitch_v2.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_size: c_uint,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_alloc_pitch(dptr, pitch, width, height, element_size) }
}

/// # Safety
/// The driver's contract for cuMemAllocManaged.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut u64,
    bytes: usize,
    flags: c_uint,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_alloc_managed(dptr, bytes, flags) }
}

/// # Safety
/// The driver's contract for cuMemAllocAsync.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut u64,
    bytes: usize,
    stream: *mut c_void,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_alloc_async(Wrapped::MemAllocAsync, dptr, bytes, stream) }
}

/// # Safety
/// The driver's contract for cuMemAllocAsync_ptsz.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    stream: *mut c_void,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_alloc_async(Wrapped::MemAllocAsyncPtsz, dptr, bytes, stream) }
}

/// # Safety
/// The driver's contract for cuMemAllocFromPoolAsync.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut u64,
    bytes: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe {
        gpu::mem_alloc_from_pool_async(Wrapped::MemAllocFromPoolAsync, dptr, bytes, pool, stream)
    }
}

/// # Safety
/// The driver's contract for cuMemAllocFromPoolAsync_ptsz.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut u64,
    bytes: usize,
    pool: *mut c_void,
    stream: *mut c_void,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe {
        gpu::mem_alloc_from_pool_async(
            Wrapped::MemAllocFromPoolAsyncPtsz,
            dptr,
            bytes,
            pool,
            stream,
        )
    }
}

/// # Safety
/// The driver's contract for cuMemFree_v2.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: u64) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_free(dptr) }
}

/// # Safety
/// The driver's contract for cuMemFreeAsync.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: u64, stream: *mut c_void) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_free_async(Wrapped::MemFreeAsync, dptr, stream) }
}

/// # Safety
/// The driver's contract for cuMemFreeAsync_ptsz.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: u64, stream: *mut c_void) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_free_async(Wrapped::MemFreeAsyncPtsz, dptr, stream) }
}

/// # Safety
/// The driver's contract for cuMemCreate.
#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    bytes: usize,
    prop: *const c_void,
    flags: u64,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_create(handle, bytes, prop, flags) }
}

/// # Safety
/// The driver's contract for cuMemRelease.
#[no_mangle]
pub unsafe extern "C" fn cuMemRelease(handle: u64) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_release(handle) }
}

/// # Safety
/// The driver's contract for cuMemGetInfo_v2.
#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_get_info(free, total) }
}

/// # Safety
/// The driver's contract for cuDeviceTotalMem_v2.
#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: c_int) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::device_total_mem(bytes, device) }
}

// ---------------------------------------------------------------------------------------------
// Pinned host memory.

/// # Safety
/// The driver's contract for cuMemHostAlloc.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytes: usize,
    flags: c_uint,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_host_alloc(pp, bytes, flags) }
}

/// # Safety
/// The driver's contract for cuMemAllocHost_v2.
#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytes: usize) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_alloc_host(pp, bytes) }
}

/// # Safety
/// The driver's contract for cuMemFreeHost.
#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_free_host(p) }
}

/// # Safety
/// The driver's contract for cuMemHostRegister_v2.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostRegister_v2(
    p: *mut c_void,
    bytes: usize,
    flags: c_uint,
) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_host_register(p, bytes, flags) }
}

/// # Safety
/// The driver's contract for cuMemHostUnregister.
#[no_mangle]
pub unsafe extern "C" fn cuMemHostUnregister(p: *mut c_void) -> CuResult {
    // SAFETY: forwarded caller's contract.
    unsafe { gpu::mem_host_unregister(p) }
}
