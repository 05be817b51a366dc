//! Shard channels (SSUBSCRIBE / SPUBLISH) through nearcache in front of a
//! real 3-master Redis Cluster (`tests/support/cluster.rs`), with a plain
//! client on a raw socket so every frame is seen as sent: a channel follows
//! its slot to a new owner (the old owner's unasked `sunsubscribe` is not
//! passed on), channels on two nodes share one client stream with the
//! counts one Redis gives, a stale map's `MOVED` is followed, a lost link
//! (a killed connection, a SIGKILLed master) is subscribed again at the
//! slot's owner, and a channel no node will serve is given up with
//! the `sunsubscribe` a node would send. See `src/server/shard.rs`.

mod support;

use std::time::Duration;

use nearcache::upstream::cluster::slots::slot;
use support::cluster::{assign_slot, begin_slot_move, Cluster};
use support::*;

/// What Redis sends for one channel of an (un)subscribe, RESP2.
fn conf(word: &str, channel: &str, count: i64) -> Vec<u8> {
    format!(
        "*3\r\n${}\r\n{word}\r\n${}\r\n{channel}\r\n:{count}\r\n",
        word.len(),
        channel.len()
    )
    .into_bytes()
}

fn smessage(channel: &str, payload: &str) -> Vec<u8> {
    format!(
        "*3\r\n$8\r\nsmessage\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
        channel.len(),
        payload.len()
    )
    .into_bytes()
}

fn text(frame: &[u8]) -> String {
    String::from_utf8_lossy(frame).into_owned()
}

/// Two channels whose slots different masters own.
fn channels_on_two_masters(cluster: &Cluster) -> (String, String) {
    let a = "orders".to_string();
    let owner = cluster.owner_of(&a).port;
    let b = (0..)
        .map(|i| format!("prices{i}"))
        .find(|c| cluster.owner_of(c).port != owner)
        .unwrap();
    (a, b)
}

/// SPUBLISH on one node directly; returns how many subscribers got it.
fn spublish(node: &RedisServer, channel: &str, payload: &str) -> i64 {
    redis::cmd("SPUBLISH")
        .arg(channel)
        .arg(payload)
        .query(&mut node.conn())
        .unwrap()
}

/// `PUBSUB SHARDNUMSUB channel` on one node.
fn subscribers_on(node: &RedisServer, channel: &str) -> i64 {
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("SHARDNUMSUB")
        .arg(channel)
        .query(&mut node.conn())
        .unwrap();
    n
}

/// Moves `slot` from `from` to `to` the way the migration tests do:
/// IMPORTING / MIGRATING, then SETSLOT NODE on the new owner first and on
/// every other node (the old owner drops its shard channels then).
fn move_slot(cluster: &Cluster, slot: u16, from: &RedisServer, to: &RedisServer) {
    begin_slot_move(slot, from, to);
    assign_slot(slot, to, &cluster.nodes);
}

/// The case: a client SSUBSCRIBEs through nearcache, the channel's
/// slot migrates to another master, and a message SPUBLISHed on the new
/// owner reaches the client; the old owner's `sunsubscribe` never does.
/// With channels on two masters the client sees one stream and the counts
/// one Redis gives, before and after the move; in RESP2 it is in pub/sub
/// mode as on Redis until its last shard channel is gone.
#[test]
fn a_shard_channel_follows_its_slot_to_the_new_owner() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let (a, b) = channels_on_two_masters(&cluster);
    let from = cluster.owner_of(&a);
    let to = cluster.owner_of(&b);
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("ssubscribe", &a, 1)));
    sub.send(&[b"SSUBSCRIBE", b.as_bytes()]);
    assert_eq!(
        text(&sub.reply()),
        text(&conf("ssubscribe", &b, 2)),
        "a second shard channel on another master: one Redis would count 2"
    );
    assert_eq!(subscribers_on(from, &a), 1);
    assert_eq!(subscribers_on(to, &b), 1);
    assert_eq!(spublish(from, &a, "before"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&a, "before")));
    assert_eq!(spublish(to, &b, "other"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&b, "other")));

    move_slot(&cluster, slot(a.as_bytes()), from, to);
    wait_until(
        "the channel subscribed at its new owner",
        Duration::from_secs(5),
        || subscribers_on(to, &a) == 1,
    );
    assert_eq!(subscribers_on(from, &a), 0, "the old owner dropped it");
    assert_eq!(spublish(to, &a, "after"), 1);
    // The next frame is the message: the old owner's sunsubscribe was not passed on.
    assert_eq!(text(&sub.reply()), text(&smessage(&a, "after")));
    // Through nearcache too (SPUBLISH is routed by its channel's slot).
    let n: i64 = redis::cmd("SPUBLISH")
        .arg(&a)
        .arg("routed")
        .query(&mut proxy.conn())
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&a, "routed")));
    assert_eq!(spublish(to, &b, "still"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&b, "still")));

    // RESP2 pub/sub mode, as on Redis.
    sub.send(&[b"PING"]);
    assert_eq!(text(&sub.reply()), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    sub.send(&[b"GET", b"k"]);
    assert_eq!(
        text(&sub.reply()),
        "-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
    // Both channels are on one node now; the counts are the client's.
    sub.send(&[b"SUNSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("sunsubscribe", &a, 1)));
    sub.send(&[b"SUNSUBSCRIBE"]);
    assert_eq!(text(&sub.reply()), text(&conf("sunsubscribe", &b, 0)));
    sub.send(&[b"SUNSUBSCRIBE"]);
    assert_eq!(
        text(&sub.reply()),
        "*3\r\n$12\r\nsunsubscribe\r\n$-1\r\n:0\r\n",
        "nothing left: Redis's nil channel"
    );
    sub.send(&[b"PING"]);
    assert_eq!(text(&sub.reply()), "+PONG\r\n", "out of pub/sub mode");
    assert_eq!(subscribers_on(to, &a), 0);
    assert_eq!(subscribers_on(to, &b), 0);
}

/// Channels of two slots in one command get the node's `CROSSSLOT` (a
/// single Redis would take them; a cluster node does not); in two commands
/// they may live on two masters. RESP3: confirmations and messages are
/// pushes, and the client's other commands go where they would go without
/// its shard channels (by slot), a blocking one included.
#[test]
fn channels_of_two_slots_in_one_command_are_crossslot_in_two_commands_fine() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let (a, b) = channels_on_two_masters(&cluster);
    let mut direct = RawClient::connect(cluster.owner_of(&a).port);
    direct.send(&[b"SSUBSCRIBE", a.as_bytes(), b.as_bytes()]);
    let node_says = text(&direct.reply());
    assert!(node_says.starts_with("-CROSSSLOT"), "{node_says}");

    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"HELLO", b"3"]);
    sub.reply();
    sub.send(&[b"SSUBSCRIBE", a.as_bytes(), b.as_bytes()]);
    assert_eq!(text(&sub.reply()), node_says);
    direct.send(&[b"SUNSUBSCRIBE", a.as_bytes(), b.as_bytes()]);
    assert_eq!(text(&direct.reply()), node_says, "the node refuses it too");
    sub.send(&[b"SUNSUBSCRIBE", a.as_bytes(), b.as_bytes()]);
    assert_eq!(text(&sub.reply()), node_says);
    let push = |word: &str, ch: &str, n: i64| text(&conf(word, ch, n)).replacen('*', ">", 1);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), push("ssubscribe", &a, 1));
    sub.send(&[b"SSUBSCRIBE", b.as_bytes(), b.as_bytes()]);
    let twice = text(&sub.reply()) + &text(&sub.reply());
    assert_eq!(
        twice,
        push("ssubscribe", &b, 2) + &push("ssubscribe", &b, 2),
        "a channel named twice: confirmed twice, counted once"
    );
    // Shard channels do not pin the client: its commands go by slot, to
    // every master.
    for (k, ch) in [(&a, "1"), (&b, "2")] {
        let key = format!("{{{k}}}key");
        sub.send(&[b"SET", key.as_bytes(), ch.as_bytes()]);
        assert_eq!(text(&sub.reply()), "+OK\r\n");
        let v: String = redis::cmd("GET")
            .arg(&key)
            .query(&mut cluster.owner_of(&key).conn())
            .unwrap();
        assert_eq!(v, ch);
    }
    // A message never overtakes its channel's confirmation: the node
    // confirms the SSUBSCRIBE at once, but the confirmation waits for the
    // BLPOP sent before it, and the message waits for the confirmation.
    let c = "alerts";
    sub.send(&[b"BLPOP", b"q", b"2"]);
    sub.send(&[b"SSUBSCRIBE", c.as_bytes()]);
    let owner = cluster.owner_of(c);
    wait_until(
        "the third channel subscribed",
        Duration::from_secs(1),
        || subscribers_on(owner, c) == 1,
    );
    assert_eq!(spublish(owner, c, "early"), 1);
    assert_eq!(text(&sub.reply()), "_\r\n", "BLPOP timed out");
    assert_eq!(text(&sub.reply()), push("ssubscribe", c, 3));
    assert_eq!(
        text(&sub.reply()),
        text(&smessage(c, "early")).replacen('*', ">", 1)
    );
    sub.send(&[b"SUNSUBSCRIBE", c.as_bytes()]);
    assert_eq!(text(&sub.reply()), push("sunsubscribe", c, 2));
    for (ch, payload) in [(&a, "x"), (&b, "y")] {
        assert_eq!(spublish(cluster.owner_of(ch), ch, payload), 1);
        assert_eq!(
            text(&sub.reply()),
            text(&smessage(ch, payload)).replacen('*', ">", 1)
        );
    }
    // Back to RESP2 (Redis allows HELLO to a RESP3 subscriber): messages
    // from the links, opened in RESP3, come as RESP2 arrays.
    sub.send(&[b"HELLO", b"2"]);
    assert!(sub.reply().starts_with(b"*"));
    assert_eq!(spublish(cluster.owner_of(&b), &b, "z"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&b, "z")));
    sub.send(&[b"SUNSUBSCRIBE"]);
    let mut got = text(&sub.reply());
    got += &text(&sub.reply());
    let (first, second) = if a < b { (&a, &b) } else { (&b, &a) };
    assert_eq!(
        got,
        text(&conf("sunsubscribe", first, 1)) + &text(&conf("sunsubscribe", second, 0))
    );
}

/// nearcache's map is stale (no refresh for a minute, L1 off so no feed
/// refreshes it): the SSUBSCRIBE reaches the old owner, which answers
/// `MOVED`; it is sent on to the node named, and the client is subscribed.
/// RESET then ends the subscription.
#[test]
fn an_ssubscribe_answered_moved_is_sent_on_to_the_new_owner() {
    let cluster = Cluster::start(3);
    let mut cfg = test_config(&cluster.url());
    cfg.cache.enabled = false;
    cfg.upstream.cluster.refresh_interval = Duration::from_secs(60);
    let proxy = Proxy::with_config(cfg);
    let (a, b) = channels_on_two_masters(&cluster);
    let from = cluster.owner_of(&a);
    let to = cluster.owner_of(&b);
    move_slot(&cluster, slot(a.as_bytes()), from, to);
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("ssubscribe", &a, 1)));
    assert_eq!(subscribers_on(to, &a), 1);
    assert_eq!(spublish(to, &a, "m"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&a, "m")));
    // RESET ends the client's shard channels with its connections.
    sub.send(&[b"RESET"]);
    assert_eq!(text(&sub.reply()), "+RESET\r\n");
    wait_until(
        "the channel gone from its node",
        Duration::from_secs(5),
        || subscribers_on(to, &a) == 0,
    );
    sub.send(&[b"PING"]);
    assert_eq!(text(&sub.reply()), "+PONG\r\n");
    assert_eq!(spublish(to, &a, "gone"), 0);
    assert_eq!(sub.try_reply(Duration::from_millis(200)), None);
}

/// The node closes the connection a client's shard channels live on
/// (CLIENT KILL): the channel is subscribed again at its slot's owner (the
/// same node) and the client, still connected, hears nothing of it but
/// the next message.
#[test]
fn a_lost_shard_link_is_subscribed_again() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let (a, _) = channels_on_two_masters(&cluster);
    let owner = cluster.owner_of(&a);
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("ssubscribe", &a, 1)));
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"][..])
        .query(&mut owner.conn())
        .unwrap();
    assert_eq!(killed, 1);
    wait_until(
        "the channel subscribed again",
        Duration::from_secs(5),
        || subscribers_on(owner, &a) == 1,
    );
    assert_eq!(spublish(owner, &a, "again"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&a, "again")));
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(
        text(&sub.reply()),
        text(&conf("ssubscribe", &a, 1)),
        "still one shard channel"
    );
}

/// The node drops the channel and nothing will serve its slot (CLUSTER
/// DELSLOTS on the owner: every attempt gets CLUSTERDOWN): after its
/// retries (about 15 s) nearcache tells the client, with the `sunsubscribe`
/// a node would have sent, and the client is out of pub/sub mode.
#[test]
fn a_channel_that_cannot_be_subscribed_again_is_given_up_like_a_node_would() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let (a, _) = channels_on_two_masters(&cluster);
    let owner = cluster.owner_of(&a);
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("ssubscribe", &a, 1)));
    let _: () = redis::cmd("CLUSTER")
        .arg("DELSLOTS")
        .arg(slot(a.as_bytes()))
        .query(&mut owner.conn())
        .unwrap();
    assert_eq!(subscribers_on(owner, &a), 0);
    // Nothing for a while: the subscription is being retried.
    assert_eq!(sub.try_reply(Duration::from_secs(5)), None);
    let frame = sub
        .try_reply(Duration::from_secs(20))
        .expect("the client is told in the end");
    assert_eq!(text(&frame), text(&conf("sunsubscribe", &a, 0)));
    sub.send(&[b"PING"]);
    assert_eq!(text(&sub.reply()), "+PONG\r\n");
}

/// A failover that keeps the old master up (`CLUSTER FAILOVER` on its
/// replica): the old master, now a replica, drops the slot's channels with
/// an unasked `sunsubscribe`, and the channel follows its slot to the
/// promoted replica.
#[test]
fn a_shard_channel_follows_its_slot_through_a_failover() {
    shard_channel_through(Duration::from_secs(10), take_over_keeping_the_old_master);
}

/// The same failover while nearcache's map cannot follow at once: the
/// other masters are paused (`CLIENT PAUSE … ALL`), so the refresh that the
/// `sunsubscribe` triggers waits for them. The demoted master, now a
/// replica of the slot's new owner, would take the SSUBSCRIBE again (a
/// replica serves its master's shard channels); the channel must not be
/// left there, but wait for the map and go to the promoted replica.
#[test]
fn a_shard_channel_waits_for_the_map_rather_than_stay_on_the_demoted_master() {
    shard_channel_through(Duration::from_secs(15), |cluster, old, replica| {
        for node in cluster.nodes.iter().filter(|n| n.port != old) {
            let _: () = redis::cmd("CLIENT")
                .arg(&["PAUSE", "3000", "ALL"][..])
                .query(&mut node.conn())
                .unwrap();
        }
        take_over_keeping_the_old_master(cluster, old, replica);
    });
}

/// `CLUSTER FAILOVER` on `replica`, until the old master (`old`, kept up)
/// says it is a replica.
fn take_over_keeping_the_old_master(cluster: &mut Cluster, old: u16, replica: &RedisServer) {
    replica.take_over();
    wait_until("the old master a replica", Duration::from_secs(30), || {
        info_field(cluster.node(old), "replication", "role") == "slave"
    });
}

/// A failover that kills the master (SIGKILL: no `sunsubscribe`, the link
/// just dies): the channel is subscribed again once the replica is
/// promoted, and the client, still connected, gets the next message.
#[test]
fn a_shard_channel_follows_its_slot_through_a_sigkill_failover() {
    shard_channel_through(Duration::from_secs(20), |cluster, old, replica| {
        cluster
            .nodes
            .iter_mut()
            .find(|n| n.port == old)
            .unwrap()
            .kill();
        wait_until("the replica promoted", Duration::from_secs(30), || {
            info_field(replica, "replication", "role") == "master"
        });
    });
}

/// A client subscribed through nearcache to a shard channel whose master
/// has a replica; `fail_over(cluster, old master's port, replica)` makes
/// the replica the master. Within `resubscribed` the channel is subscribed
/// at the promoted replica, and its message reaches the client.
fn shard_channel_through(
    resubscribed: Duration,
    fail_over: impl FnOnce(&mut Cluster, u16, &RedisServer),
) {
    let mut cluster = Cluster::start(3);
    let (a, _) = channels_on_two_masters(&cluster);
    let old = cluster.owner_of(&a).port;
    let replica = cluster.add_replica(cluster.node(old));
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("ssubscribe", &a, 1)));
    fail_over(&mut cluster, old, &replica);
    wait_until(
        "the channel subscribed at the promoted replica",
        resubscribed,
        || subscribers_on(&replica, &a) == 1,
    );
    assert_eq!(spublish(&replica, &a, "promoted"), 1);
    assert_eq!(text(&sub.reply()), text(&smessage(&a, "promoted")));
}

/// Messages published through nearcache without pause while the channel's
/// slot moves: the client gets exactly the messages a node delivered to a
/// subscriber (SPUBLISH answered 1), in order, none twice; the ones
/// published while no node had the subscriber (answered 0) are the only
/// ones missing, and publishing continues to reach it after the move.
#[test]
fn messages_published_through_a_move_arrive_once_and_in_order() {
    let cluster = Cluster::start(3);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let (a, b) = channels_on_two_masters(&cluster);
    let from = cluster.owner_of(&a);
    let to = cluster.owner_of(&b);
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"SSUBSCRIBE", a.as_bytes()]);
    assert_eq!(text(&sub.reply()), text(&conf("ssubscribe", &a, 1)));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let (stop, sent, url, a) = (stop.clone(), sent.clone(), proxy.url(), a.clone());
        std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut delivered = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = redis::cmd("SPUBLISH")
                    .arg(&a)
                    .arg(i.to_string())
                    .query(&mut c)
                    .expect("SPUBLISH through the move");
                if n == 1 {
                    delivered.push(i.to_string());
                }
                i += 1;
                sent.store(i, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            (delivered, i)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before_move = sent.load(std::sync::atomic::Ordering::Relaxed);
    move_slot(&cluster, slot(a.as_bytes()), from, to);
    wait_until(
        "the channel subscribed at its new owner",
        Duration::from_secs(5),
        || subscribers_on(to, &a) == 1,
    );
    let after_move = sent.load(std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (delivered, published) = publisher.join().unwrap();
    let mut got = Vec::new();
    while got.len() < delivered.len() {
        let Some(frame) = sub.try_reply(Duration::from_secs(2)) else {
            break;
        };
        let parts = nearcache::protocol::reply_strings(&frame).unwrap();
        assert_eq!(&parts[0][..], b"smessage", "{}", text(&frame));
        got.push(String::from_utf8(parts[2].to_vec()).unwrap());
    }
    assert_eq!(sub.try_reply(Duration::from_millis(200)), None);
    assert_eq!(got, delivered, "every delivered message, once, in order");
    let n = |m: &String| m.parse::<u64>().unwrap();
    assert!(
        delivered.iter().any(|m| n(m) < before_move) && delivered.iter().any(|m| n(m) > after_move),
        "delivered before the move and after it (published {published}, delivered {})",
        delivered.len()
    );
}

// ---- Keyspace events: every master's, through one client connection ----

/// A node's keyspace and keyevent notifications for every event.
fn notify_everything(cluster: &Cluster) {
    for n in &cluster.nodes {
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "notify-keyspace-events", "KEA"][..])
            .query(&mut n.conn())
            .unwrap();
    }
}

/// The next frame that is not an event of nearcache's own feed canaries
/// (`__nearcache__:canary:…`, written and deleted on every master; a
/// subscriber on Redis itself sees them too), as text.
fn reply_not_canary(sub: &mut RawClient) -> String {
    loop {
        let f = text(&sub.reply());
        if !f.contains("__nearcache__:canary:") {
            return f;
        }
    }
}

/// Waits until every master holds `n` pattern subscriptions.
fn patterns_on_every_master(cluster: &Cluster, n: i64) {
    wait_until("every master subscribed", Duration::from_secs(5), || {
        cluster.nodes.iter().all(|node| {
            let pats: i64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query(&mut node.conn())
                .unwrap();
            pats == n
        })
    });
}

/// What a pattern subscriber gets for one message, RESP2.
fn pmessage(pattern: &str, channel: &str, payload: &str) -> String {
    format!(
        "*4\r\n$8\r\npmessage\r\n${}\r\n{pattern}\r\n${}\r\n{channel}\r\n${}\r\n{payload}\r\n",
        pattern.len(),
        channel.len(),
        payload.len()
    )
}

/// The frames that arrive within `wait`, as text, but for the events of
/// nearcache's own feed canaries (see [`reply_not_canary`]).
fn frames_within(sub: &mut RawClient, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(f) = sub.try_reply(wait) {
        let f = text(&f);
        if !f.contains("__nearcache__:canary:") {
            out.push(f);
        }
    }
    out
}

/// A node publishes keyspace events for its own keys only, to its own
/// subscribers: a plain client subscribed through nearcache hears every
/// master's (a pattern and a channel), each once; a PUBLISH, which the
/// cluster bus carries to every node, still arrives once; after the
/// unsubscribe no master keeps a subscriber of nearcache's.
#[test]
fn keyspace_events_of_every_master_reach_one_subscriber() {
    let cluster = Cluster::start(3);
    notify_everything(&cluster);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let keys = cluster.keys_on_every_master("ev:");
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"PSUBSCRIBE", b"__keyspace@0__:ev:*"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("psubscribe", "__keyspace@0__:ev:*", 1))
    );
    sub.send(&[b"SUBSCRIBE", b"__keyevent@0__:del"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("subscribe", "__keyevent@0__:del", 2))
    );
    sub.send(&[b"PSUBSCRIBE", b"*"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("psubscribe", "*", 3))
    );
    // Every master holds the subscriptions (the mirrors are opened as the
    // client subscribes).
    patterns_on_every_master(&cluster, 2);
    for k in &keys {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("v")
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
    }
    let mut got = frames_within(&mut sub, Duration::from_millis(500));
    let mut want: Vec<String> = keys
        .iter()
        .flat_map(|k| {
            let channel = format!("__keyspace@0__:{k}");
            [
                pmessage("__keyspace@0__:ev:*", &channel, "set"),
                pmessage("*", &channel, "set"),
                pmessage("*", "__keyevent@0__:set", k),
            ]
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "each master's events, once per matching subscription"
    );

    // A channel subscription: DEL events of every master.
    sub.send(&[b"PUNSUBSCRIBE", b"*"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("punsubscribe", "*", 2))
    );
    for k in &keys {
        let _: i64 = redis::cmd("DEL")
            .arg(k)
            .query(&mut cluster.owner_of(k).conn())
            .unwrap();
    }
    let mut got = frames_within(&mut sub, Duration::from_millis(500));
    let mut want: Vec<String> = keys
        .iter()
        .flat_map(|k| {
            [
                pmessage("__keyspace@0__:ev:*", &format!("__keyspace@0__:{k}"), "del"),
                text(
                    &format!(
                        "*3\r\n$7\r\nmessage\r\n$18\r\n__keyevent@0__:del\r\n${}\r\n{k}\r\n",
                        k.len()
                    )
                    .into_bytes(),
                ),
            ]
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // PUBLISH reaches every node by the cluster bus: still once.
    sub.send(&[b"PSUBSCRIBE", b"*"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("psubscribe", "*", 3))
    );
    patterns_on_every_master(&cluster, 2);
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&["news", "hi"][..])
        .query(&mut cluster.nodes[2].conn())
        .unwrap();
    assert_eq!(
        frames_within(&mut sub, Duration::from_millis(500)),
        [pmessage("*", "news", "hi")]
    );

    sub.send(&[b"PUNSUBSCRIBE"]);
    reply_not_canary(&mut sub);
    reply_not_canary(&mut sub);
    sub.send(&[b"UNSUBSCRIBE"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("unsubscribe", "__keyevent@0__:del", 0))
    );
    wait_until(
        "no master keeps a subscriber",
        Duration::from_secs(5),
        || {
            cluster.nodes.iter().all(|n| {
                let pats: i64 = redis::cmd("PUBSUB")
                    .arg("NUMPAT")
                    .query(&mut n.conn())
                    .unwrap();
                let (_, subs): (String, i64) = redis::cmd("PUBSUB")
                    .arg(&["NUMSUB", "__keyevent@0__:del"][..])
                    .query(&mut n.conn())
                    .unwrap();
                pats == 0 && subs == 0
            })
        },
    );
    sub.send(&[b"PING"]);
    assert_eq!(reply_not_canary(&mut sub), "+PONG\r\n");
}

/// A replica promoted while the client is subscribed (CLUSTER FAILOVER):
/// the new master gets the subscription at the next check, and its keyspace
/// events reach the client.
#[test]
fn keyspace_events_follow_a_failover() {
    let cluster = Cluster::start(3);
    notify_everything(&cluster);
    let proxy = Proxy::with_config(test_config(&cluster.url()));
    let mut sub = RawClient::connect(proxy.port);
    sub.send(&[b"PSUBSCRIBE", b"__keyspace@0__:*"]);
    assert_eq!(
        reply_not_canary(&mut sub),
        text(&conf("psubscribe", "__keyspace@0__:*", 1))
    );
    patterns_on_every_master(&cluster, 1);
    let old = &cluster.nodes[2];
    let key = (0..)
        .map(|i| format!("fo:{i}"))
        .find(|k| cluster.owner_of(k).port == old.port)
        .unwrap();
    let replica = cluster.add_replica(old);
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "notify-keyspace-events", "KEA"][..])
        .query(&mut replica.conn())
        .unwrap();
    replica.take_over();
    wait_until(
        "the promoted replica subscribed",
        Duration::from_secs(10),
        || {
            let pats: i64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query(&mut replica.conn())
                .unwrap();
            pats == 1
        },
    );
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("v")
        .query(&mut replica.conn())
        .unwrap();
    assert_eq!(
        frames_within(&mut sub, Duration::from_millis(500)),
        [pmessage(
            "__keyspace@0__:*",
            &format!("__keyspace@0__:{key}"),
            "set"
        )]
    );
}
