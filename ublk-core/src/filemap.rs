//! A backing file mapped into the server, for one-copy data transfer in user-copy mode.
//!
//! With `UBLK_F_USER_COPY` the server moves request data with `pread`/`pwrite` on
//! `/dev/ublkcN`, from and to any memory it likes. When that memory is the backing file's own
//! page cache, mapped shared, the kernel copies straight between the request's pages and the
//! file's: one copy where a buffer in between takes two (the request into the buffer, the
//! buffer into the file) and one system call where it takes two. This pays on memory-backed
//! file systems (tmpfs), whose reads and writes are page-cache copies anyway.
//!
//! The mapped bytes are never reached through Rust references, only by those kernel copies
//! ([`IoCtx::copy_write_data_to`](crate::IoCtx::copy_write_data_to),
//! [`IoCtx::copy_read_data_from`](crate::IoCtx::copy_read_data_from)), so other writers of the
//! file (another queue, another process) are no concern of memory safety. A copy that touches a
//! page the file no longer has (it was truncated) or cannot get (the file system is full) fails
//! with `EFAULT` rather than raising `SIGBUS`; the caller then goes the buffered way, which
//! reports the real error.

use crate::os::Mmap;
use std::fs::File;
use std::io;

/// The first `len` bytes of a file, mapped shared (see the module documentation).
#[derive(Debug)]
pub struct FileMap {
    map: Mmap,
    writable: bool,
}

impl FileMap {
    /// Maps the first `len` bytes of `file`; `writable` needs a file open for writing.
    pub fn new(file: &File, len: u64, writable: bool) -> io::Result<FileMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        Ok(FileMap {
            map: Mmap::map_shared(file, len, writable)?,
            writable,
        })
    }

    /// The mapped length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether nothing is mapped (never: a mapping has at least one byte).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Whether `[off, off + len)` lies inside the mapping.
    pub fn covers(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.len())
    }

    /// Whether the mapping may be written.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn mmap(&self) -> &Mmap {
        &self.map
    }
}
