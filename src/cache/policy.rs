//! Key policies (which keys L1 may hold, and for how long) and the
//! signature that tells one cached reply of a key from another.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::command::{glob_match, literal_prefix};
use crate::config::CacheConfig;
use crate::metrics;

/// A cache policy resolved for a key.
#[derive(Clone, Copy, Debug)]
pub struct PolicyRef {
    pub index: usize,
    pub ttl: Duration,
}

pub(super) struct CompiledPolicy {
    pub pattern: Bytes,
    /// `prefix*` patterns (the common form) match by a prefix comparison.
    prefix: Option<Bytes>,
    pub ttl: Option<Duration>,
    pub hits: prometheus::IntCounter,
    pub misses: prometheus::IntCounter,
}

pub(super) struct Policies {
    list: Vec<CompiledPolicy>,
    default_ttl: Option<Duration>,
    /// Counters of keys that match no pattern (the default TTL).
    other_hits: prometheus::IntCounter,
    other_misses: prometheus::IntCounter,
}

impl Policies {
    pub fn compile(config: &CacheConfig) -> Policies {
        let m = metrics::get();
        Policies {
            list: config
                .policies
                .iter()
                .map(|p| CompiledPolicy {
                    pattern: Bytes::copy_from_slice(p.pattern.as_bytes()),
                    prefix: p
                        .pattern
                        .strip_suffix('*')
                        .filter(|pre| literal_prefix(pre.as_bytes()).len() == pre.len())
                        .map(|pre| Bytes::copy_from_slice(pre.as_bytes())),
                    ttl: p.ttl,
                    hits: m.cache_hits_total.with_label_values(&[&p.pattern]),
                    misses: m.cache_misses_total.with_label_values(&[&p.pattern]),
                })
                .collect(),
            default_ttl: config.default_ttl,
            other_hits: m.cache_hits_total.with_label_values(&["other"]),
            other_misses: m.cache_misses_total.with_label_values(&["other"]),
        }
    }

    /// The first policy whose pattern matches; `None` if the key may not be cached.
    pub fn lookup(&self, key: &[u8]) -> Option<PolicyRef> {
        for (index, p) in self.list.iter().enumerate() {
            let matched = match &p.prefix {
                Some(prefix) => key.starts_with(prefix),
                None => glob_match(&p.pattern, key),
            };
            if matched {
                return p.ttl.map(|ttl| PolicyRef { index, ttl });
            }
        }
        self.default_ttl.map(|ttl| PolicyRef {
            index: usize::MAX,
            ttl,
        })
    }

    pub fn count(&self, policy: PolicyRef, hit: bool) {
        match (self.list.get(policy.index), hit) {
            (Some(p), true) => p.hits.inc(),
            (Some(p), false) => p.misses.inc(),
            (None, true) => self.other_hits.inc(),
            (None, false) => self.other_misses.inc(),
        }
    }

    /// Patterns of the policies that cache (for the feed's subscriptions).
    pub fn cached_patterns(&self) -> Vec<String> {
        self.list
            .iter()
            .filter(|p| p.ttl.is_some())
            .map(|p| String::from_utf8_lossy(&p.pattern).into_owned())
            .collect()
    }
}

const STATIC_SIGNATURES: &[&str] = &[
    "GET", "STRLEN", "EXISTS", "TYPE", "HGETALL", "HLEN", "LLEN", "SMEMBERS", "SCARD", "ZCARD",
];

/// The cache signature of a command: its name and every argument but the key,
/// length-prefixed so that no two commands share one.
pub fn signature(name_upper: &[u8], args: &[Bytes]) -> Bytes {
    if args.len() <= 2 {
        // The common single-key forms share one static signature each.
        if let Some(s) = STATIC_SIGNATURES
            .iter()
            .find(|s| s.as_bytes() == name_upper)
        {
            return Bytes::from_static(s.as_bytes());
        }
    }
    let mut out = BytesMut::with_capacity(
        name_upper.len() + 8 + args.iter().skip(2).map(|a| a.len() + 4).sum::<usize>(),
    );
    out.extend_from_slice(name_upper);
    for a in args.iter().skip(2) {
        out.put_u32(a.len() as u32);
        out.extend_from_slice(a);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn signatures_differ_by_arguments() {
        let a = signature(b"HGET", &[b("hget"), b("k"), b("ab")]);
        let b2 = signature(b"HGET", &[b("hget"), b("k"), b("a"), b("b")]);
        assert_ne!(a, b2);
    }

    #[test]
    fn first_match_wins() {
        let p = Policies::compile(&crate::config::Config::defaults().cache);
        assert_eq!(p.lookup(b"quote:1").unwrap().ttl, Duration::from_secs(5));
        assert!(p.lookup(b"lock:daily").is_none());
        assert!(p.lookup(b"other").is_none());
        assert!(
            p.lookup(b"quote").is_none(),
            "a prefix pattern needs the whole prefix"
        );
    }
}
