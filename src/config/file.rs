//! The TOML file's schema (every key optional, so defaults fill the gaps)
//! and reading it with errors that name the offending key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

// ---------------------------------------------------------------------------
// File schema: everything optional, so that defaults fill the gaps.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub log_format: Option<String>,
    pub shutdown_grace: Option<String>,
    #[serde(default)]
    pub server: FileServer,
    #[serde(default)]
    pub upstream: FileUpstream,
    #[serde(default)]
    pub cache: FileCache,
    pub tdengine: Option<FileTdengine>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileServer {
    pub max_clients: Option<u64>,
    pub proto_max_bulk_len: Option<String>,
    pub max_multibulk_len: Option<u64>,
    pub client_query_buffer_limit: Option<String>,
    pub max_pending_per_client: Option<u64>,
    pub client_output_limit: Option<String>,
    pub requirepass: Option<String>,
    pub worker_threads: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    pub url: Option<String>,
    pub pool_size: Option<u64>,
    pub max_pinned: Option<u64>,
    pub connect_timeout: Option<String>,
    pub command_timeout: Option<String>,
    pub reconnect_backoff_max: Option<String>,
    #[serde(default)]
    pub tls: FileTls,
    #[serde(default)]
    pub sentinel: FileSentinel,
    #[serde(default)]
    pub cluster: FileCluster,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSentinel {
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCluster {
    pub refresh_interval: Option<String>,
    pub replica_reads: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCache {
    pub enabled: Option<bool>,
    pub max_bytes: Option<String>,
    pub invalidation: Option<String>,
    pub configure_upstream: Option<bool>,
    pub default_ttl: Option<String>,
    pub feed_health_interval: Option<String>,
    pub feed_canary: Option<bool>,
    pub policies: Option<Vec<FilePolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePolicy {
    pub pattern: String,
    pub ttl: Option<String>,
    pub cache: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTdengine {
    pub dsn: Option<String>,
    pub timeout: Option<String>,
    pub on_error: Option<String>,
    pub on_invalid_key: Option<String>,
    pub format: Option<String>,
    pub max_concurrent_queries: Option<u64>,
    pub pool_size: Option<u64>,
    pub negative_ttl: Option<String>,
    pub breaker_failures: Option<u32>,
    pub breaker_cooldown: Option<String>,
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    #[serde(default)]
    pub tls: FileTdTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTdTls {
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub key: String,
    pub sql: String,
    pub ttl: Option<String>,
    #[serde(default)]
    pub params: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileParam {
    pub pattern: Option<String>,
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub quote: bool,
}

pub(super) fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
    })?;
    parse_file(&text)
}

pub(super) fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
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
