//! Fixed-size tables from a device pointer, a VMM handle or a pinned host pointer to what its
//! allocation charged (bytes, pool, kind, time), so that the free takes back exactly that.
//!
//! Never allocates, never locks, never panics: open addressing with linear probing over a static
//! array, one CAS to claim or retire a slot. CUDA calls are not as hot as malloc, but they come
//! from many threads (PyTorch's allocator, its streams, the cudaMallocAsync backend on every
//! tensor), and a lock held across a fork or a signal would be worse than the table's rules:
//!
//! * a key is claimed by a CAS from empty/retired to the key, then its record is written; a key
//!   is retired by a CAS from the key to [`RETIRED`], after reading its record. Only the thread
//!   that frees a pointer retires it, and it cannot free what it was not yet given, so a record
//!   is always complete when it is read for a free;
//! * an empty slot never comes back (retired ones are reused), so a search stops at the first
//!   empty slot: the key cannot lie past it;
//! * a search looks at no more than [`PROBE_LIMIT`] slots. An allocation that finds no slot in
//!   that window is not tracked (its charge is given back at once and the miss counted), which at
//!   the sizes chosen takes tens of thousands of live allocations crowded into one window.

use core::sync::atomic::{AtomicU64, Ordering};

/// Key of a slot never used.
const EMPTY: u64 = 0;
/// Key of a slot whose allocation was freed; reusable.
pub const RETIRED: u64 = u64::MAX;
/// Slots a search looks at, at most.
pub const PROBE_LIMIT: usize = 512;

/// Which call made an allocation: shown in the dump's largest-allocations list.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// cuMemAlloc
    Alloc = 0,
    Pitch = 1,
    Managed = 2,
    /// cuMemAllocAsync, cuMemAllocFromPoolAsync (and their _ptsz forms)
    Async = 3,
    /// cuMemCreate: a physical allocation of the VMM API, counted by handle
    Physical = 4,
    /// cuMemHostAlloc, cuMemAllocHost
    PinnedHost = 5,
    /// cuMemHostRegister
    RegisteredHost = 6,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Alloc,
        Kind::Pitch,
        Kind::Managed,
        Kind::Async,
        Kind::Physical,
        Kind::PinnedHost,
        Kind::RegisteredHost,
    ];

    fn from_u8(value: u8) -> Kind {
        Kind::ALL
            .get(value as usize)
            .copied()
            .unwrap_or(Kind::Alloc)
    }

    /// The driver call's name, for the dump.
    pub fn call_name(self) -> &'static str {
        match self {
            Kind::Alloc => "cuMemAlloc",
            Kind::Pitch => "cuMemAllocPitch",
            Kind::Managed => "cuMemAllocManaged",
            Kind::Async => "cuMemAllocAsync",
            Kind::Physical => "cuMemCreate",
            Kind::PinnedHost => "cuMemHostAlloc",
            Kind::RegisteredHost => "cuMemHostRegister",
        }
    }
}

/// What one live allocation charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub bytes: u64,
    /// Ledger pool index the bytes were charged to.
    pub pool: u8,
    pub kind: Kind,
    /// When it was made, in milliseconds of the monotonic clock.
    pub since_ms: u64,
}

impl Record {
    fn pack_meta(&self) -> u64 {
        (self.since_ms << 16) | ((self.kind as u64) << 8) | self.pool as u64
    }

    fn unpack(bytes: u64, meta: u64) -> Record {
        Record {
            bytes,
            pool: meta as u8,
            kind: Kind::from_u8((meta >> 8) as u8),
            since_ms: meta >> 16,
        }
    }
}

struct Slot {
    key: AtomicU64,
    bytes: AtomicU64,
    meta: AtomicU64,
}

/// `SLOTS` must be a power of two.
pub struct Table<const SLOTS: usize> {
    slots: [Slot; SLOTS],
    /// Allocations that found no slot and so are not counted.
    untracked: AtomicU64,
}

impl<const SLOTS: usize> Table<SLOTS> {
    const MASK: usize = {
        assert!(SLOTS.is_power_of_two());
        SLOTS - 1
    };

    pub const fn new() -> Self {
        Table {
            slots: [const {
                Slot {
                    key: AtomicU64::new(EMPTY),
                    bytes: AtomicU64::new(0),
                    meta: AtomicU64::new(0),
                }
            }; SLOTS],
            untracked: AtomicU64::new(0),
        }
    }

    /// Where the search for `key` starts: Fibonacci hashing spreads the aligned addresses and
    /// small handle numbers the driver gives out.
    fn home(key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & Self::MASK
    }

    fn probe(key: u64) -> impl Iterator<Item = usize> {
        let home = Self::home(key);
        (0..PROBE_LIMIT.min(SLOTS)).map(move |i| (home + i) & Self::MASK)
    }

    /// Records a live allocation. False when it cannot be tracked (no free slot nearby, or a
    /// key equal to one of the two markers): the caller gives its charge back.
    pub fn insert(&self, key: u64, record: Record) -> bool {
        if key == EMPTY || key == RETIRED {
            self.untracked.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        for index in Self::probe(key) {
            let Some(slot) = self.slots.get(index) else {
                break;
            };
            let seen = slot.key.load(Ordering::Acquire);
            if (seen == EMPTY || seen == RETIRED)
                && slot
                    .key
                    .compare_exchange(seen, key, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                slot.bytes.store(record.bytes, Ordering::Release);
                slot.meta.store(record.pack_meta(), Ordering::Release);
                return true;
            }
        }
        self.untracked.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Takes out the record of `key`; None when it was never tracked.
    pub fn remove(&self, key: u64) -> Option<Record> {
        if key == EMPTY || key == RETIRED {
            return None;
        }
        for index in Self::probe(key) {
            let slot = self.slots.get(index)?;
            let seen = slot.key.load(Ordering::Acquire);
            if seen == EMPTY {
                return None;
            }
            if seen == key {
                let record = Record::unpack(
                    slot.bytes.load(Ordering::Acquire),
                    slot.meta.load(Ordering::Acquire),
                );
                if slot
                    .key
                    .compare_exchange(key, RETIRED, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(record);
                }
            }
        }
        None
    }

    /// Calls `visit` with every live allocation. A record being written at that moment may be
    /// seen with its previous occupant's figures: good enough for a diagnostic list.
    pub fn for_each(&self, mut visit: impl FnMut(u64, Record)) {
        for slot in self.slots.iter() {
            let key = slot.key.load(Ordering::Acquire);
            if key != EMPTY && key != RETIRED {
                let record = Record::unpack(
                    slot.bytes.load(Ordering::Acquire),
                    slot.meta.load(Ordering::Acquire),
                );
                visit(key, record);
            }
        }
    }

    pub fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }
}

impl<const SLOTS: usize> Default for Table<SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(bytes: u64) -> Record {
        Record {
            bytes,
            pool: 1,
            kind: Kind::Async,
            since_ms: 123_456,
        }
    }

    #[test]
    fn removed_record_is_what_was_inserted() {
        let table: Box<Table<64>> = Box::default();
        assert!(table.insert(0x7f00_0000_0000, record(4096)));
        assert_eq!(table.remove(0x7f00_0000_0000), Some(record(4096)));
        assert_eq!(table.remove(0x7f00_0000_0000), None, "a key frees once");
    }

    #[test]
    fn unknown_and_marker_keys_are_not_found() {
        let table: Box<Table<64>> = Box::default();
        assert_eq!(table.remove(42), None);
        assert!(!table.insert(EMPTY, record(1)));
        assert!(!table.insert(RETIRED, record(1)));
        assert_eq!(table.untracked(), 2);
    }

    #[test]
    fn full_table_refuses_to_track_and_counts_it() {
        let table: Box<Table<16>> = Box::default();
        for key in 1..=16u64 {
            assert!(table.insert(key << 21, record(key)), "key {key} fits");
        }
        assert!(!table.insert(17 << 21, record(17)));
        assert_eq!(table.untracked(), 1);
        for key in 1..=16u64 {
            assert_eq!(table.remove(key << 21).map(|r| r.bytes), Some(key));
        }
        assert!(
            table.insert(17 << 21, record(17)),
            "retired slots are reused"
        );
    }

    #[test]
    fn colliding_keys_survive_removal_of_their_neighbours() {
        let table: Box<Table<1024>> = Box::default();
        let keys: Vec<u64> = (1..=300u64).map(|i| i * 512).collect();
        for &key in &keys {
            assert!(table.insert(key, record(key)));
        }
        for &key in keys.iter().step_by(2) {
            assert_eq!(table.remove(key).map(|r| r.bytes), Some(key));
        }
        for &key in keys.iter().skip(1).step_by(2) {
            assert_eq!(
                table.remove(key).map(|r| r.bytes),
                Some(key),
                "key {key:#x}"
            );
        }
        let mut live = 0;
        table.for_each(|_, _| live += 1);
        assert_eq!(live, 0);
    }

    #[test]
    fn threads_inserting_and_removing_lose_nothing() {
        let table: &'static Table<4096> = Box::leak(Box::default());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                std::thread::spawn(move || {
                    for round in 0..2000u64 {
                        let key = ((t << 32) | (round % 97 + 1)) << 9;
                        assert!(table.insert(key, record(round)));
                        assert_eq!(table.remove(key).map(|r| r.bytes), Some(round));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let mut live = 0;
        table.for_each(|_, _| live += 1);
        assert_eq!(live, 0, "every insert was matched by its remove");
    }
}
