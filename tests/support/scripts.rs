//! The command-family scripts of the differential tests and their runners
//! (included by `tests/commands.rs`, nearcache in front of single Redis
//! servers, and `tests/cluster_commands.rs`, in front of a Redis Cluster):
//! each script runs line by line on a reference redis-server and through
//! every nearcache under test; replies are compared byte for byte (raw
//! sockets, one at a time and pipelined) or as `redis` crate values (sync,
//! pipelined, async multiplexed), in RESP2 and RESP3.
//!
//! Script lines are command lines (redis-cli-like quoting: `"..."` with
//! `\xHH`, `\r`, `\n`, `\t`, `\"`, `\\` escapes; `'...'` literal), optionally
//! preceded by directives:
//! - `@sort`: compare replies after sorting every aggregate (unordered replies)
//! - `@skip`: run, but do not compare the reply
//! - `@approx N`: integer replies may differ by at most N
//! - `@other`: run on the script's second connection
//! - `@noreply`: send, read no reply (CLIENT REPLY OFF/SKIP)
//! - `@read`: read one more frame on the main connection (pub/sub messages)
//! - `@sleep N`: sleep N milliseconds
//! - `@crossslot`: in front of a cluster, the reply must be the node's own
//!   `-CROSSSLOT` error (the keys are in several slots and the command
//!   cannot be split); nothing after it may depend on what it did on the
//!   reference
//! - `@nocluster 'why'`: not run at all (on the reference neither) when the
//!   servers under test form a cluster: the line has no cluster meaning
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::Value;

// --- RESP framing --------------------------------------------------------------------

/// One parsed RESP frame: its byte range, type byte and children.
struct Node {
    start: usize,
    head_end: usize,
    end: usize,
    kind: u8,
    children: Vec<Node>,
}

fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

fn parse_node(buf: &[u8], start: usize) -> Option<Node> {
    let kind = *buf.get(start)?;
    let le = line_end(buf, start)?;
    let head_end = le + 2;
    let num = || -> i64 {
        std::str::from_utf8(&buf[start + 1..le])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "bad RESP header {:?}",
                    String::from_utf8_lossy(&buf[start..le])
                )
            })
    };
    let leaf = |end| Node {
        start,
        head_end,
        end,
        kind,
        children: Vec::new(),
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Some(leaf(head_end)),
        b'$' | b'!' | b'=' => {
            let n = num();
            if n < 0 {
                return Some(leaf(head_end));
            }
            let end = head_end + n as usize + 2;
            (buf.len() >= end).then(|| leaf(end))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = num();
            if n < 0 {
                return Some(leaf(head_end));
            }
            let count = if matches!(kind, b'%' | b'|') {
                2 * n as usize
            } else {
                n as usize
            };
            let mut children = Vec::with_capacity(count);
            let mut pos = head_end;
            for _ in 0..count {
                let c = parse_node(buf, pos)?;
                pos = c.end;
                children.push(c);
            }
            if kind == b'|' {
                // An attribute precedes the reply it annotates.
                let c = parse_node(buf, pos)?;
                pos = c.end;
                children.push(c);
            }
            Some(Node {
                start,
                head_end,
                end: pos,
                kind,
                children,
            })
        }
        other => panic!(
            "unexpected RESP type byte {:?} in {:?}",
            other as char,
            String::from_utf8_lossy(&buf[start..buf.len().min(start + 200)])
        ),
    }
}

/// The frame's bytes with every aggregate's elements sorted (maps by pair).
fn canonical(buf: &[u8], n: &Node) -> Vec<u8> {
    if n.children.is_empty() {
        return buf[n.start..n.end].to_vec();
    }
    let mut out = buf[n.start..n.head_end].to_vec();
    let mut parts: Vec<Vec<u8>> = if n.kind == b'%' {
        n.children
            .chunks(2)
            .map(|p| {
                let mut v = canonical(buf, &p[0]);
                v.extend(canonical(buf, &p[1]));
                v
            })
            .collect()
    } else {
        n.children.iter().map(|c| canonical(buf, c)).collect()
    };
    parts.sort();
    for p in parts {
        out.extend(p);
    }
    out
}

/// A raw RESP connection.
pub struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    label: String,
    closed: bool,
}

impl Raw {
    pub fn connect(port: u16, label: &str) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw {
            s,
            buf: Vec::new(),
            label: label.to_string(),
            closed: false,
        }
    }

    pub fn send(&mut self, args: &[Vec<u8>]) {
        // A closed connection shows up as a `<closed>` reply.
        let _ = self.s.write_all(&encode(args));
    }

    /// Reads one frame; returns (raw bytes, canonical bytes).
    pub fn read(&mut self) -> (Vec<u8>, Vec<u8>) {
        self.try_read(Duration::from_secs(10))
            .unwrap_or_else(|| (b"<no reply in 10 s>".to_vec(), Vec::new()))
    }

    pub fn try_read(&mut self, wait: Duration) -> Option<(Vec<u8>, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        let mut tmp = vec![0u8; 64 * 1024];
        loop {
            if !self.buf.is_empty() {
                if let Some(n) = parse_node(&self.buf, 0) {
                    let raw = self.buf[..n.end].to_vec();
                    let canon = canonical(&self.buf, &n);
                    self.buf.drain(..n.end);
                    return Some((raw, canon));
                }
            }
            if self.closed {
                return Some((b"<closed>".to_vec(), b"<closed>".to_vec()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            match self.s.read(&mut tmp) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(_) => self.closed = true,
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> Vec<u8> {
        self.send(&tokenize(line));
        self.read().0
    }
}

pub fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).bytes());
        out.extend(a);
        out.extend(b"\r\n");
    }
    out
}

/// Splits a command line like redis-cli does.
pub fn tokenize(line: &str) -> Vec<Vec<u8>> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let mut tok = Vec::new();
        match b[i] {
            b'"' => {
                i += 1;
                while b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                        match b[i] {
                            b'n' => tok.push(b'\n'),
                            b'r' => tok.push(b'\r'),
                            b't' => tok.push(b'\t'),
                            b'x' => {
                                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                                tok.push(u8::from_str_radix(h, 16).unwrap());
                                i += 2;
                            }
                            c => tok.push(c),
                        }
                    } else {
                        tok.push(b[i]);
                    }
                    i += 1;
                }
                i += 1;
            }
            b'\'' => {
                i += 1;
                while b[i] != b'\'' {
                    tok.push(b[i]);
                    i += 1;
                }
                i += 1;
            }
            _ => {
                while i < b.len() && b[i] != b' ' {
                    tok.push(b[i]);
                    i += 1;
                }
            }
        }
        out.push(tok);
    }
    out
}

pub fn show(b: &[u8]) -> String {
    let s: String = b.escape_ascii().to_string();
    if s.len() > 300 {
        format!("{}... ({} bytes)", &s[..300], b.len())
    } else {
        s
    }
}

// --- Scripts -------------------------------------------------------------------------

pub struct Script {
    pub name: &'static str,
    /// Can run through the redis crate (no @noreply/@read, one reply per command).
    pub typed: bool,
    /// Why the script is not run in front of a cluster (it has no cluster meaning).
    pub not_in_cluster: Option<&'static str>,
    pub lines: &'static [&'static str],
}

#[derive(Default, Clone, Copy)]
pub struct Directives<'a> {
    pub sort: bool,
    pub skip: bool,
    pub approx: Option<i64>,
    pub other: bool,
    pub noreply: bool,
    pub read: bool,
    pub sleep: Option<u64>,
    pub crossslot: bool,
    /// Why the line is left out in front of a cluster.
    pub nocluster: Option<&'a str>,
}

pub fn directives(line: &str) -> (Directives<'_>, &str) {
    let mut d = Directives::default();
    let mut rest = line.trim_start();
    while let Some(r) = rest.strip_prefix('@') {
        let (word, tail) = r.split_once(' ').unwrap_or((r, ""));
        let mut tail = tail.trim_start();
        match word {
            "sort" => d.sort = true,
            "skip" => d.skip = true,
            "other" => d.other = true,
            "noreply" => d.noreply = true,
            "read" => d.read = true,
            "crossslot" => d.crossslot = true,
            "nocluster" => {
                let (why, t) = tail
                    .strip_prefix('\'')
                    .and_then(|t| t.split_once('\''))
                    .unwrap_or_else(|| panic!("@nocluster needs a 'reason': {line}"));
                d.nocluster = Some(why);
                tail = t.trim_start();
            }
            "approx" | "sleep" => {
                let (n, t) = tail.split_once(' ').unwrap_or((tail, ""));
                let n: i64 = n.parse().unwrap();
                if word == "approx" {
                    d.approx = Some(n);
                } else {
                    d.sleep = Some(n as u64);
                }
                tail = t.trim_start();
            }
            other => panic!("unknown directive @{other}"),
        }
        rest = tail;
    }
    (d, rest)
}

pub fn int_of(frame: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(frame).ok()?;
    s.strip_prefix(':')?.trim_end().parse().ok()
}

pub const FUNCTION_LIB: &str = "\"#!lua name=mylib\\nredis.register_function('myset', function(keys, args) return redis.call('SET', keys[1], args[1]) end)\\nredis.register_function{function_name='myget', callback=function(keys, args) return redis.call('GET', keys[1]) end, flags={'no-writes'}}\"";

pub fn scripts() -> Vec<Script> {
    vec![
        Script {
            name: "strings",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "SET s1 hello",
                "GET s1",
                "GET s1",
                "SET s1 world NX",
                "SET s1 world XX GET",
                "GET s1",
                "SET s2 v EX 100",
                "TTL s2",
                "SET s2 v2 KEEPTTL",
                "TTL s2",
                "SET s2 v3 PX 100000 GET",
                "@approx 1000 PTTL s2",
                "GETEX s2 PERSIST",
                "TTL s2",
                "GETEX s2 EX 50",
                "TTL s2",
                "GETEX s2",
                "GETDEL s2",
                "GETDEL s2",
                "GET s2",
                "EXISTS s2",
                "APPEND s3 abc",
                "APPEND s3 def",
                "GET s3",
                "STRLEN s3",
                "STRLEN s3",
                "SETRANGE s3 3 XYZ",
                "GET s3",
                "GETRANGE s3 1 4",
                "GETRANGE s3 1 4",
                "GETRANGE s3 -2 -1",
                "SETRANGE s3 10 tail",
                "GET s3",
                "SUBSTR s3 0 2",
                "SET f 10.5",
                "INCRBYFLOAT f 0.1",
                "INCRBYFLOAT f 5.0e3",
                "GET f",
                "INCRBYFLOAT s3 1",
                "INCR n",
                "INCRBY n 10",
                "DECR n",
                "DECRBY n 3",
                "GET n",
                "INCR s3",
                "INCRBY n abc",
                "MSET m1 a m2 b m3 c",
                "MGET m1 m2 nosuch m3",
                "MGET m1 m1",
                "MGET m1 m2 nosuch m3",
                "SET m2 changed",
                "MGET m1 m2 nosuch m3",
                "@crossslot MSETNX m1 x m4 d",
                "MSETNX {m}4 d {m}5 e",
                "MGET {m}4 {m}5",
                "MSET m1",
                "SET {lcs}1 ohmytext",
                "SET {lcs}2 mynewtext",
                "LCS {lcs}1 {lcs}2",
                "LCS {lcs}1 {lcs}2 LEN",
                "LCS {lcs}1 {lcs}2 IDX MINMATCHLEN 4 WITHMATCHLEN",
                "@crossslot LCS lcs1 lcs2",
                "SETNX s1 x",
                "SETNX snx y",
                "SETEX sx 100 v",
                "TTL sx",
                "PSETEX sy 100000 v",
                "GETSET s1 newer",
                "GET s1",
                "GET s1 extra",
                "SET s1 v EX 0",
                "SET s1 v EX 10 PX 100",
                "SET s1 v NX XX",
                "SET s1 v KEEPTTL EX 10",
                "GET",
                "SET s1",
            ],
        },
        Script {
            name: "expiry_and_cache_consistency",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "SET ex v PX 150",
                "GET ex",
                "GET ex",
                "EXISTS ex",
                "TYPE ex",
                "STRLEN ex",
                "@sleep 400",
                "GET ex",
                "EXISTS ex",
                "TYPE ex",
                "STRLEN ex",
                "SET tk v",
                "TYPE tk",
                "DEL tk",
                "HSET tk f v",
                "TYPE tk",
                "HGET tk f",
                "@other HSET tk f v2",
                "HGET tk f",
                "@other DEL tk",
                "HGET tk f",
                "EXISTS tk",
            ],
        },
        Script {
            name: "hashes",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "HSET h f1 v1 f2 v2 f3 v3",
                "HGET h f1",
                "HGET h f1",
                "HGETALL h",
                "HGETALL h",
                "HMGET h f1 nosuch f3",
                "HMGET h f1 nosuch f3",
                "HLEN h",
                "HEXISTS h f2",
                "HEXISTS h nosuch",
                "HSTRLEN h f1",
                "HSETNX h f1 x",
                "HSETNX h f4 v4",
                "HINCRBY h cnt 5",
                "HINCRBYFLOAT h fl 1.5",
                "HINCRBYFLOAT h fl 1e2",
                "HINCRBY h f1 1",
                "HKEYS h",
                "HVALS h",
                "HDEL h f2 nosuch",
                "HGETALL h",
                "HMSET h a 1 b 2",
                "HGETALL h",
                "HRANDFIELD h 100",
                "HRANDFIELD h 100 WITHVALUES",
                "HSET h1 only v",
                "HRANDFIELD h1",
                "HRANDFIELD h1 -3",
                "HRANDFIELD h1 -3 WITHVALUES",
                "HRANDFIELD nosuch",
                "HRANDFIELD nosuch 5",
                "HSCAN h 0",
                "HSCAN h 0 MATCH f*",
                "HGETALL nosuch",
                "HGET nosuch f",
                "SET str x",
                "HGET str f",
                "HGETALL str",
                "HSET h",
                "HSET h f",
                "HINCRBY h f1 x",
            ],
        },
        Script {
            name: "lists",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "RPUSH l a b c a b c",
                "LRANGE l 0 -1",
                "LRANGE l 0 -1",
                "LPOS l b",
                "LPOS l b RANK 2",
                "LPOS l b RANK -1",
                "LPOS l b COUNT 0",
                "LPOS l z",
                "LPOS l z COUNT 0",
                "LPOS l b MAXLEN 1",
                "LPOS l b RANK 0",
                "LINSERT l BEFORE c X",
                "LINSERT l AFTER nosuch Y",
                "LINSERT l MIDDLE c Y",
                "LRANGE l 0 -1",
                "LLEN l",
                "LINDEX l 2",
                "LINDEX l 100",
                "LSET l 0 A",
                "LSET l 100 x",
                "LRANGE l 0 -1",
                "LREM l 1 b",
                "LMOVE l {l}2 LEFT RIGHT",
                "LMOVE l {l}2 RIGHT LEFT",
                "LRANGE {l}2 0 -1",
                "LRANGE l 0 -1",
                "LMPOP 2 {l}nosuch l LEFT COUNT 2",
                "LMPOP 1 nosuch RIGHT",
                "LMPOP 0 l LEFT",
                "LPOP l",
                "RPOP l 2",
                "LPOP nosuch",
                "LPOP nosuch 2",
                "LPUSHX nosuch a",
                "RPUSHX {l}2 z",
                "LTRIM {l}2 0 1",
                "RPOPLPUSH {l}2 {l}3",
                "@crossslot RPOPLPUSH nosuch l",
                "LRANGE {l}3 0 -1",
                "LRANGE {l}2 0 -1",
                "RPUSH srt 3 1 2",
                "SORT srt",
                "SORT srt DESC LIMIT 0 2",
                "SORT_RO srt",
                "SORT srt STORE {srt}d",
                "LRANGE {srt}d 0 -1",
                "SET str x",
                "LPUSH str a",
                "LRANGE str 0 -1",
                "LRANGE nosuch 0 -1",
            ],
        },
        Script {
            name: "sets",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "SADD s a b c d",
                "@sort SMEMBERS s",
                "@sort SMEMBERS s",
                "SADD si 3 1 2",
                "SMEMBERS si",
                "SMEMBERS si",
                "SISMEMBER s a",
                "SISMEMBER s a",
                "SMISMEMBER s a z b",
                "SCARD s",
                "SADD {s}2 c d e f",
                "SINTERCARD 2 s {s}2",
                "SINTERCARD 2 s {s}2 LIMIT 1",
                "@sort SINTER s {s}2",
                "@sort SUNION s {s}2",
                "@sort SDIFF s {s}2",
                "SINTERSTORE {s}d1 s {s}2",
                "SUNIONSTORE {s}d2 s {s}2",
                "SDIFFSTORE {s}d3 s {s}2",
                "@sort SMEMBERS {s}d1",
                "@sort SMEMBERS {s}d2",
                "@sort SMEMBERS {s}d3",
                "SMOVE s {s}2 a",
                "@crossslot SMOVE s nosuch zz",
                "@crossslot SINTERCARD 2 s nosuch",
                "SISMEMBER s a",
                "SREM s b nosuch",
                "@sort SMEMBERS s",
                "SADD one x",
                "SRANDMEMBER one",
                "SRANDMEMBER one -3",
                "SRANDMEMBER one 5",
                "SPOP one",
                "SPOP one",
                "SMEMBERS nosuch",
                "SSCAN si 0",
                "SINTERCARD 0 s",
                "SET str x",
                "SADD str a",
            ],
        },
        Script {
            name: "sorted_sets",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "ZADD z 1 a 2 b 3 c",
                "ZADD z NX 10 a 4 d",
                "ZADD z XX 5 a",
                "ZADD z XX CH 6 a",
                "ZADD z GT 1 a",
                "ZADD z LT CH 0.5 a",
                "ZADD z INCR 2 b",
                "ZADD z NX XX 1 a",
                "ZADD z GT LT 1 a",
                "ZADD z x a",
                "ZSCORE z a",
                "ZSCORE z a",
                "ZSCORE z nosuch",
                "ZMSCORE z a nosuch b",
                "ZMSCORE z a nosuch b",
                "ZRANGE z 0 -1 WITHSCORES",
                "ZRANGE z 0 -1 WITHSCORES",
                "ZRANGE z (1 5 BYSCORE LIMIT 1 2 WITHSCORES",
                "ZRANGE z +inf -inf BYSCORE REV",
                "ZADD {z}lex 0 a 0 b 0 c 0 d",
                "ZRANGE {z}lex [b (d BYLEX",
                "ZRANGE {z}lex + - BYLEX REV LIMIT 0 2",
                "ZRANGEBYSCORE z -inf +inf WITHSCORES",
                "ZREVRANGEBYSCORE z +inf 1 WITHSCORES LIMIT 0 2",
                "ZREVRANGE z 0 1 WITHSCORES",
                "ZRANGEBYLEX {z}lex - +",
                "ZREVRANGEBYLEX {z}lex + [b",
                "ZRANGESTORE {z}d z 0 1",
                "ZRANGE {z}d 0 -1 WITHSCORES",
                "ZCARD z",
                "ZCOUNT z 1 5",
                "ZLEXCOUNT {z}lex - +",
                "ZRANK z a",
                "ZRANK z a",
                "ZREVRANK z a",
                "ZRANK z nosuch",
                "ZRANK z a WITHSCORE",
                "ZINCRBY z 1.5 c",
                "ZUNIONSTORE {z}u 2 z {z}lex WEIGHTS 2 1 AGGREGATE MAX",
                "ZRANGE {z}u 0 -1 WITHSCORES",
                "ZINTERSTORE {z}i 2 z {z}d",
                "ZRANGE {z}i 0 -1 WITHSCORES",
                "ZDIFFSTORE {z}f 2 z {z}d",
                "ZRANGE {z}f 0 -1 WITHSCORES",
                "ZUNION 2 z {z}lex WITHSCORES",
                "ZINTER 2 z {z}d WITHSCORES",
                "ZDIFF 2 z {z}d",
                "ZINTERCARD 2 z {z}d",
                "@crossslot ZINTERCARD 2 z nosuch",
                "ZMPOP 1 z MIN COUNT 2",
                "ZMPOP 2 {z}nosuch z MAX",
                "@crossslot ZMPOP 2 nosuch nosuch2 MAX",
                "ZMPOP 1 nosuch MAX",
                "ZPOPMIN z",
                "ZPOPMAX z 2",
                "ZPOPMIN nosuch",
                "ZREM z nosuch",
                "ZADD one 1 x",
                "ZRANDMEMBER one",
                "ZRANDMEMBER one -2 WITHSCORES",
                "ZSCAN {z}lex 0",
                "ZADD inf +inf x -inf y 1.5 z 0.1 w 1e300 big",
                "ZRANGE inf 0 -1 WITHSCORES",
                "ZSCORE inf x",
                "ZSCORE inf w",
                "ZMSCORE inf y z",
                "ZREMRANGEBYSCORE inf -inf 0",
                "ZREMRANGEBYRANK inf 0 0",
                "ZREMRANGEBYLEX {z}lex [a [b",
                "ZRANGE inf 0 -1",
                "ZRANGE {z}lex 0 -1",
                "ZSCORE z",
                "SET str x",
                "ZSCORE str a",
            ],
        },
        Script {
            name: "streams",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "XADD st 1-1 a 1",
                "XADD st 1-2 b 2",
                "XADD st 2-0 c 3 d 4",
                "XADD st 1-0 d 4",
                "XADD nost NOMKSTREAM 1-1 a 1",
                "XLEN st",
                "XRANGE st - +",
                "XRANGE st - + COUNT 1",
                "XRANGE st (1-1 +",
                "XREVRANGE st + -",
                "XREAD COUNT 2 STREAMS st 0",
                "XREAD STREAMS st 2-0",
                "XREAD STREAMS st {st}nosuch 0 0",
                "@crossslot XREAD STREAMS st nosuch 0 0",
                "XGROUP CREATE st g 0",
                "XGROUP CREATE st g 0",
                "XGROUP CREATE nost g 0",
                "XGROUP CREATE nost g $ MKSTREAM",
                "XREADGROUP GROUP g c1 COUNT 2 STREAMS st >",
                "XPENDING st g",
                "XACK st g 1-1",
                "XPENDING st g",
                "XREADGROUP GROUP g c1 STREAMS st 0",
                "XREADGROUP GROUP g c1 STREAMS st >",
                "XINFO STREAM st",
                "XINFO GROUPS st",
                "XCLAIM st g c2 0 1-2 JUSTID",
                "XAUTOCLAIM st g c3 0 0-0 JUSTID",
                "XGROUP CREATECONSUMER st g c4",
                "XGROUP DELCONSUMER st g c4",
                "XDEL st 1-2",
                "XTRIM st MAXLEN 1",
                "XLEN st",
                "XSETID st 5-0",
                "XINFO STREAM st",
                "XGROUP DESTROY st g",
                "XINFO GROUPS st",
                "XADD st2 MAXLEN 2 1-1 a 1",
                "XADD st2 MAXLEN 2 1-2 a 2",
                "XADD st2 MAXLEN 2 1-3 a 3",
                "XRANGE st2 - +",
                "XADD st2 1-*",
                "SET str x",
                "XADD str 1-1 a 1",
                "XRANGE nosuch - +",
            ],
        },
        Script {
            name: "hyperloglog_geo_bitmaps",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "PFADD hll a b c",
                "PFADD hll a",
                "PFCOUNT hll",
                "PFADD {hll}2 c d",
                "PFMERGE {hll}3 hll {hll}2",
                "PFCOUNT {hll}3",
                "PFCOUNT hll {hll}2",
                "@crossslot PFCOUNT hll hll2",
                "GET hll",
                "GET hll",
                "SET str x",
                "PFADD str a",
                "GEOADD geo 13.361389 38.115556 Palermo 15.087269 37.502669 Catania",
                "GEOADD geo NX 13.361389 38.115556 Palermo",
                "GEODIST geo Palermo Catania km",
                "GEODIST geo Palermo nosuch",
                "GEOPOS geo Palermo nosuch",
                "GEOHASH geo Palermo Catania",
                "GEOSEARCH geo FROMLONLAT 15 37 BYRADIUS 200 km ASC WITHDIST WITHCOORD",
                "GEOSEARCH geo FROMMEMBER Palermo BYBOX 400 400 km ASC COUNT 1 WITHHASH",
                "GEOSEARCHSTORE {geo}s geo FROMLONLAT 15 37 BYRADIUS 200 km ASC STOREDIST",
                "ZRANGE {geo}s 0 -1 WITHSCORES",
                "GEORADIUS_RO geo 15 37 200 km ASC",
                "GEORADIUS geo 15 37 200 km STORE {geo}r",
                "ZRANGE {geo}r 0 -1",
                "GEOADD geo 200 100 bad",
                "SETBIT b 7 1",
                "SETBIT b 100 1",
                "SETBIT b 7 1",
                "GETBIT b 7",
                "GETBIT b 8",
                "BITCOUNT b",
                "BITCOUNT b 0 0",
                "BITCOUNT b 0 7 BIT",
                "BITPOS b 1",
                "BITPOS b 0",
                "BITPOS b 1 1 -1",
                "BITPOS b 1 8 200 BIT",
                "SET {b}2 \"\\xff\\x0f\"",
                "BITOP AND {b}and b {b}2",
                "BITOP OR {b}or b {b}2",
                "BITOP XOR {b}xor b {b}2",
                "BITOP NOT {b}not {b}2",
                "@crossslot BITOP OR dest1 nosuch1 nosuch2",
                "GET {b}and",
                "GET {b}or",
                "GET {b}xor",
                "GET {b}not",
                "BITFIELD bf SET u8 0 255 GET u8 0 INCRBY u8 0 10 OVERFLOW FAIL INCRBY u8 0 250",
                "BITFIELD bf OVERFLOW SAT INCRBY i8 8 1000 GET i8 8",
                "BITFIELD_RO bf GET u4 0",
                "GET b",
                "GET b",
                "SETBIT b -1 1",
                "SETBIT b 1 2",
            ],
        },
        Script {
            name: "keyspace",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "SET {k}1 v1",
                "SET {k}2 v2",
                "HSET kh f v",
                "RPUSH kl a",
                "ZADD kz 1 a",
                "SADD ks a",
                "XADD kx 1-1 f v",
                "EXISTS {k}1 {k}2 nosuch {k}1",
                "EXISTS {k}1",
                "EXISTS nosuch",
                "TYPE {k}1",
                "TYPE kh",
                "TYPE kl",
                "TYPE kz",
                "TYPE ks",
                "TYPE kx",
                "TYPE nosuch",
                "EXPIRE {k}1 100",
                "TTL {k}1",
                "EXPIRE {k}1 100 NX",
                "EXPIRE {k}1 200 GT",
                "TTL {k}1",
                "EXPIRE {k}1 50 LT",
                "TTL {k}1",
                "PERSIST {k}1",
                "TTL {k}1",
                "PERSIST {k}1",
                "TTL nosuch",
                "PTTL nosuch",
                "EXPIRETIME {k}1",
                "EXPIREAT {k}2 4102444800",
                "EXPIRETIME {k}2",
                "PEXPIRETIME {k}2",
                "PEXPIRE {k}2 100000",
                "@approx 1000 PTTL {k}2",
                "EXPIRE {k}1 abc",
                "RENAME {k}1 {k}1b",
                "GET {k}1",
                "GET {k}1b",
                "@crossslot RENAME nosuch x",
                "RENAME {k}nosuch {k}x",
                "RENAMENX {k}1b {k}2",
                "COPY {k}1b {k}2c",
                "COPY {k}1b {k}2c",
                "COPY {k}1b {k}2c REPLACE",
                "@crossslot COPY nosuch x",
                "GET {k}2c",
                "@nocluster 'a cluster has database 0 only' COPY {k}1b {k}5 DB 1",
                "DEL {k}1b nosuch",
                "UNLINK {k}2c kh",
                "EXISTS {k}1b {k}2c kh",
                "TOUCH {k}2 kl nosuch",
                "SET int 123",
                "SET emb short",
                "SET raw aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "OBJECT ENCODING int",
                "OBJECT ENCODING emb",
                "OBJECT ENCODING raw",
                "OBJECT ENCODING kl",
                "OBJECT ENCODING kz",
                "OBJECT ENCODING ks",
                "SADD kis 1 2",
                "OBJECT ENCODING kis",
                "OBJECT ENCODING nosuch",
                "OBJECT NOSUCH x",
                "DUMP int",
                "MSET sc:1 a sc:2 b sc:3 c sc:10 d sc:11 e other x",
                "@nocluster 'a SCAN call covers one master (tests/cluster.rs follows the cursor)' @sort SCAN 0 MATCH sc:* COUNT 1000",
                "@nocluster 'a SCAN call covers one master (tests/cluster.rs follows the cursor)' @sort SCAN 0 MATCH sc:1* COUNT 1000",
                "@nocluster 'a SCAN call covers one master (tests/cluster.rs follows the cursor)' @sort SCAN 0 TYPE hash COUNT 1000",
                "@sort KEYS sc:*",
                "@sort KEYS sc:?",
                "DBSIZE",
                "@nocluster 'a cluster has database 0 only' MOVE int 1",
                "EXISTS int",
                "DEL nosuch",
                "DEL",
            ],
        },
        Script {
            name: "transactions",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "MULTI",
                "SET t 1",
                "INCR t",
                "GET t",
                "HSET {t}h f v",
                "HGETALL {t}h",
                "EXEC",
                "GET t",
                "MULTI",
                "SET t 5",
                "DISCARD",
                "GET t",
                "MULTI",
                "SET t",
                "INCR t",
                "EXEC",
                "GET t",
                "MULTI",
                "SET w",
                "INCR w",
                "EXEC",
                "SET ts str",
                "MULTI",
                "INCR ts",
                "SET {ts}2 ok",
                "EXEC",
                "GET {ts}2",
                "EXEC",
                "DISCARD",
                "MULTI",
                "MULTI",
                "WATCH x",
                "WATCH w",
                "DISCARD",
                "SET w start",
                "GET w",
                "WATCH w",
                "DBSIZE",
                "@sort KEYS *",
                "@other SET w changed",
                "MULTI",
                "SET w mine",
                "EXEC",
                "GET w",
                "WATCH w",
                "MULTI",
                "SET w mine",
                "EXEC",
                "GET w",
                "WATCH w",
                "UNWATCH",
                "@other SET w again",
                "MULTI",
                "SET w last",
                "EXEC",
                "GET w",
                "UNWATCH",
                "WATCH w",
                "@crossslot WATCH t",
                "MULTI",
                "SET w watched",
                "EXEC",
                "GET w",
                "WATCH w",
                "MULTI",
                "SET wt inside",
                "@crossslot EXEC",
                "@nocluster 'a cluster has database 0 only' MULTI",
                "@nocluster 'a cluster has database 0 only' SELECT 1",
                "@nocluster 'a cluster has database 0 only' SET indb1 v",
                "@nocluster 'a cluster has database 0 only' SELECT 0",
                "@nocluster 'a cluster has database 0 only' EXEC",
                "@nocluster 'a cluster has database 0 only' GET indb1",
                "MULTI",
                "GET t",
                "GET t",
                "EXEC",
                "MULTI",
                "PING",
                "ECHO e",
                "INCR t",
                "EXEC",
                "MULTI",
                "ECHO f",
                "INCR w",
                "EXEC",
                "MULTI",
                "SET tx1 a",
                "SET tx2 b",
                "@crossslot EXEC",
            ],
        },
        Script {
            // The transactions script has @other lines, so it is not pipelined.
            name: "transactions_pipelined",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "MULTI",
                "SET t 1",
                "INCR t",
                "HSET {t}h f v",
                "EXEC",
                "MULTI",
                "PING",
                "INCR t",
                "EXEC",
                "MULTI",
                "ECHO e",
                "INCR w",
                "GET w",
                "EXEC",
                "MULTI",
                "SET t",
                "INCR t",
                "EXEC",
                "MULTI",
                "NOSUCHCMD a b",
                "INCR t",
                "EXEC",
                "MULTI",
                "NOSUCHCMD",
                "INCR w",
                "EXEC",
                "MULTI",
                "OBJECT NOSUCH x",
                "INCR w",
                "EXEC",
                "MULTI",
                "OBJECT NOSUCH x",
                "INCR t",
                "EXEC",
                "MULTI",
                "INCR w",
                "DISCARD",
                "MULTI",
                "EXEC",
                "WATCH t",
                "GET w",
                "MULTI",
                "INCR t",
                "EXEC",
                "WATCH t",
                "@crossslot WATCH w",
                "MULTI",
                "INCR t",
                "EXEC",
                "BLPOP nosuch 0.1",
                "MULTI",
                "INCR w",
                "EXEC",
                "MGET t w",
                "MULTI",
                "SET tx1 a",
                "SET tx2 b",
                "@crossslot EXEC",
                "MGET t w",
            ],
        },
        Script {
            name: "lua",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "EVAL 'return 1' 0",
                "EVAL \"return {1,2,{3,'x'},redis.call('SET',KEYS[1],ARGV[1])}\" 1 lk lv",
                "GET lk",
                "EVAL \"return redis.call('SET',KEYS[1],ARGV[1])\" 1 lk lv2",
                "GET lk",
                "GET lk",
                "@nocluster 'undeclared keys must live on the node the script runs on (EVAL with no keys: any master)' EVAL \"redis.call('SET','undeclared','x') return 1\" 0",
                "@nocluster 'undeclared keys must live on the node the script runs on (EVAL with no keys: any master)' GET undeclared",
                "@nocluster 'undeclared keys must live on the node the script runs on (EVAL with no keys: any master)' EVAL \"redis.call('SET','undeclared','y') return 1\" 0",
                "@nocluster 'undeclared keys must live on the node the script runs on (EVAL with no keys: any master)' GET undeclared",
                "EVAL \"return redis.error_reply('MYERR custom')\" 0",
                "EVAL \"return redis.status_reply('FINE')\" 0",
                "EVAL 'return 3.99' 0",
                "EVAL 'return nil' 0",
                "EVAL 'return false' 0",
                "EVAL 'return true' 0",
                "EVAL \"return {double=3.14}\" 0",
                "HSET lh a 1",
                "EVAL \"redis.setresp(3); return redis.call('HGETALL', KEYS[1])\" 1 lh",
                "EVAL \"redis.setresp(3); return redis.call('ZSCORE', KEYS[1], 'm')\" 1 lz",
                "EVAL \"return redis.call('nosuchcmd')\" 0",
                "EVAL 'this is not lua' 0",
                "EVAL 'return 1' -1",
                "EVAL 'return 1' 5 a",
                "SCRIPT LOAD 'return ARGV[1]'",
                "EVALSHA 098e0f0d1448c0a81dafe820f66d460eb09263da 0 hi",
                "SCRIPT EXISTS 098e0f0d1448c0a81dafe820f66d460eb09263da 0000000000000000000000000000000000000000",
                "EVALSHA ffffffffffffffffffffffffffffffffffffffff 0",
                "EVAL_RO \"return redis.call('GET',KEYS[1])\" 1 lk",
                "EVAL_RO \"return redis.call('SET',KEYS[1],'x')\" 1 lk",
                "EVALSHA_RO 098e0f0d1448c0a81dafe820f66d460eb09263da 0 x",
                "SCRIPT FLUSH",
                "SCRIPT EXISTS 098e0f0d1448c0a81dafe820f66d460eb09263da",
            ],
        },
        Script {
            name: "functions",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "@fnload",
                "FCALL myset 1 fk fv",
                "FCALL myget 1 fk",
                "GET fk",
                "FCALL myset 1 fk fv2",
                "GET fk",
                "FCALL_RO myget 1 fk",
                "FCALL_RO myset 1 fk x",
                "GET fk",
                "@fnload",
                "@sort FUNCTION LIST",
                "FUNCTION DELETE mylib",
                "FCALL myget 1 fk",
                "FUNCTION DELETE mylib",
                "FCALL nosuch 0",
            ],
        },
        Script {
            name: "select",
            typed: true,
            not_in_cluster: Some("a cluster has database 0 only: SELECT n, MOVE and SWAPDB are refused"),
            lines: &[
                "SET k0 v0",
                "GET k0",
                "SELECT 2",
                "GET k0",
                "SET k2 v2",
                "GET k2",
                "GET k2",
                "SELECT 0",
                "GET k0",
                "GET k2",
                "SELECT 16",
                "GET k0",
                "SELECT abc",
                "GET k0",
                "MOVE k0 2",
                "GET k0",
                "SELECT 2",
                "GET k0",
                "SELECT 0",
                "SWAPDB 0 2",
                "GET k0",
                "GET k2",
                "SWAPDB 0 2",
                "GET k0",
                "SELECT",
            ],
        },
        Script {
            name: "errors",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "NOSUCHCOMMAND a b",
                "NOSUCHCOMMAND",
                "GET",
                "SET k v BADOPT",
                "SET str x",
                "LPUSH str x",
                "INCR str",
                "HSET h f",
                "ZADD z nan a",
                "PING a b",
                "PING",
                "PING hello",
                "ECHO",
                "ECHO \"\"",
                "CONFIG GET maxmemory-policy",
                "CONFIG NOSUCH",
                "OBJECT",
                "XADD",
                "GETEX str PERSIST EX 10",
                "COMMAND COUNT",
            ],
        },
        Script {
            name: "big_replies",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "EVAL \"for i=1,20000 do redis.call('RPUSH', KEYS[1], 'item-'..i) end return redis.call('LLEN', KEYS[1])\" 1 biglist",
                "LRANGE biglist 0 -1",
                "LRANGE biglist 0 -1",
                "SETRANGE bigstr 2000000 x",
                "GET bigstr",
                "GET bigstr",
                "STRLEN bigstr",
                "EVAL \"for i=1,5000 do redis.call('HSET', KEYS[1], 'f'..i, 'v'..i) end return 1\" 1 bighash",
                "@sort HGETALL bighash",
                "@sort HGETALL bighash",
                "EVAL \"for i=1,5000 do redis.call('ZADD', KEYS[1], i, 'm'..i) end return 1\" 1 bigz",
                "ZRANGE bigz 0 -1 WITHSCORES",
                "ZRANGE bigz 0 -1 WITHSCORES",
                "MGET biglist bigstr bigz nosuch",
            ],
        },
        Script {
            name: "binary",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "SET \"\\x00\\xff\\r\\nkey\" \"val\\x00\\r\\n\\xfe\"",
                "GET \"\\x00\\xff\\r\\nkey\"",
                "GET \"\\x00\\xff\\r\\nkey\"",
                "MGET \"\\x00\\xff\\r\\nkey\" nosuch",
                "APPEND \"\\x00\\xff\\r\\nkey\" \"\\x01\\x02\"",
                "GET \"\\x00\\xff\\r\\nkey\"",
                "STRLEN \"\\x00\\xff\\r\\nkey\"",
                "HSET \"bin\\x00h\" \"\\x00\" \"\\r\\n\" \"a key with spaces\" \"\"",
                "HGETALL \"bin\\x00h\"",
                "HGETALL \"bin\\x00h\"",
                "SET \"\" empty-key",
                "GET \"\"",
                "SET ek \"\"",
                "GET ek",
                "GET ek",
                "SET \"$5\\r\\nhello\" x",
                "GET \"$5\\r\\nhello\"",
                "SET \"*1\\r\\n\" \"-ERR not an error\\r\\n\"",
                "GET \"*1\\r\\n\"",
                "DEL \"\\x00\\xff\\r\\nkey\" \"\"",
                "GET \"\\x00\\xff\\r\\nkey\"",
            ],
        },
        Script {
            name: "blocking",
            typed: true,
            not_in_cluster: None,
            lines: &[
                "BLPOP nosuch 0.1",
                "@crossslot BRPOP nosuch nosuch2 0.1",
                "BRPOP nosuch {nosuch}2 0.1",
                "BZPOPMIN nosuch 0.1",
                "BZPOPMAX nosuch 0.1",
                "@crossslot BLMOVE nosuch dst LEFT RIGHT 0.1",
                "BLMOVE nosuch {nosuch}dst LEFT RIGHT 0.1",
                "@crossslot BRPOPLPUSH nosuch dst 0.1",
                "BRPOPLPUSH nosuch {nosuch}dst 0.1",
                "BLMPOP 0.1 1 nosuch LEFT",
                "BZMPOP 0.1 1 nosuch MIN",
                "XREAD BLOCK 100 STREAMS nosuchs $",
                "XADD xs 1-0 a 1",
                "XGROUP CREATE xs g $",
                "XREADGROUP GROUP g c BLOCK 100 STREAMS xs >",
                "RPUSH bl a b",
                "BLPOP bl 0.1",
                "BRPOP bl 0.1",
                "ZADD bz 1 a",
                "BZPOPMIN bz 0.1",
                "RPUSH bl c",
                "BLMOVE bl {bl}dst LEFT RIGHT 0.1",
                "LRANGE {bl}dst 0 -1",
                "XREAD BLOCK 100 STREAMS xs 0",
                "WAIT 0 0",
                "BLPOP nosuch -1",
                "BLPOP nosuch abc",
                "SET str x",
                "BLPOP str 0.1",
                "GET str",
            ],
        },
        Script {
            name: "client_reply_names_reset",
            typed: false,
            not_in_cluster: None,
            lines: &[
                "CLIENT GETNAME",
                "CLIENT SETNAME myname",
                "CLIENT GETNAME",
                "CLIENT SETNAME \"bad name\"",
                "CLIENT GETNAME",
                "@noreply CLIENT REPLY OFF",
                "@noreply SET r1 v",
                "@noreply GET r1",
                "CLIENT REPLY ON",
                "GET r1",
                "@noreply CLIENT REPLY SKIP",
                "@noreply SET r2 v",
                "GET r2",
                "ECHO hi",
                "CLIENT REPLY BAD",
                "HSET h f v",
                "@nocluster 'a cluster has database 0 only' SELECT 3",
                "@nocluster 'a cluster has database 0 only' SET x y",
                "MULTI",
                "SET q 1",
                "RESET",
                "CLIENT GETNAME",
                "@nocluster 'a cluster has database 0 only' GET x",
                "EXEC",
                "HGETALL h",
                "GET q",
                "MULTI",
                "RESET",
                "BLPOP nosuch 0.1",
                "GET q",
            ],
        },
        Script {
            name: "pubsub_one_connection",
            typed: false,
            not_in_cluster: None,
            lines: &[
                "SUBSCRIBE a b",
                "@read",
                "PING",
                "@other PUBLISH a hello",
                "@read",
                "PSUBSCRIBE p.*",
                "@other PUBLISH p.x pat",
                "@read",
                "@other MSET k 1 w 2 x 3",
                "GET k",
                "GET w",
                "DBSIZE",
                "UNSUBSCRIBE b",
                "UNSUBSCRIBE",
                "PUNSUBSCRIBE",
                "PING",
                "@other PUBLISH a nobody",
                "PING",
                "RESET",
                "PING",
            ],
        },
    ]
}

pub fn expand(line: &str) -> String {
    line.replace("@fnload", &format!("FUNCTION LOAD {FUNCTION_LIB}"))
}

// --- Targets ---------------------------------------------------------------------------

/// Where scripts run.
pub struct Targets {
    /// (label, port): the reference redis-server first, then each nearcache.
    pub list: Vec<(&'static str, u16)>,
    /// The nearcaches front a Redis Cluster (see `@crossslot`, `@nocluster`).
    pub cluster: bool,
}

/// A cluster node's reply to keys in several slots, byte for byte.
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

impl Targets {
    /// Empties every server (through the proxies, so L1 is emptied too).
    pub fn flush(&self) {
        for (label, port) in &self.list {
            let mut r = Raw::connect(*port, "flush");
            for c in ["FLUSHALL", "SCRIPT FLUSH", "FUNCTION FLUSH"] {
                let got = r.cmd(c);
                assert_eq!(got, b"+OK\r\n", "{c} on {label}: {}", show(&got));
            }
        }
    }

    /// The script's lines to run on these targets, `@fnload` expanded.
    pub fn lines(&self, script: &Script) -> Vec<String> {
        script
            .lines
            .iter()
            .map(|l| expand(l))
            .filter(|l| !(self.cluster && directives(l).0.nocluster.is_some()))
            .collect()
    }
}

// --- Raw differential runner --------------------------------------------------------

/// Runs a script on raw connections; returns the differences found.
pub fn run_raw(targets: &Targets, script: &Script, proto: u8, pipelined: bool) -> Vec<String> {
    eprintln!("raw {} RESP{proto} pipelined={pipelined}", script.name);
    targets.flush();
    let mut diffs = Vec::new();
    let list = &targets.list;
    let mut conns: Vec<(Raw, Raw)> = list
        .iter()
        .map(|(l, p)| (Raw::connect(*p, l), Raw::connect(*p, l)))
        .collect();
    if proto == 3 {
        for (m, o) in conns.iter_mut() {
            for c in [m, o] {
                let hello = c.cmd("HELLO 3");
                assert_eq!(hello[0], b'%', "{}: HELLO 3: {}", c.label, show(&hello));
            }
        }
    }
    let ctx = |line: &str| {
        format!(
            "[{} RESP{proto}{}] {line}",
            script.name,
            if pipelined { " pipelined" } else { "" }
        )
    };
    let lines = targets.lines(script);

    if pipelined {
        let mut parsed = Vec::new();
        for l in &lines {
            let (d, cmd) = directives(l);
            if d.sleep.is_some() {
                continue;
            }
            assert!(!d.noreply && !d.read);
            parsed.push((d, cmd.to_string()));
        }
        let mut replies: Vec<Vec<(Vec<u8>, Vec<u8>)>> = Vec::new();
        for (m, o) in conns.iter_mut() {
            // @other lines run on the second connection up front; pipelining
            // changes their timing, so scripts with them are not pipelined.
            let mut out = Vec::new();
            for (_, c) in &parsed {
                out.extend(encode(&tokenize(c)));
            }
            m.s.write_all(&out).unwrap();
            let _ = o;
            replies.push(parsed.iter().map(|_| m.read()).collect());
        }
        for (i, (d, c)) in parsed.iter().enumerate() {
            for (t, (label, _)) in list.iter().enumerate().skip(1) {
                compare(
                    &mut diffs,
                    (&ctx(c), label, targets.cluster),
                    d,
                    &replies[0][i],
                    &replies[t][i],
                );
            }
        }
        return diffs;
    }

    for line in &lines {
        let (d, cmd) = directives(line);
        if let Some(ms) = d.sleep {
            std::thread::sleep(Duration::from_millis(ms));
            continue;
        }
        let args = tokenize(cmd);
        if !d.read {
            for (m, o) in conns.iter_mut() {
                if d.other { o } else { m }.send(&args);
            }
        }
        if d.noreply {
            continue;
        }
        let replies: Vec<_> = conns
            .iter_mut()
            .map(|(m, o)| if d.other { o } else { m }.read())
            .collect();
        for (t, (label, _)) in list.iter().enumerate().skip(1) {
            compare(
                &mut diffs,
                (&ctx(cmd), label, targets.cluster),
                &d,
                &replies[0],
                &replies[t],
            );
        }
    }
    // Nothing may be left over on any connection.
    for (m, o) in conns.iter_mut() {
        for c in [m, o] {
            if c.closed {
                continue;
            }
            if let Some((extra, _)) = c.try_read(Duration::from_millis(50)) {
                diffs.push(format!(
                    "{}: {} sent an unexpected extra frame: {}",
                    ctx("(end)"),
                    c.label,
                    show(&extra)
                ));
            }
        }
    }
    diffs
}

/// `(ctx, label, cluster)`: the line, the target, whether it fronts a cluster.
pub fn compare(
    diffs: &mut Vec<String>,
    (ctx, label, cluster): (&str, &str, bool),
    d: &Directives,
    expected: &(Vec<u8>, Vec<u8>),
    got: &(Vec<u8>, Vec<u8>),
) {
    if d.skip {
        return;
    }
    if cluster && d.crossslot {
        if got.0 != CROSSSLOT {
            diffs.push(format!(
                "{ctx}\n    cluster: {}\n    {label}: {}",
                show(CROSSSLOT),
                show(&got.0)
            ));
        }
        return;
    }
    let same = if d.sort {
        expected.1 == got.1
    } else if let (Some(tol), Some(a), Some(b)) = (d.approx, int_of(&expected.0), int_of(&got.0)) {
        (a - b).abs() <= tol
    } else {
        expected.0 == got.0
    };
    if !same {
        diffs.push(format!(
            "{ctx}\n    redis:  {}\n    {label}: {}",
            show(&expected.0),
            show(&got.0)
        ));
    }
}

pub fn pipelinable(s: &Script) -> bool {
    s.typed && !s.lines.iter().any(|l| l.contains("@other"))
}

pub fn report(all: Vec<String>) {
    if !all.is_empty() {
        panic!(
            "{} difference(s) between redis and nearcache:\n{}",
            all.len(),
            all.join("\n")
        );
    }
}

// --- Typed clients ------------------------------------------------------------------

pub fn canonical_value(v: &Value) -> String {
    match v {
        Value::Array(items) | Value::Set(items) => {
            let mut parts: Vec<String> = items.iter().map(canonical_value).collect();
            parts.sort();
            format!("[{}]", parts.join(","))
        }
        Value::Map(pairs) => {
            let mut parts: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}=>{}", canonical_value(k), canonical_value(v)))
                .collect();
            parts.sort();
            format!("{{{}}}", parts.join(","))
        }
        other => format!("{other:?}"),
    }
}

pub fn value_repr(r: &redis::RedisResult<Value>, d: &Directives) -> String {
    match r {
        Ok(v) if d.sort => canonical_value(v),
        Ok(v) => {
            let s = format!("{v:?}");
            if s.len() > 300 {
                format!("{}... ({} chars)", &s[..300], s.len())
            } else {
                s
            }
        }
        Err(e) => format!("Err({e})"),
    }
}

/// Does `got` (a target's) match `expected` (the reference's)? In front of
/// a cluster, a `@crossslot` line must get the node's CROSSSLOT instead.
pub fn values_match(
    expected: &redis::RedisResult<Value>,
    got: &redis::RedisResult<Value>,
    d: &Directives,
    cluster: bool,
) -> bool {
    if d.skip {
        return true;
    }
    if cluster && d.crossslot {
        return matches!(got, Err(e) if e.code() == Some("CROSSSLOT")
            && e.detail() == Some("Keys in request don't hash to the same slot"));
    }
    if let (Some(tol), Ok(Value::Int(x)), Ok(Value::Int(y))) = (d.approx, expected, got) {
        return (x - y).abs() <= tol;
    }
    match (expected, got) {
        (Ok(x), Ok(y)) if d.sort => canonical_value(x) == canonical_value(y),
        (Ok(x), Ok(y)) => x == y,
        (Err(x), Err(y)) => x.to_string() == y.to_string(),
        _ => false,
    }
}

/// Each target's reply to `line` (`replies`, in `targets.list` order)
/// against the reference's (the first): the differences, as reported.
#[allow(clippy::too_many_arguments)]
fn typed_diffs(
    targets: &Targets,
    mode: &str,
    script: &Script,
    proto: u8,
    line: &str,
    d: &Directives,
    replies: &[&redis::RedisResult<Value>],
    diffs: &mut Vec<String>,
) {
    let expected = replies[0];
    for (got, (label, _)) in replies.iter().zip(&targets.list).skip(1) {
        if values_match(expected, got, d, targets.cluster) {
            continue;
        }
        let want = if targets.cluster && d.crossslot {
            format!("cluster: {}", show(CROSSSLOT))
        } else {
            format!("redis:  {}", value_repr(expected, d))
        };
        diffs.push(format!(
            "{}\n    {want}\n    {label}: {}",
            typed_ctx(mode, script, proto, line),
            value_repr(got, d)
        ));
    }
}

pub fn redis_cmd(line: &str) -> redis::Cmd {
    let args = tokenize(line);
    let mut c = redis::cmd(std::str::from_utf8(&args[0]).unwrap());
    for a in &args[1..] {
        c.arg(&a[..]);
    }
    c
}

pub fn url(port: u16, proto: u8) -> String {
    if proto == 3 {
        format!("redis://127.0.0.1:{port}/?protocol=resp3")
    } else {
        format!("redis://127.0.0.1:{port}")
    }
}

pub fn typed_ctx(mode: &str, script: &Script, proto: u8, line: &str) -> String {
    format!("[{mode} {} RESP{proto}] {line}", script.name)
}

pub fn run_sync(targets: &Targets, script: &Script, proto: u8) -> Vec<String> {
    eprintln!("sync {} RESP{proto}", script.name);
    targets.flush();
    let list = &targets.list;
    let mut conns: Vec<(redis::Connection, redis::Connection)> = list
        .iter()
        .map(|(_, p)| {
            let c = redis::Client::open(url(*p, proto)).unwrap();
            let (m, o) = (c.get_connection().unwrap(), c.get_connection().unwrap());
            for x in [&m, &o] {
                x.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            }
            (m, o)
        })
        .collect();
    let mut diffs = Vec::new();
    for line in &targets.lines(script) {
        let (d, cmd) = directives(line);
        if let Some(ms) = d.sleep {
            std::thread::sleep(Duration::from_millis(ms));
            continue;
        }
        let c = redis_cmd(cmd);
        // Each target on a thread of its own: a blocking command's timeout
        // is waited for once, not once per target.
        let replies: Vec<redis::RedisResult<Value>> = std::thread::scope(|s| {
            let running: Vec<_> = conns
                .iter_mut()
                .map(|(m, o)| {
                    let (c, conn) = (&c, if d.other { o } else { m });
                    s.spawn(move || c.query::<Value>(conn))
                })
                .collect();
            running.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let replies: Vec<_> = replies.iter().collect();
        typed_diffs(
            targets, "sync", script, proto, cmd, &d, &replies, &mut diffs,
        );
    }
    diffs
}

pub fn run_pipe(targets: &Targets, script: &Script, proto: u8) -> Vec<String> {
    eprintln!("pipe {} RESP{proto}", script.name);
    targets.flush();
    let list = &targets.list;
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut dirs = Vec::new();
    let lines = targets.lines(script);
    for line in &lines {
        let (d, cmd) = directives(line);
        if d.sleep.is_some() {
            continue;
        }
        pipe.add_command(redis_cmd(cmd));
        dirs.push((d, cmd));
    }
    let results: Vec<Vec<redis::RedisResult<Value>>> = std::thread::scope(|s| {
        let running: Vec<_> = list
            .iter()
            .map(|(_, p)| {
                let pipe = &pipe;
                s.spawn(move || {
                    let mut c = redis::Client::open(url(*p, proto))
                        .unwrap()
                        .get_connection()
                        .unwrap();
                    pipe.query::<Vec<redis::RedisResult<Value>>>(&mut c)
                        .unwrap()
                })
            })
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let mut diffs = Vec::new();
    for (i, (d, cmd)) in dirs.iter().enumerate() {
        let replies: Vec<_> = results.iter().map(|r| &r[i]).collect();
        typed_diffs(
            targets, "pipeline", script, proto, cmd, d, &replies, &mut diffs,
        );
    }
    diffs
}

pub async fn run_async(targets: &Targets, script: &Script, proto: u8) -> Vec<String> {
    eprintln!("async {} RESP{proto}", script.name);
    targets.flush();
    let list = &targets.list;
    let mut conns = Vec::new();
    for (_, p) in list {
        let c = redis::Client::open(url(*p, proto)).unwrap();
        conns.push((
            c.get_multiplexed_async_connection().await.unwrap(),
            c.get_multiplexed_async_connection().await.unwrap(),
        ));
    }
    let mut diffs = Vec::new();
    for line in &targets.lines(script) {
        let (d, cmd) = directives(line);
        if let Some(ms) = d.sleep {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            continue;
        }
        let c = redis_cmd(cmd);
        let replies = futures::future::join_all(
            conns
                .iter_mut()
                .map(|(m, o)| c.query_async::<Value>(if d.other { o } else { m })),
        )
        .await;
        let replies: Vec<_> = replies.iter().collect();
        typed_diffs(
            targets, "async", script, proto, cmd, &d, &replies, &mut diffs,
        );
    }
    diffs
}
