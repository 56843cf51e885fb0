//! `ublk nbd-list` against a real NBD server (qemu-nbd on a Unix socket); no kernel needed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// qemu-nbd serving a file, killed on drop.
struct QemuNbd {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl QemuNbd {
    /// Serves a fresh 1 MiB file read-only as export `exp1`; None without qemu-nbd.
    fn start(tag: &str) -> Option<QemuNbd> {
        QemuNbd::start_bin("qemu-nbd", tag)
    }

    /// [`QemuNbd::start`] with another qemu-nbd binary.
    fn start_bin(bin: &str, tag: &str) -> Option<QemuNbd> {
        let dir = std::env::temp_dir().join(format!("ublk-nbd-list-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let sock = dir.join("nbd.sock");
        let child = Command::new(bin)
            .args(["-k".as_ref(), sock.as_os_str()])
            .args(["-f", "raw", "-t", "-r", "-x", "exp1", "-D", "the disk"])
            .arg(&img)
            .spawn()
            .ok()?;
        let mut srv = QemuNbd { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = UnixStream::connect(&srv.sock) {
                // Listening. End this session politely (greeting, then NBD_OPT_ABORT), so
                // that the server does not complain about a broken pipe.
                let mut greeting = [0u8; 18];
                s.read_exact(&mut greeting).unwrap();
                let mut abort = 1u32.to_be_bytes().to_vec();
                abort.extend_from_slice(b"IHAVEOPT");
                abort.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 0]);
                s.write_all(&abort).unwrap();
                let _ = s.read(&mut [0u8; 20]);
                return Some(srv);
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd did not start listening"
            );
            assert!(srv.child.try_wait().unwrap().is_none(), "qemu-nbd exited");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ublk(args: &[&str], sock: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ublk"))
        .args(args)
        .arg(sock)
        .output()
        .unwrap()
}

#[test]
fn test_nbd_list_shows_exports_with_size_and_flags() {
    let Some(srv) = QemuNbd::start("text") else {
        eprintln!("skipped: qemu-nbd not installed");
        return;
    };
    let out = ublk(&["nbd-list", "--unix"], &srv.sock);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with("export \"exp1\": size 1048576 (1 MiB), block sizes "),
        "{text}"
    );
    assert!(text.contains("\tflags: read-only"), "{text}");
    assert!(text.contains("\treplies: "), "{text}");
    assert!(text.ends_with("\tdescription: the disk\n"), "{text}");

    // Each connection was closed: the server (one client at a time) answers again.
    let out = ublk(&["nbd-list", "--json", "--unix"], &srv.sock);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "exp1");
    assert_eq!(v[0]["size"], 1 << 20);
    assert_eq!(v[0]["read_only"], true);
    assert_eq!(v.as_array().map(Vec::len), Some(1));

    // A named export is described alone; an unknown one is reported, not fatal.
    let uri = format!("nbd+unix:///exp1?socket={}", srv.sock.display());
    let out = Command::new(env!("CARGO_BIN_EXE_ublk"))
        .args(["nbd-list", "--uri", &uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.starts_with("export \"exp1\": size 1048576"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_ublk"))
        .args(["nbd-list", "--export_name", "nope", "--unix"])
        .arg(&srv.sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.starts_with("ublk: export \"nope\" of unix:"), "{err}");
    assert!(out.stdout.is_empty());
}

/// qemu-nbd 10 (Debian trixie's, fetched by `cargo xtask qemu-nbd-new`) negotiates extended
/// headers, and the listing says so; skipped without it, failing under CI (`CI` set).
#[test]
fn test_nbd_list_shows_extended_headers() {
    let bin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/vm/qemu-nbd-trixie/qemu-nbd"
    );
    if !Path::new(bin).exists() {
        assert!(std::env::var_os("CI").is_none(), "{bin} is missing");
        eprintln!("skipped: {bin} missing (`cargo xtask qemu-nbd-new` fetches it)");
        return;
    }
    let srv = QemuNbd::start_bin(bin, "ext").expect("qemu-nbd 10 starts");
    let out = ublk(&["nbd-list", "--unix"], &srv.sock);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("\treplies: extended headers\n"), "{text}");
    let out = ublk(&["nbd-list", "--json", "--unix"], &srv.sock);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["extended_headers"], true);
    assert_eq!(v[0]["structured_replies"], true);
}

#[test]
fn test_nbd_list_without_server_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ublk-nbd-list-none-{}", std::process::id()));
    let out = ublk(&["nbd-list", "--unix"], &dir.join("no.sock"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("ublk: cannot list the exports of "),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

/// A server that is not there: the error names the address and says why (the cause of the
/// connect error, not just that it failed), both when listing and when describing a named
/// export.
#[test]
fn test_nbd_list_unreachable_server_says_why() {
    let dir = std::env::temp_dir().join(format!("ublk-nbd-list-none-{}", std::process::id()));
    let sock = dir.join("absent.sock");
    for args in [
        &["nbd-list", "--unix"][..],
        &["nbd-list", "--export_name", "x", "--unix"],
    ] {
        let out = ublk(args, &sock);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("cannot connect to unix:{}", sock.display())),
            "{args:?}: {err}"
        );
        assert!(err.contains("No such file or directory"), "{args:?}: {err}");
    }
}
