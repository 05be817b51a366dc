//! Opening a connection to the upstream: TCP (and TLS), then the handshake
//! that authenticates, picks the RESP version and the database. With a
//! `redis-sentinel://` upstream the address comes from [`Sentinel`] and the
//! handshake also asks `ROLE`: a connection is only ever made to a server
//! that says it is the master.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};

use super::sentinel::Sentinel;
use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::net::{self, BoxStream, FrameReader, TlsConnector};
use crate::protocol::{self, Reply, ReplyKind};

/// Whose credentials a connection is opened with.
#[derive(Clone, Debug)]
pub enum Login {
    /// nearcache's configured user (the URL's user and password).
    Configured,
    /// A client's own `AUTH ...` command, sent first as it was given, so the
    /// client gets exactly the answer Redis gives it.
    Auth(Vec<Bytes>),
    /// A client's `HELLO <v> AUTH <user> <pass>`: sent instead of our HELLO.
    Hello { user: Bytes, pass: Bytes },
}

/// What the handshake learned about the server and the connection.
#[derive(Clone, Debug, Default)]
pub struct ServerInfo {
    /// The HELLO reply as the server sent it (in the connection's protocol).
    pub hello: Bytes,
    /// The connection's client id on the server.
    pub connection_id: i64,
    pub version: String,
    /// `run_id` from `INFO server`, when it was asked for.
    pub run_id: Option<String>,
    /// `role` from the HELLO reply (`master` or `replica`).
    pub role: String,
}

/// A connection after its handshake.
pub struct Connected {
    pub stream: BoxStream,
    /// Bytes read past the handshake's replies.
    pub leftover: BytesMut,
    pub info: ServerInfo,
    /// The `host:port` connected to.
    pub addr: String,
    /// The Sentinel switch epoch the connection belongs to: it must close
    /// when [`Connector::switches`] moves past it (always 0 without Sentinel).
    pub epoch: u64,
    /// With Sentinel: to poke when the server answers `-READONLY` (it was
    /// the master and is not any more).
    pub readonly: Option<Arc<Notify>>,
}

/// Where a pool's connections go.
#[derive(Clone, Debug)]
pub enum Dial {
    /// The configured upstream (a single Redis, or the master Sentinel names).
    Configured,
    /// One node of a cluster (a master).
    Node(String),
    /// A cluster replica, for reads: every connection sends `READONLY`.
    Replica(String),
}

/// Opens connections to the configured upstream, with the handshake applied.
#[derive(Clone)]
pub struct Connector {
    cfg: Arc<UpstreamConfig>,
    tls: Option<TlsConnector>,
    sentinel: Option<Arc<Sentinel>>,
    /// The switch epoch (see [`Sentinel`]); it never moves without Sentinel.
    switches: Arc<watch::Sender<u64>>,
}

impl Connector {
    pub fn new(cfg: UpstreamConfig) -> Result<Connector, Error> {
        let tls = if cfg.tls.enabled {
            Some(TlsConnector::new(&cfg.tls, &cfg.url.host)?)
        } else {
            None
        };
        let switches = Arc::new(watch::channel(0).0);
        let sentinel = cfg.url.sentinel.as_ref().map(|s| {
            Arc::new(Sentinel::new(
                s,
                &cfg.sentinel,
                tls.clone(),
                switches.clone(),
            ))
        });
        Ok(Connector {
            cfg: Arc::new(cfg),
            tls,
            sentinel,
            switches,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.cfg
    }

    /// The Sentinels, for a `redis-sentinel://` upstream.
    pub fn sentinel(&self) -> Option<&Arc<Sentinel>> {
        self.sentinel.as_ref()
    }

    /// The switch epoch: a connection whose [`Connected::epoch`] is older
    /// must be closed.
    pub fn switches(&self) -> watch::Receiver<u64> {
        self.switches.subscribe()
    }

    pub fn tls(&self) -> Option<&TlsConnector> {
        self.tls.as_ref()
    }

    /// Connects and runs the handshake: the login, `HELLO <proto>`, `SELECT`
    /// of the configured database and, with `want_run_id`, `INFO server`,
    /// pipelined in one round trip. A refused login is an
    /// [`Error::Refused`] carrying the server's reply. With Sentinel, to the
    /// master last confirmed, or to the one a resolution finds.
    pub async fn connect(
        &self,
        proto: u8,
        login: &Login,
        want_run_id: bool,
    ) -> Result<Connected, Error> {
        self.connect_since(proto, login, want_run_id, None).await
    }

    /// [`Connector::connect`] for a reconnect: with Sentinel, the master
    /// must come from a resolution that started after `since` (when the
    /// previous connection was lost), as the Sentinel client guidelines ask.
    pub async fn connect_since(
        &self,
        proto: u8,
        login: &Login,
        want_run_id: bool,
        since: Option<Instant>,
    ) -> Result<Connected, Error> {
        match &self.sentinel {
            None => {
                self.dial(self.cfg.url.address(), proto, login, want_run_id, false)
                    .await
            }
            Some(s) => {
                s.connect(since, move |addr| {
                    self.dial(addr, proto, login, want_run_id, false)
                })
                .await
            }
        }
    }

    /// [`Connector::connect`] to another node than the configured one (a
    /// Redis Cluster node), with the same credentials and TLS settings.
    pub async fn connect_to(
        &self,
        addr: &str,
        proto: u8,
        login: &Login,
        want_run_id: bool,
    ) -> Result<Connected, Error> {
        self.dial(addr.to_string(), proto, login, want_run_id, false)
            .await
    }

    /// A pool connection to where `dial` says; to the configured upstream
    /// as a reconnect after `since`.
    pub(super) async fn connect_via(
        &self,
        dial: &Dial,
        proto: u8,
        since: Option<Instant>,
    ) -> Result<Connected, Error> {
        match dial {
            Dial::Node(addr) => self.connect_to(addr, proto, &Login::Configured, true).await,
            Dial::Replica(addr) => {
                self.dial(addr.clone(), proto, &Login::Configured, true, true)
                    .await
            }
            Dial::Configured => {
                self.connect_since(proto, &Login::Configured, true, since)
                    .await
            }
        }
    }

    /// Connects to `addr` and runs the handshake; with `readonly`, the
    /// handshake ends with `READONLY` (a cluster replica then serves reads
    /// of its master's slots instead of redirecting them).
    async fn dial(
        &self,
        addr: String,
        proto: u8,
        login: &Login,
        want_run_id: bool,
        readonly: bool,
    ) -> Result<Connected, Error> {
        let stream = net::connect(&addr, self.tls.as_ref(), self.cfg.connect_timeout).await?;
        match tokio::time::timeout(
            self.cfg.connect_timeout,
            self.handshake(stream, &addr, proto, login, want_run_id, readonly),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Upstream(format!(
                "handshake with {addr}: timed out after {:?}",
                self.cfg.connect_timeout
            ))),
        }
    }

    async fn handshake(
        &self,
        mut stream: BoxStream,
        addr: &str,
        proto: u8,
        login: &Login,
        want_run_id: bool,
        readonly: bool,
    ) -> Result<Connected, Error> {
        let url = &self.cfg.url;
        let mut out = BytesMut::new();
        let mut hello: Vec<Bytes> =
            vec![Bytes::from_static(b"HELLO"), Bytes::from(proto.to_string())];
        match login {
            Login::Configured => {
                if let Some(pass) = &url.password {
                    let user = url.username.as_deref().unwrap_or("default");
                    hello.extend([
                        Bytes::from_static(b"AUTH"),
                        Bytes::copy_from_slice(user.as_bytes()),
                        Bytes::copy_from_slice(pass.as_bytes()),
                    ]);
                }
            }
            Login::Auth(auth) => protocol::encode_command(&mut out, auth),
            Login::Hello { user, pass } => {
                hello.extend([Bytes::from_static(b"AUTH"), user.clone(), pass.clone()])
            }
        }
        protocol::encode_command(&mut out, &hello);
        if url.db != 0 {
            out.extend_from_slice(&protocol::command([
                b"SELECT".to_vec(),
                url.db.to_string().into_bytes(),
            ]));
        }
        if want_run_id {
            out.extend_from_slice(&protocol::command(["INFO", "server"]));
        }
        let check_role = self.sentinel.is_some();
        if check_role {
            out.extend_from_slice(&protocol::command(["ROLE"]));
        }
        if readonly {
            out.extend_from_slice(&protocol::command(["READONLY"]));
        }
        stream
            .write_all(&out)
            .await
            .map_err(|e| Error::upstream_io(&e))?;
        let mut reader = FrameReader::new(stream, BytesMut::with_capacity(4096));
        if matches!(login, Login::Auth(_)) {
            let auth = reader.next().await?;
            if auth.kind == ReplyKind::Error {
                return Err(Error::Refused(auth.bytes));
            }
        }
        let hello = reader.next().await?;
        if hello.kind == ReplyKind::Error {
            return Err(match login {
                Login::Hello { .. } => Error::Refused(hello.bytes),
                _ => Error::Upstream(format!(
                    "handshake refused: {}",
                    hello.error_text().unwrap_or_default()
                )),
            });
        }
        if url.db != 0 {
            let r = reader.next().await?;
            if let Some(text) = r.error_text() {
                return Err(Error::Upstream(format!("SELECT {}: {text}", url.db)));
            }
        }
        let mut info = parse_hello(&hello);
        if want_run_id {
            info.run_id = run_id(&reader.next().await?);
        }
        if check_role {
            let role = reader.next().await?;
            // A user without the right to ROLE (an @admin command) still
            // learns the role from HELLO, which every user may send.
            let role = match protocol::first_word(&role.bytes) {
                Some(r) if role.kind != ReplyKind::Error => {
                    String::from_utf8_lossy(&r).into_owned()
                }
                _ => info.role.clone(),
            };
            if role != "master" {
                let role = if role.is_empty() {
                    "server of unknown role"
                } else {
                    role.as_str()
                };
                return Err(Error::Upstream(format!(
                    "{addr} is a {role}, not the master"
                )));
            }
        }
        if readonly {
            let r = reader.next().await?;
            if let Some(text) = r.error_text() {
                return Err(Error::Upstream(format!("READONLY at {addr}: {text}")));
            }
        }
        let (stream, leftover) = reader.into_parts();
        Ok(Connected {
            stream,
            leftover,
            info,
            addr: addr.to_string(),
            epoch: 0,
            readonly: self.sentinel.as_ref().map(|s| s.readonly_hook()),
        })
    }
}

/// Reads `id` and `version` from a HELLO reply (RESP3 map or RESP2 flat array).
fn parse_hello(reply: &Reply) -> ServerInfo {
    let mut info = ServerInfo {
        hello: reply.bytes.clone(),
        ..Default::default()
    };
    if let Some(parts) = protocol::reply_strings(&reply.bytes) {
        for pair in parts.chunks(2) {
            if let [name, value] = pair {
                match name.as_ref() {
                    b"id" => {
                        info.connection_id = std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0)
                    }
                    b"version" => info.version = String::from_utf8_lossy(value).into_owned(),
                    b"role" => info.role = String::from_utf8_lossy(value).into_owned(),
                    _ => {}
                }
            }
        }
    }
    info
}

/// `run_id:...` from an `INFO server` reply.
fn run_id(reply: &Reply) -> Option<String> {
    let text = protocol::scalar(&reply.bytes)?;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_and_info_are_read() {
        let resp3 = Reply {
            bytes: Bytes::from_static(
                b"%3\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.1\r\n$2\r\nid\r\n:42\r\n",
            ),
            kind: ReplyKind::Normal,
        };
        let info = parse_hello(&resp3);
        assert_eq!((info.connection_id, info.version.as_str()), (42, "7.0.1"));
        let info_reply = Reply {
            bytes: protocol::bulk_bytes(b"# Server\r\nredis_version:7.0.1\r\nrun_id:abc123\r\n"),
            kind: ReplyKind::Normal,
        };
        assert_eq!(run_id(&info_reply).as_deref(), Some("abc123"));
    }
}
