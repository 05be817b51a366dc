//! Recent hit counts per key for `NEARCACHE HOTKEYS`: sampled (one hit in
//! `SAMPLE`, reported scaled back up) and halved every ten seconds, so that
//! "hot" means recent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

pub(super) const SAMPLE: u64 = 8;
const SHARDS: usize = 16;
const PER_SHARD: usize = 4096;

pub(super) struct HotKeys {
    shards: Vec<Mutex<HashMap<Bytes, u64>>>,
    last_decay: Mutex<Instant>,
}

impl HotKeys {
    pub fn new() -> HotKeys {
        HotKeys {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            last_decay: Mutex::new(Instant::now()),
        }
    }

    pub fn record(&self, key: &Bytes) {
        let shard = key.iter().fold(key.len(), |a, &b| {
            a.wrapping_mul(31).wrapping_add(b as usize)
        }) % SHARDS;
        let mut map = self.shards[shard].lock();
        if let Some(c) = map.get_mut(key) {
            *c += 1;
        } else if map.len() < PER_SHARD {
            map.insert(Bytes::copy_from_slice(key), 1);
        }
        drop(map);
        self.maybe_decay();
    }

    fn maybe_decay(&self) {
        let Some(mut last) = self.last_decay.try_lock() else {
            return;
        };
        if last.elapsed() < Duration::from_secs(10) {
            return;
        }
        *last = Instant::now();
        drop(last);
        for shard in &self.shards {
            shard.lock().retain(|_, c| {
                *c /= 2;
                *c > 0
            });
        }
    }

    pub fn top(&self, n: usize) -> Vec<(Bytes, u64)> {
        let mut all: Vec<(Bytes, u64)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .map(|(k, c)| (k.clone(), *c * SAMPLE))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}
