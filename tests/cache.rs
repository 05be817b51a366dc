//! The near cache against real redis-servers: hits, every invalidation path,
//! feed failures, the fill/invalidation race, single flight, the memory bound,
//! a randomized staleness checker and the lock pattern.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nearcache::config::InvalidationMode;
use redis::Commands;
use support::*;

fn cached_proxy(redis: &RedisServer, mode: InvalidationMode) -> Proxy {
    let mut cfg = test_config(&redis.url());
    cfg.cache.invalidation = mode;
    let p = Proxy::with_config(cfg);
    p.wait_serving();
    p
}

/// Polls `read` until it returns `want`; returns how long that took.
fn time_until(want: &str, mut read: impl FnMut() -> Option<String>, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if read().as_deref() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "value {want:?} not seen within {limit:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Reads `key` through `c` until a read is an L1 hit, every read returning
/// `want`. (A fill racing with the invalidation of the write that set the
/// value is not stored, so this may take a read or two.)
fn until_cached(proxy: &Proxy, c: &mut redis::Connection, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let hits = proxy.stat("hits");
        assert_eq!(c.get::<_, String>(key).unwrap(), want);
        if proxy.stat("hits") > hits {
            return;
        }
        assert!(Instant::now() < deadline, "L1 never served {key}");
    }
}

#[test]
fn hits_are_served_from_l1_and_writes_through_the_proxy_are_read_back() {
    let redis = RedisServer::start();
    let proxy = cached_proxy(&redis, InvalidationMode::Auto);
    let mut c = proxy.conn();
    let mut other = proxy.conn();
    let _: () = c.set("quote:1", "a").unwrap();
    let before = cmdstat(&redis, "get");
    for _ in 0..5 {
        let v: String = c.get("quote:1").unwrap();
        assert_eq!(v, "a");
    }
    assert_eq!(cmdstat(&redis, "get") - before, 1, "one miss, then hits");
    assert!(proxy.stat("hits") >= 4);

    // Read your own writes, and so does every other client of this nearcache.
    let _: () = c.set("quote:1", "b").unwrap();
    let v: String = c.get("quote:1").unwrap();
    assert_eq!(v, "b");
    let v: String = other.get("quote:1").unwrap();
    assert_eq!(v, "b");

    // A write pipelined before a read of the same key is seen by that read,
    // even though the read could have been answered from L1 before the write ran.
    for (i, write) in [
        vec!["SET", "quote:1", "c"],
        vec!["APPEND", "quote:1", "d"],
        vec!["DEL", "quote:1"],
        vec!["MSET", "quote:1", "e", "quote:2", "f"],
        vec![
            "EVAL",
            "return redis.call('SET', KEYS[1], ARGV[1])",
            "1",
            "quote:1",
            "g",
        ],
        vec!["EVAL", "return redis.call('SET', 'quote:1', 'h')", "0"],
        vec!["RENAME", "quote:2", "quote:1"],
        vec!["EXPIRE", "quote:1", "0"],
    ]
    .iter()
    .enumerate()
    {
        let _: Option<String> = c.get("quote:1").unwrap(); // make sure L1 holds the old value
        let mut p = redis::pipe();
        let mut cmd = redis::cmd(write[0]);
        for a in &write[1..] {
            cmd.arg(*a);
        }
        p.add_command(cmd).ignore().cmd("GET").arg("quote:1");
        let (got,): (Option<String>,) = p.query(&mut c).unwrap();
        let direct: Option<String> = redis.conn().get("quote:1").unwrap();
        assert_eq!(got, direct, "case {i}: {write:?}");
        let _: () = c.set("quote:2", "f").unwrap();
    }

    // Transactions: writes queued in MULTI take effect at EXEC.
    let _: () = c.set("quote:1", "before").unwrap();
    let _: String = c.get("quote:1").unwrap();
    let (_,): (String,) = redis::pipe()
        .atomic()
        .set("quote:1", "after")
        .query(&mut c)
        .unwrap();
    let v: String = other.get("quote:1").unwrap();
    assert_eq!(v, "after");

    // Per command and argument: HGET and HGETALL, LRANGE variants.
    let _: () = c.hset("ind:1:macd:1d", "v", "1").unwrap();
    let _: String = c.hget("ind:1:macd:1d", "v").unwrap();
    let _: HashMap<String, String> = c.hgetall("ind:1:macd:1d").unwrap();
    let _: () = c.hset("ind:1:macd:1d", "v", "2").unwrap();
    let v: String = c.hget("ind:1:macd:1d", "v").unwrap();
    assert_eq!(v, "2");
    let all: HashMap<String, String> = other.hgetall("ind:1:macd:1d").unwrap();
    assert_eq!(all["v"], "2");
}

#[test]
fn uncached_patterns_always_go_upstream() {
    let redis = RedisServer::start();
    let proxy = cached_proxy(&redis, InvalidationMode::Auto);
    let mut c = proxy.conn();
    let _: () = c.set("lock:job", "t1").unwrap();
    let _: () = c.set("plain", "p").unwrap();
    let before = cmdstat(&redis, "get");
    for _ in 0..3 {
        let _: String = c.get("lock:job").unwrap();
        let _: String = c.get("plain").unwrap();
    }
    assert_eq!(cmdstat(&redis, "get") - before, 6);
}

#[test]
fn mget_is_served_partly_from_l1() {
    let redis = RedisServer::start();
    let proxy = cached_proxy(&redis, InvalidationMode::Auto);
    let mut c = proxy.conn();
    let _: () = c.set("quote:a", "1").unwrap();
    let _: () = c.set("quote:b", "2").unwrap();
    let _: () = c.set("plain", "3").unwrap();
    let first: Vec<Option<String>> = c
        .mget(&["quote:a", "quote:b", "plain", "quote:none"])
        .unwrap();
    assert_eq!(
        first,
        vec![Some("1".into()), Some("2".into()), Some("3".into()), None]
    );
    let before = cmdstat(&redis, "mget");
    let second: Vec<Option<String>> = c
        .mget(&["quote:b", "plain", "quote:a", "quote:none"])
        .unwrap();
    assert_eq!(
        second,
        vec![Some("2".into()), Some("3".into()), Some("1".into()), None]
    );
    assert_eq!(
        cmdstat(&redis, "mget") - before,
        1,
        "one MGET for the uncached key only"
    );
    let all_hits: Vec<Option<String>> = c.mget(&["quote:a", "quote:b"]).unwrap();
    assert_eq!(all_hits, vec![Some("1".into()), Some("2".into())]);
    assert_eq!(
        cmdstat(&redis, "mget") - before,
        1,
        "all hits: no upstream MGET"
    );
    // RESP3 clients get RESP3 nulls, from their own cached variant.
    let mut c3 = redis::Client::open(proxy.url_resp3())
        .unwrap()
        .get_connection()
        .unwrap();
    let r: Vec<Option<String>> = c3.mget(&["quote:a", "quote:none"]).unwrap();
    assert_eq!(r, vec![Some("1".into()), None]);
    let _: () = redis.conn().set("quote:a", "changed").unwrap();
    time_until(
        "changed",
        || {
            c.mget::<_, Vec<Option<String>>>(&["quote:a"])
                .unwrap()
                .remove(0)
        },
        Duration::from_secs(5),
    );
}

/// A write straight to Redis is seen through two nearcache instances within
/// the invalidation bound, in both feed modes. Prints the measured delays.
/// `auto` picks tracking whether or not the server has keyspace events
/// (scripts/fanout: tracking costs Redis less per write with many sidecars).
#[test]
fn direct_writes_reach_two_instances_in_both_modes() {
    for (mode, extra, expect_feed) in [
        (InvalidationMode::Tracking, &[][..], "tracking"),
        (
            InvalidationMode::Keyspace,
            &["--notify-keyspace-events", "KEA"][..],
            "keyspace",
        ),
        (
            InvalidationMode::Auto,
            &["--notify-keyspace-events", "KEA"][..],
            "tracking",
        ),
        (InvalidationMode::Auto, &[][..], "tracking"),
    ] {
        let redis = RedisServer::start_with(extra);
        let a = cached_proxy(&redis, mode);
        let b = cached_proxy(&redis, mode);
        let mut ca = a.conn();
        let mut cb = b.conn();
        let feed: String = {
            let stats = a.stats();
            let i = stats
                .iter()
                .position(|v| *v == redis::Value::BulkString(b"feed".to_vec()))
                .unwrap();
            redis::from_redis_value(stats[i + 1].clone()).unwrap()
        };
        assert_eq!(feed, expect_feed);
        let mut direct = redis.conn();
        let mut delays = Vec::new();
        for i in 0..200 {
            let key = format!("quote:{}", i % 10);
            let _: () = direct.set(&key, format!("v{i}")).unwrap();
            // Warm both L1s with the current value.
            time_until(
                &format!("v{i}"),
                || ca.get(&key).unwrap(),
                Duration::from_secs(5),
            );
            time_until(
                &format!("v{i}"),
                || cb.get(&key).unwrap(),
                Duration::from_secs(5),
            );
            // Both come to serve v{i} from L1. (A fill racing with the write's
            // own invalidation is not stored, so this may take a read or two.)
            for (proxy, conn) in [(&a, &mut ca), (&b, &mut cb)] {
                let hits = proxy.stat("hits");
                let deadline = Instant::now() + Duration::from_secs(5);
                while proxy.stat("hits") == hits {
                    assert_eq!(conn.get::<_, String>(&key).unwrap(), format!("v{i}"));
                    assert!(Instant::now() < deadline, "L1 never served {key}");
                }
            }
            let _: () = direct.set(&key, format!("w{i}")).unwrap();
            delays.push(time_until(
                &format!("w{i}"),
                || ca.get(&key).unwrap(),
                Duration::from_secs(5),
            ));
            time_until(
                &format!("w{i}"),
                || cb.get(&key).unwrap(),
                Duration::from_secs(5),
            );
        }
        delays.sort();
        let p50 = delays[delays.len() / 2];
        let p99 = delays[delays.len() * 99 / 100];
        eprintln!(
            "invalidation delay ({expect_feed}): p50 {p50:?} p99 {p99:?} max {:?}",
            delays.last().unwrap()
        );
        assert!(
            a.stat("hits") > 0 && b.stat("hits") > 0,
            "both instances served hits"
        );

        // FLUSHALL straight on Redis empties both L1s.
        let _: () = direct.set("quote:f", "x").unwrap();
        time_until("x", || ca.get("quote:f").unwrap(), Duration::from_secs(5));
        let _: () = redis::cmd("FLUSHALL").query(&mut direct).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ca.get::<_, Option<String>>("quote:f").unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "FLUSHALL not seen ({expect_feed})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }

        // Expiry upstream.
        let _: () = redis::cmd("SET")
            .arg("quote:e")
            .arg("soon")
            .arg("PX")
            .arg(300)
            .query(&mut direct)
            .unwrap();
        time_until(
            "soon",
            || ca.get("quote:e").unwrap(),
            Duration::from_secs(5),
        );
        let deadline = Instant::now() + Duration::from_secs(3);
        while ca.get::<_, Option<String>>("quote:e").unwrap().is_some() {
            assert!(Instant::now() < deadline, "expiry not seen ({expect_feed})");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn kill_feed(redis: &RedisServer) {
    let mut c = redis.conn();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
    let mut killed = 0;
    for line in list.lines() {
        let flags = line
            .split(' ')
            .find_map(|f| f.strip_prefix("flags="))
            .unwrap_or("");
        let psub = line
            .split(' ')
            .find_map(|f| f.strip_prefix("psub="))
            .unwrap_or("0");
        if flags.contains('t') || psub != "0" {
            let id = line.split(' ').find_map(|f| f.strip_prefix("id=")).unwrap();
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query(&mut c)
                .unwrap();
            killed += 1;
        }
    }
    assert!(killed > 0, "found the feed connection");
}

/// While the feed is down (killed, or Redis restarted with other data),
/// nothing is served from L1, although it held the key when the feed went.
/// Through a relay that holds the feed's reconnection (its `CLIENT TRACKING`,
/// sent in both modes) until the test has read through nearcache: the reads
/// run while nearcache knows the feed is gone and before it is back.
#[test]
fn feed_loss_and_redis_restart_never_serve_stale() {
    for mode in [InvalidationMode::Tracking, InvalidationMode::Keyspace] {
        let mut redis = RedisServer::start_with(&["--notify-keyspace-events", "KEA"]);
        let relay = support::relay::Relay::start(redis.port);
        let mut cfg = test_config(&relay.url());
        cfg.cache.invalidation = mode;
        let proxy = Proxy::with_config(cfg);
        proxy.wait_serving();
        let mut c = proxy.conn();
        let mut direct = redis.conn();
        let _: () = direct.set("quote:k", "old").unwrap();
        time_until("old", || c.get("quote:k").unwrap(), Duration::from_secs(5));
        // L1 holds "old" (it is served from there) when the feed goes.
        until_cached(&proxy, &mut c, "quote:k", "old");

        // Kill the feed, then write behind nearcache's back: no invalidation can arrive.
        relay.hold_requests_from(b"TRACKING");
        kill_feed(&redis);
        let _: () = direct.set("quote:k", "new").unwrap();
        // nearcache has seen the feed go: a new one is on its way (held).
        relay.wait_holding(Duration::from_secs(5));
        for _ in 0..50 {
            let v: String = c.get("quote:k").unwrap();
            assert_eq!(v, "new", "{mode:?}: stale read after the feed was killed");
        }
        assert_eq!(
            proxy.stat("serving"),
            0,
            "{mode:?}: the feed was down all along"
        );
        relay.release();
        proxy.wait_serving();
        assert_eq!(c.get::<_, String>("quote:k").unwrap(), "new");

        // Restart Redis with other data: nothing from before may be served,
        // though L1 holds "new" when Redis goes.
        until_cached(&proxy, &mut c, "quote:k", "new");
        relay.hold_requests_from(b"TRACKING");
        redis.restart();
        relay.wait_holding(Duration::from_secs(10));
        let mut direct = redis.conn();
        let _: () = direct.set("quote:k", "after-restart").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.get::<_, Option<String>>("quote:k") {
                Ok(Some(v)) if v == "after-restart" => break,
                Ok(v) => panic!("{mode:?}: stale read after restart: {v:?}"),
                Err(e) => {
                    assert!(e.to_string().contains("upstream"), "{e}");
                    assert!(Instant::now() < deadline, "no recovery after restart");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        assert_eq!(
            proxy.stat("serving"),
            0,
            "{mode:?}: the feed was down all along"
        );
        relay.release();
        proxy.wait_serving();
        assert_eq!(c.get::<_, String>("quote:k").unwrap(), "after-restart");
    }
}

#[test]
fn keyspace_mode_without_server_events_serves_from_upstream() {
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.cache.invalidation = InvalidationMode::Keyspace;
    let proxy = Proxy::with_config(cfg);
    // The feed has looked at the server's notify-keyspace-events.
    wait_until(
        "the feed decided whether to serve (feed state other than \"starting\")",
        Duration::from_secs(5),
        || proxy.stat_text("feed") != "starting",
    );
    assert_eq!(
        proxy.stat("serving"),
        0,
        "never cache without an invalidation feed (feed: {})",
        proxy.stat_text("feed")
    );
    let mut c = proxy.conn();
    let _: () = c.set("quote:x", "1").unwrap();
    let before = cmdstat(&redis, "get");
    for _ in 0..3 {
        let _: String = c.get("quote:x").unwrap();
    }
    assert_eq!(cmdstat(&redis, "get") - before, 3);

    // With configure_upstream, nearcache turns the events on itself.
    let mut cfg = test_config(&redis.url());
    cfg.cache.invalidation = InvalidationMode::Keyspace;
    cfg.cache.configure_upstream = true;
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let flags: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query(&mut redis.conn())
        .unwrap();
    assert!(flags[1].contains('K'), "{flags:?}");
}

/// A fill whose reply is still on its way when an invalidation of the same
/// key arrives must not store the older value. Made deterministic by a relay
/// between nearcache and Redis that holds the fill's reply (Redis has already
/// read "old") until the test has seen the invalidation arrive.
#[test]
fn invalidation_during_a_fill_cancels_the_insert() {
    let redis = RedisServer::start();
    let relay = support::relay::Relay::start(redis.port);
    let proxy = Proxy::with_config(test_config(&relay.url()));
    proxy.wait_serving();
    let mut direct = redis.conn();
    let _: () = direct.set("quote:race", "old").unwrap();

    relay.hold_replies_from(b"$3\r\nold\r\n");
    let port = proxy.port;
    let reader = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        let v: String = c.get("quote:race").unwrap();
        v
    });
    relay.wait_holding(Duration::from_secs(5));
    let invalidations = proxy.stat("invalidations");
    let _: () = direct.set("quote:race", "new").unwrap();
    wait_until("the invalidation arrived", Duration::from_secs(5), || {
        proxy.stat("invalidations") > invalidations
    });
    // The race happened: the fill read "old" before the write, and its reply
    // reaches nearcache only now, after the invalidation.
    relay.release();
    assert_eq!(
        reader.join().unwrap(),
        "old",
        "the fill's own reply is what Redis said"
    );
    let hits = proxy.stat("hits");
    let v: String = proxy.conn().get("quote:race").unwrap();
    assert_eq!(
        v, "new",
        "the fill stored a value older than the invalidation"
    );
    assert_eq!(
        proxy.stat("hits"),
        hits,
        "nothing of the raced fill was in L1"
    );
}

/// A client's second GET of a key, pipelined while its first one's fill is
/// in flight, shares that fill only if no invalidation of the key came in
/// meanwhile: here the fill read "old", then a write made it "new" and
/// nearcache learned of it, so Redis would answer the second GET "new".
#[test]
fn a_pipelined_read_after_an_invalidation_does_not_join_the_older_fill() {
    let redis = RedisServer::start();
    let relay = support::relay::Relay::start(redis.port);
    let proxy = Proxy::with_config(test_config(&relay.url()));
    proxy.wait_serving();
    let mut direct = redis.conn();
    let _: () = direct.set("quote:pipe", "old").unwrap();

    relay.hold_replies_from(b"$3\r\nold\r\n");
    let mut client = support::RawClient::connect(proxy.port);
    client.send(&[b"GET", b"quote:pipe"]);
    relay.wait_holding(Duration::from_secs(5));
    let invalidations = proxy.stat("invalidations");
    let _: () = direct.set("quote:pipe", "new").unwrap();
    wait_until("the invalidation arrived", Duration::from_secs(5), || {
        proxy.stat("invalidations") > invalidations
    });
    let (gets, coalesced) = (cmdstat(&redis, "get"), proxy.stat("coalesced_misses"));
    client.send(&[b"GET", b"quote:pipe"]);
    wait_until(
        "nearcache took the second GET (read upstream or joined)",
        Duration::from_secs(5),
        || cmdstat(&redis, "get") > gets || proxy.stat("coalesced_misses") > coalesced,
    );
    relay.release();
    assert_eq!(client.reply(), b"$3\r\nold\r\n", "the fill's own reply");
    assert_eq!(
        client.reply(),
        b"$3\r\nnew\r\n",
        "the second GET joined a fill older than the invalidation"
    );
}

/// 1,000 concurrent cold GETs of one key from 50 connections share one
/// upstream GET: the relay holds that GET on its way to Redis until the 999
/// others have joined it, so every one of them arrives while it is in flight.
#[test]
fn concurrent_cold_gets_share_one_upstream_request() {
    let redis = RedisServer::start();
    // Written before nearcache starts: an invalidation of the key arriving
    // while the GETs come in would (rightly) make the later ones read anew.
    let _: () = redis.conn().set("quote:hot", "v").unwrap();
    let relay = support::relay::Relay::start(redis.port);
    let mut cfg = test_config(&relay.url());
    // The canary must not end the feed while the test holds a pool connection.
    cfg.cache.feed_health_interval = Duration::from_secs(10);
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let before = cmdstat(&redis, "get");
    let rt = runtime();
    let conns = rt.block_on(async {
        let client = redis::Client::open(proxy.url()).unwrap();
        let mut conns = Vec::new();
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        for _ in 0..50 {
            conns.push(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .unwrap(),
            );
        }
        conns
    });
    relay.hold_requests_from(b"quote:hot");
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let mut c = conns[i % conns.len()].clone();
            rt.spawn(async move {
                redis::cmd("GET")
                    .arg("quote:hot")
                    .query_async::<String>(&mut c)
                    .await
                    .unwrap()
            })
        })
        .collect();
    relay.wait_holding(Duration::from_secs(5));
    wait_until(
        "999 GETs joined the one in flight (NEARCACHE STATS coalesced_misses)",
        Duration::from_secs(10),
        || proxy.stat("coalesced_misses") >= 999,
    );
    assert_eq!(proxy.stat("fills_in_flight"), 1, "one fill for them all");
    assert_eq!(cmdstat(&redis, "get"), before, "the GET is still held");
    relay.release();
    let replies: Vec<String> = rt.block_on(async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert_eq!(replies.len(), 1000);
    assert!(replies.iter().all(|r| r == "v"));
    assert_eq!(
        cmdstat(&redis, "get") - before,
        1,
        "1,000 concurrent cold GETs → one upstream GET"
    );
    assert!(proxy.stat("coalesced_misses") >= 999);
}

#[test]
fn memory_stays_bounded_far_past_max_bytes() {
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.cache.max_bytes = 1 << 20;
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let mut direct = redis.conn();
    let value = vec![b'v'; 1024];
    let mut p = redis::pipe();
    for i in 0..20_000 {
        p.set(format!("quote:{i}"), &value).ignore();
    }
    let _: () = p.query(&mut direct).unwrap();
    let mut c = proxy.conn();
    for round in 0..2 {
        let mut p = redis::pipe();
        for i in 0..20_000 {
            p.get(format!("quote:{i}"));
        }
        let got: Vec<Vec<u8>> = p.query(&mut c).unwrap();
        assert!(got.iter().all(|v| v.len() == 1024), "round {round}");
    }
    let bytes = proxy.stat("bytes");
    let entries = proxy.stat("entries");
    eprintln!(
        "after 40 MB of fills into a 1 MiB L1: {entries} entries, {bytes} bytes, {} evictions",
        proxy.stat("evictions")
    );
    assert!(
        bytes <= (1 << 20) + (1 << 20) / 10,
        "L1 holds {bytes} bytes > max_bytes"
    );
    assert!(entries > 100, "L1 still caches");
    assert!(
        entries < 2000,
        "L1 holds {entries} entries of 1 KiB in 1 MiB"
    );
}

/// The same with the real binary, measuring its resident memory: 100 MB of
/// distinct cacheable replies through a 4 MiB L1.
#[test]
fn resident_memory_of_the_binary_stays_bounded() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("nearcache-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("rss.toml");
    std::fs::write(&conf, "[cache]\nmax_bytes = \"4MiB\"\n").unwrap();
    let child = Spawned::start(&conf, &redis.url());
    let port = child.port;
    let value = vec![b'v'; 1024];
    let mut direct = redis.conn();
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let mut baseline = 0;
    for batch in 0..100 {
        let mut p = redis::pipe();
        for i in 0..1000 {
            p.set(format!("quote:{batch}:{i}"), &value).ignore();
        }
        let _: () = p.query(&mut direct).unwrap();
        let mut p = redis::pipe();
        for i in 0..1000 {
            p.get(format!("quote:{batch}:{i}")).ignore();
        }
        let _: () = p.query(&mut c).unwrap();
        if batch == 9 {
            baseline = child.rss_kib();
        }
    }
    let end = child.rss_kib();
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("nearcache RSS after 10 MB of fills: {baseline} KiB; after 100 MB: {end} KiB");
    assert!(end < 64 * 1024, "RSS {end} KiB: L1 is not bounded");
    assert!(
        end < baseline + 16 * 1024,
        "RSS kept growing: {baseline} KiB -> {end} KiB"
    );
}

/// Every acknowledged write of one key: (version, acknowledged at), in version order.
type History = Mutex<Vec<(u64, Instant)>>;

/// Writers change keys straight on Redis (and one through a nearcache); readers
/// read through two nearcache instances. Every read must return a value at
/// least as new as the newest write acknowledged `BOUND` before the read
/// started, and no reader may see a key go back in time. The race it is
/// about must have happened: through most of the run, each second both
/// instances served L1 hits while writes went on and their invalidations
/// arrived (not only in a moment of it: a feed that keeps failing turns L1
/// off, and the checker would then check little).
///
/// `BOUND` is the invalidation delay this promises on a loaded machine: the
/// feed's delay is ~1 ms (see `direct_writes_*`), but when the whole process
/// is descheduled (2 shared cores, the rest of the suite running beside it;
/// one CI run exceeded 100 ms at a load average of 11) a read can be served
/// before the feed task has run. A missed invalidation would stay stale for
/// quote's 5 s TTL, far beyond the bound.
#[test]
fn randomized_checker_finds_no_stale_read() {
    const BOUND: Duration = Duration::from_millis(500);
    const KEYS: usize = 16;
    let run_for = Duration::from_secs(60);
    let redis = RedisServer::start();
    let a = cached_proxy(&redis, InvalidationMode::Auto);
    let b = cached_proxy(&redis, InvalidationMode::Auto);
    // history[key] = (version, acknowledged at), in version order.
    let history: Arc<Vec<History>> = Arc::new(
        (0..KEYS)
            .map(|_| Mutex::new(vec![(0, Instant::now())]))
            .collect(),
    );
    {
        let mut d = redis.conn();
        for k in 0..KEYS {
            let _: () = d.set(format!("quote:chk{k}"), 0).unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Each key has one writer so versions are totally ordered; writer 0 writes through nearcache A.
    for w in 0..4 {
        let url = if w == 0 { a.url() } else { redis.url() };
        let (history, stop) = (history.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut version = 0u64;
            let mut rng_state = w as u64 + 1;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                rng_state = rng_state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = w + 4 * ((rng_state >> 33) as usize % (KEYS / 4));
                let _: () = c
                    .set(format!("quote:chk{k}"), version * 4 + w as u64)
                    .unwrap();
                history[k]
                    .lock()
                    .unwrap()
                    .push((version * 4 + w as u64, Instant::now()));
                std::thread::sleep(Duration::from_micros(300));
            }
        }));
    }
    for r in 0..6 {
        let url = if r % 2 == 0 { a.url() } else { b.url() };
        let (history, stop, reads) = (history.clone(), stop.clone(), reads.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut last_seen = [0u64; KEYS];
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                i = (i * 7 + 3) % KEYS;
                let started = Instant::now();
                let v: u64 = c.get(format!("quote:chk{i}")).unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
                let h = history[i].lock().unwrap();
                // The newest write acknowledged more than BOUND before the read
                // (the history is in version and acknowledgement order).
                let n = h.partition_point(|(_, at)| *at + BOUND < started);
                let (must_see, acked) = if n == 0 { (0, started) } else { h[n - 1] };
                assert!(v >= must_see, "stale read of quote:chk{i}: got {v}, but {must_see} was acknowledged {:?} before the read", started - acked);
                assert!(v >= last_seen[i], "quote:chk{i} went back in time: {} then {v}", last_seen[i]);
                last_seen[i] = v;
            }
        }));
    }
    // Each second: what each instance served from L1 and the invalidations
    // it received, and the writes acknowledged.
    let writes = || -> usize { history.iter().map(|h| h.lock().unwrap().len()).sum() };
    let sample = || {
        let (sa, sb) = (a.stats(), b.stats());
        [
            stat(&sa, "hits"),
            stat(&sb, "hits"),
            stat(&sa, "invalidations"),
            stat(&sb, "invalidations"),
            writes() as i64,
        ]
    };
    let mut seconds: Vec<[i64; 5]> = Vec::new();
    let mut last = sample();
    let end = Instant::now() + run_for;
    while Instant::now() < end && !threads.iter().any(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_secs(1));
        let now = sample();
        seconds.push(std::array::from_fn(|i| now[i] - last[i]));
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let hits = a.stat("hits") + b.stat("hits");
    let quiet: Vec<_> = seconds
        .iter()
        .enumerate()
        .filter(|(_, s)| s.contains(&0))
        .collect();
    eprintln!(
        "checker: {} reads, {hits} L1 hits, no stale read; L1 emptied {} and {} times (once at start, twice per feed outage); \
         seconds without hits, invalidations and writes on both instances (hits a, b, \
         invalidations a, b, writes): {quiet:?} of {}",
        reads.load(Ordering::Relaxed),
        a.stat("flushes"),
        b.stat("flushes"),
        seconds.len(),
    );
    assert!(hits > 1000, "the checker must exercise L1 (hits {hits})");
    assert!(
        quiet.len() * 4 <= seconds.len(),
        "L1 hits interleaved with writes on both instances in only {} of {} seconds",
        seconds.len() - quiet.len(),
        seconds.len()
    );
}

#[test]
fn lock_pattern_has_exactly_one_winner_across_two_instances() {
    let redis = RedisServer::start();
    let a = cached_proxy(&redis, InvalidationMode::Auto);
    let b = cached_proxy(&redis, InvalidationMode::Auto);
    let release = redis::Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end");
    for round in 0..5 {
        let winners = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..20)
            .map(|i| {
                let url = if i % 2 == 0 { a.url() } else { b.url() };
                let winners = winners.clone();
                std::thread::spawn(move || {
                    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
                    let token = format!("worker{i}");
                    let got: Option<String> = redis::cmd("SET")
                        .arg("lock:daily_calc")
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(10_000)
                        .query(&mut c)
                        .unwrap();
                    if got.is_some() {
                        winners.fetch_add(1, Ordering::Relaxed);
                        Some(token)
                    } else {
                        None
                    }
                })
            })
            .collect();
        let tokens: Vec<String> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(
            winners.load(Ordering::Relaxed),
            1,
            "round {round}: exactly one winner"
        );
        // The holder is visible through both instances (locks are never cached)...
        let holder: String = a.conn().get("lock:daily_calc").unwrap();
        assert_eq!(holder, tokens[0]);
        let holder_b: String = b.conn().get("lock:daily_calc").unwrap();
        assert_eq!(holder_b, tokens[0]);
        // ...a wrong token cannot release it, the right one can.
        let wrong: i64 = release
            .key("lock:daily_calc")
            .arg("nobody")
            .invoke(&mut b.conn())
            .unwrap();
        assert_eq!(wrong, 0);
        let released: i64 = release
            .key("lock:daily_calc")
            .arg(&tokens[0])
            .invoke(&mut b.conn())
            .unwrap();
        assert_eq!(released, 1);
        let gone: Option<String> = a.conn().get("lock:daily_calc").unwrap();
        assert_eq!(gone, None);
    }
}

#[test]
fn cache_disabled_is_pure_pass_through() {
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url());
    cfg.cache.enabled = false;
    let proxy = Proxy::with_config(cfg);
    let mut c = proxy.conn();
    let _: () = c.set("quote:1", "a").unwrap();
    let before = cmdstat(&redis, "get");
    for _ in 0..5 {
        let _: String = c.get("quote:1").unwrap();
    }
    assert_eq!(cmdstat(&redis, "get") - before, 5);
    assert_eq!(proxy.stat("hits"), 0);
    assert_eq!(proxy.stat("enabled"), 0);
    // And the environment variable the application already has turns it off.
    let env = [("ENABLE_REDIS_CACHE", "false")];
    let cfg = nearcache::config::Config::resolve(&nearcache::config::Cli::default(), &env).unwrap();
    assert!(!cfg.cache.enabled);
}

#[test]
fn admin_commands() {
    let redis = RedisServer::start();
    let proxy = cached_proxy(&redis, InvalidationMode::Auto);
    let mut c = proxy.conn();
    let _: () = c.set("quote:hot", "1").unwrap();
    let _: () = c.set("quote:warm", "1").unwrap();
    for _ in 0..200 {
        let _: String = c.get("quote:hot").unwrap();
    }
    for _ in 0..50 {
        let _: String = c.get("quote:warm").unwrap();
    }
    let hot: Vec<(String, i64)> = redis::cmd("NEARCACHE")
        .arg("HOTKEYS")
        .arg(2)
        .query(&mut c)
        .unwrap();
    assert_eq!(hot[0].0, "quote:hot");
    assert_eq!(hot[1].0, "quote:warm");
    assert!(hot[0].1 > hot[1].1);
    assert!(proxy.stat("entries") >= 2);
    let _: () = redis::cmd("NEARCACHE").arg("FLUSH").query(&mut c).unwrap();
    assert_eq!(proxy.stat("entries"), 0);
    let before = cmdstat(&redis, "get");
    let _: String = c.get("quote:hot").unwrap();
    assert_eq!(cmdstat(&redis, "get") - before, 1, "FLUSH emptied L1");
    let err = redis::cmd("NEARCACHE")
        .arg("BOGUS")
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(err.to_string().contains("NEARCACHE HELP"), "{err}");
}

/// SIGHUP applies new key policies; the feed is re-established with their
/// prefixes, so writes from elsewhere to a newly cached pattern still
/// invalidate (a feed left on the old prefixes would serve them stale).
#[test]
fn policy_reload_extends_the_feed_to_new_patterns() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("nearcache-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("hup.toml");
    let policies = |extra: &str| {
        format!("[cache]\ninvalidation = \"tracking\"\n[[cache.policies]]\npattern = \"quote:*\"\nttl = \"1h\"\n{extra}")
    };
    std::fs::write(&conf, policies("")).unwrap();
    let child = Spawned::start(&conf, &redis.url());
    let port = child.port;
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let serving = |c: &mut redis::Connection| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(stats) = redis::cmd("NEARCACHE")
                .arg("STATS")
                .query::<Vec<redis::Value>>(c)
            {
                if stat(&stats, "serving") == 1 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "L1 never served");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stat_of = |c: &mut redis::Connection, name: &str| {
        stat(
            &redis::cmd("NEARCACHE")
                .arg("STATS")
                .query::<Vec<redis::Value>>(c)
                .unwrap(),
            name,
        )
    };
    let mut c = client.get_connection().unwrap();
    serving(&mut c);

    let flushes = stat_of(&mut c, "flushes");
    std::fs::write(
        &conf,
        policies("[[cache.policies]]\npattern = \"news:*\"\nttl = \"1h\"\n"),
    )
    .unwrap();
    child.signal("HUP");
    // The reload turns L1 off and empties it, until the new feed is up.
    wait_until(
        "the reload emptied L1 (a flush in NEARCACHE STATS)",
        Duration::from_secs(10),
        || stat_of(&mut c, "flushes") > flushes,
    );
    serving(&mut c);

    let mut direct = redis.conn();
    let _: () = direct.set("news:1", "old").unwrap();
    let before = stat_of(&mut c, "hits");
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat_of(&mut c, "hits") == before {
        assert_eq!(c.get::<_, String>("news:1").unwrap(), "old");
        assert!(
            Instant::now() < deadline,
            "news:* never cached after the reload"
        );
    }
    let invalidations = stat_of(&mut c, "invalidations");
    let _: () = direct.set("news:1", "new").unwrap();
    wait_until(
        "a write to a newly cached pattern was invalidated (NEARCACHE STATS invalidations)",
        Duration::from_secs(5),
        || stat_of(&mut c, "invalidations") > invalidations,
    );
    let v: String = c.get("news:1").unwrap();
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        v, "new",
        "a write to a newly cached pattern was not invalidated"
    );
}
