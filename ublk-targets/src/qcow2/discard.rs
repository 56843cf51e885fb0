//! Discard and write-zeroes.
//!
//! Both act on whole clusters by rewriting L2 entries (in memory, under the allocation lock,
//! written back by the next flush like any other L2 change):
//!
//! * a cluster that must read as zeros and no longer needs its host cluster gets the entry
//!   `0` (unallocated) without a backing file, or the zero flag (`ZERO_PLAIN`) with one, so
//!   the backing file does not show through;
//! * write-zeroes that must keep the allocation (`NOUNMAP`) sets the zero flag on the existing
//!   entry (`ZERO_ALLOC`: host offset and COPIED kept, refcount unchanged); a later partial
//!   write into it fills the rest of the cluster with zeros, not with the stale host bytes.
//!
//! Host clusters an entry stops referencing are queued for a refcount drop, which the flush
//! applies only after the new L2 entries are durable and once no data operation that may
//! have looked up the old mapping is still running (see the `write` and `inflight` modules).
//!
//! Partial clusters: discard ignores them (discarded data is undefined, keeping it is fine);
//! write-zeroes writes zeros through the normal write path, skipping extents that already
//! read as zeros. Version 2 images have no zero flag: there write-zeroes writes zeros unless
//! the cluster can simply be unallocated (no backing file), and discard with a backing file
//! does nothing (unallocating would expose the backing file's data).

use super::entry::{self, Mapping, OFFSET_MASK, OFLAG_ZERO};
use super::error::{Qcow2Error, Result};
use super::image::Qcow2Image;
use super::write::Writer;

/// What whole clusters should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whole {
    /// Read as zeros, host cluster released.
    Unmap,
    /// Read as zeros, host cluster kept where there is one.
    ZeroKeep,
}

impl Qcow2Image {
    /// Discards `[offset, offset + len)`: whole clusters in the range read as zeros afterwards
    /// and release their host clusters; partial clusters are left alone. On version 2 images
    /// with a backing file this does nothing.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        if self.writer.is_none() {
            return Err(Qcow2Error::ReadOnly("the image was opened read-only"));
        }
        if self.header.version < 3 && self.backing.is_some() {
            return Ok(());
        }
        let (first, count) = self.whole_clusters(offset, len);
        self.zero_whole(first, count, Whole::Unmap)
    }

    /// Makes `[offset, offset + len)` read as zeros. `keep_allocation` (`NOUNMAP`) keeps the
    /// host clusters of whole allocated clusters; otherwise they are released.
    pub fn write_zeroes(&self, offset: u64, len: u64, keep_allocation: bool) -> Result<()> {
        self.check_range(offset, usize::try_from(len).unwrap_or(usize::MAX))?;
        if self.writer.is_none() {
            return Err(Qcow2Error::ReadOnly("the image was opened read-only"));
        }
        let cs = self.geo.cluster_size;
        let (first, count) = self.whole_clusters(offset, len);
        let end = offset + len;
        if count == 0 {
            return self.zero_partial(offset, len);
        }
        let whole_start = first * cs;
        let whole_end = ((first + count) * cs).min(self.geo.size);
        self.zero_partial(offset, whole_start - offset)?;
        self.zero_partial(whole_end, end - whole_end)?;
        if self.header.version >= 3 {
            let mode = if keep_allocation {
                Whole::ZeroKeep
            } else {
                Whole::Unmap
            };
            return self.zero_whole(first, count, mode);
        }
        if !keep_allocation && self.backing.is_none() {
            return self.zero_whole(first, count, Whole::Unmap);
        }
        // Version 2 without a zero flag: write zeros (in place where allocated).
        self.zero_partial(whole_start, whole_end - whole_start)
    }

    /// The clusters lying entirely inside `[offset, offset + len)` (the last cluster of a disk
    /// whose size is not cluster aligned counts as whole when the range reaches the end).
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.geo.cluster_size;
        let end = offset + len;
        let first = offset.div_ceil(cs);
        let last = if end == self.geo.size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        (first, last.saturating_sub(first))
    }

    /// Writes zeros over `[offset, offset + len)` through the write path, skipping extents that
    /// already read as zeros.
    fn zero_partial(&self, offset: u64, len: u64) -> Result<()> {
        let mut zeros = Vec::new();
        let mut pos = 0;
        while pos < len {
            let g = offset + pos;
            let (m, n) = self.map_extent(g, len - pos)?;
            let reads_zero = match m {
                Mapping::Zero => true,
                Mapping::Unallocated => self.backing.is_none(),
                Mapping::Data { .. } | Mapping::Compressed(_) => false,
            };
            if !reads_zero {
                let mut done = 0;
                while done < n {
                    let chunk = (n - done).min(1 << 20);
                    zeros.resize(chunk as usize, 0);
                    self.write_at(&zeros, g + done)?;
                    done += chunk;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// One cluster of [`Self::zero_whole`] with extended L2 entries: every subcluster gets
    /// its zero bit (none allocated). Without a backing file, unmapping clears the entry
    /// entirely instead. The host cluster is kept for `ZeroKeep` (unless compressed) and
    /// released otherwise.
    fn zero_whole_ext(&self, w: &mut Writer, key: u64, i: usize, mode: Whole) -> Result<()> {
        const ALL_ZERO: u64 = 0xffff_ffff << 32;
        let (old, old_bm) = self.l2_cache.with(
            key,
            || self.load_l2_slice(key),
            |s| (s[2 * i], s[2 * i + 1]),
        )?;
        let keep =
            mode == Whole::ZeroKeep && old & entry::OFLAG_COMPRESSED == 0 && old & OFFSET_MASK != 0;
        let (new, new_bm) = if keep {
            (old, ALL_ZERO)
        } else if self.backing.is_some() || mode == Whole::ZeroKeep {
            (0, ALL_ZERO)
        } else {
            (0, 0)
        };
        if (new, new_bm) != (old, old_bm) {
            self.l2_cache.modify(
                key,
                || self.load_l2_slice(key),
                |s| {
                    s[2 * i] = new;
                    s[2 * i + 1] = new_bm;
                },
            )?;
            if !keep {
                self.unlinked(w, old);
            }
        }
        Ok(())
    }

    /// Rewrites the L2 entries of clusters `first..first + count` so that they read as zeros.
    fn zero_whole(&self, first: u64, count: u64, mode: Whole) -> Result<()> {
        let cb = self.geo.cluster_bits;
        let plain_zero = if self.backing.is_some() {
            OFLAG_ZERO
        } else {
            0
        };
        let mut c = first;
        let end = first + count;
        while c < end {
            let mut w = self.w_lock()?;
            // One L2 slice's worth of clusters per lock hold.
            let batch_end = end.min((c / self.slice_entries + 1) * self.slice_entries);
            while c < batch_end {
                let (l1i, l2i, _) = self.geo.split(c << cb);
                let has_table = self.l1.get(l1i as usize).unwrap_or(0) & OFFSET_MASK != 0;
                if !has_table && plain_zero == 0 {
                    // The whole L2 table is unallocated and reads as zeros: skip it.
                    c = ((l1i + 1) * self.geo.l2_entries).min(end).max(c + 1);
                    continue;
                }
                let l2_off = self.ensure_l2_table(&mut w, l1i as usize)?;
                let (key, i) = self.l2_slot(l2_off, l2i);
                if self.geo.extended_l2 {
                    self.zero_whole_ext(&mut w, key, i, mode)?;
                    c += 1;
                    continue;
                }
                let old = self
                    .l2_cache
                    .with(key, || self.load_l2_slice(key), |s| s[i])?;
                let new = match entry::classify(old, None, 0, cb).map_err(Qcow2Error::Corrupt)? {
                    Mapping::Zero if mode == Whole::ZeroKeep => old,
                    Mapping::Data { .. } if mode == Whole::ZeroKeep => old | OFLAG_ZERO,
                    _ => plain_zero,
                };
                if new != old {
                    self.l2_cache
                        .modify(key, || self.load_l2_slice(key), |s| s[i] = new)?;
                    if new & OFFSET_MASK == 0 {
                        self.unlinked(&mut w, old);
                    }
                }
                c += 1;
            }
            self.maybe_flush(&mut w)?;
        }
        Ok(())
    }
}
