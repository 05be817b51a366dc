//! Invalidation with a Redis Cluster upstream: one feed connection per
//! master in the current slot map, each subscribed the way [`super::feed`]
//! subscribes its one connection (tracking BCAST or keyspace events; a
//! node reports writes to the keys it holds, so every master must have one).
//!
//! L1 serves per hash slot ([`super::gate`]): a key is served only while
//! the feed of the master owning its slot (in the map last reconciled here)
//! is up and has been up since the entry was filled. A feed coming up
//! opens its master's slots with a new generation (what was cached of them
//! before may have missed that master's writes); a feed going down closes
//! them; a slot whose owner changes in a new map (a refresh or an applied
//! `MOVED`; a failover moves the old master's slots to the promoted
//! replica, which has no tracking state for them) gets a new generation,
//! open only if its new owner's feed is up, and so does a slot that moved
//! and came back between two views seen here (the view counts each slot's
//! owner changes: the watch keeps only the latest view). The other slots'
//! entries stay served. In doubt (a policy reload restarts every feed),
//! every slot is closed and L1 emptied.
//!
//! Each feed proves it sees writes as the single feed does: every
//! `feed_health_interval` a canary write (through the router, to a slot
//! this master owns, found with [`slots::tags`]) must come back on that
//! master's feed. Not done here: feed barriers and TDengine write-backs
//! (fills of a key holding other commands' replies drop those replies
//! instead of waiting for a barrier), and the per-node `run_id` check (a
//! node restarted behind the same address closes the feed connection
//! anyway; a failover changes the map).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use super::feed::{self, FeedConn, CANARY_PREFIX};
use super::gate::SlotGate;
use super::Cache;
use crate::error::Error;
use crate::metrics;
use crate::net::{Backoff, FrameReader};
use crate::protocol::{self, ReplyKind};
use crate::upstream::cluster::router::Router;
use crate::upstream::cluster::slots;
use crate::upstream::cluster::topology::Topology;
use crate::upstream::{Login, ReplyResult};

/// Which masters have a feed, which of those feeds are up, and which
/// slots L1 serves accordingly.
struct Feeds {
    cache: Arc<Cache>,
    gate: Arc<SlotGate>,
    members: Mutex<Members>,
}

struct Members {
    /// Master address → (the id of its current feed task, up?). A task
    /// that was replaced reports under an old id and is ignored.
    feeds: HashMap<String, (u64, bool)>,
    /// The map the gate follows: whose feed each slot's entries depend on.
    map: Option<Arc<Topology>>,
    /// The mode the feeds subscribed with (for `NEARCACHE STATS`, metrics).
    mode: &'static str,
}

impl Feeds {
    fn new(cache: Arc<Cache>) -> Option<Feeds> {
        Some(Feeds {
            gate: cache.gate.clone()?,
            cache,
            members: Mutex::new(Members {
                feeds: HashMap::new(),
                map: None,
                mode: "tracking",
            }),
        })
    }

    /// Renews every slot `addr` owns in the gate's map, open or closed;
    /// returns how many.
    fn renew_master(&self, members: &Members, addr: &str, open: bool) -> usize {
        let Some(map) = &members.map else { return 0 };
        let mut n = 0;
        for s in 0..slots::SLOTS as u16 {
            if map.owner(s) == Some(addr) {
                self.gate.renew(s, open);
                n += 1;
            }
        }
        n
    }

    /// Whether L1 serves at all (some master's feed is up) follows the
    /// members, decided under their lock so that a feed going down and
    /// another coming up cannot interleave wrongly.
    fn settle(&self, members: &Members) {
        let mode = members.mode;
        let n = members.feeds.len();
        let up = members.feeds.values().filter(|m| m.1).count();
        let state = if n > 0 && up == n {
            format!("{mode} ({up}/{n} masters)")
        } else if up > 0 {
            format!("{mode} ({up}/{n} masters up; L1 off for the others' slots)")
        } else {
            format!("down ({up}/{n} masters up)")
        };
        let m = metrics::get();
        if n > 0 && up == n {
            m.feed_up.with_label_values(&[mode]).set(1);
        } else {
            for mode in ["keyspace", "tracking"] {
                m.feed_up.with_label_values(&[mode]).set(0);
            }
        }
        self.cache.set_serving(up > 0, &state);
    }

    /// The feed `id` of `addr` is subscribed; false if it was replaced.
    fn up(&self, addr: &str, id: u64, mode: &'static str) -> bool {
        let mut members = self.members.lock();
        match members.feeds.get_mut(addr) {
            Some(m) if m.0 == id => m.1 = true,
            _ => return false,
        }
        // A new generation: what was cached of these slots before may have
        // missed this master's writes.
        self.renew_master(&members, addr, true);
        count_clear("feed_reconnect");
        members.mode = mode;
        metrics::get().feed_reconnects_total.inc();
        self.settle(&members);
        true
    }

    fn down(&self, addr: &str, id: u64) {
        let mut members = self.members.lock();
        if let Some(m) = members.feeds.get_mut(addr).filter(|m| m.0 == id) {
            let was_up = std::mem::replace(&mut m.1, false);
            self.renew_master(&members, addr, false);
            if was_up {
                count_clear("feed_down");
            }
        }
        self.settle(&members);
    }

    /// Makes the members the masters of `map` and the gate follow it: a
    /// slot whose owner differs from the gate's map, or that `moved` says
    /// changed owner since (away and back), is renewed (open if its owner's
    /// feed is up). Returns the masters removed and the ones added (each
    /// with its new id).
    fn reconcile(
        &self,
        map: Option<Arc<Topology>>,
        moved: impl Fn(u16) -> bool,
        next_id: &mut u64,
    ) -> (Vec<String>, Vec<(String, u64)>) {
        let masters = map
            .as_ref()
            .map(|t| t.masters().to_vec())
            .unwrap_or_default();
        let mut members = self.members.lock();
        let removed: Vec<String> = members
            .feeds
            .keys()
            .filter(|a| !masters.contains(a))
            .cloned()
            .collect();
        for a in &removed {
            members.feeds.remove(a);
        }
        let mut added = Vec::new();
        for a in &masters {
            if !members.feeds.contains_key(a) {
                *next_id += 1;
                members.feeds.insert(a.clone(), (*next_id, false));
                added.push((a.clone(), *next_id));
            }
        }
        let before = members.map.take();
        let mut renewed = 0;
        for s in 0..slots::SLOTS as u16 {
            let owner = map.as_ref().and_then(|t| t.owner(s));
            if moved(s) || owner != before.as_ref().and_then(|t| t.owner(s)) {
                let open = owner
                    .and_then(|o| members.feeds.get(o))
                    .is_some_and(|m| m.1);
                self.gate.renew(s, open);
                renewed += 1;
            }
        }
        if renewed > 0 {
            count_clear("topology");
        }
        members.map = map;
        self.settle(&members);
        (removed, added)
    }

    /// Forgets every feed (they are being restarted) and closes every slot.
    fn reset(&self) {
        let mut members = self.members.lock();
        members.feeds.clear();
        members.map = None;
        self.gate.close_all();
        self.settle(&members);
    }
}

/// Counts slots cleared by a feed or map event (one per event).
fn count_clear(source: &str) {
    metrics::get()
        .cache_invalidations_total
        .with_label_values(&[source])
        .inc();
}

/// Starts the feeds' supervisor: it follows the slot map (a feed per
/// master), restarts every feed when the key policies change, and ends
/// them all on `shutdown`.
pub fn start(cache: Arc<Cache>, router: Arc<Router>, shutdown: Arc<Notify>) {
    if !cache.enabled() {
        cache.set_serving(false, "disabled");
        return;
    }
    let Some(feeds) = Feeds::new(cache.clone()) else {
        // A programming error: L1 stays off rather than serve unguarded.
        warn!("L1 with a cluster needs a per-slot cache (Cache::for_cluster); L1 stays off");
        cache.set_serving(false, "disabled");
        return;
    };
    let feeds = Arc::new(feeds);
    feed::spawn_decay(cache.clone(), shutdown.clone());
    let instance = feed::canary_instance();
    tokio::spawn(async move {
        let view = router.view().clone();
        let mut maps = view.subscribe();
        let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut next_id = 0u64;
        // The map last reconciled (`None` until then or after a restart),
        // and each slot's owner changes counted up to it.
        let mut last: Option<Arc<Topology>> = None;
        let mut last_counts = vec![0u32; slots::SLOTS];
        loop {
            let (now, counts) = {
                let borrowed = maps.borrow_and_update();
                // Read under the borrow: the counts up to the view borrowed.
                (borrowed.clone(), view.owner_changes())
            };
            let moved: Vec<bool> = counts
                .iter()
                .zip(&last_counts)
                .map(|(a, b)| a != b)
                .collect();
            last_counts = counts;
            // Only replicas changed (one failed, joined, was promoted
            // without its master's slots moving yet): L1 is filled from
            // masters only, so nothing cached is in doubt.
            let replicas_only = !moved.contains(&true)
                && matches!((&last, &now), (Some(l), Some(n)) if l.same_owners(n));
            last = now.clone();
            if !replicas_only {
                let (removed, added) = feeds.reconcile(now, |s| moved[s as usize], &mut next_id);
                for a in removed {
                    if let Some(t) = tasks.remove(&a) {
                        t.abort();
                    }
                }
                for (addr, id) in added {
                    let task = tokio::spawn(node_feed(
                        feeds.clone(),
                        router.clone(),
                        addr.clone(),
                        id,
                        instance.clone(),
                    ));
                    if let Some(old) = tasks.insert(addr, task) {
                        old.abort();
                    }
                }
            }
            tokio::select! {
                r = maps.changed() => if r.is_err() { break },
                _ = cache.feed_restart.notified() => {
                    info!("key policies changed; re-establishing every master's invalidation feed");
                    for (_, t) in tasks.drain() {
                        t.abort();
                    }
                    feeds.reset();
                    last = None;
                }
                _ = shutdown.notified() => break,
            }
        }
        for (_, t) in tasks.drain() {
            t.abort();
        }
    });
}

/// One master's feed, reconnecting with backoff until it is aborted.
async fn node_feed(
    feeds: Arc<Feeds>,
    router: Arc<Router>,
    addr: String,
    id: u64,
    instance: String,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1));
    let mut failing = false;
    loop {
        let result = run_node(&feeds, &router, &addr, id, &instance).await;
        feeds.down(&addr, id);
        match result {
            Ok(()) => {
                backoff.reset();
                failing = false;
            }
            Err(e) if !failing => {
                warn!(master = %addr, error = %e, "invalidation feed down; L1 off for its slots until it is back");
                failing = true;
            }
            Err(e) => tracing::debug!(master = %addr, error = %e, "invalidation feed still down"),
        }
        tokio::time::sleep(backoff.step()).await;
    }
}

/// A slot `addr` owns in the current map, to put that master's canary in.
fn slot_of(router: &Router, addr: &str) -> Option<u16> {
    let topo = router.view().current()?;
    (0..slots::SLOTS as u16).find(|&s| topo.owner(s) == Some(addr))
}

async fn run_node(
    feeds: &Feeds,
    router: &Arc<Router>,
    addr: &str,
    id: u64,
    instance: &str,
) -> Result<(), Error> {
    let cache = &feeds.cache;
    let connected = router
        .connector()
        .connect_to(addr, 3, &Login::Configured, false)
        .await?;
    let mut conn: FeedConn = FrameReader::new(connected.stream, connected.leftover);
    let Some(mode) = feed::choose_mode(cache, &mut conn).await? else {
        tokio::time::sleep(Duration::from_secs(5)).await;
        return Ok(());
    };
    // A cluster has database 0 only.
    let mode_label = feed::subscribe(cache, &mut conn, mode, 0).await?;
    if !feeds.up(addr, id, mode_label) {
        return Ok(());
    }
    info!(master = %addr, mode = mode_label, "invalidation feed up");

    let keyspace_prefix = b"__keyspace@0__:".to_vec();
    let interval = cache.config.feed_health_interval;
    let canary = cache.config.feed_canary;
    // The probe in flight: when it was sent, the canary key it wrote (none:
    // a PING on the feed) and the write's own reply while it is owed.
    let mut probe: Option<(Instant, Bytes, Option<BoxFuture<'static, ReplyResult>>)> = None;
    let mut next_probe = Instant::now();
    let mut count = 0u64;
    let mut plain = false;
    let mut pongs_owed = 0usize;
    loop {
        let deadline = probe
            .as_ref()
            .map_or(next_probe, |(sent, _, _)| *sent + interval);
        let write_reply = async {
            match probe.as_mut().and_then(|(_, _, w)| w.as_mut()) {
                Some(w) => w.await,
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            r = conn.next() => r?,
            r = write_reply => {
                let refused = match r {
                    Err(e) => return Err(Error::Upstream(format!("canary write failed: {e}"))),
                    Ok(reply) => reply.error_text(),
                };
                match refused {
                    Some(why) if !plain => {
                        warn!(master = %addr, error = %why, "the canary script was refused; using a plain SET (it stays a minute)");
                        plain = true;
                        probe = start_probe(router, addr, instance, count, plain, &mut conn, &mut pongs_owed, canary).await?;
                    }
                    Some(why) => return Err(Error::Upstream(format!("canary write refused: {why}"))),
                    None => {
                        if let Some((_, _, w)) = probe.as_mut() {
                            *w = None;
                        }
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                if probe.is_some() {
                    let what = if canary { "the canary write was not seen on the feed" } else { "no PONG" };
                    return Err(Error::Upstream(format!("invalidation feed of {addr} stalled: {what} within {interval:?}")));
                }
                count += 1;
                probe = start_probe(router, addr, instance, count, plain, &mut conn, &mut pongs_owed, canary).await?;
                continue;
            }
        };
        let answered = match frame.kind {
            ReplyKind::Push => {
                // Every push is applied; between probes there is no canary to see.
                let canary = probe
                    .as_ref()
                    .map(|p| p.1.clone())
                    .filter(|k| !k.is_empty());
                feed::handle_push(cache, &frame.bytes, &keyspace_prefix, canary.as_deref())
            }
            ReplyKind::Error => {
                return Err(Error::Upstream(format!(
                    "invalidation feed error from {addr}: {}",
                    feed::error_text(&frame)
                )))
            }
            _ if pongs_owed > 0 => {
                pongs_owed -= 1;
                probe.as_ref().is_some_and(|p| p.1.is_empty())
            }
            _ => {
                return Err(Error::Upstream(format!(
                    "invalidation feed of {addr}: unexpected reply {}",
                    feed::error_text(&frame)
                )))
            }
        };
        if answered {
            if let Some((sent, _, _)) = probe.take() {
                next_probe = sent + interval;
            }
        }
    }
}

/// Sends the next probe: the canary write to a slot `addr` owns, or a
/// PING on the feed (no canary configured, or the master owns no slot).
#[allow(clippy::too_many_arguments)]
async fn start_probe(
    router: &Arc<Router>,
    addr: &str,
    instance: &str,
    n: u64,
    plain: bool,
    conn: &mut FeedConn,
    pongs_owed: &mut usize,
    canary: bool,
) -> Result<Option<(Instant, Bytes, Option<BoxFuture<'static, ReplyResult>>)>, Error> {
    let slot = if canary { slot_of(router, addr) } else { None };
    let Some(slot) = slot else {
        conn.write(&protocol::command([b"PING"])).await?;
        *pongs_owed += 1;
        return Ok(Some((Instant::now(), Bytes::new(), None)));
    };
    let tag = slots::tags()[slot as usize];
    let key = Bytes::from(format!("{CANARY_PREFIX}{{{tag}}}{instance}"));
    let write = feed::canary_write(&key, n, plain);
    let router = router.clone();
    let reply = async move { router.send(2, slot, write, 0).await }.boxed();
    Ok(Some((Instant::now(), key, Some(reply))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Fill, Lookup};

    fn feeds() -> Feeds {
        let mut cfg = crate::config::Config::defaults().cache;
        cfg.max_bytes = 1 << 20;
        Feeds::new(Cache::for_cluster(cfg)).unwrap()
    }

    /// Slots 0..=8191 on `a`, the rest on `b`.
    fn map(a: &str, b: &str) -> Option<Arc<Topology>> {
        Some(Arc::new(Topology::from_ranges(&[
            (0, 8191, a.to_string()),
            (8192, 16383, b.to_string()),
        ])))
    }

    /// A key (`quote:` policy) whose slot is `slot`.
    fn key_in(slot: u16) -> Bytes {
        Bytes::from(format!("quote:{{{}}}", slots::tags()[slot as usize]))
    }

    fn fill_with(cache: &Cache, ticket: crate::cache::Ticket, key: &Bytes) -> bool {
        cache.complete_fill(Fill {
            ticket,
            key: key.clone(),
            sig: Bytes::from_static(b"GET"),
            proto: 2,
            reply: Bytes::from_static(b"$1\r\nv\r\n"),
            ttl: Duration::from_secs(60),
        })
    }

    /// A fill of `key` under a ticket taken now, stored at once.
    fn fill(cache: &Cache, key: &Bytes) -> bool {
        fill_with(cache, cache.ticket(key), key)
    }

    fn lookup(cache: &Cache, key: &Bytes) -> Lookup {
        let p = cache.policy(key).unwrap();
        cache.lookup(key, &Bytes::from_static(b"GET"), 2, p, |_| {})
    }

    fn hit(cache: &Cache, key: &Bytes) -> bool {
        matches!(lookup(cache, key), Lookup::Hit)
    }

    fn none(_: u16) -> bool {
        false
    }

    #[test]
    fn l1_serves_the_slots_of_the_masters_whose_feed_is_up() {
        let f = feeds();
        let c = &f.cache;
        let (ka, kb) = (key_in(5), key_in(9000));
        let mut next = 0;
        let (_, added) = f.reconcile(map("a:1", "b:1"), none, &mut next);
        let (ida, idb) = (added[0].1, added[1].1);
        assert!(!c.is_serving());
        assert!(f.up("a:1", ida, "tracking"));
        assert!(c.is_serving(), "a's slots are served");
        assert!(f.gate.is_open(5) && !f.gate.is_open(9000));
        assert!(fill(c, &ka) && hit(c, &ka));
        assert!(
            matches!(lookup(c, &kb), Lookup::NotServing),
            "b's feed is not up"
        );
        assert!(!fill(c, &kb), "nor stored");
        assert!(f.up("b:1", idb, "tracking"));
        assert!(c.feed_state().contains("2/2 masters"), "{}", c.feed_state());
        assert!(fill(c, &kb) && hit(c, &kb));
        assert!(hit(c, &ka), "b's feed coming up left a's slots alone");

        // b's feed goes down: b's entries are not served, a's are; a ticket
        // of b's slot taken before is not stored after, even once b is back.
        let t = c.ticket(&kb);
        f.down("b:1", idb);
        assert!(c.is_serving());
        assert!(!hit(c, &kb), "b's slots closed");
        assert!(matches!(lookup(c, &kb), Lookup::NotServing));
        assert!(hit(c, &ka));
        assert!(
            c.feed_state().contains("1/2 masters up"),
            "{}",
            c.feed_state()
        );
        assert!(f.up("b:1", idb, "tracking"));
        assert!(!fill_with(c, t, &kb), "a ticket from before the drop");
        assert!(!hit(c, &kb), "the entry from before the drop stays dead");
        assert!(hit(c, &ka));
        assert!(fill(c, &kb) && hit(c, &kb));

        // A ticket taken, then the slot drops and comes back in between:
        // never stored.
        let t = c.ticket(&ka);
        f.down("a:1", ida);
        assert!(f.up("a:1", ida, "tracking"));
        assert!(!fill_with(c, t, &ka));

        // The map changes: slot 5 moves to b; a's other slots and b's
        // keep their entries.
        let k6 = key_in(6);
        assert!(fill(c, &ka) && fill(c, &k6) && hit(c, &ka) && hit(c, &k6));
        let t = c.ticket(&ka);
        let moved = Arc::new(map("a:1", "b:1").unwrap().with_owner(5, "b:1"));
        f.reconcile(Some(moved.clone()), none, &mut next);
        assert!(!hit(c, &ka), "the moved slot's entries go");
        assert!(!fill_with(c, t, &ka), "and its fills in flight");
        assert!(hit(c, &k6) && hit(c, &kb), "the others stay");
        assert!(f.gate.is_open(5), "b's feed is up: served again");
        assert!(fill(c, &ka) && hit(c, &ka));
        // b's feed going down now closes slot 5 too, not a's.
        f.down("b:1", idb);
        assert!(!hit(c, &ka) && !hit(c, &kb) && hit(c, &k6));
        assert!(f.up("b:1", idb, "tracking"));

        // A map whose slot goes to a new master: closed until its feed is up.
        assert!(fill(c, &kb) && hit(c, &kb));
        let to_c = Arc::new(moved.with_owner(9000, "c:1"));
        let (_, added) = f.reconcile(Some(to_c.clone()), none, &mut next);
        assert!(!f.gate.is_open(9000) && f.gate.is_open(9001));
        assert!(matches!(lookup(c, &kb), Lookup::NotServing));
        assert!(hit(c, &k6));
        assert!(
            c.feed_state().contains("2/3 masters up"),
            "{}",
            c.feed_state()
        );
        assert!(f.up("c:1", added[0].1, "tracking"));
        assert!(f.gate.is_open(9000));
        assert!(!hit(c, &kb), "the old owner's entry is not back");

        // The same owners, but slot 6 moved away and back between two
        // views seen here: renewed (still open), the others kept.
        assert!(fill(c, &kb) && hit(c, &k6));
        f.reconcile(Some(to_c), |s| s == 6, &mut next);
        assert!(!hit(c, &k6) && hit(c, &kb));
        assert!(f.gate.is_open(6));

        // A replaced feed task reports under its old id: ignored.
        let (removed, _) = f.reconcile(map("a:1", "c:1"), none, &mut next);
        assert_eq!(removed, ["b:1"]);
        let (_, added) = f.reconcile(map("a:1", "b:1"), none, &mut next);
        assert!(!f.up("b:1", idb, "tracking"));
        assert!(!f.gate.is_open(9000), "b's new feed is not up");
        f.down("b:1", idb);
        assert!(f.up("b:1", added[0].1, "tracking"));
        assert!(f.gate.is_open(9000));

        // Every feed down: L1 stops and is emptied.
        assert!(fill(c, &k6));
        f.down("a:1", ida);
        f.down("b:1", added[0].1);
        assert!(!c.is_serving());
        assert_eq!(c.entries(), 0);
    }
}
