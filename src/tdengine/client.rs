//! TDengine access through the official `taos` crate's WebSocket client
//! (taosAdapter), with a small pool of long-lived connections.
//!
//! Each slot holds at most one connection; it is opened on first use (or by
//! the background warm-up) and dropped after a connection-level failure or a
//! timeout, so that the next query on that slot reconnects.
//!
//! Connections go through a loopback relay (see `relay.rs`) that removes the
//! client's ~40 ms delayed-ACK × Nagle stall per request frame and, for `wss`
//! DSNs, speaks TLS to taosAdapter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::TryStreamExt;
use taos::query::asyn::WsTaos;
use taos::taos_query::{Address, Dsn};
use taos::{AsyncFetchable, BorrowedValue, Precision, RawError};

use rustls_pki_types::ServerName;

use super::encode::{Cell, Rows};
use super::relay::{Relay, Target};
use crate::config::TdTlsConfig;

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
    /// The DSN the client gets (its address is replaced by the relay's) and
    /// where the relay connects; `None` if the DSN has no host to relay to.
    relayed: Option<(Dsn, Arc<Target>)>,
    relay: tokio::sync::OnceCell<Option<Relay>>,
}

fn is_tls(d: &Dsn) -> bool {
    matches!(d.driver.as_str(), "wss" | "https")
        || matches!(d.protocol.as_deref(), Some("wss" | "https"))
}

fn cfg_err(key: &str, problem: impl std::fmt::Display) -> crate::Error {
    crate::Error::Config(crate::config::ConfigError::new(key, problem.to_string()))
}

/// The client's DSN and the relay's target, if the DSN names a host.
/// Mirrors `TaosBuilder::from_dsn` and ws-tool: only the first address is
/// used; a missing port is 6041 for `localhost` (or no host), else 80 for
/// `ws` and 443 for `wss`; the `Host` header is `host[:port]` as written
/// (`localhost:6041` for a bare `localhost`).
///
/// For a TLS DSN the client is handed the same DSN as plain `ws` (the relay
/// terminates TLS), and the relay verifies the certificate for
/// `tls.server_name`, or the DSN's host.
fn relay_plan(dsn: &str, tls: &TdTlsConfig) -> Result<Option<(Dsn, Target)>, crate::Error> {
    let d: Dsn = dsn.parse().map_err(|e| cfg_err("tdengine.dsn", e))?;
    let tls_on = is_tls(&d);
    let (host, port, authority) = match d.addresses.first() {
        None => ("localhost".to_string(), 6041, "localhost:6041".to_string()),
        Some(a) if a.path.is_some() || a.host.is_none() => {
            if tls_on {
                return Err(cfg_err(
                    "tdengine.dsn",
                    "a TLS DSN needs a host name or address",
                ));
            }
            return Ok(None);
        }
        Some(a) => {
            let host = a.host.clone().unwrap_or_default();
            match a.port {
                Some(p) => (host.clone(), p, format!("{host}:{p}")),
                None if host == "localhost" => (host, 6041, "localhost:6041".to_string()),
                None => (host.clone(), if tls_on { 443 } else { 80 }, host),
            }
        }
    };
    let tls = if tls_on {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let roots = crate::net::root_store(tls.ca_file.as_deref(), "tdengine.tls.ca_file")?;
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err("tdengine.tls", e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (key, name) = match &tls.server_name {
            Some(n) => ("tdengine.tls.server_name", n.clone()),
            None => ("tdengine.dsn", host.clone()),
        };
        let name = ServerName::try_from(name.clone())
            .map_err(|e| cfg_err(key, format!("{name:?} is not a valid TLS server name: {e}")))?;
        Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    } else {
        None
    };
    let mut client = d;
    if tls_on {
        if matches!(client.driver.as_str(), "wss" | "https") {
            client.driver = "ws".to_string();
        } else {
            client.protocol = Some("ws".to_string());
        }
    }
    Ok(Some((
        client,
        Target {
            host,
            port,
            authority,
            tls,
        },
    )))
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
    /// `Err` names the config key (a bad DSN, CA file or TLS server name).
    pub fn new(dsn: String, size: usize, tls: &TdTlsConfig) -> Result<Pool, crate::Error> {
        Ok(Pool {
            redacted: redact_dsn(&dsn),
            relayed: relay_plan(&dsn, tls)?.map(|(d, t)| (d, Arc::new(t))),
            dsn,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            relay: tokio::sync::OnceCell::new(),
        })
    }

    /// Does the pool speak TLS to taosAdapter (through the relay)?
    pub fn tls(&self) -> bool {
        self.relayed.as_ref().is_some_and(|(_, t)| t.tls.is_some())
    }

    /// The relay, started on first use; `None` if there is nothing to relay
    /// to or it could not listen.
    async fn relay(&self) -> Option<&Relay> {
        let (_, target) = self.relayed.as_ref()?;
        self.relay
            .get_or_init(|| async {
                match Relay::start(target.clone()).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(error = %e, "TDengine relay could not listen");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Open one client connection, through the relay when there is one.
    async fn connect(&self) -> Result<WsTaos, String> {
        match (self.relay().await, &self.relayed) {
            (Some(relay), Some((dsn, _))) => {
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
            // The `taos` crate is built without TLS (a `wss` connect of its
            // own panics): TLS only goes through the relay.
            _ if self.tls() => {
                Err("TLS to TDengine needs the relay, which could not listen".into())
            }
            // Plain: connecting directly works, with the ~40 ms stall per request.
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
    fn relay_plans() {
        let none = TdTlsConfig::default();
        let t = |dsn: &str| {
            relay_plan(dsn, &none)
                .unwrap()
                .map(|(d, t)| (d.to_string(), t.host, t.port, t.authority, t.tls.is_some()))
        };
        let s = String::from;
        assert_eq!(
            t("taos+ws://root:taosdata@10.0.0.5:6041/market"),
            Some((
                s("taos+ws://root:taosdata@10.0.0.5:6041/market"),
                s("10.0.0.5"),
                6041,
                s("10.0.0.5:6041"),
                false
            ))
        );
        assert_eq!(
            t("ws://localhost/db"),
            Some((
                s("ws://localhost/db"),
                s("localhost"),
                6041,
                s("localhost:6041"),
                false
            ))
        );
        assert_eq!(
            t("taos+ws://tdengine/db"),
            Some((
                s("taos+ws://tdengine/db"),
                s("tdengine"),
                80,
                s("tdengine"),
                false
            ))
        );
        // TLS: the client speaks plain ws to the relay; the relay speaks TLS.
        assert_eq!(
            t("taos+wss://u:p@cloud.example:443/db?token=abc"),
            Some((
                s("taos+ws://u:p@cloud.example:443/db?token=abc"),
                s("cloud.example"),
                443,
                s("cloud.example:443"),
                true
            ))
        );
        assert_eq!(
            t("wss://cloud.example/db"),
            Some((
                s("ws://cloud.example/db"),
                s("cloud.example"),
                443,
                s("cloud.example"),
                true
            ))
        );
        let e = relay_plan(
            "taos+wss://10.0.0.5:6041/db",
            &TdTlsConfig {
                ca_file: None,
                server_name: Some("bad name!".into()),
            },
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("tdengine.tls.server_name"), "{e}");
    }
}
