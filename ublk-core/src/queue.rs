//! One queue: its io_uring, its tags' state machines, and the loop that serves them.
//!
//! Per tag: `Fetching` (a FETCH or COMMIT_AND_FETCH command is parked in the kernel) → the
//! kernel hands over a request → (`GettingData`: a `NEED_GET_DATA` command brings WRITE data)
//! → `InTarget` (the target works on it, possibly with io_uring operations of its own) →
//! COMMIT_AND_FETCH → `Fetching` again. `UBLK_IO_RES_ABORT` moves a tag to `Dead`; the loop
//! ends when every tag is dead and no operation points into a buffer any more.
//!
//! With batch io commands (`UBLK_F_BATCH_IO`, [`crate::batch`]) no command is parked per tag:
//! `Fetching` then means "the kernel's", requests arrive as arrays of tags from a multishot
//! fetch, and the commits of a whole batch of completions go back in one command, sent before
//! the loop next waits. When the fetches end with an error (the device is going away), every
//! tag the kernel holds, and every tag committed from then on, is dead.
//!
//! # Safety
//!
//! Every SQE pushed here points either at nothing or at the tag's own buffer slot in
//! [`IoBufs`] (or at `event_buf`, owned by the queue), or at memory the target lent for an
//! operation of its own (a receive buffer; a send's bytes, iovec array and message header; a
//! timer's timespec), which `OwnOps` holds until the completion and leaks rather than frees if
//! the queue goes away first. Batch io commands point at memory their `Batch` owns (fetch
//! buffers and rings, element arrays; contract in `batch.rs`), and their elements name tag slots
//! handed to the kernel with the tag, as a FETCH does. A send's ranges of request buffers count
//! as operations of those tags, like the tag's own reads and writes. In zero-copy mode the target's reads and
//! writes address instead the fixed buffer the kernel registered for the tag (index = tag,
//! offsets from 0, bounds checked against the request), which the kernel keeps alive until the
//! tag's COMMIT, sent only once no operation is in flight. A slot is only handed to the kernel or
//! to an io_uring operation while the tag's state says so, and a slice of it is only given to
//! the target while the tag is `InTarget` with no operation in flight, or for the bounds of an
//! operation the target itself requested. The ring is dropped (cancelling what is left) before
//! the buffers.
#![allow(unsafe_code)]

use crate::batch::{Batch, CommitDone, FETCHES};
use crate::buf::IoBufs;
use crate::desc::DescArea;
use crate::filemap::FileMap;
use crate::flags::DeviceFlags;
use crate::tags::{Cmd, CmdOutcome, Finish, Tags};
use crate::target::{Action, Op, QueueHandler, Target};
use crossbeam_channel::{Receiver, Sender};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_sys as sys;

/// How request data moves between the kernel and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataMode {
    /// The kernel copies data to/from per-tag buffers registered with each command.
    #[default]
    Copy,
    /// Like `Copy`, but WRITE data is fetched on demand (`UBLK_F_NEED_GET_DATA`).
    NeedGetData,
    /// The server copies with pread/pwrite on `/dev/ublkcN` (`UBLK_F_USER_COPY`, Linux 6.5).
    UserCopy,
    /// No copy at all: the kernel registers each request's pages in the queue's io_uring buffer
    /// table (index = tag) before handing the request over, and the target's io_uring reads,
    /// writes and socket receives use them as fixed buffers (`UBLK_F_AUTO_BUF_REG`, Linux
    /// 6.16). The server does not see the data: [`IoCtx::buf`] is empty. User copy comes with
    /// it (`UBLK_F_USER_COPY`), so a target can still move bytes of its own with
    /// [`IoCtx::copy_read_data`] and [`IoCtx::copy_write_data`] (or bring WRITE data into the
    /// buffer with [`IoCtx::fetch_write_data`]). Only targets that say so use it
    /// ([`Target::zero_copy`]).
    ZeroCopy,
}

impl DataMode {
    /// The device flag the mode needs.
    pub fn flag(self) -> DeviceFlags {
        match self {
            DataMode::Copy => DeviceFlags::empty(),
            DataMode::NeedGetData => DeviceFlags::NEED_GET_DATA,
            DataMode::UserCopy => DeviceFlags::USER_COPY,
            DataMode::ZeroCopy => DeviceFlags::AUTO_BUF_REG.union(DeviceFlags::USER_COPY),
        }
    }

    /// The mode a device with these (negotiated) flags uses.
    pub fn from_flags(flags: DeviceFlags) -> DataMode {
        if flags.contains(DeviceFlags::AUTO_BUF_REG) {
            DataMode::ZeroCopy
        } else if flags.contains(DeviceFlags::USER_COPY) {
            DataMode::UserCopy
        } else if flags.contains(DeviceFlags::NEED_GET_DATA) {
            DataMode::NeedGetData
        } else {
            DataMode::Copy
        }
    }

    /// Short name (`copy`, `get_data`, `user_copy`, `zero_copy`).
    pub fn name(self) -> &'static str {
        match self {
            DataMode::Copy => "copy",
            DataMode::NeedGetData => "get_data",
            DataMode::UserCopy => "user_copy",
            DataMode::ZeroCopy => "zero_copy",
        }
    }
}

/// Errors of a queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// Setting up the queue's io_uring failed.
    #[error("failed to set up the io_uring of queue {0}")]
    Ring(u16, #[source] io::Error),
    /// Mapping the descriptors or allocating buffers failed.
    #[error("failed to map the descriptors or buffers of queue {0}")]
    Memory(u16, #[source] io::Error),
    /// The target could not open the queue.
    #[error("the target failed to open queue {0}")]
    Target(u16, #[source] io::Error),
    /// Submitting or waiting on the ring failed.
    #[error("io_uring submission failed on queue {0}")]
    Submit(u16, #[source] io::Error),
    /// The kernel refused a tag's FETCH command.
    #[error("the kernel refused FETCH for queue {0} tag {1}")]
    Fetch(u16, u16, #[source] io::Error),
    /// The kernel refused the queue's PREP_IO_CMDS or FETCH_IO_CMDS (batch io commands).
    #[error("the kernel refused the batch io commands of queue {0}")]
    Batch(u16, #[source] io::Error),
}

// user_data layout: bits 0-15 tag, 16-23 kind, 32-63 target data.
const KIND_CMD: u64 = 1;
const KIND_GET_DATA: u64 = 2;
const KIND_TARGET: u64 = 3;
const KIND_EVENT: u64 = 4;
/// A target operation of its own, not tied to a request: tag bits = index in `OwnOps`.
const KIND_OWN: u64 = 5;
/// A PREP_IO_CMDS / COMMIT_IO_CMDS: tag bits = its slot in `Batch`.
const KIND_BATCH: u64 = 6;
/// A multishot FETCH_IO_CMDS: tag bits = which of the queue's fetches.
const KIND_FETCH: u64 = 7;
const CDEV: types::Fixed = types::Fixed(0);
/// `IORING_RECVSEND_FIXED_BUF` (in the SQE's `ioprio`): a receive into a fixed buffer.
const IORING_RECVSEND_FIXED_BUF: u16 = 1 << 2;

fn user_data(kind: u64, tag: u16, data: u32) -> u64 {
    (u64::from(data) << 32) | (kind << 16) | u64::from(tag)
}

/// Sends completions to a queue from any thread (for targets that finish requests elsewhere).
#[derive(Debug, Clone)]
pub struct Completer {
    tx: Sender<(u16, i32)>,
    wake: QueueWaker,
}

impl Completer {
    /// Completes `tag` with `res` (bytes or negative errno). Must be called exactly once for a
    /// request the handler left `Pending` without an io_uring operation of its own.
    pub fn complete(&self, tag: u16, res: i32) {
        if self.tx.send((tag, res)).is_ok() {
            self.wake.wake();
        }
    }
}

/// What a queue thread needs to know about its device.
#[derive(Debug, Clone)]
pub(crate) struct QueueConfig {
    pub(crate) q_id: u16,
    pub(crate) depth: u16,
    pub(crate) buf_size: usize,
    pub(crate) desc_size: usize,
    pub(crate) mode: DataMode,
    /// Batch io commands (`UBLK_F_BATCH_IO`) instead of one command per tag.
    pub(crate) batch: bool,
    pub(crate) cdev: Arc<File>,
    /// Wakes the queue: cross-thread completions, or a forced quit.
    pub(crate) wake: QueueWaker,
    /// How long the queue thread polls for work before it sleeps (zero: never).
    pub(crate) poll: Duration,
}

/// Wakes a queue thread from another thread; [`QueueWaker::quit`] makes it exit at once,
/// abandoning its tags (closing its ring cancels the commands parked in the kernel). Used when
/// the kernel will not abort the tags itself, e.g. when setup fails before START_DEV.
#[derive(Debug, Clone)]
pub(crate) struct QueueWaker {
    event: Arc<File>,
    quit: Arc<std::sync::atomic::AtomicBool>,
}

impl QueueWaker {
    pub(crate) fn new() -> io::Result<QueueWaker> {
        Ok(QueueWaker {
            event: Arc::new(crate::os::eventfd()?),
            quit: Arc::default(),
        })
    }

    fn wake(&self) {
        let _ = (&*self.event).write(&1u64.to_ne_bytes());
    }

    pub(crate) fn quit(&self) {
        self.quit.store(true, std::sync::atomic::Ordering::Release);
        self.wake();
    }

    fn quitting(&self) -> bool {
        self.quit.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The target's view of its queue while handling a request.
pub struct IoCtx<'a> {
    ring: &'a mut IoUring,
    bufs: &'a IoBufs,
    tags: &'a mut Tags,
    q_id: u16,
    mode: DataMode,
    completer: &'a Completer,
    own: &'a mut OwnOps,
    done: &'a mut Vec<(u16, i32)>,
    cdev: &'a File,
    paths: &'a mut [DataPath],
}

/// In user-copy mode, how a request's data moves between the request and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataPath {
    /// Through the tag's buffer: the queue copies WRITE data in before the handler sees the
    /// request and READ data out at the commit.
    Buffer,
    /// The handler moves it itself ([`QueueHandler::moves_data`]); READ data not yet delivered.
    Handler,
    /// The handler delivered the READ data: nothing to copy at the commit.
    Delivered,
    /// Zero copy: the data stays in the request's pages, where only fixed-buffer operations
    /// and the handler's own user copies reach it.
    Kernel,
}

impl std::fmt::Debug for IoCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx")
            .field("q_id", &self.q_id)
            .finish_non_exhaustive()
    }
}

impl IoCtx<'_> {
    /// This queue's id.
    pub fn queue_id(&self) -> u16 {
        self.q_id
    }

    /// Whether requests' data stays in the kernel ([`DataMode::ZeroCopy`]): then
    /// [`IoCtx::buf`] is empty and data moves only with [`IoCtx::read_at`] / [`IoCtx::write_at`].
    pub fn zero_copy(&self) -> bool {
        self.mode == DataMode::ZeroCopy
    }

    /// A handle to complete requests of this queue from another thread.
    pub fn completer(&self) -> Completer {
        self.completer.clone()
    }

    /// The data buffer of request `tag` (`req.len` bytes): WRITE data to consume, or room for
    /// READ data. Empty if the tag is not with the target or has operations in flight, and in
    /// zero-copy mode, except for a WRITE whose data [`IoCtx::fetch_write_data`] brought in.
    pub fn buf(&mut self, tag: u16) -> &mut [u8] {
        if !self.tags.owned_by_target(tag, true) || !self.buffered(tag) {
            return &mut [];
        }
        if let Some(p) = self.paths.get_mut(usize::from(tag)) {
            if self.mode != DataMode::ZeroCopy
                && self.tags.req(tag).is_some_and(|r| r.op == Op::Read)
            {
                // A READ filled in the buffer is committed from it, whatever was delivered.
                *p = DataPath::Buffer;
            }
        }
        let len = self
            .tags
            .req(tag)
            .map_or(0, |r| r.len as usize)
            .min(self.bufs.buf_size());
        // SAFETY: the tag is with the target and no operation uses its slot (checked above);
        // the returned borrow ties up `self`, so no second slice or new operation can be made
        // while it lives.
        unsafe { self.bufs.slice(tag, len) }
    }

    /// Whether `tag`'s data is in (or goes through) its buffer: always, except in zero-copy
    /// mode, where only a WRITE's data brought in by [`IoCtx::fetch_write_data`] is.
    fn buffered(&self, tag: u16) -> bool {
        self.mode != DataMode::ZeroCopy
            || self.paths.get(usize::from(tag)) == Some(&DataPath::Buffer)
    }

    /// The data mode of the device.
    pub fn mode(&self) -> DataMode {
        self.mode
    }

    /// Whether the handler moves the data of `tag`'s request itself: it said so in
    /// [`QueueHandler::moves_data`] and has not fallen back to the buffer since
    /// ([`IoCtx::fetch_write_data`], [`IoCtx::buf`] on a READ).
    pub fn handler_moves(&self, tag: u16) -> bool {
        matches!(
            self.paths.get(usize::from(tag)),
            Some(DataPath::Handler | DataPath::Delivered)
        )
    }

    /// The request of `tag` if the handler moves its data itself (see
    /// [`QueueHandler::moves_data`]; always in zero-copy mode) and may now: user copy, with
    /// the target, idle, and `[req_off, req_off + len)` inside the request.
    fn moving(&self, tag: u16, op: Op, req_off: u32, len: usize) -> io::Result<()> {
        let req = match self.tags.req(tag) {
            Some(r) if self.tags.owned_by_target(tag, true) => *r,
            _ => {
                return Err(einval(
                    "tag is not owned by the target or has operations in flight",
                ))
            }
        };
        if !matches!(self.mode, DataMode::UserCopy | DataMode::ZeroCopy) || req.op != op {
            return Err(einval("not a user-copy request of that operation"));
        }
        let kernel = self.paths.get(usize::from(tag)) == Some(&DataPath::Kernel);
        if !kernel && !self.handler_moves(tag) {
            return Err(einval("the handler does not move this request's data"));
        }
        if u64::from(req_off) + len as u64 > u64::from(req.len) {
            return Err(einval("range outside the request"));
        }
        Ok(())
    }

    /// User copy, for a WRITE whose data the handler moves ([`QueueHandler::moves_data`]):
    /// the kernel copies `len` bytes of it from `req_off` straight into `map` at `map_off`. On
    /// an error part of it may have been copied; [`IoCtx::fetch_write_data`] then brings the
    /// data into the buffer instead.
    pub fn copy_write_data_to(
        &mut self,
        tag: u16,
        req_off: u32,
        map: &FileMap,
        map_off: u64,
        len: u32,
    ) -> io::Result<()> {
        if !map.is_writable() {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.map_copy(tag, Op::Write, req_off, map, map_off, len)
    }

    /// User copy, for a READ whose data the handler moves ([`QueueHandler::moves_data`]):
    /// the kernel copies `len` bytes of `map` at `map_off` straight into the request at
    /// `req_off`. The handler delivers all of the request this way (with
    /// [`IoCtx::copy_read_data`] for bytes of its own), and the commit copies nothing; or it
    /// falls back to [`IoCtx::buf`], which is then committed whole.
    pub fn copy_read_data_from(
        &mut self,
        tag: u16,
        req_off: u32,
        map: &FileMap,
        map_off: u64,
        len: u32,
    ) -> io::Result<()> {
        self.map_copy(tag, Op::Read, req_off, map, map_off, len)?;
        self.paths[usize::from(tag)] = DataPath::Delivered;
        Ok(())
    }

    /// The kernel copies `len` bytes between `tag`'s `op` request at `req_off` and `map` at
    /// `map_off`: a WRITE's data into the mapping, a READ's from it.
    fn map_copy(
        &mut self,
        tag: u16,
        op: Op,
        req_off: u32,
        map: &FileMap,
        map_off: u64,
        len: u32,
    ) -> io::Result<()> {
        self.moving(tag, op, req_off, len as usize)?;
        let (map_off, n) = map_span(map, map_off, len)?;
        let pos = user_copy_offset(self.q_id, tag) + u64::from(req_off);
        let dir = match op {
            Op::Write => crate::os::MapDir::FromFd,
            _ => crate::os::MapDir::ToFd,
        };
        copy_all(n, |done, left| {
            crate::os::map_io(
                self.cdev,
                dir,
                map.mmap(),
                map_off + done,
                left,
                pos + done as u64,
            )
        })
    }

    /// Like [`IoCtx::copy_read_data_from`], from bytes of the handler's own (zeros, data it
    /// decoded).
    pub fn copy_read_data(&mut self, tag: u16, req_off: u32, data: &[u8]) -> io::Result<()> {
        self.moving(tag, Op::Read, req_off, data.len())?;
        self.cdev
            .write_all_at(data, user_copy_offset(self.q_id, tag) + u64::from(req_off))?;
        self.paths[usize::from(tag)] = DataPath::Delivered;
        Ok(())
    }

    /// Like [`IoCtx::copy_write_data_to`], into bytes of the handler's own: the kernel copies
    /// `dst.len()` bytes of the WRITE's data from `req_off` into `dst`.
    pub fn copy_write_data(&mut self, tag: u16, req_off: u32, dst: &mut [u8]) -> io::Result<()> {
        self.moving(tag, Op::Write, req_off, dst.len())?;
        self.cdev
            .read_exact_at(dst, user_copy_offset(self.q_id, tag) + u64::from(req_off))
    }

    /// User copy, for a WRITE whose data the handler moves ([`QueueHandler::moves_data`], or
    /// zero-copy mode): copies it into the tag's buffer, for [`IoCtx::buf`] and
    /// [`IoCtx::send`] (in user-copy mode, a fallback).
    pub fn fetch_write_data(&mut self, tag: u16) -> io::Result<()> {
        let len = self.tags.req(tag).map_or(0, |r| r.len as usize);
        self.moving(tag, Op::Write, 0, len)?;
        // SAFETY: the tag is with the target and idle (checked by `moving`); the slice is
        // dropped before this returns.
        let buf = unsafe { self.bufs.slice(tag, len) };
        self.cdev
            .read_exact_at(buf, user_copy_offset(self.q_id, tag))?;
        self.paths[usize::from(tag)] = DataPath::Buffer;
        Ok(())
    }

    fn check_range(&self, tag: u16, buf_off: u32, len: u32) -> io::Result<*mut u8> {
        if !self.tags.owned_by_target(tag, false) {
            return Err(einval("tag is not owned by the target"));
        }
        let req_len = self.tags.req(tag).map_or(0, |r| u64::from(r.len));
        let end = u64::from(buf_off) + u64::from(len);
        if end > req_len || end > self.bufs.buf_size() as u64 {
            return Err(einval("range outside the request buffer"));
        }
        if self.mode == DataMode::ZeroCopy {
            // A fixed buffer registered by the kernel is addressed from 0.
            return Ok(std::ptr::null_mut::<u8>().wrapping_add(buf_off as usize));
        }
        // SAFETY: in bounds of the slot (checked above).
        Ok(unsafe { self.bufs.addr(tag).add(buf_off as usize) })
    }

    /// Like `check_range`, for an address in the tag's own buffer slot, whatever the mode
    /// (in zero-copy mode only once [`IoCtx::fetch_write_data`] filled it).
    fn slot_range(&self, tag: u16, buf_off: u32, len: u32) -> io::Result<*mut u8> {
        if !self.buffered(tag) {
            return Err(einval(
                "the request's data is not in its buffer (zero copy)",
            ));
        }
        if self.mode == DataMode::ZeroCopy {
            self.check_range(tag, buf_off, len)?;
            // SAFETY: in bounds of the slot (checked above).
            return Ok(unsafe { self.bufs.addr(tag).add(buf_off as usize) });
        }
        self.check_range(tag, buf_off, len)
    }

    fn push(&mut self, tag: u16, data: u32, sqe: squeue::Entry) -> io::Result<()> {
        let sqe = sqe.user_data(user_data(KIND_TARGET, tag, data));
        // SAFETY: the entry points into the tag's own slot (range-checked by the caller) or at
        // nothing; the tag stays InTarget with ops > 0 until the completion, so the slot is
        // neither reused nor freed meanwhile.
        push_sqe(self.ring, &sqe)?;
        self.tags.op_submitted(tag);
        Ok(())
    }

    /// Reads `len` bytes at `file_off` of `fd` into the request buffer at `buf_off`.
    /// Completion arrives in [`QueueHandler::on_complete`] with `data`.
    pub fn read_at(
        &mut self,
        tag: u16,
        fd: BorrowedFd<'_>,
        file_off: u64,
        buf_off: u32,
        len: u32,
        data: u32,
    ) -> io::Result<()> {
        let p = self.check_range(tag, buf_off, len)?;
        let fd = types::Fd(fd.as_raw_fd());
        let sqe = if self.mode == DataMode::ZeroCopy {
            opcode::ReadFixed::new(fd, p, len, tag)
                .offset(file_off)
                .build()
        } else {
            opcode::Read::new(fd, p, len).offset(file_off).build()
        };
        self.push(tag, data, sqe)
    }

    /// Writes `len` bytes of the request buffer at `buf_off` to `fd` at `file_off`; `fua`
    /// makes the write durable before it completes (RWF_DSYNC).
    #[allow(clippy::too_many_arguments)]
    pub fn write_at(
        &mut self,
        tag: u16,
        fd: BorrowedFd<'_>,
        file_off: u64,
        buf_off: u32,
        len: u32,
        fua: bool,
        data: u32,
    ) -> io::Result<()> {
        let p = self.check_range(tag, buf_off, len)?;
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let fd = types::Fd(fd.as_raw_fd());
        let sqe = if self.mode == DataMode::ZeroCopy {
            opcode::WriteFixed::new(fd, p, len, tag)
                .offset(file_off)
                .rw_flags(flags)
                .build()
        } else {
            opcode::Write::new(fd, p, len)
                .offset(file_off)
                .rw_flags(flags)
                .build()
        };
        self.push(tag, data, sqe)
    }

    /// `fdatasync` (or `fsync`) of `fd`.
    pub fn fsync(
        &mut self,
        tag: u16,
        fd: BorrowedFd<'_>,
        datasync: bool,
        data: u32,
    ) -> io::Result<()> {
        self.check_range(tag, 0, 0)?;
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let sqe = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(flags)
            .build();
        self.push(tag, data, sqe)
    }

    /// `fallocate(fd, mode, off, len)`.
    pub fn fallocate(
        &mut self,
        tag: u16,
        fd: BorrowedFd<'_>,
        mode: i32,
        off: u64,
        len: u64,
        data: u32,
    ) -> io::Result<()> {
        self.check_range(tag, 0, 0)?;
        let sqe = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
            .offset(off)
            .mode(mode)
            .build();
        self.push(tag, data, sqe)
    }

    /// Completes request `tag` with `res` (bytes or negative errno), for a request the handler
    /// left `Pending` and finishes from another callback (e.g. [`QueueHandler::on_event`]).
    /// The commit waits for operations still pointing into the tag's buffer.
    pub fn complete(&mut self, tag: u16, res: i32) {
        self.done.push((tag, res));
    }

    /// Receives exactly `len` bytes (`MSG_WAITALL`) from socket `fd` into request `tag`'s
    /// buffer at `buf_off`; the completion arrives in [`QueueHandler::on_complete`] with
    /// `data` (fewer bytes when the connection ends or fails). In zero-copy mode the bytes go
    /// straight into the request's pages (a receive into the fixed buffer, Linux 7.3 checked):
    /// the socket's data is copied once.
    pub fn recv_at(
        &mut self,
        tag: u16,
        fd: BorrowedFd<'_>,
        buf_off: u32,
        len: u32,
        data: u32,
    ) -> io::Result<()> {
        let p = self.check_range(tag, buf_off, len)?;
        let mut recv =
            opcode::Recv::new(types::Fd(fd.as_raw_fd()), p, len).flags(libc::MSG_WAITALL);
        if self.mode == DataMode::ZeroCopy {
            // The fixed buffer index shares the SQE field of the buffer group.
            recv = recv.ioprio(IORING_RECVSEND_FIXED_BUF).buf_group(tag);
        }
        self.push(tag, data, recv.build())
    }

    /// Receives at most `max` bytes from socket `fd` into the spare capacity of `buf` (from
    /// `buf.len()` up to `buf.capacity()`). The buffer is lent to the kernel until the
    /// completion, which arrives in [`QueueHandler::on_event`] with `data` and `buf` back,
    /// its length grown by the bytes received.
    pub fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        mut buf: Vec<u8>,
        max: usize,
        data: u32,
    ) -> io::Result<()> {
        let room = u32::try_from((buf.capacity() - buf.len()).min(max)).unwrap_or(u32::MAX);
        if room == 0 {
            return Err(einval("no room to receive into"));
        }
        let p = buf.spare_capacity_mut().as_mut_ptr().cast::<u8>();
        let sqe = opcode::Recv::new(types::Fd(fd.as_raw_fd()), p, room).build();
        if !self.own.has_room() {
            return Err(io::Error::other("too many operations in flight"));
        }
        let idx = self.own.insert(data, OwnBuf::Recv(buf));
        // SAFETY: the buffer's heap block now belongs to the op table entry `idx`, which is
        // neither touched nor freed until this operation's completion (or the queue's drop,
        // after the ring's).
        unsafe { self.push_own(idx, sqe) }
    }

    /// The most operations one [`IoCtx::send`] may take: in zero-copy mode it takes one per
    /// run of parts in memory and one per range of a request's pages.
    pub fn send_max_ops(&mut self) -> usize {
        self.ring.submission().capacity()
    }

    /// Sends `parts` in order on socket `fd` with one `sendmsg` (`MSG_WAITALL`, so a short
    /// count means the connection failed). [`SendPart::Bytes`] ranges are of `bytes`, which is
    /// lent to the kernel until the completion; [`SendPart::Tag`] ranges are of request
    /// buffers, whose commits wait for it. In zero-copy mode a request's range is sent straight
    /// from its pages (a send from the fixed buffer, linked between the `sendmsg`s of what comes
    /// before and after it, so the stream keeps its order), unless
    /// [`IoCtx::fetch_write_data`] brought its data into the buffer. The completion arrives
    /// once, in [`QueueHandler::on_event`], with `data`, the bytes sent (or the first error),
    /// and `bytes` back.
    pub fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        bytes: Vec<u8>,
        parts: &[SendPart],
        data: u32,
    ) -> io::Result<()> {
        self.send_with(fd, bytes, parts, data, libc::MSG_WAITALL)
    }

    /// [`IoCtx::send`] without `MSG_WAITALL`, for sockets that refuse it (kernel TLS): the
    /// kernel may send less than all, and the completion's count says how much. The caller
    /// sends the rest ([`SendPart::skip`]). It must be one `sendmsg`: in zero-copy mode every
    /// request range must be in its buffer ([`IoCtx::fetch_write_data`]), as a linked chain
    /// would go on after a short send and leave a gap in the stream.
    pub fn send_some(
        &mut self,
        fd: BorrowedFd<'_>,
        bytes: Vec<u8>,
        parts: &[SendPart],
        data: u32,
    ) -> io::Result<()> {
        self.send_with(fd, bytes, parts, data, 0)
    }

    fn send_with(
        &mut self,
        fd: BorrowedFd<'_>,
        bytes: Vec<u8>,
        parts: &[SendPart],
        data: u32,
        waitall: i32,
    ) -> io::Result<()> {
        if parts.is_empty() || parts.len() > 1024 {
            return Err(einval("a send takes 1 to 1024 parts"));
        }
        if !self.own.has_room() {
            return Err(io::Error::other("too many operations in flight"));
        }
        let mut iov = self.own.take_iov();
        let mut tags = Vec::new();
        // What goes out, in order: runs of the iovec array (one `sendmsg` each) and ranges of
        // requests' pages (one fixed-buffer send each).
        let mut segs: Vec<Seg> = Vec::new();
        for part in parts {
            let r = match *part {
                SendPart::Bytes(ref r) => match bytes.get(r.clone()) {
                    Some(b) => Ok(Some((b.as_ptr().cast_mut(), b.len()))),
                    None => Err(einval("byte range outside the send buffer")),
                },
                SendPart::Tag { tag, off, len } if !self.buffered(tag) => {
                    self.check_range(tag, off, len).map(|_| {
                        tags.push(tag);
                        segs.push(Seg::Fixed { tag, off, len });
                        None
                    })
                }
                SendPart::Tag { tag, off, len } => self.slot_range(tag, off, len).map(|p| {
                    tags.push(tag);
                    Some((p, len as usize))
                }),
            };
            match r {
                Ok(Some((base, len))) => {
                    match segs.last_mut() {
                        Some(Seg::Msg(run)) => run.end += 1,
                        _ => segs.push(Seg::Msg(iov.len()..iov.len() + 1)),
                    }
                    iov.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: len,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    self.own.put_iov(iov);
                    return Err(e);
                }
            }
        }
        if waitall == 0 && segs.len() > 1 {
            self.own.put_iov(iov);
            return Err(einval("a partial send must be one sendmsg"));
        }
        let room = self.ring.submission().capacity();
        if segs.len() > room {
            self.own.put_iov(iov);
            return Err(einval(
                "a send of more segments than the submission queue holds",
            ));
        }
        // The iovec array is complete: the message headers may point into it. Neither array's
        // heap block moves from here on (both go into the op table entry as they are).
        let hdrs: Vec<libc::msghdr> = segs
            .iter()
            .filter_map(|seg| match seg {
                Seg::Msg(run) => {
                    // SAFETY: an all-zero msghdr is valid (no name, no control data).
                    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                    hdr.msg_iov = iov[run.clone()].as_ptr().cast_mut();
                    hdr.msg_iovlen = run.len();
                    Some(hdr)
                }
                Seg::Fixed { .. } => None,
            })
            .collect();
        let flags = waitall | libc::MSG_NOSIGNAL;
        let fd = types::Fd(fd.as_raw_fd());
        let mut msgs = hdrs.iter();
        let sqes: Vec<squeue::Entry> = segs
            .iter()
            .enumerate()
            .map(|(i, seg)| {
                let sqe = match seg {
                    Seg::Msg(_) => {
                        let hdr = msgs.next().expect("one header per sendmsg");
                        opcode::SendMsg::new(fd, hdr).flags(flags as u32).build()
                    }
                    // A fixed buffer registered by the kernel is addressed from 0.
                    Seg::Fixed { tag, off, len } => opcode::Send::new(
                        fd,
                        std::ptr::null::<u8>().wrapping_add(*off as usize),
                        *len,
                    )
                    .flags(flags)
                    .ioprio(IORING_RECVSEND_FIXED_BUF)
                    .buf_group(*tag)
                    .build(),
                };
                if i + 1 < segs.len() {
                    sqe.flags(squeue::Flags::IO_LINK)
                } else {
                    sqe
                }
            })
            .collect();
        for &t in &tags {
            self.tags.op_submitted(t);
        }
        let idx = self.own.insert(
            data,
            OwnBuf::Send {
                bytes,
                iov,
                hdrs,
                tags,
                left: sqes.len(),
                sent: 0,
                err: None,
            },
        );
        // A chain must reach the kernel whole: a submission in its middle would end the link.
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < sqes.len() {
            if let Err(e) = self.ring.submit() {
                self.drop_send(idx);
                return Err(e);
            }
        }
        for (i, sqe) in sqes.iter().enumerate() {
            let sqe = sqe.clone().user_data(user_data(KIND_OWN, idx, 0));
            // SAFETY: the message headers, the iovec array and `bytes` are owned by the op
            // table entry `idx` until its last completion; request ranges (of buffers or fixed
            // buffers) were checked against their requests, whose tags now count this
            // operation (their commits wait for it).
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                // Not reached: room was made above. What was pushed points into the entry,
                // which its completions free; nothing was pushed, it goes now.
                match self.own.get_mut(idx) {
                    Some(OwnBuf::Send { left, err, .. }) if i > 0 => {
                        *left = i;
                        *err = Some(-libc::EIO);
                    }
                    _ => self.drop_send(idx),
                }
                return Err(io::Error::other(
                    "submission queue full in the middle of a send",
                ));
            }
        }
        Ok(())
    }

    /// A timer: [`QueueHandler::on_event`] is called with `data` and `-ETIME` after `after`.
    pub fn timeout(&mut self, after: Duration, data: u32) -> io::Result<()> {
        let ts = Box::new(
            types::Timespec::new()
                .sec(after.as_secs())
                .nsec(after.subsec_nanos()),
        );
        let sqe = opcode::Timeout::new(&*ts).build();
        if !self.own.has_room() {
            return Err(io::Error::other("too many operations in flight"));
        }
        let idx = self.own.insert(data, OwnBuf::Timer(ts));
        // SAFETY: the timespec is owned by the op table entry `idx` until the completion.
        unsafe { self.push_own(idx, sqe) }
    }

    /// Pushes the SQE of own operation `idx`; on failure forgets the entry (and the request
    /// buffers it pointed into stop counting it).
    ///
    /// # Safety
    ///
    /// As [`push_sqe`]: whatever the entry points to is owned by the op table entry `idx`, or
    /// is a checked range of a request buffer whose tag counts the operation.
    unsafe fn push_own(&mut self, idx: u16, sqe: squeue::Entry) -> io::Result<()> {
        let sqe = sqe.user_data(user_data(KIND_OWN, idx, 0));
        let r = push_sqe(self.ring, &sqe);
        if r.is_err() {
            self.drop_send(idx);
        }
        r
    }

    /// Forgets own operation `idx` that never reached the ring; the request buffers a send
    /// pointed into stop counting it.
    fn drop_send(&mut self, idx: u16) {
        if let Some((_, OwnBuf::Send { iov, tags, .. })) = self.own.remove(idx) {
            for t in tags {
                self.tags.op_completed(t);
            }
            self.own.put_iov(iov);
        }
    }
}

/// One operation of a send: a `sendmsg` of a run of its iovec array, or a send of a range of
/// a request's pages (zero copy).
#[derive(Debug)]
enum Seg {
    Msg(std::ops::Range<usize>),
    Fixed { tag: u16, off: u32, len: u32 },
}

/// One part of an [`IoCtx::send`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendPart {
    /// A byte range of the send's own buffer.
    Bytes(std::ops::Range<usize>),
    /// `len` bytes of request `tag`'s buffer from `off`.
    Tag {
        /// The request.
        tag: u16,
        /// Offset in its buffer.
        off: u32,
        /// Length.
        len: u32,
    },
}

impl SendPart {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            SendPart::Bytes(r) => r.len(),
            SendPart::Tag { len, .. } => *len as usize,
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What is left of `parts` once their first `n` bytes are sent.
    pub fn skip(parts: &[SendPart], mut n: usize) -> Vec<SendPart> {
        let mut rest = Vec::with_capacity(parts.len());
        for p in parts {
            let len = p.len();
            if n >= len {
                n -= len;
                continue;
            }
            rest.push(match *p {
                SendPart::Bytes(ref r) => SendPart::Bytes(r.start + n..r.end),
                SendPart::Tag { tag, off, len } => SendPart::Tag {
                    tag,
                    // n < len, a u32.
                    off: off + n as u32,
                    len: len - n as u32,
                },
            });
            n = 0;
        }
        rest
    }
}

/// A target operation of its own in flight, with the memory the kernel may touch until it
/// completes.
#[derive(Debug)]
enum OwnBuf {
    Recv(Vec<u8>),
    Send {
        bytes: Vec<u8>,
        iov: Vec<libc::iovec>,
        /// Only kept alive: the kernel reads them.
        #[allow(dead_code)]
        hdrs: Vec<libc::msghdr>,
        tags: Vec<u16>,
        /// Completions still to come (one per linked operation).
        left: usize,
        /// Bytes sent so far.
        sent: usize,
        /// The first error.
        err: Option<i32>,
    },
    /// Only kept alive: the kernel reads it.
    Timer(#[allow(dead_code)] Box<types::Timespec>),
}

/// The target's own operations in flight (indexed by the low 16 bits of their user data).
#[derive(Debug, Default)]
pub(crate) struct OwnOps {
    slots: Vec<Option<(u32, OwnBuf)>>,
    free: Vec<u16>,
    iovs: Vec<Vec<libc::iovec>>,
}

impl Drop for OwnOps {
    fn drop(&mut self) {
        // Dropped after the ring. Operations still in flight then (a receive parked on a
        // socket) are being cancelled by the ring's teardown, which may finish after close()
        // returned: their memory is leaked rather than freed under them.
        for (_, buf) in self.slots.drain(..).flatten() {
            std::mem::forget(buf);
        }
    }
}

impl OwnOps {
    /// Whether [`OwnOps::insert`] has an index left (16 bits of user data).
    fn has_room(&self) -> bool {
        !self.free.is_empty() || self.slots.len() <= usize::from(u16::MAX)
    }

    /// Parks an operation's memory; the caller checked [`OwnOps::has_room`].
    fn insert(&mut self, data: u32, buf: OwnBuf) -> u16 {
        if let Some(i) = self.free.pop() {
            self.slots[usize::from(i)] = Some((data, buf));
            return i;
        }
        self.slots.push(Some((data, buf)));
        (self.slots.len() - 1) as u16
    }

    fn get_mut(&mut self, idx: u16) -> Option<&mut OwnBuf> {
        self.slots
            .get_mut(usize::from(idx))?
            .as_mut()
            .map(|(_, b)| b)
    }

    fn remove(&mut self, idx: u16) -> Option<(u32, OwnBuf)> {
        let r = self.slots.get_mut(usize::from(idx))?.take();
        if r.is_some() {
            self.free.push(idx);
        }
        r
    }

    fn take_iov(&mut self) -> Vec<libc::iovec> {
        self.iovs.pop().unwrap_or_default()
    }

    fn put_iov(&mut self, mut iov: Vec<libc::iovec>) {
        iov.clear();
        self.iovs.push(iov);
    }
}

fn einval(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

/// Pushes one SQE, submitting first if the submission queue is full.
///
/// # Safety
///
/// Whatever the entry points to must stay valid until its completion is reaped.
fn push_sqe(ring: &mut IoUring, sqe: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: the caller's contract (module-level: only the tag's own slot, the queue's
        // event buffer, or nothing).
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// The running queue.
struct Queue<H: QueueHandler> {
    // Drop order: the ring first, so nothing in flight outlives the buffers below.
    ring: IoUring,
    /// Batch io commands' state, if the device uses them.
    batch: Option<Batch>,
    /// A fetch of `batch` ended with an error: the device is going away, and tags the kernel
    /// holds will not be delivered again.
    fetch_stopped: bool,
    /// Scratch for the tags of one fetch completion.
    fetched: Vec<u16>,
    handler: H,
    desc: DescArea,
    bufs: IoBufs,
    tags: Tags,
    cfg: QueueConfig,
    /// In user-copy mode, whether request data is copied in and out at all
    /// ([`Target::uses_data`]).
    copy_data: bool,
    completer: Completer,
    rx: Receiver<(u16, i32)>,
    event_buf: Box<u64>,
    cqes: Vec<(u64, i32, u32)>,
    /// The target's own operations in flight (after the ring: dropped once it is gone).
    own: OwnOps,
    /// Requests the target completed through [`IoCtx::complete`], to commit.
    done: Vec<(u16, i32)>,
    /// Per tag, in user-copy mode: how its request's data moves.
    paths: Vec<DataPath>,
    /// Polling before sleeping (`None`: never).
    poll: Option<IdlePoll>,
    /// When the kernel first aborted a tag (the device is stopping or quiescing).
    aborted_at: Option<std::time::Instant>,
}

/// The state of [`Queue::poll_for_work`]: a score of recent polls, up by one for a poll that
/// found work and down by two for one that did not; at zero, polling pauses for
/// `POLL_BACKOFF` waits. A queue whose polls mostly miss (or alternate, such as a send's
/// completion caught and then a slow reply missed) soon stops polling.
#[derive(Debug)]
struct IdlePoll {
    max: Duration,
    score: u32,
    /// Waits left without polling.
    skip: u32,
}

impl IdlePoll {
    fn new(max: Duration) -> Option<IdlePoll> {
        (!max.is_zero()).then_some(IdlePoll {
            max,
            score: POLL_SCORE_START,
            skip: 0,
        })
    }

    /// Whether to poll before this wait.
    fn begin(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A poll ended, having `found` work or not.
    fn end(&mut self, found: bool) {
        if found {
            self.score = (self.score + 1).min(POLL_SCORE_MAX);
            return;
        }
        self.score = self.score.saturating_sub(2);
        if self.score == 0 {
            self.score = POLL_SCORE_START;
            self.skip = POLL_BACKOFF;
        }
    }
}

/// The score polling starts (and restarts after a pause) with: two misses in a row pause it.
const POLL_SCORE_START: u32 = 4;
/// The highest score: after a run of hits, five misses in a row pause polling.
const POLL_SCORE_MAX: u32 = 10;
/// Waits without polling once the score reaches zero.
const POLL_BACKOFF: u32 = 64;

/// How long a queue whose device is going away waits for the kernel to abort its remaining
/// tags before it exits anyway, once none of them has a request with the server (only
/// commands parked in the kernel): closing the ring cancels those, so one command the kernel
/// missed cannot keep the daemon (and `ublk quiesce`, `ublk del`) waiting forever.
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// Sets up queue `cfg.q_id` and submits a FETCH for every tag. The returned closure serves the
/// queue until the device stops.
pub(crate) fn setup<T: Target>(
    target: &T,
    cfg: QueueConfig,
) -> Result<impl FnOnce() -> Result<(), QueueError>, QueueError> {
    let q = cfg.q_id;
    let entries = (u32::from(cfg.depth) * 2).next_power_of_two().max(32);
    let mut builder = IoUring::builder();
    // Task work (the driver's dispatch of new requests, socket readiness, io-wq completions)
    // runs only when this thread waits for completions, in one go, instead of interrupting it:
    // measured +4 to +15 % for zero copy at 1 queue on 7.3 (loop -z on tmpfs), +3 to +14 % for
    // nbd at 4k QD32 (7 of 8 cells, 3 rounds each on 6.12 and 7.3; BENCHMARKS-HOWTO), no
    // difference for null and loop served inline.
    builder
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag();
    let ring = builder
        .build(entries)
        .or_else(|_| IoUring::new(entries))
        .map_err(|e| QueueError::Ring(q, e))?;
    ring.submitter()
        .register_files(&[cfg.cdev.as_raw_fd()])
        .map_err(|e| QueueError::Ring(q, e))?;
    if cfg.mode == DataMode::ZeroCopy {
        // The kernel installs request tag's pages at index tag of this table.
        ring.submitter()
            .register_buffers_sparse(u32::from(cfg.depth))
            .map_err(|e| QueueError::Ring(q, e))?;
    }
    let desc = DescArea::map(&cfg.cdev, q, cfg.depth, cfg.desc_size)
        .map_err(|e| QueueError::Memory(q, e))?;
    let bufs = IoBufs::new(cfg.depth, cfg.buf_size).map_err(|e| QueueError::Memory(q, e))?;
    let batch = if cfg.batch {
        let (addr, index) = (cfg.mode == DataMode::Copy, cfg.mode == DataMode::ZeroCopy);
        Some(Batch::new(&ring, q, cfg.depth, addr, index).map_err(|e| QueueError::Ring(q, e))?)
    } else {
        None
    };
    let handler = target.open_queue(q).map_err(|e| QueueError::Target(q, e))?;
    let (tx, rx) = crossbeam_channel::bounded(usize::from(cfg.depth));
    let paths = vec![DataPath::Buffer; usize::from(cfg.depth)];
    let completer = Completer {
        tx,
        wake: cfg.wake.clone(),
    };
    let poll = cfg.poll;
    let mut queue = Queue {
        ring,
        batch,
        fetch_stopped: false,
        fetched: Vec::new(),
        handler,
        copy_data: target.uses_data(),
        desc,
        bufs,
        tags: Tags::new(cfg.depth),
        cqes: Vec::with_capacity(entries as usize * 2),
        cfg,
        completer,
        rx,
        event_buf: Box::new(0),
        own: OwnOps::default(),
        done: Vec::new(),
        paths,
        aborted_at: None,
        poll: IdlePoll::new(poll),
    };
    if queue.batch.is_some() {
        queue
            .submit_batch_setup()
            .map_err(|e| QueueError::Submit(q, e))?;
    } else {
        for tag in 0..queue.cfg.depth {
            queue
                .submit_cmd(sys::UBLK_U_IO_FETCH_REQ, tag, 0)
                .map_err(|e| QueueError::Submit(q, e))?;
        }
    }
    queue.arm_event().map_err(|e| QueueError::Submit(q, e))?;
    if queue.batch.is_some() {
        // PREP_IO_CMDS completes at once (accepted or refused): wait for it.
        queue
            .ring
            .submit_and_wait(1)
            .map_err(|e| QueueError::Submit(q, e))?;
    } else {
        queue.ring.submit().map_err(|e| QueueError::Submit(q, e))?;
    }
    // No request can arrive before START_DEV / END_USER_RECOVERY, so a failed completion now
    // is a FETCH (or PREP / FETCH_IO_CMDS) the kernel refused (bad flags or buffer setup): fail
    // here rather than let the start wait for a tag that will never be fetched.
    for c in queue.ring.completion() {
        let (ud, res, flags) = (c.user_data(), c.result(), c.flags());
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            match (ud >> 16) & 0xff {
                KIND_CMD => return Err(QueueError::Fetch(q, (ud & 0xffff) as u16, err)),
                KIND_BATCH | KIND_FETCH => return Err(QueueError::Batch(q, err)),
                _ => {}
            }
        }
        queue.cqes.push((ud, res, flags));
    }
    Ok(move || queue.run())
}

impl<H: QueueHandler> Queue<H> {
    /// The `addr` of a FETCH / COMMIT_AND_FETCH for `tag`.
    fn buf_addr(&self, tag: u16) -> u64 {
        slot_addr(self.cfg.mode, &self.bufs, tag)
    }

    fn submit_cmd(&mut self, op: u32, tag: u16, result: i32) -> io::Result<()> {
        let auto_buf = (self.cfg.mode == DataMode::ZeroCopy).then_some(tag);
        let sqe = io_cmd_sqe(op, self.cfg.q_id, tag, result, self.buf_addr(tag), auto_buf);
        // SAFETY: the command's addr is the tag's own slot, handed to the kernel together
        // with the tag (state Fetching/GettingData), or 0 in user-copy mode.
        push_sqe(&mut self.ring, &sqe)
    }

    /// Batch io commands: hands every tag to the kernel (PREP_IO_CMDS) and arms the fetches.
    fn submit_batch_setup(&mut self) -> io::Result<()> {
        let (bufs, mode) = (&self.bufs, self.cfg.mode);
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        let (sqe, slot) = batch.prep(|tag| slot_addr(mode, bufs, tag));
        let sqe = sqe.user_data(user_data(KIND_BATCH, slot, 0));
        // SAFETY: the element array is held by `batch` until the completion; each address is
        // a tag's own slot, handed to the kernel together with the tag.
        push_sqe(&mut self.ring, &sqe)?;
        for i in 0..FETCHES {
            self.arm_fetch(i)?;
        }
        Ok(())
    }

    /// Provides fetch buffer `i` and submits its multishot FETCH_IO_CMDS.
    fn arm_fetch(&mut self, i: u16) -> io::Result<()> {
        let Some(batch) = self.batch.as_mut() else {
            return Ok(());
        };
        let sqe = batch.fetch(i).user_data(user_data(KIND_FETCH, i, 0));
        // SAFETY: the command writes tags only into fetch buffer `i`, owned by `batch`.
        push_sqe(&mut self.ring, &sqe)
    }

    /// Sends the results queued since the last call in COMMIT_IO_CMDS commands.
    fn flush_commits(&mut self) {
        while let Some((sqe, slot)) = self.batch.as_mut().and_then(Batch::commit) {
            let sqe = sqe.user_data(user_data(KIND_BATCH, slot, 0));
            // SAFETY: the element array is held by `batch` until the completion; each buffer
            // address is the committed tag's own slot, the kernel's again with the tag.
            if let Err(e) = push_sqe(&mut self.ring, &sqe) {
                log::error!(
                    "queue {}: COMMIT_IO_CMDS submission failed: {e}",
                    self.cfg.q_id
                );
                if let Some(done) = self
                    .batch
                    .as_mut()
                    .and_then(|b| b.cmd_done(slot, -libc::EIO))
                {
                    self.on_batch_done(done, -libc::EIO);
                }
            }
        }
    }

    /// A PREP_IO_CMDS / COMMIT_IO_CMDS completed.
    fn on_batch_done(&mut self, done: CommitDone, res: i32) {
        let q = self.cfg.q_id;
        if !done.refused.is_empty() && !self.fetch_stopped {
            log::error!(
                "queue {q}: the kernel refused the batch command for tag(s) {:?} ({}); {} later \
                 result(s) go out again",
                done.refused,
                if res < 0 {
                    io::Error::from_raw_os_error(-res).to_string()
                } else {
                    format!("it stopped after {res} bytes")
                },
                done.requeued
            );
        }
        for tag in done.refused {
            self.tags.kill(tag);
        }
        if self.fetch_stopped {
            // Nothing will deliver these tags again.
            for tag in done.accepted {
                self.tags.kill(tag);
            }
        }
    }

    /// A completion of multishot fetch `i`.
    fn on_fetch(&mut self, i: u16, res: i32, flags: u32) {
        let q = self.cfg.q_id;
        let mut tags = std::mem::take(&mut self.fetched);
        let Some(batch) = self.batch.as_mut() else {
            return;
        };
        let ended = batch.fetched(i, res, cqueue::more(flags), &mut tags);
        for &tag in &tags {
            match self.tags.on_cmd(tag, Cmd::Fetch, 0, false) {
                CmdOutcome::Dispatch => self.dispatch(tag),
                other => log::error!("queue {q} tag {tag}: fetched in a wrong state ({other:?})"),
            }
        }
        tags.clear();
        self.fetched = tags;
        if !ended || self.fetch_stopped {
            return;
        }
        // The buffer is full (or was: -ENOBUFS): provide it again at once (tags the kernel
        // queued meanwhile come with the new command). Any other error means the device is
        // going away (-ENODEV: stopped).
        if (res >= 0 || res == -libc::ENOBUFS) && !self.cfg.wake.quitting() {
            match self.arm_fetch(i) {
                Ok(()) => return,
                Err(e) => log::error!("queue {q}: cannot re-arm FETCH_IO_CMDS: {e}"),
            }
        } else if res != -libc::ENODEV {
            log::warn!(
                "queue {q}: FETCH_IO_CMDS ended: {}",
                io::Error::from_raw_os_error(-res)
            );
        }
        log::trace!("queue {q}: fetching stopped; tags with the kernel are dead");
        self.fetch_stopped = true;
        self.tags.kill_fetching();
    }

    fn arm_event(&mut self) -> io::Result<()> {
        let p: *mut u64 = &mut *self.event_buf;
        let sqe = opcode::Read::new(types::Fd(self.cfg.wake.event.as_raw_fd()), p.cast(), 8)
            .build()
            .user_data(user_data(KIND_EVENT, 0, 0));
        // SAFETY: event_buf is a heap cell owned by the queue that outlives the ring.
        push_sqe(&mut self.ring, &sqe)
    }

    fn run(mut self) -> Result<(), QueueError> {
        let q = self.cfg.q_id;
        while self.tags.live() {
            if self.cfg.wake.quitting() {
                log::warn!("queue {q}: forced to quit with tags in flight");
                break;
            }
            if let Some(t) = self.aborted_at {
                if t.elapsed() > ABORT_GRACE && self.tags.only_parked() {
                    log::warn!(
                        "queue {q}: the kernel aborted some tags but not all within {}s; exiting",
                        ABORT_GRACE.as_secs()
                    );
                    break;
                }
            }
            self.flush_commits();
            let waited = if self.aborted_at.is_some() {
                // Wake up now and then to check the grace period.
                let ts = types::Timespec::new().sec(1);
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(0),
                    r => r,
                }
            } else {
                self.poll_for_work();
                self.ring.submit_and_wait(1)
            };
            match waited {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(QueueError::Submit(q, e)),
            }
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c: cqueue::Entry| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &cqes {
                self.on_cqe(ud, res, flags);
            }
            cqes.clear();
            self.cqes = cqes;
            if self.tags.live() {
                self.handler.end_batch(&mut ctx!(self));
                self.finish_done();
            }
        }
        log::debug!("queue {q}: all tags aborted, exiting");
        Ok(())
    }

    /// Before the thread sleeps: hands the kernel what is queued (commits, target IO), then
    /// polls up to `cfg.poll` for a completion or for task work (a new request, a finished
    /// operation), which the kernel flags in the ring (`IORING_SQ_TASKRUN`). Work that comes
    /// meanwhile is taken without a sleep and a wake-up, and the kernel does not wake this
    /// thread for it: the submitter is spared a cross-CPU wake-up. Polls that keep finding
    /// nothing pause polling ([`IdlePoll`]), so an idle or slow queue, or one whose CPU the
    /// task that feeds it wants, soon sleeps at once again.
    fn poll_for_work(&mut self) {
        let Some(p) = self.poll.as_mut() else { return };
        // An error shows again at the wait that follows.
        if !p.begin() || self.ring.submit().is_err() {
            return;
        }
        let deadline = Instant::now() + p.max;
        let found = loop {
            if !self.ring.completion().is_empty() || self.ring.submission().taskrun() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::hint::spin_loop();
        };
        p.end(found);
    }

    fn on_cqe(&mut self, ud: u64, res: i32, flags: u32) {
        let tag = (ud & 0xffff) as u16;
        let kind = (ud >> 16) & 0xff;
        let data = (ud >> 32) as u32;
        match kind {
            KIND_CMD | KIND_GET_DATA => self.on_cmd(tag, kind, res),
            KIND_FETCH => self.on_fetch(tag, res, flags),
            KIND_BATCH => {
                if let Some(done) = self.batch.as_mut().and_then(|b| b.cmd_done(tag, res)) {
                    self.on_batch_done(done, res);
                }
            }
            KIND_TARGET => self.on_target(tag, data, res),
            KIND_OWN => self.on_own(tag, res),
            KIND_EVENT => {
                while let Ok((tag, res)) = self.rx.try_recv() {
                    self.on_remote(tag, res);
                }
                if self.tags.live() {
                    if let Err(e) = self.arm_event() {
                        log::error!(
                            "queue {}: cannot re-arm completion event: {e}",
                            self.cfg.q_id
                        );
                    }
                }
            }
            _ => log::error!("queue {}: unexpected completion {ud:#x}", self.cfg.q_id),
        }
    }

    fn on_cmd(&mut self, tag: u16, kind: u64, res: i32) {
        let q = self.cfg.q_id;
        let cmd = if kind == KIND_CMD {
            Cmd::Fetch
        } else {
            Cmd::GetData
        };
        match self
            .tags
            .on_cmd(tag, cmd, res, self.cfg.mode == DataMode::NeedGetData)
        {
            CmdOutcome::Dispatch => self.dispatch(tag),
            CmdOutcome::GetData => {
                if let Err(e) = self.submit_cmd(sys::UBLK_U_IO_NEED_GET_DATA, tag, 0) {
                    log::error!("queue {q} tag {tag}: NEED_GET_DATA submission failed: {e}");
                    self.tags.kill(tag);
                }
            }
            CmdOutcome::Aborted => {
                log::trace!("queue {q} tag {tag}: aborted");
                self.aborted_at.get_or_insert_with(std::time::Instant::now);
            }
            CmdOutcome::Failed(errno) => {
                log::error!(
                    "queue {q} tag {tag}: io command failed: {}",
                    io::Error::from_raw_os_error(errno)
                );
            }
            CmdOutcome::Unexpected(state) => {
                log::error!(
                    "queue {q} tag {tag}: unexpected completion ({res}) in state {state:?}"
                );
            }
        }
    }

    /// A request arrived for `tag`: bring its data in (user copy) and hand it to the target.
    fn dispatch(&mut self, tag: u16) {
        let req = self.desc.request(tag);
        self.tags.begin(tag, req);
        if req.len as usize > self.bufs.buf_size() && matches!(req.op, Op::Read | Op::Write) {
            log::error!(
                "queue {} tag {tag}: request of {} bytes exceeds the buffer",
                self.cfg.q_id,
                req.len
            );
            return self.finish(tag, Action::Done(-libc::EINVAL));
        }
        let moves = self.cfg.mode == DataMode::UserCopy
            && self.copy_data
            && matches!(req.op, Op::Read | Op::Write)
            && self.handler.moves_data(&req);
        self.paths[usize::from(tag)] = if self.cfg.mode == DataMode::ZeroCopy {
            DataPath::Kernel
        } else if moves {
            DataPath::Handler
        } else {
            DataPath::Buffer
        };
        if self.cfg.mode == DataMode::UserCopy && self.copy_data && req.has_write_data() && !moves {
            // SAFETY: the tag is InTarget with no operation in flight; the slice is dropped
            // before the target sees the tag.
            let buf = unsafe { self.bufs.slice(tag, req.len as usize) };
            if let Err(e) = self
                .cfg
                .cdev
                .read_exact_at(buf, user_copy_offset(self.cfg.q_id, tag))
            {
                log::error!(
                    "queue {} tag {tag}: user copy of WRITE data failed: {e}",
                    self.cfg.q_id
                );
                return self.finish(tag, Action::Done(-libc::EIO));
            }
        }
        let action = self.handler.handle_io(&mut ctx!(self), &req);
        self.finish(tag, action);
        self.finish_done();
    }

    fn on_target(&mut self, tag: u16, data: u32, res: i32) {
        match self.tags.op_completed(tag) {
            None => {
                let Some(&req) = self.tags.req(tag) else {
                    return;
                };
                let action = self.handler.on_complete(&mut ctx!(self), &req, data, res);
                self.finish(tag, action);
                self.finish_done();
            }
            Some(Finish::Commit(res)) => self.commit(tag, res),
            Some(Finish::Deferred) => {}
            Some(Finish::Invalid) => {
                log::error!("queue {} tag {tag}: stray target completion", self.cfg.q_id)
            }
        }
    }

    /// The target's own operation `idx` completed.
    fn on_own(&mut self, idx: u16, mut res: i32) {
        if let Some(OwnBuf::Send {
            left, sent, err, ..
        }) = self.own.get_mut(idx)
        {
            // A chain of linked operations: report once, after the last.
            match res {
                r if r < 0 => {
                    err.get_or_insert(r);
                }
                r => *sent += r as usize,
            }
            *left = left.saturating_sub(1);
            if *left > 0 {
                return;
            }
            res = err.unwrap_or(i32::try_from(*sent).unwrap_or(i32::MAX));
        }
        let Some((data, buf)) = self.own.remove(idx) else {
            log::error!(
                "queue {}: stray completion of own operation {idx}",
                self.cfg.q_id
            );
            return;
        };
        let buf = match buf {
            OwnBuf::Recv(mut b) => {
                if res > 0 {
                    let n = (res as usize).min(b.capacity() - b.len());
                    // SAFETY: the kernel initialised `n` bytes of the spare capacity.
                    unsafe { b.set_len(b.len() + n) };
                }
                b
            }
            OwnBuf::Send {
                bytes, iov, tags, ..
            } => {
                self.own.put_iov(iov);
                for t in tags {
                    match self.tags.op_completed(t) {
                        Some(Finish::Commit(r)) => self.commit(t, r),
                        Some(Finish::Invalid) => {
                            log::error!("queue {} tag {t}: stray send completion", self.cfg.q_id)
                        }
                        None | Some(Finish::Deferred) => {}
                    }
                }
                bytes
            }
            OwnBuf::Timer(_) => Vec::new(),
        };
        self.handler.on_event(&mut ctx!(self), data, res, buf);
        self.finish_done();
    }

    /// Commits what the target completed with [`IoCtx::complete`].
    fn finish_done(&mut self) {
        while let Some((tag, res)) = self.done.pop() {
            self.finish(tag, Action::Done(res));
        }
    }

    /// A [`Completer`] completion for `tag`.
    fn on_remote(&mut self, tag: u16, res: i32) {
        if !self.tags.owned_by_target(tag, false) {
            log::error!(
                "queue {} tag {tag}: remote completion for a request not in flight",
                self.cfg.q_id
            );
            return;
        }
        let Some(&req) = self.tags.req(tag) else {
            return;
        };
        let action = self.handler.on_remote_complete(&mut ctx!(self), &req, res);
        self.finish(tag, action);
        self.finish_done();
    }

    /// Applies the handler's decision for `tag`.
    fn finish(&mut self, tag: u16, action: Action) {
        let Action::Done(res) = action else { return };
        match self.tags.finish(tag, res) {
            Finish::Commit(res) => self.commit(tag, res),
            Finish::Deferred => {}
            Finish::Invalid => {
                log::error!(
                    "queue {} tag {tag}: completed twice or not in flight",
                    self.cfg.q_id
                );
            }
        }
    }

    fn commit(&mut self, tag: u16, mut res: i32) {
        let Some(&req) = self.tags.req(tag) else {
            return;
        };
        if self.cfg.mode == DataMode::UserCopy
            && self.copy_data
            && req.op == Op::Read
            && res > 0
            && self.paths[usize::from(tag)] != DataPath::Delivered
        {
            let len = (res as usize).min(req.len as usize);
            // SAFETY: the tag is InTarget with no operation in flight.
            let buf = unsafe { self.bufs.slice(tag, len) };
            if let Err(e) = self
                .cfg
                .cdev
                .write_all_at(buf, user_copy_offset(self.cfg.q_id, tag))
            {
                log::error!(
                    "queue {} tag {tag}: user copy of READ data failed: {e}",
                    self.cfg.q_id
                );
                res = -libc::EIO;
            }
        }
        if self.batch.is_some() {
            let addr = self.buf_addr(tag);
            if let Some(b) = self.batch.as_mut() {
                b.push_commit(tag, res, addr);
            }
            // The kernel's again once the commit goes out (before the loop next waits).
            self.tags.committed(tag, true);
            return;
        }
        let submitted = self.submit_cmd(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, res);
        if let Err(e) = &submitted {
            log::error!(
                "queue {} tag {tag}: commit submission failed: {e}",
                self.cfg.q_id
            );
        }
        self.tags.committed(tag, submitted.is_ok());
    }
}

/// `[map_off, map_off + len)` of `map` as offsets for `os`, if inside it.
fn map_span(map: &FileMap, map_off: u64, len: u32) -> io::Result<(usize, usize)> {
    if !map.covers(map_off, len.into()) {
        return Err(einval("range outside the mapping"));
    }
    Ok((map_off as usize, len as usize))
}

/// Runs `step(done, left)` until `n` bytes are copied; a step that copies nothing is `EIO`.
fn copy_all(n: usize, mut step: impl FnMut(usize, usize) -> io::Result<usize>) -> io::Result<()> {
    let mut done = 0;
    while done < n {
        match step(done, n - done) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The buffer address an io command carries for `tag`: its slot in the copy modes, 0 where
/// the kernel does not copy into server memory.
fn slot_addr(mode: DataMode, bufs: &IoBufs, tag: u16) -> u64 {
    match mode {
        DataMode::UserCopy | DataMode::ZeroCopy => 0,
        DataMode::Copy | DataMode::NeedGetData => bufs.addr(tag) as u64,
    }
}

/// Builds the target's context from the queue's fields (disjoint borrows).
macro_rules! ctx {
    ($q:ident) => {
        IoCtx {
            ring: &mut $q.ring,
            bufs: &$q.bufs,
            tags: &mut $q.tags,
            q_id: $q.cfg.q_id,
            mode: $q.cfg.mode,
            completer: &$q.completer,
            own: &mut $q.own,
            done: &mut $q.done,
            cdev: &$q.cfg.cdev,
            paths: &mut $q.paths,
        }
    };
}
use ctx;

/// The SQE of an io command (`struct ublksrv_io_cmd` in a 64-byte `URING_CMD` SQE, on the
/// registered `/dev/ublkcN`). `auto_buf` (zero copy) goes in the SQE's own `addr` as
/// `struct ublk_auto_buf_reg`: the kernel registers the next request's pages at that index of
/// the ring's buffer table (no flags, reserved fields zero).
pub(crate) fn io_cmd_sqe(
    op: u32,
    q_id: u16,
    tag: u16,
    result: i32,
    addr: u64,
    auto_buf: Option<u16>,
) -> squeue::Entry {
    let mut raw = [0u8; 16];
    raw[0..2].copy_from_slice(&q_id.to_ne_bytes());
    raw[2..4].copy_from_slice(&tag.to_ne_bytes());
    raw[4..8].copy_from_slice(&result.to_ne_bytes());
    raw[8..16].copy_from_slice(&addr.to_ne_bytes());
    let kind = if op == sys::UBLK_U_IO_NEED_GET_DATA {
        KIND_GET_DATA
    } else {
        KIND_CMD
    };
    opcode::UringCmd16::new(CDEV, op)
        .cmd(raw)
        .addr(auto_buf.map(u64::from))
        .build()
        .user_data(user_data(kind, tag, 0))
}

/// The `/dev/ublkcN` file offset of `(q, tag)`'s data in user-copy mode.
pub fn user_copy_offset(q: u16, tag: u16) -> u64 {
    u64::from(sys::UBLKSRV_IO_BUF_OFFSET)
        + (u64::from(q) << sys::UBLK_QID_OFF)
        + (u64::from(tag) << sys::UBLK_TAG_OFF)
}

/// Whether this kernel's io_uring sends and receives on sockets straight from and into
/// registered buffers (`IORING_RECVSEND_FIXED_BUF` on plain `IORING_OP_SEND` / `RECV`, new in
/// Linux 7.x): what [`IoCtx::recv_at`] and [`IoCtx::send`] need in zero-copy mode. Probed once:
/// a kernel without it refuses the flag when it prepares the receive (`EINVAL`); one with it
/// looks for the buffer, which the probe's ring does not have (`EFAULT`).
pub fn socket_io_on_fixed_buffers() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| match probe_recv_fixed() {
        Ok(res) => {
            log::debug!("receive into a fixed buffer: {res}");
            res == -libc::EFAULT
        }
        Err(e) => {
            log::debug!("cannot probe receives into fixed buffers: {e}");
            false
        }
    })
}

/// The result of a receive into fixed buffer 0 of a ring that has none.
fn probe_recv_fixed() -> io::Result<i32> {
    let mut ring = IoUring::new(2)?;
    let (a, _b) = std::os::unix::net::UnixStream::pair()?;
    let sqe = opcode::Recv::new(types::Fd(a.as_raw_fd()), std::ptr::null_mut(), 1)
        .ioprio(IORING_RECVSEND_FIXED_BUF)
        .buf_group(0)
        .flags(libc::MSG_DONTWAIT)
        .build()
        .user_data(1);
    // SAFETY: the entry points at no memory: with the flag, `addr` is an offset into a
    // registered buffer, and the ring has none; without the flag's support the kernel refuses
    // the entry before reading anything.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    Ok(cqe.result())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_idle_poll_pauses_after_fruitless_polls() {
        assert!(IdlePoll::new(Duration::ZERO).is_none());
        let pauses = |p: &mut IdlePoll| {
            let paused = !p.begin();
            if paused {
                for _ in 1..POLL_BACKOFF {
                    assert!(!p.begin());
                }
                assert!(p.begin());
            }
            paused
        };
        let mut p = IdlePoll::new(Duration::from_micros(30)).unwrap();
        // Polls that find work keep polling on, and make up for the odd miss.
        for _ in 0..20 {
            for _ in 0..3 {
                assert!(p.begin());
                p.end(true);
            }
            assert!(p.begin());
            p.end(false);
        }
        // After a run of hits, five misses in a row pause polling for POLL_BACKOFF waits.
        for _ in 0..2 {
            assert!(p.begin());
            p.end(true);
        }
        for _ in 0..4 {
            assert!(p.begin());
            p.end(false);
        }
        p.end(false);
        assert!(pauses(&mut p));
        // Then two misses in a row pause it again.
        p.end(false);
        assert!(p.begin());
        p.end(false);
        assert!(pauses(&mut p));
        // Hits and misses in turn pause it too.
        let mut waits = 0;
        loop {
            p.end(waits % 2 == 0);
            waits += 1;
            if pauses(&mut p) {
                break;
            }
            assert!(waits < 20, "alternating hits and misses kept polling");
        }
    }

    #[test]
    fn test_send_part_skip() {
        let parts = [
            SendPart::Bytes(0..28),
            SendPart::Tag {
                tag: 3,
                off: 0,
                len: 4096,
            },
            SendPart::Bytes(28..56),
        ];
        let total: usize = parts.iter().map(SendPart::len).sum();
        assert_eq!(SendPart::skip(&parts, 0), parts);
        assert_eq!(SendPart::skip(&parts, 10)[0], SendPart::Bytes(10..28));
        assert_eq!(SendPart::skip(&parts, 28), parts[1..]);
        assert_eq!(
            SendPart::skip(&parts, 28 + 100),
            [
                SendPart::Tag {
                    tag: 3,
                    off: 100,
                    len: 3996
                },
                SendPart::Bytes(28..56)
            ]
        );
        assert_eq!(SendPart::skip(&parts, total - 1), [SendPart::Bytes(55..56)]);
        assert!(SendPart::skip(&parts, total).is_empty());
        // What is left always adds up.
        for n in 0..=total {
            let rest: usize = SendPart::skip(&parts, n).iter().map(SendPart::len).sum();
            assert_eq!(rest, total - n);
        }
    }

    #[test]
    fn test_user_copy_offset_is_additive() {
        assert_eq!(user_copy_offset(0, 0), 0x8000_0000);
        // 0x80000000 overlaps the tag field: the kernel subtracts it, so we must add.
        assert_eq!(user_copy_offset(0, 64), 0x8000_0000 + (64 << 25));
        assert_eq!(user_copy_offset(1, 3), 0x8000_0000 + (1 << 41) + (3 << 25));
        let off = user_copy_offset(5, 4095) - 0x8000_0000;
        assert_eq!((off >> 25) & 0xffff, 4095);
        assert_eq!((off >> 41) & 0xfff, 5);
    }

    #[test]
    fn test_io_cmd_layout_matches_uapi() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(sys::ublksrv_io_cmd, q_id), 0);
        assert_eq!(offset_of!(sys::ublksrv_io_cmd, tag), 2);
        assert_eq!(offset_of!(sys::ublksrv_io_cmd, result), 4);
        assert_eq!(offset_of!(sys::ublksrv_io_cmd, __bindgen_anon_1), 8);
        let e = io_cmd_sqe(sys::UBLK_U_IO_NEED_GET_DATA, 3, 7, -5, 0x1000, None);
        assert_eq!(e.get_user_data(), user_data(KIND_GET_DATA, 7, 0));
    }

    #[test]
    fn test_user_data_roundtrip() {
        let ud = user_data(KIND_TARGET, 4095, 0xdead_beef);
        assert_eq!(ud & 0xffff, 4095);
        assert_eq!((ud >> 16) & 0xff, KIND_TARGET);
        assert_eq!((ud >> 32) as u32, 0xdead_beef);
    }
}
