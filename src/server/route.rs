//! Where a request goes, decided once per request by a pure function of the
//! session's state and the request: the rules in one place, tested without
//! sockets. The session applies the route; L1 decides hit, fill or bypass
//! for [`Route::Read`] (see `read.rs`).

use bytes::Bytes;

use crate::command::{self, Class, Keys, Pin};

/// What the router needs to know about the session.
#[derive(Clone, Copy, Debug)]
pub struct View {
    /// Has the client logged in (when nearcache requires a password)?
    pub authed: bool,
    /// Is the client in a state that lives on its own connection?
    pub pinned: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// nearcache answers or decides itself (`local.rs`).
    Local,
    /// An error reply, sent nowhere.
    Reject(&'static str),
    /// A cacheable read: from L1, or a fill on the client's multiplexed connection.
    Read { key: Bytes },
    /// MGET: partly from L1.
    MGet,
    /// The client's multiplexed connection; `keys` are the keys it writes.
    Pool { keys: Keys },
    /// The control connection (must not queue behind other requests).
    Control,
    /// The client's own connection; `blocking`: it may block.
    Pinned { keys: Keys, blocking: bool },
}

pub const NOAUTH: &str = "NOAUTH Authentication required.";

/// Routes one request; `name` is its upper-cased command name.
pub fn route(view: View, name: &[u8], args: &[Bytes]) -> Route {
    if !view.authed && !matches!(name, b"AUTH" | b"HELLO" | b"QUIT" | b"RESET") {
        return Route::Reject(NOAUTH);
    }
    let class = command::classify(name, args);
    let blocking = matches!(
        class,
        Class::Pinned {
            pin: Pin::Blocking,
            ..
        }
    );
    match class {
        Class::Local => Route::Local,
        Class::Refused(msg) => Route::Reject(msg),
        // In a transaction or a subscribed RESP2 connection these must meet
        // Redis' own rules (queued, or refused): they stay on the connection.
        Class::Control if view.pinned => Route::Pinned {
            keys: Keys::None,
            blocking: false,
        },
        Class::Control => Route::Control,
        Class::Write { keys } | Class::Pinned { keys, .. } if view.pinned => {
            Route::Pinned { keys, blocking }
        }
        _ if view.pinned => Route::Pinned {
            keys: Keys::None,
            blocking,
        },
        Class::CacheableRead { key } => Route::Read { key },
        Class::MGet => Route::MGet,
        Class::Write { keys } => Route::Pool { keys },
        Class::Forward => Route::Pool { keys: Keys::None },
        Class::Pinned { keys, .. } => Route::Pinned { keys, blocking },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn keys(list: &[&str]) -> Keys {
        Keys::Some(
            list.iter()
                .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                .collect(),
        )
    }

    const FREE: View = View {
        authed: true,
        pinned: false,
    };
    const PINNED: View = View {
        authed: true,
        pinned: true,
    };
    const ANON: View = View {
        authed: false,
        pinned: false,
    };

    #[test]
    fn routes() {
        let table: Vec<(View, &str, Route)> = vec![
            // Reads may come from L1 unless the client's state lives on its connection.
            (
                FREE,
                "GET quote:1",
                Route::Read {
                    key: "quote:1".into(),
                },
            ),
            (
                FREE,
                "get quote:1",
                Route::Read {
                    key: "quote:1".into(),
                },
            ),
            (
                PINNED,
                "GET quote:1",
                Route::Pinned {
                    keys: Keys::None,
                    blocking: false,
                },
            ),
            (FREE, "MGET a b", Route::MGet),
            (FREE, "SET a 1", Route::Pool { keys: keys(&["a"]) }),
            (
                PINNED,
                "SET a 1",
                Route::Pinned {
                    keys: keys(&["a"]),
                    blocking: false,
                },
            ),
            (FREE, "PING", Route::Pool { keys: Keys::None }),
            (FREE, "EVAL s 0", Route::Pool { keys: Keys::All }),
            // Connection-setup commands of real clients are answered locally: they pin nothing.
            (FREE, "HELLO 3", Route::Local),
            (FREE, "CLIENT SETNAME app", Route::Local),
            (
                FREE,
                "CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type internal-fqdn",
                Route::Local,
            ),
            (FREE, "CLIENT SETINFO LIB-NAME redis-py", Route::Local),
            (FREE, "SELECT 0", Route::Local),
            (FREE, "AUTH pass", Route::Local),
            // Stateful commands take the client's own connection.
            (
                FREE,
                "MULTI",
                Route::Pinned {
                    keys: Keys::None,
                    blocking: false,
                },
            ),
            (
                FREE,
                "SUBSCRIBE ch",
                Route::Pinned {
                    keys: Keys::None,
                    blocking: false,
                },
            ),
            (
                FREE,
                "BLPOP q 0",
                Route::Pinned {
                    keys: keys(&["q"]),
                    blocking: true,
                },
            ),
            (
                FREE,
                "XREAD BLOCK 0 STREAMS s $",
                Route::Pinned {
                    keys: Keys::None,
                    blocking: true,
                },
            ),
            (
                PINNED,
                "BLPOP q 0",
                Route::Pinned {
                    keys: keys(&["q"]),
                    blocking: true,
                },
            ),
            // Busy-server commands never queue behind others, unless in a transaction.
            (FREE, "SCRIPT KILL", Route::Control),
            (FREE, "FUNCTION KILL", Route::Control),
            (
                PINNED,
                "SCRIPT KILL",
                Route::Pinned {
                    keys: Keys::None,
                    blocking: false,
                },
            ),
            (FREE, "SCRIPT LOAD x", Route::Pool { keys: Keys::None }),
            // Login first when nearcache requires a password.
            (ANON, "GET quote:1", Route::Reject(NOAUTH)),
            (ANON, "AUTH x", Route::Local),
            (ANON, "HELLO 3 AUTH default x", Route::Local),
            (
                FREE,
                "PSYNC ? -1",
                Route::Reject(
                    "ERR nearcache: replication commands are not supported through the proxy",
                ),
            ),
        ];
        for (view, cmd, want) in table {
            let a = args(cmd);
            let got = route(view, &a[0].to_ascii_uppercase(), &a);
            assert_eq!(got, want, "{cmd} with {view:?}");
        }
    }
}
