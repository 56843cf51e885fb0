//! What a target implements: the [`Target`] factory and its per-queue [`QueueHandler`].
//!
//! The core decodes each request into an [`IoRequest`] and hands it to the queue's handler on
//! the queue thread. The handler either finishes at once ([`Action::Done`]) or starts work and
//! returns [`Action::Pending`]; it then finishes later from [`QueueHandler::on_complete`] (after
//! an io_uring operation it submitted through [`IoCtx`](crate::IoCtx)), or from any thread
//! through a [`Completer`](crate::Completer). Data is in the request's buffer
//! ([`IoCtx::buf`](crate::IoCtx::buf)) in every data mode but zero copy, where it stays in the
//! kernel and only the request's io_uring reads and writes reach it ([`Target::zero_copy`]).

use crate::queue::IoCtx;
use std::io;
use ublk_sys as sys;

/// Block request operation (`UBLK_IO_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `UBLK_IO_OP_READ`: fill the buffer.
    Read,
    /// `UBLK_IO_OP_WRITE`: the buffer holds the data.
    Write,
    /// `UBLK_IO_OP_FLUSH`: make completed writes durable.
    Flush,
    /// `UBLK_IO_OP_DISCARD`
    Discard,
    /// `UBLK_IO_OP_WRITE_ZEROES`
    WriteZeroes,
    /// Anything else (zone operations, ...): the raw op code.
    Other(u8),
}

impl Op {
    fn from_raw(op: u8) -> Op {
        match u32::from(op) {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other(op),
        }
    }
}

bitflags::bitflags! {
    /// Request flags (`UBLK_IO_F_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct IoFlags: u32 {
        /// `UBLK_IO_F_FAILFAST_DEV`
        const FAILFAST_DEV = sys::UBLK_IO_F_FAILFAST_DEV;
        /// `UBLK_IO_F_FAILFAST_TRANSPORT`
        const FAILFAST_TRANSPORT = sys::UBLK_IO_F_FAILFAST_TRANSPORT;
        /// `UBLK_IO_F_FAILFAST_DRIVER`
        const FAILFAST_DRIVER = sys::UBLK_IO_F_FAILFAST_DRIVER;
        /// `UBLK_IO_F_META`
        const META = sys::UBLK_IO_F_META;
        /// `UBLK_IO_F_FUA`: the write must be durable before it completes.
        const FUA = sys::UBLK_IO_F_FUA;
        /// `UBLK_IO_F_NOUNMAP`: write-zeroes must keep the range allocated.
        const NOUNMAP = sys::UBLK_IO_F_NOUNMAP;
        /// `UBLK_IO_F_SWAP`
        const SWAP = sys::UBLK_IO_F_SWAP;
        const _ = !0;
    }
}

/// One block request, decoded from the kernel's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    /// The tag: identifies the request within its queue until it completes.
    pub tag: u16,
    /// The operation.
    pub op: Op,
    /// Request flags.
    pub flags: IoFlags,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl IoRequest {
    pub(crate) fn from_raw(tag: u16, op_flags: u32, nr_sectors: u32, start_sector: u64) -> Self {
        IoRequest {
            tag,
            op: Op::from_raw((op_flags & 0xff) as u8),
            flags: IoFlags::from_bits_retain(op_flags & !0xff),
            offset: start_sector << 9,
            len: nr_sectors << 9,
        }
    }

    /// Whether the kernel moves data from the device to the server for this request.
    pub fn has_write_data(&self) -> bool {
        self.op == Op::Write
    }
}

/// What the handler says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Complete the request now: bytes transferred (READ/WRITE: the full length), `0` for
    /// requests without data, or a negative errno.
    Done(i32),
    /// The request is in progress; it will be completed later.
    Pending,
}

impl Action {
    /// `Done` with the errno of an io error (`-EIO` when it has none).
    pub fn from_error(e: &io::Error) -> Action {
        Action::Done(-e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// A device's backend. Shared by all queue threads; each queue gets its own handler.
pub trait Target: Send + Sync {
    /// Per-queue state, created and used on that queue's thread only.
    type Queue: QueueHandler;

    /// Creates the handler of queue `q_id`, on the queue's thread.
    fn open_queue(&self, q_id: u16) -> io::Result<Self::Queue>;

    /// Whether the target works in [`DataMode::ZeroCopy`](crate::DataMode::ZeroCopy), where it
    /// never sees request data ([`IoCtx::buf`] is empty) and moves it only with
    /// [`IoCtx::read_at`] / [`IoCtx::write_at`]: `Ok`, or why not, in words for its user.
    /// [`Device::run`](crate::Device::run) refuses a zero-copy device for a target that says
    /// no.
    fn zero_copy(&self) -> Result<(), &'static str> {
        Err("it needs the request data in user space")
    }

    /// The data mode that suits the target best, for a device whose user names none: copy
    /// mode by default, user copy for a target that uses no data ([`Target::uses_data`]).
    /// A tool falls back to copy mode where the kernel lacks the preferred one.
    fn preferred_mode(&self) -> crate::DataMode {
        if self.uses_data() {
            crate::DataMode::Copy
        } else {
            crate::DataMode::UserCopy
        }
    }

    /// Whether the target reads WRITE data or produces READ data at all. A target that does
    /// neither (null) says no, and in user-copy mode the queue then skips both copies: READs
    /// leave the request's pages as they were.
    fn uses_data(&self) -> bool {
        true
    }
}

/// Serves the requests of one queue.
pub trait QueueHandler {
    /// A new request. The buffer ([`IoCtx::buf`]) holds the data of a WRITE.
    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action;

    /// In user-copy mode ([`DataMode::UserCopy`](crate::DataMode::UserCopy)), asked for each
    /// READ and WRITE before [`QueueHandler::handle_io`]: whether the handler moves this
    /// request's data itself, between the request and a [`FileMap`](crate::FileMap)
    /// ([`IoCtx::copy_write_data_to`], [`IoCtx::copy_read_data_from`]), rather than through
    /// the tag's buffer. The queue then leaves a WRITE's data where it is (the buffer holds
    /// none until [`IoCtx::fetch_write_data`]), and at the commit copies a READ's data from the
    /// buffer only if the handler did not deliver it. No by default.
    fn moves_data(&mut self, req: &IoRequest) -> bool {
        let _ = req;
        false
    }

    /// A completion sent with a [`Completer`](crate::Completer) from another thread arrived for
    /// `req`; this runs on the queue thread, so the handler may use
    /// [`IoCtx::buf`](crate::IoCtx::buf) again (e.g. to copy in READ data received elsewhere)
    /// before the request is committed. By default `res` is committed as is.
    fn on_remote_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, res: i32) -> Action {
        let _ = (ctx, req);
        Action::Done(res)
    }

    /// An operation of the handler's own, not tied to a request ([`IoCtx::recv`],
    /// [`IoCtx::send`], [`IoCtx::timeout`]), completed with `res`; `data` is the value given
    /// at submission and `buf` the buffer lent with it (received bytes appended), or empty.
    /// Requests are finished from here with [`IoCtx::complete`].
    fn on_event(&mut self, ctx: &mut IoCtx<'_>, data: u32, res: i32, buf: Vec<u8>) {
        let _ = (ctx, data, res, buf);
        log::error!("queue handler without on_event got an event");
    }

    /// Called after each batch of completions, before the ring is entered again: the place
    /// to submit work gathered while handling the batch (one `send` for many requests).
    fn end_batch(&mut self, ctx: &mut IoCtx<'_>) {
        let _ = ctx;
    }

    /// An io_uring operation this handler submitted for `req` completed with `res`; `data` is
    /// the value given at submission.
    fn on_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, data: u32, res: i32) -> Action {
        let _ = (ctx, data);
        if res < 0 {
            Action::Done(res)
        } else {
            Action::Done(i32::try_from(req.len).unwrap_or(i32::MAX))
        }
    }
}
