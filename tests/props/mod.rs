//! The properties the `fuzz/` targets check on arbitrary input, shared with
//! the seeded property tests of `tests/fuzz_props.rs`, which run them on
//! stable in `cargo test`. Each `check` takes the raw bytes a fuzzer hands
//! over, reads what it needs from their front (limits, read sizes, a mode)
//! and panics when a property fails.
//!
//! The fuzz targets include this directory with
//! `#[path = "../../tests/props/mod.rs"] mod props;` so that both run the
//! same code; it is not a test crate of its own (no `main.rs`).
#![allow(dead_code)]

pub mod commands;
pub mod replies;
pub mod requests;
pub mod routes;

/// A cursor over fuzz input: bytes read past the end are zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from(self.byte()) << 8 | u16::from(self.byte())
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let v = if n <= 256 {
            usize::from(self.byte())
        } else {
            usize::from(self.u16())
        };
        v % n
    }

    pub fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1);
        self.take(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// xorshift64*: read sizes and seeded generation, deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % (n.max(1) as u64)) as usize
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Read sizes for feeding `len` bytes in pieces: mostly small, sometimes
/// large, never zero; deterministic in `seed`. Long streams (amplified or
/// deep inputs) get mostly larger reads, so that a line that is still
/// incomplete is not rescanned once per byte (that is quadratic, and only
/// slows the fuzzer down).
pub fn read_sizes(seed: u64, len: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut fed = 0;
    let long = len > 8192;
    while fed < len {
        let n = match rng.below(8) {
            0 => 1,
            1..=5 if long => 1 + rng.below(4096),
            1..=5 => 1 + rng.below(16),
            6 => 1 + rng.below(512),
            _ => 1 + rng.below(1 << 17),
        }
        .min(len - fed);
        out.push(n);
        fed += n;
    }
    out
}

/// A random reply frame of at most 60 elements, bulk strings up to
/// `max_bulk` bytes; nesting depth is random and may be large (counted,
/// never recursed on).
pub fn gen_reply(rng: &mut Rng, out: &mut Vec<u8>, resp3: bool, max_bulk: usize) {
    let mut open: Vec<u64> = vec![1];
    let mut budget = 60u64;
    while let Some(top) = open.last_mut() {
        if *top == 0 {
            open.pop();
            continue;
        }
        *top -= 1;
        budget = budget.saturating_sub(1);
        let kinds: &[u8] = if resp3 { b"+-:$*_,#(!=%~>|" } else { b"+-:$*" };
        let mut k = rng.pick(kinds);
        if budget == 0 && matches!(k, b'*' | b'%' | b'~' | b'>' | b'|') {
            k = b':';
        }
        match k {
            b'+' => out.extend_from_slice(b"+OK\r\n"),
            b'-' => out.extend_from_slice(b"-ERR x\r\n"),
            b':' => out.extend_from_slice(format!(":{}\r\n", rng.next() as i64).as_bytes()),
            b'_' => out.extend_from_slice(b"_\r\n"),
            b',' => out.extend_from_slice(b",1.5\r\n"),
            b'#' => out.extend_from_slice(b"#t\r\n"),
            b'(' => out.extend_from_slice(b"(12345678901234567890\r\n"),
            b'$' | b'!' => {
                if k == b'$' && rng.below(8) == 0 {
                    out.extend_from_slice(b"$-1\r\n");
                } else {
                    let data = rng.bytes(max_bulk);
                    out.extend_from_slice(format!("{}{}\r\n", k as char, data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                }
            }
            b'=' => out.extend_from_slice(b"=7\r\ntxt:abc\r\n"),
            b'*' | b'~' | b'>' => {
                if k == b'*' && rng.below(10) == 0 {
                    out.extend_from_slice(b"*-1\r\n");
                } else {
                    let n = rng.below(4) as u64;
                    out.extend_from_slice(format!("{}{n}\r\n", k as char).as_bytes());
                    open.push(n);
                }
            }
            b'%' => {
                let n = rng.below(3) as u64;
                out.extend_from_slice(format!("%{n}\r\n").as_bytes());
                open.push(2 * n);
            }
            b'|' => {
                let n = 1 + rng.below(2) as u64;
                out.extend_from_slice(format!("|{n}\r\n").as_bytes());
                *open.last_mut().unwrap() += 1;
                open.push(2 * n);
            }
            _ => unreachable!(),
        }
    }
}
