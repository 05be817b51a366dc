//! Reply framing: `ReplyFramer` (and `frame_len`, `elements`, `scalar`,
//! `reply_strings`, `first_word`, `split_array`) on arbitrary bytes, deep
//! nesting included, differentially against `redis-protocol`.
//!
//! Input layout: `[mode] [seed: 2 bytes] [depth: 2 bytes] [stream...]`.
//! `mode` & 7 in 1..=6 prepends `depth` copies of an aggregate header
//! (`*1`, `%1`, `>1`, `~1`, `|1`, `*2`) to the stream, so nesting of up to
//! 65,535 levels is reachable from a few bytes; `seed` drives read sizes.
//!
//! Properties:
//! 1. never a panic, never recursion (deep inputs run on the fuzzer's
//!    stack), and framing ends: every frame consumes bytes;
//! 2. frames read in pieces equal frames read whole, and both end the same
//!    way (the same error text, or the same bytes left over);
//! 3. `frame_len` agrees with the framer; no strict prefix of a frame is a
//!    frame;
//! 4. one level of a framed aggregate (`elements`) tiles it exactly, and the
//!    other helpers do not panic on frames or on arbitrary bytes;
//! 5. wherever redis-protocol's decoders (`resp3::decode::complete` and
//!    `resp2::decode`) accept the input, the first frame ends at the same
//!    byte, and is an error, a push or a null exactly when ours says so.
//!    redis-protocol recurses once per nesting level, so it is only asked
//!    when the input has fewer than `ORACLE_MAX_AGGREGATES` aggregate
//!    headers at line starts (a bound on its depth). Frames Redis never
//!    sends are not compared: HELLO (a request), and RESP3 streamed parts.
//!    Nor are frames ours refuses because a bulk string is not followed by
//!    CRLF (redis-protocol takes any two bytes there), because a length
//!    has a `+` sign, or because they hold a streamed part (`;` chunk, `.`
//!    end, `?` length) or HELLO, which redis-protocol accepts inside
//!    aggregates too.

use bytes::{Bytes, BytesMut};
use nearcache::protocol::{
    elements, first_word, frame_len, reply_strings, scalar, split_array, ReplyFramer, ReplyKind,
};
use redis_protocol::resp3::types::FrameKind;

use super::{read_sizes, Input, Rng};

pub const ORACLE_MAX_AGGREGATES: usize = 100;

const DEEP: [&[u8]; 6] = [
    b"*1\r\n", b"%1\r\n", b">1\r\n", b"~1\r\n", b"|1\r\n", b"*2\r\n",
];

pub fn decode(data: &[u8]) -> (Vec<usize>, Vec<u8>, u16) {
    let mut input = Input::new(data);
    let mode = input.byte();
    let seed = input.u16();
    let depth = input.u16();
    let rest = input.rest();
    let mut stream = Vec::new();
    let unit = usize::from(mode & 7);
    if (1..=6).contains(&unit) {
        let unit = DEEP[unit - 1];
        stream.reserve(unit.len() * usize::from(depth) + rest.len());
        for _ in 0..depth {
            stream.extend_from_slice(unit);
        }
    }
    stream.extend_from_slice(rest);
    let reads = read_sizes(u64::from(seed), stream.len());
    (reads, stream, seed)
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<(usize, ReplyKind)>,
    error: Option<String>,
    rest: usize,
}

fn run(stream: &[u8], reads: &[usize]) -> Outcome {
    let mut framer = ReplyFramer::default();
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut frames = Vec::new();
    let mut consumed = 0;
    for &n in reads {
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        for _ in 0..=buf.len() {
            match framer.next(&mut buf) {
                Ok(Some(r)) => {
                    assert!(!r.bytes.is_empty(), "an empty frame");
                    assert_eq!(&stream[consumed..consumed + r.bytes.len()], &r.bytes[..]);
                    consumed += r.bytes.len();
                    frames.push((r.bytes.len(), r.kind));
                    check_helpers(&r.bytes, true);
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        error: Some(e),
                        rest: 0,
                    }
                }
            }
        }
    }
    Outcome {
        frames,
        error: None,
        rest: buf.len(),
    }
}

/// Property 4 on one frame (`complete`: as the framer cut it) or on any bytes.
fn check_helpers(bytes: &[u8], complete: bool) {
    let owned = Bytes::copy_from_slice(bytes);
    let _ = scalar(bytes);
    let _ = reply_strings(bytes);
    let _ = first_word(bytes);
    let parts = split_array(&owned);
    let els = elements(bytes);
    if !complete {
        return;
    }
    if matches!(bytes[0], b'*' | b'>' | b'~' | b'%') {
        let els = els.expect("a framed aggregate has elements");
        let header = bytes.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        let mut at = header;
        for r in &els {
            assert_eq!(r.start, at, "elements leave a gap");
            assert!(r.end > r.start);
            at = r.end;
        }
        assert_eq!(at, bytes.len(), "elements do not cover the frame");
        if let Some(parts) = parts {
            assert_eq!(parts.len(), els.len());
        }
    }
    if matches!(bytes[0], b'$' | b'+' | b':') {
        let v = scalar(bytes).expect("a framed string has a value");
        let header = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
        if bytes[0] == b'$' && !bytes.starts_with(b"$-") {
            assert_eq!(&v[..], &bytes[header + 2..bytes.len() - 2]);
        } else if bytes[0] != b'$' {
            assert_eq!(&v[..], &bytes[1..header]);
        }
    }
}

/// Errors of ours on input that redis-protocol may accept but Redis never
/// sends (see property 5).
fn not_from_redis(error: &str) -> bool {
    error == "bulk string without CRLF"
        || error.starts_with("invalid frame type '.'")
        || error.starts_with("invalid frame type ';'")
        || error.starts_with("invalid frame type 'H'")
        || error.starts_with("bad length \"?\"")
        // redis-protocol parses lengths with `str::parse`, which takes a `+`.
        || error.starts_with("bad length \"+")
}

/// Lines starting with an aggregate (or attribute) type byte: a bound on the
/// nesting depth of any frame read from `stream`.
fn aggregate_headers(stream: &[u8]) -> usize {
    let mut n = usize::from(matches!(
        stream.first(),
        Some(b'*' | b'%' | b'~' | b'>' | b'|')
    ));
    for w in stream.windows(3) {
        if w[0] == b'\r' && w[1] == b'\n' && matches!(w[2], b'*' | b'%' | b'~' | b'>' | b'|') {
            n += 1;
        }
    }
    n
}

/// Property 5 on the first frame of `stream` (`ours`: what the framer made
/// of it, `error`: why it stopped, if it did).
fn check_oracle(stream: &[u8], ours: Option<(usize, ReplyKind)>, error: Option<&str>) {
    if ours.is_none() && error.is_some_and(not_from_redis) {
        return;
    }
    let region = if aggregate_headers(stream) < ORACLE_MAX_AGGREGATES {
        stream
    } else {
        match ours {
            Some((len, _)) if aggregate_headers(&stream[..len]) < ORACLE_MAX_AGGREGATES => {
                &stream[..len]
            }
            _ => return,
        }
    };
    if let Ok(Some((frame, n))) = redis_protocol::resp3::decode::complete::decode_range(region) {
        let kind = frame.kind();
        if !matches!(
            kind,
            FrameKind::Hello | FrameKind::ChunkedString | FrameKind::EndStream
        ) {
            let (len, ours_kind) = ours.unwrap_or_else(|| {
                panic!(
                    "redis-protocol (RESP3) frames {n} bytes as {kind:?}, we do not: {:?}",
                    String::from_utf8_lossy(&region[..n])
                )
            });
            assert_eq!(
                len,
                n,
                "RESP3 frame boundary differs: {:?}",
                String::from_utf8_lossy(&region[..n.max(len).min(region.len())])
            );
            let expected = match kind {
                FrameKind::SimpleError | FrameKind::BlobError => ReplyKind::Error,
                FrameKind::Push => ReplyKind::Push,
                FrameKind::Null => ReplyKind::Nil,
                _ => ReplyKind::Normal,
            };
            assert_eq!(ours_kind, expected, "RESP3 {kind:?}");
        }
    }
    if let Ok(Some((frame, n))) = redis_protocol::resp2::decode::decode_range(region) {
        use redis_protocol::resp2::types::RangeFrame;
        let (len, ours_kind) = ours.unwrap_or_else(|| {
            panic!(
                "redis-protocol (RESP2) frames {n} bytes, we do not: {:?}",
                String::from_utf8_lossy(&region[..n])
            )
        });
        assert_eq!(len, n, "RESP2 frame boundary differs");
        let expected = match frame {
            RangeFrame::Error(_) => ReplyKind::Error,
            RangeFrame::Null => ReplyKind::Nil,
            _ => ReplyKind::Normal,
        };
        assert_eq!(ours_kind, expected, "RESP2 {frame:?}");
    }
}

/// All the properties, on one fuzz input.
pub fn check(data: &[u8]) {
    let (reads, stream, seed) = decode(data);
    let whole = run(&stream, &[stream.len()]);
    let pieces = run(&stream, &reads);
    assert_eq!(pieces, whole, "in pieces {reads:?} vs all at once");
    let first = whole.frames.first().copied();
    assert_eq!(frame_len(&stream), first.map(|(len, _)| len));
    if let Some((len, _)) = first {
        // A few strict prefixes of the first frame are incomplete, not frames.
        let mut rng = Rng::new(u64::from(seed));
        for _ in 0..8 {
            let cut = rng.below(len);
            assert!(
                matches!(ReplyFramer::default().scan(&stream[..cut]), Ok(None)),
                "a prefix ({cut} of {len} bytes) of a frame is not incomplete"
            );
        }
    }
    check_helpers(&stream, false);
    let error = whole
        .frames
        .is_empty()
        .then_some(whole.error.as_deref())
        .flatten();
    check_oracle(&stream, first, error);
}
