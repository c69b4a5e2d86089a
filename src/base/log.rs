//! Allocation-free logging: one `[qvshim] LEVEL message` line per call, to stderr or to
//! `QVSHIM_LOG_FILE`.
//!
//! A line is formatted with `core::fmt` into a fixed stack buffer (a long line is cut, never
//! grown) and written with one `write(2)`. This module never allocates, never takes a lock and
//! never panics, so it may be called from any thread; the allocation path and signal handlers
//! still leave logging to the monitor thread, because a full pipe can block `write`.
//!
//! Lines are rate-limited: at most [`LINES_PER_SECOND`] in any one second; the lines dropped are
//! counted and the count is announced by the next line that gets through.
//!
//! Where a line goes is decided again before each write, because the program owns the
//! descriptor table and may close or reuse any number at any time:
//! - a log file's descriptor is moved out of the way of the program's (to [`LOG_FD_FLOOR`] or
//!   above, close-on-exec) and written only while `fstat` still shows the file that was opened;
//!   once it shows anything else (the program closed the number, maybe opened its own file
//!   there), the log stops rather than write into the program's file;
//! - stderr is fd 2 while fd 2 is open for writing, whatever the program made of it (a stderr it redirected
//!   on purpose gets the lines, as it gets libc's and the runtime's own messages). When fd 2 is
//!   closed, lines go to a private copy of the original stderr, kept only at `info` and above
//!   (where the exit line is wanted); a stderr that was closed when the library loaded is never
//!   written.
//! - a write never raises SIGPIPE: a reader that went away loses the line, never kills the
//!   program.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};

/// How much a process is told. Ordered: a message is written when its level is at most the
/// configured one.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Off => "OFF",
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

/// The longest line written; longer messages are cut at this many bytes.
pub const LINE_MAX_BYTES: usize = 512;
/// Lines allowed through in any one second of monotonic time.
pub const LINES_PER_SECOND: u64 = 20;

/// A descriptor the log keeps is moved to this number or above: the program's own descriptors
/// take the lowest free numbers, so they do not meet it, and a program that counts on the
/// numbers it opens (3, 4, ...) or hands fixed low numbers to children is not disturbed. Not
/// near the RLIMIT_NOFILE soft limit: where that is a million, the kernel would grow the
/// process's descriptor table to match. A program that closes everything (closerange(3, ~0))
/// closes it anyway; the identity check before each write covers that.
pub const LOG_FD_FLOOR: i32 = 1000;

const STDERR_FD: i32 = 2;

/// Where lines go: stderr, the log file, or nowhere (the log file is gone, or there was no
/// stderr when the library loaded).
const TO_STDERR: u8 = 0;
const TO_FILE: u8 = 1;
const TO_NOWHERE: u8 = 2;

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);
static DESTINATION: AtomicU8 = AtomicU8::new(TO_STDERR);
/// The log file, and the device and inode it had when opened.
static FILE_FD: AtomicI32 = AtomicI32::new(-1);
static FILE_DEV: AtomicU64 = AtomicU64::new(0);
static FILE_INO: AtomicU64 = AtomicU64::new(0);
/// The private copy of stderr (-1: none), and the device and inode of that stderr.
static STDERR_COPY_FD: AtomicI32 = AtomicI32::new(-1);
static STDERR_DEV: AtomicU64 = AtomicU64::new(0);
static STDERR_INO: AtomicU64 = AtomicU64::new(0);
static WINDOW_SECOND: AtomicU64 = AtomicU64::new(0);
static WINDOW_LINES: AtomicU64 = AtomicU64::new(0);
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// A file's identity: what `fstat` says of a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// The identity of the file open at `fd`, or None when `fd` is not open.
fn file_id(fd: i32) -> Option<FileId> {
    if fd < 0 {
        return None;
    }
    // SAFETY: an all-zero stat is a valid value of a plain C struct; fstat only writes it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: st is a valid out-pointer for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some(FileId {
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
    })
}

/// True when `fd` is still open on the file recorded in `dev` and `ino`.
fn is_same_file(fd: i32, dev: &AtomicU64, ino: &AtomicU64) -> bool {
    file_id(fd).is_some_and(|id| {
        id == FileId {
            dev: dev.load(Ordering::Relaxed),
            ino: ino.load(Ordering::Relaxed),
        }
    })
}

/// The lowest number a kept descriptor is moved to: [`LOG_FD_FLOOR`], or just under the
/// RLIMIT_NOFILE soft limit when that is lower (F_DUPFD refuses numbers at or past it).
fn kept_fd_floor() -> i32 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return LOG_FD_FLOOR;
    }
    let below_limit = limit.rlim_cur.saturating_sub(1).min(LOG_FD_FLOOR as u64) as i32;
    below_limit.max(3)
}

/// A close-on-exec duplicate of `fd` at [`kept_fd_floor`] or above; None when there is no
/// free number there.
fn duplicate_high(fd: i32) -> Option<i32> {
    // SAFETY: F_DUPFD_CLOEXEC only reads fd and allocates a new descriptor.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, kept_fd_floor()) };
    (copy >= 0).then_some(copy)
}

/// At load, before anything is written: when stderr is closed, lines have nowhere to go, and
/// a file the program opens later at number 2 is never written.
pub fn check_stderr_at_load() {
    match file_id(STDERR_FD) {
        Some(id) => {
            STDERR_DEV.store(id.dev, Ordering::Relaxed);
            STDERR_INO.store(id.ino, Ordering::Relaxed);
        }
        None => DESTINATION.store(TO_NOWHERE, Ordering::Release),
    }
}

/// Keeps a private copy of stderr, so that lines (the exit line) still reach it after the
/// program closes fd 2. Called at load, only when lines at `info` are wanted on stderr.
pub fn keep_stderr_copy() {
    if DESTINATION.load(Ordering::Acquire) != TO_STDERR {
        return;
    }
    if let Some(copy) = duplicate_high(STDERR_FD) {
        STDERR_COPY_FD.store(copy, Ordering::Release);
    }
}

/// Makes `fd` (an open log file, appending) the destination of later lines: moved out of the
/// way of the program's descriptors, and remembered by identity. False when `fd` is unusable.
pub fn use_file(fd: i32) -> bool {
    let fd = match duplicate_high(fd) {
        Some(high) => {
            // SAFETY: fd is the low descriptor the caller opened and handed over.
            unsafe { libc::close(fd) };
            high
        }
        None => fd,
    };
    let Some(id) = file_id(fd) else {
        return false;
    };
    FILE_DEV.store(id.dev, Ordering::Relaxed);
    FILE_INO.store(id.ino, Ordering::Relaxed);
    FILE_FD.store(fd, Ordering::Relaxed);
    DESTINATION.store(TO_FILE, Ordering::Release);
    true
}

/// The descriptor a line goes to now, checked (see the module doc); -1 when nowhere.
pub fn fd() -> i32 {
    match DESTINATION.load(Ordering::Acquire) {
        TO_STDERR => stderr_fd(),
        TO_FILE => {
            let fd = FILE_FD.load(Ordering::Relaxed);
            if is_same_file(fd, &FILE_DEV, &FILE_INO) {
                fd
            } else {
                // The number is no longer ours: never close it, never write to it again.
                DESTINATION.store(TO_NOWHERE, Ordering::Release);
                -1
            }
        }
        _ => -1,
    }
}

/// True when `fd` is open for writing. A read-only file at number 2 is no stderr anybody can
/// write: most likely one of the shim's own short reads of /proc or the cgroup files, which take
/// the lowest free number once the program has closed fd 2.
fn open_for_writing(fd: i32) -> bool {
    // SAFETY: F_GETFL only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY
}

/// Fd 2 while it is open for writing; once it is closed, the private copy of the original
/// stderr.
fn stderr_fd() -> i32 {
    let copy = STDERR_COPY_FD.load(Ordering::Acquire);
    let now = file_id(STDERR_FD).filter(|_| open_for_writing(STDERR_FD));
    let Some(now) = now else {
        return if is_same_file(copy, &STDERR_DEV, &STDERR_INO) {
            copy
        } else {
            -1
        };
    };
    let original = FileId {
        dev: STDERR_DEV.load(Ordering::Relaxed),
        ino: STDERR_INO.load(Ordering::Relaxed),
    };
    // The program sent its stderr elsewhere on purpose: let go of the old one, so that a
    // reader of it (a pipe) sees its end when the program meant it to.
    if now != original
        && copy >= 0
        && STDERR_COPY_FD.swap(-1, Ordering::AcqRel) == copy
        && is_same_file(copy, &STDERR_DEV, &STDERR_INO)
    {
        // SAFETY: copy is the descriptor keep_stderr_copy made, still on the same file.
        unsafe { libc::close(copy) };
    }
    STDERR_FD
}

pub fn enabled(level: Level) -> bool {
    level != Level::Off && level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// A fixed buffer that `core::fmt` writes into; what does not fit is dropped.
pub struct LineBuf {
    bytes: [u8; LINE_MAX_BYTES],
    len: usize,
}

impl LineBuf {
    pub const fn new() -> Self {
        LineBuf {
            bytes: [0; LINE_MAX_BYTES],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }

    fn push_bytes(&mut self, s: &[u8]) {
        let room = LINE_MAX_BYTES - self.len;
        let n = s.len().min(room);
        if let (Some(dst), Some(src)) = (self.bytes.get_mut(self.len..self.len + n), s.get(..n)) {
            dst.copy_from_slice(src);
            self.len += n;
        }
    }

    /// Ends the line with a newline, replacing the last byte when the buffer is full.
    fn finish_line(&mut self) {
        if self.len == LINE_MAX_BYTES {
            self.len -= 1;
        }
        self.push_bytes(b"\n");
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes the whole buffer to `fd`, retrying on EINTR and short writes; gives up on any other
/// error (there is nowhere to report a failed log write).
pub fn write_all(fd: i32, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice for the duration of the call.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        bytes = bytes.get(n as usize..).unwrap_or(&[]);
    }
    true
}

/// Writes `bytes` to the log's destination as it is now. A reader that went away loses the
/// line: SIGPIPE is blocked in this thread around the write, and one the write raised is
/// taken back, so it never ends the program.
pub fn write_to_log(bytes: &[u8]) -> bool {
    let fd = fd();
    if fd < 0 {
        return false;
    }
    // SAFETY: sigset_t is a plain C struct that sigemptyset initialises; every pointer passed
    // below is valid for its call; pthread_sigmask, sigpending and sigtimedwait are
    // async-signal-safe and only touch this thread's mask and pending set.
    unsafe {
        let mut pipe: libc::sigset_t = core::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut old);
        let mut pending: libc::sigset_t = core::mem::zeroed();
        libc::sigpending(&mut pending);
        let was_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let written = write_all(fd, bytes);
        if !written && errno() == libc::EPIPE && !was_pending {
            let no_wait = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            libc::sigtimedwait(&pipe, core::ptr::null_mut(), &no_wait);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        written
    }
}

fn errno() -> i32 {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

fn monotonic_second() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC_COARSE is async-signal-safe to read.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64
}

/// True when the rate limit lets one more line through now.
fn admit_line() -> bool {
    let now = monotonic_second();
    if WINDOW_SECOND.swap(now, Ordering::Relaxed) != now {
        WINDOW_LINES.store(0, Ordering::Relaxed);
    }
    WINDOW_LINES.fetch_add(1, Ordering::Relaxed) < LINES_PER_SECOND
}

/// Writes one line at `level` when that level is enabled and the rate limit allows.
pub fn write_line(level: Level, args: fmt::Arguments) {
    if !enabled(level) {
        return;
    }
    if !admit_line() {
        DROPPED_LINES.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut line = LineBuf::new();
    let _ = write!(line, "[qvshim] {} ", level.name());
    let _ = line.write_fmt(args);
    let dropped = DROPPED_LINES.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let _ = write!(line, " ({dropped} earlier lines dropped by the rate limit)");
    }
    line.finish_line();
    write_to_log(line.as_bytes());
}

/// Writes one ERROR line whatever the configured level: used for bad configuration, which must
/// never pass silently.
pub fn write_error_always(args: fmt::Arguments) {
    let mut line = LineBuf::new();
    let _ = write!(line, "[qvshim] ERROR ");
    let _ = line.write_fmt(args);
    line.finish_line();
    write_to_log(line.as_bytes());
}

/// A byte count shown the way a person reads it: `512 B`, `64.00 MiB`, `4.21 GiB`.
#[derive(Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if self.0 == u64::MAX {
            return f.write_str("unlimited");
        }
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = UNITS[0];
        for next in UNITS.iter().skip(1) {
            if value < 1024.0 {
                break;
            }
            value /= 1024.0;
            unit = next;
        }
        write!(f, "{value:.2} {unit}")
    }
}

/// Logs at a level: `qlog!(Info, "budget {}", Bytes(n))`. The arguments are evaluated only when
/// the level is enabled.
macro_rules! qlog {
    ($level:ident, $($arg:tt)*) => {
        if $crate::base::log::enabled($crate::base::log::Level::$level) {
            $crate::base::log::write_line($crate::base::log::Level::$level, format_args!($($arg)*));
        }
    };
}
pub(crate) use qlog;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_display_picks_binary_unit() {
        let cases: &[(u64, &str)] = &[
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (64 << 20, "64.00 MiB"),
            (6 << 30, "6.00 GiB"),
            (u64::MAX, "unlimited"),
        ];
        for (n, want) in cases {
            let mut line = LineBuf::new();
            write!(line, "{}", Bytes(*n)).unwrap();
            assert_eq!(line.as_bytes(), want.as_bytes(), "Bytes({n})");
        }
    }

    #[test]
    fn long_line_is_cut_not_grown() {
        let mut line = LineBuf::new();
        for _ in 0..100 {
            write!(line, "0123456789").unwrap();
        }
        line.finish_line();
        assert_eq!(line.as_bytes().len(), LINE_MAX_BYTES);
        assert_eq!(line.as_bytes().last(), Some(&b'\n'));
    }
}
