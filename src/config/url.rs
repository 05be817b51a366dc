//! The upstream's address: `redis://[user:pass@]host:port[/db]` or
//! `rediss://`; a Redis Cluster's seed nodes as
//! `redis-cluster://[user:pass@]host1:port,host2:port[?options]` (or
//! `rediss-cluster://`), parsed in `cluster_url`.

use super::cluster_url as cluster;

pub use cluster::ClusterSeeds;

/// A parsed `redis://` or `rediss://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    pub tls: bool,
    /// A Redis Cluster: every seed node (`host`/`port` are the first).
    pub cluster: Option<ClusterSeeds>,
}

impl std::fmt::Debug for UpstreamUrl {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl UpstreamUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(url) = cluster::parse(raw)? {
            return Ok(url);
        }
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(format!(
                    "scheme must be redis, rediss, redis-cluster or rediss-cluster, not {other:?}"
                ))
            }
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
            cluster: None,
        })
    }

    pub fn redacted(&self) -> String {
        if let Some(c) = &self.cluster {
            return cluster::redacted(self, c);
        }
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

pub(super) fn percent_decode(s: &str) -> Result<String, ()> {
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
