//! A loopback relay between the `taos` WebSocket client and taosAdapter,
//! which also terminates TLS for `wss` DSNs.
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
//! its own connection to taosAdapter has `TCP_NODELAY` (and, for TLS, each
//! chunk is flushed as its own record at once), so what it forwards leaves at
//! once too. The extra hop is a loopback copy (microseconds).
//!
//! TLS: the client always speaks plain `ws` to the relay; for a `wss` DSN the
//! relay speaks TLS to taosAdapter and verifies its certificate for the DSN's
//! host (or the configured server name) — not for 127.0.0.1, which is all the
//! client would know. (The `taos` crate as built here has no TLS of its own:
//! without its `rustls`/`native-tls` features a `wss` connect panics.)
//!
//! The client's WebSocket handshake names the relay in its `Host` header; the
//! relay rewrites it to what the client would have sent to taosAdapter, so a
//! reverse proxy that routes by `Host` (common in front of TLS) still works.
//!
//! One relay per pool (started lazily, once), listening on `127.0.0.1:0`;
//! one outbound connection per accepted connection; bounded buffers; when
//! either side closes, both are closed. The relay only accepts while the
//! pool is connecting (see [`Relay::arm`]) and only from loopback peers, so
//! it is not an open door to TDengine for other local processes in between.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Per direction, per connection.
const BUF_SIZE: usize = 64 * 1024;
/// The fetch timeout bounds the client; this bounds a relay task whose
/// outbound connect (or TLS handshake) hangs after the client has given up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The client's handshake request is a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Where the relay connects, and how.
pub struct Target {
    pub host: String,
    pub port: u16,
    /// The `Host` header the client would have sent to taosAdapter.
    pub authority: String,
    /// For `wss` DSNs: TLS towards taosAdapter, verified for this name.
    pub tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

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
    /// Listen on `127.0.0.1:0` and relay every accepted connection to `target`.
    pub async fn start(target: Arc<Target>) -> std::io::Result<Relay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let armed = Arc::new(AtomicUsize::new(0));
        let last_error = Arc::new(Mutex::new(None));
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
                let (target, errs) = (target.clone(), errs.clone());
                tokio::spawn(async move { relay_one(client, &target, &errs).await });
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

    /// Why the relay's last outbound connect or TLS handshake failed, if it
    /// did (the client itself only sees the relay close the connection).
    pub fn take_error(&self) -> Option<String> {
        self.last_error.lock().take()
    }
}

/// A TCP stream that re-arms `TCP_QUICKACK` after every read (Linux leaves
/// quick-ACK mode on its own, so it is set again each time).
struct QuickAck(TcpStream);

impl QuickAck {
    fn new(s: TcpStream) -> QuickAck {
        let _ = s.set_nodelay(true);
        let q = QuickAck(s);
        q.rearm();
        q
    }

    fn rearm(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.0).poll_read(cx, buf);
        if res.is_ready() {
            self.rearm();
        }
        res
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// taosAdapter's side of a relayed connection.
enum Upstream {
    Plain(QuickAck),
    Tls(Box<tokio_rustls::client::TlsStream<QuickAck>>),
}

/// Relay one client connection. If taosAdapter cannot be reached, the
/// reason is stored in `errors` before the client's socket is closed, so
/// that the pool finds it when the client reports the closed connection.
async fn relay_one(client: TcpStream, target: &Target, errors: &Mutex<Option<String>>) {
    let mut client = QuickAck::new(client);
    let Some(head) = read_head(&mut client).await else {
        return; // the client went away or sent no handshake
    };
    let head = rewrite_host(head, &target.authority);
    match open(target).await {
        Ok(Upstream::Plain(s)) => splice(client, s, &head).await,
        Ok(Upstream::Tls(s)) => splice(client, *s, &head).await,
        Err(msg) => {
            tracing::debug!(error = %msg, "TDengine relay");
            *errors.lock() = Some(msg);
        }
    }
}

/// Connect to taosAdapter (TCP_NODELAY, quick ACKs), with TLS if configured.
async fn open(target: &Target) -> Result<Upstream, String> {
    let (host, port) = (&target.host, target.port);
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((&**host, port))).await
    {
        Ok(Ok(s)) => QuickAck::new(s),
        Ok(Err(e)) => return Err(format!("connect to {host}:{port}: {e}")),
        Err(_) => {
            return Err(format!(
                "connect to {host}:{port}: timed out after {CONNECT_TIMEOUT:?}"
            ))
        }
    };
    let Some((connector, name)) = &target.tls else {
        return Ok(Upstream::Plain(tcp));
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp)).await {
        Ok(Ok(s)) => Ok(Upstream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(format!(
            "TLS handshake with {host}:{port} (verifying {}): {e}",
            name.to_str()
        )),
        Err(_) => Err(format!(
            "TLS handshake with {host}:{port}: timed out after {CONNECT_TIMEOUT:?}"
        )),
    }
}

/// The client's HTTP upgrade request, up to and including the blank line
/// (and whatever followed it in the same reads). `None` if the client
/// closed, stalled or sent something too long to be one.
async fn read_head(client: &mut QuickAck) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            let n = client.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
            if head.len() > MAX_HEAD {
                return None;
            }
        }
    })
    .await
    .ok()??;
    Some(head)
}

/// Replace the `Host` header of the request head with `authority`. Anything
/// after the head is kept as it is.
fn rewrite_host(head: Vec<u8>, authority: &str) -> Vec<u8> {
    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
        return head;
    };
    let mut out = Vec::with_capacity(head.len() + authority.len());
    for (i, line) in head[..end].split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        let is_host = line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:");
        if i > 0 && is_host {
            out.extend_from_slice(b"Host: ");
            out.extend_from_slice(authority.as_bytes());
            if line.ends_with(b"\r") {
                out.push(b'\r');
            }
        } else {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&head[end..]);
    out
}

/// Send `head` to the server, then copy both ways until either side ends.
async fn splice<S>(client: QuickAck, mut server: S, head: &[u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if server.write_all(head).await.is_err() || server.flush().await.is_err() {
        return;
    }
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = tokio::io::split(server);
    // When either direction ends, dropping the other closes both sockets.
    tokio::select! {
        _ = pump(cr, sw) => {}
        _ = pump(sr, cw) => {}
    }
}

/// Copy until EOF or an error. Every chunk is flushed at once: for TLS that
/// seals and sends it as its own record instead of waiting for more.
async fn pump<R, W>(mut from: R, mut to: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_is_rewritten_and_the_rest_kept() {
        let head = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:40001\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nrest".to_vec();
        let out = rewrite_host(head, "td.example:6041");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "GET /ws HTTP/1.1\r\nHost: td.example:6041\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nrest"
        );
        let lower = b"GET /rest/ws?token=x HTTP/1.1\r\nhost: 127.0.0.1:1\r\n\r\n".to_vec();
        assert_eq!(
            rewrite_host(lower, "cloud.example"),
            b"GET /rest/ws?token=x HTTP/1.1\r\nHost: cloud.example\r\n\r\n"
        );
        // Not a complete head: untouched.
        let partial = b"GET /ws HTTP/1.1\r\nHost: a\r\n".to_vec();
        assert_eq!(rewrite_host(partial.clone(), "b"), partial);
    }
}
