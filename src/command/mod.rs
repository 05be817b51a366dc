//! Command classification: what nearcache must do with a request.
//!
//! Every command falls in one class: a cacheable read of one key, a
//! multi-key MGET, a write whose keys must be invalidated, a command that
//! needs a connection of its own (pinned), one nearcache answers itself, or a
//! plain stateless forward. Unknown commands are treated as writes of unknown
//! keys, which clears L1: a cache that guesses wrong must guess towards empty.

mod glob;
mod tables;

use bytes::Bytes;

pub use glob::{glob_match, literal_prefix};
use tables::{keys_at, CACHEABLE, READ_ONLY, WRITES};

/// Why a client needs a connection of its own, and for how long (the
/// session's connection state machine, `server::pinned`, ends each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// MULTI: until EXEC or DISCARD.
    Multi,
    /// WATCH: until EXEC, DISCARD or UNWATCH.
    Watch,
    /// A blocking command: until its reply.
    Blocking,
    /// SUBSCRIBE family: while subscribed to anything.
    Subscribe,
    /// MONITOR: until RESET or QUIT.
    Monitor,
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
    /// Answered or decided by nearcache itself (HELLO, AUTH, SELECT, CLIENT, QUIT, RESET, NEARCACHE, ...).
    Local,
    /// Must act while the server or other connections are busy (SCRIPT KILL,
    /// FUNCTION KILL, SHUTDOWN, CLIENT PAUSE/UNPAUSE): sent on a connection
    /// nothing else waits on.
    Control,
    /// Not supported through a proxy; the message is sent as the error reply.
    Refused(&'static str),
}

fn eq(name: &[u8], s: &str) -> bool {
    name == s.as_bytes()
}

/// Classifies a request. `name` is `args[0]` upper-cased.
pub fn classify(name: &[u8], args: &[Bytes]) -> Class {
    let n = args.len();
    match name {
        b"HELLO" | b"AUTH" | b"SELECT" | b"QUIT" | b"RESET" | b"NEARCACHE" | b"UNWATCH"
        | b"CLIENT" => return Class::Local,
        b"SHUTDOWN" => return Class::Control,
        b"SCRIPT" | b"FUNCTION" if args.get(1).is_some_and(|a| a.eq_ignore_ascii_case(b"KILL")) => {
            return Class::Control
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
                pin: Pin::Monitor,
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

/// Invalidate-worthy keys for a command running inside MULTI or on a pinned connection.
pub fn write_keys(name: &[u8], args: &[Bytes]) -> Keys {
    match classify(name, args) {
        Class::Write { keys } | Class::Pinned { keys, .. } => keys,
        _ => Keys::None,
    }
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
        assert_eq!(class("client setname x"), Class::Local);
        assert_eq!(class("CLIENT KILL ID 4"), Class::Local);
        assert_eq!(class("script kill"), Class::Control);
        assert_eq!(class("SCRIPT LOAD x"), Class::Forward);
        assert_eq!(class("SHUTDOWN NOSAVE"), Class::Control);
        assert_eq!(class("PUBLISH ch m"), Class::Forward);
        assert!(matches!(class("PSYNC ? -1"), Class::Refused(_)));
    }

    /// Found by fuzz/ (commands, against Redis' key specs): PFCOUNT
    /// rewrites the HLL's cached cardinality (Redis flags its keys RW).
    #[test]
    fn pfcount_invalidates_its_keys() {
        assert_eq!(
            class("PFCOUNT a b"),
            Class::Write {
                keys: keys(&["a", "b"])
            }
        );
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
