//! A TCP relay between nearcache and a real redis-server (or, in the ignored
//! real-TDengine test, between the `taos` client and taosAdapter), with controls the
//! tests drive: hold the upstream-bound bytes of one connection from a given
//! request on until released (so the test decides when Redis executes it),
//! black-hole everything without closing (a network cut), cut every
//! connection, and rewrite a reply (so a test can deliver a frame Redis
//! itself cannot produce, such as a 100,000-deep array).
//!
//! It forwards bytes only; it never answers for Redis.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// Upstream-bound bytes from the first occurrence of this pattern on are held.
    hold: Option<Vec<u8>>,
    /// Set when a connection started holding.
    holding: bool,
    /// Drop all traffic both ways, keep the sockets open.
    blackhole: bool,
    /// Downstream-bound replacements (bytes from Redis → bytes to nearcache).
    rewrites: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bumped by `cut`: connections of an older generation close.
    generation: usize,
}

struct Ctl {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    accepted: AtomicUsize,
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
        let host = host.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let ctl = Arc::new(Ctl {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
        });
        let c = ctl.clone();
        std::thread::spawn(move || {
            while !c.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        down.set_nonblocking(false).unwrap();
                        let Ok(up) = TcpStream::connect((host.as_str(), upstream)) else {
                            continue;
                        };
                        c.accepted.fetch_add(1, Ordering::Relaxed);
                        down.set_nodelay(true).ok();
                        up.set_nodelay(true).ok();
                        let gen = c.state.lock().unwrap().generation;
                        spawn_pump(
                            c.clone(),
                            down.try_clone().unwrap(),
                            up.try_clone().unwrap(),
                            true,
                            gen,
                        );
                        spawn_pump(c.clone(), up, down, false, gen);
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

    /// Holds a connection's upstream-bound bytes from `pattern` on, until [`Relay::release`].
    pub fn hold_from(&self, pattern: &[u8]) {
        let mut s = self.ctl.state.lock().unwrap();
        s.hold = Some(pattern.to_vec());
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

    /// Closes every relayed connection (new ones are accepted).
    pub fn cut(&self) {
        let mut s = self.ctl.state.lock().unwrap();
        s.generation += 1;
        self.ctl.changed.notify_all();
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

fn spawn_pump(
    ctl: Arc<Ctl>,
    mut from: TcpStream,
    mut to: TcpStream,
    upstream_bound: bool,
    gen: usize,
) {
    std::thread::spawn(move || {
        from.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let alive = |ctl: &Ctl| {
            ctl.state.lock().unwrap().generation == gen && !ctl.stop.load(Ordering::Relaxed)
        };
        loop {
            if !alive(&ctl) {
                break;
            }
            match from.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
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
                if s.blackhole {
                    pending.clear();
                    continue;
                }
                if upstream_bound {
                    if let Some(p) = s.hold.clone() {
                        if let Some(at) = find(&pending, &p) {
                            out.extend(pending.drain(..at));
                            if to.write_all(&out).is_err() {
                                break;
                            }
                            out.clear();
                            s.holding = true;
                            ctl.changed.notify_all();
                            while s.hold.is_some() && s.generation == gen {
                                s = ctl.changed.wait(s).unwrap();
                            }
                        } else {
                            let keep = partial_suffix(&pending, &p);
                            out.extend(pending.drain(..pending.len() - keep));
                        }
                    }
                    if s.hold.is_none() {
                        out.append(&mut pending);
                    }
                } else {
                    loop {
                        let hit = s
                            .rewrites
                            .iter()
                            .filter_map(|(f, t)| {
                                find(&pending, f).map(|at| (at, f.len(), t.clone()))
                            })
                            .min_by_key(|h| h.0);
                        match hit {
                            Some((at, len, replacement)) => {
                                out.extend(pending.drain(..at));
                                pending.drain(..len);
                                out.extend(replacement);
                            }
                            None => break,
                        }
                    }
                    let keep = s
                        .rewrites
                        .iter()
                        .map(|(f, _)| partial_suffix(&pending, f))
                        .max()
                        .unwrap_or(0);
                    out.extend(pending.drain(..pending.len() - keep));
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
