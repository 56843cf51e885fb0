//! Refcount repair of dirty images (incompatible bit 0, left set by a lazy-refcounts writer that
//! did not close the image cleanly).
//!
//! A writable open of a dirty image rebuilds every refcount from the structures that reference
//! host clusters, the way `qemu-img check -r all` does, before anything else is written:
//!
//! 1. count the references: the header cluster, the active L1 table, the snapshot table and
//!    every snapshot's L1 table, each L2 table once per L1 entry pointing at it, and each data
//!    cluster (or host cluster touched by compressed data) once per L2 entry, walking every L2
//!    table once per reference so that tables shared with snapshots count their clusters for
//!    each of them;
//! 2. fix OFLAG_COPIED in the active L1 and L2 tables (set exactly where the refcount is 1);
//! 3. write a complete new refcount structure (blocks, then the table) past the end of
//!    everything in use, sync, switch the header to it with one write, sync;
//! 4. clear the dirty bit with one header write and sync.
//!
//! Until step 4 the dirty bit stays set, so a crash anywhere leaves an image that is repaired
//! again on the next open (the old refcount table stays valid until the header switch; the
//! clusters it occupied become free once the new one is in place). Images with persistent
//! bitmaps are not repaired (their clusters would have to be counted too): such an open fails.
//!
//! Read-only opens of dirty images do not repair anything: reads do not use refcounts.

use super::entry::{self, CompressedDescriptor, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::error::{Qcow2Error, Result};
use super::header::{HeaderExtension, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use super::image::Qcow2Image;
use super::refcount;
use super::snapshot::{SnapshotEntry, FIXED_LEN};
use std::os::unix::fs::FileExt;

/// Reference counts being rebuilt, one per host cluster.
struct Counts {
    counts: Vec<u64>,
    /// Clusters beyond this index cannot be referenced by a sane image.
    limit: u64,
}

impl Counts {
    fn add(&mut self, cluster: u64, what: &str) -> Result<()> {
        if cluster >= self.limit {
            return Err(Qcow2Error::Corrupt(format!(
                "{what} references host cluster {cluster}, far beyond the end of the file"
            )));
        }
        let i = cluster as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        Ok(())
    }

    fn add_range(&mut self, offset: u64, len: u64, cluster_bits: u32, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in (offset >> cluster_bits)..=((offset + len - 1) >> cluster_bits) {
            self.add(c, what)?;
        }
        Ok(())
    }

    fn get(&self, cluster: u64) -> u64 {
        self.counts.get(cluster as usize).copied().unwrap_or(0)
    }
}

impl Qcow2Image {
    /// Rebuilds the refcounts of a dirty image and clears the dirty bit (see the module docs).
    /// Called by a writable open before the writer is set up.
    pub(super) fn repair_refcounts(&mut self) -> Result<()> {
        if self
            .header
            .extensions
            .iter()
            .any(|e| matches!(e, HeaderExtension::Bitmaps(_)))
        {
            return Err(Qcow2Error::Unsupported(
                "repairing the refcounts of a dirty image with persistent bitmaps",
            ));
        }
        log::info!(
            "{}: image is dirty (not closed cleanly by a lazy-refcounts writer): rebuilding refcounts",
            self.path.display()
        );
        let cs = self.geo.cluster_size;
        let cb = self.geo.cluster_bits;
        let file_size = self
            .file
            .metadata()
            .map_err(Qcow2Error::io("reading the image size"))?
            .len();
        let file_clusters = file_size.div_ceil(cs);
        let mut counts = Counts {
            counts: vec![0; file_clusters as usize],
            // Data clusters may lie past EOF (preallocation=metadata), but not further than
            // every guest cluster and table allocated after the end of the file.
            limit: file_clusters + (self.geo.size >> cb) + 2 * u64::from(self.geo.l1_size) + 1024,
        };

        // 1. References.
        counts.add(0, "the header")?;
        let l1_bytes = u64::from(self.geo.l1_size) * 8;
        counts.add_range(self.header.l1_table_offset, l1_bytes, cb, "the L1 table")?;
        let active_l1 = self.l1.to_vec();
        self.count_l1(&active_l1, &mut counts)?;

        let mut pos = self.header.snapshots_offset;
        for _ in 0..self.header.nb_snapshots {
            let mut fixed = [0u8; FIXED_LEN];
            self.file
                .read_exact_at(&mut fixed, pos)
                .map_err(Qcow2Error::io("reading the snapshot table"))?;
            let snap = SnapshotEntry::parse(&fixed).map_err(Qcow2Error::Corrupt)?;
            let l1_len = u64::from(snap.l1_size) * 8;
            if snap.l1_table_offset % cs != 0 || l1_len > super::header::MAX_L1_BYTES {
                return Err(Qcow2Error::Corrupt(format!(
                    "snapshot L1 table at {:#x} with {} entries",
                    snap.l1_table_offset, snap.l1_size
                )));
            }
            counts.add_range(snap.l1_table_offset, l1_len, cb, "a snapshot L1 table")?;
            let mut raw = vec![0u8; l1_len as usize];
            self.file
                .read_exact_at(&mut raw, snap.l1_table_offset)
                .map_err(Qcow2Error::io("reading a snapshot L1 table"))?;
            let l1: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
            self.count_l1(&l1, &mut counts)?;
            pos += snap.entry_len;
        }
        if self.header.nb_snapshots > 0 {
            let len = pos - self.header.snapshots_offset;
            counts.add_range(self.header.snapshots_offset, len, cb, "the snapshot table")?;
        }

        // 2. COPIED flags of the active tables.
        self.fix_copied(&active_l1, &counts)?;

        // 3. A new refcount structure after everything in use.
        let rb_entries = refcount::block_entries(cb, self.geo.refcount_order);
        let start = file_clusters.max(counts.counts.len() as u64);
        let (mut k, mut n) = (0u64, 0u64);
        loop {
            let total = start + k + n;
            let blocks = total.div_ceil(rb_entries);
            let table = (blocks * 8).div_ceil(cs);
            if blocks == k && table == n {
                break;
            }
            (k, n) = (blocks, table);
        }
        if n * cs > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "refcount table bytes",
                value: n * cs,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        counts.counts.resize((start + k + n) as usize, 0);
        for c in start..start + k + n {
            counts.counts[c as usize] = 1;
        }
        let order = self.geo.refcount_order;
        let max = refcount::max_refcount(order);
        if let Some(c) = counts.counts.iter().position(|&r| r > max) {
            return Err(Qcow2Error::Corrupt(format!(
                "host cluster {c} has {} references, more than {}-bit refcounts hold",
                counts.counts[c],
                1u32 << order
            )));
        }
        let mut table = vec![0u8; (n * cs) as usize];
        for b in 0..k {
            let mut data = vec![0u8; cs as usize];
            let first = b * rb_entries;
            let last = (first + rb_entries).min(counts.counts.len() as u64);
            for c in first..last {
                let r = counts.counts[c as usize];
                if r != 0 {
                    refcount::set(&mut data, order, c - first, r);
                }
            }
            let off = (start + b) * cs;
            self.file
                .write_all_at(&data, off)
                .map_err(Qcow2Error::io("writing a rebuilt refcount block"))?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        let table_off = (start + k) * cs;
        self.file
            .write_all_at(&table, table_off)
            .map_err(Qcow2Error::io("writing the rebuilt refcount table"))?;
        self.sync_file()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(n as u32).to_be_bytes());
        self.file
            .write_all_at(&hdr, 48)
            .map_err(Qcow2Error::io("switching the refcount table in the header"))?;
        self.sync_file()?;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = n as u32;

        // 4. Clean.
        let incompat = self.header.incompatible_features & !INCOMPAT_DIRTY;
        self.file
            .write_all_at(&incompat.to_be_bytes(), 72)
            .map_err(Qcow2Error::io("clearing the dirty bit"))?;
        self.sync_file()?;
        self.header.incompatible_features = incompat;
        log::info!(
            "{}: refcounts rebuilt ({} refcount blocks, table at {table_off:#x}); dirty bit cleared",
            self.path.display(),
            k
        );
        Ok(())
    }

    fn sync_file(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(Qcow2Error::io("syncing the image"))
    }

    fn read_l2_table(&self, off: u64) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; self.geo.cluster_size as usize];
        super::image::read_zero_fill(&self.file, &mut raw, off, "reading an L2 table")?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// Counts the L2 tables an L1 table references and the host clusters their entries
    /// reference.
    fn count_l1(&self, l1: &[u64], counts: &mut Counts) -> Result<()> {
        let cb = self.geo.cluster_bits;
        for &l1e in l1 {
            let Some(l2_off) = entry::l1_l2_offset(l1e, cb).map_err(Qcow2Error::Corrupt)? else {
                continue;
            };
            counts.add(l2_off >> cb, "an L1 entry")?;
            let l2 = self.read_l2_table(l2_off)?;
            let step = if self.geo.extended_l2 { 2 } else { 1 };
            for &e in l2.iter().step_by(step) {
                self.count_l2_entry(e, counts)?;
            }
        }
        Ok(())
    }

    fn count_l2_entry(&self, e: u64, counts: &mut Counts) -> Result<()> {
        let cb = self.geo.cluster_bits;
        if e & OFLAG_COMPRESSED != 0 {
            let d = CompressedDescriptor::decode(e & !(OFLAG_COMPRESSED | OFLAG_COPIED), cb);
            let (first, last) = d.host_clusters(cb);
            for c in first..=last {
                counts.add(c, "a compressed L2 entry")?;
            }
            return Ok(());
        }
        let host = e & OFFSET_MASK;
        if host != 0 {
            if host & (self.geo.cluster_size - 1) != 0 {
                return Err(Qcow2Error::Corrupt(format!(
                    "L2 entry {e:#018x}: host offset is not cluster aligned"
                )));
            }
            counts.add(host >> cb, "an L2 entry")?;
        }
        Ok(())
    }

    /// Sets OFLAG_COPIED in the active L1 table and the L2 tables it references exactly where
    /// the refcount is 1, writing the changed entries in place (safe under the dirty bit).
    fn fix_copied(&self, l1: &[u64], counts: &Counts) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let step = if self.geo.extended_l2 { 2 } else { 1 };
        let mut new_l1 = l1.to_vec();
        for (i, &l1e) in l1.iter().enumerate() {
            let Some(l2_off) = entry::l1_l2_offset(l1e, cb).map_err(Qcow2Error::Corrupt)? else {
                continue;
            };
            let want = if counts.get(l2_off >> cb) == 1 {
                l1e | OFLAG_COPIED
            } else {
                l1e & !OFLAG_COPIED
            };
            if want != l1e {
                new_l1[i] = want;
                self.file
                    .write_all_at(
                        &want.to_be_bytes(),
                        self.header.l1_table_offset + i as u64 * 8,
                    )
                    .map_err(Qcow2Error::io("fixing COPIED in the L1 table"))?;
            }
            let mut l2 = self.read_l2_table(l2_off)?;
            let mut changed = false;
            for j in (0..l2.len()).step_by(step) {
                let e = l2[j];
                let host = e & OFFSET_MASK;
                if e & OFLAG_COMPRESSED != 0 || host == 0 {
                    if e & OFLAG_COPIED != 0 && e & OFLAG_COMPRESSED != 0 {
                        l2[j] = e & !OFLAG_COPIED;
                        changed = true;
                    }
                    continue;
                }
                let want = if counts.get(host >> cb) == 1 {
                    e | OFLAG_COPIED
                } else {
                    e & !OFLAG_COPIED
                };
                if want != e {
                    l2[j] = want;
                    changed = true;
                }
            }
            if changed && counts.get(l2_off >> cb) == 1 {
                let raw: Vec<u8> = l2.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.file
                    .write_all_at(&raw, l2_off)
                    .map_err(Qcow2Error::io("fixing COPIED in an L2 table"))?;
            } else if changed {
                // A table shared with a snapshot: its COPIED bits are never trusted for
                // writing (the write path checks the table's refcount first); leave it.
                log::debug!(
                    "{}: shared L2 table at {l2_off:#x} has stale COPIED bits",
                    self.path.display()
                );
            }
        }
        for (i, e) in new_l1.into_iter().enumerate() {
            self.l1.set(i, e);
        }
        Ok(())
    }
}
