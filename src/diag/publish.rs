//! The counters file: each process under the library publishes its figures (budget, effective
//! budget, live, peak, level, refusals, purges, per pool) as `<pid>.json` in the user's private
//! run directory ([`crate::base::rundir`]), where `qvshim status` and `qvshim top` read them
//! without signalling the process. The same directory carries a dump asked for by
//! `qvshim dump`: the asker leaves `<pid>.dump-ask` (`json` or `text`) and sends the dump
//! signal; the dump is then written to `<pid>.dump` there instead of its usual place.
//!
//! Monitor thread (and the exit path) only: builds a `String` (the shim's own allocations go to
//! jemalloc, never through the exported malloc). Each file is written whole to a temporary name
//! (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600) and renamed over, so a reader never sees half of one.
//! A fork child publishes under its own pid and never removes its parent's file. The layout is
//! documented in docs/MONITOR.md; keys are only ever added ("format" says which layout).

use core::ffi::c_int;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::ffi::CString;
use std::sync::OnceLock;

use crate::base::clock;
use crate::base::log::qlog;
use crate::base::rundir::{self, replace_in};
use crate::base::system;
use crate::ledger::{self, device_effective, level_name, PoolName};

/// Layout of the counters file ("format"): raised only when a key changes meaning.
pub const COUNTERS_FORMAT: u32 = 1;
/// How long the exit path waits for a publication under way before removing the file.
pub const EXIT_PUBLISH_WAIT_MS: u64 = 1_000;
/// At most one publication this often: the monitor looks more often under pressure and while
/// a CPython starts, and readers refresh once a second.
pub const PUBLISH_MIN_GAP_MS: u64 = 250;
/// The first publication waits until the process (or fork child) has lived this long, so that
/// the many short processes of a shell script (fork, exec, `_exit`) leave no files behind.
pub const FIRST_PUBLISH_AFTER_MS: u64 = 500;
static NEXT_PUBLISH_MS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
/// The longest dump-ask file read (it holds one word).
const ASK_MAX_BYTES: usize = 16;

/// Nothing being written; the monitor may publish.
const IDLE: u8 = 0;
/// The monitor is writing the file.
const WRITING: u8 = 1;
/// The process is ending (or publishing is off): nothing is written any more.
const STOPPED: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(STOPPED);
/// The run directory's descriptor, opened on the first publication (-1: not yet; -2: refused).
static DIR_FD: AtomicI32 = AtomicI32::new(NOT_OPENED);
const NOT_OPENED: c_int = -1;
const REFUSED: c_int = -2;

/// XDG_RUNTIME_DIR as the process had it at load (None: unset).
static XDG: OnceLock<Option<Vec<u8>>> = OnceLock::new();

/// Turns publishing on (QVSHIM_PUBLISH, on by default) with the process's XDG_RUNTIME_DIR.
/// Called once at load.
pub fn configure(on: bool, xdg_runtime_dir: Option<&[u8]>) {
    let _ = XDG.set(xdg_runtime_dir.map(<[u8]>::to_vec));
    NEXT_PUBLISH_MS.store(
        clock::now_ms().saturating_add(FIRST_PUBLISH_AFTER_MS),
        Ordering::Relaxed,
    );
    STATE.store(if on { IDLE } else { STOPPED }, Ordering::Release);
}

/// The run directory's descriptor, opened and checked once; None when it is refused (said once,
/// one line) or publishing is off.
fn dir_fd() -> Option<c_int> {
    match DIR_FD.load(Ordering::Acquire) {
        REFUSED => return None,
        NOT_OPENED => {}
        fd => return Some(fd),
    }
    let path = rundir::path(XDG.get().and_then(|x| x.as_deref()));
    match rundir::open(&path) {
        Ok(fd) => {
            DIR_FD.store(fd, Ordering::Release);
            Some(fd)
        }
        Err(refused) => {
            DIR_FD.store(REFUSED, Ordering::Release);
            let level = if refused.hostile {
                crate::base::log::Level::Warn
            } else {
                crate::base::log::Level::Info
            };
            crate::base::log::write_line(
                level,
                format_args!(
                    "run directory {}: {}; the counters file is not published (qvshim status will not see this process)",
                    String::from_utf8_lossy(&path),
                    refused.why
                ),
            );
            None
        }
    }
}

/// The process's start time in clock ticks after boot (/proc/self/stat, field 22): with the
/// pid, it tells this process from a later one that reuses the pid.
/// (The one parser of that line is base/system.rs's, which the tree ledger uses too.)
pub fn start_ticks(stat: &[u8]) -> Option<u64> {
    system::parse_stat_identity(stat).map(|identity| identity.start_ticks)
}

fn own_start_ticks() -> u64 {
    let mut buf = [0u8; 1024];
    system::read_file(c"/proc/self/stat", &mut buf)
        .and_then(start_ticks)
        .unwrap_or(0)
}

/// The counters as one JSON object (docs/MONITOR.md).
/// `dump_signal`: the signal that asks for a dump now (0: none).
pub fn counters_json(pid: u32, start: u64, dump_signal: i32) -> String {
    let mut out = String::with_capacity(512);
    let _ = write!(
        out,
        "{{\"format\":{COUNTERS_FORMAT},\"pid\":{pid},\"start_ticks\":{start},\
         \"version\":\"{}\",\"updated_ms\":{},\"dump_signal\":{},\"pools\":[",
        env!("CARGO_PKG_VERSION"),
        clock::now_ms(),
        dump_signal
    );
    let mut first = true;
    for index in 0..ledger::pool_count() {
        let active = ledger::pool(index).is_some_and(|p| p.is_active());
        if !active && index != ledger::HOST {
            continue;
        }
        let Some(s) = ledger::pool_stats(index) else {
            continue;
        };
        let _ = write!(
            out,
            "{}{{\"pool\":\"{}\",\"device\":{},\"level\":\"{}\",\"budget\":{},\
             \"effective_budget\":{},\"live\":{},\"peak\":{},\"refusals\":{},\"purges\":{}",
            if first { "" } else { "," },
            PoolName(index),
            s.device,
            level_name(s.level as u8),
            s.budget,
            s.effective_budget,
            s.live,
            s.peak,
            s.refusals,
            s.purges
        );
        if index != ledger::HOST {
            // What `qvshim status` shows under a GPU pool (docs/GPU.md, Unseen device memory):
            // the ledger's count, NVML's figure for the process (null when NVML gave none),
            // what the memory pools keep, and the unseen part that lowers the budget.
            let _ = write!(
                out,
                ",\"counted\":{},\"pools_cached\":{},\"unseen\":{},\"nvml_used\":",
                ledger::pool(index).map_or(0, |p| p.committed()),
                device_effective::last_pools_cached(index),
                device_effective::last_unseen(index)
            );
            match device_effective::last_nvml_used(index) {
                Some(used) => {
                    let _ = write!(out, "{used}");
                }
                None => out.push_str("null"),
            }
        }
        out.push('}');
        first = false;
    }
    out.push_str("]}\n");
    out
}

fn counters_name(pid: u32) -> String {
    format!("{pid}.json")
}

/// When the first publication is due, while it has not happened (the monitor wakes for it even
/// with a long QVSHIM_INTERVAL); None once it has, or when publishing is off.
pub fn first_due_ms() -> Option<u64> {
    if FIRST_DONE.load(Ordering::Relaxed) || STATE.load(Ordering::Relaxed) == STOPPED {
        return None;
    }
    Some(NEXT_PUBLISH_MS.load(Ordering::Relaxed))
}

static FIRST_DONE: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Publishes the counters file, when it is due (at most every [`PUBLISH_MIN_GAP_MS`], the
/// first [`FIRST_PUBLISH_AFTER_MS`] after load or fork), naming `dump_signal` as the signal
/// that asks for a dump now (0: none). Monitor thread.
pub fn publish(dump_signal: i32) {
    let now = clock::now_ms();
    if now < NEXT_PUBLISH_MS.load(Ordering::Relaxed) {
        return;
    }
    NEXT_PUBLISH_MS.store(now.saturating_add(PUBLISH_MIN_GAP_MS), Ordering::Relaxed);
    FIRST_DONE.store(true, Ordering::Relaxed);
    if STATE
        .compare_exchange(IDLE, WRITING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return;
    }
    if let Some(dir) = dir_fd() {
        let pid = std::process::id();
        let text = counters_json(pid, own_start_ticks(), dump_signal);
        if let Err(why) = replace_in(dir, &counters_name(pid), text.as_bytes()) {
            qlog!(Debug, "counters file {pid}.json: {why}");
        }
    }
    let _ = STATE.compare_exchange(WRITING, IDLE, Ordering::AcqRel, Ordering::Acquire);
}

/// At exit: stops publishing and removes this process's counters file (never its parent's:
/// the name is this pid's). Waits at most [`EXIT_PUBLISH_WAIT_MS`] for a publication under way.
pub fn withdraw() {
    let deadline = clock::now_ms().saturating_add(EXIT_PUBLISH_WAIT_MS);
    loop {
        match STATE.compare_exchange(IDLE, STOPPED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => break,
            Err(STOPPED) => return,
            Err(_) if clock::now_ms() >= deadline => return,
            // SAFETY: usleep has no memory-safety preconditions.
            Err(_) => unsafe {
                libc::usleep(1000);
            },
        }
    }
    let fd = DIR_FD.load(Ordering::Acquire);
    if fd < 0 {
        return;
    }
    if let Ok(name) = CString::new(counters_name(std::process::id())) {
        // SAFETY: fd is the open run directory; name is NUL-terminated; unlinkat never follows.
        unsafe { libc::unlinkat(fd, name.as_ptr(), 0) };
    }
}

/// In a fork child: it publishes its own file (under its own pid) from its own monitor; a
/// publication the parent's monitor had under way at the fork is not the child's.
pub(super) fn after_fork_child() {
    FIRST_DONE.store(false, Ordering::Relaxed);
    NEXT_PUBLISH_MS.store(
        clock::now_ms().saturating_add(FIRST_PUBLISH_AFTER_MS),
        Ordering::Relaxed,
    );
    let _ = STATE.compare_exchange(WRITING, IDLE, Ordering::AcqRel, Ordering::Acquire);
}

/// Whether `qvshim dump` asked for this dump: takes (removes) `<pid>.dump-ask` from the run
/// directory and says the format asked for (true: JSON). None: not asked that way.
pub fn take_dump_ask() -> Option<bool> {
    let fd = DIR_FD.load(Ordering::Acquire);
    if fd < 0 {
        return None;
    }
    let name = CString::new(format!("{}.dump-ask", std::process::id())).ok()?;
    // SAFETY: fd is the open run directory; name is NUL-terminated; the file is closed below.
    let ask = unsafe {
        libc::openat(
            fd,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if ask < 0 {
        return None;
    }
    let mut buf = [0u8; ASK_MAX_BYTES];
    // SAFETY: buf is a valid writable buffer of its length; ask is open.
    let n = unsafe { libc::read(ask, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: ask was opened above.
    unsafe { libc::close(ask) };
    // SAFETY: as above; unlinkat never follows a link.
    unsafe { libc::unlinkat(fd, name.as_ptr(), 0) };
    let word = buf.get(..n.max(0) as usize).unwrap_or(&[]);
    Some(word.starts_with(b"json"))
}

/// Writes the asked-for dump as `<pid>.dump` in the run directory, for `qvshim dump`.
pub fn write_dump_reply(text: &str) -> Result<(), String> {
    let fd = DIR_FD.load(Ordering::Acquire);
    if fd < 0 {
        return Err("no run directory".into());
    }
    replace_in(fd, &format!("{}.dump", std::process::id()), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_is_field_22_even_after_a_command_with_spaces_and_parentheses() {
        let fields: String = (3..=30).map(|n| format!(" {n}")).collect();
        let cases: &[(String, Option<u64>)] = &[
            (format!("42 (python3){fields}"), Some(22)),
            (format!("42 (a b) (c)){fields}"), Some(22)),
            ("42 (short) 3 4".to_string(), None),
            ("no parenthesis".to_string(), None),
        ];
        for (stat, want) in cases {
            assert_eq!(start_ticks(stat.as_bytes()), *want, "{stat}");
        }
    }
}
