//! Telling a busy upstream from a dead one.
//!
//! A request with no reply after `command_timeout` may be slow (a long
//! script, `DEBUG SLEEP`, a big `KEYS`) or lost (Redis stopped, the network
//! cut). Waiting longer on the same connection cannot tell them apart, so
//! the question goes to a fresh connection: one `PING`, and any answer at
//! all (`PONG`, `-NOAUTH`, `-BUSY` from a script past busy-reply-threshold,
//! `-LOADING`) proves the server's event loop runs. No answer within
//! `connect_timeout` means dead. A fresh connection, rather than the control
//! connection, so the check depends on nothing that may itself be stuck and
//! needs no login (an unauthenticated PING is answered too).
//!
//! Checks are shared: every connection that is waiting joins the one in
//! flight, so a thousand slow requests cost one probe, not a thousand.

use std::sync::Arc;
use std::time::Instant;

use futures::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;

use super::connector::Connector;
use crate::metrics;
use crate::net::{self, FrameReader};

type Probe = Shared<BoxFuture<'static, bool>>;

#[derive(Default)]
struct State {
    /// When a check last got an answer.
    answered: Option<Instant>,
    /// The check in flight: its number and its outcome.
    running: Option<(u64, Probe)>,
    next: u64,
}

/// The upstream's liveness, checked on demand.
pub struct Health {
    connector: Connector,
    /// A cluster node to check instead of the configured upstream.
    node: Option<String>,
    state: Arc<Mutex<State>>,
}

impl Health {
    pub fn new(connector: Connector) -> Arc<Health> {
        Arc::new(Health {
            connector,
            node: None,
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    /// The liveness of one Redis Cluster node (its pools and the pinned
    /// connections to it ask it, not the first seed).
    pub fn for_node(connector: Connector, addr: &str) -> Arc<Health> {
        Arc::new(Health {
            connector,
            node: Some(addr.to_string()),
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    /// How long one check waits for its answer (`connect_timeout`).
    pub fn timeout(&self) -> std::time::Duration {
        self.connector.config().connect_timeout
    }

    /// Did the server answer a check at or after `since`? Joins the check
    /// in flight (whenever it started: a server silent for its whole
    /// timeout is dead for every waiter) or starts one, so it takes at most
    /// `connect_timeout`.
    pub async fn alive_since(&self, since: Instant) -> bool {
        let (id, probe) = {
            let mut s = self.state.lock();
            if s.answered.is_some_and(|t| t >= since) {
                return true;
            }
            match &s.running {
                Some((id, p)) => (*id, p.clone()),
                None => {
                    let id = s.next;
                    s.next += 1;
                    // Its own task: it completes (and its answer counts for
                    // later callers) even if every waiter has gone.
                    let task = tokio::spawn(probe(
                        self.connector.clone(),
                        self.node.clone(),
                        self.state.clone(),
                    ));
                    let p = async move { task.await.unwrap_or(false) }.boxed().shared();
                    s.running = Some((id, p.clone()));
                    (id, p)
                }
            }
        };
        let ok = probe.await;
        let mut s = self.state.lock();
        if matches!(&s.running, Some((r, _)) if *r == id) {
            s.running = None;
        }
        ok
    }
}

/// One check: connect, `PING`, read one reply, all within `connect_timeout`.
async fn probe(connector: Connector, node: Option<String>, state: Arc<Mutex<State>>) -> bool {
    let cfg = connector.config();
    let timeout = cfg.connect_timeout;
    // With Sentinel the URL names a Sentinel: ask the master connections
    // are opened to (none known: nothing proves the old one alive).
    let addr = match (node, connector.sentinel()) {
        (Some(node), _) => Some(node),
        (None, Some(sentinel)) => sentinel.master(),
        (None, None) => Some(cfg.url.address()),
    };
    let check = async {
        let addr = addr.ok_or_else(|| crate::error::Error::Upstream("no master known".into()))?;
        let stream = net::connect(&addr, connector.tls(), timeout).await?;
        let (rd, mut wr) = tokio::io::split(stream);
        wr.write_all(b"*1\r\n$4\r\nPING\r\n")
            .await
            .map_err(|e| crate::error::Error::upstream_io(&e))?;
        FrameReader::new(rd, Default::default()).next().await?;
        Ok::<(), crate::error::Error>(())
    };
    let ok = matches!(tokio::time::timeout(timeout, check).await, Ok(Ok(())));
    if ok {
        let now = Instant::now();
        let mut s = state.lock();
        s.answered = Some(s.answered.map_or(now, |t| t.max(now)));
    }
    metrics::get()
        .upstream_health_checks_total
        .with_label_values(&[if ok { "alive" } else { "dead" }])
        .inc();
    ok
}
