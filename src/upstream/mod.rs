//! The upstream Redis as the rest of nearcache sees it: a small pool of
//! multiplexed connections per RESP version shared by all clients, pinned
//! connections for clients in a stateful mode, and one control connection
//! for the commands that must act while everything else waits (SCRIPT KILL
//! and friends).
//!
//! A supervisor per pool slot reconnects with backoff. Every pool
//! connection's handshake also reads the server's `run_id`, published on a
//! watch channel: a different run_id means a different server (a restart
//! without persistence, a failover behind a VIP), and L1 must not outlive it.
//!
//! Every connection is bound to one upstream address. With Sentinel that
//! address is the master's, and every connection closes when the master
//! moves (see [`sentinel`]). With a Redis Cluster the shared pools are not
//! started ([`Upstream::start_cluster`]): the router ([`cluster::router`])
//! keeps a [`Pool`] per node and answers for the upstream.

pub mod cluster;
mod connector;
mod health;
mod mux;
mod pinned;
pub mod sentinel;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

pub use connector::{Connected, Connector, Dial, Login, ServerInfo};
pub use health::Health;
pub use mux::{received, timed_out, MuxConn, ReplyResult};
pub use pinned::{PinnedConn, PinnedFrame, PinnedPool};
pub use sentinel::{next_switch, Sentinel};

use crate::error::Error;
use crate::metrics;
use crate::net::Backoff;
use cluster::router::Router;

/// Jobs a multiplexed connection queues before senders wait.
const MUX_QUEUE: usize = 4096;

/// One slot of a pool: its current connection, replaced by its supervisor.
struct Slot {
    conn: RwLock<Option<Arc<MuxConn>>>,
}

/// Multiplexed connections of one protocol version.
pub struct Pool {
    slots: Vec<Arc<Slot>>,
    /// Last connection error, for fast failure replies.
    last_error: Arc<RwLock<String>>,
    /// The last handshake's view of the server.
    info: Arc<RwLock<Option<ServerInfo>>>,
    up: Arc<AtomicUsize>,
}

impl Pool {
    /// `dial` is where every connection goes: the configured upstream (a
    /// single Redis, or the master Sentinel names), or one node of a
    /// cluster (then `health` checks that node). Without `health`, a late
    /// reply ends its connection at once.
    pub(crate) fn start(
        connector: Connector,
        dial: Dial,
        proto: u8,
        size: usize,
        run_id: Arc<watch::Sender<Option<String>>>,
        shutdown: Arc<Notify>,
        health: Option<Arc<Health>>,
    ) -> Pool {
        let pool = Pool {
            slots: (0..size.max(1))
                .map(|_| {
                    Arc::new(Slot {
                        conn: RwLock::new(None),
                    })
                })
                .collect(),
            last_error: Arc::new(RwLock::new("not connected yet".to_string())),
            info: Arc::new(RwLock::new(None)),
            up: Arc::new(AtomicUsize::new(0)),
        };
        for slot in &pool.slots {
            tokio::spawn(supervise(Supervised {
                connector: connector.clone(),
                dial: dial.clone(),
                proto,
                slot: slot.clone(),
                last_error: pool.last_error.clone(),
                info: pool.info.clone(),
                up: pool.up.clone(),
                run_id: run_id.clone(),
                shutdown: shutdown.clone(),
                health: health.clone(),
            }));
        }
        pool
    }

    /// A pool that never connects: a cluster's stand-in for the shared
    /// pools of a single Redis (its nodes' pools are the router's), so
    /// nothing dials the first seed. Every `conn` fails with `why`.
    fn unused(why: &str) -> Pool {
        Pool {
            slots: vec![Arc::new(Slot {
                conn: RwLock::new(None),
            })],
            last_error: Arc::new(RwLock::new(why.to_string())),
            info: Arc::new(RwLock::new(None)),
            up: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The connection for a client bound to `slot`, or why there is none:
    /// its own slot's unless that one is down or stuck behind a late reply
    /// and another is not (a client moves only with nothing owed, so its
    /// order holds).
    pub fn conn(&self, slot: usize) -> Result<Arc<MuxConn>, Error> {
        let n = self.slots.len();
        let up = |i: usize| {
            self.slots[i % n]
                .conn
                .read()
                .as_ref()
                .filter(|c| c.is_alive())
                .cloned()
        };
        let mut fallback = None;
        for i in slot..slot + n {
            if let Some(c) = up(i) {
                if !c.is_late() {
                    return Ok(c);
                }
                fallback.get_or_insert(c);
            }
        }
        fallback.ok_or_else(|| Error::Upstream(self.last_error.read().clone()))
    }

    /// The upstream's HELLO reply in this pool's protocol, and its version.
    pub fn server(&self) -> Option<ServerInfo> {
        self.info.read().clone()
    }

    pub fn connected(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> usize {
        self.slots.len()
    }
}

struct Supervised {
    connector: Connector,
    dial: Dial,
    proto: u8,
    slot: Arc<Slot>,
    last_error: Arc<RwLock<String>>,
    info: Arc<RwLock<Option<ServerInfo>>>,
    up: Arc<AtomicUsize>,
    run_id: Arc<watch::Sender<Option<String>>>,
    shutdown: Arc<Notify>,
    health: Option<Arc<Health>>,
}

async fn supervise(s: Supervised) {
    let m = metrics::get();
    let cfg = s.connector.config();
    let mut backoff = Backoff::new(cfg.reconnect_backoff_max);
    let mut switches = s.connector.switches();
    // When the last connection was lost or the last attempt failed: with
    // Sentinel, a reconnect asks the Sentinels again rather than trusting
    // the address it had.
    let mut since: Option<Instant> = None;
    // A cluster node's pool leaves `upstream_up` alone: one node down is
    // not the cluster down (the gauge follows `Router::is_up` there).
    let configured = matches!(s.dial, Dial::Configured);
    loop {
        if pool_dropped(&s) {
            return;
        }
        match s.connector.connect_via(&s.dial, s.proto, since).await {
            Ok(connected) if pool_dropped(&s) => drop(connected),
            Ok(connected) if *switches.borrow_and_update() != connected.epoch => {
                // Opened to the master of before a switch that came meanwhile.
                since = Some(Instant::now());
                continue;
            }
            Ok(connected) => {
                backoff.reset();
                if let Some(id) = &connected.info.run_id {
                    s.run_id.send_if_modified(|seen| {
                        if seen.as_deref() == Some(id.as_str()) {
                            return false;
                        }
                        if seen.is_some() {
                            warn!(run_id = %id, "the upstream is a different server now (run_id changed)");
                        }
                        *seen = Some(id.clone());
                        true
                    });
                }
                *s.info.write() = Some(connected.info.clone());
                let addr = connected.addr.clone();
                let conn =
                    MuxConn::start(connected, cfg.command_timeout, MUX_QUEUE, s.health.clone());
                *s.slot.conn.write() = Some(conn.clone());
                s.up.fetch_add(1, Ordering::Relaxed);
                m.upstream_pool_connections.inc();
                m.upstream_reconnects_total.inc();
                if configured {
                    m.upstream_up.set(1);
                }
                info!(upstream = %cfg.url.redacted(), %addr, proto = s.proto, "upstream connection up");
                let switched = tokio::select! {
                    _ = conn.closed() => false,
                    _ = s.shutdown.notified() => { conn.close(); false }
                    _ = next_switch(&mut switches) => { conn.close(); true }
                };
                since = Some(Instant::now());
                s.up.fetch_sub(1, Ordering::Relaxed);
                m.upstream_pool_connections.dec();
                *s.slot.conn.write() = None;
                if pool_dropped(&s) {
                    return;
                }
                if switched {
                    *s.last_error.write() =
                        "the master changed (Sentinel failover); reconnecting".into();
                    // Straight to the new master: no backoff for a switch.
                    continue;
                }
                warn!(upstream = %cfg.url.redacted(), "upstream connection lost; reconnecting");
            }
            Err(e) => {
                since = Some(Instant::now());
                m.upstream_errors_total
                    .with_label_values(&["connect"])
                    .inc();
                if configured {
                    m.upstream_up.set(0);
                }
                let text = e.to_string();
                let text = text
                    .strip_prefix("upstream unavailable: ")
                    .unwrap_or(&text)
                    .to_string();
                debug!(error = %text, "upstream connect failed");
                *s.last_error.write() = text;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.step()) => {}
            // A failover announced while we wait: the new master is worth trying now.
            _ = next_switch(&mut switches) => {}
            _ = s.shutdown.notified() => return,
        }
    }
}

/// Nobody holds the pool any more (a cluster master that left the map):
/// its connections are not wanted, now or later.
fn pool_dropped(s: &Supervised) -> bool {
    Arc::strong_count(&s.slot) == 1
}

/// The upstream Redis as seen by the rest of nearcache.
pub struct Upstream {
    pub connector: Connector,
    resp2: Pool,
    resp3: Pool,
    control: Pool,
    pub pinned: PinnedPool,
    /// Liveness checks for late replies (see `health.rs`).
    pub health: Arc<Health>,
    run_id: Arc<watch::Sender<Option<String>>>,
    shutdown: Arc<Notify>,
    /// With a Redis Cluster: the router, which answers for the upstream
    /// (HELLO's fields, up or not); the shared pools above are then unused.
    cluster: Option<Arc<Router>>,
}

impl Upstream {
    pub fn start(connector: Connector) -> Upstream {
        let shutdown = Arc::new(Notify::new());
        let run_id = Arc::new(watch::channel(None).0);
        let cfg = connector.config();
        let size = cfg.pool_size;
        let max_pinned = cfg.max_pinned;
        let health = Health::new(connector.clone());
        let pool = |proto, size| {
            Pool::start(
                connector.clone(),
                Dial::Configured,
                proto,
                size,
                run_id.clone(),
                shutdown.clone(),
                Some(health.clone()),
            )
        };
        if let Some(sentinel) = connector.sentinel() {
            tokio::spawn(sentinel.clone().watch(connector.clone(), shutdown.clone()));
        }
        Upstream {
            resp2: pool(2, size),
            resp3: pool(3, size),
            control: pool(2, 1),
            pinned: PinnedPool::new(connector.clone(), max_pinned),
            health,
            connector,
            run_id,
            shutdown,
            cluster: None,
        }
    }

    /// The upstream of a Redis Cluster: no shared pools (they would all
    /// connect to the first seed, which may be down or no longer a node);
    /// requests go through `router`, which also answers HELLO's fields and
    /// [`Upstream::is_up`]. Pinned connections are opened per node
    /// (`PinnedPool::acquire_at`).
    pub fn start_cluster(connector: Connector, router: Arc<Router>) -> Upstream {
        let cfg = connector.config();
        let unused = || Pool::unused("no shared connection with a Redis Cluster upstream");
        Upstream {
            resp2: unused(),
            resp3: unused(),
            control: unused(),
            pinned: PinnedPool::new(connector.clone(), cfg.max_pinned),
            health: Health::new(connector.clone()),
            run_id: Arc::new(watch::channel(None).0),
            shutdown: Arc::new(Notify::new()),
            cluster: Some(router),
            connector,
        }
    }

    /// The Sentinels, for a `redis-sentinel://` upstream.
    pub fn sentinel(&self) -> Option<&Arc<Sentinel>> {
        self.connector.sentinel()
    }

    pub fn pool(&self, proto: u8) -> &Pool {
        if proto == 3 {
            &self.resp3
        } else {
            &self.resp2
        }
    }

    /// The connection for commands that must not queue behind other
    /// clients' requests (SCRIPT KILL, CLIENT UNBLOCK, ...).
    pub fn control(&self) -> Result<Arc<MuxConn>, Error> {
        self.control.conn(0)
    }

    /// The server's run_id as last seen by a pool connection; changes when
    /// the upstream is a different server.
    pub fn run_id(&self) -> watch::Receiver<Option<String>> {
        self.run_id.subscribe()
    }

    /// The HELLO reply of the server for `proto`, if a pool connection is
    /// up; with a cluster, a live master's (see [`Router::server`]).
    pub async fn hello(&self, proto: u8) -> Option<Bytes> {
        match &self.cluster {
            Some(router) => router.server(proto).await.map(|s| s.hello),
            None => self.pool(proto).server().map(|s| s.hello),
        }
    }

    /// Is at least one shared connection up? With a cluster: does the
    /// router know the slot map, and did its last refresh get an answer
    /// ([`Router::is_up`])?
    pub fn is_up(&self) -> bool {
        match &self.cluster {
            Some(router) => router.is_up(),
            None => self.resp2.connected() > 0,
        }
    }

    pub fn stop(&self) {
        self.shutdown.notify_waiters();
        self.pinned.close_idle();
    }
}
