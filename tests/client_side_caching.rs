//! Clients with their own client-side cache (redis-py `cache_config`,
//! rueidis, go-redis, Jedis, node-redis caching) turn on CLIENT TRACKING.
//! Through nearcache they get an invalidation for every key they read, as
//! from Redis: in RESP3 on the same connection, in RESP2 through REDIRECT to
//! another client subscribed to `__redis__:invalidate`, whose id is the one
//! nearcache gave it. Real redis-server; writes come from elsewhere.

mod support;

use std::time::Duration;

use support::*;

fn set_directly(redis: &RedisServer, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut redis.conn())
        .unwrap();
}

fn invalidate_push(key: &str) -> Vec<u8> {
    format!(
        ">2\r\n$10\r\ninvalidate\r\n*1\r\n${}\r\n{key}\r\n",
        key.len()
    )
    .into_bytes()
}

#[test]
fn resp3_tracking_gets_invalidations_in_every_mode() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    for (i, mode) in [
        "CLIENT TRACKING ON",
        "CLIENT TRACKING ON OPTIN",
        "CLIENT TRACKING ON BCAST PREFIX quote:",
    ]
    .iter()
    .enumerate()
    {
        let key = format!("quote:t{i}");
        set_directly(&redis, &key, "1");
        let mut c = RawClient::connect(proxy.port);
        assert!(c.line("HELLO 3").starts_with(b"%"));
        assert_eq!(c.line(mode), b"+OK\r\n".to_vec(), "{mode}");
        if mode.contains("OPTIN") {
            assert_eq!(c.line("CLIENT CACHING YES"), b"+OK\r\n".to_vec());
        }
        assert_eq!(c.line(&format!("GET {key}")), b"$1\r\n1\r\n".to_vec());
        set_directly(&redis, &key, "2");
        let push = c
            .try_reply(Duration::from_secs(5))
            .expect("an invalidation");
        assert_eq!(push, invalidate_push(&key), "{mode}");
        // A write through nearcache by another client is reported too.
        if mode.contains("OPTIN") {
            assert_eq!(c.line("CLIENT CACHING YES"), b"+OK\r\n".to_vec());
        }
        assert_eq!(c.line(&format!("GET {key}")), b"$1\r\n2\r\n".to_vec());
        let mut other = RawClient::connect(proxy.port);
        assert_eq!(other.line(&format!("SET {key} 3")), b"+OK\r\n".to_vec());
        let push = c
            .try_reply(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{mode}: no invalidation for a write through nearcache"));
        assert_eq!(
            push,
            invalidate_push(&key),
            "{mode}, write through nearcache"
        );
        let info = String::from_utf8_lossy(&c.line("CLIENT TRACKINGINFO")).into_owned();
        assert!(info.contains("on"), "{info}");
    }
}

#[test]
fn resp2_tracking_redirects_to_a_subscribed_client_by_its_nearcache_id() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis);
    proxy.wait_serving();
    set_directly(&redis, "quote:r", "1");
    let mut listener = RawClient::connect(proxy.port);
    let id = String::from_utf8_lossy(&listener.line("CLIENT ID")[1..])
        .trim()
        .to_string();
    let confirm = listener.line("SUBSCRIBE __redis__:invalidate");
    assert!(confirm.starts_with(b"*3\r\n$9\r\nsubscribe"), "{confirm:?}");

    let mut reader = RawClient::connect(proxy.port);
    assert_eq!(
        reader.line(&format!("CLIENT TRACKING ON REDIRECT {id}")),
        b"+OK\r\n".to_vec()
    );
    assert_eq!(
        reader.line("CLIENT GETREDIR"),
        format!(":{id}\r\n").into_bytes()
    );
    assert_eq!(reader.line("GET quote:r"), b"$1\r\n1\r\n".to_vec());
    set_directly(&redis, "quote:r", "2");
    let msg = listener
        .try_reply(Duration::from_secs(5))
        .expect("an invalidation message");
    assert_eq!(
        msg,
        b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$7\r\nquote:r\r\n".to_vec()
    );
}
