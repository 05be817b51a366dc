//! Process-wide Prometheus metrics: one registry, created on first use, shared
//! by every module. Names follow the Prometheus conventions (`nearcache_`
//! prefix, `_total` counters, `_seconds` and `_bytes` units); the README's
//! metrics reference lists each one.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    // Process.
    pub build_info: IntGaugeVec,
    pub ready: IntGauge,
    // Clients.
    pub client_connections: IntGauge,
    pub client_connections_total: IntCounter,
    pub client_connections_rejected_total: IntCounter,
    pub client_output_limit_closed_total: IntCounter,
    pub requests_total: IntCounterVec,
    // L1 cache.
    pub cache_hits_total: IntCounterVec,
    pub cache_misses_total: IntCounterVec,
    pub cache_evictions_total: IntCounter,
    pub cache_invalidations_total: IntCounterVec,
    pub cache_entries: IntGauge,
    pub cache_bytes: IntGauge,
    pub cache_coalesced_total: IntCounter,
    pub cache_serving: IntGauge,
    pub cache_max_bytes: IntGauge,
    pub feed_up: IntGaugeVec,
    pub feed_reconnects_total: IntCounter,
    // Upstream.
    pub upstream_latency_seconds: Histogram,
    pub upstream_errors_total: IntCounterVec,
    pub upstream_health_checks_total: IntCounterVec,
    pub upstream_reconnects_total: IntCounter,
    pub upstream_pool_connections: IntGauge,
    pub upstream_pinned_connections: IntGauge,
    pub upstream_up: IntGauge,
    pub upstream_failovers_total: IntCounter,
    // TDengine.
    pub tdengine_queries_total: IntCounterVec,
    pub tdengine_query_seconds: HistogramVec,
    pub tdengine_errors_total: IntCounterVec,
    pub tdengine_circuit_open: IntGauge,
    pub tdengine_rejected_keys_total: IntCounter,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let upstream_latency_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "nearcache_upstream_latency_seconds",
                "Round trip of multiplexed upstream requests",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        r.register(Box::new(upstream_latency_seconds.clone()))
            .expect("unique metric");
        let tdengine_query_seconds = HistogramVec::new(
            HistogramOpts::new(
                "nearcache_tdengine_query_seconds",
                "TDengine query latency by route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        r.register(Box::new(tdengine_query_seconds.clone()))
            .expect("unique metric");
        let feed_up = IntGaugeVec::new(
            Opts::new(
                "nearcache_invalidation_feed_up",
                "1 when the invalidation feed of this mode is connected and healthy",
            ),
            &["mode"],
        )
        .expect("valid metric");
        r.register(Box::new(feed_up.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "nearcache_build_info",
                "Always 1; the version label says which nearcache is running",
            ),
            &["version"],
        )
        .expect("valid metric");
        r.register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        Metrics {
            build_info,
            ready: gauge(
                &r,
                "nearcache_ready",
                "1 when /readyz answers 200 (upstream up, feed serving when caching, not draining)",
            ),
            client_connections: gauge(&r, "nearcache_client_connections", "Client connections open now"),
            client_connections_total: counter(&r, "nearcache_client_connections_total", "Client connections accepted"),
            client_connections_rejected_total: counter(
                &r,
                "nearcache_client_connections_rejected_total",
                "Client connections refused (max_clients or shutdown)",
            ),
            client_output_limit_closed_total: counter(
                &r,
                "nearcache_client_output_limit_closed_total",
                "Clients closed for leaving more output unread than server.client_output_limit allows",
            ),
            requests_total: counter_vec(
                &r,
                "nearcache_requests_total",
                "Client commands by command name and outcome (hit, miss, forward, pinned, local, error)",
                &["command", "outcome"],
            ),
            cache_hits_total: counter_vec(&r, "nearcache_cache_hits_total", "L1 hits by key policy pattern", &["pattern"]),
            cache_misses_total: counter_vec(
                &r,
                "nearcache_cache_misses_total",
                "L1 misses of cacheable reads by key policy pattern",
                &["pattern"],
            ),
            cache_evictions_total: counter(&r, "nearcache_cache_evictions_total", "L1 entries evicted for size"),
            cache_invalidations_total: counter_vec(
                &r,
                "nearcache_cache_invalidations_total",
                "L1 invalidations by source (local_write, feed, flush, feed_down, feed_reconnect, reload, admin)",
                &["source"],
            ),
            cache_entries: gauge(&r, "nearcache_cache_entries", "Keys held in L1"),
            cache_bytes: gauge(&r, "nearcache_cache_bytes", "Weighted size of L1 in bytes"),
            cache_coalesced_total: counter(
                &r,
                "nearcache_cache_coalesced_misses_total",
                "Misses that joined an upstream request already in flight (single flight)",
            ),
            cache_serving: gauge(
                &r,
                "nearcache_cache_serving",
                "1 while L1 answers reads (caching enabled and the invalidation feed healthy)",
            ),
            cache_max_bytes: gauge(&r, "nearcache_cache_max_bytes", "Configured upper bound of L1 (cache.max_bytes)"),
            feed_up,
            feed_reconnects_total: counter(
                &r,
                "nearcache_invalidation_feed_reconnects_total",
                "Times the invalidation feed was (re)established",
            ),
            upstream_latency_seconds,
            upstream_errors_total: counter_vec(
                &r,
                "nearcache_upstream_errors_total",
                "Upstream failures by kind (connect, timeout, closed, protocol)",
                &["kind"],
            ),
            upstream_health_checks_total: counter_vec(
                &r,
                "nearcache_upstream_health_checks_total",
                "Liveness checks of the upstream (a PING on a fresh connection) made while a reply was late, by result (alive, dead)",
                &["result"],
            ),
            upstream_reconnects_total: counter(&r, "nearcache_upstream_reconnects_total", "Upstream connections (re)established"),
            upstream_pool_connections: gauge(
                &r,
                "nearcache_upstream_pool_connections",
                "Multiplexed upstream connections that are up",
            ),
            upstream_pinned_connections: gauge(
                &r,
                "nearcache_upstream_pinned_connections",
                "Upstream connections pinned to one client (transactions, pub/sub, blocking, ...)",
            ),
            upstream_up: gauge(&r, "nearcache_upstream_up", "1 when the upstream answered the last connection attempt (Redis Cluster: the slot map is known and its last refresh was answered)"),
            upstream_failovers_total: counter(&r, "nearcache_upstream_failovers_total", "Sentinel master switches acted on: connections to the old master closed, L1 emptied"),
            tdengine_queries_total: counter_vec(&r, "nearcache_tdengine_queries_total", "TDengine queries by route", &["route"]),
            tdengine_query_seconds,
            tdengine_errors_total: counter_vec(
                &r,
                "nearcache_tdengine_errors_total",
                "TDengine failures by kind (connect, timeout, query, circuit_open, overloaded)",
                &["kind"],
            ),
            tdengine_circuit_open: gauge(&r, "nearcache_tdengine_circuit_open", "1 while the TDengine circuit breaker is open"),
            tdengine_rejected_keys_total: counter(
                &r,
                "nearcache_tdengine_rejected_keys_total",
                "Keys that matched a route but failed parameter validation (never sent to TDengine)",
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
