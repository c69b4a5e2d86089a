//! The shim's own threads and the program's: starting a thread that leaves the host's signals
//! and heap alone ([`spawn_thread`]), knowing whether this is the monitor thread, and counting
//! the program's threads so that the process ends when its last one does
//! ([`program_threads`]). Never allocates, never takes a lock; [`thread_ended`] is
//! async-signal-safe.

use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::base::clock::now_ms;
use crate::base::doorbell::ring;
use crate::base::log::qlog;
use crate::base::system;

thread_local! {
    static ON_MONITOR: Cell<bool> = const { Cell::new(false) };
}

/// True on the monitor thread.
pub fn on_monitor_thread() -> bool {
    ON_MONITOR.try_with(|c| c.get()).unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// The process's end.
//
// glibc ends a process with exit(0) when its last thread ends (main called pthread_exit, then
// the last worker returned). It counts every thread pthread_create made, the shim's own among
// them, so while the monitor lives that moment never comes: the process would live on with only
// the shim's threads, which block every signal, so not even SIGTERM could end it. The monitor
// stands in for glibc: when no thread but the shim's is left, it calls exit(0).

/// Threads the shim started that run now (the monitor, the Python nudge thread). Counted only
/// once pthread_create has returned, so the count is never ahead of the kernel's: a mistake
/// can only make the program look as if it had one thread more, never one less.
static SHIM_THREADS: AtomicU32 = AtomicU32::new(0);
/// Set when a thread of the program ends (the ledger's thread-exit destructor): the monitor
/// looks at the thread count again over the next moments, while the thread finishes dying.
static THREAD_ENDED: AtomicBool = AtomicBool::new(false);
/// After a thread ended, how long the monitor waits before each new look (the thread runs its
/// destructors before the kernel removes it).
pub const THREAD_END_RECHECK_MS: [u64; 7] = [1, 2, 5, 10, 20, 50, 100];
/// After a look at the count, threads that end within this long do not wake the monitor; it
/// comes back to look when it is over. A program that churns through threads wakes it at most
/// this often, not on every thread's end.
pub const THREAD_LOOK_GAP_MS: u64 = 10;
/// Until when (monotonic ms) a thread's end does not ring the doorbell.
static QUIET_UNTIL_MS: AtomicU64 = AtomicU64::new(0);
/// The program's threads are counted at least this often, whatever QVSHIM_INTERVAL says: a
/// thread that never allocated ends without ringing the doorbell.
pub const THREAD_COUNT_EVERY_MS: u64 = 1000;
/// ... and this often once the main thread is gone (pthread_exit): then the end of any thread
/// may be the process's.
pub const THREAD_COUNT_MAIN_GONE_EVERY_MS: u64 = 100;

/// Called by a thread of the program as it ends (from a pthread key destructor): the monitor
/// looks whether any is left, now or when the [`THREAD_LOOK_GAP_MS`] after its last look is
/// over. Async-signal-safe, no allocation: an atomic store, the vDSO clock, and at most a
/// futex wake.
pub fn thread_ended() {
    THREAD_ENDED.store(true, Ordering::Release);
    if now_ms() >= QUIET_UNTIL_MS.load(Ordering::Acquire) {
        ring();
    }
}

/// The kernel's PF_EXITING in the flags of `/proc/self/stat`: the main thread is in its exit.
const PF_EXITING: u64 = 0x4;

/// What `/proc/self/stat` says: the process id, whether the main thread ended (a zombie, or
/// exiting), and the number of threads (a main thread that called pthread_exit is a zombie and
/// still counted).
pub fn parse_stat_threads(text: &[u8]) -> Option<(u64, bool, u64)> {
    let pid = system::parse_u64(text)?;
    // The command name is in parentheses and may itself hold ')' or spaces.
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = text.get(close + 1..)?;
    let mut fields = rest.split(|&b| b == b' ').filter(|field| !field.is_empty());
    let state = *fields.next()?.first()?;
    // flags is the 9th field, the 6th after the state; num_threads the 20th.
    let flags = system::parse_u64(fields.nth(5)?)?;
    let threads = system::parse_u64(fields.nth(10)?)?;
    Some((pid, state == b'Z' || flags & PF_EXITING != 0, threads))
}

/// The program's threads, as the monitor counts them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProgramThreads {
    /// Alive: the kernel's count less the shim's threads and a main thread that is a zombie.
    pub left: u64,
    /// The main thread ended (pthread_exit): a zombie, or on its way to being one. (In an
    /// exit_group the other threads, the monitor among them, are killed before the main thread
    /// exits, so the monitor never sees this and acts on it.)
    pub main_gone: bool,
}

/// Counts the program's threads. None when /proc cannot tell (then the process is never ended
/// by the shim).
pub fn program_threads() -> Option<ProgramThreads> {
    let mut buf = [0u8; 1024];
    let (pid, main_gone, threads) =
        parse_stat_threads(system::read_file(c"/proc/self/stat", &mut buf)?)?;
    // SAFETY: getpid has no preconditions.
    if pid != unsafe { libc::getpid() } as u64 {
        return None;
    }
    Some(ProgramThreads {
        left: threads
            .saturating_sub(u64::from(main_gone))
            .saturating_sub(SHIM_THREADS.load(Ordering::Acquire) as u64),
        main_gone,
    })
}

/// Ends the process as glibc would have when its last thread ended: exit(0), so atexit
/// handlers run and stdio is flushed. Only called when no thread of the program is left, so
/// nothing of the program runs at the same time.
pub fn end_like_the_last_thread() -> ! {
    qlog!(
        Info,
        "the program's last thread ended; ending the process with status 0 as glibc would"
    );
    // SAFETY: exit may be called from any thread; no thread of the program is left to race
    // with the handlers it runs.
    unsafe { libc::exit(0) }
}

/// Starts a detached thread running `entry` with every signal blocked, named `name`, with a
/// stack of `stack_bytes`. The thread must never end: it is counted as the shim's for good (see
/// [`program_threads`]).
///
/// A raw pthread, not `std::thread`: Rust's thread start registers a thread-local destructor
/// through `__cxa_thread_atexit_impl`, which callocs through the host's malloc, so the shim's
/// thread would hold memory (and a credit slot) in the host's ledger. The only allocation left
/// is the new thread's TLS block, made by `pthread_create` in the calling thread. Returns false
/// when the thread could not be created.
pub fn spawn_thread(
    name: &core::ffi::CStr,
    stack_bytes: usize,
    entry: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
) -> bool {
    // SAFETY: plain sigset and attribute manipulation on valid, local values; the old mask is
    // put back right after the create so only the new thread keeps everything blocked.
    unsafe {
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, stack_bytes);
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut thread: libc::pthread_t = 0;
        let created = libc::pthread_create(&mut thread, &attr, entry, core::ptr::null_mut()) == 0;
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if created {
            // Counted after the create: until now the kernel already counts the thread and
            // the program looks one thread larger, never smaller.
            SHIM_THREADS.fetch_add(1, Ordering::AcqRel);
            libc::pthread_setname_np(thread, name.as_ptr());
        }
        created
    }
}

/// Marks the calling thread as the monitor thread (see [`on_monitor_thread`]).
pub fn mark_monitor_thread() {
    let _ = ON_MONITOR.try_with(|c| c.set(true));
}

/// Whether a thread of the program ended since the last call (the monitor's look).
pub fn take_thread_ended() -> bool {
    THREAD_ENDED.swap(false, Ordering::AcqRel)
}

/// Until `until_ms` (monotonic) a thread's end only sets the flag and does not ring.
pub fn stay_quiet_until(until_ms: u64) {
    QUIET_UNTIL_MS.store(until_ms, Ordering::Release);
}

/// In a fork child only the forking thread lives on: none of the shim's.
pub fn after_fork_child() {
    SHIM_THREADS.store(0, Ordering::Relaxed);
    THREAD_ENDED.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_gives_the_pid_whether_main_ended_and_the_thread_count() {
        // flags 0x400100: a live main thread; 0x40810c: one with PF_EXITING (0x4).
        let live = "0 -1 4194560 302 0 0 0 1 8 0 0 20 0 3 0 77122 0 0";
        let exiting = "0 -1 4227084 302 0 0 0 1 8 0 0 20 0 2 0 77122 0 0";
        // (a /proc/self/stat line, (pid, main ended, threads))
        type Parsed = Option<(u64, bool, u64)>;
        let cases: &[(String, Parsed)] = &[
            (
                format!("30339 (lt) S 30337 30337 8767 {live}"),
                Some((30339, false, 3)),
            ),
            (
                format!("30339 (lt) Z 30337 30337 8767 {exiting}"),
                Some((30339, true, 2)),
            ),
            (
                format!("30339 (lt) R 30337 30337 8767 {exiting}"),
                Some((30339, true, 2)),
            ),
            (
                format!("7 (a) b) (c) S 1 30337 8767 {live}"),
                Some((7, false, 3)),
            ),
            ("30339 (lt) Z 30337".into(), None),
            ("".into(), None),
        ];
        for (line, want) in cases {
            assert_eq!(parse_stat_threads(line.as_bytes()), *want, "{line:?}");
        }
    }

    #[test]
    fn this_test_process_has_threads_of_its_own() {
        let count = program_threads();
        assert!(
            count.is_some_and(|c| c.left >= 1 && !c.main_gone),
            "{count:?}"
        );
    }
}
