//! Mixed long-running load for scripts/soak (no dependencies: raw RESP2 over
//! std::net::TcpStream, one OS thread per connection). Everything goes
//! through nearcache (--addr) except what is marked "direct" (--redis).
//!
//! Workers (counts scale with --scale, default 1):
//!   reader ×6       GET of Zipf-hot `quote:{sym}` / `ind:{sym}:macd:1d` keys; two of them pipeline 16
//!   writer ×1       SET of the same keys through nearcache
//!   direct ×1       SET of the same keys straight on Redis (invalidated by the feed)
//!   version ×2      staleness oracle writers: SET `quote:ver:{k}` to increasing versions, one
//!                   through nearcache (keys 0..31), one direct (keys 32..63); each acknowledged
//!                   version is recorded with the time of its acknowledgement
//!   checker ×2      GET `quote:ver:{k}` through nearcache; a value below the version acknowledged
//!                   more than --stale-ms before the GET was sent is a stale read; a value below
//!                   one this checker saw before for that key is a backwards read
//!   pipeline ×2     64 requests per write (INCR `soak:pipe:{i}` and GETs interleaved); INCR
//!                   replies must go up by one
//!   multi ×1        MULTI, INCR `soak:tx`, SET `quote:tx` v, EXEC
//!   pubsub          1 publisher (PUBLISH every 10 ms), 2 subscribers; a subscriber silent for
//!                   5 s while the publisher succeeds is an error
//!   blpop           1 producer (RPUSH every 5 ms), 2 consumers (BLPOP 1)
//!   slow ×2         pipeline 32 GETs of a 16 KiB value, read the replies at --slow-kibps
//!
//! Every reply is awaited with a --reply-timeout-ms deadline: one that never comes is a "hung"
//! error. Errors are counted by kind (the error text with digits as '#', or the socket error).
//! Every second the counters go to --stats FILE as one `key=value` line (written atomically);
//! at the end a final line with the write integrity check (counters on Redis vs acknowledged
//! INCRs: lost = acknowledged but missing, extra = applied more than sent) goes to stdout.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ arguments

struct Args {
    addr: String,
    redis: String,
    duration: f64,
    stats: String,
    scale: usize,
    symbols: usize,
    zipf: f64,
    stale_ms: u64,
    reply_timeout_ms: u64,
    slow_kibps: u64,
    read_rate: f64,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:6380".into(),
        redis: "127.0.0.1:6379".into(),
        duration: 60.0,
        stats: "/tmp/soak-stats".into(),
        scale: 1,
        symbols: 5000,
        zipf: 1.0,
        stale_ms: 100,
        reply_timeout_ms: 10_000,
        slow_kibps: 1024,
        read_rate: 2000.0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        let val = argv.get(i + 1).cloned().unwrap_or_else(|| usage());
        match flag {
            "--addr" => a.addr = val,
            "--redis" => a.redis = val,
            "--duration" => a.duration = val.parse().unwrap_or_else(|_| usage()),
            "--stats" => a.stats = val,
            "--scale" => a.scale = val.parse().unwrap_or_else(|_| usage()),
            "--symbols" => a.symbols = val.parse().unwrap_or_else(|_| usage()),
            "--zipf" => a.zipf = val.parse().unwrap_or_else(|_| usage()),
            "--stale-ms" => a.stale_ms = val.parse().unwrap_or_else(|_| usage()),
            "--reply-timeout-ms" => a.reply_timeout_ms = val.parse().unwrap_or_else(|_| usage()),
            "--slow-kibps" => a.slow_kibps = val.parse().unwrap_or_else(|_| usage()),
            "--read-rate" => a.read_rate = val.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
        i += 2;
    }
    a
}

fn usage() -> ! {
    eprintln!(
        "usage: soak_load --addr NEARCACHE --redis REDIS [--duration 60] [--stats FILE] [--scale 1] \
         [--symbols 5000] [--zipf 1.0] [--stale-ms 100] [--reply-timeout-ms 10000] \
         [--slow-kibps 1024] [--read-rate 2000 (GETs/s per reader)]"
    );
    std::process::exit(2)
}

// ------------------------------------------------------------------ counters

#[derive(Default)]
struct Stats {
    ok: Mutex<BTreeMap<&'static str, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    stale: AtomicU64,
    backwards: AtomicU64,
    checks: AtomicU64,
}

impl Stats {
    fn ok(&self, kind: &'static str, n: u64) {
        *self.ok.lock().unwrap().entry(kind).or_default() += n;
    }

    fn error(&self, worker: &str, e: &Failure) {
        let kind = format!("{worker}: {}", e.kind());
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn line(&self) -> String {
        let mut out = String::new();
        for (k, v) in self.ok.lock().unwrap().iter() {
            out.push_str(&format!("ok.{k}={v} "));
        }
        let errors = self.errors.lock().unwrap();
        let total: u64 = errors.values().sum();
        out.push_str(&format!(
            "errors={total} stale={} backwards={} checks={}",
            self.stale.load(Ordering::Relaxed),
            self.backwards.load(Ordering::Relaxed),
            self.checks.load(Ordering::Relaxed)
        ));
        for (k, v) in errors.iter() {
            out.push_str(&format!(" error[{}]={v}", k.replace(' ', "_")));
        }
        out
    }
}

// ------------------------------------------------------------------ RESP client

#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Why a request did not get its reply.
#[derive(Debug)]
enum Failure {
    /// An error reply.
    Reply(String),
    /// No reply within the deadline: nearcache neither answered nor closed.
    Hung,
    Io(std::io::ErrorKind),
    /// A reply, but not the one expected.
    Unexpected(String),
}

impl Failure {
    fn kind(&self) -> String {
        match self {
            Failure::Reply(e) => {
                let t: String = e.chars().take(70).collect();
                t.chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect()
            }
            Failure::Hung => "hung (no reply, no close)".into(),
            Failure::Io(k) => format!("io {k:?}"),
            Failure::Unexpected(what) => format!("unexpected {what}"),
        }
    }

    fn is_hang(&self) -> bool {
        matches!(self, Failure::Hung)
    }
}

type Res<T> = Result<T, Failure>;

fn io(e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Failure::Hung,
        k => Failure::Io(k),
    }
}

struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str, timeout: Duration) -> Res<Conn> {
        let s = TcpStream::connect(addr).map_err(io)?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(timeout)).ok();
        s.set_write_timeout(Some(timeout)).ok();
        Ok(Conn {
            w: s.try_clone().map_err(io)?,
            r: BufReader::with_capacity(64 * 1024, s),
        })
    }

    fn send(&mut self, buf: &[u8]) -> Res<()> {
        self.w.write_all(buf).map_err(io)
    }

    fn read(&mut self) -> Res<Reply> {
        read_reply(&mut self.r)
    }

    fn cmd(&mut self, args: &[&[u8]]) -> Res<Reply> {
        let mut b = Vec::new();
        encode(&mut b, args);
        self.send(&b)?;
        match self.read()? {
            Reply::Error(e) => Err(Failure::Reply(e)),
            r => Ok(r),
        }
    }
}

fn encode(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
}

fn read_reply<R: BufRead>(r: &mut R) -> Res<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).map_err(io)?;
    if line.is_empty() {
        return Err(Failure::Io(std::io::ErrorKind::UnexpectedEof));
    }
    if line.len() < 3 || !line.ends_with(b"\r\n") {
        return Err(Failure::Unexpected("framing".into()));
    }
    let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let num = || {
        body.parse::<i64>()
            .map_err(|_| Failure::Unexpected("number".into()))
    };
    match line[0] {
        b'+' => Ok(Reply::Simple(body)),
        b'-' => Ok(Reply::Error(body)),
        b':' => Ok(Reply::Int(num()?)),
        b'$' => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Bulk(None));
            }
            let mut v = vec![0u8; n as usize + 2];
            r.read_exact(&mut v).map_err(io)?;
            v.truncate(n as usize);
            Ok(Reply::Bulk(Some(v)))
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                return Ok(Reply::Array(None));
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(read_reply(r)?);
            }
            Ok(Reply::Array(Some(items)))
        }
        _ => Err(Failure::Unexpected("reply type".into())),
    }
}

// ------------------------------------------------------------------ randomness

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Zipf over ranks 0..n, P(k) ∝ 1/(k+1)^s.
struct Zipf {
    cdf: Vec<f64>,
}
impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 0..n {
            acc += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(acc);
        }
        for c in cdf.iter_mut() {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn hot_key(z: &Zipf, rng: &mut Rng) -> String {
    let sym = z.sample(rng);
    if rng.below(4) == 0 {
        format!("ind:{sym:06}:macd:1d")
    } else {
        format!("quote:{sym:06}")
    }
}

// ------------------------------------------------------------------ workers

struct Ctx {
    args: Args,
    stats: Stats,
    stop: AtomicBool,
    zipf: Zipf,
    /// Per version key: (acknowledged at, version), oldest first.
    acked: Vec<Mutex<VecDeque<(Instant, u64)>>>,
    /// Per counter key: INCRs acknowledged, and sent without a reply.
    counters: Mutex<HashMap<String, (u64, u64)>>,
    /// The publisher's last success.
    published: Mutex<Option<Instant>>,
}

const VERSION_KEYS: usize = 64;

impl Ctx {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.args.reply_timeout_ms)
    }

    fn connect(&self, addr: &str, worker: &str) -> Option<Conn> {
        while self.running() {
            match Conn::open(addr, self.timeout()) {
                Ok(c) => return Some(c),
                Err(e) => {
                    self.stats.error(worker, &e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        None
    }

    fn count(&self, key: &str, acked: u64, unknown: u64) {
        let mut m = self.counters.lock().unwrap();
        let e = m.entry(key.to_string()).or_default();
        e.0 += acked;
        e.1 += unknown;
    }
}

/// Runs `step` on a connection to `addr` until stopped, reconnecting after a
/// failure (counted); `step` returns how many operations of `kind` succeeded.
fn worker(
    ctx: &Ctx,
    addr: &str,
    name: &str,
    kind: &'static str,
    pace: Option<Duration>,
    mut step: impl FnMut(&mut Conn) -> Res<u64>,
) {
    let mut conn: Option<Conn> = None;
    let mut next = Instant::now();
    while ctx.running() {
        if let Some(p) = pace {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next = next.max(now) + p;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx.connect(addr, name) {
                Some(c) => conn.insert(c),
                None => return,
            },
        };
        match step(c) {
            Ok(n) => ctx.stats.ok(kind, n),
            Err(e) => {
                if e.is_hang() {
                    eprintln!(
                        "soak_load: {name}: a reply never came ({:?} deadline)",
                        ctx.timeout()
                    );
                }
                ctx.stats.error(name, &e);
                conn = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn bulk_u64(r: &Reply) -> Res<u64> {
    match r {
        Reply::Bulk(None) => Ok(0),
        Reply::Bulk(Some(v)) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Failure::Unexpected("version".into())),
        other => Err(Failure::Unexpected(format!("{other:?}"))),
    }
}

fn reader(ctx: &Ctx, id: usize) {
    let mut rng = Rng::new(id as u64 + 1);
    let pipelined = id < 2;
    let depth = if pipelined { 16 } else { 1 };
    let pace = Duration::from_secs_f64(depth as f64 / ctx.args.read_rate.max(1.0));
    worker(
        ctx,
        &ctx.args.addr,
        &format!("reader{id}"),
        "read",
        Some(pace),
        |c| {
            let mut b = Vec::new();
            for _ in 0..depth {
                let k = hot_key(&ctx.zipf, &mut rng);
                encode(&mut b, &[b"GET", k.as_bytes()]);
            }
            c.send(&b)?;
            for _ in 0..depth {
                match c.read()? {
                    Reply::Bulk(_) => {}
                    Reply::Error(e) => return Err(Failure::Reply(e)),
                    other => return Err(Failure::Unexpected(format!("{other:?}"))),
                }
            }
            Ok(depth as u64)
        },
    );
}

fn writer(ctx: &Ctx, id: u64, direct: bool) {
    let mut rng = Rng::new(1000 + id);
    let (addr, kind) = if direct {
        (&ctx.args.redis, "write_direct")
    } else {
        (&ctx.args.addr, "write")
    };
    let name = if direct { "direct_writer" } else { "writer" };
    worker(ctx, addr, name, kind, Some(Duration::from_millis(5)), |c| {
        let k = hot_key(&ctx.zipf, &mut rng);
        let v = format!("{{\"p\":{},\"t\":{}}}", rng.below(100_000), id);
        c.cmd(&[b"SET", k.as_bytes(), v.as_bytes()])?;
        Ok(1)
    });
}

fn version_writer(ctx: &Ctx, direct: bool) {
    let (addr, keys, name) = if direct {
        (
            &ctx.args.redis,
            VERSION_KEYS / 2..VERSION_KEYS,
            "version_direct",
        )
    } else {
        (&ctx.args.addr, 0..VERSION_KEYS / 2, "version_writer")
    };
    let mut version: HashMap<usize, u64> = HashMap::new();
    // Start above anything a previous run left (a restart from the AOF keeps it).
    if let Some(mut c) = ctx.connect(&ctx.args.redis, name) {
        for k in keys.clone() {
            if let Ok(r) = c.cmd(&[b"GET", format!("quote:ver:{k}").as_bytes()]) {
                version.insert(k, bulk_u64(&r).unwrap_or(0));
            }
        }
    }
    let mut k = keys.start;
    worker(
        ctx,
        addr,
        name,
        "version_write",
        Some(Duration::from_millis(2)),
        |c| {
            k = if k + 1 >= keys.end { keys.start } else { k + 1 };
            let v = version.entry(k).or_default();
            *v += 1;
            let value = v.to_string();
            c.cmd(&[
                b"SET",
                format!("quote:ver:{k}").as_bytes(),
                value.as_bytes(),
            ])?;
            let now = Instant::now();
            let mut q = ctx.acked[k].lock().unwrap();
            q.push_back((now, *v));
            // Keep a few seconds: enough to find the version acknowledged --stale-ms ago.
            while q.len() > 2 && now.duration_since(q[1].0) > Duration::from_secs(5) {
                q.pop_front();
            }
            Ok(1)
        },
    );
}

/// The highest version of key `k` acknowledged at or before `t`.
fn acked_before(ctx: &Ctx, k: usize, t: Instant) -> u64 {
    let q = ctx.acked[k].lock().unwrap();
    q.iter()
        .rev()
        .find(|(at, _)| *at <= t)
        .map_or(0, |(_, v)| *v)
}

fn checker(ctx: &Ctx, id: u64) {
    let mut rng = Rng::new(2000 + id);
    let mut seen = vec![0u64; VERSION_KEYS];
    let lag = Duration::from_millis(ctx.args.stale_ms);
    let name = format!("checker{id}");
    worker(
        ctx,
        &ctx.args.addr,
        &name,
        "check",
        Some(Duration::from_micros(500)),
        |c| {
            let k = rng.below(VERSION_KEYS);
            let sent = Instant::now();
            let must = sent.checked_sub(lag).map_or(0, |t| acked_before(ctx, k, t));
            let got = bulk_u64(&c.cmd(&[b"GET", format!("quote:ver:{k}").as_bytes()])?)?;
            ctx.stats.checks.fetch_add(1, Ordering::Relaxed);
            if got < must {
                let n = ctx.stats.stale.fetch_add(1, Ordering::Relaxed);
                if n < 20 {
                    eprintln!(
                    "soak_load: STALE read: {name} GET quote:ver:{k} = {got}, but {must} was acknowledged more than {lag:?} before the GET"
                );
                }
            }
            if got < seen[k] {
                let n = ctx.stats.backwards.fetch_add(1, Ordering::Relaxed);
                if n < 20 {
                    eprintln!(
                    "soak_load: BACKWARDS read: {name} GET quote:ver:{k} = {got} after it read {}",
                    seen[k]
                );
                }
            }
            seen[k] = seen[k].max(got);
            Ok(1)
        },
    );
}

fn pipeline(ctx: &Ctx, id: usize) {
    let key = format!("soak:pipe:{id}");
    let mut rng = Rng::new(3000 + id as u64);
    let name = format!("pipeline{id}");
    worker(
        ctx,
        &ctx.args.addr,
        &name,
        "pipeline",
        Some(Duration::from_millis(10)),
        |c| {
            let mut b = Vec::new();
            for _ in 0..32 {
                encode(&mut b, &[b"INCR", key.as_bytes()]);
                let k = hot_key(&ctx.zipf, &mut rng);
                encode(&mut b, &[b"GET", k.as_bytes()]);
            }
            if let Err(e) = c.send(&b) {
                ctx.count(&key, 0, 32);
                return Err(e);
            }
            // Every reply is read; the first problem is reported after.
            let mut failure = None;
            let mut last: Option<i64> = None;
            for i in 0..64 {
                let r = match c.read() {
                    Ok(r) => r,
                    Err(e) => {
                        // INCRs from this one on got no reply: applied or not, nobody knows.
                        ctx.count(&key, 0, 32 - i / 2);
                        return Err(e);
                    }
                };
                if i % 2 == 1 {
                    if let Reply::Error(e) = r {
                        failure.get_or_insert(Failure::Reply(e));
                    }
                    continue;
                }
                match r {
                    Reply::Int(n) => {
                        ctx.count(&key, 1, 0);
                        if last.is_some_and(|l| n != l + 1) {
                            failure.get_or_insert(Failure::Unexpected("INCR out of order".into()));
                        }
                        last = Some(n);
                    }
                    Reply::Error(e) => {
                        ctx.count(&key, 0, 1);
                        last = None;
                        failure.get_or_insert(Failure::Reply(e));
                    }
                    other => {
                        ctx.count(&key, 0, 1);
                        failure.get_or_insert(Failure::Unexpected(short(&other)));
                    }
                }
            }
            match failure {
                None => Ok(64),
                Some(f) => Err(f),
            }
        },
    );
}

fn multi(ctx: &Ctx) {
    let key = "soak:tx";
    worker(
        ctx,
        &ctx.args.addr,
        "multi",
        "multi",
        Some(Duration::from_millis(10)),
        |c| {
            let mut b = Vec::new();
            encode(&mut b, &[b"MULTI"]);
            encode(&mut b, &[b"INCR", key.as_bytes()]);
            encode(&mut b, &[b"SET", b"quote:tx", b"v"]);
            encode(&mut b, &[b"EXEC"]);
            if let Err(e) = c.send(&b) {
                ctx.count(key, 0, 1);
                return Err(e);
            }
            let mut replies = Vec::new();
            for _ in 0..4 {
                match c.read() {
                    Ok(r) => replies.push(r),
                    Err(e) => {
                        ctx.count(key, 0, 1);
                        return Err(e);
                    }
                }
            }
            match &replies[3] {
                Reply::Array(Some(items))
                    if items.len() == 2 && matches!(items[0], Reply::Int(_)) =>
                {
                    ctx.count(key, 1, 0);
                    Ok(1)
                }
                Reply::Error(e) => {
                    ctx.count(key, 0, 1);
                    Err(Failure::Reply(e.clone()))
                }
                other => {
                    ctx.count(key, 0, 1);
                    Err(Failure::Unexpected(format!("EXEC {other:?}")))
                }
            }
        },
    );
}

fn publisher(ctx: &Ctx) {
    let mut n = 0u64;
    worker(
        ctx,
        &ctx.args.addr,
        "publisher",
        "publish",
        Some(Duration::from_millis(10)),
        |c| {
            n += 1;
            for ch in [&b"soak:chan:0"[..], b"soak:chan:1"] {
                c.cmd(&[b"PUBLISH", ch, n.to_string().as_bytes()])?;
            }
            *ctx.published.lock().unwrap() = Some(Instant::now());
            Ok(1)
        },
    );
}

fn subscriber(ctx: &Ctx, id: usize) {
    let chan = format!("soak:chan:{id}");
    let name = format!("subscriber{id}");
    let mut subscribed = false;
    let mut conn: Option<Conn> = None;
    while ctx.running() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match ctx.connect(&ctx.args.addr, &name) {
                Some(c) => {
                    subscribed = false;
                    let c = conn.insert(c);
                    // Short reads: a silent subscription is noticed within 5 s.
                    c.r.get_ref()
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .ok();
                    c
                }
                None => return,
            },
        };
        let r = if subscribed {
            c.read()
        } else {
            c.cmd(&[b"SUBSCRIBE", chan.as_bytes()])
        };
        match r {
            Ok(Reply::Array(Some(items))) if items.len() == 3 => {
                if items[0] == Reply::Bulk(Some(b"message".to_vec())) {
                    ctx.stats.ok("receive", 1);
                } else {
                    subscribed = true;
                }
            }
            Ok(other) => {
                ctx.stats
                    .error(&name, &Failure::Unexpected(format!("{other:?}")));
                conn = None;
            }
            Err(Failure::Hung) => {
                // Silent for 5 s: a problem only if the publisher got through meanwhile.
                let recent = ctx
                    .published
                    .lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(4));
                if recent {
                    ctx.stats.error(
                        &name,
                        &Failure::Unexpected("silence while publishing".into()),
                    );
                    conn = None;
                }
            }
            Err(e) => {
                ctx.stats.error(&name, &e);
                conn = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn producer(ctx: &Ctx) {
    worker(
        ctx,
        &ctx.args.addr,
        "producer",
        "push",
        Some(Duration::from_millis(5)),
        |c| {
            c.cmd(&[b"RPUSH", b"soak:jobs", b"job"])?;
            Ok(1)
        },
    );
}

fn consumer(ctx: &Ctx, id: usize) {
    worker(
        ctx,
        &ctx.args.addr,
        &format!("consumer{id}"),
        "pop",
        None,
        |c| match c.cmd(&[b"BLPOP", b"soak:jobs", b"1"])? {
            Reply::Array(Some(_)) => Ok(1),
            Reply::Array(None) => Ok(0),
            other => Err(Failure::Unexpected(format!("{other:?}"))),
        },
    );
}

const BLOB: usize = 16 * 1024;

fn slow_reader(ctx: &Ctx, id: usize) {
    let key = format!("soak:blob:{id}");
    let per_tick = (ctx.args.slow_kibps as usize * 1024 / 50).max(1); // bytes per 20 ms
    worker(
        ctx,
        &ctx.args.addr,
        &format!("slow{id}"),
        "slow",
        None,
        |c| {
            let mut b = Vec::new();
            for _ in 0..32 {
                encode(&mut b, &[b"GET", key.as_bytes()]);
            }
            c.send(&b)?;
            // Read the raw bytes slowly, then frame them.
            let expect = 32 * (format!("${BLOB}\r\n").len() + BLOB + 2);
            let mut got = Vec::with_capacity(expect);
            let mut chunk = vec![0u8; per_tick];
            // Straight from the socket (nothing is buffered between requests).
            assert!(c.r.buffer().is_empty());
            while got.len() < expect {
                let want = per_tick.min(expect - got.len());
                let n = c.r.get_mut().read(&mut chunk[..want]).map_err(io)?;
                if n == 0 {
                    return Err(Failure::Io(std::io::ErrorKind::UnexpectedEof));
                }
                got.extend_from_slice(&chunk[..n]);
                if got.starts_with(b"-") || got.starts_with(b"$-1") {
                    // An error or a missing blob: frame what came and report it.
                    let mut r = BufReader::new(&got[..]);
                    return match read_reply(&mut r) {
                        Ok(Reply::Error(e)) => Err(Failure::Reply(e)),
                        _ => Err(Failure::Unexpected("blob missing".into())),
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut r = BufReader::new(&got[..]);
            for _ in 0..32 {
                match read_reply(&mut r)? {
                    Reply::Bulk(Some(v)) if v.len() == BLOB => {}
                    other => return Err(Failure::Unexpected(format!("blob {:?}", short(&other)))),
                }
            }
            Ok(32)
        },
    );
}

fn short(r: &Reply) -> String {
    let s = format!("{r:?}");
    s.chars().take(60).collect()
}

// ------------------------------------------------------------------ main

fn main() {
    let args = parse_args();
    let ctx = Arc::new(Ctx {
        zipf: Zipf::new(args.symbols, args.zipf),
        acked: (0..VERSION_KEYS)
            .map(|_| Mutex::new(VecDeque::new()))
            .collect(),
        args,
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        counters: Mutex::new(HashMap::new()),
        published: Mutex::new(None),
    });

    // Seed: blobs for the slow readers, counters' start values (a previous run's are kept).
    let mut start_counters: HashMap<String, u64> = HashMap::new();
    {
        let mut c = Conn::open(&ctx.args.redis, ctx.timeout()).expect("Redis answers");
        let blob = vec![b'b'; BLOB];
        for id in 0..2 * ctx.args.scale {
            c.cmd(&[b"SET", format!("soak:blob:{id}").as_bytes(), &blob])
                .expect("seed");
        }
        for id in 0..2 * ctx.args.scale {
            let key = format!("soak:pipe:{id}");
            let v = bulk_u64(&c.cmd(&[b"GET", key.as_bytes()]).expect("GET")).unwrap_or(0);
            start_counters.insert(key, v);
        }
        let v = bulk_u64(&c.cmd(&[b"GET", b"soak:tx"]).expect("GET")).unwrap_or(0);
        start_counters.insert("soak:tx".into(), v);
    }

    let mut threads = Vec::new();
    let spawn = |threads: &mut Vec<std::thread::JoinHandle<()>>,
                 f: Box<dyn FnOnce(&Ctx) + Send>| {
        let ctx = ctx.clone();
        threads.push(std::thread::spawn(move || f(&ctx)));
    };
    let s = ctx.args.scale;
    for id in 0..6 * s {
        spawn(&mut threads, Box::new(move |c| reader(c, id)));
    }
    for id in 0..s as u64 {
        spawn(&mut threads, Box::new(move |c| writer(c, id, false)));
        spawn(&mut threads, Box::new(move |c| writer(c, id, true)));
    }
    spawn(&mut threads, Box::new(|c| version_writer(c, false)));
    spawn(&mut threads, Box::new(|c| version_writer(c, true)));
    for id in 0..2 {
        spawn(&mut threads, Box::new(move |c| checker(c, id)));
    }
    for id in 0..2 * s {
        spawn(&mut threads, Box::new(move |c| pipeline(c, id)));
    }
    spawn(&mut threads, Box::new(multi));
    spawn(&mut threads, Box::new(publisher));
    for id in 0..2 {
        spawn(&mut threads, Box::new(move |c| subscriber(c, id)));
    }
    spawn(&mut threads, Box::new(producer));
    for id in 0..2 {
        spawn(&mut threads, Box::new(move |c| consumer(c, id)));
    }
    for id in 0..2 * s {
        spawn(&mut threads, Box::new(move |c| slow_reader(c, id)));
    }

    let started = Instant::now();
    let end = started + Duration::from_secs_f64(ctx.args.duration);
    let tmp = format!("{}.tmp", ctx.args.stats);
    loop {
        let line = ctx.stats.line();
        if std::fs::write(&tmp, format!("{line}\n")).is_ok() {
            let _ = std::fs::rename(&tmp, &ctx.args.stats);
        }
        if Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_secs(1).min(end - Instant::now()));
    }
    ctx.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }

    // Write integrity: what Redis holds against what clients were told.
    let (mut lost, mut extra) = (0u64, 0u64);
    let mut details = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        match Conn::open(&ctx.args.redis, ctx.timeout()) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("soak_load: final check waits for Redis: {e:?}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("Redis unreachable for the final check: {e:?}"),
        }
    };
    let counters = ctx.counters.lock().unwrap();
    let mut keys: Vec<&String> = counters.keys().collect();
    keys.sort();
    for key in keys {
        let (acked, unknown) = counters[key];
        let start = start_counters.get(key).copied().unwrap_or(0);
        let now = bulk_u64(&c.cmd(&[b"GET", key.as_bytes()]).expect("GET")).unwrap_or(0);
        if now < start {
            lost += start - now;
        }
        let on_redis = now.saturating_sub(start);
        if on_redis < acked {
            lost += acked - on_redis;
        }
        if on_redis > acked + unknown {
            extra += on_redis - acked - unknown;
        }
        details.push(format!(
            "{key}:acked={acked},unanswered={unknown},redis={on_redis}"
        ));
    }
    println!(
        "final {} lost_acked_writes={lost} extra_writes={extra} counters={}",
        ctx.stats.line(),
        details.join(";")
    );
}
