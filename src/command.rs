//! Command classification: what nearcache must do with a request.
//!
//! Every command falls in one class: a cacheable read of one key, a
//! multi-key MGET, a write whose keys must be invalidated, a command that
//! needs a connection of its own (pinned), one nearcache answers itself, or a
//! plain stateless forward. Unknown commands are treated as writes of unknown
//! keys, which clears L1: a cache that guesses wrong must guess towards empty.

use bytes::Bytes;

/// Why a client needs a dedicated upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// SELECT of a database other than the configured one.
    Select,
    /// MULTI: until EXEC or DISCARD.
    Multi,
    /// WATCH: until EXEC, DISCARD or UNWATCH.
    Watch,
    /// A blocking command: for that command only.
    Blocking,
    /// SUBSCRIBE family: for the rest of the connection (until RESET).
    Subscribe,
    /// Connection state that lasts (CLIENT SETNAME/TRACKING/REPLY/ID/..., MONITOR, AUTH as another user).
    Sticky,
}

/// Which keys a write touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    None,
    /// Specific keys, by argument position.
    Some(Vec<Bytes>),
    /// Unknown keys (scripts without declared keys, unknown commands): clear everything.
    All,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// A read-only command on one key whose reply may be served from L1.
    CacheableRead { key: Bytes },
    /// MGET of one or more keys: served partly from L1.
    MGet,
    /// Forward; invalidate `keys` before sending and again when the reply arrives.
    Write { keys: Keys },
    /// Forward; the command reads only or touches no keys.
    Forward,
    /// Needs a dedicated connection.
    Pinned { pin: Pin, keys: Keys },
    /// Answered or decided by nearcache itself (HELLO, AUTH, SELECT, QUIT, RESET, NEARCACHE, ...).
    Local,
    /// Not supported through a proxy; the message is sent as the error reply.
    Refused(&'static str),
}

/// Read-only commands whose replies may be cached: (name, min args incl. name, max args or 0 = any).
const CACHEABLE: &[(&str, usize, usize)] = &[
    ("GET", 2, 2),
    ("GETRANGE", 4, 4),
    ("STRLEN", 2, 2),
    ("EXISTS", 2, 2),
    ("TYPE", 2, 2),
    ("HGET", 3, 3),
    ("HMGET", 3, 0),
    ("HGETALL", 2, 2),
    ("HLEN", 2, 2),
    ("HEXISTS", 3, 3),
    ("HSTRLEN", 3, 3),
    ("LRANGE", 4, 4),
    ("LLEN", 2, 2),
    ("LINDEX", 3, 3),
    ("SMEMBERS", 2, 2),
    ("SISMEMBER", 3, 3),
    ("SMISMEMBER", 3, 0),
    ("SCARD", 2, 2),
    ("ZRANGE", 4, 0),
    ("ZRANGEBYSCORE", 4, 0),
    ("ZRANGEBYLEX", 4, 0),
    ("ZREVRANGE", 4, 0),
    ("ZREVRANGEBYSCORE", 4, 0),
    ("ZREVRANGEBYLEX", 4, 0),
    ("ZSCORE", 3, 3),
    ("ZMSCORE", 3, 0),
    ("ZCARD", 2, 2),
    ("ZRANK", 3, 4),
    ("ZREVRANK", 3, 4),
    ("ZCOUNT", 4, 4),
];

/// Commands that neither write keys nor change connection state.
const READ_ONLY: &[&str] = &[
    "PING",
    "ECHO",
    "INFO",
    "TIME",
    "DBSIZE",
    "LASTSAVE",
    "COMMAND",
    "LOLWUT",
    "ROLE",
    "LATENCY",
    "SLOWLOG",
    "MEMORY",
    "OBJECT",
    "DUMP",
    "TTL",
    "PTTL",
    "EXPIRETIME",
    "PEXPIRETIME",
    "EXISTS",
    "TYPE",
    "KEYS",
    "SCAN",
    "RANDOMKEY",
    "GET",
    "MGET",
    "GETRANGE",
    "SUBSTR",
    "STRLEN",
    "GETBIT",
    "BITCOUNT",
    "BITPOS",
    "BITFIELD_RO",
    "LCS",
    "HGET",
    "HMGET",
    "HGETALL",
    "HKEYS",
    "HVALS",
    "HLEN",
    "HEXISTS",
    "HSTRLEN",
    "HSCAN",
    "HRANDFIELD",
    "HTTL",
    "HPTTL",
    "HEXPIRETIME",
    "HPEXPIRETIME",
    "LRANGE",
    "LLEN",
    "LINDEX",
    "LPOS",
    "SMEMBERS",
    "SISMEMBER",
    "SMISMEMBER",
    "SCARD",
    "SRANDMEMBER",
    "SSCAN",
    "SINTER",
    "SINTERCARD",
    "SUNION",
    "SDIFF",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZRANGEBYLEX",
    "ZREVRANGE",
    "ZREVRANGEBYSCORE",
    "ZREVRANGEBYLEX",
    "ZSCORE",
    "ZMSCORE",
    "ZCARD",
    "ZRANK",
    "ZREVRANK",
    "ZCOUNT",
    "ZLEXCOUNT",
    "ZSCAN",
    "ZRANDMEMBER",
    "ZINTER",
    "ZUNION",
    "ZDIFF",
    "ZINTERCARD",
    "XRANGE",
    "XREVRANGE",
    "XLEN",
    "XINFO",
    "XPENDING",
    "PFCOUNT",
    "GEOPOS",
    "GEODIST",
    "GEOHASH",
    "GEOSEARCH",
    "GEORADIUS_RO",
    "GEORADIUSBYMEMBER_RO",
    "SORT_RO",
    "EVAL_RO",
    "EVALSHA_RO",
    "FCALL_RO",
    "PUBLISH",
    "SPUBLISH",
    "PUBSUB",
    "TOUCH",
    "READONLY",
    "READWRITE",
    "ASKING",
    "CLUSTER",
    "SCRIPT",
    "FUNCTION",
    "CONFIG",
    "ACL",
    "MODULE",
    "BGSAVE",
    "BGREWRITEAOF",
    "SAVE",
    "DEBUG",
    "SHUTDOWN",
    "FAILOVER",
    "REPLICAOF",
    "SLAVEOF",
    "SWAPDB_NEVER",
];

enum KeySpec {
    /// Keys at positions first..=last (negative last counts from the end) stepping by step.
    Range(usize, isize, usize),
    /// `numkeys` at this position, keys after it (EVAL, FCALL, LMPOP, ...).
    NumKeys(usize),
}

/// Writes with their key positions.
const WRITES: &[(&str, KeySpec)] = &[
    ("SET", KeySpec::Range(1, 1, 1)),
    ("SETNX", KeySpec::Range(1, 1, 1)),
    ("SETEX", KeySpec::Range(1, 1, 1)),
    ("PSETEX", KeySpec::Range(1, 1, 1)),
    ("GETSET", KeySpec::Range(1, 1, 1)),
    ("GETDEL", KeySpec::Range(1, 1, 1)),
    ("GETEX", KeySpec::Range(1, 1, 1)),
    ("APPEND", KeySpec::Range(1, 1, 1)),
    ("SETRANGE", KeySpec::Range(1, 1, 1)),
    ("INCR", KeySpec::Range(1, 1, 1)),
    ("DECR", KeySpec::Range(1, 1, 1)),
    ("INCRBY", KeySpec::Range(1, 1, 1)),
    ("DECRBY", KeySpec::Range(1, 1, 1)),
    ("INCRBYFLOAT", KeySpec::Range(1, 1, 1)),
    ("SETBIT", KeySpec::Range(1, 1, 1)),
    ("BITFIELD", KeySpec::Range(1, 1, 1)),
    ("MSET", KeySpec::Range(1, -1, 2)),
    ("MSETNX", KeySpec::Range(1, -1, 2)),
    ("DEL", KeySpec::Range(1, -1, 1)),
    ("UNLINK", KeySpec::Range(1, -1, 1)),
    ("EXPIRE", KeySpec::Range(1, 1, 1)),
    ("PEXPIRE", KeySpec::Range(1, 1, 1)),
    ("EXPIREAT", KeySpec::Range(1, 1, 1)),
    ("PEXPIREAT", KeySpec::Range(1, 1, 1)),
    ("PERSIST", KeySpec::Range(1, 1, 1)),
    ("RENAME", KeySpec::Range(1, 2, 1)),
    ("RENAMENX", KeySpec::Range(1, 2, 1)),
    ("COPY", KeySpec::Range(1, 2, 1)),
    ("MOVE", KeySpec::Range(1, 1, 1)),
    ("RESTORE", KeySpec::Range(1, 1, 1)),
    ("HSET", KeySpec::Range(1, 1, 1)),
    ("HSETNX", KeySpec::Range(1, 1, 1)),
    ("HMSET", KeySpec::Range(1, 1, 1)),
    ("HDEL", KeySpec::Range(1, 1, 1)),
    ("HINCRBY", KeySpec::Range(1, 1, 1)),
    ("HINCRBYFLOAT", KeySpec::Range(1, 1, 1)),
    ("HEXPIRE", KeySpec::Range(1, 1, 1)),
    ("HPEXPIRE", KeySpec::Range(1, 1, 1)),
    ("HEXPIREAT", KeySpec::Range(1, 1, 1)),
    ("HPEXPIREAT", KeySpec::Range(1, 1, 1)),
    ("HPERSIST", KeySpec::Range(1, 1, 1)),
    ("HGETDEL", KeySpec::Range(1, 1, 1)),
    ("HGETEX", KeySpec::Range(1, 1, 1)),
    ("HSETEX", KeySpec::Range(1, 1, 1)),
    ("LPUSH", KeySpec::Range(1, 1, 1)),
    ("RPUSH", KeySpec::Range(1, 1, 1)),
    ("LPUSHX", KeySpec::Range(1, 1, 1)),
    ("RPUSHX", KeySpec::Range(1, 1, 1)),
    ("LPOP", KeySpec::Range(1, 1, 1)),
    ("RPOP", KeySpec::Range(1, 1, 1)),
    ("LSET", KeySpec::Range(1, 1, 1)),
    ("LINSERT", KeySpec::Range(1, 1, 1)),
    ("LREM", KeySpec::Range(1, 1, 1)),
    ("LTRIM", KeySpec::Range(1, 1, 1)),
    ("RPOPLPUSH", KeySpec::Range(1, 2, 1)),
    ("LMOVE", KeySpec::Range(1, 2, 1)),
    ("BLMOVE", KeySpec::Range(1, 2, 1)),
    ("BRPOPLPUSH", KeySpec::Range(1, 2, 1)),
    ("BLPOP", KeySpec::Range(1, -2, 1)),
    ("BRPOP", KeySpec::Range(1, -2, 1)),
    ("BZPOPMIN", KeySpec::Range(1, -2, 1)),
    ("BZPOPMAX", KeySpec::Range(1, -2, 1)),
    ("LMPOP", KeySpec::NumKeys(1)),
    ("ZMPOP", KeySpec::NumKeys(1)),
    ("BLMPOP", KeySpec::NumKeys(2)),
    ("BZMPOP", KeySpec::NumKeys(2)),
    ("SADD", KeySpec::Range(1, 1, 1)),
    ("SREM", KeySpec::Range(1, 1, 1)),
    ("SPOP", KeySpec::Range(1, 1, 1)),
    ("SMOVE", KeySpec::Range(1, 2, 1)),
    ("SINTERSTORE", KeySpec::Range(1, 1, 1)),
    ("SUNIONSTORE", KeySpec::Range(1, 1, 1)),
    ("SDIFFSTORE", KeySpec::Range(1, 1, 1)),
    ("ZADD", KeySpec::Range(1, 1, 1)),
    ("ZINCRBY", KeySpec::Range(1, 1, 1)),
    ("ZREM", KeySpec::Range(1, 1, 1)),
    ("ZREMRANGEBYSCORE", KeySpec::Range(1, 1, 1)),
    ("ZREMRANGEBYRANK", KeySpec::Range(1, 1, 1)),
    ("ZREMRANGEBYLEX", KeySpec::Range(1, 1, 1)),
    ("ZPOPMIN", KeySpec::Range(1, 1, 1)),
    ("ZPOPMAX", KeySpec::Range(1, 1, 1)),
    ("ZUNIONSTORE", KeySpec::Range(1, 1, 1)),
    ("ZINTERSTORE", KeySpec::Range(1, 1, 1)),
    ("ZDIFFSTORE", KeySpec::Range(1, 1, 1)),
    ("ZRANGESTORE", KeySpec::Range(1, 1, 1)),
    ("XADD", KeySpec::Range(1, 1, 1)),
    ("XDEL", KeySpec::Range(1, 1, 1)),
    ("XTRIM", KeySpec::Range(1, 1, 1)),
    ("XGROUP", KeySpec::Range(2, 2, 1)),
    ("XACK", KeySpec::Range(1, 1, 1)),
    ("XCLAIM", KeySpec::Range(1, 1, 1)),
    ("XAUTOCLAIM", KeySpec::Range(1, 1, 1)),
    ("XSETID", KeySpec::Range(1, 1, 1)),
    ("PFADD", KeySpec::Range(1, 1, 1)),
    ("PFMERGE", KeySpec::Range(1, -1, 1)),
    ("GEOADD", KeySpec::Range(1, 1, 1)),
    ("GEOSEARCHSTORE", KeySpec::Range(1, 1, 1)),
    ("BITOP", KeySpec::Range(2, 2, 1)),
    ("EVAL", KeySpec::NumKeys(2)),
    ("EVALSHA", KeySpec::NumKeys(2)),
    ("FCALL", KeySpec::NumKeys(2)),
];

/// Keys at `spec` in `args` (args[0] is the command name). `None` when the
/// arguments don't fit the spec (Redis will reject the command anyway, but we
/// invalidate everything to be safe).
fn keys_at(spec: &KeySpec, args: &[Bytes]) -> Keys {
    match *spec {
        KeySpec::Range(first, last, step) => {
            let last = if last < 0 {
                args.len() as isize + last
            } else {
                last
            };
            if last < first as isize || last as usize >= args.len() {
                return Keys::None;
            }
            Keys::Some(
                (first..=last as usize)
                    .step_by(step)
                    .map(|i| args[i].clone())
                    .collect(),
            )
        }
        KeySpec::NumKeys(pos) => {
            let Some(n) = args
                .get(pos)
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse::<usize>().ok())
            else {
                return Keys::None;
            };
            if n == 0 {
                // A script that declares no keys may still write any key.
                return Keys::All;
            }
            match args.get(pos + 1..pos + 1 + n) {
                Some(keys) => Keys::Some(keys.to_vec()),
                None => Keys::None,
            }
        }
    }
}

fn eq(name: &[u8], s: &str) -> bool {
    name == s.as_bytes()
}

fn arg_upper(args: &[Bytes], i: usize) -> Vec<u8> {
    args.get(i)
        .map(|a| a.to_ascii_uppercase())
        .unwrap_or_default()
}

/// Classifies a request. `name` is `args[0]` upper-cased.
pub fn classify(name: &[u8], args: &[Bytes]) -> Class {
    let n = args.len();
    match name {
        b"HELLO" | b"AUTH" | b"SELECT" | b"QUIT" | b"RESET" | b"NEARCACHE" | b"UNWATCH" => {
            return Class::Local
        }
        b"MULTI" => {
            return Class::Pinned {
                pin: Pin::Multi,
                keys: Keys::None,
            }
        }
        b"WATCH" => {
            return Class::Pinned {
                pin: Pin::Watch,
                keys: Keys::None,
            }
        }
        b"SUBSCRIBE" | b"PSUBSCRIBE" | b"SSUBSCRIBE" | b"UNSUBSCRIBE" | b"PUNSUBSCRIBE"
        | b"SUNSUBSCRIBE" => {
            return Class::Pinned {
                pin: Pin::Subscribe,
                keys: Keys::None,
            }
        }
        b"MONITOR" => {
            return Class::Pinned {
                pin: Pin::Sticky,
                keys: Keys::None,
            }
        }
        b"WAIT" | b"WAITAOF" => {
            return Class::Pinned {
                pin: Pin::Blocking,
                keys: Keys::None,
            }
        }
        b"SYNC" | b"PSYNC" | b"REPLCONF" => {
            return Class::Refused(
                "ERR nearcache: replication commands are not supported through the proxy",
            )
        }
        b"CLIENT" => return classify_client(args),
        b"FLUSHDB" | b"FLUSHALL" | b"SWAPDB" => return Class::Write { keys: Keys::All },
        b"XREAD" | b"XREADGROUP" => {
            let blocking = args
                .iter()
                .skip(1)
                .any(|a| a.eq_ignore_ascii_case(b"BLOCK"));
            // Stream reads are never cached, so their keys never need invalidating.
            let keys = Keys::None;
            if blocking {
                return Class::Pinned {
                    pin: Pin::Blocking,
                    keys,
                };
            }
            return if eq(name, "XREAD") {
                Class::Forward
            } else {
                Class::Write { keys }
            };
        }
        b"SORT" => {
            // SORT ... STORE dest writes dest.
            let store = args
                .iter()
                .position(|a| a.eq_ignore_ascii_case(b"STORE"))
                .and_then(|i| args.get(i + 1));
            return match store {
                Some(dest) => Class::Write {
                    keys: Keys::Some(vec![dest.clone()]),
                },
                None => Class::Forward,
            };
        }
        b"GEORADIUS" | b"GEORADIUSBYMEMBER" => {
            let mut dests = Vec::new();
            for (i, a) in args.iter().enumerate() {
                if a.eq_ignore_ascii_case(b"STORE") || a.eq_ignore_ascii_case(b"STOREDIST") {
                    if let Some(d) = args.get(i + 1) {
                        dests.push(d.clone());
                    }
                }
            }
            return if dests.is_empty() {
                Class::Forward
            } else {
                Class::Write {
                    keys: Keys::Some(dests),
                }
            };
        }
        b"MIGRATE" => return Class::Write { keys: Keys::All },
        // Outside MULTI these only produce Redis' error; inside, the session routes them.
        b"EXEC" | b"DISCARD" => return Class::Forward,
        b"OBJECT" | b"MEMORY" | b"DEBUG" => return Class::Forward,
        b"MGET" if n >= 2 => return Class::MGet,
        _ => {}
    }

    if let Some(&(_, min, max)) = CACHEABLE.iter().find(|(c, _, _)| eq(name, c)) {
        if n >= min && (max == 0 || n <= max) {
            return Class::CacheableRead {
                key: args[1].clone(),
            };
        }
        return Class::Forward;
    }
    if let Some((_, spec)) = WRITES.iter().find(|(c, _)| eq(name, c)) {
        let keys = keys_at(spec, args);
        let blocking = matches!(
            name,
            b"BLPOP"
                | b"BRPOP"
                | b"BLMOVE"
                | b"BRPOPLPUSH"
                | b"BLMPOP"
                | b"BZPOPMIN"
                | b"BZPOPMAX"
                | b"BZMPOP"
        );
        if blocking {
            return Class::Pinned {
                pin: Pin::Blocking,
                keys,
            };
        }
        return Class::Write { keys };
    }
    if READ_ONLY.iter().any(|c| eq(name, c)) {
        return Class::Forward;
    }
    // Unknown: a module command or a newer Redis command. Forward it and assume the worst.
    Class::Write { keys: Keys::All }
}

fn classify_client(args: &[Bytes]) -> Class {
    let sub = arg_upper(args, 1);
    match sub.as_slice() {
        // Read-only or server-wide: fine on a shared connection.
        b"KILL" | b"PAUSE" | b"UNPAUSE" | b"UNBLOCK" | b"HELP" => Class::Forward,
        // GETNAME without a pinned connection is answered locally (no name was set).
        // SETINFO (sent by redis-py and redis-rs on every connect) only labels the
        // connection for CLIENT LIST: acknowledged locally, so it pins nothing.
        b"GETNAME" | b"SETINFO" => Class::Local,
        // Everything else either sets per-connection state or asks about this
        // connection (ID, INFO, LIST): give the client a connection of its own.
        _ => Class::Pinned {
            pin: Pin::Sticky,
            keys: Keys::None,
        },
    }
}

/// Invalidate-worthy keys for a command running inside MULTI or on a pinned connection.
pub fn write_keys(name: &[u8], args: &[Bytes]) -> Keys {
    match classify(name, args) {
        Class::Write { keys } | Class::Pinned { keys, .. } => keys,
        _ => Keys::None,
    }
}

/// Redis glob-style matching (`*`, `?`, `[a-z]`, `[^x]`, `\x`) on bytes, as `KEYS`/`PSUBSCRIBE` do.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let (mut star_p, mut star_i) = (usize::MAX, 0usize);
    while i < s.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star_p = p;
                    star_i = i;
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(&pattern[p..], s[i]) {
                        if matched {
                            p += next;
                            i += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == s[i] {
                        p += 2;
                        i += 1;
                        continue;
                    }
                }
                c => {
                    if c == s[i] {
                        p += 1;
                        i += 1;
                        continue;
                    }
                }
            }
        }
        if star_p != usize::MAX {
            p = star_p + 1;
            star_i += 1;
            i = star_i;
            continue;
        }
        return false;
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// Matches a `[...]` class at the start of `pat`; returns (matched, length of the class).
fn class_match(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut j = 1;
    let negate = pat.get(1) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut matched = false;
    while j < pat.len() && pat[j] != b']' {
        if pat[j] == b'\\' && j + 1 < pat.len() {
            matched |= pat[j + 1] == c;
            j += 2;
        } else if j + 2 < pat.len() && pat[j + 1] == b'-' && pat[j + 2] != b']' {
            let (lo, hi) = (pat[j].min(pat[j + 2]), pat[j].max(pat[j + 2]));
            matched |= lo <= c && c <= hi;
            j += 3;
        } else {
            matched |= pat[j] == c;
            j += 1;
        }
    }
    if j >= pat.len() {
        return None; // unterminated class: treat '[' literally
    }
    Some((matched != negate, j + 1))
}

/// The literal prefix of a glob pattern (up to its first wildcard), for tracking BCAST prefixes.
pub fn literal_prefix(pattern: &[u8]) -> &[u8] {
    let end = pattern
        .iter()
        .position(|&c| matches!(c, b'*' | b'?' | b'[' | b'\\'))
        .unwrap_or(pattern.len());
    &pattern[..end]
}

/// Every command name nearcache knows by name, for bounded metric labels.
pub fn known_commands() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = CACHEABLE.iter().map(|c| c.0).collect();
    all.extend(WRITES.iter().map(|c| c.0));
    all.extend(READ_ONLY.iter().copied());
    all.extend([
        "HELLO",
        "AUTH",
        "SELECT",
        "QUIT",
        "RESET",
        "NEARCACHE",
        "UNWATCH",
        "MULTI",
        "EXEC",
        "DISCARD",
        "WATCH",
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "UNSUBSCRIBE",
        "PUNSUBSCRIBE",
        "SUNSUBSCRIBE",
        "MONITOR",
        "WAIT",
        "WAITAOF",
        "CLIENT",
        "FLUSHDB",
        "FLUSHALL",
        "SWAPDB",
        "XREAD",
        "XREADGROUP",
        "SORT",
        "GEORADIUS",
        "GEORADIUSBYMEMBER",
        "MIGRATE",
        "MGET",
    ]);
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn class(s: &str) -> Class {
        let a = args(s);
        classify(&a[0].to_ascii_uppercase(), &a)
    }

    fn keys(list: &[&str]) -> Keys {
        Keys::Some(
            list.iter()
                .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                .collect(),
        )
    }

    #[test]
    fn reads_writes_and_pins() {
        assert_eq!(class("GET k"), Class::CacheableRead { key: "k".into() });
        assert_eq!(class("GET k extra"), Class::Forward);
        assert_eq!(class("EXISTS a b"), Class::Forward);
        assert_eq!(
            class("MSET a 1 b 2"),
            Class::Write {
                keys: keys(&["a", "b"])
            }
        );
        assert_eq!(
            class("DEL a b c"),
            Class::Write {
                keys: keys(&["a", "b", "c"])
            }
        );
        assert_eq!(
            class("RENAME a b"),
            Class::Write {
                keys: keys(&["a", "b"])
            }
        );
        assert_eq!(
            class("EVAL s 2 a b x"),
            Class::Write {
                keys: keys(&["a", "b"])
            }
        );
        assert_eq!(class("EVAL s 0"), Class::Write { keys: Keys::All });
        assert_eq!(class("FOO.BAR x"), Class::Write { keys: Keys::All });
        assert_eq!(
            class("BLPOP a b 0"),
            Class::Pinned {
                pin: Pin::Blocking,
                keys: keys(&["a", "b"])
            }
        );
        assert_eq!(
            class("XREAD BLOCK 0 STREAMS s $"),
            Class::Pinned {
                pin: Pin::Blocking,
                keys: Keys::None
            }
        );
        assert_eq!(class("XREAD STREAMS s 0"), Class::Forward);
        assert_eq!(class("SORT l STORE d"), Class::Write { keys: keys(&["d"]) });
        assert_eq!(
            class("client setname x"),
            Class::Pinned {
                pin: Pin::Sticky,
                keys: Keys::None
            }
        );
        assert_eq!(class("CLIENT KILL ID 4"), Class::Forward);
        assert_eq!(class("CLIENT SETINFO LIB-NAME redis-py"), Class::Local);
        assert_eq!(class("PUBLISH ch m"), Class::Forward);
        assert!(matches!(class("PSYNC ? -1"), Class::Refused(_)));
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"quote:*", b"quote:000001"));
        assert!(!glob_match(b"quote:*", b"quotes:1"));
        assert!(glob_match(b"k?y", b"key"));
        assert!(glob_match(b"k[a-c]y", b"kby"));
        assert!(!glob_match(b"k[^a-c]y", b"kby"));
        assert!(glob_match(b"*:1d", b"kline:x:1d"));
        assert!(glob_match(b"a\\*b", b"a*b"));
        assert!(glob_match(b"*", b""));
        assert_eq!(literal_prefix(b"ind:*"), b"ind:");
        assert_eq!(literal_prefix(b"*x"), b"");
    }
}
