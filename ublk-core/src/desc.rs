//! The per-queue io descriptor array the kernel shares with the server (`ublksrv_io_desc`).
//!
//! # Safety
//!
//! The array is mmap'd read-only from `/dev/ublkcN` and lives as long as [`DescArea`]. Entry `tag`
//! is written by the kernel before it posts the completion that hands `tag` to the server, and is
//! not rewritten until the server commits `tag`; callers read an entry only in that window.
//! Reads are volatile and bounds-checked against the mapped length.
#![allow(unsafe_code)]

use crate::os::{page_size, Mmap};
use crate::target::IoRequest;
use std::fs::File;
use std::io;
use ublk_sys as sys;

/// Size of the kernel's descriptor (without `UBLK_F_IO_DESC_SIZE`).
pub(crate) const DEFAULT_DESC_SIZE: usize = std::mem::size_of::<sys::ublksrv_io_desc>();

/// Mmap offset of queue `q`'s descriptors: the kernel reserves room for the largest queue depth.
pub(crate) fn queue_offset(q: u16, desc_size: usize) -> u64 {
    let page = page_size();
    let per_queue = (sys::UBLK_MAX_QUEUE_DEPTH as usize * desc_size).div_ceil(page) * page;
    sys::UBLKSRV_CMD_BUF_OFFSET as u64 + u64::from(q) * per_queue as u64
}

/// One queue's descriptors.
#[derive(Debug)]
pub(crate) struct DescArea {
    map: Mmap,
    desc_size: usize,
    depth: u16,
}

impl DescArea {
    pub(crate) fn map(cdev: &File, q: u16, depth: u16, desc_size: usize) -> io::Result<DescArea> {
        let page = page_size();
        let len = (usize::from(depth) * desc_size).div_ceil(page) * page;
        let map = Mmap::map_readonly(cdev, queue_offset(q, desc_size), len)?;
        Ok(DescArea {
            map,
            desc_size,
            depth,
        })
    }

    /// Decodes the descriptor of `tag` (which the kernel just handed to the server).
    pub(crate) fn request(&self, tag: u16) -> IoRequest {
        assert!(tag < self.depth, "tag {tag} out of range");
        let off = usize::from(tag) * self.desc_size;
        assert!(off + DEFAULT_DESC_SIZE <= self.map.len());
        // SAFETY: in bounds (checked above); the mapping is page aligned and desc_size is a
        // multiple of 8, so the pointer is aligned for ublksrv_io_desc; the kernel does not
        // write the entry while the server owns the tag (module contract).
        let d = unsafe {
            std::ptr::read_volatile(self.map.as_ptr().add(off).cast::<sys::ublksrv_io_desc>())
        };
        // SAFETY: both union members are plain u32; nr_sectors is the one for block requests.
        let nr_sectors = unsafe { d.__bindgen_anon_1.nr_sectors };
        IoRequest::from_raw(tag, d.op_flags, nr_sectors, d.start_sector)
    }
}
