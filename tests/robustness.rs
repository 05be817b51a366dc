//! One client must never take the sidecar down. The real binary runs in
//! front of a real redis-server; a client makes Redis produce a deeply
//! nested reply (or sends a deeply nested request), and afterwards the
//! process is still up, the same client and every other client are served,
//! and resident memory is back near where it was.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use support::relay::Relay;
use support::*;

/// The script from Redis' own test suite: a table that contains itself.
/// Redis answers with ~8,000 nested one-element arrays ending in an error.
const RECURSIVE: &str = "local a = {}; local b = {a}; a[1] = b; return a";

fn conf(cache: bool) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nearcache-robust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("cache-{cache}.toml"));
    // Every key cacheable, so the deep reply also goes through the fill path.
    std::fs::write(
        &path,
        format!("[cache]\nenabled = {cache}\ndefault_ttl = \"1h\"\n"),
    )
    .unwrap();
    path
}

/// The process is up and answers both an old connection and a new one.
fn still_serving(proxy: &mut Spawned, old: &mut RawClient) {
    assert!(proxy.is_running(), "nearcache exited");
    assert_eq!(old.cmd(&[b"PING"]), b"+PONG\r\n".to_vec());
    let mut other = RawClient::connect(proxy.port);
    assert_eq!(other.cmd(&[b"SET", b"after", b"1"]), b"+OK\r\n".to_vec());
    assert_eq!(other.cmd(&[b"GET", b"after"]), b"$1\r\n1\r\n".to_vec());
}

/// Resident memory after the rounds is within `slack_kib` of the level after warm-up.
fn memory_returns(proxy: &Spawned, mut round: impl FnMut(), slack_kib: u64) {
    round();
    let before = proxy.rss_kib();
    for _ in 0..5 {
        round();
    }
    let after = proxy.rss_kib();
    assert!(
        after <= before + slack_kib,
        "resident memory grew from {before} KiB to {after} KiB"
    );
}

#[test]
fn recursive_script_gets_redis_own_answer_and_nearcache_keeps_running() {
    let redis = RedisServer::start();
    for cache in [true, false] {
        let conf = conf(cache);
        let mut proxy = Spawned::start(&conf, &redis.url());
        wait_until_proxied(proxy.port);
        for proto in [2u8, 3] {
            let mut direct = RawClient::connect(redis.port);
            let mut through = RawClient::connect(proxy.port);
            if proto == 3 {
                direct.cmd(&[b"HELLO", b"3"]);
                through.cmd(&[b"HELLO", b"3"]);
            }
            let expected = direct.cmd(&[b"EVAL", RECURSIVE.as_bytes(), b"0"]);
            assert!(expected.len() > 20_000, "Redis nests its answer deeply");
            assert!(expected.ends_with(b"-ERR reached lua stack limit\r\n"));
            memory_returns(
                &proxy,
                || {
                    let got = through.cmd(&[b"EVAL", RECURSIVE.as_bytes(), b"0"]);
                    assert!(
                        got == expected,
                        "cache={cache} RESP{proto}: not Redis' own answer"
                    );
                },
                4 * 1024,
            );
            still_serving(&mut proxy, &mut through);
        }
    }
}

/// Redis cannot nest a reply 100,000 deep (its Lua conversion stops near
/// 8,000), so the relay puts one in place of an ECHO reply.
#[test]
fn hundred_thousand_deep_reply_is_forwarded_unchanged() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port);
    let mut deep = b"*1\r\n".repeat(100_000);
    deep.extend_from_slice(b":1\r\n");
    relay.rewrite_reply(b"$8\r\n__deep__\r\n", deep.clone());
    for cache in [true, false] {
        let conf = conf(cache);
        let mut proxy = Spawned::start(&conf, &relay.url());
        wait_until_proxied(proxy.port);
        for proto in [2u8, 3] {
            let mut c = RawClient::connect(proxy.port);
            if proto == 3 {
                c.cmd(&[b"HELLO", b"3"]);
            }
            memory_returns(
                &proxy,
                || {
                    let got = c.cmd(&[b"ECHO", b"__deep__"]);
                    assert!(
                        got == deep,
                        "cache={cache} RESP{proto}: the deep reply changed"
                    );
                },
                4 * 1024,
            );
            still_serving(&mut proxy, &mut c);
        }
    }
}

#[test]
fn hundred_thousand_deep_request_gets_redis_error_and_only_that_client_closes() {
    let redis = RedisServer::start();
    let conf = conf(true);
    let mut proxy = Spawned::start(&conf, &redis.url());
    wait_until_proxied(proxy.port);
    let deep = b"*1\r\n".repeat(100_000);
    let mut bystander = RawClient::connect(proxy.port);
    assert_eq!(bystander.cmd(&[b"PING"]), b"+PONG\r\n".to_vec());

    let mut direct = RawClient::connect(redis.port);
    direct.s.write_all(&deep).unwrap();
    let expected = direct.reply();
    assert_eq!(
        expected,
        b"-ERR Protocol error: expected '$', got '*'\r\n".to_vec()
    );

    memory_returns(
        &proxy,
        || {
            let mut c = RawClient::connect(proxy.port);
            c.s.write_all(&deep).unwrap();
            assert_eq!(c.reply(), expected);
            assert!(c.closed(), "broken framing closes that connection");
        },
        4 * 1024,
    );
    still_serving(&mut proxy, &mut bystander);
}

/// Waits until nearcache answers through to its upstream.
fn wait_until_proxied(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = RawClient::connect(port);
        if c.cmd(&[b"ECHO", b"up"]) == b"$2\r\nup\r\n" {
            return;
        }
        assert!(Instant::now() < deadline, "nearcache never reached Redis");
        std::thread::sleep(Duration::from_millis(20));
    }
}
