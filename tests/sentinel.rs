//! A `redis-sentinel://` upstream against real processes: one master, one
//! replica (`--replicaof`) and three `redis-sentinel`s per test, on
//! ephemeral ports. The failover test freezes the master with SIGSTOP: its
//! sockets stay open and silent, as behind a partition, so nothing but
//! Sentinel's word can move nearcache to the new master in time.

mod support;

use std::time::{Duration, Instant};

use nearcache::config::Policy;
use redis::Commands;
use support::*;

/// A master, its replica and three Sentinels that have found each other
/// and the replica (so that a failover can reach its quorum of two).
struct Deployment {
    master: RedisServer,
    replica: RedisServer,
    sentinels: Vec<SentinelServer>,
}

impl Deployment {
    fn start() -> Deployment {
        let master = RedisServer::start();
        let replica =
            RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
        let sentinels: Vec<SentinelServer> =
            (0..3).map(|_| SentinelServer::start(master.port)).collect();
        wait_until("the replica is in sync", Duration::from_secs(20), || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut replica.conn())
                .unwrap_or_default();
            info.contains("master_link_status:up")
        });
        for s in &sentinels {
            wait_until(
                "every Sentinel knows the replica and the other two",
                Duration::from_secs(30),
                || {
                    s.master_field("num-slaves").as_deref() == Some("1")
                        && s.master_field("num-other-sentinels").as_deref() == Some("2")
                },
            );
        }
        Deployment {
            master,
            replica,
            sentinels,
        }
    }

    fn url(&self) -> String {
        let addrs: Vec<String> = self.sentinels.iter().map(|s| s.addr()).collect();
        format!("redis-sentinel://{}/m", addrs.join(","))
    }
}

fn get(c: &mut redis::Connection, key: &str) -> Option<String> {
    c.get(key).unwrap()
}

/// Reads and writes through nearcache reach the master the Sentinels name,
/// while the first Sentinel of the URL is down from the start.
#[test]
fn reads_and_writes_reach_the_master_found_through_sentinel() {
    let mut d = Deployment::start();
    d.sentinels[0].kill();
    let proxy = Proxy::with_config(test_config(&d.url()));
    let mut c = proxy.conn();

    let _: () = c.set("plain:k", "through-nearcache").unwrap();
    assert_eq!(
        get(&mut d.master.conn(), "plain:k").as_deref(),
        Some("through-nearcache"),
        "the write went to the master"
    );
    let _: () = d.master.conn().set("plain:direct", "on-master").unwrap();
    assert_eq!(get(&mut c, "plain:direct").as_deref(), Some("on-master"));
    // The replica refuses writes: had nearcache gone there, SET would fail.
    let _: i64 = c.incr("plain:counter", 5).unwrap();
    let n: i64 = d.master.conn().get("plain:counter").unwrap();
    assert_eq!(n, 5);
    assert_eq!(proxy.stat("sentinel_switches"), 0);
}

/// A Sentinel with a stale view names a replica as the master: `ROLE`
/// rejects it and the next Sentinel is asked.
#[test]
fn a_sentinel_naming_a_replica_is_passed_over() {
    let d = Deployment::start();
    // It monitors the replica under the master's name, and alone it can
    // never reach the quorum of two to "fix" that by a failover.
    let stale = SentinelServer::start(d.replica.port);
    wait_until(
        "the stale Sentinel answers",
        Duration::from_secs(10),
        || stale.master_port() == Some(d.replica.port),
    );
    let url = format!(
        "redis-sentinel://{},{}/m",
        stale.addr(),
        d.sentinels[1].addr()
    );
    let proxy = Proxy::with_config(test_config(&url));
    let mut c = proxy.conn();
    for i in 0..20 {
        let _: () = c.set(format!("plain:{i}"), i).unwrap();
    }
    let n: i64 = d.master.conn().get("plain:19").unwrap();
    assert_eq!(n, 19, "the writes went to the master");
}

/// The master freezes (SIGSTOP); the Sentinels promote the replica. The
/// write in flight at that moment gets an error (never a second execution
/// on the new master), writes go to the new master within seconds of the
/// switch, and nothing L1 held from before is served after it.
#[test]
fn failover_moves_writes_and_empties_l1() {
    let d = Deployment::start();
    let mut cfg = test_config(&d.url());
    // Long enough that only the Sentinels' word can end the old master's
    // connections, its feed and its L1 entries within the test's deadlines:
    // no command timeout, no stalled feed check, no expiry gets there first.
    cfg.upstream.command_timeout = Duration::from_secs(30);
    cfg.cache.feed_health_interval = Duration::from_secs(60);
    cfg.cache.policies = vec![Policy {
        pattern: "quote:*".into(),
        ttl: Some(Duration::from_secs(3600)),
    }];
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let mut c = proxy.conn();

    let _: () = d.master.conn().set("quote:x", "before").unwrap();
    // (The first read's fill lands in L1 a moment after its reply.)
    wait_until("quote:x is served from L1", Duration::from_secs(5), || {
        let hits = proxy.stat("hits");
        get(&mut c, "quote:x").as_deref() == Some("before") && proxy.stat("hits") > hits
    });
    wait_until("the replica has quote:x", Duration::from_secs(10), || {
        get(&mut d.replica.conn(), "quote:x").as_deref() == Some("before")
    });

    // A client blocked on the master (a pinned connection).
    let mut blocked = RawClient::connect(proxy.port);
    blocked.send(&[b"BLPOP", b"plain:queue", b"0"]);
    assert!(blocked.try_reply(Duration::from_millis(300)).is_none());

    d.master.signal("STOP");
    // The replica gets a value the master never had: the new master will
    // differ from what L1 learnt from the old one, as when the old master
    // acknowledged writes that never reached its replica.
    let mut replica = d.replica.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("replica-read-only")
        .arg("no")
        .query(&mut replica)
        .unwrap();
    let _: () = replica.set("quote:x", "diverged").unwrap();
    // A write in flight when the master goes silent.
    let mut inflight = RawClient::connect(proxy.port);
    inflight.send(&[b"RPUSH", b"log", b"in-flight"]);
    let sent = Instant::now();

    wait_until(
        "the Sentinels promote the replica",
        Duration::from_secs(30),
        || d.sentinels[1].master_port() == Some(d.replica.port),
    );
    let promoted = Instant::now();

    let reply = inflight
        .try_reply(Duration::from_secs(15))
        .expect("the in-flight write is answered well before the command timeout");
    assert!(
        reply.starts_with(b"-"),
        "a frozen master cannot have answered: {}",
        String::from_utf8_lossy(&reply)
    );
    eprintln!(
        "in-flight write answered with an error after {:?}",
        sent.elapsed()
    );

    // The blocked client learns that its connection is gone: an error or
    // its connection closed, not silence until the frozen master wakes.
    let ended = {
        use std::io::Read;
        blocked
            .s
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut buf = [0u8; 512];
        match blocked.s.read(&mut buf) {
            Ok(0) => "closed".to_string(),
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".into(),
            Err(e) => panic!("the blocked client heard nothing after the failover: {e}"),
        }
    };
    eprintln!("the blocked client: {}", ended.trim_end());
    assert!(
        ended == "closed" || ended == "reset" || ended.starts_with('-'),
        "{ended}"
    );

    // Writes reach the new master within a few seconds of the switch.
    // (A new connection: Sentinel kills the clients of a server it promotes.)
    let mut new_master = d.replica.conn();
    wait_until(
        "a write through nearcache lands on the new master",
        Duration::from_secs(8),
        || {
            let Ok(mut c) = proxy.client().get_connection() else {
                return false;
            };
            let ok: redis::RedisResult<()> = c.set("plain:after", "yes");
            ok.is_ok() && get(&mut new_master, "plain:after").as_deref() == Some("yes")
        },
    );
    eprintln!(
        "writes on the new master {:?} after the promotion",
        promoted.elapsed()
    );

    // L1 serves again once the feed is on the new master, emptied of what
    // it held before (quote:x was its only entry).
    wait_until("L1 serves again, emptied", Duration::from_secs(10), || {
        proxy.stat("serving") == 1 && proxy.stat("entries") == 0
    });
    assert_eq!(
        get(&mut c, "quote:x").as_deref(),
        Some("diverged"),
        "a value cached from the old master was served after the failover"
    );
    // And it follows the new master's writes (another client's write is
    // invalidated as soon as the feed brings it, not synchronously).
    let _: () = new_master.set("quote:x", "after").unwrap();
    wait_until(
        "L1 sees a write on the new master",
        Duration::from_secs(5),
        || get(&mut c, "quote:x").as_deref() == Some("after"),
    );
    // The in-flight write was not executed again on the new master.
    let log: Vec<String> = new_master.lrange("log", 0, -1).unwrap();
    assert!(log.is_empty(), "the in-flight write was retried: {log:?}");

    assert!(proxy.stat("sentinel_switches") >= 1);
    let (_, metrics) = proxy.http_get("/metrics");
    let failovers = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nearcache_upstream_failovers_total "))
        .expect("the failover counter is exported");
    assert!(
        failovers.trim().parse::<f64>().unwrap() >= 1.0,
        "{failovers}"
    );
}

/// `SENTINEL FAILOVER` while a client writes through nearcache without
/// pause: errors only during the switch (a bounded window), every write
/// applied at most once, and the writes after the switch on the new master.
#[test]
fn failover_under_traffic() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let d = Deployment::start();
    let proxy = Proxy::with_config(test_config(&d.url()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let client = proxy.client();
        std::thread::spawn(move || {
            let mut conn: Option<redis::Connection> = None;
            // (sequence number, when, acknowledged?)
            let mut log: Vec<(u64, Instant, bool)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match client.get_connection() {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            eprintln!("connect: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    },
                };
                i += 1;
                let r: redis::RedisResult<i64> = c.rpush("plain:log", i);
                if let Err(e) = &r {
                    eprintln!("write {i}: {e}");
                    if e.is_connection_dropped() || e.is_io_error() {
                        conn = None;
                    }
                }
                log.push((i, Instant::now(), r.is_ok()));
            }
            log
        })
    };
    wait_until("writes flow", Duration::from_secs(5), || {
        d.master.conn().llen::<_, i64>("plain:log").unwrap_or(0) > 100
    });
    let _: String = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg("m")
        .query(&mut d.sentinels[0].conn())
        .unwrap();
    wait_until(
        "the Sentinels promote the replica",
        Duration::from_secs(30),
        || d.sentinels[1].master_port() == Some(d.replica.port),
    );
    // From the moment nearcache has acted on the switch (the connections
    // to the old master closed), every acknowledged write is the new
    // master's: the old one, not yet demoted, would still take writes and
    // lose them when Sentinel turns it into a replica.
    wait_until("nearcache sees the switch", Duration::from_secs(10), || {
        proxy.stat("sentinel_switches") >= 1
    });
    let switched = Instant::now();
    // Writes land on the new master again.
    let before = d.replica.conn().llen::<_, i64>("plain:log").unwrap_or(0);
    wait_until(
        "writes through nearcache reach the new master",
        Duration::from_secs(10),
        || d.replica.conn().llen::<_, i64>("plain:log").unwrap_or(0) > before + 100,
    );
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().unwrap();

    let errors: Vec<&(u64, Instant, bool)> = log.iter().filter(|(_, _, ok)| !ok).collect();
    if let (Some(first), Some(last)) = (errors.first(), errors.last()) {
        let window = last.1 - first.1;
        eprintln!(
            "{} of {} writes failed, within {window:?}",
            errors.len(),
            log.len()
        );
        assert!(window < Duration::from_secs(5), "errors for {window:?}");
    }
    // No write was applied twice, and the last ones (after the switch) are there.
    let applied: Vec<u64> = d.replica.conn().lrange("plain:log", 0, -1).unwrap();
    let mut seen = std::collections::HashSet::new();
    for n in &applied {
        assert!(seen.insert(*n), "write {n} applied twice");
    }
    let lost: Vec<u64> = log
        .iter()
        .filter(|(n, when, ok)| *ok && *when > switched && !seen.contains(n))
        .map(|(n, _, _)| *n)
        .collect();
    assert!(
        lost.is_empty(),
        "{} writes acknowledged after the switch are not on the new master (first {:?})",
        lost.len(),
        lost.first()
    );
}

/// No Sentinel answers at start: commands get an error that says so, and
/// nearcache keeps trying until one does.
#[test]
fn no_sentinel_reachable_is_a_clear_error_then_retried() {
    let master = RedisServer::start();
    let port = free_port();
    let url = format!("redis-sentinel://127.0.0.1:{port}/m");
    let proxy = Proxy::with_config_no_wait(test_config(&url));
    error_saying(&proxy, "plain:k", "no Sentinel reachable");
    let mut c = proxy.conn();
    let _sentinel = SentinelServer::start_with(master.port, port, &[]);
    wait_until(
        "nearcache reaches the master",
        Duration::from_secs(10),
        || {
            let r: redis::RedisResult<()> = c.set("plain:k", "v");
            r.is_ok()
        },
    );
    assert_eq!(get(&mut master.conn(), "plain:k").as_deref(), Some("v"));
}

/// The Sentinels' own password (`upstream.sentinel.password`) and the
/// master's (in the URL) are separate, and both are sent.
#[test]
fn sentinel_and_master_passwords() {
    let master = RedisServer::start();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("master-pw")
        .query(&mut master.conn())
        .unwrap();
    let sentinel = SentinelServer::start_with(
        master.port,
        free_port(),
        &["requirepass sentinel-pw", "sentinel auth-pass m master-pw"],
    );
    let url = format!("redis-sentinel://:master-pw@{}/m", sentinel.addr());

    let mut cfg = test_config(&url);
    cfg.upstream.sentinel.password = Some("sentinel-pw".into());
    let proxy = Proxy::with_config(cfg);
    let _: () = proxy.conn().set("plain:k", "v").unwrap();
    let mut direct = redis::Client::open(format!("redis://:master-pw@127.0.0.1:{}", master.port))
        .unwrap()
        .get_connection()
        .unwrap();
    assert_eq!(get(&mut direct, "plain:k").as_deref(), Some("v"));

    // Without the Sentinels' password nothing is resolved (a request sent
    // before the first resolution has failed hears "not connected yet").
    let proxy = Proxy::with_config_no_wait(test_config(&url));
    error_saying(&proxy, "plain:k", "NOAUTH");
}

/// Two independent masters, `old` and `new`, each monitored as `m` by a
/// Sentinel of its own: `stale` names `old`, `knowing` names `new`. Neither
/// Sentinel can fail over alone (quorum 2) and their config epochs never
/// move, so no `+switch-master` is ever published: when `old` is demoted
/// behind their backs, only a `-READONLY` reply can tell nearcache.
struct Demotion {
    old: RedisServer,
    new: RedisServer,
    stale: SentinelServer,
    knowing: SentinelServer,
}

impl Demotion {
    fn start() -> Demotion {
        let old = RedisServer::start();
        let new = RedisServer::start();
        let stale = SentinelServer::start(old.port);
        let knowing = SentinelServer::start(new.port);
        Demotion {
            old,
            new,
            stale,
            knowing,
        }
    }

    /// The stale Sentinel first: nearcache starts on `old`.
    fn url(&self) -> String {
        format!(
            "redis-sentinel://{},{}/m",
            self.stale.addr(),
            self.knowing.addr()
        )
    }

    /// `old` becomes a replica of `new` (REPLICAOF, which closes no client
    /// connection of `old`), in sync.
    fn demote(&self) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(self.new.port)
            .query(&mut self.old.conn())
            .unwrap();
        wait_until("the old master is in sync", Duration::from_secs(20), || {
            info_field(&self.old, "replication", "master_link_status") == "up"
        });
    }

    /// No Sentinel switched: the config epochs are where they started.
    fn assert_no_sentinel_switch(&self) {
        for s in [&self.stale, &self.knowing] {
            assert_eq!(s.master_field("config-epoch").as_deref(), Some("0"));
        }
        assert_eq!(self.stale.master_port(), Some(self.old.port));
    }
}

/// The master is demoted behind the Sentinels' backs (no failover, no
/// `+switch-master`): the first write through nearcache gets `-READONLY`,
/// which makes nearcache ask the Sentinels again; the stale one's answer is
/// rejected by `ROLE`, the other names the new master, and the next writes
/// go there promptly, with L1 emptied of what it held.
#[test]
fn readonly_from_the_master_moves_writes_to_the_new_one() {
    let d = Demotion::start();
    let mut cfg = test_config(&d.url());
    // No canary write: the test's own write is the first to get READONLY.
    cfg.cache.feed_canary = false;
    cfg.cache.policies = vec![Policy {
        pattern: "quote:*".into(),
        ttl: Some(Duration::from_secs(3600)),
    }];
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let mut c = proxy.conn();
    let _: () = c.set("plain:k", "first").unwrap();
    assert_eq!(
        get(&mut d.old.conn(), "plain:k").as_deref(),
        Some("first"),
        "nearcache started on the master the first Sentinel names"
    );

    let _: () = d.new.conn().set("quote:x", "on-new").unwrap();
    d.demote();
    // Reads still work on the demoted server; L1 holds quote:x.
    wait_until("quote:x is served from L1", Duration::from_secs(5), || {
        let hits = proxy.stat("hits");
        get(&mut c, "quote:x").as_deref() == Some("on-new") && proxy.stat("hits") > hits
    });
    assert!(proxy.stat("entries") >= 1);
    assert_eq!(proxy.stat("sentinel_switches"), 0);

    let err = c.set::<_, _, ()>("plain:k", "refused").unwrap_err();
    assert!(err.to_string().contains("read only replica"), "{err}");
    let readonly_at = Instant::now();

    // The switch empties L1 (checked before any read could refill it).
    wait_until(
        "nearcache acts on the READONLY reply",
        Duration::from_secs(5),
        || proxy.stat("sentinel_switches") >= 1,
    );
    wait_until("L1 is emptied", Duration::from_secs(5), || {
        proxy.stat("entries") == 0
    });
    let mut new_master = d.new.conn();
    wait_until(
        "a write through nearcache lands on the new master",
        Duration::from_secs(5),
        || {
            let r: redis::RedisResult<()> = c.set("plain:k", "second");
            r.is_ok() && get(&mut new_master, "plain:k").as_deref() == Some("second")
        },
    );
    eprintln!(
        "writes on the new master {:?} after the READONLY reply",
        readonly_at.elapsed()
    );
    assert_eq!(
        proxy.stat_text("sentinel_master"),
        format!("127.0.0.1:{}", d.new.port)
    );
    assert_eq!(proxy.stat("sentinel_switches"), 1);
    // L1 serves again from the new master's feed.
    wait_until("L1 serves again", Duration::from_secs(10), || {
        proxy.stat("serving") == 1
    });
    let _: () = new_master.set("quote:x", "later").unwrap();
    wait_until(
        "L1 follows the new master's writes",
        Duration::from_secs(5),
        || get(&mut c, "quote:x").as_deref() == Some("later"),
    );
    d.assert_no_sentinel_switch();
}

/// The same demotion, noticed first on a pinned connection: a `SET` queued
/// in a `MULTI` opened before the demotion gets `-READONLY`, and that alone
/// moves nearcache (no write is sent on a shared connection until it has,
/// and no connection is opened meanwhile, whose `ROLE` check would notice).
#[test]
fn readonly_on_a_pinned_connection_moves_writes_too() {
    let d = Demotion::start();
    let mut cfg = test_config(&d.url());
    // No canary write through the pool, which would get READONLY first.
    cfg.cache.feed_canary = false;
    let proxy = Proxy::with_config(cfg);
    // Every connection open before the demotion (the feed's too).
    proxy.wait_serving();
    let _: () = proxy.conn().set("plain:k", "first").unwrap();
    assert_eq!(get(&mut d.old.conn(), "plain:k").as_deref(), Some("first"));
    let mut tx = RawClient::connect(proxy.port);
    assert_eq!(tx.cmd(&[b"MULTI"]), b"+OK\r\n");
    d.demote();
    assert_eq!(proxy.stat("sentinel_switches"), 0);

    let reply = tx.cmd(&[b"SET", b"plain:k", b"in-multi"]);
    assert!(
        reply.starts_with(b"-READONLY "),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    wait_until(
        "nearcache acts on the READONLY reply",
        Duration::from_secs(5),
        || proxy.stat("sentinel_switches") >= 1,
    );
    let mut new_master = d.new.conn();
    let mut c = proxy.conn();
    wait_until(
        "a write through nearcache lands on the new master",
        Duration::from_secs(5),
        || {
            let r: redis::RedisResult<()> = c.set("plain:k", "second");
            r.is_ok() && get(&mut new_master, "plain:k").as_deref() == Some("second")
        },
    );
    d.assert_no_sentinel_switch();
}

/// With the feed's canary write (the default), a demotion is noticed
/// without any client write: the canary gets `-READONLY` within
/// `feed_health_interval` (1 s), and nearcache moves to the new master.
/// Two things act on that refused canary (the READONLY hook, and the feed's
/// reconnect, whose `ROLE` check rejects the demoted server), so this test
/// holds with either one alone; the tests above isolate the hook.
#[test]
fn the_canary_write_notices_a_demotion() {
    let d = Demotion::start();
    let proxy = Proxy::with_config(test_config(&d.url()));
    proxy.wait_serving();
    assert_eq!(proxy.stat("sentinel_switches"), 0);
    d.demote();
    wait_until(
        "nearcache moves to the new master",
        Duration::from_secs(5),
        || proxy.stat_text("sentinel_master") == format!("127.0.0.1:{}", d.new.port),
    );
    let _: () = proxy.conn().set("plain:k", "v").unwrap();
    assert_eq!(get(&mut d.new.conn(), "plain:k").as_deref(), Some("v"));
    d.assert_no_sentinel_switch();
}

/// The master is demoted and the only Sentinel still names it: after the
/// `-READONLY` reply no master can be confirmed, so nearcache stops using
/// the demoted server (L1 emptied, commands get a clear error instead of
/// going on to a replica) until a master can be confirmed again.
#[test]
fn readonly_with_no_master_to_confirm_stops_using_the_demoted_server() {
    let d = Demotion::start();
    let mut cfg = test_config(&format!("redis-sentinel://{}/m", d.stale.addr()));
    cfg.cache.feed_canary = false;
    cfg.cache.policies = vec![Policy {
        pattern: "quote:*".into(),
        ttl: Some(Duration::from_secs(3600)),
    }];
    let proxy = Proxy::with_config(cfg);
    proxy.wait_serving();
    let mut c = proxy.conn();
    // Demoted to a replica of a server no Sentinel names.
    let _: () = d.new.conn().set("quote:x", "v").unwrap();
    d.demote();
    // Reads still work on the demoted server; L1 holds quote:x.
    wait_until("quote:x is served from L1", Duration::from_secs(5), || {
        let hits = proxy.stat("hits");
        get(&mut c, "quote:x").as_deref() == Some("v") && proxy.stat("hits") > hits
    });
    assert_eq!(proxy.stat("sentinel_switches"), 0);
    assert!(proxy.stat("entries") >= 1);

    let err = c.set::<_, _, ()>("plain:k", "refused").unwrap_err();
    assert!(err.to_string().contains("read only replica"), "{err}");
    wait_until(
        "nearcache drops the demoted server",
        Duration::from_secs(5),
        || proxy.stat("sentinel_switches") >= 1 && proxy.stat_text("sentinel_master").is_empty(),
    );
    wait_until("L1 is emptied", Duration::from_secs(5), || {
        proxy.stat("entries") == 0
    });
    // No command reaches the demoted server any more: every write gets
    // nearcache's own error (first "the master changed ...; reconnecting"
    // while the pool reconnects), soon the resolution's reason.
    wait_until(
        "writes get the resolution's error",
        Duration::from_secs(5),
        || {
            let err = c.set::<_, _, ()>("plain:k", "refused").unwrap_err();
            assert!(err.to_string().contains("upstream unavailable"), "{err}");
            err.to_string().contains("not the master")
        },
    );

    // The server is made master again: nearcache uses it once more.
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut d.old.conn())
        .unwrap();
    wait_until(
        "a write through nearcache lands on the master again",
        Duration::from_secs(10),
        || {
            let r: redis::RedisResult<()> = c.set("plain:k", "back");
            r.is_ok() && get(&mut d.old.conn(), "plain:k").as_deref() == Some("back")
        },
    );
}
