//! The ledger's pools: every pool's committed bytes, peak, budget, reserve and level, and the
//! level thresholds. This is the hot path.
//!
//! Never allocates, never takes a lock, never logs, never panics: it runs inside `malloc`.
//! A pool keeps one shared counter, `committed`, checked against the budget with a CAS loop, so
//! it is never exceeded, not even for an instant. Host allocations reach it through the
//! per-thread credit of [`super::credit`]; GPU pools see few, large allocations and charge
//! `committed` directly, exactly.
//!
//! In tree scope ([`super::tree`]) the counter checked against the budget is the tree's total
//! in the shared ledger, and `committed` counts this process's share beside it (mirrored in the
//! process's member record there, so that its share can be taken back if it dies). Process
//! scope pays one load and one predictable branch for this, on the pool's path only (a thread's
//! credit is untouched).

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};

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
/// After the budget refused a request, one larger request may also use the reserve, if it is at
/// most 1/RESERVE_GRANT_DIVISOR of the reserve (32 MiB of the default 64 MiB); the next one only
/// after the pool's level fell back to normal. It is for the error handling's one large step:
/// under `python -X tracemalloc` every new allocation adds a trace, and the traces' hash table
/// grows by reallocating its bucket array (8 bytes a bucket, 2-4 buckets per live trace: 4 MiB
/// for some 130,000 traces), so a handler at the budget could not allocate anything. A runaway
/// program that goes on asking for large blocks after its MemoryError gets one of them, then
/// refusals again, and the rest of the reserve stays for the small requests of its handler.
pub const RESERVE_GRANT_DIVISOR: u64 = 2;
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

/// The reserve's grant to one larger request ([`RESERVE_GRANT_DIVISOR`]): not opened since the
/// level was last normal, open after a refusal, used.
const GRANT_IDLE: u8 = 0;
const GRANT_OPEN: u8 = 1;
const GRANT_USED: u8 = 2;

/// One budgeted pool of memory.
pub struct Pool {
    /// This process's bytes: what the budget is held against in process scope.
    committed: AtomicU64,
    /// Tree scope: the tree's total for this pool in the shared ledger (what the budget is held
    /// against), this process's member record's count of it, and the tree's member count. Null
    /// in process scope; set while the process has one thread (at load, in a fork child).
    tree_total: AtomicPtr<AtomicU64>,
    tree_own: AtomicPtr<AtomicU64>,
    tree_members: AtomicPtr<AtomicU32>,
    budget: AtomicU64,
    effective: AtomicU64,
    reserve: AtomicU64,
    peak: AtomicU64,
    level: AtomicU8,
    /// GRANT_IDLE, GRANT_OPEN or GRANT_USED.
    reserve_grant: AtomicU8,
    active: AtomicBool,
    /// Allocations and frees charged directly (GPU pools, threads without a slot, retired
    /// threads' totals).
    pub(super) direct_allocs: AtomicU64,
    pub(super) direct_frees: AtomicU64,
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
            tree_total: AtomicPtr::new(core::ptr::null_mut()),
            tree_own: AtomicPtr::new(core::ptr::null_mut()),
            tree_members: AtomicPtr::new(core::ptr::null_mut()),
            budget: AtomicU64::new(UNLIMITED),
            effective: AtomicU64::new(UNLIMITED),
            reserve: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            level: AtomicU8::new(LEVEL_NORMAL),
            reserve_grant: AtomicU8::new(GRANT_IDLE),
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
        self.try_commit_leaving_unused(bytes, may_use_reserve, 0)
    }

    /// [`Pool::try_commit`] for a thread that keeps `unused` of the bytes as its credit: the
    /// peak is taken without them, so it follows live bytes up to other threads' credits only.
    pub fn try_commit_leaving_unused(
        &self,
        bytes: u64,
        may_use_reserve: bool,
        unused: u64,
    ) -> bool {
        let effective = self.effective.load(Ordering::Relaxed);
        let tree = self.tree();
        let limit = if may_use_reserve {
            effective.saturating_add(self.reserve_limit(tree.is_some()))
        } else {
            effective
        };
        let counter = tree.map_or(&self.committed, |(total, _)| total);
        let mut current = counter.load(Ordering::Relaxed);
        let new = loop {
            let Some(new) = current.checked_add(bytes) else {
                return false;
            };
            if new > limit {
                return false;
            }
            match counter.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break new,
                Err(seen) => current = seen,
            }
        };
        if let Some((_, own)) = tree {
            // After the tree's total: a process killed between the two leaves these bytes
            // charged to the tree (never an overrun), not its record short of them.
            own.fetch_add(bytes, Ordering::Relaxed);
            self.committed.fetch_add(bytes, Ordering::Relaxed);
        }
        let peak_candidate = new - unused.min(new);
        if peak_candidate > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(peak_candidate, Ordering::Relaxed);
        }
        self.update_level(new);
        true
    }

    /// Commits `bytes` whatever the budget: for memory that already exists (a realloc that
    /// grew in place past its estimate, an allocation made before the budget was known).
    pub fn force_commit(&self, bytes: u64) {
        let tree = self.tree();
        let counter = tree.map_or(&self.committed, |(total, _)| total);
        let new = counter
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        if let Some((_, own)) = tree {
            own.fetch_add(bytes, Ordering::Relaxed);
            self.committed.fetch_add(bytes, Ordering::Relaxed);
        }
        if new > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(new, Ordering::Relaxed);
        }
        self.update_level(new);
    }

    pub fn release(&self, bytes: u64) {
        let old = match self.tree() {
            None => self.committed.fetch_sub(bytes, Ordering::AcqRel),
            Some((total, own)) => {
                // This process's record first: a process killed between the two leaves the
                // bytes charged to the tree (never an overrun).
                own.fetch_sub(bytes, Ordering::Relaxed);
                self.committed.fetch_sub(bytes, Ordering::Relaxed);
                total.fetch_sub(bytes, Ordering::AcqRel)
            }
        };
        self.update_level(old.wrapping_sub(bytes));
    }

    /// Tree scope: the tree's total and this process's record of its share; None in process
    /// scope (one load and a branch).
    #[inline(always)]
    fn tree(&self) -> Option<(&AtomicU64, &AtomicU64)> {
        let total = self.tree_total.load(Ordering::Acquire);
        if total.is_null() {
            return None;
        }
        let own = self.tree_own.load(Ordering::Acquire);
        // SAFETY: both point into the shared ledger's mapping, which is never unmapped, and are
        // set together (own first) by `join_tree` while the process has one thread.
        unsafe { Some((&*total, own.as_ref()?)) }
    }

    /// How far past the effective budget a request that may use the reserve may go: the
    /// reserve, in tree scope once for each member of the tree, so that every process can still
    /// handle its own MemoryError when another used its reserve.
    #[inline]
    fn reserve_limit(&self, tree: bool) -> u64 {
        let reserve = self.reserve.load(Ordering::Relaxed);
        let members = self.tree_members.load(Ordering::Acquire);
        if !tree || members.is_null() {
            return reserve;
        }
        // SAFETY: points into the shared ledger's mapping, which is never unmapped.
        let members = unsafe { &*members }.load(Ordering::Relaxed).max(1);
        reserve.saturating_mul(members as u64)
    }

    /// Tree scope: from now on the budget is held against `total`, the tree's total for this
    /// pool, and this process's share is also counted in `own`. What the process already holds
    /// is added to both. Only while the process has one thread (at load, in a fork child).
    ///
    /// # Safety
    /// The three pointers point into a shared mapping that is never unmapped.
    pub unsafe fn join_tree(
        &self,
        total: *mut AtomicU64,
        own: *mut AtomicU64,
        members: *mut AtomicU32,
    ) {
        let mine = self.committed.load(Ordering::Relaxed);
        // SAFETY: the caller's promise: valid for the process's life.
        unsafe {
            (*own).store(mine, Ordering::Relaxed);
            (*total).fetch_add(mine, Ordering::AcqRel);
        }
        self.tree_members.store(members, Ordering::Release);
        self.tree_own.store(own, Ordering::Release);
        self.tree_total.store(total, Ordering::Release);
    }

    /// Back to process scope (a fork child that found no room in the tree): the budget is held
    /// against this process's own bytes again. Only while the process has one thread.
    pub fn leave_tree(&self) {
        self.tree_total
            .store(core::ptr::null_mut(), Ordering::Release);
        self.tree_own
            .store(core::ptr::null_mut(), Ordering::Release);
        self.tree_members
            .store(core::ptr::null_mut(), Ordering::Release);
    }

    /// Whether the pool's budget is the tree's.
    pub fn in_tree(&self) -> bool {
        !self.tree_total.load(Ordering::Relaxed).is_null()
    }

    /// Recomputes the level from the figures (in tree scope other processes move them).
    pub fn refresh_level(&self) {
        self.update_level(self.committed());
    }

    /// Commits `bytes` for a request of `requested` bytes that may go past the effective budget
    /// into the reserve: a small one always ([`RESERVE_SMALL_MAX_BYTES`]), a larger one when
    /// the budget refused a request before and the grant is still open
    /// ([`RESERVE_GRANT_DIVISOR`]). Tries the budget alone first for a larger one.
    pub fn try_commit_past_budget(&self, bytes: u64, requested: u64) -> bool {
        if requested <= RESERVE_SMALL_MAX_BYTES {
            return self.try_commit(bytes, true);
        }
        if self.try_commit(bytes, false) {
            return true;
        }
        let grant_max = self.reserve.load(Ordering::Relaxed) / RESERVE_GRANT_DIVISOR;
        if requested > grant_max
            || self
                .reserve_grant
                .compare_exchange(GRANT_OPEN, GRANT_USED, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        if self.try_commit(bytes, true) {
            return true;
        }
        // The reserve had no room for it: the grant stays for the next large request.
        let _ = self.reserve_grant.compare_exchange(
            GRANT_USED,
            GRANT_OPEN,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        false
    }

    /// Counts a refusal at the budget of a request of `bytes`, and opens the reserve's grant to
    /// one larger request unless it was used since the level was last normal.
    pub fn record_budget_refusal(&self, bytes: u64) {
        let _ = self.reserve_grant.compare_exchange(
            GRANT_IDLE,
            GRANT_OPEN,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        self.record_refusal(bytes);
    }

    /// Counts a refusal of a request of `bytes`.
    pub fn record_refusal(&self, bytes: u64) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        if bytes > self.largest_refused.load(Ordering::Relaxed) {
            self.largest_refused.fetch_max(bytes, Ordering::Relaxed);
        }
        crate::base::doorbell::ring();
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
        if next == LEVEL_NORMAL && self.reserve_grant.load(Ordering::Relaxed) != GRANT_IDLE {
            self.reserve_grant.store(GRANT_IDLE, Ordering::Relaxed);
        }
        if next != current
            && self
                .level
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.level_changes.fetch_add(1, Ordering::Relaxed);
            crate::base::doorbell::ring();
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
        self.update_level(self.committed());
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

    /// The bytes the budget is held against: this process's, in tree scope the tree's.
    pub fn committed(&self) -> u64 {
        match self.tree() {
            None => self.committed.load(Ordering::Relaxed),
            Some((total, _)) => total.load(Ordering::Relaxed),
        }
    }

    /// This process's bytes (the same as [`Pool::committed`] in process scope).
    pub fn own_committed(&self) -> u64 {
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

    /// [`Pool::charge_direct`] without the reserve that counts no refusal when it fails: for a
    /// caller that will try to make room and then charge again (`gpu/mempools.rs`).
    pub fn try_charge_direct(&self, bytes: u64) -> bool {
        let charged = self.try_commit(bytes, false);
        if charged {
            self.direct_allocs.fetch_add(1, Ordering::Relaxed);
        }
        charged
    }

    pub fn uncharge_direct(&self, bytes: u64) {
        self.direct_frees.fetch_add(1, Ordering::Relaxed);
        self.release(bytes);
    }
}

/// Warn and critical thresholds in percent, shared by all pools.
static WARN_PERCENT: AtomicU8 = AtomicU8::new(crate::base::config::DEFAULT_WARN_PERCENT);
static CRITICAL_PERCENT: AtomicU8 = AtomicU8::new(crate::base::config::DEFAULT_CRITICAL_PERCENT);

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
    fn one_large_request_may_use_the_reserve_after_a_refusal_until_the_level_is_normal() {
        let pool = Pool::new();
        pool.set_budget(1000 << 20);
        pool.set_reserve(64 << 20);
        const M: u64 = 1 << 20;
        // (step, bytes, expected) where a step is a commit, a release or a refusal.
        enum Step {
            Commit(u64, bool),
            Release(u64),
            Refuse,
        }
        use Step::*;
        let steps: &[Step] = &[
            Commit(999 * M, true),
            // Past the budget, before any refusal: a large request is refused as always.
            Commit(4 * M, false),
            // That refusal opened the grant: one large request (up to half the reserve) goes in.
            Refuse,
            Commit(33 * M, false),
            Commit(4 * M, true),
            // Used: the next large one is refused, small ones still use the reserve.
            Commit(4 * M, false),
            Refuse,
            Commit(4 * M, false),
            Commit(64 << 10, true),
            // Back under the budget (70%, warn) but not yet at normal: still used.
            Release(300 * M),
            Commit(400 * M, false),
            Refuse,
            Commit(400 * M, false),
            // At normal (30%) the grant is idle again: a large request past the budget is
            // refused first, and that refusal opens the grant once more.
            Release(400 * M),
            Commit(696 * M, true),
            Commit(2 * M, false),
            Refuse,
            Commit(2 * M, true),
        ];
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Commit(bytes, want) => assert_eq!(
                    pool.try_commit_past_budget(bytes, bytes),
                    want,
                    "step {i}: {bytes} bytes at {} committed",
                    pool.committed()
                ),
                Release(bytes) => pool.release(bytes),
                Refuse => pool.record_budget_refusal(1),
            }
        }
    }

    #[test]
    fn a_forced_commit_past_the_peak_raises_it() {
        let pool = Pool::new();
        pool.set_budget(1000);
        assert!(pool.try_commit(300, false));
        // Past the budget: a forced commit is memory that already exists.
        pool.force_commit(900);
        assert_eq!(pool.peak(), 1200, "a forced commit to 1200 is the new peak");
        pool.release(1000);
        pool.force_commit(100);
        assert_eq!(
            pool.peak(),
            1200,
            "a forced commit below the peak leaves it"
        );
    }

    /// A pool in tree scope over figures of its own, with the tree's total it is held against.
    /// Leaked, as the shared ledger's mapping is never unmapped.
    fn pool_in_tree(members: u32) -> (Pool, &'static AtomicU64) {
        let total: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let own: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let count: &'static AtomicU32 = Box::leak(Box::new(AtomicU32::new(members)));
        let pool = Pool::new();
        pool.set_budget(1000);
        pool.set_reserve(100);
        // SAFETY: the three point to leaked atomics, valid for the process's life.
        unsafe {
            pool.join_tree(
                total as *const _ as *mut _,
                own as *const _ as *mut _,
                count as *const _ as *mut _,
            )
        };
        (pool, total)
    }

    #[test]
    fn in_tree_scope_the_reserve_past_the_budget_is_one_for_each_member() {
        let (pool, total) = pool_in_tree(3);
        assert!(pool.in_tree());
        assert!(pool.try_commit(1000, false));
        assert!(!pool.try_commit(1, false), "the tree's budget is full");
        assert!(
            pool.try_commit(300, true),
            "three members: three reserves past the budget"
        );
        assert!(
            !pool.try_commit(1, true),
            "budget plus three reserves is the hard end"
        );
        assert_eq!(total.load(Ordering::Relaxed), 1300);
        assert_eq!(pool.own_committed(), 1300);
    }

    #[test]
    fn a_pool_that_leaves_the_tree_charges_only_itself_again() {
        let (pool, total) = pool_in_tree(2);
        assert!(pool.try_commit(200, false));
        // Another member's 700 bytes.
        total.fetch_add(700, Ordering::Relaxed);
        assert_eq!(pool.committed(), 900);
        pool.leave_tree();
        assert!(!pool.in_tree());
        assert_eq!(pool.committed(), 200, "back to this process's own bytes");
        assert!(
            pool.try_commit(700, false),
            "the other member's bytes no longer count"
        );
        assert!(
            !pool.try_commit(201, true),
            "one reserve again, not one for each member"
        );
        assert!(pool.try_commit(200, true), "up to budget plus one reserve");
        assert_eq!(
            total.load(Ordering::Relaxed),
            900,
            "the tree's total no longer moves with it"
        );
    }

    #[test]
    fn refresh_level_follows_the_other_members_charges() {
        let (pool, total) = pool_in_tree(2);
        assert!(pool.try_commit(100, false));
        assert_eq!(pool.level(), LEVEL_NORMAL);
        // Another member takes the tree to 95% of the budget.
        total.fetch_add(850, Ordering::Relaxed);
        pool.refresh_level();
        assert_eq!(pool.level(), LEVEL_CRITICAL);
        total.fetch_sub(850, Ordering::Relaxed);
        pool.refresh_level();
        assert_eq!(pool.level(), LEVEL_NORMAL);
    }

    #[test]
    fn a_pool_is_in_the_tree_only_between_joining_and_leaving() {
        let pool = Pool::new();
        assert!(!pool.in_tree());
        let (pool, _) = pool_in_tree(1);
        assert!(pool.in_tree());
        pool.leave_tree();
        assert!(!pool.in_tree());
    }

    #[test]
    fn commit_of_huge_request_does_not_overflow() {
        let pool = Pool::new();
        assert!(pool.try_commit(10, false));
        assert!(!pool.try_commit(u64::MAX, true));
        assert_eq!(pool.committed(), 10);
    }
}
