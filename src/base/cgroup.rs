//! The process's memory cgroup: its limit, usage and room (v1 or v2), read from /proc and /sys
//! into stack buffers (no allocation), so it can run at load time.
//!
//! The process's cgroup directories are found once, at load ([`find_cgroups`]): its path in
//! each hierarchy from /proc/self/cgroup (v1: the line whose controllers include `memory`; v2:
//! the `0::` line), joined to where that hierarchy is mounted, from /proc/self/mountinfo (v1:
//! a `cgroup` mount with the `memory` option; v2: a `cgroup2` mount), less the mount's own root
//! (a container sees its own cgroup as the mount's root). A hybrid system has both: the limit is
//! wherever a memory limit file is. Every directory from the process's own up to the mount is
//! read, since a limit set on a parent (a pod, a slice) binds its children: the limit is the
//! smallest, the room the smallest of limit minus usage. v1 writes "no limit" as a huge number
//! (9223372036854771712 with 4 KiB pages); anything from 2^62 bytes up counts as none.
//!
//! One concern, over 500 lines with its tests: finding and reading the memory cgroup, each
//! parser next to its table of real /proc/self/cgroup and mountinfo samples (v1, v2, hybrid,
//! nested limits), which are more than a third of the file.

use core::sync::atomic::{AtomicU8, Ordering};

use super::system::{parse_u64, read_file};

/// The memory cgroup's limit when it is below `physical` bytes (a limit above the machine's
/// memory limits nothing).
pub fn cgroup_limit_below(physical: u64) -> Option<u64> {
    cgroup_memory()
        .map(|m| m.limit)
        .filter(|&limit| physical == 0 || limit < physical)
}

// ---------------------------------------------------------------------------------------------
// Memory cgroups.

/// Cgroup directory paths longer than this are not followed.
pub const CGROUP_PATH_MAX_BYTES: usize = 512;
/// A cgroup v1 limit from this many bytes up means "no limit" (the kernel writes
/// LONG_MAX rounded down to a page).
pub const CGROUP_UNLIMITED_MIN_BYTES: u64 = 1 << 62;
/// mountinfo is read in pieces of this size; a line longer than it (an overlay mount with many
/// layers) is skipped, and no cgroup mount line is that long.
const MOUNTINFO_CHUNK_BYTES: usize = 8192;

/// A path in a fixed buffer, without NUL.
#[derive(Clone, Copy)]
pub struct FixedPath {
    bytes: [u8; CGROUP_PATH_MAX_BYTES],
    len: usize,
}

impl FixedPath {
    pub const fn new() -> Self {
        FixedPath {
            bytes: [0; CGROUP_PATH_MAX_BYTES],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }

    /// Appends `part`; false (and the path unchanged) when it does not fit with a NUL after it.
    fn push(&mut self, part: &[u8]) -> bool {
        let end = self.len + part.len();
        match self.bytes.get_mut(self.len..end) {
            Some(dst) if end < CGROUP_PATH_MAX_BYTES => {
                dst.copy_from_slice(part);
                self.len = end;
                true
            }
            _ => false,
        }
    }

    fn from(part: &[u8]) -> Option<Self> {
        let mut p = FixedPath::new();
        p.push(part).then_some(p)
    }
}

impl Default for FixedPath {
    fn default() -> Self {
        FixedPath::new()
    }
}

/// Which hierarchy a cgroup directory belongs to: the files differ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CgroupVersion {
    /// memory.limit_in_bytes, memory.usage_in_bytes
    V1,
    /// memory.max, memory.current
    V2,
}

/// The process's own memory cgroup directory in one hierarchy, and where that hierarchy's
/// mount starts (directories above it are not visible).
#[derive(Clone, Copy)]
pub struct CgroupDir {
    pub version: CgroupVersion,
    pub dir: FixedPath,
    pub mount_len: usize,
}

/// The lines of /proc/self/cgroup that matter: the path of the v1 memory controller's cgroup
/// and of the v2 cgroup, each relative to its hierarchy's root.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcCgroup<'a> {
    pub v1_memory: Option<&'a [u8]>,
    pub v2: Option<&'a [u8]>,
}

/// Parses /proc/self/cgroup: `id:controllers:path` lines; v2 is `0::path`.
pub fn parse_proc_cgroup(text: &[u8]) -> ProcCgroup<'_> {
    let mut found = ProcCgroup::default();
    for line in text.split(|&b| b == b'\n') {
        let mut parts = line.splitn(3, |&b| b == b':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !path.starts_with(b"/") {
            continue;
        }
        if id == b"0" && controllers.is_empty() {
            found.v2.get_or_insert(path);
        } else if controllers.split(|&b| b == b',').any(|c| c == b"memory") {
            found.v1_memory.get_or_insert(path);
        }
    }
    found
}

/// One mount of /proc/self/mountinfo: the root of the mount within its filesystem, where it is
/// mounted, the filesystem type and its super options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mount<'a> {
    pub root: &'a [u8],
    pub point: &'a [u8],
    pub fstype: &'a [u8],
    pub super_options: &'a [u8],
}

/// Parses one mountinfo line: `id parent major:minor root point options [optional...] - fstype
/// source super_options`.
pub fn parse_mountinfo_line(line: &[u8]) -> Option<Mount<'_>> {
    let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let root = words.nth(3)?;
    let point = words.next()?;
    let mut words = words.skip_while(|w| *w != b"-");
    words.next()?;
    let fstype = words.next()?;
    let _source = words.next()?;
    let super_options = words.next().unwrap_or(&[]);
    Some(Mount {
        root,
        point,
        fstype,
        super_options,
    })
}

/// The hierarchy `mount` holds, if it is one that limits memory.
pub fn memory_hierarchy(mount: &Mount) -> Option<CgroupVersion> {
    if mount.fstype == b"cgroup2" {
        Some(CgroupVersion::V2)
    } else if mount.fstype == b"cgroup"
        && mount
            .super_options
            .split(|&b| b == b',')
            .any(|o| o == b"memory")
    {
        Some(CgroupVersion::V1)
    } else {
        None
    }
}

/// The directory of the cgroup at `path` (from /proc/self/cgroup) under `mount`: the mount point
/// plus the path less the mount's root. When the path is not under the mount's root (a cgroup
/// namespace the mount does not match) the mount point itself is the best guess.
pub fn cgroup_dir(mount: &Mount, path: &[u8]) -> Option<CgroupDir> {
    let version = memory_hierarchy(mount)?;
    let rest = if mount.root == b"/" {
        path
    } else {
        match path.strip_prefix(mount.root) {
            Some(rest) if rest.is_empty() || rest.starts_with(b"/") => rest,
            _ => &[],
        }
    };
    let point = mount.point.strip_suffix(b"/").unwrap_or(mount.point);
    let mut dir = FixedPath::from(point)?;
    let mount_len = dir.len;
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    if !dir.push(rest) || rest.contains(&b'\\') || point.contains(&b'\\') {
        // An escaped character (a space as \040) in a path: not followed.
        return None;
    }
    Some(CgroupDir {
        version,
        dir,
        mount_len,
    })
}

/// The process's memory cgroup directories, as found by [`find_cgroups`].
#[derive(Clone, Copy, Default)]
pub struct Cgroups {
    pub v1: Option<CgroupDir>,
    pub v2: Option<CgroupDir>,
}

/// Finds the process's v1 memory and v2 cgroup directories from /proc/self/cgroup and
/// /proc/self/mountinfo.
pub fn find_cgroups_now() -> Cgroups {
    let mut buf = [0u8; 4096];
    let Some(text) = read_file(c"/proc/self/cgroup", &mut buf) else {
        return Cgroups::default();
    };
    let paths = parse_proc_cgroup(text);
    let mut found = Cgroups::default();
    for_each_line(c"/proc/self/mountinfo", |line| {
        let Some(mount) = parse_mountinfo_line(line) else {
            return;
        };
        match memory_hierarchy(&mount) {
            Some(CgroupVersion::V1) if found.v1.is_none() => {
                found.v1 = paths.v1_memory.and_then(|p| cgroup_dir(&mount, p));
            }
            Some(CgroupVersion::V2) if found.v2.is_none() => {
                found.v2 = paths.v2.and_then(|p| cgroup_dir(&mount, p));
            }
            _ => {}
        }
    });
    found
}

/// Calls `f` with each line of a file read in [`MOUNTINFO_CHUNK_BYTES`] pieces; lines longer
/// than a piece are skipped.
fn for_each_line(path: &core::ffi::CStr, mut f: impl FnMut(&[u8])) {
    // SAFETY: path is NUL-terminated; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; MOUNTINFO_CHUNK_BYTES];
    let mut kept = 0;
    let mut skipping = false;
    while let Some(rest) = buf.get_mut(kept..) {
        // SAFETY: rest is a valid writable slice.
        let n = unsafe { libc::read(fd, rest.as_mut_ptr().cast(), rest.len()) };
        if n <= 0 {
            break;
        }
        let filled = kept + n as usize;
        let mut start = 0;
        while let Some(at) = buf
            .get(start..filled)
            .and_then(|b| b.iter().position(|&c| c == b'\n'))
        {
            if !skipping {
                f(buf.get(start..start + at).unwrap_or(&[]));
            }
            skipping = false;
            start += at + 1;
        }
        if start == 0 && filled == buf.len() {
            // One line fills the buffer: drop it up to its end.
            skipping = true;
            kept = 0;
        } else {
            buf.copy_within(start..filled, 0);
            kept = filled - start;
        }
    }
    if kept > 0 && !skipping {
        f(buf.get(..kept).unwrap_or(&[]));
    }
    // SAFETY: fd was opened above.
    unsafe { libc::close(fd) };
}

/// A memory limit file's value: None for "max", a missing value, or a v1 "unlimited".
pub fn parse_limit(text: &[u8]) -> Option<u64> {
    parse_u64(text).filter(|&v| v < CGROUP_UNLIMITED_MIN_BYTES)
}

/// What the memory cgroups say: the tightest limit, the usage of the cgroup that has it, and
/// the least room (limit minus usage) of any limited cgroup from the process's up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CgroupMemory {
    pub limit: u64,
    pub usage: u64,
    pub room: u64,
}

/// Folds one cgroup level's limit and usage into what is known so far.
pub fn tighter(
    known: Option<CgroupMemory>,
    limit: Option<u64>,
    usage: u64,
) -> Option<CgroupMemory> {
    let Some(limit) = limit else {
        return known;
    };
    let here = CgroupMemory {
        limit,
        usage,
        room: limit.saturating_sub(usage),
    };
    Some(match known {
        None => here,
        Some(k) => CgroupMemory {
            limit: k.limit.min(limit),
            usage: if limit < k.limit { usage } else { k.usage },
            room: k.room.min(here.room),
        },
    })
}

/// Reads one file of a cgroup directory as a number (a limit: [`parse_limit`]).
fn read_cgroup_file(dir: &[u8], file: &[u8], limit: bool) -> Option<u64> {
    let mut path = FixedPath::from(dir)?;
    if !path.push(file) {
        return None;
    }
    let cpath = core::ffi::CStr::from_bytes_until_nul(path.bytes.get(..=path.len)?).ok()?;
    let mut buf = [0u8; 64];
    let text = read_file(cpath, &mut buf)?;
    if limit {
        parse_limit(text)
    } else {
        parse_u64(text)
    }
}

/// Walks one hierarchy from the process's cgroup up to the mount, folding in each limit.
fn read_hierarchy(cg: &CgroupDir, mut known: Option<CgroupMemory>) -> Option<CgroupMemory> {
    let (limit_file, usage_file): (&[u8], &[u8]) = match cg.version {
        CgroupVersion::V1 => (b"/memory.limit_in_bytes", b"/memory.usage_in_bytes"),
        CgroupVersion::V2 => (b"/memory.max", b"/memory.current"),
    };
    let whole = cg.dir.as_bytes();
    let mut len = whole.len();
    loop {
        let dir = whole.get(..len)?;
        if let Some(limit) = read_cgroup_file(dir, limit_file, true) {
            let usage = read_cgroup_file(dir, usage_file, false).unwrap_or(0);
            known = tighter(known, Some(limit), usage);
        }
        if len <= cg.mount_len {
            return known;
        }
        len = dir
            .iter()
            .rposition(|&b| b == b'/')
            .unwrap_or(0)
            .max(cg.mount_len);
    }
}

/// [`CGROUPS`]' state: nobody has written it, one thread is writing it, it is written for good.
const CGROUPS_UNSET: u8 = 0;
const CGROUPS_WRITING: u8 = 1;
const CGROUPS_READY: u8 = 2;
static CGROUPS_STATE: AtomicU8 = AtomicU8::new(CGROUPS_UNSET);

/// Written once, by the one thread that moved [`CGROUPS_STATE`] from unset to writing; read only
/// once it is ready.
struct CgroupsCell(core::cell::UnsafeCell<Cgroups>);
// SAFETY: only the thread that won the unset -> writing exchange writes the cell, before it
// publishes ready (Release); readers read it only after they see ready (Acquire); it is never
// written again.
unsafe impl Sync for CgroupsCell {}

static CGROUPS: CgroupsCell =
    CgroupsCell(core::cell::UnsafeCell::new(Cgroups { v1: None, v2: None }));

/// Finds the process's memory cgroups, once: from the library's constructor, so the monitor
/// does not read mountinfo at every look. Later calls change nothing.
pub fn find_cgroups() {
    if CGROUPS_STATE
        .compare_exchange(
            CGROUPS_UNSET,
            CGROUPS_WRITING,
            Ordering::Acquire,
            Ordering::Relaxed,
        )
        .is_err()
    {
        return;
    }
    let found = find_cgroups_now();
    // SAFETY: this thread alone moved the state to writing; nobody reads the cell before it is
    // ready.
    unsafe { *CGROUPS.0.get() = found };
    CGROUPS_STATE.store(CGROUPS_READY, Ordering::Release);
}

fn cgroups() -> Cgroups {
    if CGROUPS_STATE.load(Ordering::Acquire) == CGROUPS_READY {
        // SAFETY: ready: written for good by find_cgroups.
        unsafe { *CGROUPS.0.get() }
    } else {
        find_cgroups_now()
    }
}

/// The memory cgroups' limit, usage and room now; None without a limited memory cgroup.
pub fn cgroup_memory() -> Option<CgroupMemory> {
    let cg = cgroups();
    let known = cg.v1.as_ref().and_then(|d| read_hierarchy(d, None));
    match cg.v2.as_ref() {
        Some(d) => read_hierarchy(d, known),
        None => known,
    }
}

/// The tightest memory cgroup limit of the process (v1 or v2).
pub fn cgroup_memory_max() -> Option<u64> {
    cgroup_memory().map(|m| m.limit)
}

/// The usage of the cgroup whose limit is the tightest (v1 memory.usage_in_bytes or v2
/// memory.current).
pub fn cgroup_memory_current() -> Option<u64> {
    cgroup_memory().map(|m| m.usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_CGROUP: &[u8] = b"12:pids:/user.slice\n11:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n";
    const V2_CGROUP: &[u8] = b"0::/user.slice/user-1000.slice/session-2.scope\n";
    const HYBRID_CGROUP: &[u8] = b"9:name=systemd:/\n4:memory:/process_api/0f4d\n0::/\n";
    const V1_MOUNTINFO: &[u8] = b"\
22 1 0:20 / / rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u\n\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n\
35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid master:1 - cgroup cgroup rw,memory\n";
    const V2_MOUNTINFO: &[u8] = b"\
25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
    const HYBRID_MOUNTINFO: &[u8] = b"\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn proc_cgroup_names_the_v1_memory_and_v2_paths() {
        // (/proc/self/cgroup, the v1 memory path, the v2 path)
        type Row<'a> = (&'a [u8], Option<&'a [u8]>, Option<&'a [u8]>);
        let cases: &[Row] = &[
            (V1_CGROUP, Some(b"/docker/abc"), None),
            (
                V2_CGROUP,
                None,
                Some(b"/user.slice/user-1000.slice/session-2.scope"),
            ),
            (HYBRID_CGROUP, Some(b"/process_api/0f4d"), Some(b"/")),
            (b"3:cpu,memory,blkio:/a/b:c\n", Some(b"/a/b:c"), None),
            (b"5:memoryx:/a\n6:name=memory:/b\n", None, None),
            (b"", None, None),
            (b"garbage\n0::relative\n", None, None),
        ];
        for &(text, v1, v2) in cases {
            let found = parse_proc_cgroup(text);
            assert_eq!(
                (found.v1_memory, found.v2),
                (v1, v2),
                "{:?}",
                core::str::from_utf8(text)
            );
        }
    }

    fn dir_of(mountinfo: &[u8], cgroup: &[u8], want: CgroupVersion) -> Option<(String, String)> {
        let paths = parse_proc_cgroup(cgroup);
        mountinfo
            .split(|&b| b == b'\n')
            .filter_map(parse_mountinfo_line)
            .filter(|m| memory_hierarchy(m) == Some(want))
            .find_map(|m| {
                let path = match want {
                    CgroupVersion::V1 => paths.v1_memory,
                    CgroupVersion::V2 => paths.v2,
                }?;
                cgroup_dir(&m, path)
            })
            .map(|d| {
                let all = String::from_utf8_lossy(d.dir.as_bytes()).into_owned();
                let mount = all[..d.mount_len].to_string();
                (all, mount)
            })
    }

    #[test]
    fn cgroup_directories_join_the_mount_and_the_path() {
        use CgroupVersion::*;
        let nested_v2 = b"0::/kubepods/pod1/ctr2\n";
        let ns_v2 = b"40 30 0:22 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let outside_ns = b"40 30 0:22 /other /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let trailing = b"40 30 0:22 / /sys/fs/cgroup/ rw - cgroup2 cgroup2 rw\n";
        let escaped = b"40 30 0:22 / /my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        // (mountinfo, /proc/self/cgroup, hierarchy, (directory, mount point))
        type Row<'a> = (
            &'a [u8],
            &'a [u8],
            CgroupVersion,
            Option<(&'a str, &'a str)>,
        );
        let cases: &[Row] = &[
            // A container without a cgroup namespace: the mount's root is its own cgroup.
            (
                V1_MOUNTINFO,
                V1_CGROUP,
                V1,
                Some(("/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory")),
            ),
            (V1_MOUNTINFO, V1_CGROUP, V2, None),
            (
                V2_MOUNTINFO,
                V2_CGROUP,
                V2,
                Some((
                    "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope",
                    "/sys/fs/cgroup",
                )),
            ),
            (V2_MOUNTINFO, V2_CGROUP, V1, None),
            (
                HYBRID_MOUNTINFO,
                HYBRID_CGROUP,
                V1,
                Some((
                    "/sys/fs/cgroup/memory/process_api/0f4d",
                    "/sys/fs/cgroup/memory",
                )),
            ),
            (
                HYBRID_MOUNTINFO,
                HYBRID_CGROUP,
                V2,
                Some(("/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified")),
            ),
            (
                V2_MOUNTINFO,
                nested_v2,
                V2,
                Some(("/sys/fs/cgroup/kubepods/pod1/ctr2", "/sys/fs/cgroup")),
            ),
            (
                ns_v2,
                nested_v2,
                V2,
                Some(("/sys/fs/cgroup/ctr2", "/sys/fs/cgroup")),
            ),
            (
                outside_ns,
                nested_v2,
                V2,
                Some(("/sys/fs/cgroup", "/sys/fs/cgroup")),
            ),
            (
                trailing,
                V2_CGROUP,
                V2,
                Some((
                    "/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope",
                    "/sys/fs/cgroup",
                )),
            ),
            (escaped, V2_CGROUP, V2, None),
            (b"", V2_CGROUP, V2, None),
        ];
        for &(mountinfo, cgroup, version, want) in cases {
            let got = dir_of(mountinfo, cgroup, version);
            let want = want.map(|(d, m)| (d.to_string(), m.to_string()));
            assert_eq!(
                got,
                want,
                "{version:?} of {:?} under {:?}",
                core::str::from_utf8(cgroup),
                core::str::from_utf8(mountinfo)
            );
        }
    }

    #[test]
    fn mountinfo_lines_split_around_the_optional_fields() {
        let line = b"35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid shared:1 master:2 - cgroup cgroup rw,memory";
        assert_eq!(
            parse_mountinfo_line(line),
            Some(Mount {
                root: b"/docker/abc",
                point: b"/sys/fs/cgroup/memory",
                fstype: b"cgroup",
                super_options: b"rw,memory",
            })
        );
        assert_eq!(
            parse_mountinfo_line(b"35 31 0:32 / /x rw"),
            None,
            "no separator"
        );
        assert_eq!(parse_mountinfo_line(b""), None);
    }

    #[test]
    fn limits_read_max_and_v1_unlimited_as_none() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"629145600\n", Some(600 << 20)),
            (b"max\n", None),
            (b"9223372036854771712\n", None),
            (b"9223372036854710272\n", None), // 64 KiB pages
            (b"4611686018427387903\n", Some((1 << 62) - 1)),
            (b"4611686018427387904\n", None),
            (b"18446744073709551615\n", None),
            (b"99999999999999999999999\n", None),
            (b"", None),
            (b"0\n", Some(0)),
        ];
        for &(text, want) in cases {
            assert_eq!(parse_limit(text), want, "{:?}", core::str::from_utf8(text));
        }
    }

    #[test]
    fn nested_limits_fold_to_the_tightest_limit_and_the_least_room() {
        const M: u64 = 1 << 20;
        // Levels from the process's cgroup up: (limit, usage); then the expected fold.
        type Row = (&'static [(Option<u64>, u64)], Option<CgroupMemory>);
        let cases: &[Row] = &[
            (&[(None, 5 * M), (None, 9 * M)], None),
            (
                &[(Some(600 * M), 100 * M), (None, 900 * M)],
                Some(CgroupMemory {
                    limit: 600 * M,
                    usage: 100 * M,
                    room: 500 * M,
                }),
            ),
            // The parent's limit is higher, but its siblings leave less room.
            (
                &[(Some(600 * M), 100 * M), (Some(1000 * M), 800 * M)],
                Some(CgroupMemory {
                    limit: 600 * M,
                    usage: 100 * M,
                    room: 200 * M,
                }),
            ),
            // A parent (a pod) with the tighter limit.
            (
                &[(None, 100 * M), (Some(300 * M), 250 * M)],
                Some(CgroupMemory {
                    limit: 300 * M,
                    usage: 250 * M,
                    room: 50 * M,
                }),
            ),
            (
                &[(Some(100 * M), 150 * M)],
                Some(CgroupMemory {
                    limit: 100 * M,
                    usage: 150 * M,
                    room: 0,
                }),
            ),
        ];
        for (levels, want) in cases {
            let got = levels
                .iter()
                .fold(None, |known, &(limit, usage)| tighter(known, limit, usage));
            assert_eq!(got, *want, "{levels:?}");
        }
    }

    #[test]
    fn long_mountinfo_lines_are_skipped_whole() {
        let path = std::env::temp_dir().join(format!("qvshim-mountinfo-{}", std::process::id()));
        let long = "x".repeat(MOUNTINFO_CHUNK_BYTES * 2 + 17);
        let text = format!(
            "first\n{long}\nsecond\n{}\nlast",
            "y".repeat(MOUNTINFO_CHUNK_BYTES - 10)
        );
        std::fs::write(&path, text).unwrap();
        let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let mut lines = Vec::new();
        for_each_line(&cpath, |l| {
            lines.push(String::from_utf8_lossy(l).into_owned())
        });
        std::fs::remove_file(&path).unwrap();
        let lens: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        assert_eq!(
            lens,
            [5, 6, MOUNTINFO_CHUNK_BYTES - 10, 4],
            "{:?}",
            &lines
                .iter()
                .map(|l| &l[..l.len().min(10)])
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_file_that_ends_with_a_newline_has_no_empty_last_line() {
        let path = std::env::temp_dir().join(format!("qvshim-lines-{}", std::process::id()));
        std::fs::write(&path, "one\ntwo\n").unwrap();
        let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        let mut lines = Vec::new();
        for_each_line(&cpath, |l| {
            lines.push(String::from_utf8_lossy(l).into_owned())
        });
        std::fs::remove_file(&path).unwrap();
        assert_eq!(lines, ["one", "two"]);
    }
}
