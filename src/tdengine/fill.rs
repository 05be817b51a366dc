//! The proxy side of the third tier: what happens when Redis answers nil for
//! a key that has a TDengine route.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use crate::protocol::{self, Reply, ReplyKind};
use crate::upstream::{MuxConn, ReplyResult};

fn flatten(r: Result<ReplyResult, tokio::sync::oneshot::error::RecvError>) -> ReplyResult {
    match r {
        Ok(r) => r,
        Err(_) => Err(Arc::new(crate::Error::Upstream("connection closed".into()))),
    }
}

/// The third tier: Redis said nil, so ask TDengine, write the rows back to
/// Redis (`SET key value PX ttl NX`: never over a value written meanwhile) and
/// answer with what Redis now holds. Returns the reply and the TTL under
/// which L1 may keep it (zero: not at all).
pub async fn fill(
    td: &super::Tdengine,
    conn: &Arc<MuxConn>,
    key: &Bytes,
    proto: u8,
) -> (ReplyResult, Option<Duration>) {
    use crate::config::TdOnError;
    use crate::tdengine::Fetch;
    let nil = || Reply {
        bytes: protocol::nil(proto == 3),
        kind: ReplyKind::Nil,
    };
    match td.fetch(key).await {
        Fetch::Rows { value, ttl } => {
            let ttl_ms = ttl.as_millis().max(1).to_string();
            let set =
                protocol::command([&b"SET"[..], key, &value, b"PX", ttl_ms.as_bytes(), b"NX"]);
            match flatten(conn.send(set).await) {
                Ok(r) if r.kind == ReplyKind::Nil => {
                    // Someone wrote the key while we queried TDengine: theirs is newer.
                    let get = protocol::command([&b"GET"[..], key]);
                    (flatten(conn.send(get).await), Some(ttl))
                }
                Ok(r) if r.kind == ReplyKind::Error => {
                    warn!("TDengine write-back to Redis refused; answering from TDengine without caching");
                    let reply = Reply {
                        bytes: protocol::bulk_bytes(&value),
                        kind: ReplyKind::Normal,
                    };
                    (Ok(reply), Some(Duration::ZERO))
                }
                Ok(_) => {
                    let reply = Reply {
                        bytes: protocol::bulk_bytes(&value),
                        kind: ReplyKind::Normal,
                    };
                    (Ok(reply), Some(ttl))
                }
                Err(e) => (Err(e), None),
            }
        }
        Fetch::Empty { negative_ttl } => (Ok(nil()), Some(negative_ttl.unwrap_or(Duration::ZERO))),
        Fetch::Invalid(why) => {
            debug!(reason = %why, "key matched a TDengine route but failed validation");
            match td.on_invalid_key() {
                TdOnError::Nil => (Ok(nil()), Some(Duration::ZERO)),
                TdOnError::Error => {
                    let msg = format!("ERR invalid key for TDengine route: {why}");
                    (
                        Ok(Reply {
                            bytes: protocol::error(&msg),
                            kind: ReplyKind::Error,
                        }),
                        None,
                    )
                }
            }
        }
        Fetch::Failed(e) => match td.on_error() {
            TdOnError::Nil => (Ok(nil()), Some(Duration::ZERO)),
            TdOnError::Error => (
                Ok(Reply {
                    bytes: protocol::error(&e.to_reply_text()),
                    kind: ReplyKind::Error,
                }),
                None,
            ),
        },
    }
}
