//! Client requests: RESP multibulk (`*N` of `$len` strings) and inline
//! commands (`PING\r\n`, as `redis-cli` and telnet send them).
//!
//! The parser is incremental: a partial request's progress (argument count,
//! the arguments already complete, where the next header starts) is kept
//! between reads, so a 512 MB argument or a pipeline arriving in small reads
//! is scanned once, not once per read. It has no recursion: a request is a
//! flat list, and a nested aggregate is the error Redis gives for it.

use bytes::{Buf, Bytes, BytesMut};

/// Inline requests (and header lines) longer than this without a newline are
/// refused (Redis: PROTO_INLINE_MAX_SIZE).
pub const INLINE_MAX: usize = 64 * 1024;

/// Limits applied to one client's input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_len: u64,
    pub max_multibulk_len: u64,
    pub max_query_buffer: u64,
}

/// Arguments of one request; most commands have a few, kept inline.
pub type Args = smallvec::SmallVec<[Bytes; 4]>;

/// A parsed client command: the arguments, binary-safe, sharing the read buffer.
#[derive(Debug, Clone)]
pub struct Request {
    pub args: Args,
    /// The request as received when it was a RESP array, so it can be forwarded without re-encoding.
    pub raw: Option<Bytes>,
}

impl Request {
    pub fn from_args(args: impl IntoIterator<Item = Bytes>) -> Request {
        Request {
            args: args.into_iter().collect(),
            raw: None,
        }
    }

    /// The upper-cased command name, for dispatch (empty for an empty request).
    pub fn name_upper(&self) -> CommandName {
        CommandName::new(self.args.first().map(|a| a.as_ref()).unwrap_or_default())
    }

    /// The request in RESP form, as sent upstream.
    pub fn encoded(&self) -> Bytes {
        match &self.raw {
            Some(raw) => raw.clone(),
            None => {
                let mut out = BytesMut::new();
                super::encode_command(&mut out, &self.args);
                out.freeze()
            }
        }
    }

    /// Bytes this request holds on to (for memory accounting).
    pub fn size(&self) -> usize {
        match &self.raw {
            Some(raw) => raw.len(),
            None => self.args.iter().map(|a| a.len() + 16).sum(),
        }
    }
}

/// An upper-cased command name, kept on the stack: every request needs one.
pub struct CommandName {
    inline: [u8; 24],
    len: usize,
    long: Option<Vec<u8>>,
}

impl CommandName {
    pub fn new(raw: &[u8]) -> CommandName {
        if raw.len() <= 24 {
            let mut inline = [0u8; 24];
            for (d, s) in inline.iter_mut().zip(raw) {
                *d = s.to_ascii_uppercase();
            }
            CommandName {
                inline,
                len: raw.len(),
                long: None,
            }
        } else {
            CommandName {
                inline: [0; 24],
                len: 0,
                long: Some(raw.to_ascii_uppercase()),
            }
        }
    }
}

impl std::ops::Deref for CommandName {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.long {
            Some(v) => v,
            None => &self.inline[..self.len],
        }
    }
}

/// A framing error: the reply text Redis would send; the connection is then closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl ProtocolError {
    fn new(msg: &str) -> ProtocolError {
        ProtocolError(format!("ERR Protocol error: {msg}"))
    }
}

/// The position of the `\r\n` ending the line that starts at `from`.
pub(crate) fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    // Header lines are a few bytes long: a plain scan finds them before a
    // vectorised search would have set itself up.
    let short = buf.get(from..)?;
    for (i, &c) in short.iter().take(24).enumerate() {
        if c == b'\n' {
            if i > 0 && short[i - 1] == b'\r' {
                return Some(from + i - 1);
            }
            break;
        }
    }
    let mut at = from;
    loop {
        let nl = at + memchr::memchr(b'\n', buf.get(at..)?)?;
        if nl > from && buf[nl - 1] == b'\r' {
            return Some(nl - 1);
        }
        at = nl + 1;
    }
}

/// A length in a request header, read as Redis reads it (`string2ll`):
/// [`parse_int`] without leading zeros or `-0`. A multibulk request is
/// forwarded upstream as received, so a header Redis would refuse (`$01`)
/// must be refused here too: Redis answers it with a protocol error and
/// closes the connection, which other clients' requests share.
fn parse_len(digits: &[u8]) -> Option<i64> {
    let unsigned = digits.strip_prefix(b"-").unwrap_or(digits);
    if unsigned.first() == Some(&b'0') && digits.len() > 1 {
        return None;
    }
    parse_int(digits)
}

/// A decimal integer as RESP headers write it (optional `-`, at most 19 digits).
pub(crate) fn parse_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as i64)?;
    }
    Some(if neg { -v } else { v })
}

/// Progress through a multibulk request that is not complete yet.
struct Multibulk {
    argc: usize,
    /// Byte ranges of the arguments found so far.
    args: smallvec::SmallVec<[(usize, usize); 4]>,
    /// Where the next argument's `$len` header starts.
    pos: usize,
}

/// Splits requests off the front of a client's read buffer, remembering
/// where it stopped inside a partial one.
#[derive(Default)]
pub struct RequestParser {
    partial: Option<Multibulk>,
}

impl RequestParser {
    /// The next complete request, `None` if more input is needed. Blank
    /// inline lines and empty multibulks are skipped, as Redis does.
    pub fn next(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Option<Request>, ProtocolError> {
        loop {
            if buf.is_empty() {
                return Ok(None);
            }
            let parsed = if self.partial.is_none() && buf[0] != b'*' {
                parse_inline(buf)?
            } else {
                self.multibulk(buf, limits)?
            };
            match parsed {
                Step::Request(r) => return Ok(Some(r)),
                Step::Empty => continue,
                Step::Incomplete => {
                    if buf.len() as u64 > limits.max_query_buffer {
                        return Err(ProtocolError::new("query buffer limit exceeded"));
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// How many more bytes the partial request needs at least, when known
    /// (inside a long argument): the caller can reserve them in one go.
    pub fn wanted(&self, buf: &[u8]) -> usize {
        let Some(mb) = &self.partial else { return 0 };
        let Some(nl) = buf.get(mb.pos..).and_then(|_| find_crlf(buf, mb.pos)) else {
            return 0;
        };
        match buf.get(mb.pos + 1..nl).and_then(parse_len) {
            Some(len) if len > 0 => (nl + 2 + len as usize + 2).saturating_sub(buf.len()),
            _ => 0,
        }
    }

    fn multibulk(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Step, ProtocolError> {
        if self.partial.is_none() {
            if let Some(request) = whole_request(buf, limits) {
                return Ok(Step::Request(request));
            }
        }
        self.multibulk_general(buf, limits)
    }

    fn multibulk_general(
        &mut self,
        buf: &mut BytesMut,
        limits: &Limits,
    ) -> Result<Step, ProtocolError> {
        let mb = match &mut self.partial {
            Some(mb) => mb,
            None => {
                let Some(cr) = find_crlf(buf, 0) else {
                    if buf.len() > INLINE_MAX {
                        return Err(ProtocolError::new("too big mbulk count string"));
                    }
                    return Ok(Step::Incomplete);
                };
                let count = match parse_len(&buf[1..cr]) {
                    Some(n) if n <= limits.max_multibulk_len.min(i32::MAX as u64) as i64 => n,
                    _ => return Err(ProtocolError::new("invalid multibulk length")),
                };
                if count <= 0 {
                    buf.advance(cr + 2);
                    return Ok(Step::Empty);
                }
                self.partial.insert(Multibulk {
                    argc: count as usize,
                    args: smallvec::SmallVec::with_capacity((count as usize).min(1024)),
                    pos: cr + 2,
                })
            }
        };
        while mb.args.len() < mb.argc {
            let Some(&kind) = buf.get(mb.pos) else {
                return Ok(Step::Incomplete);
            };
            if kind != b'$' {
                return Err(ProtocolError(format!(
                    "ERR Protocol error: expected '$', got '{}'",
                    kind as char
                )));
            }
            let Some(cr) = find_crlf(buf, mb.pos) else {
                if buf.len() - mb.pos > INLINE_MAX {
                    return Err(ProtocolError::new("too big bulk count string"));
                }
                return Ok(Step::Incomplete);
            };
            let len = match parse_len(&buf[mb.pos + 1..cr]) {
                Some(n) if n >= 0 && n as u64 <= limits.max_bulk_len => n as usize,
                _ => return Err(ProtocolError::new("invalid bulk length")),
            };
            let start = cr + 2;
            // Like Redis, the two bytes after the data are skipped unread.
            if buf.len() < start + len + 2 {
                return Ok(Step::Incomplete);
            }
            mb.args.push((start, start + len));
            mb.pos = start + len + 2;
        }
        let Some(mb) = self.partial.take() else {
            return Ok(Step::Incomplete);
        };
        let raw = buf.split_to(mb.pos).freeze();
        let args = mb.args.iter().map(|&(s, e)| raw.slice(s..e)).collect();
        Ok(Step::Request(Request {
            args,
            raw: Some(raw),
        }))
    }
}

/// Most requests are short and arrive whole: this reads one straight off
/// the buffer, with no partial state kept. Anything else (a request not all
/// there yet, a long one, a header Redis would refuse) is `None`, and the
/// general path reads it from the start, errors included; so whatever this
/// returns is what the general path would have.
fn whole_request(buf: &mut BytesMut, limits: &Limits) -> Option<Request> {
    /// A header's length: `[1-9][0-9]*` or `0`, then CRLF; `None` for
    /// anything else (`-1`, `$01`, a missing CR...). Returns the length and
    /// where the line after it starts.
    fn length(b: &[u8], mut at: usize) -> Option<(u64, usize)> {
        let first = *b.get(at)?;
        if !first.is_ascii_digit() || (first == b'0' && b.get(at + 1) != Some(&b'\r')) {
            return None;
        }
        let mut n: u64 = 0;
        while let Some(&d) = b.get(at) {
            if !d.is_ascii_digit() {
                break;
            }
            n = n * 10 + u64::from(d - b'0');
            if n > 1 << 40 {
                return None;
            }
            at += 1;
        }
        (b.get(at..at + 2)? == b"\r\n").then_some((n, at + 2))
    }
    const MAX_ARGS: u64 = 16;
    let b = &buf[..];
    let (count, mut pos) = length(b, 1)?;
    if count == 0 || count > MAX_ARGS || count > limits.max_multibulk_len {
        return None;
    }
    let mut ranges: smallvec::SmallVec<[(usize, usize); 4]> = smallvec::SmallVec::new();
    for _ in 0..count {
        if b.get(pos) != Some(&b'$') {
            return None;
        }
        let (len, start) = length(b, pos + 1)?;
        if len > limits.max_bulk_len {
            return None;
        }
        let end = start + len as usize;
        // Like Redis, the two bytes after the data are skipped unread.
        if b.len() < end + 2 {
            return None;
        }
        ranges.push((start, end));
        pos = end + 2;
    }
    let raw = buf.split_to(pos).freeze();
    let args = ranges.iter().map(|&(s, e)| raw.slice(s..e)).collect();
    Some(Request {
        args,
        raw: Some(raw),
    })
}

enum Step {
    Request(Request),
    Empty,
    Incomplete,
}

fn parse_inline(buf: &mut BytesMut) -> Result<Step, ProtocolError> {
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        if buf.len() > INLINE_MAX {
            return Err(ProtocolError::new("too big inline request"));
        }
        return Ok(Step::Incomplete);
    };
    let line = buf.split_to(nl + 1);
    let mut line = &line[..nl];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    match split_inline(line) {
        Some(args) if args.is_empty() => Ok(Step::Empty),
        Some(args) => Ok(Step::Request(Request::from_args(args))),
        None => Err(ProtocolError::new("unbalanced quotes in request")),
    }
}

/// C's `isspace` (the C locale): what `sdssplitargs` skips between arguments
/// and wants after a closing quote.
fn c_isspace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits an inline command line the way Redis' `sdssplitargs` does: blanks
/// separate arguments, "double quotes" take C escapes, 'single quotes' take \'.
/// As there, `\v` and `\f` are skipped between arguments but do not end an
/// unquoted one, and `\xHH` needs two hex digits. (A NUL byte is kept as
/// data; Redis would not find the line's end.)
fn split_inline(line: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && c_isspace(line[i]) {
            i += 1;
        }
        if i >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            if in_dq {
                if i >= n {
                    return None;
                }
                if line[i] == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && line[i + 2].is_ascii_hexdigit()
                    && line[i + 3].is_ascii_hexdigit()
                {
                    let hex = |d: u8| (d as char).to_digit(16).unwrap_or(0) as u8;
                    cur.push(hex(line[i + 2]) << 4 | hex(line[i + 3]));
                    i += 4;
                    continue;
                }
                if line[i] == b'\\' && i + 1 < n {
                    cur.push(match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        c => c,
                    });
                    i += 2;
                } else if line[i] == b'"' {
                    // A closing quote must be followed by a blank or the end.
                    if i + 1 < n && !c_isspace(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                    i += 1;
                }
            } else if in_sq {
                if i >= n {
                    return None;
                }
                if line[i] == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    cur.push(b'\'');
                    i += 2;
                } else if line[i] == b'\'' {
                    if i + 1 < n && !c_isspace(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                    i += 1;
                }
            } else {
                if i >= n || matches!(line[i], b' ' | b'\n' | b'\r' | b'\t') {
                    break;
                }
                match line[i] {
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
                i += 1;
            }
        }
        args.push(Bytes::from(cur));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bulk_len: 1 << 20,
        max_multibulk_len: 1024,
        max_query_buffer: 1 << 24,
    };

    /// The fast path answers exactly what the general path answers, or
    /// leaves the request to it: whole, truncated, odd headers, limits.
    #[test]
    fn whole_requests_read_fast_are_read_as_the_general_path_reads_them() {
        let tight = Limits {
            max_bulk_len: 5,
            max_multibulk_len: 3,
            max_query_buffer: 1 << 24,
        };
        let mut inputs: Vec<Vec<u8>> = vec![
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec(),
            b"*1\r\n$0\r\n\r\n".to_vec(),
            b"*2\r\n$3\r\nGET\r\n$01\r\nk\r\n".to_vec(),
            b"*02\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec(),
            b"*2\r\n$3\r\nGET\r\n$-1\r\n".to_vec(),
            b"*-1\r\n".to_vec(),
            b"*0\r\n".to_vec(),
            b"*2\r\n$3\nGET\r\n$1\r\nk\r\n".to_vec(),
            b"*2\r\n$3\r\nGET\r\n:1\r\n".to_vec(),
            b"*1\r\n$3\r\nGETxx*1\r\n$4\r\nPING\r\n".to_vec(),
            b"*1\r\n$6\r\nlonger\r\n".to_vec(),
            b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n".to_vec(),
        ];
        let mut many = b"*17\r\n".to_vec();
        for _ in 0..17 {
            many.extend_from_slice(b"$1\r\nx\r\n");
        }
        inputs.push(many);
        let mut read_fast = 0;
        for input in &inputs {
            for cut in 1..=input.len() {
                for limits in [&LIMITS, &tight] {
                    let mut fast = BytesMut::from(&input[..cut]);
                    let mut general = fast.clone();
                    let Some(r) = whole_request(&mut fast, limits) else {
                        continue;
                    };
                    read_fast += 1;
                    let want = RequestParser::default().multibulk_general(&mut general, limits);
                    let Ok(Step::Request(want)) = want else {
                        panic!(
                            "{:?}: the general path did not read a request",
                            &input[..cut]
                        );
                    };
                    assert_eq!(r.args, want.args, "{:?}", &input[..cut]);
                    assert_eq!(r.raw, want.raw);
                    assert_eq!(fast, general, "the same bytes left");
                }
            }
        }
        // Whole GET, empty argument, the 4 args (both limits for the first
        // two; the tight multibulk limit refuses the 4 args), the PING.
        assert!(read_fast >= 5, "the fast path read only {read_fast}");
    }

    fn parse_with(
        parser: &mut RequestParser,
        buf: &mut BytesMut,
    ) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut out = Vec::new();
        while let Some(r) = parser.next(buf, &LIMITS)? {
            out.push(r.args.iter().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    fn parse(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        parse_with(&mut RequestParser::default(), &mut BytesMut::from(input))
    }

    #[test]
    fn resp_and_inline_requests() {
        let got = parse(
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\nset \"a b\" 'c\\'d'\r\n\r\n*0\r\n*-1\r\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                vec![b"GET".to_vec(), b"k".to_vec()],
                vec![b"PING".to_vec()],
                vec![b"set".to_vec(), b"a b".to_vec(), b"c'd".to_vec()]
            ]
        );
    }

    #[test]
    fn partial_requests_wait_and_resume() {
        assert_eq!(parse(b"*2\r\n$3\r\nGE").unwrap().len(), 0);
        assert_eq!(parse(b"PIN").unwrap().len(), 0);
        // Byte by byte: the same result as all at once.
        let whole = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nPING\r\n*1\r\n$4\r\nPING\r\n";
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in whole {
            buf.extend_from_slice(&[*b]);
            got.extend(parse_with(&mut parser, &mut buf).unwrap());
        }
        assert_eq!(got, parse(whole).unwrap());
        assert_eq!(got.len(), 3);
        assert!(buf.is_empty());
    }

    #[test]
    fn wanted_reports_the_rest_of_a_long_argument() {
        let mut parser = RequestParser::default();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$100\r\nabc"[..]);
        assert!(parser.next(&mut buf, &LIMITS).unwrap().is_none());
        assert_eq!(parser.wanted(&buf), 100 - 3 + 2);
    }

    #[test]
    fn errors_match_redis() {
        let e = |i: &[u8]| parse(i).unwrap_err().0;
        assert_eq!(
            e(b"*1\r\n$99999999999\r\n"),
            "ERR Protocol error: invalid bulk length"
        );
        assert_eq!(
            e(b"*99999999\r\n"),
            "ERR Protocol error: invalid multibulk length"
        );
        assert_eq!(
            e(b"*1\r\n+OK\r\n"),
            "ERR Protocol error: expected '$', got '+'"
        );
        assert_eq!(e(b"*x\r\n"), "ERR Protocol error: invalid multibulk length");
        assert_eq!(
            e(b"GET \"unterminated\r\n"),
            "ERR Protocol error: unbalanced quotes in request"
        );
        assert_eq!(
            e(&vec![b'A'; INLINE_MAX + 1]),
            "ERR Protocol error: too big inline request"
        );
    }

    /// Found by fuzz/ (requests): headers Redis' string2ll refuses were
    /// accepted and forwarded as received, so Redis answered a protocol
    /// error and closed the upstream connection the request shared.
    #[test]
    fn headers_are_read_as_redis_reads_them() {
        let e = |i: &[u8]| parse(i).unwrap_err().0;
        assert_eq!(
            e(b"*1\r\n$01\r\nk\r\n"),
            "ERR Protocol error: invalid bulk length"
        );
        assert_eq!(
            e(b"*1\r\n$-0\r\n\r\n"),
            "ERR Protocol error: invalid bulk length"
        );
        assert_eq!(
            e(b"*01\r\n$1\r\nk\r\n"),
            "ERR Protocol error: invalid multibulk length"
        );
        assert_eq!(
            e(b"*-0\r\n"),
            "ERR Protocol error: invalid multibulk length"
        );
        assert_eq!(
            parse(b"*1\r\n$0\r\n\r\n").unwrap(),
            vec![vec![b"".to_vec()]]
        );
        assert_eq!(parse(b"*-1\r\n*0\r\n").unwrap().len(), 0);
    }

    /// Found by fuzz/ (requests): inline commands split as Redis'
    /// sdssplitargs splits them.
    #[test]
    fn inline_blanks_and_escapes_match_sdssplitargs() {
        let one = |i: &[u8]| parse(i).unwrap().remove(0);
        // \f and \v are skipped between arguments, but do not end one.
        assert_eq!(
            one(b"ECHO a\x0cb\r\n"),
            vec![b"ECHO".to_vec(), b"a\x0cb".to_vec()]
        );
        assert_eq!(
            one(b"\x0bECHO x\r\n"),
            vec![b"ECHO".to_vec(), b"x".to_vec()]
        );
        assert_eq!(
            one(b"ECHO \"a\"\x0b\r\n"),
            vec![b"ECHO".to_vec(), b"a".to_vec()]
        );
        // \xHH needs two hex digits (no sign).
        assert_eq!(
            one(b"ECHO \"\\x+1\"\r\n"),
            vec![b"ECHO".to_vec(), b"x+1".to_vec()]
        );
        assert_eq!(
            one(b"ECHO \"\\x4a\"\r\n"),
            vec![b"ECHO".to_vec(), b"J".to_vec()]
        );
    }

    #[test]
    fn deeply_nested_request_is_an_error_not_a_crash() {
        let deep = b"*1\r\n".repeat(100_000);
        assert_eq!(
            parse(&deep).unwrap_err().0,
            "ERR Protocol error: expected '$', got '*'"
        );
    }

    #[test]
    fn integers() {
        assert_eq!(parse_int(b"-1"), Some(-1));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_int(b"9223372036854775808"), None);
        assert_eq!(parse_int(b""), None);
        assert_eq!(parse_int(b"1a"), None);
        assert_eq!(find_crlf(b"ab\nc\r\n", 0), Some(4));
    }
}
