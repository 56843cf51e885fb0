//! `cargo xtask test-vm` / `cargo xtask vm-shell`: boot Debian kernels under qemu (TCG) with an
//! initramfs holding `ublk`, the in-guest test runner `ublk-vm-tests` and the tools it drives.
//!
//! Guest protocol (printed on the serial console by `ublk-vm-tests`):
//! `@@TEST START name@@`, `@@TEST PASS name secs@@`, `@@TEST FAIL name secs reason@@`,
//! `@@TEST SKIP name secs reason@@`, and finally by `/init`: `@@UBLK-VM-RESULT rc=N@@`.
//! Kernel command-line words pass parameters to the guest: `UBLK_VM_KERNEL=<label>`,
//! `UBLK_VM_FILTER=<pattern>`.

use crate::initramfs::{self, Mode, RESULT_MARKER};
use crate::kernel::{self, Kernel, KernelSpec};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Debian packages the host needs for `test-vm` / `vm-shell` (CI installs these with apt-get).
pub const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",        // qemu-system-x86_64
    "busybox-static",         // the guest's shell and core utilities
    "fio",                    // guest I/O load and verification
    "e2fsprogs",              // mke2fs, e2fsck for the guest
    "util-linux",             // blkdiscard, losetup for the guest
    "qemu-utils",             // qemu-img, qemu-nbd for the guest (qcow2 images, NBD server)
    "nbd-client",             // nbd-client for the guest (kernel nbd baseline of the bench)
    "nbdkit",                 // nbdkit + memory plugin for the guest (nbd server)
    "kmod",                   // modinfo: module dependencies
    "xz-utils",               // decompress .ko.xz
    "zstd",                   // decompress .ko.zst (newer Debian kernels)
    "dpkg",                   // dpkg-deb -x
    "apt",                    // apt-get download with a private configuration
    "debian-archive-keyring", // signed-by for the private sources
    "libc-bin",               // ldd
];

/// Trace events enabled from the kernel command line (recording stays off until a test turns
/// `tracing_on` on). Enabling an event at run time patches kernel text while the other vCPU runs,
/// which qemu's multi-threaded TCG does not survive: the 7.3 guest died with "Oops: int3" in
/// `ttwu_do_activate` (the sched_wakeup probe that records comms).
pub const TRACE_EVENTS: &[&str] = &["io_uring:io_uring_submit_req"];

/// Default host-side limit for one boot in test mode.
pub const DEFAULT_TIMEOUT_SECS: u64 = 1500;

#[derive(Debug)]
pub struct TestOptions {
    pub kernels: Vec<&'static KernelSpec>,
    pub filter: Option<String>,
    pub shell: bool,
    pub timeout: Duration,
    pub quiet: bool,
    pub no_build: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    Skip,
}

#[derive(Debug, Clone)]
struct TestResult {
    kernel: String,
    name: String,
    status: Status,
    secs: Option<f64>,
    reason: String,
}

impl TestResult {
    fn line(&self) -> String {
        let secs = self.secs.map(|s| format!("{s:.1}s"));
        match self.status {
            Status::Pass => format!(
                "PASS {} {} ({})",
                self.kernel,
                self.name,
                secs.unwrap_or_default()
            ),
            Status::Fail => match secs {
                Some(s) => format!("FAIL {} {} ({s}): {}", self.kernel, self.name, self.reason),
                None => format!("FAIL {} {}: {}", self.kernel, self.name, self.reason),
            },
            Status::Skip => format!("SKIP {} {} ({})", self.kernel, self.name, self.reason),
        }
    }
}

pub fn parse_kernels(arg: &str) -> Result<Vec<&'static KernelSpec>> {
    if arg == "all" {
        return Ok(kernel::KERNELS.iter().collect());
    }
    arg.split(',').map(|l| kernel::spec(l.trim())).collect()
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::project_root().join("target"))
}

/// Build the workspace binaries that go into the guest and return the ones that exist.
pub(crate) fn build_binaries(no_build: bool) -> Result<Vec<PathBuf>> {
    if !no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "ublk-cli",
                "-p",
                "ublk-vm-tests",
            ])
            .current_dir(crate::project_root())
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release -p ublk-cli -p ublk-vm-tests failed");
        }
    }
    let release = target_dir().join("release");
    let runner = release.join("ublk-vm-tests");
    if !runner.exists() {
        bail!("{} missing", runner.display());
    }
    let mut bins = vec![runner];
    let ublk = release.join("ublk");
    if ublk.exists() {
        bins.push(ublk);
    } else {
        eprintln!(
            "warning: {} does not exist; the guest has no `ublk`",
            ublk.display()
        );
    }
    Ok(bins)
}

pub(crate) fn prepare(
    spec: &KernelSpec,
    bins: &[PathBuf],
    mode: &Mode,
) -> Result<(Kernel, PathBuf)> {
    let kernel = kernel::fetch(spec)?;
    let suffix = match mode {
        Mode::Test => "test",
        Mode::Shell => "shell",
        Mode::Bench => "bench",
        Mode::Selftests(_) => "selftests",
    };
    let initrd = target_dir().join(format!("vm/initramfs-{}-{suffix}.cpio", spec.label));
    fs::create_dir_all(initrd.parent().unwrap())?;
    let t = Instant::now();
    initramfs::build(&kernel, bins, mode, &initrd)?;
    let size = fs::metadata(&initrd)?.len();
    eprintln!(
        "xtask: initramfs {} ({} MiB) built in {:.1}s",
        initrd.display(),
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    Ok((kernel, initrd))
}

/// Guest memory for test-vm / vm-shell.
const TEST_MEM: &str = "2G";

fn qemu_command(kernel: &Kernel, initrd: &Path, append: &str, serial: &str, mem: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max,erms=off,fsrm=off",
        "-smp",
        "2",
        "-m",
        mem,
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        serial,
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(append);
    c
}

/// The kernel command line every guest gets: serial console, `UBLK_VM_KERNEL=<label>`, and
/// `tsc=reliable`: under emulation the clocksource watchdog sees the TSC drift whenever the
/// host is busy and switches clocks, patching kernel text as it does; a 6.12 guest once died
/// of that (an int3 oops in `sched_clock_cpu` during `text_poke`).
pub(crate) fn base_append(label: &str) -> String {
    format!("console=ttyS0 panic=-1 quiet tsc=reliable UBLK_VM_KERNEL={label}")
}

/// Refuse values that would not survive as one kernel command-line word.
pub(crate) fn check_word(option: &str, value: &str) -> Result<()> {
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '\'')
    {
        bail!("{option} must not contain whitespace or quotes: {value:?}");
    }
    Ok(())
}

fn append_line(label: &str, filter: Option<&str>, mode: &Mode) -> Result<String> {
    let mut a = base_append(label);
    // Enable trace events at boot, never at run time (see TRACE_EVENTS).
    a.push_str(&format!(" trace_event={}", TRACE_EVENTS.join(",")));
    if let Some(f) = filter.filter(|f| !f.is_empty()) {
        check_word("--filter", f)?;
        a.push_str(&format!(" UBLK_VM_FILTER={f}"));
    }
    if matches!(mode, Mode::Shell) {
        a.push_str(" UBLK_VM_MODE=shell");
    }
    Ok(a)
}

/// Interactive guest: serial console multiplexed with the qemu monitor (Ctrl-A X quits).
pub fn shell(
    spec: &KernelSpec,
    filter: Option<&str>,
    no_build: bool,
    with: &[PathBuf],
) -> Result<ExitCode> {
    let mut bins = build_binaries(no_build)?;
    for p in with {
        if !p.is_file() {
            bail!("--with {}: no such file", p.display());
        }
        bins.push(p.clone());
    }
    let (kernel, initrd) = prepare(spec, &bins, &Mode::Shell)?;
    let append = append_line(spec.label, filter, &Mode::Shell)?;
    eprintln!(
        "xtask: booting {} ({}); exit the shell or press Ctrl-A X to quit",
        spec.label, kernel.release
    );
    let status = qemu_command(&kernel, &initrd, &append, "mon:stdio", TEST_MEM)
        .status()
        .context("running qemu-system-x86_64 (install qemu-system-x86)")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn test(opts: &TestOptions) -> Result<ExitCode> {
    if opts.shell {
        // One interactive boot: the last selected kernel (the newest with the default `all`).
        let spec = opts.kernels.last().context("no kernel selected")?;
        return shell(spec, opts.filter.as_deref(), opts.no_build, &[]);
    }
    let bins = build_binaries(opts.no_build)?;
    let mut results = Vec::new();
    let mut boot_notes = Vec::new();
    for spec in &opts.kernels {
        let (kernel, initrd) = prepare(spec, &bins, &Mode::Test)?;
        let (mut r, note) = boot_and_test(spec, &kernel, &initrd, opts)?;
        boot_notes.push(note);
        results.append(&mut r);
    }

    println!();
    println!("==== ublk VM test results ====");
    for n in &boot_notes {
        println!("{n}");
    }
    for r in &results {
        println!("{}", r.line());
    }
    let count = |s| results.iter().filter(|r| r.status == s).count();
    let (passed, failed, skipped) = (
        count(Status::Pass),
        count(Status::Fail),
        count(Status::Skip),
    );
    let ran = passed + failed + skipped;
    if ran == 0 {
        println!(
            "no test ran (filter {:?})",
            opts.filter.as_deref().unwrap_or("")
        );
    }
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if failed == 0 && ran > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One non-interactive boot: what to boot and how to watch it.
pub(crate) struct Boot<'a> {
    pub label: &'a str,
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    pub append: String,
    pub mem: &'a str,
    /// Extra qemu arguments (e.g. a second serial port).
    pub extra_args: Vec<OsString>,
    pub timeout: Duration,
    /// Do not stream the console (it is still written to `log_path`).
    pub quiet: bool,
    pub log_path: PathBuf,
}

/// How a [`Boot`] ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Exit status the guest reported with [`RESULT_MARKER`]; `None` if it never did.
    pub rc: Option<i32>,
    /// The host-side timeout ended the boot before the result marker.
    pub timed_out: bool,
    /// Seconds until `/init` said the guest was ready.
    pub booted: Option<f64>,
    /// Seconds of the whole boot.
    pub total: f64,
    /// The guest never became ready (no `init: guest ready` within [`BOOT_TIMEOUT`]).
    pub stalled: bool,
}

/// How long a guest may take to become ready. It takes about 10 s under TCG; a boot that
/// prints nothing for minutes (seen once in hundreds of boots, with an empty console) is
/// stuck, and is better retried than waited for.
pub(crate) const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// [`run_guest`], booting once more if the guest never became ready: it stalled, or it crashed
/// during boot (under TCG the 7.3 kernel now and then oopses on an `int3` in early text
/// patching, before `/init` runs). Nothing is lost: no test had started. The first console is
/// kept as `<log>.unready.log`.
pub(crate) fn run_guest_retrying(b: &Boot, mut on_line: impl FnMut(&str)) -> Result<Outcome> {
    let outcome = run_guest(b, &mut on_line)?;
    if outcome.booted.is_some() || outcome.rc.is_some() {
        return Ok(outcome);
    }
    eprintln!(
        "xtask: {}: the guest never became ready ({}); booting it again",
        b.label,
        if outcome.stalled {
            format!("nothing within {}s", BOOT_TIMEOUT.as_secs())
        } else {
            "it crashed or powered off during boot".to_string()
        }
    );
    let _ = std::fs::rename(&b.log_path, b.log_path.with_extension("unready.log"));
    run_guest(b, &mut on_line)
}

/// Boot once with the console on stdio, hand every console line to `on_line`, stop at the
/// result marker (plus the guest's power-off), a crash or the timeout.
pub(crate) fn run_guest(b: &Boot, mut on_line: impl FnMut(&str)) -> Result<Outcome> {
    let label = b.label;
    let mut log = BufWriter::new(File::create(&b.log_path)?);
    eprintln!(
        "xtask: booting {label} ({}), console log in {}",
        b.kernel.release,
        b.log_path.display()
    );

    let start = Instant::now();
    let mut child = qemu_command(b.kernel, b.initrd, &b.append, "stdio", b.mem)
        .args(&b.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running qemu-system-x86_64 (install qemu-system-x86)")?;
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    for &b in &buf[..n] {
                        match b {
                            b'\r' => {}
                            b'\n' => {
                                let l = String::from_utf8_lossy(&line).into_owned();
                                line.clear();
                                if tx.send(l).is_err() {
                                    return;
                                }
                            }
                            _ => line.push(b),
                        }
                    }
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
        }
    });

    let mut deadline = start + b.timeout;
    let mut rc: Option<i32> = None;
    let mut booted: Option<f64> = None;
    let mut timed_out = false;
    let mut stalled = false;
    let boot_deadline = start + BOOT_TIMEOUT;
    let out = std::io::stdout();
    loop {
        let now = Instant::now();
        let until = if booted.is_none() {
            deadline.min(boot_deadline)
        } else {
            deadline
        };
        if now >= until {
            timed_out = rc.is_none();
            stalled = booted.is_none() && rc.is_none();
            break;
        }
        let line = match rx.recv_timeout(until - now) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = rc.is_none();
                stalled = booted.is_none() && rc.is_none();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        writeln!(log, "{line}")?;
        if !b.quiet {
            let mut o = out.lock();
            writeln!(o, "{label}| {line}")?;
            o.flush()?;
        }
        if booted.is_none() && line.contains("init: guest ready") {
            booted = Some(start.elapsed().as_secs_f64());
        }
        if let Some(rest) = line.split(RESULT_MARKER).nth(1) {
            rc = rest.split("@@").next().and_then(|s| s.trim().parse().ok());
            // The guest powers off right after; do not wait long for it.
            deadline = deadline.min(Instant::now() + Duration::from_secs(30));
            continue;
        }
        on_line(&line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    log.flush()?;
    Ok(Outcome {
        rc,
        timed_out,
        booted,
        total: start.elapsed().as_secs_f64(),
        stalled,
    })
}

/// Boot `kernel` once in test mode; returns the per-test results (including synthetic failures
/// for a crash, a hang or a bad exit status) and a one-line note about the boot.
fn boot_and_test(
    spec: &KernelSpec,
    kernel: &Kernel,
    initrd: &Path,
    opts: &TestOptions,
) -> Result<(Vec<TestResult>, String)> {
    let label = spec.label;
    let log_path = target_dir().join(format!("vm/{label}.log"));
    let boot = Boot {
        label,
        kernel,
        initrd,
        append: append_line(label, opts.filter.as_deref(), &Mode::Test)?,
        mem: TEST_MEM,
        extra_args: Vec::new(),
        timeout: opts.timeout,
        quiet: opts.quiet,
        log_path: log_path.clone(),
    };
    let mut results = Vec::new();
    let mut running: Option<String> = None;
    let mut on_line = |line: &str| {
        if let Some(ev) = parse_test_line(line) {
            match ev {
                Event::Start(name) => running = Some(name),
                Event::Done(status, name, secs, reason) => {
                    running = None;
                    let r = TestResult {
                        kernel: label.to_string(),
                        name,
                        status,
                        secs,
                        reason,
                    };
                    println!("{}", r.line());
                    results.push(r);
                }
            }
        }
    };
    let outcome = run_guest_retrying(&boot, &mut on_line)?;
    let Outcome {
        rc,
        timed_out,
        booted,
        total,
        ..
    } = outcome;

    let boot_name = "<boot>".to_string();
    let fail = |name: String, reason: String| TestResult {
        kernel: label.to_string(),
        name,
        status: Status::Fail,
        secs: None,
        reason,
    };
    let mut extra = Vec::new();
    if let Some(name) = running.take() {
        let why = if timed_out {
            format!(
                "guest timed out after {}s while running this test",
                opts.timeout.as_secs()
            )
        } else {
            "guest died while running this test (see the console log)".to_string()
        };
        extra.push(fail(name, why));
    }
    match rc {
        None if timed_out => extra.push(fail(
            boot_name,
            format!(
                "no result marker: host timeout after {}s (log: {})",
                opts.timeout.as_secs(),
                log_path.display()
            ),
        )),
        None => extra.push(fail(
            boot_name,
            format!(
                "no result marker: guest crashed or powered off early (log: {})",
                log_path.display()
            ),
        )),
        Some(0) => {}
        Some(n) if !results.iter().any(|r| r.status == Status::Fail) => extra.push(fail(
            boot_name,
            match n {
                2 => "ublk-vm-tests exited with status 2: no test matches the filter".to_string(),
                n => format!("ublk-vm-tests exited with status {n}"),
            },
        )),
        Some(_) => {}
    }
    for r in &extra {
        println!("{}", r.line());
    }
    results.extend(extra);
    let note = format!(
        "kernel {label} ({}): {}, whole run {total:.1}s",
        kernel.release,
        match booted {
            Some(b) => format!("guest ready after {b:.1}s"),
            None => "guest never became ready".to_string(),
        }
    );
    Ok((results, note))
}

enum Event {
    Start(String),
    Done(Status, String, Option<f64>, String),
}

/// Parse `@@TEST START name@@` / `@@TEST PASS|FAIL|SKIP name secs [reason]@@` anywhere in a line.
fn parse_test_line(line: &str) -> Option<Event> {
    let body = line.split("@@TEST ").nth(1)?;
    let body = &body[..body.rfind("@@")?];
    let mut it = body.splitn(4, ' ');
    let kind = it.next()?;
    let name = it.next()?.to_string();
    if kind == "START" {
        return Some(Event::Start(name));
    }
    let status = match kind {
        "PASS" => Status::Pass,
        "FAIL" => Status::Fail,
        "SKIP" => Status::Skip,
        _ => return None,
    };
    let secs = it.next().and_then(|s| s.parse().ok());
    let reason = it.next().unwrap_or("").trim().to_string();
    Some(Event::Done(status, name, secs, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        assert!(
            matches!(parse_test_line("@@TEST START kernel_smoke@@"), Some(Event::Start(n)) if n == "kernel_smoke")
        );
        match parse_test_line("x @@TEST FAIL kernel_a 1.5 ublk add failed: no such file@@") {
            Some(Event::Done(Status::Fail, n, Some(s), r)) => {
                assert_eq!(n, "kernel_a");
                assert_eq!(s, 1.5);
                assert_eq!(r, "ublk add failed: no such file");
            }
            _ => panic!("bad parse"),
        }
        assert!(matches!(
            parse_test_line("@@TEST PASS kernel_b 0.2@@"),
            Some(Event::Done(Status::Pass, _, Some(_), _))
        ));
        assert!(parse_test_line("nothing here").is_none());
    }
}
