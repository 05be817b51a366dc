//! Sending one request to the master that owns its slot, following the
//! cluster's redirects so that none reaches the client.
//!
//! - `MOVED`: the command was not executed; the map is updated
//!   ([`ClusterView::moved`]) and the request is sent to the new owner.
//! - `ASK`: the command was not executed; `ASKING` and the command must
//!   reach the target *adjacent on one connection*. A shared multiplexed
//!   connection cannot promise that (another client's request may come
//!   between), so an ASK goes over a short-lived connection of its own:
//!   ASK only happens while a slot is being migrated, and costs a connect.
//! - `TRYAGAIN` (a multi-key command during a migration): the command was
//!   not executed; retried after a short backoff, a bounded number of times.
//! - A connection error or timeout: the outcome is unknown, so the request
//!   is never resent; the error goes back and the map is refreshed (a dead
//!   master never answers MOVED).
//!
//! - With `replica_reads`, a read-only command (the cluster's `COMMAND`
//!   flags: `readonly`, not `write`, `blocking` or `@scripting`) may go to
//!   a replica of its slot's master instead ([`Router::replica_ok`]), on
//!   pools whose connections sent `READONLY`; the replicas are taken in
//!   turn, and the master serves it when none has a live connection. Being
//!   a read, it is resent to the master when the replica's connection fails
//!   or the replica answers a redirect, `LOADING`, `MASTERDOWN` or
//!   `CLUSTERDOWN`. Writes, L1 fills ([`Router::send_job`]), keyless and
//!   pinned commands never go to a replica.
//!
//! `session.rs::cluster_forward` sends every upstream-bound command of a
//! cluster client through [`Router::execute`] (see `docs/cluster.md`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use tokio::sync::{oneshot, watch, Notify};

use super::commands::{CommandInfo, CommandTable};
use super::split::{self, Plan};
use super::topology::Redirect;
use super::view::ClusterView;
use crate::error::Error;
use crate::protocol::{self, Reply};
use crate::upstream::{received, Connector, Dial, Health, MuxConn, Pool, ReplyResult, ServerInfo};

/// Redirects and TRYAGAINs one request may follow before its last reply
/// (an error) is returned as it is.
const MAX_REDIRECTS: u32 = 5;

/// How long requests wait for the first connection of a master that was
/// just learned (at least `connect_timeout`).
const FIRST_CONNECT: Duration = Duration::from_secs(2);

/// A node's multiplexed connections (a master's, or a replica's for
/// reads), one pool per RESP version.
struct Node {
    resp2: Pool,
    resp3: Pool,
    /// Requests wait for a first connection only this long after the
    /// pools started; later, a node without a connection fails at once.
    patience_until: Instant,
    /// Ends the pools' connections when the node leaves the map.
    shutdown: Arc<Notify>,
    /// Is this node busy or dead, when a reply is late (its pools and the
    /// pinned connections to it).
    health: Arc<Health>,
}

impl Node {
    fn pool(&self, proto: u8) -> &Pool {
        if proto == 3 {
            &self.resp3
        } else {
            &self.resp2
        }
    }
}

/// An error reply that says our map is out of date without naming the new
/// owner: the cluster is (re)configuring, or the node we took for a master
/// is a replica now (`READONLY`, e.g. a keyless write after a failover; as
/// `upstream/mux.rs::demoted` does for Sentinel). The reply goes back as it
/// is (the command did not run); the map is refreshed for what follows.
fn map_is_stale(error: &str) -> bool {
    ["CLUSTERDOWN", "LOADING", "READONLY"]
        .iter()
        .any(|p| error.starts_with(p))
}

/// An error reply from a replica that its master would not give (the
/// replica is syncing, has lost its master, or is cut off): the read is
/// resent to the master.
fn replica_unfit(error: &str) -> bool {
    ["LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN"]
        .iter()
        .any(|p| error.starts_with(p))
}

type Nodes = Arc<RwLock<HashMap<String, Arc<Node>>>>;

/// A request's first attempt, already written to a node.
pub struct Sent {
    pub addr: String,
    /// `addr` is a replica (the request is a read; see [`Router::replica_ok`]).
    pub at_replica: bool,
    pub reply: oneshot::Receiver<ReplyResult>,
}

/// Multiplexed connections to every master (and, with `replica_reads`,
/// to the replicas reads may go to), chosen by slot.
pub struct Router {
    view: Arc<ClusterView>,
    connector: Connector,
    nodes: Nodes,
    /// Pools of replicas (their connections sent `READONLY`), started on a
    /// replica's first read; only with `replica_reads`.
    replicas: Nodes,
    /// Whether read-only commands may go to replicas (`replica_reads`).
    replica_reads: bool,
    /// Where the next replica read starts among its slot's replicas.
    next_replica: AtomicUsize,
    shutdown: Arc<Notify>,
    /// The cluster's `COMMAND` table, read from a master on first need.
    commands: tokio::sync::OnceCell<Arc<CommandTable>>,
}

impl Router {
    pub fn new(view: Arc<ClusterView>, connector: Connector) -> Router {
        let nodes: Nodes = Arc::new(RwLock::new(HashMap::new()));
        let replicas: Nodes = Arc::new(RwLock::new(HashMap::new()));
        let shutdown = Arc::new(Notify::new());
        tokio::spawn(close_departed(
            view.subscribe(),
            Arc::downgrade(&nodes),
            Arc::downgrade(&replicas),
            shutdown.clone(),
        ));
        let replica_reads = connector.config().cluster.replica_reads;
        Router {
            view,
            connector,
            nodes,
            replicas,
            replica_reads,
            next_replica: AtomicUsize::new(0),
            shutdown,
            commands: tokio::sync::OnceCell::new(),
        }
    }

    /// Are reads sent to replicas (`replica_reads`)?
    pub fn replica_reads(&self) -> bool {
        self.replica_reads
    }

    /// May this command go to a replica? With `replica_reads`, a command
    /// the cluster flags `readonly` and not `write` or `blocking`, outside
    /// `@scripting`: a script's cache is per node (`SCRIPT LOAD` through
    /// nearcache reaches the masters only, so a replica would answer
    /// `NOSCRIPT` to EVALSHA_RO), and a long script belongs where its
    /// writes would run anyway. Only keyed commands are asked (keyless ones
    /// go to masters whatever this says).
    pub fn replica_ok(&self, info: &CommandInfo) -> bool {
        self.replica_reads && info.readonly && !info.write && !info.blocking && !info.scripting
    }

    /// [`Router::replica_ok`] for `args`, by the command table when it has
    /// been read.
    pub fn replica_ok_now(&self, args: &[Bytes]) -> bool {
        self.replica_reads
            && self
                .commands_now()
                .and_then(|t| t.lookup(args))
                .is_some_and(|i| self.replica_ok(&i))
    }

    /// The replicas this router has pools for (for tests and operators).
    pub fn pooled_replicas(&self) -> Vec<String> {
        let mut out: Vec<String> = self.replicas.read().keys().cloned().collect();
        out.sort();
        out
    }

    /// A replica of `slot`'s master with a live, punctual connection now
    /// (none waited for): the replicas are taken in turn from a rotating
    /// start. `None` when the slot has none, or none is connected.
    pub fn replica_now(&self, slot: u16, proto: u8, bias: usize) -> Option<(String, Arc<MuxConn>)> {
        if !self.replica_reads {
            return None;
        }
        let topo = self.view.current()?;
        let replicas = topo.replicas(slot);
        if replicas.is_empty() {
            return None;
        }
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        (0..replicas.len()).find_map(|i| {
            let addr = &replicas[(start + i) % replicas.len()];
            let conn = self
                .replica(addr)
                .pool(proto)
                .conn(bias)
                .ok()
                .filter(|c| !c.is_late())?;
            Some((addr.clone(), conn))
        })
    }

    /// [`Router::replica_now`], waiting (bounded, as for a master) while a
    /// replica's pool was just started and has not connected yet.
    async fn replica_conn(
        &self,
        slot: u16,
        proto: u8,
        bias: usize,
    ) -> Option<(String, Arc<MuxConn>)> {
        loop {
            if let Some(found) = self.replica_now(slot, proto, bias) {
                return Some(found);
            }
            let topo = self.view.current()?;
            let now = Instant::now();
            let starting = topo
                .replicas(slot)
                .iter()
                .any(|a| now < self.replica(a).patience_until);
            if !starting {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Is the cluster up for nearcache (readiness, `upstream_up`): a node
    /// has told the slot map, and the last refresh got an answer from some
    /// node (with every node down, the map is kept but nothing answers).
    pub fn is_up(&self) -> bool {
        self.view.current().is_some_and(|t| t.covered() > 0) && self.view.answered()
    }

    /// A live master's view of itself for `proto` (its HELLO reply, its
    /// version), for what a single Redis would answer (HELLO through
    /// nearcache): the first master in address order with a connection
    /// up. Pools of masters are started here if no request has started
    /// them yet; while some were just started, this waits for one of them
    /// (bounded, as requests do). `None` when no master is connected.
    pub async fn server(&self, proto: u8) -> Option<ServerInfo> {
        let masters = self.masters();
        loop {
            let nodes: Vec<Arc<Node>> = masters.iter().map(|m| self.node(m)).collect();
            let live = nodes.iter().find_map(|n| {
                let pool = n.pool(proto);
                // (The handshake's info is published a moment before the
                // connection: both, so a node that just died is skipped.)
                pool.conn(0).ok()?;
                pool.server()
            });
            if live.is_some() {
                return live;
            }
            let now = Instant::now();
            if !nodes.iter().any(|n| now < n.patience_until) {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn view(&self) -> &Arc<ClusterView> {
        &self.view
    }

    /// The masters this router has pools for (for tests and operators).
    pub fn pooled_nodes(&self) -> Vec<String> {
        let mut out: Vec<String> = self.nodes.read().keys().cloned().collect();
        out.sort();
        out
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// The liveness check of node `addr` (see `upstream/health.rs`).
    pub fn health(&self, addr: &str) -> Arc<Health> {
        self.node(addr).health.clone()
    }

    /// The master owning `slot` in the current map.
    pub fn owner(&self, slot: u16) -> Option<String> {
        self.view.current()?.owner(slot).map(str::to_string)
    }

    /// The master's pools, started on first use; closed when the node
    /// leaves the map ([`close_departed`]).
    fn node(&self, addr: &str) -> Arc<Node> {
        self.node_in(&self.nodes, addr, Dial::Node(addr.to_string()))
    }

    /// The replica's pools (`READONLY` connections), as [`Router::node`].
    fn replica(&self, addr: &str) -> Arc<Node> {
        self.node_in(&self.replicas, addr, Dial::Replica(addr.to_string()))
    }

    fn node_in(&self, nodes: &Nodes, addr: &str, dial: Dial) -> Arc<Node> {
        if let Some(n) = nodes.read().get(addr) {
            return n.clone();
        }
        let mut nodes = nodes.write();
        nodes
            .entry(addr.to_string())
            .or_insert_with(|| {
                let size = self.connector.config().pool_size;
                let shutdown = Arc::new(Notify::new());
                let run_id = Arc::new(watch::channel(None).0);
                let health = Health::for_node(self.connector.clone(), addr);
                let pool = |proto| {
                    Pool::start(
                        self.connector.clone(),
                        dial.clone(),
                        proto,
                        size,
                        // Each node's own: one shared by all would read as
                        // "the server changed" at every connect.
                        run_id.clone(),
                        shutdown.clone(),
                        Some(health.clone()),
                    )
                };
                let cfg = self.connector.config();
                Arc::new(Node {
                    resp2: pool(2),
                    resp3: pool(3),
                    patience_until: Instant::now() + FIRST_CONNECT.max(cfg.connect_timeout),
                    shutdown,
                    health: health.clone(),
                })
            })
            .clone()
    }

    /// A live connection to `addr`, waiting (bounded) for a node whose
    /// pool was just started.
    async fn conn(&self, addr: &str, proto: u8, bias: usize) -> Result<Arc<MuxConn>, Error> {
        let node = self.node(addr);
        let pool = node.pool(proto);
        loop {
            match pool.conn(bias) {
                Ok(c) => return Ok(c),
                // (Not "the pool has connected once": its handshake info is
                // published a moment before its connection.)
                Err(e) if Instant::now() >= node.patience_until => {
                    // Down, or never up: either way the map may be wrong.
                    self.view.refresh();
                    return Err(e);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Sends `request` (one encoded command) to the owner of `slot` and
    /// returns its reply, following MOVED, ASK and TRYAGAIN.
    pub async fn send(&self, proto: u8, slot: u16, request: Bytes, bias: usize) -> ReplyResult {
        self.send_after(proto, slot, request, bias, None, false)
            .await
    }

    /// The command table when it has been read already (no waiting).
    pub fn commands_now(&self) -> Option<Arc<CommandTable>> {
        self.commands.get().cloned()
    }

    /// A live, punctual connection to `addr` now, without waiting for one:
    /// for a request written to its node as soon as it is read.
    pub fn conn_now(&self, addr: &str, proto: u8, bias: usize) -> Option<Arc<MuxConn>> {
        self.node(addr)
            .pool(proto)
            .conn(bias)
            .ok()
            .filter(|c| !c.is_late())
    }

    /// [`Router::send`] for a request whose first attempt is already in
    /// flight (`first`: the node it went to and its reply): redirects and
    /// TRYAGAIN are followed from there, in the same way. With `replica`
    /// (a read that [`Router::replica_ok`] allows), attempts go to a
    /// replica of the slot's master while one is connected and has not
    /// failed this request; the master otherwise.
    pub async fn send_after(
        &self,
        proto: u8,
        slot: u16,
        request: Bytes,
        bias: usize,
        mut first: Option<Sent>,
        replica: bool,
    ) -> ReplyResult {
        let mut replica = replica && self.replica_reads;
        let mut redirects = 0;
        let mut ask_to: Option<String> = None;
        loop {
            let (addr, at_replica, reply) = match (first.take(), ask_to.take()) {
                (Some(f), _) => (f.addr, f.at_replica, received(f.reply.await)),
                (None, Some(target)) => {
                    let r = self.one_off(&target, proto, &request, true).await;
                    (target, false, r)
                }
                (None, None) => {
                    let topo = self
                        .view
                        .current()
                        .ok_or_else(|| Arc::new(Error::Upstream(self.view.unknown())))?;
                    let Some(owner) = topo.owner(slot).map(str::to_string) else {
                        return Ok(Reply {
                            bytes: protocol::error("CLUSTERDOWN Hash slot not served"),
                            kind: protocol::ReplyKind::Error,
                        });
                    };
                    let at = match replica {
                        true => self.replica_conn(slot, proto, bias).await,
                        false => None,
                    };
                    let (addr, at_replica, conn) = match at {
                        Some((addr, conn)) => (addr, true, conn),
                        None => {
                            let conn = self.conn(&owner, proto, bias).await.map_err(Arc::new)?;
                            (owner, false, conn)
                        }
                    };
                    let r = received(conn.send(request.clone()).await.await);
                    (addr, at_replica, r)
                }
            };
            let reply = match reply {
                Ok(r) => r,
                Err(e) if at_replica => {
                    // A read: resending it cannot apply anything twice.
                    self.view.refresh();
                    tracing::debug!(replica = %addr, error = %e, "replica read failed; resent to the master");
                    replica = false;
                    continue;
                }
                Err(e) => {
                    // Outcome unknown: never resent.
                    self.view.refresh();
                    return Err(e);
                }
            };
            let Some(text) = reply.error_text() else {
                return Ok(reply);
            };
            if at_replica {
                // Whatever the replica says next is the master's to answer:
                // a MOVED means the map changed (followed below, to the new
                // owner), other unfit replies are resent to the master.
                replica = false;
                if replica_unfit(&text) {
                    self.view.refresh();
                    continue;
                }
            }
            if redirects >= MAX_REDIRECTS {
                return Ok(reply);
            }
            redirects += 1;
            if text.starts_with("TRYAGAIN") {
                tokio::time::sleep(Duration::from_millis(10 << redirects)).await;
                continue;
            }
            match Redirect::parse(&text, &addr) {
                Some(Redirect::Moved { slot: s, addr: to }) => self.view.moved(s, &to),
                Some(Redirect::Ask { addr: to, .. }) => ask_to = Some(to),
                None => {
                    if map_is_stale(&text) {
                        self.view.refresh();
                    }
                    return Ok(reply);
                }
            }
        }
    }

    /// Several requests of one slot written back to back on one connection
    /// to the slot's owner (L1 fills: the `PTTL`s and the read must be
    /// answered by the same node, about the same moment). Returns every
    /// reply, and `true` if any of them was a redirect: then the last
    /// request is sent again through [`Router::send`] (redirects followed)
    /// and the other replies may come from a node that no longer owns the
    /// slot, so the caller must not store anything from this job.
    pub async fn send_job(
        &self,
        proto: u8,
        slot: u16,
        requests: Vec<Bytes>,
        bias: usize,
    ) -> (Vec<ReplyResult>, bool) {
        let Some(last) = requests.last().cloned() else {
            return (Vec::new(), false);
        };
        let owner = self
            .view
            .current()
            .and_then(|t| t.owner(slot).map(str::to_string));
        let conn = match owner {
            Some(addr) => self.conn(&addr, proto, bias).await.ok(),
            None => None,
        };
        let Some(conn) = conn else {
            // No owner or no connection: `send` gives the client the error
            // it would get otherwise; nothing of it is stored.
            let mut replies: Vec<ReplyResult> = (1..requests.len())
                .map(|_| Err(Arc::new(Error::Upstream("not sent".into()))))
                .collect();
            replies.push(self.send(proto, slot, last, bias).await);
            return (replies, true);
        };
        let mut pending = Vec::with_capacity(requests.len());
        for r in requests {
            pending.push(conn.send(r).await);
        }
        self.finish_job(proto, slot, last, bias, pending).await
    }

    /// The rest of [`Router::send_job`] once its requests are written
    /// (`pending`, in order; `last` is the last one, resent through
    /// [`Router::send`] if any reply is a redirect).
    pub async fn finish_job(
        &self,
        proto: u8,
        slot: u16,
        last: Bytes,
        bias: usize,
        pending: Vec<oneshot::Receiver<ReplyResult>>,
    ) -> (Vec<ReplyResult>, bool) {
        let mut replies = Vec::with_capacity(pending.len());
        for rx in pending {
            replies.push(received(rx.await));
        }
        if replies.iter().any(|r| r.is_err()) {
            self.view.refresh();
            return (replies, false);
        }
        let redirected = replies.iter().any(|r| {
            r.as_ref()
                .ok()
                .and_then(|r| r.error_text())
                .is_some_and(|t| {
                    t.starts_with("MOVED") || t.starts_with("ASK") || t.starts_with("TRYAGAIN")
                })
        });
        if redirected {
            let again = self.send(proto, slot, last, bias).await;
            if let Some(l) = replies.last_mut() {
                *l = again;
            }
        }
        (replies, redirected)
    }

    /// Every master of the current map, in address order (none before
    /// the first map).
    fn masters(&self) -> Vec<String> {
        self.view
            .current()
            .map(|t| t.masters().to_vec())
            .unwrap_or_default()
    }

    /// The master keyless commands without a tip go to: the first in
    /// address order, so it is the same one every time the map is the same.
    pub fn any_master(&self) -> Result<String, Arc<Error>> {
        self.view
            .current()
            .and_then(|t| t.masters().first().cloned())
            .ok_or_else(|| Arc::new(Error::Upstream(self.view.unknown())))
    }

    /// The cluster's command table (key specs and tips).
    pub async fn commands(&self) -> Result<Arc<CommandTable>, Arc<Error>> {
        self.commands
            .get_or_try_init(|| async {
                let addr = self.any_master()?;
                let reply = self
                    .one_off(&addr, 2, &protocol::command(["COMMAND"]), false)
                    .await?;
                CommandTable::parse(&reply.bytes)
                    .map(Arc::new)
                    .ok_or_else(|| {
                        Arc::new(Error::Upstream(format!(
                            "COMMAND at {addr}: not a command table"
                        )))
                    })
            })
            .await
            .cloned()
    }

    /// Sends to one node, no redirects: a keyless command to a given master.
    async fn to_node(&self, addr: &str, proto: u8, request: Bytes, bias: usize) -> ReplyResult {
        let conn = self.conn(addr, proto, bias).await.map_err(Arc::new)?;
        let r = received(conn.send(request).await.await);
        let stale = match &r {
            Err(_) => true,
            Ok(reply) => reply.error_text().is_some_and(|t| map_is_stale(&t)),
        };
        if stale {
            self.view.refresh();
        }
        r
    }

    /// A whole client command in a cluster: routed by its keys' slots,
    /// split and merged across slots, or refused (see [`split`]). With
    /// `may_read_replica`, a read [`Router::replica_ok`] allows goes to
    /// replicas (each slot's part, when split).
    pub async fn execute(
        &self,
        proto: u8,
        args: &[Bytes],
        bias: usize,
        may_read_replica: bool,
    ) -> ReplyResult {
        let table = self.commands().await?;
        let encode = || {
            let mut out = BytesMut::new();
            protocol::encode_command(&mut out, args);
            out.freeze()
        };
        let replica = may_read_replica
            && self.replica_reads
            && table.lookup(args).is_some_and(|i| self.replica_ok(&i));
        match split::plan(&table, args) {
            Plan::One { slot } => {
                self.send_after(proto, slot, encode(), bias, None, replica)
                    .await
            }
            Plan::AnyMaster => {
                let addr = self.any_master()?;
                self.to_node(&addr, proto, encode(), bias).await
            }
            Plan::Refuse(bytes) => Ok(Reply {
                bytes,
                kind: protocol::ReplyKind::Error,
            }),
            Plan::AllMasters { merge } => {
                let masters = self.masters();
                let request = encode();
                let replies = futures::future::join_all(
                    masters
                        .iter()
                        .map(|m| self.to_node(m, proto, request.clone(), bias)),
                )
                .await;
                let replies = replies.into_iter().collect::<Result<Vec<_>, _>>()?;
                let parts: Vec<split::Part> = Vec::new();
                Ok(split::merge(merge, &parts, replies))
            }
            Plan::RandomKey => {
                let masters = self.masters();
                let start = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as usize);
                let mut last = None;
                for i in 0..masters.len() {
                    let addr = &masters[(start + i) % masters.len()];
                    let reply = self.to_node(addr, proto, encode(), bias).await?;
                    // A key (a bulk string) or an error ends it; nil: the next.
                    let nil = matches!(&reply.bytes[..], b"$-1\r\n" | b"_\r\n");
                    if !nil {
                        return Ok(reply);
                    }
                    last = Some(reply);
                }
                last.ok_or_else(|| Arc::new(Error::Upstream(self.view.unknown())))
            }
            Plan::Scan { master, cursor } => self.scan(proto, args, master, cursor, bias).await,
            Plan::Split { merge, parts } => {
                let first = parts.iter().map(|_| None).collect();
                self.finish_split(proto, merge, &parts, first, bias, replica)
                    .await
            }
        }
    }

    /// A command split by slot ([`Plan::Split`]): each part sent to its
    /// slot's owner (or, with `first`, already written there: redirects
    /// are followed from its reply), the replies merged by `merge`.
    pub async fn finish_split(
        &self,
        proto: u8,
        merge: split::Merge,
        parts: &[split::Part],
        first: Vec<Option<Sent>>,
        bias: usize,
        replica: bool,
    ) -> ReplyResult {
        let replies = futures::future::join_all(parts.iter().zip(first).map(|(p, first)| {
            let slot = p.slot.unwrap_or(0);
            self.send_after(proto, slot, p.request.clone(), bias, first, replica)
        }))
        .await;
        if merge == split::Merge::KeyOrder {
            // MGET: a shard that fails costs only its own keys, each an
            // error element in its place.
            let replies = replies
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|e| Reply {
                        bytes: e.to_reply(),
                        kind: protocol::ReplyKind::Error,
                    })
                })
                .collect();
            return Ok(split::merge(merge, parts, replies));
        }
        // One part's connection failed: its outcome is unknown, the client
        // gets that error (the other parts may be applied).
        let replies = replies.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(split::merge(merge, parts, replies))
    }

    /// One SCAN step: `cursor` of the `master`-th master (address order);
    /// when that master is done, the next one starts, and the client's
    /// cursor is 0 only after the last. MATCH, COUNT and TYPE go to each
    /// node as given. The masters must stay the same during the scan: a
    /// cursor naming a master that is no longer there is refused (restart
    /// the scan), and a slot that moves during it may be seen twice or not
    /// at all, as with any cluster client.
    async fn scan(
        &self,
        proto: u8,
        args: &[Bytes],
        master: usize,
        cursor: u64,
        bias: usize,
    ) -> ReplyResult {
        let masters = self.masters();
        let error = |msg: &str| {
            Ok(Reply {
                bytes: protocol::error(msg),
                kind: protocol::ReplyKind::Error,
            })
        };
        let Some(addr) = masters.get(master) else {
            return error(split::INVALID_CURSOR);
        };
        let mut request = args.to_vec();
        request[1] = Bytes::from(cursor.to_string());
        let mut out = BytesMut::new();
        protocol::encode_command(&mut out, &request);
        let reply = self.to_node(addr, proto, out.freeze(), bias).await?;
        if reply.kind == protocol::ReplyKind::Error {
            return Ok(reply);
        }
        let page = protocol::elements(&reply.bytes).filter(|e| e.len() == 2);
        let next = page.as_ref().and_then(|e| {
            let c = protocol::scalar(&reply.bytes[e[0].clone()])?;
            std::str::from_utf8(&c).ok()?.parse::<u64>().ok()
        });
        let (Some(page), Some(next)) = (page, next) else {
            return error("ERR nearcache: a cluster node sent a SCAN reply that cannot be read");
        };
        let next = match next {
            0 if master + 1 < masters.len() => split::scan_cursor(master + 1, 0),
            0 => Some(0),
            c => split::scan_cursor(master, c),
        };
        let Some(next) = next else {
            return error("ERR nearcache: a node's SCAN cursor is too large to combine");
        };
        let mut bytes = BytesMut::new();
        protocol::array_header(&mut bytes, 2);
        protocol::bulk(&mut bytes, next.to_string().as_bytes());
        bytes.extend_from_slice(&reply.bytes[page[1].clone()]);
        Ok(Reply {
            bytes: bytes.freeze(),
            kind: protocol::ReplyKind::Normal,
        })
    }

    /// A control command for node `addr` itself (CLIENT UNBLOCK of a
    /// pinned connection there), no redirects, on a connection of its own:
    /// it must not queue behind other clients' requests on the node's
    /// shared connections (a runaway script), as the control connection
    /// of a single Redis; and the node need not be a master any more.
    pub async fn control(&self, addr: &str, proto: u8, request: Bytes) -> ReplyResult {
        self.one_off(addr, proto, &request, false).await
    }

    /// A control command for the whole cluster (CLIENT PAUSE/UNPAUSE: one
    /// Redis would pause all its clients, so every master does): sent to
    /// every master of the current map concurrently, each on a connection
    /// of its own ([`Router::control`]); the first error, else the first
    /// reply.
    pub async fn control_every_master(&self, proto: u8, request: Bytes) -> ReplyResult {
        let masters = self.masters();
        if masters.is_empty() {
            return Err(Arc::new(Error::Upstream(self.view.unknown())));
        }
        let replies = futures::future::join_all(
            masters
                .iter()
                .map(|m| self.control(m, proto, request.clone())),
        )
        .await;
        let replies = replies.into_iter().collect::<Result<Vec<_>, _>>()?;
        Ok(split::merge(split::Merge::AllOk, &[], replies))
    }

    /// One request on a connection of its own; with `asking`, after
    /// `ASKING` on the same connection (see the module docs).
    async fn one_off(&self, addr: &str, proto: u8, request: &Bytes, asking: bool) -> ReplyResult {
        let requests = if asking {
            vec![protocol::command(["ASKING"]), request.clone()]
        } else {
            vec![request.clone()]
        };
        let late = |limit| {
            if asking {
                format!("ASK redirect to {addr}: no answer within {limit:?}")
            } else {
                format!("{addr}: no answer within {limit:?}")
            }
        };
        let mut replies = super::exchange(&self.connector, addr, proto, &requests, late)
            .await
            .map_err(Arc::new)?;
        if asking {
            if let Some(text) = replies[0].error_text() {
                return Err(Arc::new(Error::Upstream(format!(
                    "ASKING at {addr}: {text}"
                ))));
            }
        }
        Ok(replies.pop().expect("one reply per request"))
    }

    pub fn stop(&self) {
        self.shutdown.notify_waiters();
        for node in self.nodes.read().values() {
            node.shutdown.notify_waiters();
        }
        for node in self.replicas.read().values() {
            node.shutdown.notify_waiters();
        }
        self.view.stop();
    }
}

/// Closes the pools of masters that left the map (a failed master replaced
/// by its replica, an address that changed) and of replicas that left it
/// (failed, promoted, removed): without this their connections would be
/// retried for ever. A pool's supervisors also stop by themselves once the
/// pool is dropped (see `upstream::pool_dropped`).
async fn close_departed(
    mut changes: watch::Receiver<Option<Arc<super::topology::Topology>>>,
    nodes: std::sync::Weak<RwLock<HashMap<String, Arc<Node>>>>,
    replicas: std::sync::Weak<RwLock<HashMap<String, Arc<Node>>>>,
    stop: Arc<Notify>,
) {
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop.notified() => return,
        }
        let Some(topology) = changes.borrow_and_update().clone() else {
            continue;
        };
        let (Some(nodes), Some(replicas)) = (nodes.upgrade(), replicas.upgrade()) else {
            return;
        };
        let kept = topology.all_replicas();
        let mut departed = remove_unless(&nodes, |a| topology.masters().iter().any(|m| m == a));
        departed.extend(remove_unless(&replicas, |a| kept.iter().any(|r| r == a)));
        for node in departed {
            node.shutdown.notify_waiters();
        }
    }
}

/// Takes the nodes whose address `keep` refuses out of `nodes`.
fn remove_unless(nodes: &Nodes, keep: impl Fn(&str) -> bool) -> Vec<Arc<Node>> {
    let mut map = nodes.write();
    let gone: Vec<String> = map.keys().filter(|a| !keep(a)).cloned().collect();
    gone.iter().filter_map(|a| map.remove(a)).collect()
}
