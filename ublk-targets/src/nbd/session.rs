//! The requests of one NBD connection and the parser of its replies, without IO: the core of
//! the io_uring engine ([`ring`](super::ring)), which feeds it the bytes it receives and sends
//! what it builds. Tested here on byte streams.
//!
//! Requests are indexed by their ublk tag; a cookie is `seq << 16 | tag`, and `seq` changes
//! on every (re)send, so a reply to anything not on the wire is a violation. Reply data goes
//! straight into the request's buffer through [`TagIo`].

use super::client::{cmd_flags, ClientOptions, Cmd, FlushBook};
use super::conn::ExportInfo;
use super::error::{NbdError, ProtoError};
use super::proto::{
    self, ChunkEvent, ChunkHeader, ChunkPlan, Coverage, Expect, Reply, RequestHeader,
    TransmissionFlags as TF,
};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use ublk_core::{IoCtx, IoFlags, IoRequest, Op, SendPart};

/// What the session needs of the queue: a place for READ data, and completions.
pub(crate) trait TagIo {
    /// Request `tag`'s buffer (empty if it is not available).
    fn buf(&mut self, tag: u16) -> &mut [u8];
    /// Completes request `tag`.
    fn complete(&mut self, tag: u16, res: i32);

    /// Places `data` in READ request `tag` at `at`; false if it cannot.
    fn put(&mut self, tag: u16, at: u32, data: &[u8]) -> bool {
        put_in(self.buf(tag), at, data)
    }

    /// Zeroes `len` bytes of READ request `tag` at `at`; false if it cannot.
    fn zero(&mut self, tag: u16, at: u32, len: u32) -> bool {
        zero_in(self.buf(tag), at, len)
    }
}

fn put_in(buf: &mut [u8], at: u32, data: &[u8]) -> bool {
    let at = at as usize;
    match buf.get_mut(at..at + data.len()) {
        Some(dst) => {
            dst.copy_from_slice(data);
            true
        }
        None => false,
    }
}

fn zero_in(buf: &mut [u8], at: u32, len: u32) -> bool {
    match buf.get_mut(at as usize..(at + len) as usize) {
        Some(dst) => {
            dst.fill(0);
            true
        }
        None => false,
    }
}

/// Zeros for holes where the kernel copies READ data in (user copy, zero copy).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl TagIo for IoCtx<'_> {
    fn buf(&mut self, tag: u16) -> &mut [u8] {
        IoCtx::buf(self, tag)
    }
    fn complete(&mut self, tag: u16, res: i32) {
        IoCtx::complete(self, tag, res);
    }

    /// In zero-copy mode, and in user copy where the handler moves READ data, the kernel
    /// copies `data` into the request's pages (user copy).
    fn put(&mut self, tag: u16, at: u32, data: &[u8]) -> bool {
        if !self.zero_copy() && !self.handler_moves(tag) {
            return put_in(IoCtx::buf(self, tag), at, data);
        }
        match self.copy_read_data(tag, at, data) {
            Ok(()) => true,
            Err(e) => {
                log::error!("nbd: cannot place READ data of tag {tag}: {e}");
                false
            }
        }
    }

    fn zero(&mut self, tag: u16, at: u32, len: u32) -> bool {
        if !self.zero_copy() && !self.handler_moves(tag) {
            return zero_in(IoCtx::buf(self, tag), at, len);
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u32);
            if !self.put(tag, at + done, &ZEROS[..n as usize]) {
                return false;
            }
            done += n;
        }
        true
    }
}

/// A request, indexed by tag.
#[derive(Debug)]
struct Slot {
    busy: bool,
    /// Sent on the current connection (a reply may come).
    wire: bool,
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
}

/// A READ payload remainder the caller may receive straight into the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Direct {
    /// The request.
    pub tag: u16,
    /// Where in its buffer.
    pub at: u32,
    /// How many bytes.
    pub len: u32,
    done: bool,
}

/// The requests of one queue over one connection at a time.
#[derive(Debug)]
pub(crate) struct Session {
    info: ExportInfo,
    opts: ClientOptions,
    read_only: bool,
    slots: Vec<Slot>,
    busy: usize,
    /// Tags to send, in order.
    queued: VecDeque<u16>,
    rx: Rx,
    /// READs on the wire of at least [`BIG_READ`] bytes.
    big_reads: usize,
    flushes: FlushBook,
}

/// A READ this large makes the engine receive payloads straight into request buffers
/// ([`Session::direct`]).
pub(crate) const BIG_READ: u32 = 32 << 10;

impl Session {
    pub(crate) fn new(info: ExportInfo, opts: ClientOptions, read_only: bool) -> Session {
        Session {
            info,
            opts,
            read_only,
            slots: Vec::new(),
            busy: 0,
            queued: VecDeque::new(),
            rx: Rx::Header,
            big_reads: 0,
            flushes: FlushBook::default(),
        }
    }

    /// Requests not yet completed.
    pub(crate) fn busy(&self) -> usize {
        self.busy
    }

    /// Requests waiting to be sent.
    pub(crate) fn queued(&self) -> usize {
        self.queued.len()
    }

    /// READs of at least [`BIG_READ`] bytes on the wire.
    pub(crate) fn big_reads(&self) -> usize {
        self.big_reads
    }

    /// How many bytes to receive next while only big READs are on the wire: the header of a
    /// READ's reply up to its data (a chunk header and its offset with structured replies), so
    /// that all the data can be received straight into the request's buffer. `None` while
    /// anything else is on the wire: its replies are small and better received many at a time.
    pub(crate) fn header_recv_len(&self) -> Option<usize> {
        if self.big_reads == 0 || self.big_reads != self.busy {
            return None;
        }
        match self.rx {
            Rx::Header => Some(match (self.info.extended, self.info.structured) {
                (true, _) => 32 + 8,
                (false, true) => 20 + 8,
                (false, false) => 16,
            }),
            Rx::ChunkOffset { .. } => Some(8),
            _ => None,
        }
    }

    fn slot(&mut self, tag: u16) -> &mut Slot {
        let t = usize::from(tag);
        if self.slots.len() <= t {
            self.slots.resize_with(t + 1, Slot::new);
        }
        &mut self.slots[t]
    }

    /// Checks and queues a request (the checks of
    /// [`Client::submit`](super::client::Client::submit)): `Ok` if queued, else the negative
    /// errno to complete it with at once.
    pub(crate) fn submit(&mut self, req: &IoRequest) -> Result<(), i32> {
        let f = self.info.flags;
        let cmd = match req.op {
            Op::Read => Cmd::Read,
            Op::Write => Cmd::Write,
            Op::Flush => Cmd::Flush,
            Op::Discard => Cmd::Trim,
            Op::WriteZeroes => Cmd::WriteZeroes,
            _ => return Err(-libc::EOPNOTSUPP),
        };
        match cmd {
            Cmd::Read | Cmd::Write if req.len == 0 || req.len > self.info.block.max_payload => {
                return Err(-libc::EINVAL)
            }
            Cmd::Flush if !f.contains(TF::SEND_FLUSH) => return Err(-libc::EOPNOTSUPP),
            Cmd::Trim if !f.contains(TF::SEND_TRIM) => return Err(-libc::EOPNOTSUPP),
            Cmd::WriteZeroes if !f.contains(TF::SEND_WRITE_ZEROES) => {
                return Err(-libc::EOPNOTSUPP)
            }
            _ => {}
        }
        if cmd.modifies() && (self.read_only || f.contains(TF::READ_ONLY)) {
            return Err(-libc::EROFS);
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
            return Err(-libc::EINVAL);
        }
        let flags = cmd_flags(
            &self.info,
            &self.opts,
            cmd,
            req.flags.contains(IoFlags::FUA),
            req.flags.contains(IoFlags::NOUNMAP),
        );
        let covers = self.flushes.covers();
        let s = self.slot(req.tag);
        if s.busy {
            log::error!("nbd: tag {} submitted twice", req.tag);
            return Err(-libc::EIO);
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
        Ok(())
    }

    /// Moves up to `max` queued requests on the wire: their headers go into `bytes`, and
    /// `parts` says what to send in order (headers, WRITE payloads from the request buffers).
    /// Returns the number of bytes to send (0: nothing queued).
    pub(crate) fn build_send(
        &mut self,
        max: usize,
        bytes: &mut Vec<u8>,
        parts: &mut Vec<SendPart>,
    ) -> usize {
        let extended = self.info.extended;
        let mut total = 0;
        let mut n = 0;
        while n < max {
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
            if s.cmd == Cmd::Read && s.len >= BIG_READ {
                self.big_reads += 1;
            }
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
            match parts.last_mut() {
                Some(SendPart::Bytes(r)) if r.end == start => r.end = bytes.len(),
                _ => parts.push(SendPart::Bytes(start..bytes.len())),
            }
            total += bytes.len() - start;
            if s.cmd == Cmd::Write {
                parts.push(SendPart::Tag {
                    tag,
                    off: 0,
                    len: s.len,
                });
                total += s.len as usize;
            }
        }
        total
    }

    /// Frees `tag`'s slot and completes its request.
    fn finish(&mut self, io: &mut impl TagIo, tag: u16, res: i32) {
        let s = self.slot(tag);
        if !s.busy {
            return;
        }
        let big = s.wire && s.cmd == Cmd::Read && s.len >= BIG_READ;
        s.busy = false;
        s.wire = false;
        self.busy -= 1;
        if big {
            self.big_reads -= 1;
        }
        io.complete(tag, res);
    }

    /// Parses `input`, the bytes received and not parsed yet; returns how many it consumed
    /// (an incomplete header or small chunk is left for the next call).
    pub(crate) fn parse(&mut self, io: &mut impl TagIo, input: &[u8]) -> Result<usize, NbdError> {
        let extended = self.info.extended;
        let mut pos = 0;
        loop {
            let avail = &input[pos..];
            match self.rx {
                Rx::Header => {
                    if avail.len() < 4 {
                        return Ok(pos);
                    }
                    let magic = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
                    let n = proto::reply_header_len(magic, extended)?;
                    if avail.len() < n {
                        return Ok(pos);
                    }
                    let reply = proto::decode_reply(&avail[..n], extended)?;
                    pos += n;
                    self.on_reply(io, reply)?;
                }
                Rx::ChunkOffset {
                    tag,
                    data_len,
                    done,
                } => {
                    let Some(off) = avail.get(..8) else {
                        return Ok(pos);
                    };
                    let off = u64::from_be_bytes(off.try_into().unwrap_or_default());
                    pos += 8;
                    let s = &mut self.slots[usize::from(tag)];
                    let at = proto::place_data(&s.expect(), off, data_len)?;
                    s.coverage.add(at, data_len)?;
                    self.rx = Rx::Data {
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
                        self.rx = Rx::Header;
                        if done {
                            self.reply_done(io, tag)?;
                        }
                        continue;
                    }
                    let n = avail.len().min(left as usize);
                    if n == 0 {
                        return Ok(pos);
                    }
                    if !io.put(tag, at, &avail[..n]) {
                        return Err(ProtoError::Mismatch("read reply for a busy buffer").into());
                    }
                    pos += n;
                    self.rx = Rx::Data {
                        tag,
                        at: at + n as u32,
                        left: left - n as u32,
                        done,
                    };
                }
                Rx::Small { tag, h, done } => {
                    let Some(payload) = avail.get(..h.len as usize) else {
                        return Ok(pos);
                    };
                    let s = &mut self.slots[usize::from(tag)];
                    let ev = proto::decode_small_chunk(&h, payload, &s.expect())?;
                    pos += payload.len();
                    match ev {
                        ChunkEvent::None => {}
                        ChunkEvent::Hole { buf_off, len } => {
                            s.coverage.add(buf_off, len)?;
                            if !io.zero(tag, buf_off, len) {
                                return Err(
                                    ProtoError::Mismatch("read reply for a busy buffer").into()
                                );
                            }
                        }
                        ChunkEvent::Error { error, message } => {
                            log::trace!("nbd: server error {error}: {message}");
                            s.error.get_or_insert(error);
                        }
                    }
                    self.rx = Rx::Header;
                    if done {
                        self.reply_done(io, tag)?;
                    }
                }
            }
        }
    }

    /// A READ payload remainder of at least `min` bytes (and at least 1) that the next
    /// receive could place straight into the request's buffer (after [`Session::parse`]
    /// consumed everything).
    pub(crate) fn direct(&self, min: u32) -> Option<Direct> {
        match self.rx {
            Rx::Data {
                tag,
                at,
                left,
                done,
            } if left >= min.max(1) => Some(Direct {
                tag,
                at,
                len: left,
                done,
            }),
            _ => None,
        }
    }

    /// The payload remainder `d` arrived in the request's buffer.
    pub(crate) fn direct_done(&mut self, io: &mut impl TagIo, d: Direct) -> Result<(), NbdError> {
        self.rx = Rx::Header;
        if d.done {
            self.reply_done(io, d.tag)?;
        }
        Ok(())
    }

    /// A reply header arrived.
    fn on_reply(&mut self, io: &mut impl TagIo, reply: Reply) -> Result<(), NbdError> {
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
                    self.rx = Rx::Data {
                        tag,
                        at: 0,
                        left: expect.len,
                        done: true,
                    };
                    return Ok(());
                }
                self.reply_done(io, tag)
            }
            Reply::Chunk(h) => {
                let done = h.done();
                self.rx = match proto::plan_chunk(&h, &expect)? {
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
    fn reply_done(&mut self, io: &mut impl TagIo, tag: u16) -> Result<(), NbdError> {
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
                    self.flushes.acked();
                    r
                }
                Cmd::Flush => self.flushes.flushed(s.flush_covers),
            }
        };
        self.finish(io, tag, res);
        Ok(())
    }

    /// The connection was lost: everything pending goes back in the queue, to be resent.
    pub(crate) fn connection_lost(&mut self) {
        if self.opts.fail_flush_after_reconnect {
            self.flushes.connection_lost();
        }
        self.rx = Rx::Header;
        self.queued.clear();
        self.big_reads = 0;
        for (tag, s) in self.slots.iter_mut().enumerate() {
            if s.busy {
                s.wire = false;
                s.coverage.clear();
                s.error = None;
                self.queued.push_back(tag as u16);
            }
        }
    }

    /// Fails every pending request with `-EIO`.
    pub(crate) fn fail_all(&mut self, io: &mut impl TagIo) {
        self.queued.clear();
        for tag in 0..self.slots.len() {
            self.finish(io, tag as u16, -libc::EIO);
        }
    }

    /// Fails the requests not on the wire that are older than `timeout`; returns whether one
    /// on the wire is (the connection is then to be dropped).
    pub(crate) fn expire(&mut self, io: &mut impl TagIo, timeout: Duration) -> bool {
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
                self.finish(io, tag as u16, -libc::EIO);
            }
        }
        stuck
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::BlockSizes;

    /// Request buffers and completions, as the queue would have them.
    #[derive(Default)]
    struct FakeIo {
        bufs: Vec<Vec<u8>>,
        done: Vec<(u16, i32)>,
    }

    impl TagIo for FakeIo {
        fn buf(&mut self, tag: u16) -> &mut [u8] {
            &mut self.bufs[usize::from(tag)]
        }
        fn complete(&mut self, tag: u16, res: i32) {
            self.done.push((tag, res));
        }
    }

    fn session(structured: bool) -> Session {
        session_with(structured, false)
    }

    fn session_with(structured: bool, extended: bool) -> Session {
        let info = ExportInfo {
            name: String::new(),
            size: 1 << 20,
            flags: TF::HAS_FLAGS
                | TF::SEND_FLUSH
                | TF::SEND_FUA
                | TF::SEND_TRIM
                | TF::SEND_WRITE_ZEROES
                | TF::SEND_DF,
            block: BlockSizes::default(),
            block_sizes_advertised: false,
            structured,
            extended,
            used_go: true,
            description: None,
        };
        Session::new(info, ClientOptions::default(), false)
    }

    fn req(tag: u16, op: u32, offset: u64, len: u32) -> IoRequest {
        IoRequest {
            tag,
            op: match op {
                0 => Op::Read,
                1 => Op::Write,
                2 => Op::Flush,
                _ => Op::Discard,
            },
            flags: IoFlags::empty(),
            offset,
            len,
        }
    }

    /// Submits and "sends" requests; returns (tag, cookie, flags) of each header sent.
    fn send(s: &mut Session, reqs: &[IoRequest]) -> Vec<(u16, u64, u16)> {
        for r in reqs {
            s.submit(r).unwrap();
        }
        let (mut bytes, mut parts) = (Vec::new(), Vec::new());
        let total = s.build_send(64, &mut bytes, &mut parts);
        let mut out = Vec::new();
        for h in bytes.chunks(28) {
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            out.push((
                (cookie & 0xffff) as u16,
                cookie,
                u16::from_be_bytes([h[4], h[5]]),
            ));
        }
        let payload: usize = parts
            .iter()
            .map(|p| match p {
                SendPart::Tag { len, .. } => *len as usize,
                SendPart::Bytes(r) => r.len(),
            })
            .sum();
        assert_eq!(total, payload);
        out
    }

    fn simple(cookie: u64, error: u32) -> Vec<u8> {
        let mut b = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b
    }

    fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// Feeds `stream` in pieces of `step` bytes, as receives would bring it.
    fn feed(s: &mut Session, io: &mut FakeIo, stream: &[u8], step: usize) -> Result<(), NbdError> {
        let mut pending = Vec::new();
        for piece in stream.chunks(step) {
            pending.extend_from_slice(piece);
            let n = s.parse(io, &pending)?;
            pending.drain(..n);
        }
        assert!(pending.is_empty(), "{} bytes left unparsed", pending.len());
        Ok(())
    }

    #[test]
    fn test_simple_replies_in_any_split() {
        for step in [1, 3, 16, 17, 4096, 1 << 20] {
            let mut s = session(false);
            let mut io = FakeIo {
                bufs: vec![vec![0; 8192]; 4],
                ..FakeIo::default()
            };
            let sent = send(
                &mut s,
                &[req(0, 0, 0, 8192), req(1, 1, 8192, 4096), req(2, 2, 0, 0)],
            );
            // No DF without structured replies.
            assert!(sent.iter().all(|&(_, _, f)| f == 0));
            let mut stream = simple(sent[1].1, 0);
            stream.extend(simple(sent[0].1, 0));
            stream.extend((0..8192).map(|i| (i % 251) as u8));
            stream.extend(simple(sent[2].1, 0));
            feed(&mut s, &mut io, &stream, step).unwrap();
            assert_eq!(io.done, vec![(1, 4096), (0, 8192), (2, 0)], "step {step}");
            assert!(io.bufs[0]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8));
            assert_eq!(s.busy(), 0);
        }
    }

    #[test]
    fn test_structured_read_with_data_hole_and_errors() {
        let mut s = session(true);
        let mut io = FakeIo {
            bufs: vec![vec![0xaa; 4096]; 2],
            ..FakeIo::default()
        };
        let sent = send(&mut s, &[req(0, 0, 4096, 4096), req(1, 0, 0, 512)]);
        assert_eq!(sent[0].2, proto::CMD_FLAG_DF, "READs ask for one chunk");
        // Tag 0: data for the second half, a hole for the first.
        let mut d = (4096u64 + 2048).to_be_bytes().to_vec();
        d.extend_from_slice(&[7; 2048]);
        let mut stream = chunk(0, proto::REPLY_TYPE_OFFSET_DATA, sent[0].1, &d);
        let mut h = 4096u64.to_be_bytes().to_vec();
        h.extend_from_slice(&2048u32.to_be_bytes());
        stream.extend(chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_HOLE,
            sent[0].1,
            &h,
        ));
        // Tag 1: an error chunk (ENOSPC), then done.
        let mut e = proto::errno::ENOSPC.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bad");
        stream.extend(chunk(0, proto::REPLY_TYPE_ERROR, sent[1].1, &e));
        stream.extend(chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_NONE,
            sent[1].1,
            &[],
        ));
        feed(&mut s, &mut io, &stream, 5).unwrap();
        assert_eq!(io.done, vec![(0, 4096), (1, -libc::ENOSPC)]);
        assert!(io.bufs[0][..2048].iter().all(|&b| b == 0));
        assert!(io.bufs[0][2048..].iter().all(|&b| b == 7));
    }

    /// With extended headers every request header is 32 bytes (WRITE with PAYLOAD_LEN) and
    /// every reply an extended chunk; a compact reply is a violation.
    #[test]
    fn test_extended_headers() {
        let mut s = session_with(true, true);
        let mut io = FakeIo {
            bufs: vec![vec![0; 4096]; 3],
            ..FakeIo::default()
        };
        for r in [
            req(0, 0, 4096, 4096),
            req(1, 1, 0, 1024),
            req(2, 3, 0, 8192),
        ] {
            s.submit(&r).unwrap();
        }
        let (mut bytes, mut parts) = (Vec::new(), Vec::new());
        let total = s.build_send(64, &mut bytes, &mut parts);
        assert_eq!(bytes.len(), 3 * 32);
        assert_eq!(total, 3 * 32 + 1024, "headers and the WRITE payload");
        let mut cookies = Vec::new();
        for (h, (cmd, flags, off, len)) in bytes.chunks(32).zip([
            (proto::CMD_READ, proto::CMD_FLAG_DF, 4096u64, 4096u64),
            (proto::CMD_WRITE, proto::CMD_FLAG_PAYLOAD_LEN, 0, 1024),
            (proto::CMD_TRIM, 0, 0, 8192),
        ]) {
            assert_eq!(h[0..4], proto::EXTENDED_REQUEST_MAGIC.to_be_bytes());
            assert_eq!(u16::from_be_bytes([h[4], h[5]]), flags);
            assert_eq!(u16::from_be_bytes([h[6], h[7]]), cmd);
            assert_eq!(h[16..24], off.to_be_bytes());
            assert_eq!(h[24..32], len.to_be_bytes());
            cookies.push(u64::from_be_bytes(h[8..16].try_into().unwrap()));
        }
        let ext = |flags: u16, ty: u16, cookie: u64, off: u64, payload: &[u8]| {
            let mut b = proto::EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&off.to_be_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            b.extend_from_slice(payload);
            b
        };
        let done = proto::REPLY_FLAG_DONE;
        let mut d = 4096u64.to_be_bytes().to_vec();
        d.extend_from_slice(&[9; 4096]);
        let mut stream = ext(done, proto::REPLY_TYPE_NONE, cookies[1], 0, &[]);
        stream.extend(ext(
            done,
            proto::REPLY_TYPE_OFFSET_DATA,
            cookies[0],
            4096,
            &d,
        ));
        stream.extend(ext(done, proto::REPLY_TYPE_NONE, cookies[2], 0, &[]));
        feed(&mut s, &mut io, &stream, 7).unwrap();
        assert_eq!(io.done, vec![(1, 1024), (0, 4096), (2, 0)]);
        assert!(io.bufs[0].iter().all(|&b| b == 9));
        // A compact (simple) reply where extended ones were negotiated.
        let r = send(&mut s, &[]);
        assert!(r.is_empty());
        s.submit(&req(0, 0, 0, 512)).unwrap();
        let (mut bytes, mut parts) = (Vec::new(), Vec::new());
        s.build_send(64, &mut bytes, &mut parts);
        let cookie = u64::from_be_bytes(bytes[8..16].try_into().unwrap());
        assert!(feed(&mut s, &mut io, &simple(cookie, 0), 64).is_err());
    }

    #[test]
    fn test_violations_are_errors() {
        type Case = (&'static str, fn(u64) -> Vec<u8>);
        let cases: &[Case] = &[
            ("bad magic", |_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]),
            ("unknown cookie", |c| simple(c ^ (1 << 20), 0)),
            ("cookie above 48 bits", |c| simple(c | (1 << 50), 0)),
            ("data beyond the request", |c| {
                let mut p = 8192u64.to_be_bytes().to_vec();
                p.extend_from_slice(&[0; 4096]);
                chunk(1, proto::REPLY_TYPE_OFFSET_DATA, c, &p)
            }),
            ("done without full coverage", |c| {
                let mut h = 0u64.to_be_bytes().to_vec();
                h.extend_from_slice(&512u32.to_be_bytes());
                chunk(1, proto::REPLY_TYPE_OFFSET_HOLE, c, &h)
            }),
            ("overlapping chunks", |c| {
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend_from_slice(&[1; 4096]);
                let mut b = chunk(0, proto::REPLY_TYPE_OFFSET_DATA, c, &p);
                let mut h = 0u64.to_be_bytes().to_vec();
                h.extend_from_slice(&512u32.to_be_bytes());
                b.extend(chunk(1, proto::REPLY_TYPE_OFFSET_HOLE, c, &h));
                b
            }),
            ("unknown chunk type", |c| chunk(1, 77, c, &[1, 2, 3])),
            ("oversized chunk", |c| {
                let mut b = chunk(1, proto::REPLY_TYPE_OFFSET_DATA, c, &[]);
                b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                b
            }),
        ];
        for (name, reply) in cases {
            let mut s = session(true);
            let mut io = FakeIo {
                bufs: vec![vec![0; 4096]],
                ..FakeIo::default()
            };
            let sent = send(&mut s, &[req(0, 0, 0, 4096)]);
            let r = feed(&mut s, &mut io, &reply(sent[0].1), 1 << 20);
            assert!(r.is_err(), "{name}: accepted");
            assert!(io.done.is_empty(), "{name}: completed {:?}", io.done);
        }
    }

    #[test]
    fn test_resend_after_connection_loss_and_flush_after_lost_writes() {
        let mut s = session(false);
        let mut io = FakeIo {
            bufs: vec![vec![0; 4096]; 3],
            ..FakeIo::default()
        };
        let w = send(&mut s, &[req(0, 1, 0, 4096)]);
        feed(&mut s, &mut io, &simple(w[0].1, 0), 64).unwrap();
        // A read in flight when the connection goes; the acknowledged write was never flushed.
        let r = send(&mut s, &[req(1, 0, 0, 4096)]);
        s.connection_lost();
        assert_eq!(s.queued(), 1);
        let r2 = send(&mut s, &[req(2, 2, 0, 0)]);
        assert_eq!(r2.len(), 2, "the read is resent, then the flush");
        assert_ne!(r2[0].1, r[0].1, "a resent request gets a new cookie");
        // A reply to the old cookie is a violation.
        assert!(feed(&mut s, &mut io, &simple(r[0].1, 0), 64).is_err());
        let mut s2 = s;
        s2.rx = Rx::Header;
        let mut stream = simple(r2[0].1, 0);
        stream.extend([5; 4096]);
        stream.extend(simple(r2[1].1, 0));
        feed(&mut s2, &mut io, &stream, 100).unwrap();
        assert_eq!(io.done[1..], [(1, 4096), (2, -libc::EIO)]);
    }

    #[test]
    fn test_refusals_and_direct_receive() {
        let mut s = session(true);
        assert_eq!(s.submit(&req(0, 0, 1 << 20, 512)), Err(-libc::EINVAL));
        assert_eq!(s.submit(&req(0, 0, 0, 0)), Err(-libc::EINVAL));
        let mut ro = session(true);
        ro.read_only = true;
        assert_eq!(ro.submit(&req(0, 1, 0, 512)), Err(-libc::EROFS));
        // A large payload remainder is offered for a direct receive.
        let mut io = FakeIo {
            bufs: vec![vec![0; 65536]],
            ..FakeIo::default()
        };
        assert_eq!(s.header_recv_len(), None);
        let sent = send(&mut s, &[req(0, 0, 0, 65536)]);
        // Only a big READ on the wire: receive its chunk header and offset, nothing more.
        assert_eq!(s.header_recv_len(), Some(28));
        let mut head = chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            sent[0].1,
            &0u64.to_be_bytes(),
        );
        head[16..20].copy_from_slice(&(8u32 + 65536).to_be_bytes());
        assert_eq!(s.parse(&mut io, &head[..20]).unwrap(), 20);
        assert_eq!(s.header_recv_len(), Some(8));
        let mut head = head[20..].to_vec();
        head.extend_from_slice(&[3; 1000]);
        assert_eq!(s.parse(&mut io, &head).unwrap(), head.len());
        assert_eq!(s.header_recv_len(), None);
        let d = s.direct(32 << 10).unwrap();
        assert_eq!((d.tag, d.at, d.len), (0, 1000, 65536 - 1000));
        io.bufs[0][1000..].fill(3);
        s.direct_done(&mut io, d).unwrap();
        assert_eq!(io.done, vec![(0, 65536)]);
        assert!(s.direct(1).is_none());
        assert_eq!(s.big_reads(), 0);
        send(&mut s, &[req(0, 0, 0, 65536), req(1, 0, 0, 4096)]);
        assert_eq!(s.big_reads(), 1);
        // A small reply may come first: receive many at a time.
        assert_eq!(s.header_recv_len(), None);
        let mut simple_s = session(false);
        send(&mut simple_s, &[req(0, 0, 0, 65536)]);
        assert_eq!(simple_s.header_recv_len(), Some(16));
        s.connection_lost();
        assert_eq!(s.big_reads(), 0);
    }
}
