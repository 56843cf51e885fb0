//! The ublk side of qcow2: a [`Target`] serving a [`Qcow2Image`].
//!
//! This first version runs the engine synchronously on the queue thread (positional reads and
//! writes on the image file); moving its data IO onto the queue's io_uring is future work.
//! FLUSH writes the metadata back in dependency order, then syncs the image. The device
//! advertises a volatile write cache so the kernel sends FLUSH (and FUA, honoured as a write
//! followed by a flush).

use super::{Qcow2Image, Qcow2Options, Result};
use std::io;
use std::path::Path;
use std::sync::Arc;
use ublk_core::{Action, Attrs, DeviceParams, IoCtx, IoFlags, IoRequest, Op, QueueHandler, Target};

/// A qcow2 image exposed as a block device.
#[derive(Debug)]
pub struct Qcow2Target {
    image: Arc<Qcow2Image>,
}

impl Qcow2Target {
    /// Opens the image (and its backing chain); `read_only` opens it without write access.
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2Target> {
        let opts = Qcow2Options {
            writable: !read_only,
            ..Qcow2Options::default()
        };
        let image = Qcow2Image::open(path, &opts)?;
        Ok(Qcow2Target {
            image: Arc::new(image),
        })
    }

    /// The image.
    pub fn image(&self) -> &Qcow2Image {
        &self.image
    }

    /// Device parameters: virtual size, 512-byte logical blocks, cluster-sized optimal IO.
    pub fn params(&self) -> DeviceParams {
        let mut attrs = Attrs::VOLATILE_CACHE | Attrs::FUA;
        if self.image.is_read_only() {
            attrs |= Attrs::READ_ONLY;
        }
        let opt_shift = self.image.cluster_size().trailing_zeros().clamp(12, 20) as u8;
        DeviceParams {
            size: self.image.virtual_size(),
            io_opt_shift: opt_shift,
            attrs,
            ..DeviceParams::default()
        }
    }
}

impl Target for Qcow2Target {
    type Queue = Qcow2Queue;
    fn open_queue(&self, _q_id: u16) -> io::Result<Qcow2Queue> {
        Ok(Qcow2Queue {
            image: self.image.clone(),
        })
    }
}

/// The per-queue handler of [`Qcow2Target`].
#[derive(Debug)]
pub struct Qcow2Queue {
    image: Arc<Qcow2Image>,
}

impl QueueHandler for Qcow2Queue {
    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        let len = i32::try_from(req.len).unwrap_or(i32::MAX);
        let r = match req.op {
            Op::Read => self.image.read_at(ctx.buf(req.tag), req.offset),
            Op::Write => self
                .image
                .write_at(ctx.buf(req.tag), req.offset)
                .and_then(|()| {
                    if req.flags.contains(IoFlags::FUA) {
                        self.image.flush()
                    } else {
                        Ok(())
                    }
                }),
            Op::Flush => return done(self.image.flush(), 0),
            _ => return Action::Done(-libc::EOPNOTSUPP),
        };
        done(r, len)
    }
}

fn done(r: Result<()>, ok: i32) -> Action {
    match r {
        Ok(()) => Action::Done(ok),
        Err(e) => {
            log::warn!("qcow2: request failed: {e}");
            Action::Done(e.errno())
        }
    }
}
