//! The proxy side of the third tier: what happens when Redis answers nil for
//! a key that has a TDengine route.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::{debug, warn};

use crate::cache::{Cache, WriteBackOutcome};
use crate::protocol::{self, Reply, ReplyKind};
use crate::upstream::cluster::router::Router;
use crate::upstream::cluster::slots;
use crate::upstream::{MuxConn, ReplyResult};

/// Where a fill writes its rows back to (and reads the key again when
/// someone else wrote it first).
#[derive(Clone)]
pub enum Target {
    /// The client's multiplexed connection to the one Redis.
    Conn(Arc<MuxConn>),
    /// The owner of the key's slot; redirects are followed (a redirected
    /// command never ran, so following one is not a retried write).
    Cluster {
        router: Arc<Router>,
        proto: u8,
        bias: usize,
    },
}

impl Target {
    async fn send(&self, key: &[u8], request: Bytes) -> ReplyResult {
        match self {
            Target::Conn(conn) => crate::upstream::received(conn.send(request).await.await),
            Target::Cluster {
                router,
                proto,
                bias,
            } => router.send(*proto, slots::slot(key), request, *bias).await,
        }
    }
}

/// Where a filled value goes in L1: the cache, the read's command signature
/// and the key's policy TTL. With it the write-back goes through the
/// invalidation feed, which stores the value once Redis has it (see
/// [`crate::cache::WriteBack`]); the fill then reports a zero cap, as there
/// is nothing left for the caller to store.
#[derive(Clone)]
pub struct Keep {
    pub cache: Arc<Cache>,
    pub sig: Bytes,
    pub ttl: Duration,
}

/// The third tier: Redis said nil, so ask TDengine, write the rows back to
/// Redis (`SET key value PX ttl NX`: never over a value written meanwhile) and
/// answer with what Redis now holds. Returns the reply and the TTL under
/// which L1 may keep it (zero: not at all).
pub async fn fill(
    td: &super::Tdengine,
    target: &Target,
    key: &Bytes,
    proto: u8,
    keep: Option<&Keep>,
) -> (ReplyResult, Option<Duration>) {
    use crate::config::TdOnError;
    use crate::tdengine::Fetch;
    let nil = || Reply {
        bytes: protocol::nil(proto == 3),
        kind: ReplyKind::Nil,
    };
    match td.fetch(key).await {
        Fetch::Rows { value, ttl } => {
            let reply = Reply {
                bytes: protocol::bulk_bytes(&value),
                kind: ReplyKind::Normal,
            };
            let through_feed = keep.and_then(|k| {
                let l1_ttl = k.ttl.min(ttl);
                k.cache
                    .write_back(key, &value, ttl, &k.sig, proto, &reply.bytes, l1_ttl)
            });
            let via_feed = through_feed.is_some();
            let written = match through_feed {
                Some(rx) => match rx.await {
                    Ok(outcome) => outcome,
                    // The feed failed with the SET sent: whether it ran is
                    // unknown, and a write is never retried. TDengine's rows
                    // are the answer; L1 keeps nothing.
                    Err(_) => return (Ok(reply), Some(Duration::ZERO)),
                },
                None => {
                    let px = ttl.as_millis().max(1).to_string();
                    let set =
                        protocol::command([&b"SET"[..], key, &value, b"PX", px.as_bytes(), b"NX"]);
                    match target.send(key, set).await {
                        Ok(r) if r.kind == ReplyKind::Nil => WriteBackOutcome::Exists,
                        Ok(r) if r.kind == ReplyKind::Error => {
                            WriteBackOutcome::Refused(String::from_utf8_lossy(&r.bytes).into())
                        }
                        Ok(_) => WriteBackOutcome::Written,
                        Err(e) => return (Err(e), None),
                    }
                }
            };
            match written {
                WriteBackOutcome::Exists => {
                    // Someone wrote the key while we queried TDengine: theirs is newer.
                    let get = protocol::command([&b"GET"[..], key]);
                    (target.send(key, get).await, Some(ttl))
                }
                WriteBackOutcome::Refused(why) => {
                    warn!(error = %why.trim(), "TDengine write-back to Redis refused; answering from TDengine without caching");
                    (Ok(reply), Some(Duration::ZERO))
                }
                // Through the feed, L1 has it already; through the pool, the
                // SET's own invalidation is on its way: the caller's ticket
                // decides.
                WriteBackOutcome::Written if via_feed => (Ok(reply), Some(Duration::ZERO)),
                WriteBackOutcome::Written => (Ok(reply), Some(ttl)),
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

/// Is this RESP-encoded element a nil (`$-1` in RESP2, `_` in RESP3)?
fn is_nil_element(e: &[u8]) -> bool {
    e == b"$-1\r\n" || e == b"_\r\n"
}

/// MGET's third tier: `keys` are the keys sent upstream and `elements` the
/// raw (RESP-encoded) elements of Redis's reply, in the same order. Every nil
/// element whose key has a TDengine route is replaced by what [`fill`]
/// answers for it (rows written back with `SET PX NX`, a nil, or an error
/// element per `on_error`/`on_invalid_key`); the fills run concurrently, and
/// a key's TDengine query is shared with concurrent fetches of it. Other
/// elements are returned unchanged. If the lengths differ nothing is filled.
///
/// Each element comes with its cap on how long L1 may keep
/// it: `None` for elements left as Redis sent them (the key's policy TTL
/// applies), `Some(ttl)` for filled ones (store for `min(ttl, policy TTL)`;
/// `Some(ZERO)`: do not store, e.g. an error element or a nil that only
/// stands for a TDengine failure). `keep[i]` (if given) is where element
/// `i` goes in L1 (see [`Keep`]).
pub async fn fill_mget_elements(
    td: &super::Tdengine,
    target: &Target,
    keys: &[Bytes],
    elements: Vec<Bytes>,
    proto: u8,
    keep: &[Option<Keep>],
) -> Vec<(Bytes, Option<Duration>)> {
    if keys.len() != elements.len() {
        return elements.into_iter().map(|e| (e, None)).collect();
    }
    let jobs = keys
        .iter()
        .zip(elements)
        .enumerate()
        .map(|(i, (key, element))| async move {
            if !is_nil_element(&element) || !td.matches(key) {
                return (element, None);
            }
            let keep = keep.get(i).and_then(Option::as_ref);
            match fill(td, target, key, proto, keep).await {
                (Ok(reply), cap) if reply.kind != ReplyKind::Error => {
                    (reply.bytes, Some(cap.unwrap_or(Duration::ZERO)))
                }
                (Ok(reply), _) => (reply.bytes, Some(Duration::ZERO)),
                (Err(e), _) => (protocol::error(&e.to_reply_text()), Some(Duration::ZERO)),
            }
        });
    futures::future::join_all(jobs).await
}
