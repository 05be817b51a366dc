//! Real client libraries against nearcache: with the settings applications
//! actually use (redis-py 8 sync and asyncio, node-redis 5 and 6, ioredis 5
//! and 6, the `redis` crate; RESP2 and RESP3; with and without a client name;
//! with the application's db and password), hot reads of `quote:*`, `ind:*`
//! and `kline:*` keys must be L1 hits, every value must be right, a client
//! reads its own writes, and a write made directly on Redis shows through
//! nearcache within 1 s.
//!
//! The Python and Node clients run as scripts (`tests/clients/redis_py.py`,
//! `tests/clients/node.mjs`; what each library sends when it connects is
//! tabled at the top of each script); they print one JSON line per client
//! configuration and this file judges them. The `redis` crate runs here, with
//! the same procedure. Upstream reads are counted with `INFO commandstats` on
//! a direct connection to Redis.
//!
//! `scripts/test` installs the libraries (tests/clients/requirements.txt into
//! tests/clients/pylib, tests/clients/package-lock.json into
//! tests/clients/node_modules); when one is missing these tests fail and say so.
//!
//! What the `redis` crate (1.8.1, `connection_setup_pipeline` in
//! src/connection.rs) sends when it connects, as one pipeline: RESP2:
//! `[AUTH <pw>]; [SELECT <db>]; CLIENT SETINFO LIB-NAME redis-rs; CLIENT
//! SETINFO LIB-VER 1.8.1`; RESP3: `HELLO 3 [AUTH default <pw>]; [SELECT <db>];
//! CLIENT SETINFO ...` (replies to SETINFO ignored). It has no client-name
//! setting: an application names its connection with `CLIENT SETNAME`, which
//! is what the "CLIENT SETNAME" configurations here do right after connecting.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis::Value;
use serde::Deserialize;
use support::*;

/// Reads of each key per configuration.
const READS: u64 = 50;
/// Of those, how many may reach Redis: the first (a miss), and one more when
/// the fill raced with the invalidation of the write that created the key.
const MAX_UPSTREAM: u64 = 2;
/// The application's database and password, for the `with_password_and_db` runs.
const DB: u32 = 2;
const PASSWORD: &str = "harness-Pw-4ee1";
/// How long a client may see the old value after a write made directly on Redis.
const DIRECT_WRITE_LIMIT_MS: f64 = 1000.0;
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
const CLIENT_NAME: &str = "nearcache-harness";

const REDIS_PY_CONFIGS: &[&str] = &[
    "redis-py sync default",
    "redis-py sync protocol=2",
    "redis-py sync client_name",
    "redis-py sync protocol=2 client_name",
    "redis-py asyncio default",
    "redis-py asyncio protocol=2",
    "redis-py asyncio client_name",
    "redis-py asyncio protocol=2 client_name",
];

const NODE_CONFIGS: &[&str] = &[
    "node-redis 5 default",
    "node-redis 5 RESP3",
    "node-redis 5 name",
    "node-redis 5 RESP3 name",
    "node-redis 6 default",
    "node-redis 6 RESP2",
    "node-redis 6 name",
    "node-redis 6 RESP2 name",
    "ioredis 5 default",
    "ioredis 5 connectionName",
    "ioredis 6 default",
    "ioredis 6 protocol=2",
    "ioredis 6 connectionName",
];

const REDIS_RS_CONFIGS: &[&str] = &[
    "redis-rs sync RESP2",
    "redis-rs sync RESP3",
    "redis-rs sync RESP2 CLIENT SETNAME",
    "redis-rs sync RESP3 CLIENT SETNAME",
    "redis-rs async RESP2",
    "redis-rs async RESP3",
    "redis-rs async RESP2 CLIENT SETNAME",
    "redis-rs async RESP3 CLIENT SETNAME",
];

// ---------------------------------------------------------------------------
// One client configuration's results, as the scripts print them.

#[derive(Debug, Deserialize)]
struct Report {
    config: String,
    lib: String,
    #[serde(default)]
    package: Option<String>,
    protocol: u8,
    client_name: bool,
    db: u32,
    password: bool,
    error: Option<String>,
    #[serde(default)]
    reads: Vec<Reads>,
    /// Upstream connections (CLIENT LIST on Redis) added while the client was
    /// connected: nearcache opens its pools at start, so these are pinned to it.
    #[serde(default)]
    extra_upstream_connections: Option<i64>,
    #[serde(default)]
    read_your_writes: Vec<Check>,
    #[serde(default)]
    direct_write: Vec<Poll>,
}

#[derive(Debug, Deserialize)]
struct Reads {
    cmd: String,
    key: String,
    reads: u64,
    wrong: u64,
    first_wrong: Option<String>,
    upstream: u64,
}

#[derive(Debug, Deserialize)]
struct Check {
    cmd: String,
    key: String,
    ok: bool,
    got: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Poll {
    cmd: String,
    key: String,
    ok: bool,
    ms: f64,
    polls: u64,
    unexpected: Option<String>,
    #[serde(default)]
    last: Option<String>,
}

/// Everything wrong with one configuration's results (empty: it passed).
fn problems(r: &Report, setup: &Setup) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = &r.error {
        out.push(format!("failed: {e}"));
        return out;
    }
    if r.db != setup.db || r.password != setup.password.is_some() {
        out.push(format!(
            "ran with db={} password={} instead of db={} password={}",
            r.db,
            r.password,
            setup.db,
            setup.password.is_some()
        ));
    }
    let cmds: Vec<&str> = r.reads.iter().map(|x| x.cmd.as_str()).collect();
    if cmds != ["GET", "HGETALL", "GET"] {
        out.push(format!("expected reads GET, HGETALL, GET; got {cmds:?}"));
    }
    for x in &r.reads {
        if x.reads != READS {
            out.push(format!(
                "{} {}: {} reads, not {READS}",
                x.cmd, x.key, x.reads
            ));
        }
        if x.wrong > 0 {
            out.push(format!(
                "{} {}: {} of {} values wrong (first: {})",
                x.cmd,
                x.key,
                x.wrong,
                x.reads,
                x.first_wrong.as_deref().unwrap_or("?")
            ));
        }
        if x.upstream == 0 {
            // The first read of a fresh key cannot be a hit: the count is broken.
            out.push(format!(
                "{} {}: no read reached Redis, not even the first (upstream counting is broken)",
                x.cmd, x.key
            ));
        }
    }
    let missed: Vec<String> = r
        .reads
        .iter()
        .filter(|x| x.upstream > MAX_UPSTREAM)
        .map(|x| format!("{} {}/{}", x.cmd, x.upstream, x.reads))
        .collect();
    if !missed.is_empty() {
        let pinned = match r.extra_upstream_connections {
            Some(n) if n > 0 => format!(
                "; nearcache opened {n} upstream connection(s) for this client alone (pinned)"
            ),
            Some(_) => "; no upstream connection of its own (not pinned)".into(),
            None => String::new(),
        };
        out.push(format!(
            "L1 does not serve this client: {} reads reached Redis (at most {MAX_UPSTREAM} of {READS} may){pinned}",
            missed.join(", ")
        ));
    }
    if r.read_your_writes.len() != 2 {
        out.push(format!(
            "expected 2 read-your-writes checks, got {}",
            r.read_your_writes.len()
        ));
    }
    for c in r.read_your_writes.iter().filter(|c| !c.ok) {
        out.push(format!(
            "read-your-writes {} {}: read {}",
            c.cmd,
            c.key,
            c.got.as_deref().unwrap_or("?")
        ));
    }
    if r.direct_write.len() != 2 {
        out.push(format!(
            "expected 2 direct-write checks, got {}",
            r.direct_write.len()
        ));
    }
    for p in &r.direct_write {
        if !p.ok || p.ms > DIRECT_WRITE_LIMIT_MS {
            out.push(format!(
                "direct write {} {}: after {} ms and {} polls: ok={} unexpected={} last={}",
                p.cmd,
                p.key,
                p.ms,
                p.polls,
                p.ok,
                p.unexpected.as_deref().unwrap_or("-"),
                p.last.as_deref().unwrap_or("-")
            ));
        }
    }
    out
}

fn summary(r: &Report) -> String {
    if let Some(e) = &r.error {
        return format!("{:<38} ERROR {e}", r.config);
    }
    let reads: Vec<String> = r
        .reads
        .iter()
        .map(|x| format!("{} {:>2}/{}", x.cmd, x.upstream, x.reads))
        .collect();
    let dw: Vec<String> = r
        .direct_write
        .iter()
        .map(|p| format!("{:.2}ms", p.ms))
        .collect();
    format!(
        "{:<38} RESP{} name={:<5} upstream reads: {}; pinned conns: {}; read-your-writes {}; direct write seen after {}",
        r.config,
        r.protocol,
        r.client_name,
        reads.join(", "),
        r.extra_upstream_connections
            .map_or("?".to_string(), |n| n.to_string()),
        if r.read_your_writes.iter().all(|c| c.ok) {
            "ok"
        } else {
            "FAILED"
        },
        dw.join(", ")
    )
}

/// Checks a harness run: every expected configuration reported exactly once,
/// and every one passed. Prints the table, then fails listing what is wrong
/// with each failing configuration.
fn judge(title: &str, setup: &Setup, reports: &[Report], expected: &[&str]) {
    println!(
        "{title} (db={}, password={}):",
        setup.db,
        setup.password.is_some()
    );
    for r in reports {
        println!("  {}  [{}]", summary(r), r.lib);
    }
    let mut failures = Vec::new();
    let names: Vec<&str> = reports.iter().map(|r| r.config.as_str()).collect();
    for want in expected {
        match names.iter().filter(|n| *n == want).count() {
            1 => {}
            n => failures.push(format!("{want}: reported {n} times, expected once")),
        }
    }
    for n in &names {
        if !expected.contains(n) {
            failures.push(format!("{n}: not an expected configuration"));
        }
    }
    let mut failed = 0;
    for r in reports {
        let p = problems(r, setup);
        failed += usize::from(!p.is_empty());
        failures.extend(p.iter().map(|p| format!("{} [{}]: {p}", r.config, r.lib)));
    }
    assert!(
        failures.is_empty(),
        "{title}: {failed} of {} configurations failed:\n  {}",
        reports.len(),
        failures.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// Redis + nearcache, as the application's pod has them.

struct Setup {
    redis: RedisServer,
    proxy: Proxy,
    db: u32,
    password: Option<&'static str>,
}

impl Setup {
    /// A redis-server and a nearcache in front of it, L1 serving. With
    /// `app_auth`, Redis requires a password and the application uses db 2:
    /// nearcache's upstream URL carries both, and so do the clients.
    fn start(app_auth: bool) -> Setup {
        let redis = RedisServer::start();
        let (db, password) = if app_auth {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("requirepass")
                .arg(PASSWORD)
                .exec(&mut redis.conn())
                .unwrap();
            (DB, Some(PASSWORD))
        } else {
            (0, None)
        };
        let upstream = match password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/{db}", redis.port),
            None => format!("redis://127.0.0.1:{}/{db}", redis.port),
        };
        let proxy = Proxy::with_config(test_config(&upstream));
        proxy.wait_serving();
        Setup {
            redis,
            proxy,
            db,
            password,
        }
    }

    fn url(&self, port: u16, resp3: bool) -> String {
        let auth = self.password.map(|p| format!(":{p}@")).unwrap_or_default();
        let proto = if resp3 { "?protocol=resp3" } else { "" };
        format!("redis://{auth}127.0.0.1:{port}/{}{proto}", self.db)
    }

    fn direct(&self) -> redis::Connection {
        redis::Client::open(self.url(self.redis.port, false))
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

// ---------------------------------------------------------------------------
// The scripts.

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs a harness script against the setup; returns its reports. Fails with
/// instructions when the runtime or a library is missing.
fn run_script(program: &str, script: &str, setup: &Setup) -> Vec<Report> {
    let path = clients_dir().join(script);
    let mut cmd = Command::new(program);
    cmd.arg(&path)
        .arg(setup.proxy.port.to_string())
        .arg(setup.redis.port.to_string())
        .args(["--db", &setup.db.to_string()])
        .args(["--reads", &READS.to_string()])
        .args(["--format", "json"]);
    if let Some(pw) = setup.password {
        cmd.args(["--password", pw]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run `{program}` ({e}): the client harness needs it; run scripts/test")
        });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} did not finish within {SCRIPT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap();
    let stderr = err.join().unwrap();

    let mut reports = Vec::new();
    let mut done = None;
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{script} printed a line that is not JSON ({e}): {line}"));
        if let Some(msg) = v.get("fatal") {
            panic!("{script}: {}", msg.as_str().unwrap_or("fatal error"));
        }
        if v.get("done").is_some() {
            done = v["configs"].as_u64();
            continue;
        }
        reports.push(
            serde_json::from_value::<Report>(v)
                .unwrap_or_else(|e| panic!("{script}: unexpected report ({e}): {line}")),
        );
    }
    assert!(
        status.success() && done == Some(reports.len() as u64),
        "{script} did not complete ({status}, {} reports, done line: {done:?})\nstderr:\n{stderr}",
        reports.len()
    );
    reports
}

/// The version `tests/clients/requirements.txt` pins for `package`.
fn pinned_pip(package: &str) -> String {
    let text = std::fs::read_to_string(clients_dir().join("requirements.txt")).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{package}==")))
        .unwrap_or_else(|| panic!("requirements.txt pins no {package}"))
        .to_string()
}

/// The version `tests/clients/package.json` pins for a dependency (aliases:
/// `"redis5": "npm:redis@5.12.1"`).
fn pinned_npm(dependency: &str) -> String {
    let text = std::fs::read_to_string(clients_dir().join("package.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let spec = v["dependencies"][dependency]
        .as_str()
        .unwrap_or_else(|| panic!("package.json has no dependency {dependency}"));
    spec.rsplit('@').next().unwrap().to_string()
}

fn assert_installed(reports: &[Report], want: impl Fn(&Report) -> String) {
    for r in reports {
        let want = want(r);
        assert!(
            r.lib.ends_with(&format!(" {want}")),
            "{}: {} is installed but version {want} is pinned: run scripts/test",
            r.config,
            r.lib
        );
    }
}

fn redis_py(app_auth: bool) {
    let setup = Setup::start(app_auth);
    let reports = run_script("python3", "redis_py.py", &setup);
    let pin = pinned_pip("redis");
    assert_installed(&reports, |_| pin.clone());
    judge("redis-py", &setup, &reports, REDIS_PY_CONFIGS);
}

fn node(app_auth: bool) {
    let setup = Setup::start(app_auth);
    let reports = run_script("node", "node.mjs", &setup);
    assert_installed(&reports, |r| {
        pinned_npm(
            r.package
                .as_deref()
                .expect("node reports name their package"),
        )
    });
    judge("node-redis and ioredis", &setup, &reports, NODE_CONFIGS);
}

#[test]
fn redis_py_hot_reads_are_l1_hits() {
    redis_py(false);
}

#[test]
fn redis_py_with_password_and_db_hot_reads_are_l1_hits() {
    redis_py(true);
}

#[test]
fn node_clients_hot_reads_are_l1_hits() {
    node(false);
}

#[test]
fn node_clients_with_password_and_db_hot_reads_are_l1_hits() {
    node(true);
}

// ---------------------------------------------------------------------------
// The `redis` crate, same procedure.

/// A read as the client saw it: the reply's shape must match the protocol
/// (a RESP3 client gets a map for HGETALL, a RESP2 client a flat array).
#[derive(Debug, PartialEq)]
enum Seen {
    Str(String),
    Hash(BTreeMap<String, String>),
    Other(String),
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

fn decode(cmd: &str, v: Value, resp3: bool) -> Seen {
    let other = |v: &Value| Seen::Other(format!("{v:?}"));
    match (cmd, &v) {
        ("GET", Value::BulkString(_)) => text(&v).map_or_else(|| other(&v), Seen::Str),
        ("HGETALL", Value::Map(pairs)) if resp3 => pairs
            .iter()
            .map(|(k, val)| Some((text(k)?, text(val)?)))
            .collect::<Option<BTreeMap<_, _>>>()
            .map_or_else(|| other(&v), Seen::Hash),
        ("HGETALL", Value::Array(items)) if !resp3 && items.len() % 2 == 0 => items
            .chunks(2)
            .map(|p| Some((text(&p[0])?, text(&p[1])?)))
            .collect::<Option<BTreeMap<_, _>>>()
            .map_or_else(|| other(&v), Seen::Hash),
        _ => other(&v),
    }
}

/// Sync and async connections behind one face; the async one is driven by
/// its own runtime.
enum Conn {
    Sync(redis::Connection),
    Async(tokio::runtime::Runtime, redis::aio::MultiplexedConnection),
}

impl Conn {
    fn open(url: &str, asynchronous: bool) -> redis::RedisResult<Conn> {
        let client = redis::Client::open(url)?;
        if asynchronous {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let conn = rt.block_on(client.get_multiplexed_async_connection())?;
            Ok(Conn::Async(rt, conn))
        } else {
            Ok(Conn::Sync(client.get_connection()?))
        }
    }

    fn run(&mut self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self {
            Conn::Sync(c) => cmd.query(c),
            Conn::Async(rt, c) => rt.block_on(cmd.query_async(c)),
        }
    }
}

fn upstream_connections(direct: &mut redis::Connection) -> i64 {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(direct).unwrap();
    list.lines().filter(|l| !l.trim().is_empty()).count() as i64
}

/// After a client closed: waits (briefly) until any connection nearcache
/// opened for it is gone, so the next configuration starts from the same count.
fn wait_connections_back(direct: &mut redis::Connection, baseline: i64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while upstream_connections(direct) > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn upstream_calls(direct: &mut redis::Connection, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(direct)
        .unwrap();
    let prefix = format!("cmdstat_{}:calls=", cmd.to_ascii_lowercase());
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Client {
    conn: Conn,
    resp3: bool,
}

impl Client {
    fn read(&mut self, cmd: &str, key: &str) -> redis::RedisResult<Seen> {
        let v = self.conn.run(redis::cmd(cmd).arg(key))?;
        Ok(decode(cmd, v, self.resp3))
    }

    fn hot_reads(
        &mut self,
        direct: &mut redis::Connection,
        cmd: &str,
        key: &str,
        want: &Seen,
    ) -> redis::RedisResult<Reads> {
        let before = upstream_calls(direct, cmd);
        let (mut wrong, mut first_wrong) = (0, None);
        for _ in 0..READS {
            let got = self.read(cmd, key)?;
            if &got != want {
                wrong += 1;
                first_wrong.get_or_insert(format!("{got:?}"));
            }
        }
        let after = upstream_calls(direct, cmd);
        Ok(Reads {
            cmd: cmd.into(),
            key: key.into(),
            reads: READS,
            wrong,
            first_wrong,
            upstream: after - before,
        })
    }

    fn poll_until(&mut self, cmd: &str, key: &str, want: &Seen, allowed: &Seen) -> Poll {
        let start = Instant::now();
        let (mut polls, mut unexpected) = (0, None);
        loop {
            let got = self.read(cmd, key).map_err(|e| format!("{e}"));
            polls += 1;
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            let seen = got.as_ref().map(|g| g == want).unwrap_or(false);
            if seen {
                return Poll {
                    cmd: cmd.into(),
                    key: key.into(),
                    ok: unexpected.is_none(),
                    ms,
                    polls,
                    unexpected,
                    last: None,
                };
            }
            if got.as_ref().map(|g| g != allowed).unwrap_or(true) {
                unexpected.get_or_insert(format!("{got:?}"));
            }
            if ms > DIRECT_WRITE_LIMIT_MS {
                return Poll {
                    cmd: cmd.into(),
                    key: key.into(),
                    ok: false,
                    ms,
                    polls,
                    unexpected,
                    last: Some(format!("{got:?}")),
                };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn hash(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hset_cmd(key: &str, h: &BTreeMap<String, String>) -> redis::Cmd {
    let mut c = redis::cmd("HSET");
    c.arg(key);
    for (f, v) in h {
        c.arg(f).arg(v);
    }
    c
}

/// The redis_py.py / node.mjs procedure with the `redis` crate.
fn exercise_rs(
    c: &mut Client,
    direct: &mut redis::Connection,
    slug: &str,
    baseline: i64,
    report: &mut Report,
) -> redis::RedisResult<()> {
    let tok = format!("{:08x}", rand_u32());
    let quote = format!("quote:nch-{slug}-{tok}");
    let ind = format!("ind:nch-{slug}-{tok}:macd:1d");
    let kline = format!("kline:nch-{slug}-{tok}:1d");
    let qv = format!(r#"{{"price": 10.5, "cfg": "{slug}", "tok": "{tok}"}}"#);
    let iv = hash(&[
        ("dif", "0.12"),
        ("dea", "0.10"),
        ("macd", "0.04"),
        ("cfg", slug),
    ]);
    let kv = format!(r#"[{{"ts": 1751040000000, "open": 11.2, "close": 11.16, "cfg": "{slug}"}}]"#);
    redis::cmd("SET").arg(&quote).arg(&qv).exec(direct)?;
    hset_cmd(&ind, &iv).exec(direct)?;
    redis::cmd("SET").arg(&kline).arg(&kv).exec(direct)?;

    let reads = vec![
        c.hot_reads(direct, "GET", &quote, &Seen::Str(qv.clone()))?,
        c.hot_reads(direct, "HGETALL", &ind, &Seen::Hash(iv.clone()))?,
        c.hot_reads(direct, "GET", &kline, &Seen::Str(kv.clone()))?,
    ];
    // Upstream connections nearcache opened for this client alone (pinned), if any.
    let extra = upstream_connections(direct) - baseline;

    // Read your writes: the old values are in L1 now.
    let qv2 = format!(r#"{{"price": 10.6, "cfg": "{slug}", "tok": "{tok}"}}"#);
    let mut iv2 = iv.clone();
    iv2.insert("macd".into(), "0.05".into());
    c.conn.run(redis::cmd("SET").arg(&quote).arg(&qv2))?;
    let got_q = c.read("GET", &quote)?;
    c.conn
        .run(redis::cmd("HSET").arg(&ind).arg("macd").arg("0.05"))?;
    let got_i = c.read("HGETALL", &ind)?;
    let check = |cmd: &str, key: &str, got: Seen, want: Seen| Check {
        cmd: cmd.into(),
        key: key.into(),
        ok: got == want,
        got: (got != want).then(|| format!("{got:?}")),
    };
    let ryw = vec![
        check("SET then GET", &quote, got_q, Seen::Str(qv2.clone())),
        check("HSET then HGETALL", &ind, got_i, Seen::Hash(iv2.clone())),
    ];

    // Writes behind nearcache's back: cache the current value, write on Redis, poll.
    for _ in 0..3 {
        c.read("GET", &quote)?;
        c.read("HGETALL", &ind)?;
    }
    let qv3 = format!(r#"{{"price": 10.7, "cfg": "{slug}", "tok": "{tok}"}}"#);
    let mut iv3 = iv2.clone();
    iv3.insert("macd".into(), "0.06".into());
    redis::cmd("SET").arg(&quote).arg(&qv3).exec(direct)?;
    let dq = c.poll_until("GET", &quote, &Seen::Str(qv3), &Seen::Str(qv2));
    redis::cmd("HSET")
        .arg(&ind)
        .arg("macd")
        .arg("0.06")
        .exec(direct)?;
    let di = c.poll_until("HGETALL", &ind, &Seen::Hash(iv3), &Seen::Hash(iv2));
    report.reads = reads;
    report.extra_upstream_connections = Some(extra);
    report.read_your_writes = ryw;
    report.direct_write = vec![dq, di];
    Ok(())
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// The `redis` crate's version, from Cargo.lock.
fn redis_rs_version() -> String {
    let lock =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    lock.split("[[package]]")
        .find(|p| p.contains("\nname = \"redis\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "?".into())
}

fn redis_rs_config(setup: &Setup, asynchronous: bool, resp3: bool, named: bool) -> Report {
    let config = format!(
        "redis-rs {} RESP{}{}",
        if asynchronous { "async" } else { "sync" },
        if resp3 { 3 } else { 2 },
        if named { " CLIENT SETNAME" } else { "" }
    );
    let slug = config.replace(' ', "-");
    let mut report = Report {
        config,
        lib: format!("redis-rs {}", redis_rs_version()),
        package: None,
        protocol: if resp3 { 3 } else { 2 },
        client_name: named,
        db: setup.db,
        password: setup.password.is_some(),
        error: None,
        reads: vec![],
        extra_upstream_connections: None,
        read_your_writes: vec![],
        direct_write: vec![],
    };
    let mut direct = setup.direct();
    let baseline = upstream_connections(&mut direct);
    let result = Conn::open(&setup.url(setup.proxy.port, resp3), asynchronous).and_then(|conn| {
        let mut c = Client { conn, resp3 };
        if named {
            c.conn
                .run(redis::cmd("CLIENT").arg("SETNAME").arg(CLIENT_NAME))?;
        }
        exercise_rs(&mut c, &mut direct, &slug, baseline, &mut report)
    });
    // The client is closed by now (dropped inside the closure).
    wait_connections_back(&mut direct, baseline);
    if let Err(e) = result {
        report.error = Some(e.to_string());
    }
    report
}

fn redis_rs(app_auth: bool) {
    let setup = Setup::start(app_auth);
    let mut reports = Vec::new();
    for asynchronous in [false, true] {
        for named in [false, true] {
            for resp3 in [false, true] {
                reports.push(redis_rs_config(&setup, asynchronous, resp3, named));
            }
        }
    }
    judge("redis-rs", &setup, &reports, REDIS_RS_CONFIGS);
}

#[test]
fn redis_rs_hot_reads_are_l1_hits() {
    redis_rs(false);
}

#[test]
fn redis_rs_with_password_and_db_hot_reads_are_l1_hits() {
    redis_rs(true);
}
