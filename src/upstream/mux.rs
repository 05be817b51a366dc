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
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use futures::future::{BoxFuture, FutureExt};
use futures::task::AtomicWaker;

use super::connector::Connected;
use super::health::Health;
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
    /// The oldest request's reply is overdue (the server is busy or dead).
    late: AtomicBool,
    closed: Notify,
    /// The writer and reader tasks, woken by [`MuxConn::close`], and the
    /// reader by the writer when a request is written. (They look on every
    /// turn of their loops: a Notify would take a lock each time.)
    writer_waker: AtomicWaker,
    reader_waker: AtomicWaker,
    /// Requests queued or written and not answered yet.
    outstanding: AtomicUsize,
}

impl MuxConn {
    /// Starts the connection's writer and reader tasks.
    pub(super) fn start(
        connected: Connected,
        command_timeout: Duration,
        queue: usize,
        health: Option<Arc<Health>>,
    ) -> Arc<MuxConn> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let conn = Arc::new(MuxConn {
            jobs: tx,
            alive: AtomicBool::new(true),
            late: AtomicBool::new(false),
            closed: Notify::new(),
            writer_waker: AtomicWaker::new(),
            reader_waker: AtomicWaker::new(),
            outstanding: AtomicUsize::new(0),
        });
        let readonly = connected.readonly;
        let (rd, wr) = tokio::io::split(connected.stream);
        let inflight = Arc::new(Mutex::new(VecDeque::<InFlight>::new()));
        tokio::spawn(write_loop(conn.clone(), wr, rx, inflight.clone()));
        tokio::spawn(read_loop(
            conn.clone(),
            FrameReader::new(rd, connected.leftover),
            inflight,
            command_timeout,
            readonly,
            health,
        ));
        conn
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Is a reply on this connection later than `command_timeout`? A request
    /// sent now would wait behind it.
    pub fn is_late(&self) -> bool {
        self.late.load(Ordering::Relaxed)
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

    /// Queues a request without waiting: `None` when the queue is full or
    /// the connection is closed (the caller sends it another way).
    pub fn try_send(&self, request: Bytes) -> Option<oneshot::Receiver<ReplyResult>> {
        if !self.is_alive() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(Job { request, reply: tx }) {
            Ok(()) => Some(rx),
            Err(_) => {
                self.outstanding.fetch_sub(1, Ordering::Relaxed);
                None
            }
        }
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
            self.writer_waker.wake();
            self.reader_waker.wake();
        }
    }

    /// Ready once the connection is closed; for the task `waker` wakes.
    fn poll_closed(&self, waker: &AtomicWaker, cx: &mut std::task::Context<'_>) -> Poll<()> {
        waker.register(cx.waker());
        if self.is_alive() {
            Poll::Pending
        } else {
            Poll::Ready(())
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
) {
    let mut batch: Vec<Job> = Vec::with_capacity(128);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let got = tokio::select! {
            n = rx.recv_many(&mut batch, 256) => n,
            _ = poll_fn(|cx| conn.poll_closed(&conn.writer_waker, cx)) => 0,
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
        conn.reader_waker.wake();
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

/// Why a connection is given up when a reply is late and the health check
/// got no answer either.
pub fn timed_out(command_timeout: Duration, check_timeout: Duration) -> Error {
    Error::Upstream(format!(
        "no reply within {command_timeout:?} and no answer to a health check within {check_timeout:?}"
    ))
}

async fn read_loop(
    conn: Arc<MuxConn>,
    mut reader: FrameReader<ReadHalf<BoxStream>>,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    command_timeout: Duration,
    readonly: Option<Arc<Notify>>,
    health: Option<Arc<Health>>,
) {
    let m = metrics::get();
    // A late reply does not end the connection by itself: the server may be
    // busy, not dead. When the oldest request has waited `command_timeout`
    // (or that long since the last proof of life), a health check decides;
    // while it runs, replies keep being read.
    let mut check: Option<BoxFuture<'static, bool>> = None;
    let mut proven: Option<Instant> = None;
    // Made once, not per read: a new timer per reply costs a timer-wheel
    // insertion and removal. The alarm is moved only when it would ring
    // late; ringing early just means one more turn of the loop (and a later
    // deadline).
    let alarm = tokio::time::sleep(command_timeout);
    tokio::pin!(alarm);
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
        let due = oldest.map(|sent| proven.map_or(sent, |p| p.max(sent)) + command_timeout);
        let now = Instant::now();
        let overdue = due.is_some_and(|d| now >= d);
        // Late stays set while a busy server holds the reply, checks or not.
        let late = oldest.is_some_and(|s| now >= s + command_timeout);
        conn.late.store(late, Ordering::Relaxed);
        if !overdue {
            // The late reply came in while the check ran: nothing to ask about.
            check = None;
        }
        if let (Some(due), None) = (due, &check) {
            if overdue {
                let Some(health) = &health else {
                    m.upstream_errors_total
                        .with_label_values(&["timeout"])
                        .inc();
                    break Error::Upstream(format!("no reply within {command_timeout:?}"));
                };
                let health = health.clone();
                check = Some(async move { health.alive_since(due).await }.boxed());
            }
        }
        let checking = check.is_some();
        if let Some(due) = due.filter(|_| !checking) {
            let due = tokio::time::Instant::from_std(due);
            if alarm.is_elapsed() || alarm.deadline() > due {
                alarm.as_mut().reset(due);
            }
        }
        let read = async {
            match due {
                Some(_) if !checking => tokio::select! {
                    r = reader.fill() => r,
                    _ = &mut alarm => Ok(()),
                },
                Some(_) => reader.fill().await,
                // Idle: wait for data or for a request to start the timeout clock.
                None => tokio::select! {
                    r = reader.fill() => r,
                    // (Close has its own branch below, on the same waker.)
                    _ = poll_fn(|cx| {
                        conn.reader_waker.register(cx.waker());
                        if inflight.lock().is_empty() {
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    }) => Ok(()),
                },
            }
        };
        tokio::select! {
            r = read => if let Err(e) = r {
                m.upstream_errors_total.with_label_values(&["closed"]).inc();
                break e;
            },
            alive = async { check.as_mut().expect("guarded").await }, if check.is_some() => {
                check = None;
                if !alive {
                    m.upstream_errors_total.with_label_values(&["timeout"]).inc();
                    let check_timeout = health.as_ref().map(|h| h.timeout()).unwrap_or_default();
                    break timed_out(command_timeout, check_timeout);
                }
                // Busy, not dead: wait another period before asking again.
                proven = Some(Instant::now());
            }
            _ = poll_fn(|cx| conn.poll_closed(&conn.reader_waker, cx)) => break Error::Upstream("connection closed".into()),
        }
    };
    debug!(error = %failure, "upstream connection lost");
    conn.close();
    fail_all(&conn, &inflight, &Arc::new(failure));
}

#[cfg(test)]
mod tests {
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::upstream::{Connector, Login};

    /// A real redis-server on a free port, killed on drop.
    struct Redis {
        port: u16,
        child: Child,
    }

    impl Redis {
        fn start() -> Redis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            Redis { port, child }
        }

        fn signal(&self, name: &str) {
            let ok = Command::new("kill")
                .args([&format!("-{name}"), &self.child.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The job queue is bounded: with Redis stopped, a producer sending
    /// large requests is held once the socket's buffers and the queue are
    /// full, instead of growing the process; when Redis resumes, every
    /// request is answered, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_holds_its_producer_and_keeps_order() {
        const SIZE: usize = 256 * 1024;
        const N: usize = 400;
        let redis = Redis::start();
        let mut cfg = crate::config::Config::defaults().upstream;
        cfg.url = crate::config::UpstreamUrl::parse(&format!("redis://127.0.0.1:{}", redis.port))
            .unwrap();
        let connector = Connector::new(cfg).unwrap();
        let connected = connector
            .connect(2, &Login::Configured, false)
            .await
            .unwrap();
        let conn = MuxConn::start(connected, Duration::from_secs(60), 4, None);

        redis.signal("STOP");
        let sent = Arc::new(AtomicUsize::new(0));
        let producer = {
            let (conn, sent) = (conn.clone(), sent.clone());
            tokio::spawn(async move {
                let value = vec![b'x'; SIZE];
                let mut replies = Vec::with_capacity(N);
                for _ in 0..N {
                    let req = crate::protocol::command([&b"APPEND"[..], b"q", &value]);
                    replies.push(conn.send(req).await);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                replies
            })
        };
        // Wait until the producer is held: no progress for 300 ms.
        let mut last = usize::MAX;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = sent.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            assert!(Instant::now() < deadline, "the producer never stopped");
            last = now;
        }
        let held_at = sent.load(Ordering::Relaxed);
        println!(
            "producer held after {held_at} of {N} requests of {SIZE} bytes; {} outstanding",
            conn.outstanding()
        );
        assert!(
            held_at < N / 2,
            "a stopped upstream held the producer after {held_at} requests"
        );

        redis.signal("CONT");
        let replies = tokio::time::timeout(Duration::from_secs(60), producer)
            .await
            .expect("every request sent after the resume")
            .unwrap();
        for (i, rx) in replies.into_iter().enumerate() {
            let reply = received(rx.await).expect("a reply");
            let want = format!(":{}\r\n", (i + 1) * SIZE);
            assert_eq!(&reply.bytes[..], want.as_bytes(), "reply {i}");
        }
        assert_eq!(conn.outstanding(), 0);
    }
}
