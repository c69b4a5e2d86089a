//! Level-change callbacks registered through the C API (`qvshim_on_level_change`).
//!
//! A fixed table of [`MAX_CALLBACKS`] entries, registered and removed lock-free from any thread,
//! called only on the monitor thread. Removal waits until a call of that callback in progress
//! on the monitor thread has returned, so a caller may free `ctx` once removal returns (a
//! callback that removes itself from inside its own call does not wait).

use core::ffi::c_void;
use core::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// Callbacks registered at most at once.
pub const MAX_CALLBACKS: usize = 16;

/// `qvshim_level_callback` in include/qvshim.h.
pub type LevelCallback = extern "C" fn(pool: i32, old_level: i32, new_level: i32, ctx: *mut c_void);

const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;

struct Entry {
    state: AtomicU8,
    func: AtomicUsize,
    ctx: AtomicUsize,
}

static ENTRIES: [Entry; MAX_CALLBACKS] = [const {
    Entry {
        state: AtomicU8::new(FREE),
        func: AtomicUsize::new(0),
        ctx: AtomicUsize::new(0),
    }
}; MAX_CALLBACKS];

/// The id being called on the monitor thread now, or -1.
static CALLING: AtomicI32 = AtomicI32::new(-1);
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Registers `func`; returns its id, or -1 when the table is full.
pub fn register(func: LevelCallback, ctx: *mut c_void) -> i32 {
    for (id, entry) in ENTRIES.iter().enumerate() {
        if entry
            .state
            .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            entry.func.store(func as usize, Ordering::Relaxed);
            entry.ctx.store(ctx as usize, Ordering::Relaxed);
            entry.state.store(READY, Ordering::Release);
            return id as i32;
        }
    }
    -1
}

/// Removes callback `id`; 0, or -1 for an id that is not registered.
pub fn remove(id: i32) -> i32 {
    let Some(entry) = usize::try_from(id).ok().and_then(|i| ENTRIES.get(i)) else {
        return -1;
    };
    if entry
        .state
        .compare_exchange(READY, FREE, Ordering::SeqCst, Ordering::Relaxed)
        .is_err()
    {
        return -1;
    }
    if !crate::base::threads::on_monitor_thread() {
        while CALLING.load(Ordering::SeqCst) == id {
            std::thread::yield_now();
        }
    }
    0
}

/// Registered callbacks now.
pub fn registered() -> usize {
    ENTRIES
        .iter()
        .filter(|e| e.state.load(Ordering::Relaxed) == READY)
        .count()
}

/// Calls made in all.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Calls every registered callback. Monitor thread only.
pub fn call_all(pool: usize, old_level: u8, new_level: u8) {
    for (id, entry) in ENTRIES.iter().enumerate() {
        if entry.state.load(Ordering::Acquire) != READY {
            continue;
        }
        CALLING.store(id as i32, Ordering::SeqCst);
        // Checked again after CALLING is set: a remove() that ran in between is not waited for,
        // so the callback must not be called.
        if entry.state.load(Ordering::SeqCst) == READY {
            let func = entry.func.load(Ordering::Relaxed);
            let ctx = entry.ctx.load(Ordering::Relaxed) as *mut c_void;
            // SAFETY: func was stored from a LevelCallback by register and is non-zero while the
            // entry is READY.
            let func: LevelCallback = unsafe { core::mem::transmute::<usize, LevelCallback>(func) };
            func(pool as i32, old_level as i32, new_level as i32, ctx);
            CALLS.fetch_add(1, Ordering::Relaxed);
        }
        CALLING.store(-1, Ordering::SeqCst);
    }
}

/// In a fork child no call is in progress.
pub fn after_fork_child() {
    CALLING.store(-1, Ordering::Relaxed);
}
