//! The test table.

use crate::util::*;
use crate::{Outcome, Test};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub(crate) fn test(name: &str, secs: u64, f: impl Fn() -> Result<Outcome> + 'static) -> Test {
    Test {
        name: name.to_string(),
        timeout: Duration::from_secs(secs),
        run: Box::new(f),
    }
}

/// Every test, in run order.
pub fn all() -> Vec<Test> {
    let mut v = vec![
        test("kernel_smoke", 60, smoke),
        test("kernel_features", 60, features),
        test("kernel_lifecycle", 90, lifecycle),
        test("kernel_bad_backing_path", 60, bad_backing_path),
        test("kernel_unsupported_mode_error", 60, unsupported_mode),
        // The null target uses no data: by default it takes user copy, where the queue copies
        // nothing; --copy forces copy mode.
        test("kernel_null_fio_randrw", 90, || null_fio(&[])),
        test("kernel_null_fio_randrw_copy", 90, || null_fio(&["--copy"])),
        test("kernel_null_fio_randrw_no_batch_sched", 90, || {
            null_fio(&["--no-batch-sched"])
        }),
        test("kernel_queue_threads_pinned", 60, queue_threads_pinned),
        test("kernel_del_during_fio", 120, || del_during_fio(&[])),
        test("kernel_del_during_fio_batch", 120, || {
            if !batch_supported()? {
                return Ok(Outcome::Skip("batch io commands need Linux 7.0".into()));
            }
            del_during_fio(&["-b"])
        }),
        test("kernel_kill_daemon_no_recovery", 90, kill_no_recovery),
        test("kernel_kill_daemon_recovery", 120, || {
            kill_recovery(&[], false)
        }),
        // qcow2 keeps metadata in the daemon between flushes: with recovery it must not.
        test("kernel_kill_daemon_recovery_qcow2", 180, || {
            kill_recovery(&["-q", "2"], true)
        }),
        test("kernel_kill_daemon_recovery_zero_copy", 120, || {
            if !zero_copy_supported()? {
                return Ok(Outcome::Skip("zero copy needs Linux 6.16".into()));
            }
            kill_recovery(&["-z"], false)
        }),
        test("kernel_quiesce_recover_under_fio", 180, || {
            quiesce_recover(&[])
        }),
        test("kernel_quiesce_recover_under_fio_zero_copy", 180, || {
            if !zero_copy_supported()? {
                return Ok(Outcome::Skip("zero copy needs Linux 6.16".into()));
            }
            quiesce_recover(&["-z"])
        }),
        test("kernel_quiesce_refused_batch", 60, quiesce_refused_batch),
        test("kernel_resize_loop_and_null", 120, resize),
        test("kernel_kill_daemon_recovery_batch", 120, || {
            if !batch_supported()? {
                return Ok(Outcome::Skip("batch io commands need Linux 7.0".into()));
            }
            kill_recovery(&["-b"], false)
        }),
        test(
            "kernel_signals_stop_and_delete",
            120,
            signals_stop_and_delete,
        ),
        test("kernel_foreground_ctrl_c", 90, foreground_ctrl_c),
        test("kernel_daemon_log", 60, daemon_log),
    ];
    // On tmpfs the default is user copy straight between the request and the mapped file.
    for (mode, flag) in [
        ("default", None),
        ("copy", Some("--copy")),
        ("getdata", Some("-g")),
        ("usercopy", Some("-u")),
        ("zerocopy", Some("-z")),
    ] {
        for queues in [1u32, 2] {
            for depth in [1u32, 128] {
                let name = format!("kernel_loop_verify_{mode}_q{queues}_d{depth}");
                v.push(test(&name, 180, move || {
                    loop_verify(flag.as_slice(), queues, depth)
                }));
            }
        }
    }
    // Batch io commands (Linux 7.0), in the modes they work with.
    for (mode, args) in [
        ("copy", &["-b"][..]),
        ("usercopy", &["-b", "-u"][..]),
        ("zerocopy", &["-b", "-z"][..]),
    ] {
        for (queues, depth) in [(1u32, 2u32), (1, 128), (2, 128)] {
            let name = format!("kernel_loop_verify_batch_{mode}_q{queues}_d{depth}");
            v.push(test(&name, 180, move || loop_verify(args, queues, depth)));
        }
    }
    // The same over a block device: tmpfs files are served inline on the queue thread, block
    // devices through io_uring.
    for (mode, flag) in [
        ("copy", None),
        ("usercopy", Some("-u")),
        ("zerocopy", Some("-z")),
    ] {
        let name = format!("kernel_loop_verify_blockdev_{mode}_q2_d128");
        v.push(test(&name, 180, move || loop_verify_blockdev(flag)));
    }
    v.extend([
        test("kernel_loop_mapped_fallbacks", 180, loop_mapped_fallbacks),
        test("kernel_ext4_readd", 180, ext4_readd),
        test("kernel_del_mounted", 120, del_mounted),
        test("kernel_flush_reaches_backing", 90, flush_reaches_backing),
        test("kernel_discard_punches_holes", 120, discard_punches_holes),
        test("kernel_write_zeroes_keeps_allocation", 120, || {
            write_zeroes(&[])
        }),
        test("kernel_write_zeroes_zero_copy", 120, || {
            if !zero_copy_supported()? {
                return Ok(Outcome::Skip("zero copy needs Linux 6.16".into()));
            }
            write_zeroes(&["-z"])
        }),
        test("kernel_zero_copy_errors", 60, zero_copy_errors),
        test("kernel_batch_io", 90, batch_io),
    ]);
    v.extend(crate::qcow2_cases::all());
    v.extend(crate::nbd_cases::all());
    v.extend(crate::unpriv_cases::all());
    v
}

const MIB: u64 = 1 << 20;

/// Add a loop device over `file` with extra `args`.
fn add_loop(file: &Path, args: &[&str]) -> Result<DevInfo> {
    let f = file.to_string_lossy().into_owned();
    let mut a = vec!["-t", "loop", "-f", &f];
    a.extend_from_slice(args);
    ublk_add(&a)
}

/// 1. The infrastructure itself: modules, control device, the kernel the host meant to boot,
///    the tools in /opt/bin.
fn smoke() -> Result<Outcome> {
    ensure!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control missing"
    );
    for m in ["ublk_drv", "null_blk", "loop", "configfs"] {
        ensure!(
            Path::new(&format!("/sys/module/{m}")).exists(),
            "module {m} not loaded"
        );
    }
    let rel = read_trim("/proc/sys/kernel/osrelease")?;
    let uname = sh("uname", &["-r"])?;
    ensure!(uname.trim() == rel, "uname -r {uname:?} != {rel:?}");
    match std::env::var("UBLK_VM_KERNEL") {
        Ok(label) => ensure!(
            rel.starts_with(&format!("{label}.")),
            "booted kernel {rel} does not match requested {label}"
        ),
        Err(_) => println!("UBLK_VM_KERNEL not set; not checking the kernel version"),
    }
    ensure!(Path::new(&ublk_bin()).exists(), "{} missing", ublk_bin());
    sh(&opt_bin("fio"), &["--version"])?;
    let r = run_timeout(Command::new(opt_bin("mkfs.ext4")).arg("-V"), CMD_TIMEOUT)?;
    ensure!(r.stderr.contains("mke2fs"), "mkfs.ext4 -V: {r:?}");
    sh(&opt_bin("blkdiscard"), &["--version"])?;
    sh(&opt_bin("losetup"), &["--version"])?;
    ensure!(
        Path::new("/sys/kernel/config").read_dir().is_ok(),
        "configfs not mounted"
    );
    println!("kernel {rel}, /dev/ublk-control present");
    Ok(Outcome::Pass)
}

/// `ublk features` talks to the kernel and prints something.
fn features() -> Result<Outcome> {
    let r = ublk_ok(&["features"])?;
    ensure!(
        !r.stdout.trim().is_empty(),
        "`ublk features` printed nothing"
    );
    println!("{}", r.stdout.trim());
    Ok(Outcome::Pass)
}

/// 2. add (auto id), list, del; add -n 7, list -n 7, del -n 7; list --json.
fn lifecycle() -> Result<Outcome> {
    ensure!(
        ublk_char_devs().is_empty(),
        "devices present before the test: {:?}",
        ublk_char_devs()
    );
    let d = ublk_add(&["-t", "null", "-q", "2", "-d", "64"])?;
    ensure!(
        d.queues == 2 && d.depth == 64,
        "add reported queues {} depth {}, wanted 2/64",
        d.queues,
        d.depth
    );
    ensure!(d.state == "LIVE", "add reported state {:?}", d.state);
    ensure!(d.pid > 0 && alive(d.pid), "daemon pid {} not alive", d.pid);
    ensure!(Path::new(&d.cdev()).exists(), "{} missing", d.cdev());

    let all = parse_devs(&ublk_ok(&["list"])?.stdout);
    let l = all
        .iter()
        .find(|x| x.id == d.id)
        .with_context(|| format!("`ublk list` lacks dev {}: {all:?}", d.id))?;
    ensure!(
        l.state == "LIVE" && l.queues == 2 && l.depth == 64,
        "`ublk list` shows {l:?}"
    );
    let one = ublk_list_one(d.id)?;
    ensure!(
        one.state == "LIVE" && one.pid == d.pid,
        "`ublk list -n {}` shows {one:?}",
        d.id
    );

    let json = ublk_ok(&["list", "--json"])?.stdout;
    let v: serde_json::Value = serde_json::from_str(json.trim())
        .with_context(|| format!("`ublk list --json` is not JSON: {json:?}"))?;
    ensure!(v.is_array() || v.is_object(), "`ublk list --json` gave {v}");
    ensure!(
        json.contains(&d.id.to_string()),
        "`ublk list --json` does not mention dev {}: {json}",
        d.id
    );

    ublk_del(d.id)?;
    wait_for("daemon to exit", Duration::from_secs(10), || !alive(d.pid))?;
    let all = parse_devs(&ublk_ok(&["list"])?.stdout);
    ensure!(
        all.iter().all(|x| x.id != d.id),
        "dev {} still listed after del: {all:?}",
        d.id
    );

    let d7 = ublk_add(&["-t", "null", "-n", "7"])?;
    ensure!(d7.id == 7, "`ublk add -n 7` created dev {}", d7.id);
    let l7 = ublk_list_one(7)?;
    ensure!(l7.state == "LIVE", "`ublk list -n 7` shows {l7:?}");
    ublk_del(7)?;
    let r = ublk(&["list", "-n", "7"])?;
    ensure!(
        !r.ok() || parse_devs(&r.stdout).is_empty(),
        "`ublk list -n 7` after del still shows it: {}",
        r.stdout
    );
    Ok(Outcome::Pass)
}

/// 10. A missing backing file: clear error naming the path, nothing left behind.
fn bad_backing_path() -> Result<Outcome> {
    let r = ublk(&["add", "-t", "loop", "-f", "/nonexistent"])?;
    ensure!(
        !r.ok(),
        "`ublk add -t loop -f /nonexistent` succeeded: {}",
        r.stdout
    );
    ensure!(
        r.stderr.contains("/nonexistent"),
        "error message does not mention the path: {:?}",
        r.stderr
    );
    println!("error as expected: {}", r.stderr.trim());
    sleep(Duration::from_millis(300));
    ensure!(
        ublk_char_devs().is_empty(),
        "left behind: {:?}",
        ublk_char_devs()
    );
    Ok(Outcome::Pass)
}

/// 9. USER_RECOVERY_FAIL_IO needs 6.13: a clear error before, success after.
fn unsupported_mode() -> Result<Outcome> {
    let (major, minor) = kernel_version()?;
    let r = ublk(&["add", "-t", "null", "-r", "1", "-e", "1"])?;
    if (major, minor) < (6, 13) {
        ensure!(
            !r.ok(),
            "`ublk add -r 1 -e 1` succeeded on {major}.{minor}: {}",
            r.stdout
        );
        ensure!(
            r.stderr.contains("6.13"),
            "error does not mention 6.13: {:?}",
            r.stderr
        );
        println!("error as expected: {}", r.stderr.trim());
        sleep(Duration::from_millis(300));
        let list = ublk_ok(&["list"])?;
        ensure!(
            list.stdout.trim().is_empty(),
            "`ublk list` not empty: {}",
            list.stdout
        );
        ensure!(
            ublk_char_devs().is_empty(),
            "left behind: {:?}",
            ublk_char_devs()
        );
    } else {
        ensure!(
            r.ok(),
            "`ublk add -r 1 -e 1` failed on {major}.{minor}: {}",
            r.stderr.trim()
        );
        let d = parse_one("ublk add -t null -r 1 -e 1", &r)?;
        wait_for_path(d.bdev(), Duration::from_secs(5))?;
        ublk_del(d.id)?;
    }
    Ok(Outcome::Pass)
}

/// 7b. Zero copy: before 6.16 `-z` fails naming the release and leaves nothing behind; from
///     6.16 a target that needs the data in user space (qcow2) refuses it, and null works.
fn zero_copy_errors() -> Result<Outcome> {
    if !zero_copy_supported()? {
        check_refused(&ublk(&["add", "-t", "null", "-z"])?, "6.16")?;
        // With --fallback the device comes up in copy mode, and the user is told.
        let r = ublk_ok(&["add", "-t", "null", "-z", "--fallback"])?;
        let d = parse_one("ublk add -z --fallback", &r)?;
        ublk_del(d.id)?;
        ensure!(
            r.stderr.contains("falling back to copy mode"),
            "no fallback warning on the terminal: {:?}",
            r.stderr
        );
        ensure!(d.flags & (1 << 7) == 0, "flags {:#x}", d.flags);
        return Ok(Outcome::Pass);
    }
    let img = workdir()?.join("zc.qcow2");
    let _ = fs::remove_file(&img);
    sh(
        &opt_bin("qemu-img"),
        &["create", "-q", "-f", "qcow2", &img.to_string_lossy(), "16M"],
    )?;
    let r = ublk(&["add", "-t", "qcow2", "-z", "-f", &img.to_string_lossy()])?;
    check_refused(&r, "zero copy")?;
    let d = ublk_add(&["-t", "null", "-z", "-q", "2"])?;
    fio(
        &[
            "--name=zc",
            &format!("--filename={}", d.bdev()),
            "--rw=randrw",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--ioengine=io_uring",
            "--direct=1",
        ],
        Duration::from_secs(60),
    )?;
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// Refused `ublk add` arguments: the error names `want`, and no device is left behind.
pub(crate) fn check_refused(r: &Run, want: &str) -> Result<()> {
    ensure!(!r.ok(), "succeeded: {}", r.stdout);
    ensure!(
        r.stderr.contains(want),
        "error does not mention {want:?}: {:?}",
        r.stderr
    );
    println!("error as expected: {}", r.stderr.trim());
    sleep(Duration::from_millis(300));
    ensure!(
        ublk_ok(&["list"])?.stdout.trim().is_empty() && ublk_char_devs().is_empty(),
        "a device was left behind: {:?}",
        ublk_char_devs()
    );
    Ok(())
}

/// Whether the kernel has batch io commands (`UBLK_F_BATCH_IO`, 7.0).
pub(crate) fn batch_supported() -> Result<bool> {
    Ok(kernel_version()? >= (7, 0))
}

/// 7c. Batch io commands: before 7.0 `-b` fails naming the release and leaves nothing behind;
///     from 7.0 NEED_GET_DATA is refused, and null with 2 queues serves fio with the flag
///     granted in copy, user-copy and zero-copy mode.
fn batch_io() -> Result<Outcome> {
    if !batch_supported()? {
        check_refused(&ublk(&["add", "-t", "null", "-b"])?, "7.0")?;
        return Ok(Outcome::Pass);
    }
    check_refused(&ublk(&["add", "-t", "null", "-b", "-g"])?, "batch")?;
    for extra in [&[][..], &["-u"][..], &["-z"][..]] {
        let mut args = vec!["-t", "null", "-b", "-q", "2"];
        args.extend_from_slice(extra);
        let d = ublk_add(&args)?;
        let flags = d.flags;
        ensure!(
            flags & (1 << 15) != 0,
            "BATCH_IO (bit 15) not granted: flags {flags:#x}"
        );
        fio(
            &[
                "--name=batch",
                &format!("--filename={}", d.bdev()),
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=64",
                "--ioengine=io_uring",
                "--direct=1",
                "--numjobs=2",
                "--group_reporting",
                "--time_based",
                "--runtime=3",
            ],
            Duration::from_secs(60),
        )?;
        ublk_del(d.id)?;
    }
    Ok(Outcome::Pass)
}

/// Each queue thread is pinned to one CPU of its queue's set, chosen by the device id so that
/// single-queue devices spread over the CPUs; `--no-affinity` pins nothing.
fn queue_threads_pinned() -> Result<Outcome> {
    let online = read_trim("/sys/devices/system/cpu/online")?;
    if online == "0" {
        return Ok(Outcome::Skip("one CPU: nothing to spread".into()));
    }
    let q_cpus = |pid: i64| -> Result<Vec<String>> {
        let t = thread_cpus(pid)?;
        Ok(t.into_iter()
            .filter(|(name, _)| name.contains("-q"))
            .map(|(_, cpus)| cpus)
            .collect())
    };
    let single = |cpus: &str| !cpus.contains(['-', ',']);
    let a = ublk_add(&["-t", "null"])?;
    let b = ublk_add(&["-t", "null"])?;
    let two = ublk_add(&["-t", "null", "-q", "2"])?;
    let free = ublk_add(&["-t", "null", "--no-affinity"])?;
    let (ca, cb, c2, cf) = (
        q_cpus(a.pid)?,
        q_cpus(b.pid)?,
        q_cpus(two.pid)?,
        q_cpus(free.pid)?,
    );
    for d in [a.id, b.id, two.id, free.id] {
        ublk_del(d)?;
    }
    ensure!(
        ca.len() == 1 && cb.len() == 1 && single(&ca[0]) && single(&cb[0]),
        "single-queue devices: queue threads on {ca:?} and {cb:?}, want one CPU each"
    );
    // Consecutive ids, one queue mapped to every CPU: two different CPUs.
    ensure!(
        b.id != a.id + 1 || ca != cb,
        "devices {} and {} both pinned to CPU {}",
        a.id,
        b.id,
        ca[0]
    );
    ensure!(
        c2.len() == 2 && c2.iter().all(|c| single(c)) && c2[0] != c2[1],
        "two queues: queue threads on {c2:?}, want two different CPUs"
    );
    ensure!(
        cf.len() == 1 && cf[0] == online,
        "--no-affinity: queue thread on {cf:?}, want every online CPU ({online})"
    );
    Ok(Outcome::Pass)
}

/// 8. null target under fio: 4k randread QD32, 2 queues, ~5 s.
fn null_fio(extra: &[&str]) -> Result<Outcome> {
    let mut args = vec!["-t", "null", "-q", "2"];
    args.extend_from_slice(extra);
    let d = ublk_add(&args)?;
    // UBLK_F_USER_COPY (bit 7) unless copy mode was asked for (both kernels have it).
    let user_copy = d.flags & (1 << 7) != 0;
    ensure!(
        user_copy != extra.contains(&"--copy"),
        "null {extra:?}: flags {:#x}",
        d.flags
    );
    // Queue threads run under SCHED_BATCH unless told otherwise.
    let want = if extra.contains(&"--no-batch-sched") {
        0
    } else {
        3
    };
    let policies = queue_thread_policies(d.pid)?;
    ensure!(
        policies.len() == 2 && policies.iter().all(|(_, p)| *p == want),
        "queue thread policies {policies:?}, want {want}"
    );
    // The OOM killer leaves the daemon alone.
    let adj = read_trim(format!("/proc/{}/oom_score_adj", d.pid))?;
    ensure!(adj == "-1000", "daemon oom_score_adj {adj}");
    let dev = format!("--filename={}", d.bdev());
    let j = fio(
        &[
            "--name=nullrr",
            &dev,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=32",
            "--ioengine=io_uring",
            "--direct=1",
            "--numjobs=2",
            "--group_reporting",
            "--time_based",
            "--runtime=5",
        ],
        Duration::from_secs(60),
    )?;
    let iops = |dir: &str| j["jobs"][0][dir]["iops"].as_f64().unwrap_or(0.0);
    let (r, w) = (iops("read"), iops("write"));
    println!("null {extra:?} randrw 4k QD32 x2: {r:.0} + {w:.0} IOPS");
    ensure!(r > 0.0 && w > 0.0, "fio reported {r} + {w} IOPS");
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// 2. `ublk del` while fio is hammering the device.
fn del_during_fio(extra: &[&str]) -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    sparse_file(&file, 256)?;
    let mut args = vec!["-q", "2"];
    args.extend_from_slice(extra);
    let d = add_loop(&file, &args)?;
    let log = fs::File::create(wd.join("fio.log"))?;
    let mut fio = Command::new(opt_bin("fio"))
        .args([
            "--name=bg",
            &format!("--filename={}", d.bdev()),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--runtime=60",
            "--clocksource=clock_gettime",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting fio")?;
    sleep(Duration::from_secs(2));
    if let Some(st) = fio.try_wait()? {
        bail!(
            "fio ended early ({st}): {}",
            fs::read_to_string(wd.join("fio.log")).unwrap_or_default()
        );
    }
    let t = Instant::now();
    let r = run_timeout(
        Command::new(ublk_bin()).args(["del", "-n", &d.id.to_string()]),
        Duration::from_secs(30),
    );
    let del_secs = t.elapsed().as_secs_f64();
    let fio_status = wait_child(&mut fio, Duration::from_secs(30))?;
    let r = r?;
    ensure!(
        r.ok(),
        "`ublk del -n {}` under load failed ({}): {}",
        d.id,
        r.status,
        r.stderr.trim()
    );
    println!("del under load took {del_secs:.1}s; fio ended with {fio_status:?}");
    ensure!(fio_status.is_some(), "fio still running 30s after del");
    wait_gone(d.bdev(), Duration::from_secs(10))?;
    wait_gone(d.cdev(), Duration::from_secs(10))?;
    wait_for(
        &format!("daemon {} to exit", d.pid),
        Duration::from_secs(10),
        || !alive(d.pid),
    )?;
    Ok(Outcome::Pass)
}

/// 3a. kill -9 of a daemon without recovery: the device dies, del cleans it up.
fn kill_no_recovery() -> Result<Outcome> {
    let d = ublk_add(&["-t", "null"])?;
    ensure!(d.pid > 0, "no daemon pid in add output");
    kill(d.pid, "9")?;
    let mut last = String::new();
    wait_for(
        "device DEAD or gone after kill -9",
        Duration::from_secs(15),
        || match ublk(&["list", "-n", &d.id.to_string()]) {
            Ok(r) if r.ok() => {
                let devs = parse_devs(&r.stdout);
                last = format!("{devs:?}");
                devs.first().is_some_and(|x| x.state == "DEAD")
            }
            Ok(r) => {
                last = r.stderr.clone();
                !Path::new(&d.cdev()).exists()
            }
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        },
    )
    .with_context(|| format!("last `ublk list -n {}`: {last}", d.id))?;
    wait_gone(d.bdev(), Duration::from_secs(10))?;
    if Path::new(&d.cdev()).exists() {
        ublk_del(d.id)?;
    }
    ensure!(
        ublk_char_devs().is_empty(),
        "left behind: {:?}",
        ublk_char_devs()
    );
    Ok(Outcome::Pass)
}

/// 3b. kill -9 with user recovery: QUIESCED, `ublk recover` brings it back LIVE, and every
///     write acknowledged before the kill reads back (none was flushed: the device outlived its
///     daemon, so the file system on it would carry on as if nothing happened). On a loop
///     device, or with `qcow2`, a new qcow2 image (every write allocates), which `qemu-img
///     check` finds clean afterwards.
fn kill_recovery(extra: &[&str], qcow2: bool) -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join(if qcow2 { "img.qcow2" } else { "backing" });
    let pat = wd.join("pattern");
    write_pattern(&pat, 4 * MIB, 0x5eed)?;
    let want = sha256(&pat)?;
    let f = file.to_string_lossy().into_owned();
    let mut args = vec!["-r", "1"];
    args.extend_from_slice(extra);
    let d = if qcow2 {
        let _ = std::fs::remove_file(&file);
        args.extend_from_slice(&["-t", "qcow2", "-f", &f, "--create", "64M"]);
        ublk_add(&args)?
    } else {
        sparse_file(&file, 64)?;
        add_loop(&file, &args)?
    };
    dd(&pat, d.bdev(), &["bs=64k", "count=64", "oflag=direct"])?;
    kill(d.pid, "9")?;
    let mut last = String::new();
    wait_for(
        "state QUIESCED after kill -9",
        Duration::from_secs(15),
        || match ublk(&["list", "-n", &d.id.to_string()]) {
            Ok(r) => {
                last = format!("{} {}", r.stdout.trim(), r.stderr.trim());
                parse_devs(&r.stdout)
                    .first()
                    .is_some_and(|x| x.state == "QUIESCED")
            }
            Err(e) => {
                last = format!("{e:#}");
                false
            }
        },
    )
    .with_context(|| format!("last `ublk list -n {}`: {last}", d.id))?;
    ensure!(
        Path::new(&d.bdev()).exists(),
        "{} vanished while quiesced",
        d.bdev()
    );

    let r = ublk_ok(&["recover", "-n", &d.id.to_string()])?;
    let n = parse_one("ublk recover", &r)?;
    ensure!(n.id == d.id, "recover printed dev {}", n.id);
    let now = ublk_list_one(d.id)?;
    ensure!(now.state == "LIVE", "state after recover: {now:?}");
    ensure!(
        now.pid > 0 && now.pid != d.pid && alive(now.pid),
        "new daemon pid {} (old {})",
        now.pid,
        d.pid
    );

    let rb = wd.join("readback");
    dd(d.bdev(), &rb, &["bs=1M", "count=4", "iflag=direct"])?;
    let got = sha256(&rb)?;
    ensure!(
        got == want,
        "data after recovery differs: sha256 {got} != {want}"
    );
    // And the recovered daemon serves new I/O.
    dd(
        &pat,
        d.bdev(),
        &["bs=1M", "count=4", "seek=8", "oflag=direct", "conv=fsync"],
    )?;
    dd(
        d.bdev(),
        &rb,
        &["bs=1M", "count=4", "skip=8", "iflag=direct"],
    )?;
    ensure!(
        sha256(&rb)? == want,
        "write after recovery reads back differently"
    );
    ublk_del(d.id)?;
    if qcow2 {
        crate::qcow2_cases::qemu_img_check(&file)?;
    }
    Ok(Outcome::Pass)
}

/// 3c. Planned daemon replacement: `ublk quiesce` while fio writes and verifies, then `ublk
///     recover`; fio never sees an error and every block verifies. Before 6.16 `ublk quiesce`
///     is refused naming the release, and the device keeps serving.
fn quiesce_recover(extra: &[&str]) -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    zero_file(&file, 128)?;
    let mut args = vec!["-r", "1", "-q", "2"];
    args.extend_from_slice(extra);
    let d = add_loop(&file, &args)?;
    let id = d.id.to_string();
    if kernel_version()? < (6, 16) {
        let r = ublk(&["quiesce", "-n", &id])?;
        ensure!(!r.ok(), "`ublk quiesce` succeeded before 6.16");
        ensure!(r.stderr.contains("6.16"), "unclear error: {:?}", r.stderr);
        ensure!(
            ublk_list_one(d.id)?.state == "LIVE",
            "device not LIVE after the refusal"
        );
        ublk_del(d.id)?;
        return Ok(Outcome::Skip(format!(
            "QUIESCE_DEV needs Linux 6.16 (refused: {})",
            r.stderr.trim()
        )));
    }
    let fio = spawn_fio_verify("quiesce", &d.bdev(), "96M");
    sleep(Duration::from_secs(2));
    ensure!(!fio.is_finished(), "fio finished before the quiesce");
    let r = ublk_ok(&["quiesce", "-n", &id])?;
    println!("{}", r.stdout.trim());
    let q = ublk_list_one(d.id)?;
    ensure!(q.state == "QUIESCED", "state after quiesce: {q:?}");
    ensure!(!alive(d.pid), "old daemon {} still running", d.pid);
    sleep(Duration::from_secs(1));
    if fio.is_finished() {
        let r = fio
            .join()
            .map_err(|_| anyhow::anyhow!("fio thread panicked"))?;
        bail!("fio ended while the device was quiesced: {r:?}");
    }
    let r = ublk_ok(&["recover", "-n", &id])?;
    let n = parse_one("ublk recover", &r)?;
    ensure!(n.state == "LIVE" && n.pid != d.pid, "after recover: {n:?}");
    let json = fio
        .join()
        .map_err(|_| anyhow::anyhow!("fio thread panicked"))?
        .context("fio across quiesce + recover")?;
    let ios = json["jobs"][0]["write"]["total_ios"].as_u64().unwrap_or(0);
    ensure!(ios > 0, "fio wrote nothing: {json}");
    println!("fio wrote and verified {ios} blocks across quiesce + recover");
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// 3d. A device with batch io commands is not offered for quiescing (on 7.3 the kernel fails
///     the requests in flight): `ublk quiesce` says why, and the device keeps serving.
fn quiesce_refused_batch() -> Result<Outcome> {
    if !batch_supported()? {
        return Ok(Outcome::Skip("batch io commands need Linux 7.0".into()));
    }
    let wd = workdir()?;
    let file = wd.join("backing");
    zero_file(&file, 64)?;
    let d = add_loop(&file, &["-r", "1", "-b"])?;
    let id = d.id.to_string();
    let r = ublk(&["quiesce", "-n", &id])?;
    ensure!(!r.ok(), "a batch io device was quiesced");
    ensure!(
        r.stderr.contains("batch io"),
        "unclear error: {:?}",
        r.stderr
    );
    println!("refused: {}", r.stderr.trim());
    let now = ublk_list_one(d.id)?;
    ensure!(
        now.state == "LIVE" && now.pid == d.pid,
        "after the refusal: {now:?}"
    );
    fio_verify(&d.bdev(), 32, ("8M", "16M"), Duration::from_secs(120))?;
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// 3e. `ublk resize`: a loop device grows to its grown backing file (data written past the old
///     end lands in the file), a size beyond the file is refused, null takes any size. Before
///     6.16 it is refused naming the release.
fn resize() -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    zero_file(&file, 64)?;
    let d = add_loop(&file, &[])?;
    let id = d.id.to_string();
    let sectors = |d: &DevInfo| -> Result<u64> {
        Ok(read_trim(format!("/sys/block/ublkb{}/size", d.id))?.parse()?)
    };
    ensure!(sectors(&d)? == 64 * MIB / 512, "initial size");
    if kernel_version()? < (6, 16) {
        let r = ublk(&["resize", "-n", &id, "32M"])?;
        ensure!(
            !r.ok() && r.stderr.contains("6.16"),
            "not refused clearly: {r:?}"
        );
        ublk_del(d.id)?;
        return Ok(Outcome::Skip(format!(
            "UPDATE_SIZE needs Linux 6.16 (refused: {})",
            r.stderr.trim()
        )));
    }
    fs::OpenOptions::new()
        .write(true)
        .open(&file)?
        .set_len(96 * MIB)?;
    let r = ublk(&["resize", "-n", &id, "128M"])?;
    ensure!(
        !r.ok() && r.stderr.contains("grow it first"),
        "a size beyond the file was not refused: {r:?}"
    );
    ublk_ok(&["resize", "-n", &id])?;
    ensure!(
        sectors(&d)? == 96 * MIB / 512,
        "size after growing to the file"
    );
    ensure!(
        ublk_list_one(d.id)?.capacity == 96 * MIB / 512,
        "`ublk list` shows the old capacity"
    );
    // Write past the old end, through the device, and find it in the file.
    let pat = wd.join("pattern");
    write_pattern(&pat, MIB, 0x512e)?;
    dd(
        &pat,
        d.bdev(),
        &["bs=1M", "seek=80", "oflag=direct", "conv=fsync"],
    )?;
    let got = fs::read(&file)?;
    ensure!(
        got[(80 * MIB) as usize..(81 * MIB) as usize] == fs::read(&pat)?[..],
        "data written past the old end is not in the backing file"
    );
    ublk_ok(&["resize", "-n", &id, "32M"])?;
    ensure!(sectors(&d)? == 32 * MIB / 512, "size after shrinking");
    ublk_del(d.id)?;

    let n = ublk_add(&["-t", "null", "--size", "1G"])?;
    ublk_ok(&["resize", "-n", &n.id.to_string(), "3G"])?;
    ensure!(
        sectors(&n)? == 3 * 1024 * MIB / 512,
        "null size after resize"
    );
    ublk_del(n.id)?;
    Ok(Outcome::Pass)
}

/// Whether the kernel has zero copy with automatic buffer registration (6.16).
fn zero_copy_supported() -> Result<bool> {
    Ok(kernel_version()? >= (6, 16))
}

/// 4. fio verify (random 4k and sequential 128k writes) on loop over a 256 MiB file.
fn loop_verify(mode: &[&str], queues: u32, depth: u32) -> Result<Outcome> {
    if mode.contains(&"-z") && !zero_copy_supported()? {
        return Ok(Outcome::Skip("zero copy needs Linux 6.16".into()));
    }
    if mode.contains(&"-b") && !batch_supported()? {
        return Ok(Outcome::Skip("batch io commands need Linux 7.0".into()));
    }
    let wd = workdir()?;
    let file = wd.join("backing");
    zero_file(&file, 256)?;
    let (q, dp) = (queues.to_string(), depth.to_string());
    let mut args = vec!["-q", &q, "-d", &dp];
    args.extend_from_slice(mode);
    let d = add_loop(&file, &args)?;
    ensure!(
        d.queues == queues && d.depth == depth,
        "device has {} queues / depth {}",
        d.queues,
        d.depth
    );
    // QD1 round trips are slow under TCG: keep those runs smaller.
    let sizes = if depth == 1 {
        ["16M", "32M"]
    } else {
        ["32M", "64M"]
    };
    fio_verify(
        &d.bdev(),
        depth,
        (sizes[0], sizes[1]),
        Duration::from_secs(150),
    )?;
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// `dd` of `src` onto `bdev` at MiB `seek`, O_DIRECT, then fsync.
fn write_dev(src: &Path, bdev: &str, seek: u64) -> Result<Run> {
    run_timeout(
        &mut dd_cmd(
            src,
            bdev,
            &[
                "bs=1M",
                &format!("seek={seek}"),
                "oflag=direct",
                "conv=fsync,notrunc",
            ],
        ),
        Duration::from_secs(60),
    )
}

/// 4c. Loop over a tmpfs file in its default mode, user copy straight between the requests
///     and the mapped file: reading holes allocates nothing; where the mapping cannot do a
///     transfer: the file shrank under the
///     device (reads past its end are zeros, a write there extends it again) and the file
///     system is full (the write fails with ENOSPC and the device serves on).
fn loop_mapped_fallbacks() -> Result<Outcome> {
    let wd = workdir()?;
    let mnt = wd.join("small-tmpfs");
    fs::create_dir_all(&mnt)?;
    let m = mnt.to_string_lossy().into_owned();
    sh("mount", &["-t", "tmpfs", "-o", "size=16m", "tmpfs", &m])?;
    let res = (|| -> Result<()> {
        let file = mnt.join("backing");
        sparse_file(&file, 64)?;
        let d = add_loop(&file, &["-q", "2"])?;
        ensure!(
            d.flags & (1 << 7) != 0,
            "loop on tmpfs did not default to user copy: flags {:#x}",
            d.flags
        );
        let listed = ublk_ok(&["list", "-n", &d.id.to_string()])?.stdout;
        ensure!(
            listed.contains("\"mapped\":1"),
            "the file is not mapped: {listed}"
        );
        let bdev = d.bdev();
        // Reading holes must not allocate them (through the mapping tmpfs would).
        ensure!(
            read_dev(&bdev, 0, 48)?.iter().all(|&b| b == 0),
            "holes do not read as zeros"
        );
        let used = allocated_bytes(&file)?;
        ensure!(
            used == 0,
            "reading holes allocated {used} bytes of the file"
        );
        let pat = wd.join("pattern");
        write_pattern(&pat, 4 * MIB, 0x3a9)?;
        let want = fs::read(&pat)?;
        let r = write_dev(&pat, &bdev, 0)?;
        ensure!(r.ok(), "write through the mapping failed: {r:?}");
        ensure!(
            fs::read(&file)?[..want.len()] == want[..],
            "data written through the mapping is not in the file"
        );
        ensure!(
            read_dev(&bdev, 0, 4)? == want,
            "read back through the mapping differs"
        );

        // The file shrinks to 8 MiB under the device.
        fs::OpenOptions::new()
            .write(true)
            .open(&file)?
            .set_len(8 * MIB)?;
        ensure!(
            read_dev(&bdev, 12, 1)?.iter().all(|&b| b == 0),
            "a read past the end of the shrunk file is not zeros"
        );
        let r = write_dev(&pat, &bdev, 12)?;
        ensure!(
            r.ok(),
            "a write past the end of the shrunk file failed: {r:?}"
        );
        ensure!(
            fs::metadata(&file)?.len() == 16 * MIB,
            "the write did not extend the file"
        );
        ensure!(
            read_dev(&bdev, 12, 4)? == want,
            "read back past the old end differs"
        );

        // The tmpfs holds 16 MiB and 8 are used: 12 MiB more cannot fit.
        let big = wd.join("big");
        write_pattern(&big, 12 * MIB, 0x77)?;
        let r = write_dev(&big, &bdev, 32)?;
        ensure!(
            !r.ok() && r.stderr.contains("No space left"),
            "a write beyond the room of the file system did not fail with ENOSPC: {r:?}"
        );
        ensure!(
            read_dev(&bdev, 0, 4)? == want,
            "after ENOSPC the device reads wrong data"
        );
        ublk_del(d.id)
    })();
    let unmounted = sh("umount", &[&m]);
    res?;
    unmounted?;
    Ok(Outcome::Pass)
}

/// 4b. fio verify on loop over a block device (a kernel loop device with direct IO over a tmpfs
///     file), the io_uring path.
fn loop_verify_blockdev(mode: Option<&str>) -> Result<Outcome> {
    if mode == Some("-z") && !zero_copy_supported()? {
        return Ok(Outcome::Skip("zero copy needs Linux 6.16".into()));
    }
    let wd = workdir()?;
    let file = wd.join("backing");
    zero_file(&file, 128)?;
    let f = file.to_string_lossy().into_owned();
    let kloop = sh(&opt_bin("losetup"), &["-f", "--show", "--direct-io=on", &f])?;
    let kloop = kloop.trim().to_string();
    let res = (|| -> Result<()> {
        let mut args = vec!["-q", "2", "-d", "128"];
        args.extend(mode);
        let d = add_loop(Path::new(&kloop), &args)?;
        fio_verify(&d.bdev(), 128, ("32M", "64M"), Duration::from_secs(150))?;
        ublk_del(d.id)
    })();
    let detached = sh(&opt_bin("losetup"), &["-d", &kloop]);
    res?;
    detached?;
    Ok(Outcome::Pass)
}

/// 5. ext4 on a loop device survives del + re-add on the same backing file.
fn ext4_readd() -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    sparse_file(&file, 256)?;
    let d = add_loop(&file, &[])?;
    sh(&opt_bin("mkfs.ext4"), &["-F", "-q", &d.bdev()])?;
    let mnt = format!("{MNT_BASE}/ext4");
    fs::create_dir_all(&mnt)?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    let sizes: [u64; 8] = [0, 1, 4095, 4096, 65537, MIB, 3 * MIB + 123, 9 * MIB];
    let mut sums = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let p = format!("{mnt}/file{i}");
        write_pattern(&p, *size, 1000 + i as u64)?;
        sums.push((p.clone(), sha256(&p)?));
    }
    fs::create_dir_all(format!("{mnt}/dir/sub"))?;
    fs::write(format!("{mnt}/dir/sub/small"), b"hello ublk\n")?;
    sh("umount", &[&mnt])?;
    ublk_del(d.id)?;

    let d2 = add_loop(&file, &[])?;
    sh("mount", &["-t", "ext4", &d2.bdev(), &mnt])?;
    for (p, want) in &sums {
        let got = sha256(p)?;
        ensure!(
            &got == want,
            "{p}: sha256 {got} after re-add, {want} before"
        );
    }
    ensure!(
        fs::read(format!("{mnt}/dir/sub/small"))? == b"hello ublk\n",
        "small file differs"
    );
    sh("umount", &[&mnt])?;
    e2fsck_clean(&d2.bdev())?;
    ublk_del(d2.id)?;
    Ok(Outcome::Pass)
}

/// 5b. `ublk del` leaves a mounted device alone (clear error, device LIVE, the file system
///     keeps working); `ublk del --force` deletes it at once, without waiting for the unmount,
///     and leaves no state behind.
fn del_mounted() -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    sparse_file(&file, 128)?;
    let d = add_loop(&file, &[])?;
    let id = d.id.to_string();
    sh(&opt_bin("mkfs.ext4"), &["-F", "-q", &d.bdev()])?;
    let mnt = format!("{MNT_BASE}/delm");
    fs::create_dir_all(&mnt)?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    let res = (|| -> Result<()> {
        let p = format!("{mnt}/f");
        write_pattern(&p, MIB, 77)?;
        let want = sha256(&p)?;
        let r = ublk(&["del", "-n", &id])?;
        ensure!(!r.ok(), "`ublk del` of a mounted device succeeded");
        ensure!(
            r.stderr.contains("in use") && r.stderr.contains("--force"),
            "unclear refusal: {:?}",
            r.stderr
        );
        ensure!(
            ublk_list_one(d.id)?.state == "LIVE",
            "device not LIVE after the refusal"
        );
        sh("sync", &[])?;
        ensure!(sha256(&p)? == want, "file changed after the refusal");
        let t = std::time::Instant::now();
        ublk_ok(&["del", "--force", "-n", &id])?;
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "`ublk del --force` took {:?}",
            t.elapsed()
        );
        ensure!(
            !Path::new(&d.bdev()).exists(),
            "{} still there after del --force",
            d.bdev()
        );
        let state = format!("/run/ublk/ublk{id}.json");
        ensure!(!Path::new(&state).exists(), "{state} left behind");
        Ok(())
    })();
    // The file system saw its disk go: unmount it whatever happened.
    if sh("umount", &[&mnt]).is_err() {
        let _ = sh("umount", &["-l", &mnt]);
    }
    res?;
    Ok(Outcome::Pass)
}

/// 6. A FLUSH on the ublk disk becomes an fsync SQE submitted by the loop daemon.
///
/// The trace event must already be enabled (xtask boots with
/// `trace_event=io_uring:io_uring_submit_req` and `tracing_on` 0): enabling an event at run time
/// patches kernel text (tracepoint static keys, sched_wakeup probes for comm recording), and
/// qemu's multi-threaded TCG then crashes the guest ("Oops: int3" in ttwu_do_activate, seen on
/// 7.3). Only `tracing_on` is toggled here; that patches nothing.
fn flush_reaches_backing() -> Result<Outcome> {
    let tr = Path::new("/sys/kernel/tracing");
    let ev_dir = ["io_uring_submit_req", "io_uring_submit_sqe"]
        .iter()
        .map(|e| tr.join("events/io_uring").join(e))
        .find(|p| p.join("enable").exists());
    let wd = workdir()?;
    let file = wd.join("backing");
    zero_file(&file, 16)?;
    let d = add_loop(&file, &[])?;
    let wc = read_trim(format!("/sys/block/ublkb{}/queue/write_cache", d.id))?;
    ensure!(
        wc == "write back",
        "write_cache is {wc:?}, want \"write back\""
    );
    let Some(ev_dir) = ev_dir else {
        return Ok(Outcome::Skip(
            "tracefs event io_uring_submit_req not available".into(),
        ));
    };
    let enabled = read_trim(ev_dir.join("enable"))?;
    if !enabled.starts_with('1') {
        return Ok(Outcome::Skip(format!(
            "{} is not enabled (boot with trace_event=io_uring:io_uring_submit_req; enabling it at run time crashes TCG guests)",
            ev_dir.display()
        )));
    }
    println!("using {}", ev_dir.display());
    fs::write(tr.join("tracing_on"), "0")?;
    fs::write(tr.join("trace"), "")?;
    fs::write(tr.join("tracing_on"), "1")?;
    let res = (|| -> Result<()> {
        let mut f = fs::OpenOptions::new().write(true).open(d.bdev())?;
        f.write_all(&[0xabu8; 4096])?;
        f.sync_all()?;
        Ok(())
    })();
    fs::write(tr.join("tracing_on"), "0")?;
    res.context("write + fsync on the ublk device")?;
    let trace = fs::read_to_string(tr.join("trace"))?;
    let fsyncs: Vec<&str> = trace
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.contains("opcode FSYNC") || l.contains("opcode 3,"))
        .collect();
    let submits = trace.lines().filter(|l| !l.starts_with('#')).count();
    let by_ublk: Vec<&&str> = fsyncs
        .iter()
        .filter(|l| l.trim_start().starts_with("ublk"))
        .collect();
    println!(
        "{submits} io_uring submissions traced, {} FSYNC, {} from ublk tasks",
        fsyncs.len(),
        by_ublk.len()
    );
    for l in fsyncs.iter().take(5) {
        println!("  {l}");
    }
    if by_ublk.is_empty() {
        let sample: Vec<&str> = trace
            .lines()
            .filter(|l| !l.starts_with('#'))
            .take(5)
            .collect();
        bail!(
            "no FSYNC submitted by a ublk task after fsync on {} ({submits} submissions traced; FSYNC lines: {fsyncs:?}; sample: {sample:?})",
            d.bdev()
        );
    }
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// 7. blkdiscard on a loop device punches holes in the backing file and reads back zeros.
fn discard_punches_holes() -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    write_pattern(&file, 64 * MIB, 0xd15c)?;
    let d = add_loop(&file, &[])?;
    let max = read_trim(format!("/sys/block/ublkb{}/queue/discard_max_bytes", d.id))?;
    ensure!(
        max != "0",
        "device does not advertise discard (discard_max_bytes 0)"
    );
    let before = allocated_bytes(&file)?;
    check_cmd(
        Command::new(opt_bin("blkdiscard")).args([
            "-o",
            "0",
            "-l",
            &(32 * MIB).to_string(),
            &d.bdev(),
        ]),
        Duration::from_secs(60),
    )?;
    let after = allocated_bytes(&file)?;
    println!(
        "backing file allocated: {} MiB before, {} MiB after discard",
        before / MIB,
        after / MIB
    );
    ensure!(
        before >= after + 30 * MIB,
        "allocation dropped by {} KiB only ({before} -> {after} bytes)",
        before.saturating_sub(after) / 1024
    );
    let data = read_dev(&d.bdev(), 0, 64)?;
    ensure!(
        data.len() as u64 == 64 * MIB,
        "read back {} bytes",
        data.len()
    );
    let (lo, hi) = data.split_at((32 * MIB) as usize);
    if let Some(pos) = lo.iter().position(|&b| b != 0) {
        bail!("discarded range not zero at byte {pos}");
    }
    let orig = wd.join("orig");
    write_pattern(&orig, 64 * MIB, 0xd15c)?;
    let orig = fs::read(&orig)?;
    ensure!(
        &orig[(32 * MIB) as usize..] == hi,
        "data after the discarded range changed"
    );
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// WRITE_ZEROES with NOUNMAP (`blkdiscard -z` = BLKZEROOUT) zeroes the range and keeps it
/// allocated, also on tmpfs, which lacks FALLOC_FL_ZERO_RANGE (the target writes zeros then).
fn write_zeroes(args: &[&str]) -> Result<Outcome> {
    let wd = workdir()?;
    let file = wd.join("backing");
    write_pattern(&file, 64 * MIB, 0x2e20)?;
    let d = add_loop(&file, args)?;
    let max = read_trim(format!(
        "/sys/block/ublkb{}/queue/write_zeroes_max_bytes",
        d.id
    ))?;
    ensure!(max != "0", "device does not advertise write-zeroes");
    let before = allocated_bytes(&file)?;
    check_cmd(
        Command::new(opt_bin("blkdiscard")).args([
            "-z",
            "-o",
            &(8 * MIB).to_string(),
            "-l",
            &(16 * MIB).to_string(),
            &d.bdev(),
        ]),
        Duration::from_secs(60),
    )?;
    let after = allocated_bytes(&file)?;
    ensure!(
        after + MIB >= before,
        "NOUNMAP write-zeroes freed space: {before} -> {after} bytes"
    );
    let data = read_dev(&d.bdev(), 0, 64)?;
    let orig = wd.join("orig");
    write_pattern(&orig, 64 * MIB, 0x2e20)?;
    let orig = fs::read(&orig)?;
    let (a, b) = ((8 * MIB) as usize, (24 * MIB) as usize);
    ensure!(data.len() == orig.len(), "read back {} bytes", data.len());
    if let Some(pos) = data[a..b].iter().position(|&x| x != 0) {
        bail!("zeroed range not zero at byte {}", a + pos);
    }
    ensure!(
        data[..a] == orig[..a] && data[b..] == orig[b..],
        "data outside the zeroed range changed"
    );
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}

/// SIGTERM, SIGINT and SIGHUP to a background daemon each stop and delete its device, and the
/// daemon exits.
fn signals_stop_and_delete() -> Result<Outcome> {
    for sig in ["TERM", "INT", "HUP"] {
        let d = ublk_add(&["-t", "null", "-q", "2"])?;
        ensure!(d.pid > 0, "no daemon pid in add output");
        kill(d.pid, sig)?;
        wait_gone(d.cdev(), Duration::from_secs(20)).with_context(|| format!("after SIG{sig}"))?;
        wait_for("daemon exit", Duration::from_secs(10), || !alive(d.pid))
            .with_context(|| format!("after SIG{sig}"))?;
        ensure!(
            !Path::new(&d.bdev()).exists(),
            "{} left after SIG{sig}",
            d.bdev()
        );
        ensure!(
            !Path::new(&format!("/run/ublk/ublk{}.json", d.id)).exists(),
            "run state of device {} left after SIG{sig}",
            d.id
        );
    }
    Ok(Outcome::Pass)
}

/// `ublk add --foreground` serves until Ctrl-C (SIGINT), then deletes the device and exits 0.
fn foreground_ctrl_c() -> Result<Outcome> {
    let mut child = Command::new(ublk_bin())
        .args(["add", "-t", "null", "-n", "3", "--foreground"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn ublk add --foreground")?;
    let r = (|| -> Result<()> {
        wait_for_path("/dev/ublkb3", Duration::from_secs(20))?;
        let d = ublk_list_one(3)?;
        ensure!(
            d.pid == i64::from(child.id()),
            "daemon pid {} is not the foreground process {}",
            d.pid,
            child.id()
        );
        ensure!(d.state == "LIVE", "state {}", d.state);
        kill(d.pid, "INT")?;
        let status = wait_child(&mut child, Duration::from_secs(20))?
            .ok_or_else(|| anyhow::anyhow!("foreground daemon did not exit after SIGINT"))?;
        ensure!(status.success(), "foreground daemon exited with {status}");
        ensure!(
            !Path::new("/dev/ublkc3").exists(),
            "/dev/ublkc3 left behind"
        );
        Ok(())
    })();
    if r.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    r.map(|()| Outcome::Pass)
}

/// A background daemon logs to /run/ublk/ublkN.log at the level `ublk -v` asked for.
fn daemon_log() -> Result<Outcome> {
    let r = ublk_ok(&["-v", "add", "-t", "null"])?;
    let d = parse_one("ublk -v add", &r)?;
    let path = format!("/run/ublk/ublk{}.log", d.id);
    let log = fs::read_to_string(&path).with_context(|| format!("no daemon log at {path}"))?;
    ensure!(
        log.contains(&format!("device {} started", d.id)),
        "daemon log lacks the start message: {log:?}"
    );
    let json = ublk_ok(&["list", "-n", &d.id.to_string(), "--json"])?.stdout;
    ensure!(
        json.contains(&path),
        "`ublk list --json` does not name the log: {json}"
    );
    ublk_del(d.id)?;
    Ok(Outcome::Pass)
}
