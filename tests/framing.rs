//! Seeded property tests of the framers (the same targets `fuzz/` runs
//! unseeded): random RESP2/RESP3 replies and requests, cut into random
//! reads, must frame exactly where they were generated, and wherever
//! `redis-protocol`'s decoder accepts the input, at the same boundary.

use bytes::BytesMut;
use nearcache::protocol::{Limits, ReplyFramer, RequestParser};

mod props;
use props::{gen_reply, Rng};

/// Feeds `stream` to a framer in random-sized reads; returns frame lengths.
fn frame_in_pieces(rng: &mut Rng, stream: &[u8]) -> Vec<usize> {
    let mut framer = ReplyFramer::default();
    let mut buf = BytesMut::new();
    let mut lens = Vec::new();
    let mut fed = 0;
    while fed < stream.len() {
        let n = (1 + rng.below(64)).min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        while let Some(r) = framer.next(&mut buf).expect("valid input") {
            lens.push(r.bytes.len());
        }
    }
    assert!(buf.is_empty(), "everything framed");
    lens
}

#[test]
fn replies_frame_where_generated_and_where_redis_protocol_does() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut agreed = 0;
    for round in 0..3000 {
        let resp3 = round % 2 == 0;
        let mut stream = Vec::new();
        let mut lens = Vec::new();
        for _ in 0..1 + rng.below(5) {
            let start = stream.len();
            gen_reply(&mut rng, &mut stream, resp3, 40);
            lens.push(stream.len() - start);
        }
        assert_eq!(frame_in_pieces(&mut rng, &stream), lens, "round {round}");
        // The oracle: redis-protocol's decoder, wherever it accepts the frame.
        let first = &stream[..lens[0]];
        let oracle = if resp3 {
            redis_protocol::resp3::decode::complete::decode_range(first)
                .ok()
                .flatten()
                .map(|(_, n)| n)
        } else {
            redis_protocol::resp2::decode::decode_range(first)
                .ok()
                .flatten()
                .map(|(_, n)| n)
        };
        if let Some(n) = oracle {
            assert_eq!(n, lens[0], "round {round}: differs from redis-protocol");
            agreed += 1;
        }
    }
    assert!(agreed > 1000, "the oracle accepted only {agreed} frames");
}

#[test]
fn truncated_replies_are_incomplete_never_wrong() {
    let mut rng = Rng(42);
    for _ in 0..500 {
        let mut frame = Vec::new();
        gen_reply(&mut rng, &mut frame, true, 40);
        for cut in 0..frame.len() {
            let r = ReplyFramer::default().scan(&frame[..cut]);
            assert!(
                matches!(r, Ok(None)),
                "a prefix of a frame is never a frame"
            );
        }
    }
}

#[test]
fn requests_frame_where_generated_and_where_redis_protocol_does() {
    let limits = Limits {
        max_bulk_len: 1 << 20,
        max_multibulk_len: 1 << 20,
        max_query_buffer: 1 << 30,
    };
    let mut rng = Rng(7);
    for round in 0..2000 {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let args: Vec<Vec<u8>> = (0..1 + rng.below(5)).map(|_| rng.bytes(30)).collect();
            let start = stream.len();
            stream.extend_from_slice(&nearcache::protocol::command(&args));
            let (_, n) = redis_protocol::resp2::decode::decode_range(&stream[start..])
                .unwrap()
                .unwrap();
            assert_eq!(n, stream.len() - start);
            expected.push(args);
        }
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut fed = 0;
        while fed < stream.len() {
            let n = (1 + rng.below(16)).min(stream.len() - fed);
            buf.extend_from_slice(&stream[fed..fed + n]);
            fed += n;
            while let Some(r) = parser.next(&mut buf, &limits).unwrap() {
                got.push(r.args.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
            }
        }
        assert_eq!(got, expected, "round {round}");
    }
}

/// Framing cost is linear: a 64 MiB bulk argument and a 200,000-command
/// pipeline, both delivered in 4 KiB reads, frame in well under a second.
#[test]
fn framing_large_input_in_small_reads_is_linear() {
    let limits = Limits {
        max_bulk_len: 512 << 20,
        max_multibulk_len: 1 << 20,
        max_query_buffer: 1 << 30,
    };
    let big = vec![b'x'; 64 << 20];
    let mut bulk = nearcache::protocol::command([&b"SET"[..], b"k", &big]).to_vec();
    let mut pipeline = Vec::new();
    for i in 0..200_000 {
        pipeline.extend_from_slice(&nearcache::protocol::command(["GET", &format!("k{i}")]));
    }
    for (name, input, count) in [("bulk", &mut bulk, 1), ("pipeline", &mut pipeline, 200_000)] {
        let started = std::time::Instant::now();
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut n = 0;
        for chunk in input.chunks(4096) {
            let wanted = parser.wanted(&buf);
            buf.reserve(wanted.max(chunk.len()));
            buf.extend_from_slice(chunk);
            while parser.next(&mut buf, &limits).unwrap().is_some() {
                n += 1;
            }
        }
        assert_eq!(n, count);
        let took = started.elapsed();
        println!("{name}: {} bytes framed in {took:?}", input.len());
        assert!(took < std::time::Duration::from_secs(5), "{name}: {took:?}");
        // And as a reply stream.
        let started = std::time::Instant::now();
        let mut framer = ReplyFramer::default();
        let mut buf = BytesMut::new();
        let mut frames = 0;
        for chunk in input.chunks(4096) {
            buf.extend_from_slice(chunk);
            while framer.next(&mut buf).unwrap().is_some() {
                frames += 1;
            }
        }
        assert_eq!(frames, count);
        println!("{name} as replies: framed in {:?}", started.elapsed());
    }
}
