//! CPython's small-object arenas, counted in the host pool.
//!
//! pymalloc serves objects of up to 512 bytes from arenas of 1 MiB (256 KiB before 3.10) that
//! it takes with `mmap`, out of the ledger's sight. Routing every object through malloc
//! (`PYTHONMALLOC=malloc`) counts them but costs about 10% on allocation-heavy Python
//! (docs/BENCHMARKS.md). Instead, the shim installs an arena allocator with CPython's own API
//! (`PyObject_SetArenaAllocator`) that charges each arena to the host pool and then calls the
//! allocator it replaced. pymalloc's per-object fast path is untouched.
//!
//! * An arena is charged in full, without the reserve. When the budget refuses it, pymalloc
//!   falls back to `PyMem_RawMalloc` for the object, which is the shim's counted malloc: small
//!   requests then go on into the reserve, and past it Python raises MemoryError.
//! * Arenas taken before the allocator was installed were never charged; a table of the
//!   charged ones says which frees to take back, so the ledger never goes below what it holds.
//!   Those few early arenas (interpreter start-up) are seen by the monitor as anonymous memory
//!   past the ledger, as before.
//! * Installed as early as possible: at load when the interpreter's symbols are already there
//!   and it has not started yet, and otherwise from the first pending call in CPython's main
//!   thread, with the GIL held (arenas are only taken and given back under the GIL).

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::ledger;

/// CPython's `PyObjectArenaAllocator`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ArenaAllocator {
    ctx: *mut c_void,
    alloc: Option<unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void>,
    free: Option<unsafe extern "C" fn(*mut c_void, *mut c_void, usize)>,
}

pub type GetArenaAllocator = unsafe extern "C" fn(*mut ArenaAllocator);
pub type SetArenaAllocator = unsafe extern "C" fn(*mut ArenaAllocator);

// The allocator replaced, called for every arena. Written once, before ours is installed.
static ORIGINAL_CTX: AtomicUsize = AtomicUsize::new(0);
static ORIGINAL_ALLOC: AtomicUsize = AtomicUsize::new(0);
static ORIGINAL_FREE: AtomicUsize = AtomicUsize::new(0);

static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Arenas charged and not yet freed.
static LIVE: AtomicU64 = AtomicU64::new(0);
/// Arenas the budget refused (pymalloc then fell back to malloc for the object).
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Arenas left uncounted because the table was full.
static UNTRACKED: AtomicU64 = AtomicU64::new(0);

/// Installs the counting allocator over the one CPython has now, unless it is installed
/// already. Called with the GIL held, or before the interpreter starts.
///
/// # Safety
/// `get` and `set` are CPython's `PyObject_GetArenaAllocator` and `PyObject_SetArenaAllocator`,
/// and no other thread can be taking an arena.
pub unsafe fn install(get: GetArenaAllocator, set: SetArenaAllocator) -> bool {
    let mut current = ArenaAllocator {
        ctx: core::ptr::null_mut(),
        alloc: None,
        free: None,
    };
    // SAFETY: current is a valid out-pointer (caller's contract for get).
    unsafe { get(&mut current) };
    let ours = counted_alloc as unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
    if current.alloc.is_some_and(|f| f as usize == ours as usize) {
        return false;
    }
    let (Some(alloc), Some(free)) = (current.alloc, current.free) else {
        return false;
    };
    ORIGINAL_CTX.store(current.ctx as usize, Ordering::Relaxed);
    ORIGINAL_ALLOC.store(alloc as usize, Ordering::Relaxed);
    ORIGINAL_FREE.store(free as usize, Ordering::Relaxed);
    let mut counted = ArenaAllocator {
        ctx: core::ptr::null_mut(),
        alloc: Some(counted_alloc),
        free: Some(counted_free),
    };
    // SAFETY: counted is a valid allocator whose functions stay loaded with the library.
    unsafe { set(&mut counted) };
    INSTALLED.store(true, Ordering::Release);
    true
}

fn original() -> (*mut c_void, usize, usize) {
    (
        ORIGINAL_CTX.load(Ordering::Relaxed) as *mut c_void,
        ORIGINAL_ALLOC.load(Ordering::Relaxed),
        ORIGINAL_FREE.load(Ordering::Relaxed),
    )
}

unsafe extern "C" fn counted_alloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    let (ctx, alloc, _) = original();
    // SAFETY: set by install() from CPython's allocator before this one was installed.
    let alloc: unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void =
        unsafe { core::mem::transmute(alloc) };
    let host = ledger::host();
    if !host.try_commit(size as u64, false) {
        REFUSED.fetch_add(1, Ordering::Relaxed);
        crate::base::doorbell::ring();
        return core::ptr::null_mut();
    }
    // SAFETY: the original allocator with its own context.
    let p = unsafe { alloc(ctx, size) };
    if p.is_null() {
        host.release(size as u64);
    } else if table::insert(p as usize) {
        LIVE.fetch_add(1, Ordering::Relaxed);
    } else {
        host.release(size as u64);
        UNTRACKED.fetch_add(1, Ordering::Relaxed);
    }
    p
}

unsafe extern "C" fn counted_free(_ctx: *mut c_void, p: *mut c_void, size: usize) {
    let (ctx, _, free) = original();
    // SAFETY: set by install() from CPython's allocator before this one was installed.
    let free: unsafe extern "C" fn(*mut c_void, *mut c_void, usize) =
        unsafe { core::mem::transmute(free) };
    // Forgotten before the address can be handed out again.
    let charged = table::remove(p as usize);
    // SAFETY: p came from the original allocator (ours only ever forwards to it).
    unsafe { free(ctx, p, size) };
    if charged {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        ledger::host().release(size as u64);
    }
}

/// What the dump shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub installed: bool,
    pub live: u64,
    pub refused: u64,
    pub untracked: u64,
}

pub fn stats() -> Stats {
    Stats {
        installed: INSTALLED.load(Ordering::Relaxed),
        live: LIVE.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
        untracked: UNTRACKED.load(Ordering::Relaxed),
    }
}

/// In a fork child: the thread that forked held the GIL, so no arena call was under way; only
/// the table's lock could have been left held by a thread that is gone.
pub fn after_fork_child() {
    table::after_fork_child();
}

/// The addresses of the charged arenas: open addressing with linear probing under a spin lock
/// (arena calls are rare, a few per MiB of objects, and already serialised by the GIL).
mod table {
    use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const LG_SLOTS: u32 = 16;
    /// 65536 slots: up to 48K charged arenas (48 GiB of objects) before new ones go uncounted.
    pub const SLOTS: usize = 1 << LG_SLOTS;
    const MAX_ENTRIES: usize = SLOTS / 4 * 3;

    static ENTRIES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static LOCK: AtomicBool = AtomicBool::new(false);

    pub fn home(address: usize) -> usize {
        ((address as u64 >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - LG_SLOTS)) as usize
    }

    fn locked<T>(f: impl FnOnce() -> T) -> T {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        let result = f();
        LOCK.store(false, Ordering::Release);
        result
    }

    /// Remembers `address`; false when the table is full.
    pub fn insert(address: usize) -> bool {
        locked(|| {
            if COUNT.load(Ordering::Relaxed) >= MAX_ENTRIES {
                return false;
            }
            let mut i = home(address);
            while ENTRIES[i].load(Ordering::Relaxed) != 0 {
                i = (i + 1) % SLOTS;
            }
            ENTRIES[i].store(address, Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
            true
        })
    }

    /// Forgets `address`; false when it was not there.
    pub fn remove(address: usize) -> bool {
        locked(|| {
            let mut i = home(address);
            loop {
                match ENTRIES[i].load(Ordering::Relaxed) {
                    0 => return false,
                    a if a == address => break,
                    _ => i = (i + 1) % SLOTS,
                }
            }
            // Backward-shift deletion: move later entries of the probe run into the hole when
            // their home does not lie cyclically within (hole, their position].
            let mut hole = i;
            let mut j = i;
            loop {
                j = (j + 1) % SLOTS;
                let entry = ENTRIES[j].load(Ordering::Relaxed);
                if entry == 0 {
                    break;
                }
                let h = home(entry);
                let stays = if hole <= j {
                    hole < h && h <= j
                } else {
                    hole < h || h <= j
                };
                if !stays {
                    ENTRIES[hole].store(entry, Ordering::Relaxed);
                    hole = j;
                }
            }
            ENTRIES[hole].store(0, Ordering::Relaxed);
            COUNT.fetch_sub(1, Ordering::Relaxed);
            true
        })
    }

    pub fn after_fork_child() {
        LOCK.store(false, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn clear() {
        locked(|| {
            for entry in ENTRIES.iter() {
                entry.store(0, Ordering::Relaxed);
            }
            COUNT.store(0, Ordering::Relaxed);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{alloc, dealloc, Layout};
    use std::sync::Mutex;

    /// Large enough that other test threads' allocations (charged to the same host pool in
    /// 64 KiB chunks) cannot be mistaken for an arena's charge.
    const FAKE_ARENA_BYTES: usize = 64 << 20;
    const SLACK: u64 = 4 << 20;

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 4096).unwrap()
    }

    // A fake CPython arena allocator: jemalloc through Rust's allocator, which the ledger does
    // not see, as it does not see pymalloc's mmaps.
    unsafe extern "C" fn fake_alloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
        // SAFETY: a non-zero size with a valid alignment.
        unsafe { alloc(layout(size)).cast() }
    }

    unsafe extern "C" fn fake_free(_ctx: *mut c_void, p: *mut c_void, size: usize) {
        // SAFETY: p came from fake_alloc with this size.
        unsafe { dealloc(p.cast(), layout(size)) }
    }

    /// The tests share the one static table (and the table test clears it): one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    /// What `PyObject_SetArenaAllocator` was last given: (alloc, free) as addresses.
    static SET: Mutex<(usize, usize)> = Mutex::new((0, 0));

    unsafe extern "C" fn fake_get(out: *mut ArenaAllocator) {
        // SAFETY: out is valid for writing (install passes a local).
        unsafe {
            *out = ArenaAllocator {
                ctx: core::ptr::null_mut(),
                alloc: Some(fake_alloc),
                free: Some(fake_free),
            }
        };
    }

    unsafe extern "C" fn fake_set(given: *mut ArenaAllocator) {
        // SAFETY: given is valid for reading (install passes a local).
        let given = unsafe { *given };
        *SET.lock().unwrap() = (
            given.alloc.map_or(0, |f| f as usize),
            given.free.map_or(0, |f| f as usize),
        );
    }

    fn committed_since(start: u64) -> i64 {
        ledger::host().committed() as i64 - start as i64
    }

    #[test]
    fn arenas_taken_before_installation_are_never_taken_back() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        // An arena CPython took before the shim's allocator was installed: never charged.
        // SAFETY: the fake allocator's contract.
        let early = unsafe { fake_alloc(core::ptr::null_mut(), FAKE_ARENA_BYTES) };
        // SAFETY: fake_get and fake_set stand for CPython's functions; nothing else takes arenas.
        assert!(unsafe { install(fake_get, fake_set) });
        let (set_alloc, set_free) = *SET.lock().unwrap();
        assert_eq!(
            set_alloc, counted_alloc as *const () as usize,
            "the counting allocator was installed"
        );
        assert_eq!(set_free, counted_free as *const () as usize);

        let start = ledger::host().committed();
        // SAFETY: early came from the original allocator with this size.
        unsafe { counted_free(core::ptr::null_mut(), early, FAKE_ARENA_BYTES) };
        let after_early = committed_since(start);
        assert!(
            after_early.unsigned_abs() < SLACK,
            "an uncharged arena was taken back: {after_early}"
        );

        // SAFETY: the counting allocator's contract.
        let late = unsafe { counted_alloc(core::ptr::null_mut(), FAKE_ARENA_BYTES) };
        assert!(!late.is_null());
        let charged = committed_since(start);
        assert!(
            charged.abs_diff(FAKE_ARENA_BYTES as i64) < SLACK,
            "an arena taken through the shim is charged whole: {charged}"
        );
        assert_eq!(stats().live, 1);
        // SAFETY: late came from counted_alloc with this size.
        unsafe { counted_free(core::ptr::null_mut(), late, FAKE_ARENA_BYTES) };
        let back = committed_since(start);
        assert!(
            back.unsigned_abs() < SLACK,
            "its free gives it back: {back}"
        );
        assert_eq!(stats().live, 0);
    }

    #[test]
    fn removing_an_entry_leaves_the_rest_of_its_probe_run_findable() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        // The first page address after `after` whose home slot is `slot`.
        let with_home = |slot: usize, after: usize| {
            (after / 4096 + 1..)
                .map(|page| page << 12)
                .find(|&address| table::home(address) == slot)
                .unwrap()
        };
        // a and c share home slot h, b's home is the slot after it: inserted in that order they
        // sit at h, h+1, h+2. Removing a must leave b at its home and move c back into the hole.
        // With h the last slot the run wraps to slots 0 and 1.
        for h in [1000, table::SLOTS - 1] {
            table::clear();
            let a = with_home(h, 0);
            let b = with_home((h + 1) % table::SLOTS, 0);
            let c = with_home(h, a);
            for address in [a, b, c] {
                assert!(table::insert(address));
            }
            assert!(table::remove(a), "home {h}: expected {a:#x} to be found");
            assert!(table::remove(b), "home {h}: expected {b:#x}, whose home is the next slot, to be found after {a:#x} went");
            assert!(
                table::remove(c),
                "home {h}: expected {c:#x} to be found after {a:#x} and {b:#x} went"
            );
        }
        table::clear();
    }

    #[test]
    fn table_remembers_and_forgets_exactly_the_addresses_put_in_and_fills_at_three_quarters() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        table::clear();
        // Addresses 1 MiB apart, and some that collide in their home slot, inserted and removed
        // in an interleaved order: every remove finds exactly what is still there.
        let addresses: Vec<usize> = (1..=3000usize)
            .map(|i| (i << 20) + if i % 7 == 0 { 4096 } else { 0 })
            .collect();
        for &a in &addresses {
            assert!(table::insert(a));
        }
        for &a in addresses.iter().step_by(2) {
            assert!(table::remove(a), "expected {a:#x} to be found");
        }
        for &a in addresses.iter().step_by(2) {
            assert!(!table::remove(a), "expected {a:#x} to be gone");
        }
        for &a in addresses.iter().skip(1).step_by(2) {
            assert!(table::remove(a), "expected {a:#x} to be found");
        }
        assert!(!table::remove(1 << 20));

        // One test, because the table is one static: full at three quarters, and usable again
        // once an entry goes.
        table::clear();
        let mut inserted = 0;
        while table::insert((inserted + 1) << 20) {
            inserted += 1;
            assert!(inserted <= table::SLOTS, "the table never filled");
        }
        assert_eq!(inserted, table::SLOTS / 4 * 3);
        assert!(table::remove(5 << 20));
        assert!(table::insert(5 << 20));
        table::clear();
    }
}
