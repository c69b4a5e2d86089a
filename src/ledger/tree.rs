//! Tree scope (QVSHIM_SCOPE=tree): one budget for a process and every descendant that runs under
//! the library, kept in a ledger mapped shared between them (docs/TREE.md).
//!
//! The top process (QVSHIM_SCOPE=tree, no QVSHIM_TREE_LEDGER in its environment) creates the
//! ledger in the user's private directory and names it in QVSHIM_TREE_LEDGER, which its children
//! inherit; a process started with both joins it. Each pool's total lives in the ledger: the
//! budget is held against it (see [`super::pools`]), while each thread's credit stays the
//! process's own. Each member process has a record (pid, start time, its share of each pool), so
//! that the share of a process that died without a word (SIGKILL, a crash) is taken back by the
//! next member whose monitor looks ([`reclaim_dead`]).
//!
//! Joining and fork handling run while the process has one thread; [`reclaim_dead`] on the
//! monitor thread. Nothing here runs on the allocation path; nothing allocates.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

use super::pools::{pool, MAX_POOLS};
use crate::base::shared_file;
use crate::base::system;

/// "qvshim tree ledger, layout 1" in the header's first word: written last by the creator, so a
/// joiner never reads a half-made ledger.
const MAGIC: u64 = 0x7176_7472_6565_0001;
/// Member processes with a record at once; a process past them keeps its own budget (one line).
pub const MEMBER_COUNT: usize = 512;

/// A member record's states.
const FREE: u32 = 0;
/// Being filled in by a joining process, or emptied by a reclaiming one: nobody else touches it.
const BUSY: u32 = 1;
const LIVE: u32 = 2;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    /// The size of [`Ledger`]: a library of another layout refuses the ledger.
    size: AtomicU64,
    /// The pid namespace the members' pids are in ([`system::pid_namespace`]).
    pid_namespace: AtomicU64,
    /// The host budget the top process resolved: every member's.
    host_budget: AtomicU64,
    /// Live member records.
    members: AtomicU32,
}

#[repr(C)]
struct Member {
    state: AtomicU32,
    pid: AtomicU32,
    start_ticks: AtomicU64,
    /// This process's share of each pool's total.
    committed: [AtomicU64; MAX_POOLS],
}

/// The shared mapping's layout.
#[repr(C)]
struct Ledger {
    header: CachePadded<Header>,
    totals: [CachePadded<AtomicU64>; MAX_POOLS],
    members: [CachePadded<Member>; MEMBER_COUNT],
}

const LEDGER_BYTES: usize = core::mem::size_of::<Ledger>();

/// The ledger this process is a member of (null: process scope) and its record in it.
static LEDGER: core::sync::atomic::AtomicPtr<Ledger> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());
static MEMBER_INDEX: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

/// The ledger's path, for the exit (the last member removes it) and the dump.
static mut PATH: shared_file::Path = shared_file::Path::new();

fn ledger() -> Option<&'static Ledger> {
    // SAFETY: set once to a mapping of LEDGER_BYTES that is never unmapped.
    unsafe { LEDGER.load(Ordering::Acquire).as_ref() }
}

/// Whether this process shares a tree's budget.
pub fn active() -> bool {
    ledger().is_some()
}

/// The ledger's path (empty in process scope).
pub fn path() -> &'static [u8] {
    // SAFETY: written only at load and in a fork child, while the process has one thread.
    unsafe { (*core::ptr::addr_of!(PATH)).as_bytes() }
}

/// Live members of the tree (0 in process scope).
pub fn members() -> u32 {
    ledger().map_or(0, |l| l.header.members.load(Ordering::Relaxed))
}

/// What became of the attempt to take part in a tree.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Outcome {
    /// Created the ledger: this is the tree's top process, and `path` names the ledger for the
    /// children (the caller puts it into QVSHIM_TREE_LEDGER).
    Created,
    /// Joined the tree of the ledger named in QVSHIM_TREE_LEDGER; the tree's host budget.
    Joined { host_budget: u64 },
    /// Kept its own budget, for this reason (the caller prints one line naming the ledger).
    Refused(&'static str),
}

fn me() -> Option<(u32, u64)> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    Some((pid, system::process_identity(pid)?.start_ticks))
}

/// Takes a free member record for this process and counts its pools' current bytes in it.
fn become_member(l: &'static Ledger) -> Result<(), &'static str> {
    let (pid, start) = me().ok_or("this process's /proc/self/stat cannot be read")?;
    let Some((index, member)) = l.members.iter().enumerate().find(|(_, m)| {
        m.state
            .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }) else {
        return Err("its member records are all taken");
    };
    member.pid.store(pid, Ordering::Relaxed);
    member.start_ticks.store(start, Ordering::Relaxed);
    for counter in member.committed.iter() {
        counter.store(0, Ordering::Relaxed);
    }
    l.header.members.fetch_add(1, Ordering::AcqRel);
    for (index, (total, own)) in l.totals.iter().zip(member.committed.iter()).enumerate() {
        if let Some(p) = pool(index) {
            // SAFETY: both counters are in the mapping, never unmapped.
            unsafe {
                p.join_tree(
                    core::ptr::from_ref::<AtomicU64>(total).cast_mut(),
                    core::ptr::from_ref(own).cast_mut(),
                    core::ptr::from_ref(&l.header.members).cast_mut(),
                )
            };
        }
    }
    MEMBER_INDEX.store(index, Ordering::Relaxed);
    LEDGER.store(core::ptr::from_ref(l).cast_mut(), Ordering::Release);
    member.state.store(LIVE, Ordering::Release);
    Ok(())
}

/// At load, in tree scope. `ledger_path`: QVSHIM_TREE_LEDGER, when the environment names one;
/// `private_dir`: where a new ledger goes; `host_budget`: this process's resolved budget, the
/// tree's when it is the top. Only while the process has one thread.
pub fn take_part(
    ledger_path: Option<&[u8]>,
    private_dir: Option<shared_file::Path>,
    host_budget: u64,
) -> Outcome {
    let Some(ns) = system::pid_namespace() else {
        return Outcome::Refused("/proc/self/ns/pid cannot be read");
    };
    match ledger_path {
        Some(named) => join(named, ns),
        None => create(private_dir, ns, host_budget),
    }
}

fn set_path(p: shared_file::Path) {
    // SAFETY: only while the process has one thread (take_part's contract).
    unsafe { *core::ptr::addr_of_mut!(PATH) = p };
}

fn join(named: &[u8], ns: u64) -> Outcome {
    let Some(p) = shared_file::Path::from_bytes(named) else {
        return Outcome::Refused("not a path");
    };
    if named.first() != Some(&b'/') {
        return Outcome::Refused("not an absolute path");
    }
    let mapped = match shared_file::open(p.as_cstr(), LEDGER_BYTES) {
        Ok(m) => m,
        Err(reason) => return Outcome::Refused(reason),
    };
    // SAFETY: a mapping of at least LEDGER_BYTES, page-aligned, never unmapped; every field is
    // an atomic, for which any bytes are a valid value.
    let l: &'static Ledger = unsafe { &*mapped.cast::<Ledger>() };
    if l.header.magic.load(Ordering::Acquire) != MAGIC
        || l.header.size.load(Ordering::Relaxed) != LEDGER_BYTES as u64
    {
        return Outcome::Refused("not a ledger of this version of the library");
    }
    if l.header.pid_namespace.load(Ordering::Relaxed) != ns {
        return Outcome::Refused("made in another pid namespace");
    }
    // A member with this pid and start time is this process before it called exec: its heap is
    // gone, so is its share.
    if let Some((pid, start)) = me() {
        for m in l.members.iter() {
            if m.state.load(Ordering::Acquire) == LIVE
                && m.pid.load(Ordering::Relaxed) == pid
                && m.start_ticks.load(Ordering::Relaxed) == start
            {
                let _ = take_back(l, m, pid, start);
            }
        }
    }
    if let Err(reason) = become_member(l) {
        return Outcome::Refused(reason);
    }
    set_path(p);
    Outcome::Joined {
        host_budget: l.header.host_budget.load(Ordering::Relaxed),
    }
}

fn create(dir: Option<shared_file::Path>, ns: u64, host_budget: u64) -> Outcome {
    let Some(mut p) = dir else {
        return Outcome::Refused("no private directory for it ($XDG_RUNTIME_DIR or /dev/shm)");
    };
    let (pid, start) = me().unwrap_or((0, 0));
    let named = p
        .push(b"/tree-")
        .and_then(|()| p.push_decimal(pid as u64))
        .and_then(|()| p.push(b"-"))
        .and_then(|()| p.push_decimal(start));
    if named.is_none() {
        return Outcome::Refused("its path is too long");
    }
    let mapped = match shared_file::create(p.as_cstr(), LEDGER_BYTES) {
        Ok(m) => m,
        Err(reason) => return Outcome::Refused(reason),
    };
    // SAFETY: a fresh zeroed mapping of LEDGER_BYTES, never unmapped; all-zero atomics are
    // valid.
    let l: &'static Ledger = unsafe { &*mapped.cast::<Ledger>() };
    l.header.size.store(LEDGER_BYTES as u64, Ordering::Relaxed);
    l.header.pid_namespace.store(ns, Ordering::Relaxed);
    l.header.host_budget.store(host_budget, Ordering::Relaxed);
    l.header.magic.store(MAGIC, Ordering::Release);
    if let Err(reason) = become_member(l) {
        shared_file::remove(p.as_cstr());
        return Outcome::Refused(reason);
    }
    set_path(p);
    Outcome::Created
}

/// Empties member record `m` of process `pid` started at `start_ticks` (gone): its share leaves
/// the tree's totals. Returns the bytes taken back; None when the record is not that process's
/// live record any more (another member took it back first, and perhaps a new process took the
/// record since: it is left alone).
fn take_back(l: &Ledger, m: &Member, pid: u32, start_ticks: u64) -> Option<u64> {
    m.state
        .compare_exchange(LIVE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
        .ok()?;
    if m.pid.load(Ordering::Relaxed) != pid || m.start_ticks.load(Ordering::Relaxed) != start_ticks
    {
        m.state.store(LIVE, Ordering::Release);
        return None;
    }
    let mut taken = 0u64;
    for (total, own) in l.totals.iter().zip(m.committed.iter()) {
        let share = own.swap(0, Ordering::AcqRel);
        if share != 0 {
            total.fetch_sub(share, Ordering::AcqRel);
            taken = taken.wrapping_add(share);
        }
    }
    l.header.members.fetch_sub(1, Ordering::AcqRel);
    m.state.store(FREE, Ordering::Release);
    Some(taken)
}

/// Whether process `pid` started at `start_ticks` is gone: no such pid, a zombie, or a later
/// process that was given the same pid.
fn is_gone(pid: u32, start_ticks: u64) -> bool {
    match system::process_identity(pid) {
        None => {
            // SAFETY: kill with signal 0 only asks whether the pid exists.
            let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
                // SAFETY: __errno_location always returns this thread's valid errno slot.
                || unsafe { *libc::__errno_location() } == libc::EPERM;
            !exists
        }
        Some(id) => !id.running || id.start_ticks != start_ticks,
    }
}

/// Takes back the shares of members that are gone; the bytes taken back. On the monitor thread,
/// each interval; any member may do it for any other (the record's state decides who does).
pub fn reclaim_dead() -> u64 {
    let Some(l) = ledger() else {
        return 0;
    };
    let mine = MEMBER_INDEX.load(Ordering::Relaxed);
    let mut bytes = 0u64;
    for (index, m) in l.members.iter().enumerate() {
        if index == mine || m.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let (pid, start) = (
            m.pid.load(Ordering::Relaxed),
            m.start_ticks.load(Ordering::Relaxed),
        );
        if is_gone(pid, start) {
            bytes = bytes.wrapping_add(take_back(l, m, pid, start).unwrap_or(0));
        }
    }
    bytes
}

/// In a fork child: a new member of the tree, holding what it inherited (its copy of the
/// parent's share). With no free record it keeps its own budget from here on. Before the
/// credits of the threads that did not survive are given back.
pub fn after_fork_child() -> Result<(), &'static str> {
    let Some(l) = ledger() else {
        return Ok(());
    };
    let reason = match become_member(l) {
        Ok(()) => return Ok(()),
        Err(reason) => reason,
    };
    for index in 0..MAX_POOLS {
        if let Some(p) = pool(index) {
            p.leave_tree();
        }
    }
    LEDGER.store(core::ptr::null_mut(), Ordering::Release);
    Err(reason)
}

/// At exit: the last member standing removes the ledger's file. A member that is gone without
/// a word is not counted (its record may still be LIVE until someone's monitor looks).
pub fn at_exit() {
    let Some(l) = ledger() else {
        return;
    };
    let mine = MEMBER_INDEX.load(Ordering::Relaxed);
    let others = l.members.iter().enumerate().any(|(index, m)| {
        index != mine
            && m.state.load(Ordering::Acquire) != FREE
            && !is_gone(
                m.pid.load(Ordering::Relaxed),
                m.start_ticks.load(Ordering::Relaxed),
            )
    });
    if !others {
        // SAFETY: written only while the process had one thread, long before exit.
        shared_file::remove(unsafe { (*core::ptr::addr_of!(PATH)).as_cstr() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_a_gone_process_is_taken_back_and_one_of_a_live_one_is_not() {
        // A ledger in ordinary memory: only the record logic is under test here; the shared
        // mapping and the processes are in shim-tests/test_tree.py.
        let l: &'static Ledger = Box::leak(Box::new(
            // SAFETY: all-zero atomics are valid.
            unsafe { core::mem::zeroed::<Ledger>() },
        ));
        let (pid, start) = me().unwrap();
        // (pid, start ticks, expected to be taken back)
        let cases: &[(u32, u64, bool)] = &[
            (pid, start, false),
            (pid, start + 1, true),
            (u32::MAX - 1, 1, true),
        ];
        for (i, &(pid, start, gone)) in cases.iter().enumerate() {
            let m = &l.members[i + 1];
            m.pid.store(pid, Ordering::Relaxed);
            m.start_ticks.store(start, Ordering::Relaxed);
            m.committed[0].store(100, Ordering::Relaxed);
            m.state.store(LIVE, Ordering::Relaxed);
            l.totals[0].fetch_add(100, Ordering::Relaxed);
            l.header.members.fetch_add(1, Ordering::Relaxed);
            assert_eq!(
                is_gone(pid, start),
                gone,
                "case {i}: pid {pid} start {start}"
            );
            if gone {
                assert_eq!(
                    take_back(l, m, pid, start + 7),
                    None,
                    "a record another process holds now is left alone"
                );
                assert_eq!(m.state.load(Ordering::Relaxed), LIVE);
                assert_eq!(take_back(l, m, pid, start), Some(100));
                assert_eq!(m.state.load(Ordering::Relaxed), FREE);
                assert_eq!(take_back(l, m, pid, start), None, "taken back once");
            }
        }
        assert_eq!(
            l.totals[0].load(Ordering::Relaxed),
            100,
            "one live share stays"
        );
        assert_eq!(l.header.members.load(Ordering::Relaxed), 1);
    }
}
