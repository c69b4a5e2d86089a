//! The whole malloc family, exported from libqvshim.so and served by jemalloc through
//! [`crate::heap`], including glibc's `__libc_*` aliases: a library that reached glibc's own heap
//! would later hand our `free` a pointer jemalloc does not know.
//!
//! C++'s operator new and delete reach these through libstdc++. Nothing here allocates, locks
//! or panics, but the statistics calls (`mallinfo`, `malloc_stats`, ...), which read jemalloc's.
//!
//! When the process's malloc is not the shim's ([`crate::neighbours`]: another allocator
//! preloaded first, or the library dlopened), each export passes the call on to what the
//! caller would have reached without the shim. malloc and free make that check on their slow
//! paths (in pass-through no call takes their fast paths); every other export makes it first.

use core::ffi::{c_int, c_void};

use crate::heap;
use crate::heap_stats::{self, Mallinfo, Mallinfo2};
use crate::neighbours::{self, Name};

/// In pass-through, returns from the export with what the function of the same name elsewhere
/// answers for the same arguments.
macro_rules! pass_through {
    ($name:ident, $signature:ty, $($arg:expr),*) => {
        if let Some(address) = neighbours::next(Name::$name) {
            // SAFETY: the address is another definition of this same function, found by its
            // name, so it has the export's signature; the caller's contract carries over.
            #[allow(unused_unsafe)]
            return unsafe { core::mem::transmute::<usize, $signature>(address)($($arg),*) };
        }
    };
}

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
    pass_through!(
        Calloc,
        extern "C" fn(usize, usize) -> *mut c_void,
        count,
        size
    );
    heap::calloc(count, size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    pass_through!(
        Realloc,
        unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
        p,
        size
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap::realloc(p, size) }
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, count: usize, size: usize) -> *mut c_void {
    pass_through!(
        Reallocarray,
        unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void,
        p,
        count,
        size
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap::reallocarray(p, count, size) }
}

/// # Safety
/// `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    pass_through!(
        PosixMemalign,
        unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> i32,
        out,
        align,
        size
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap::posix_memalign(out, align, size) }
}

#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    pass_through!(
        AlignedAlloc,
        extern "C" fn(usize, usize) -> *mut c_void,
        align,
        size
    );
    heap::aligned_alloc(align, size)
}

#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    pass_through!(
        Memalign,
        extern "C" fn(usize, usize) -> *mut c_void,
        align,
        size
    );
    heap::memalign(align, size)
}

#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    pass_through!(Valloc, extern "C" fn(usize) -> *mut c_void, size);
    heap::valloc(size)
}

#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    pass_through!(Pvalloc, extern "C" fn(usize) -> *mut c_void, size);
    heap::pvalloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    pass_through!(
        MallocUsableSize,
        unsafe extern "C" fn(*mut c_void) -> usize,
        p
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap::usable_size(p) }
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    pass_through!(Cfree, unsafe extern "C" fn(*mut c_void), p);
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

/// Purges jemalloc's unused pages; returns 1 (memory may have been released), as glibc does
/// when it released some.
#[no_mangle]
pub extern "C" fn malloc_trim(_pad: usize) -> i32 {
    pass_through!(MallocTrim, extern "C" fn(usize) -> i32, _pad);
    crate::base::jemalloc::purge();
    1
}

// glibc's internal names for the same functions.

#[no_mangle]
pub extern "C" fn __libc_malloc(size: usize) -> *mut c_void {
    pass_through!(LibcMalloc, extern "C" fn(usize) -> *mut c_void, size);
    heap::malloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn __libc_free(p: *mut c_void) {
    pass_through!(LibcFree, unsafe extern "C" fn(*mut c_void), p);
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

#[no_mangle]
pub extern "C" fn __libc_calloc(count: usize, size: usize) -> *mut c_void {
    pass_through!(
        LibcCalloc,
        extern "C" fn(usize, usize) -> *mut c_void,
        count,
        size
    );
    heap::calloc(count, size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn __libc_realloc(p: *mut c_void, size: usize) -> *mut c_void {
    pass_through!(
        LibcRealloc,
        unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void,
        p,
        size
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap::realloc(p, size) }
}

#[no_mangle]
pub extern "C" fn __libc_memalign(align: usize, size: usize) -> *mut c_void {
    pass_through!(
        LibcMemalign,
        extern "C" fn(usize, usize) -> *mut c_void,
        align,
        size
    );
    heap::memalign(align, size)
}

#[no_mangle]
pub extern "C" fn __libc_valloc(size: usize) -> *mut c_void {
    pass_through!(LibcValloc, extern "C" fn(usize) -> *mut c_void, size);
    heap::valloc(size)
}

#[no_mangle]
pub extern "C" fn __libc_pvalloc(size: usize) -> *mut c_void {
    pass_through!(LibcPvalloc, extern "C" fn(usize) -> *mut c_void, size);
    heap::pvalloc(size)
}

/// # Safety
/// `p` is null or a live block from this library's allocation functions.
#[no_mangle]
pub unsafe extern "C" fn __libc_cfree(p: *mut c_void) {
    pass_through!(LibcCfree, unsafe extern "C" fn(*mut c_void), p);
    // SAFETY: forwarded caller's contract.
    unsafe { heap::free(p) }
}

/// # Safety
/// `out` is valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn __posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    pass_through!(
        PosixMemalignAlias,
        unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> i32,
        out,
        align,
        size
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap::posix_memalign(out, align, size) }
}

// The statistics and tuning calls: glibc's would describe a heap the process does not use.

#[no_mangle]
pub extern "C" fn mallinfo2() -> Mallinfo2 {
    pass_through!(Mallinfo2, extern "C" fn() -> Mallinfo2,);
    heap_stats::mallinfo2()
}

#[no_mangle]
pub extern "C" fn mallinfo() -> Mallinfo {
    pass_through!(Mallinfo, extern "C" fn() -> Mallinfo,);
    heap_stats::mallinfo()
}

#[no_mangle]
pub extern "C" fn mallopt(param: c_int, value: c_int) -> c_int {
    pass_through!(Mallopt, extern "C" fn(c_int, c_int) -> c_int, param, value);
    heap_stats::mallopt(param, value)
}

#[no_mangle]
pub extern "C" fn malloc_stats() {
    pass_through!(MallocStats, extern "C" fn(),);
    heap_stats::malloc_stats()
}

/// # Safety
/// `stream` is a valid open `FILE *` (glibc's contract).
#[no_mangle]
pub unsafe extern "C" fn malloc_info(options: c_int, stream: *mut libc::FILE) -> c_int {
    pass_through!(
        MallocInfo,
        unsafe extern "C" fn(c_int, *mut libc::FILE) -> c_int,
        options,
        stream
    );
    // SAFETY: forwarded caller's contract.
    unsafe { heap_stats::malloc_info(options, stream) }
}
