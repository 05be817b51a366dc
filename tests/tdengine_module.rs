//! The TDengine tier through `Tdengine::fetch`, with the real `taos`
//! WebSocket client against the taosAdapter protocol stand-in.

#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nearcache::config::{TdFormat, TdOnError, TdParam, TdRoute, TdengineConfig};
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
            params: vec![
                (
                    "symbol".into(),
                    TdParam {
                        pattern: Some("^[0-9A-Za-z.]{1,16}$".into()),
                        allow: None,
                        quote: true,
                    },
                ),
                (
                    "freq".into(),
                    TdParam {
                        pattern: None,
                        allow: Some(["1m", "5m", "15m", "30m", "60m", "1d", "1w"].map(String::from).to_vec()),
                        quote: false,
                    },
                ),
            ],
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
    let Fetch::Rows { value, .. } = &f else { unreachable!() };
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
    assert_eq!(ta.sql_log(), vec![KLINE_SQL.replace("{freq}", "1m").replace("{symbol}", "'MSFT'")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_as_msgpack_and_latency_of_500_rows() {
    let ta = TaosAdapter::start().await;
    let mut cfg = config(ta.dsn());
    cfg.format = TdFormat::Msgpack;
    let td = Tdengine::new(cfg).unwrap();
    let f = td.fetch(b"kline:BRK.B:1d").await;
    let Fetch::Rows { value, .. } = f else { panic!("{f:?}") };
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
        let key = if i % 2 == 0 { &b"kline:AAPL:1d"[..] } else { &b"kline:MSFT:1d"[..] };
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
