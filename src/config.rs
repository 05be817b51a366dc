//! Configuration: the command line, the environment and the TOML file, merged
//! with the precedence flag > environment > file > default, then validated.
//!
//! Every rejected value produces a [`ConfigError`] that names the offending key
//! in one line, so `main` can print it and exit with status 2.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

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
    /// Upstream Redis: redis://[user:pass@]host:port[/db] or rediss://...
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
    /// Password local clients must AUTH with before anything else (empty: none).
    pub requirepass: Option<String>,
    /// Runtime worker threads; 0 = one per CPU.
    pub worker_threads: usize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    /// Multiplexed connections per protocol version.
    pub pool_size: usize,
    /// Upstream connections pinned to one client each (in use or idle), at most.
    pub max_pinned: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub reconnect_backoff_max: Duration,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    pub enabled: bool,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

/// A parsed `redis://` or `rediss://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    pub tls: bool,
}

impl std::fmt::Debug for UpstreamUrl {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl UpstreamUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => return Err(format!("scheme must be redis or rediss, not {other:?}")),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("missing host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port().unwrap_or(6379);
        let decode = |s: &str| {
            percent_decode(s)
                .map_err(|_| "user or password is not valid percent-encoding".to_string())
        };
        let username = match url.username() {
            "" => None,
            u => Some(decode(u)?),
        };
        let password = url.password().map(decode).transpose()?;
        let path = url.path().trim_start_matches('/');
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<u32>()
                .map_err(|_| format!("database {path:?} is not a number"))?
        };
        Ok(UpstreamUrl {
            host,
            port,
            username,
            password,
            db,
            tls,
        })
    }

    pub fn redacted(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".to_string(),
            (Some(u), None) => format!("{u}@"),
            (None, None) => String::new(),
        };
        format!("{scheme}://{auth}{}:{}/{}", self.host, self.port, self.db)
    }

    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
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

// ---------------------------------------------------------------------------
// File schema: everything optional, so that defaults fill the gaps.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    admin: Option<String>,
    log_format: Option<String>,
    shutdown_grace: Option<String>,
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    cache: FileCache,
    tdengine: Option<FileTdengine>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    max_clients: Option<u64>,
    proto_max_bulk_len: Option<String>,
    max_multibulk_len: Option<u64>,
    client_query_buffer_limit: Option<String>,
    max_pending_per_client: Option<u64>,
    requirepass: Option<String>,
    worker_threads: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    url: Option<String>,
    pool_size: Option<u64>,
    max_pinned: Option<u64>,
    connect_timeout: Option<String>,
    command_timeout: Option<String>,
    reconnect_backoff_max: Option<String>,
    #[serde(default)]
    tls: FileTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCache {
    enabled: Option<bool>,
    max_bytes: Option<String>,
    invalidation: Option<String>,
    configure_upstream: Option<bool>,
    default_ttl: Option<String>,
    feed_health_interval: Option<String>,
    feed_canary: Option<bool>,
    policies: Option<Vec<FilePolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    pattern: String,
    ttl: Option<String>,
    cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTdengine {
    dsn: Option<String>,
    timeout: Option<String>,
    on_error: Option<String>,
    on_invalid_key: Option<String>,
    format: Option<String>,
    max_concurrent_queries: Option<u64>,
    pool_size: Option<u64>,
    negative_ttl: Option<String>,
    breaker_failures: Option<u32>,
    breaker_cooldown: Option<String>,
    #[serde(default)]
    routes: Vec<FileRoute>,
    #[serde(default)]
    tls: FileTdTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTdTls {
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    key: String,
    sql: String,
    ttl: Option<String>,
    #[serde(default)]
    params: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileParam {
    pattern: Option<String>,
    allow: Option<Vec<String>>,
    #[serde(default)]
    quote: bool,
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

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    parse_file(&text)
}

fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // toml's message is multi-line; keep the first line and the key path.
        let msg = e
            .message()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_string();
        let key = e
            .span()
            .and_then(|span| key_at(text, span.start))
            .unwrap_or_else(|| "file".into());
        ConfigError::new(key, msg)
    })
}

/// Best-effort name of the key at a byte offset, for one-line TOML errors.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    let mut section = String::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if l.starts_with('[') {
            section = l.trim_matches(|c| c == '[' || c == ']').to_string();
        }
    }
    if key.is_empty() || key.starts_with('[') {
        return Some(if section.is_empty() {
            "file".into()
        } else {
            section
        });
    }
    Some(if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    })
}

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ConfigError::new(key, format!("{value:?} is not a host:port address")))
}

pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        format!("{value:?} is not a duration ({e}); use e.g. \"250ms\", \"5s\", \"15m\"")
    })
}

fn duration(key: &str, value: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    parse_duration(value.unwrap_or(default)).map_err(|p| ConfigError::new(key, p))
}

/// Parses "512MiB", "1GB", "4096", "64k" into bytes (binary multiples for K/M/G with or without "i").
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("{value:?} is not a size; use e.g. \"256MiB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{value:?} has an unknown unit; use B, KiB, MiB or GiB"
            ))
        }
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("{value:?} is too large"))
}

fn bytes(key: &str, value: Option<&str>, default: &str) -> Result<u64, ConfigError> {
    parse_bytes(value.unwrap_or(default)).map_err(|p| ConfigError::new(key, p))
}

fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(key, format!("{value:?} is not a boolean"))),
    }
}

fn positive(key: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(key, "must be greater than 0")),
        v => Ok(v),
    }
}

fn resolve_server(file: FileServer, env: &dyn Env) -> Result<ServerConfig, ConfigError> {
    let proto_max_bulk_len = bytes(
        "server.proto_max_bulk_len",
        file.proto_max_bulk_len.as_deref(),
        "512MiB",
    )?;
    if proto_max_bulk_len < 1024 * 1024 {
        return Err(ConfigError::new(
            "server.proto_max_bulk_len",
            "must be at least 1MiB (as in Redis)",
        ));
    }
    let requirepass = env
        .get("NEARCACHE_REQUIREPASS")
        .or(file.requirepass)
        .filter(|p| !p.is_empty());
    Ok(ServerConfig {
        max_clients: positive("server.max_clients", file.max_clients, 10_000)? as usize,
        proto_max_bulk_len,
        max_multibulk_len: positive("server.max_multibulk_len", file.max_multibulk_len, 1 << 20)?,
        client_query_buffer_limit: bytes(
            "server.client_query_buffer_limit",
            file.client_query_buffer_limit.as_deref(),
            "1GiB",
        )?,
        max_pending_per_client: positive(
            "server.max_pending_per_client",
            file.max_pending_per_client,
            65_536,
        )? as usize,
        requirepass,
        worker_threads: match env.get("NEARCACHE_WORKER_THREADS") {
            Some(v) => v.parse().map_err(|_| {
                ConfigError::new("NEARCACHE_WORKER_THREADS", format!("{v:?} is not a number"))
            })?,
            None => file.worker_threads.unwrap_or(1) as usize,
        },
    })
}

fn resolve_upstream(
    cli: &Cli,
    env: &dyn Env,
    file: FileUpstream,
) -> Result<UpstreamConfig, ConfigError> {
    // The application's REDIS_* variables describe the same upstream as NEARCACHE_UPSTREAM
    // in pieces; they count as environment, below the flag and above the file.
    let from_parts = if env.get("REDIS_HOST").is_some()
        || env.get("REDIS_PORT").is_some()
        || env.get("REDIS_PASSWORD").is_some()
        || env.get("REDIS_DB").is_some()
        || env.get("REDIS_USE_SSL").is_some()
    {
        let base = file
            .url
            .as_deref()
            .map(|u| UpstreamUrl::parse(u).map_err(|p| ConfigError::new("upstream.url", p)))
            .transpose()?;
        let mut url = base.unwrap_or(UpstreamUrl {
            host: "127.0.0.1".into(),
            port: 6379,
            username: None,
            password: None,
            db: 0,
            tls: false,
        });
        if let Some(h) = env.get("REDIS_HOST") {
            url.host = h;
        }
        if let Some(p) = env.get("REDIS_PORT") {
            url.port = p
                .parse()
                .map_err(|_| ConfigError::new("REDIS_PORT", format!("{p:?} is not a port")))?;
        }
        if let Some(p) = env.get("REDIS_PASSWORD") {
            url.password = Some(p);
        }
        if let Some(d) = env.get("REDIS_DB") {
            url.db = d
                .parse()
                .map_err(|_| ConfigError::new("REDIS_DB", format!("{d:?} is not a number")))?;
        }
        if let Some(s) = env.get("REDIS_USE_SSL") {
            url.tls = parse_bool("REDIS_USE_SSL", &s)?;
        }
        Some(url)
    } else {
        None
    };

    let (key, raw) = if let Some(u) = &cli.upstream {
        ("--upstream", Some(u.clone()))
    } else if let Some(u) = env.get("NEARCACHE_UPSTREAM") {
        ("NEARCACHE_UPSTREAM", Some(u))
    } else {
        ("upstream.url", file.url.clone())
    };
    let mut url = match (raw, from_parts) {
        (Some(raw), parts) if key != "upstream.url" || parts.is_none() => {
            UpstreamUrl::parse(&raw).map_err(|p| ConfigError::new(key, p))?
        }
        (_, Some(parts)) => parts,
        (None, None) => UpstreamUrl::parse("redis://127.0.0.1:6379").expect("default URL"),
        (Some(raw), None) => UpstreamUrl::parse(&raw).map_err(|p| ConfigError::new(key, p))?,
    };
    // A password in REDIS_PASSWORD completes a URL that carries none.
    if url.password.is_none() {
        url.password = env.get("REDIS_PASSWORD");
    }

    let mut tls_file = file.tls;
    for p in [
        &mut tls_file.ca_file,
        &mut tls_file.cert_file,
        &mut tls_file.key_file,
    ] {
        if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            *p = None;
        }
    }
    tls_file.server_name = tls_file.server_name.filter(|s| !s.is_empty());
    let tls = TlsConfig {
        enabled: url.tls,
        ca_file: env
            .get("NEARCACHE_TLS_CA_FILE")
            .map(PathBuf::from)
            .or(tls_file.ca_file),
        cert_file: env
            .get("NEARCACHE_TLS_CERT_FILE")
            .map(PathBuf::from)
            .or(tls_file.cert_file),
        key_file: env
            .get("NEARCACHE_TLS_KEY_FILE")
            .map(PathBuf::from)
            .or(tls_file.key_file),
        server_name: tls_file.server_name,
    };
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(ConfigError::new(
            "upstream.tls.cert_file",
            "cert_file and key_file must be given together",
        ));
    }
    for (k, p) in [
        ("upstream.tls.ca_file", &tls.ca_file),
        ("upstream.tls.cert_file", &tls.cert_file),
        ("upstream.tls.key_file", &tls.key_file),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(ConfigError::new(
                    k,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
    }

    Ok(UpstreamConfig {
        url,
        pool_size: positive("upstream.pool_size", file.pool_size, 2)? as usize,
        max_pinned: positive("upstream.max_pinned", file.max_pinned, 1024)? as usize,
        connect_timeout: duration(
            "upstream.connect_timeout",
            file.connect_timeout.as_deref(),
            "1s",
        )?,
        command_timeout: duration(
            "upstream.command_timeout",
            file.command_timeout.as_deref(),
            "5s",
        )?,
        reconnect_backoff_max: duration(
            "upstream.reconnect_backoff_max",
            file.reconnect_backoff_max.as_deref(),
            "1s",
        )?,
        tls,
    })
}

fn resolve_cache(env: &dyn Env, file: FileCache) -> Result<CacheConfig, ConfigError> {
    let enabled = match env.get("ENABLE_REDIS_CACHE") {
        Some(v) => parse_bool("ENABLE_REDIS_CACHE", &v)?,
        None => file.enabled.unwrap_or(true),
    };
    let invalidation = match file.invalidation.as_deref().unwrap_or("auto") {
        "auto" => InvalidationMode::Auto,
        "keyspace" => InvalidationMode::Keyspace,
        "tracking" => InvalidationMode::Tracking,
        other => {
            return Err(ConfigError::new(
                "cache.invalidation",
                format!("must be \"auto\", \"keyspace\" or \"tracking\", not {other:?}"),
            ))
        }
    };
    let policies = match file.policies {
        None => default_policies(),
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let key = format!("cache.policies[{i}]");
                if p.pattern.is_empty() {
                    return Err(ConfigError::new(
                        format!("{key}.pattern"),
                        "must not be empty",
                    ));
                }
                let ttl = if p.cache == Some(false) {
                    None
                } else {
                    let raw = p.ttl.as_deref().ok_or_else(|| {
                        ConfigError::new(format!("{key}.ttl"), "required unless cache = false")
                    })?;
                    let ttl = parse_duration(raw)
                        .map_err(|e| ConfigError::new(format!("{key}.ttl"), e))?;
                    if ttl.is_zero() {
                        return Err(ConfigError::new(
                            format!("{key}.ttl"),
                            "must be greater than 0",
                        ));
                    }
                    Some(ttl)
                };
                Ok(Policy {
                    pattern: p.pattern,
                    ttl,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let default_ttl = match file.default_ttl.as_deref() {
        None | Some("") | Some("0") | Some("off") => None,
        Some(raw) => {
            let d = parse_duration(raw).map_err(|e| ConfigError::new("cache.default_ttl", e))?;
            (!d.is_zero()).then_some(d)
        }
    };
    let max_bytes = bytes("cache.max_bytes", file.max_bytes.as_deref(), "256MiB")?;
    if max_bytes == 0 {
        return Err(ConfigError::new(
            "cache.max_bytes",
            "must be greater than 0",
        ));
    }
    Ok(CacheConfig {
        enabled,
        max_bytes,
        invalidation,
        configure_upstream: file.configure_upstream.unwrap_or(false),
        default_ttl,
        policies,
        feed_health_interval: duration(
            "cache.feed_health_interval",
            file.feed_health_interval.as_deref(),
            "1s",
        )?,
        feed_canary: file.feed_canary.unwrap_or(true),
    })
}

fn resolve_tdengine(
    env: &dyn Env,
    file: Option<FileTdengine>,
) -> Result<Option<TdengineConfig>, ConfigError> {
    let Some(file) = file else {
        return Ok(None);
    };
    let dsn = env
        .get("TDENGINE_DSN")
        .or(file.dsn)
        .ok_or_else(|| ConfigError::new("tdengine.dsn", "required (or set TDENGINE_DSN)"))?;
    const SCHEMES: [&str; 5] = ["taos+ws://", "taos+wss://", "taosws://", "ws://", "wss://"];
    if !SCHEMES.iter().any(|s| dsn.starts_with(s)) {
        return Err(ConfigError::new(
            "tdengine.dsn",
            "must be a WebSocket DSN such as taos+ws://user:pass@host:6041/db (or taos+wss:// for TLS)",
        ));
    }
    let tls = TdTlsConfig {
        ca_file: file.tls.ca_file.filter(|p| !p.as_os_str().is_empty()),
        server_name: file.tls.server_name.filter(|s| !s.is_empty()),
    };
    if let Some(p) = &tls.ca_file {
        if !p.is_file() {
            return Err(ConfigError::new(
                "tdengine.tls.ca_file",
                format!("{} is not a readable file", p.display()),
            ));
        }
    }
    let on = |key: &str, v: Option<&str>, default: &str| match v.unwrap_or(default) {
        "error" => Ok(TdOnError::Error),
        "nil" => Ok(TdOnError::Nil),
        other => Err(ConfigError::new(
            key,
            format!("must be \"error\" or \"nil\", not {other:?}"),
        )),
    };
    let format = match file.format.as_deref().unwrap_or("json") {
        "json" => TdFormat::Json,
        "msgpack" => TdFormat::Msgpack,
        other => {
            return Err(ConfigError::new(
                "tdengine.format",
                format!("must be \"json\" or \"msgpack\", not {other:?}"),
            ))
        }
    };
    let mut routes = Vec::new();
    for (i, r) in file.routes.into_iter().enumerate() {
        let key = format!("tdengine.routes[{i}]");
        let ttl = duration(&format!("{key}.ttl"), r.ttl.as_deref(), "15m")?;
        let mut params = Vec::new();
        for (name, value) in r.params {
            let pkey = format!("{key}.params.{name}");
            let p: FileParam = value
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::new(&pkey, e.message().to_string()))?;
            if p.pattern.is_none() && p.allow.is_none() {
                return Err(ConfigError::new(&pkey, "needs a pattern or an allow list"));
            }
            params.push((
                name,
                TdParam {
                    pattern: p.pattern,
                    allow: p.allow,
                    quote: p.quote,
                },
            ));
        }
        routes.push(TdRoute {
            key: r.key,
            sql: r.sql,
            ttl,
            params,
        });
    }
    let negative_ttl = match file.negative_ttl.as_deref() {
        None | Some("") | Some("0") | Some("off") => None,
        Some(raw) => {
            Some(parse_duration(raw).map_err(|e| ConfigError::new("tdengine.negative_ttl", e))?)
        }
    };
    Ok(Some(TdengineConfig {
        dsn,
        timeout: duration("tdengine.timeout", file.timeout.as_deref(), "2s")?,
        on_error: on("tdengine.on_error", file.on_error.as_deref(), "error")?,
        on_invalid_key: on(
            "tdengine.on_invalid_key",
            file.on_invalid_key.as_deref(),
            "nil",
        )?,
        format,
        max_concurrent_queries: positive(
            "tdengine.max_concurrent_queries",
            file.max_concurrent_queries,
            16,
        )? as usize,
        pool_size: positive("tdengine.pool_size", file.pool_size, 4)? as usize,
        negative_ttl,
        breaker_failures: file.breaker_failures.unwrap_or(5).max(1),
        breaker_cooldown: duration(
            "tdengine.breaker_cooldown",
            file.breaker_cooldown.as_deref(),
            "5s",
        )?,
        routes,
        tls,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6380");
        assert_eq!(c.admin.unwrap().to_string(), "127.0.0.1:9121");
        assert_eq!(c.upstream.url.address(), "127.0.0.1:6379");
        assert_eq!(c.server.proto_max_bulk_len, 512 << 20);
        assert_eq!(c.cache.max_bytes, 256 << 20);
        assert_eq!(c.cache.policies.len(), 4);
        assert!(c.tdengine.is_none());
    }

    #[test]
    fn shipped_conf_file_states_the_defaults() {
        let shipped = Config::from_toml(include_str!("../conf/nearcache.toml")).unwrap();
        let d = Config::defaults();
        assert_eq!(shipped.listen, d.listen);
        assert_eq!(shipped.admin, d.admin);
        assert_eq!(shipped.shutdown_grace, d.shutdown_grace);
        assert_eq!(shipped.server.max_clients, d.server.max_clients);
        assert_eq!(
            shipped.server.proto_max_bulk_len,
            d.server.proto_max_bulk_len
        );
        assert_eq!(
            shipped.server.client_query_buffer_limit,
            d.server.client_query_buffer_limit
        );
        assert_eq!(shipped.server.worker_threads, d.server.worker_threads);
        assert_eq!(shipped.upstream.url, d.upstream.url);
        assert_eq!(shipped.upstream.pool_size, d.upstream.pool_size);
        assert_eq!(shipped.upstream.command_timeout, d.upstream.command_timeout);
        assert_eq!(shipped.cache.max_bytes, d.cache.max_bytes);
        assert_eq!(shipped.cache.invalidation, d.cache.invalidation);
        assert_eq!(shipped.cache.default_ttl, d.cache.default_ttl);
        let pats = |c: &Config| {
            c.cache
                .policies
                .iter()
                .map(|p| (p.pattern.clone(), p.ttl))
                .collect::<Vec<_>>()
        };
        assert_eq!(pats(&shipped), pats(&d));
        assert!(shipped.tdengine.is_none());
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let dir = std::env::temp_dir().join(format!("nc-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1111\"\n[upstream]\nurl = \"redis://file:1\"\n",
        )
        .unwrap();
        let env = [
            ("NEARCACHE_LISTEN", "127.0.0.1:2222"),
            ("NEARCACHE_UPSTREAM", "redis://env:2"),
        ];
        let cli = Cli {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = Config::resolve(&cli, &env).unwrap();
        assert_eq!(c.listen.port(), 2222);
        assert_eq!(c.upstream.url.host, "env");
        let cli = Cli {
            config: Some(path),
            listen: Some("127.0.0.1:3333".into()),
            upstream: Some("redis://flag:3/4".into()),
            ..Default::default()
        };
        let c = Config::resolve(&cli, &env).unwrap();
        assert_eq!(c.listen.port(), 3333);
        assert_eq!(
            (c.upstream.url.host.as_str(), c.upstream.url.db),
            ("flag", 4)
        );
    }

    #[test]
    fn application_redis_variables_build_the_upstream() {
        let env = [
            ("REDIS_HOST", "redis.internal"),
            ("REDIS_PORT", "6390"),
            ("REDIS_PASSWORD", "s3cret"),
            ("REDIS_DB", "2"),
            ("ENABLE_REDIS_CACHE", "False"),
        ];
        let c = Config::resolve(&Cli::default(), &env).unwrap();
        assert_eq!(c.upstream.url.address(), "redis.internal:6390");
        assert_eq!(c.upstream.url.password.as_deref(), Some("s3cret"));
        assert_eq!(c.upstream.url.db, 2);
        assert!(!c.cache.enabled);
        assert!(!format!("{:?}", c.upstream.url).contains("s3cret"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[cache]\nmax_bytes = \"lots\"\n").unwrap_err();
        assert_eq!(e.key, "cache.max_bytes");
        let e = Config::from_toml("[upstream]\nurl = \"http://x\"\n").unwrap_err();
        assert_eq!(e.key, "upstream.url");
        let e = Config::from_toml("[cache]\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::from_toml("[[cache.policies]]\npattern = \"a*\"\n").unwrap_err();
        assert_eq!(e.key, "cache.policies[0].ttl");
        let e = Config::from_toml("[upstream]\npool_size = 0\n").unwrap_err();
        assert_eq!(e.key, "upstream.pool_size");
    }

    #[test]
    fn tdengine_tls_dsn_and_keys() {
        let c = Config::from_toml(
            "[tdengine]\ndsn = \"taos+wss://root:taosdata@td.example:443/market\"\n\
             [tdengine.tls]\nserver_name = \"td.internal\"\n",
        )
        .unwrap();
        let td = c.tdengine.unwrap();
        assert_eq!(td.dsn, "taos+wss://root:taosdata@td.example:443/market");
        assert_eq!(td.tls.server_name.as_deref(), Some("td.internal"));
        assert_eq!(td.tls.ca_file, None);
        let c = Config::from_toml("[tdengine]\ndsn = \"wss://td.example/market\"\n").unwrap();
        assert!(c.tdengine.is_some());
        let e = Config::from_toml(
            "[tdengine]\ndsn = \"wss://td.example/market\"\n[tdengine.tls]\nca_file = \"/nonexistent/ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "tdengine.tls.ca_file");
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = Config::from_toml("[tdengine]\ndsn = \"https://td.example/market\"\n").unwrap_err();
        assert_eq!(e.key, "tdengine.dsn");
        let e = Config::from_toml("[tdengine.tls]\nverify = false\n").unwrap_err();
        assert!(e.to_string().contains("verify"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1gb").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12XB").is_err());
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn url_forms() {
        let u = UpstreamUrl::parse("rediss://app:p%40ss@[::1]:7000/3").unwrap();
        assert!(u.tls);
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.address(), "[::1]:7000");
        assert_eq!(u.db, 3);
        assert!(UpstreamUrl::parse("redis://h/x").is_err());
    }
}
