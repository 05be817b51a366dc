//! Operator surfaces: the read-only admin HTTP endpoint (`/metrics`,
//! `/healthz`, `/readyz`) and the `NEARCACHE` command clients send over RESP
//! (`STATS`, `FLUSH`, `HOTKEYS [N]`).
//!
//! The HTTP side is deliberately tiny: GET (and HEAD) of three fixed paths, one
//! request per connection, bounded header size and time. Nothing served over
//! HTTP changes state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use crate::metrics;
use crate::protocol;
use crate::server::Shared;

/// Is this nearcache ready for traffic: upstream reachable, the invalidation
/// feed up when caching, and not shutting down?
pub fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.draining.load(Ordering::Acquire) {
        return Err("shutting down".into());
    }
    if !shared.upstream.is_up() {
        return Err("upstream unreachable".into());
    }
    if shared.cache.enabled() && !shared.cache.is_serving() {
        return Err(format!(
            "invalidation feed not up ({})",
            shared.cache.feed_state()
        ));
    }
    Ok(())
}

/// Sets the gauges that are read from state rather than kept up to date by
/// the data path, right before a scrape.
pub fn refresh_gauges(shared: &Shared) {
    let m = metrics::get();
    shared.cache.update_gauges();
    m.cache_serving.set(shared.cache.is_serving() as i64);
    m.cache_max_bytes.set(shared.cache.config.max_bytes as i64);
    m.ready.set(readiness(shared).is_ok() as i64);
}

pub async fn serve_http(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // Probes keep being answered while draining, so /readyz can report it;
        // the task ends with the process.
        let accepted = tokio::select! {
            a = listener.accept() => Some(a),
            r = shutdown.changed() => {
                if r.is_err() {
                    return;
                }
                None
            }
        };
        let Some(accepted) = accepted else {
            continue;
        };
        let (socket, _) = match accepted {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), handle_http(socket, &shared)).await;
        });
    }
}

async fn handle_http(mut socket: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut chunk).await?;
        if n == 0 || buf.len() > 16 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    debug!(method, path, "admin request");
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "the admin endpoint is read-only\n".to_string(),
        )
    } else {
        match path {
            "/metrics" => {
                refresh_gauges(shared);
                (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    metrics::get().render(),
                )
            }
            "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".into()),
            "/readyz" => match readiness(shared) {
                Ok(()) => ("200 OK", "text/plain", "ready\n".into()),
                Err(why) => (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not ready: {why}\n"),
                ),
            },
            _ => (
                "404 Not Found",
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n".into(),
            ),
        }
    };
    let body = if method == "HEAD" {
        String::new()
    } else {
        body
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

/// `NEARCACHE STATS | FLUSH | HOTKEYS [N] | HELP`.
pub fn nearcache_command(shared: &Shared, args: &[Bytes], resp3: bool) -> Bytes {
    let sub = args
        .get(1)
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default();
    match sub.as_slice() {
        b"STATS" if args.len() == 2 => stats(shared, resp3),
        b"FLUSH" if args.len() == 2 => {
            shared.cache.clear_all("admin");
            protocol::ok()
        }
        b"HOTKEYS" if args.len() <= 3 => {
            let n = match args.get(2) {
                None => 10,
                Some(n) => match std::str::from_utf8(n)
                    .ok()
                    .and_then(|n| n.parse::<usize>().ok())
                {
                    Some(n) if n > 0 => n.min(1000),
                    _ => return protocol::error("ERR value is not an integer or out of range"),
                },
            };
            let items: Vec<Bytes> = shared
                .cache
                .hot_keys(n)
                .into_iter()
                .map(|(k, c)| {
                    protocol::array(&[protocol::bulk_bytes(&k), protocol::integer(c as i64)])
                })
                .collect();
            protocol::array(&items)
        }
        b"HELP" => {
            let lines = [
                "NEARCACHE STATS -- L1 and feed counters.",
                "NEARCACHE FLUSH -- Empty L1 (Redis is not touched).",
                "NEARCACHE HOTKEYS [N] -- The N keys with the most recent L1 hits (default 10).",
            ];
            let items: Vec<Bytes> = lines.iter().map(|l| protocol::simple(l)).collect();
            protocol::array(&items)
        }
        _ => protocol::error(&format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try NEARCACHE HELP.",
            String::from_utf8_lossy(args.get(1).map(|a| a.as_ref()).unwrap_or(b""))
        )),
    }
}

fn stats(shared: &Shared, resp3: bool) -> Bytes {
    let cache = &shared.cache;
    let c = &cache.counters;
    let int = |v: u64| protocol::integer(v as i64);
    let text = |s: &str| protocol::bulk_bytes(s.as_bytes());
    let mut pairs: Vec<(&str, Bytes)> = vec![
        ("enabled", int(cache.enabled() as u64)),
        ("serving", int(cache.is_serving() as u64)),
        ("feed", text(&cache.feed_state())),
        ("hits", int(c.hits.load(Ordering::Relaxed))),
        ("misses", int(c.misses.load(Ordering::Relaxed))),
        ("entries", int(cache.entries())),
        ("bytes", int(cache.weighted_bytes())),
        ("max_bytes", int(cache.config.max_bytes)),
        ("evictions", int(c.evictions.load(Ordering::Relaxed))),
        (
            "invalidations",
            int(c.invalidations.load(Ordering::Relaxed)),
        ),
        ("flushes", int(c.flushes.load(Ordering::Relaxed))),
        ("coalesced_misses", int(c.coalesced.load(Ordering::Relaxed))),
        (
            "clients",
            int(shared.clients.load(Ordering::Relaxed) as u64),
        ),
        ("upstream_up", int(shared.upstream.is_up() as u64)),
    ];
    if let Some(td) = &shared.tdengine {
        let s = td.stats();
        pairs.push(("tdengine_queries", int(s.queries)));
        pairs.push(("tdengine_errors", int(s.errors)));
        pairs.push(("tdengine_rejected_keys", int(s.rejected)));
        pairs.push(("tdengine_circuit", text(&s.circuit)));
    }
    protocol::map(resp3, &pairs)
}
