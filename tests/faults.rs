//! Faults with real processes: a network cut between nearcache and Redis
//! (the relay black-holes traffic without closing anything), Redis restarted
//! with other data on the same port, the taosAdapter stand-in killed,
//! hanging or failing while other keys are read and written, and SIGTERM to
//! the real binary while clients pipeline and read their replies slowly.
//!
//! Nothing here waits by sleeping: every wait is for an event, with a
//! deadline; the bounds measured are printed (`--nocapture`).

mod support;
#[macro_use]
#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nearcache::config::{InvalidationMode, TdOnError, TdengineConfig};
use support::relay::Relay;
use support::{runtime, test_config, Proxy, RawClient, RedisServer};
use taosadapter::{Fault, Mode, TaosAdapter};

// --- Helpers -------------------------------------------------------------------------

/// The tests here measure latencies and bounds, and some load the machine
/// hard (pipelining clients, 90,000 reads in 4 s): they run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `ok` every 10 ms until it holds; returns how long that took, or
/// panics with `what` after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if ok() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what} (not within {timeout:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A bulk string reply's payload (`None` for a nil).
fn bulk(reply: &[u8]) -> Option<Vec<u8>> {
    if reply == b"$-1\r\n" || reply == b"_\r\n" {
        return None;
    }
    assert!(
        reply.starts_with(b"$"),
        "not a bulk string: {:?}",
        text(reply)
    );
    let header = reply.iter().position(|&c| c == b'\n').unwrap() + 1;
    Some(reply[header..reply.len() - 2].to_vec())
}

fn readyz(proxy: &Proxy) -> u16 {
    proxy.http_get("/readyz").0
}

// --- 1. Network cut between nearcache and Redis ---------------------------------------

const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// Also the health check's timeout: a late reply is given up when a PING on
/// a fresh connection gets no answer within it (slow is not dead).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A request nearcache could not get an answer for must be answered with an
/// error by `command_timeout` plus the health check (plus scheduling
/// slack), not hang.
const PROMPT: Duration = Duration::from_millis(500 + 500 + 600);

/// Nearcache in front of a relay to `redis`, with a short command timeout.
fn behind_relay(redis: &RedisServer) -> (Relay, Proxy) {
    let relay = Relay::start(redis.port);
    let mut config = test_config(&relay.url());
    config.upstream.command_timeout = COMMAND_TIMEOUT;
    config.upstream.connect_timeout = CONNECT_TIMEOUT;
    let proxy = Proxy::with_config(config);
    proxy.wait_serving();
    (relay, proxy)
}

/// Sends one request on a fresh connection and reads its reply; returns the
/// reply (`None`: the connection closed first) and how long it took.
fn one_shot(port: u16, args: &[&[u8]], wait: Duration) -> (Option<Vec<u8>>, Duration) {
    let mut c = RawClient::connect(port);
    let t = Instant::now();
    c.send(args);
    match c.next_frame(wait) {
        Ok(Some(r)) => (Some(r), t.elapsed()),
        Ok(None) => panic!("{:?}: no reply and no close within {wait:?}", text(args[0])),
        Err(_) => (None, t.elapsed()),
    }
}

/// The relay black-holes both directions with every socket left open (a
/// cut cable, a dead switch): requests in flight fail at `command_timeout`
/// with an error, the client they were in flight for is closed (nothing it
/// sends later may overtake them), new requests fail just as promptly,
/// readiness and L1 go off; once the cut heals, traffic, L1 and readiness
/// come back within a bound this test measures and asserts.
#[test]
fn network_cut_fails_promptly_and_recovers() {
    let _serial = serial();
    let redis = RedisServer::start();
    let (relay, proxy) = behind_relay(&redis);
    assert_eq!(readyz(&proxy), 200);

    let mut writer = RawClient::connect(proxy.port);
    assert_eq!(writer.line("INCR cut:n"), b":1\r\n");
    assert_eq!(writer.line("SET quote:cut v1"), b"+OK\r\n");
    // Cached in L1 (the SET's own invalidation may still be on its way back).
    wait_until(Duration::from_secs(5), "quote:cut cached", || {
        let hits = proxy.stat("hits");
        assert_eq!(bulk(&writer.line("GET quote:cut")).unwrap(), b"v1");
        proxy.stat("hits") > hits
    });

    relay.blackhole(true);
    let cut_at = Instant::now();

    // In flight on the cut connection: an error at command_timeout, then the close.
    let t = Instant::now();
    writer.send(&[b"INCR", b"cut:n"]);
    let reply = writer
        .next_frame(Duration::from_secs(5))
        .expect("an error reply before the close")
        .expect("an error reply, not silence");
    let took = t.elapsed();
    let e = text(&reply);
    assert!(
        e.starts_with("-ERR upstream unavailable: no reply within 500ms"),
        "{e:?}"
    );
    assert!(took < PROMPT, "the in-flight INCR failed after {took:?}");
    assert!(
        writer.closed(),
        "the client whose request was lost is closed"
    );
    println!("cut: in-flight INCR failed after {took:?} ({e:?}), its client closed");

    // New clients during the cut: every request is an error, each one prompt.
    let mut worst = Duration::ZERO;
    let mut errors = Vec::new();
    for i in 0..6 {
        let key = format!("plain:{i}");
        let (reply, took) = one_shot(
            proxy.port,
            &[b"SET", key.as_bytes(), b"x"],
            Duration::from_secs(5),
        );
        let reply = reply.expect("an error reply before any close");
        assert!(
            reply.starts_with(b"-ERR upstream unavailable: "),
            "{:?}",
            text(&reply)
        );
        assert!(took < PROMPT, "SET during the cut took {took:?}");
        worst = worst.max(took);
        errors.push(text(&reply).trim_end().to_string());
    }
    errors.dedup();
    println!("cut: 6 SETs on new connections failed, worst after {worst:?}: {errors:?}");

    // Readiness and L1 go off: the feed cannot prove it sees writes.
    wait_until(Duration::from_secs(4), "/readyz 503 during the cut", || {
        readyz(&proxy) == 503
    });
    let not_ready = cut_at.elapsed();
    assert_eq!(proxy.stat("serving"), 0, "L1 serves during the cut");
    let (reply, took) = one_shot(proxy.port, &[b"GET", b"quote:cut"], Duration::from_secs(5));
    let reply = reply.expect("a reply");
    assert!(
        reply.starts_with(b"-ERR upstream unavailable"),
        "GET of an L1 key during the cut: {:?}",
        text(&reply)
    );
    assert!(took < PROMPT, "GET during the cut took {took:?}");
    println!("cut: /readyz 503 within {not_ready:?} of the cut; L1 off");

    // Keep the cut long enough for reconnect attempts to be under way.
    let (body_code, body) = proxy.http_get("/readyz");
    assert_eq!(body_code, 503);
    assert!(body.starts_with("not ready: "), "{body:?}");
    while cut_at.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(20));
    }

    relay.blackhole(false);
    let healed = Instant::now();
    // Each probe on its own connection: an error closes the one it came on.
    wait_until(
        Duration::from_secs(5),
        "SET through nearcache after the cut",
        || {
            let (r, _) = one_shot(
                proxy.port,
                &[b"SET", b"after:cut", b"1"],
                Duration::from_secs(3),
            );
            r.as_deref() == Some(b"+OK\r\n")
        },
    );
    let traffic = healed.elapsed();
    wait_until(Duration::from_secs(5), "/readyz 200 after the cut", || {
        readyz(&proxy) == 200
    });
    let ready = healed.elapsed();
    proxy.wait_serving();
    let serving = healed.elapsed();
    println!("heal: traffic after {traffic:?}, /readyz 200 after {ready:?}, L1 serving after {serving:?}");
    // Bound: connect_timeout (0.5 s, a handshake whose bytes the cut ate) +
    // reconnect_backoff_max (1 s) + slack for a loaded machine.
    let bound = Duration::from_millis(3500);
    assert!(traffic < bound, "traffic back after {traffic:?}");
    assert!(ready < bound, "ready after {ready:?}");
    assert!(serving < bound, "L1 serving after {serving:?}");

    // Nothing was applied twice or lost: Redis has the one acknowledged INCR
    // (plus at most the one that failed), and reads agree with Redis.
    let n: i64 = redis::cmd("GET")
        .arg("cut:n")
        .query(&mut redis.conn())
        .unwrap();
    assert!((1..=2).contains(&n), "cut:n = {n}");
    let mut c = RawClient::connect(proxy.port);
    assert_eq!(
        bulk(&c.line("GET cut:n")).unwrap(),
        n.to_string().as_bytes()
    );
    assert_eq!(c.line("SET quote:cut v2"), b"+OK\r\n");
    assert_eq!(bulk(&c.line("GET quote:cut")).unwrap(), b"v2");
}

/// Pinned paths through a cut: a transaction's EXEC and a blocking pop with a
/// finite timeout. Redis itself would answer the BLPOP after 1 s; through a
/// cut nearcache cannot know, so it must answer an error by the block
/// timeout plus `command_timeout`, not leave the client hanging.
#[test]
fn pinned_requests_during_a_cut_fail_promptly() {
    let _serial = serial();
    let redis = RedisServer::start();
    let (relay, proxy) = behind_relay(&redis);
    let mut tx = RawClient::connect(proxy.port);
    assert_eq!(tx.line("MULTI"), b"+OK\r\n");
    assert_eq!(tx.line("INCR cut:tx"), b"+QUEUED\r\n");
    let mut blocked = RawClient::connect(proxy.port);
    // The pinned connection exists before the cut (the first BLPOP opens it).
    assert_eq!(blocked.line("BLPOP cut:q 0.05"), b"*-1\r\n");

    relay.blackhole(true);
    let t = Instant::now();
    tx.send(&[b"EXEC"]);
    blocked.send(&[b"BLPOP", b"cut:q", b"1"]);
    let exec = tx.next_frame(Duration::from_secs(5));
    let exec_took = t.elapsed();
    match exec {
        Ok(Some(r)) => assert!(
            r.starts_with(b"-ERR upstream unavailable"),
            "{:?}",
            text(&r)
        ),
        Ok(None) => panic!("EXEC: no reply and no close after {exec_took:?}"),
        Err(_) => {}
    }
    assert!(exec_took < PROMPT, "EXEC during the cut took {exec_took:?}");
    assert!(tx.closed(), "the transaction's client is closed");

    let limit = Duration::from_secs(1) + PROMPT;
    let pop = blocked.next_frame(limit.saturating_sub(t.elapsed()) + Duration::from_secs(1));
    let pop_took = t.elapsed();
    println!("cut: EXEC failed after {exec_took:?}; BLPOP 1 s: {pop:?} after {pop_took:?}");
    if let Ok(None) = pop {
        // Say what the client sees after the cut heals too.
        relay.blackhole(false);
        let after = blocked.next_frame(Duration::from_secs(3));
        panic!(
            "BLPOP cut:q 1 during a cut: no reply and no close {pop_took:?} into the cut; \
             3 s after the cut healed: {after:?}"
        );
    }
    if let Ok(Some(r)) = &pop {
        assert!(
            r.starts_with(b"-ERR upstream unavailable"),
            "BLPOP through a cut answered {:?}",
            text(r)
        );
    }
    assert!(
        pop_took < limit,
        "BLPOP with a 1 s timeout took {pop_took:?}"
    );
    relay.blackhole(false);
}

// --- 2. Redis restarted with other data ----------------------------------------------

const KEYS: usize = 200;

/// What the restarted Redis holds for key `i`: an RDB made on another server
/// (even keys rewritten, odd keys absent), or nothing.
fn restarted_value(i: usize, other_data: bool) -> Option<String> {
    (other_data && i % 2 == 0).then(|| format!("new-{i}"))
}

fn key(i: usize) -> String {
    if i % 4 == 3 {
        format!("ind:{i}:macd:1d")
    } else {
        format!("quote:{i}")
    }
}

/// Every key cached in L1 with its old value, then Redis killed and started
/// again on the same port, empty or from an RDB with other values (nobody
/// writes anything, so no invalidation will ever report them): no read
/// through nearcache returns an old value, from the moment the new server
/// answers; once L1 serves again, every key read through it equals Redis.
fn restart_serves_no_value_from_before(mode: InvalidationMode, other_data: bool) {
    let _serial = serial();
    let events: &[&str] = if mode == InvalidationMode::Keyspace {
        &["--notify-keyspace-events", "KEA"]
    } else {
        &[]
    };
    let mut redis = RedisServer::start_with(events);
    let mut config = test_config(&redis.url());
    config.cache.invalidation = mode;
    let proxy = Proxy::with_config(config);
    proxy.wait_serving();
    let label = if mode == InvalidationMode::Keyspace {
        "keyspace"
    } else {
        "tracking"
    };
    let feed = proxy.stats();
    assert!(
        feed.iter()
            .any(|v| *v == redis::Value::BulkString(label.as_bytes().to_vec())),
        "feed is not {label}: {feed:?}"
    );

    // Old values, written through nearcache, and every key cached.
    let mut c = RawClient::connect(proxy.port);
    for i in 0..KEYS {
        let k = key(i);
        assert_eq!(
            c.cmd(&[b"SET", k.as_bytes(), format!("old-{i}").as_bytes()]),
            b"+OK\r\n"
        );
    }
    wait_until(Duration::from_secs(10), "every key an L1 hit", || {
        let gets = support::cmdstat(&redis, "get");
        for i in 0..KEYS {
            let k = key(i);
            let v = bulk(&c.cmd(&[b"GET", k.as_bytes()]));
            assert_eq!(v.unwrap(), format!("old-{i}").into_bytes());
        }
        support::cmdstat(&redis, "get") == gets
    });
    let hits_before = proxy.stat("hits");

    // The other server's data, as an RDB the restarted one will load.
    if other_data {
        let other = RedisServer::start();
        let mut o = other.conn();
        for i in 0..KEYS {
            if let Some(v) = restarted_value(i, true) {
                let _: () = redis::cmd("SET").arg(key(i)).arg(v).query(&mut o).unwrap();
            }
        }
        let _: () = redis::cmd("SAVE").query(&mut o).unwrap();
        redis.kill();
        std::fs::copy(other.dir().join("dump.rdb"), redis.dir().join("dump.rdb")).unwrap();
    } else {
        redis.kill();
    }
    redis.restart();
    let restarted = Instant::now();
    let mut direct = redis.conn();
    for i in 0..KEYS {
        let v: Option<String> = redis::cmd("GET").arg(key(i)).query(&mut direct).unwrap();
        assert_eq!(
            v,
            restarted_value(i, other_data),
            "the restarted server's data"
        );
    }

    // From now on: every answer is the new value or an error, never an old value.
    let mut reads = 0u64;
    let mut errors = 0u64;
    let mut c = RawClient::connect(proxy.port);
    let mut serving_again = None;
    while restarted.elapsed() < Duration::from_secs(4) {
        for i in 0..KEYS {
            let k = key(i);
            c.send(&[b"GET", k.as_bytes()]);
            let reply = match c.next_frame(Duration::from_secs(5)) {
                Ok(Some(r)) => r,
                Ok(None) => panic!("GET {k}: no reply"),
                Err(_) => {
                    c = RawClient::connect(proxy.port);
                    errors += 1;
                    continue;
                }
            };
            if reply.starts_with(b"-") {
                errors += 1;
                continue;
            }
            reads += 1;
            assert_eq!(
                bulk(&reply).map(|v| text(&v)),
                restarted_value(i, other_data),
                "GET {k} through nearcache {:?} after the restart",
                restarted.elapsed()
            );
        }
        if serving_again.is_none() && proxy.stat("serving") == 1 {
            serving_again = Some(restarted.elapsed());
        }
    }
    let serving_again = serving_again.expect("L1 serving again within 4 s of the restart");

    // L1 serves again, filled from the new server: hits, and equal to Redis.
    proxy.wait_serving();
    let hits = proxy.stat("hits");
    for _ in 0..2 {
        for i in 0..KEYS {
            let k = key(i);
            let through = bulk(&c.cmd(&[b"GET", k.as_bytes()])).map(|v| text(&v));
            let on_redis: Option<String> = redis::cmd("GET").arg(&k).query(&mut direct).unwrap();
            assert_eq!(through, on_redis, "{k}");
        }
    }
    assert!(
        proxy.stat("hits") > hits,
        "L1 serves again after the restart"
    );
    println!(
        "{label}, restarted {}: {reads} reads and {errors} errors in the 4 s after the restart, \
         none old; L1 serving again {serving_again:?} after it (hits before: {hits_before})",
        if other_data {
            "with other data"
        } else {
            "empty"
        }
    );
}

#[test]
fn redis_restarted_empty_tracking() {
    restart_serves_no_value_from_before(InvalidationMode::Tracking, false);
}

#[test]
fn redis_restarted_with_other_data_tracking() {
    restart_serves_no_value_from_before(InvalidationMode::Tracking, true);
}

#[test]
fn redis_restarted_empty_keyspace() {
    restart_serves_no_value_from_before(InvalidationMode::Keyspace, false);
}

#[test]
fn redis_restarted_with_other_data_keyspace() {
    restart_serves_no_value_from_before(InvalidationMode::Keyspace, true);
}

// --- 3. TDengine killed, hanging, failing ----------------------------------------------

const TD_TIMEOUT: Duration = Duration::from_millis(500);
/// A kline miss during a fault is answered by the TDengine timeout (which
/// covers queueing for a query slot) plus this.
const TD_SLACK: Duration = Duration::from_millis(400);

/// Redis, the stand-in (symbols 000001 and 600519 added) on its own runtime,
/// nearcache with `tweak` applied to its TDengine section. Fields drop in
/// order: proxy first.
struct TdEnv {
    proxy: Proxy,
    ta: Option<TaosAdapter>,
    rt: tokio::runtime::Runtime,
    redis: RedisServer,
}

fn start_stand_in(
    rt: &tokio::runtime::Runtime,
    mode: Mode,
    addr: Option<std::net::SocketAddr>,
) -> TaosAdapter {
    let ta = match addr {
        None => rt.block_on(TaosAdapter::start_without_quickack(mode)),
        Some(addr) => rt.block_on(TaosAdapter::start_with(mode, addr, false, None)),
    };
    ta.add_symbol("000001");
    ta.add_symbol("600519");
    ta
}

impl TdEnv {
    fn start(mode: Mode, tweak: impl FnOnce(&mut TdengineConfig)) -> TdEnv {
        let redis = RedisServer::start();
        let rt = runtime();
        let ta = start_stand_in(&rt, mode, None);
        let mut td = taosadapter::kline_config(ta.dsn(), TD_TIMEOUT);
        tweak(&mut td);
        let mut config = test_config(&redis.url());
        config.tdengine = Some(td);
        let proxy = Proxy::with_config(config);
        proxy.wait_serving();
        TdEnv {
            proxy,
            ta: Some(ta),
            rt,
            redis,
        }
    }

    fn ta(&self) -> &TaosAdapter {
        self.ta.as_ref().expect("the stand-in runs")
    }

    /// `tdengine_circuit` of NEARCACHE STATS.
    fn circuit(&self) -> String {
        let stats = self.proxy.stats();
        let at = stats
            .iter()
            .position(|v| *v == redis::Value::BulkString(b"tdengine_circuit".to_vec()))
            .expect("tdengine_circuit in NEARCACHE STATS");
        match &stats[at + 1] {
            redis::Value::BulkString(s) => text(s),
            other => panic!("tdengine_circuit is {other:?}"),
        }
    }
}

/// GET through nearcache; returns the reply and how long it took.
fn timed_get(c: &mut RawClient, key: &str) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    let r = c.cmd(&[b"GET", key.as_bytes()]);
    (r, t.elapsed())
}

/// A kline miss during a fault: `-ERR tdengine unavailable: ...` within the
/// timeout plus slack; returns the error text.
fn expect_unavailable(c: &mut RawClient, key: &str) -> String {
    let (r, took) = timed_get(c, key);
    let e = text(&r);
    assert!(e.starts_with("-ERR tdengine unavailable: "), "{key}: {e:?}");
    assert!(took < TD_TIMEOUT + TD_SLACK, "{key}: {e:?} after {took:?}");
    e.trim_end().to_string()
}

/// Plain keys and kline keys already in Redis, read and written in a loop
/// by `n` clients until `stop`; returns round trips and the slowest one.
fn bystanders(
    port: u16,
    n: usize,
    stop: Arc<AtomicBool>,
    filled: Vec<u8>,
) -> Vec<std::thread::JoinHandle<(u64, Duration)>> {
    (0..n)
        .map(|t| {
            let stop = stop.clone();
            let filled = filled.clone();
            std::thread::spawn(move || {
                let mut c = RawClient::connect(port);
                let key = format!("plain:{t}");
                let (mut rounds, mut worst) = (0u64, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let v = rounds.to_string();
                    assert_eq!(c.cmd(&[b"SET", key.as_bytes(), v.as_bytes()]), b"+OK\r\n");
                    assert_eq!(
                        bulk(&c.cmd(&[b"GET", key.as_bytes()])).unwrap(),
                        v.as_bytes()
                    );
                    // A kline key TDengine filled before the fault, and one
                    // that was in Redis all along: neither needs TDengine.
                    assert_eq!(bulk(&c.line("GET kline:000001:1d")).unwrap(), filled);
                    assert_eq!(bulk(&c.line("GET kline:600519:1d")).unwrap(), b"in-redis");
                    worst = worst.max(started.elapsed());
                    rounds += 1;
                }
                (rounds, worst)
            })
        })
        .collect()
}

/// Round trips per bystander over a fault, and the slowest (each round trip
/// is SET, GET and two kline GETs): far below the TDengine timeout.
fn check_bystanders(what: &str, handles: Vec<std::thread::JoinHandle<(u64, Duration)>>) {
    let mut total = 0;
    let mut worst = Duration::ZERO;
    for h in handles {
        let (n, w) = h.join().unwrap();
        total += n;
        worst = worst.max(w);
    }
    println!("{what}: bystanders made {total} rounds, the slowest {worst:?}");
    assert!(total > 50, "{what}: only {total} bystander rounds");
    assert!(
        worst < Duration::from_millis(250),
        "{what}: a bystander round took {worst:?}"
    );
}

for_each_path!(
/// The stand-in is killed (its listener closed, its connections dropped):
/// kline misses fail promptly, the circuit opens after `breaker_failures`
/// and then fails fast without contacting TDengine, everything else is
/// unaffected; started again on the same port, the first miss after the
/// cooldown probes, fills, and the circuit closes.
fn tdengine_killed_opens_the_circuit_and_recovers_after_a_restart(mode) {
    let _serial = serial();
    let mut env = TdEnv::start(mode, |t| {
        t.breaker_failures = 3;
        t.breaker_cooldown = Duration::from_secs(1);
    });
    let mut c = RawClient::connect(env.proxy.port);
    let filled = bulk(&c.line("GET kline:000001:1d")).expect("filled");
    let _: () = redis::cmd("SET")
        .arg("kline:600519:1d")
        .arg("in-redis")
        .query(&mut env.redis.conn())
        .unwrap();
    assert_eq!(env.circuit(), "closed");

    let stop = Arc::new(AtomicBool::new(false));
    let others = bystanders(env.proxy.port, 2, stop.clone(), filled.clone());

    // Killed: connections closed, nothing listens.
    let ta = env.ta.take().unwrap();
    let addr = ta.addr;
    ta.set_fault(Fault::Down);
    drop(ta);
    wait_until(Duration::from_secs(5), "the stand-in's port refuses", || {
        std::net::TcpStream::connect(addr).is_err()
    });
    let mut errors = Vec::new();
    for key in ["kline:000001:5m", "kline:600519:5m", "kline:000001:15m"] {
        errors.push(expect_unavailable(&mut c, key));
    }
    assert_eq!(env.circuit(), "open", "after 3 failures: {errors:?}");
    for key in ["kline:000001:1w", "kline:600519:1w"] {
        let (r, took) = timed_get(&mut c, key);
        assert_eq!(r, b"-ERR tdengine unavailable: circuit breaker open\r\n");
        assert!(took < Duration::from_millis(100), "{key}: {took:?} with the circuit open");
    }

    // Started again on the same port.
    let ta = start_stand_in(&env.rt, mode, Some(addr));
    let restarted = Instant::now();
    let mut misses = 0;
    wait_until(Duration::from_secs(5), "a kline miss filled after the restart", || {
        let (r, _) = timed_get(&mut c, "kline:000001:1w");
        misses += 1;
        if r.starts_with(b"-") {
            assert_eq!(r, b"-ERR tdengine unavailable: circuit breaker open\r\n");
            return false;
        }
        bulk(&r).is_some_and(|v| v.starts_with(br#"[{"ts":"#))
    });
    let recovered = restarted.elapsed();
    assert_eq!(env.circuit(), "closed");
    assert_eq!(ta.query_count(), 1, "one probe: {:?}", ta.sql_log());
    stop.store(true, Ordering::Relaxed);
    check_bystanders(&format!("{mode}, killed"), others);
    println!(
        "{mode}: killed → {errors:?}, circuit open; restarted → filled {recovered:?} later \
         ({misses} GETs, breaker_cooldown 1 s)"
    );
    // The cooldown plus one query, with slack.
    assert!(recovered < Duration::from_millis(2500), "recovered after {recovered:?}");
    env.ta = Some(ta);
});

for_each_path!(
/// Each fault in turn (hang, error replies, connections dropped) while 8
/// clients keep missing kline keys with only 2 query slots: every miss is
/// `-ERR tdengine unavailable` within the timeout (waiting for a slot
/// included), and other clients' plain GET/SET and kline keys already in
/// Redis or L1 stay fast throughout.
fn tdengine_faults_leave_other_keys_fast_under_kline_load(mode) {
    let _serial = serial();
    let env = TdEnv::start(mode, |t| {
        t.max_concurrent_queries = 2;
        // Error replies come back at once: thousands of failures in a phase.
        t.breaker_failures = u32::MAX;
    });
    let mut c = RawClient::connect(env.proxy.port);
    let filled = bulk(&c.line("GET kline:000001:1d")).expect("filled");
    let _: () = redis::cmd("SET")
        .arg("kline:600519:1d")
        .arg("in-redis")
        .query(&mut env.redis.conn())
        .unwrap();
    let faults = [
        Fault::Hang,
        Fault::Error {
            code: 0x2662,
            message: "Table does not exist".into(),
        },
        Fault::Down,
    ];
    for fault in faults {
        env.ta().set_fault(fault.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let others = bystanders(env.proxy.port, 2, stop.clone(), filled.clone());
        let answered = Arc::new(AtomicU64::new(0));
        let port = env.proxy.port;
        let loaders: Vec<_> = (0..8)
            .map(|t| {
                let stop = stop.clone();
                let answered = answered.clone();
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(port);
                    let mut kinds = HashMap::<String, u64>::new();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        // Misses of keys never filled: each one goes to TDengine.
                        let key = format!("kline:L{t}x{i}:1d");
                        let e = expect_unavailable(&mut c, &key);
                        let kind = e.split(": ").nth(1).unwrap_or("").to_string();
                        *kinds.entry(kind).or_default() += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    kinds
                })
            })
            .collect();
        let started = Instant::now();
        wait_until(Duration::from_secs(10), "kline misses answered during the fault", || {
            answered.load(Ordering::Relaxed) >= 24 && started.elapsed() >= Duration::from_millis(1500)
        });
        stop.store(true, Ordering::Relaxed);
        let mut kinds = HashMap::<String, u64>::new();
        for l in loaders {
            for (k, n) in l.join().unwrap() {
                *kinds.entry(k).or_default() += n;
            }
        }
        let what = format!("{mode}, {fault:?}");
        println!("{what}: kline misses answered: {kinds:?}");
        check_bystanders(&what, others);
        assert_eq!(env.circuit(), "closed", "breaker_failures is u32::MAX");
    }
    env.ta().set_fault(Fault::None);
    assert!(bulk(&c.line("GET kline:000001:1w")).is_some_and(|v| v.starts_with(b"[")));
});

for_each_path!(
/// `on_error = "nil"`: error replies from TDengine become nils (never
/// cached, never written to Redis), the circuit opens after
/// `breaker_failures` and then answers nil at once without a query, and
/// after the cooldown a probe fills.
fn tdengine_errors_with_on_error_nil_open_the_circuit(mode) {
    let _serial = serial();
    let env = TdEnv::start(mode, |t| {
        t.on_error = TdOnError::Nil;
        t.breaker_failures = 2;
        t.breaker_cooldown = Duration::from_secs(1);
    });
    let mut c = RawClient::connect(env.proxy.port);
    env.ta().set_fault(Fault::Error {
        code: 0x2662,
        message: "Table does not exist".into(),
    });
    for key in ["kline:000001:5m", "kline:600519:5m"] {
        let (r, took) = timed_get(&mut c, key);
        assert_eq!(r, b"$-1\r\n", "{key}");
        assert!(took < TD_TIMEOUT, "{key}: {took:?}");
    }
    assert_eq!(env.circuit(), "open");
    let queries = env.ta().query_count();
    let opened = Instant::now();
    for key in ["kline:000001:1d", "kline:600519:1d", "kline:000001:1w"] {
        let (r, took) = timed_get(&mut c, key);
        assert_eq!(r, b"$-1\r\n", "{key}");
        assert!(took < Duration::from_millis(100), "{key}: {took:?}");
    }
    assert!(opened.elapsed() < Duration::from_secs(1), "still within the cooldown");
    assert_eq!(env.ta().query_count(), queries, "no query while the circuit is open");
    let keys: i64 = redis::cmd("DBSIZE").query(&mut env.redis.conn()).unwrap();
    assert_eq!(keys, 0, "a failure's nil is never written to Redis");
    assert_eq!(c.line("SET plain v"), b"+OK\r\n");
    assert_eq!(bulk(&c.line("GET plain")).unwrap(), b"v");

    env.ta().set_fault(Fault::None);
    wait_until(Duration::from_secs(5), "a fill after the cooldown", || {
        bulk(&c.line("GET kline:000001:5m")).is_some()
    });
    assert_eq!(env.circuit(), "closed");
});

// --- 4. SIGTERM under load with slow clients -------------------------------------------

const GRACE: Duration = Duration::from_secs(2);

/// How a client's connection ended after SIGTERM, and what it saw.
#[derive(Debug)]
struct Ended {
    key: String,
    /// INCR replies received (each the previous one plus 1).
    acked: u64,
    /// Requests sent (some may never have been read by nearcache).
    sent: u64,
    /// The read error that ended it (`UnexpectedEof`: a clean close).
    end: std::io::ErrorKind,
}

/// Reads frames until the connection ends; `on_frame` checks each one.
fn read_to_end(
    s: &mut std::net::TcpStream,
    slow: Option<Duration>,
    mut on_frame: impl FnMut(&[u8]),
) -> std::io::ErrorKind {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; if slow.is_some() { 16 * 1024 } else { 64 * 1024 }];
    loop {
        while let Some(len) = nearcache::protocol::frame_len(&buf) {
            on_frame(&buf[..len]);
            buf.drain(..len);
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                assert!(buf.is_empty(), "a partial reply before the close");
                return std::io::ErrorKind::UnexpectedEof;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("no reply and no close for 10 s")
            }
            Err(e) => return e.kind(),
        }
        if let Some(pause) = slow {
            std::thread::sleep(pause);
        }
    }
}

/// A client that pipelines INCRs of its own key: `batch` INCRs per write
/// (with `with_big` a GET of a 64 KiB value after each), at most `window`
/// requests unanswered, replies read at full speed or 16 KiB per `slow`.
fn load_client(
    port: u16,
    key: String,
    batch: usize,
    window: u64,
    with_big: bool,
    slow: Option<Duration>,
) -> std::thread::JoinHandle<Ended> {
    use std::io::Write;
    std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let replies = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let per_incr = if with_big { 2 } else { 1 };
        let writer = {
            let (replies, done, sent, key) =
                (replies.clone(), done.clone(), sent.clone(), key.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for _ in 0..batch {
                    out.extend(nearcache::protocol::command([b"INCR", key.as_bytes()]));
                    if with_big {
                        out.extend(nearcache::protocol::command([&b"GET"[..], b"big"]));
                    }
                }
                let n = (batch * per_incr) as u64;
                while !done.load(Ordering::Relaxed) {
                    if sent.load(Ordering::Relaxed) >= replies.load(Ordering::Relaxed) + window {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    if w.write_all(&out).is_err() {
                        break;
                    }
                    sent.fetch_add(n, Ordering::Relaxed);
                }
            })
        };
        let mut acked = 0u64;
        let end = read_to_end(&mut s, slow, |frame| {
            if frame.starts_with(b":") {
                acked += 1;
                assert_eq!(
                    frame,
                    format!(":{acked}\r\n").as_bytes(),
                    "{key}: INCR replies in order"
                );
            } else {
                assert!(
                    frame.starts_with(b"$65536\r\n"),
                    "{key}: {:?}",
                    text(&frame[..frame.len().min(40)])
                );
            }
            replies.fetch_add(1, Ordering::Relaxed);
        });
        done.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        Ended {
            key,
            acked,
            sent: sent.load(Ordering::Relaxed) / per_incr as u64,
            end,
        }
    })
}

/// What a SIGTERM run saw.
struct Drained {
    /// From SIGTERM to the exit.
    exited: Duration,
    /// Per client: Redis applied more INCRs than the client got replies for.
    unanswered: Vec<String>,
}

/// Starts the real binary (`shutdown_grace` = [`GRACE`]) in front of a
/// fresh Redis, runs `clients` until each has had replies, runs `during`
/// (e.g. a subscription), sends SIGTERM and waits for the exit; checks the
/// exit status and time and that no acknowledged INCR is missing on Redis.
fn sigterm_run(
    clients: &[(&str, usize, u64, bool, Option<Duration>)],
    during: impl FnOnce(u16) -> Box<dyn FnOnce()>,
) -> Drained {
    let _serial = serial();
    let redis = RedisServer::start();
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(vec![b'x'; 65536])
        .query(&mut redis.conn())
        .unwrap();
    let dir = std::env::temp_dir().join(format!("nearcache-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("sigterm.toml");
    std::fs::write(
        &conf,
        format!("shutdown_grace = \"{}s\"\n", GRACE.as_secs()),
    )
    .unwrap();
    let mut nc = support::Spawned::start(&conf, &redis.url());
    wait_until(Duration::from_secs(10), "nearcache reaches Redis", || {
        let mut c = RawClient::connect(nc.port);
        c.line("PING") == b"+PONG\r\n"
    });
    let port = nc.port;
    let handles: Vec<_> = clients
        .iter()
        .map(|&(key, batch, window, with_big, slow)| {
            load_client(port, key.to_string(), batch, window, with_big, slow)
        })
        .collect();
    let after = during(port);
    // Load running: every client has had a few windows of replies.
    wait_until(Duration::from_secs(10), "every client got replies", || {
        let mut c = redis.conn();
        clients.iter().all(|&(key, _, window, _, _)| {
            let n: Option<u64> = redis::cmd("GET").arg(key).query(&mut c).unwrap();
            n.unwrap_or(0) > 2 * window
        })
    });

    let term = Instant::now();
    nc.signal("TERM");
    let status = nc.wait_exit(GRACE + Duration::from_secs(5));
    let exited = term.elapsed();
    let status = status.unwrap_or_else(|| panic!("no exit {exited:?} after SIGTERM"));
    let ended: Vec<Ended> = handles.into_iter().map(|c| c.join().unwrap()).collect();
    after();

    let mut direct = redis.conn();
    let mut unanswered = Vec::new();
    for e in &ended {
        let on_redis: Option<u64> = redis::cmd("GET").arg(&e.key).query(&mut direct).unwrap();
        let on_redis = on_redis.unwrap_or(0);
        println!(
            "{}: sent {} INCRs, {} acknowledged, Redis has {on_redis}, ended with {:?}",
            e.key, e.sent, e.acked, e.end
        );
        assert!(
            on_redis >= e.acked,
            "{}: acknowledged INCRs lost: {e:?}, Redis {on_redis}",
            e.key
        );
        if on_redis != e.acked {
            unanswered.push(format!(
                "{}: Redis applied {on_redis} INCRs, the client got {} replies, then {:?}",
                e.key, e.acked, e.end
            ));
        }
    }
    println!("SIGTERM: exit {status} after {exited:?} (shutdown_grace {GRACE:?})");
    assert!(status.success(), "exit status {status}");
    assert!(
        exited < GRACE + Duration::from_millis(1500),
        "exit {exited:?} after SIGTERM, shutdown_grace {GRACE:?}"
    );
    Drained { exited, unanswered }
}

/// SIGTERM while 3 clients keep pipelining INCRs of their own keys (up to
/// 1,024 unanswered, replies read at once) and one is subscribed: the drain
/// stops reading at once (a client that never stops sending is no reason
/// to wait for the grace), answers everything it read, in order, and closes
/// each client; the process exits 0 well within `shutdown_grace`; every
/// INCR Redis applied was answered to its client, so none acknowledged is
/// lost and none is applied without its client being told.
#[test]
fn sigterm_under_pipelined_load_answers_everything_read() {
    let clients = [
        ("pipe:0", 64, 1024, false, None),
        ("pipe:1", 64, 1024, false, None),
        ("pipe:2", 64, 1024, false, None),
    ];
    let drained = sigterm_run(&clients, |port| {
        let mut sub = RawClient::connect(port);
        assert!(sub
            .line("SUBSCRIBE news")
            .starts_with(b"*3\r\n$9\r\nsubscribe\r\n"));
        Box::new(move || {
            let end = sub.next_frame(Duration::from_secs(1));
            assert!(
                end.is_err(),
                "the subscribed client is closed by the drain: {end:?}"
            );
        })
    });
    assert!(
        drained.unanswered.is_empty(),
        "applied on Redis, never answered to the client (exit after {:?}):\n{}",
        drained.exited,
        drained.unanswered.join("\n")
    );
    assert!(
        drained.exited < GRACE,
        "the drain waited for the grace ({:?}) though everything read was answered",
        drained.exited
    );
}

/// SIGTERM while 2 clients pipeline INCRs and 64 KiB GETs (at most 32
/// requests, about 1 MB of replies, unanswered) and read their replies at
/// about 3 MB/s: nearcache has stopped reading them (their output is over
/// its pause mark), so requests are still unread in its socket buffer when
/// it has written its last replies. Every reply to a request it read must
/// still reach the client before the connection ends: the client can read
/// them all well within `shutdown_grace`.
#[test]
fn sigterm_with_slow_readers_delivers_every_answered_reply() {
    let slow = Some(Duration::from_millis(5));
    let clients = [
        ("slow:0", 16, 32, true, slow),
        ("slow:1", 16, 32, true, slow),
    ];
    let drained = sigterm_run(&clients, |_| Box::new(|| {}));
    assert!(
        drained.unanswered.is_empty(),
        "applied on Redis, the reply never reached the client (exit after {:?}):\n{}",
        drained.exited,
        drained.unanswered.join("\n")
    );
}
