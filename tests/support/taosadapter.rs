//! A **protocol stand-in** for taosAdapter, for tests only. It is NOT
//! TDengine and runs no TDengine code: it speaks the part of taosAdapter's
//! WebSocket protocol that the official `taos` 0.12.3 client uses to query,
//! and answers from in-memory tables.
//!
//! The client picks its query path from the version the server reports in
//! answer to `version` (taos-ws 0.12.3, `src/query/asyn.rs`:
//! `is_support_binary_sql`, >= 3.3.0.8), so the stand-in's [`Mode`] is that
//! version string:
//!
//! * **JSON path** (< 3.3.0.8, e.g. [`JSON_PATH`] = 3.0.0.0): text `query`,
//!   `fetch` (JSON), `fetch_block` (binary reply: u64 timing, u64 result id,
//!   raw block), `free_result` (no reply).
//! * **Binary path** (>= 3.3.0.8, e.g. [`BINARY_PATH`] = 3.3.6.0, what
//!   `docker-compose.yml` runs): a binary `query` message (action 6: u64
//!   req_id, u64 result id 0, u64 action, u16 version 1, u32 SQL length,
//!   SQL), answered with a text `binary_query` reply; then binary `fetch`
//!   messages (action 7) answered with binary `fetch_raw_block` frames (u64
//!   0xFFFF_FFFF_FFFF_FFFF, u64 action 7, u16 version 1, u64 timing, u64
//!   req_id, u32 code, u32 length + message, u64 result id, u8 finished, then
//!   u32 length + raw block unless finished). The layouts follow
//!   taosAdapter's `controller/ws/ws` (`binaryQuery`, `fetchRawBlock`,
//!   `fetchRawBlockMessage`), and the query reply carries the
//!   `fields_precisions`/`fields_scales` a 3.3 server adds.
//!
//! Both paths share `version`, `conn` and `free_result` (the client frees an
//! unfinished result with the JSON message on either path). Like
//! taosAdapter, a result is freed once its last block has been fetched.
//! Unlike taosAdapter, which accepts both query paths from 3.3.0.8 on, the
//! stand-in answers the other path's query messages with an error, so a test
//! cannot pass on the path it did not mean to exercise
//! ([`TaosAdapter::accept_both_paths`] makes it as lenient as taosAdapter).
//!
//! Blocks are encoded with `taos-query`'s own `ColumnView`s. The stand-in
//! understands only
//! `SELECT cols FROM table [WHERE col = 'x'] [ORDER BY col [ASC|DESC]] [LIMIT n]`,
//! records every SQL text it receives (with the path it came by), and can
//! simulate faults: down (connections closed at once), hang (accept, never
//! answer), error replies, slow replies, a connection closed on a query. It
//! can serve `wss` ([`TaosAdapter::start_tls`]) with a throwaway CA made by
//! the test.
//!
//! Include it with `#[macro_use] #[path = "support/taosadapter.rs"] mod taosadapter;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taos::taos_query::common::raw::views::views_to_raw_block;
use taos::taos_query::common::ColumnView;
use taos::Ty;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Which query path the client takes against the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryPath {
    Json,
    Binary,
}

/// The version string the stand-in reports, which decides the client's
/// query path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub version: &'static str,
}

/// A server older than 3.3.0.8: the client queries with JSON messages.
pub const JSON_PATH: Mode = Mode { version: "3.0.0.0" };
/// A current server (the version `docker-compose.yml` runs): binary queries.
pub const BINARY_PATH: Mode = Mode { version: "3.3.6.0" };
pub const MODES: [Mode; 2] = [JSON_PATH, BINARY_PATH];

/// `a.b.c.d` compared numerically; the client's own rule, restated so that
/// the stand-in knows which path to expect.
fn version_at_least(v: &str, min: &str) -> bool {
    let nums = |s: &str| -> Vec<u32> {
        s.split('.')
            .take(4)
            .map(|p| p.parse().unwrap_or(0))
            .collect()
    };
    nums(v) >= nums(min)
}

impl Mode {
    pub fn path(&self) -> QueryPath {
        if version_at_least(self.version, "3.3.0.8") {
            QueryPath::Binary
        } else {
            QueryPath::Json
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match self.path() {
            QueryPath::Json => "JSON",
            QueryPath::Binary => "binary",
        };
        write!(f, "{path} query path (stand-in reports {})", self.version)
    }
}

/// Defines `mod $name` with one test per [`Mode`]: `$name::json_path_v3_0_0_0`
/// and `$name::binary_path_v3_3_6_0`, each running the body with `$mode`
/// bound to that mode. `async fn` bodies run on a 2-thread tokio runtime,
/// `fn` bodies as plain tests; doc comments go on the module.
#[allow(unused_macros)]
macro_rules! for_each_path {
    ($(#[$attr:meta])* async fn $name:ident($mode:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($mode: taosadapter::Mode) $body

            // The names spell out JSON_PATH's and BINARY_PATH's versions.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn json_path_v3_0_0_0() {
                run(taosadapter::JSON_PATH).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn binary_path_v3_3_6_0() {
                run(taosadapter::BINARY_PATH).await
            }
        }
    };
    ($(#[$attr:meta])* fn $name:ident($mode:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($mode: taosadapter::Mode) $body

            #[test]
            fn json_path_v3_0_0_0() {
                run(taosadapter::JSON_PATH)
            }

            #[test]
            fn binary_path_v3_3_6_0() {
                run(taosadapter::BINARY_PATH)
            }
        }
    };
}

/// A value in an in-memory table.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    /// Epoch milliseconds.
    Ts(i64),
    F64(f64),
    I64(i64),
    Str(String),
    Null,
}

#[derive(Debug, Clone)]
pub struct Table {
    /// Column name and type: `Ty::Timestamp`, `Ty::Double`, `Ty::BigInt` or `Ty::VarChar`.
    pub columns: Vec<(String, Ty)>,
    pub rows: Vec<Vec<Val>>,
}

/// How the stand-in behaves right now.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    None,
    /// Close every connection, and every new one at once.
    Down,
    /// Accept connections and messages but never answer anything.
    Hang,
    /// Answer every query with this TDengine error.
    Error {
        code: i32,
        message: String,
    },
    /// Wait this long before answering each query.
    Slow(Duration),
    /// Drop the connection when a query arrives.
    CloseOnQuery,
}

struct State {
    mode: Mode,
    quickack: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tables: Mutex<HashMap<String, Table>>,
    sql_log: Mutex<Vec<(QueryPath, String)>>,
    hosts: Mutex<Vec<String>>,
    fault: watch::Sender<Fault>,
    next_id: AtomicU64,
    connections: AtomicU64,
    open_results: AtomicUsize,
    /// Rows per block (0: all rows in one block).
    block_rows: AtomicUsize,
    /// Answer JSON queries in binary mode too, as taosAdapter >= 3.3.0.8 does.
    both_paths: std::sync::atomic::AtomicBool,
}

/// A running stand-in; dropping it stops accepting (open connections linger
/// until the client closes them).
pub struct TaosAdapter {
    pub addr: SocketAddr,
    state: Arc<State>,
    pki: Option<Pki>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TaosAdapter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

pub const SYMBOLS: &[&str] = &["AAPL", "MSFT", "BRK.B"];
/// Base timestamp of the generated rows (2024-01-01T00:00:00Z), epoch ms.
pub const T0: i64 = 1_704_067_200_000;

/// The kline row the stand-in generates for `symbol` at index `i` (0 = oldest).
pub fn kline_row(symbol: &str, i: usize, step_ms: i64) -> Vec<Val> {
    let base = 100.0 + (symbol.len() as f64) + i as f64 * 0.25;
    vec![
        Val::Ts(T0 + i as i64 * step_ms),
        Val::Str(symbol.to_string()),
        Val::F64(base),
        Val::F64(base + 1.5),
        Val::F64(base - 0.5),
        Val::F64(base + 0.75),
        if i == 3 {
            Val::Null
        } else {
            Val::I64(1000 + i as i64)
        },
    ]
}

/// The JSON nearcache must produce for `kline:{symbol}:1d` (rows 599..100,
/// newest first, as the route's `ORDER BY ts DESC LIMIT 500` returns them).
#[allow(dead_code)]
pub fn expected_1d(symbol: &str) -> serde_json::Value {
    use serde_json::{json, Value};
    let rows: Vec<Value> = (100..600)
        .rev()
        .map(|i| {
            let r = kline_row(symbol, i, 86_400_000);
            let v = |x: &Val| match x {
                Val::Ts(t) | Val::I64(t) => json!(t),
                Val::F64(f) => json!(f),
                Val::Str(s) => json!(s),
                Val::Null => Value::Null,
            };
            // kline_row: ts, symbol, open, high, low, close, volume
            json!({"ts": v(&r[0]), "open": v(&r[2]), "high": v(&r[3]), "low": v(&r[4]),
                   "close": v(&r[5]), "volume": v(&r[6])})
        })
        .collect();
    Value::Array(rows)
}

fn kline_columns() -> Vec<(String, Ty)> {
    [
        ("ts", Ty::Timestamp),
        ("symbol", Ty::VarChar),
        ("open", Ty::Double),
        ("high", Ty::Double),
        ("low", Ty::Double),
        ("close", Ty::Double),
        ("volume", Ty::BigInt),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect()
}

pub const FREQS: &[&str] = &["1m", "5m", "15m", "30m", "60m", "1d", "1w"];

/// Step (ms) and rows per symbol of `kline_{freq}`.
pub fn kline_shape(freq: &str) -> (i64, usize) {
    match freq {
        "1m" => (60_000, 20),
        "5m" => (300_000, 20),
        "15m" => (900_000, 20),
        "30m" => (1_800_000, 20),
        "60m" => (3_600_000, 20),
        "1d" => (86_400_000, 600),
        "1w" => (604_800_000, 20),
        other => panic!("no kline_{other} in the stand-in"),
    }
}

/// `kline_{freq}` tables: 600 rows per symbol in `kline_1d`, 20 elsewhere;
/// row 3 of each symbol has a NULL volume.
pub fn default_tables() -> HashMap<String, Table> {
    let mut out = HashMap::new();
    for freq in FREQS {
        let (step, n) = kline_shape(freq);
        let mut rows = Vec::new();
        for s in SYMBOLS {
            for i in 0..n {
                rows.push(kline_row(s, i, step));
            }
        }
        out.insert(
            format!("kline_{freq}"),
            Table {
                columns: kline_columns(),
                rows,
            },
        );
    }
    out
}

/// A throwaway PKI for the TLS listener: a CA, a server certificate for the
/// name `localhost` only (so a client that verifies for 127.0.0.1 fails), and
/// an unrelated CA. PEM files in a temporary directory, removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    /// The CA that signed the server certificate.
    pub ca: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
    server: tokio_rustls::rustls::ServerConfig,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nearcache-taosadapter-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            (p.self_signed(&key).unwrap(), key)
        };
        let (ca_cert, ca_key) = ca("taosAdapter stand-in test CA");
        let (other, _) = ca("an unrelated CA");
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "taosadapter stand-in");
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let ca_path = dir.join("ca.pem");
        let other_path = dir.join("other-ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        std::fs::write(&other_path, other.pem()).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let server = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone(), ca_cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        Pki {
            dir,
            ca: ca_path,
            other_ca: other_path,
            server,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl TaosAdapter {
    /// Start on an ephemeral loopback port with [`default_tables`], with
    /// TCP_NODELAY and TCP_QUICKACK on its sockets (see `docs/tdengine.md`:
    /// without quick ACKs each client request stalls ~40 ms).
    pub async fn start(mode: Mode) -> TaosAdapter {
        Self::start_with(mode, "127.0.0.1:0".parse().unwrap(), true, None).await
    }

    /// Like [`TaosAdapter::start`] but with the kernel's default delayed ACKs,
    /// as a stock server has them.
    pub async fn start_without_quickack(mode: Mode) -> TaosAdapter {
        Self::start_with(mode, "127.0.0.1:0".parse().unwrap(), false, None).await
    }

    /// A `wss` listener with a fresh [`Pki`] (its certificate names
    /// `localhost`); `quickack` as for the plain listeners.
    pub async fn start_tls(mode: Mode, quickack: bool) -> TaosAdapter {
        Self::start_with(
            mode,
            "127.0.0.1:0".parse().unwrap(),
            quickack,
            Some(Pki::new()),
        )
        .await
    }

    pub async fn start_with(
        mode: Mode,
        addr: SocketAddr,
        quickack: bool,
        pki: Option<Pki>,
    ) -> TaosAdapter {
        let listener = TcpListener::bind(addr).await.expect("bind stand-in");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            mode,
            quickack,
            tls: pki
                .as_ref()
                .map(|p| tokio_rustls::TlsAcceptor::from(Arc::new(p.server.clone()))),
            tables: Mutex::new(default_tables()),
            sql_log: Mutex::new(Vec::new()),
            hosts: Mutex::new(Vec::new()),
            fault: watch::channel(Fault::None).0,
            next_id: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            open_results: AtomicUsize::new(0),
            block_rows: AtomicUsize::new(0),
            both_paths: std::sync::atomic::AtomicBool::new(false),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                st.connections.fetch_add(1, Ordering::Relaxed);
                let st = st.clone();
                tokio::spawn(async move {
                    serve(stream, st).await;
                });
            }
        });
        TaosAdapter {
            addr,
            state,
            pki,
            accept,
        }
    }

    pub fn mode(&self) -> Mode {
        self.state.mode
    }

    /// A DSN for the `taos` client: `taos+ws://` to 127.0.0.1, or for a TLS
    /// stand-in `taos+wss://` to `localhost` (the name its certificate has).
    pub fn dsn(&self) -> String {
        match self.pki {
            None => format!("taos+ws://root:taosdata@{}/market", self.addr),
            Some(_) => format!(
                "taos+wss://root:taosdata@localhost:{}/market",
                self.addr.port()
            ),
        }
    }

    /// The TLS stand-in's certificates.
    pub fn pki(&self) -> &Pki {
        self.pki.as_ref().expect("not a TLS stand-in")
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.fault.send_replace(fault);
    }

    /// Rows per block in the results (0, the default: all rows in one block).
    pub fn set_block_rows(&self, n: usize) {
        self.state.block_rows.store(n, Ordering::Relaxed);
    }

    /// Serve JSON queries also when reporting >= 3.3.0.8, as taosAdapter
    /// does (by default the stand-in refuses them).
    pub fn accept_both_paths(&self) {
        self.state.both_paths.store(true, Ordering::Relaxed);
    }

    /// Every SQL text received, in order.
    pub fn sql_log(&self) -> Vec<String> {
        let log = self.state.sql_log.lock().unwrap();
        log.iter().map(|(_, s)| s.clone()).collect()
    }

    /// The path each logged query came by.
    pub fn query_paths(&self) -> Vec<QueryPath> {
        let log = self.state.sql_log.lock().unwrap();
        log.iter().map(|(p, _)| *p).collect()
    }

    pub fn query_count(&self) -> usize {
        self.state.sql_log.lock().unwrap().len()
    }

    pub fn clear_log(&self) {
        self.state.sql_log.lock().unwrap().clear();
    }

    /// The `Host` header of every WebSocket handshake, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.state.hosts.lock().unwrap().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// Query results not yet fetched to the end nor freed, over all connections.
    pub fn open_results(&self) -> usize {
        self.state.open_results.load(Ordering::Relaxed)
    }

    /// Adds `symbol`'s generated rows to every `kline_*` table (600 in
    /// `kline_1d`, 20 elsewhere, as for [`SYMBOLS`]).
    pub fn add_symbol(&self, symbol: &str) {
        let mut tables = self.state.tables.lock().unwrap();
        for (name, table) in tables.iter_mut() {
            let Some(freq) = name.strip_prefix("kline_") else {
                continue;
            };
            let (step, n) = kline_shape(freq);
            for i in 0..n {
                table.rows.push(kline_row(symbol, i, step));
            }
        }
    }

    pub fn insert_table(&self, name: &str, table: Table) {
        self.state
            .tables
            .lock()
            .unwrap()
            .insert(name.to_string(), table);
    }
}

/// A query result waiting to be fetched.
struct Pending {
    fields: Vec<(String, Ty)>,
    rows: Vec<Vec<Val>>,
    /// Rows already handed out in blocks.
    next: usize,
    /// The block announced by a JSON `fetch`, for the following `fetch_block`.
    announced: Option<std::ops::Range<usize>>,
}

/// One connection's results; counted in [`State::open_results`] while held.
struct Results<'a> {
    map: HashMap<u64, Pending>,
    open: &'a AtomicUsize,
}

impl Results<'_> {
    fn insert(&mut self, id: u64, p: Pending) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.map.insert(id, p);
    }

    fn remove(&mut self, id: u64) {
        if self.map.remove(&id).is_some() {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Results<'_> {
    fn drop(&mut self) {
        // taosAdapter frees a connection's results when it closes.
        self.open.fetch_sub(self.map.len(), Ordering::Relaxed);
    }
}

// The handshake callback signature is tungstenite's.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, st: Arc<State>) {
    let mut fault = st.fault.subscribe();
    let _ = stream.set_nodelay(true);
    #[cfg(target_os = "linux")]
    if st.quickack {
        let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
    }
    if *fault.borrow() == Fault::Down {
        return; // closed at once
    }
    if *fault.borrow() == Fault::Hang {
        // Hold the socket, never answer (not even the handshake).
        loop {
            if fault.changed().await.is_err() || *fault.borrow() != Fault::Hang {
                break;
            }
        }
        return;
    }
    let stream = QuickAck {
        inner: stream,
        enabled: st.quickack,
    };
    let hosts = st.clone();
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if let Some(h) = req.headers().get("host").and_then(|h| h.to_str().ok()) {
            hosts.hosts.lock().unwrap().push(h.to_string());
        }
        match req.uri().path() {
            "/ws" | "/rest/ws" => Ok(resp),
            _ => {
                let mut e = ErrorResponse::new(Some("not found".into()));
                *e.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                Err(e)
            }
        }
    };
    match &st.tls {
        None => {
            if let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await {
                serve_ws(ws, &st, fault).await;
            }
        }
        Some(acceptor) => {
            let Ok(tls) = acceptor.accept(stream).await else {
                return; // e.g. the client rejected our certificate
            };
            if let Ok(ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await {
                serve_ws(ws, &st, fault).await;
            }
        }
    }
}

/// What to do after a query message.
enum Step {
    Reply(Message),
    Close,
}

async fn serve_ws<S>(mut ws: WebSocketStream<S>, st: &State, mut fault: watch::Receiver<Fault>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut results = Results {
        map: HashMap::new(),
        open: &st.open_results,
    };
    let mode = st.mode;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Down {
                    return; // drop the socket mid-whatever
                }
                continue;
            }
        };
        let Some(Ok(msg)) = msg else { return };
        let current = fault.borrow().clone();
        let reply: Option<Message> = match msg {
            Message::Close(_) => return,
            _ if current == Fault::Hang => continue,
            Message::Text(text) => {
                let Ok(req) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let action = req["action"].as_str().unwrap_or_default().to_string();
                let args = &req["args"];
                let req_id = args["req_id"].as_u64().unwrap_or(0);
                let id = args["id"].as_u64().unwrap_or(0);
                match action.as_str() {
                    "version" => Some(text_msg(json!({
                        "code":0,"message":"","action":"version","req_id":req_id,
                        "version":mode.version
                    }))),
                    "conn" => Some(text_msg(
                        json!({"code":0,"message":"","action":"conn","req_id":req_id,"timing":1000}),
                    )),
                    "query" | "fetch" | "fetch_block"
                        if mode.path() == QueryPath::Binary
                            && !st.both_paths.load(Ordering::Relaxed) =>
                    {
                        Some(error_msg(
                            &action,
                            req_id,
                            0xffff,
                            &format!("protocol stand-in reporting {}: JSON {action} sent, but a client must use the binary query path from 3.3.0.8 on", mode.version),
                        ))
                    }
                    "query" => {
                        let sql = args["sql"].as_str().unwrap_or_default().to_string();
                        match query(st, &mut results, &current, QueryPath::Json, req_id, sql).await
                        {
                            Step::Reply(m) => Some(m),
                            Step::Close => return,
                        }
                    }
                    "fetch" => Some(json_fetch(st, &mut results, req_id, id)),
                    "fetch_block" => Some(json_fetch_block(&mut results, req_id, id)),
                    "free_result" => {
                        results.remove(id);
                        None // taosAdapter never answers free_result
                    }
                    // Unknown actions get no reply: an unknown action in a
                    // reply would kill the client's reader task.
                    _ => None,
                }
            }
            Message::Binary(b) if b.len() >= 26 => {
                let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
                let (req_id, id, action) = (u64_at(0), u64_at(8), u64_at(16));
                let version = u16::from_le_bytes([b[24], b[25]]);
                match action {
                    6 if mode.path() == QueryPath::Json => Some(error_msg(
                        "binary_query",
                        req_id,
                        0xffff,
                        &format!(
                            "protocol stand-in reporting {}: binary query sent, but it needs 3.3.0.8",
                            mode.version
                        ),
                    )),
                    6 => {
                        let sql = (version == 1 && b.len() >= 30)
                            .then(|| {
                                let len = u32::from_le_bytes(b[26..30].try_into().unwrap()) as usize;
                                b.get(30..30 + len)
                                    .map(|s| String::from_utf8_lossy(s).into_owned())
                            })
                            .flatten();
                        match sql {
                            None => Some(error_msg(
                                "binary_query",
                                req_id,
                                0xffff,
                                "uncompleted message",
                            )),
                            Some(sql) => {
                                match query(st, &mut results, &current, QueryPath::Binary, req_id, sql)
                                    .await
                                {
                                    Step::Reply(m) => Some(m),
                                    Step::Close => return,
                                }
                            }
                        }
                    }
                    7 if mode.path() == QueryPath::Json || version != 1 => {
                        Some(fetch_raw_block_msg(req_id, id, 0xffff, "unexpected fetch_raw_block", None))
                    }
                    7 => Some(binary_fetch(st, &mut results, req_id, id)),
                    _ => None,
                }
            }
            _ => continue, // pings are answered by tungstenite
        };
        if let Some(reply) = reply {
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    }
}

/// Run a query (applying the current fault) and answer it: `query` on the
/// JSON path, `binary_query` on the binary path.
async fn query(
    st: &State,
    results: &mut Results<'_>,
    current: &Fault,
    path: QueryPath,
    req_id: u64,
    sql: String,
) -> Step {
    let action = match path {
        QueryPath::Json => "query",
        QueryPath::Binary => "binary_query",
    };
    st.sql_log.lock().unwrap().push((path, sql.clone()));
    match current {
        Fault::CloseOnQuery => return Step::Close,
        Fault::Error { code, message } => {
            return Step::Reply(error_msg(action, req_id, *code, message))
        }
        Fault::Slow(d) => tokio::time::sleep(*d).await,
        _ => {}
    }
    let answer = {
        let tables = st.tables.lock().unwrap();
        run_sql(&sql, &tables)
    };
    Step::Reply(match answer {
        Ok((fields, rows)) => {
            let id = st.next_id.fetch_add(1, Ordering::Relaxed);
            let mut msg = json!({
                "code":0,"message":"","action":action,"req_id":req_id,"timing":12000,
                "id":id,"is_update":false,"affected_rows":0,
                "fields_count":fields.len(),
                "fields_names":fields.iter().map(|f| f.0.clone()).collect::<Vec<_>>(),
                "fields_types":fields.iter().map(|f| f.1 as u8).collect::<Vec<_>>(),
                "fields_lengths":fields.iter().map(|f| field_len(f.1)).collect::<Vec<_>>(),
                "precision":0
            });
            if path == QueryPath::Binary {
                // What a 3.3 taosAdapter adds (for DECIMAL columns).
                msg["fields_precisions"] = json!(vec![0; fields.len()]);
                msg["fields_scales"] = json!(vec![0; fields.len()]);
            }
            results.insert(
                id,
                Pending {
                    fields,
                    rows,
                    next: 0,
                    announced: None,
                },
            );
            text_msg(msg)
        }
        Err((code, message)) => error_msg(action, req_id, code, &message),
    })
}

/// The next block's row range, or `None` when every row has been handed out.
fn next_block(st: &State, p: &mut Pending) -> Option<std::ops::Range<usize>> {
    if p.next >= p.rows.len() {
        return None;
    }
    let per = match st.block_rows.load(Ordering::Relaxed) {
        0 => usize::MAX,
        n => n,
    };
    let end = p.rows.len().min(p.next.saturating_add(per));
    let range = p.next..end;
    p.next = end;
    Some(range)
}

/// JSON `fetch`: announce the next block's row count, or completion (and
/// free the result, as taosAdapter does).
fn json_fetch(st: &State, results: &mut Results<'_>, req_id: u64, id: u64) -> Message {
    let Some(p) = results.map.get_mut(&id) else {
        return error_msg("fetch", req_id, 0xffff, "result is nil");
    };
    match next_block(st, p) {
        Some(range) => {
            let msg = json!({
                "code":0,"message":"","action":"fetch","req_id":req_id,"timing":3000,"id":id,
                "completed":false,"rows":range.len(),
                "lengths":p.fields.iter().map(|f| field_len(f.1)).collect::<Vec<_>>()
            });
            p.announced = Some(range);
            text_msg(msg)
        }
        None => {
            results.remove(id);
            text_msg(json!({
                "code":0,"message":"","action":"fetch","req_id":req_id,"timing":1000,"id":id,"completed":true
            }))
        }
    }
}

/// JSON `fetch_block`: the announced block as u64 timing, u64 result id, raw block.
fn json_fetch_block(results: &mut Results<'_>, req_id: u64, id: u64) -> Message {
    match results.map.get_mut(&id) {
        Some(Pending {
            fields,
            rows,
            announced: Some(range),
            ..
        }) => {
            let block = encode_block(fields, &rows[range.clone()]);
            let mut frame = Vec::with_capacity(block.len() + 16);
            frame.extend_from_slice(&5000u64.to_le_bytes());
            frame.extend_from_slice(&id.to_le_bytes());
            frame.extend_from_slice(&block);
            Message::Binary(frame)
        }
        Some(_) => error_msg("fetch_block", req_id, 0xffff, "block is nil"),
        None => error_msg("fetch_block", req_id, 0xffff, "result is nil"),
    }
}

/// Binary `fetch` (action 7): the next block, or `finished` (and the result
/// is freed, as taosAdapter does).
fn binary_fetch(st: &State, results: &mut Results<'_>, req_id: u64, id: u64) -> Message {
    let Some(p) = results.map.get_mut(&id) else {
        return fetch_raw_block_msg(req_id, id, 0xffff, "result is nil", None);
    };
    match next_block(st, p) {
        Some(range) => {
            let block = encode_block(&p.fields, &p.rows[range]);
            fetch_raw_block_msg(req_id, id, 0, "", Some(&block))
        }
        None => {
            results.remove(id);
            fetch_raw_block_msg(req_id, id, 0, "", None)
        }
    }
}

/// taosAdapter's binary `fetch_raw_block` reply: a block, or `finished`
/// (also for errors, with a code and message).
fn fetch_raw_block_msg(
    req_id: u64,
    result_id: u64,
    code: u32,
    message: &str,
    block: Option<&[u8]>,
) -> Message {
    let mut b = Vec::with_capacity(64 + message.len() + block.map_or(0, |x| x.len()));
    b.extend_from_slice(&u64::MAX.to_le_bytes()); // marks the new block format
    b.extend_from_slice(&7u64.to_le_bytes()); // action: fetch_raw_block
    b.extend_from_slice(&1u16.to_le_bytes()); // version
    b.extend_from_slice(&4000u64.to_le_bytes()); // timing, ns
    b.extend_from_slice(&req_id.to_le_bytes());
    b.extend_from_slice(&code.to_le_bytes());
    b.extend_from_slice(&(message.len() as u32).to_le_bytes());
    b.extend_from_slice(message.as_bytes());
    b.extend_from_slice(&result_id.to_le_bytes());
    match block {
        Some(block) => {
            b.push(0);
            b.extend_from_slice(&(block.len() as u32).to_le_bytes());
            b.extend_from_slice(block);
        }
        None => b.push(1),
    }
    Message::Binary(b)
}

/// A TCP stream that re-arms TCP_QUICKACK after every read (Linux clears it
/// as soon as it falls back to delayed ACKs), so that the client's second
/// write of a frame (header, then payload, Nagle on) is not held ~40 ms
/// waiting for our delayed ACK of the first.
struct QuickAck {
    inner: TcpStream,
    enabled: bool,
}

impl QuickAck {
    fn rearm(&self) {
        #[cfg(target_os = "linux")]
        if self.enabled {
            let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if res.is_ready() {
            self.rearm();
        }
        res
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn text_msg(v: Value) -> Message {
    Message::Text(v.to_string())
}

fn error_msg(action: &str, req_id: u64, code: i32, message: &str) -> Message {
    text_msg(json!({"code":code,"message":message,"action":action,"req_id":req_id}))
}

fn field_len(ty: Ty) -> u32 {
    match ty {
        Ty::VarChar | Ty::NChar => 64,
        _ => 8,
    }
}

fn encode_block(fields: &[(String, Ty)], rows: &[Vec<Val>]) -> Vec<u8> {
    let views: Vec<ColumnView> = fields
        .iter()
        .enumerate()
        .map(|(c, (_, ty))| {
            let col = rows.iter().map(|r| &r[c]);
            match ty {
                Ty::Timestamp => ColumnView::from_millis_timestamp(
                    col.map(|v| match v {
                        Val::Ts(t) | Val::I64(t) => Some(*t),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                ),
                Ty::Double => ColumnView::from_doubles(
                    col.map(|v| match v {
                        Val::F64(f) => Some(*f),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                ),
                Ty::BigInt => ColumnView::from_big_ints(
                    col.map(|v| match v {
                        Val::I64(i) | Val::Ts(i) => Some(*i),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                ),
                _ => ColumnView::from_varchar::<String, _, _, _>(
                    col.map(|v| match v {
                        Val::Str(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
                ),
            }
        })
        .collect();
    views_to_raw_block(&views)
}

type Answer = (Vec<(String, Ty)>, Vec<Vec<Val>>);

/// The tiny SQL subset the routes under test generate.
fn run_sql(sql: &str, tables: &HashMap<String, Table>) -> Result<Answer, (i32, String)> {
    let re = regex::Regex::new(
        r"(?is)^\s*SELECT\s+(.+?)\s+FROM\s+(\w+)(?:\s+WHERE\s+(\w+)\s*=\s*'((?:[^'\\]|\\.)*)')?(?:\s+ORDER\s+BY\s+(\w+)(?:\s+(ASC|DESC))?)?(?:\s+LIMIT\s+(\d+))?\s*;?\s*$",
    )
    .unwrap();
    let syntax = || {
        (
            0x2600,
            format!("syntax error near \"{sql}\" (stand-in subset)"),
        )
    };
    let caps = re.captures(sql).ok_or_else(syntax)?;
    let table = tables
        .get(&caps[2])
        .ok_or_else(|| (0x2662, format!("Table does not exist: {}", &caps[2])))?;
    let col_index = |name: &str| {
        table
            .columns
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| (0x2616, format!("Invalid column name: {name}")))
    };
    let selected: Vec<usize> = if caps[1].trim() == "*" {
        (0..table.columns.len()).collect()
    } else {
        caps[1]
            .split(',')
            .map(|c| col_index(c.trim()))
            .collect::<Result<_, _>>()?
    };
    let mut rows: Vec<&Vec<Val>> = table.rows.iter().collect();
    if let (Some(col), Some(lit)) = (caps.get(3), caps.get(4)) {
        let c = col_index(col.as_str())?;
        let mut want = String::new();
        let mut chars = lit.as_str().chars();
        while let Some(ch) = chars.next() {
            want.push(if ch == '\\' {
                chars.next().unwrap_or('\\')
            } else {
                ch
            });
        }
        rows.retain(|r| r[c] == Val::Str(want.clone()));
    }
    if let Some(col) = caps.get(5) {
        let c = col_index(col.as_str())?;
        let key = |v: &Val| match v {
            Val::Ts(x) | Val::I64(x) => *x as f64,
            Val::F64(f) => *f,
            _ => f64::MIN,
        };
        rows.sort_by(|a, b| key(&a[c]).total_cmp(&key(&b[c])));
        if caps
            .get(6)
            .is_some_and(|d| d.as_str().eq_ignore_ascii_case("DESC"))
        {
            rows.reverse();
        }
    }
    if let Some(n) = caps.get(7) {
        rows.truncate(n.as_str().parse().unwrap_or(usize::MAX));
    }
    let fields = selected.iter().map(|&c| table.columns[c].clone()).collect();
    let rows = rows
        .into_iter()
        .map(|r| selected.iter().map(|&c| r[c].clone()).collect())
        .collect();
    Ok((fields, rows))
}

/// The application's kline route's SQL, as in `conf/nearcache.toml`.
#[allow(dead_code)]
pub const KLINE_SQL: &str =
    "SELECT ts, open, high, low, close, volume FROM kline_{freq} WHERE symbol = {symbol} ORDER BY ts DESC LIMIT 500";

/// nearcache's `[tdengine]` section for this stand-in: the kline route
/// (15 min), errors answered as errors, invalid keys as nil, no negative
/// caching, a breaker that does not open in tests that do not mean it to.
#[allow(dead_code)]
pub fn kline_config(
    dsn: String,
    timeout: std::time::Duration,
) -> nearcache::config::TdengineConfig {
    use nearcache::config::{TdFormat, TdOnError, TdRoute, TdengineConfig};
    use std::time::Duration;
    TdengineConfig {
        dsn,
        timeout,
        on_error: TdOnError::Error,
        on_invalid_key: TdOnError::Nil,
        format: TdFormat::Json,
        max_concurrent_queries: 16,
        pool_size: 2,
        negative_ttl: None,
        breaker_failures: 1000,
        breaker_cooldown: Duration::from_secs(5),
        routes: vec![TdRoute {
            key: "kline:{symbol}:{freq}".into(),
            sql: KLINE_SQL.into(),
            ttl: Duration::from_secs(15 * 60),
            params: kline_params(),
        }],
        tls: Default::default(),
    }
}

/// The parameters of the application's kline route (`kline:{symbol}:{freq}`),
/// whose tables this stand-in serves.
#[allow(dead_code)]
pub fn kline_params() -> Vec<(String, nearcache::config::TdParam)> {
    use nearcache::config::TdParam;
    vec![
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
                allow: Some(FREQ_ALLOW.map(String::from).to_vec()),
                quote: false,
            },
        ),
    ]
}

const FREQ_ALLOW: [&str; 7] = ["1m", "5m", "15m", "30m", "60m", "1d", "1w"];
