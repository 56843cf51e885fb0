//! Files on memory-backed file systems (tmpfs, ramfs).
//!
//! There a read or write is a memory copy that never waits for a device, yet io_uring cannot
//! do it without blocking and hands every such operation to one of its worker threads: a
//! thread switch and two wake-ups per request for a copy of a few microseconds. Targets do
//! these transfers inline on the queue thread instead.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
