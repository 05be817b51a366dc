//! The operators' HTTP endpoint: `/metrics`, `/healthz`, `/readyz`, read-only.
//! (The `NEARCACHE` command clients send over RESP is answered by the
//! session, in `server/local.rs`.)
//!
//! The HTTP side is deliberately tiny: GET (and HEAD) of three fixed paths, one
//! request per connection, bounded header size and time. Nothing served over
//! HTTP changes state.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use crate::metrics;
use crate::server::Sidecar;

/// Is this nearcache ready for traffic: upstream reachable, the invalidation
/// feed up when caching, and not shutting down?
pub fn readiness(sidecar: &Sidecar) -> Result<(), String> {
    if sidecar.draining.load(Ordering::Acquire) {
        return Err("shutting down".into());
    }
    // (A cluster is up when its router knows the slot map: `Router::is_up`.)
    if !sidecar.upstream.is_up() {
        return Err("upstream unreachable".into());
    }
    if sidecar.cache.enabled() && !sidecar.cache.is_serving() {
        return Err(format!(
            "invalidation feed not up ({})",
            sidecar.cache.feed_state()
        ));
    }
    Ok(())
}

/// Sets the gauges that are read from state rather than kept up to date by
/// the data path, right before a scrape.
pub fn refresh_gauges(sidecar: &Sidecar) {
    let m = metrics::get();
    sidecar.cache.update_gauges();
    m.cache_serving.set(sidecar.cache.is_serving() as i64);
    m.cache_max_bytes.set(sidecar.cache.config.max_bytes as i64);
    m.ready.set(readiness(sidecar).is_ok() as i64);
    if sidecar.cluster.is_some() {
        // Not the nodes' pools' connect attempts (one node down is not the
        // cluster down): the router's view, as readiness and STATS say.
        m.upstream_up.set(sidecar.upstream.is_up() as i64);
    }
}

pub async fn serve_http(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
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
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), handle_http(socket, &sidecar)).await;
        });
    }
}

async fn handle_http(mut socket: TcpStream, sidecar: &Sidecar) -> std::io::Result<()> {
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
                refresh_gauges(sidecar);
                (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    metrics::get().render(),
                )
            }
            "/healthz" | "/livez" => ("200 OK", "text/plain", "ok\n".into()),
            "/readyz" => match readiness(sidecar) {
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
