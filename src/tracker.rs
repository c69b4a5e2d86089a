//! The largest live allocations: a fixed-size, lock-free table of the blocks of at least
//! [`TRACK_MIN_BYTES`], for the diagnostic dump.
//!
//! Only blocks at or above the threshold ever touch the table, so the allocation path of small
//! blocks pays one comparison. Inserting and removing are a few atomic operations on a static
//! array: never allocates, never locks, never logs. When the table is full a block goes
//! untracked and is counted in [`Table::untracked`]; the dump says so.
//!
//! The dump (diag/report.rs) lists these together with the CUDA driver's allocations, which gpu.rs
//! tracks in tables of its own.

use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Blocks of at least this many bytes are tracked.
pub const TRACK_MIN_BYTES: u64 = 1 << 20;
/// Tracked blocks at most; past this many, blocks go untracked (counted).
pub const TABLE_ENTRIES: usize = 512;
/// Native frames kept per block when QVSHIM_BACKTRACE=1.
pub const BACKTRACE_FRAMES: usize = 16;
/// How many of the largest blocks the dump lists per pool.
pub const LARGEST_SHOWN: usize = 10;

/// An entry whose key is being written: not a valid block address (too small to be one).
const CLAIMING: usize = 1;
const FREE: usize = 0;

struct Entry {
    key: AtomicUsize,
    size: AtomicU64,
    born_ns: AtomicU64,
    frames: [AtomicUsize; BACKTRACE_FRAMES],
}

impl Entry {
    const fn new() -> Self {
        Entry {
            key: AtomicUsize::new(FREE),
            size: AtomicU64::new(0),
            born_ns: AtomicU64::new(0),
            frames: [const { AtomicUsize::new(0) }; BACKTRACE_FRAMES],
        }
    }
}

/// One live block as the dump shows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct LiveBlock {
    pub size: u64,
    pub age_ms: u64,
    /// Return addresses, innermost first; `frame_count` of them are valid.
    pub frames: [usize; BACKTRACE_FRAMES],
    pub frame_count: usize,
}

impl LiveBlock {
    pub fn frames(&self) -> &[usize] {
        self.frames.get(..self.frame_count).unwrap_or(&[])
    }
}

/// A table of live blocks keyed by address.
pub struct Table {
    entries: [Entry; TABLE_ENTRIES],
    untracked: AtomicU64,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    pub const fn new() -> Self {
        Table {
            entries: [const { Entry::new() }; TABLE_ENTRIES],
            untracked: AtomicU64::new(0),
        }
    }

    fn start(key: usize) -> usize {
        // Blocks of 1 MiB and more are at least page aligned: drop the low bits before hashing.
        ((key >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % TABLE_ENTRIES
    }

    fn probe(&self, key: usize) -> impl Iterator<Item = &Entry> {
        let start = Self::start(key);
        (0..TABLE_ENTRIES).filter_map(move |i| self.entries.get((start + i) % TABLE_ENTRIES))
    }

    /// Records a live block. `frames` are return addresses to keep with it (may be empty).
    pub fn insert(&self, key: usize, size: u64, frames: &[usize]) {
        if key <= CLAIMING {
            return;
        }
        let claimed = self.probe(key).find(|e| {
            e.key
                .compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        });
        let Some(entry) = claimed else {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return;
        };
        entry.size.store(size, Ordering::Relaxed);
        entry.born_ns.store(now_ns(), Ordering::Relaxed);
        for (i, slot) in entry.frames.iter().enumerate() {
            slot.store(frames.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
        entry.key.store(key, Ordering::Release);
    }

    /// Forgets the block at `key` of `size` bytes; false when it was not in the table (it went
    /// untracked). Matching the size too keeps a block that reused the address at another size
    /// (see [`on_free`]).
    pub fn remove(&self, key: usize, size: u64) -> bool {
        if key <= CLAIMING {
            return false;
        }
        let found = self.probe(key).find(|e| {
            e.key.load(Ordering::Relaxed) == key
                && e.size.load(Ordering::Relaxed) == size
                && e.key
                    .compare_exchange(key, FREE, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        });
        found.is_some()
    }

    /// True when `[start, start + len)` lies within one tracked block. A scan of the whole
    /// table: for rare calls only (cuMemHostRegister).
    pub fn covers(&self, start: usize, len: u64) -> bool {
        let end = (start as u64).saturating_add(len);
        self.entries.iter().any(|entry| {
            let key = entry.key.load(Ordering::Acquire);
            key > CLAIMING
                && key <= start
                && end <= (key as u64).saturating_add(entry.size.load(Ordering::Relaxed))
        })
    }

    /// Blocks that could not be tracked because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    /// Fills `out` with the largest tracked blocks, largest first; returns how many.
    pub fn largest(&self, out: &mut [LiveBlock]) -> usize {
        let now = now_ns();
        let mut count = 0;
        for entry in self.entries.iter() {
            let key = entry.key.load(Ordering::Acquire);
            if key <= CLAIMING {
                continue;
            }
            let mut block = LiveBlock {
                size: entry.size.load(Ordering::Relaxed),
                age_ms: now.saturating_sub(entry.born_ns.load(Ordering::Relaxed)) / 1_000_000,
                ..LiveBlock::default()
            };
            for (dst, src) in block.frames.iter_mut().zip(entry.frames.iter()) {
                *dst = src.load(Ordering::Relaxed);
            }
            block.frame_count = block.frames.iter().take_while(|&&f| f != 0).count();
            // The block was freed (and maybe the entry reused) while it was read: skip it.
            if entry.key.load(Ordering::Acquire) != key {
                continue;
            }
            count = insert_sorted(out, count, block);
        }
        count
    }

    /// Tracked blocks and their total size.
    pub fn totals(&self) -> (u64, u64) {
        self.entries
            .iter()
            .filter(|e| e.key.load(Ordering::Relaxed) > CLAIMING)
            .fold((0, 0), |(n, bytes), e| {
                (n + 1, bytes + e.size.load(Ordering::Relaxed))
            })
    }

    /// Empties the table (a fork child keeps its blocks, so this is only for tests).
    pub fn clear(&self) {
        for entry in self.entries.iter() {
            entry.key.store(FREE, Ordering::Relaxed);
        }
        self.untracked.store(0, Ordering::Relaxed);
    }
}

/// Puts `block` into the first `count` entries of `out` (sorted by size, largest first) when it
/// is among the largest; returns the new count.
fn insert_sorted(out: &mut [LiveBlock], count: usize, block: LiveBlock) -> usize {
    let Some(at) = (0..=count.min(out.len()))
        .find(|&i| i == count || out.get(i).is_some_and(|b| b.size < block.size))
    else {
        return count;
    };
    if at >= out.len() {
        return count;
    }
    let new_count = (count + 1).min(out.len());
    if let Some(tail) = out.get_mut(at..new_count) {
        tail.rotate_right(1);
        if let Some(first) = tail.first_mut() {
            *first = block;
        }
    }
    new_count
}

/// Monotonic nanoseconds from the coarse clock (a vDSO read, no syscall).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------------
// The host pool's table, fed from heap.rs.

static HOST: Table = Table::new();
static BACKTRACES: AtomicBool = AtomicBool::new(false);

pub fn host() -> &'static Table {
    &HOST
}

extern "C" {
    /// glibc's backtrace(3).
    fn backtrace(buffer: *mut *mut c_void, size: i32) -> i32;
}

/// Turns backtrace capture on. The first backtrace() call loads libgcc_s through malloc, so it
/// is made here, at load time, and never for the first time inside an allocation.
pub fn enable_backtraces() {
    let mut frames = [core::ptr::null_mut::<c_void>(); 2];
    // SAFETY: frames is valid for 2 pointers.
    unsafe { backtrace(frames.as_mut_ptr(), frames.len() as i32) };
    BACKTRACES.store(true, Ordering::Release);
}

/// A new host block of `usable` bytes (the caller checked `usable >= TRACK_MIN_BYTES`).
#[cold]
#[inline(never)]
pub fn on_alloc(p: *mut c_void, usable: u64) {
    let mut frames = [0usize; BACKTRACE_FRAMES];
    let mut count = 0;
    if BACKTRACES.load(Ordering::Relaxed) {
        let mut raw = [core::ptr::null_mut::<c_void>(); BACKTRACE_FRAMES + SKIPPED_FRAMES];
        // SAFETY: raw is valid for its length; libgcc_s was loaded by enable_backtraces.
        let n = unsafe { backtrace(raw.as_mut_ptr(), raw.len() as i32) }.max(0) as usize;
        for (dst, src) in frames
            .iter_mut()
            .zip(raw.iter().take(n).skip(SKIPPED_FRAMES))
        {
            *dst = *src as usize;
            count += 1;
        }
    }
    HOST.insert(p as usize, usable, frames.get(..count).unwrap_or(&[]));
}

/// Frames inside the shim (on_alloc, and the exported malloc with heap::alloc inlined into it)
/// left out of a backtrace.
const SKIPPED_FRAMES: usize = 2;

/// A host block of `usable` bytes was freed (the caller checked `usable >= TRACK_MIN_BYTES`).
///
/// free() learns a block's size from jemalloc's per-thread counters only after the block is
/// gone, so the entry is removed just after the free. In that instant another thread may get
/// the same address for a new block and insert it: when both have the same size, this may
/// remove the newer entry and leave the older one, so the dump shows the right address and
/// size with the older age and backtrace. Nothing else is affected.
#[cold]
#[inline(never)]
pub fn on_free(p: *mut c_void, usable: u64) {
    HOST.remove(p as usize, usable);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_blocks_come_back_sorted_and_freed_ones_go() {
        let table = Table::new();
        for (i, size) in [3u64, 9, 1, 7, 5].iter().enumerate() {
            table.insert(0x10_0000 * (i + 1), size << 20, &[0x1234, 0x5678]);
        }
        assert!(
            !table.remove(0x10_0000 * 2, 8 << 20),
            "same address, other size"
        );
        assert!(
            table.remove(0x10_0000 * 2, 9 << 20),
            "the 9 MiB block was tracked"
        );
        assert!(
            !table.remove(0xdead_0000, 9 << 20),
            "an unknown block is not found"
        );
        let mut out = [LiveBlock::default(); 3];
        let n = table.largest(&mut out);
        let sizes: Vec<u64> = out.iter().take(n).map(|b| b.size >> 20).collect();
        assert_eq!(sizes, [7, 5, 3]);
        assert_eq!(out[0].frames(), &[0x1234, 0x5678]);
        assert_eq!(table.totals(), (4, 16 << 20));
    }

    #[test]
    fn a_full_table_counts_untracked_blocks() {
        let table = Table::new();
        for i in 0..TABLE_ENTRIES + 3 {
            table.insert(0x10_0000 * (i + 1), 1 << 20, &[]);
        }
        assert_eq!(table.untracked(), 3);
        assert_eq!(table.totals().0, TABLE_ENTRIES as u64);
    }
}
