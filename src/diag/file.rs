//! Where a requested dump goes: QVSHIM_DUMP_FILE (with `%p`), written without following a
//! planted link, without blocking on a FIFO nobody reads, and replaced whole through a temporary
//! file; anything that stops it sends the dump to the log with one line saying why.

use core::ffi::{c_int, CStr};
use std::ffi::CString;

use crate::base::log::qlog;
use crate::base::{clock, rundir};

use super::render::{render, write_dump};
use super::report::CONFIG;

pub fn expand_path(pattern: &[u8], pid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(pattern.len() + 8);
    let mut bytes = pattern.iter();
    while let Some(&c) = bytes.next() {
        if c != b'%' {
            out.push(c);
            continue;
        }
        match bytes.next() {
            Some(b'p') => out.extend_from_slice(pid.to_string().as_bytes()),
            Some(b'%') => out.push(b'%'),
            Some(&other) => out.extend_from_slice(&[b'%', other]),
            None => out.push(b'%'),
        }
    }
    out
}

/// How long, in all, a dump written into a FIFO or character device may wait for its reader to
/// make room; past it the rest is dropped, so a reader that stops reading never holds the
/// monitor (or the exit path) for ever.
pub(super) const DUMP_DEVICE_WAIT_MS: u64 = 1000;

/// Temporary names tried before giving up; each is random, so a second try only happens when
/// someone created that exact name (or getrandom failed and the fallback repeated itself).
pub(super) const TEMP_NAME_ATTEMPTS: u32 = 8;

/// The mode of a dump file: it can hold code addresses (backtraces), so only its owner reads it.
pub(super) const DUMP_FILE_MODE: libc::mode_t = 0o600;

/// What the dump path names, decided before anything is written.
pub(super) enum Target {
    /// Nothing (`existed` false) or a regular file of this user: written beside it, renamed over.
    Replace { existed: bool },
    /// A character device or FIFO opened here (non-blocking), or one of the process's own
    /// descriptors named as `/dev/stderr`, `/dev/fd/N`, ...: written in place, never replaced.
    InPlace { fd: c_int, owned: bool },
    /// Not written: why, shown after the variable; the dump goes to the log instead.
    Refused(String),
}

pub(super) fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

/// The system's words for an errno value ("Permission denied").
pub(super) fn os_error(code: c_int) -> String {
    let mut buf = [0u8; 128];
    // SAFETY: the buffer and its length are valid; the XSI strerror_r always NUL-terminates.
    unsafe { libc::strerror_r(code, buf.as_mut_ptr().cast(), buf.len()) };
    CStr::from_bytes_until_nul(&buf).map_or_else(
        |_| format!("errno {code}"),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// The descriptor a path names when it is one of the process's own (`/dev/stdout`,
/// `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`). These are symlinks the system owns, and what
/// they lead to is whatever the descriptor is (a tty, a pipe, the log file): written to the
/// descriptor itself, like the log, so neither the link nor what it leads to is ever replaced.
pub(super) fn own_descriptor(path: &[u8]) -> Option<c_int> {
    match path {
        b"/dev/stdout" => return Some(1),
        b"/dev/stderr" => return Some(2),
        _ => {}
    }
    let number = path
        .strip_prefix(b"/dev/fd/")
        .or_else(|| path.strip_prefix(b"/proc/self/fd/"))?;
    if number.is_empty() || number.len() > 9 || !number.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(number).ok()?.parse().ok()
}

/// Decides what to do with `path`. A symlink is never followed and never replaced; a regular
/// file is replaced only when it belongs to this user; a FIFO or character device is opened
/// non-blocking (never waiting for a reader) and checked to be the node examined.
pub(super) fn examine(path: &CStr, raw: &[u8]) -> Target {
    if let Some(fd) = own_descriptor(raw) {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Target::Refused(format!("names descriptor {fd}, which is not open"));
        }
        return Target::InPlace { fd, owned: false };
    }
    // SAFETY: a zeroed stat is a valid out-buffer; path is NUL-terminated.
    let mut seen: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::lstat(path.as_ptr(), &mut seen) } != 0 {
        let e = errno();
        return if e == libc::ENOENT {
            Target::Replace { existed: false }
        } else {
            Target::Refused(format!("cannot be examined ({})", os_error(e)))
        };
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    match seen.st_mode & libc::S_IFMT {
        libc::S_IFLNK => Target::Refused("is a symbolic link, never followed or replaced".into()),
        libc::S_IFDIR => Target::Refused("is a directory (name a file in it)".into()),
        libc::S_IFREG if seen.st_uid == uid => Target::Replace { existed: true },
        libc::S_IFREG => Target::Refused(format!(
            "belongs to uid {}, not to this process's uid {uid}; never written or replaced",
            seen.st_uid
        )),
        libc::S_IFCHR | libc::S_IFIFO => open_in_place(path, &seen),
        _ => Target::Refused("is neither a regular file, a character device nor a FIFO".into()),
    }
}

/// Opens the character device or FIFO `seen` describes for writing in place.
pub(super) fn open_in_place(path: &CStr, seen: &libc::stat) -> Target {
    // SAFETY: path is NUL-terminated; the fd is closed by the caller or below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = errno();
        return Target::Refused(if e == libc::ENXIO {
            "is a FIFO with no reader".into()
        } else {
            format!("cannot be opened for writing ({})", os_error(e))
        });
    }
    // SAFETY: a zeroed stat is a valid out-buffer; fd is open.
    let mut opened: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let same = unsafe { libc::fstat(fd, &mut opened) } == 0
        && opened.st_dev == seen.st_dev
        && opened.st_ino == seen.st_ino;
    if !same {
        // SAFETY: fd was opened above.
        unsafe { libc::close(fd) };
        return Target::Refused("changed while it was being opened".into());
    }
    Target::InPlace { fd, owned: true }
}

/// Writes all of `bytes` to a non-blocking descriptor, waiting for room at most
/// DUMP_DEVICE_WAIT_MS in all; false when it failed or the wait ran out.
pub(super) fn write_without_blocking(fd: c_int, mut bytes: &[u8]) -> bool {
    let deadline_ms = clock::now_ms() + DUMP_DEVICE_WAIT_MS;
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice for the duration of the call.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            bytes = bytes.get(n as usize..).unwrap_or(&[]);
            continue;
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN => {
                let left_ms = deadline_ms.saturating_sub(clock::now_ms());
                if left_ms == 0 {
                    return false;
                }
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; the timeout is below DUMP_DEVICE_WAIT_MS.
                unsafe { libc::poll(&mut poll, 1, left_ms as c_int) };
            }
            _ => return false,
        }
    }
    true
}

/// Creates a temporary file beside `path` (same directory, so the rename stays on one file
/// system): a random name, O_EXCL|O_NOFOLLOW (nothing planted there is opened), mode 0600.
pub(super) fn create_temp(path: &[u8]) -> Result<(CString, c_int), String> {
    for attempt in 0..TEMP_NAME_ATTEMPTS {
        let mut name = path.to_vec();
        name.extend_from_slice(
            format!(".{:016x}.partial", rundir::temp_suffix(attempt)).as_bytes(),
        );
        let Ok(name) = CString::new(name) else {
            return Err("contains a NUL byte".into());
        };
        // SAFETY: name is NUL-terminated; the fd is closed by the caller.
        let fd = unsafe {
            libc::open(
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                DUMP_FILE_MODE as libc::c_uint,
            )
        };
        if fd >= 0 {
            return Ok((name, fd));
        }
        let e = errno();
        if e != libc::EEXIST {
            return Err(format!(
                "no temporary file can be created beside it ({})",
                os_error(e)
            ));
        }
    }
    Err("no unused temporary name was found beside it".into())
}

/// Moves the finished temporary file to `path`. When nothing was there, RENAME_NOREPLACE makes
/// sure nothing that appeared since (another user's file, a symlink) is replaced; a rename
/// never follows a symlink at its target.
pub(super) fn move_into_place(temp: &CStr, path: &CStr, existed: bool) -> Result<(), String> {
    let rename = || {
        // SAFETY: both paths are NUL-terminated.
        unsafe { libc::rename(temp.as_ptr(), path.as_ptr()) }
    };
    let result = if existed {
        rename()
    } else {
        // SAFETY: both paths are NUL-terminated; AT_FDCWD makes them relative to the cwd.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                temp.as_ptr(),
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        // Old kernels and some file systems do not know the flag: the plain rename then.
        if r != 0 && matches!(errno(), libc::EINVAL | libc::ENOSYS) {
            rename()
        } else {
            r as c_int
        }
    };
    if result == 0 {
        return Ok(());
    }
    Err(match errno() {
        libc::EEXIST => "appeared while the dump was written; left as it was".into(),
        e @ (libc::EPERM | libc::EACCES) => format!(
            "cannot be replaced ({}): in a sticky directory (like /tmp) only its owner may",
            os_error(e)
        ),
        e => format!("cannot be replaced ({})", os_error(e)),
    })
}

/// Writes `text` beside `path` and renames it over, so that a reader (or a process that ends
/// mid-write) never sees half a dump.
pub(super) fn replace_with(path: &CStr, text: &[u8], existed: bool) -> Result<(), String> {
    let (temp, fd) = create_temp(path.to_bytes())?;
    let written = crate::base::log::write_all(fd, text);
    // SAFETY: fd was opened by create_temp.
    let closed = unsafe { libc::close(fd) } == 0;
    let result = if written && closed {
        move_into_place(&temp, path, existed)
    } else {
        Err("the temporary file beside it could not be written".into())
    };
    if result.is_err() {
        // SAFETY: temp is NUL-terminated; unlink never follows a symlink.
        unsafe { libc::unlink(temp.as_ptr()) };
    }
    result
}

/// Writes the dump the dump signal asked for, where the configuration says. Monitor thread, or
/// the exit path. Whatever stops the file from being written is one line naming
/// QVSHIM_DUMP_FILE, and the dump goes to the log instead.
pub fn write_requested_dump() {
    let Some(config) = CONFIG.get() else {
        return;
    };
    // `qvshim dump` asked: the reply goes to the run directory, whatever QVSHIM_DUMP_FILE says.
    if let Some(json) = super::publish::take_dump_ask() {
        match super::publish::write_dump_reply(&render(json)) {
            Ok(()) => qlog!(Info, "dump written for qvshim dump"),
            Err(why) => qlog!(Error, "the dump qvshim dump asked for: {why}"),
        }
        return;
    }
    let json = config.settings.dump_json;
    let Some(pattern) = &config.dump_path else {
        write_dump(crate::base::log::fd(), json);
        return;
    };
    let path = expand_path(pattern, std::process::id());
    let shown = String::from_utf8_lossy(&path).into_owned();
    let text = render(json);
    let result = match CString::new(path.clone()) {
        Err(_) => Err("contains a NUL byte".to_string()),
        Ok(cpath) => match examine(&cpath, &path) {
            Target::Refused(why) => Err(why),
            Target::Replace { existed } => replace_with(&cpath, text.as_bytes(), existed),
            Target::InPlace { fd, owned } => {
                let whole = if owned {
                    write_without_blocking(fd, text.as_bytes())
                } else {
                    crate::base::log::write_all(fd, text.as_bytes())
                };
                if owned {
                    // SAFETY: fd was opened by open_in_place.
                    unsafe { libc::close(fd) };
                }
                if whole {
                    Ok(())
                } else {
                    Err(
                        "the write failed or its reader stopped reading; the dump is cut short"
                            .into(),
                    )
                }
            }
        },
    };
    match result {
        Ok(()) => qlog!(Info, "dump written to {shown}"),
        Err(why) => {
            qlog!(
                Error,
                "QVSHIM_DUMP_FILE=\"{shown}\": {why}; dump written to the log instead"
            );
            crate::base::log::write_all(crate::base::log::fd(), text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_path_expands_pid_and_percent() {
        let cases: &[(&str, &str)] = &[
            ("/tmp/dump-%p.json", "/tmp/dump-42.json"),
            ("/tmp/100%%-%p", "/tmp/100%-42"),
            ("/tmp/plain", "/tmp/plain"),
            ("/tmp/x%", "/tmp/x%"),
            ("/tmp/%q", "/tmp/%q"),
        ];
        for (pattern, want) in cases {
            assert_eq!(
                expand_path(pattern.as_bytes(), 42),
                want.as_bytes(),
                "{pattern}"
            );
        }
    }

    #[test]
    fn own_descriptor_names_are_recognised_and_nothing_else() {
        let cases: &[(&str, Option<c_int>)] = &[
            ("/dev/stdout", Some(1)),
            ("/dev/stderr", Some(2)),
            ("/dev/fd/7", Some(7)),
            ("/proc/self/fd/12", Some(12)),
            ("/dev/fd/", None),
            ("/dev/fd/1x", None),
            ("/dev/fd/-1", None),
            ("/dev/fd/9999999999", None),
            ("/dev/stderr2", None),
            ("/dev/null", None),
            ("/proc/1/fd/2", None),
            ("dev/stderr", None),
        ];
        for (path, want) in cases {
            assert_eq!(own_descriptor(path.as_bytes()), *want, "{path}");
        }
    }
}
