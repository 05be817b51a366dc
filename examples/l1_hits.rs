//! The cost of an L1 hit as the number of cached keys grows, without the
//! network: fills N keys (64-byte GET replies), then looks up M keys drawn
//! uniformly from them, and prints ns per lookup. Used with
//! `valgrind --tool=callgrind --toggle-collect='*hit_loop*'` to count
//! instructions (and cache misses with `--cache-sim=yes`) per hit; see
//! BENCHMARKS.md.
//!
//! `cargo run --release --example l1_hits -- <keys> <lookups>`

use std::time::{Duration, Instant};

use bytes::Bytes;
use nearcache::cache::{Cache, Lookup};

fn main() {
    let mut args = std::env::args().skip(1);
    let keys: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let lookups: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut cfg = nearcache::Config::defaults().cache;
    cfg.max_bytes = 2 << 30;
    cfg.default_ttl = Some(Duration::from_secs(3600));
    let cache = Cache::new(cfg);
    cache.set_serving(true, "bench");
    let names: Vec<Bytes> = (0..keys)
        .map(|i| Bytes::from(format!("key:{i:012}")))
        .collect();
    let sig = Bytes::from_static(b"GET");
    let reply = Bytes::from(format!("$64\r\n{}\r\n", "x".repeat(64)));
    for k in &names {
        let t = cache.ticket(k);
        assert!(cache.complete_fill(nearcache::cache::Fill {
            ticket: t,
            key: k.clone(),
            sig: sig.clone(),
            proto: 2,
            reply: reply.clone(),
            ttl: Duration::from_secs(3600),
        }));
    }
    // The same pseudo-random sequence every run (xorshift), drawn before timing.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let order: Vec<usize> = (0..lookups)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % keys as u64) as usize
        })
        .collect();
    // What the harness itself costs: reading each key as the lookups do.
    let started = Instant::now();
    let touched: usize = order
        .iter()
        .map(|&i| names[i][names[i].len() - 1] as usize)
        .sum();
    let harness = started.elapsed();
    let started = Instant::now();
    let (hits, bytes) = hit_loop(&cache, &names, &order, &sig);
    let took = started.elapsed();
    println!(
        "  (the harness alone: {:.1} ns per key read, checksum {touched})",
        harness.as_nanos() as f64 / lookups as f64
    );
    assert_eq!(hits, lookups, "every lookup hits");
    println!(
        "keys={keys} lookups={lookups} ns/hit={:.1} ({bytes} bytes)",
        took.as_nanos() as f64 / lookups as f64
    );
}

#[inline(never)]
fn hit_loop(cache: &Cache, names: &[Bytes], order: &[usize], sig: &Bytes) -> (usize, usize) {
    let policy = cache.policy(b"key:0").expect("cached by default_ttl");
    let mut out = Vec::with_capacity(1 << 16);
    let mut hits = 0;
    let mut total = 0;
    for &i in order {
        if let Lookup::Hit = cache.lookup(&names[i], sig, 2, policy, |r| out.extend_from_slice(r)) {
            hits += 1;
            if out.len() > 60_000 {
                total += out.len();
                out.clear();
            }
        }
    }
    (hits, total + out.len())
}
