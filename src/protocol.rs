//! Framing: client requests in, upstream replies framed, replies encoded.
//!
//! Requests are RESP arrays of bulk strings (decoded with `redis-protocol`'s
//! zero-copy range decoder) or inline commands (`PING\r\n`, as `redis-cli`
//! and telnet send them). Before a partial request is buffered, its headers
//! are checked against the configured limits so that a client announcing a
//! 100 GB bulk string is refused at once, with the error Redis gives, instead
//! of being buffered. Replies from upstream stay encoded `Bytes`: nearcache
//! only needs to find where each one ends, so RESP2 and RESP3 replies pass
//! through byte-for-byte.

use bytes::{BufMut, Bytes, BytesMut};
use redis_protocol::resp2::{decode::decode_range as resp2_decode_range, types::RangeFrame as R2};
use redis_protocol::resp3::decode::complete::decode_range as resp3_decode_range;
use redis_protocol::resp3::types::RangeFrame as R3;

/// Inline requests longer than this without a newline are refused (Redis: PROTO_INLINE_MAX_SIZE).
const INLINE_MAX: usize = 64 * 1024;

/// Limits applied to one client's input.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bulk_len: u64,
    pub max_multibulk_len: u64,
    pub max_query_buffer: u64,
}

/// A parsed client command: the arguments, binary-safe, sharing the read buffer.
#[derive(Debug, Clone)]
pub struct Request {
    pub args: Vec<Bytes>,
    /// The request as received when it was a RESP array, so it can be forwarded without re-encoding.
    pub raw: Option<Bytes>,
}

impl Request {
    pub fn from_args(args: Vec<Bytes>) -> Request {
        Request { args, raw: None }
    }

    /// The upper-cased command name, for dispatch (empty for an empty request).
    pub fn name_upper(&self) -> CommandName {
        CommandName::new(self.args.first().map(|a| a.as_ref()).unwrap_or_default())
    }

    /// The request in RESP form, as sent upstream.
    pub fn encode_into(&self, out: &mut BytesMut) {
        match &self.raw {
            Some(raw) => out.extend_from_slice(raw),
            None => encode_command(out, &self.args),
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
    fn new(raw: &[u8]) -> CommandName {
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

/// Result of looking at the client's buffer.
#[derive(Debug)]
pub enum Parsed {
    /// A complete request.
    Request(Request),
    /// A blank inline line (ignored by Redis).
    Empty,
    /// More input is needed.
    Incomplete,
}

/// Parses one request from the front of `buf`, consuming it.
pub fn parse_request(buf: &mut BytesMut, limits: &Limits) -> Result<Parsed, ProtocolError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if buf[0] != b'*' {
        return parse_inline(buf);
    }
    match resp2_decode_range(buf) {
        Ok(Some((frame, len))) => {
            let R2::Array(items) = frame else {
                // `*-1` and friends: Redis treats a null or empty multibulk as nothing.
                let _ = buf.split_to(len);
                return Ok(Parsed::Empty);
            };
            let raw = buf.split_to(len).freeze();
            let mut args = Vec::with_capacity(items.len());
            for item in &items {
                match item {
                    R2::BulkString((s, e)) => args.push(raw.slice(*s..*e)),
                    other => {
                        return Err(ProtocolError(format!(
                            "ERR Protocol error: expected '$', got '{}'",
                            kind_byte(other) as char
                        )))
                    }
                }
            }
            if args.is_empty() {
                return Ok(Parsed::Empty);
            }
            // The whole request is here: its parts can be checked directly.
            if args.len() as u64 > limits.max_multibulk_len {
                return Err(ProtocolError(
                    "ERR Protocol error: invalid multibulk length".into(),
                ));
            }
            if raw.len() as u64 > limits.max_bulk_len
                && args.iter().any(|a| a.len() as u64 > limits.max_bulk_len)
            {
                return Err(ProtocolError(
                    "ERR Protocol error: invalid bulk length".into(),
                ));
            }
            Ok(Parsed::Request(Request {
                args,
                raw: Some(raw),
            }))
        }
        Ok(None) => {
            check_header_limits(buf, limits)?;
            if buf.len() as u64 > limits.max_query_buffer {
                return Err(ProtocolError(
                    "ERR Protocol error: query buffer limit exceeded".into(),
                ));
            }
            Ok(Parsed::Incomplete)
        }
        Err(_) => Err(header_error(buf, limits).unwrap_or_else(|| {
            ProtocolError("ERR Protocol error: invalid multibulk request".into())
        })),
    }
}

fn kind_byte(f: &R2) -> u8 {
    match f {
        R2::SimpleString(_) => b'+',
        R2::Error(_) => b'-',
        R2::Integer(_) => b':',
        R2::BulkString(_) => b'$',
        R2::Array(_) => b'*',
        R2::Null => b'$',
    }
}

/// Reads `*N\r\n` and the following `$M\r\n` headers that are already buffered and
/// returns the error Redis would give for the first one out of bounds.
fn header_error(buf: &[u8], limits: &Limits) -> Option<ProtocolError> {
    let line = |from: usize| -> Option<(&[u8], usize)> {
        let rest = buf.get(from..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        Some((&rest[..end], from + end + 2))
    };
    let (head, mut pos) = match line(0) {
        Some(x) => x,
        None => {
            return (buf.len() > INLINE_MAX)
                .then(|| ProtocolError("ERR Protocol error: too big mbulk count string".into()))
        }
    };
    let count = parse_len(&head[1..]);
    let count = match count {
        Some(n) if n <= limits.max_multibulk_len as i64 => n,
        _ => {
            return Some(ProtocolError(
                "ERR Protocol error: invalid multibulk length".into(),
            ))
        }
    };
    for _ in 0..count {
        let Some((hdr, next)) = line(pos) else {
            return (buf.len() - pos > INLINE_MAX)
                .then(|| ProtocolError("ERR Protocol error: too big bulk count string".into()));
        };
        if hdr.first() != Some(&b'$') {
            let got = hdr.first().copied().unwrap_or(b'\r');
            return Some(ProtocolError(format!(
                "ERR Protocol error: expected '$', got '{}'",
                got as char
            )));
        }
        let len = match parse_len(&hdr[1..]) {
            Some(n) if n >= 0 && n as u64 <= limits.max_bulk_len => n as usize,
            _ => {
                return Some(ProtocolError(
                    "ERR Protocol error: invalid bulk length".into(),
                ))
            }
        };
        pos = next + len + 2;
        if pos > buf.len() {
            return None;
        }
    }
    None
}

fn check_header_limits(buf: &[u8], limits: &Limits) -> Result<(), ProtocolError> {
    match header_error(buf, limits) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn parse_len(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn parse_inline(buf: &mut BytesMut) -> Result<Parsed, ProtocolError> {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > INLINE_MAX {
            return Err(ProtocolError(
                "ERR Protocol error: too big inline request".into(),
            ));
        }
        return Ok(Parsed::Incomplete);
    };
    let line = buf.split_to(nl + 1);
    let mut line = &line[..nl];
    if line.last() == Some(&b'\r') {
        line = &line[..line.len() - 1];
    }
    match split_inline(line) {
        Some(args) if args.is_empty() => Ok(Parsed::Empty),
        Some(args) => Ok(Parsed::Request(Request::from_args(args))),
        None => Err(ProtocolError(
            "ERR Protocol error: unbalanced quotes in request".into(),
        )),
    }
}

/// Splits an inline command line the way Redis' `sdssplitargs` does: blanks
/// separate arguments, "double quotes" take C escapes, 'single quotes' take \'.
fn split_inline(line: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
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
                if line[i] == b'\\' && i + 3 < n && line[i + 1] == b'x' {
                    let hex = std::str::from_utf8(&line[i + 2..i + 4]).ok();
                    if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        cur.push(v);
                        i += 4;
                        continue;
                    }
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
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
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
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(line[i]);
                    i += 1;
                }
            } else {
                if i >= n || line[i].is_ascii_whitespace() {
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

/// What kind of reply frame was read from upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A regular reply.
    Normal,
    /// An error reply (`-` or `!`).
    Error,
    /// A nil (`$-1`, `*-1` or `_`).
    Nil,
    /// A RESP3 push (`>`): out of band unless it confirms a (un)subscribe.
    Push,
}

/// One framed upstream reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub bytes: Bytes,
    pub kind: ReplyKind,
}

/// Splits one complete reply off the front of `buf`, if there is one.
/// Handles RESP2 and RESP3 alike (RESP3's grammar is a superset).
pub fn parse_reply(buf: &mut BytesMut) -> Result<Option<Reply>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    match resp3_decode_range(buf) {
        Ok(Some((frame, len))) => {
            let kind = match frame {
                R3::SimpleError { .. } | R3::BlobError { .. } => ReplyKind::Error,
                R3::Null => ReplyKind::Nil,
                R3::Push { .. } => ReplyKind::Push,
                _ => ReplyKind::Normal,
            };
            Ok(Some(Reply {
                bytes: buf.split_to(len).freeze(),
                kind,
            }))
        }
        Ok(None) => Ok(None),
        // redis-protocol rejects two valid shapes: RESP2's null array (`*-1`,
        // e.g. an aborted EXEC) and RESP3 sets or maps whose members are
        // aggregates (COMMAND DOCS, COMMAND INFO). Those are framed by
        // counting, without decoding.
        Err(e) => match scan_frame(buf) {
            Ok(Some((len, kind))) => Ok(Some(Reply {
                bytes: buf.split_to(len).freeze(),
                kind,
            })),
            Ok(None) => Ok(None),
            Err(_) => Err(e.to_string()),
        },
    }
}

/// Finds the end of the one RESP2/RESP3 frame at the front of `buf` by
/// counting elements (no values are decoded): `Ok(None)` if incomplete.
fn scan_frame(buf: &[u8]) -> Result<Option<(usize, ReplyKind)>, String> {
    let mut pos = 0usize;
    let mut remaining: u64 = 1;
    let mut kind = None;
    while remaining > 0 {
        let Some(&t) = buf.get(pos) else {
            return Ok(None);
        };
        let Some(end) = buf[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|i| pos + i)
        else {
            return Ok(None);
        };
        let line = &buf[pos + 1..end];
        let number = || -> Result<i64, String> {
            std::str::from_utf8(line)
                .ok()
                .and_then(|l| l.parse::<i64>().ok())
                .ok_or_else(|| format!("bad length in frame of type {:?}", t as char))
        };
        let mut is_nil = false;
        pos = end + 2;
        match t {
            b'+' | b'-' | b':' | b'#' | b',' | b'(' => remaining -= 1,
            b'_' => {
                is_nil = true;
                remaining -= 1;
            }
            b'$' | b'!' | b'=' => {
                let n = number()?;
                if n < 0 {
                    is_nil = true;
                } else {
                    let end = pos + n as usize;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err("bulk string without CRLF".into());
                    }
                    pos = end + 2;
                }
                remaining -= 1;
            }
            b'*' | b'~' | b'>' => {
                let n = number()?;
                is_nil = n < 0;
                remaining = remaining - 1 + n.max(0) as u64;
            }
            b'%' => remaining = remaining - 1 + 2 * number()?.max(0) as u64,
            // Attributes precede the frame they describe, which is still to come.
            b'|' => remaining += 2 * number()?.max(0) as u64,
            other => return Err(format!("invalid frame type {:?}", other as char)),
        }
        if kind.is_none() && t != b'|' {
            kind = Some(match t {
                b'-' | b'!' => ReplyKind::Error,
                b'>' => ReplyKind::Push,
                _ if is_nil => ReplyKind::Nil,
                _ => ReplyKind::Normal,
            });
        }
    }
    Ok(Some((pos, kind.unwrap_or(ReplyKind::Normal))))
}

/// Length of the complete reply frame at the front of `buf`, RESP3 or RESP2.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    match resp3_decode_range(buf) {
        Ok(Some((_, len))) => Some(len),
        Ok(None) => None,
        Err(_) => scan_frame(buf).ok().flatten().map(|(len, _)| len),
    }
}

/// The element frames of an array, push or map reply, each still encoded.
fn elements(bytes: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    // A map's elements are its keys and values, alternating.
    let per_entry = match bytes.first() {
        Some(b'*') | Some(b'>') => 1,
        Some(b'%') => 2,
        _ => return None,
    };
    let header_end = bytes.windows(2).position(|w| w == b"\r\n")?;
    let entries: i64 = std::str::from_utf8(&bytes[1..header_end])
        .ok()?
        .parse()
        .ok()?;
    let n = entries * per_entry;
    let mut pos = header_end + 2;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let len = frame_len(&bytes[pos..])?;
        out.push(pos..pos + len);
        pos += len;
    }
    Some(out)
}

/// The elements of an array or push reply whose elements are strings or
/// integers, as byte strings (integers in decimal, nulls empty, nested
/// arrays as `*`). Used to read pub/sub confirmations and messages.
pub fn reply_strings(bytes: &[u8]) -> Option<Vec<Bytes>> {
    let ranges = elements(bytes)?;
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let item = &bytes[r];
        let line_end = item.windows(2).position(|w| w == b"\r\n")?;
        let value = match item[0] {
            b'$' => {
                let len: i64 = std::str::from_utf8(&item[1..line_end]).ok()?.parse().ok()?;
                if len < 0 {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(&item[line_end + 2..line_end + 2 + len as usize])
                }
            }
            b'+' | b':' => Bytes::copy_from_slice(&item[1..line_end]),
            b'_' => Bytes::new(),
            b'*' | b'>' | b'%' | b'~' => Bytes::from_static(b"*"),
            _ => return None,
        };
        out.push(value);
    }
    Some(out)
}

/// The elements of an array reply as raw encoded sub-replies (for MGET reassembly).
pub fn split_array(bytes: &Bytes) -> Option<Vec<Bytes>> {
    if bytes.first() != Some(&b'*') {
        return None;
    }
    Some(
        elements(bytes)?
            .into_iter()
            .map(|r| bytes.slice(r))
            .collect(),
    )
}

// --- Encoding -----------------------------------------------------------------

pub fn encode_command(out: &mut BytesMut, args: &[Bytes]) {
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    array_header(out, args.len());
    for a in args {
        bulk(out, a);
    }
}

pub fn command<I, A>(args: I) -> Bytes
where
    I: IntoIterator<Item = A>,
    A: AsRef<[u8]>,
{
    let args: Vec<Bytes> = args
        .into_iter()
        .map(|a| Bytes::copy_from_slice(a.as_ref()))
        .collect();
    let mut out = BytesMut::new();
    encode_command(&mut out, &args);
    out.freeze()
}

pub fn array_header(out: &mut BytesMut, n: usize) {
    out.put_u8(b'*');
    out.extend_from_slice(itoa(n as i64).as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub fn bulk(out: &mut BytesMut, data: &[u8]) {
    out.put_u8(b'$');
    out.extend_from_slice(itoa(data.len() as i64).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn itoa(n: i64) -> String {
    n.to_string()
}

pub fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

pub fn simple(s: &str) -> Bytes {
    Bytes::from(format!("+{s}\r\n"))
}

/// An error reply; `msg` starts with the error code (`ERR ...`, `NOAUTH ...`).
pub fn error(msg: &str) -> Bytes {
    // Error lines cannot contain CR or LF.
    let clean: String = msg
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    Bytes::from(format!("-{clean}\r\n"))
}

pub fn integer(n: i64) -> Bytes {
    Bytes::from(format!(":{n}\r\n"))
}

pub fn bulk_bytes(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 16);
    bulk(&mut out, data);
    out.freeze()
}

pub fn nil(resp3: bool) -> Bytes {
    if resp3 {
        Bytes::from_static(b"_\r\n")
    } else {
        Bytes::from_static(b"$-1\r\n")
    }
}

/// A map reply in the client's protocol: a RESP3 map, or a flat RESP2 array.
pub fn map(resp3: bool, pairs: &[(&str, Bytes)]) -> Bytes {
    let mut out = BytesMut::new();
    if resp3 {
        out.extend_from_slice(format!("%{}\r\n", pairs.len()).as_bytes());
    } else {
        array_header(&mut out, pairs.len() * 2);
    }
    for (k, v) in pairs {
        bulk(&mut out, k.as_bytes());
        out.extend_from_slice(v);
    }
    out.freeze()
}

pub fn array(items: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    array_header(&mut out, items.len());
    for i in items {
        out.extend_from_slice(i);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bulk_len: 1 << 20,
        max_multibulk_len: 1024,
        max_query_buffer: 1 << 24,
    };

    fn parse(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match parse_request(&mut buf, &LIMITS)? {
                Parsed::Request(r) => out.push(r.args.iter().map(|a| a.to_vec()).collect()),
                Parsed::Empty => {}
                Parsed::Incomplete => return Ok(out),
            }
        }
    }

    #[test]
    fn resp_and_inline_requests() {
        let got =
            parse(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\nset \"a b\" 'c\\'d'\r\n\r\n").unwrap();
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
    fn partial_requests_wait() {
        assert_eq!(parse(b"*2\r\n$3\r\nGE").unwrap().len(), 0);
        assert_eq!(parse(b"PIN").unwrap().len(), 0);
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
            "ERR Protocol error: expected '+', got '+'".replace("expected '+'", "expected '$'")
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

    #[test]
    fn replies_are_framed_whole() {
        let mut buf = BytesMut::from(&b"+OK\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n_\r\n-ERR x\r\n>2\r\n$4\r\npush\r\n:1\r\n%1\r\n"[..]);
        let kinds: Vec<_> = std::iter::from_fn(|| parse_reply(&mut buf).unwrap())
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            kinds,
            vec![
                ReplyKind::Normal,
                ReplyKind::Normal,
                ReplyKind::Normal,
                ReplyKind::Nil,
                ReplyKind::Error,
                ReplyKind::Push
            ]
        );
        assert_eq!(&buf[..], b"%1\r\n");
        // A set of maps (COMMAND DOCS in RESP3), which redis-protocol cannot hash.
        let mut buf = BytesMut::from(&b"~1\r\n%1\r\n$1\r\na\r\n*1\r\n:1\r\n+OK\r\n"[..]);
        assert_eq!(parse_reply(&mut buf).unwrap().unwrap().bytes.len(), 23);
        assert_eq!(&buf[..], b"+OK\r\n");
        let mut partial = BytesMut::from(&b"~1\r\n%1\r\n$1\r\na\r\n*1"[..]);
        assert!(parse_reply(&mut partial).unwrap().is_none());
        let mut buf = BytesMut::from(&b"*-1\r\n*2\r\n*-1\r\n:1\r\n"[..]);
        assert_eq!(parse_reply(&mut buf).unwrap().unwrap().kind, ReplyKind::Nil);
        assert_eq!(
            parse_reply(&mut buf).unwrap().unwrap().kind,
            ReplyKind::Normal
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn strings_of_arrays_pushes_and_maps() {
        let map = b"%1\r\n$22\r\nnotify-keyspace-events\r\n$3\r\nAKE\r\n";
        let parts = reply_strings(map).unwrap();
        assert_eq!(
            parts,
            vec![
                Bytes::from_static(b"notify-keyspace-events"),
                Bytes::from_static(b"AKE")
            ]
        );
        let push = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        assert_eq!(reply_strings(push).unwrap()[2], Bytes::from_static(b"1"));
        assert!(reply_strings(b"+OK\r\n").is_none());
    }

    #[test]
    fn arrays_split_into_elements() {
        let b = Bytes::from_static(b"*3\r\n$1\r\na\r\n$-1\r\n*1\r\n:5\r\n");
        let parts = split_array(&b).unwrap();
        assert_eq!(
            parts,
            vec![
                Bytes::from_static(b"$1\r\na\r\n"),
                Bytes::from_static(b"$-1\r\n"),
                Bytes::from_static(b"*1\r\n:5\r\n")
            ]
        );
    }
}
