//! A multiplexed connection: many clients' requests pipelined on one
//! socket, replies matched to requests in order.
//!
//! When it breaks or a reply is late, every request in flight on it gets an
//! error, in order, and nothing already written is retried: a failed INCR
//! is reported, never applied twice. Its job queue is bounded: a session
//! that finds it full waits, which slows that client down instead of
//! growing the process (each session is the only producer of its own
//! requests, so waiting never reorders them).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use super::connector::Connected;
use crate::error::Error;
use crate::metrics;
use crate::net::{BoxStream, FrameReader};
use crate::protocol::{Reply, ReplyKind};

/// The reply to one request, or why there is none.
pub type ReplyResult = Result<Reply, Arc<Error>>;

/// A reply received from [`MuxConn::send`]'s receiver; a dropped sender
/// means the connection went away.
pub fn received(r: Result<ReplyResult, oneshot::error::RecvError>) -> ReplyResult {
    r.unwrap_or_else(|_| Err(closed()))
}

fn closed() -> Arc<Error> {
    Arc::new(Error::Upstream("connection closed".into()))
}

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
    jobs: mpsc::Sender<Job>,
    alive: AtomicBool,
    closed: Notify,
    /// Requests queued or written and not answered yet.
    outstanding: AtomicUsize,
}

impl MuxConn {
    /// Starts the connection's writer and reader tasks.
    pub(super) fn start(
        connected: Connected,
        command_timeout: Duration,
        queue: usize,
    ) -> Arc<MuxConn> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let conn = Arc::new(MuxConn {
            jobs: tx,
            alive: AtomicBool::new(true),
            closed: Notify::new(),
            outstanding: AtomicUsize::new(0),
        });
        let readonly = connected.readonly;
        let (rd, wr) = tokio::io::split(connected.stream);
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
            FrameReader::new(rd, connected.leftover),
            inflight,
            wake_reader,
            command_timeout,
            readonly,
        ));
        conn
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Requests waiting for their replies on this connection.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Queues a request (waiting while the queue is full); the receiver
    /// yields its reply or the failure.
    pub async fn send(&self, request: Bytes) -> oneshot::Receiver<ReplyResult> {
        let (tx, rx) = oneshot::channel();
        if !self.is_alive() {
            let _ = tx.send(Err(closed()));
            return rx;
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(Job { request, reply: tx }).await {
            self.outstanding.fetch_sub(1, Ordering::Relaxed);
            let _ = job.reply.send(Err(closed()));
        }
        rx
    }

    /// Completes when the connection is closed.
    pub async fn closed(&self) {
        let notified = self.closed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_alive() {
            notified.await;
        }
    }

    pub fn close(&self) {
        if self.alive.swap(false, Ordering::AcqRel) {
            self.closed.notify_waiters();
        }
    }

    fn answered(&self, n: usize) {
        self.outstanding.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A `-READONLY` from what we took for the master (Sentinel only): it was
/// demoted, and the Sentinels must be asked where the master went.
pub(super) fn demoted(error: &[u8], hook: Option<&Notify>) {
    if let Some(hook) = hook {
        if error.starts_with(b"-READONLY ") {
            hook.notify_one();
        }
    }
}

fn fail_all(conn: &MuxConn, inflight: &Mutex<VecDeque<InFlight>>, err: &Arc<Error>) {
    let drained: Vec<InFlight> = inflight.lock().drain(..).collect();
    conn.answered(drained.len());
    for f in drained {
        let _ = f.reply.send(Err(err.clone()));
    }
}

async fn write_loop(
    conn: Arc<MuxConn>,
    mut wr: WriteHalf<BoxStream>,
    mut rx: mpsc::Receiver<Job>,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    wake_reader: Arc<Notify>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(128);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = conn.closed() => 0,
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
            conn.close();
            fail_all(&conn, &inflight, &Arc::new(Error::upstream_io(&e)));
            break;
        }
        out.clear();
    }
    // Anything still queued never reached Redis: it can fail without ambiguity.
    rx.close();
    while let Ok(job) = rx.try_recv() {
        conn.answered(1);
        let _ = job.reply.send(Err(closed()));
    }
    let _ = wr.shutdown().await;
}

async fn read_loop(
    conn: Arc<MuxConn>,
    mut reader: FrameReader<ReadHalf<BoxStream>>,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    wake_reader: Arc<Notify>,
    command_timeout: Duration,
    readonly: Option<Arc<Notify>>,
) {
    let m = metrics::get();
    let failure: Error = 'conn: loop {
        // Every complete reply already buffered.
        loop {
            let reply = match reader.try_next() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    m.upstream_errors_total
                        .with_label_values(&["protocol"])
                        .inc();
                    break 'conn e;
                }
            };
            if reply.kind == ReplyKind::Push {
                // Shared connections never enable tracking or pub/sub; ignore strays.
                continue;
            }
            let Some(f) = inflight.lock().pop_front() else {
                warn!("upstream sent a reply nobody asked for; closing the connection");
                m.upstream_errors_total
                    .with_label_values(&["protocol"])
                    .inc();
                break 'conn Error::UpstreamProtocol("unexpected reply".into());
            };
            conn.answered(1);
            if reply.kind == ReplyKind::Error {
                demoted(&reply.bytes, readonly.as_deref());
            }
            m.upstream_latency_seconds
                .observe(f.sent_at.elapsed().as_secs_f64());
            let _ = f.reply.send(Ok(reply));
        }
        let oldest = inflight.lock().front().map(|f| f.sent_at);
        let read = async {
            match oldest {
                Some(sent) => {
                    tokio::time::timeout_at((sent + command_timeout).into(), reader.fill())
                        .await
                        .ok()
                }
                // Idle: wait for data or for a request to start the timeout clock.
                None => tokio::select! {
                    r = reader.fill() => Some(r),
                    _ = wake_reader.notified() => Some(Ok(())),
                },
            }
        };
        tokio::select! {
            r = read => match r {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    m.upstream_errors_total.with_label_values(&["closed"]).inc();
                    break e;
                }
                None => {
                    m.upstream_errors_total.with_label_values(&["timeout"]).inc();
                    break Error::Upstream(format!("no reply within {command_timeout:?}"));
                }
            },
            _ = conn.closed() => break Error::Upstream("connection closed".into()),
        }
    };
    debug!(error = %failure, "upstream connection lost");
    conn.close();
    fail_all(&conn, &inflight, &Arc::new(failure));
}
