//! A client's keyspace-event subscriptions with a Redis Cluster upstream.
//! A node publishes keyspace and keyevent notifications (`__keyspace@0__:k`,
//! `__keyevent@0__:set`) for its own keys, and only to its own subscribers:
//! unlike PUBLISH, the cluster bus does not carry them. A client's
//! SUBSCRIBE / PSUBSCRIBE goes on its pinned connection to one master,
//! which answers it (confirmations, counts) and delivers its messages; so
//! that the client hears every master's events, the channels and patterns
//! that can name such a channel are also subscribed on a "mirror"
//! connection to every other master:
//!
//! - a mirror's confirmations are dropped, and of its messages only those
//!   of a keyspace or keyevent channel are passed on (any other message was
//!   published with PUBLISH, which reaches the client through its own node
//!   already: passing it on would deliver it once per master); an event,
//!   from a mirror or the pinned connection, only from the owner of its
//!   key's slot (a replica, such as a demoted master, publishes the events
//!   of what it replicates: each event once);
//! - a mirror's messages wait while a reply is owed on the pinned connection
//!   (Redis writes a subscription's confirmation before its messages);
//! - mirrors follow the slot map: while the client has such subscriptions,
//!   the masters are compared with the mirrors every [`CHECK_EVERY`]: a new
//!   master (a promoted replica, a node added) gets a mirror with every
//!   subscription subscribed again, a departed one's mirror is closed, a
//!   lost one is opened again. Events of a master between its arrival (or
//!   the loss of its mirror) and the next check are missed, as a cluster
//!   client misses them while it reconnects;
//! - they are closed with the client's last such subscription, on RESET
//!   and when the client goes.

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::debug;

use super::session::Session;
use crate::protocol;
use crate::upstream::{Login, PinnedConn, PinnedFrame};

/// How often the mirrors are compared with the map's masters.
const CHECK_EVERY: Duration = Duration::from_secs(1);

const KEY_EVENT_PREFIXES: [&[u8]; 2] = [b"__keyspace@", b"__keyevent@"];

/// Is this a channel Redis publishes keyspace or keyevent notifications on?
fn is_key_event_channel(channel: &[u8]) -> bool {
    KEY_EVENT_PREFIXES.iter().any(|p| channel.starts_with(p))
}

/// The key a message on a keyspace or keyevent channel is about (the
/// channel's end after `__keyspace@<db>__:`, or the keyevent message's
/// payload); `None` for any other frame.
fn event_key(frame: &[u8]) -> Option<Bytes> {
    let parts = protocol::reply_strings(frame)?;
    let (channel, payload) = match parts.first().map(|w| &w[..]) {
        Some(b"message") => (parts.get(1)?, parts.get(2)?),
        Some(b"pmessage") => (parts.get(2)?, parts.get(3)?),
        _ => return None,
    };
    let after_db = |prefix: &[u8]| -> Option<usize> {
        let rest = channel.strip_prefix(prefix)?;
        Some(prefix.len() + rest.windows(3).position(|w| w == b"__:")? + 3)
    };
    if let Some(at) = after_db(b"__keyspace@") {
        return Some(channel.slice(at..));
    }
    after_db(b"__keyevent@").map(|_| payload.clone())
}

/// Can this pattern match a keyspace or keyevent channel? Judged by its
/// literal start (up to its first special character): `*`, `__key*__:*`
/// and `__keyspace@0__:quote:*` can, `news.*` cannot.
fn pattern_may_name_key_events(pattern: &[u8]) -> bool {
    let literal = pattern
        .iter()
        .position(|b| matches!(b, b'*' | b'?' | b'[' | b'\\'))
        .map_or(pattern, |at| &pattern[..at]);
    KEY_EVENT_PREFIXES
        .iter()
        .any(|p| p.starts_with(literal) || literal.starts_with(p))
}

/// The mirrors of one client (see the module docs).
#[derive(Default)]
pub(super) struct KeyspaceMirrors {
    channels: Vec<Bytes>,
    patterns: Vec<Bytes>,
    mirrors: Vec<Mirror>,
    /// Messages waiting for the replies owed before them.
    held: VecDeque<Bytes>,
    held_bytes: usize,
    next_check: Option<Instant>,
    /// The mirror polled first (so a busy one cannot starve the others).
    turn: usize,
}

struct Mirror {
    node: String,
    conn: PinnedConn,
}

impl KeyspaceMirrors {
    fn wanted(&self) -> bool {
        !self.channels.is_empty() || !self.patterns.is_empty()
    }

    pub fn has_links(&self) -> bool {
        !self.mirrors.is_empty()
    }

    /// When the mirrors are next compared with the map.
    pub fn next_due(&self) -> Option<Instant> {
        self.next_check
    }

    /// Output held back, counted against the client's output limit.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The next frame from any mirror, with the mirror's node.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<(String, Option<PinnedFrame>)> {
        super::shard::poll_in_turn(cx, &mut self.mirrors, &mut self.turn, |m| {
            (&m.node, &mut m.conn)
        })
    }

    /// Notes what a (P)(UN)SUBSCRIBE does to the mirrored subscriptions;
    /// returns the command the mirrors get (none: nothing of it concerns them).
    fn apply(&mut self, name: &[u8], args: &[Bytes]) -> Option<Vec<Bytes>> {
        let (set, subscribe) = match name {
            b"SUBSCRIBE" => (&mut self.channels, true),
            b"UNSUBSCRIBE" => (&mut self.channels, false),
            b"PSUBSCRIBE" => (&mut self.patterns, true),
            b"PUNSUBSCRIBE" => (&mut self.patterns, false),
            _ => return None,
        };
        let pattern = name.ends_with(b"PSUBSCRIBE");
        let mut command = vec![Bytes::copy_from_slice(name)];
        if subscribe {
            for a in args {
                let mirrored = match pattern {
                    true => pattern_may_name_key_events(a),
                    false => is_key_event_channel(a),
                };
                if mirrored && !set.contains(a) {
                    set.push(a.clone());
                    command.push(a.clone());
                }
            }
        } else if args.is_empty() {
            if set.is_empty() {
                return None;
            }
            set.clear();
        } else {
            for a in args {
                if let Some(at) = set.iter().position(|s| s == a) {
                    set.swap_remove(at);
                    command.push(a.clone());
                }
            }
        }
        (command.len() > 1 || !subscribe && args.is_empty()).then_some(command)
    }

    /// What a new mirror is sent: every mirrored subscription.
    fn replay(&self) -> Vec<u8> {
        let mut out = BytesMut::new();
        for (name, set) in [
            (&b"SUBSCRIBE"[..], &self.channels),
            (b"PSUBSCRIBE", &self.patterns),
        ] {
            if !set.is_empty() {
                let mut args = vec![Bytes::from_static(name)];
                args.extend(set.iter().cloned());
                protocol::encode_command(&mut out, &args);
            }
        }
        out.to_vec()
    }
}

impl Session {
    /// A (P)(UN)SUBSCRIBE was written on the pinned connection: the mirrors
    /// follow (opened with the first mirrored subscription, closed with the
    /// last).
    pub(super) async fn mirror_subscription(&mut self, name: &[u8], args: &[Bytes]) {
        if self.sidecar.cluster.is_none() || self.state.in_multi() {
            return;
        }
        let Some(command) = self.keyspace.apply(name, args) else {
            return;
        };
        if !self.keyspace.wanted() {
            self.mirrors_reset();
            return;
        }
        let mut request = BytesMut::new();
        protocol::encode_command(&mut request, &command);
        let mut lost = Vec::new();
        for m in &mut self.keyspace.mirrors {
            if m.conn.write(&request).await.is_err() {
                lost.push(m.node.clone());
            }
        }
        for node in lost {
            self.mirror_lost(&node);
        }
        self.sync_mirrors().await;
    }

    /// Makes the mirrors those of the map's masters other than the pinned
    /// connection's node; a new one gets every mirrored subscription.
    pub(super) async fn sync_mirrors(&mut self) {
        let Some(router) = self.sidecar.cluster.clone() else {
            return;
        };
        if !self.keyspace.wanted() {
            self.mirrors_reset();
            return;
        }
        self.keyspace.next_check = Some(Instant::now() + CHECK_EVERY);
        let Some(topology) = router.view().current() else {
            return;
        };
        let pinned_node = self.pinned.as_ref().and_then(|p| p.node.clone());
        let masters: Vec<String> = topology
            .masters()
            .iter()
            .filter(|m| Some(m.as_str()) != pinned_node.as_deref())
            .cloned()
            .collect();
        let departed: Vec<String> = self
            .keyspace
            .mirrors
            .iter()
            .filter(|m| !masters.contains(&m.node))
            .map(|m| m.node.clone())
            .collect();
        for node in departed {
            self.mirror_close(&node);
        }
        for node in masters {
            if self.keyspace.mirrors.iter().any(|m| m.node == node) {
                continue;
            }
            let opened = self
                .sidecar
                .upstream
                .pinned
                .acquire_at(Some(&node), self.proto, &Login::Configured)
                .await;
            let mut conn = match opened {
                Ok(conn) => conn,
                Err(e) => {
                    debug!(client = self.info.id, %node, error = %e, "keyspace mirror not opened; next check");
                    continue;
                }
            };
            if let Err(e) = conn.write(&self.keyspace.replay()).await {
                debug!(client = self.info.id, %node, error = %e, "keyspace mirror lost at once; next check");
                continue;
            }
            self.keyspace.mirrors.push(Mirror { node, conn });
        }
    }

    /// Is this frame from the pinned connection a keyspace event to drop
    /// (see [`Session::delivers_event`])?
    pub(super) fn pinned_event_dropped(&self, reply: &crate::protocol::Reply) -> bool {
        if !self.keyspace.wanted() || !self.state.out_of_band(reply) {
            return false;
        }
        let node = self.pinned.as_ref().and_then(|p| p.node.clone());
        match (node, event_key(&reply.bytes)) {
            (Some(node), Some(key)) => !self.delivers_event(&node, &key),
            _ => false,
        }
    }

    /// Is `node` the one to deliver an event of `key`? The owner of the
    /// key's slot in nearcache's map: each event is then delivered once,
    /// although a replica publishes the events of the writes it replicates
    /// (a master demoted by a failover still holds the client's
    /// subscription), and although the map may name an old master for a
    /// while (a `MOVED` moves one slot at a time).
    fn delivers_event(&self, node: &str, key: &[u8]) -> bool {
        let Some(router) = &self.sidecar.cluster else {
            return true;
        };
        router
            .owner(crate::upstream::cluster::slots::slot(key))
            .as_deref()
            == Some(node)
    }

    /// A frame from `node`'s mirror (`None`: the mirror ended).
    pub(super) fn on_mirror_frame(&mut self, node: String, frame: Option<PinnedFrame>) {
        let reply = match frame {
            Some(PinnedFrame::Reply(r)) => r,
            Some(PinnedFrame::Closed(_)) | None => return self.mirror_lost(&node),
        };
        // Confirmations (the pinned connection gives the client its own),
        // errors and pongs are dropped, and so is what was PUBLISHed.
        let Some(key) = event_key(&reply.bytes) else {
            return;
        };
        if !self.delivers_event(&node, &key) {
            return;
        }
        let bytes = super::shard::in_protocol(reply.bytes, self.proto == 3);
        self.keyspace.held_bytes += bytes.len();
        self.keyspace.held.push_back(bytes);
        self.settle_mirrors();
    }

    /// Writes the mirrors' held messages once no pinned reply is owed.
    pub(super) fn settle_mirrors(&mut self) {
        if self.keyspace.held.is_empty() || self.replies.awaiting_pinned() {
            return;
        }
        self.replies.collect_now();
        while let Some(bytes) = self.keyspace.held.pop_front() {
            self.keyspace.held_bytes -= bytes.len();
            self.replies.out.extend_from_slice(&bytes);
        }
    }

    fn mirror_lost(&mut self, node: &str) {
        debug!(client = self.info.id, %node, "keyspace mirror lost; opened again at the next check");
        self.keyspace.mirrors.retain(|m| m.node != node);
    }

    fn mirror_close(&mut self, node: &str) {
        if let Some(at) = self.keyspace.mirrors.iter().position(|m| m.node == node) {
            let m = self.keyspace.mirrors.swap_remove(at);
            self.sidecar.upstream.pinned.release(m.conn, false);
        }
    }

    /// Closes every mirror and forgets the mirrored subscriptions.
    pub(super) fn mirrors_reset(&mut self) {
        for m in std::mem::take(&mut self.keyspace.mirrors) {
            self.sidecar.upstream.pinned.release(m.conn, false);
        }
        self.keyspace = KeyspaceMirrors::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_of_an_event() {
        let frame = |parts: &[&str]| {
            let items: Vec<Bytes> = parts
                .iter()
                .map(|p| protocol::bulk_bytes(p.as_bytes()))
                .collect();
            protocol::push(false, &items)
        };
        let key = |f: Bytes| event_key(&f).map(|k| String::from_utf8(k.to_vec()).unwrap());
        assert_eq!(
            key(frame(&["message", "__keyspace@0__:a:b", "set"])).as_deref(),
            Some("a:b")
        );
        assert_eq!(
            key(frame(&["pmessage", "*", "__keyspace@12__:k", "del"])).as_deref(),
            Some("k")
        );
        assert_eq!(
            key(frame(&["message", "__keyevent@0__:set", "k1"])).as_deref(),
            Some("k1")
        );
        assert_eq!(
            key(frame(&[
                "pmessage",
                "__key*",
                "__keyevent@0__:expired",
                "k2"
            ]))
            .as_deref(),
            Some("k2")
        );
        assert_eq!(key(frame(&["message", "news", "hi"])), None);
        assert_eq!(key(frame(&["psubscribe", "*", ":1"])), None);
    }

    #[test]
    fn which_channels_and_patterns_are_mirrored() {
        for (pattern, mirrored) in [
            ("*", true),
            ("__key*__:*", true),
            ("__keyspace@0__:quote:*", true),
            ("__keyevent@0__:set", true),
            ("_?key*", true),
            ("[_]*", true),
            ("news.*", false),
            ("__kez*", false),
            ("", true),
        ] {
            assert_eq!(
                pattern_may_name_key_events(pattern.as_bytes()),
                mirrored,
                "{pattern}"
            );
        }
        assert!(is_key_event_channel(b"__keyspace@0__:k"));
        assert!(is_key_event_channel(b"__keyevent@0__:set"));
        assert!(!is_key_event_channel(b"__key*__:*"));
        assert!(!is_key_event_channel(b"news"));
    }

    #[test]
    fn subscriptions_are_followed_and_only_mirrored_ones_sent() {
        let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
        let mut k = KeyspaceMirrors::default();
        assert_eq!(k.apply(b"SUBSCRIBE", &[b("news")]), None);
        assert_eq!(
            k.apply(b"SUBSCRIBE", &[b("news"), b("__keyevent@0__:set")]),
            Some(vec![b("SUBSCRIBE"), b("__keyevent@0__:set")])
        );
        assert_eq!(
            k.apply(b"SUBSCRIBE", &[b("__keyevent@0__:set")]),
            None,
            "already"
        );
        assert_eq!(
            k.apply(b"PSUBSCRIBE", &[b("*"), b("n*")]),
            Some(vec![b("PSUBSCRIBE"), b("*")])
        );
        assert!(k.wanted());
        assert_eq!(k.apply(b"UNSUBSCRIBE", &[b("news")]), None);
        assert_eq!(k.apply(b"PUNSUBSCRIBE", &[]), Some(vec![b("PUNSUBSCRIBE")]));
        assert_eq!(k.apply(b"PUNSUBSCRIBE", &[]), None, "nothing left");
        assert_eq!(
            k.replay(),
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$18\r\n__keyevent@0__:set\r\n".to_vec()
        );
        assert_eq!(
            k.apply(b"UNSUBSCRIBE", &[b("__keyevent@0__:set")]),
            Some(vec![b("UNSUBSCRIBE"), b("__keyevent@0__:set")])
        );
        assert!(!k.wanted());
    }
}
