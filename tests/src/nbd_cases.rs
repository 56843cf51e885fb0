//! Kernel-facing tests of the nbd target, against qemu-nbd and nbdkit running in the guest.

use crate::cases::{batch_supported, check_refused, test};
use crate::util::*;
use crate::{Outcome, Test};
use anyhow::{ensure, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// qemu-nbd 10 from Debian trixie (`xtask/src/peers.rs`), which offers extended headers; the
/// guest's `qemu-nbd` is the host's (Debian 12: 7.2, without them).
const QEMU_NBD_NEW: &str = "/opt/bin/qemu-nbd-new";

/// Why the zero-copy nbd cases are skipped before 7.3.
const NBD_ZC: &str = "zero copy for nbd needs io_uring sends and receives on registered \
                      buffers (checked on Linux 7.3)";

/// Whether `ublk add -t nbd -z` is expected to work: io_uring's plain send and receive on
/// registered buffers came after zero copy itself (6.16); 7.3 has them.
fn nbd_zero_copy_supported() -> Result<bool> {
    Ok(kernel_version()? >= (7, 3))
}

/// The nbd tests, in run order.
pub fn all() -> Vec<Test> {
    vec![
        test("kernel_nbd_verify_unix_q1", 240, || {
            nbd_verify(false, 1, false, false, &[])
        }),
        test("kernel_nbd_verify_copy_unix_q1", 240, || {
            nbd_verify(false, 1, false, false, &["--copy"])
        }),
        test("kernel_nbd_verify_tcp_q2_multiconn_sparse", 240, || {
            nbd_verify(true, 2, false, true, &[])
        }),
        test("kernel_nbd_verify_threads_q2", 240, || {
            nbd_verify(false, 2, true, false, &[])
        }),
        test("kernel_nbd_verify_unix_batch_q2", 240, || {
            if !batch_supported()? {
                return Ok(Outcome::Skip("batch io commands need Linux 7.0".into()));
            }
            nbd_verify(false, 2, false, false, &["-b"])
        }),
        test("kernel_nbd_zero_copy_tcp_q2_sparse", 240, || {
            if !nbd_zero_copy_supported()? {
                return Ok(Outcome::Skip(NBD_ZC.into()));
            }
            nbd_verify(true, 2, false, true, &["-z"])
        }),
        test("kernel_nbd_zero_copy_threads_q1_sparse", 240, || {
            if !nbd_zero_copy_supported()? {
                return Ok(Outcome::Skip(NBD_ZC.into()));
            }
            nbd_verify(false, 1, true, true, &["-z"])
        }),
        test("kernel_nbd_zero_copy_refused", 120, nbd_zero_copy_refused),
        test("kernel_nbd_extended_headers_qemu_nbd_10_q2", 240, || {
            nbd_verify_with(QEMU_NBD_NEW, false, 2, false, false, &[])
        }),
        test("kernel_nbd_extended_headers_threads_q1", 240, || {
            nbd_verify_with(QEMU_NBD_NEW, false, 1, true, false, &[])
        }),
        test("kernel_nbd_no_extended_headers_q1", 240, || {
            nbd_verify_with(
                QEMU_NBD_NEW,
                false,
                1,
                false,
                false,
                &["--nbd-no-extended-headers"],
            )
        }),
        test("kernel_nbd_server_restart", 240, || {
            nbd_server_restart(false)
        }),
        test("kernel_nbd_server_restart_upgraded", 240, || {
            nbd_server_restart(true)
        }),
        test(
            "kernel_nbd_timeout_and_no_reconnect",
            240,
            nbd_timeout_no_reconnect,
        ),
        test("kernel_nbd_ext4_readd", 240, nbd_ext4_readd),
        test("kernel_nbd_nbdkit_memory_q1", 300, || nbdkit_memory(1)),
        test("kernel_nbd_nbdkit_memory_q2_multiconn", 300, || {
            nbdkit_memory(2)
        }),
        test("kernel_nbd_nbdkit_tls_q2", 300, nbdkit_tls),
        test("kernel_nbd_vsock_q2_and_tls", 300, nbdkit_vsock),
        test("kernel_nbd_ktls_tcp_q2", 400, nbd_ktls),
        test(
            "kernel_nbd_nbdkit_simple_replies",
            300,
            nbdkit_simple_replies,
        ),
        test("kernel_nbd_kill_recovery_under_fio", 240, || {
            nbd_recover_under_fio(false)
        }),
        test("kernel_nbd_quiesce_recover_under_fio", 240, || {
            nbd_recover_under_fio(true)
        }),
        test(
            "kernel_nbd_recover_server_down",
            180,
            nbd_recover_server_down,
        ),
    ]
}

/// Diffie-Hellman parameters for qemu's `tls-creds-x509` (`dh-params.pem`): the RFC 7919
/// ffdhe2048 group. Without the file a qemu TLS server generates 2048-bit parameters at every
/// start, which under emulation takes anywhere from a second to more than the tests' 20 s wait
/// for the server to listen.
const DH_PARAMS: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// A CA and a server certificate for `localhost` in nbdkit's layout (`ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`), made with rcgen, and qemu's `dh-params.pem`.
fn make_pki(dir: &Path) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ublk VM test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer)?;
    fs::write(dir.join("ca-cert.pem"), ca_cert.pem())?;
    fs::write(dir.join("server-cert.pem"), cert.pem())?;
    fs::write(dir.join("server-key.pem"), key.serialize_pem())?;
    fs::write(dir.join("dh-params.pem"), DH_PARAMS)?;
    Ok(())
}

/// fio verify over TLS: nbdkit requires TLS, the device is added with nbds+unix:// and the CA
/// from --tls-certs; a plain nbd+unix:// add is refused with a TLS message.
fn nbdkit_tls() -> Result<Outcome> {
    let pki = workdir()?.join("pki");
    make_pki(&pki)?;
    let certs = format!("--tls-certificates={}", pki.display());
    let (_server, uri) = Nbdkit::start(&["--tls=require", &certs, "memory", "256M"])?;

    let plain = run_timeout(
        Command::new(ublk_bin()).args(["add", "-t", "nbd", "--uri", &uri]),
        Duration::from_secs(60),
    )?;
    ensure!(
        !plain.ok() && plain.stderr.contains("requires TLS"),
        "a plain add to a TLS-only server: stdout {:?} stderr {:?}",
        plain.stdout,
        plain.stderr
    );

    let tls_uri = uri.replacen("nbd+unix", "nbds+unix", 1);
    let pki_s = pki.display().to_string();
    let d = ublk_add(&[
        "-t",
        "nbd",
        "--uri",
        &tls_uri,
        "--tls-certs",
        &pki_s,
        "-q",
        "2",
    ])?;
    ensure!(d.queues == 2, "device has {} queues", d.queues);
    // TLS over a Unix socket stays in user space, in the threaded engine.
    check_engine(d.pid, true, 2)?;
    ensure!(
        list_target(d.id)?["ktls"] == false,
        "kernel TLS over a Unix socket"
    );
    // Smaller than the plaintext cases: TLS under TCG is slow (about 2 minutes on 7.3 for
    // 16M + 48M).
    fio_verify(&d.bdev(), 32, ("8M", "24M"), Duration::from_secs(200))?;
    ublk_del(d.id)?;
    let r = ublk(&[
        "add",
        "-t",
        "nbd",
        "--uri",
        &tls_uri,
        "--tls-certs",
        &pki_s,
        "--ktls",
        "on",
    ])?;
    check_refused(&r, "kernel TLS needs a TCP socket")?;
    Ok(Outcome::Pass)
}

/// TLS over TCP handed to the kernel (kTLS): qemu-nbd with X.509 credentials and two
/// connections, which the queue threads' io_uring drives (no reader or writer thread); fio
/// verify, in zero copy too where it works. The server is restarted between two writes: the
/// device reconnects, with kernel TLS again, and reads back both. `--ktls off` keeps TLS in
/// user space (threaded engine) on the same server and reads the same.
fn nbd_ktls() -> Result<Outcome> {
    let pki = workdir()?.join("pki");
    make_pki(&pki)?;
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
        pki.display()
    );
    let tls_server = ["--object", &creds, "--tls-creds", "tls0"];
    // Up to 8 clients: a device reconnecting while the test probes the restarted server must
    // not fill it (more than 1 advertises multi-conn either way).
    let file = backing("nbd-ktls.raw", 64)?;
    let qemu_nbd = opt_bin("qemu-nbd");
    let (server, ep) = Server::start_with(&qemu_nbd, &file, true, 8, &tls_server)?;
    let pki_s = pki.display().to_string();
    let tls = ["--tls-certs", &pki_s, "--tls-hostname", "localhost"];
    let add = |extra: &[&str]| {
        let mut a = tls.to_vec();
        a.extend_from_slice(extra);
        add_nbd(&ep, &a)
    };

    let mut plain = vec!["add", "-t", "nbd", "--ktls", "on"];
    plain.extend(ep.split('\u{1f}'));
    check_refused(&ublk(&plain)?, "--ktls is for TLS sessions")?;

    let d = add(&["-q", "2"])?;
    ensure!(d.queues == 2, "device has {} queues", d.queues);
    let t = list_target(d.id)?;
    ensure!(
        t["ktls"] == true && t["engine"] == "io_uring" && t["connections"] == 2,
        "not two io_uring connections with kernel TLS: {t}"
    );
    check_engine(d.pid, false, 2)?;
    fio_verify(&d.bdev(), 32, ("8M", "24M"), Duration::from_secs(200))?;
    ublk_del(d.id)?;

    // One queue: its connection sees the flush of what it wrote (with two, a write acked on
    // the other connection and not flushed there fails the next flush after the reconnect).
    let d = add(&["-vvv"])?;
    check_engine(d.pid, false, 1)?;
    // 32 MiB in flight: more than the socket takes at once, so sends come back short (kernel
    // TLS has no MSG_WAITALL) and the rest is sent after.
    fio_as(
        &[],
        &[
            "--name=short-sends",
            &format!("--filename={}", d.bdev()),
            "--rw=write",
            "--bs=1M",
            "--size=32M",
            "--iodepth=32",
            "--ioengine=io_uring",
            "--direct=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
        Duration::from_secs(200),
    )?;
    let log = fs::read_to_string(format!("/run/ublk/ublk{}.log", d.id))?;
    ensure!(
        log.contains("short send"),
        "no short send with 32 MiB in flight: the resend path went untested"
    );
    let dir = workdir()?;
    let (a, b) = (dir.join("ktls-a"), dir.join("ktls-b"));
    write_pattern(&a, 4 * MIB, 41)?;
    write_pattern(&b, 4 * MIB, 42)?;
    let write = |src: &Path, seek_mib: u64| {
        check_cmd(
            &mut write_dev_cmd(src, &d.bdev(), seek_mib),
            Duration::from_secs(120),
        )
    };
    write(&a, 0)?;
    drop(server);
    let (server, _) = Server::start_with(&qemu_nbd, &file, true, 8, &tls_server)?;
    write(&b, 4)?;
    let seen = read_dev(&d.bdev(), 0, 8)?;
    ublk_del(d.id)?;
    let mut want = fs::read(&a)?;
    want.extend(fs::read(&b)?);
    ensure!(
        seen == want,
        "the device does not read back what was written across the restart"
    );

    // The threaded engine takes a kernel TLS socket as it is.
    let d = add(&["--nbd-threads"])?;
    let t = list_target(d.id)?;
    ensure!(t["ktls"] == true, "--nbd-threads: {t}");
    check_engine(d.pid, true, 1)?;
    let seen = read_dev(&d.bdev(), 0, 8)?;
    ublk_del(d.id)?;
    ensure!(
        seen == want,
        "the threaded engine reads back something else"
    );

    let d = add(&["--ktls", "off"])?;
    let t = list_target(d.id)?;
    ensure!(t["ktls"] == false, "--ktls off: {t}");
    check_engine(d.pid, true, 1)?;
    let seen = read_dev(&d.bdev(), 0, 4)?;
    ublk_del(d.id)?;
    ensure!(
        seen == fs::read(&a)?,
        "--ktls off reads back something else"
    );

    if nbd_zero_copy_supported()? {
        let d = add(&["-q", "2", "-z"])?;
        check_engine(d.pid, false, 2)?;
        fio_verify(&d.bdev(), 32, ("8M", "8M"), Duration::from_secs(200))?;
        ublk_del(d.id)?;
    }
    drop(server);

    // The other versions and ciphers rustls and the kernel share (above: TLS 1.3 with
    // AES-256-GCM, GnuTLS's first choice): their keys reach the kernel right, or fio fails.
    for (want, priority) in [
        (
            "TLSv1_2 TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM",
        ),
        (
            "TLSv1_3 TLS13_CHACHA20_POLY1305_SHA256",
            "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305",
        ),
    ] {
        let creds = format!("{creds},priority={priority}");
        let args = ["--object", &creds, "--tls-creds", "tls0"];
        let (server, _) = Server::start_with(&qemu_nbd, &file, true, 8, &args)?;
        let d = add(&["-v"])?;
        check_engine(d.pid, false, 1)?;
        let log = fs::read_to_string(format!("/run/ublk/ublk{}.log", d.id))?;
        ensure!(
            log.contains(&format!("({want}) handed to the kernel")),
            "no {want} session handed to the kernel in the daemon log: {log:?}"
        );
        fio_verify(&d.bdev(), 32, ("4M", "8M"), Duration::from_secs(200))?;
        ublk_del(d.id)?;
        drop(server);
    }
    Ok(Outcome::Pass)
}

/// An nbdkit server (`-f`, on a Unix socket), killed on drop.
pub(crate) struct Nbdkit {
    child: Child,
}

impl Nbdkit {
    /// The socket [`Nbdkit::start`] listens on.
    pub(crate) fn socket() -> Result<PathBuf> {
        Ok(workdir()?.join("nbdkit.sock"))
    }

    /// `nbdkit -U SOCK -f ARGS...`; returns the server and its `nbd+unix://` URI.
    pub(crate) fn start(args: &[&str]) -> Result<(Nbdkit, String)> {
        let sock = Nbdkit::socket()?;
        let _ = fs::remove_file(&sock);
        let sock_s = sock.display().to_string();
        let mut full = vec!["-U", &sock_s];
        full.extend_from_slice(args);
        let server = Nbdkit::spawn(&full)?;
        wait_for_path(&sock, Duration::from_secs(20))?;
        Ok((server, format!("nbd+unix:///?socket={sock_s}")))
    }

    /// `nbdkit -f ARGS...`, without waiting for it to listen.
    fn spawn(args: &[&str]) -> Result<Nbdkit> {
        let child = Command::new(opt_bin("nbdkit"))
            .arg("-f")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start nbdkit {}", args.join(" ")))?;
        Ok(Nbdkit { child })
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fio verify, then ext4 (files, remount, e2fsck) on a device backed by nbdkit's memory
/// plugin, which advertises multi-conn: with 2 queues the target opens 2 connections.
fn nbdkit_memory(queues: u32) -> Result<Outcome> {
    let (_server, uri) = Nbdkit::start(&["memory", "256M"])?;
    let q = queues.to_string();
    let d = ublk_add(&["-t", "nbd", "--uri", &uri, "-q", &q])?;
    ensure!(d.queues == queues, "device has {} queues", d.queues);
    check_engine(d.pid, false, queues as usize)?;
    ensure!(
        d.capacity * 512 == 256 * MIB,
        "capacity {} sectors",
        d.capacity
    );
    let t = &list_target(d.id)?;
    ensure!(
        t["connections"] == queues && t["multi_conn"] == (queues > 1),
        "expected {queues} connection(s), one per queue: {t}"
    );
    fio_verify(&d.bdev(), 32, ("16M", "48M"), Duration::from_secs(180))?;

    sh(&opt_bin("mkfs.ext4"), &["-F", "-q", &d.bdev()])?;
    let mnt = format!("{MNT_BASE}/nbdkit");
    fs::create_dir_all(&mnt)?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    let mut sums = Vec::new();
    for (i, size) in [1u64, 4096, 65537, 5 * MIB].iter().enumerate() {
        let p = format!("{mnt}/f{i}");
        write_pattern(&p, *size, 1300 + i as u64)?;
        sums.push((p.clone(), sha256(&p)?));
    }
    sh("umount", &[&mnt])?;
    // Dropping the page cache in between: the remount reads from the server.
    sh("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"])?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    for (p, want) in &sums {
        ensure!(&sha256(p)? == want, "{p} differs after remount");
    }
    sh("umount", &[&mnt])?;
    e2fsck_clean(&d.bdev())?;
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// A VM socket (`AF_VSOCK`) through the guest's loopback transport (context id 1): nbdkit
/// listens with `--vsock`; `nbd-list` describes the export; a 2-queue device (nbdkit offers
/// multi-conn: one connection per queue, on the queue threads' io_uring) passes fio verify;
/// then TLS over vsock, which stays in user space (kernel TLS needs TCP).
fn nbdkit_vsock() -> Result<Outcome> {
    let pki = workdir()?.join("pki");
    make_pki(&pki)?;
    let pki_s = pki.display().to_string();
    let port = "10810";
    let uri = format!("nbd+vsock://1:{port}/");
    for tls in [false, true] {
        let pidfile = workdir()?.join("nbdkit-vsock.pid");
        let _ = fs::remove_file(&pidfile);
        let certs = format!("--tls-certificates={pki_s}");
        let mut args = vec!["--vsock", "-p", port, "-P"];
        let pid_s = pidfile.display().to_string();
        args.push(&pid_s);
        if tls {
            args.extend(["--tls=require", &certs]);
        }
        args.extend(["memory", "256M"]);
        let _server = Nbdkit::spawn(&args)?;
        // nbdkit writes its pid file once it listens.
        wait_for_path(&pidfile, Duration::from_secs(20))?;

        if !tls {
            let list = ublk_ok(&["nbd-list", "--json", "--uri", &uri])?.stdout;
            let v: serde_json::Value = serde_json::from_str(list.trim())
                .with_context(|| format!("nbd-list --json: {list:?}"))?;
            ensure!(
                v[0]["size"] == 256 * MIB,
                "nbd-list over vsock does not show the 256M export: {v}"
            );
            let d = ublk_add(&["-t", "nbd", "--uri", &uri, "-q", "2"])?;
            check_engine(d.pid, false, 2)?;
            let t = &list_target(d.id)?;
            ensure!(
                t["connections"] == 2 && t["server"] == format!("vsock:1:{port}"),
                "expected 2 vsock connections: {t}"
            );
            fio_verify(&d.bdev(), 32, ("16M", "48M"), Duration::from_secs(180))?;
            ublk_del(d.id)?;
        } else {
            let tls_uri = uri.replacen("nbd+vsock", "nbds+vsock", 1);
            let d = ublk_add(&["-t", "nbd", "--uri", &tls_uri, "--tls-certs", &pki_s])?;
            check_engine(d.pid, true, 1)?;
            ensure!(
                list_target(d.id)?["ktls"] == false,
                "kernel TLS over a VM socket"
            );
            fio_verify(&d.bdev(), 16, ("4M", "8M"), Duration::from_secs(200))?;
            ublk_del(d.id)?;
        }
    }
    Ok(Outcome::Pass)
}

/// A server without structured replies (nbdkit --no-sr): READ data follows a 16-byte header.
/// fio verify, 4k random and 128k sequential, in the default mode (user copy), in copy mode
/// (while only big READs are on the wire the engine receives each reply's header alone) and,
/// where the kernel has it, zero copy.
fn nbdkit_simple_replies() -> Result<Outcome> {
    let (_server, uri) = Nbdkit::start(&["--no-sr", "memory", "256M"])?;
    let mut modes = vec![None, Some("--copy")];
    if nbd_zero_copy_supported()? {
        modes.push(Some("-z"));
    }
    for mode in modes {
        let mut args = vec!["-t", "nbd", "--uri", &uri];
        args.extend(mode);
        let d = ublk_add(&args)?;
        let t = &list_target(d.id)?;
        ensure!(
            t["structured_replies"] == false,
            "nbdkit --no-sr: expected simple replies: {t}"
        );
        fio_verify(&d.bdev(), 16, ("8M", "32M"), Duration::from_secs(180))
            .with_context(|| format!("mode {mode:?}"))?;
        ublk_del(d.id)?;
    }
    Ok(Outcome::Pass)
}

/// User recovery of an nbd device under fio (4k random writes, crc32c verify, 2 queues and
/// connections): the daemon is killed with -9 (or, from 6.16, quiesced: a planned replacement),
/// and `ublk recover` attaches a new one, which connects to the server again. With reissue
/// (`-i 1`) the requests the old daemon held go to the new one: fio finishes without an error
/// and every block verifies.
fn nbd_recover_under_fio(quiesce: bool) -> Result<Outcome> {
    if quiesce && kernel_version()? < (6, 16) {
        return Ok(Outcome::Skip("QUIESCE_DEV needs Linux 6.16".into()));
    }
    let file = backing("nbd-recover.raw", 128)?;
    let (_server, ep) = Server::start(&file, false, 4)?;
    let d = add_nbd(&ep, &["-q", "2", "-r", "1", "-i", "1"])?;
    let id = d.id.to_string();
    let fio = spawn_fio_verify("recover", &d.bdev(), "64M");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(!fio.is_finished(), "fio finished before the daemon went");
    if quiesce {
        ublk_ok(&["quiesce", "-n", &id])?;
    } else {
        kill(d.pid, "9")?;
    }
    wait_for(
        "state QUIESCED without a daemon",
        Duration::from_secs(15),
        || ublk_list_one(d.id).is_ok_and(|x| x.state == "QUIESCED") && !alive(d.pid),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    if fio.is_finished() {
        let r = fio
            .join()
            .map_err(|_| anyhow::anyhow!("fio thread panicked"))?;
        anyhow::bail!("fio ended while no daemon was attached: {r:?}");
    }
    let r = ublk_ok(&["recover", "-n", &id])?;
    let n = parse_one("ublk recover", &r)?;
    ensure!(n.state == "LIVE" && n.pid != d.pid, "after recover: {n:?}");
    let how = if quiesce { "quiesce" } else { "kill -9" };
    let json = fio
        .join()
        .map_err(|_| anyhow::anyhow!("fio thread panicked"))?
        .with_context(|| format!("fio across {how} + recover"))?;
    let ios = json["jobs"][0]["write"]["total_ios"].as_u64().unwrap_or(0);
    ensure!(ios > 0, "fio wrote nothing: {json}");
    println!("fio wrote and verified {ios} blocks across {how} + recover");
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// `ublk recover` of an nbd device while its server is down fails saying why and leaves the
/// device QUIESCED, with no daemon: a second `ublk recover` once the server is back attaches
/// one, and what was written before the kill reads back.
fn nbd_recover_server_down() -> Result<Outcome> {
    let file = backing("nbd-recover-down.raw", 32)?;
    let (server, ep) = Server::start(&file, false, 2)?;
    let d = add_nbd(&ep, &["-r", "1"])?;
    let id = d.id.to_string();
    let dir = workdir()?;
    let pat = dir.join("down-pattern");
    write_pattern(&pat, 4 * MIB, 41)?;
    dd(&pat, d.bdev(), &["bs=1M", "count=4", "oflag=direct"])?;
    kill(d.pid, "9")?;
    wait_for(
        "state QUIESCED without a daemon",
        Duration::from_secs(15),
        || ublk_list_one(d.id).is_ok_and(|x| x.state == "QUIESCED") && !alive(d.pid),
    )?;
    drop(server);
    let r = ublk(&["recover", "-n", &id])?;
    ensure!(
        !r.ok(),
        "recover with the server down succeeded: {}",
        r.stdout
    );
    ensure!(
        r.stderr.contains("nbd") || r.stderr.contains("connect"),
        "unclear error: {:?}",
        r.stderr
    );
    println!("error as expected: {}", r.stderr.trim());
    let now = ublk_list_one(d.id)?;
    ensure!(
        now.state == "QUIESCED" && !alive(now.pid),
        "after the failed recover: {now:?}"
    );
    let (_server, _) = Server::start(&file, false, 2)?;
    let r = ublk_ok(&["recover", "-n", &id])?;
    let n = parse_one("ublk recover", &r)?;
    ensure!(n.state == "LIVE" && n.pid != d.pid, "after recover: {n:?}");
    let seen = read_dev(&d.bdev(), 0, 4)?;
    ublk_del(d.id)?;
    ensure!(
        seen == fs::read(&pat)?,
        "the device does not read back what was written before the kill"
    );
    Ok(Outcome::Pass)
}

/// The `target` object of `ublk list -n ID --json`.
fn list_target(id: u32) -> Result<serde_json::Value> {
    let json = ublk_ok(&["list", "-n", &id.to_string(), "--json"])?.stdout;
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .with_context(|| format!("`ublk list --json` is not JSON: {json:?}"))?;
    Ok(if v.is_array() {
        v[0]["target"].clone()
    } else {
        v["target"].clone()
    })
}

/// Where io_uring cannot send and receive on registered buffers, `ublk add -t nbd -z` fails
/// saying why and leaves nothing behind; with `--fallback` the device comes up in copy mode.
fn nbd_zero_copy_refused() -> Result<Outcome> {
    if nbd_zero_copy_supported()? {
        return Ok(Outcome::Skip(
            "zero copy works here (kernel_nbd_zero_copy_*)".into(),
        ));
    }
    let file = backing("nbd-zc.raw", 16)?;
    let (_server, ep) = Server::start(&file, false, 1)?;
    let mut args = vec!["add", "-t", "nbd"];
    args.extend(ep.split('\u{1f}'));
    args.push("-z");
    check_refused(&ublk(&args)?, "registered buffers")?;
    args.push("--fallback");
    let r = ublk_ok(&args)?;
    let d = parse_one("ublk add -t nbd -z --fallback", &r)?;
    let flags = list_flags(d.id)?;
    ublk_del(d.id)?;
    ensure!(
        r.stderr.contains("falling back to copy mode") && r.stderr.contains("registered buffers"),
        "no fallback warning with its reason on the terminal: {:?}",
        r.stderr
    );
    ensure!(
        !flags.iter().any(|f| f == "AUTO_BUF_REG"),
        "flags {flags:?}"
    );
    Ok(Outcome::Pass)
}

/// The names of device `id`'s flags, from `ublk list --json`.
fn list_flags(id: u32) -> Result<Vec<String>> {
    let json = ublk_ok(&["list", "-n", &id.to_string(), "--json"])?.stdout;
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .with_context(|| format!("`ublk list --json` is not JSON: {json:?}"))?;
    let v = if v.is_array() { v[0].clone() } else { v };
    Ok(v["flag_names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// A qemu-nbd server, killed on drop.
struct Server {
    child: Child,
}

impl Server {
    /// Serves `file` (raw) on a Unix socket or on 127.0.0.1:10809, with `conns` connections
    /// allowed (more than 1 advertises multi-conn).
    fn start(file: &Path, tcp: bool, conns: u32) -> Result<(Server, String)> {
        Server::start_bin(&opt_bin("qemu-nbd"), file, tcp, conns)
    }

    /// [`Server::start`] with another qemu-nbd binary.
    fn start_bin(bin: &str, file: &Path, tcp: bool, conns: u32) -> Result<(Server, String)> {
        Server::start_with(bin, file, tcp, conns, &[])
    }

    /// [`Server::start_bin`] with more options for qemu-nbd.
    fn start_with(
        bin: &str,
        file: &Path,
        tcp: bool,
        conns: u32,
        extra: &[&str],
    ) -> Result<(Server, String)> {
        let sock = workdir()?.join("nbd.sock");
        let _ = fs::remove_file(&sock);
        let mut cmd = Command::new(bin);
        cmd.args([
            "-f",
            "raw",
            "-t",
            "--cache=none",
            "--aio=threads",
            "-e",
            &conns.to_string(),
        ]);
        let endpoint = if tcp {
            cmd.args(["-b", "127.0.0.1", "-p", "10809"]);
            vec![
                "--host".to_string(),
                "127.0.0.1".into(),
                "--port".into(),
                "10809".into(),
            ]
        } else {
            cmd.arg("-k").arg(&sock);
            vec![
                "--uri".to_string(),
                format!("nbd+unix:///?socket={}", sock.display()),
            ]
        };
        cmd.args(extra)
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().with_context(|| format!("cannot start {bin}"))?;
        let server = Server { child };
        if tcp {
            // Poll until the port accepts connections.
            wait_for(
                "qemu-nbd listening on 127.0.0.1:10809",
                Duration::from_secs(20),
                || {
                    // Bounded: with its accept queue full (at its client limit) the server
                    // drops SYNs, and a plain connect would wait out the retransmits.
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10809));
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                },
            )?;
        } else {
            wait_for_path(&sock, Duration::from_secs(20))?;
        }
        Ok((server, endpoint.join("\u{1f}")))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn add_nbd(endpoint: &str, extra: &[&str]) -> Result<DevInfo> {
    let mut a: Vec<&str> = vec!["-t", "nbd"];
    a.extend(endpoint.split('\u{1f}'));
    a.extend_from_slice(extra);
    ublk_add(&a)
}

fn backing(name: &str, mib: u64) -> Result<PathBuf> {
    let f = workdir()?.join(name);
    zero_file(&f, mib)?;
    Ok(f)
}

/// Threads of daemon `pid` belonging to the threaded NBD engine (`nbd-reader`, `nbd-writer`).
fn engine_threads(pid: i64) -> Result<usize> {
    let mut n = 0;
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = fs::read_to_string(e?.path().join("comm")).unwrap_or_default();
        if comm.starts_with("nbd-reader") || comm.starts_with("nbd-writer") {
            n += 1;
        }
    }
    Ok(n)
}

/// Checks which engine daemon `pid` runs: the io_uring engine has no thread of its own, the
/// threaded one a writer and a reader per connection.
fn check_engine(pid: i64, threads: bool, conns: usize) -> Result<()> {
    let n = engine_threads(pid)?;
    let want = if threads { 2 * conns } else { 0 };
    ensure!(n == want, "{n} nbd-reader/writer threads, expected {want}");
    Ok(())
}

/// fio verify through an nbd device served by the guest's qemu-nbd (see [`nbd_verify_with`]).
fn nbd_verify(
    tcp: bool,
    queues: u32,
    threads: bool,
    sparse: bool,
    more: &[&str],
) -> Result<Outcome> {
    nbd_verify_with(&opt_bin("qemu-nbd"), tcp, queues, threads, sparse, more)
}

/// fio verify through an nbd device served by `server` (a qemu-nbd); the data also reached the
/// server's file, and a range zeroed with `blkdiscard -z` (WRITE_ZEROES) reads back as zeros.
/// `sparse`: the file is sparse and holes may come back as hole chunks
/// (`--nbd-sparse-reads`), which the read-back of unwritten ranges at the end goes through.
/// The device negotiated extended headers exactly when the server has them (qemu-nbd 8.2+)
/// and they were not turned off.
fn nbd_verify_with(
    server: &str,
    tcp: bool,
    queues: u32,
    threads: bool,
    sparse: bool,
    more: &[&str],
) -> Result<Outcome> {
    let file = if sparse {
        let f = workdir()?.join("nbd-sparse.raw");
        sparse_file(&f, 256)?;
        f
    } else {
        backing("nbd.raw", 256)?
    };
    let (_server, ep) = Server::start_bin(server, &file, tcp, if queues > 1 { 4 } else { 1 })?;
    let version = sh(server, &["--version"])?;
    // "qemu-nbd 10.0.13 (Debian ...)": extended headers from 8.2 on.
    let (major, minor) = version
        .split_whitespace()
        .nth(1)
        .and_then(|v| {
            let mut n = v.split('.').map(|x| x.parse::<u32>().ok());
            Some((n.next()??, n.next()??))
        })
        .with_context(|| format!("no version in {version:?}"))?;
    let new_server = (major, minor) >= (8, 2);
    let q = queues.to_string();
    let mut extra = vec!["-q", &q];
    if threads {
        extra.push("--nbd-threads");
    }
    if sparse {
        extra.push("--nbd-sparse-reads");
    }
    extra.extend_from_slice(more);
    let d = add_nbd(&ep, &extra)?;
    ensure!(d.queues == queues, "device has {} queues", d.queues);
    check_engine(d.pid, threads, queues as usize)?;
    ensure!(
        d.capacity * 512 == 256 * MIB,
        "capacity {} sectors",
        d.capacity
    );
    let wc = read_trim(format!("/sys/block/ublkb{}/queue/write_cache", d.id))?;
    ensure!(
        wc == "write back",
        "write cache is {wc:?}: FLUSH would never reach the server"
    );
    let flags = list_flags(d.id)?;
    let has = |f: &str| flags.iter().any(|n| n == f);
    if more.contains(&"-z") {
        // Zero copy comes with user copy, for the bytes the client moves itself.
        ensure!(
            has("AUTO_BUF_REG") && has("USER_COPY"),
            "a zero-copy device has flags {flags:?}"
        );
    } else if more.contains(&"--copy") || threads {
        // Copy mode: asked for, or the threaded engine's default.
        ensure!(!has("USER_COPY"), "a copy-mode device has flags {flags:?}");
    } else {
        // The io_uring engine's default where the kernel has it (6.5+): user copy.
        ensure!(
            has("USER_COPY"),
            "the default nbd device has flags {flags:?}"
        );
    }
    let t = list_target(d.id)?;
    let want_ext = new_server && !more.contains(&"--nbd-no-extended-headers");
    ensure!(
        t["extended_headers"] == want_ext && t["structured_replies"] == true,
        "{version:?}: expected extended headers {want_ext}, structured replies: {t}"
    );
    fio_verify(&d.bdev(), 32, ("16M", "48M"), Duration::from_secs(180))?;
    // WRITE_ZEROES over part of what fio wrote.
    sh(
        &opt_bin("blkdiscard"),
        &["-z", "-o", "16777216", "-l", "1048576", &d.bdev()],
    )?;
    // The device content and the server's file agree (beyond what fio wrote, too: in the
    // sparse case those ranges are holes).
    let seen = read_dev(&d.bdev(), 0, 128)?;
    ublk_del(d.id)?;
    let served = fs::read(&file)?;
    ensure!(
        served[..seen.len()] == seen[..],
        "the server's file differs from what the device read"
    );
    ensure!(
        seen[16 * MIB as usize..17 * MIB as usize]
            .iter()
            .all(|&b| b == 0),
        "the range zeroed with blkdiscard -z does not read back as zeros"
    );
    Ok(Outcome::Pass)
}

/// The server is killed and restarted under the io_uring engine: writes issued while it is
/// down complete once it is back, and nothing written before or after is lost.
///
/// `upgrade`: it comes back as qemu-nbd 10, which offers extended headers; the reconnect keeps
/// the reply format the session started with (structured replies).
fn nbd_server_restart(upgrade: bool) -> Result<Outcome> {
    let file = backing("nbd-restart.raw", 64)?;
    let (server, ep) = Server::start(&file, false, 1)?;
    let d = add_nbd(&ep, &[])?;
    check_engine(d.pid, false, 1)?;
    let dir = workdir()?;
    let (a, b) = (dir.join("restart-a"), dir.join("restart-b"));
    write_pattern(&a, 8 * MIB, 31)?;
    write_pattern(&b, 8 * MIB, 32)?;
    check_cmd(
        &mut write_dev_cmd(&a, &d.bdev(), 0),
        Duration::from_secs(60),
    )?;
    drop(server);
    // Written while the server is down: blocks until the connection is back.
    let mut writer = write_dev_cmd(&b, &d.bdev(), 8)
        .stdin(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    ensure!(
        writer.try_wait()?.is_none(),
        "dd finished while the server was down"
    );
    let bin = if upgrade {
        QEMU_NBD_NEW.to_string()
    } else {
        opt_bin("qemu-nbd")
    };
    let (_server, _) = Server::start_bin(&bin, &file, false, 1)?;
    let st = wait_child(&mut writer, Duration::from_secs(60))?
        .ok_or_else(|| anyhow::anyhow!("dd still blocked 60 s after the server came back"))?;
    ensure!(st.success(), "dd after the restart failed: {st}");
    let seen = read_dev(&d.bdev(), 0, 16)?;
    ublk_del(d.id)?;
    let mut want = fs::read(&a)?;
    want.extend(fs::read(&b)?);
    ensure!(
        seen == want,
        "the device does not read back what was written"
    );
    ensure!(
        fs::read(&file)?[..want.len()] == want[..],
        "the server's file differs from what was written"
    );
    Ok(Outcome::Pass)
}

/// A direct 4 KiB read of `dev` at block `blk` into `out`: the run (failed or not) and how
/// long it took.
fn read_block(dev: &str, blk: u64, out: &Path) -> Result<(Run, Duration)> {
    let t = std::time::Instant::now();
    let r = run_timeout(
        &mut dd_cmd(
            dev,
            out,
            &["bs=4k", "count=1", &format!("skip={blk}"), "iflag=direct"],
        ),
        Duration::from_secs(60),
    )?;
    Ok((r, t.elapsed()))
}

/// `--nbd-timeout`: IO the stopped server does not answer fails with EIO after about the
/// timeout, and the device works again once the server continues. `--nbd-no-reconnect`: IO
/// fails as soon as the server is gone, and the device can still be deleted.
fn nbd_timeout_no_reconnect() -> Result<Outcome> {
    let file = workdir()?.join("nbd-timeout.raw");
    write_pattern(&file, 16 * MIB, 41)?;
    let want = fs::read(&file)?;
    let out = workdir()?.join("nbd-timeout.out");
    let (server, ep) = Server::start(&file, false, 1)?;
    let d = add_nbd(&ep, &["--nbd-timeout", "2"])?;
    let (r, _) = read_block(&d.bdev(), 5, &out)?;
    ensure!(
        r.ok(),
        "read before stopping the server failed: {}",
        r.stderr
    );
    ensure!(
        fs::read(&out)? == want[5 * 4096..6 * 4096],
        "block 5 reads back wrong"
    );

    let pid = server.child.id().to_string();
    sh("kill", &["-STOP", &pid])?;
    let (r, took) = read_block(&d.bdev(), 7, &out)?;
    sh("kill", &["-CONT", &pid])?;
    ensure!(!r.ok(), "a read succeeded while the server was stopped");
    ensure!(
        r.stderr.contains("Input/output error"),
        "the read failed without EIO: {}",
        r.stderr
    );
    ensure!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(20),
        "the read failed after {took:?}, not after about the 2 s timeout"
    );
    // Back: the connection is re-established and the same block reads right.
    let mut ok = false;
    for _ in 0..30 {
        let (r, _) = read_block(&d.bdev(), 7, &out)?;
        if r.ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    ensure!(ok, "the device still fails 30 s after the server continued");
    ensure!(
        fs::read(&out)? == want[7 * 4096..8 * 4096],
        "block 7 reads back wrong"
    );
    ublk_del(d.id)?;

    let d = add_nbd(&ep, &["--nbd-no-reconnect"])?;
    let (r, _) = read_block(&d.bdev(), 9, &out)?;
    ensure!(
        r.ok(),
        "read before killing the server failed: {}",
        r.stderr
    );
    drop(server);
    let (r, took) = read_block(&d.bdev(), 11, &out)?;
    ensure!(!r.ok(), "a read succeeded with the server gone");
    ensure!(
        took < Duration::from_secs(10),
        "without reconnecting, the read took {took:?} to fail"
    );
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// ext4 on an nbd device survives del + re-add; e2fsck is clean.
fn nbd_ext4_readd() -> Result<Outcome> {
    let file = backing("nbd-ext4.raw", 256)?;
    let (_server, ep) = Server::start(&file, false, 4)?;
    let d = add_nbd(&ep, &["-q", "2"])?;
    sh(&opt_bin("mkfs.ext4"), &["-F", "-q", &d.bdev()])?;
    let mnt = format!("{MNT_BASE}/nbd");
    fs::create_dir_all(&mnt)?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    let mut sums = Vec::new();
    for (i, size) in [1u64, 4096, 65537, 5 * MIB].iter().enumerate() {
        let p = format!("{mnt}/f{i}");
        write_pattern(&p, *size, 900 + i as u64)?;
        sums.push((p.clone(), sha256(&p)?));
    }
    sh("umount", &[&mnt])?;
    ublk_del(d.id)?;
    let d = add_nbd(&ep, &[])?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    for (p, want) in &sums {
        ensure!(&sha256(p)? == want, "{p} differs after re-add");
    }
    sh("umount", &[&mnt])?;
    e2fsck_clean(&d.bdev())?;
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}
