//! Configuration: the command line, the environment and the TOML file, merged
//! with the precedence flag > environment > file > default, then validated.
//!
//! Every rejected value produces a [`ConfigError`] that names the offending key
//! in one line, so `main` can print it and exit with status 2.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

mod cluster_url;
mod file;
mod resolve;
mod url;

use file::{parse_file, read_file, FileConfig};
use resolve::*;
pub use resolve::{parse_bytes, parse_duration};
pub use url::{node_address, ClusterSeeds, SentinelUrl, UpstreamUrl, SENTINEL_PORT};

/// A configuration problem, always tied to the key that caused it.
#[derive(Debug, thiserror::Error)]
#[error("config: {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// `nearcache [--config FILE] [--listen ADDR] [--upstream URL] [--admin ADDR] [--check-config]`
#[derive(Debug, Default, Parser)]
#[command(
    name = "nearcache",
    version,
    about = "Redis-protocol sidecar near cache"
)]
pub struct Cli {
    /// TOML configuration file (see conf/nearcache.toml).
    #[arg(long, env = "NEARCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address clients connect to [default: 127.0.0.1:6380].
    #[arg(long)]
    pub listen: Option<String>,
    /// Upstream Redis: redis://[user:pass@]host:port[/db], rediss://..., or
    /// redis-sentinel://[user:pass@]sentinel:26379[,sentinel:26379...]/<master name>[/db]
    #[arg(long)]
    pub upstream: Option<String>,
    /// Admin HTTP address (/metrics, /healthz, /readyz) [default: 127.0.0.1:9121].
    #[arg(long)]
    pub admin: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    pub log_format: Option<String>,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The fully resolved configuration used by [`crate::run`].
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub tdengine: Option<TdengineConfig>,
    /// Where the file came from, for SIGHUP reloads.
    pub config_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Redis's `client-output-buffer-limit` for one class of clients: past
/// `hard` unread reply bytes, or past `soft` for longer than `soft_for`, the
/// client is disconnected (0: no such limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimit {
    pub hard: u64,
    pub soft: u64,
    pub soft_for: Duration,
}

/// Output limits for ordinary clients and for subscribers (whose output is
/// whatever is published, not what they asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    pub normal: OutputLimit,
    pub pubsub: OutputLimit,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Client connections beyond this are refused with `-ERR max number of clients reached`.
    pub max_clients: usize,
    /// Largest bulk string a client may send (Redis: proto-max-bulk-len).
    pub proto_max_bulk_len: u64,
    /// Largest multibulk (argument count) a client may send.
    pub max_multibulk_len: u64,
    /// Largest unparsed input a client may accumulate (Redis: client-query-buffer-limit).
    pub client_query_buffer_limit: u64,
    /// Requests of one client waiting for their replies before nearcache stops reading from it.
    pub max_pending_per_client: usize,
    /// Reply bytes a client may leave unread before it is disconnected.
    pub client_output_limit: OutputLimits,
    /// Password local clients must AUTH with before anything else (empty: none).
    pub requirepass: Option<String>,
    /// Runtime worker threads; 0 = one per CPU.
    pub worker_threads: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    /// Used when `url` is a `redis-sentinel://` URL.
    pub sentinel: SentinelConfig,
    /// Multiplexed connections per protocol version.
    pub pool_size: usize,
    /// Upstream connections pinned to one client each (in use or idle), at most.
    pub max_pinned: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub reconnect_backoff_max: Duration,
    pub tls: TlsConfig,
    /// Used when the URL is a `redis-cluster://` one.
    pub cluster: ClusterConfig,
}

/// `[upstream.cluster]` (the URL's options override it).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How often the slot map is refreshed when nothing else triggers it.
    pub refresh_interval: Duration,
    /// Send read-only commands that L1 does not answer to replicas (`READONLY`).
    pub replica_reads: bool,
}

/// How to talk to the Sentinels themselves (`[upstream.sentinel]`).
#[derive(Clone)]
pub struct SentinelConfig {
    /// The Sentinels' own ACL user (`None`: `default`), with `password`.
    pub username: Option<String>,
    /// The Sentinels' `requirepass` (not the master's: that is in the URL).
    pub password: Option<String>,
    /// How long one Sentinel may take to connect and answer before the next is asked.
    pub timeout: Duration,
}

impl std::fmt::Debug for SentinelConfig {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    pub enabled: bool,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationMode {
    Auto,
    Keyspace,
    Tracking,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub enabled: bool,
    pub max_bytes: u64,
    pub invalidation: InvalidationMode,
    /// May nearcache run `CONFIG SET notify-keyspace-events` on the upstream?
    pub configure_upstream: bool,
    /// TTL for keys that match no policy; `None` = not cached.
    pub default_ttl: Option<Duration>,
    pub policies: Vec<Policy>,
    /// How long the invalidation feed may stay silent before it counts as stalled.
    pub feed_health_interval: Duration,
    /// Prove the feed with a canary write (`__nearcache__:canary:*`) every interval, not just a PING.
    pub feed_canary: bool,
}

/// One `[[cache.policies]]` entry; the first whose pattern matches a key wins.
#[derive(Debug, Clone)]
pub struct Policy {
    pub pattern: String,
    /// `None` = never cache keys matching this pattern.
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct TdengineConfig {
    pub dsn: String,
    pub timeout: Duration,
    pub on_error: TdOnError,
    pub on_invalid_key: TdOnError,
    pub format: TdFormat,
    pub max_concurrent_queries: usize,
    pub pool_size: usize,
    pub negative_ttl: Option<Duration>,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub routes: Vec<TdRoute>,
    /// Used for `wss` DSNs only.
    pub tls: TdTlsConfig,
}

/// TLS towards taosAdapter (`taos+wss://`, `wss://`), terminated by
/// nearcache's relay (see `docs/tdengine.md`).
#[derive(Debug, Clone, Default)]
pub struct TdTlsConfig {
    /// PEM CA certificates to trust instead of the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// The name to verify the certificate for instead of the DSN's host.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdOnError {
    Error,
    Nil,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdFormat {
    Json,
    Msgpack,
}

#[derive(Debug, Clone)]
pub struct TdRoute {
    pub key: String,
    pub sql: String,
    pub ttl: Duration,
    pub params: Vec<(String, TdParam)>,
}

#[derive(Debug, Clone)]
pub struct TdParam {
    pub pattern: Option<String>,
    pub allow: Option<Vec<String>>,
    pub quote: bool,
}

/// The application's key scheme, used when the file defines no policies.
pub fn default_policies() -> Vec<Policy> {
    vec![
        Policy {
            pattern: "quote:*".into(),
            ttl: Some(Duration::from_secs(5)),
        },
        Policy {
            pattern: "ind:*".into(),
            ttl: Some(Duration::from_secs(3600)),
        },
        Policy {
            pattern: "kline:*".into(),
            ttl: Some(Duration::from_secs(15 * 60)),
        },
        Policy {
            pattern: "lock:*".into(),
            ttl: None,
        },
    ]
}

/// The process environment as a lookup, so tests can supply their own.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

impl Config {
    /// Defaults only, as if started with no file, flags or environment.
    pub fn defaults() -> Config {
        Config::resolve(&Cli::default(), &[("", ""); 0]).expect("defaults are valid")
    }

    /// Parses a TOML document on top of the defaults (no flags, no environment).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file = parse_file(text)?;
        Config::merge(&Cli::default(), &[("", ""); 0], file, None)
    }

    /// Resolves flags, environment and the file named by `--config`.
    pub fn resolve(cli: &Cli, env: &dyn Env) -> Result<Config, ConfigError> {
        let (file, path) = match &cli.config {
            Some(path) => (read_file(path)?, Some(path.clone())),
            None => (FileConfig::default(), None),
        };
        Config::merge(cli, env, file, path)
    }

    fn merge(
        cli: &Cli,
        env: &dyn Env,
        file: FileConfig,
        path: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let listen = cli
            .listen
            .clone()
            .or_else(|| env.get("NEARCACHE_LISTEN"))
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:6380".into());
        let listen = parse_addr("listen", &listen)?;

        let admin = cli
            .admin
            .clone()
            .or_else(|| env.get("NEARCACHE_ADMIN"))
            .or(file.admin)
            .unwrap_or_else(|| "127.0.0.1:9121".into());
        let admin = match admin.as_str() {
            "" | "off" | "none" => None,
            a => Some(parse_addr("admin", a)?),
        };

        let log_format = match cli
            .log_format
            .clone()
            .or_else(|| env.get("NEARCACHE_LOG_FORMAT"))
            .or(file.log_format)
            .as_deref()
            .unwrap_or("text")
        {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(ConfigError::new(
                    "log_format",
                    format!("must be \"text\" or \"json\", not {other:?}"),
                ))
            }
        };
        let shutdown_grace = duration("shutdown_grace", file.shutdown_grace.as_deref(), "10s")?;

        let server = resolve_server(file.server, env)?;
        let upstream = resolve_upstream(cli, env, file.upstream)?;
        let cache = resolve_cache(env, file.cache)?;
        let tdengine = resolve_tdengine(env, file.tdengine)?;

        Ok(Config {
            listen,
            admin,
            log_format,
            shutdown_grace,
            server,
            upstream,
            cache,
            tdengine,
            config_path: path,
        })
    }
}

#[cfg(test)]
mod tests;
