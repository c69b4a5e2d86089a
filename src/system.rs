//! What the machine offers: physical memory and the cgroup v2 limit, read from /proc and /sys
//! into stack buffers (no allocation), so it can run at load time.

/// Bytes of physical memory.
pub fn physical_memory_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page > 0 {
        pages as u64 * page as u64
    } else {
        0
    }
}

/// Memory the process may use: physical memory, or the cgroup v2 memory.max when lower.
pub fn usable_memory_bytes() -> u64 {
    let physical = physical_memory_bytes();
    match cgroup_memory_max() {
        Some(limit) if limit < physical => limit,
        _ => physical,
    }
}

/// Reads a whole small file into `buf`; returns the bytes read.
pub fn read_file<'a>(path: &core::ffi::CStr, buf: &'a mut [u8]) -> Option<&'a [u8]> {
    // SAFETY: path is NUL-terminated; the fd is closed on every path below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut len = 0;
    while len < buf.len() {
        let rest = buf.get_mut(len..)?;
        // SAFETY: rest is a valid writable slice.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n <= 0 {
            break;
        }
        len += n as usize;
    }
    // SAFETY: fd was opened above.
    unsafe { libc::close(fd) };
    buf.get(..len)
}

/// The path prefix of cgroup v2 files of this process: "/sys/fs/cgroup" + the "0::" line of
/// /proc/self/cgroup, NUL-free, in `out`.
fn cgroup_dir(out: &mut [u8; 512]) -> Option<usize> {
    let mut buf = [0u8; 4096];
    let text = read_file(c"/proc/self/cgroup", &mut buf)?;
    let line = text
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"0::"))?;
    let rel = line.get(3..)?;
    let prefix = b"/sys/fs/cgroup";
    let total = prefix.len() + rel.len();
    if total >= out.len() {
        return None;
    }
    out.get_mut(..prefix.len())?.copy_from_slice(prefix);
    out.get_mut(prefix.len()..total)?.copy_from_slice(rel);
    Some(total)
}

/// Reads one cgroup v2 file of this process (e.g. b"/memory.max") as a number; None for "max",
/// a missing file or no cgroup v2.
pub fn cgroup_value(file: &[u8]) -> Option<u64> {
    let mut path = [0u8; 512];
    let mut len = cgroup_dir(&mut path)?;
    // A root cgroup ("0::/") has no memory.max of its own.
    if path.get(len - 1) == Some(&b'/') {
        len -= 1;
    }
    let end = len + file.len();
    if end + 1 > path.len() {
        return None;
    }
    path.get_mut(len..end)?.copy_from_slice(file);
    *path.get_mut(end)? = 0;
    let cpath = core::ffi::CStr::from_bytes_until_nul(&path).ok()?;
    let mut buf = [0u8; 64];
    let text = read_file(cpath, &mut buf)?;
    parse_u64(text)
}

pub fn cgroup_memory_max() -> Option<u64> {
    cgroup_value(b"/memory.max")
}

/// Leading decimal digits of `text` (after spaces) as a number.
pub fn parse_u64(text: &[u8]) -> Option<u64> {
    let digits = text.iter().skip_while(|b| b.is_ascii_whitespace());
    let mut value: u64 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add((b - b'0') as u64)?;
        any = true;
    }
    any.then_some(value)
}
