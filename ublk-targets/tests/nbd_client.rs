//! The NBD client against real servers (nbdkit, qemu-nbd, qemu-storage-daemon, nbd-server) on
//! Unix sockets, and against fake servers that misbehave. Tests needing a server binary print
//! `SKIPPED: ...` and pass when it is missing. Every test runs under a watchdog so a hang fails
//! instead of blocking CI.
#![allow(clippy::print_stderr)]

mod nbd_util;

use nbd_util::*;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ublk_targets::nbd::proto::{self, TransmissionFlags as TF};
use ublk_targets::nbd::{
    list_exports, probe_export, Client, Cmd, Completion, ConnectOptions, NbdError,
};

// ---------------------------------------------------------------------------------------------
// Negotiation

#[test]
fn test_nbd_negotiate_nbdkit_structured_and_block_sizes() {
    require_bin!("nbdkit");
    with_timeout(60, || {
        let dir = TempDir::new("nego");
        let srv = Server::nbdkit(&dir, &["memory", "64M"]);
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        let i = c.info();
        assert_eq!(i.size, 64 * MIB);
        assert!(i.structured && i.used_go);
        assert!(i
            .flags
            .contains(TF::HAS_FLAGS | TF::SEND_FLUSH | TF::SEND_FUA));
        assert!(i.flags.contains(TF::SEND_TRIM | TF::SEND_WRITE_ZEROES));
        assert!(
            i.flags.contains(TF::CAN_MULTI_CONN),
            "memory plugin is multi-conn"
        );
        drop(c);
        drop(srv);

        let srv = Server::nbdkit(&dir, &["--no-sr", "memory", "1M"]);
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        assert!(!c.info().structured);
        assert_eq!(c.info().size, MIB);
        drop(c);
        drop(srv);

        let srv = Server::nbdkit(
            &dir,
            &[
                "--filter=blocksize-policy",
                "memory",
                "8M",
                "blocksize-minimum=4096",
                "blocksize-preferred=65536",
                "blocksize-maximum=1M",
                "blocksize-error-policy=error",
            ],
        );
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        let b = c.info().block;
        assert!(c.info().block_sizes_advertised);
        assert_eq!(
            (b.min, b.preferred, b.max_payload),
            (4096, 65536, MIB as u32)
        );
        // A payload above the maximum is refused locally.
        let (res, _) = c.call(read(0, 2 * MIB as u32));
        assert_eq!(res, -libc::EINVAL);
        let (res, _) = c.call(read(0, MIB as u32));
        assert_eq!(res, MIB as i32);

        drop(c);
        drop(srv);
        let srv = Server::nbdkit(
            &dir,
            &[
                "-r",
                "--filter=multi-conn",
                "memory",
                "1M",
                "multi-conn-mode=disable",
            ],
        );
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        assert!(c.info().flags.contains(TF::READ_ONLY));
        assert!(!c.info().flags.contains(TF::CAN_MULTI_CONN));
        let (res, _) = c.call(write(0, vec![1; 512], false));
        assert_eq!(res, -libc::EROFS);
    });
}

#[test]
fn test_nbd_negotiate_qemu_nbd_multi_conn_and_unknown_export() {
    require_bin!("qemu-nbd");
    with_timeout(60, || {
        let dir = TempDir::new("qemu-nego");
        let img = dir.path("disk.raw");
        std::fs::write(&img, vec![0u8; 4 * MIB as usize]).unwrap();
        let srv = Server::qemu_nbd(&dir, &img, &["-x", "disk"]);
        let c = Client::connect(&srv.uri("disk"), quick_opts()).unwrap();
        assert_eq!(c.info().size, 4 * MIB);
        assert!(c.info().structured);
        assert!(!c.info().flags.contains(TF::CAN_MULTI_CONN));
        drop(c); // qemu-nbd serves one client at a time without -e
        let e = Client::connect(&srv.uri("nope"), quick_opts()).unwrap_err();
        assert!(
            matches!(
                e,
                NbdError::OptionRefused {
                    reply: "NBD_REP_ERR_UNKNOWN",
                    ..
                }
            ),
            "{e}"
        );
        drop(srv);
        let srv = Server::qemu_nbd(&dir, &img, &["-x", "disk", "-e", "2"]);
        let c = Client::connect(&srv.uri("disk"), quick_opts()).unwrap();
        assert!(c.info().flags.contains(TF::CAN_MULTI_CONN));
        // A second connection to the same export must look the same.
        let c2 = Client::connect_like(&srv.uri("disk"), quick_opts(), c.info()).unwrap();
        assert_eq!(c2.info().size, c.info().size);
    });
}

#[test]
fn test_nbd_list_exports() {
    require_bin!("qemu-nbd");
    with_timeout(30, || {
        let dir = TempDir::new("list");
        let img = dir.path("disk.raw");
        std::fs::write(&img, vec![0u8; MIB as usize]).unwrap();
        let srv = Server::qemu_nbd(&dir, &img, &["-x", "exp1", "-D", "the disk"]);
        let l = list_exports(&srv.uri("").addr, &ConnectOptions::default()).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "exp1");
        assert_eq!(l[0].description, "the disk");
        let i = probe_export(&srv.uri("").addr, "exp1", &ConnectOptions::default()).unwrap();
        assert_eq!(i.size, MIB);
        assert!(i.used_go);
        assert!(probe_export(&srv.uri("").addr, "nope", &ConnectOptions::default()).is_err());
        // Each connection was closed: the server (one client at a time) takes the next.
        let l = list_exports(&srv.uri("").addr, &ConnectOptions::default()).unwrap();
        assert_eq!(l.len(), 1);
    });
}

#[test]
fn test_nbd_export_name_fallback_with_fake_server() {
    with_timeout(30, || {
        let mem = Arc::new(Mutex::new(vec![0u8; FAKE_SIZE as usize]));
        let fake = Fake::start(Nego::Legacy, serve_memory(mem.clone()));
        let c = Client::connect(&fake.uri(), quick_opts()).unwrap();
        assert!(!c.info().used_go && !c.info().structured);
        assert_eq!(c.info().size, FAKE_SIZE);
        assert_eq!(c.info().block, proto::BlockSizes::default());
        let (res, _) = c.call(write(4096, vec![7; 8192], true));
        assert_eq!(res, 8192);
        let (res, buf) = c.call(read(4096, 8192));
        assert_eq!(res, 8192);
        assert!(buf.iter().all(|&b| b == 7));
        assert!(mem.lock().unwrap()[4096..12288].iter().all(|&b| b == 7));
    });
}

#[test]
fn test_nbd_extended_headers_with_fake_server() {
    with_timeout(30, || {
        let mem = Arc::new(Mutex::new(vec![0u8; FAKE_SIZE as usize]));
        let fake = Fake::start(Nego::Extended, serve_memory_extended(mem.clone()));
        // Asked for by default.
        let c = Client::connect(&fake.uri(), quick_opts()).unwrap();
        assert!(c.info().extended && c.info().structured);
        random_roundtrip(&c, FAKE_SIZE, 512, 64 << 10, 9);
        drop(c);
        // A server without extended headers: the option is refused and structured replies
        // are used instead.
        let fake = Fake::start(Nego::Modern, serve_memory(mem));
        let c = Client::connect(&fake.uri(), quick_opts()).unwrap();
        assert!(!c.info().extended && c.info().structured);
    });
}

// ---------------------------------------------------------------------------------------------
// Data

struct Collect {
    done: Mutex<Vec<(u64, i32, Vec<u8>)>>,
    cv: std::sync::Condvar,
}

impl Collect {
    fn new() -> Arc<Collect> {
        Arc::new(Collect {
            done: Mutex::new(Vec::new()),
            cv: std::sync::Condvar::new(),
        })
    }
    fn wait_n(&self, n: usize) -> Vec<(u64, i32, Vec<u8>)> {
        let mut g = self.done.lock().unwrap();
        while g.len() < n {
            g = self.cv.wait(g).unwrap();
        }
        std::mem::take(&mut *g)
    }
}

impl Completion for Collect {
    fn complete(&self, token: u64, res: i32, buf: Vec<u8>) {
        self.done.lock().unwrap().push((token, res, buf));
        self.cv.notify_all();
    }
}

/// Random writes (disjoint within a batch, up to 64 in flight), each batch read back in
/// parallel and compared with a model; then a whole-device read.
/// Reads a hole into a buffer primed with garbage: it must come back zero-filled.
fn assert_hole_reads_zero(c: &Client, offset: u64, len: u32) {
    let (res, buf) = c.call(ublk_targets::nbd::Request {
        buf: vec![0xaa; len as usize],
        ..read(offset, len)
    });
    assert_eq!(res, len as i32);
    assert!(buf.iter().all(|&b| b == 0), "a hole did not read as zeros");
}

fn random_roundtrip(c: &Client, size: u64, align: u64, max_len: u64, seed: u64) {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let col = Collect::new();
    let slot = max_len;
    let nslots = size / slot;
    for _round in 0..8 {
        let n = 64.min(nslots) as usize;
        let mut picked: Vec<u64> = Vec::new();
        while picked.len() < n {
            let s = rng.below(nslots);
            if !picked.contains(&s) {
                picked.push(s);
            }
        }
        let mut reqs = Vec::new();
        for (i, s) in picked.iter().enumerate() {
            let len = (rng.below(max_len / align) + 1) * align;
            let off = s * slot + rng.below((slot - len) / align + 1) * align;
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let fua = rng.below(4) == 0;
            c.submit(write(off, data, fua), col.clone(), i as u64)
                .map_err(|e| e.0)
                .unwrap();
            reqs.push((off, len));
        }
        for (_, res, _) in col.wait_n(n) {
            assert!(res > 0, "write failed: {res}");
        }
        for (i, &(off, len)) in reqs.iter().enumerate() {
            c.submit(read(off, len as u32), col.clone(), i as u64)
                .map_err(|e| e.0)
                .unwrap();
        }
        for (tok, res, buf) in col.wait_n(n) {
            let (off, len) = reqs[tok as usize];
            assert_eq!(res, len as i32);
            assert!(
                buf == model[off as usize..(off + len) as usize],
                "data mismatch at {off} + {len}"
            );
        }
    }
    let chunk = max_len;
    for off in (0..size).step_by(chunk as usize) {
        let (res, buf) = c.call(read(off, chunk as u32));
        assert_eq!(res, chunk as i32);
        assert!(
            buf == model[off as usize..(off + chunk) as usize],
            "mismatch in chunk at {off}"
        );
    }
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn test_nbd_data_roundtrip_nbdkit_structured_and_simple() {
    require_bin!("nbdkit");
    with_timeout(120, || {
        let dir = TempDir::new("data");
        let srv = Server::nbdkit(&dir, &["memory", "16M"]);
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        random_roundtrip(&c, 16 * MIB, 512, 256 << 10, 1);
        drop(c);
        drop(srv);
        let srv = Server::nbdkit(&dir, &["--no-sr", "memory", "16M"]);
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        random_roundtrip(&c, 16 * MIB, 512, 256 << 10, 2);
        drop(c);
        drop(srv);
        // Out-of-order completion.
        let srv = Server::nbdkit(
            &dir,
            &["--filter=delay", "memory", "4M", "rdelay=5ms", "wdelay=8ms"],
        );
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        random_roundtrip(&c, 4 * MIB, 4096, 64 << 10, 3);
    });
}

/// Extended headers with a real server (qemu-nbd 10): negotiated by default, data written
/// reads back through both engines' shared protocol code, TRIM / WRITE_ZEROES / FLUSH / FUA
/// are accepted, holes read back as zeros; and not asked for, structured replies are used.
#[test]
fn test_nbd_extended_headers_qemu_nbd_10() {
    let Some(bin) = qemu_nbd_new() else { return };
    with_timeout(120, move || {
        let dir = TempDir::new("ext");
        let img = dir.path("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(16 * MIB)
            .unwrap();
        let srv = Server::qemu_nbd_bin(&bin, &dir, &img, &["--cache=writeback", "-e", "2"]);
        let uri = srv.uri("");
        let info = probe_export(&uri.addr, "", &ConnectOptions::default()).unwrap();
        assert!(info.extended && info.structured, "{info:?}");
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        assert!(c.info().extended && c.info().structured);
        random_roundtrip(&c, 16 * MIB, 512, 256 << 10, 11);
        // Zeroing commands on data written above, then read back.
        for (cmd_, off) in [(Cmd::WriteZeroes, 0), (Cmd::Trim, MIB)] {
            let (res, _) = c.call(cmd(cmd_, off, 256 << 10));
            assert_eq!(res, 0, "{cmd_:?}");
        }
        let (res, _) = c.call(cmd(Cmd::Flush, 0, 0));
        assert_eq!(res, 0);
        let (res, buf) = c.call(read(0, 256 << 10));
        assert_eq!(res, 256 << 10);
        assert!(
            buf.iter().all(|&b| b == 0),
            "WRITE_ZEROES range reads back zeros"
        );
        drop(c);
        drop(srv);
        // On a zeroed image again (the round trip's model starts from zeros).
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(0).unwrap();
        f.set_len(16 * MIB).unwrap();
        let srv = Server::qemu_nbd_bin(&bin, &dir, &img, &["--cache=writeback"]);
        let mut o = quick_opts();
        o.connect.extended_headers = false;
        let c = Client::connect(&srv.uri(""), o).unwrap();
        assert!(!c.info().extended && c.info().structured);
        random_roundtrip(&c, 16 * MIB, 4096, 64 << 10, 12);
    });
}

#[test]
fn test_nbd_data_roundtrip_qemu_nbd_with_holes() {
    require_bin!("qemu-nbd");
    with_timeout(120, || {
        let dir = TempDir::new("qdata");
        let img = dir.path("disk.raw");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(16 * MIB).unwrap(); // sparse: reads of holes come back as OFFSET_HOLE
        drop(f);
        let srv = Server::qemu_nbd(&dir, &img, &["--cache=writeback"]);
        let mut o = quick_opts();
        o.sparse_reads = true;
        let c = Client::connect(&srv.uri(""), o).unwrap();
        assert_hole_reads_zero(&c, MIB, MIB as u32);
        random_roundtrip(&c, 16 * MIB, 512, 512 << 10, 4);
        // What we wrote is in the file.
        let (_, buf) = c.call(read(0, 65536));
        let file = std::fs::read(&img).unwrap();
        assert!(file[..65536] == buf[..]);
    });
}

/// qemu-storage-daemon serving a qcow2 image: unallocated clusters read as zeros (hole
/// chunks), data written lands in the image, which `qemu-img check` finds clean after the
/// flush and whose content `qemu-img convert` gives back as read through the client.
#[test]
fn test_nbd_roundtrip_qemu_storage_daemon_qcow2() {
    require_bin!("qemu-storage-daemon");
    require_bin!("qemu-img");
    with_timeout(120, || {
        let dir = TempDir::new("qsd");
        let img = dir.path("disk.qcow2");
        let qemu_img = |args: &[&str]| {
            let out = std::process::Command::new("qemu-img")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        };
        let img_s = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", img_s, "16M"]);
        let mut srv = Server::qemu_storage_daemon(&dir, &img, "qcow2");
        let mut o = quick_opts();
        o.sparse_reads = true;
        let c = Client::connect(&srv.uri("disk"), o).unwrap();
        assert_eq!(c.info().size, 16 * MIB);
        assert!(c.info().structured && c.info().used_go);
        assert_hole_reads_zero(&c, MIB, MIB as u32);
        random_roundtrip(&c, 16 * MIB, 512, 512 << 10, 5);
        assert_eq!(c.call(cmd(Cmd::Flush, 0, 0)).0, 0);
        let mut seen = Vec::new();
        for off in (0..16 * MIB).step_by(MIB as usize) {
            let (res, buf) = c.call(read(off, MIB as u32));
            assert_eq!(res, MIB as i32);
            seen.extend_from_slice(&buf);
        }
        drop(c);
        srv.kill();
        qemu_img(&["check", "-q", img_s]);
        let raw = dir.path("out.raw");
        qemu_img(&["convert", "-O", "raw", img_s, raw.to_str().unwrap()]);
        assert!(
            std::fs::read(&raw).unwrap() == seen,
            "image differs from what was read"
        );
    });
}

#[test]
fn test_nbd_trim_write_zeroes_flush_and_fua_reach_the_server() {
    require_bin!("nbdkit");
    with_timeout(60, || {
        let dir = TempDir::new("log");
        let log = dir.path("nbd.log");
        let logarg = format!("logfile={}", log.display());
        let srv = Server::nbdkit(&dir, &["--filter=log", "memory", "4M", &logarg]);
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        assert_eq!(c.call(write(0, vec![9; 65536], true)).0, 65536);
        assert_eq!(c.call(write(65536, vec![9; 65536], false)).0, 65536);
        assert_eq!(c.call(cmd(Cmd::Flush, 0, 0)).0, 0);
        let mut wz = cmd(Cmd::WriteZeroes, 4096, 8192);
        wz.no_hole = true;
        assert_eq!(c.call(wz).0, 0);
        assert_eq!(c.call(cmd(Cmd::Trim, 65536, 65536)).0, 0);
        let (_, buf) = c.call(read(0, 65536));
        assert!(buf[..4096].iter().all(|&b| b == 9));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 9));
        drop(c);
        drop(srv);
        let text = std::fs::read_to_string(&log).unwrap();
        let has = |pat: &[&str]| {
            text.lines()
                .any(|l| pat.iter().all(|p| l.contains(p)) && l.contains("..."))
        };
        assert!(has(&["Write", "offset=0x0 ", "fua=1"]), "{text}");
        assert!(has(&["Write", "offset=0x10000 ", "fua=0"]), "{text}");
        assert!(has(&["Flush"]), "{text}");
        assert!(
            has(&["Zero", "offset=0x1000 ", "count=0x2000", "trim=0"]),
            "{text}"
        );
        assert!(has(&["Trim", "offset=0x10000 "]), "{text}");
    });
}

#[test]
fn test_nbd_injected_errors_surface_as_errno() {
    require_bin!("nbdkit");
    with_timeout(60, || {
        let dir = TempDir::new("err");
        for (filter_args, write_res, read_res) in [
            (
                vec!["error=ENOSPC", "error-pwrite-rate=100%"],
                -libc::ENOSPC,
                4096,
            ),
            (vec!["error=EIO", "error-pread-rate=100%"], 4096, -libc::EIO),
            (
                vec!["error=EPERM", "error-pwrite-rate=100%"],
                -libc::EPERM,
                4096,
            ),
        ] {
            for sr in [true, false] {
                let mut args = vec!["--filter=error"];
                if !sr {
                    args.push("--no-sr");
                }
                args.extend(["memory", "1M"]);
                args.extend(filter_args.iter().copied());
                let srv = Server::nbdkit(&dir, &args);
                let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
                assert_eq!(
                    c.call(write(0, vec![1; 4096], false)).0,
                    write_res,
                    "{args:?}"
                );
                assert_eq!(c.call(read(0, 4096)).0, read_res, "{args:?}");
                // The connection survives request errors.
                assert_eq!(c.call(cmd(Cmd::Flush, 0, 0)).0, 0);
                assert_eq!(c.reconnects(), 0);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Reconnect and timeouts

#[test]
fn test_nbd_reconnect_after_server_restart_loses_no_acknowledged_write() {
    require_bin!("qemu-nbd");
    with_timeout(120, || {
        let dir = TempDir::new("reconnect");
        let img = dir.path("disk.raw");
        std::fs::write(&img, vec![0u8; 8 * MIB as usize]).unwrap();
        let mut srv = Server::qemu_nbd(&dir, &img, &[]);
        let c = Client::connect(&srv.uri(""), quick_opts()).unwrap();
        let mut rng = Rng(77);
        let mut model = vec![0u8; 8 * MIB as usize];
        let col = Collect::new();
        let mut acked = 0;
        for round in 0..6 {
            // Writes in flight while the server is killed...
            for i in 0..32u64 {
                let off = (round * 32 + i) * 65536 % (8 * MIB);
                let mut d = vec![0u8; 65536];
                rng.fill(&mut d);
                model[off as usize..off as usize + 65536].copy_from_slice(&d);
                c.submit(write(off, d, false), col.clone(), i)
                    .map_err(|e| e.0)
                    .unwrap();
            }
            if round % 2 == 1 {
                srv.kill();
                std::thread::sleep(Duration::from_millis(200));
                srv.restart();
            }
            for (_, res, _) in col.wait_n(32) {
                assert_eq!(res, 65536, "a write failed across the restart");
                acked += 1;
            }
        }
        // (The last restart may not have been noticed yet if its writes were all done.)
        assert_eq!(c.call(read(0, 4096)).0, 4096);
        assert!(c.reconnects() >= 3, "reconnects: {}", c.reconnects());
        assert_eq!(acked, 192);
        // Writes acknowledged before a restart were never flushed: the next FLUSH says so,
        // once; then flushing works again.
        assert_eq!(c.call(cmd(Cmd::Flush, 0, 0)).0, -libc::EIO);
        assert_eq!(c.call(cmd(Cmd::Flush, 0, 0)).0, 0);
        for off in (0..8 * MIB).step_by(MIB as usize) {
            let (res, buf) = c.call(read(off, MIB as u32));
            assert_eq!(res, MIB as i32);
            assert!(
                buf == model[off as usize..(off + MIB) as usize],
                "lost data at {off}"
            );
        }
    });
}

/// The server is restarted in a newer version that offers extended headers (qemu-nbd 7.2,
/// then 10): the reconnect asks for the reply format the session has, and writes in flight
/// complete on the upgraded server. The other way round, down to a server without the
/// session's extended headers, the reconnect is refused and requests time out.
#[test]
fn test_nbd_reconnect_to_an_upgraded_server_keeps_the_reply_format() {
    require_bin!("qemu-nbd");
    let Some(new) = qemu_nbd_new() else { return };
    with_timeout(120, move || {
        let dir = TempDir::new("upgrade");
        let img = dir.path("disk.raw");
        std::fs::write(&img, vec![0u8; 4 * MIB as usize]).unwrap();
        let mut old = Server::qemu_nbd(&dir, &img, &[]);
        let c = Client::connect(&old.uri(""), quick_opts()).unwrap();
        assert!(c.info().structured && !c.info().extended);
        assert_eq!(c.call(write(0, vec![1; 65536], false)).0, 65536);
        old.kill();
        let col = Collect::new();
        c.submit(write(MIB, vec![2; 65536], true), col.clone(), 0)
            .map_err(|e| e.0)
            .unwrap();
        let srv = Server::qemu_nbd_bin(&new, &dir, &img, &[]);
        let (_, res, _) = col.wait_n(1).remove(0);
        assert_eq!(res, 65536, "the write in flight across the upgrade");
        assert!(c.reconnects() >= 1);
        assert!(!c.info().extended, "the session kept its format");
        let (res, buf) = c.call(read(0, 65536));
        assert_eq!(res, 65536);
        assert!(buf.iter().all(|&b| b == 1));
        drop(c);

        // Downgrade: a session with extended headers cannot go on with a server without.
        let mut o = quick_opts();
        o.request_timeout = Some(Duration::from_millis(1500));
        let mut srv = srv;
        let c = Client::connect(&srv.uri(""), o).unwrap();
        assert!(c.info().extended);
        srv.kill();
        let _old = Server::qemu_nbd(&dir, &img, &[]);
        let t = Instant::now();
        assert_eq!(c.call(read(0, 4096)).0, -libc::EIO);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(c.reconnects(), 0);
    });
}

#[test]
fn test_nbd_request_timeout_fails_with_eio_then_recovers() {
    require_bin!("nbdkit");
    with_timeout(60, || {
        let dir = TempDir::new("timeout");
        let srv = Server::nbdkit(&dir, &["--filter=delay", "memory", "1M", "rdelay=3"]);
        let mut o = quick_opts();
        o.request_timeout = Some(Duration::from_millis(500));
        let c = Client::connect(&srv.uri(""), o).unwrap();
        let t = Instant::now();
        assert_eq!(c.call(read(0, 4096)).0, -libc::EIO);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Writes are not delayed: the client reconnects and carries on.
        assert_eq!(c.call(write(0, vec![1; 4096], false)).0, 4096);
        assert!(c.reconnects() >= 1);
    });
}

#[test]
fn test_nbd_server_gone_for_good_fails_requests_after_timeout() {
    with_timeout(30, || {
        let mem = Arc::new(Mutex::new(vec![0u8; FAKE_SIZE as usize]));
        let fake = Fake::start(Nego::Modern, serve_memory(mem));
        let mut o = quick_opts();
        o.request_timeout = Some(Duration::from_millis(700));
        let c = Client::connect(&fake.uri(), o.clone()).unwrap();
        assert_eq!(c.call(write(0, vec![1; 512], false)).0, 512);
        // Point a client at a port nobody listens on after connecting: simulate with
        // reconnect disabled and a server that drops the connection.
        let dropper = Fake::start(Nego::Modern, |_s, _| {});
        let mut o2 = o.clone();
        o2.reconnect = false;
        let c2 = Client::connect(&dropper.uri(), o2).unwrap();
        let t = Instant::now();
        assert_eq!(c2.call(read(0, 512)).0, -libc::EIO);
        assert!(t.elapsed() < Duration::from_secs(5));
        // After the connection is gone for good, requests fail at once.
        assert!(c2.submit(read(0, 512), Collect::new(), 0).is_err());
        // With reconnect on, a server that keeps dropping connections: requests time out.
        let c3 = Client::connect(&dropper.uri(), o).unwrap();
        let t = Instant::now();
        assert_eq!(c3.call(read(0, 512)).0, -libc::EIO);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(dropper.conns.load(Ordering::SeqCst) >= 3);
    });
}

// ---------------------------------------------------------------------------------------------
// Misbehaving servers

type ReplyFn = Box<dyn Fn(&Req) -> Vec<u8> + Send + Sync>;

/// A server that answers every request with `reply(req)`, then keeps the connection open.
fn misbehave<F>(reply: F) -> Fake
where
    F: Fn(&Req) -> Vec<u8> + Send + Sync + 'static,
{
    Fake::start(Nego::Modern, move |s, _| {
        use std::io::Write;
        let mut p = Vec::new();
        while let Some(r) = read_req(s, &mut p) {
            if s.write_all(&reply(&r)).is_err() {
                return;
            }
        }
    })
}

#[test]
fn test_nbd_garbage_servers_fail_cleanly() {
    with_timeout(60, || {
        let cases: Vec<(&str, ReplyFn)> = vec![
            (
                "bad magic",
                Box::new(|_r: &Req| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]),
            ),
            (
                "unknown cookie",
                Box::new(|r: &Req| simple_reply(r.cookie ^ 0x1234_0000_0000, 0)),
            ),
            (
                "oversized chunk",
                Box::new(|r: &Req| {
                    let mut b = chunk(1, proto::REPLY_TYPE_OFFSET_DATA, r.cookie, &[]);
                    b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
                    b
                }),
            ),
            (
                "data beyond the request",
                Box::new(|r: &Req| {
                    let mut p = (r.offset + 4096).to_be_bytes().to_vec();
                    p.extend_from_slice(&vec![0u8; r.len as usize]);
                    chunk(1, proto::REPLY_TYPE_OFFSET_DATA, r.cookie, &p)
                }),
            ),
            (
                "overlapping chunks",
                Box::new(|r: &Req| {
                    let mut p = r.offset.to_be_bytes().to_vec();
                    p.extend_from_slice(&vec![1u8; r.len as usize]);
                    let mut b = chunk(0, proto::REPLY_TYPE_OFFSET_DATA, r.cookie, &p);
                    let mut h = r.offset.to_be_bytes().to_vec();
                    h.extend_from_slice(&512u32.to_be_bytes());
                    b.extend(chunk(1, proto::REPLY_TYPE_OFFSET_HOLE, r.cookie, &h));
                    b
                }),
            ),
            (
                "done without full coverage",
                Box::new(|r: &Req| {
                    let mut h = r.offset.to_be_bytes().to_vec();
                    h.extend_from_slice(&512u32.to_be_bytes());
                    chunk(1, proto::REPLY_TYPE_OFFSET_HOLE, r.cookie, &h)
                }),
            ),
            (
                "unknown chunk type",
                Box::new(|r: &Req| chunk(1, 77, r.cookie, &[1, 2, 3])),
            ),
            (
                "simple reply data cut short",
                Box::new(|r: &Req| {
                    let mut b = simple_reply(r.cookie, 0);
                    b.extend_from_slice(&[0u8; 100]);
                    b
                }),
            ),
        ];
        for (name, f) in cases {
            let fake = misbehave(f);
            let mut o = quick_opts();
            o.request_timeout = Some(Duration::from_millis(800));
            let c = Client::connect(&fake.uri(), o).unwrap();
            let t = Instant::now();
            let (res, _) = c.call(read(0, 4096));
            assert_eq!(res, -libc::EIO, "{name}");
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{name}: {:?}",
                t.elapsed()
            );
            assert!(
                fake.conns.load(Ordering::SeqCst) >= 2 || name == "simple reply data cut short",
                "{name}: the connection should have been dropped and retried"
            );
        }
    });
}

#[test]
fn test_nbd_unknown_error_chunk_fails_only_the_request() {
    with_timeout(30, || {
        let fake = misbehave(|r: &Req| {
            if r.cmd == proto::CMD_READ {
                // Unknown error type (bit 15) with the common prefix, and one without.
                let mut p = 28u32.to_be_bytes().to_vec();
                p.extend_from_slice(&0u16.to_be_bytes());
                chunk(1, proto::REPLY_TYPE_FLAG_ERROR | 99, r.cookie, &p)
            } else {
                chunk(1, proto::REPLY_TYPE_NONE, r.cookie, &[])
            }
        });
        let c = Client::connect(&fake.uri(), quick_opts()).unwrap();
        assert_eq!(c.call(read(0, 4096)).0, -libc::ENOSPC);
        assert_eq!(c.call(write(0, vec![0; 512], false)).0, 512);
        assert_eq!(c.reconnects(), 0);
    });
}

#[test]
fn test_nbd_garbage_handshakes_fail_cleanly() {
    with_timeout(30, || {
        use std::io::{Read, Write};
        use std::net::TcpListener;
        let greetings: Vec<Vec<u8>> = vec![
            b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            {
                // Oldstyle.
                let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&proto::CLISERV_MAGIC.to_be_bytes());
                g.extend_from_slice(&[0u8; 136]);
                g
            },
            {
                // Newstyle without FIXED_NEWSTYLE.
                let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
                g.extend_from_slice(&0u16.to_be_bytes());
                g
            },
            {
                // Fine greeting, then an option reply claiming a huge payload.
                let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
                g.extend_from_slice(&3u16.to_be_bytes());
                g.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
                g.extend_from_slice(&proto::OPT_STRUCTURED_REPLY.to_be_bytes());
                g.extend_from_slice(&proto::REP_INFO.to_be_bytes());
                g.extend_from_slice(&u32::MAX.to_be_bytes());
                g
            },
            Vec::new(), // closes at once
        ];
        for g in greetings {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let g2 = g.clone();
            std::thread::spawn(move || {
                if let Ok((mut s, _)) = l.accept() {
                    let _ = s.write_all(&g2);
                    let mut sink = [0u8; 256];
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = s.read(&mut sink);
                }
            });
            let uri =
                ublk_targets::nbd::NbdUri::parse(&format!("nbd://127.0.0.1:{port}/x")).unwrap();
            let e = Client::connect(&uri, quick_opts()).unwrap_err();
            eprintln!("garbage handshake {:?}...: {e}", &g[..g.len().min(8)]);
        }
    });
}

/// nbd-server (the reference server), daemonized with a pid file; killed on drop.
struct NbdServer {
    pid_file: std::path::PathBuf,
    sock: std::path::PathBuf,
}

impl NbdServer {
    fn start(dir: &TempDir, file: &std::path::Path) -> NbdServer {
        let sock = dir.path("nbd-server.sock");
        let pid_file = dir.path("nbd-server.pid");
        let cfg = dir.path("nbd-server.conf");
        // nbd-server always listens on TCP too (port 0 breaks it): a free loopback port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        std::fs::write(
            &cfg,
            format!(
                "[generic]\n    unixsock = {}\n    listenaddr = 127.0.0.1\n    port = {port}\n\
                 [disk]\n    exportname = {}\n    flush = true\n    fua = true\n    \
                 trim = true\n",
                sock.display(),
                file.display()
            ),
        )
        .unwrap();
        let st = std::process::Command::new("nbd-server")
            .arg("-C")
            .arg(&cfg)
            .arg("-p")
            .arg(&pid_file)
            .stdin(std::process::Stdio::null())
            .status()
            .expect("running nbd-server");
        assert!(st.success(), "nbd-server: {st}");
        let s = NbdServer { pid_file, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.sock.exists() {
            assert!(Instant::now() < deadline, "nbd-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn uri(&self) -> ublk_targets::nbd::NbdUri {
        ublk_targets::nbd::NbdUri {
            addr: ublk_targets::nbd::NbdAddr::Unix(self.sock.clone()),
            export: "disk".into(),
            tls: None,
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

#[test]
fn test_nbd_roundtrip_nbd_server() {
    require_bin!("nbd-server");
    with_timeout(120, || {
        let dir = TempDir::new("nbdsrv");
        let img = dir.path("disk.raw");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 * MIB)
            .unwrap();
        let srv = NbdServer::start(&dir, &img);
        let c = Client::connect(&srv.uri(), quick_opts()).unwrap();
        let f = c.info().flags;
        assert!(
            f.contains(TF::SEND_FLUSH | TF::SEND_FUA | TF::SEND_TRIM),
            "{f:?}"
        );
        random_roundtrip(&c, 8 * MIB, 512, 256 << 10, 5);
        assert_eq!(c.call(write(4096, vec![3; 8192], true)).0, 8192);
        assert_eq!(c.call(cmd(Cmd::Flush, 0, 0)).0, 0);
        assert_eq!(c.call(cmd(Cmd::Trim, 1 << 20, 65536)).0, 0);
        drop(c);
        // What was written (with FUA, then flushed) is in the file.
        let file = std::fs::read(&img).unwrap();
        assert!(file[4096..12288].iter().all(|&b| b == 3));
    });
}
