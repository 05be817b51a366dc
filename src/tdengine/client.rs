//! TDengine access through the official `taos` crate's WebSocket client
//! (taosAdapter), with a small pool of long-lived connections.
//!
//! Each slot holds at most one connection; it is opened on first use (or by
//! the background warm-up) and dropped after a connection-level failure or a
//! timeout, so that the next query on that slot reconnects.
//!
//! Plain `ws` connections go through a loopback relay (see `relay.rs`) that
//! removes the client's ~40 ms delayed-ACK × Nagle stall per request frame.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::TryStreamExt;
use taos::query::asyn::WsTaos;
use taos::taos_query::{Address, Dsn};
use taos::{AsyncFetchable, BorrowedValue, Precision, RawError};

use super::encode::{Cell, Rows};
use super::relay::Relay;

/// Why a query failed, by metrics kind.
#[derive(Debug, Clone)]
pub enum QueryError {
    /// Could not connect, or the connection broke (keep no connection).
    Connect(String),
    /// TDengine answered with an error code (the connection is healthy).
    Query(String),
}

pub struct Pool {
    dsn: String,
    redacted: String,
    slots: Vec<tokio::sync::Mutex<Option<Arc<WsTaos>>>>,
    next: AtomicUsize,
    /// The parsed DSN and the real taosAdapter address, when the connection
    /// can go through the relay (plain `ws`; TLS connects directly).
    relay_target: Option<(Dsn, String, u16)>,
    relay: tokio::sync::OnceCell<Option<Relay>>,
}

/// The DSN and the address taos-ws would connect to, if it is a plain
/// WebSocket DSN that the relay can carry. Mirrors `TaosBuilder::from_dsn`:
/// only the first address is used, and a missing port is 6041 for
/// `localhost` (or no host), 80 otherwise.
fn relay_target(dsn: &str) -> Option<(Dsn, String, u16)> {
    let d: Dsn = dsn.parse().ok()?;
    let tls = matches!(d.driver.as_str(), "wss" | "https")
        || matches!(d.protocol.as_deref(), Some("wss" | "https"));
    if tls {
        // The relay cannot terminate TLS, and the client would check the
        // certificate against 127.0.0.1.
        return None;
    }
    let (host, port) = match d.addresses.first() {
        None => ("localhost".to_string(), 6041),
        Some(a) if a.path.is_some() => return None,
        Some(a) => {
            let host = a.host.clone().unwrap_or_else(|| "localhost".to_string());
            let port = a
                .port
                .unwrap_or(if host == "localhost" { 6041 } else { 80 });
            (host, port)
        }
    };
    Some((d, host, port))
}

/// `taos+ws://user:secret@host/db` → `taos+ws://user:***@host/db`.
pub fn redact_dsn(dsn: &str) -> String {
    let Some(scheme_end) = dsn.find("://").map(|i| i + 3) else {
        return dsn.to_string();
    };
    let rest = &dsn[scheme_end..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &dsn[..scheme_end],
                &rest[..colon],
                &rest[at..]
            ),
            None => dsn.to_string(),
        },
        None => dsn.to_string(),
    }
}

/// Server error codes are below the client's own 0xE000.. range and not the
/// generic `FAILED`; anything else is a transport problem.
fn classify(e: RawError) -> QueryError {
    let code: i32 = e.code().into();
    let msg = e.to_string();
    if code > 0 && code < 0xE000 && code != 0xFFFF {
        QueryError::Query(msg)
    } else {
        QueryError::Connect(msg)
    }
}

impl Pool {
    pub fn new(dsn: String, size: usize) -> Pool {
        Pool {
            redacted: redact_dsn(&dsn),
            relay_target: relay_target(&dsn),
            dsn,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            relay: tokio::sync::OnceCell::new(),
        }
    }

    /// The relay, started on first use; `None` for TLS DSNs or if it could
    /// not listen (then the client connects directly).
    async fn relay(&self) -> Option<&Relay> {
        let (_, host, port) = self.relay_target.as_ref()?;
        self.relay
            .get_or_init(|| async {
                match Relay::start(host.clone(), *port).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "TDengine relay could not listen; connecting directly");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Open one client connection, through the relay when there is one.
    async fn connect(&self) -> Result<WsTaos, String> {
        match (self.relay().await, &self.relay_target) {
            (Some(relay), Some((dsn, _, _))) => {
                let _armed = relay.arm();
                let mut dsn = dsn.clone();
                dsn.addresses = vec![Address::new("127.0.0.1", relay.addr().port())];
                WsTaos::from_dsn(dsn)
                    .await
                    .map_err(|e| match relay.take_error() {
                        Some(why) => format!("{e} ({why})"),
                        None => e.to_string(),
                    })
            }
            _ => WsTaos::from_dsn(self.dsn.as_str())
                .await
                .map_err(|e| e.to_string()),
        }
    }

    pub fn redacted_dsn(&self) -> &str {
        &self.redacted
    }

    /// A connection for one query: round-robin over the slots, connecting
    /// the chosen slot if it is empty.
    pub async fn get(&self) -> Result<(usize, Arc<WsTaos>), QueryError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        self.get_slot(slot).await.map(|c| (slot, c))
    }

    async fn get_slot(&self, slot: usize) -> Result<Arc<WsTaos>, QueryError> {
        let mut guard = self.slots[slot].lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        tracing::debug!(dsn = %self.redacted, slot, "connecting to TDengine");
        let conn = self.connect().await.map_err(|e| {
            let e = QueryError::Connect(e);
            tracing::warn!(dsn = %self.redacted, slot, error = ?e, "TDengine connect failed");
            e
        })?;
        tracing::info!(dsn = %self.redacted, slot, version = conn.version(), "connected to TDengine");
        let conn = Arc::new(conn);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Open the first slot ahead of the first query; failures are only logged.
    pub async fn warm_up(&self) {
        let _ = self.get_slot(0).await;
    }

    /// Forget `conn` if `slot` still holds it (the next user reconnects).
    pub fn discard(&self, slot: usize, conn: &Arc<WsTaos>) {
        if let Ok(mut guard) = self.slots[slot].try_lock() {
            if guard.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
                *guard = None;
            }
        } else {
            // Someone is reconnecting this slot right now; nothing to drop.
        }
    }

    /// Run one SELECT and collect every row.
    pub async fn query(&self, sql: &str) -> Result<Rows, QueryError> {
        let (slot, conn) = self.get().await?;
        let res = run(&conn, sql).await;
        if let Err(QueryError::Connect(_)) = &res {
            self.discard(slot, &conn);
        }
        res
    }

    /// Drop every pooled connection whose slot is not busy (after a timeout
    /// the connection may be wedged).
    pub fn discard_all(&self) {
        for s in &self.slots {
            if let Ok(mut g) = s.try_lock() {
                *g = None;
            }
        }
    }
}

async fn run(conn: &WsTaos, sql: &str) -> Result<Rows, QueryError> {
    let mut rs = conn.s_query(sql).await.map_err(classify)?;
    let precision = rs.precision();
    let columns: Vec<String> = rs.fields().iter().map(|f| f.name().to_string()).collect();
    let mut rows = Vec::new();
    let mut blocks = rs.blocks();
    while let Some(block) = blocks.try_next().await.map_err(classify)? {
        let ncols = block.ncols().min(columns.len());
        for r in 0..block.nrows() {
            rows.push(
                (0..ncols)
                    .map(|c| cell(block.get_ref(r, c), precision))
                    .collect(),
            );
        }
    }
    Ok(Rows { columns, rows })
}

fn cell(v: Option<BorrowedValue<'_>>, _precision: Precision) -> Cell {
    use BorrowedValue as B;
    let Some(v) = v else { return Cell::Null };
    match v {
        B::Null(_) => Cell::Null,
        B::Bool(b) => Cell::Bool(b),
        B::TinyInt(i) => Cell::Int(i.into()),
        B::SmallInt(i) => Cell::Int(i.into()),
        B::Int(i) => Cell::Int(i.into()),
        B::BigInt(i) => Cell::Int(i),
        B::UTinyInt(i) => Cell::UInt(i.into()),
        B::USmallInt(i) => Cell::UInt(i.into()),
        B::UInt(i) => Cell::UInt(i.into()),
        B::UBigInt(i) => Cell::UInt(i),
        // Keep a FLOAT's shortest decimal form (0.1f32 → 0.1, not 0.10000000149011612).
        B::Float(f) => Cell::Float(f.to_string().parse().unwrap_or(f64::from(f))),
        B::Double(f) => Cell::Float(f),
        B::Timestamp(ts) => Cell::Int(ts.cast_precision(Precision::Millisecond).as_raw_i64()),
        B::VarChar(s) => Cell::Str(s.to_string()),
        B::NChar(s) => Cell::Str(s.into_owned()),
        B::Json(b) => Cell::Str(String::from_utf8_lossy(&b).into_owned()),
        B::Decimal(d) => Cell::Str(d.to_string()),
        B::VarBinary(b) | B::Geometry(b) => Cell::Bin(b.into_owned()),
        B::Blob(b) | B::MediumBlob(b) => Cell::Bin(b.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact_dsn("taos+ws://root:taosdata@127.0.0.1:6041/market"),
            "taos+ws://root:***@127.0.0.1:6041/market"
        );
        assert_eq!(redact_dsn("ws://host:6041/db"), "ws://host:6041/db");
        assert_eq!(redact_dsn("ws://u@host:6041"), "ws://u@host:6041");
        assert_eq!(redact_dsn("ws://u:p@ss@host"), "ws://u:***@host");
    }

    #[test]
    fn relay_targets() {
        let t = |dsn: &str| relay_target(dsn).map(|(_, h, p)| (h, p));
        assert_eq!(
            t("taos+ws://root:taosdata@10.0.0.5:6041/market"),
            Some(("10.0.0.5".to_string(), 6041))
        );
        assert_eq!(
            t("ws://localhost/db"),
            Some(("localhost".to_string(), 6041))
        );
        assert_eq!(
            t("taos+ws://tdengine/db"),
            Some(("tdengine".to_string(), 80))
        );
        assert_eq!(t("taos+wss://cloud.example:443/db"), None);
        assert_eq!(t("wss://cloud.example/db"), None);
    }
}
