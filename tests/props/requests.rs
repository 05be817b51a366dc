//! Request framing: `RequestParser::next` on arbitrary bytes in arbitrary
//! reads, against the limits, and against Redis' own parsing of what it
//! accepted.
//!
//! Input layout: `[limits] [amplify] [seed: 2 bytes] [stream...]`.
//! - `limits` picks max_bulk_len, max_multibulk_len and max_query_buffer
//!   from small and realistic values;
//! - `amplify` = 0xff repeats the stream past `INLINE_MAX` (64 KiB), so the
//!   size errors are reachable from small inputs (rarely: such inputs are
//!   slow);
//! - `seed` drives the read sizes.
//!
//! Properties:
//! 1. never a panic, and `next` always ends: every request it returns
//!    consumed bytes, and asking again without new input changes nothing;
//! 2. all at once and in pieces give the same requests and the same end
//!    (error text or bytes left); in pieces it may stop earlier with a size
//!    error (a line or buffer that was too long at the moment it was seen),
//!    after a prefix of the same requests;
//! 3. with the configured query buffer limit, the bytes held between calls
//!    never exceed it (the caller holds at most that plus one read), and the
//!    requests are a prefix of the unlimited parse, ended by the same error
//!    or "query buffer limit exceeded";
//! 4. every error is one of the texts Redis sends for a protocol error;
//! 5. the bytes a request consumed mean the same request to Redis: parsed
//!    the way Redis 7's networking.c does (string2ll lengths, sdssplitargs
//!    for inline commands), they give exactly its arguments. A multibulk
//!    request is forwarded upstream as received (`Request::raw`), so a
//!    request Redis would reject must not be accepted here: Redis answers it
//!    with a protocol error and closes the shared upstream connection.
//!    (Inline lines holding a NUL byte are left out: Redis does not find
//!    their newline, nearcache does.)

use bytes::BytesMut;
use nearcache::protocol::{Limits, RequestParser, INLINE_MAX};

use super::{read_sizes, Input};

const BULK: [u64; 6] = [0, 1, 4, 16, 512, 1 << 20];
const MULTIBULK: [u64; 5] = [0, 1, 3, 16, 1 << 20];
const QUERY_BUFFER: [u64; 6] = [0, 8, 64, 1024, 100_000, 1 << 30];

/// Redis' proto-max-bulk-len default: what upstream accepts at most.
const REDIS_MAX_BULK: u64 = 512 << 20;

const SIZE_ERRORS: [&str; 4] = [
    "ERR Protocol error: too big mbulk count string",
    "ERR Protocol error: too big bulk count string",
    "ERR Protocol error: too big inline request",
    "ERR Protocol error: query buffer limit exceeded",
];

fn known_error(e: &str) -> bool {
    SIZE_ERRORS.contains(&e)
        || [
            "ERR Protocol error: invalid multibulk length",
            "ERR Protocol error: invalid bulk length",
            "ERR Protocol error: unbalanced quotes in request",
        ]
        .contains(&e)
        || e.strip_prefix("ERR Protocol error: expected '$', got '")
            .and_then(|rest| rest.strip_suffix('\''))
            .is_some_and(|c| c.chars().count() == 1)
}

/// The limits, read sizes and stream an input stands for.
pub fn decode(data: &[u8]) -> (Limits, Vec<usize>, Vec<u8>) {
    let mut input = Input::new(data);
    let l = usize::from(input.byte());
    let limits = Limits {
        max_bulk_len: BULK[l % BULK.len()],
        max_multibulk_len: MULTIBULK[(l / 6) % MULTIBULK.len()],
        max_query_buffer: QUERY_BUFFER[(l / 30) % QUERY_BUFFER.len()],
    };
    let amplify = input.byte();
    let seed = input.u16();
    let mut stream = input.rest().to_vec();
    if amplify == 0xff && !stream.is_empty() {
        let target = INLINE_MAX + 1 + usize::from(seed % 8192);
        let unit = stream.clone();
        while stream.len() < target {
            stream.extend_from_slice(&unit);
        }
    }
    let reads = read_sizes(u64::from(seed), stream.len());
    (limits, reads, stream)
}

/// One request as returned: its arguments and its raw bytes, if kept.
type Got = (Vec<Vec<u8>>, Option<Vec<u8>>);

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    requests: Vec<Got>,
    error: Option<String>,
    /// Bytes left in the buffer at the end (no error).
    rest: usize,
}

/// Feeds `stream` in `reads`, checking properties 1, 3 (bound), 4 and 5 on
/// the way.
fn run(stream: &[u8], reads: &[usize], limits: &Limits) -> Outcome {
    let mut parser = RequestParser::default();
    let mut buf = BytesMut::new();
    let mut consumed = 0usize;
    let mut fed = 0usize;
    let mut requests = Vec::new();
    for &n in reads {
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        // Each request consumes bytes, so this ends within `buf.len()` turns.
        for _ in 0..=buf.len() {
            let before = buf.len();
            match parser.next(&mut buf, limits) {
                Ok(Some(r)) => {
                    let used = before - buf.len();
                    assert!(used > 0, "a request that consumed nothing");
                    assert!(!r.args.is_empty(), "an empty request");
                    let bytes = &stream[consumed..consumed + used];
                    consumed += used;
                    let args: Vec<Vec<u8>> = r.args.iter().map(|a| a.to_vec()).collect();
                    if let Some(raw) = &r.raw {
                        assert!(bytes.ends_with(raw), "raw is not the bytes consumed");
                        assert_eq!(raw.first(), Some(&b'*'));
                    }
                    check_against_redis(bytes, &args, limits);
                    requests.push((args, r.raw.map(|b| b.to_vec())));
                }
                Ok(None) => {
                    // Blank lines and empty multibulks it skipped.
                    consumed += before - buf.len();
                    assert!(
                        buf.len() as u64 <= limits.max_query_buffer,
                        "{} bytes held over the query buffer limit {}",
                        buf.len(),
                        limits.max_query_buffer
                    );
                    // Asking again changes nothing.
                    let held = buf.len();
                    assert!(matches!(parser.next(&mut buf, limits), Ok(None)));
                    assert_eq!(buf.len(), held);
                    let wanted = parser.wanted(&buf) as u64;
                    assert!(wanted <= limits.max_bulk_len + 2, "wanted {wanted}");
                    break;
                }
                Err(e) => {
                    assert!(known_error(&e.0), "unknown error text {:?}", e.0);
                    return Outcome {
                        requests,
                        error: Some(e.0),
                        rest: 0,
                    };
                }
            }
            assert!(buf.len() < before);
        }
    }
    Outcome {
        requests,
        error: None,
        rest: buf.len(),
    }
}

/// Property 5: Redis parses `bytes` (what one request consumed, blank lines
/// and empty multibulks it skipped included) into exactly `args`.
fn check_against_redis(bytes: &[u8], args: &[Vec<u8>], limits: &Limits) {
    if limits.max_bulk_len > REDIS_MAX_BULK {
        return;
    }
    let mut pos = 0;
    loop {
        match redis_parse_one(&bytes[pos..]) {
            RedisStep::Request(got, used) => {
                assert_eq!(
                    got,
                    args,
                    "Redis reads other arguments from {:?}",
                    bytes.escape_ascii().to_string()
                );
                assert_eq!(pos + used, bytes.len(), "Redis stops elsewhere");
                return;
            }
            RedisStep::Empty(used) => pos += used,
            RedisStep::Skip => return,
            RedisStep::Error(e) => panic!(
                "accepted {:?}, which Redis rejects: {e}",
                bytes.escape_ascii().to_string()
            ),
            RedisStep::Incomplete => panic!(
                "accepted {:?}, which Redis would still wait on",
                bytes.escape_ascii().to_string()
            ),
        }
    }
}

pub enum RedisStep {
    Request(Vec<Vec<u8>>, usize),
    Empty(usize),
    Error(String),
    Incomplete,
    /// Outside what this model covers (an inline line with a NUL byte).
    Skip,
}

/// Redis' `string2ll`: optional `-`, no leading zeros, no `+`, no `-0`.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if neg {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// One step of Redis 7's `processInputBuffer` on complete input
/// (networking.c: `processMultibulkBuffer`, `processInlineBuffer`).
pub fn redis_parse_one(b: &[u8]) -> RedisStep {
    let Some(&first) = b.first() else {
        return RedisStep::Incomplete;
    };
    if first != b'*' {
        // strchr: a NUL ends the search.
        let Some(nl) = b.iter().position(|&c| c == b'\n' || c == 0) else {
            return RedisStep::Incomplete;
        };
        if b[nl] == 0 {
            return RedisStep::Skip;
        }
        let mut line = &b[..nl];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        return match sdssplitargs(line) {
            None => RedisStep::Error("unbalanced quotes in request".into()),
            Some(args) if args.is_empty() => RedisStep::Empty(nl + 1),
            Some(args) => RedisStep::Request(args, nl + 1),
        };
    }
    // strchr(querybuf, '\r'), and at least two bytes from there on.
    let header = |from: usize| -> Option<usize> {
        let cr = from + b[from..].iter().position(|&c| c == b'\r' || c == 0)?;
        (b[cr] == b'\r' && cr + 2 <= b.len()).then_some(cr)
    };
    let Some(cr) = header(0) else {
        return RedisStep::Incomplete;
    };
    let count = match string2ll(&b[1..cr]) {
        Some(n) if n <= i64::from(i32::MAX) => n,
        _ => return RedisStep::Error("invalid multibulk length".into()),
    };
    let mut pos = cr + 2;
    if count <= 0 {
        return RedisStep::Empty(pos);
    }
    let mut args = Vec::new();
    for _ in 0..count {
        let Some(cr) = header(pos) else {
            return RedisStep::Incomplete;
        };
        if b[pos] != b'$' {
            return RedisStep::Error(format!("expected '$', got '{}'", b[pos] as char));
        }
        let len = match string2ll(&b[pos + 1..cr]) {
            Some(n) if n >= 0 && n as u64 <= REDIS_MAX_BULK => n as usize,
            _ => return RedisStep::Error("invalid bulk length".into()),
        };
        pos = cr + 2;
        if b.len() < pos + len + 2 {
            return RedisStep::Incomplete;
        }
        args.push(b[pos..pos + len].to_vec());
        pos += len + 2;
    }
    RedisStep::Request(args, pos)
}

/// C's `isspace` in the C locale.
fn c_isspace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Redis' `sdssplitargs` (sds.c) on a line without NUL bytes.
pub fn sdssplitargs(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // C strings: index past the end reads the terminating NUL.
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut p = 0;
    let mut out = Vec::new();
    loop {
        while at(p) != 0 && c_isspace(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Some(out);
        }
        let (mut inq, mut insq, mut done) = (false, false, false);
        let mut current = Vec::new();
        while !done {
            let c = at(p);
            if inq {
                if c == b'\\'
                    && at(p + 1) == b'x'
                    && at(p + 2).is_ascii_hexdigit()
                    && at(p + 3).is_ascii_hexdigit()
                {
                    let hex = |d: u8| (d as char).to_digit(16).unwrap_or(0) as u8;
                    current.push(hex(at(p + 2)) * 16 + hex(at(p + 3)));
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    current.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    if at(p + 1) != 0 && !c_isspace(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                }
            } else if insq {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    current.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !c_isspace(at(p + 1)) {
                        return None;
                    }
                    done = true;
                } else if c == 0 {
                    return None;
                } else {
                    current.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    other => current.push(other),
                }
            }
            if at(p) != 0 {
                p += 1;
            }
        }
        out.push(current);
    }
}

fn size_error(o: &Outcome) -> bool {
    o.error.as_deref().is_some_and(|e| SIZE_ERRORS.contains(&e))
}

/// All the properties, on one fuzz input.
pub fn check(data: &[u8]) {
    let (limits, reads, stream) = decode(data);
    let unlimited = Limits {
        max_query_buffer: u64::MAX,
        ..limits
    };
    let whole = run(&stream, &[stream.len()], &unlimited);
    let pieces = run(&stream, &reads, &unlimited);
    if pieces != whole {
        assert!(
            size_error(&pieces) && whole.requests.starts_with(&pieces.requests),
            "in pieces {reads:?}: {pieces:?}\nall at once: {whole:?}"
        );
    }
    let limited = run(&stream, &reads, &limits);
    if limited != pieces {
        assert_eq!(
            limited.error.as_deref(),
            Some("ERR Protocol error: query buffer limit exceeded"),
            "with the query buffer limit: {limited:?}\nwithout: {pieces:?}"
        );
        assert!(pieces.requests.starts_with(&limited.requests));
    }
}
