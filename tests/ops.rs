//! Operations: metrics that follow traffic, health and readiness across an
//! upstream outage, the read-only admin endpoint, SIGTERM under load with the
//! real binary, log formats and secrets, `--check-config`, and local
//! `requirepass`. Every test runs against a real `redis-server`.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use support::{free_port, raw_until, test_config, Proxy, RedisServer};

/// The metrics registry is process-wide: tests that compare counters or
/// gauges exactly, or that move them, run one at a time.
static METRICS: Mutex<()> = Mutex::new(());

fn metrics_lock() -> MutexGuard<'static, ()> {
    METRICS.lock().unwrap_or_else(|e| e.into_inner())
}

// --- HTTP and Prometheus text ------------------------------------------------------

/// One HTTP/1.1 request to the admin port; returns (status, body).
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no status line in {out:?}"))
        .parse()
        .unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// `name{a="x",b="y"}` with labels sorted, as the key of a sample.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<(&str, &str)> = labels.to_vec();
    labels.sort();
    if labels.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// Parses the Prometheus text exposition format into series → value. Checks
/// that every sample belongs to a family declared by `# TYPE`.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (n, t) = (it.next().unwrap(), it.next().unwrap());
            types.insert(n.to_string(), t.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let name = &line[..open];
                let (labels, used) = parse_labels(&line[open + 1..]);
                (name, labels, &line[open + 1 + used..])
            }
            None => {
                let sp = line.find(' ').expect("sample has a value");
                (&line[..sp], Vec::new(), &line[sp..])
            }
        };
        let value: f64 = match rest.split_whitespace().next().expect("value") {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "sample {name} has no # TYPE line"
        );
        let refs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        out.insert(series(name, &refs), value);
    }
    out
}

/// Parses `a="x",b="y\"z"}`; returns the labels and the bytes consumed (through `}`).
fn parse_labels(s: &str) -> (Vec<(String, String)>, usize) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut labels = Vec::new();
    loop {
        while b[i] == b',' || b[i] == b' ' {
            i += 1;
        }
        if b[i] == b'}' {
            return (labels, i + 1);
        }
        let eq = i + s[i..].find('=').expect("label =");
        let key = s[i..eq].trim().to_string();
        assert_eq!(b[eq + 1], b'"', "label value is quoted in {s:?}");
        let mut j = eq + 2;
        let mut value = String::new();
        while b[j] != b'"' {
            if b[j] == b'\\' {
                j += 1;
                value.push(match b[j] {
                    b'n' => '\n',
                    c => c as char,
                });
            } else {
                value.push(b[j] as char);
            }
            j += 1;
        }
        labels.push((key, value));
        i = j + 1;
    }
}

struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0.get(&series(name, labels)).copied().unwrap_or(0.0)
    }

    /// Sum over every series of a metric (all label values).
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0
            .keys()
            .any(|k| k == name || k.starts_with(&format!("{name}{{")))
    }
}

fn scrape(admin: u16) -> Scrape {
    let (code, body) = http(admin, "GET", "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    Scrape(parse_prometheus(&body))
}

/// Polls until `ok` holds for a fresh scrape; panics with `what` after `timeout`.
fn wait_metric(admin: u16, timeout: Duration, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + timeout;
    loop {
        let s = scrape(admin);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} (after {timeout:?})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ready(admin: u16, want: u16, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (code, body) = http(admin, "GET", "/readyz");
        if code == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "/readyz stayed {code} ({body:?}) instead of {want} for {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// --- 1. Metrics ---------------------------------------------------------------------

#[test]
fn metrics_follow_traffic() {
    let _g = metrics_lock();
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    let admin = proxy.admin_port.unwrap();
    let hits = |s: &Scrape| s.get("nearcache_cache_hits_total", &[("pattern", "quote:*")]);
    let misses = |s: &Scrape| s.get("nearcache_cache_misses_total", &[("pattern", "quote:*")]);
    let req = |s: &Scrape, cmd: &str, outcome: &str| {
        s.get(
            "nearcache_requests_total",
            &[("command", cmd), ("outcome", outcome)],
        )
    };
    let lat_count = |s: &Scrape| s.get("nearcache_upstream_latency_seconds_count", &[]);

    let before = scrape(admin);
    // Every family of the reference is exposed, labelled ones once they have a series.
    for name in [
        "nearcache_build_info",
        "nearcache_ready",
        "nearcache_client_connections",
        "nearcache_client_connections_total",
        "nearcache_client_connections_rejected_total",
        "nearcache_cache_evictions_total",
        "nearcache_cache_entries",
        "nearcache_cache_bytes",
        "nearcache_cache_max_bytes",
        "nearcache_cache_serving",
        "nearcache_cache_coalesced_misses_total",
        "nearcache_invalidation_feed_up",
        "nearcache_invalidation_feed_reconnects_total",
        "nearcache_upstream_latency_seconds_count",
        "nearcache_upstream_reconnects_total",
        "nearcache_upstream_pool_connections",
        "nearcache_upstream_pinned_connections",
        "nearcache_upstream_up",
        "nearcache_tdengine_circuit_open",
        "nearcache_tdengine_rejected_keys_total",
    ] {
        assert!(before.has(name), "{name} is not exposed");
    }
    assert_eq!(before.get("nearcache_ready", &[]), 1.0);
    assert_eq!(before.get("nearcache_cache_serving", &[]), 1.0);
    assert_eq!(before.get("nearcache_upstream_up", &[]), 1.0);
    assert_eq!(
        before.get("nearcache_cache_max_bytes", &[]),
        (256u64 << 20) as f64
    );
    assert_eq!(
        before.sum("nearcache_invalidation_feed_up"),
        1.0,
        "exactly one feed mode is up"
    );
    assert!(before.get("nearcache_upstream_pool_connections", &[]) >= 2.0);

    // Traffic: a write, a miss that fills L1, then hits.
    let mut c = proxy.conn();
    redis::cmd("SET")
        .arg("quote:1")
        .arg("42")
        .exec(&mut c)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        for _ in 0..2 {
            let v: String = redis::cmd("GET").arg("quote:1").query(&mut c).unwrap();
            assert_eq!(v, "42");
        }
        let s = scrape(admin);
        if hits(&s) > hits(&before) {
            break s;
        }
        // The SET's own invalidation may still be on its way back through the feed.
        assert!(Instant::now() < deadline, "GET quote:1 never hit L1");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        misses(&after) >= misses(&before) + 1.0,
        "no L1 miss counted"
    );
    assert!(req(&after, "get", "hit") >= req(&before, "get", "hit") + 1.0);
    assert!(req(&after, "get", "miss") >= req(&before, "get", "miss") + 1.0);
    assert!(req(&after, "set", "forward") >= req(&before, "set", "forward") + 1.0);
    assert!(
        lat_count(&after) >= lat_count(&before) + 2.0,
        "the SET and the miss went upstream"
    );
    assert!(after.get("nearcache_cache_entries", &[]) >= 1.0);
    assert!(after.get("nearcache_cache_bytes", &[]) > 0.0);
    // Overwriting a cached key invalidates it locally.
    redis::cmd("SET")
        .arg("quote:1")
        .arg("43")
        .exec(&mut c)
        .unwrap();
    let s = scrape(admin);
    assert!(
        s.get(
            "nearcache_cache_invalidations_total",
            &[("source", "local_write")]
        ) > before.get(
            "nearcache_cache_invalidations_total",
            &[("source", "local_write")]
        ),
        "a SET of a cached key counts a local_write invalidation"
    );

    // Client connections: the gauge follows open sockets, the counter accepted ones.
    let base = scrape(admin);
    let g0 = base.get("nearcache_client_connections", &[]);
    let extra: Vec<redis::Connection> = (0..3)
        .map(|_| {
            let mut c = proxy.conn();
            redis::cmd("PING").exec(&mut c).unwrap();
            c
        })
        .collect();
    let s = wait_metric(admin, Duration::from_secs(2), "gauge +3", |s| {
        s.get("nearcache_client_connections", &[]) == g0 + 3.0
    });
    assert!(
        s.get("nearcache_client_connections_total", &[])
            >= base.get("nearcache_client_connections_total", &[]) + 3.0
    );
    drop(extra);
    wait_metric(
        admin,
        Duration::from_secs(2),
        "gauge back after close",
        |s| s.get("nearcache_client_connections", &[]) == g0,
    );

    // Upstream errors: Redis dies; the next command fails and is counted.
    let errs = |s: &Scrape| s.sum("nearcache_upstream_errors_total");
    let before_kill = scrape(admin);
    redis.kill();
    let r: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("plain:1").query(&mut c);
    let e = r.expect_err("GET with Redis down must fail");
    assert!(
        e.to_string().contains("upstream unavailable"),
        "unexpected error: {e}"
    );
    let s = wait_metric(
        admin,
        Duration::from_secs(3),
        "upstream errors counted, upstream_up, ready and serving at 0",
        |s| {
            errs(s) > errs(&before_kill)
                && s.get("nearcache_upstream_up", &[]) == 0.0
                && s.get("nearcache_ready", &[]) == 0.0
                && s.get("nearcache_cache_serving", &[]) == 0.0
                && s.sum("nearcache_invalidation_feed_up") == 0.0
        },
    );
    assert!(
        s.get("nearcache_upstream_errors_total", &[("kind", "connect")]) >= 1.0,
        "reconnect attempts count as connect errors"
    );
    assert!(
        s.get("nearcache_upstream_pool_connections", &[])
            < before_kill.get("nearcache_upstream_pool_connections", &[])
    );
    assert!(
        req(&s, "get", "error") + req(&s, "get", "miss") + req(&s, "get", "forward")
            > req(&before_kill, "get", "error")
                + req(&before_kill, "get", "miss")
                + req(&before_kill, "get", "forward"),
        "the failed GET is counted"
    );
}

// --- 2. Health, readiness, read-only admin ------------------------------------------

#[test]
fn health_and_readiness_follow_upstream() {
    let _g = metrics_lock();
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let admin = proxy.admin_port.unwrap();
    proxy.wait_serving();
    assert_eq!(http(admin, "GET", "/healthz"), (200, "ok\n".into()));
    wait_ready(admin, 200, Duration::from_secs(2));
    assert_eq!(http(admin, "GET", "/readyz").1, "ready\n");

    redis.kill();
    let down = wait_ready(admin, 503, Duration::from_secs(2));
    let (code, body) = http(admin, "GET", "/readyz");
    assert_eq!(code, 503);
    assert!(body.starts_with("not ready: "), "{body:?}");
    // Liveness does not depend on the upstream: restarting nearcache would not help.
    assert_eq!(http(admin, "GET", "/healthz").0, 200);

    redis.restart();
    let up = wait_ready(admin, 200, Duration::from_secs(3));
    eprintln!("readyz: 503 after {down:?} of the kill, 200 after {up:?} of the restart");
    // Ready means L1 serves again too.
    proxy.wait_serving();
}

#[test]
fn admin_endpoint_is_read_only() {
    let _g = metrics_lock();
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let admin = proxy.admin_port.unwrap();
    proxy.wait_serving();
    let mut c = proxy.conn();
    redis::cmd("SET")
        .arg("quote:ro")
        .arg("1")
        .exec(&mut c)
        .unwrap();
    // Fill L1 and see it hit.
    let deadline = Instant::now() + Duration::from_secs(5);
    let hits0 = loop {
        let _: String = redis::cmd("GET").arg("quote:ro").query(&mut c).unwrap();
        let h0 = proxy.stat("hits");
        let _: String = redis::cmd("GET").arg("quote:ro").query(&mut c).unwrap();
        if proxy.stat("hits") > h0 {
            break proxy.stat("hits");
        }
        assert!(Instant::now() < deadline, "quote:ro never hit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let flushes = proxy.stat("flushes");
    let entries = proxy.stat("entries");

    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/metrics", "/healthz", "/readyz", "/flush", "/"] {
            let (code, body) = http(admin, method, path);
            assert_eq!(code, 405, "{method} {path}: {body}");
        }
    }
    for path in [
        "/flush",
        "/nearcache/flush",
        "/admin/flush",
        "/shutdown",
        "/reload",
        "/metrics/../flush",
        "/",
    ] {
        let (code, _) = http(admin, "GET", path);
        assert_eq!(code, 404, "GET {path}");
    }
    // HEAD answers the status without a body; query strings are ignored.
    assert_eq!(http(admin, "HEAD", "/metrics"), (200, String::new()));
    assert_eq!(http(admin, "GET", "/healthz?flush=1").0, 200);

    // Nothing changed: no flush, the entry is still there and still hits.
    assert_eq!(proxy.stat("flushes"), flushes, "an HTTP request flushed L1");
    assert_eq!(proxy.stat("entries"), entries);
    let _: String = redis::cmd("GET").arg("quote:ro").query(&mut c).unwrap();
    assert_eq!(proxy.stat("hits"), hits0 + 1, "quote:ro no longer cached");
    assert_eq!(http(admin, "GET", "/readyz").0, 200);
}

// --- The real binary ----------------------------------------------------------------

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nearcache-ops-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `nearcache` binary running as a child process, killed on drop.
struct Binary {
    child: Option<Child>,
    port: u16,
    admin: u16,
    stderr: PathBuf,
}

impl Binary {
    fn start(dir: &Path, upstream: &str, config: Option<&str>, extra: &[&str]) -> Binary {
        let port = free_port();
        let admin = free_port();
        let stderr = dir.join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nearcache"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin}"))
            .arg("--upstream")
            .arg(upstream)
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("NEARCACHE_CONFIG")
            .env_remove("NEARCACHE_LOG_FORMAT")
            .env_remove("NEARCACHE_UPSTREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(text) = config {
            let file = dir.join("nearcache.toml");
            std::fs::write(&file, text).unwrap();
            cmd.arg("--config").arg(file);
        }
        let child = cmd.spawn().expect("nearcache binary");
        let mut b = Binary {
            child: Some(child),
            port,
            admin,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", admin)).is_err() {
            if let Some(status) = b.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nearcache exited with {status}: {}", b.logs());
            }
            assert!(
                Instant::now() < deadline,
                "nearcache did not start: {}",
                b.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill(1)");
        assert!(st.success());
    }

    /// Waits for the process to exit; None when it did not within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads one RESP reply line (and a bulk payload) from a raw socket; None on close/reset.
/// Panics on a read timeout: every request must get a reply or a close.
fn read_reply(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut used = end + 2;
            if let Some(len) = line.strip_prefix('$').and_then(|l| l.parse::<i64>().ok()) {
                if len >= 0 {
                    let need = used + len as usize + 2;
                    if buf.len() < need {
                        match s.read(&mut chunk) {
                            Ok(0) => return None,
                            Ok(n) => {
                                buf.extend_from_slice(&chunk[..n]);
                                continue;
                            }
                            Err(e) if is_timeout(&e) => panic!("no reply and no close: {e}"),
                            Err(_) => return None,
                        }
                    }
                    used = need;
                }
            }
            buf.drain(..used);
            return Some(line);
        }
        match s.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => panic!("no reply and no close: {e}"),
            Err(_) => return None,
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

// --- 3. SIGTERM under load ----------------------------------------------------------

#[test]
fn sigterm_drains_under_load_and_exits_zero() {
    const CLIENTS: usize = 4;
    let redis = RedisServer::start();
    let dir = scratch("sigterm");
    let mut nc = Binary::start(&dir, &redis.url(), Some("shutdown_grace = \"3s\"\n"), &[]);
    wait_ready(nc.admin, 200, Duration::from_secs(10));
    let port = nc.port;

    // A blocked request in flight: BLPOP for 2 s must still be answered during the drain.
    let blocked = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        s.write_all(b"*3\r\n$5\r\nBLPOP\r\n$11\r\nnever:there\r\n$1\r\n2\r\n")
            .unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let reply = read_reply(&mut s, &mut buf);
        (reply, started.elapsed())
    });

    // INCR load: each client has at most one INCR in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
                let mut buf = Vec::new();
                let mut acked = 0u64;
                let mut last = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n")
                        .is_err()
                    {
                        break;
                    }
                    match read_reply(&mut s, &mut buf) {
                        Some(line) => {
                            let n: i64 = line
                                .strip_prefix(':')
                                .and_then(|n| n.parse().ok())
                                .unwrap_or_else(|| panic!("INCR answered {line:?}"));
                            assert!(n > last, "INCR replies go up");
                            last = n;
                            acked += 1;
                        }
                        None => break, // closed by the drain
                    }
                }
                acked
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(400));
    let term_at = Instant::now();
    nc.signal("TERM");

    // Readiness fails while the blocked request drains.
    let mut saw_503 = false;
    while term_at.elapsed() < Duration::from_millis(1500) {
        match TcpStream::connect(("127.0.0.1", nc.admin)) {
            Ok(_) => {
                let (code, body) = http(nc.admin, "GET", "/readyz");
                if code == 503 {
                    assert!(body.contains("shutting down"), "{body:?}");
                    saw_503 = true;
                    break;
                }
            }
            Err(_) => break,
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // New connections are refused (or closed without an answer).
    std::thread::sleep(Duration::from_millis(200));
    match TcpStream::connect(("127.0.0.1", port)) {
        Err(_) => {}
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => {}
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    panic!(
                        "a connection made after SIGTERM was served: {:?}",
                        String::from_utf8_lossy(&buf)
                    );
                }
            }
        }
    }

    let status = nc.wait_exit(Duration::from_secs(6));
    let exited_after = term_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let status = status.unwrap_or_else(|| panic!("no exit 6 s after SIGTERM: {}", nc.logs()));
    assert!(status.success(), "exit status {status}: {}", nc.logs());
    assert!(
        exited_after < Duration::from_millis(3000 + 1500),
        "exit took {exited_after:?}, shutdown_grace is 3s"
    );

    let acked: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let (blpop, blpop_took) = blocked.join().unwrap();
    assert_eq!(
        blpop.as_deref(),
        Some("*-1"),
        "the BLPOP in flight was answered (after {blpop_took:?})"
    );
    assert!(
        exited_after >= Duration::from_millis(1000),
        "exited after {exited_after:?}, before the BLPOP in flight could be answered"
    );
    assert!(saw_503, "/readyz never answered 503 during the drain");

    let value: Option<u64> = redis::cmd("GET")
        .arg("counter")
        .query(&mut redis.conn())
        .unwrap();
    let value = value.unwrap_or(0);
    assert!(acked > 0, "no INCR was acknowledged before SIGTERM");
    assert!(
        value >= acked && value <= acked + CLIENTS as u64,
        "Redis has {value}, clients saw {acked} acknowledged INCRs"
    );
    let logs = nc.logs();
    assert!(logs.contains("draining"), "{logs}");
    assert!(logs.contains("nearcache stopped"), "{logs}");
    eprintln!("SIGTERM: {acked} INCRs acknowledged, Redis {value}, exit after {exited_after:?}");
}

#[test]
fn sigterm_exits_within_grace_with_a_stuck_request() {
    let redis = RedisServer::start();
    let dir = scratch("grace");
    let mut nc = Binary::start(&dir, &redis.url(), Some("shutdown_grace = \"1s\"\n"), &[]);
    wait_ready(nc.admin, 200, Duration::from_secs(10));
    // BLPOP forever: only the grace period ends it.
    let mut s = TcpStream::connect(("127.0.0.1", nc.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    s.write_all(b"*3\r\n$5\r\nBLPOP\r\n$5\r\nnever\r\n$1\r\n0\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let term_at = Instant::now();
    nc.signal("INT");
    let status = nc
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no exit 5 s after SIGINT: {}", nc.logs()));
    let took = term_at.elapsed();
    assert!(status.success(), "exit status {status}: {}", nc.logs());
    assert!(
        took < Duration::from_millis(2500),
        "exit took {took:?} with a 1s grace"
    );
    let mut buf = Vec::new();
    assert_eq!(
        read_reply(&mut s, &mut buf),
        None,
        "the stuck client is closed"
    );
}

// --- 4. Logs and --check-config -----------------------------------------------------

#[test]
fn json_logs_are_json_lines() {
    let redis = RedisServer::start();
    let dir = scratch("json");
    let mut nc = Binary::start(&dir, &redis.url(), None, &["--log-format", "json"]);
    wait_ready(nc.admin, 200, Duration::from_secs(10));
    nc.signal("TERM");
    assert!(nc.wait_exit(Duration::from_secs(15)).unwrap().success());
    let logs = nc.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    let mut started = None;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        assert!(v["message"].is_string(), "{line}");
        if v["message"] == "nearcache started" {
            started = Some(v);
        }
    }
    let started = started.unwrap_or_else(|| panic!("no 'nearcache started' line: {logs}"));
    assert_eq!(started["level"], "INFO");
    assert_eq!(started["listen"], format!("127.0.0.1:{}", nc.port));
    assert_eq!(
        started["upstream"],
        format!("redis://127.0.0.1:{}/0", redis.port)
    );
}

#[test]
fn logs_never_contain_the_upstream_password() {
    const PASSWORD: &str = "secret-ZQ7x";
    let redis = RedisServer::start();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .exec(&mut redis.conn())
        .unwrap();
    let dir = scratch("secret");
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    // Debug level, and the password also reaches nearcache as a client AUTH.
    let port = free_port();
    let admin = free_port();
    let stderr = dir.join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nearcache"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .args(["--upstream", &url])
        .env("RUST_LOG", "debug")
        .env_remove("NEARCACHE_LOG_FORMAT")
        .env_remove("NEARCACHE_CONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    support::wait_for_port(admin, Duration::from_secs(10));
    wait_ready(admin, 200, Duration::from_secs(10));
    let out = raw_until(
        port,
        format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{PASSWORD}\r\n*3\r\n$3\r\nSET\r\n$7\r\nquote:9\r\n$1\r\n1\r\n*2\r\n$3\r\nGET\r\n$7\r\nquote:9\r\n*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n", PASSWORD.len()).as_bytes(),
        |o| o.starts_with(b"+OK\r\n+OK\r\n$1\r\n1\r\n-"),
    );
    assert!(
        String::from_utf8_lossy(&out).starts_with("+OK\r\n+OK\r\n$1\r\n1\r\n-"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    // A config check prints the URL too.
    let check = Command::new(env!("CARGO_BIN_EXE_nearcache"))
        .args(["--upstream", &url, "--check-config"])
        .env_remove("NEARCACHE_CONFIG")
        .output()
        .unwrap();
    assert!(check.status.success());
    let check_out = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check_out.contains("redis://:***@127.0.0.1"), "{check_out}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&stderr).unwrap();
    assert!(logs.contains("nearcache started"), "{logs}");
    assert!(
        logs.contains(":***@"),
        "the URL is logged, redacted: {logs}"
    );
    assert!(
        !logs.contains("secret"),
        "the password leaked into the logs:\n{logs}"
    );
    assert!(!check_out.contains("secret"), "{check_out}");
}

#[test]
fn check_config_names_the_bad_key_and_exits_2() {
    let dir = scratch("check");
    let cases = [
        ("[cache]\nmax_bytes = \"lots\"\n", "cache.max_bytes"),
        ("shutdown_grace = \"soon\"\n", "shutdown_grace"),
        ("[upstream]\nurl = \"http://x\"\n", "upstream.url"),
        ("[server]\nmax_clients = 0\n", "server.max_clients"),
        ("[upstream]\npool_sise = 2\n", "upstream"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nearcache"))
            .arg("--config")
            .arg(&file)
            .arg("--check-config")
            .env_remove("NEARCACHE_UPSTREAM")
            .env_remove("NEARCACHE_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
        assert!(
            stderr.contains(key),
            "{text:?}: {stderr:?} does not name {key}"
        );
        assert!(
            out.stdout.is_empty(),
            "nothing on stdout for an invalid config"
        );
    }
    // The binary without --check-config refuses the same file the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_nearcache"))
        .arg("--config")
        .arg(dir.join("bad0.toml"))
        .env_remove("NEARCACHE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache.max_bytes"));
    // A valid file: exit 0 and a one-line summary on stdout.
    let good = dir.join("good.toml");
    std::fs::write(&good, "[cache]\nmax_bytes = \"64MiB\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nearcache"))
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .env_remove("NEARCACHE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

// --- 5. Local requirepass -----------------------------------------------------------

#[test]
fn local_requirepass() {
    let _g = metrics_lock();
    let redis = RedisServer::start();
    let mut config = test_config(&redis.url());
    config.server.requirepass = Some("pw".into());
    let proxy = Proxy::with_config(config);
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();

    let out = text(raw_until(
        proxy.port,
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        |o| o.ends_with(b"\r\n"),
    ));
    assert_eq!(out, "-NOAUTH Authentication required.\r\n");
    let out = text(raw_until(
        proxy.port,
        b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        |o| o.windows(2).filter(|w| w == b"\r\n").count() >= 2,
    ));
    assert!(out.starts_with("-WRONGPASS "), "{out:?}");
    assert!(
        out.ends_with("-NOAUTH Authentication required.\r\n"),
        "{out:?}"
    );
    // Nothing unauthenticated reaches Redis.
    let out = text(raw_until(
        proxy.port,
        b"*3\r\n$3\r\nSET\r\n$6\r\nsneaky\r\n$1\r\n1\r\n",
        |o| o.ends_with(b"\r\n"),
    ));
    assert!(out.starts_with("-NOAUTH"), "{out:?}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("sneaky")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(exists, 0);

    let out = text(raw_until(
        proxy.port,
        b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        |o| o.ends_with(b"$1\r\nv\r\n"),
    ));
    assert_eq!(out, "+OK\r\n+OK\r\n$1\r\nv\r\n");
    // AUTH default pw (the ACL form) works too; another user does not.
    let out = text(raw_until(
        proxy.port,
        b"*3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$2\r\npw\r\n*3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$2\r\npw\r\n",
        |o| o.windows(2).filter(|w| w == b"\r\n").count() >= 2,
    ));
    assert!(out.starts_with("+OK\r\n-WRONGPASS"), "{out:?}");

    // HELLO 3 AUTH default pw authenticates and switches to RESP3.
    let out = raw_until(
        proxy.port,
        b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$2\r\npw\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        |o| o.ends_with(b"$1\r\nv\r\n"),
    );
    assert!(out.starts_with(b"%"), "{:?}", text(out.clone()));
    assert!(out.ends_with(b"$1\r\nv\r\n"), "{:?}", text(out));
    let out = text(raw_until(
        proxy.port,
        b"*5\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$7\r\ndefault\r\n$3\r\nbad\r\n",
        |o| o.ends_with(b"\r\n"),
    ));
    assert!(out.starts_with("-WRONGPASS"), "{out:?}");
    let out = text(raw_until(
        proxy.port,
        b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n",
        |o| o.ends_with(b"\r\n"),
    ));
    assert!(out.starts_with("-NOAUTH HELLO must be called"), "{out:?}");

    // The redis crate with the password in the URL, RESP2 and RESP3.
    for url in [
        format!("redis://:pw@127.0.0.1:{}", proxy.port),
        format!(
            "redis://default:pw@127.0.0.1:{}/?protocol=resp3",
            proxy.port
        ),
    ] {
        let mut c = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        redis::cmd("SET")
            .arg("quote:auth")
            .arg("7")
            .exec(&mut c)
            .unwrap();
        let v: String = redis::cmd("GET").arg("quote:auth").query(&mut c).unwrap();
        assert_eq!(v, "7");
    }
    // Without the password the redis crate is refused.
    let r = redis::Client::open(proxy.url())
        .unwrap()
        .get_connection()
        .and_then(|mut c| redis::cmd("GET").arg("k").query::<Option<String>>(&mut c));
    let e = r.expect_err("no password, no data");
    assert!(
        e.to_string().contains("NOAUTH") || e.to_string().contains("Authentication"),
        "{e}"
    );
    let r = redis::Client::open(format!("redis://:nope@127.0.0.1:{}", proxy.port))
        .unwrap()
        .get_connection();
    assert!(r.is_err(), "a wrong password in the URL is refused");
}

/// A client that sends its requests and then shuts down its write side (`nc -N`,
/// a script piping into a socket, a pool closing after a last command) gets
/// what Redis itself gives it: every reply before the close (an INCR applied
/// but never acknowledged is exactly the loss a drain must not cause), except
/// for a blocked command, which Redis abandons when its client hangs up.
#[test]
fn half_closed_client_gets_what_redis_gives_it() {
    use std::net::Shutdown;
    let _g = metrics_lock();
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    let exchange = |port: u16, request: &[u8]| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    let cases: [(&[u8], &[u8]); 4] = [
        (b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n"),
        (b"*2\r\n$4\r\nINCR\r\n$4\r\nhalf\r\n", b":1\r\n"),
        (
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
            b"+OK\r\n$1\r\nv\r\n",
        ),
        (b"*3\r\n$5\r\nBLPOP\r\n$5\r\nempty\r\n$3\r\n0.2\r\n", b""),
    ];
    for (request, want) in cases {
        let _: () = redis::cmd("DEL")
            .arg("half")
            .query(&mut redis.conn())
            .unwrap();
        let direct = exchange(redis.port, request);
        assert_eq!(direct, want, "Redis itself");
        let _: () = redis::cmd("DEL")
            .arg("half")
            .query(&mut redis.conn())
            .unwrap();
        let out = exchange(proxy.port, request);
        assert_eq!(
            out,
            want,
            "{:?} then half-close got {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&out)
        );
    }
}
