//! Replica reads (`replica_reads`, issue 13) against a real 3-master,
//! 3-replica cluster (`tests/support/cluster.rs`, `cluster-node-timeout`
//! 2 s): which commands reach replicas (counted by each node's own `INFO
//! commandstats`), that L1 fills and writes stay on masters, that nothing
//! reaches a replica with the flag off, and that a replica killed under a
//! read sends it back to the master at once.

mod support;

use std::time::{Duration, Instant};

use nearcache::upstream::cluster::router::Router;
use nearcache::upstream::cluster::view::ClusterView;
use nearcache::upstream::Connector;
use support::cluster::{assign_slot, begin_slot_move, Cluster};
use support::*;

/// `(master, its replica)` for every master, by `ROLE`.
fn pairs(cluster: &Cluster) -> Vec<(&RedisServer, &RedisServer)> {
    let role = |n: &RedisServer| -> (String, u16) {
        let r: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.conn()).unwrap();
        match (&r[0], r.get(2)) {
            (redis::Value::BulkString(s), Some(redis::Value::Int(p))) if s == b"slave" => {
                ("slave".into(), *p as u16)
            }
            (redis::Value::BulkString(s), _) => (String::from_utf8_lossy(s).into_owned(), 0),
            _ => panic!("ROLE"),
        }
    };
    let roles: Vec<(String, u16)> = cluster.nodes.iter().map(role).collect();
    let mut out = Vec::new();
    for (n, (r, _)) in cluster.nodes.iter().zip(&roles) {
        if r == "master" {
            let (replica, _) = cluster
                .nodes
                .iter()
                .zip(&roles)
                .find(|(_, (r, p))| r == "slave" && *p == n.port)
                .expect("a replica of every master");
            out.push((n, replica));
        }
    }
    assert_eq!(out.len(), 3, "three masters");
    out
}

/// A 3-master, 3-replica cluster whose replicas have synced and that every
/// node lists in `CLUSTER SLOTS` (so nearcache's first map has them).
fn cluster_with_replicas() -> Cluster {
    let cluster = Cluster::start_with_replicas(3, 1);
    for (_, replica) in pairs(&cluster) {
        wait_until("the replica's link is up", Duration::from_secs(30), || {
            info_field(replica, "replication", "master_link_status") == "up"
        });
    }
    wait_until(
        "every node lists a replica for every range",
        Duration::from_secs(30),
        || {
            cluster.nodes.iter().all(|n| {
                let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query(&mut n.conn())
                    .unwrap();
                ranges
                    .iter()
                    .all(|r| matches!(r, redis::Value::Array(f) if f.len() == 4))
            })
        },
    );
    cluster
}

/// Every write made so far on each master has reached its replica: a write
/// of our own on the master, then `WAIT 1` (replication is one ordered
/// stream, so the earlier writes, made through nearcache, are in it).
fn replicated(cluster: &Cluster) {
    for (master, _) in pairs(cluster) {
        let mut c = master.conn();
        // A key of a slot this master owns, so the node accepts the write.
        let tag = (0..)
            .map(|i| format!("wait:{i}"))
            .find(|k| cluster.owner_of(k).port == master.port)
            .unwrap();
        let _: () = redis::cmd("SET").arg(&tag).arg("1").query(&mut c).unwrap();
        let acked: i64 = redis::cmd("WAIT").arg(1).arg(5000).query(&mut c).unwrap();
        assert_eq!(acked, 1, "the replica of {} acknowledged", master.port);
    }
}

/// Calls of `cmd` on each node of `nodes`.
fn calls(nodes: &[&RedisServer], cmd: &str) -> Vec<u64> {
    nodes.iter().map(|n| cmdstat(n, cmd)).collect()
}

/// Calls of `cmd` a node refused (`rejected_calls`: a MOVED, a wrong arity…).
fn rejected(node: &RedisServer, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut node.conn())
        .unwrap();
    info.lines()
        .find(|l| l.starts_with(&format!("cmdstat_{cmd}:")))
        .and_then(|l| l.split("rejected_calls=").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn proxy_with(cluster: &Cluster, replica_reads: bool) -> Proxy {
    let mut cfg = test_config(&cluster.url());
    cfg.cache.invalidation = nearcache::config::InvalidationMode::Tracking;
    cfg.upstream.cluster.replica_reads = replica_reads;
    cfg.upstream.cluster.refresh_interval = Duration::from_secs(1);
    let p = Proxy::with_config(cfg);
    p.wait_serving();
    p
}

/// With `replica_reads`: reads L1 does not serve (keys outside the
/// policies) are answered by replicas with the right values (after `WAIT`)
/// while the masters see none of them; STRLEN (any command flagged
/// `readonly`) and the parts of an MGET across slots too; writes go to masters (no replica
/// refuses one); a cacheable read's L1 fill comes from the master, and
/// then L1 serves it.
#[test]
fn forwarded_reads_go_to_replicas_while_fills_and_writes_stay_on_masters() {
    let cluster = cluster_with_replicas();
    let pairs = pairs(&cluster);
    let masters: Vec<&RedisServer> = pairs.iter().map(|p| p.0).collect();
    let replicas: Vec<&RedisServer> = pairs.iter().map(|p| p.1).collect();
    let proxy = proxy_with(&cluster, true);
    let mut c = proxy.conn();

    let keys = cluster.keys_on_every_master("rr:");
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    replicated(&cluster);

    // The replicas' pools come up on their first reads.
    wait_until("reads reach every replica", Duration::from_secs(10), || {
        for k in &keys {
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            assert_eq!(&v, k);
        }
        replicas.iter().all(|r| cmdstat(r, "get") > 0)
    });
    // Writes, with the replicas' pools up: on the masters, never tried on
    // a replica first (it would refuse them with a MOVED).
    let sets: u64 = calls(&masters, "set").iter().sum();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    let after: u64 = calls(&masters, "set").iter().sum();
    assert_eq!(after - sets, keys.len() as u64, "SETs on masters");
    for r in &replicas {
        assert_eq!(rejected(r, "set"), 0, "no SET sent to replica {}", r.port);
    }
    replicated(&cluster);
    let (m0, r0) = (calls(&masters, "get"), calls(&replicas, "get"));
    let rounds = 5;
    for _ in 0..rounds {
        for k in &keys {
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            assert_eq!(&v, k, "read from a replica");
        }
    }
    assert_eq!(
        calls(&masters, "get"),
        m0,
        "no forwarded read reached a master"
    );
    let r1 = calls(&replicas, "get");
    for (i, r) in replicas.iter().enumerate() {
        // Two keys per master, one replica each.
        assert_eq!(r1[i] - r0[i], 2 * rounds, "GETs on replica {}", r.port);
    }
    // A pipeline of reads, written to replicas as they are read.
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("GET").arg(k);
    }
    let back: Vec<String> = p.query(&mut c).unwrap();
    assert_eq!(back, keys);
    // Any command the cluster flags readonly: STRLEN on replicas too.
    let strlen0 = calls(&replicas, "strlen");
    for k in &keys {
        let n: usize = redis::cmd("STRLEN").arg(k).query(&mut c).unwrap();
        assert_eq!(n, k.len());
    }
    assert_eq!(
        calls(&replicas, "strlen").iter().sum::<u64>() - strlen0.iter().sum::<u64>(),
        keys.len() as u64,
        "STRLEN on replicas"
    );
    assert_eq!(calls(&masters, "strlen"), vec![0; 3]);
    assert_eq!(
        calls(&masters, "get"),
        m0,
        "no forwarded read reached a master"
    );
    // MGET across slots while L1 serves, of keys outside the policies:
    // every part on a replica.
    let mget0 = calls(&replicas, "mget");
    let all: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
    assert_eq!(all, keys);
    let mget1 = calls(&replicas, "mget");
    assert!(
        mget1.iter().zip(&mget0).all(|(a, b)| a > b),
        "MGET parts on every replica: {mget0:?} -> {mget1:?}"
    );
    assert_eq!(
        calls(&masters, "mget"),
        vec![0; 3],
        "no MGET part on a master"
    );

    // Cacheable keys (`ind:*`): the fill is read on the master (PTTL + GET
    // as one job), never on a replica, and then L1 answers.
    let cached = cluster.keys_on_every_master("ind:rr");
    for k in &cached {
        let _: () = redis::cmd("SET").arg(k).arg("v1").query(&mut c).unwrap();
    }
    replicated(&cluster);
    for k in &cached {
        let owner = cluster.owner_of(k);
        let i = masters.iter().position(|m| m.port == owner.port).unwrap();
        let (mg, rg) = (cmdstat(owner, "get"), cmdstat(replicas[i], "get"));
        let hits = proxy.stat("hits");
        wait_until(
            &format!("{k} served from L1"),
            Duration::from_secs(5),
            || {
                let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
                assert_eq!(v, "v1", "{k}");
                proxy.stat("hits") > hits
            },
        );
        assert!(cmdstat(owner, "get") > mg, "{k}: filled from its master");
        assert_eq!(
            cmdstat(replicas[i], "get"),
            rg,
            "{k}: never read on a replica"
        );
        assert!(cmdstat(owner, "pttl") > 0);
    }
}

/// With the flag off (the default), no command reaches a replica: the
/// same reads (GET, STRLEN, MGET across slots with L1 not in the way) are
/// all answered by masters.
#[test]
fn with_replica_reads_off_nothing_reaches_replicas() {
    let cluster = cluster_with_replicas();
    let pairs = pairs(&cluster);
    let masters: Vec<&RedisServer> = pairs.iter().map(|p| p.0).collect();
    let replicas: Vec<&RedisServer> = pairs.iter().map(|p| p.1).collect();
    let proxy = proxy_with(&cluster, false);
    let mut c = proxy.conn();
    let keys = cluster.keys_on_every_master("rr:");
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    replicated(&cluster);
    let before: Vec<u64> = calls(&masters, "get");
    let reads: Vec<(String, u64)> = ["get", "strlen", "mget"]
        .iter()
        .map(|cmd| (cmd.to_string(), calls(&replicas, cmd).iter().sum()))
        .collect();
    for _ in 0..5 {
        for k in &keys {
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            assert_eq!(&v, k);
            let n: usize = redis::cmd("STRLEN").arg(k).query(&mut c).unwrap();
            assert_eq!(n, k.len());
        }
        let all: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
        assert_eq!(all, keys);
    }
    let grown: u64 = calls(&masters, "get").iter().sum::<u64>() - before.iter().sum::<u64>();
    assert_eq!(grown, 5 * keys.len() as u64, "every GET on a master");
    for (cmd, n) in reads {
        assert_eq!(
            calls(&replicas, &cmd).iter().sum::<u64>(),
            n,
            "no {cmd} reached a replica"
        );
    }
}

/// A replica SIGKILLed while a read is in flight on it (stopped first, so
/// the read is surely waiting there): that read is resent to the master
/// and answered with the right value, well within `command_timeout`; the
/// reads after it go to the master at once. MGET across slots with L1 not
/// serving goes to replicas too. Once the cluster marks the replica failed,
/// the map drops it and its pools are closed.
#[test]
fn a_killed_replica_sends_reads_back_to_the_master_promptly() {
    let mut cluster = cluster_with_replicas();
    let (master_port, replica_port, others) = {
        let pairs = pairs(&cluster);
        let others: Vec<u16> = pairs[1..].iter().map(|p| p.1.port).collect();
        (pairs[0].0.port, pairs[0].1.port, others)
    };
    // L1 off: every read is a forwarded one, MGET included.
    let mut cfg = test_config(&cluster.url());
    cfg.upstream.cluster.replica_reads = true;
    cfg.upstream.cluster.refresh_interval = Duration::from_secs(1);
    cfg.cache.enabled = false;
    let upstream = cfg.upstream.clone();
    cfg.upstream.command_timeout = Duration::from_millis(2000);
    cfg.upstream.connect_timeout = Duration::from_millis(300);
    let proxy = Proxy::with_config(cfg);
    let mut c = proxy.conn();
    let keys = cluster.keys_on_every_master("rk:");
    let mine: Vec<String> = keys
        .iter()
        .filter(|k| cluster.owner_of(k).port == master_port)
        .cloned()
        .collect();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    replicated(&cluster);
    let replica = cluster.node(replica_port);
    wait_until("reads reach the replica", Duration::from_secs(10), || {
        let v: String = redis::cmd("GET").arg(&mine[0]).query(&mut c).unwrap();
        assert_eq!(v, mine[0]);
        cmdstat(replica, "get") > 0
    });
    // MGET across slots, L1 off: split by slot, each part on a replica.
    let mgets: u64 = others
        .iter()
        .map(|p| cmdstat(cluster.node(*p), "mget"))
        .sum();
    let all: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut c).unwrap();
    assert_eq!(all, keys);
    let after: u64 = others
        .iter()
        .map(|p| cmdstat(cluster.node(*p), "mget"))
        .sum();
    assert!(after >= mgets + 2, "MGET parts on the other replicas");

    // A router of our own, to see its replica pools: it reads from every
    // replica (a pool each), the victim's included.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connector = Connector::new(upstream).unwrap();
    let router = rt.block_on(async {
        let router = Router::new(ClusterView::start(connector.clone()), connector);
        assert!(router.replica_reads());
        let deadline = Instant::now() + Duration::from_secs(10);
        let table = loop {
            if let Ok(t) = router.commands().await {
                break t;
            }
            assert!(Instant::now() < deadline, "no command table");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The rules: readonly reads yes; writes, blocking and scripts no.
        let args = |s: &str| -> Vec<bytes::Bytes> {
            s.split(' ')
                .map(|a| bytes::Bytes::copy_from_slice(a.as_bytes()))
                .collect()
        };
        for (cmd, ok) in [
            ("GET k", true),
            ("MGET a b", true),
            ("HGETALL h", true),
            ("SET k v", false),
            ("BLPOP k 0", false),
            ("EVAL_RO s 1 k", false),
            ("FCALL_RO f 1 k", false),
        ] {
            let info = table.lookup(&args(cmd)).unwrap();
            assert_eq!(router.replica_ok(&info), ok, "{cmd}");
        }
        loop {
            for k in &keys {
                let slot = nearcache::upstream::cluster::slots::slot(k.as_bytes());
                let request = nearcache::protocol::command(["GET", k.as_str()]);
                let r = router.send_after(2, slot, request, 0, None, true).await;
                assert_eq!(
                    &r.unwrap().bytes[..],
                    format!("${}\r\n{k}\r\n", k.len()).as_bytes()
                );
            }
            if router.pooled_replicas().len() == 3 {
                break router;
            }
            assert!(Instant::now() < deadline, "pools to every replica");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let gone = format!("127.0.0.1:{replica_port}");
    assert!(router.pooled_replicas().contains(&gone));

    // A read waiting on the stopped replica when it is killed.
    replica.signal("STOP");
    let client = proxy.client();
    let key = mine[0].clone();
    let reader = std::thread::spawn(move || {
        let mut c = client.get_connection().unwrap();
        let started = Instant::now();
        let v: redis::RedisResult<String> = redis::cmd("GET").arg(&key).query(&mut c);
        (v, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let master_gets = cmdstat(cluster.node(master_port), "get");
    let killed_at = Instant::now();
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == replica_port)
        .unwrap()
        .kill();
    let (v, took) = reader.join().unwrap();
    eprintln!(
        "read in flight: answered {:?} after the kill, {took:?} in all",
        killed_at.elapsed()
    );
    assert_eq!(v.expect("the read in flight is answered"), mine[0]);
    assert!(
        killed_at.elapsed() < Duration::from_millis(1500),
        "answered {:?} after the kill ({took:?} in all)",
        killed_at.elapsed()
    );
    assert!(
        cmdstat(cluster.node(master_port), "get") > master_gets,
        "resent to the master"
    );
    // The reads after it: the master, at once, every one right.
    for _ in 0..20 {
        for k in &mine {
            let started = Instant::now();
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            assert_eq!(&v, k);
            let took = started.elapsed();
            assert!(took < Duration::from_millis(500), "{k}: {took:?}");
        }
    }

    // Once the cluster marks it failed, Redis leaves it out of CLUSTER
    // SLOTS: the map drops it and the router closes its pools.
    wait_until(
        "the failed replica leaves the map and its pools are closed",
        Duration::from_secs(30),
        || {
            let listed = router
                .view()
                .current()
                .is_some_and(|t| t.all_replicas().contains(&gone));
            !listed && !router.pooled_replicas().contains(&gone)
        },
    );
    assert_eq!(
        router.pooled_replicas().len(),
        2,
        "the live replicas' pools stay"
    );
    router.stop();
    // And nearcache itself still answers from the master.
    for k in &mine {
        let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
        assert_eq!(&v, k);
    }
}

/// A replica that answers `MOVED` (its master gave the slot away, and
/// nearcache's map does not know yet): the read follows it to the new
/// owner, the map is updated, and the right value comes back.
#[test]
fn a_moved_from_a_replica_is_followed_to_the_new_owner() {
    let cluster = cluster_with_replicas();
    let pairs = pairs(&cluster);
    let key = "mv:{a}1";
    let s = nearcache::upstream::cluster::slots::slot(key.as_bytes());
    let from = cluster.owner_of(key);
    let (_, from_replica) = *pairs.iter().find(|p| p.0.port == from.port).unwrap();
    let to = pairs
        .iter()
        .map(|p| p.0)
        .find(|m| m.port != from.port)
        .unwrap();
    let mut cfg = test_config(&cluster.url());
    cfg.upstream.cluster.replica_reads = true;
    // Nothing but the MOVED tells the router of the move.
    cfg.upstream.cluster.refresh_interval = Duration::from_secs(600);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let connector = Connector::new(cfg.upstream).unwrap();
    let router =
        rt.block_on(async { Router::new(ClusterView::start(connector.clone()), connector) });
    let get = |router: &Router| {
        rt.block_on(async {
            let request = nearcache::protocol::command(["GET", key]);
            router
                .send_after(2, s, request, 0, None, true)
                .await
                .map(|r| r.bytes)
        })
    };
    wait_until("the router has a map", Duration::from_secs(10), || {
        router.view().current().is_some()
    });
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("v1")
        .query(&mut from.conn())
        .unwrap();
    replicated(&cluster);
    wait_until(
        "the read reaches the replica",
        Duration::from_secs(10),
        || {
            let r = get(&router).unwrap();
            assert_eq!(&r[..], b"$2\r\nv1\r\n");
            cmdstat(from_replica, "get") > 0
        },
    );

    // The slot moves to another master; its old master's replica learns it.
    begin_slot_move(s, from, to);
    let _: () = redis::cmd("MIGRATE")
        .arg(&["127.0.0.1", &to.port.to_string(), key, "0", "5000"][..])
        .query(&mut from.conn())
        .unwrap();
    assign_slot(s, to, pairs.iter().map(|p| p.0));
    wait_until(
        "the old master's replica sees the new owner",
        Duration::from_secs(20),
        || {
            let r: redis::RedisResult<String> =
                redis::cmd("GET").arg(key).query(&mut from_replica.conn());
            r.is_err_and(|e| e.to_string().contains(&to.port.to_string()))
        },
    );
    let owner = |router: &Router| {
        router
            .view()
            .current()
            .unwrap()
            .owner(s)
            .map(str::to_string)
    };
    assert_eq!(owner(&router), Some(format!("127.0.0.1:{}", from.port)));
    let rejected_before = rejected(from_replica, "get");
    let to_gets = cmdstat(to, "get");
    assert_eq!(&get(&router).unwrap()[..], b"$2\r\nv1\r\n");
    assert_eq!(
        rejected(from_replica, "get"),
        rejected_before + 1,
        "the replica answered MOVED"
    );
    assert_eq!(cmdstat(to, "get"), to_gets + 1, "the new owner answered");
    assert_eq!(owner(&router), Some(format!("127.0.0.1:{}", to.port)));
    router.stop();
}
