//! Kernel-facing tests of unprivileged devices (`UBLK_F_UNPRIVILEGED_DEV`): a user without
//! CAP_SYS_ADMIN adds, serves, uses and deletes a device. The guest has no udev, so the test
//! does what the udev rules in `ublk-cli/udev/` do: `/dev/ublk-control` readable and writable
//! by all, and the nodes of each unprivileged device handed to its owner (`ublk owner NAME`).

use crate::cases::test;
use crate::nbd_cases::Nbdkit;
use crate::util::*;
use crate::{Outcome, Test};
use anyhow::{ensure, Context, Result};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The user the test acts as.
const UID: u32 = 1000;
const GID: u32 = 1000;
const WD: &str = "/tmp/ublk-unpriv";

/// The unprivileged-device tests, in run order.
pub fn all() -> Vec<Test> {
    vec![
        test("kernel_unprivileged_loop", 300, unprivileged_loop),
        test("kernel_unprivileged_qcow2_create", 300, unprivileged_qcow2),
        test("kernel_unprivileged_nbd", 300, unprivileged_nbd),
    ]
}

/// `setpriv` arguments that run a command as [`UID`]:[`GID`] with no supplementary groups
/// (and so no capability at all).
fn as_user() -> Vec<String> {
    as_uid(UID, GID)
}

fn as_uid(uid: u32, gid: u32) -> Vec<String> {
    vec![
        opt_bin("setpriv"),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
    ]
}

/// `ublk ARGS` as the user, with its own runtime directory for state and logs.
fn user_ublk(args: &[&str]) -> Result<Run> {
    uid_ublk(as_user(), args)
}

fn uid_ublk(p: Vec<String>, args: &[&str]) -> Result<Run> {
    let mut cmd = Command::new(&p[0]);
    cmd.args(&p[1..])
        .arg(ublk_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", format!("{WD}/run"));
    run_timeout(&mut cmd, Duration::from_secs(60))
}

/// What udev does with `ublk-cli/udev/99-ublk.rules`, until dropped: `/dev/ublk-control`
/// mode 0666, and every new `/dev/ublkcN` / `/dev/ublkbN` whose device `ublk owner` names an
/// owner for is chowned to it.
struct FakeUdev {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    control_mode: u32,
}

impl FakeUdev {
    fn start() -> Result<FakeUdev> {
        let control = "/dev/ublk-control";
        let control_mode = fs::metadata(control)?.permissions().mode() & 0o7777;
        fs::set_permissions(control, fs::Permissions::from_mode(0o666))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut done = HashSet::new();
            while !s.load(Ordering::Relaxed) {
                for e in fs::read_dir("/dev").into_iter().flatten().flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if !(name.starts_with("ublkc") || name.starts_with("ublkb")) {
                        continue;
                    }
                    let Ok(meta) = e.metadata() else { continue };
                    if !done.insert((name.clone(), meta.ino())) {
                        continue;
                    }
                    let Ok(r) = ublk(&["owner", &name]) else {
                        continue;
                    };
                    let mut w = r.stdout.split_whitespace();
                    if let (true, Some(Ok(uid)), Some(Ok(gid))) = (
                        r.ok(),
                        w.next().map(str::parse::<u32>),
                        w.next().map(str::parse::<u32>),
                    ) {
                        let path = e.path();
                        match std::os::unix::fs::chown(&path, Some(uid), Some(gid)) {
                            Ok(()) => println!("udev: {} -> {uid}:{gid}", path.display()),
                            Err(err) => println!("udev: chown {}: {err}", path.display()),
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(FakeUdev {
            stop,
            thread: Some(thread),
            control_mode,
        })
    }
}

impl Drop for FakeUdev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::set_permissions(
            "/dev/ublk-control",
            fs::Permissions::from_mode(self.control_mode),
        );
    }
}

/// Empties [`WD`] and gives it (and its `run` directory, the user's `XDG_RUNTIME_DIR`) to the
/// user.
fn fresh_user_dir() -> Result<()> {
    let _ = fs::remove_dir_all(WD);
    fs::create_dir_all(format!("{WD}/run"))?;
    for p in [WD.to_string(), format!("{WD}/run")] {
        std::os::unix::fs::chown(p, Some(UID), Some(GID))?;
    }
    Ok(())
}

/// `ublk add --unprivileged ARGS` as the user: the device, once it is unprivileged and its disk
/// belongs to the user; also what `add` printed.
fn user_add(args: &[&str]) -> Result<(DevInfo, Run)> {
    let mut full = vec!["add", "--unprivileged"];
    full.extend_from_slice(args);
    let r = user_ublk(&full)?;
    let what = format!("ublk {}", full.join(" "));
    ensure!(
        r.ok(),
        "`{what}` as uid {UID} failed: {} {}",
        r.stdout,
        r.stderr
    );
    let d = parse_one(&what, &r)?;
    println!("added {} (flags {:#x}) as uid {UID}", d.bdev(), d.flags);
    ensure!(
        d.flags & 0x20 != 0,
        "UBLK_F_UNPRIVILEGED_DEV not granted: flags {:#x}",
        d.flags
    );
    wait_for(
        "the disk handed to its owner",
        Duration::from_secs(10),
        || fs::metadata(d.bdev()).is_ok_and(|m| m.uid() == UID),
    )?;
    Ok((d, r))
}

/// fio verify (see [`fio_verify`]) on `d`, run as the user.
fn verify_as_user(d: &DevInfo, sizes: (&str, &str)) -> Result<()> {
    let prefix = as_user();
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    fio_verify_as(&prefix, &d.bdev(), 32, sizes, Duration::from_secs(150))
        .context("fio verify as the device's owner")
}

/// `ublk del` of `d` as the user; waits until the device is gone.
fn user_del(d: &DevInfo) -> Result<()> {
    let id = d.id.to_string();
    let r = user_ublk(&["del", "-n", &id])?;
    ensure!(
        r.ok(),
        "`ublk del -n {id}` as the owner failed: {}",
        r.stderr
    );
    wait_gone(d.bdev(), Duration::from_secs(10))?;
    wait_gone(d.cdev(), Duration::from_secs(10))
}

/// A user adds an unprivileged loop device over a file of theirs, fio verifies data through it
/// as that user, lists and deletes it; what the kernel refuses unprivileged users is refused
/// with a clear error and leaves no device behind.
fn unprivileged_loop() -> Result<Outcome> {
    fresh_user_dir()?;
    let file = Path::new(WD).join("disk.img");
    zero_file(&file, 128)?;
    std::os::unix::fs::chown(&file, Some(UID), Some(GID))?;
    let f = file.to_string_lossy().into_owned();
    let udev = FakeUdev::start()?;

    // Without --unprivileged the kernel wants CAP_SYS_ADMIN.
    let r = user_ublk(&["add", "-t", "loop", "-f", &f])?;
    ensure!(!r.ok(), "a user added a privileged device: {}", r.stdout);
    ensure!(
        r.stderr.contains("CAP_SYS_ADMIN") && r.stderr.contains("--unprivileged"),
        "unclear error: {:?}",
        r.stderr
    );
    println!("without --unprivileged: {}", r.stderr.trim());
    // The kernel refuses user copy for unprivileged devices: said before anything is added.
    let r = user_ublk(&["add", "-t", "loop", "--unprivileged", "-u", "-f", &f])?;
    ensure!(!r.ok(), "-u accepted for an unprivileged device");
    ensure!(
        r.stderr.contains("unprivileged"),
        "unclear error: {:?}",
        r.stderr
    );
    println!("with -u: {}", r.stderr.trim());
    ensure!(
        ublk_char_devs().is_empty(),
        "left behind: {:?}",
        ublk_char_devs()
    );

    let (d, r) = user_add(&["-t", "loop", "-q", "2", "-f", &f])?;
    ensure!(
        r.stdout.contains(&format!("owner: {UID}:{GID}")),
        "owner not shown: {}",
        r.stdout
    );
    let pid = d.pid;
    let daemon_uid = fs::metadata(format!("/proc/{pid}"))?.uid();
    ensure!(
        daemon_uid == UID,
        "the daemon runs as uid {daemon_uid}, not {UID}"
    );

    verify_as_user(&d, ("16M", "32M"))?;

    // Root sees it too; the owner lists and deletes it.
    let root_list = ublk_ok(&["list"])?;
    ensure!(
        root_list.stdout.contains(&format!("dev id {}:", d.id)),
        "root's `ublk list` misses device {}: {}",
        d.id,
        root_list.stdout
    );
    let id = d.id.to_string();
    let r = user_ublk(&["list", "-n", &id])?;
    ensure!(
        r.ok(),
        "`ublk list -n {id}` as the owner failed: {}",
        r.stderr
    );
    // Another user can neither delete it nor open its disk.
    let r = uid_ublk(as_uid(UID + 1, GID + 1), &["del", "-n", &id])?;
    ensure!(!r.ok(), "another user deleted device {id}");
    ensure!(
        r.stderr.contains("belongs to another user"),
        "unclear error: {:?}",
        r.stderr
    );
    println!("another user's del: {}", r.stderr.trim());
    let r = uid_ublk(as_uid(UID + 1, GID + 1), &["list"])?;
    ensure!(
        r.ok() && !r.stdout.contains("dev id"),
        "another user's `ublk list`: {} {}",
        r.stdout,
        r.stderr
    );
    let other = as_uid(UID + 1, GID + 1);
    let r = run_timeout(
        Command::new(&other[0]).args(&other[1..]).args([
            opt_bin("blkdiscard").as_str(),
            "-l",
            "4096",
            &d.bdev(),
        ]),
        Duration::from_secs(30),
    )?;
    ensure!(!r.ok(), "another user could open {}", d.bdev());
    ensure!(alive(pid), "the daemon died");
    user_del(&d)?;
    ensure!(!alive(pid), "daemon {pid} still running after del");
    drop(udev);
    let _ = fs::remove_dir_all(WD);
    Ok(Outcome::Pass)
}

/// A user creates a qcow2 image and serves it as an unprivileged device (`--create`), writes and
/// verifies data through it as that user; afterwards `qemu-img check` finds the image clean.
fn unprivileged_qcow2() -> Result<Outcome> {
    fresh_user_dir()?;
    let img = format!("{WD}/disk.qcow2");
    let udev = FakeUdev::start()?;
    let (d, _) = user_add(&["-t", "qcow2", "--create", "64M", "-f", &img])?;
    ensure!(
        fs::metadata(&img)?.uid() == UID,
        "the image is not the user's"
    );
    verify_as_user(&d, ("8M", "16M"))?;
    user_del(&d)?;
    drop(udev);
    let r = run_timeout(
        Command::new(opt_bin("qemu-img")).args(["check", &img]),
        Duration::from_secs(60),
    )?;
    ensure!(r.ok(), "qemu-img check: {} {}", r.stdout, r.stderr);
    let _ = fs::remove_dir_all(WD);
    Ok(Outcome::Pass)
}

/// A user serves an NBD export (nbdkit's memory plugin, started by root, its socket open to
/// all) as an unprivileged device with 2 queues, and verifies data through it as that user.
fn unprivileged_nbd() -> Result<Outcome> {
    fresh_user_dir()?;
    let (_server, uri) = Nbdkit::start(&["memory", "128M"])?;
    // Root's socket, open to the user.
    fs::set_permissions(Nbdkit::socket()?, fs::Permissions::from_mode(0o666))?;
    let udev = FakeUdev::start()?;
    let (d, _) = user_add(&["-t", "nbd", "-q", "2", "--uri", &uri])?;
    verify_as_user(&d, ("8M", "16M"))?;
    user_del(&d)?;
    drop(udev);
    let _ = fs::remove_dir_all(WD);
    Ok(Outcome::Pass)
}
