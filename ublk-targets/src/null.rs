//! The null target: every request succeeds at once and moves no data.

use std::io;
use ublk_core::{Action, IoCtx, IoRequest, Op, QueueHandler, Target};

/// A device that completes every request immediately (READ data is left as is: in copy mode
/// the queue's buffer, in user-copy and zero-copy modes the request's own pages, untouched).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTarget;

/// The per-queue handler of [`NullTarget`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NullQueue;

impl Target for NullTarget {
    type Queue = NullQueue;
    fn open_queue(&self, _q_id: u16) -> io::Result<NullQueue> {
        Ok(NullQueue)
    }

    fn zero_copy(&self) -> Result<(), &'static str> {
        Ok(())
    }

    fn uses_data(&self) -> bool {
        false
    }
}

impl QueueHandler for NullQueue {
    fn handle_io(&mut self, _ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        match req.op {
            Op::Read | Op::Write => Action::Done(i32::try_from(req.len).unwrap_or(i32::MAX)),
            _ => Action::Done(0),
        }
    }
}
