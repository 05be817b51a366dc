//! What a session owes its client, strictly in request order.
//!
//! Each request leaves one [`Owed`] here: a reply that is already known (an
//! L1 hit, a local answer), one coming from a multiplexed or the control
//! connection, a fill shared with other clients, a composed answer (MGET,
//! TDengine), or replies coming from the client's pinned connection. Items
//! complete in any order; they are moved to the output buffer front first,
//! so the client sees replies in the order it sent requests. A reply owed
//! while nothing is queued goes straight to the output buffer: a pipeline
//! of hits costs no queueing at all.

use std::collections::VecDeque;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

use super::pinned::{ConnState, Effect};
use crate::cache::{FillWaiter, WriteGuard};
use crate::error::Error;
use crate::protocol::Reply;
use crate::upstream::{received, ReplyResult};

/// Replies a pinned request owes, collected as its frames arrive.
pub struct PinnedReplies {
    pub expect: usize,
    pub effect: Effect,
    got: usize,
    bytes: BytesMut,
    /// nearcache's own request (SELECT on a fresh connection): never written.
    pub internal: bool,
    /// When to ask whether the server is alive if the replies have not all
    /// come (see `upstream::Health`); none for subscriptions and MONITOR.
    pub deadline: Option<Instant>,
    /// May wait indefinitely on a live server (a blocking command,
    /// subscriptions, MONITOR).
    pub open_ended: bool,
    pub guard: Option<WriteGuard>,
}

impl PinnedReplies {
    pub fn new(expect: usize, effect: Effect, deadline: Option<Instant>) -> PinnedReplies {
        PinnedReplies {
            expect,
            effect,
            got: 0,
            bytes: BytesMut::new(),
            internal: false,
            deadline,
            open_ended: false,
            guard: None,
        }
    }

    fn complete(&self) -> bool {
        self.got >= self.expect
    }
}

/// The confirmations a client's SSUBSCRIBE / SUNSUBSCRIBE owes with a
/// cluster upstream (see `shard.rs`): one per channel, from whichever node
/// the channel lives on (or from nearcache), written with the counts a
/// single Redis would give once the item reaches the front.
pub struct ShardReplies {
    pub id: u64,
    pub subscribe: bool,
    /// In the client's order; `None`: a bare SUNSUBSCRIBE with nothing subscribed.
    pub channels: Vec<Option<Bytes>>,
    pub confirmed: Vec<bool>,
    /// The command failed at a node: this error is the whole reply, as on Redis.
    pub error: Option<Bytes>,
    /// The reply, set by the session when the item is at the front.
    pub done: Option<Bytes>,
}

impl ShardReplies {
    pub fn new(id: u64, subscribe: bool, channels: Vec<Option<Bytes>>) -> ShardReplies {
        let confirmed = vec![false; channels.len()];
        ShardReplies {
            id,
            subscribe,
            channels,
            confirmed,
            error: None,
            done: None,
        }
    }

    /// Every node has answered.
    pub fn complete(&self) -> bool {
        self.error.is_some() || self.confirmed.iter().all(|c| *c)
    }
}

pub enum Owed {
    Ready(Bytes),
    /// From the client's multiplexed connection or the control connection;
    /// the guard ends a write's in-flight marking once its reply is in.
    Upstream {
        rx: oneshot::Receiver<ReplyResult>,
        guard: Option<WriteGuard>,
    },
    Fill(FillWaiter),
    Composed(BoxFuture<'static, Bytes>),
    /// A cluster request already written to its node when it was read
    /// (redirects, if any, followed when it reaches the front).
    Eager(BoxFuture<'static, Bytes>),
    Pinned(PinnedReplies),
    Shard(ShardReplies),
}

impl Owed {
    /// May a request written at once overtake this one? Only a reply known
    /// already, or another request written at once (in order, per slot on
    /// one connection): anything else is sent when it reaches the front.
    fn lets_eager_pass(&self) -> bool {
        matches!(self, Owed::Ready(_) | Owed::Eager(_))
    }
}

struct Item {
    owed: Owed,
    /// CLIENT REPLY OFF/SKIP: the reply is consumed, never written.
    silent: bool,
}

#[derive(Default)]
pub struct Replies {
    queue: VecDeque<Item>,
    /// Bytes ready to be written to the client.
    pub out: BytesMut,
    /// A request was lost with its upstream connection (or timed out): what
    /// it sent after it must not overtake it elsewhere, so the client is
    /// closed once everything owed is written, as Redis would close it.
    pub broken: bool,
    /// Items queued that a request written at once must not overtake.
    holding: usize,
}

impl Replies {
    pub fn push(&mut self, owed: Owed, silent: bool) {
        if self.queue.is_empty() {
            if let Owed::Ready(bytes) = &owed {
                if !silent {
                    self.out.extend_from_slice(bytes);
                }
                return;
            }
        }
        if !owed.lets_eager_pass() {
            self.holding += 1;
        }
        self.queue.push_back(Item { owed, silent });
    }

    /// May a request be written to its node now, ahead of the replies
    /// owed before it? (See [`Owed::Eager`].)
    pub fn eager_may_pass(&self) -> bool {
        self.holding == 0
    }

    pub fn ready(&mut self, bytes: Bytes, silent: bool) {
        self.push(Owed::Ready(bytes), silent);
    }

    /// A reply known now, borrowed (an L1 hit): copied straight to the
    /// output when nothing is owed before it.
    pub fn ready_ref(&mut self, bytes: &[u8], silent: bool) {
        if self.queue.is_empty() {
            if !silent {
                self.out.extend_from_slice(bytes);
            }
        } else {
            self.queue.push_back(Item {
                owed: Owed::Ready(Bytes::copy_from_slice(bytes)),
                silent,
            });
        }
    }

    /// Nothing is owed that is not in the output buffer.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Moves every completed reply at the front to the output buffer;
    /// ready when at least one moved.
    pub fn poll_collect(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut moved = false;
        while let Some(item) = self.queue.front_mut() {
            let bytes = match &mut item.owed {
                Owed::Ready(b) => std::mem::take(b),
                Owed::Upstream { rx, .. } => match rx.poll_unpin(cx) {
                    Poll::Ready(r) => self.reply_or_break(received(r)),
                    Poll::Pending => break,
                },
                Owed::Fill(w) => match w.poll_unpin(cx) {
                    Poll::Ready(Ok(r)) => r.bytes,
                    Poll::Ready(Err(e)) => e.to_reply(),
                    Poll::Pending => break,
                },
                Owed::Composed(f) | Owed::Eager(f) => match f.poll_unpin(cx) {
                    Poll::Ready(b) => b,
                    Poll::Pending => break,
                },
                Owed::Pinned(p) if p.complete() => {
                    if p.internal {
                        Bytes::new()
                    } else {
                        p.bytes.split().freeze()
                    }
                }
                Owed::Pinned(_) => break,
                Owed::Shard(s) => match s.done.take() {
                    Some(b) => b,
                    None => break,
                },
            };
            let Some(item) = self.queue.pop_front() else {
                break;
            };
            if !item.owed.lets_eager_pass() {
                self.holding -= 1;
            }
            if let Owed::Upstream { guard: Some(g), .. } = item.owed {
                // The write is done: its keys are invalidated again before
                // the client can see the reply.
                drop(g);
            }
            if !item.silent {
                self.out.extend_from_slice(&bytes);
            }
            moved = true;
        }
        if moved {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// [`Replies::poll_collect`] without waiting.
    pub fn collect_now(&mut self) {
        let _ = self.poll_collect(&mut Context::from_waker(futures::task::noop_waker_ref()));
    }

    fn reply_or_break(&mut self, r: ReplyResult) -> Bytes {
        match r {
            Ok(reply) => reply.bytes,
            Err(e) => {
                self.broken = true;
                e.to_reply()
            }
        }
    }

    /// A frame from the pinned connection: the next reply owed on it, or a
    /// message to pass on now (after every reply before the owed one).
    pub fn pinned_frame(&mut self, reply: Reply, state: &mut ConnState) {
        self.collect_now();
        let owed = self.queue.iter_mut().find_map(|i| match &mut i.owed {
            Owed::Pinned(p) if !p.complete() => Some(p),
            _ => None,
        });
        match owed {
            Some(p) if !state.out_of_band(&reply) => {
                state.on_reply(&p.effect, &reply);
                p.got += 1;
                p.bytes.extend_from_slice(&reply.bytes);
            }
            _ => self.out.extend_from_slice(&reply.bytes),
        }
    }

    /// Is a reply owed by the pinned connection?
    pub fn awaiting_pinned(&self) -> bool {
        self.queue
            .iter()
            .any(|i| matches!(&i.owed, Owed::Pinned(p) if !p.complete()))
    }

    /// Is a reply owed that may never come (a blocking command, subscriptions)?
    pub fn awaiting_open_ended(&self) -> bool {
        self.queue.iter().any(|i| match &i.owed {
            Owed::Pinned(p) => !p.complete() && p.open_ended,
            Owed::Shard(s) => s.done.is_none(),
            _ => false,
        })
    }

    /// The shard confirmations `id` owes (see `shard.rs`).
    pub fn shard(&mut self, id: u64) -> Option<&mut ShardReplies> {
        self.queue.iter_mut().find_map(|i| match &mut i.owed {
            Owed::Shard(s) if s.id == id => Some(s),
            _ => None,
        })
    }

    /// The shard confirmations at the front, once every node has answered
    /// and before they are written.
    pub fn front_shard(&mut self) -> Option<&mut ShardReplies> {
        match self.queue.front_mut().map(|i| &mut i.owed) {
            Some(Owed::Shard(s)) if s.done.is_none() && s.complete() => Some(s),
            _ => None,
        }
    }

    /// Are shard confirmations still to be written?
    pub fn shard_owed(&self) -> bool {
        self.queue.iter().any(|i| matches!(i.owed, Owed::Shard(_)))
    }

    /// Are the pinned replies overdue at `now` all open-ended ones (a
    /// blocking command held by a live server is not late)?
    pub fn overdue_open_ended_only(&self, now: Instant) -> bool {
        self.queue.iter().all(|i| match &i.owed {
            Owed::Pinned(p) if !p.complete() && p.deadline.is_some_and(|d| d <= now) => {
                p.open_ended
            }
            _ => true,
        })
    }

    /// The earliest deadline of a pinned reply still owed.
    pub fn pinned_deadline(&self) -> Option<Instant> {
        self.queue
            .iter()
            .filter_map(|i| match &i.owed {
                Owed::Pinned(p) if !p.complete() => p.deadline,
                _ => None,
            })
            .min()
    }

    /// The server proved alive while pinned replies were late: they get
    /// `until` before the next check (deadlines still ahead are kept).
    pub fn extend_pinned_deadlines(&mut self, now: Instant, until: Instant) {
        for item in self.queue.iter_mut() {
            if let Owed::Pinned(p) = &mut item.owed {
                let late = !p.complete() && p.deadline.is_some_and(|d| d <= now);
                if late {
                    p.deadline = Some(until);
                }
            }
        }
    }

    /// The pinned connection is gone (or timed out): every reply it owes
    /// becomes `err`, and the client is to be closed.
    pub fn pinned_lost(&mut self, err: &Error) {
        let reply = err.to_reply();
        for item in self.queue.iter_mut() {
            if let Owed::Pinned(p) = &mut item.owed {
                while !p.complete() {
                    p.got += 1;
                    p.bytes.extend_from_slice(&reply);
                }
            }
        }
        self.broken = true;
    }
}
