//! The invalidation feed: a dedicated upstream connection that tells L1 about
//! writes made anywhere (other pods, `redis-cli` straight on Redis, expiry,
//! eviction, flushes).
//!
//! Two mechanisms, chosen by `cache.invalidation`:
//! - `tracking`: RESP3 `CLIENT TRACKING ON BCAST PREFIX ...` with the cached
//!   patterns' literal prefixes; needs no server configuration.
//! - `keyspace`: `PSUBSCRIBE __keyspace@<db>__:<pattern>` on a server whose
//!   `notify-keyspace-events` has `K` and all key-space classes. Keyspace
//!   events say nothing about FLUSHDB/FLUSHALL, so the same connection also
//!   enables tracking on a prefix no key uses: Redis sends every tracking
//!   client an `invalidate` with a null key list on a flush.
//!
//! L1 serves only while the feed proves that it sees writes: every
//! `feed_health_interval` a canary write through the pool
//! (`SET __nearcache__:canary:<instance>`) must come back on the feed within
//! that interval. That catches a dropped subscription, `CONFIG SET
//! notify-keyspace-events ""` after start, and a feed connected to another
//! server than the pool. And a pool connection that finds a different
//! `run_id` (another server behind the same address) ends the feed too. On
//! connect L1 is cleared and then enabled; when the feed fails it is disabled
//! and cleared before anything else happens. With Sentinel, a master switch
//! ends the feed too (L1 emptied at once), and every reconnect asks the
//! Sentinels where the master is.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::Cache;
use crate::command::literal_prefix;
use crate::config::InvalidationMode;
use crate::error::Error;
use crate::metrics;
use crate::net::{Backoff, BoxStream, FrameReader};
use crate::protocol::{self, ReplyKind};
use crate::upstream::{next_switch, received, Login, ReplyResult, Upstream};

/// A prefix no application key uses: tracking on it only ever reports flushes.
const FLUSH_ONLY_PREFIX: &str = "__nearcache:flush-only__";
/// Where the canary keys live; nothing else uses it.
pub const CANARY_PREFIX: &str = "__nearcache__:canary:";
/// The canary write as a script (see [`write_canary`]).
const CANARY_SCRIPT: &[u8] = b"redis.call('INCR', KEYS[1]) return redis.call('UNLINK', KEYS[1])";

/// Starts the feed task; it runs until `shutdown` is notified.
pub fn start(cache: Arc<Cache>, upstream: Arc<Upstream>, shutdown: Arc<Notify>) {
    if !cache.enabled() {
        cache.set_serving(false, "disabled");
        return;
    }
    let canary_key = Bytes::from(format!("{CANARY_PREFIX}{}", canary_instance()));
    spawn_decay(cache.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let mut failing = false;
        let mut switches = upstream.connector.switches();
        // When the last feed connection ended (a reconnect must not trust the
        // master's address from before; see Connector::connect_since).
        let mut since = None;
        loop {
            let run = run_once(&cache, &upstream, &canary_key, since);
            let result = tokio::select! {
                r = run => r,
                _ = shutdown.notified() => return,
            };
            since = Some(std::time::Instant::now());
            if cache.is_serving() {
                failing = false; // it was up: this is a new outage
            }
            cache.set_serving(false, "down");
            for mode in ["keyspace", "tracking"] {
                metrics::get().feed_up.with_label_values(&[mode]).set(0);
            }
            match result {
                Ok(()) => {
                    backoff.reset();
                    failing = false;
                }
                // One warning per outage; the retries of the same outage go to debug.
                Err(e) if !failing => {
                    warn!(error = %e, "invalidation feed down; L1 disabled until it is back");
                    failing = true;
                }
                Err(e) => tracing::debug!(error = %e, "invalidation feed still down"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.step()) => {}
                // A new master: no reason to wait.
                _ = next_switch(&mut switches) => {}
                _ = shutdown.notified() => return,
            }
        }
    });
}

/// Halves the recent-hit counts every ten seconds until `shutdown`.
pub(super) fn spawn_decay(cache: Arc<Cache>, shutdown: Arc<Notify>) {
    tokio::spawn(async move {
        // "Hot" means recent: hit counts halve every ten seconds.
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = every.tick() => cache.decay_hits(),
                _ = shutdown.notified() => return,
            }
        }
    });
}

/// A new canary key for this process (unique across restarts and pods).
pub(super) fn canary_instance() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

pub(super) type FeedConn = FrameReader<BoxStream>;

/// Sends a command and returns its reply, skipping pushes that arrive first.
pub(super) async fn call(conn: &mut FeedConn, args: &[&[u8]]) -> Result<protocol::Reply, Error> {
    conn.write(&protocol::command(args)).await?;
    loop {
        let r = conn.next().await?;
        if r.kind != ReplyKind::Push {
            return Ok(r);
        }
    }
}

pub(super) fn error_text(r: &protocol::Reply) -> String {
    String::from_utf8_lossy(&r.bytes).trim().to_string()
}

/// Does a `notify-keyspace-events` value deliver every key-space event we need?
pub fn keyspace_flags_sufficient(flags: &str) -> bool {
    let has = |c: char| flags.contains(c);
    // 'A' is an alias for "g$lshzxetd" (and newer classes); 'n' (new key) is not needed.
    has('K') && (has('A') || "g$lshzxetd".chars().all(has))
}

/// Which mechanism to use on this server, or `None` to serve nothing from
/// L1 for now (keyspace forced but the server has no events).
///
/// `auto` is tracking, also on a server whose keyspace events are on, because
/// every sidecar's feed gets every write and tracking carries them cheaper
/// (scripts/fanout; BENCHMARKS.md, "Invalidation fan-out"). BCAST sends each
/// feed one message per event-loop turn with every key written in it (about
/// 120 with a pipelining writer), where keyspace events send one message per
/// key per feed: with 100 to 1,000 feeds a pipelined write cost Redis 2-3x
/// less CPU and 4.7x fewer bytes. With no batching (one write per turn) the
/// two cost about the same. Tracking's messages also leave before the write's
/// own reply, keyspace's after it (p50 12 ms later at 1,000 feeds), and
/// tracking needs neither the server setting nor `CONFIG GET` rights.
pub(super) async fn choose_mode(
    cache: &Cache,
    conn: &mut FeedConn,
) -> Result<Option<InvalidationMode>, Error> {
    if cache.config.invalidation != InvalidationMode::Keyspace {
        return Ok(Some(InvalidationMode::Tracking));
    }
    let flags = read_keyspace_flags(conn).await;
    let sufficient = flags.as_deref().is_some_and(keyspace_flags_sufficient);
    match (cache.config.invalidation, sufficient) {
        (_, true) => Ok(Some(InvalidationMode::Keyspace)),
        (_, false) if cache.config.configure_upstream => {
            let r = call(
                conn,
                &[b"CONFIG", b"SET", b"notify-keyspace-events", b"KEA"],
            )
            .await?;
            if r.kind == ReplyKind::Error {
                cache.set_serving(false, "keyspace events unavailable");
                return Err(Error::Upstream(format!(
                    "CONFIG SET notify-keyspace-events refused: {}",
                    error_text(&r)
                )));
            }
            info!("enabled notify-keyspace-events KEA on the upstream (cache.configure_upstream = true)");
            Ok(Some(InvalidationMode::Keyspace))
        }
        (_, false) => {
            warn!(
                flags = flags.as_deref().unwrap_or("unknown"),
                "cache.invalidation = \"keyspace\" but the upstream's notify-keyspace-events lacks K and A; \
                 serving everything from upstream (set cache.configure_upstream = true or use \"tracking\")"
            );
            cache.set_serving(
                false,
                "keyspace events not enabled upstream: serving from upstream only",
            );
            Ok(None)
        }
    }
}

/// Subscribes the feed connection; returns the mode's label.
pub(super) async fn subscribe(
    cache: &Cache,
    conn: &mut FeedConn,
    mode: InvalidationMode,
    db: u32,
) -> Result<&'static str, Error> {
    let patterns = cache.cached_patterns();
    let everything = cache.config.default_ttl.is_some() || patterns.is_empty();
    if mode == InvalidationMode::Keyspace {
        let mut args: Vec<Vec<u8>> = vec![b"PSUBSCRIBE".to_vec()];
        if everything {
            args.push(format!("__keyspace@{db}__:*").into_bytes());
        } else {
            for p in patterns
                .iter()
                .map(String::as_str)
                .chain([&*format!("{CANARY_PREFIX}*")])
            {
                args.push(format!("__keyspace@{db}__:{p}").into_bytes());
            }
        }
        let n = args.len() - 1;
        conn.write(&protocol::command(&args)).await?;
        // One confirmation push per pattern.
        for _ in 0..n {
            let r = conn.next().await?;
            if r.kind == ReplyKind::Error {
                return Err(Error::Upstream(format!(
                    "PSUBSCRIBE refused: {}",
                    error_text(&r)
                )));
            }
        }
        let r = call(
            conn,
            &[
                b"CLIENT",
                b"TRACKING",
                b"ON",
                b"BCAST",
                b"NOLOOP",
                b"PREFIX",
                FLUSH_ONLY_PREFIX.as_bytes(),
            ],
        )
        .await?;
        if r.kind == ReplyKind::Error {
            return Err(Error::Upstream(format!(
                "CLIENT TRACKING refused: {}",
                error_text(&r)
            )));
        }
        return Ok("keyspace");
    }
    let mut args: Vec<Vec<u8>> = vec![
        b"CLIENT".to_vec(),
        b"TRACKING".to_vec(),
        b"ON".to_vec(),
        b"BCAST".to_vec(),
        // Our own writes (TDengine write-backs) are not news to us.
        b"NOLOOP".to_vec(),
    ];
    let mut prefixes: Vec<&[u8]> = patterns
        .iter()
        .map(|p| literal_prefix(p.as_bytes()))
        .collect();
    prefixes.push(CANARY_PREFIX.as_bytes());
    prefixes.sort();
    prefixes.dedup();
    // Redis refuses overlapping prefixes, and an empty one means every key anyway.
    if !everything && !prefixes.iter().any(|p| p.is_empty()) {
        let mut kept: Vec<&[u8]> = Vec::new();
        for p in prefixes {
            if !kept.iter().any(|k| p.starts_with(k)) {
                kept.push(p);
            }
        }
        for p in kept {
            args.push(b"PREFIX".to_vec());
            args.push(p.to_vec());
        }
    }
    let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
    let r = call(conn, &refs).await?;
    if r.kind == ReplyKind::Error {
        return Err(Error::Upstream(format!(
            "CLIENT TRACKING refused: {}",
            error_text(&r)
        )));
    }
    Ok("tracking")
}

/// The canary write: a script that creates and deletes the key at once, so
/// it is reported to the feed but never seen in the keyspace (DBSIZE, SCAN),
/// or, where scripts are not allowed (`plain`), a SET that expires in a
/// minute. (INCR and UNLINK: command statistics of SET and DEL stay the
/// application's.)
pub(super) fn canary_write(key: &[u8], n: u64, plain: bool) -> Bytes {
    let n = n.to_string();
    if plain {
        protocol::command([&b"SET"[..], key, n.as_bytes(), b"PX", b"60000"])
    } else {
        protocol::command([&b"EVAL"[..], CANARY_SCRIPT, b"1", key, n.as_bytes()])
    }
}

/// Writes the canary ([`canary_write`]) through the pool; the reply comes
/// back on the receiver.
async fn write_canary(
    upstream: &Upstream,
    key: &Bytes,
    n: u64,
    plain: bool,
) -> oneshot::Receiver<ReplyResult> {
    let write = canary_write(key, n, plain);
    match upstream.pool(2).conn(0) {
        Ok(conn) => conn.send(write).await,
        Err(e) => {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Err(Arc::new(e)));
            rx
        }
    }
}

async fn run_once(
    cache: &Arc<Cache>,
    upstream: &Upstream,
    canary_key: &Bytes,
    since: Option<std::time::Instant>,
) -> Result<(), Error> {
    let connector = &upstream.connector;
    let mut switches = connector.switches();
    let connected = connector
        .connect_since(3, &Login::Configured, true, since)
        .await?;
    if *switches.borrow_and_update() != connected.epoch {
        return Err(Error::Upstream(
            "the master changed (Sentinel failover) while the feed connected".into(),
        ));
    }
    let feed_run_id = connected.info.run_id.clone();
    let mut conn = FrameReader::new(connected.stream, connected.leftover);
    let db = connector.config().url.db;
    let Some(mode) = choose_mode(cache, &mut conn).await? else {
        // Re-check now and then: the operator may fix the server.
        tokio::time::sleep(Duration::from_secs(5)).await;
        return Ok(());
    };
    let mode_label = subscribe(cache, &mut conn, mode, db).await?;
    let mut run_ids = upstream.run_id();
    let other_server =
        |seen: &Option<String>| seen.is_some() && feed_run_id.is_some() && *seen != feed_run_id;
    if other_server(&run_ids.borrow_and_update()) {
        return Err(Error::Upstream(
            "the pool and the feed reach different servers (run_id)".into(),
        ));
    }

    // Requests from the rest of nearcache (barriers, write-backs); the
    // replies they are owed come back in order between the pushes.
    let (request_tx, mut requests) = tokio::sync::mpsc::channel(super::FEED_REQUESTS);
    let _open = RequestsOpen::new(cache, request_tx);
    let mut owed: VecDeque<Owed> = VecDeque::new();

    // Whatever was cached before this point may have missed invalidations.
    cache.clear_all("feed_reconnect");
    cache.set_serving(true, mode_label);
    let m = metrics::get();
    m.feed_up.with_label_values(&[mode_label]).set(1);
    m.feed_reconnects_total.inc();
    info!(mode = mode_label, "invalidation feed up; L1 serving");

    let keyspace_prefix = format!("__keyspace@{db}__:").into_bytes();
    let interval = cache.config.feed_health_interval;
    let canary = cache.config.feed_canary;
    // The canary (or, without it, a PING) in flight: when it was sent, and
    // the canary write's own reply while it is owed.
    let mut probe: Option<(Instant, Option<oneshot::Receiver<ReplyResult>>)> = None;
    let mut next_probe = Instant::now();
    let mut count = 0u64;
    let mut plain = false;
    loop {
        let deadline = probe
            .as_ref()
            .map_or(next_probe, |(sent, _)| *sent + interval);
        let write_reply = async {
            match probe.as_mut().and_then(|(_, rx)| rx.as_mut()) {
                Some(rx) => received(rx.await),
                None => std::future::pending().await,
            }
        };
        let frame = tokio::select! {
            r = conn.next() => r?,
            _ = cache.feed_restart.notified() => {
                info!("key policies changed; re-establishing the invalidation feed");
                return Ok(());
            }
            Some(first) = requests.recv() => {
                // Barriers: one `PING` for all that are waiting; its reply
                // comes after every push Redis queued before it.
                let mut batch = Vec::new();
                let mut next = Some(first);
                while let Some(request) = next {
                    match request {
                        super::FeedRequest::Barrier(tx) => batch.push(tx),
                        super::FeedRequest::WriteBack(wb) => {
                            conn.write(&wb.set).await?;
                            owed.push_back(Owed::WriteBack(wb));
                        }
                    }
                    next = requests.try_recv().ok();
                }
                if !batch.is_empty() {
                    conn.write(&protocol::command([&b"PING"[..], b"sync"])).await?;
                    owed.push_back(Owed::Sync(batch));
                }
                continue;
            }
            _ = next_switch(&mut switches) => {
                // Whatever L1 holds came from the old master, which may have
                // acknowledged writes the new one never got. Ending the feed
                // takes the path of a changed run_id: L1 stops serving at
                // once and is emptied before it serves again. (The pool's
                // reconnect would report the new run_id too, but only after
                // a resolution and a handshake.)
                return Err(Error::Upstream("the master changed (Sentinel failover)".into()));
            }
            r = run_ids.changed() => {
                if r.is_ok() && other_server(&run_ids.borrow_and_update()) {
                    return Err(Error::Upstream("the upstream is a different server now (run_id changed)".into()));
                }
                continue;
            }
            r = write_reply => {
                let refused = match r {
                    Err(e) => return Err(Error::Upstream(format!("canary write failed: {e}"))),
                    Ok(reply) => reply.error_text(),
                };
                match refused {
                    Some(why) if !plain => {
                        warn!(error = %why, "the canary script was refused; using a plain SET (it stays a minute)");
                        plain = true;
                        let rx = write_canary(upstream, canary_key, count, plain).await;
                        probe = Some((Instant::now(), Some(rx)));
                    }
                    Some(why) => return Err(Error::Upstream(format!("canary write refused: {why}"))),
                    None => {
                        if let Some((_, rx)) = probe.as_mut() {
                            *rx = None;
                        }
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(deadline) => {
                if probe.is_some() {
                    let what = if canary { "the canary write was not seen on the feed" } else { "no PONG" };
                    return Err(Error::Upstream(format!("invalidation feed stalled: {what} within {interval:?}")));
                }
                count += 1;
                let reply = if canary {
                    Some(write_canary(upstream, canary_key, count, plain).await)
                } else {
                    conn.write(&protocol::command([b"PING"])).await?;
                    owed.push_back(Owed::Pong);
                    None
                };
                probe = Some((Instant::now(), reply));
                continue;
            }
        };
        let answered = match (frame.kind, owed.pop_front()) {
            (ReplyKind::Push, front) => {
                if let Some(front) = front {
                    owed.push_front(front);
                }
                handle_push(cache, &frame.bytes, &keyspace_prefix, Some(canary_key))
            }
            (kind, Some(Owed::WriteBack(wb))) => {
                let outcome = match kind {
                    ReplyKind::Error => super::WriteBackOutcome::Refused(error_text(&frame)),
                    ReplyKind::Nil => super::WriteBackOutcome::Exists,
                    _ => {
                        cache.written_back(&wb);
                        super::WriteBackOutcome::Written
                    }
                };
                let _ = wb.done.send(outcome);
                false
            }
            (ReplyKind::Error, _) => {
                return Err(Error::Upstream(format!(
                    "invalidation feed error: {}",
                    error_text(&frame)
                )));
            }
            (_, Some(Owed::Sync(batch))) => {
                for waiter in batch {
                    let _ = waiter.send(());
                }
                false
            }
            // The PONG of the health check without a canary.
            (_, Some(Owed::Pong)) => true,
            (_, None) => {
                return Err(Error::Upstream(format!(
                    "invalidation feed: unexpected reply {}",
                    error_text(&frame)
                )));
            }
        };
        if answered {
            if let Some((sent, _)) = probe.take() {
                next_probe = sent + interval;
            }
        }
    }
}

async fn read_keyspace_flags(conn: &mut FeedConn) -> Option<String> {
    let r = call(conn, &[b"CONFIG", b"GET", b"notify-keyspace-events"])
        .await
        .ok()?;
    if r.kind == ReplyKind::Error {
        return None;
    }
    // RESP3: %1 $22 notify-keyspace-events $N flags
    let parts = protocol::reply_strings(&r.bytes)?;
    parts
        .get(1)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A reply the feed connection owes us, in the order the requests went out.
enum Owed {
    /// The health check's PING (no canary).
    Pong,
    /// A barrier's `PING sync`, for everyone who asked for it.
    Sync(Vec<oneshot::Sender<()>>),
    WriteBack(super::WriteBack),
}

/// Makes the feed take requests while it runs; when it ends, waiting
/// requests fail (barrier fills drop what they would have raced with;
/// write-backs are not retried: nobody knows whether they ran).
struct RequestsOpen<'a>(&'a Cache);

impl<'a> RequestsOpen<'a> {
    fn new(cache: &'a Cache, requests: super::FeedRequests) -> Self {
        cache.set_feed_requests(Some(requests));
        RequestsOpen(cache)
    }
}

impl Drop for RequestsOpen<'_> {
    fn drop(&mut self) {
        self.0.set_feed_requests(None);
    }
}

/// Applies one push; true if it reported the canary key.
pub(super) fn handle_push(
    cache: &Cache,
    bytes: &Bytes,
    keyspace_prefix: &[u8],
    canary_key: Option<&[u8]>,
) -> bool {
    let Some(parts) = push_parts(bytes) else {
        return false;
    };
    let mut canary = false;
    let mut invalidate = |key: &[u8]| {
        if Some(key) == canary_key {
            canary = true;
        } else {
            cache.invalidate(key, "feed");
        }
    };
    match parts.kind.as_slice() {
        b"invalidate" => match parts.keys {
            None => cache.clear_all("flush"),
            Some(keys) => keys.iter().for_each(|k| invalidate(k)),
        },
        b"pmessage" => {
            // [pmessage, pattern, channel, event]
            if let Some(key) = parts
                .strings
                .get(1)
                .and_then(|c| c.strip_prefix(keyspace_prefix))
            {
                invalidate(key);
            }
        }
        _ => {}
    }
    canary
}

struct PushParts {
    kind: Vec<u8>,
    /// For `invalidate`: the keys, or None for a flush.
    keys: Option<Vec<Bytes>>,
    /// For messages: the elements after the kind.
    strings: Vec<Bytes>,
}

/// Reads `>2 invalidate *N keys...` / `>2 invalidate _` / `>4 pmessage p ch ev`,
/// one level deep (a deeper frame is just not a message we know).
fn push_parts(bytes: &Bytes) -> Option<PushParts> {
    if bytes.first() != Some(&b'>') {
        return None;
    }
    let items = protocol::elements(bytes)?;
    let item = |i: usize| items.get(i).map(|r| &bytes[r.clone()]);
    let kind = protocol::first_word(bytes)?.to_vec();
    if kind == b"invalidate" {
        let keys = item(1)?;
        let keys = match keys.first() {
            Some(b'_') => None,
            Some(b'*') if keys.starts_with(b"*-1") => None,
            Some(b'*') => Some(protocol::reply_strings(keys)?),
            _ => return None,
        };
        return Some(PushParts {
            kind,
            keys,
            strings: Vec::new(),
        });
    }
    Some(PushParts {
        kind,
        keys: None,
        strings: protocol::reply_strings(bytes)?
            .into_iter()
            .skip(1)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_flags() {
        assert!(keyspace_flags_sufficient("AKE"));
        assert!(keyspace_flags_sufficient("Kg$lshzxetd"));
        assert!(!keyspace_flags_sufficient("AE"));
        assert!(!keyspace_flags_sufficient("Kg$"));
        assert!(!keyspace_flags_sufficient(""));
    }

    #[test]
    fn pushes_are_read() {
        let p = push_parts(&Bytes::from_static(
            b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n",
        ))
        .unwrap();
        assert_eq!(
            p.keys.unwrap(),
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]
        );
        let p = push_parts(&Bytes::from_static(b">2\r\n$10\r\ninvalidate\r\n_\r\n")).unwrap();
        assert!(p.keys.is_none());
        let p = push_parts(&Bytes::from_static(
            b">4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$17\r\n__keyspace@0__:k1\r\n$3\r\nset\r\n",
        ))
        .unwrap();
        assert_eq!(p.kind, b"pmessage");
        assert_eq!(p.strings[1], Bytes::from_static(b"__keyspace@0__:k1"));
    }
}
