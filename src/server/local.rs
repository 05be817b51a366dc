//! Commands nearcache answers or decides itself: HELLO, AUTH, SELECT,
//! UNWATCH, RESET, QUIT, NEARCACHE (CLIENT is in `client_cmd.rs`).
//!
//! Connection setup never turns L1 off: HELLO is answered here with the
//! upstream's real version and the session's own id, a name is kept per
//! session, SELECT of the configured database changes nothing. What does
//! live on a connection (another database, another user) gets the client
//! its own connection, for as long as it lasts.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::session::{Flow, Session};
use super::{count_request, Outcome};
use crate::error::Error;
use crate::protocol::{self, Request};
use crate::upstream::Login;

impl Session {
    pub(super) async fn local(&mut self, name: &[u8], req: &Request) -> Flow {
        count_request(name, Outcome::Local);
        let args = &req.args;
        match name {
            b"QUIT" => {
                self.replies.ready(protocol::ok(), false);
                Flow::Close
            }
            b"AUTH" => self.auth(req).await,
            b"HELLO" => self.hello(req).await,
            b"SELECT" => self.select(req).await,
            b"UNWATCH" => {
                if self.pinned.is_some() {
                    self.pinned_request(name, req, &crate::command::Keys::None, false)
                        .await
                } else {
                    self.answer(protocol::ok())
                }
            }
            b"RESET" => self.reset(),
            b"CLIENT" => self.client(req).await,
            b"NEARCACHE" => {
                let reply = self.nearcache(args);
                self.answer(reply)
            }
            _ => self.answer(protocol::error("ERR unknown command")),
        }
    }

    async fn select(&mut self, req: &Request) -> Flow {
        if req.args.len() != 2 {
            return self.answer(protocol::error(
                "ERR wrong number of arguments for 'select' command",
            ));
        }
        let default_db = self.sidecar.config.upstream.url.db;
        let db = std::str::from_utf8(&req.args[1])
            .ok()
            .and_then(|d| d.parse::<u32>().ok());
        if self.pinned.is_none() && db == Some(default_db) && !self.state.needs_pin() {
            return self.answer(protocol::ok());
        }
        // Another database (or a transaction): it lives on the client's own connection.
        self.pinned_request(b"SELECT", req, &crate::command::Keys::None, false)
            .await
    }

    /// Does a login name nearcache's own upstream user?
    fn is_configured_login(&self, user: Option<&[u8]>, pass: &[u8]) -> bool {
        let url = &self.sidecar.config.upstream.url;
        let same_user = match (user, url.username.as_deref()) {
            (None, _) => true,
            (Some(u), Some(cfg)) => u == cfg.as_bytes(),
            (Some(u), None) => u == b"default",
        };
        same_user && url.password.as_deref().map(|p| p.as_bytes()) == Some(pass)
    }

    fn local_password_ok(&self, user: Option<&[u8]>, pass: &[u8]) -> bool {
        let Some(expected) = &self.sidecar.config.server.requirepass else {
            return false;
        };
        user.is_none_or(|u| u == b"default") && pass == expected.as_bytes()
    }

    async fn auth(&mut self, req: &Request) -> Flow {
        let args = &req.args;
        let (user, pass) = match args.len() {
            2 => (None, &args[1]),
            3 => (Some(args[1].as_ref()), &args[2]),
            _ => {
                return self.answer(protocol::error(
                    "ERR wrong number of arguments for 'auth' command",
                ))
            }
        };
        if self.sidecar.config.server.requirepass.is_some() {
            if self.local_password_ok(user, pass) {
                self.authed = true;
                return self.answer(protocol::ok());
            }
            return self.answer(protocol::error(
                "WRONGPASS invalid username-password pair or user is disabled.",
            ));
        }
        if self.state.in_multi() || self.state.subscriptions() > 0 {
            // Redis' own rules for AUTH in these states, on the connection itself.
            return self
                .pinned_request(b"AUTH", req, &crate::command::Keys::None, false)
                .await;
        }
        let login = if self.is_configured_login(user, pass) {
            Login::Configured
        } else {
            Login::Auth(args.to_vec())
        };
        match self
            .switch_login(login, args.get(2).map(|_| args[1].clone()))
            .await
        {
            Ok(Flow::Next) => self.answer(protocol::ok()),
            Ok(other) => other,
            Err(e) => self.answer(e.to_reply()),
        }
    }

    /// Logs the client in as `login`: its own upstream connection opened with
    /// those credentials (the server's refusal is the client's answer), or
    /// back to nearcache's user and the shared connections and L1.
    async fn switch_login(&mut self, login: Login, user: Option<Bytes>) -> Result<Flow, Error> {
        let was_foreign = self.state.foreign;
        let foreign = !matches!(login, Login::Configured);
        if !foreign && !was_foreign {
            return Ok(Flow::Next);
        }
        // Every earlier request ran as the old user: let them finish first.
        self.replies.collect_now();
        if !self.replies.is_empty() {
            return Ok(Flow::Stall);
        }
        let old_login = std::mem::replace(&mut self.login, login);
        let old_pinned = self.pinned.take();
        if foreign {
            match self.attach_pinned().await {
                Ok(_) => {}
                Err(e) => {
                    self.login = old_login;
                    self.pinned = old_pinned;
                    return Err(e);
                }
            }
        }
        // The old connection was logged in as someone else: it is not reused.
        drop(old_pinned);
        self.state.foreign = foreign;
        self.info.details.lock().user = if foreign {
            Some(user.unwrap_or_else(|| Bytes::from_static(b"default")))
        } else {
            None
        };
        if !self.state.needs_pin() {
            self.release_pinned();
        }
        Ok(Flow::Next)
    }

    async fn hello(&mut self, req: &Request) -> Flow {
        let args = &req.args;
        let mut version = self.proto;
        let mut auth: Option<(Bytes, Bytes)> = None;
        let mut setname: Option<Bytes> = None;
        if let Some(v) = args.get(1) {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u8>().ok())
            {
                Some(v @ (2 | 3)) => version = v,
                _ => return self.answer(protocol::error("NOPROTO unsupported protocol version")),
            }
            let mut i = 2;
            while i < args.len() {
                let opt = args[i].to_ascii_uppercase();
                if opt == b"AUTH" && i + 2 < args.len() {
                    auth = Some((args[i + 1].clone(), args[i + 2].clone()));
                    i += 3;
                } else if opt == b"SETNAME" && i + 1 < args.len() {
                    setname = Some(args[i + 1].clone());
                    i += 2;
                } else {
                    let msg = format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    );
                    return self.answer(protocol::error(&msg));
                }
            }
        }
        if let Some(name) = &setname {
            if let Err(e) = valid_name(name) {
                return self.answer(e);
            }
        }
        // A new protocol means other shared connections: earlier requests
        // must be answered before later ones can run on the new ones.
        if version != self.proto && !self.can_take_none() {
            return Flow::Stall;
        }
        if self.sidecar.config.server.requirepass.is_some() {
            match &auth {
                Some((u, p)) if !self.local_password_ok(Some(u), p) => {
                    return self.answer(protocol::error(
                        "WRONGPASS invalid username-password pair or user is disabled.",
                    ))
                }
                Some(_) => self.authed = true,
                None if !self.authed => return self.answer(protocol::error(
                    "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
                )),
                None => {}
            }
        } else if let Some((user, pass)) = auth {
            let login = if self.is_configured_login(Some(&user), &pass) {
                Login::Configured
            } else {
                Login::Hello {
                    user: user.clone(),
                    pass,
                }
            };
            let old_proto = std::mem::replace(&mut self.proto, version);
            match self.switch_login(login, Some(user)).await {
                Ok(Flow::Next) => {}
                Ok(other) => {
                    self.proto = old_proto;
                    return other;
                }
                Err(e) => {
                    self.proto = old_proto;
                    return self.answer(e.to_reply());
                }
            }
        }
        if let Some(name) = setname {
            self.info.details.lock().name = (!name.is_empty()).then_some(name);
        }
        if version != self.proto {
            self.proto = version;
            self.drop_mux();
            if self.pinned.is_some() {
                // The client's own connection speaks the new protocol too.
                let hello =
                    protocol::command([b"HELLO".to_vec(), version.to_string().into_bytes()]);
                if let Some(conn) = self.pinned.as_mut() {
                    conn.proto = version;
                }
                self.internal_pinned(hello).await;
            }
        }
        self.sync_details();
        let upstream = self.sidecar.upstream.hello(version).await;
        let reply = self.hello_reply(version, upstream);
        self.answer(reply)
    }

    /// May the session switch protocols or logins now (nothing owed)?
    fn can_take_none(&mut self) -> bool {
        self.replies.collect_now();
        self.replies.is_empty()
    }

    /// The HELLO map: the upstream's own fields (`upstream`: its HELLO
    /// reply), with this client's protocol and nearcache's id for it. With
    /// a cluster, a master's fields with `mode` `standalone`: the client
    /// talks to one server, which it must not take for a cluster node
    /// (asking it for `CLUSTER SLOTS` and going to the nodes directly).
    fn hello_reply(&self, version: u8, upstream: Option<Bytes>) -> Bytes {
        let cluster = self.sidecar.cluster.is_some();
        let mut pairs: Vec<(String, Bytes)> = Vec::new();
        if let Some(raw) = &upstream {
            if let Some(parts) = protocol::elements(raw) {
                for pair in parts.chunks(2) {
                    if let [k, v] = pair {
                        let name = protocol::scalar(&raw[k.clone()]).unwrap_or_default();
                        pairs.push((
                            String::from_utf8_lossy(&name).into_owned(),
                            raw.slice(v.clone()),
                        ));
                    }
                }
            }
        }
        if pairs.is_empty() {
            for (k, v) in [
                ("server", protocol::bulk_bytes(b"redis")),
                ("version", protocol::bulk_bytes(b"7.0.0")),
                ("proto", protocol::integer(2)),
                ("id", protocol::integer(0)),
                ("mode", protocol::bulk_bytes(b"standalone")),
                ("role", protocol::bulk_bytes(b"master")),
                ("modules", protocol::array(&[])),
            ] {
                pairs.push((k.to_string(), v));
            }
        }
        for (k, v) in pairs.iter_mut() {
            match k.as_str() {
                "proto" => *v = protocol::integer(version as i64),
                "id" => *v = protocol::integer(self.info.id as i64),
                "mode" if cluster => *v = protocol::bulk_bytes(b"standalone"),
                _ => {}
            }
        }
        let refs: Vec<(&str, Bytes)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        protocol::map(version == 3, &refs)
    }

    fn reset(&mut self) -> Flow {
        if !self.can_take_none() {
            return Flow::Stall;
        }
        // Whatever lived on the client's own connection ends with it.
        if let Some(conn) = self.pinned.take() {
            self.sidecar.upstream.pinned.release(conn, false);
        }
        self.info.upstream_id.store(-1, Ordering::Relaxed);
        *self.info.pinned_at.lock() = None;
        self.shard_reset();
        self.mirrors_reset();
        self.state.reset();
        self.login = Login::Configured;
        self.proto = 2;
        self.drop_mux();
        self.reply_off = false;
        self.skip_next = false;
        self.authed = self.sidecar.config.server.requirepass.is_none();
        {
            let mut d = self.info.details.lock();
            d.name = None;
            d.user = None;
        }
        self.sync_details();
        self.replies.ready(protocol::simple("RESET"), false);
        Flow::Next
    }

    /// Sends nearcache's own request on the pinned connection; its reply is consumed.
    pub(super) async fn internal_pinned(&mut self, request: Bytes) {
        let mut owed = super::replies::PinnedReplies::new(
            1,
            super::pinned::Effect::None,
            Some(std::time::Instant::now() + self.sidecar.config.upstream.command_timeout),
        );
        owed.internal = true;
        self.replies.push(super::replies::Owed::Pinned(owed), false);
        let written = match self.pinned.as_mut() {
            Some(conn) => conn.write(&request).await,
            None => Err(Error::Upstream("connection closed".into())),
        };
        if let Err(e) = written {
            self.pinned = None;
            self.replies.pinned_lost(&e);
        }
    }

    fn drop_mux(&mut self) {
        self.mux = None;
    }

    /// `NEARCACHE STATS | FLUSH | HOTKEYS [N] | HELP`.
    fn nearcache(&self, args: &[Bytes]) -> Bytes {
        let sub = args
            .get(1)
            .map(|a| a.to_ascii_uppercase())
            .unwrap_or_default();
        let cache = &self.sidecar.cache;
        match sub.as_slice() {
            b"STATS" if args.len() == 2 => self.stats(),
            b"FLUSH" if args.len() == 2 => {
                cache.clear_all("admin");
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
                let items: Vec<Bytes> = cache
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

    fn stats(&self) -> Bytes {
        let s = &self.sidecar;
        let cache = &s.cache;
        let c = &cache.counters;
        let int = |v: u64| protocol::integer(v as i64);
        let text = |t: &str| protocol::bulk_bytes(t.as_bytes());
        let load = |a: &std::sync::atomic::AtomicU64| int(a.load(Ordering::Relaxed));
        let mut pairs: Vec<(&str, Bytes)> = vec![
            ("enabled", int(cache.enabled() as u64)),
            ("serving", int(cache.is_serving() as u64)),
            ("feed", text(&cache.feed_state())),
            ("hits", load(&c.hits)),
            ("misses", load(&c.misses)),
            ("entries", int(cache.entries())),
            ("bytes", int(cache.weighted_bytes())),
            ("max_bytes", int(cache.config.max_bytes)),
            ("evictions", int(cache.evictions())),
            ("invalidations", load(&c.invalidations)),
            ("flushes", load(&c.flushes)),
            ("coalesced_misses", load(&c.coalesced)),
            ("barriers", load(&c.barriers)),
            ("fills_in_flight", int(cache.fills_in_flight() as u64)),
            ("clients", int(s.clients.count() as u64)),
            ("pinned_connections", int(s.upstream.pinned.open() as u64)),
            ("upstream_up", int(s.upstream.is_up() as u64)),
        ];
        if let Some(sentinel) = s.upstream.sentinel() {
            pairs.push((
                "sentinel_master",
                text(&sentinel.master().unwrap_or_default()),
            ));
            pairs.push(("sentinel_switches", int(sentinel.epoch())));
        }
        if let Some(td) = &s.tdengine {
            let t = td.stats();
            pairs.push(("tdengine_queries", int(t.queries)));
            pairs.push(("tdengine_errors", int(t.errors)));
            pairs.push(("tdengine_rejected_keys", int(t.rejected)));
            pairs.push(("tdengine_circuit", text(&t.circuit)));
        }
        protocol::map(self.proto == 3, &pairs)
    }
}

/// Redis' rule for client names: no spaces, newlines or other special characters.
pub(super) fn valid_name(name: &[u8]) -> Result<(), Bytes> {
    if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Err(protocol::error(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    Ok(())
}
