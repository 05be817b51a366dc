//! A client's pinned state through nearcache in front of a real 3-master
//! Redis Cluster (`tests/support/cluster.rs`), on raw sockets so every reply
//! is seen as sent: no `MOVED` ever reaches the client. WATCH and the
//! transaction after it live in one slot (a WATCH of another slot gets the
//! node's own `CROSSSLOT` and leaves what was watched as it was); NO-TOUCH
//! commands reach their key's node; `CLIENT TRACKING ON` and MONITOR, which
//! a cluster would scope to one node, get a clear error. See
//! `docs/cluster.md` ("Pinned connections").

mod support;

use std::time::Duration;

use nearcache::upstream::cluster::slots::slot;
use support::cluster::Cluster;
use support::*;

const CROSSSLOT: &str = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
const OK: &str = "+OK\r\n";
const QUEUED: &str = "+QUEUED\r\n";

fn text(frame: Vec<u8>) -> String {
    String::from_utf8_lossy(&frame).into_owned()
}

fn bulk(v: &str) -> String {
    format!("${}\r\n{v}\r\n", v.len())
}

/// A key, a key of another slot on the same master, a key on another master.
fn three_keys(cluster: &Cluster) -> (String, String, String) {
    let ka = "w0".to_string();
    let owner = cluster.owner_of(&ka).port;
    let same = (1..)
        .map(|i| format!("w{i}"))
        .find(|k| cluster.owner_of(k).port == owner && slot(k.as_bytes()) != slot(ka.as_bytes()))
        .unwrap();
    let other = (1..)
        .map(|i| format!("w{i}"))
        .find(|k| cluster.owner_of(k).port != owner)
        .unwrap();
    (ka, same, other)
}

/// SET on the key's owner, behind nearcache's back.
fn set_direct(cluster: &Cluster, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut cluster.owner_of(key).conn())
        .unwrap();
}

fn line(c: &mut RawClient, l: &str) -> String {
    text(c.line(l))
}

#[test]
fn a_watch_of_another_slot_is_crossslot_and_the_first_watch_still_holds() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let (ka, same, other) = three_keys(&cluster);

    // What a node leaves after refusing a second WATCH (MOVED for another
    // node's key): the first one, as nearcache does with its CROSSSLOT.
    {
        let mut n = RawClient::connect(cluster.owner_of(&ka).port);
        assert_eq!(line(&mut n, &format!("WATCH {ka}")), OK);
        assert!(line(&mut n, &format!("WATCH {other}")).starts_with("-MOVED "));
        set_direct(&cluster, &ka, "theirs");
        assert_eq!(line(&mut n, "MULTI"), OK);
        assert_eq!(line(&mut n, &format!("SET {ka} mine")), QUEUED);
        assert_eq!(line(&mut n, "EXEC"), "*-1\r\n", "the node");
    }

    for kt in [&same, &other] {
        let mut c = RawClient::connect(proxy.port);
        assert_eq!(line(&mut c, &format!("SET {ka} v0")), OK);
        // The refused WATCH watched nothing: a write to its key aborts nothing.
        assert_eq!(line(&mut c, &format!("WATCH {ka}")), OK);
        assert_eq!(line(&mut c, &format!("WATCH {kt}")), CROSSSLOT, "{kt}");
        set_direct(&cluster, kt, "changed");
        assert_eq!(line(&mut c, "MULTI"), OK);
        assert_eq!(line(&mut c, &format!("SET {ka} mine")), QUEUED);
        assert_eq!(line(&mut c, "EXEC"), "*1\r\n+OK\r\n", "{kt}");
        // The first WATCH still holds after the refused one.
        assert_eq!(line(&mut c, &format!("WATCH {ka}")), OK);
        assert_eq!(line(&mut c, &format!("WATCH {kt}")), CROSSSLOT, "{kt}");
        set_direct(&cluster, &ka, "theirs");
        assert_eq!(line(&mut c, "MULTI"), OK);
        assert_eq!(line(&mut c, &format!("SET {ka} mine")), QUEUED);
        assert_eq!(
            line(&mut c, "EXEC"),
            "*-1\r\n",
            "{kt}: the watched key changed"
        );
        assert_eq!(line(&mut c, &format!("GET {ka}")), bulk("theirs"));

        // Pipelined, the same answers in order.
        for l in [
            format!("WATCH {ka}"),
            format!("WATCH {kt}"),
            "MULTI".into(),
            format!("SET {ka} piped"),
            "EXEC".into(),
        ] {
            let args: Vec<&[u8]> = l.split(' ').map(|a| a.as_bytes()).collect();
            c.send(&args);
        }
        let got: Vec<String> = (0..5).map(|_| text(c.reply())).collect();
        assert_eq!(got, [OK, CROSSSLOT, OK, QUEUED, "*1\r\n+OK\r\n"], "{kt}");

        // A key of another slot inside the transaction: CROSSSLOT at EXEC,
        // nothing applied (on the same master too: WATCH and the
        // transaction share one slot), and the WATCH ends with it.
        assert_eq!(line(&mut c, &format!("WATCH {ka}")), OK);
        assert_eq!(line(&mut c, "MULTI"), OK);
        assert_eq!(line(&mut c, &format!("SET {kt} inside")), QUEUED);
        assert_eq!(line(&mut c, "EXEC"), CROSSSLOT, "{kt}");
        assert_eq!(line(&mut c, &format!("GET {kt}")), bulk("changed"));
        assert_eq!(line(&mut c, &format!("GET {ka}")), bulk("piped"));
        set_direct(&cluster, &ka, "after");
        assert_eq!(line(&mut c, "MULTI"), OK);
        assert_eq!(line(&mut c, &format!("SET {ka} unwatched")), QUEUED);
        assert_eq!(
            line(&mut c, "EXEC"),
            "*1\r\n+OK\r\n",
            "{kt}: nothing watched"
        );
    }

    // A RESP3 subscriber is pinned to one master (any): a WATCH of a key
    // there is the node's, of a key elsewhere CROSSSLOT, never MOVED.
    let mut keys = cluster.keys_on_every_master("sub");
    keys.sort_by_key(|k| cluster.owner_of(k).port);
    keys.dedup_by_key(|k| cluster.owner_of(k).port);
    let mut answers: Vec<String> = Vec::new();
    for k in &keys {
        let mut c = RawClient::connect(proxy.port);
        let _hello = c.line("HELLO 3");
        let sub = text(c.line("SUBSCRIBE ch"));
        assert!(sub.contains("subscribe"), "{sub}");
        answers.push(line(&mut c, &format!("WATCH {k}")));
    }
    answers.sort();
    let mut want = vec![CROSSSLOT.to_string(); cluster.masters() - 1];
    want.push(OK.into());
    want.sort();
    assert_eq!(answers, want);
}

#[test]
fn client_tracking_and_monitor_get_a_clear_error_and_the_client_goes_on() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let keys = cluster.keys_on_every_master("tr");
    let tracking = "-ERR nearcache: CLIENT TRACKING is not supported on a Redis Cluster upstream (each node tracks only its own keys)\r\n";
    let monitor = "-ERR nearcache: MONITOR is not supported on a Redis Cluster upstream (each node shows only its own commands)\r\n";

    for proto in ["2", "3"] {
        let mut c = RawClient::connect(proxy.port);
        let _hello = c.line(&format!("HELLO {proto}"));
        // Pipelined behind it, keys on every master: their values, no MOVED.
        c.send(&[b"CLIENT", b"TRACKING", b"ON"]);
        for k in &keys {
            c.send(&[b"SET", k.as_bytes(), k.as_bytes()]);
            c.send(&[b"GET", k.as_bytes()]);
        }
        assert_eq!(text(c.reply()), tracking, "RESP{proto}");
        for k in &keys {
            assert_eq!(text(c.reply()), OK, "{k}");
            assert_eq!(text(c.reply()), bulk(k), "{k}");
        }
        assert_eq!(line(&mut c, "CLIENT TRACKING on BCAST PREFIX tr"), tracking);
        let info = line(&mut c, "CLIENT TRACKINGINFO");
        assert!(info.contains("off"), "not tracking: {info}");
        // Inside a transaction: refused, and the transaction with it.
        assert_eq!(line(&mut c, "MULTI"), OK);
        assert_eq!(line(&mut c, "CLIENT TRACKING ON"), tracking);
        assert_eq!(line(&mut c, &format!("SET {} x", keys[0])), QUEUED);
        assert_eq!(
            line(&mut c, "EXEC"),
            "-EXECABORT Transaction discarded because of previous errors.\r\n"
        );
        assert_eq!(line(&mut c, &format!("GET {}", keys[0])), bulk(&keys[0]));

        c.send(&[b"MONITOR"]);
        for k in &keys {
            c.send(&[b"GET", k.as_bytes()]);
        }
        assert_eq!(text(c.reply()), monitor, "RESP{proto}");
        for k in &keys {
            assert_eq!(text(c.reply()), bulk(k), "{k}");
        }
        // Not monitoring: another client's command shows nothing here.
        let _: () = redis::cmd("SET")
            .arg(&keys[1])
            .arg(&keys[1])
            .query(&mut proxy.conn())
            .unwrap();
        assert_eq!(c.try_reply(Duration::from_millis(300)), None);
        assert_eq!(line(&mut c, "PING"), "+PONG\r\n");
    }
}

/// Redis 7.0 has no NO-TOUCH: the node's refusal is passed through and the
/// reads after it are answered.
#[test]
fn no_touch_is_refused_as_a_redis_7_0_node_refuses_it() {
    no_touch_through(Cluster::start(3));
}

/// A Redis 8 cluster (the server `scripts/test` installs): the whole
/// NO-TOUCH path.
#[test]
fn no_touch_commands_reach_the_node_of_their_key() {
    no_touch_through(Cluster::start_of(&redis8_server(), 3, 0));
}

fn no_touch_through(cluster: Cluster) {
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let keys = cluster.keys_on_every_master("nt");
    for k in &keys {
        set_direct(&cluster, k, k);
    }
    // What a node answers (Redis 7.0 has no NO-TOUCH; 7.2 and later do).
    let own = text(RawClient::connect(cluster.nodes[0].port).line("CLIENT NO-TOUCH ON"));
    let mut c = RawClient::connect(proxy.port);
    c.send(&[b"CLIENT", b"NO-TOUCH", b"ON"]);
    for k in &keys {
        c.send(&[b"GET", k.as_bytes()]);
    }
    assert_eq!(text(c.reply()), own);
    for k in &keys {
        assert_eq!(text(c.reply()), bulk(k), "{k}");
    }
    if own != OK {
        eprintln!(
            "the nodes refuse NO-TOUCH ({}): its own path is not exercised",
            own.trim_end()
        );
        return;
    }
    // A server with NO-TOUCH: reads through nearcache leave the keys' idle
    // time alone on every node; a MULTI and a BLPOP go to their key's node.
    std::thread::sleep(Duration::from_millis(2100));
    for k in &keys {
        assert_eq!(line(&mut c, &format!("GET {k}")), bulk(k));
    }
    for k in &keys {
        let idle: i64 = redis::cmd("OBJECT")
            .arg("IDLETIME")
            .arg(k)
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
        assert!(idle >= 2, "{k} touched: idle {idle}");
    }
    // Moving back to a node takes the connection kept there: no new one.
    let connections = || -> i64 {
        cluster
            .nodes
            .iter()
            .map(|n| {
                info_field(n, "stats", "total_connections_received")
                    .parse::<i64>()
                    .unwrap()
            })
            .sum()
    };
    let before = connections();
    for _ in 0..3 {
        for k in &keys {
            assert_eq!(line(&mut c, "MULTI"), OK);
            assert_eq!(line(&mut c, &format!("GET {k}")), QUEUED);
            assert_eq!(line(&mut c, "EXEC"), format!("*1\r\n{}", bulk(k)));
            assert_eq!(line(&mut c, &format!("BLPOP {k}list 0.1")), "*-1\r\n");
        }
    }
    // (Each count opens a connection to every node.) 18 moves, each a new
    // connection without the reuse; nearcache's own pools and checks may
    // open a few meanwhile on a loaded machine.
    let opened = connections() - before - cluster.nodes.len() as i64;
    assert!(
        opened <= 12,
        "{opened} connections opened moving between nodes"
    );
    // Watching on one node, a read of another node's key goes by the
    // router (it touches that key: the price of no redirect).
    let first = cluster.owner_of(&keys[0]).port;
    let far = keys
        .iter()
        .find(|k| cluster.owner_of(k).port != first)
        .unwrap();
    assert_eq!(line(&mut c, &format!("WATCH {}", keys[0])), OK);
    assert_eq!(line(&mut c, &format!("GET {far}")), bulk(far));
    assert_eq!(line(&mut c, "UNWATCH"), OK);
    assert_eq!(line(&mut c, "CLIENT NO-TOUCH OFF"), OK);
    for k in &keys {
        assert_eq!(line(&mut c, &format!("GET {k}")), bulk(k));
    }
}

/// The slot of each key moved while nearcache's map is stale (refreshed
/// every 60 s, L1 off: nothing else tells it): a command on a pinned
/// connection to the old owner gets that node's MOVED. A blocking command
/// that nothing else ties to the node is sent on to the new owner, as any
/// routed command is. Otherwise (WATCH, a transaction) the client gets a
/// `TRYAGAIN` error instead (the command did not run, and the connection's
/// state is on the old node), the map learns the new owner, and the same
/// command again reaches it.
#[test]
fn a_moved_on_a_pinned_connection_never_reaches_the_client() {
    let cluster = Cluster::start(3);
    let mut cfg = test_config(&cluster.url());
    cfg.cache.enabled = false;
    cfg.upstream.cluster.refresh_interval = Duration::from_secs(60);
    let proxy = Proxy::with_config(cfg);
    let from = cluster.owner_of("pm0");
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let mut keys: Vec<String> = Vec::new();
    for k in (0..).map(|i| format!("pm{i}")) {
        if cluster.owner_of(&k).port == from.port
            && keys
                .iter()
                .all(|o| slot(o.as_bytes()) != slot(k.as_bytes()))
        {
            keys.push(k);
        }
        if keys.len() == 4 {
            break;
        }
    }
    // One slot at a time: the MOVED of one makes nearcache refresh its
    // whole map (within some 50 ms), which would learn the others too.
    let move_slot = |k: &str| {
        std::thread::sleep(Duration::from_millis(500));
        let s = slot(k.as_bytes());
        support::cluster::begin_slot_move(s, from, to);
        support::cluster::assign_slot(s, to, &cluster.nodes);
    };
    let tryagain = |reply: String| {
        assert!(
            reply.starts_with("-TRYAGAIN nearcache: the key's slot is moving or moved to "),
            "{reply}"
        )
    };
    let mut c = RawClient::connect(proxy.port);
    move_slot(&keys[0]);
    let _: () = redis::cmd("RPUSH")
        .arg(&keys[0])
        .arg("at the new owner")
        .query(&mut to.conn())
        .unwrap();
    c.send(&[b"BLPOP", keys[0].as_bytes(), b"5"]);
    assert_eq!(
        text(c.reply()),
        format!("*2\r\n{}{}", bulk(&keys[0]), bulk("at the new owner"))
    );
    // And it blocks there: a push to the new owner wakes it.
    move_slot(&keys[3]);
    c.send(&[b"BLPOP", keys[3].as_bytes(), b"5"]);
    std::thread::sleep(Duration::from_millis(300));
    let _: () = redis::cmd("RPUSH")
        .arg(&keys[3])
        .arg("later")
        .query(&mut to.conn())
        .unwrap();
    assert_eq!(
        text(c.reply()),
        format!("*2\r\n{}{}", bulk(&keys[3]), bulk("later"))
    );
    move_slot(&keys[1]);
    tryagain(line(&mut c, &format!("WATCH {}", keys[1])));
    assert_eq!(line(&mut c, &format!("WATCH {}", keys[1])), OK);
    assert_eq!(line(&mut c, "UNWATCH"), OK);
    // In a transaction, as a node does with a command it refuses: EXECABORT.
    move_slot(&keys[2]);
    assert_eq!(line(&mut c, "MULTI"), OK);
    tryagain(line(&mut c, &format!("SET {} x", keys[2])));
    assert_eq!(
        line(&mut c, "EXEC"),
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(line(&mut c, "MULTI"), OK);
    assert_eq!(line(&mut c, &format!("SET {} x", keys[2])), QUEUED);
    assert_eq!(line(&mut c, "EXEC"), "*1\r\n+OK\r\n");
    let v: String = redis::cmd("GET")
        .arg(&keys[2])
        .query(&mut to.conn())
        .unwrap();
    assert_eq!(v, "x");
}

/// A queue consumer blocked in `BLPOP key 0` when the key's slot moves to
/// another master (resharding): the old owner ends the block with `MOVED`
/// (Redis redirects clients blocked on a slot it no longer serves); nothing
/// was popped, so nearcache blocks the command again at the new owner and
/// the consumer, still waiting, gets the next element pushed there.
#[test]
fn a_blocked_command_follows_its_slot_when_it_moves() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let key = "queue:jobs";
    let from = cluster.owner_of(key);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    let mut c = blpop_blocked_on(&proxy, from, key);
    let s = slot(key.as_bytes());
    support::cluster::begin_slot_move(s, from, to);
    support::cluster::assign_slot(s, to, &cluster.nodes);
    woken_at(&mut c, to, key, false);
    assert_eq!(info_field(from, "clients", "blocked_clients"), "0");
}

/// A queue consumer blocked in `BLPOP key 0` through a failover of the
/// key's master (`CLUSTER FAILOVER` on its replica): the demoted master
/// ends the block with `-UNBLOCKED … instance state changed`; nothing was
/// popped, so nearcache blocks the command again at the slot's new owner,
/// and the consumer gets the next element pushed there.
#[test]
fn a_blocked_command_follows_its_slot_through_a_failover() {
    let cluster = Cluster::start(3);
    let key = "queue:jobs";
    let old = cluster.owner_of(key);
    let replica = cluster.add_replica(old);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut c = blpop_blocked_on(&proxy, old, key);
    replica.take_over();
    woken_at(&mut c, &replica, key, false);
}

/// A BLPOP of a key whose slot is being migrated and that is not on the
/// source: the source answers `ASK`; nearcache sends `ASKING` and the
/// command to the target (the client sees neither the redirect nor the
/// `ASKING` answer), where it blocks until a push there.
#[test]
fn a_blocking_command_answered_ask_blocks_at_the_migration_target() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let key = "queue:migrating";
    let from = cluster.owner_of(key);
    let to = cluster.nodes.iter().find(|n| n.port != from.port).unwrap();
    support::cluster::begin_slot_move(slot(key.as_bytes()), from, to);
    let mut c = blpop_blocked_on(&proxy, to, key);
    woken_at(&mut c, to, key, true);
    c.send(&[b"PING"]);
    assert_eq!(text(c.reply()), "+PONG\r\n");
}

/// A client of `proxy` that sent `BLPOP key 0`, once `node` holds it blocked.
fn blpop_blocked_on(proxy: &Proxy, node: &RedisServer, key: &str) -> RawClient {
    let mut c = RawClient::connect(proxy.port);
    c.send(&[b"BLPOP", key.as_bytes(), b"0"]);
    wait_until("the BLPOP blocked", Duration::from_secs(5), || {
        info_field(node, "clients", "blocked_clients") == "1"
    });
    c
}

/// Once `node` holds the client's BLPOP blocked (within 10 s), a push of
/// `job 1` there (after `ASKING` with `asking`) is what the client gets.
fn woken_at(c: &mut RawClient, node: &RedisServer, key: &str, asking: bool) {
    wait_until("the BLPOP blocked there", Duration::from_secs(10), || {
        info_field(node, "clients", "blocked_clients") == "1"
    });
    let mut push = redis::pipe();
    if asking {
        push.cmd("ASKING").ignore();
    }
    let _: () = push
        .cmd("RPUSH")
        .arg(key)
        .arg("job 1")
        .ignore()
        .query(&mut node.conn())
        .unwrap();
    assert_eq!(
        text(c.reply()),
        format!("*2\r\n{}{}", bulk(key), bulk("job 1"))
    );
}
