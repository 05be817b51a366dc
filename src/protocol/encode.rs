//! Encoding of the replies nearcache writes itself and the commands it sends.

use bytes::{BufMut, Bytes, BytesMut};

pub fn encode_command(out: &mut BytesMut, args: &[Bytes]) {
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    array_header(out, args.len());
    for a in args {
        bulk(out, a);
    }
}

/// A command from any byte-string arguments, RESP-encoded.
pub fn command<I, A>(args: I) -> Bytes
where
    I: IntoIterator<Item = A>,
    A: AsRef<[u8]>,
{
    let mut out = BytesMut::new();
    let args: Vec<A> = args.into_iter().collect();
    array_header(&mut out, args.len());
    for a in &args {
        bulk(&mut out, a.as_ref());
    }
    out.freeze()
}

/// Appends a decimal integer without allocating.
pub fn put_int(out: &mut BytesMut, n: i64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.put_u8(b'-');
    }
    out.extend_from_slice(&digits[i..]);
}

fn header(out: &mut BytesMut, kind: u8, n: i64) {
    out.put_u8(kind);
    put_int(out, n);
    out.extend_from_slice(b"\r\n");
}

pub fn array_header(out: &mut BytesMut, n: usize) {
    header(out, b'*', n as i64);
}

pub fn bulk(out: &mut BytesMut, data: &[u8]) {
    header(out, b'$', data.len() as i64);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
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
    let mut out = BytesMut::with_capacity(24);
    header(&mut out, b':', n);
    out.freeze()
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
        header(&mut out, b'%', pairs.len() as i64);
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
    let mut out = BytesMut::with_capacity(16 + items.iter().map(|i| i.len()).sum::<usize>());
    array_header(&mut out, items.len());
    for i in items {
        out.extend_from_slice(i);
    }
    out.freeze()
}

/// A RESP3 push (`>`) in RESP3, or the same elements as an array in RESP2.
pub fn push(resp3: bool, items: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + items.iter().map(|i| i.len()).sum::<usize>());
    header(
        &mut out,
        if resp3 { b'>' } else { b'*' },
        items.len() as i64,
    );
    for i in items {
        out.extend_from_slice(i);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_headers() {
        for n in [0i64, 7, -1, 10, 1234567890, i64::MIN, i64::MAX] {
            let mut out = BytesMut::new();
            put_int(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
        assert_eq!(&integer(-3)[..], b":-3\r\n");
        assert_eq!(
            &command(["GET", "k"])[..],
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        assert_eq!(&error("ERR a\r\nb")[..], b"-ERR a  b\r\n");
    }
}
