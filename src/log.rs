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

const STDERR_FD: i32 = 2;

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);
static FD: AtomicI32 = AtomicI32::new(STDERR_FD);
static WINDOW_SECOND: AtomicU64 = AtomicU64::new(0);
static WINDOW_LINES: AtomicU64 = AtomicU64::new(0);
static DROPPED_LINES: AtomicU64 = AtomicU64::new(0);

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// Sends later lines to `fd` (an open, appending file descriptor).
pub fn set_fd(fd: i32) {
    FD.store(fd, Ordering::Relaxed);
}

pub fn fd() -> i32 {
    FD.load(Ordering::Relaxed)
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
    write_all(fd(), line.as_bytes());
}

/// Writes one ERROR line whatever the configured level: used for bad configuration, which must
/// never pass silently.
pub fn write_error_always(args: fmt::Arguments) {
    let mut line = LineBuf::new();
    let _ = write!(line, "[qvshim] ERROR ");
    let _ = line.write_fmt(args);
    line.finish_line();
    write_all(fd(), line.as_bytes());
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
#[macro_export]
macro_rules! qlog {
    ($level:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$level) {
            $crate::log::write_line($crate::log::Level::$level, format_args!($($arg)*));
        }
    };
}

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
