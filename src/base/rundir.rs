//! The user's private run directory: where a process under the library leaves what other
//! processes of the same user may read without signalling it (the counters file, a requested
//! dump's reply), and that no other user can read, plant or redirect.
//!
//! `$XDG_RUNTIME_DIR/qvshim` when XDG_RUNTIME_DIR names a directory of this user with mode 0700
//! (what systemd-logind makes), else `/dev/shm/qvshim-<uid>`. The directory is created 0700 when
//! missing and then opened with O_DIRECTORY|O_NOFOLLOW and checked on the descriptor (fstat): a
//! directory of this user with mode 0700, nothing else. A symlink, another user's directory or a
//! wider mode is refused; the caller then publishes nothing. Everything later is done relative
//! to the descriptor (openat, renameat, unlinkat), so the path is never looked up again.
//!
//! Monitor thread (or load) only: it allocates for the path.

use core::ffi::c_int;
use std::ffi::CString;

/// The mode the directory must have: its owner alone reads, writes and searches it.
pub const RUN_DIR_MODE: libc::mode_t = 0o700;
/// Name of the directory under XDG_RUNTIME_DIR.
pub const XDG_SUBDIR: &str = "qvshim";
/// Prefix of the fallback directory under /dev/shm (the uid follows).
pub const SHM_PREFIX: &str = "/dev/shm/qvshim-";

fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

fn euid() -> libc::uid_t {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether `st` is a directory of `uid` with exactly mode 0700.
pub fn private_dir(st: &libc::stat, uid: libc::uid_t) -> Result<(), &'static str> {
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err("not a directory");
    }
    if st.st_uid != uid {
        return Err("belongs to another user");
    }
    if st.st_mode & 0o7777 != RUN_DIR_MODE {
        return Err("its mode is not 0700");
    }
    Ok(())
}

/// The directory the library uses, by path: under `xdg` (XDG_RUNTIME_DIR as the process saw it
/// at load) when that is a private directory of this user, else under /dev/shm.
pub fn path(xdg: Option<&[u8]>) -> Vec<u8> {
    if let Some(xdg) = xdg.filter(|x| x.first() == Some(&b'/')) {
        if let Ok(c) = CString::new(xdg) {
            // SAFETY: a zeroed stat is a valid out-buffer; c is NUL-terminated.
            let mut st: libc::stat = unsafe { core::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::lstat(c.as_ptr(), &mut st) } == 0 && private_dir(&st, euid()).is_ok()
            {
                let mut p = xdg.to_vec();
                p.push(b'/');
                p.extend_from_slice(XDG_SUBDIR.as_bytes());
                return p;
            }
        }
    }
    format!("{SHM_PREFIX}{}", euid()).into_bytes()
}

/// Why the directory is not used.
#[derive(Debug)]
pub struct Refused {
    pub why: String,
    /// Something is there that is not ours to use (a link, another user's directory, a wider
    /// mode, a file): worth a warning. False when the directory merely cannot be made (no
    /// /dev/shm, a read-only file system), which is no reason to speak at the default level.
    pub hostile: bool,
}

fn refused(why: impl Into<String>, hostile: bool) -> Refused {
    Refused {
        why: why.into(),
        hostile,
    }
}

/// Creates (0700, when missing) and opens the directory at `path`, checked on its descriptor;
/// the descriptor (O_CLOEXEC) or why it is refused.
pub fn open(path: &[u8]) -> Result<c_int, Refused> {
    let c = CString::new(path).map_err(|_| refused("contains a NUL byte", false))?;
    // SAFETY: c is NUL-terminated. EEXIST is fine: what exists is checked below.
    if unsafe { libc::mkdir(c.as_ptr(), RUN_DIR_MODE) } != 0 && errno() != libc::EEXIST {
        return Err(refused(
            format!("cannot be created ({})", os_error(errno())),
            false,
        ));
    }
    // Looked at first only to say why a link is refused (O_DIRECTORY|O_NOFOLLOW says ENOTDIR);
    // the check that counts is the one on the descriptor below.
    // SAFETY: a zeroed stat is a valid out-buffer; c is NUL-terminated.
    let mut seen: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::lstat(c.as_ptr(), &mut seen) } == 0
        && seen.st_mode & libc::S_IFMT == libc::S_IFLNK
    {
        return Err(refused("is a symbolic link, never followed", true));
    }
    // SAFETY: c is NUL-terminated; the descriptor is closed on refusal below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = errno();
        return Err(match e {
            libc::ELOOP => refused("is a symbolic link, never followed", true),
            libc::ENOTDIR => refused("not a directory", true),
            _ => refused(format!("cannot be opened ({})", os_error(e)), false),
        });
    }
    // SAFETY: a zeroed stat is a valid out-buffer; fd is open.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let checked = if unsafe { libc::fstat(fd, &mut st) } == 0 {
        private_dir(&st, euid()).map_err(|why| refused(why, true))
    } else {
        Err(refused(
            format!("cannot be examined ({})", os_error(errno())),
            false,
        ))
    };
    match checked {
        Ok(()) => Ok(fd),
        Err(why) => {
            // SAFETY: fd was opened above and is not kept.
            unsafe { libc::close(fd) };
            Err(why)
        }
    }
}

/// The mode of every file made in the directory: its owner alone reads it.
pub const FILE_MODE: libc::mode_t = 0o600;
/// Temporary names tried before giving up (each random: a second try means someone made that
/// exact name, or getrandom failed).
pub const TEMP_NAME_ATTEMPTS: u32 = 8;

/// 64 unpredictable bits for a temporary name: getrandom(2) through syscall (no glibc wrapper
/// needed), else the clock and the attempt (O_EXCL still refuses a planted name). Also names
/// the dump file's temporary (diag/file.rs).
pub fn temp_suffix(attempt: u32) -> u64 {
    let mut value = 0u64;
    // SAFETY: the buffer is the 8 bytes of `value`.
    let got = unsafe {
        libc::syscall(
            libc::SYS_getrandom,
            (&mut value as *mut u64).cast::<libc::c_void>(),
            core::mem::size_of::<u64>(),
            libc::GRND_NONBLOCK,
        )
    };
    if got == core::mem::size_of::<u64>() as libc::c_long {
        return value;
    }
    super::clock::now_ms() ^ u64::from(attempt).rotate_left(48)
}

/// Writes `bytes` as `name` in the opened directory `dir`, whole: a temporary file beside it
/// (O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600) renamed over it, so a reader never sees half of one.
pub fn replace_in(dir: c_int, name: &str, bytes: &[u8]) -> Result<(), String> {
    let target = CString::new(name).map_err(|_| "contains a NUL byte".to_string())?;
    for attempt in 0..TEMP_NAME_ATTEMPTS {
        let Ok(temp) = CString::new(format!(".{name}.{:016x}", temp_suffix(attempt))) else {
            return Err("contains a NUL byte".into());
        };
        // SAFETY: dir is an open directory; temp is NUL-terminated; fd is closed below.
        let fd = unsafe {
            libc::openat(
                dir,
                temp.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                FILE_MODE as libc::c_uint,
            )
        };
        if fd < 0 {
            let e = errno();
            if e == libc::EEXIST {
                continue;
            }
            return Err(format!("cannot be created ({})", os_error(e)));
        }
        let written = super::log::write_all(fd, bytes);
        // SAFETY: fd was opened above.
        let closed = unsafe { libc::close(fd) } == 0;
        // SAFETY: both names are NUL-terminated and relative to the open directory.
        let renamed = written
            && closed
            && unsafe { libc::renameat(dir, temp.as_ptr(), dir, target.as_ptr()) } == 0;
        if renamed {
            return Ok(());
        }
        let e = errno();
        // SAFETY: temp is NUL-terminated; unlinkat never follows a link.
        unsafe { libc::unlinkat(dir, temp.as_ptr(), 0) };
        return Err(format!("cannot be written ({})", os_error(e)));
    }
    Err("no unused temporary name".into())
}

/// The system's words for an errno value.
fn os_error(code: c_int) -> String {
    std::io::Error::from_raw_os_error(code).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_of(kind: libc::mode_t, mode: libc::mode_t, uid: libc::uid_t) -> libc::stat {
        // SAFETY: a zeroed stat is a valid plain C struct.
        let mut st: libc::stat = unsafe { core::mem::zeroed() };
        st.st_mode = kind | mode;
        st.st_uid = uid;
        st
    }

    #[test]
    fn only_a_directory_of_this_user_with_mode_0700_is_private() {
        // (file type, mode, owner, verdict)
        let cases: &[(libc::mode_t, libc::mode_t, libc::uid_t, Result<(), &str>)] = &[
            (libc::S_IFDIR, 0o700, 1000, Ok(())),
            (libc::S_IFDIR, 0o755, 1000, Err("its mode is not 0700")),
            (libc::S_IFDIR, 0o1777, 1000, Err("its mode is not 0700")),
            (libc::S_IFDIR, 0o700, 0, Err("belongs to another user")),
            (libc::S_IFLNK, 0o777, 1000, Err("not a directory")),
            (libc::S_IFREG, 0o700, 1000, Err("not a directory")),
        ];
        for &(kind, mode, uid, want) in cases {
            assert_eq!(
                private_dir(&stat_of(kind, mode, uid), 1000),
                want,
                "{kind:o} {mode:o} uid {uid}"
            );
        }
    }
}
