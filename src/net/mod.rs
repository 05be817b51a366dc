//! Byte streams to the upstream: plain TCP or TLS, opened with a deadline,
//! read as RESP frames, and reconnected with backoff. Everything that talks
//! to Redis (pool, pinned and control connections, the invalidation feed)
//! goes through here, so it is the one place that knows about sockets.

mod tls;

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use tls::{root_store, TlsConnector};

use crate::error::Error;
use crate::protocol::{Reply, ReplyFramer};

/// A byte stream to Redis: plain TCP or TLS.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> AsyncStream for T {}

pub type BoxStream = Box<dyn AsyncStream>;

/// Opens a TCP connection (with TLS when configured) to `addr` within `timeout`.
pub async fn connect(
    addr: &str,
    tls: Option<&TlsConnector>,
    timeout: Duration,
) -> Result<BoxStream, Error> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| Error::Upstream(format!("connect {addr}: {e}")))?;
        tcp.set_nodelay(true).ok();
        Ok::<BoxStream, Error>(match tls {
            Some(tls) => tls.connect(tcp, host_of(addr)).await?,
            None => Box::new(tcp),
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Upstream(format!(
            "connect {addr}: timed out after {timeout:?}"
        ))),
    }
}

/// The host of a `host:port` or `[v6]:port` address.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The read side of an upstream connection, framed into replies. Every
/// connection kind reads through this one loop.
pub struct FrameReader<R> {
    rd: R,
    buf: BytesMut,
    framer: ReplyFramer,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `leftover`: bytes already read past the handshake.
    pub fn new(rd: R, leftover: BytesMut) -> FrameReader<R> {
        FrameReader {
            rd,
            buf: leftover,
            framer: ReplyFramer::default(),
        }
    }

    /// The next reply; an error when the connection closed, failed, or sent
    /// something that is not RESP.
    pub async fn next(&mut self) -> Result<Reply, Error> {
        loop {
            if let Some(r) = self.try_next()? {
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// A reply already buffered, if there is one.
    pub fn try_next(&mut self) -> Result<Option<Reply>, Error> {
        self.framer
            .next(&mut self.buf)
            .map_err(Error::UpstreamProtocol)
    }

    /// Reads more bytes; an error on EOF.
    pub async fn fill(&mut self) -> Result<(), Error> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        match self.rd.read_buf(&mut self.buf).await {
            Ok(0) => Err(Error::Upstream("connection closed by upstream".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(Error::upstream_io(&e)),
        }
    }

    /// Gives back the stream and what was read past the last frame.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.rd, self.buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameReader<S> {
    /// Writes on the same stream (a connection nobody else uses).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.rd
            .write_all(bytes)
            .await
            .map_err(|e| Error::upstream_io(&e))
    }
}

/// Exponential backoff between reconnection attempts: 50 ms doubling up to `max`.
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Self::FIRST,
            max,
        }
    }

    /// The delay before the next attempt (and doubles the one after).
    pub fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// After a success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}
