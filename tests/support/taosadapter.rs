//! A **protocol stand-in** for taosAdapter, for tests only. It is NOT TDengine.
//!
//! It speaks the subset of taosAdapter's WebSocket protocol (`/ws`, with
//! `/rest/ws` accepted too) that the official `taos` 0.12.3 client uses on its
//! JSON query path: `version`, `conn`, `query`, `fetch`, `fetch_block`
//! (binary reply: u64 timing, u64 result id, raw block) and `free_result` (no
//! reply). It answers from in-memory tables, understands only
//! `SELECT cols FROM table [WHERE col = 'x'] [ORDER BY col [ASC|DESC]] [LIMIT n]`,
//! records every SQL text it receives, and can simulate faults: down
//! (connections closed at once), hang (accept, never answer), error replies
//! and slow replies.
//!
//! It reports version `3.0.0.0` so the client stays on the JSON query path
//! (binary SQL needs >= 3.3.0.8).
//!
//! Include it with `#[path = "support/taosadapter.rs"] mod taosadapter;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taos::taos_query::common::raw::views::views_to_raw_block;
use taos::taos_query::common::ColumnView;
use taos::Ty;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

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
    quickack: bool,
    tables: Mutex<HashMap<String, Table>>,
    sql_log: Mutex<Vec<String>>,
    fault: watch::Sender<Fault>,
    next_id: AtomicU64,
    connections: AtomicU64,
}

/// A running stand-in; dropping it stops accepting (open connections linger
/// until the client closes them).
pub struct TaosAdapter {
    pub addr: SocketAddr,
    state: Arc<State>,
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

impl TaosAdapter {
    /// Start on an ephemeral loopback port with [`default_tables`], with
    /// TCP_NODELAY and TCP_QUICKACK on its sockets (see `docs/tdengine.md`:
    /// without quick ACKs each client request stalls ~40 ms).
    pub async fn start() -> TaosAdapter {
        Self::start_with("127.0.0.1:0".parse().unwrap(), true).await
    }

    /// Like [`TaosAdapter::start`] but with the kernel's default delayed ACKs,
    /// as a stock server has them.
    pub async fn start_without_quickack() -> TaosAdapter {
        Self::start_with("127.0.0.1:0".parse().unwrap(), false).await
    }

    pub async fn start_on(addr: SocketAddr) -> TaosAdapter {
        Self::start_with(addr, true).await
    }

    pub async fn start_with(addr: SocketAddr, quickack: bool) -> TaosAdapter {
        let listener = TcpListener::bind(addr).await.expect("bind stand-in");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            quickack,
            tables: Mutex::new(default_tables()),
            sql_log: Mutex::new(Vec::new()),
            fault: watch::channel(Fault::None).0,
            next_id: AtomicU64::new(1),
            connections: AtomicU64::new(0),
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
            accept,
        }
    }

    /// A DSN for the `taos` client.
    pub fn dsn(&self) -> String {
        format!("taos+ws://root:taosdata@{}/market", self.addr)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.fault.send_replace(fault);
    }

    /// Every SQL text received, in order.
    pub fn sql_log(&self) -> Vec<String> {
        self.state.sql_log.lock().unwrap().clone()
    }

    pub fn query_count(&self) -> usize {
        self.state.sql_log.lock().unwrap().len()
    }

    pub fn clear_log(&self) {
        self.state.sql_log.lock().unwrap().clear();
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
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
    sent: bool,
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
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match req.uri().path() {
            "/ws" | "/rest/ws" => Ok(resp),
            _ => {
                let mut e = ErrorResponse::new(Some("not found".into()));
                *e.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
                Err(e)
            }
        }
    };
    let stream = QuickAck {
        inner: stream,
        enabled: st.quickack,
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let mut results: HashMap<u64, Pending> = HashMap::new();
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
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => return,
            _ => continue, // pings are answered by tungstenite
        };
        let current = fault.borrow().clone();
        if current == Fault::Hang {
            continue;
        }
        let Ok(req) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let action = req["action"].as_str().unwrap_or_default().to_string();
        let args = &req["args"];
        let req_id = args["req_id"].as_u64().unwrap_or(0);
        let reply: Option<Message> = match action.as_str() {
            "version" => Some(text_msg(
                json!({"code":0,"message":"","action":"version","req_id":req_id,"version":"3.0.0.0"}),
            )),
            "conn" => Some(text_msg(
                json!({"code":0,"message":"","action":"conn","req_id":req_id,"timing":1000}),
            )),
            "query" => {
                let sql = args["sql"].as_str().unwrap_or_default().to_string();
                st.sql_log.lock().unwrap().push(sql.clone());
                match current {
                    Fault::CloseOnQuery => return,
                    Fault::Error { code, message } => Some(text_msg(
                        json!({"code":code,"message":message,"action":"query","req_id":req_id}),
                    )),
                    other => {
                        if let Fault::Slow(d) = other {
                            tokio::time::sleep(d).await;
                        }
                        let answer = {
                            let tables = st.tables.lock().unwrap();
                            run_sql(&sql, &tables)
                        };
                        Some(match answer {
                            Ok((fields, rows)) => {
                                let id = st.next_id.fetch_add(1, Ordering::Relaxed);
                                let msg = json!({
                                    "code":0,"message":"","action":"query","req_id":req_id,"timing":12000,
                                    "id":id,"is_update":false,"affected_rows":0,
                                    "fields_count":fields.len(),
                                    "fields_names":fields.iter().map(|f| f.0.clone()).collect::<Vec<_>>(),
                                    "fields_types":fields.iter().map(|f| f.1 as u8).collect::<Vec<_>>(),
                                    "fields_lengths":fields.iter().map(|f| field_len(f.1)).collect::<Vec<_>>(),
                                    "precision":0
                                });
                                results.insert(
                                    id,
                                    Pending {
                                        fields,
                                        rows,
                                        sent: false,
                                    },
                                );
                                text_msg(msg)
                            }
                            Err((code, message)) => text_msg(
                                json!({"code":code,"message":message,"action":"query","req_id":req_id}),
                            ),
                        })
                    }
                }
            }
            "fetch" => {
                let id = args["id"].as_u64().unwrap_or(0);
                match results.get_mut(&id) {
                    Some(p) if !p.sent && !p.rows.is_empty() => Some(text_msg(json!({
                        "code":0,"message":"","action":"fetch","req_id":req_id,"timing":3000,"id":id,
                        "completed":false,"rows":p.rows.len(),
                        "lengths":p.fields.iter().map(|f| field_len(f.1)).collect::<Vec<_>>()
                    }))),
                    Some(_) => Some(text_msg(json!({
                        "code":0,"message":"","action":"fetch","req_id":req_id,"timing":1000,"id":id,"completed":true
                    }))),
                    None => Some(text_msg(json!({
                        "code":0x2602,"message":"result not found","action":"fetch","req_id":req_id,"id":id
                    }))),
                }
            }
            "fetch_block" => {
                let id = args["id"].as_u64().unwrap_or(0);
                match results.get_mut(&id) {
                    Some(p) => {
                        p.sent = true;
                        let block = encode_block(&p.fields, &p.rows);
                        let mut frame = Vec::with_capacity(block.len() + 16);
                        frame.extend_from_slice(&5000u64.to_le_bytes());
                        frame.extend_from_slice(&id.to_le_bytes());
                        frame.extend_from_slice(&block);
                        Some(Message::Binary(frame))
                    }
                    None => Some(text_msg(json!({
                        "code":0x2602,"message":"result not found","action":"fetch_block","req_id":req_id
                    }))),
                }
            }
            "free_result" => {
                let id = args["id"].as_u64().unwrap_or(0);
                results.remove(&id);
                None // taosAdapter never answers free_result
            }
            // Unknown actions get no reply: an unknown action in a reply
            // would kill the client's reader task.
            _ => None,
        };
        if let Some(reply) = reply {
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    }
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

impl tokio::io::AsyncRead for QuickAck {
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

impl tokio::io::AsyncWrite for QuickAck {
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
