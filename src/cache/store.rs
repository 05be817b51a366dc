//! The L1 store: a sharded hash table bounded by bytes, with CLOCK
//! eviction, TinyLFU admission and per-entry expiry.
//!
//! Why not moka (the first choice): its per-read bookkeeping (a read-op
//! channel, access-order deque moves and a frequency sketch applied in
//! maintenance, a timer wheel for per-entry expiry) touches ~25 cache lines
//! per hit; with 100,000 cached keys a hit cost 2.7 µs, more than Redis
//! answering the GET itself (BENCHMARKS.md has the side-by-side numbers).
//! Here a hit is a hash, a shard read lock, one probe of the table whose
//! slot holds the key and its short replies inline, and on one hit in
//! sixteen a frequency count.
//!
//! - Size: every entry is weighed (key, replies, measured overhead); each
//!   shard holds at most its share of `max_bytes`.
//! - Eviction: CLOCK. Inserting sets a key's place in its shard's ring; a
//!   hit sets the entry's reference bit; the hand skips (and clears)
//!   referenced entries, drops expired ones, and takes the first other.
//! - Admission (TinyLFU): a count-min sketch of 4-bit counters (aged by
//!   halving) counts misses and sampled hits; a new key is admitted into a
//!   full shard only if it is at least as frequent as the entry it would evict,
//!   so a scan of one-off keys cannot wash out the hot set.
//! - Expiry: an entry past its deadline is never served; the hand drops
//!   expired entries as it passes, and every insert moves it two steps, so
//!   they do not linger.
//! - Cluster slots: with a [`SlotGate`], an entry whose hash slot was renewed
//!   since its fill (its stamp is not current) counts as expired.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use hashbrown::HashTable;
use parking_lot::RwLock;
use quanta::Instant;

use super::gate::SlotGate;

/// Fixed cost charged per key on top of its packed bytes: the table slot,
/// the ring slot, the allocation's header and slack. Set from measurement
/// so that `max_bytes` bounds resident memory, not just payload
/// (BENCHMARKS.md: RSS per cached 64-byte GET reply).
pub(super) const ENTRY_OVERHEAD: usize = 300;
/// Cached replies per key; a new one beyond this replaces the oldest.
pub const MAX_VARIANTS: usize = 16;

const SHARDS: usize = 16;
/// One hit in this many (a power of two) is counted in the frequency sketch
/// (each count is a random access into the sketch).
const HIT_SAMPLE: u32 = 16;

/// One key's cached replies, packed into one allocation of exactly their
/// size: `key_len:u16 key` then per reply `proto:u8 sig_len:u16 sig
/// reply_len:u32 reply`, oldest first. A hit reads one contiguous block
/// (typically two cache lines for a 64-byte value); memory per key stays
/// close to its bytes, which on a machine whose memory latency grows with
/// the working set is what keeps a hit cheap at a million keys.
pub(super) struct Packed(smallvec::SmallVec<[u8; PACKED_INLINE]>);

/// Packed bytes kept in the table slot itself: a key and one 64-byte GET
/// reply fit, so a hit reads one contiguous bucket.
const PACKED_INLINE: usize = 104;

impl Packed {
    pub fn new(key: &[u8], proto: u8, sig: &[u8], reply: &[u8]) -> Packed {
        let mut out =
            smallvec::SmallVec::with_capacity(2 + key.len() + 7 + sig.len() + reply.len());
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        put_variant(&mut out, proto, sig, reply);
        Packed(out)
    }

    fn key_end(&self) -> usize {
        2 + u16::from_le_bytes([self.0[0], self.0[1]]) as usize
    }

    pub fn key(&self) -> &[u8] {
        &self.0[2..self.key_end()]
    }

    /// Every reply: (protocol, signature, reply bytes), oldest first.
    pub fn variants(&self) -> impl Iterator<Item = (u8, &[u8], &[u8])> {
        let data = &self.0[..];
        let mut at = self.key_end();
        std::iter::from_fn(move || {
            let proto = *data.get(at)?;
            let sig_len = u16::from_le_bytes([data[at + 1], data[at + 2]]) as usize;
            let sig = &data[at + 3..at + 3 + sig_len];
            let r = at + 3 + sig_len;
            let reply_len =
                u32::from_le_bytes([data[r], data[r + 1], data[r + 2], data[r + 3]]) as usize;
            let reply = &data[r + 4..r + 4 + reply_len];
            at = r + 4 + reply_len;
            Some((proto, sig, reply))
        })
    }

    /// The reply of `sig` in `proto`, if cached.
    pub fn find(&self, sig: &[u8], proto: u8) -> Option<&[u8]> {
        self.variants()
            .find(|(p, s, _)| *p == proto && *s == sig)
            .map(|(_, _, r)| r)
    }

    /// Does it hold replies of another command (or protocol)?
    pub fn has_other_than(&self, sig: &[u8], proto: u8) -> bool {
        self.variants().any(|(p, s, _)| !(p == proto && s == sig))
    }

    /// A copy with the reply of `sig` in `proto` added or replaced (the
    /// oldest goes when it holds [`MAX_VARIANTS`]).
    pub fn with(&self, proto: u8, sig: &[u8], reply: &[u8]) -> Packed {
        let mut out = smallvec::SmallVec::with_capacity(self.0.len() + 7 + sig.len() + reply.len());
        out.extend_from_slice(&self.0[..self.key_end()]);
        let kept: Vec<_> = self
            .variants()
            .filter(|(p, s, _)| !(*p == proto && *s == sig))
            .collect();
        let skip = (kept.len() + 1).saturating_sub(MAX_VARIANTS);
        for (p, s, r) in kept.into_iter().skip(skip) {
            put_variant(&mut out, p, s, r);
        }
        put_variant(&mut out, proto, sig, reply);
        Packed(out)
    }

    fn weight(&self) -> u64 {
        let spilled = if self.0.spilled() { self.0.len() } else { 0 };
        (spilled + ENTRY_OVERHEAD) as u64
    }
}

fn put_variant(
    out: &mut smallvec::SmallVec<[u8; PACKED_INLINE]>,
    proto: u8,
    sig: &[u8],
    reply: &[u8],
) {
    out.push(proto);
    out.extend_from_slice(&(sig.len() as u16).to_le_bytes());
    out.extend_from_slice(sig);
    out.extend_from_slice(&(reply.len() as u32).to_le_bytes());
    out.extend_from_slice(reply);
}

/// A table slot: one key's hash, deadline and use counts, and its packed
/// replies. 40 bytes: the table of 100,000 keys takes 5 MB.
struct Slot {
    hash: u64,
    expires_at: Instant,
    /// Recent hits (halved every ten seconds), for `NEARCACHE HOTKEYS`.
    hits: AtomicU32,
    /// The CLOCK reference bit.
    referenced: AtomicBool,
    /// The fill's hash-slot stamp (cluster; 0 otherwise).
    stamp: u64,
    data: Packed,
}

impl Slot {
    /// Is this the slot of `key` (whose hash is `hash`)? The full hash is
    /// compared first, so a different key is told apart without reading
    /// its packed bytes.
    fn is(&self, hash: u64, key: &[u8]) -> bool {
        self.hash == hash && self.data.key() == key
    }

    fn weight(&self) -> u64 {
        self.data.weight()
    }
}

struct Shard {
    table: HashTable<Slot>,
    /// The CLOCK ring: the hashes of the keys in the order they came in
    /// (a full 64-bit hash names its entry; removed keys stay until the
    /// hand reaches them).
    ring: VecDeque<u64>,
    weight: u64,
}

impl Shard {
    fn find(&self, hash: u64, key: &[u8]) -> Option<&Slot> {
        self.table.find(hash, |e| e.is(hash, key))
    }

    fn remove(&mut self, hash: u64, key: &[u8]) -> Option<Slot> {
        let e = self
            .table
            .find_entry(hash, |e| e.is(hash, key))
            .ok()?
            .remove()
            .0;
        self.weight -= e.weight();
        Some(e)
    }

    /// Moves the hand one step; returns the key it would evict, if any
    /// (`expired_only`: only what has expired, referenced or not).
    fn hand(&mut self, now: Instant, expired_only: bool, gate: Option<&SlotGate>) -> Hand {
        let Some(hash) = self.ring.pop_front() else {
            return Hand::Empty;
        };
        let Ok(slot) = self.table.find_entry(hash, |e| e.hash == hash) else {
            return Hand::Stale;
        };
        let e = slot.get();
        if !live(e, now, gate) {
            self.weight -= slot.remove().0.weight();
            return Hand::Expired;
        }
        if expired_only || e.referenced.swap(false, Ordering::Relaxed) {
            self.ring.push_back(hash);
            return Hand::Kept;
        }
        Hand::Victim(hash)
    }

    /// Removes the entry the hand chose.
    fn evict(&mut self, hash: u64) {
        if let Ok(slot) = self.table.find_entry(hash, |e| e.hash == hash) {
            self.weight -= slot.remove().0.weight();
        }
    }

    /// Rebuilds the ring when removed keys make up most of it.
    fn compact_ring(&mut self) {
        if self.ring.len() > 64 && self.ring.len() > 2 * self.table.len() {
            let table = &self.table;
            self.ring
                .retain(|h| table.find(*h, |e| e.hash == *h).is_some());
        }
    }
}

/// May the entry be served: not expired, and (cluster) its slot not renewed since its fill.
#[inline]
fn live(e: &Slot, now: Instant, gate: Option<&SlotGate>) -> bool {
    e.expires_at > now && gate.is_none_or(|g| g.current(e.stamp))
}

enum Hand {
    Empty,
    Stale,
    Expired,
    Kept,
    Victim(u64),
}

/// What an insert did.
pub(super) enum Inserted {
    Stored,
    /// Not admitted: the entries it would have evicted are used more.
    Rejected,
}

/// A count-min sketch of 4-bit counters: four counters per key in one
/// 64-bit word (one cache line per count), halved every `10 × capacity`
/// counts so that frequencies stay recent.
struct Sketch {
    words: Box<[AtomicU64]>,
    mask: u64,
    counted: AtomicU32,
    reset_at: u32,
}

impl Sketch {
    fn new(capacity: usize) -> Sketch {
        let words = (capacity / 4).max(64).next_power_of_two();
        Sketch {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            mask: words as u64 - 1,
            counted: AtomicU32::new(0),
            reset_at: (capacity.max(64) * 10).min(u32::MAX as usize) as u32,
        }
    }

    /// The word and the four nibble positions of a key.
    fn slots(&self, hash: u64) -> (usize, [u32; 4]) {
        let word = (hash & self.mask) as usize;
        let h = hash >> 32;
        let nibbles = [0, 1, 2, 3].map(|i| (((h >> (i * 8)) & 0x3) as u32 + i as u32 * 4) * 4);
        (word, nibbles)
    }

    fn frequency(&self, hash: u64) -> u8 {
        let (word, nibbles) = self.slots(hash);
        let w = self.words[word].load(Ordering::Relaxed);
        nibbles
            .iter()
            .map(|&n| ((w >> n) & 0xf) as u8)
            .min()
            .unwrap_or(0)
    }

    fn increment(&self, hash: u64) {
        let (word, nibbles) = self.slots(hash);
        let cell = &self.words[word];
        let w = cell.load(Ordering::Relaxed);
        let mut add = 0u64;
        for n in nibbles {
            if (w >> n) & 0xf < 15 {
                add |= 1 << n;
            }
        }
        if add != 0 {
            // Racing increments may be lost or carry into a neighbour: an
            // estimate, as a sketch is.
            cell.fetch_add(add, Ordering::Relaxed);
        }
        if self.counted.fetch_add(1, Ordering::Relaxed) + 1 >= self.reset_at {
            self.counted.store(0, Ordering::Relaxed);
            for c in self.words.iter() {
                let v = c.load(Ordering::Relaxed);
                c.store((v >> 1) & 0x7777_7777_7777_7777, Ordering::Relaxed);
            }
        }
    }
}

pub(super) struct Store {
    shards: Box<[RwLock<Shard>]>,
    /// With a cluster upstream: which slots' entries may be served.
    gate: Option<Arc<SlotGate>>,
    hasher: foldhash::fast::RandomState,
    shard_budget: u64,
    sketch: Sketch,
    hits: AtomicU32,
    pub evictions: AtomicU64,
}

impl Store {
    /// A store of at most `max_bytes`; `typical_entry` sizes the sketch.
    pub fn new(max_bytes: u64, typical_entry: usize, gate: Option<Arc<SlotGate>>) -> Store {
        Store {
            gate,
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        table: HashTable::new(),
                        ring: VecDeque::new(),
                        weight: 0,
                    })
                })
                .collect(),
            hasher: Default::default(),
            shard_budget: (max_bytes / SHARDS as u64).max(1),
            sketch: Sketch::new((max_bytes / typical_entry.max(1) as u64) as usize),
            hits: AtomicU32::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        // The high bits pick the shard; the table uses all of them.
        &self.shards[(hash >> 58) as usize % SHARDS]
    }

    /// Runs `f` on the key's live replies (marking them used); `None` if
    /// the key is not cached or its entry expired.
    pub fn get<R>(&self, key: &[u8], f: impl FnOnce(&Packed) -> Option<R>) -> Option<R> {
        let hash = self.hash(key);
        let shard = self.shard(hash).read();
        let found = shard
            .find(hash, key)
            .filter(|e| live(e, Instant::now(), self.gate.as_deref()))
            .and_then(|e| {
                let r = f(&e.data)?;
                // The entry's line is in cache already: counting costs no miss.
                // (Not a read-modify-write: a lost count under a race is fine.)
                e.hits.store(
                    e.hits.load(Ordering::Relaxed).saturating_add(1),
                    Ordering::Relaxed,
                );
                if !e.referenced.load(Ordering::Relaxed) {
                    e.referenced.store(true, Ordering::Relaxed);
                }
                Some(r)
            });
        drop(shard);
        match found {
            Some(r) => {
                // Mixed with the key, so the sample does not alias with a
                // regular access pattern (every eighth key never counted).
                let n = self.hits.fetch_add(1, Ordering::Relaxed) as u64;
                let mixed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ hash;
                if mixed >> (64 - HIT_SAMPLE.trailing_zeros()) == 0 {
                    self.sketch.increment(hash);
                }
                Some(r)
            }
            None => {
                self.sketch.increment(hash);
                None
            }
        }
    }

    /// Inserts or updates the key's entry under its shard's write lock:
    /// `edit` gets the live entry (an expired one, or one filled under
    /// another slot stamp, counts as absent) and returns its new contents,
    /// or `None` to leave everything as it was. The entry expires at
    /// `expires_at`, or earlier if it already did. A new key may be refused
    /// admission.
    pub fn upsert(
        &self,
        key: &[u8],
        stamp: u64,
        expires_at: Instant,
        edit: impl FnOnce(Option<&Packed>) -> Option<Packed>,
    ) -> Option<Inserted> {
        let hash = self.hash(key);
        let now = Instant::now();
        let mut shard = self.shard(hash).write();
        let shard = &mut *shard;
        // Replies filled under another stamp are never merged with this
        // one: the older ones may have missed invalidations.
        if let Ok(mut slot) = shard.table.find_entry(hash, |e| {
            e.is(hash, key) && e.expires_at > now && e.stamp == stamp
        }) {
            let e = slot.get_mut();
            let data = edit(Some(&e.data))?;
            let before = e.weight();
            e.data = data;
            e.expires_at = e.expires_at.min(expires_at);
            shard.weight = shard.weight - before + e.weight();
            self.make_room(shard, now, None);
            return Some(Inserted::Stored);
        }
        // A dead entry of the key (expired, or of another stamp) goes first.
        shard.remove(hash, key);
        let data = edit(None)?;
        let slot = Slot {
            hash,
            expires_at,
            hits: AtomicU32::new(0),
            referenced: AtomicBool::new(false),
            stamp,
            data,
        };
        let weight = slot.weight();
        if weight > self.shard_budget {
            return Some(Inserted::Rejected);
        }
        // Expired entries leave as inserts come in.
        for _ in 0..2 {
            shard.hand(now, true, self.gate.as_deref());
        }
        if shard.weight + weight > self.shard_budget
            && !self.make_room(shard, now, Some((hash, weight)))
        {
            return Some(Inserted::Rejected);
        }
        shard.weight += weight;
        shard.ring.push_back(hash);
        shard.table.insert_unique(hash, slot, |e| e.hash);
        shard.compact_ring();
        Some(Inserted::Stored)
    }

    /// Evicts until `incoming` more bytes fit. With a candidate key (its
    /// hash and weight), a victim more frequent than the candidate stops
    /// it: the candidate is not admitted (false).
    fn make_room(&self, shard: &mut Shard, now: Instant, candidate: Option<(u64, u64)>) -> bool {
        let incoming = candidate.map_or(0, |(_, w)| w);
        // Each entry is passed at most twice (once to clear its bit).
        let mut steps = 2 * shard.ring.len() + 2;
        while shard.weight + incoming > self.shard_budget && steps > 0 {
            steps -= 1;
            match shard.hand(now, false, self.gate.as_deref()) {
                Hand::Empty => break,
                Hand::Stale | Hand::Kept => {}
                Hand::Expired => {}
                Hand::Victim(hash) => {
                    if let Some((cand, _)) = candidate {
                        if self.sketch.frequency(cand) < self.sketch.frequency(hash) {
                            // The victim is used more: it stays.
                            shard.ring.push_back(hash);
                            return false;
                        }
                    }
                    shard.evict(hash);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::get().cache_evictions_total.inc();
                }
            }
        }
        shard.weight + incoming <= self.shard_budget
    }

    pub fn remove(&self, key: &[u8]) {
        let hash = self.hash(key);
        self.shard(hash).write().remove(hash, key);
    }

    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut s = s.write();
            s.table.clear();
            s.ring.clear();
            s.weight = 0;
        }
    }

    /// The `n` keys with the most recent hits, most first.
    pub fn hottest(&self, n: usize) -> Vec<(Bytes, u64)> {
        let mut top: std::collections::BinaryHeap<std::cmp::Reverse<(u32, Bytes)>> =
            std::collections::BinaryHeap::with_capacity(n + 1);
        let now = Instant::now();
        for shard in self.shards.iter() {
            let shard = shard.read();
            for e in shard.table.iter() {
                let hits = e.hits.load(Ordering::Relaxed);
                if hits == 0 || !live(e, now, self.gate.as_deref()) {
                    continue;
                }
                if top.len() < n || top.peek().is_some_and(|m| hits > m.0 .0) {
                    top.push(std::cmp::Reverse((
                        hits,
                        Bytes::copy_from_slice(e.data.key()),
                    )));
                    if top.len() > n {
                        top.pop();
                    }
                }
            }
        }
        let mut out: Vec<(Bytes, u64)> = top
            .into_iter()
            .map(|std::cmp::Reverse((h, k))| (k, h as u64))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Halves every entry's recent hits, so that "hot" means recent.
    pub fn decay_hits(&self) {
        for shard in self.shards.iter() {
            for e in shard.read().table.iter() {
                let h = e.hits.load(Ordering::Relaxed);
                if h != 0 {
                    e.hits.store(h / 2, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn entries(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.read().table.len() as u64)
            .sum()
    }

    pub fn weighted_size(&self) -> u64 {
        self.shards.iter().map(|s| s.read().weight).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn put(s: &Store, key: &str, ttl: Duration) -> bool {
        let key = key.as_bytes();
        let stored = s.upsert(key, 0, Instant::now() + ttl, |old| {
            Some(match old {
                Some(p) => p.with(2, b"GET", &[b'v'; 64]),
                None => Packed::new(key, 2, b"GET", &[b'v'; 64]),
            })
        });
        matches!(stored, Some(Inserted::Stored))
    }

    fn has(s: &Store, key: &str) -> bool {
        s.get(key.as_bytes(), |e| e.find(b"GET", 2).map(|_| ()))
            .is_some()
    }

    #[test]
    fn packed_replies_round_trip_and_stay_bounded() {
        let p = Packed::new(b"k", 2, b"GET", b"$1\r\na\r\n");
        assert_eq!(p.key(), b"k");
        assert_eq!(p.find(b"GET", 2), Some(&b"$1\r\na\r\n"[..]));
        assert_eq!(p.find(b"GET", 3), None);
        assert!(!p.has_other_than(b"GET", 2));
        let p = p.with(3, b"GET", b"+x\r\n").with(2, b"GET", b"$1\r\nb\r\n");
        assert_eq!(p.find(b"GET", 2), Some(&b"$1\r\nb\r\n"[..]), "replaced");
        assert_eq!(p.variants().count(), 2);
        assert!(p.has_other_than(b"GET", 2));
        let mut q = p;
        for i in 0..MAX_VARIANTS + 3 {
            q = q.with(2, format!("HGET{i}").as_bytes(), b":1\r\n");
        }
        assert_eq!(q.variants().count(), MAX_VARIANTS);
        assert_eq!(q.find(b"GET", 3), None, "the oldest went first");
        assert!(q
            .find(format!("HGET{}", MAX_VARIANTS + 2).as_bytes(), 2)
            .is_some());
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn bounded_by_bytes_and_hot_keys_survive_a_scan() {
        let s = Store::new(16 * 64 * 1024, 512, None);
        for i in 0..200 {
            assert!(put(&s, &format!("hot:{i}"), HOUR));
        }
        // Hits are counted one in HIT_SAMPLE: enough reads that every hot
        // key has been counted a few times (20 rounds left some at zero).
        for _ in 0..100 {
            for i in 0..200 {
                assert!(has(&s, &format!("hot:{i}")));
            }
        }
        // A scan of one-off keys, ten times the capacity.
        for i in 0..100_000 {
            put(&s, &format!("scan:{i}"), HOUR);
        }
        assert!(s.weighted_size() <= 16 * 64 * 1024, "{}", s.weighted_size());
        let survivors = (0..200).filter(|i| has(&s, &format!("hot:{i}"))).count();
        assert!(
            survivors > 150,
            "only {survivors} of 200 hot keys survived the scan"
        );
        assert!(s.evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn expired_entries_are_never_served_and_leave() {
        let s = Store::new(1 << 20, 512, None);
        assert!(put(&s, "k", Duration::from_millis(20)));
        assert!(has(&s, "k"));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!has(&s, "k"));
        // The hand moves in the shard an insert goes to: enough inserts that
        // one lands in k's shard (with 64, none did about once in 60 runs:
        // (15/16)^64; with 256, (15/16)^256 < 1e-7).
        for i in 0..256 {
            put(&s, &format!("other:{i}"), HOUR);
        }
        assert_eq!(
            s.entries(),
            256,
            "the expired entry was dropped by the hand"
        );
        // A new fill of an expired key starts a fresh entry.
        assert!(put(&s, "k", HOUR));
        assert!(has(&s, "k"));
    }

    #[test]
    fn hottest_keys_by_recent_hits() {
        let s = Store::new(1 << 20, 512, None);
        for (key, reads) in [("a", 5), ("b", 20), ("c", 1), ("d", 0)] {
            put(&s, key, HOUR);
            for _ in 0..reads {
                assert!(has(&s, key));
            }
        }
        let top = s.hottest(2);
        assert_eq!(
            top,
            vec![
                (Bytes::from_static(b"b"), 20),
                (Bytes::from_static(b"a"), 5)
            ]
        );
        assert_eq!(s.hottest(10).len(), 3, "keys never hit are not listed");
        s.decay_hits();
        assert_eq!(s.hottest(1), vec![(Bytes::from_static(b"b"), 10)]);
        assert_eq!(s.hottest(10).len(), 2, "one hit halves to none");
    }

    #[test]
    fn entries_of_a_renewed_slot_are_dead_and_never_merged() {
        let gate = Arc::new(SlotGate::new());
        let s = Store::new(1 << 20, 512, Some(gate.clone()));
        gate.renew(7, true);
        gate.renew(8, true);
        let add = |key: &str, stamp: u64, sig: &[u8]| {
            s.upsert(key.as_bytes(), stamp, Instant::now() + HOUR, |old| {
                Some(match old {
                    Some(p) => p.with(2, sig, b"+x\r\n"),
                    None => Packed::new(key.as_bytes(), 2, sig, b"+x\r\n"),
                })
            });
        };
        let seven = gate.stamp(7);
        add("a", seven, b"GET");
        add("b", gate.stamp(8), b"GET");
        assert!(has(&s, "a") && has(&s, "b"));
        gate.renew(7, true);
        assert!(!has(&s, "a"), "filled under the old generation");
        assert!(has(&s, "b"));
        // A fill under the new stamp starts afresh: the old reply is not kept.
        add("a", gate.stamp(7), b"STRLEN");
        assert!(!has(&s, "a"));
        assert!(s.get(b"a", |e| e.find(b"STRLEN", 2).map(|_| ())).is_some());
        // The hand drops dead entries as it passes, as it does expired ones.
        add("c", seven, b"GET");
        for i in 0..256 {
            add(&format!("other:{i}"), gate.stamp(8), b"GET");
        }
        assert_eq!(s.entries(), 258, "c dropped by the hand");
        assert!(s.hottest(10).iter().all(|(k, _)| k != "c"));
    }

    #[test]
    fn remove_and_clear() {
        let s = Store::new(1 << 20, 512, None);
        put(&s, "a", HOUR);
        put(&s, "b", HOUR);
        s.remove(b"a");
        assert!(!has(&s, "a") && has(&s, "b"));
        s.clear();
        assert_eq!((s.entries(), s.weighted_size()), (0, 0));
    }
}
