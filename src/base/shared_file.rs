//! A file mapped shared between processes of one user: the private directory it lives in (the
//! run directory of [`super::rundir`], by the same rule, found without allocating), creating it, and opening one that
//! another process created, refusing anything another local user could have planted or changed.
//!
//! Runs at load (the constructor) and never on the allocation path; allocates nothing (paths are
//! built in a fixed buffer). A mapping is never unmapped: the processes that share it hold it for
//! their whole life.

use core::ffi::CStr;

/// The longest path handled (PATH_MAX, with its NUL).
pub const PATH_MAX_BYTES: usize = 4096;
use super::rundir::{self, RUN_DIR_MODE, SHM_PREFIX, XDG_SUBDIR};

/// The files in the private directory are the user's alone.
const FILE_MODE: libc::mode_t = 0o600;
/// Permission bits that let anyone but the owner in.
const OTHERS_BITS: libc::mode_t = 0o077;

/// A NUL-terminated path in a fixed buffer.
pub struct Path {
    buf: [u8; PATH_MAX_BYTES],
    len: usize,
}

impl Path {
    pub const fn new() -> Self {
        Path {
            buf: [0; PATH_MAX_BYTES],
            len: 0,
        }
    }

    /// A copy of `bytes`; None when it does not fit or holds a NUL.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let mut p = Path::new();
        p.push(bytes)?;
        Some(p)
    }

    /// Appends `bytes`; None (and the path unchanged) when they do not fit or hold a NUL.
    pub fn push(&mut self, bytes: &[u8]) -> Option<()> {
        if bytes.contains(&0) {
            return None;
        }
        let end = self.len.checked_add(bytes.len())?;
        // One byte stays for the NUL.
        if end >= PATH_MAX_BYTES {
            return None;
        }
        self.buf.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        self.buf[end] = 0;
        Some(())
    }

    /// Appends `value` in decimal.
    pub fn push_decimal(&mut self, mut value: u64) -> Option<()> {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(digits.get(at..)?)
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or(&[])
    }

    pub fn as_cstr(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"")
    }
}

impl Default for Path {
    fn default() -> Self {
        Path::new()
    }
}

fn errno() -> i32 {
    // SAFETY: __errno_location always returns this thread's valid errno slot.
    unsafe { *libc::__errno_location() }
}

fn lstat(path: &CStr) -> Option<libc::stat> {
    // SAFETY: an all-zero stat is a valid plain C struct; lstat only writes it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: path is NUL-terminated and st a valid out-pointer.
    (unsafe { libc::lstat(path.as_ptr(), &mut st) } == 0).then_some(st)
}

/// Whether `st` is a directory (not a link to one) of this user that no one else may enter:
/// the run directory's own rule (rundir::private_dir), so the counters files and the tree's
/// ledgers are never in a directory one of them would refuse.
fn is_private_dir(st: &libc::stat) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    rundir::private_dir(st, me).is_ok()
}

/// `path`, made if absent; Some only when it is then a private directory of this user.
fn private_dir(path: Path) -> Option<Path> {
    // SAFETY: the path is NUL-terminated. EEXIST is checked by lstat below either way.
    unsafe { libc::mkdir(path.as_cstr().as_ptr(), RUN_DIR_MODE) };
    lstat(path.as_cstr()).filter(is_private_dir).map(|_| path)
}

/// The user's private directory for the shim's shared files: `$XDG_RUNTIME_DIR/qvshim` when
/// that variable names a private directory of this user, else `/dev/shm/qvshim-<uid>`. None when
/// neither is (or can be made) a directory that only this user can enter.
pub fn private_directory(xdg_runtime_dir: Option<&[u8]>) -> Option<Path> {
    if let Some(xdg) = xdg_runtime_dir.filter(|x| x.first() == Some(&b'/')) {
        if let Some(base) = Path::from_bytes(xdg) {
            if lstat(base.as_cstr()).is_some_and(|st| is_private_dir(&st)) {
                let mut p = base;
                if p.push(b"/").is_some() && p.push(XDG_SUBDIR.as_bytes()).is_some() {
                    if let Some(dir) = private_dir(p) {
                        return Some(dir);
                    }
                }
            }
        }
    }
    let mut p = Path::from_bytes(SHM_PREFIX.as_bytes())?;
    // SAFETY: geteuid has no preconditions.
    p.push_decimal(unsafe { libc::geteuid() } as u64)?;
    private_dir(p)
}

/// Maps `fd` shared, `bytes` long, read and write.
fn map(fd: i32, bytes: usize) -> Result<*mut u8, &'static str> {
    // SAFETY: a fresh shared mapping of an open file; nothing else is at the returned address.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err("cannot be mapped")
    } else {
        Ok(p.cast())
    }
}

/// Creates `path` (which must not exist: O_EXCL, never through a link), `bytes` long and zeroed,
/// mode 0600, and maps it shared. The descriptor is closed; the mapping stays.
pub fn create(path: &CStr, bytes: usize) -> Result<*mut u8, &'static str> {
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            FILE_MODE,
        )
    };
    if fd < 0 {
        return Err("cannot be created");
    }
    // SAFETY: fd was opened above.
    let sized = unsafe { libc::ftruncate(fd, bytes as libc::off_t) } == 0;
    let mapped = if sized {
        map(fd, bytes)
    } else {
        Err("cannot be sized")
    };
    // SAFETY: fd was opened above; the mapping does not need it.
    unsafe { libc::close(fd) };
    if mapped.is_err() {
        // SAFETY: path is NUL-terminated; the file is ours, made above.
        unsafe { libc::unlink(path.as_ptr()) };
    }
    mapped
}

/// Opens the file another process made at `path` and maps its first `bytes` shared. Refused,
/// with the reason: a symbolic link, anything but a regular file, a file of another user or one
/// that others may read or write, one shorter than `bytes`.
pub fn open(path: &CStr, bytes: usize) -> Result<*mut u8, &'static str> {
    // SAFETY: path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(match errno() {
            libc::ELOOP => "a symbolic link (never followed)",
            libc::ENOENT => "no such file",
            libc::EACCES | libc::EPERM => "permission denied",
            _ => "cannot be opened",
        });
    }
    let checked = check_owned_regular(fd, bytes).and_then(|()| map(fd, bytes));
    // SAFETY: fd was opened above; the mapping does not need it.
    unsafe { libc::close(fd) };
    checked
}

fn check_owned_regular(fd: i32, bytes: usize) -> Result<(), &'static str> {
    // SAFETY: an all-zero stat is a valid plain C struct; fstat only writes it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: fd is open and st a valid out-pointer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err("cannot be examined");
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        Err("not a regular file")
    } else if st.st_uid != me {
        Err("owned by another user")
    } else if st.st_mode & OTHERS_BITS != 0 {
        Err("others may read or write it (mode is not 0600)")
    } else if (st.st_size as u64) < bytes as u64 {
        Err("too short to be a ledger")
    } else {
        Ok(())
    }
}

/// Removes `path`, a file this process (or its tree) made.
pub fn remove(path: &CStr) {
    // SAFETY: path is NUL-terminated.
    unsafe { libc::unlink(path.as_ptr()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_refuses_what_does_not_fit_and_writes_decimals() {
        let mut p = Path::from_bytes(b"/x-").unwrap();
        p.push_decimal(0).unwrap();
        p.push(b"-").unwrap();
        p.push_decimal(u64::MAX).unwrap();
        assert_eq!(p.as_bytes(), b"/x-0-18446744073709551615");
        assert_eq!(p.as_cstr().to_bytes(), p.as_bytes());
        assert!(p.push(b"a\0b").is_none(), "a NUL inside a path is refused");
        assert!(p.push(&[b'a'; PATH_MAX_BYTES]).is_none(), "too long");
        assert_eq!(p.as_bytes(), b"/x-0-18446744073709551615", "unchanged");
    }

    #[test]
    fn open_refuses_links_short_files_and_files_others_may_read() {
        let dir = std::env::temp_dir().join(format!("qvshim-shared-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = |name: &str| {
            std::ffi::CString::new(dir.join(name).to_str().unwrap().as_bytes()).unwrap()
        };
        let _ = std::fs::remove_file(dir.join("good"));
        create(&c("good"), 4096).expect("a fresh file is created");
        assert_eq!(create(&c("good"), 4096), Err("cannot be created"), "O_EXCL");
        let _ = std::fs::remove_file(dir.join("link"));
        std::os::unix::fs::symlink(dir.join("good"), dir.join("link")).unwrap();
        std::fs::write(dir.join("open"), [0u8; 4096]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("open"), std::fs::Permissions::from_mode(0o644)).unwrap();
        // (file, expected)
        let cases: &[(&str, Result<(), &str>)] = &[
            ("good", Ok(())),
            ("link", Err("a symbolic link (never followed)")),
            ("absent", Err("no such file")),
            (
                "open",
                Err("others may read or write it (mode is not 0600)"),
            ),
        ];
        for &(name, want) in cases {
            assert_eq!(open(&c(name), 4096).map(|_| ()), want, "{name}");
        }
        assert_eq!(
            open(&c("good"), 8192).map(|_| ()),
            Err("too short to be a ledger")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
