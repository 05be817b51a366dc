//! Which hash slots L1 serves with a Redis Cluster upstream.
//!
//! A key may be served from L1 only while the feed of the master that owns
//! its slot is up and has been up since the entry was filled. Each slot
//! has a cell: a generation and whether it is open. Every event that puts
//! the slot's entries in doubt (its master's feed going down or coming up,
//! the slot changing owner) starts a new generation. A fill takes the
//! slot's stamp (cell and slot) with its ticket, is stored only if the cell
//! is still the same, and the entry keeps the stamp; a read serves an entry
//! only while its slot's cell still equals it. So entries of the affected
//! slots become invisible at once, without a scan and without a lock shared
//! with fills, whichever of the fill and the event comes first; the store
//! drops them as its hand passes (as it does expired ones).
//!
//! Generations come from one sequence for all slots, so a cell never
//! returns to an earlier value (50 bits: a billion events a second would
//! take 35 years).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::upstream::cluster::slots::{self, SLOTS};

const SLOT_BITS: u32 = 14;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
const _: () = assert!(SLOTS == 1 << SLOT_BITS);

pub(crate) struct SlotGate {
    /// Per slot: `generation << 1 | open`.
    cells: Box<[AtomicU64]>,
    /// The last generation handed out.
    last: AtomicU64,
}

impl SlotGate {
    /// Every slot closed: nothing is served before its master's feed is up.
    pub fn new() -> SlotGate {
        SlotGate {
            cells: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            last: AtomicU64::new(0),
        }
    }

    /// The stamp a fill of a key in `slot` carries; 0 while the slot is closed.
    pub fn stamp(&self, slot: u16) -> u64 {
        let cell = self.cells[slot as usize].load(Ordering::Acquire);
        if cell & 1 == 0 {
            0
        } else {
            (cell << SLOT_BITS) | u64::from(slot)
        }
    }

    /// [`SlotGate::stamp`] of the key's slot (a CRC16 of its hash tag).
    pub fn stamp_of(&self, key: &[u8]) -> u64 {
        self.stamp(slots::slot(key))
    }

    /// May an entry (or a fill) stamped `stamp` be served (stored)?
    #[inline]
    pub fn current(&self, stamp: u64) -> bool {
        stamp != 0
            && self.cells[(stamp & SLOT_MASK) as usize].load(Ordering::Acquire)
                == stamp >> SLOT_BITS
    }

    /// Starts a new generation of `slot`, open or closed: what was stamped
    /// before is no longer served, and fills in flight are not stored.
    pub fn renew(&self, slot: u16, open: bool) {
        let generation = self.last.fetch_add(1, Ordering::Relaxed) + 1;
        self.cells[slot as usize].store((generation << 1) | u64::from(open), Ordering::Release);
    }

    /// Closes every slot (in doubt: nothing is served until feeds open them).
    pub fn close_all(&self) {
        for s in 0..SLOTS as u16 {
            self.renew(s, false);
        }
    }

    /// Is the slot open?
    #[cfg(test)]
    pub fn is_open(&self, slot: u16) -> bool {
        self.stamp(slot) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_is_current_until_its_slot_is_renewed() {
        let g = SlotGate::new();
        assert_eq!(g.stamp(5), 0, "closed at the start");
        assert!(!g.current(0));
        g.renew(5, true);
        let s = g.stamp(5);
        assert!(g.current(s));
        assert_eq!(g.stamp(6), 0, "another slot stays closed");
        g.renew(6, true);
        assert!(g.current(s), "another slot's renewal does not matter");
        g.renew(5, false);
        assert!(!g.current(s));
        assert_eq!(g.stamp(5), 0);
        g.renew(5, true);
        assert!(
            !g.current(s),
            "reopened: a new generation, the old stamp stays dead"
        );
        assert!(g.current(g.stamp(5)));
        let slot = slots::slot(b"5");
        assert_eq!(g.stamp_of(b"{5}x"), 0);
        g.renew(slot, true);
        assert_eq!(g.stamp_of(b"{5}x") & SLOT_MASK, u64::from(slot));
        g.close_all();
        assert!(!g.current(g.stamp(5)) && !g.is_open(6));
    }
}
