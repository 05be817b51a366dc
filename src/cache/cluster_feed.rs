//! Invalidation with a Redis Cluster upstream: one feed connection per
//! master in the current slot map, each subscribed the way [`super::feed`]
//! subscribes its one connection (tracking BCAST or keyspace events; a
//! node reports writes to the keys it holds, so every master must have one).
//!
//! The rule is global, the simplest one that is correct: L1 serves only
//! while the feed of *every* master in the map is up. A feed that comes up
//! empties L1 (what was cached before may have missed that master's
//! invalidations), one that goes down stops L1 and empties it, and every
//! change of the slot map (a refresh or an applied `MOVED`) empties it too
//! (entries were filled from the old owners). Emptying bumps the global
//! epoch, so a fill whose ticket predates any of these is never stored.
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
use super::Cache;
use crate::error::Error;
use crate::metrics;
use crate::net::{Backoff, FrameReader};
use crate::protocol::{self, ReplyKind};
use crate::upstream::cluster::router::Router;
use crate::upstream::cluster::slots;
use crate::upstream::cluster::topology::Topology;
use crate::upstream::{Login, ReplyResult};

/// Which masters have a feed, and which of those feeds are up.
struct Feeds {
    cache: Arc<Cache>,
    members: Mutex<Members>,
}

struct Members {
    /// Master address → (the id of its current feed task, up?). A task
    /// that was replaced reports under an old id and is ignored.
    feeds: HashMap<String, (u64, bool)>,
    /// The mode the feeds subscribed with (for `NEARCACHE STATS`, metrics).
    mode: &'static str,
}

impl Feeds {
    /// Serving follows the members, decided under their lock so that a
    /// feed going down and another coming up cannot interleave wrongly.
    fn settle(&self, members: &Members) {
        let mode = members.mode;
        let up = members.feeds.values().filter(|m| m.1).count();
        let all = !members.feeds.is_empty() && up == members.feeds.len();
        let state = if all {
            format!("{mode} ({up}/{} masters)", members.feeds.len())
        } else {
            format!("down ({up}/{} masters up)", members.feeds.len())
        };
        let m = metrics::get();
        if all {
            self.cache.set_serving(true, &state);
            m.feed_up.with_label_values(&[mode]).set(1);
        } else {
            self.cache.set_serving(false, &state);
            for mode in ["keyspace", "tracking"] {
                m.feed_up.with_label_values(&[mode]).set(0);
            }
        }
    }

    /// The feed `id` of `addr` is subscribed; false if it was replaced.
    fn up(&self, addr: &str, id: u64, mode: &'static str) -> bool {
        let mut members = self.members.lock();
        match members.feeds.get_mut(addr) {
            Some(m) if m.0 == id => {
                // Whatever was cached before may have missed this master's writes.
                self.cache.clear_all("feed_reconnect");
                m.1 = true;
            }
            _ => return false,
        }
        members.mode = mode;
        metrics::get().feed_reconnects_total.inc();
        self.settle(&members);
        true
    }

    fn down(&self, addr: &str, id: u64) {
        let mut members = self.members.lock();
        if let Some(m) = members.feeds.get_mut(addr).filter(|m| m.0 == id) {
            m.1 = false;
        }
        self.settle(&members);
    }

    /// Makes the members the map's masters; returns the ones removed and
    /// the ones added (each with its new id). L1 is emptied either way:
    /// the map changed.
    fn reconcile(
        &self,
        masters: &[String],
        next_id: &mut u64,
    ) -> (Vec<String>, Vec<(String, u64)>) {
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
        for a in masters {
            if !members.feeds.contains_key(a) {
                *next_id += 1;
                members.feeds.insert(a.clone(), (*next_id, false));
                added.push((a.clone(), *next_id));
            }
        }
        self.cache.clear_all("topology");
        self.settle(&members);
        (removed, added)
    }
}

/// Starts the feeds' supervisor: it follows the slot map (a feed per
/// master), restarts every feed when the key policies change, and ends
/// them all on `shutdown`.
pub fn start(cache: Arc<Cache>, router: Arc<Router>, shutdown: Arc<Notify>) {
    if !cache.enabled() {
        cache.set_serving(false, "disabled");
        return;
    }
    feed::spawn_decay(cache.clone(), shutdown.clone());
    let instance = feed::canary_instance();
    let feeds = Arc::new(Feeds {
        cache: cache.clone(),
        members: Mutex::new(Members {
            feeds: HashMap::new(),
            mode: "tracking",
        }),
    });
    tokio::spawn(async move {
        let mut maps = router.view().subscribe();
        let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut next_id = 0u64;
        // The map last reconciled (`None` until then or after a restart).
        let mut last: Option<Arc<Topology>> = None;
        loop {
            let now = maps.borrow_and_update().clone();
            // Only replicas changed (one failed, joined, was promoted
            // without its master's slots moving yet): L1 is filled from
            // masters only, so nothing cached is in doubt.
            let replicas_only = matches!((&last, &now), (Some(l), Some(n)) if l.same_owners(n));
            let masters = now
                .as_ref()
                .map(|t| t.masters().to_vec())
                .unwrap_or_default();
            last = now;
            if !replicas_only {
                let (removed, added) = feeds.reconcile(&masters, &mut next_id);
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
                    feeds.members.lock().feeds.clear();
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
                warn!(master = %addr, error = %e, "invalidation feed down; L1 disabled until it is back");
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
    use crate::cache::Fill;

    fn feeds() -> Feeds {
        let mut cfg = crate::config::Config::defaults().cache;
        cfg.max_bytes = 1 << 20;
        Feeds {
            cache: Cache::new(cfg),
            members: Mutex::new(Members {
                feeds: HashMap::new(),
                mode: "tracking",
            }),
        }
    }

    fn masters(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A fill of `key` under a ticket taken now, stored at once.
    fn fill(cache: &Cache, key: &'static str) -> bool {
        let key = Bytes::from_static(key.as_bytes());
        cache.complete_fill(Fill {
            ticket: cache.ticket(&key),
            key,
            sig: Bytes::from_static(b"GET"),
            proto: 2,
            reply: Bytes::from_static(b"$1\r\nv\r\n"),
            ttl: Duration::from_secs(60),
        })
    }

    #[test]
    fn l1_serves_only_while_every_master_feed_is_up() {
        let f = feeds();
        let mut next = 0;
        let (_, added) = f.reconcile(&masters(&["a:1", "b:1"]), &mut next);
        assert!(!f.cache.is_serving());
        assert!(f.up("a:1", added[0].1, "tracking"));
        assert!(!f.cache.is_serving(), "one of two feeds");
        assert!(f.up("b:1", added[1].1, "tracking"));
        assert!(f.cache.is_serving());
        assert!(fill(&f.cache, "quote:1"));
        assert_eq!(f.cache.entries(), 1);
        // A ticket taken before a feed goes down is not stored after.
        let key = Bytes::from_static(b"quote:2");
        let ticket = f.cache.ticket(&key);
        f.down("b:1", added[1].1);
        assert!(!f.cache.is_serving());
        assert_eq!(f.cache.entries(), 0, "emptied when a feed went");
        assert!(f.up("b:1", added[1].1, "tracking"));
        assert!(!f.cache.complete_fill(Fill {
            ticket,
            key,
            sig: Bytes::from_static(b"GET"),
            proto: 2,
            reply: Bytes::from_static(b"$1\r\nv\r\n"),
            ttl: Duration::from_secs(60),
        }));
        let (removed, added2) = f.reconcile(&masters(&["a:1", "c:1"]), &mut next);
        assert_eq!(removed, ["b:1"]);
        assert!(!f.cache.is_serving(), "c:1 has no feed yet");
        assert!(f.up("c:1", added2[0].1, "tracking"));
        assert!(f.cache.is_serving());
        // b:1 leaves and comes back: its old feed task (aborted, maybe
        // still running to its next await) reports under its old id: ignored.
        let (_, added3) = f.reconcile(&masters(&["a:1", "b:1", "c:1"]), &mut next);
        assert!(!f.up("b:1", added[1].1, "tracking"));
        assert!(!f.cache.is_serving(), "b:1's new feed is not up");
        f.down("b:1", added[1].1);
        assert!(f.up("b:1", added3[0].1, "tracking"));
        assert!(f.cache.is_serving());
        // A map change with the same masters empties L1 and keeps serving.
        assert!(fill(&f.cache, "quote:3"));
        f.reconcile(&masters(&["a:1", "b:1", "c:1"]), &mut next);
        assert!(f.cache.is_serving());
        assert_eq!(f.cache.entries(), 0);
    }
}
