//! Differential test against a Redis Cluster (issue 13): the command-family
//! scripts of `support/scripts.rs`, run through nearcache in front of a real
//! 3-master cluster with a plain (non-cluster) client, must get the replies a
//! single redis-server gives to the same scripts, in RESP2 and RESP3, over raw
//! sockets (one at a time and pipelined) and through the `redis` crate (sync,
//! pipelined, async). The scripts' keys span many slots on purpose: MGET,
//! MSET, DEL, EXISTS, … across slots must behave as on one Redis. Where
//! Redis Cluster itself differs, the scripts say so: `@crossslot` lines must
//! get the node's own CROSSSLOT error, `@nocluster 'why'` lines and scripts
//! with `not_in_cluster` are left out (listed at the start of each run).
//!
//! Two nearcaches, each in front of a cluster of its own (a script's writes
//! must reach one cluster once): default cache policies (every command to
//! the router), and every key cacheable (reads from L1, fills and MGET
//! through `read.rs`, one invalidation feed per master).

#[path = "support/scripts.rs"]
mod scripts;
mod support;

use std::time::{Duration, Instant};

use scripts::*;
use support::cluster::Cluster;
use support::*;

struct ClusterBench {
    targets: Targets,
    // Dropped in this order: the proxies before their upstreams.
    _proxies: Vec<Proxy>,
    _reference: RedisServer,
    _clusters: Vec<Cluster>,
}

impl ClusterBench {
    fn new() -> ClusterBench {
        let (reference, (a, b)) = std::thread::scope(|s| {
            let a = s.spawn(|| Cluster::start(3));
            let b = s.spawn(|| Cluster::start(3));
            let reference = RedisServer::start();
            (reference, (a.join().unwrap(), b.join().unwrap()))
        });
        // Blocking commands time out on the server's clock tick (`hz`, 10
        // by default: a 0.1 s timeout takes up to 0.2 s); the blocking
        // script has a dozen of them per run.
        for n in a.nodes.iter().chain(&b.nodes).chain([&reference]) {
            let _: () = redis::cmd("CONFIG")
                .arg(&["SET", "hz", "100"][..])
                .query(&mut n.conn())
                .unwrap();
        }
        // What a node itself answers to keys in two slots (a: 15495, b: 3300).
        let own = Raw::connect(a.nodes[0].port, "node").cmd("MSETNX a 1 b 2");
        assert_eq!(show(&own), show(CROSSSLOT));
        let plain = Proxy::with_config(test_config(&a.url()));
        let mut cfg = test_config(&b.url());
        cfg.cache.policies.clear();
        cfg.cache.default_ttl = Some(Duration::from_secs(60));
        let cached = Proxy::with_config(cfg);
        cached.wait_serving();
        ClusterBench {
            targets: Targets {
                list: vec![
                    ("redis", reference.port),
                    ("nearcache-cluster", plain.port),
                    ("nearcache-cluster-cache-all", cached.port),
                ],
                cluster: true,
            },
            _proxies: vec![plain, cached],
            _reference: reference,
            _clusters: vec![a, b],
        }
    }
}

/// The scripts that run in front of a cluster; prints what is left out and why.
fn cluster_scripts() -> Vec<Script> {
    let (run, out): (Vec<Script>, Vec<Script>) = scripts()
        .into_iter()
        .partition(|s| s.not_in_cluster.is_none());
    for s in &out {
        eprintln!("script {} left out: {}", s.name, s.not_in_cluster.unwrap());
    }
    for s in &run {
        for l in s.lines.iter().map(|l| expand(l)) {
            let (d, cmd) = directives(&l);
            if let Some(why) = d.nocluster {
                eprintln!("[{}] {cmd}: left out: {why}", s.name);
            }
        }
    }
    run
}

#[test]
fn raw_replies_through_nearcache_to_a_cluster_match_a_single_redis() {
    let started = Instant::now();
    let bench = ClusterBench::new();
    let mut all = Vec::new();
    for script in cluster_scripts().iter() {
        for proto in [2, 3] {
            all.extend(run_raw(&bench.targets, script, proto, false));
            if pipelinable(script) {
                all.extend(run_raw(&bench.targets, script, proto, true));
            }
        }
    }
    eprintln!("raw cluster differential: {:?}", started.elapsed());
    report(all);
}

#[test]
fn redis_crate_values_through_nearcache_to_a_cluster_match_a_single_redis() {
    let started = Instant::now();
    let bench = ClusterBench::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut all = Vec::new();
    for script in cluster_scripts().iter().filter(|s| s.typed) {
        for proto in [2, 3] {
            all.extend(run_sync(&bench.targets, script, proto));
            // WATCH across two multiplexed connections is not meaningful: skip scripts with @other.
            if pipelinable(script) {
                all.extend(run_pipe(&bench.targets, script, proto));
                all.extend(rt.block_on(run_async(&bench.targets, script, proto)));
            }
        }
    }
    eprintln!("typed cluster differential: {:?}", started.elapsed());
    report(all);
}
