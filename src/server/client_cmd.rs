//! `CLIENT ...`, answered for the client's connection to nearcache, which is
//! the connection the client knows: its id, its name, its entry in the list,
//! killing it. What lives on a Redis connection (tracking, no-touch) gets
//! the client its own connection; what must act while Redis is busy
//! (PAUSE, UNPAUSE, UNBLOCK) goes on the control connection (with a
//! cluster, on connections of their own: PAUSE and UNPAUSE to every master,
//! UNBLOCK to the node of the blocked client's connection).

use std::future::Future;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::local::valid_name;
use super::replies::Owed;
use super::session::{Flow, Session};
use crate::command::Keys;
use crate::protocol::{self, Request};
use crate::upstream::ReplyResult;

fn wrong_args(sub: &str) -> Bytes {
    protocol::error(&format!(
        "ERR wrong number of arguments for 'client|{}' command",
        sub.to_ascii_lowercase()
    ))
}

impl Session {
    pub(super) async fn client(&mut self, req: &Request) -> Flow {
        let args = &req.args;
        let Some(sub_raw) = args.get(1) else {
            return self.answer(protocol::error(
                "ERR wrong number of arguments for 'client' command",
            ));
        };
        let sub = String::from_utf8_lossy(sub_raw).to_ascii_uppercase();
        let resp3 = self.proto == 3;
        match sub.as_str() {
            "ID" if args.len() == 2 => self.answer(protocol::integer(self.info.id as i64)),
            "SETNAME" if args.len() == 3 => match valid_name(&args[2]) {
                Ok(()) => {
                    let name = args[2].clone();
                    self.info.details.lock().name = (!name.is_empty()).then_some(name);
                    self.answer(protocol::ok())
                }
                Err(e) => self.answer(e),
            },
            "GETNAME" if args.len() == 2 => {
                let name = self.info.details.lock().name.clone();
                self.answer(match name {
                    Some(n) => protocol::bulk_bytes(&n),
                    None => protocol::nil(resp3),
                })
            }
            "SETINFO" if args.len() == 4 => {
                let attr = args[2].to_ascii_uppercase();
                let value = Some(args[3].clone());
                match attr.as_slice() {
                    b"LIB-NAME" | b"LIB-VER" if args[3].iter().any(|c| !(b'!'..=b'~').contains(c)) => {
                        self.answer(protocol::error(&format!(
                            "ERR {} cannot contain spaces, newlines or special characters.",
                            String::from_utf8_lossy(&args[2])
                        )))
                    }
                    b"LIB-NAME" => {
                        self.info.details.lock().lib_name = value;
                        self.answer(protocol::ok())
                    }
                    b"LIB-VER" => {
                        self.info.details.lock().lib_ver = value;
                        self.answer(protocol::ok())
                    }
                    _ => self.answer(protocol::error(&format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(&args[2])
                    ))),
                }
            }
            "INFO" if args.len() == 2 => {
                let line = self.info.line(Some("client|info")) + "\n";
                self.answer(verbatim(resp3, &line))
            }
            "LIST" => self.client_list(args, resp3),
            "KILL" if args.len() >= 3 => {
                let reply = self.sidecar.clients.kill(self.info.id, args);
                self.answer(reply)
            }
            "REPLY" if args.len() == 3 => match args[2].to_ascii_uppercase().as_slice() {
                b"ON" => {
                    self.reply_off = false;
                    self.skip_next = false;
                    self.replies.ready(protocol::ok(), false);
                    Flow::Next
                }
                b"OFF" => {
                    self.reply_off = true;
                    Flow::Next
                }
                b"SKIP" => {
                    if !self.reply_off {
                        self.skip_next = true;
                    }
                    Flow::Next
                }
                _ => self.answer(protocol::error("ERR syntax error")),
            },
            "NO-EVICT" if args.len() == 3 => {
                // nearcache's clients are not Redis' clients: Redis never evicts them.
                match args[2].to_ascii_uppercase().as_slice() {
                    b"ON" | b"OFF" => self.answer(protocol::ok()),
                    _ => self.answer(protocol::error("ERR syntax error")),
                }
            }
            "MAINT_NOTIFICATIONS" => {
                // Open-source Redis has no such subcommand; maintenance of the
                // upstream is nearcache's business, so none reaches a client.
                self.answer(protocol::error(&format!(
                    "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                    String::from_utf8_lossy(sub_raw)
                )))
            }
            "GETREDIR" if args.len() == 2 => {
                // The id the client redirected to is the one nearcache gave it.
                let redirect = if self.state.tracking() { self.redirect } else { -1 };
                self.answer(protocol::integer(redirect))
            }
            "TRACKINGINFO" if args.len() == 2 && !self.state.tracking() => {
                let reply = protocol::map(
                    resp3,
                    &[
                        ("flags", protocol::array(&[protocol::bulk_bytes(b"off")])),
                        ("redirect", protocol::integer(-1)),
                        ("prefixes", protocol::array(&[])),
                    ],
                );
                self.answer(reply)
            }
            "CACHING" if !self.state.tracking() => self.answer(protocol::error(
                "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
            )),
            "TRACKING" => {
                // Tracking lives on a connection: the client gets its own, and
                // REDIRECT names another nearcache client by the id we gave it.
                self.redirect = redirect_target(args).unwrap_or(0);
                let req = self.translate_redirect(req);
                self.pinned_request(b"CLIENT", &req, &Keys::None, false).await
            }
            "PAUSE" | "UNPAUSE" if !self.state.needs_pin() => match self.sidecar.cluster.clone() {
                // The client pauses "its Redis": with a cluster, every master.
                Some(router) => {
                    let (proto, request) = (self.proto, req.encoded());
                    self.owe(async move { router.control_every_master(proto, request).await })
                }
                None => self.control(req).await,
            },
            "UNBLOCK" if !self.state.needs_pin() => self.unblock(req).await,
            "HELP" if !self.state.needs_pin() => self.forward(req, &Keys::None).await,
            "ID" | "SETNAME" | "GETNAME" | "SETINFO" | "INFO" | "KILL" | "REPLY" | "NO-EVICT" => {
                self.answer(wrong_args(&sub))
            }
            // CACHING, GETREDIR, TRACKINGINFO of a tracking client, NO-TOUCH,
            // anything newer than nearcache: on the client's own connection.
            _ => self.pinned_request(b"CLIENT", req, &Keys::None, false).await,
        }
    }

    fn client_list(&mut self, args: &[Bytes], resp3: bool) -> Flow {
        let mut ids: Option<Vec<u64>> = None;
        let mut pubsub: Option<bool> = None;
        let mut i = 2;
        while i < args.len() {
            match args[i].to_ascii_uppercase().as_slice() {
                b"TYPE" if i + 1 < args.len() => {
                    match args[i + 1].to_ascii_lowercase().as_slice() {
                        b"normal" => pubsub = Some(false),
                        b"pubsub" => pubsub = Some(true),
                        b"master" | b"replica" | b"slave" => ids = Some(Vec::new()),
                        other => {
                            return self.answer(protocol::error(&format!(
                                "ERR Unknown client type '{}'",
                                String::from_utf8_lossy(other)
                            )))
                        }
                    }
                    i += 2;
                }
                b"ID" if i + 1 < args.len() => {
                    let mut list = Vec::new();
                    for a in &args[i + 1..] {
                        match std::str::from_utf8(a)
                            .ok()
                            .and_then(|a| a.parse::<i64>().ok())
                        {
                            Some(id) => list.push(u64::try_from(id).unwrap_or(0)),
                            None => return self.answer(protocol::error("ERR Invalid client ID")),
                        }
                    }
                    ids = Some(list);
                    i = args.len();
                }
                _ => return self.answer(protocol::error("ERR syntax error")),
            }
        }
        let me = self.info.id;
        let mut text = String::new();
        for c in self.sidecar.clients.all() {
            if ids.as_ref().is_some_and(|ids| !ids.contains(&c.id)) {
                continue;
            }
            if let Some(p) = pubsub {
                let d = c.details.lock();
                if (d.sub + d.psub + d.ssub > 0) != p {
                    continue;
                }
            }
            text.push_str(&c.line((c.id == me).then_some("client|list")));
            text.push('\n');
        }
        self.answer(verbatim(resp3, &text))
    }

    /// `CLIENT TRACKING ... REDIRECT <id>`: the id is a nearcache client's;
    /// Redis needs the id of that client's own upstream connection.
    fn translate_redirect(&self, req: &Request) -> Request {
        let mut args = req.args.clone();
        if let Some(at) = args
            .iter()
            .position(|a| a.eq_ignore_ascii_case(b"REDIRECT"))
        {
            let target = args
                .get(at + 1)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse::<u64>().ok())
                .and_then(|id| self.sidecar.clients.get(id));
            if let Some(t) = target {
                let upstream = t.upstream_id.load(Ordering::Relaxed);
                if upstream > 0 {
                    args[at + 1] = Bytes::from(upstream.to_string());
                }
            }
        }
        Request::from_args(args)
    }

    /// `CLIENT UNBLOCK <id>`: the id is a nearcache client's, blocked on its
    /// own upstream connection; the unblock goes on the control connection so
    /// it never waits behind anything.
    async fn unblock(&mut self, req: &Request) -> Flow {
        let args = &req.args;
        if !(3..=4).contains(&args.len()) {
            return self.answer(wrong_args("unblock"));
        }
        let Some(id) = std::str::from_utf8(&args[2])
            .ok()
            .and_then(|a| a.parse::<i64>().ok())
        else {
            return self.answer(protocol::error(
                "ERR value is not an integer or out of range",
            ));
        };
        let target = u64::try_from(id)
            .ok()
            .and_then(|id| self.sidecar.clients.get(id));
        // With a cluster, the node too: the id means nothing on another node
        // (or names someone else's connection there).
        let upstream = match &self.sidecar.cluster {
            Some(_) => target.and_then(|c| c.pinned_at.lock().clone()),
            None => target.map(|c| (String::new(), c.upstream_id.load(Ordering::Relaxed))),
        }
        .filter(|(_, u)| *u > 0);
        let Some((node, upstream)) = upstream else {
            if let Some(mode) = args.get(3) {
                if !mode.eq_ignore_ascii_case(b"TIMEOUT") && !mode.eq_ignore_ascii_case(b"ERROR") {
                    return self.answer(protocol::error(
                        "ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR",
                    ));
                }
            }
            return self.answer(protocol::integer(0));
        };
        let mut fwd = args.clone();
        fwd[2] = Bytes::from(upstream.to_string());
        let fwd = Request::from_args(fwd);
        if let Some(router) = self.sidecar.cluster.clone() {
            // To the node of the blocked client's own connection.
            let (proto, request) = (self.proto, fwd.encoded());
            return self.owe(async move { router.control(&node, proto, request).await });
        }
        self.control(&fwd).await
    }

    /// Queues the reply of a request nearcache sends to cluster nodes on
    /// the client's behalf (run when it reaches the front, in order).
    fn owe(&mut self, reply: impl Future<Output = ReplyResult> + Send + 'static) -> Flow {
        let silent = self.silent_reply();
        let reply = async move {
            match reply.await {
                Ok(r) => r.bytes,
                Err(e) => e.to_reply(),
            }
        };
        self.replies.push(Owed::Composed(Box::pin(reply)), silent);
        self.path_pool();
        Flow::Next
    }

    /// Sends a request on the control connection.
    pub(super) async fn control(&mut self, req: &Request) -> Flow {
        if self.sidecar.cluster.is_some() {
            return self.cluster_forward(req, &crate::command::Keys::None, false);
        }
        let silent = self.silent_reply();
        match self.sidecar.upstream.control() {
            Ok(conn) => {
                let rx = conn.send(req.encoded()).await;
                self.replies
                    .push(Owed::Upstream { rx, guard: None }, silent);
            }
            Err(e) => self.replies.ready(e.to_reply(), silent),
        }
        Flow::Next
    }
}

/// The client id after REDIRECT in `CLIENT TRACKING ...`.
fn redirect_target(args: &[Bytes]) -> Option<i64> {
    let at = args
        .iter()
        .position(|a| a.eq_ignore_ascii_case(b"REDIRECT"))?;
    std::str::from_utf8(args.get(at + 1)?).ok()?.parse().ok()
}

/// CLIENT INFO / LIST text: a verbatim string in RESP3, a bulk string in RESP2.
fn verbatim(resp3: bool, text: &str) -> Bytes {
    if resp3 {
        Bytes::from(format!("={}\r\ntxt:{text}\r\n", text.len() + 4))
    } else {
        protocol::bulk_bytes(text.as_bytes())
    }
}
