//! A Redis Cluster upstream whose first seed is gone (a port nobody listens
//! on, a node that was killed): what nearcache says about its upstream
//! (HELLO's fields, `NEARCACHE STATS` `upstream_up`, the
//! `nearcache_upstream_up` gauge, readiness) comes from the masters the
//! router knows, never from the first seed. Also the control commands
//! nearcache sends on a client's behalf: `CLIENT UNBLOCK` reaches the node
//! of that client's pinned connection, `CLIENT PAUSE`/`UNPAUSE` every
//! master.

mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::cluster::Cluster;
use support::*;

/// The metrics registry is the process's: one scrape at a time, so a test
/// reads the gauge its own nearcache set (`admin::refresh_gauges`).
static SCRAPE: Mutex<()> = Mutex::new(());

fn upstream_up_gauge(proxy: &Proxy) -> String {
    let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
    let (code, body) = proxy.http_get("/metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("nearcache_upstream_up "))
        .expect("nearcache_upstream_up in /metrics")
        .trim()
        .to_string()
}

fn config(url: &str) -> nearcache::Config {
    let mut c = test_config(url);
    c.upstream.cluster.refresh_interval = Duration::from_millis(500);
    c.upstream.connect_timeout = Duration::from_millis(500);
    c
}

fn wait_ready(proxy: &Proxy) {
    wait_until("/readyz 200", Duration::from_secs(15), || {
        proxy.http_get("/readyz").0 == 200
    });
}

/// A field of a HELLO reply read through the `redis` crate (a RESP3 map,
/// or the RESP2 flat array).
fn field(hello: &redis::Value, name: &str) -> redis::Value {
    let pairs: Vec<(redis::Value, redis::Value)> = match hello {
        redis::Value::Map(m) => m.clone(),
        redis::Value::Array(a) => a.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect(),
        other => panic!("HELLO answered {other:?}"),
    };
    pairs
        .into_iter()
        .find(|(k, _)| redis::from_redis_value::<String>(k.clone()).ok().as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in {hello:?}"))
        .1
}

fn text(v: redis::Value) -> String {
    redis::from_redis_value(v).unwrap()
}

/// Everything a client sees of the upstream, with the first seed gone:
/// ready, HELLO (the `redis` crate in RESP3 and RESP2, redis-cli) with the
/// cluster's version and a single server's shape, `upstream_up` 1, and
/// GET/SET/MGET across every master.
fn serves_without_the_first_seed(cluster: &Cluster, proxy: &Proxy) {
    wait_ready(proxy);
    let version = info_field(&cluster.nodes[0], "server", "redis_version");

    let mut c3 = redis::Client::open(proxy.url_resp3())
        .unwrap()
        .get_connection()
        .unwrap();
    let hello: redis::Value = redis::cmd("HELLO").arg(3).query(&mut c3).unwrap();
    assert_eq!(text(field(&hello, "server")), "redis");
    assert_eq!(text(field(&hello, "version")), version, "{hello:?}");
    assert_eq!(field(&hello, "proto"), redis::Value::Int(3));
    // One server to the client: not a cluster node it should ask for slots.
    assert_eq!(text(field(&hello, "mode")), "standalone", "{hello:?}");
    assert_eq!(text(field(&hello, "role")), "master", "{hello:?}");
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut c3).unwrap();
    assert_eq!(field(&hello, "id"), redis::Value::Int(id));

    let mut c2 = proxy.conn();
    let hello: redis::Value = redis::cmd("HELLO").arg(2).query(&mut c2).unwrap();
    assert_eq!(text(field(&hello, "version")), version, "{hello:?}");
    assert_eq!(field(&hello, "proto"), redis::Value::Int(2));

    // redis-cli, RESP3 from its first command (not a terminal: the map
    // printed as `name value` lines).
    let out = redis_cli(proxy.port, &["-3", "HELLO", "3"]);
    let after = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in redis-cli's HELLO: {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(after("version"), version, "{out}");
    assert_eq!(after("mode"), "standalone", "{out}");
    assert_eq!(after("proto"), "3", "{out}");

    assert_eq!(proxy.stat("upstream_up"), 1);
    assert_eq!(upstream_up_gauge(proxy), "1");

    // Requests reach every master.
    let keys = cluster.keys_on_every_master("seed:");
    for (i, k) in keys.iter().enumerate() {
        let _: () = redis::cmd("SET").arg(k).arg(i).query(&mut c2).unwrap();
        let back: usize = redis::cmd("GET").arg(k).query(&mut c3).unwrap();
        assert_eq!(back, i);
    }
    let mut mget = redis::cmd("MGET");
    for k in &keys {
        mget.arg(k);
    }
    mget.arg("seed:missing");
    let got: Vec<Option<usize>> = mget.query(&mut c2).unwrap();
    let mut want: Vec<Option<usize>> = (0..keys.len()).map(Some).collect();
    want.push(None);
    assert_eq!(got, want);
    for (i, k) in keys.iter().enumerate() {
        let owner = cluster.owner_of(k);
        let direct: usize = redis::cmd("GET").arg(k).query(&mut owner.conn()).unwrap();
        assert_eq!(direct, i, "{k} on its owner");
    }
}

#[test]
fn the_first_seed_a_port_nobody_listens_on() {
    let cluster = Cluster::start(3);
    let dead = free_port();
    let url = format!(
        "redis-cluster://127.0.0.1:{dead},127.0.0.1:{}",
        cluster.nodes[1].port
    );
    let proxy = Proxy::with_config(config(&url));
    serves_without_the_first_seed(&cluster, &proxy);
}

#[test]
fn the_first_seed_a_node_that_was_killed_then_every_node() {
    let mut cluster = Cluster::start(3);
    // A node that was part of the cluster (a replica: the masters keep
    // every slot served), killed before nearcache starts.
    let mut gone = cluster.add_replica(&cluster.nodes[0]);
    let gone_port = gone.port;
    gone.kill();
    let url = format!(
        "redis-cluster://127.0.0.1:{gone_port},127.0.0.1:{}",
        cluster.nodes[2].port
    );
    let proxy = Proxy::with_config(config(&url));
    serves_without_the_first_seed(&cluster, &proxy);

    // Every node gone: the router's map is kept, but nothing answers its
    // refreshes any more, so nearcache says its upstream is down.
    for n in cluster.nodes.iter_mut() {
        n.kill();
    }
    wait_until("upstream_up 0", Duration::from_secs(10), || {
        proxy.stat("upstream_up") == 0
    });
    assert_eq!(upstream_up_gauge(&proxy), "0");
    assert_eq!(proxy.http_get("/readyz").0, 503);
}

/// `CLIENT UNBLOCK` names a nearcache client; its blocked command is on its
/// pinned connection to the node that owns the key, whose connection id
/// means nothing elsewhere: the unblock goes to that node (not to any
/// master, not to the first seed).
#[test]
fn client_unblock_reaches_the_node_of_the_blocked_client() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(config(&cluster.url()));
    wait_ready(&proxy);
    // A key on the last master in address order (keyless commands, CLIENT
    // UNBLOCK before, went to the first).
    let mut masters: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    masters.sort();
    let last = masters.last().unwrap().clone();
    let key = (0..)
        .map(|i| format!("blk:{i}"))
        .find(|k| format!("127.0.0.1:{}", cluster.owner_of(k).port) == last)
        .unwrap();

    for (mode, want) in [(None, Ok(())), (Some("ERROR"), Err("UNBLOCKED"))] {
        let mut blocked = proxy.conn();
        let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut blocked).unwrap();
        let key2 = key.clone();
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            let r: redis::RedisResult<Option<(String, String)>> =
                redis::cmd("BLPOP").arg(&key2).arg(20).query(&mut blocked);
            (r, started.elapsed())
        });
        let mut other = proxy.conn();
        // Blocked on the owner once a connection there has the `b` flag
        // (the last round's may show `cmd=blpop`, idle).
        let owner = cluster.owner_of(&key);
        wait_until(
            "BLPOP blocked on the owner",
            Duration::from_secs(10),
            || {
                let list: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query(&mut owner.conn())
                    .unwrap();
                list.lines().any(|l| l.contains(" flags=b "))
            },
        );
        let mut unblock = redis::cmd("CLIENT");
        unblock.arg("UNBLOCK").arg(id);
        if let Some(m) = mode {
            unblock.arg(m);
        }
        let n: i64 = unblock.query(&mut other).unwrap();
        assert_eq!(n, 1, "CLIENT UNBLOCK {id} {mode:?}");
        let (r, took) = waiter.join().unwrap();
        assert!(took < Duration::from_secs(10), "unblocked after {took:?}");
        match want {
            Ok(()) => assert_eq!(r.unwrap(), None),
            Err(code) => {
                let e = r.unwrap_err();
                assert_eq!(e.code(), Some(code), "{e}");
            }
        }
    }
    // A client that is not blocked anywhere: 0, as Redis.
    let mut c = proxy.conn();
    let me: i64 = redis::cmd("CLIENT").arg("ID").query(&mut c).unwrap();
    let n: i64 = redis::cmd("CLIENT")
        .arg("UNBLOCK")
        .arg(me)
        .query(&mut c)
        .unwrap();
    assert_eq!(n, 0);
}

/// A write straight to `node` that does not complete within 300 ms (the
/// node is paused for writes), or completes (`true`).
fn direct_write_completes(node: &RedisServer, key: &str) -> bool {
    let mut c = node.conn();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let r: redis::RedisResult<()> = redis::cmd("SET").arg(key).arg(1).query(&mut c);
    match r {
        Ok(()) => true,
        Err(e) if e.is_timeout() => false,
        Err(e) => panic!("SET {key} on {}: {e}", node.port),
    }
}

/// `CLIENT PAUSE` pauses the client's Redis: with a cluster, every master
/// (not the first in address order only); `CLIENT UNPAUSE` ends it on
/// every master.
#[test]
fn client_pause_and_unpause_reach_every_master() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(config(&cluster.url()));
    wait_ready(&proxy);
    let keys = cluster.keys_on_every_master("pause:");
    let mut c = proxy.conn();
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "20000", "WRITE"][..])
        .query(&mut c)
        .unwrap();
    for k in &keys {
        let owner = cluster.owner_of(k);
        assert!(
            !direct_write_completes(owner, k),
            "a write on {} while paused",
            owner.port
        );
    }
    let _: () = redis::cmd("CLIENT").arg("UNPAUSE").query(&mut c).unwrap();
    for k in &keys {
        let owner = cluster.owner_of(k);
        assert!(
            direct_write_completes(owner, k),
            "{} still paused after UNPAUSE",
            owner.port
        );
    }
}
