//! A least-recently-used cache of L2 table slices, shared between threads.
//!
//! Slices (not whole tables) are cached so that 2 MiB-cluster images do not cost 2 MiB per
//! table. A cache of 64 slices or more is split into [`SHARDS`] shards by key, each with its
//! own mutex and LRU, so that queues looking up different slices do not contend (a lookup is
//! on every guest read and write); smaller caches are one shard. Misses load under their
//! shard's lock (metadata I/O only: data I/O never runs under it). Dirty slices are never
//! evicted: the engine writes them back in dependency order and then marks them clean.

use super::error::Result;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug)]
struct Slot {
    entries: Vec<u64>,
    last_used: u64,
    dirty: bool,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<u64, Slot>,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// Hit/miss counters of a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that loaded a slice.
    pub misses: u64,
    /// Slices held now.
    pub len: usize,
    /// Dirty slices held now.
    pub dirty: usize,
}

/// Number of shards of a cache of at least 64 slices.
pub const SHARDS: usize = 8;

/// An LRU cache of decoded table slices keyed by their host offset.
#[derive(Debug)]
pub struct SliceCache {
    capacity: usize,
    /// Clean slices each shard keeps.
    shard_capacity: usize,
    shards: Vec<Mutex<Inner>>,
}

impl SliceCache {
    /// A cache holding at most `capacity` clean slices (at least 1; rounded up to a multiple
    /// of the shard count when sharded).
    pub fn new(capacity: usize) -> SliceCache {
        let capacity = capacity.max(1);
        let n = if capacity >= 64 { SHARDS } else { 1 };
        SliceCache {
            capacity,
            shard_capacity: capacity.div_ceil(n),
            shards: (0..n).map(|_| Mutex::new(Inner::default())).collect(),
        }
    }

    fn lock_shard(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a slot half-updated (slots are replaced
        // whole), so a poisoned lock is still usable.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shard of `key` (slice offsets are multiples of 512: mix the bits above).
    fn lock(&self, key: u64) -> std::sync::MutexGuard<'_, Inner> {
        let n = self.shards.len() as u64;
        let i = ((key >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % n;
        Self::lock_shard(&self.shards[i as usize])
    }

    fn all(&self) -> impl Iterator<Item = std::sync::MutexGuard<'_, Inner>> {
        self.shards.iter().map(Self::lock_shard)
    }

    /// Runs `f` on the slice at `key`, loading it with `load` on a miss.
    pub fn with<R>(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
        f: impl FnOnce(&[u64]) -> R,
    ) -> Result<R> {
        let mut g = self.lock(key);
        g.tick += 1;
        let tick = g.tick;
        if let Some(slot) = g.map.get_mut(&key) {
            slot.last_used = tick;
            let r = f(&slot.entries);
            g.hits += 1;
            return Ok(r);
        }
        g.misses += 1;
        let entries = load()?;
        let r = f(&entries);
        self.insert_locked(&mut g, key, entries, tick, false);
        Ok(r)
    }

    /// Runs `f` on the slice at `key` mutably (loading it on a miss) and marks it dirty.
    pub fn modify<R>(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
        f: impl FnOnce(&mut [u64]) -> R,
    ) -> Result<R> {
        let mut g = self.lock(key);
        g.tick += 1;
        let tick = g.tick;
        if !g.map.contains_key(&key) {
            g.misses += 1;
            let entries = load()?;
            self.insert_locked(&mut g, key, entries, tick, false);
        }
        let slot = g.map.get_mut(&key).expect("slot just ensured");
        slot.last_used = tick;
        slot.dirty = true;
        Ok(f(&mut slot.entries))
    }

    /// Inserts a fresh slice (e.g. of a newly allocated, zeroed table) as dirty.
    pub fn insert_dirty(&self, key: u64, entries: Vec<u64>) {
        let mut g = self.lock(key);
        g.tick += 1;
        let tick = g.tick;
        self.insert_locked(&mut g, key, entries, tick, true);
    }

    fn insert_locked(&self, g: &mut Inner, key: u64, entries: Vec<u64>, tick: u64, dirty: bool) {
        while g.map.len() >= self.shard_capacity {
            let victim = g
                .map
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    g.map.remove(&k);
                }
                None => break, // all dirty: grow until the owner writes them back
            }
        }
        g.map.insert(
            key,
            Slot {
                entries,
                last_used: tick,
                dirty,
            },
        );
    }

    /// Copies of all dirty slices, in key order (the caller writes them, then calls
    /// [`Self::mark_clean`]).
    pub fn dirty_slices(&self) -> Vec<(u64, Vec<u64>)> {
        let mut v = Vec::new();
        for g in self.all() {
            v.extend(
                g.map
                    .iter()
                    .filter(|(_, s)| s.dirty)
                    .map(|(k, s)| (*k, s.entries.clone())),
            );
        }
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Marks the slice at `key` clean if its content still equals `written`.
    pub fn mark_clean(&self, key: u64, written: &[u64]) {
        let mut g = self.lock(key);
        if let Some(s) = g.map.get_mut(&key) {
            if s.entries == written {
                s.dirty = false;
            }
        }
    }

    /// Number of dirty slices.
    pub fn dirty_count(&self) -> usize {
        self.all()
            .map(|g| g.map.values().filter(|s| s.dirty).count())
            .sum()
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let mut st = CacheStats::default();
        for g in self.all() {
            st.hits += g.hits;
            st.misses += g.misses;
            st.len += g.map.len();
            st.dirty += g.map.values().filter(|s| s.dirty).count();
        }
        st
    }
}
