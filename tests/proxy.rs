//! The transparent proxy against a real redis-server: protocol versions,
//! pipelining, concurrency, large values, inline and malformed input, pinned
//! modes, and upstream faults.

mod support;

use std::time::{Duration, Instant};

use redis::Commands;
use support::*;

#[test]
fn strings_pipeline_and_concurrency() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut c = proxy.conn();
    let _: () = c.set("k", "v").unwrap();
    let v: String = c.get("k").unwrap();
    assert_eq!(v, "v");
    let n: i64 = c.incr("n", 5).unwrap();
    assert_eq!(n, 5);

    // 10,000 commands in one pipeline, replies in order.
    let mut p = redis::pipe();
    for i in 0..10_000 {
        p.cmd("INCR").arg("counter");
        if i % 1000 == 0 {
            p.cmd("ECHO").arg(i);
        }
    }
    let replies: Vec<redis::Value> = p.query(&mut c).unwrap();
    assert_eq!(replies.len(), 10_010);
    let mut expect = 0;
    for r in &replies {
        if let redis::Value::Int(v) = r {
            expect += 1;
            assert_eq!(*v, expect);
        }
    }
    assert_eq!(expect, 10_000);

    // 200 concurrent clients, each with its own keys.
    let threads: Vec<_> = (0..200)
        .map(|t| {
            let url = proxy.url();
            std::thread::spawn(move || {
                let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
                for i in 0..20 {
                    let key = format!("c{t}:{i}");
                    let _: () = c.set(&key, i).unwrap();
                    let got: i64 = c.get(&key).unwrap();
                    assert_eq!(got, i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let direct: i64 = redis.conn().get("c199:19").unwrap();
    assert_eq!(direct, 19);
}

#[test]
fn large_binary_values() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut c = proxy.conn();
    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    let _: () = c.set(b"bin\x00key\r\n", &big).unwrap();
    let got: Vec<u8> = c.get(b"bin\x00key\r\n").unwrap();
    assert!(got == big, "10 MB binary value must round-trip intact");
}

#[test]
fn resp3_clients_get_resp3_and_resp2_clients_resp2() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut c2 = proxy.conn();
    let _: () = c2.hset("h", "f", "v").unwrap();
    // RESP2: HGETALL is a flat array.
    let raw2 = raw_until(proxy.port, b"HGETALL h\r\n", |o| {
        nearcache::protocol::frame_len(o).is_some()
    });
    assert_eq!(raw2, b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n");
    // RESP3: a map, on the same proxy, whatever the other clients speak.
    let raw3 = raw_until(proxy.port, b"HELLO 3\r\nHGETALL h\r\n", |o| {
        o.ends_with(b"$1\r\nv\r\n")
    });
    let text = String::from_utf8_lossy(&raw3);
    assert!(text.starts_with('%'), "HELLO 3 replies with a map: {text}");
    assert!(text.ends_with("%1\r\n$1\r\nf\r\n$1\r\nv\r\n"), "{text}");
    // And with the redis crate in RESP3 mode.
    let mut c3 = redis::Client::open(proxy.url_resp3())
        .unwrap()
        .get_connection()
        .unwrap();
    let m: std::collections::HashMap<String, String> = c3.hgetall("h").unwrap();
    assert_eq!(m.get("f").map(String::as_str), Some("v"));
}

#[test]
fn inline_commands_and_redis_cli() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let out = raw_until(proxy.port, b"PING\r\nSET a \"x y\"\r\nGET a\r\n", |o| {
        o.len() >= 21
    });
    assert_eq!(out, b"+PONG\r\n+OK\r\n$3\r\nx y\r\n");
    assert_eq!(redis_cli(proxy.port, &["SET", "cli", "hello"]).trim(), "OK");
    assert_eq!(redis_cli(proxy.port, &["GET", "cli"]).trim(), "hello");
    assert_eq!(redis_cli(proxy.port, &["DBSIZE"]).trim(), "2");
}

#[test]
fn malformed_input_gets_redis_errors_and_others_are_unaffected() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut bystander = proxy.conn();
    let _: () = bystander.set("safe", "1").unwrap();
    let cases: &[(&[u8], &str)] = &[
        (
            b"*1\r\n$999999999999\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*99999999999\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n:12\r\n",
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            b"GET \"open\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ];
    for (input, expect) in cases {
        let (out, closed) = raw_exchange(proxy.port, input, Duration::from_secs(2));
        assert_eq!(
            String::from_utf8_lossy(&out),
            *expect,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
        assert!(closed, "broken framing closes the connection");
    }
    // Wrong argument counts are Redis' own errors and keep the connection:
    // it answers what follows, and then another command.
    let mut c = RawClient::connect(proxy.port);
    std::io::Write::write_all(&mut c.s, b"GET\r\nPING\r\n").unwrap();
    let out = [c.reply(), c.reply()].concat();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "-ERR wrong number of arguments for 'get' command\r\n+PONG\r\n"
    );
    assert_eq!(c.line("PING"), b"+PONG\r\n", "the connection stays open");
    let v: String = bystander.get("safe").unwrap();
    assert_eq!(v, "1");
}

#[test]
fn transactions_watch_select_and_blocking() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut c = proxy.conn();
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("t", 1)
        .incr("t", 1)
        .query(&mut c)
        .unwrap();
    assert_eq!((a, b), (1, 2));

    // WATCH: a change from another client aborts EXEC.
    let mut other = proxy.conn();
    let _: () = redis::cmd("WATCH").arg("w").query(&mut c).unwrap();
    let _: () = other.set("w", "changed").unwrap();
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let _: () = redis::cmd("SET")
        .arg("w")
        .arg("mine")
        .query(&mut c)
        .unwrap();
    let r: redis::Value = redis::cmd("EXEC").query(&mut c).unwrap();
    assert_eq!(
        r,
        redis::Value::Nil,
        "EXEC aborts after a watched key changed"
    );
    let w: String = c.get("w").unwrap();
    assert_eq!(w, "changed");

    // SELECT another db, then back.
    let _: () = redis::cmd("SELECT").arg(3).query(&mut c).unwrap();
    let _: () = c.set("in3", "x").unwrap();
    let _: () = redis::cmd("SELECT").arg(0).query(&mut c).unwrap();
    let none: Option<String> = c.get("in3").unwrap();
    assert_eq!(none, None);
    let mut d = redis.conn();
    let _: () = redis::cmd("SELECT").arg(3).query(&mut d).unwrap();
    let there: String = d.get("in3").unwrap();
    assert_eq!(there, "x");

    // Blocking pop served when another client pushes, once it is blocked on Redis.
    let popper = std::thread::spawn(move || {
        let started = Instant::now();
        let got: (String, String) = c.blpop("q", 5.0).unwrap();
        (got, started.elapsed(), c)
    });
    wait_until(
        "the BLPOP blocked on Redis (INFO clients blocked_clients)",
        Duration::from_secs(3),
        || info_field(&redis, "clients", "blocked_clients") == "1",
    );
    let _: () = proxy.conn().rpush("q", "job").unwrap();
    let (got, took, mut c) = popper.join().unwrap();
    assert_eq!(got, ("q".to_string(), "job".to_string()));
    assert!(took < Duration::from_secs(3));
    // Back on the shared connection afterwards.
    let _: () = c.set("after", "1").unwrap();
    let a: String = c.get("after").unwrap();
    assert_eq!(a, "1");
}

#[test]
fn pubsub_passes_through() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut sub_conn = proxy.conn();
    let mut pubsub = sub_conn.as_pubsub();
    pubsub.subscribe("news").unwrap();
    pubsub.psubscribe("ind.*").unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut publisher = proxy.conn();
    let n: i64 = publisher.publish("news", "hello").unwrap();
    assert_eq!(n, 1);
    let _: i64 = publisher.publish("ind.macd", "done").unwrap();
    let m1 = pubsub.get_message().unwrap();
    assert_eq!(m1.get_channel_name(), "news");
    assert_eq!(m1.get_payload::<String>().unwrap(), "hello");
    let m2 = pubsub.get_message().unwrap();
    assert_eq!(m2.get_channel_name(), "ind.macd");
    pubsub.unsubscribe("news").unwrap();
    pubsub.punsubscribe("ind.*").unwrap();
}

#[test]
fn client_id_and_kill_behave_as_on_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let mut victim = proxy.conn();
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut victim).unwrap();
    let id2: i64 = redis::cmd("CLIENT").arg("ID").query(&mut victim).unwrap();
    assert_eq!(id, id2, "a client keeps its id");
    let mut killer = proxy.conn();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut killer)
        .unwrap();
    assert_eq!(killed, 1);
    // nearcache closes the victim's socket, then forgets the client.
    wait_until(
        "the killed client left CLIENT LIST",
        Duration::from_secs(5),
        || {
            redis::cmd("CLIENT")
                .arg("LIST")
                .arg("ID")
                .arg(id)
                .query::<String>(&mut killer)
                .unwrap()
                .is_empty()
        },
    );
    let r: redis::RedisResult<String> = redis::cmd("PING").query(&mut victim);
    assert!(r.is_err(), "a killed client's connection is closed");
    let ok: String = redis::cmd("PING").query(&mut killer).unwrap();
    assert_eq!(ok, "PONG");
}

#[test]
fn upstream_down_at_start_then_recovers() {
    let port = free_port();
    let proxy = Proxy::with_config_no_wait(test_config(&format!("redis://127.0.0.1:{port}")));
    let mut c = proxy.conn();
    let started = Instant::now();
    let err = redis::cmd("GET")
        .arg("x")
        .query::<Option<String>>(&mut c)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500), "fails fast");
    assert!(err.to_string().contains("upstream unavailable"), "{err}");
    // Bring Redis up on that port; traffic recovers within 2 s.
    let mut redis = redis_on(port);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(()) = c.set::<_, _, ()>("x", "1") {
            break;
        }
        assert!(Instant::now() < deadline, "did not recover within 2 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    redis.kill().unwrap();
    redis.wait().unwrap();
}

fn redis_on(port: u16) -> std::process::Child {
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, Duration::from_secs(5));
    child
}

/// Write integrity across an upstream crash: 8 clients INCR their own
/// counters through nearcache while Redis (with every write fsynced to its
/// AOF) is killed and restarted. A failed INCR may or may not have run, but
/// nothing is ever retried: each final counter is its acknowledged
/// increments plus at most the ones that got an error. Redis is killed once
/// every worker is getting INCRs acknowledged, and the test ends once every
/// worker has had more acknowledged since Redis came back; some INCRs must
/// have been lost in flight.
#[test]
fn upstream_killed_mid_load_fails_in_flight_and_never_retries() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let proxy = Proxy::start(&redis);
    let stop = Arc::new(AtomicBool::new(false));
    // Each worker's acknowledged INCRs so far.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..8).map(|_| AtomicU64::new(0)).collect());
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let url = proxy.url();
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let client = redis::Client::open(url).unwrap();
                let mut c = None;
                // Failed INCRs, and those of them lost in flight (their client is closed).
                let (mut ok, mut failed, mut lost) = (0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let conn = match &mut c {
                        Some(conn) => conn,
                        None => match client.get_connection() {
                            Ok(conn) => c.insert(conn),
                            Err(_) => {
                                std::thread::sleep(Duration::from_millis(5));
                                continue;
                            }
                        },
                    };
                    match conn.incr::<_, _, i64>(format!("w{w}"), 1) {
                        Ok(_) => {
                            ok += 1;
                            acked[w].store(ok, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert!(!e.to_string().is_empty());
                            failed += 1;
                            // nearcache closes a client whose request was lost with its
                            // connection (CLIENT ID, answered by nearcache itself,
                            // tells); a new one carries on.
                            if redis::cmd("CLIENT").arg("ID").query::<i64>(conn).is_err() {
                                lost += 1;
                            }
                            c = None;
                        }
                    }
                }
                (w, ok, failed, lost)
            })
        })
        .collect();
    let acked_at_least = |min: &[u64]| (0..8).all(|w| acked[w].load(Ordering::Relaxed) >= min[w]);
    // Redis crashes under load: every worker is getting INCRs acknowledged.
    wait_until(
        "every worker had 50 INCRs acknowledged",
        Duration::from_secs(10),
        || acked_at_least(&[50; 8]),
    );
    redis.restart();
    let recovered: Vec<u64> = acked
        .iter()
        .map(|a| a.load(Ordering::Relaxed) + 50)
        .collect();
    wait_until(
        "every worker had 50 more INCRs acknowledged after the restart",
        Duration::from_secs(10),
        || acked_at_least(&recovered),
    );
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = workers.into_iter().map(|t| t.join().unwrap()).collect();
    let mut direct = redis.conn();
    let (mut total_failed, mut total_lost) = (0, 0);
    for (w, ok, failed, lost) in results {
        eprintln!("worker {w}: {ok} ok, {failed} failed ({lost} lost in flight)");
        total_failed += failed;
        total_lost += lost;
        let after: i64 = direct.get(format!("w{w}")).unwrap();
        assert!(
            after as u64 >= ok && after as u64 <= ok + failed,
            "worker {w}: counter {after}, {ok} acknowledged, {failed} failed"
        );
        assert!(after > 0, "worker {w} made progress");
    }
    assert!(total_failed > 0, "the crash hit requests in flight");
    assert!(
        total_lost > 0,
        "the crash hit requests in flight (none lost with the upstream connection)"
    );
}

/// A hung upstream (SIGSTOP: its sockets stay open, nothing answers) is
/// told from a slow one by a health check on a fresh connection: requests
/// fail after `command_timeout` plus the check's timeout (`connect_timeout`),
/// not after the stall. (A slow but live upstream is waited for: see
/// tests/reliability.rs.)
#[test]
fn a_hung_upstream_gets_prompt_errors_on_shared_and_pinned_connections() {
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.upstream.command_timeout = Duration::from_millis(500);
    cfg.upstream.connect_timeout = Duration::from_millis(500);
    let proxy = Proxy::with_config(cfg);
    let mut c = proxy.conn();
    let _: () = c.set("x", "1").unwrap();
    let mut t = proxy.conn();
    let _: () = redis::cmd("MULTI").query(&mut t).unwrap();
    let _: () = redis::cmd("INCR").arg("n").query(&mut t).unwrap();

    // Shared connection: the request fails after the timeouts, not after the stall.
    redis.signal("STOP");
    let started = Instant::now();
    let err = c.incr::<_, _, i64>("n", 1).unwrap_err();
    let took = started.elapsed();
    assert!(err.to_string().contains("no reply within"), "{err}");
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    // The request may still run on Redis: nothing the client sends later may
    // overtake it on another connection, so its connection is closed.
    let r: redis::RedisResult<String> = c.get("x");
    assert!(
        r.is_err(),
        "the client whose request was abandoned is closed"
    );

    // Pinned connection (a transaction): the same deadline applies.
    let started = Instant::now();
    let err = redis::cmd("EXEC")
        .query::<redis::Value>(&mut t)
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains("no reply within")
            || err.is_connection_dropped()
            || err.is_io_error(),
        "{err}"
    );

    redis.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match proxy.conn().get::<_, String>("x") {
            Ok(v) => {
                assert_eq!(v, "1", "recovered after the stall");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "not recovered: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
