//! L1: the in-process store shared by every client of this nearcache, its
//! key policies, the invalidation rules and single flight.
//!
//! Entries live in [`store`]: bounded by bytes, CLOCK eviction, TinyLFU
//! admission, per-entry expiry. One entry holds every cached reply for one key (GET,
//! HGET f, LRANGE 0 -1, ... in RESP2 and RESP3), so invalidating a key is
//! one removal; a key holds at most [`MAX_VARIANTS`] replies, so a hit stays
//! a short scan. How L1 stays consistent with Redis is in [`consistency`]
//! and [`feed`]. An entry never outlives the key in Redis: a fill learns the
//! key's remaining TTL in the same round trip as its read, and the entry
//! expires at the earlier of that and the policy's TTL.

pub mod cluster_feed;
mod consistency;
pub mod feed;
mod gate;
mod policy;
mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;

pub use consistency::Ticket;
pub use policy::{signature, PolicyRef};

use crate::command::Keys;
use crate::config::CacheConfig;
use crate::flight::{SingleFlight, Waiter};
use crate::metrics;
use crate::protocol::ReplyKind;
use crate::upstream::ReplyResult;
use consistency::Generations;
use gate::SlotGate;
use policy::Policies;
pub use store::MAX_VARIANTS;
use store::{Inserted, Packed};

/// What L1 says about a read.
pub enum Lookup {
    /// Served: the reply went to the caller's `on_hit`.
    Hit,
    /// Not cached: fill it with this ticket.
    Miss(Ticket),
    /// Not to be served from L1 or joined to a fill right now (a write of
    /// the key is in flight): read upstream, behind the write.
    Bypass,
    /// L1 does not serve this key now (with a cluster: the feed of the
    /// master owning its slot is not up): read upstream, as when L1 is off.
    NotServing,
}

/// What a fill's upstream work returns: the reply, and how long L1 may keep
/// it at most (the key's remaining TTL in Redis, a TDengine route's TTL;
/// zero: not at all; `None`: the policy decides).
pub type Fetched = (ReplyResult, Option<Duration>);

/// A reply fetched from Redis, to be stored in L1.
pub struct Fill {
    pub ticket: Ticket,
    pub key: Bytes,
    pub sig: Bytes,
    pub proto: u8,
    pub reply: Bytes,
    pub ttl: Duration,
}

/// What [`Cache::try_store`] did.
enum Store {
    Stored,
    /// The ticket is no longer current (or L1 is off): not stored.
    Stale,
    /// The key holds replies of other commands: a feed barrier first.
    NeedsBarrier,
}

/// What the feed connection does for the rest of nearcache while it is up.
pub enum FeedRequest {
    /// Answer once the feed has read everything Redis sent it before now.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// Write a TDengine fill back to Redis from the feed connection itself.
    WriteBack(WriteBack),
}

/// Where the feed takes [`FeedRequest`]s (bounded: when it is full, barriers
/// fail and write-backs take the pool).
pub type FeedRequests = tokio::sync::mpsc::Sender<FeedRequest>;

/// How many feed requests may wait for the feed task.
pub(crate) const FEED_REQUESTS: usize = 1024;

/// A TDengine fill's write-back (`SET key value PX ttl NX`), sent on the
/// feed connection so that Redis does not report it back to us as an
/// invalidation (`CLIENT TRACKING ... NOLOOP`): when it succeeds the feed
/// stores `reply` under a ticket taken right then, so the filled key is
/// served from L1 from its next read on. Anything Redis reports after the
/// `+OK` still invalidates it.
pub struct WriteBack {
    pub key: Bytes,
    pub set: Bytes,
    pub sig: Bytes,
    pub proto: u8,
    pub reply: Bytes,
    /// How long L1 may keep it (zero: write back only).
    pub ttl: Duration,
    pub done: tokio::sync::oneshot::Sender<WriteBackOutcome>,
}

/// What became of a [`WriteBack`]. (Its sender dropped: the feed failed and
/// whether the SET ran is unknown.)
#[derive(Debug, PartialEq, Eq)]
pub enum WriteBackOutcome {
    /// Redis took it (and L1 holds it if it could).
    Written,
    /// The key existed by then (NX): someone else's value is newer.
    Exists,
    /// Redis refused the SET.
    Refused(String),
}

/// Concurrent identical misses share one fill.
pub type FillWaiter = Waiter<ReplyResult>;

#[derive(Hash, PartialEq, Eq, Clone)]
struct FillKey {
    key: Bytes,
    sig: Bytes,
    proto: u8,
}

#[derive(Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub invalidations: AtomicU64,

    pub flushes: AtomicU64,
    /// Fills that waited for a feed barrier before they were stored.
    pub barriers: AtomicU64,
}

/// The shared L1.
pub struct Cache {
    enabled: bool,
    store: store::Store,
    gens: Generations,
    /// With a cluster upstream: which hash slots L1 serves (their masters'
    /// feeds are up); see [`gate`]. `None` with a single Redis.
    gate: Option<Arc<SlotGate>>,
    policies: RwLock<Arc<Policies>>,
    /// False while the invalidation feed is down: nothing is served or
    /// stored. With a cluster: while no master's feed is up (the slots of
    /// the masters whose feeds are up are served; see [`gate`]).
    serving: AtomicBool,
    feed_state: RwLock<String>,
    fills: Arc<SingleFlight<FillKey, Ticket, ReplyResult>>,
    feed_requests: parking_lot::Mutex<Option<FeedRequests>>,
    /// Tells the feed to reconnect with new subscriptions (policy reload).
    pub(crate) feed_restart: tokio::sync::Notify,
    pub counters: Counters,
    pub config: CacheConfig,
}

impl Cache {
    /// L1 in front of a single Redis (or Sentinel's master).
    pub fn new(config: CacheConfig) -> Arc<Cache> {
        Cache::with_gate(config, None)
    }

    /// L1 in front of a Redis Cluster: served per hash slot, as the feed of
    /// each slot's master allows ([`cluster_feed`]).
    pub fn for_cluster(config: CacheConfig) -> Arc<Cache> {
        Cache::with_gate(config, Some(Arc::new(SlotGate::new())))
    }

    fn with_gate(config: CacheConfig, gate: Option<Arc<SlotGate>>) -> Arc<Cache> {
        // The sketch is sized for entries of about this many bytes.
        let store = store::Store::new(config.max_bytes, 512, gate.clone());
        Arc::new(Cache {
            enabled: config.enabled,
            store,
            gens: Generations::new(),
            gate,
            policies: RwLock::new(Arc::new(Policies::compile(&config))),
            serving: AtomicBool::new(false),
            feed_state: RwLock::new(if config.enabled {
                "starting".into()
            } else {
                "disabled".into()
            }),
            fills: Arc::default(),
            feed_requests: parking_lot::Mutex::new(None),
            feed_restart: tokio::sync::Notify::new(),
            counters: Counters::default(),
            config,
        })
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
        *self.policies.write() = Arc::new(Policies::compile(&cfg));
        self.serving.store(false, Ordering::Release);
        if let Some(gate) = &self.gate {
            gate.close_all();
        }
        self.clear_all("reload");
        self.feed_restart.notify_one();
    }

    /// Patterns of the policies that cache (for the feed's subscriptions).
    pub fn cached_patterns(&self) -> Vec<String> {
        self.policies.read().cached_patterns()
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
        self.policies.read().lookup(key)
    }

    /// Looks a read up; counts the hit or miss. A hit's reply is handed to
    /// `on_hit` in place (the caller copies it out; no clone per hit).
    pub fn lookup(
        &self,
        key: &Bytes,
        sig: &Bytes,
        proto: u8,
        policy: PolicyRef,
        on_hit: impl FnOnce(&[u8]),
    ) -> Lookup {
        if self.gens.writing(key) {
            self.count_miss(policy);
            return Lookup::Bypass;
        }
        let hit = self
            .store
            .get(key, |entry| {
                on_hit(entry.find(sig, proto)?);
                Some(())
            })
            .is_some();
        if hit {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            self.policies.read().count(policy, true);
            return Lookup::Hit;
        }
        // The slot is computed only here: a hit checks the stamp its entry keeps.
        let ticket = self.ticket(key);
        if self.gate.is_some() && ticket.stamp == 0 {
            return Lookup::NotServing;
        }
        self.count_miss(policy);
        Lookup::Miss(ticket)
    }

    fn count_miss(&self, policy: PolicyRef) {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        self.policies.read().count(policy, false);
    }

    /// A ticket for a fill that did not come from [`Cache::lookup`] (MGET elements).
    pub fn ticket(&self, key: &[u8]) -> Ticket {
        let stamp = self.gate.as_ref().map_or(0, |g| g.stamp_of(key));
        self.gens.ticket(key, stamp)
    }

    /// Is a write of `key` in flight (reads of it must not be served or filled)?
    pub fn writing(&self, key: &[u8]) -> bool {
        self.gens.writing(key)
    }

    /// Stores a fill unless the key was invalidated since its ticket was
    /// taken or a write of it is in flight. Returns whether it was stored.
    /// (No feed barrier: see [`Cache::store_fill`].)
    pub fn complete_fill(&self, fill: Fill) -> bool {
        matches!(self.try_store(&fill, true), Store::Stored)
    }

    /// Stores a fill the way reads see it never going back in time: if the
    /// key holds replies of other commands (or protocols), the feed first
    /// has to catch up with everything Redis did before this reply (a
    /// barrier), so that an older reply of another command is invalidated
    /// before the caller hands this newer one to a client. Without a feed to
    /// ask, the key's other replies are dropped instead.
    pub async fn store_fill(&self, fill: Fill) -> bool {
        self.store_fills(vec![fill]).await == 1
    }

    /// [`Cache::store_fill`] for several fills (an MGET's), with at most one
    /// barrier; returns how many were stored.
    pub async fn store_fills(&self, fills: Vec<Fill>) -> usize {
        let mut stored = 0;
        let mut waiting = Vec::new();
        for f in fills {
            match self.try_store(&f, false) {
                Store::Stored => stored += 1,
                Store::Stale => {}
                Store::NeedsBarrier => waiting.push(f),
            }
        }
        if waiting.is_empty() {
            return stored;
        }
        self.counters.barriers.fetch_add(1, Ordering::Relaxed);
        let synced = self.feed_barrier().await;
        for f in waiting {
            if !synced {
                self.invalidate(&f.key, "no_barrier");
            } else if matches!(self.try_store(&f, true), Store::Stored) {
                stored += 1;
            }
        }
        stored
    }

    /// Waits until the feed has received everything Redis sent it before now.
    async fn feed_barrier(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.to_feed(FeedRequest::Barrier(tx)) {
            return false;
        }
        matches!(
            tokio::time::timeout(self.config.feed_health_interval, rx).await,
            Ok(Ok(()))
        )
    }

    /// Hands a request to the feed; false if it is down or too busy.
    fn to_feed(&self, request: FeedRequest) -> bool {
        let Some(requests) = self.feed_requests.lock().clone() else {
            return false;
        };
        requests.try_send(request).is_ok()
    }

    /// Where the feed takes requests while it is up (see [`feed`]).
    pub(crate) fn set_feed_requests(&self, requests: Option<FeedRequests>) {
        *self.feed_requests.lock() = requests;
    }

    /// Writes a TDengine fill back to Redis through the feed (see
    /// [`WriteBack`]); `None` if the feed cannot take it (the caller writes
    /// back through the pool and L1 learns of it like of any other write).
    #[allow(clippy::too_many_arguments)]
    pub fn write_back(
        &self,
        key: &Bytes,
        value: &[u8],
        px: Duration,
        sig: &Bytes,
        proto: u8,
        reply: &Bytes,
        ttl: Duration,
    ) -> Option<tokio::sync::oneshot::Receiver<WriteBackOutcome>> {
        if !self.is_serving() {
            return None;
        }
        let px = px.as_millis().max(1).to_string();
        let set = crate::protocol::command([&b"SET"[..], key, value, b"PX", px.as_bytes(), b"NX"]);
        let (done, rx) = tokio::sync::oneshot::channel();
        let request = FeedRequest::WriteBack(WriteBack {
            key: key.clone(),
            set,
            sig: sig.clone(),
            proto,
            reply: reply.clone(),
            ttl,
            done,
        });
        self.to_feed(request).then_some(rx)
    }

    /// The feed read the `+OK` of `wb`'s SET: from here on Redis holds its
    /// value until the feed reports otherwise. Our own write was not
    /// reported (NOLOOP), so the key's other cached replies (an `EXISTS`
    /// that said 0) are dropped here; then the reply is stored under a
    /// ticket taken now.
    pub(crate) fn written_back(&self, wb: &WriteBack) {
        self.invalidate(&wb.key, "write_back");
        let fill = Fill {
            ticket: self.ticket(&wb.key),
            key: wb.key.clone(),
            sig: wb.sig.clone(),
            proto: wb.proto,
            reply: wb.reply.clone(),
            ttl: wb.ttl,
        };
        self.try_store(&fill, true);
    }

    fn try_store(&self, fill: &Fill, past_barrier: bool) -> Store {
        let Fill {
            ticket,
            key,
            sig,
            proto,
            reply,
            ttl,
        } = fill;
        let (ticket, proto, ttl) = (*ticket, *proto, *ttl);
        if !self.is_serving() || ttl.is_zero() {
            return Store::Stale;
        }
        let expires_at = quanta::Instant::now() + ttl;
        let mut outcome = Store::Stale;
        self.gens.store_if_current(ticket, || {
            if !self.is_serving() {
                return;
            }
            // The slot's master feed was up from the ticket until now; the
            // entry keeps the stamp, so a later renewal hides it.
            if self.gate.as_ref().is_some_and(|g| !g.current(ticket.stamp)) {
                return;
            }
            // The store copies the bytes: the caller's are slices of socket
            // buffers, which a long-lived entry would otherwise keep alive.
            let stored = self
                .store
                .upsert(key, ticket.stamp, expires_at, |old| match old {
                    Some(p) if p.has_other_than(sig, proto) && !past_barrier => {
                        outcome = Store::NeedsBarrier;
                        None
                    }
                    Some(p) => Some(p.with(proto, sig, reply)),
                    None => Some(Packed::new(key, proto, sig, reply)),
                });
            if let Some(Inserted::Stored) = stored {
                outcome = Store::Stored;
            }
        });
        outcome
    }

    /// Drops every cached reply of `key` and cancels fills in flight for it.
    pub fn invalidate(&self, key: &[u8], source: &str) {
        self.gens.bump(key, || self.store.remove(key));
        self.counters.invalidations.fetch_add(1, Ordering::Relaxed);
        metrics::get()
            .cache_invalidations_total
            .with_label_values(&[source])
            .inc();
    }

    /// Empties L1 and cancels every fill in flight.
    pub fn clear_all(&self, source: &str) {
        self.gens.bump_all(|| self.store.clear());
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        metrics::get()
            .cache_invalidations_total
            .with_label_values(&[source])
            .inc();
    }

    /// Marks a write of `keys` as in flight (see [`consistency`]) and
    /// invalidates them; the returned guard invalidates them again and ends
    /// the write when it is dropped, which the session does when the write's
    /// reply has arrived (or will never arrive).
    pub fn begin_write(self: &Arc<Self>, keys: &Keys) -> Option<WriteGuard> {
        if !self.enabled {
            return None;
        }
        let keys = match keys {
            Keys::None => return None,
            Keys::All => {
                self.gens.begin_all();
                self.clear_all("local_write");
                None
            }
            Keys::Some(list) => {
                let cached: Vec<Bytes> = list
                    .iter()
                    .filter(|k| self.policy(k).is_some())
                    .cloned()
                    .collect();
                if cached.is_empty() {
                    return None;
                }
                for k in &cached {
                    self.gens.begin_key(k);
                    self.invalidate(k, "local_write");
                }
                Some(cached)
            }
        };
        Some(WriteGuard {
            cache: self.clone(),
            keys,
        })
    }

    /// The fill in flight for the same reply under the same ticket, if any.
    pub fn join_fill(
        &self,
        key: &Bytes,
        sig: &Bytes,
        proto: u8,
        ticket: Ticket,
    ) -> Option<FillWaiter> {
        let fk = FillKey {
            key: key.clone(),
            sig: sig.clone(),
            proto,
        };
        let w = self.fills.join(&fk, &ticket)?;
        self.count_coalesced();
        Some(w)
    }

    /// A miss that shares a fill already in flight.
    pub fn count_coalesced(&self) {
        self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
        metrics::get().cache_coalesced_total.inc();
    }

    /// Joins the upstream request in flight for the same reply and ticket, or
    /// starts `fetch` as the one every later identical miss will share. What
    /// it fetches is stored for the policy's TTL or the fetch's cap, if shorter.
    pub fn fill(
        self: &Arc<Self>,
        key: &Bytes,
        sig: &Bytes,
        proto: u8,
        ticket: Ticket,
        ttl: Duration,
        fetch: impl FnOnce() -> BoxFuture<'static, Fetched>,
    ) -> FillWaiter {
        let fk = FillKey {
            key: key.clone(),
            sig: sig.clone(),
            proto,
        };
        let cache = self.clone();
        let (waiter, joined) = self.fills.run(
            fk.clone(),
            ticket,
            move || {
                let request = fetch();
                Box::pin(async move {
                    let (result, cap) = request.await;
                    let ttl = cap.map_or(ttl, |c| c.min(ttl));
                    if let Ok(reply) = &result {
                        if reply.kind != ReplyKind::Error {
                            let fill = Fill {
                                ticket,
                                key: fk.key.clone(),
                                sig: fk.sig.clone(),
                                proto: fk.proto,
                                reply: reply.bytes.clone(),
                                ttl,
                            };
                            cache.store_fill(fill).await;
                        }
                    }
                    result
                })
            },
            |why| Err(Arc::new(crate::Error::Internal(why))),
        );
        if joined {
            self.count_coalesced();
        }
        waiter
    }

    pub fn entries(&self) -> u64 {
        self.store.entries()
    }

    pub fn evictions(&self) -> u64 {
        self.store.evictions.load(Ordering::Relaxed)
    }

    pub fn weighted_bytes(&self) -> u64 {
        self.store.weighted_size()
    }

    /// The keys with the most hits lately (halved every ten seconds).
    pub fn hot_keys(&self, n: usize) -> Vec<(Bytes, u64)> {
        self.store.hottest(n)
    }

    /// Halves the recent-hit counts; called every ten seconds.
    pub fn decay_hits(&self) {
        self.store.decay_hits();
    }

    /// Fills in the map right now (single flight).
    pub fn fills_in_flight(&self) -> usize {
        self.fills.len()
    }

    /// Refreshes the entry and byte gauges (called by the metrics endpoint).
    pub fn update_gauges(&self) {
        let m = metrics::get();
        m.cache_entries.set(self.entries() as i64);
        m.cache_bytes.set(self.weighted_bytes() as i64);
    }
}

/// A write through nearcache in flight; see [`Cache::begin_write`].
pub struct WriteGuard {
    cache: Arc<Cache>,
    /// `None`: the write's keys are unknown.
    keys: Option<Vec<Bytes>>,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        // Invalidate before the write stops counting, so a fill that read
        // the old value while it was in flight can never store it.
        match &self.keys {
            None => {
                self.cache.clear_all("local_write");
                self.cache.gens.end_all();
            }
            Some(keys) => {
                for k in keys {
                    self.cache.invalidate(k, "local_write");
                    self.cache.gens.end_key(k);
                }
            }
        }
    }
}

/// The L1 lifetime of a fill whose key had `pttl_ms` left in Redis when its
/// read was sent `since` ago: `None` for a key without expiry (the policy
/// decides), zero when it has already expired.
pub fn ttl_from_pttl(pttl_ms: i64, since: Duration) -> Option<Duration> {
    match pttl_ms {
        // -1: no expiry; -2: no such key (a nil reply; the policy decides).
        ms if ms < 0 => None,
        ms => Some(Duration::from_millis(ms as u64).saturating_sub(since)),
    }
}

#[cfg(test)]
mod tests;
