//! The upstream's address: `redis://[user:pass@]host:port[/db]` or `rediss://`;
//! the Sentinels that know it: `redis-sentinel://[user:pass@]host[:port][,host[:port]...]/master[/db]`
//! (`rediss-sentinel://` for TLS); or a Redis Cluster's seed nodes as
//! `redis-cluster://[user:pass@]host1:port,host2:port[?options]` (or
//! `rediss-cluster://`), parsed in `cluster_url`.

use super::cluster_url as cluster;

pub use cluster::ClusterSeeds;

/// A parsed `redis://`, `rediss://`, `redis-sentinel://` or `rediss-sentinel://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// The Redis server; with `sentinel`, the first Sentinel (the master's
    /// address is asked for, never configured).
    pub host: String,
    pub port: u16,
    /// The master's user and password (in a Sentinel URL too: the Sentinels'
    /// own are `upstream.sentinel.username` and `password`).
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    pub tls: bool,
    /// Set for `redis-sentinel://`: the master is found through these Sentinels.
    pub sentinel: Option<SentinelUrl>,
    /// A Redis Cluster: every seed node (`host`/`port` are the first).
    pub cluster: Option<ClusterSeeds>,
}

/// The Sentinel part of a `redis-sentinel://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `host:port` of each Sentinel, in the order given (IPv6 in brackets).
    pub sentinels: Vec<String>,
    /// The name the Sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub master_name: String,
}

/// Sentinel's own port, used when a Sentinel is given without one.
pub const SENTINEL_PORT: u16 = 26379;

impl std::fmt::Debug for UpstreamUrl {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

impl UpstreamUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if let Some(rest) = raw.strip_prefix("redis-sentinel://") {
            return parse_sentinel(rest, false);
        }
        if let Some(rest) = raw.strip_prefix("rediss-sentinel://") {
            return parse_sentinel(rest, true);
        }
        if let Some(url) = cluster::parse(raw)? {
            return Ok(url);
        }
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        let tls = match url.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(format!(
                    "scheme must be redis, rediss, redis-sentinel, rediss-sentinel, redis-cluster or rediss-cluster, not {other:?}"
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
            sentinel: None,
            cluster: None,
        })
    }

    pub fn redacted(&self) -> String {
        if let Some(c) = &self.cluster {
            return cluster::redacted(self, c);
        }
        let auth = self.redacted_auth();
        if let Some(s) = &self.sentinel {
            let scheme = if self.tls {
                "rediss-sentinel"
            } else {
                "redis-sentinel"
            };
            return format!(
                "{scheme}://{auth}{}/{}/{}",
                s.sentinels.join(","),
                s.master_name,
                self.db
            );
        }
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{auth}{}:{}/{}", self.host, self.port, self.db)
    }

    pub fn address(&self) -> String {
        node_address(&self.host, self.port)
    }

    /// `user:***@` (or what of it is set) for a printable URL.
    pub(super) fn redacted_auth(&self) -> String {
        match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".to_string(),
            (Some(u), None) => format!("{u}@"),
            (None, None) => String::new(),
        }
    }
}

/// `host:port`, or `[host]:port` for an IPv6 host.
pub fn node_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits `[user[:pass]@]hosts` into the percent-decoded user (none when
/// empty), password and the hosts.
pub(super) fn split_userinfo(
    authority: &str,
) -> Result<(Option<String>, Option<String>, &str), String> {
    let Some((userinfo, hosts)) = authority.rsplit_once('@') else {
        return Ok((None, None, authority));
    };
    let decode = |s: &str| {
        percent_decode(s).map_err(|_| "user or password is not valid percent-encoding".to_string())
    };
    let (user, pass) = match userinfo.split_once(':') {
        Some((user, pass)) => (user, Some(pass)),
        None => (userinfo, None),
    };
    let user = (!user.is_empty()).then(|| decode(user)).transpose()?;
    Ok((user, pass.map(decode).transpose()?, hosts))
}

/// `[user:pass@]host[:port][,host[:port]...]/master[/db]`: the url crate
/// takes one host only, so the Sentinel form is read here.
fn parse_sentinel(rest: &str, tls: bool) -> Result<UpstreamUrl, String> {
    if rest.contains(['?', '#']) {
        return Err("a redis-sentinel URL takes no query or fragment".into());
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (username, password, hosts) = split_userinfo(authority)?;
    let mut sentinels = Vec::new();
    let mut first = None;
    for h in hosts.split(',') {
        let (host, port) = split_host_port(h, SENTINEL_PORT, "Sentinel")?;
        first.get_or_insert((host.clone(), port));
        sentinels.push(node_address(&host, port));
    }
    let (host, port) = first.ok_or("missing Sentinel hosts")?;
    let mut parts = path.split('/');
    let master_name = parts.next().unwrap_or_default();
    if master_name.is_empty() {
        return Err(
            "missing the master's name: redis-sentinel://host:26379[,host:26379...]/<master name>[/db]"
                .into(),
        );
    }
    let master_name = percent_decode(master_name)
        .map_err(|_| "the master's name is not valid percent-encoding")?;
    let db = match parts.next() {
        None | Some("") => 0,
        Some(d) => d
            .parse::<u32>()
            .map_err(|_| format!("database {d:?} is not a number"))?,
    };
    if parts.any(|p| !p.is_empty()) {
        return Err("too many path segments: expected /<master name>[/db]".into());
    }
    Ok(UpstreamUrl {
        host,
        port,
        username,
        password,
        db,
        tls,
        sentinel: Some(SentinelUrl {
            sentinels,
            master_name,
        }),
        cluster: None,
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, with `default_port` when
/// none is given (Sentinel URLs and Redis Cluster seed lists); `what` names
/// the host in errors.
pub(super) fn split_host_port(
    h: &str,
    default_port: u16,
    what: &str,
) -> Result<(String, u16), String> {
    let bad = || format!("{h:?} is not a host[:port]");
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match h.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (h, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(if h.is_empty() {
            format!("empty {what} host (check the commas)")
        } else {
            bad()
        });
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port"))?,
    };
    Ok((host.to_string(), port))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls() {
        let u = UpstreamUrl::parse(
            "redis-sentinel://app:p%40ss@s1:26380,s2,[::1]:26381,10.0.0.4/my%2Dmaster/3",
        )
        .unwrap();
        let s = u.sentinel.as_ref().unwrap();
        assert_eq!(
            s.sentinels,
            ["s1:26380", "s2:26379", "[::1]:26381", "10.0.0.4:26379"]
        );
        assert_eq!(s.master_name, "my-master");
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.db, u.tls),
            (Some("app"), Some("p@ss"), 3, false)
        );
        assert_eq!((u.host.as_str(), u.port), ("s1", 26380));
        assert_eq!(
            u.redacted(),
            "redis-sentinel://app:***@s1:26380,s2:26379,[::1]:26381,10.0.0.4:26379/my-master/3"
        );
        assert!(!format!("{u:?}").contains("p@ss"));

        let u = UpstreamUrl::parse("rediss-sentinel://:pw@h/mymaster").unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.username, u.password.as_deref(), u.db),
            (None, Some("pw"), 0)
        );
        let u = UpstreamUrl::parse("redis-sentinel://h:1/m/").unwrap();
        assert_eq!(u.sentinel.unwrap().master_name, "m");
        // A plain URL has no Sentinel part.
        assert!(UpstreamUrl::parse("redis://h:1")
            .unwrap()
            .sentinel
            .is_none());
    }

    #[test]
    fn bad_sentinel_urls_say_why() {
        for (raw, why) in [
            ("redis-sentinel://h1,h2", "missing the master's name"),
            ("redis-sentinel://h1,h2/", "missing the master's name"),
            ("redis-sentinel:///m", "empty Sentinel host"),
            ("redis-sentinel://h1,,h2/m", "empty Sentinel host"),
            ("redis-sentinel://h1:x/m", "is not a port"),
            ("redis-sentinel://h1:0/m", "is not a port"),
            ("redis-sentinel://h1/m/x", "is not a number"),
            ("redis-sentinel://h1/m/1/2", "too many path segments"),
            ("redis-sentinel://[::1/m", "is not a host[:port]"),
            ("redis-sentinel://h1/m?db=1", "no query"),
            ("redis-sentinel://u:%zz@h1/m", "percent-encoding"),
            ("sentinel://h1/m", "scheme must be"),
        ] {
            let e = UpstreamUrl::parse(raw).unwrap_err();
            assert!(e.contains(why), "{raw}: {e}");
        }
    }
}
