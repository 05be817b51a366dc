//! The wire: client requests in, upstream replies framed, replies encoded.
//!
//! Requests are RESP arrays of bulk strings or inline commands; before a
//! partial request is buffered its headers are checked against the
//! configured limits, so a client announcing a 100 GB bulk string gets the
//! error Redis gives at once instead of being buffered. Replies from
//! upstream stay encoded `Bytes`: nearcache only needs to find where each
//! one ends, so RESP2 and RESP3 replies pass through byte-for-byte and are
//! never re-encoded between protocol versions.
//!
//! Nothing here recurses over data from a socket: requests are flat, and
//! replies are framed by counting the elements still owed. Both framers are
//! resumable, so input that arrives in small reads is scanned once.

mod encode;
mod reply;
mod request;

pub use encode::*;
pub use reply::{
    elements, first_word, frame_len, reply_strings, scalar, split_array, Reply, ReplyFramer,
    ReplyKind,
};
pub use request::{CommandName, Limits, ProtocolError, Request, RequestParser, INLINE_MAX};
