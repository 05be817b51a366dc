//! Client side: the accept loop, connection limits, and one session per client.
//!
//! A session is two tasks. The reader parses requests and dispatches each one
//! at once (L1 hit, multiplexed upstream, pinned connection, or local answer),
//! queueing a [`Pending`] per request. The writer takes the pending items in
//! request order, waits for each reply and writes it, batching whatever is
//! ready into one write. Reading and writing never wait on each other, so a
//! client may pipeline without limit (up to `max_pending_per_client`).
//!
//! Order across paths: a client's requests on the multiplexed connection are
//! executed in order because a client uses one pool connection at a time.
//! When it moves between that connection and its pinned one, the reader
//! first waits until every earlier reply has been written (a barrier).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info, warn};

use crate::cache::{self, Cache, PolicyRef, SharedReply, Ticket};
use crate::command::{self, Class, Keys, Pin};
use crate::config::Config;
use crate::error::Error;
use crate::metrics;
use crate::protocol::{self, Limits, Reply, ReplyKind, Request};
use crate::upstream::{PinnedConn, PinnedFrame, ReplyResult, Upstream};

/// State shared by every session.
pub struct Shared {
    pub config: Arc<Config>,
    pub upstream: Arc<Upstream>,
    pub cache: Arc<Cache>,
    pub tdengine: Option<Arc<crate::tdengine::Tdengine>>,
    pub clients: AtomicUsize,
    next_client: AtomicU64,
    /// Set when shutdown starts: readiness goes false, sessions stop reading.
    pub draining: AtomicBool,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        upstream: Arc<Upstream>,
        cache: Arc<Cache>,
        tdengine: Option<Arc<crate::tdengine::Tdengine>>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            config,
            upstream,
            cache,
            tdengine,
            clients: AtomicUsize::new(0),
            next_client: AtomicU64::new(1),
            draining: AtomicBool::new(false),
        })
    }
}

/// Accepts clients until `shutdown` turns true; returns once every session has
/// finished or `grace` has passed after shutdown.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let m = metrics::get();
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (socket, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        socket.set_nodelay(true).ok();
        if shared.clients.load(Ordering::Relaxed) >= shared.config.server.max_clients {
            m.client_connections_rejected_total.inc();
            tokio::spawn(async move {
                let mut socket = socket;
                let _ = socket
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = socket.shutdown().await;
            });
            continue;
        }
        shared.clients.fetch_add(1, Ordering::Relaxed);
        m.client_connections.inc();
        m.client_connections_total.inc();
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        debug!(client = id, %peer, "client connected");
        let shared2 = shared.clone();
        let shutdown2 = shutdown.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            // Released on drop, so a session that panics still gives its place back.
            let _slot = ClientSlot(shared2.clone());
            run_session(socket, shared2.clone(), shutdown2).await;
            debug!(client = id, "client disconnected");
            drop(done);
        });
    }
    drop(listener);
    drop(done_tx);
    let grace = shared.config.shutdown_grace;
    info!(
        clients = shared.clients.load(Ordering::Relaxed),
        ?grace,
        "draining clients"
    );
    // Every session holds a clone of done_tx; recv() returns None when all are gone.
    let _ = tokio::time::timeout(grace, done_rx.recv()).await;
}

/// A client's place under `max_clients`.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        metrics::get().client_connections.dec();
    }
}

// --- Pending replies ---------------------------------------------------------------

/// What to do to L1 when a write's reply arrives.
enum Post {
    None,
    Invalidate(Vec<Bytes>),
    InvalidateAll,
}

/// How many in-band replies a pinned request produces.
#[derive(Clone, Copy)]
enum Expect {
    Count(usize),
    /// UNSUBSCRIBE-family without arguments: one per subscription of that kind, at least one.
    UnsubscribeAll(SubKind),
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum SubKind {
    Channel,
    Pattern,
    Shard,
}

enum Pending {
    Ready(Bytes),
    Upstream {
        rx: oneshot::Receiver<ReplyResult>,
        post: Post,
    },
    Shared(SharedReply),
    MGet {
        /// L1 hits by position; `None` = take the next element of the upstream reply.
        parts: Vec<Option<Bytes>>,
        rx: oneshot::Receiver<ReplyResult>,
        /// Per missing key: where to store its value in L1, if it may be cached.
        fills: Vec<Option<(Bytes, Ticket, PolicyRef)>>,
        proto: u8,
    },
    Pinned {
        expect: Expect,
        post: Post,
        monitor: bool,
        /// Consume the replies without writing them (nearcache's own SELECT on a new connection).
        silent: bool,
        /// How long to wait for each reply; none for blocking and subscribe commands.
        timeout: Option<Duration>,
    },
    /// A TDengine-aware GET: resolved by its own future.
    Future(futures::future::BoxFuture<'static, Bytes>),
    Attach(mpsc::Receiver<PinnedFrame>),
    Detach,
    Close,
}

/// Ready replies up to this size are coalesced before they reach the writer.
const COALESCE_MAX: usize = 16 * 1024;

/// Counts replies written so the reader can wait for all earlier ones.
struct Progress {
    done: AtomicU64,
    waiting: AtomicBool,
    notify: Notify,
}

impl Progress {
    fn advance(&self) {
        // SeqCst on both sides: this is a store-then-load handshake with
        // `wait_for`; weaker orderings let both sides miss each other.
        self.done.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    async fn wait_for(&self, target: u64) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if self.done.load(Ordering::SeqCst) >= target {
                self.waiting.store(false, Ordering::SeqCst);
                return;
            }
            notified.await;
        }
    }
}

// --- Session -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    None,
    Pool,
    Pinned,
}

struct PinState {
    db: u32,
    multi: bool,
    watch: bool,
    subscribed: bool,
    sticky: bool,
    reply_off: bool,
    skip_next: bool,
    multi_keys: Vec<Bytes>,
    multi_all: bool,
}

impl PinState {
    /// A fresh connection's state: the configured db, nothing pending.
    fn new(db: u32) -> PinState {
        PinState {
            db,
            multi: false,
            watch: false,
            subscribed: false,
            sticky: false,
            reply_off: false,
            skip_next: false,
            multi_keys: Vec::new(),
            multi_all: false,
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    proto: u8,
    slot: usize,
    authed: bool,
    pinned: Option<PinnedConn>,
    /// The multiplexed connection this client uses (see [`Session::pool_conn`]).
    conn: Option<Arc<crate::upstream::MuxConn>>,
    state: PinState,
    default_db: u32,
    pending: mpsc::Sender<Pending>,
    /// Ready replies not yet handed to the writer (see [`Session::push`]).
    ready: BytesMut,
    pushed: u64,
    progress: Arc<Progress>,
    last_path: Path,
    close: Arc<Notify>,
}

async fn run_session(socket: TcpStream, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let (rd, wr) = socket.into_split();
    let (tx, rx) = mpsc::channel(shared.config.server.max_pending_per_client);
    let progress = Arc::new(Progress {
        done: AtomicU64::new(0),
        waiting: AtomicBool::new(false),
        notify: Notify::new(),
    });
    let close = Arc::new(Notify::new());
    let writer = tokio::spawn(write_loop(
        wr,
        rx,
        progress.clone(),
        shared.cache.clone(),
        close.clone(),
    ));
    let default_db = shared.config.upstream.url.db;
    let mut session = Session {
        slot: shared.upstream.assign_slot(),
        authed: shared.config.server.requirepass.is_none(),
        shared,
        proto: 2,
        pinned: None,
        conn: None,
        state: PinState::new(default_db),
        default_db,
        pending: tx,
        ready: BytesMut::new(),
        pushed: 0,
        progress,
        last_path: Path::None,
        close,
    };
    session.read_loop(rd, &mut shutdown).await;
    session.flush_ready().await;
    // Let the writer answer everything already dispatched before the pinned
    // connection (which may still owe replies) is dropped.
    let target = session.pushed;
    let progress = session.progress.clone();
    let timeout = session.shared.config.upstream.command_timeout;
    drop(session.pending);
    let _ = tokio::time::timeout(timeout, progress.wait_for(target)).await;
    drop(session.pinned);
    let _ = writer.await;
}

impl Session {
    fn limits(&self) -> Limits {
        let s = &self.shared.config.server;
        Limits {
            max_bulk_len: s.proto_max_bulk_len,
            max_multibulk_len: s.max_multibulk_len,
            max_query_buffer: s.client_query_buffer_limit,
        }
    }

    async fn read_loop(&mut self, mut rd: OwnedReadHalf, shutdown: &mut watch::Receiver<bool>) {
        let limits = self.limits();
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let mut parser = protocol::RequestParser::default();
        let close = self.close.clone();
        loop {
            loop {
                match parser.next(&mut buf, &limits) {
                    Ok(Some(req)) => {
                        if !self.handle(req).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(protocol::ProtocolError(msg)) => {
                        debug!(error = %msg, "client protocol error; closing");
                        count_request(b"", Outcome::Error);
                        self.push(Pending::Ready(protocol::error(&msg))).await;
                        self.push(Pending::Close).await;
                        return;
                    }
                }
            }
            let wanted = parser.wanted(&buf);
            if buf.capacity() - buf.len() < wanted.max(4096) {
                buf.reserve(wanted.max(16 * 1024));
            }
            self.flush_ready().await;
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = shutdown.wait_for(|s| *s) => return,
                _ = close.notified() => return,
            }
        }
    }

    /// Queues a reply. Consecutive small ready replies (L1 hits, local answers)
    /// are coalesced into one item, so a pipeline of hits costs the writer one
    /// wake-up and one write.
    async fn push(&mut self, p: Pending) {
        match p {
            Pending::Ready(bytes) if bytes.len() <= COALESCE_MAX => {
                self.ready.extend_from_slice(&bytes);
                if self.ready.len() >= COALESCE_MAX {
                    self.flush_ready().await;
                }
            }
            other => {
                self.flush_ready().await;
                self.send(other).await;
            }
        }
    }

    async fn flush_ready(&mut self) {
        if !self.ready.is_empty() {
            let bytes = self.ready.split().freeze();
            self.send(Pending::Ready(bytes)).await;
        }
    }

    async fn send(&mut self, p: Pending) {
        self.pushed += 1;
        if self.pending.send(p).await.is_err() {
            // The writer is gone (client socket failed): nothing more can be answered.
            self.close.notify_one();
        }
    }

    /// Waits until every reply queued so far has been written.
    async fn barrier(&mut self) {
        self.flush_ready().await;
        let target = self.pushed;
        self.progress.wait_for(target).await;
    }

    fn needs_pin(&self) -> bool {
        let s = &self.state;
        s.db != self.default_db || s.multi || s.watch || s.subscribed || s.sticky
    }

    /// Handles one request; false when the connection must close.
    async fn handle(&mut self, req: Request) -> bool {
        let name = req.name_upper();
        if !self.authed && !matches!(&name[..], b"AUTH" | b"HELLO" | b"QUIT" | b"RESET") {
            count_request(&name, Outcome::Error);
            self.push(Pending::Ready(protocol::error(
                "NOAUTH Authentication required.",
            )))
            .await;
            return true;
        }
        let class = command::classify(&name, &req.args);
        match class {
            Class::Local => return self.local(&name, req).await,
            Class::Refused(msg) => {
                count_request(&name, Outcome::Error);
                self.push(Pending::Ready(protocol::error(msg))).await;
                return true;
            }
            _ => {}
        }
        if self.needs_pin() {
            let keys = command::write_keys(&name, &req.args);
            self.pinned_request(&name, req, keys).await;
            return true;
        }
        match class {
            Class::CacheableRead { key } => self.read(&name, req, key).await,
            Class::MGet => self.mget(&name, req).await,
            Class::Write { keys } => {
                let post = self.invalidate_now(&keys);
                count_request(&name, Outcome::Forward);
                self.forward(req, post).await;
            }
            Class::Forward => {
                count_request(&name, Outcome::Forward);
                self.forward(req, Post::None).await;
            }
            Class::Pinned { pin, keys } => {
                match pin {
                    Pin::Select => {}
                    Pin::Multi => self.state.multi = true,
                    Pin::Watch => self.state.watch = true,
                    Pin::Subscribe => self.state.subscribed = true,
                    Pin::Sticky => self.state.sticky = true,
                    Pin::Blocking => {}
                }
                self.pinned_request(&name, req, keys).await;
            }
            Class::Local | Class::Refused(_) => unreachable!("handled above"),
        }
        true
    }

    /// Invalidates a write's keys before it is sent; returns what to repeat when its reply arrives.
    fn invalidate_now(&self, keys: &Keys) -> Post {
        let cache = &self.shared.cache;
        if !cache.enabled() {
            return Post::None;
        }
        match keys {
            Keys::None => Post::None,
            Keys::All => {
                cache.clear_all("local_write");
                Post::InvalidateAll
            }
            Keys::Some(list) => {
                let cached: Vec<Bytes> = list
                    .iter()
                    .filter(|k| cache.policy(k).is_some())
                    .cloned()
                    .collect();
                for k in &cached {
                    cache.invalidate(k, "local_write");
                }
                if cached.is_empty() {
                    Post::None
                } else {
                    Post::Invalidate(cached)
                }
            }
        }
    }

    /// The client's multiplexed connection. A client keeps one connection
    /// until it dies, so its requests run in the order it sent them; only then
    /// does it take its pool slot's current one (or any live one).
    fn pool_conn(&mut self) -> Result<Arc<crate::upstream::MuxConn>, Error> {
        if let Some(c) = &self.conn {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        let c = self.shared.upstream.pool(self.proto).conn(self.slot)?;
        self.conn = Some(c.clone());
        Ok(c)
    }

    async fn switch_path(&mut self, to: Path) {
        if self.last_path != to && self.last_path != Path::None {
            self.barrier().await;
        }
        self.last_path = to;
    }

    /// Sends a request on the multiplexed connection.
    async fn forward(&mut self, req: Request, post: Post) {
        self.switch_path(Path::Pool).await;
        match self.pool_conn() {
            Ok(conn) => {
                let rx = conn.send(encode(&req));
                self.push(Pending::Upstream { rx, post }).await;
            }
            Err(e) => {
                self.push(Pending::Ready(protocol::error(&e.to_reply_text())))
                    .await
            }
        }
    }

    async fn read(&mut self, name: &[u8], req: Request, key: Bytes) {
        let cache = self.shared.cache.clone();
        let td_route = name == b"GET"
            && self
                .shared
                .tdengine
                .as_ref()
                .is_some_and(|t| t.matches(&key));
        let policy = if cache.is_serving() {
            cache.policy(&key)
        } else {
            None
        };
        let Some(policy) = policy else {
            count_request(name, Outcome::Forward);
            if td_route {
                self.td_get(req, key, None).await;
            } else {
                self.forward(req, Post::None).await;
            }
            return;
        };
        let sig = cache::signature(name, &req.args);
        if let Some(hit) = cache.get(&key, &sig, self.proto, policy) {
            count_request(name, Outcome::Hit);
            self.push(Pending::Ready(hit)).await;
            return;
        }
        count_request(name, Outcome::Miss);
        if td_route {
            self.td_get(req, key, Some(policy)).await;
            return;
        }
        self.switch_path(Path::Pool).await;
        let conn = match self.pool_conn() {
            Ok(c) => c,
            Err(e) => {
                self.push(Pending::Ready(protocol::error(&e.to_reply_text())))
                    .await;
                return;
            }
        };
        let ticket = cache.ticket(&key);
        let request = encode(&req);
        let shared = cache.single_flight(
            &key,
            &sig,
            self.proto,
            ticket,
            move || {
                let rx = conn.send(request);
                async move { (crate::upstream::received(rx.await), None) }.boxed()
            },
            policy.ttl,
        );
        self.push(Pending::Shared(shared)).await;
    }

    /// GET of a key with a TDengine route: Redis first, TDengine on nil.
    async fn td_get(&mut self, req: Request, key: Bytes, policy: Option<PolicyRef>) {
        self.switch_path(Path::Pool).await;
        let conn = match self.pool_conn() {
            Ok(c) => c,
            Err(e) => {
                self.push(Pending::Ready(protocol::error(&e.to_reply_text())))
                    .await;
                return;
            }
        };
        let td = self.shared.tdengine.clone().expect("route matched");
        let cache = self.shared.cache.clone();
        let proto = self.proto;
        let sig = cache::signature(b"GET", &req.args);
        let ticket = cache.ticket(&key);
        let request = encode(&req);
        let key2 = key.clone();
        let flight = cache.single_flight(
            &key,
            &sig,
            proto,
            ticket,
            move || {
                let rx = conn.send(request);
                async move {
                    match crate::upstream::received(rx.await) {
                        Ok(first) if first.kind == ReplyKind::Nil => {
                            crate::tdengine::fill::fill(&td, &conn, &key2, proto).await
                        }
                        other => (other, None),
                    }
                }
                .boxed()
            },
            policy.map(|p| p.ttl).unwrap_or(Duration::ZERO),
        );
        let fut = async move {
            match flight.await {
                Ok(r) => r.bytes,
                Err(e) => protocol::error(&e.to_reply_text()),
            }
        }
        .boxed();
        self.push(Pending::Future(fut)).await;
    }

    async fn mget(&mut self, name: &[u8], req: Request) {
        let cache = self.shared.cache.clone();
        let serving = cache.is_serving();
        let td = self
            .shared
            .tdengine
            .clone()
            .filter(|t| req.args[1..].iter().any(|k| t.matches(k)));
        if !serving && td.is_none() {
            count_request(name, Outcome::Forward);
            self.forward(req, Post::None).await;
            return;
        }
        let sig = Bytes::from_static(b"MGET");
        let keys = &req.args[1..];
        let mut parts = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        let mut fills = Vec::new();
        for k in keys {
            let policy = if serving { cache.policy(k) } else { None };
            let hit = policy.and_then(|p| cache.get(k, &sig, self.proto, p));
            match hit {
                Some(h) => parts.push(Some(h)),
                None => {
                    parts.push(None);
                    missing.push(k.clone());
                    fills.push(policy.map(|p| (k.clone(), cache.ticket(k), p)));
                }
            }
        }
        if missing.is_empty() {
            count_request(name, Outcome::Hit);
            let items: Vec<Bytes> = parts.into_iter().map(|p| p.expect("all hits")).collect();
            self.push(Pending::Ready(protocol::array(&items))).await;
            return;
        }
        count_request(name, Outcome::Miss);
        self.switch_path(Path::Pool).await;
        let conn = match self.pool_conn() {
            Ok(c) => c,
            Err(e) => {
                self.push(Pending::Ready(protocol::error(&e.to_reply_text())))
                    .await;
                return;
            }
        };
        let request = if missing.len() == keys.len() {
            encode(&req)
        } else {
            let mut args = Vec::with_capacity(missing.len() + 1);
            args.push(req.args[0].clone());
            args.extend(missing.iter().cloned());
            let mut out = BytesMut::new();
            protocol::encode_command(&mut out, &args);
            out.freeze()
        };
        let rx = conn.send(request);
        if let Some(td) = td {
            // Nil elements of routed keys are filled from TDengine before the reply is assembled.
            let proto = self.proto;
            let fut = async move {
                let reply = match crate::upstream::received(rx.await) {
                    Ok(r) if r.kind != ReplyKind::Error => r,
                    other => return reply_bytes(&other),
                };
                let Some(fetched) = protocol::split_array(&reply.bytes) else {
                    return reply.bytes;
                };
                if fetched.len() != missing.len() {
                    return protocol::error(
                        "ERR upstream protocol error: MGET reply length mismatch",
                    );
                }
                let elements = crate::tdengine::fill::fill_mget_elements_with_ttl(
                    &td, &conn, &missing, fetched, proto,
                )
                .await;
                assemble_mget_elements(&cache, parts, elements, fills, proto)
            }
            .boxed();
            self.push(Pending::Future(fut)).await;
            return;
        }
        self.push(Pending::MGet {
            parts,
            rx,
            fills,
            proto: self.proto,
        })
        .await;
    }

    /// Ensures a pinned connection exists and sends the request on it.
    async fn pinned_request(&mut self, name: &[u8], req: Request, keys: Keys) {
        count_request(name, Outcome::Pinned);
        if self.pinned.is_none() {
            self.barrier().await;
            match self.shared.upstream.pinned(self.proto).await {
                Ok(mut conn) => {
                    let frames = conn.frames.take().expect("fresh connection has its frames");
                    self.push(Pending::Attach(frames)).await;
                    // The pinned connection starts in the configured db; follow the client's.
                    if self.state.db != self.default_db {
                        let select = protocol::command([
                            b"SELECT".to_vec(),
                            self.state.db.to_string().into_bytes(),
                        ]);
                        // Queued before it is written: the reply must find its slot waiting.
                        self.push(Pending::Pinned {
                            expect: Expect::Count(1),
                            post: Post::None,
                            monitor: false,
                            silent: true,
                            timeout: Some(self.shared.config.upstream.command_timeout),
                        })
                        .await;
                        if conn.write(&select).await.is_err() {
                            // Dropping the connection fails the queued slot and closes the client.
                            drop(conn);
                            self.close.notify_one();
                            return;
                        }
                    }
                    self.pinned = Some(conn);
                }
                Err(e) => {
                    self.undo_pin_state(name);
                    self.push(Pending::Ready(protocol::error(&e.to_reply_text())))
                        .await;
                    return;
                }
            }
        }
        self.switch_path(Path::Pinned).await;

        // Writes inside MULTI take effect at EXEC.
        let post = if self.state.multi && !matches!(name, b"MULTI" | b"EXEC" | b"DISCARD") {
            match &keys {
                Keys::All => self.state.multi_all = true,
                Keys::Some(k) => self.state.multi_keys.extend(k.iter().cloned()),
                Keys::None => {}
            }
            self.invalidate_now(&keys);
            Post::None
        } else if name == b"EXEC" && self.state.multi {
            let keys = if self.state.multi_all {
                Keys::All
            } else {
                Keys::Some(std::mem::take(&mut self.state.multi_keys))
            };
            self.state.multi_all = false;
            self.invalidate_now(&keys)
        } else {
            self.invalidate_now(&keys)
        };

        let expect = self.expect_for(name, &req.args);
        match name {
            b"EXEC" | b"DISCARD" => {
                self.state.multi = false;
                self.state.watch = false;
                self.state.multi_keys.clear();
                self.state.multi_all = false;
            }
            b"SELECT" => {
                if let Some(db) = req
                    .args
                    .get(1)
                    .and_then(|d| std::str::from_utf8(d).ok())
                    .and_then(|d| d.parse().ok())
                {
                    self.state.db = db;
                }
            }
            _ => {}
        }
        // Commands that may legitimately wait forever get no reply deadline.
        let open_ended = pin_is_blocking(name, &req.args)
            || matches!(
                name,
                b"SUBSCRIBE"
                    | b"PSUBSCRIBE"
                    | b"SSUBSCRIBE"
                    | b"UNSUBSCRIBE"
                    | b"PUNSUBSCRIBE"
                    | b"SUNSUBSCRIBE"
                    | b"MONITOR"
            );
        let timeout = (!open_ended).then_some(self.shared.config.upstream.command_timeout);
        // The slot is queued before the request is written: otherwise a fast
        // reply could reach the writer first and be taken for a push message.
        self.push(Pending::Pinned {
            expect,
            post,
            monitor: name == b"MONITOR",
            silent: false,
            timeout,
        })
        .await;
        let bytes = encode(&req);
        let conn = self.pinned.as_mut().expect("pinned connection exists");
        if conn.write(&bytes).await.is_err() {
            // Dropping the connection fails the queued slot (an error reply) and closes the client.
            self.pinned = None;
            self.close.notify_one();
        }
    }

    fn undo_pin_state(&mut self, name: &[u8]) {
        match name {
            b"MULTI" => self.state.multi = false,
            b"WATCH" => self.state.watch = false,
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
            | b"SUNSUBSCRIBE" => self.state.subscribed = false,
            _ => {}
        }
    }

    fn expect_for(&mut self, name: &[u8], args: &[Bytes]) -> Expect {
        if name == b"CLIENT" {
            let sub = args
                .get(1)
                .map(|a| a.to_ascii_uppercase())
                .unwrap_or_default();
            if sub == b"REPLY" {
                let mode = args
                    .get(2)
                    .map(|a| a.to_ascii_uppercase())
                    .unwrap_or_default();
                match mode.as_slice() {
                    b"OFF" => {
                        self.state.reply_off = true;
                        return Expect::Count(0);
                    }
                    b"SKIP" => {
                        if !self.state.reply_off {
                            self.state.skip_next = true;
                        }
                        return Expect::Count(0);
                    }
                    b"ON" => {
                        self.state.reply_off = false;
                        self.state.skip_next = false;
                        return Expect::Count(1);
                    }
                    _ => {}
                }
            }
        }
        if self.state.reply_off {
            return Expect::Count(0);
        }
        if self.state.skip_next {
            self.state.skip_next = false;
            return Expect::Count(0);
        }
        let n = args.len() - 1;
        match name {
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" => Expect::Count(n.max(1)),
            b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" | b"SUNSUBSCRIBE" if n > 0 => Expect::Count(n),
            b"UNSUBSCRIBE" => Expect::UnsubscribeAll(SubKind::Channel),
            b"PUNSUBSCRIBE" => Expect::UnsubscribeAll(SubKind::Pattern),
            b"SUNSUBSCRIBE" => Expect::UnsubscribeAll(SubKind::Shard),
            _ => Expect::Count(1),
        }
    }

    /// Commands nearcache answers or decides itself.
    async fn local(&mut self, name: &[u8], req: Request) -> bool {
        count_request(name, Outcome::Local);
        let args = &req.args;
        match name {
            b"QUIT" => {
                self.push(Pending::Ready(protocol::ok())).await;
                self.push(Pending::Close).await;
                return false;
            }
            b"AUTH" => self.auth(req).await,
            b"HELLO" => self.hello(req).await,
            b"SELECT" => {
                if args.len() != 2 {
                    let reply =
                        protocol::error("ERR wrong number of arguments for 'select' command");
                    self.push(Pending::Ready(reply)).await;
                    return true;
                }
                let db = std::str::from_utf8(&args[1])
                    .ok()
                    .and_then(|d| d.parse::<u32>().ok());
                if db == Some(self.default_db) && self.pinned.is_none() {
                    self.state.db = self.default_db;
                    self.push(Pending::Ready(protocol::ok())).await;
                } else {
                    self.pinned_request(name, req, Keys::None).await;
                }
            }
            b"UNWATCH" => {
                if self.pinned.is_some() {
                    self.state.watch = false;
                    self.pinned_request(name, req, Keys::None).await;
                } else {
                    self.push(Pending::Ready(protocol::ok())).await;
                }
            }
            b"RESET" => {
                self.barrier().await;
                if self.pinned.take().is_some() {
                    self.push(Pending::Detach).await;
                }
                self.state = PinState::new(self.default_db);
                self.proto = 2;
                self.conn = None;
                self.last_path = Path::None;
                self.push(Pending::Ready(protocol::simple("RESET"))).await;
            }
            b"CLIENT" => {
                let sub = args
                    .get(1)
                    .map(|a| a.to_ascii_uppercase())
                    .unwrap_or_default();
                if self.pinned.is_some() {
                    self.pinned_request(name, req, Keys::None).await;
                } else if sub == b"SETINFO" {
                    let attr = args
                        .get(2)
                        .map(|a| a.to_ascii_uppercase())
                        .unwrap_or_default();
                    let reply = match (args.len(), attr.as_slice()) {
                        (4, b"LIB-NAME" | b"LIB-VER") => protocol::ok(),
                        (4, _) => protocol::error(&format!(
                            "ERR Unrecognized option '{}'",
                            String::from_utf8_lossy(&args[2])
                        )),
                        _ => protocol::error(
                            "ERR wrong number of arguments for 'client|setinfo' command",
                        ),
                    };
                    self.push(Pending::Ready(reply)).await;
                } else {
                    // CLIENT GETNAME: without a pinned connection no name was ever set.
                    self.push(Pending::Ready(protocol::nil(self.proto == 3)))
                        .await;
                }
            }
            b"NEARCACHE" => {
                let reply = crate::admin::nearcache_command(&self.shared, args, self.proto == 3);
                self.push(Pending::Ready(reply)).await;
            }
            _ => {
                self.push(Pending::Ready(protocol::error("ERR unknown command")))
                    .await;
            }
        }
        true
    }

    fn local_password_ok(&self, user: Option<&[u8]>, pass: &[u8]) -> bool {
        let Some(expected) = &self.shared.config.server.requirepass else {
            return false;
        };
        user.is_none_or(|u| u == b"default") && pass == expected.as_bytes()
    }

    fn upstream_credentials(&self, user: Option<&[u8]>, pass: &[u8]) -> bool {
        let url = &self.shared.config.upstream.url;
        let same_user = match (user, url.username.as_deref()) {
            (None, _) => true,
            (Some(u), Some(cfg)) => u == cfg.as_bytes(),
            (Some(u), None) => u == b"default",
        };
        same_user && url.password.as_deref().map(|p| p.as_bytes()) == Some(pass)
    }

    async fn auth(&mut self, req: Request) {
        let args = &req.args;
        let (user, pass) = match args.len() {
            2 => (None, &args[1]),
            3 => (Some(args[1].as_ref()), &args[2]),
            _ => {
                self.push(Pending::Ready(protocol::error(
                    "ERR wrong number of arguments for 'auth' command",
                )))
                .await;
                return;
            }
        };
        if self.shared.config.server.requirepass.is_some() {
            if self.local_password_ok(user, pass) {
                self.authed = true;
                self.push(Pending::Ready(protocol::ok())).await;
            } else {
                self.push(Pending::Ready(protocol::error(
                    "WRONGPASS invalid username-password pair or user is disabled.",
                )))
                .await;
            }
            return;
        }
        if self.pinned.is_none() && self.upstream_credentials(user, pass) {
            self.push(Pending::Ready(protocol::ok())).await;
            return;
        }
        // Authenticating as someone else: that identity lives on a connection of its own.
        self.state.sticky = true;
        self.pinned_request(b"AUTH", req, Keys::None).await;
    }

    async fn hello(&mut self, req: Request) {
        let args = &req.args;
        let mut version = self.proto;
        let mut auth: Option<(Bytes, Bytes)> = None;
        let mut setname = false;
        if let Some(v) = args.get(1) {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u8>().ok())
            {
                Some(v @ (2 | 3)) => version = v,
                _ => {
                    self.push(Pending::Ready(protocol::error(
                        "NOPROTO unsupported protocol version",
                    )))
                    .await;
                    return;
                }
            }
            let mut i = 2;
            while i < args.len() {
                let opt = args[i].to_ascii_uppercase();
                if opt == b"AUTH" && i + 2 < args.len() {
                    auth = Some((args[i + 1].clone(), args[i + 2].clone()));
                    i += 3;
                } else if opt == b"SETNAME" && i + 1 < args.len() {
                    setname = true;
                    i += 2;
                } else {
                    let msg = format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    );
                    self.push(Pending::Ready(protocol::error(&msg))).await;
                    return;
                }
            }
        }
        if self.shared.config.server.requirepass.is_some() {
            match &auth {
                Some((u, p)) => {
                    if !self.local_password_ok(Some(u), p) {
                        self.push(Pending::Ready(protocol::error(
                            "WRONGPASS invalid username-password pair or user is disabled.",
                        )))
                        .await;
                        return;
                    }
                    self.authed = true;
                    auth = None;
                }
                None if !self.authed => {
                    self.push(Pending::Ready(protocol::error(
                        "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
                    )))
                    .await;
                    return;
                }
                None => {}
            }
        }
        let foreign_auth = auth
            .as_ref()
            .is_some_and(|(u, p)| !self.upstream_credentials(Some(u), p));
        if self.pinned.is_some() || setname || foreign_auth {
            self.state.sticky = true;
            self.proto = version;
            let mut fwd = vec![
                Bytes::from_static(b"HELLO"),
                Bytes::from(version.to_string()),
            ];
            if let Some((u, p)) = auth.filter(|_| foreign_auth) {
                fwd.extend([Bytes::from_static(b"AUTH"), u, p]);
            }
            let mut i = 2;
            while i < args.len() {
                if args[i].eq_ignore_ascii_case(b"SETNAME") {
                    fwd.extend([Bytes::from_static(b"SETNAME"), args[i + 1].clone()]);
                    i += 2;
                } else {
                    i += if args[i].eq_ignore_ascii_case(b"AUTH") {
                        3
                    } else {
                        1
                    };
                }
            }
            self.pinned_request(b"HELLO", Request::from_args(fwd), Keys::None)
                .await;
            return;
        }
        if version != self.proto {
            // Earlier requests went to the other protocol's connection: let them
            // finish before later ones can run on the new one.
            self.barrier().await;
            self.conn = None;
        }
        self.proto = version;
        let reply = self
            .shared
            .upstream
            .pool(version)
            .hello_reply()
            .unwrap_or_else(|| synthetic_hello(version));
        self.push(Pending::Ready(reply)).await;
    }
}

/// Is this a command that blocks on the server (BLPOP, XREAD BLOCK, WAIT, ...)?
fn pin_is_blocking(name: &[u8], args: &[Bytes]) -> bool {
    matches!(
        command::classify(name, args),
        Class::Pinned {
            pin: Pin::Blocking,
            ..
        }
    )
}

fn synthetic_hello(version: u8) -> Bytes {
    let resp3 = version == 3;
    protocol::map(
        resp3,
        &[
            ("server", protocol::bulk_bytes(b"redis")),
            ("version", protocol::bulk_bytes(b"7.0.0")),
            ("proto", protocol::integer(version as i64)),
            ("id", protocol::integer(0)),
            ("mode", protocol::bulk_bytes(b"standalone")),
            ("role", protocol::bulk_bytes(b"master")),
            ("modules", protocol::array(&[])),
        ],
    )
}

fn encode(req: &Request) -> Bytes {
    match &req.raw {
        Some(raw) => raw.clone(),
        None => {
            let mut out = BytesMut::new();
            protocol::encode_command(&mut out, &req.args);
            out.freeze()
        }
    }
}

fn reply_bytes(r: &ReplyResult) -> Bytes {
    match r {
        Ok(reply) => reply.bytes.clone(),
        Err(e) => protocol::error(&e.to_reply_text()),
    }
}

// --- Writer -------------------------------------------------------------------------

#[derive(Default)]
struct Subscriptions {
    sets: HashMap<SubKind, HashSet<Bytes>>,
    monitoring: bool,
}

impl Subscriptions {
    fn active(&self) -> bool {
        self.sets.values().any(|s| !s.is_empty())
    }
    fn count(&self, kind: SubKind) -> usize {
        self.sets.get(&kind).map_or(0, |s| s.len())
    }
}

fn sub_kind(word: &[u8]) -> Option<(SubKind, bool)> {
    Some(match word {
        b"subscribe" => (SubKind::Channel, true),
        b"unsubscribe" => (SubKind::Channel, false),
        b"psubscribe" => (SubKind::Pattern, true),
        b"punsubscribe" => (SubKind::Pattern, false),
        b"ssubscribe" => (SubKind::Shard, true),
        b"sunsubscribe" => (SubKind::Shard, false),
        _ => return None,
    })
}

/// Is a frame from a pinned connection a message rather than a reply?
fn out_of_band(reply: &Reply, subs: &Subscriptions) -> bool {
    let first_word = || protocol::first_word(&reply.bytes);
    match reply.kind {
        ReplyKind::Push => first_word().is_none_or(|w| sub_kind(&w).is_none()),
        _ if subs.active() && reply.bytes.first() == Some(&b'*') => first_word()
            .is_some_and(|w| matches!(w.as_ref(), b"message" | b"pmessage" | b"smessage")),
        _ if subs.monitoring => {
            reply.bytes.first() == Some(&b'+')
                && reply.bytes.get(1).is_some_and(|c| c.is_ascii_digit())
        }
        _ => false,
    }
}

fn track_subscription(reply: &Reply, subs: &mut Subscriptions) {
    if !matches!(reply.bytes.first(), Some(b'*') | Some(b'>')) {
        return;
    }
    let Some(parts) = protocol::reply_strings(&reply.bytes) else {
        return;
    };
    if let (Some(word), Some(channel)) = (parts.first(), parts.get(1)) {
        if let Some((kind, add)) = sub_kind(word) {
            let set = subs.sets.entry(kind).or_default();
            if add {
                set.insert(channel.clone());
            } else {
                set.remove(channel);
            }
        }
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Pending>,
    progress: Arc<Progress>,
    cache: Arc<Cache>,
    close: Arc<Notify>,
) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut frames: Option<mpsc::Receiver<PinnedFrame>> = None;
    let mut subs = Subscriptions::default();
    macro_rules! flush {
        () => {
            if !out.is_empty() {
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
        };
    }
    // Takes a reply that is ready without writing anything; otherwise writes
    // what is buffered before waiting, so earlier replies are not held back.
    macro_rules! ready_or_flush {
        ($fut:expr) => {
            match (&mut $fut).now_or_never() {
                Some(r) => r,
                None => {
                    flush!();
                    $fut.await
                }
            }
        };
    }
    loop {
        let item = match rx.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => {
                // The reader is done (half-close, shutdown): what is buffered still goes out.
                flush!();
                break;
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                flush!();
                let next = match frames.as_mut() {
                    Some(f) => tokio::select! {
                        biased;
                        item = rx.recv() => Ok(item),
                        frame = f.recv() => Err(frame),
                    },
                    None => Ok(rx.recv().await),
                };
                match next {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    // An unsolicited frame: a pub/sub message, a tracking push, MONITOR output.
                    Err(Some(PinnedFrame::Reply(r))) => {
                        out.extend_from_slice(&r.bytes);
                        continue;
                    }
                    Err(Some(PinnedFrame::Closed(_)) | None) => {
                        // The server closed this client's own connection (CLIENT KILL, timeout):
                        // the client sees its connection closed, as it would on Redis.
                        flush!();
                        close.notify_one();
                        break;
                    }
                }
            }
        };
        match item {
            Pending::Ready(bytes) => out.extend_from_slice(&bytes),
            Pending::Upstream { mut rx, post } => {
                let result = crate::upstream::received(ready_or_flush!(rx));
                apply_post(&cache, &post);
                out.extend_from_slice(&reply_bytes(&result));
            }
            Pending::Shared(mut fut) => {
                let result = ready_or_flush!(fut);
                out.extend_from_slice(&reply_bytes(&result));
            }
            Pending::Future(mut fut) => {
                let bytes = ready_or_flush!(fut);
                out.extend_from_slice(&bytes);
            }
            Pending::MGet {
                parts,
                mut rx,
                fills,
                proto,
            } => {
                let result = crate::upstream::received(ready_or_flush!(rx));
                out.extend_from_slice(&assemble_mget(&cache, parts, result, fills, proto));
            }
            Pending::Pinned {
                expect,
                post,
                monitor,
                silent,
                timeout,
            } => {
                let mut remaining = match expect {
                    Expect::Count(n) => n,
                    Expect::UnsubscribeAll(kind) => subs.count(kind).max(1),
                };
                let mut closed = None;
                while remaining > 0 {
                    let Some(f) = frames.as_mut() else {
                        closed = Some(Error::Upstream("connection closed".into()));
                        break;
                    };
                    let frame = match f.try_recv() {
                        Ok(fr) => Some(fr),
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                        Err(mpsc::error::TryRecvError::Empty) => {
                            flush!();
                            match timeout {
                                None => f.recv().await,
                                Some(t) => match tokio::time::timeout(t, f.recv()).await {
                                    Ok(fr) => fr,
                                    Err(_) => {
                                        metrics::get()
                                            .upstream_errors_total
                                            .with_label_values(&["timeout"])
                                            .inc();
                                        closed =
                                            Some(Error::Upstream(format!("no reply within {t:?}")));
                                        break;
                                    }
                                },
                            }
                        }
                    };
                    match frame {
                        Some(PinnedFrame::Reply(r)) => {
                            if out_of_band(&r, &subs) {
                                out.extend_from_slice(&r.bytes);
                                continue;
                            }
                            track_subscription(&r, &mut subs);
                            if monitor && r.kind != ReplyKind::Error {
                                subs.monitoring = true;
                            }
                            if !silent {
                                out.extend_from_slice(&r.bytes);
                            }
                            remaining -= 1;
                        }
                        Some(PinnedFrame::Closed(e)) => {
                            closed = Some(match &*e {
                                Error::Upstream(why) => Error::Upstream(why.clone()),
                                other => Error::Upstream(other.to_string()),
                            });
                            break;
                        }
                        None => {
                            closed = Some(Error::Upstream("connection closed".into()));
                            break;
                        }
                    }
                }
                apply_post(&cache, &post);
                if let Some(e) = closed {
                    // Each reply still owed gets an error; then the client is closed,
                    // because its connection state is gone.
                    if !silent {
                        for _ in 0..remaining {
                            out.extend_from_slice(&protocol::error(&e.to_reply_text()));
                        }
                    }
                    progress.advance();
                    close.notify_one();
                    while let Ok(item) = rx.try_recv() {
                        if !matches!(item, Pending::Attach(_) | Pending::Detach | Pending::Close) {
                            out.extend_from_slice(&protocol::error(&e.to_reply_text()));
                        }
                        progress.advance();
                    }
                    flush!();
                    break;
                }
            }
            Pending::Attach(f) => frames = Some(f),
            Pending::Detach => {
                frames = None;
                subs = Subscriptions::default();
            }
            Pending::Close => {
                progress.advance();
                flush!();
                break;
            }
        }
        progress.advance();
    }
    let _ = wr.shutdown().await;
    close.notify_one();
    // Unblock a reader waiting on a barrier.
    progress.done.store(u64::MAX, Ordering::SeqCst);
    progress.notify.notify_waiters();
}

fn apply_post(cache: &Cache, post: &Post) {
    match post {
        Post::None => {}
        Post::Invalidate(keys) => {
            for k in keys {
                cache.invalidate(k, "local_write");
            }
        }
        Post::InvalidateAll => cache.clear_all("local_write"),
    }
}

fn assemble_mget(
    cache: &Cache,
    parts: Vec<Option<Bytes>>,
    result: ReplyResult,
    fills: Vec<Option<(Bytes, Ticket, PolicyRef)>>,
    proto: u8,
) -> Bytes {
    let reply = match result {
        Ok(r) if r.kind != ReplyKind::Error => r,
        other => return reply_bytes(&other),
    };
    let Some(fetched) = protocol::split_array(&reply.bytes) else {
        return reply.bytes;
    };
    if fetched.len() != parts.iter().filter(|p| p.is_none()).count() {
        return protocol::error("ERR upstream protocol error: MGET reply length mismatch");
    }
    let elements = fetched.into_iter().map(|e| (e, None)).collect();
    assemble_mget_elements(cache, parts, elements, fills, proto)
}

/// Puts L1 hits and fetched elements back in request order, storing each
/// fetched element in L1 (for at most its cap, if it has one; a zero cap: not at all).
fn assemble_mget_elements(
    cache: &Cache,
    parts: Vec<Option<Bytes>>,
    elements: Vec<(Bytes, Option<Duration>)>,
    fills: Vec<Option<(Bytes, Ticket, PolicyRef)>>,
    proto: u8,
) -> Bytes {
    let sig = Bytes::from_static(b"MGET");
    let mut fetched_iter = elements.into_iter().zip(fills);
    let mut items = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            Some(hit) => items.push(hit),
            None => {
                let ((value, cap), fill) = fetched_iter.next().expect("one element per miss");
                if let Some((key, ticket, policy)) = fill {
                    let ttl = cap.map_or(policy.ttl, |c| c.min(policy.ttl));
                    if !ttl.is_zero() {
                        cache.complete_fill(ticket, &key, &sig, proto, &value, ttl);
                    }
                }
                items.push(value);
            }
        }
    }
    protocol::array(&items)
}

// --- Request metrics ------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Outcome {
    Hit = 0,
    Miss = 1,
    Forward = 2,
    Pinned = 3,
    Local = 4,
    Error = 5,
}

const OUTCOMES: [&str; 6] = ["hit", "miss", "forward", "pinned", "local", "error"];

type CounterRow = [prometheus::IntCounter; 6];

fn counters() -> &'static (HashMap<&'static [u8], CounterRow>, CounterRow) {
    static COUNTERS: OnceLock<(HashMap<&'static [u8], CounterRow>, CounterRow)> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let m = metrics::get();
        let row = |name: &str| -> CounterRow {
            let lower = name.to_ascii_lowercase();
            std::array::from_fn(|i| m.requests_total.with_label_values(&[&lower, OUTCOMES[i]]))
        };
        let map = command::known_commands()
            .into_iter()
            .map(|c| (c.as_bytes(), row(c)))
            .collect();
        (map, row("other"))
    })
}

fn count_request(name: &[u8], outcome: Outcome) {
    let (map, other) = counters();
    map.get(name).unwrap_or(other)[outcome as usize].inc();
}
