//! The bookkeeping that keeps L1 from serving a value older than what
//! Redis has: per-key generations, a global epoch, and writes in flight.
//!
//! Each key hashes to a slot with a generation counter. An invalidation
//! bumps the counter and removes the key under the slot's lock; a fill takes
//! a [`Ticket`] (the counter's value) before its request goes upstream and
//! may store its reply (under the same lock) only if the counter still has
//! that value. A flush bumps the epoch the same way. So a reply that raced
//! with any invalidation of its key is never stored, whichever arrives first.
//!
//! Writes in flight: from the moment a write through nearcache is sent until
//! its reply is back, its keys' slots count it. While a slot counts a write,
//! reads of its keys bypass L1 (and single flight) and go upstream behind
//! the write on the writer's own connection, and no fill of those keys is
//! stored: a pipelined `SET k 2; GET k` returns 2 even while other clients
//! are filling k over other connections. Collisions only cost bypasses.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Generation slots.
const SLOTS: usize = 4096;

/// Taken before a fill's request goes upstream; the fill may store its reply
/// only if no invalidation of the key (or flush) happened since.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ticket {
    slot: usize,
    gen: u64,
    epoch: u64,
    /// With a cluster, the key's hash-slot stamp (see [`super::gate`]); 0
    /// with a single Redis, or while the key's slot is closed.
    pub(super) stamp: u64,
}

pub(super) struct Generations {
    gens: Box<[Mutex<u64>]>,
    writes: Box<[AtomicU32]>,
    /// Writes in flight whose keys are unknown (scripts without keys, FLUSHALL).
    writes_all: AtomicU32,
    /// Every write in flight, so the common case (none) costs one load.
    writes_any: AtomicU32,
    epoch: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
}

impl Generations {
    pub fn new() -> Generations {
        Generations {
            gens: (0..SLOTS).map(|_| Mutex::new(0)).collect(),
            writes: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            writes_all: AtomicU32::new(0),
            writes_any: AtomicU32::new(0),
            epoch: AtomicU64::new(0),
            hasher: Default::default(),
        }
    }

    fn slot(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % SLOTS
    }

    pub fn ticket(&self, key: &[u8], stamp: u64) -> Ticket {
        let slot = self.slot(key);
        let gen = *self.gens[slot].lock();
        Ticket {
            slot,
            gen,
            epoch: self.epoch.load(Ordering::Acquire),
            stamp,
        }
    }

    /// Is a write that may change `key` in flight?
    pub fn writing(&self, key: &[u8]) -> bool {
        self.writes_any.load(Ordering::Acquire) != 0
            && (self.writes_all.load(Ordering::Acquire) != 0
                || self.writes[self.slot(key)].load(Ordering::Acquire) != 0)
    }

    /// Runs `store` under the slot's lock if `ticket` is still current and
    /// no write of the key is in flight; returns whether it ran.
    pub fn store_if_current(&self, ticket: Ticket, store: impl FnOnce()) -> bool {
        let gen = self.gens[ticket.slot].lock();
        let current = *gen == ticket.gen
            && self.epoch.load(Ordering::Acquire) == ticket.epoch
            && self.writes_all.load(Ordering::Acquire) == 0
            && self.writes[ticket.slot].load(Ordering::Acquire) == 0;
        if current {
            store();
        }
        current
    }

    /// Bumps the key's generation and runs `remove` under the slot's lock.
    pub fn bump(&self, key: &[u8], remove: impl FnOnce()) {
        let mut gen = self.gens[self.slot(key)].lock();
        *gen += 1;
        remove();
    }

    /// Bumps the epoch; `clear` runs after every fill that read the old
    /// epoch and is storing right now has finished.
    pub fn bump_all(&self, clear: impl FnOnce()) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // A fill that read the old epoch holds its slot lock until its insert
        // is done; passing every lock once orders those inserts before the purge.
        for g in self.gens.iter() {
            drop(g.lock());
        }
        clear();
    }

    pub fn begin_key(&self, key: &[u8]) {
        self.writes_any.fetch_add(1, Ordering::AcqRel);
        self.writes[self.slot(key)].fetch_add(1, Ordering::AcqRel);
    }

    pub fn end_key(&self, key: &[u8]) {
        self.writes[self.slot(key)].fetch_sub(1, Ordering::AcqRel);
        self.writes_any.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn begin_all(&self) {
        self.writes_any.fetch_add(1, Ordering::AcqRel);
        self.writes_all.fetch_add(1, Ordering::AcqRel);
    }

    pub fn end_all(&self) {
        self.writes_all.fetch_sub(1, Ordering::AcqRel);
        self.writes_any.fetch_sub(1, Ordering::AcqRel);
    }
}
