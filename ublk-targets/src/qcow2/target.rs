//! The ublk side of qcow2: a [`Target`] serving a [`Qcow2Image`].
//!
//! # Data path
//!
//! A READ is split by the engine's metadata lookup into pieces: data clusters (of this image,
//! of qcow2 backing files, or of a raw backing file) become io_uring reads into the request
//! buffer; zero and unallocated-without-backing pieces are zero-filled; compressed clusters
//! are decompressed synchronously. A WRITE that lies entirely in clusters allocated with
//! COPIED (refcount 1) goes to io_uring in place; any other write (allocation, copy-on-write
//! from the backing file, zero, compressed or shared clusters, subclusters) is copied out of
//! the request buffer and handed whole to the queue's *allocation worker* thread, which runs
//! the synchronous engine and completes the request through the queue's `Completer`.
//! Transfers to or from memory-backed files (tmpfs) are done inline on the queue thread
//! instead of through io_uring (`crate::memfile`). Short transfers are continued; a read that
//! hits the end of the file reads zeros past it (clusters preallocated beyond EOF); a write that
//! makes no progress fails the request.
//!
//! On tmpfs the image file is also mapped and, in user copy (the default there), a READ made
//! only of zeros and data clusters of the image itself that hold data, and an in-place WRITE,
//! go straight between the request and the file's pages (`ublk_core::FileMap`): one copy where
//! the buffer takes two. Anything else (backing files, compressed clusters, allocating writes,
//! a failed mapped copy) goes through the request buffer as above.
//!
//! FLUSH (metadata write-back in dependency order, then `fdatasync`, which also covers data
//! written through io_uring), DISCARD and WRITE_ZEROES (whole clusters, see the engine) run on
//! the allocation worker too, so the queue thread never waits for the allocation lock or a
//! sync and keeps serving reads and in-place writes. A FUA write uses `RWF_DSYNC` when it
//! only wrote in place and no metadata is waiting for write-back; otherwise it is followed by
//! a flush.
//!
//! # Concurrency
//!
//! Each request registers with the image before its lookup and deregisters when its last
//! io_uring operation finished, so a host cluster unlinked by a concurrent discard,
//! write-zeroes or copy-on-write is not reused (for data or metadata) while an operation that
//! looked up its old mapping may still read or write it. A read racing a write, discard or
//! write-zeroes of the same range sees the old or the new content of each cluster, never
//! another cluster's data: allocations write the whole new cluster before the L2 entry points
//! at it. Overlapping writes issued concurrently land in an unspecified order, as on any
//! block device.

use super::image::{ReadPiece, ReadSource};
use super::{Qcow2Image, Qcow2Options, Result};
use crate::memfile::{memory_backed, read_full_at, MappedFile, ZEROS};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use ublk_core::{
    Action, Attrs, Completer, DeviceParams, DiscardParams, IoCtx, IoFlags, IoRequest, Op,
    QueueHandler, Target,
};

use super::entry::Mapping;

/// Largest DISCARD / WRITE_ZEROES request (bytes): bounds the time a request holds a queue
/// and the refcount drops it leaves pending.
const MAX_DISCARD_BYTES: u32 = 256 << 20;

/// A qcow2 image exposed as a block device.
#[derive(Debug)]
pub struct Qcow2Target {
    image: Arc<Qcow2Image>,
    /// Per chain layer: on a memory-backed file system, so transfers are done inline.
    inline: Arc<[bool]>,
    /// The image file mapped, on tmpfs: in user-copy mode reads and in-place writes then go
    /// straight between the request and the file (see `crate::memfile`).
    mapped: Option<Arc<MappedFile>>,
    /// Metadata changes leave the daemon's memory before their request completes (see
    /// [`Qcow2Target::set_survive_daemon`]).
    survive_daemon: bool,
}

impl Qcow2Target {
    /// Opens the image (and its backing chain); `read_only` opens it without write access.
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2Target> {
        let opts = Qcow2Options {
            writable: !read_only,
            ..Qcow2Options::default()
        };
        Self::open_with(path, &opts)
    }

    /// Opens the image (and its backing chain) with `opts`.
    pub fn open_with(path: &Path, opts: &Qcow2Options) -> Result<Qcow2Target> {
        let image = Qcow2Image::open(path, opts)?;
        Ok(Qcow2Target::from_image(image))
    }

    /// Serves an already opened image.
    pub fn from_image(image: Qcow2Image) -> Qcow2Target {
        let inline: Arc<[bool]> = (0..image.chain_depth())
            .map(|l| {
                u8::try_from(l)
                    .ok()
                    .and_then(|l| image.layer_file(l))
                    .is_some_and(memory_backed)
            })
            .collect();
        if inline.contains(&true) {
            log::info!("qcow2: memory-backed image files ({inline:?} by layer): transfers inline");
        }
        // The file grows as clusters are allocated: the mapping reaches past its end, up to
        // the virtual size and room for metadata (only address space: nothing is reserved).
        let mapped = image.layer_file(0).and_then(|f| {
            let file_len = f.metadata().ok()?.len();
            let virt = image.virtual_size();
            let len = file_len.max(virt.saturating_add(virt / 4).saturating_add(256 << 20));
            MappedFile::open(f, len, !image.is_read_only())
                .or_else(|| MappedFile::open(f, file_len, !image.is_read_only()))
                .map(Arc::new)
        });
        if mapped.is_some() {
            log::info!("qcow2: image file mapped (user copy goes straight to and from it)");
        }
        Qcow2Target {
            image: Arc::new(image),
            inline,
            mapped,
            survive_daemon: false,
        }
    }

    /// For a device that outlives its daemon (user recovery): no request that changed metadata
    /// (allocating or copy-on-write writes, discard, write-zeroes) completes before that
    /// metadata is written back. Otherwise the cached L2 and refcount updates of completed
    /// writes, which only a FLUSH writes back, would die with the daemon while the device, and
    /// the file system on it, carry on: acknowledged writes would read back as they were
    /// before. The allocation worker writes back once per batch of such requests (the usual
    /// ordered write-back with its syncs, so power-loss safety is unchanged); writes into
    /// allocated clusters go to the file directly and need nothing.
    pub fn set_survive_daemon(&mut self, on: bool) {
        self.survive_daemon = on;
    }

    /// Whether the image file is mapped, so that in user-copy mode the kernel copies request
    /// data straight between the request and the file (tmpfs).
    pub fn is_mapped(&self) -> bool {
        self.mapped.is_some()
    }

    /// The image.
    pub fn image(&self) -> &Qcow2Image {
        &self.image
    }

    /// Device parameters: virtual size, 512-byte logical blocks, cluster-sized optimal IO,
    /// discard and write-zeroes in whole clusters (writable images).
    pub fn params(&self) -> DeviceParams {
        let mut attrs = Attrs::VOLATILE_CACHE | Attrs::FUA;
        if self.image.is_read_only() {
            attrs |= Attrs::READ_ONLY;
        }
        let cs = self.image.cluster_size();
        let opt_shift = cs.trailing_zeros().clamp(12, 20) as u8;
        let discard = (!self.image.is_read_only()).then_some(DiscardParams {
            alignment: 0,
            granularity: u32::try_from(cs).unwrap_or(u32::MAX),
            max_discard_sectors: MAX_DISCARD_BYTES >> 9,
            max_write_zeroes_sectors: MAX_DISCARD_BYTES >> 9,
        });
        DeviceParams {
            size: self.image.virtual_size(),
            io_opt_shift: opt_shift,
            attrs,
            discard,
            ..DeviceParams::default()
        }
    }
}

impl Target for Qcow2Target {
    type Queue = Qcow2Queue;

    /// User copy where the image file is mapped (see [`Qcow2Target`]); copy mode otherwise.
    fn preferred_mode(&self) -> ublk_core::DataMode {
        if self.mapped.is_some() {
            ublk_core::DataMode::UserCopy
        } else {
            ublk_core::DataMode::Copy
        }
    }

    fn open_queue(&self, q_id: u16) -> io::Result<Qcow2Queue> {
        let worker = if self.image.is_read_only() {
            None
        } else {
            let (tx, rx) = mpsc::channel::<Job>();
            let image = self.image.clone();
            let write_back = self.survive_daemon;
            let handle = std::thread::Builder::new()
                .name(format!("qcow2-alloc-{q_id}"))
                .spawn(move || worker_loop(&image, &rx, write_back))?;
            Some((tx, handle))
        };
        Ok(Qcow2Queue {
            image: self.image.clone(),
            inline: self.inline.clone(),
            mapped: self.mapped.clone(),
            tags: Vec::new(),
            pieces: Vec::new(),
            worker,
        })
    }
}

/// Work the queue thread hands to its allocation worker.
#[derive(Debug)]
enum JobKind {
    /// A write that allocates or copies clusters (the whole request, data copied out of the
    /// request buffer); `fua` flushes afterwards.
    Write { data: Vec<u8>, fua: bool },
    /// Discard.
    Discard,
    /// Write-zeroes; `keep` is NOUNMAP.
    WriteZeroes { keep: bool, fua: bool },
    /// Flush (metadata write-back and fdatasync).
    Flush,
}

#[derive(Debug)]
struct Job {
    tag: u16,
    offset: u64,
    len: u32,
    kind: JobKind,
    completer: Completer,
}

/// The allocation worker of one queue: runs the engine for requests that need the allocation
/// lock (allocating writes, discard, write-zeroes), so that the queue thread keeps serving
/// reads and in-place writes meanwhile, and completes them through the queue's [`Completer`].
///
/// With `write_back` ([`Qcow2Target::set_survive_daemon`]) it takes every job waiting, runs
/// them, writes the metadata they changed back (one flush for the batch) and only then
/// completes them; a failed write-back fails the batch's successful requests with its errno.
fn worker_loop(image: &Qcow2Image, rx: &mpsc::Receiver<Job>, write_back: bool) {
    let mut batch = Vec::new();
    while let Ok(job) = rx.recv() {
        batch.push(job);
        if write_back {
            batch.extend(rx.try_iter());
        }
        let results: Vec<Result<()>> = batch.iter().map(|job| run_job(image, job)).collect();
        // The errno of a failed write-back, for every request of the batch that succeeded.
        let write_back_err = (write_back && image.metadata_dirty())
            .then(|| image.flush().err())
            .flatten()
            .map(|e| errno_of(&e));
        for (job, r) in batch.drain(..).zip(results) {
            let res = match (r, &job.kind, write_back_err) {
                (Err(e), _, _) => errno_of(&e),
                (Ok(()), _, Some(errno)) => errno,
                (Ok(()), JobKind::Write { .. }, None) => i32::try_from(job.len).unwrap_or(i32::MAX),
                (Ok(()), _, None) => 0,
            };
            job.completer.complete(job.tag, res);
        }
    }
}

/// Runs one allocation worker job.
fn run_job(image: &Qcow2Image, job: &Job) -> Result<()> {
    let len = u64::from(job.len);
    match &job.kind {
        JobKind::Write { data, fua } => {
            image
                .write_at(data, job.offset)
                .and_then(|()| if *fua { image.flush() } else { Ok(()) })
        }
        JobKind::Discard => image.discard(job.offset, len),
        JobKind::WriteZeroes { keep, fua } => image
            .write_zeroes(job.offset, len, *keep)
            .and_then(|()| if *fua { image.flush() } else { Ok(()) }),
        JobKind::Flush => image.flush(),
    }
}

/// One io_uring transfer of a request.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    /// Chain layer whose file is read (always 0 for writes).
    layer: u8,
    file_off: u64,
    buf_off: u32,
    len: u32,
    /// Bytes transferred so far.
    done: u32,
}

/// A request with io_uring transfers in flight.
#[derive(Debug)]
struct InFlight {
    /// Registration with the image (see the `inflight` module).
    token: u64,
    transfers: Vec<Transfer>,
    /// Transfers not finished yet.
    outstanding: usize,
    /// First error.
    error: Option<i32>,
    /// Buffer ranges to zero once every transfer finished (reads past the end of a file).
    zero_fill: Vec<(u32, u32)>,
    /// RWF_DSYNC on the writes.
    dsync: bool,
    /// Flush the image before completing (FUA after metadata changes).
    flush: bool,
}

/// The per-queue handler of [`Qcow2Target`].
#[derive(Debug)]
pub struct Qcow2Queue {
    image: Arc<Qcow2Image>,
    /// See [`Qcow2Target`].
    inline: Arc<[bool]>,
    /// See [`Qcow2Target`].
    mapped: Option<Arc<MappedFile>>,
    /// Requests with transfers in flight, by tag.
    tags: Vec<Option<InFlight>>,
    /// Scratch for read planning.
    pieces: Vec<ReadPiece>,
    /// The allocation worker (writable images).
    worker: Option<(mpsc::Sender<Job>, JoinHandle<()>)>,
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.worker.take() {
            drop(tx);
            if handle.join().is_err() {
                log::error!("qcow2: the allocation worker panicked");
            }
        }
    }
}

fn errno_of(e: &super::Qcow2Error) -> i32 {
    log::warn!("qcow2: request failed: {e}");
    e.errno()
}

fn done(r: Result<()>, ok: i32) -> Action {
    match r {
        Ok(()) => Action::Done(ok),
        Err(e) => Action::Done(errno_of(&e)),
    }
}

impl Qcow2Queue {
    fn in_range(&self, req: &IoRequest) -> bool {
        req.offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= self.image.virtual_size())
    }

    fn read(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        let token = self.image.io_begin();
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
        let planned = self
            .image
            .plan_read(req.offset, u64::from(req.len), &mut pieces);
        if planned.is_ok() && self.read_mapped(ctx, req, &pieces) {
            self.pieces = pieces;
            self.image.io_end(token);
            return Action::Done(i32::try_from(req.len).unwrap_or(i32::MAX));
        }
        let mut transfers = Vec::new();
        let r = planned.and_then(|()| {
            let buf = ctx.buf(req.tag);
            for p in &pieces {
                let at = (p.guest - req.offset) as usize;
                let chunk = &mut buf[at..at + p.len as usize];
                match p.src {
                    ReadSource::Zero => chunk.fill(0),
                    ReadSource::Engine { layer } => match self.image.layer_image(layer) {
                        Some(img) => img.read_at(chunk, p.guest)?,
                        None => return Err(layer_missing()),
                    },
                    ReadSource::File { layer, host } => transfers.push(Transfer {
                        layer,
                        file_off: host,
                        buf_off: at as u32,
                        len: p.len as u32,
                        done: 0,
                    }),
                }
            }
            Ok(())
        });
        self.pieces = pieces;
        if let Err(e) = r {
            self.image.io_end(token);
            return Action::Done(errno_of(&e));
        }
        self.start(ctx, req, token, transfers, false, false)
    }

    /// The mapping, if the handler moves `req`'s data itself through it (user copy).
    fn mapping(&self, ctx: &IoCtx<'_>, req: &IoRequest) -> Option<Arc<MappedFile>> {
        self.mapped.clone().filter(|_| ctx.handler_moves(req.tag))
    }

    /// Delivers a READ planned as `pieces` through the mapping, if every piece is zeros or
    /// data of the image file itself; false if it cannot (the buffer path then does it all).
    fn read_mapped(&self, ctx: &mut IoCtx<'_>, req: &IoRequest, pieces: &[ReadPiece]) -> bool {
        let (Some(m), Some(file)) = (self.mapping(ctx, req), self.image.layer_file(0)) else {
            return false;
        };
        let mappable = pieces.iter().all(|p| match p.src {
            ReadSource::Zero => true,
            ReadSource::File { layer: 0, host } => m.readable(file, host, p.len),
            _ => false,
        });
        if !mappable {
            return false;
        }
        let r = pieces.iter().try_for_each(|p| {
            let at = (p.guest - req.offset) as u32;
            match p.src {
                ReadSource::File { host, .. } => {
                    ctx.copy_read_data_from(req.tag, at, &m.map, host, p.len as u32)
                }
                _ => {
                    let mut done = 0;
                    while done < p.len as usize {
                        let n = (p.len as usize - done).min(ZEROS.len());
                        ctx.copy_read_data(req.tag, at + done as u32, &ZEROS[..n])?;
                        done += n;
                    }
                    Ok(())
                }
            }
        });
        r.inspect_err(|e| log::debug!("qcow2: mapped read at {} failed ({e})", req.offset))
            .is_ok()
    }

    /// Writes an in-place WRITE (`transfers`, all in the image file) through the mapping;
    /// None if it cannot (the request's data is then in the buffer for the usual path).
    fn write_mapped(
        &self,
        ctx: &mut IoCtx<'_>,
        req: &IoRequest,
        transfers: &[Transfer],
        flush: bool,
    ) -> Option<Action> {
        let m = self.mapping(ctx, req)?;
        let r = transfers.iter().try_for_each(|t| {
            if !m.writable(t.file_off, t.len.into()) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            ctx.copy_write_data_to(req.tag, t.buf_off, &m.map, t.file_off, t.len)?;
            m.allocated.insert(t.file_off, t.len.into());
            Ok(())
        });
        if let Err(e) = r {
            log::debug!("qcow2: mapped write at {} failed ({e})", req.offset);
            return self.fetch(ctx, req).err();
        }
        let synced = if flush {
            self.image.flush().map_err(|e| errno_of(&e))
        } else if req.flags.contains(IoFlags::FUA) {
            self.image
                .layer_file(0)
                .map_or(Ok(()), |f| f.sync_data())
                .map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))
        } else {
            Ok(())
        };
        Some(Action::Done(match synced {
            Ok(()) => i32::try_from(req.len).unwrap_or(i32::MAX),
            Err(errno) => errno,
        }))
    }

    /// Brings a WRITE's data into the request buffer if the handler was to move it itself;
    /// `Err(Done(-EIO))` if that fails.
    fn fetch(&self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> std::result::Result<(), Action> {
        if !ctx.handler_moves(req.tag) {
            return Ok(());
        }
        ctx.fetch_write_data(req.tag).map_err(|e| {
            log::error!("qcow2: user copy of WRITE data failed: {e}");
            Action::Done(-libc::EIO)
        })
    }

    fn write(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        if self.image.is_read_only() {
            return Action::Done(-libc::EROFS);
        }
        let fua = req.flags.contains(IoFlags::FUA);
        let token = self.image.io_begin();
        let mut transfers = Vec::new();
        let r = (|| {
            let mut pos = 0u64;
            let len = u64::from(req.len);
            while pos < len {
                let (m, n) = self.image.map_extent(req.offset + pos, len - pos)?;
                match m {
                    Mapping::Data { host, copied: true } => transfers.push(Transfer {
                        layer: 0,
                        file_off: host,
                        buf_off: pos as u32,
                        len: n as u32,
                        done: 0,
                    }),
                    // Allocation or copy-on-write needed: the whole request goes to the
                    // allocation worker (which writes the in-place parts too).
                    _ => return Ok(false),
                }
                pos += n;
            }
            Ok(true)
        })();
        match r {
            Err(e) => {
                self.image.io_end(token);
                Action::Done(errno_of(&e))
            }
            Ok(false) => {
                self.image.io_end(token);
                if let Err(a) = self.fetch(ctx, req) {
                    return a;
                }
                let data = ctx.buf(req.tag).to_vec();
                self.to_worker(ctx, req, JobKind::Write { data, fua })
                    .unwrap_or_else(|| {
                        let r = self
                            .image
                            .write_at(ctx.buf(req.tag), req.offset)
                            .and_then(|()| if fua { self.image.flush() } else { Ok(()) });
                        done(r, i32::try_from(req.len).unwrap_or(i32::MAX))
                    })
            }
            Ok(true) => {
                let flush = fua && self.image.metadata_dirty();
                if let Some(a) = self.write_mapped(ctx, req, &transfers, flush) {
                    self.image.io_end(token);
                    return a;
                }
                if let Err(a) = self.fetch(ctx, req) {
                    self.image.io_end(token);
                    return a;
                }
                self.start(ctx, req, token, transfers, fua && !flush, flush)
            }
        }
    }

    /// Hands a request to the allocation worker; None if there is no worker (any more).
    fn to_worker(&self, ctx: &IoCtx<'_>, req: &IoRequest, kind: JobKind) -> Option<Action> {
        let (tx, _) = self.worker.as_ref()?;
        let job = Job {
            tag: req.tag,
            offset: req.offset,
            len: req.len,
            kind,
            completer: ctx.completer(),
        };
        match tx.send(job) {
            Ok(()) => Some(Action::Pending),
            Err(_) => {
                log::error!("qcow2: the allocation worker is gone; running on the queue thread");
                None
            }
        }
    }

    /// Submits the transfers of `req` (or finishes it at once when there are none).
    fn start(
        &mut self,
        ctx: &mut IoCtx<'_>,
        req: &IoRequest,
        token: u64,
        transfers: Vec<Transfer>,
        dsync: bool,
        flush: bool,
    ) -> Action {
        let mut st = InFlight {
            token,
            outstanding: 0,
            error: None,
            zero_fill: Vec::new(),
            dsync,
            flush,
            transfers,
        };
        self.transfer_inline(ctx, req, &mut st);
        for i in 0..st.transfers.len() {
            if st.error.is_some() {
                break;
            }
            match self.submit(ctx, req, &st, i) {
                Ok(()) => st.outstanding += 1,
                Err(e) => {
                    st.error = Some(-e.raw_os_error().unwrap_or(libc::EIO));
                    break;
                }
            }
        }
        if st.outstanding == 0 {
            return self.finish(ctx, req, st);
        }
        let slot = usize::from(req.tag);
        if self.tags.len() <= slot {
            self.tags.resize_with(slot + 1, || None);
        }
        self.tags[slot] = Some(st);
        Action::Pending
    }

    /// Does (and removes) the transfers of `st` whose file is memory-backed, synchronously:
    /// io_uring would hand each to a worker thread (see `crate::memfile`). Runs before any
    /// operation of the request is submitted, while the request buffer is accessible.
    fn transfer_inline(&self, ctx: &mut IoCtx<'_>, req: &IoRequest, st: &mut InFlight) {
        if !self.inline.contains(&true) {
            return;
        }
        let buf = ctx.buf(req.tag);
        let (image, inline, dsync) = (&self.image, &self.inline, st.dsync);
        let mut error = None;
        st.transfers.retain(|t| {
            if !inline.get(usize::from(t.layer)).copied().unwrap_or(false) {
                return true;
            }
            if error.is_some() {
                return false;
            }
            let range = t.buf_off as usize..(t.buf_off as usize + t.len as usize);
            let (Some(file), Some(chunk)) = (image.layer_file(t.layer), buf.get_mut(range)) else {
                error = Some(-libc::EIO);
                return false;
            };
            let r = if req.op == Op::Read {
                read_full_at(file, chunk, t.file_off)
            } else {
                file.write_all_at(chunk, t.file_off).and_then(|()| {
                    if dsync {
                        file.sync_data()
                    } else {
                        Ok(())
                    }
                })
            };
            if let Err(e) = r {
                error = Some(-e.raw_os_error().unwrap_or(libc::EIO));
            }
            false
        });
        if let Some(e) = error {
            st.error.get_or_insert(e);
        }
    }

    /// Submits (the rest of) transfer `i`.
    fn submit(
        &self,
        ctx: &mut IoCtx<'_>,
        req: &IoRequest,
        st: &InFlight,
        i: usize,
    ) -> io::Result<()> {
        let t = st.transfers[i];
        let file = self
            .image
            .layer_file(t.layer)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        let (off, buf_off, len) = (
            t.file_off + u64::from(t.done),
            t.buf_off + t.done,
            t.len - t.done,
        );
        let data = i as u32;
        if req.op == Op::Read {
            ctx.read_at(req.tag, file.as_fd(), off, buf_off, len, data)
        } else {
            ctx.write_at(req.tag, file.as_fd(), off, buf_off, len, st.dsync, data)
        }
    }

    /// Every transfer of `req` finished: zero-fill, flush if needed, complete.
    fn finish(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, st: InFlight) -> Action {
        let mut res = st.error;
        if res.is_none() && !st.zero_fill.is_empty() {
            let buf = ctx.buf(req.tag);
            for &(at, n) in &st.zero_fill {
                match buf.get_mut(at as usize..(at + n) as usize) {
                    Some(b) => b.fill(0),
                    None => res = Some(-libc::EIO),
                }
            }
        }
        if res.is_none() && st.flush {
            if let Err(e) = self.image.flush() {
                res = Some(errno_of(&e));
            }
        }
        self.image.io_end(st.token);
        Action::Done(res.unwrap_or(i32::try_from(req.len).unwrap_or(i32::MAX)))
    }
}

fn layer_missing() -> super::Qcow2Error {
    super::Qcow2Error::Corrupt("backing chain layer vanished".into())
}

impl QueueHandler for Qcow2Queue {
    /// Through the mapping where the image file is mapped; each request falls back to the
    /// buffer where it cannot (backing files, compressed clusters, allocating writes).
    fn moves_data(&mut self, req: &IoRequest) -> bool {
        self.mapped.is_some() && (req.op == Op::Read || !self.image.is_read_only())
    }

    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        match req.op {
            Op::Read | Op::Write | Op::Discard | Op::WriteZeroes if !self.in_range(req) => {
                Action::Done(-libc::EINVAL)
            }
            Op::Read => self.read(ctx, req),
            Op::Write => self.write(ctx, req),
            Op::Flush => self
                .to_worker(ctx, req, JobKind::Flush)
                .unwrap_or_else(|| done(self.image.flush(), 0)),
            Op::Discard => self
                .to_worker(ctx, req, JobKind::Discard)
                .unwrap_or_else(|| done(self.image.discard(req.offset, u64::from(req.len)), 0)),
            Op::WriteZeroes => {
                let keep = req.flags.contains(IoFlags::NOUNMAP);
                let fua = req.flags.contains(IoFlags::FUA);
                if let Some(a) = self.to_worker(ctx, req, JobKind::WriteZeroes { keep, fua }) {
                    return a;
                }
                let r = self
                    .image
                    .write_zeroes(req.offset, u64::from(req.len), keep)
                    .and_then(|()| {
                        if req.flags.contains(IoFlags::FUA) {
                            self.image.flush()
                        } else {
                            Ok(())
                        }
                    });
                done(r, 0)
            }
            _ => Action::Done(-libc::EOPNOTSUPP),
        }
    }

    fn on_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, data: u32, res: i32) -> Action {
        let slot = usize::from(req.tag);
        let Some(mut st) = self.tags.get_mut(slot).and_then(Option::take) else {
            log::error!("qcow2: completion for tag {} without a request", req.tag);
            return Action::Done(-libc::EIO);
        };
        let i = data as usize;
        let Some(t) = st.transfers.get_mut(i) else {
            log::error!(
                "qcow2: completion for unknown transfer {i} of tag {}",
                req.tag
            );
            st.error.get_or_insert(-libc::EIO);
            st.outstanding = st.outstanding.saturating_sub(1);
            return self.park_or_finish(ctx, req, st);
        };
        let mut finished = true;
        if res < 0 {
            st.error.get_or_insert(res);
        } else if res == 0 {
            if req.op == Op::Read {
                // End of file: clusters allocated past it read as zeros.
                st.zero_fill.push((t.buf_off + t.done, t.len - t.done));
            } else {
                st.error.get_or_insert(-libc::EIO);
            }
        } else {
            t.done = t.done.saturating_add(res as u32).min(t.len);
            if t.done < t.len && st.error.is_none() {
                match self.submit(ctx, req, &st, i) {
                    Ok(()) => finished = false,
                    Err(e) => {
                        st.error
                            .get_or_insert(-e.raw_os_error().unwrap_or(libc::EIO));
                    }
                }
            }
        }
        if finished {
            st.outstanding = st.outstanding.saturating_sub(1);
        }
        self.park_or_finish(ctx, req, st)
    }
}

impl Qcow2Queue {
    fn park_or_finish(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, st: InFlight) -> Action {
        if st.outstanding > 0 {
            self.tags[usize::from(req.tag)] = Some(st);
            return Action::Pending;
        }
        self.finish(ctx, req, st)
    }
}
