//! A loopback TCP relay between the `taos` WebSocket client and taosAdapter.
//!
//! Why: taos-ws 0.12.3 writes every WebSocket frame as two `write` calls (the
//! header, then the payload) on a socket without `TCP_NODELAY`, and nearcache
//! cannot reach that socket. Nagle's algorithm then holds the payload until
//! the header is acknowledged, and a peer with delayed ACKs (the Linux
//! default) acknowledges it only after ~40 ms: every request frame stalls.
//!
//! The relay is the peer the client talks to instead. It re-arms
//! `TCP_QUICKACK` on the accepted socket after every read, so the client's
//! header is acknowledged at once and Nagle releases the payload immediately;
//! its own connection to taosAdapter has `TCP_NODELAY`, so what it forwards
//! leaves at once too. The extra hop is a loopback copy (microseconds).
//!
//! One relay per pool (started lazily, once), listening on `127.0.0.1:0`;
//! one outbound connection per accepted connection; bounded buffers; when
//! either side closes, both are closed. The relay only accepts while the
//! pool is connecting (see [`Relay::arm`]) and only from loopback peers, so
//! it is not an open door to TDengine for other local processes in between.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Per direction, per connection.
const BUF_SIZE: usize = 64 * 1024;
/// The fetch timeout bounds the client; this bounds a relay task whose
/// outbound connect hangs after the client has given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Relay {
    addr: SocketAddr,
    armed: Arc<AtomicUsize>,
    last_error: Arc<Mutex<Option<String>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Stop accepting; relayed connections end when their client closes.
        self.accept.abort();
    }
}

/// While an `Armed` is alive the relay accepts connections.
pub struct Armed(Arc<AtomicUsize>);

impl Drop for Armed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Relay {
    /// Listen on `127.0.0.1:0` and relay every accepted connection to `host:port`.
    pub async fn start(host: String, port: u16) -> std::io::Result<Relay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let armed = Arc::new(AtomicUsize::new(0));
        let last_error = Arc::new(Mutex::new(None));
        let target: Arc<str> = Arc::from(host);
        let (a, errs) = (armed.clone(), last_error.clone());
        let accept = tokio::spawn(async move {
            loop {
                let (client, peer) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        tracing::warn!(error = %e, "TDengine relay: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if a.load(Ordering::SeqCst) == 0 || !peer.ip().is_loopback() {
                    tracing::debug!(%peer, "TDengine relay: unexpected connection refused");
                    continue;
                }
                tokio::spawn(relay_one(client, target.clone(), port, errs.clone()));
            }
        });
        tracing::debug!(%addr, "TDengine relay listening");
        Ok(Relay {
            addr,
            armed,
            last_error,
            accept,
        })
    }

    /// Where the client should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accept connections until the returned guard is dropped.
    pub fn arm(&self) -> Armed {
        self.armed.fetch_add(1, Ordering::SeqCst);
        // Forget errors of earlier attempts.
        self.last_error.lock().take();
        Armed(self.armed.clone())
    }

    /// Why the relay's last outbound connect failed, if it did (the client
    /// itself only sees the relay close the connection).
    pub fn take_error(&self) -> Option<String> {
        self.last_error.lock().take()
    }
}

fn quickack(stream: &TcpStream) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
}

async fn relay_one(
    client: TcpStream,
    host: Arc<str>,
    port: u16,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let _ = client.set_nodelay(true);
    quickack(&client);
    let server =
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((&*host, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let msg = format!("connect to {host}:{port}: {e}");
                tracing::debug!(error = %msg, "TDengine relay");
                *last_error.lock() = Some(msg);
                return;
            }
            Err(_) => {
                let msg = format!("connect to {host}:{port}: timed out after {CONNECT_TIMEOUT:?}");
                tracing::debug!(error = %msg, "TDengine relay");
                *last_error.lock() = Some(msg);
                return;
            }
        };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // When either direction ends, dropping the other closes both sockets.
    tokio::select! {
        _ = pump(cr, sw) => {}
        _ = pump(sr, cw) => {}
    }
}

/// Copy until EOF or an error, re-arming quick ACKs after every read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        quickack(from.as_ref());
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}
