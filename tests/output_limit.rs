//! `server.client_output_limit`: a client that leaves more replies unread
//! than its class allows is disconnected (as Redis's
//! `client-output-buffer-limit` does), and nobody else notices.
//! Real redis-server, nearcache in-process, raw sockets that stop reading.

mod support;

use std::time::{Duration, Instant};

use nearcache::config::{OutputLimit, OutputLimits};
use support::{test_config, Proxy, RawClient, RedisServer};

const MIB: u64 = 1024 * 1024;

fn limit(hard: u64, soft: u64, soft_for: Duration) -> OutputLimit {
    OutputLimit {
        hard,
        soft,
        soft_for,
    }
}

fn proxy_with(redis: &RedisServer, limits: OutputLimits) -> Proxy {
    let mut cfg = test_config(&redis.url());
    cfg.server.client_output_limit = limits;
    Proxy::with_config(cfg)
}

fn unlimited() -> OutputLimit {
    limit(0, 0, Duration::ZERO)
}

/// Publishes `n` messages of `size` bytes on `channel` straight on Redis.
fn publish(redis: &RedisServer, channel: &str, n: usize, size: usize) {
    let mut c = redis.conn();
    let payload = vec![b'x'; size];
    for _ in 0..n {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(&payload)
            .query(&mut c)
            .unwrap();
    }
}

fn metric(proxy: &Proxy) -> f64 {
    let (_, body) = proxy.http_get("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("nearcache_client_output_limit_closed_total "))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn subscriber_that_stops_reading_is_closed_at_the_hard_limit() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        OutputLimits {
            normal: unlimited(),
            pubsub: limit(MIB, 0, Duration::ZERO),
        },
    );
    let before = metric(&proxy);
    let mut sub = RawClient::connect(proxy.port);
    sub.cmd(&[b"SUBSCRIBE", b"news"]);
    // More than the socket buffers on both sides hold, so nearcache's own
    // output for this client grows past 1 MiB.
    publish(&redis, "news", 64, 512 * 1024);
    assert!(sub.closed(), "the subscriber was not disconnected");
    assert!(metric(&proxy) > before);
    // Everyone else is served as before, and so is a new subscriber.
    let mut other = proxy.conn();
    let pong: String = redis::cmd("PING").query(&mut other).unwrap();
    assert_eq!(pong, "PONG");
    let mut sub2 = RawClient::connect(proxy.port);
    sub2.cmd(&[b"SUBSCRIBE", b"news"]);
    publish(&redis, "news", 1, 10);
    let msg = sub2.reply();
    assert!(msg.ends_with(b"$10\r\nxxxxxxxxxx\r\n"), "{msg:?}");
}

#[test]
fn pipeliner_that_stops_reading_is_closed_at_the_hard_limit() {
    let redis = RedisServer::start();
    let proxy = proxy_with(
        &redis,
        OutputLimits {
            normal: limit(4 * MIB, 0, Duration::ZERO),
            pubsub: unlimited(),
        },
    );
    let big = vec![b'v'; MIB as usize];
    let _: () = redis::cmd("SET")
        .arg("big:1")
        .arg(&big)
        .query(&mut redis.conn())
        .unwrap();
    let mut greedy = RawClient::connect(proxy.port);
    // One write, never read: 64 MiB of replies.
    let mut pipeline = Vec::new();
    for _ in 0..64 {
        pipeline.extend_from_slice(&nearcache::protocol::command([&b"GET"[..], b"big:1"]));
    }
    std::io::Write::write_all(&mut greedy.s, &pipeline).unwrap();
    assert!(greedy.closed(), "the client was not disconnected");
    let mut other = proxy.conn();
    let v: Vec<u8> = redis::cmd("GET").arg("big:1").query(&mut other).unwrap();
    assert_eq!(v.len(), big.len());
}

#[test]
fn soft_limit_closes_only_after_its_duration() {
    let redis = RedisServer::start();
    let soft_for = Duration::from_secs(1);
    let proxy = proxy_with(
        &redis,
        OutputLimits {
            normal: unlimited(),
            pubsub: limit(0, 256 * 1024, soft_for),
        },
    );
    let mut sub = RawClient::connect(proxy.port);
    sub.cmd(&[b"SUBSCRIBE", b"ticks"]);
    publish(&redis, "ticks", 64, 256 * 1024);
    let over = Instant::now();
    // Keep it over the soft limit: a small message every 50 ms.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let (url, stop) = (redis.url(), stop.clone());
        std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg("ticks")
                    .arg("t")
                    .query(&mut c)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Over the soft limit but not closed before its duration is up (CLIENT
    // LIST shows the subscriber and its unread output)...
    std::thread::sleep(soft_for / 2);
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut proxy.conn())
        .unwrap();
    let omem: u64 = list
        .lines()
        .find(|l| l.contains(" sub=1 "))
        .unwrap_or_else(|| panic!("closed before {soft_for:?} over the soft limit:\n{list}"))
        .split(" omem=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        omem > 256 * 1024,
        "not over the soft limit yet: omem={omem}"
    );
    // ...and closed after it, while it still reads nothing (reading would
    // bring it back under the soft limit).
    std::thread::sleep((soft_for + Duration::from_millis(500)).saturating_sub(over.elapsed()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(sub.closed(), "the subscriber was not disconnected");
    trickle.join().unwrap();
    assert!(over.elapsed() >= soft_for);
}

#[test]
fn a_client_that_reads_is_never_closed_under_the_default_limit() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    let big = vec![b'w'; MIB as usize];
    let _: () = redis::cmd("SET")
        .arg("big:2")
        .arg(&big)
        .query(&mut redis.conn())
        .unwrap();
    let mut c = proxy.conn();
    let mut pipe = redis::pipe();
    for _ in 0..64 {
        pipe.cmd("GET").arg("big:2");
    }
    let replies: Vec<Vec<u8>> = pipe.query(&mut c).unwrap();
    assert_eq!(replies.len(), 64);
    assert!(replies.iter().all(|r| r.len() == big.len()));
}
