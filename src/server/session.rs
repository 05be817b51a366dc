//! One client connection: a single task that reads and frames requests,
//! routes each one once, applies the route, and writes replies in request
//! order as they become ready. One task (no reader/writer pair) means an L1
//! hit costs no wake-up of another task: a batch of pipelined hits is read,
//! answered and written in one turn, as Redis does it.
//!
//! Paths: the client's multiplexed connection (one at a time, kept until it
//! dies, so its requests run in the order sent), its pinned connection
//! (while its state needs one), and the control connection. Before a
//! request takes another path than the requests still owed, it waits until
//! they are answered (it stalls; later requests stay unread).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::clients::{ClientInfo, Signal};
use super::pinned::ConnState;
use super::replies::{Owed, PinnedReplies, Replies};
use super::route::{self, Route, View};
use super::{count_request, Outcome, Sidecar};
use crate::command::Keys;
use crate::error::Error;
use crate::protocol::{self, Limits, Request, RequestParser};
use crate::upstream::cluster::router::{Router, Sent};
use crate::upstream::cluster::split;
use crate::upstream::cluster::topology::Redirect;
use crate::upstream::{Login, MuxConn, PinnedConn, PinnedFrame};

/// Which connection the requests still owed went to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Path {
    Pool,
    Pinned,
}

/// What dispatching one request led to.
pub(super) enum Flow {
    Next,
    /// Not dispatched yet: retry once every earlier reply is in.
    Stall,
    /// Answer what is owed, then close the connection.
    Close,
}

/// Output the client has not read yet beyond which nearcache stops reading
/// its requests (it resumes as the client reads).
const PAUSE_OUTPUT: usize = 256 * 1024;

pub(super) struct Session {
    pub sidecar: Arc<Sidecar>,
    pub info: Arc<ClientInfo>,
    pub proto: u8,
    pub authed: bool,
    pub state: ConnState,
    /// The login for new pinned connections (a client's own AUTH, once accepted).
    pub login: Login,
    pub(super) slot: usize,
    pub mux: Option<Arc<MuxConn>>,
    pub pinned: Option<PinnedConn>,
    pub replies: Replies,
    pub(super) path: Option<Path>,
    /// CLIENT REPLY OFF / SKIP, emulated here: replies are read and dropped.
    pub reply_off: bool,
    pub skip_next: bool,
    /// The nearcache client id this client's tracking redirects to (CLIENT GETREDIR).
    pub redirect: i64,
    /// Reads of this client still owed (see `read.rs`).
    pub outstanding: super::read::Outstanding,
    /// The read path found it must wait before sending (see `read.rs`).
    pub stalled_on_pool: bool,
    /// Since when unread output has been over the soft limit.
    over_soft_since: Option<Instant>,
    /// A pinned reply is late: is the server busy or dead? (see `upstream::Health`)
    pinned_check: Option<BoxFuture<'static, bool>>,
    /// With a cluster upstream: where the pinned connection goes and the
    /// transaction's slot (see `Session::cluster_attach`).
    cluster_pin: ClusterPin,
    /// With a cluster upstream: the node and connection each slot's
    /// requests written at once went to, while any of them is owed.
    eager_routes: Vec<EagerRoute>,
    /// With a cluster upstream: the client's shard channels, on links of
    /// their own (see `shard.rs`).
    pub(super) shard: super::shard::ShardSubs,
    /// With a cluster upstream: the client's keyspace-event subscriptions
    /// on every other master (see `keyspace.rs`).
    pub(super) keyspace: super::keyspace::KeyspaceMirrors,
}

/// A command split by slot, its parts written at once where they could be
/// (see [`Session::write_split_now`]).
struct WrittenSplit {
    merge: split::Merge,
    parts: Vec<split::Part>,
    /// Per part: its request as written, or `None` (sent when polled).
    first: Vec<Option<Sent>>,
    /// The routes of the parts written, alive while the reply is owed.
    tokens: Vec<Arc<()>>,
}

struct EagerRoute {
    slot: u16,
    /// Reads sent to a replica of the slot's master (`replica_reads`) have
    /// a route of their own.
    at_replica: bool,
    addr: String,
    conn: Arc<MuxConn>,
    /// Alive while a request of this route is owed.
    owed: std::sync::Weak<()>,
}

/// A client's pinned state with a cluster upstream.
#[derive(Default)]
struct ClusterPin {
    /// The node the pinned connection is open to.
    node: Option<String>,
    /// MULTI was answered here and is written first on the connection the
    /// first command naming a slot opens (MULTI itself names none).
    deferred_multi: bool,
    /// Keyless commands queued while the transaction has no node yet:
    /// written after MULTI on the node its first keyed command names (any
    /// master if none does).
    deferred: Vec<Bytes>,
    /// The slot of the transaction's first keyed command.
    txn_slot: Option<u16>,
    /// A queued command named another slot: EXEC gets CROSSSLOT.
    txn_cross: bool,
    /// A queued command was refused (its own keys span slots): EXEC gets EXECABORT.
    txn_aborted: bool,
    /// The slot of the client's first WATCH (meaningful while it watches):
    /// later WATCHes and the transaction must name it too.
    watch_slot: Option<u16>,
    /// NO-TOUCH connections to other nodes, kept while the client is in
    /// NO-TOUCH mode: its connection moves to the node of each command's
    /// key, and back (at most one per node).
    parked: Vec<PinnedConn>,
    /// The blocking command in flight when nothing else ties the client
    /// to its node: a `MOVED` for it (a stale map) sends it on to the node
    /// named, as the router does with any other command.
    blocking_sent: Option<BlockingSent>,
    /// The node a redirected blocking command is to be sent to next, and
    /// whether after `ASKING` (the node answered `ASK`).
    resend_to: Option<(String, bool)>,
    /// The pinned connection (its id) on which the answer to that `ASKING`
    /// is still to come (and is dropped: the client did not send it).
    asking_owed: Option<i64>,
}

/// A blocking command written on the pinned connection.
struct BlockingSent {
    request: Bytes,
    /// The slot of its keys (none: keyless, such as WAIT).
    slot: Option<u16>,
    redirects: u8,
}

/// What a master says to the clients blocked on it when it turns into a
/// replica (a failover): the blocking command ended without a result.
const UNBLOCKED_BY_FAILOVER: &str =
    "UNBLOCKED force unblock from blocking operation, instance state changed";

/// `MOVED` replies followed for one blocking command before the client
/// gets the `TRYAGAIN` error instead.
const BLOCKING_REDIRECTS: u8 = 5;

/// Runs a client's session until it disconnects, is killed, or shutdown
/// drains it.
pub(super) async fn run(sidecar: Arc<Sidecar>, socket: TcpStream, info: Arc<ClientInfo>) {
    let default_db = sidecar.config.upstream.url.db;
    let mut session = Session {
        slot: info.id as usize,
        authed: sidecar.config.server.requirepass.is_none(),
        proto: 2,
        state: ConnState::new(default_db),
        login: Login::Configured,
        mux: None,
        pinned: None,
        replies: Replies::default(),
        path: None,
        reply_off: false,
        skip_next: false,
        redirect: -1,
        outstanding: Default::default(),
        stalled_on_pool: false,
        over_soft_since: None,
        pinned_check: None,
        cluster_pin: ClusterPin::default(),
        eager_routes: Vec::new(),
        shard: Default::default(),
        keyspace: Default::default(),
        sidecar,
        info,
    };
    if session.sidecar.cluster.is_some() {
        session.state.keep_shard_apart();
    }
    session.serve(&socket).await;
    session.release_pinned();
    if session.info.is_draining() {
        let grace = session.sidecar.config.shutdown_grace;
        linger(&socket, grace).await;
    }
}

/// What a client in a stateful mode gets with a cluster upstream, for now.
const CLUSTER_PINNED: &str = "ERR nearcache: a client's own AUTH / HELLO AUTH and SELECT are not supported on a Redis Cluster upstream yet";
/// `CLIENT TRACKING ON` with a cluster upstream: a node tracks only the
/// keys read on it, and nearcache does not merge per-node tracking yet; on
/// one node, the client's cache would miss other nodes' invalidations.
const CLUSTER_TRACKING: &str = "ERR nearcache: CLIENT TRACKING is not supported on a Redis Cluster upstream (each node tracks only its own keys)";
/// MONITOR with a cluster upstream: one node shows only its own commands.
const CLUSTER_MONITOR: &str = "ERR nearcache: MONITOR is not supported on a Redis Cluster upstream (each node shows only its own commands)";

/// Ends a drained connection without losing the replies it was sent. A
/// socket closed with unread input (requests the drain never read) sends
/// a reset, and a reset makes the client's kernel drop the replies it has
/// received but the client has not read yet. So: send FIN after the last
/// reply, then read and discard until the client closes (it has seen the
/// end of its replies by then), goes quiet for [`LINGER_IDLE`] (a client
/// that sends nothing more cannot be reset by a late request), or the
/// grace is up.
async fn linger(socket: &TcpStream, grace: std::time::Duration) {
    if socket2::SockRef::from(socket)
        .shutdown(std::net::Shutdown::Write)
        .is_err()
    {
        return;
    }
    let mut scratch = [0u8; 16 * 1024];
    let until = tokio::time::Instant::now() + grace;
    loop {
        let idle = tokio::time::Instant::now() + LINGER_IDLE;
        match tokio::time::timeout_at(idle.min(until), socket.readable()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        match socket.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// How long a drained client may stay silent before its socket is closed.
const LINGER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

impl Session {
    fn limits(&self) -> Limits {
        let s = &self.sidecar.config.server;
        Limits {
            max_bulk_len: s.proto_max_bulk_len,
            max_multibulk_len: s.max_multibulk_len,
            max_query_buffer: s.client_query_buffer_limit,
        }
    }

    async fn serve(&mut self, socket: &TcpStream) {
        let limits = self.limits();
        let max_pending = self.sidecar.config.server.max_pending_per_client;
        let mut inbuf = BytesMut::with_capacity(16 * 1024);
        let mut parser = RequestParser::default();
        let mut stalled: Option<Request> = None;
        let mut reading = true;
        // The client closed its side (not a drain): it waits for nothing open-ended.
        let mut hung_up = false;
        let mut closing = false;
        // A batch was read (and answered) since the last yield.
        let mut served = false;
        let mut signal_waker = false;
        // One timer for the pinned reply's deadline and the shard retry,
        // made once: a Sleep made every turn costs a runtime-handle clone
        // even while its branch is off.
        let timer = tokio::time::sleep(std::time::Duration::ZERO);
        tokio::pin!(timer);
        loop {
            // Dispatch what is buffered, unless the client is not reading its replies.
            while !closing
                && self.replies.out.len() < PAUSE_OUTPUT
                && self.replies.len() < max_pending
                && !self.replies.broken
            {
                let req = match stalled.take() {
                    Some(r) => r,
                    None => match parser.next(&mut inbuf, &limits) {
                        Ok(Some(r)) => r,
                        Ok(None) => break,
                        Err(protocol::ProtocolError(msg)) => {
                            debug!(client = self.info.id, error = %msg, "protocol error; closing");
                            count_request(b"", Outcome::Error);
                            self.replies.ready(protocol::error(&msg), false);
                            closing = true;
                            break;
                        }
                    },
                };
                match self.dispatch(&req).await {
                    Flow::Next => {}
                    Flow::Stall => {
                        stalled = Some(req);
                        break;
                    }
                    Flow::Close => {
                        closing = true;
                        break;
                    }
                }
            }
            self.settle_shard();
            self.settle_mirrors();
            if !self.replies.out.is_empty() && !self.write_some(socket) {
                return;
            }
            self.info.output.store(
                self.replies.out.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some(why) = self.output_over_limit() {
                // As Redis: the client is closed, nothing it was owed is kept.
                warn!(client = self.info.id, addr = %self.info.addr, "closing client: {why} (server.client_output_limit)");
                crate::metrics::get().client_output_limit_closed_total.inc();
                return;
            }
            let owed = !self.replies.is_empty() || !self.replies.out.is_empty();
            if !owed && (closing || self.replies.broken || (!reading && stalled.is_none())) {
                return;
            }
            // The client hung up while blocked or subscribed: as Redis does,
            // drop what may never come (replies before it were written above).
            if hung_up && self.replies.awaiting_open_ended() {
                return;
            }
            if self.info.is_killed() {
                return;
            }
            let wants_input = reading
                && !closing
                && stalled.is_none()
                && self.replies.out.len() < PAUSE_OUTPUT
                && self.replies.len() < max_pending;
            if served {
                // Like Redis's event loop, one read per client per turn: a
                // client whose next batch is already waiting must not keep
                // the worker from every other client.
                served = false;
                tokio::task::yield_now().await;
            }
            let deadline = self.replies.pinned_deadline();
            if deadline.is_none_or(|d| d > Instant::now()) {
                // Nothing overdue (the late reply came): the check has nothing to decide.
                self.pinned_check = None;
            }
            let (links, shard_due) = (self.shard.has_links(), self.shard.next_due());
            let (mirrors, mirrors_due) = (self.keyspace.has_links(), self.keyspace.next_due());
            let (mut shard_frame, mut mirror_frame, mut rang) = (None, None, false);
            let check_due = deadline.filter(|_| self.pinned_check.is_none());
            let wake_at = check_due
                .into_iter()
                .chain(shard_due)
                .chain(mirrors_due)
                .min();
            if let Some(at) = wake_at {
                let at = tokio::time::Instant::from_std(at);
                if timer.deadline() != at {
                    timer.as_mut().reset(at);
                }
            }
            tokio::select! {
                biased;
                // First: with `biased`, a client that always has input ready
                // would otherwise never see the drain.
                signal = std::future::poll_fn(|cx| self.info.poll_signal(cx, reading, &mut signal_waker)) => match signal {
                    Signal::Killed => return,
                    Signal::Drain => {
                        reading = false;
                        signal_waker = false;
                    }
                },
                frame = next_frame(&mut self.pinned) => self.on_pinned_frame(frame),
                // Handled after the select: its futures are not dropped
                // until it returns, and one of them is not `Send`.
                got = std::future::poll_fn(|cx| self.shard.poll_frame(cx)), if links => shard_frame = Some(got),
                got = std::future::poll_fn(|cx| self.keyspace.poll_frame(cx)), if mirrors => mirror_frame = Some(got),
                _ = std::future::poll_fn(|cx| self.replies.poll_collect(cx)), if !self.replies.is_empty() => {}
                _ = &mut timer, if wake_at.is_some() => rang = true,
                alive = std::future::poll_fn(|cx| match self.pinned_check.as_mut() {
                    Some(c) => c.as_mut().poll(cx),
                    None => std::task::Poll::Pending,
                }), if self.pinned_check.is_some() => {
                    self.pinned_check = None;
                    let upstream = &self.sidecar.config.upstream;
                    if alive {
                        let now = Instant::now();
                        self.replies.extend_pinned_deadlines(now, now + upstream.command_timeout);
                    } else {
                        crate::metrics::get().upstream_errors_total.with_label_values(&["timeout"]).inc();
                        let e = crate::upstream::timed_out(upstream.command_timeout, upstream.connect_timeout);
                        self.pinned = None;
                        self.replies.pinned_lost(&e);
                    }
                }
                // poll_*_ready: the socket's one waker slot, where
                // readable() would add and remove a waiter every turn.
                r = std::future::poll_fn(|cx| socket.poll_read_ready(cx)), if wants_input => {
                    if r.is_err() {
                        return;
                    }
                    let wanted = parser.wanted(&inbuf);
                    if inbuf.capacity() - inbuf.len() < wanted.max(4096) {
                        inbuf.reserve(wanted.max(16 * 1024));
                    }
                    match read_some(socket, &mut inbuf) {
                        Ok(Read::Closed) => {
                            reading = false;
                            hung_up = true;
                        }
                        Ok(Read::Drained) => self.info.touch(),
                        Ok(Read::Full) => {
                            self.info.touch();
                            served = true;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                r = std::future::poll_fn(|cx| socket.poll_write_ready(cx)), if !self.replies.out.is_empty() => {
                    if r.is_err() {
                        return;
                    }
                }
            }
            if let Some((node, frame)) = shard_frame {
                self.on_shard_frame(node, frame).await;
            }
            if let Some((node, frame)) = mirror_frame {
                self.on_mirror_frame(node, frame);
            }
            if self.cluster_pin.resend_to.is_some() {
                self.resend_blocking().await;
            }
            if rang {
                let now = Instant::now();
                if check_due.is_some_and(|d| d <= now) {
                    self.start_pinned_check(now);
                }
                if shard_due.is_some_and(|d| d <= now) {
                    self.shard_retry().await;
                }
                if mirrors_due.is_some_and(|d| d <= now) {
                    self.sync_mirrors().await;
                }
            }
        }
    }

    /// The pinned reply is late. Late is not dead: a check on another
    /// connection decides (with a cluster, to the node the pinned connection
    /// is open to).
    fn start_pinned_check(&mut self, now: Instant) {
        let health = match (&self.sidecar.cluster, &self.cluster_pin.node) {
            (Some(router), Some(node)) => router.health(node),
            _ => self.sidecar.upstream.health.clone(),
        };
        // A blocking command is not late: an answer to any recent check will
        // do (many blocked clients share one check per half period, not one
        // each).
        let fresh = self.sidecar.config.upstream.command_timeout / 2;
        let since = if self.replies.overdue_open_ended_only(now) {
            now.checked_sub(fresh).unwrap_or(now)
        } else {
            now
        };
        self.pinned_check = Some(Box::pin(async move { health.alive_since(since).await }));
    }

    /// Has the client left more output unread than its class may
    /// (`server.client_output_limit`)? Subscribers and MONITOR have their
    /// own limit: what they are sent is not what they asked for.
    fn output_over_limit(&mut self) -> Option<String> {
        let limits = &self.sidecar.config.server.client_output_limit;
        let (class, limit) = if self.state.subscriptions() > 0 || self.state.monitoring() {
            ("pubsub", limits.pubsub)
        } else {
            ("normal", limits.normal)
        };
        let held =
            (self.replies.out.len() + self.shard.held_bytes() + self.keyspace.held_bytes()) as u64;
        if limit.hard > 0 && held > limit.hard {
            return Some(format!(
                "{held} bytes of unread {class} output, over the hard limit of {}",
                limit.hard
            ));
        }
        if limit.soft == 0 || held <= limit.soft {
            self.over_soft_since = None;
            return None;
        }
        let since = *self.over_soft_since.get_or_insert_with(Instant::now);
        (since.elapsed() > limit.soft_for).then(|| {
            format!(
                "{class} output over the soft limit of {} bytes for more than {:?} ({held} bytes now)",
                limit.soft, limit.soft_for
            )
        })
    }

    /// Writes as much output as the socket takes now; false if the client is gone.
    fn write_some(&mut self, socket: &TcpStream) -> bool {
        while !self.replies.out.is_empty() {
            match socket.try_write(&self.replies.out) {
                Ok(n) => {
                    let _ = self.replies.out.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        if self.replies.out.is_empty() && self.replies.out.capacity() > 1 << 20 {
            // A large reply grew the buffer: give the memory back.
            self.replies.out = BytesMut::new();
        }
        true
    }

    /// Is the reply of this request to be dropped (CLIENT REPLY OFF/SKIP)?
    pub fn silent_reply(&mut self) -> bool {
        self.reply_off || std::mem::take(&mut self.skip_next)
    }

    async fn dispatch(&mut self, req: &Request) -> Flow {
        let name = req.name_upper();
        if let Some(flow) = self.shard_pubsub_mode(&name, req) {
            return flow;
        }
        let view = View {
            authed: self.authed,
            pinned: self.state.needs_pin(),
        };
        let route = route::route(view, &name, &req.args);
        if let Route::Pool { keys } | Route::Pinned { keys, .. } = &route {
            if self.outstanding.blocks_write(keys) {
                return Flow::Stall;
            }
        }
        if self.sidecar.cluster.is_some() {
            match route {
                // read.rs asks the router for its fills and MGET parts.
                Route::Read { key } => return self.read(&name, req, key).await,
                Route::MGet => return self.mget(&name, req).await,
                Route::Pool { keys } => {
                    count_request(&name, Outcome::Forward);
                    // A read-only command may go to a replica (the router
                    // decides by the cluster's command flags).
                    return self.cluster_forward(req, &keys, true);
                }
                Route::Control => {
                    count_request(&name, Outcome::Forward);
                    return self.cluster_forward(req, &Keys::None, false);
                }
                _ => {}
            }
        }
        match route {
            Route::Local => self.local(&name, req).await,
            Route::Reject(msg) => {
                count_request(&name, Outcome::Error);
                let silent = self.silent_reply();
                self.replies.ready(protocol::error(msg), silent);
                Flow::Next
            }
            Route::Read { key } => self.read(&name, req, key).await,
            Route::MGet => self.mget(&name, req).await,
            Route::Pool { keys } => {
                count_request(&name, Outcome::Forward);
                self.forward(req, &keys).await
            }
            Route::Control => {
                count_request(&name, Outcome::Forward);
                self.control(req).await
            }
            Route::Pinned { keys, blocking } => {
                count_request(&name, Outcome::Pinned);
                self.pinned_request(&name, req, &keys, blocking).await
            }
        }
    }

    /// A command for a Redis Cluster upstream, routed by its keys' slots:
    /// written to its node at once when it can be ([`Session::write_now`]),
    /// else sent when it reaches the front of the reply queue (which polls
    /// only its head), so the client's order holds across nodes and
    /// redirects either way.
    ///
    /// `keys` are what it writes: marked as written from now (a read of
    /// them bypasses L1 and queues behind this) until its reply is in.
    /// With `may_read_replica` and `replica_reads`, a read-only command goes
    /// to a replica (see `router.rs`); false for what must see the master
    /// (reads behind a write or an earlier read of the same key).
    pub(super) fn cluster_forward(
        &mut self,
        req: &Request,
        keys: &Keys,
        may_read_replica: bool,
    ) -> Flow {
        let Some(router) = self.sidecar.cluster.clone() else {
            return Flow::Next;
        };
        let (proto, bias) = (self.proto, self.slot);
        let silent = self.silent_reply();
        let guard = self.sidecar.cache.begin_write(keys);
        let request = req.encoded();
        let replica = may_read_replica && router.replica_ok_now(&req.args);
        let plan = self.eager_plan(&router, req);
        let written = match plan {
            Some(split::Plan::One { slot }) => self
                .write_now(&router, slot, &request, replica)
                .map(|(sent, token)| (slot, sent, token)),
            _ => None,
        };
        if let Some((slot, sent, token)) = written {
            // Pipelining: written to its node now; what comes back is
            // looked at (redirects followed) when it reaches the front, so
            // a redirected request is resent before anything after it.
            let reply = async move {
                let r = match router
                    .send_after(proto, slot, request, bias, Some(sent), replica)
                    .await
                {
                    Ok(r) => r.bytes,
                    Err(e) => e.to_reply(),
                };
                drop(guard);
                drop(token);
                r
            };
            self.replies.push(Owed::Eager(Box::pin(reply)), silent);
            self.path = Some(Path::Pool);
            return Flow::Next;
        }
        // A read a replica may answer goes by `execute`, which waits for a
        // replica's first connection rather than falling back to the master.
        let split = match plan {
            Some(split::Plan::Split { merge, parts }) if !replica => {
                Some(self.write_split_now(&router, merge, parts))
            }
            _ => None,
        };
        if let Some(split) = split {
            // Split by slot, each part written to its node now when it can
            // be; if every part was, what follows need not wait for it.
            let all_written = split.first.iter().all(Option::is_some);
            let reply = async move {
                let WrittenSplit {
                    merge,
                    parts,
                    first,
                    tokens,
                } = split;
                let r = match router
                    .finish_split(proto, merge, &parts, first, bias, replica)
                    .await
                {
                    Ok(r) => r.bytes,
                    Err(e) => e.to_reply(),
                };
                drop(guard);
                drop(tokens);
                r
            };
            match all_written {
                true => self.replies.push(Owed::Eager(Box::pin(reply)), silent),
                false => self.replies.push(Owed::Composed(Box::pin(reply)), silent),
            }
            self.path = Some(Path::Pool);
            return Flow::Next;
        }
        let args = req.args.clone();
        let reply = async move {
            let r = match router.execute(proto, &args, bias, may_read_replica).await {
                Ok(r) => r.bytes,
                Err(e) => e.to_reply(),
            };
            drop(guard);
            r
        };
        self.replies.push(Owed::Composed(Box::pin(reply)), silent);
        self.path = Some(Path::Pool);
        Flow::Next
    }

    /// The plan of a request that may be written at once, while nothing
    /// owed before it could be overtaken (see `Owed::Eager`) and the
    /// cluster's command table is known; `None`: it is sent when it
    /// reaches the front.
    fn eager_plan(&mut self, router: &Router, req: &Request) -> Option<split::Plan> {
        if !self.replies.eager_may_pass() || !self.can_take(Path::Pool) {
            return None;
        }
        let table = router.commands_now()?;
        Some(split::plan(&table, &req.args))
    }

    /// Writes a one-slot request to its node at once: requests of one
    /// slot go, in order, on the connection the first of them took while
    /// any of them is owed, even if the slot's owner changes meanwhile
    /// (the node answers MOVED and they are resent in order). A connection
    /// not ready or a full queue is `None`: sent when it reaches the front,
    /// as before. With `replica` (a read the router lets go to a replica),
    /// a connected replica of the slot's master takes it when there is one.
    fn write_now(
        &mut self,
        router: &Router,
        slot: u16,
        request: &Bytes,
        replica: bool,
    ) -> Option<(Sent, Arc<()>)> {
        let (addr, at_replica, conn, token) = self.eager_route(router, slot, replica)?;
        let reply = conn.try_send(request.clone())?;
        let sent = Sent {
            addr,
            at_replica,
            reply,
        };
        Some((sent, token))
    }

    /// [`Session::write_now`] for a command split by slot (DEL, EXISTS,
    /// MSET… across slots): each part is written to its slot's master
    /// route at once if it can be.
    fn write_split_now(
        &mut self,
        router: &Router,
        merge: split::Merge,
        parts: Vec<split::Part>,
    ) -> WrittenSplit {
        let (mut first, mut tokens) = (Vec::with_capacity(parts.len()), Vec::new());
        for part in &parts {
            let sent = part.slot.and_then(|slot| {
                let (addr, at_replica, conn, token) = self.eager_route(router, slot, false)?;
                let reply = conn.try_send(part.request.clone())?;
                tokens.push(token);
                Some(Sent {
                    addr,
                    at_replica,
                    reply,
                })
            });
            first.push(sent);
        }
        WrittenSplit {
            merge,
            parts,
            first,
            tokens,
        }
    }

    /// [`Session::write_now`] for an L1 fill's job (`PTTL`s and the read)
    /// of one slot, on its master's route: written back to back at once
    /// when nothing owed before it could be overtaken. Returns the
    /// replies to come and the route's token; `None`: not written (or
    /// only partly: what was written is answered and dropped).
    pub(super) fn write_job_now(
        &mut self,
        router: &Router,
        slot: u16,
        requests: &[Bytes],
    ) -> Option<(
        Vec<tokio::sync::oneshot::Receiver<crate::upstream::ReplyResult>>,
        Arc<()>,
    )> {
        if !self.replies.eager_may_pass() || !self.can_take(Path::Pool) {
            return None;
        }
        let (_, _, conn, token) = self.eager_route(router, slot, false)?;
        let mut pending = Vec::with_capacity(requests.len());
        for r in requests {
            pending.push(conn.try_send(r.clone())?);
        }
        Some((pending, token))
    }

    /// The connection the client's requests of `slot` written at once go
    /// on: the one they took while any of them is owed, else a live one to
    /// the slot's owner (or, for a `replica` read, to a replica of it).
    fn eager_route(
        &mut self,
        router: &Router,
        slot: u16,
        replica: bool,
    ) -> Option<(String, bool, Arc<MuxConn>, Arc<()>)> {
        self.eager_routes.retain(|r| r.owed.strong_count() > 0);
        // A read may follow the slot's master route (it then keeps its
        // place behind the writes on it); a write never takes a replica's.
        let route = self
            .eager_routes
            .iter()
            .find(|r| r.slot == slot && (!r.at_replica || replica));
        let (addr, at_replica, conn, token) = match route {
            Some(r) => (
                r.addr.clone(),
                r.at_replica,
                r.conn.clone(),
                r.owed.upgrade()?,
            ),
            None => {
                let found = match replica {
                    true => router.replica_now(slot, self.proto, self.slot),
                    false => None,
                };
                let (addr, at_replica, conn) = match found {
                    Some((addr, conn)) => (addr, true, conn),
                    None => {
                        let addr = router.owner(slot)?;
                        let conn = router.conn_now(&addr, self.proto, self.slot)?;
                        (addr, false, conn)
                    }
                };
                let token = Arc::new(());
                self.eager_routes.push(EagerRoute {
                    slot,
                    at_replica,
                    addr: addr.clone(),
                    conn: conn.clone(),
                    owed: Arc::downgrade(&token),
                });
                (addr, at_replica, conn, token)
            }
        };
        Some((addr, at_replica, conn, token))
    }

    /// May a request take `path` now, given the ones still owed?
    pub fn can_take(&mut self, path: Path) -> bool {
        if self.replies.is_empty() {
            return true;
        }
        if self.path == Some(path) {
            return true;
        }
        self.replies.collect_now();
        self.replies.is_empty()
    }

    /// The client's multiplexed connection. A client keeps one until it
    /// dies; it takes another only when nothing it sent is still owed, so
    /// nothing it sends later can overtake what it sent before. One stuck
    /// behind a late reply (another client's runaway script) is left too
    /// when nothing is owed: on its own connection to Redis the client would
    /// not wait behind someone else's command (it would get `-BUSY` at once).
    pub fn pool_conn(&mut self) -> Result<Option<Arc<MuxConn>>, Error> {
        if let Some(c) = &self.mux {
            if c.is_alive() && !c.is_late() {
                return Ok(Some(c.clone()));
            }
            self.replies.collect_now();
            if !self.replies.is_empty() {
                return Ok(c.is_alive().then(|| c.clone()));
            }
        }
        let c = self.sidecar.upstream.pool(self.proto).conn(self.slot)?;
        self.mux = Some(c.clone());
        Ok(Some(c))
    }

    /// Sends a request on the client's multiplexed connection; `keys` are
    /// what it writes (invalidated now and again when its reply is in).
    pub async fn forward(&mut self, req: &Request, keys: &Keys) -> Flow {
        if self.sidecar.cluster.is_some() {
            return self.cluster_forward(req, keys, false);
        }
        if !self.can_take(Path::Pool) {
            return Flow::Stall;
        }
        let conn = match self.pool_conn() {
            Ok(Some(c)) => c,
            Ok(None) => return Flow::Stall,
            Err(e) => {
                let silent = self.silent_reply();
                self.replies.ready(e.to_reply(), silent);
                return Flow::Next;
            }
        };
        let silent = self.silent_reply();
        let guard = self.sidecar.cache.begin_write(keys);
        let rx = conn.send(req.encoded()).await;
        self.path = Some(Path::Pool);
        self.replies.push(Owed::Upstream { rx, guard }, silent);
        Flow::Next
    }

    /// A read L1 neither answers nor fills (a key outside the policies, L1
    /// not serving): [`Session::forward`], except that with a cluster and
    /// `replica_reads` it may go to a replica.
    pub async fn forward_read(&mut self, req: &Request) -> Flow {
        if self.sidecar.cluster.is_some() {
            return self.cluster_forward(req, &Keys::None, true);
        }
        self.forward(req, &Keys::None).await
    }

    /// Requests were just sent on the multiplexed connection.
    pub fn path_pool(&mut self) {
        self.path = Some(Path::Pool);
    }

    /// Opens (or takes from the idle list) the client's own connection,
    /// after every earlier reply is in; in the client's database.
    pub async fn attach_pinned(&mut self) -> Result<Flow, Error> {
        if self.sidecar.cluster.is_some() {
            // Which node would it pin to? Not decided yet (docs/cluster.md);
            // refusing keeps a client's own login or state off a random node.
            return Err(Error::Client(CLUSTER_PINNED.to_string()));
        }
        if self.pinned.is_some() {
            return Ok(Flow::Next);
        }
        if !self.can_take(Path::Pinned) {
            return Ok(Flow::Stall);
        }
        let mut conn = self
            .sidecar
            .upstream
            .pinned
            .acquire(self.proto, &self.login)
            .await?;
        self.info
            .upstream_id
            .store(conn.connection_id, std::sync::atomic::Ordering::Relaxed);
        let default_db = self.sidecar.config.upstream.url.db;
        if self.state.db() != default_db {
            let select =
                protocol::command([b"SELECT".to_vec(), self.state.db().to_string().into_bytes()]);
            // Queued before it is written: the reply must find its slot waiting.
            let mut owed = PinnedReplies::new(1, super::pinned::Effect::None, self.deadline());
            owed.internal = true;
            self.replies.push(Owed::Pinned(owed), false);
            conn.write(&select).await?;
        }
        self.pinned = Some(conn);
        self.path = Some(Path::Pinned);
        Ok(Flow::Next)
    }

    /// When to check on the server if a pinned reply has not come.
    fn deadline(&self) -> Option<Instant> {
        Some(Instant::now() + self.sidecar.config.upstream.command_timeout)
    }

    /// Sends a request on the client's own connection.
    pub async fn pinned_request(
        &mut self,
        name: &[u8],
        req: &Request,
        keys: &Keys,
        blocking: bool,
    ) -> Flow {
        if self.sidecar.cluster.is_some() {
            if let Some(flow) = self.shard_route(name, req).await {
                return flow;
            }
        }
        let attached = if self.sidecar.cluster.is_some() {
            match self.cluster_attach(name, req, keys, blocking).await {
                Ok(Some(flow)) => return flow,
                Ok(None) => Ok(Flow::Next),
                Err(e) => Err(e),
            }
        } else {
            self.attach_pinned().await
        };
        match attached {
            Ok(Flow::Next) => {}
            Ok(other) => return other,
            Err(e) => {
                let silent = self.silent_reply();
                self.replies.ready(e.to_reply(), silent);
                return Flow::Next;
            }
        }
        if !self.can_take(Path::Pinned) {
            return Flow::Stall;
        }
        let silent = self.silent_reply();
        // Writes queued in MULTI take effect at EXEC: that is when they are in flight.
        let guard = if self.state.in_multi() {
            if name == b"EXEC" {
                let keys = self.state.take_multi_keys();
                self.sidecar.cache.begin_write(&keys)
            } else {
                None
            }
        } else {
            self.sidecar.cache.begin_write(keys)
        };
        let (expect, effect) = self.state.prepare(name, &req.args, keys, blocking);
        // Subscriptions and MONITOR wait without deadline; a blocking command
        // has one, as a point to check that the server holding it is alive
        // (through a network cut it would otherwise wait forever).
        let subscribed = matches!(
            effect,
            super::pinned::Effect::Subscribe | super::pinned::Effect::Monitor
        );
        let deadline = if subscribed { None } else { self.deadline() };
        let mut owed = PinnedReplies::new(self.state.count(expect), effect, deadline);
        owed.open_ended = blocking || subscribed;
        owed.guard = guard;
        // The slot is queued before the request is written: otherwise a fast
        // reply could be taken for a push message.
        self.replies.push(Owed::Pinned(owed), silent);
        self.path = Some(Path::Pinned);
        self.sync_details();
        let written = match self.pinned.as_mut() {
            Some(conn) => conn.write(&req.encoded()).await,
            None => Err(Error::Upstream("connection closed".into())),
        };
        // Only the latest request can be the blocking one a MOVED answers.
        self.cluster_pin.blocking_sent =
            (blocking && written.is_ok() && self.sidecar.cluster.is_some()).then(|| BlockingSent {
                request: req.encoded(),
                slot: match keys {
                    Keys::Some(keys) => keys
                        .first()
                        .map(|k| crate::upstream::cluster::slots::slot(k)),
                    _ => None,
                },
                redirects: 0,
            });
        if let Err(e) = written {
            self.pinned = None;
            self.replies.pinned_lost(&e);
        } else if matches!(
            name,
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
        ) {
            self.mirror_subscription(name, &req.args[1..]).await;
        }
        Flow::Next
    }

    /// Where a stateful request goes with a cluster upstream: the pinned
    /// connection is opened to the owner of the request's slot (keyless:
    /// any master). MULTI names no slot, so it is answered here and written
    /// first on the connection the transaction's first keyed command opens.
    /// A queued command in another slot than the transaction's (or owned by
    /// another node than the pinned one) is not sent: it is answered
    /// `QUEUED` and EXEC gets Redis's `CROSSSLOT` (what one node answers
    /// when the slots differ), the transaction discarded upstream. Outside
    /// a transaction, a keyed command of another node's slot never goes to
    /// the pinned node (it would answer MOVED): behind blocking commands it
    /// waits for them and is routed afresh; while subscribed or watching it
    /// goes through the router, as do DBSIZE, KEYS, RANDOMKEY and SCAN
    /// (every master's keys). Returns `Some(flow)` when the request was
    /// answered here (or must stall), `None` when the pinned connection is
    /// ready for it.
    async fn cluster_attach(
        &mut self,
        name: &[u8],
        req: &Request,
        keys: &Keys,
        blocking: bool,
    ) -> Result<Option<Flow>, Error> {
        let Some(router) = self.sidecar.cluster.clone() else {
            return Ok(None);
        };
        if !matches!(self.login, Login::Configured)
            || self.state.db() != self.sidecar.config.upstream.url.db
        {
            return Err(Error::Client(CLUSTER_PINNED.to_string()));
        }
        let tracking_on = name == b"CLIENT"
            && req
                .args
                .get(1)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"TRACKING"))
            && req
                .args
                .get(2)
                .is_some_and(|a| a.eq_ignore_ascii_case(b"ON"));
        // Inside MULTI the node queues MONITOR and refuses it at EXEC itself.
        let monitor = name == b"MONITOR" && !self.state.in_multi();
        if tracking_on || monitor {
            if self.state.in_multi() {
                // As Redis does with a command it refuses when queued.
                self.cluster_pin.txn_aborted = true;
            }
            let e = if monitor {
                CLUSTER_MONITOR
            } else {
                CLUSTER_TRACKING
            };
            return Ok(Some(self.answer(protocol::error(e))));
        }
        if self.pinned.is_some() && !self.state.needs_pin_beyond_blocking() {
            // Pinned only for replies still owed (blocking commands, the end
            // of a transaction), by a node that may not own what follows
            // (it would answer MOVED; a next MULTI would be tied to it) or
            // own only some of it (DBSIZE). Routed afresh once they are in.
            return Ok(Some(Flow::Stall));
        }
        let table = router
            .commands()
            .await
            .map_err(|e| Error::Upstream(e.detail()))?;
        enum Target {
            Slot(u16),
            Any,
            /// Every master's answer (DBSIZE, KEYS, RANDOMKEY, SCAN).
            Masters,
            /// The request's own keys span slots: Redis's refusal.
            Refused(Bytes),
        }
        // Redis refuses a wrong number of arguments before anything else
        // (and flags the transaction): keyless, it must not pin a
        // transaction to an arbitrary master.
        let malformed = table.lookup(&req.args).filter(|i| {
            self.state.in_multi() && self.pinned.is_none() && !i.arity_fits(req.args.len())
        });
        let plan = match malformed {
            Some(i) => split::Plan::Refuse(protocol::error(&format!(
                "ERR wrong number of arguments for '{}' command",
                i.name
            ))),
            None => split::plan(&table, &req.args),
        };
        let in_multi = self.state.in_multi();
        let target = match plan {
            split::Plan::One { slot } => Target::Slot(slot),
            split::Plan::AnyMaster => Target::Any,
            // Queued on the transaction's node, they answer for it alone.
            split::Plan::AllMasters { .. } | split::Plan::RandomKey if in_multi => Target::Any,
            split::Plan::AllMasters { .. } | split::Plan::RandomKey => Target::Masters,
            split::Plan::Split { .. } => Target::Refused(protocol::error(split::CROSSSLOT)),
            split::Plan::Refuse(bytes) => Target::Refused(bytes),
            // Its cursor spans the masters; one pinned node cannot follow it.
            split::Plan::Scan { .. } if in_multi => Target::Refused(protocol::error(
                "ERR nearcache: SCAN in a transaction is not supported on a Redis Cluster upstream",
            )),
            split::Plan::Scan { .. } => Target::Masters,
        };
        if in_multi && name == b"WATCH" {
            // Redis refuses it whatever the keys; a node that does not own
            // them would answer MOVED first.
            return Ok(Some(
                self.answer(protocol::error("ERR WATCH inside MULTI is not allowed")),
            ));
        }
        let resp2_subscriber = self.proto == 2 && self.state.subscriptions() > 0;
        // What Redis answers a RESP2 subscriber for anything but the
        // (un)subscribe family, PING, QUIT and RESET.
        let subscriber_refusal = || {
            let full = table.lookup(&req.args).map_or_else(
                || String::from_utf8_lossy(name).to_ascii_lowercase(),
                |i| i.name.clone(),
            );
            protocol::error(&format!(
                "ERR Can't execute '{full}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
            ))
        };
        if let (b"WATCH", false, Target::Slot(s)) = (name, in_multi, &target) {
            // The watched keys and the transaction live in one slot (as
            // cluster clients require): on a node owning both slots a second
            // one would do, on another node it would answer MOVED. Refused
            // before it runs, as a node refuses it: what was watched stays.
            let watched = self
                .cluster_pin
                .watch_slot
                .filter(|_| self.state.watching());
            let tied_elsewhere = self.pinned.is_some()
                && self.state.needs_pin_beyond_blocking()
                && !self.state.no_touch_only()
                && router.owner(*s) != self.cluster_pin.node;
            if tied_elsewhere && resp2_subscriber {
                return Ok(Some(self.answer(subscriber_refusal())));
            }
            if watched.is_some_and(|w| w != *s) || tied_elsewhere {
                return Ok(Some(self.answer(protocol::error(split::CROSSSLOT))));
            }
            if watched.is_none() {
                self.cluster_pin.watch_slot = Some(*s);
            }
        }
        let control = matches!(name, b"EXEC" | b"DISCARD" | b"MULTI" | b"WATCH" | b"RESET");
        let ok = |bytes: Bytes| protocol::Reply {
            kind: if bytes.first() == Some(&b'-') {
                protocol::ReplyKind::Error
            } else {
                protocol::ReplyKind::Normal
            },
            bytes,
        };
        // Answered here: the state moves as if the node had answered.
        let local = |this: &mut Self, reply: Bytes| {
            let (_, effect) = this.state.prepare(name, &req.args, &Keys::None, false);
            this.state.on_reply(&effect, &ok(reply.clone()));
            this.sync_details();
            if !this.state.needs_pin() && !this.replies.awaiting_pinned() {
                this.release_pinned();
            }
            Some(this.answer(reply))
        };
        if name == b"MULTI" && !in_multi {
            if self.pinned.is_some() && self.state.no_touch_only() {
                // NO-TOUCH ties the client to no node: the transaction goes
                // where its first key is, as for any client.
                if self.replies.awaiting_pinned() {
                    return Ok(Some(Flow::Stall));
                }
                self.park_pinned();
            }
            self.cluster_pin.deferred.clear();
            // After WATCH, the transaction's slot is the watched one.
            self.cluster_pin.txn_slot = self
                .cluster_pin
                .watch_slot
                .filter(|_| self.state.watching());
            self.cluster_pin.txn_cross = false;
            self.cluster_pin.txn_aborted = false;
            if self.pinned.is_none() {
                self.cluster_pin.deferred_multi = true;
                return Ok(local(self, protocol::simple("OK")));
            }
        }
        if let Target::Refused(bytes) = &target {
            if in_multi && !control {
                // As Redis: the command is refused and the transaction flagged.
                self.cluster_pin.txn_aborted = true;
            }
            return Ok(Some(self.answer(bytes.clone())));
        }
        if in_multi && !control {
            if matches!(target, Target::Any) && self.pinned.is_none() {
                if !table.knows(&req.args) {
                    // Any node refuses it without running it, and Redis
                    // flags the transaction: no need to pin it anywhere.
                    self.cluster_pin.txn_aborted = true;
                    return Ok(Some(self.cluster_forward(req, keys, false)));
                }
                // Pinned now, it would tie the transaction to any master,
                // and a later key of another node would get CROSSSLOT.
                let queued = protocol::simple("QUEUED");
                let (_, effect) = self.state.prepare(name, &req.args, keys, false);
                self.state.on_reply(&effect, &ok(queued.clone()));
                self.cluster_pin.deferred.push(req.encoded());
                return Ok(Some(self.answer(queued)));
            }
            if let Target::Slot(s) = target {
                let other_node = self.pinned.is_some()
                    && self.cluster_pin.node.is_some()
                    && router.owner(s) != self.cluster_pin.node;
                let other_slot = self.cluster_pin.txn_slot.is_some_and(|t| t != s);
                if other_node || other_slot {
                    self.cluster_pin.txn_cross = true;
                    return Ok(local(self, protocol::simple("QUEUED")));
                }
                self.cluster_pin.txn_slot = Some(s);
            }
        }
        if in_multi && (name == b"EXEC" || name == b"DISCARD") {
            let refusal = if name == b"DISCARD" {
                None
            } else if self.cluster_pin.txn_aborted {
                Some("EXECABORT Transaction discarded because of previous errors.")
            } else if self.cluster_pin.txn_cross {
                Some(split::CROSSSLOT)
            } else {
                None
            };
            let to_run =
                name == b"EXEC" && refusal.is_none() && !self.cluster_pin.deferred.is_empty();
            if self.pinned.is_none() && self.cluster_pin.deferred_multi && !to_run {
                // Nothing reached a node: the transaction ends here.
                self.cluster_pin.deferred_multi = false;
                self.cluster_pin.deferred.clear();
                let reply = match (name, refusal) {
                    (b"DISCARD", _) => protocol::simple("OK"),
                    (_, Some(e)) => protocol::error(e),
                    _ => protocol::array(&[]),
                };
                return Ok(local(self, reply));
            }
            if let Some(e) = refusal {
                // The node's queue is dropped; the client gets Redis's error.
                if self.pinned.is_some() {
                    let mut owed =
                        PinnedReplies::new(1, super::pinned::Effect::None, self.deadline());
                    owed.internal = true;
                    self.replies.push(Owed::Pinned(owed), false);
                    let discard = protocol::command(["DISCARD"]);
                    let written = match self.pinned.as_mut() {
                        Some(conn) => conn.write(&discard).await,
                        None => Ok(()),
                    };
                    if let Err(err) = written {
                        self.pinned = None;
                        self.replies.pinned_lost(&err);
                    }
                }
                return Ok(local(self, protocol::error(e)));
            }
        }
        if let (true, Target::Slot(s)) =
            (self.pinned.is_some() && self.state.no_touch_only(), &target)
        {
            if router.owner(*s) != self.cluster_pin.node {
                // NO-TOUCH can be set on any connection: the client's moves to
                // the key's node once nothing is owed on it (a blocking
                // command in flight), where NO-TOUCH is set again.
                if self.replies.awaiting_pinned() {
                    return Ok(Some(Flow::Stall));
                }
                self.park_pinned();
            }
        }
        let stateful = blocking || matches!(name, b"WATCH" | b"SSUBSCRIBE" | b"SUNSUBSCRIBE");
        let elsewhere = match &target {
            Target::Slot(s) => !stateful && router.owner(*s) != self.cluster_pin.node,
            // A RESP2 subscriber's node answers as Redis would (PING, or the refusal).
            Target::Masters => !resp2_subscriber,
            _ => false,
        };
        if self.pinned.is_some()
            && self.cluster_pin.node.is_some()
            && elsewhere
            && self.state.others_may_go_elsewhere()
        {
            // Subscribed or watching on one node, a key of another (the
            // pinned node would answer MOVED) or every master's keys (it
            // would answer for its own). A RESP2 subscriber gets what
            // Redis answers it for any such command.
            if resp2_subscriber {
                return Ok(Some(self.answer(subscriber_refusal())));
            }
            if !self.can_take(Path::Pool) {
                return Ok(Some(Flow::Stall));
            }
            return Ok(Some(self.cluster_forward(req, keys, false)));
        }
        if self.pinned.is_some() {
            return Ok(None);
        }
        if !self.can_take(Path::Pinned) {
            return Ok(Some(Flow::Stall));
        }
        let node = match target {
            Target::Slot(s) => router.owner(s),
            _ => None,
        };
        let node = match node {
            Some(n) => n,
            None => router
                .any_master()
                .map_err(|e| Error::Upstream(e.detail()))?,
        };
        if !self.state.no_touch() {
            // NO-TOUCH ended without a release (RESET): they are of no use.
            self.cluster_pin.parked.clear();
        }
        let parked = self
            .cluster_pin
            .parked
            .iter()
            .position(|c| c.node.as_deref() == Some(node.as_str()) && c.proto == self.proto)
            .map(|i| self.cluster_pin.parked.swap_remove(i))
            .and_then(|mut c| c.reusable().then_some(c));
        let mut conn = match parked {
            // NO-TOUCH is on already.
            Some(c) => c,
            _ => {
                let mut conn = self
                    .sidecar
                    .upstream
                    .pinned
                    .acquire_at(Some(&node), self.proto, &Login::Configured)
                    .await?;
                if self.state.no_touch() {
                    // Before a deferred MULTI: inside, it would be queued.
                    let mut owed =
                        PinnedReplies::new(1, super::pinned::Effect::None, self.deadline());
                    owed.internal = true;
                    self.replies.push(Owed::Pinned(owed), false);
                    conn.write(&protocol::command(["CLIENT", "NO-TOUCH", "ON"]))
                        .await?;
                }
                conn
            }
        };
        self.info
            .upstream_id
            .store(conn.connection_id, std::sync::atomic::Ordering::Relaxed);
        *self.info.pinned_at.lock() = Some((node.clone(), conn.connection_id));
        // (RESET ends a transaction without coming here: the state says.)
        let multi = std::mem::take(&mut self.cluster_pin.deferred_multi) && self.state.in_multi();
        let queued = std::mem::take(&mut self.cluster_pin.deferred);
        if multi {
            let expect = 1 + queued.len();
            let mut owed = PinnedReplies::new(expect, super::pinned::Effect::None, self.deadline());
            owed.internal = true;
            self.replies.push(Owed::Pinned(owed), false);
            conn.write(&protocol::command(["MULTI"])).await?;
            for request in &queued {
                conn.write(request).await?;
            }
        }
        self.cluster_pin.node = Some(node);
        self.pinned = Some(conn);
        self.path = Some(Path::Pinned);
        Ok(None)
    }

    fn on_pinned_frame(&mut self, frame: Option<PinnedFrame>) {
        match frame {
            Some(PinnedFrame::Reply(mut r)) => {
                let on = self.pinned.as_ref().map(|c| c.connection_id);
                if self.cluster_pin.asking_owed.is_some()
                    && self.cluster_pin.asking_owed == on
                    && !self.state.out_of_band(&r)
                {
                    self.cluster_pin.asking_owed = None;
                    return;
                }
                if r.kind == protocol::ReplyKind::Error && self.pinned_redirect(&mut r) {
                    return;
                }
                if self.pinned_event_dropped(&r) {
                    return;
                }
                self.replies.pinned_frame(r, &mut self.state);
                if !self.replies.awaiting_pinned() {
                    self.cluster_pin.blocking_sent = None;
                }
                self.sync_details();
                if !self.state.needs_pin() && !self.replies.awaiting_pinned() {
                    self.release_pinned();
                }
            }
            Some(PinnedFrame::Closed(e)) => {
                // The server closed the client's own connection (CLIENT KILL,
                // timeout): the client sees its connection closed, as on Redis.
                self.pinned = None;
                self.replies.pinned_lost(&e);
            }
            None => {
                self.pinned = None;
                self.replies
                    .pinned_lost(&Error::Upstream("connection closed".into()));
            }
        }
    }

    /// Where the blocking command in flight goes again after its node's
    /// error `text` (`redirect`, parsed from it): after a `MOVED` (a stale
    /// map, or its slot moved while it was blocked) to the node named, after
    /// an `ASK` (the slot is being migrated and the key is not, or no
    /// longer, there) to the target with `ASKING` (the `bool`), after the
    /// end of its block because the node turned into a replica (a failover)
    /// to the slot's owner. Only while nothing else ties the client to that
    /// node (no transaction, WATCH, subscription, NO-TOUCH…): the command
    /// ended without a result, so it is sent again
    /// ([`Session::resend_blocking`]) rather than turned into an error.
    /// `None`: not such an answer.
    fn blocking_resend_to(
        &mut self,
        router: &Router,
        redirect: Option<&Redirect>,
        text: &str,
    ) -> Option<(String, bool)> {
        let only_blocking = self.state.needs_pin() && !self.state.needs_pin_beyond_blocking();
        let sent = self
            .cluster_pin
            .blocking_sent
            .as_mut()
            .filter(|s| only_blocking && s.redirects < BLOCKING_REDIRECTS)?;
        let to = match redirect {
            Some(Redirect::Moved { addr, .. }) => (addr.clone(), false),
            Some(Redirect::Ask { addr, .. }) => (addr.clone(), true),
            // The map may still name the demoted node: it answers MOVED.
            None if text.starts_with(UNBLOCKED_BY_FAILOVER) => {
                router.view().refresh();
                (router.owner(sent.slot?)?, false)
            }
            None => return None,
        };
        sent.redirects += 1;
        Some(to)
    }

    /// Sends the redirected blocking command again, on a connection to the
    /// node named (the old one is closed: the client had nothing else on
    /// it), after `ASKING` for an `ASK`.
    async fn resend_blocking(&mut self) {
        let Some((addr, asking)) = self.cluster_pin.resend_to.take() else {
            return;
        };
        let Some(request) = self
            .cluster_pin
            .blocking_sent
            .as_ref()
            .map(|s| s.request.clone())
        else {
            return;
        };
        if let Some(conn) = self.pinned.take() {
            self.sidecar.upstream.pinned.release(conn, false);
        }
        self.cluster_pin.node = None;
        let acquired = self
            .sidecar
            .upstream
            .pinned
            .acquire_at(Some(&addr), self.proto, &Login::Configured)
            .await;
        let written = match acquired {
            Ok(mut conn) => {
                let written = if asking {
                    let mut both = BytesMut::from(&protocol::command(["ASKING"])[..]);
                    both.extend_from_slice(&request);
                    self.cluster_pin.asking_owed = Some(conn.connection_id);
                    conn.write(&both.freeze()).await
                } else {
                    conn.write(&request).await
                };
                self.info
                    .upstream_id
                    .store(conn.connection_id, std::sync::atomic::Ordering::Relaxed);
                *self.info.pinned_at.lock() = Some((addr.clone(), conn.connection_id));
                self.cluster_pin.node = Some(addr);
                self.pinned = Some(conn);
                written
            }
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            self.pinned = None;
            self.cluster_pin.blocking_sent = None;
            self.cluster_pin.asking_owed = None;
            self.replies.pinned_lost(&e);
        }
    }

    /// A node's error on the pinned connection. A `MOVED` / `ASK` (the
    /// slot moved since the map nearcache routed by, or during the client's
    /// WATCH or transaction): the map learns a `MOVED`; a lone blocking
    /// command is sent again ([`Session::blocking_resend_to`], `true`: the
    /// reply is taken); otherwise the connection's state stays on its node,
    /// so the command (which did not run) is not resent elsewhere, and the
    /// client gets an error in its place, never the redirect.
    fn pinned_redirect(&mut self, r: &mut protocol::Reply) -> bool {
        let (Some(router), Some(node)) =
            (self.sidecar.cluster.clone(), self.cluster_pin.node.clone())
        else {
            return false;
        };
        let text = r.error_text().unwrap_or_default();
        let redirect = Redirect::parse(&text, &node);
        if let Some(Redirect::Moved { slot, addr }) = &redirect {
            router.view().moved(*slot, addr);
        }
        if let Some(to) = self.blocking_resend_to(&router, redirect.as_ref(), &text) {
            self.cluster_pin.resend_to = Some(to);
            return true;
        }
        let to = match redirect {
            Some(Redirect::Moved { addr, .. } | Redirect::Ask { addr, .. }) => addr,
            None => return false,
        };
        r.bytes = protocol::error(&format!(
            "TRYAGAIN nearcache: the key's slot is moving or moved to {to}, away from the node this client's connection is pinned to ({node}); the command did not run"
        ));
        false
    }

    /// Sets the client's NO-TOUCH connection aside, kept for its next
    /// command on that node (see `ClusterPin::parked`).
    fn park_pinned(&mut self) {
        self.cluster_pin.node = None;
        if let Some(conn) = self.pinned.take() {
            self.cluster_pin.parked.retain(|c| c.node != conn.node);
            self.cluster_pin.parked.push(conn);
            self.info
                .upstream_id
                .store(-1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Gives the pinned connection back (kept for reuse only if its state is clean).
    pub fn release_pinned(&mut self) {
        self.cluster_pin.node = None;
        if !self.state.no_touch() {
            // Closed: NO-TOUCH is on on them.
            self.cluster_pin.parked.clear();
        }
        if let Some(conn) = self.pinned.take() {
            let clean = !self.state.needs_pin() && !self.replies.awaiting_pinned();
            self.sidecar.upstream.pinned.release(conn, clean);
            self.info
                .upstream_id
                .store(-1, std::sync::atomic::Ordering::Relaxed);
            *self.info.pinned_at.lock() = None;
        }
    }

    /// Mirrors the connection state into what CLIENT LIST shows.
    pub fn sync_details(&self) {
        let [sub, psub, ssub] = self.state.subscription_counts();
        let mut d = self.info.details.lock();
        d.db = self.state.db();
        d.resp = self.proto;
        d.sub = sub;
        d.psub = psub;
        d.ssub = ssub;
        d.multi = self.state.in_multi();
        d.blocked = self.state.blocked();
        d.monitor = self.state.monitoring();
        d.tracking = self.state.tracking();
    }

    /// Queues a reply nearcache produced itself.
    pub fn answer(&mut self, reply: Bytes) -> Flow {
        let silent = self.silent_reply();
        self.replies.ready(reply, silent);
        Flow::Next
    }
}

/// What one read from the client's socket found.
enum Read {
    Closed,
    /// Fewer bytes than there was room for: the socket had nothing more.
    Drained,
    /// The buffer's room filled: more may be waiting.
    Full,
}

/// One read; a short read also marks the socket not readable. tokio keeps
/// readiness until a read fails with `WouldBlock`, so without this every
/// request would cost a second, empty `recv` and an `epoll_wait` before the
/// task could sleep (tokio's own `AsyncRead` does the same on a short read;
/// an edge that arrives meanwhile is kept, as readiness is cleared only for
/// the event it came from).
fn read_some(socket: &TcpStream, inbuf: &mut BytesMut) -> std::io::Result<Read> {
    let room = inbuf.capacity() - inbuf.len();
    let mut read = Read::Closed;
    let result = socket.try_io(tokio::io::Interest::READABLE, || {
        let n = socket.try_read_buf(inbuf)?;
        read = match n {
            0 => Read::Closed,
            n if n < room => Read::Drained,
            _ => Read::Full,
        };
        match read {
            Read::Drained => Err(std::io::ErrorKind::WouldBlock.into()),
            _ => Ok(()),
        }
    });
    match result {
        Ok(()) => Ok(read),
        Err(_) if matches!(read, Read::Drained) => Ok(read),
        Err(e) => Err(e),
    }
}

async fn next_frame(pinned: &mut Option<PinnedConn>) -> Option<PinnedFrame> {
    match pinned {
        Some(p) => p.frames.recv().await,
        None => std::future::pending().await,
    }
}
