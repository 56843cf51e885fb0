//! The io_uring engine: one plaintext NBD connection per ublk queue, driven entirely by the
//! queue thread on the queue's own io_uring.
//!
//! Per batch of requests the queue thread sends every new request with one `sendmsg` (headers
//! from a small buffer, WRITE payloads straight from the requests' own buffers: no copy), and
//! one `recv` is always posted on the socket; the replies it brings are parsed here, READ data
//! copied into the requests' buffers (a large remainder is received straight into the request
//! buffer instead) and the requests completed. The ublk commits, the socket operations and the
//! next fetches all go through the same `io_uring_enter`: no other thread, lock, channel or
//! wake-up on the data path (the threaded [`Client`](super::client::Client) needs three
//! threads and three copies per request).
//!
//! The protocol rules are those of the threaded engine: cookies carry a per-request sequence
//! number that changes on every (re)send, so a reply to anything not on the wire is a
//! violation; a violation, an IO error or a request on the wire past its timeout kills the
//! connection; a helper thread then reconnects with backoff (connect and negotiation block)
//! and hands the new socket over, the export is checked to be the same, and everything still
//! pending is resent. A request pending longer than the timeout fails with `-EIO`; after a
//! reconnect with acknowledged writes not yet flushed, the next FLUSH fails with `-EIO`.

use super::client::{cmd_flags, ClientOptions, Cmd};
use super::conn::{self, ExportInfo, Stream};
use super::error::{NbdError, ProtoError};
use super::proto::{
    self, ChunkEvent, ChunkHeader, ChunkPlan, Coverage, Expect, Reply, RequestHeader,
    TransmissionFlags as TF,
};
use super::uri::NbdUri;
use crossbeam_channel::Receiver;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_core::{Action, IoCtx, IoFlags, IoRequest, Op, QueueHandler, SendPart};

/// Event kinds in the top two bits of an operation's data; the rest is the connection's
/// generation, so completions of a dead connection's operations are recognised.
const EV_RECV: u32 = 1 << 30;
const EV_SEND: u32 = 2 << 30;
const EV_TIMER: u32 = 3 << 30;
const EV_MASK: u32 = 3 << 30;
const GEN_MASK: u32 = !EV_MASK;

/// Size of the receive buffer.
const RBUF: usize = 256 << 10;
/// A READ payload remainder at least this large is received straight into the request's
/// buffer instead of going through the receive buffer.
const DIRECT_MIN: u32 = 32 << 10;
/// Most requests per `sendmsg`.
const SEND_BATCH: usize = 64;
/// Timer period while reconnecting.
const DOWN_TICK: Duration = Duration::from_millis(50);

/// A request of this queue, indexed by tag.
#[derive(Debug)]
struct Slot {
    busy: bool,
    /// Sent on the live connection (a reply may come).
    wire: bool,
    /// Changes on every send; the cookie is `seq << 16 | tag`.
    seq: u32,
    cmd: Cmd,
    flags: u16,
    offset: u64,
    len: u32,
    start: Instant,
    coverage: Coverage,
    error: Option<u32>,
    /// FLUSH: `acked_writes` when it was submitted.
    flush_covers: u64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            busy: false,
            wire: false,
            seq: 0,
            cmd: Cmd::Flush,
            flags: 0,
            offset: 0,
            len: 0,
            start: Instant::now(),
            coverage: Coverage::default(),
            error: None,
            flush_covers: 0,
        }
    }

    fn expect(&self) -> Expect {
        Expect {
            read: self.cmd == Cmd::Read,
            offset: self.offset,
            len: self.len,
        }
    }
}

/// Where the reply parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Expecting a reply header.
    Header,
    /// The 8-byte offset of an `OFFSET_DATA` chunk for `tag`.
    ChunkOffset { tag: u16, data_len: u32, done: bool },
    /// READ payload for `tag`: `left` bytes to place at `at`; `done` ends the reply.
    Data {
        tag: u16,
        at: u32,
        left: u32,
        done: bool,
    },
    /// The payload of a small chunk (hole, error, none).
    Small {
        tag: u16,
        h: ChunkHeader,
        done: bool,
    },
    /// A receive straight into `tag`'s buffer is in flight.
    Direct { tag: u16, len: u32, done: bool },
}

/// The live connection.
#[derive(Debug)]
struct Live {
    stream: Stream,
    gen: u32,
    /// A `sendmsg` is in flight, of this many bytes.
    sending: Option<usize>,
    /// A receive (into `rbuf` or a request buffer) is in flight.
    receiving: bool,
    rx: Rx,
}

/// A reconnect in progress on a helper thread.
#[derive(Debug)]
struct Reconnect {
    rx: Receiver<Stream>,
    cancel: Arc<AtomicBool>,
}

impl Drop for Reconnect {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The queue handler of the io_uring engine.
#[derive(Debug)]
pub struct RingQueue {
    uri: Arc<NbdUri>,
    opts: Arc<ClientOptions>,
    info: Arc<ExportInfo>,
    read_only: bool,
    slots: Vec<Slot>,
    busy: usize,
    /// Tags to send, in order.
    queued: VecDeque<u16>,
    live: Option<Live>,
    next_gen: u32,
    reconnect: Option<Reconnect>,
    /// No reconnecting: everything fails.
    dead: bool,
    timer_armed: bool,
    rbuf: Vec<u8>,
    rpos: usize,
    sbuf: Vec<u8>,
    parts: Vec<SendPart>,
    acked_writes: u64,
    flushed_upto: u64,
    lost_upto: u64,
    reconnects: u64,
}

impl RingQueue {
    /// A handler serving its queue over `stream`, a negotiated plaintext connection to the
    /// export described by `info`.
    pub(crate) fn new(
        uri: Arc<NbdUri>,
        opts: Arc<ClientOptions>,
        info: Arc<ExportInfo>,
        read_only: bool,
        stream: Stream,
    ) -> RingQueue {
        let mut q = RingQueue {
            uri,
            opts,
            info,
            read_only,
            slots: Vec::new(),
            busy: 0,
            queued: VecDeque::new(),
            live: None,
            next_gen: 1,
            reconnect: None,
            dead: false,
            timer_armed: false,
            rbuf: Vec::with_capacity(RBUF),
            rpos: 0,
            sbuf: Vec::new(),
            parts: Vec::new(),
            acked_writes: 0,
            flushed_upto: 0,
            lost_upto: 0,
            reconnects: 0,
        };
        q.install(stream);
        q
    }

    fn install(&mut self, stream: Stream) {
        let _ = stream.set_timeouts(None, None);
        let gen = self.next_gen;
        self.next_gen = (self.next_gen + 1) & GEN_MASK;
        self.live = Some(Live {
            stream,
            gen,
            sending: None,
            receiving: false,
            rx: Rx::Header,
        });
        self.rpos = 0;
        self.rbuf.clear();
    }

    fn slot(&mut self, tag: u16) -> &mut Slot {
        let t = usize::from(tag);
        if self.slots.len() <= t {
            self.slots.resize_with(t + 1, Slot::new);
        }
        &mut self.slots[t]
    }

    /// Checks and queues a request (what [`Client::submit`](super::client::Client::submit)
    /// checks), or says at once why not.
    fn submit(&mut self, req: &IoRequest) -> Action {
        let f = self.info.flags;
        let cmd = match req.op {
            Op::Read => Cmd::Read,
            Op::Write => Cmd::Write,
            Op::Flush => Cmd::Flush,
            Op::Discard => Cmd::Trim,
            Op::WriteZeroes => Cmd::WriteZeroes,
            _ => return Action::Done(-libc::EOPNOTSUPP),
        };
        match cmd {
            Cmd::Read | Cmd::Write if req.len == 0 || req.len > self.info.block.max_payload => {
                return Action::Done(-libc::EINVAL)
            }
            Cmd::Flush if !f.contains(TF::SEND_FLUSH) => return Action::Done(-libc::EOPNOTSUPP),
            Cmd::Trim if !f.contains(TF::SEND_TRIM) => return Action::Done(-libc::EOPNOTSUPP),
            Cmd::WriteZeroes if !f.contains(TF::SEND_WRITE_ZEROES) => {
                return Action::Done(-libc::EOPNOTSUPP)
            }
            _ => {}
        }
        if cmd.modifies() && (self.read_only || f.contains(TF::READ_ONLY)) {
            return Action::Done(-libc::EROFS);
        }
        let (offset, len) = if cmd == Cmd::Flush {
            (0, 0)
        } else {
            (req.offset, req.len)
        };
        if cmd != Cmd::Flush
            && offset
                .checked_add(len.into())
                .is_none_or(|e| e > self.info.size)
        {
            return Action::Done(-libc::EINVAL);
        }
        if self.dead {
            return Action::Done(-libc::EIO);
        }
        let flags = cmd_flags(
            &self.info,
            &self.opts,
            cmd,
            req.flags.contains(IoFlags::FUA),
            req.flags.contains(IoFlags::NOUNMAP),
        );
        let covers = self.acked_writes;
        let s = self.slot(req.tag);
        if s.busy {
            log::error!("nbd: tag {} submitted twice", req.tag);
            return Action::Done(-libc::EIO);
        }
        s.busy = true;
        s.wire = false;
        s.cmd = cmd;
        s.flags = flags;
        s.offset = offset;
        s.len = len;
        s.start = Instant::now();
        s.coverage.clear();
        s.error = None;
        s.flush_covers = covers;
        self.busy += 1;
        self.queued.push_back(req.tag);
        Action::Pending
    }

    /// Frees `tag`'s slot and completes its request.
    fn finish(&mut self, ctx: &mut IoCtx<'_>, tag: u16, res: i32) {
        let s = self.slot(tag);
        if !s.busy {
            return;
        }
        s.busy = false;
        s.wire = false;
        self.busy -= 1;
        ctx.complete(tag, res);
    }

    /// Sends what is queued, in one `sendmsg`, unless one is already in flight.
    fn kick_send(&mut self, ctx: &mut IoCtx<'_>) {
        let Some(live) = &self.live else { return };
        if live.sending.is_some() || self.queued.is_empty() {
            return;
        }
        let extended = self.info.extended;
        let mut bytes = std::mem::take(&mut self.sbuf);
        bytes.clear();
        self.parts.clear();
        let mut total = 0usize;
        let mut n = 0;
        while n < SEND_BATCH {
            let Some(tag) = self.queued.pop_front() else {
                break;
            };
            let s = &mut self.slots[usize::from(tag)];
            if !s.busy || s.wire {
                continue;
            }
            n += 1;
            s.seq = s.seq.wrapping_add(1);
            s.wire = true;
            let h = RequestHeader {
                flags: s.flags,
                cmd: s.cmd.wire(),
                cookie: (u64::from(s.seq) << 16) | u64::from(tag),
                offset: s.offset,
                len: s.len.into(),
            };
            let start = bytes.len();
            if extended {
                bytes.extend_from_slice(&h.encode_extended());
            } else {
                bytes.extend_from_slice(&h.encode_compact());
            }
            match self.parts.last_mut() {
                Some(SendPart::Bytes(r)) if r.end == start => r.end = bytes.len(),
                _ => self.parts.push(SendPart::Bytes(start..bytes.len())),
            }
            total += bytes.len() - start;
            if s.cmd == Cmd::Write {
                self.parts.push(SendPart::Tag {
                    tag,
                    off: 0,
                    len: s.len,
                });
                total += s.len as usize;
            }
        }
        if n == 0 {
            self.sbuf = bytes;
            return;
        }
        let gen = live.gen;
        let r = ctx.send(live.stream.as_fd(), bytes, &self.parts, EV_SEND | gen);
        match r {
            Ok(()) => {
                if let Some(l) = &mut self.live {
                    l.sending = Some(total);
                }
            }
            Err(e) => self.kill(ctx, &format!("cannot send: {e}")),
        }
    }

    /// Posts the receive the parser needs next, unless one is in flight.
    fn kick_recv(&mut self, ctx: &mut IoCtx<'_>) {
        let Some(live) = &self.live else { return };
        if live.receiving {
            return;
        }
        let fd = live.stream.as_fd();
        let gen = live.gen;
        let (r, direct) = match live.rx {
            Rx::Data {
                tag,
                at,
                left,
                done,
            } if left >= DIRECT_MIN && self.rpos == self.rbuf.len() => (
                ctx.recv_at(tag, fd, at, left, EV_RECV | gen),
                Some(Rx::Direct {
                    tag,
                    len: left,
                    done,
                }),
            ),
            _ => {
                // Keep the unparsed tail, at the front.
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
                if self.rbuf.capacity() - self.rbuf.len() < RBUF / 4 {
                    self.rbuf.reserve(RBUF);
                }
                let buf = std::mem::take(&mut self.rbuf);
                (ctx.recv(fd, buf, EV_RECV | gen), None)
            }
        };
        match r {
            Ok(()) => {
                let live = self.live_mut();
                live.receiving = true;
                if let Some(rx) = direct {
                    live.rx = rx;
                }
            }
            Err(e) => self.kill(ctx, &format!("cannot receive: {e}")),
        }
    }

    fn live_mut(&mut self) -> &mut Live {
        self.live.as_mut().expect("connection is live")
    }

    /// Parses what the receive buffer holds.
    fn parse(&mut self, ctx: &mut IoCtx<'_>) -> Result<(), NbdError> {
        let extended = self.info.extended;
        loop {
            let Some(live) = &self.live else {
                return Ok(());
            };
            let avail = &self.rbuf[self.rpos..];
            match live.rx {
                Rx::Direct { .. } => return Ok(()),
                Rx::Header => {
                    if avail.len() < 4 {
                        return Ok(());
                    }
                    let magic = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
                    let n = proto::reply_header_len(magic, extended)?;
                    if avail.len() < n {
                        return Ok(());
                    }
                    let reply = proto::decode_reply(&avail[..n], extended)?;
                    self.rpos += n;
                    self.on_reply(ctx, reply)?;
                }
                Rx::ChunkOffset {
                    tag,
                    data_len,
                    done,
                } => {
                    if avail.len() < 8 {
                        return Ok(());
                    }
                    let off = u64::from_be_bytes(avail[..8].try_into().unwrap_or_default());
                    self.rpos += 8;
                    let s = &mut self.slots[usize::from(tag)];
                    let at = proto::place_data(&s.expect(), off, data_len)?;
                    s.coverage.add(at, data_len)?;
                    self.live_mut().rx = Rx::Data {
                        tag,
                        at,
                        left: data_len,
                        done,
                    };
                }
                Rx::Data {
                    tag,
                    at,
                    left,
                    done,
                } => {
                    if left == 0 {
                        self.live_mut().rx = Rx::Header;
                        if done {
                            self.reply_done(ctx, tag)?;
                        }
                        continue;
                    }
                    let n = avail.len().min(left as usize);
                    if n == 0 {
                        return Ok(());
                    }
                    let dst = ctx.buf(tag);
                    let Some(dst) = dst.get_mut(at as usize..at as usize + n) else {
                        return Err(ProtoError::Mismatch("read reply for a busy buffer").into());
                    };
                    dst.copy_from_slice(&avail[..n]);
                    self.rpos += n;
                    self.live_mut().rx = Rx::Data {
                        tag,
                        at: at + n as u32,
                        left: left - n as u32,
                        done,
                    };
                }
                Rx::Small { tag, h, done } => {
                    let len = h.len as usize;
                    if avail.len() < len {
                        if self.rbuf.capacity() < self.rpos + len {
                            self.rbuf.reserve(len);
                        }
                        return Ok(());
                    }
                    let s = &self.slots[usize::from(tag)];
                    let ev = proto::decode_small_chunk(&h, &avail[..len], &s.expect())?;
                    self.rpos += len;
                    match ev {
                        ChunkEvent::None => {}
                        ChunkEvent::Hole { buf_off, len } => {
                            self.slots[usize::from(tag)].coverage.add(buf_off, len)?;
                            let dst = ctx.buf(tag);
                            let Some(dst) = dst.get_mut(buf_off as usize..(buf_off + len) as usize)
                            else {
                                return Err(
                                    ProtoError::Mismatch("read reply for a busy buffer").into()
                                );
                            };
                            dst.fill(0);
                        }
                        ChunkEvent::Error { error, message } => {
                            log::trace!("nbd: server error {error}: {message}");
                            self.slots[usize::from(tag)].error.get_or_insert(error);
                        }
                    }
                    self.live_mut().rx = Rx::Header;
                    if done {
                        self.reply_done(ctx, tag)?;
                    }
                }
            }
        }
    }

    /// A reply header arrived.
    fn on_reply(&mut self, ctx: &mut IoCtx<'_>, reply: Reply) -> Result<(), NbdError> {
        let cookie = reply.cookie();
        let tag = (cookie & 0xffff) as u16;
        let ok = cookie >> 48 == 0
            && self.slots.get(usize::from(tag)).is_some_and(|s| {
                s.busy && s.wire && u64::from(s.seq) == (cookie >> 16) & 0xffff_ffff
            });
        if !ok {
            return Err(ProtoError::UnknownCookie(cookie).into());
        }
        let s = &mut self.slots[usize::from(tag)];
        let expect = s.expect();
        match reply {
            Reply::Simple { error, .. } => {
                if error != 0 {
                    s.error = Some(error);
                } else if expect.read {
                    s.coverage.add(0, expect.len)?;
                    self.live_mut().rx = Rx::Data {
                        tag,
                        at: 0,
                        left: expect.len,
                        done: true,
                    };
                    return Ok(());
                }
                self.reply_done(ctx, tag)
            }
            Reply::Chunk(h) => {
                let done = h.done();
                self.live_mut().rx = match proto::plan_chunk(&h, &expect)? {
                    ChunkPlan::OffsetData { data_len } => Rx::ChunkOffset {
                        tag,
                        data_len,
                        done,
                    },
                    ChunkPlan::Small { .. } => Rx::Small { tag, h, done },
                };
                Ok(())
            }
        }
    }

    /// The last chunk of `tag`'s reply was parsed: complete it.
    fn reply_done(&mut self, ctx: &mut IoCtx<'_>, tag: u16) -> Result<(), NbdError> {
        let s = &self.slots[usize::from(tag)];
        let res = if let Some(e) = s.error {
            -proto::errno_of(e)
        } else {
            match s.cmd {
                Cmd::Read => {
                    if s.coverage.covered() != u64::from(s.len) {
                        return Err(
                            ProtoError::Mismatch("read reply does not cover the request").into(),
                        );
                    }
                    s.len as i32
                }
                Cmd::Write | Cmd::Trim | Cmd::WriteZeroes => {
                    let r = if s.cmd == Cmd::Write { s.len as i32 } else { 0 };
                    self.acked_writes += 1;
                    r
                }
                Cmd::Flush => {
                    let covers = s.flush_covers;
                    let lost = self.lost_upto > self.flushed_upto;
                    self.flushed_upto = self.flushed_upto.max(covers);
                    if lost {
                        log::error!(
                            "nbd: failing FLUSH: acknowledged writes may have been lost across a reconnect"
                        );
                        self.lost_upto = 0;
                        -libc::EIO
                    } else {
                        0
                    }
                }
            }
        };
        self.finish(ctx, tag, res);
        Ok(())
    }

    /// Drops the live connection: everything pending is queued again, and a reconnect starts
    /// (or, without reconnecting, everything fails).
    fn kill(&mut self, ctx: &mut IoCtx<'_>, why: &str) {
        let Some(live) = self.live.take() else { return };
        log::warn!("nbd: connection to {} lost: {why}", self.uri.addr);
        live.stream.shutdown();
        if self.opts.fail_flush_after_reconnect && self.acked_writes > self.flushed_upto {
            self.lost_upto = self.acked_writes;
        }
        self.rbuf.clear();
        self.rpos = 0;
        self.queued.clear();
        for (tag, s) in self.slots.iter_mut().enumerate() {
            if s.busy {
                s.wire = false;
                s.coverage.clear();
                s.error = None;
                self.queued.push_back(tag as u16);
            }
        }
        if !self.opts.reconnect {
            self.dead = true;
            self.fail_all(ctx);
            return;
        }
        self.start_reconnect();
    }

    fn fail_all(&mut self, ctx: &mut IoCtx<'_>) {
        self.queued.clear();
        for tag in 0..self.slots.len() {
            self.finish(ctx, tag as u16, -libc::EIO);
        }
    }

    fn start_reconnect(&mut self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let (uri, opts, info, stop) = (
            self.uri.clone(),
            self.opts.clone(),
            self.info.clone(),
            cancel.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("nbd-reconnect".into())
            .spawn(move || {
                let mut backoff = opts.reconnect_delay;
                while !stop.load(Ordering::Relaxed) {
                    let r = conn::open(&uri.addr, &uri.export, &opts.connect).and_then(|(s, i)| {
                        info.same_export(&i).map_err(NbdError::ExportChanged)?;
                        Ok(s)
                    });
                    match r {
                        Ok(s) => {
                            let _ = tx.send(s);
                            return;
                        }
                        Err(e) => log::debug!("nbd: reconnecting to {} failed: {e}", uri.addr),
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(opts.reconnect_delay_max);
                }
            });
        match spawned {
            Ok(_) => self.reconnect = Some(Reconnect { rx, cancel }),
            Err(e) => {
                log::error!("nbd: cannot start reconnecting: {e}");
                self.dead = true;
            }
        }
    }

    /// Timer work: a finished reconnect, expired requests.
    fn tick(&mut self, ctx: &mut IoCtx<'_>) {
        if self.dead {
            self.fail_all(ctx);
            return;
        }
        if let Some(s) = self.reconnect.as_ref().and_then(|r| r.rx.try_recv().ok()) {
            self.reconnect = None;
            self.reconnects += 1;
            log::info!(
                "nbd: reconnected to {}; resending {} requests",
                self.uri.addr,
                self.queued.len()
            );
            self.install(s);
        }
        let Some(timeout) = self.opts.request_timeout else {
            return;
        };
        let now = Instant::now();
        let mut stuck = false;
        for tag in 0..self.slots.len() {
            let s = &self.slots[tag];
            if !s.busy || now.duration_since(s.start) < timeout {
                continue;
            }
            if s.wire {
                stuck = true;
            } else {
                log::debug!("nbd: request {:?} at {} timed out", s.cmd, s.offset);
                self.queued.retain(|&t| usize::from(t) != tag);
                self.finish(ctx, tag as u16, -libc::EIO);
            }
        }
        if stuck {
            self.kill(ctx, "a request timed out");
        }
    }

    fn arm_timer(&mut self, ctx: &mut IoCtx<'_>) {
        if self.timer_armed {
            return;
        }
        let period = if self.live.is_none() && !self.dead {
            DOWN_TICK
        } else if self.busy > 0 {
            match self.opts.request_timeout {
                Some(t) => (t / 8).clamp(Duration::from_millis(10), Duration::from_secs(1)),
                None => return,
            }
        } else {
            return;
        };
        match ctx.timeout(period, EV_TIMER) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::error!("nbd: cannot arm the request timer: {e}"),
        }
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.live.as_ref().map(|l| l.stream.as_fd())
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }
}

impl QueueHandler for RingQueue {
    fn handle_io(&mut self, _ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        self.submit(req)
    }

    fn on_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, data: u32, res: i32) -> Action {
        // A receive straight into the request's buffer.
        let gen = data & GEN_MASK;
        let current = self.live.as_ref().is_some_and(|l| l.gen == gen);
        if !current {
            return Action::Pending;
        }
        let Some(Rx::Direct { tag, len, done }) = self.live.as_ref().map(|l| l.rx) else {
            self.kill(ctx, "unexpected receive completion");
            return Action::Pending;
        };
        let live = self.live_mut();
        live.receiving = false;
        if tag != req.tag || res != len as i32 {
            let why = if res < 0 {
                std::io::Error::from_raw_os_error(-res).to_string()
            } else {
                format!("short receive ({res} of {len} bytes)")
            };
            self.kill(ctx, &why);
            return Action::Pending;
        }
        live.rx = Rx::Header;
        if done {
            if let Err(e) = self.reply_done(ctx, tag) {
                self.kill(ctx, &e.to_string());
                return Action::Pending;
            }
        }
        if let Err(e) = self.parse(ctx) {
            self.kill(ctx, &e.to_string());
        }
        self.kick_recv(ctx);
        Action::Pending
    }

    fn on_event(&mut self, ctx: &mut IoCtx<'_>, data: u32, res: i32, buf: Vec<u8>) {
        let gen = data & GEN_MASK;
        let current = self.live.as_ref().is_some_and(|l| l.gen == gen);
        match data & EV_MASK {
            EV_RECV => {
                if !current {
                    if self.rbuf.capacity() == 0 {
                        self.rbuf = buf;
                        self.rbuf.clear();
                    }
                    return;
                }
                self.rbuf = buf;
                self.live_mut().receiving = false;
                if res <= 0 {
                    let why = if res == 0 {
                        "closed by the server".to_string()
                    } else {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    };
                    return self.kill(ctx, &why);
                }
                match self.parse(ctx) {
                    Ok(()) => self.kick_recv(ctx),
                    Err(e) => self.kill(ctx, &e.to_string()),
                }
            }
            EV_SEND => {
                if self.sbuf.capacity() == 0 {
                    self.sbuf = buf;
                }
                if !current {
                    return;
                }
                let expected = self.live_mut().sending.take();
                if res < 0 || Some(res as usize) != expected {
                    let why = if res < 0 {
                        std::io::Error::from_raw_os_error(-res).to_string()
                    } else {
                        format!("short send ({res} bytes)")
                    };
                    self.kill(ctx, &why);
                }
            }
            _ => {
                self.timer_armed = false;
                self.tick(ctx);
            }
        }
    }

    fn end_batch(&mut self, ctx: &mut IoCtx<'_>) {
        self.kick_send(ctx);
        if self.fd().is_some() {
            self.kick_recv(ctx);
        }
        self.arm_timer(ctx);
    }
}

impl Drop for RingQueue {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            let disc = RequestHeader {
                flags: 0,
                cmd: proto::CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let b = if self.info.extended {
                disc.encode_extended().to_vec()
            } else {
                disc.encode_compact().to_vec()
            };
            let _ = live.stream.set_timeouts(None, Some(Duration::from_secs(1)));
            let _ = (&live.stream).write_all(&b);
            live.stream.shutdown();
        }
    }
}
