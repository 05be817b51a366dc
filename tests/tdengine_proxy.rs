//! The TDengine tier through the proxy: a real redis-server, nearcache
//! in-process, and the taosAdapter protocol stand-in (run WITHOUT its quick-ACK
//! option, i.e. with the kernel's default delayed ACKs like a stock server,
//! so these tests also go through nearcache's loopback relay). Every test
//! runs twice (`for_each_path!`): against a stand-in reporting a version
//! before 3.3.0.8 (the client's JSON query path) and one reporting 3.3.6.0
//! (its binary query path).

mod support;
#[macro_use]
#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::time::{Duration, Instant};

use nearcache::config::{InvalidationMode, TdOnError, TdengineConfig};
use serde_json::Value;
use support::{runtime, Proxy, RedisServer};
use taosadapter::{expected_1d, Fault, Mode, TaosAdapter};

const TIMEOUT: Duration = Duration::from_millis(500);

/// Redis, the stand-in (with symbols 000001 and 600519 added) on its own
/// runtime, and nearcache configured with `tweak` applied to the TDengine
/// section. Fields drop in reverse order: proxy, stand-in, runtime, Redis.
struct Env {
    redis: RedisServer,
    rt: tokio::runtime::Runtime,
    ta: TaosAdapter,
    proxy: Proxy,
}

impl Env {
    fn start(mode: Mode, tweak: impl FnOnce(&mut TdengineConfig)) -> Env {
        Env::start_with(mode, false, tweak)
    }

    /// With `tls`, the stand-in serves `wss` and nearcache trusts its CA.
    fn start_with(mode: Mode, tls: bool, tweak: impl FnOnce(&mut TdengineConfig)) -> Env {
        Env::start_full(mode, tls, InvalidationMode::Tracking, tweak)
    }

    /// With the invalidation feed in `feed` mode (Redis has every keyspace event on).
    fn start_full(
        mode: Mode,
        tls: bool,
        feed: InvalidationMode,
        tweak: impl FnOnce(&mut TdengineConfig),
    ) -> Env {
        let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]);
        let rt = runtime();
        let ta = if tls {
            rt.block_on(TaosAdapter::start_tls(mode, false))
        } else {
            rt.block_on(TaosAdapter::start_without_quickack(mode))
        };
        ta.add_symbol("000001");
        ta.add_symbol("600519");
        let mut td = taosadapter::kline_config(ta.dsn(), TIMEOUT);
        if tls {
            td.tls.ca_file = Some(ta.pki().ca.clone());
        }
        tweak(&mut td);
        let mut config = support::test_config(&redis.url());
        config.cache.invalidation = feed;
        config.tdengine = Some(td);
        let proxy = Proxy::with_config(config);
        proxy.wait_serving();
        Env {
            redis,
            rt,
            ta,
            proxy,
        }
    }
}

fn parse(v: &[u8]) -> Value {
    serde_json::from_slice(v).expect("valid JSON")
}

/// `calls` of `cmdstat_<cmd>` in the server's INFO commandstats (0 if absent).
fn cmd_calls(redis: &RedisServer, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .unwrap();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

fn get(c: &mut redis::Connection, key: &[u8]) -> redis::RedisResult<Option<Vec<u8>>> {
    redis::cmd("GET").arg(key).query(c)
}

/// A metric's value summed over its label sets, from `/metrics`.
fn metric(proxy: &Proxy, name: &str) -> f64 {
    let (code, body) = proxy.http_get("/metrics");
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

for_each_path!(fn cold_get_fills_from_tdengine_writes_back_and_serves_from_l1(mode) {
    let env = Env::start(mode, |_| {});
    let queries_before = metric(&env.proxy, "nearcache_tdengine_queries_total");
    let mut c = env.proxy.conn();

    let v = get(&mut c, b"kline:000001:1d").unwrap().expect("filled");
    assert!(v.starts_with(br#"[{"ts":"#), "{:?}", &v[..40]);
    assert_eq!(parse(&v), expected_1d("000001"));
    assert_eq!(
        env.ta.sql_log(),
        [
            "SELECT ts, open, high, low, close, volume FROM kline_1d WHERE symbol = '000001' ORDER BY ts DESC LIMIT 500"
        ]
    );

    // Written back to Redis with the route's TTL.
    let mut r = env.redis.conn();
    assert_eq!(
        get(&mut r, b"kline:000001:1d").unwrap().as_deref(),
        Some(&v[..])
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("kline:000001:1d")
        .query(&mut r)
        .unwrap();
    assert!(
        (14 * 60_000..=15 * 60_000).contains(&pttl),
        "PTTL {pttl} ms is not about 15 min"
    );

    // The second GET needs no TDengine query.
    let v2 = get(&mut c, b"kline:000001:1d").unwrap().unwrap();
    assert_eq!(v2, v);
    assert_eq!(env.ta.query_count(), 1);
    // Metrics are process-wide and tests run in parallel: at least ours.
    assert!(metric(&env.proxy, "nearcache_tdengine_queries_total") >= queries_before + 1.0);
    // From now on L1 serves it: no upstream GET.
    let gets = cmd_calls(&env.redis, "get");
    for _ in 0..3 {
        assert_eq!(get(&mut c, b"kline:000001:1d").unwrap().unwrap(), v);
    }
    assert_eq!(cmd_calls(&env.redis, "get"), gets, "L1 did not serve it");
});

for_each_path!(
/// A fill stays cached: its write-back goes out on the invalidation feed's
/// own connection (`NOLOOP`: Redis does not report it back to us), and the
/// feed stores the value when the SET's `+OK` arrives. So a cold GET and
/// then more GETs make exactly one upstream GET (the cold one) and no other
/// upstream read, in both feed modes. The key's other cached replies (an
/// EXISTS that said 0) are dropped all the same, and writes after the fill
/// still reach L1.
fn a_filled_key_is_served_from_l1_from_its_second_read_on(mode) {
    for feed in [InvalidationMode::Tracking, InvalidationMode::Keyspace] {
        let env = Env::start_full(mode, false, feed, |_| {});
        let mut c = env.proxy.conn();
        let key = b"kline:000001:1d";
        let exists = |c: &mut redis::Connection| -> i64 {
            redis::cmd("EXISTS").arg(key).query(c).unwrap()
        };
        assert_eq!(exists(&mut c), 0);
        assert_eq!(exists(&mut c), 0, "{feed:?}: EXISTS cached as 0");
        let exists_calls = cmd_calls(&env.redis, "exists");
        assert_eq!(exists_calls, 1, "{feed:?}: the second EXISTS was an L1 hit");

        let v = get(&mut c, key).unwrap().expect("filled");
        let pttls = cmd_calls(&env.redis, "pttl");
        for _ in 0..5 {
            assert_eq!(get(&mut c, key).unwrap().unwrap(), v);
        }
        assert_eq!(cmd_calls(&env.redis, "get"), 1, "{feed:?}: one upstream GET, the cold one");
        assert_eq!(cmd_calls(&env.redis, "pttl"), pttls, "{feed:?}: no further fills");
        assert_eq!(env.ta.query_count(), 1, "{feed:?}: TDengine asked once");

        // Our own write did not come back on the feed; the EXISTS that said
        // 0 went all the same.
        assert_eq!(exists(&mut c), 1, "{feed:?}: stale EXISTS after the write-back");

        // Someone else's write after the fill still invalidates it.
        let mut r = env.redis.conn();
        let _: () = redis::cmd("SET").arg(key).arg("newer").query(&mut r).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while get(&mut c, key).unwrap().as_deref() != Some(&b"newer"[..]) {
            assert!(Instant::now() < deadline, "{feed:?}: the filled entry outlived a write");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
});

for_each_path!(fn value_in_redis_is_returned_without_tdengine(mode) {
    let env = Env::start(mode, |_| {});
    let mut r = env.redis.conn();
    let _: () = redis::cmd("SET")
        .arg("kline:000001:1d")
        .arg("from-redis")
        .query(&mut r)
        .unwrap();
    let mut c = env.proxy.conn();
    assert_eq!(
        get(&mut c, b"kline:000001:1d").unwrap().as_deref(),
        Some(&b"from-redis"[..])
    );
    assert_eq!(env.ta.query_count(), 0);
});

for_each_path!(fn set_nx_keeps_a_value_written_during_the_query(mode) {
    let env = Env::start(mode, |t| t.timeout = Duration::from_secs(3));
    env.ta.set_fault(Fault::Slow(Duration::from_millis(600)));
    let port = env.proxy.port;
    let client = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        get(&mut c, b"kline:600519:1d").unwrap()
    });
    // Wait until the query is at the stand-in, then write directly to Redis.
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.ta.query_count() == 0 {
        assert!(Instant::now() < deadline, "query never reached TDengine");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut r = env.redis.conn();
    let _: () = redis::cmd("SET")
        .arg("kline:600519:1d")
        .arg("direct")
        .query(&mut r)
        .unwrap();
    let answer = client.join().unwrap();
    assert_eq!(answer.as_deref(), Some(&b"direct"[..]));
    assert_eq!(
        get(&mut r, b"kline:600519:1d").unwrap().as_deref(),
        Some(&b"direct"[..])
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("kline:600519:1d")
        .query(&mut r)
        .unwrap();
    assert_eq!(pttl, -1, "the direct value must be untouched (no TTL)");
    assert_eq!(env.ta.query_count(), 1);
});

const INVALID_KEYS: &[&str] = &[
    "kline:0';DROP TABLE kline_1d;--:1d",
    "kline:ÄPPL:1d",
    "kline:贵州茅台:1d",
    "kline:000001:2h",
];

fn long_key() -> String {
    format!("kline:{}:1d", "A".repeat(10 * 1024))
}

for_each_path!(fn invalid_keys_are_nil_and_never_reach_tdengine(mode) {
    let env = Env::start(mode, |_| {});
    let mut c = env.proxy.conn();
    let long = long_key();
    for key in INVALID_KEYS.iter().copied().chain([long.as_str()]) {
        assert_eq!(get(&mut c, key.as_bytes()).unwrap(), None, "{key}");
    }
    // A valid key still works afterwards and is the only SQL sent.
    assert!(get(&mut c, b"kline:000001:1d").unwrap().is_some());
    let log = env.ta.sql_log();
    assert_eq!(log.len(), 1, "{log:?}");
    for sql in &log {
        assert!(!sql.contains("DROP") && !sql.contains("2h") && !sql.contains("AAAA"));
        assert!(!sql.contains('Ä') && !sql.contains("贵州"));
    }
    // Nothing was written to Redis for them.
    let n: i64 = redis::cmd("DBSIZE").query(&mut env.redis.conn()).unwrap();
    assert_eq!(n, 1);
});

for_each_path!(fn invalid_keys_are_errors_with_on_invalid_key_error(mode) {
    let env = Env::start(mode, |t| t.on_invalid_key = TdOnError::Error);
    let mut c = env.proxy.conn();
    let long = long_key();
    for key in INVALID_KEYS.iter().copied().chain([long.as_str()]) {
        let e = get(&mut c, key.as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("invalid key for TDengine route"),
            "{key}: {e}"
        );
    }
    assert_eq!(env.ta.query_count(), 0);
});

/// GET through the proxy that must fail with `-ERR tdengine unavailable`,
/// within the timeout plus slack; returns how long it took.
fn expect_unavailable(c: &mut redis::Connection, key: &str) -> Duration {
    let t = Instant::now();
    let e = get(c, key.as_bytes()).unwrap_err();
    let took = t.elapsed();
    assert!(e.to_string().contains("tdengine unavailable"), "{key}: {e}");
    assert!(
        took < TIMEOUT + Duration::from_millis(300),
        "{key}: {took:?}"
    );
    took
}

for_each_path!(fn tdengine_down_or_error_is_an_error_reply(mode) {
    let env = Env::start(mode, |_| {});
    let mut c = env.proxy.conn();
    assert!(get(&mut c, b"kline:000001:1m").unwrap().is_some());

    env.ta.set_fault(Fault::Down);
    expect_unavailable(&mut c, "kline:000001:5m");
    expect_unavailable(&mut c, "kline:600519:5m");

    env.ta.set_fault(Fault::Error {
        code: 0x2662,
        message: "Table does not exist".into(),
    });
    let e = get(&mut c, b"kline:000001:15m").unwrap_err().to_string();
    assert!(
        e.contains("tdengine unavailable") && e.contains("Table does not exist"),
        "{e}"
    );

    // Errors are neither cached nor written: it works once TDengine is back.
    env.ta.set_fault(Fault::None);
    assert!(get(&mut c, b"kline:000001:5m").unwrap().is_some());
    assert!(get(&mut c, b"kline:000001:15m").unwrap().is_some());
    assert!(
        metric(&env.proxy, "nearcache_tdengine_errors_total") >= 3.0,
        "errors metric"
    );
});

for_each_path!(fn tdengine_hang_times_out_while_other_clients_keep_working(mode) {
    let env = Env::start(mode, |_| {});
    let mut c = env.proxy.conn();
    assert!(get(&mut c, b"kline:000001:1m").unwrap().is_some());
    let mut other = env.proxy.conn();
    let _: () = redis::cmd("SET")
        .arg("plain")
        .arg("1")
        .query(&mut other)
        .unwrap();

    env.ta.set_fault(Fault::Hang);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = env.proxy.port;
    let bystander = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut o = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_connection()
                .unwrap();
            let mut worst = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let _: () = redis::cmd("SET").arg("plain").arg(n).query(&mut o).unwrap();
                let v: u64 = redis::cmd("GET").arg("plain").query(&mut o).unwrap();
                assert_eq!(v, n);
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (n, worst)
        })
    };
    for key in ["kline:000001:5m", "kline:600519:5m", "kline:000001:15m"] {
        let took = expect_unavailable(&mut c, key);
        assert!(
            took >= TIMEOUT - Duration::from_millis(50),
            "{key}: {took:?}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, worst) = bystander.join().unwrap();
    println!("during the hang: {n} SET+GET round trips, worst {worst:?}");
    assert!(n > 50, "only {n} round trips in ~1.5 s");
    // Far below the 500 ms the hanging fetches take (slack for a busy CI machine).
    assert!(
        worst < Duration::from_millis(250),
        "worst SET+GET {worst:?}"
    );

    env.ta.set_fault(Fault::None);
    assert!(get(&mut c, b"kline:000001:5m").unwrap().is_some());
});

for_each_path!(fn on_error_nil_answers_nil(mode) {
    let env = Env::start(mode, |t| t.on_error = TdOnError::Nil);
    let mut c = env.proxy.conn();
    env.ta.set_fault(Fault::Down);
    let t = Instant::now();
    assert_eq!(get(&mut c, b"kline:000001:1d").unwrap(), None);
    assert!(t.elapsed() < TIMEOUT + Duration::from_millis(300));
    env.ta.set_fault(Fault::Hang);
    let t = Instant::now();
    assert_eq!(get(&mut c, b"kline:600519:1d").unwrap(), None);
    assert!(t.elapsed() < TIMEOUT + Duration::from_millis(300));
    // The nil stood for a failure: not cached, the next GET fills.
    env.ta.set_fault(Fault::None);
    assert!(get(&mut c, b"kline:000001:1d").unwrap().is_some());
});

for_each_path!(fn open_circuit_fails_fast(mode) {
    let env = Env::start(mode, |t| {
        t.breaker_failures = 2;
        t.breaker_cooldown = Duration::from_secs(30);
    });
    let mut c = env.proxy.conn();
    env.ta.set_fault(Fault::Hang);
    expect_unavailable(&mut c, "kline:000001:5m");
    expect_unavailable(&mut c, "kline:000001:15m");
    let queries = env.ta.query_count();
    for key in ["kline:000001:1d", "kline:600519:1d", "kline:600519:1w"] {
        let t = Instant::now();
        let e = get(&mut c, key.as_bytes()).unwrap_err().to_string();
        let took = t.elapsed();
        assert!(e.contains("circuit breaker open"), "{e}");
        assert!(took < Duration::from_millis(100), "{key}: {took:?}");
    }
    assert_eq!(env.ta.query_count(), queries, "nothing sent while open");
});

for_each_path!(fn thousand_concurrent_cold_gets_one_query_one_set(mode) {
    let env = Env::start(mode, |_| {});
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut env.redis.conn())
        .unwrap();
    // Slow enough that all 1,000 are in flight together.
    env.ta.set_fault(Fault::Slow(Duration::from_millis(200)));
    let url = env.proxy.url();
    let replies: Vec<Option<Vec<u8>>> = env.rt.block_on(async move {
        let client = redis::Client::open(url).unwrap();
        // The point is one query, not latency: the client's default 500 ms
        // response timeout is too tight for 1,000 replies on a loaded 2-core
        // machine running the other query path's copy of this test too.
        let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        let mut conns = Vec::new();
        for _ in 0..50 {
            conns.push(client.get_multiplexed_async_connection_with_config(&cfg).await.unwrap());
        }
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|conn| {
                tokio::spawn(async move {
                    let reqs = (0..20).map(|_| {
                        let mut conn = conn.clone();
                        async move {
                            redis::cmd("GET")
                                .arg("kline:000001:1d")
                                .query_async::<Option<Vec<u8>>>(&mut conn)
                                .await
                                .unwrap()
                        }
                    });
                    futures::future::join_all(reqs).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.extend(t.await.unwrap());
        }
        out
    });
    assert_eq!(replies.len(), 1000);
    let first = replies[0].clone().expect("filled");
    assert!(replies.iter().all(|r| r.as_deref() == Some(&first[..])));
    assert_eq!(parse(&first), expected_1d("000001"));
    assert_eq!(env.ta.query_count(), 1, "one TDengine query");
    assert_eq!(cmd_calls(&env.redis, "set"), 1, "one SET on Redis");
});

for_each_path!(fn empty_result_is_nil_and_not_written(mode) {
    let env = Env::start(mode, |_| {});
    let mut c = env.proxy.conn();
    assert_eq!(get(&mut c, b"kline:NOSUCH:1d").unwrap(), None);
    assert_eq!(env.ta.query_count(), 1);
    let mut r = env.redis.conn();
    let exists: i64 = redis::cmd("EXISTS")
        .arg("kline:NOSUCH:1d")
        .query(&mut r)
        .unwrap();
    assert_eq!(exists, 0);
    assert_eq!(cmd_calls(&env.redis, "set"), 0);
});

for_each_path!(fn mget_fills_routed_nil_keys(mode) {
    let env = Env::start(mode, |_| {});
    let mut r = env.redis.conn();
    let _: () = redis::cmd("SET")
        .arg("plainkey")
        .arg("p")
        .query(&mut r)
        .unwrap();
    let mut c = env.proxy.conn();
    let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
        .arg("kline:000001:1d")
        .arg("kline:600519:1d")
        .arg("plainkey")
        .arg("kline:NOSUCH:1d")
        .arg("missing")
        .query(&mut c)
        .unwrap();
    assert_eq!(vals.len(), 5);
    assert_eq!(parse(vals[0].as_ref().unwrap()), expected_1d("000001"));
    assert_eq!(parse(vals[1].as_ref().unwrap()), expected_1d("600519"));
    assert_eq!(vals[2].as_deref(), Some(&b"p"[..]));
    assert_eq!(vals[3], None);
    assert_eq!(vals[4], None);
    assert_eq!(env.ta.query_count(), 3);
    for k in ["kline:000001:1d", "kline:600519:1d"] {
        let pttl: i64 = redis::cmd("PTTL").arg(k).query(&mut r).unwrap();
        assert!((14 * 60_000..=15 * 60_000).contains(&pttl), "{k}: {pttl}");
    }
});

for_each_path!(
/// A cold fill over `wss` through nearcache: Redis miss, TLS to the stand-in
/// (through the relay, certificate verified), write-back with the route's TTL.
fn cold_wss_fill_through_nearcache(mode) {
    let env = Env::start_with(mode, true, |_| {});
    assert!(env.ta.dsn().starts_with("taos+wss://"));
    let mut c = env.proxy.conn();
    let v = get(&mut c, b"kline:000001:1d").unwrap().expect("filled");
    assert_eq!(parse(&v), expected_1d("000001"), "{mode}");
    assert_eq!(env.ta.query_paths(), [mode.path()], "{mode}");
    let mut r = env.redis.conn();
    let pttl: i64 = redis::cmd("PTTL")
        .arg("kline:000001:1d")
        .query(&mut r)
        .unwrap();
    assert!((14 * 60_000..=15 * 60_000).contains(&pttl), "{mode}: PTTL {pttl}");
    // TDengine down over TLS is the same error reply as over ws.
    env.ta.set_fault(Fault::Down);
    expect_unavailable(&mut c, "kline:600519:1d");
});

/// Cold 500-row fills through nearcache one at a time, alternating between a
/// plain `ws` and a `wss` stand-in (both with stock delayed ACKs, so both go
/// through the relay), so that machine noise hits both alike; returns the
/// sorted samples (plain, TLS).
fn cold_fills(mode: Mode, rounds: usize) -> (Vec<Duration>, Vec<Duration>) {
    let plain = Env::start(mode, |_| {});
    let tls = Env::start_with(mode, true, |_| {});
    let mut out = (Vec::new(), Vec::new());
    for env in [&plain, &tls] {
        // Warm the connection pool.
        assert!(get(&mut env.proxy.conn(), b"kline:000001:1w")
            .unwrap()
            .is_some());
    }
    let mut conns = [
        (plain.proxy.conn(), plain.redis.conn()),
        (tls.proxy.conn(), tls.redis.conn()),
    ];
    for i in 0..rounds {
        let key = if i % 2 == 0 {
            "kline:000001:1d"
        } else {
            "kline:600519:1d"
        };
        // Alternate which goes first.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let (c, r) = &mut conns[which];
            // Cold each time: gone from Redis, and (via the invalidation) from L1.
            let _: () = redis::cmd("DEL").arg(key).query(r).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let t = Instant::now();
            let v = get(c, key.as_bytes()).unwrap().expect("filled");
            let took = t.elapsed();
            assert!(v.len() > 10_000);
            if which == 0 {
                out.0.push(took);
            } else {
                out.1.push(took);
            }
        }
    }
    assert_eq!(
        plain.ta.query_count(),
        rounds + 1,
        "every plain GET was a cold fill"
    );
    assert_eq!(
        tls.ta.query_count(),
        rounds + 1,
        "every TLS GET was a cold fill"
    );
    out.0.sort();
    out.1.sort();
    out
}

fn summary(s: &[Duration]) -> String {
    format!(
        "min {:?}, p50 {:?}, p90 {:?}, max {:?}",
        s[0],
        s[s.len() / 2],
        s[s.len() * 9 / 10],
        s[s.len() - 1]
    )
}

for_each_path!(
/// Cold fills of 500 rows through nearcache (Redis miss → TDengine → SET →
/// reply), over `ws` and over `wss`, against servers with default delayed
/// ACKs. Without the relay each took > 130 ms (several request frames ×
/// ~40 ms); TLS costs about what the handshake-free record layer costs.
fn cold_fill_latency_through_nearcache(mode) {
    let (plain, tls) = cold_fills(mode, 50);
    println!(
        "cold 500-row fill through nearcache, {mode}, stock (delayed-ACK) server, {} runs each:\n  ws:  {}\n  wss: {}\n  p50 wss - ws: {:+.2} ms",
        plain.len(),
        summary(&plain),
        summary(&tls),
        tls[tls.len() / 2].as_secs_f64() * 1e3 - plain[plain.len() / 2].as_secs_f64() * 1e3,
    );
    // The stall costs >= 40 ms per request frame; even a debug build on a
    // busy machine is well below that without it.
    for (label, s) in [("ws", &plain), ("wss", &tls)] {
        let p50 = s[s.len() / 2];
        assert!(p50 < Duration::from_millis(60), "{mode}, {label}: p50 {p50:?}");
    }
});

for_each_path!(
/// `fill_mget_elements` on its own (what `Session::mget` calls):
/// a real upstream connection and the stand-in, RESP2 and RESP3.
fn fill_mget_elements_fills_nil_elements_of_routed_keys(mode) {
    use bytes::Bytes;
    use nearcache::protocol;
    use nearcache::tdengine::{fill, Tdengine};
    use nearcache::upstream::{Connector, Upstream};

    let redis = RedisServer::start();
    let rt = runtime();
    let ta = rt.block_on(TaosAdapter::start_without_quickack(mode));
    ta.add_symbol("000001");
    ta.add_symbol("600519");
    let mut r = redis.conn();
    let _: () = redis::cmd("SET")
        .arg("plainkey")
        .arg("p")
        .query(&mut r)
        .unwrap();
    let cfg = support::test_config(&redis.url());
    let up = rt.block_on(async { Upstream::start(Connector::new(cfg.upstream.clone()).unwrap()) });
    let td = rt.block_on(async { Tdengine::new(taosadapter::kline_config(ta.dsn(), TIMEOUT)).unwrap() });
    let keys: Vec<Bytes> = [
        "kline:000001:1d",
        "kline:600519:1d",
        "plainkey",
        "kline:NOSUCH:1d",
        "missing",
        "kline:0';DROP TABLE kline_1d;--:1d",
    ]
    .map(|k| Bytes::from(k.as_bytes()))
    .to_vec();
    for proto in [2u8, 3] {
        let _: () = redis::cmd("DEL")
            .arg("kline:000001:1d")
            .arg("kline:600519:1d")
            .query(&mut r)
            .unwrap();
        ta.clear_log();
        let out = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(5);
            let conn = loop {
                match up.pool(proto).conn(0) {
                    Ok(c) => break c,
                    Err(e) => assert!(Instant::now() < deadline, "upstream: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let mut mget = vec![Bytes::from_static(b"MGET")];
            mget.extend(keys.iter().cloned());
            let reply = conn
                .send(protocol::command(mget))
                .await
                .await
                .unwrap()
                .unwrap();
            let elements = protocol::split_array(&reply.bytes).expect("array");
            let target = fill::Target::Conn(conn);
            fill::fill_mget_elements(&td, &target, &keys, elements, proto, &[]).await
        });
        let nil = protocol::nil(proto == 3);
        assert_eq!(out.len(), 6);
        let bulk_json = |b: &Bytes| {
            let body = &b[b.iter().position(|&c| c == b'\n').unwrap() + 1..b.len() - 2];
            parse(body)
        };
        assert_eq!(bulk_json(&out[0].0), expected_1d("000001"), "proto {proto}");
        assert_eq!(out[0].1, Some(Duration::from_secs(900)));
        assert_eq!(bulk_json(&out[1].0), expected_1d("600519"));
        assert_eq!(out[1].1, Some(Duration::from_secs(900)));
        assert_eq!(out[2], (Bytes::from_static(b"$1\r\np\r\n"), None));
        assert_eq!(out[3], (nil.clone(), Some(Duration::ZERO)), "empty result");
        assert_eq!(out[4], (nil.clone(), None), "no route: untouched");
        assert_eq!(out[5], (nil.clone(), Some(Duration::ZERO)), "invalid key");
        assert_eq!(ta.query_count(), 3, "{:?}", ta.sql_log());
        for k in ["kline:000001:1d", "kline:600519:1d"] {
            let pttl: i64 = redis::cmd("PTTL").arg(k).query(&mut r).unwrap();
            assert!((14 * 60_000..=15 * 60_000).contains(&pttl), "{k}: {pttl}");
        }
    }
    up.stop();
    drop(td);
});
