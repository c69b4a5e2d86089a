//! Counted allocation on jemalloc: check the ledger, call jemalloc, record. Behaviour matches
//! glibc where programs depend on it (errno, return codes, `realloc(p, 0)`, alignment rules).
//!
//! Runs inside the host's malloc: never allocates through the exported surface, never takes a
//! lock, never logs, never panics. Every block is accounted by its usable size: estimated from
//! its size class before the allocation (so the budget is checked first), then settled with the
//! exact figure jemalloc's per-thread byte counters moved by.
//!
//! One concern, a little over 500 lines: the malloc family's behaviour on jemalloc, fast paths
//! and their out-of-line slow paths kept together so the tail-call structure stays visible.

use core::ffi::c_void;
use core::ptr;

use tikv_jemalloc_sys as je;

use crate::ledger;
use crate::neighbours::{self, Name};
use crate::tracker::{self, TRACK_MIN_BYTES};

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

/// Largest request whose size class [`usable_size_for`] computes itself; past it, nallocx.
const INLINE_SIZE_CLASS_MAX_BYTES: usize = 1 << 40;

/// The usable size jemalloc gives a request of `size` bytes at malloc's own alignment: its size
/// class, computed as jemalloc does (`sz_s2u_compute`, 16-byte quantum, four classes per
/// doubling) without calling into it; requests up to [`LOOKUP_MAX_BYTES`] read it from a table,
/// as jemalloc's own fast path does. A unit test holds it to `nallocx` for every size class.
#[inline]
pub fn usable_size_for(size: usize) -> usize {
    if size <= LOOKUP_MAX_BYTES {
        return SMALL_CLASSES[(size + 7) >> 3] as usize;
    }
    if size > INLINE_SIZE_CLASS_MAX_BYTES {
        // SAFETY: nallocx only computes a size class; 0 means none fits.
        return unsafe { je::nallocx(size, 0) };
    }
    size_class(size)
}

/// jemalloc's size class of `size` (at most [`INLINE_SIZE_CLASS_MAX_BYTES`]).
const fn size_class(size: usize) -> usize {
    const LG_QUANTUM: u32 = 4;
    const LG_GROUP_CLASSES: u32 = 2;
    const TINY_CLASS_BYTES: usize = 8;
    if size <= TINY_CLASS_BYTES {
        return TINY_CLASS_BYTES;
    }
    let lg_floor = usize::BITS - 1 - ((size << 1) - 1).leading_zeros();
    let lg_delta = if lg_floor < LG_GROUP_CLASSES + LG_QUANTUM + 1 {
        LG_QUANTUM
    } else {
        lg_floor - LG_GROUP_CLASSES - 1
    };
    let mask = (1usize << lg_delta) - 1;
    (size + mask) & !mask
}

/// Requests up to this size find their size class in [`SMALL_CLASSES`].
const LOOKUP_MAX_BYTES: usize = 4096;

/// The size class of every request up to [`LOOKUP_MAX_BYTES`], indexed by `(size + 7) / 8`
/// (every class there is a multiple of 8, so all sizes of one index share a class).
static SMALL_CLASSES: [u16; LOOKUP_MAX_BYTES / 8 + 1] = {
    let mut table = [0u16; LOOKUP_MAX_BYTES / 8 + 1];
    let mut i = 0;
    while i < table.len() {
        table[i] = size_class(if i == 0 { 0 } else { i * 8 }) as u16;
        i += 1;
    }
    table
};

/// The usable size of a request of `size` bytes aligned to `align`; 0 when none fits.
#[inline]
fn usable_size_aligned(size: usize, align: usize) -> usize {
    let flags = align_flags(align);
    if flags == 0 {
        usable_size_for(size)
    } else {
        // SAFETY: nallocx only computes a size class; size is non-zero.
        unsafe { je::nallocx(size.max(1), flags) }
    }
}

/// Requests up to this size, at malloc's alignment, may take [`malloc`]'s fast path.
const FAST_PATH_MAX_BYTES: usize = 64 << 10;

/// malloc: the common small request served from the thread's credit with nothing else around
/// the jemalloc call; anything else (no credit left, large, first call of a thread) takes
/// [`alloc`]. The fast path charges the computed size class without reading jemalloc's counters
/// back: for these sizes [`usable_size_for`] is exactly what jemalloc gives (unit-tested).
///
/// The jemalloc call is the function's last act (a tail call: no frame, no return through here).
/// The price: when jemalloc itself fails such a request (the kernel refused it memory; jemalloc
/// sets ENOMEM), the charge is not given back, and the ledger overstates by that block (at most
/// 64 KiB) for the rest of the run.
#[inline(always)]
#[cfg_attr(feature = "extent-prototype", allow(unreachable_code))]
pub fn malloc(size: usize) -> *mut c_void {
    #[cfg(feature = "extent-prototype")]
    // SAFETY: the prototype (src/heap_extent.rs) passes the call to jemalloc unchanged; the
    // caller's contract carries over.
    #[allow(unused_unsafe)]
    return unsafe { je::malloc(size) };
    if size <= FAST_PATH_MAX_BYTES && ledger::take_slotted_credit(usable_size_for(size) as u64) {
        // SAFETY: a plain allocation; jemalloc serves size 0 as its smallest class and sets
        // ENOMEM itself when it fails.
        return unsafe { je::malloc(size) };
    }
    malloc_slow(size)
}

/// Kept out of line so the fast path above compiles to a short function with few saved registers.
/// In pass-through (another allocator is the process's, [`neighbours`]) no thread is slotted, so
/// every malloc comes here and goes on to that allocator.
#[inline(never)]
fn malloc_slow(size: usize) -> *mut c_void {
    if let Some(address) = neighbours::next(Name::Malloc) {
        // SAFETY: the address is another definition of malloc, found by its name.
        let next =
            unsafe { core::mem::transmute::<usize, extern "C" fn(usize) -> *mut c_void>(address) };
        return next(size);
    }
    alloc(size, MALLOC_ALIGNMENT, false)
}

/// No machine this runs on has more virtual address space than this (x86-64 with five-level
/// paging: 2^57 bytes; aarch64's largest is 2^52). A request past it cannot be served whatever
/// the budget: it fails with ENOMEM and is not counted as a refusal by the budget.
pub const ADDRESS_SPACE_MAX_BYTES: usize = 1 << 57;

/// Alignments past this make jemalloc reserve about `size + align` bytes of address space for
/// the block (it maps the span and trims it): [`alloc`] checks that span against the budget.
const ALIGN_RESERVES_SPAN_MIN_BYTES: usize = 64 << 10;

/// Whether an allocation of `size` bytes aligned to `align` may go ahead: false (ENOMEM, nothing
/// reserved) when the span jemalloc would reserve for it cannot fit in the address space, or
/// cannot fit in the host budget (then counted as a refusal, like any request over budget).
#[cold]
#[inline(never)]
fn aligned_span_fits(size: usize, align: usize) -> bool {
    let span = size.saturating_add(align);
    if span > ADDRESS_SPACE_MAX_BYTES {
        return false;
    }
    let pool = ledger::host();
    if span as u64 > pool.effective().saturating_add(pool.reserve()) {
        pool.record_refusal(span as u64);
        return false;
    }
    true
}

/// Allocates `size` bytes aligned to `align` (a power of two), zeroed when `zero`.
/// Null with errno ENOMEM when the budget or jemalloc refuses.
#[inline(always)]
#[cfg_attr(feature = "extent-prototype", allow(unreachable_code))]
pub fn alloc(size: usize, align: usize, zero: bool) -> *mut c_void {
    #[cfg(feature = "extent-prototype")]
    // SAFETY: the prototype (src/heap_extent.rs) passes the call to jemalloc unchanged; the
    // caller's contract carries over.
    #[allow(unused_unsafe)]
    return unsafe {
        je::mallocx(
            size.max(1),
            align_flags(align) | if zero { je::MALLOCX_ZERO } else { 0 },
        )
    };
    if size > ADDRESS_SPACE_MAX_BYTES
        || (align > ALIGN_RESERVES_SPAN_MIN_BYTES && !aligned_span_fits(size, align))
    {
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    let estimate = usable_size_aligned(size, align);
    if estimate == 0 {
        // No size class holds it: no machine could serve it, so not a refusal by the budget.
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    let thread = ledger::host_thread();
    if !thread.charge(estimate as u64, size as u64) {
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    let mut flags = align_flags(align);
    if zero {
        flags |= je::MALLOCX_ZERO;
    }
    let before = thread.allocated_total();
    // jemalloc treats a zero-byte request as one byte; mallocx needs that said explicitly.
    // SAFETY: the size is non-zero and flags name a valid power-of-two alignment.
    let p = unsafe {
        if flags == 0 {
            je::malloc(size)
        } else {
            je::mallocx(size.max(1), flags)
        }
    };
    if p.is_null() {
        thread.cancel(estimate as u64);
        set_errno(libc::ENOMEM);
        return p;
    }
    let actual = match (before, thread.allocated_total()) {
        (Some(b), Some(a)) => a.wrapping_sub(b),
        // SAFETY: p is the live block just allocated.
        _ => (unsafe { je::malloc_usable_size(p) }) as u64,
    };
    if actual != estimate as u64 {
        thread.settle(estimate as u64, actual);
    }
    if actual >= TRACK_MIN_BYTES {
        tracker::on_alloc(p, actual);
    }
    p
}

/// Frees a block from any of the allocation functions. Preserves errno: callers check errno
/// after free-containing cleanup paths.
///
/// The common case (a slotted thread with jemalloc's counters) stays in this short path, with
/// no call but jemalloc's: the per-thread deallocated-bytes counter gives the block's usable
/// size without a lookup. Everything else is out of line.
///
/// # Safety
/// `p` is null or a live block from this module not freed before.
#[inline(always)]
#[cfg_attr(feature = "extent-prototype", allow(unreachable_code))]
pub unsafe fn free(p: *mut c_void) {
    #[cfg(feature = "extent-prototype")]
    // SAFETY: the prototype (src/heap_extent.rs) passes the call to jemalloc unchanged; the
    // caller's contract carries over.
    #[allow(unused_unsafe)]
    return unsafe { je::free(p) };
    if p.is_null() {
        return;
    }
    let Some(thread) = ledger::slotted_free() else {
        // SAFETY: forwarded caller's contract.
        return unsafe { free_slow(p) };
    };
    // SAFETY: errno and the counter are this thread's own, live while it runs.
    let saved = unsafe { *thread.errno };
    // SAFETY: as above.
    let before = unsafe { *thread.deallocated };
    // SAFETY: p is a live jemalloc block (caller's contract).
    unsafe { je::free(p) };
    // Looked up again rather than kept across the call: reading the thread-local block anew
    // costs less than keeping three pointers in callee-saved registers. The thread is still
    // slotted (jemalloc's free calls nothing of ours); the `else` is never taken.
    let Some(thread) = ledger::slotted_free() else {
        set_errno(saved);
        return;
    };
    // SAFETY: as above.
    let freed = unsafe { *thread.deallocated }.wrapping_sub(before);
    if freed < TRACK_MIN_BYTES {
        thread.uncharge(freed);
    } else {
        uncharge_tracked_slotted(thread, p, freed);
    }
    // SAFETY: as above.
    unsafe { *thread.errno = saved };
}

/// A freed block large enough to be in the tracker, on free's fast path.
#[inline(never)]
fn uncharge_tracked_slotted(thread: ledger::SlottedFree, p: *mut c_void, freed: u64) {
    thread.uncharge(freed);
    tracker::on_free(p, freed);
}

/// free for a thread that is not slotted or has no jemalloc counters.
///
/// # Safety
/// `p` is a live block from this module not freed before.
#[inline(never)]
unsafe fn free_slow(p: *mut c_void) {
    if let Some(address) = neighbours::next(Name::Free) {
        // SAFETY: the address is another definition of free, found by its name; in
        // pass-through every block the caller holds is that allocator's.
        let next =
            unsafe { core::mem::transmute::<usize, unsafe extern "C" fn(*mut c_void)>(address) };
        // SAFETY: forwarded caller's contract.
        return unsafe { next(p) };
    }
    let thread = ledger::host_thread_for_free();
    let Some(before) = thread.deallocated_total() else {
        // SAFETY: forwarded caller's contract.
        return unsafe { free_without_counters(thread, p) };
    };
    let errno = thread.errno();
    // SAFETY: errno points at this thread's errno.
    let saved = unsafe { *errno };
    // SAFETY: p is a live jemalloc block (caller's contract).
    unsafe { je::free(p) };
    let freed = thread
        .deallocated_total()
        .unwrap_or(before)
        .wrapping_sub(before);
    if freed < TRACK_MIN_BYTES {
        thread.uncharge(freed);
    } else {
        uncharge_tracked(thread, p, freed);
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

/// A freed block large enough to be in the tracker.
#[inline(never)]
fn uncharge_tracked(thread: ledger::HostThread, p: *mut c_void, freed: u64) {
    thread.uncharge(freed);
    // After the free, because only then is the size known without a lookup; the entry removed
    // is the one with this address and size (see tracker.rs on the race).
    tracker::on_free(p, freed);
}

/// free for a thread without jemalloc's counters (before init, without a slot, or exiting):
/// the usable size is looked up first. The block goes back to its arena, not into the thread's
/// cache, as bare jemalloc does for a thread that has not allocated yet (its thread data is
/// only minimally set up then): a thread that only frees, or frees before it allocates, keeps
/// jemalloc's placement (see [`ledger::host_thread_for_free`]).
///
/// # Safety
/// `p` is a live block from this module not freed before.
#[inline(never)]
unsafe fn free_without_counters(thread: ledger::HostThread, p: *mut c_void) {
    let errno = thread.errno();
    // SAFETY: errno points at this thread's errno.
    let saved = unsafe { *errno };
    // SAFETY: p is a live jemalloc block (caller's contract).
    let usable = unsafe { je::malloc_usable_size(p) };
    // SAFETY: usable is p's own usable size, valid for sized deallocation.
    unsafe { je::sdallocx(p, usable, je::MALLOCX_TCACHE_NONE) };
    let freed = usable as u64;
    if freed < TRACK_MIN_BYTES {
        thread.uncharge(freed);
    } else {
        uncharge_tracked(thread, p, freed);
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
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
#[cfg_attr(feature = "extent-prototype", allow(unreachable_code))]
pub unsafe fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    #[cfg(feature = "extent-prototype")]
    // SAFETY: the prototype (src/heap_extent.rs) passes the call to jemalloc unchanged; the
    // caller's contract carries over.
    #[allow(unused_unsafe)]
    return unsafe { je::realloc(p, size) };
    if p.is_null() {
        return alloc(size, MALLOC_ALIGNMENT, false);
    }
    if size == 0 {
        // SAFETY: p is live (caller's contract).
        unsafe { free(p) };
        return ptr::null_mut();
    }
    let estimate = if size > ADDRESS_SPACE_MAX_BYTES {
        0
    } else {
        usable_size_for(size) as u64
    };
    if estimate == 0 {
        // No machine could serve it: not a refusal by the budget.
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    // SAFETY: p is live.
    let old = unsafe { je::malloc_usable_size(p) } as u64;
    let thread = ledger::host_thread();
    let grow = estimate.saturating_sub(old);
    if grow > 0 && !thread.charge(grow, size as u64) {
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    // Forgotten before the old address can be handed out again; put back if realloc fails.
    if old >= TRACK_MIN_BYTES {
        tracker::on_free(p, old);
    }
    // SAFETY: p is live and size is non-zero.
    let q = unsafe { je::realloc(p, size) };
    if q.is_null() {
        if old >= TRACK_MIN_BYTES {
            tracker::on_alloc(p, old);
        }
        if grow > 0 {
            thread.cancel(grow);
        }
        set_errno(libc::ENOMEM);
        return ptr::null_mut();
    }
    // A realloc is neither a new allocation nor a free in the counts (docs/C_API.md): the
    // charge for its growth counted one, taken back now that the realloc succeeded.
    if grow > 0 {
        thread.uncount_alloc();
    }
    // An in-place resize can keep a size other than the estimate: settle on the truth.
    // SAFETY: q is the live result of realloc.
    let new = unsafe { je::malloc_usable_size(q) } as u64;
    thread.settle(old + grow, new);
    if new >= TRACK_MIN_BYTES {
        tracker::on_alloc(q, new);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_size_classes_match_jemalloc() {
        let mut size = 0usize;
        while size < (64 << 20) {
            // SAFETY: nallocx only computes a size class.
            let want = unsafe { je::nallocx(size.max(1), 0) };
            assert_eq!(usable_size_for(size), want, "usable size of {size} bytes");
            size += if size < 70_000 { 1 } else { 4093 };
        }
        for shift in 26..40 {
            for size in [(1usize << shift) - 1, 1 << shift, (1 << shift) + 1] {
                // SAFETY: as above.
                let want = unsafe { je::nallocx(size, 0) };
                assert_eq!(usable_size_for(size), want, "usable size of {size} bytes");
            }
        }
    }
}
