//! The whole malloc family, exported from libqvshim.so and served by jemalloc through
//! [`crate::heap`], including glibc's `__libc_*` aliases: a library that reached glibc's own heap
//! would later hand our `free` a pointer jemalloc does not know.
//!
//! C++'s operator new and delete reach these through libstdc++. Nothing here allocates, locks
//! or panics.

use core::ffi::c_void;

use crate::heap;

#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    heap::malloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

#[no_mangle]
pub extern "C" fn calloc(count: usize, size: usize) -> *mut c_void {
    heap::calloc(count, size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::realloc(p, size) }
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, count: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::reallocarray(p, count, size) }
}

/// # Safety
/// `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::posix_memalign(out, align, size) }
}

#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    heap::aligned_alloc(align, size)
}

#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    heap::memalign(align, size)
}

#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    heap::valloc(size)
}

#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    heap::pvalloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::usable_size(p) }
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

/// Purges jemalloc's unused pages; returns 1 (memory may have been released), as glibc does
/// when it released some.
#[no_mangle]
pub extern "C" fn malloc_trim(_pad: usize) -> i32 {
    crate::jemalloc::purge();
    1
}

// glibc's internal names for the same functions.

#[no_mangle]
pub extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
    heap::malloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn __libc_free(p: *mut c_void) {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

#[no_mangle]
pub extern "C" fn __libc_calloc(count: usize, size: usize) -> *mut c_void {
    heap::calloc(count, size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::realloc(p, size) }
}

#[no_mangle]
pub extern "C" fn __libc_memalign(align: usize, size: usize) -> *mut c_void {
    heap::memalign(align, size)
}

#[no_mangle]
pub extern "C" fn __libc_valloc(size: usize) -> *mut c_void {
    heap::valloc(size)
}

#[no_mangle]
pub extern "C" fn __libc_pvalloc(size: usize) -> *mut c_void {
    heap::pvalloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn __libc_cfree(p: *mut c_void) {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

/// # Safety
/// `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn __posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    // SAFETY: forwarded caller's contract.
    unsafe { heap::posix_memalign(out, align, size) }
}
