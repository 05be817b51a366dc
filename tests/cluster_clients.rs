//! The clients applications use, with their defaults, against nearcache in
//! front of a real Redis Cluster: a plain (non-cluster) client of each
//! library talks to the sidecar as to one Redis. redis-py 8 (RESP3 by
//! default, RESP2, a client name), node-redis 5 and 6, ioredis 5 and 6 (its
//! ready check sends INFO at connect). Each SETs keys spread over the three
//! masters, reads each of them many times, then MGETs them all across
//! slots; every value must be right, and the hot reads must be L1 hits
//! (NEARCACHE STATS).
//!
//! The libraries are the ones `scripts/test` installs for tests/clients.rs
//! (tests/clients/pylib, tests/clients/node_modules).

mod support;

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use support::cluster::Cluster;
use support::*;

const KEYS: usize = 24;
const READS: usize = 10;

#[derive(Debug, Deserialize)]
struct Report {
    config: String,
    wrong: u64,
    first_wrong: Option<String>,
    mget_ok: bool,
    error: Option<String>,
}

fn run(program: &str, script: &str, configs: usize) {
    let cluster = Cluster::start(3);
    let mut cfg = test_config(&cluster.url());
    cfg.cache.invalidation = nearcache::config::InvalidationMode::Tracking;
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let hits = proxy.stat("hits");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = Command::new(program)
        .arg(&path)
        .arg(proxy.port.to_string())
        .arg(KEYS.to_string())
        .arg(READS.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}): run scripts/test"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<Report> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(reports.len(), configs, "{stdout}");
    for r in &reports {
        assert_eq!(r.error, None, "{}", r.config);
        assert_eq!(r.wrong, 0, "{}: {:?}", r.config, r.first_wrong);
        assert!(r.mget_ok, "{}: MGET across slots", r.config);
    }
    // The keys really are spread over the masters.
    for n in &cluster.nodes {
        let size: i64 = redis::cmd("DBSIZE").query(&mut n.conn()).unwrap();
        assert!(size > 0, "node {} holds none of the keys", n.port);
    }
    // Each configuration's first read of a key after its SET is a miss (the
    // SET invalidated it); the others are hits.
    let got = proxy.stat("hits") - hits;
    let want = (configs * KEYS * (READS - 1)) as i64;
    assert!(got >= want, "{got} L1 hits, at least {want} expected");
}

#[test]
fn redis_py_through_nearcache_to_a_cluster() {
    run("python3", "cluster_py.py", 3);
}

#[test]
fn node_clients_through_nearcache_to_a_cluster() {
    run("node", "cluster_node.mjs", 4);
}
