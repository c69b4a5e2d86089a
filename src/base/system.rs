//! What the kernel says about the machine and the process: physical memory, /proc/meminfo,
//! /proc/self/status and memory pressure (PSI), read into stack buffers (no allocation), so it
//! can run at load time. The memory cgroup is [`super::cgroup`].

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
/// The value of the `key:` line of a /proc file in "key:   1234 kB" form, in bytes.
fn kib_field(text: &[u8], key: &[u8]) -> Option<u64> {
    let line = text
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(key) && l.get(key.len()) == Some(&b':'))?;
    let kib = parse_u64(line.get(key.len() + 1..)?)?;
    kib.checked_mul(1024)
}

/// The machine's memory, from /proc/meminfo.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemInfo {
    pub total: u64,
    pub available: u64,
}

pub fn parse_meminfo(text: &[u8]) -> Option<MemInfo> {
    Some(MemInfo {
        total: kib_field(text, b"MemTotal")?,
        available: kib_field(text, b"MemAvailable")?,
    })
}

pub fn meminfo() -> Option<MemInfo> {
    let mut buf = [0u8; 8192];
    parse_meminfo(read_file(c"/proc/meminfo", &mut buf)?)
}

/// This process's resident memory, from /proc/self/status.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessMemory {
    /// VmRSS: all resident pages.
    pub rss: u64,
    /// RssAnon: resident anonymous pages (heap, mmap'ed anonymous memory, stacks).
    pub rss_anon: u64,
    /// VmHWM: the peak of VmRSS.
    pub rss_peak: u64,
}

pub fn parse_status(text: &[u8]) -> Option<ProcessMemory> {
    Some(ProcessMemory {
        rss: kib_field(text, b"VmRSS")?,
        rss_anon: kib_field(text, b"RssAnon").unwrap_or(0),
        rss_peak: kib_field(text, b"VmHWM").unwrap_or(0),
    })
}

pub fn process_memory() -> Option<ProcessMemory> {
    let mut buf = [0u8; 8192];
    parse_status(read_file(c"/proc/self/status", &mut buf)?)
}

/// A process as /proc/<pid>/stat names it: whether it still runs (not a zombie) and when it
/// started (clock ticks since boot), which tells it from a later process given the same pid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessIdentity {
    pub running: bool,
    pub start_ticks: u64,
}

/// Parses /proc/<pid>/stat: the state is the first field after the command's closing
/// parenthesis (the command itself may hold spaces and parentheses), the start time the 22nd.
pub fn parse_stat_identity(text: &[u8]) -> Option<ProcessIdentity> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let mut fields = text
        .get(close + 1..)?
        .split(|&b| b == b' ')
        .filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    // Field 3 was the state; the start time is field 22, 19 further on.
    let start_ticks = parse_u64(fields.nth(18)?)?;
    Some(ProcessIdentity {
        running: !matches!(state, b'Z' | b'X' | b'x'),
        start_ticks,
    })
}

/// The identity of process `pid`; None when there is no such process (or /proc is unreadable).
pub fn process_identity(pid: u32) -> Option<ProcessIdentity> {
    let mut path = *b"/proc/\0\0\0\0\0\0\0\0\0\0/stat\0\0\0\0\0\0\0\0\0\0\0";
    let mut digits = [0u8; 10];
    let (mut at, mut value) = (digits.len(), pid);
    loop {
        at -= 1;
        *digits.get_mut(at)? = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    let number = digits.get(at..)?;
    let end = 6 + number.len();
    path.get_mut(6..end)?.copy_from_slice(number);
    path.get_mut(end..end + 5)?.copy_from_slice(b"/stat");
    *path.get_mut(end + 5)? = 0;
    let cpath = core::ffi::CStr::from_bytes_until_nul(&path).ok()?;
    let mut buf = [0u8; 1024];
    parse_stat_identity(read_file(cpath, &mut buf)?)
}

/// The inode of this process's pid namespace: processes that share a ledger of pids must
/// share it too. None when /proc does not say.
pub fn pid_namespace() -> Option<u64> {
    // SAFETY: an all-zero stat is a valid plain C struct; stat only writes it.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and st a valid out-pointer.
    (unsafe { libc::stat(c"/proc/self/ns/pid".as_ptr(), &mut st) } == 0).then_some(st.st_ino as u64)
}

/// Memory pressure stall information (PSI), in hundredths of a percent of wall time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    pub some_avg10: u32,
    pub some_avg60: u32,
    pub full_avg10: u32,
    pub full_avg60: u32,
}

/// "12.34" as 1234; at most two decimals are kept.
fn parse_hundredths(text: &[u8]) -> Option<u32> {
    let mut value: u32 = 0;
    let mut decimals: Option<u32> = None;
    for &b in text {
        match b {
            b'0'..=b'9' => {
                if decimals == Some(2) {
                    continue;
                }
                value = value.checked_mul(10)?.checked_add((b - b'0') as u32)?;
                decimals = decimals.map(|d| d + 1);
            }
            b'.' if decimals.is_none() => decimals = Some(0),
            _ => break,
        }
    }
    for _ in decimals.unwrap_or(0)..2 {
        value = value.checked_mul(10)?;
    }
    Some(value)
}

/// The `name=` field of a PSI line.
fn psi_field(line: &[u8], name: &[u8]) -> Option<u32> {
    line.split(|&b| b == b' ')
        .find_map(|word| word.strip_prefix(name))
        .and_then(parse_hundredths)
}

pub fn parse_pressure(text: &[u8]) -> Option<Pressure> {
    let mut pressure = Pressure::default();
    let mut any = false;
    for line in text.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"some ") {
            pressure.some_avg10 = psi_field(rest, b"avg10=")?;
            pressure.some_avg60 = psi_field(rest, b"avg60=")?;
            any = true;
        } else if let Some(rest) = line.strip_prefix(b"full ") {
            pressure.full_avg10 = psi_field(rest, b"avg10=")?;
            pressure.full_avg60 = psi_field(rest, b"avg60=")?;
        }
    }
    any.then_some(pressure)
}

/// The system's memory pressure; None where the kernel has no PSI (or it is disabled).
pub fn memory_pressure() -> Option<Pressure> {
    let mut buf = [0u8; 512];
    parse_pressure(read_file(c"/proc/pressure/memory", &mut buf)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_identity_reads_state_and_start_past_a_command_with_spaces_and_parens() {
        // (a /proc/<pid>/stat line, expected identity)
        let cases: &[(&[u8], Option<ProcessIdentity>)] = &[
            (
                b"42 (python3) S 1 42 42 0 -1 4194304 100 0 0 0 5 3 0 0 20 0 1 0 987654 1000 10",
                Some(ProcessIdentity {
                    running: true,
                    start_ticks: 987654,
                }),
            ),
            (
                b"43 (a b) (c) Z 1 43 43 0 -1 4194304 100 0 0 0 5 3 0 0 20 0 1 0 123 0 0",
                Some(ProcessIdentity {
                    running: false,
                    start_ticks: 123,
                }),
            ),
            (b"44 (short) R 1 2 3", None),
            (b"garbage", None),
        ];
        for &(text, want) in cases {
            assert_eq!(
                parse_stat_identity(text),
                want,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        let me = process_identity(std::process::id()).expect("this process has a stat file");
        assert!(me.running && me.start_ticks > 0);
    }

    #[test]
    fn meminfo_fields_are_read_in_bytes() {
        let text = b"MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(MemInfo {
                total: 24576000 * 1024,
                available: 20000000 * 1024
            })
        );
        assert_eq!(parse_meminfo(b"MemTotal: 5 kB\n"), None, "no MemAvailable");
    }

    #[test]
    fn status_fields_are_read_and_prefixes_do_not_match() {
        let text = b"VmPeak:\t 999 kB\nVmHWM:\t    1960 kB\nVmRSS:\t    1900 kB\nRssAnonX: 1 kB\nRssAnon:\t     152 kB\n";
        assert_eq!(
            parse_status(text),
            Some(ProcessMemory {
                rss: 1900 * 1024,
                rss_anon: 152 * 1024,
                rss_peak: 1960 * 1024
            })
        );
    }

    #[test]
    fn pressure_lines_parse_to_hundredths() {
        let cases: &[(&[u8], Option<Pressure>)] = &[
            (
                b"some avg10=1.25 avg60=0.50 avg300=0.00 total=10\nfull avg10=12.00 avg60=3.10 avg300=0.00 total=5\n",
                Some(Pressure { some_avg10: 125, some_avg60: 50, full_avg10: 1200, full_avg60: 310 }),
            ),
            (
                b"some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
                Some(Pressure::default()),
            ),
            (b"", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_pressure(text),
                *want,
                "{:?}",
                core::str::from_utf8(text)
            );
        }
    }
}
