//! Closed-loop Redis load generator for scripts/bench (no dependencies: raw RESP over
//! std::net::TcpStream, one OS thread per connection).
//!
//! Modes:
//!   mixed  N connections, each sends one command, waits for the reply, repeats. A request
//!          is a GET with probability --read-pct, else a SET; the key is drawn from a Zipf
//!          distribution (exponent --zipf) over --keys keys. Latency of every measured
//!          request is recorded; prints ops/s, p50, p99 (ms).
//!   seed   SET every key 0..keys-1 (pipelined, one connection).
//!   scan   GET every key 0..keys-1 once (pipelined, one connection): fills a near cache.
//!
//! Keys are <--prefix><n>; --pad 12 zero-pads n like redis-benchmark's key:__rand_int__.
//!
//! Output (mixed): one line `ops=<ops/s> p50_ms=<..> p99_ms=<..> avg_ms=<..> n=<..> errors=<..>`.
//!
//! Every run is bounded: --duration seconds of measurement after --warmup seconds.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

struct Args {
    addr: String,
    mode: String,
    conns: usize,
    duration: f64,
    warmup: f64,
    keys: usize,
    zipf: f64,
    read_pct: f64,
    value_size: usize,
    prefix: String,
    pipeline: usize,
    pad: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:6379".into(),
        mode: "mixed".into(),
        conns: 50,
        duration: 10.0,
        warmup: 2.0,
        keys: 10_000,
        zipf: 1.0,
        read_pct: 90.0,
        value_size: 64,
        prefix: "key:z:".into(),
        pipeline: 64,
        pad: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        let val = argv.get(i + 1).cloned().unwrap_or_else(|| {
            eprintln!("missing value for {flag}");
            std::process::exit(2)
        });
        match flag {
            "--addr" => a.addr = val,
            "--mode" => a.mode = val,
            "--conns" => a.conns = val.parse().expect("--conns"),
            "--duration" => a.duration = val.parse().expect("--duration"),
            "--warmup" => a.warmup = val.parse().expect("--warmup"),
            "--keys" => a.keys = val.parse().expect("--keys"),
            "--zipf" => a.zipf = val.parse().expect("--zipf"),
            "--read-pct" => a.read_pct = val.parse().expect("--read-pct"),
            "--value-size" => a.value_size = val.parse().expect("--value-size"),
            "--prefix" => a.prefix = val,
            "--pipeline" => a.pipeline = val.parse().expect("--pipeline"),
            "--pad" => a.pad = val.parse().expect("--pad"),
            _ => {
                eprintln!(
                    "usage: bench_load --addr HOST:PORT [--mode mixed|seed|scan] [--conns 50] \
                     [--duration 10] [--warmup 2] [--keys 10000] [--zipf 1.0] [--read-pct 90] \
                     [--value-size 64] [--prefix key:z:] [--pad 0] [--pipeline 64]"
                );
                std::process::exit(2)
            }
        }
        i += 2;
    }
    a
}

/// xorshift64*: fast, good enough for key and op selection.
struct Rng(u64);
impl Rng {
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
}

/// Zipf over ranks 0..n: P(rank k) ∝ 1/(k+1)^s, sampled by binary search of the CDF.
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

fn encode(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one RESP2/RESP3 reply; returns false when it was an error reply.
fn read_reply<R: BufRead>(r: &mut R, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    r.read_until(b'\n', line)?;
    if line.len() < 3 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "short reply",
        ));
    }
    let kind = line[0];
    let num = || -> i64 {
        std::str::from_utf8(&line[1..line.len() - 2])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1)
    };
    match kind {
        b'+' | b':' | b'_' | b',' | b'#' => Ok(true),
        b'-' => Ok(false),
        b'$' | b'=' | b'!' => {
            let n = num();
            if n >= 0 {
                let mut buf = vec![0u8; n as usize + 2];
                r.read_exact(&mut buf)?;
            }
            Ok(kind != b'!')
        }
        b'*' | b'~' | b'>' | b'%' => {
            let n = num();
            let n = if kind == b'%' { n * 2 } else { n };
            let mut ok = true;
            let mut l2 = Vec::new();
            for _ in 0..n.max(0) {
                ok &= read_reply(r, &mut l2)?;
            }
            Ok(ok)
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected reply byte {:?}", kind as char),
        )),
    }
}

fn connect(addr: &str) -> (BufReader<TcpStream>, BufWriter<TcpStream>) {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| {
        eprintln!("bench_load: connect {addr}: {e}");
        std::process::exit(1)
    });
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let w = s.try_clone().expect("clone");
    (
        BufReader::with_capacity(64 * 1024, s),
        BufWriter::with_capacity(64 * 1024, w),
    )
}

fn value(size: usize, i: usize) -> Vec<u8> {
    let mut v = format!("v{i}:").into_bytes();
    v.resize(size, b'x');
    v
}

/// seed (SET) or scan (GET) every key once, pipelined on one connection.
fn sweep(a: &Args, set: bool) {
    let (mut r, mut w) = connect(&a.addr);
    let start = Instant::now();
    let mut errors = 0u64;
    let mut line = Vec::new();
    let mut i = 0;
    while i < a.keys {
        let end = (i + a.pipeline.max(1)).min(a.keys);
        let mut out = Vec::new();
        for k in i..end {
            let key = format!("{}{:0pad$}", a.prefix, k, pad = a.pad);
            if set {
                let v = value(a.value_size, k);
                encode(&mut out, &[b"SET", key.as_bytes(), &v]);
            } else {
                encode(&mut out, &[b"GET", key.as_bytes()]);
            }
        }
        w.write_all(&out).unwrap();
        w.flush().unwrap();
        for _ in i..end {
            if !read_reply(&mut r, &mut line).expect("reply") {
                errors += 1;
            }
        }
        i = end;
    }
    println!(
        "{} keys={} secs={:.2} errors={}",
        if set { "seeded" } else { "scanned" },
        a.keys,
        start.elapsed().as_secs_f64(),
        errors
    );
}

fn mixed(a: &Args) {
    let zipf = Arc::new(Zipf::new(a.keys, a.zipf));
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(a.conns + 1));
    let read_frac = a.read_pct / 100.0;
    let mut handles = Vec::new();
    for t in 0..a.conns {
        let (zipf, stop, measuring, errors, barrier) = (
            zipf.clone(),
            stop.clone(),
            measuring.clone(),
            errors.clone(),
            barrier.clone(),
        );
        let addr = a.addr.clone();
        let prefix = a.prefix.clone();
        let vsize = a.value_size;
        let pad = a.pad;
        handles.push(std::thread::spawn(move || {
            let (mut r, mut w) = connect(&addr);
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1000_0001_B3));
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
            let mut out = Vec::with_capacity(256);
            let mut line = Vec::with_capacity(128);
            let val = value(vsize, t);
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let k = zipf.sample(&mut rng);
                let key = format!("{prefix}{k:0pad$}");
                out.clear();
                if rng.unit() < read_frac {
                    encode(&mut out, &[b"GET", key.as_bytes()]);
                } else {
                    encode(&mut out, &[b"SET", key.as_bytes(), &val]);
                }
                let t0 = Instant::now();
                if w.write_all(&out).and_then(|_| w.flush()).is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                match read_reply(&mut r, &mut line) {
                    Ok(true) => {}
                    Ok(false) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                if measuring.load(Ordering::Relaxed) {
                    let ns = t0.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                    lat.push(ns);
                }
            }
            lat
        }));
    }
    barrier.wait();
    std::thread::sleep(Duration::from_secs_f64(a.warmup));
    measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(a.duration));
    measuring.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let mut all: Vec<u32> = Vec::new();
    for h in handles {
        all.extend(h.join().unwrap_or_default());
    }
    all.sort_unstable();
    let n = all.len();
    let pct = |p: f64| -> f64 {
        if n == 0 {
            return f64::NAN;
        }
        let idx = ((p / 100.0) * n as f64).ceil() as usize;
        all[idx.clamp(1, n) - 1] as f64 / 1e6
    };
    let avg = if n == 0 {
        f64::NAN
    } else {
        all.iter().map(|&x| x as f64).sum::<f64>() / n as f64 / 1e6
    };
    println!(
        "ops={:.0} p50_ms={:.3} p99_ms={:.3} avg_ms={:.3} n={} errors={}",
        n as f64 / elapsed,
        pct(50.0),
        pct(99.0),
        avg,
        n,
        errors.load(Ordering::Relaxed)
    );
}

fn main() {
    let a = parse_args();
    match a.mode.as_str() {
        "mixed" => mixed(&a),
        "seed" => sweep(&a, true),
        "scan" => sweep(&a, false),
        m => {
            eprintln!("unknown --mode {m}");
            std::process::exit(2)
        }
    }
}
