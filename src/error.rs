//! The one error type: where a failure came from decides what the client is told.

use std::io;

/// A failure on the data path, by origin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client sent something Redis would reject; the message is the Redis error text.
    #[error("{0}")]
    Client(String),
    /// The upstream Redis could not be reached, timed out or closed the connection.
    #[error("upstream unavailable: {0}")]
    Upstream(String),
    /// The upstream refused a login made for a client (its own AUTH or
    /// HELLO AUTH): the server's error reply, passed to the client as is.
    #[error("login refused")]
    Refused(bytes::Bytes),
    /// The upstream answered something nearcache could not frame.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(String),
    /// TDengine failed, timed out or the breaker is open.
    #[error("tdengine unavailable: {0}")]
    Tdengine(String),
    /// A bug or an exhausted internal bound.
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl Error {
    /// The message without the kind's prefix, for an error told inside
    /// another (`upstream unavailable: a: …; b: …`, not the prefix thrice).
    pub fn detail(&self) -> String {
        match self {
            Error::Upstream(s) => s.clone(),
            e => e.to_string(),
        }
    }

    pub fn upstream_io(e: &io::Error) -> Error {
        Error::Upstream(e.to_string())
    }

    /// The RESP error line (without the leading `-` and trailing CRLF) sent to a client.
    pub fn to_reply_text(&self) -> String {
        match self {
            Error::Client(msg) => msg.clone(),
            Error::Refused(reply) => String::from_utf8_lossy(reply.get(1..).unwrap_or_default())
                .trim_end()
                .to_string(),
            other => format!("ERR {other}"),
        }
    }

    /// The error as the reply a client gets.
    pub fn to_reply(&self) -> bytes::Bytes {
        match self {
            Error::Refused(reply) => reply.clone(),
            other => crate::protocol::error(&other.to_reply_text()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
