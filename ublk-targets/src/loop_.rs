//! The loop target: a regular file or a block device as backing store.
//!
//! Reads and writes go through the queue's io_uring, with O_DIRECT by default (falling back to
//! buffered IO, with a warning, where the backing file system refuses it). FLUSH becomes
//! `fdatasync`, FUA writes use `RWF_DSYNC`, DISCARD punches a hole, WRITE_ZEROES zeroes the
//! range (punching when the kernel allows unmapping).
//!
//! On a memory-backed file system (tmpfs, ramfs) reads and writes are done inline on the queue
//! thread instead, where io_uring would hand each to a worker thread (`crate::memfile`,
//! [`LoopTarget::is_inline`]). On tmpfs the file is also mapped (`ublk_core::FileMap`) and, in
//! user-copy mode (the default there), the kernel copies each request's data straight between
//! the request and the file's pages: one copy and one system call, where going through the
//! request buffer takes two of each. Reads take that way only where the file holds data (a hole
//! read through the mapping would be allocated; `crate::memfile::Allocated`). A transfer the
//! mapping cannot do (past its end after a resize, past the end of a file that shrank, a full
//! file system) goes through the buffer as before.

use crate::memfile::{memory_backed, read_full_at, MappedFile};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use ublk_core::{
    Action, Attrs, DataMode, DeviceParams, DiscardParams, IoCtx, IoFlags, IoRequest, Op,
    QueueHandler, Target,
};

/// Errors opening a loop backing file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoopError {
    /// The backing file does not exist.
    #[error("backing file {0} does not exist")]
    NotFound(PathBuf),
    /// The backing file could not be opened.
    #[error("cannot open backing file {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The backing file is neither a regular file nor a block device, or is empty.
    #[error("backing file {path} is unusable: {why}")]
    Unusable {
        /// The path.
        path: PathBuf,
        /// Reason.
        why: String,
    },
}

/// How to open the backing file.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Buffered IO instead of O_DIRECT.
    pub buffered: bool,
    /// Expose a read-only device.
    pub read_only: bool,
}

/// A loop device's backing store, shared by all queues.
#[derive(Debug)]
pub struct LoopTarget {
    file: Arc<File>,
    params: DeviceParams,
    direct: bool,
    block_device: bool,
    inline: bool,
    /// The file mapped, on tmpfs (see the module documentation).
    map: Option<Arc<MappedFile>>,
}

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

impl LoopTarget {
    /// Opens the backing file and derives the device parameters from it.
    pub fn open(cfg: &LoopConfig) -> Result<LoopTarget, LoopError> {
        let path = &cfg.path;
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LoopError::NotFound(path.clone()),
            _ => LoopError::Open {
                path: path.clone(),
                source: e,
            },
        })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(LoopError::Unusable {
                path: path.clone(),
                why: "not a regular file or block device".into(),
            });
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!cfg.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let mut direct = !cfg.buffered;
        let mut file = match open(direct) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{}: O_DIRECT refused by the file system; using buffered IO",
                    path.display()
                );
                direct = false;
                open(false).map_err(|e| LoopError::Open {
                    path: path.clone(),
                    source: e,
                })?
            }
            Err(e) => {
                return Err(LoopError::Open {
                    path: path.clone(),
                    source: e,
                })
            }
        };
        let size = file.seek(SeekFrom::End(0)).map_err(|e| LoopError::Open {
            path: path.clone(),
            source: e,
        })?;
        let lbs = if block_device {
            sysfs_block_size(meta.rdev()).unwrap_or(512)
        } else {
            512
        };
        let lbs_shift = lbs.trailing_zeros() as u8;
        if size < lbs {
            return Err(LoopError::Unusable {
                path: path.clone(),
                why: format!("size {size} is smaller than one {lbs}-byte block"),
            });
        }
        let mut attrs = Attrs::VOLATILE_CACHE | Attrs::FUA;
        if cfg.read_only {
            attrs |= Attrs::READ_ONLY;
        }
        let params = DeviceParams {
            size,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: lbs_shift.max(12),
            io_min_shift: lbs_shift,
            io_opt_shift: 12,
            attrs,
            discard: (!cfg.read_only).then_some(DiscardParams {
                alignment: 0,
                granularity: 4096,
                max_discard_sectors: u32::MAX >> 9,
                max_write_zeroes_sectors: u32::MAX >> 9,
            }),
            ..DeviceParams::default()
        };
        let inline = !block_device && memory_backed(&file);
        let map = if inline {
            MappedFile::open(&file, size, !cfg.read_only).map(Arc::new)
        } else {
            None
        };
        log::info!(
            "loop: {} ({} bytes, {}, {}{})",
            path.display(),
            size,
            if direct { "direct" } else { "buffered" },
            if block_device { "block device" } else { "file" },
            match (inline, map.is_some()) {
                (true, true) => ", memory-backed: reads and writes inline, file mapped",
                (true, false) => ", memory-backed: reads and writes inline",
                _ => "",
            }
        );
        Ok(LoopTarget {
            file: Arc::new(file),
            params,
            direct,
            block_device,
            inline,
            map,
        })
    }

    /// The device parameters matching the backing file.
    pub fn params(&self) -> DeviceParams {
        self.params
    }

    /// Whether O_DIRECT is in use.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the backing store is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether reads and writes are done inline on the queue thread (memory-backed file
    /// systems) rather than through io_uring.
    pub fn is_inline(&self) -> bool {
        self.inline
    }

    /// Whether the backing file is mapped, so that in user-copy mode the kernel copies request
    /// data straight between the request and the file (memory-backed file systems).
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }
}

fn sysfs_block_size(rdev: u64) -> Option<u64> {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let p = format!("/sys/dev/block/{major}:{minor}/queue/logical_block_size");
    let v: u64 = std::fs::read_to_string(Path::new(&p))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (v.is_power_of_two() && (512..=4096).contains(&v)).then_some(v)
}

impl Target for LoopTarget {
    type Queue = LoopQueue;
    fn open_queue(&self, _q_id: u16) -> io::Result<LoopQueue> {
        Ok(LoopQueue {
            zero_range: true,
            file: self.file.clone(),
            inline: self.inline,
            map: self.map.clone(),
        })
    }

    /// User copy where the file is mapped (one copy per request, see the module
    /// documentation); copy mode otherwise.
    fn preferred_mode(&self) -> DataMode {
        if self.map.is_some() {
            DataMode::UserCopy
        } else {
            DataMode::Copy
        }
    }

    /// Reads and writes go through io_uring (never inline) and zeros are written from a
    /// buffer of the target's own.
    fn zero_copy(&self) -> Result<(), &'static str> {
        Ok(())
    }
}

/// The per-queue handler of [`LoopTarget`].
#[derive(Debug)]
pub struct LoopQueue {
    file: Arc<File>,
    /// Cleared once the backing file system refuses FALLOC_FL_ZERO_RANGE (e.g. tmpfs).
    zero_range: bool,
    /// Reads and writes inline (see the module documentation).
    inline: bool,
    /// The file mapped (see the module documentation).
    map: Option<Arc<MappedFile>>,
}

/// Marks the `data` of a write issued to emulate WRITE_ZEROES; the rest is sectors done before.
const ZERO_WRITE: u32 = 1 << 31;

impl LoopQueue {
    /// User copy through the mapping: the kernel copies between the request and the file.
    /// Falls back to the buffer (`transfer_inline`) where the mapping cannot do it.
    fn transfer_mapped(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, m: &MappedFile) -> Action {
        let r = match req.op {
            Op::Read => ctx.copy_read_data_from(req.tag, 0, &m.map, req.offset, req.len),
            _ => ctx
                .copy_write_data_to(req.tag, 0, &m.map, req.offset, req.len)
                .inspect(|()| m.allocated.insert(req.offset, req.len.into())),
        };
        match r {
            Ok(()) if req.op == Op::Write && req.flags.contains(IoFlags::FUA) => {
                match self.file.sync_data() {
                    Ok(()) => Action::Done(req.len as i32),
                    Err(e) => Action::from_error(&e),
                }
            }
            Ok(()) => Action::Done(req.len as i32),
            Err(e) => {
                // Past the end of a file that shrank, or no room left for the pages: the
                // buffered path reads zeros or reports the file system's error.
                log::debug!(
                    "loop: mapped {:?} at {} failed ({e}); going through the buffer",
                    req.op,
                    req.offset
                );
                if req.op == Op::Write {
                    if let Err(e) = ctx.fetch_write_data(req.tag) {
                        log::error!("loop: user copy of WRITE data failed: {e}");
                        return Action::Done(-libc::EIO);
                    }
                }
                self.transfer_inline(ctx, req)
            }
        }
    }

    /// Reads or writes the whole of `req` synchronously (memory-backed files).
    fn transfer_inline(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        let buf = ctx.buf(req.tag);
        if buf.len() != req.len as usize {
            return Action::Done(-libc::EINVAL);
        }
        let r = match req.op {
            Op::Read => read_full_at(&self.file, buf, req.offset),
            _ => self.file.write_all_at(buf, req.offset).and_then(|()| {
                if let Some(m) = &self.map {
                    m.allocated.insert(req.offset, req.len.into());
                }
                if req.flags.contains(IoFlags::FUA) {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            }),
        };
        match r {
            Ok(()) => Action::Done(req.len as i32),
            Err(e) => Action::from_error(&e),
        }
    }

    /// Starts (or continues, after a short transfer) the data transfer of `req` at `done`.
    fn transfer(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, done: u32) -> Action {
        let fd = self.file.as_fd();
        let (off, len) = (req.offset + u64::from(done), req.len - done);
        let r = match req.op {
            Op::Read => ctx.read_at(req.tag, fd, off, done, len, done),
            _ => ctx.write_at(
                req.tag,
                fd,
                off,
                done,
                len,
                req.flags.contains(IoFlags::FUA),
                done,
            ),
        };
        match r {
            Ok(()) => Action::Pending,
            Err(e) => Action::from_error(&e),
        }
    }
}

impl LoopQueue {
    /// WRITE_ZEROES by writing zeros from the request buffer, for file systems without
    /// FALLOC_FL_ZERO_RANGE (or without hole punching). `done` bytes are already zeroed.
    fn write_zeroes(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, done: u64) -> Action {
        let left = u64::from(req.len) - done;
        if left == 0 {
            return Action::Done(0);
        }
        if ctx.zero_copy() {
            // No request buffer to fill: write zeros of our own, synchronously (a fallback for
            // file systems without FALLOC_FL_ZERO_RANGE).
            return match write_zeros_at(&self.file, req.offset + done, left, req.flags) {
                Ok(()) => Action::Done(0),
                Err(e) => Action::from_error(&e),
            };
        }
        let buf = ctx.buf(req.tag);
        if done == 0 {
            buf.fill(0);
        }
        let chunk = left.min(buf.len() as u64) as u32;
        if chunk == 0 {
            return Action::Done(-libc::EIO);
        }
        let fua = req.flags.contains(IoFlags::FUA);
        let data = ZERO_WRITE | (done >> 9) as u32;
        match ctx.write_at(
            req.tag,
            self.file.as_fd(),
            req.offset + done,
            0,
            chunk,
            fua,
            data,
        ) {
            Ok(()) => Action::Pending,
            Err(e) => Action::from_error(&e),
        }
    }

    fn write_zeroes_done(
        &mut self,
        ctx: &mut IoCtx<'_>,
        req: &IoRequest,
        data: u32,
        res: i32,
    ) -> Action {
        if data & ZERO_WRITE == 0 {
            // The fallocate finished.
            if res == -libc::EOPNOTSUPP {
                if req.flags.contains(IoFlags::NOUNMAP) {
                    log::info!("loop: backing file system lacks FALLOC_FL_ZERO_RANGE; writing zeros instead");
                    self.zero_range = false;
                }
                return self.write_zeroes(ctx, req, 0);
            }
            return Action::Done(res.min(0));
        }
        if res <= 0 {
            return Action::Done(if res == 0 { -libc::EIO } else { res });
        }
        let before = u64::from(data & !ZERO_WRITE) << 9;
        // Progress is kept in sectors; a short write's odd tail is simply written again.
        let done = (before + res as u64) & !511;
        if done == before {
            return Action::Done(-libc::EIO);
        }
        self.write_zeroes(ctx, req, done)
    }
}

/// Writes `len` zero bytes at `off` (then `fdatasync` for FUA).
fn write_zeros_at(file: &File, mut off: u64, mut len: u64, flags: IoFlags) -> io::Result<()> {
    /// Page aligned, for O_DIRECT.
    #[repr(align(4096))]
    struct Zeros([u8; 64 << 10]);
    static ZEROS: Zeros = Zeros([0; 64 << 10]);
    while len > 0 {
        let n = len.min(ZEROS.0.len() as u64);
        file.write_all_at(&ZEROS.0[..n as usize], off)?;
        off += n;
        len -= n;
    }
    if flags.contains(IoFlags::FUA) {
        file.sync_data()?;
    }
    Ok(())
}

impl QueueHandler for LoopQueue {
    fn moves_data(&mut self, req: &IoRequest) -> bool {
        let Some(m) = &self.map else { return false };
        let len = u64::from(req.len);
        match req.op {
            Op::Read => m.readable(&self.file, req.offset, len),
            Op::Write => m.writable(req.offset, len),
            _ => false,
        }
    }

    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        if ctx.handler_moves(req.tag) {
            if let Some(m) = self.map.clone() {
                return self.transfer_mapped(ctx, req, &m);
            }
        }
        let punches = req.op == Op::Discard
            || (req.op == Op::WriteZeroes && !req.flags.contains(IoFlags::NOUNMAP));
        if punches {
            // The range becomes holes: its reads must not go through the mapping.
            if let Some(m) = &self.map {
                m.allocated.remove(req.offset, req.len.into());
            }
        }
        let fd = self.file.as_fd();
        let r = match req.op {
            Op::Read | Op::Write if self.inline && !ctx.zero_copy() => {
                return self.transfer_inline(ctx, req)
            }
            Op::Read | Op::Write => return self.transfer(ctx, req, 0),
            Op::Flush => ctx.fsync(req.tag, fd, true, 0),
            Op::Discard => ctx.fallocate(
                req.tag,
                fd,
                FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                req.offset,
                req.len.into(),
                0,
            ),
            Op::WriteZeroes => {
                let mode = if req.flags.contains(IoFlags::NOUNMAP) {
                    if !self.zero_range {
                        return self.write_zeroes(ctx, req, 0);
                    }
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                } else {
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                };
                ctx.fallocate(req.tag, fd, mode, req.offset, req.len.into(), 0)
            }
            _ => return Action::Done(-libc::EOPNOTSUPP),
        };
        match r {
            Ok(()) => Action::Pending,
            Err(e) => Action::from_error(&e),
        }
    }

    fn on_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, done: u32, res: i32) -> Action {
        if req.op == Op::WriteZeroes {
            return self.write_zeroes_done(ctx, req, done, res);
        }
        if res < 0 {
            return Action::Done(res);
        }
        if !matches!(req.op, Op::Read | Op::Write) {
            return Action::Done(0);
        }
        let total = done.saturating_add(res as u32);
        if total >= req.len {
            return Action::Done(req.len as i32);
        }
        if res == 0 {
            if req.op == Op::Write {
                return Action::Done(-libc::EIO);
            }
            // Reading past the end of a file that shrank: the rest is zeros.
            if ctx.zero_copy() {
                log::warn!(
                    "loop: read at {} past the end of the backing file; failing it (zero copy cannot fill zeros)",
                    req.offset + u64::from(total)
                );
                return Action::Done(-libc::EIO);
            }
            ctx.buf(req.tag)[total as usize..].fill(0);
            return Action::Done(req.len as i32);
        }
        self.transfer(ctx, req, total)
    }
}
