//! Redis Cluster upstream URLs:
//! `redis-cluster://[user:pass@]host1:port,host2:port[/0][?options]` and
//! `rediss-cluster://...` for TLS. The hosts are seed nodes: any reachable
//! one tells nearcache the whole topology, so a list with some nodes down
//! still starts. Options (also settable under `[upstream.cluster]`):
//! `refresh_interval=<duration>`, `replica_reads=<bool>`.

use std::time::Duration;

use super::url::{node_address, split_host_port, split_userinfo, UpstreamUrl};

/// The seed nodes of a Redis Cluster and the options given in its URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSeeds {
    /// `(host, port)`, in the order given.
    pub seeds: Vec<(String, u16)>,
    pub refresh_interval: Option<Duration>,
    pub replica_reads: Option<bool>,
}

impl ClusterSeeds {
    /// Each seed as `host:port` (`[v6]:port`).
    pub fn addresses(&self) -> Vec<String> {
        self.seeds
            .iter()
            .map(|(h, p)| node_address(h, *p))
            .collect()
    }
}

/// Parses a cluster URL; `Ok(None)` when `raw` has another scheme.
pub(super) fn parse(raw: &str) -> Result<Option<UpstreamUrl>, String> {
    let (tls, rest) = if let Some(r) = raw.strip_prefix("redis-cluster://") {
        (false, r)
    } else if let Some(r) = raw.strip_prefix("rediss-cluster://") {
        (true, r)
    } else {
        return Ok(None);
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, p),
        None => (rest, ""),
    };
    if !(path.is_empty() || path == "0") {
        return Err(format!(
            "database {path:?}: a Redis Cluster has database 0 only"
        ));
    }
    let (username, password, hosts) = split_userinfo(authority)?;
    let mut seeds = Vec::new();
    for h in hosts.split(',') {
        let h = h.trim();
        if h.is_empty() {
            continue;
        }
        seeds.push(split_host_port(h, 6379, "seed")?);
    }
    if seeds.is_empty() {
        return Err("missing host: give at least one seed node (host:port,host:port)".into());
    }
    let mut refresh_interval = None;
    let mut replica_reads = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "refresh_interval" => {
                let d = humantime::parse_duration(v)
                    .map_err(|e| format!("refresh_interval {v:?} is not a duration ({e})"))?;
                if d.is_zero() {
                    return Err("refresh_interval must be greater than 0".into());
                }
                refresh_interval = Some(d);
            }
            "replica_reads" => {
                replica_reads = Some(match v {
                    "1" | "true" | "yes" | "on" => true,
                    "0" | "false" | "no" | "off" => false,
                    _ => return Err(format!("replica_reads {v:?} is not a boolean")),
                })
            }
            other => {
                return Err(format!(
                    "unknown option {other:?} (refresh_interval, replica_reads)"
                ))
            }
        }
    }
    let (host, port) = seeds[0].clone();
    Ok(Some(UpstreamUrl {
        host,
        port,
        username,
        password,
        db: 0,
        tls,
        sentinel: None,
        cluster: Some(ClusterSeeds {
            seeds,
            refresh_interval,
            replica_reads,
        }),
    }))
}

pub(super) fn redacted(url: &UpstreamUrl, c: &ClusterSeeds) -> String {
    let scheme = if url.tls {
        "rediss-cluster"
    } else {
        "redis-cluster"
    };
    format!(
        "{scheme}://{}{}",
        url.redacted_auth(),
        c.addresses().join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls() {
        let u = UpstreamUrl::parse(
            "redis-cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,node4",
        )
        .unwrap();
        let c = u.cluster.clone().unwrap();
        assert_eq!(
            c.addresses(),
            vec!["10.0.0.1:7000", "10.0.0.2:7001", "[::1]:7002", "node4:6379"]
        );
        assert_eq!((u.host.as_str(), u.port), ("10.0.0.1", 7000));
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("s@cret"));
        assert!(!u.tls);
        assert_eq!(
            u.redacted(),
            "redis-cluster://app:***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,node4:6379"
        );
        assert!(!format!("{u:?}").contains("s@cret"));

        let u =
            UpstreamUrl::parse("rediss-cluster://:pw@h:1/0?refresh_interval=2s&replica_reads=true")
                .unwrap();
        assert!(u.tls);
        assert_eq!(u.password.as_deref(), Some("pw"));
        let c = u.cluster.unwrap();
        assert_eq!(c.refresh_interval, Some(Duration::from_secs(2)));
        assert_eq!(c.replica_reads, Some(true));

        for bad in [
            "redis-cluster://",
            "redis-cluster://h:1/3",
            "redis-cluster://h:x",
            "redis-cluster://h:1?bogus=1",
            "redis-cluster://h:1?refresh_interval=0s",
            "redis-cluster://h:1?replica_reads=maybe",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
        // A plain URL is not a cluster.
        assert!(UpstreamUrl::parse("redis://h:1").unwrap().cluster.is_none());
    }
}
