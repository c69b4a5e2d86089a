//! The host pool's per-thread credit: how host allocations stay cheap under many threads.
//!
//! Never allocates, never takes a lock, never logs, never panics: it runs inside `malloc`.
//!
//! # How the host pool stays cheap under many threads
//! A pool keeps one shared counter, `committed`, checked against the budget with a CAS loop, so
//! it is never exceeded, not even for an instant. Host allocations do not touch it on every call:
//! each thread holds a *credit*, bytes already committed to it but not yet used. An allocation
//! that fits in the credit costs two thread-local loads and stores; a thread whose credit runs
//! out takes [`GRANT_CHUNK_BYTES`] more (one CAS), and a thread whose credit grows past
//! [`CREDIT_MAX_BYTES`] through frees gives the surplus back. So:
//!
//! * `live = committed - (sum of all threads' credits)`, exact whenever the threads are quiet;
//! * the budget can refuse while up to `CREDIT_MAX_BYTES` per thread sits unused in other
//!   threads' credits: that is the slack, bounded by threads x 192 KiB (documented);
//! * the peak is the high-water mark of `committed` less the credit the committing thread keeps:
//!   never below the true peak of `live`, and above it by at most the other threads' credits
//!   (exact for a single-threaded program).
//!
//! A thread's credit lives in a [`Slot`] (one cache line each) so the monitor can sum them; a
//! pthread key destructor returns the credit when the thread exits, and after `fork` the child
//! takes back the credits of the threads that did not survive. The thread's own state (its slot
//! and the addresses of jemalloc's per-thread byte counters, which give each call's exact usable
//! size) sits in one initial-exec TLS block: two instructions to reach, never an allocation.
//!
//! One concern, over 500 lines on purpose: the hot path of every host malloc and free. The TLS
//! access, the slot's fast charge and its slow refills are one mechanism whose costs are read
//! side by side; splitting it would hide the instruction count of the fast path.

use core::cell::Cell;
use core::ptr;
#[cfg(target_arch = "x86_64")]
use core::sync::atomic::AtomicIsize;
use core::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use super::pools::{host, CREDIT_MAX_BYTES, GRANT_CHUNK_BYTES, SLOT_COUNT};
use crate::base::threads;

/// One thread's share of the host pool. Written only by its owner (plain loads and stores, no
/// read-modify-write); read by whoever sums the ledger. The credit may dip below zero for a
/// moment when an allocation turned out larger than its estimate; the next charge refills it.
pub struct Slot {
    in_use: AtomicBool,
    credit: AtomicI64,
    allocs: AtomicU64,
    frees: AtomicU64,
}

impl Slot {
    /// Charges `bytes` to the credit when it covers them (counting one allocation); false and
    /// nothing charged otherwise.
    #[inline(always)]
    fn take_credit(&self, bytes: u64) -> bool {
        let credit = self.credit.load(Ordering::Relaxed);
        if credit < bytes as i64 {
            return false;
        }
        self.credit.store(credit - bytes as i64, Ordering::Relaxed);
        self.allocs
            .store(self.allocs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        true
    }

    /// Adds `bytes` (negative: takes them) to the credit; what passes the most a thread keeps
    /// goes back to the pool.
    #[inline(always)]
    fn add_credit(&self, bytes: i64) {
        let credit = self.credit.load(Ordering::Relaxed) + bytes;
        if credit > CREDIT_MAX_BYTES as i64 {
            return_surplus_credit(self, credit);
        } else {
            self.credit.store(credit, Ordering::Relaxed);
        }
    }

    /// Returns `bytes` of a freed block to the credit (counting one free).
    #[inline(always)]
    fn uncharge(&self, bytes: u64) {
        self.frees
            .store(self.frees.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        self.add_credit(bytes as i64);
    }
}

static SLOTS: [CachePadded<Slot>; SLOT_COUNT] = [const {
    CachePadded::new(Slot {
        in_use: AtomicBool::new(false),
        credit: AtomicI64::new(0),
        allocs: AtomicU64::new(0),
        frees: AtomicU64::new(0),
    })
}; SLOT_COUNT];

/// Where the next slot search starts, so threads spread over the table.
static SLOT_HINT: AtomicUsize = AtomicUsize::new(0);

/// The pthread key whose destructor returns a thread's credit. usize::MAX until created.
static THREAD_KEY: AtomicUsize = AtomicUsize::new(usize::MAX);

const THREAD_FRESH: u8 = 0;
const THREAD_SETTING_UP: u8 = 1;
const THREAD_SLOTTED: u8 = 2;
/// Exited, or no slot free: charges go straight to the pool.
const THREAD_DIRECT: u8 = 3;

/// Everything the allocation path needs of its thread, in one thread-local so one TLS lookup
/// serves a whole call. All-zero is its initial state; it has no destructor, so first access
/// never allocates.
#[repr(C)]
struct ThreadCache {
    state: Cell<u8>,
    slot: Cell<*const Slot>,
    /// jemalloc's own running totals of this thread's allocated and deallocated usable bytes
    /// (`thread.allocatedp`, `thread.deallocatedp`); null when unavailable.
    allocated: Cell<*const u64>,
    deallocated: Cell<*const u64>,
    /// This thread's errno, which free must preserve: cached so free needs no libc call.
    errno: Cell<*mut i32>,
}

const THREAD_CACHE_BYTES: usize = 40;
const _: () = assert!(core::mem::size_of::<ThreadCache>() == THREAD_CACHE_BYTES);

// On x86-64 the thread cache is a TLS symbol reached through its TLS descriptor until the
// constructor knows the library sits in the static TLS block, and from then on as the thread
// pointer plus the offset that descriptor gave (two instructions, as initial-exec costs), where
// Rust's thread_local! in a shared library calls __tls_get_addr on every access. Unlike an
// initial-exec access, nothing forces the whole TLS block (jemalloc's included) into the static
// block, which made a dlopen of the library fail ("cannot allocate memory in static TLS block").
#[cfg(target_arch = "x86_64")]
core::arch::global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".hidden qvshim_thread_cache",
    ".type qvshim_thread_cache, @object",
    ".size qvshim_thread_cache, 40",
    "qvshim_thread_cache:",
    ".zero 40",
    ".popsection",
);

/// The thread cache's offset from the thread pointer once it is known to be the same in every
/// thread (the library's TLS is in the static block); 0 until then, and for good when the
/// library does not govern the heap.
#[cfg(target_arch = "x86_64")]
static STATIC_TLS_OFFSET: AtomicIsize = AtomicIsize::new(0);

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: fs:0 holds the thread pointer itself (the x86-64 TLS ABI); reading it has no
    // side effect.
    unsafe {
        core::arch::asm!(
            "mov {tp}, qword ptr fs:[0]",
            tp = out(reg) tp,
            options(pure, readonly, nostack, preserves_flags)
        );
    }
    tp
}

/// The calling thread's cache: valid until the thread has fully exited (after its destructors).
/// Once [`fix_static_tls_offset`] ran, the thread pointer plus a constant: what an initial-exec
/// access costs, without the descriptor's call.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn thread_cache() -> Option<&'static ThreadCache> {
    let offset = STATIC_TLS_OFFSET.load(Ordering::Relaxed);
    if offset == 0 {
        return thread_cache_by_descriptor();
    }
    let p = thread_pointer().wrapping_add_signed(offset) as *const ThreadCache;
    // SAFETY: the offset is the thread cache's in the static TLS block, the same in every
    // thread; all-zero makes a valid ThreadCache (state FRESH, null pointers).
    unsafe { p.as_ref() }
}

/// Records the thread cache's offset from the thread pointer for [`thread_cache`]. Called only
/// when the library governs the heap: its malloc is the global one, so it was loaded with the
/// program (preloaded or needed), and glibc puts every module loaded at start in the static TLS
/// block, at one offset for all threads. A dlopened library's TLS is allocated per thread.
#[cfg(target_arch = "x86_64")]
fn fix_static_tls_offset() {
    if let Some(t) = thread_cache_by_descriptor() {
        let address = t as *const ThreadCache as usize;
        STATIC_TLS_OFFSET.store(
            address.wrapping_sub(thread_pointer()) as isize,
            Ordering::Relaxed,
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn fix_static_tls_offset() {}

/// The calling thread's cache through its TLS descriptor: before [`fix_static_tls_offset`], or
/// when the library was dlopened.
#[cfg(target_arch = "x86_64")]
#[cold]
#[inline(never)]
fn thread_cache_by_descriptor() -> Option<&'static ThreadCache> {
    let p: *const ThreadCache;
    // SAFETY: a TLS descriptor call for a 40-byte, zero-initialised .tbss object: the resolver
    // returns its offset from the thread pointer in rax and preserves every other register
    // (the TLSDESC ABI); adding the thread pointer gives this thread's copy, which all-zero
    // makes a valid ThreadCache (state FRESH, null pointers).
    unsafe {
        core::arch::asm!(
            "leaq qvshim_thread_cache@TLSDESC(%rip), %rax",
            "call *qvshim_thread_cache@TLSCALL(%rax)",
            "addq %fs:0, %rax",
            out("rax") p,
            options(att_syntax, pure, readonly)
        );
        p.as_ref()
    }
}

#[cfg(not(target_arch = "x86_64"))]
thread_local! {
    static THREAD: ThreadCache = const {
        ThreadCache {
            state: Cell::new(THREAD_FRESH),
            slot: Cell::new(ptr::null()),
            allocated: Cell::new(ptr::null()),
            deallocated: Cell::new(ptr::null()),
            errno: Cell::new(ptr::null_mut()),
        }
    };
}

/// The calling thread's cache; None in the thread's final teardown, when TLS may be gone.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn thread_cache() -> Option<&'static ThreadCache> {
    // SAFETY: the reference does not outlive the calling thread: callers use it within one call.
    THREAD
        .try_with(|t| unsafe { &*(t as *const ThreadCache) })
        .ok()
}

/// The calling thread's handle on the host pool for the length of one allocation call.
#[derive(Clone, Copy)]
pub struct HostThread {
    slot: Option<&'static Slot>,
    allocated: *const u64,
    deallocated: *const u64,
    errno: *mut i32,
}

impl HostThread {
    /// A thread without a slot or jemalloc's counters: it charges the pool directly and looks
    /// block sizes up itself.
    const DIRECT: HostThread = HostThread {
        slot: None,
        allocated: ptr::null(),
        deallocated: ptr::null(),
        errno: ptr::null_mut(),
    };
}

/// The calling thread's handle; claims a slot on the thread's first allocation.
#[inline]
pub fn host_thread() -> HostThread {
    let direct = HostThread::DIRECT;
    thread_cache()
        .map(|t| match t.state.get() {
            THREAD_SLOTTED => HostThread {
                // SAFETY: a slotted thread's pointer points into the static SLOTS table.
                slot: unsafe { t.slot.get().as_ref() },
                allocated: t.allocated.get(),
                deallocated: t.deallocated.get(),
                errno: t.errno.get(),
            },
            THREAD_FRESH => claim_slot(t).unwrap_or(direct),
            _ => direct,
        })
        .unwrap_or(direct)
}

/// The calling thread's handle for a free. A thread that has not allocated yet frees straight
/// into the pool and stays without a slot until its first allocation: claiming one reads
/// jemalloc's thread counters, which sets up jemalloc's thread cache, and the block freed would
/// then wait in that cache to be the thread's next allocation. On a new thread whose first call
/// frees a block another thread allocated, that hands it memory in a cache line the other
/// thread's blocks share (passive false sharing: 4.6x on scripts/bench-alloc's cache-scratch),
/// where bare jemalloc sends such a free back to the arena.
#[inline]
pub fn host_thread_for_free() -> HostThread {
    match thread_cache() {
        Some(t) if t.state.get() == THREAD_SLOTTED => host_thread(),
        _ => HostThread::DIRECT,
    }
}

/// Charges `bytes` to the calling thread's credit when the thread already has a slot and the
/// credit covers them; false (and nothing charged) otherwise. For malloc's fast path: no call,
/// so the fast path needs no stack frame; everything else (claiming a slot) is left to the
/// slow path.
#[inline(always)]
pub fn take_slotted_credit(bytes: u64) -> bool {
    let Some(t) = thread_cache() else {
        return false;
    };
    if t.state.get() != THREAD_SLOTTED {
        return false;
    }
    // SAFETY: a slotted thread's pointer points into the static SLOTS table.
    unsafe { &*t.slot.get() }.take_credit(bytes)
}

/// What free's fast path needs of a slotted thread whose jemalloc counters are known: its slot,
/// jemalloc's deallocated-bytes counter, and its errno. None otherwise (free's slow path).
#[derive(Clone, Copy)]
pub struct SlottedFree {
    slot: &'static Slot,
    pub deallocated: *const u64,
    pub errno: *mut i32,
}

#[inline(always)]
pub fn slotted_free() -> Option<SlottedFree> {
    let t = thread_cache()?;
    if t.state.get() != THREAD_SLOTTED || t.deallocated.get().is_null() {
        return None;
    }
    Some(SlottedFree {
        // SAFETY: a slotted thread's pointer points into the static SLOTS table.
        slot: unsafe { &*t.slot.get() },
        deallocated: t.deallocated.get(),
        errno: t.errno.get(),
    })
}

impl SlottedFree {
    /// Returns `bytes` of a freed block to the thread's credit.
    #[inline(always)]
    pub fn uncharge(self, bytes: u64) {
        self.slot.uncharge(bytes);
    }
}

impl HostThread {
    /// Charges `bytes` for a request of `requested` bytes. False means refused: the caller
    /// fails the allocation and charges nothing.
    #[inline(always)]
    pub fn charge(self, bytes: u64, requested: u64) -> bool {
        let Some(slot) = self.slot else {
            return charge_pool_directly(bytes, requested);
        };
        slot.take_credit(bytes) || charge_slot_from_pool(slot, bytes, requested)
    }

    /// Takes back a charge whose allocation failed.
    #[inline]
    pub fn cancel(self, bytes: u64) {
        self.uncount_alloc();
        match self.slot {
            Some(slot) => slot.add_credit(bytes as i64),
            None => host().release(bytes),
        }
    }

    /// Takes back the allocation a charge counted, keeping its bytes: for a realloc that grew,
    /// which is not a new allocation.
    #[inline]
    pub fn uncount_alloc(self) {
        match self.slot {
            Some(slot) => slot
                .allocs
                .store(slot.allocs.load(Ordering::Relaxed) - 1, Ordering::Relaxed),
            None => {
                host().direct_allocs.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Corrects a charge of `charged` bytes to the `actual` usable size jemalloc gave.
    #[inline]
    pub fn settle(self, charged: u64, actual: u64) {
        if charged == actual {
            return;
        }
        match self.slot {
            Some(slot) => slot.add_credit(charged as i64 - actual as i64),
            None if actual > charged => host().force_commit(actual - charged),
            None => host().release(charged - actual),
        }
    }

    /// Returns `bytes` of a freed block.
    #[inline(always)]
    pub fn uncharge(self, bytes: u64) {
        match self.slot {
            Some(slot) => slot.uncharge(bytes),
            None => uncharge_pool_directly(bytes),
        }
    }

    /// The address of this thread's errno.
    #[inline(always)]
    pub fn errno(self) -> *mut i32 {
        if self.errno.is_null() {
            // SAFETY: __errno_location has no preconditions.
            unsafe { libc::__errno_location() }
        } else {
            self.errno
        }
    }

    /// jemalloc's running total of usable bytes this thread allocated, when known.
    #[inline(always)]
    pub fn allocated_total(self) -> Option<u64> {
        // SAFETY: a non-null pointer is this thread's own jemalloc counter, live while the
        // thread runs.
        unsafe { self.allocated.as_ref() }.copied()
    }

    /// jemalloc's running total of usable bytes this thread freed, when known.
    #[inline(always)]
    pub fn deallocated_total(self) -> Option<u64> {
        // SAFETY: as for allocated_total.
        unsafe { self.deallocated.as_ref() }.copied()
    }
}

/// Gives what a thread's credit holds past one chunk back to the pool. Out of line: it is rare,
/// and inlined it would make every free save registers for the level arithmetic.
#[cold]
#[inline(never)]
fn return_surplus_credit(slot: &Slot, credit: i64) {
    slot.credit
        .store(GRANT_CHUNK_BYTES as i64, Ordering::Relaxed);
    host().release((credit - GRANT_CHUNK_BYTES as i64) as u64);
}

/// Out of line so the slotted paths of malloc and free stay short.
#[inline(never)]
fn uncharge_pool_directly(bytes: u64) {
    host().uncharge_direct(bytes);
}

#[inline(never)]
fn charge_pool_directly(bytes: u64, requested: u64) -> bool {
    let pool = host();
    if pool.try_commit_past_budget(bytes, requested) {
        pool.direct_allocs.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        pool.record_budget_refusal(requested);
        false
    }
}

/// Slow path: the thread's credit is short of `bytes`. Takes what is missing plus a chunk; when
/// the budget will not give a chunk, exactly what is missing; small requests (and one larger one
/// after a refusal, [`RESERVE_GRANT_DIVISOR`](super::pools::RESERVE_GRANT_DIVISOR)) may then
/// dip into the reserve, and only for exactly what they need.
#[cold]
fn charge_slot_from_pool(slot: &Slot, bytes: u64, requested: u64) -> bool {
    let pool = host();
    let credit = slot.credit.load(Ordering::Relaxed);
    let missing = (bytes as i64 - credit) as u64;
    // The chunk stays with this thread as credit: not counted into the peak.
    let granted =
        if pool.try_commit_leaving_unused(missing + GRANT_CHUNK_BYTES, false, GRANT_CHUNK_BYTES) {
            missing + GRANT_CHUNK_BYTES
        } else if pool.try_commit_past_budget(missing, requested) {
            missing
        } else {
            pool.record_budget_refusal(requested);
            return false;
        };
    slot.credit
        .store(credit + granted as i64 - bytes as i64, Ordering::Relaxed);
    slot.allocs
        .store(slot.allocs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    true
}

/// Reads the address of one of jemalloc's per-thread counters ("thread.allocatedp" or
/// "thread.deallocatedp", NUL-terminated).
fn jemalloc_thread_counter(name: &[u8]) -> *const u64 {
    let mut value: *mut u64 = ptr::null_mut();
    let mut len = core::mem::size_of::<*mut u64>();
    // SAFETY: both names are read-only controls returning a uint64_t* into this thread's data.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            (&mut value as *mut *mut u64).cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    if rc == 0 {
        value
    } else {
        ptr::null()
    }
}

#[cold]
#[inline(never)]
fn claim_slot(t: &ThreadCache) -> Option<HostThread> {
    let key = THREAD_KEY.load(Ordering::Acquire);
    if key == usize::MAX {
        // Before init: no destructor to give the credit back yet; stay fresh and charge directly.
        return None;
    }
    // Setting the key may allocate (glibc keeps keys past 32 in a calloc'ed block); that
    // allocation sees THREAD_SETTING_UP and charges the pool directly.
    t.state.set(THREAD_SETTING_UP);
    let start = SLOT_HINT.fetch_add(1, Ordering::Relaxed);
    let found = (0..SLOT_COUNT)
        .map(|i| &*SLOTS[(start + i) % SLOT_COUNT])
        .find(|slot| {
            slot.in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
    let Some(slot) = found else {
        t.state.set(THREAD_DIRECT);
        return None;
    };
    // SAFETY: the key was created by init_threads; a non-null value makes the destructor run.
    unsafe { libc::pthread_setspecific(key as libc::pthread_key_t, (slot as *const Slot).cast()) };
    let allocated = jemalloc_thread_counter(b"thread.allocatedp\0");
    let deallocated = jemalloc_thread_counter(b"thread.deallocatedp\0");
    let both = !allocated.is_null() && !deallocated.is_null();
    t.allocated.set(if both { allocated } else { ptr::null() });
    t.deallocated
        .set(if both { deallocated } else { ptr::null() });
    // SAFETY: __errno_location has no preconditions and returns this thread's errno.
    t.errno.set(unsafe { libc::__errno_location() });
    t.slot.set(slot);
    t.state.set(THREAD_SLOTTED);
    Some(HostThread {
        slot: Some(slot),
        allocated: t.allocated.get(),
        deallocated: t.deallocated.get(),
        errno: t.errno.get(),
    })
}

/// Moves a slot's credit and counts back to the pool and frees the slot.
fn retire_slot(slot: &Slot) {
    let pool = host();
    pool.direct_allocs
        .fetch_add(slot.allocs.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    pool.direct_frees
        .fetch_add(slot.frees.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    let credit = slot.credit.swap(0, Ordering::Relaxed);
    if credit > 0 {
        pool.release(credit as u64);
    } else if credit < 0 {
        pool.force_commit(credit.unsigned_abs());
    }
    slot.in_use.store(false, Ordering::Release);
}

extern "C" fn thread_exit(value: *mut libc::c_void) {
    // From here on this thread's frees look up sizes themselves: jemalloc's own thread data may
    // be torn down by its destructor.
    if let Some(t) = thread_cache() {
        t.state.set(THREAD_DIRECT);
    }
    // SAFETY: the only values ever stored under the key are pointers into SLOTS.
    if let Some(slot) = unsafe { value.cast::<Slot>().cast_const().as_ref() } {
        retire_slot(slot);
    }
    // This may be the program's last thread: the monitor then ends the process.
    threads::thread_ended();
}

/// Creates the thread-exit key. Called once from the library's constructor, and only when the
/// library governs the heap.
pub fn init_threads() {
    fix_static_tls_offset();
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: key is a valid out-pointer; thread_exit has the destructor's C signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
        THREAD_KEY.store(key as usize, Ordering::Release);
    }
}

/// In a fork child only the forking thread lives on: the other threads' credits come back.
pub fn after_fork_child() {
    let mine = thread_cache().map_or(ptr::null(), |t| t.slot.get());
    for slot in SLOTS.iter() {
        let slot: &Slot = slot;
        if slot.in_use.load(Ordering::Acquire) && !ptr::eq(slot, mine) {
            retire_slot(slot);
        }
    }
}

/// The sum over every thread's slot of its credit, allocations and frees.
pub(super) fn slot_sums() -> (i64, u64, u64) {
    let (mut credit, mut allocs, mut frees) = (0i64, 0u64, 0u64);
    for slot in SLOTS.iter() {
        credit += slot.credit.load(Ordering::Relaxed);
        allocs += slot.allocs.load(Ordering::Relaxed);
        frees += slot.frees.load(Ordering::Relaxed);
    }
    (credit, allocs, frees)
}
