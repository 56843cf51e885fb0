//! Files on memory-backed file systems (tmpfs, ramfs).
//!
//! There a read or write is a memory copy that never waits for a device, yet io_uring cannot
//! do it without blocking and hands every such operation to one of its worker threads: a
//! thread switch and two wake-ups per request for a copy of a few microseconds. Targets do
//! these transfers inline on the queue thread instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use ublk_core::FileMap;

/// Whether `file` lives on a memory-backed file system (tmpfs, ramfs).
pub(crate) fn memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    match rustix::fs::fstatfs(file) {
        Ok(st) => matches!(st.f_type as u64, TMPFS_MAGIC | RAMFS_MAGIC),
        Err(e) => {
            log::debug!("fstatfs failed: {e}");
            false
        }
    }
}

/// Fills `buf` from `file` at `off`; past the end of the file, zeros.
pub(crate) fn read_full_at(file: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, off) {
            Ok(0) => {
                buf.fill(0);
                break;
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Zeros to copy from.
pub(crate) static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Whether `file` lives on tmpfs, whose holes read as zeros without taking memory and whose
/// `SEEK_DATA` / `SEEK_HOLE` tell them apart.
pub(crate) fn on_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    rustix::fs::fstatfs(file).is_ok_and(|st| st.f_type as u64 == TMPFS_MAGIC)
}

/// Which parts of a tmpfs file hold pages, as far as its target knows: a shared bitmap of
/// `1 << shift`-byte units.
///
/// Reading a hole through a shared mapping makes tmpfs allocate a page for it, where `pread`
/// returns zeros and allocates nothing: a sparse backing file read whole would fill memory.
/// So reads go through the mapping only where every unit is known to hold data: found by
/// `SEEK_DATA` / `SEEK_HOLE` at open, then marked by the target's own writes and unmarked
/// before its hole punches. Writes by others are merely not known (their ranges are read with
/// `pread`, correctly); a hole punched by another process while marked costs a page if read
/// through the mapping, never wrong data.
#[derive(Debug)]
pub(crate) struct Allocated {
    shift: u32,
    len: u64,
    words: Vec<std::sync::atomic::AtomicU64>,
}

/// A tmpfs file mapped shared ([`FileMap`]) for one-copy user copy, with what of it holds
/// data ([`Allocated`]): reads through the mapping only there.
#[derive(Debug)]
pub(crate) struct MappedFile {
    pub(crate) map: FileMap,
    pub(crate) allocated: Allocated,
}

impl MappedFile {
    /// Maps `file` (`len` bytes; a mapping may reach past the end of a file that will grow),
    /// if it is on tmpfs; None, with the reason logged, where it cannot be mapped.
    pub(crate) fn open(file: &File, len: u64, writable: bool) -> Option<MappedFile> {
        if !on_tmpfs(file) {
            return None;
        }
        let r = FileMap::new(file, len, writable).and_then(|map| {
            let size = file.metadata()?.len().min(len);
            let allocated = Allocated::new(len);
            allocated.scan_extents(file, size)?;
            Ok(MappedFile { map, allocated })
        });
        r.inspect_err(|e| log::info!("cannot map the backing file: {e}; copying through buffers"))
            .ok()
    }

    /// Whether `[off, off + len)` can be read through the mapping (it holds data).
    pub(crate) fn readable(&self, file: &File, off: u64, len: u64) -> bool {
        self.map.covers(off, len) && self.allocated.probe(file, off, len)
    }

    /// Whether `[off, off + len)` can be written through the mapping.
    pub(crate) fn writable(&self, off: u64, len: u64) -> bool {
        self.map.is_writable() && self.map.covers(off, len)
    }
}

/// Bitmap units: 4 KiB pages up to files of 64 GiB (a 2 MiB bitmap), larger units beyond.
const MAX_UNITS: u64 = 1 << 24;

impl Allocated {
    /// An empty map (nothing known to hold data) of a file of `len` bytes.
    pub(crate) fn new(len: u64) -> Allocated {
        let mut shift = 12;
        while len >> shift > MAX_UNITS {
            shift += 1;
        }
        let units = len.div_ceil(1 << shift);
        let words = (0..units.div_ceil(64))
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        Allocated { shift, len, words }
    }

    /// The map of `file` (`len` bytes) from its data extents (`SEEK_DATA` / `SEEK_HOLE`).
    #[cfg(test)]
    pub(crate) fn scan(file: &File, len: u64) -> io::Result<Allocated> {
        let map = Allocated::new(len);
        map.scan_extents(file, len)?;
        Ok(map)
    }

    /// Marks the data extents of the first `len` bytes of `file`.
    pub(crate) fn scan_extents(&self, file: &File, len: u64) -> io::Result<()> {
        use rustix::fs::{seek, SeekFrom};
        let map = self;
        let mut off = 0;
        while off < len {
            let data = match seek(file, SeekFrom::Data(off)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(e) => return Err(e.into()),
            };
            let hole = seek(file, SeekFrom::Hole(data))?.min(len);
            map.mark_within(data, hole - data);
            off = hole;
        }
        Ok(())
    }

    /// Whether every unit `[off, off + len)` touches holds data, asking the file (`SEEK_HOLE`)
    /// where the map does not know yet and marking what it learns: data written by others, or
    /// by writes the target did not mark.
    pub(crate) fn probe(&self, file: &File, off: u64, len: u64) -> bool {
        use rustix::fs::{seek, SeekFrom};
        if self.contains(off, len) {
            return true;
        }
        let Some((first, last)) = self.touched(off, len) else {
            return false;
        };
        if off + len > self.len {
            return false;
        }
        let start = first << self.shift;
        let end = ((last + 1) << self.shift).min(self.len);
        match seek(file, SeekFrom::Hole(start)) {
            // Data from `start` to the hole (or the end of the file): whole units of it.
            Ok(hole) if hole > start => {
                self.mark_within(start, hole.min(self.len) - start);
                hole >= end || (hole >= off + len && self.contains(off, len))
            }
            _ => false,
        }
    }

    /// Units `[first, last]` touched by `[off, off + len)`, clipped to the file; None if empty.
    fn touched(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        let end = off.checked_add(len)?.min(self.len);
        (len > 0 && off < end).then(|| (off >> self.shift, (end - 1) >> self.shift))
    }

    /// Whether every unit `[off, off + len)` touches holds data.
    pub(crate) fn contains(&self, off: u64, len: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            return false;
        }
        let Some((first, last)) = self.touched(off, len) else {
            return false;
        };
        (first..=last).all(|u| self.words[(u / 64) as usize].load(Relaxed) & (1 << (u % 64)) != 0)
    }

    /// Marks every unit `[off, off + len)` touches (after a write there: tmpfs allocates whole
    /// pages).
    pub(crate) fn insert(&self, off: u64, len: u64) {
        if let Some((first, last)) = self.touched(off, len) {
            self.update(first, last, true);
        }
    }

    /// Marks the units lying wholly inside `[off, off + len)` (data extents found by a scan;
    /// the units at the edges may hold holes).
    fn mark_within(&self, off: u64, len: u64) {
        let unit = 1u64 << self.shift;
        let first = off.div_ceil(unit);
        let end = if off + len >= self.len {
            self.len.div_ceil(unit)
        } else {
            (off + len) / unit
        };
        if first < end {
            self.update(first, end - 1, true);
        }
    }

    /// Unmarks every unit `[off, off + len)` touches (before punching a hole there).
    pub(crate) fn remove(&self, off: u64, len: u64) {
        if let Some((first, last)) = self.touched(off, len) {
            self.update(first, last, false);
        }
    }

    fn update(&self, first: u64, last: u64, set: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        for u in first..=last {
            let (w, bit) = (&self.words[(u / 64) as usize], 1u64 << (u % 64));
            if set {
                w.fetch_or(bit, Relaxed);
            } else {
                w.fetch_and(!bit, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_allocated_marks_and_queries_ranges() {
        let a = Allocated::new(1 << 20);
        assert!(!a.contains(0, 4096));
        a.insert(4096 + 512, 512);
        assert!(a.contains(4096, 4096));
        assert!(!a.contains(4096, 8192));
        a.insert(8192, 16384);
        assert!(a.contains(4096, 5 * 4096 - 4096));
        assert!(!a.contains(0, 8192));
        // Past the end, or empty: never.
        assert!(!a.contains((1 << 20) - 4096, 8192));
        assert!(!a.contains(4096, 0));
        // A discard of part of a unit unmarks the unit.
        a.remove(8192 + 100, 10);
        assert!(!a.contains(8192, 4096));
        assert!(a.contains(12288, 4096));
        // Units beyond 64 (several words).
        a.insert(70 * 4096, 150 * 4096);
        assert!(a.contains(70 * 4096, 150 * 4096));
        assert!(!a.contains(69 * 4096, 4096));
    }

    #[test]
    fn test_allocated_unit_grows_with_the_file() {
        let a = Allocated::new(1 << 40);
        assert_eq!(a.shift, 16);
        assert!(a.words.len() as u64 * 64 >= (1u64 << 40) >> 16);
        let b = Allocated::new(100);
        assert_eq!(b.shift, 12);
        b.insert(0, 100);
        assert!(b.contains(0, 100));
    }

    #[test]
    fn test_allocated_scan_finds_data_extents() {
        let dir = std::env::temp_dir().join(format!("ublk-alloc-scan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sparse");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let len = 64u64 << 20;
        f.set_len(len).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 8 << 20).unwrap();
        f.sync_all().unwrap();
        let a = Allocated::scan(&f, len).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(a.contains(8 << 20, 1 << 20));
        // File systems may report data at a coarser granularity than written, never less;
        // far from the written megabyte there are holes.
        assert!(!a.contains(0, 4096));
        assert!(!a.contains(40 << 20, 4096));
    }

    #[test]
    fn test_allocated_probe_learns_data_written_by_others() {
        let dir = std::env::temp_dir().join(format!("ublk-alloc-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(dir.join("sparse"))
            .unwrap();
        let len = 64u64 << 20;
        f.set_len(len).unwrap();
        let a = Allocated::new(len);
        f.write_all_at(&[1u8; 1 << 20], 8 << 20).unwrap();
        f.sync_all().unwrap();
        assert!(!a.contains(8 << 20, 4096));
        assert!(a.probe(&f, (8 << 20) + 512, 4096));
        // Learned: no probe needed any more.
        assert!(a.contains(8 << 20, 4096));
        assert!(!a.probe(&f, 40 << 20, 4096));
        assert!(!a.probe(&f, len - 4096, 8192));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
