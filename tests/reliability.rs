//! Reliability under a slow, busy or stopped upstream, and the bounds and
//! orderings of issue 12 that had no end-to-end test: a slow command is
//! waited for (slow is not dead) while a stopped Redis still fails
//! promptly; SCRIPT KILL reaches a server busy with a script; pinned
//! connections are returned and capped; SELECT inside MULTI; the TDengine
//! write-back never lands after the client's own later DEL.
//!
//! Real redis-server processes, nearcache in-process (see `support`).

mod support;
#[macro_use]
#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::time::{Duration, Instant};

use nearcache::config::InvalidationMode;
use support::{runtime, test_config, Proxy, RawClient, RedisServer};
use taosadapter::TaosAdapter;

/// Tests here measure latencies and read process-wide metrics: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `ok` every 10 ms until it holds, or panics with `what` after `timeout`.
fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "{what} (not within {timeout:?})");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A metric's value summed over label sets matching `labels` (a substring
/// of the label part, e.g. `result="alive"`), from `/metrics`.
fn metric(proxy: &Proxy, name: &str, labels: &str) -> f64 {
    let (code, body) = proxy.http_get("/metrics");
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| (r.starts_with('{') || r.starts_with(' ')) && r.contains(labels))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn health_checks(proxy: &Proxy, result: &str) -> f64 {
    metric(
        proxy,
        "nearcache_upstream_health_checks_total",
        &format!("result=\"{result}\""),
    )
}

/// Does Redis answer a PING on a fresh connection within 100 ms? (No while
/// it runs `DEBUG SLEEP`; `-BUSY` while a script runs past the threshold.)
fn redis_ping(redis: &RedisServer) -> Option<Vec<u8>> {
    let mut c = RawClient::connect(redis.port);
    c.send(&[b"PING"]);
    c.try_reply(Duration::from_millis(100))
}

const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);
const CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// nearcache with a short command timeout and one multiplexed connection
/// per protocol (so every client's pool requests share it).
fn short_timeouts(redis: &RedisServer) -> Proxy {
    let mut cfg = test_config(&redis.url());
    cfg.upstream.command_timeout = COMMAND_TIMEOUT;
    cfg.upstream.connect_timeout = CHECK_TIMEOUT;
    cfg.upstream.pool_size = 1;
    Proxy::with_config(cfg)
}

// --- Slow is not dead ------------------------------------------------------------------

/// `DEBUG SLEEP 1` outlasts `command_timeout` (300 ms) more than three
/// times: Redis is slow, not dead (the health check's PING is answered once
/// the sleep ends, within the check's own timeout), so the client gets its
/// `+OK` as from Redis directly, and another client's GET multiplexed on the
/// same connection waits behind it and succeeds too.
#[test]
fn a_slow_command_is_waited_for_with_the_requests_behind_it() {
    let _serial = serial();
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let proxy = short_timeouts(&redis);
    let _: () = redis::cmd("SET")
        .arg("slow:k")
        .arg("v")
        .query(&mut redis.conn())
        .unwrap();
    let alive_before = health_checks(&proxy, "alive");

    let mut sleeper = RawClient::connect(proxy.port);
    let mut reader = RawClient::connect(proxy.port);
    let t = Instant::now();
    sleeper.send(&[b"DEBUG", b"SLEEP", b"1"]);
    wait_until(Duration::from_secs(2), "Redis asleep", || {
        redis_ping(&redis).is_none()
    });
    let r = Instant::now();
    reader.send(&[b"GET", b"slow:k"]);

    let reply = sleeper.try_reply(Duration::from_secs(5)).expect("a reply");
    let slept = t.elapsed();
    assert_eq!(text(&reply), "+OK\r\n", "after {slept:?}");
    assert!(slept >= Duration::from_millis(950), "{slept:?}");
    let got = reader.try_reply(Duration::from_secs(5)).expect("a reply");
    let waited = r.elapsed();
    assert_eq!(text(&got), "$1\r\nv\r\n");
    assert!(
        waited > COMMAND_TIMEOUT,
        "the GET waited behind the sleep on the shared connection ({waited:?})"
    );
    println!("DEBUG SLEEP 1 answered +OK after {slept:?}; the GET behind it after {waited:?}");
    assert!(
        health_checks(&proxy, "alive") > alive_before,
        "a health check found Redis alive"
    );
    // Both clients keep their connections: nothing was abandoned.
    assert_eq!(sleeper.line("PING"), b"+PONG\r\n");
    assert_eq!(text(&reader.line("GET slow:k")), "$1\r\nv\r\n");
}

/// A script running much longer than `command_timeout` + the check's
/// timeout: Redis answers the health check's PING with `-BUSY`, which
/// proves it alive, so nearcache keeps waiting (one check per period) and
/// the script's reply comes through.
#[test]
fn a_long_script_is_waited_for_past_every_timeout() {
    let _serial = serial();
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.upstream.command_timeout = COMMAND_TIMEOUT;
    cfg.upstream.connect_timeout = Duration::from_millis(500);
    let proxy = Proxy::with_config(cfg);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg("100")
        .query(&mut redis.conn())
        .unwrap();
    let alive_before = health_checks(&proxy, "alive");
    // Spins for 2.5 s by the server's clock.
    let script = "local t = redis.call('TIME'); local stop = t[1] * 1000000 + t[2] + 2500000; \
                  while true do t = redis.call('TIME'); \
                  if t[1] * 1000000 + t[2] > stop then return 'done' end end";
    let mut c = RawClient::connect(proxy.port);
    let t = Instant::now();
    c.send(&[b"EVAL", script.as_bytes(), b"0"]);
    let reply = c.try_reply(Duration::from_secs(10)).expect("a reply");
    let took = t.elapsed();
    assert_eq!(text(&reply), "$4\r\ndone\r\n", "after {took:?}");
    assert!(took >= Duration::from_millis(2400), "{took:?}");
    let checks = health_checks(&proxy, "alive") - alive_before;
    println!("a 2.5 s script answered after {took:?}; {checks} health checks found Redis alive");
    assert!(
        checks >= 2.0,
        "checked once per command_timeout while it ran"
    );
}

/// A stopped Redis (SIGSTOP: sockets open, the kernel still accepts
/// connections, nothing answers) is dead to nearcache: requests on shared
/// and pinned connections get errors after `command_timeout` plus the
/// health check's timeout, not after the stop ends.
#[test]
fn a_stopped_upstream_still_fails_promptly() {
    let _serial = serial();
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.upstream.command_timeout = COMMAND_TIMEOUT;
    cfg.upstream.connect_timeout = Duration::from_millis(500);
    let proxy = Proxy::with_config(cfg);
    let bound = COMMAND_TIMEOUT + Duration::from_millis(500);
    let mut shared = RawClient::connect(proxy.port);
    let mut tx = RawClient::connect(proxy.port);
    assert_eq!(tx.line("MULTI"), b"+OK\r\n");
    assert_eq!(tx.line("INCR stop:n"), b"+QUEUED\r\n");
    let dead_before = health_checks(&proxy, "dead");

    redis.signal("STOP");
    let t = Instant::now();
    shared.send(&[b"SET", b"stop:k", b"1"]);
    tx.send(&[b"EXEC"]);
    let e1 = shared.try_reply(Duration::from_secs(5)).expect("an error");
    let took1 = t.elapsed();
    let e2 = tx.try_reply(Duration::from_secs(5)).expect("an error");
    let took2 = t.elapsed();
    redis.signal("CONT");
    println!(
        "stopped Redis: shared SET failed after {took1:?} ({:?}), pinned EXEC after {took2:?} ({:?})",
        text(&e1),
        text(&e2)
    );
    for (e, took) in [(&e1, took1), (&e2, took2)] {
        assert!(
            text(e).starts_with(
                "-ERR upstream unavailable: no reply within 300ms and no answer to a health check within 500ms"
            ),
            "{:?}",
            text(e)
        );
        // Not before the check had its chance, not long after.
        assert!(took >= bound - Duration::from_millis(50), "{took:?}");
        assert!(took < bound + Duration::from_millis(700), "{took:?}");
    }
    assert!(health_checks(&proxy, "dead") > dead_before);
    // After the stop, traffic flows again (on new connections: the clients
    // whose requests were abandoned are closed).
    wait_until(Duration::from_secs(5), "SET after SIGCONT", || {
        let mut c = RawClient::connect(proxy.port);
        c.send(&[b"SET", b"stop:k", b"2"]);
        c.try_reply(Duration::from_secs(3)).as_deref() == Some(b"+OK\r\n")
    });
}

/// A blocking command is not late, however long Redis holds it: on a live
/// server it waits out its own timeout (the periodic health checks find
/// Redis alive), while on a stopped one it fails within a check period plus
/// the check, instead of waiting forever.
#[test]
fn a_blocked_client_waits_on_a_live_server_and_fails_on_a_stopped_one() {
    let _serial = serial();
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.upstream.command_timeout = COMMAND_TIMEOUT;
    cfg.upstream.connect_timeout = Duration::from_millis(500);
    let proxy = Proxy::with_config(cfg);

    let mut c = RawClient::connect(proxy.port);
    let t = Instant::now();
    assert_eq!(text(&c.line("BLPOP blk:q 1.5")), "*-1\r\n");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");

    let mut blocked = RawClient::connect(proxy.port);
    blocked.send(&[b"BLPOP", b"blk:q", b"0"]);
    wait_until(Duration::from_secs(5), "the client blocked", || {
        blocked_clients(&redis) == 1
    });
    redis.signal("STOP");
    let t = Instant::now();
    let r = blocked.next_frame(Duration::from_secs(5));
    let took = t.elapsed();
    redis.signal("CONT");
    let seen = match &r {
        Ok(Some(e)) => text(e),
        other => format!("{other:?}"),
    };
    println!("BLPOP 1.5 on a live server: *-1 after {waited:?}; BLPOP 0 on a stopped one: {seen:?} after {took:?}");
    match r {
        Ok(Some(e)) => assert!(
            text(&e).starts_with("-ERR upstream unavailable"),
            "{:?}",
            text(&e)
        ),
        Ok(None) => panic!("a blocked client on a stopped server got nothing in {took:?}"),
        Err(_) => {}
    }
    // One check period (300 ms) + the check (500 ms) + slack.
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

// --- A busy server: SCRIPT KILL on the control connection ---------------------------

/// nearcache's id of a client connection (`CLIENT ID` is answered locally);
/// the multiplexed connection a client uses is picked by it.
fn client_id(c: &mut RawClient) -> i64 {
    let r = text(&c.line("CLIENT ID"));
    r.trim_start_matches(':').trim_end().parse().unwrap()
}

/// A client whose id has the given parity: with the default two multiplexed
/// connections, it shares (or not) another client's connection.
fn client_with_parity(port: u16, parity: i64) -> RawClient {
    loop {
        let mut c = RawClient::connect(port);
        if client_id(&mut c) % 2 == parity {
            return c;
        }
    }
}

/// A runaway script from client A: nearcache keeps waiting for it (the
/// health check's PING is answered `-BUSY`: alive), client B on A's very
/// multiplexed connection stops it with SCRIPT KILL, which goes on the
/// control connection instead of queueing behind the script's reply; A
/// gets Redis's own error. Clients C (which used A's connection before) and
/// D (new), both bound to A's connection, get `-BUSY` at once meanwhile, as
/// on connections of their own: with nothing owed they take the other
/// multiplexed connection instead of queueing behind the script.
#[test]
fn script_kill_reaches_a_busy_server_through_the_control_connection() {
    let _serial = serial();
    let redis = RedisServer::start();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg("100")
        .query(&mut redis.conn())
        .unwrap();
    let mut cfg = test_config(&redis.url());
    cfg.upstream.command_timeout = COMMAND_TIMEOUT;
    cfg.upstream.connect_timeout = Duration::from_millis(500);
    assert_eq!(cfg.upstream.pool_size, 2);
    let proxy = Proxy::with_config(cfg);

    let mut a = RawClient::connect(proxy.port);
    let parity = client_id(&mut a) % 2;
    let mut b = client_with_parity(proxy.port, parity);
    let mut c = client_with_parity(proxy.port, parity);
    assert_eq!(c.line("INCR busy:warm"), b":1\r\n");
    let mut d = client_with_parity(proxy.port, parity);
    let alive_before = health_checks(&proxy, "alive");

    let t = Instant::now();
    a.send(&[b"EVAL", b"while true do end", b"0"]);
    wait_until(Duration::from_secs(3), "Redis busy with the script", || {
        redis_ping(&redis).is_some_and(|r| r.starts_with(b"-BUSY"))
    });
    // Past command_timeout and a health check: nearcache still waits for A.
    wait_until(
        Duration::from_secs(3),
        "a health check found Redis busy",
        || health_checks(&proxy, "alive") > alive_before,
    );

    let mut c_took = Duration::ZERO;
    for (name, cl) in [("C", &mut c), ("D", &mut d)] {
        let tc = Instant::now();
        cl.send(&[b"GET", b"busy:k"]);
        let busy = cl.try_reply(Duration::from_secs(2));
        let took = tc.elapsed();
        let busy = busy.unwrap_or_else(|| panic!("{name}'s GET: no reply in {took:?}"));
        assert!(
            text(&busy).starts_with("-BUSY"),
            "{name}: {:?}",
            text(&busy)
        );
        assert!(
            took < Duration::from_millis(500),
            "{name}'s GET took {took:?}"
        );
        c_took = c_took.max(took);
    }

    let tb = Instant::now();
    let killed = b.cmd(&[b"SCRIPT", b"KILL"]);
    let b_took = tb.elapsed();
    assert_eq!(text(&killed), "+OK\r\n");
    assert!(
        b_took < Duration::from_millis(500),
        "SCRIPT KILL took {b_took:?}"
    );

    let err = a.try_reply(Duration::from_secs(5)).expect("A's reply");
    let a_took = t.elapsed();
    assert!(
        text(&err).starts_with("-ERR") && text(&err).contains("Script killed by user"),
        "{:?}",
        text(&err)
    );
    println!(
        "script killed after {a_took:?}: C and D got -BUSY within {c_took:?}, SCRIPT KILL +OK in {b_took:?}, A got {:?}",
        text(&err).trim_end()
    );
    // Nobody's connection was given up: all three carry on.
    for cl in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(cl.line("PING"), b"+PONG\r\n");
    }
}

// --- Pinned connections: returned when the state ends, capped ---------------------

/// Redis's count of clients blocked in a blocking command.
fn blocked_clients(redis: &RedisServer) -> i64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

const FULL: &str =
    "-ERR nearcache: all 2 pinned upstream connections are in use (upstream.max_pinned)\r\n";

/// With `upstream.max_pinned = 2`: three clients that each ran a BLPOP and
/// stay connected hold no pinned connection once their replies are in (so
/// they all succeed one after another); three blocked at once: the third is
/// refused with a clear error; when the blocked ones are served, pinned work
/// succeeds again.
#[test]
fn pinned_connections_are_returned_when_the_state_ends_and_capped() {
    let _serial = serial();
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.upstream.max_pinned = 2;
    let proxy = Proxy::with_config(cfg);

    let mut done: Vec<RawClient> = Vec::new();
    for i in 0..3 {
        let mut c = RawClient::connect(proxy.port);
        assert_eq!(text(&c.line("BLPOP pin:q 0.1")), "*-1\r\n", "client {i}");
        assert!(
            proxy.stat("pinned_connections") <= 1,
            "client {i}'s connection went back for the next one"
        );
        done.push(c);
    }

    let mut blocked: Vec<RawClient> = (0..2).map(|_| RawClient::connect(proxy.port)).collect();
    for c in &mut blocked {
        c.send(&[b"BLPOP", b"pin:q", b"5"]);
    }
    wait_until(Duration::from_secs(5), "two clients blocked", || {
        blocked_clients(&redis) == 2
    });
    assert_eq!(proxy.stat("pinned_connections"), 2);
    let mut third = RawClient::connect(proxy.port);
    let t = Instant::now();
    assert_eq!(text(&third.line("BLPOP pin:q 5")), FULL);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Every pinned path is refused alike, and the client stays usable.
    assert_eq!(text(&third.line("MULTI")), FULL);
    assert_eq!(third.line("PING"), b"+PONG\r\n");

    let _: () = redis::cmd("RPUSH")
        .arg("pin:q")
        .arg("a")
        .arg("b")
        .query(&mut redis.conn())
        .unwrap();
    let mut got: Vec<String> = blocked.iter_mut().map(|c| text(&c.reply())).collect();
    got.sort();
    assert_eq!(
        got,
        [
            "*2\r\n$5\r\npin:q\r\n$1\r\na\r\n",
            "*2\r\n$5\r\npin:q\r\n$1\r\nb\r\n"
        ]
    );
    assert_eq!(text(&third.line("BLPOP pin:q 0.1")), "*-1\r\n");
    assert_eq!(third.line("MULTI"), b"+OK\r\n");
    assert_eq!(third.line("INCR pin:n"), b"+QUEUED\r\n");
    assert_eq!(text(&third.line("EXEC")), "*1\r\n:1\r\n");
    assert!(proxy.stat("pinned_connections") <= 2);
}

// --- SELECT inside MULTI ---------------------------------------------------------------

fn exists_in(redis: &RedisServer, db: u32, key: &str) -> bool {
    let mut c = redis.conn();
    let _: () = redis::cmd("SELECT").arg(db).query(&mut c).unwrap();
    redis::cmd("EXISTS").arg(key).query::<i64>(&mut c).unwrap() == 1
}

/// From db 3, `MULTI; SELECT 0; DISCARD` leaves the client in db 3 (as on
/// Redis), so a later SET lands in db 3; `MULTI; SELECT 0; EXEC` moves it to
/// db 0, so a later SET lands in db 0.
#[test]
fn select_inside_multi_takes_effect_only_when_exec_runs() {
    let _serial = serial();
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut c = RawClient::connect(proxy.port);
    assert_eq!(c.line("SELECT 3"), b"+OK\r\n");

    assert_eq!(c.line("MULTI"), b"+OK\r\n");
    assert_eq!(c.line("SELECT 0"), b"+QUEUED\r\n");
    assert_eq!(c.line("DISCARD"), b"+OK\r\n");
    assert_eq!(c.line("SET sel:discard v"), b"+OK\r\n");
    assert!(
        exists_in(&redis, 3, "sel:discard"),
        "the SET after DISCARD is in db 3"
    );
    assert!(!exists_in(&redis, 0, "sel:discard"));
    assert_eq!(text(&c.line("GET sel:discard")), "$1\r\nv\r\n");

    assert_eq!(c.line("MULTI"), b"+OK\r\n");
    assert_eq!(c.line("SELECT 0"), b"+QUEUED\r\n");
    assert_eq!(text(&c.line("EXEC")), "*1\r\n+OK\r\n");
    assert_eq!(c.line("SET sel:exec v"), b"+OK\r\n");
    assert!(
        exists_in(&redis, 0, "sel:exec"),
        "the SET after EXEC is in db 0"
    );
    assert!(!exists_in(&redis, 3, "sel:exec"));
    assert_eq!(
        text(&c.line("GET sel:discard")),
        "$-1\r\n",
        "db 0 has no sel:discard"
    );
}

// --- TDengine write-back ordering -------------------------------------------------------

/// Redis, the TDengine stand-in (symbols 000001 and 600519) on its own
/// runtime, and nearcache with the application's kline route and the
/// invalidation feed in `feed` mode. Fields drop in reverse order.
struct TdEnv {
    redis: RedisServer,
    _rt: tokio::runtime::Runtime,
    ta: TaosAdapter,
    proxy: Proxy,
}

impl TdEnv {
    fn start(feed: InvalidationMode) -> TdEnv {
        let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]);
        let rt = runtime();
        let ta = rt.block_on(TaosAdapter::start(taosadapter::BINARY_PATH));
        ta.add_symbol("000001");
        ta.add_symbol("600519");
        let mut config = test_config(&redis.url());
        config.cache.invalidation = feed;
        config.tdengine = Some(taosadapter::kline_config(ta.dsn(), Duration::from_secs(2)));
        let proxy = Proxy::with_config(config);
        proxy.wait_serving();
        TdEnv {
            redis,
            _rt: rt,
            ta,
            proxy,
        }
    }
}

/// `GET kline:x` (a miss everywhere: filled from TDengine and written back
/// to Redis) and the client's own `DEL kline:x` (or `SET kline:x mine`)
/// pipelined in one write: the write-back goes out on the feed's
/// connection, the DEL on the client's; the DEL must not run before it,
/// or the key is left set after the client deleted it. After both replies
/// Redis has what the client's last command says, in both feed modes.
#[test]
fn tdengine_write_back_never_lands_after_the_clients_later_write() {
    let _serial = serial();
    for feed in [InvalidationMode::Tracking, InvalidationMode::Keyspace] {
        let env = TdEnv::start(feed);
        let mut c = RawClient::connect(env.proxy.port);
        for round in 0..3 {
            for key in ["kline:000001:1d", "kline:600519:1w"] {
                let mut both = nearcache::protocol::command([&b"GET"[..], key.as_bytes()]).to_vec();
                both.extend_from_slice(&nearcache::protocol::command([
                    &b"DEL"[..],
                    key.as_bytes(),
                ]));
                std::io::Write::write_all(&mut c.s, &both).unwrap();
                let got = c.reply();
                assert!(
                    got.starts_with(b"$"),
                    "{feed:?} round {round}: GET {key}: {:?}",
                    text(&got)
                );
                assert!(got.len() > 100, "{feed:?}: GET {key} came from TDengine");
                let del = c.reply();
                assert_eq!(
                    text(&del),
                    ":1\r\n",
                    "{feed:?} round {round}: DEL {key} found the written-back value"
                );
                let left: i64 = redis::cmd("EXISTS")
                    .arg(key)
                    .query(&mut env.redis.conn())
                    .unwrap();
                assert_eq!(
                    left, 0,
                    "{feed:?} round {round}: {key} is set after the client's DEL"
                );

                let mut both = nearcache::protocol::command([&b"GET"[..], key.as_bytes()]).to_vec();
                both.extend_from_slice(&nearcache::protocol::command([
                    &b"SET"[..],
                    key.as_bytes(),
                    b"mine",
                ]));
                std::io::Write::write_all(&mut c.s, &both).unwrap();
                assert!(c.reply().len() > 100, "{feed:?}: filled from TDengine");
                assert_eq!(c.reply(), b"+OK\r\n");
                let v: String = redis::cmd("GET")
                    .arg(key)
                    .query(&mut env.redis.conn())
                    .unwrap();
                assert_eq!(
                    v, "mine",
                    "{feed:?} round {round}: the client's SET is the last write"
                );
                assert_eq!(text(&c.line(&format!("GET {key}"))), "$4\r\nmine\r\n");
                assert_eq!(c.line(&format!("DEL {key}")), b":1\r\n");
            }
        }
        assert!(
            env.ta.query_count() >= 12,
            "{feed:?}: every GET went to TDengine"
        );
    }
}
