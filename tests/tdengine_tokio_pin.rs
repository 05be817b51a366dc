//! Guards the `tokio < 1.54` pin in Cargo.toml.
//!
//! taos-ws 0.12.3 connects through ws-tool with `ClientConfig::default()`,
//! whose buffers are 0 bytes, and wraps the socket in
//! `tokio::io::BufStream::with_capacity(0, 0, ..)`. tokio 1.54 made a
//! zero-capacity `BufReader`/`BufStream` panic (tokio changelog, 1.54.0: "io:
//! panic when `BufReader` or `BufStream` is created with zero capacity"), so
//! with tokio >= 1.54 every TDengine connect panics. Lift the pin only with a
//! taos release that sets non-zero buffers.

#[macro_use]
#[path = "support/taosadapter.rs"]
mod taosadapter;

use std::time::Duration;

/// The tokio version Cargo resolved for this build, from Cargo.lock.
fn resolved_tokio() -> (u64, u64, u64) {
    let lock = include_str!("../Cargo.lock");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"tokio\"" {
            let v = lines
                .next()
                .unwrap()
                .trim_start_matches("version = \"")
                .trim_end_matches('"');
            let mut it = v.split('.').map(|p| p.parse::<u64>().unwrap());
            return (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        }
    }
    panic!("tokio not in Cargo.lock");
}

#[test]
fn resolved_tokio_is_below_1_54() {
    let v = resolved_tokio();
    assert!(
        v < (1, 54, 0),
        "tokio {v:?} resolved: taos-ws 0.12.3 panics on connect with tokio >= 1.54"
    );
}

#[test]
fn zero_capacity_bufstream_does_not_panic() {
    // Exactly what taos-ws does on connect.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, _b) = tokio::io::duplex(64);
        let _s = tokio::io::BufStream::with_capacity(0, 0, a);
    });
}

for_each_path!(
/// The connect itself (BufStream with zero capacity), on both query paths:
/// the version the stand-in reports only decides what comes after it.
async fn taos_client_connects_to_the_stand_in_without_panicking(mode) {
    let ta = taosadapter::TaosAdapter::start(mode).await;
    let dsn = ta.dsn();
    let task = tokio::spawn(async move {
        let conn = taos::query::asyn::WsTaos::from_dsn(dsn.as_str())
            .await
            .expect("connect");
        (conn.version().to_string(), conn.is_support_binary_sql())
    });
    let (version, binary) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("connect must not hang")
        .expect("connect must not panic");
    assert_eq!(version, mode.version);
    assert_eq!(binary, mode.path() == taosadapter::QueryPath::Binary, "{mode}");
});
