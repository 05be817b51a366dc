//! Unit tests of the store: generations, writes in flight, variants, TTLs.

use super::*;

fn cache() -> Arc<Cache> {
    let mut cfg = crate::config::Config::defaults().cache;
    cfg.max_bytes = 1 << 20;
    let c = Cache::new(cfg);
    c.set_serving(true, "test");
    c
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn get(c: &Cache, key: &str, sig: &str, proto: u8) -> Option<Bytes> {
    let p = c.policy(key.as_bytes()).unwrap();
    let mut hit = None;
    match c.lookup(&b(key), &b(sig), proto, p, |r| {
        hit = Some(Bytes::copy_from_slice(r))
    }) {
        Lookup::Hit => hit,
        _ => None,
    }
}

const TTL: Duration = Duration::from_secs(5);

/// Stores a reply fetched under `ticket` (no feed barrier).
fn complete(
    c: &Cache,
    ticket: Ticket,
    key: &Bytes,
    sig: &Bytes,
    proto: u8,
    reply: &Bytes,
    ttl: Duration,
) -> bool {
    c.complete_fill(Fill {
        ticket,
        key: key.clone(),
        sig: sig.clone(),
        proto,
        reply: reply.clone(),
        ttl,
    })
}

#[test]
fn invalidation_between_ticket_and_fill_cancels_the_insert() {
    let c = cache();
    let t = c.ticket(b"quote:1");
    c.invalidate(b"quote:1", "test");
    assert!(!complete(
        &c,
        t,
        &b("quote:1"),
        &b("GET"),
        2,
        &b("$1\r\nx\r\n"),
        TTL
    ));
    assert!(get(&c, "quote:1", "GET", 2).is_none());
    let t = c.ticket(b"quote:1");
    assert!(complete(
        &c,
        t,
        &b("quote:1"),
        &b("GET"),
        2,
        &b("$1\r\ny\r\n"),
        TTL
    ));
    assert_eq!(get(&c, "quote:1", "GET", 2).unwrap(), b("$1\r\ny\r\n"));
}

#[test]
fn flush_cancels_every_fill_and_feed_down_stops_serving() {
    let c = cache();
    let t = c.ticket(b"quote:1");
    c.clear_all("test");
    assert!(!complete(
        &c,
        t,
        &b("quote:1"),
        &b("GET"),
        2,
        &b("$1\r\nx\r\n"),
        TTL
    ));
    let t = c.ticket(b"quote:1");
    assert!(complete(
        &c,
        t,
        &b("quote:1"),
        &b("GET"),
        2,
        &b("$1\r\nx\r\n"),
        TTL
    ));
    c.set_serving(false, "down");
    assert!(get(&c, "quote:1", "GET", 2).is_none());
    c.set_serving(true, "up");
    assert!(
        get(&c, "quote:1", "GET", 2).is_none(),
        "cleared when the feed went down"
    );
}

#[test]
fn a_write_in_flight_bypasses_reads_and_blocks_fills() {
    let c = cache();
    let key = b("quote:w");
    let t = c.ticket(&key);
    assert!(complete(&c, t, &key, &b("GET"), 2, &b("$1\r\n1\r\n"), TTL));
    let guard = c.begin_write(&Keys::Some(vec![key.clone()])).unwrap();
    let p = c.policy(&key).unwrap();
    assert!(matches!(
        c.lookup(&key, &b("GET"), 2, p, |_| {}),
        Lookup::Bypass
    ));
    // A fill that started while the write is in flight (its ticket is
    // current) still must not store what it read.
    let t = c.ticket(&key);
    assert!(!complete(&c, t, &key, &b("GET"), 2, &b("$1\r\n1\r\n"), TTL));
    drop(guard);
    assert!(!complete(&c, t, &key, &b("GET"), 2, &b("$1\r\n1\r\n"), TTL));
    assert!(matches!(
        c.lookup(&key, &b("GET"), 2, p, |_| {}),
        Lookup::Miss(_)
    ));
    // Unknown keys: everything bypasses while it is in flight.
    let all = c.begin_write(&Keys::All).unwrap();
    assert!(matches!(
        c.lookup(
            &b("ind:x"),
            &b("GET"),
            2,
            c.policy(b"ind:x").unwrap(),
            |_| {}
        ),
        Lookup::Bypass
    ));
    drop(all);
    assert!(!c.writing(b"ind:x"));
}

#[test]
fn variants_are_per_command_and_protocol_and_bounded() {
    let c = cache();
    let key = b("ind:x");
    for (sig, proto, reply) in [("HGETALL", 2, "*0\r\n"), ("HGETALL", 3, "%0\r\n")] {
        let t = c.ticket(&key);
        complete(&c, t, &key, &b(sig), proto, &b(reply), TTL);
    }
    assert_eq!(get(&c, "ind:x", "HGETALL", 2).unwrap(), b("*0\r\n"));
    assert_eq!(get(&c, "ind:x", "HGETALL", 3).unwrap(), b("%0\r\n"));
    assert!(get(&c, "ind:x", "HLEN", 3).is_none());
    for i in 0..MAX_VARIANTS + 5 {
        let t = c.ticket(&key);
        complete(&c, t, &key, &b(&format!("HGET{i}")), 2, &b(":1\r\n"), TTL);
    }
    let variants = c.store.get(&key, |e| Some(e.variants().count())).unwrap();
    assert_eq!(variants, MAX_VARIANTS);
    assert!(get(&c, "ind:x", &format!("HGET{}", MAX_VARIANTS + 4), 2).is_some());
    c.invalidate(&key, "test");
    assert!(get(&c, "ind:x", "HGETALL", 2).is_none());
}

#[test]
fn entries_never_outlive_the_shortest_ttl() {
    let c = cache();
    let key = b("quote:t");
    let t = c.ticket(&key);
    complete(
        &c,
        t,
        &key,
        &b("GET"),
        2,
        &b(":1\r\n"),
        Duration::from_millis(30),
    );
    let t = c.ticket(&key);
    complete(&c, t, &key, &b("STRLEN"), 2, &b(":1\r\n"), TTL);
    assert!(get(&c, "quote:t", "STRLEN", 2).is_some());
    std::thread::sleep(Duration::from_millis(60));
    assert!(
        get(&c, "quote:t", "STRLEN", 2).is_none(),
        "the later variant kept the earlier deadline"
    );
    assert_eq!(ttl_from_pttl(-1, Duration::ZERO), None);
    assert_eq!(ttl_from_pttl(-2, Duration::ZERO), None);
    assert_eq!(
        ttl_from_pttl(100, Duration::from_millis(30)),
        Some(Duration::from_millis(70))
    );
    assert_eq!(
        ttl_from_pttl(10, Duration::from_millis(30)),
        Some(Duration::ZERO)
    );
}
