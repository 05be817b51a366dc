//! Shard channels (SSUBSCRIBE / SUNSUBSCRIBE) with a Redis Cluster
//! upstream. A shard channel lives on the master that owns its slot, and
//! that master drops it with an unasked `sunsubscribe` when the slot leaves
//! it (Redis 7.0 does so at `CLUSTER SETSLOT … NODE` and when a failover
//! takes the slot). So a client's shard channels live on connections of
//! their own, one per node ("links", from the pinned pool and counted
//! against its cap, closed when no channel is left on them), apart from
//! its pinned connection:
//!
//! - SSUBSCRIBE goes to the owner of its slot; channels of several slots in
//!   one command get `CROSSSLOT`, as from a node. A node answering `MOVED`
//!   (the map was stale) gets the command sent on to the node it names.
//! - An unasked `sunsubscribe` is not passed on: the slot map is refreshed
//!   and the channel subscribed again at the slot's owner (a `MOVED` from
//!   the old owner leads to the new one; while the map still names the
//!   node that dropped it, nearcache waits for the map: a master demoted by
//!   a failover takes SSUBSCRIBE as its new master's replica, and the
//!   channel would stay on a replica), retried with backoff for about
//!   15 s; only if that fails does the client get the `sunsubscribe`, as a
//!   node would have sent it. As with cluster clients that re-subscribe on
//!   it (rueidis, node-redis, redis-py, StackExchange.Redis), a message
//!   published between the move and the new subscription is lost: no node
//!   has the subscriber then.
//! - Confirmations are written in the client's order with the counts one
//!   Redis gives (its shard channels on every node together), and messages
//!   from every link are merged into the client's stream, held back while
//!   a confirmation before them is still to be written.
//! - Shard channels do not pin the client: in RESP3 its other commands
//!   take their usual paths (routed by slot, L1). In RESP2 it is in
//!   pub/sub mode, as on Redis: PING is answered `pong`, commands other
//!   than the (un)subscribe family are refused with Redis's error.
//! - A link lost (the node closed it, or died: a master killed without a
//!   goodbye sends no `sunsubscribe`) is treated as a move of all its
//!   channels: they are subscribed again at their slots' owners, with the
//!   same backoff and the same 15 s before the client is told.

use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::{debug, info, warn};

use super::replies::{Owed, ShardReplies};
use super::session::{Flow, Path, Session};
use crate::error::Error;
use crate::protocol::{self, Reply, ReplyKind, Request};
use crate::upstream::cluster::slots::slot;
use crate::upstream::cluster::split::CROSSSLOT;
use crate::upstream::cluster::topology::Redirect;
use crate::upstream::{Login, PinnedConn, PinnedFrame};

/// `MOVED` replies followed for one client command before its error is returned.
const MAX_REDIRECTS: u8 = 5;
/// Attempts to subscribe a dropped channel again before the client is told.
const AGAIN_ATTEMPTS: u32 = 12;

/// The node side of a client's shard channels.
#[derive(Default)]
pub(super) struct ShardSubs {
    links: Vec<Link>,
    /// Every channel subscribed, or being subscribed, and where.
    channels: HashMap<Bytes, Reg>,
    /// Channels their node dropped, to subscribe again at the slot's owner.
    moving: Vec<Moving>,
    /// Messages waiting for the confirmations before them.
    held: VecDeque<Bytes>,
    held_bytes: usize,
    next_id: u64,
    /// The link polled first (so a busy one cannot starve the others).
    turn: usize,
}

struct Reg {
    node: String,
    /// The node confirmed it.
    live: bool,
}

struct Link {
    node: String,
    conn: PinnedConn,
    /// Commands written and not yet fully answered, in order.
    sent: VecDeque<Sent>,
}

struct Sent {
    ticket: Ticket,
    subscribe: bool,
    /// Each channel still to be confirmed, with its place in the client's command.
    parts: VecDeque<(Bytes, usize)>,
    redirects: u8,
}

#[derive(Clone, Copy, Debug)]
enum Ticket {
    /// A client's command (the id of its `ShardReplies`).
    Client(u64),
    /// nearcache subscribing a dropped channel again (attempt number).
    Again(u32),
}

struct Moving {
    channel: Bytes,
    /// A node named by `MOVED`; else the slot's owner in the map.
    to: Option<String>,
    /// The node that gave the channel up with an unasked `sunsubscribe`,
    /// and the slot's owner changes the map had counted then. While the
    /// map still names that node and has not changed the owner since, it
    /// is behind: a node demoted by a failover takes SSUBSCRIBE as a
    /// replica of the slot's new master, and the channel would stay on a
    /// replica.
    left: Option<(String, u32)>,
    attempts: u32,
    due: Instant,
}

/// What a frame from a link is.
enum Frame {
    Error(Reply),
    Confirm {
        subscribe: bool,
        channel: Option<Bytes>,
    },
    Message,
}

fn classify(r: &Reply) -> Frame {
    if r.kind == ReplyKind::Error {
        return Frame::Error(r.clone());
    }
    let subscribe = match protocol::first_word(&r.bytes).as_deref() {
        Some(b"ssubscribe") => true,
        Some(b"sunsubscribe") => false,
        _ => return Frame::Message,
    };
    let channel = protocol::reply_strings(&r.bytes).and_then(|p| p.get(1).cloned());
    Frame::Confirm { subscribe, channel }
}

/// What Redis sends for one channel of an SSUBSCRIBE / SUNSUBSCRIBE.
fn confirmation(resp3: bool, subscribe: bool, channel: Option<&Bytes>, count: usize) -> Bytes {
    let word: &[u8] = if subscribe {
        b"ssubscribe"
    } else {
        b"sunsubscribe"
    };
    protocol::push(
        resp3,
        &[
            protocol::bulk_bytes(word),
            channel.map_or_else(|| protocol::nil(resp3), |c| protocol::bulk_bytes(c)),
            protocol::integer(count as i64),
        ],
    )
}

/// A message (`smessage`: an array of bulk strings) in the client's
/// protocol: a link opened before the client's HELLO speaks the old one.
pub(super) fn in_protocol(bytes: Bytes, resp3: bool) -> Bytes {
    let want = if resp3 { b'>' } else { b'*' };
    match bytes.first() {
        Some(&b) if (b == b'*' || b == b'>') && b != want => {
            let mut out = BytesMut::from(&bytes[..]);
            out[0] = want;
            out.freeze()
        }
        _ => bytes,
    }
}

/// The next frame from any of a client's connections to nodes (`parts`
/// gives an item's node and connection), with that node; polled from
/// `turn` on, which then moves past the one that answered, so a busy
/// connection cannot starve the others.
pub(super) fn poll_in_turn<T>(
    cx: &mut Context<'_>,
    items: &mut [T],
    turn: &mut usize,
    parts: impl Fn(&mut T) -> (&String, &mut PinnedConn),
) -> Poll<(String, Option<PinnedFrame>)> {
    let n = items.len();
    for k in 0..n {
        let i = (*turn + k) % n;
        let (node, conn) = parts(&mut items[i]);
        if let Poll::Ready(f) = conn.frames.poll_recv(cx) {
            *turn = (i + 1) % n;
            return Poll::Ready((node.clone(), f));
        }
    }
    Poll::Pending
}

fn again_delay(attempts: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempts.min(6))).min(Duration::from_secs(2))
}

impl ShardSubs {
    pub fn has_links(&self) -> bool {
        !self.links.is_empty()
    }

    /// When the next dropped channel is to be subscribed again.
    pub fn next_due(&self) -> Option<Instant> {
        self.moving.iter().map(|m| m.due).min()
    }

    /// Has the client any shard channel (dropped ones being moved included)?
    pub fn subscribed(&self) -> bool {
        !self.channels.is_empty() || !self.moving.is_empty()
    }

    /// Output held back, counted against the client's output limit.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The next frame from any link, with the link's node.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<(String, Option<PinnedFrame>)> {
        poll_in_turn(cx, &mut self.links, &mut self.turn, |l| {
            (&l.node, &mut l.conn)
        })
    }

    fn link(&mut self, node: &str) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.node == node)
    }

    /// Forgets the channels of `parts` that `node` was subscribing and had
    /// not confirmed (a refusal or a lost link answers for them).
    fn forget_unconfirmed(&mut self, node: &str, parts: &VecDeque<(Bytes, usize)>) {
        for (ch, _) in parts {
            if self
                .channels
                .get(ch)
                .is_some_and(|r| r.node == node && !r.live)
            {
                self.channels.remove(ch);
            }
        }
    }

    fn unmove(&mut self, channel: &Bytes) -> bool {
        let before = self.moving.len();
        self.moving.retain(|m| m.channel != channel);
        self.moving.len() != before
    }

    fn again(
        &mut self,
        channel: Bytes,
        to: Option<String>,
        left: Option<(String, u32)>,
        attempts: u32,
    ) {
        let due = match to {
            Some(_) => Instant::now(),
            None => Instant::now() + again_delay(attempts),
        };
        self.moving.push(Moving {
            channel,
            to,
            left,
            attempts,
            due,
        });
    }
}

impl Session {
    /// SSUBSCRIBE / SUNSUBSCRIBE with a cluster upstream, outside MULTI
    /// (inside, Redis refuses them at EXEC, and the pinned connection
    /// takes them as before). `None`: not for the links.
    pub(super) async fn shard_route(&mut self, name: &[u8], req: &Request) -> Option<Flow> {
        let shard_cmd = matches!(name, b"SSUBSCRIBE" | b"SUNSUBSCRIBE");
        if !shard_cmd || self.state.in_multi() {
            return None;
        }
        Some(self.shard_request(name == b"SSUBSCRIBE", req).await)
    }

    /// In RESP2 a client with shard channels is in pub/sub mode, as on
    /// Redis: PING is answered `pong`, commands other than the (un)subscribe
    /// family are refused with Redis's error. (Its shard channels do not pin
    /// it, so nothing else would refuse them.) `None`: anything else.
    pub(super) fn shard_pubsub_mode(&mut self, name: &[u8], req: &Request) -> Option<Flow> {
        if self.proto != 2 || !self.shard.subscribed() || self.state.in_multi() {
            return None;
        }
        match name {
            b"SUBSCRIBE" | b"PSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" | b"SSUBSCRIBE"
            | b"SUNSUBSCRIBE" | b"QUIT" | b"RESET" => None,
            b"PING" => {
                let msg = req.args.get(1).cloned().unwrap_or_default();
                let pong =
                    protocol::array(&[protocol::bulk_bytes(b"pong"), protocol::bulk_bytes(&msg)]);
                Some(self.answer(pong))
            }
            _ => {
                let cmd = String::from_utf8_lossy(&req.args[0]).to_ascii_lowercase();
                Some(self.answer(protocol::error(&format!(
                    "ERR Can't execute '{cmd}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                ))))
            }
        }
    }

    async fn shard_request(&mut self, subscribe: bool, req: &Request) -> Flow {
        let Some(router) = self.sidecar.cluster.clone() else {
            return Flow::Next;
        };
        if !self.can_take(Path::Pinned) {
            return Flow::Stall;
        }
        let channels: Vec<Bytes> = req.args[1..].to_vec();
        if subscribe && channels.is_empty() {
            return self.answer(protocol::error(
                "ERR wrong number of arguments for 'ssubscribe' command",
            ));
        }
        // One slot per command, as a node requires.
        if channels.iter().any(|c| slot(c) != slot(&channels[0])) {
            return self.answer(protocol::error(CROSSSLOT));
        }
        self.shard.next_id += 1;
        let id = self.shard.next_id;
        let listed: Vec<Option<Bytes>> = if !channels.is_empty() {
            channels.into_iter().map(Some).collect()
        } else {
            // A bare SUNSUBSCRIBE: every shard channel the client has.
            let mut all: Vec<Bytes> = self.shard.channels.keys().cloned().collect();
            all.extend(self.shard.moving.iter().map(|m| m.channel.clone()));
            all.sort();
            all.dedup();
            if all.is_empty() {
                vec![None]
            } else {
                all.into_iter().map(Some).collect()
            }
        };
        let silent = self.silent_reply();
        self.state.shard_owe(listed.len());
        self.replies.push(
            Owed::Shard(ShardReplies::new(id, subscribe, listed.clone())),
            silent,
        );
        self.path = Some(Path::Pinned);
        // Per node, the channels it is to be asked about; the rest are answered here.
        let mut by_node: Vec<(String, Vec<(Bytes, usize)>)> = Vec::new();
        let mut here: Vec<usize> = Vec::new();
        for (i, ch) in listed.iter().enumerate() {
            let Some(ch) = ch else {
                here.push(i);
                continue;
            };
            self.shard.unmove(ch);
            let node = match (self.shard.channels.get(ch), subscribe) {
                (Some(reg), _) => Some(reg.node.clone()),
                (None, true) => router.owner(slot(ch)),
                (None, false) => None,
            };
            let node = match (node, subscribe) {
                (Some(n), _) => n,
                (None, false) => {
                    // Not subscribed at any node (or dropped and not back yet).
                    here.push(i);
                    continue;
                }
                (None, true) => {
                    let e = Error::Upstream(router.view().unknown());
                    self.shard_fail(id, e.to_reply());
                    self.settle_shard();
                    return Flow::Next;
                }
            };
            match by_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, parts)) => parts.push((ch.clone(), i)),
                None => by_node.push((node, vec![(ch.clone(), i)])),
            }
        }
        if let Some(s) = self.replies.shard(id) {
            for i in here {
                s.confirmed[i] = true;
            }
        }
        for (node, parts) in by_node {
            if let Err(e) = self
                .shard_send(&node, Ticket::Client(id), subscribe, parts, 0)
                .await
            {
                self.shard_fail(id, e.to_reply());
                break;
            }
        }
        self.settle_shard();
        Flow::Next
    }

    /// The client's command `id` failed as a whole with this error reply.
    fn shard_fail(&mut self, id: u64, error: Bytes) {
        if let Some(s) = self.replies.shard(id) {
            s.error.get_or_insert(error);
        }
    }

    /// Writes `SSUBSCRIBE` / `SUNSUBSCRIBE` of `parts` to `node`'s link
    /// (opened if need be) and notes what its replies will answer. An error
    /// is a link that could not be opened (a lost one is `shard_link_lost`).
    async fn shard_send(
        &mut self,
        node: &str,
        ticket: Ticket,
        subscribe: bool,
        parts: Vec<(Bytes, usize)>,
        redirects: u8,
    ) -> Result<(), Error> {
        if self.shard.link(node).is_none() {
            let conn = self
                .sidecar
                .upstream
                .pinned
                .acquire_at(Some(node), self.proto, &Login::Configured)
                .await?;
            self.shard.links.push(Link {
                node: node.to_string(),
                conn,
                sent: VecDeque::new(),
            });
        }
        let mut args: Vec<Bytes> = Vec::with_capacity(parts.len() + 1);
        args.push(Bytes::from_static(if subscribe {
            b"SSUBSCRIBE"
        } else {
            b"SUNSUBSCRIBE"
        }));
        for (ch, _) in &parts {
            args.push(ch.clone());
            if subscribe {
                let live = self
                    .shard
                    .channels
                    .get(ch)
                    .is_some_and(|r| r.live && r.node == node);
                self.shard.channels.insert(
                    ch.clone(),
                    Reg {
                        node: node.to_string(),
                        live,
                    },
                );
            } else {
                self.shard.channels.remove(ch);
            }
        }
        let mut request = BytesMut::new();
        protocol::encode_command(&mut request, &args);
        let Some(link) = self.shard.link(node) else {
            return Err(Error::Internal("shard link vanished".into()));
        };
        link.sent.push_back(Sent {
            ticket,
            subscribe,
            parts: parts.into(),
            redirects,
        });
        if let Err(e) = link.conn.write(&request).await {
            self.shard_link_lost(node, &e);
        }
        Ok(())
    }

    /// A frame from `node`'s link (`None`: the link ended).
    pub(super) async fn on_shard_frame(&mut self, node: String, frame: Option<PinnedFrame>) {
        let r = match frame {
            Some(PinnedFrame::Reply(r)) => r,
            Some(PinnedFrame::Closed(e)) => return self.shard_link_lost(&node, &e),
            None => {
                return self.shard_link_lost(&node, &Error::Upstream("connection closed".into()))
            }
        };
        match classify(&r) {
            Frame::Message => {
                let bytes = in_protocol(r.bytes, self.proto == 3);
                self.shard_deliver(bytes)
            }
            Frame::Error(e) => {
                let sent = self.shard.link(&node).and_then(|l| l.sent.pop_front());
                match sent {
                    Some(sent) => self.shard_refused(&node, sent, e).await,
                    None => {
                        debug!(client = self.info.id, %node, "unexpected error on a shard link")
                    }
                }
            }
            Frame::Confirm { subscribe, channel } => {
                self.shard_confirm(&node, subscribe, channel);
            }
        }
        self.shard_tidy(&node);
        self.settle_shard();
    }

    fn shard_confirm(&mut self, node: &str, subscribe: bool, channel: Option<Bytes>) {
        let Some(link) = self.shard.link(node) else {
            return;
        };
        let expected = link.sent.front().is_some_and(|s| {
            s.subscribe == subscribe && s.parts.front().map(|p| &p.0) == channel.as_ref()
        });
        if expected {
            let Some(sent) = link.sent.front_mut() else {
                return;
            };
            let ticket = sent.ticket;
            let part = sent.parts.pop_front();
            if sent.parts.is_empty() {
                link.sent.pop_front();
            }
            let Some((ch, at)) = part else { return };
            if subscribe {
                if let Some(reg) = self.shard.channels.get_mut(&ch) {
                    if reg.node == node {
                        reg.live = true;
                    }
                }
            }
            if let Ticket::Client(id) = ticket {
                if let Some(s) = self.replies.shard(id) {
                    s.confirmed[at] = true;
                }
            }
            return;
        }
        let Some(ch) = channel.filter(|_| !subscribe) else {
            debug!(client = self.info.id, %node, "unexpected confirmation on a shard link");
            return;
        };
        if self.shard.channels.get(&ch).is_none_or(|r| r.node != node) {
            // The client dropped it meanwhile (or it moved already).
            return;
        }
        // The node gave the channel up: its slot moved. The client's
        // subscription goes on at the new owner.
        info!(client = self.info.id, %node, channel = %String::from_utf8_lossy(&ch), "shard channel dropped by its node; subscribing again at the slot's owner");
        self.shard.channels.remove(&ch);
        let mut left = None;
        if let Some(router) = &self.sidecar.cluster {
            let view = router.view();
            left = Some((node.to_string(), view.owner_changes_of(slot(&ch))));
            view.refresh();
        }
        self.shard.again(ch, None, left, 0);
    }

    /// A node refused a command written to it (`MOVED`: the slot is elsewhere).
    async fn shard_refused(&mut self, node: &str, sent: Sent, error: Reply) {
        let text = error.error_text().unwrap_or_default();
        let moved = match Redirect::parse(&text, node) {
            Some(Redirect::Moved { slot, addr }) => {
                if let Some(router) = &self.sidecar.cluster {
                    router.view().moved(slot, &addr);
                }
                Some(addr)
            }
            _ => None,
        };
        if sent.subscribe {
            // Not subscribed there: forget it unless the node had confirmed it before.
            self.shard.forget_unconfirmed(node, &sent.parts);
        }
        match sent.ticket {
            Ticket::Client(id) if !sent.subscribe => {
                // The node does not serve the slot: the client has no subscription there.
                if let Some(s) = self.replies.shard(id) {
                    for (_, at) in &sent.parts {
                        s.confirmed[*at] = true;
                    }
                }
            }
            Ticket::Client(id) => match moved {
                Some(addr) if sent.redirects < MAX_REDIRECTS => {
                    let parts: Vec<(Bytes, usize)> = sent.parts.into_iter().collect();
                    if let Err(e) = self
                        .shard_send(&addr, sent.ticket, true, parts, sent.redirects + 1)
                        .await
                    {
                        self.shard_fail(id, e.to_reply());
                    }
                }
                _ => self.shard_fail(id, error.bytes),
            },
            Ticket::Again(attempts) => {
                debug!(client = self.info.id, %node, error = %text, "subscribing a moved shard channel again failed");
                for (ch, _) in sent.parts {
                    if !self.shard.channels.contains_key(&ch) {
                        self.shard.again(ch, moved.clone(), None, attempts + 1);
                    }
                }
            }
        }
    }

    /// Subscribes the dropped channels that are due at their slot's owner.
    pub(super) async fn shard_retry(&mut self) {
        let Some(router) = self.sidecar.cluster.clone() else {
            return;
        };
        let now = Instant::now();
        let (due, later): (Vec<Moving>, Vec<Moving>) = std::mem::take(&mut self.shard.moving)
            .into_iter()
            .partition(|m| m.due <= now);
        self.shard.moving = later;
        for m in due {
            if self.shard.channels.contains_key(&m.channel) {
                // Subscribed again meanwhile (the client's own SSUBSCRIBE, sent on after a MOVED).
                continue;
            }
            if m.attempts >= AGAIN_ATTEMPTS {
                warn!(client = self.info.id, channel = %String::from_utf8_lossy(&m.channel), "could not subscribe a moved shard channel again; the client is told it is unsubscribed");
                let left = self.state.shard_dropped(&m.channel);
                let push = confirmation(self.proto == 3, false, Some(&m.channel), left);
                self.shard_deliver(push);
                self.sync_details();
                continue;
            }
            // The count first: a view published after it is only newer.
            let changes = router.view().owner_changes_of(slot(&m.channel));
            let node = m.to.clone().or_else(|| router.owner(slot(&m.channel)));
            let behind = m.to.is_none()
                && m.left
                    .as_ref()
                    .is_some_and(|(left, then)| node.as_ref() == Some(left) && changes == *then);
            if behind {
                debug!(client = self.info.id, channel = %String::from_utf8_lossy(&m.channel), "the map still names the node that gave the shard channel up; waiting for its refresh");
                router.view().refresh();
                self.shard.again(m.channel, None, m.left, m.attempts + 1);
                continue;
            }
            let sent = match node {
                Some(node) => {
                    self.shard_send(
                        &node,
                        Ticket::Again(m.attempts),
                        true,
                        vec![(m.channel.clone(), 0)],
                        0,
                    )
                    .await
                }
                None => Err(Error::Upstream(router.view().unknown())),
            };
            if let Err(e) = sent {
                debug!(client = self.info.id, error = %e, "subscribing a moved shard channel again failed");
                router.view().refresh();
                self.shard.again(m.channel, None, m.left, m.attempts + 1);
            }
        }
        self.settle_shard();
    }

    /// A link is gone (the node closed it, or died: a SIGKILL failover sends
    /// no `sunsubscribe`). Its channels are subscribed again at their
    /// slot's owner, as after a move: the map is refreshed, and until a
    /// replica is promoted the attempts back off. Of what it owed, an
    /// SSUBSCRIBE fails with the error (whether the node ran it is unknown;
    /// the client may send it again), an SUNSUBSCRIBE is done (nothing is
    /// subscribed on a lost connection).
    fn shard_link_lost(&mut self, node: &str, e: &Error) {
        let Some(at) = self.shard.links.iter().position(|l| l.node == node) else {
            return;
        };
        let link = self.shard.links.swap_remove(at);
        info!(client = self.info.id, %node, error = %e, "shard link lost; subscribing its channels again at their slots' owners");
        if let Some(router) = &self.sidecar.cluster {
            router.view().refresh();
        }
        for sent in link.sent {
            if sent.subscribe {
                // Not confirmed there: not subscribed anywhere.
                self.shard.forget_unconfirmed(node, &sent.parts);
            }
            match sent.ticket {
                Ticket::Client(id) if sent.subscribe => self.shard_fail(id, e.to_reply()),
                Ticket::Client(id) => {
                    if let Some(s) = self.replies.shard(id) {
                        for (_, at) in &sent.parts {
                            s.confirmed[*at] = true;
                        }
                    }
                }
                Ticket::Again(attempts) => {
                    for (ch, _) in sent.parts {
                        if !self.shard.channels.contains_key(&ch) {
                            self.shard.again(ch, None, None, attempts + 1);
                        }
                    }
                }
            }
        }
        let lost: Vec<Bytes> = self
            .shard
            .channels
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(ch, _)| ch.clone())
            .collect();
        for ch in lost {
            self.shard.channels.remove(&ch);
            self.shard.again(ch, None, None, 0);
        }
    }

    /// A link with nothing subscribed and nothing owed is closed. (Not
    /// kept for reuse: after an unasked `sunsubscribe` was taken for the
    /// answer to the client's own, the node's answer may still be on its way.)
    fn shard_tidy(&mut self, node: &str) {
        let idle = self.shard.link(node).is_some_and(|l| l.sent.is_empty())
            && !self.shard.channels.values().any(|r| r.node == node);
        if !idle {
            return;
        }
        if let Some(at) = self.shard.links.iter().position(|l| l.node == node) {
            let link = self.shard.links.swap_remove(at);
            self.sidecar.upstream.pinned.release(link.conn, false);
        }
    }

    /// A message from a link: to the client now, unless a confirmation
    /// before it is still to be written (Redis never sends a message ahead
    /// of its channel's confirmation) or earlier messages wait.
    fn shard_deliver(&mut self, bytes: Bytes) {
        if self.replies.shard_owed() || !self.shard.held.is_empty() {
            self.shard.held_bytes += bytes.len();
            self.shard.held.push_back(bytes);
        } else {
            self.replies.collect_now();
            self.replies.out.extend_from_slice(&bytes);
        }
    }

    /// Writes what is ready: shard confirmations that reached the front
    /// get Redis's counts, in order, then held messages once no
    /// confirmation is owed.
    pub(super) fn settle_shard(&mut self) {
        let resp3 = self.proto == 3;
        let mut changed = false;
        loop {
            self.replies.collect_now();
            let Some(s) = self.replies.front_shard() else {
                break;
            };
            let bytes = match &s.error {
                Some(e) => {
                    self.state.shard_failed(s.channels.len());
                    e.clone()
                }
                None => {
                    let mut out = BytesMut::new();
                    for ch in &s.channels {
                        let n = self.state.shard_confirmed(s.subscribe, ch.as_ref());
                        out.extend_from_slice(&confirmation(resp3, s.subscribe, ch.as_ref(), n));
                    }
                    out.freeze()
                }
            };
            s.done = Some(bytes);
            changed = true;
        }
        if !self.shard.held.is_empty() && !self.replies.shard_owed() {
            for m in std::mem::take(&mut self.shard.held) {
                self.replies.out.extend_from_slice(&m);
            }
            self.shard.held_bytes = 0;
        }
        if changed {
            self.sync_details();
            if !self.state.needs_pin() && !self.replies.awaiting_pinned() {
                self.release_pinned();
            }
        }
    }

    /// RESET: the client's shard channels end with its connections.
    pub(super) fn shard_reset(&mut self) {
        for m in std::mem::take(&mut self.shard.held) {
            self.replies.out.extend_from_slice(&m);
        }
        self.shard = ShardSubs::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmations_and_messages_are_framed_as_redis_sends_them() {
        let ch = Bytes::from_static(b"orders");
        // As Redis 7.0 sends them (tests/cluster_pubsub.rs compares with a node).
        assert_eq!(
            &confirmation(false, true, Some(&ch), 2)[..],
            b"*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:2\r\n"
        );
        assert_eq!(
            &confirmation(true, false, None, 0)[..],
            b">3\r\n$12\r\nsunsubscribe\r\n_\r\n:0\r\n"
        );
        assert_eq!(
            &confirmation(false, false, None, 0)[..],
            b"*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n"
        );
        let resp3 = Bytes::from_static(b">3\r\n$8\r\nsmessage\r\n$1\r\na\r\n$1\r\nx\r\n");
        let resp2 = Bytes::from_static(b"*3\r\n$8\r\nsmessage\r\n$1\r\na\r\n$1\r\nx\r\n");
        assert_eq!(in_protocol(resp3.clone(), false), resp2);
        assert_eq!(in_protocol(resp2.clone(), true), resp3);
        assert_eq!(in_protocol(resp2.clone(), false), resp2);
        let kind = |bytes: &Bytes| {
            let r = Reply {
                bytes: bytes.clone(),
                kind: ReplyKind::Normal,
            };
            match classify(&r) {
                Frame::Message => "message".to_string(),
                Frame::Confirm { subscribe, channel } => format!("{subscribe} {channel:?}"),
                Frame::Error(_) => "error".to_string(),
            }
        };
        assert_eq!(kind(&resp3), "message");
        assert_eq!(
            kind(&confirmation(true, false, Some(&ch), 0)),
            "false Some(b\"orders\")"
        );
        assert!(kind(&confirmation(false, false, None, 0)).starts_with("false"));
        // About 15 s of retries before the client is told.
        let total: Duration = (0..AGAIN_ATTEMPTS).map(again_delay).sum();
        assert!(
            total > Duration::from_secs(10) && total < Duration::from_secs(20),
            "{total:?}"
        );
    }
}
