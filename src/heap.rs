//! Counted allocation on jemalloc: check the ledger, call jemalloc, record. Behaviour matches
//! glibc where programs depend on it (errno, return codes, `realloc(p, 0)`, alignment rules).
//!
//! Runs inside the host's malloc: never allocates through the exported surface, never takes a
//! lock, never logs, never panics. Every block is accounted by its usable size, which jemalloc's
//! `nallocx` gives before the allocation and `malloc_usable_size` after it.

use core::ffi::c_void;
use core::ptr;

use tikv_jemalloc_sys as je;

use crate::ledger;

/// glibc's malloc alignment on x86-64 and aarch64: what malloc guarantees without flags.
pub const MALLOC_ALIGNMENT: usize = 16;

#[inline]
fn errno_slot() -> *mut i32 {
    // SAFETY: __errno_location never fails and returns this thread's errno.
    unsafe { libc::__errno_location() }
}

#[inline]
pub fn set_errno(value: i32) {
    // SAFETY: errno_slot points at this thread's errno.
    unsafe { *errno_slot() = value };
}

#[inline]
fn errno() -> i32 {
    // SAFETY: errno_slot points at this thread's errno.
    unsafe { *errno_slot() }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        4096
    }
}

/// jemalloc flags for an alignment; 0 when malloc's own alignment already satisfies it.
#[inline]
fn align_flags(align: usize) -> i32 {
    if align <= MALLOC_ALIGNMENT {
        0
    } else {
        je::MALLOCX_ALIGN(align)
    }
}

/// Allocates `size` bytes aligned to `align` (a power of two), zeroed when `zero`.
/// Null with errno ENOMEM when the budget or jemalloc refuses.
#[inline]
pub fn alloc(size: usize, align: usize, zero: bool) -> *mut c_void {
    let mut flags = align_flags(align);
    // jemalloc treats a zero-byte request as one byte; nallocx needs that said explicitly.
    let request = size.max(1);
    // SAFETY: nallocx only computes a size class; it returns 0 when none fits.
    let usable = unsafe { je::nallocx(request, flags) };
    if usable == 0 {
        ledger::host().record_refusal(size as u64);
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    if !ledger::host_charge(usable as u64, size as u64) {
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    if zero {
        flags |= je::MALLOCX_ZERO;
    }
    // SAFETY: request is non-zero and flags name a valid power-of-two alignment.
    let p = unsafe {
        if flags == 0 {
            je::malloc(request)
        } else {
            je::mallocx(request, flags)
        }
    };
    if p.is_null() {
        ledger::host_uncharge(usable as u64);
        set_errno(libc::ENOMEM);
    }
    p
}

/// Frees a block from any of the allocation functions. Preserves errno: callers check errno
/// after free-containing cleanup paths.
///
/// # Safety
/// `p` is null or a live block from this module not freed before.
#[inline]
pub unsafe fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    let saved = errno();
    // SAFETY: p is a live jemalloc block (caller's contract).
    let usable = unsafe { je::malloc_usable_size(p) };
    // SAFETY: usable is p's own usable size, valid for sized deallocation.
    unsafe { je::sdallocx(p, usable, 0) };
    ledger::host_uncharge(usable as u64);
    set_errno(saved);
}

/// glibc's calloc: zeroed, with `count * size` overflow refused as ENOMEM.
pub fn calloc(count: usize, size: usize) -> *mut c_void {
    match count.checked_mul(size) {
        Some(total) => alloc(total, MALLOC_ALIGNMENT, true),
        None => {
            set_errno(libc::ENOMEM);
            ptr::null_mut()
        }
    }
}

/// glibc's realloc: `realloc(NULL, n)` is malloc, `realloc(p, 0)` frees and returns NULL, and a
/// failed realloc leaves the old block untouched.
///
/// # Safety
/// `p` is null or a live block from this module.
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return alloc(size, MALLOC_ALIGNMENT, false);
    }
    if size == 0 {
        // SAFETY: p is live (caller's contract).
        unsafe { free(p) };
        return ptr::null_mut();
    }
    // SAFETY: p is live.
    let old = unsafe { je::malloc_usable_size(p) } as u64;
    // SAFETY: nallocx only computes a size class.
    let estimate = unsafe { je::nallocx(size, 0) } as u64;
    if estimate == 0 {
        ledger::host().record_refusal(size as u64);
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    let grow = estimate.saturating_sub(old);
    if grow > 0 && !ledger::host_charge(grow, size as u64) {
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    // SAFETY: p is live and size is non-zero.
    let q = unsafe { je::realloc(p, size) };
    if q.is_null() {
        if grow > 0 {
            ledger::host_uncharge(grow);
        }
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    // An in-place resize can keep a size other than the estimate: settle on the truth.
    // SAFETY: q is the live result of realloc.
    let new = unsafe { je::malloc_usable_size(q) } as u64;
    let charged = old + grow;
    if new > charged {
        ledger::host_force_charge(new - charged);
    } else if new < charged {
        ledger::host_uncharge(charged - new);
    }
    q
}

/// glibc's reallocarray: realloc with `count * size` overflow refused as ENOMEM.
///
/// # Safety
/// `p` is null or a live block from this module.
pub unsafe fn reallocarray(p: *mut c_void, count: usize, size: usize) -> *mut c_void {
    match count.checked_mul(size) {
        // SAFETY: forwarded caller's contract.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            set_errno(libc::ENOMEM);
            ptr::null_mut()
        }
    }
}

/// posix_memalign: the error is the return value (EINVAL, ENOMEM) and errno is left alone.
///
/// # Safety
/// `out` is valid for a pointer write.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(core::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let saved = errno();
    let p = alloc(size, align, false);
    set_errno(saved);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: out is valid (caller's contract).
    unsafe { *out = p };
    0
}

/// aligned_alloc, with C17's and glibc 2.38's rule: the alignment must be a power of two.
pub fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    alloc(size, align, false)
}

/// glibc's memalign: small alignments are malloc's, others round up to a power of two, and one
/// past the largest power of two is EINVAL.
pub fn memalign(align: usize, size: usize) -> *mut c_void {
    if align <= MALLOC_ALIGNMENT {
        return alloc(size, MALLOC_ALIGNMENT, false);
    }
    if align > usize::MAX / 2 + 1 {
        set_errno(libc::EINVAL);
        return ptr::null_mut();
    }
    alloc(size, align.next_power_of_two(), false)
}

pub fn valloc(size: usize) -> *mut c_void {
    alloc(size, page_size(), false)
}

/// pvalloc: page-aligned, the size rounded up to whole pages (0 gives one page).
pub fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    let pages = size.div_ceil(page).max(1);
    match pages.checked_mul(page) {
        Some(rounded) => alloc(rounded, page, false),
        None => {
            set_errno(libc::ENOMEM);
            ptr::null_mut()
        }
    }
}

/// # Safety
/// `p` is null or a live block from this module.
pub unsafe fn usable_size(p: *const c_void) -> usize {
    if p.is_null() {
        0
    } else {
        // SAFETY: p is live (caller's contract).
        unsafe { je::malloc_usable_size(p) }
    }
}
