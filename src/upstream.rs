//! The upstream Redis: a small pool of multiplexed connections shared by all
//! clients, and dedicated (pinned) connections for clients in a stateful mode.
//!
//! A multiplexed connection pipelines many clients' requests on one socket and
//! matches replies to requests in order. When it breaks or a reply is late,
//! every request in flight on it gets an error, in order, and nothing already
//! written is retried: a failed INCR is reported, never applied twice. A
//! supervisor per pool slot reconnects with backoff.
//!
//! Every connection is bound to one upstream address; routing by hash slot
//! (Redis Cluster) will pick a [`Pool`] per node behind the same interface.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::metrics;
use crate::protocol::{self, Reply, ReplyKind};

/// A byte stream to Redis: plain TCP or TLS.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

pub type BoxStream = Box<dyn AsyncStream>;

/// The reply to one request, or why there is none.
pub type ReplyResult = Result<Reply, Arc<Error>>;

/// A reply received from [`MuxConn::send`]'s receiver; a dropped sender
/// means the connection went away.
pub fn received(r: Result<ReplyResult, oneshot::error::RecvError>) -> ReplyResult {
    match r {
        Ok(r) => r,
        Err(_) => Err(Arc::new(Error::Upstream("connection closed".into()))),
    }
}

/// Opens connections to the configured upstream, with the handshake applied.
#[derive(Clone)]
pub struct Connector {
    cfg: Arc<UpstreamConfig>,
    tls: Option<crate::tls::TlsConnector>,
}

impl Connector {
    pub fn new(cfg: UpstreamConfig) -> Result<Connector, Error> {
        let tls = if cfg.tls.enabled {
            Some(crate::tls::TlsConnector::new(&cfg.tls, &cfg.url.host)?)
        } else {
            None
        };
        Ok(Connector {
            cfg: Arc::new(cfg),
            tls,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.cfg
    }

    /// Connects, authenticates, switches protocol and selects the database.
    /// Returns the stream, any bytes read past the handshake, and the HELLO reply.
    pub async fn connect(&self, proto: u8) -> Result<(BoxStream, BytesMut, Bytes), Error> {
        let addr = self.cfg.url.address();
        let fut = async {
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|e| Error::Upstream(format!("connect {addr}: {e}")))?;
            tcp.set_nodelay(true).ok();
            let stream: BoxStream = match &self.tls {
                Some(tls) => tls.connect(tcp).await?,
                None => Box::new(tcp),
            };
            self.handshake(stream, proto).await
        };
        match tokio::time::timeout(self.cfg.connect_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Upstream(format!(
                "connect {addr}: timed out after {:?}",
                self.cfg.connect_timeout
            ))),
        }
    }

    async fn handshake(
        &self,
        mut stream: BoxStream,
        proto: u8,
    ) -> Result<(BoxStream, BytesMut, Bytes), Error> {
        let url = &self.cfg.url;
        let mut hello: Vec<Vec<u8>> = vec![b"HELLO".to_vec(), proto.to_string().into_bytes()];
        if let Some(pass) = &url.password {
            hello.push(b"AUTH".to_vec());
            hello.push(
                url.username
                    .clone()
                    .unwrap_or_else(|| "default".into())
                    .into_bytes(),
            );
            hello.push(pass.clone().into_bytes());
        }
        let mut out = BytesMut::new();
        out.extend_from_slice(&protocol::command(&hello));
        let with_select = url.db != 0;
        if with_select {
            out.extend_from_slice(&protocol::command([
                b"SELECT".to_vec(),
                url.db.to_string().into_bytes(),
            ]));
        }
        stream
            .write_all(&out)
            .await
            .map_err(|e| Error::upstream_io(&e))?;
        let mut buf = BytesMut::with_capacity(4096);
        let hello_reply = read_one(&mut stream, &mut buf).await?;
        if hello_reply.kind == ReplyKind::Error {
            let text = String::from_utf8_lossy(&hello_reply.bytes[1..])
                .trim_end()
                .to_string();
            return Err(Error::Upstream(format!("handshake refused: {text}")));
        }
        if with_select {
            let r = read_one(&mut stream, &mut buf).await?;
            if r.kind == ReplyKind::Error {
                let text = String::from_utf8_lossy(&r.bytes[1..])
                    .trim_end()
                    .to_string();
                return Err(Error::Upstream(format!("SELECT {}: {text}", url.db)));
            }
        }
        Ok((stream, buf, hello_reply.bytes))
    }
}

async fn read_one(stream: &mut BoxStream, buf: &mut BytesMut) -> Result<Reply, Error> {
    let mut framer = protocol::ReplyFramer::default();
    loop {
        if let Some(r) = framer.next(buf).map_err(Error::UpstreamProtocol)? {
            return Ok(r);
        }
        buf.reserve(4096);
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| Error::upstream_io(&e))?;
        if n == 0 {
            return Err(Error::Upstream("connection closed during handshake".into()));
        }
    }
}

// --- Multiplexed connections ---------------------------------------------------

struct Job {
    request: Bytes,
    reply: oneshot::Sender<ReplyResult>,
}

struct InFlight {
    reply: oneshot::Sender<ReplyResult>,
    sent_at: Instant,
}

/// One multiplexed upstream connection.
pub struct MuxConn {
    /// Unbounded so that sending never waits and never reorders: what bounds it
    /// is that each client may have at most `max_pending_per_client` requests
    /// outstanding, and there are at most `max_clients` clients.
    jobs: mpsc::UnboundedSender<Job>,
    alive: AtomicBool,
    closed: Notify,
}

impl MuxConn {
    fn start(stream: BoxStream, leftover: BytesMut, command_timeout: Duration) -> Arc<MuxConn> {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(MuxConn {
            jobs: tx,
            alive: AtomicBool::new(true),
            closed: Notify::new(),
        });
        let (rd, wr) = tokio::io::split(stream);
        let inflight = Arc::new(Mutex::new(VecDeque::<InFlight>::new()));
        let wake_reader = Arc::new(Notify::new());
        tokio::spawn(write_loop(
            conn.clone(),
            wr,
            rx,
            inflight.clone(),
            wake_reader.clone(),
        ));
        tokio::spawn(read_loop(
            conn.clone(),
            rd,
            leftover,
            inflight,
            wake_reader,
            command_timeout,
        ));
        conn
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Queues a request; the receiver yields its reply or the failure.
    pub fn send(&self, request: Bytes) -> oneshot::Receiver<ReplyResult> {
        let (tx, rx) = oneshot::channel();
        if !self.is_alive() {
            let _ = tx.send(Err(Arc::new(Error::Upstream("connection closed".into()))));
            return rx;
        }
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job { request, reply: tx }) {
            let _ = job
                .reply
                .send(Err(Arc::new(Error::Upstream("connection closed".into()))));
        }
        rx
    }

    fn mark_dead(&self) {
        if self.alive.swap(false, Ordering::AcqRel) {
            self.closed.notify_waiters();
        }
    }
}

fn fail_all(inflight: &Mutex<VecDeque<InFlight>>, err: &Arc<Error>) {
    let drained: Vec<InFlight> = inflight.lock().drain(..).collect();
    for f in drained {
        let _ = f.reply.send(Err(err.clone()));
    }
}

async fn write_loop(
    conn: Arc<MuxConn>,
    mut wr: tokio::io::WriteHalf<BoxStream>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    wake_reader: Arc<Notify>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(128);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = conn.closed.notified() => 0,
        };
        if got == 0 || !conn.is_alive() {
            break;
        }
        let now = Instant::now();
        {
            // The reply slot must be queued before the request can reach Redis.
            let mut q = inflight.lock();
            for job in batch.drain(..) {
                out.extend_from_slice(&job.request);
                q.push_back(InFlight {
                    reply: job.reply,
                    sent_at: now,
                });
            }
        }
        wake_reader.notify_one();
        if let Err(e) = wr.write_all(&out).await {
            debug!(error = %e, "upstream write failed");
            metrics::get()
                .upstream_errors_total
                .with_label_values(&["closed"])
                .inc();
            conn.mark_dead();
            fail_all(&inflight, &Arc::new(Error::upstream_io(&e)));
            break;
        }
        out.clear();
    }
    // Anything still queued never reached Redis: it can fail without ambiguity.
    rx.close();
    let err = Arc::new(Error::Upstream("connection closed".into()));
    while let Ok(job) = rx.try_recv() {
        let _ = job.reply.send(Err(err.clone()));
    }
    let _ = wr.shutdown().await;
}

async fn read_loop(
    conn: Arc<MuxConn>,
    mut rd: tokio::io::ReadHalf<BoxStream>,
    mut buf: BytesMut,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    wake_reader: Arc<Notify>,
    command_timeout: Duration,
) {
    let m = metrics::get();
    let mut framer = protocol::ReplyFramer::default();
    let failure: Error = loop {
        // Frame every complete reply already buffered.
        loop {
            match framer.next(&mut buf) {
                Ok(Some(reply)) => {
                    if reply.kind == ReplyKind::Push {
                        // Shared connections never enable tracking or pub/sub; ignore strays.
                        continue;
                    }
                    let slot = inflight.lock().pop_front();
                    match slot {
                        Some(f) => {
                            m.upstream_latency_seconds
                                .observe(f.sent_at.elapsed().as_secs_f64());
                            let _ = f.reply.send(Ok(reply));
                        }
                        None => {
                            warn!("upstream sent a reply nobody asked for; closing the connection");
                            m.upstream_errors_total
                                .with_label_values(&["protocol"])
                                .inc();
                            conn.mark_dead();
                            fail_all(
                                &inflight,
                                &Arc::new(Error::UpstreamProtocol("unexpected reply".into())),
                            );
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    m.upstream_errors_total
                        .with_label_values(&["protocol"])
                        .inc();
                    conn.mark_dead();
                    fail_all(&inflight, &Arc::new(Error::UpstreamProtocol(e)));
                    return;
                }
            }
        }
        let oldest = inflight.lock().front().map(|f| f.sent_at);
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let read = async {
            match oldest {
                Some(sent) => {
                    let deadline = sent + command_timeout;
                    tokio::time::timeout_at(deadline.into(), rd.read_buf(&mut buf))
                        .await
                        .ok()
                }
                None => {
                    // Idle: wait for data or for a request to start the timeout clock.
                    tokio::select! {
                        r = rd.read_buf(&mut buf) => Some(r),
                        _ = wake_reader.notified() => Some(Ok(usize::MAX)),
                    }
                }
            }
        };
        tokio::select! {
            r = read => match r {
                Some(Ok(0)) => break Error::Upstream("connection closed by upstream".into()),
                Some(Ok(_)) => {}
                Some(Err(e)) => break Error::upstream_io(&e),
                None => {
                    m.upstream_errors_total.with_label_values(&["timeout"]).inc();
                    break Error::Upstream(format!("no reply within {command_timeout:?}"));
                }
            },
            _ = conn.closed.notified() => break Error::Upstream("connection closed".into()),
        }
    };
    if !matches!(failure, Error::Upstream(ref s) if s.starts_with("no reply")) {
        m.upstream_errors_total.with_label_values(&["closed"]).inc();
    }
    debug!(error = %failure, "upstream connection lost");
    conn.mark_dead();
    fail_all(&inflight, &Arc::new(failure));
}

// --- Pool ------------------------------------------------------------------------

/// One slot of the pool: the current connection, replaced by its supervisor.
struct Slot {
    conn: RwLock<Option<Arc<MuxConn>>>,
}

/// Multiplexed connections of one protocol version.
pub struct Pool {
    slots: Vec<Arc<Slot>>,
    /// Last connection error, for fast failure replies.
    last_error: Arc<RwLock<String>>,
    hello: Arc<RwLock<Option<Bytes>>>,
    up: Arc<AtomicUsize>,
}

impl Pool {
    fn start(connector: Connector, proto: u8, shutdown: Arc<Notify>) -> Pool {
        let size = connector.cfg.pool_size;
        let last_error = Arc::new(RwLock::new("not connected yet".to_string()));
        let hello = Arc::new(RwLock::new(None));
        let up = Arc::new(AtomicUsize::new(0));
        let slots: Vec<Arc<Slot>> = (0..size)
            .map(|_| {
                Arc::new(Slot {
                    conn: RwLock::new(None),
                })
            })
            .collect();
        for slot in &slots {
            tokio::spawn(supervise(
                connector.clone(),
                proto,
                slot.clone(),
                last_error.clone(),
                hello.clone(),
                up.clone(),
                shutdown.clone(),
            ));
        }
        Pool {
            slots,
            last_error,
            hello,
            up,
        }
    }

    /// The connection for a client bound to `slot`, or why there is none.
    pub fn conn(&self, slot: usize) -> Result<Arc<MuxConn>, Error> {
        let s = &self.slots[slot % self.slots.len()];
        if let Some(c) = s.conn.read().as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        // Another slot may be up while this one reconnects; a client's next
        // request only moves once its old connection is dead, so order holds.
        for other in &self.slots {
            if let Some(c) = other.conn.read().as_ref() {
                if c.is_alive() {
                    return Ok(c.clone());
                }
            }
        }
        Err(Error::Upstream(self.last_error.read().clone()))
    }

    pub fn hello_reply(&self) -> Option<Bytes> {
        self.hello.read().clone()
    }

    pub fn connected(&self) -> usize {
        self.up.load(Ordering::Relaxed)
    }
}

async fn supervise(
    connector: Connector,
    proto: u8,
    slot: Arc<Slot>,
    last_error: Arc<RwLock<String>>,
    hello: Arc<RwLock<Option<Bytes>>>,
    up: Arc<AtomicUsize>,
    shutdown: Arc<Notify>,
) {
    let m = metrics::get();
    let mut backoff = Duration::from_millis(50);
    let max = connector.cfg.reconnect_backoff_max;
    loop {
        match connector.connect(proto).await {
            Ok((stream, leftover, hello_reply)) => {
                backoff = Duration::from_millis(50);
                *hello.write() = Some(hello_reply);
                let conn = MuxConn::start(stream, leftover, connector.cfg.command_timeout);
                *slot.conn.write() = Some(conn.clone());
                up.fetch_add(1, Ordering::Relaxed);
                m.upstream_pool_connections.inc();
                m.upstream_reconnects_total.inc();
                m.upstream_up.set(1);
                info!(upstream = %connector.cfg.url.redacted(), proto, "upstream connection up");
                let closed = conn.closed.notified();
                tokio::pin!(closed);
                closed.as_mut().enable();
                if conn.is_alive() {
                    tokio::select! {
                        _ = closed => {}
                        _ = shutdown.notified() => { conn.mark_dead(); }
                    }
                }
                up.fetch_sub(1, Ordering::Relaxed);
                m.upstream_pool_connections.dec();
                *slot.conn.write() = None;
                warn!(upstream = %connector.cfg.url.redacted(), "upstream connection lost; reconnecting");
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
                *last_error.write() = text;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.notified() => return,
        }
        backoff = (backoff * 2).min(max);
    }
}

/// The upstream Redis as seen by the rest of nearcache.
pub struct Upstream {
    pub connector: Connector,
    resp2: Pool,
    resp3: Pool,
    next_slot: AtomicUsize,
    shutdown: Arc<Notify>,
}

impl Upstream {
    pub fn start(connector: Connector) -> Upstream {
        let shutdown = Arc::new(Notify::new());
        Upstream {
            resp2: Pool::start(connector.clone(), 2, shutdown.clone()),
            resp3: Pool::start(connector.clone(), 3, shutdown.clone()),
            connector,
            next_slot: AtomicUsize::new(0),
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

    /// The pool slot a new client will use for its whole life.
    pub fn assign_slot(&self) -> usize {
        self.next_slot.fetch_add(1, Ordering::Relaxed)
    }

    /// Is at least one shared connection up?
    pub fn is_up(&self) -> bool {
        self.resp2.connected() > 0
    }

    pub fn stop(&self) {
        self.shutdown.notify_waiters();
    }

    /// A dedicated connection for one client.
    pub async fn pinned(&self, proto: u8) -> Result<PinnedConn, Error> {
        let (stream, leftover, _) = self.connector.connect(proto).await?;
        Ok(PinnedConn::new(stream, leftover))
    }
}

// --- Pinned connections ----------------------------------------------------------

/// A frame read from a pinned connection, or its end.
pub enum PinnedFrame {
    Reply(Reply),
    Closed(Arc<Error>),
}

/// Frames from a pinned connection buffered towards its client.
const PINNED_QUEUE: usize = 1024;

/// A client's own upstream connection: the client writes requests, a reader
/// task forwards every frame (replies and out-of-band pushes) in order.
pub struct PinnedConn {
    pub writer: tokio::io::WriteHalf<BoxStream>,
    pub frames: Option<mpsc::Receiver<PinnedFrame>>,
    reader: tokio::task::JoinHandle<()>,
}

impl PinnedConn {
    fn new(stream: BoxStream, leftover: BytesMut) -> PinnedConn {
        let (rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(PINNED_QUEUE);
        let reader = tokio::spawn(pinned_read_loop(rd, leftover, tx));
        metrics::get().upstream_pinned_connections.inc();
        PinnedConn {
            writer: wr,
            frames: Some(rx),
            reader,
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| Error::upstream_io(&e))
    }
}

impl Drop for PinnedConn {
    fn drop(&mut self) {
        self.reader.abort();
        metrics::get().upstream_pinned_connections.dec();
    }
}

async fn pinned_read_loop(
    mut rd: tokio::io::ReadHalf<BoxStream>,
    mut buf: BytesMut,
    tx: mpsc::Sender<PinnedFrame>,
) {
    let mut framer = protocol::ReplyFramer::default();
    loop {
        loop {
            match framer.next(&mut buf) {
                Ok(Some(reply)) => {
                    if tx.send(PinnedFrame::Reply(reply)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx
                        .send(PinnedFrame::Closed(Arc::new(Error::UpstreamProtocol(e))))
                        .await;
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 8 * 1024 {
            buf.reserve(32 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = tx
                    .send(PinnedFrame::Closed(Arc::new(Error::Upstream(
                        "connection closed by upstream".into(),
                    ))))
                    .await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx
                    .send(PinnedFrame::Closed(Arc::new(Error::upstream_io(&e))))
                    .await;
                return;
            }
        }
    }
}
