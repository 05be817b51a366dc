//! Connections of one client at a time, for state that lives on the
//! connection (a transaction, subscriptions, a blocking command, another
//! database or user). The session writes requests; a reader task forwards
//! every frame (replies and out-of-band pushes) in order.
//!
//! They are capped (`upstream.max_pinned`), and a connection whose state has
//! ended cleanly goes back to a small idle list for the next client instead
//! of being closed, so a worker looping on BLPOP does not open a connection
//! per call.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};

use super::connector::{Connector, Login};
use super::mux::demoted;
use super::sentinel::next_switch;
use crate::error::Error;
use crate::metrics;
use crate::net::{BoxStream, FrameReader};
use crate::protocol::{Reply, ReplyKind};

/// A frame read from a pinned connection, or its end.
pub enum PinnedFrame {
    Reply(Reply),
    Closed(Arc<Error>),
}

/// Frames buffered towards the client before the reader stops reading.
const FRAMES_QUEUE: usize = 1024;
/// Clean connections kept for reuse, per protocol version.
const IDLE_MAX: usize = 8;

/// A client's own upstream connection.
pub struct PinnedConn {
    writer: WriteHalf<BoxStream>,
    pub frames: mpsc::Receiver<PinnedFrame>,
    /// The connection's id on the server (for CLIENT UNBLOCK on the client's behalf).
    pub connection_id: i64,
    pub proto: u8,
    /// Opened with a client's own credentials: never handed to another client.
    pub foreign: bool,
    /// The cluster node it is connected to (`None`: the configured upstream).
    pub node: Option<String>,
    reader: tokio::task::JoinHandle<()>,
    _permit: OwnedSemaphorePermit,
}

impl PinnedConn {
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| Error::upstream_io(&e))
    }

    /// Still connected, and nothing unexpected waiting in it?
    pub fn reusable(&mut self) -> bool {
        !self.reader.is_finished() && self.frames.try_recv().is_err()
    }
}

impl Drop for PinnedConn {
    fn drop(&mut self) {
        self.reader.abort();
        metrics::get().upstream_pinned_connections.dec();
    }
}

/// What a pinned connection's reader watches besides its socket.
struct Watch {
    /// The Sentinel switch epoch and the one the connection was opened in.
    switches: watch::Receiver<u64>,
    epoch: u64,
    readonly: Option<Arc<Notify>>,
}

async fn read_loop(
    mut reader: FrameReader<ReadHalf<BoxStream>>,
    tx: mpsc::Sender<PinnedFrame>,
    mut w: Watch,
) {
    let moved = || {
        PinnedFrame::Closed(Arc::new(Error::Upstream(
            "the master changed (Sentinel failover); connection closed".into(),
        )))
    };
    if *w.switches.borrow_and_update() != w.epoch {
        let _ = tx.send(moved()).await;
        return;
    }
    loop {
        let frame = tokio::select! {
            r = reader.next() => match r {
                Ok(r) => {
                    if r.kind == ReplyKind::Error {
                        demoted(&r.bytes, w.readonly.as_deref());
                    }
                    PinnedFrame::Reply(r)
                }
                Err(e) => PinnedFrame::Closed(Arc::new(e)),
            },
            // The client's state (a transaction, subscriptions) lived on the
            // old master: the client sees its connection closed, as it would
            // if Redis had closed it.
            _ = next_switch(&mut w.switches) => moved(),
        };
        let end = matches!(frame, PinnedFrame::Closed(_));
        if tx.send(frame).await.is_err() || end {
            return;
        }
    }
}

/// Opens, caps and recycles pinned connections.
pub struct PinnedPool {
    connector: Connector,
    permits: Arc<Semaphore>,
    max: usize,
    idle: Arc<Mutex<Vec<PinnedConn>>>,
}

impl PinnedPool {
    pub fn new(connector: Connector, max: usize) -> PinnedPool {
        let idle = Arc::new(Mutex::new(Vec::<PinnedConn>::new()));
        if connector.sentinel().is_some() {
            // Idle connections to the old master close at a switch too
            // (their readers end at once, but the sockets stay open until
            // the connections are dropped).
            let mut switches = connector.switches();
            let idle = Arc::downgrade(&idle);
            tokio::spawn(async move {
                loop {
                    next_switch(&mut switches).await;
                    let Some(idle) = idle.upgrade() else { return };
                    let closing = std::mem::take(&mut *idle.lock());
                    drop(closing);
                }
            });
        }
        PinnedPool {
            connector,
            permits: Arc::new(Semaphore::new(max)),
            max,
            idle,
        }
    }

    /// A connection in the configured database with the given login: a
    /// clean idle one when there is one, else a new one.
    pub async fn acquire(&self, proto: u8, login: &Login) -> Result<PinnedConn, Error> {
        self.acquire_at(None, proto, login).await
    }

    /// [`PinnedPool::acquire`] on a given cluster node (`None`: the
    /// configured upstream); idle connections are reused only on their node.
    pub async fn acquire_at(
        &self,
        node: Option<&str>,
        proto: u8,
        login: &Login,
    ) -> Result<PinnedConn, Error> {
        if matches!(login, Login::Configured) {
            loop {
                let candidate = {
                    let mut idle = self.idle.lock();
                    let at = idle
                        .iter()
                        .position(|c| c.proto == proto && c.node.as_deref() == node);
                    at.map(|i| idle.swap_remove(i))
                };
                match candidate {
                    Some(mut c) => {
                        if c.reusable() {
                            return Ok(c);
                        }
                    }
                    None => break,
                }
            }
        }
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Idle connections count against the cap: close one to make room.
                let evicted = self.idle.lock().pop();
                match evicted {
                    Some(c) => {
                        drop(c);
                        self.permits
                            .clone()
                            .try_acquire_owned()
                            .map_err(|_| self.full())?
                    }
                    None => return Err(self.full()),
                }
            }
        };
        let connected = match node {
            Some(addr) => self.connector.connect_to(addr, proto, login, false).await?,
            None => self.connector.connect(proto, login, false).await?,
        };
        let watch = Watch {
            switches: self.connector.switches(),
            epoch: connected.epoch,
            readonly: connected.readonly,
        };
        let (rd, wr) = tokio::io::split(connected.stream);
        let (tx, rx) = mpsc::channel(FRAMES_QUEUE);
        let reader = tokio::spawn(read_loop(
            FrameReader::new(rd, connected.leftover),
            tx,
            watch,
        ));
        metrics::get().upstream_pinned_connections.inc();
        Ok(PinnedConn {
            writer: wr,
            frames: rx,
            connection_id: connected.info.connection_id,
            proto,
            foreign: !matches!(login, Login::Configured),
            node: node.map(str::to_string),
            reader,
            _permit: permit,
        })
    }

    fn full(&self) -> Error {
        Error::Client(format!(
            "ERR nearcache: all {} pinned upstream connections are in use (upstream.max_pinned)",
            self.max
        ))
    }

    /// Takes a connection back. Only one whose state the session knows to be
    /// clean (configured user and database, no transaction, subscription or
    /// blocking command) is kept for reuse; anything else is closed.
    pub fn release(&self, mut conn: PinnedConn, clean: bool) {
        if !clean || conn.foreign || !conn.reusable() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.iter().filter(|c| c.proto == conn.proto).count() < IDLE_MAX {
            idle.push(conn);
        }
    }

    /// Pinned connections open now (in use or idle).
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    pub fn close_idle(&self) {
        self.idle.lock().clear();
    }
}
