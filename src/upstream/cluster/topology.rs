//! Which master owns which hash slot, as `CLUSTER SLOTS` tells it (servers
//! before 8) or `CLUSTER SHARDS` (from 8: it exists since 7.0 but had bugs
//! before, and `CLUSTER SLOTS` is deprecated), and the redirects (`MOVED`,
//! `ASK`) that say a view is out of date.
//!
//! Each range's entries after its master are that master's replicas (a
//! replica that failed is left out by Redis itself); they are kept for
//! replica reads (`router.rs`), never for writes or L1 fills.
//!
//! A [`Topology`] is an immutable snapshot: the request path reads an
//! `Arc` of it without locks, and a change builds a new one (see
//! [`super::view`]).

use bytes::Bytes;

use super::slots::SLOTS;
use crate::config::node_address;
use crate::error::Error;
use crate::protocol;
use crate::upstream::Connector;

/// No master serves the slot (a cluster being set up, or a failed master
/// without a replica).
const NONE: u16 = u16::MAX;

/// A slot → master map.
#[derive(Clone)]
pub struct Topology {
    /// `host:port` of every master that owns a slot, sorted, so two equal
    /// views compare equal whatever order the nodes listed them in.
    masters: Vec<String>,
    /// For every slot, an index into `masters`, or [`NONE`].
    owners: Vec<u16>,
    /// For every slot, its owner's config epoch as the answers gave it (0
    /// when unknown or learnt from a `MOVED`): Redis's own rule for two
    /// claims on one slot is that the higher epoch wins, and so is ours.
    epochs: Vec<u64>,
    /// The replicas of each master (same index as `masters`), sorted.
    replicas: Vec<Vec<String>>,
}

/// Two views are the same when the same masters own the same slots and
/// have the same replicas; an epoch that moved without an owner changing
/// is no change for routing.
impl PartialEq for Topology {
    fn eq(&self, other: &Topology) -> bool {
        self.same_owners(other) && self.replicas == other.replicas
    }
}

impl Eq for Topology {}

/// One node's claim: slots `start..=end` are served by `addr`, whose config
/// epoch is `epoch` (0 when the node's `CLUSTER NODES` was not read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub start: u16,
    pub end: u16,
    pub addr: String,
    pub epoch: u64,
    /// The replicas the answer lists after `addr` for this range.
    pub replicas: Vec<String>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("masters", &self.masters)
            .field("covered", &self.covered())
            .finish()
    }
}

/// The host part of `host:port` / `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Topology {
    /// Builds a topology from `(first slot, last slot, master address)` ranges.
    pub fn from_ranges(ranges: &[(u16, u16, String)]) -> Topology {
        let claims: Vec<Claim> = ranges
            .iter()
            .map(|(start, end, addr)| Claim {
                start: *start,
                end: *end,
                addr: addr.clone(),
                epoch: 0,
                replicas: Vec::new(),
            })
            .collect();
        Topology::from_claims(&claims)
    }

    /// Builds a topology from claims that do not overlap. A master's
    /// replicas are those every one of its claims lists (one answer may be
    /// older than another: a replica is used only when all agree), never
    /// an address that is a master itself.
    fn from_claims(claims: &[Claim]) -> Topology {
        let mut masters: Vec<String> = claims.iter().map(|c| c.addr.clone()).collect();
        masters.sort();
        masters.dedup();
        let mut epochs = vec![0; SLOTS];
        let mut owners = vec![NONE; SLOTS];
        let mut replicas: Vec<Option<Vec<String>>> = vec![None; masters.len()];
        for c in claims {
            let i = masters.binary_search(&c.addr).expect("listed above");
            let range = c.start as usize..=(c.end as usize).min(SLOTS - 1);
            owners[range.clone()].fill(i as u16);
            epochs[range].fill(c.epoch);
            let listed = replicas[i].get_or_insert_with(|| c.replicas.clone());
            listed.retain(|r| c.replicas.contains(r));
        }
        let replicas = replicas
            .into_iter()
            .map(|r| {
                let mut r = r.unwrap_or_default();
                r.retain(|a| masters.binary_search(a).is_err());
                r.sort();
                r.dedup();
                r
            })
            .collect();
        Topology {
            masters,
            owners,
            epochs,
            replicas,
        }
    }

    /// One view from several nodes' answers (each a list of claims), as
    /// Redis itself settles two claims on one slot: the higher config epoch
    /// wins; at equal epochs, the owner more answers name, then the one
    /// `current` has (no flapping between equals). A slot whose owner in
    /// `current` has a higher epoch than every answer's claim keeps it: a
    /// node cut off in a minority answers with the map from before a
    /// failover, and must not take the view back to it.
    pub fn merge(answers: &[Vec<Claim>], current: Option<&Topology>) -> Topology {
        // (address, epoch, votes) per candidate owner of each slot; answers
        // are few (see `fetch`), so per slot the list is short.
        let mut per_slot: Vec<Vec<(&str, u64, usize)>> = vec![Vec::new(); SLOTS];
        for answer in answers {
            for c in answer {
                for cands in &mut per_slot[c.start as usize..=(c.end as usize).min(SLOTS - 1)] {
                    match cands.iter_mut().find(|x| x.0 == c.addr) {
                        Some(x) => {
                            x.1 = x.1.max(c.epoch);
                            x.2 += 1;
                        }
                        None => cands.push((&c.addr, c.epoch, 1)),
                    }
                }
            }
        }
        // Every answer's replicas of each master, intersected (see
        // `from_claims`); a master no answer names keeps `current`'s.
        let mut replicas: std::collections::HashMap<&str, Vec<String>> = Default::default();
        for c in answers.iter().flatten() {
            let listed = replicas
                .entry(c.addr.as_str())
                .or_insert_with(|| c.replicas.clone());
            listed.retain(|r| c.replicas.contains(r));
        }
        let replicas_of = |addr: &str| -> Vec<String> {
            match replicas.get(addr) {
                Some(r) => r.clone(),
                None => current
                    .map(|t| t.replicas_of(addr).to_vec())
                    .unwrap_or_default(),
            }
        };
        let mut claims: Vec<Claim> = Vec::new();
        for (s, cands) in per_slot.iter().enumerate() {
            let slot = s as u16;
            let held = current.and_then(|t| Some((t.owner(slot)?, t.owner_epoch(slot))));
            let best = cands.iter().max_by(|a, b| {
                (a.1, a.2, held.is_some_and(|h| h.0 == a.0))
                    .cmp(&(b.1, b.2, held.is_some_and(|h| h.0 == b.0)))
                    // Deterministic among full ties: the smaller address.
                    .then_with(|| b.0.cmp(a.0))
            });
            let chosen = match (best, held) {
                (Some(b), Some(h)) if h.1 > b.1 => Some((h.0, h.1)),
                (Some(b), _) => Some((b.0, b.1)),
                (None, _) => None,
            };
            let Some((addr, epoch)) = chosen else {
                continue;
            };
            extend(&mut claims, slot, addr, epoch, &replicas_of);
        }
        Topology::from_claims(&claims)
    }

    /// The replicas of master `addr` in this view (none if it is not one).
    pub fn replicas_of(&self, addr: &str) -> &[String] {
        match self.masters.binary_search_by(|m| m.as_str().cmp(addr)) {
            Ok(i) => &self.replicas[i],
            Err(_) => &[],
        }
    }

    /// The replicas of `slot`'s master.
    pub fn replicas(&self, slot: u16) -> &[String] {
        match self.owners.get(slot as usize) {
            Some(&i) if i != NONE => &self.replicas[i as usize],
            _ => &[],
        }
    }

    /// Every replica of every master, sorted.
    pub fn all_replicas(&self) -> Vec<String> {
        let mut out: Vec<String> = self.replicas.iter().flatten().cloned().collect();
        out.sort();
        out.dedup();
        out
    }

    /// Do the same masters own the same slots (replicas aside)?
    pub fn same_owners(&self, other: &Topology) -> bool {
        self.masters == other.masters && self.owners == other.owners
    }

    /// The config epoch of master `addr` in this view (the highest of its
    /// slots'; 0 when unknown).
    pub fn epoch(&self, addr: &str) -> u64 {
        let Ok(i) = self.masters.binary_search_by(|m| m.as_str().cmp(addr)) else {
            return 0;
        };
        self.owners
            .iter()
            .zip(&self.epochs)
            .filter(|(&o, _)| o == i as u16)
            .map(|(_, &e)| e)
            .max()
            .unwrap_or(0)
    }

    /// The config epoch of `slot`'s owner (0 when unowned or unknown).
    fn owner_epoch(&self, slot: u16) -> u64 {
        self.epochs.get(slot as usize).copied().unwrap_or(0)
    }

    /// Reads a `CLUSTER SLOTS` reply (RESP2 or RESP3) from the node at
    /// `asked`: an empty node address means that node's own host (Redis
    /// sends `""` when it does not know its own address), `?` an unknown
    /// endpoint, which is left out (its slots stay unserved).
    pub fn parse_cluster_slots(reply: &[u8], asked: &str) -> Result<Topology, String> {
        Ok(Topology::from_claims(&claims_of(reply, asked, &[])?))
    }
}

/// The config epoch of every node in a `CLUSTER NODES` reply, by node id
/// (`<id> <addr> <flags> <master> <ping> <pong> <config-epoch> …` per line).
pub fn epochs_of(cluster_nodes: &[u8]) -> Vec<(Vec<u8>, u64)> {
    let text = protocol::scalar(cluster_nodes).unwrap_or_default();
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let mut f = line.split(|&b| b == b' ');
            let id = f.next()?.to_vec();
            let epoch = std::str::from_utf8(f.nth(5)?).ok()?.parse().ok()?;
            Some((id, epoch))
        })
        .collect()
}

/// The claims in a `CLUSTER SLOTS` reply (see
/// [`Topology::parse_cluster_slots`]), each with its owner's epoch from
/// `epochs` (by node id, the third field of a node in the reply).
pub fn claims_of(
    reply: &[u8],
    asked: &str,
    epochs: &[(Vec<u8>, u64)],
) -> Result<Vec<Claim>, String> {
    let bad = || "CLUSTER SLOTS: not the reply Redis sends".to_string();
    let mut ranges = Vec::new();
    for entry in protocol::elements(reply).ok_or_else(bad)? {
        let entry = &reply[entry];
        let fields = protocol::elements(entry).ok_or_else(bad)?;
        if fields.len() < 3 {
            return Err(bad());
        }
        let num = |r: std::ops::Range<usize>| -> Result<u16, String> {
            protocol::scalar(&entry[r])
                .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u16>().ok())
                .filter(|n| (*n as usize) < SLOTS)
                .ok_or_else(bad)
        };
        let (start, end) = (num(fields[0].clone())?, num(fields[1].clone())?);
        let Some((addr, id)) = node_of(&entry[fields[2].clone()], asked)? else {
            continue;
        };
        let epoch = epochs
            .iter()
            .find(|(i, _)| !id.is_empty() && i[..] == id[..])
            .map_or(0, |(_, e)| *e);
        let mut replicas = Vec::new();
        for f in &fields[3..] {
            if let Some((r, _)) = node_of(&entry[f.clone()], asked)? {
                replicas.push(r);
            }
        }
        if start <= end {
            ranges.push(Claim {
                start,
                end,
                addr,
                epoch,
                replicas,
            });
        }
    }
    Ok(ranges)
}

/// One node of a `CLUSTER SLOTS` range (`[host, port, id, …]`): its
/// address and id, `None` for an unknown endpoint (`?`).
fn node_of(node: &[u8], asked: &str) -> Result<Option<(String, Vec<u8>)>, String> {
    let bad = || "CLUSTER SLOTS: not the reply Redis sends".to_string();
    let parts = protocol::elements(node).ok_or_else(bad)?;
    if parts.len() < 2 {
        return Err(bad());
    }
    let host = protocol::scalar(&node[parts[0].clone()]).ok_or_else(bad)?;
    let port = protocol::scalar(&node[parts[1].clone()])
        .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u16>().ok())
        .ok_or_else(bad)?;
    let host = String::from_utf8_lossy(&host).into_owned();
    let host = match host.as_str() {
        "?" => return Ok(None),
        "" => host_of(asked).to_string(),
        _ => host,
    };
    let id = parts
        .get(2)
        .and_then(|r| protocol::scalar(&node[r.clone()]))
        .unwrap_or_default();
    Ok(Some((node_address(&host, port), id.to_vec())))
}

impl Topology {
    /// The master that owns `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        match self.owners.get(slot as usize) {
            Some(&i) if i != NONE => Some(&self.masters[i as usize]),
            _ => None,
        }
    }

    /// Every master that owns at least one slot, sorted.
    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    /// How many slots have an owner (16384 when the cluster is whole).
    pub fn covered(&self) -> usize {
        self.owners.iter().filter(|&&o| o != NONE).count()
    }

    /// This view with `slot` owned by `addr`, as a `MOVED` reply says.
    pub fn with_owner(&self, slot: u16, addr: &str) -> Topology {
        // A MOVED says nothing of epochs (and may come from a node with an
        // old map): 0, so that the next refresh's answers decide.
        let mut claims: Vec<Claim> = Vec::new();
        let replicas_of = |a: &str| self.replicas_of(a).to_vec();
        for s in 0..SLOTS as u16 {
            let owner = if s == slot { Some(addr) } else { self.owner(s) };
            let Some(owner) = owner else { continue };
            let epoch = if s == slot { 0 } else { self.owner_epoch(s) };
            extend(&mut claims, s, owner, epoch, &replicas_of);
        }
        Topology::from_claims(&claims)
    }
}

/// Adds `slot` (the one after the last claim's, or a new range) owned by
/// `addr` at `epoch` to `claims`, built slot by slot in order; a new range
/// takes `addr`'s replicas from `replicas_of`.
fn extend(
    claims: &mut Vec<Claim>,
    slot: u16,
    addr: &str,
    epoch: u64,
    replicas_of: &dyn Fn(&str) -> Vec<String>,
) {
    match claims.last_mut() {
        Some(last) if last.end + 1 == slot && last.addr == addr && last.epoch == epoch => {
            last.end = slot
        }
        _ => claims.push(Claim {
            start: slot,
            end: slot,
            addr: addr.to_string(),
            epoch,
            replicas: replicas_of(addr),
        }),
    }
}

/// A cluster redirect: the command was not executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The slot has a new owner: update the map, send there.
    Moved { slot: u16, addr: String },
    /// The slot is being migrated and this key is already at `addr`: send
    /// `ASKING` + the command there once, leave the map alone.
    Ask { slot: u16, addr: String },
}

impl Redirect {
    /// Reads `MOVED 3999 127.0.0.1:6381` / `ASK 3999 127.0.0.1:6381` (an
    /// error reply's text without the `-`) from the node at `from`; an
    /// empty host (`:6381`) means `from`'s host.
    pub fn parse(error: &str, from: &str) -> Option<Redirect> {
        let mut words = error.split_ascii_whitespace();
        let kind = words.next()?;
        let slot: u16 = words.next()?.parse().ok()?;
        let target = words.next()?;
        if slot as usize >= SLOTS {
            return None;
        }
        let (host, port) = target.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() { host_of(from) } else { host };
        let addr = node_address(host, port);
        match kind {
            "MOVED" => Some(Redirect::Moved { slot, addr }),
            "ASK" => Some(Redirect::Ask { slot, addr }),
            _ => None,
        }
    }
}

/// Does a server of this `redis_version` get asked `CLUSTER SHARDS` rather
/// than `CLUSTER SLOTS`? From 8 on (as the version's first number says).
pub fn asks_shards(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 8)
}

/// Asks one node for its slot map (`CLUSTER SHARDS` from Redis 8, else
/// `CLUSTER SLOTS`) and, on the same connection, `CLUSTER NODES` for the
/// owners' config epochs (a node that refuses the second, e.g. by ACL,
/// still counts, with epochs unknown).
pub async fn ask(connector: &Connector, addr: &str) -> Result<Vec<Claim>, Error> {
    let mut shards = false;
    let replies = super::exchange_with(
        connector,
        addr,
        2,
        |info| {
            shards = asks_shards(&info.version);
            let map = if shards { "SHARDS" } else { "SLOTS" };
            vec![
                protocol::command(["CLUSTER", map]),
                protocol::command(["CLUSTER", "NODES"]),
            ]
        },
        |limit| format!("CLUSTER SLOTS at {addr}: no answer within {limit:?}"),
    )
    .await?;
    let (map, nodes) = (&replies[0], &replies[1]);
    let asked = if shards { "SHARDS" } else { "SLOTS" };
    if let Some(text) = map.error_text() {
        return Err(Error::Upstream(format!(
            "CLUSTER {asked} at {addr}: {text}"
        )));
    }
    let epochs = match nodes.error_text() {
        Some(_) => Vec::new(),
        None => epochs_of(&nodes.bytes),
    };
    if shards {
        let tls = connector.tls().is_some();
        claims_of_shards(&map.bytes, addr, &epochs, tls).map_err(Error::Upstream)
    } else {
        claims_of(&map.bytes, addr, &epochs).map_err(Error::Upstream)
    }
}

/// The claims in a `CLUSTER SHARDS` reply (RESP2 or RESP3): each shard's
/// slot ranges, served by its master (`role master`, whatever its health:
/// `CLUSTER SLOTS` lists a failed master too, until its replica takes
/// over), with its `online` replicas (`CLUSTER SLOTS` leaves failed ones
/// out; a `loading` one cannot answer reads yet). A node's address is its
/// `endpoint` (`?`: unknown, left out; empty: the asked node's host) and
/// its `tls-port` on TLS connections, else its `port`, whichever it has.
/// A shard with no master or no slots claims nothing.
pub fn claims_of_shards(
    reply: &[u8],
    asked: &str,
    epochs: &[(Vec<u8>, u64)],
    tls: bool,
) -> Result<Vec<Claim>, String> {
    let bad = || "CLUSTER SHARDS: not the reply Redis sends".to_string();
    let mut claims = Vec::new();
    for shard in protocol::elements(reply).ok_or_else(bad)? {
        let shard = &reply[shard];
        let fields = pairs(shard).ok_or_else(bad)?;
        let field = |name: &[u8]| fields.iter().find(|(k, _)| k[..] == *name).map(|(_, v)| v);
        let (Some(slots), Some(nodes)) = (field(b"slots"), field(b"nodes")) else {
            return Err(bad());
        };
        let mut bounds = Vec::new();
        for b in protocol::elements(&shard[slots.clone()]).ok_or_else(bad)? {
            let n = protocol::scalar(&shard[slots.start + b.start..slots.start + b.end])
                .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok())
                .filter(|n| (*n as usize) < SLOTS)
                .ok_or_else(bad)?;
            bounds.push(n);
        }
        if bounds.len() % 2 != 0 {
            return Err(bad());
        }
        let nodes = &shard[nodes.clone()];
        let mut master = None;
        let mut replicas = Vec::new();
        for node in protocol::elements(nodes).ok_or_else(bad)? {
            let node = &nodes[node];
            let info = pairs(node).ok_or_else(bad)?;
            let text = |name: &[u8]| {
                info.iter()
                    .find(|(k, _)| k[..] == *name)
                    .and_then(|(_, v)| protocol::scalar(&node[v.clone()]))
            };
            let port = |name: &[u8]| {
                text(name)
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u16>().ok())
                    .filter(|p| *p != 0)
            };
            let port = match tls {
                true => port(b"tls-port").or_else(|| port(b"port")),
                false => port(b"port").or_else(|| port(b"tls-port")),
            }
            .ok_or_else(bad)?;
            let endpoint = text(b"endpoint").ok_or_else(bad)?;
            let host = match &endpoint[..] {
                b"?" => continue,
                b"" => host_of(asked).to_string(),
                other => String::from_utf8_lossy(other).into_owned(),
            };
            let addr = node_address(&host, port);
            match (text(b"role").as_deref(), text(b"health").as_deref()) {
                (Some(b"master"), _) => master = Some((addr, text(b"id").unwrap_or_default())),
                (_, Some(b"online")) => replicas.push(addr),
                _ => {}
            }
        }
        let Some((addr, id)) = master else {
            continue;
        };
        let epoch = epochs
            .iter()
            .find(|(i, _)| !id.is_empty() && i[..] == id[..])
            .map_or(0, |(_, e)| *e);
        for range in bounds.chunks(2) {
            if range[0] <= range[1] {
                claims.push(Claim {
                    start: range[0],
                    end: range[1],
                    addr: addr.clone(),
                    epoch,
                    replicas: replicas.clone(),
                });
            }
        }
    }
    Ok(claims)
}

/// The name/value pairs of a map (RESP3) or of a flat name, value, …
/// array (RESP2): each name as bytes, each value as its range in `item`.
fn pairs(item: &[u8]) -> Option<Vec<(Bytes, std::ops::Range<usize>)>> {
    let elements = protocol::elements(item)?;
    if elements.len() % 2 != 0 {
        return None;
    }
    elements
        .chunks(2)
        .map(|kv| Some((protocol::scalar(&item[kv[0].clone()])?, kv[1].clone())))
        .collect()
}

/// Nodes asked at once in a refresh, and the answers wanted before the
/// view is built: more than one, so that one node with an old map cannot
/// decide alone; few, so a thousand sidecars refreshing together do not
/// open a connection to every node each.
const ASK_AT_ONCE: usize = 3;
const ANSWERS_WANTED: usize = 2;

/// Asks `candidates` (known masters first, then seeds), [`ASK_AT_ONCE`]
/// at a time, until [`ANSWERS_WANTED`] have answered or none is left, and
/// merges the answers over `current` ([`Topology::merge`]). Nodes that are
/// down are skipped, so startup works with some seeds unreachable.
pub async fn fetch(
    connector: &Connector,
    candidates: &[String],
    current: Option<&Topology>,
) -> Result<Topology, Error> {
    let mut answers = Vec::new();
    let mut errors = Vec::new();
    for group in candidates.chunks(ASK_AT_ONCE) {
        let replies = futures::future::join_all(group.iter().map(|a| ask(connector, a))).await;
        for (addr, r) in group.iter().zip(replies) {
            match r {
                Ok(claims) => answers.push(claims),
                // Named by node: a handshake error does not say where.
                Err(e) => errors.push(format!("{addr}: {}", e.detail())),
            }
        }
        if answers.len() >= ANSWERS_WANTED {
            break;
        }
    }
    if answers.is_empty() {
        return Err(Error::Upstream(if errors.is_empty() {
            "no cluster node to ask".to_string()
        } else {
            errors.join("; ")
        }));
    }
    let t = Topology::merge(&answers, current);
    if t.covered() == 0 {
        return Err(Error::Upstream(
            "no cluster node serves any slot".to_string(),
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_slots_reply_is_read() {
        // Redis 7's shape: start, end, [ip, port, id, {metadata}], replicas...
        let reply = b"*3\r\n\
*3\r\n:0\r\n:5460\r\n*4\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n*0\r\n\
*4\r\n:5461\r\n:10922\r\n*4\r\n$0\r\n\r\n:7001\r\n$2\r\nid\r\n*0\r\n*4\r\n$9\r\n127.0.0.1\r\n:7101\r\n$2\r\nid\r\n*0\r\n\
*3\r\n:10923\r\n:16383\r\n*4\r\n$1\r\n?\r\n:7002\r\n$2\r\nid\r\n*0\r\n";
        let t = Topology::parse_cluster_slots(reply, "10.0.0.9:7001").unwrap();
        assert_eq!(t.owner(0), Some("127.0.0.1:7000"));
        assert_eq!(t.owner(5460), Some("127.0.0.1:7000"));
        // An empty host is the asked node's host.
        assert_eq!(t.owner(5461), Some("10.0.0.9:7001"));
        // An unknown endpoint serves nothing.
        assert_eq!(t.owner(16383), None);
        assert_eq!(t.covered(), 10923);
        assert_eq!(t.masters(), ["10.0.0.9:7001", "127.0.0.1:7000"]);
        // Entries after the master are its replicas.
        assert_eq!(t.replicas(5461), ["127.0.0.1:7101"]);
        assert_eq!(t.replicas_of("10.0.0.9:7001"), ["127.0.0.1:7101"]);
        assert!(t.replicas(0).is_empty());
        assert!(t.replicas(16383).is_empty(), "an unserved slot has none");
        assert_eq!(t.all_replicas(), ["127.0.0.1:7101"]);
        assert!(Topology::parse_cluster_slots(b"+OK\r\n", "h:1").is_err());
        assert!(Topology::parse_cluster_slots(b"*1\r\n*2\r\n:0\r\n:1\r\n", "h:1").is_err());
    }

    /// One `CLUSTER SHARDS` node, as a flat RESP2 array or a RESP3 map.
    fn shard_node(resp3: bool, fields: &[(&str, &str)]) -> String {
        let mut out = match resp3 {
            true => format!("%{}\r\n", fields.len()),
            false => format!("*{}\r\n", fields.len() * 2),
        };
        for (k, v) in fields {
            out += &format!("${}\r\n{k}\r\n", k.len());
            // Ports and offsets are integers, the rest strings.
            match v.parse::<i64>() {
                Ok(n) if k.contains("port") || k.contains("offset") => out += &format!(":{n}\r\n"),
                _ => out += &format!("${}\r\n{v}\r\n", v.len()),
            }
        }
        out
    }

    fn shard(resp3: bool, slots: &[u16], nodes: &[String]) -> String {
        let mut out = match resp3 {
            true => "%2\r\n".to_string(),
            false => "*4\r\n".to_string(),
        };
        out += &format!("$5\r\nslots\r\n*{}\r\n", slots.len());
        for s in slots {
            out += &format!(":{s}\r\n");
        }
        out += &format!("$5\r\nnodes\r\n*{}\r\n", nodes.len());
        for n in nodes {
            out += n;
        }
        out
    }

    #[test]
    fn cluster_shards_reply_is_read_in_either_protocol() {
        for resp3 in [false, true] {
            let node = |id: &str, endpoint: &str, port: &str, role: &str, health: &str| {
                shard_node(
                    resp3,
                    &[
                        ("id", id),
                        ("port", port),
                        ("tls-port", "17000"),
                        ("ip", "10.0.0.1"),
                        ("endpoint", endpoint),
                        ("role", role),
                        ("replication-offset", "72156"),
                        ("health", health),
                    ],
                )
            };
            let shards = [
                // Two ranges; one replica online, one failed, one loading.
                shard(
                    resp3,
                    &[0, 99, 200, 5460],
                    &[
                        node("a", "127.0.0.1", "7000", "master", "online"),
                        node("ar", "127.0.0.1", "7100", "replica", "online"),
                        node("af", "127.0.0.1", "7200", "replica", "failed"),
                        node("al", "127.0.0.1", "7300", "replica", "loading"),
                    ],
                ),
                // The master listed after its replica, with an empty endpoint.
                shard(
                    resp3,
                    &[5461, 10922],
                    &[
                        node("br", "127.0.0.1", "7101", "replica", "online"),
                        node("b", "", "7001", "master", "failed"),
                    ],
                ),
                // An unknown endpoint serves nothing; a shard without slots neither.
                shard(
                    resp3,
                    &[10923, 16383],
                    &[node("c", "?", "7002", "master", "online")],
                ),
                shard(
                    resp3,
                    &[],
                    &[node("d", "127.0.0.1", "7003", "master", "online")],
                ),
            ];
            let reply = format!("*{}\r\n{}", shards.len(), shards.concat());
            let epochs = vec![(b"a".to_vec(), 7), (b"b".to_vec(), 3)];
            let claims =
                claims_of_shards(reply.as_bytes(), "10.0.0.9:7001", &epochs, false).unwrap();
            let replicas_a = vec!["127.0.0.1:7100".to_string()];
            assert_eq!(
                claims,
                [
                    Claim {
                        start: 0,
                        end: 99,
                        addr: "127.0.0.1:7000".into(),
                        epoch: 7,
                        replicas: replicas_a.clone()
                    },
                    Claim {
                        start: 200,
                        end: 5460,
                        addr: "127.0.0.1:7000".into(),
                        epoch: 7,
                        replicas: replicas_a
                    },
                    Claim {
                        start: 5461,
                        end: 10922,
                        addr: "10.0.0.9:7001".into(),
                        epoch: 3,
                        replicas: vec!["127.0.0.1:7101".into()],
                    },
                ],
                "resp3: {resp3}"
            );
            // Over TLS the node's tls-port is where it listens.
            let tls = claims_of_shards(reply.as_bytes(), "10.0.0.9:7001", &epochs, true).unwrap();
            assert_eq!(tls[0].addr, "127.0.0.1:17000");
            assert!(claims_of_shards(b"+OK\r\n", "h:1", &[], false).is_err());
            let odd = format!("*1\r\n{}", shard(resp3, &[0], &[]));
            assert!(claims_of_shards(odd.as_bytes(), "h:1", &[], false).is_err());
        }
    }

    #[test]
    fn cluster_shards_is_asked_from_redis_8() {
        for (version, shards) in [
            ("7.0.15", false),
            ("7.4.2", false),
            ("8.0.0", true),
            ("8.2.1", true),
            ("10.0", true),
            ("", false),
        ] {
            assert_eq!(asks_shards(version), shards, "{version}");
        }
    }

    fn claim(start: u16, end: u16, addr: &str, epoch: u64) -> Claim {
        Claim {
            start,
            end,
            addr: addr.into(),
            epoch,
            replicas: Vec::new(),
        }
    }

    #[test]
    fn the_higher_epoch_wins_then_the_majority_then_the_current_owner() {
        // A failover moved 0..=99 from a (epoch 1) to r (epoch 4); one node
        // still answers with the old map.
        let stale = vec![claim(0, 8191, "a:1", 1), claim(8192, 16383, "b:2", 2)];
        let fresh = vec![
            claim(0, 99, "r:9", 4),
            claim(100, 8191, "a:1", 1),
            claim(8192, 16383, "b:2", 2),
        ];
        for answers in [
            vec![stale.clone(), fresh.clone()],
            vec![fresh.clone(), stale.clone(), stale.clone()],
        ] {
            let t = Topology::merge(&answers, None);
            assert_eq!(t.owner(0), Some("r:9"), "the epoch beats the votes");
            assert_eq!(t.owner(99), Some("r:9"));
            assert_eq!(t.owner(100), Some("a:1"));
            assert_eq!(t.epoch("r:9"), 4);
            assert_eq!(t.covered(), SLOTS);
        }
        // The stale node alone, after the view has seen the failover: the
        // slots stay with the higher epoch.
        let current = Topology::merge(std::slice::from_ref(&fresh), None);
        let t = Topology::merge(std::slice::from_ref(&stale), Some(&current));
        assert_eq!(t, current);
        // A MOVED (maybe from a node with an old map) does not stick: the
        // next answers decide that slot.
        let moved = current.with_owner(150, "z:1");
        assert_eq!(moved.owner(150), Some("z:1"));
        assert_eq!(moved.owner(151), Some("a:1"));
        let t = Topology::merge(std::slice::from_ref(&stale), Some(&moved));
        assert_eq!(t.owner(150), Some("a:1"));
        assert_eq!(t.owner(0), Some("r:9"), "the rest still keeps its epochs");
        // Equal epochs (unknown: 0): the majority, then the current owner.
        let x = vec![claim(0, 16383, "x:1", 0)];
        let y = vec![claim(0, 16383, "y:1", 0)];
        let t = Topology::merge(&[x.clone(), y.clone(), y.clone()], None);
        assert_eq!(t.owner(5), Some("y:1"));
        let cur_x = Topology::merge(std::slice::from_ref(&x), None);
        assert_eq!(
            Topology::merge(&[y.clone(), x.clone()], Some(&cur_x)).owner(5),
            Some("x:1")
        );
        assert_eq!(
            Topology::merge(&[x.clone(), y.clone()], None).owner(5),
            Some("x:1"),
            "deterministic"
        );
    }

    #[test]
    fn replicas_are_those_every_answer_lists() {
        let with = |c: Claim, r: &[&str]| Claim {
            replicas: r.iter().map(|a| a.to_string()).collect(),
            ..c
        };
        let one = vec![
            with(claim(0, 8191, "a:1", 1), &["ra:1", "ra:2"]),
            with(claim(8192, 16383, "b:2", 2), &["rb:1"]),
        ];
        // An older answer: ra:2 had not joined yet; b's replica listed
        // as a master elsewhere is never a replica.
        let two = vec![
            with(claim(0, 8191, "a:1", 1), &["ra:1"]),
            with(claim(8192, 16383, "b:2", 2), &["rb:1", "a:1"]),
        ];
        let t = Topology::merge(&[one.clone(), two], None);
        assert_eq!(t.replicas(0), ["ra:1"]);
        assert_eq!(t.replicas(9000), ["rb:1"]);
        let whole = Topology::merge(std::slice::from_ref(&one), None);
        assert_eq!(whole.replicas(0), ["ra:1", "ra:2"]);
        // A replica change is a new view for routing, not for the owners.
        assert_ne!(t, whole);
        assert!(t.same_owners(&whole));
        // A MOVED keeps every master's replicas; the moved slot takes its
        // new owner's.
        let m = whole.with_owner(10, "b:2");
        assert_eq!(m.replicas(10), ["rb:1"]);
        assert_eq!(m.replicas(11), ["ra:1", "ra:2"]);
        // A master no answer names (it keeps its slots by epoch) keeps the
        // current view's replicas.
        let stale = vec![claim(0, 8191, "z:9", 0), claim(8192, 16383, "b:2", 2)];
        let held = Topology::merge(&[stale], Some(&whole));
        assert_eq!(held.owner(0), Some("a:1"));
        assert_eq!(held.replicas(0), ["ra:1", "ra:2"]);
    }

    #[test]
    fn epochs_come_from_cluster_nodes_by_node_id() {
        let nodes = "$263\r\n\
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@40001 myself,master - 0 0 7 connected 0-5460\n\
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922\n\
\r\n";
        let nodes = nodes.replace(
            "$263",
            &format!("${}", nodes.split("\r\n").nth(1).unwrap().len()),
        );
        let epochs = epochs_of(nodes.as_bytes());
        assert_eq!(
            epochs,
            vec![
                (b"e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca".to_vec(), 7),
                (b"67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1".to_vec(), 2)
            ]
        );
        let slots = b"*2\r\n\
*3\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:30001\r\n$40\r\ne7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca\r\n\
*3\r\n:5461\r\n:10922\r\n*3\r\n$9\r\n127.0.0.1\r\n:30002\r\n$40\r\nffffffffffffffffffffffffffffffffffffffff\r\n";
        let claims = claims_of(slots, "127.0.0.1:30001", &epochs).unwrap();
        assert_eq!(claims[0], claim(0, 5460, "127.0.0.1:30001", 7));
        assert_eq!(
            claims[1],
            claim(5461, 10922, "127.0.0.1:30002", 0),
            "unknown id: epoch 0"
        );
    }

    #[test]
    fn moved_changes_one_slot() {
        let t = Topology::from_ranges(&[(0, 8191, "a:1".into()), (8192, 16383, "b:2".into())]);
        let m = t.with_owner(100, "c:3");
        assert_eq!(m.owner(100), Some("c:3"));
        assert_eq!(m.owner(99), Some("a:1"));
        assert_eq!(m.owner(101), Some("a:1"));
        assert_eq!(m.owner(9000), Some("b:2"));
        assert_eq!(m.covered(), SLOTS);
        assert_ne!(m, t);
        assert_eq!(m.with_owner(100, "a:1"), t);
    }

    #[test]
    fn redirects_are_read() {
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381", "x:1"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            Redirect::parse("ASK 1 :6381", "10.1.1.1:7000"),
            Some(Redirect::Ask {
                slot: 1,
                addr: "10.1.1.1:6381".into()
            })
        );
        assert_eq!(
            Redirect::parse("MOVED 2 [::1]:7000", "x:1"),
            Some(Redirect::Moved {
                slot: 2,
                addr: "[::1]:7000".into()
            })
        );
        assert_eq!(Redirect::parse("MOVED 16384 h:1", "x:1"), None);
        assert_eq!(Redirect::parse("ERR MOVED", "x:1"), None);
        assert_eq!(Redirect::parse("CROSSSLOT Keys in request", "x:1"), None);
    }
}
