//! What one L1 entry holds: every cached reply of one key, what it weighs
//! against `max_bytes`, and when it expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::Expiry;

/// Fixed cost charged per key and per cached reply, on top of their bytes:
/// moka's node and queues, our `Arc`, vectors, the copies' allocations and
/// allocator slack. Set from measurement so that `max_bytes` bounds resident
/// memory, not just payload: 100,000 GET replies of 64-byte values grew RSS
/// by 713 bytes each (release build, glibc malloc).
pub(super) const ENTRY_OVERHEAD: usize = 480;
pub(super) const VARIANT_OVERHEAD: usize = 140;
/// Cached replies per key; a new one beyond this replaces the oldest.
pub const MAX_VARIANTS: usize = 16;

/// One cached reply of one command on one key.
#[derive(Clone)]
pub(super) struct Variant {
    pub sig: Bytes,
    pub proto: u8,
    pub reply: Bytes,
}

/// Everything cached for one key.
pub(super) struct KeyEntry {
    pub variants: Vec<Variant>,
    pub expires_at: Instant,
}

impl KeyEntry {
    pub fn weight(&self, key: &Bytes) -> u32 {
        let w = key.len()
            + ENTRY_OVERHEAD
            + self
                .variants
                .iter()
                .map(|v| v.sig.len() + v.reply.len() + VARIANT_OVERHEAD)
                .sum::<usize>();
        w.min(u32::MAX as usize) as u32
    }
}

pub(super) struct EntryExpiry;

impl Expiry<Bytes, Arc<KeyEntry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Bytes,
        value: &Arc<KeyEntry>,
        now: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Bytes,
        value: &Arc<KeyEntry>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(now))
    }
}
