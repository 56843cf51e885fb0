//! Per-tag data buffers shared with the kernel (copy modes) and with the queue's io_uring.
//!
//! # Safety
//!
//! One anonymous mapping per queue, `depth` slots of `buf_size` bytes each, page aligned (so
//! O_DIRECT works). Slot `tag` may be written by the kernel (WRITE data copy, `NEED_GET_DATA`)
//! or by an io_uring operation only while the tag is in the matching state; the queue's per-tag
//! state machine (`queue.rs`) is what guarantees that a slice handed out by [`IoBufs::slice`]
//! never aliases a kernel or io_uring access to the same slot. Buffers are freed only when the
//! queue is dropped, after every command and operation that points into them has completed
//! or been cancelled by the ring's teardown.
#![allow(unsafe_code)]

use crate::os::{page_size, Mmap};
use std::io;

#[derive(Debug)]
pub(crate) struct IoBufs {
    map: Mmap,
    buf_size: usize,
    depth: u16,
}

impl IoBufs {
    pub(crate) fn new(depth: u16, buf_size: usize) -> io::Result<IoBufs> {
        let page = page_size();
        let buf_size = buf_size.div_ceil(page) * page;
        let map = Mmap::anonymous(buf_size * usize::from(depth))?;
        Ok(IoBufs {
            map,
            buf_size,
            depth,
        })
    }

    pub(crate) fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Start address of slot `tag`, for commands and io_uring operations.
    pub(crate) fn addr(&self, tag: u16) -> *mut u8 {
        assert!(tag < self.depth, "tag {tag} out of range");
        // SAFETY: tag < depth, so the offset is inside the mapping.
        unsafe { self.map.as_ptr().add(usize::from(tag) * self.buf_size) }
    }

    /// The first `len` bytes of slot `tag`.
    ///
    /// # Safety
    ///
    /// The caller owns `tag` (no kernel command or io_uring operation on the slot is in flight)
    /// and holds no other slice of the same slot for the lifetime of the result.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, tag: u16, len: usize) -> &mut [u8] {
        assert!(len <= self.buf_size, "len {len} exceeds buffer size");
        // SAFETY: in bounds (checked above and in addr); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.addr(tag), len) }
    }
}
