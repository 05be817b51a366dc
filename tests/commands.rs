//! Differential test: every command family (the scripts of
//! `support/scripts.rs`), run against a redis-server directly and through
//! nearcache (once with the default cache policies, once with every key
//! cacheable), must produce the same RESP replies byte for byte, in RESP2 and
//! RESP3, over raw sockets, raw pipelines, the `redis` crate's sync API, its
//! pipelines and its async multiplexed API. Also connection-level features
//! compared with Redis one by one (ACL users, pub/sub pushes, MONITOR, RESET).

#[path = "support/scripts.rs"]
mod scripts;
mod support;

use std::time::{Duration, Instant};

use scripts::*;
use support::*;

/// A redis-server reached directly and the same kind of server behind nearcache.
struct Bench {
    targets: Targets,
    /// Kept alive for the bench's life.
    _servers: Vec<RedisServer>,
    _proxies: Vec<Proxy>,
}

fn cache_all_config(redis: &RedisServer) -> nearcache::config::Config {
    let mut c = test_config(&redis.url());
    c.cache.policies.clear();
    c.cache.default_ttl = Some(Duration::from_secs(60));
    c
}

impl Bench {
    fn new() -> Bench {
        let reference = RedisServer::start();
        let b = RedisServer::start();
        let pb = Proxy::start(&b);
        let c = RedisServer::start();
        let pc = Proxy::with_config(cache_all_config(&c));
        pc.wait_serving();
        Bench {
            targets: Targets {
                list: vec![
                    ("redis", reference.port),
                    ("nearcache", pb.port),
                    ("nearcache-cache-all", pc.port),
                ],
                cluster: false,
            },
            _servers: vec![reference, b, c],
            _proxies: vec![pb, pc],
        }
    }
}

#[test]
fn raw_resp_replies_are_identical_in_resp2_and_resp3() {
    let started = Instant::now();
    let bench = Bench::new();
    let mut all = Vec::new();
    for script in scripts().iter() {
        for proto in [2, 3] {
            all.extend(run_raw(&bench.targets, script, proto, false));
            if pipelinable(script) {
                all.extend(run_raw(&bench.targets, script, proto, true));
            }
        }
    }
    eprintln!("raw differential: {:?}", started.elapsed());
    report(all);
}

#[test]
fn redis_crate_sync_pipeline_and_async_see_identical_values() {
    let started = Instant::now();
    let bench = Bench::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut all = Vec::new();
    for script in scripts().iter().filter(|s| s.typed) {
        for proto in [2, 3] {
            all.extend(run_sync(&bench.targets, script, proto));
            if pipelinable(script) {
                all.extend(run_pipe(&bench.targets, script, proto));
            }
            // WATCH across two multiplexed connections is not meaningful: skip scripts with @other.
            if pipelinable(script) {
                all.extend(rt.block_on(run_async(&bench.targets, script, proto)));
            }
        }
    }
    eprintln!("typed differential: {:?}", started.elapsed());
    report(all);
}

// --- Known nearcache bugs (ignored so the suite stays green) ---------------------------

/// Sends `lines` one at a time on one raw connection; returns each reply.
fn exchange(port: u16, lines: &[&str]) -> Vec<Vec<u8>> {
    let mut r = Raw::connect(port, "exchange");
    lines
        .iter()
        .map(|l| {
            r.send(&tokenize(l));
            r.try_read(Duration::from_secs(3))
                .map(|f| f.0)
                .unwrap_or_else(|| b"<no reply in 3 s>".to_vec())
        })
        .collect()
}

#[test]
fn select_back_to_default_db_then_pooled_commands() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let lines = ["PING", "SELECT 2", "PING", "SELECT 0", "PING", "PING"];
    let expected = exchange(redis.port, &lines);
    for _ in 0..3 {
        let got = exchange(proxy.port, &lines);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(show(&got[i]), show(&expected[i]), "{l}");
        }
    }
    // The full differential script.
    let bench = Bench::new();
    let script = scripts().into_iter().find(|s| s.name == "select").unwrap();
    let mut all = Vec::new();
    for proto in [2, 3] {
        all.extend(run_raw(&bench.targets, &script, proto, false));
        all.extend(run_raw(&bench.targets, &script, proto, true));
    }
    report(all);
}

#[test]
fn reset_after_monitor() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut mon = Raw::connect(proxy.port, "monitor");
    assert_eq!(mon.cmd("MONITOR"), b"+OK\r\n");
    // MONITOR output (nearcache's own canary writes included) may come first.
    let mut reply = mon.cmd("RESET");
    while reply.first() == Some(&b'+') && reply.get(1).is_some_and(|c| c.is_ascii_digit()) {
        reply = mon.read().0;
    }
    assert_eq!(show(&reply), "+RESET\\r\\n");
    assert_eq!(mon.cmd("PING"), b"+PONG\r\n");
}

#[test]
fn resp3_set_containing_maps() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let lines = ["HELLO 3", "COMMAND INFO get", "COMMAND DOCS get", "PING"];
    let expected = exchange(redis.port, &lines);
    let got = exchange(proxy.port, &lines);
    for i in 1..lines.len() {
        assert_eq!(show(&got[i]), show(&expected[i]), "{}", lines[i]);
    }
}

// --- Connection-level features ----------------------------------------------------------

#[test]
fn acl_user_auth_runs_commands_as_that_user() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut admin = Raw::connect(redis.port, "admin");
    assert_eq!(admin.cmd("ACL SETUSER app on >secret ~* +@all"), b"+OK\r\n");
    assert_eq!(
        admin.cmd("ACL SETUSER ro on >pw ~ro:* +get +acl|whoami"),
        b"+OK\r\n"
    );
    let lines = [
        "ACL WHOAMI",
        "AUTH app wrong",
        "AUTH app secret",
        "ACL WHOAMI",
        "SET ak v",
        "GET ak",
        "AUTH ro pw",
        "ACL WHOAMI",
        "GET ro:x",
        "GET ak",
        "SET ro:x v",
        "HELLO 3 AUTH app secret",
        "ACL WHOAMI",
        "GET ak",
    ];
    let expected = exchange(redis.port, &lines);
    let got = exchange(proxy.port, &lines);
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("HELLO") {
            assert_eq!(got[i][0], b'%', "{l}: {}", show(&got[i]));
            continue;
        }
        assert_eq!(show(&got[i]), show(&expected[i]), "{l}");
    }
    assert_eq!(show(&got[3]), "$3\\r\\napp\\r\\n");
    // The redis crate with credentials in the URL.
    let url = format!("redis://app:secret@127.0.0.1:{}", proxy.port);
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let who: String = redis::cmd("ACL").arg("WHOAMI").query(&mut c).unwrap();
    assert_eq!(who, "app");
}

#[test]
fn resp3_pubsub_pushes_reach_only_their_subscriber() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let run = |port: u16| -> Vec<Vec<u8>> {
        let mut s1 = Raw::connect(port, "s1");
        let mut s2 = Raw::connect(port, "s2");
        let mut publisher = Raw::connect(port, "pub");
        let mut out = Vec::new();
        for s in [&mut s1, &mut s2] {
            assert_eq!(s.cmd("HELLO 3")[0], b'%');
        }
        out.push(s1.cmd("SUBSCRIBE ch1"));
        out.push(s2.cmd("SUBSCRIBE ch2"));
        out.push(s2.cmd("PSUBSCRIBE ch*"));
        out.push(s1.cmd("SET k v"));
        out.push(s1.cmd("GET k"));
        out.push(publisher.cmd("PUBLISH ch1 m1"));
        out.push(publisher.cmd("PUBLISH ch2 m2"));
        out.push(s1.read().0);
        out.push(s2.read().0);
        out.push(s2.read().0);
        out.push(s2.read().0);
        out.push(s1.cmd("PING"));
        out.push(s1.cmd("UNSUBSCRIBE ch1"));
        out.push(publisher.cmd("PUBLISH ch1 gone"));
        out.push(s1.cmd("PING"));
        out.push(s2.cmd("PUNSUBSCRIBE"));
        out.push(s2.cmd("UNSUBSCRIBE"));
        for s in [&mut s1, &mut s2] {
            if let Some((extra, _)) = s.try_read(Duration::from_millis(100)) {
                out.push(extra);
            }
        }
        out
    };
    let expected = run(redis.port);
    let got = run(proxy.port);
    let show_all = |v: &[Vec<u8>]| v.iter().map(|f| show(f)).collect::<Vec<_>>();
    assert_eq!(show_all(&got), show_all(&expected));
    // And the messages are pushes.
    assert!(
        got[7].starts_with(b">3\r\n$7\r\nmessage\r\n$3\r\nch1"),
        "{}",
        show(&got[7])
    );
}

#[test]
fn client_info_monitor_and_reset() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut c = Raw::connect(proxy.port, "c");
    assert_eq!(c.cmd("CLIENT SETNAME worker-7"), b"+OK\r\n");
    let info = String::from_utf8(c.cmd("CLIENT INFO")).unwrap();
    assert!(info.contains("name=worker-7"), "{info}");
    assert_eq!(c.cmd("CLIENT GETNAME"), b"$8\r\nworker-7\r\n");
    // MONITOR sees a command from another client.
    let mut mon = Raw::connect(proxy.port, "monitor");
    assert_eq!(mon.cmd("MONITOR"), b"+OK\r\n");
    let mut other = Raw::connect(proxy.port, "other");
    assert_eq!(other.cmd("SET monitored-key 42"), b"+OK\r\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (line, _) = mon
            .try_read(Duration::from_secs(5))
            .expect("MONITOR output");
        let line = String::from_utf8_lossy(&line).into_owned();
        assert!(line.starts_with('+'), "{line}");
        if line.contains("\"SET\" \"monitored-key\" \"42\"") {
            break;
        }
        assert!(Instant::now() < deadline, "MONITOR never showed the SET");
    }
    // RESET clears the name (RESET after MONITOR: see reset_after_monitor).
    assert_eq!(c.cmd("RESET"), b"+RESET\r\n");
    assert_eq!(c.cmd("CLIENT GETNAME"), b"$-1\r\n");
    assert_eq!(c.cmd("WAIT 0 0"), b":0\r\n");
}

#[test]
fn typed_clients_sync_async_and_pipeline() {
    use redis::{AsyncCommands, Commands};
    let redis = RedisServer::start();
    let proxy = Proxy::with_config(cache_all_config(&redis));
    proxy.wait_serving();
    for url in [proxy.url(), proxy.url_resp3()] {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut c = client.get_connection().unwrap();
        let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
        let _: () = c.set_ex("typed:s", "v", 100).unwrap();
        let v: Option<String> = c.get("typed:s").unwrap();
        assert_eq!(v.as_deref(), Some("v"));
        let _: () = c.hset_multiple("typed:h", &[("a", 1), ("b", 2)]).unwrap();
        let h: std::collections::BTreeMap<String, i64> = c.hgetall("typed:h").unwrap();
        assert_eq!(
            h.into_iter().collect::<Vec<_>>(),
            vec![("a".into(), 1), ("b".into(), 2)]
        );
        let _: () = c
            .zadd_multiple("typed:z", &[(1.5, "x"), (2.5, "y")])
            .unwrap();
        let z: Vec<(String, f64)> = c.zrange_withscores("typed:z", 0, -1).unwrap();
        assert_eq!(z, vec![("x".into(), 1.5), ("y".into(), 2.5)]);
        let score: Option<f64> = c.zscore("typed:z", "y").unwrap();
        assert_eq!(score, Some(2.5));
        let members: std::collections::BTreeSet<String> = {
            let _: () = c.sadd("typed:set", &["p", "q"]).unwrap();
            c.smembers("typed:set").unwrap()
        };
        assert_eq!(members.len(), 2);
        let none: Option<String> = c.get("typed:none").unwrap();
        assert_eq!(none, None);
        let popped: Option<(String, String)> = c.blpop("typed:nolist", 0.1).unwrap();
        assert_eq!(popped, None);
        // A pipeline and a transaction.
        let (a, b, l): (i64, i64, Vec<String>) = redis::pipe()
            .incr("typed:n", 1)
            .incr("typed:n", 2)
            .rpush("typed:l", &["1", "2"])
            .ignore()
            .lrange("typed:l", 0, -1)
            .query(&mut c)
            .unwrap();
        assert_eq!((a, b, l), (1, 3, vec!["1".to_string(), "2".to_string()]));
        let (x, y): (i64, i64) = redis::pipe()
            .atomic()
            .incr("typed:n", 1)
            .incr("typed:n", 1)
            .query(&mut c)
            .unwrap();
        assert_eq!((x, y), (4, 5));

        // Async multiplexed: many concurrent requests on one connection.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut a = client.get_multiplexed_async_connection().await.unwrap();
            let futs = (0..200).map(|i| {
                let mut a = a.clone();
                async move {
                    let k = format!("typed:async:{i}");
                    let _: () = a.set(&k, i).await.unwrap();
                    let got: i64 = a.get(&k).await.unwrap();
                    assert_eq!(got, i);
                    let again: i64 = a.get(&k).await.unwrap();
                    assert_eq!(again, i);
                }
            });
            futures::future::join_all(futs).await;
            let h: std::collections::HashMap<String, i64> = a.hgetall("typed:h").await.unwrap();
            assert_eq!(h.len(), 2);
            let err = a.incr::<_, _, i64>("typed:s", 1).await.unwrap_err();
            assert!(err.to_string().contains("not an integer"), "{err}");
            let n: i64 = a.incr("typed:n", 1).await.unwrap();
            assert_eq!(n, 6);
        });
    }
}
