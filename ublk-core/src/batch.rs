//! Batch io commands (`UBLK_F_BATCH_IO`, Linux 7.0): a queue learns of new requests as arrays of
//! tags written by multishot `FETCH_IO_CMDS` commands, and returns results many at a time with one
//! `COMMIT_IO_CMDS`, instead of one `FETCH` / `COMMIT_AND_FETCH` command parked per tag.
//!
//! This module owns the memory those commands use and encodes them; the queue (`queue.rs`)
//! decides when to send them and keeps the per-tag state.
//!
//! # Safety
//!
//! * Fetch buffers: each `FETCH_IO_CMDS` selects its buffer from a provided-buffer ring of one
//!   entry registered with the queue's io_uring (buffer group = fetch index, incremental
//!   consumption). The ring page and the buffer are mappings owned by [`Batch`]; the kernel writes
//!   tags into the buffer only while a fetch command is active, and reads the ring entry only to
//!   select the buffer. A buffer is provided again only after the fetch that used it ended (its
//!   last completion came without `IORING_CQE_F_MORE`) and the kernel used all of it (the
//!   entry's length is 0); tags are read only from the bytes a completion reported as written.
//! * Element arrays of `PREP_IO_CMDS` / `COMMIT_IO_CMDS`: heap vectors held in `in_flight` from
//!   the submission until the command's completion (the kernel reads them when it issues the
//!   command, which io_uring may do later, from a worker).
//! * [`Batch`] is dropped after the queue's ring. Memory a command may still use at that point
//!   (a fetch that did not report its end, an element array whose command did not complete) is
//!   leaked rather than freed under the kernel.
#![allow(unsafe_code)]

use crate::os::{page_size, Mmap};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use ublk_sys as sys;

/// `IORING_URING_CMD_MULTISHOT` (io_uring uapi, with multishot uring_cmd): not in the io-uring
/// crate yet.
const URING_CMD_MULTISHOT: u32 = 1 << 1;
/// `IOU_PBUF_RING_INC`: the kernel uses a provided buffer a piece at a time, so one buffer takes
/// many completions' worth of tags.
const PBUF_RING_INC: u16 = 2;
/// Fetch commands per queue: one is active in the kernel; the other takes over at once when the
/// first ends (its buffer full), while the first is provided again and re-armed.
pub(crate) const FETCHES: u16 = 2;
/// Size of an element without / with its buffer address.
const ELEM: usize = 8;
const ELEM_ADDR: usize = 16;

/// One fetch command's buffer and the one-entry provided-buffer ring that offers it.
#[derive(Debug)]
struct FetchBuf {
    /// `struct io_uring_buf_ring` with one entry (page aligned, as the kernel requires).
    ring: Mmap,
    /// Where the kernel writes tags (u16 each).
    buf: Mmap,
    /// Bytes the kernel wrote since the buffer was last provided.
    off: usize,
    /// The ring's tail (entries ever provided).
    tail: u16,
    /// The command is in the kernel: it may still write into `buf`.
    active: bool,
}

/// The batch-command state of one queue.
#[derive(Debug)]
pub(crate) struct Batch {
    q_id: u16,
    depth: u16,
    fetch: Vec<FetchBuf>,
    /// Copy mode: each element carries the tag's buffer address (`UBLK_BATCH_F_HAS_BUF_ADDR`).
    with_addr: bool,
    /// Zero copy (auto buffer registration): each element names the index of the ring's buffer
    /// table where the kernel registers the tag's next request (the tag itself).
    buf_index: bool,
    /// Elements of the next `COMMIT_IO_CMDS`, and their tags.
    pending: Vec<u8>,
    pending_tags: Vec<u16>,
    /// Element arrays of completed commands, emptied, for the next ones (no allocation per
    /// batch).
    spare: Vec<Vec<u8>>,
    /// Element arrays of commands in flight, by slot (`None`: free).
    in_flight: Vec<Option<InFlight>>,
}

/// A `PREP_IO_CMDS` / `COMMIT_IO_CMDS` in flight.
#[derive(Debug)]
struct InFlight {
    elems: Vec<u8>,
    tags: Vec<u16>,
    commit: bool,
}

/// The tags of a `PREP_IO_CMDS` / `COMMIT_IO_CMDS` that completed, split by outcome.
#[derive(Debug, Default)]
pub(crate) struct CommitDone {
    /// Tags the kernel took (committed, or prepared): they are the kernel's again.
    pub(crate) accepted: Vec<u16>,
    /// Tags the kernel refused (all of a failed PREP; the element a COMMIT stopped at).
    pub(crate) refused: Vec<u16>,
    /// Elements after the one a COMMIT stopped at, which the kernel did not look at: queued
    /// again for the next commit.
    pub(crate) requeued: usize,
}

impl Batch {
    /// Sets up the fetch buffers of queue `q_id` (depth `depth`) and registers their rings with
    /// `ring` (buffer groups `0..FETCHES`). `with_addr`: copy mode (buffer addresses in
    /// elements); `buf_index`: zero copy (buffer table indexes in elements).
    pub(crate) fn new(
        ring: &IoUring,
        q_id: u16,
        depth: u16,
        with_addr: bool,
        buf_index: bool,
    ) -> io::Result<Batch> {
        let page = page_size();
        let buf_len = (usize::from(depth) * 2).div_ceil(page) * page;
        let mut fetch = Vec::new();
        for bgid in 0..FETCHES {
            let f = FetchBuf {
                ring: Mmap::anonymous(page)?,
                buf: Mmap::anonymous(buf_len)?,
                off: 0,
                tail: 0,
                active: false,
            };
            // SAFETY: the ring page is owned by the `FetchBuf`, which lives (or is leaked) at least
            // as long as the io_uring (see the module's safety contract).
            unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    f.ring.as_ptr() as u64,
                    1,
                    bgid,
                    PBUF_RING_INC,
                )?;
            }
            fetch.push(f);
        }
        Ok(Batch {
            q_id,
            depth,
            fetch,
            with_addr,
            buf_index,
            pending: Vec::new(),
            pending_tags: Vec::new(),
            spare: Vec::new(),
            in_flight: Vec::new(),
        })
    }

    fn elem_bytes(&self) -> usize {
        if self.with_addr {
            ELEM_ADDR
        } else {
            ELEM
        }
    }

    fn flags(&self) -> u16 {
        if self.with_addr {
            sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16
        } else {
            0
        }
    }

    /// Appends one element (tag, result, buffer address in copy mode) to `out`.
    fn push_elem(&self, out: &mut Vec<u8>, tag: u16, result: i32, buf_addr: u64) {
        out.extend_from_slice(&tag.to_ne_bytes());
        let index = if self.buf_index { tag } else { 0 };
        out.extend_from_slice(&index.to_ne_bytes());
        out.extend_from_slice(&result.to_ne_bytes());
        if self.with_addr {
            out.extend_from_slice(&buf_addr.to_ne_bytes());
        }
    }

    /// The `PREP_IO_CMDS` that hands every tag to the kernel (`addr(tag)`: its buffer in copy
    /// mode); the caller sets its user data from the returned slot.
    pub(crate) fn prep(&mut self, addr: impl Fn(u16) -> u64) -> (squeue::Entry, u16) {
        let mut elems = Vec::with_capacity(usize::from(self.depth) * self.elem_bytes());
        for tag in 0..self.depth {
            self.push_elem(&mut elems, tag, 0, addr(tag));
        }
        let tags = (0..self.depth).collect();
        self.cmd(sys::UBLK_U_IO_PREP_IO_CMDS, elems, tags, false)
    }

    /// Queues `tag`'s result for the next [`Batch::commit`]; the tag is the kernel's again
    /// from then on.
    pub(crate) fn push_commit(&mut self, tag: u16, result: i32, buf_addr: u64) {
        let mut pending = std::mem::take(&mut self.pending);
        self.push_elem(&mut pending, tag, result, buf_addr);
        self.pending = pending;
        self.pending_tags.push(tag);
    }

    /// The `COMMIT_IO_CMDS` of every result queued since the last one, if any; at most `depth`
    /// elements per command (the kernel's limit), the rest stays queued.
    pub(crate) fn commit(&mut self) -> Option<(squeue::Entry, u16)> {
        if self.pending_tags.is_empty() {
            return None;
        }
        let n = self.pending_tags.len().min(usize::from(self.depth));
        let (elems, tags) = if n == self.pending_tags.len() {
            let next = self.spare.pop().unwrap_or_default();
            (
                std::mem::replace(&mut self.pending, next),
                std::mem::take(&mut self.pending_tags),
            )
        } else {
            let rest = self.pending.split_off(n * self.elem_bytes());
            let rest_tags = self.pending_tags.split_off(n);
            (
                std::mem::replace(&mut self.pending, rest),
                std::mem::replace(&mut self.pending_tags, rest_tags),
            )
        };
        Some(self.cmd(sys::UBLK_U_IO_COMMIT_IO_CMDS, elems, tags, true))
    }

    fn cmd(
        &mut self,
        op: u32,
        elems: Vec<u8>,
        tags: Vec<u16>,
        commit: bool,
    ) -> (squeue::Entry, u16) {
        let nr = tags.len() as u16;
        let addr = elems.as_ptr() as u64;
        let slot = match self.in_flight.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.in_flight.push(None);
                self.in_flight.len() - 1
            }
        };
        self.in_flight[slot] = Some(InFlight {
            elems,
            tags,
            commit,
        });
        let sqe = opcode::UringCmd16::new(types::Fixed(0), op)
            .cmd(self.header(nr, self.elem_bytes() as u8, self.flags()))
            .addr(Some(addr))
            .build();
        (sqe, slot as u16)
    }

    /// `struct ublk_batch_io`.
    fn header(&self, nr_elem: u16, elem_bytes: u8, flags: u16) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        raw[2..4].copy_from_slice(&flags.to_ne_bytes());
        raw[4..6].copy_from_slice(&nr_elem.to_ne_bytes());
        raw[6] = elem_bytes;
        raw
    }

    /// The command in `slot` completed with `res`. PREP_IO_CMDS: 0, or -errno for all (it is
    /// all or nothing). COMMIT_IO_CMDS: the bytes of elements processed, or -errno when the
    /// first element failed; the kernel stops at the first element it refuses and does not look
    /// at the rest, which go back in the queue for the next commit.
    pub(crate) fn cmd_done(&mut self, slot: u16, res: i32) -> Option<CommitDone> {
        let InFlight {
            mut elems,
            mut tags,
            commit,
        } = self.in_flight.get_mut(usize::from(slot))?.take()?;
        let mut done = CommitDone::default();
        if !commit {
            if res < 0 {
                done.refused = tags;
            } else {
                done.accepted = tags;
            }
            return Some(done);
        }
        let ok = if res < 0 {
            0
        } else {
            (res as usize / self.elem_bytes()).min(tags.len())
        };
        if ok < tags.len() {
            let rest = tags.split_off(ok + 1);
            done.refused.push(tags[ok]);
            done.requeued = rest.len();
            self.pending
                .extend_from_slice(&elems[(ok + 1) * self.elem_bytes()..]);
            self.pending_tags.extend(rest);
        }
        tags.truncate(ok);
        done.accepted = tags;
        elems.clear();
        self.spare.push(elems);
        Some(done)
    }

    /// Returns fetch `i`'s multishot `FETCH_IO_CMDS`, first providing its buffer anew if the
    /// kernel used all of it.
    pub(crate) fn fetch(&mut self, i: u16) -> squeue::Entry {
        let f = &mut self.fetch[usize::from(i)];
        let entry = f.ring.as_ptr().cast::<sys_buf::IoUringBuf>();
        // SAFETY: the fetch is not active (its previous command ended), so the kernel neither
        // reads nor writes this ring entry, nor writes the buffer, until the command below is
        // submitted; the entry is inside the ring page. With incremental consumption the
        // kernel advances the entry's address and length as it fills the buffer and moves the
        // ring's head past it once the length reaches 0: only then may a new entry go in (the
        // ring has one slot), else the command continues in the rest of the buffer (a fetch
        // can also end before its buffer is full, e.g. when a completion could not be posted).
        // The tail is published with release ordering after the entry is written.
        unsafe {
            let left = std::ptr::addr_of!((*entry).len).read_volatile();
            if f.tail == 0 || left == 0 {
                entry.write(sys_buf::IoUringBuf {
                    addr: f.buf.as_ptr() as u64,
                    len: f.buf.len() as u32,
                    bid: 0,
                    tail: f.tail,
                });
                f.tail = f.tail.wrapping_add(1);
                let tail = &*(f.ring.as_ptr().add(14).cast::<AtomicU16>());
                tail.store(f.tail, Ordering::Release);
                f.off = 0;
            }
        }
        f.active = true;
        let nr = (f.buf.len() / 2) as u16;
        let sqe = opcode::UringCmd16::new(types::Fixed(0), sys::UBLK_U_IO_FETCH_IO_CMDS)
            .cmd(self.header(nr, 2, 0))
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        // The crate cannot set a uring_cmd's multishot flag or buffer group: patch the SQE.
        // SAFETY: `squeue::Entry` is `#[repr(C)]` around `struct io_uring_sqe` (64 bytes, plain
        // integers only), so it and a 64-byte array convert both ways.
        let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        let flags = u32::from_ne_bytes(raw[28..32].try_into().unwrap()) | URING_CMD_MULTISHOT;
        raw[28..32].copy_from_slice(&flags.to_ne_bytes());
        raw[40..42].copy_from_slice(&i.to_ne_bytes());
        // SAFETY: as above.
        unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
    }

    /// A completion of fetch `i`: appends the tags it delivered to `tags`; returns whether the
    /// command ended (no `IORING_CQE_F_MORE`), so that it must be sent again.
    pub(crate) fn fetched(&mut self, i: u16, res: i32, more: bool, tags: &mut Vec<u16>) -> bool {
        let Some(f) = self.fetch.get_mut(usize::from(i)) else {
            return false;
        };
        if res > 0 {
            let n = (res as usize).min(f.buf.len() - f.off);
            // SAFETY: the kernel reported `n` bytes written after `off`, inside the buffer; it
            // does not write them again before the buffer is provided anew.
            let bytes = unsafe { std::slice::from_raw_parts(f.buf.as_ptr().add(f.off), n) };
            tags.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_ne_bytes([c[0], c[1]])),
            );
            f.off += n;
        }
        if !more {
            f.active = false;
        }
        !more
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // See the module's safety contract: never free what the kernel may still use.
        for f in std::mem::take(&mut self.fetch) {
            if f.active {
                std::mem::forget(f);
            }
        }
        for v in std::mem::take(&mut self.in_flight).into_iter().flatten() {
            std::mem::forget(v);
        }
    }
}

/// `struct io_uring_buf` (the ring's first entry; its last field doubles as the ring's tail).
mod sys_buf {
    #[repr(C)]
    pub(super) struct IoUringBuf {
        pub(super) addr: u64,
        pub(super) len: u32,
        pub(super) bid: u16,
        pub(super) tail: u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_elements_and_partial_commits() {
        // The encoding needs no kernel: a batch without fetch buffers.
        let mut b = Batch {
            q_id: 3,
            depth: 4,
            fetch: Vec::new(),
            with_addr: true,
            buf_index: false,
            pending: Vec::new(),
            pending_tags: Vec::new(),
            spare: Vec::new(),
            in_flight: Vec::new(),
        };
        let (prep, slot) = b.prep(|tag| 0x1000 * u64::from(tag + 1));
        // SAFETY: reading the plain bytes of a built SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(prep) };
        assert_eq!(raw[0], opcode::UringCmd16::CODE);
        assert_eq!(&raw[48..50], &3u16.to_ne_bytes(), "q_id");
        assert_eq!(&raw[50..52], &2u16.to_ne_bytes(), "flags: HAS_BUF_ADDR");
        assert_eq!(&raw[52..54], &4u16.to_ne_bytes(), "nr_elem");
        assert_eq!(raw[54], 16, "elem_bytes");
        let InFlight { elems, tags, .. } = b.in_flight[usize::from(slot)].as_ref().unwrap();
        assert_eq!(
            u64::from_ne_bytes(raw[16..24].try_into().unwrap()),
            elems.as_ptr() as u64
        );
        assert_eq!(tags, &[0, 1, 2, 3]);
        assert_eq!(&elems[56..64], &0x4000u64.to_ne_bytes());
        assert_eq!(b.cmd_done(slot, 0).unwrap().accepted, vec![0, 1, 2, 3]);
        assert!(b.commit().is_none());
        b.push_commit(2, 4096, 0x1000);
        b.push_commit(0, -5, 0x2000);
        let (_, slot) = b.commit().unwrap();
        let InFlight { elems, tags, .. } = b.in_flight[usize::from(slot)].as_ref().unwrap();
        assert_eq!(tags, &[2, 0]);
        assert_eq!(elems.len(), 32);
        assert_eq!(&elems[0..2], &2u16.to_ne_bytes());
        assert_eq!(&elems[4..8], &4096i32.to_ne_bytes());
        assert_eq!(&elems[8..16], &0x1000u64.to_ne_bytes());
        assert_eq!(&elems[20..24], &(-5i32).to_ne_bytes());
        // The kernel processed one element of two and refused the second.
        let done = b.cmd_done(slot, 16).unwrap();
        assert_eq!(done.accepted, vec![2]);
        assert_eq!(done.refused, vec![0]);
        assert_eq!(done.requeued, 0);
        // Its element array is kept for a later commit.
        assert_eq!(b.spare.len(), 1);
        assert!(b.cmd_done(slot, 16).is_none(), "a slot completes once");
        assert!(b.commit().is_none());
        // At most `depth` elements per command.
        for t in 0..6 {
            b.push_commit(t % 4, 100 + i32::from(t), 0);
        }
        let (_, s1) = b.commit().unwrap();
        let (_, s2) = b.commit().unwrap();
        assert!(b.commit().is_none());
        assert_eq!(b.cmd_done(s2, 32).unwrap().accepted, vec![0, 1]);
        // The first element failed: the kernel never looked at the other three, which go back
        // in the queue with their results.
        let done = b.cmd_done(s1, -16).unwrap();
        assert_eq!((done.accepted.len(), &done.refused[..]), (0, &[0][..]));
        assert_eq!(done.requeued, 3);
        let (_, s3) = b.commit().unwrap();
        let InFlight {
            elems,
            tags,
            commit,
        } = b.in_flight[usize::from(s3)].as_ref().unwrap();
        assert!(commit);
        assert_eq!(tags, &[1, 2, 3]);
        assert_eq!(&elems[4..8], &101i32.to_ne_bytes());
        assert_eq!(&elems[36..40], &103i32.to_ne_bytes());
        // A failed PREP refuses everything.
        let (_, p) = b.prep(|_| 1);
        assert_eq!(b.cmd_done(p, -22).unwrap().refused.len(), 4);
    }

    #[test]
    fn test_fetch_command_and_tags() {
        let page = page_size();
        let mut b = Batch {
            q_id: 1,
            depth: 64,
            fetch: (0..FETCHES)
                .map(|_| FetchBuf {
                    ring: Mmap::anonymous(page).unwrap(),
                    buf: Mmap::anonymous(page).unwrap(),
                    off: 0,
                    tail: 0,
                    active: false,
                })
                .collect(),
            with_addr: false,
            buf_index: true,
            pending: Vec::new(),
            pending_tags: Vec::new(),
            spare: Vec::new(),
            in_flight: Vec::new(),
        };
        // Zero copy: each element names the buffer table index of its tag.
        b.push_commit(5, 4096, 0);
        assert_eq!(&b.pending[0..4], &[5, 0, 5, 0]);
        assert_eq!(b.pending.len(), 8);
        let sqe = b.fetch(1);
        // SAFETY: reading the plain bytes of a built SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        let flags = squeue::Flags::from_bits_truncate(raw[1]);
        assert!(flags.contains(squeue::Flags::BUFFER_SELECT | squeue::Flags::FIXED_FILE));
        assert_eq!(&raw[28..32], &URING_CMD_MULTISHOT.to_ne_bytes());
        assert_eq!(&raw[40..42], &1u16.to_ne_bytes(), "buffer group");
        assert_eq!(&raw[48..50], &1u16.to_ne_bytes(), "q_id");
        assert_eq!(raw[54], 2, "elem_bytes");
        // The ring's one entry offers the whole buffer; the tail (at byte 14) moved to 1.
        let f = &b.fetch[1];
        // SAFETY: the test owns the mappings; no kernel uses them.
        let ring = unsafe { std::slice::from_raw_parts(f.ring.as_ptr(), 16) };
        assert_eq!(&ring[0..8], &(f.buf.as_ptr() as u64).to_ne_bytes());
        assert_eq!(&ring[8..12], &(page as u32).to_ne_bytes());
        assert_eq!(&ring[14..16], &1u16.to_ne_bytes());
        // "The kernel" writes tags 7, 9 and 3 in two completions.
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts_mut(f.buf.as_ptr(), 6) };
        for (i, t) in [7u16, 9, 3].iter().enumerate() {
            buf[2 * i..2 * i + 2].copy_from_slice(&t.to_ne_bytes());
        }
        let mut tags = Vec::new();
        assert!(!b.fetched(1, 4, true, &mut tags));
        assert!(!b.fetched(1, 2, true, &mut tags));
        assert_eq!(tags, vec![7, 9, 3]);
        // The buffer ran out: the command ends and is provided again from its start.
        assert!(b.fetched(1, -libc::ENOBUFS, false, &mut tags));
        assert!(!b.fetch[1].active);
        // "The kernel" used all of the buffer (length 0 in the entry): provided anew.
        // SAFETY: as above.
        unsafe { b.fetch[1].ring.as_ptr().add(8).cast::<u32>().write(0) };
        let _ = b.fetch(1);
        assert_eq!(b.fetch[1].off, 0);
        assert_eq!(b.fetch[1].tail, 2);
        assert!(b.fetch[1].active);
        // A fetch that ended with room left keeps its buffer and place in it.
        tags.clear();
        assert!(!b.fetched(1, 4, true, &mut tags));
        assert!(b.fetched(1, -libc::ENOBUFS, false, &mut tags));
        let _ = b.fetch(1);
        assert_eq!((b.fetch[1].off, b.fetch[1].tail), (4, 2));
        // Dropping a batch whose fetch is active leaks the buffer instead of unmapping it.
    }
}
