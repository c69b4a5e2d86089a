//! The host pool's effective budget: never more than the budget, lowered when the machine or
//! the memory cgroup runs short or when anonymous memory the ledger cannot see grows. Computed
//! by the monitor from its readings ([`effective_budget`] is pure); remembered here for the
//! dump.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use super::pools::{host, UNLIMITED};

/// Anonymous memory past the ledger that is not held against the budget: thread stacks,
/// jemalloc's metadata and the dirty pages it keeps between purges.
pub const UNSEEN_SLACK_BYTES: u64 = 32 << 20;

static SYSTEM_RESERVE_BYTES: AtomicU64 =
    AtomicU64::new(crate::base::config::DEFAULT_SYSTEM_RESERVE_BYTES);

/// QVSHIM_SYSTEM_RESERVE as applied.
pub fn set_system_reserve_bytes(bytes: u64) {
    SYSTEM_RESERVE_BYTES.store(bytes, Ordering::Relaxed);
}

/// What the machine is left (QVSHIM_SYSTEM_RESERVE).
pub fn system_reserve_bytes() -> u64 {
    SYSTEM_RESERVE_BYTES.load(Ordering::Relaxed)
}

/// Why the host's effective budget is what it is.
pub const REASON_BUDGET: u8 = 0;
pub const REASON_MACHINE: u8 = 1;
pub const REASON_UNSEEN: u8 = 2;

pub fn reason_name(reason: u8) -> &'static str {
    match reason {
        REASON_MACHINE => "machine",
        REASON_UNSEEN => "unseen_anon",
        _ => "budget",
    }
}

/// What the effective budget is computed from.
#[derive(Clone, Copy, Debug, Default)]
pub struct Inputs {
    pub budget: u64,
    /// Bytes the ledger holds for the pool (live plus threads' credit).
    pub committed: u64,
    /// The machine's MemAvailable.
    pub available: Option<u64>,
    /// The memory cgroup's room: the least limit minus usage (v1 or v2) from the process's
    /// cgroup up.
    pub cgroup_room: Option<u64>,
    /// The process's RssAnon.
    pub rss_anon: Option<u64>,
    /// Left to the rest of the machine: taken from MemAvailable.
    pub system_reserve: u64,
    /// Left in the cgroup: taken from its room. The pool's reserve (QVSHIM_RESERVE), what the
    /// process may still commit past its effective budget: so the ledger never takes the cgroup
    /// past its limit. Not the system reserve, which is for the machine: 512 MiB of a 600 MiB
    /// container's room would leave a budget of under 100 MiB.
    pub cgroup_margin: u64,
    /// The machine cap never goes below this (nor above the budget): [`effective_floor_bytes`].
    pub floor: u64,
}

/// The floor of the machine cap: the smallest budget there is ([`MIN_BUDGET_BYTES`]), so that
/// a machine with no room past the system reserve (out of memory, or a reserve set too large
/// for it) leaves the process what an interpreter needs to start and to handle a MemoryError,
/// rather than refusing its start-up. Nothing larger: on a machine that is truly out of memory
/// the cap is doing its job, and 16 MiB more is not what pushes it into swap.
///
/// [`MIN_BUDGET_BYTES`]: crate::base::config::MIN_BUDGET_BYTES
pub fn effective_floor_bytes() -> u64 {
    crate::base::config::MIN_BUDGET_BYTES
}

/// The effective budget and its parts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Effective {
    pub bytes: u64,
    pub reason: u8,
    /// What the process may hold before the machine (or cgroup) is left with only the reserve.
    pub machine_cap: u64,
    /// Anonymous resident memory past the ledger, beyond [`UNSEEN_SLACK_BYTES`].
    pub unseen_anon: u64,
    /// The machine had no room past the system reserve: the cap is what the process holds, or
    /// the floor.
    pub no_room: bool,
}

/// Never more than the budget; lowered to what the process holds plus what the machine can
/// still give (less the system reserve) and what its memory cgroup can still give (less the
/// cgroup margin), but not below the floor, and by the anonymous memory the ledger cannot see.
pub fn effective_budget(i: Inputs) -> Effective {
    let beyond = |room: u64, margin: u64| i.committed.saturating_add(room.saturating_sub(margin));
    let machine_room = i.available.map(|a| beyond(a, i.system_reserve));
    let cgroup_room = i.cgroup_room.map(|c| beyond(c, i.cgroup_margin));
    let no_room = i.available.is_some_and(|a| a <= i.system_reserve);
    let machine_cap = match (machine_room, cgroup_room) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
    .map_or(UNLIMITED, |cap| cap.max(i.floor.min(i.budget)));
    let unseen_anon = i.rss_anon.map_or(0, |anon| {
        anon.saturating_sub(i.committed)
            .saturating_sub(UNSEEN_SLACK_BYTES)
    });
    let anon_cap = if i.budget == UNLIMITED {
        UNLIMITED
    } else {
        i.budget.saturating_sub(unseen_anon)
    };
    let mut e = Effective {
        bytes: i.budget,
        reason: REASON_BUDGET,
        machine_cap,
        unseen_anon,
        no_room,
    };
    if machine_cap < e.bytes {
        e.bytes = machine_cap;
        e.reason = REASON_MACHINE;
    }
    if anon_cap < e.bytes {
        e.bytes = anon_cap;
        e.reason = REASON_UNSEEN;
    }
    e
}

static EFFECTIVE_REASON: AtomicU8 = AtomicU8::new(REASON_BUDGET);
static MACHINE_CAP: AtomicU64 = AtomicU64::new(u64::MAX);
static UNSEEN_ANON: AtomicU64 = AtomicU64::new(0);

/// The host pool's last effective-budget computation, for the dump.
pub fn host_effective() -> Effective {
    Effective {
        bytes: host().effective(),
        reason: EFFECTIVE_REASON.load(Ordering::Relaxed),
        machine_cap: MACHINE_CAP.load(Ordering::Relaxed),
        unseen_anon: UNSEEN_ANON.load(Ordering::Relaxed),
        no_room: NO_ROOM_SAID.load(Ordering::Relaxed),
    }
}

/// Set once the process was told that the machine has no room past the system reserve: said
/// once per process, not at every look.
static NO_ROOM_SAID: AtomicBool = AtomicBool::new(false);

/// Remembers the host's last computation for the dump; returns the reason it had before.
pub fn remember_host(e: &Effective) -> u8 {
    let old_reason = EFFECTIVE_REASON.swap(e.reason, Ordering::Relaxed);
    MACHINE_CAP.store(e.machine_cap, Ordering::Relaxed);
    UNSEEN_ANON.store(e.unseen_anon, Ordering::Relaxed);
    old_reason
}

/// True the first time it is called in the process: the lack of room is said once.
pub fn first_time_no_room() -> bool {
    !NO_ROOM_SAID.swap(true, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    #[test]
    fn effective_budget_follows_the_machine_and_unseen_memory() {
        let base = Inputs {
            budget: 6 * G,
            committed: G,
            available: Some(16 * G),
            cgroup_room: None,
            rss_anon: Some(G),
            system_reserve: 512 * M,
            cgroup_margin: 64 * M,
            floor: 16 * M,
        };
        // (inputs, expected effective bytes, expected reason)
        let cases: &[(Inputs, u64, u8)] = &[
            (base, 6 * G, REASON_BUDGET),
            (
                Inputs {
                    available: Some(2 * G),
                    ..base
                },
                G + 2 * G - 512 * M,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    available: Some(16 * G),
                    cgroup_room: Some(G),
                    ..base
                },
                2 * G - 64 * M,
                REASON_MACHINE,
            ),
            // A 600 MiB cgroup with 100 MiB used (the process holds 50 MiB): the cgroup keeps
            // the pool's reserve, not the machine's 512 MiB.
            (
                Inputs {
                    budget: 408 * M,
                    committed: 50 * M,
                    rss_anon: Some(50 * M),
                    cgroup_room: Some(500 * M),
                    ..base
                },
                408 * M,
                REASON_BUDGET,
            ),
            (
                Inputs {
                    budget: 408 * M,
                    committed: 50 * M,
                    rss_anon: Some(50 * M),
                    cgroup_room: Some(300 * M),
                    ..base
                },
                50 * M + 300 * M - 64 * M,
                REASON_MACHINE,
            ),
            // A full cgroup: the floor, without the machine's line (no_room is the machine's).
            (
                Inputs {
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    cgroup_room: Some(10 * M),
                    ..base
                },
                16 * M,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    available: Some(100 * M),
                    ..base
                },
                G,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    rss_anon: Some(3 * G),
                    ..base
                },
                6 * G - (2 * G - UNSEEN_SLACK_BYTES),
                REASON_UNSEEN,
            ),
            (
                Inputs {
                    rss_anon: Some(G + UNSEEN_SLACK_BYTES),
                    ..base
                },
                6 * G,
                REASON_BUDGET,
            ),
            (
                Inputs {
                    budget: UNLIMITED,
                    available: None,
                    ..base
                },
                UNLIMITED,
                REASON_BUDGET,
            ),
            // A system reserve past the machine's room: held at the floor, not at what the
            // process held at its first look (a few KiB before an interpreter starts).
            (
                Inputs {
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    system_reserve: 100 * G,
                    ..base
                },
                16 * M,
                REASON_MACHINE,
            ),
            (
                Inputs {
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    available: Some(0),
                    ..base
                },
                16 * M,
                REASON_MACHINE,
            ),
            // Above the floor the machine cap is what the process holds: the cap's purpose.
            (
                Inputs {
                    committed: 200 * M,
                    rss_anon: Some(200 * M),
                    available: Some(0),
                    ..base
                },
                200 * M,
                REASON_MACHINE,
            ),
            // Never above the budget, even when the floor is.
            (
                Inputs {
                    budget: 8 * M,
                    committed: 5 * 1024,
                    rss_anon: Some(3 * M),
                    available: Some(0),
                    ..base
                },
                8 * M,
                REASON_BUDGET,
            ),
        ];
        for (inputs, bytes, reason) in cases {
            let e = effective_budget(*inputs);
            assert_eq!(
                (e.bytes, e.reason),
                (*bytes, *reason),
                "inputs {inputs:?} gave {e:?}"
            );
            let room = inputs.available.unwrap_or(u64::MAX);
            assert_eq!(e.no_room, room <= inputs.system_reserve, "{inputs:?}");
        }
    }
}
