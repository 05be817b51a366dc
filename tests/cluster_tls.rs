//! Redis Cluster upstream with TLS and with an ACL user, against real
//! clusters: `rediss-cluster://` in front of a TLS-only 3-master cluster
//! (`tests/support/tls_cluster.rs`: `--port 0`, `--tls-cluster yes`, client
//! certificates required), and `redis-cluster://app:secret@…` in front of a
//! plain 3-master cluster whose default user needs a password. nearcache
//! runs in-process in pass-through mode (L1 off, as for every cluster
//! upstream), reached by a plain `redis` crate client.

mod support;

use std::time::Duration;

use nearcache::upstream::cluster::slots::slot;
use nearcache::upstream::cluster::topology::fetch;
use nearcache::upstream::Connector;
use support::cluster::Cluster;
use support::tls_cluster::TlsCluster;
use support::*;

/// A config through the TOML schema (so `[upstream.tls]` and the URL's
/// scheme are resolved as for a real deployment): ephemeral ports, the
/// given upstream and `[upstream.tls]` keys.
fn config(url: &str, tls: &str) -> nearcache::Config {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\
         [upstream]\nurl = \"{url}\"\ncommand_timeout = \"5s\"\nconnect_timeout = \"2s\"\n\
         [upstream.tls]\n{tls}"
    );
    nearcache::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A connection to nearcache whose reads give up after 15 s, so that a hang
/// fails the test instead of blocking it.
fn conn(p: &Proxy) -> redis::Connection {
    let c = p.conn();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c
}

/// `rediss-cluster://` in front of a cluster that speaks TLS only: the slot
/// map is learnt over TLS (CLUSTER SLOTS asked over TLS names the TLS
/// ports), nearcache's writes land on all three masters (read back on the
/// owner over TLS), MGET across slots comes back in key order. The same
/// seeds as `redis-cluster://` (plain TCP to the TLS ports) fail promptly
/// with an error saying so.
#[test]
fn rediss_cluster_serves_every_master_over_tls() {
    let cluster = TlsCluster::start(3);
    let tls = cluster.pki.upstream_tls_toml();
    let url = cluster.url("rediss-cluster");
    let cfg = config(&url, &tls);

    // The slot map, asked of the seeds over TLS with nearcache's own
    // connector: every master by its TLS port, the owners as the nodes say.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connector = Connector::new(cfg.upstream.clone()).unwrap();
    let t = rt
        .block_on(fetch(&connector, &cluster.addresses(), None))
        .expect("the slot map over TLS");
    assert_eq!(t.covered(), 16384);
    assert_eq!(t.masters(), cluster.addresses().as_slice());
    for (s, e, port) in cluster.owners_seen_by(cluster.nodes[1].tls_port) {
        for probe in [s, e] {
            assert_eq!(
                t.owner(probe),
                Some(format!("127.0.0.1:{port}").as_str()),
                "slot {probe}"
            );
        }
    }
    for n in &cluster.nodes {
        assert!(t.epoch(&format!("127.0.0.1:{}", n.tls_port)) > 0);
    }

    let proxy = Proxy::with_config(cfg);
    let mut c = conn(&proxy);
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let key = format!("tls:{i}");
        let _: () = redis::cmd("SET").arg(&key).arg(i).query(&mut c).unwrap();
        let back: i64 = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        assert_eq!(back, i);
        let owner = cluster.owner_of(&key);
        assert_eq!(
            cluster.cli(owner, &["GET", &key]).trim(),
            i.to_string(),
            "{key} on its owner {owner}"
        );
        used.insert(owner);
    }
    assert_eq!(used.len(), 3, "the keys reached every master");
    let keys = ["tls:7", "tls:3", "tls:none", "tls:21", "tls:0", "tls:12"];
    let slots: std::collections::HashSet<u16> = keys.iter().map(|k| slot(k.as_bytes())).collect();
    assert!(slots.len() >= 5, "MGET across slots");
    let got: Vec<Option<i64>> = redis::cmd("MGET").arg(&keys[..]).query(&mut c).unwrap();
    assert_eq!(got, [Some(7), Some(3), None, Some(21), Some(0), Some(12)]);
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 30, "DBSIZE summed over the three masters");
    drop(proxy);

    // The same seeds without TLS: a plain connection to a TLS port gets no
    // answer Redis would give; nearcache must say it cannot reach the
    // cluster, promptly, not hang.
    let plain = url.replacen("rediss-cluster://", "redis-cluster://", 1);
    let proxy = Proxy::with_config_no_wait(config(&plain, &tls));
    let e = error_saying(&proxy, "tls:1", "not known yet: ");
    eprintln!("redis-cluster:// to TLS ports: {e}");
    for n in &cluster.nodes {
        assert!(e.contains(&n.tls_port.to_string()), "{e}");
    }
    assert_eq!(proxy.http_get("/readyz").0, 503, "not ready without a map");
}

/// Every node's certificate is checked against the host nearcache dials
/// for it, not against the first seed's: the seed is given as `localhost`
/// (its certificate names `localhost` and `127.0.0.1`), the other two
/// nodes' certificates name `127.0.0.1` only, and `CLUSTER SLOTS` names
/// every node by IP. Writes reach all three masters. A seed dialled as
/// `localhost` whose certificate does not name it is refused, saying so.
#[test]
fn every_node_is_verified_against_the_host_dialled() {
    let cluster = TlsCluster::start_with_names(&[
        &["localhost", "127.0.0.1"],
        &["127.0.0.1"],
        &["127.0.0.1"],
    ]);
    let tls = cluster.pki.upstream_tls_toml();
    let both = cluster
        .nodes
        .iter()
        .find(|n| n.names.len() == 2)
        .unwrap()
        .tls_port;
    let ip_only = cluster
        .nodes
        .iter()
        .find(|n| n.names.len() == 1)
        .unwrap()
        .tls_port;

    let proxy = Proxy::with_config(config(&format!("rediss-cluster://localhost:{both}"), &tls));
    let mut c = conn(&proxy);
    sets_reach_every_master(&cluster, &mut c, "name");
    drop(proxy);

    let proxy = Proxy::with_config_no_wait(config(
        &format!("rediss-cluster://localhost:{ip_only}"),
        &tls,
    ));
    let e = error_saying(&proxy, "name:1", "not valid for name");
    eprintln!("a seed whose certificate does not name the host dialled: {e}");
    assert!(e.contains(&format!("localhost:{ip_only}")), "{e}");
}

/// Nodes announced by hostname over TLS (`cluster-announce-hostname` with
/// `cluster-preferred-endpoint-type hostname`, as managed clusters with TLS
/// and Kubernetes operators announce them): every certificate names
/// `localhost` only, never the IP, so each node is verified against the
/// hostname the map names it by. A plain client reaches all three masters
/// through nearcache, MGET across slots included.
#[test]
fn nodes_announced_by_hostname_are_verified_against_that_name() {
    let cluster = TlsCluster::start_with_names(&[&["localhost"], &["localhost"], &["localhost"]]);
    for n in &cluster.nodes {
        for (name, value) in [
            ("cluster-announce-hostname", "localhost"),
            ("cluster-preferred-endpoint-type", "hostname"),
        ] {
            assert_eq!(
                cluster
                    .cli(n.tls_port, &["CONFIG", "SET", name, value])
                    .trim(),
                "OK"
            );
        }
    }
    wait_until(
        "every node names the others by hostname",
        Duration::from_secs(10),
        || {
            cluster.nodes.iter().all(|n| {
                let slots = cluster.cli(n.tls_port, &["CLUSTER", "SLOTS"]);
                // Each master's entry starts with its endpoint (its IP goes
                // to the entry's metadata).
                slots.matches("localhost").count() == 3
            })
        },
    );
    let tls = cluster.pki.upstream_tls_toml();
    let seed = cluster.nodes[0].tls_port;
    let proxy = Proxy::with_config(config(&format!("rediss-cluster://localhost:{seed}"), &tls));
    let mut c = conn(&proxy);
    sets_reach_every_master(&cluster, &mut c, "host");
    let keys = ["host:7", "host:3", "host:none", "host:21", "host:0"];
    let got: Vec<Option<i64>> = redis::cmd("MGET").arg(&keys[..]).query(&mut c).unwrap();
    assert_eq!(got, [Some(7), Some(3), None, Some(21), Some(0)]);
}

/// `SET <prefix>:<i> i` for 30 keys through `c`: each read back on its
/// owner over TLS, and the keys reach all three masters.
fn sets_reach_every_master(cluster: &TlsCluster, c: &mut redis::Connection, prefix: &str) {
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let key = format!("{prefix}:{i}");
        let _: () = redis::cmd("SET").arg(&key).arg(i).query(c).unwrap();
        let owner = cluster.owner_of(&key);
        assert_eq!(cluster.cli(owner, &["GET", &key]).trim(), i.to_string());
        used.insert(owner);
    }
    assert_eq!(used.len(), 3, "the keys reached every master");
}

/// A cluster whose default user needs a password and an ACL user `app` on
/// every node: `redis-cluster://app:secret@…` reads the slot map and
/// writes to all three masters as `app`; a wrong password fails every
/// request promptly with the node's WRONGPASS, without the password.
#[test]
fn acl_user_reaches_every_master_and_a_wrong_password_fails_clearly() {
    let cluster = Cluster::start(3);
    let keys: Vec<String> = (0..30).map(|i| format!("acl:{i}")).collect();
    // Owners looked up while the default user still works.
    let owners: Vec<u16> = keys.iter().map(|k| cluster.owner_of(k).port).collect();
    assert_eq!(
        owners
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        3
    );
    for n in &cluster.nodes {
        let mut admin = n.conn();
        redis::cmd("ACL")
            .arg(&["SETUSER", "app", "on", ">secret", "~*", "&*", "+@all"][..])
            .exec(&mut admin)
            .unwrap();
        redis::cmd("CONFIG")
            .arg(&["SET", "requirepass", "adminpw"][..])
            .exec(&mut admin)
            .unwrap();
        // Nothing works by accident as the default user any more.
        let e = redis::cmd("GET")
            .arg("acl:0")
            .query::<Option<String>>(&mut n.conn())
            .unwrap_err();
        assert_eq!(e.code(), Some("NOAUTH"), "{e}");
    }
    let as_app = |port: u16| {
        redis::Client::open(format!("redis://app:secret@127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap()
    };
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let seeds = seeds.join(",");

    let proxy = Proxy::with_config(config(&format!("redis-cluster://app:secret@{seeds}"), ""));
    let mut c = conn(&proxy);
    let who: String = redis::cmd("ACL").arg("WHOAMI").query(&mut c).unwrap();
    assert_eq!(who, "app");
    for (i, (key, owner)) in keys.iter().zip(&owners).enumerate() {
        let _: () = redis::cmd("SET").arg(key).arg(i).query(&mut c).unwrap();
        let back: usize = redis::cmd("GET").arg(key).query(&mut c).unwrap();
        assert_eq!(back, i);
        let direct: usize = redis::cmd("GET")
            .arg(key)
            .query(&mut as_app(*owner))
            .unwrap();
        assert_eq!(direct, i, "{key} on its owner {owner}");
    }
    let got: Vec<Option<usize>> = redis::cmd("MGET")
        .arg(&["acl:5", "acl:nope", "acl:17", "acl:2"][..])
        .query(&mut c)
        .unwrap();
    assert_eq!(got, [Some(5), None, Some(17), Some(2)]);
    drop(proxy);

    // A wrong password: every request fails, promptly, saying why.
    let proxy =
        Proxy::with_config_no_wait(config(&format!("redis-cluster://app:wrong-pw@{seeds}"), ""));
    let e = error_saying(&proxy, "acl:1", "WRONGPASS");
    eprintln!("wrong password: {e}");
    assert!(!e.contains("wrong-pw"), "the password leaked: {e}");
    // Still so later (the refresh backing off keeps the reason).
    error_saying(&proxy, "acl:2", "WRONGPASS");
    assert_eq!(proxy.http_get("/readyz").0, 503, "not ready without a map");
}
