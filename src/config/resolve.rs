//! From file, environment and flags to validated values, one key at a time:
//! every rejection names its key.

use std::net::SocketAddr;
use std::time::Duration;

use super::file::*;
use super::*;

pub(super) fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
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

pub(super) fn duration(
    key: &str,
    value: Option<&str>,
    default: &str,
) -> Result<Duration, ConfigError> {
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

pub(super) fn bytes(key: &str, value: Option<&str>, default: &str) -> Result<u64, ConfigError> {
    parse_bytes(value.unwrap_or(default)).map_err(|p| ConfigError::new(key, p))
}

pub(super) fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(key, format!("{value:?} is not a boolean"))),
    }
}

pub(super) fn positive(key: &str, value: Option<u64>, default: u64) -> Result<u64, ConfigError> {
    match value.unwrap_or(default) {
        0 => Err(ConfigError::new(key, "must be greater than 0")),
        v => Ok(v),
    }
}

/// Redis's defaults for pub/sub; ordinary clients get a hard limit where
/// Redis has none, as a sidecar must not grow without bound for one client
/// that stopped reading.
pub const DEFAULT_OUTPUT_LIMITS: &str = "normal 256MiB 64MiB 60s pubsub 32MiB 8MiB 60s";

/// Parses `"<class> <hard> <soft> <soft seconds> ..."` as Redis's
/// `client-output-buffer-limit` (classes `normal` and `pubsub`; sizes as
/// elsewhere, `0` for none; the time in seconds or with a unit). A class
/// not named keeps its default.
pub fn parse_output_limits(value: &str) -> Result<OutputLimits, String> {
    const MIB: u64 = 1024 * 1024;
    let minute = Duration::from_secs(60);
    let defaults = OutputLimits {
        normal: OutputLimit {
            hard: 256 * MIB,
            soft: 64 * MIB,
            soft_for: minute,
        },
        pubsub: OutputLimit {
            hard: 32 * MIB,
            soft: 8 * MIB,
            soft_for: minute,
        },
    };
    parse_classes(value, defaults)
}

fn parse_classes(value: &str, mut limits: OutputLimits) -> Result<OutputLimits, String> {
    let words: Vec<&str> = value.split_whitespace().collect();
    if words.is_empty() || words.len() % 4 != 0 {
        return Err(format!(
            "{value:?}: expected \"<class> <hard> <soft> <seconds>\" groups, e.g. \"{DEFAULT_OUTPUT_LIMITS}\""
        ));
    }
    for group in words.chunks(4) {
        let seconds = match group[3].parse::<u64>() {
            Ok(s) => Duration::from_secs(s),
            Err(_) => parse_duration(group[3])?,
        };
        let limit = OutputLimit {
            hard: parse_bytes(group[1])?,
            soft: parse_bytes(group[2])?,
            soft_for: seconds,
        };
        match group[0].to_ascii_lowercase().as_str() {
            "normal" => limits.normal = limit,
            "pubsub" => limits.pubsub = limit,
            other => {
                return Err(format!(
                    "unknown client class {other:?} (nearcache has \"normal\" and \"pubsub\")"
                ))
            }
        }
    }
    Ok(limits)
}

pub(super) fn resolve_server(file: FileServer, env: &dyn Env) -> Result<ServerConfig, ConfigError> {
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
        client_output_limit: parse_output_limits(
            file.client_output_limit
                .as_deref()
                .unwrap_or(DEFAULT_OUTPUT_LIMITS),
        )
        .map_err(|p| ConfigError::new("server.client_output_limit", p))?,
        requirepass,
        worker_threads: match env.get("NEARCACHE_WORKER_THREADS") {
            Some(v) => v.parse().map_err(|_| {
                ConfigError::new("NEARCACHE_WORKER_THREADS", format!("{v:?} is not a number"))
            })?,
            None => file.worker_threads.unwrap_or(1) as usize,
        },
    })
}

pub(super) fn resolve_upstream(
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
            sentinel: None,
            cluster: None,
        });
        // REDIS_HOST and REDIS_PORT name one Redis: they replace a file's
        // Sentinels (a port completing a Sentinel's host would be nonsense).
        if url.sentinel.is_some()
            && (env.get("REDIS_HOST").is_some() || env.get("REDIS_PORT").is_some())
        {
            url.sentinel = None;
            url.host = "127.0.0.1".into();
            url.port = 6379;
        }
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

    let sentinel = resolve_sentinel(env, file.sentinel)?;

    let seeds = url.cluster.clone();
    let cluster = ClusterConfig {
        refresh_interval: match seeds.as_ref().and_then(|s| s.refresh_interval) {
            Some(d) => d,
            None => {
                let d = duration(
                    "upstream.cluster.refresh_interval",
                    file.cluster.refresh_interval.as_deref(),
                    "5s",
                )?;
                if d.is_zero() {
                    return Err(ConfigError::new(
                        "upstream.cluster.refresh_interval",
                        "must be greater than 0",
                    ));
                }
                d
            }
        },
        replica_reads: seeds
            .as_ref()
            .and_then(|s| s.replica_reads)
            .or(file.cluster.replica_reads)
            .unwrap_or(false),
    };
    Ok(UpstreamConfig {
        url,
        sentinel,
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
        cluster,
    })
}

/// `[upstream.sentinel]`: the Sentinels' own credentials (the URL's are the
/// master's) and how long one Sentinel may take to answer.
fn resolve_sentinel(env: &dyn Env, file: FileSentinel) -> Result<SentinelConfig, ConfigError> {
    let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
    let username = nonempty(env.get("NEARCACHE_SENTINEL_USERNAME").or(file.username));
    let password = nonempty(env.get("NEARCACHE_SENTINEL_PASSWORD").or(file.password));
    if username.is_some() && password.is_none() {
        return Err(ConfigError::new(
            "upstream.sentinel.username",
            "needs upstream.sentinel.password (or NEARCACHE_SENTINEL_PASSWORD)",
        ));
    }
    let timeout = duration(
        "upstream.sentinel.timeout",
        file.timeout.as_deref(),
        "300ms",
    )?;
    if timeout.is_zero() {
        return Err(ConfigError::new(
            "upstream.sentinel.timeout",
            "must be greater than 0",
        ));
    }
    Ok(SentinelConfig {
        username,
        password,
        timeout,
    })
}

pub(super) fn resolve_cache(env: &dyn Env, file: FileCache) -> Result<CacheConfig, ConfigError> {
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

pub(super) fn resolve_tdengine(
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
