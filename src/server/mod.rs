//! The client side: accepting connections and running one session per
//! client. The request path, in the order a request takes it:
//!
//! - [`listener`]: accept, `max_clients`, drain on shutdown.
//! - [`session`]: the one task per client. It reads and frames requests,
//!   asks [`route`] where each goes (decided once, by a pure function), and
//!   applies the route: [`local`] answers HELLO, AUTH, SELECT, CLIENT, RESET,
//!   NEARCACHE itself; [`read`] serves cacheable reads from L1 or fills them;
//!   writes and everything else go to the client's multiplexed upstream
//!   connection; stateful commands go to its pinned connection, whose state
//!   machine is [`pinned`]; SCRIPT KILL and friends go to the control
//!   connection.
//! - [`replies`]: what the session owes the client, in request order; it
//!   writes each reply as soon as it and every earlier one are ready.
//! - [`clients`]: the registry behind CLIENT ID / LIST / INFO / KILL.
//!
//! Order: a client's requests reach Redis in the order it sent them because
//! a client uses one multiplexed connection at a time, and before a request
//! takes another path (pool ↔ pinned) every earlier reply must be in.

mod client_cmd;
mod clients;
mod keyspace;
mod listener;
mod local;
mod pinned;
mod read;
mod replies;
mod route;
mod session;
mod shard;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

pub use clients::{ClientInfo, Clients};
pub use listener::serve;

use crate::cache::Cache;
use crate::config::Config;
use crate::metrics;
use crate::tdengine::Tdengine;
use crate::upstream::Upstream;

/// Everything the sessions share: the process' view of its clients, its
/// upstream, its L1 and its third tier.
pub struct Sidecar {
    pub config: Arc<Config>,
    pub upstream: Arc<Upstream>,
    pub cache: Arc<Cache>,
    pub tdengine: Option<Arc<Tdengine>>,
    /// A Redis Cluster upstream: every forwarded command goes through it
    /// (`docs/cluster.md`), and L1 is off.
    pub cluster: Option<Arc<crate::upstream::cluster::router::Router>>,
    pub clients: Clients,
    /// Set when shutdown starts: readiness goes false, sessions stop reading.
    pub draining: AtomicBool,
}

impl Sidecar {
    pub fn new(
        config: Arc<Config>,
        upstream: Arc<Upstream>,
        cache: Arc<Cache>,
        tdengine: Option<Arc<Tdengine>>,
        cluster: Option<Arc<crate::upstream::cluster::router::Router>>,
    ) -> Arc<Sidecar> {
        Arc::new(Sidecar {
            config,
            upstream,
            cache,
            tdengine,
            cluster,
            clients: Clients::default(),
            draining: AtomicBool::new(false),
        })
    }
}

// --- Request metrics ------------------------------------------------------------------

/// How a request was answered, for `nearcache_requests_total`.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Hit = 0,
    Miss = 1,
    Forward = 2,
    Pinned = 3,
    Local = 4,
    Error = 5,
}

const OUTCOMES: [&str; 6] = ["hit", "miss", "forward", "pinned", "local", "error"];

type CounterRow = [prometheus::IntCounter; 6];

type CounterMap = HashMap<&'static [u8], CounterRow, foldhash::fast::FixedState>;

/// Every known command's row, `other`'s, and GET's: the hit path counts
/// a GET per request, and its row without a lookup saves the hashing.
fn counters() -> &'static (CounterMap, CounterRow, CounterRow) {
    static COUNTERS: OnceLock<(CounterMap, CounterRow, CounterRow)> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let m = metrics::get();
        let row = |name: &str| -> CounterRow {
            let lower = name.to_ascii_lowercase();
            std::array::from_fn(|i| m.requests_total.with_label_values(&[&lower, OUTCOMES[i]]))
        };
        let map = crate::command::known_commands()
            .into_iter()
            .map(|c| (c.as_bytes(), row(c)))
            .collect();
        (map, row("other"), row("GET"))
    })
}

pub(crate) fn count_request(name: &[u8], outcome: Outcome) {
    let (map, other, get) = counters();
    let row = if name == b"GET" {
        get
    } else {
        map.get(name).unwrap_or(other)
    };
    row[outcome as usize].inc();
}
