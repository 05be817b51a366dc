//! The third tier: fill Redis misses for configured key shapes from TDengine.
//!
//! [`Tdengine::matches`] is a cheap shape test the proxy runs on every GET
//! miss; [`Tdengine::fetch`] validates the key's parameters, builds the SQL,
//! coalesces concurrent fetches of one key into one query (single flight),
//! bounds concurrent queries, applies the timeout and the circuit breaker,
//! and encodes the rows. See `docs/tdengine.md`.

mod client;
pub mod encode;
pub mod fill;
mod relay;
mod route;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::Semaphore;

use crate::flight::SingleFlight;

use crate::config::{TdFormat, TdOnError, TdRoute, TdengineConfig};
use crate::metrics;

pub use client::redact_dsn;
pub use route::quote_literal;

/// The result of one [`Tdengine::fetch`].
#[derive(Debug)]
pub enum Fetch {
    /// Encoded rows and the route's TTL.
    Rows { value: Bytes, ttl: Duration },
    /// The query returned no rows.
    Empty { negative_ttl: Option<Duration> },
    /// The key matched a route's shape but a parameter failed validation;
    /// nothing was sent to TDengine.
    Invalid(String),
    /// Timeout, connection or query error, circuit open, overloaded.
    Failed(crate::Error),
}

/// Counters for `NEARCACHE STATS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdStats {
    /// Queries sent to TDengine.
    pub queries: u64,
    /// Fetches that ended in `Failed` (any kind).
    pub errors: u64,
    /// Keys rejected by parameter validation.
    pub rejected: u64,
    /// `closed`, `open` or `half-open`.
    pub circuit: String,
}

/// The TDengine tier; clone the `Arc` around it to share.
pub struct Tdengine {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Vec<route::Route>,
    pool: client::Pool,
    format: TdFormat,
    timeout: Duration,
    on_error: TdOnError,
    on_invalid_key: TdOnError,
    negative_ttl: Option<Duration>,
    semaphore: Semaphore,
    breaker: Breaker,
    /// Concurrent fetches of one key share one query.
    flights: Arc<SingleFlight<Bytes, (), Outcome>>,
    queries: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
}

/// What a single flight shares between its waiters.
#[derive(Debug, Clone)]
enum Outcome {
    Rows(Bytes, Duration),
    Empty,
    Failed(String),
}

// ---------------------------------------------------------------------------
// Circuit breaker.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

/// Whether the breaker let a query through, and as what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permit {
    Normal,
    Probe,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, BreakerState> {
        self.state.lock()
    }

    fn allow(&self) -> Option<Permit> {
        let mut s = self.lock();
        match *s {
            BreakerState::Closed { .. } => Some(Permit::Normal),
            BreakerState::Open { until } if Instant::now() >= until => {
                *s = BreakerState::HalfOpen;
                tracing::info!("TDengine circuit half-open: sending one probe");
                Some(Permit::Probe)
            }
            BreakerState::Open { .. } | BreakerState::HalfOpen => None,
        }
    }

    fn success(&self) {
        let mut s = self.lock();
        if !matches!(*s, BreakerState::Closed { .. }) {
            tracing::info!("TDengine circuit closed");
        }
        *s = BreakerState::Closed { failures: 0 };
        metrics::get().tdengine_circuit_open.set(0);
    }

    fn failure(&self, permit: Permit) {
        let mut s = self.lock();
        let open = match (*s, permit) {
            (BreakerState::HalfOpen, Permit::Probe) => true,
            (BreakerState::Closed { failures }, _) => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    true
                } else {
                    *s = BreakerState::Closed { failures };
                    false
                }
            }
            // Already open (a query admitted before it opened failed too).
            _ => false,
        };
        if open {
            *s = BreakerState::Open {
                until: Instant::now() + self.cooldown,
            };
            metrics::get().tdengine_circuit_open.set(1);
            tracing::warn!(cooldown = ?self.cooldown, "TDengine circuit open");
        }
    }

    /// A probe that never reached TDengine (e.g. overloaded): let the next
    /// fetch probe instead.
    fn abandon(&self, permit: Permit) {
        if permit == Permit::Probe {
            let mut s = self.lock();
            if *s == BreakerState::HalfOpen {
                *s = BreakerState::Open {
                    until: Instant::now(),
                };
            }
        }
    }

    fn describe(&self) -> &'static str {
        match *self.lock() {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { until } if Instant::now() >= until => "half-open",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

// ---------------------------------------------------------------------------

impl Tdengine {
    /// Compile the routes and set up the pool. Never connects synchronously
    /// and never fails because TDengine is down; `Err` names the bad config key.
    pub fn new(cfg: TdengineConfig) -> Result<Tdengine, crate::Error> {
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for (i, r) in cfg.routes.iter().enumerate() {
            let ctx = format!("tdengine.routes[{i}]");
            routes.push(route::Route::compile(&ctx, r).map_err(|msg| {
                let (key, rest) = msg.split_once(": ").unwrap_or((&ctx, &msg));
                crate::config::ConfigError::new(key, rest.to_string())
            })?);
        }
        taos::TaosBuilder::from_dsn(cfg.dsn.as_str())
            .map_err(|e| crate::config::ConfigError::new("tdengine.dsn", e.to_string()))?;
        let pool = client::Pool::new(cfg.dsn.clone(), cfg.pool_size, &cfg.tls)?;
        tracing::info!(dsn = %pool.redacted_dsn(), tls = pool.tls(), routes = routes.len(), "TDengine tier configured");
        let inner = Arc::new(Inner {
            routes,
            pool,
            format: cfg.format,
            timeout: cfg.timeout,
            on_error: cfg.on_error,
            on_invalid_key: cfg.on_invalid_key,
            negative_ttl: cfg.negative_ttl,
            semaphore: Semaphore::new(cfg.max_concurrent_queries.max(1)),
            breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_cooldown),
            flights: Arc::default(),
            queries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        metrics::get().tdengine_circuit_open.set(0);
        // Connect in the background when there is a runtime; the first fetch
        // connects otherwise.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let warm = inner.clone();
            rt.spawn(async move {
                let _ = tokio::time::timeout(warm.timeout, warm.pool.warm_up()).await;
            });
        }
        Ok(Tdengine { inner })
    }

    pub fn on_error(&self) -> TdOnError {
        self.inner.on_error
    }

    pub fn on_invalid_key(&self) -> TdOnError {
        self.inner.on_invalid_key
    }

    pub fn stats(&self) -> TdStats {
        TdStats {
            queries: self.inner.queries.load(Ordering::Relaxed),
            errors: self.inner.errors.load(Ordering::Relaxed),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
            circuit: self.inner.breaker.describe().to_string(),
        }
    }

    /// Does any route's key template match this key's shape? No validation
    /// (an over-long key of a route's shape matches, and `fetch` then calls
    /// it `Invalid`, so `on_invalid_key` applies to it like to any other).
    pub fn matches(&self, key: &[u8]) -> bool {
        matches(&self.inner.routes, key)
    }

    /// Validate, build the SQL, coalesce, query and encode.
    pub async fn fetch(&self, key: &[u8]) -> Fetch {
        let inner = &self.inner;
        let (ri, sql) = match inner.plan(key) {
            Ok(v) => v,
            Err(why) => {
                inner.rejected.fetch_add(1, Ordering::Relaxed);
                metrics::get().tdengine_rejected_keys_total.inc();
                tracing::debug!(key = %String::from_utf8_lossy(&key[..key.len().min(64)]), %why, "TDengine key rejected");
                return Fetch::Invalid(why);
            }
        };
        // The query runs in its own task (see `flight`): it finishes and
        // settles the breaker even if every caller goes away, and a panic
        // inside the client cannot reach the callers.
        let query = {
            let inner = self.inner.clone();
            move || async move { inner.query(ri, sql).await }.boxed()
        };
        let (waiter, _) = inner
            .flights
            .run(Bytes::copy_from_slice(key), (), query, query_panicked);
        let outcome = waiter.await;
        match outcome {
            Outcome::Rows(value, ttl) => Fetch::Rows { value, ttl },
            Outcome::Empty => Fetch::Empty {
                negative_ttl: inner.negative_ttl,
            },
            Outcome::Failed(msg) => {
                inner.errors.fetch_add(1, Ordering::Relaxed);
                Fetch::Failed(crate::Error::Tdengine(msg))
            }
        }
    }
}

/// What the waiters of a query whose task panicked get.
fn query_panicked(why: String) -> Outcome {
    metrics::get()
        .tdengine_errors_total
        .with_label_values(&["internal"])
        .inc();
    tracing::error!(error = %why, "TDengine query task failed");
    Outcome::Failed(format!("query task failed: {why}"))
}

fn matches(routes: &[route::Route], key: &[u8]) -> bool {
    routes.iter().any(|r| r.split(key).is_some())
}

/// Route and SQL for a key, or why it is invalid.
fn plan(routes: &[route::Route], key: &[u8]) -> Result<(usize, String), String> {
    if key.len() > route::MAX_KEY_LEN {
        return Err(format!("key longer than {} bytes", route::MAX_KEY_LEN));
    }
    for (i, r) in routes.iter().enumerate() {
        if let Some(values) = r.split(key) {
            return r.build_sql(&values).map(|sql| (i, sql));
        }
    }
    Err("key matches no tdengine route".to_string())
}

/// The routes of a `[tdengine]` config compiled exactly as [`Tdengine::new`]
/// compiles them, planning keys without a connection: the shape test of
/// [`Tdengine::matches`], and the validation and SQL of [`Tdengine::fetch`].
/// For `fuzz/` and `tests/fuzz_props.rs`; the proxy goes through [`Tdengine`].
pub struct RoutePlanner {
    routes: Vec<route::Route>,
}

impl RoutePlanner {
    /// Compiles `routes` (config paths `tdengine.routes[i]`); `Err` is the
    /// message `Tdengine::new` would report.
    pub fn compile(routes: &[TdRoute]) -> Result<RoutePlanner, String> {
        let routes = routes
            .iter()
            .enumerate()
            .map(|(i, r)| route::Route::compile(&format!("tdengine.routes[{i}]"), r))
            .collect::<Result<_, _>>()?;
        Ok(RoutePlanner { routes })
    }

    /// [`Tdengine::matches`].
    pub fn matches(&self, key: &[u8]) -> bool {
        matches(&self.routes, key)
    }

    /// The index of the route and the SQL that [`Tdengine::fetch`] would send
    /// for `key`, or why it would answer `Fetch::Invalid`.
    pub fn plan(&self, key: &[u8]) -> Result<(usize, String), String> {
        plan(&self.routes, key)
    }
}

impl Inner {
    fn plan(&self, key: &[u8]) -> Result<(usize, String), String> {
        plan(&self.routes, key)
    }

    async fn query(self: Arc<Self>, ri: usize, sql: String) -> Outcome {
        let m = metrics::get();
        let route = &self.routes[ri];
        let deadline = tokio::time::Instant::now() + self.timeout;
        let fail = |kind: &str, msg: String| {
            m.tdengine_errors_total.with_label_values(&[kind]).inc();
            Outcome::Failed(msg)
        };
        let Some(permit) = self.breaker.allow() else {
            return fail("circuit_open", "circuit breaker open".to_string());
        };
        let _slot = match tokio::time::timeout_at(deadline, self.semaphore.acquire()).await {
            Ok(Ok(p)) => p,
            _ => {
                self.breaker.abandon(permit);
                return fail(
                    "overloaded",
                    format!("too many concurrent queries (waited {:?})", self.timeout),
                );
            }
        };
        self.queries.fetch_add(1, Ordering::Relaxed);
        m.tdengine_queries_total
            .with_label_values(&[&route.template])
            .inc();
        let started = Instant::now();
        let res = tokio::time::timeout_at(deadline, self.pool.query(&sql)).await;
        let elapsed = started.elapsed();
        m.tdengine_query_seconds
            .with_label_values(&[&route.template])
            .observe(elapsed.as_secs_f64());
        match res {
            Ok(Ok(rows)) => {
                self.breaker.success();
                tracing::debug!(route = %route.template, rows = rows.rows.len(), ?elapsed, "TDengine query");
                if rows.rows.is_empty() {
                    Outcome::Empty
                } else {
                    Outcome::Rows(Bytes::from(encode::encode(&rows, self.format)), route.ttl)
                }
            }
            Ok(Err(client::QueryError::Query(msg))) => {
                self.breaker.failure(permit);
                tracing::warn!(route = %route.template, error = %msg, "TDengine query error");
                fail("query", format!("query failed: {msg}"))
            }
            Ok(Err(client::QueryError::Connect(msg))) => {
                self.breaker.failure(permit);
                tracing::warn!(route = %route.template, error = %msg, "TDengine connection error");
                fail("connect", format!("connection failed: {msg}"))
            }
            Err(_) => {
                self.breaker.failure(permit);
                // The connection may be wedged: reconnect next time.
                self.pool.discard_all();
                tracing::warn!(route = %route.template, timeout = ?self.timeout, "TDengine query timed out");
                fail("timeout", format!("timed out after {:?}", self.timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_probes_and_closes() {
        let b = Breaker::new(2, Duration::from_millis(30));
        assert_eq!(b.allow(), Some(Permit::Normal));
        b.failure(Permit::Normal);
        assert_eq!(b.describe(), "closed");
        b.failure(Permit::Normal);
        assert_eq!(b.describe(), "open");
        assert_eq!(b.allow(), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.allow(), Some(Permit::Probe));
        assert_eq!(b.allow(), None, "only one probe while half-open");
        b.failure(Permit::Probe);
        assert_eq!(b.describe(), "open");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.allow(), Some(Permit::Probe));
        b.success();
        assert_eq!(b.describe(), "closed");
        assert_eq!(b.allow(), Some(Permit::Normal));
    }

    #[test]
    fn abandoned_probe_reopens_immediately() {
        let b = Breaker::new(1, Duration::from_millis(10));
        b.failure(Permit::Normal);
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(b.allow(), Some(Permit::Probe));
        b.abandon(Permit::Probe);
        assert_eq!(b.allow(), Some(Permit::Probe));
    }
}
