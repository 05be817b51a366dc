//! Invalidation fan-out for scripts/fanout: what N sidecar feeds cost one Redis.
//!
//!   bench_fanout run --port P --mode tracking|keyspace|tracking+kea|tracking-loop --feeds N
//!                    [--variants cached,uncached,p1] [--secs 5] [--warmup 1]
//!                    [--symbols 5000] [--pipeline 200] [--value-size 128] [--probe-us 5000]
//!   bench_fanout report FILE...      (markdown tables from the `run` lines)
//!
//! `run` opens N plain connections set up exactly as nearcache's feed does
//! (src/cache/feed.rs, policies of conf/nearcache.toml: quote:*, ind:*, kline:*): `HELLO 3`
//! and `INFO server` pipelined, `CONFIG GET notify-keyspace-events` (what `auto` asks), then
//! - tracking: `CLIENT TRACKING ON BCAST NOLOOP PREFIX __nearcache__:canary: PREFIX ind:
//!   PREFIX kline: PREFIX quote:` on a server without keyspace events;
//! - keyspace: `PSUBSCRIBE __keyspace@0__:quote:* …:ind:* …:kline:* …:__nearcache__:canary:*`
//!   and `CLIENT TRACKING ON BCAST NOLOOP PREFIX __nearcache:flush-only__`, server at
//!   `notify-keyspace-events KEA`;
//! - tracking+kea: the tracking feed on a server that has KEA anyway (what `auto` would face
//!   if it preferred tracking where events are on);
//! - tracking-loop: tracking without NOLOOP (not what nearcache sends; shows what NOLOOP costs).
//!
//! One epoll thread reads every feed socket continuously and parses every frame (so Redis
//! never waits on a full socket); a writer thread sends SETs at full speed; a probe thread
//! writes `quote:~p:<seq>` every --probe-us, one at a time, on its own connection.
//!
//! Invalidation delay: both the probe's acknowledgement and every feed's read are stamped by
//! the kernel when the bytes reached the socket (SO_TIMESTAMPNS, CLOCK_REALTIME), so neither
//! the reader's nor the prober's scheduling on this 2-core machine is in the number:
//! delay = feed socket received the probe's key − probe socket received its +OK. It can be
//! negative: Redis may queue an invalidation before the writer's reply. The reader's own lag
//! (read time − kernel stamp) is reported separately as the check that it keeps up.
//!
//! Variants, one after the other on the same feeds:
//! - cached:   SET quote:<sym> (cycling over --symbols), --pipeline commands per batch, two
//!   batches in flight: Redis is never idle waiting for the writer.
//! - uncached: the same on lock:<sym>, which no feed tracks: the cost of filtering (no
//!   probes, so no delay).
//! - p1:       SET quote:<sym> one at a time (one connection, no pipelining), as an
//!   application without pipelining writes: one write per event-loop turn, so BCAST has
//!   nothing to batch.
//!
//! Every run is bounded: warm-up + measured window + at most 15 s of draining per variant.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ RESP

/// Parses the integer of a header line starting at `pos` (after the type byte); returns
/// (value, position after CRLF), or None when the line is not complete yet.
fn header(d: &[u8], mut pos: usize) -> Option<(i64, usize)> {
    let mut neg = false;
    let mut v: i64 = 0;
    if d.get(pos) == Some(&b'-') {
        neg = true;
        pos += 1;
    }
    loop {
        let c = *d.get(pos)?;
        if c == b'\r' {
            d.get(pos + 1)?;
            return Some((if neg { -v } else { v }, pos + 2));
        }
        v = v * 10 + (c - b'0') as i64;
        pos += 1;
    }
}

fn line_end(d: &[u8], mut pos: usize) -> Option<usize> {
    while pos + 1 < d.len() {
        if d[pos] == b'\r' {
            return Some(pos + 2);
        }
        pos += 1;
    }
    None
}

/// Skips one RESP2/RESP3 frame at `pos`, calling `bulk` for every blob string in it.
/// Returns the position after it, or None when the frame is not complete yet.
fn skip(d: &[u8], pos: usize, bulk: &mut dyn FnMut(&[u8])) -> Option<usize> {
    let t = *d.get(pos)?;
    match t {
        b'$' | b'=' | b'!' => {
            let (len, p) = header(d, pos + 1)?;
            if len < 0 {
                return Some(p);
            }
            let end = p + len as usize + 2;
            if end > d.len() {
                return None;
            }
            bulk(&d[p..p + len as usize]);
            Some(end)
        }
        b'*' | b'>' | b'~' | b'%' | b'|' => {
            let (n, mut p) = header(d, pos + 1)?;
            if n < 0 {
                return Some(p);
            }
            let n = if t == b'%' || t == b'|' { 2 * n } else { n };
            for _ in 0..n {
                p = skip(d, p, bulk)?;
            }
            // An attribute comes before the frame it describes.
            if t == b'|' {
                p = skip(d, p, bulk)?;
            }
            Some(p)
        }
        _ => line_end(d, pos + 1),
    }
}

/// Reads one whole frame (blocking); returns its type byte and bytes. Used during setup only.
fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u8, Vec<u8>)> {
    loop {
        if let Some(end) = skip(buf, 0, &mut |_| {}) {
            let frame: Vec<u8> = buf.drain(..end).collect();
            return Ok((frame[0], frame));
        }
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::Error::other("connection closed by Redis"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn call(s: &mut TcpStream, buf: &mut Vec<u8>, args: &[&[u8]]) -> Vec<u8> {
    s.write_all(&command(args)).expect("write");
    let (t, f) = read_frame(s, buf).expect("read");
    if t == b'-' || t == b'!' {
        die(&format!(
            "{} refused: {}",
            String::from_utf8_lossy(args[0]),
            String::from_utf8_lossy(&f)
        ));
    }
    f
}

fn die(msg: &str) -> ! {
    eprintln!("bench_fanout: {msg}");
    std::process::exit(1)
}

// ------------------------------------------------------------------ feeds

/// Policies of conf/nearcache.toml that cache (lock:* does not).
const PATTERNS: &[&str] = &["quote:*", "ind:*", "kline:*"];
const CANARY_PREFIX: &str = "__nearcache__:canary:";
const FLUSH_ONLY_PREFIX: &str = "__nearcache:flush-only__";
const PROBE_KEY: &[u8] = b"quote:~p:";
const PROBE_CHANNEL: &[u8] = b"__keyspace@0__:quote:~p:";

/// Opens one feed connection and subscribes it the way src/cache/feed.rs does.
fn open_feed(addr: &str, mode: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| die(&format!("connect {addr}: {e}")));
    s.set_nodelay(true).ok();
    let mut buf = Vec::new();
    // The connector's handshake: HELLO 3 and INFO server (the run_id) in one round trip.
    let mut hello = command(&[b"HELLO", b"3"]);
    hello.extend(command(&[b"INFO", b"server"]));
    s.write_all(&hello).expect("write");
    for _ in 0..2 {
        let (t, f) = read_frame(&mut s, &mut buf).expect("handshake");
        if t == b'-' || t == b'!' {
            die(&format!(
                "handshake refused: {}",
                String::from_utf8_lossy(&f)
            ));
        }
    }
    // choose_mode() under `auto`.
    call(
        &mut s,
        &mut buf,
        &[b"CONFIG", b"GET", b"notify-keyspace-events"],
    );
    if mode == "keyspace" {
        let mut args: Vec<Vec<u8>> = vec![b"PSUBSCRIBE".to_vec()];
        for p in PATTERNS
            .iter()
            .copied()
            .chain([&*format!("{CANARY_PREFIX}*")])
        {
            args.push(format!("__keyspace@0__:{p}").into_bytes());
        }
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        s.write_all(&command(&refs)).expect("write");
        for _ in 1..args.len() {
            let (t, f) = read_frame(&mut s, &mut buf).expect("psubscribe");
            if t == b'-' || t == b'!' {
                die(&format!(
                    "PSUBSCRIBE refused: {}",
                    String::from_utf8_lossy(&f)
                ));
            }
        }
        let f = call(
            &mut s,
            &mut buf,
            &[
                b"CLIENT",
                b"TRACKING",
                b"ON",
                b"BCAST",
                b"NOLOOP",
                b"PREFIX",
                FLUSH_ONLY_PREFIX.as_bytes(),
            ],
        );
        assert_eq!(
            f[0],
            b'+',
            "CLIENT TRACKING: {}",
            String::from_utf8_lossy(&f)
        );
    } else {
        let mut args: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
        if mode != "tracking-loop" {
            args.push(b"NOLOOP");
        }
        // Literal prefixes of the patterns plus the canary's, sorted as feed.rs sorts them.
        let mut prefixes: Vec<&str> = PATTERNS
            .iter()
            .map(|p| p.trim_end_matches('*'))
            .chain([CANARY_PREFIX])
            .collect();
        prefixes.sort();
        for p in &prefixes {
            args.push(b"PREFIX");
            args.push(p.as_bytes());
        }
        let f = call(&mut s, &mut buf, &args);
        assert_eq!(
            f[0],
            b'+',
            "CLIENT TRACKING: {}",
            String::from_utf8_lossy(&f)
        );
    }
    if !buf.is_empty() {
        die("unexpected bytes on a feed after setup");
    }
    s
}

/// Where a probe's key reached a feed: kernel receive stamp and when the reader saw it.
#[derive(Clone, Copy)]
struct Arrival {
    seq: u32,
    rx_ns: i64,
    seen_ns: i64,
}

#[derive(Default)]
struct FeedCounters {
    msgs: AtomicU64,
    keys: AtomicU64,
    bytes: AtomicU64,
    closed: AtomicU64,
    other_frames: AtomicU64,
}

struct Feed {
    stream: TcpStream,
    pending: Vec<u8>,
}

fn realtime_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn enable_rx_stamps(fd: i32) {
    let on: libc::c_int = 1;
    // SAFETY: a plain int option on our own socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        die("setsockopt SO_TIMESTAMPNS failed");
    }
}

/// One reader thread stands in for N sidecars that would each have their own CPU; when this
/// shared machine leaves it unscheduled for a while, the bytes should wait in the kernel,
/// stamped on arrival, not in Redis (a full socket makes Redis hold them and send them
/// later, which would put our scheduling into the measured delay and Redis' CPU). The
/// default loopback window fills in ~100 ms at the rates measured here; 4 MiB holds
/// seconds of it. SO_RCVBUFFORCE (root) passes net.core.rmem_max; memory is only used
/// by bytes actually waiting.
fn deep_receive_buffer(fd: i32) {
    let size: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a plain int option on our own socket.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// recvmsg with the kernel's receive stamp of the data read (the last segment's).
/// Returns (bytes, stamp ns or 0); bytes < 0 is -errno.
fn recv_stamped(fd: i32, buf: &mut [u8], flags: i32) -> (isize, i64) {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: zeroed msghdr is a valid empty header; we fill the pointers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        return (
            -(std::io::Error::last_os_error().raw_os_error().unwrap_or(1) as isize),
            0,
        );
    }
    let mut stamp = 0;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                stamp = ts.tv_sec * 1_000_000_000 + ts.tv_nsec;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    (n, stamp)
}

fn parse_seq(b: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    if b.is_empty() {
        return None;
    }
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

/// Local tallies of one reader turn; added to the shared counters once per epoll_wait.
#[derive(Default)]
struct Tally {
    msgs: u64,
    keys: u64,
    bytes: u64,
    other: u64,
}

/// Parses every complete frame in `d`; returns how many bytes were consumed.
fn consume(d: &[u8], rx_ns: i64, seen_ns: i64, tally: &mut Tally, out: &mut Vec<Arrival>) -> usize {
    let mut pos = 0;
    while pos < d.len() {
        let push = d[pos] == b'>';
        let mut first: Option<bool> = None; // Some(true): invalidate, Some(false): pmessage
        let mut bulks = 0u64;
        let end = skip(d, pos, &mut |b: &[u8]| {
            if first.is_none() {
                first = Some(b == b"invalidate");
            }
            bulks += 1;
            let tail = if b.starts_with(PROBE_KEY) {
                Some(&b[PROBE_KEY.len()..])
            } else if b.starts_with(PROBE_CHANNEL) {
                Some(&b[PROBE_CHANNEL.len()..])
            } else {
                None
            };
            if let Some(seq) = tail.and_then(parse_seq) {
                out.push(Arrival {
                    seq,
                    rx_ns,
                    seen_ns,
                });
            }
        });
        let Some(end) = end else { break };
        if push {
            tally.msgs += 1;
            tally.keys += match first {
                Some(true) => bulks - 1,
                Some(false) => 1,
                None => 0, // invalidate with a null list: a flush
            };
        } else {
            tally.other += 1;
        }
        pos = end;
    }
    pos
}

struct Reader {
    counters: Arc<FeedCounters>,
    arrivals: Arc<Mutex<Vec<(u32, Arrival)>>>,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicI64>,
    /// Largest lag (read time − kernel stamp) seen on any read since last reset, ns.
    max_lag: Arc<AtomicI64>,
}

fn reader_loop(mut feeds: Vec<Feed>, r: Reader) {
    // SAFETY: gettid has no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    r.tid.store(tid, Ordering::Relaxed);
    // This thread stands in for N sidecars that each have a CPU of their own. On a shared
    // 2-core machine it can wait for the CPU for a second, long enough for the feeds' receive
    // queues to fill with small segments, which the kernel then collapses and prunes, and the
    // loopback retransmits after 200+ ms: delays of our making. A higher priority (it needs
    // 5-40% of a core) keeps it reading; it fails harmlessly without root.
    // SAFETY: setpriority on our own thread id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10) } != 0 {
        eprintln!("[fanout] could not raise the reader's priority (not root?): delays may include its waits");
    }
    // SAFETY: plain epoll syscalls on fds we own.
    let ep = unsafe { libc::epoll_create1(0) };
    if ep < 0 {
        die("epoll_create1");
    }
    for (i, f) in feeds.iter().enumerate() {
        let fd = f.stream.as_raw_fd();
        f.stream.set_nonblocking(true).expect("nonblocking");
        enable_rx_stamps(fd);
        deep_receive_buffer(fd);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: see above.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            die("epoll_ctl");
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let mut found: Vec<Arrival> = Vec::new();
    let mut batch: Vec<(u32, Arrival)> = Vec::new();
    while !r.stop.load(Ordering::Relaxed) {
        // SAFETY: events has room for its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            continue; // EINTR
        }
        let mut tally = Tally::default();
        let mut max_lag = 0i64;
        for ev in &events[..n as usize] {
            let idx = ev.u64 as usize;
            let feed = &mut feeds[idx];
            let fd = feed.stream.as_raw_fd();
            let (got, rx_ns) = recv_stamped(fd, &mut buf, libc::MSG_DONTWAIT);
            if got == 0 {
                r.counters.closed.fetch_add(1, Ordering::Relaxed);
                // SAFETY: removing our own fd from our epoll set.
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                continue;
            }
            if got < 0 {
                continue; // EAGAIN
            }
            let seen_ns = realtime_ns();
            if rx_ns > 0 {
                max_lag = max_lag.max(seen_ns - rx_ns);
            }
            let got = got as usize;
            tally.bytes += got as u64;
            found.clear();
            if feed.pending.is_empty() {
                let used = consume(&buf[..got], rx_ns, seen_ns, &mut tally, &mut found);
                feed.pending.extend_from_slice(&buf[used..got]);
            } else {
                feed.pending.extend_from_slice(&buf[..got]);
                let used = consume(&feed.pending, rx_ns, seen_ns, &mut tally, &mut found);
                feed.pending.drain(..used);
            }
            batch.extend(found.iter().map(|a| (idx as u32, *a)));
        }
        r.counters.msgs.fetch_add(tally.msgs, Ordering::Relaxed);
        r.counters.keys.fetch_add(tally.keys, Ordering::Relaxed);
        r.counters.bytes.fetch_add(tally.bytes, Ordering::Relaxed);
        r.counters
            .other_frames
            .fetch_add(tally.other, Ordering::Relaxed);
        r.max_lag.fetch_max(max_lag, Ordering::Relaxed);
        if !batch.is_empty() {
            r.arrivals.lock().unwrap().append(&mut batch);
        }
    }
}

// ------------------------------------------------------------------ writer and prober

struct WriterSpec {
    prefix: &'static str,
    pipeline: usize,
    depth: usize,
}

/// SETs at full speed until `stop`: `depth` batches of `pipeline` commands in flight.
fn writer_loop(
    addr: String,
    spec: WriterSpec,
    symbols: usize,
    value: Vec<u8>,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicI64>,
) {
    // SAFETY: gettid has no arguments.
    tid.store(
        unsafe { libc::syscall(libc::SYS_gettid) },
        Ordering::Relaxed,
    );
    let mut s = TcpStream::connect(&addr).expect("writer connect");
    s.set_nodelay(true).ok();
    // Every batch pre-encoded once: the writer's CPU goes to syscalls only.
    let per_cycle = symbols.div_ceil(spec.pipeline).max(1);
    let mut batches: Vec<Vec<u8>> = Vec::with_capacity(per_cycle);
    let mut sym = 0usize;
    for _ in 0..per_cycle {
        let mut b = Vec::new();
        for _ in 0..spec.pipeline {
            let key = format!("{}{:06}", spec.prefix, sym % symbols + 1);
            b.extend(command(&[b"SET", key.as_bytes(), &value]));
            sym += 1;
        }
        batches.push(b);
    }
    let reply_len = 5 * spec.pipeline; // "+OK\r\n" each
    let mut rbuf = vec![0u8; reply_len.max(4096)];
    let mut next = 0usize;
    let mut in_flight = 0usize;
    let mut have = 0usize; // reply bytes of the oldest batch read so far
    loop {
        while in_flight < spec.depth && !stop.load(Ordering::Relaxed) {
            s.write_all(&batches[next]).expect("writer write");
            next = (next + 1) % batches.len();
            in_flight += 1;
        }
        if in_flight == 0 {
            return;
        }
        let want = (reply_len - have).min(rbuf.len());
        let n = s.read(&mut rbuf[..want]).expect("writer read");
        if n == 0 {
            die("writer: Redis closed the connection");
        }
        if rbuf[..n].contains(&b'-') {
            die(&format!(
                "writer: error reply {}",
                String::from_utf8_lossy(&rbuf[..n])
            ));
        }
        have += n;
        if have == reply_len {
            have = 0;
            in_flight -= 1;
            acked.fetch_add(spec.pipeline as u64, Ordering::Relaxed);
        }
    }
}

/// One SET quote:~p:<seq> at a time, every `every`; records the kernel stamp of each +OK.
fn probe_loop(
    addr: String,
    first_seq: u32,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<(u32, i64)> {
    let mut s = TcpStream::connect(&addr).expect("probe connect");
    s.set_nodelay(true).ok();
    enable_rx_stamps(s.as_raw_fd());
    let mut acks = Vec::new();
    let mut seq = first_seq;
    let mut next = Instant::now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let key = format!("quote:~p:{seq}");
        s.write_all(&command(&[b"SET", key.as_bytes(), b"1"]))
            .expect("probe write");
        let mut got = 0;
        let mut stamp = 0;
        while got < 5 {
            let (n, ts) = recv_stamped(s.as_raw_fd(), &mut buf[got..], 0);
            if n <= 0 {
                die("probe: read failed");
            }
            got += n as usize;
            stamp = ts;
        }
        if &buf[..5] != b"+OK\r\n" {
            die("probe: unexpected reply");
        }
        acks.push((seq, stamp));
        seq += 1;
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now; // behind schedule (Redis saturated): no catch-up burst
        }
    }
    acks
}

// ------------------------------------------------------------------ control

struct Control {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Control {
    fn new(addr: &str) -> Control {
        let s = TcpStream::connect(addr).expect("control connect");
        Control { s, buf: Vec::new() }
    }
    fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        call(&mut self.s, &mut self.buf, args)
    }
    fn info(&mut self, section: &str) -> HashMap<String, String> {
        let f = self.call(&[b"INFO", section.as_bytes()]);
        String::from_utf8_lossy(&f)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }
    /// Redis' CPU time (user, sys; all threads), seconds.
    fn cpu(&mut self) -> (f64, f64) {
        let i = self.info("cpu");
        let g = |k: &str| i.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (g("used_cpu_user"), g("used_cpu_sys"))
    }
    fn client_mem(&mut self) -> u64 {
        let i = self.info("memory");
        i.get("mem_clients_normal")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// CPU seconds of one thread of this process (utime + stime from /proc).
fn thread_cpu(tid: i64) -> f64 {
    stat_cpu(&format!("/proc/self/task/{tid}/stat"))
}

/// The kernel threads that run deferred softirqs (network receive processing among them).
fn ksoftirqd_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("ksoftirqd/"))
        })
        .collect()
}

fn ksoftirqd_cpu(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|p| stat_cpu(&format!("/proc/{p}/stat")))
        .sum()
}

/// utime + stime of a /proc/.../stat file, seconds.
fn stat_cpu(path: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    let rest = s.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split(' ').collect();
    // After "pid (comm) ": state is field 0, utime 11, stime 12.
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf is always safe to call.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ------------------------------------------------------------------ run

struct RunArgs {
    port: u16,
    mode: String,
    feeds: usize,
    variants: Vec<String>,
    secs: f64,
    warmup: f64,
    symbols: usize,
    pipeline: usize,
    value_size: usize,
    probe_us: u64,
}

fn parse_run(argv: &[String]) -> RunArgs {
    let mut a = RunArgs {
        port: 0,
        mode: "tracking".into(),
        feeds: 10,
        variants: vec!["cached".into(), "uncached".into(), "p1".into()],
        secs: 5.0,
        warmup: 1.0,
        symbols: 5000,
        pipeline: 200,
        value_size: 128,
        probe_us: 5000,
    };
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        let val = argv
            .get(i + 1)
            .cloned()
            .unwrap_or_else(|| die(&format!("missing value for {flag}")));
        match flag {
            "--port" => a.port = val.parse().expect("--port"),
            "--mode" => a.mode = val,
            "--feeds" => a.feeds = val.parse().expect("--feeds"),
            "--variants" => a.variants = val.split(',').map(str::to_string).collect(),
            "--secs" => a.secs = val.parse().expect("--secs"),
            "--warmup" => a.warmup = val.parse().expect("--warmup"),
            "--symbols" => a.symbols = val.parse().expect("--symbols"),
            "--pipeline" => a.pipeline = val.parse().expect("--pipeline"),
            "--value-size" => a.value_size = val.parse().expect("--value-size"),
            "--probe-us" => a.probe_us = val.parse().expect("--probe-us"),
            _ => die(&format!(
                "unknown flag {flag} (see the header of bench_fanout.rs)"
            )),
        }
        i += 2;
    }
    if a.port == 0 {
        die("--port is required");
    }
    if !["tracking", "keyspace", "tracking+kea", "tracking-loop"].contains(&a.mode.as_str()) {
        die("--mode: tracking, keyspace, tracking+kea or tracking-loop");
    }
    a
}

fn run(a: RunArgs) {
    let addr = format!("127.0.0.1:{}", a.port);
    let mut ctl = Control::new(&addr);
    let events: &[u8] = match a.mode.as_str() {
        "keyspace" | "tracking+kea" => b"KEA",
        _ => b"",
    };
    ctl.call(&[b"CONFIG", b"SET", b"notify-keyspace-events", events]);
    let feed_mode = if a.mode == "keyspace" {
        "keyspace"
    } else {
        a.mode.as_str()
    };

    let t = Instant::now();
    let feeds: Vec<Feed> = (0..a.feeds)
        .map(|_| Feed {
            stream: open_feed(&addr, feed_mode),
            pending: Vec::new(),
        })
        .collect();
    eprintln!(
        "[fanout] {} feeds ({}) set up in {:.2} s",
        a.feeds,
        a.mode,
        t.elapsed().as_secs_f64()
    );

    let counters = Arc::new(FeedCounters::default());
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader_tid = Arc::new(AtomicI64::new(0));
    let max_lag = Arc::new(AtomicI64::new(0));
    let reader = {
        let r = Reader {
            counters: counters.clone(),
            arrivals: arrivals.clone(),
            stop: stop_reader.clone(),
            tid: reader_tid.clone(),
            max_lag: max_lag.clone(),
        };
        std::thread::spawn(move || reader_loop(feeds, r))
    };
    let mut value = b"{\"v\":1,\"px\":\"".to_vec();
    value.resize(a.value_size.max(16) - 2, b'7');
    value.extend_from_slice(b"\"}");

    let softirq_pids = ksoftirqd_pids();
    // Per-client buffers Redis holds with the feeds idle: the baseline of the peak below.
    std::thread::sleep(Duration::from_millis(100));
    let mem_idle = ctl.client_mem();
    let mut seq = 0u32;
    for variant in &a.variants {
        let (prefix, pipeline, depth) = match variant.as_str() {
            "cached" => ("quote:", a.pipeline, 2),
            "uncached" => ("lock:", a.pipeline, 2),
            "p1" => ("quote:", 1, 1),
            v => die(&format!("unknown variant {v}")),
        };
        let acked = Arc::new(AtomicU64::new(0));
        let stop_writer = Arc::new(AtomicBool::new(false));
        let writer_tid = Arc::new(AtomicI64::new(0));
        let keys_before = counters.keys.load(Ordering::Relaxed);
        let msgs_before = counters.msgs.load(Ordering::Relaxed);
        let bytes_before = counters.bytes.load(Ordering::Relaxed);
        let writer = {
            let (addr, value, acked, stop, tid) = (
                addr.clone(),
                value.clone(),
                acked.clone(),
                stop_writer.clone(),
                writer_tid.clone(),
            );
            let spec = WriterSpec {
                prefix,
                pipeline,
                depth,
            };
            let symbols = a.symbols;
            std::thread::spawn(move || writer_loop(addr, spec, symbols, value, acked, stop, tid))
        };
        std::thread::sleep(Duration::from_secs_f64(a.warmup));

        // The measured window: probes run only inside it.
        arrivals.lock().unwrap().clear();
        max_lag.store(0, Ordering::Relaxed);
        let stop_probe = Arc::new(AtomicBool::new(false));
        let first_seq = seq;
        // Not during uncached writes: at N = 1,000 the probes' own fan-out would cost Redis
        // more than the writes whose filtering is measured.
        let probing = prefix == "quote:";
        let prober = {
            let (addr, stop) = (addr.clone(), stop_probe.clone());
            let every = Duration::from_micros(a.probe_us);
            std::thread::spawn(move || {
                if probing {
                    probe_loop(addr, first_seq, every, stop)
                } else {
                    Vec::new()
                }
            })
        };
        let snap = |ctl: &mut Control| {
            (
                Instant::now(),
                acked.load(Ordering::Relaxed),
                counters.msgs.load(Ordering::Relaxed),
                counters.keys.load(Ordering::Relaxed),
                counters.bytes.load(Ordering::Relaxed),
                ctl.cpu(),
                thread_cpu(reader_tid.load(Ordering::Relaxed)),
                thread_cpu(writer_tid.load(Ordering::Relaxed)),
                ksoftirqd_cpu(&softirq_pids),
            )
        };
        let s0 = snap(&mut ctl);
        let mut mem_max = 0u64;
        let end = s0.0 + Duration::from_secs_f64(a.secs);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(250).min(end - Instant::now()));
            mem_max = mem_max.max(ctl.client_mem());
        }
        stop_probe.store(true, Ordering::Relaxed);
        let acks = prober.join().unwrap();
        let s1 = snap(&mut ctl);
        let lag_max = max_lag.load(Ordering::Relaxed);
        seq = first_seq + acks.len() as u32;
        stop_writer.store(true, Ordering::Relaxed);
        writer.join().unwrap();

        // Drain: every key written must reach every feed (nothing is dropped or merged:
        // the writer cycles over distinct symbols and a BCAST batch never spans a cycle).
        let writer_total = acked.load(Ordering::Relaxed);
        let cached_writes = if prefix == "quote:" { writer_total } else { 0 } + acks.len() as u64;
        let expect_keys = cached_writes * a.feeds as u64;
        let drain_start = Instant::now();
        let mut last = u64::MAX;
        let mut still = Instant::now();
        let received = loop {
            let k = counters.keys.load(Ordering::Relaxed) - keys_before;
            if k >= expect_keys || drain_start.elapsed() > Duration::from_secs(15) {
                break k;
            }
            if k != last {
                last = k;
                still = Instant::now();
            } else if still.elapsed() > Duration::from_secs(2) {
                break k;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let drain_s = drain_start.elapsed().as_secs_f64();
        // Received per write over the whole variant (warm-up, window and drain): counting
        // only inside the window would miss what a lagging reader had not read yet.
        let all_writes = (writer_total + acks.len() as u64).max(1) as f64;
        let msgs_all = counters.msgs.load(Ordering::Relaxed) - msgs_before;
        let bytes_all = counters.bytes.load(Ordering::Relaxed) - bytes_before;

        let wall = (s1.0 - s0.0).as_secs_f64();
        let writes_window = (s1.1 - s0.1) + acks.len() as u64;
        let writes_f = writes_window.max(1) as f64;
        let redis_user = s1.5 .0 - s0.5 .0;
        let redis_sys = s1.5 .1 - s0.5 .1;
        let redis_cpu = redis_user + redis_sys;
        let ack_of: HashMap<u32, i64> = acks.iter().copied().collect();
        let got = std::mem::take(&mut *arrivals.lock().unwrap());
        let mut delays: Vec<i64> = Vec::with_capacity(got.len());
        let mut lags: Vec<i64> = Vec::with_capacity(got.len());
        let mut last_feed: HashMap<u32, i64> = HashMap::new();
        let mut unstamped = 0u64;
        for (_, arr) in &got {
            let Some(&ack) = ack_of.get(&arr.seq) else {
                continue;
            };
            if arr.rx_ns == 0 || ack == 0 {
                unstamped += 1;
                continue;
            }
            let d = arr.rx_ns - ack;
            delays.push(d);
            lags.push(arr.seen_ns - arr.rx_ns);
            let e = last_feed.entry(arr.seq).or_insert(i64::MIN);
            *e = (*e).max(d);
        }
        delays.sort_unstable();
        lags.sort_unstable();
        let mut lastv: Vec<i64> = last_feed.values().copied().collect();
        lastv.sort_unstable();
        let probe_expected = acks.len() as u64 * a.feeds as u64;
        let ms = |ns: i64| format!("{:.3}", ns as f64 / 1e6);
        let fields = [
            ("mode", a.mode.clone()),
            ("variant", variant.clone()),
            ("feeds", a.feeds.to_string()),
            ("secs", format!("{wall:.2}")),
            ("writes", writes_window.to_string()),
            ("sets_per_s", format!("{:.0}", writes_window as f64 / wall)),
            ("redis_cpu_pct", format!("{:.1}", 100.0 * redis_cpu / wall)),
            (
                "redis_us_per_write",
                format!("{:.2}", 1e6 * redis_cpu / writes_f),
            ),
            (
                "redis_user_us_per_write",
                format!("{:.2}", 1e6 * redis_user / writes_f),
            ),
            (
                "redis_sys_us_per_write",
                format!("{:.2}", 1e6 * redis_sys / writes_f),
            ),
            (
                "msgs_per_write",
                format!("{:.3}", msgs_all as f64 / all_writes),
            ),
            (
                "keys_per_write",
                format!("{:.3}", received as f64 / all_writes),
            ),
            (
                "bytes_per_write",
                format!("{:.1}", bytes_all as f64 / all_writes),
            ),
            (
                "keys_per_msg",
                format!("{:.1}", received as f64 / msgs_all.max(1) as f64),
            ),
            (
                "window_msgs_per_write",
                format!("{:.3}", (s1.2 - s0.2) as f64 / writes_f),
            ),
            ("probes", acks.len().to_string()),
            ("probe_samples", delays.len().to_string()),
            ("probe_expected", probe_expected.to_string()),
            ("unstamped", unstamped.to_string()),
            ("delay_p50_ms", ms(percentile(&delays, 50.0))),
            ("delay_p99_ms", ms(percentile(&delays, 99.0))),
            ("delay_max_ms", ms(*delays.last().unwrap_or(&0))),
            ("last_feed_p50_ms", ms(percentile(&lastv, 50.0))),
            ("last_feed_p99_ms", ms(percentile(&lastv, 99.0))),
            (
                "reader_cpu_pct",
                format!("{:.0}", 100.0 * (s1.6 - s0.6) / wall),
            ),
            (
                "writer_cpu_pct",
                format!("{:.0}", 100.0 * (s1.7 - s0.7) / wall),
            ),
            ("reader_lag_p99_ms", ms(percentile(&lags, 99.0))),
            ("reader_lag_max_ms", ms(lag_max)),
            (
                "client_mem_max_mb",
                format!("{:.1}", mem_max as f64 / 1048576.0),
            ),
            (
                "client_mem_idle_mb",
                format!("{:.1}", mem_idle as f64 / 1048576.0),
            ),
            (
                "ksoftirqd_cpu_pct",
                format!("{:.0}", 100.0 * (s1.8 - s0.8) / wall),
            ),
            (
                "feeds_closed",
                counters.closed.load(Ordering::Relaxed).to_string(),
            ),
            ("keys_expected", expect_keys.to_string()),
            ("keys_received", received.to_string()),
            ("drain_s", format!("{drain_s:.2}")),
            (
                "load",
                std::fs::read_to_string("/proc/loadavg")
                    .map(|l| l.split(' ').next().unwrap_or("?").to_string())
                    .unwrap_or_default(),
            ),
        ];
        let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", line.join(" "));
        std::io::stdout().flush().ok();
        eprintln!(
            "[fanout] {} N={} {}: {} SET/s, Redis {:.2} us/write, delay p99 {} ms, reader {}% CPU",
            a.mode,
            a.feeds,
            variant,
            writes_window as f64 as u64 / wall.max(1e-9) as u64,
            1e6 * redis_cpu / writes_f,
            ms(percentile(&delays, 99.0)),
            (100.0 * (s1.6 - s0.6) / wall) as i64
        );
    }
    stop_reader.store(true, Ordering::Relaxed);
    reader.join().unwrap();
}

// ------------------------------------------------------------------ report

fn report(files: &[String]) {
    let mut rows: Vec<HashMap<String, String>> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap_or_else(|e| die(&format!("{f}: {e}")));
        for l in text.lines().filter(|l| l.starts_with("mode=")) {
            rows.push(
                l.split(' ')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
    }
    let g = |r: &HashMap<String, String>, k: &str| r.get(k).cloned().unwrap_or_default();
    let num = |r: &HashMap<String, String>, k: &str| g(r, k).parse::<f64>().unwrap_or(0.0);
    // No probe samples (uncached writes): no delay to show.
    let dash = |r: &HashMap<String, String>, k: &str| {
        if g(r, "probe_samples") == "0" {
            "-".to_string()
        } else {
            g(r, k)
        }
    };
    let thousands = |v: f64| {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    // Repetitions of a cell: the one with the median Redis µs/write is shown, with the range.
    type Row = HashMap<String, String>;
    // (mode, write pattern, N) and its repetitions.
    let mut cells: Vec<(String, String, u64, Vec<&Row>)> = Vec::new();
    for r in &rows {
        let key = (g(r, "mode"), g(r, "variant"), num(r, "feeds") as u64);
        match cells
            .iter_mut()
            .find(|c| (c.0.clone(), c.1.clone(), c.2) == key)
        {
            Some(c) => c.3.push(r),
            None => cells.push((key.0, key.1, key.2, vec![r])),
        }
    }
    let mode_rank = |m: &str| {
        ["tracking", "keyspace", "tracking+kea", "tracking-loop"]
            .iter()
            .position(|x| *x == m)
            .unwrap_or(9)
    };
    cells.sort_by_key(|c| (mode_rank(&c.0), c.2));
    let mut picked: Vec<(HashMap<String, String>, String)> = Vec::new();
    for c in &cells {
        let mut reps = c.3.clone();
        reps.sort_by(|a, b| num(a, "redis_us_per_write").total_cmp(&num(b, "redis_us_per_write")));
        let mid = reps[(reps.len() - 1) / 2].clone();
        let range = if reps.len() > 1 {
            format!(
                " ({}..{})",
                g(reps[0], "redis_us_per_write"),
                g(reps[reps.len() - 1], "redis_us_per_write")
            )
        } else {
            String::new()
        };
        picked.push((mid, range));
    }
    for variant in ["cached", "uncached", "p1"] {
        let sel: Vec<_> = picked
            .iter()
            .filter(|r| g(&r.0, "variant") == variant)
            .collect();
        if sel.is_empty() {
            continue;
        }
        println!(
            "\n#### {}\n",
            match variant {
                "cached" =>
                    "cached keys: SET quote:<sym>, pipelined (200 per batch, 2 batches in flight)",
                "uncached" =>
                    "uncached keys: SET lock:<sym>, pipelined (no feed tracks them; no probes)",
                _ => "cached keys, one SET at a time (no pipelining)",
            }
        );
        println!(
            "| mode | N | SET/s | Redis CPU % | Redis µs/write (user + sys) | µs/write per feed | SET/s per Redis core | delay p50 ms | delay p99 ms | last feed p99 ms | msgs/write | bytes/write | keys/msg | reader CPU %, lag p99 ms | Redis client buffers max MB | keys received |"
        );
        println!(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (r, range) in sel {
            let n = num(r, "feeds");
            println!(
                "| {} | {} | {} | {} | {} ({} + {}){} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {}, {} | {} | {} |",
                g(r, "mode"),
                thousands(n),
                thousands(num(r, "sets_per_s")),
                g(r, "redis_cpu_pct"),
                g(r, "redis_us_per_write"),
                g(r, "redis_user_us_per_write"),
                g(r, "redis_sys_us_per_write"),
                range,
                num(r, "redis_us_per_write") / n.max(1.0),
                thousands(1e6 / num(r, "redis_us_per_write").max(1e-3)),
                dash(r, "delay_p50_ms"),
                dash(r, "delay_p99_ms"),
                dash(r, "last_feed_p99_ms"),
                g(r, "msgs_per_write"),
                thousands(num(r, "bytes_per_write")),
                g(r, "keys_per_msg"),
                g(r, "reader_cpu_pct"),
                dash(r, "reader_lag_p99_ms"),
                g(r, "client_mem_max_mb"),
                if g(r, "keys_received") == g(r, "keys_expected") {
                    "all".to_string()
                } else {
                    format!("{} of {}", g(r, "keys_received"), g(r, "keys_expected"))
                },
            );
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("run") => run(parse_run(&argv[1..])),
        Some("report") => report(&argv[1..]),
        _ => die(
            "usage: bench_fanout run --port P --mode M --feeds N ... | bench_fanout report FILE...",
        ),
    }
}
