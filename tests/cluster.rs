//! Redis Cluster upstream (issue 13) against a real 3-master cluster
//! (`tests/support/cluster.rs`). What is tested here is what exists so far
//! (see `docs/cluster.md`): the slot map read from the seeds, its refresher,
//! redirects as nodes send them, the cluster's own key specs, the router
//! (redirects, cross-slot split/merge), and nearcache in pass-through mode
//! (L1 off) in front of the cluster with a plain, non-cluster client.

mod support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nearcache::net::FrameReader;
use nearcache::upstream::cluster::commands::CommandTable;
use nearcache::upstream::cluster::router::Router;
use nearcache::upstream::cluster::slots::slot;
use nearcache::upstream::cluster::topology::{
    claims_of, claims_of_shards, fetch, Claim, Redirect, Topology,
};
use nearcache::upstream::cluster::view::ClusterView;
use nearcache::upstream::{Connector, Login};
use support::cluster::{assign_slot, begin_slot_move, Cluster};
use support::*;
use tokio::io::AsyncWriteExt;

fn connector(url: &str) -> Connector {
    Connector::new(test_config(url).upstream).unwrap()
}

fn addr(node: &RedisServer) -> String {
    format!("127.0.0.1:{}", node.port)
}

/// One command's raw reply from `addr`.
async fn raw(c: &Connector, addr: &str, args: &[&str]) -> Bytes {
    raw_in(c, addr, 2, args).await
}

/// [`raw`] on a connection in RESP `proto`.
async fn raw_in(c: &Connector, addr: &str, proto: u8, args: &[&str]) -> Bytes {
    let conn = c
        .connect_to(addr, proto, &Login::Configured, false)
        .await
        .unwrap();
    let mut stream = conn.stream;
    stream
        .write_all(&nearcache::protocol::command(args.iter().copied()))
        .await
        .unwrap();
    FrameReader::new(stream, conn.leftover)
        .next()
        .await
        .unwrap()
        .bytes
}

/// A seed that answers with a map of its own (a node cut off from the
/// cluster: here a lone node owning every slot at config epoch 0), listed
/// first: its answer is merged with a real master's at startup and loses
/// to the higher epochs, so the view never names it and every write
/// reaches the real owner, through many refreshes (which ask the known
/// masters first).
#[test]
fn a_seed_answering_a_stale_map_never_takes_the_view() {
    let cluster = Cluster::start(3);
    let stale = support::cluster::lone_node_owning_every_slot();
    // Asked three at a time until two answer: the first round is the stale
    // node, one real master and a dead port, so the two answers tie on
    // numbers and only the config epochs decide.
    let mut cfg = test_config(&format!(
        "redis-cluster://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{},{}",
        stale.port,
        cluster.nodes[0].port,
        free_port(),
        cluster.url().trim_start_matches("redis-cluster://")
    ));
    cfg.upstream.cluster.refresh_interval = Duration::from_millis(50);
    let proxy = Proxy::with_config(cfg);
    let mut c = proxy.conn();
    let keys = cluster.keys_on_every_master("stale:");
    for round in 0..10 {
        for k in &keys {
            let v = format!("{k}-{round}");
            let _: () = redis::cmd("SET").arg(k).arg(&v).query(&mut c).unwrap();
            let on_owner: String = redis::cmd("GET")
                .arg(k)
                .query(&mut cluster.owner_of(k).conn())
                .unwrap();
            assert_eq!(on_owner, v, "round {round}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let held: i64 = redis::cmd("DBSIZE").query(&mut stale.conn()).unwrap();
    assert_eq!(held, 0, "nothing went to the stale node");
    assert!(
        cmdstat(&stale, "cluster|slots") >= 1,
        "the stale node's answer was taken and lost"
    );
}

/// Nodes announced by hostname (`cluster-announce-hostname` with
/// `cluster-preferred-endpoint-type hostname`, as in Kubernetes, where pod
/// addresses change): the map names each node `localhost:<port>`, nearcache
/// dials those names, and a plain client reaches every master through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_announced_by_hostname_are_dialled_by_it() {
    let cluster = Cluster::start(3);
    for n in &cluster.nodes {
        for (name, value) in [
            ("cluster-announce-hostname", "localhost"),
            ("cluster-preferred-endpoint-type", "hostname"),
        ] {
            let _: () = redis::cmd("CONFIG")
                .arg(&["SET", name, value][..])
                .query(&mut n.conn())
                .unwrap();
        }
    }
    // The hostnames reach every node by gossip.
    wait_until(
        "every node names the others by hostname",
        Duration::from_secs(10),
        || {
            cluster.nodes.iter().all(|n| {
            let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut n.conn()).unwrap();
            slots.iter().all(|r| matches!(r, redis::Value::Array(f)
                if matches!(&f[2], redis::Value::Array(node) if node[0] == redis::Value::BulkString(b"localhost".to_vec()))))
        })
        },
    );
    let view = started_view(&cluster).await;
    let mut want: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("localhost:{}", n.port))
        .collect();
    want.sort();
    assert_eq!(view.current().unwrap().masters(), want.as_slice());
    view.stop();

    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = proxy.conn();
    for k in cluster.keys_on_every_master("host:") {
        let _: () = redis::cmd("SET").arg(&k).arg(&k).query(&mut c).unwrap();
        let on_owner: String = redis::cmd("GET")
            .arg(&k)
            .query(&mut cluster.owner_of(&k).conn())
            .unwrap();
        assert_eq!(on_owner, k);
    }
}

/// `CLUSTER SHARDS` as a real node formats it (7.0 here; nearcache asks it
/// from Redis 8 on, where the reply has the same shape) gives the claims
/// `CLUSTER SLOTS` gives, replicas included, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shards_gives_the_claims_cluster_slots_gives() {
    let cluster = Cluster::start_with_replicas(3, 1);
    let c = connector(&cluster.url());
    let sorted = |mut claims: Vec<Claim>| {
        for claim in &mut claims {
            claim.replicas.sort();
        }
        claims.sort_by_key(|claim| claim.start);
        claims
    };
    for node in &cluster.nodes {
        let at = addr(node);
        for proto in [2, 3] {
            // A replica joins the map by gossip: ask again until both
            // answers list all three.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let shards = raw_in(&c, &at, proto, &["CLUSTER", "SHARDS"]).await;
                let slots = raw_in(&c, &at, proto, &["CLUSTER", "SLOTS"]).await;
                let from_shards = sorted(claims_of_shards(&shards, &at, &[], false).unwrap());
                let from_slots = sorted(claims_of(&slots, &at, &[]).unwrap());
                let replicas =
                    |claims: &[Claim]| claims.iter().map(|c| c.replicas.len()).sum::<usize>();
                if replicas(&from_shards) == 3 && replicas(&from_slots) == 3 {
                    assert_eq!(from_shards, from_slots, "{at}, RESP{proto}");
                    let t = Topology::merge(&[from_shards], None);
                    assert_eq!(t.covered(), 16384);
                    assert_eq!(t.masters().len(), 3);
                    break;
                }
                assert!(Instant::now() < deadline, "{at}: replicas never all listed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_map_comes_from_the_seeds_that_answer() {
    let cluster = Cluster::start(3);
    let dead = free_port();
    // The first seed is down: startup must not depend on it.
    let url = format!(
        "redis-cluster://127.0.0.1:{dead},{}",
        addr(&cluster.nodes[1])
    );
    let c = connector(&url);
    let seeds = vec![format!("127.0.0.1:{dead}"), addr(&cluster.nodes[1])];
    let t = fetch(&c, &seeds, None).await.expect("a seed answers");
    assert_eq!(t.covered(), 16384);
    let mut masters: Vec<String> = cluster.nodes.iter().map(addr).collect();
    masters.sort();
    assert_eq!(t.masters(), masters.as_slice());
    // Each master's config epoch, read from CLUSTER NODES with the map.
    for n in &cluster.nodes {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut n.conn())
            .unwrap();
        let mine: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("cluster_my_epoch:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("cluster_my_epoch");
        assert!(
            mine > 0,
            "redis-cli --cluster create gives every master an epoch"
        );
        assert_eq!(t.epoch(&addr(n)), mine, "node {}", n.port);
    }
    for i in 0..60 {
        let key = format!("key:{i}");
        let owner = addr(cluster.owner_of(&key));
        assert_eq!(t.owner(slot(key.as_bytes())), Some(owner.as_str()), "{key}");
    }
    // Only dead seeds: an error naming them, not a hang.
    let e = fetch(&c, &[format!("127.0.0.1:{dead}")], None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&dead.to_string()), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_and_ask_replies_are_read_as_nodes_send_them() {
    let cluster = Cluster::start(3);
    let c = connector(&cluster.url());
    let key = "user:1000";
    let owner = cluster.owner_of(key);
    let other = cluster.nodes.iter().find(|n| n.port != owner.port).unwrap();
    let reply = raw(&c, &addr(other), &["GET", key]).await;
    let text = String::from_utf8_lossy(&reply[1..reply.len() - 2]).into_owned();
    assert_eq!(
        Redirect::parse(&text, &addr(other)),
        Some(Redirect::Moved {
            slot: slot(key.as_bytes()),
            addr: addr(owner)
        }),
        "{text}"
    );
    // ASK: the slot is migrating from its owner and the key is not there.
    let s = slot(key.as_bytes()).to_string();
    begin_slot_move(&s, owner, other);
    let reply = raw(&c, &addr(owner), &["GET", key]).await;
    let text = String::from_utf8_lossy(&reply[1..reply.len() - 2]).into_owned();
    assert_eq!(
        Redirect::parse(&text, &addr(owner)),
        Some(Redirect::Ask {
            slot: slot(key.as_bytes()),
            addr: addr(other)
        }),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_follows_a_slot_move_and_collapses_triggers() {
    let cluster = Cluster::start(3);
    let view = ClusterView::start(connector(&cluster.url()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(t) = view.current() {
            break t;
        }
        assert!(Instant::now() < deadline, "no first view");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(first.covered(), 16384);

    // Move the (empty) slot 0 to another master on every node.
    let from = cluster.owner_of_slot(0);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    assign_slot(0, to, &cluster.nodes);
    // A burst of triggers (every client seeing the move) is one round, or
    // two when the burst straddles a round that is already running.
    let before = view.refreshes();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let v = view.clone();
            tokio::spawn(async move { v.refresh() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while view.current().unwrap().owner(0) != Some(addr(to).as_str()) {
        assert!(Instant::now() < deadline, "the view never saw the move");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rounds = view.refreshes() - before;
    assert!(
        (1..=2).contains(&rounds),
        "{rounds} refreshes for one burst"
    );
    assert_eq!(view.current().unwrap().owner(1), first.owner(1));

    // MOVED updates the map at once, before any refresh.
    let third = cluster
        .nodes
        .iter()
        .find(|n| n.port != to.port && n.port != from.port)
        .unwrap();
    let mut changes = view.subscribe();
    changes.borrow_and_update();
    view.moved(5, &addr(third));
    assert!(changes.has_changed().unwrap());
    assert_eq!(view.current().unwrap().owner(5), Some(addr(third).as_str()));
    // ...and the refresh it asks for puts the truth back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while view.current().unwrap().owner(5) != first.owner(5) {
        assert!(
            Instant::now() < deadline,
            "the refresh never corrected slot 5"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    view.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_specs_agree_with_command_getkeys() {
    let server = RedisServer::start();
    let c = connector(&server.url());
    let table = CommandTable::parse(&raw(&c, &addr(&server), &["COMMAND"]).await).expect("parses");
    assert!(table.len() > 200, "{}", table.len());
    let cases: &[&[&str]] = &[
        &["SET", "k", "v"],
        &["GET", "k"],
        &["MGET", "a", "b", "c"],
        &["MSET", "a", "1", "b", "2"],
        &["DEL", "a", "b"],
        &["EVAL", "return 1", "2", "x", "y", "z"],
        &["EVAL", "return 1", "0"],
        &["XREAD", "COUNT", "1", "STREAMS", "s1", "s2", "0", "0"],
        &["XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"],
        &["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"],
        &["LMOVE", "a", "b", "LEFT", "RIGHT"],
        &["BLMPOP", "0", "2", "a", "b", "LEFT"],
        &["RENAME", "a", "b"],
        &["SMOVE", "a", "b", "m"],
        &["BITOP", "AND", "d", "a", "b"],
        &["SINTERCARD", "2", "a", "b", "LIMIT", "1"],
        &["MEMORY", "USAGE", "k"],
        &["OBJECT", "ENCODING", "k"],
        &["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "d"],
        &["SORT", "k", "STORE", "d"],
        &["COPY", "a", "b"],
        &["LCS", "a", "b"],
        &["MSETNX", "a", "1", "b", "2"],
    ];
    let mut conn = server.conn();
    for args in cases {
        let bytes: Vec<Bytes> = args
            .iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let info = table
            .lookup(&bytes)
            .unwrap_or_else(|| panic!("{args:?} unknown"));
        let ours: Vec<String> = info
            .keys(&bytes)
            .unwrap_or_else(|e| panic!("{args:?}: {e:?}"))
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        let theirs: Vec<String> = match redis::cmd("COMMAND")
            .arg("GETKEYS")
            .arg(*args)
            .query(&mut conn)
        {
            Ok(keys) => keys,
            Err(e) if e.to_string().contains("no key arguments") => Vec::new(),
            Err(e) => panic!("{args:?}: {e}"),
        };
        let mut sorted = ours.clone();
        sorted.sort();
        let mut theirs_sorted = theirs.clone();
        theirs_sorted.sort();
        assert_eq!(sorted, theirs_sorted, "{args:?}");
    }
}

/// A view whose first map is known.
async fn started_view(cluster: &Cluster) -> Arc<ClusterView> {
    let view = ClusterView::start(connector(&cluster.url()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while view.current().is_none() {
        assert!(Instant::now() < deadline, "no first view");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    view
}

async fn routed(router: &Router, args: &[&str]) -> String {
    let key = args.get(1).copied().unwrap_or("");
    let reply = router
        .send(
            2,
            slot(key.as_bytes()),
            nearcache::protocol::command(args.iter().copied()),
            0,
        )
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&reply.bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_follows_ask_tryagain_and_moved_through_a_slot_migration() {
    let cluster = Cluster::start(3);
    let router = Router::new(started_view(&cluster).await, connector(&cluster.url()));

    // Keys on every master, each landing where the cluster says it lives.
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let key = format!("k:{i}");
        assert_eq!(
            routed(&router, &["SET", &key, &format!("v{i}")]).await,
            "+OK\r\n"
        );
        let owner = cluster.owner_of(&key);
        let direct: String = redis::cmd("GET")
            .arg(&key)
            .query(&mut owner.conn())
            .unwrap();
        assert_eq!(direct, format!("v{i}"));
        used.insert(owner.port);
    }
    assert_eq!(used.len(), 3, "30 keys should reach all three masters");

    let (k1, k2, k3) = ("mig:{a}1", "mig:{a}2", "mig:{a}3");
    let s = slot(k1.as_bytes());
    let from = cluster.owner_of(k1);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    assert_eq!(routed(&router, &["SET", k1, "v1"]).await, "+OK\r\n");
    assert_eq!(routed(&router, &["SET", k2, "v2"]).await, "+OK\r\n");
    begin_slot_move(s, from, to);
    let migrate = |key: &str| {
        let _: () = redis::cmd("MIGRATE")
            .arg(
                &[
                    "127.0.0.1",
                    &to.port.to_string(),
                    "",
                    "0",
                    "5000",
                    "KEYS",
                    key,
                ][..],
            )
            .query(&mut from.conn())
            .unwrap();
    };
    migrate(k1);

    // ASK: k1 is already at the target, k2 still at the source.
    assert_eq!(routed(&router, &["GET", k1]).await, "$2\r\nv1\r\n");
    assert_eq!(routed(&router, &["GET", k2]).await, "$2\r\nv2\r\n");
    // A new key in a migrating slot is created at the target.
    assert_eq!(routed(&router, &["SET", k3, "v3"]).await, "+OK\r\n");
    let (_, at_target): ((), String) = redis::pipe()
        .cmd("ASKING")
        .cmd("GET")
        .arg(k3)
        .query(&mut to.conn())
        .unwrap();
    assert_eq!(at_target, "v3");

    // TRYAGAIN: k1 at the target, k2 at the source. Until k2 moves too,
    // the source answers TRYAGAIN; then ASK, then the values.
    let moved_later = {
        let from_port = from.port;
        let to_port = to.port;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(60));
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{from_port}"))
                .unwrap()
                .get_connection()
                .unwrap();
            let _: () = redis::cmd("MIGRATE")
                .arg(
                    &[
                        "127.0.0.1",
                        &to_port.to_string(),
                        "",
                        "0",
                        "5000",
                        "KEYS",
                        k2,
                    ][..],
                )
                .query(&mut c)
                .unwrap();
        })
    };
    assert_eq!(
        routed(&router, &["MGET", k1, k2]).await,
        "*2\r\n$2\r\nv1\r\n$2\r\nv2\r\n"
    );
    moved_later.join().unwrap();

    // MOVED: the slot now belongs to the target; the router's map says the
    // source until the source answers MOVED.
    assign_slot(s, to, &cluster.nodes);
    assert_eq!(
        router.view().current().unwrap().owner(s),
        Some(addr(from).as_str())
    );
    assert_eq!(routed(&router, &["GET", k1]).await, "$2\r\nv1\r\n");
    assert_eq!(
        router.view().current().unwrap().owner(s),
        Some(addr(to).as_str())
    );
    assert_eq!(routed(&router, &["SET", k2, "w2"]).await, "+OK\r\n");
    let direct: String = redis::cmd("GET").arg(k2).query(&mut to.conn()).unwrap();
    assert_eq!(direct, "w2");
    router.stop();
}

async fn executed(router: &Router, args: &[&str]) -> String {
    let args: Vec<Bytes> = args
        .iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
    let reply = router
        .execute(2, &args, 0, false)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    String::from_utf8_lossy(&reply.bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_across_slots_are_split_merged_or_refused_like_redis() {
    let cluster = Cluster::start(3);
    let router = Router::new(started_view(&cluster).await, connector(&cluster.url()));
    // Keys whose slots interleave between the masters, so key order and
    // part order differ.
    let keys: Vec<String> = (0..8).map(|i| format!("x:{i}")).collect();
    let owners: std::collections::HashSet<u16> =
        keys.iter().map(|k| cluster.owner_of(k).port).collect();
    assert!(owners.len() >= 2, "keys on at least two masters");

    let mut mset = vec!["MSET"];
    let values: Vec<String> = (0..8).map(|i| format!("v{i}")).collect();
    for (k, v) in keys.iter().zip(&values) {
        mset.push(k);
        mset.push(v);
    }
    assert_eq!(executed(&router, &mset).await, "+OK\r\n");
    for (k, v) in keys.iter().zip(&values) {
        let direct: String = redis::cmd("GET")
            .arg(k)
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
        assert_eq!(&direct, v);
    }

    // MGET in the client's key order, a missing key as nil in its place.
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    mget.insert(3, "missing");
    let mut expected = format!("*{}\r\n", mget.len() - 1);
    for k in &mget[1..] {
        match k.strip_prefix("x:") {
            Some(i) => expected.push_str(&format!("$2\r\nv{i}\r\n")),
            None => expected.push_str("$-1\r\n"),
        }
    }
    assert_eq!(executed(&router, &mget).await, expected);
    // Two keys per slot, interleaved: one part per slot, replies put back
    // in key order (part order would give a1 a2 a3 b1 b2).
    assert_ne!(cluster.owner_of("{a}").port, cluster.owner_of("{b}").port);
    assert_eq!(
        executed(
            &router,
            &["MSET", "{a}1", "a1", "{b}1", "b1", "{a}2", "a2", "{b}2", "b2", "{a}3", "a3"]
        )
        .await,
        "+OK\r\n"
    );
    assert_eq!(
        executed(&router, &["MGET", "{a}1", "{b}1", "{a}2", "{b}2", "{a}3"]).await,
        "*5\r\n$2\r\na1\r\n$2\r\nb1\r\n$2\r\na2\r\n$2\r\nb2\r\n$2\r\na3\r\n"
    );
    assert_eq!(
        executed(&router, &["DEL", "{a}1", "{b}1", "{a}2", "{b}2", "{a}3"]).await,
        ":5\r\n"
    );

    // Integer replies summed.
    let mut exists = vec!["EXISTS", "missing"];
    exists.extend(keys.iter().map(String::as_str));
    assert_eq!(executed(&router, &exists).await, ":8\r\n");
    assert_eq!(executed(&router, &["DBSIZE"]).await, ":8\r\n");
    assert_eq!(
        executed(&router, &["DEL", "x:0", "x:1", "x:2", "missing"]).await,
        ":3\r\n"
    );
    assert_eq!(executed(&router, &["DBSIZE"]).await, ":5\r\n");

    // Not splittable: exactly what a cluster node says.
    let direct: redis::RedisResult<()> = redis::cmd("MSETNX")
        .arg(&["x:3", "a", "x:4", "b"][..])
        .query(&mut cluster.nodes[0].conn());
    let direct = direct.unwrap_err();
    assert_eq!(direct.code(), Some("CROSSSLOT"), "{direct}");
    assert_eq!(
        executed(&router, &["MSETNX", "x:3", "a", "x:4", "b"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(
        executed(&router, &["RENAME", "x:3", "x:4"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    // Same slot (hash tags): one request, atomic as Redis makes it.
    assert_eq!(
        executed(&router, &["MSETNX", "{t}a", "1", "{t}b", "2"]).await,
        ":1\r\n"
    );
    assert_eq!(executed(&router, &["PING"]).await, "+PONG\r\n");
    assert_eq!(
        executed(&router, &["NOSUCHCOMMAND", "x"]).await.get(..4),
        Some("-ERR")
    );
    router.stop();
}

#[test]
fn a_plain_client_uses_the_cluster_through_nearcache_while_a_slot_migrates() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = proxy.conn();
    let mut used = std::collections::HashSet::new();
    for i in 0..30 {
        let key = format!("p:{i}");
        let _: () = redis::cmd("SET").arg(&key).arg(i).query(&mut c).unwrap();
        let back: i64 = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        assert_eq!(back, i);
        let direct: i64 = redis::cmd("GET")
            .arg(&key)
            .query(&mut cluster.owner_of(&key).conn())
            .unwrap();
        assert_eq!(direct, i);
        used.insert(cluster.owner_of(&key).port);
    }
    assert_eq!(used.len(), 3);
    let _: () = redis::cmd("MSET")
        .arg(&["{a}1", "a1", "{b}1", "b1", "{a}2", "a2"][..])
        .query(&mut c)
        .unwrap();
    let got: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&["{a}1", "{b}1", "nope", "{a}2"][..])
        .query(&mut c)
        .unwrap();
    assert_eq!(
        got,
        [
            Some("a1".into()),
            Some("b1".into()),
            None,
            Some("a2".into())
        ]
    );
    let e = redis::cmd("MSETNX")
        .arg(&["{a}3", "x", "{b}3", "y"][..])
        .query::<()>(&mut c)
        .unwrap_err();
    assert_eq!(e.code(), Some("CROSSSLOT"), "{e}");
    let n: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(n, 33);

    // Traffic on keys of one slot while that slot migrates: no error, no
    // redirect, every read sees the last write.
    let keys: Vec<String> = (0..5).map(|i| format!("{{m}}{i}")).collect();
    let s = slot(b"m").to_string();
    let from = cluster.owner_of("{m}");
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(0).query(&mut c).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, keys, url) = (stop.clone(), keys.clone(), proxy.url());
        std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                for k in &keys {
                    let _: () = redis::cmd("SET").arg(k).arg(n).query(&mut c).unwrap();
                    let back: i64 = redis::cmd("GET").arg(k).query(&mut c).unwrap();
                    assert_eq!(back, n, "{k}");
                }
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    begin_slot_move(&s, from, to);
    for k in &keys {
        std::thread::sleep(Duration::from_millis(50));
        let _: () = redis::cmd("MIGRATE")
            .arg(
                &[
                    "127.0.0.1",
                    &to.port.to_string(),
                    "",
                    "0",
                    "5000",
                    "KEYS",
                    k,
                ][..],
            )
            .query(&mut from.conn())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assign_slot(&s, to, &cluster.nodes);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = traffic.join().expect("no error reached the client");
    assert!(rounds > 5, "{rounds} rounds of traffic");
    // A write directly on the new owner is what nearcache reads next.
    let _: () = redis::cmd("SET")
        .arg(&keys[0])
        .arg(-1)
        .query(&mut to.conn())
        .unwrap();
    let back: i64 = redis::cmd("GET").arg(&keys[0]).query(&mut c).unwrap();
    assert_eq!(back, -1);
}

#[test]
fn nearcache_starts_and_serves_with_the_first_seed_down() {
    let cluster = Cluster::start(3);
    let dead = free_port();
    let url = format!(
        "redis-cluster://127.0.0.1:{dead},127.0.0.1:{}",
        cluster.nodes[2].port
    );
    let proxy = Proxy::with_config(test_config(&url));
    // Ready although the first seed (the ordinary pool's target) is down.
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.http_get("/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = proxy.conn();
    for i in 0..20 {
        let key = format!("d:{i}");
        let _: () = redis::cmd("SET").arg(&key).arg(i).query(&mut c).unwrap();
        let back: i64 = redis::cmd("GET").arg(&key).query(&mut c).unwrap();
        assert_eq!(back, i);
    }
}

#[test]
fn keyless_and_stateful_commands_through_nearcache() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = proxy.conn();
    let keys: Vec<String> = (0..12).map(|i| format!("q:{i}")).collect();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(1).query(&mut c).unwrap();
    }
    // KEYS from every master, merged.
    let mut got: Vec<String> = redis::cmd("KEYS").arg("q:*").query(&mut c).unwrap();
    got.sort();
    let mut want = keys.clone();
    want.sort();
    assert_eq!(got, want);
    // RANDOMKEY: a key of some master (Redis tips it all_shards without a
    // merge); INFO: one master's answer (clients send it at connect time).
    for _ in 0..6 {
        let k: String = redis::cmd("RANDOMKEY").query(&mut c).unwrap();
        assert!(keys.contains(&k), "{k}");
    }
    let info: String = redis::cmd("INFO").arg("server").query(&mut c).unwrap();
    assert!(info.contains("redis_version:"), "{info}");
    // Stateful commands pin to a node now (tested in
    // stateful_commands_pin_to_the_slot_owner); a keyless EVAL goes to any master.
    let one: i64 = redis::cmd("EVAL")
        .arg(&["return 1", "0"][..])
        .query(&mut c)
        .unwrap();
    assert_eq!(one, 1);
    let e = redis::cmd("SELECT").arg(1).query::<()>(&mut c).unwrap_err();
    assert!(!e.to_string().is_empty());
    // A client's own login needs a connection of its own: refused, not run
    // as nearcache's user.
    let e = redis::cmd("AUTH")
        .arg(&["someone", "secret"][..])
        .query::<()>(&mut c)
        .unwrap_err();
    assert!(
        e.to_string().contains("not supported on a Redis Cluster"),
        "{e}"
    );
    // The connection still works after the refusals.
    let v: i64 = redis::cmd("GET").arg("q:1").query(&mut c).unwrap();
    assert_eq!(v, 1);
    // FLUSHALL on every master.
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    for n in &cluster.nodes {
        let size: i64 = redis::cmd("DBSIZE").query(&mut n.conn()).unwrap();
        assert_eq!(size, 0, "node {}", n.port);
    }
    let size: i64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    assert_eq!(size, 0);
    let none: Option<String> = redis::cmd("RANDOMKEY").query(&mut c).unwrap();
    assert_eq!(none, None);
}

/// Every key of a SCAN through nearcache, with `extra` (MATCH, COUNT,
/// TYPE) on each step; also the number of steps.
fn scan_all(c: &mut redis::Connection, extra: &[&str]) -> (Vec<String>, usize) {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    let mut steps = 0;
    loop {
        let (next, page): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg(extra).query(c).unwrap();
        keys.extend(page);
        steps += 1;
        assert!(steps < 10_000, "SCAN never ends");
        if next == 0 {
            return (keys, steps);
        }
        cursor = next;
    }
}

#[test]
fn scan_walks_every_master_once_with_match_count_and_type() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = proxy.conn();
    let strings: Vec<String> = (0..300).map(|i| format!("s:{i}")).collect();
    let hashes: Vec<String> = (0..30).map(|i| format!("h:{i}")).collect();
    for k in &strings {
        let _: () = redis::cmd("SET").arg(k).arg(1).query(&mut c).unwrap();
    }
    for k in &hashes {
        let _: () = redis::cmd("HSET")
            .arg(k)
            .arg("f")
            .arg(1)
            .query(&mut c)
            .unwrap();
    }
    // The keys really are spread: every master holds some.
    for n in &cluster.nodes {
        let size: i64 = redis::cmd("DBSIZE").query(&mut n.conn()).unwrap();
        assert!(size > 0, "node {} holds no key", n.port);
    }
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let (got, steps) = scan_all(&mut c, &["COUNT", "20"]);
    let mut want: Vec<String> = strings.iter().chain(&hashes).cloned().collect();
    want.sort();
    assert_eq!(sorted(got), want, "every key exactly once");
    assert!(
        steps >= 3,
        "one master's SCAN at least per master: {steps} steps"
    );
    // MATCH and TYPE reach every node.
    let (got, _) = scan_all(&mut c, &["MATCH", "s:1*", "COUNT", "50"]);
    let want: Vec<String> = sorted(
        strings
            .iter()
            .filter(|k| k.starts_with("s:1"))
            .cloned()
            .collect(),
    );
    assert_eq!(sorted(got), want);
    let (got, _) = scan_all(&mut c, &["TYPE", "hash"]);
    assert_eq!(sorted(got), sorted(hashes.clone()));
    // A cursor that is not a number: Redis's own error.
    let e = redis::cmd("SCAN")
        .arg("abc")
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("invalid cursor"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_master_is_replaced_by_its_replica_and_its_pools_closed() {
    let mut cluster = Cluster::start_with_replicas(3, 1);
    let router = Router::new(started_view(&cluster).await, connector(&cluster.url()));
    let keys: Vec<String> = (0..30).map(|i| format!("f:{i}")).collect();
    for k in &keys {
        assert_eq!(executed(&router, &["SET", k, k]).await, "+OK\r\n");
    }
    let victim = cluster.owner_of(&keys[0]).port;
    let victim_addr = format!("127.0.0.1:{victim}");
    // Its replica has every write before the master dies (its first sync
    // may still be running on a loaded machine: WAIT again until it acks).
    wait_until(
        "the replica acknowledges the writes",
        Duration::from_secs(60),
        || {
            let acked: i64 = redis::cmd("WAIT")
                .arg(1)
                .arg(1000)
                .query(&mut cluster.node(victim).conn())
                .unwrap();
            acked == 1
        },
    );
    assert!(router.pooled_nodes().contains(&victim_addr));
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == victim)
        .unwrap()
        .kill();
    // Until the replica is promoted, its slots fail promptly (an error,
    // never a hang or a wrong value); then they are served by the replica.
    let args: Vec<Bytes> = ["GET", keys[0].as_str()]
        .iter()
        .map(|a| Bytes::copy_from_slice(a.as_bytes()))
        .collect();
    let want = format!("${}\r\n{}\r\n", keys[0].len(), keys[0]);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut failures = 0;
    loop {
        let started = Instant::now();
        let r = router.execute(2, &args, 0, false).await;
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "a request took {:?}",
            started.elapsed()
        );
        match r {
            Ok(reply) if reply.bytes == want.as_bytes() => break,
            Ok(reply) => {
                let text = String::from_utf8_lossy(&reply.bytes).into_owned();
                assert!(text.starts_with('-'), "a wrong value: {text}");
                failures += 1;
            }
            Err(_) => failures += 1,
        }
        assert!(Instant::now() < deadline, "the replica never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failures > 0,
        "the master's death went unnoticed: the test proves nothing"
    );
    for k in &keys {
        let want = format!("${}\r\n{}\r\n", k.len(), k);
        assert_eq!(executed(&router, &["GET", k]).await, want);
    }
    let t = router.view().current().unwrap();
    assert!(!t.masters().contains(&victim_addr), "{:?}", t.masters());
    // The dead master's pools are closed, not retried for ever.
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.pooled_nodes().contains(&victim_addr) {
        assert!(Instant::now() < deadline, "{:?}", router.pooled_nodes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    router.stop();
}

#[test]
fn mget_across_slots_with_a_shard_down_answers_the_other_keys() {
    let mut cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = proxy.conn();
    let keys: Vec<String> = (0..12).map(|i| format!("m:{i}")).collect();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    let victim = cluster.owner_of(&keys[0]).port;
    let on_victim: Vec<bool> = keys
        .iter()
        .map(|k| cluster.owner_of(k).port == victim)
        .collect();
    assert!(on_victim.iter().any(|v| !v), "every key on one master");
    cluster
        .nodes
        .iter_mut()
        .find(|n| n.port == victim)
        .unwrap()
        .kill();
    // The redis crate turns an error element into an error for the whole
    // reply: read the reply as it is sent.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    raw.write_all(&nearcache::protocol::command(
        std::iter::once("MGET").chain(keys.iter().map(String::as_str)),
    ))
    .unwrap();
    let mut buf = Vec::new();
    let len = loop {
        if let Some(n) = nearcache::protocol::frame_len(&buf) {
            break n;
        }
        let mut chunk = [0u8; 4096];
        let n = raw.read(&mut chunk).expect("an answer within 10 s");
        assert!(n > 0, "closed");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let items = nearcache::protocol::elements(&buf[..len]).expect("an array");
    assert_eq!(items.len(), keys.len());
    for ((k, item), down) in keys.iter().zip(items).zip(&on_victim) {
        let item = String::from_utf8_lossy(&buf[item]).into_owned();
        if *down {
            assert!(item.starts_with("-ERR upstream unavailable"), "{k}: {item}");
        } else {
            assert_eq!(item, format!("${}\r\n{k}\r\n", k.len()));
        }
    }
    // DEL across the same slots cannot say how many it deleted: an error.
    let e = redis::cmd("DEL")
        .arg(&keys)
        .query::<i64>(&mut c)
        .unwrap_err();
    assert!(!e.to_string().is_empty());
}

// ---- L1 in front of a cluster: one invalidation feed per master ----

/// nearcache with L1 on (tracking feeds, one per master), serving.
fn cached_cluster_proxy(cluster: &Cluster) -> Proxy {
    let mut cfg = test_config(&cluster.url());
    cfg.cache.invalidation = nearcache::config::InvalidationMode::Tracking;
    let p = Proxy::with_config(cfg);
    p.wait_serving();
    p
}

/// Reads `key` through nearcache until a read is an L1 hit (a fill racing
/// with an invalidation is not stored, so it may take a read or two),
/// every read returning `want`.
fn until_hit(proxy: &Proxy, c: &mut redis::Connection, key: &str, want: &str) {
    wait_until(
        &format!("{key} served from L1"),
        Duration::from_secs(5),
        || {
            let hits = proxy.stat("hits");
            let v: String = redis::cmd("GET").arg(key).query(c).unwrap();
            assert_eq!(v, want, "{key}");
            proxy.stat("hits") > hits
        },
    );
}

/// Sends a forwarded (uncached) GET to every master through nearcache, so
/// that each node's pool is connected: a request is written at once only
/// on a connection that is up (the first to a node waits for it).
fn warm_pools(cluster: &Cluster, proxy: &Proxy) {
    let mut c = proxy.conn();
    for k in cluster.keys_on_every_master("warm:") {
        let _: Option<String> = redis::cmd("GET").arg(k).query(&mut c).unwrap();
    }
}

/// A GET that misses L1 is written to its node at once, as a forwarded
/// command is: the client's later requests of other nodes are not held
/// behind it (its node is paused: `CLIENT PAUSE`), and a later write of
/// the same key keeps Redis's order behind it (written on the same
/// connection): replies in order, the read seeing the value before the write.
#[test]
fn an_l1_miss_does_not_hold_the_requests_after_it() {
    not_held_behind("quote:held", |slow, _| {
        (
            cmd(&["GET", slow]),
            b"$3\r\nold\r\n".to_vec(),
            vec![
                (cmd(&["SET", slow, "new"]), b"+OK\r\n".to_vec()),
                (cmd(&["GET", slow]), b"$3\r\nnew\r\n".to_vec()),
            ],
        )
    });
}

/// An MGET whose misses span nodes is written to them at once as well: a
/// SET of a third node's key behind it reaches its node while one of the
/// MGET's nodes is paused, and the replies keep the client's order.
#[test]
fn an_mget_with_misses_does_not_hold_the_requests_after_it() {
    not_held_behind("quote:mheld", |slow, near| {
        let reply = b"*2\r\n$3\r\nold\r\n$3\r\nold\r\n".to_vec();
        (cmd(&["MGET", slow, near]), reply, vec![])
    });
}

/// So is a command split across nodes (DEL of keys on two masters).
#[test]
fn a_command_split_across_nodes_does_not_hold_the_requests_after_it() {
    not_held_behind("dheld:", |slow, near| {
        (cmd(&["DEL", slow, near]), b":2\r\n".to_vec(), vec![])
    });
}

fn cmd(args: &[&str]) -> Vec<Vec<u8>> {
    args.iter().map(|a| a.as_bytes().to_vec()).collect()
}

/// A request and the replies it owes.
type Exchange = (Vec<Vec<u8>>, Vec<u8>);

/// Keys `slow` and `near` on two masters (both "old"), `slow`'s paused with
/// `CLIENT PAUSE`. `plan(slow, near)` gives the first request (written while
/// paused), its reply, and requests to send after a SET of a third master's
/// key, with theirs. The SET reaches its node during the pause; the first
/// reply comes after the pause, then the SET's `+OK`, then the rest in order.
fn not_held_behind(
    prefix: &str,
    plan: impl FnOnce(&str, &str) -> (Vec<Vec<u8>>, Vec<u8>, Vec<Exchange>),
) {
    let cluster = Cluster::start(3);
    let keys = cluster.keys_on_every_master(prefix);
    // One key on each of three masters.
    let mut one_each: Vec<&String> = Vec::new();
    for k in &keys {
        if one_each
            .iter()
            .all(|o| cluster.owner_of(o).port != cluster.owner_of(k).port)
        {
            one_each.push(k);
        }
    }
    let (slow, near, other) = (one_each[0], one_each[1], one_each[2]);
    let slow_node = cluster.owner_of(slow);
    for k in [slow, near] {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("old")
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
    }
    let proxy = cached_cluster_proxy(&cluster);
    warm_pools(&cluster, &proxy);
    let mut c = RawClient::connect(proxy.port);
    // Asked before the pause: the test support asks the first node, which
    // may be the paused one.
    let other_node = cluster.owner_of(other);
    let (first, first_reply, rest) = plan(slow, near);
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "1500", "ALL"][..])
        .query(&mut slow_node.conn())
        .unwrap();
    let paused = Instant::now();
    let send = |c: &mut RawClient, args: &[Vec<u8>]| {
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        c.send(&args);
    };
    send(&mut c, &first);
    c.send(&[b"SET", other.as_bytes(), b"written"]);
    for (request, _) in &rest {
        send(&mut c, request);
    }
    wait_until(
        "the SET behind it reached its node",
        Duration::from_secs(1),
        || {
            let v: Option<String> = redis::cmd("GET")
                .arg(other)
                .query(&mut other_node.conn())
                .unwrap();
            v.is_some()
        },
    );
    assert!(
        paused.elapsed() < Duration::from_millis(1000),
        "written while the first request's node was still paused"
    );
    assert_eq!(
        String::from_utf8_lossy(&c.reply()),
        String::from_utf8_lossy(&first_reply)
    );
    assert!(
        paused.elapsed() >= Duration::from_millis(1000),
        "the first request waited for its node"
    );
    assert_eq!(c.reply(), b"+OK\r\n");
    for (_, reply) in rest {
        assert_eq!(
            String::from_utf8_lossy(&c.reply()),
            String::from_utf8_lossy(&reply)
        );
    }
}

/// Keys on every master, written through nearcache and read until each is
/// an L1 hit, split into those of the first key's master (`mine`) and the
/// others, whose owners are asked now (`owner_of` asks the first node,
/// which a test may then stop).
struct CachedKeys<'c> {
    master: &'c RedisServer,
    mine: Vec<String>,
    others: Vec<String>,
    other_owners: Vec<&'c RedisServer>,
}

impl<'c> CachedKeys<'c> {
    fn on_every_master(
        cluster: &'c Cluster,
        proxy: &Proxy,
        c: &mut redis::Connection,
        value: &str,
    ) -> CachedKeys<'c> {
        let keys = cluster.keys_on_every_master("ind:");
        for k in &keys {
            let _: () = redis::cmd("SET").arg(k).arg(value).query(c).unwrap();
            until_hit(proxy, c, k, value);
        }
        let master = cluster.owner_of(&keys[0]);
        let (mine, others): (Vec<String>, Vec<String>) = keys
            .into_iter()
            .partition(|k| cluster.owner_of(k).port == master.port);
        let mut other_owners: Vec<&RedisServer> =
            others.iter().map(|k| cluster.owner_of(k)).collect();
        other_owners.sort_by_key(|n| n.port);
        other_owners.dedup_by_key(|n| n.port);
        CachedKeys {
            master,
            mine,
            others,
            other_owners,
        }
    }

    /// GETs the other keys' owners have run.
    fn other_gets(&self) -> u64 {
        self.other_owners.iter().map(|n| cmdstat(n, "get")).sum()
    }

    /// Reads the other keys (each `want`): every one an L1 hit, their
    /// owners not asked.
    fn others_from_l1(&self, proxy: &Proxy, c: &mut redis::Connection, want: &str) {
        let (hits, before) = (proxy.stat("hits"), self.other_gets());
        for k in &self.others {
            let v: String = redis::cmd("GET").arg(k).query(c).unwrap();
            assert_eq!(v, want, "{k}");
        }
        assert_eq!(
            proxy.stat("hits") - hits,
            self.others.len() as i64,
            "the other masters' keys from L1"
        );
        assert_eq!(self.other_gets(), before, "their owners not asked");
    }
}

/// Kills every tracking / subscribed client of `node` (its feed).
fn kill_feed_of(node: &RedisServer, c: &mut redis::Connection) {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(c).unwrap();
    let mut killed = 0;
    for line in list.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
                .to_string()
        };
        if field("flags=").contains('t') || !matches!(field("psub=").as_str(), "" | "0") {
            let _: i64 = redis::cmd("CLIENT")
                .arg(&["KILL", "ID", &field("id=")][..])
                .query(c)
                .unwrap();
            killed += 1;
        }
    }
    assert!(killed > 0, "found the feed connection of {}", node.port);
}

#[test]
fn l1_serves_hits_and_direct_writes_on_every_master_invalidate_them() {
    let cluster = Cluster::start(3);
    let proxy = cached_cluster_proxy(&cluster);
    assert!(
        proxy.stat_text("feed").contains("3/3 masters"),
        "{}",
        proxy.stat_text("feed")
    );
    let mut c = proxy.conn();
    let keys = cluster.keys_on_every_master("ind:");
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg("v1").query(&mut c).unwrap();
        until_hit(&proxy, &mut c, k, "v1");
        // A hit does not reach the owner.
        let owner = cluster.owner_of(k);
        let gets = cmdstat(owner, "get");
        let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
        assert_eq!(v, "v1");
        assert_eq!(cmdstat(owner, "get"), gets, "{k} read from L1");
    }
    // Read your own writes: a write through nearcache invalidates at once
    // (not when the feed reports it), for this client and every other one.
    let mut other = proxy.conn();
    for round in 0..10 {
        for k in &keys {
            let v = format!("w{round}");
            // Pipelined: the GET is dispatched before the SET is even sent.
            let ((), back): ((), String) = redis::pipe()
                .cmd("SET")
                .arg(k)
                .arg(&v)
                .cmd("GET")
                .arg(k)
                .query(&mut c)
                .unwrap();
            assert_eq!(back, v, "{k}: own write");
            let back: String = redis::cmd("GET").arg(k).query(&mut other).unwrap();
            assert_eq!(back, v, "{k}: another client");
        }
    }
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg("v1").query(&mut c).unwrap();
        until_hit(&proxy, &mut c, k, "v1");
    }
    // A write straight on the owning master (not through nearcache) is
    // reported by that master's feed: the next reads see it.
    for k in &keys {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("v2")
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
    }
    for k in &keys {
        wait_until(&format!("{k} invalidated"), Duration::from_secs(5), || {
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            v == "v2"
        });
        until_hit(&proxy, &mut c, k, "v2");
    }
}

/// One master's feed killed and held down (the node at `maxclients 1`)
/// while writes are made straight on that master: its keys are never read
/// stale through nearcache, neither while its feed is down (they are read
/// from the master, not from L1) nor after it is back (what L1 held of
/// them before the drop is not served again), while the other masters'
/// keys are served from L1 all along.
#[test]
fn a_master_feed_lost_stops_l1_for_its_slots_only_and_nothing_stale_is_served() {
    let cluster = Cluster::start(3);
    let proxy = cached_cluster_proxy(&cluster);
    let mut c = proxy.conn();
    let split = CachedKeys::on_every_master(&cluster, &proxy, &mut c, "old");
    let (victim, mine, others) = (split.master, split.mine.clone(), split.others.clone());
    // Open before the node stops accepting connections.
    let mut direct = victim.conn();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", "1"][..])
        .query(&mut direct)
        .unwrap();
    kill_feed_of(victim, &mut direct);
    for k in &mine {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("new")
            .query(&mut direct)
            .unwrap();
    }
    wait_until(
        "the victim's slots no longer served",
        Duration::from_secs(5),
        || proxy.stat_text("feed").contains("2/3 masters up"),
    );
    assert_eq!(proxy.stat("serving"), 1, "the other masters' slots are");
    for _ in 0..5 {
        let (hits, victim_gets) = (proxy.stat("hits"), cmdstat_on(&mut direct, "get"));
        for k in &mine {
            let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
            assert_eq!(v, "new", "stale read of {k} with its master's feed down");
        }
        assert_eq!(proxy.stat("hits"), hits, "the victim's keys not from L1");
        assert_eq!(
            cmdstat_on(&mut direct, "get") - victim_gets,
            mine.len() as u64,
            "the victim's keys read from it"
        );
        split.others_from_l1(&proxy, &mut c, "old");
    }
    assert!(
        proxy.stat_text("feed").contains("2/3 masters up"),
        "the feed was held down: {}",
        proxy.stat_text("feed")
    );
    // Written again and not read before the feed is back: L1 still holds
    // "old" from before the drop, which must never be served again.
    for k in &mine {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("newer")
            .query(&mut direct)
            .unwrap();
    }
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", "10000"][..])
        .query(&mut direct)
        .unwrap();
    proxy.wait_serving();
    for k in &mine {
        until_hit(&proxy, &mut c, k, "newer");
    }
    for k in &others {
        until_hit(&proxy, &mut c, k, "old");
    }
}

/// A slot moved to another master (MIGRATING/IMPORTING, MIGRATE,
/// SETSLOT NODE): the moved key is never read stale; the slot's entries
/// are cleared, even a cached nil that no write invalidates (it is read
/// from the new owner), while the entries of other slots, on the old
/// owner and on a third master, are still served from L1.
#[test]
fn a_slot_move_clears_that_slots_entries_and_keeps_the_others() {
    let cluster = Cluster::start(3);
    let proxy = cached_cluster_proxy(&cluster);
    let mut c = proxy.conn();
    let moved = "ind:{m}1";
    let absent = "ind:{m}absent";
    let from = cluster.owner_of(moved);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let third = cluster
        .nodes
        .iter()
        .find(|n| n.port != from.port && n.port != to.port)
        .unwrap();
    let on = |node: &RedisServer, p: &str| {
        (0..)
            .map(|i| format!("ind:{p}{i}"))
            .find(|k| cluster.owner_of(k).port == node.port && slot(k.as_bytes()) != slot(b"m"))
            .unwrap()
    };
    let (stay_from, stay_third) = (on(from, "f"), on(third, "s"));
    for k in [moved, stay_from.as_str(), stay_third.as_str()] {
        let _: () = redis::cmd("SET").arg(k).arg("old").query(&mut c).unwrap();
        until_hit(&proxy, &mut c, k, "old");
    }
    wait_until("a nil served from L1", Duration::from_secs(5), || {
        let hits = proxy.stat("hits");
        let v: Option<String> = redis::cmd("GET").arg(absent).query(&mut c).unwrap();
        assert_eq!(v, None);
        proxy.stat("hits") > hits
    });
    let s = slot(b"m").to_string();
    begin_slot_move(&s, from, to);
    let _: () = redis::cmd("MIGRATE")
        .arg(
            &[
                "127.0.0.1",
                &to.port.to_string(),
                "",
                "0",
                "5000",
                "KEYS",
                moved,
            ][..],
        )
        .query(&mut from.conn())
        .unwrap();
    assign_slot(&s, to, &cluster.nodes);
    let _: () = redis::cmd("SET")
        .arg(moved)
        .arg("new")
        .query(&mut to.conn())
        .unwrap();
    // The new owner's feed reports the write (as fast as it travels); once
    // it is seen, the old value never comes back.
    let took = wait_until(
        "the write on the new owner seen",
        Duration::from_secs(5),
        || {
            let v: String = redis::cmd("GET").arg(moved).query(&mut c).unwrap();
            v == "new"
        },
    );
    eprintln!("new value seen after {took:?}");
    for _ in 0..20 {
        let v: String = redis::cmd("GET").arg(moved).query(&mut c).unwrap();
        assert_eq!(v, "new", "stale read of a key whose slot moved");
    }
    // nearcache followed the MOVED: the moved slot's entries are gone, so
    // the nil is asked of the new owner (nothing else would invalidate it).
    wait_until(
        "the moved slot's entries cleared",
        Duration::from_secs(5),
        || {
            let gets = cmdstat(to, "get");
            let v: Option<String> = redis::cmd("GET").arg(absent).query(&mut c).unwrap();
            assert_eq!(v, None);
            cmdstat(to, "get") > gets
        },
    );
    // Every other slot's entries stayed: served without asking their owners.
    let (hits, from_gets, third_gets) = (
        proxy.stat("hits"),
        cmdstat(from, "get"),
        cmdstat(third, "get"),
    );
    for k in [&stay_from, &stay_third] {
        let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
        assert_eq!(v, "old", "{k}");
    }
    assert_eq!(
        proxy.stat("hits") - hits,
        2,
        "the other slots' entries from L1"
    );
    assert_eq!(
        (cmdstat(from, "get"), cmdstat(third, "get")),
        (from_gets, third_gets)
    );
    until_hit(&proxy, &mut c, moved, "new");
}

/// A master handed over to its replica (`CLUSTER FAILOVER`, no write
/// lost): the promoted replica has no tracking state for what was read
/// from its old master, so the old master's entries are not served any
/// more (its keys are read from the new master, then cached again once its
/// feed is up), while the other masters' entries stay in L1 through the
/// switch.
#[test]
fn a_failover_clears_the_old_masters_slots_and_keeps_the_others() {
    let cluster = Cluster::start_with_replicas(3, 1);
    let proxy = cached_cluster_proxy(&cluster);
    let mut c = proxy.conn();
    let split = CachedKeys::on_every_master(&cluster, &proxy, &mut c, "v");
    let (old, mine) = (split.master, split.mine.clone());
    let promoted = cluster.replica_of(old);
    promoted.take_over();
    // nearcache learns the new map (its periodic refresh, or the old
    // master's canary write answered MOVED): the old master's keys are
    // then read from the new one, not from L1.
    // (Each key once at least: once its master's feed is up, it is cached again.)
    let mut seen = vec![false; mine.len()];
    wait_until(
        "the old master's keys read from the new master",
        Duration::from_secs(15),
        || {
            for (k, seen) in mine.iter().zip(seen.iter_mut()) {
                let gets = cmdstat(promoted, "get");
                let v: String = redis::cmd("GET").arg(k).query(&mut c).unwrap();
                assert_eq!(v, "v", "{k}");
                *seen |= cmdstat(promoted, "get") > gets;
            }
            seen.iter().all(|s| *s)
        },
    );
    // The other masters' entries stayed in L1.
    split.others_from_l1(&proxy, &mut c, "v");
    for k in &mine {
        until_hit(&proxy, &mut c, k, "v");
    }
}

#[test]
fn mget_across_slots_is_answered_partly_from_l1_in_key_order() {
    let cluster = Cluster::start(3);
    let proxy = cached_cluster_proxy(&cluster);
    let mut c = proxy.conn();
    let keys = cluster.keys_on_every_master("ind:");
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    let want = |ks: &[&str]| -> Vec<Option<String>> {
        ks.iter()
            .map(|k| (k.starts_with("ind:") && !k.contains("missing")).then(|| k.to_string()))
            .collect()
    };
    // Two slots, interleaved: each slot's part is one request, its
    // elements go back to their places in the client's order.
    let tagged = ["ind:{a}1", "ind:{b}1", "ind:{a}2", "ind:{b}2"];
    for k in tagged {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    for _ in 0..3 {
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&tagged[..]).query(&mut c).unwrap();
        assert_eq!(got, want(&tagged));
    }
    let first: Vec<&str> = keys.iter().map(String::as_str).collect();
    // Filled element by element; a fill racing with the SETs' own
    // invalidations is not stored, so read until every element is a hit.
    wait_until("every MGET element from L1", Duration::from_secs(5), || {
        let hits = proxy.stat("hits");
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&first[..]).query(&mut c).unwrap();
        assert_eq!(got, want(&first));
        proxy.stat("hits") - hits == first.len() as i64
    });
    // Cached elements interleaved with misses on every master, in key order.
    let mut mixed: Vec<&str> = Vec::new();
    for (i, k) in first.iter().enumerate() {
        mixed.push(k);
        if i % 2 == 0 {
            mixed.push("ind:missing");
        }
    }
    mixed.push("other:{x}");
    let mgets: u64 = cluster.nodes.iter().map(|n| cmdstat(n, "mget")).sum();
    let hits = proxy.stat("hits");
    let got: Vec<Option<String>> = redis::cmd("MGET").arg(&mixed[..]).query(&mut c).unwrap();
    assert_eq!(got, want(&mixed));
    assert_eq!(
        proxy.stat("hits") - hits,
        first.len() as i64,
        "cached elements from L1"
    );
    let after: u64 = cluster.nodes.iter().map(|n| cmdstat(n, "mget")).sum();
    assert!(
        after - mgets <= 2,
        "only the misses' slots were asked: {}",
        after - mgets
    );
    // A direct write on one master invalidates that element only.
    let _: () = redis::cmd("SET")
        .arg(first[1])
        .arg("changed")
        .query(&mut cluster.owner_of(first[1]).conn())
        .unwrap();
    wait_until(
        "the MGET element invalidated",
        Duration::from_secs(5),
        || {
            let got: Vec<Option<String>> =
                redis::cmd("MGET").arg(&first[..]).query(&mut c).unwrap();
            got[1].as_deref() == Some("changed") && got[0].as_deref() == Some(first[0])
        },
    );
}

/// Each master's feed proves it sees writes with a canary in one of that
/// master's slots: keyspace events turned off on one node (its feed stays
/// connected but would miss writes) stop L1.
#[test]
fn a_master_feed_that_stops_seeing_writes_stops_l1() {
    let cluster = Cluster::start(3);
    for n in &cluster.nodes {
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "notify-keyspace-events", "KEA"][..])
            .query(&mut n.conn())
            .unwrap();
    }
    let mut cfg = test_config(&cluster.url());
    cfg.cache.invalidation = nearcache::config::InvalidationMode::Keyspace;
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    assert!(
        proxy.stat_text("feed").starts_with("keyspace"),
        "{}",
        proxy.stat_text("feed")
    );
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "notify-keyspace-events", ""][..])
        .query(&mut cluster.nodes[1].conn())
        .unwrap();
    wait_until(
        "L1 stops serving that master's slots",
        Duration::from_secs(5),
        || proxy.stat_text("feed").contains("2/3 masters up"),
    );
}

/// Two hash tags whose slots are owned by the same master, and one whose
/// slot is on another master.
fn tags_by_owner(cluster: &Cluster) -> (String, String, String) {
    let tags: Vec<String> = (0..200).map(|i| format!("t{i}")).collect();
    let a = &tags[0];
    let owner = cluster.owner_of(&format!("{{{a}}}")).port;
    let same = tags[1..]
        .iter()
        .find(|t| {
            cluster.owner_of(&format!("{{{t}}}")).port == owner
                && slot(t.as_bytes()) != slot(a.as_bytes())
        })
        .unwrap();
    let other = tags[1..]
        .iter()
        .find(|t| cluster.owner_of(&format!("{{{t}}}")).port != owner)
        .unwrap();
    (a.clone(), same.clone(), other.clone())
}

#[test]
fn stateful_commands_pin_to_the_slot_owner() {
    let cluster = Cluster::start(3);
    let proxy = cached_cluster_proxy(&cluster);
    let mut c = proxy.conn();
    let (a, same, other) = tags_by_owner(&cluster);
    let ka = format!("ind:{{{a}}}x");
    let kb = format!("ind:{{{a}}}y");

    // MULTI/EXEC in one slot, pipelined (MULTI answered before a node is
    // chosen, written first on the connection the first key opens)...
    let (r1, r2, r3): (String, i64, String) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(&ka)
        .arg("1")
        .cmd("INCR")
        .arg(&kb)
        .cmd("GET")
        .arg(&ka)
        .query(&mut c)
        .unwrap();
    assert_eq!((r1.as_str(), r2, r3.as_str()), ("OK", 1, "1"));
    let owner = cluster.owner_of(&ka);
    let direct: i64 = redis::cmd("GET").arg(&kb).query(&mut owner.conn()).unwrap();
    assert_eq!(direct, 1);
    // ... and one command at a time, as redis-cli does.
    let ok: String = redis::cmd("MULTI").query(&mut c).unwrap();
    assert_eq!(ok, "OK");
    let q: String = redis::cmd("INCR").arg(&kb).query(&mut c).unwrap();
    assert_eq!(q, "QUEUED");
    let ran: Vec<i64> = redis::cmd("EXEC").query(&mut c).unwrap();
    assert_eq!(ran, [2]);
    // An empty transaction, and DISCARD.
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let ran: Vec<i64> = redis::cmd("EXEC").query(&mut c).unwrap();
    assert!(ran.is_empty());
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let _: String = redis::cmd("INCR").arg(&kb).query(&mut c).unwrap();
    let _: () = redis::cmd("DISCARD").query(&mut c).unwrap();
    let v: i64 = redis::cmd("GET").arg(&kb).query(&mut c).unwrap();
    assert_eq!(v, 2, "discarded");

    // Keys across slots in a transaction: CROSSSLOT as Redis, nothing applied,
    // whether the other slot is on the same master or on another one.
    for t in [&same, &other] {
        let kc = format!("ind:{{{t}}}z");
        let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
        for k in [&ka, &kc] {
            let q: String = redis::cmd("SET").arg(k).arg("cross").query(&mut c).unwrap();
            assert_eq!(q, "QUEUED");
        }
        let e = redis::cmd("EXEC").query::<()>(&mut c).unwrap_err();
        assert_eq!(e.code(), Some("CROSSSLOT"), "{t}: {e}");
        assert_eq!(
            e.detail(),
            Some("Keys in request don't hash to the same slot"),
            "{t}: {e}"
        );
        let v: String = redis::cmd("GET").arg(&ka).query(&mut c).unwrap();
        assert_eq!(v, "1");
        let v: Option<String> = redis::cmd("GET").arg(&kc).query(&mut c).unwrap();
        assert_eq!(v, None);
    }
    // What the owning node itself answers when both slots are its own.
    {
        let mut d = owner.conn();
        let _: () = redis::cmd("MULTI").query(&mut d).unwrap();
        for k in [ka.clone(), format!("ind:{{{same}}}z")] {
            let q: String = redis::cmd("SET")
                .arg(&k)
                .arg("cross")
                .query(&mut d)
                .unwrap();
            assert_eq!(q, "QUEUED");
        }
        let e = redis::cmd("EXEC").query::<()>(&mut d).unwrap_err();
        assert_eq!(e.code(), Some("CROSSSLOT"), "the node: {e}");
        assert_eq!(
            e.detail(),
            Some("Keys in request don't hash to the same slot")
        );
        let _: () = redis::cmd("MULTI").query(&mut d).unwrap();
        let e = redis::cmd("MSET")
            .arg(&[ka.as_str(), "m", &format!("ind:{{{same}}}m"), "m"][..])
            .query::<()>(&mut d)
            .unwrap_err();
        assert_eq!(e.code(), Some("CROSSSLOT"), "the node: {e}");
        let e = redis::cmd("EXEC").query::<()>(&mut d).unwrap_err();
        assert_eq!(e.code(), Some("EXECABORT"), "the node: {e}");
    }
    // One queued command whose own keys span slots: refused at once, EXEC aborts.
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let e = redis::cmd("MSET")
        .arg(&[ka.as_str(), "m", &format!("ind:{{{other}}}m"), "m"][..])
        .query::<()>(&mut c)
        .unwrap_err();
    assert_eq!(e.code(), Some("CROSSSLOT"), "{e}");
    let e = redis::cmd("EXEC").query::<()>(&mut c).unwrap_err();
    assert_eq!(e.code(), Some("EXECABORT"), "{e}");
    // The connection is usable afterwards.
    let v: String = redis::cmd("GET").arg(&ka).query(&mut c).unwrap();
    assert_eq!(v, "1");

    // WATCH, then a write straight on the owner: EXEC returns nil.
    let _: () = redis::cmd("WATCH").arg(&ka).query(&mut c).unwrap();
    let _: () = redis::cmd("SET")
        .arg(&ka)
        .arg("theirs")
        .query(&mut owner.conn())
        .unwrap();
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let _: String = redis::cmd("SET")
        .arg(&ka)
        .arg("mine")
        .query(&mut c)
        .unwrap();
    let r: redis::Value = redis::cmd("EXEC").query(&mut c).unwrap();
    assert_eq!(r, redis::Value::Nil);
    let v: String = redis::cmd("GET").arg(&ka).query(&mut owner.conn()).unwrap();
    assert_eq!(v, "theirs");
    // Unwatched, the same transaction runs.
    let _: () = redis::cmd("WATCH").arg(&ka).query(&mut c).unwrap();
    let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
    let _: String = redis::cmd("SET")
        .arg(&ka)
        .arg("mine")
        .query(&mut c)
        .unwrap();
    let r: Vec<String> = redis::cmd("EXEC").query(&mut c).unwrap();
    assert_eq!(r, ["OK"]);

    // BLPOP, woken by an LPUSH from another client through nearcache.
    let list = format!("ind:{{{other}}}list");
    let list_owner = cluster.owner_of(&list);
    let blocked = {
        let (url, list) = (proxy.url(), list.clone());
        std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let r: (String, String) = redis::cmd("BLPOP")
                .arg(&list)
                .arg(10)
                .query(&mut c)
                .unwrap();
            r
        })
    };
    wait_until(
        "BLPOP blocked on the list's owner",
        Duration::from_secs(5),
        || info_field(list_owner, "clients", "blocked_clients") == "1",
    );
    let _: i64 = redis::cmd("LPUSH")
        .arg(&list)
        .arg("job")
        .query(&mut c)
        .unwrap();
    assert_eq!(blocked.join().unwrap(), (list.clone(), "job".to_string()));

    // SUBSCRIBE receives a PUBLISH (sent through nearcache by another client).
    let mut sub = proxy.conn();
    let mut pubsub = sub.as_pubsub();
    pubsub.subscribe("news").unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let got = std::cell::RefCell::new(None);
    wait_until(
        "the subscriber gets the message",
        Duration::from_secs(5),
        || {
            let _: i64 = redis::cmd("PUBLISH")
                .arg("news")
                .arg("hello")
                .query(&mut c)
                .unwrap();
            if let Ok(m) = pubsub.get_message() {
                *got.borrow_mut() = Some(m.get_payload::<String>().unwrap());
            }
            got.borrow().is_some()
        },
    );
    assert_eq!(got.into_inner().as_deref(), Some("hello"));
}

/// A node nearcache takes for a master answers `-READONLY` (a keyless
/// write reaching it after a failover made it a replica): the map is
/// refreshed then, not at the next periodic refresh (a minute here).
#[test]
fn a_readonly_reply_refreshes_the_slot_map() {
    let cluster = Cluster::start(3);
    let old = &cluster.nodes[0];
    let replica = cluster.add_replica(old);
    let mut cfg = test_config(&cluster.url());
    // No feeds: their canaries would hit MOVED and refresh the map anyway.
    cfg.cache.enabled = false;
    cfg.upstream.cluster.refresh_interval = Duration::from_secs(60);
    let proxy = Proxy::with_config(cfg);
    let mut c = proxy.conn();
    let _: () = redis::cmd("FLUSHALL").query(&mut c).unwrap();
    replica.take_over();
    wait_until("the old master a replica", Duration::from_secs(30), || {
        info_field(old, "replication", "role") == "slave"
    });
    // The first FLUSHALL reaches the old master, now a replica.
    let e = redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap_err();
    assert_eq!(e.code(), Some("READONLY"), "{e}");
    wait_until(
        "FLUSHALL reaches the new master",
        Duration::from_secs(5),
        || redis::cmd("FLUSHALL").query::<()>(&mut c).is_ok(),
    );
}

/// A late reply on a cluster node is checked on that node, not on the
/// first seed: with the first seed down and `command_timeout` 300 ms, a
/// BLPOP of 2 s (pinned) and a slow script (pooled) are waited for.
#[test]
fn late_replies_are_checked_on_their_own_node() {
    let cluster = Cluster::start(3);
    let dead = free_port();
    let url = format!(
        "redis-cluster://127.0.0.1:{dead},127.0.0.1:{}",
        cluster.nodes[1].port
    );
    let mut cfg = test_config(&url);
    cfg.cache.enabled = false;
    cfg.upstream.command_timeout = Duration::from_millis(300);
    let proxy = Proxy::with_config(cfg);
    let mut c = proxy.conn();
    let started = Instant::now();
    let r: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(&["ind:{late}list", "2"][..])
        .query(&mut c)
        .unwrap();
    assert_eq!(r, None);
    assert!(started.elapsed() >= Duration::from_secs(2));
    // A busy node answers the check (its event loop runs the script's
    // yields), so the pooled reply is waited for too.
    let v: i64 = redis::cmd("EVAL")
        .arg(
            &[
                "local t = redis.call('TIME') local s = t[1] * 1000000 + t[2] \
             while true do local n = redis.call('TIME') \
             if n[1] * 1000000 + n[2] - s > 1000000 then return 1 end end",
                "1",
                "ind:{late}k",
            ][..],
        )
        .query(&mut c)
        .unwrap();
    assert_eq!(v, 1);
}

// ---- Pipelining through a cluster upstream ----

#[test]
fn a_pipelined_request_never_overtakes_one_sent_at_the_front() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = proxy.conn();
    // The command table is read on first use; after it, one-slot requests
    // are written to their node at once.
    let _: () = redis::cmd("SET").arg("warm").arg(1).query(&mut c).unwrap();
    for round in 0..20 {
        let (a, b) = (format!("{{x}}a{round}"), format!("{{y}}b{round}"));
        // MSET across slots goes when it reaches the front; the INCR after
        // it, one slot, must not be written before it.
        let (_, n): ((), i64) = redis::pipe()
            .cmd("MSET")
            .arg(&a)
            .arg(10)
            .arg(&b)
            .arg(20)
            .cmd("INCR")
            .arg(&a)
            .query(&mut c)
            .unwrap();
        assert_eq!(n, 11, "round {round}: INCR ran before the MSET it follows");
    }
}

#[test]
fn pipelined_increments_stay_in_order_and_exactly_once_while_their_slot_migrates() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    // Two clients on counters of one slot, pipelines long enough to arrive
    // in several reads: one client's MOVED changes the map while the
    // other's pipeline is half written.
    let counters: Vec<String> = (0..2).map(|i| format!("{{pl}}counter{i}")).collect();
    let s = slot(b"pl").to_string();
    let from = cluster.owner_of("{pl}");
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = counters
        .iter()
        .map(|counter| {
            let (stop, counter, url) = (stop.clone(), counter.clone(), proxy.url());
            std::thread::spawn(move || {
                let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
                let mut sent = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut p = redis::pipe();
                    for _ in 0..1000 {
                        p.cmd("INCR").arg(&counter);
                    }
                    let got: Vec<i64> = p.query(&mut c).expect("no error reaches the client");
                    let want: Vec<i64> = (sent + 1..=sent + 1000).collect();
                    assert!(
                        got == want,
                        "{counter}: replies out of order, or an increment lost or doubled"
                    );
                    sent += 1000;
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    begin_slot_move(&s, from, to);
    for counter in &counters {
        std::thread::sleep(Duration::from_millis(100));
        let _: () = redis::cmd("MIGRATE")
            .arg(&["127.0.0.1", &to.port.to_string(), counter, "0", "5000"][..])
            .query(&mut from.conn())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assign_slot(&s, to, &cluster.nodes);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (counter, t) in counters.iter().zip(traffic) {
        let sent = t.join().expect("a pipelining client failed");
        assert!(
            sent >= 2000,
            "only {sent} increments of {counter}: no traffic during the migration"
        );
        let on_owner: i64 = redis::cmd("GET")
            .arg(counter)
            .query(&mut to.conn())
            .unwrap();
        assert_eq!(
            on_owner, sent,
            "{counter}: the new owner holds every increment exactly once"
        );
    }
}

// ---- Randomized stale-read checker through resharding and failover ----

/// The keys the stale-read checker writes and reads.
fn checker_key(k: usize) -> String {
    format!("quote:chk{k}")
}

/// What a run of [`check_stale_reads`] saw.
struct CheckerRun {
    reads: u64,
    errors: u64,
    /// L1 hits of both instances during the run, and in its first 2 s.
    hits: i64,
    hits_steady: i64,
    /// Times each instance emptied L1.
    flushes: (i64, i64),
}

/// The randomized stale-read checker: two nearcache instances with L1 in
/// front of `cluster`; writers through both, readers through both, for 2 s
/// and then while `change` alters the topology. No read may return a value
/// older than one acknowledged more than BOUND before the read started,
/// and no reader may see a key go back in time. Errors during the moments
/// of a switch are allowed (counted), stale values are not. `change` must
/// lose no acknowledged write (Redis's own loss would look like L1's).
fn check_stale_reads(cluster: &mut Cluster, change: impl FnOnce(&mut Cluster)) -> CheckerRun {
    const BOUND: Duration = Duration::from_millis(500);
    const KEYS: usize = 16;
    type History = std::sync::Mutex<Vec<(u64, Instant)>>;
    let cached = || {
        let mut cfg = test_config(&cluster.url());
        cfg.cache.invalidation = nearcache::config::InvalidationMode::Tracking;
        let p = Proxy::with_config(cfg);
        p.wait_serving();
        p
    };
    let (a, b) = (cached(), cached());
    let history: Arc<Vec<History>> = Arc::new(
        (0..KEYS)
            .map(|_| std::sync::Mutex::new(vec![(0, Instant::now())]))
            .collect(),
    );
    {
        let mut c = a.conn();
        for k in 0..KEYS {
            let _: () = redis::cmd("SET")
                .arg(checker_key(k))
                .arg(0)
                .query(&mut c)
                .unwrap();
        }
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut threads = Vec::new();
    // One writer per key group, so each key's versions are totally ordered.
    for w in 0..4usize {
        let url = if w % 2 == 0 { a.url() } else { b.url() };
        let (history, stop, errors) = (history.clone(), stop.clone(), errors.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut version = 0u64;
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                version += 1;
                i = (i * 5 + 1) % (KEYS / 4);
                let k = w + 4 * i;
                let v = version * 4 + w as u64;
                match redis::cmd("SET")
                    .arg(checker_key(k))
                    .arg(v)
                    .query::<()>(&mut c)
                {
                    Ok(()) => history[k].lock().unwrap().push((v, Instant::now())),
                    // Unknown outcome: not acknowledged, so nothing is owed.
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        }));
    }
    for r in 0..4usize {
        let url = if r % 2 == 0 { a.url() } else { b.url() };
        let (history, stop, reads, errors) =
            (history.clone(), stop.clone(), reads.clone(), errors.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut last_seen = [0u64; KEYS];
            let mut i = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i = (i * 7 + 3) % KEYS;
                let started = Instant::now();
                let v: u64 = match redis::cmd("GET").arg(checker_key(i)).query(&mut c) {
                    Ok(v) => v,
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                };
                reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let h = history[i].lock().unwrap();
                let n = h.partition_point(|(_, at)| *at + BOUND < started);
                let (must_see, acked) = if n == 0 { (0, started) } else { h[n - 1] };
                assert!(
                    v >= must_see,
                    "stale read of quote:chk{i}: got {v}, but {must_see} was acknowledged {:?} before the read",
                    started - acked
                );
                assert!(v >= last_seen[i], "quote:chk{i} went back in time: {} then {v}", last_seen[i]);
                last_seen[i] = v;
            }
        }));
    }
    let hits_before = a.stat("hits") + b.stat("hits");
    std::thread::sleep(Duration::from_secs(2));
    let hits_steady = a.stat("hits") + b.stat("hits") - hits_before;
    change(cluster);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join()
            .expect("a checker thread found a stale read or failed");
    }
    CheckerRun {
        reads: reads.load(std::sync::atomic::Ordering::Relaxed),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        hits: a.stat("hits") + b.stat("hits") - hits_before,
        hits_steady,
        flushes: (a.stat("flushes"), b.stat("flushes")),
    }
}

/// The checker (above) in front of a 3-master, 3-replica cluster while a
/// slot migrates (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE) and then a
/// master fails over to its replica (`CLUSTER FAILOVER`, which loses no
/// write, so an older value after it can only come from L1).
#[test]
fn randomized_checker_finds_no_stale_read_through_resharding_and_failover() {
    let mut cluster = Cluster::start_with_replicas(3, 1);
    let mut migrated = 0;
    let run = check_stale_reads(&mut cluster, |cluster| {
        // Resharding: the slot of quote:chk0 moves to another master, keys and all.
        let s = slot(checker_key(0).as_bytes()).to_string();
        let from = cluster.owner_of(&checker_key(0));
        let to = cluster
            .nodes
            .iter()
            .find(|n| n.port != from.port && !replica_is(n))
            .expect("another master");
        begin_slot_move(&s, from, to);
        std::thread::sleep(Duration::from_millis(500));
        let moving: Vec<String> = redis::cmd("CLUSTER")
            .arg(&["GETKEYSINSLOT", &s, "100"][..])
            .query(&mut from.conn())
            .unwrap();
        for k in &moving {
            let _: () = redis::cmd("MIGRATE")
                .arg(&["127.0.0.1", &to.port.to_string(), k, "0", "5000"][..])
                .query(&mut from.conn())
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        for n in cluster.nodes.iter().filter(|n| !replica_is(n)) {
            let _: () = redis::cmd("CLUSTER")
                .arg(&["SETSLOT", &s, "NODE", &to.node_id()][..])
                .query(&mut n.conn())
                .unwrap();
        }
        migrated = moving.len();
        std::thread::sleep(Duration::from_secs(2));

        // Failover: the master of quote:chk1 hands over to its replica.
        let old = cluster.owner_of(&checker_key(1));
        cluster.replica_of(old).take_over();
        std::thread::sleep(Duration::from_secs(3));
    });
    eprintln!(
        "cluster checker: {} reads, {} L1 hits ({} in the first 2 s), {} errors, \
         {migrated} keys migrated, L1 emptied {} and {} times",
        run.reads, run.hits, run.hits_steady, run.errors, run.flushes.0, run.flushes.1
    );
    assert!(
        migrated > 0,
        "the migrated slot held no key: the resharding checked nothing"
    );
    assert!(
        run.hits_steady > 100,
        "L1 served too little to check ({} hits)",
        run.hits_steady
    );
    assert!(
        run.hits > 1000,
        "the checker must exercise L1 ({} hits)",
        run.hits
    );
}

/// The checker through a failover that kills the master (SIGKILL: no
/// `MOVED`, no goodbye; its feed just dies). Redis replicates
/// asynchronously, so a write the master acknowledged just before dying
/// may be lost by Redis itself; to check nearcache and not Redis, the
/// master's writes are paused (`CLIENT PAUSE WRITE`) and its replica caught
/// up before the kill. Writes in flight then fail (not acknowledged).
#[test]
fn randomized_checker_finds_no_stale_read_through_a_sigkill_failover() {
    let mut cluster = Cluster::start_with_replicas(3, 1);
    let first = cluster.nodes[0].port;
    let run = check_stale_reads(&mut cluster, |cluster| {
        // A master other than the first node (the test support asks that one).
        let victim = (1..16)
            .map(|k| cluster.owner_of(&checker_key(k)).port)
            .find(|p| *p != first)
            .expect("a key on another master");
        let replica = cluster.replica_of(cluster.node(victim)).port;
        let _: () = redis::cmd("CLIENT")
            .arg(&["PAUSE", "20000", "WRITE"][..])
            .query(&mut cluster.node(victim).conn())
            .unwrap();
        wait_until("the replica caught up", Duration::from_secs(10), || {
            let master = info_field(cluster.node(victim), "replication", "master_repl_offset");
            let copy = info_field(cluster.node(replica), "replication", "slave_repl_offset");
            master == copy
        });
        cluster
            .nodes
            .iter_mut()
            .find(|n| n.port == victim)
            .unwrap()
            .kill();
        wait_until("the replica is a master", Duration::from_secs(30), || {
            !replica_is(cluster.node(replica))
        });
        std::thread::sleep(Duration::from_secs(3));
    });
    eprintln!(
        "cluster checker (SIGKILL): {} reads, {} L1 hits ({} in the first 2 s), {} errors, \
         L1 emptied {} and {} times",
        run.reads, run.hits, run.hits_steady, run.errors, run.flushes.0, run.flushes.1
    );
    assert!(
        run.hits_steady > 100,
        "L1 served too little to check ({} hits)",
        run.hits_steady
    );
    assert!(run.errors > 0, "the kill was seen by the clients");
}

/// Is this node a replica (by `ROLE`)?
fn replica_is(n: &RedisServer) -> bool {
    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.conn()).unwrap();
    matches!(&role[0], redis::Value::BulkString(r) if r == b"slave")
}

/// A pipeline spanning slots with one shard stalled (SIGSTOP: its sockets
/// stay open, nothing answers): the replies come back in the client's
/// order, the stalled shard's as errors once `command_timeout` and the
/// liveness check (`connect_timeout`) have passed, the others' as values;
/// the client is never left waiting longer than that.
#[test]
fn a_stalled_shard_delays_a_pipeline_only_until_the_command_timeout() {
    let cluster = Cluster::start(3);
    let mut cfg = test_config(&cluster.url());
    cfg.upstream.command_timeout = Duration::from_millis(500);
    cfg.upstream.connect_timeout = Duration::from_millis(300);
    let proxy = Proxy::with_config(cfg);
    // Keys not cached by the default policies: every GET goes upstream.
    let keys: Vec<String> = (0..12).map(|i| format!("st:{i}")).collect();
    let mut c = proxy.conn();
    for k in &keys {
        let _: () = redis::cmd("SET").arg(k).arg(k).query(&mut c).unwrap();
    }
    let stalled = cluster.owner_of(&keys[0]);
    let on_stalled: Vec<bool> = keys
        .iter()
        .map(|k| cluster.owner_of(k).port == stalled.port)
        .collect();
    assert!(on_stalled.iter().any(|s| !s), "every key on one master");
    stalled.signal("STOP");
    let started = Instant::now();
    let mut p = redis::pipe();
    for k in &keys {
        p.cmd("GET").arg(k);
    }
    // The redis crate makes an error element an error for the whole
    // pipeline: read each reply on its own.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&p.get_packed_pipeline()).unwrap();
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    while replies.len() < keys.len() {
        while let Some(n) = nearcache::protocol::frame_len(&buf) {
            replies.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            buf.drain(..n);
        }
        if replies.len() == keys.len() {
            break;
        }
        let mut chunk = [0u8; 4096];
        let n = raw.read(&mut chunk).expect("every reply within 10 s");
        assert!(n > 0, "closed");
        buf.extend_from_slice(&chunk[..n]);
    }
    let took = started.elapsed();
    stalled.signal("CONT");
    eprintln!(
        "stalled shard: {took:?}, e.g. {:?}",
        replies.iter().find(|r| r.starts_with('-'))
    );
    assert!(
        took < Duration::from_secs(5),
        "the pipeline waited {took:?}"
    );
    for ((k, reply), stalled) in keys.iter().zip(&replies).zip(&on_stalled) {
        if *stalled {
            assert!(reply.starts_with('-'), "{k} on the stalled shard: {reply}");
        } else {
            assert_eq!(reply, &format!("${}\r\n{k}\r\n", k.len()), "{k}");
        }
    }
}
