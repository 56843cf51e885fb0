//! The transmission engine: one NBD connection with many requests in flight.
//!
//! Threads per [`Client`]:
//! * the **writer** (also the supervisor) sends request headers and WRITE payloads in order
//!   (header and payload contiguous on the stream), connects and reconnects with backoff,
//!   and expires requests that take longer than the request timeout;
//! * the **reader** (one per connection) parses replies, reassembles structured READ chunks
//!   into the request's own buffer (data at its offset, holes zero-filled, coverage tracked,
//!   overlaps refused) and completes requests through their [`Completion`].
//!
//! Requests live in a slot table; a cookie is `generation << 32 | slot`, and the generation
//! changes on every (re)send, so replies to anything not in flight are detected. A protocol
//! violation, an IO error or an expired request kills the connection; the writer then
//! reconnects, checks that the export is unchanged, and resends everything still pending.
//! Requests are only ever completed once; a request pending for longer than the timeout
//! completes with `-EIO`.
//!
//! With TLS the stream is a [`TlsStream`](super::tls::TlsStream), which lets the reader and the
//! writer share one rustls session; reconnecting redoes STARTTLS and the handshake.
//!
//! Buffers move with the request (`Vec<u8>`, handed back on completion), so a caller that
//! recycles them allocates nothing per request once warmed up.

use super::conn::{self, ConnectOptions, ExportInfo, Stream};
use super::error::{NbdError, ProtoError, Result};
use super::proto::TransmissionFlags as TF;
use super::proto::{self, ChunkEvent, ChunkPlan, Coverage, Expect, Reply, RequestHeader};
use super::uri::{NbdAddr, NbdUri};
use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`
    Write,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
}

impl Cmd {
    pub(crate) fn wire(self) -> u16 {
        match self {
            Cmd::Read => proto::CMD_READ,
            Cmd::Write => proto::CMD_WRITE,
            Cmd::Flush => proto::CMD_FLUSH,
            Cmd::Trim => proto::CMD_TRIM,
            Cmd::WriteZeroes => proto::CMD_WRITE_ZEROES,
        }
    }
    pub(crate) fn modifies(self) -> bool {
        matches!(self, Cmd::Write | Cmd::Trim | Cmd::WriteZeroes)
    }
}

/// One request.
#[derive(Debug)]
pub struct Request {
    /// The command.
    pub cmd: Cmd,
    /// `NBD_CMD_FLAG_FUA` (dropped if the export lacks `SEND_FUA`).
    pub fua: bool,
    /// `NBD_CMD_FLAG_NO_HOLE` (WRITE_ZEROES).
    pub no_hole: bool,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (READ/WRITE: at most the maximum payload).
    pub len: u32,
    /// WRITE: the payload (first `len` bytes). READ: resized to `len`, receives the data.
    /// Handed back on completion.
    pub buf: Vec<u8>,
}

/// Receives completions, on the reader or writer thread.
pub trait Completion: Send + Sync {
    /// Request `token` finished with `res`: bytes (READ/WRITE: the length), `0`, or a negative
    /// errno. `buf` is the request's buffer (READ: the data).
    fn complete(&self, token: u64, res: i32, buf: Vec<u8>);
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Connecting and negotiating.
    pub connect: ConnectOptions,
    /// A request still pending after this long fails with `-EIO` (and a connection with such
    /// a request outstanding is considered dead). `None`: wait forever.
    pub request_timeout: Option<Duration>,
    /// Reconnect after losing the connection (otherwise everything fails with `-EIO`).
    pub reconnect: bool,
    /// First delay between reconnect attempts; doubles up to `reconnect_delay_max`.
    pub reconnect_delay: Duration,
    /// Longest delay between reconnect attempts.
    pub reconnect_delay_max: Duration,
    /// Fail the next FLUSH with `-EIO` when the connection was lost while writes the server
    /// had acknowledged were not yet flushed (a restarted server may have lost them).
    pub fail_flush_after_reconnect: bool,
    /// Let the server answer READs with holes (`OFFSET_HOLE` chunks) rather than data. That
    /// saves bandwidth on sparse exports, but servers such as qemu-nbd then look up the
    /// allocation of every range read. Off (the default), READs carry `NBD_CMD_FLAG_DF` where
    /// the server offers it, and come back as one data chunk.
    pub sparse_reads: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect: ConnectOptions::default(),
            request_timeout: Some(Duration::from_secs(30)),
            reconnect: true,
            reconnect_delay: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_secs(2),
            fail_flush_after_reconnect: true,
            sparse_reads: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to be (re)sent.
    Queued,
    /// Handed to the writer: on the wire (or being written), awaiting its reply.
    Wire,
}

struct Slot {
    busy: bool,
    gen: u32,
    phase: Phase,
    /// The writer is sending it (a WRITE's buffer is taken).
    sending: bool,
    cmd: Cmd,
    flags: u16,
    offset: u64,
    len: u32,
    buf: Vec<u8>,
    sink: Option<Arc<dyn Completion>>,
    token: u64,
    start: Instant,
    coverage: Coverage,
    error: Option<u32>,
    /// FLUSH: `acked_writes` when it was submitted.
    flush_covers: u64,
    /// The reply arrived while the writer still held the buffer: the writer completes it.
    early: Option<i32>,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            busy: false,
            gen: 0,
            phase: Phase::Queued,
            sending: false,
            cmd: Cmd::Flush,
            flags: 0,
            offset: 0,
            len: 0,
            buf: Vec::new(),
            sink: None,
            token: 0,
            start: Instant::now(),
            coverage: Coverage::default(),
            error: None,
            flush_covers: 0,
            early: None,
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

/// A completion to deliver once the lock is dropped.
type Done = (Arc<dyn Completion>, u64, i32, Vec<u8>);

struct State {
    slots: Vec<Slot>,
    free: Vec<u32>,
    queue: VecDeque<u32>,
    /// Generation of the live connection (`None`: down).
    live: Option<u64>,
    stream: Option<Arc<Stream>>,
    conn_gen: u64,
    reader: Option<JoinHandle<()>>,
    shutdown: bool,
    /// Reconnecting is off and the connection is gone.
    dead: bool,
    in_flight: usize,
    flushes: FlushBook,
    reconnects: u64,
}

struct Inner {
    uri: NbdUri,
    opts: ClientOptions,
    info: ExportInfo,
    st: Mutex<State>,
    cv: Condvar,
}

/// An NBD connection serving requests from any thread. Dropping it fails whatever is still
/// pending, sends `NBD_CMD_DISC` and closes the connection.
pub struct Client {
    inner: Arc<Inner>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.inner.uri)
            .field("info", &self.inner.info)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Client {
    /// Connects and negotiates; fails if the server cannot be reached or refuses the export.
    pub fn connect(uri: &NbdUri, mut opts: ClientOptions) -> Result<Client> {
        opts.connect = opts.connect.for_uri(uri)?;
        let (stream, info) = conn::open(&uri.addr, &uri.export, &opts.connect)?;
        check_servable(&info)?;
        opts.connect = opts.connect.same_format_as(&info);
        Client::start(uri, opts, stream, info)
    }

    /// Connects another connection to the same export; it must present the same properties
    /// as `expect` (for one connection per queue with `CAN_MULTI_CONN`).
    pub fn connect_like(
        uri: &NbdUri,
        mut opts: ClientOptions,
        expect: &ExportInfo,
    ) -> Result<Client> {
        opts.connect = opts.connect.for_uri(uri)?.same_format_as(expect);
        let (stream, info) = conn::open(&uri.addr, &uri.export, &opts.connect)?;
        expect.same_export(&info).map_err(NbdError::ExportChanged)?;
        Client::start(uri, opts, stream, info)
    }

    /// Runs the engine on a connection already negotiated (by [`conn::open`]).
    pub(crate) fn start_on(
        uri: &NbdUri,
        opts: ClientOptions,
        stream: Stream,
        info: ExportInfo,
    ) -> Result<Client> {
        Client::start(uri, opts, stream, info)
    }

    fn start(
        uri: &NbdUri,
        opts: ClientOptions,
        stream: Stream,
        info: ExportInfo,
    ) -> Result<Client> {
        let inner = Arc::new(Inner {
            uri: uri.clone(),
            opts,
            info,
            st: Mutex::new(State {
                slots: Vec::new(),
                free: Vec::new(),
                queue: VecDeque::new(),
                live: None,
                stream: None,
                conn_gen: 0,
                reader: None,
                shutdown: false,
                dead: false,
                in_flight: 0,
                flushes: FlushBook::default(),
                reconnects: 0,
            }),
            cv: Condvar::new(),
        });
        install(&inner, &mut inner.lock(), stream)?;
        let i2 = inner.clone();
        let writer = std::thread::Builder::new()
            .name("nbd-writer".into())
            .spawn(move || writer_main(&i2));
        match writer {
            Ok(w) => Ok(Client {
                inner,
                writer: Some(w),
            }),
            Err(e) => {
                // The reader ends once its connection is shut down.
                let mut st = inner.lock();
                st.shutdown = true;
                if let Some(s) = &st.stream {
                    s.shutdown();
                }
                let reader = st.reader.take();
                drop(st);
                if let Some(r) = reader {
                    let _ = r.join();
                }
                Err(NbdError::Io(e))
            }
        }
    }

    /// What negotiation established (of the first connection; reconnects must match it).
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.inner.lock().reconnects
    }

    /// Whether a connection is currently up.
    pub fn is_connected(&self) -> bool {
        self.inner.lock().live.is_some()
    }

    /// Queues `req`; `sink.complete(token, ..)` is called exactly once when it finishes. A
    /// request refused at once comes back as `Err((negative errno, buffer))` and the sink is
    /// not called.
    pub fn submit(
        &self,
        mut req: Request,
        sink: Arc<dyn Completion>,
        token: u64,
    ) -> std::result::Result<(), (i32, Vec<u8>)> {
        let info = &self.inner.info;
        let f = info.flags;
        let refuse = |e: i32, buf| Err((-e, buf));
        match req.cmd {
            Cmd::Read | Cmd::Write => {
                if req.len == 0 || req.len > info.block.max_payload {
                    return refuse(libc::EINVAL, req.buf);
                }
                if req.cmd == Cmd::Write && req.buf.len() < req.len as usize {
                    return refuse(libc::EINVAL, req.buf);
                }
                if req.cmd == Cmd::Read {
                    req.buf.resize(req.len as usize, 0);
                }
            }
            Cmd::Flush if !f.contains(TF::SEND_FLUSH) => return refuse(libc::EOPNOTSUPP, req.buf),
            Cmd::Trim if !f.contains(TF::SEND_TRIM) => return refuse(libc::EOPNOTSUPP, req.buf),
            Cmd::WriteZeroes if !f.contains(TF::SEND_WRITE_ZEROES) => {
                return refuse(libc::EOPNOTSUPP, req.buf)
            }
            _ => {}
        }
        if req.cmd.modifies() && f.contains(TF::READ_ONLY) {
            return refuse(libc::EROFS, req.buf);
        }
        if req.cmd != Cmd::Flush
            && req
                .offset
                .checked_add(req.len.into())
                .is_none_or(|e| e > info.size)
        {
            return refuse(libc::EINVAL, req.buf);
        }
        let flags = cmd_flags(info, &self.inner.opts, req.cmd, req.fua, req.no_hole);
        let mut st = self.inner.lock();
        if st.shutdown || st.dead {
            return refuse(libc::EIO, req.buf);
        }
        let idx = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(Slot::empty());
                (st.slots.len() - 1) as u32
            }
        };
        let covers = st.flushes.covers();
        let s = &mut st.slots[idx as usize];
        s.busy = true;
        s.phase = Phase::Queued;
        s.cmd = req.cmd;
        s.flags = flags;
        s.offset = req.offset;
        s.len = req.len;
        s.buf = req.buf;
        s.sink = Some(sink);
        s.token = token;
        s.start = Instant::now();
        s.coverage.clear();
        s.error = None;
        s.flush_covers = covers;
        s.early = None;
        st.in_flight += 1;
        st.queue.push_back(idx);
        drop(st);
        self.inner.cv.notify_all();
        Ok(())
    }

    /// Runs one request and waits for it: `(res, buffer)`.
    pub fn call(&self, req: Request) -> (i32, Vec<u8>) {
        let w = Arc::new(Waiter::default());
        match self.submit(req, w.clone(), 0) {
            Ok(()) => w.wait(),
            Err(r) => r,
        }
    }

    /// Requests not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.inner.lock().shutdown = true;
        self.inner.cv.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// A one-shot [`Completion`] to wait on.
#[derive(Default)]
pub struct Waiter {
    r: Mutex<Option<(i32, Vec<u8>)>>,
    cv: Condvar,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").finish_non_exhaustive()
    }
}

impl Waiter {
    /// Blocks until the completion arrives, and takes it.
    pub fn wait(&self) -> (i32, Vec<u8>) {
        let mut g = self.r.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Completion for Waiter {
    fn complete(&self, _token: u64, res: i32, buf: Vec<u8>) {
        *self.r.lock().unwrap_or_else(|e| e.into_inner()) = Some((res, buf));
        self.cv.notify_all();
    }
}

/// The `NBD_CMD_FLAG_*` of a request: FUA and NO_HOLE as asked (FUA only where the export
/// takes it), DF on READs unless `opts.sparse_reads` (where the export takes it).
///
/// Never `FAST_ZERO`: a WRITE_ZEROES request reaching a block driver must zero the range
/// whatever it costs (the block layer decides on its fallback to plain writes before the
/// request is made, from the device's write-zeroes limit, and passes no "fast only" flag
/// down), so a server's fast refusal could only turn into an IO error.
pub(crate) fn cmd_flags(
    info: &ExportInfo,
    opts: &ClientOptions,
    cmd: Cmd,
    fua: bool,
    no_hole: bool,
) -> u16 {
    let f = info.flags;
    let mut flags = 0;
    if fua && f.contains(TF::SEND_FUA) {
        flags |= proto::CMD_FLAG_FUA;
    }
    if no_hole && cmd == Cmd::WriteZeroes {
        flags |= proto::CMD_FLAG_NO_HOLE;
    }
    if cmd == Cmd::Read && !opts.sparse_reads && info.structured && f.contains(TF::SEND_DF) {
        flags |= proto::CMD_FLAG_DF;
    }
    flags
}

/// Which acknowledged writes a FLUSH covers, and whether a connection loss may have lost
/// some (shared by both engines).
#[derive(Debug, Default)]
pub(crate) struct FlushBook {
    acked_writes: u64,
    flushed_upto: u64,
    lost_upto: u64,
}

impl FlushBook {
    /// What a FLUSH submitted now covers (its `covers` for [`FlushBook::flushed`]).
    pub(crate) fn covers(&self) -> u64 {
        self.acked_writes
    }

    /// The server acknowledged a write (WRITE, TRIM, WRITE_ZEROES).
    pub(crate) fn acked(&mut self) {
        self.acked_writes += 1;
    }

    /// The connection was lost: acknowledged writes not flushed yet may be gone.
    pub(crate) fn connection_lost(&mut self) {
        if self.acked_writes > self.flushed_upto {
            self.lost_upto = self.acked_writes;
        }
    }

    /// A FLUSH covering `covers` succeeded on the server: its result (`-EIO` once after a
    /// loss of unflushed writes).
    pub(crate) fn flushed(&mut self, covers: u64) -> i32 {
        let lost = self.lost_upto > self.flushed_upto;
        self.flushed_upto = self.flushed_upto.max(covers);
        if lost {
            log::error!(
                "nbd: failing FLUSH: acknowledged writes may have been lost across a reconnect"
            );
            self.lost_upto = 0;
            return -libc::EIO;
        }
        0
    }
}

/// Refuses exports a ublk device cannot serve.
pub(crate) fn check_servable(info: &ExportInfo) -> Result<()> {
    if info.block.min > 4096 {
        return Err(NbdError::ExportUnusable(format!(
            "minimum block size {} exceeds 4096",
            info.block.min
        )));
    }
    if info.size < 512 {
        return Err(NbdError::ExportUnusable(format!(
            "size {} is below one sector",
            info.size
        )));
    }
    if info.block.max_payload < 4096 {
        return Err(NbdError::ExportUnusable(format!(
            "maximum payload {} is below one page",
            info.block.max_payload
        )));
    }
    Ok(())
}

/// Makes `stream` the live connection and starts its reader; if the reader cannot be started,
/// the stream is shut down and nothing changes.
fn install(inner: &Arc<Inner>, st: &mut State, stream: Stream) -> io::Result<()> {
    let gen = st.conn_gen + 1;
    let stream = Arc::new(stream);
    let _ = stream.set_timeouts(None, inner.opts.request_timeout);
    let (i2, s2) = (inner.clone(), stream.clone());
    let reader = std::thread::Builder::new()
        .name("nbd-reader".into())
        .spawn(move || reader_main(&i2, &s2, gen));
    match reader {
        Ok(r) => {
            st.conn_gen = gen;
            st.stream = Some(stream);
            st.live = Some(gen);
            st.reader = Some(r);
            Ok(())
        }
        Err(e) => {
            stream.shutdown();
            Err(e)
        }
    }
}

/// Declares connection `gen` dead (if it still is the live one).
fn kill(inner: &Inner, st: &mut State, gen: u64, why: &dyn std::fmt::Display) {
    if st.live != Some(gen) {
        return;
    }
    if !st.shutdown {
        log::warn!("nbd: connection to {} lost: {why}", inner.uri.addr);
    }
    if let Some(s) = &st.stream {
        s.shutdown();
    }
    st.live = None;
    if inner.opts.fail_flush_after_reconnect {
        st.flushes.connection_lost();
    }
    inner.cv.notify_all();
}

/// Frees slot `idx` and returns its completion.
fn finish(st: &mut State, idx: u32, res: i32) -> Option<Done> {
    let s = &mut st.slots[idx as usize];
    if !s.busy {
        return None;
    }
    s.busy = false;
    s.gen = s.gen.wrapping_add(1);
    let sink = s.sink.take()?;
    let buf = std::mem::take(&mut s.buf);
    let token = s.token;
    st.free.push(idx);
    st.in_flight -= 1;
    Some((sink, token, res, buf))
}

fn deliver(d: Option<Done>) {
    if let Some((sink, token, res, buf)) = d {
        sink.complete(token, res, buf);
    }
}

// ---------------------------------------------------------------------------------------------
// Writer / supervisor

fn writer_main(inner: &Arc<Inner>) {
    let mut w = Writer {
        wbuf: Vec::with_capacity(WBUF),
        backoff: inner.opts.reconnect_delay,
        next_attempt: Instant::now(),
        last_expiry: Instant::now(),
        done: Vec::new(),
    };
    let mut st = inner.lock();
    loop {
        st = w.expire(inner, st);
        if st.shutdown {
            w.shut_down(inner, st);
            return;
        }
        if st.live.is_none() {
            st = w.down(inner, st);
            continue;
        }
        if let Some(idx) = st.queue.pop_front() {
            st = w.send(inner, st, idx);
            continue;
        }
        if !w.wbuf.is_empty() {
            st = w.flush_wbuf(inner, st);
            continue;
        }
        let wait = inner
            .opts
            .request_timeout
            .map_or(Duration::from_secs(1), |t| {
                (t / 4).min(Duration::from_secs(1))
            });
        st = inner
            .cv
            .wait_timeout(st, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

const WBUF: usize = 64 << 10;

struct Writer {
    wbuf: Vec<u8>,
    backoff: Duration,
    next_attempt: Instant,
    last_expiry: Instant,
    done: Vec<Done>,
}

impl Writer {
    fn flush_done<'a>(
        &mut self,
        inner: &'a Inner,
        st: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        if self.done.is_empty() {
            return st;
        }
        drop(st);
        for d in self.done.drain(..) {
            deliver(Some(d));
        }
        inner.lock()
    }

    /// Fails requests pending for longer than the timeout. Those on the wire take the
    /// connection down with them (they complete once the reader has let go of them).
    fn expire<'a>(
        &mut self,
        inner: &'a Inner,
        mut st: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        let Some(timeout) = inner.opts.request_timeout else {
            return st;
        };
        let now = Instant::now();
        if now.duration_since(self.last_expiry) < (timeout / 8).min(Duration::from_millis(100)) {
            return st;
        }
        self.last_expiry = now;
        let mut stuck = false;
        for i in 0..st.slots.len() {
            let s = &st.slots[i];
            if !s.busy || now.duration_since(s.start) < timeout {
                continue;
            }
            if s.phase == Phase::Queued {
                log::debug!("nbd: request {:?} at {} timed out", s.cmd, s.offset);
                if let Some(d) = finish(&mut st, i as u32, -libc::EIO) {
                    self.done.push(d);
                }
            } else {
                stuck = true;
            }
        }
        if stuck {
            if let Some(gen) = st.live {
                kill(inner, &mut st, gen, &"a request timed out");
            }
        }
        self.flush_done(inner, st)
    }

    /// The connection is down: let the old reader go, requeue what was on the wire, and
    /// reconnect (with backoff) unless reconnecting is off.
    fn down<'a>(
        &mut self,
        inner: &'a Arc<Inner>,
        mut st: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        if let Some(r) = st.reader.take() {
            drop(st);
            let _ = r.join();
            st = inner.lock();
            st.stream = None;
            self.wbuf.clear();
            st.queue.clear();
            for i in 0..st.slots.len() {
                let s = &mut st.slots[i];
                if s.busy {
                    s.phase = Phase::Queued;
                    s.sending = false;
                    s.coverage.clear();
                    s.error = None;
                    st.queue.push_back(i as u32);
                }
            }
            // Requests that timed out on the wire complete now.
            self.last_expiry = Instant::now() - Duration::from_secs(3600);
            st = self.expire(inner, st);
            if !inner.opts.reconnect {
                st.dead = true;
            }
        }
        if st.dead || st.shutdown {
            for i in 0..st.slots.len() {
                if let Some(d) = finish(&mut st, i as u32, -libc::EIO) {
                    self.done.push(d);
                }
            }
            st.queue.clear();
            st = self.flush_done(inner, st);
            if st.shutdown {
                return st;
            }
            return inner
                .cv
                .wait_timeout(st, Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let now = Instant::now();
        if now < self.next_attempt {
            let d = (self.next_attempt - now).min(Duration::from_millis(100));
            return inner
                .cv
                .wait_timeout(st, d)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        let r = conn::open(&inner.uri.addr, &inner.uri.export, &inner.opts.connect).and_then(
            |(s, info)| {
                inner
                    .info
                    .same_export(&info)
                    .map_err(NbdError::ExportChanged)?;
                Ok(s)
            },
        );
        let mut st = inner.lock();
        match r {
            Ok(s) if !st.shutdown => {
                if let Err(e) = install(inner, &mut st, s) {
                    log::error!("nbd: cannot start the reader of the new connection: {e}");
                    self.next_attempt = Instant::now() + self.backoff;
                    return st;
                }
                st.reconnects += 1;
                self.backoff = inner.opts.reconnect_delay;
                log::info!(
                    "nbd: reconnected to {}; resending {} requests",
                    inner.uri.addr,
                    st.queue.len()
                );
            }
            Ok(s) => s.shutdown(),
            Err(e) => {
                reconnect_failed(&inner.uri.addr, &e);
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(inner.opts.reconnect_delay_max);
            }
        }
        st
    }

    /// Sends slot `idx` (header, then the WRITE payload).
    fn send<'a>(
        &mut self,
        inner: &'a Inner,
        mut st: MutexGuard<'a, State>,
        idx: u32,
    ) -> MutexGuard<'a, State> {
        let (Some(gen), Some(stream)) = (st.live, st.stream.clone()) else {
            return st;
        };
        let last = st.queue.is_empty();
        let s = &mut st.slots[idx as usize];
        if !s.busy || s.phase != Phase::Queued {
            return st;
        }
        s.gen = s.gen.wrapping_add(1);
        let sent_gen = s.gen;
        let h = RequestHeader {
            flags: s.flags,
            cmd: s.cmd.wire(),
            cookie: (u64::from(s.gen) << 32) | u64::from(idx),
            offset: s.offset,
            len: s.len.into(),
        };
        let payload = if s.cmd == Cmd::Write {
            std::mem::take(&mut s.buf)
        } else {
            Vec::new()
        };
        s.phase = Phase::Wire;
        s.sending = true;
        drop(st);
        if inner.info.extended {
            self.wbuf.extend_from_slice(&h.encode_extended());
        } else {
            self.wbuf.extend_from_slice(&h.encode_compact());
        }
        let data = &payload[..payload.len().min(h.len as usize)];
        let mut r = Ok(());
        if data.len() <= WBUF - self.wbuf.len().min(WBUF) {
            self.wbuf.extend_from_slice(data);
        } else {
            r = (&*stream).write_all(&self.wbuf);
            self.wbuf.clear();
            if r.is_ok() {
                r = (&*stream).write_all(data);
            }
        }
        if r.is_ok() && (last || self.wbuf.len() >= WBUF / 2) {
            r = (&*stream).write_all(&self.wbuf);
            self.wbuf.clear();
        }
        let mut st = inner.lock();
        let s = &mut st.slots[idx as usize];
        // Only the writer completes a request in Sending, so the slot is still this request.
        debug_assert!(s.busy && s.gen == sent_gen);
        if s.busy && s.gen == sent_gen {
            if s.cmd == Cmd::Write {
                s.buf = payload;
            }
            s.sending = false;
            if let Some(res) = s.early.take() {
                self.done.extend(finish(&mut st, idx, res));
            }
        }
        if let Err(e) = r {
            self.wbuf.clear();
            kill(inner, &mut st, gen, &e);
        }
        self.flush_done(inner, st)
    }

    /// Writes out the batched headers.
    fn flush_wbuf<'a>(
        &mut self,
        inner: &'a Inner,
        st: MutexGuard<'a, State>,
    ) -> MutexGuard<'a, State> {
        let (Some(gen), Some(stream)) = (st.live, st.stream.clone()) else {
            self.wbuf.clear();
            return st;
        };
        drop(st);
        let r = (&*stream).write_all(&self.wbuf);
        self.wbuf.clear();
        let mut st = inner.lock();
        if let Err(e) = r {
            kill(inner, &mut st, gen, &e);
        }
        st
    }

    fn shut_down<'a>(&mut self, inner: &'a Inner, mut st: MutexGuard<'a, State>) {
        if let (Some(gen), Some(stream)) = (st.live, st.stream.clone()) {
            let mut b = std::mem::take(&mut self.wbuf);
            b.extend(RequestHeader::disc(inner.info.extended));
            if (&*stream).write_all(&b).is_ok() {
                stream.close_notify();
            }
            kill(inner, &mut st, gen, &"shutting down");
        }
        if let Some(r) = st.reader.take() {
            drop(st);
            let _ = r.join();
            st = inner.lock();
        }
        for i in 0..st.slots.len() {
            if let Some(d) = finish(&mut st, i as u32, -libc::EIO) {
                self.done.push(d);
            }
        }
        drop(st);
        for d in self.done.drain(..) {
            deliver(Some(d));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reader

fn reader_main(inner: &Inner, stream: &Stream, gen: u64) {
    let r = read_replies(inner, stream, gen);
    let mut st = inner.lock();
    let why: &dyn std::fmt::Display = match &r {
        Err(e) => e,
        Ok(()) => &"closed",
    };
    kill(inner, &mut st, gen, why);
}

/// Finds the slot a reply is for; anything not on the wire of this connection is a violation.
fn lookup(st: &State, cookie: u64) -> std::result::Result<u32, ProtoError> {
    let idx = cookie as u32;
    match st.slots.get(idx as usize) {
        Some(s)
            if s.busy
                && s.gen == (cookie >> 32) as u32
                && s.phase == Phase::Wire
                && s.early.is_none() =>
        {
            Ok(idx)
        }
        _ => Err(ProtoError::UnknownCookie(cookie)),
    }
}

/// The result of a finished request, and the bookkeeping for FLUSH.
fn result_of(st: &mut State, idx: u32) -> std::result::Result<i32, ProtoError> {
    let s = &st.slots[idx as usize];
    if let Some(e) = s.error {
        return Ok(-proto::errno_of(e));
    }
    let (cmd, len, covers) = (s.cmd, s.len, s.flush_covers);
    match cmd {
        Cmd::Read => {
            if s.coverage.covered() != u64::from(len) {
                return Err(ProtoError::Mismatch(
                    "read reply does not cover the request",
                ));
            }
            Ok(len as i32)
        }
        Cmd::Write | Cmd::Trim | Cmd::WriteZeroes => {
            st.flushes.acked();
            Ok(if cmd == Cmd::Write { len as i32 } else { 0 })
        }
        Cmd::Flush => Ok(st.flushes.flushed(covers)),
    }
}

fn read_replies(inner: &Inner, stream: &Stream, gen: u64) -> Result<()> {
    let extended = inner.info.extended;
    let mut rd = BufReader::with_capacity(128 << 10, stream);
    let mut hdr = [0u8; 32];
    let mut small = Vec::with_capacity(proto::MAX_SMALL_CHUNK as usize);
    loop {
        rd.read_exact(&mut hdr[..4])?;
        let n = proto::reply_header_len(
            u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
            extended,
        )?;
        rd.read_exact(&mut hdr[4..n])?;
        let reply = proto::decode_reply(&hdr[..n], extended)?;
        let mut st = inner.lock();
        if st.live != Some(gen) {
            return Ok(());
        }
        let idx = lookup(&st, reply.cookie())?;
        let expect = st.slots[idx as usize].expect();
        let done = match reply {
            Reply::Simple { error, .. } => {
                if error != 0 {
                    st.slots[idx as usize].error = Some(error);
                } else if expect.read {
                    st = receive(inner, st, &mut rd, idx, gen, 0, expect.len)?;
                    st.slots[idx as usize].coverage.add(0, expect.len)?;
                }
                true
            }
            Reply::Chunk(h) => {
                match proto::plan_chunk(&h, &expect)? {
                    ChunkPlan::OffsetData { data_len } => {
                        drop(st);
                        let mut off = [0u8; 8];
                        rd.read_exact(&mut off)?;
                        let at = proto::place_data(&expect, u64::from_be_bytes(off), data_len)?;
                        st = inner.lock();
                        if st.live != Some(gen) {
                            return Ok(());
                        }
                        st.slots[idx as usize].coverage.add(at, data_len)?;
                        st = receive(inner, st, &mut rd, idx, gen, at, data_len)?;
                    }
                    ChunkPlan::Small { len } => {
                        drop(st);
                        small.resize(len, 0);
                        rd.read_exact(&mut small)?;
                        st = inner.lock();
                        if st.live != Some(gen) {
                            return Ok(());
                        }
                        match proto::decode_small_chunk(&h, &small, &expect)? {
                            ChunkEvent::None => {}
                            ChunkEvent::Hole { buf_off, len } => {
                                let s = &mut st.slots[idx as usize];
                                s.coverage.add(buf_off, len)?;
                                s.buf[buf_off as usize..(buf_off + len) as usize].fill(0);
                            }
                            ChunkEvent::Error { error, message } => {
                                log::trace!("nbd: server error {error}: {message}");
                                let s = &mut st.slots[idx as usize];
                                s.error.get_or_insert(error);
                            }
                        }
                    }
                }
                h.done()
            }
        };
        if done {
            let res = result_of(&mut st, idx)?;
            let s = &mut st.slots[idx as usize];
            if s.sending {
                // The writer still holds the payload; it completes the request.
                s.early = Some(res);
                continue;
            }
            let d = finish(&mut st, idx, res);
            drop(st);
            deliver(d);
        }
    }
}

/// Receives `len` bytes into slot `idx`'s buffer at `at`, without holding the lock.
fn receive<'a, R: Read>(
    inner: &'a Inner,
    mut st: MutexGuard<'a, State>,
    rd: &mut R,
    idx: u32,
    gen: u64,
    at: u32,
    len: u32,
) -> Result<MutexGuard<'a, State>> {
    let s = &mut st.slots[idx as usize];
    let mut buf = std::mem::take(&mut s.buf);
    drop(st);
    let r = rd.read_exact(&mut buf[at as usize..(at + len) as usize]);
    let mut st = inner.lock();
    let s = &mut st.slots[idx as usize];
    s.buf = buf;
    r?;
    if st.live != Some(gen) {
        return Err(NbdError::Closed);
    }
    Ok(st)
}

/// Logs a failed reconnect attempt: at debug level while the server is unreachable, as a
/// warning when it answers with something else than the export the device was set up with.
pub(crate) fn reconnect_failed(addr: &NbdAddr, e: &NbdError) {
    if matches!(e, NbdError::ExportChanged(_)) {
        log::warn!("nbd: {addr} is back, but not with the same export ({e}); retrying");
    } else {
        log::debug!("nbd: reconnecting to {addr} failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::BlockSizes;

    fn info(flags: TF, structured: bool) -> ExportInfo {
        ExportInfo {
            name: String::new(),
            size: 1 << 20,
            flags: flags | TF::HAS_FLAGS,
            block: BlockSizes::default(),
            block_sizes_advertised: false,
            structured,
            extended: false,
            used_go: true,
            description: None,
        }
    }

    #[test]
    fn test_cmd_flags() {
        let o = ClientOptions::default();
        let all = info(TF::SEND_FUA | TF::SEND_DF, true);
        assert_eq!(
            cmd_flags(&all, &o, Cmd::Read, false, false),
            proto::CMD_FLAG_DF
        );
        assert_eq!(
            cmd_flags(&all, &o, Cmd::Write, true, false),
            proto::CMD_FLAG_FUA
        );
        assert_eq!(
            cmd_flags(&all, &o, Cmd::WriteZeroes, false, true),
            proto::CMD_FLAG_NO_HOLE
        );
        // NO_HOLE only means something to WRITE_ZEROES; FUA and DF only where offered.
        assert_eq!(cmd_flags(&all, &o, Cmd::Trim, false, true), 0);
        let none = info(TF::empty(), true);
        assert_eq!(cmd_flags(&none, &o, Cmd::Read, false, false), 0);
        assert_eq!(cmd_flags(&none, &o, Cmd::Write, true, false), 0);
        // No DF without structured replies, nor when sparse reads are wanted.
        let simple = info(TF::SEND_DF, false);
        assert_eq!(cmd_flags(&simple, &o, Cmd::Read, false, false), 0);
        let sparse = ClientOptions {
            sparse_reads: true,
            ..ClientOptions::default()
        };
        assert_eq!(cmd_flags(&all, &sparse, Cmd::Read, false, false), 0);
    }
}
