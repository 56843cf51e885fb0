//! Helpers for the NBD client tests: real servers (nbdkit, qemu-nbd) on Unix sockets in a
//! temporary directory, a scriptable fake server, a watchdog, and a tiny PRNG.
#![allow(dead_code, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ublk_targets::nbd::proto;
use ublk_targets::nbd::{ClientOptions, Cmd, NbdAddr, NbdUri, Request};

pub const MIB: u64 = 1 << 20;

/// Skips the test (returns) with a printed reason when `bin` is not installed.
#[macro_export]
macro_rules! require_bin {
    ($bin:expr) => {
        if !$crate::nbd_util::have($bin) {
            eprintln!("SKIPPED: {} not installed", $bin);
            return;
        }
    };
}

pub fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// qemu-nbd 10 from Debian trixie (it negotiates extended headers; the host's 7.2 does not),
/// as `cargo xtask qemu-nbd-new` leaves it (`UBLK_QEMU_NBD_NEW` overrides the path). `None`
/// when it is not there, which fails the test under CI (`CI` set), where `.ci/run` fetches it.
pub fn qemu_nbd_new() -> Option<String> {
    let p = std::env::var("UBLK_QEMU_NBD_NEW").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/vm/qemu-nbd-trixie/qemu-nbd"
        )
        .to_string()
    });
    if Path::new(&p).exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{p} is missing: `cargo xtask qemu-nbd-new` fetches it"
    );
    eprintln!("SKIPPED: {p} is missing (`cargo xtask qemu-nbd-new` fetches it)");
    None
}

/// A unique temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ublk-nbd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process listening on a Unix socket; killed on drop.
pub struct Server {
    pub child: Child,
    pub sock: PathBuf,
    argv: Vec<String>,
}

impl Server {
    /// Starts `bin args...` and waits until `sock` accepts connections.
    pub fn start(bin: &str, args: &[&str], sock: &Path) -> Server {
        let argv: Vec<String> = std::iter::once(bin)
            .chain(args.iter().copied())
            .map(String::from)
            .collect();
        let mut s = Server {
            child: spawn(&argv, sock),
            sock: sock.to_path_buf(),
            argv,
        };
        s.wait_ready();
        s
    }

    /// `nbdkit -U SOCK -f [extra...]` (foreground, exit with the test).
    pub fn nbdkit(dir: &TempDir, extra: &[&str]) -> Server {
        let sock = dir.path("nbdkit.sock");
        let s = sock.to_str().unwrap().to_string();
        let mut args = vec!["-U", &s, "-f"];
        args.extend_from_slice(extra);
        Server::start("nbdkit", &args, &sock)
    }

    /// `qemu-nbd -k SOCK -f raw -t [extra...] FILE`.
    pub fn qemu_nbd(dir: &TempDir, file: &Path, extra: &[&str]) -> Server {
        Server::qemu_nbd_bin("qemu-nbd", dir, file, extra)
    }

    /// [`Server::qemu_nbd`] with another qemu-nbd binary.
    pub fn qemu_nbd_bin(bin: &str, dir: &TempDir, file: &Path, extra: &[&str]) -> Server {
        let sock = dir.path("qemu-nbd.sock");
        let s = sock.to_str().unwrap().to_string();
        let f = file.to_str().unwrap().to_string();
        let mut args = vec!["-k", &s, "-f", "raw", "-t"];
        args.extend_from_slice(extra);
        args.push(&f);
        Server::start(bin, &args, &sock)
    }

    /// qemu-storage-daemon (QEMU's block layer as a standalone server) exporting `file`, in
    /// `format` (raw, qcow2, ...), writable, as export `disk`.
    pub fn qemu_storage_daemon(dir: &TempDir, file: &Path, format: &str) -> Server {
        let sock = dir.path("qsd.sock");
        let args = [
            "--blockdev".to_string(),
            format!("driver=file,node-name=file0,filename={}", file.display()),
            "--blockdev".to_string(),
            format!("driver={format},node-name=disk0,file=file0"),
            "--nbd-server".to_string(),
            format!("addr.type=unix,addr.path={}", sock.display()),
            "--export".to_string(),
            "type=nbd,id=exp0,node-name=disk0,name=disk,writable=on".to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start("qemu-storage-daemon", &args, &sock)
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&self.sock) {
                // Listening. Say goodbye properly so the server does not log a broken pipe,
                // but do not wait for the greeting forever: a server serving one client at a
                // time (qemu-nbd without `-e`) leaves this probe in its backlog while a client
                // that connected first (a reconnecting one) is served.
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let mut g = [0u8; 18];
                if s.read_exact(&mut g).is_ok() {
                    let mut b = 1u32.to_be_bytes().to_vec();
                    proto::encode_option(proto::OPT_ABORT, &[], &mut b);
                    let _ = s.write_all(&b);
                    let _ = s.read(&mut [0u8; 20]);
                }
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("{:?} exited early: {st}", self.argv);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{:?} did not start listening", self.argv);
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }

    /// Starts the same command again.
    pub fn restart(&mut self) {
        self.child = spawn(&self.argv, &self.sock);
        self.wait_ready();
    }

    pub fn uri(&self, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Unix(self.sock.clone()),
            export: export.into(),
            tls: None,
        }
    }
}

fn spawn(argv: &[String], sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
pub fn with_timeout<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    init_log();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => h.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // Panicked: propagate.
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(_) => panic!("test hung for more than {secs} s"),
    }
}

/// Options with short timeouts for tests.
pub fn quick_opts() -> ClientOptions {
    let mut o = ClientOptions::default();
    o.connect.timeout = Duration::from_secs(5);
    o.request_timeout = Some(Duration::from_secs(10));
    o.reconnect_delay = Duration::from_millis(20);
    o.reconnect_delay_max = Duration::from_millis(200);
    o
}

/// xorshift64*.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn read(offset: u64, len: u32) -> Request {
    Request {
        cmd: Cmd::Read,
        fua: false,
        no_hole: false,
        offset,
        len,
        buf: Vec::new(),
    }
}

pub fn write(offset: u64, data: Vec<u8>, fua: bool) -> Request {
    Request {
        cmd: Cmd::Write,
        fua,
        no_hole: false,
        offset,
        len: data.len() as u32,
        buf: data,
    }
}

pub fn cmd(cmd: Cmd, offset: u64, len: u32) -> Request {
    Request {
        cmd,
        fua: false,
        no_hole: false,
        offset,
        len,
        buf: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Fake server

/// How the fake server negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nego {
    /// Structured replies + GO.
    Modern,
    /// No structured replies, GO refused (EXPORT_NAME fallback), no NO_ZEROES.
    Legacy,
    /// Extended headers + GO.
    Extended,
}

/// A fake server on a TCP loopback port: answers the handshake as told, then hands the
/// stream to `serve` for each connection (one at a time).
pub struct Fake {
    pub port: u16,
    pub conns: Arc<AtomicU64>,
}

pub const FAKE_SIZE: u64 = 4 * MIB;
pub const FAKE_FLAGS: u16 = 1 | 4 | 8 | 32 | 64; // HAS_FLAGS SEND_FLUSH SEND_FUA TRIM WRITE_ZEROES

impl Fake {
    pub fn start<F>(nego: Nego, serve: F) -> Fake
    where
        F: Fn(&mut TcpStream, bool) + Send + Sync + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns = Arc::new(AtomicU64::new(0));
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                c2.fetch_add(1, Ordering::SeqCst);
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                if let Some(structured) = handshake(&mut s, nego) {
                    serve(&mut s, structured);
                }
            }
        });
        Fake { port, conns }
    }

    pub fn uri(&self) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: self.port,
            },
            export: "fake".into(),
            tls: None,
        }
    }
}

fn opt_reply(s: &mut TcpStream, opt: u32, rep: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&rep.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Returns whether structured replies were negotiated, or None if the client went away.
fn handshake(s: &mut TcpStream, nego: Nego) -> Option<bool> {
    let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    let hflags = if nego == Nego::Legacy { 1u16 } else { 3 };
    g.extend_from_slice(&hflags.to_be_bytes());
    s.write_all(&g).ok()?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).ok()?;
    let mut structured = false;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).ok()?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).ok()?;
        let mut export = FAKE_SIZE.to_be_bytes().to_vec();
        export.extend_from_slice(&FAKE_FLAGS.to_be_bytes());
        match (opt, nego) {
            (proto::OPT_STRUCTURED_REPLY, Nego::Modern) => {
                structured = true;
                opt_reply(s, opt, proto::REP_ACK, &[]).ok()?;
            }
            (proto::OPT_EXTENDED_HEADERS, Nego::Extended) => {
                structured = true;
                opt_reply(s, opt, proto::REP_ACK, &[]).ok()?;
            }
            (proto::OPT_GO, Nego::Modern | Nego::Extended) => {
                let mut info = vec![0, 0];
                info.extend_from_slice(&export);
                opt_reply(s, opt, proto::REP_INFO, &info).ok()?;
                opt_reply(s, opt, proto::REP_ACK, &[]).ok()?;
                return Some(structured);
            }
            (proto::OPT_EXPORT_NAME, _) => {
                s.write_all(&export).ok()?;
                if hflags & 2 == 0 || u32::from_be_bytes(cf) & 2 == 0 {
                    s.write_all(&[0u8; 124]).ok()?;
                }
                return Some(structured);
            }
            (proto::OPT_ABORT, _) => {
                let _ = opt_reply(s, opt, proto::REP_ACK, &[]);
                return None;
            }
            _ => opt_reply(s, opt, proto::REP_ERR_UNSUP, b"nope").ok()?,
        }
    }
}

/// A request as the fake server sees it.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Reads one compact request header (and WRITE payload into `payload`).
pub fn read_req(s: &mut TcpStream, payload: &mut Vec<u8>) -> Option<Req> {
    let mut h = [0u8; 28];
    s.read_exact(&mut h).ok()?;
    assert_eq!(&h[0..4], &proto::REQUEST_MAGIC.to_be_bytes());
    let r = Req {
        flags: u16::from_be_bytes([h[4], h[5]]),
        cmd: u16::from_be_bytes([h[6], h[7]]),
        cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(h[24..28].try_into().unwrap()),
    };
    payload.clear();
    if r.cmd == proto::CMD_WRITE {
        payload.resize(r.len as usize, 0);
        s.read_exact(payload).ok()?;
    }
    Some(r)
}

pub fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut b = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A correct, simple-reply server over a shared memory image (for the fallback and
/// reconnect tests without external binaries).
pub fn serve_memory(mem: Arc<Mutex<Vec<u8>>>) -> impl Fn(&mut TcpStream, bool) + Send + Sync {
    move |s, _structured| {
        let mut payload = Vec::new();
        while let Some(r) = read_req(s, &mut payload) {
            let (o, l) = (r.offset as usize, r.len as usize);
            let mut out = simple_reply(r.cookie, 0);
            match r.cmd {
                proto::CMD_READ => out.extend_from_slice(&mem.lock().unwrap()[o..o + l]),
                proto::CMD_WRITE => mem.lock().unwrap()[o..o + l].copy_from_slice(&payload),
                proto::CMD_WRITE_ZEROES | proto::CMD_TRIM => mem.lock().unwrap()[o..o + l].fill(0),
                proto::CMD_DISC => return,
                _ => {}
            }
            if s.write_all(&out).is_err() {
                return;
            }
        }
    }
}

struct StderrLog;
impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        eprintln!("[{}] {}", r.level(), r.args());
    }
    fn flush(&self) {}
}

/// Sends `log` output to stderr (shown for failing tests); level from `NBD_TEST_LOG`.
pub fn init_log() {
    let level = match std::env::var("NBD_TEST_LOG").as_deref() {
        Ok("trace") => log::LevelFilter::Trace,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Info,
    };
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
}

/// A correct extended-headers server over a shared memory image.
pub fn serve_memory_extended(
    mem: Arc<Mutex<Vec<u8>>>,
) -> impl Fn(&mut TcpStream, bool) + Send + Sync {
    move |s, _| loop {
        let mut h = [0u8; 32];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        assert_eq!(&h[0..4], &proto::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let cookie = &h[8..16];
        let off = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
        let len = u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize;
        let reply = |ty: u16, payload: &[u8]| {
            let mut b = proto::EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&proto::REPLY_FLAG_DONE.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(cookie);
            b.extend_from_slice(&(off as u64).to_be_bytes());
            b.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            b.extend_from_slice(payload);
            b
        };
        let out = match cmd {
            proto::CMD_READ => {
                let mut p = (off as u64).to_be_bytes().to_vec();
                p.extend_from_slice(&mem.lock().unwrap()[off..off + len]);
                reply(proto::REPLY_TYPE_OFFSET_DATA, &p)
            }
            proto::CMD_WRITE => {
                assert!(flags & proto::CMD_FLAG_PAYLOAD_LEN != 0);
                let mut d = vec![0u8; len];
                if s.read_exact(&mut d).is_err() {
                    return;
                }
                mem.lock().unwrap()[off..off + len].copy_from_slice(&d);
                reply(proto::REPLY_TYPE_NONE, &[])
            }
            proto::CMD_DISC => return,
            _ => reply(proto::REPLY_TYPE_NONE, &[]),
        };
        if s.write_all(&out).is_err() {
            return;
        }
    }
}
