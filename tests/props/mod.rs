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
