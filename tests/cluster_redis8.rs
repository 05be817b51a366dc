//! nearcache in front of a Redis **8** cluster (the `redis-server` that
//! `scripts/test` installs into `tests/redis8/lib`; Debian's is 7.0): the
//! slot map comes from `CLUSTER SHARDS` there, never `CLUSTER SLOTS`, and
//! a plain client works through nearcache as with 7.0 — writes on every
//! master, cross-slot MGET in key order, L1 hits invalidated by direct
//! writes, and a failover to a replica.

mod support;

use std::time::Duration;

use support::cluster::Cluster;
use support::*;

/// `calls` of a subcommand in a node's `INFO commandstats` (0 if absent).
fn calls(node: &RedisServer, stat: &str) -> u64 {
    cmdstat(node, stat)
}

#[test]
fn a_redis_8_cluster_is_mapped_with_cluster_shards_and_served() {
    let cluster = Cluster::start_of(&redis8_server(), 3, 1);
    let version = info_field(&cluster.nodes[0], "server", "redis_version");
    assert!(version.starts_with("8."), "a Redis 8 node: {version}");
    let mut cfg = test_config(&cluster.url());
    cfg.cache.invalidation = nearcache::config::InvalidationMode::Tracking;
    cfg.upstream.cluster.refresh_interval = Duration::from_millis(100);
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();

    // The map comes from CLUSTER SHARDS only: for a second nothing but
    // nearcache's refreshes (every 100 ms) asks the nodes.
    for n in &cluster.nodes {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut n.conn())
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let shards: u64 = cluster
        .nodes
        .iter()
        .map(|n| calls(n, "cluster|shards"))
        .sum();
    let slots: u64 = cluster
        .nodes
        .iter()
        .map(|n| calls(n, "cluster|slots"))
        .sum();
    assert!(
        shards >= 5,
        "CLUSTER SHARDS asked at every refresh: {shards}"
    );
    assert_eq!(slots, 0, "CLUSTER SLOTS never asked of a Redis 8 node");

    let mut c = proxy.conn();
    let keys = cluster.keys_on_every_master("ind:r8:");
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
        let on_owner: String = redis::cmd("GET")
            .arg(k)
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
        assert_eq!(&on_owner, k);
    }
    let mut mget = keys.clone();
    mget.insert(1, "ind:r8:missing".into());
    let got: Vec<Option<String>> = redis::cmd("MGET").arg(&mget).query(&mut c).unwrap();
    let want: Vec<Option<String>> = mget
        .iter()
        .map(|k| (k != "ind:r8:missing").then(|| k.clone()))
        .collect();
    assert_eq!(got, want, "cross-slot MGET in key order");

    // L1 serves, and a direct write on the owner invalidates it.
    let k = &keys[0];
    wait_until("a hit", Duration::from_secs(5), || {
        let hits = proxy.stat("hits");
        let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
        assert_eq!(&v, k);
        proxy.stat("hits") > hits
    });
    let _: () = redis::cmd("SET")
        .arg(k)
        .arg("direct")
        .query(&mut cluster.owner_of(k).conn())
        .unwrap();
    wait_until("the direct write seen", Duration::from_secs(2), || {
        let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
        v == "direct"
    });

    // A failover (the owner's replica takes over): the new map, read from
    // CLUSTER SHARDS, sends writes to the promoted node.
    let old = cluster.owner_of(k).port;
    let replica = cluster.replica_of(cluster.node(old));
    replica.take_over();
    wait_until(
        "writes reach the promoted node",
        Duration::from_secs(10),
        || {
            let r: redis::RedisResult<()> = redis::cmd("SET").arg(k).arg("after").query(&mut c);
            let on_new: Option<String> =
                redis::cmd("GET").arg(k).query(&mut replica.conn()).unwrap();
            r.is_ok() && on_new.as_deref() == Some("after")
        },
    );
    let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
    assert_eq!(v, "after");
}
