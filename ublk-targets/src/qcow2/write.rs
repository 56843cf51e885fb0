//! The write path: in-place writes, cluster allocation with copy-on-write, refcount block and
//! refcount table growth, and ordered metadata write-back.
//!
//! # Crash safety
//!
//! Metadata changes are made in memory (dirty refcount blocks, refcount-table entries, L2
//! slices, L1 entries) under one allocation mutex and written back by [`Qcow2Image::flush`] in
//! dependency order, with a `sync_data` between stages:
//!
//! 1. refcount blocks, then sync (this sync also makes new clusters' data and COW data durable);
//! 2. new refcount-table entries, then sync;
//! 3. L2 slices, then sync;
//! 4. L1 entries, then sync;
//! 5. only now refcount decrements of clusters that the L2 updates stopped referencing
//!    (compressed or shared clusters that were copied, discarded or zeroed clusters), then
//!    their blocks (synced by the next flush: until then a crash only leaks them). A cluster
//!    whose refcount reaches zero is punched out of the file (`FALLOC_FL_PUNCH_HOLE`) right
//!    there, under the allocation lock and so before it can be allocated again.
//!
//! So a reference on disk never precedes its refcount, and a refcount drop never precedes the
//! unlinking; a crash can leak clusters but not corrupt the image. A cluster whose refcount
//! dropped to zero becomes allocatable only after step 5, and step 5 skips (leaves pending)
//! clusters that a data operation still running may have looked up (see the `inflight`
//! module). A new L2 table is zeroed on disk before
//! the L1 entry pointing at it is written. Growing the refcount table writes the new table and
//! its refcount blocks, syncs, switches the header with one write, syncs, and only then frees the
//! old table. Dirty slices are never evicted; the write path flushes when too many pile up.
//!
//! Extended L2 entries: allocation and copy-on-write work per subcluster (the touched
//! subclusters of a cluster are filled and get their allocation bits; the others keep their
//! state). Internal snapshots: an L2 table with refcount > 1 is copied before it is changed
//! (`copy_l2_table`), a data cluster without COPIED is copied like a compressed one, and the
//! old cluster's reference is dropped in step 5 like any other.
//!
//! Refused at open for writing: the corrupt bit. The dirty bit is repaired first (see the
//! `repair` module). Unknown autoclear bits (bitmaps) are cleared at open.

use super::entry::{self, Mapping, OFFSET_MASK, OFLAG_COPIED};
use super::error::{Qcow2Error, Result};
use super::header::MAX_REFTABLE_BYTES;
use super::image::{read_zero_fill, Qcow2Image};
use super::refcount;
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::sync::MutexGuard;

/// A cached refcount block.
#[derive(Debug)]
struct RefBlock {
    data: Vec<u8>,
    dirty: bool,
    last_used: u64,
}

/// Allocation and write-back state of a writable image.
#[derive(Debug)]
pub(crate) struct Writer {
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable_dirty: BTreeSet<usize>,
    refblocks: HashMap<u64, RefBlock>,
    refblock_capacity: usize,
    tick: u64,
    l1_dirty: BTreeSet<usize>,
    /// Cluster index where the search for a free cluster starts.
    next_free: u64,
    /// Host clusters whose refcount drops once the L2 updates are durable, with the epoch
    /// in which they were unlinked.
    pub(super) pending_decref: Vec<(u64, u64)>,
    /// Pending decrements that trigger a flush from the write path.
    decref_mark: usize,
    /// Punch freed clusters (turned off when the file system cannot).
    punch_holes: bool,
    /// Clusters punched since open.
    punched: u64,
    rb_entries: u64,
}

/// Pending refcount drops that make the write path flush.
const DECREF_BATCH: usize = 4096;

impl Qcow2Image {
    pub(super) fn w_lock(&self) -> Result<MutexGuard<'_, Writer>> {
        match &self.writer {
            None => Err(Qcow2Error::ReadOnly("the image was opened read-only")),
            Some(m) => Ok(m.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }

    fn write_all(&self, buf: &[u8], offset: u64, context: &'static str) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(Qcow2Error::io(context))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(Qcow2Error::io("syncing the image"))
    }

    /// Sets up the writer: loads the refcount table and clears autoclear bits (this
    /// implementation maintains none of the structures they vouch for). The refcount block
    /// cache holds `cache_bytes` worth of blocks, at least 4.
    pub(super) fn open_writer(&mut self, cache_bytes: usize) -> Result<()> {
        let cs = self.geo.cluster_size;
        let rt_bytes = u64::from(self.header.refcount_table_clusters) * cs;
        let mut raw = vec![0u8; rt_bytes as usize];
        self.file
            .read_exact_at(&mut raw, self.header.refcount_table_offset)
            .map_err(Qcow2Error::io("reading the refcount table"))?;
        let reftable: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        if self.header.autoclear_features != 0 {
            log::info!(
                "{}: clearing autoclear features {:#x} before writing",
                self.path.display(),
                self.header.autoclear_features
            );
            self.write_all(&[0u8; 8], 88, "clearing autoclear features")?;
            self.sync()?;
            self.header.autoclear_features = 0;
        }
        let refblock_capacity = (cache_bytes as u64 / cs).max(4) as usize;
        self.writer = Some(std::sync::Mutex::new(Writer {
            reftable,
            reftable_offset: self.header.refcount_table_offset,
            reftable_clusters: u64::from(self.header.refcount_table_clusters),
            reftable_dirty: BTreeSet::new(),
            refblocks: HashMap::new(),
            refblock_capacity,
            tick: 0,
            l1_dirty: BTreeSet::new(),
            next_free: 0,
            pending_decref: Vec::new(),
            decref_mark: DECREF_BATCH,
            punch_holes: true,
            punched: 0,
            rb_entries: refcount::block_entries(self.geo.cluster_bits, self.geo.refcount_order),
        }));
        Ok(())
    }

    // ---- refcounts -----------------------------------------------------------------------

    /// The refcount block holding `cluster`'s refcount, loaded into the cache; None if the
    /// refcount table has no block for it (all its refcounts are zero).
    fn refblock_for(&self, w: &mut Writer, cluster: u64) -> Result<Option<u64>> {
        let rt_index = cluster / w.rb_entries;
        let Some(&rte) = w.reftable.get(rt_index as usize) else {
            return Ok(None);
        };
        let off = rte & entry::REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let cs = self.geo.cluster_size;
        if !off.is_multiple_of(cs) {
            return Err(Qcow2Error::Corrupt(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        w.tick += 1;
        let tick = w.tick;
        if let Some(b) = w.refblocks.get_mut(&off) {
            b.last_used = tick;
            return Ok(Some(off));
        }
        let mut data = vec![0u8; cs as usize];
        self.file.read_exact_at(&mut data, off).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Qcow2Error::Corrupt(format!(
                    "refcount block at {off:#x} lies past the end of the file"
                ))
            } else {
                Qcow2Error::Io {
                    context: "reading a refcount block",
                    source: e,
                }
            }
        })?;
        Self::insert_refblock(w, off, data, false);
        Ok(Some(off))
    }

    fn insert_refblock(w: &mut Writer, off: u64, data: Vec<u8>, dirty: bool) {
        while w.refblocks.len() >= w.refblock_capacity {
            let victim = w
                .refblocks
                .iter()
                .filter(|(_, b)| !b.dirty)
                .min_by_key(|(_, b)| b.last_used)
                .map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    w.refblocks.remove(&k);
                }
                None => break,
            }
        }
        w.tick += 1;
        let last_used = w.tick;
        w.refblocks.insert(
            off,
            RefBlock {
                data,
                dirty,
                last_used,
            },
        );
    }

    fn refcount(&self, w: &mut Writer, cluster: u64) -> Result<u64> {
        match self.refblock_for(w, cluster)? {
            None => Ok(0),
            Some(off) => {
                let idx = cluster % w.rb_entries;
                Ok(refcount::get(
                    &w.refblocks[&off].data,
                    self.geo.refcount_order,
                    idx,
                ))
            }
        }
    }

    /// Adds `delta` (±1) to the refcount of `cluster`, whose refcount block must exist.
    fn change_refcount(&self, w: &mut Writer, cluster: u64, delta: i64) -> Result<u64> {
        let order = self.geo.refcount_order;
        let off = self.refblock_for(w, cluster)?.ok_or_else(|| {
            Qcow2Error::Corrupt(format!("cluster {cluster} has no refcount block"))
        })?;
        let idx = cluster % w.rb_entries;
        let b = w
            .refblocks
            .get_mut(&off)
            .ok_or_else(|| Qcow2Error::Corrupt("refcount block vanished from the cache".into()))?;
        let old = refcount::get(&b.data, order, idx);
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&n| n <= refcount::max_refcount(order))
                .ok_or_else(|| {
                    Qcow2Error::Corrupt(format!("refcount of cluster {cluster} overflows"))
                })?
        } else {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Qcow2Error::Corrupt(format!(
                    "refcount of cluster {cluster} would drop below zero"
                ))
            })?
        };
        refcount::set(&mut b.data, order, idx, new);
        b.dirty = true;
        Ok(new)
    }

    /// Allocates one host cluster (refcount 0 → 1) and returns its byte offset. May create a
    /// refcount block (which then counts itself) or grow the refcount table.
    fn alloc_cluster(&self, w: &mut Writer) -> Result<u64> {
        let cs = self.geo.cluster_size;
        loop {
            let c = w.next_free;
            if c.checked_mul(cs)
                .is_none_or(|o| o >= super::header::MAX_HOST_OFFSET)
            {
                return Err(Qcow2Error::Unsupported(
                    "image file would exceed 2^56 bytes",
                ));
            }
            if self.refcount(w, c)? != 0 {
                w.next_free += 1;
                continue;
            }
            if self.refblock_for(w, c)?.is_none() {
                let rt_index = (c / w.rb_entries) as usize;
                if rt_index >= w.reftable.len() {
                    self.grow_reftable(w, rt_index)?;
                    continue;
                }
                // The new block takes cluster `c` itself, inside the range it describes.
                let mut data = vec![0u8; cs as usize];
                refcount::set(&mut data, self.geo.refcount_order, c % w.rb_entries, 1);
                Self::insert_refblock(w, c * cs, data, true);
                w.reftable[rt_index] = c * cs;
                w.reftable_dirty.insert(rt_index);
                w.next_free = c + 1;
                continue;
            }
            self.change_refcount(w, c, 1)?;
            w.next_free = c + 1;
            return Ok(c * cs);
        }
    }

    /// Replaces the refcount table with a larger one that has an entry for `needed`.
    ///
    /// The new table and the refcount blocks describing it go right after the range the old
    /// table covers (clusters there have no refcount block, so they are free).
    fn grow_reftable(&self, w: &mut Writer, needed: usize) -> Result<()> {
        let cs = self.geo.cluster_size;
        let order = self.geo.refcount_order;
        // Every reftable entry we copy must point at a durable block.
        self.write_refblocks(w)?;
        self.write_reftable_entries(w)?;
        self.sync()?;

        let old_entries = w.reftable.len() as u64;
        let start = old_entries * w.rb_entries; // first cluster not covered
        let entries_per_cluster = cs / 8;
        let mut k = 1u64; // new refcount blocks
        let (n, total_entries) = loop {
            let want = (needed as u64 + 1)
                .max(old_entries + k)
                .max(old_entries * 2);
            let n = want.div_ceil(entries_per_cluster);
            if k * w.rb_entries >= k + n {
                break (n, n * entries_per_cluster);
            }
            k += 1;
        };
        if n * cs > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "refcount table bytes",
                value: n * cs,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        log::debug!(
            "{}: growing the refcount table from {} to {} clusters at cluster {start}",
            self.path.display(),
            w.reftable_clusters,
            n
        );
        // Blocks at clusters start..start+k, table at start+k..start+k+n.
        let used = k + n;
        let mut new_table = w.reftable.clone();
        new_table.resize(total_entries as usize, 0);
        let mut blocks = Vec::new();
        for i in 0..k {
            let mut data = vec![0u8; cs as usize];
            let first = start + i * w.rb_entries;
            for c in first..(first + w.rb_entries).min(start + used) {
                refcount::set(&mut data, order, c - first, 1);
            }
            let off = (start + i) * cs;
            self.write_all(&data, off, "writing a new refcount block")?;
            new_table[(old_entries + i) as usize] = off;
            blocks.push((off, data));
        }
        let table_off = (start + k) * cs;
        let raw: Vec<u8> = new_table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_all(&raw, table_off, "writing the new refcount table")?;
        self.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(n as u32).to_be_bytes());
        self.write_all(&hdr, 48, "switching the refcount table in the header")?;
        self.sync()?;

        let old_off = w.reftable_offset;
        let old_clusters = w.reftable_clusters;
        w.reftable = new_table;
        w.reftable_offset = table_off;
        w.reftable_clusters = n;
        for (off, data) in blocks {
            Self::insert_refblock(w, off, data, false);
        }
        // The header no longer points at the old table: free it.
        for c in 0..old_clusters {
            let cluster = old_off / cs + c;
            if self.change_refcount(w, cluster, -1)? == 0 {
                self.release_host_cluster(w, cluster);
            }
        }
        Ok(())
    }

    // ---- write-back ------------------------------------------------------------------------

    fn write_refblocks(&self, w: &mut Writer) -> Result<bool> {
        let mut dirty: Vec<u64> = w
            .refblocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(k, _)| *k)
            .collect();
        dirty.sort_unstable();
        for off in &dirty {
            if let Some(b) = w.refblocks.get_mut(off) {
                self.file
                    .write_all_at(&b.data, *off)
                    .map_err(Qcow2Error::io("writing a refcount block"))?;
                b.dirty = false;
            }
        }
        Ok(!dirty.is_empty())
    }

    fn write_reftable_entries(&self, w: &mut Writer) -> Result<bool> {
        let dirty: Vec<usize> = w.reftable_dirty.iter().copied().collect();
        for &i in &dirty {
            let off = w.reftable_offset + i as u64 * 8;
            self.write_all(
                &w.reftable[i].to_be_bytes(),
                off,
                "writing a refcount table entry",
            )?;
            // Forget an entry only once it is written: a failed flush retries the rest.
            w.reftable_dirty.remove(&i);
        }
        Ok(!dirty.is_empty())
    }

    fn flush_locked(&self, w: &mut Writer) -> Result<()> {
        // 1. Refcount increments (and, through the sync, guest and COW data).
        self.write_refblocks(w)?;
        self.sync()?;
        // 2. Refcount table entries of new blocks.
        if self.write_reftable_entries(w)? {
            self.sync()?;
        }
        // 3. L2 slices.
        let dirty = self.l2_cache.dirty_slices();
        for (key, entries) in &dirty {
            let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_all(&raw, *key, "writing an L2 table")?;
        }
        if !dirty.is_empty() {
            self.sync()?;
            for (key, entries) in &dirty {
                self.l2_cache.mark_clean(*key, entries);
            }
        }
        // 4. L1 entries.
        if !w.l1_dirty.is_empty() {
            for &i in &w.l1_dirty {
                let off = self.header.l1_table_offset + i as u64 * 8;
                let e = self.l1.get(i).unwrap_or(0);
                self.write_all(&e.to_be_bytes(), off, "writing an L1 entry")?;
            }
            self.sync()?;
            w.l1_dirty.clear();
        }
        // 5. Refcount drops for clusters no longer referenced by durable metadata, once no
        // data operation can still use their old mapping.
        if !w.pending_decref.is_empty() {
            self.inflight.try_advance();
            self.inflight.try_advance();
            // Drop one reference at a time, forgetting it only once applied (an error leaves
            // the rest pending; applied drops are written by the next flush).
            let mut i = 0;
            while i < w.pending_decref.len() {
                let (c, epoch) = w.pending_decref[i];
                if !self.inflight.is_quiescent(epoch) {
                    i += 1;
                    continue;
                }
                if self.change_refcount(w, c, -1)? == 0 {
                    self.release_host_cluster(w, c);
                }
                w.pending_decref.swap_remove(i);
            }
            // No sync needed: the unlinking is durable, so the old and the new refcount are
            // both consistent on disk (a lost drop is a leak); the next flush syncs them.
            self.write_refblocks(w)?;
        }
        w.decref_mark = w.pending_decref.len() + DECREF_BATCH;
        Ok(())
    }

    /// A host cluster whose refcount just dropped to zero: punches it out of the file (so the
    /// host space is returned) and makes it allocatable again.
    ///
    /// Callers hold the allocation lock and have checked that nothing can still use the
    /// cluster: the metadata that stopped referencing it is durable and no data operation that
    /// may have looked it up is running. The punch happens before the cluster can be handed
    /// out (allocation needs the same lock), so it never erases a reused cluster. A crash
    /// before the refcount drop is durable leaves a leaked cluster that reads as zeros.
    fn release_host_cluster(&self, w: &mut Writer, cluster: u64) {
        w.next_free = w.next_free.min(cluster);
        if !w.punch_holes {
            return;
        }
        let cs = self.geo.cluster_size;
        let mode = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        let punched = loop {
            match rustix::fs::fallocate(&self.file, mode, cluster * cs, cs) {
                Err(rustix::io::Errno::INTR) => {}
                r => break r,
            }
        };
        if let Err(e) = punched {
            // Not fatal: the cluster is free either way, only the host space stays allocated.
            log::debug!("{}: not punching freed clusters: {e}", self.path.display());
            w.punch_holes = false;
        } else {
            w.punched += 1;
        }
    }

    /// Number of freed host clusters punched out of the image file since open.
    pub fn punched_clusters(&self) -> u64 {
        self.w_lock().map_or(0, |w| w.punched)
    }

    /// Whether metadata changed since the last write-back (a FUA write into a cluster whose
    /// mapping may not be durable yet needs a flush rather than RWF_DSYNC).
    pub fn metadata_dirty(&self) -> bool {
        let Ok(w) = self.w_lock() else {
            return false;
        };
        !w.l1_dirty.is_empty()
            || !w.reftable_dirty.is_empty()
            || w.refblocks.values().any(|b| b.dirty)
            || self.l2_cache.dirty_count() > 0
    }

    pub(super) fn maybe_flush(&self, w: &mut Writer) -> Result<()> {
        let dirty_blocks = w.refblocks.values().filter(|b| b.dirty).count();
        if self.l2_cache.dirty_count() * 2 >= self.l2_cache.capacity()
            || dirty_blocks * 2 >= w.refblock_capacity
            || w.pending_decref.len() > w.decref_mark
        {
            self.flush_locked(w)?;
        }
        Ok(())
    }

    /// Makes every write completed before this call durable: writes back dirty metadata in
    /// dependency order (see the module docs) and syncs the image file. A no-op when read-only.
    pub fn flush(&self) -> Result<()> {
        if self.writer.is_none() {
            return Ok(());
        }
        let mut w = self.w_lock()?;
        self.flush_locked(&mut w)
    }

    // ---- guest writes ----------------------------------------------------------------------

    /// Writes `buf` to the virtual disk at `offset`.
    ///
    /// Writes to allocated clusters go to the file in place without taking the allocation
    /// lock; writes to unallocated, zero or compressed clusters allocate a cluster, fill the
    /// rest of it (copy-on-write from the backing file, zeros, or the decompressed cluster)
    /// and update the L2 table in memory. Durability needs [`Self::flush`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.writer.is_none() {
            return Err(Qcow2Error::ReadOnly("the image was opened read-only"));
        }
        self.check_range(offset, buf.len())?;
        let _io = self.inflight.guard();
        let cs = self.geo.cluster_size;
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let (m, len) = self.map_extent(guest, (buf.len() - pos) as u64)?;
            if let Mapping::Data { host, copied: true } = m {
                self.write_all(&buf[pos..pos + len as usize], host, "writing guest data")?;
                pos += len as usize;
                continue;
            }
            let in_cluster = guest & (cs - 1);
            let n = ((cs - in_cluster) as usize).min(buf.len() - pos);
            let mut w = self.w_lock()?;
            self.write_allocating(&mut w, guest, &buf[pos..pos + n])?;
            self.maybe_flush(&mut w)?;
            pos += n;
        }
        Ok(())
    }

    /// The L2 table for `l1_index`, allocated (zeroed on disk) if missing.
    pub(super) fn ensure_l2_table(&self, w: &mut Writer, l1_index: usize) -> Result<u64> {
        let cb = self.geo.cluster_bits;
        let l1e = self
            .l1
            .get(l1_index)
            .ok_or_else(|| Qcow2Error::Corrupt("L1 index beyond the L1 table".into()))?;
        if let Some(off) = entry::l1_l2_offset(l1e, cb).map_err(Qcow2Error::Corrupt)? {
            if l1e & OFLAG_COPIED == 0 {
                if self.refcount(w, off >> cb)? > 1 {
                    return self.copy_l2_table(w, l1_index, off);
                }
                self.l1.set(l1_index, l1e | OFLAG_COPIED);
                w.l1_dirty.insert(l1_index);
            }
            return Ok(off);
        }
        let off = self.alloc_cluster(w)?;
        self.write_all(
            &vec![0u8; self.geo.cluster_size as usize],
            off,
            "zeroing a new L2 table",
        )?;
        self.l1.set(l1_index, off | OFLAG_COPIED);
        w.l1_dirty.insert(l1_index);
        Ok(off)
    }

    /// Copy-on-write of an L2 table shared with internal snapshots (refcount > 1): the active
    /// L1 entry gets a private copy.
    ///
    /// The copy references the same clusters through the same number of L1 tables as before
    /// (the active one now reaches them through the copy), so data refcounts do not change and
    /// the copied entries keep their (clear) COPIED bits: writes to them copy the data
    /// clusters in turn. The copy is written (and counted) before the L1 entry points at it;
    /// the old table loses the active L1's reference only after that L1 entry is durable.
    fn copy_l2_table(&self, w: &mut Writer, l1_index: usize, old: u64) -> Result<u64> {
        let cs = self.geo.cluster_size;
        // A shared table is never modified in place, so the file holds its current content
        // (the cache may hold clean slices of it, never dirty ones).
        let mut table = vec![0u8; cs as usize];
        read_zero_fill(&self.file, &mut table, old, "reading a shared L2 table")?;
        let new = self.alloc_cluster(w)?;
        self.write_all(&table, new, "writing a copied L2 table")?;
        log::debug!(
            "{}: L2 table {l1_index} shared with a snapshot: copied from {old:#x} to {new:#x}",
            self.path.display()
        );
        self.l1.set(l1_index, new | OFLAG_COPIED);
        w.l1_dirty.insert(l1_index);
        w.pending_decref
            .push((old >> self.geo.cluster_bits, self.inflight.current()));
        Ok(new)
    }

    /// Writes `data` (within one cluster) at `guest` when the cluster is not writable in place.
    fn write_allocating(&self, w: &mut Writer, guest: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size;
        let cb = self.geo.cluster_bits;
        let (l1i, l2i, in_cluster) = self.geo.split(guest);
        let l2_off = self.ensure_l2_table(w, l1i as usize)?;
        let (key, i) = self.l2_slot(l2_off, l2i);
        if self.geo.extended_l2 {
            return self.write_allocating_ext(w, guest, data, key, i);
        }
        let old_entry = self
            .l2_cache
            .with(key, || self.load_l2_slice(key), |s| s[i])?;
        let old = entry::classify(old_entry, None, 0, cb).map_err(Qcow2Error::Corrupt)?;
        if let Mapping::Data { host, copied: true } = old {
            // Another writer allocated it meanwhile.
            return self.write_all(data, host + in_cluster, "writing guest data");
        }
        let old_host = old_entry & OFFSET_MASK;
        let zero_alloc_owned =
            matches!(old, Mapping::Zero) && old_host != 0 && old_entry & OFLAG_COPIED != 0;
        let target = if zero_alloc_owned {
            old_host // a preallocated zero cluster we own: reuse it
        } else {
            self.alloc_cluster(w)?
        };
        let mut cluster = vec![0u8; cs as usize];
        if data.len() as u64 != cs {
            let start = guest - in_cluster;
            match old {
                Mapping::Unallocated => {
                    if let Some(b) = &self.backing {
                        b.read_at(&mut cluster, start)?;
                    }
                }
                Mapping::Zero => {}
                Mapping::Data { host, .. } => {
                    read_zero_fill(&self.file, &mut cluster, host, "copying a shared cluster")?
                }
                Mapping::Compressed(d) => cluster.copy_from_slice(&self.decompress_cluster(d)?),
            }
        }
        cluster[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
        self.write_all(&cluster, target, "writing a new cluster")?;
        self.l2_cache.modify(
            key,
            || self.load_l2_slice(key),
            |s| s[i] = target | OFLAG_COPIED,
        )?;
        if !zero_alloc_owned {
            self.unlinked(w, old_entry);
        }
        Ok(())
    }

    /// [`Self::write_allocating`] for extended L2 entries: copy-on-write happens per
    /// subcluster.
    ///
    /// * A cluster with its own host cluster (COPIED): the touched subclusters that are not
    ///   allocated are written whole (the rest of each from the backing file, or zeros for
    ///   zero or backing-less subclusters) and get their allocation bit (zero bit cleared);
    ///   allocated ones are written in place. Untouched subclusters keep their state.
    /// * A cluster without a host cluster: one is allocated, then as above.
    /// * A compressed cluster, or a host cluster shared with a snapshot: the whole cluster is
    ///   copied into a new one with every subcluster allocated.
    fn write_allocating_ext(
        &self,
        w: &mut Writer,
        guest: u64,
        data: &[u8],
        key: u64,
        i: usize,
    ) -> Result<()> {
        let cs = self.geo.cluster_size;
        let cb = self.geo.cluster_bits;
        let sub_bits = cb - 5;
        let sub_size = 1u64 << sub_bits;
        let in_cluster = guest & (cs - 1);
        let start = guest - in_cluster;
        let (old_entry, old_bm) = self.l2_cache.with(
            key,
            || self.load_l2_slice(key),
            |s| (s[2 * i], s[2 * i + 1]),
        )?;
        let old_host = old_entry & OFFSET_MASK;
        let full_copy = old_entry & entry::OFLAG_COMPRESSED != 0
            || (old_host != 0 && old_entry & OFLAG_COPIED == 0);
        if full_copy {
            let mut cluster = self.cluster_content(old_entry, old_bm, start)?;
            cluster[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
            let target = self.alloc_cluster(w)?;
            self.write_all(&cluster, target, "writing a new cluster")?;
            self.l2_cache.modify(
                key,
                || self.load_l2_slice(key),
                |s| {
                    s[2 * i] = target | OFLAG_COPIED;
                    s[2 * i + 1] = 0xffff_ffff;
                },
            )?;
            self.unlinked(w, old_entry);
            return Ok(());
        }
        let host = if old_host == 0 {
            self.alloc_cluster(w)?
        } else {
            old_host
        };
        let mut bm = old_bm;
        let end = in_cluster + data.len() as u64;
        let mut sub_buf = Vec::new();
        let mut pos = in_cluster;
        while pos < end {
            let sub = pos >> sub_bits;
            let sub_start = sub << sub_bits;
            let piece_end = (sub_start + sub_size).min(end);
            let piece = &data[(pos - in_cluster) as usize..(piece_end - in_cluster) as usize];
            if bm & (1 << sub) != 0 || piece.len() as u64 == sub_size {
                self.write_all(piece, host + pos, "writing guest data")?;
            } else {
                sub_buf.clear();
                sub_buf.resize(sub_size as usize, 0);
                let zero = bm & (1 << (sub + 32)) != 0;
                if !zero {
                    if let Some(b) = &self.backing {
                        b.read_at(&mut sub_buf, start + sub_start)?;
                    }
                }
                let at = (pos - sub_start) as usize;
                sub_buf[at..at + piece.len()].copy_from_slice(piece);
                self.write_all(&sub_buf, host + sub_start, "writing a new subcluster")?;
            }
            bm = (bm | (1 << sub)) & !(1 << (sub + 32));
            pos = piece_end;
        }
        self.l2_cache.modify(
            key,
            || self.load_l2_slice(key),
            |s| {
                s[2 * i] = host | OFLAG_COPIED;
                s[2 * i + 1] = bm;
            },
        )?;
        Ok(())
    }

    /// What the guest cluster starting at `start` reads as, given its extended L2 entry.
    fn cluster_content(&self, e: u64, bm: u64, start: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size;
        let cb = self.geo.cluster_bits;
        let sub_size = (cs / 32) as usize;
        let mut cluster = vec![0u8; cs as usize];
        for sub in 0..32u32 {
            let chunk = &mut cluster[sub as usize * sub_size..(sub as usize + 1) * sub_size];
            let off = u64::from(sub) * sub_size as u64;
            match entry::classify(e, Some(bm), sub, cb).map_err(Qcow2Error::Corrupt)? {
                Mapping::Compressed(d) => {
                    cluster.copy_from_slice(&self.decompress_cluster(d)?);
                    break;
                }
                Mapping::Zero => {}
                Mapping::Unallocated => {
                    if let Some(b) = &self.backing {
                        b.read_at(chunk, start + off)?;
                    }
                }
                Mapping::Data { host, .. } => {
                    read_zero_fill(&self.file, chunk, host + off, "copying a shared cluster")?
                }
            }
        }
        Ok(cluster)
    }

    /// Queues the refcount drops of the host clusters `old_entry` referenced, after the L2
    /// entry stopped referencing them (in memory).
    pub(super) fn unlinked(&self, w: &mut Writer, old_entry: u64) {
        let cb = self.geo.cluster_bits;
        let epoch = self.inflight.current();
        match entry::classify(old_entry, None, 0, cb) {
            Ok(Mapping::Compressed(d)) => {
                let (first, last) = d.host_clusters(cb);
                w.pending_decref.extend((first..=last).map(|c| (c, epoch)));
            }
            Ok(Mapping::Data { host, .. }) => w.pending_decref.push((host >> cb, epoch)),
            Ok(Mapping::Zero) if old_entry & OFFSET_MASK != 0 => w
                .pending_decref
                .push(((old_entry & OFFSET_MASK) >> cb, epoch)),
            _ => {}
        }
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.writer.is_some() {
            if let Err(e) = self.flush() {
                log::error!("{}: flush on close failed: {e}", self.path.display());
            }
        }
    }
}
