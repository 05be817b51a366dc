//! Redis Sentinel: which server is the master of a `redis-sentinel://`
//! upstream, and noticing when that changes.
//!
//! Resolution follows Redis's Sentinel client guidelines. The Sentinels are
//! asked in turn, each within `upstream.sentinel.timeout`, for
//! `SENTINEL get-master-addr-by-name`; the address one names is connected to
//! and must answer `ROLE` with `master` (a Sentinel with a stale view names a
//! replica: it is passed over and the next one asked); the Sentinel whose
//! answer held moves to the front of the list. Every reconnect resolves
//! again; reconnects that lost their connections at the same time share one
//! resolution that started after they did.
//!
//! This module owns the *switch epoch*, a counter on a watch channel. Every
//! connection is opened in an epoch and closes when the epoch moves on:
//! pool, control, pinned and feed connections all watch it, and the feed
//! empties L1 when it does. The epoch moves when the master moved:
//! - a `+switch-master` message for our master, from the Sentinel we stay
//!   subscribed to (the earliest word of a failover);
//! - a resolution that confirms another address than the one connections
//!   were opened to (a failover whose message we missed);
//! - a `-READONLY` reply from the master (it was demoted) when a fresh
//!   resolution then finds the master elsewhere, or cannot confirm any.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::connector::{Connected, Connector, Login};
use crate::config::{SentinelConfig, SentinelUrl};
use crate::error::Error;
use crate::metrics;
use crate::net::{self, Backoff, BoxStream, FrameReader, TlsConnector};
use crate::protocol::{self, ReplyKind};

/// How often the subscription to a Sentinel is checked with a PING: a
/// Sentinel that vanished without a FIN would otherwise leave us deaf to
/// failovers until the next reconnect.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Rounds of "connect to the confirmed master, else resolve" before a
/// connect gives up (a round is repeated only when a switch was announced
/// meanwhile or another resolution finished first).
const ROUNDS: usize = 3;

/// A master address some resolution confirmed with `ROLE`.
struct Confirmed {
    addr: String,
    /// When the resolution that confirmed it started: a reconnect needs one
    /// that started after it lost its connection.
    asked_at: Instant,
}

#[derive(Default)]
struct State {
    /// The last confirmed master, while nothing says it is stale.
    confirmed: Option<Confirmed>,
    /// The master the connections of the current epoch were opened to (kept
    /// when `confirmed` is forgotten, to tell a resolution that finds a new
    /// master from one that finds the old one again).
    master: Option<String>,
}

/// The Sentinels of one master, and what they last told us.
pub struct Sentinel {
    master_name: String,
    /// `host:port` of each Sentinel; the one whose answer held last in front.
    sentinels: Mutex<Vec<String>>,
    /// The Sentinels' own login: (user, password).
    auth: Option<(Option<String>, String)>,
    timeout: Duration,
    tls: Option<TlsConnector>,
    state: Mutex<State>,
    /// One resolution at a time: reconnects that come together share it. A
    /// tokio mutex, held across the resolution on purpose (it is the single
    /// flight); every step in it has its own timeout.
    resolving: tokio::sync::Mutex<()>,
    switches: Arc<watch::Sender<u64>>,
    /// Poked by connections that got `-READONLY`.
    readonly: Arc<Notify>,
}

/// Why a resolution did not produce a connection.
enum Failure {
    /// Worth another round at once (a switch was announced meanwhile).
    Again(Error),
    /// The error for the caller.
    Final(Error),
}

/// Why the master is checked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Check {
    /// A new subscription: a failover may have happened while we were not listening.
    Subscribed,
    /// A connection got `-READONLY`: the server we write to is no master any more.
    Readonly,
}

impl Sentinel {
    pub(super) fn new(
        url: &SentinelUrl,
        cfg: &SentinelConfig,
        tls: Option<TlsConnector>,
        switches: Arc<watch::Sender<u64>>,
    ) -> Sentinel {
        Sentinel {
            master_name: url.master_name.clone(),
            sentinels: Mutex::new(url.sentinels.clone()),
            auth: cfg.password.clone().map(|p| (cfg.username.clone(), p)),
            timeout: cfg.timeout,
            tls,
            state: Mutex::new(State::default()),
            resolving: tokio::sync::Mutex::new(()),
            switches,
            readonly: Arc::new(Notify::new()),
        }
    }

    /// The current switch epoch (how many switches were acted on).
    pub fn epoch(&self) -> u64 {
        *self.switches.borrow()
    }

    /// The master connections are opened to now, if one is known.
    pub fn master(&self) -> Option<String> {
        self.state.lock().master.clone()
    }

    /// The Sentinels in the order they will be asked.
    pub fn sentinels(&self) -> Vec<String> {
        self.sentinels.lock().clone()
    }

    /// What a connection pokes when the master answers `-READONLY`.
    pub(super) fn readonly_hook(&self) -> Arc<Notify> {
        self.readonly.clone()
    }

    /// A connection to the master. With `since`, only a master confirmed by
    /// a resolution that started after `since` will do (a reconnect passes
    /// when it lost its connection); without, the last confirmed one is
    /// tried first (a new connection while nothing is known to be wrong).
    /// `dial` connects to an address and checks `ROLE`.
    pub(super) async fn connect<F, Fut>(
        &self,
        mut since: Option<Instant>,
        dial: F,
    ) -> Result<Connected, Error>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Connected, Error>>,
    {
        let mut last = None;
        for _ in 0..ROUNDS {
            let epoch = self.epoch();
            if let Some(addr) = self.confirmed_since(since) {
                match dial(addr.clone()).await {
                    Ok(mut c) if self.epoch() == epoch => {
                        c.epoch = epoch;
                        return Ok(c);
                    }
                    Ok(_) => {
                        last = Some(Error::Upstream(
                            "the master changed while connecting".into(),
                        ))
                    }
                    Err(e @ Error::Refused(_)) => return Err(e),
                    Err(e) => {
                        self.forget(&addr);
                        last = Some(e);
                    }
                }
                // That address is not good enough any more: resolve afresh.
                since = Some(Instant::now());
            }
            let _flight = self.resolving.lock().await;
            // Someone resolved while we waited for our turn, after we lost our connection.
            if self.confirmed_since(since).is_some() {
                continue;
            }
            match self.resolve(&dial).await {
                Ok(c) => return Ok(c),
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::Again(e)) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Upstream("no master confirmed".into())))
    }

    fn confirmed_since(&self, since: Option<Instant>) -> Option<String> {
        let st = self.state.lock();
        let c = st.confirmed.as_ref()?;
        since
            .is_none_or(|s| c.asked_at >= s)
            .then(|| c.addr.clone())
    }

    /// The confirmed master failed a connection: the next one resolves.
    fn forget(&self, addr: &str) {
        let mut st = self.state.lock();
        if st.confirmed.as_ref().is_some_and(|c| c.addr == addr) {
            st.confirmed = None;
        }
    }

    /// Asks the Sentinels in turn and connects to the first master named
    /// that `ROLE` confirms.
    async fn resolve<F, Fut>(&self, dial: &F) -> Result<Connected, Failure>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Connected, Error>>,
    {
        let epoch = self.epoch();
        let asked_at = Instant::now();
        let order = self.sentinels();
        let mut problems = Vec::new();
        let (mut unreachable, mut unknown) = (0, 0);
        for sentinel in &order {
            let addr = match self.ask(sentinel).await {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    unknown += 1;
                    problems.push(format!("{sentinel}: does not know it"));
                    continue;
                }
                Err(e) => {
                    unreachable += 1;
                    problems.push(format!("{sentinel}: {}", reason(&e)));
                    continue;
                }
            };
            match dial(addr.clone()).await {
                Ok(mut c) => {
                    let Some(epoch) = self.confirm(&addr, epoch, asked_at) else {
                        return Err(Failure::Again(Error::Upstream(
                            "a failover was announced while resolving the master".into(),
                        )));
                    };
                    self.to_front(sentinel);
                    c.epoch = epoch;
                    return Ok(c);
                }
                // A client's own login, refused by the master: not a Sentinel matter.
                Err(e @ Error::Refused(_)) => return Err(Failure::Final(e)),
                Err(e) => {
                    debug!(%sentinel, master = %addr, error = %e, "master named by a Sentinel rejected");
                    problems.push(format!("{sentinel} named {addr}: {}", reason(&e)));
                }
            }
        }
        let name = &self.master_name;
        let text = if unreachable == order.len() {
            format!(
                "no Sentinel reachable for master {name:?} ({})",
                problems.join("; ")
            )
        } else if unknown == order.len() {
            format!("no Sentinel knows master {name:?}")
        } else {
            format!(
                "no Sentinel named a usable master for {name:?} ({})",
                problems.join("; ")
            )
        };
        Err(Failure::Final(Error::Upstream(text)))
    }

    /// Records a master that `ROLE` confirmed; returns the epoch connections
    /// to it belong to, or `None` if a switch was announced since the
    /// resolution began (its answer may predate the failover).
    fn confirm(&self, addr: &str, epoch: u64, asked_at: Instant) -> Option<u64> {
        let mut st = self.state.lock();
        if self.epoch() != epoch {
            return None;
        }
        let moved = st
            .master
            .as_deref()
            .filter(|m| *m != addr)
            .map(String::from);
        st.master = Some(addr.to_string());
        st.confirmed = Some(Confirmed {
            addr: addr.to_string(),
            asked_at,
        });
        if let Some(old) = moved {
            // Under the state lock: the address and its epoch change together.
            self.bump(&format!(
                "the Sentinels name {addr} as the master now (was {old})"
            ));
        }
        Some(self.epoch())
    }

    /// A `+switch-master` for our master: connections to `from` close now.
    fn announced(&self, from: &str, to: &str) {
        let mut st = self.state.lock();
        if st.master.as_deref() == Some(to) {
            // A resolution got there first and already switched.
            return;
        }
        st.confirmed = None;
        st.master = Some(to.to_string());
        self.bump(&format!("+switch-master from {from} to {to}"));
    }

    /// The master cannot be confirmed after it refused a write: stop using it.
    fn lost(&self, why: &str) {
        let mut st = self.state.lock();
        st.confirmed = None;
        st.master = None;
        self.bump(why);
    }

    fn bump(&self, why: &str) {
        self.switches.send_modify(|e| *e += 1);
        metrics::get().upstream_failovers_total.inc();
        warn!(master = %self.master_name, epoch = self.epoch(), "{why}: closing every connection to the old master and emptying L1");
    }

    fn to_front(&self, sentinel: &str) {
        let mut list = self.sentinels.lock();
        if let Some(i) = list.iter().position(|s| s == sentinel) {
            let s = list.remove(i);
            list.insert(0, s);
        }
    }

    /// Connects to a Sentinel and logs in; `commands` are pipelined after
    /// the AUTH. Returns the connection and the replies to `commands`.
    async fn open(
        &self,
        sentinel: &str,
        commands: &[&[&[u8]]],
    ) -> Result<(FrameReader<BoxStream>, Vec<protocol::Reply>), Error> {
        let stream = net::connect(sentinel, self.tls.as_ref(), self.timeout).await?;
        let mut conn = FrameReader::new(stream, BytesMut::new());
        let mut out = BytesMut::new();
        if let Some((user, pass)) = &self.auth {
            let mut auth: Vec<Bytes> = vec![Bytes::from_static(b"AUTH")];
            if let Some(user) = user {
                auth.push(Bytes::copy_from_slice(user.as_bytes()));
            }
            auth.push(Bytes::copy_from_slice(pass.as_bytes()));
            protocol::encode_command(&mut out, &auth);
        }
        for c in commands {
            out.extend_from_slice(&protocol::command(c.iter().copied()));
        }
        conn.write(&out).await?;
        if self.auth.is_some() {
            let r = conn.next().await?;
            if let Some(text) = r.error_text() {
                return Err(Error::Upstream(format!("AUTH refused: {text}")));
            }
        }
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(conn.next().await?);
        }
        Ok((conn, replies))
    }

    /// `SENTINEL get-master-addr-by-name` on one Sentinel: the master's
    /// `host:port`, or `None` if it does not know the name.
    async fn ask(&self, sentinel: &str) -> Result<Option<String>, Error> {
        let name = self.master_name.as_bytes();
        let work = async {
            let (_, replies) = self
                .open(
                    sentinel,
                    &[&[b"SENTINEL", b"get-master-addr-by-name", name]],
                )
                .await?;
            master_addr(&replies[0])
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::Upstream(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Subscribes to `+switch-master` on the first Sentinel in the list
    /// that answers; returns which one and the subscribed connection.
    async fn subscribe(&self) -> Result<(String, FrameReader<BoxStream>), Error> {
        let mut problems = Vec::new();
        for sentinel in self.sentinels() {
            let work = self.open(&sentinel, &[&[b"SUBSCRIBE", b"+switch-master"]]);
            let r = match tokio::time::timeout(self.timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(Error::Upstream(format!(
                    "no answer within {:?}",
                    self.timeout
                ))),
            };
            match r {
                Ok((conn, replies)) => match replies[0].error_text() {
                    None => return Ok((sentinel, conn)),
                    Some(e) => problems.push(format!("{sentinel}: SUBSCRIBE refused: {e}")),
                },
                Err(e) => problems.push(format!("{sentinel}: {}", reason(&e))),
            }
        }
        Err(Error::Upstream(format!(
            "no Sentinel to subscribe to ({})",
            problems.join("; ")
        )))
    }

    /// Runs until `shutdown`: stays subscribed to `+switch-master` on a
    /// Sentinel (the one whose answer held last), acts on the messages for
    /// our master, and checks the master when a connection got `-READONLY`.
    pub(super) async fn watch(self: Arc<Self>, connector: Connector, shutdown: Arc<Notify>) {
        let mut backoff = Backoff::new(connector.config().reconnect_backoff_max);
        let mut failing = false;
        loop {
            match self.subscribe().await {
                Ok((sentinel, conn)) => {
                    // Subscribed first, then checked: a switch in between is
                    // caught by one or the other.
                    let confirmed = self.check(&connector, Check::Subscribed).await;
                    backoff.reset();
                    failing = false;
                    // Only after a confirmed answer: without one the front
                    // Sentinel stays where it was, and moving would be a
                    // loop of subscriptions with no pause.
                    if confirmed && self.sentinels().first() != Some(&sentinel) {
                        // The check's answer came from another Sentinel (this
                        // one may have a stale view): listen to that one.
                        debug!(%sentinel, "moving the +switch-master subscription to the Sentinel that answered");
                        continue;
                    }
                    info!(%sentinel, master = %self.master_name, "subscribed to +switch-master");
                    match self.listen(conn, &connector, &shutdown).await {
                        Ok(()) => return,
                        Err(e) => {
                            warn!(%sentinel, error = %e, "lost the +switch-master subscription; subscribing again")
                        }
                    }
                }
                Err(e) if !failing => {
                    warn!(error = %e, "cannot subscribe to +switch-master; retrying");
                    failing = true;
                }
                Err(e) => debug!(error = %e, "still no Sentinel to subscribe to"),
            }
            let pause = tokio::time::sleep(backoff.step());
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    _ = self.readonly.notified() => { self.check(&connector, Check::Readonly).await; }
                    _ = shutdown.notified() => return,
                }
            }
        }
    }

    /// Reads the subscription until it fails (`Err`) or `shutdown` (`Ok`).
    async fn listen(
        &self,
        mut conn: FrameReader<BoxStream>,
        connector: &Connector,
        shutdown: &Notify,
    ) -> Result<(), Error> {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        let mut ping_owed = false;
        loop {
            tokio::select! {
                frame = conn.next() => {
                    let frame = frame?;
                    if let Some(m) = switch_message(&frame.bytes) {
                        if m.name == self.master_name {
                            self.announced(&m.from, &m.to);
                        }
                    } else if protocol::first_word(&frame.bytes).as_deref() == Some(b"pong") {
                        // The PING's answer in subscribed mode: [pong, ""].
                        ping_owed = false;
                    }
                }
                _ = keepalive.tick() => {
                    if ping_owed {
                        return Err(Error::Upstream(format!("the Sentinel did not answer a PING within {KEEPALIVE:?}")));
                    }
                    conn.write(&protocol::command([b"PING"])).await?;
                    ping_owed = true;
                }
                _ = self.readonly.notified() => { self.check(connector, Check::Readonly).await; }
                _ = shutdown.notified() => return Ok(()),
            }
        }
    }

    /// A fresh resolution, which moves the epoch on if the master moved.
    /// After `-READONLY`, a master that cannot be confirmed at all is
    /// dropped too: the server we were writing to is no master.
    /// Returns whether a master was confirmed.
    async fn check(&self, connector: &Connector, why: Check) -> bool {
        let before = self.master();
        let r = connector
            .connect_since(2, &Login::Configured, false, Some(Instant::now()))
            .await;
        match r {
            Ok(c) => {
                if why == Check::Readonly && before.as_deref() == Some(c.addr.as_str()) {
                    debug!(master = %c.addr, "a READONLY reply, but ROLE and the Sentinels still say master");
                }
                true
            }
            Err(e) if why == Check::Readonly => {
                self.lost(&format!(
                    "the master answered READONLY and no master can be confirmed ({})",
                    reason(&e)
                ));
                false
            }
            Err(e) => {
                debug!(error = %e, ?why, "master check failed");
                false
            }
        }
    }
}

/// An error's text without the "upstream unavailable: " every one starts with.
fn reason(e: &Error) -> String {
    match e {
        Error::Upstream(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `host:port` from a `get-master-addr-by-name` reply (`[ip, port]` or nil).
fn master_addr(reply: &protocol::Reply) -> Result<Option<String>, Error> {
    if let Some(text) = reply.error_text() {
        return Err(Error::Upstream(format!("Sentinel error: {text}")));
    }
    if reply.kind == ReplyKind::Nil {
        return Ok(None);
    }
    let bad =
        || Error::UpstreamProtocol("a get-master-addr-by-name reply that is no [ip, port]".into());
    let parts = protocol::reply_strings(&reply.bytes).ok_or_else(bad)?;
    let [host, port] = parts.as_slice() else {
        return Err(bad());
    };
    let host = std::str::from_utf8(host).map_err(|_| bad())?;
    let port: u16 = std::str::from_utf8(port)
        .ok()
        .and_then(|p| p.parse().ok())
        .ok_or_else(bad)?;
    Ok(Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }))
}

struct SwitchMessage {
    name: String,
    from: String,
    to: String,
}

/// `message +switch-master "<name> <old ip> <old port> <new ip> <new port>"`.
fn switch_message(bytes: &[u8]) -> Option<SwitchMessage> {
    let parts = protocol::reply_strings(bytes)?;
    let [kind, channel, payload] = parts.as_slice() else {
        return None;
    };
    if kind.as_ref() != b"message" || channel.as_ref() != b"+switch-master" {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let [name, old_ip, old_port, new_ip, new_port] = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .try_into()
        .ok()?;
    let addr = |ip: &str, port: &str| {
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    Some(SwitchMessage {
        name: name.to_string(),
        from: addr(old_ip, old_port),
        to: addr(new_ip, new_port),
    })
}

/// Completes at the next switch (never, when there will be none).
pub async fn next_switch(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &'static [u8], kind: ReplyKind) -> protocol::Reply {
        protocol::Reply {
            bytes: Bytes::from_static(bytes),
            kind,
        }
    }

    #[test]
    fn master_addresses_are_read() {
        let r = reply(
            b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6379\r\n",
            ReplyKind::Normal,
        );
        assert_eq!(master_addr(&r).unwrap().as_deref(), Some("127.0.0.1:6379"));
        let r = reply(b"*2\r\n$3\r\n::1\r\n$4\r\n6379\r\n", ReplyKind::Normal);
        assert_eq!(master_addr(&r).unwrap().as_deref(), Some("[::1]:6379"));
        assert_eq!(
            master_addr(&reply(b"*-1\r\n", ReplyKind::Nil)).unwrap(),
            None
        );
        assert!(master_addr(&reply(b"-ERR no\r\n", ReplyKind::Error)).is_err());
        assert!(master_addr(&reply(b"*1\r\n$1\r\nx\r\n", ReplyKind::Normal)).is_err());
        assert!(master_addr(&reply(b"*2\r\n$1\r\nh\r\n$1\r\nx\r\n", ReplyKind::Normal)).is_err());
    }

    #[test]
    fn switch_messages_are_read() {
        let payload = "mymaster 127.0.0.1 6379 ::1 6380";
        let frame = format!(
            "*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n${}\r\n{payload}\r\n",
            payload.len()
        );
        let m = switch_message(frame.as_bytes()).unwrap();
        assert_eq!(
            (m.name.as_str(), m.from.as_str(), m.to.as_str()),
            ("mymaster", "127.0.0.1:6379", "[::1]:6380")
        );
        // A subscription confirmation and a PONG are not switches.
        assert!(
            switch_message(b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n").is_none()
        );
        assert!(switch_message(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n").is_none());
    }
}
