//! The clients of this nearcache, as CLIENT ID / LIST / INFO / KILL see
//! them. A client's id is nearcache's own (stable for the connection, and
//! what `CLIENT KILL ID` takes): the upstream connections a client's
//! commands travel on are shared or change, so their ids would not be.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::task::AtomicWaker;
use parking_lot::Mutex;

/// What CLIENT LIST shows of a client; changed rarely, by its session.
#[derive(Clone, Debug, Default)]
pub struct Details {
    pub name: Option<Bytes>,
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
    pub user: Option<Bytes>,
    pub db: u32,
    pub resp: u8,
    pub sub: usize,
    pub psub: usize,
    pub ssub: usize,
    pub multi: bool,
    pub blocked: bool,
    pub monitor: bool,
    pub tracking: bool,
}

/// One connected client.
pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub laddr: SocketAddr,
    created: Instant,
    /// Milliseconds after `created` of the last read from the client.
    last_active_ms: AtomicU64,
    pub details: Mutex<Details>,
    /// The id of the client's pinned upstream connection, or -1.
    pub upstream_id: AtomicI64,
    /// With a cluster: the node of the client's pinned connection and that
    /// connection's id there, together (ids are per node: another node
    /// may have a connection with the same id), or `None`.
    pub pinned_at: Mutex<Option<(String, i64)>>,
    /// Reply bytes waiting for the client to read them (CLIENT LIST `omem`).
    pub output: AtomicU64,
    killed: AtomicBool,
    /// Shutdown has started: the session stops reading and drains.
    draining: AtomicBool,
    /// The session's task, woken by a kill or the drain. (Looked at on
    /// every turn of the session's loop: a Notify or a watch would take a
    /// lock each time.)
    waker: AtomicWaker,
}

/// What the session is told from outside.
pub enum Signal {
    Killed,
    Drain,
}

impl ClientInfo {
    pub fn touch(&self) {
        self.last_active_ms
            .store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Starts the session's drain (shutdown).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A kill, or the drain while the session is still `reading`; for the
    /// session's own task, whose waker does not change. `registered` is the
    /// session's: a signal's wake takes the waker, so it is registered again
    /// only after one (a kill ends the session; a drain lets it go on).
    pub fn poll_signal(
        &self,
        cx: &mut std::task::Context<'_>,
        reading: bool,
        registered: &mut bool,
    ) -> std::task::Poll<Signal> {
        if !*registered {
            self.waker.register(cx.waker());
            *registered = true;
        }
        if self.is_killed() {
            std::task::Poll::Ready(Signal::Killed)
        } else if reading && self.is_draining() {
            std::task::Poll::Ready(Signal::Drain)
        } else {
            std::task::Poll::Pending
        }
    }

    /// One CLIENT LIST line (without the newline), as Redis 7.2 formats it.
    pub fn line(&self, current_cmd: Option<&str>) -> String {
        let d = self.details.lock();
        let age = self.created.elapsed().as_secs();
        let idle = age.saturating_sub(self.last_active_ms.load(Ordering::Relaxed) / 1000);
        let mut flags = String::new();
        if d.sub + d.psub + d.ssub > 0 {
            flags.push('P');
        }
        if d.multi {
            flags.push('x');
        }
        if d.blocked {
            flags.push('b');
        }
        if d.monitor {
            flags.push('O');
        }
        if d.tracking {
            flags.push('t');
        }
        if flags.is_empty() {
            flags.push('N');
        }
        let text = |b: &Option<Bytes>| {
            String::from_utf8_lossy(b.as_deref().unwrap_or_default()).into_owned()
        };
        format!(
            "id={} addr={} laddr={} fd=-1 name={} age={age} idle={idle} flags={flags} db={} sub={} psub={} ssub={} multi={} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem={} tot-mem=0 events=r cmd={} user={} redir=-1 resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            text(&d.name),
            d.db,
            d.sub,
            d.psub,
            d.ssub,
            if d.multi { 0 } else { -1 },
            self.output.load(Ordering::Relaxed),
            current_cmd.unwrap_or("NULL"),
            d.user.as_deref().map(String::from_utf8_lossy).unwrap_or("default".into()),
            d.resp.max(2),
            text(&d.lib_name),
            text(&d.lib_ver),
        )
    }
}

/// Every connected client, by id.
#[derive(Default)]
pub struct Clients {
    map: Mutex<HashMap<u64, Arc<ClientInfo>>>,
    last_id: AtomicU64,
}

impl Clients {
    pub fn register(&self, addr: SocketAddr, laddr: SocketAddr) -> Arc<ClientInfo> {
        let id = self.last_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            addr,
            laddr,
            created: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            details: Mutex::new(Details {
                resp: 2,
                ..Default::default()
            }),
            upstream_id: AtomicI64::new(-1),
            pinned_at: Mutex::new(None),
            output: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        self.map.lock().insert(id, info.clone());
        info
    }

    pub fn unregister(&self, id: u64) {
        self.map.lock().remove(&id);
    }

    pub fn count(&self) -> usize {
        self.map.lock().len()
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientInfo>> {
        self.map.lock().get(&id).cloned()
    }

    /// Every client, by id.
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.map.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// `CLIENT KILL` in both forms, answered as Redis answers it.
    pub fn kill(&self, me: u64, args: &[Bytes]) -> Bytes {
        use crate::protocol;
        // The old form: CLIENT KILL ip:port.
        if args.len() == 3 {
            let addr = String::from_utf8_lossy(&args[2]);
            let found: Vec<_> = self
                .all()
                .into_iter()
                .filter(|c| c.addr.to_string() == addr)
                .collect();
            if found.is_empty() {
                return protocol::error("ERR No such client");
            }
            found.iter().for_each(|c| c.kill());
            return protocol::ok();
        }
        let mut filters = Vec::new();
        let mut skipme = true;
        let mut i = 2;
        while i < args.len() {
            let Some(value) = args.get(i + 1) else {
                return protocol::error("ERR syntax error");
            };
            let value_text = String::from_utf8_lossy(value).into_owned();
            match args[i].to_ascii_uppercase().as_slice() {
                b"ID" => match value_text.parse::<u64>() {
                    Ok(id) if id > 0 => filters.push(Filter::Id(id)),
                    _ => return protocol::error("ERR client-id should be greater than 0"),
                },
                b"ADDR" => filters.push(Filter::Addr(value_text)),
                b"LADDR" => filters.push(Filter::Laddr(value_text)),
                b"USER" => filters.push(Filter::User(value.clone())),
                b"TYPE" => match value_text.to_ascii_lowercase().as_str() {
                    "normal" => filters.push(Filter::Pubsub(false)),
                    "pubsub" => filters.push(Filter::Pubsub(true)),
                    // nearcache's clients are never replicas or masters.
                    "master" | "slave" | "replica" => filters.push(Filter::Nothing),
                    _ => {
                        return protocol::error(&format!("ERR Unknown client type '{value_text}'"))
                    }
                },
                b"SKIPME" => match value_text.to_ascii_lowercase().as_str() {
                    "yes" => skipme = true,
                    "no" => skipme = false,
                    _ => return protocol::error("ERR syntax error"),
                },
                b"MAXAGE" => match value_text.parse::<u64>() {
                    Ok(secs) => filters.push(Filter::MaxAge(secs)),
                    Err(_) => return protocol::error("ERR syntax error"),
                },
                _ => return protocol::error("ERR syntax error"),
            }
            i += 2;
        }
        let victims: Vec<_> = self
            .all()
            .into_iter()
            .filter(|c| !(skipme && c.id == me))
            .filter(|c| filters.iter().all(|f| f.matches(c)))
            .collect();
        victims.iter().for_each(|c| c.kill());
        protocol::integer(victims.len() as i64)
    }
}

enum Filter {
    Id(u64),
    Addr(String),
    Laddr(String),
    User(Bytes),
    Pubsub(bool),
    MaxAge(u64),
    Nothing,
}

impl Filter {
    fn matches(&self, c: &ClientInfo) -> bool {
        match self {
            Filter::Id(id) => c.id == *id,
            Filter::Addr(a) => c.addr.to_string() == *a,
            Filter::Laddr(a) => c.laddr.to_string() == *a,
            Filter::User(u) => {
                let d = c.details.lock();
                d.user.as_deref().unwrap_or(b"default") == u.as_ref()
            }
            Filter::Pubsub(p) => {
                let d = c.details.lock();
                (d.sub + d.psub + d.ssub > 0) == *p
            }
            Filter::MaxAge(secs) => c.created.elapsed().as_secs() >= *secs,
            Filter::Nothing => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn kill_by_id_skips_the_caller_unless_asked() {
        let clients = Clients::default();
        let a = clients.register(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:6380".parse().unwrap(),
        );
        let v = clients.register(
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:6380".parse().unwrap(),
        );
        let kill = |me, args: &str| {
            let args: Vec<Bytes> = args.split(' ').map(b).collect();
            clients.kill(me, &args)
        };
        assert_eq!(
            &kill(a.id, &format!("CLIENT KILL ID {}", a.id))[..],
            b":0\r\n"
        );
        assert_eq!(
            &kill(a.id, &format!("CLIENT KILL ID {}", v.id))[..],
            b":1\r\n"
        );
        assert!(v.is_killed() && !a.is_killed());
        assert_eq!(
            &kill(a.id, "CLIENT KILL 127.0.0.1:9")[..],
            b"-ERR No such client\r\n"
        );
        assert_eq!(
            &kill(a.id, "CLIENT KILL TYPE bogus")[..],
            b"-ERR Unknown client type 'bogus'\r\n"
        );
        // As Redis: three arguments are the old form, whose argument is an address.
        assert_eq!(
            &kill(a.id, "CLIENT KILL ID")[..],
            b"-ERR No such client\r\n"
        );
        assert_eq!(
            &kill(a.id, "CLIENT KILL ID 1 SKIPME")[..],
            b"-ERR syntax error\r\n"
        );
        assert_eq!(
            &kill(a.id, &format!("CLIENT KILL ID {} SKIPME no", a.id))[..],
            b":1\r\n"
        );
        let line = a.line(Some("client|list"));
        assert!(line.starts_with(&format!(
            "id={} addr=127.0.0.1:1 laddr=127.0.0.1:6380 ",
            a.id
        )));
        assert!(line.contains(" cmd=client|list "));
    }
}
