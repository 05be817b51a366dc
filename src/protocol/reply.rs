//! Upstream replies: finding where each RESP2/RESP3 frame ends, and reading
//! the few replies nearcache looks inside (pub/sub confirmations, tracking
//! invalidations, MGET elements).
//!
//! Framing counts elements instead of decoding them: one counter of the
//! elements still owed, no recursion and no stack, so a reply nested
//! 100,000 levels deep costs no more than a flat one of the same size. The
//! framer is resumable: after a partial read it continues where it stopped,
//! so a 100 MB reply arriving in 64 KB reads is scanned once.

use bytes::{Bytes, BytesMut};

use super::request::{find_crlf, parse_int};

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

impl Reply {
    /// The error line without `-` and CRLF, if this is a simple error.
    pub fn error_text(&self) -> Option<String> {
        (self.kind == ReplyKind::Error).then(|| {
            String::from_utf8_lossy(&self.bytes[1..])
                .trim_end()
                .to_string()
        })
    }
}

/// Finds frame boundaries in a stream of replies, resuming inside a partial one.
#[derive(Debug, Default)]
pub struct ReplyFramer {
    /// Where the next element of the current frame starts.
    pos: usize,
    /// Elements the current frame still owes (0: between frames).
    remaining: u64,
    kind: Option<ReplyKind>,
}

impl ReplyFramer {
    /// Splits the next complete reply off the front of `buf`.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>, String> {
        Ok(self.scan(buf)?.map(|(len, kind)| Reply {
            bytes: buf.split_to(len).freeze(),
            kind,
        }))
    }

    /// Length and kind of the complete frame at the front of `buf`, if it is
    /// all there. `buf` must be the same stream as on the previous call, with
    /// at most more bytes appended (and any complete frame removed).
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<(usize, ReplyKind)>, String> {
        if self.remaining == 0 {
            self.pos = 0;
            self.remaining = 1;
            self.kind = None;
        }
        while self.remaining > 0 {
            let Some(&t) = buf.get(self.pos) else {
                return Ok(None);
            };
            let Some(cr) = find_crlf(buf, self.pos) else {
                return Ok(None);
            };
            // An empty line ("\r\n" where a frame should start) has no type byte.
            let Some(line) = buf.get(self.pos + 1..cr) else {
                return Err(format!("invalid frame type {:?}", t as char));
            };
            let number = || {
                parse_int(line).ok_or_else(|| {
                    format!(
                        "bad length {:?} in a frame of type {:?}",
                        String::from_utf8_lossy(&line[..line.len().min(32)]),
                        t as char
                    )
                })
            };
            let mut next = cr + 2;
            let mut nil = false;
            // Elements this one adds to the frame (aggregates), beyond itself.
            let mut adds: u64 = 0;
            let mut counts_itself = true;
            match t {
                b'+' | b'-' | b':' | b'#' | b',' | b'(' => {}
                b'_' => nil = true,
                b'$' | b'!' | b'=' => {
                    let n = number()?;
                    if n < 0 {
                        nil = true;
                    } else {
                        let end = next
                            .checked_add(n as usize)
                            .ok_or("bulk length out of range")?;
                        if buf.len() < end + 2 {
                            return Ok(None);
                        }
                        if &buf[end..end + 2] != b"\r\n" {
                            return Err("bulk string without CRLF".into());
                        }
                        next = end + 2;
                    }
                }
                b'*' | b'~' | b'>' => {
                    let n = number()?;
                    nil = n < 0;
                    adds = n.max(0) as u64;
                }
                b'%' => adds = 2 * number()?.max(0) as u64,
                // Attributes precede the frame they describe, which is still to come.
                b'|' => {
                    adds = 2 * number()?.max(0) as u64;
                    counts_itself = false;
                }
                other => return Err(format!("invalid frame type {:?}", other as char)),
            }
            // The reply's kind is its first element outside attributes: while
            // a leading attribute's entries are read, the reply itself is
            // still owed, so more than one element is.
            if self.kind.is_none() && t != b'|' && self.remaining == 1 {
                self.kind = Some(match t {
                    b'-' | b'!' => ReplyKind::Error,
                    b'>' => ReplyKind::Push,
                    _ if nil => ReplyKind::Nil,
                    _ => ReplyKind::Normal,
                });
            }
            self.remaining = self
                .remaining
                .checked_add(adds)
                .ok_or("aggregate length out of range")?
                - counts_itself as u64;
            self.pos = next;
        }
        let len = self.pos;
        self.pos = 0;
        Ok(Some((len, self.kind.take().unwrap_or(ReplyKind::Normal))))
    }
}

/// Length of the complete reply frame at the front of `buf`, RESP3 or RESP2.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    ReplyFramer::default()
        .scan(buf)
        .ok()
        .flatten()
        .map(|(len, _)| len)
}

/// The element frames of an array, set, push or map reply (a map's keys and
/// values alternate), each still encoded. One level only: nested aggregates
/// are returned whole.
pub fn elements(bytes: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let per_entry = match bytes.first() {
        Some(b'*') | Some(b'>') | Some(b'~') => 1,
        Some(b'%') => 2,
        _ => return None,
    };
    let cr = find_crlf(bytes, 0)?;
    let entries = parse_int(&bytes[1..cr])?;
    let n = entries.max(0).checked_mul(per_entry)? as usize;
    let mut pos = cr + 2;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let len = frame_len(bytes.get(pos..)?)?;
        out.push(pos..pos + len);
        pos += len;
    }
    Some(out)
}

/// The value of a string, integer or null frame as bytes (integers in
/// decimal, nulls empty, a verbatim string without its format, aggregates
/// as `*`), or `None` for anything else.
pub fn scalar(item: &[u8]) -> Option<Bytes> {
    let cr = find_crlf(item, 0)?;
    Some(match item.first()? {
        b'$' | b'=' => {
            let len = parse_int(&item[1..cr])?;
            if len < 0 {
                Bytes::new()
            } else {
                let data = item.get(cr + 2..cr + 2 + len as usize)?;
                // A verbatim string starts with its three-letter format and a colon.
                let data = if item[0] == b'=' {
                    data.get(4..)?
                } else {
                    data
                };
                Bytes::copy_from_slice(data)
            }
        }
        b'+' | b':' => Bytes::copy_from_slice(&item[1..cr]),
        b'_' => Bytes::new(),
        b'*' | b'>' | b'%' | b'~' => Bytes::from_static(b"*"),
        _ => return None,
    })
}

/// The elements of an array, push or map reply whose elements are strings
/// or integers, as byte strings (see [`scalar`]). Used to read pub/sub
/// confirmations and messages.
pub fn reply_strings(bytes: &[u8]) -> Option<Vec<Bytes>> {
    elements(bytes)?
        .into_iter()
        .map(|r| scalar(&bytes[r]))
        .collect()
}

/// The first element of an array or push as a string: the message kind of
/// pub/sub and tracking messages (`message`, `invalidate`, ...).
pub fn first_word(bytes: &[u8]) -> Option<Bytes> {
    if !matches!(bytes.first(), Some(b'*') | Some(b'>')) {
        return None;
    }
    let cr = find_crlf(bytes, 0)?;
    if parse_int(&bytes[1..cr])? < 1 {
        return None;
    }
    let start = cr + 2;
    let len = frame_len(bytes.get(start..)?)?;
    scalar(&bytes[start..start + len])
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

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds(input: &[u8]) -> (Vec<ReplyKind>, BytesMut) {
        let mut buf = BytesMut::from(input);
        let mut framer = ReplyFramer::default();
        let kinds = std::iter::from_fn(|| framer.next(&mut buf).unwrap())
            .map(|r| r.kind)
            .collect();
        (kinds, buf)
    }

    #[test]
    fn replies_are_framed_whole() {
        let (kinds, rest) = all_kinds(
            b"+OK\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n_\r\n-ERR x\r\n>2\r\n$4\r\npush\r\n:1\r\n%1\r\n",
        );
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
        assert_eq!(&rest[..], b"%1\r\n");
        // A set of maps (COMMAND DOCS in RESP3).
        let (kinds, rest) = all_kinds(b"~1\r\n%1\r\n$1\r\na\r\n*1\r\n:1\r\n+OK\r\n");
        assert_eq!(kinds.len(), 2);
        assert!(rest.is_empty());
        let (kinds, _) = all_kinds(b"*-1\r\n*2\r\n*-1\r\n:1\r\n|1\r\n+a\r\n+b\r\n:5\r\n");
        assert_eq!(
            kinds,
            vec![ReplyKind::Nil, ReplyKind::Normal, ReplyKind::Normal]
        );
        assert_eq!(frame_len(b"|1\r\n+a\r\n+b\r\n:5\r\n"), Some(16));
    }

    #[test]
    fn byte_by_byte_equals_all_at_once() {
        let input: &[u8] =
            b"*3\r\n$3\r\nabc\r\n%1\r\n+k\r\n*1\r\n,1.5\r\n_\r\n>2\r\n+x\r\n:1\r\n!3\r\nerr\r\n";
        let mut framer = ReplyFramer::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in input {
            buf.extend_from_slice(&[*b]);
            while let Some(r) = framer.next(&mut buf).unwrap() {
                got.push(r.bytes.to_vec());
            }
        }
        let mut whole = BytesMut::from(input);
        let mut framer = ReplyFramer::default();
        let expected: Vec<Vec<u8>> = std::iter::from_fn(|| framer.next(&mut whole).unwrap())
            .map(|r| r.bytes.to_vec())
            .collect();
        assert_eq!(got, expected);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn deep_nesting_is_counted_not_recursed() {
        let depth = 1_000_000;
        let mut deep = b"*1\r\n".repeat(depth);
        deep.extend_from_slice(b"-ERR reached lua stack limit\r\n");
        assert_eq!(frame_len(&deep), Some(deep.len()));
        let (kinds, rest) = all_kinds(&deep);
        assert_eq!(kinds, vec![ReplyKind::Normal]);
        assert!(rest.is_empty());
        // Walking one level of it is fine too.
        assert_eq!(elements(&deep).unwrap().len(), 1);
        assert_eq!(first_word(&deep).as_deref(), Some(&b"*"[..]));
    }

    #[test]
    fn malformed_replies_are_errors() {
        let mut f = ReplyFramer::default();
        assert!(f.scan(b"?x\r\n").is_err());
        let mut f = ReplyFramer::default();
        assert!(f.scan(b"$3\r\nabcde\r\n").is_err());
        let mut f = ReplyFramer::default();
        assert!(f.scan(b"*x\r\n").is_err());
        let mut f = ReplyFramer::default();
        assert!(f
            .scan(b"*9223372036854775807\r\n%9223372036854775807\r\n")
            .is_err());
    }

    /// Found by fuzz/ (replies): an empty line where a frame starts
    /// panicked (slice index) instead of being a framing error.
    #[test]
    fn empty_line_is_an_error_not_a_panic() {
        assert!(ReplyFramer::default().scan(b"\r\n").is_err());
        assert!(ReplyFramer::default().scan(b"*2\r\n:1\r\n\r\n").is_err());
        assert_eq!(frame_len(b"*1\r\n\r\n"), None);
    }

    /// Found by fuzz/ (replies, against redis-protocol): the kind of a reply
    /// with an attribute came from the attribute's first key.
    #[test]
    fn attributed_reply_has_the_kind_of_the_reply() {
        let (kinds, rest) = all_kinds(
            b"|1\r\n+a\r\n+b\r\n-ERR x\r\n|1\r\n$1\r\nk\r\n*1\r\n-E\r\n_\r\n|1\r\n-k\r\n:1\r\n>1\r\n+m\r\n",
        );
        assert_eq!(
            kinds,
            vec![ReplyKind::Error, ReplyKind::Nil, ReplyKind::Push]
        );
        assert!(rest.is_empty());
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
        assert_eq!(first_word(push).unwrap(), Bytes::from_static(b"subscribe"));
        assert!(reply_strings(b"+OK\r\n").is_none());
        assert_eq!(
            scalar(b"=9\r\ntxt:a b c\r\n").unwrap(),
            Bytes::from_static(b"a b c")
        );
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
