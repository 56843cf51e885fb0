//! Connecting to a server and negotiating an export (fixed newstyle), and listing exports.
//!
//! Negotiation runs on a blocking stream with read/write timeouts; the transmission phase is
//! in [`client`](super::client).

use super::error::{NbdError, ProtoError, Result};
use super::proto::{self, BlockSizes, Info, OptReply, TransmissionFlags};
use super::tls::{KernelTls, TlsConfig, TlsStream};
use super::uri::{NbdAddr, NbdUri};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// TCP keepalive: first probe after this much idle time.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// TCP keepalive: time between probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// TCP keepalive: unanswered probes before the connection is declared dead.
pub const KEEPALIVE_COUNT: u32 = 3;

/// `TCP_NODELAY` (requests are batched by the writer already) and keepalive, so a peer that
/// vanished without a FIN or RST is noticed even when no request is outstanding.
fn tune_tcp(s: &TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_COUNT);
    socket2::SockRef::from(s).set_tcp_keepalive(&ka)
}

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP (with `TCP_NODELAY`).
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
    /// VM socket (`AF_VSOCK`).
    Vsock(socket2::Socket),
    /// A TLS session over one of the above, encrypted in user space.
    Tls(Box<TlsStream>),
    /// A TLS session over TCP that the kernel encrypts and decrypts (kTLS): plaintext for us.
    KernelTls(TcpStream),
}

impl Stream {
    /// Connects to `addr`, giving up after `timeout`.
    pub fn connect(addr: &NbdAddr, timeout: Duration) -> Result<Stream> {
        let err = |source| NbdError::Connect {
            addr: addr.to_string(),
            source,
        };
        match addr {
            NbdAddr::Tcp { host, port } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for sa in (host.as_str(), *port).to_socket_addrs().map_err(err)? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            tune_tcp(&s).map_err(err)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(err(last))
            }
            NbdAddr::Unix(path) => {
                use std::os::unix::ffi::OsStrExt;
                let bytes = path.as_os_str().as_bytes();
                let s = if let Some(name) = bytes.strip_prefix(b"\0") {
                    use std::os::linux::net::SocketAddrExt;
                    let sa =
                        std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(err)?;
                    UnixStream::connect_addr(&sa)
                } else {
                    UnixStream::connect(path)
                };
                s.map(Stream::Unix).map_err(err)
            }
            NbdAddr::Vsock { cid, port } => {
                let s = socket2::Socket::new(socket2::Domain::VSOCK, socket2::Type::STREAM, None)
                    .map_err(err)?;
                s.connect_timeout(&socket2::SockAddr::vsock(*cid, *port), timeout)
                    .map_err(err)?;
                Ok(Stream::Vsock(s))
            }
        }
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::KernelTls(s) => Stream::KernelTls(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Vsock(s) => Stream::Vsock(s.try_clone()?),
            Stream::Tls(_) => return Err(io::ErrorKind::Unsupported.into()),
        })
    }

    /// Ends a TLS session cleanly (`close_notify`); nothing for plain sockets, nor for kernel
    /// TLS (the server sees the connection close after `NBD_CMD_DISC`).
    pub fn close_notify(&self) {
        if let Stream::Tls(t) = self {
            t.close_notify();
        }
    }

    /// Shuts the socket down (both directions); wakes any thread blocked on it.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) | Stream::KernelTls(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Vsock(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(t) => {
                t.socket().shutdown();
                Ok(())
            }
        };
    }

    /// Sets the read and write timeouts (`None`: block forever).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) | Stream::KernelTls(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Vsock(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Tls(t) => t.socket().set_timeouts(read, write),
        }
    }
}

impl std::os::fd::AsFd for Stream {
    /// The socket (for TLS, the one carrying the encrypted bytes).
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) | Stream::KernelTls(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
            Stream::Vsock(s) => s.as_fd(),
            Stream::Tls(t) => t.socket().as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) | Stream::KernelTls(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
            Stream::Vsock(s) => (&*s).read(buf),
            Stream::Tls(t) => (&**t).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) | Stream::KernelTls(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
            Stream::Vsock(s) => (&*s).write(buf),
            Stream::Tls(t) => (&**t).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream whose reads and writes each take at most `each`, and all must end by `end`: the
/// socket's timeouts are set before each, so that a server answering a byte at a time, each
/// within the per-read timeout, cannot stretch a handshake without end.
struct Deadline<'a> {
    s: &'a Stream,
    each: Duration,
    end: Instant,
}

impl<'a> Deadline<'a> {
    /// `s` with `opts.timeout` per read or write, all of them ending by `end`.
    fn new(s: &'a Stream, opts: &ConnectOptions, end: Instant) -> Deadline<'a> {
        Deadline {
            s,
            each: opts.timeout,
            end,
        }
    }

    fn arm(&self) -> io::Result<()> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let t = left.min(self.each);
        self.s.set_timeouts(Some(t), Some(t))
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.s;
        s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        let mut s = self.s;
        s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Most `NBD_REP_INFO` replies accepted for one `NBD_OPT_GO` (there are four kinds).
const MAX_INFO_REPLIES: usize = 64;
/// Most exports accepted from `NBD_OPT_LIST`.
const MAX_LISTED: usize = 4096;

/// Negotiation choices.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Limit for connecting and for each step of the negotiation.
    pub timeout: Duration,
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    pub structured_replies: bool,
    /// Ask for extended headers first (`NBD_OPT_EXTENDED_HEADERS`; on by default, as in
    /// libnbd: a server that does not know the option refuses it and structured replies are
    /// asked for instead). Only with `structured_replies`, which extended headers include.
    pub extended_headers: bool,
    /// Require TLS with these credentials (`NBD_OPT_STARTTLS` first; no plaintext fallback).
    /// [`ConnectOptions::for_uri`] fills it from an `nbds://` URI.
    pub tls: Option<Arc<TlsConfig>>,
    /// Whether a TLS session goes to the kernel once the export is negotiated.
    pub ktls: Ktls,
}

/// Whether the kernel takes over a TLS session (kTLS) once the export is negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ktls {
    /// Where it can: over TCP, with the kernel's `tls` module. Otherwise rustls goes on.
    #[default]
    Auto,
    /// Always: a connection where the kernel cannot take the session fails.
    On,
    /// Never: rustls encrypts and decrypts in this process.
    Off,
}

impl ConnectOptions {
    /// These options, asking for exactly the reply format `info` has. Further connections to
    /// an export and reconnects use them: requests and replies keep the format the session
    /// was set up with, even where a server restarted meanwhile in a newer version would
    /// offer more (e.g. extended headers after an upgrade from qemu-nbd 7.2 to 10).
    pub fn same_format_as(&self, info: &ExportInfo) -> ConnectOptions {
        let mut o = self.clone();
        o.structured_replies = info.structured;
        o.extended_headers = info.extended;
        o
    }

    /// Loads the TLS credentials `uri` asks for, unless TLS is already configured.
    pub fn for_uri(mut self, uri: &NbdUri) -> Result<ConnectOptions> {
        if let (None, Some(p)) = (&self.tls, &uri.tls) {
            self.tls = Some(Arc::new(TlsConfig::new(p, &uri.addr)?));
        }
        Ok(self)
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            timeout: Duration::from_secs(10),
            structured_replies: true,
            extended_headers: true,
            tls: None,
            ktls: Ktls::Auto,
        }
    }
}

/// What negotiation established about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export name asked for.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints (the defaults when not advertised).
    pub block: BlockSizes,
    /// Whether the server advertised `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes_advertised: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
    /// `NBD_OPT_GO` was used (false: the `NBD_OPT_EXPORT_NAME` fallback).
    pub used_go: bool,
    /// The server's description, if sent.
    pub description: Option<String>,
}

impl ExportInfo {
    /// Whether `other` (from a later connection) presents the same export.
    pub fn same_export(&self, other: &ExportInfo) -> std::result::Result<(), String> {
        if self.size != other.size {
            return Err(format!("size {} became {}", self.size, other.size));
        }
        if self.flags != other.flags {
            return Err(format!(
                "flags {:#x} became {:#x}",
                self.flags.bits(),
                other.flags.bits()
            ));
        }
        if self.block != other.block {
            return Err(format!(
                "block sizes {:?} became {:?}",
                self.block, other.block
            ));
        }
        if (self.structured, self.extended) != (other.structured, other.extended) {
            return Err("reply format changed".into());
        }
        Ok(())
    }
}

/// One entry of `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    /// Export name.
    pub name: String,
    /// Description (may be empty).
    pub description: String,
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    proto::encode_option(opt, data, &mut b);
    s.write_all(&b)?;
    Ok(())
}

fn read_opt_reply<S: Read>(s: &mut S, opt: u32) -> Result<(OptReply, Vec<u8>)> {
    let mut h = [0u8; proto::OPT_REPLY_LEN];
    s.read_exact(&mut h)?;
    let r = proto::decode_opt_reply(&h, opt)?;
    let mut p = vec![0u8; r.len as usize];
    s.read_exact(&mut p)?;
    Ok((r, p))
}

fn refused(opt: u32, r: &OptReply, payload: &[u8]) -> NbdError {
    if r.reply == proto::REP_ERR_TLS_REQD {
        return NbdError::TlsRequired {
            option: proto::option_name(opt),
        };
    }
    NbdError::OptionRefused {
        option: proto::option_name(opt),
        reply: proto::reply_name(r.reply),
        message: String::from_utf8_lossy(payload).into_owned(),
    }
}

/// Reads the greeting and answers it; returns the handshake flags.
fn greet<S: Read + Write>(s: &mut S) -> Result<u16> {
    let mut g = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut g[..16])?;
    if g[8..16] == proto::CLISERV_MAGIC.to_be_bytes() {
        return Err(NbdError::NotNewstyle("oldstyle greeting"));
    }
    s.read_exact(&mut g[16..])?;
    let flags = proto::decode_greeting(&g)?;
    if flags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::NotNewstyle("no NBD_FLAG_FIXED_NEWSTYLE"));
    }
    s.write_all(&proto::client_flags(flags).to_be_bytes())?;
    Ok(flags)
}

/// An option without data whose only reply is ACK or an error: `Ok(true)` on ACK.
fn simple_option<S: Read + Write>(s: &mut S, opt: u32) -> Result<bool> {
    send_option(s, opt, &[])?;
    let (r, _) = read_opt_reply(s, opt)?;
    match r.reply {
        proto::REP_ACK => Ok(true),
        _ if r.is_error() => Ok(false),
        _ => Err(ProtoError::Mismatch("unexpected reply to a data-less option").into()),
    }
}

/// Negotiates `export` on a fresh connection: greeting, extended headers or structured
/// replies if asked for, then `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`, falling back to
/// `NBD_OPT_EXPORT_NAME` when the server does not know GO. On success the stream is in the
/// transmission phase.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    export: &str,
    opts: &ConnectOptions,
) -> Result<ExportInfo> {
    let hflags = greet(s)?;
    negotiate_export(s, hflags, export, opts)
}

/// `NBD_OPT_STARTTLS` and the TLS handshake, right after the greeting. A refusal is an error:
/// there is no fallback to plaintext.
fn start_tls(s: Stream, tls: &TlsConfig, addr: &NbdAddr) -> Result<Stream> {
    send_option(&mut &s, proto::OPT_STARTTLS, &[])?;
    let (r, p) = read_opt_reply(&mut &s, proto::OPT_STARTTLS)?;
    match r.reply {
        proto::REP_ACK => {}
        _ if r.is_error() => {
            return Err(NbdError::TlsRefused {
                reply: proto::reply_name(r.reply),
                message: String::from_utf8_lossy(&p).into_owned(),
            })
        }
        _ => return Err(ProtoError::Mismatch("unexpected reply to NBD_OPT_STARTTLS").into()),
    }
    Ok(Stream::Tls(Box::new(TlsStream::handshake(s, tls, addr)?)))
}

/// With TLS 1.3 a server that rejects the client's certificate says so in an alert after the
/// handshake (GnuTLS servers often just close); the first option then fails with a plain IO
/// error. Reads what the server sent last, so the error names the alert, or says that the
/// server dropped the session.
fn tls_alert(s: &Stream, addr: &NbdAddr, e: io::Error) -> NbdError {
    let mut b = [0u8; 64];
    let mut alert = None;
    for _ in 0..16 {
        match (&*s).read(&mut b) {
            Ok(n) if n > 0 => continue,
            Err(r) if r.kind() == io::ErrorKind::InvalidData => alert = Some(r),
            _ => {}
        }
        break;
    }
    match alert {
        Some(source) => NbdError::TlsHandshake {
            addr: addr.to_string(),
            source,
        },
        None if matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::UnexpectedEof
        ) =>
        {
            NbdError::TlsClosed {
                addr: addr.to_string(),
                source: e,
            }
        }
        None => NbdError::Io(e),
    }
}

/// Everything after the greeting (and after STARTTLS, if any).
fn negotiate_export<S: Read + Write>(
    s: &mut S,
    hflags: u16,
    export: &str,
    opts: &ConnectOptions,
) -> Result<ExportInfo> {
    let mut extended = false;
    let mut structured = false;
    if opts.extended_headers && opts.structured_replies {
        extended = simple_option(s, proto::OPT_EXTENDED_HEADERS)?;
        structured = extended;
    }
    if !extended && opts.structured_replies {
        structured = simple_option(s, proto::OPT_STRUCTURED_REPLY)?;
    }

    send_option(
        s,
        proto::OPT_GO,
        &proto::encode_go_data(export, &[proto::INFO_BLOCK_SIZE]),
    )?;
    let mut export_info = None;
    let mut block = None;
    let mut description = None;
    let mut fallback = false;
    let mut infos = 0;
    loop {
        let (r, p) = read_opt_reply(s, proto::OPT_GO)?;
        if r.reply == proto::REP_INFO {
            infos += 1;
            if infos > MAX_INFO_REPLIES {
                return Err(
                    ProtoError::Mismatch("endless NBD_REP_INFO replies to NBD_OPT_GO").into(),
                );
            }
        }
        match r.reply {
            proto::REP_ACK => break,
            proto::REP_INFO => match proto::decode_info(&p)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(b) => block = Some(b.validate()?),
                Info::Description(d) => description = Some(d),
                Info::Name(_) | Info::Unknown(_) => {}
            },
            proto::REP_ERR_UNSUP => {
                fallback = true;
                break;
            }
            _ if r.is_error() => return Err(refused(proto::OPT_GO, &r, &p)),
            _ => return Err(ProtoError::Mismatch("unexpected reply to NBD_OPT_GO").into()),
        }
    }
    let (size, flags) = if fallback {
        if extended {
            return Err(ProtoError::Mismatch(
                "NBD_OPT_GO unsupported but extended headers negotiated",
            )
            .into());
        }
        log::debug!("nbd: server lacks NBD_OPT_GO; using NBD_OPT_EXPORT_NAME");
        send_option(s, proto::OPT_EXPORT_NAME, export.as_bytes())?;
        let mut b = [0u8; 10 + 124];
        let n = if hflags & proto::FLAG_NO_ZEROES != 0 {
            10
        } else {
            134
        };
        match s.read_exact(&mut b[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(NbdError::OptionRefused {
                    option: "NBD_OPT_EXPORT_NAME",
                    reply: "a disconnect",
                    message: format!("no export {export:?}?"),
                })
            }
            Err(e) => return Err(e.into()),
        }
        proto::decode_export_name_reply(&b)?
    } else {
        export_info.ok_or(ProtoError::Mismatch("NBD_OPT_GO without NBD_INFO_EXPORT"))?
    };
    let flags = if flags.contains(TransmissionFlags::HAS_FLAGS) {
        flags
    } else {
        log::warn!("nbd: server did not set NBD_FLAG_HAS_FLAGS; ignoring its flags");
        TransmissionFlags::empty()
    };
    Ok(ExportInfo {
        name: export.to_string(),
        size,
        flags,
        block_sizes_advertised: block.is_some(),
        block: block.unwrap_or_default(),
        structured,
        extended,
        used_go: !fallback,
        description,
    })
}

/// Connects to `addr` and negotiates `export`; the stream is left without timeouts.
///
/// `opts.timeout` bounds the connect, each read and write of the handshake, and, twice over,
/// the whole handshake.
pub fn open(addr: &NbdAddr, export: &str, opts: &ConnectOptions) -> Result<(Stream, ExportInfo)> {
    let s = Stream::connect(addr, opts.timeout)?;
    let timed_out = |e: NbdError| match e {
        NbdError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            NbdError::HandshakeTimeout {
                addr: addr.to_string(),
                secs: opts.timeout.as_secs(),
            }
        }
        e => e,
    };
    // The whole handshake: twice the time of one read.
    let end = Instant::now() + opts.timeout * 2;
    let hflags = greet(&mut Deadline::new(&s, opts, end)).map_err(timed_out)?;
    let s = match &opts.tls {
        Some(tls) => start_tls(s, tls, addr)?,
        None => s,
    };
    let info = match negotiate_export(&mut Deadline::new(&s, opts, end), hflags, export, opts) {
        Err(NbdError::Io(e)) if opts.tls.is_some() => return Err(tls_alert(&s, addr, e)),
        Err(e @ (NbdError::OptionRefused { .. } | NbdError::TlsRequired { .. })) => {
            // The session is still in option haggling: end it as the protocol asks, so that
            // the server does not log a client that vanished.
            let _ = s.set_timeouts(Some(opts.timeout), Some(opts.timeout));
            abort_options(&mut &s);
            s.close_notify();
            return Err(e);
        }
        r => r.map_err(timed_out)?,
    };
    let s = match s {
        Stream::Tls(t) if opts.ktls != Ktls::Off => {
            let what = t.describe();
            match t.into_kernel()? {
                KernelTls::On(tcp) => {
                    log::info!("nbd: TLS with {addr} ({what}) handed to the kernel");
                    Stream::KernelTls(tcp)
                }
                KernelTls::Declined(t, why) if opts.ktls == Ktls::On => {
                    // The export is negotiated: leave as a client that is done.
                    let s = Stream::Tls(t);
                    let _ = (&s).write_all(&proto::RequestHeader::disc(info.extended));
                    s.close_notify();
                    return Err(NbdError::KernelTlsUnavailable(why));
                }
                KernelTls::Declined(t, why) => {
                    log::info!("nbd: TLS with {addr} ({what}) stays in user space: {why}");
                    Stream::Tls(t)
                }
            }
        }
        s => s,
    };
    s.set_timeouts(None, None)?;
    log::debug!("nbd: connected to {addr}, export {export:?}: {info:?}");
    Ok((s, info))
}

/// Lists the server's exports (`NBD_OPT_LIST`), then ends the session (`NBD_OPT_ABORT`).
pub fn list_exports(addr: &NbdAddr, opts: &ConnectOptions) -> Result<Vec<ExportEntry>> {
    let s = Stream::connect(addr, opts.timeout)?;
    let end = Instant::now() + opts.timeout * 2;
    greet(&mut Deadline::new(&s, opts, end))?;
    let s = match &opts.tls {
        Some(tls) => start_tls(s, tls, addr)?,
        None => s,
    };
    let list = list_after_greeting(&mut Deadline::new(&s, opts, end))?;
    let mut s = &s;
    let _ = s.set_timeouts(Some(opts.timeout), Some(opts.timeout));
    abort_options(&mut s);
    s.close_notify();
    s.shutdown();
    Ok(list)
}

/// What a client of `export` would see: negotiates it as [`open`] does, then disconnects
/// (`NBD_CMD_DISC`) without sending anything else.
pub fn probe_export(addr: &NbdAddr, export: &str, opts: &ConnectOptions) -> Result<ExportInfo> {
    // No transmission follows: the session stays with rustls.
    let opts = &ConnectOptions {
        ktls: Ktls::Off,
        ..opts.clone()
    };
    let (s, info) = open(addr, export, opts)?;
    // A server that is gone already is no reason to fail: the export was described.
    let _ = s.set_timeouts(Some(opts.timeout), Some(opts.timeout));
    let _ = (&s).write_all(&proto::RequestHeader::disc(info.extended));
    s.close_notify();
    s.shutdown();
    Ok(info)
}

/// Ends option haggling with `NBD_OPT_ABORT` (a soft disconnect: a server that just closes
/// is fine too).
fn abort_options<S: Read + Write>(s: &mut S) {
    if send_option(s, proto::OPT_ABORT, &[]).is_ok() {
        let _ = read_opt_reply(s, proto::OPT_ABORT);
    }
}

/// `NBD_OPT_LIST` on a fresh stream.
pub fn list_on<S: Read + Write>(s: &mut S) -> Result<Vec<ExportEntry>> {
    greet(s)?;
    list_after_greeting(s)
}

fn list_after_greeting<S: Read + Write>(s: &mut S) -> Result<Vec<ExportEntry>> {
    send_option(s, proto::OPT_LIST, &[])?;
    let mut out = Vec::new();
    loop {
        let (r, p) = read_opt_reply(s, proto::OPT_LIST)?;
        match r.reply {
            proto::REP_ACK => return Ok(out),
            proto::REP_SERVER => {
                if out.len() >= MAX_LISTED {
                    return Err(ProtoError::Mismatch("too many exports listed").into());
                }
                let (name, description) = proto::decode_rep_server(&p)?;
                out.push(ExportEntry { name, description });
            }
            _ if r.is_error() => return Err(refused(proto::OPT_LIST, &r, &p)),
            _ => return Err(ProtoError::Mismatch("unexpected reply to NBD_OPT_LIST").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that accepts but never greets (e.g. busy with another client): the error says
    /// it did not answer in time, naming the address.
    #[test]
    fn test_silent_server_is_a_handshake_timeout() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
        };
        let opts = ConnectOptions {
            timeout: Duration::from_millis(300),
            ..ConnectOptions::default()
        };
        let e = open(&addr, "", &opts).unwrap_err();
        assert!(matches!(e, NbdError::HandshakeTimeout { .. }), "{e:?}");
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
        drop(l);
    }

    /// A VM socket nobody listens on (or a machine without VM sockets): a connect error that
    /// names the address, at once.
    #[test]
    fn test_vsock_without_listener_is_a_connect_error() {
        let addr = NbdAddr::Vsock {
            cid: 1,
            port: 4_000_000_001,
        };
        let t = Instant::now();
        let e = Stream::connect(&addr, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, NbdError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("vsock:1:4000000001"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    }

    /// A fake server on a loopback port: `serve` gets the accepted connection.
    fn fake_server(
        serve: impl FnOnce(std::net::TcpStream) + Send + 'static,
    ) -> (NbdAddr, std::thread::JoinHandle<()>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
        };
        let t = std::thread::spawn(move || {
            if let Ok((c, _)) = l.accept() {
                serve(c);
            }
        });
        (addr, t)
    }

    fn greeting() -> Vec<u8> {
        let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
        g
    }

    /// A server that sends its greeting a byte at a time, each within the per-read timeout:
    /// the handshake still ends with a timeout, at twice the per-read one.
    #[test]
    fn test_drip_feeding_server_is_a_handshake_timeout() {
        let (addr, t) = fake_server(|mut c| {
            for b in greeting().iter().cycle().take(200) {
                if c.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let opts = ConnectOptions {
            timeout: Duration::from_millis(300),
            ..ConnectOptions::default()
        };
        let t0 = Instant::now();
        let e = open(&addr, "", &opts).unwrap_err();
        assert!(matches!(e, NbdError::HandshakeTimeout { .. }), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        t.join().unwrap();
    }

    /// A server that answers NBD_OPT_GO with NBD_REP_INFO replies and never ends them: the
    /// client gives up with a protocol error (not a hang, not a memory blow-up).
    #[test]
    fn test_endless_info_replies_are_refused() {
        let (addr, t) = fake_server(|mut c| {
            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
            if c.write_all(&greeting()).is_err() {
                return;
            }
            let mut flags = [0u8; 4];
            if c.read_exact(&mut flags).is_err() {
                return;
            }
            loop {
                let mut h = [0u8; 16];
                if c.read_exact(&mut h).is_err() {
                    return;
                }
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                if c.read_exact(&mut data).is_err() {
                    return;
                }
                let reply = |kind: u32, payload: &[u8]| {
                    let mut r = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
                    r.extend_from_slice(&opt.to_be_bytes());
                    r.extend_from_slice(&kind.to_be_bytes());
                    r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                    r.extend_from_slice(payload);
                    r
                };
                if opt != proto::OPT_GO {
                    if c.write_all(&reply(proto::REP_ERR_UNSUP, &[])).is_err() {
                        return;
                    }
                    continue;
                }
                // NBD_INFO_EXPORT: 1 MiB, no flags beyond HAS_FLAGS; forever.
                let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                info.extend_from_slice(&1u16.to_be_bytes());
                let r = reply(proto::REP_INFO, &info);
                while c.write_all(&r).is_ok() {}
                return;
            }
        });
        let e = open(&addr, "", &ConnectOptions::default()).unwrap_err();
        assert!(e.to_string().contains("NBD_REP_INFO"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn test_tcp_connections_get_nodelay_and_keepalive() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = NbdAddr::Tcp {
            host: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
        };
        let s = Stream::connect(&addr, Duration::from_secs(5)).unwrap();
        let Stream::Tcp(t) = &s else {
            panic!("not TCP: {s:?}")
        };
        assert!(t.nodelay().unwrap());
        let r = socket2::SockRef::from(t);
        assert!(r.keepalive().unwrap());
        assert_eq!(r.keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(r.keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(r.keepalive_retries().unwrap(), KEEPALIVE_COUNT);
    }
}
