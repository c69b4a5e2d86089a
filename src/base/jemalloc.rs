//! jemalloc's control interface: purging arenas and reading its statistics.
//!
//! mallctl takes jemalloc's locks and the "epoch" refresh walks every arena, so everything here
//! runs on the monitor thread (or in an explicit API call), never inside an allocation or a
//! signal handler.

use tikv_jemalloc_ctl::{epoch, raw};

/// "arena.<MALLCTL_ARENAS_ALL>.purge": 4096 names every arena at once.
const PURGE_ALL_ARENAS: &[u8] = b"arena.4096.purge\0";

/// jemalloc's own totals, in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub allocated: u64,
    pub active: u64,
    pub resident: u64,
    pub mapped: u64,
    pub retained: u64,
}

/// Refreshes and reads jemalloc's statistics.
pub fn stats() -> Stats {
    let _ = epoch::advance();
    let read = |name: &[u8]| -> u64 {
        // SAFETY: each name is a NUL-terminated stats key whose value is a size_t.
        unsafe { raw::read::<usize>(name) }.map_or(0, |v| v as u64)
    };
    Stats {
        allocated: read(b"stats.allocated\0"),
        active: read(b"stats.active\0"),
        resident: read(b"stats.resident\0"),
        mapped: read(b"stats.mapped\0"),
        retained: read(b"stats.retained\0"),
    }
}

/// What one purge gave back: jemalloc's resident bytes before and after.
#[derive(Clone, Copy, Debug, Default)]
pub struct Purge {
    pub resident_before: u64,
    pub resident_after: u64,
}

impl Purge {
    pub fn returned(&self) -> u64 {
        self.resident_before.saturating_sub(self.resident_after)
    }
}

/// Returns every arena's dirty and muzzy pages to the kernel.
pub fn purge() -> Purge {
    let before = stats().resident;
    // SAFETY: a NUL-terminated void control: no old or new value is passed.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL_ARENAS.as_ptr().cast(),
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            core::ptr::null_mut(),
            0,
        )
    };
    Purge {
        resident_before: before,
        resident_after: stats().resident,
    }
}
