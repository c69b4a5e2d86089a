//! The doorbell: how anything wakes the monitor thread without knowing it exists. [`ring`] is
//! one atomic add and one futex wake (async-signal-safe, never allocates, never takes a lock);
//! the monitor reads [`rung`] and sleeps in [`wait`] until it moves.

use core::sync::atomic::{AtomicU32, Ordering};

static DOORBELL: AtomicU32 = AtomicU32::new(0);

/// Wakes the monitor. Async-signal-safe: one atomic add and one futex syscall.
pub fn ring() {
    DOORBELL.fetch_add(1, Ordering::Release);
    // SAFETY: FUTEX_WAKE on a valid, static, aligned u32; wakes at most one waiter.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            DOORBELL.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        )
    };
}

/// Sleeps until the doorbell moves past `seen` or `timeout_ms` passes.
pub fn wait(seen: u32, timeout_ms: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a valid, static, aligned u32 with a valid relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            DOORBELL.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            seen,
            &ts as *const libc::timespec,
        )
    };
}

/// The doorbell's count now: a later [`wait`] on it returns as soon as anyone rings.
pub fn rung() -> u32 {
    DOORBELL.load(Ordering::Acquire)
}

/// In a fork child: nobody has rung.
pub fn after_fork_child() {
    DOORBELL.store(0, Ordering::Relaxed);
}
