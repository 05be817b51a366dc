//! The TDengine tier through `Tdengine::fetch`, with the real `taos`
//! WebSocket client against the taosAdapter protocol stand-in.

#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::sync::Arc;

use futures::future::join_all;
use std::time::{Duration, Instant};

use nearcache::config::{TdFormat, TdOnError, TdRoute, TdengineConfig};
use nearcache::tdengine::{Fetch, Tdengine};
use taosadapter::{Fault, TaosAdapter, T0};

const KLINE_SQL: &str =
    "SELECT ts, open, high, low, close, volume FROM kline_{freq} WHERE symbol = {symbol} ORDER BY ts DESC LIMIT 500";

fn config(dsn: String) -> TdengineConfig {
    TdengineConfig {
        dsn,
        timeout: Duration::from_millis(500),
        on_error: TdOnError::Error,
        on_invalid_key: TdOnError::Nil,
        format: TdFormat::Json,
        max_concurrent_queries: 16,
        pool_size: 2,
        negative_ttl: Some(Duration::from_secs(30)),
        breaker_failures: 1000,
        breaker_cooldown: Duration::from_secs(5),
        routes: vec![TdRoute {
            key: "kline:{symbol}:{freq}".into(),
            sql: KLINE_SQL.into(),
            ttl: Duration::from_secs(900),
            params: taosadapter::kline_params(),
        }],
    }
}

fn rows_json(f: Fetch) -> serde_json::Value {
    match f {
        Fetch::Rows { value, .. } => serde_json::from_slice(&value).expect("valid JSON"),
        other => panic!("expected rows, got {other:?}"),
    }
}

fn is_failed(f: &Fetch) -> bool {
    matches!(f, Fetch::Failed(nearcache::Error::Tdengine(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_encoded_as_documented_json() {
    let ta = TaosAdapter::start().await;
    let td = Tdengine::new(config(ta.dsn())).unwrap();
    assert!(td.matches(b"kline:MSFT:1m"));
    let f = td.fetch(b"kline:MSFT:1m").await;
    let ttl = match &f {
        Fetch::Rows { ttl, .. } => *ttl,
        other => panic!("{other:?}"),
    };
    assert_eq!(ttl, Duration::from_secs(900));
    let Fetch::Rows { value, .. } = &f else {
        unreachable!()
    };
    // Newest first (ORDER BY ts DESC), exact values, column order kept.
    let text = std::str::from_utf8(value).unwrap();
    let expect = format!(
        r#"[{{"ts":{},"open":108.75,"high":110.25,"low":108.25,"close":109.5,"volume":1019}},{{"ts":{},"#,
        T0 + 19 * 60_000,
        T0 + 18 * 60_000
    );
    assert!(text.starts_with(&expect), "{text}");
    let v = rows_json(f);
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 20);
    let first = &rows[0];
    assert!(first["ts"].is_i64());
    assert!(first["volume"].is_i64());
    assert!(first["open"].is_f64());
    // Row index 3 (the fourth oldest) has a NULL volume.
    assert!(rows[16]["volume"].is_null());
    assert_eq!(rows[16]["ts"], T0 + 3 * 60_000);
    assert_eq!(
        ta.sql_log(),
        vec![KLINE_SQL
            .replace("{freq}", "1m")
            .replace("{symbol}", "'MSFT'")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_as_msgpack_and_latency_of_500_rows() {
    let ta = TaosAdapter::start().await;
    let mut cfg = config(ta.dsn());
    cfg.format = TdFormat::Msgpack;
    let td = Tdengine::new(cfg).unwrap();
    let f = td.fetch(b"kline:BRK.B:1d").await;
    let Fetch::Rows { value, .. } = f else {
        panic!("{f:?}")
    };
    let v = rmpv::decode::read_value(&mut &value[..]).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 500);
    let first = rows[0].as_map().unwrap();
    let keys: Vec<&str> = first.iter().map(|(k, _)| k.as_str().unwrap()).collect();
    assert_eq!(keys, ["ts", "open", "high", "low", "close", "volume"]);
    assert_eq!(first[0].1.as_i64(), Some(T0 + 599 * 86_400_000));
    assert_eq!(first[1].1.as_f64(), Some(100.0 + 5.0 + 599.0 * 0.25));
    assert_eq!(first[5].1.as_i64(), Some(1599));

    measure("stand-in with TCP_QUICKACK", &td).await;

    // The same against a server with the kernel's default delayed ACKs.
    let slow = TaosAdapter::start_without_quickack().await;
    let td = Tdengine::new(config(slow.dsn())).unwrap();
    measure("stand-in with default delayed ACKs", &td).await;
}

/// Latency of a 500-row fetch on loopback (printed, not asserted).
async fn measure(label: &str, td: &Tdengine) {
    let mut samples = Vec::new();
    for i in 0..30 {
        let key = if i % 2 == 0 {
            &b"kline:AAPL:1d"[..]
        } else {
            &b"kline:MSFT:1d"[..]
        };
        let t = Instant::now();
        let f = td.fetch(key).await;
        samples.push(t.elapsed());
        assert!(matches!(f, Fetch::Rows { .. }), "{f:?}");
    }
    samples.sort();
    println!(
        "500-row fetch latency, {label}, {} runs: min {:?}, p50 {:?}, p90 {:?}, max {:?}",
        samples.len(),
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() * 9 / 10],
        samples[samples.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_result_is_empty_with_negative_ttl() {
    let ta = TaosAdapter::start().await;
    let td = Tdengine::new(config(ta.dsn())).unwrap();
    match td.fetch(b"kline:NOSUCH:1d").await {
        Fetch::Empty { negative_ttl } => assert_eq!(negative_ttl, Some(Duration::from_secs(30))),
        other => panic!("{other:?}"),
    }
    assert_eq!(ta.query_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_never_reach_tdengine() {
    let ta = TaosAdapter::start().await;
    let td = Tdengine::new(config(ta.dsn())).unwrap();
    let long = format!("kline:{}:1d", "A".repeat(10 * 1024));
    let bad: Vec<Vec<u8>> = vec![
        b"kline:0';DROP TABLE kline_1d;--:1d".to_vec(),
        b"kline:AAPL:1d;DROP TABLE kline_1d".to_vec(),
        b"kline:AAPL' OR '1'='1:1d".to_vec(),
        b"kline:AAPL\\:1d".to_vec(),
        "kline:ÄPPL:1d".as_bytes().to_vec(),
        "kline:AAPL:1d\u{200b}".as_bytes().to_vec(),
        b"kline:\xff\xfe:1d".to_vec(),
        long.into_bytes(),
        b"kline:AAPL:2h".to_vec(),
        b"kline:AAPL:kline_1d".to_vec(),
        b"kline::1d".to_vec(),
        b"kline:AAPL:".to_vec(),
    ];
    for key in &bad {
        let f = td.fetch(key).await;
        assert!(
            matches!(f, Fetch::Invalid(_)),
            "{:?} -> {f:?}",
            String::from_utf8_lossy(key)
        );
    }
    assert!(!td.matches(b"other:AAPL:1d"));
    assert!(matches!(
        td.fetch(b"other:AAPL:1d").await,
        Fetch::Invalid(_)
    ));
    assert_eq!(
        ta.sql_log(),
        Vec::<String>::new(),
        "nothing may reach TDengine"
    );
    assert_eq!(td.stats().rejected, bad.len() as u64 + 1);
    assert_eq!(td.stats().queries, 0);
    // A valid key on the same instance still works.
    assert!(matches!(
        td.fetch(b"kline:AAPL:1d").await,
        Fetch::Rows { .. }
    ));
    assert_eq!(ta.query_count(), 1);
    assert!(!ta.sql_log()[0].contains("DROP"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_then_back() {
    let ta = TaosAdapter::start().await;
    let td = Tdengine::new(config(ta.dsn())).unwrap();
    assert!(matches!(
        td.fetch(b"kline:AAPL:1m").await,
        Fetch::Rows { .. }
    ));
    ta.set_fault(Fault::Down);
    for key in [&b"kline:AAPL:5m"[..], b"kline:MSFT:5m", b"kline:AAPL:15m"] {
        let t = Instant::now();
        let f = td.fetch(key).await;
        assert!(is_failed(&f), "{f:?}");
        assert!(
            t.elapsed() < Duration::from_millis(800),
            "{:?}",
            t.elapsed()
        );
    }
    ta.set_fault(Fault::None);
    assert!(matches!(
        td.fetch(b"kline:MSFT:1d").await,
        Fetch::Rows { .. }
    ));
    assert!(matches!(
        td.fetch(b"kline:BRK.B:1w").await,
        Fetch::Rows { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_started_is_failed_fast() {
    // Nothing listens on this port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let td = Tdengine::new(config(format!(
        "taos+ws://root:taosdata@127.0.0.1:{port}/market"
    )))
    .unwrap();
    let t = Instant::now();
    let f = td.fetch(b"kline:AAPL:1d").await;
    assert!(is_failed(&f), "{f:?}");
    assert!(t.elapsed() < Duration::from_millis(800));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_times_out_then_recovers() {
    let ta = TaosAdapter::start().await;
    let td = Tdengine::new(config(ta.dsn())).unwrap();
    assert!(matches!(
        td.fetch(b"kline:AAPL:1m").await,
        Fetch::Rows { .. }
    ));
    ta.set_fault(Fault::Hang);
    // Existing connections (queries swallowed) and new ones (no handshake).
    for key in [
        &b"kline:AAPL:5m"[..],
        b"kline:MSFT:5m",
        b"kline:AAPL:15m",
        b"kline:MSFT:15m",
    ] {
        let t = Instant::now();
        let f = td.fetch(key).await;
        let took = t.elapsed();
        assert!(is_failed(&f), "{f:?}");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(800),
            "{took:?}"
        );
    }
    ta.set_fault(Fault::None);
    assert!(matches!(
        td.fetch(b"kline:MSFT:1d").await,
        Fetch::Rows { .. }
    ));
    assert!(matches!(
        td.fetch(b"kline:AAPL:1w").await,
        Fetch::Rows { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_reply_and_close_mid_query_are_failed() {
    let ta = TaosAdapter::start().await;
    let td = Tdengine::new(config(ta.dsn())).unwrap();
    ta.set_fault(Fault::Error {
        code: 0x0218,
        message: "Out of memory in query queue".into(),
    });
    let f = td.fetch(b"kline:AAPL:1d").await;
    match &f {
        Fetch::Failed(e) => assert!(e.to_string().contains("Out of memory"), "{e}"),
        other => panic!("{other:?}"),
    }
    ta.set_fault(Fault::CloseOnQuery);
    for key in [&b"kline:AAPL:5m"[..], b"kline:MSFT:5m"] {
        let t = Instant::now();
        assert!(is_failed(&td.fetch(key).await));
        assert!(t.elapsed() < Duration::from_millis(800));
    }
    ta.set_fault(Fault::None);
    assert!(matches!(
        td.fetch(b"kline:AAPL:1d").await,
        Fetch::Rows { .. }
    ));
    // An unknown table is a query error from TDengine, not a hang.
    ta.insert_table(
        "kline_1w",
        taosadapter::Table {
            columns: vec![],
            rows: vec![],
        },
    );
    let mut cfg = config(ta.dsn());
    cfg.routes[0].sql = cfg.routes[0].sql.replace("kline_{freq}", "missing_{freq}");
    let td2 = Tdengine::new(cfg).unwrap();
    let f = td2.fetch(b"kline:AAPL:1d").await;
    assert!(is_failed(&f), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_fails_fast_and_recovers() {
    let ta = TaosAdapter::start().await;
    let mut cfg = config(ta.dsn());
    cfg.breaker_failures = 3;
    cfg.breaker_cooldown = Duration::from_millis(700);
    let td = Tdengine::new(cfg).unwrap();
    ta.set_fault(Fault::Error {
        code: 0x000B,
        message: "Unable to establish connection".into(),
    });
    for i in 0..3 {
        assert!(is_failed(
            &td.fetch(format!("kline:AAPL:{}", ["1m", "5m", "15m"][i]).as_bytes())
                .await
        ));
    }
    assert_eq!(ta.query_count(), 3);
    assert_eq!(td.stats().circuit, "open");
    // While open: fail fast, nothing reaches the stand-in.
    ta.set_fault(Fault::None);
    let t = Instant::now();
    for _ in 0..50 {
        let f = td.fetch(b"kline:MSFT:1d").await;
        assert!(is_failed(&f), "{f:?}");
    }
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "open breaker must fail fast: {:?}",
        t.elapsed()
    );
    assert_eq!(ta.query_count(), 3, "no query while the breaker is open");
    // After the cooldown one probe goes through and closes it.
    tokio::time::sleep(Duration::from_millis(750)).await;
    assert!(matches!(
        td.fetch(b"kline:MSFT:1d").await,
        Fetch::Rows { .. }
    ));
    assert_eq!(td.stats().circuit, "closed");
    assert!(matches!(
        td.fetch(b"kline:AAPL:1d").await,
        Fetch::Rows { .. }
    ));
    assert_eq!(ta.query_count(), 5);
    let s = td.stats();
    assert_eq!(s.queries, 5);
    assert_eq!(s.errors, 53);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_cold_fetches_share_one_query() {
    let ta = TaosAdapter::start().await;
    let td = Arc::new(Tdengine::new(config(ta.dsn())).unwrap());
    // The query takes a while, so every fetch joins the one in flight.
    ta.set_fault(Fault::Slow(Duration::from_millis(300)));
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let td = td.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                td.fetch(b"kline:AAPL:1d").await
            })
        })
        .collect();
    let results = join_all(tasks).await;
    let mut first: Option<bytes::Bytes> = None;
    for r in results {
        match r.unwrap() {
            Fetch::Rows { value, .. } => {
                if let Some(f) = &first {
                    assert_eq!(f, &value);
                } else {
                    first = Some(value);
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ta.query_count(), 1, "single flight: exactly one query");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bound_fails_when_full() {
    let ta = TaosAdapter::start().await;
    let mut cfg = config(ta.dsn());
    cfg.max_concurrent_queries = 1;
    cfg.timeout = Duration::from_millis(1000);
    let td = Arc::new(Tdengine::new(cfg).unwrap());
    // Connect first, so that A's time is the stand-in's delay only.
    assert!(matches!(
        td.fetch(b"kline:AAPL:1m").await,
        Fetch::Rows { .. }
    ));
    assert!(matches!(
        td.fetch(b"kline:AAPL:5m").await,
        Fetch::Rows { .. }
    ));
    ta.set_fault(Fault::Slow(Duration::from_millis(600)));
    let a = tokio::spawn({
        let td = td.clone();
        async move { td.fetch(b"kline:AAPL:1d").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    let b = td.fetch(b"kline:MSFT:1d").await;
    let took = t.elapsed();
    // B waits for A's permit (~550 ms), then its remaining budget runs out.
    assert!(is_failed(&b), "{b:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1300),
        "{took:?}"
    );
    let a = a.await.unwrap();
    assert!(matches!(a, Fetch::Rows { .. }), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_route_config_names_the_key() {
    let mut cfg = config("taos+ws://root:taosdata@127.0.0.1:1/market".into());
    cfg.routes[0].params[0].1.pattern = Some("([".into());
    let e = Tdengine::new(cfg).err().expect("bad regex");
    assert!(
        e.to_string()
            .contains("tdengine.routes[0].params.symbol.pattern"),
        "{e}"
    );
    let mut cfg = config("taos+ws://root:taosdata@127.0.0.1:1/market".into());
    cfg.routes[0].sql.push_str(" {nope}");
    let e = Tdengine::new(cfg).err().expect("unknown placeholder");
    assert!(e.to_string().contains("tdengine.routes[0].sql"), "{e}");
}

/// Against a real TDengine: `TDENGINE_DSN=taos+ws://root:taosdata@127.0.0.1:6041/market
/// cargo test --test tdengine_module -- --ignored` (see docs/tdengine.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real TDengine; set TDENGINE_DSN"]
async fn real_tdengine() {
    let Ok(dsn) = std::env::var("TDENGINE_DSN") else {
        eprintln!("TDENGINE_DSN not set; skipping");
        return;
    };
    let mut cfg = config(dsn);
    cfg.timeout = Duration::from_secs(5);
    let td = Tdengine::new(cfg).unwrap();
    let symbol = std::env::var("TDENGINE_SYMBOL").unwrap_or_else(|_| "000001".into());
    let key = format!("kline:{symbol}:1d");
    let t = Instant::now();
    let f = td.fetch(key.as_bytes()).await;
    println!(
        "real TDengine fetch {key}: {:?} in {:?}",
        f_summary(&f),
        t.elapsed()
    );
    assert!(
        matches!(f, Fetch::Rows { .. } | Fetch::Empty { .. }),
        "{f:?}"
    );
    assert!(matches!(
        td.fetch(b"kline:0';DROP TABLE kline_1d;--:1d").await,
        Fetch::Invalid(_)
    ));
}

fn f_summary(f: &Fetch) -> String {
    match f {
        Fetch::Rows { value, ttl } => format!("{} bytes, ttl {ttl:?}", value.len()),
        other => format!("{other:?}"),
    }
}
