//! The io_uring engine: one NBD connection per ublk queue, driven entirely by the queue thread
//! on the queue's own io_uring. The socket carries plaintext for us: no TLS, or TLS that the
//! kernel encrypts (kTLS; there `MSG_WAITALL` is refused, so a send may be short and the rest
//! follows, and WRITE payloads always go in the `sendmsg`, never as linked operations).
//!
//! Per batch of requests the queue thread sends every new request with one `sendmsg` (headers
//! from a small buffer, WRITE payloads straight from the requests' own buffers: no copy), and
//! one `recv` is always posted on the socket; the replies it brings are parsed here, READ data
//! delivered and the requests completed. In user copy (the target's default where the kernel
//! has it) the kernel copies READ data from the receive buffer straight into the request
//! ([`QueueHandler::moves_data`]), and every receive takes all that has come: draining the
//! socket at once frees the server's socket buffer soonest (a server blocked on a full one
//! waits until most of it is read). In copy mode READ data is copied into the requests'
//! buffers, and a large remainder is received straight into the request buffer instead. The
//! ublk commits, the socket operations and the next fetches all go through the same
//! `io_uring_enter`: no other thread, lock, channel or wake-up on the data path (the threaded
//! [`Client`](super::client::Client) needs three threads and three copies per request).
//!
//! In zero-copy mode (`ublk add -z`, where io_uring sends and receives on registered buffers:
//! Linux 7.3) such a remainder is received straight into the request's pages, so a large READ
//! is copied once, from the socket to the pages, as in the kernel's nbd driver. While only
//! large READs are on the wire, each reply's header is received on its own (its exact size),
//! so all of the data takes that path; small READs, and the first bytes of a large one that
//! came in with other replies, are copied in by user copy. Large WRITE payloads are sent
//! straight from the request's pages, each a send from the fixed buffer linked between the
//! `sendmsg`s of the headers around it; small ones are copied into the request buffer by user
//! copy and sent with the headers.
//!
//! The protocol state and the reply parser are in `Session` (module `session`), without IO;
//! this module does the socket and ring side. The rules are those of the threaded engine:
//! cookies carry a per-request sequence number that changes on every (re)send, so a reply to
//! anything not on the wire is a violation; a violation, an IO error or a request on the wire past its timeout kills the
//! connection; a helper thread then reconnects with backoff (connect and negotiation block)
//! and hands the new socket over, the export is checked to be the same, and everything still
//! pending is resent. A request pending longer than the timeout fails with `-EIO`; after a
//! reconnect with acknowledged writes not yet flushed, the next FLUSH fails with `-EIO`.

use super::client::ClientOptions;
use super::conn::{self, ExportInfo, Stream};
use super::error::NbdError;
use super::proto::RequestHeader;
use super::session::{Direct, Session};
use super::uri::NbdUri;
use crossbeam_channel::Receiver;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use ublk_core::{Action, DataMode, IoCtx, IoRequest, Op, QueueHandler, SendPart};

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
/// While big READs are on the wire among other requests, receives into the receive buffer
/// stop at this many bytes (headers and small replies), so that big payloads are received
/// straight into their request buffers, whatever is left of them: one copy less. (With only
/// big READs on the wire, a receive takes just the next reply's header.)
const SMALL_RECV: usize = 4096;
/// In zero copy, a WRITE payload at least this large is sent straight from the request's pages
/// (a linked operation of its own); a smaller one is copied into the request buffer (user copy)
/// and goes with the headers: at 4 KiB the linked send costs more than the copy it saves.
const ZC_SEND_MIN: u32 = 32 << 10;
/// Most requests per `sendmsg`.
const SEND_BATCH: usize = 64;
/// Timer period while reconnecting.
const DOWN_TICK: Duration = Duration::from_millis(50);

/// The live connection.
#[derive(Debug)]
struct Live {
    stream: Stream,
    gen: u32,
    /// A `sendmsg` is in flight, of this many bytes.
    sending: Option<usize>,
    /// A receive into `rbuf` is in flight.
    receiving: bool,
    /// A receive straight into a request buffer is in flight.
    direct: Option<Direct>,
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
    session: Session,
    live: Option<Live>,
    next_gen: u32,
    reconnect: Option<Reconnect>,
    /// The last dead connection's socket, shut down but open until the next one is installed:
    /// operations on it queued but not yet submitted must not find its descriptor reused by
    /// the reconnecting thread's new socket.
    dead_stream: Option<Stream>,
    /// No reconnecting: everything fails.
    dead: bool,
    timer_armed: bool,
    rbuf: Vec<u8>,
    rpos: usize,
    sbuf: Vec<u8>,
    parts: Vec<SendPart>,
    reconnects: u64,
    /// The connection's TLS is in the kernel, which refuses `MSG_WAITALL`: sends may be short
    /// and the rest is sent after, so each must be one `sendmsg` (WRITE data copied in).
    kernel_tls: bool,
}

impl RingQueue {
    /// A handler serving its queue over `stream`, a negotiated connection (plaintext for us) to the
    /// export described by `info`.
    pub(crate) fn new(
        uri: Arc<NbdUri>,
        opts: Arc<ClientOptions>,
        info: Arc<ExportInfo>,
        read_only: bool,
        stream: Stream,
    ) -> RingQueue {
        let mut q = RingQueue {
            session: Session::new((*info).clone(), (*opts).clone(), read_only),
            uri,
            opts,
            info,
            live: None,
            next_gen: 1,
            reconnect: None,
            dead_stream: None,
            dead: false,
            timer_armed: false,
            rbuf: Vec::with_capacity(RBUF),
            rpos: 0,
            sbuf: Vec::new(),
            parts: Vec::new(),
            reconnects: 0,
            kernel_tls: false,
        };
        q.install(stream);
        q
    }

    fn install(&mut self, stream: Stream) {
        let _ = stream.set_timeouts(None, None);
        self.kernel_tls = matches!(stream, Stream::KernelTls(_));
        self.dead_stream = None;
        let gen = self.next_gen;
        self.next_gen = (self.next_gen + 1) & GEN_MASK;
        self.live = Some(Live {
            stream,
            gen,
            sending: None,
            receiving: false,
            direct: None,
        });
        self.rpos = 0;
        self.rbuf.clear();
    }

    /// Sends what is queued, in one `sendmsg`, unless one is already in flight.
    fn kick_send(&mut self, ctx: &mut IoCtx<'_>) {
        let Some(live) = &self.live else { return };
        if live.sending.is_some() || self.session.queued() == 0 {
            return;
        }
        let mut bytes = std::mem::take(&mut self.sbuf);
        bytes.clear();
        self.parts.clear();
        // In zero copy each WRITE payload is an operation of its own, and its header may
        // start another: at most two per request.
        let max = if ctx.zero_copy() {
            SEND_BATCH.min(ctx.send_max_ops() / 2)
        } else {
            SEND_BATCH
        };
        let total = self.session.build_send(max, &mut bytes, &mut self.parts);
        if total == 0 {
            self.sbuf = bytes;
            return;
        }
        let fd = live.stream.as_fd();
        let r = if self.kernel_tls {
            ctx.send_some(fd, bytes, &self.parts, EV_SEND | live.gen)
        } else {
            ctx.send(fd, bytes, &self.parts, EV_SEND | live.gen)
        };
        match r {
            Ok(()) => {
                if let Some(l) = &mut self.live {
                    l.sending = Some(total);
                }
            }
            Err(e) => self.kill(ctx, &format!("cannot send: {e}")),
        }
    }

    /// Sends what a short send (kernel TLS) left of the last one.
    fn send_rest(&mut self, ctx: &mut IoCtx<'_>, sent: usize, total: usize) {
        let Some(live) = &self.live else { return };
        log::trace!("nbd: short send ({sent} of {total} bytes), sending the rest");
        self.parts = SendPart::skip(&self.parts, sent);
        let bytes = std::mem::take(&mut self.sbuf);
        let r = ctx.send_some(live.stream.as_fd(), bytes, &self.parts, EV_SEND | live.gen);
        match r {
            Ok(()) => {
                if let Some(l) = &mut self.live {
                    l.sending = Some(total - sent);
                }
            }
            Err(e) => self.kill(ctx, &format!("cannot send: {e}")),
        }
    }

    /// Posts the next receive, unless one is in flight: straight into a request buffer for a
    /// large READ payload remainder, else into the receive buffer.
    fn kick_recv(&mut self, ctx: &mut IoCtx<'_>) {
        let Some(live) = &self.live else { return };
        if live.receiving || live.direct.is_some() {
            return;
        }
        let fd = live.stream.as_fd();
        let gen = live.gen;
        // In user copy the kernel copies READ data from the receive buffer straight into the
        // request (`TagIo::put`), so receiving into the request's buffer saves no copy; and
        // draining all that has come frees the server's socket buffer soonest.
        let staged = ctx.mode() == DataMode::UserCopy;
        let big = self.session.big_reads() > 0 && !staged;
        let direct = (self.rpos == self.rbuf.len() && !staged)
            .then(|| self.session.direct(if big { 1 } else { DIRECT_MIN }))
            .flatten();
        let r = match direct {
            Some(d) => ctx.recv_at(d.tag, fd, d.at, d.len, EV_RECV | gen),
            None => {
                // Keep the unparsed tail, at the front.
                self.rbuf.drain(..self.rpos);
                self.rpos = 0;
                if self.rbuf.capacity() - self.rbuf.len() < RBUF / 4 {
                    self.rbuf.reserve(RBUF);
                }
                let buf = std::mem::take(&mut self.rbuf);
                let max = match self.session.header_recv_len().filter(|_| !staged) {
                    // Only what comes before the data, which then goes straight to its
                    // request: none of it is copied in from here.
                    Some(n) => n.saturating_sub(self.rbuf.len()).max(1),
                    None if big => SMALL_RECV,
                    None => RBUF,
                };
                ctx.recv(fd, buf, max, EV_RECV | gen)
            }
        };
        match (r, &mut self.live) {
            (Ok(()), Some(live)) => {
                live.receiving = direct.is_none();
                live.direct = direct;
            }
            (Ok(()), None) => {}
            (Err(e), _) => self.kill(ctx, &format!("cannot receive: {e}")),
        }
    }

    /// Parses what the receive buffer holds.
    fn parse(&mut self, ctx: &mut IoCtx<'_>) {
        match self.session.parse(ctx, &self.rbuf[self.rpos..]) {
            Ok(n) => {
                self.rpos += n;
                self.kick_recv(ctx);
            }
            Err(e) => self.kill(ctx, &e.to_string()),
        }
    }

    /// Drops the live connection: everything pending is queued again, and a reconnect starts
    /// (or, without reconnecting, everything fails).
    fn kill(&mut self, ctx: &mut IoCtx<'_>, why: &str) {
        let Some(live) = self.live.take() else { return };
        log::warn!("nbd: connection to {} lost: {why}", self.uri.addr);
        live.stream.shutdown();
        self.dead_stream = Some(live.stream);
        self.rbuf.clear();
        self.rpos = 0;
        self.session.connection_lost();
        if !self.opts.reconnect {
            self.dead = true;
            self.session.fail_all(ctx);
            return;
        }
        self.start_reconnect();
        if self.dead {
            self.session.fail_all(ctx);
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
                        Err(e) => super::client::reconnect_failed(&uri.addr, &e),
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
            self.session.fail_all(ctx);
            return;
        }
        if let Some(s) = self.reconnect.as_ref().and_then(|r| r.rx.try_recv().ok()) {
            self.reconnect = None;
            self.reconnects += 1;
            log::info!(
                "nbd: reconnected to {}; resending {} requests",
                self.uri.addr,
                self.session.queued()
            );
            self.install(s);
        }
        if let Some(timeout) = self.opts.request_timeout {
            if self.session.expire(ctx, timeout) {
                self.kill(ctx, "a request timed out");
            }
        }
    }

    fn arm_timer(&mut self, ctx: &mut IoCtx<'_>) {
        if self.timer_armed {
            return;
        }
        let period = if self.live.is_none() && !self.dead {
            DOWN_TICK
        } else if self.session.busy() > 0 {
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

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    fn current(&self, data: u32) -> bool {
        self.live.as_ref().is_some_and(|l| l.gen == data & GEN_MASK)
    }
}

fn errno_text(res: i32) -> String {
    std::io::Error::from_raw_os_error(-res).to_string()
}

impl QueueHandler for RingQueue {
    /// In user copy, READ data goes from the receive buffer straight into the request.
    fn moves_data(&mut self, req: &IoRequest) -> bool {
        req.op == Op::Read
    }

    fn handle_io(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest) -> Action {
        if self.dead {
            return Action::Done(-libc::EIO);
        }
        if ctx.zero_copy() && req.op == Op::Write && (req.len < ZC_SEND_MIN || self.kernel_tls) {
            // A small payload costs less copied in now (user copy) and sent with the headers
            // than sent from its pages by an operation of its own. (With kernel TLS every
            // payload is: a send may be short, so it must be one `sendmsg`.)
            if let Err(e) = ctx.fetch_write_data(req.tag) {
                log::error!("nbd: cannot bring in WRITE data of tag {}: {e}", req.tag);
                return Action::Done(-libc::EIO);
            }
        }
        match self.session.submit(req) {
            Ok(()) => Action::Pending,
            Err(e) => Action::Done(e),
        }
    }

    fn on_complete(&mut self, ctx: &mut IoCtx<'_>, req: &IoRequest, data: u32, res: i32) -> Action {
        // A receive straight into the request's buffer.
        if !self.current(data) {
            return Action::Pending;
        }
        let Some(d) = self.live.as_mut().and_then(|l| l.direct.take()) else {
            self.kill(ctx, "unexpected receive completion");
            return Action::Pending;
        };
        if d.tag != req.tag || res != d.len as i32 {
            let why = if res < 0 {
                errno_text(res)
            } else {
                format!("short receive ({res} of {} bytes)", d.len)
            };
            self.kill(ctx, &why);
            return Action::Pending;
        }
        match self.session.direct_done(ctx, d) {
            Ok(()) => self.parse(ctx),
            Err(e) => self.kill(ctx, &e.to_string()),
        }
        Action::Pending
    }

    fn on_event(&mut self, ctx: &mut IoCtx<'_>, data: u32, res: i32, buf: Vec<u8>) {
        let current = self.current(data);
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
                if let Some(l) = &mut self.live {
                    l.receiving = false;
                }
                if res <= 0 {
                    let why = if res == 0 {
                        "closed by the server".to_string()
                    } else {
                        errno_text(res)
                    };
                    return self.kill(ctx, &why);
                }
                self.parse(ctx);
            }
            EV_SEND => {
                if !current {
                    if self.sbuf.capacity() == 0 {
                        self.sbuf = buf;
                    }
                    return;
                }
                // The buffer of the send in flight: a short send's rest is in it.
                self.sbuf = buf;
                let expected = self.live.as_mut().and_then(|l| l.sending.take());
                if let Some(total) = expected {
                    if self.kernel_tls && res > 0 && (res as usize) < total {
                        return self.send_rest(ctx, res as usize, total);
                    }
                }
                if res < 0 || Some(res as usize) != expected {
                    let why = if res < 0 {
                        errno_text(res)
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
        self.kick_recv(ctx);
        self.arm_timer(ctx);
    }
}

impl Drop for RingQueue {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            let b = RequestHeader::disc(self.info.extended);
            let _ = live.stream.set_timeouts(None, Some(Duration::from_secs(1)));
            let _ = (&live.stream).write_all(&b);
            live.stream.shutdown();
        }
    }
}
