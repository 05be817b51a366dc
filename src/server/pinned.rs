//! The state that lives on a client's own upstream connection, kept in
//! step with Redis: transaction, WATCH, subscriptions, MONITOR, a blocking
//! command in flight, the database, tracking, and a login as another user.
//! Every transition is here: [`ConnState::prepare`] when a request is sent
//! (so the requests after it take the right path at once), and
//! [`ConnState::on_reply`] when its replies arrive (so a refused command
//! changes nothing). The client keeps the connection exactly while
//! [`ConnState::needs_pin`] holds; then it goes back to the pool of idle
//! pinned connections.
//!
//! Inside MULTI a SELECT only takes effect if EXEC runs the transaction:
//! DISCARD, an aborted EXEC and EXECABORT leave the database as it was.

use std::collections::HashSet;

use bytes::Bytes;

use crate::command::Keys;
use crate::protocol::{self, Reply, ReplyKind};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SubKind {
    Channel,
    Pattern,
    Shard,
}

fn sub_word(word: &[u8]) -> Option<(SubKind, bool)> {
    Some(match word {
        b"subscribe" => (SubKind::Channel, true),
        b"unsubscribe" => (SubKind::Channel, false),
        b"psubscribe" => (SubKind::Pattern, true),
        b"punsubscribe" => (SubKind::Pattern, false),
        b"ssubscribe" => (SubKind::Shard, true),
        b"sunsubscribe" => (SubKind::Shard, false),
        _ => return None,
    })
}

/// How many in-band replies a request produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Count(usize),
    /// UNSUBSCRIBE-family without arguments: one per subscription of that kind, at least one.
    UnsubscribeAll(SubKind),
}

/// What a request's replies do to the connection state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    Select(u32),
    /// Queued inside MULTI (a SELECT is noted for EXEC).
    Queued,
    Multi,
    /// The transaction ended when EXEC was sent; its SELECT takes effect
    /// if it ran.
    Exec {
        select: Option<u32>,
    },
    Discard,
    Watch {
        was: bool,
    },
    Unwatch,
    Blocking,
    Subscribe,
    Monitor,
    Tracking {
        was: bool,
    },
    NoTouch {
        was: bool,
    },
}

#[derive(Debug, Default)]
struct Multi {
    select: Option<u32>,
    /// Keys the queued writes touch: invalidated when EXEC runs.
    keys: Vec<Bytes>,
    all_keys: bool,
}

#[derive(Debug)]
pub struct ConnState {
    default_db: u32,
    db: u32,
    multi: Option<Multi>,
    watching: bool,
    subs: [HashSet<Bytes>; 3],
    /// Subscribe-family confirmations still to come.
    confirmations_owed: usize,
    /// With a cluster upstream shard channels live on links of their own
    /// (`shard.rs`), not on the pinned connection: they do not pin it.
    shard_apart: bool,
    /// Shard confirmations still to come from those links.
    shard_owed: usize,
    monitor: bool,
    blocking: usize,
    tracking: bool,
    no_touch: bool,
    /// Logged in as a user other than nearcache's own.
    pub foreign: bool,
}

fn kind_index(k: SubKind) -> usize {
    match k {
        SubKind::Channel => 0,
        SubKind::Pattern => 1,
        SubKind::Shard => 2,
    }
}

impl ConnState {
    pub fn new(default_db: u32) -> ConnState {
        ConnState {
            default_db,
            db: default_db,
            multi: None,
            watching: false,
            subs: Default::default(),
            confirmations_owed: 0,
            shard_apart: false,
            shard_owed: 0,
            monitor: false,
            blocking: 0,
            tracking: false,
            no_touch: false,
            foreign: false,
        }
    }

    /// Does the client need its own connection for what it asked so far?
    pub fn needs_pin(&self) -> bool {
        self.blocking > 0 || self.needs_pin_beyond_blocking()
    }

    /// Does it need it for more than blocking commands in flight (which
    /// end by themselves)?
    pub fn needs_pin_beyond_blocking(&self) -> bool {
        self.db != self.default_db
            || self.multi.is_some()
            || self.watching
            || self.pinned_subscriptions() > 0
            || self.confirmations_owed > 0
            || self.monitor
            || self.tracking
            || self.no_touch
            || self.foreign
    }

    /// With a cluster upstream: may the client's other commands run on
    /// another connection (the pinned node would answer `MOVED` for another
    /// node's key)? Yes with subscriptions, WATCH or blocking commands in
    /// flight, and NO-TOUCH (such a command then touches its key: the
    /// price of never a redirect); not with tracking (reads register their
    /// keys) or MONITOR, which a cluster refuses anyway.
    pub fn others_may_go_elsewhere(&self) -> bool {
        !(self.tracking || self.monitor)
    }

    /// Is NO-TOUCH all that lives on the connection (blocking commands in
    /// flight aside, which end by themselves)? Then, with a cluster, the
    /// connection may be swapped for one to another node with NO-TOUCH set
    /// again there.
    pub fn no_touch_only(&self) -> bool {
        self.no_touch
            && self.multi.is_none()
            && !self.watching
            && self.pinned_subscriptions() == 0
            && self.confirmations_owed == 0
            && !self.monitor
            && !self.tracking
            && !self.foreign
            && self.db == self.default_db
    }

    pub fn no_touch(&self) -> bool {
        self.no_touch
    }

    pub fn watching(&self) -> bool {
        self.watching
    }

    pub fn db(&self) -> u32 {
        self.db
    }

    pub fn in_multi(&self) -> bool {
        self.multi.is_some()
    }

    pub fn subscriptions(&self) -> usize {
        self.subs.iter().map(|s| s.len()).sum()
    }

    /// Subscriptions that live on the pinned connection.
    fn pinned_subscriptions(&self) -> usize {
        let shard = if self.shard_apart {
            0
        } else {
            self.subs[2].len()
        };
        self.subs[0].len() + self.subs[1].len() + shard
    }

    /// Shard channels are kept on links of their own (a cluster upstream).
    pub fn keep_shard_apart(&mut self) {
        self.shard_apart = true;
    }

    pub fn subscription_counts(&self) -> [usize; 3] {
        [self.subs[0].len(), self.subs[1].len(), self.subs[2].len()]
    }

    pub fn monitoring(&self) -> bool {
        self.monitor
    }

    pub fn blocked(&self) -> bool {
        self.blocking > 0
    }

    pub fn tracking(&self) -> bool {
        self.tracking
    }

    /// A request is about to be written to the pinned connection: returns
    /// how many replies it will produce and what they will do, and makes
    /// the transitions that decide where the following requests go.
    /// `keys`: what the request writes; `blocking`: it may block.
    pub fn prepare(
        &mut self,
        name: &[u8],
        args: &[Bytes],
        keys: &Keys,
        blocking: bool,
    ) -> (Expect, Effect) {
        let n = args.len().saturating_sub(1);
        let sub = |s: &[u8]| -> Option<(SubKind, bool)> { sub_word(&s.to_ascii_lowercase()) };
        if let Some(multi) = &mut self.multi {
            if !matches!(name, b"EXEC" | b"DISCARD" | b"MULTI" | b"WATCH" | b"RESET") {
                match keys {
                    Keys::All => multi.all_keys = true,
                    Keys::Some(k) => multi.keys.extend(k.iter().cloned()),
                    Keys::None => {}
                }
                if name == b"SELECT" {
                    // (Refused when queued, it aborts the transaction: EXEC
                    // will not run it.)
                    if let Some(db) = args.get(1).and_then(|d| parse_db(d)) {
                        multi.select = Some(db);
                    }
                }
                return (Expect::Count(1), Effect::Queued);
            }
        }
        let effect = match name {
            b"MULTI" => {
                self.multi.get_or_insert_with(Multi::default);
                Effect::Multi
            }
            b"EXEC" | b"DISCARD" => {
                // Requests written after them are outside the transaction,
                // though their reply has not come yet (a pipeline).
                let ended = self.multi.take();
                if ended.is_some() {
                    self.watching = false;
                }
                match name {
                    b"EXEC" => Effect::Exec {
                        select: ended.and_then(|m| m.select),
                    },
                    _ => Effect::Discard,
                }
            }
            b"WATCH" => {
                let was = self.watching;
                self.watching = true;
                Effect::Watch { was }
            }
            b"UNWATCH" => {
                self.watching = false;
                Effect::Unwatch
            }
            b"SELECT" => match args.get(1).and_then(|d| parse_db(d)) {
                Some(db) => Effect::Select(db),
                None => Effect::None,
            },
            b"MONITOR" => {
                self.monitor = true;
                Effect::Monitor
            }
            b"CLIENT" => {
                let sub = args.get(1).map(|a| a.to_ascii_uppercase());
                let on = args.get(2).map(|a| a.eq_ignore_ascii_case(b"ON"));
                match (sub.as_deref(), on) {
                    (Some(b"TRACKING"), Some(on)) => {
                        let was = self.tracking;
                        self.tracking = on;
                        Effect::Tracking { was }
                    }
                    (Some(b"NO-TOUCH"), Some(on)) => {
                        let was = self.no_touch;
                        self.no_touch = on;
                        Effect::NoTouch { was }
                    }
                    _ => Effect::None,
                }
            }
            _ if sub(name).is_some() => {
                let (kind, subscribe) = sub(name).unwrap_or((SubKind::Channel, true));
                let expect = if subscribe || n > 0 {
                    Expect::Count(n.max(1))
                } else {
                    Expect::UnsubscribeAll(kind)
                };
                self.confirmations_owed += self.count(expect);
                return (expect, Effect::Subscribe);
            }
            _ if blocking => {
                self.blocking += 1;
                Effect::Blocking
            }
            _ => Effect::None,
        };
        (Expect::Count(1), effect)
    }

    /// The number of replies `expect` stands for right now.
    pub fn count(&self, expect: Expect) -> usize {
        match expect {
            Expect::Count(n) => n,
            Expect::UnsubscribeAll(kind) => self.subs[kind_index(kind)].len().max(1),
        }
    }

    /// With a cluster upstream, shard channels live on connections of
    /// their own (`shard.rs`): `n` confirmations are owed for them.
    pub fn shard_owe(&mut self, n: usize) {
        self.shard_owed += n;
    }

    /// One shard confirmation is written to the client: the client's shard
    /// channels change as on Redis; returns how many it has now (the count
    /// Redis puts in the confirmation: shard channels only).
    pub fn shard_confirmed(&mut self, subscribe: bool, channel: Option<&Bytes>) -> usize {
        self.shard_owed = self.shard_owed.saturating_sub(1);
        let set = &mut self.subs[kind_index(SubKind::Shard)];
        if let Some(ch) = channel {
            if subscribe {
                set.insert(ch.clone());
            } else {
                set.remove(ch);
            }
        }
        set.len()
    }

    /// A shard command that owed `n` confirmations failed as a whole.
    pub fn shard_failed(&mut self, n: usize) {
        self.shard_owed = self.shard_owed.saturating_sub(n);
    }

    /// A shard channel ended without the client asking (nearcache could not
    /// subscribe it again after its slot moved); returns the shard count left.
    pub fn shard_dropped(&mut self, channel: &Bytes) -> usize {
        let set = &mut self.subs[kind_index(SubKind::Shard)];
        set.remove(channel);
        set.len()
    }

    /// Keys the transaction's queued writes touch, taken at EXEC.
    pub fn take_multi_keys(&mut self) -> Keys {
        match &mut self.multi {
            Some(m) if m.all_keys => Keys::All,
            Some(m) if !m.keys.is_empty() => Keys::Some(std::mem::take(&mut m.keys)),
            _ => Keys::None,
        }
    }

    /// One in-band reply of a request prepared with `effect` arrived.
    pub fn on_reply(&mut self, effect: &Effect, reply: &Reply) {
        let ok = reply.kind != ReplyKind::Error;
        match effect {
            Effect::None => {}
            Effect::Select(db) => {
                if ok {
                    self.db = *db;
                }
            }
            Effect::Queued | Effect::Multi | Effect::Discard => {}
            Effect::Exec { select } => {
                // An array: the transaction ran. Nil (WATCH) or an error (EXECABORT): it did not.
                let ran =
                    reply.kind == ReplyKind::Normal && matches!(reply.bytes.first(), Some(b'*'));
                if let (true, Some(db)) = (ran, select) {
                    self.db = *db;
                }
            }
            Effect::Watch { was } => {
                if !ok {
                    self.watching = *was;
                }
            }
            Effect::Unwatch => {}
            Effect::Blocking => self.blocking = self.blocking.saturating_sub(1),
            Effect::Subscribe => {
                self.confirmations_owed = self.confirmations_owed.saturating_sub(1);
                if let Some(parts) = protocol::reply_strings(&reply.bytes) {
                    if let (Some(word), Some(channel)) = (parts.first(), parts.get(1)) {
                        if let Some((kind, add)) = sub_word(word) {
                            let set = &mut self.subs[kind_index(kind)];
                            if add {
                                set.insert(channel.clone());
                            } else {
                                set.remove(channel);
                            }
                        }
                    }
                }
            }
            Effect::Monitor => {
                if !ok {
                    self.monitor = false;
                }
            }
            Effect::Tracking { was } => {
                if !ok {
                    self.tracking = *was;
                }
            }
            Effect::NoTouch { was } => {
                if !ok {
                    self.no_touch = *was;
                }
            }
        }
    }

    /// Is a frame from the pinned connection a message rather than a reply
    /// (a pub/sub message, a tracking push, MONITOR output)?
    pub fn out_of_band(&self, reply: &Reply) -> bool {
        match reply.kind {
            ReplyKind::Push => {
                protocol::first_word(&reply.bytes).is_none_or(|w| sub_word(&w).is_none())
            }
            _ if (self.subscriptions() > 0 || self.confirmations_owed > 0)
                && reply.bytes.first() == Some(&b'*') =>
            {
                protocol::first_word(&reply.bytes)
                    .is_some_and(|w| matches!(w.as_ref(), b"message" | b"pmessage" | b"smessage"))
            }
            _ if self.monitor => {
                reply.bytes.first() == Some(&b'+')
                    && reply.bytes.get(1).is_some_and(|c| c.is_ascii_digit())
            }
            _ => false,
        }
    }

    /// The connection is gone (or the client sent RESET): back to a fresh
    /// connection's state.
    pub fn reset(&mut self) {
        let apart = self.shard_apart;
        *self = ConnState::new(self.default_db);
        self.shard_apart = apart;
    }
}

fn parse_db(d: &[u8]) -> Option<u32> {
    std::str::from_utf8(d).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn reply(s: &str) -> Reply {
        let bytes = Bytes::copy_from_slice(s.as_bytes());
        let kind = match bytes[0] {
            b'-' => ReplyKind::Error,
            b'>' => ReplyKind::Push,
            b'_' => ReplyKind::Nil,
            b'*' if s.starts_with("*-1") => ReplyKind::Nil,
            _ => ReplyKind::Normal,
        };
        Reply { bytes, kind }
    }

    /// Sends a command and feeds it the given replies; returns the expectation.
    fn run(st: &mut ConnState, cmd: &str, replies: &[&str], blocking: bool) -> Expect {
        let a = args(cmd);
        let (expect, effect) = st.prepare(&a[0].to_ascii_uppercase(), &a, &Keys::None, blocking);
        for r in replies {
            st.on_reply(&effect, &reply(r));
        }
        expect
    }

    #[test]
    fn state_lasts_exactly_as_long_as_on_redis() {
        // (commands with their replies, needs a pinned connection afterwards?)
        type Step<'a> = (&'a str, &'a [&'a str]);
        let table: &[(&[Step], bool)] = &[
            (&[("MULTI", &["+OK\r\n"])], true),
            (
                &[
                    ("MULTI", &["+OK\r\n"]),
                    ("SET k v", &["+QUEUED\r\n"]),
                    ("EXEC", &["*1\r\n+OK\r\n"]),
                ],
                false,
            ),
            (&[("MULTI", &["+OK\r\n"]), ("DISCARD", &["+OK\r\n"])], false),
            (&[("WATCH k", &["+OK\r\n"])], true),
            (
                &[("WATCH k", &["+OK\r\n"]), ("UNWATCH", &["+OK\r\n"])],
                false,
            ),
            (
                &[
                    ("WATCH k", &["+OK\r\n"]),
                    ("MULTI", &["+OK\r\n"]),
                    ("EXEC", &["*-1\r\n"]),
                ],
                false,
            ),
            (
                &[(
                    "SUBSCRIBE a b",
                    &[
                        ">3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n",
                        ">3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n",
                    ],
                )],
                true,
            ),
            (
                &[
                    (
                        "SUBSCRIBE a",
                        &["*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"],
                    ),
                    (
                        "UNSUBSCRIBE",
                        &["*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:0\r\n"],
                    ),
                ],
                false,
            ),
            (&[("SELECT 3", &["+OK\r\n"])], true),
            (
                &[("SELECT 3", &["-ERR DB index is out of range\r\n"])],
                false,
            ),
            (
                &[("SELECT 3", &["+OK\r\n"]), ("SELECT 0", &["+OK\r\n"])],
                false,
            ),
            (&[("MONITOR", &["+OK\r\n"])], true),
            (&[("CLIENT TRACKING on", &["+OK\r\n"])], true),
            (&[("CLIENT TRACKING on", &["-ERR nope\r\n"])], false),
        ];
        for (steps, pinned) in table {
            let mut st = ConnState::new(0);
            for (cmd, replies) in steps.iter() {
                run(&mut st, cmd, replies, false);
            }
            assert_eq!(st.needs_pin(), *pinned, "{steps:?}");
        }
        // A blocking command: pinned while it blocks.
        let mut st = ConnState::new(0);
        let a = args("BLPOP q 0");
        let (_, effect) = st.prepare(b"BLPOP", &a, &Keys::None, true);
        assert!(st.needs_pin());
        st.on_reply(&effect, &reply("*-1\r\n"));
        assert!(!st.needs_pin());
    }

    #[test]
    fn select_inside_multi_applies_only_when_exec_runs() {
        for (end, replies, db) in [
            ("DISCARD", "+OK\r\n", 3),
            ("EXEC", "*-1\r\n", 3),
            (
                "EXEC",
                "-EXECABORT Transaction discarded because of previous errors.\r\n",
                3,
            ),
            ("EXEC", "*1\r\n+OK\r\n", 0),
        ] {
            let mut st = ConnState::new(0);
            run(&mut st, "SELECT 3", &["+OK\r\n"], false);
            run(&mut st, "MULTI", &["+OK\r\n"], false);
            run(&mut st, "SELECT 0", &["+QUEUED\r\n"], false);
            assert_eq!(st.db(), 3, "not before EXEC");
            run(&mut st, end, &[replies], false);
            assert_eq!(st.db(), db, "{end} {replies:?}");
            assert!(!st.in_multi());
        }
    }

    #[test]
    fn unsubscribe_all_expects_one_reply_per_subscription() {
        let mut st = ConnState::new(0);
        run(&mut st, "PSUBSCRIBE a* b*", &[], false);
        assert_eq!(st.confirmations_owed, 2);
        for p in ["a*", "b*"] {
            st.on_reply(
                &Effect::Subscribe,
                &reply(&format!("*3\r\n$10\r\npsubscribe\r\n$2\r\n{p}\r\n:1\r\n")),
            );
        }
        let a = args("PUNSUBSCRIBE");
        let (expect, _) = st.prepare(b"PUNSUBSCRIBE", &a, &Keys::None, false);
        assert_eq!(st.count(expect), 2);
        assert!(st.out_of_band(&reply(
            "*4\r\n$8\r\npmessage\r\n$2\r\na*\r\n$2\r\nab\r\n$1\r\nx\r\n"
        )));
        assert!(!st.out_of_band(&reply("*2\r\n$4\r\npong\r\n$0\r\n\r\n")));
        assert!(st.out_of_band(&reply(">2\r\n$10\r\ninvalidate\r\n_\r\n")));
    }
}
