//! The ublk side of NBD: a [`Target`] whose queues send requests over NBD connections.
//!
//! One connection per queue when the server sets `NBD_FLAG_CAN_MULTI_CONN`, otherwise one
//! connection shared by all queues (the spec says clients SHOULD NOT multiplex over several
//! connections without it). Two engines ([`Engine`]):
//!
//! * [`Engine::Ring`] (the default): each queue's own connection is driven by the
//!   queue thread on its io_uring ([`RingQueue`]); used whenever every queue has a connection
//!   of its own and the socket carries plaintext for us (no TLS, or TLS handed to the kernel).
//! * [`Engine::Threads`], and the fallback for TLS in user space or a connection shared by
//!   several queues:
//!   requests are submitted from the queue thread to a [`Client`] (writer and reader threads);
//!   completions come back from the reader thread through ublk-core's [`Completer`].
//!
//! # Buffers (threaded engine)
//!
//! The request buffer ([`IoCtx::buf`]) is only reachable on the queue thread, so each tag owns
//! a buffer of its own that travels with the NBD request and comes back with the completion
//! (no allocation per IO once warm). WRITE data is copied into it in `handle_io` (it must
//! survive a reconnect and be resent anyway). READ data lands in it on the reader thread and
//! is copied into the request buffer on the queue thread, in
//! [`QueueHandler::on_remote_complete`], before the commit. In zero-copy mode the kernel
//! copies between the request's pages and the tag's own buffer instead (user copy): one copy
//! each way where the request buffer takes two.
//!
//! The buffer goes back to the queue thread through a bounded lock-free channel (sent before
//! the [`Completer`] is told, so it is there when the queue thread hears of the completion);
//! the queue thread parks buffers per tag in a table only it touches. No lock per IO.

use super::client::{check_servable, Client, ClientOptions, Cmd, Completion, Request, Waiter};
use super::conn::{self, ConnectOptions, ExportInfo, Ktls, Stream};
use super::error::{NbdError, Result};
use super::proto::TransmissionFlags as TF;
use super::ring::RingQueue;
use super::uri::NbdUri;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use ublk_core::{
    Action, Attrs, Completer, DeviceParams, DiscardParams, IoCtx, IoFlags, IoRequest, Op,
    QueueHandler, Target,
};

/// Largest request the device is given, whatever the server allows.
pub const MAX_IO_BYTES_CAP: u32 = 1 << 20;

/// How to set up an NBD device.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// The server and export.
    pub uri: NbdUri,
    /// Connection and engine settings.
    pub client: ClientOptions,
    /// Number of ublk queues (connections opened when the server allows multi-conn).
    pub queues: u16,
    /// Expose a read-only device even if the export is writable.
    pub read_only: bool,
    /// Which engine drives the connections.
    pub engine: Engine,
}

/// How NBD connections are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// By the queue threads, on their io_uring, where each queue has a connection of its own
    /// carrying plaintext for us (no TLS, or TLS in the kernel); otherwise as
    /// [`Engine::Threads`].
    #[default]
    Ring,
    /// By a writer and a reader thread per connection ([`Client`]).
    Threads,
}

impl NbdConfig {
    /// Defaults for `uri`: one queue, default client options.
    pub fn new(uri: NbdUri) -> NbdConfig {
        NbdConfig {
            uri,
            client: ClientOptions::default(),
            queues: 1,
            read_only: false,
            engine: Engine::default(),
        }
    }
}

/// The connections of a target.
#[derive(Debug)]
enum Conns {
    /// One per queue, each handed to its queue's [`RingQueue`] when the queue opens.
    Ring {
        streams: Mutex<Vec<Option<Stream>>>,
        uri: Arc<NbdUri>,
        opts: Arc<ClientOptions>,
        info: Arc<ExportInfo>,
    },
    /// Threaded clients, queue `q` using `q % len`.
    Threads(Vec<Arc<Client>>),
}

/// An NBD export exposed as a block device.
#[derive(Debug)]
pub struct NbdTarget {
    conns: Conns,
    info: ExportInfo,
    read_only: bool,
    /// The connections' TLS sessions are in the kernel (kTLS).
    kernel_tls: bool,
}

impl NbdTarget {
    /// Connects (one connection per queue if the server sets `CAN_MULTI_CONN`, else one).
    pub fn connect(cfg: &NbdConfig) -> Result<NbdTarget> {
        // Credentials are loaded once, for every connection and reconnect.
        let mut client_opts = cfg.client.clone();
        client_opts.connect = client_opts.connect.for_uri(&cfg.uri)?;
        let queues = usize::from(cfg.queues.max(1));
        let open_first = |o: &ConnectOptions| conn::open(&cfg.uri.addr, &cfg.uri.export, o);
        let (first, info) = match open_first(&client_opts.connect) {
            // The kernel refused the keys (rare: the session is lost); once more without it.
            Err(e @ NbdError::KernelTls(_)) if client_opts.connect.ktls == Ktls::Auto => {
                log::warn!("nbd: {e}; TLS stays in user space");
                client_opts.connect.ktls = Ktls::Off;
                open_first(&client_opts.connect)?
            }
            r => r?,
        };
        check_servable(&info)?;
        client_opts.connect = client_opts.connect.same_format_as(&info);
        let multi = info.flags.contains(TF::CAN_MULTI_CONN);
        let n = if multi { queues } else { 1 };
        let kernel_tls = matches!(first, Stream::KernelTls(_));
        let ring = cfg.engine == Engine::Ring && n == queues && !matches!(first, Stream::Tls(_));
        let conns = if ring {
            if kernel_tls {
                // The other connections and reconnects must carry plaintext for us too: where
                // the kernel refuses one, adding the device fails, or reconnecting retries.
                log::debug!("nbd: io_uring engine: every connection needs kernel TLS");
                client_opts.connect.ktls = Ktls::On;
            }
            let mut streams = vec![Some(first)];
            for _ in 1..n {
                let (s, i) = conn::open(&cfg.uri.addr, &cfg.uri.export, &client_opts.connect)?;
                info.same_export(&i).map_err(NbdError::ExportChanged)?;
                streams.push(Some(s));
            }
            Conns::Ring {
                streams: Mutex::new(streams),
                uri: Arc::new(cfg.uri.clone()),
                opts: Arc::new(client_opts),
                info: Arc::new(info.clone()),
            }
        } else {
            let mut conns = vec![Arc::new(Client::start_on(
                &cfg.uri,
                client_opts.clone(),
                first,
                info.clone(),
            )?)];
            for _ in 1..n {
                conns.push(Arc::new(Client::connect_like(
                    &cfg.uri,
                    client_opts.clone(),
                    &info,
                )?));
            }
            Conns::Threads(conns)
        };
        log::info!(
            "nbd: {} export {:?}: {} bytes, flags {:#x}, block sizes {}/{}/{}, {} connection(s), {} engine{}{}",
            cfg.uri.addr,
            info.name,
            info.size,
            info.flags.bits(),
            info.block.min,
            info.block.preferred,
            info.block.max_payload,
            n,
            if ring { "io_uring" } else { "threaded" },
            match (info.extended, info.structured) {
                (true, _) => ", extended headers",
                (false, true) => ", structured replies",
                _ => "",
            },
            if kernel_tls { ", TLS in the kernel" } else { "" }
        );
        Ok(NbdTarget {
            conns,
            info,
            read_only: cfg.read_only,
            kernel_tls,
        })
    }

    /// Whether the (first) connection's TLS session is in the kernel (kTLS).
    pub fn kernel_tls(&self) -> bool {
        self.kernel_tls
    }

    /// What negotiation established.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Whether each queue has its own connection (the server set `CAN_MULTI_CONN` and there
    /// is more than one queue); otherwise all queues share one connection.
    pub fn multi_conn(&self) -> bool {
        self.connections() > 1
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        match &self.conns {
            Conns::Ring { streams, .. } => streams.lock().map_or(0, |s| s.len()),
            Conns::Threads(c) => c.len(),
        }
    }

    /// The engine in use: [`Engine::Ring`] or [`Engine::Threads`].
    pub fn engine(&self) -> Engine {
        match &self.conns {
            Conns::Ring { .. } => Engine::Ring,
            Conns::Threads(_) => Engine::Threads,
        }
    }

    fn lbs(&self) -> u32 {
        self.info.block.min.max(512)
    }

    /// The largest request to configure the device with (`DeviceBuilder::max_io_bytes`): the
    /// server's maximum payload, capped at [`MAX_IO_BYTES_CAP`], a multiple of the logical
    /// block size.
    pub fn max_io_bytes(&self) -> u32 {
        let lbs = self.lbs();
        let m = self.info.block.max_payload.min(MAX_IO_BYTES_CAP);
        (m / lbs * lbs).max(lbs)
    }

    /// Device parameters from the export's size, flags and block sizes.
    pub fn params(&self) -> DeviceParams {
        let f = self.info.flags;
        let lbs = self.lbs();
        let shift = |v: u32| v.trailing_zeros() as u8;
        let lbs_shift = shift(lbs);
        let pref_shift = shift(self.info.block.preferred.max(lbs));
        let mut attrs = Attrs::empty();
        if f.contains(TF::SEND_FLUSH) {
            attrs |= Attrs::VOLATILE_CACHE;
            if f.contains(TF::SEND_FUA) {
                attrs |= Attrs::FUA;
            }
        }
        let read_only = self.read_only || f.contains(TF::READ_ONLY);
        if read_only {
            attrs |= Attrs::READ_ONLY;
        }
        if f.contains(TF::ROTATIONAL) {
            attrs |= Attrs::ROTATIONAL;
        }
        // Compact requests carry 32-bit lengths.
        let max_effect = ((u32::MAX / lbs) * lbs) >> 9;
        let trim = f.contains(TF::SEND_TRIM) && !read_only;
        let zeroes = f.contains(TF::SEND_WRITE_ZEROES) && !read_only;
        let discard = (trim || zeroes).then(|| DiscardParams {
            alignment: 0,
            granularity: if trim {
                self.info.block.preferred.max(lbs)
            } else {
                lbs
            },
            max_discard_sectors: if trim { max_effect } else { 0 },
            max_write_zeroes_sectors: if zeroes { max_effect } else { 0 },
        });
        DeviceParams {
            size: self.info.size,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: pref_shift.clamp(lbs_shift, 16),
            io_min_shift: lbs_shift,
            io_opt_shift: pref_shift.clamp(lbs_shift, 20),
            max_sectors: self.max_io_bytes() >> 9,
            attrs,
            discard,
        }
    }
}

impl Target for NbdTarget {
    type Queue = NbdQueue;

    /// User copy for the io_uring engine (copy mode where the kernel lacks it): the kernel
    /// copies READ data from the receive buffer straight into the request, so the engine
    /// drains each receive whole instead of receiving into the request's buffer piece by
    /// piece, which frees the server's socket buffer sooner (docs/BENCHMARKS-HOWTO.md, "128k
    /// reads on 6.12: the server's socket buffer"). The threaded engine gains nothing from
    /// it: copy mode.
    fn preferred_mode(&self) -> ublk_core::DataMode {
        if self.engine() == Engine::Ring {
            ublk_core::DataMode::UserCopy
        } else {
            ublk_core::DataMode::Copy
        }
    }

    /// Zero copy where the kernel's io_uring sends and receives on sockets from and into the
    /// request's registered pages ([`ublk_core::socket_io_on_fixed_buffers`]): the io_uring
    /// engine receives large READ payloads and sends large WRITE payloads that way; smaller
    /// ones, and all data of the threaded engine, move by user copy.
    fn zero_copy(&self) -> Result<(), &'static str> {
        if ublk_core::socket_io_on_fixed_buffers() {
            Ok(())
        } else {
            Err(
                "this kernel's io_uring cannot send and receive on sockets from and into \
                 registered buffers (Linux 7.3 can)",
            )
        }
    }

    fn open_queue(&self, q_id: u16) -> io::Result<NbdQueue> {
        let conns = match &self.conns {
            Conns::Threads(c) => c,
            Conns::Ring {
                streams,
                uri,
                opts,
                info,
            } => {
                let stream = streams
                    .lock()
                    .ok()
                    .and_then(|mut s| s.get_mut(usize::from(q_id))?.take())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no NBD connection left for queue {q_id}"),
                        )
                    })?;
                return Ok(NbdQueue::Ring(Box::new(RingQueue::new(
                    uri.clone(),
                    opts.clone(),
                    info.clone(),
                    self.read_only,
                    stream,
                ))));
            }
        };
        let client = conns[usize::from(q_id) % conns.len()].clone();
        let (tx, rx) = crossbeam_channel::bounded(RETURN_SLOTS);
        Ok(NbdQueue::Threads(ThreadQueue {
            client,
            sink: Arc::new(QueueSink {
                completer: OnceLock::new(),
                tx,
            }),
            bufs: TagBufs {
                rx,
                parked: Vec::new(),
            },
            waiter: Arc::new(Waiter::default()),
            async_reads: true,
            read_only: self.read_only,
        }))
    }
}

/// Capacity of a queue's buffer return channel: a queue never has more requests in flight
/// than the largest ublk queue depth (`UBLK_MAX_QUEUE_DEPTH`).
const RETURN_SLOTS: usize = 4096;

/// Where completions of one queue go (on the connection's threads): the tag's buffer is
/// sent back to the queue thread, then the [`Completer`] is told.
struct QueueSink {
    completer: OnceLock<Completer>,
    tx: Sender<(u16, Vec<u8>)>,
}

impl Completion for QueueSink {
    fn complete(&self, token: u64, res: i32, buf: Vec<u8>) {
        let tag = token as u16;
        match self.tx.try_send((tag, buf)) {
            Ok(()) => {}
            // Cannot happen while a queue has at most RETURN_SLOTS requests; losing the
            // buffer only costs an allocation later.
            Err(TrySendError::Full(_)) => log::warn!("nbd: buffer return channel full"),
            Err(TrySendError::Disconnected(_)) => {}
        }
        match self.completer.get() {
            Some(c) => c.complete(tag, res),
            None => log::error!("nbd: completion for tag {tag} before any request"),
        }
    }
}

/// The queue thread's per-tag buffers: those returned through the channel are moved into
/// `parked` before any is taken.
struct TagBufs {
    rx: Receiver<(u16, Vec<u8>)>,
    parked: Vec<Vec<u8>>,
}

impl TagBufs {
    fn put(&mut self, tag: u16, buf: Vec<u8>) {
        let t = usize::from(tag);
        if self.parked.len() <= t {
            self.parked.resize_with(t + 1, Vec::new);
        }
        self.parked[t] = buf;
    }

    /// The buffer of `tag` (empty if it has none yet). A buffer sent before the completion of
    /// `tag` was announced is always found.
    fn take(&mut self, tag: u16) -> Vec<u8> {
        while let Ok((t, buf)) = self.rx.try_recv() {
            self.put(t, buf);
        }
        self.parked
            .get_mut(usize::from(tag))
            .map(std::mem::take)
            .unwrap_or_default()
    }
}

/// The per-queue handler of [`NbdTarget`].
/// The queue handler of an NBD device.
#[derive(Debug)]
pub enum NbdQueue {
    /// The io_uring engine.
    Ring(Box<RingQueue>),
    /// The threaded engine.
    Threads(ThreadQueue),
}

impl QueueHandler for NbdQueue {
    fn moves_data(&mut self, req: &IoRequest) -> bool {
        match self {
            NbdQueue::Ring(q) => q.moves_data(req),
            NbdQueue::Threads(q) => q.moves_data(req),
        }
    }

    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        match self {
            NbdQueue::Ring(q) => q.handle_io(ctx, req),
            NbdQueue::Threads(q) => q.handle_io(ctx, req),
        }
    }

    fn on_remote_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, res: i32) -> Action {
        match self {
            NbdQueue::Ring(q) => q.on_remote_complete(ctx, req, res),
            NbdQueue::Threads(q) => q.on_remote_complete(ctx, req, res),
        }
    }

    fn on_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, data: u32, res: i32) -> Action {
        match self {
            NbdQueue::Ring(q) => q.on_complete(ctx, req, data, res),
            NbdQueue::Threads(q) => q.on_complete(ctx, req, data, res),
        }
    }

    fn on_event(&mut self, ctx: &mut IoCtx<'_>, data: u32, res: i32, buf: Vec<u8>) {
        if let NbdQueue::Ring(q) = self {
            q.on_event(ctx, data, res, buf);
        }
    }

    fn end_batch(&mut self, ctx: &mut IoCtx<'_>) {
        if let NbdQueue::Ring(q) = self {
            q.end_batch(ctx);
        }
    }
}

/// The queue handler of the threaded engine.
pub struct ThreadQueue {
    client: Arc<Client>,
    sink: Arc<QueueSink>,
    bufs: TagBufs,
    waiter: Arc<Waiter>,
    /// READs complete through `QueueHandler::on_remote_complete` (else they wait on the queue
    /// thread).
    async_reads: bool,
    read_only: bool,
}

impl std::fmt::Debug for ThreadQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadQueue")
            .field("async_reads", &self.async_reads)
            .finish_non_exhaustive()
    }
}

impl ThreadQueue {
    fn submit(&mut self, req: Request, tag: u16) -> Action {
        match self.client.submit(req, self.sink.clone(), u64::from(tag)) {
            Ok(()) => Action::Pending,
            Err((e, buf)) => {
                self.bufs.put(tag, buf);
                Action::Done(e)
            }
        }
    }

    fn read_sync(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, r: Request) -> Action {
        let (res, buf) = match self.client.submit(r, self.waiter.clone(), 0) {
            Ok(()) => self.waiter.wait(),
            Err(e) => e,
        };
        let res = if res > 0 {
            deliver_read(ctx, req, &buf, res)
        } else {
            res
        };
        self.bufs.put(req.tag, buf);
        Action::Done(res)
    }

    /// Finishes a request completed through the [`Completer`], on the queue thread: copies
    /// READ data from the tag's own buffer into the request buffer.
    fn finish_remote(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, res: i32) -> Action {
        if req.op != Op::Read || res <= 0 {
            return Action::Done(res);
        }
        let buf = self.bufs.take(req.tag);
        let res = deliver_read(ctx, req, &buf, res);
        self.bufs.put(req.tag, buf);
        Action::Done(res)
    }
}

/// Copies READ data from the tag's own buffer into the request: into the request buffer, or
/// in zero-copy mode straight into its pages (user copy). Returns `res` or `-EIO`.
fn deliver_read(ctx: &mut IoCtx<'_>, req: &IoRequest, src: &[u8], res: i32) -> i32 {
    if !ctx.zero_copy() {
        return copy_read(ctx.buf(req.tag), src, req.len, res);
    }
    let Some(src) = src.get(..req.len as usize) else {
        return -libc::EIO;
    };
    match ctx.copy_read_data(req.tag, 0, src) {
        Ok(()) => res,
        Err(e) => {
            log::error!("nbd: cannot deliver READ data of tag {}: {e}", req.tag);
            -libc::EIO
        }
    }
}

fn copy_read(dst: &mut [u8], src: &[u8], len: u32, res: i32) -> i32 {
    let n = len as usize;
    if dst.len() < n || src.len() < n {
        return -libc::EIO;
    }
    dst[..n].copy_from_slice(&src[..n]);
    res
}

impl QueueHandler for ThreadQueue {
    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        let _ = self.sink.completer.set(ctx.completer());
        let tag = req.tag;
        let fua = req.flags.contains(IoFlags::FUA);
        let mut r = Request {
            cmd: Cmd::Flush,
            fua,
            no_hole: false,
            offset: req.offset,
            len: req.len,
            buf: Vec::new(),
        };
        match req.op {
            Op::Read => {
                r.cmd = Cmd::Read;
                r.buf = self.bufs.take(tag);
                if !self.async_reads {
                    return self.read_sync(ctx, req, r);
                }
            }
            Op::Write => {
                if self.read_only {
                    return Action::Done(-libc::EROFS);
                }
                let n = req.len as usize;
                let mut buf = self.bufs.take(tag);
                buf.clear();
                if ctx.zero_copy() {
                    // The kernel copies the data straight into the tag's own buffer.
                    buf.resize(n, 0);
                    if let Err(e) = ctx.copy_write_data(tag, 0, &mut buf) {
                        log::error!("nbd: cannot bring in WRITE data of tag {tag}: {e}");
                        self.bufs.put(tag, buf);
                        return Action::Done(-libc::EIO);
                    }
                } else {
                    let data = ctx.buf(tag);
                    if data.len() < n {
                        self.bufs.put(tag, buf);
                        return Action::Done(-libc::EIO);
                    }
                    buf.extend_from_slice(&data[..n]);
                }
                r.cmd = Cmd::Write;
                r.buf = buf;
            }
            Op::Flush => {
                r.offset = 0;
                r.len = 0;
            }
            Op::Discard => r.cmd = Cmd::Trim,
            Op::WriteZeroes => {
                r.cmd = Cmd::WriteZeroes;
                r.no_hole = req.flags.contains(IoFlags::NOUNMAP);
            }
            _ => return Action::Done(-libc::EOPNOTSUPP),
        }
        if matches!(r.cmd, Cmd::Trim | Cmd::WriteZeroes) && self.read_only {
            return Action::Done(-libc::EROFS);
        }
        self.submit(r, tag)
    }

    fn on_remote_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, res: i32) -> Action {
        self.finish_remote(ctx, req, res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::BlockSizes;

    fn target(flags: TF, block: BlockSizes) -> NbdTarget {
        NbdTarget {
            conns: Conns::Threads(Vec::new()),
            info: ExportInfo {
                name: String::new(),
                size: 1 << 30,
                flags: flags | TF::HAS_FLAGS,
                block,
                block_sizes_advertised: true,
                structured: true,
                extended: false,
                used_go: true,
                description: None,
            },
            read_only: false,
            kernel_tls: false,
        }
    }

    #[test]
    fn test_params_from_flags() {
        let all = TF::SEND_FLUSH | TF::SEND_FUA | TF::SEND_TRIM | TF::SEND_WRITE_ZEROES;
        let t = target(all | TF::ROTATIONAL, BlockSizes::default());
        let p = t.params();
        assert_eq!(
            p.attrs,
            Attrs::VOLATILE_CACHE | Attrs::FUA | Attrs::ROTATIONAL
        );
        assert_eq!(p.logical_bs_shift, 9);
        assert_eq!(p.physical_bs_shift, 12);
        assert_eq!(p.io_opt_shift, 12);
        assert_eq!(p.size, 1 << 30);
        let d = p.discard.unwrap();
        assert_eq!(d.granularity, 4096);
        assert_eq!(d.max_discard_sectors, (u32::MAX / 512 * 512) >> 9);
        assert_eq!(d.max_write_zeroes_sectors, d.max_discard_sectors);
        assert_eq!(t.max_io_bytes(), MAX_IO_BYTES_CAP);
        assert_eq!(p.max_sectors, MAX_IO_BYTES_CAP >> 9);

        // FUA without FLUSH means nothing to the kernel; no flags, no discard.
        let p = target(TF::SEND_FUA, BlockSizes::default()).params();
        assert_eq!(p.attrs, Attrs::empty());
        assert!(p.discard.is_none());

        let p = target(TF::READ_ONLY | TF::SEND_TRIM, BlockSizes::default()).params();
        assert_eq!(p.attrs, Attrs::READ_ONLY);
        assert!(p.discard.is_none(), "no discard on a read-only export");

        let p = target(TF::SEND_WRITE_ZEROES, BlockSizes::default()).params();
        let d = p.discard.unwrap();
        assert_eq!((d.max_discard_sectors, d.granularity), (0, 512));
        assert!(d.max_write_zeroes_sectors > 0);
    }

    /// An export whose maximum payload is under a page cannot take the kernel's requests:
    /// refused when the device is added, not failing every IO later.
    #[test]
    fn test_tiny_max_payload_is_refused() {
        for (max, ok) in [(256, false), (512, false), (4095, false), (4096, true)] {
            let b = BlockSizes {
                min: 1,
                preferred: 1,
                max_payload: max,
            };
            let t = target(TF::empty(), b);
            assert_eq!(check_servable(&t.info).is_ok(), ok, "max payload {max}");
        }
    }

    #[test]
    fn test_params_from_block_sizes() {
        let b = BlockSizes {
            min: 4096,
            preferred: 65536,
            max_payload: 256 << 10,
        };
        let t = target(TF::SEND_TRIM, b);
        let p = t.params();
        assert_eq!(
            (
                p.logical_bs_shift,
                p.physical_bs_shift,
                p.io_min_shift,
                p.io_opt_shift
            ),
            (12, 16, 12, 16)
        );
        assert_eq!(t.max_io_bytes(), 256 << 10);
        assert_eq!(p.discard.unwrap().granularity, 65536);
        assert_eq!(
            p.discard.unwrap().max_discard_sectors,
            (u32::MAX / 4096 * 4096) >> 9
        );
        let t = target(
            TF::empty(),
            BlockSizes {
                min: 1,
                preferred: 1 << 22,
                max_payload: u32::MAX,
            },
        );
        let p = t.params();
        assert_eq!((p.physical_bs_shift, p.io_opt_shift), (16, 20));
        assert_eq!(t.max_io_bytes(), MAX_IO_BYTES_CAP);
    }

    #[test]
    fn test_copy_read_bounds() {
        let mut dst = [0u8; 8];
        assert_eq!(copy_read(&mut dst, &[1; 8], 8, 8), 8);
        assert_eq!(dst, [1; 8]);
        assert_eq!(copy_read(&mut dst, &[1; 4], 8, 8), -libc::EIO);
        assert_eq!(copy_read(&mut [], &[1; 8], 8, 8), -libc::EIO);
    }

    #[test]
    fn test_queue_sink_returns_buffers_per_tag() {
        let (tx, rx) = crossbeam_channel::bounded(RETURN_SLOTS);
        let sink = Arc::new(QueueSink {
            completer: OnceLock::new(),
            tx,
        });
        let mut bufs = TagBufs {
            rx,
            parked: Vec::new(),
        };
        // Completions arrive on other threads, in any order.
        let s2 = sink.clone();
        std::thread::spawn(move || {
            s2.complete(5, 3, vec![1, 2, 3]);
            s2.complete(2, 1, vec![9]);
        })
        .join()
        .unwrap();
        assert_eq!(bufs.take(2), vec![9]);
        assert_eq!(bufs.take(5), vec![1, 2, 3]);
        assert!(bufs.take(5).is_empty(), "taken once");
        assert!(bufs.take(100).is_empty());
        bufs.put(7, vec![4]);
        assert_eq!(bufs.take(7), vec![4]);
    }
}
