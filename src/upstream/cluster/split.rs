//! Where a whole command goes in a cluster, decided from the cluster's own
//! `COMMAND` table (key specs and tips), and how the replies of several
//! nodes become the one reply the client expects.
//!
//! - Every key in one slot: one request to that slot's owner.
//! - Keys in several slots, command tipped `request_policy:multi_shard`
//!   (MGET, MSET, DEL, UNLINK, EXISTS, TOUCH in Redis 7): one request per
//!   slot, each key carrying the arguments up to the next key (MSET's
//!   values), merged by `response_policy`: none → an array in the client's
//!   key order (MGET; a failed slot's keys are error elements in their
//!   places, the other keys keep their values), `agg_sum` → integers summed (DEL…), `all_succeeded`
//!   → the first error, else the first reply (MSET). **MSET across slots is
//!   not atomic**: each slot's part is applied on its own, and a failed
//!   part leaves the others applied.
//! - Keys in several slots, any other command (MSETNX included, although
//!   Redis 7.0 tips it `multi_shard`/`agg_min`: split, it would no longer be
//!   all-or-nothing): Redis's own `-CROSSSLOT`.
//! - No keys: `request_policy:all_shards`/`all_nodes` go to every master
//!   (merged as above; `agg_sum` for DBSIZE) when their response policy
//!   says how to merge, else to one master, like anything else keyless
//!   (the first in address order): INFO describes that master. RANDOMKEY
//!   asks masters in turn until one has a key. SCAN walks the masters one after the
//!   other behind one cursor (see [`scan_cursor`]); other `special`
//!   policies are refused with a clear error.

use bytes::{Bytes, BytesMut};

use super::commands::{CommandTable, KeysError, RequestPolicy, ResponsePolicy};
use super::slots::slot;
use crate::protocol::{self, Reply, ReplyKind};

/// Redis's reply to keys in different slots, byte for byte.
pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

/// How the replies of a split command become one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Arrays, put back in the client's key order (`order` of each part).
    KeyOrder,
    /// Arrays, concatenated (KEYS on every master).
    Concat,
    /// Integers, summed.
    Sum,
    /// The first error, else the first reply.
    AllOk,
}

/// One sub-request of a split command.
#[derive(Clone, Debug)]
pub struct Part {
    /// `None`: any master (keyless).
    pub slot: Option<u16>,
    pub request: Bytes,
    /// For [`Merge::KeyOrder`]: the position in the client's reply of each
    /// element of this part's reply.
    pub order: Vec<usize>,
}

#[derive(Clone, Debug)]
pub enum Plan {
    /// One request to the owner of this slot.
    One { slot: u16 },
    /// No key: one request to any master.
    AnyMaster,
    /// The same request to every master, merged.
    AllMasters { merge: Merge },
    /// Sub-requests per slot, merged.
    Split { merge: Merge, parts: Vec<Part> },
    /// RANDOMKEY: masters asked in turn from a random one, until one has a
    /// key (Redis 7 tips it `all_shards` without a response policy, which
    /// would concatenate single keys).
    RandomKey,
    /// SCAN: the master and that master's cursor named by the client's
    /// cursor ([`scan_position`]).
    Scan { master: usize, cursor: u64 },
    /// Answered with this error reply; nothing is sent.
    Refuse(Bytes),
}

/// Bits of a SCAN cursor that name the master (in address order): room
/// for 1,024 masters, Redis Cluster's own recommended maximum of nodes.
const SCAN_MASTER_BITS: u32 = 10;

/// The cursor handed to the client for `cursor` of master `master`: the
/// node's cursor above, the master's index below, so that (0, 0), the
/// start, is 0 and the client's cursor stays a plain integer (clients parse
/// it as one). `None` when the node's cursor does not fit (a table larger
/// than 2^54 slots: never in practice).
pub fn scan_cursor(master: usize, cursor: u64) -> Option<u64> {
    if master >= 1 << SCAN_MASTER_BITS || cursor.leading_zeros() < SCAN_MASTER_BITS {
        return None;
    }
    Some(cursor << SCAN_MASTER_BITS | master as u64)
}

/// The master and its cursor named by a client's SCAN cursor.
pub fn scan_position(cursor: u64) -> (usize, u64) {
    (
        (cursor & ((1 << SCAN_MASTER_BITS) - 1)) as usize,
        cursor >> SCAN_MASTER_BITS,
    )
}

/// Redis's reply to a SCAN cursor that is not a number.
pub const INVALID_CURSOR: &str = "ERR invalid cursor";

fn merge_of(policy: ResponsePolicy) -> Option<Merge> {
    match policy {
        ResponsePolicy::Default => Some(Merge::Concat),
        ResponsePolicy::AggSum => Some(Merge::Sum),
        ResponsePolicy::AllSucceeded | ResponsePolicy::OneSucceeded => Some(Merge::AllOk),
        _ => None,
    }
}

/// Decides where `args` go.
pub fn plan(table: &CommandTable, args: &[Bytes]) -> Plan {
    let Some(info) = table.lookup(args) else {
        // Unknown to this cluster: any master answers Redis's own error.
        return Plan::AnyMaster;
    };
    let positions = match info.key_positions(args) {
        Ok(p) => p,
        Err(KeysError::Invalid) => return Plan::AnyMaster,
        Err(KeysError::Unroutable) => {
            return Plan::Refuse(protocol::error(&format!(
                "ERR nearcache: cannot find the keys of '{}' to route it in a cluster",
                info.name
            )))
        }
    };
    if positions.is_empty() {
        if info.name.eq_ignore_ascii_case("randomkey") {
            return Plan::RandomKey;
        }
        return match info.request_policy {
            RequestPolicy::AllNodes | RequestPolicy::AllShards => {
                match merge_of(info.response_policy) {
                    Some(merge) => Plan::AllMasters { merge },
                    // No merge we know (INFO, MEMORY STATS, LATENCY…): one
                    // master's answer, about that master (clients send INFO
                    // at connect time, e.g. ioredis's ready check).
                    None => Plan::AnyMaster,
                }
            }
            RequestPolicy::Special if info.name.eq_ignore_ascii_case("scan") => {
                match args
                    .get(1)
                    .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok())
                {
                    Some(c) => {
                        let (master, cursor) = scan_position(c);
                        Plan::Scan { master, cursor }
                    }
                    None => Plan::Refuse(protocol::error(INVALID_CURSOR)),
                }
            }
            RequestPolicy::Special => Plan::Refuse(unsupported(&info.name)),
            _ => Plan::AnyMaster,
        };
    }
    let slots: Vec<u16> = positions.iter().map(|&i| slot(&args[i])).collect();
    if slots.iter().all(|&s| s == slots[0]) {
        return Plan::One { slot: slots[0] };
    }
    if info.request_policy != RequestPolicy::MultiShard {
        return Plan::Refuse(protocol::error(CROSSSLOT));
    }
    let merge = match info.response_policy {
        ResponsePolicy::Default => Merge::KeyOrder,
        ResponsePolicy::AggSum => Merge::Sum,
        ResponsePolicy::AllSucceeded => Merge::AllOk,
        // Redis 7.0 tips MSETNX multi_shard/agg_min, but split it would
        // lose its all-or-nothing: refused the way Redis refuses it.
        _ => return Plan::Refuse(protocol::error(CROSSSLOT)),
    };
    // Each key carries the arguments up to the next key (MSET's value).
    let head = &args[..positions[0]];
    let mut by_slot: Vec<(u16, Vec<Bytes>, Vec<usize>)> = Vec::new();
    for (n, (&pos, &s)) in positions.iter().zip(&slots).enumerate() {
        let end = positions.get(n + 1).copied().unwrap_or(args.len());
        let part = match by_slot.iter_mut().find(|p| p.0 == s) {
            Some(p) => p,
            None => {
                by_slot.push((s, head.to_vec(), Vec::new()));
                by_slot.last_mut().expect("just pushed")
            }
        };
        part.1.extend_from_slice(&args[pos..end]);
        part.2.push(n);
    }
    Plan::Split {
        merge,
        parts: by_slot
            .into_iter()
            .map(|(s, a, order)| {
                let mut out = BytesMut::new();
                protocol::encode_command(&mut out, &a);
                Part {
                    slot: Some(s),
                    request: out.freeze(),
                    order,
                }
            })
            .collect(),
    }
}

fn unsupported(name: &str) -> Bytes {
    protocol::error(&format!(
        "ERR nearcache: '{name}' is not supported on a Redis Cluster upstream yet"
    ))
}

fn error_reply(bytes: Bytes) -> Reply {
    Reply {
        bytes,
        kind: ReplyKind::Error,
    }
}

/// Merges the parts' replies (in part order).
pub fn merge(merge: Merge, parts: &[Part], replies: Vec<Reply>) -> Reply {
    let total = parts.iter().map(|p| p.order.len()).sum();
    if let Some(e) = replies.iter().find(|r| r.kind == ReplyKind::Error) {
        // Not atomic: the other parts may have been applied (MSET, DEL).
        // (MGET keeps its other keys: per-key errors, below.)
        if merge != Merge::KeyOrder {
            return e.clone();
        }
    }
    let bad = || {
        error_reply(protocol::error(
            "ERR nearcache: a cluster node sent a reply that cannot be merged",
        ))
    };
    match merge {
        Merge::AllOk => replies.into_iter().next().unwrap_or_else(bad),
        Merge::Sum => {
            let mut sum = 0i64;
            for r in &replies {
                let Some(n) = protocol::scalar(&r.bytes)
                    .filter(|_| r.bytes.first() == Some(&b':'))
                    .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<i64>().ok())
                else {
                    return bad();
                };
                sum += n;
            }
            Reply {
                bytes: protocol::integer(sum),
                kind: ReplyKind::Normal,
            }
        }
        Merge::Concat => {
            let mut items = Vec::new();
            for r in &replies {
                let Some(els) = protocol::elements(&r.bytes) else {
                    return bad();
                };
                items.extend(els.into_iter().map(|e| r.bytes.slice(e)));
            }
            Reply {
                bytes: protocol::array(&items),
                kind: ReplyKind::Normal,
            }
        }
        Merge::KeyOrder => {
            let mut items: Vec<Option<Bytes>> = vec![None; total];
            for (part, r) in parts.iter().zip(&replies) {
                if r.kind == ReplyKind::Error {
                    for &at in &part.order {
                        items[at] = Some(r.bytes.clone());
                    }
                    continue;
                }
                let Some(els) = protocol::elements(&r.bytes) else {
                    return bad();
                };
                if els.len() != part.order.len() {
                    return bad();
                }
                for (e, &at) in els.into_iter().zip(&part.order) {
                    items[at] = Some(r.bytes.slice(e));
                }
            }
            let Some(items) = items.into_iter().collect::<Option<Vec<Bytes>>>() else {
                return bad();
            };
            Reply {
                bytes: protocol::array(&items),
                kind: ReplyKind::Normal,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_cursors_name_a_master_and_its_cursor() {
        assert_eq!(scan_cursor(0, 0), Some(0));
        for (m, c) in [(0, 1), (1, 0), (2, 12345), (1023, (1 << 54) - 1)] {
            let client = scan_cursor(m, c).expect("fits");
            assert_ne!(client, 0, "only the start is 0");
            assert_eq!(scan_position(client), (m, c));
        }
        assert_eq!(scan_cursor(1024, 0), None);
        assert_eq!(scan_cursor(0, 1 << 54), None);
    }
}
