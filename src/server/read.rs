//! The read path: a cacheable read is answered from L1, joined to a fill
//! already in flight, or filled on the client's own multiplexed connection;
//! MGET is answered partly from L1; GETs of TDengine-routed keys fall back
//! to the third tier. L1 decides hit, miss or bypass; it never calls back.
//!
//! Every fill sends `PTTL key` right before its read on the same connection
//! (one round trip), so the entry expires no later than the key in Redis;
//! the generation check makes the pair as good as atomic (a write between
//! them invalidates the fill).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

use super::replies::Owed;
use super::session::{Flow, Path, Session};
use super::{count_request, Outcome};
use crate::cache::{self, Fetched, Lookup, PolicyRef, Ticket};
use crate::command::Keys;
use crate::protocol::{self, ReplyKind, Request};
use crate::tdengine::fill::{Keep, Target};
use crate::tdengine::Tdengine;
use crate::upstream::cluster::router::Router;
use crate::upstream::cluster::{slots, split};
use crate::upstream::{received, MuxConn, ReplyResult};

/// How long L1 may keep what a fill read, from the `PTTL` sent `sent` before
/// it: `None` lets the policy decide; an unreadable PTTL forbids storing.
fn cap_from_pttl(pttl: ReplyResult, sent: Instant) -> Option<Duration> {
    let ms = pttl
        .ok()
        .filter(|r| r.bytes.first() == Some(&b':'))
        .and_then(|r| protocol::scalar(&r.bytes))
        .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok());
    match ms {
        Some(ms) => cache::ttl_from_pttl(ms, sent.elapsed()),
        None => Some(Duration::ZERO),
    }
}

fn pttl_request(key: &[u8]) -> Bytes {
    protocol::command([&b"PTTL"[..], key])
}

/// Reads of one client still owed, by key. A later read of the same key
/// must not be answered from L1 before them: the value they will return may
/// be newer than the cached one, and Redis would run the later read after
/// them. A later write of a key whose TDengine fill may still write back
/// waits for that fill, so that neither overtakes the other.
#[derive(Default)]
pub(super) struct Outstanding {
    reads: Vec<(Bytes, Done, bool)>,
}

/// What an earlier read still owed means for a new read of the same key.
pub(super) enum Earlier {
    None,
    /// The same command in flight: share its reply (never older than it),
    /// if no invalidation came in since that fill took this ticket.
    Join(cache::FillWaiter, Ticket),
    /// Another command: read upstream, behind it.
    Behind,
}

/// When an outstanding read is answered.
enum Done {
    Flag(Arc<AtomicBool>),
    /// A fill, with the command signature and protocol it reads and its ticket.
    Fill(cache::FillWaiter, Bytes, u8, Ticket),
}

impl Done {
    fn is_done(&self) -> bool {
        match self {
            Done::Flag(f) => f.load(Ordering::Acquire),
            Done::Fill(w, ..) => w.peek().is_some(),
        }
    }
}

/// Marks reads as answered when dropped (on every path out of their future).
pub(super) struct Answered(Arc<AtomicBool>);

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Outstanding {
    fn prune(&mut self) {
        self.reads.retain(|(_, done, _)| !done.is_done());
    }

    /// Tracks reads of `keys`; they count as answered when the guard drops.
    fn track<'k>(
        &mut self,
        keys: impl IntoIterator<Item = &'k Bytes>,
        writes_back: bool,
    ) -> Answered {
        let flag = Arc::new(AtomicBool::new(false));
        for k in keys {
            self.reads
                .push((k.clone(), Done::Flag(flag.clone()), writes_back));
        }
        Answered(flag)
    }

    fn track_fill(
        &mut self,
        key: &Bytes,
        waiter: &cache::FillWaiter,
        sig: &Bytes,
        proto: u8,
        ticket: Ticket,
    ) {
        let done = Done::Fill(waiter.clone(), sig.clone(), proto, ticket);
        self.reads.push((key.clone(), done, false));
    }

    /// What an earlier read of `key` still owed means for a read of it with
    /// `sig` in `proto`.
    fn earlier(&mut self, key: &[u8], sig: &Bytes, proto: u8) -> Earlier {
        if !self.reading(key) {
            return Earlier::None;
        }
        let same = self.reads.iter().rev().find_map(|(k, done, _)| match done {
            Done::Fill(w, s, p, t) if k == key && s == sig && *p == proto => Some((w.clone(), *t)),
            _ => None,
        });
        match same {
            Some((w, t)) => Earlier::Join(w, t),
            None => Earlier::Behind,
        }
    }

    /// Is a read of `key` still owed?
    pub fn reading(&mut self, key: &[u8]) -> bool {
        if self.reads.is_empty() {
            return false;
        }
        self.prune();
        self.reads.iter().any(|(k, _, _)| k == key)
    }

    /// Must a write of `keys` wait for a TDengine write-back?
    pub fn blocks_write(&mut self, keys: &Keys) -> bool {
        if self.reads.is_empty() {
            return false;
        }
        self.prune();
        let mut writing_back = self.reads.iter().filter(|(_, _, wb)| *wb);
        match keys {
            Keys::None => false,
            Keys::All => writing_back.next().is_some(),
            Keys::Some(list) => writing_back.any(|(k, _, _)| list.contains(k)),
        }
    }
}

/// A cacheable MGET element's fill: its key, ticket and policy.
type ElementFill = Option<(Bytes, Ticket, PolicyRef)>;

/// Where a fill's read goes (see [`Session::fetch_route`]).
enum FetchRoute {
    Conn(Arc<MuxConn>),
    Cluster(Arc<Router>),
}

/// What the waiters of a claimed fill get if its request was never sent
/// (the claiming session ended first).
fn never_sent() -> crate::Error {
    crate::Error::Internal("the fill's request was never sent".into())
}

impl Session {
    pub(super) async fn read(&mut self, name: &[u8], req: &Request, key: Bytes) -> Flow {
        let cache = self.sidecar.cache.clone();
        let td = self
            .sidecar
            .tdengine
            .clone()
            .filter(|t| name == b"GET" && t.matches(&key));
        let policy = if cache.is_serving() {
            cache.policy(&key)
        } else {
            None
        };
        let Some(policy) = policy else {
            count_request(name, Outcome::Forward);
            return self.plain_read(req, key, td, true).await;
        };
        let sig = cache::signature(name, &req.args);
        match self.outstanding.earlier(&key, &sig, self.proto) {
            Earlier::None => {}
            // An invalidation since that fill began may be of a write Redis
            // ran after the fill's read and before this one: read behind it.
            Earlier::Join(waiter, ticket) if cache.ticket(&key) == ticket => {
                count_request(name, Outcome::Miss);
                cache.count_coalesced();
                let silent = self.silent_reply();
                self.replies.push(Owed::Fill(waiter), silent);
                return Flow::Next;
            }
            Earlier::Join(..) | Earlier::Behind => {
                // An earlier read of this key is still owed: behind it, on the
                // client's connection, as Redis would run it.
                count_request(name, Outcome::Miss);
                return self.plain_read(req, key, td, false).await;
            }
        }
        let silent = self.reply_off || self.skip_next;
        let replies = &mut self.replies;
        let ticket = match cache.lookup(&key, &sig, self.proto, policy, |r| {
            replies.ready_ref(r, silent)
        }) {
            Lookup::Hit => {
                count_request(name, Outcome::Hit);
                self.skip_next = false;
                return Flow::Next;
            }
            Lookup::Bypass => {
                count_request(name, Outcome::Miss);
                return self.plain_read(req, key, td, false).await;
            }
            // The key's cluster slot is not served (its master's feed is
            // not up): as with L1 off.
            Lookup::NotServing => {
                count_request(name, Outcome::Forward);
                return self.plain_read(req, key, td, true).await;
            }
            Lookup::Miss(ticket) => ticket,
        };
        count_request(name, Outcome::Miss);
        if let Some(waiter) = cache.join_fill(&key, &sig, self.proto, ticket) {
            self.outstanding
                .track_fill(&key, &waiter, &sig, self.proto, ticket);
            let silent = self.silent_reply();
            self.replies.push(Owed::Fill(waiter), silent);
            return Flow::Next;
        }
        let Some(route) = self.fetch_route() else {
            return self.flow_after_failed_send();
        };
        // The flight is claimed before its request is sent (sending may
        // await): an identical miss arriving meanwhile joins this fill
        // instead of sending a second read that would then be thrown away.
        let mut claimed = None;
        let waiter = cache.fill(&key, &sig, self.proto, ticket, policy.ttl, || {
            let (tx, rx) = oneshot::channel::<BoxFuture<'static, Fetched>>();
            claimed = Some(tx);
            async move {
                match rx.await {
                    Ok(fetch) => fetch.await,
                    Err(_) => (Err(Arc::new(never_sent())), None),
                }
            }
            .boxed()
        });
        let mut written_now = None;
        if let Some(claimed) = claimed {
            let keep = td.is_some().then(|| Keep {
                cache: cache.clone(),
                sig: sig.clone(),
                ttl: policy.ttl,
            });
            let (fetch, now) = self.fetch(route, req, &key, td, keep).await;
            written_now = now;
            let _ = claimed.send(fetch);
        }
        self.outstanding
            .track_fill(&key, &waiter, &sig, self.proto, ticket);
        let silent = self.silent_reply();
        match written_now {
            // Already on the wire, on the slot's route: what the client
            // sends next may be written before this reply is in.
            Some(token) => {
                let reply = async move {
                    let r = match waiter.await {
                        Ok(r) => r.bytes,
                        Err(e) => e.to_reply(),
                    };
                    drop(token);
                    r
                };
                self.replies.push(Owed::Eager(Box::pin(reply)), silent);
            }
            None => self.replies.push(Owed::Fill(waiter), silent),
        }
        Flow::Next
    }

    /// A read that L1 must not answer or store: on the client's connection.
    /// With `may_read_replica` (L1 is out of it: the key is outside the
    /// policies or L1 is not serving), a cluster's replica may answer it;
    /// not when it must run behind a write or an earlier read of its key.
    async fn plain_read(
        &mut self,
        req: &Request,
        key: Bytes,
        td: Option<Arc<Tdengine>>,
        may_read_replica: bool,
    ) -> Flow {
        if td.is_none() {
            return if may_read_replica {
                self.forward_read(req).await
            } else {
                self.forward(req, &Keys::None).await
            };
        }
        let Some(route) = self.fetch_route() else {
            return self.flow_after_failed_send();
        };
        let (fetch, _) = self.fetch(route, req, &key, td, None).await;
        let silent = self.silent_reply();
        let reply = fetch
            .map(|(r, _)| match r {
                Ok(r) => r.bytes,
                Err(e) => e.to_reply(),
            })
            .boxed();
        self.replies.push(Owed::Composed(reply), silent);
        Flow::Next
    }

    /// What `fetch` found when it could not send: a stall, or an error reply already queued.
    fn flow_after_failed_send(&mut self) -> Flow {
        if self.stalled_on_pool {
            self.stalled_on_pool = false;
            Flow::Stall
        } else {
            Flow::Next
        }
    }

    /// Where a fill's read goes: `None` after queueing the error (or
    /// deciding to stall). Nothing is sent yet.
    fn fetch_route(&mut self) -> Option<FetchRoute> {
        match self.sidecar.cluster.clone() {
            Some(router) => Some(FetchRoute::Cluster(router)),
            None => self.conn_for_read().map(FetchRoute::Conn),
        }
    }

    /// Sends `PTTL key` and the read on the client's multiplexed connection;
    /// returns the future of the reply and its TTL cap. A TDengine-routed GET
    /// that Redis answers nil is filled from TDengine on the same connection,
    /// and the client's later requests wait for it (its write-back must
    /// neither overtake nor be overtaken by them); with `keep`, the filled
    /// value goes to L1 by way of the feed.
    async fn fetch(
        &mut self,
        route: FetchRoute,
        req: &Request,
        key: &Bytes,
        td: Option<Arc<Tdengine>>,
        keep: Option<Keep>,
    ) -> (BoxFuture<'static, Fetched>, Option<Arc<()>>) {
        let conn = match route {
            FetchRoute::Conn(conn) => conn,
            FetchRoute::Cluster(router) => return self.cluster_fetch(router, req, key, td),
        };
        let sent = Instant::now();
        let pttl = conn.send(pttl_request(key)).await;
        let rx = conn.send(req.encoded()).await;
        self.path_pool();
        let Some(td) = td else {
            let fetch = async move {
                let cap = cap_from_pttl(received(pttl.await), sent);
                (received(rx.await), cap)
            };
            return (fetch.boxed(), None);
        };
        let proto = self.proto;
        let key = key.clone();
        let done = self.outstanding.track([&key], true);
        let fetch = async move {
            let _done = done;
            let cap = cap_from_pttl(received(pttl.await), sent);
            match received(rx.await) {
                Ok(first) if first.kind == ReplyKind::Nil => {
                    let target = Target::Conn(conn);
                    crate::tdengine::fill::fill(&td, &target, &key, proto, keep.as_ref()).await
                }
                other => (other, cap),
            }
        };
        (fetch.boxed(), None)
    }

    /// [`Session::fetch`] with a cluster: `PTTL key` and the read as one job
    /// to the slot's owner. A fill that had to follow a redirect is answered
    /// but not stored (its PTTL and read may come from different nodes, or
    /// from one whose feed is not the owner's). A TDengine-routed GET that
    /// the owner answers nil is filled from TDengine and written back to the
    /// owner through the pool (there is no feed write-back with a cluster:
    /// the write's own invalidation decides, as for a write-back through
    /// the pool of a single Redis).
    fn cluster_fetch(
        &mut self,
        router: Arc<Router>,
        req: &Request,
        key: &Bytes,
        td: Option<Arc<Tdengine>>,
    ) -> (BoxFuture<'static, Fetched>, Option<Arc<()>>) {
        let request = vec![pttl_request(key), req.encoded()];
        let (proto, bias, slot) = (self.proto, self.slot, slots::slot(key));
        let sent = Instant::now();
        // Written now when it can be (the client's later requests may then
        // be written before its reply is in), else when it is polled.
        let (written, token) = match self.write_job_now(&router, slot, &request) {
            Some((pending, token)) => (Some(pending), Some(token)),
            None => (None, None),
        };
        self.path_pool();
        // Later writes of the key wait for the write-back (see `fetch`):
        // once the job is written, nothing else keeps them behind it.
        let done = td.as_ref().map(|_| self.outstanding.track([key], true));
        let key = key.clone();
        let fetch = async move {
            let _done = done;
            let (mut replies, redirected) = match written {
                Some(pending) => {
                    let read = request.last().cloned().unwrap_or_default();
                    router.finish_job(proto, slot, read, bias, pending).await
                }
                None => router.send_job(proto, slot, request, bias).await,
            };
            let mut next = || {
                replies.pop().unwrap_or_else(|| {
                    Err(Arc::new(crate::Error::Internal("empty fill job".into())))
                })
            };
            let (read, pttl) = (next(), next());
            let cap = if redirected {
                Some(Duration::ZERO)
            } else {
                cap_from_pttl(pttl, sent)
            };
            match (td, read) {
                (Some(td), Ok(first)) if first.kind == ReplyKind::Nil => {
                    let target = Target::Cluster {
                        router,
                        proto,
                        bias,
                    };
                    crate::tdengine::fill::fill(&td, &target, &key, proto, None).await
                }
                (_, read) => (read, cap),
            }
        };
        (fetch.boxed(), token)
    }

    /// The client's multiplexed connection for a read, or `None` after
    /// queueing the error (or deciding to stall).
    fn conn_for_read(&mut self) -> Option<Arc<MuxConn>> {
        if !self.can_take(Path::Pool) {
            self.stalled_on_pool = true;
            return None;
        }
        match self.pool_conn() {
            Ok(Some(c)) => Some(c),
            Ok(None) => {
                self.stalled_on_pool = true;
                None
            }
            Err(e) => {
                let silent = self.silent_reply();
                self.replies.ready(e.to_reply(), silent);
                None
            }
        }
    }

    pub(super) async fn mget(&mut self, name: &[u8], req: &Request) -> Flow {
        let cache = self.sidecar.cache.clone();
        let serving = cache.is_serving();
        let keys = &req.args[1..];
        let td = self
            .sidecar
            .tdengine
            .clone()
            .filter(|t| keys.iter().any(|k| t.matches(k)));
        if !serving && td.is_none() {
            count_request(name, Outcome::Forward);
            return self.forward_read(req).await;
        }
        let sig = Bytes::from_static(b"MGET");
        let mut parts: Vec<Option<Bytes>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        let mut fills: Vec<ElementFill> = Vec::new();
        // Per missing key: L1 is out of it (no policy, or its cluster slot
        // is not served), so with a cluster and `replica_reads` a replica
        // may answer it.
        let mut free: Vec<bool> = Vec::new();
        for k in keys {
            // A key with an earlier read still owed is read upstream, behind it.
            let behind = !serving || self.outstanding.reading(k);
            let policy = if behind { None } else { cache.policy(k) };
            let mut hit = None;
            let found = policy.map(|p| {
                (
                    p,
                    cache.lookup(k, &sig, self.proto, p, |r| {
                        hit = Some(Bytes::copy_from_slice(r))
                    }),
                )
            });
            match found {
                Some((_, Lookup::Hit)) => parts.push(hit),
                other => {
                    parts.push(None);
                    missing.push(k.clone());
                    free.push(!behind && matches!(other, None | Some((_, Lookup::NotServing))));
                    fills.push(match other {
                        Some((p, Lookup::Miss(t))) => Some((k.clone(), t, p)),
                        _ => None,
                    });
                }
            }
        }
        if missing.is_empty() {
            count_request(name, Outcome::Hit);
            let items: Vec<Bytes> = parts.into_iter().flatten().collect();
            return self.answer(protocol::array(&items));
        }
        if self.sidecar.cluster.is_some() {
            count_request(name, Outcome::Miss);
            return self
                .cluster_mget(req, parts, missing, fills, free, td)
                .await;
        }
        let Some(conn) = self.conn_for_read() else {
            return self.flow_after_failed_send();
        };
        count_request(name, Outcome::Miss);
        let sent = Instant::now();
        let mut pttls: Vec<Option<oneshot::Receiver<ReplyResult>>> =
            Vec::with_capacity(fills.len());
        for f in &fills {
            pttls.push(match f {
                Some((k, _, _)) => Some(conn.send(pttl_request(k)).await),
                None => None,
            });
        }
        let request = if missing.len() == keys.len() {
            req.encoded()
        } else {
            let mut args = Vec::with_capacity(missing.len() + 1);
            args.push(req.args[0].clone());
            args.extend(missing.iter().cloned());
            let mut out = BytesMut::new();
            protocol::encode_command(&mut out, &args);
            out.freeze()
        };
        let rx = conn.send(request).await;
        self.path_pool();
        let done = self.outstanding.track(&missing, td.is_some());
        let proto = self.proto;
        let keep: Vec<Option<Keep>> = fills
            .iter()
            .map(|f| {
                f.as_ref().map(|(_, _, policy)| Keep {
                    cache: cache.clone(),
                    sig: sig.clone(),
                    ttl: policy.ttl,
                })
            })
            .collect();
        let assembled = async move {
            let _done = done;
            let mut caps = Vec::with_capacity(pttls.len());
            for p in pttls {
                caps.push(match p {
                    Some(rx) => cap_from_pttl(received(rx.await), sent),
                    None => Some(Duration::ZERO),
                });
            }
            let reply = match received(rx.await) {
                Ok(r) if r.kind != ReplyKind::Error => r,
                Ok(r) => return r.bytes,
                Err(e) => return e.to_reply(),
            };
            let Some(fetched) = protocol::split_array(&reply.bytes) else {
                return reply.bytes;
            };
            if fetched.len() != missing.len() {
                return protocol::error("ERR upstream protocol error: MGET reply length mismatch");
            }
            let elements = match td {
                Some(td) => {
                    let target = Target::Conn(conn);
                    crate::tdengine::fill::fill_mget_elements(
                        &td, &target, &missing, fetched, proto, &keep,
                    )
                    .await
                }
                None => fetched.into_iter().map(|e| (e, None)).collect(),
            };
            assemble_mget(&cache, parts, elements, fills, caps, proto).await
        }
        .boxed();
        let silent = self.silent_reply();
        self.replies.push(Owed::Composed(assembled), silent);
        Flow::Next
    }
}

impl Session {
    /// The misses of an MGET with a cluster upstream: split by slot as
    /// [`split::plan`] splits any MGET, each part sent with the `PTTL`s of
    /// its fillable keys as one job to the part's owner (a part that
    /// followed a redirect stores nothing), the parts and L1's hits put back
    /// in the client's key order. A part whose keys are all `free` (no
    /// policy: nothing to fill, nothing to run behind) is a plain read, which
    /// with `replica_reads` a replica may answer.
    async fn cluster_mget(
        &mut self,
        req: &Request,
        parts: Vec<Option<Bytes>>,
        missing: Vec<Bytes>,
        mut fills: Vec<ElementFill>,
        free: Vec<bool>,
        td: Option<Arc<Tdengine>>,
    ) -> Flow {
        let Some(router) = self.sidecar.cluster.clone() else {
            return Flow::Next;
        };
        let cache = self.sidecar.cache.clone();
        let mut args = Vec::with_capacity(missing.len() + 1);
        args.push(req.args[0].clone());
        args.extend(missing.iter().cloned());
        let (proto, bias) = (self.proto, self.slot);
        let done = self.outstanding.track(&missing, td.is_some());
        let replica = router.replica_ok_now(&args);
        // Before anything is written: each PTTL's countdown starts no later.
        let sent = Instant::now();
        // With the command table known, each slot's part is written at once
        // when it can be (`write_job_now`); if every part is, what the
        // client sends next need not wait for this MGET.
        let mut planned = router
            .commands_now()
            .map(|table| mget_jobs(&table, &args, missing.len()));
        let mut written: Vec<Option<Vec<oneshot::Receiver<ReplyResult>>>> = Vec::new();
        let mut tokens = Vec::new();
        if let Some(Ok(jobs)) = &planned {
            for (slot, request, order) in jobs {
                let to_replica = replica && order.iter().all(|&i| free[i]);
                let now = match to_replica {
                    true => None,
                    false => self.write_job_now(&router, *slot, &mget_job(&fills, request, order)),
                };
                written.push(now.map(|(pending, token)| {
                    tokens.push(token);
                    pending
                }));
            }
        }
        let all_written = !written.is_empty() && written.iter().all(Option::is_some);
        self.path_pool();
        let assembled = async move {
            let _done = done;
            let _routes = tokens;
            let jobs = match planned.take() {
                Some(jobs) => jobs,
                None => match router.commands().await {
                    Ok(table) => mget_jobs(&table, &args, missing.len()),
                    Err(e) => return e.to_reply(),
                },
            };
            let jobs = match jobs {
                Ok(jobs) => jobs,
                Err(reply) => return reply,
            };
            let mut written = written.into_iter();
            let results = futures::future::join_all(jobs.iter().map(|(slot, request, order)| {
                if let Some(Some(pending)) = written.next() {
                    let last = request.clone();
                    return router.finish_job(proto, *slot, last, bias, pending).boxed();
                }
                if replica && order.iter().all(|&i| free[i]) {
                    let read = router.send_after(proto, *slot, request.clone(), bias, None, true);
                    return read.map(|r| (vec![r], false)).boxed();
                }
                let job = mget_job(&fills, request, order);
                router.send_job(proto, *slot, job, bias).boxed()
            }))
            .await;
            let mut elements: Vec<Option<Bytes>> = vec![None; missing.len()];
            let mut caps: Vec<Option<Duration>> = vec![Some(Duration::ZERO); missing.len()];
            for ((_, _, order), (mut replies, redirected)) in jobs.iter().zip(results) {
                // A shard that fails costs only its own keys: each is that
                // error, in its place, and nothing of it is stored.
                let failed = match replies.pop() {
                    Some(Ok(r)) if r.kind != ReplyKind::Error => Ok(r),
                    Some(Ok(r)) => Err(r.bytes),
                    Some(Err(e)) => Err(e.to_reply()),
                    None => return protocol::error("ERR nearcache: empty MGET job"),
                };
                let reply = match failed {
                    Ok(r) => r,
                    Err(error) => {
                        for &i in order {
                            elements[i] = Some(error.clone());
                            fills[i] = None;
                        }
                        continue;
                    }
                };
                let Some(fetched) = protocol::split_array(&reply.bytes) else {
                    return reply.bytes;
                };
                if fetched.len() != order.len() {
                    return protocol::error(
                        "ERR upstream protocol error: MGET reply length mismatch",
                    );
                }
                let mut pttls = replies.into_iter();
                for (&i, value) in order.iter().zip(fetched) {
                    if fills[i].is_some() {
                        let pttl = pttls.next();
                        if !redirected {
                            caps[i] = pttl.map_or(Some(Duration::ZERO), |p| cap_from_pttl(p, sent));
                        }
                    }
                    elements[i] = Some(value);
                }
            }
            let Some(elements) = elements.into_iter().collect::<Option<Vec<Bytes>>>() else {
                return protocol::error(
                    "ERR nearcache: a cluster node sent a reply that cannot be merged",
                );
            };
            let elements = match td {
                Some(td) => {
                    let target = Target::Cluster {
                        router,
                        proto,
                        bias,
                    };
                    crate::tdengine::fill::fill_mget_elements(
                        &td,
                        &target,
                        &missing,
                        elements,
                        proto,
                        &[],
                    )
                    .await
                }
                None => elements.into_iter().map(|e| (e, None)).collect(),
            };
            assemble_mget(&cache, parts, elements, fills, caps, proto).await
        }
        .boxed();
        let silent = self.silent_reply();
        match all_written {
            true => self.replies.push(Owed::Eager(assembled), silent),
            false => self.replies.push(Owed::Composed(assembled), silent),
        }
        Flow::Next
    }
}

/// An MGET's missing keys by slot, as [`split::plan`] splits any MGET:
/// each part's slot, request and the places of its keys among the missing
/// ones; `Err`: the reply to give instead.
fn mget_jobs(
    table: &crate::upstream::cluster::commands::CommandTable,
    args: &[Bytes],
    missing: usize,
) -> Result<Vec<(u16, Bytes, Vec<usize>)>, Bytes> {
    match split::plan(table, args) {
        split::Plan::One { slot } => {
            let mut out = BytesMut::new();
            protocol::encode_command(&mut out, args);
            Ok(vec![(slot, out.freeze(), (0..missing).collect())])
        }
        split::Plan::Split { parts, .. } => Ok(parts
            .into_iter()
            .map(|p| (p.slot.unwrap_or(0), p.request, p.order))
            .collect()),
        split::Plan::Refuse(bytes) => Err(bytes),
        _ => Err(protocol::error(
            "ERR nearcache: MGET could not be routed by slot",
        )),
    }
}

/// One MGET part's job: the `PTTL`s of its fillable keys, then the read.
fn mget_job(fills: &[ElementFill], request: &Bytes, order: &[usize]) -> Vec<Bytes> {
    let mut job: Vec<Bytes> = order
        .iter()
        .filter_map(|&i| fills[i].as_ref().map(|(k, _, _)| pttl_request(k)))
        .collect();
    job.push(request.clone());
    job
}

/// Puts L1 hits and fetched elements back in request order, storing each
/// fetched element in L1 for the shortest of its policy's TTL, its key's
/// remaining TTL in Redis and its TDengine cap.
async fn assemble_mget(
    cache: &cache::Cache,
    parts: Vec<Option<Bytes>>,
    elements: Vec<(Bytes, Option<Duration>)>,
    fills: Vec<ElementFill>,
    caps: Vec<Option<Duration>>,
    proto: u8,
) -> Bytes {
    let sig = Bytes::from_static(b"MGET");
    let mut fetched = elements.into_iter().zip(fills).zip(caps);
    let mut items = Vec::with_capacity(parts.len());
    let mut stores = Vec::new();
    for part in parts {
        match part {
            Some(hit) => items.push(hit),
            None => {
                let Some((((value, td_cap), fill), pttl_cap)) = fetched.next() else {
                    return protocol::error(
                        "ERR upstream protocol error: MGET reply length mismatch",
                    );
                };
                if let Some((key, ticket, policy)) = fill {
                    let ttl = [td_cap, pttl_cap]
                        .into_iter()
                        .flatten()
                        .fold(policy.ttl, Duration::min);
                    stores.push(cache::Fill {
                        ticket,
                        key,
                        sig: sig.clone(),
                        proto,
                        reply: value.clone(),
                        ttl,
                    });
                }
                items.push(value);
            }
        }
    }
    cache.store_fills(stores).await;
    protocol::array(&items)
}
