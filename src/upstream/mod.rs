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
//! Every connection is bound to one upstream address; routing by hash slot
//! (Redis Cluster) will pick a [`Pool`] per node behind the same interface.

pub mod cluster;
mod connector;
mod mux;
mod pinned;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

pub use connector::{Connected, Connector, Login, ServerInfo};
pub use mux::{received, MuxConn, ReplyResult};
pub use pinned::{PinnedConn, PinnedFrame, PinnedPool};

use crate::error::Error;
use crate::metrics;
use crate::net::Backoff;

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
    /// `addr` is the node every connection goes to (the URL's host for a
    /// single Redis, one master of a cluster).
    pub(crate) fn start(
        connector: Connector,
        addr: String,
        proto: u8,
        size: usize,
        run_id: Arc<watch::Sender<Option<String>>>,
        shutdown: Arc<Notify>,
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
                addr: addr.clone(),
                proto,
                slot: slot.clone(),
                last_error: pool.last_error.clone(),
                info: pool.info.clone(),
                up: pool.up.clone(),
                run_id: run_id.clone(),
                shutdown: shutdown.clone(),
            }));
        }
        pool
    }

    /// The connection for a client bound to `slot`, or why there is none.
    pub fn conn(&self, slot: usize) -> Result<Arc<MuxConn>, Error> {
        let s = &self.slots[slot % self.slots.len()];
        if let Some(c) = s.conn.read().as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        // Another slot may be up while this one reconnects; a client moves
        // only once its old connection is dead, so its order holds.
        for other in &self.slots {
            if let Some(c) = other.conn.read().as_ref() {
                if c.is_alive() {
                    return Ok(c.clone());
                }
            }
        }
        Err(Error::Upstream(self.last_error.read().clone()))
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
    addr: String,
    proto: u8,
    slot: Arc<Slot>,
    last_error: Arc<RwLock<String>>,
    info: Arc<RwLock<Option<ServerInfo>>>,
    up: Arc<AtomicUsize>,
    run_id: Arc<watch::Sender<Option<String>>>,
    shutdown: Arc<Notify>,
}

async fn supervise(s: Supervised) {
    let m = metrics::get();
    let cfg = s.connector.config();
    let mut backoff = Backoff::new(cfg.reconnect_backoff_max);
    loop {
        match s
            .connector
            .connect_to(&s.addr, s.proto, &Login::Configured, true)
            .await
        {
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
                let conn = MuxConn::start(connected, cfg.command_timeout, MUX_QUEUE);
                *s.slot.conn.write() = Some(conn.clone());
                s.up.fetch_add(1, Ordering::Relaxed);
                m.upstream_pool_connections.inc();
                m.upstream_reconnects_total.inc();
                m.upstream_up.set(1);
                info!(upstream = %cfg.url.redacted(), proto = s.proto, "upstream connection up");
                tokio::select! {
                    _ = conn.closed() => {}
                    _ = s.shutdown.notified() => conn.close(),
                }
                s.up.fetch_sub(1, Ordering::Relaxed);
                m.upstream_pool_connections.dec();
                *s.slot.conn.write() = None;
                warn!(upstream = %cfg.url.redacted(), "upstream connection lost; reconnecting");
            }
            Err(e) => {
                m.upstream_errors_total
                    .with_label_values(&["connect"])
                    .inc();
                m.upstream_up.set(0);
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
            _ = s.shutdown.notified() => return,
        }
    }
}

/// The upstream Redis as seen by the rest of nearcache.
pub struct Upstream {
    pub connector: Connector,
    resp2: Pool,
    resp3: Pool,
    control: Pool,
    pub pinned: PinnedPool,
    run_id: Arc<watch::Sender<Option<String>>>,
    shutdown: Arc<Notify>,
}

impl Upstream {
    pub fn start(connector: Connector) -> Upstream {
        let shutdown = Arc::new(Notify::new());
        let run_id = Arc::new(watch::channel(None).0);
        let cfg = connector.config();
        let size = cfg.pool_size;
        let max_pinned = cfg.max_pinned;
        let pool = |proto, size| {
            Pool::start(
                connector.clone(),
                cfg.url.address(),
                proto,
                size,
                run_id.clone(),
                shutdown.clone(),
            )
        };
        Upstream {
            resp2: pool(2, size),
            resp3: pool(3, size),
            control: pool(2, 1),
            pinned: PinnedPool::new(connector.clone(), max_pinned),
            connector,
            run_id,
            shutdown,
        }
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

    /// The HELLO reply of the server for `proto`, if a pool connection is up.
    pub fn hello(&self, proto: u8) -> Option<Bytes> {
        self.pool(proto).server().map(|s| s.hello)
    }

    /// Is at least one shared connection up?
    pub fn is_up(&self) -> bool {
        self.resp2.connected() > 0
    }

    pub fn stop(&self) {
        self.shutdown.notify_waiters();
        self.pinned.close_idle();
    }
}
