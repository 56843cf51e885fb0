//! A least-recently-used cache of L2 table slices, shared between threads.
//!
//! Slices (not whole tables) are cached so that 2 MiB-cluster images do not cost 2 MiB per
//! table. One mutex guards the cache; misses load under it (metadata I/O only: data I/O never
//! runs under this lock). Dirty slices are never evicted: the engine writes them back in
//! dependency order and then marks them clean.

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

/// An LRU cache of decoded table slices keyed by their host offset.
#[derive(Debug)]
pub struct SliceCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl SliceCache {
    /// A cache holding at most `capacity` clean slices (at least 1).
    pub fn new(capacity: usize) -> SliceCache {
        SliceCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a slot half-updated (slots are replaced
        // whole), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the slice at `key`, loading it with `load` on a miss.
    pub fn with<R>(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
        f: impl FnOnce(&[u64]) -> R,
    ) -> Result<R> {
        let mut g = self.lock();
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
        let mut g = self.lock();
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
        let mut g = self.lock();
        g.tick += 1;
        let tick = g.tick;
        self.insert_locked(&mut g, key, entries, tick, true);
    }

    fn insert_locked(&self, g: &mut Inner, key: u64, entries: Vec<u64>, tick: u64, dirty: bool) {
        while g.map.len() >= self.capacity {
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
        let g = self.lock();
        let mut v: Vec<_> = g
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, s)| (*k, s.entries.clone()))
            .collect();
        v.sort_by_key(|(k, _)| *k);
        v
    }

    /// Marks the slice at `key` clean if its content still equals `written`.
    pub fn mark_clean(&self, key: u64, written: &[u64]) {
        let mut g = self.lock();
        if let Some(s) = g.map.get_mut(&key) {
            if s.entries == written {
                s.dirty = false;
            }
        }
    }

    /// Number of dirty slices.
    pub fn dirty_count(&self) -> usize {
        self.lock().map.values().filter(|s| s.dirty).count()
    }

    /// The configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let g = self.lock();
        CacheStats {
            hits: g.hits,
            misses: g.misses,
            len: g.map.len(),
            dirty: g.map.values().filter(|s| s.dirty).count(),
        }
    }
}
