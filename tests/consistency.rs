//! L1 never serves a value older than Redis allows: a client's pipelined
//! read after its own write, a key past its expiry in Redis, a feed that
//! stopped seeing writes, and a different server behind the same address.
//! Real redis-servers; where timing matters, a relay between nearcache and
//! Redis lets the test decide when a request or a reply gets through.

mod support;

use std::time::{Duration, Instant};

use nearcache::config::InvalidationMode;
use redis::Commands;
use support::relay::Relay;
use support::*;

fn client_id(c: &mut RawClient) -> u64 {
    let r = c.line("CLIENT ID");
    String::from_utf8_lossy(&r[1..r.len() - 2]).parse().unwrap()
}

/// A pipelined `SET k 2; GET k` returns 2 even while another client of the
/// pod fills k over another upstream connection: the relay holds the SET on
/// its way to Redis while the other client's read of k runs and returns the
/// old value; that read must not leave the old value in L1 for the writer's
/// GET to find.
#[test]
fn read_your_writes_under_pipelining() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port);
    let mut cfg = test_config(&relay.url());
    cfg.upstream.pool_size = 2;
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let _: () = redis.conn().set("quote:ryw", "1").unwrap();

    // A client's multiplexed connection is its id modulo the pool size: take
    // a writer and a reader that use different connections.
    let mut writer = RawClient::connect(proxy.port);
    let mut reader = RawClient::connect(proxy.port);
    while client_id(&mut reader) % 2 == client_id(&mut writer) % 2 {
        reader = RawClient::connect(proxy.port);
    }

    relay.hold_requests_from(b"SET\r\n$9\r\nquote:ryw\r\n$1\r\n2");
    writer.send(&[b"SET", b"quote:ryw", b"2"]);
    relay.wait_holding(Duration::from_secs(5));
    // The write has not reached Redis: the other client still reads the old
    // value, on its own connection.
    let gets = cmdstat(&redis, "get");
    assert_eq!(reader.line("GET quote:ryw"), b"$1\r\n1\r\n".to_vec());
    assert_eq!(cmdstat(&redis, "get"), gets + 1, "the read went to Redis");
    writer.send(&[b"GET", b"quote:ryw"]);
    relay.release();
    assert_eq!(writer.reply(), b"+OK\r\n".to_vec());
    assert_eq!(
        writer.reply(),
        b"$1\r\n2\r\n".to_vec(),
        "the writer's own pipelined read returned the value before its write"
    );
    // And afterwards everyone reads the new value.
    assert_eq!(reader.line("GET quote:ryw"), b"$1\r\n2\r\n".to_vec());
}

/// No read later than 50 ms after a key expired in Redis returns its value,
/// although Redis deletes expired keys late (lazily, or by sampling, which
/// with 200,000 long-lived volatile keys finds a given key late) and only the
/// deletion produces an invalidation.
#[test]
fn no_value_outlives_its_key_in_redis() {
    let redis = RedisServer::start();
    let mut direct = redis.conn();
    for chunk in 0..20 {
        let mut p = redis::pipe();
        for i in 0..10_000 {
            p.cmd("SET")
                .arg(format!("ind:long:{chunk}:{i}"))
                .arg("v")
                .arg("EX")
                .arg(3600)
                .ignore();
        }
        let _: () = p.query(&mut direct).unwrap();
    }
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    let mut c = proxy.conn();
    let mut late_reads = Vec::new();
    for trial in 0..10 {
        let key = format!("quote:short:{trial}");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("v")
            .arg("PX")
            .arg(300)
            .query(&mut direct)
            .unwrap();
        // The key expires in Redis no later than 300 ms after the SET returned.
        let expires = Instant::now() + Duration::from_millis(300);
        loop {
            let started = Instant::now();
            let v: Option<String> = c.get(&key).unwrap();
            if v.is_none() {
                break;
            }
            if started > expires + Duration::from_millis(50) {
                late_reads.push((trial, started - expires));
            }
            assert!(
                started < expires + Duration::from_secs(3),
                "still served 3 s after expiry"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(proxy.stat("hits") > 100, "the reads were L1 hits");
    assert!(
        late_reads.is_empty(),
        "values served after expiry: {late_reads:?}"
    );
}

/// Waits until L1 stops serving; returns how long it took.
fn until_not_serving(proxy: &Proxy, limit: Duration) -> Duration {
    let start = Instant::now();
    while proxy.stat("serving") == 1 {
        assert!(start.elapsed() < limit, "L1 still serving after {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// In keyspace mode, `CONFIG SET notify-keyspace-events ""` after start
/// silences the feed without closing it; the canary write notices within
/// two health intervals.
#[test]
fn canary_notices_keyspace_events_turned_off() {
    let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]);
    // Written before nearcache starts: the event of a later write could
    // rightly keep the first fill out of L1, and the read after it a miss.
    let _: () = redis.conn().set("quote:c", "1").unwrap();
    let mut cfg = test_config(&redis.url());
    cfg.cache.invalidation = InvalidationMode::Keyspace;
    cfg.cache.feed_health_interval = Duration::from_millis(300);
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let mut c = proxy.conn();
    let _: String = c.get("quote:c").unwrap();
    let _: String = c.get("quote:c").unwrap();
    assert!(proxy.stat("hits") >= 1);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .query(&mut redis.conn())
        .unwrap();
    let took = until_not_serving(
        &proxy,
        Duration::from_millis(600) + Duration::from_millis(400),
    );
    eprintln!("L1 off {took:?} after keyspace events were turned off");
    // Writes from elsewhere are no longer reported: nothing is served from L1.
    let _: () = redis.conn().set("quote:c", "2").unwrap();
    let v: String = c.get("quote:c").unwrap();
    assert_eq!(v, "2");
    assert_eq!(proxy.stat("serving"), 0, "forced keyspace mode stays off");
}

/// A feed whose connection stays open but delivers nothing (a middlebox that
/// drops traffic, a subscription lost on the server) is noticed within two
/// health intervals.
#[test]
fn canary_notices_a_feed_that_silently_stops() {
    for mode in [InvalidationMode::Tracking, InvalidationMode::Keyspace] {
        let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]);
        let relay = Relay::start(redis.port);
        let mut cfg = test_config(&relay.url());
        cfg.cache.invalidation = mode;
        cfg.cache.feed_health_interval = Duration::from_millis(300);
        let proxy = Proxy::with_config(cfg);
        proxy.wait_serving();
        relay.mute_replies_of(b"TRACKING");
        let took = until_not_serving(&proxy, Duration::from_millis(1000));
        eprintln!("{mode:?}: L1 off {took:?} after the feed went silent");
    }
}

/// The pool reconnects to another server behind the same address (a VIP or
/// DNS failover) while the feed still listens to the old one: the pool's new
/// run_id empties L1 at once, and the feed follows.
#[test]
fn a_different_server_behind_the_same_address_empties_l1() {
    let old = RedisServer::start();
    let new = RedisServer::start();
    // Written before nearcache starts: the write's invalidation arriving
    // during the first GET's fill would (rightly) keep it out of L1.
    let _: () = old.conn().set("ind:srv", "old").unwrap();
    let _: () = new.conn().set("ind:srv", "new").unwrap();
    let relay = Relay::start(old.port);
    let mut cfg = test_config(&relay.url());
    // Long enough that only the run_id check can explain what follows.
    cfg.cache.feed_health_interval = Duration::from_secs(30);
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let mut c = proxy.conn();
    let v: String = c.get("ind:srv").unwrap();
    assert_eq!(v, "old");
    let hits = proxy.stat("hits");
    let _: String = c.get("ind:srv").unwrap();
    assert_eq!(proxy.stat("hits"), hits + 1, "cached");

    relay.retarget(new.port);
    relay.cut_except(b"TRACKING");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Clients whose connection was cut reconnect.
        let v: Option<String> = proxy.conn().get("ind:srv").unwrap_or(None);
        if v.as_deref() == Some("new") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still serving the old server's value: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.wait_serving();
    let v: String = proxy.conn().get("ind:srv").unwrap();
    assert_eq!(v, "new");
}

/// After a client has seen a newer value of a key through one read command,
/// no other cached command of that key returns an older one, even while the
/// invalidation of the write between them is still on its way: the relay
/// holds the feed's notification of the write while the client reads the
/// key with a new command (a fill that sees the new value) and then with the
/// old one (cached before the write) — one after the other (the fill waits
/// for a feed barrier before it answers) and pipelined (the later read goes
/// upstream behind the fill).
#[test]
fn never_back_in_time_across_commands_of_one_key() {
    for mode in [InvalidationMode::Tracking, InvalidationMode::Keyspace] {
        let redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]);
        let relay = Relay::start(redis.port);
        let mut cfg = test_config(&relay.url());
        cfg.cache.invalidation = mode;
        // The canary must not end the feed while the test holds it.
        cfg.cache.feed_health_interval = Duration::from_secs(10);
        let proxy = Proxy::with_config(cfg);
        proxy.wait_serving();
        let mut direct = redis.conn();
        for (key, pipelined) in [("ind:seq", false), ("ind:pip", true)] {
            let _: () = direct.hset(key, "f", "old").unwrap();
            let mut c = RawClient::connect(proxy.port);
            let hget = format!("HGET {key} f");
            // Until the HSET's own invalidation has passed, a fill may race with it.
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let hits = proxy.stat("hits");
                assert_eq!(c.line(&hget), b"$3\r\nold\r\n".to_vec());
                if proxy.stat("hits") == hits + 1 {
                    break;
                }
                assert!(Instant::now() < deadline, "HGET never cached");
            }

            let held = match mode {
                InvalidationMode::Keyspace => format!("__keyspace@0__:{key}"),
                _ => format!("invalidate\r\n*1\r\n${}\r\n{key}", key.len()),
            };
            relay.hold_replies_from(held.as_bytes());
            let _: () = direct.hset(key, "f", "new").unwrap();
            relay.wait_holding(Duration::from_secs(5));
            // The write's invalidation is held back. A new command sees the new value...
            let barriers = proxy.stat("barriers");
            c.send(&[b"HGETALL", key.as_bytes()]);
            if pipelined {
                c.send(&[b"HGET", key.as_bytes(), b"f"]);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut early = None;
            while proxy.stat("barriers") == barriers && early.is_none() {
                assert!(
                    Instant::now() < deadline,
                    "{mode:?}: neither a barrier nor a reply"
                );
                early = c.try_reply(Duration::from_millis(10));
            }
            // A reply that came back while the invalidation is still held must
            // not be followed by an older one: ask the old command before the
            // relay lets the invalidation through.
            let all = match early {
                Some(reply) => reply,
                None => {
                    relay.release();
                    c.reply()
                }
            };
            assert_eq!(all, b"*2\r\n$1\r\nf\r\n$3\r\nnew\r\n".to_vec(), "{mode:?}");
            // ...and the old command, asked after it, must not go back to the old one.
            if !pipelined {
                c.send(&[b"HGET", key.as_bytes(), b"f"]);
            }
            let old_command = c.reply();
            relay.release();
            assert_eq!(
                old_command,
                b"$3\r\nnew\r\n".to_vec(),
                "{mode:?}: back in time (pipelined: {pipelined})"
            );
        }
    }
}
