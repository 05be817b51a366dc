//! The TDengine tier in front of a Redis Cluster: a real 3-master cluster
//! (`tests/support/cluster.rs`), nearcache in-process with L1 on (one
//! invalidation feed per master), and the taosAdapter **protocol stand-in**
//! (`tests/support/taosadapter.rs`; not TDengine) that the real `taos`
//! client talks to. A miss of a `kline:{symbol}:{freq}` key is read from
//! TDengine and written back to the master that owns the key's slot.

mod support;
#[macro_use]
#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::Cluster;
use support::{cmdstat, runtime, test_config, wait_until, Proxy, RedisServer};
use taosadapter::{expected_1d, Fault, TaosAdapter};

/// The cluster, the stand-in on its own runtime, and nearcache with the
/// kline route. Fields drop in reverse order: proxy, stand-in, runtime, cluster.
struct Env {
    cluster: Cluster,
    _rt: tokio::runtime::Runtime,
    ta: TaosAdapter,
    proxy: Proxy,
    /// One symbol per master: `kline:{symbol}:1d` lives on `cluster.nodes[i]`'s
    /// slots for the i-th symbol, each with rows in the stand-in.
    symbols: Vec<String>,
}

impl Env {
    fn start() -> Env {
        let cluster = Cluster::start(3);
        let rt = runtime();
        let ta = rt.block_on(TaosAdapter::start(taosadapter::BINARY_PATH));
        let mut symbols = Vec::new();
        for node in &cluster.nodes {
            let symbol = (0..)
                .map(|i| format!("S{i}"))
                .find(|s| cluster.owner_of(&kline(s)).port == node.port)
                .unwrap();
            ta.add_symbol(&symbol);
            symbols.push(symbol);
        }
        let mut config = test_config(&cluster.url());
        config.cache.invalidation = nearcache::config::InvalidationMode::Tracking;
        config.tdengine = Some(taosadapter::kline_config(ta.dsn(), Duration::from_secs(3)));
        let proxy = Proxy::with_config(config);
        proxy.wait_serving();
        Env {
            cluster,
            _rt: rt,
            ta,
            proxy,
            symbols,
        }
    }

    fn owner(&self, key: &str) -> &RedisServer {
        self.cluster.owner_of(key)
    }
}

fn kline(symbol: &str) -> String {
    format!("kline:{symbol}:1d")
}

fn get(c: &mut redis::Connection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query(c).unwrap()
}

fn parse(v: &[u8]) -> Value {
    serde_json::from_slice(v).expect("valid JSON")
}

fn pttl(node: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(&mut node.conn()).unwrap()
}

#[test]
fn cold_gets_on_every_master_fill_from_tdengine_write_back_to_the_owner_and_then_hit_l1() {
    let env = Env::start();
    let mut c = env.proxy.conn();
    for symbol in &env.symbols {
        let key = kline(symbol);
        let v = get(&mut c, &key).expect("filled from TDengine");
        assert_eq!(parse(&v), expected_1d(symbol), "{key}");
        // Written back where the cluster keeps the key, with the route's TTL.
        let owner = env.owner(&key);
        assert_eq!(
            get(&mut owner.conn(), &key).as_deref(),
            Some(&v[..]),
            "{key}"
        );
        let ms = pttl(owner, &key);
        assert!(
            (14 * 60_000..=15 * 60_000).contains(&ms),
            "{key}: PTTL {ms}"
        );
    }
    assert_eq!(
        env.ta.query_count(),
        env.symbols.len(),
        "{:?}",
        env.ta.sql_log()
    );

    // From now on Redis has them: no more TDengine queries, and L1 serves
    // them (a fill racing with its own write-back's invalidation is not
    // stored, so it may take a read or two).
    for symbol in &env.symbols {
        let key = kline(symbol);
        let want = get(&mut env.owner(&key).conn(), &key).unwrap();
        wait_until(&format!("{key} from L1"), Duration::from_secs(5), || {
            let hits = env.proxy.stat("hits");
            assert_eq!(get(&mut c, &key).as_deref(), Some(&want[..]), "{key}");
            env.proxy.stat("hits") > hits
        });
        let gets = cmdstat(env.owner(&key), "get");
        for _ in 0..3 {
            assert_eq!(get(&mut c, &key).as_deref(), Some(&want[..]));
        }
        assert_eq!(cmdstat(env.owner(&key), "get"), gets, "{key}: L1 served it");
    }
    assert_eq!(env.ta.query_count(), env.symbols.len());
}

#[test]
fn mget_across_masters_fills_its_misses_from_tdengine_in_key_order() {
    let env = Env::start();
    let in_redis = kline(&env.symbols[1]);
    let _: () = redis::cmd("SET")
        .arg(&in_redis)
        .arg("from-redis")
        .query(&mut env.owner(&in_redis).conn())
        .unwrap();
    let plain = "ind:none:rsi:1d";
    let keys = [
        kline(&env.symbols[2]),
        plain.to_string(),
        in_redis.clone(),
        "kline:NOSUCH:1d".to_string(),
        kline(&env.symbols[0]),
    ];
    let mut c = env.proxy.conn();
    for round in 0..2 {
        let got: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys[..]).query(&mut c).unwrap();
        assert_eq!(got.len(), 5, "round {round}");
        assert_eq!(
            parse(got[0].as_ref().unwrap()),
            expected_1d(&env.symbols[2])
        );
        assert_eq!(got[1], None, "no route: Redis's nil");
        assert_eq!(
            got[2].as_deref(),
            Some(&b"from-redis"[..]),
            "Redis's value wins"
        );
        assert_eq!(got[3], None, "no rows: nil");
        assert_eq!(
            parse(got[4].as_ref().unwrap()),
            expected_1d(&env.symbols[0])
        );
        // Two fills with rows and one without; later rounds ask again only
        // for the key without rows (no negative caching configured).
        assert_eq!(
            env.ta.query_count(),
            3 + round,
            "round {round}: {:?}",
            env.ta.sql_log()
        );
    }
    for key in [&keys[0], &keys[4]] {
        let ms = pttl(env.owner(key), key);
        assert!(
            (14 * 60_000..=15 * 60_000).contains(&ms),
            "{key}: PTTL {ms}"
        );
    }
    assert_eq!(pttl(env.owner(&in_redis), &in_redis), -1, "untouched");
    assert_eq!(get(&mut env.owner(plain).conn(), plain), None);
}

/// A write of a key pipelined behind its slow fill runs after the fill's
/// write-back, as Redis would order them: the GET answers TDengine's rows,
/// the SET's value is what stays.
#[test]
fn a_write_pipelined_after_a_tdengine_fill_runs_after_its_write_back() {
    let env = Env::start();
    env.ta.set_fault(Fault::Slow(Duration::from_millis(300)));
    let key = kline(&env.symbols[1]);
    let mut c = env.proxy.conn();
    let (first, (), second): (Vec<u8>, (), Vec<u8>) = redis::pipe()
        .cmd("GET")
        .arg(&key)
        .cmd("SET")
        .arg(&key)
        .arg("mine")
        .cmd("GET")
        .arg(&key)
        .query(&mut c)
        .unwrap();
    assert_eq!(parse(&first), expected_1d(&env.symbols[1]));
    assert_eq!(second, b"mine");
    let owner = env.owner(&key);
    assert_eq!(get(&mut owner.conn(), &key).as_deref(), Some(&b"mine"[..]));
    assert_eq!(pttl(owner, &key), -1, "the SET ran last");
}

/// A filled entry is invalidated like any other: a write on the owner
/// replaces it, a DEL makes the next read ask TDengine again.
#[test]
fn writes_on_the_owner_invalidate_a_filled_entry() {
    let env = Env::start();
    let key = kline(&env.symbols[2]);
    let mut c = env.proxy.conn();
    let filled = get(&mut c, &key).unwrap();
    wait_until(&format!("{key} from L1"), Duration::from_secs(5), || {
        let hits = env.proxy.stat("hits");
        assert_eq!(get(&mut c, &key).as_deref(), Some(&filled[..]));
        env.proxy.stat("hits") > hits
    });
    let mut owner = env.owner(&key).conn();
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("newer")
        .query(&mut owner)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while get(&mut c, &key).as_deref() != Some(&b"newer"[..]) {
        assert!(
            Instant::now() < deadline,
            "the filled entry outlived a write"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _: () = redis::cmd("DEL").arg(&key).query(&mut owner).unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v = get(&mut c, &key).expect("never nil: refilled");
        if v != b"newer" {
            assert_eq!(parse(&v), expected_1d(&env.symbols[2]));
            break;
        }
        assert!(Instant::now() < deadline, "the entry outlived a DEL");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(env.ta.query_count(), 2, "{:?}", env.ta.sql_log());
}
