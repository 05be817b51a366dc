//! L1: the in-process store shared by every client of this nearcache, its key
//! policies, the invalidation rules and single flight.
//!
//! Entries live in a `moka` cache bounded by bytes (TinyLFU admission, per
//! entry expiry). One moka entry holds every cached reply for one key (GET,
//! HGET f, LRANGE 0 -1, ... in RESP2 and RESP3), so invalidating a key is one
//! removal.
//!
//! Consistency rests on generations. Each key hashes to a slot with a
//! counter; an invalidation bumps the counter and removes the key under the
//! slot's lock, and a fill may only insert (under the same lock) if the
//! counter still has the value it had before its request went upstream. A
//! flush bumps a global epoch the same way. So a reply that raced with any
//! invalidation of its key is never stored, whichever arrives first.

pub mod feed;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use moka::notification::RemovalCause;
use moka::Expiry;

use crate::command::glob_match;
use crate::config::CacheConfig;
use crate::metrics;

/// Fixed cost charged per key and per cached reply, on top of their bytes:
/// moka's node and queues, our `Arc`, vectors, the copies' allocations and
/// allocator slack. Set from measurement so that `max_bytes` bounds resident
/// memory, not just payload: 100,000 GET replies of 64-byte values grew RSS
/// by 713 bytes each (release build, glibc malloc).
const ENTRY_OVERHEAD: usize = 480;
const VARIANT_OVERHEAD: usize = 140;
/// Generation slots; collisions only cost a spurious skipped insert.
const GEN_SLOTS: usize = 4096;

/// One cached reply of one command on one key.
#[derive(Clone)]
struct Variant {
    sig: Bytes,
    proto: u8,
    reply: Bytes,
}

/// Everything cached for one key.
struct KeyEntry {
    variants: Vec<Variant>,
    ttl: Duration,
}

impl KeyEntry {
    fn weight(&self, key: &Bytes) -> u32 {
        let w = key.len()
            + ENTRY_OVERHEAD
            + self
                .variants
                .iter()
                .map(|v| v.sig.len() + v.reply.len() + VARIANT_OVERHEAD)
                .sum::<usize>();
        w.min(u32::MAX as usize) as u32
    }
}

struct EntryExpiry;

impl Expiry<Bytes, Arc<KeyEntry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Bytes,
        value: &Arc<KeyEntry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
    // Adding a variant keeps the key's original deadline (the default for updates).
}

/// A cache policy resolved for a key.
#[derive(Clone, Copy)]
pub struct PolicyRef {
    pub index: usize,
    pub ttl: Duration,
}

struct CompiledPolicy {
    pattern: Bytes,
    ttl: Option<Duration>,
    hits: prometheus::IntCounter,
    misses: prometheus::IntCounter,
}

/// Taken before a fill's request goes upstream; the fill may store its reply
/// only if no invalidation of the key (or flush) happened since.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Ticket {
    slot: usize,
    gen: u64,
    epoch: u64,
}

pub type SharedReply = Shared<BoxFuture<'static, crate::upstream::ReplyResult>>;

#[derive(Hash, PartialEq, Eq, Clone)]
struct FlightKey {
    key: Bytes,
    sig: Bytes,
    proto: u8,
}

struct Flight {
    ticket: Ticket,
    id: u64,
    reply: SharedReply,
}

#[derive(Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub invalidations: AtomicU64,
    pub evictions: Arc<AtomicU64>,
    pub flushes: AtomicU64,
}

/// The shared L1.
pub struct Cache {
    enabled: bool,
    store: moka::sync::Cache<Bytes, Arc<KeyEntry>>,
    gens: Box<[Mutex<u64>]>,
    epoch: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    policies: RwLock<Arc<Vec<CompiledPolicy>>>,
    default_ttl: Option<Duration>,
    /// False while the invalidation feed is down: nothing is served or stored.
    serving: AtomicBool,
    feed_state: RwLock<String>,
    flights: Mutex<HashMap<FlightKey, Flight>>,
    next_flight: AtomicU64,
    /// Tells the feed to reconnect with new subscriptions (policy reload).
    pub(crate) feed_restart: tokio::sync::Notify,
    pub counters: Counters,
    hot: HotKeys,
    pub config: CacheConfig,
}

impl Cache {
    pub fn new(config: CacheConfig) -> Arc<Cache> {
        let evictions = Arc::new(AtomicU64::new(0));
        let ev = evictions.clone();
        let store = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|k: &Bytes, v: &Arc<KeyEntry>| v.weight(k))
            .expire_after(EntryExpiry)
            .eviction_listener(move |_k, _v, cause| {
                if cause == RemovalCause::Size {
                    ev.fetch_add(1, Ordering::Relaxed);
                    metrics::get().cache_evictions_total.inc();
                }
            })
            .build();
        let gens = (0..GEN_SLOTS)
            .map(|_| Mutex::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let cache = Cache {
            enabled: config.enabled,
            store,
            gens,
            epoch: AtomicU64::new(0),
            hasher: Default::default(),
            policies: RwLock::new(Arc::new(compile(&config))),
            default_ttl: config.default_ttl,
            serving: AtomicBool::new(false),
            feed_state: RwLock::new(if config.enabled {
                "starting".into()
            } else {
                "disabled".into()
            }),
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
            feed_restart: tokio::sync::Notify::new(),
            counters: Counters {
                evictions,
                ..Default::default()
            },
            hot: HotKeys::new(),
            config,
        };
        Arc::new(cache)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the key policies (SIGHUP reload) and drops everything cached under the old ones.
    /// The feed is restarted too, since its tracking prefixes or keyspace
    /// patterns come from the policies: until it is back, L1 does not serve.
    pub fn set_policies(&self, policies: Vec<crate::config::Policy>) {
        let mut cfg = self.config.clone();
        cfg.policies = policies;
        *self.policies.write() = Arc::new(compile(&cfg));
        self.serving.store(false, Ordering::Release);
        self.clear_all("reload");
        self.feed_restart.notify_one();
    }

    /// Patterns of the policies that cache (for the feed's subscriptions).
    pub fn cached_patterns(&self) -> Vec<String> {
        let policies = self.policies.read();
        policies
            .iter()
            .filter(|p| p.ttl.is_some())
            .map(|p| String::from_utf8_lossy(&p.pattern).into_owned())
            .collect()
    }

    /// Is L1 answering reads now (enabled and the invalidation feed is healthy)?
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Called by the feed: serving resumes only once the feed is up; when it
    /// goes down, L1 stops answering first and is emptied second.
    pub fn set_serving(&self, serving: bool, state: &str) {
        if !serving {
            self.serving.store(false, Ordering::Release);
            self.clear_all("feed_down");
        } else {
            self.serving.store(true, Ordering::Release);
        }
        *self.feed_state.write() = state.to_string();
    }

    pub fn feed_state(&self) -> String {
        self.feed_state.read().clone()
    }

    /// The policy for a key, if the key may be cached at all.
    pub fn policy(&self, key: &[u8]) -> Option<PolicyRef> {
        let policies = self.policies.read().clone();
        for (index, p) in policies.iter().enumerate() {
            if glob_match(&p.pattern, key) {
                return p.ttl.map(|ttl| PolicyRef { index, ttl });
            }
        }
        self.default_ttl.map(|ttl| PolicyRef {
            index: usize::MAX,
            ttl,
        })
    }

    /// Key-pattern label for metrics ("other" for the default TTL).
    pub fn pattern_label(&self, policy: PolicyRef) -> String {
        let policies = self.policies.read();
        policies
            .get(policy.index)
            .map(|p| String::from_utf8_lossy(&p.pattern).into_owned())
            .unwrap_or_else(|| "other".into())
    }

    fn count(&self, policy: PolicyRef, hit: bool) {
        let policies = self.policies.read();
        match policies.get(policy.index) {
            Some(p) if hit => p.hits.inc(),
            Some(p) => p.misses.inc(),
            None if hit => metrics::get()
                .cache_hits_total
                .with_label_values(&["other"])
                .inc(),
            None => metrics::get()
                .cache_misses_total
                .with_label_values(&["other"])
                .inc(),
        }
    }

    fn slot(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % GEN_SLOTS
    }

    /// Looks a reply up; counts the hit or miss.
    pub fn get(&self, key: &Bytes, sig: &Bytes, proto: u8, policy: PolicyRef) -> Option<Bytes> {
        if !self.is_serving() {
            return None;
        }
        let found = self.store.get(key).and_then(|entry| {
            entry
                .variants
                .iter()
                .find(|v| v.proto == proto && v.sig == *sig)
                .map(|v| v.reply.clone())
        });
        match &found {
            Some(_) => {
                let n = self.counters.hits.fetch_add(1, Ordering::Relaxed);
                // One hit in HOT_SAMPLE is enough to rank keys, and keeps the hit path lock-free.
                if n % HOT_SAMPLE == 0 {
                    self.hot.record(key);
                }
                self.count(policy, true);
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.count(policy, false);
            }
        }
        found
    }

    /// Must be called before the fill's request is sent upstream.
    pub fn ticket(&self, key: &[u8]) -> Ticket {
        let slot = self.slot(key);
        let gen = *self.gens[slot].lock();
        Ticket {
            slot,
            gen,
            epoch: self.epoch.load(Ordering::Acquire),
        }
    }

    /// Stores a reply fetched under `ticket`, unless the key was invalidated since.
    /// Returns whether it was stored.
    pub fn complete_fill(
        &self,
        ticket: Ticket,
        key: &Bytes,
        sig: &Bytes,
        proto: u8,
        reply: &Bytes,
        ttl: Duration,
    ) -> bool {
        if !self.is_serving() {
            return false;
        }
        let gen = self.gens[ticket.slot].lock();
        if *gen != ticket.gen
            || self.epoch.load(Ordering::Acquire) != ticket.epoch
            || !self.is_serving()
        {
            return false;
        }
        // Copies: the caller's bytes are slices of socket buffers, which a
        // long-lived entry would otherwise keep alive whole.
        let variant = Variant {
            sig: sig.clone(),
            proto,
            reply: Bytes::copy_from_slice(reply),
        };
        let entry = match self.store.get(key) {
            Some(old) => {
                let mut variants: Vec<Variant> = old
                    .variants
                    .iter()
                    .filter(|v| !(v.proto == proto && v.sig == *sig))
                    .cloned()
                    .collect();
                variants.push(variant);
                KeyEntry {
                    variants,
                    ttl: old.ttl,
                }
            }
            None => KeyEntry {
                variants: vec![variant],
                ttl,
            },
        };
        self.store
            .insert(Bytes::copy_from_slice(key), Arc::new(entry));
        drop(gen);
        true
    }

    /// Drops every cached reply of `key` and cancels fills in flight for it.
    pub fn invalidate(&self, key: &[u8], source: &str) {
        let slot = self.slot(key);
        let mut gen = self.gens[slot].lock();
        *gen += 1;
        self.store.invalidate(key);
        drop(gen);
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        metrics::get()
            .cache_invalidations_total
            .with_label_values(&[source])
            .inc();
    }

    /// Empties L1 and cancels every fill in flight.
    pub fn clear_all(&self, source: &str) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // A fill that read the old epoch holds its slot lock until its insert
        // is done; passing every lock once orders those inserts before the purge.
        for g in self.gens.iter() {
            drop(g.lock());
        }
        self.store.invalidate_all();
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        metrics::get()
            .cache_invalidations_total
            .with_label_values(&[source])
            .inc();
    }

    /// Joins the upstream request in flight for the same reply, or registers
    /// `start()` as the one every later identical miss will share.
    pub fn single_flight(
        self: &Arc<Self>,
        key: &Bytes,
        sig: &Bytes,
        proto: u8,
        ticket: Ticket,
        start: impl FnOnce() -> BoxFuture<'static, (crate::upstream::ReplyResult, Option<Duration>)>,
        ttl: Duration,
    ) -> SharedReply {
        let fk = FlightKey {
            key: key.clone(),
            sig: sig.clone(),
            proto,
        };
        let mut flights = self.flights.lock();
        if let Some(f) = flights.get(&fk) {
            if f.ticket == ticket {
                self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                metrics::get().cache_coalesced_total.inc();
                return f.reply.clone();
            }
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let request = start();
        let cache = self.clone();
        let fk2 = fk.clone();
        let reply = async move {
            // The request may shorten the TTL (a TDengine route's), or forbid storing (zero).
            let (result, ttl_override) = request.await;
            let ttl = ttl_override.map_or(ttl, |t| t.min(ttl));
            if let Ok(reply) = &result {
                if reply.kind != crate::protocol::ReplyKind::Error && !ttl.is_zero() {
                    cache.complete_fill(ticket, &fk2.key, &fk2.sig, fk2.proto, &reply.bytes, ttl);
                }
            }
            let mut flights = cache.flights.lock();
            if flights.get(&fk2).is_some_and(|f| f.id == id) {
                flights.remove(&fk2);
            }
            result
        }
        .boxed()
        .shared();
        flights.insert(
            fk,
            Flight {
                ticket,
                id,
                reply: reply.clone(),
            },
        );
        reply
    }

    pub fn entries(&self) -> u64 {
        self.store.run_pending_tasks();
        self.store.entry_count()
    }

    pub fn weighted_bytes(&self) -> u64 {
        self.store.weighted_size()
    }

    pub fn hot_keys(&self, n: usize) -> Vec<(Bytes, u64)> {
        self.hot.top(n)
    }

    /// Refreshes the entry and byte gauges (called by the metrics endpoint).
    pub fn update_gauges(&self) {
        let m = metrics::get();
        m.cache_entries.set(self.entries() as i64);
        m.cache_bytes.set(self.weighted_bytes() as i64);
    }
}

fn compile(config: &CacheConfig) -> Vec<CompiledPolicy> {
    let m = metrics::get();
    config
        .policies
        .iter()
        .map(|p| CompiledPolicy {
            pattern: Bytes::copy_from_slice(p.pattern.as_bytes()),
            ttl: p.ttl,
            hits: m.cache_hits_total.with_label_values(&[&p.pattern]),
            misses: m.cache_misses_total.with_label_values(&[&p.pattern]),
        })
        .collect()
}

const STATIC_SIGNATURES: &[&str] = &[
    "GET", "STRLEN", "EXISTS", "TYPE", "HGETALL", "HLEN", "LLEN", "SMEMBERS", "SCARD", "ZCARD",
];

/// The cache signature of a command: its name and every argument but the key,
/// length-prefixed so that no two commands share one.
pub fn signature(name_upper: &[u8], args: &[Bytes]) -> Bytes {
    if args.len() <= 2 {
        // The common single-key forms share one static signature each.
        if let Some(s) = STATIC_SIGNATURES
            .iter()
            .find(|s| s.as_bytes() == name_upper)
        {
            return Bytes::from_static(s.as_bytes());
        }
    }
    let mut out = BytesMut::with_capacity(
        name_upper.len() + 8 + args.iter().skip(2).map(|a| a.len() + 4).sum::<usize>(),
    );
    out.extend_from_slice(name_upper);
    for a in args.iter().skip(2) {
        out.put_u32(a.len() as u32);
        out.extend_from_slice(a);
    }
    out.freeze()
}

/// Recent hit counts per key (sampled: one hit in `HOT_SAMPLE`, reported
/// scaled back up), halved every ten seconds so that "hot" means recent.
struct HotKeys {
    shards: Vec<Mutex<HashMap<Bytes, u64>>>,
    last_decay: Mutex<Instant>,
}

const HOT_SHARDS: usize = 16;
const HOT_SAMPLE: u64 = 8;
const HOT_PER_SHARD: usize = 4096;

impl HotKeys {
    fn new() -> HotKeys {
        HotKeys {
            shards: (0..HOT_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            last_decay: Mutex::new(Instant::now()),
        }
    }

    fn record(&self, key: &Bytes) {
        let shard = key.iter().fold(key.len(), |a, &b| {
            a.wrapping_mul(31).wrapping_add(b as usize)
        }) % HOT_SHARDS;
        let mut map = self.shards[shard].lock();
        if let Some(c) = map.get_mut(key) {
            *c += 1;
        } else if map.len() < HOT_PER_SHARD {
            map.insert(Bytes::copy_from_slice(key), 1);
        }
        drop(map);
        self.maybe_decay();
    }

    fn maybe_decay(&self) {
        let Some(mut last) = self.last_decay.try_lock() else {
            return;
        };
        if last.elapsed() < Duration::from_secs(10) {
            return;
        }
        *last = Instant::now();
        drop(last);
        for shard in &self.shards {
            let mut map = shard.lock();
            map.retain(|_, c| {
                *c /= 2;
                *c > 0
            });
        }
    }

    fn top(&self, n: usize) -> Vec<(Bytes, u64)> {
        let mut all: Vec<(Bytes, u64)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .map(|(k, c)| (k.clone(), *c * HOT_SAMPLE))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Arc<Cache> {
        let mut cfg = crate::config::Config::defaults().cache;
        cfg.max_bytes = 1 << 20;
        let c = Cache::new(cfg);
        c.set_serving(true, "test");
        c
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn policies_first_match_wins() {
        let c = cache();
        assert_eq!(c.policy(b"quote:1").unwrap().ttl, Duration::from_secs(5));
        assert!(c.policy(b"lock:daily").is_none());
        assert!(c.policy(b"other").is_none());
    }

    #[test]
    fn invalidation_between_ticket_and_fill_cancels_the_insert() {
        let c = cache();
        let p = c.policy(b"quote:1").unwrap();
        let t = c.ticket(b"quote:1");
        c.invalidate(b"quote:1", "test");
        assert!(!c.complete_fill(t, &b("quote:1"), &b("GET"), 2, &b("$1\r\nx\r\n"), p.ttl));
        assert!(c.get(&b("quote:1"), &b("GET"), 2, p).is_none());
        let t = c.ticket(b"quote:1");
        assert!(c.complete_fill(t, &b("quote:1"), &b("GET"), 2, &b("$1\r\ny\r\n"), p.ttl));
        assert_eq!(
            c.get(&b("quote:1"), &b("GET"), 2, p).unwrap(),
            b("$1\r\ny\r\n")
        );
    }

    #[test]
    fn flush_cancels_every_fill_and_feed_down_stops_serving() {
        let c = cache();
        let p = c.policy(b"quote:1").unwrap();
        let t = c.ticket(b"quote:1");
        c.clear_all("test");
        assert!(!c.complete_fill(t, &b("quote:1"), &b("GET"), 2, &b("$1\r\nx\r\n"), p.ttl));
        let t = c.ticket(b"quote:1");
        assert!(c.complete_fill(t, &b("quote:1"), &b("GET"), 2, &b("$1\r\nx\r\n"), p.ttl));
        c.set_serving(false, "down");
        assert!(c.get(&b("quote:1"), &b("GET"), 2, p).is_none());
        c.set_serving(true, "up");
        assert!(
            c.get(&b("quote:1"), &b("GET"), 2, p).is_none(),
            "cleared when the feed went down"
        );
    }

    #[test]
    fn variants_are_per_command_and_protocol() {
        let c = cache();
        let p = c.policy(b"ind:x").unwrap();
        let key = b("ind:x");
        let t = c.ticket(&key);
        c.complete_fill(t, &key, &b("HGETALL"), 2, &b("*0\r\n"), p.ttl);
        let t = c.ticket(&key);
        c.complete_fill(t, &key, &b("HGETALL"), 3, &b("%0\r\n"), p.ttl);
        assert_eq!(c.get(&key, &b("HGETALL"), 2, p).unwrap(), b("*0\r\n"));
        assert_eq!(c.get(&key, &b("HGETALL"), 3, p).unwrap(), b("%0\r\n"));
        assert!(c.get(&key, &b("HLEN"), 3, p).is_none());
        c.invalidate(&key, "test");
        assert!(c.get(&key, &b("HGETALL"), 2, p).is_none());
    }

    #[test]
    fn signatures_differ_by_arguments() {
        let a = signature(b"HGET", &[b("hget"), b("k"), b("ab")]);
        let b2 = signature(b"HGET", &[b("hget"), b("k"), b("a"), b("b")]);
        assert_ne!(a, b2);
    }
}
