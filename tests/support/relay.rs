//! A TCP relay between nearcache and a real redis-server, with controls the
//! tests drive:
//! - hold one connection's bytes in one direction from a pattern on until
//!   released (so the test decides when Redis executes a request, or when
//!   nearcache gets its reply);
//! - black-hole everything without closing (a network cut), or mute what
//!   Redis sends on the connections that sent a given command (a feed that
//!   silently stops);
//! - cut connections (all, or all but those that sent a given command), and
//!   send new connections to another server (a failover behind one address);
//! - rewrite a reply (so a test can deliver a frame Redis itself cannot
//!   produce, such as a 100,000-deep array).
//!
//! It forwards bytes only; it never answers for Redis.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a relayed connection has sent towards Redis (its first bytes: the
/// handshake and the subscriptions that tell a feed from a pool
/// connection), and whether it was cut.
struct Conn {
    head: Mutex<Vec<u8>>,
    cut: AtomicBool,
}

const HEAD: usize = 8192;

impl Conn {
    fn sent(&self, pattern: &[u8]) -> bool {
        find(&self.head.lock().unwrap(), pattern).is_some()
    }
}

#[derive(Default)]
struct State {
    /// Bytes in one direction (true: towards Redis) from the first
    /// occurrence of this pattern on are held.
    hold: Option<(bool, Vec<u8>)>,
    /// Set when a connection started holding.
    holding: bool,
    /// Drop all traffic both ways, keep the sockets open.
    blackhole: bool,
    /// Drop what Redis sends on connections that sent one of these.
    mute: Vec<Vec<u8>>,
    /// Downstream-bound replacements (bytes from Redis → bytes to nearcache).
    rewrites: Vec<(Vec<u8>, Vec<u8>)>,
    conns: Vec<Arc<Conn>>,
}

struct Ctl {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    accepted: AtomicUsize,
    host: String,
    upstream: AtomicU16,
}

pub struct Relay {
    pub port: u16,
    ctl: Arc<Ctl>,
}

impl Relay {
    /// Relays 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Relay {
        Relay::start_to("127.0.0.1", upstream)
    }

    /// Relays 127.0.0.1:`port` (returned) to `host`:`upstream`.
    pub fn start_to(host: &str, upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let ctl = Arc::new(Ctl {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            host: host.to_string(),
            upstream: AtomicU16::new(upstream),
        });
        let c = ctl.clone();
        std::thread::spawn(move || {
            while !c.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        down.set_nonblocking(false).unwrap();
                        let target = c.upstream.load(Ordering::Relaxed);
                        let Ok(up) = TcpStream::connect((c.host.as_str(), target)) else {
                            continue;
                        };
                        c.accepted.fetch_add(1, Ordering::Relaxed);
                        down.set_nodelay(true).ok();
                        up.set_nodelay(true).ok();
                        let conn = Arc::new(Conn {
                            head: Mutex::new(Vec::new()),
                            cut: AtomicBool::new(false),
                        });
                        c.state.lock().unwrap().conns.push(conn.clone());
                        let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                        spawn_pump(c.clone(), conn.clone(), d2, u2, true);
                        spawn_pump(c.clone(), conn, up, down, false);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Relay { port, ctl }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.ctl.accepted.load(Ordering::Relaxed)
    }

    /// Holds a connection's upstream-bound bytes from `pattern` on (the
    /// request does not reach Redis), until [`Relay::release`].
    pub fn hold_requests_from(&self, pattern: &[u8]) {
        let mut s = self.ctl.state.lock().unwrap();
        s.hold = Some((true, pattern.to_vec()));
        s.holding = false;
    }

    /// Holds a connection's bytes from Redis from `pattern` on (Redis has
    /// executed the request, nearcache does not have its reply yet), until
    /// [`Relay::release`].
    pub fn hold_replies_from(&self, pattern: &[u8]) {
        let mut s = self.ctl.state.lock().unwrap();
        s.hold = Some((false, pattern.to_vec()));
        s.holding = false;
    }

    /// Waits until some connection is holding (the pattern was seen).
    pub fn wait_holding(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut s = self.ctl.state.lock().unwrap();
        while !s.holding {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the relay never saw the pattern to hold");
            s = self.ctl.changed.wait_timeout(s, left).unwrap().0;
        }
    }

    pub fn release(&self) {
        let mut s = self.ctl.state.lock().unwrap();
        s.hold = None;
        s.holding = false;
        self.ctl.changed.notify_all();
    }

    /// Drops all traffic both ways without closing anything (a network cut), or ends it.
    pub fn blackhole(&self, on: bool) {
        self.ctl.state.lock().unwrap().blackhole = on;
    }

    /// From now on, drops everything Redis sends on connections that sent
    /// `pattern` (they stay open: a peer that silently stops talking).
    pub fn mute_replies_of(&self, pattern: &[u8]) {
        self.ctl.state.lock().unwrap().mute.push(pattern.to_vec());
    }

    /// Closes every relayed connection (new ones are accepted).
    pub fn cut(&self) {
        self.cut_where(|_| true);
    }

    /// Closes every relayed connection except those that sent `pattern`.
    pub fn cut_except(&self, pattern: &[u8]) {
        self.cut_where(|c| !c.sent(pattern));
    }

    fn cut_where(&self, pick: impl Fn(&Conn) -> bool) {
        let mut s = self.ctl.state.lock().unwrap();
        s.conns.retain(|c| {
            if pick(c) {
                c.cut.store(true, Ordering::Relaxed);
                false
            } else {
                true
            }
        });
        self.ctl.changed.notify_all();
    }

    /// New connections go to the same host's `port` from now on (existing ones stay).
    pub fn retarget(&self, port: u16) {
        self.ctl.upstream.store(port, Ordering::Relaxed);
    }

    /// Replaces `from` with `to` in everything Redis sends.
    pub fn rewrite_reply(&self, from: &[u8], to: Vec<u8>) {
        self.ctl
            .state
            .lock()
            .unwrap()
            .rewrites
            .push((from.to_vec(), to));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::Relaxed);
        self.cut();
        self.release();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `buf` that is a proper prefix of `pattern`.
fn partial_suffix(buf: &[u8], pattern: &[u8]) -> usize {
    (1..pattern.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf.ends_with(&pattern[..n]))
        .unwrap_or(0)
}

/// Applies the rewrites to what Redis sent; keeps back a tail that may be
/// the start of a pattern.
fn rewrite(pending: &mut Vec<u8>, rewrites: &[(Vec<u8>, Vec<u8>)], out: &mut Vec<u8>) {
    loop {
        let hit = rewrites
            .iter()
            .filter_map(|(f, t)| find(pending, f).map(|at| (at, f.len(), t)))
            .min_by_key(|h| h.0);
        match hit {
            Some((at, len, replacement)) => {
                out.extend(pending.drain(..at));
                pending.drain(..len);
                out.extend_from_slice(replacement);
            }
            None => break,
        }
    }
    let keep = rewrites
        .iter()
        .map(|(f, _)| partial_suffix(pending, f))
        .max()
        .unwrap_or(0);
    out.extend(pending.drain(..pending.len() - keep));
}

fn spawn_pump(
    ctl: Arc<Ctl>,
    conn: Arc<Conn>,
    mut from: TcpStream,
    mut to: TcpStream,
    upstream_bound: bool,
) {
    std::thread::spawn(move || {
        from.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if conn.cut.load(Ordering::Relaxed) || ctl.stop.load(Ordering::Relaxed) {
                break;
            }
            match from.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    pending.extend_from_slice(&chunk[..n]);
                    if upstream_bound {
                        let mut head = conn.head.lock().unwrap();
                        let room = HEAD.saturating_sub(head.len()).min(n);
                        head.extend_from_slice(&chunk[..room]);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
            if pending.is_empty() {
                continue;
            }
            let mut out = Vec::new();
            {
                let mut s = ctl.state.lock().unwrap();
                let muted = !upstream_bound && s.mute.iter().any(|p| conn.sent(p));
                if s.blackhole || muted {
                    pending.clear();
                    continue;
                }
                let hold = s.hold.clone().filter(|(dir, _)| *dir == upstream_bound);
                if let Some((_, p)) = hold {
                    match find(&pending, &p) {
                        Some(at) => {
                            out.extend(pending.drain(..at));
                            if to.write_all(&out).is_err() {
                                break;
                            }
                            out.clear();
                            s.holding = true;
                            ctl.changed.notify_all();
                            while s.hold.is_some() && !conn.cut.load(Ordering::Relaxed) {
                                s = ctl.changed.wait(s).unwrap();
                            }
                        }
                        None => {
                            let keep = partial_suffix(&pending, &p);
                            out.extend(pending.drain(..pending.len() - keep));
                            drop(s);
                            if !out.is_empty() && to.write_all(&out).is_err() {
                                break;
                            }
                            continue;
                        }
                    }
                }
                if upstream_bound {
                    out.append(&mut pending);
                } else {
                    rewrite(&mut pending, &s.rewrites, &mut out);
                }
            }
            if !out.is_empty() && to.write_all(&out).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
