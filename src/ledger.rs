//! The ledger: every pool's live bytes, peak, budget and level. This is the hot path.
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
//! * the peak is the high-water mark of `committed`: never below the true peak of `live`, and
//!   above it by at most the slack.
//!
//! A thread's credit lives in a [`Slot`] (one cache line each) so the monitor can sum them; a
//! pthread key destructor returns the credit when the thread exits, and after `fork` the child
//! takes back the credits of the threads that did not survive.
//!
//! GPU pools see few, large allocations: they charge `committed` directly, exactly.

use core::cell::Cell;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// Host pool index; GPU device N is pool `1 + N`.
pub const HOST: usize = 0;
/// Host plus up to 16 GPUs.
pub const MAX_POOLS: usize = 17;
/// "No budget".
pub const UNLIMITED: u64 = u64::MAX;

/// Requests of at most this many bytes may use the reserve past the budget, so that language
/// runtimes (and glibc's own internals, which abort on a NULL from malloc) can still build and
/// handle the error object after a large request was refused.
pub const RESERVE_SMALL_MAX_BYTES: u64 = 64 << 10;
/// Credit a thread takes from the pool at once when its own runs out.
pub const GRANT_CHUNK_BYTES: u64 = 64 << 10;
/// Credit a thread keeps at most; what is freed past it goes back to the pool.
pub const CREDIT_MAX_BYTES: u64 = 3 * GRANT_CHUNK_BYTES;
/// Levels fall only this many percentage points below their threshold, so a process sitting at
/// the threshold does not flap.
pub const HYSTERESIS_PERCENT: u64 = 5;
/// Threads that get a credit slot; threads past this many charge the pool directly.
pub const SLOT_COUNT: usize = 1024;

pub const LEVEL_NORMAL: u8 = 0;
pub const LEVEL_WARN: u8 = 1;
pub const LEVEL_CRITICAL: u8 = 2;

/// One budgeted pool of memory.
pub struct Pool {
    committed: AtomicU64,
    budget: AtomicU64,
    effective: AtomicU64,
    reserve: AtomicU64,
    peak: AtomicU64,
    level: AtomicU8,
    active: AtomicBool,
    /// Allocations and frees charged directly (GPU pools, threads without a slot, retired
    /// threads' totals).
    direct_allocs: AtomicU64,
    direct_frees: AtomicU64,
    pub refusals: AtomicU64,
    pub largest_refused: AtomicU64,
    pub purges: AtomicU64,
    pub level_changes: AtomicU64,
    pub notifications: AtomicU64,
}

impl Pool {
    const fn new() -> Self {
        Pool {
            committed: AtomicU64::new(0),
            budget: AtomicU64::new(UNLIMITED),
            effective: AtomicU64::new(UNLIMITED),
            reserve: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            level: AtomicU8::new(LEVEL_NORMAL),
            active: AtomicBool::new(false),
            direct_allocs: AtomicU64::new(0),
            direct_frees: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            largest_refused: AtomicU64::new(0),
            purges: AtomicU64::new(0),
            level_changes: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
        }
    }

    /// Commits `bytes` unless that would pass the effective budget (plus the reserve when
    /// `may_use_reserve`). Never overshoots, even momentarily.
    pub fn try_commit(&self, bytes: u64, may_use_reserve: bool) -> bool {
        let effective = self.effective.load(Ordering::Relaxed);
        let limit = if may_use_reserve {
            effective.saturating_add(self.reserve.load(Ordering::Relaxed))
        } else {
            effective
        };
        let mut current = self.committed.load(Ordering::Relaxed);
        let new = loop {
            let Some(new) = current.checked_add(bytes) else {
                return false;
            };
            if new > limit {
                return false;
            }
            match self.committed.compare_exchange_weak(
                current,
                new,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break new,
                Err(seen) => current = seen,
            }
        };
        if new > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(new, Ordering::Relaxed);
        }
        self.update_level(new);
        true
    }

    /// Commits `bytes` whatever the budget: for memory that already exists (a realloc that
    /// grew in place past its estimate, an allocation made before the budget was known).
    pub fn force_commit(&self, bytes: u64) {
        let new = self
            .committed
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        if new > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(new, Ordering::Relaxed);
        }
        self.update_level(new);
    }

    pub fn release(&self, bytes: u64) {
        let old = self.committed.fetch_sub(bytes, Ordering::AcqRel);
        self.update_level(old.wrapping_sub(bytes));
    }

    /// Counts a refusal of a request of `bytes`.
    pub fn record_refusal(&self, bytes: u64) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        if bytes > self.largest_refused.load(Ordering::Relaxed) {
            self.largest_refused.fetch_max(bytes, Ordering::Relaxed);
        }
        crate::monitor::ring();
    }

    /// Recomputes the level for `committed` bytes; on a change, records it and rings the
    /// monitor (which logs, purges and notifies).
    fn update_level(&self, committed: u64) {
        let current = self.level.load(Ordering::Relaxed);
        let next = next_level(
            current,
            committed,
            self.effective.load(Ordering::Relaxed),
            thresholds(),
        );
        if next != current
            && self
                .level
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.level_changes.fetch_add(1, Ordering::Relaxed);
            crate::monitor::ring();
        }
    }

    pub fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::Relaxed);
        self.set_effective(bytes);
    }

    /// The monitor lowers the effective budget below the configured one when the machine runs
    /// short; it never raises it above the budget.
    pub fn set_effective(&self, bytes: u64) {
        let bytes = bytes.min(self.budget.load(Ordering::Relaxed));
        self.effective.store(bytes, Ordering::Relaxed);
        self.update_level(self.committed.load(Ordering::Relaxed));
    }

    pub fn set_reserve(&self, bytes: u64) {
        self.reserve.store(bytes, Ordering::Relaxed);
    }

    pub fn activate(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    pub fn budget(&self) -> u64 {
        self.budget.load(Ordering::Relaxed)
    }

    pub fn effective(&self) -> u64 {
        self.effective.load(Ordering::Relaxed)
    }

    pub fn reserve(&self) -> u64 {
        self.reserve.load(Ordering::Relaxed)
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn level(&self) -> u8 {
        self.level.load(Ordering::Relaxed)
    }

    /// Charges a GPU-style allocation straight to the pool (no thread credit).
    pub fn charge_direct(&self, bytes: u64, may_use_reserve: bool) -> bool {
        if self.try_commit(bytes, may_use_reserve) {
            self.direct_allocs.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.record_refusal(bytes);
            false
        }
    }

    pub fn uncharge_direct(&self, bytes: u64) {
        self.direct_frees.fetch_add(1, Ordering::Relaxed);
        self.release(bytes);
    }
}

/// Warn and critical thresholds in percent, shared by all pools.
static WARN_PERCENT: AtomicU8 = AtomicU8::new(crate::config::DEFAULT_WARN_PERCENT);
static CRITICAL_PERCENT: AtomicU8 = AtomicU8::new(crate::config::DEFAULT_CRITICAL_PERCENT);

pub fn set_thresholds(warn_percent: u8, critical_percent: u8) {
    WARN_PERCENT.store(warn_percent, Ordering::Relaxed);
    CRITICAL_PERCENT.store(critical_percent, Ordering::Relaxed);
}

pub fn thresholds() -> (u8, u8) {
    (
        WARN_PERCENT.load(Ordering::Relaxed),
        CRITICAL_PERCENT.load(Ordering::Relaxed),
    )
}

/// The level a pool moves to from `current` holding `used` of `budget` bytes: it rises as soon
/// as a threshold is reached and falls only [`HYSTERESIS_PERCENT`] points below it.
pub fn next_level(current: u8, used: u64, budget: u64, (warn, critical): (u8, u8)) -> u8 {
    if budget == UNLIMITED || budget == 0 {
        return LEVEL_NORMAL;
    }
    // Percent times 100 in u128: no overflow for any u64 pair.
    let basis_points = (used as u128 * 10_000 / budget as u128) as u64;
    let level_at = |margin: u64| {
        let at = |percent: u8| basis_points + margin * 100 >= percent as u64 * 100;
        if at(critical) {
            LEVEL_CRITICAL
        } else if at(warn) {
            LEVEL_WARN
        } else {
            LEVEL_NORMAL
        }
    };
    let rising = level_at(0);
    if rising >= current {
        rising
    } else {
        level_at(HYSTERESIS_PERCENT).min(current)
    }
}

static POOLS: [CachePadded<Pool>; MAX_POOLS] = [const { CachePadded::new(Pool::new()) }; MAX_POOLS];

pub fn pool(index: usize) -> Option<&'static Pool> {
    POOLS.get(index).map(|p| &**p)
}

pub fn host() -> &'static Pool {
    &POOLS[HOST]
}

// ---------------------------------------------------------------------------------------------
// Host pool: per-thread credit.

/// One thread's share of the host pool. Written only by its owner (plain loads and stores, no
/// read-modify-write); read by whoever sums the ledger.
pub struct Slot {
    in_use: AtomicBool,
    credit: AtomicU64,
    allocs: AtomicU64,
    frees: AtomicU64,
}

static SLOTS: [CachePadded<Slot>; SLOT_COUNT] = [const {
    CachePadded::new(Slot {
        in_use: AtomicBool::new(false),
        credit: AtomicU64::new(0),
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

thread_local! {
    static THREAD_STATE: Cell<u8> = const { Cell::new(THREAD_FRESH) };
    static THREAD_SLOT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
}

/// Charges `bytes` of a host allocation whose request was `requested` bytes. False means
/// refused: the caller fails the allocation and charges nothing.
#[inline]
pub fn host_charge(bytes: u64, requested: u64) -> bool {
    if let Some(slot) = current_slot() {
        let credit = slot.credit.load(Ordering::Relaxed);
        if credit >= bytes {
            slot.credit.store(credit - bytes, Ordering::Relaxed);
            slot.allocs
                .store(slot.allocs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return true;
        }
        return host_charge_from_pool(slot, credit, bytes, requested);
    }
    let pool = host();
    if pool.try_commit(bytes, requested <= RESERVE_SMALL_MAX_BYTES) {
        pool.direct_allocs.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        pool.record_refusal(requested);
        false
    }
}

/// Slow path: the thread's credit is short of `bytes`. Takes what is missing plus a chunk; when
/// the budget will not give a chunk, exactly what is missing; small requests may then dip into
/// the reserve, and only for exactly what they need.
#[cold]
fn host_charge_from_pool(slot: &Slot, credit: u64, bytes: u64, requested: u64) -> bool {
    let pool = host();
    let missing = bytes - credit;
    let granted = if pool.try_commit(missing + GRANT_CHUNK_BYTES, false) {
        missing + GRANT_CHUNK_BYTES
    } else if pool.try_commit(missing, requested <= RESERVE_SMALL_MAX_BYTES) {
        missing
    } else {
        pool.record_refusal(requested);
        return false;
    };
    slot.credit
        .store(credit + granted - bytes, Ordering::Relaxed);
    slot.allocs
        .store(slot.allocs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    true
}

/// Returns `bytes` of a freed host allocation.
#[inline]
pub fn host_uncharge(bytes: u64) {
    if let Some(slot) = current_slot() {
        let credit = slot.credit.load(Ordering::Relaxed) + bytes;
        slot.frees
            .store(slot.frees.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if credit > CREDIT_MAX_BYTES {
            slot.credit.store(GRANT_CHUNK_BYTES, Ordering::Relaxed);
            host().release(credit - GRANT_CHUNK_BYTES);
        } else {
            slot.credit.store(credit, Ordering::Relaxed);
        }
        return;
    }
    host().uncharge_direct(bytes);
}

/// Charges host memory that exists already (a realloc's in-place growth past its estimate).
pub fn host_force_charge(bytes: u64) {
    host().force_commit(bytes);
}

#[inline]
fn current_slot() -> Option<&'static Slot> {
    // try_with: during the thread's final teardown the TLS may be gone; charge directly then.
    let state = THREAD_STATE.try_with(|s| s.get()).unwrap_or(THREAD_DIRECT);
    if state == THREAD_SLOTTED {
        let slot = THREAD_SLOT.try_with(|s| s.get()).unwrap_or(ptr::null());
        // SAFETY: a slotted thread's pointer points into the static SLOTS table.
        return unsafe { slot.as_ref() };
    }
    if state == THREAD_FRESH {
        return claim_slot();
    }
    None
}

#[cold]
fn claim_slot() -> Option<&'static Slot> {
    let key = THREAD_KEY.load(Ordering::Acquire);
    if key == usize::MAX {
        // Before init: no destructor to give the credit back yet; stay fresh and charge directly.
        return None;
    }
    // Setting the key may allocate (glibc keeps keys past 32 in a calloc'ed block); that
    // allocation sees THREAD_SETTING_UP and charges the pool directly.
    let _ = THREAD_STATE.try_with(|s| s.set(THREAD_SETTING_UP));
    let start = SLOT_HINT.fetch_add(1, Ordering::Relaxed);
    let found = (0..SLOT_COUNT)
        .map(|i| &*SLOTS[(start + i) % SLOT_COUNT])
        .find(|slot| {
            slot.in_use
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
    let Some(slot) = found else {
        let _ = THREAD_STATE.try_with(|s| s.set(THREAD_DIRECT));
        return None;
    };
    // SAFETY: the key was created by init_threads; a non-null value makes the destructor run.
    unsafe { libc::pthread_setspecific(key as libc::pthread_key_t, (slot as *const Slot).cast()) };
    let _ = THREAD_SLOT.try_with(|s| s.set(slot));
    let _ = THREAD_STATE.try_with(|s| s.set(THREAD_SLOTTED));
    Some(slot)
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
        pool.release(credit);
    }
    slot.in_use.store(false, Ordering::Release);
}

extern "C" fn thread_exit(value: *mut libc::c_void) {
    let _ = THREAD_STATE.try_with(|s| s.set(THREAD_DIRECT));
    // SAFETY: the only values ever stored under the key are pointers into SLOTS.
    if let Some(slot) = unsafe { value.cast::<Slot>().cast_const().as_ref() } {
        retire_slot(slot);
    }
}

/// Creates the thread-exit key. Called once from the library's constructor.
pub fn init_threads() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: key is a valid out-pointer; thread_exit has the destructor's C signature.
    if unsafe { libc::pthread_key_create(&mut key, Some(thread_exit)) } == 0 {
        THREAD_KEY.store(key as usize, Ordering::Release);
    }
}

/// In a fork child only the forking thread lives on: the other threads' credits come back.
pub fn after_fork_child() {
    let mine = THREAD_SLOT.try_with(|s| s.get()).unwrap_or(ptr::null());
    for slot in SLOTS.iter() {
        let slot: &Slot = slot;
        if slot.in_use.load(Ordering::Acquire) && !ptr::eq(slot, mine) {
            retire_slot(slot);
        }
    }
}

/// A consistent-enough view of a pool, summed from the slots for the host.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolTotals {
    pub live: u64,
    pub allocs: u64,
    pub frees: u64,
}

pub fn totals(index: usize) -> PoolTotals {
    let Some(pool) = pool(index) else {
        return PoolTotals::default();
    };
    let mut credit = 0u64;
    let mut allocs = pool.direct_allocs.load(Ordering::Relaxed);
    let mut frees = pool.direct_frees.load(Ordering::Relaxed);
    if index == HOST {
        for slot in SLOTS.iter() {
            credit += slot.credit.load(Ordering::Relaxed);
            allocs += slot.allocs.load(Ordering::Relaxed);
            frees += slot.frees.load(Ordering::Relaxed);
        }
    }
    PoolTotals {
        live: pool.committed().saturating_sub(credit),
        allocs,
        frees,
    }
}

/// Number of pools in use: the host plus GPU pools up to the highest active one.
pub fn pool_count() -> usize {
    (1..MAX_POOLS)
        .rev()
        .find(|&i| POOLS[i].is_active())
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: (u8, u8) = (70, 90);

    #[test]
    fn levels_rise_at_thresholds_and_fall_with_hysteresis() {
        // (current level, used of 100, expected next level)
        let cases: &[(u8, u64, u8)] = &[
            (LEVEL_NORMAL, 69, LEVEL_NORMAL),
            (LEVEL_NORMAL, 70, LEVEL_WARN),
            (LEVEL_NORMAL, 95, LEVEL_CRITICAL),
            (LEVEL_WARN, 89, LEVEL_WARN),
            (LEVEL_WARN, 90, LEVEL_CRITICAL),
            (LEVEL_WARN, 66, LEVEL_WARN),
            (LEVEL_WARN, 65, LEVEL_WARN),
            (LEVEL_WARN, 64, LEVEL_NORMAL),
            (LEVEL_CRITICAL, 86, LEVEL_CRITICAL),
            (LEVEL_CRITICAL, 84, LEVEL_WARN),
            (LEVEL_CRITICAL, 10, LEVEL_NORMAL),
        ];
        for &(current, used, want) in cases {
            assert_eq!(
                next_level(current, used, 100, T),
                want,
                "from level {current} at {used}%"
            );
        }
    }

    #[test]
    fn unlimited_budget_is_always_normal() {
        assert_eq!(
            next_level(LEVEL_NORMAL, u64::MAX - 1, UNLIMITED, T),
            LEVEL_NORMAL
        );
    }

    #[test]
    fn pool_never_commits_past_budget_and_reserve() {
        let pool = Pool::new();
        pool.set_budget(1000);
        pool.set_reserve(100);
        assert!(pool.try_commit(1000, false));
        assert!(
            !pool.try_commit(1, false),
            "budget full, no reserve allowed"
        );
        assert!(
            pool.try_commit(100, true),
            "small request may use the reserve"
        );
        assert!(
            !pool.try_commit(1, true),
            "budget plus reserve is the hard end"
        );
        pool.release(1100);
        assert_eq!(pool.committed(), 0);
        assert_eq!(pool.peak(), 1100);
    }

    #[test]
    fn commit_of_huge_request_does_not_overflow() {
        let pool = Pool::new();
        assert!(pool.try_commit(10, false));
        assert!(!pool.try_commit(u64::MAX, true));
        assert_eq!(pool.committed(), 10);
    }
}
