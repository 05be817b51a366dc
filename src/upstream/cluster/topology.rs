//! Which master owns which hash slot, as `CLUSTER SLOTS` tells it (Redis 7.0
//! here; `CLUSTER SHARDS` only from 8, and it had bugs before), and the
//! redirects (`MOVED`, `ASK`) that say a view is out of date.
//!
//! A [`Topology`] is an immutable snapshot: the request path reads an
//! `Arc` of it without locks, and a change builds a new one (see
//! [`super::view`]).

use tokio::io::AsyncWriteExt;

use super::slots::SLOTS;
use crate::config::node_address;
use crate::error::Error;
use crate::net::FrameReader;
use crate::protocol;
use crate::upstream::{Connector, Login};

/// No master serves the slot (a cluster being set up, or a failed master
/// without a replica).
const NONE: u16 = u16::MAX;

/// A slot → master map.
#[derive(Clone, PartialEq, Eq)]
pub struct Topology {
    /// `host:port` of every master that owns a slot, sorted, so two equal
    /// views compare equal whatever order the nodes listed them in.
    masters: Vec<String>,
    /// For every slot, an index into `masters`, or [`NONE`].
    owners: Vec<u16>,
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
        let mut masters: Vec<String> = ranges.iter().map(|r| r.2.clone()).collect();
        masters.sort();
        masters.dedup();
        let mut owners = vec![NONE; SLOTS];
        for (start, end, addr) in ranges {
            let i = masters.binary_search(addr).expect("listed above") as u16;
            for o in &mut owners[*start as usize..=(*end as usize).min(SLOTS - 1)] {
                *o = i;
            }
        }
        Topology { masters, owners }
    }

    /// Reads a `CLUSTER SLOTS` reply (RESP2 or RESP3) from the node at
    /// `asked`: an empty node address means that node's own host (Redis
    /// sends `""` when it does not know its own address), `?` an unknown
    /// endpoint, which is left out (its slots stay unserved).
    pub fn parse_cluster_slots(reply: &[u8], asked: &str) -> Result<Topology, String> {
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
            let node = &entry[fields[2].clone()];
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
                "?" => continue,
                "" => host_of(asked).to_string(),
                _ => host,
            };
            if start <= end {
                ranges.push((start, end, node_address(&host, port)));
            }
        }
        Ok(Topology::from_ranges(&ranges))
    }

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
        let mut ranges: Vec<(u16, u16, String)> = Vec::new();
        for s in 0..SLOTS as u16 {
            let owner = if s == slot { Some(addr) } else { self.owner(s) };
            let Some(owner) = owner else { continue };
            match ranges.last_mut() {
                Some(last) if last.1 + 1 == s && last.2 == owner => last.1 = s,
                _ => ranges.push((s, s, owner.to_string())),
            }
        }
        Topology::from_ranges(&ranges)
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

/// Asks one node for `CLUSTER SLOTS`.
pub async fn ask(connector: &Connector, addr: &str) -> Result<Topology, Error> {
    let cfg = connector.config();
    let limit = cfg.connect_timeout + cfg.command_timeout;
    let asked = async {
        let c = connector
            .connect_to(addr, 2, &Login::Configured, false)
            .await?;
        let mut stream = c.stream;
        stream
            .write_all(&protocol::command(["CLUSTER", "SLOTS"]))
            .await
            .map_err(|e| Error::upstream_io(&e))?;
        let mut reader = FrameReader::new(stream, c.leftover);
        let reply = reader.next().await?;
        if let Some(text) = reply.error_text() {
            return Err(Error::Upstream(format!("CLUSTER SLOTS at {addr}: {text}")));
        }
        Topology::parse_cluster_slots(&reply.bytes, addr).map_err(Error::Upstream)
    };
    match tokio::time::timeout(limit, asked).await {
        Ok(r) => r,
        Err(_) => Err(Error::Upstream(format!(
            "CLUSTER SLOTS at {addr}: no answer within {limit:?}"
        ))),
    }
}

/// Asks `candidates` in turn and returns the first view that covers every
/// slot; when none does (a cluster that is down or being set up), the one
/// covering most. Nodes that are down are skipped, so startup works with
/// some seeds unreachable.
///
/// Not done yet (issue 13): comparing several nodes' answers so that a node
/// cut off in a minority, answering with an old map, cannot win; the first
/// whole answer is trusted.
pub async fn fetch(connector: &Connector, candidates: &[String]) -> Result<Topology, Error> {
    let mut best: Option<Topology> = None;
    let mut errors = Vec::new();
    for addr in candidates {
        match ask(connector, addr).await {
            Ok(t) if t.covered() == SLOTS => return Ok(t),
            Ok(t) => {
                if best.as_ref().is_none_or(|b| b.covered() < t.covered()) {
                    best = Some(t);
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    match best {
        Some(t) if t.covered() > 0 => Ok(t),
        _ if errors.is_empty() => Err(Error::Upstream(
            "no cluster node serves any slot".to_string(),
        )),
        _ => Err(Error::Upstream(errors.join("; "))),
    }
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
        assert!(Topology::parse_cluster_slots(b"+OK\r\n", "h:1").is_err());
        assert!(Topology::parse_cluster_slots(b"*1\r\n*2\r\n:0\r\n:1\r\n", "h:1").is_err());
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
